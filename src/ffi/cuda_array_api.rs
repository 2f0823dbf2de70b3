//! The interposed CUDA array calls, `cudaMallocArray`, `cudaMalloc3DArray` and `cudaFreeArray`:
//! forwarded to the runtime and recorded, so that an array never freed appears in the leak
//! report under its call's name. Arrays are not pooled: they are opaque handles to memory laid
//! out for the texture hardware, which only the runtime can make.
//!
//! The record is keyed by the array's handle; its size is the elements' bytes (`width` times
//! `height` times `depth`, each at least 1, times the channel format's bits / 8), what the
//! program asked for, not what the runtime reserved.
//!
//! On the simulated device there is no runtime to make arrays: NULL out-parameters are
//! `cudaErrorInvalidValue` as on a real device, every other allocation `cudaErrorNotSupported`
//! (801), `cudaFreeArray(NULL)` 0, and a free of any other handle `cudaErrorInvalidValue`.

#![allow(non_snake_case)]

use super::cuda_api::{fail, refuse_early, CudaError, HookGuard};
use super::forwarded_free::free_through_runtime;
use super::guard::ffi_guard;
use super::real_cuda::{real, Extent, FreeFn, Malloc3DArrayFn, MallocArrayFn};
use super::status::cuda_error;
use crate::runtime::{self, Active};
use crate::track::Origin;
use crate::tracked::{forwarded, Want};
use std::ffi::{c_int, c_uint, c_void};

/// `cudaArray_t`.
pub type CudaArray = *mut c_void;

/// `cudaChannelFormatDesc`: bits per component, and the components' kind.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelFormatDesc {
    pub x: c_int,
    pub y: c_int,
    pub z: c_int,
    pub w: c_int,
    pub f: c_int,
}

/// The bytes of `width` x `height` x `depth` elements of `desc` (a zero dimension counts as 1,
/// as for a 1D or 2D array); saturates rather than overflow (the runtime refuses such sizes).
fn array_bytes(desc: &ChannelFormatDesc, width: usize, height: usize, depth: usize) -> usize {
    let bits: i64 = [desc.x, desc.y, desc.z, desc.w]
        .iter()
        .map(|&b| i64::from(b.max(0)))
        .sum();
    [width, height, depth]
        .iter()
        .fold((bits as usize).div_ceil(8), |acc, &d| {
            acc.saturating_mul(d.max(1))
        })
}

/// Shared tail of the two allocations: the runtime's answer, and the record on success.
///
/// # Safety
/// `array` is valid for one read once `rc` is success (the runtime wrote it).
unsafe fn record_array(
    rc: CudaError,
    array: *mut CudaArray,
    size: usize,
    origin: Origin,
) -> CudaError {
    if rc == cuda_error::SUCCESS {
        // SAFETY: the runtime wrote the handle on success.
        let handle = unsafe { *array } as usize;
        if handle != 0 {
            forwarded::record(handle, size, runtime::current_device(), origin);
        }
    }
    fail(rc)
}

/// Body of `cudaMallocArray`, forwarding to `forward` (`None`: no runtime to forward to).
///
/// # Safety
/// The pointers are NULL or as `cudaMallocArray` documents them.
pub(super) unsafe fn malloc_array_hook(
    forward: Option<MallocArrayFn>,
    array: *mut CudaArray,
    desc: *const ChannelFormatDesc,
    width: usize,
    height: usize,
    flags: c_uint,
) -> CudaError {
    if array.is_null() || desc.is_null() {
        return fail(cuda_error::INVALID_VALUE);
    }
    let (Some(forward), Some(_guard)) = (forward, HookGuard::enter()) else {
        return fail(cuda_error::INITIALIZATION_ERROR);
    };
    // SAFETY: the runtime's own function, given the caller's arguments unchanged.
    let rc = unsafe { forward(array.cast(), desc.cast(), width, height, flags) };
    // SAFETY: `desc` is non-NULL and, by the caller's contract, readable.
    let size = array_bytes(unsafe { &*desc }, width, height, 1);
    // SAFETY: as `record_array` requires.
    unsafe { record_array(rc, array, size, Origin::CudaMallocArray) }
}

/// Body of `cudaMalloc3DArray`, forwarding to `forward`.
///
/// # Safety
/// As `malloc_array_hook`.
pub(super) unsafe fn malloc_3d_array_hook(
    forward: Option<Malloc3DArrayFn>,
    array: *mut CudaArray,
    desc: *const ChannelFormatDesc,
    extent: Extent,
    flags: c_uint,
) -> CudaError {
    if array.is_null() || desc.is_null() {
        return fail(cuda_error::INVALID_VALUE);
    }
    let (Some(forward), Some(_guard)) = (forward, HookGuard::enter()) else {
        return fail(cuda_error::INITIALIZATION_ERROR);
    };
    // SAFETY: the runtime's own function, given the caller's arguments unchanged.
    let rc = unsafe { forward(array.cast(), desc.cast(), extent, flags) };
    // SAFETY: `desc` is non-NULL and readable.
    let size = array_bytes(unsafe { &*desc }, extent.width, extent.height, extent.depth);
    // SAFETY: as `record_array` requires.
    unsafe { record_array(rc, array, size, Origin::CudaMalloc3DArray) }
}

/// Body of `cudaFreeArray`: the record goes, then the runtime (`forward`) frees the array.
pub(super) fn free_array_hook(forward: Option<FreeFn>, array: CudaArray) -> CudaError {
    if array.is_null() {
        return cuda_error::SUCCESS;
    }
    free_through_runtime(
        "cudaFreeArray",
        array as usize,
        Want::CUDA_FREE_ARRAY,
        |_known| match (forward, HookGuard::enter()) {
            // SAFETY: the runtime's own function, given the caller's argument unchanged.
            (Some(free), Some(_guard)) => unsafe { free(array) },
            _ => cuda_error::INVALID_VALUE,
        },
    )
}

/// `cudaMallocArray`: the runtime's array, recorded (see the module doc).
///
/// # Safety
/// As the runtime's `cudaMallocArray`: `array` and `desc` are NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn cudaMallocArray(
    array: *mut CudaArray,
    desc: *const ChannelFormatDesc,
    width: usize,
    height: usize,
    flags: c_uint,
) -> CudaError {
    ffi_guard!(fail(cuda_error::UNKNOWN), {
        refuse_early!();
        let forward = match runtime::active() {
            Active::Cuda => real().malloc_array,
            Active::Sim if array.is_null() || desc.is_null() => {
                return fail(cuda_error::INVALID_VALUE)
            }
            Active::Sim => return fail(cuda_error::NOT_SUPPORTED),
        };
        // SAFETY: forwarded caller contract.
        unsafe { malloc_array_hook(forward, array, desc, width, height, flags) }
    })
}

/// `cudaMalloc3DArray`: the runtime's array, recorded (see the module doc).
///
/// # Safety
/// As the runtime's `cudaMalloc3DArray`: `array` and `desc` are NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn cudaMalloc3DArray(
    array: *mut CudaArray,
    desc: *const ChannelFormatDesc,
    extent: Extent,
    flags: c_uint,
) -> CudaError {
    ffi_guard!(fail(cuda_error::UNKNOWN), {
        refuse_early!();
        let forward = match runtime::active() {
            Active::Cuda => real().malloc_3d_array,
            Active::Sim if array.is_null() || desc.is_null() => {
                return fail(cuda_error::INVALID_VALUE)
            }
            Active::Sim => return fail(cuda_error::NOT_SUPPORTED),
        };
        // SAFETY: forwarded caller contract.
        unsafe { malloc_3d_array_hook(forward, array, desc, extent, flags) }
    })
}

/// `cudaFreeArray`: drops the array's record and lets the runtime free it.
///
/// # Safety
/// `array` is any value; hbmalloc only compares it (the runtime checks it).
#[no_mangle]
pub unsafe extern "C" fn cudaFreeArray(array: CudaArray) -> CudaError {
    ffi_guard!(fail(cuda_error::UNKNOWN), {
        refuse_early!();
        let forward = match runtime::active() {
            Active::Cuda => real().free_array,
            Active::Sim => None,
        };
        free_array_hook(forward, array)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::cuda_api::cudaFree;
    use crate::test_child::{self, is_child};
    use std::ptr::{null, null_mut};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const FLOAT4: ChannelFormatDesc = ChannelFormatDesc {
        x: 32,
        y: 32,
        z: 32,
        w: 32,
        f: 2,
    };

    #[test]
    fn array_sizes() {
        assert_eq!(array_bytes(&FLOAT4, 10, 0, 0), 160);
        assert_eq!(array_bytes(&FLOAT4, 10, 4, 2), 1280);
        let r8 = ChannelFormatDesc {
            x: 8,
            y: 0,
            z: 0,
            w: 0,
            f: 1,
        };
        assert_eq!(array_bytes(&r8, 3, 3, 1), 9);
        assert_eq!(array_bytes(&r8, usize::MAX, 2, 1), usize::MAX);
    }

    // A stand-in for the runtime: hands out handles from a counter, frees each once.
    static NEXT: AtomicUsize = AtomicUsize::new(0x7a00_0000_0000);
    static FREED: AtomicUsize = AtomicUsize::new(0);

    unsafe extern "C" fn fake_malloc_array(
        a: *mut *mut c_void,
        _: *const c_void,
        w: usize,
        _: usize,
        _: c_uint,
    ) -> c_int {
        if w == 0 {
            return cuda_error::INVALID_VALUE;
        }
        // SAFETY: the hook passes the caller's non-NULL out-parameter.
        unsafe { *a = NEXT.fetch_add(0x1000, Ordering::Relaxed) as *mut c_void };
        0
    }

    unsafe extern "C" fn fake_malloc_3d_array(
        a: *mut *mut c_void,
        d: *const c_void,
        e: Extent,
        f: c_uint,
    ) -> c_int {
        // SAFETY: as above.
        unsafe { fake_malloc_array(a, d, e.width, e.height, f) }
    }

    unsafe extern "C" fn fake_free_array(a: *mut c_void) -> c_int {
        // Refuses the handle it was told to, as the runtime refuses a bad one.
        if a as usize == 0xbad0 {
            return cuda_error::INVALID_VALUE;
        }
        FREED.fetch_add(1, Ordering::Relaxed);
        0
    }

    #[test]
    fn array_calls() {
        let out = test_child::run(
            "ffi::cuda_array_api::tests::child_arrays",
            Some("backend:sim,backtrace:off,leak_report:off"),
        );
        assert!(out.contains("child checks passed"), "{out}");
    }

    #[test]
    fn child_arrays() {
        if !is_child() {
            return;
        }
        let tracker = crate::track::global();
        let mut a: CudaArray = null_mut();
        let ext = Extent {
            width: 8,
            height: 4,
            depth: 2,
        };
        // SAFETY: locals as out-parameters; the fakes are the "runtime".
        unsafe {
            // The simulated device has no arrays: 801, and 1 for NULL out-parameters.
            assert_eq!(cudaMallocArray(&mut a, &FLOAT4, 8, 8, 0), 801);
            assert_eq!(cudaMalloc3DArray(&mut a, &FLOAT4, ext, 0), 801);
            assert_eq!(cudaMallocArray(null_mut(), &FLOAT4, 8, 8, 0), 1);
            assert_eq!(cudaMallocArray(&mut a, null(), 8, 8, 0), 1);
            assert_eq!(cudaMalloc3DArray(null_mut(), &FLOAT4, ext, 0), 1);
            assert!(a.is_null());
            assert_eq!(cudaFreeArray(null_mut()), 0);
            assert_eq!(cudaFreeArray(0x1000 as CudaArray), 1, "no such array");

            // Through a runtime: recorded under each call's name, freed once.
            let (fwd, fwd3, free) = (
                Some(fake_malloc_array as MallocArrayFn),
                Some(fake_malloc_3d_array as Malloc3DArrayFn),
                Some(fake_free_array as FreeFn),
            );
            assert_eq!(malloc_array_hook(fwd, &mut a, &FLOAT4, 8, 8, 0), 0);
            let live = tracker.get(a as usize).unwrap();
            assert_eq!(
                (live.origin, live.size),
                (Origin::CudaMallocArray, 8 * 8 * 16)
            );
            let mut b: CudaArray = null_mut();
            assert_eq!(malloc_3d_array_hook(fwd3, &mut b, &FLOAT4, ext, 0), 0);
            let live = tracker.get(b as usize).unwrap();
            assert_eq!(
                (live.origin, live.size),
                (Origin::CudaMalloc3DArray, 64 * 16)
            );
            // The runtime's refusal is returned and nothing is recorded.
            let mut c: CudaArray = null_mut();
            let count = tracker.snapshot().len();
            assert_eq!(malloc_array_hook(fwd, &mut c, &FLOAT4, 0, 8, 0), 1);
            assert_eq!(tracker.snapshot().len(), count);
            // The leak report names both calls.
            let path = std::env::temp_dir().join(format!("hbm-arrays-{}.txt", std::process::id()));
            crate::track::write_report(path.to_str()).unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            let _ = std::fs::remove_file(&path);
            assert!(
                text.contains("cudaMallocArray") && text.contains("cudaMalloc3DArray"),
                "{text}"
            );

            // cudaFree refuses an array, and says how to free it.
            assert_eq!(cudaFree(a), 1);
            assert!(tracker.get(a as usize).is_some(), "untouched");
            // cudaFreeArray: the record goes, the runtime frees.
            let freed = FREED.load(Ordering::Relaxed);
            assert_eq!(free_array_hook(free, a), 0);
            assert_eq!(tracker.get(a as usize), None);
            assert_eq!(FREED.load(Ordering::Relaxed), freed + 1);
            // A second free is the runtime's to judge (here it accepts; a real runtime refuses).
            assert_eq!(free_array_hook(None, a), 1, "no runtime: refused");
            // An array the runtime refuses to free keeps its record.
            forwarded::record(0xbad0, 64, 0, Origin::CudaMallocArray);
            assert_eq!(free_array_hook(free, 0xbad0 as CudaArray), 1);
            assert!(tracker.get(0xbad0).is_some(), "the record is back");
            // cudaFreeArray refuses device memory, which stays allocated.
            let mut d = null_mut();
            assert_eq!(crate::ffi::cuda_api::cudaMalloc(&mut d, 4096), 0);
            assert_eq!(free_array_hook(free, d), 1);
            assert_eq!(cudaFree(d), 0);
            assert_eq!(free_array_hook(free, b), 0);
        }
        println!("child checks passed");
    }
}
