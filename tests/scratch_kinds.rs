//! What is particular to each scratch pool kind, and the VMM pool's fallbacks, on the simulated
//! device held to CUDA's unmap rule (`common::Strict`).

mod common;

use common::Strict;
use hbmalloc::backend::{Backend, SharedBackend};
use hbmalloc::error::Error;
use hbmalloc::pool::vmm::VmmPool;
use hbmalloc::pool::{ScratchKind, ScratchOptions, ScratchPool};
use std::sync::Arc;

const MIB: usize = 1 << 20;

fn legacy(sim: &Arc<Strict>, options: ScratchOptions) -> ScratchPool {
    let shared: SharedBackend = sim.clone();
    ScratchPool::new(shared, ScratchKind::Legacy, options).unwrap()
}

fn vmm(sim: &Arc<Strict>, reserve_size: usize) -> VmmPool {
    let shared: SharedBackend = sim.clone();
    let options = ScratchOptions {
        reserve_size,
        ..ScratchOptions::default()
    };
    VmmPool::new(shared, options.resolved().unwrap()).unwrap()
}

#[test]
fn legacy_sizes_new_buffers_as_ggml_does() {
    let sim = Strict::new(1 << 30);
    let pool = legacy(&sim, ScratchOptions::default());
    // ggml: (size_t)(1.05 * size) rounded up to 256.
    assert_eq!(pool.alloc(1000).unwrap().1, 1280);
    assert_eq!(pool.alloc(MIB).unwrap().1, 1_101_056);
    let exact = legacy(
        &sim,
        ScratchOptions {
            overallocation_percent: 0,
            ..Default::default()
        },
    );
    assert_eq!(exact.alloc(1000).unwrap().1, 1024);
    let wide = legacy(
        &sim,
        ScratchOptions {
            alignment: 4096,
            ..Default::default()
        },
    );
    let (p, actual) = wide.alloc(1000).unwrap();
    assert!(p % 4096 == 0 && actual >= 1050, "{p:#x} {actual}");
    wide.free(p, actual).unwrap();
}

#[test]
fn legacy_best_fit_takes_the_smallest_buffer_that_fits() {
    let sim = Strict::new(1 << 30);
    let pool = legacy(&sim, ScratchOptions::default());
    let bufs: Vec<_> = [4 * MIB, MIB, 2 * MIB]
        .iter()
        .map(|&n| pool.alloc(n).unwrap())
        .collect();
    for &(p, actual) in &bufs {
        pool.free(p, actual).unwrap();
    }
    assert_eq!(
        pool.alloc(1536 * 1024).unwrap(),
        bufs[2],
        "1.5 MiB takes the 2 MiB buffer"
    );
    assert_eq!(pool.alloc(900 * 1024).unwrap(), bufs[1]);
    assert_eq!(pool.alloc(3 * MIB).unwrap(), bufs[0]);
    let s = pool.stats();
    assert_eq!((s.hits, s.misses), (3, 3));
    pool.alloc(100).unwrap();
    assert_eq!(pool.stats().misses, 4, "nothing left in the cache");
}

#[test]
fn legacy_reuse_limit_refuses_much_larger_buffers() {
    let sim = Strict::new(1 << 30);
    let pool = legacy(
        &sim,
        ScratchOptions {
            reuse_limit_percent: 50,
            ..Default::default()
        },
    );
    let big = pool.alloc(4 * MIB).unwrap();
    pool.free(big.0, big.1).unwrap();
    let small = pool.alloc(MIB).unwrap();
    assert_ne!(small.0, big.0, "4.2 MiB is more than 1.5 x 1 MiB");
    assert_eq!(pool.alloc(3 * MIB).unwrap(), big, "within 50%");
}

#[test]
fn legacy_full_cache_gives_the_freed_buffer_back() {
    let sim = Strict::new(1 << 30);
    let pool = legacy(
        &sim,
        ScratchOptions {
            max_cached_buffers: 2,
            ..Default::default()
        },
    );
    let bufs: Vec<_> = (0..3).map(|_| pool.alloc(MIB).unwrap()).collect();
    let used = sim.used();
    let syncs = sim.sync_count();
    for &(p, actual) in &bufs {
        pool.free(p, actual).unwrap();
    }
    let ScratchPool::Legacy(l) = &pool else {
        unreachable!()
    };
    assert_eq!(l.cached_count(), 2);
    assert_eq!(sim.used(), used / 3 * 2, "the third went back");
    assert_eq!(sim.sync_count(), syncs + 1, "after a synchronize");
    assert_eq!(pool.stats().trims, 1);
}

#[test]
fn legacy_out_of_memory_flushes_the_cache_and_retries_once() {
    let sim = Strict::new(12 * MIB);
    let pool = legacy(&sim, ScratchOptions::default());
    let a = pool.alloc(6 * MIB).unwrap();
    pool.free(a.0, a.1).unwrap();
    let b = pool.alloc(7 * MIB).unwrap();
    assert_eq!(sim.used(), b.1, "the cached 6 MiB went back to make room");
    assert!(matches!(
        pool.alloc(20 * MIB),
        Err(Error::OutOfMemory { .. })
    ));
    let s = pool.stats();
    assert_eq!((s.live, s.misses, s.trims), (1, 2, 1));
    assert_eq!(s.committed as usize, sim.used());
}

#[test]
fn vmm_commits_granules_on_demand_at_the_top() {
    let sim = Strict::new(1 << 30);
    let pool = vmm(&sim, 64 * MIB);
    assert_eq!(pool.granularity(), 2 * MIB);
    assert_eq!(sim.used(), 0, "reserving costs nothing");
    let a = pool.alloc(100 * 1024).unwrap();
    assert_eq!((sim.used(), pool.mapping_count()), (2 * MIB, 1));
    let b = pool.alloc(100 * 1024).unwrap();
    assert_eq!(b.0, a.0 + a.1, "packed behind the first");
    assert_eq!(pool.mapping_count(), 1, "served from committed memory");
    pool.alloc(3 * MIB).unwrap();
    assert_eq!((sim.used(), pool.mapping_count()), (4 * MIB, 2));
    let s = pool.stats();
    assert_eq!(
        (s.hits, s.misses, s.committed, s.reserved),
        (1, 2, 4 * MIB as u64, 64 * MIB as u64)
    );
    pool.check();
}

#[test]
fn vmm_frees_in_any_order_coalesce() {
    let sim = Strict::new(1 << 30);
    let pool = vmm(&sim, 64 * MIB);
    let blocks: Vec<_> = (0..4).map(|_| pool.alloc(MIB).unwrap()).collect();
    // ggml's VMM pool asserts on anything but 3, 2, 1, 0.
    for i in [1, 3, 0, 2] {
        pool.free(blocks[i].0, blocks[i].1).unwrap();
        pool.check();
    }
    let misses = pool.stats().misses;
    let whole = pool.alloc(4 * MIB).unwrap();
    assert_eq!(whole.0, blocks[0].0, "the four blocks merged into one");
    assert_eq!(pool.stats().misses, misses, "no new memory needed");
}

#[test]
fn vmm_best_fit_prefers_holes_to_the_tail() {
    let sim = Strict::new(1 << 30);
    let pool = vmm(&sim, 64 * MIB);
    let sizes = [MIB, 256 * 1024, MIB, 512 * 1024, 64 * 1024];
    let b: Vec<_> = sizes.iter().map(|&n| pool.alloc(n).unwrap()).collect();
    pool.free(b[1].0, b[1].1).unwrap();
    pool.free(b[3].0, b[3].1).unwrap();
    assert_eq!(
        pool.alloc(200 * 1024).unwrap().0,
        b[1].0,
        "the 256 KiB hole"
    );
    assert_eq!(
        pool.alloc(300 * 1024).unwrap().0,
        b[3].0,
        "the 512 KiB hole"
    );
    pool.check();
}

#[test]
fn vmm_trim_unmaps_whole_free_mappings_at_the_top_only() {
    let sim = Strict::new(1 << 30);
    let pool = vmm(&sim, 64 * MIB);
    let x = pool.alloc(MIB).unwrap(); // mapping [0, 2 MiB)
    let y = pool.alloc(4 * MIB).unwrap(); // mapping [2, 6 MiB)
    let z = pool.alloc(10 * MIB).unwrap(); // mapping [6, 16 MiB)
    assert_eq!((sim.used(), pool.mapping_count()), (16 * MIB, 3));
    pool.free(y.0, y.1).unwrap();
    assert_eq!(pool.trim().unwrap(), 0, "the top block is in use");
    pool.free(z.0, z.1).unwrap();
    let syncs = sim.sync_count();
    assert_eq!(pool.trim().unwrap(), 14 * MIB, "everything above x");
    assert_eq!(sim.sync_count(), syncs + 1, "synchronized before unmapping");
    assert_eq!((sim.used(), pool.mapping_count()), (2 * MIB, 1));
    pool.check();
    let again = pool.alloc(5 * MIB).unwrap();
    assert_eq!(again.0, y.0, "the address space is reused");
    pool.free(again.0, again.1).unwrap();
    pool.free(x.0, x.1).unwrap();
    pool.trim().unwrap();
    assert_eq!(sim.used(), 0);
    assert_eq!(sim.violations(), 0);
    pool.check();
}

#[test]
fn vmm_out_of_memory_leaves_the_pool_intact() {
    let sim = Strict::new(8 * MIB);
    let hog = sim.alloc(4 * MIB).unwrap();
    let pool = vmm(&sim, 0);
    assert_eq!(
        pool.reserve_size(),
        8 * MIB,
        "capped at the device's memory"
    );
    let a = pool.alloc(MIB).unwrap();
    assert!(matches!(
        pool.alloc(5 * MIB),
        Err(Error::OutOfMemory { .. })
    ));
    pool.check();
    let s = pool.stats();
    assert_eq!((s.allocs, s.live, s.committed), (1, 1, 2 * MIB as u64));
    sim.free(hog, 4 * MIB).unwrap();
    let b = pool.alloc(5 * MIB).unwrap();
    assert_eq!(
        b.0,
        a.0 + a.1,
        "the failed block was given back to the arena"
    );
    assert!(
        matches!(pool.alloc(4 * MIB), Err(Error::OutOfMemory { .. })),
        "the reservation is full"
    );
}

#[test]
fn vmm_alignment_is_honoured_up_to_the_granularity() {
    let sim = Strict::new(1 << 30);
    let shared: SharedBackend = sim.clone();
    let options = ScratchOptions {
        alignment: 64 * 1024,
        reserve_size: 64 * MIB,
        ..Default::default()
    };
    let pool = ScratchPool::new(shared.clone(), ScratchKind::Vmm, options).unwrap();
    for n in [1, 1000, 70_000] {
        let (p, actual) = pool.alloc(n).unwrap();
        assert!(
            p % (64 * 1024) == 0 && actual % (64 * 1024) == 0,
            "{n}: {p:#x} {actual}"
        );
    }
    let too_wide = ScratchOptions {
        alignment: 4 * MIB,
        ..options
    };
    assert!(matches!(
        ScratchPool::new(shared.clone(), ScratchKind::Vmm, too_wide),
        Err(Error::InvalidValue(_))
    ));
    let odd = ScratchOptions {
        alignment: 384,
        ..options
    };
    assert!(matches!(
        ScratchPool::new(shared, ScratchKind::Legacy, odd),
        Err(Error::InvalidValue(_))
    ));
}

#[test]
fn vmm_falls_back_to_legacy_without_vmm_or_a_reservation() {
    for (no_vmm, refuse_reserve) in [(true, false), (false, true)] {
        let sim = Strict::with(1 << 30, no_vmm, refuse_reserve);
        let shared: SharedBackend = sim.clone();
        let pool = ScratchPool::new(shared, ScratchKind::Vmm, ScratchOptions::default())
            .expect("a fallback, never an error");
        assert_eq!(pool.kind(), ScratchKind::Legacy);
        let (p, actual) = pool.alloc(1000).unwrap();
        assert_eq!(actual, 1280, "legacy sizing");
        pool.free(p, actual).unwrap();
        assert_eq!(pool.alloc(1000).unwrap().0, p);
    }
}

#[test]
fn vmm_recently_freed_blocks_are_reused_then_coalesced_before_growth() {
    let sim = Strict::new(1 << 30);
    let pool = vmm(&sim, 256 * MIB);
    let kib = 1024;
    let blocks: Vec<_> = (0..20)
        .map(|i| pool.alloc(64 * kib * (1 + i % 3)).unwrap())
        .collect();
    for &(p, n) in blocks.iter().rev() {
        pool.free(p, n).unwrap();
        pool.check();
    }
    assert_eq!(
        pool.alloc(blocks[0].1).unwrap(),
        blocks[0],
        "the last freed, same size"
    );
    assert!(
        pool.free(blocks[3].0, blocks[3].1).is_err(),
        "a listed block is already free"
    );
    let committed = pool.stats().committed;
    // No single free block holds 19 blocks' worth: merging them does, without growing.
    let big = pool.alloc(blocks[1..].iter().map(|b| b.1).sum()).unwrap();
    assert_eq!(big.0, blocks[1].0);
    assert_eq!(pool.stats().committed, committed);
    pool.check();
}
