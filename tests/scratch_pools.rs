//! The scratch pools (`hbm_pool_*` underneath) on the simulated device: one conformance suite run
//! over both kinds from a typed list, then what is particular to each kind, then the fallbacks.
//!
//! Every backend here is `common::Strict`, which refuses (and counts) a `vmm_unmap` that would cut
//! a mapping, so the pools are held to what the CUDA driver demands.

mod common;

use common::Strict;
use hbmalloc::backend::{Backend, DevicePtr, SharedBackend};
use hbmalloc::error::Error;
use hbmalloc::pool::{ScratchKind, ScratchOptions, ScratchPool};
use std::sync::Arc;

const MIB: usize = 1 << 20;

/// Every kind the conformance suite runs over; a new kind must be added here by name.
const KINDS: [ScratchKind; 2] = [ScratchKind::Legacy, ScratchKind::Vmm];

fn pool_on(backend: &Arc<Strict>, kind: ScratchKind, options: ScratchOptions) -> ScratchPool {
    let shared: SharedBackend = backend.clone();
    let pool = ScratchPool::new(shared, kind, options).expect("pool");
    assert_eq!(pool.kind(), kind, "no fallback on the simulated device");
    pool
}

fn small_vmm() -> ScratchOptions {
    ScratchOptions {
        reserve_size: 256 * MIB,
        ..ScratchOptions::default()
    }
}

#[test]
fn every_kind_allocates_aligned_usable_memory_and_reuses_it() {
    for kind in KINDS {
        let sim = Strict::new(1 << 30);
        let pool = pool_on(&sim, kind, small_vmm());
        let (p, actual) = pool.alloc(1000).unwrap();
        assert!(actual >= 1000 && p % 256 == 0, "{kind:?}");
        sim.copy_from_host(p, &vec![0xab; actual]).unwrap();
        let mut back = vec![0; actual];
        sim.copy_to_host(&mut back, p).unwrap();
        assert!(
            back.iter().all(|&b| b == 0xab),
            "{kind:?}: memory is usable"
        );
        pool.free(p, actual).unwrap();
        assert_eq!(
            pool.alloc(1000).unwrap(),
            (p, actual),
            "{kind:?}: the block is reused"
        );
        let s = pool.stats();
        assert_eq!(
            (s.allocs, s.frees, s.hits, s.misses),
            (2, 1, 1, 1),
            "{kind:?}"
        );
        assert_eq!(
            (s.in_use, s.peak_in_use, s.live),
            (actual as u64, actual as u64, 1)
        );
        assert_eq!(sim.violations(), 0);
    }
}

#[test]
fn every_kind_rejects_bad_frees_and_frees_nothing() {
    for kind in KINDS {
        let sim = Strict::new(1 << 30);
        let pool = pool_on(&sim, kind, small_vmm());
        let (p, actual) = pool.alloc(4096).unwrap();
        assert!(
            matches!(pool.free(p, actual - 256), Err(Error::InvalidValue(_))),
            "{kind:?}"
        );
        assert!(matches!(
            pool.free(p, actual + 256),
            Err(Error::InvalidValue(_))
        ));
        assert_eq!(
            pool.free(p + 512, 512),
            Err(Error::InteriorPointer {
                ptr: p + 512,
                block: p
            })
        );
        assert_eq!(pool.free(0x1000, 512), Err(Error::UnknownPointer(0x1000)));
        assert_eq!(pool.stats().live, 1, "{kind:?}: nothing was freed");
        pool.free(p, actual).unwrap();
        assert!(pool.free(p, actual).is_err(), "{kind:?}: double free");
        assert_eq!(
            pool.alloc(0),
            Err(Error::InvalidValue("zero-byte pool allocation"))
        );
        assert!(matches!(
            pool.alloc(usize::MAX),
            Err(Error::OutOfMemory { .. })
        ));
    }
}

#[test]
fn every_kind_takes_frees_in_any_order_and_trims_to_nothing() {
    for kind in KINDS {
        let sim = Strict::new(1 << 30);
        let pool = pool_on(&sim, kind, small_vmm());
        let sizes = [300 * 1024, 5 * MIB, 64 * 1024, 3 * MIB + 7, 1 << 20];
        let blocks: Vec<_> = sizes.iter().map(|&n| pool.alloc(n).unwrap()).collect();
        for i in [1, 3, 0, 4, 2] {
            pool.free(blocks[i].0, blocks[i].1).unwrap();
        }
        let s = pool.stats();
        assert_eq!((s.live, s.in_use), (0, 0), "{kind:?}");
        assert!(sim.used() > 0);
        let released = pool.trim().unwrap();
        assert_eq!(released as u64, s.committed, "{kind:?}: all of it");
        assert_eq!(sim.used(), 0, "{kind:?}: the device got it back");
        let s = pool.stats();
        assert_eq!(
            (s.committed, s.trims, s.released_bytes),
            (0, 1, released as u64)
        );
        assert_eq!(pool.trim().unwrap(), 0, "nothing left");
        assert_eq!(sim.violations(), 0, "{kind:?}: whole mappings only");
    }
}

#[test]
fn every_kind_gives_memory_back_above_the_release_threshold() {
    for kind in KINDS {
        let sim = Strict::new(1 << 30);
        let options = ScratchOptions {
            release_threshold: 4 * MIB,
            ..small_vmm()
        };
        let pool = pool_on(&sim, kind, options);
        let a = pool.alloc(3 * MIB).unwrap();
        let b = pool.alloc(8 * MIB).unwrap();
        pool.free(b.0, b.1).unwrap();
        let s = pool.stats();
        assert!(
            s.committed <= 4 * MIB as u64,
            "{kind:?}: {} committed",
            s.committed
        );
        assert_eq!(s.trims, 1, "{kind:?}");
        pool.free(a.0, a.1).unwrap();
        assert!(pool.stats().committed <= 4 * MIB as u64);
        assert_eq!(sim.violations(), 0);
    }
}

#[test]
fn every_kind_serves_16_threads_without_overlap() {
    for kind in KINDS {
        let sim = Strict::new(4 << 30);
        let pool = Arc::new(pool_on(&sim, kind, small_vmm()));
        let threads: Vec<_> = (0..16u8)
            .map(|t| {
                let (pool, sim) = (pool.clone(), sim.clone());
                std::thread::spawn(move || {
                    let mut seed = 0x9e37_79b9u32.wrapping_mul(t as u32 + 1);
                    let mut held: Vec<(DevicePtr, usize, u8)> = Vec::new();
                    for i in 0..400u32 {
                        seed ^= seed << 13;
                        seed ^= seed >> 17;
                        seed ^= seed << 5;
                        let size = 256 + (seed as usize % (256 * 1024));
                        let (p, actual) = pool.alloc(size).unwrap();
                        let tag = t.wrapping_mul(31).wrapping_add(i as u8);
                        sim.copy_from_host(p, &vec![tag; size.min(4096)]).unwrap();
                        held.push((p, actual, tag));
                        if held.len() > 6 || seed % 3 == 0 {
                            let (p, actual, tag) = held.swap_remove(seed as usize % held.len());
                            let mut back = vec![0; 64];
                            sim.copy_to_host(&mut back, p).unwrap();
                            assert!(
                                back.iter().all(|&b| b == tag),
                                "block {p:#x} was overwritten"
                            );
                            pool.free(p, actual).unwrap();
                        }
                    }
                    for (p, actual, _) in held {
                        pool.free(p, actual).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = pool.stats();
        assert_eq!(
            (s.allocs, s.frees, s.live, s.in_use),
            (6400, 6400, 0, 0),
            "{kind:?}"
        );
        pool.trim().unwrap();
        assert_eq!(sim.used(), 0, "{kind:?}");
        if let ScratchPool::Vmm(v) = &*pool {
            v.check();
        }
    }
}
