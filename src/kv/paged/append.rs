//! A step's writes and reads: the slot mapping (token -> `block * block_tokens + offset`, as vLLM's
//! `reshape_and_cache` takes it), the batched append of every sequence's new rows through it, and
//! the gather of a sequence's rows into a contiguous buffer.
//!
//! Both go through the backend's row conversions (`kv_append`, `kv_dequantize`), one call per run
//! of consecutive slots in one block: on the simulated device that is the CPU reference
//! (`kv::quant`), byte for byte; on CUDA the existing conversion kernel, launched once per run.
//! A single batched kernel per layer is not written yet.

use super::{live, PagedKvCache};
use crate::backend::{check_kv_io, DevicePtr, KvRows, Stream};
use crate::error::{Error, Result};
use crate::kv::HbmType;

/// Consecutive tokens that land in consecutive rows of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    /// Index of the first token in the caller's rows.
    token: usize,
    block: u32,
    offset: usize,
    n: usize,
}

/// Splits `slots` into runs; negative slots (tokens not stored) are skipped.
fn runs(slots: &[i64], block_tokens: u32) -> Vec<Run> {
    let bt = block_tokens as i64;
    let mut out: Vec<Run> = Vec::new();
    for (i, &s) in slots.iter().enumerate() {
        if s < 0 {
            continue;
        }
        let (block, offset) = ((s / bt) as u32, (s % bt) as usize);
        match out.last_mut() {
            Some(r) if r.block == block && r.offset + r.n == offset && r.token + r.n == i => {
                r.n += 1
            }
            _ => out.push(Run {
                token: i,
                block,
                offset,
                n: 1,
            }),
        }
    }
    out
}

impl PagedKvCache {
    /// The slots of the last `n_new[i]` tokens of each live sequence `seqs[i]`, in order, for
    /// `layer`'s group: `block * block_tokens + offset`, or -1 for a token whose block its
    /// sliding window already gave back (an append skips it). Call after `add_tokens`.
    /// `InvalidValue` for a sequence not live, `n_new` beyond its length, or slices of different
    /// lengths.
    pub fn slot_mapping(&self, layer: u32, seqs: &[u32], n_new: &[u32]) -> Result<Vec<i64>> {
        if seqs.len() != n_new.len() {
            return Err(Error::InvalidValue("seqs and n_new differ in length"));
        }
        let (g, _) = self.layer_group(layer)?;
        let st = self.lock();
        let bt = self.params.block_tokens;
        let mut slots = Vec::new();
        for (&seq, &n) in seqs.iter().zip(n_new) {
            let s = live(&st, seq)?;
            if n > s.len {
                return Err(Error::InvalidValue("n_new beyond the sequence's length"));
            }
            for pos in s.len - n..s.len {
                let id = s.tables[g][(pos / bt) as usize];
                slots.push(match id {
                    id if id < 0 => -1,
                    id => id as i64 * bt as i64 + (pos % bt) as i64,
                });
            }
        }
        Ok(slots)
    }

    /// Queues on `stream` the write of one row per slot into `layer`: `k_src` (and `v_src`) hold
    /// `slots.len()` contiguous rows of `n_kv_heads * head_dim_k` (`head_dim_v`) elements of
    /// `src_type` (F32 or F16) in device memory; token `i` goes to slot `slots[i]`, converted to
    /// the cache's type exactly as `kv::quant::quantize_row`. Negative slots are skipped; 0 skips
    /// a tensor.
    ///
    /// `InvalidValue` for both sources 0, a V source on a layer without V, another `src_type`,
    /// a misaligned source, or a slot outside a block this cache holds for exactly one sequence
    /// (a shared block is never written: `add_tokens` copies it first); nothing is queued then.
    pub fn append(
        &self,
        layer: u32,
        k_src: DevicePtr,
        v_src: DevicePtr,
        src_type: HbmType,
        slots: &[i64],
        stream: Stream,
    ) -> Result<()> {
        let (g, i) = self.layer_group(layer)?;
        if k_src == 0 && v_src == 0 {
            return Err(Error::InvalidValue("append with neither K nor V"));
        }
        let st = self.lock();
        let grp = &st.groups[g];
        if v_src != 0 && grp.v[i].is_none() {
            return Err(Error::InvalidValue("V rows for a layer without V"));
        }
        let limit = self.params.num_blocks as i64 * self.params.block_tokens as i64;
        for &s in slots {
            if s >= limit
                || (s >= 0
                    && grp
                        .pool
                        .refcount((s / self.params.block_tokens as i64) as u32)
                        != 1)
            {
                return Err(Error::InvalidValue(
                    "slot outside the blocks a single sequence holds",
                ));
            }
        }
        let runs = runs(slots, self.params.block_tokens);
        let l = layer as usize;
        let n = u32::try_from(slots.len()).map_err(|_| Error::InvalidValue("too many slots"))?;
        let mut jobs = Vec::new();
        for (src, t, ty, elems, row) in [
            (
                k_src,
                Some(&grp.k[i]),
                self.params.type_k,
                self.derived.elems_k[l],
                self.derived.row_k[l],
            ),
            (
                v_src,
                grp.v[i].as_ref(),
                self.params.type_v,
                self.derived.elems_v[l],
                self.derived.row_v[l],
            ),
        ] {
            let Some(t) = t.filter(|_| src != 0) else {
                continue;
            };
            // The whole source checked once, so that no run is queued before a bad one is seen.
            let whole = KvRows::contiguous(src, src_type, elems, n)?;
            let src_row = whole.stride;
            for r in &runs {
                let dst = KvRows {
                    ptr: t.block_ptr(r.block) + r.offset * row,
                    ty,
                    stride: row,
                    row_elems: elems,
                    n_rows: r.n as u32,
                };
                let from = src + r.token * src_row;
                check_kv_io(
                    &KvRows::contiguous(from, src_type, elems, r.n as u32)?,
                    &dst,
                )?;
                jobs.push((from, dst));
            }
        }
        for (from, dst) in jobs {
            self.backend.kv_append(from, src_type, &dst, stream)?;
        }
        Ok(())
    }

    /// `append` with the slot mapping in device memory (`n_tokens` `int64`s at `slots`), as a
    /// paged-attention engine keeps it; read back to the host first (a synchronous copy).
    #[allow(clippy::too_many_arguments)]
    pub fn append_device_slots(
        &self,
        layer: u32,
        k_src: DevicePtr,
        v_src: DevicePtr,
        src_type: HbmType,
        slots: DevicePtr,
        n_tokens: u32,
        stream: Stream,
    ) -> Result<()> {
        if n_tokens == 0 {
            return self.append(layer, k_src, v_src, src_type, &[], stream);
        }
        if slots == 0 {
            return Err(Error::InvalidValue("NULL slot mapping"));
        }
        let mut bytes = vec![0u8; n_tokens as usize * 8];
        self.backend.copy_to_host(&mut bytes, slots)?;
        let host: Vec<i64> = bytes
            .chunks_exact(8)
            .map(|w| i64::from_ne_bytes(w.try_into().expect("8 bytes")))
            .collect();
        self.append(layer, k_src, v_src, src_type, &host, stream)
    }

    /// Queues on `stream` the conversion of live `seq`'s tokens `start .. start + n_tokens` in
    /// `layer` into `k_dst` (and `v_dst`) as `dst_type` (F32 or F16), contiguous, in device memory:
    /// exactly `kv::quant::dequantize_row`, then fp16 rounding for F16. 0 skips a tensor.
    /// `InvalidValue` for tokens past the sequence's end or given back by its window, both
    /// destinations 0, a V destination on a layer without V, or a misaligned destination.
    #[allow(clippy::too_many_arguments)]
    pub fn gather(
        &self,
        layer: u32,
        seq: u32,
        start: u32,
        n_tokens: u32,
        k_dst: DevicePtr,
        v_dst: DevicePtr,
        dst_type: HbmType,
        stream: Stream,
    ) -> Result<()> {
        let (g, i) = self.layer_group(layer)?;
        if k_dst == 0 && v_dst == 0 {
            return Err(Error::InvalidValue("gather with neither K nor V"));
        }
        let st = self.lock();
        let s = live(&st, seq)?;
        let grp = &st.groups[g];
        if v_dst != 0 && grp.v[i].is_none() {
            return Err(Error::InvalidValue("V rows for a layer without V"));
        }
        let end = start
            .checked_add(n_tokens)
            .filter(|&e| e <= s.len)
            .ok_or(Error::InvalidValue("tokens past the sequence's end"))?;
        let bt = self.params.block_tokens;
        let mut slots = Vec::with_capacity(n_tokens as usize);
        for pos in start..end {
            let id = s.tables[g][(pos / bt) as usize];
            if id < 0 {
                return Err(Error::InvalidValue(
                    "tokens the sliding window already gave back",
                ));
            }
            slots.push(id as i64 * bt as i64 + (pos % bt) as i64);
        }
        let runs = runs(&slots, bt);
        let l = layer as usize;
        let mut jobs = Vec::new();
        for (dst, t, ty, elems, row) in [
            (
                k_dst,
                Some(&grp.k[i]),
                self.params.type_k,
                self.derived.elems_k[l],
                self.derived.row_k[l],
            ),
            (
                v_dst,
                grp.v[i].as_ref(),
                self.params.type_v,
                self.derived.elems_v[l],
                self.derived.row_v[l],
            ),
        ] {
            let Some(t) = t.filter(|_| dst != 0) else {
                continue;
            };
            let whole = KvRows::contiguous(dst, dst_type, elems, n_tokens)?;
            for r in &runs {
                let src = KvRows {
                    ptr: t.block_ptr(r.block) + r.offset * row,
                    ty,
                    stride: row,
                    row_elems: elems,
                    n_rows: r.n as u32,
                };
                let to = dst + r.token * whole.stride;
                check_kv_io(&KvRows::contiguous(to, dst_type, elems, r.n as u32)?, &src)?;
                jobs.push((src, to));
            }
        }
        for (src, to) in jobs {
            self.backend.kv_dequantize(&src, to, dst_type, stream)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_at_blocks_gaps_and_skips() {
        // block_tokens 4: slots 5,6,7 are block 1; 8 starts block 2; -1 skipped; 20 alone.
        let r = runs(&[5, 6, 7, 8, -1, 20, 21, 3], 4);
        let at = |token, block, offset, n| Run {
            token,
            block,
            offset,
            n,
        };
        assert_eq!(
            r,
            vec![
                at(0, 1, 1, 3),
                at(3, 2, 0, 1),
                at(5, 5, 0, 2),
                at(7, 0, 3, 1)
            ]
        );
        assert!(runs(&[-1, -1], 4).is_empty());
    }
}
