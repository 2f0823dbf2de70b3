//! Built-in architectures for when no model file is at hand. Each builds the tensor list llama.cpp
//! would load (GGUF names, F16 unless another weight type is asked for; norms and biases F32),
//! so a preset is estimated exactly as a file with those shapes would be.

use super::ggml_type::GgmlType;
use super::model::Hparams;
use super::weights::{Model, Weight};

/// MLA shapes (DeepSeek-2/3).
#[derive(Debug, Clone, Copy)]
pub struct Mla {
    pub q_lora: u64,
    pub kv_lora: u64,
    pub qk_nope: u64,
    pub qk_rope: u64,
    pub v_head: u64,
}

/// One architecture.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    pub name: &'static str,
    pub arch: &'static str,
    pub n_layer: u32,
    pub n_embd: u64,
    pub n_head: u64,
    pub n_head_kv: u64,
    pub head_dim: u64,
    /// Dense feed-forward width (also the leading dense layers of an MoE model).
    pub n_ff: u64,
    pub n_vocab: u64,
    pub n_ctx_train: u64,
    pub tied: bool,
    pub qkv_bias: bool,
    /// MoE: experts, experts used per token, one expert's width, shared experts, leading dense layers.
    pub n_expert: u64,
    pub n_expert_used: u64,
    pub n_ff_exp: u64,
    pub n_expert_shared: u64,
    pub n_dense_lead: u32,
    /// Sliding window, and llama.cpp's SWA period for the architecture (`swa::pattern`: 2 makes
    /// the even layers slide, 0 every layer).
    pub n_swa: u64,
    pub swa_every: u32,
    pub mla: Option<Mla>,
    /// Published parameter count, in billions (model card / paper).
    pub published_b: f64,
}

const BASE: Preset = Preset {
    name: "",
    arch: "llama",
    n_layer: 32,
    n_embd: 4096,
    n_head: 32,
    n_head_kv: 32,
    head_dim: 128,
    n_ff: 11008,
    n_vocab: 32000,
    n_ctx_train: 4096,
    tied: false,
    qkv_bias: false,
    n_expert: 0,
    n_expert_used: 0,
    n_ff_exp: 0,
    n_expert_shared: 0,
    n_dense_lead: 0,
    n_swa: 0,
    swa_every: 0,
    mla: None,
    published_b: 0.0,
};

/// Every preset, by the name `--preset` takes.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "llama-7b",
        n_ctx_train: 2048,
        published_b: 6.74,
        ..BASE
    },
    Preset {
        name: "llama-13b",
        n_layer: 40,
        n_embd: 5120,
        n_head: 40,
        n_head_kv: 40,
        n_ff: 13824,
        n_ctx_train: 2048,
        published_b: 13.0,
        ..BASE
    },
    // The LLaMA-2 70B shape: 80 layers, 64 heads, 8 KV heads.
    Preset {
        name: "llama-70b",
        n_layer: 80,
        n_embd: 8192,
        n_head: 64,
        n_head_kv: 8,
        n_ff: 28672,
        published_b: 69.0,
        ..BASE
    },
    Preset {
        name: "llama-3.1-8b",
        n_head_kv: 8,
        n_ff: 14336,
        n_vocab: 128256,
        n_ctx_train: 131072,
        published_b: 8.03,
        ..BASE
    },
    Preset {
        name: "llama-3.1-70b",
        n_layer: 80,
        n_embd: 8192,
        n_head: 64,
        n_head_kv: 8,
        n_ff: 28672,
        n_vocab: 128256,
        n_ctx_train: 131072,
        published_b: 70.6,
        ..BASE
    },
    Preset {
        name: "llama-3.1-405b",
        n_layer: 126,
        n_embd: 16384,
        n_head: 128,
        n_head_kv: 8,
        n_ff: 53248,
        n_vocab: 128256,
        n_ctx_train: 131072,
        published_b: 405.9,
        ..BASE
    },
    Preset {
        name: "mistral-7b",
        n_head_kv: 8,
        n_ff: 14336,
        n_ctx_train: 32768,
        // v0.1's 4096-token window is not kept: llama.cpp loads Mistral-7B as the llama
        // architecture, whose window it never reads, and allocates a full cache.
        published_b: 7.24,
        ..BASE
    },
    Preset {
        name: "mixtral-8x7b",
        n_head_kv: 8,
        n_ff: 0,
        n_ctx_train: 32768,
        n_expert: 8,
        n_expert_used: 2,
        n_ff_exp: 14336,
        published_b: 46.7,
        ..BASE
    },
    Preset {
        name: "qwen2.5-7b",
        arch: "qwen2",
        n_layer: 28,
        n_embd: 3584,
        n_head: 28,
        n_head_kv: 4,
        n_ff: 18944,
        n_vocab: 152064,
        n_ctx_train: 32768,
        qkv_bias: true,
        published_b: 7.61,
        ..BASE
    },
    Preset {
        name: "qwen2.5-72b",
        arch: "qwen2",
        n_layer: 80,
        n_embd: 8192,
        n_head: 64,
        n_head_kv: 8,
        n_ff: 29568,
        n_vocab: 152064,
        n_ctx_train: 32768,
        qkv_bias: true,
        published_b: 72.7,
        ..BASE
    },
    Preset {
        name: "qwen3-8b",
        arch: "qwen3",
        n_layer: 36,
        n_head_kv: 8,
        n_ff: 12288,
        n_vocab: 151936,
        n_ctx_train: 40960,
        published_b: 8.19,
        ..BASE
    },
    Preset {
        name: "qwen3-30b-a3b",
        arch: "qwen3moe",
        n_layer: 48,
        n_embd: 2048,
        n_head_kv: 4,
        n_ff: 0,
        n_vocab: 151936,
        n_ctx_train: 40960,
        n_expert: 128,
        n_expert_used: 8,
        n_ff_exp: 768,
        published_b: 30.5,
        ..BASE
    },
    Preset {
        name: "gemma-2-9b",
        arch: "gemma2",
        n_layer: 42,
        n_embd: 3584,
        n_head: 16,
        n_head_kv: 8,
        head_dim: 256,
        n_ff: 14336,
        n_vocab: 256000,
        n_ctx_train: 8192,
        tied: true,
        n_swa: 4096,
        swa_every: 2,
        published_b: 9.24,
        ..BASE
    },
    Preset {
        name: "deepseek-v3",
        arch: "deepseek2",
        n_layer: 61,
        n_embd: 7168,
        n_head: 128,
        n_head_kv: 128,
        head_dim: 192,
        n_ff: 18432,
        n_vocab: 129280,
        n_ctx_train: 163840,
        n_expert: 256,
        n_expert_used: 8,
        n_ff_exp: 2048,
        n_expert_shared: 1,
        n_dense_lead: 3,
        mla: Some(Mla {
            q_lora: 1536,
            kv_lora: 512,
            qk_nope: 128,
            qk_rope: 64,
            v_head: 128,
        }),
        published_b: 671.0,
        ..BASE
    },
    Preset {
        name: "gpt-oss-20b",
        arch: "gpt-oss",
        n_layer: 24,
        n_embd: 2880,
        n_head: 64,
        n_head_kv: 8,
        head_dim: 64,
        n_ff: 0,
        n_vocab: 201088,
        n_ctx_train: 131072,
        qkv_bias: true,
        n_expert: 32,
        n_expert_used: 4,
        n_ff_exp: 2880,
        n_swa: 128,
        swa_every: 2,
        published_b: 20.9,
        ..BASE
    },
    Preset {
        name: "gpt-oss-120b",
        arch: "gpt-oss",
        n_layer: 36,
        n_embd: 2880,
        n_head: 64,
        n_head_kv: 8,
        head_dim: 64,
        n_ff: 0,
        n_vocab: 201088,
        n_ctx_train: 131072,
        qkv_bias: true,
        n_expert: 128,
        n_expert_used: 4,
        n_ff_exp: 2880,
        n_swa: 128,
        swa_every: 2,
        published_b: 116.8,
        ..BASE
    },
];

pub fn find(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name.eq_ignore_ascii_case(name))
}

impl Preset {
    /// The tensors, as (name, dims with ne[0] first); matrices in `wtype`, vectors in F32.
    fn shapes(&self) -> Vec<(String, Vec<u64>)> {
        let (e, hd) = (self.n_embd, self.head_dim);
        let mut t: Vec<(String, Vec<u64>)> =
            vec![("token_embd.weight".into(), vec![e, self.n_vocab])];
        for il in 0..self.n_layer {
            let mut add = |n: &str, d: Vec<u64>| t.push((format!("blk.{il}.{n}"), d));
            add("attn_norm.weight", vec![e]);
            if let Some(m) = self.mla {
                let qk = m.qk_nope + m.qk_rope;
                add("attn_q_a.weight", vec![e, m.q_lora]);
                add("attn_q_a_norm.weight", vec![m.q_lora]);
                add("attn_q_b.weight", vec![m.q_lora, self.n_head * qk]);
                add("attn_kv_a_mqa.weight", vec![e, m.kv_lora + m.qk_rope]);
                add("attn_kv_a_norm.weight", vec![m.kv_lora]);
                add(
                    "attn_kv_b.weight",
                    vec![m.kv_lora, self.n_head * (m.qk_nope + m.v_head)],
                );
                add("attn_output.weight", vec![self.n_head * m.v_head, e]);
            } else {
                let (q, kv) = (self.n_head * hd, self.n_head_kv * hd);
                add("attn_q.weight", vec![e, q]);
                add("attn_k.weight", vec![e, kv]);
                add("attn_v.weight", vec![e, kv]);
                add("attn_output.weight", vec![q, e]);
                if self.qkv_bias {
                    add("attn_q.bias", vec![q]);
                    add("attn_k.bias", vec![kv]);
                    add("attn_v.bias", vec![kv]);
                }
            }
            add("ffn_norm.weight", vec![e]);
            if self.n_expert > 0 && il >= self.n_dense_lead {
                let (x, f) = (self.n_expert, self.n_ff_exp);
                add("ffn_gate_inp.weight", vec![e, x]);
                add("ffn_gate_exps.weight", vec![e, f, x]);
                add("ffn_up_exps.weight", vec![e, f, x]);
                add("ffn_down_exps.weight", vec![f, e, x]);
                if self.n_expert_shared > 0 {
                    let s = f * self.n_expert_shared;
                    add("ffn_gate_shexp.weight", vec![e, s]);
                    add("ffn_up_shexp.weight", vec![e, s]);
                    add("ffn_down_shexp.weight", vec![s, e]);
                }
            } else {
                add("ffn_gate.weight", vec![e, self.n_ff]);
                add("ffn_up.weight", vec![e, self.n_ff]);
                add("ffn_down.weight", vec![self.n_ff, e]);
            }
        }
        t.push(("output_norm.weight".into(), vec![e]));
        if !self.tied {
            t.push(("output.weight".into(), vec![e, self.n_vocab]));
        }
        t
    }

    /// Parameters, counting tied embeddings once.
    pub fn parameters(&self) -> u64 {
        self.shapes()
            .iter()
            .map(|(_, d)| d.iter().product::<u64>())
            .sum()
    }

    /// The model, matrices in `wtype` (F32 norms and biases).
    pub fn model(&self, wtype: GgmlType) -> Result<Model, String> {
        let weights = self
            .shapes()
            .into_iter()
            .map(|(name, dims)| {
                let ty = if dims.len() == 1 {
                    GgmlType::F32
                } else {
                    wtype
                };
                ty.tensor_bytes(&dims)
                    .map(|bytes| Weight { name, bytes })
                    .map_err(|e| format!("preset {}: {e} (weight type {wtype})", self.name))
            })
            .collect::<Result<_, _>>()?;
        let mut h = Hparams::dense(
            self.arch,
            self.n_layer,
            self.n_embd,
            self.n_head,
            self.n_head_kv,
        );
        h.head_dim_k = self.head_dim;
        h.head_dim_v = self.head_dim;
        if let Some(m) = self.mla {
            h.kv_lora_rank = m.kv_lora;
            h.rope_dim = m.qk_rope;
            h.head_dim_k = m.qk_nope + m.qk_rope;
            h.head_dim_v = m.v_head;
        }
        if self.n_swa > 0 {
            h.n_swa = self.n_swa;
            h.swa_layers = super::swa::pattern(self.n_layer, self.swa_every);
        }
        h.n_ctx_train = self.n_ctx_train;
        h.n_expert = self.n_expert;
        Ok(Model {
            hparams: h,
            weights,
            n_vocab: self.n_vocab,
            n_ff: self.n_ff.max(self.n_ff_exp * self.n_expert_used),
            n_head: self.n_head,
            n_expert_used: self.n_expert_used,
            source: format!("preset {}", self.name),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::kv::{kv_bytes, KvParams};

    #[test]
    fn parameter_counts_match_the_published_ones() {
        for p in PRESETS {
            let b = p.parameters() as f64 / 1e9;
            let err = (b - p.published_b).abs() / p.published_b;
            assert!(
                err < 0.01,
                "{}: {b:.3}B vs published {}B",
                p.name,
                p.published_b
            );
        }
        assert_eq!(PRESETS.len(), 16);
    }

    #[test]
    fn worked_kv_examples_from_presets() {
        let f16 = |n_ctx| KvParams {
            n_ctx,
            n_ubatch: 512,
            n_seq: 1,
            type_k: GgmlType::F16,
            type_v: GgmlType::F16,
            flash_attn: false,
            swa_full: false,
            kv_unified: false,
        };
        let h = |n| find(n).unwrap().model(GgmlType::F16).unwrap().hparams;
        assert_eq!(kv_bytes(&h("llama-7b"), &f16(2048)), Ok(1 << 30));
        assert_eq!(kv_bytes(&h("llama-7b"), &f16(4096)), Ok(2 << 30));
        assert_eq!(kv_bytes(&h("llama-70b"), &f16(2048)), Ok(640 << 20));
        // LLaMA-7B: exactly 6,738,415,616 parameters; F16 matrices, 65 F32 norm vectors.
        let m = find("LLaMA-7B").unwrap().model(GgmlType::F16).unwrap();
        assert_eq!(find("llama-7b").unwrap().parameters(), 6_738_415_616);
        assert_eq!(m.total_bytes(), 2 * 6_738_415_616 + 2 * 4096 * 65);
    }
}
