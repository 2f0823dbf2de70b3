//! The CUDA runtime's own functions, found behind our interposed ones.
//!
//! `dlsym(RTLD_NEXT, …)` finds them when libcudart was loaded globally after us (the usual
//! `LD_PRELOAD` case). It returns NULL when the program opened libcudart `RTLD_LOCAL` (Python
//! extension modules do), so we then ask an already-loaded libcudart directly with
//! `RTLD_NOLOAD`. `dlsym(RTLD_DEFAULT, …)` is never used: it would find this library itself.
//! A function that is not found stays `None` and is never called. The driver's functions
//! (`driver`) are found the same way, in an already-loaded `libcuda.so.1`.

use crate::process::init::InitCell;
use std::ffi::{c_int, c_uint, c_void, CStr};

pub type FreeFn = unsafe extern "C" fn(*mut c_void) -> c_int;
pub type FreeAsyncFn = unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int;
pub type ErrorFn = unsafe extern "C" fn() -> c_int;
/// `cudaHostAlloc(void **, size_t, unsigned)` and `cudaMallocManaged`, which has the same shape.
pub type AllocFlagsFn = unsafe extern "C" fn(*mut *mut c_void, usize, c_uint) -> c_int;

/// `cudaMallocArray(cudaArray_t *, const cudaChannelFormatDesc *, size_t, size_t, unsigned)`.
pub type MallocArrayFn =
    unsafe extern "C" fn(*mut *mut c_void, *const c_void, usize, usize, c_uint) -> c_int;
/// `cudaMalloc3DArray(cudaArray_t *, const cudaChannelFormatDesc *, cudaExtent, unsigned)`.
pub type Malloc3DArrayFn =
    unsafe extern "C" fn(*mut *mut c_void, *const c_void, Extent, c_uint) -> c_int;
/// `cudaMallocFromPoolAsync(void **, size_t, cudaMemPool_t, cudaStream_t)`.
pub type MallocFromPoolAsyncFn =
    unsafe extern "C" fn(*mut *mut c_void, usize, *mut c_void, *mut c_void) -> c_int;
/// `cudaMemPoolImportPointer(void **, cudaMemPool_t, cudaMemPoolPtrExportData *)`.
pub type MemPoolImportPointerFn =
    unsafe extern "C" fn(*mut *mut c_void, *mut c_void, *mut c_void) -> c_int;
/// `cudaHostRegister(void *, size_t, unsigned)`.
pub type HostRegisterFn = unsafe extern "C" fn(*mut c_void, usize, c_uint) -> c_int;
/// `cuMemAlloc_v2(CUdeviceptr *, size_t)`.
pub type CuMemAllocFn = unsafe extern "C" fn(*mut u64, usize) -> c_int;
/// `cuMemFree_v2(CUdeviceptr)`.
pub type CuMemFreeFn = unsafe extern "C" fn(u64) -> c_int;

/// `cudaExtent`: width (bytes for linear memory, elements for arrays), height, depth.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub width: usize,
    pub height: usize,
    pub depth: usize,
}

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
    pub malloc_array: Option<MallocArrayFn>,
    pub malloc_3d_array: Option<Malloc3DArrayFn>,
    pub free_array: Option<FreeFn>,
    pub malloc_from_pool_async: Option<MallocFromPoolAsyncFn>,
    pub mem_pool_import_pointer: Option<MemPoolImportPointerFn>,
    pub host_register: Option<HostRegisterFn>,
    pub host_unregister: Option<FreeFn>,
}

/// The driver functions the driver-API hooks forward to.
#[derive(Default)]
pub struct RealDriver {
    pub mem_alloc: Option<CuMemAllocFn>,
    pub mem_free: Option<CuMemFreeFn>,
}

static REAL: InitCell<RealCuda> = InitCell::new("ffi::real_cuda");
static DRIVER: InitCell<RealDriver> = InitCell::new("ffi::real_driver");

const RUNTIME_LIBS: [&CStr; 3] = [c"libcudart.so.13", c"libcudart.so.12", c"libcudart.so"];
const DRIVER_LIBS: [&CStr; 2] = [c"libcuda.so.1", c"libcuda.so"];

/// Looks `name` up in the runtime and casts it to `F`, the prototype the runtime documents.
///
/// # Safety
/// `F` is a function pointer type matching `name`'s documented prototype.
unsafe fn runtime_fn<F: Copy>(name: &CStr) -> Option<F> {
    debug_assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: the caller promises `F` is `name`'s prototype, a function pointer.
    lookup(name, &RUNTIME_LIBS).map(|p| unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
}

/// The driver's own functions (each `None` where no libcuda is loaded). Found like the
/// runtime's: after us in the global scope (a program linked against libcuda), else in an
/// already-loaded libcuda (opened `RTLD_LOCAL`, as hbmalloc's own backend opens it).
pub fn driver() -> &'static RealDriver {
    DRIVER.get_or_init(|| {
        // SAFETY: each symbol is cast to the prototype the driver API documents for that name.
        unsafe {
            RealDriver {
                mem_alloc: lookup(c"cuMemAlloc_v2", &DRIVER_LIBS)
                    .map(|p| std::mem::transmute::<*mut c_void, CuMemAllocFn>(p)),
                mem_free: lookup(c"cuMemFree_v2", &DRIVER_LIBS)
                    .map(|p| std::mem::transmute::<*mut c_void, CuMemFreeFn>(p)),
            }
        }
    })
}

/// The runtime's functions (each `None` where no libcudart is loaded).
pub fn real() -> &'static RealCuda {
    REAL.get_or_init(|| {
        // SAFETY: each symbol is cast to the prototype the CUDA runtime documents for that name.
        unsafe {
            RealCuda {
                free: lookup(c"cudaFree", &RUNTIME_LIBS)
                    .map(|p| std::mem::transmute::<*mut c_void, FreeFn>(p)),
                free_async: lookup(c"cudaFreeAsync", &RUNTIME_LIBS)
                    .map(|p| std::mem::transmute::<*mut c_void, FreeAsyncFn>(p)),
                get_last_error: lookup(c"cudaGetLastError", &RUNTIME_LIBS)
                    .map(|p| std::mem::transmute::<*mut c_void, ErrorFn>(p)),
                peek_at_last_error: lookup(c"cudaPeekAtLastError", &RUNTIME_LIBS)
                    .map(|p| std::mem::transmute::<*mut c_void, ErrorFn>(p)),
                host_alloc: lookup(c"cudaHostAlloc", &RUNTIME_LIBS)
                    .map(|p| std::mem::transmute::<*mut c_void, AllocFlagsFn>(p)),
                free_host: lookup(c"cudaFreeHost", &RUNTIME_LIBS)
                    .map(|p| std::mem::transmute::<*mut c_void, FreeFn>(p)),
                malloc_managed: lookup(c"cudaMallocManaged", &RUNTIME_LIBS)
                    .map(|p| std::mem::transmute::<*mut c_void, AllocFlagsFn>(p)),
                malloc_array: runtime_fn(c"cudaMallocArray"),
                malloc_3d_array: runtime_fn(c"cudaMalloc3DArray"),
                free_array: runtime_fn(c"cudaFreeArray"),
                malloc_from_pool_async: runtime_fn(c"cudaMallocFromPoolAsync"),
                mem_pool_import_pointer: runtime_fn(c"cudaMemPoolImportPointer"),
                host_register: runtime_fn(c"cudaHostRegister"),
                host_unregister: runtime_fn(c"cudaHostUnregister"),
            }
        }
    })
}

/// Finds `name` in the next library after us, else in an already-loaded one of `libs`; never in
/// this library.
fn lookup(name: &CStr, libs: &[&CStr]) -> Option<*mut c_void> {
    let ours = own_symbol(name);
    // SAFETY: dlsym with a valid NUL-terminated name; the result is only compared and returned.
    let next = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    if !next.is_null() && Some(next) != ours {
        return Some(next);
    }
    for lib in libs {
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
        b"cudaMallocArray" => super::cuda_array_api::cudaMallocArray as *mut c_void,
        b"cudaMalloc3DArray" => super::cuda_array_api::cudaMalloc3DArray as *mut c_void,
        b"cudaFreeArray" => super::cuda_array_api::cudaFreeArray as *mut c_void,
        b"cudaMallocFromPoolAsync" => {
            super::cuda_mempool_api::cudaMallocFromPoolAsync as *mut c_void
        }
        b"cudaMemPoolImportPointer" => {
            super::cuda_mempool_api::cudaMemPoolImportPointer as *mut c_void
        }
        b"cudaHostRegister" => super::cuda_register_api::cudaHostRegister as *mut c_void,
        b"cudaHostUnregister" => super::cuda_register_api::cudaHostUnregister as *mut c_void,
        b"cuMemAlloc_v2" => super::driver_api::cuMemAlloc_v2 as *mut c_void,
        b"cuMemFree_v2" => super::driver_api::cuMemFree_v2 as *mut c_void,
        _ => return None,
    };
    Some(ours)
}
