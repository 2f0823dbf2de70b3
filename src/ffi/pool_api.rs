//! Scratch pools for C and C++ engines, in the shape of ggml's `ggml_cuda_pool`:
//! `hbm_pool_alloc(pool, size, &ptr, &actual)` and `hbm_pool_free(pool, ptr, actual)`.
//! The pools themselves are `crate::pool::scratch`; this file only crosses the C boundary.

use super::guard::ffi_guard;
use super::status::HbmStatus;
use crate::backend::DevicePtr;
use crate::pool::{ScratchKind, ScratchOptions, ScratchPool, ScratchStats};
use crate::runtime;
use crate::tracked;
use std::ffi::{c_int, c_void};

/// Which scratch pool `hbm_pool_create` makes (`HBM_POOL_KIND_*` in C).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HbmPoolKind {
    /// Cached whole buffers, best fit (ggml's legacy pool).
    Legacy = 0,
    /// One virtual reservation, physical memory committed on demand, frees in any order.
    Vmm = 1,
}

/// Options of `hbm_pool_create`. Fill them with `hbm_pool_options_default`, then change fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HbmPoolOptions {
    /// VMM pools: bytes of address space to reserve; 0 means the default, 32 GiB. Capped at the
    /// device's memory. Reserving costs no memory.
    pub reserve_size: usize,
    /// Bytes the pool may keep from the device while unused. When a free leaves the pool holding
    /// more, unused memory above this goes back to the device at once (after a device
    /// synchronize): whole cached buffers (legacy) or whole committed chunks at the top of the
    /// reservation (VMM). Default `SIZE_MAX`: keep everything until `hbm_pool_trim`.
    pub release_threshold: usize,
    /// Alignment of every pointer handed out: a power of two, at least 256 is always given;
    /// 0 means the default, 256. VMM pools: at most the device's VMM granularity (2 MiB).
    pub alignment: usize,
    /// Legacy pools: a new buffer is this many percent larger than the request, so that slightly
    /// larger requests later reuse it. Default 5 (ggml's `size * 1.05`). At most 1000.
    pub overallocation_percent: u32,
    /// Legacy pools: a cached buffer serves a request only if it is at most this many percent
    /// larger than the request. Default 0: any larger buffer serves (ggml's rule).
    pub reuse_limit_percent: u32,
    /// Legacy pools: most buffers kept cached; a buffer freed into a full cache goes back to the
    /// device. Default 256 (ggml's).
    pub max_cached_buffers: u32,
}

impl From<ScratchOptions> for HbmPoolOptions {
    fn from(o: ScratchOptions) -> HbmPoolOptions {
        HbmPoolOptions {
            reserve_size: o.reserve_size,
            release_threshold: o.release_threshold,
            alignment: o.alignment,
            overallocation_percent: o.overallocation_percent,
            reuse_limit_percent: o.reuse_limit_percent,
            max_cached_buffers: o.max_cached_buffers,
        }
    }
}

impl From<HbmPoolOptions> for ScratchOptions {
    fn from(o: HbmPoolOptions) -> ScratchOptions {
        ScratchOptions {
            reserve_size: o.reserve_size,
            release_threshold: o.release_threshold,
            alignment: o.alignment,
            overallocation_percent: o.overallocation_percent,
            reuse_limit_percent: o.reuse_limit_percent,
            max_cached_buffers: o.max_cached_buffers,
        }
    }
}

/// Statistics of one pool. Byte counts are `actual` sizes, as handed out.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HbmPoolStats {
    /// The kind in force: `HBM_POOL_KIND_LEGACY` after a VMM pool fell back.
    pub kind: HbmPoolKind,
    /// Bytes handed out and not yet freed, and how many allocations.
    pub in_use: u64,
    pub live: u64,
    /// Highest `in_use` seen.
    pub peak_in_use: u64,
    /// Device memory the pool holds (mapped, for VMM; allocated, for legacy), and its peak.
    pub committed: u64,
    pub peak_committed: u64,
    /// VMM: address space reserved. Legacy: equal to `committed`.
    pub reserved: u64,
    /// Allocations and frees served.
    pub allocs: u64,
    pub frees: u64,
    /// Allocations served from memory the pool held, and those that asked the device for more.
    pub hits: u64,
    pub misses: u64,
    /// Times memory went back to the device, and the bytes given back in all.
    pub trims: u64,
    pub released_bytes: u64,
}

impl HbmPoolStats {
    fn new(kind: ScratchKind, s: ScratchStats) -> HbmPoolStats {
        HbmPoolStats {
            kind: match kind {
                ScratchKind::Legacy => HbmPoolKind::Legacy,
                ScratchKind::Vmm => HbmPoolKind::Vmm,
            },
            in_use: s.in_use,
            live: s.live,
            peak_in_use: s.peak_in_use,
            committed: s.committed,
            peak_committed: s.peak_committed,
            reserved: s.reserved,
            allocs: s.allocs,
            frees: s.frees,
            hits: s.hits,
            misses: s.misses,
            trims: s.trims,
            released_bytes: s.released_bytes,
        }
    }
}

/// A scratch pool on one device (opaque). Create with `hbm_pool_create`, destroy with
/// `hbm_pool_destroy`. Every function may be called on it from any thread.
pub struct HbmPool {
    _private: [u8; 0],
}

/// The pool behind a handle.
///
/// # Safety
/// `pool` is non-NULL and came from `hbm_pool_create`, not yet destroyed.
unsafe fn pool_ref<'a>(pool: *const HbmPool) -> &'a ScratchPool {
    // SAFETY: the caller's promise: the handle is a live `Box<ScratchPool>` from `hbm_pool_create`.
    unsafe { &*(pool as *const ScratchPool) }
}

/// Fills `*out_options` with the defaults: `reserve_size` 32 GiB, `release_threshold` SIZE_MAX,
/// `alignment` 256, `overallocation_percent` 5, `reuse_limit_percent` 0,
/// `max_cached_buffers` 256. Returns `HBM_STATUS_NULL_PARAMETER` if `out_options` is NULL.
///
/// # Safety
/// `out_options` is NULL or valid for one `HbmPoolOptions` write.
#[no_mangle]
pub unsafe extern "C" fn hbm_pool_options_default(out_options: *mut HbmPoolOptions) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if out_options.is_null() {
            return HbmStatus::NullParameter;
        }
        // SAFETY: checked non-NULL; the caller promises it is writable.
        unsafe { *out_options = ScratchOptions::default().into() };
        HbmStatus::Ok
    })
}

/// Creates a scratch pool on `device` and stores its handle in `*out_pool`.
///
/// - `kind`: `HBM_POOL_KIND_LEGACY` or `HBM_POOL_KIND_VMM`. A VMM pool on a device without VMM
///   support, or whose address reservation the driver refuses, is created as a legacy pool
///   instead, with one notice line on stderr (`hbm_pool_stats` reports the kind in force).
/// - `options`: NULL for the defaults (`hbm_pool_options_default`); read only during the call.
///
/// A pool serves one stream, as ggml's do: a freed block may be handed out again at once, so use
/// it for work ordered on one stream. Memory goes back to the device only after a synchronize.
///
/// Returns `HBM_STATUS_NULL_PARAMETER` if `out_pool` is NULL, `HBM_STATUS_INVALID_VALUE` for an
/// unknown kind or bad options, `HBM_STATUS_INVALID_DEVICE`. Destroy it with `hbm_pool_destroy`.
///
/// # Safety
/// `options` is NULL or points to a valid `HbmPoolOptions`; `out_pool` is NULL or valid for one
/// pointer write.
#[no_mangle]
pub unsafe extern "C" fn hbm_pool_create(
    device: c_int,
    kind: c_int,
    options: *const HbmPoolOptions,
    out_pool: *mut *mut HbmPool,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if out_pool.is_null() {
            return HbmStatus::NullParameter;
        }
        let kind = match kind {
            k if k == HbmPoolKind::Legacy as c_int => ScratchKind::Legacy,
            k if k == HbmPoolKind::Vmm as c_int => ScratchKind::Vmm,
            _ => return HbmStatus::InvalidValue,
        };
        let options = if options.is_null() {
            ScratchOptions::default()
        } else {
            // SAFETY: checked non-NULL; the caller promises it points to valid options.
            ScratchOptions::from(unsafe { *options })
        };
        let pool =
            runtime::backend(device).and_then(|backend| ScratchPool::new(backend, kind, options));
        match pool {
            Ok(pool) => {
                // SAFETY: checked non-NULL; the caller promises it is writable.
                unsafe { *out_pool = Box::into_raw(Box::new(pool)) as *mut HbmPool };
                HbmStatus::Ok
            }
            Err(e) => HbmStatus::from(&e),
        }
    })
}

/// Allocates at least `size` bytes from `pool`: stores the device pointer in `*out_ptr` and the
/// size actually reserved for it in `*out_actual`, which `hbm_pool_free` takes back. Pointers are
/// aligned to the pool's alignment (256 by default). `size` 0 stores NULL and 0 and succeeds.
///
/// Returns `HBM_STATUS_NULL_PARAMETER` if any pointer is NULL; `HBM_STATUS_OUT_OF_MEMORY` when the
/// device (or a VMM pool's reservation) has no room, with nothing allocated.
///
/// # Safety
/// `pool` is NULL or a live handle from `hbm_pool_create`; `out_ptr` and `out_actual` are NULL or
/// valid for one write each.
#[no_mangle]
pub unsafe extern "C" fn hbm_pool_alloc(
    pool: *mut HbmPool,
    size: usize,
    out_ptr: *mut *mut c_void,
    out_actual: *mut usize,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if pool.is_null() || out_ptr.is_null() || out_actual.is_null() {
            return HbmStatus::NullParameter;
        }
        let (ptr, actual) = if size == 0 {
            (0, 0)
        } else {
            // SAFETY: checked non-NULL; the caller promises a live handle.
            let pool = unsafe { pool_ref(pool) };
            match tracked::scratch::alloc(pool, size) {
                Ok(got) => got,
                Err(e) => return HbmStatus::from(&e),
            }
        };
        // SAFETY: both checked non-NULL; the caller promises they are writable.
        unsafe {
            *out_ptr = ptr as *mut c_void;
            *out_actual = actual;
        }
        HbmStatus::Ok
    })
}

/// Returns `ptr`, allocated from `pool` with `*out_actual == actual`, to the pool. NULL is a
/// no-op. The memory may be handed out again at once (see `hbm_pool_create`).
///
/// Returns `HBM_STATUS_INVALID_VALUE` if `actual` is not the size `hbm_pool_alloc` gave, and
/// `HBM_STATUS_INVALID_POINTER` for a pointer this pool did not hand out, one already freed or one
/// inside a block; either way nothing is freed and one line on stderr says why.
///
/// # Safety
/// `pool` is NULL or a live handle; `ptr` is only looked up, never dereferenced.
#[no_mangle]
pub unsafe extern "C" fn hbm_pool_free(
    pool: *mut HbmPool,
    ptr: *mut c_void,
    actual: usize,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if pool.is_null() {
            return HbmStatus::NullParameter;
        }
        if ptr.is_null() {
            return HbmStatus::Ok;
        }
        // SAFETY: checked non-NULL; the caller promises a live handle.
        let pool = unsafe { pool_ref(pool) };
        match tracked::scratch::free(pool, ptr as DevicePtr, actual) {
            Ok(()) => HbmStatus::Ok,
            Err(e) => {
                eprintln!("hbmalloc: hbm_pool_free({ptr:p}, {actual}): {e}; nothing freed");
                HbmStatus::from(&e)
            }
        }
    })
}

/// Gives the pool's unused memory back to the device, after one device synchronize: every cached
/// buffer (legacy), or every free committed chunk at the top of the reservation (VMM). Stores the
/// bytes given back in `*out_released` unless it is NULL.
///
/// # Safety
/// `pool` is NULL or a live handle; `out_released` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn hbm_pool_trim(pool: *mut HbmPool, out_released: *mut usize) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if pool.is_null() {
            return HbmStatus::NullParameter;
        }
        // SAFETY: checked non-NULL; the caller promises a live handle.
        match unsafe { pool_ref(pool) }.trim() {
            Ok(released) => {
                if !out_released.is_null() {
                    // SAFETY: checked non-NULL; the caller promises it is writable.
                    unsafe { *out_released = released };
                }
                HbmStatus::Ok
            }
            Err(e) => HbmStatus::from(&e),
        }
    })
}

/// Fills `*out_stats` with the pool's statistics.
///
/// # Safety
/// `pool` is NULL or a live handle; `out_stats` is NULL or valid for one `HbmPoolStats` write.
#[no_mangle]
pub unsafe extern "C" fn hbm_pool_stats(
    pool: *const HbmPool,
    out_stats: *mut HbmPoolStats,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if pool.is_null() || out_stats.is_null() {
            return HbmStatus::NullParameter;
        }
        // SAFETY: checked non-NULL; the caller promises a live handle.
        let pool = unsafe { pool_ref(pool) };
        let stats = HbmPoolStats::new(pool.kind(), pool.stats());
        // SAFETY: checked non-NULL; the caller promises it is writable.
        unsafe { *out_stats = stats };
        HbmStatus::Ok
    })
}

/// Destroys a pool and gives all its memory back to the device (after one synchronize). NULL is
/// a no-op. Allocations still live are reported in one line on stderr and freed with the pool:
/// their pointers are dangling afterwards.
///
/// # Safety
/// `pool` is NULL or a live handle, not used again by any thread after this call.
#[no_mangle]
pub unsafe extern "C" fn hbm_pool_destroy(pool: *mut HbmPool) {
    ffi_guard!((), {
        if pool.is_null() {
            return;
        }
        // SAFETY: a live handle is a `Box<ScratchPool>` from `hbm_pool_create`, and the caller
        // gives it up here.
        let pool = unsafe { Box::from_raw(pool as *mut ScratchPool) };
        let s = pool.stats();
        if s.live > 0 {
            eprintln!(
                "hbmalloc: hbm_pool_destroy: {} allocation(s), {} bytes, still live in the pool; freed with it",
                s.live, s.in_use
            );
            crate::tracked::scratch::forget_pool(&pool);
        }
        drop(pool);
    })
}

#[cfg(test)]
#[path = "pool_api_tests.rs"]
mod tests;
