//! Pools of device memory: the caching pool behind the interposed `cudaMalloc`, its arena and
//! per-thread caches, size classes and statistics.

pub mod arena;
pub mod caching;
pub mod size_class;
pub mod stats;
pub mod thread_cache;

pub use caching::{CachingPool, PoolSettings};
pub use stats::PoolStats;
