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
//! `ReleaseGate` makes a storm (threads running out of memory together) release the caches
//! once: a release drains every thread's cache, synchronizes and frees chunks, so one release
//! serves every attempt of the storm; and a release is skipped when it cannot make room.

use super::{Backend, DevicePtr, SharedBackend};
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// The caches of the process, as a consumer of device memory sees them.
pub trait Caches: Send + Sync {
    /// A ticket for an attempt about to ask the device for memory (see `ReleaseGate::ticket`).
    fn ticket(&self, device: i32) -> u64;
    /// After an attempt that took `ticket` ran out of memory wanting `bytes`: joins the storm of
    /// `device`'s caches, releasing them if no release has served this storm yet, and runs
    /// `retry` inside the storm if it may succeed now (`ReleaseGate::release_then`). Whether
    /// `retry` ran.
    fn release_then(&self, device: i32, ticket: u64, bytes: usize, retry: &mut dyn FnMut())
        -> bool;
}

/// One release of cached memory per out-of-memory storm.
///
/// A storm is a run of out-of-memory answers that overlap in time: it begins with a failure
/// while no other thread is handling one, and every failure that arrives before the last of them
/// has retried joins it. Its first failure where releasing can make room releases the caches;
/// every other failure of the storm waits for that release (the gate's lock) and retries without
/// releasing again. A failure whose attempt began before a release finished is served by that
/// release too (its ticket is older), whichever storm it falls in. A failure once the storm is
/// over (every thread in it has retried, so an allocation has been served or refused since) is a
/// new storm. Cost: one uncontended lock taken twice per out-of-memory answer; nothing on any
/// other path.
#[derive(Default)]
pub struct ReleaseGate {
    /// Completed releases; a ticket is the value read before an attempt.
    generation: AtomicU64,
    /// Releases that gave memory back (a release can find nothing: the room estimate counts a
    /// block another thread has just taken from the driver as cached until that thread counts it).
    productive: AtomicU64,
    storm: Mutex<Storm>,
}

/// The storm in progress, under the gate's lock.
#[derive(Default, Debug)]
pub struct Storm {
    /// Threads between their out-of-memory answer and the end of their retry.
    active: usize,
    /// Whether this storm's release has run.
    released: bool,
}

impl Storm {
    /// In a child after `fork`: the threads that were in a storm are not there.
    pub fn forget_threads(&mut self) {
        *self = Storm::default();
    }
}

/// What `ReleaseGate::release_then` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Released {
    /// This thread released the caches: `bytes` went back to the driver.
    Now { bytes: usize },
    /// A release since the ticket, or this storm's release, already did the work: retry.
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
    pub fn lock_for_fork(&self) -> MutexGuard<'_, Storm> {
        self.lock()
    }

    fn lock(&self) -> MutexGuard<'_, Storm> {
        // Every update of `Storm` is one statement: a poisoned lock guards consistent data.
        self.storm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Releases so far that gave memory back to the driver.
    pub fn releases(&self) -> u64 {
        self.productive.load(Ordering::Relaxed)
    }

    /// After the attempt holding `ticket` ran out of memory: joins the storm; `room` says
    /// whether releasing can help (free device memory plus cached bytes cover the request);
    /// `release` gives every cached byte back and returns how many; `retry`, run if a retry may
    /// succeed, is the attempt again, still inside the storm (a failure meanwhile joins it).
    pub fn release_then<T>(
        &self,
        ticket: u64,
        room: impl FnOnce() -> bool,
        release: impl FnOnce() -> usize,
        retry: impl FnOnce() -> T,
    ) -> (Released, Option<T>) {
        let outcome = {
            let mut storm = self.lock();
            if storm.active == 0 {
                storm.released = false;
            }
            storm.active += 1;
            if self.generation.load(Ordering::Acquire) != ticket || storm.released {
                Released::Earlier
            } else if !room() {
                Released::Pointless
            } else {
                let bytes = release();
                self.generation.fetch_add(1, Ordering::AcqRel);
                storm.released = true;
                if bytes > 0 {
                    self.productive.fetch_add(1, Ordering::Relaxed);
                }
                Released::Now { bytes }
            }
        };
        // Leaves the storm even if `retry` unwinds.
        let _leave = Leave(self);
        (outcome, outcome.worth_retry().then(retry))
    }
}

/// Counts a thread out of the storm when dropped.
struct Leave<'a>(&'a ReleaseGate);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let mut storm = self.0.lock();
        storm.active = storm.active.saturating_sub(1);
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
        let mut result = op();
        if let Err(Error::OutOfMemory { .. }) = result {
            let mut again = None;
            self.caches
                .release_then(device, ticket, bytes, &mut || again = Some(op()));
            if let Some(again) = again {
                result = again;
            }
        }
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
        fn release_then(
            &self,
            _device: i32,
            ticket: u64,
            bytes: usize,
            retry: &mut dyn FnMut(),
        ) -> bool {
            self.0.release_then(ticket, bytes, retry).1.is_some()
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
        fn release_then(&self, _: i32, _: u64, _: usize, _: &mut dyn FnMut()) -> bool {
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
            gate.release_then(early, || true, release, || ()),
            (Released::Now { bytes: 100 }, Some(()))
        );
        // `late` failed before that release finished: it retries without releasing again.
        assert_eq!(
            gate.release_then(late, || true, release, || ()),
            (Released::Earlier, Some(()))
        );
        // A fresh failure where releasing cannot make room: no release, no retry.
        let fresh = gate.ticket();
        let outcome = gate.release_then(fresh, || false, release, || ());
        assert_eq!(outcome, (Released::Pointless, None));
        assert_eq!((runs.load(Ordering::Relaxed), gate.releases()), (1, 1));
    }

    /// A failure that arrives after the storm's release finished, while another failure of the
    /// storm is still retrying, joins that storm: no second release. Once every failure has
    /// retried, the next one is a new storm and releases again.
    #[test]
    fn a_failure_during_another_ones_retry_joins_its_storm() {
        let gate = ReleaseGate::default();
        let runs = AtomicUsize::new(0);
        let release = || runs.fetch_add(1, Ordering::Relaxed) + 100;
        let first = gate.ticket();
        let (outcome, _) = gate.release_then(
            first,
            || true,
            release,
            || {
                // Inside the first failure's retry: a failure with a ticket taken after the release.
                let fresh = gate.ticket();
                assert_ne!(fresh, first);
                assert_eq!(
                    gate.release_then(fresh, || true, release, || ()),
                    (Released::Earlier, Some(()))
                );
            },
        );
        assert_eq!(outcome, Released::Now { bytes: 100 });
        assert_eq!(runs.load(Ordering::Relaxed), 1, "one release for the storm");
        let next = gate.ticket();
        assert_eq!(
            gate.release_then(next, || true, release, || ()).0,
            Released::Now { bytes: 101 },
            "a later storm"
        );
        assert_eq!(gate.releases(), 2);
    }
}
