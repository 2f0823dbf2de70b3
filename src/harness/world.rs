//! `World`: every consumer of device memory on one simulated device behind a fault adaptor, with
//! a model of what each holds and one `check` of every invariant between them.
//!
//! The layers are composed as the runtime composes them: the caching pool (behind `cudaMalloc`)
//! with a tracker holding the record of its live blocks, two scratch pools and a KV cache over
//! the same device. `check` asserts (panics on) anything inconsistent: blocks that overlap or are
//! misaligned, statistics that do not add up to what is live, records the pool does not agree
//! with, device memory that no layer accounts for.

use crate::backend::fault::{FaultPlan, Faulty};
use crate::backend::sim::SimBackend;
use crate::backend::{Backend, DevicePtr, SharedBackend, Stream};
use crate::config::{LeakReport, StreamSafety};
use crate::error::Error;
use crate::ffi::status::to_cuda_error;
use crate::kv::cache::KvCache;
use crate::kv::layout::{Growth, KvParams};
use crate::kv::HbmType;
use crate::pool::size_class::block_size;
use crate::pool::{CachingPool, PoolSettings, ScratchKind, ScratchOptions, ScratchPool};
use crate::track::registry::Tracker;
use crate::track::{Origin, Settings};
use std::collections::BTreeMap;
use std::sync::Arc;

/// How a `World` is built.
#[derive(Clone, Debug)]
pub struct Setup {
    pub capacity: usize,
    pub stream_safety: StreamSafety,
    pub pending_limit: Option<usize>,
    pub growth: Growth,
    /// The scratch pools' `max_cached_buffers` and `release_threshold`.
    pub max_cached: u32,
    pub release_threshold: usize,
    pub faults: FaultPlan,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            capacity: 256 << 20,
            stream_safety: StreamSafety::Batched,
            pending_limit: Some(8 << 20),
            growth: Growth::Vmm,
            max_cached: 4,
            release_threshold: usize::MAX,
            faults: FaultPlan::default(),
        }
    }
}

/// KV cache shape: 2 layers of 2 heads of 64, 4 sequences of up to 4096 tokens.
pub const KV_SEQS: u32 = 4;
pub const KV_CTX: u32 = 4096;

pub struct World {
    pub sim: Arc<SimBackend>,
    pub faults: Arc<Faulty>,
    pub pool: CachingPool,
    pub tracker: Tracker,
    /// Legacy, then VMM (or its legacy fallback); `None` where creation failed.
    pub scratch: Vec<Option<ScratchPool>>,
    pub kv: Option<KvCache>,
    /// The model: live caching-pool blocks (pointer -> block size), scratch blocks per pool
    /// (pointer -> actual), KV tokens reserved per bound sequence.
    pub live: BTreeMap<DevicePtr, usize>,
    pub scratch_live: Vec<BTreeMap<DevicePtr, usize>>,
    pub kv_seqs: BTreeMap<u32, u32>,
    /// Operations that failed, and how many of those failures the fault plan caused.
    pub failures: u64,
}

impl World {
    pub fn new(setup: &Setup) -> World {
        let sim = Arc::new(SimBackend::new(0, setup.capacity));
        let faults = Arc::new(Faulty::new(sim.clone(), setup.faults.clone()));
        let backend: SharedBackend = faults.clone();
        let pool = CachingPool::new(
            backend.clone(),
            PoolSettings {
                stream_safety: setup.stream_safety,
                pending_limit: setup.pending_limit,
            },
        );
        let tracker = Tracker::new(Settings {
            backtrace: false,
            leak_report: LeakReport::Off,
            ..Settings::default()
        });
        let options = ScratchOptions {
            reserve_size: setup.capacity,
            max_cached_buffers: setup.max_cached,
            release_threshold: setup.release_threshold,
            ..ScratchOptions::default()
        };
        let scratch = [ScratchKind::Legacy, ScratchKind::Vmm]
            .into_iter()
            .map(|kind| ScratchPool::new(backend.clone(), kind, options).ok())
            .collect();
        let kv = KvCache::new(
            backend,
            KvParams {
                n_layer: 2,
                n_head_kv: 2,
                head_dim: 64,
                n_ctx_max: KV_CTX,
                n_seq_max: KV_SEQS,
                type_k: HbmType::F16,
                type_v: HbmType::Q8_0,
                growth: setup.growth,
            },
        )
        .ok();
        World {
            sim,
            faults,
            pool,
            tracker,
            scratch,
            kv,
            live: BTreeMap::new(),
            scratch_live: vec![BTreeMap::new(); 2],
            kv_seqs: BTreeMap::new(),
            failures: 0,
        }
    }

    /// An operation failed with `e`: it must be an error the runtime gives (out of memory, or
    /// the driver's own code when the plan injected one), never anything else.
    pub fn failed(&mut self, e: &Error, what: &str) {
        self.failures += 1;
        let code = to_cuda_error(e);
        let injected = self.faults.injected() > 0;
        assert!(
            code == 2 || (injected && matches!(e, Error::Driver { .. })),
            "{what} failed with {e:?} (cudaError {code}) without a fault to explain it"
        );
    }

    /// `cudaMalloc` / `cudaMallocAsync` as the tracking adaptor does it.
    pub fn pool_alloc(&mut self, size: usize, stream: Option<Stream>) {
        let got = match stream {
            None => self.pool.alloc_unchecked(size),
            Some(s) => self.pool.alloc_async_unchecked(size, s),
        };
        match got {
            Ok((ptr, block)) => {
                assert_eq!(Some(block), block_size(size));
                let origin = match stream {
                    None => Origin::CudaMalloc,
                    Some(_) => Origin::CudaMallocAsync,
                };
                self.tracker
                    .on_alloc(ptr, size, 0, stream.unwrap_or(0), origin);
                assert!(self.live.insert(ptr, block).is_none(), "{ptr:#x} twice");
            }
            Err(e) => self.failed(&e, "caching-pool allocation"),
        }
    }

    /// `cudaFree` / `cudaFreeAsync` of the live block at `ptr`.
    pub fn pool_free(&mut self, ptr: DevicePtr, stream: Option<Stream>) {
        let live = self
            .tracker
            .on_free(ptr)
            .expect("a live block has a record");
        let block = block_size(live.size as usize).expect("recorded sizes have blocks");
        assert_eq!(self.live.remove(&ptr), Some(block));
        match stream {
            None => self.pool.free_unchecked(ptr, block),
            Some(s) => self.pool.free_async_unchecked(ptr, block, s),
        }
    }

    /// A free of something that is not a live block: refused by the tracker, diagnosed by the
    /// pool, and nothing changes.
    pub fn pool_bad_free(&mut self, ptr: DevicePtr) {
        if self.live.contains_key(&ptr) {
            return;
        }
        assert!(self.tracker.on_free(ptr).is_err(), "{ptr:#x} is not live");
        let diagnosis = self.pool.diagnose(ptr);
        assert!(matches!(
            diagnosis,
            Error::DoubleFree(_) | Error::InteriorPointer { .. } | Error::UnknownPointer(_)
        ));
    }

    pub fn scratch_alloc(&mut self, which: usize, size: usize) {
        let Some(pool) = &self.scratch[which] else {
            return;
        };
        match pool.alloc(size) {
            Ok((ptr, actual)) => {
                assert!(actual >= size);
                assert!(self.scratch_live[which].insert(ptr, actual).is_none());
            }
            Err(e) => self.failed(&e, "scratch allocation"),
        }
    }

    pub fn scratch_free(&mut self, which: usize, ptr: DevicePtr) {
        let Some(pool) = &self.scratch[which] else {
            return;
        };
        let actual = self.scratch_live[which][&ptr];
        // A wrong size is refused and changes nothing.
        assert!(pool.free(ptr, actual + 256).is_err());
        match pool.free(ptr, actual) {
            Ok(()) => {
                self.scratch_live[which].remove(&ptr);
            }
            Err(e) => panic!("freeing a live scratch block failed: {e:?}"),
        }
        assert!(pool.free(ptr, actual).is_err(), "second free refused");
    }

    pub fn scratch_trim(&mut self, which: usize) {
        if let Some(Err(e)) = self.scratch[which].as_ref().map(ScratchPool::trim) {
            self.failed(&e, "scratch trim");
        }
    }

    pub fn kv_reserve(&mut self, seq: u32, tokens: u32) {
        let Some(kv) = &self.kv else {
            return;
        };
        match kv.reserve(seq, tokens) {
            Ok(()) => {
                let had = self.kv_seqs.entry(seq).or_insert(0);
                *had = (*had).max(tokens);
            }
            Err(e @ Error::InvalidValue(_)) => {
                assert!(tokens > KV_CTX || seq >= KV_SEQS, "{e:?}")
            }
            Err(e) => self.failed(&e, "KV reserve"),
        }
    }

    pub fn kv_release(&mut self, seq: u32) {
        let Some(kv) = &self.kv else {
            return;
        };
        match kv.release(seq) {
            Ok(()) => assert!(self.kv_seqs.remove(&seq).is_some(), "seq {seq} was bound"),
            Err(e @ Error::InvalidValue(_)) => assert!(!self.kv_seqs.contains_key(&seq), "{e:?}"),
            Err(e) => self.failed(&e, "KV release"),
        }
    }

    pub fn kv_trim(&mut self) {
        if let Some(kv) = &self.kv {
            kv.trim();
        }
    }

    pub fn pool_trim(&mut self) {
        if let Err(e) = self.pool.trim() {
            self.failed(&e, "caching-pool trim");
        }
    }

    /// Every invariant between the layers and the model.
    pub fn check(&self) {
        // The caching pool: arenas consistent, every record a live block of its size.
        self.pool.check();
        for (&ptr, &block) in &self.live {
            let live = self.tracker.get(ptr).expect("a record per live block");
            assert_eq!(
                Some(block),
                block_size(live.size as usize),
                "record of {ptr:#x}"
            );
            self.pool.check_block(ptr, block);
        }
        let s = self.pool.stats();
        let in_use: usize = self.live.values().sum();
        assert_eq!(s.in_use as usize, in_use, "pool in_use");
        assert_eq!(s.allocs - s.frees, self.live.len() as u64, "allocs - frees");
        assert!(s.reserved >= s.in_use && s.peak_reserved >= s.reserved);
        // Scratch pools: their statistics are what the model holds.
        let mut committed = s.reserved;
        let mut parts = vec![("caching pool", s.reserved)];
        for (pool, live) in self.scratch.iter().zip(&self.scratch_live) {
            let Some(pool) = pool else { continue };
            if let ScratchPool::Vmm(p) = pool {
                p.check();
            }
            let st = pool.stats();
            assert_eq!(st.in_use, live.values().map(|&a| a as u64).sum::<u64>());
            assert_eq!(st.live, live.len() as u64);
            assert!(st.committed >= st.in_use);
            committed += st.committed;
            parts.push(("scratch pool", st.committed));
        }
        // The KV cache: its sequences and their room.
        if let Some(kv) = &self.kv {
            let st = kv.stats();
            assert_eq!(st.n_seq as usize, self.kv_seqs.len(), "KV sequences bound");
            for (&seq, &tokens) in &self.kv_seqs {
                assert!(kv.capacity(seq).expect("bound") >= tokens, "seq {seq}");
            }
            committed += st.committed;
            parts.push(("KV cache", st.committed));
        }
        // Every byte the device handed out is held by exactly one layer.
        assert_eq!(
            self.sim.used() as u64,
            committed,
            "device memory accounted: {parts:?}"
        );
        // No two live blocks overlap; each is aligned as promised.
        let mut ranges: Vec<(DevicePtr, usize)> = self.live.iter().map(|(&p, &b)| (p, b)).collect();
        for live in &self.scratch_live {
            ranges.extend(live.iter().map(|(&p, &a)| (p, a)));
        }
        for &(p, _) in &ranges {
            assert_eq!(p % 256, 0, "{p:#x} aligned");
        }
        for &p in self.live.keys() {
            assert_eq!(p % 512, 0, "caching-pool block {p:#x} aligned to 512");
        }
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "blocks overlap: {w:x?}");
        }
    }

    /// `check`, and no record beyond the live blocks (a scan of the tracker's whole table:
    /// milliseconds, so not after every step).
    pub fn check_full(&self) {
        self.check();
        let records = self.tracker.snapshot();
        assert_eq!(records.len(), self.live.len(), "one record per live block");
    }

    /// With faults off: frees everything, trims every layer, and checks that the device has all
    /// its memory back.
    pub fn drain(mut self) {
        self.faults.set_armed(false);
        for (ptr, _) in std::mem::take(&mut self.live) {
            let live = self.tracker.on_free(ptr).expect("record");
            self.pool
                .free_unchecked(ptr, block_size(live.size as usize).unwrap());
        }
        for which in 0..self.scratch_live.len() {
            for (ptr, actual) in std::mem::take(&mut self.scratch_live[which]) {
                let pool = self.scratch[which].as_ref().expect("blocks from a pool");
                pool.free(ptr, actual).expect("live scratch block");
            }
        }
        if let Some(kv) = &self.kv {
            for seq in std::mem::take(&mut self.kv_seqs).into_keys() {
                kv.release(seq).expect("bound sequence");
            }
            kv.trim();
        }
        self.check_full();
        self.pool.trim().expect("trim with faults off");
        for pool in self.scratch.iter().flatten() {
            pool.trim().expect("trim with faults off");
        }
        self.check();
        let s = self.pool.stats();
        assert_eq!(
            (s.in_use, s.reserved),
            (0, 0),
            "caching pool empty after trim"
        );
        // Scratch pools keep nothing after a trim; the KV cache keeps no pages (its reservations
        // are address space, not memory).
        let (free, total) = self.sim.mem_info().unwrap();
        assert_eq!(free, total, "everything back after a trim");
        assert_eq!(self.sim.used(), 0);
    }
}
