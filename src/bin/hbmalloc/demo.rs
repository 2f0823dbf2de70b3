//! `hbmalloc demo`: an inference-shaped workload through the caching pool, and what it did.

use clap::Args;
use hbmalloc::error::Error;
use hbmalloc::runtime::{self, Active};
use hbmalloc::tracked::device::{self as alloc, Api};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Args)]
pub struct DemoArgs {
    /// Decode steps to run (each makes 100 scratch allocations of 1-16 MiB).
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    steps: u64,
}

pub fn run(a: DemoArgs) -> ExitCode {
    demo(a.steps as usize)
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
        Active::Sim => "sim (the simulated device in host memory: no GPU found, or backend:sim)",
    };
    let sim = runtime::active() == Active::Sim;
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
            let source = if sim {
                "the simulated device (no CUDA driver involved)"
            } else {
                "the CUDA driver"
            };
            println!(
                "  same allocations straight from {source}: {:>8.1} us per step",
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
        Err(Error::OutOfMemory { requested }) => {
            let (free, _) = pool.backend().mem_info().unwrap_or((0, 0));
            eprintln!(
                "hbmalloc demo: out of memory: an allocation of {} failed with {} free of {}; \
                 the demo needs about {} (a larger sim_capacity, or fewer --steps){}",
                human(requested),
                human(free),
                human(total),
                human(needed(steps)),
                if sim { " [simulated device]" } else { "" }
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("hbmalloc demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Peak device memory the workload needs: the largest KV buffer and the one it replaces, plus
/// one step of scratch (at most 100 x 16 MiB), plus the leaked buffers.
fn needed(steps: usize) -> usize {
    let kv_final = (64usize << 20) * (1 + steps / 16);
    2 * kv_final + 100 * (16 << 20) + (10 << 20)
}

struct Report {
    mean_step_us: f64,
    driver_step_us: f64,
    leaked: usize,
}

fn run_workload(device: i32, steps: usize) -> hbmalloc::error::Result<Report> {
    let mut held = Vec::with_capacity(101);
    let r = run_workload_holding(device, steps, &mut held);
    if r.is_err() {
        // Give back what a failed run still holds, so the leak report blames nothing of ours.
        for p in held.drain(..).rev() {
            let _ = alloc::free(p, None, Api::Hbm);
        }
    }
    r
}

/// The workload; every live buffer it owns sits in `held` (KV cache first, then scratch).
fn run_workload_holding(
    device: i32,
    steps: usize,
    held: &mut Vec<hbmalloc::backend::DevicePtr>,
) -> hbmalloc::error::Result<Report> {
    let mut sizes = Sizes(42);
    held.push(alloc::alloc(device, 64 << 20, None, Api::Hbm)?);
    let mut kv_size = 64usize << 20;
    let mut step_sizes = Vec::with_capacity(100);
    let started = Instant::now();
    for step in 0..steps {
        step_sizes.clear();
        step_sizes.extend((0..100).map(|_| sizes.next(1 << 20, 16 << 20)));
        for &size in &step_sizes {
            held.push(alloc::alloc(device, size, None, Api::Hbm)?);
        }
        while held.len() > 1 {
            alloc::free(held.pop().expect("len > 1"), None, Api::Hbm)?;
        }
        if step % 16 == 15 {
            // The realloc way of growing a cache: a bigger buffer, then the old one goes.
            let bigger = alloc::alloc(device, kv_size + (64 << 20), None, Api::Hbm)?;
            let old = std::mem::replace(&mut held[0], bigger);
            alloc::free(old, None, Api::Hbm)?;
            kv_size += 64 << 20;
        }
    }
    let mean_step_us = started.elapsed().as_secs_f64() * 1e6 / steps as f64;
    alloc::free(held.pop().expect("the KV cache"), None, Api::Hbm)?;
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
