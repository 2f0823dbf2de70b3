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
use crate::runtime::{self, Active};
use crate::track::Origin;
use crate::tracked::host as host_alloc;
use crate::tracked::{self, FreeError, Freed};
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
    match host_alloc::free_host(ptr as usize) {
        Ok(Freed::Pooled(_)) => cuda_error::SUCCESS,
        Ok(Freed::Forward(live)) => {
            // Write-combined memory: the runtime's. If it refuses, nothing was freed and the
            // record goes back as it was.
            let rc = forward_free_host(ptr);
            if rc != cuda_error::SUCCESS {
                tracked::restore(ptr as usize, live);
                eprintln!(
                    "hbmalloc: cudaFreeHost({ptr:p}) of write-combined memory: the CUDA runtime \
                     refused (error {rc})"
                );
            }
            fail(rc)
        }
        Err(FreeError::Unknown(_)) => {
            // Never ours: the runtime decides (its refusal is worth a line).
            let rc = forward_free_host(ptr);
            if rc != cuda_error::SUCCESS {
                tracked::reject_unknown(ptr as usize);
                eprintln!(
                    "hbmalloc: cudaFreeHost({ptr:p}): not a pointer hbmalloc allocated (nor the \
                     CUDA runtime: error {rc}); nothing freed"
                );
            }
            fail(rc)
        }
        Err(FreeError::WrongKind(_)) => fail(cuda_error::INVALID_VALUE),
        Err(FreeError::Refused(e)) => fail(to_cuda_error(&e)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::cuda_api::cudaFree;

    /// Issue 18, defect 2: a valid `cudaFree` of managed memory is no rejected free (it took the
    /// bad-free path: counted, and a scan of the whole live table). In a child process: the
    /// global tracker's count is shared by every test of this binary.
    #[test]
    fn managed_frees_are_not_bad_frees() {
        if crate::test_child::is_child() {
            return managed_frees_child();
        }
        let out = crate::test_child::run(
            "ffi::cuda_host_api::tests::managed_frees_are_not_bad_frees",
            Some("backend:sim,leak_report:off"),
        );
        assert!(out.contains("1 passed"), "the child ran no test: {out}");
    }

    fn managed_frees_child() {
        let before = crate::track::global().bad_free_count();
        for size in [1usize, 4096, 1 << 20] {
            let mut p = std::ptr::null_mut();
            // SAFETY: a local to write; the pointer freed is the one just allocated.
            unsafe {
                assert_eq!(cudaMallocManaged(&mut p, size, MEM_ATTACH_GLOBAL), 0);
                assert_eq!(cudaFree(p), 0);
                assert_eq!(cudaFree(p), cuda_error::INVALID_VALUE, "a double free");
            }
        }
        // The three double frees are rejected; the three valid frees are not.
        assert_eq!(crate::track::global().bad_free_count(), before + 3);

        // Write-combined memory (the runtime's on CUDA): its record is taken at once and handed
        // back to forward, no rejection counted. An address no allocation of this test uses.
        let wc = 0x7e57_0000_0000;
        host_alloc::record_forwarded(wc, 4096, HOST_DEVICE, Origin::CudaHostAllocWriteCombined);
        match host_alloc::free_host(wc) {
            Ok(Freed::Forward(live)) => {
                assert_eq!(live.origin, Origin::CudaHostAllocWriteCombined)
            }
            other => panic!("write-combined free: {other:?}"),
        }
        // A pointer hbmalloc never gave out, which the runtime may own: nothing counted until
        // the runtime refuses it too.
        let theirs = 0x7e57_0001_0000;
        assert!(matches!(
            crate::tracked::device::free(theirs, None, crate::tracked::device::Api::Runtime),
            Err(FreeError::Unknown(_))
        ));
        assert_eq!(crate::track::global().bad_free_count(), before + 3);
    }
}
