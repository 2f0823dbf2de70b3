//! Releasing cached memory when the device runs out, once per out-of-memory storm.
//!
//! `Reclaiming` is a backend adaptor for the consumers of device memory other than the caching
//! pool behind `cudaMalloc` (scratch pools, KV caches). When the device is out of memory it first
//! asks the process's caches to give memory back (`Caches`, installed by the layer that owns
//! them), then tries once more: memory freed by `cudaFree` and cached never makes
//! `hbm_pool_alloc` or a KV cache fail, as it never makes `cudaMalloc` fail.
//!
//! The caching pool itself sits on the plain backend: it reclaims its own cache on its slow path,
//! and a callback into it from under its own locks would deadlock.
//!
//! `ReleaseGate` makes a storm (many threads running out of memory together) release the caches
//! once: a release drains every thread's cache, synchronizes and frees chunks, so one release
//! serves every attempt that failed before it; and a release is skipped when it cannot make room.

use super::{Backend, DevicePtr, SharedBackend};
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The caches of the process, as a consumer of device memory sees them.
pub trait Caches: Send + Sync {
    /// A ticket for an attempt about to ask the device for memory (see `ReleaseGate::ticket`).
    fn ticket(&self, device: i32) -> u64;
    /// After an attempt that took `ticket` ran out of memory wanting `bytes`: releases the
    /// cached memory of `device` unless a release since the ticket already did; whether a retry
    /// may now succeed.
    fn release_for(&self, device: i32, ticket: u64, bytes: usize) -> bool;
}

/// One release of cached memory per out-of-memory storm.
///
/// A thread takes a ticket before it asks the device for memory; when that fails it calls
/// `release_after`. Releases are serialized; a thread whose ticket is older than the last release
/// retries without releasing again (that release drained everything cached when it ran, after
/// the thread's attempt had failed), and a release is skipped when the device's free memory plus
/// everything cached is still less than the request. Cost: one uncontended lock per
/// out-of-memory answer; nothing on any other path.
#[derive(Default)]
pub struct ReleaseGate {
    /// Completed releases; a ticket is the value read before an attempt.
    generation: AtomicU64,
    /// Releases that gave memory back (a release can find nothing: the room estimate counts a
    /// block another thread has just taken from the driver as cached until that thread counts it).
    productive: AtomicU64,
    lock: Mutex<()>,
}

/// What `ReleaseGate::release_after` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Released {
    /// This thread released the caches: `bytes` went back to the driver.
    Now { bytes: usize },
    /// Another thread's release since the ticket already did the work: retry.
    Earlier,
    /// Releasing could not make room for the request (or found nothing cached): do not retry.
    Pointless,
}

impl Released {
    /// Whether a retry of the failed attempt may succeed now.
    pub fn worth_retry(self) -> bool {
        match self {
            Released::Now { bytes } => bytes > 0,
            Released::Earlier => true,
            Released::Pointless => false,
        }
    }
}

impl ReleaseGate {
    /// Read before an attempt that may run out of memory.
    pub fn ticket(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Holds the gate for `fork`: taken before every other lock of the pool that owns it.
    pub fn lock_for_fork(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Releases so far that gave memory back to the driver.
    pub fn releases(&self) -> u64 {
        self.productive.load(Ordering::Relaxed)
    }

    /// After the attempt holding `ticket` ran out of memory: `room` says whether releasing can
    /// help (free device memory plus cached bytes cover the request); `release` gives every
    /// cached byte back and returns how many.
    pub fn release_after(
        &self,
        ticket: u64,
        room: impl FnOnce() -> bool,
        release: impl FnOnce() -> usize,
    ) -> Released {
        let _one = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if self.generation.load(Ordering::Acquire) != ticket {
            return Released::Earlier;
        }
        if !room() {
            return Released::Pointless;
        }
        let bytes = release();
        self.generation.fetch_add(1, Ordering::AcqRel);
        if bytes > 0 {
            self.productive.fetch_add(1, Ordering::Relaxed);
        }
        Released::Now { bytes }
    }
}

pub struct Reclaiming {
    upstream: SharedBackend,
    caches: Box<dyn Caches>,
}

impl Reclaiming {
    pub fn new(upstream: SharedBackend, caches: Box<dyn Caches>) -> Reclaiming {
        Reclaiming { upstream, caches }
    }

    /// Runs `op`; on out of memory, has the caches released (once per storm) and runs it once
    /// more if that may help. An out of memory that stands is reported to the upstream
    /// (`Backend::report_out_of_memory`).
    fn retry<T>(&self, bytes: usize, op: impl Fn() -> Result<T>) -> Result<T> {
        let device = self.upstream.device();
        let ticket = self.caches.ticket(device);
        let result = match op() {
            Err(Error::OutOfMemory { .. }) if self.caches.release_for(device, ticket, bytes) => {
                op()
            }
            other => other,
        };
        if let Err(Error::OutOfMemory { .. }) = result {
            self.upstream.report_out_of_memory(bytes);
        }
        result
    }
}

impl Backend for Reclaiming {
    fn alloc(&self, size: usize) -> Result<DevicePtr> {
        self.retry(size, || self.upstream.alloc(size))
    }
    fn vmm_map(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        self.retry(size, || self.upstream.vmm_map(ptr, size))
    }
    forward_backend!(upstream; name, device, free, mem_info, report_out_of_memory, synchronize, event_record, event_done, event_release, stream_capture, exchange_capture_mode, lock_for_fork, vmm_granularity, vmm_reserve, vmm_release, vmm_unmap, copy_d2d, copy_to_host, copy_from_host, copy_from_host_on, kv_append, kv_dequantize, kv_append_jobs, kv_dequantize_jobs, paged_decode_attention);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sim::SimBackend;
    use crate::pool::{CachingPool, PoolSettings};
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// One caching pool as the consumers' caches.
    struct OnePool(Arc<CachingPool>);
    impl Caches for OnePool {
        fn ticket(&self, _device: i32) -> u64 {
            self.0.release_ticket()
        }
        fn release_for(&self, _device: i32, ticket: u64, bytes: usize) -> bool {
            self.0.release_for(ticket, bytes).worth_retry()
        }
    }

    /// 48 MiB freed into the caching pool of a 64 MiB device: a 32 MiB allocation and a 32 MiB
    /// commit by another consumer succeed, because the cache gives its memory back first.
    #[test]
    fn out_of_memory_releases_the_caches_first() {
        let sim: SharedBackend = Arc::new(SimBackend::new(0, 64 << 20));
        let pool = Arc::new(CachingPool::new(
            sim.clone(),
            PoolSettings::from_config(&crate::config::Config::default()),
        ));
        let (cached, block) = pool.alloc_unchecked(48 << 20).unwrap();
        pool.free_unchecked(cached, block);
        let consumer = Reclaiming::new(sim.clone(), Box::new(OnePool(pool.clone())));
        let p = consumer
            .alloc(32 << 20)
            .expect("the cached 48 MiB are given back");
        consumer.free(p, 32 << 20).unwrap();

        let (again, block) = pool.alloc_unchecked(48 << 20).unwrap();
        pool.free_unchecked(again, block);
        let gran = consumer.vmm_granularity().unwrap();
        let size = (32usize << 20).next_multiple_of(gran);
        let base = consumer.vmm_reserve(size).unwrap();
        consumer.vmm_map(base, size).expect("commit after reclaim");
        consumer.vmm_unmap(base, size).unwrap();
        consumer.vmm_release(base, size).unwrap();
        assert_eq!(pool.stats().oom_retries, 2, "one release per out-of-memory");
    }

    /// Counts calls; releases nothing.
    struct Nothing(Arc<AtomicUsize>);
    impl Caches for Nothing {
        fn ticket(&self, _device: i32) -> u64 {
            0
        }
        fn release_for(&self, _device: i32, _ticket: u64, _bytes: usize) -> bool {
            self.0.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    #[test]
    fn nothing_released_means_the_first_answer_stands() {
        let sim: SharedBackend = Arc::new(SimBackend::new(0, 1 << 20));
        let calls = Arc::new(AtomicUsize::new(0));
        let consumer = Reclaiming::new(sim, Box::new(Nothing(calls.clone())));
        assert!(matches!(
            consumer.alloc(2 << 20),
            Err(Error::OutOfMemory { .. })
        ));
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_release_since_the_ticket_is_not_repeated_and_a_useless_one_is_skipped() {
        let gate = ReleaseGate::default();
        let (early, late) = (gate.ticket(), gate.ticket());
        let runs = AtomicUsize::new(0);
        let release = || runs.fetch_add(1, Ordering::Relaxed) + 100;
        assert_eq!(
            gate.release_after(early, || true, release),
            Released::Now { bytes: 100 }
        );
        // `late` failed before that release finished: it retries without releasing again.
        assert_eq!(
            gate.release_after(late, || true, release),
            Released::Earlier
        );
        // A fresh failure where releasing cannot make room: no release, no retry.
        let fresh = gate.ticket();
        let outcome = gate.release_after(fresh, || false, release);
        assert_eq!(outcome, Released::Pointless);
        assert!(!outcome.worth_retry());
        assert_eq!((runs.load(Ordering::Relaxed), gate.releases()), (1, 1));
    }
}
