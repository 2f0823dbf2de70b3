//! The tracked paths of pinned host memory (`cudaMallocHost`, `cudaHostAlloc`, `cudaFreeHost`)
//! and of managed memory (`cudaMallocManaged`), beside `crate::alloc`'s device path. Pure Rust;
//! callers at the C boundary own NULL checks, flags, forwarding to the runtime and error codes.
//!
//! Pinned memory is pooled (`pool::pinned`). Managed memory is not: its pages migrate between
//! host and devices by the program's hints (`cudaMemAdvise`, prefetches), and a pooled block would
//! carry one owner's hints over to the next. It is the runtime's own allocation, only recorded
//! here, so that leaks and their call sites cover it; on the simulated device it is host memory.
//!
//! The tracker's record is what says which kind a pointer is: its origin. A `cudaFree` of a pinned
//! block or a `cudaFreeHost` of a device block matches no record of its own kind, and is refused.

use crate::backend::{Backend, DevicePtr, HOST_DEVICE};
use crate::error::{Error, Result};
use crate::runtime;
use crate::track::{self, Origin};

/// The origins of blocks that live in the pinned host pool.
pub const PINNED_ORIGINS: [Origin; 2] = [Origin::CudaMallocHost, Origin::CudaHostAlloc];

/// Allocates `size` (> 0) bytes of pinned host memory from the host pool, page-aligned, and
/// records it as `origin` (one of `PINNED_ORIGINS`) on `HOST_DEVICE`.
#[inline]
pub fn alloc_pinned(size: usize, origin: Origin) -> Result<DevicePtr> {
    debug_assert!(PINNED_ORIGINS.contains(&origin));
    let (ptr, _block) = runtime::host_pool()?.alloc(size)?;
    track::on_alloc(ptr, size, HOST_DEVICE, 0, origin);
    Ok(ptr)
}

/// Frees a block from `alloc_pinned` (stream-safe: see `pool::pinned`). A double free or an
/// interior pointer is an error with one diagnostic; `Err(UnknownPointer)` means the host pool
/// does not know it, and the caller decides (it may be the runtime's, or another kind of ours).
#[inline]
pub fn free_pinned(ptr: DevicePtr) -> Result<()> {
    // The record goes first: once the pool has the block back, another thread may get it.
    match track::forget_block(ptr, &PINNED_ORIGINS) {
        Ok((size, _)) => {
            runtime::host_pool()?.free(ptr, size as usize);
            Ok(())
        }
        Err(bad) => Err(diagnose_pinned(ptr, &bad)),
    }
}

/// Why `ptr` is no live pinned block, with the diagnostic line for a double free or an interior
/// pointer printed; an unknown pointer prints nothing (the caller may still forward it).
#[cold]
fn diagnose_pinned(ptr: DevicePtr, bad: &track::BadFree) -> Error {
    let e = runtime::host_pool_if_started()
        .map(|pool| pool.diagnose(ptr))
        .unwrap_or(Error::UnknownPointer(ptr));
    crate::alloc::report_bad_free("cudaFreeHost", ptr, &e, bad);
    e
}

/// Records memory the runtime's `cudaMallocManaged` (or `cudaHostAlloc` with write-combining,
/// as `origin`) handed out, so the leak report covers it.
pub fn record_forwarded(ptr: DevicePtr, size: usize, device: i32, origin: Origin) {
    track::on_alloc(ptr, size, device, 0, origin);
}

/// Drops the record of a block of `origin` that the caller is about to give back to the runtime;
/// returns its (size, device), or `None` when no such block is live at `ptr`.
pub fn forget_forwarded(ptr: DevicePtr, origin: Origin) -> Option<(usize, i32)> {
    track::forget_block(ptr, &[origin])
        .ok()
        .map(|(size, device)| (size as usize, device))
}

/// `cudaMallocManaged` on the simulated device: `size` (> 0) bytes of host memory, page-aligned,
/// recorded as `Origin::CudaMallocManaged` on device 0.
pub fn alloc_managed_sim(size: usize) -> Result<DevicePtr> {
    let ptr = runtime::sim_managed().alloc(size)?;
    track::on_alloc(ptr, size, 0, 0, Origin::CudaMallocManaged);
    Ok(ptr)
}

/// Frees memory from `alloc_managed_sim` whose record `forget_forwarded` dropped.
pub fn free_managed_sim(ptr: DevicePtr, size: usize) -> Result<()> {
    runtime::sim_managed().free(ptr, size)
}
