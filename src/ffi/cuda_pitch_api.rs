//! The interposed pitched allocations, `cudaMallocPitch` and `cudaMalloc3D`: linear device
//! memory whose rows are padded to a pitch, served by the caching pool like `cudaMalloc` and
//! freed by `cudaFree` (or `cudaFreeAsync`), as the runtime's are.
//!
//! Pitch: the row width rounded up to 512 bytes, what the runtime returns on current GPUs (the
//! texture hardware's pitch rule; rows of 100 bytes get a 512-byte pitch). Every pool block
//! starts 512-aligned, so every row starts 512-aligned too.
//!
//! Contract (docs/contract.md): NULL out-parameters → `cudaErrorInvalidValue`; a zero width,
//! height or depth → success, a NULL pointer and nothing allocated (as `cudaMalloc(&p, 0)`);
//! a pitch or a size that overflows `size_t`, or that the device cannot supply →
//! `cudaErrorMemoryAllocation`, out-parameters untouched.

#![allow(non_snake_case)]

use super::cuda_api::{fail, refuse_early, CudaError};
use super::guard::ffi_guard;
pub use super::real_cuda::Extent;
use super::status::{cuda_error, to_cuda_error};
use crate::runtime;
use crate::track::Origin;
use crate::tracked::device as device_alloc;
use std::ffi::c_void;

/// The alignment of every pitch handed out.
pub const PITCH_ALIGNMENT: usize = 512;

/// `cudaPitchedPtr`: the allocation, its pitch, and the width (bytes) and height it was asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PitchedPtr {
    pub ptr: *mut c_void,
    pub pitch: usize,
    pub xsize: usize,
    pub ysize: usize,
}

/// The pitch of rows `width` bytes wide; `None` when it does not fit a `size_t`.
pub fn pitch_of(width: usize) -> Option<usize> {
    Some(width.checked_add(PITCH_ALIGNMENT - 1)? & !(PITCH_ALIGNMENT - 1))
}

/// Allocates `rows` rows of `pitch` bytes (both > 0) from the current device's pool.
fn alloc_rows(pitch: usize, rows: Option<usize>, origin: Origin) -> Result<usize, CudaError> {
    // An overflowing size is one no device can supply: the runtime's out-of-memory answer.
    let size = rows
        .and_then(|r| pitch.checked_mul(r))
        .ok_or(cuda_error::MEMORY_ALLOCATION)?;
    device_alloc::alloc_as(runtime::current_device(), size, None, origin)
        .map_err(|e| to_cuda_error(&e))
}

/// Body of `cudaMallocPitch`.
///
/// # Safety
/// `dev_ptr` and `pitch` are NULL or valid for one write each.
unsafe fn malloc_pitch_hook(
    dev_ptr: *mut *mut c_void,
    pitch: *mut usize,
    width: usize,
    height: usize,
) -> CudaError {
    refuse_early!();
    if dev_ptr.is_null() || pitch.is_null() {
        return fail(cuda_error::INVALID_VALUE);
    }
    let Some(row) = pitch_of(width) else {
        return fail(cuda_error::MEMORY_ALLOCATION);
    };
    let ptr = if width == 0 || height == 0 {
        0
    } else {
        match alloc_rows(row, Some(height), Origin::CudaMallocPitch) {
            Ok(p) => p,
            Err(code) => return fail(code),
        }
    };
    // SAFETY: both checked non-NULL; the caller promises they are writable.
    unsafe {
        *dev_ptr = ptr as *mut c_void;
        // With nothing allocated the runtime answers pitch 0 (measured on an H200 with CUDA
        // 13.0: `cudaMallocPitch(&p, &pitch, 100, 0)` gives NULL and 0). cudaMalloc3D keeps it.
        *pitch = if ptr == 0 { 0 } else { row };
    }
    cuda_error::SUCCESS
}

/// Body of `cudaMalloc3D`.
///
/// # Safety
/// `pitched` is NULL or valid for one write.
unsafe fn malloc_3d_hook(pitched: *mut PitchedPtr, extent: Extent) -> CudaError {
    refuse_early!();
    if pitched.is_null() {
        return fail(cuda_error::INVALID_VALUE);
    }
    let Extent {
        width,
        height,
        depth,
    } = extent;
    let Some(row) = pitch_of(width) else {
        return fail(cuda_error::MEMORY_ALLOCATION);
    };
    let ptr = if width == 0 || height == 0 || depth == 0 {
        0
    } else {
        match alloc_rows(row, height.checked_mul(depth), Origin::CudaMalloc3D) {
            Ok(p) => p,
            Err(code) => return fail(code),
        }
    };
    // SAFETY: checked non-NULL; the caller promises it is writable.
    unsafe {
        *pitched = PitchedPtr {
            ptr: ptr as *mut c_void,
            pitch: row,
            xsize: width,
            ysize: height,
        }
    };
    cuda_error::SUCCESS
}

/// `cudaMallocPitch`: `height` rows of `width` bytes, each row `*pitch` bytes apart, from the
/// current device's caching pool. Freed by `cudaFree`.
///
/// # Safety
/// `dev_ptr` and `pitch` are NULL or valid for one write each.
#[no_mangle]
pub unsafe extern "C" fn cudaMallocPitch(
    dev_ptr: *mut *mut c_void,
    pitch: *mut usize,
    width: usize,
    height: usize,
) -> CudaError {
    // SAFETY: forwarded caller contract.
    ffi_guard!(fail(cuda_error::UNKNOWN), unsafe {
        malloc_pitch_hook(dev_ptr, pitch, width, height)
    })
}

/// `cudaMalloc3D`: `extent.depth` slices of `extent.height` rows of `extent.width` bytes, rows
/// `pitch` bytes apart, from the current device's caching pool. Freed by `cudaFree`.
///
/// # Safety
/// `pitched_dev_ptr` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn cudaMalloc3D(
    pitched_dev_ptr: *mut PitchedPtr,
    extent: Extent,
) -> CudaError {
    // SAFETY: forwarded caller contract.
    ffi_guard!(fail(cuda_error::UNKNOWN), unsafe {
        malloc_3d_hook(pitched_dev_ptr, extent)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::cuda_api::{cudaFree, cudaGetLastError};
    use crate::test_child::{self, is_child};
    use std::ptr::null_mut;

    #[test]
    fn pitch_is_the_width_rounded_to_512() {
        assert_eq!(pitch_of(0), Some(0));
        assert_eq!(pitch_of(1), Some(512));
        assert_eq!(pitch_of(100), Some(512));
        assert_eq!(pitch_of(512), Some(512));
        assert_eq!(pitch_of(513), Some(1024));
        assert_eq!(pitch_of(usize::MAX), None);
        assert_eq!(pitch_of(usize::MAX - 510), None);
        assert_eq!(pitch_of(usize::MAX - 511), Some(usize::MAX - 511));
        assert_eq!(pitch_of(usize::MAX - 512), Some(usize::MAX - 511));
    }

    #[test]
    fn pitched_calls_on_the_simulated_device() {
        let out = test_child::run(
            "ffi::cuda_pitch_api::tests::child_pitched",
            Some("backend:sim,sim_capacity:1GiB,leak_report:off"),
        );
        assert!(out.contains("child checks passed"), "{out}");
    }

    #[test]
    fn child_pitched() {
        if !is_child() {
            return;
        }
        let pool = runtime::pool(0).unwrap();
        let mut p = null_mut();
        let mut pitch = 7usize;
        // SAFETY: locals to write; every pointer freed is one just allocated.
        unsafe {
            // Good input: 100-byte rows, 3 rows; the block holds 3 pitches and is 512-aligned.
            let before = pool.stats().in_use;
            assert_eq!(cudaMallocPitch(&mut p, &mut pitch, 100, 3), 0);
            assert_eq!(pitch, 512);
            assert!(!p.is_null() && p as usize % 512 == 0);
            assert!(
                pool.stats().in_use - before >= 3 * 512,
                "the pool served it"
            );
            let live = crate::track::global().get(p as usize).unwrap();
            assert_eq!((live.origin, live.size), (Origin::CudaMallocPitch, 1536));
            std::ptr::write_bytes(p as *mut u8, 0xab, 3 * 512); // all three rows are ours
            assert_eq!(cudaFree(p), 0, "cudaFree frees pitched memory");
            assert_eq!(cudaFree(p), cuda_error::INVALID_VALUE, "and only once");

            // NULL out-parameters: invalid value, nothing written.
            assert_eq!(cudaMallocPitch(null_mut(), &mut pitch, 100, 3), 1);
            assert_eq!(cudaMallocPitch(&mut p, null_mut(), 100, 3), 1);
            // Zero width or height: success, NULL, nothing allocated.
            let live_before = crate::track::global().snapshot().len();
            p = 0x1 as *mut c_void;
            assert_eq!(cudaMallocPitch(&mut p, &mut pitch, 0, 3), 0);
            assert!(p.is_null());
            assert_eq!(pitch, 0);
            p = 0x1 as *mut c_void;
            assert_eq!(cudaMallocPitch(&mut p, &mut pitch, 100, 0), 0);
            assert!(p.is_null());
            assert_eq!(pitch, 0, "as the runtime: nothing allocated, pitch 0");
            assert_eq!(crate::track::global().snapshot().len(), live_before);
            // Overflow of the pitch or of pitch * height, and more than the device holds:
            // out of memory, out-parameters untouched, reported by cudaGetLastError.
            p = null_mut();
            pitch = 7;
            for (w, h) in [(usize::MAX, 1), (1 << 40, 1 << 40), (1 << 20, 1 << 20)] {
                assert_eq!(cudaMallocPitch(&mut p, &mut pitch, w, h), 2, "{w} x {h}");
                assert!(p.is_null());
                assert_eq!(pitch, 7);
            }
            assert_eq!(cudaGetLastError(), 2);

            // cudaMalloc3D: 3 slices of 2 rows of 700 bytes.
            let mut pp = PitchedPtr {
                ptr: null_mut(),
                pitch: 0,
                xsize: 0,
                ysize: 0,
            };
            let extent = Extent {
                width: 700,
                height: 2,
                depth: 3,
            };
            assert_eq!(cudaMalloc3D(&mut pp, extent), 0);
            assert_eq!((pp.pitch, pp.xsize, pp.ysize), (1024, 700, 2));
            assert!(!pp.ptr.is_null() && pp.ptr as usize % 512 == 0);
            let live = crate::track::global().get(pp.ptr as usize).unwrap();
            assert_eq!((live.origin, live.size), (Origin::CudaMalloc3D, 6 * 1024));
            std::ptr::write_bytes(pp.ptr as *mut u8, 0xcd, 6 * 1024);
            assert_eq!(cudaFree(pp.ptr), 0);
            assert_eq!(cudaMalloc3D(null_mut(), extent), 1);
            for zero in [
                Extent { width: 0, ..extent },
                Extent {
                    height: 0,
                    ..extent
                },
                Extent { depth: 0, ..extent },
            ] {
                pp.ptr = 0x1 as *mut c_void;
                assert_eq!(cudaMalloc3D(&mut pp, zero), 0, "{zero:?}");
                assert!(pp.ptr.is_null());
            }
            let keep = pp;
            for huge in [
                Extent {
                    width: usize::MAX,
                    ..extent
                },
                Extent {
                    height: 1 << 40,
                    depth: 1 << 40,
                    ..extent
                },
                Extent {
                    height: usize::MAX,
                    depth: 2,
                    ..extent
                },
            ] {
                assert_eq!(cudaMalloc3D(&mut pp, huge), 2, "{huge:?}");
                assert_eq!(pp, keep, "untouched on failure");
            }
        }
        println!("child checks passed");
    }
}
