//! Scratch-pool benchmark on the active backend (`HBMALLOC_CONF=backend:...`, CUDA when present).
//!
//! `cargo build --release --examples && target/release/examples/pool_bench [iterations]`
//!
//! Cases, each for the legacy and the VMM pool, in ns per alloc+free pair (median of 5 runs):
//! - `pair <size>`: one size allocated and freed over and over (warm cache);
//! - `scratch nested`: ggml's operator pattern: three nested allocations of varying sizes, freed
//!   in reverse order;
//! - `scratch any order`: the same, freed in another order (ggml's VMM pool aborts on this).
//!
//! Then the VMM growth cost: one `vmm_map` of a chunk of 1 and of 16 granules, its `vmm_unmap`,
//! and an allocation that commits one chunk through the pool. Prints markdown tables. The
//! `cudaMallocAsync` baseline comes from `bench/alloc_bench.c`, run on the same card.

use hbmalloc::backend::{DevicePtr, SharedBackend};
use hbmalloc::pool::{ScratchKind, ScratchOptions, ScratchPool};
use hbmalloc::runtime;
use std::hint::black_box;
use std::time::Instant;

const MIB: usize = 1 << 20;
const RUNS: usize = 5;

/// Median over `RUNS` of `f`'s time per operation, in ns; `f` does `ops` operations.
fn median_ns(ops: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up: fills the caches and commits the memory
    let mut t: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_nanos() as f64 / ops as f64
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[RUNS / 2]
}

fn pair(pool: &ScratchPool, size: usize, iters: usize) -> f64 {
    median_ns(iters, || {
        for _ in 0..iters {
            let (p, n) = pool.alloc(black_box(size)).unwrap();
            pool.free(black_box(p), n).unwrap();
        }
    })
}

/// Sizes of one operator's three scratch buffers, varying with the layer as ggml's do.
fn op_sizes(i: usize) -> [usize; 3] {
    let k = 1 + i % 4;
    [k * 8 * MIB, k * 2 * MIB + 4096, 512 * 1024 + k * 1000]
}

fn scratch(pool: &ScratchPool, iters: usize, order: [usize; 3]) -> f64 {
    median_ns(3 * iters, || {
        for i in 0..iters {
            let blocks: Vec<(DevicePtr, usize)> = op_sizes(i)
                .iter()
                .map(|&s| pool.alloc(s).unwrap())
                .collect();
            for &j in &order {
                pool.free(black_box(blocks[j].0), blocks[j].1).unwrap();
            }
        }
    })
}

fn new_pool(backend: &SharedBackend, kind: ScratchKind) -> ScratchPool {
    let options = ScratchOptions {
        reserve_size: 8 << 30,
        ..ScratchOptions::default()
    };
    let pool = ScratchPool::new(backend.clone(), kind, options).expect("a pool");
    if pool.kind() != kind {
        println!("(the {kind:?} pool fell back to {:?})", pool.kind());
    }
    pool
}

/// Time of one `vmm_map` and one `vmm_unmap` of `chunk` bytes, in microseconds (mean of `n`).
fn map_cost(backend: &SharedBackend, chunk: usize, n: usize) -> (f64, f64) {
    let base = backend.vmm_reserve(chunk * n).expect("a reservation");
    let start = Instant::now();
    for i in 0..n {
        backend.vmm_map(base + i * chunk, chunk).expect("vmm_map");
    }
    let map = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    backend.synchronize().unwrap();
    let start = Instant::now();
    for i in (0..n).rev() {
        backend
            .vmm_unmap(base + i * chunk, chunk)
            .expect("vmm_unmap");
    }
    let unmap = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    backend.vmm_release(base, chunk * n).unwrap();
    (map, unmap)
}

/// Mean time of a pool allocation that commits exactly one new chunk of `g` bytes, in us.
fn pool_growth(backend: &SharedBackend, g: usize, n: usize) -> f64 {
    let pool = new_pool(backend, ScratchKind::Vmm);
    let start = Instant::now();
    let blocks: Vec<_> = (0..n).map(|_| pool.alloc(g).unwrap()).collect();
    let us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    assert_eq!(
        pool.stats().misses,
        n as u64,
        "every allocation grew the pool"
    );
    for (p, s) in blocks {
        pool.free(p, s).unwrap();
    }
    us
}

fn describe(backend: &SharedBackend) -> String {
    let total = backend.mem_info().map_or(0, |(_, t)| t);
    let mut what = format!(
        "backend {}, device {}, {:.1} GiB",
        backend.name(),
        backend.device(),
        total as f64 / (1u64 << 30) as f64
    );
    if backend.name() == "cuda" {
        let mut name = [0 as std::ffi::c_char; 128];
        // SAFETY: the backend initialised the driver; `name` is writable for its whole length.
        let rc = unsafe {
            cudarc::driver::sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, 0)
        };
        if rc == cudarc::driver::sys::CUresult::CUDA_SUCCESS {
            // SAFETY: the driver wrote a NUL-terminated string into `name`.
            let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
            what.push_str(&format!(", {}", name.to_string_lossy()));
        }
    }
    what
}

fn main() {
    let iters: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000);
    let backend = runtime::backend(0).expect("a backend for device 0");
    println!("# hbmalloc scratch pools: {}\n", describe(&backend));
    let legacy = new_pool(&backend, ScratchKind::Legacy);
    let vmm = new_pool(&backend, ScratchKind::Vmm);

    println!("| case | legacy ns/op | vmm ns/op |");
    println!("|---|---:|---:|");
    for size in [4096, MIB, 64 * MIB] {
        let (l, v) = (pair(&legacy, size, iters), pair(&vmm, size, iters));
        println!("| pair {} KiB | {l:.0} | {v:.0} |", size / 1024);
    }
    let n = iters / 10;
    let (l, v) = (scratch(&legacy, n, [2, 1, 0]), scratch(&vmm, n, [2, 1, 0]));
    println!("| scratch nested, reverse frees | {l:.0} | {v:.0} |");
    let (l, v) = (scratch(&legacy, n, [0, 2, 1]), scratch(&vmm, n, [0, 2, 1]));
    println!("| scratch nested, any-order frees | {l:.0} | {v:.0} |");
    for (name, pool) in [("legacy", &legacy), ("vmm", &vmm)] {
        let s = pool.stats();
        println!(
            "\n{name}: {} allocs, {} hits, {} misses, peak committed {:.1} MiB",
            s.allocs,
            s.hits,
            s.misses,
            s.peak_committed as f64 / MIB as f64
        );
    }

    let Some(g) = backend.vmm_granularity() else {
        println!("\nno VMM on this device: no growth figures");
        return;
    };
    println!("\n| VMM growth (granularity {} KiB) | us |", g / 1024);
    println!("|---|---:|");
    for granules in [1, 16] {
        let (map, unmap) = map_cost(&backend, granules * g, 64);
        println!("| vmm_map of {granules} granule(s) | {map:.1} |");
        println!("| vmm_unmap of {granules} granule(s) | {unmap:.1} |");
    }
    let grow = pool_growth(&backend, g, 64);
    println!("| pool alloc committing 1 granule | {grow:.1} |");
}
