//! The `hbmalloc` command-line tool.
//!
//! `hbmalloc demo` runs an inference-shaped workload on the default backend (CUDA where a GPU is
//! present, the simulated device elsewhere) and prints what the allocator did.

use hbmalloc::runtime::{self, Active};
use hbmalloc::tracked::device::{self as alloc, Api};
use std::process::ExitCode;
use std::time::Instant;

const USAGE: &str = "\
usage: hbmalloc <command>

commands:
  demo [--steps N]   run an inference-shaped workload through the caching pool and report
  version            print the version
  help               print this text

configuration: HBMALLOC_CONF=key:value,... (backend:auto|cuda|sim, sim_capacity:16GiB,
  stream_safety:batched|eager|off, pending_limit:auto|64MiB, backtrace:on|off, leak_report:...)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("demo") => match parse_steps(&args[1..]) {
            Ok(steps) => demo(steps),
            Err(e) => {
                eprintln!("hbmalloc demo: {e}\n\n{USAGE}");
                ExitCode::from(2)
            }
        },
        Some("version" | "--version" | "-V") => {
            println!("hbmalloc {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
        Some(other) => {
            eprintln!("hbmalloc: unknown command '{other}'\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn parse_steps(args: &[String]) -> Result<usize, String> {
    match args {
        [] => Ok(64),
        [flag, n] if flag == "--steps" => n
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1_000_000).contains(n))
            .ok_or_else(|| format!("--steps wants a count from 1 to 1000000, not '{n}'")),
        _ => Err(format!("unexpected arguments {args:?}")),
    }
}

/// A deterministic generator for the workload's sizes.
struct Sizes(u64);

impl Sizes {
    fn next(&mut self, lo: usize, hi: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        lo + ((self.0 >> 33) as usize) % (hi - lo)
    }
}

fn demo(steps: usize) -> ExitCode {
    let device = 0;
    let backend = match runtime::active() {
        Active::Cuda => "cuda",
        Active::Sim => "sim (no GPU found, or backend:sim)",
    };
    let pool = match runtime::pool(device) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("hbmalloc demo: cannot open device {device}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (free0, total) = pool.backend().mem_info().unwrap_or((0, 0));
    println!(
        "hbmalloc {} demo: backend {backend}, device {device}",
        env!("CARGO_PKG_VERSION")
    );
    println!("  device memory: {} free of {}", human(free0), human(total));
    println!("  workload: {steps} decode steps; each makes 100 scratch allocations of 1-16 MiB");
    println!("  and frees them in reverse; a KV cache grows every 16 steps; 3 buffers leak\n");

    match run_workload(device, steps) {
        Ok(report) => {
            let s = pool.stats();
            println!("what the allocator did");
            println!(
                "  step time (100 allocs + 100 frees): {:>8.1} us mean",
                report.mean_step_us
            );
            println!(
                "  same allocations straight from the driver: {:>8.1} us per step",
                report.driver_step_us
            );
            println!(
                "  allocations {:>9}   served from cache {:>9} ({:.1}%)",
                s.allocs,
                s.pool_hits,
                pct(s.pool_hits, s.allocs)
            );
            println!(
                "  driver allocations {:>4}   driver frees {:>4}   device synchronizes {:>4}",
                s.driver_allocs, s.driver_frees, s.syncs
            );
            println!(
                "  in use now {:>10}   peak in use {:>10}",
                human(s.in_use as usize),
                human(s.peak_in_use as usize)
            );
            println!(
                "  reserved   {:>10}   peak reserved {:>8}",
                human(s.reserved as usize),
                human(s.peak_reserved as usize)
            );
            println!(
                "  leaked on purpose: {} in 3 allocations (see the leak report at exit)",
                human(report.leaked)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hbmalloc demo: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Report {
    mean_step_us: f64,
    driver_step_us: f64,
    leaked: usize,
}

fn run_workload(device: i32, steps: usize) -> hbmalloc::error::Result<Report> {
    let mut sizes = Sizes(42);
    let mut kv_cache = alloc::alloc(device, 64 << 20, None, Api::Hbm)?;
    let mut kv_size = 64usize << 20;
    let mut scratch = Vec::with_capacity(100);
    let mut step_sizes = Vec::with_capacity(100);
    let started = Instant::now();
    for step in 0..steps {
        step_sizes.clear();
        step_sizes.extend((0..100).map(|_| sizes.next(1 << 20, 16 << 20)));
        for &size in &step_sizes {
            scratch.push(alloc::alloc(device, size, None, Api::Hbm)?);
        }
        while let Some(p) = scratch.pop() {
            alloc::free(p, None, Api::Hbm)?;
        }
        if step % 16 == 15 {
            // The realloc way of growing a cache: a bigger buffer, then the old one goes.
            let bigger = alloc::alloc(device, kv_size + (64 << 20), None, Api::Hbm)?;
            alloc::free(kv_cache, None, Api::Hbm)?;
            kv_cache = bigger;
            kv_size += 64 << 20;
        }
    }
    let mean_step_us = started.elapsed().as_secs_f64() * 1e6 / steps as f64;
    alloc::free(kv_cache, None, Api::Hbm)?;
    let leaked = leak_logits_buffers(device)?;
    let driver_step_us = driver_step(device, &step_sizes)?;
    Ok(Report {
        mean_step_us,
        driver_step_us,
        leaked,
    })
}

/// Allocates three buffers and forgets them: what a leak looks like in the report.
#[inline(never)]
fn leak_logits_buffers(device: i32) -> hbmalloc::error::Result<usize> {
    let sizes = [4 << 20, 4 << 20, 2 << 20];
    for size in sizes {
        alloc::alloc(device, size, None, Api::Hbm)?;
    }
    Ok(sizes.iter().sum())
}

/// One step's allocations made straight from the backend, for comparison.
fn driver_step(device: i32, sizes: &[usize]) -> hbmalloc::error::Result<f64> {
    let backend = runtime::backend(device)?;
    let rounds = 3;
    let started = Instant::now();
    for _ in 0..rounds {
        let ptrs: Vec<(usize, usize)> = sizes
            .iter()
            .map(|&s| backend.alloc(s).map(|p| (p, s)))
            .collect::<Result<_, _>>()?;
        for (p, s) in ptrs.into_iter().rev() {
            backend.free(p, s)?;
        }
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / rounds as f64)
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

fn human(bytes: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
