//! The library's own C API for device memory: allocate and free through the caching pool, read
//! statistics, trim the cache. Every function returns `HbmStatus` unless it returns a value.

use super::guard::ffi_guard;
use super::status::{status_text, HbmStatus};
use crate::pool::PoolStats;
use crate::runtime::{self, Active};
use crate::tracked::device::{self as device_alloc, Api};
use crate::tracked::{self, FreeError};
use std::ffi::{c_char, c_int, c_void};

/// Statistics of one device's caching pool (bytes are block sizes, after rounding).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HbmStats {
    /// Bytes handed out and not yet freed.
    pub in_use: u64,
    /// Bytes obtained from the driver and not yet returned (in use plus cached).
    pub reserved: u64,
    /// Highest `in_use` seen (sampled when the pool grows and when statistics are read).
    pub peak_in_use: u64,
    /// Highest `reserved` seen (exact).
    pub peak_reserved: u64,
    /// Driver allocations and frees.
    pub driver_allocs: u64,
    pub driver_frees: u64,
    /// Allocations served from cached memory, and those that needed the driver.
    pub pool_hits: u64,
    pub pool_misses: u64,
    /// Times the driver said out of memory and the cache was released before one retry: once
    /// for threads that run out together, and not when releasing could not make room (the
    /// request is larger than free plus cached memory) or found nothing to give back.
    pub oom_retries: u64,
    /// Device synchronizations made to reuse freed blocks safely.
    pub syncs: u64,
    /// Allocations and frees served.
    pub allocs: u64,
    pub frees: u64,
}

impl From<PoolStats> for HbmStats {
    fn from(s: PoolStats) -> HbmStats {
        HbmStats {
            in_use: s.in_use,
            reserved: s.reserved,
            peak_in_use: s.peak_in_use,
            peak_reserved: s.peak_reserved,
            driver_allocs: s.driver_allocs,
            driver_frees: s.driver_frees,
            pool_hits: s.pool_hits,
            pool_misses: s.pool_misses,
            oom_retries: s.oom_retries,
            syncs: s.syncs,
            allocs: s.allocs,
            frees: s.frees,
        }
    }
}

/// The library version, "MAJOR.MINOR.PATCH". Static storage; never free it.
#[no_mangle]
pub extern "C" fn hbm_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// A static, human-readable text for `status` (an `HbmStatus` value; any other number gives
/// "unknown status"). Never NULL; never free it.
#[no_mangle]
pub extern "C" fn hbm_status_str(status: c_int) -> *const c_char {
    // An int, not the enum: a value C made up must not be undefined behaviour here.
    match HbmStatus::from_c(status) {
        Some(s) => status_text(s).as_ptr(),
        None => c"unknown status".as_ptr(),
    }
}

/// The backend serving this process: "cuda" or "sim". Static storage; never free it.
#[no_mangle]
pub extern "C" fn hbm_backend_name() -> *const c_char {
    ffi_guard!(c"unknown".as_ptr(), {
        match runtime::active() {
            Active::Cuda => c"cuda".as_ptr(),
            Active::Sim => c"sim".as_ptr(),
        }
    })
}

/// Number of devices the backend offers (0 when none).
#[no_mangle]
pub extern "C" fn hbm_device_count() -> c_int {
    ffi_guard!(0, runtime::device_count())
}

/// Allocates `size` bytes of device memory on `device` from its caching pool, aligned to at least
/// 512 bytes, and stores the address in `*out_ptr`. `size` 0 stores NULL and succeeds.
/// Free it with `hbm_device_free`. Returns `HBM_STATUS_OUT_OF_MEMORY` when even a released cache
/// cannot make room.
///
/// # Safety
/// `out_ptr` is NULL or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn hbm_device_alloc(
    device: c_int,
    size: usize,
    out_ptr: *mut *mut c_void,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if out_ptr.is_null() {
            return HbmStatus::NullParameter;
        }
        if size == 0 {
            // SAFETY: checked non-NULL; the caller promises it is writable.
            unsafe { *out_ptr = std::ptr::null_mut() };
            return HbmStatus::Ok;
        }
        match device_alloc::alloc(device, size, None, Api::Hbm) {
            Ok(ptr) => {
                // SAFETY: as above.
                unsafe { *out_ptr = ptr as *mut c_void };
                HbmStatus::Ok
            }
            Err(e) => HbmStatus::from(&e),
        }
    })
}

/// Frees memory from `hbm_device_alloc` (or from an interposed `cudaMalloc`), whichever device
/// it is on. NULL is a no-op. An unknown, interior or already-freed pointer returns
/// `HBM_STATUS_INVALID_POINTER`, prints one diagnostic line, and frees nothing.
///
/// # Safety
/// `ptr` is any value; it is only looked up, never dereferenced.
#[no_mangle]
pub unsafe extern "C" fn hbm_device_free(ptr: *mut c_void) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if ptr.is_null() {
            return HbmStatus::Ok;
        }
        match device_alloc::free(ptr as usize, None, Api::Hbm) {
            Ok(_) => HbmStatus::Ok,
            Err(FreeError::Unknown(_)) => {
                tracked::reject_unknown(ptr as usize);
                eprintln!("hbmalloc: hbm_device_free({ptr:p}): not a pointer hbmalloc allocated; nothing freed");
                HbmStatus::InvalidPointer
            }
            Err(FreeError::WrongKind(_)) => HbmStatus::InvalidPointer,
            Err(FreeError::Refused(e)) => HbmStatus::from(&e),
        }
    })
}

/// Fills `*out_stats` with the statistics of `device`'s caching pool.
///
/// # Safety
/// `out_stats` is NULL or valid for one `HbmStats` write.
#[no_mangle]
pub unsafe extern "C" fn hbm_stats(device: c_int, out_stats: *mut HbmStats) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if out_stats.is_null() {
            return HbmStatus::NullParameter;
        }
        match runtime::pool(device) {
            Ok(pool) => {
                // SAFETY: checked non-NULL; the caller promises it is writable.
                unsafe { *out_stats = HbmStats::from(pool.stats()) };
                HbmStatus::Ok
            }
            Err(e) => HbmStatus::from(&e),
        }
    })
}

/// Returns `device`'s cached, unused memory to the driver (after one device synchronize).
/// `device` -1 trims every pool in use: every device's, and the pinned host pool behind
/// `cudaMallocHost`. `out_released` (may be NULL) receives the bytes freed.
///
/// # Safety
/// `out_released` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn hbm_trim(device: c_int, out_released: *mut u64) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        let result = if device == -1 {
            let pinned = runtime::host_pool_if_started().map_or(Ok(0), |pool| pool.trim());
            pinned.and_then(|pinned| {
                runtime::pools().try_fold(pinned, |sum, (_, pool)| Ok(sum + pool.trim()?))
            })
        } else {
            runtime::pool(device).and_then(|pool| pool.trim())
        };
        match result {
            Ok(released) => {
                if !out_released.is_null() {
                    // SAFETY: checked non-NULL; the caller promises it is writable.
                    unsafe { *out_released = released as u64 };
                }
                HbmStatus::Ok
            }
            Err(e) => HbmStatus::from(&e),
        }
    })
}
