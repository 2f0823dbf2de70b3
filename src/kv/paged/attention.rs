//! Reference decode attention over the paged cache: one query token per sequence, K and V read
//! through the block table (`kernels/paged_kv.cu`, `hbm_paged_decode_attention`; the host
//! computation of `Backend::paged_decode_attention` on the simulated device). It shows the
//! layout and block tables are what a paged-attention kernel needs, and gives engines without
//! one a correct (not fast) path.

use super::{live, PagedKvCache};
use crate::backend::{DecodeAttention, DevicePtr, Stream};
use crate::error::{Error, Result};

impl PagedKvCache {
    /// Queues on `stream` decode attention for `layer` over live sequences `seqs`: query `i` is
    /// `q[i]`, `f32 [n_heads, head_dim_k]` (all queries contiguous in device memory), attending
    /// to every token `seqs[i]` holds; `out[i]` receives `f32 [n_heads, head_dim_v]`. Query head
    /// `h` reads KV head `h / (n_heads / n_kv_heads)` (grouped-query attention); scores are
    /// `q . k * scale`, softmax in f32.
    ///
    /// `InvalidValue` for a sequence not live, a layer without V or with a sliding window, a
    /// quantized cache (gather it first), `n_heads` not a multiple of the layer's KV heads, or a
    /// sequence longer than the reference kernel holds in shared memory (about 12 000 tokens).
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention(
        &self,
        layer: u32,
        seqs: &[u32],
        n_heads: u32,
        q: DevicePtr,
        out: DevicePtr,
        scale: f32,
        stream: Stream,
    ) -> Result<()> {
        let (g, i) = self.layer_group(layer)?;
        let mut st = self.lock();
        let grp = &st.groups[g];
        if grp.window != 0 {
            return Err(Error::InvalidValue(
                "sliding-window layers are not in the reference attention",
            ));
        }
        let Some(v) = grp.v[i].as_ref() else {
            return Err(Error::InvalidValue("attention over a layer without V"));
        };
        let spec = &self.params.layers[layer as usize];
        let mut lens = Vec::with_capacity(seqs.len());
        for &s in seqs {
            lens.push(live(&st, s)?.len as i32);
        }
        let a = DecodeAttention {
            q,
            out,
            k: grp.k[i].base(),
            v: v.base(),
            kv_type: self.params.type_k,
            k_row: self.derived.row_k[layer as usize],
            v_row: self.derived.row_v[layer as usize],
            block_table: grp.table,
            table_stride: self.derived.max_blocks_per_seq,
            table_rows: 0,
            lens: 0,
            max_len: lens.iter().copied().max().unwrap_or(0) as u32,
            n_seqs: u32::try_from(seqs.len()).map_err(|_| Error::InvalidValue("too many seqs"))?,
            block_tokens: self.params.block_tokens,
            n_heads,
            n_kv_heads: spec.n_kv_heads,
            head_dim_k: spec.head_dim_k,
            head_dim_v: spec.head_dim_v,
            scale,
        };
        if self.params.type_v != self.params.type_k {
            return Err(Error::InvalidValue(
                "the reference attention reads K and V of one type",
            ));
        }
        crate::backend::check_decode_attention(&DecodeAttention {
            table_rows: 1,
            lens: 1,
            ..a
        })?;
        if seqs.is_empty() {
            return Ok(());
        }
        let b = self.backend.as_ref();
        let host: Vec<u8> = seqs
            .iter()
            .map(|&s| s as i32)
            .chain(lens.iter().copied())
            .flat_map(|x| x.to_ne_bytes())
            .collect();
        let taken = st.staging.take(b, host.len())?;
        let a = DecodeAttention {
            table_rows: taken.ptr,
            lens: taken.ptr + seqs.len() * 4,
            ..a
        };
        let queued = b
            .copy_from_host_on(taken.ptr, &host, stream)
            .and_then(|_| b.paged_decode_attention(&a, stream));
        st.staging.in_flight(b, taken, stream, host);
        queued
    }
}
