//! `Limited` on its own over the simulated device, then `limit:` through the C entry points in
//! child processes (the configuration is read once per process).

use super::*;
use crate::backend::sim::SimBackend;
use crate::pool::{CachingPool, PoolSettings};
use std::sync::Arc;

const MIB: usize = 1 << 20;

fn limited(device: usize, limit: usize) -> Arc<Limited> {
    Arc::new(Limited::new(Arc::new(SimBackend::new(0, device)), limit))
}

fn is_oom<T: std::fmt::Debug>(r: Result<T>) -> bool {
    matches!(r, Err(Error::OutOfMemory { .. }))
}

#[test]
fn allocations_and_commits_share_one_cap() {
    let l = limited(1 << 30, 64 * MIB);
    let a = l.alloc(40 * MIB).unwrap();
    let gran = l.vmm_granularity().unwrap();
    // Address space is not memory: a reservation far past the limit is fine.
    let base = l.vmm_reserve(256 * MIB).unwrap();
    l.vmm_map(base, 16 * MIB).unwrap();
    assert_eq!(l.held(), 56 * MIB);
    assert!(is_oom(l.vmm_map(base + 16 * MIB, 16 * MIB)), "56 + 16 > 64");
    assert!(is_oom(l.alloc(8 * MIB + 1)), "56 + 8 MiB + 1 > 64");
    assert_eq!(l.held(), 56 * MIB, "refusals charge nothing");
    let b = l.alloc(8 * MIB).unwrap();
    assert_eq!(l.held(), 64 * MIB, "exactly the limit is allowed");
    assert!(is_oom(l.alloc(gran)));

    l.vmm_unmap(base, 16 * MIB).unwrap();
    l.free(a, 40 * MIB).unwrap();
    assert_eq!(l.held(), 8 * MIB, "what is given back counts no more");
    l.vmm_map(base, 32 * MIB).unwrap();
    let c = l.alloc(24 * MIB).unwrap();
    assert_eq!(l.held(), 64 * MIB);
    for (p, n) in [(b, 8 * MIB), (c, 24 * MIB)] {
        l.free(p, n).unwrap();
    }
    l.vmm_unmap(base, 32 * MIB).unwrap();
    l.vmm_release(base, 256 * MIB).unwrap();
    assert_eq!(l.held(), 0);
}

#[test]
fn a_refusal_by_the_device_charges_nothing() {
    // A 32 MiB device under a 1 GiB limit: the device is what runs out.
    let l = limited(32 * MIB, 1 << 30);
    assert!(is_oom(l.alloc(48 * MIB)));
    assert_eq!(l.held(), 0);
    let base = l.vmm_reserve(64 * MIB).unwrap();
    assert!(is_oom(l.vmm_map(base, 64 * MIB)));
    assert_eq!(l.held(), 0);
    // A pointer the device never gave out: refused below, the count untouched.
    let p = l.alloc(16 * MIB).unwrap();
    assert!(l.free(p + 4096, 16 * MIB).is_err());
    assert_eq!(l.held(), 16 * MIB);
    l.free(p, 16 * MIB).unwrap();
    l.vmm_release(base, 64 * MIB).unwrap();
}

#[test]
fn mem_info_reports_the_limit_as_total() {
    let l = limited(1 << 30, 64 * MIB);
    assert_eq!(l.mem_info().unwrap(), (64 * MIB, 64 * MIB));
    let p = l.alloc(24 * MIB).unwrap();
    assert_eq!(l.mem_info().unwrap(), (40 * MIB, 64 * MIB));
    l.free(p, 24 * MIB).unwrap();

    // Free is never more than the device has: here the device is the smaller.
    let l = limited(32 * MIB, 1 << 30);
    let p = l.alloc(8 * MIB).unwrap();
    assert_eq!(l.mem_info().unwrap(), (24 * MIB, 32 * MIB));
    l.free(p, 8 * MIB).unwrap();

    // Another consumer of the device (another process) leaves less free than the limit would.
    let sim: SharedBackend = Arc::new(SimBackend::new(0, 128 * MIB));
    let other = sim.alloc(100 * MIB).unwrap();
    let l = Limited::new(sim.clone(), 64 * MIB);
    assert_eq!(l.mem_info().unwrap(), (28 * MIB, 64 * MIB));
    sim.free(other, 100 * MIB).unwrap();
}

#[test]
fn racing_threads_never_pass_the_limit_together() {
    let l = limited(1 << 30, 64 * MIB);
    let got: Vec<Vec<DevicePtr>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let l = &l;
                s.spawn(move || (0..16).filter_map(|_| l.alloc(MIB).ok()).collect())
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let n: usize = got.iter().map(Vec::len).sum();
    assert_eq!(
        n, 64,
        "exactly the limit's worth, however the threads interleave"
    );
    assert_eq!(l.held(), 64 * MIB);
    for p in got.into_iter().flatten() {
        l.free(p, MIB).unwrap();
    }
    assert_eq!(l.held(), 0);
}

/// The caching pool over the limit: what `cudaFree` cached is given back before a refusal
/// stands, and an allocation that cannot fit even then fails as out of memory.
#[test]
fn the_caching_pool_releases_its_cache_before_failing() {
    let l = limited(1 << 30, 64 * MIB);
    let pool = CachingPool::new(
        l.clone(),
        PoolSettings::from_config(&crate::config::Config::default()),
    );
    let (p, block) = pool.alloc_unchecked(40 * MIB).unwrap();
    pool.free_unchecked(p, block);
    assert!(l.held() >= 40 * MIB, "cached, still held from the device");
    let (q, block) = pool
        .alloc_unchecked(50 * MIB)
        .expect("the cached 40 MiB are released to make room");
    assert!(is_oom(pool.alloc_unchecked(20 * MIB)), "50 + 20 > 64");
    assert!(l.held() <= 64 * MIB);
    pool.free_unchecked(q, block);
    pool.trim().unwrap();
    assert_eq!(l.held(), 0);
}

// ---- `limit:` through the C entry points, each in a child process with its own configuration.

/// Lines of `stderr` that say the limit was reached.
fn limit_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("memory limit reached"))
        .collect()
}

fn mem_get_info() -> (usize, usize) {
    let (mut free, mut total) = (0, 0);
    // SAFETY: two local out-parameters.
    assert_eq!(
        unsafe { crate::ffi::cuda_api::cudaMemGetInfo(&mut free, &mut total) },
        0
    );
    (free, total)
}

/// cudaMalloc of `n` bytes: (return code, pointer).
fn cuda_malloc(n: usize) -> (i32, *mut std::ffi::c_void) {
    let mut p = std::ptr::null_mut();
    // SAFETY: a local out-parameter.
    let rc = unsafe { crate::ffi::cuda_api::cudaMalloc(&mut p, n) };
    (rc as i32, p)
}

fn cuda_free(p: *mut std::ffi::c_void) {
    // SAFETY: `p` came from cudaMalloc and is freed once.
    assert_eq!(unsafe { crate::ffi::cuda_api::cudaFree(p) }, 0);
}

/// A legacy scratch pool on device 0.
fn scratch_pool() -> *mut crate::ffi::pool_api::HbmPool {
    use crate::ffi::pool_api::*;
    use crate::ffi::status::HbmStatus;
    let mut opts = std::mem::MaybeUninit::uninit();
    let mut pool = std::ptr::null_mut();
    // SAFETY: local out-parameters, initialized by the calls before use.
    unsafe {
        assert_eq!(hbm_pool_options_default(opts.as_mut_ptr()), HbmStatus::Ok);
        let opts = opts.assume_init();
        assert_eq!(
            hbm_pool_create(0, HbmPoolKind::Legacy as i32, &opts, &mut pool),
            HbmStatus::Ok
        );
    }
    pool
}

fn pool_alloc(
    pool: *mut crate::ffi::pool_api::HbmPool,
    n: usize,
) -> (crate::ffi::status::HbmStatus, *mut std::ffi::c_void, usize) {
    let (mut p, mut actual) = (std::ptr::null_mut(), 0);
    // SAFETY: a live pool and local out-parameters.
    let st = unsafe { crate::ffi::pool_api::hbm_pool_alloc(pool, n, &mut p, &mut actual) };
    (st, p, actual)
}

/// The limit over the caching pool, a scratch pool and a VMM KV cache together: each gets
/// memory, the sum stays within the limit, `cudaMalloc` past it returns 2, and the line saying
/// so is printed once however many calls fail.
#[test]
fn one_limit_over_every_pool() {
    if crate::test_child::is_child() {
        return one_limit_over_every_pool_child();
    }
    let (stdout, stderr) = crate::test_child::run_output(
        "backend::limit::tests::one_limit_over_every_pool",
        Some("backend:sim,sim_capacity:1GiB,limit:128MiB,leak_report:off,backtrace:off"),
    );
    assert!(stdout.contains("child checks passed"), "{stdout}{stderr}");
    let lines = limit_lines(&stderr);
    assert_eq!(lines.len(), 1, "once, not per failing call: {stderr}");
    assert!(
        lines[0].contains("device 0") && lines[0].contains("limit 128.0 MiB"),
        "says which device and what the limit is: {}",
        lines[0]
    );
    assert!(
        lines[0].contains("held "),
        "says what is held: {}",
        lines[0]
    );
}

fn one_limit_over_every_pool_child() {
    use crate::ffi::kv_cache_api::*;
    use crate::ffi::status::HbmStatus;
    use crate::kv::HbmType;
    assert_eq!(
        mem_get_info().1,
        128 * MIB,
        "the limit is the device's total"
    );

    let (rc, big) = cuda_malloc(32 * MIB);
    assert_eq!(rc, 0);
    let pool = scratch_pool();
    let (st, scratch, scratch_n) = pool_alloc(pool, 32 * MIB);
    assert_eq!(st, HbmStatus::Ok);
    // 8 KiB a token (2 layers, K and V, 1024 F16 elements): a reservation of 4 sequences of
    // 16384 tokens (512 MiB, far past the limit) holds nothing until tokens are committed.
    let params = HbmKvParams {
        n_layer: 2,
        n_head_kv: 8,
        head_dim: 128,
        n_ctx_max: 16384,
        n_seq_max: 4,
        type_k: HbmType::F16 as i32,
        type_v: HbmType::F16 as i32,
        device: 0,
        growth: HbmKvGrowth::Vmm,
    };
    let mut kv = std::ptr::null_mut();
    let mut kv_stats = std::mem::MaybeUninit::<HbmKvStats>::uninit();
    // SAFETY: local parameters and out-parameters; `kv` is live until destroyed below.
    let committed = unsafe {
        assert_eq!(hbm_kv_cache_create(&params, &mut kv), HbmStatus::Ok);
        assert_eq!(hbm_kv_cache_reserve(kv, 0, 2048), HbmStatus::Ok);
        assert_eq!(hbm_kv_cache_stats(kv, kv_stats.as_mut_ptr()), HbmStatus::Ok);
        let s = kv_stats.assume_init();
        assert_eq!(s.growth, HbmKvGrowth::Vmm);
        assert!(s.reserved > 128 * MIB as u64, "reserved {}", s.reserved);
        s.committed as usize
    };
    assert!(committed >= 16 * MIB, "2048 tokens committed: {committed}");

    // Fill what is left with 4 MiB cudaMallocs until one is refused.
    let mut held = vec![];
    let refused = loop {
        match cuda_malloc(4 * MIB) {
            (0, p) => held.push(p),
            (rc, _) => break rc,
        }
        assert!(held.len() < 64, "the limit never stopped cudaMalloc");
    };
    assert_eq!(refused, 2, "cudaErrorMemoryAllocation");
    assert_eq!(crate::ffi::cuda_api::cudaGetLastError(), 2);
    let sum = 32 * MIB + scratch_n + committed + 4 * MIB * held.len();
    assert!(sum <= 128 * MIB, "the sum {sum} stays within the limit");
    assert!(sum > 128 * MIB - 8 * MIB, "and reaches about it: {sum}");
    let (free, total) = mem_get_info();
    assert_eq!(total, 128 * MIB);
    assert!(free < 4 * MIB, "free {free} is what the limit leaves");

    // Every consumer is refused now, each with its own out-of-memory code, and the device
    // itself (1 GiB) has plenty.
    assert_eq!(cuda_malloc(4 * MIB).0, 2);
    assert_eq!(pool_alloc(pool, 8 * MIB).0, HbmStatus::OutOfMemory);
    // SAFETY: `kv` is live.
    assert_eq!(
        unsafe { hbm_kv_cache_reserve(kv, 1, 2048) },
        HbmStatus::OutOfMemory
    );

    // What is given back is available again.
    for p in held {
        cuda_free(p);
    }
    // SAFETY: `scratch` came from `pool` with `scratch_n` bytes; both handles are live.
    unsafe {
        assert_eq!(
            crate::ffi::pool_api::hbm_pool_free(pool, scratch, scratch_n),
            HbmStatus::Ok
        );
        assert_eq!(hbm_kv_cache_reserve(kv, 1, 2048), HbmStatus::Ok);
        hbm_kv_cache_destroy(kv);
        crate::ffi::pool_api::hbm_pool_destroy(pool);
    }
    cuda_free(big);
    let (rc, p) = cuda_malloc(96 * MIB);
    assert_eq!(rc, 0, "96 MiB fit again once everything is freed");
    cuda_free(p);
    println!("child checks passed");
}

/// Memory `cudaFree` cached is handed to the other consumers before the limit refuses them,
/// and memory they free comes back to `cudaMalloc`: nothing fails, so nothing is printed.
#[test]
fn cached_memory_moves_between_consumers_under_the_limit() {
    if crate::test_child::is_child() {
        return cached_memory_moves_child();
    }
    let (stdout, stderr) = crate::test_child::run_output(
        "backend::limit::tests::cached_memory_moves_between_consumers_under_the_limit",
        Some("backend:sim,sim_capacity:1GiB,limit:64MiB,leak_report:off,backtrace:off"),
    );
    assert!(stdout.contains("child checks passed"), "{stdout}{stderr}");
    assert!(limit_lines(&stderr).is_empty(), "{stderr}");
}

fn cached_memory_moves_child() {
    use crate::ffi::status::HbmStatus;
    assert_eq!(mem_get_info().1, 64 * MIB, "the limit is in force");
    for _ in 0..3 {
        let (rc, p) = cuda_malloc(40 * MIB);
        assert_eq!(rc, 0);
        cuda_free(p);
        // 40 MiB cached by the caching pool; 40 more would pass the limit unless it gives
        // them back.
        let pool = scratch_pool();
        let (st, q, n) = pool_alloc(pool, 40 * MIB);
        assert_eq!(st, HbmStatus::Ok, "the cached 40 MiB are released first");
        // SAFETY: `q` came from `pool` with `n` bytes; the pool is live, then destroyed.
        unsafe {
            assert_eq!(
                crate::ffi::pool_api::hbm_pool_free(pool, q, n),
                HbmStatus::Ok
            );
            crate::ffi::pool_api::hbm_pool_destroy(pool);
        }
    }
    println!("child checks passed");
}

/// `limit:0.25` of a 256 MiB device is 64 MiB: cudaMemGetInfo says so, and cudaMalloc keeps to it.
#[test]
fn a_fraction_of_the_device() {
    if crate::test_child::is_child() {
        return a_fraction_of_the_device_child();
    }
    let (stdout, stderr) = crate::test_child::run_output(
        "backend::limit::tests::a_fraction_of_the_device",
        Some("backend:sim,sim_capacity:256MiB,limit:0.25,leak_report:off"),
    );
    assert!(stdout.contains("child checks passed"), "{stdout}{stderr}");
    assert_eq!(limit_lines(&stderr).len(), 1, "{stderr}");
}

fn a_fraction_of_the_device_child() {
    assert_eq!(mem_get_info(), (64 * MIB, 64 * MIB));
    let (rc, p) = cuda_malloc(48 * MIB);
    assert_eq!(rc, 0);
    let (free, total) = mem_get_info();
    assert_eq!(total, 64 * MIB);
    assert!(free <= 16 * MIB, "free {free}");
    assert_eq!(cuda_malloc(32 * MIB).0, 2, "48 + 32 MiB > 64 MiB");
    cuda_free(p);
    let (rc, p) = cuda_malloc(60 * MIB);
    assert_eq!(rc, 0, "freed memory is available again");
    cuda_free(p);
    println!("child checks passed");
}

/// A malformed limit is warned about by name and ignored: the device keeps its whole memory,
/// and the other entries still apply.
#[test]
fn a_malformed_limit_is_ignored() {
    if crate::test_child::is_child() {
        return a_malformed_limit_child();
    }
    for bad in ["0", "1.5", "lots"] {
        let conf = format!("backend:sim,limit:{bad},sim_capacity:128MiB,leak_report:off");
        let (stdout, stderr) = crate::test_child::run_output(
            "backend::limit::tests::a_malformed_limit_is_ignored",
            Some(&conf),
        );
        assert!(stdout.contains("child checks passed"), "{stdout}{stderr}");
        let warned = stderr
            .lines()
            .filter(|l| l.contains("key 'limit'") && l.contains(&format!("bad value '{bad}'")))
            .count();
        assert_eq!(warned, 1, "{bad}: {stderr}");
    }
}

fn a_malformed_limit_child() {
    assert_eq!(
        mem_get_info().1,
        128 * MIB,
        "sim_capacity applies, no limit"
    );
    let (rc, p) = cuda_malloc(100 * MIB);
    assert_eq!(rc, 0);
    cuda_free(p);
    println!("child checks passed");
}
