//! The process-wide state: which backend serves each device, chosen once from `HBMALLOC_CONF`.
//!
//! Everything above `backend` asks here for a device's backend; nothing else decides between CUDA
//! and the simulated device.

use crate::backend::sim::SimBackend;
use crate::backend::{host_memory, SharedBackend, HOST_DEVICE};
use crate::config::{self, BackendKind};
use crate::error::{Error, Result};
use crate::pool::{CachingPool, PinnedPool, PoolSettings};
use once_cell::sync::OnceCell;
use std::sync::Arc;

/// The most devices one process can use; device ordinals at or above it are invalid.
pub const MAX_DEVICES: usize = 64;

/// Which kind of backend this process uses, decided on first use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Active {
    Cuda,
    Sim,
}

static ACTIVE: OnceCell<Active> = OnceCell::new();
static BACKENDS: [OnceCell<SharedBackend>; MAX_DEVICES] = [const { OnceCell::new() }; MAX_DEVICES];

/// The backend kind in force: `backend:auto` picks CUDA when a driver and a device are present.
pub fn active() -> Active {
    *ACTIVE.get_or_init(|| match config::get().backend {
        BackendKind::Sim => Active::Sim,
        BackendKind::Cuda => Active::Cuda,
        BackendKind::Auto => {
            if crate::backend::cuda::CudaBackend::available() {
                Active::Cuda
            } else {
                Active::Sim
            }
        }
    })
}

/// Whether `backend:auto` found no usable CUDA device and chose the simulated device. The
/// library API keeps working on it; the interposed runtime entry points answer as the runtime
/// does without a device (`ffi::runtime_state`).
pub fn auto_fell_back() -> bool {
    config::get().backend == BackendKind::Auto && active() == Active::Sim
}

/// Number of devices the active backend offers (the simulated device is one device).
pub fn device_count() -> i32 {
    match active() {
        Active::Sim => 1,
        Active::Cuda => crate::backend::cuda::CudaBackend::device_count(),
    }
}

/// The device the CUDA runtime considers current on this thread (always 0 on the simulated
/// device). Follows `cudaSetDevice` through the thread's current context.
#[inline]
pub fn current_device() -> i32 {
    match active() {
        Active::Sim => 0,
        Active::Cuda => crate::backend::cuda::CudaBackend::current_device(),
    }
}

/// The backend serving `device`, created on first use.
pub fn backend(device: i32) -> Result<SharedBackend> {
    if device < 0 || device >= device_count() || device as usize >= MAX_DEVICES {
        return Err(Error::InvalidDevice(device));
    }
    BACKENDS[device as usize]
        .get_or_try_init(|| -> Result<SharedBackend> {
            Ok(match active() {
                Active::Sim => Arc::new(SimBackend::new(device, config::get().sim_capacity)),
                Active::Cuda => Arc::new(crate::backend::cuda::CudaBackend::new(device)?),
            })
        })
        .cloned()
}

static POOLS: [OnceCell<CachingPool>; MAX_DEVICES] = [const { OnceCell::new() }; MAX_DEVICES];

/// The caching pool of `device` (the one behind `cudaMalloc`), created on first use.
#[inline]
pub fn pool(device: i32) -> Result<&'static CachingPool> {
    // The hot path: one load, no reference-count traffic on the shared backend.
    if let Some(pool) = POOLS.get(device as usize).and_then(OnceCell::get) {
        return Ok(pool);
    }
    pool_slow(device)
}

#[cold]
fn pool_slow(device: i32) -> Result<&'static CachingPool> {
    let backend = backend(device)?;
    Ok(POOLS[device as usize]
        .get_or_init(|| CachingPool::new(backend, PoolSettings::from_config(config::get()))))
}

/// The pools created so far, with their device ordinals.
pub fn pools() -> impl Iterator<Item = (i32, &'static CachingPool)> {
    POOLS
        .iter()
        .enumerate()
        .filter_map(|(d, p)| p.get().map(|p| (d as i32, p)))
}

static HOST_POOL: OnceCell<PinnedPool> = OnceCell::new();

/// The pinned host pool (the one behind `cudaMallocHost`), created on first use: over the
/// driver's pinned memory on CUDA, over ordinary host memory (bounded by the host's RAM) on the
/// simulated device.
#[inline]
pub fn host_pool() -> Result<&'static PinnedPool> {
    if let Some(pool) = HOST_POOL.get() {
        return Ok(pool);
    }
    host_pool_slow()
}

#[cold]
fn host_pool_slow() -> Result<&'static PinnedPool> {
    HOST_POOL.get_or_try_init(|| {
        let backend: SharedBackend = match active() {
            Active::Sim => Arc::new(SimBackend::new(HOST_DEVICE, host_memory().1)),
            Active::Cuda => Arc::new(crate::backend::cuda::PinnedHostBackend::new()?),
        };
        Ok(PinnedPool::new(
            backend,
            PoolSettings::from_config(config::get()),
        ))
    })
}

/// The pinned host pool if anything created it.
pub fn host_pool_if_started() -> Option<&'static PinnedPool> {
    HOST_POOL.get()
}

static SIM_MANAGED: OnceCell<SimBackend> = OnceCell::new();

/// Where `cudaMallocManaged` memory comes from on the simulated device: host memory of its own
/// (managed memory is not pooled, see `crate::host_alloc`), bounded by the host's RAM.
pub fn sim_managed() -> &'static SimBackend {
    SIM_MANAGED.get_or_init(|| SimBackend::new(0, host_memory().1))
}
