//! The KV cache object: per layer a K and a V tensor, one row of `n_head_kv * head_dim` elements
//! per token, room for `n_ctx_max` tokens in each of `n_seq_max` sequence slots.
//!
//! Growth modes:
//! - `Vmm`: every tensor reserves address space for all slots at creation; `reserve(seq, n)`
//!   commits granularity-sized pages to the sequence's slot as it grows. Pointers never move and
//!   nothing is copied. `release(seq)` unbinds the sequence but keeps its slot's pages committed
//!   on a shared free list; the next new sequence takes a slot from that list and reuses its pages
//!   without mapping anything (vAttention's deferred reclamation). `trim()`, or a `reserve` that
//!   runs out of memory, unmaps the free list's pages.
//! - `Realloc`: each slot owns one allocation per tensor; growing allocates a larger one (doubling,
//!   capped at `n_ctx_max`), synchronizes (appends queued on any stream land first), copies the
//!   rows, synchronizes and frees the old. Pointers move, and
//!   `generation()` counts the moves. Release frees the slot's memory.
//! - `Prealloc`: everything is allocated at creation; `reserve` only checks bounds.
//!
//! `Vmm` on a device without VMM falls back to `Realloc`, with one notice line on stderr.
//! Every failing call leaves the live sequences as they were: contents, pointers, capacities
//! (a `reserve` that ran out of memory may have trimmed the free list first).
//! A reused slot holds the previous sequence's stale rows, as llama.cpp's cells do.

use super::layout::KvShape;
pub use super::layout::{Growth, KvParams, KvStats};
use super::types::HbmType;
use crate::backend::{check_kv_io, DevicePtr, KvRows, SharedBackend, Stream};
use crate::error::{Error, Result};
use std::sync::Mutex;

/// A tensor's (base, size) and the (start, size) of the rows in use in it.
pub type TensorRegions = ((DevicePtr, usize), Vec<(DevicePtr, usize)>);

/// One sequence slot: its capacity in tokens and, for `Realloc`, its buffers.
#[derive(Clone, Debug, Default)]
struct Slot {
    seq: Option<u32>,
    capacity: u32,
    /// `Vmm`: bytes committed per K tensor and per V tensor (the same in every layer).
    committed_k: usize,
    committed_v: usize,
    /// `Realloc`: the buffer of each tensor (K of layer l at 2l, V at 2l+1); empty when none.
    bufs: Vec<DevicePtr>,
}

struct State {
    slots: Vec<Slot>,
    /// Slot bound to each sequence id.
    seq_slot: Vec<Option<u32>>,
    /// Released `Vmm` slots that still hold committed pages, most recent last.
    free_list: Vec<u32>,
    generation: u64,
    copied: u64,
}

/// A KV cache on one device. Methods take `&self` and lock; growth is a slow path.
pub struct KvCache {
    backend: SharedBackend,
    params: KvParams,
    row_k: usize,
    row_v: usize,
    /// Bytes between consecutive slots in a `Vmm` or `Prealloc` tensor.
    slot_k: usize,
    slot_v: usize,
    /// `Vmm`: one reservation per tensor; `Prealloc`: one allocation per tensor (K at 2l, V at 2l+1).
    tensors: Vec<(DevicePtr, usize)>,
    granularity: usize,
    state: Mutex<State>,
}

impl KvCache {
    /// Creates a cache. `InvalidValue` for a zero dimension, a row that is not whole blocks (Q8_0
    /// and Q4_0 need `n_head_kv * head_dim` divisible by 32) or sizes that overflow; out of memory
    /// (`Prealloc`) or address space (`Vmm`) is `OutOfMemory`, with everything undone.
    pub fn new(backend: SharedBackend, mut params: KvParams) -> Result<KvCache> {
        let shape = KvShape {
            n_layer: params.n_layer,
            n_head_kv: params.n_head_kv,
            head_dim: params.head_dim,
            type_k: params.type_k,
            type_v: params.type_v,
        };
        if params.n_layer == 0 || params.n_ctx_max == 0 || params.n_seq_max == 0 {
            return Err(Error::InvalidValue("KV cache dimensions must be positive"));
        }
        let (Some(row_k), Some(row_v)) = (shape.row_bytes_k(), shape.row_bytes_v()) else {
            return Err(Error::InvalidValue(
                "n_head_kv * head_dim is not a multiple of the block size",
            ));
        };
        if row_k == 0 {
            return Err(Error::InvalidValue("KV cache dimensions must be positive"));
        }
        let granularity = match (params.growth, backend.vmm_granularity()) {
            (Growth::Vmm, Some(g)) => g,
            (Growth::Vmm, None) => {
                eprintln!(
                    "hbmalloc: notice: device {} has no VMM; the KV cache grows by realloc (pointers move)",
                    backend.device()
                );
                params.growth = Growth::Realloc;
                1
            }
            _ => 1,
        };
        let too_big = Error::InvalidValue("KV cache size overflows");
        let span = |row: usize| {
            row.checked_mul(params.n_ctx_max as usize)
                .and_then(|b| b.checked_next_multiple_of(granularity))
                .ok_or(too_big.clone())
        };
        let (slot_k, slot_v) = (span(row_k)?, span(row_v)?);
        let mut cache = KvCache {
            backend,
            params,
            row_k,
            row_v,
            slot_k,
            slot_v,
            tensors: Vec::new(),
            granularity,
            state: Mutex::new(State {
                slots: vec![Slot::default(); params.n_seq_max as usize],
                seq_slot: vec![None; params.n_seq_max as usize],
                free_list: Vec::new(),
                generation: 0,
                copied: 0,
            }),
        };
        if params.growth != Growth::Realloc {
            for l in 0..2 * params.n_layer as usize {
                let per_slot = if l % 2 == 0 { slot_k } else { slot_v };
                let size = per_slot
                    .checked_mul(params.n_seq_max as usize)
                    .ok_or(too_big.clone())?;
                // On an error `cache` drops here and gives back the tensors made so far.
                let base = match params.growth {
                    Growth::Vmm => cache.backend.vmm_reserve(size)?,
                    _ => cache.backend.alloc(size)?,
                };
                cache.tensors.push((base, size));
            }
        }
        if params.growth == Growth::Prealloc {
            let st = cache.state.get_mut().unwrap_or_else(|e| e.into_inner());
            for s in &mut st.slots {
                s.capacity = params.n_ctx_max;
            }
        }
        Ok(cache)
    }

    /// The device the cache's memory is on.
    pub fn device(&self) -> i32 {
        self.backend.device()
    }

    /// The parameters in force (`growth` is `Realloc` after a VMM fallback).
    pub fn params(&self) -> KvParams {
        self.params
    }

    /// Bytes between consecutive token rows of a K tensor (the row stride).
    pub fn row_bytes_k(&self) -> usize {
        self.row_k
    }

    /// Bytes between consecutive token rows of a V tensor.
    pub fn row_bytes_v(&self) -> usize {
        self.row_v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_seq(&self, seq: u32) -> Result<()> {
        if seq >= self.params.n_seq_max {
            return Err(Error::InvalidValue("sequence id beyond n_seq_max"));
        }
        Ok(())
    }

    fn bound_slot(&self, st: &State, seq: u32) -> Result<usize> {
        self.check_seq(seq)?;
        st.seq_slot[seq as usize]
            .map(|s| s as usize)
            .ok_or(Error::InvalidValue(
                "sequence is released or was never reserved",
            ))
    }

    /// Tokens the sequence can hold without growing.
    pub fn capacity(&self, seq: u32) -> Result<u32> {
        let st = self.lock();
        let slot = self.bound_slot(&st, seq)?;
        Ok(st.slots[slot].capacity)
    }

    /// Device addresses of row 0 of `seq` in layer `layer`'s K and V tensors. Row `t` is at
    /// `k + t * row_bytes_k()`. Stable across growth except in `Realloc` mode (see `generation`).
    pub fn seq_rows(&self, layer: u32, seq: u32) -> Result<(DevicePtr, DevicePtr)> {
        if layer >= self.params.n_layer {
            return Err(Error::InvalidValue("layer beyond n_layer"));
        }
        let st = self.lock();
        let slot = self.bound_slot(&st, seq)?;
        Ok(self.rows_locked(&st, layer, slot))
    }

    fn rows_locked(&self, st: &State, layer: u32, slot: usize) -> (DevicePtr, DevicePtr) {
        let (k, v) = (2 * layer as usize, 2 * layer as usize + 1);
        match self.params.growth {
            Growth::Realloc => {
                let bufs = &st.slots[slot].bufs;
                (
                    bufs.get(k).copied().unwrap_or(0),
                    bufs.get(v).copied().unwrap_or(0),
                )
            }
            _ => (
                self.tensors[k].0 + slot * self.slot_k,
                self.tensors[v].0 + slot * self.slot_v,
            ),
        }
    }

    /// Rows `pos .. pos + n_tokens` of `seq` in `layer`'s K and V tensors, checked against the
    /// sequence's capacity.
    fn token_rows_locked(
        &self,
        st: &State,
        layer: u32,
        seq: u32,
        pos: u32,
        n_tokens: u32,
    ) -> Result<(KvRows, KvRows)> {
        if layer >= self.params.n_layer {
            return Err(Error::InvalidValue("layer beyond n_layer"));
        }
        let slot = self.bound_slot(st, seq)?;
        if pos
            .checked_add(n_tokens)
            .map_or(true, |end| end > st.slots[slot].capacity)
        {
            return Err(Error::InvalidValue(
                "tokens beyond the sequence's reserved capacity",
            ));
        }
        let row_elems = u32::try_from(self.params.n_head_kv as u64 * self.params.head_dim as u64)
            .map_err(|_| Error::InvalidValue("row too long for the kernels"))?;
        let (k, v) = self.rows_locked(st, layer, slot);
        let rows = |base: DevicePtr, ty, stride: usize| KvRows {
            ptr: base + pos as usize * stride,
            ty,
            stride,
            row_elems,
            n_rows: n_tokens,
        };
        Ok((
            rows(k, self.params.type_k, self.row_k),
            rows(v, self.params.type_v, self.row_v),
        ))
    }

    /// Queues on `stream` the conversion of `n_tokens` token rows into `seq`'s rows
    /// `pos .. pos + n_tokens` of `layer`: `k_src` and `v_src` each hold `n_tokens` rows of
    /// `n_head_kv * head_dim` elements of `src_type` (F32 or F16), contiguous, in device memory; 0
    /// skips that tensor. The cache's bytes come out exactly as `quant::quantize_row` makes them.
    ///
    /// `InvalidValue` for a layer or sequence out of range, a sequence not bound, tokens past its
    /// capacity (`reserve` first), another `src_type`, or a misaligned source; then nothing is
    /// queued. The launches happen under the cache's lock, so a `Realloc` growth cannot free the
    /// rows between the look-up and the launch; its copy is ordered after them on the device.
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &self,
        layer: u32,
        seq: u32,
        pos: u32,
        n_tokens: u32,
        k_src: DevicePtr,
        v_src: DevicePtr,
        src_type: HbmType,
        stream: Stream,
    ) -> Result<()> {
        let st = self.lock();
        let (k, v) = self.token_rows_locked(&st, layer, seq, pos, n_tokens)?;
        let jobs = [(k_src, k), (v_src, v)];
        if n_tokens == 0 && matches!(src_type, HbmType::F32 | HbmType::F16) {
            // Nothing to convert; a sequence without rows yet (Realloc, capacity 0) is fine.
            return Ok(());
        }
        let jobs = jobs.iter().filter(|(src, _)| *src != 0);
        // Every check before any launch, so that a bad V source does not leave K written.
        for (src, rows) in jobs.clone() {
            check_kv_io(
                &KvRows::contiguous(*src, src_type, rows.row_elems, n_tokens)?,
                rows,
            )?;
        }
        for (src, rows) in jobs {
            self.backend.kv_append(*src, src_type, rows, stream)?;
        }
        Ok(())
    }

    /// Queues on `stream` the conversion of `seq`'s rows `pos .. pos + n_tokens` of `layer` into
    /// `k_dst` and `v_dst` (0 skips one) as `dst_type` (F32 or F16), contiguous, in device memory.
    /// Errors as `append`'s; nothing is queued on an error.
    #[allow(clippy::too_many_arguments)]
    pub fn dequantize(
        &self,
        layer: u32,
        seq: u32,
        pos: u32,
        n_tokens: u32,
        k_dst: DevicePtr,
        v_dst: DevicePtr,
        dst_type: HbmType,
        stream: Stream,
    ) -> Result<()> {
        let st = self.lock();
        let (k, v) = self.token_rows_locked(&st, layer, seq, pos, n_tokens)?;
        let jobs = [(k_dst, k), (v_dst, v)];
        if n_tokens == 0 && matches!(dst_type, HbmType::F32 | HbmType::F16) {
            // Nothing to convert; a sequence without rows yet (Realloc, capacity 0) is fine.
            return Ok(());
        }
        let jobs = jobs.iter().filter(|(dst, _)| *dst != 0);
        for (dst, rows) in jobs.clone() {
            check_kv_io(
                &KvRows::contiguous(*dst, dst_type, rows.row_elems, n_tokens)?,
                rows,
            )?;
        }
        for (dst, rows) in jobs {
            self.backend.kv_dequantize(rows, *dst, dst_type, stream)?;
        }
        Ok(())
    }

    /// How many times `Realloc` growth has moved tensors; pointers from `seq_rows` taken before
    /// a change are stale.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Makes room for `n_tokens` tokens in sequence `seq`, binding it to a slot first if it is not
    /// bound (a released slot with committed pages is preferred). Capacity never shrinks here.
    /// `InvalidValue` beyond `n_ctx_max` or `n_seq_max`; `OutOfMemory` when the device is full
    /// even after trimming the free list. On an error nothing changes.
    pub fn reserve(&self, seq: u32, n_tokens: u32) -> Result<()> {
        self.check_seq(seq)?;
        if n_tokens > self.params.n_ctx_max {
            return Err(Error::InvalidValue("n_tokens beyond n_ctx_max"));
        }
        let mut st = self.lock();
        let (slot, newly_bound) = match st.seq_slot[seq as usize] {
            Some(s) => (s as usize, false),
            None => (self.bind_locked(&mut st, seq)?, true),
        };
        if st.slots[slot].capacity >= n_tokens {
            return Ok(());
        }
        let mut grown = self.grow_slow(&mut st, slot, n_tokens);
        if matches!(grown, Err(Error::OutOfMemory { .. })) && self.trim_locked(&mut st) > 0 {
            grown = self.grow_slow(&mut st, slot, n_tokens);
        }
        if grown.is_err() && newly_bound {
            self.unbind_locked(&mut st, seq, slot);
        }
        grown
    }

    /// Binds `seq` to the most recently released slot, or else to the first never-used one.
    fn bind_locked(&self, st: &mut State, seq: u32) -> Result<usize> {
        let slot = match st.free_list.pop() {
            Some(s) => s as usize,
            None => st
                .slots
                .iter()
                .position(|s| s.seq.is_none())
                .ok_or(Error::InvalidValue("all n_seq_max slots are bound"))?,
        };
        st.slots[slot].seq = Some(seq);
        st.seq_slot[seq as usize] = Some(slot as u32);
        Ok(slot)
    }

    /// Undoes a binding that `reserve` made before failing: the slot goes back where it was.
    fn unbind_locked(&self, st: &mut State, seq: u32, slot: usize) {
        st.slots[slot].seq = None;
        st.seq_slot[seq as usize] = None;
        if st.slots[slot].committed_k + st.slots[slot].committed_v > 0 {
            st.free_list.push(slot as u32);
        }
    }

    #[cold]
    #[inline(never)]
    fn grow_slow(&self, st: &mut State, slot: usize, n_tokens: u32) -> Result<()> {
        match self.params.growth {
            Growth::Vmm => self.commit_locked(st, slot, n_tokens),
            Growth::Realloc => self.realloc_locked(st, slot, n_tokens),
            // Every slot already holds n_ctx_max tokens.
            Growth::Prealloc => Ok(()),
        }
    }

    /// Commits pages so that the slot's K and V tensors in every layer hold `n_tokens` rows.
    fn commit_locked(&self, st: &mut State, slot: usize, n_tokens: u32) -> Result<()> {
        let g = self.granularity;
        let want_k = (self.row_k * n_tokens as usize).next_multiple_of(g);
        let want_v = (self.row_v * n_tokens as usize).next_multiple_of(g);
        let (have_k, have_v) = (st.slots[slot].committed_k, st.slots[slot].committed_v);
        let mut done: Vec<(DevicePtr, usize)> = Vec::new();
        for (i, &(base, _)) in self.tensors.iter().enumerate() {
            let (have, want, stride) = if i % 2 == 0 {
                (have_k, want_k, self.slot_k)
            } else {
                (have_v, want_v, self.slot_v)
            };
            if want <= have {
                continue;
            }
            let at = base + slot * stride + have;
            if let Err(e) = self.backend.vmm_map(at, want - have) {
                // Roll back this call's pages: nothing was written to them yet.
                for &(p, n) in &done {
                    let _ = self.backend.vmm_unmap(p, n);
                }
                return Err(e);
            }
            done.push((at, want - have));
        }
        let s = &mut st.slots[slot];
        s.committed_k = want_k.max(have_k);
        s.committed_v = want_v.max(have_v);
        let cap = (s.committed_k / self.row_k).min(s.committed_v / self.row_v);
        s.capacity = cap.min(self.params.n_ctx_max as usize) as u32;
        Ok(())
    }

    /// Moves the slot's tensors to buffers of at least `n_tokens` rows, copying the old rows.
    fn realloc_locked(&self, st: &mut State, slot: usize, n_tokens: u32) -> Result<()> {
        // Doubling keeps the copies of a growing sequence linear in its final length.
        let old_cap = st.slots[slot].capacity;
        let cap = n_tokens
            .max(old_cap.saturating_mul(2))
            .min(self.params.n_ctx_max);
        let row = |i: usize| if i % 2 == 0 { self.row_k } else { self.row_v };
        let mut fresh = Vec::with_capacity(2 * self.params.n_layer as usize);
        for i in 0..2 * self.params.n_layer as usize {
            match self.backend.alloc(row(i) * cap as usize) {
                Ok(p) => fresh.push(p),
                Err(e) => {
                    for (j, &p) in fresh.iter().enumerate() {
                        let _ = self.backend.free(p, row(j) * cap as usize);
                    }
                    return Err(e);
                }
            }
        }
        let free_fresh = |fresh: &[DevicePtr]| {
            for (j, &q) in fresh.iter().enumerate() {
                let _ = self.backend.free(q, row(j) * cap as usize);
            }
        };
        let old_bufs = &st.slots[slot].bufs;
        if !old_bufs.is_empty() {
            // The caller's appends may still be queued on its own (non-blocking) stream, which a
            // copy on stream 0 would not wait for: a device synchronize orders the copies after
            // every stream's work. Growth by copying doubles, so this is rare.
            if let Err(e) = self.backend.synchronize() {
                free_fresh(&fresh);
                return Err(e);
            }
        }
        let mut copied = 0u64;
        for (i, &p) in old_bufs.iter().enumerate() {
            let bytes = row(i) * old_cap as usize;
            if let Err(e) = self.backend.copy_d2d(fresh[i], p, bytes, 0) {
                let _ = self.backend.synchronize();
                free_fresh(&fresh);
                return Err(e);
            }
            copied += bytes as u64;
        }
        if !old_bufs.is_empty() {
            // The copies must finish before the old buffers go. If the device cannot say they
            // did, the old buffers stay as they are and the new ones go instead.
            if let Err(e) = self.backend.synchronize() {
                free_fresh(&fresh);
                return Err(e);
            }
        }
        let old = std::mem::replace(&mut st.slots[slot].bufs, fresh);
        if !old.is_empty() {
            for (i, &p) in old.iter().enumerate() {
                let _ = self.backend.free(p, row(i) * old_cap as usize);
            }
            st.generation += 1;
        }
        st.copied += copied;
        st.slots[slot].capacity = cap;
        Ok(())
    }

    /// Ends sequence `seq`. `Vmm`: its slot keeps its pages and joins the free list. `Realloc`:
    /// its buffers are freed (after a synchronize). `InvalidValue` if it is not bound.
    pub fn release(&self, seq: u32) -> Result<()> {
        let mut st = self.lock();
        let slot = self.bound_slot(&st, seq)?;
        if self.params.growth == Growth::Realloc && !st.slots[slot].bufs.is_empty() {
            // Before anything changes, so that a failure leaves the sequence bound.
            self.backend.synchronize()?;
        }
        st.slots[slot].seq = None;
        st.seq_slot[seq as usize] = None;
        match self.params.growth {
            Growth::Vmm if st.slots[slot].committed_k + st.slots[slot].committed_v > 0 => {
                st.free_list.push(slot as u32)
            }
            Growth::Realloc => {
                let bufs = std::mem::take(&mut st.slots[slot].bufs);
                let cap = st.slots[slot].capacity as usize;
                for (i, p) in bufs.into_iter().enumerate() {
                    let row = if i % 2 == 0 { self.row_k } else { self.row_v };
                    let _ = self.backend.free(p, row * cap);
                }
                st.slots[slot].capacity = 0;
            }
            _ => {}
        }
        Ok(())
    }

    /// Unmaps the pages of every released slot (`Vmm`); returns the bytes given back.
    pub fn trim(&self) -> u64 {
        let mut st = self.lock();
        self.trim_locked(&mut st)
    }

    fn trim_locked(&self, st: &mut State) -> u64 {
        let free = std::mem::take(&mut st.free_list);
        if free.is_empty() {
            return 0;
        }
        // Work queued on the freed sequences' pages must be done before they go; if the device
        // cannot say it is, the pages stay (on the free list) for a later trim.
        if self.backend.synchronize().is_err() {
            st.free_list = free;
            return 0;
        }
        let mut given = 0u64;
        for slot in free {
            let s = &mut st.slots[slot as usize];
            for (i, &(base, _)) in self.tensors.iter().enumerate() {
                let (n, stride) = if i % 2 == 0 {
                    (s.committed_k, self.slot_k)
                } else {
                    (s.committed_v, self.slot_v)
                };
                if n > 0
                    && self
                        .backend
                        .vmm_unmap(base + slot as usize * stride, n)
                        .is_ok()
                {
                    given += n as u64;
                }
            }
            s.committed_k = 0;
            s.committed_v = 0;
            s.capacity = 0;
        }
        given
    }

    /// For tools (`nvtx`): each tensor that holds every slot (`Vmm`, `Prealloc`; none under
    /// `Realloc`, whose buffers are whole allocations) as (base, size), with the rows in use in
    /// it: for each bound sequence, `capacity` rows from the start of its slot.
    pub fn tensor_regions(&self) -> Vec<TensorRegions> {
        let st = self.lock();
        let bound: Vec<(usize, usize)> = (st.slots.iter().enumerate())
            .filter(|(_, s)| s.seq.is_some() && s.capacity > 0)
            .map(|(i, s)| (i, s.capacity as usize))
            .collect();
        (self.tensors.iter().enumerate())
            .map(|(i, &(base, size))| {
                let (stride, row) = match i % 2 {
                    0 => (self.slot_k, self.row_k),
                    _ => (self.slot_v, self.row_v),
                };
                let rows = bound
                    .iter()
                    .map(|&(slot, cap)| (base + slot * stride, cap * row));
                ((base, size), rows.collect())
            })
            .collect()
    }

    /// The cache's counters.
    pub fn stats(&self) -> KvStats {
        let st = self.lock();
        let layers = self.params.n_layer as u64;
        let held = |s: &Slot| match self.params.growth {
            Growth::Vmm => layers * (s.committed_k + s.committed_v) as u64,
            Growth::Realloc => layers * s.capacity as u64 * (self.row_k + self.row_v) as u64,
            Growth::Prealloc => 0,
        };
        let mut stats = KvStats {
            n_seq: st.slots.iter().filter(|s| s.seq.is_some()).count() as u32,
            generation: st.generation,
            copied: st.copied,
            ..KvStats::default()
        };
        match self.params.growth {
            Growth::Prealloc => {
                stats.committed = self.tensors.iter().map(|t| t.1 as u64).sum();
            }
            growth => {
                stats.committed = st.slots.iter().map(held).sum();
                stats.cached = st
                    .free_list
                    .iter()
                    .map(|&s| held(&st.slots[s as usize]))
                    .sum();
                if growth == Growth::Vmm {
                    stats.reserved = self.tensors.iter().map(|t| t.1 as u64).sum();
                }
            }
        }
        stats
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        // Unmap or free only once the device is done with the cache.
        let _ = self.backend.synchronize();
        for (slot, s) in st.slots.iter_mut().enumerate() {
            for (i, p) in std::mem::take(&mut s.bufs).into_iter().enumerate() {
                let row = if i % 2 == 0 { self.row_k } else { self.row_v };
                let _ = self.backend.free(p, row * s.capacity as usize);
            }
            if self.params.growth == Growth::Vmm {
                for (i, &(base, _)) in self.tensors.iter().enumerate() {
                    let (n, stride) = if i % 2 == 0 {
                        (s.committed_k, self.slot_k)
                    } else {
                        (s.committed_v, self.slot_v)
                    };
                    if n > 0 {
                        let _ = self.backend.vmm_unmap(base + slot * stride, n);
                    }
                }
            }
        }
        for &(base, size) in &self.tensors {
            let _ = match self.params.growth {
                Growth::Vmm => self.backend.vmm_release(base, size),
                _ => self.backend.free(base, size),
            };
        }
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
