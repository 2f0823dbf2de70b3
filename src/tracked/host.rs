//! The tracked paths of pinned host memory (`cudaMallocHost`, `cudaHostAlloc`, `cudaFreeHost`)
//! and of managed memory (`cudaMallocManaged`), beside `device`. Callers at the C boundary own
//! NULL checks, flags, forwarding to the runtime and error codes.
//!
//! Pinned memory is pooled (`pool::pinned`). Managed memory is not: its pages migrate between
//! host and devices by the program's hints (`cudaMemAdvise`, prefetches), and a pooled block would
//! carry one owner's hints over to the next. It is the runtime's own allocation, only recorded
//! here, so that leaks and their call sites cover it; on the simulated device it is host memory.
//!
//! The tracker's record is what says which kind a pointer is: its origin. A `cudaFree` of a pinned
//! block or a `cudaFreeHost` of a device block is for a record of another kind (`Want`),
//! and is refused with the record left as it was.

use super::{
    free_route, not_live, restore, take, wrong_kind, FreeError, Freed, Route, Source, Taken, Want,
};
use crate::backend::{Backend, DevicePtr, HOST_DEVICE};
use crate::error::{Error, Result};
use crate::runtime::{self, Active};
use crate::track::{self, Live, Origin, Refused};

/// Allocates `size` (> 0) bytes of pinned host memory from the host pool, page-aligned, and
/// records it as `origin` (`CudaMallocHost` or `CudaHostAlloc`) on `HOST_DEVICE`.
#[inline]
pub fn alloc_pinned(size: usize, origin: Origin) -> Result<DevicePtr> {
    debug_assert_eq!(origin.source(), Source::PinnedPool);
    let (ptr, _block) = runtime::host_pool()?.alloc(size)?;
    track::on_alloc(ptr, size, HOST_DEVICE, 0, origin);
    Ok(ptr)
}

/// `cudaFreeHost`: gives a block from `alloc_pinned` back to the host pool (stream-safe: see
/// `pool::pinned`), or hands write-combined memory's record to the caller to forward.
#[inline]
pub fn free_host(ptr: DevicePtr) -> std::result::Result<Freed, FreeError> {
    // The record goes first: once the pool has the block back, another thread may get it.
    match take(ptr, Want::CUDA_FREE_HOST) {
        Ok(Taken::Pooled { size, .. }) => {
            let pool = runtime::host_pool().map_err(FreeError::Refused)?;
            if free_route(None, pool.stream_safety()) != Route::Keep {
                pool.free(ptr, size as usize);
            }
            Ok(Freed::Pooled(size as usize))
        }
        Ok(Taken::Record(live)) => free_forwarded(ptr, live),
        Err(Refused::Other(live)) => Err(wrong_kind("cudaFreeHost", ptr, live.origin)),
        Err(Refused::NotLive) => {
            let e = runtime::host_pool_if_started()
                .map(|pool| pool.diagnose(ptr))
                .unwrap_or(Error::UnknownPointer(ptr));
            Err(not_live("cudaFreeHost", ptr, e))
        }
    }
}

/// The free of memory the runtime handed out, whose record `take` just removed: managed memory
/// on the simulated device is freed here; anything else goes back to the caller to forward.
pub(crate) fn free_forwarded(ptr: DevicePtr, live: Live) -> std::result::Result<Freed, FreeError> {
    if live.origin == Origin::CudaMallocManaged && runtime::active() == Active::Sim {
        return match runtime::sim_managed().free(ptr, live.size as usize) {
            Ok(()) => Ok(Freed::Pooled(live.size as usize)),
            Err(e) => {
                restore(ptr, live);
                Err(FreeError::Refused(e))
            }
        };
    }
    Ok(Freed::Forward(live))
}

/// Records memory the runtime's `cudaMallocManaged` (or `cudaHostAlloc` with write-combining,
/// as `origin`) handed out, so the leak report covers it.
pub fn record_forwarded(ptr: DevicePtr, size: usize, device: i32, origin: Origin) {
    track::on_alloc(ptr, size, device, 0, origin);
}

/// `cudaMallocManaged` on the simulated device: `size` (> 0) bytes of host memory, page-aligned,
/// recorded as `Origin::CudaMallocManaged` on device 0.
pub fn alloc_managed_sim(size: usize) -> Result<DevicePtr> {
    let ptr = runtime::sim_managed().alloc(size)?;
    track::on_alloc(ptr, size, 0, 0, Origin::CudaMallocManaged);
    Ok(ptr)
}
