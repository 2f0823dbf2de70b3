//! The process-wide state: which backend serves each device, chosen once from `HBMALLOC_CONF`.
//!
//! Everything above `backend` asks here for a device's backend; nothing else decides between CUDA
//! and the simulated device.

pub mod fork;

use crate::backend::fault::Faulty;
use crate::backend::limit::Limited;
use crate::backend::reclaim::{Caches, Reclaiming};
use crate::backend::sim::SimBackend;
use crate::backend::{host_memory, SharedBackend, HOST_DEVICE};
use crate::config::{self, BackendKind, MemLimit};
use crate::error::{Error, Result};
use crate::pool::{CachingPool, PinnedPool, PoolSettings};
use crate::process::init::InitCell;
use std::sync::Arc;

/// The most devices one process can use; device ordinals at or above it are invalid.
pub use crate::backend::MAX_DEVICES;

/// Which kind of backend this process uses, decided on first use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Active {
    Cuda,
    Sim,
}

// Every process-wide set-up here is an `InitCell`, which a fork waits for (`process::init`).
static ACTIVE: InitCell<Active> = InitCell::new("runtime::active");
static BACKENDS: [InitCell<SharedBackend>; MAX_DEVICES] =
    [const { InitCell::new("runtime::backend") }; MAX_DEVICES];

/// The backend kind in force: `backend:auto` picks CUDA when a driver and a device are present.
pub fn active() -> Active {
    match ACTIVE.get() {
        Some(active) => *active,
        None => active_slow(),
    }
}

#[cold]
fn active_slow() -> Active {
    let kind = config::get().backend;
    // The driver is probed before the set-up lock is taken: a fork must not wait for it
    // (`process::init`).
    let cuda = kind == BackendKind::Auto && crate::backend::cuda::CudaBackend::available();
    *ACTIVE.get_or_init(|| match kind {
        BackendKind::Sim => Active::Sim,
        BackendKind::Cuda => Active::Cuda,
        BackendKind::Auto if cuda => Active::Cuda,
        BackendKind::Auto => Active::Sim,
    })
}

/// The backend kind, if something decided it already (never decides: for the fork handlers).
pub fn active_if_decided() -> Option<Active> {
    ACTIVE.get().copied()
}

/// What CUDA answers in a child forked from a CUDA process: the driver does not survive fork
/// (`cudaErrorInitializationError`).
#[cold]
fn cuda_lost_error() -> Error {
    Error::Driver {
        call: "cuInit (in a forked child)",
        code: 3,
    }
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

/// The device whose *primary* context is current on this thread (device 0 on the simulated
/// device), creating its caching pool; `None` when the thread has no context, or one the
/// program created itself (`cuCtxCreate`), whose memory the pool cannot serve: pool memory lives
/// in each device's primary context. `Err` when the device's pool cannot be created.
pub fn current_primary_device() -> Result<Option<i32>> {
    match active() {
        Active::Sim => Ok(Some(0)),
        Active::Cuda => {
            use crate::backend::cuda::CudaBackend;
            let Some((ctx, device)) = CudaBackend::current_context() else {
                return Ok(None);
            };
            let primary = match CudaBackend::known_primary_context(device) {
                Some(primary) => primary,
                // No primary context at all: the current one is the program's own. Checked
                // first, so that such a program never gets a primary context made for it.
                None if !CudaBackend::primary_context_active(device) => return Ok(None),
                None => {
                    pool(device)?; // its backend retains the primary context and notes it
                    CudaBackend::known_primary_context(device).unwrap_or(0)
                }
            };
            if ctx != primary {
                return Ok(None);
            }
            pool(device)?;
            Ok(Some(device))
        }
    }
}

/// The backend serving `device` to the scratch pools and KV caches, created on first use: out
/// of memory there first makes the device's caching pool give its cached memory back.
pub fn backend(device: i32) -> Result<SharedBackend> {
    if crate::process::cuda_lost() {
        return Err(cuda_lost_error());
    }
    check_device(device)?;
    CONSUMER_BACKENDS[device as usize]
        .get_or_try_init(|| -> Result<SharedBackend> {
            Ok(Arc::new(Reclaiming::new(
                raw_backend(device)?,
                Box::new(DevicePools),
            )))
        })
        .cloned()
}

static CONSUMER_BACKENDS: [InitCell<SharedBackend>; MAX_DEVICES] =
    [const { InitCell::new("runtime::consumer_backend") }; MAX_DEVICES];

fn check_device(device: i32) -> Result<()> {
    if device < 0 || device >= device_count() || device as usize >= MAX_DEVICES {
        return Err(Error::InvalidDevice(device));
    }
    Ok(())
}

/// The device's own backend, as the caching pool uses it: under `limit:`, behind the one
/// `Limited` that every consumer of the device shares, so the cap is a sum over all of them.
fn raw_backend(device: i32) -> Result<SharedBackend> {
    check_device(device)?;
    BACKENDS[device as usize]
        .get_or_try_init(|| -> Result<SharedBackend> {
            let device_backend: SharedBackend = match active() {
                Active::Sim => Arc::new(SimBackend::new(device, config::get().sim_capacity)),
                Active::Cuda => Arc::new(crate::backend::cuda::CudaBackend::new(device)?),
            };
            let faults = &config::get().fault;
            let device_backend: SharedBackend = match faults.rules.is_empty() {
                true => device_backend,
                false => Arc::new(Faulty::new(device_backend, faults.clone())),
            };
            let Some(limit) = config::get().limit else {
                return Ok(device_backend);
            };
            let bytes = match limit {
                MemLimit::Bytes(n) => n,
                // A fraction is of this device's memory, known only once the device is open.
                MemLimit::Fraction(_) => limit.bytes(device_backend.mem_info()?.1),
            };
            Ok(Arc::new(Limited::new(device_backend, bytes)))
        })
        .cloned()
}

/// The caching pools behind `cudaMalloc`, as the other consumers of a device's memory see them:
/// out of memory there releases what the device's pool caches, sharing its once-per-storm gate.
struct DevicePools;

impl Caches for DevicePools {
    fn ticket(&self, device: i32) -> u64 {
        POOLS
            .get(device as usize)
            .and_then(InitCell::get)
            .map_or(0, CachingPool::release_ticket)
    }

    fn release_then(
        &self,
        device: i32,
        ticket: u64,
        bytes: usize,
        retry: &mut dyn FnMut(),
    ) -> bool {
        POOLS
            .get(device as usize)
            .and_then(InitCell::get)
            .is_some_and(|pool| pool.release_then(ticket, bytes, retry).1.is_some())
    }
}

static POOLS: [InitCell<CachingPool>; MAX_DEVICES] =
    [const { InitCell::new("runtime::pool") }; MAX_DEVICES];

/// The caching pool of `device` (the one behind `cudaMalloc`), created on first use.
#[inline]
pub fn pool(device: i32) -> Result<&'static CachingPool> {
    // The hot path: one load, no reference-count traffic on the shared backend.
    if let Some(pool) = POOLS.get(device as usize).and_then(InitCell::get) {
        if !crate::process::cuda_lost() {
            return Ok(pool);
        }
    }
    pool_slow(device)
}

#[cold]
fn pool_slow(device: i32) -> Result<&'static CachingPool> {
    if crate::process::cuda_lost() {
        return Err(cuda_lost_error());
    }
    fork::install();
    crate::track::set_exit_summaries(pool_summaries);
    let backend = raw_backend(device)?;
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

/// One line per pool for `verbose:on` at exit: pool counters are host atomics and shard locks,
/// so this makes no CUDA call.
fn pool_summaries() -> Vec<String> {
    let mut lines: Vec<String> = pools()
        .map(|(device, pool)| pool.stats().summary_line(device))
        .collect();
    if let Some(pool) = host_pool_if_started() {
        lines.push(pool.stats().summary_line_of("pinned host"));
    }
    lines
}

static HOST_POOL: InitCell<PinnedPool> = InitCell::new("runtime::host_pool");

/// The pinned host pool (the one behind `cudaMallocHost`), created on first use: over the
/// driver's pinned memory on CUDA, over ordinary host memory (bounded by the host's RAM) on the
/// simulated device.
#[inline]
pub fn host_pool() -> Result<&'static PinnedPool> {
    if let Some(pool) = HOST_POOL.get() {
        if !crate::process::cuda_lost() {
            return Ok(pool);
        }
    }
    host_pool_slow()
}

#[cold]
fn host_pool_slow() -> Result<&'static PinnedPool> {
    if crate::process::cuda_lost() {
        return Err(cuda_lost_error());
    }
    fork::install();
    crate::track::set_exit_summaries(pool_summaries);
    let active = active(); // outside the set-up: it may probe the driver
    HOST_POOL.get_or_try_init(|| {
        let backend: SharedBackend = match active {
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

static SIM_MANAGED: InitCell<SimBackend> = InitCell::new("runtime::sim_managed");

/// Where `cudaMallocManaged` memory comes from on the simulated device: host memory of its own
/// (managed memory is not pooled, see `crate::tracked::host`), bounded by the host's RAM.
pub fn sim_managed() -> &'static SimBackend {
    SIM_MANAGED.get_or_init(|| SimBackend::new(0, host_memory().1))
}

#[cfg(test)]
mod tests {
    /// 48 MiB freed by `cudaFree` and cached on a 64 MiB device: a scratch pool's 32 MiB
    /// allocation gets them back (in a child process: it needs a device of its own size).
    #[test]
    fn scratch_pools_get_memory_cudafree_cached() {
        if crate::test_child::is_child() {
            return child();
        }
        let text = crate::test_child::run(
            "runtime::tests::scratch_pools_get_memory_cudafree_cached",
            Some("backend:sim,sim_capacity:64MiB,leak_report:off"),
        );
        assert!(text.contains("child checks passed"), "{text}");
    }

    fn child() {
        use crate::ffi::cuda_api::{cudaFree, cudaMalloc};
        use crate::ffi::pool_api::*;
        use crate::ffi::status::HbmStatus;
        for kind in [HbmPoolKind::Legacy, HbmPoolKind::Vmm] {
            let mut p = std::ptr::null_mut();
            // SAFETY: local out-parameters; every pointer freed is ours.
            unsafe {
                assert_eq!(cudaMalloc(&mut p, 48 << 20), 0);
                assert_eq!(cudaFree(p), 0);
                let mut opts = std::mem::MaybeUninit::uninit();
                assert_eq!(hbm_pool_options_default(opts.as_mut_ptr()), HbmStatus::Ok);
                let mut opts = opts.assume_init();
                opts.reserve_size = 48 << 20;
                let mut pool = std::ptr::null_mut();
                assert_eq!(
                    hbm_pool_create(0, kind as i32, &opts, &mut pool),
                    HbmStatus::Ok
                );
                let (mut q, mut actual) = (std::ptr::null_mut(), 0);
                assert_eq!(
                    hbm_pool_alloc(pool, 32 << 20, &mut q, &mut actual),
                    HbmStatus::Ok,
                    "{kind:?}: the cached 48 MiB must be given back"
                );
                assert_eq!(hbm_pool_free(pool, q, actual), HbmStatus::Ok);
                hbm_pool_destroy(pool);
            }
        }
        println!("child checks passed");
    }
}
