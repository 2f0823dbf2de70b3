//! `cudaStreamPerThread` (handle 2) is a different stream on every thread: a block one thread
//! freed on it is reused at once by that thread, by another only once the free's event has
//! completed. Its own process: holding the simulated device's events is process-wide.

use hbmalloc::backend::sim::{self, SimBackend};
use hbmalloc::config::StreamSafety;
use hbmalloc::pool::{CachingPool, PoolSettings};
use std::sync::Arc;

#[test]
fn per_thread_stream_blocks_wait_for_their_event_on_another_thread() {
    let pool = Arc::new(CachingPool::new(
        Arc::new(SimBackend::new(0, 1 << 30)),
        PoolSettings {
            stream_safety: StreamSafety::Batched,
            pending_limit: Some(1 << 30),
        },
    ));
    sim::hold_events();
    let (a, block) = pool.alloc_async_unchecked(3 << 20, 2).unwrap();
    pool.free_async_unchecked(a, block, 2);
    let p = pool.clone();
    let (b, _) = std::thread::spawn(move || p.alloc_async_unchecked(3 << 20, 2).unwrap())
        .join()
        .unwrap();
    assert_ne!(b, a, "another thread's stream waits for the event");
    assert_eq!(
        pool.alloc_async_unchecked(3 << 20, 2).unwrap(),
        (a, block),
        "the freeing thread reuses at once"
    );
    sim::complete_held_events();
}
