//! Sizes of a KV cache laid out as llama.cpp lays it out: per layer a K and a V tensor, each a row
//! of `n_head_kv * head_dim` elements per token, `n_ctx` tokens for each of `n_seq` sequences.
//! Also the parameters and counters of the cache object (`cache::KvCache`).

use super::types::HbmType;

/// The shape of a KV cache, enough to size it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub n_layer: u32,
    pub n_head_kv: u32,
    pub head_dim: u32,
    pub type_k: HbmType,
    pub type_v: HbmType,
}

impl KvShape {
    /// Elements in one token's row of K (or V) in one layer.
    pub fn row_elems(&self) -> Option<usize> {
        (self.n_head_kv as usize).checked_mul(self.head_dim as usize)
    }

    /// Bytes of one token's K row in one layer, or `None` when the row is not a whole number of
    /// blocks of `type_k`.
    pub fn row_bytes_k(&self) -> Option<usize> {
        self.type_k.row_bytes(self.row_elems()?)
    }

    /// Bytes of one token's V row in one layer; see `row_bytes_k`.
    pub fn row_bytes_v(&self) -> Option<usize> {
        self.type_v.row_bytes(self.row_elems()?)
    }

    /// Bytes of K and V, all layers, for `n_tokens` tokens in total (summed over sequences).
    pub fn bytes_for_tokens(&self, n_tokens: u64) -> Option<u64> {
        let per_token = (self.row_bytes_k()? as u64).checked_add(self.row_bytes_v()? as u64)?;
        (self.n_layer as u64)
            .checked_mul(n_tokens)?
            .checked_mul(per_token)
    }
}

/// Bytes of a KV cache: `n_layer * n_ctx * n_seq * (row_bytes(type_k) + row_bytes(type_v))`, the
/// rows being `n_head_kv * head_dim` elements. `None` when a row is not a whole number of blocks
/// (a head size not divisible by 32 for Q8_0/Q4_0) or the size overflows 64 bits.
pub fn kv_cache_bytes(
    n_layer: u32,
    n_head_kv: u32,
    head_dim: u32,
    n_ctx: u32,
    n_seq: u32,
    type_k: HbmType,
    type_v: HbmType,
) -> Option<u64> {
    let shape = KvShape {
        n_layer,
        n_head_kv,
        head_dim,
        type_k,
        type_v,
    };
    shape.bytes_for_tokens((n_ctx as u64).checked_mul(n_seq as u64)?)
}

/// How the cache gets memory as sequences grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Growth {
    Vmm,
    Realloc,
    Prealloc,
}

/// The shape and policy of a cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvParams {
    pub n_layer: u32,
    pub n_head_kv: u32,
    pub head_dim: u32,
    pub n_ctx_max: u32,
    pub n_seq_max: u32,
    pub type_k: HbmType,
    pub type_v: HbmType,
    pub growth: Growth,
}

/// Counters of a cache, in bytes unless named otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvStats {
    /// Address space reserved (`Vmm`), 0 otherwise.
    pub reserved: u64,
    /// Device memory the cache holds: committed pages or allocations.
    pub committed: u64,
    /// Of `committed`, what sits in released slots on the free list (`Vmm`).
    pub cached: u64,
    /// Sequences currently bound.
    pub n_seq: u32,
    /// Times a `Realloc` growth moved a sequence's tensors.
    pub generation: u64,
    /// Bytes copied by `Realloc` growth.
    pub copied: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use HbmType::*;

    #[test]
    fn llama_sizes() {
        // LLaMA-7B: 32 layers, 32 KV heads of 128, 2048 tokens, F16.
        assert_eq!(
            kv_cache_bytes(32, 32, 128, 2048, 1, F16, F16),
            Some(1_073_741_824)
        );
        // LLaMA-70B with GQA: 80 layers, 8 KV heads of 128.
        assert_eq!(
            kv_cache_bytes(80, 8, 128, 2048, 1, F16, F16),
            Some(671_088_640)
        );
        // Four sequences cost four times one.
        assert_eq!(
            kv_cache_bytes(80, 8, 128, 2048, 4, F16, F16),
            Some(4 * 671_088_640)
        );
    }

    #[test]
    fn every_type_and_mixed_types() {
        // 7B at 2048 tokens: 32 * 2048 tokens * 4096 elements per row, K and V.
        let rows = 32u64 * 2048;
        for (ty, per_row) in [
            (F32, 4096 * 4),
            (F16, 4096 * 2),
            (BF16, 4096 * 2),
            (Q8_0, 128 * 34),
            (Q4_0, 128 * 18),
        ] {
            assert_eq!(
                kv_cache_bytes(32, 32, 128, 2048, 1, ty, ty),
                Some(rows * 2 * per_row),
                "{ty:?}"
            );
        }
        assert_eq!(
            kv_cache_bytes(32, 32, 128, 2048, 1, Q8_0, F16),
            Some(rows * (128 * 34 + 4096 * 2))
        );
        // Q8_0 stores 34 bytes per 32 values: 17/32 of the F16 cache.
        assert_eq!(
            kv_cache_bytes(32, 32, 128, 2048, 1, Q8_0, Q8_0),
            Some(570_425_344)
        );
    }

    #[test]
    fn invalid_shapes() {
        // A row of 1 * 40 elements is not a whole number of 32-blocks.
        assert_eq!(kv_cache_bytes(1, 1, 40, 16, 1, Q8_0, F16), None);
        assert_eq!(kv_cache_bytes(1, 1, 40, 16, 1, F16, Q4_0), None);
        // But 4 heads of 40 are 160 = 5 blocks: rows, not heads, are what is blocked.
        assert_eq!(kv_cache_bytes(1, 4, 40, 1, 1, Q4_0, Q4_0), Some(2 * 5 * 18));
        assert_eq!(kv_cache_bytes(0, 32, 128, 2048, 1, F16, F16), Some(0));
        // u32::MAX everywhere overflows 64 bits.
        let m = u32::MAX;
        assert_eq!(kv_cache_bytes(m, m, m, m, m, F32, F32), None);
        assert_eq!(kv_cache_bytes(m, 1, 1, m, m, F32, F32), None);
    }
}
