//! The interposed CUDA runtime entry points. `LD_PRELOAD=libhbmalloc.so app` binds the
//! application's `cudaMalloc@libcudart.so.N` references to these unversioned definitions.
//!
//! Contract: the CUDA runtime's own, for every input (see docs/contract.md): NULL out-pointer →
//! `cudaErrorInvalidValue`; size 0 → success and NULL; a bad free → `cudaErrorInvalidValue` plus
//! one diagnostic line; out of memory → `cudaErrorMemoryAllocation`, which `cudaGetLastError`
//! then reports too; a panic → `cudaErrorUnknown`. Managed memory (`cuda_host_api`) goes back
//! to the runtime; pinned host memory and other hbmalloc blocks are refused; pointers hbmalloc
//! never gave out go to the real `cudaFree`. Under `backend:sim` nothing here reaches the real
//! runtime.
//!
//! These symbols are excluded from the generated header (cbindgen.toml) so that it can be
//! included beside `cuda_runtime.h`.

#![allow(non_snake_case)]

use super::guard::ffi_guard;
use super::real_cuda::real;
use super::runtime_state;
use super::status::{cuda_error, to_cuda_error};
use crate::runtime::{self, Active};
use crate::track;
use crate::tracked::device::{self as device_alloc, Api};
use crate::tracked::{self, FreeError, Freed};
use std::cell::Cell;
use std::ffi::{c_int, c_void};

/// `cudaError_t`.
pub type CudaError = c_int;
/// `cudaStream_t`.
pub type CudaStream = *mut c_void;

thread_local! {
    /// The error our hooks last returned on this thread, as `cudaGetLastError` must report it.
    /// `const` and `Copy`: no destructor runs at thread or process exit.
    static LAST_ERROR: Cell<c_int> = const { Cell::new(0) };
    /// Set while a hook forwards to the runtime, so that a call coming back into a hook from
    /// inside the runtime is not forwarded again.
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// Records `code` as this thread's last error (successes do not clear it, as in the runtime).
/// A sticky error (an illegal address, say) is remembered: the runtime refuses every later call
/// on the device with it, and so do our hooks (`runtime_state`).
pub(super) fn fail(code: CudaError) -> CudaError {
    if code != cuda_error::SUCCESS {
        LAST_ERROR.with(|e| e.set(code));
        runtime_state::note_error(code);
    }
    code
}

/// The runtime's answer before it looks at the arguments (no device, a sticky error), if any.
macro_rules! refuse_early {
    () => {
        if let Some(code) = $crate::ffi::runtime_state::refusal() {
            return $crate::ffi::cuda_api::fail(code);
        }
    };
}
pub(super) use refuse_early;

/// Marks this thread as forwarding to the runtime for the guard's lifetime.
pub(super) struct HookGuard;

impl HookGuard {
    /// `None` when this thread is already forwarding.
    pub(super) fn enter() -> Option<HookGuard> {
        IN_HOOK.with(|h| (!h.replace(true)).then_some(HookGuard))
    }
}

impl Drop for HookGuard {
    fn drop(&mut self) {
        IN_HOOK.with(|h| h.set(false));
    }
}

/// Shared body of `cudaMalloc` and `cudaMallocAsync`.
///
/// # Safety
/// `dev_ptr` is NULL or valid for one pointer write.
unsafe fn malloc_hook(dev_ptr: *mut *mut c_void, size: usize, stream: Option<usize>) -> CudaError {
    refuse_early!();
    if dev_ptr.is_null() {
        return fail(cuda_error::INVALID_VALUE);
    }
    if size == 0 {
        // SAFETY: checked non-NULL above; the caller promises it is writable.
        unsafe { *dev_ptr = std::ptr::null_mut() };
        return cuda_error::SUCCESS;
    }
    match device_alloc::alloc(runtime::current_device(), size, stream, Api::Runtime) {
        Ok(ptr) => {
            // SAFETY: as above.
            unsafe { *dev_ptr = ptr as *mut c_void };
            cuda_error::SUCCESS
        }
        Err(e) => fail(to_cuda_error(&e)),
    }
}

/// Gives `ptr` to the runtime's own `cudaFree` (or `cudaFreeAsync` on `stream`); under
/// `backend:sim`, or with no runtime to ask, the answer is `cudaErrorInvalidValue`.
fn forward_free(ptr: *mut c_void, stream: Option<usize>) -> CudaError {
    if runtime::active() == Active::Sim {
        return cuda_error::INVALID_VALUE;
    }
    // Should the runtime's cudaFree call cudaFree again, the inner call must not forward
    // a second time: that would recurse without end.
    let Some(_guard) = HookGuard::enter() else {
        return cuda_error::INVALID_VALUE;
    };
    // SAFETY: the runtime's own functions, given the caller's arguments unchanged.
    match (stream, real().free, real().free_async) {
        (None, Some(free), _) => unsafe { free(ptr) },
        (Some(s), _, Some(free_async)) => unsafe { free_async(ptr, s as CudaStream) },
        _ => cuda_error::INVALID_VALUE,
    }
}

/// Shared body of `cudaFree` and `cudaFreeAsync`.
fn free_hook(ptr: *mut c_void, stream: Option<usize>) -> CudaError {
    refuse_early!();
    if ptr.is_null() {
        // cudaFree(NULL) is how programs initialise the runtime: let the runtime see it.
        return match runtime::active() {
            Active::Sim => cuda_error::SUCCESS,
            Active::Cuda if stream.is_none() => forward_free(ptr, stream),
            Active::Cuda => cuda_error::SUCCESS,
        };
    }
    match device_alloc::free(ptr as usize, stream, Api::Runtime) {
        Ok(Freed::Pooled(_)) => cuda_error::SUCCESS,
        Ok(Freed::Forward(live)) => free_managed(ptr, stream, live),
        Err(FreeError::Unknown(_)) => free_not_ours(ptr, stream),
        Err(FreeError::WrongKind(_)) => fail(cuda_error::INVALID_VALUE),
        Err(FreeError::Refused(e)) => fail(to_cuda_error(&e)),
    }
}

/// A `cudaFree` of a pointer hbmalloc never gave out, which may still be the runtime's
/// (allocated before we were loaded, or by a call we do not interpose): the runtime decides,
/// and only its refusal is worth a line.
#[cold]
fn free_not_ours(ptr: *mut c_void, stream: Option<usize>) -> CudaError {
    let rc = forward_free(ptr, stream);
    if rc != cuda_error::SUCCESS {
        tracked::reject_unknown(ptr as usize);
        eprintln!(
            "hbmalloc: cudaFree({ptr:p}): not a pointer hbmalloc allocated (nor the CUDA \
             runtime: error {rc}); nothing freed"
        );
    }
    fail(rc)
}

/// Gives memory the runtime handed out (managed, or from a pool of its own), whose record
/// `tracked::device::free` removed, back to the runtime; if the runtime
/// refuses, nothing was freed and the record goes back as it was.
#[cold]
fn free_managed(ptr: *mut c_void, stream: Option<usize>, live: track::Live) -> CudaError {
    let rc = forward_free(ptr, stream);
    if rc != cuda_error::SUCCESS {
        tracked::restore(ptr as usize, live);
        eprintln!(
            "hbmalloc: cudaFree({ptr:p}) of {} memory: the CUDA runtime refused (error {rc})",
            live.origin.name()
        );
    }
    fail(rc)
}

/// `cudaMalloc`: allocates from the current device's caching pool.
///
/// # Safety
/// `dev_ptr` is NULL or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn cudaMalloc(dev_ptr: *mut *mut c_void, size: usize) -> CudaError {
    // SAFETY: forwarded caller contract.
    ffi_guard!(fail(cuda_error::UNKNOWN), unsafe {
        malloc_hook(dev_ptr, size, None)
    })
}

/// `cudaFree`: returns a block to its pool (stream-safe, see `pool::caching`).
///
/// # Safety
/// `dev_ptr` is any value; it is only compared, never dereferenced.
#[no_mangle]
pub unsafe extern "C" fn cudaFree(dev_ptr: *mut c_void) -> CudaError {
    ffi_guard!(fail(cuda_error::UNKNOWN), free_hook(dev_ptr, None))
}

/// `cudaMallocAsync`: allocates, reusing blocks freed on the same stream at once.
///
/// # Safety
/// `dev_ptr` is NULL or valid for one pointer write; `stream` is a stream handle or NULL.
#[no_mangle]
pub unsafe extern "C" fn cudaMallocAsync(
    dev_ptr: *mut *mut c_void,
    size: usize,
    stream: CudaStream,
) -> CudaError {
    // SAFETY: forwarded caller contract.
    ffi_guard!(fail(cuda_error::UNKNOWN), unsafe {
        malloc_hook(dev_ptr, size, Some(stream as usize))
    })
}

/// `cudaFreeAsync`: the block becomes reusable on `stream` at once, elsewhere once the stream
/// has passed the free.
///
/// # Safety
/// `dev_ptr` is any value (never dereferenced); `stream` is a stream handle or NULL.
#[no_mangle]
pub unsafe extern "C" fn cudaFreeAsync(dev_ptr: *mut c_void, stream: CudaStream) -> CudaError {
    ffi_guard!(
        fail(cuda_error::UNKNOWN),
        free_hook(dev_ptr, Some(stream as usize))
    )
}

/// `cudaMallocAsync` as a program built with `--default-stream per-thread` calls it.
///
/// # Safety
/// As `cudaMallocAsync`.
#[no_mangle]
pub unsafe extern "C" fn cudaMallocAsync_ptsz(
    dev_ptr: *mut *mut c_void,
    size: usize,
    stream: CudaStream,
) -> CudaError {
    // SAFETY: forwarded caller contract.
    unsafe { cudaMallocAsync(dev_ptr, size, stream) }
}

/// `cudaFreeAsync` as a program built with `--default-stream per-thread` calls it.
///
/// # Safety
/// As `cudaFreeAsync`.
#[no_mangle]
pub unsafe extern "C" fn cudaFreeAsync_ptsz(dev_ptr: *mut c_void, stream: CudaStream) -> CudaError {
    // SAFETY: forwarded caller contract.
    unsafe { cudaFreeAsync(dev_ptr, stream) }
}

/// `cudaMemGetInfo`: the device's free memory plus what this process's pools hold cached and
/// unused, so programs that size themselves from it see what they can really allocate. Under
/// `limit:` the device's backend answers with the limit as the total and what the limit leaves
/// as its free memory (`backend::limit::Limited::mem_info`), so the same sum keeps within it.
///
/// # Safety
/// `free` and `total` are NULL or valid for one write each.
#[no_mangle]
pub unsafe extern "C" fn cudaMemGetInfo(free: *mut usize, total: *mut usize) -> CudaError {
    ffi_guard!(fail(cuda_error::UNKNOWN), {
        refuse_early!();
        if free.is_null() || total.is_null() {
            return fail(cuda_error::INVALID_VALUE);
        }
        let device = runtime::current_device();
        let info = runtime::pool(device).and_then(|pool| {
            let (f, t) = pool.backend().mem_info()?;
            let s = pool.stats();
            Ok((f + s.reserved.saturating_sub(s.in_use) as usize, t))
        });
        match info {
            Ok((f, t)) => {
                // SAFETY: both checked non-NULL; the caller promises they are writable.
                unsafe {
                    *free = f.min(t);
                    *total = t;
                }
                cuda_error::SUCCESS
            }
            Err(e) => fail(to_cuda_error(&e)),
        }
    })
}

/// `cudaGetLastError`: our hooks' last error on this thread if any, else the runtime's; both
/// are reset.
#[no_mangle]
pub extern "C" fn cudaGetLastError() -> CudaError {
    ffi_guard!(cuda_error::UNKNOWN, {
        let ours = LAST_ERROR.with(|e| e.replace(cuda_error::SUCCESS));
        let theirs = match (runtime::active(), real().get_last_error) {
            // SAFETY: the runtime's own function, no arguments.
            (Active::Cuda, Some(f)) => unsafe { f() },
            _ => cuda_error::SUCCESS,
        };
        if ours != cuda_error::SUCCESS {
            ours
        } else {
            theirs
        }
    })
}

/// `cudaPeekAtLastError`: as `cudaGetLastError`, without resetting anything.
#[no_mangle]
pub extern "C" fn cudaPeekAtLastError() -> CudaError {
    ffi_guard!(cuda_error::UNKNOWN, {
        let ours = LAST_ERROR.with(|e| e.get());
        if ours != cuda_error::SUCCESS {
            return ours;
        }
        match (runtime::active(), real().peek_at_last_error) {
            // SAFETY: the runtime's own function, no arguments.
            (Active::Cuda, Some(f)) => unsafe { f() },
            _ => cuda_error::SUCCESS,
        }
    })
}
