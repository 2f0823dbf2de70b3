//! The pinned host pool behind `cudaMallocHost` and `cudaHostAlloc`: the caching pool
//! (`caching`) over a backend of page-locked host memory, with every block a whole number of
//! pages.
//!
//! Why a pool: pinning memory through the driver costs milliseconds per call (the pages are
//! locked and mapped for the device), which is why PyTorch caches pinned memory too. The caching
//! pool is backend-generic, so host blocks get the same size classes, per-thread caches and stream
//! safety as device blocks: the runtime's `cudaFreeHost` synchronizes, and here a freed block is
//! handed out again only after a synchronize of every device that began after the free
//! (`PinnedHostBackend::synchronize`), so a copy queued before the free never reads a new owner's
//! data.
//!
//! Page alignment: the runtime's pinned memory is page-aligned, and programs rely on it (for
//! `O_DIRECT` reads into a staging buffer, say), so requests are rounded up to `PAGE` bytes first.
//! Every block size is then a multiple of `PAGE` (the size classes at multiples of 4 KiB are
//! themselves multiples of 4 KiB; large blocks are 2 MiB multiples), and so is every chunk, which
//! the backend returns page-aligned: a block carved from a chunk starts on a page.

use super::caching::{CachingPool, PoolSettings};
use super::size_class::block_size;
use super::stats::PoolStats;
use crate::backend::{DevicePtr, SharedBackend};
use crate::error::{Error, Result};

/// The alignment and rounding unit of pinned blocks (the x86-64 page).
pub const PAGE: usize = 4096;

pub struct PinnedPool {
    pool: CachingPool,
}

impl PinnedPool {
    /// A pool over `backend`, which hands out page-aligned host memory.
    pub fn new(backend: SharedBackend, settings: PoolSettings) -> PinnedPool {
        PinnedPool {
            pool: CachingPool::new(backend, settings),
        }
    }

    /// The block a request of `size` (> 0) bytes gets, or `None` when rounding overflows.
    pub fn block_size(size: usize) -> Option<usize> {
        block_size(size.checked_next_multiple_of(PAGE)?)
    }

    /// Allocates `size` (> 0) bytes, page-aligned; returns (address, block size). The pool keeps
    /// no record (the caller's tracker does): give exactly the request's size back to `free`.
    #[inline]
    pub fn alloc(&self, size: usize) -> Result<(DevicePtr, usize)> {
        let pages = size
            .checked_next_multiple_of(PAGE)
            .ok_or(Error::OutOfMemory { requested: size })?;
        self.pool.alloc_unchecked(pages)
    }

    /// Returns a block from `alloc` of a request of `size` bytes (stream-safe, see the module
    /// doc). The caller guarantees it is live and frees it once.
    #[inline]
    pub fn free(&self, ptr: DevicePtr, size: usize) {
        let block = Self::block_size(size).expect("a live block's request has a block size");
        self.pool.free_unchecked(ptr, block);
    }

    /// The stream-safety mode in force.
    #[inline]
    pub fn stream_safety(&self) -> crate::config::StreamSafety {
        self.pool.stream_safety()
    }

    /// Why `ptr` is no live block: double free, interior pointer, or not ours at all.
    #[cold]
    pub fn diagnose(&self, ptr: DevicePtr) -> Error {
        self.pool.diagnose(ptr)
    }

    pub fn stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Returns every cached byte the backend can take back (after one synchronize).
    pub fn trim(&self) -> Result<usize> {
        self.pool.trim()
    }

    pub fn backend(&self) -> &SharedBackend {
        self.pool.backend()
    }

    /// Every lock of the pool, for `fork` (`CachingPool::lock_all`).
    pub fn lock_all(&self) -> super::caching::PoolLocks<'_> {
        self.pool.lock_all()
    }

    /// The arenas' invariants; for tests.
    pub fn check(&self) {
        self.pool.check();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sim::SimBackend;
    use crate::backend::HOST_DEVICE;
    use crate::config::StreamSafety;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn new_pool(safety: StreamSafety) -> (Arc<SimBackend>, PinnedPool) {
        let sim = Arc::new(SimBackend::new(HOST_DEVICE, 8 << 30));
        let settings = PoolSettings {
            stream_safety: safety,
            pending_limit: None,
        };
        (sim.clone(), PinnedPool::new(sim, settings))
    }

    #[test]
    fn every_block_is_whole_pages_and_page_aligned() {
        for k in 1..=(40 << 20) / PAGE {
            let b = PinnedPool::block_size(k * PAGE).unwrap();
            assert_eq!(b % PAGE, 0, "{} pages -> block {b}", k);
        }
        assert_eq!(PinnedPool::block_size(1), Some(PAGE));
        assert_eq!(PinnedPool::block_size(usize::MAX), None);

        let (_, pool) = new_pool(StreamSafety::Batched);
        let mut live = BTreeMap::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for i in 0..4000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let size = match seed % 8 {
                0 => 1 + (seed >> 8) as usize % (24 << 20),
                1..=3 => 1 + (seed >> 8) as usize % (1 << 20),
                _ => 1 + (seed >> 8) as usize % 20_000,
            };
            if i % 3 == 2 && !live.is_empty() {
                let key = *live.keys().nth((seed >> 32) as usize % live.len()).unwrap();
                let size = live.remove(&key).unwrap();
                pool.free(key, size);
                continue;
            }
            let (ptr, block) = pool.alloc(size).unwrap();
            assert_eq!(ptr % PAGE, 0, "{size} bytes at {ptr:#x}");
            assert_eq!(Some(block), PinnedPool::block_size(size));
            live.insert(ptr, size);
        }
        let mut end = 0;
        for (&p, &size) in &live {
            assert!(p >= end, "block {p:#x} overlaps the previous one");
            end = p + size;
        }
        for (p, size) in live {
            pool.free(p, size);
        }
        pool.check();
        assert_eq!(pool.stats().in_use, 0);
    }

    #[test]
    fn a_freed_block_waits_for_a_synchronize() {
        let (sim, pool) = new_pool(StreamSafety::Batched);
        let (a, _) = pool.alloc(1 << 20).unwrap();
        pool.free(a, 1 << 20);
        let syncs = sim.sync_count();
        let (b, _) = pool.alloc(1 << 20).unwrap();
        assert!(
            b != a || sim.sync_count() > syncs,
            "the block came back with no synchronize in between"
        );
        pool.free(b, 1 << 20);

        let (sim, pool) = new_pool(StreamSafety::Off);
        let (a, _) = pool.alloc(1 << 20).unwrap();
        pool.free(a, 1 << 20);
        let (b, _) = pool.alloc(1 << 20).unwrap();
        assert_eq!(b, a, "stream_safety:off reuses at once");
        assert_eq!(sim.sync_count(), 0);
    }

    #[test]
    fn out_of_memory_and_bad_frees() {
        let (_, pool) = new_pool(StreamSafety::Batched);
        assert!(matches!(
            pool.alloc(usize::MAX),
            Err(Error::OutOfMemory { .. })
        ));
        assert!(matches!(
            pool.alloc(256 << 40),
            Err(Error::OutOfMemory { .. })
        ));
        let (a, _) = pool.alloc(10_000).unwrap();
        assert!(matches!(
            pool.diagnose(a + PAGE),
            Error::InteriorPointer { block, .. } if block == a
        ));
        pool.free(a, 10_000);
        assert_eq!(pool.diagnose(a), Error::DoubleFree(a));
        assert_eq!(pool.diagnose(0x1000), Error::UnknownPointer(0x1000));
    }
}
