//! The shape of a paged KV cache: per layer its KV heads, K and V head sizes and attention window;
//! for the whole cache the element types, the block size and how many blocks, sequences and tokens
//! it holds. Row bytes come from `dtype::kv_rows_bytes`, the one source of KV sizes.

use crate::error::{Error, Result};
use crate::kv::types::kv_rows_bytes;
use crate::kv::HbmType;

/// Tokens per block when the caller does not choose (vLLM's default).
pub const DEFAULT_BLOCK_TOKENS: u32 = 16;

/// One layer of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerSpec {
    /// KV heads of this layer (> 0); layers may differ.
    pub n_kv_heads: u32,
    /// Elements per K head (> 0).
    pub head_dim_k: u32,
    /// Elements per V head; 0 when the layer stores no V (MLA keeps one latent in K).
    pub head_dim_v: u32,
    /// Sliding window in tokens: the layer keeps only the blocks of its last `window` tokens.
    /// 0: full attention, every block kept.
    pub window: u32,
}

impl LayerSpec {
    /// A full-attention layer with K and V heads of the same size.
    pub fn full(n_kv_heads: u32, head_dim: u32) -> LayerSpec {
        LayerSpec {
            n_kv_heads,
            head_dim_k: head_dim,
            head_dim_v: head_dim,
            window: 0,
        }
    }
}

/// Everything a paged cache is made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PagedParams {
    pub layers: Vec<LayerSpec>,
    pub type_k: HbmType,
    pub type_v: HbmType,
    /// Tokens per block (> 0).
    pub block_tokens: u32,
    /// Blocks in each pool (one pool per distinct window; see `groups`): the most the cache can
    /// hold. Address space for all of them is reserved at creation; memory is committed as used.
    pub num_blocks: u32,
    /// Sequence ids are `0 .. max_seqs`.
    pub max_seqs: u32,
    /// Most tokens one sequence may hold; sizes the block tables.
    pub max_seq_tokens: u32,
}

/// What `PagedParams::check` derives: per layer its row bytes and group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Derived {
    /// Bytes of one token's K row, V row (0 without V), per layer.
    pub row_k: Vec<usize>,
    pub row_v: Vec<usize>,
    /// Elements of one token's K row, V row, per layer.
    pub elems_k: Vec<u32>,
    pub elems_v: Vec<u32>,
    /// Layers grouped by window, in order of first appearance: the layers of a group share
    /// block ids, and so one block table per sequence.
    pub groups: Vec<(u32, Vec<u32>)>,
    /// `(group, index in the group)` of each layer.
    pub layer_group: Vec<(usize, usize)>,
    /// Entries in one sequence's block table: `ceil(max_seq_tokens / block_tokens)`.
    pub max_blocks_per_seq: u32,
}

impl PagedParams {
    /// `n_layer` identical full-attention layers with the default block size.
    pub fn uniform(
        n_layer: u32,
        n_kv_heads: u32,
        head_dim: u32,
        ty: HbmType,
        num_blocks: u32,
        max_seqs: u32,
        max_seq_tokens: u32,
    ) -> PagedParams {
        PagedParams {
            layers: vec![LayerSpec::full(n_kv_heads, head_dim); n_layer as usize],
            type_k: ty,
            type_v: ty,
            block_tokens: DEFAULT_BLOCK_TOKENS,
            num_blocks,
            max_seqs,
            max_seq_tokens,
        }
    }

    /// Checks the parameters and derives the sizes. `InvalidValue` for no layers, a zero count,
    /// a row that is not whole blocks of its type (Q8_0/Q4_0 need `n_kv_heads * head_dim` to be a
    /// multiple of 32), block ids that would not fit an `int32`, or sizes that overflow.
    pub fn check(&self) -> Result<Derived> {
        let zero = Error::InvalidValue("paged KV dimensions must be positive");
        if self.layers.is_empty()
            || self.block_tokens == 0
            || self.num_blocks == 0
            || self.max_seqs == 0
            || self.max_seq_tokens == 0
        {
            return Err(zero);
        }
        // Slots are `block * block_tokens + offset` in an int64; block ids are int32.
        if self.num_blocks > i32::MAX as u32 {
            return Err(Error::InvalidValue("num_blocks does not fit an int32"));
        }
        let mut d = Derived {
            row_k: Vec::new(),
            row_v: Vec::new(),
            elems_k: Vec::new(),
            elems_v: Vec::new(),
            groups: Vec::new(),
            layer_group: Vec::new(),
            max_blocks_per_seq: self.max_seq_tokens.div_ceil(self.block_tokens),
        };
        let not_blocks = Error::InvalidValue("a layer's row is not a whole number of blocks");
        let too_long = Error::InvalidValue("a layer's row is too long");
        for (l, spec) in self.layers.iter().enumerate() {
            if spec.n_kv_heads == 0 || spec.head_dim_k == 0 {
                return Err(zero);
            }
            let ek = spec.n_kv_heads.checked_mul(spec.head_dim_k);
            let ev = spec.n_kv_heads.checked_mul(spec.head_dim_v);
            let (Some(ek), Some(ev)) = (ek, ev) else {
                return Err(too_long);
            };
            if ek > i32::MAX as u32 || ev > i32::MAX as u32 {
                return Err(too_long);
            }
            // Sized by the KV size function the memory estimate uses too (one source of truth).
            let rk = kv_rows_bytes(self.type_k, ek.into(), 1).ok_or(not_blocks.clone())? as usize;
            let rv = kv_rows_bytes(self.type_v, ev.into(), 1).ok_or(not_blocks.clone())? as usize;
            // Every tensor must fit the address space: num_blocks * block_tokens rows.
            let rows = self.num_blocks as u64 * self.block_tokens as u64;
            for (ty, elems) in [(self.type_k, ek), (self.type_v, ev)] {
                kv_rows_bytes(ty, elems.into(), rows)
                    .filter(|&b| b <= isize::MAX as u64 / 4)
                    .ok_or(Error::InvalidValue("paged KV size overflows"))?;
            }
            d.row_k.push(rk);
            d.row_v.push(rv);
            d.elems_k.push(ek);
            d.elems_v.push(ev);
            let g = match d.groups.iter().position(|(w, _)| *w == spec.window) {
                Some(g) => g,
                None => {
                    d.groups.push((spec.window, Vec::new()));
                    d.groups.len() - 1
                }
            };
            d.layer_group.push((g, d.groups[g].1.len()));
            d.groups[g].1.push(l as u32);
        }
        (self.max_seqs as u64)
            .checked_mul(d.max_blocks_per_seq as u64 * 4)
            .filter(|&b| b <= isize::MAX as u64 / 4)
            .ok_or(Error::InvalidValue("block tables overflow"))?;
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use HbmType::*;

    #[test]
    fn rows_and_groups() {
        let mut p = PagedParams::uniform(3, 8, 128, F16, 64, 4, 100);
        p.type_k = Q8_0;
        p.layers[1].window = 32;
        p.layers[2].head_dim_v = 0;
        p.layers[2].n_kv_heads = 1;
        let d = p.check().unwrap();
        assert_eq!(d.row_k, vec![32 * 34, 32 * 34, 4 * 34]);
        assert_eq!(d.row_v, vec![2048, 2048, 0], "layer 2 has no V");
        assert_eq!(d.groups, vec![(0, vec![0, 2]), (32, vec![1])]);
        assert_eq!(d.layer_group, vec![(0, 0), (1, 0), (0, 1)]);
        assert_eq!(d.max_blocks_per_seq, 7, "ceil(100 / 16)");
    }

    #[test]
    fn bad_shapes_are_refused() {
        let ok = PagedParams::uniform(2, 8, 128, F16, 64, 4, 100);
        assert!(ok.check().is_ok());
        let mut p = ok.clone();
        p.layers.clear();
        assert!(p.check().is_err(), "no layers");
        for f in [
            |p: &mut PagedParams| p.block_tokens = 0,
            |p: &mut PagedParams| p.num_blocks = 0,
            |p: &mut PagedParams| p.max_seqs = 0,
            |p: &mut PagedParams| p.max_seq_tokens = 0,
            |p: &mut PagedParams| p.layers[0].n_kv_heads = 0,
            |p: &mut PagedParams| p.layers[1].head_dim_k = 0,
            |p: &mut PagedParams| p.num_blocks = u32::MAX,
            |p: &mut PagedParams| p.layers[0].head_dim_k = u32::MAX,
            |p: &mut PagedParams| {
                // 1 head of 40 is not whole Q4_0 blocks.
                p.type_v = Q4_0;
                p.layers[0] = LayerSpec::full(1, 40);
            },
        ] {
            let mut p = ok.clone();
            f(&mut p);
            assert!(
                matches!(p.check(), Err(Error::InvalidValue(_))),
                "{p:?} accepted"
            );
        }
    }
}
