//! Pools of device memory: the caching pool behind the interposed `cudaMalloc`, its arena and
//! per-thread caches, size classes and statistics; the same pool over pinned host memory behind
//! `cudaMallocHost` (`pinned`); and the ggml-shaped scratch pools (`scratch`: `legacy` and
//! `vmm`) behind `hbm_pool_*`.

pub mod arena;
pub mod caching;
pub mod capture;
pub mod legacy;
pub mod pinned;
pub mod scratch;
pub mod size_class;
pub mod stats;
pub mod thread_cache;
pub mod vmm;

pub use caching::{CachingPool, PoolSettings};
pub use pinned::PinnedPool;
pub use scratch::{ScratchKind, ScratchOptions, ScratchPool, ScratchStats};
pub use stats::PoolStats;
