//! One source of truth for KV bytes: the memory estimate's KV figure for a model equals what a
//! paged KV cache of the same shapes holds for the same tokens on the simulated device.
//!
//! The two differ only by their documented rounding: the estimate counts llama.cpp's cells
//! (n_ctx padded to 256), the paged cache whole blocks of `block_tokens` (16), and commits
//! memory in VMM granules (2 MiB on the simulated device) per tensor. At a token count that is
//! a multiple of 256 the rows are the same, so the bytes must be equal.

use hbmalloc::backend::sim::{SimBackend, SIM_GRANULARITY};
use hbmalloc::estimate::ggml_type::GgmlType;
use hbmalloc::estimate::kv::{kv_bytes_per_layer, KvParams};
use hbmalloc::estimate::model::Hparams;
use hbmalloc::kv::paged::{LayerSpec, PagedKvCache, PagedParams};
use hbmalloc::kv::HbmType;
use std::sync::Arc;

const BLOCK: u32 = 16;

/// A GQA model whose layers have different KV head counts, or an MLA model (K only).
fn model(mla: bool) -> Hparams {
    if mla {
        let mut h = Hparams::dense("deepseek2", 3, 1024, 16, 1);
        h.kv_lora_rank = 512;
        h.rope_dim = 64;
        return h;
    }
    let mut h = Hparams::dense("llama", 4, 1024, 8, 8);
    h.n_head_kv = vec![8, 4, 8, 2];
    h
}

/// The paged cache's layers for the same model.
fn layers(h: &Hparams) -> Vec<LayerSpec> {
    h.n_head_kv
        .iter()
        .map(|&n| {
            if h.kv_lora_rank > 0 {
                LayerSpec {
                    n_kv_heads: 1,
                    head_dim_k: (h.kv_lora_rank + h.rope_dim) as u32,
                    head_dim_v: 0,
                    window: 0,
                }
            } else {
                LayerSpec::full(n as u32, h.head_dim_k as u32)
            }
        })
        .collect()
}

/// Per layer: the estimate's bytes at `n_ctx`, and the bytes of the blocks a paged cache uses
/// to hold `tokens` tokens of one sequence; and the cache's committed bytes and tensor count.
fn both(
    h: &Hparams,
    tk: HbmType,
    tv: HbmType,
    n_ctx: u64,
    tokens: u32,
) -> (Vec<u64>, Vec<u64>, u64, u64) {
    let ggml = |t: HbmType| GgmlType::from_id(t as u32).unwrap();
    let est = kv_bytes_per_layer(
        h,
        &KvParams {
            n_ctx,
            n_ubatch: 512,
            n_seq: 1,
            type_k: ggml(tk),
            type_v: ggml(tv),
            flash_attn: true,
            swa_full: false,
            kv_unified: false,
        },
    )
    .unwrap();
    let b = Arc::new(SimBackend::new(0, 4 << 30));
    let params = PagedParams {
        layers: layers(h),
        type_k: tk,
        type_v: tv,
        block_tokens: BLOCK,
        num_blocks: tokens.div_ceil(BLOCK) + 8,
        max_seqs: 1,
        max_seq_tokens: tokens,
    };
    let c = PagedKvCache::new(b, params).unwrap();
    c.add_tokens(0, tokens, 0).unwrap();
    let s = c.stats();
    let blocks = s.blocks_used;
    let paged = (0..h.n_layer)
        .map(|l| {
            let (_, _, rk, rv) = c.layer_tensors(l).unwrap();
            (rk + rv) as u64 * BLOCK as u64 * blocks
        })
        .collect();
    let tensors = c
        .params()
        .layers
        .iter()
        .map(|l| if l.head_dim_v > 0 { 2 } else { 1 })
        .sum();
    (est, paged, s.bytes_committed, tensors)
}

#[test]
fn the_estimate_and_the_paged_cache_size_kv_alike() {
    use HbmType::*;
    for mla in [false, true] {
        let h = model(mla);
        for (tk, tv) in [
            (F16, F16),
            (BF16, F32),
            (Q8_0, Q8_0),
            (Q8_0, F16),
            (Q4_0, Q4_0),
        ] {
            let (est, paged, committed, tensors) = both(&h, tk, tv, 4096, 4096);
            assert_eq!(est, paged, "mla {mla}, K {tk:?}, V {tv:?}");
            // Committed memory: the blocks' bytes, rounded up to whole granules per tensor.
            let used: u64 = paged.iter().sum();
            assert!(
                committed >= used && committed < used + tensors * SIM_GRANULARITY as u64,
                "committed {committed} for {used} bytes of blocks in {tensors} tensors"
            );
        }
    }
}

#[test]
fn they_differ_only_by_their_rounding() {
    // 4000 tokens: llama.cpp's cache has pad256(4000) = 4096 cells, the paged cache
    // ceil(4000 / 16) = 250 blocks of 16 = 4000 rows; per layer both are rows x row bytes.
    let h = model(false);
    let (est, paged, _, _) = both(&h, HbmType::Q8_0, HbmType::Q8_0, 4000, 4000);
    for (e, p) in est.iter().zip(&paged) {
        assert_eq!(e * 4000, p * 4096);
    }
}
