//! Pool statistics: slow-path counters as atomics, fast-path counters summed from the shards.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// A snapshot of one pool's statistics (all bytes are block sizes, after rounding).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes handed out and not yet freed.
    pub in_use: u64,
    /// Bytes obtained from the driver and not yet given back (in use + cached).
    pub reserved: u64,
    /// Highest `in_use` seen. Sampled whenever the pool grows and whenever statistics are read:
    /// the fast path keeps no global counter, so a short peak served entirely from caches can be
    /// missed. `peak_reserved` is exact.
    pub peak_in_use: u64,
    pub peak_reserved: u64,
    /// Calls to the driver that allocated / freed memory.
    pub driver_allocs: u64,
    pub driver_frees: u64,
    /// Allocations served from cached memory / that needed the driver.
    pub pool_hits: u64,
    pub pool_misses: u64,
    /// Out-of-memory answers from the driver that led to releasing the cache and retrying: once
    /// per storm of threads running out together, not once per failed allocation.
    pub oom_retries: u64,
    /// Device synchronizations done to make freed blocks reusable.
    pub syncs: u64,
    /// Allocations and frees served.
    pub allocs: u64,
    pub frees: u64,
}

impl PoolStats {
    /// One line for `verbose:on` at exit: what the pool served and what that cost the driver.
    pub fn summary_line(&self, device: i32) -> String {
        self.summary_line_of(&format!("device {device}"))
    }

    /// As `summary_line`, for the pool named `what` ("device 0", "pinned host").
    pub fn summary_line_of(&self, what: &str) -> String {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        format!(
            "hbmalloc: {what} pool: {} allocs, {} frees, {} hits, {} misses; \
             driver allocs {}, frees {}; syncs {}; out-of-memory retries {}; \
             peak in use {:.1} MiB, peak reserved {:.1} MiB, reserved now {:.1} MiB\n",
            self.allocs,
            self.frees,
            self.pool_hits,
            self.pool_misses,
            self.driver_allocs,
            self.driver_frees,
            self.syncs,
            self.oom_retries,
            mib(self.peak_in_use),
            mib(self.peak_reserved),
            mib(self.reserved),
        )
    }
}

/// Counters touched only on the slow path.
#[derive(Default)]
pub struct SlowCounters {
    pub reserved: AtomicUsize,
    pub peak_reserved: AtomicUsize,
    pub peak_in_use: AtomicUsize,
    pub driver_allocs: AtomicU64,
    pub driver_frees: AtomicU64,
    pub misses: AtomicU64,
    pub syncs: AtomicU64,
}

impl SlowCounters {
    pub fn add_reserved(&self, bytes: usize) {
        let now = self.reserved.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak_reserved.fetch_max(now, Ordering::Relaxed);
        self.driver_allocs.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sub_reserved(&self, bytes: usize) {
        self.reserved.fetch_sub(bytes, Ordering::Relaxed);
        self.driver_frees.fetch_add(1, Ordering::Relaxed);
    }

    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
