//! The KV cache object at the C boundary: `hbm_kv_cache_create` / `_destroy`, growth
//! (`_reserve`, `_release`, `_trim`), where the rows are (`_layer`, `_capacity`), counters
//! (`_stats`), and the append / dequantize kernels.
//!
//! Device pointers throughout: on the CUDA backend they are `CUdeviceptr`s of the cache's device
//! and the kernels run on the caller's stream; on the simulated device (`backend:sim`) device
//! memory is host memory, the CPU reference does the work at once, and the stream is ignored.

use super::guard::ffi_guard;
use super::status::HbmStatus;
use crate::kv::cache::{Growth, KvCache, KvParams, KvStats};
use crate::kv::HbmType;
use crate::runtime;
use crate::tracked;
use std::ffi::{c_int, c_void};

/// How a KV cache gets memory as its sequences grow (`HBM_KV_GROWTH_*` in C).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HbmKvGrowth {
    /// Reserve address space for `n_ctx_max` tokens of every sequence at creation, commit pages as
    /// sequences grow: pointers never move, nothing is copied. On a device without virtual memory
    /// management the cache falls back to `HBM_KV_GROWTH_REALLOC` (see `HbmKvStats.growth`).
    Vmm = 0,
    /// Each sequence owns one buffer per tensor; growing allocates a larger one (doubling), copies
    /// and frees the old. Pointers move: `HbmKvStats.generation` counts the moves.
    Realloc = 1,
    /// Allocate `n_ctx_max` tokens for every sequence at creation.
    Prealloc = 2,
}

impl From<Growth> for HbmKvGrowth {
    fn from(g: Growth) -> HbmKvGrowth {
        match g {
            Growth::Vmm => HbmKvGrowth::Vmm,
            Growth::Realloc => HbmKvGrowth::Realloc,
            Growth::Prealloc => HbmKvGrowth::Prealloc,
        }
    }
}

/// The shape and policy of a KV cache, as llama.cpp lays its cache out: per layer a K and a V
/// tensor, one row of `n_head_kv * head_dim` elements per token, room for `n_ctx_max` tokens in
/// each of `n_seq_max` sequences.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HbmKvParams {
    /// Layers (> 0).
    pub n_layer: u32,
    /// KV heads per layer (> 0).
    pub n_head_kv: u32,
    /// Elements per head (> 0). For Q8_0 and Q4_0, `n_head_kv * head_dim` must be a multiple of 32.
    pub head_dim: u32,
    /// Most tokens one sequence may hold (> 0).
    pub n_ctx_max: u32,
    /// Most sequences live at once (> 0); sequence ids are `0 .. n_seq_max`.
    pub n_seq_max: u32,
    /// Element type of K and of V, as `HBM_TYPE_*` (ggml's numbering): F32, F16, BF16, Q8_0, Q4_0.
    pub type_k: i32,
    pub type_v: i32,
    /// CUDA device ordinal (0 on the simulated device).
    pub device: i32,
    pub growth: HbmKvGrowth,
}

/// `HbmKvParams` as read from C: the growth mode as a plain int, since an out-of-range value in a
/// Rust enum is undefined behaviour before it can even be checked.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawKvParams {
    n_layer: u32,
    n_head_kv: u32,
    head_dim: u32,
    n_ctx_max: u32,
    n_seq_max: u32,
    type_k: i32,
    type_v: i32,
    device: i32,
    growth: c_int,
}

const _: () = {
    assert!(std::mem::size_of::<HbmKvGrowth>() == std::mem::size_of::<c_int>());
    assert!(std::mem::size_of::<HbmKvParams>() == std::mem::size_of::<RawKvParams>());
    assert!(std::mem::align_of::<HbmKvParams>() == std::mem::align_of::<RawKvParams>());
};

impl RawKvParams {
    fn to_params(self) -> Option<(KvParams, i32)> {
        let growth = match self.growth {
            0 => Growth::Vmm,
            1 => Growth::Realloc,
            2 => Growth::Prealloc,
            _ => return None,
        };
        let params = KvParams {
            n_layer: self.n_layer,
            n_head_kv: self.n_head_kv,
            head_dim: self.head_dim,
            n_ctx_max: self.n_ctx_max,
            n_seq_max: self.n_seq_max,
            type_k: HbmType::from_i32(self.type_k)?,
            type_v: HbmType::from_i32(self.type_v)?,
            growth,
        };
        Some((params, self.device))
    }
}

/// Counters of a KV cache, in bytes unless named otherwise.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HbmKvStats {
    /// Device memory the cache holds: committed pages (VMM), sequence buffers (realloc), or
    /// everything (prealloc).
    pub committed: u64,
    /// Address space reserved (VMM); 0 otherwise.
    pub reserved: u64,
    /// Of `committed`, what released sequences left for the next ones (VMM); `hbm_kv_cache_trim`
    /// gives it back.
    pub cached: u64,
    /// Bytes copied by realloc growth, in total.
    pub copied: u64,
    /// Times realloc growth moved a sequence's rows; pointers read before a change are stale.
    pub generation: u64,
    /// Sequences live (reserved and not released).
    pub n_seq: u32,
    /// The growth mode in force: `HBM_KV_GROWTH_REALLOC` after a VMM fallback.
    pub growth: HbmKvGrowth,
}

impl HbmKvStats {
    fn new(s: KvStats, growth: Growth) -> HbmKvStats {
        HbmKvStats {
            committed: s.committed,
            reserved: s.reserved,
            cached: s.cached,
            copied: s.copied,
            generation: s.generation,
            n_seq: s.n_seq,
            growth: growth.into(),
        }
    }
}

/// A KV cache (opaque). Made by `hbm_kv_cache_create`, freed by `hbm_kv_cache_destroy`. Every
/// other function may be called from any thread; they serialize on the cache's lock.
pub struct HbmKvCache {
    _private: [u8; 0],
}

/// The cache behind a handle.
///
/// # Safety
/// `cache` is non-NULL and came from `hbm_kv_cache_create` and was not destroyed.
unsafe fn cache_ref<'a>(cache: *const HbmKvCache) -> &'a KvCache {
    // SAFETY: per this function's contract the handle is a live `Box<KvCache>` turned into a
    // pointer by `hbm_kv_cache_create`; `KvCache` is `Sync`, so shared references are fine.
    unsafe { &*(cache as *const KvCache) }
}

/// Creates a KV cache on `params->device` and stores the handle in `*out_cache`.
///
/// In VMM mode this reserves address space only (`n_layer * 2 * n_seq_max` ranges of `n_ctx_max`
/// rows, rounded up to the granularity); prealloc allocates all of it; realloc allocates nothing
/// until `hbm_kv_cache_reserve`.
///
/// Returns `HBM_STATUS_OK`; `HBM_STATUS_NULL_PARAMETER` if either pointer is NULL;
/// `HBM_STATUS_INVALID_VALUE` for a zero dimension, an unknown type or growth mode, a row
/// (`n_head_kv * head_dim`) that is not a multiple of 32 for Q8_0/Q4_0, or sizes that overflow;
/// `HBM_STATUS_INVALID_DEVICE`; `HBM_STATUS_OUT_OF_MEMORY` when the memory (prealloc) or address
/// space (VMM) is not there. On an error `*out_cache` is untouched and nothing is held.
///
/// The caller owns the cache and frees it with `hbm_kv_cache_destroy`.
///
/// # Safety
/// `params` is NULL or points at an `HbmKvParams`; `out_cache` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn hbm_kv_cache_create(
    params: *const HbmKvParams,
    out_cache: *mut *mut HbmKvCache,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if params.is_null() || out_cache.is_null() {
            return HbmStatus::NullParameter;
        }
        // SAFETY: non-NULL, and the caller promises an `HbmKvParams`, whose layout `RawKvParams`
        // shares (checked at compile time) with the growth mode as a plain int. An unaligned
        // read costs nothing here and survives a misaligned pointer.
        let raw = unsafe { params.cast::<RawKvParams>().read_unaligned() };
        let Some((p, device)) = raw.to_params() else {
            return HbmStatus::InvalidValue;
        };
        let cache = match runtime::backend(device).and_then(|b| tracked::kv::create(b, p, device)) {
            Ok(cache) => cache,
            Err(e) => return HbmStatus::from(&e),
        };
        // SAFETY: checked non-NULL; the caller promises it is writable.
        unsafe { *out_cache = Box::into_raw(cache).cast() };
        HbmStatus::Ok
    })
}

/// Destroys a cache: waits for the device to finish with it, then gives back all its memory and
/// address space. NULL is a no-op. Pointers obtained from the cache are invalid afterwards.
///
/// # Safety
/// `cache` is NULL or a handle from `hbm_kv_cache_create` not yet destroyed, used by no other
/// thread during or after the call.
#[no_mangle]
pub unsafe extern "C" fn hbm_kv_cache_destroy(cache: *mut HbmKvCache) {
    ffi_guard!((), {
        if !cache.is_null() {
            // SAFETY: per the contract, a live `Box<KvCache>` that nobody else uses.
            tracked::kv::destroy(unsafe { Box::from_raw(cache as *mut KvCache) });
        }
    })
}

/// Makes room for `n_tokens` tokens in sequence `seq` (`0 .. n_seq_max`), starting the sequence
/// if it is not live. Capacity never shrinks; asking for less than the capacity does nothing.
/// VMM commits pages (pointers stay); realloc may move the sequence's rows (copying them, and
/// bumping `generation`); prealloc only checks bounds.
///
/// Returns `HBM_STATUS_OK`; `HBM_STATUS_NULL_PARAMETER` for a NULL cache;
/// `HBM_STATUS_INVALID_VALUE` for `n_tokens > n_ctx_max`, `seq >= n_seq_max`, or every slot taken;
/// `HBM_STATUS_OUT_OF_MEMORY` when the device is full even after released sequences' pages were
/// given back. On an error the live sequences and their contents are unchanged.
///
/// # Safety
/// `cache` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn hbm_kv_cache_reserve(
    cache: *const HbmKvCache,
    seq: u32,
    n_tokens: u32,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if cache.is_null() {
            return HbmStatus::NullParameter;
        }
        // SAFETY: non-NULL, and the caller promises a live handle.
        let c = unsafe { cache_ref(cache) };
        let result = c.reserve(seq, n_tokens);
        tracked::kv::resized(c);
        HbmStatus::from(result)
    })
}

/// Ends sequence `seq`. VMM keeps its pages for the next sequence (counted in
/// `HbmKvStats.cached`); realloc frees its buffers after a device synchronize. The next
/// `hbm_kv_cache_reserve` of the same id starts a new sequence, whose rows hold stale data.
///
/// Returns `HBM_STATUS_OK`; `HBM_STATUS_NULL_PARAMETER`; `HBM_STATUS_INVALID_VALUE` when `seq` is
/// out of range or not live (never reserved, or already released).
///
/// # Safety
/// `cache` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn hbm_kv_cache_release(cache: *const HbmKvCache, seq: u32) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if cache.is_null() {
            return HbmStatus::NullParameter;
        }
        // SAFETY: non-NULL, and the caller promises a live handle.
        let c = unsafe { cache_ref(cache) };
        let result = c.release(seq);
        tracked::kv::resized(c);
        HbmStatus::from(result)
    })
}

/// Gives back the pages released sequences left committed (VMM; after one device synchronize).
/// `out_released` (may be NULL) receives the bytes given back.
///
/// # Safety
/// `cache` is NULL or a live handle; `out_released` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn hbm_kv_cache_trim(
    cache: *const HbmKvCache,
    out_released: *mut u64,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if cache.is_null() {
            return HbmStatus::NullParameter;
        }
        // SAFETY: non-NULL, and the caller promises a live handle.
        let c = unsafe { cache_ref(cache) };
        let released = c.trim();
        tracked::kv::resized(c);
        if !out_released.is_null() {
            // SAFETY: checked non-NULL; the caller promises it is writable.
            unsafe { *out_released = released };
        }
        HbmStatus::Ok
    })
}

/// Tokens live sequence `seq` can hold now (its committed capacity), into `*out_n_tokens`.
/// Rows `0 .. capacity` may be appended to, read and written without growing.
///
/// Returns `HBM_STATUS_OK`; `HBM_STATUS_NULL_PARAMETER`; `HBM_STATUS_INVALID_VALUE` when `seq` is
/// out of range or not live. On an error `*out_n_tokens` is untouched.
///
/// # Safety
/// `cache` is NULL or a live handle; `out_n_tokens` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn hbm_kv_cache_capacity(
    cache: *const HbmKvCache,
    seq: u32,
    out_n_tokens: *mut u32,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if cache.is_null() || out_n_tokens.is_null() {
            return HbmStatus::NullParameter;
        }
        // SAFETY: non-NULL, and the caller promises a live handle.
        match unsafe { cache_ref(cache) }.capacity(seq) {
            Ok(n) => {
                // SAFETY: checked non-NULL; the caller promises it is writable.
                unsafe { *out_n_tokens = n };
                HbmStatus::Ok
            }
            Err(e) => HbmStatus::from(&e),
        }
    })
}

/// Where live sequence `seq`'s rows are in layer `layer`: its K rows start at `*out_k` and its V
/// rows at `*out_v` (device pointers), token `t`'s row at `k + t * row_stride_k` (and likewise
/// for V), valid for `t` below the sequence's capacity (`hbm_kv_cache_capacity`). A row is
/// `n_head_kv * head_dim` elements of the tensor's type (ggml's `ggml_row_size`), heads one after
/// the other.
///
/// VMM and prealloc pointers never change while the sequence lives; realloc pointers change
/// whenever `HbmKvStats.generation` does. The cache owns the memory: never free it.
///
/// Returns `HBM_STATUS_OK`; `HBM_STATUS_NULL_PARAMETER` if any pointer is NULL;
/// `HBM_STATUS_INVALID_VALUE` for `layer >= n_layer`, `seq` out of range or not live. On an
/// error the outputs are untouched.
///
/// # Safety
/// `cache` is NULL or a live handle; each output is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn hbm_kv_cache_layer(
    cache: *const HbmKvCache,
    layer: u32,
    seq: u32,
    out_k: *mut *mut c_void,
    out_v: *mut *mut c_void,
    out_row_stride_k: *mut usize,
    out_row_stride_v: *mut usize,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if cache.is_null()
            || out_k.is_null()
            || out_v.is_null()
            || out_row_stride_k.is_null()
            || out_row_stride_v.is_null()
        {
            return HbmStatus::NullParameter;
        }
        // SAFETY: non-NULL, and the caller promises a live handle.
        let c = unsafe { cache_ref(cache) };
        match c.seq_rows(layer, seq) {
            Ok((k, v)) => {
                // SAFETY: all four checked non-NULL; the caller promises they are writable.
                unsafe {
                    *out_k = k as *mut c_void;
                    *out_v = v as *mut c_void;
                    *out_row_stride_k = c.row_bytes_k();
                    *out_row_stride_v = c.row_bytes_v();
                }
                HbmStatus::Ok
            }
            Err(e) => HbmStatus::from(&e),
        }
    })
}

/// Fills `*out_stats` with the cache's counters.
///
/// # Safety
/// `cache` is NULL or a live handle; `out_stats` is NULL or valid for one `HbmKvStats` write.
#[no_mangle]
pub unsafe extern "C" fn hbm_kv_cache_stats(
    cache: *const HbmKvCache,
    out_stats: *mut HbmKvStats,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if cache.is_null() || out_stats.is_null() {
            return HbmStatus::NullParameter;
        }
        // SAFETY: non-NULL, and the caller promises a live handle.
        let c = unsafe { cache_ref(cache) };
        let stats = HbmKvStats::new(c.stats(), c.params().growth);
        // SAFETY: checked non-NULL; the caller promises it is writable.
        unsafe { *out_stats = stats };
        HbmStatus::Ok
    })
}

/// Queues on `stream` the append of `n_tokens` tokens to live sequence `seq` in layer `layer`,
/// at rows `pos .. pos + n_tokens`, converting to the cache's types: F16/BF16 round to nearest
/// even, Q8_0/Q4_0 quantize bit for bit as ggml's `quantize_row_q8_0_ref`/`_q4_0_ref`.
///
/// - `k_src`, `v_src`: `n_tokens` rows of `n_head_kv * head_dim` elements of `src_type`,
///   contiguous, in device memory, aligned to the element size; either may be NULL to leave
///   that tensor alone (not both). Read by the kernel as it runs: keep them until `stream` passes.
/// - `src_type`: `HBM_TYPE_F32` or `HBM_TYPE_F16`.
/// - `stream`: a `cudaStream_t` of the cache's device (NULL: the legacy default stream).
///
/// Returns `HBM_STATUS_OK` once queued; `HBM_STATUS_NULL_PARAMETER` for a NULL cache or both
/// sources NULL; `HBM_STATUS_INVALID_VALUE` for `layer` or `seq` out of range, a sequence not
/// live, `pos + n_tokens` beyond its capacity (reserve first), another `src_type`, or a misaligned
/// source (nothing is queued then); `HBM_STATUS_NOT_SUPPORTED` when NVRTC cannot compile the
/// kernels; `HBM_STATUS_DRIVER_ERROR` when a launch fails (K may then be written and V not).
///
/// # Safety
/// `cache` is NULL or a live handle; the sources are NULL or device memory of the sizes above.
#[no_mangle]
pub unsafe extern "C" fn hbm_kv_cache_append(
    cache: *const HbmKvCache,
    layer: u32,
    seq: u32,
    pos: u32,
    k_src: *const c_void,
    v_src: *const c_void,
    src_type: i32,
    n_tokens: u32,
    stream: *mut c_void,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if cache.is_null() || (k_src.is_null() && v_src.is_null()) {
            return HbmStatus::NullParameter;
        }
        let Some(ty) = HbmType::from_i32(src_type) else {
            return HbmStatus::InvalidValue;
        };
        // SAFETY: non-NULL, and the caller promises a live handle.
        HbmStatus::from(unsafe { cache_ref(cache) }.append(
            layer,
            seq,
            pos,
            n_tokens,
            k_src as usize,
            v_src as usize,
            ty,
            stream as usize,
        ))
    })
}

/// Queues on `stream` the conversion of live sequence `seq`'s rows `pos .. pos + n_tokens` in
/// layer `layer` into `k_dst` and `v_dst` as `dst_type`: exact for F32/F16/BF16 caches, `q * d`
/// (Q8_0) or `(q - 8) * d` (Q4_0) as ggml's `dequantize_row_*`, rounded to nearest even for F16.
///
/// - `k_dst`, `v_dst`: room for `n_tokens` rows of `n_head_kv * head_dim` elements of
///   `dst_type`, contiguous, in device memory, aligned to the element size; either may be NULL
///   (not both). Owned by the caller.
/// - `dst_type`: `HBM_TYPE_F32` or `HBM_TYPE_F16`.
/// - `stream`: as for `hbm_kv_cache_append`.
///
/// Returns as `hbm_kv_cache_append` does.
///
/// # Safety
/// `cache` is NULL or a live handle; the destinations are NULL or device memory of the sizes
/// above, not overlapping the cache.
#[no_mangle]
pub unsafe extern "C" fn hbm_kv_cache_dequantize(
    cache: *const HbmKvCache,
    layer: u32,
    seq: u32,
    pos: u32,
    n_tokens: u32,
    k_dst: *mut c_void,
    v_dst: *mut c_void,
    dst_type: i32,
    stream: *mut c_void,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if cache.is_null() || (k_dst.is_null() && v_dst.is_null()) {
            return HbmStatus::NullParameter;
        }
        let Some(ty) = HbmType::from_i32(dst_type) else {
            return HbmStatus::InvalidValue;
        };
        // SAFETY: non-NULL, and the caller promises a live handle.
        HbmStatus::from(unsafe { cache_ref(cache) }.dequantize(
            layer,
            seq,
            pos,
            n_tokens,
            k_dst as usize,
            v_dst as usize,
            ty,
            stream as usize,
        ))
    })
}

#[cfg(test)]
#[path = "kv_cache_api_tests.rs"]
mod tests;
