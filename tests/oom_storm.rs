//! Out-of-memory storms on the simulated device: 16 threads allocating past the device's memory
//! together. Every thread gets its memory or `OutOfMemory`, the cache is released once per storm
//! (not once per failing allocation), nothing leaks, and the device's free memory returns to
//! where it started.

use hbmalloc::backend::reclaim::Reclaiming;
use hbmalloc::backend::sim::SimBackend;
use hbmalloc::backend::{Backend, DevicePtr, SharedBackend};
use hbmalloc::config::StreamSafety;
use hbmalloc::error::Error;
use hbmalloc::pool::{CachingPool, PoolSettings};
use std::sync::{Arc, Barrier};
use std::time::Duration;

const THREADS: usize = 16;
const CAPACITY: usize = 256 << 20;
/// Large blocks (past the 32 MiB thread-cache classes), about 10 to a device.
const STORM_BLOCK: usize = 24 << 20;

fn pool() -> (Arc<SimBackend>, Arc<CachingPool>) {
    let sim = Arc::new(SimBackend::new(0, CAPACITY));
    // A slow synchronize (as a busy device's) keeps the release running while the other
    // threads fail: the storm's failures overlap it.
    sim.set_sync_latency(Duration::from_millis(2));
    let settings = PoolSettings {
        stream_safety: StreamSafety::Batched,
        pending_limit: Some(64 << 20),
    };
    (sim.clone(), Arc::new(CachingPool::new(sim, settings)))
}

/// Fills the pool's cache with 1 MiB blocks (small chunks that cannot serve a large block),
/// then frees them: about 200 MiB cached, which only a release can give to the storm.
fn fill_cache(pool: &CachingPool) {
    let blocks: Vec<(DevicePtr, usize)> = (0..200)
        .map(|_| pool.alloc_unchecked(1 << 20).expect("the device has room"))
        .collect();
    for (p, b) in blocks {
        pool.free_unchecked(p, b);
    }
}

/// Brings the pool's peak in use to the device's size, as after a first storm: below that peak
/// the pool grows without reclaiming first (`reclaim_before_grow`, which would otherwise hand
/// the idle cache back before any allocation failed, leaving the storm nothing to release).
fn had_the_device_in_use(pool: &CachingPool) {
    let blocks: Vec<(DevicePtr, usize)> = (0..CAPACITY / STORM_BLOCK)
        .map(|_| pool.alloc_unchecked(STORM_BLOCK).unwrap())
        .collect();
    for (p, b) in blocks {
        pool.free_unchecked(p, b);
    }
    pool.trim().unwrap();
}

/// What one thread of a storm got.
struct Outcome {
    held: Vec<(DevicePtr, usize)>,
    failures: usize,
}

/// 16 threads, released together, allocate until each has had `failures_each` out-of-memory
/// answers (and keep what they got); any other error fails the test.
fn storm(pool: &Arc<CachingPool>, failures_each: usize) -> Vec<Outcome> {
    let start = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (pool, start) = (pool.clone(), start.clone());
            std::thread::spawn(move || {
                let mut out = Outcome {
                    held: Vec::new(),
                    failures: 0,
                };
                start.wait();
                while out.failures < failures_each {
                    match pool.alloc_unchecked(STORM_BLOCK) {
                        Ok(block) => out.held.push(block),
                        Err(Error::OutOfMemory { .. }) => out.failures += 1,
                        Err(e) => panic!("a storm allocation failed with {e:?}"),
                    }
                }
                out
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Everything the threads got is distinct memory inside what the device can hold.
fn check_outcomes(pool: &CachingPool, outcomes: &[Outcome]) -> usize {
    let mut all: Vec<(DevicePtr, usize)> = outcomes.iter().flat_map(|o| o.held.clone()).collect();
    all.sort();
    for w in all.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "blocks overlap: {w:?}");
    }
    for &(p, b) in &all {
        pool.check_block(p, b);
    }
    let held: usize = all.iter().map(|b| b.1).sum();
    assert!(held <= CAPACITY);
    assert!(
        all.len() >= CAPACITY / STORM_BLOCK - 1,
        "the storm got the device's memory: {} blocks",
        all.len()
    );
    all.len()
}

#[test]
fn a_storm_of_16_threads_releases_the_cache_once() {
    let (sim, pool) = pool();
    let free_at_start = sim.mem_info().unwrap().0;
    had_the_device_in_use(&pool);
    for round in 1..=3 {
        fill_cache(&pool);
        let before = pool.stats().oom_retries;
        let outcomes = storm(&pool, 2);
        let releases = pool.stats().oom_retries - before;
        let failures: usize = outcomes.iter().map(|o| o.failures).sum();
        let successes = check_outcomes(&pool, &outcomes);
        assert_eq!(failures, 2 * THREADS, "every thread got its error");
        assert_eq!(
            releases, 1,
            "round {round}: {failures} failed allocations and {successes} successes released \
             the cache {releases} times"
        );
        for (p, b) in outcomes.into_iter().flat_map(|o| o.held) {
            pool.free_unchecked(p, b);
        }
        pool.check();
        let s = pool.stats();
        assert_eq!(s.in_use, 0, "nothing leaks");
        // Between storms the cache is given back on purpose (hbm_trim), which is no release.
        pool.trim().unwrap();
        assert_eq!(pool.stats().oom_retries - before, 1);
        assert_eq!(sim.mem_info().unwrap().0, free_at_start, "round {round}");
        assert_eq!(sim.used(), 0);
    }
}

/// A scratch pool's or KV cache's allocations (through `Reclaiming`) share the caching pool's
/// gate: a storm of them releases the cache once too.
#[test]
fn a_storm_of_other_consumers_releases_the_cache_once() {
    struct Pool(Arc<CachingPool>);
    impl hbmalloc::backend::reclaim::Caches for Pool {
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
    let (sim, pool) = pool();
    let free_at_start = sim.mem_info().unwrap().0;
    had_the_device_in_use(&pool);
    fill_cache(&pool);
    let consumer: SharedBackend =
        Arc::new(Reclaiming::new(sim.clone(), Box::new(Pool(pool.clone()))));
    let start = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (consumer, start) = (consumer.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let mut held = Vec::new();
                loop {
                    match consumer.alloc(STORM_BLOCK) {
                        Ok(p) => held.push(p),
                        Err(Error::OutOfMemory { .. }) => return held,
                        Err(e) => panic!("{e:?}"),
                    }
                }
            })
        })
        .collect();
    let held: Vec<DevicePtr> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(held.len() >= CAPACITY / STORM_BLOCK - 1, "{}", held.len());
    assert_eq!(pool.stats().oom_retries, 1, "one release for the storm");
    for p in held {
        consumer.free(p, STORM_BLOCK).unwrap();
    }
    pool.trim().unwrap();
    assert_eq!(sim.mem_info().unwrap().0, free_at_start);
}

/// A simulated device whose `hold`-th allocation of `size` bytes waits until the test lets it
/// go: it keeps one failure of a storm retrying while the test makes another thread fail.
struct HeldRetry {
    sim: Arc<SimBackend>,
    size: usize,
    hold: usize,
    calls: std::sync::atomic::AtomicUsize,
    /// (held now, let go)
    state: std::sync::Mutex<(bool, bool)>,
    changed: std::sync::Condvar,
}

impl HeldRetry {
    fn wait_until(&self, done: impl Fn(&(bool, bool)) -> bool) {
        let mut s = self.state.lock().unwrap();
        while !done(&s) {
            s = self.changed.wait(s).unwrap();
        }
    }
    fn set(&self, f: impl FnOnce(&mut (bool, bool))) {
        f(&mut self.state.lock().unwrap());
        self.changed.notify_all();
    }
}

impl Backend for HeldRetry {
    fn alloc(&self, size: usize) -> hbmalloc::error::Result<DevicePtr> {
        use std::sync::atomic::Ordering;
        if size == self.size && self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.hold {
            self.set(|s| s.0 = true);
            self.wait_until(|s| s.1);
        }
        self.sim.alloc(size)
    }
    hbmalloc::forward_backend!(sim; name, device, free, mem_info, synchronize, event_record, event_done, event_release, lock_for_fork, vmm_granularity, vmm_reserve, vmm_release, vmm_map, vmm_unmap, copy_d2d, copy_to_host, copy_from_host);
}

/// A failure that arrives after the storm's release has finished, while another failure of the
/// same storm is still retrying, belongs to that storm: it retries without releasing again,
/// though the cache has refilled since. (The gate of one release per ticket released twice here,
/// as it did on an H200, 47 releases for 3 rounds of 48 failures.)
#[test]
fn a_failure_while_the_storm_still_retries_does_not_release_again() {
    const BLOCK: usize = 24 << 20;
    let sim = Arc::new(SimBackend::new(0, 256 << 20));
    let device = Arc::new(HeldRetry {
        sim: sim.clone(),
        size: 2 * BLOCK,
        // The first 48 MiB attempt fails; the second is the retry after the release.
        hold: 2,
        calls: Default::default(),
        state: Default::default(),
        changed: Default::default(),
    });
    let settings = PoolSettings {
        stream_safety: StreamSafety::Batched,
        pending_limit: Some(64 << 20),
    };
    let pool = Arc::new(CachingPool::new(device.clone(), settings));
    // Ten 24 MiB blocks fill the device; three freed ones wait in the cache.
    let mut held: Vec<(DevicePtr, usize)> = (0..10)
        .map(|_| pool.alloc_unchecked(BLOCK).unwrap())
        .collect();
    for (p, b) in held.drain(..3) {
        pool.free_unchecked(p, b);
    }
    // The storm's first failure: 48 MiB, which only a release makes room for.
    let first = {
        let pool = pool.clone();
        std::thread::spawn(move || pool.alloc_unchecked(2 * BLOCK))
    };
    device.wait_until(|s| s.0);
    assert_eq!(pool.stats().oom_retries, 1, "the first failure released");
    // While it retries: a block freed into the cache, then a failure with a fresh ticket.
    let (p, b) = held.pop().unwrap();
    pool.free_unchecked(p, b);
    let late = {
        let pool = pool.clone();
        std::thread::spawn(move || pool.alloc_unchecked(4 * BLOCK + (16 << 20)))
    }
    .join()
    .unwrap();
    device.set(|s| s.1 = true);
    let first = first
        .join()
        .unwrap()
        .expect("the release served the first failure");
    assert_eq!(
        pool.stats().oom_retries,
        1,
        "one release for the storm (the late failure got {late:?})"
    );
    pool.free_unchecked(first.0, first.1);
    if let Ok((p, b)) = late {
        pool.free_unchecked(p, b);
    }
    for (p, b) in held {
        pool.free_unchecked(p, b);
    }
    pool.trim().unwrap();
    assert_eq!(sim.used(), 0);
}
