//! The interposed siblings of `cudaMalloc` for host-visible memory: `cudaMallocHost`,
//! `cudaHostAlloc` and `cudaFreeHost` (pinned host memory, served from the pinned host pool), and
//! `cudaMallocManaged` (the runtime's own memory, recorded for the leak report). `cudaFree` of
//! managed memory is in `cuda_api`.
//!
//! Contract, the runtime's own: NULL out-pointer → `cudaErrorInvalidValue`; size 0 → success
//! and NULL (pinned memory: docs/contract.md; managed memory: what the CUDA 13 runtime
//! returned on an H200, though its documentation says `cudaErrorInvalidValue`); flags the runtime does not define →
//! `cudaErrorInvalidValue`; out of memory → `cudaErrorMemoryAllocation`; `cudaFreeHost(NULL)` → 0;
//! a double free, an interior pointer, a device or managed pointer, a pointer never allocated →
//! `cudaErrorInvalidValue` with one diagnostic, nothing freed. Write-combined pinned memory and
//! pointers hbmalloc never gave out go to the runtime; under `backend:sim` nothing does.

#![allow(non_snake_case)]

use super::cuda_api::{fail, refuse_early, CudaError, HookGuard};
use super::guard::ffi_guard;
use super::real_cuda::real;
use super::status::{cuda_error, to_cuda_error};
use crate::backend::HOST_DEVICE;
use crate::error::Error;
use crate::host_alloc;
use crate::runtime::{self, Active};
use crate::track::{self, Origin};
use std::ffi::{c_uint, c_void};

/// `cudaHostAllocPortable`, `cudaHostAllocMapped`, `cudaHostAllocWriteCombined`
/// (`cudaHostAllocDefault` is 0): every flag `cudaHostAlloc` accepts.
const HOST_ALLOC_FLAGS: c_uint = 0x1 | 0x2 | 0x4;
const HOST_ALLOC_WRITE_COMBINED: c_uint = 0x4;
/// `cudaMemAttachGlobal`, `cudaMemAttachHost`: `cudaMallocManaged` takes exactly one of them.
const MEM_ATTACH_GLOBAL: c_uint = 0x1;
const MEM_ATTACH_HOST: c_uint = 0x2;

/// Shared body of `cudaMallocHost` and `cudaHostAlloc`.
///
/// Every pooled block is portable and mapped (`PinnedHostBackend`), which is all that
/// `cudaHostAllocDefault`, `Portable` and `Mapped` ask for; write-combined memory behaves
/// differently (slow CPU reads), so on CUDA it comes from the runtime itself.
///
/// # Safety
/// `ptr` is NULL or valid for one pointer write.
unsafe fn host_alloc_hook(
    ptr: *mut *mut c_void,
    size: usize,
    flags: c_uint,
    origin: Origin,
) -> CudaError {
    refuse_early!();
    if ptr.is_null() || flags & !HOST_ALLOC_FLAGS != 0 {
        return fail(cuda_error::INVALID_VALUE);
    }
    if size == 0 {
        // SAFETY: checked non-NULL above; the caller promises it is writable.
        unsafe { *ptr = std::ptr::null_mut() };
        return cuda_error::SUCCESS;
    }
    if flags & HOST_ALLOC_WRITE_COMBINED != 0 && runtime::active() == Active::Cuda {
        // SAFETY: forwarded caller contract.
        return unsafe { host_alloc_write_combined(ptr, size, flags) };
    }
    match host_alloc::alloc_pinned(size, origin) {
        Ok(p) => {
            // SAFETY: as above.
            unsafe { *ptr = p as *mut c_void };
            cuda_error::SUCCESS
        }
        Err(e) => fail(to_cuda_error(&e)),
    }
}

/// Write-combined pinned memory, from the runtime's own `cudaHostAlloc`, recorded.
///
/// # Safety
/// `ptr` is valid for one pointer write.
#[cold]
unsafe fn host_alloc_write_combined(
    ptr: *mut *mut c_void,
    size: usize,
    flags: c_uint,
) -> CudaError {
    let Some(real_host_alloc) = real().host_alloc else {
        return fail(cuda_error::INITIALIZATION_ERROR);
    };
    let Some(_guard) = HookGuard::enter() else {
        return fail(cuda_error::UNKNOWN);
    };
    // SAFETY: the runtime's own function, given the caller's arguments unchanged.
    let rc = unsafe { real_host_alloc(ptr, size, flags) };
    if rc == cuda_error::SUCCESS {
        // SAFETY: the runtime wrote the pointer on success.
        let p = unsafe { *ptr } as usize;
        host_alloc::record_forwarded(p, size, HOST_DEVICE, Origin::CudaHostAllocWriteCombined);
    }
    fail(rc)
}

/// Body of `cudaFreeHost`.
fn free_host_hook(ptr: *mut c_void) -> CudaError {
    refuse_early!();
    if ptr.is_null() {
        return cuda_error::SUCCESS;
    }
    match host_alloc::free_pinned(ptr as usize) {
        Ok(()) => cuda_error::SUCCESS,
        Err(Error::UnknownPointer(_)) => free_host_not_pooled(ptr),
        Err(e) => fail(to_cuda_error(&e)),
    }
}

/// A `cudaFreeHost` of a pointer the pinned host pool does not know: write-combined memory (the
/// runtime's, recorded here), another kind of ours (refused: the runtime's cudaFreeHost refuses
/// device and managed memory too), or memory hbmalloc never gave out, which the runtime decides.
#[cold]
fn free_host_not_pooled(ptr: *mut c_void) -> CudaError {
    match track::live_origin(ptr as usize) {
        Some(Origin::CudaHostAllocWriteCombined) => {
            let Some((size, _)) =
                host_alloc::forget_forwarded(ptr as usize, Origin::CudaHostAllocWriteCombined)
            else {
                // Freed by another thread since we looked: this free is the second.
                return fail(cuda_error::INVALID_VALUE);
            };
            let rc = forward_free_host(ptr);
            if rc != cuda_error::SUCCESS {
                // Nothing was freed: the block stays on record.
                host_alloc::record_forwarded(
                    ptr as usize,
                    size,
                    HOST_DEVICE,
                    Origin::CudaHostAllocWriteCombined,
                );
                eprintln!(
                    "hbmalloc: cudaFreeHost({ptr:p}) of write-combined memory: the CUDA runtime \
                     refused (error {rc})"
                );
            }
            fail(rc)
        }
        Some(origin) => {
            let how = match origin {
                Origin::CudaMalloc | Origin::CudaMallocAsync | Origin::CudaMallocManaged => {
                    "; free it with cudaFree"
                }
                _ => "",
            };
            eprintln!(
                "hbmalloc: cudaFreeHost({ptr:p}): a block from {}, not pinned host memory{how}; \
                 nothing freed",
                origin.name()
            );
            fail(cuda_error::INVALID_VALUE)
        }
        None => {
            let rc = forward_free_host(ptr);
            if rc != cuda_error::SUCCESS {
                eprintln!(
                    "hbmalloc: cudaFreeHost({ptr:p}): not a pointer hbmalloc allocated (nor the \
                     CUDA runtime: error {rc}); nothing freed"
                );
            }
            fail(rc)
        }
    }
}

/// The runtime's own `cudaFreeHost`; under `backend:sim`, or with no runtime, invalid value.
fn forward_free_host(ptr: *mut c_void) -> CudaError {
    if runtime::active() == Active::Sim {
        return cuda_error::INVALID_VALUE;
    }
    let (Some(free_host), Some(_guard)) = (real().free_host, HookGuard::enter()) else {
        return cuda_error::INVALID_VALUE;
    };
    // SAFETY: the runtime's own function, given the caller's argument unchanged.
    unsafe { free_host(ptr) }
}

/// Body of `cudaMallocManaged`.
///
/// # Safety
/// `dev_ptr` is NULL or valid for one pointer write.
unsafe fn malloc_managed_hook(dev_ptr: *mut *mut c_void, size: usize, flags: c_uint) -> CudaError {
    refuse_early!();
    if runtime::active() == Active::Cuda {
        // The runtime checks its own arguments; only what it hands out is recorded.
        let Some(real_malloc_managed) = real().malloc_managed else {
            return fail(cuda_error::INITIALIZATION_ERROR);
        };
        let Some(_guard) = HookGuard::enter() else {
            return fail(cuda_error::UNKNOWN);
        };
        // SAFETY: the runtime's own function, given the caller's arguments unchanged.
        let rc = unsafe { real_malloc_managed(dev_ptr, size, flags) };
        if rc == cuda_error::SUCCESS && !dev_ptr.is_null() {
            // SAFETY: the runtime wrote the pointer on success.
            let p = unsafe { *dev_ptr } as usize;
            if p != 0 {
                let device = runtime::current_device();
                host_alloc::record_forwarded(p, size, device, Origin::CudaMallocManaged);
            }
        }
        return fail(rc);
    }
    // The simulated device answers as the runtime does.
    if dev_ptr.is_null() || !matches!(flags, MEM_ATTACH_GLOBAL | MEM_ATTACH_HOST) {
        return fail(cuda_error::INVALID_VALUE);
    }
    if size == 0 {
        // SAFETY: checked non-NULL above; the caller promises it is writable.
        unsafe { *dev_ptr = std::ptr::null_mut() };
        return cuda_error::SUCCESS;
    }
    match host_alloc::alloc_managed_sim(size) {
        Ok(p) => {
            // SAFETY: checked non-NULL above; the caller promises it is writable.
            unsafe { *dev_ptr = p as *mut c_void };
            cuda_error::SUCCESS
        }
        Err(e) => fail(to_cuda_error(&e)),
    }
}

/// `cudaMallocHost`: page-locked host memory from the pinned host pool, page-aligned.
///
/// # Safety
/// `ptr` is NULL or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn cudaMallocHost(ptr: *mut *mut c_void, size: usize) -> CudaError {
    // SAFETY: forwarded caller contract.
    ffi_guard!(fail(cuda_error::UNKNOWN), unsafe {
        host_alloc_hook(ptr, size, 0, Origin::CudaMallocHost)
    })
}

/// `cudaHostAlloc`: as `cudaMallocHost` for `cudaHostAllocDefault`, `Portable` and `Mapped`;
/// write-combined memory comes from the runtime (on CUDA).
///
/// # Safety
/// `p_host` is NULL or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn cudaHostAlloc(
    p_host: *mut *mut c_void,
    size: usize,
    flags: c_uint,
) -> CudaError {
    // SAFETY: forwarded caller contract.
    ffi_guard!(fail(cuda_error::UNKNOWN), unsafe {
        host_alloc_hook(p_host, size, flags, Origin::CudaHostAlloc)
    })
}

/// `cudaFreeHost`: returns a block to the pinned host pool (stream-safe, see `pool::pinned`).
///
/// # Safety
/// `ptr` is any value; it is only compared, never dereferenced.
#[no_mangle]
pub unsafe extern "C" fn cudaFreeHost(ptr: *mut c_void) -> CudaError {
    ffi_guard!(fail(cuda_error::UNKNOWN), free_host_hook(ptr))
}

/// `cudaMallocManaged`: the runtime's managed memory, recorded with its call site (host memory
/// on the simulated device). Freed by `cudaFree`.
///
/// # Safety
/// `dev_ptr` is NULL or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn cudaMallocManaged(
    dev_ptr: *mut *mut c_void,
    size: usize,
    flags: c_uint,
) -> CudaError {
    // SAFETY: forwarded caller contract.
    ffi_guard!(fail(cuda_error::UNKNOWN), unsafe {
        malloc_managed_hook(dev_ptr, size, flags)
    })
}
