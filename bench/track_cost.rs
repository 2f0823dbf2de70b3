//! Cost of allocation tracking: `cargo bench --bench track_cost` (release profile, frame pointers
//! from .cargo/config.toml). Prints ns per operation; figures are kept in BENCHMARKS.md.
//!
//! - capture: one stack capture at a depth of about 20 frames, frame-pointer walk vs DWARF.
//! - alloc+free: one `on_alloc` and one `on_free` of the same pointer, with 10,000 other blocks
//!   live, at 1 and 16 threads, backtraces off / frame-pointer / DWARF. At 16 threads the figure
//!   is CPU time per pair: wall time x min(threads, cores) / pairs.

use hbmalloc::track::capture::{capture, Unwinder};
use hbmalloc::track::live_table::{FreeMark, LiveTable};
use hbmalloc::track::{Live, Origin, Settings, StackId, Tracker};
use std::hint::black_box;
use std::time::Instant;

/// Calls `f` at `depth` frames below the caller, so captures see a realistic stack.
#[inline(never)]
fn at_depth(depth: usize, f: &mut dyn FnMut()) {
    if depth == 0 {
        f();
    } else {
        at_depth(black_box(depth - 1), f);
        black_box(());
    }
}

fn bench_capture(unwinder: Unwinder) -> (f64, usize) {
    let mut buf = [0usize; 64];
    let mut frames = 0;
    let iters = 20_000;
    let mut ns = f64::INFINITY;
    at_depth(14, &mut || {
        frames = capture(unwinder, &mut buf[..40]);
        for _ in 0..5 {
            let start = Instant::now();
            for _ in 0..iters {
                black_box(capture(unwinder, black_box(&mut buf[..40])));
            }
            ns = ns.min(start.elapsed().as_nanos() as f64 / iters as f64);
        }
    });
    (ns, frames)
}

fn pairs(tracker: &Tracker, base: usize, iters: usize) {
    for i in 0..iters {
        let ptr = base + (i % 4096) * 256;
        tracker.on_alloc(ptr, 4096, 0, 0, Origin::CudaMalloc);
        black_box(tracker.on_free(ptr).is_ok());
    }
}

fn bench_pairs(settings: &Settings, threads: usize) -> f64 {
    let tracker = Tracker::new(settings.clone());
    for i in 0..10_000usize {
        tracker.on_alloc(0x7000_0000_0000 + i * 512, 512, 0, 0, Origin::Pool);
    }
    let iters = 400_000 / threads.min(4);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Warm up: intern the stacks, fault in the maps.
    pairs(&tracker, 1 << 40, 10_000);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let tracker = &tracker;
            s.spawn(move || at_depth(12, &mut || pairs(tracker, (t + 2) << 40, iters)));
        }
    });
    let wall = start.elapsed().as_nanos() as f64;
    wall * threads.min(cores) as f64 / (iters * threads) as f64
}

/// The floor: a bare insert + remove in the registry's live table (10,000 others live), as the
/// tracker does, without its clock read, epoch and thread ids.
fn bench_bare_table() -> f64 {
    let table = LiveTable::default();
    let live = |size| Live {
        size,
        epoch: 0,
        time_ns: 0,
        stream: 0,
        owner: 0,
        device: 0,
        thread: 0,
        stack: StackId::NONE,
        origin: Origin::CudaMalloc,
    };
    for i in 0..10_000usize {
        table.insert(0x7000_0000_0000 + i * 512, live(512));
    }
    let mark = FreeMark {
        stack: StackId::NONE,
        thread: 0,
        time_ns: None,
    };
    let iters = 400_000;
    (0..5)
        .map(|_| {
            let start = Instant::now();
            for i in 0..iters {
                let ptr = (1usize << 40) + (i % 4096) * 256;
                table.insert(ptr, live(i as u64));
                black_box(table.remove_with(ptr, |l| Some((l.size, mark))));
            }
            start.elapsed().as_nanos() as f64 / iters as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    // An argument selects the configurations whose name contains it (`-- off`, `-- frame`).
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    println!("stack capture (ns per capture, frames captured):");
    for unwinder in [Unwinder::FramePointer, Unwinder::Dwarf] {
        let (ns, frames) = bench_capture(unwinder);
        println!(
            "  {unwinder:?}: {ns:.0} ns for {frames} frames ({:.1} ns/frame)",
            ns / frames as f64
        );
    }
    println!("on_alloc + on_free (ns per pair, CPU time):");
    println!(
        "  floor, bare live-table insert + remove: {:.0} ns",
        bench_bare_table()
    );
    let configs = [
        ("backtrace:off", false, Unwinder::FramePointer),
        ("backtrace:on, frame pointers", true, Unwinder::FramePointer),
        ("backtrace:on, DWARF", true, Unwinder::Dwarf),
    ];
    for (name, backtrace, unwinder) in configs {
        if !name.contains(&filter) {
            continue;
        }
        let settings = Settings {
            backtrace,
            unwinder,
            ..Settings::default()
        };
        // The best of five runs: the machine may be shared, and interference only adds time.
        let best = |threads| {
            (0..5)
                .map(|_| bench_pairs(&settings, threads))
                .fold(f64::INFINITY, f64::min)
        };
        let (one, sixteen) = (best(1), best(16));
        println!("  {name}: {one:.0} ns at 1 thread, {sixteen:.0} ns at 16 threads");
    }
}
