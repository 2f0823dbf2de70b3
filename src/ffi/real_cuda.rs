//! The CUDA runtime's own functions, found behind our interposed ones.
//!
//! `dlsym(RTLD_NEXT, …)` finds them when libcudart was loaded globally after us (the usual
//! `LD_PRELOAD` case). It returns NULL when the program opened libcudart `RTLD_LOCAL` (Python
//! extension modules do), so we then ask an already-loaded libcudart directly with
//! `RTLD_NOLOAD`. `dlsym(RTLD_DEFAULT, …)` is never used: it would find this library itself.
//! A function that is not found stays `None` and is never called.

use once_cell::sync::OnceCell;
use std::ffi::{c_int, c_uint, c_void, CStr};

pub type FreeFn = unsafe extern "C" fn(*mut c_void) -> c_int;
pub type FreeAsyncFn = unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int;
pub type ErrorFn = unsafe extern "C" fn() -> c_int;
/// `cudaHostAlloc(void **, size_t, unsigned)` and `cudaMallocManaged`, which has the same shape.
pub type AllocFlagsFn = unsafe extern "C" fn(*mut *mut c_void, usize, c_uint) -> c_int;

/// The runtime functions the hooks may forward to.
#[derive(Default)]
pub struct RealCuda {
    pub free: Option<FreeFn>,
    pub free_async: Option<FreeAsyncFn>,
    pub get_last_error: Option<ErrorFn>,
    pub peek_at_last_error: Option<ErrorFn>,
    pub host_alloc: Option<AllocFlagsFn>,
    pub free_host: Option<FreeFn>,
    pub malloc_managed: Option<AllocFlagsFn>,
}

static REAL: OnceCell<RealCuda> = OnceCell::new();

/// The runtime's functions (each `None` where no libcudart is loaded).
pub fn real() -> &'static RealCuda {
    REAL.get_or_init(|| {
        // SAFETY: each symbol is cast to the prototype the CUDA runtime documents for that name.
        unsafe {
            RealCuda {
                free: lookup(c"cudaFree").map(|p| std::mem::transmute::<*mut c_void, FreeFn>(p)),
                free_async: lookup(c"cudaFreeAsync")
                    .map(|p| std::mem::transmute::<*mut c_void, FreeAsyncFn>(p)),
                get_last_error: lookup(c"cudaGetLastError")
                    .map(|p| std::mem::transmute::<*mut c_void, ErrorFn>(p)),
                peek_at_last_error: lookup(c"cudaPeekAtLastError")
                    .map(|p| std::mem::transmute::<*mut c_void, ErrorFn>(p)),
                host_alloc: lookup(c"cudaHostAlloc")
                    .map(|p| std::mem::transmute::<*mut c_void, AllocFlagsFn>(p)),
                free_host: lookup(c"cudaFreeHost")
                    .map(|p| std::mem::transmute::<*mut c_void, FreeFn>(p)),
                malloc_managed: lookup(c"cudaMallocManaged")
                    .map(|p| std::mem::transmute::<*mut c_void, AllocFlagsFn>(p)),
            }
        }
    })
}

/// Finds `name` in the next library after us, else in an already-loaded libcudart; never in this
/// library.
fn lookup(name: &CStr) -> Option<*mut c_void> {
    let ours = own_symbol(name);
    // SAFETY: dlsym with a valid NUL-terminated name; the result is only compared and returned.
    let next = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    if !next.is_null() && Some(next) != ours {
        return Some(next);
    }
    for lib in [c"libcudart.so.13", c"libcudart.so.12", c"libcudart.so"] {
        // SAFETY: RTLD_NOLOAD only returns a handle to a library that is already loaded; the
        // handle's reference is dropped again below.
        let handle = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_NOLOAD | libc::RTLD_LAZY) };
        if handle.is_null() {
            continue;
        }
        // SAFETY: a valid handle and name.
        let sym = unsafe { libc::dlsym(handle, name.as_ptr()) };
        // SAFETY: balances the dlopen above; the library stays loaded by its other references.
        unsafe { libc::dlclose(handle) };
        if !sym.is_null() && Some(sym) != ours {
            return Some(sym);
        }
    }
    None
}

/// The address of our own definition of `name`, to make sure we never forward to ourselves.
fn own_symbol(name: &CStr) -> Option<*mut c_void> {
    let ours: *mut c_void = match name.to_bytes() {
        b"cudaFree" => super::cuda_api::cudaFree as *mut c_void,
        b"cudaFreeAsync" => super::cuda_api::cudaFreeAsync as *mut c_void,
        b"cudaGetLastError" => super::cuda_api::cudaGetLastError as *mut c_void,
        b"cudaPeekAtLastError" => super::cuda_api::cudaPeekAtLastError as *mut c_void,
        b"cudaHostAlloc" => super::cuda_host_api::cudaHostAlloc as *mut c_void,
        b"cudaFreeHost" => super::cuda_host_api::cudaFreeHost as *mut c_void,
        b"cudaMallocManaged" => super::cuda_host_api::cudaMallocManaged as *mut c_void,
        _ => return None,
    };
    Some(ours)
}
