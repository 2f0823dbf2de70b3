//! The driver API's `cuMemAlloc_v2` and `cuMemFree_v2` (what `cuMemAlloc` and `cuMemFree` are
//! under `cuda.h`), for programs that link libcuda directly. Allocations are served by the
//! caching pool, as `cudaMalloc` is, and recorded as `cuMemAlloc`; `cuMemFree_v2` and `cudaFree`
//! free either kind of block, as the driver's own do.
//!
//! Contract, the driver's: NULL `dptr` or a size of 0 → `CUDA_ERROR_INVALID_VALUE` (1); a size
//! the device cannot supply → `CUDA_ERROR_OUT_OF_MEMORY` (2); a double free, an interior
//! pointer → 1 with one diagnostic line. `CUresult` and `cudaError_t` share these numbers, so
//! the pool's errors map through `to_cuda_error`. There is no last error in the driver API:
//! nothing here touches `cudaGetLastError`'s state (sticky errors excepted: they poison the
//! device for every later call, as in the driver).
//!
//! When the pool cannot serve, the call goes to the real driver unchanged:
//! - pool memory lives in each device's *primary* context, so an allocation made while another
//!   context is current (one the program made with `cuCtxCreate`), or none, goes to the driver,
//!   which allocates in that context (or answers `CUDA_ERROR_INVALID_CONTEXT`);
//! - a pointer hbmalloc never gave out goes to the real `cuMemFree_v2`, which decides;
//! - with `backend:auto` and no usable device, the driver answers for itself
//!   (`CUDA_ERROR_NOT_INITIALIZED` when no libcuda is loaded at all).
//!
//! hbmalloc's own CUDA backend never reaches these exports: cudarc opens libcuda with `dlopen`
//! and finds each function with `dlsym` on that handle, which searches only libcuda and its
//! dependencies, never the preloaded library (the search that `LD_PRELOAD` wins is the global
//! one that symbol binding uses). `c_tests/interpose_dropin.c` checks the same rule on libcudart:
//! `dlsym` on its handle finds libcudart's `cudaMalloc`, not ours. Should a driver ever bind
//! back to us, `IN_DRIVER_HOOK` sends the inner call to the real driver instead of recursing.

#![allow(non_snake_case)]

use super::guard::ffi_guard;
use super::real_cuda::driver;
use super::runtime_state;
use super::status::{cuda_error, to_cuda_error};
use crate::runtime::{self, Active};
use crate::tracked::device::{self as device_alloc, Api};
use crate::tracked::{self, FreeError, Freed};
use std::cell::Cell;
use std::ffi::c_int;

/// `CUresult`.
pub type CuResult = c_int;
/// `CUdeviceptr`.
pub type CuDevicePtr = u64;

/// `CUDA_ERROR_NOT_INITIALIZED`: what a driver call answers when no driver could be loaded.
pub const CUDA_ERROR_NOT_INITIALIZED: CuResult = 3;

thread_local! {
    /// Set while a driver hook runs: a call coming back into one from below is forwarded.
    static IN_DRIVER_HOOK: Cell<bool> = const { Cell::new(false) };
}

struct DriverHook;

impl DriverHook {
    fn enter() -> Option<DriverHook> {
        IN_DRIVER_HOOK.with(|h| (!h.replace(true)).then_some(DriverHook))
    }
}

impl Drop for DriverHook {
    fn drop(&mut self) {
        IN_DRIVER_HOOK.with(|h| h.set(false));
    }
}

/// Remembers a sticky error, as the runtime hooks' `fail` does, without a last error.
fn answer(code: CuResult) -> CuResult {
    runtime_state::note_error(code);
    code
}

/// The real `cuMemAlloc_v2`; `CUDA_ERROR_NOT_INITIALIZED` on the simulated device or when no
/// libcuda is loaded.
fn forward_alloc(dptr: *mut CuDevicePtr, size: usize) -> CuResult {
    match (runtime::active(), driver().mem_alloc) {
        // SAFETY: the driver's own function, given the caller's arguments unchanged.
        (Active::Cuda, Some(alloc)) => unsafe { alloc(dptr, size) },
        _ => CUDA_ERROR_NOT_INITIALIZED,
    }
}

/// The real `cuMemFree_v2`; `CUDA_ERROR_INVALID_VALUE` on the simulated device (it knows no other
/// memory), `CUDA_ERROR_NOT_INITIALIZED` when no libcuda is loaded.
fn forward_free(ptr: CuDevicePtr) -> CuResult {
    match (runtime::active(), driver().mem_free) {
        (Active::Sim, _) => cuda_error::INVALID_VALUE,
        // SAFETY: the driver's own function, given the caller's argument unchanged.
        (Active::Cuda, Some(free)) => unsafe { free(ptr) },
        (Active::Cuda, None) => CUDA_ERROR_NOT_INITIALIZED,
    }
}

/// Body of `cuMemAlloc_v2`.
///
/// # Safety
/// `dptr` is NULL or valid for one write.
unsafe fn mem_alloc_hook(dptr: *mut CuDevicePtr, size: usize) -> CuResult {
    if runtime::auto_fell_back() {
        return forward_alloc(dptr, size);
    }
    if let Some(code) = runtime_state::refusal() {
        return code;
    }
    let Some(_hook) = DriverHook::enter() else {
        return forward_alloc(dptr, size);
    };
    if dptr.is_null() || size == 0 {
        return cuda_error::INVALID_VALUE;
    }
    let device = match runtime::current_primary_device() {
        Ok(Some(device)) => device,
        Ok(None) => return forward_alloc(dptr, size),
        Err(e) => return answer(to_cuda_error(&e)),
    };
    match device_alloc::alloc(device, size, None, Api::Driver) {
        Ok(ptr) => {
            // SAFETY: checked non-NULL; the caller promises it is writable.
            unsafe { *dptr = ptr as CuDevicePtr };
            cuda_error::SUCCESS
        }
        Err(e) => answer(to_cuda_error(&e)),
    }
}

/// Body of `cuMemFree_v2`.
fn mem_free_hook(ptr: CuDevicePtr) -> CuResult {
    if runtime::auto_fell_back() {
        return forward_free(ptr);
    }
    if let Some(code) = runtime_state::refusal() {
        return code;
    }
    let Some(_hook) = DriverHook::enter() else {
        return forward_free(ptr);
    };
    if ptr == 0 {
        // The driver's to answer on a real device (as `cudaFree(NULL)` is the runtime's).
        return match runtime::active() {
            Active::Sim => cuda_error::SUCCESS,
            Active::Cuda => forward_free(ptr),
        };
    }
    match device_alloc::free(ptr as usize, None, Api::Driver) {
        Ok(Freed::Pooled(_)) => cuda_error::SUCCESS,
        Ok(Freed::Forward(live)) => {
            // Memory the runtime handed out (managed, from its pools): the driver frees it.
            let rc = forward_free(ptr);
            if rc != cuda_error::SUCCESS {
                tracked::restore(ptr as usize, live);
                eprintln!(
                    "hbmalloc: cuMemFree({ptr:#x}) of {} memory: the CUDA driver refused (error {rc})",
                    live.origin.name()
                );
            }
            answer(rc)
        }
        Err(FreeError::Unknown(_)) => {
            let rc = forward_free(ptr);
            if rc != cuda_error::SUCCESS {
                tracked::reject_unknown(ptr as usize);
                eprintln!(
                    "hbmalloc: cuMemFree({ptr:#x}): not a pointer hbmalloc allocated (nor the CUDA \
                     driver: error {rc}); nothing freed"
                );
            }
            answer(rc)
        }
        Err(FreeError::WrongKind(_)) => cuda_error::INVALID_VALUE,
        Err(FreeError::Refused(e)) => answer(to_cuda_error(&e)),
    }
}

/// `cuMemAlloc_v2`: `bytesize` bytes from the caching pool of the current primary context's
/// device; forwarded to the driver in any other context.
///
/// # Safety
/// `dptr` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(dptr: *mut CuDevicePtr, bytesize: usize) -> CuResult {
    // SAFETY: forwarded caller contract.
    ffi_guard!(cuda_error::UNKNOWN, unsafe {
        mem_alloc_hook(dptr, bytesize)
    })
}

/// `cuMemFree_v2`: returns a block to its pool (stream-safe, as `cudaFree`); any pointer
/// hbmalloc did not hand out goes to the driver.
///
/// # Safety
/// `dptr` is any value; it is only compared, never dereferenced.
#[no_mangle]
pub unsafe extern "C" fn cuMemFree_v2(dptr: CuDevicePtr) -> CuResult {
    ffi_guard!(cuda_error::UNKNOWN, mem_free_hook(dptr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::cuda_api::{cudaFree, cudaGetLastError, cudaMalloc};
    use crate::test_child::{self, is_child};
    use crate::track::Origin;

    #[test]
    fn driver_calls_on_the_simulated_device() {
        let out = test_child::run(
            "ffi::driver_api::tests::child_driver",
            Some("backend:sim,sim_capacity:1GiB,leak_report:off"),
        );
        assert!(out.contains("child checks passed"), "{out}");
    }

    #[test]
    fn child_driver() {
        if !is_child() {
            return;
        }
        let tracker = crate::track::global();
        let pool = runtime::pool(0).unwrap();
        let mut d: CuDevicePtr = 0;
        // SAFETY: locals as out-parameters; pointers freed are the ones allocated.
        unsafe {
            let before = pool.stats().in_use;
            assert_eq!(cuMemAlloc_v2(&mut d, 1000), 0);
            assert!(d != 0 && d % 512 == 0);
            assert!(pool.stats().in_use > before, "the pool served it");
            assert_eq!(
                tracker.get(d as usize).map(|l| l.origin),
                Some(Origin::CuMemAlloc)
            );
            std::ptr::write_bytes(d as *mut u8, 1, 1000);
            assert_eq!(cuMemFree_v2(d), 0);
            assert_eq!(cuMemFree_v2(d), 1, "double free");
            // Bad input: CUDA_ERROR_INVALID_VALUE, and no last error for the runtime API.
            let mut e: CuDevicePtr = 7;
            assert_eq!(cuMemAlloc_v2(std::ptr::null_mut(), 16), 1);
            assert_eq!(cuMemAlloc_v2(&mut e, 0), 1);
            assert_eq!(e, 7, "untouched");
            assert_eq!(
                cuMemAlloc_v2(&mut e, usize::MAX),
                2,
                "CUDA_ERROR_OUT_OF_MEMORY"
            );
            assert_eq!(cuMemAlloc_v2(&mut e, 2 << 30), 2, "more than the device");
            assert_eq!(e, 7);
            assert_eq!(
                cudaGetLastError(),
                0,
                "the driver API sets no runtime error"
            );
            assert_eq!(cuMemFree_v2(0), 0);
            assert_eq!(cuMemFree_v2(0x1000), 1, "never allocated");
            // Interior pointer.
            assert_eq!(cuMemAlloc_v2(&mut d, 4096), 0);
            assert_eq!(cuMemFree_v2(d + 64), 1);
            assert!(tracker.get(d as usize).is_some(), "nothing freed");
            // cudaFree frees cuMemAlloc memory, cuMemFree frees cudaMalloc memory.
            assert_eq!(cudaFree(d as *mut _), 0);
            let mut p = std::ptr::null_mut();
            assert_eq!(cudaMalloc(&mut p, 4096), 0);
            assert_eq!(cuMemFree_v2(p as CuDevicePtr), 0);
            // Pinned host memory is no cuMemAlloc block.
            let mut h = std::ptr::null_mut();
            assert_eq!(crate::ffi::cuda_host_api::cudaMallocHost(&mut h, 4096), 0);
            assert_eq!(cuMemFree_v2(h as CuDevicePtr), 1);
            assert_eq!(crate::ffi::cuda_host_api::cudaFreeHost(h), 0);
            // A call coming back in from below goes to the driver (none here), not the pool.
            let _inside = DriverHook::enter().unwrap();
            assert_eq!(cuMemAlloc_v2(&mut e, 4096), CUDA_ERROR_NOT_INITIALIZED);
            assert_eq!(cuMemFree_v2(0x1000), 1);
        }
        println!("child checks passed");
    }
}
