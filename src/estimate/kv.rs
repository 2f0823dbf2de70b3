//! KV cache bytes, sized as llama.cpp sizes its cache.
//!
//! Cells (llama.cpp `llama_context` and `llama_kv_cache_iswa`):
//! - n_ctx is padded up to a multiple of 256.
//! - Unified cache (`--kv-unified`): one stream of `n_ctx` cells shared by every sequence.
//!   Otherwise (llama.cpp's default) one stream per sequence, each of
//!   `n_ctx_seq = pad256(n_ctx / n_seq)` cells (n_ctx becomes `n_ctx_seq * n_seq`).
//! - Sliding-window layers (`estimate::swa`), with `--swa-full` off (llama.cpp's default), keep
//!   `pad256(min(cells, n_swa * (unified ? n_seq : 1) + n_ubatch))` cells per stream: the window
//!   of every sequence the stream serves, plus room for one micro-batch. With `--swa-full` they
//!   keep as many as the full-attention layers.
//!
//! Bytes: each layer with attention holds a K tensor of `n_embd_k_gqa` elements per cell and a V
//! tensor of `n_embd_v_gqa`, where `n_embd_k_gqa = head_dim_k * n_head_kv(layer)`, sized by
//! [`crate::dtype::kv_rows_bytes`], the function the paged KV cache sizes its blocks with.
//! Layers with no KV heads hold nothing. MLA (DeepSeek-2/3): K only, `kv_lora_rank + rope_dim`
//! wide. A quantized V cache requires flash attention in llama.cpp; it is refused otherwise.

use super::ggml_type::GgmlType;
use super::model::Hparams;
use crate::dtype::{kv_rows_bytes, HbmType};

/// The padding llama.cpp applies to n_ctx, to each sequence's cells and to the SWA cache.
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
    /// llama.cpp `--swa-full`: sliding-window layers keep every cell (off by default).
    pub swa_full: bool,
    /// llama.cpp `--kv-unified`: one stream shared by every sequence (off by default).
    pub kv_unified: bool,
}

/// One layer's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerKv {
    /// Whether the layer slides (and so keeps the smaller SWA cache).
    pub swa: bool,
    /// Cells, summed over streams (0: the layer has no cache).
    pub cells: u64,
    pub k_bytes: u64,
    pub v_bytes: u64,
}

impl LayerKv {
    pub fn bytes(&self) -> u64 {
        self.k_bytes + self.v_bytes
    }
}

/// The whole cache: its cells and every layer's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvLayout {
    /// n_ctx as llama.cpp ends up with it (padded; a multiple of n_seq without a unified cache).
    pub n_ctx: u64,
    pub n_stream: u64,
    /// Cells per stream of a full-attention layer, and of a sliding-window layer.
    pub cells_full: u64,
    pub cells_swa: u64,
    pub layers: Vec<LayerKv>,
}

impl KvLayout {
    pub fn bytes(&self) -> u64 {
        self.layers.iter().map(LayerKv::bytes).sum()
    }

    /// Layers with a cache, and their bytes, of the full-attention (`swa == false`) or the
    /// sliding-window layers.
    pub fn group(&self, swa: bool) -> (u32, u64) {
        let of: Vec<&LayerKv> = self
            .layers
            .iter()
            .filter(|l| l.swa == swa && l.cells > 0)
            .collect();
        (of.len() as u32, of.iter().map(|l| l.bytes()).sum())
    }
}

/// n_ctx padded as llama.cpp pads it.
pub fn padded_ctx(n_ctx: u64) -> u64 {
    n_ctx.div_ceil(CTX_PAD) * CTX_PAD
}

/// The KV cache type as the cache stores it (the five types both llama.cpp and hbmalloc keep).
fn cache_type(t: GgmlType) -> Result<HbmType, String> {
    HbmType::from_i32(t.id as i32)
        .ok_or_else(|| format!("{t} is not a KV cache type (f32, f16, bf16, q8_0, q4_0)"))
}

/// The cache llama.cpp allocates for `h` and `p`, layer by layer.
pub fn kv_layout(h: &Hparams, p: &KvParams) -> Result<KvLayout, String> {
    if p.type_v.is_quantized() && !p.flash_attn {
        return Err(format!(
            "a quantized V cache ({}) needs flash attention (--fa on)",
            p.type_v
        ));
    }
    let (tk, tv) = (cache_type(p.type_k)?, cache_type(p.type_v)?);
    let n_seq = p.n_seq.max(1);
    let padded = padded_ctx(p.n_ctx);
    let (n_ctx, n_stream, cells_full) = if p.kv_unified {
        (padded, 1, padded)
    } else {
        let per_seq = padded_ctx(padded / n_seq);
        if per_seq == 0 {
            return Err(format!(
                "{n_seq} sequences leave no cells of a {padded}-cell context (llama.cpp: n_ctx_seq == 0)"
            ));
        }
        (per_seq * n_seq, n_seq, per_seq)
    };
    let cells_swa = if h.n_swa == 0 || p.swa_full {
        cells_full
    } else {
        // Saturating: a window wider than any context (a header may claim anything) is capped
        // at the full cache below, as llama.cpp's min() caps it.
        let window = h
            .n_swa
            .saturating_mul(if p.kv_unified { n_seq } else { 1 })
            .saturating_add(p.n_ubatch);
        padded_ctx(cells_full.min(window))
    };
    let overflow = || "KV size overflows 64 bits".to_string();
    let mul = |a: u64, b: u64| a.checked_mul(b).ok_or_else(overflow);
    let not_blocks = |t: GgmlType, n: u64| {
        format!("a KV row of {n} elements is not a whole number of {t} blocks, or overflows")
    };
    let layers = (0..h.n_layer as usize)
        .map(|il| {
            let swa = h.n_swa > 0 && h.swa_layers.get(il).copied().unwrap_or(false);
            let n_kv = h.n_head_kv.get(il).copied().unwrap_or(0);
            if n_kv == 0 {
                return Ok(LayerKv {
                    swa,
                    cells: 0,
                    k_bytes: 0,
                    v_bytes: 0,
                });
            }
            let cells = mul(if swa { cells_swa } else { cells_full }, n_stream)?;
            let (k_elems, v_elems) = if h.kv_lora_rank > 0 {
                (
                    h.kv_lora_rank
                        .checked_add(h.rope_dim)
                        .ok_or_else(overflow)?,
                    0,
                )
            } else {
                (mul(h.head_dim_k, n_kv)?, mul(h.head_dim_v, n_kv)?)
            };
            Ok(LayerKv {
                swa,
                cells,
                k_bytes: kv_rows_bytes(tk, k_elems, cells)
                    .ok_or_else(|| not_blocks(p.type_k, k_elems))?,
                v_bytes: kv_rows_bytes(tv, v_elems, cells)
                    .ok_or_else(|| not_blocks(p.type_v, v_elems))?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    layers
        .iter()
        .try_fold(0u64, |a, l| a.checked_add(l.bytes()))
        .ok_or_else(overflow)?;
    Ok(KvLayout {
        n_ctx,
        n_stream,
        cells_full,
        cells_swa,
        layers,
    })
}

/// KV bytes per layer (K + V), in layer order.
pub fn kv_bytes_per_layer(h: &Hparams, p: &KvParams) -> Result<Vec<u64>, String> {
    Ok(kv_layout(h, p)?.layers.iter().map(LayerKv::bytes).collect())
}

/// Total KV bytes.
pub fn kv_bytes(h: &Hparams, p: &KvParams) -> Result<u64, String> {
    Ok(kv_layout(h, p)?.bytes())
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
            swa_full: false,
            kv_unified: false,
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
        let q4k = KvParams {
            type_k: GgmlType::Q4_K,
            ..f16(2048)
        };
        assert!(kv_bytes(&h, &q4k)
            .unwrap_err()
            .contains("not a KV cache type"));
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
                                // 4096 + 512 = 4608, already a multiple of 256.
        assert_eq!(per, vec![cell * 4608, cell * 32768]);
        let l = kv_layout(&h, &p).unwrap();
        assert_eq!((l.cells_full, l.cells_swa), (32768, 4608));
        assert_eq!(l.group(true), (1, cell * 4608));
        // --swa-full: every layer keeps every cell.
        let full = KvParams {
            swa_full: true,
            ..p
        };
        assert_eq!(kv_bytes(&h, &full), Ok(2 * cell * 32768));
        // A window wider than the context is capped at the context.
        assert_eq!(
            kv_bytes_per_layer(&h, &f16(1024)).unwrap(),
            vec![cell * 1024, cell * 1024]
        );
        // An odd window pads up: 100 + 512 -> 768; a window past any context is the context.
        h.n_swa = 100;
        assert_eq!(kv_bytes_per_layer(&h, &p).unwrap()[0], cell * 768);
        h.n_swa = u64::MAX;
        assert_eq!(kv_bytes_per_layer(&h, &p).unwrap()[0], cell * 32768);
        let mut ds = Hparams::dense("deepseek2", 61, 7168, 128, 128);
        ds.kv_lora_rank = 512;
        ds.rope_dim = 64;
        assert_eq!(kv_bytes(&ds, &f16(4096)), Ok(61 * 4096 * 576 * 2));
    }

    #[test]
    fn streams_per_sequence_or_unified() {
        let mut h = Hparams::dense("gpt-oss", 2, 512, 8, 2);
        h.n_swa = 128;
        h.swa_layers = vec![true, false];
        let cell = 2 * 2 * 64 * 2; // K+V, 2 heads of 64, f16
                                   // 4 sequences, 4096 cells: a stream of 1024 per sequence; SWA pad(128 + 512) = 768 each.
        let p = KvParams {
            n_seq: 4,
            ..f16(4096)
        };
        let l = kv_layout(&h, &p).unwrap();
        assert_eq!((l.n_stream, l.cells_full, l.cells_swa), (4, 1024, 768));
        assert_eq!(
            kv_bytes_per_layer(&h, &p).unwrap(),
            vec![cell * 4 * 768, cell * 4096]
        );
        // Unified: one stream; the window covers every sequence: pad(4 * 128 + 512) = 1024.
        let u = KvParams {
            kv_unified: true,
            ..p
        };
        let l = kv_layout(&h, &u).unwrap();
        assert_eq!((l.n_stream, l.cells_full, l.cells_swa), (1, 4096, 1024));
        // n_ctx not divisible: 1000 pads to 1024, / 3 = 341 -> 512 a stream, n_ctx 1536.
        let odd = KvParams {
            n_seq: 3,
            ..f16(1000)
        };
        assert_eq!(kv_layout(&h, &odd).unwrap().n_ctx, 1536);
        let too_many = KvParams {
            n_seq: 300,
            ..f16(256)
        };
        assert!(kv_layout(&h, &too_many).unwrap_err().contains("n_ctx_seq"));
    }
}
