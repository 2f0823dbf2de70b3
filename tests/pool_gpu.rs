//! The scratch pools (`hbm_pool_*` underneath) on a real GPU, through `CudaBackend::new(0)`.
//!
//! Every test needs a CUDA GPU and is ignored by default; `scripts/gpu-check.sh` runs them with
//! `cargo test --release -- --ignored`. They take one lock, so `mem_info` figures do not move
//! under another test of this binary.

use hbmalloc::backend::cuda::CudaBackend;
use hbmalloc::backend::{DevicePtr, SharedBackend};
use hbmalloc::pool::{ScratchKind, ScratchOptions, ScratchPool};
use std::sync::{Arc, Mutex, MutexGuard};

const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;
/// What `mem_info` may drift by between two readings for reasons of its own.
const SLACK: usize = 64 << 20;

static GPU: Mutex<()> = Mutex::new(());

fn gpu() -> (MutexGuard<'static, ()>, SharedBackend) {
    let lock = GPU.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        CudaBackend::available(),
        "this test needs a CUDA driver and a device"
    );
    let backend: SharedBackend = Arc::new(CudaBackend::new(0).expect("a backend for device 0"));
    (lock, backend)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes a pattern over the whole block and reads it back.
fn round_trip(cuda: &SharedBackend, ptr: DevicePtr, len: usize, seed: u8) {
    let data = pattern(len, seed);
    cuda.copy_from_host(ptr, &data).unwrap();
    let mut back = vec![0; len];
    cuda.copy_to_host(&mut back, ptr).unwrap();
    assert!(
        back == data,
        "block {ptr:#x}+{len} does not hold what was written"
    );
}

fn free_now(cuda: &SharedBackend) -> usize {
    cuda.mem_info().unwrap().0
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_legacy_pool_reuses_best_fit_and_trim_returns_memory() {
    let (_lock, cuda) = gpu();
    let pool =
        ScratchPool::new(cuda.clone(), ScratchKind::Legacy, ScratchOptions::default()).unwrap();
    let free0 = free_now(&cuda);
    let big = pool.alloc(GIB).unwrap();
    let small = pool.alloc(3 * MIB).unwrap();
    assert!(big.0 % 256 == 0 && big.1 >= GIB);
    round_trip(&cuda, small.0, small.1, 1);
    pool.free(big.0, big.1).unwrap();
    pool.free(small.0, small.1).unwrap();
    assert_eq!(
        pool.alloc(2 * MIB).unwrap(),
        small,
        "best fit: the 3 MiB buffer"
    );
    pool.free(small.0, small.1).unwrap();
    let cached = free_now(&cuda);
    assert!(
        cached + GIB <= free0 + SLACK,
        "cached buffers still hold memory"
    );
    let released = pool.trim().unwrap();
    assert_eq!(released as u64, pool.stats().released_bytes);
    let free1 = free_now(&cuda);
    assert!(
        free1 >= cached + GIB - SLACK,
        "trim gave 1 GiB back: {cached} -> {free1}"
    );
    assert_eq!(pool.stats().committed, 0);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_vmm_pool_commits_on_demand_frees_out_of_order_and_trims() {
    let (_lock, cuda) = gpu();
    let g = cuda.vmm_granularity().expect("this GPU supports VMM");
    let options = ScratchOptions {
        reserve_size: 8 * GIB,
        ..ScratchOptions::default()
    };
    let pool = ScratchPool::new(cuda.clone(), ScratchKind::Vmm, options).unwrap();
    assert_eq!(pool.kind(), ScratchKind::Vmm);
    let ScratchPool::Vmm(vmm) = &pool else {
        unreachable!()
    };
    assert_eq!(vmm.granularity(), g, "the driver's granularity");
    let free0 = free_now(&cuda);

    // Each block past the committed top adds one mapping; `c` and `d` straddle mappings.
    let a = pool.alloc(g / 2).unwrap();
    let b = pool.alloc(g).unwrap();
    let c = pool.alloc(3 * g + 4096).unwrap();
    let d = pool.alloc(GIB).unwrap();
    assert!(vmm.mapping_count() >= 3);
    for (i, &(p, n)) in [a, b, c].iter().enumerate() {
        round_trip(&cuda, p, n, i as u8);
    }
    round_trip(&cuda, d.0 + GIB - 8 * MIB, 8 * MIB, 9);
    // Out of order: ggml's VMM pool would abort here.
    pool.free(b.0, b.1).unwrap();
    pool.free(a.0, a.1).unwrap();
    pool.free(c.0, c.1).unwrap();
    let merged = pool.alloc(a.1 + b.1 + c.1).unwrap();
    assert_eq!(merged.0, a.0, "a, b and c coalesced");
    round_trip(&cuda, merged.0, merged.1, 7);
    pool.free(merged.0, merged.1).unwrap();
    vmm.check();
    assert_eq!(pool.trim().unwrap(), 0, "the top block `d` is in use");

    pool.free(d.0, d.1).unwrap();
    let committed = pool.stats().committed as usize;
    let before = free_now(&cuda);
    assert!(before + committed <= free0 + SLACK);
    assert_eq!(pool.trim().unwrap(), committed);
    let after = free_now(&cuda);
    assert!(
        after + SLACK >= before + committed,
        "trim unmapped: {before} -> {after}"
    );
    assert_eq!(vmm.mapping_count(), 0);
    vmm.check();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_vmm_pool_release_threshold_unmaps_after_use() {
    let (_lock, cuda) = gpu();
    let options = ScratchOptions {
        reserve_size: 4 * GIB,
        release_threshold: 64 * MIB,
        ..ScratchOptions::default()
    };
    let pool = ScratchPool::new(cuda.clone(), ScratchKind::Vmm, options).unwrap();
    let keep = pool.alloc(16 * MIB).unwrap();
    let free0 = free_now(&cuda);
    for round in 0..3u8 {
        let big = pool.alloc(GIB).unwrap();
        round_trip(&cuda, big.0, 4 * MIB, round);
        pool.free(big.0, big.1).unwrap();
        assert!(pool.stats().committed as usize <= 64 * MIB, "round {round}");
        assert!(
            free_now(&cuda) + SLACK >= free0,
            "round {round}: memory came back"
        );
    }
    round_trip(&cuda, keep.0, keep.1, 3);
    assert_eq!(pool.stats().trims, 3);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_pools_serve_16_threads() {
    let (_lock, cuda) = gpu();
    for kind in [ScratchKind::Legacy, ScratchKind::Vmm] {
        let options = ScratchOptions {
            reserve_size: 8 * GIB,
            ..ScratchOptions::default()
        };
        let pool = Arc::new(ScratchPool::new(cuda.clone(), kind, options).unwrap());
        let threads: Vec<_> = (0..16u8)
            .map(|t| {
                let (pool, cuda) = (pool.clone(), cuda.clone());
                std::thread::spawn(move || {
                    let mut seed = 0x2545_f491u32.wrapping_mul(t as u32 + 1);
                    let mut held = Vec::new();
                    for i in 0..200u32 {
                        seed ^= seed << 13;
                        seed ^= seed >> 17;
                        seed ^= seed << 5;
                        let size = 256 + seed as usize % (4 * MIB);
                        let (p, n) = pool.alloc(size).unwrap();
                        let tag = t.wrapping_mul(37).wrapping_add(i as u8);
                        cuda.copy_from_host(p, &pattern(4096.min(size), tag))
                            .unwrap();
                        held.push((p, n, size, tag));
                        if held.len() > 4 || seed % 2 == 0 {
                            let (p, n, size, tag) = held.swap_remove(seed as usize % held.len());
                            let mut back = vec![0; 4096.min(size)];
                            cuda.copy_to_host(&mut back, p).unwrap();
                            assert!(back == pattern(back.len(), tag), "{p:#x} overwritten");
                            pool.free(p, n).unwrap();
                        }
                    }
                    for (p, n, _, _) in held {
                        pool.free(p, n).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = pool.stats();
        assert_eq!((s.allocs, s.frees, s.live), (3200, 3200, 0), "{kind:?}");
        pool.trim().unwrap();
        assert_eq!(pool.stats().committed, 0, "{kind:?}");
    }
}
