//! A step's writes and reads: the slot mapping (token -> `block * block_tokens + offset`, as vLLM's
//! `reshape_and_cache` takes it), the append of one layer's new rows through it, and
//! the gather of a sequence's rows into a contiguous buffer.
//!
//! Both are one layer's case of `batch`: one backend call per pair of element types (one kernel
//! launch on CUDA, the CPU reference of `kv::quant` on the simulated device, byte for byte).

use super::{live, PagedKvCache};
use crate::backend::{DevicePtr, Stream};
use crate::error::{Error, Result};
use crate::kv::HbmType;

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
        let mut st = self.lock();
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
        let mut mapping = vec![Vec::new(); st.groups.len()];
        mapping[g] = slots
            .iter()
            .map(|&s| {
                i32::try_from(s.max(-1)).map_err(|_| Error::InvalidValue("slot beyond int32"))
            })
            .collect::<Result<Vec<i32>>>()?;
        self.append_jobs(
            &mut st,
            std::iter::once((layer, k_src, v_src)),
            &mapping,
            src_type,
            stream,
        )
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
        let mut st = self.lock();
        if v_dst != 0 && st.groups[g].v[i].is_none() {
            return Err(Error::InvalidValue("V rows for a layer without V"));
        }
        self.gather_jobs(
            &mut st,
            seq,
            start,
            n_tokens,
            std::iter::once((layer, k_dst, v_dst)),
            dst_type,
            stream,
        )
    }
}
