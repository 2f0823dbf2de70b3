//! KV cache bytes, sized as llama.cpp sizes its cache.
//!
//! Rule (llama.cpp `llama_kv_cache`): the cache has `kv_size` cells, n_ctx padded up to a multiple
//! of 256; each layer with attention holds a K tensor of `row_size(type_k, n_embd_k_gqa) * kv_size`
//! bytes and a V tensor of `row_size(type_v, n_embd_v_gqa) * kv_size`, where
//! `n_embd_k_gqa = head_dim_k * n_head_kv(layer)`. With several sequences the cells are shared
//! (unified) or split into per-sequence streams of n_ctx / n_seq cells; the total is the same.
//! Layers with no KV heads hold nothing.
//!
//! Sliding-window layers (llama.cpp `llama_kv_cache_iswa`, swa_full off): the SWA cache has
//! `min(kv_size, pad(n_swa * n_seq + n_ubatch, 256))` cells. NOT yet checked against llama.cpp's
//! source or a run: treat the SWA figure as an estimate until the GPU comparison exists.
//!
//! MLA (DeepSeek-2/3): K only, `kv_lora_rank + rope_dim` wide per cell, no V tensor.
//!
//! A quantized V cache requires flash attention in llama.cpp; [`kv_bytes`] refuses it otherwise.

use super::ggml_type::GgmlType;
use super::model::Hparams;

/// The padding llama.cpp applies to n_ctx.
pub const CTX_PAD: u64 = 256;

/// The cache's shape for one run.
#[derive(Debug, Clone, Copy)]
pub struct KvParams {
    pub n_ctx: u64,
    pub n_ubatch: u64,
    pub n_seq: u64,
    pub type_k: GgmlType,
    pub type_v: GgmlType,
    pub flash_attn: bool,
}

/// n_ctx padded as llama.cpp pads it.
pub fn padded_ctx(n_ctx: u64) -> u64 {
    n_ctx.div_ceil(CTX_PAD) * CTX_PAD
}

/// KV bytes per layer (K + V), in layer order.
pub fn kv_bytes_per_layer(h: &Hparams, p: &KvParams) -> Result<Vec<u64>, String> {
    if p.type_v.is_quantized() && !p.flash_attn {
        return Err(format!(
            "a quantized V cache ({}) needs flash attention (--fa on)",
            p.type_v
        ));
    }
    let kv_size = padded_ctx(p.n_ctx);
    let swa_size = if h.n_swa > 0 {
        let cells = h
            .n_swa
            .checked_mul(p.n_seq.max(1))
            .and_then(|c| c.checked_add(p.n_ubatch))
            .ok_or("SWA size overflows")?;
        kv_size.min(padded_ctx(cells))
    } else {
        kv_size
    };
    let mul = |a: u64, b: u64| {
        a.checked_mul(b)
            .ok_or_else(|| "KV size overflows 64 bits".to_string())
    };
    (0..h.n_layer as usize)
        .map(|il| {
            let n_kv = h.n_head_kv.get(il).copied().unwrap_or(0);
            if n_kv == 0 {
                return Ok(0);
            }
            let cells = if h.swa_layers.get(il).copied().unwrap_or(false) {
                swa_size
            } else {
                kv_size
            };
            if h.kv_lora_rank > 0 {
                let k = p
                    .type_k
                    .row_size(h.kv_lora_rank + h.rope_dim)
                    .map_err(|e| e.to_string())?;
                return mul(k, cells);
            }
            let k = p
                .type_k
                .row_size(mul(h.head_dim_k, n_kv)?)
                .map_err(|e| e.to_string())?;
            let v = p
                .type_v
                .row_size(mul(h.head_dim_v, n_kv)?)
                .map_err(|e| e.to_string())?;
            mul(k.checked_add(v).ok_or("KV size overflows")?, cells)
        })
        .collect()
}

/// Total KV bytes.
pub fn kv_bytes(h: &Hparams, p: &KvParams) -> Result<u64, String> {
    Ok(kv_bytes_per_layer(h, p)?.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn f16(n_ctx: u64) -> KvParams {
        KvParams {
            n_ctx,
            n_ubatch: 512,
            n_seq: 1,
            type_k: GgmlType::F16,
            type_v: GgmlType::F16,
            flash_attn: false,
        }
    }

    #[test]
    fn worked_examples() {
        let llama7b = Hparams::dense("llama", 32, 4096, 32, 32);
        assert_eq!(kv_bytes(&llama7b, &f16(2048)), Ok(GIB));
        assert_eq!(kv_bytes(&llama7b, &f16(4096)), Ok(2 * GIB));
        let llama70b = Hparams::dense("llama", 80, 8192, 64, 8);
        assert_eq!(kv_bytes(&llama70b, &f16(2048)), Ok(640 * MIB));
    }

    #[test]
    fn padding_quantized_types_and_layers_without_attention() {
        let mut h = Hparams::dense("llama", 32, 4096, 32, 32);
        // 2049 pads to 2304 cells.
        assert_eq!(kv_bytes(&h, &f16(2049)), Ok(GIB / 2048 * 2304));
        let q8 = KvParams {
            type_k: GgmlType::Q8_0,
            type_v: GgmlType::Q8_0,
            flash_attn: true,
            ..f16(2048)
        };
        assert_eq!(kv_bytes(&h, &q8), Ok(32 * 2048 * 2 * (4096 / 32 * 34)));
        let no_fa = KvParams {
            flash_attn: false,
            ..q8
        };
        assert!(kv_bytes(&h, &no_fa)
            .unwrap_err()
            .contains("flash attention"));
        h.n_head_kv[0] = 0;
        assert_eq!(kv_bytes(&h, &f16(2048)), Ok(GIB / 32 * 31));
    }

    #[test]
    fn sliding_window_and_mla() {
        let mut h = Hparams::dense("gemma2", 2, 256, 2, 1);
        h.n_swa = 4096;
        h.swa_layers = vec![true, false];
        let p = f16(32768);
        let per = kv_bytes_per_layer(&h, &p).unwrap();
        let cell = 2 * 128 * 2; // K+V, one head of 128, f16
        assert_eq!(per, vec![cell * (4096 + 512), cell * 32768]);
        // A window wider than the context is capped at the context.
        assert_eq!(
            kv_bytes_per_layer(&h, &f16(1024)).unwrap(),
            vec![cell * 1024, cell * 1024]
        );
        let mut ds = Hparams::dense("deepseek2", 61, 7168, 128, 128);
        ds.kv_lora_rank = 512;
        ds.rope_dim = 64;
        assert_eq!(kv_bytes(&ds, &f16(4096)), Ok(61 * 4096 * 576 * 2));
    }
}
