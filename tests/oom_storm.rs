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
        fn release_for(&self, _device: i32, ticket: u64, bytes: usize) -> bool {
            self.0.release_for(ticket, bytes).worth_retry()
        }
    }
    let (sim, pool) = pool();
    let free_at_start = sim.mem_info().unwrap().0;
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
