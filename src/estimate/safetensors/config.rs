//! The Hugging Face `config.json` beside a safetensors model: the architecture, as [`Hparams`].

use serde::Deserialize;
use serde_json::Value;

use crate::estimate::model::Hparams;

/// The `config.json` fields the estimate reads; absent ones are `None`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub num_hidden_layers: Option<u64>,
    pub hidden_size: Option<u64>,
    pub num_attention_heads: Option<u64>,
    pub num_key_value_heads: Option<u64>,
    pub head_dim: Option<u64>,
    pub max_position_embeddings: Option<u64>,
    pub sliding_window: Option<u64>,
    /// Qwen2 writes a window but switches it off here.
    pub use_sliding_window: Option<bool>,
    /// Per layer: `sliding_attention` or `full_attention` (newer configs).
    pub layer_types: Option<Vec<String>>,
    pub vocab_size: Option<u64>,
    pub torch_dtype: Option<String>,
    pub tie_word_embeddings: Option<bool>,
    pub intermediate_size: Option<u64>,
    /// MoE: Mixtral `num_local_experts`, Qwen-MoE `num_experts`, DeepSeek `n_routed_experts`.
    pub num_local_experts: Option<u64>,
    pub num_experts: Option<u64>,
    pub n_routed_experts: Option<u64>,
    /// MLA (DeepSeek-2/3).
    pub kv_lora_rank: Option<u64>,
    pub qk_rope_head_dim: Option<u64>,
}

impl HfConfig {
    /// Parses a `config.json` value; multimodal configs keep the language model under
    /// `text_config`, which is used when the top level has no layer count.
    pub fn from_json(v: &Value) -> Result<HfConfig, String> {
        let v = match v.get("text_config") {
            Some(t) if v.get("num_hidden_layers").is_none() => t,
            _ => v,
        };
        HfConfig::deserialize(v).map_err(|e| format!("config.json: {e}"))
    }

    /// The hyperparameters; a missing required field is an error naming it.
    pub fn hparams(&self) -> Result<Hparams, String> {
        let need = |v: Option<u64>, k: &str| {
            v.filter(|&x| x > 0)
                .ok_or_else(|| format!("config.json lacks {k} (a positive integer)"))
        };
        let n_layer = need(self.num_hidden_layers, "num_hidden_layers")?;
        let n_layer = u32::try_from(n_layer)
            .ok()
            .filter(|&n| n <= crate::estimate::model::MAX_LAYERS)
            .ok_or("config.json: num_hidden_layers is implausibly large")?;
        let n_embd = need(self.hidden_size, "hidden_size")?;
        let n_head = need(self.num_attention_heads, "num_attention_heads")?;
        let n_head_kv = self.num_key_value_heads.unwrap_or(n_head);
        let arch = self.model_type.clone().unwrap_or_else(|| "unknown".into());
        let mut h = Hparams::dense(&arch, n_layer, n_embd, n_head, n_head_kv);
        if let Some(d) = self.head_dim.filter(|&d| d > 0) {
            h.head_dim_k = d;
            h.head_dim_v = d;
        }
        let window = self
            .sliding_window
            .filter(|_| self.use_sliding_window != Some(false))
            .unwrap_or(0);
        if window > 0 {
            let layers = match &self.layer_types {
                Some(t) if t.len() == n_layer as usize => {
                    Some(t.iter().map(|s| s == "sliding_attention").collect())
                }
                Some(t) => {
                    return Err(format!(
                        "config.json: layer_types holds {} entries for {n_layer} layers",
                        t.len()
                    ))
                }
                // As llama.cpp would load the converted model: its architecture's period, or
                // no SWA at all where llama.cpp ignores the window (Mistral-7B v0.1).
                None => crate::estimate::swa::hf_period(&arch)
                    .map(|period| crate::estimate::swa::pattern(n_layer, period)),
            };
            if let Some(layers) = layers {
                h.n_swa = window;
                h.swa_layers = layers;
            }
        }
        if let Some(r) = self.kv_lora_rank.filter(|&r| r > 0) {
            h.kv_lora_rank = r;
            h.rope_dim = self.qk_rope_head_dim.unwrap_or(0);
        }
        h.n_ctx_train = self.max_position_embeddings.unwrap_or(0);
        h.n_expert = self
            .num_local_experts
            .or(self.num_experts)
            .or(self.n_routed_experts)
            .unwrap_or(0);
        Ok(h)
    }
}
