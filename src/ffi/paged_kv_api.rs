//! The paged KV cache at the C boundary: `hbm_paged_kv_create` / `_destroy`, sequences
//! (`_seq_add_tokens`, `_seq_fork`, `_seq_truncate`, `_seq_free`, `_seq_len`), where the blocks
//! are (`_layer`, `_block_table`), a step's writes (`_slot_mapping`, `_append`), reads
//! (`_gather`), and counters (`_stats`, `_trim`). The batched calls (a whole step, every layer's
//! gather, attention) are in `paged_kv_api_batch`.
//!
//! Device pointers throughout, as in `kv_cache_api`: `CUdeviceptr`s of the cache's device on
//! CUDA, host memory on the simulated device (`backend:sim`), where the work is done at once and
//! the stream is ignored.

use super::guard::ffi_guard;
use super::status::HbmStatus;
use crate::kv::paged::{LayerSpec, PagedKvCache, PagedParams, PagedStats, DEFAULT_BLOCK_TOKENS};
use crate::kv::HbmType;
use crate::runtime;
use std::ffi::c_void;

/// One layer of a paged KV cache.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HbmPagedKvLayer {
    /// KV heads of this layer (> 0); layers may differ.
    pub n_kv_heads: u32,
    /// Elements per K head (> 0).
    pub head_dim_k: u32,
    /// Elements per V head; 0 for a layer without V (MLA: one latent per token, in K).
    pub head_dim_v: u32,
    /// Sliding window in tokens (the layer keeps the blocks of its last `window` tokens and gives
    /// the older ones back); 0 for full attention.
    pub window: u32,
}

/// The shape of a paged KV cache. Per layer, K is `[num_blocks, block_tokens, n_kv_heads,
/// head_dim_k]` and V the same with `head_dim_v` (vLLM's layout), rows in the element type's
/// encoding (ggml's `ggml_row_size`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HbmPagedKvParams {
    /// `n_layer` layer descriptions (read during the call only).
    pub layers: *const HbmPagedKvLayer,
    /// Layers (> 0).
    pub n_layer: u32,
    /// Element type of K and of V, as `HBM_TYPE_*`: F32, F16, BF16, Q8_0, Q4_0. For Q8_0/Q4_0 a
    /// layer's `n_kv_heads * head_dim` must be a multiple of 32.
    pub type_k: i32,
    pub type_v: i32,
    /// Tokens per block; 0 for the default, 16.
    pub block_tokens: u32,
    /// Blocks in the pool of each window (full-attention layers share one pool, each distinct
    /// sliding window has its own): the most the cache holds. Address space for all of them is
    /// reserved at creation; memory is committed as blocks come into use. At most `INT32_MAX`.
    pub num_blocks: u32,
    /// Sequence ids are `0 .. max_seqs`.
    pub max_seqs: u32,
    /// Most tokens one sequence may hold; block tables have `ceil(max_seq_tokens / block_tokens)`
    /// entries per sequence.
    pub max_seq_tokens: u32,
    /// CUDA device ordinal (0 on the simulated device).
    pub device: i32,
}

/// Counters of a paged KV cache, summed over its pools.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HbmPagedKvStats {
    pub blocks_total: u64,
    /// Blocks held by at least one sequence.
    pub blocks_used: u64,
    pub blocks_free: u64,
    /// Of `blocks_used`, those held by more than one sequence (forked prefixes).
    pub blocks_shared: u64,
    /// Device memory behind the blocks (mapped granules; everything without VMM).
    pub bytes_committed: u64,
    /// Address space reserved for the blocks (0 without VMM).
    pub bytes_reserved: u64,
    /// Device memory of the block tables.
    pub bytes_tables: u64,
    /// Tokens of all live sequences (a shared prefix counts in each).
    pub tokens: u64,
    /// Blocks copied because a shared block was appended to.
    pub cow_copies: u64,
    /// Live sequences.
    pub n_seq: u32,
}

impl From<PagedStats> for HbmPagedKvStats {
    fn from(s: PagedStats) -> HbmPagedKvStats {
        HbmPagedKvStats {
            blocks_total: s.blocks_total,
            blocks_used: s.blocks_used,
            blocks_free: s.blocks_free,
            blocks_shared: s.blocks_shared,
            bytes_committed: s.bytes_committed,
            bytes_reserved: s.bytes_reserved,
            bytes_tables: s.bytes_tables,
            tokens: s.tokens,
            cow_copies: s.cow_copies,
            n_seq: s.n_seq,
        }
    }
}

/// A paged KV cache (opaque). Made by `hbm_paged_kv_create`, freed by `hbm_paged_kv_destroy`.
/// Every other function may be called from any thread; they serialize on the cache's lock.
pub struct HbmPagedKv {
    _private: [u8; 0],
}

/// The cache behind a handle.
///
/// # Safety
/// `kv` is non-NULL, came from `hbm_paged_kv_create` and was not destroyed.
unsafe fn kv_ref<'a>(kv: *const HbmPagedKv) -> &'a PagedKvCache {
    // SAFETY: per this function's contract, a live `Box<PagedKvCache>` turned into a pointer by
    // `hbm_paged_kv_create`; `PagedKvCache` is `Sync`.
    unsafe { &*(kv as *const PagedKvCache) }
}

/// Runs `f` on the cache, or returns `HBM_STATUS_NULL_PARAMETER` for a NULL handle.
///
/// # Safety
/// `kv` is NULL or a live handle.
pub(super) unsafe fn with_kv<T>(
    kv: *const HbmPagedKv,
    f: impl FnOnce(&PagedKvCache) -> crate::error::Result<T>,
) -> HbmStatus {
    if kv.is_null() {
        return HbmStatus::NullParameter;
    }
    // SAFETY: non-NULL, and the caller promises a live handle.
    HbmStatus::from(f(unsafe { kv_ref(kv) }))
}

/// Creates a paged KV cache on `params->device` and stores the handle in `*out_kv`: reserves
/// address space for every block of every layer (nothing committed yet; on a device without
/// virtual memory management all blocks are allocated now) and allocates the block tables, all -1.
///
/// Returns `HBM_STATUS_OK`; `HBM_STATUS_NULL_PARAMETER` if `params`, `params->layers` or `out_kv`
/// is NULL; `HBM_STATUS_INVALID_VALUE` for a zero count, more than 65536 layers, an unknown type,
/// a row that is not whole
/// Q8_0/Q4_0 blocks, or sizes that overflow; `HBM_STATUS_INVALID_DEVICE`;
/// `HBM_STATUS_OUT_OF_MEMORY` when the address space or tables are not there. On an error
/// `*out_kv` is untouched and nothing is held. The caller frees the cache with
/// `hbm_paged_kv_destroy`.
///
/// # Safety
/// `params` is NULL or points at an `HbmPagedKvParams` whose `layers` is NULL or points at
/// `n_layer` layers; `out_kv` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn hbm_paged_kv_create(
    params: *const HbmPagedKvParams,
    out_kv: *mut *mut HbmPagedKv,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if params.is_null() || out_kv.is_null() {
            return HbmStatus::NullParameter;
        }
        // SAFETY: non-NULL; the caller promises an `HbmPagedKvParams` (plain integers and a
        // pointer: every bit pattern is valid). Unaligned reads survive a misaligned pointer.
        let p = unsafe { params.read_unaligned() };
        if p.layers.is_null() {
            return HbmStatus::NullParameter;
        }
        if p.n_layer == 0 || p.n_layer > 1 << 16 {
            return HbmStatus::InvalidValue;
        }
        let layers = (0..p.n_layer as usize)
            .map(|i| {
                // SAFETY: the caller promises `n_layer` layers at `layers`.
                let l = unsafe { p.layers.add(i).read_unaligned() };
                LayerSpec {
                    n_kv_heads: l.n_kv_heads,
                    head_dim_k: l.head_dim_k,
                    head_dim_v: l.head_dim_v,
                    window: l.window,
                }
            })
            .collect();
        let (Some(type_k), Some(type_v)) =
            (HbmType::from_i32(p.type_k), HbmType::from_i32(p.type_v))
        else {
            return HbmStatus::InvalidValue;
        };
        let params = PagedParams {
            layers,
            type_k,
            type_v,
            block_tokens: match p.block_tokens {
                0 => DEFAULT_BLOCK_TOKENS,
                n => n,
            },
            num_blocks: p.num_blocks,
            max_seqs: p.max_seqs,
            max_seq_tokens: p.max_seq_tokens,
        };
        match runtime::backend(p.device).and_then(|b| PagedKvCache::new(b, params)) {
            Ok(kv) => {
                // SAFETY: checked non-NULL; the caller promises it is writable.
                unsafe { *out_kv = Box::into_raw(Box::new(kv)).cast() };
                HbmStatus::Ok
            }
            Err(e) => HbmStatus::from(&e),
        }
    })
}

/// Destroys a cache: waits for the device to finish with it, then gives back all its memory and
/// address space. NULL is a no-op. Pointers obtained from the cache are invalid afterwards.
///
/// # Safety
/// `kv` is NULL or a handle from `hbm_paged_kv_create` not yet destroyed, used by no other
/// thread during or after the call.
#[no_mangle]
pub unsafe extern "C" fn hbm_paged_kv_destroy(kv: *mut HbmPagedKv) {
    ffi_guard!((), {
        if !kv.is_null() {
            // SAFETY: per the contract, a live `Box<PagedKvCache>` that nobody else uses.
            drop(unsafe { Box::from_raw(kv as *mut PagedKvCache) });
        }
    })
}

/// Makes sequence `seq` (`0 .. max_seqs`) `n_tokens` longer, starting it if it is not live:
/// takes blocks from the pools as needed (committing memory for them), copies a shared last block
/// before it is appended to (copy-on-write, queued on `stream`), and lets sliding-window layers
/// give back the blocks that fell out of their window. Then `hbm_paged_kv_slot_mapping` gives the
/// new tokens' slots, and the block tables on the device are up to date.
///
/// Returns `HBM_STATUS_OK`; `HBM_STATUS_NULL_PARAMETER` for a NULL cache;
/// `HBM_STATUS_INVALID_VALUE` for `seq >= max_seqs` or a length beyond `max_seq_tokens`;
/// `HBM_STATUS_OUT_OF_MEMORY` when a pool has too few free blocks or the device too little
/// memory (the engine may free or preempt sequences and retry). On an error nothing changed.
///
/// # Safety
/// `kv` is NULL or a live handle; `stream` a `cudaStream_t` of the cache's device or NULL.
#[no_mangle]
pub unsafe extern "C" fn hbm_paged_kv_seq_add_tokens(
    kv: *const HbmPagedKv,
    seq: u32,
    n_tokens: u32,
    stream: *mut c_void,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        // SAFETY: the caller promises a live handle or NULL.
        unsafe { with_kv(kv, |c| c.add_tokens(seq, n_tokens, stream as usize)) }
    })
}

/// Starts sequence `dst` as a copy of live sequence `src`: same length, sharing every block
/// (prefix sharing, reference-counted; nothing is copied now).
///
/// Returns `HBM_STATUS_OK`; `HBM_STATUS_NULL_PARAMETER`; `HBM_STATUS_INVALID_VALUE` when `src`
/// is not live, `dst` is live, or either is out of range. On an error nothing changed.
///
/// # Safety
/// `kv` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn hbm_paged_kv_seq_fork(
    kv: *const HbmPagedKv,
    src: u32,
    dst: u32,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        // SAFETY: the caller promises a live handle or NULL.
        unsafe { with_kv(kv, |c| c.fork(src, dst)) }
    })
}

/// Shortens live sequence `seq` to `n_tokens` tokens, giving back the blocks past its new end.
///
/// Returns `HBM_STATUS_OK`; `HBM_STATUS_NULL_PARAMETER`; `HBM_STATUS_INVALID_VALUE` when `seq`
/// is not live, `n_tokens` exceeds its length, or a sliding-window layer already gave back blocks
/// the shorter sequence's window would need. On an error nothing changed.
///
/// # Safety
/// `kv` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn hbm_paged_kv_seq_truncate(
    kv: *const HbmPagedKv,
    seq: u32,
    n_tokens: u32,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        // SAFETY: the caller promises a live handle or NULL.
        unsafe { with_kv(kv, |c| c.truncate(seq, n_tokens)) }
    })
}

/// Ends live sequence `seq`: its blocks go back to the pool (shared ones are held once less) and
/// its block-table rows become -1. The blocks keep their memory for the next ones until
/// `hbm_paged_kv_trim`.
///
/// Returns `HBM_STATUS_OK`; `HBM_STATUS_NULL_PARAMETER`; `HBM_STATUS_INVALID_VALUE` when `seq`
/// is not live.
///
/// # Safety
/// `kv` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn hbm_paged_kv_seq_free(kv: *const HbmPagedKv, seq: u32) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        // SAFETY: the caller promises a live handle or NULL.
        unsafe { with_kv(kv, |c| c.free(seq)) }
    })
}

/// Tokens live sequence `seq` holds, into `*out_len`.
///
/// Returns `HBM_STATUS_OK`; `HBM_STATUS_NULL_PARAMETER`; `HBM_STATUS_INVALID_VALUE` when `seq`
/// is not live (`*out_len` untouched).
///
/// # Safety
/// `kv` is NULL or a live handle; `out_len` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn hbm_paged_kv_seq_len(
    kv: *const HbmPagedKv,
    seq: u32,
    out_len: *mut u32,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if out_len.is_null() {
            return HbmStatus::NullParameter;
        }
        // SAFETY: the caller promises a live handle or NULL; `out_len` checked non-NULL and
        // writable per the contract.
        unsafe {
            with_kv(kv, |c| {
                *out_len = c.seq_len(seq)?;
                Ok(())
            })
        }
    })
}

/// The block table `layer` reads, as paged-attention kernels take it (vLLM's and FlashAttention's
/// `block_table`): `int32_t [max_seqs][max_blocks_per_seq]` in device memory, row `seq` holding
/// the sequence's block ids in order, -1 past its end and where a sliding window gave blocks
/// back. Layers with the same window share one table. The cache owns it and keeps it current;
/// the pointer never changes.
///
/// Returns `HBM_STATUS_OK`; `HBM_STATUS_NULL_PARAMETER` if any pointer is NULL;
/// `HBM_STATUS_INVALID_VALUE` for `layer >= n_layer` (outputs untouched).
///
/// # Safety
/// `kv` is NULL or a live handle; each output NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn hbm_paged_kv_block_table(
    kv: *const HbmPagedKv,
    layer: u32,
    out_table: *mut *const i32,
    out_max_blocks_per_seq: *mut u32,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if out_table.is_null() || out_max_blocks_per_seq.is_null() {
            return HbmStatus::NullParameter;
        }
        // SAFETY: as for `hbm_paged_kv_seq_len`.
        unsafe {
            with_kv(kv, |c| {
                let t = c.block_table(layer)?;
                *out_table = t as *const i32;
                *out_max_blocks_per_seq = c.max_blocks_per_seq();
                Ok(())
            })
        }
    })
}

/// Where `layer`'s blocks are: the K tensor at `*out_k`, the V tensor at `*out_v` (NULL for a
/// layer without V), device pointers; token `o` of block `b` at `k + (b * block_tokens + o) *
/// row_bytes_k` (likewise V), a row being `n_kv_heads * head_dim` elements, heads one after the
/// other. The pointers never change; the cache owns the memory.
///
/// Returns `HBM_STATUS_OK`; `HBM_STATUS_NULL_PARAMETER` if any pointer is NULL;
/// `HBM_STATUS_INVALID_VALUE` for `layer >= n_layer` (outputs untouched).
///
/// # Safety
/// `kv` is NULL or a live handle; each output NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn hbm_paged_kv_layer(
    kv: *const HbmPagedKv,
    layer: u32,
    out_k: *mut *mut c_void,
    out_v: *mut *mut c_void,
    out_row_bytes_k: *mut usize,
    out_row_bytes_v: *mut usize,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if out_k.is_null()
            || out_v.is_null()
            || out_row_bytes_k.is_null()
            || out_row_bytes_v.is_null()
        {
            return HbmStatus::NullParameter;
        }
        // SAFETY: as for `hbm_paged_kv_seq_len`, for all four outputs.
        unsafe {
            with_kv(kv, |c| {
                let (k, v, rk, rv) = c.layer_tensors(layer)?;
                *out_k = k as *mut c_void;
                *out_v = v as *mut c_void;
                *out_row_bytes_k = rk;
                *out_row_bytes_v = rv;
                Ok(())
            })
        }
    })
}

/// The slot mapping of a step for `layer`: for each `i < n_seqs`, the slots of the last
/// `n_new[i]` tokens of live sequence `seqs[i]`, in order, into host memory `out_slots`
/// (`block * block_tokens + offset`; -1 for a token its sliding window already gave back, which
/// `hbm_paged_kv_append` skips). Call after `hbm_paged_kv_seq_add_tokens`. `*out_n_slots`
/// receives the number of slots (the sum of `n_new`), also when `capacity` is too small.
///
/// Returns `HBM_STATUS_OK`; `HBM_STATUS_NULL_PARAMETER` for a NULL cache or output, or NULL
/// arrays with `n_seqs > 0`; `HBM_STATUS_INVALID_VALUE` for `layer` out of range, a sequence not
/// live, an `n_new` beyond its length, or more slots than `capacity` (`out_slots` untouched).
///
/// # Safety
/// `kv` is NULL or a live handle; `seqs` and `n_new` NULL or `n_seqs` elements each; `out_slots`
/// NULL or `capacity` writable elements; `out_n_slots` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn hbm_paged_kv_slot_mapping(
    kv: *const HbmPagedKv,
    layer: u32,
    seqs: *const u32,
    n_new: *const u32,
    n_seqs: usize,
    out_slots: *mut i64,
    capacity: usize,
    out_n_slots: *mut usize,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if out_slots.is_null() || out_n_slots.is_null() {
            return HbmStatus::NullParameter;
        }
        if n_seqs > 0 && (seqs.is_null() || n_new.is_null()) {
            return HbmStatus::NullParameter;
        }
        let (seqs, n_new) = if n_seqs == 0 {
            (&[][..], &[][..])
        } else {
            // SAFETY: non-NULL, and the caller promises `n_seqs` elements in each.
            unsafe {
                (
                    std::slice::from_raw_parts(seqs, n_seqs),
                    std::slice::from_raw_parts(n_new, n_seqs),
                )
            }
        };
        // SAFETY: the caller promises a live handle or NULL; the outputs are checked non-NULL
        // and writable for `capacity` slots and one count.
        unsafe {
            with_kv(kv, |c| {
                let slots = c.slot_mapping(layer, seqs, n_new)?;
                *out_n_slots = slots.len();
                if slots.len() > capacity {
                    return Err(crate::error::Error::InvalidValue(
                        "more slots than out_slots holds",
                    ));
                }
                std::ptr::copy_nonoverlapping(slots.as_ptr(), out_slots, slots.len());
                Ok(())
            })
        }
    })
}

/// Queues on `stream` the write of `n_tokens` token rows into `layer`, token `i` at slot
/// `slots[i]` (from `hbm_paged_kv_slot_mapping`; negative slots are skipped), converting to the
/// cache's types: F16/BF16 round to nearest even, Q8_0/Q4_0 quantize bit for bit as ggml's
/// reference.
///
/// - `k_src`, `v_src`: `n_tokens` rows of `n_kv_heads * head_dim_k` (`head_dim_v`) elements of
///   `src_type`, contiguous, in device memory; either may be NULL (not both).
/// - `src_type`: `HBM_TYPE_F32` or `HBM_TYPE_F16`.
/// - `slots`: `n_tokens` `int64_t` in device memory (NULL allowed when `n_tokens` is 0); read
///   back to the host during the call.
///
/// On CUDA this is one kernel launch for K and V together when they have the same type (two
/// otherwise); `hbm_paged_kv_append_step` writes every layer of a step in one.
///
/// Returns `HBM_STATUS_OK` once queued; `HBM_STATUS_NULL_PARAMETER` for a NULL cache, both sources
/// NULL, or NULL slots with `n_tokens > 0`; `HBM_STATUS_INVALID_VALUE` for `layer` out of range,
/// a V source on a layer without V, another `src_type`, a misaligned source, or a slot outside
/// the blocks held by exactly one sequence (a shared block is never written); nothing is queued
/// then. `HBM_STATUS_NOT_SUPPORTED` when the device's kernels are not available.
///
/// # Safety
/// `kv` is NULL or a live handle; sources and slots NULL or device memory of the sizes above.
#[no_mangle]
pub unsafe extern "C" fn hbm_paged_kv_append(
    kv: *const HbmPagedKv,
    layer: u32,
    k_src: *const c_void,
    v_src: *const c_void,
    src_type: i32,
    slots: *const i64,
    n_tokens: u32,
    stream: *mut c_void,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if (k_src.is_null() && v_src.is_null()) || (slots.is_null() && n_tokens > 0) {
            return HbmStatus::NullParameter;
        }
        let Some(ty) = HbmType::from_i32(src_type) else {
            return HbmStatus::InvalidValue;
        };
        // SAFETY: the caller promises a live handle or NULL, and device memory behind the rest.
        unsafe {
            with_kv(kv, |c| {
                c.append_device_slots(
                    layer,
                    k_src as usize,
                    v_src as usize,
                    ty,
                    slots as usize,
                    n_tokens,
                    stream as usize,
                )
            })
        }
    })
}

/// Queues on `stream` the conversion of live sequence `seq`'s tokens `start .. start + n_tokens`
/// in `layer` into `k_dst` and `v_dst` as `dst_type` (`HBM_TYPE_F32` or `HBM_TYPE_F16`),
/// contiguous rows in device memory, for engines without paged kernels: exact for F32/F16/BF16
/// caches, `q * d` (Q8_0) or `(q - 8) * d` (Q4_0) as ggml's `dequantize_row_*`. Either
/// destination may be NULL (not both); the caller owns them.
///
/// Returns `HBM_STATUS_OK` once queued; `HBM_STATUS_NULL_PARAMETER`; `HBM_STATUS_INVALID_VALUE`
/// for `layer` out of range, `seq` not live, tokens past its end or given back by a sliding
/// window, a V destination on a layer without V, another `dst_type`, or a misaligned destination
/// (nothing is queued then).
///
/// # Safety
/// `kv` is NULL or a live handle; destinations NULL or device memory of the sizes above, not
/// overlapping the cache.
#[no_mangle]
pub unsafe extern "C" fn hbm_paged_kv_gather(
    kv: *const HbmPagedKv,
    layer: u32,
    seq: u32,
    start: u32,
    n_tokens: u32,
    k_dst: *mut c_void,
    v_dst: *mut c_void,
    dst_type: i32,
    stream: *mut c_void,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if k_dst.is_null() && v_dst.is_null() {
            return HbmStatus::NullParameter;
        }
        let Some(ty) = HbmType::from_i32(dst_type) else {
            return HbmStatus::InvalidValue;
        };
        // SAFETY: the caller promises a live handle or NULL, and device memory behind the rest.
        unsafe {
            with_kv(kv, |c| {
                c.gather(
                    layer,
                    seq,
                    start,
                    n_tokens,
                    k_dst as usize,
                    v_dst as usize,
                    ty,
                    stream as usize,
                )
            })
        }
    })
}

/// Gives back the memory of granules no live block uses (after one device synchronize).
/// `out_released` (may be NULL) receives the bytes given back.
///
/// # Safety
/// `kv` is NULL or a live handle; `out_released` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn hbm_paged_kv_trim(
    kv: *const HbmPagedKv,
    out_released: *mut u64,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        // SAFETY: the caller promises a live handle or NULL; `out_released` checked non-NULL.
        unsafe {
            with_kv(kv, |c| {
                let n = c.trim();
                if !out_released.is_null() {
                    *out_released = n;
                }
                Ok(())
            })
        }
    })
}

/// Fills `*out_stats` with the cache's counters.
///
/// # Safety
/// `kv` is NULL or a live handle; `out_stats` NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn hbm_paged_kv_stats(
    kv: *const HbmPagedKv,
    out_stats: *mut HbmPagedKvStats,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if out_stats.is_null() {
            return HbmStatus::NullParameter;
        }
        // SAFETY: the caller promises a live handle or NULL; `out_stats` checked non-NULL.
        unsafe {
            with_kv(kv, |c| {
                *out_stats = c.stats().into();
                Ok(())
            })
        }
    })
}

#[cfg(test)]
#[path = "paged_kv_api_tests.rs"]
mod tests;
