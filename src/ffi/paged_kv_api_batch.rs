//! The paged KV cache's batched calls at the C boundary: a whole step's appends
//! (`hbm_paged_kv_append_step`), a sequence's gather over every layer
//! (`hbm_paged_kv_gather_layers`), and the reference decode attention
//! (`hbm_paged_kv_decode_attention`). Device pointers as in `paged_kv_api`.

use super::guard::ffi_guard;
use super::paged_kv_api::{with_kv, HbmPagedKv};
use super::status::HbmStatus;
use crate::backend::DevicePtr;
use crate::kv::HbmType;
use std::ffi::c_void;

/// `n` device pointers from a host array, or an empty list for NULL.
///
/// # Safety
/// `p` is NULL or valid for `n` reads.
unsafe fn pointers(p: *const *const c_void, n: usize) -> Vec<DevicePtr> {
    if p.is_null() {
        return Vec::new();
    }
    // SAFETY: non-NULL, and the caller promises `n` readable entries.
    unsafe { std::slice::from_raw_parts(p, n) }
        .iter()
        .map(|&x| x as DevicePtr)
        .collect()
}

/// `n` `u32`s from a host array (NULL allowed when `n` is 0).
///
/// # Safety
/// `p` is NULL or valid for `n` reads.
unsafe fn u32s<'a>(p: *const u32, n: u32) -> &'a [u32] {
    if n == 0 {
        return &[];
    }
    // SAFETY: the caller checked `p` is not NULL and promises `n` readable entries.
    unsafe { std::slice::from_raw_parts(p, n as usize) }
}

/// Queues on `stream` one decode or prefill step's appends for every layer at once: the last
/// `n_new[i]` tokens of each live sequence `seqs[i]` (call `hbm_paged_kv_seq_add_tokens` for
/// them first), converted to the cache's types exactly as `hbm_paged_kv_append` does, tokens
/// a sliding window already dropped skipped.
///
/// - `seqs`, `n_new`: `n_seqs` entries each, host memory.
/// - `k_src`, `v_src`: host arrays of one device pointer per layer (`n_layer` of the cache);
///   layer `l`'s pointer holds its rows of the step's tokens, sequence after sequence as
///   `hbm_paged_kv_slot_mapping` lists them, contiguous, `src_type`. An entry may be NULL (that
///   tensor is not written); `v_src` itself may be NULL (no V written).
/// - `src_type`: `HBM_TYPE_F32` or `HBM_TYPE_F16`.
///
/// On CUDA this is one kernel launch for the whole step when K and V have the same type (two
/// when they differ), whatever the number of layers and sequences.
///
/// Returns `HBM_STATUS_OK` once queued; `HBM_STATUS_NULL_PARAMETER` for a NULL cache, `k_src`,
/// or `seqs`/`n_new` with `n_seqs > 0`; `HBM_STATUS_INVALID_VALUE` for a sequence not live,
/// `n_new` beyond its length, a token in a block shared with another sequence, a V source on a
/// layer without V, another `src_type` or a misaligned source: nothing is queued then.
/// `HBM_STATUS_OUT_OF_MEMORY` when the staging buffer for the step's descriptors cannot be had.
///
/// # Safety
/// `kv` is NULL or a live handle; `seqs`, `n_new` NULL or valid for `n_seqs` reads; `k_src`
/// (and `v_src` unless NULL) valid for `n_layer` reads, each entry NULL or device memory of the
/// size above.
#[no_mangle]
pub unsafe extern "C" fn hbm_paged_kv_append_step(
    kv: *const HbmPagedKv,
    seqs: *const u32,
    n_new: *const u32,
    n_seqs: u32,
    k_src: *const *const c_void,
    v_src: *const *const c_void,
    src_type: i32,
    stream: *mut c_void,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if k_src.is_null() || (n_seqs > 0 && (seqs.is_null() || n_new.is_null())) {
            return HbmStatus::NullParameter;
        }
        let Some(ty) = HbmType::from_i32(src_type) else {
            return HbmStatus::InvalidValue;
        };
        // SAFETY: the caller promises a live handle or NULL, and the arrays' lengths.
        unsafe {
            with_kv(kv, |c| {
                let n = c.params().layers.len();
                let (k, v) = (pointers(k_src, n), pointers(v_src, n));
                let (s, m) = (u32s(seqs, n_seqs), u32s(n_new, n_seqs));
                c.append_step(s, m, &k, &v, ty, stream as usize)
            })
        }
    })
}

/// Queues on `stream` the conversion of live sequence `seq`'s tokens `start .. start +
/// n_tokens` of every layer into contiguous rows, as `hbm_paged_kv_gather` does one layer at a
/// time: `k_dst` (and `v_dst`, which may be NULL) are host arrays of one device pointer per
/// layer (`n_layer` of the cache), an entry NULL to skip that tensor. On CUDA one kernel launch
/// per pair of element types.
///
/// Returns `HBM_STATUS_OK` once queued; `HBM_STATUS_NULL_PARAMETER` for a NULL cache or `k_dst`;
/// `HBM_STATUS_INVALID_VALUE` as `hbm_paged_kv_gather` (nothing is queued then).
///
/// # Safety
/// `kv` is NULL or a live handle; `k_dst` (and `v_dst` unless NULL) valid for `n_layer` reads,
/// each entry NULL or device memory of `n_tokens` rows, not overlapping the cache.
#[no_mangle]
pub unsafe extern "C" fn hbm_paged_kv_gather_layers(
    kv: *const HbmPagedKv,
    seq: u32,
    start: u32,
    n_tokens: u32,
    k_dst: *const *mut c_void,
    v_dst: *const *mut c_void,
    dst_type: i32,
    stream: *mut c_void,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if k_dst.is_null() {
            return HbmStatus::NullParameter;
        }
        let Some(ty) = HbmType::from_i32(dst_type) else {
            return HbmStatus::InvalidValue;
        };
        // SAFETY: the caller promises a live handle or NULL, and the arrays' lengths.
        unsafe {
            with_kv(kv, |c| {
                let n = c.params().layers.len();
                let (k, v) = (pointers(k_dst.cast(), n), pointers(v_dst.cast(), n));
                c.gather_layers(seq, start, n_tokens, &k, &v, ty, stream as usize)
            })
        }
    })
}

/// Queues on `stream` a reference decode attention of `layer` over the paged cache, reading K
/// and V through the block table: for query `i` (sequence `seqs[i]`, every token it holds),
/// `out[i] = softmax(q[i] . K^T * scale) V` per query head, query head `h` reading KV head
/// `h / (n_heads / n_kv_heads)`. Correct rather than fast: for checks, and for engines without
/// paged kernels.
///
/// - `seqs`: `n_seqs` live sequence ids, host memory.
/// - `q`: `float [n_seqs][n_heads][head_dim_k]`, `out`: `float [n_seqs][n_heads][head_dim_v]`,
///   device memory.
///
/// Returns `HBM_STATUS_OK` once queued; `HBM_STATUS_NULL_PARAMETER` for a NULL cache, `q` or
/// `out`, or NULL `seqs` with `n_seqs > 0`; `HBM_STATUS_INVALID_VALUE` for a sequence not live,
/// a layer out of range, without V or with a sliding window, a Q8_0/Q4_0 cache (gather it
/// first), K and V of different types, `n_heads` not a multiple of the layer's KV heads, or a
/// sequence too long for the kernel's shared memory (about 12 000 tokens).
///
/// # Safety
/// `kv` is NULL or a live handle; `seqs` NULL or valid for `n_seqs` reads; `q` and `out` device
/// memory of the sizes above.
#[no_mangle]
pub unsafe extern "C" fn hbm_paged_kv_decode_attention(
    kv: *const HbmPagedKv,
    layer: u32,
    seqs: *const u32,
    n_seqs: u32,
    n_heads: u32,
    q: *const f32,
    out: *mut f32,
    scale: f32,
    stream: *mut c_void,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if q.is_null() || out.is_null() || (n_seqs > 0 && seqs.is_null()) {
            return HbmStatus::NullParameter;
        }
        // SAFETY: the caller promises a live handle or NULL, and `n_seqs` readable ids.
        unsafe {
            with_kv(kv, |c| {
                c.decode_attention(
                    layer,
                    u32s(seqs, n_seqs),
                    n_heads,
                    q as usize,
                    out as usize,
                    scale,
                    stream as usize,
                )
            })
        }
    })
}

#[cfg(test)]
#[path = "paged_kv_api_batch_tests.rs"]
mod tests;
