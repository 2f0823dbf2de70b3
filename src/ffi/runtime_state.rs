//! What the CUDA runtime answers before it looks at a call's arguments: that it has no driver or
//! no device, or that an earlier error left the device's context unusable ("sticky" errors).
//!
//! The interposed entry points ask `refusal()` first, so that a program sees the runtime's own
//! codes: with `backend:auto` and no driver, `cudaMalloc` fails with `cudaErrorInsufficientDriver`
//! instead of handing out host memory that the next `cudaMemcpy` rejects; after an illegal
//! address, pool hits fail with 700 as the runtime's `cudaMalloc` does.

use super::status::cuda_error;
use crate::process::init::InitCell;
use crate::runtime::{self, MAX_DEVICES};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// Errors after which the runtime refuses every call on the device until the process ends
/// (CUDA's "sticky" errors: the context is corrupted and cannot be used again).
pub fn is_sticky(code: i32) -> bool {
    matches!(code, 214 | 700 | 702 | 710 | 714..=719)
}

/// One sticky error per device; `ANY` keeps the common case (none ever) at one relaxed load.
static ANY: AtomicBool = AtomicBool::new(false);
static STICKY: [AtomicI32; MAX_DEVICES] = [const { AtomicI32::new(0) }; MAX_DEVICES];

/// Remembers `code` for the current device when it is sticky.
pub fn note_error(code: i32) {
    if is_sticky(code) {
        note_sticky(runtime::current_device(), code);
    }
}

fn note_sticky(device: i32, code: i32) {
    if let Some(slot) = STICKY.get(device as usize) {
        // The first sticky error is the one the runtime keeps reporting.
        let _ = slot.compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
        ANY.store(true, Ordering::Relaxed);
    }
}

fn sticky_of(device: i32) -> Option<i32> {
    let code = STICKY.get(device as usize)?.load(Ordering::Relaxed);
    (code != 0).then_some(code)
}

/// `cudaErrorInsufficientDriver` / `cudaErrorNoDevice` when `backend:auto` found no usable CUDA
/// device (the simulated device serves only when `backend:sim` asks for it); decided once.
fn no_device() -> Option<i32> {
    match NO_DEVICE.get() {
        Some(answer) => *answer,
        None => no_device_slow(),
    }
}

static NO_DEVICE: InitCell<Option<i32>> = InitCell::new("ffi::no_device");

#[cold]
fn no_device_slow() -> Option<i32> {
    // Worked out before the set-up lock is taken: it probes the driver, which a fork must not
    // wait for (`process::init`); every thread that races here works out the same answer.
    let answer = runtime::auto_fell_back().then(|| {
        if crate::backend::cuda::CudaBackend::driver_present() {
            cuda_error::NO_DEVICE
        } else {
            cuda_error::INSUFFICIENT_DRIVER
        }
    });
    *NO_DEVICE.get_or_init(|| answer)
}

/// The code the runtime would return for any call now, before looking at its arguments.
#[inline]
pub fn refusal() -> Option<i32> {
    if let Some(code) = no_device() {
        return Some(code);
    }
    if ANY.load(Ordering::Relaxed) {
        return sticky_of(runtime::current_device());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sticky_codes_are_the_runtimes() {
        for code in [700, 719, 214, 710] {
            assert!(is_sticky(code), "{code}");
        }
        for code in [0, 1, 2, 3, 100, 101, 201, 400, 999] {
            assert!(!is_sticky(code), "{code}");
        }
    }

    // Device 63: no other test uses it, so poisoning it leaves the rest of the suite alone.
    #[test]
    fn first_sticky_error_is_kept_per_device() {
        assert_eq!(sticky_of(63), None);
        note_sticky(63, 700);
        note_sticky(63, 719);
        assert_eq!(sticky_of(63), Some(700));
        assert_eq!(sticky_of(62), None, "other devices are unaffected");
        note_sticky(MAX_DEVICES as i32, 700); // out of range: ignored, no panic
        note_sticky(-1, 700);
    }

    use crate::test_child::{self, is_child};

    #[test]
    fn sticky_error_refuses_pool_hits() {
        let text = test_child::run(
            "ffi::runtime_state::tests::child_sticky",
            Some("backend:sim,leak_report:off"),
        );
        assert!(text.contains("child checks passed"), "{text}");
    }

    #[test]
    fn child_sticky() {
        if !is_child() {
            return;
        }
        use crate::ffi::cuda_api::{cudaFree, cudaGetLastError, cudaMalloc};
        let mut a = std::ptr::null_mut();
        let mut b = std::ptr::null_mut();
        // SAFETY: valid out-pointers; pointers freed are ours.
        unsafe {
            assert_eq!(cudaMalloc(&mut a, 4096), 0);
            assert_eq!(cudaMalloc(&mut b, 4096), 0);
            assert_eq!(cudaFree(a), 0);
            // An illegal address, as a failed synchronize would report it.
            crate::ffi::cuda_api::fail(700);
            assert_eq!(cudaGetLastError(), 700);
            let mut c = std::ptr::null_mut();
            assert_eq!(cudaMalloc(&mut c, 4096), 700, "a pool hit must not succeed");
            assert!(c.is_null());
            assert_eq!(cudaFree(b), 700);
            assert_eq!(cudaGetLastError(), 700);
        }
        println!("child checks passed");
    }

    #[test]
    fn auto_without_a_device_answers_as_the_runtime() {
        let text = test_child::run("ffi::runtime_state::tests::child_auto", None);
        assert!(text.contains("child checks passed"), "{text}");
    }

    #[test]
    fn child_auto() {
        if !is_child() {
            return;
        }
        use crate::backend::cuda::CudaBackend;
        use crate::ffi::cuda_api::{cudaFree, cudaMalloc, cudaMemGetInfo};
        let expected = if CudaBackend::available() {
            cuda_error::SUCCESS
        } else if CudaBackend::driver_present() {
            cuda_error::NO_DEVICE
        } else {
            cuda_error::INSUFFICIENT_DRIVER
        };
        let mut p = std::ptr::null_mut();
        let (mut free, mut total) = (0, 0);
        // SAFETY: valid out-pointers.
        unsafe {
            assert_eq!(cudaMalloc(&mut p, 1 << 20), expected);
            assert_eq!(p.is_null(), expected != 0, "no pointer on failure");
            assert_eq!(cudaMemGetInfo(&mut free, &mut total), expected);
            if expected == 0 {
                assert_eq!(cudaFree(p), 0);
            } else {
                assert_eq!(cudaFree(std::ptr::null_mut()), expected);
            }
        }
        println!("child checks passed");
    }
}
