//! A model as the estimate sees it (hyperparameters and tensor sizes, from any reader), and where
//! llama.cpp places each tensor for a given `-ngl` and `--tensor-split`.
//!
//! Placement, as llama.cpp's `llama_model::load_tensors` does it: with `ngl` GPU layers the first
//! `n_layer - ngl` layers stay on the CPU (`i_gpu_start`); `act = min(ngl, n_layer + 1)` slots go
//! to the GPUs, the last slot (index `n_layer`) being the output layer (`output`, `output_norm`),
//! so the output goes to a GPU only when `ngl > n_layer`. A slot's GPU is the first whose
//! cumulative, normalised split fraction exceeds `(il - i_gpu_start) / act`. The token
//! embeddings always stay on the CPU. A model without `output.weight` uses its token embeddings
//! as output (tied): a GPU holding the output holds a copy of them.

use std::path::Path;

use super::gguf;
use super::model::Hparams;
use super::safetensors::{self, config::HfConfig};

/// One tensor: its name (GGUF or Hugging Face spelling) and exact bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weight {
    pub name: String,
    pub bytes: u64,
}

/// Where a tensor belongs in llama.cpp's split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Token embeddings and anything outside the layers: the CPU.
    Input,
    /// Repeating layer `il`.
    Layer(u32),
    /// `output`, `output_norm`: the slot after the last layer.
    Output,
}

/// Which role a tensor name has.
pub fn role(name: &str) -> Role {
    let layer = name
        .strip_prefix("blk.")
        .or_else(|| name.strip_prefix("model.layers."))
        .or_else(|| name.strip_prefix("model.language_model.layers."))
        .and_then(|rest| rest.split('.').next())
        .and_then(|n| n.parse().ok());
    if let Some(il) = layer {
        return Role::Layer(il);
    }
    let output = ["output.", "output_norm.", "lm_head.", "model.norm."];
    if output.iter().any(|p| name.starts_with(p)) {
        Role::Output
    } else {
        Role::Input
    }
}

/// What the estimate needs of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub hparams: Hparams,
    pub weights: Vec<Weight>,
    pub n_vocab: u64,
    /// Widest feed-forward (dense or one expert's times the experts used), for compute buffers.
    pub n_ff: u64,
    pub n_head: u64,
    pub n_expert_used: u64,
    /// Where it came from: a path or `preset NAME`.
    pub source: String,
}

impl Model {
    /// Token embeddings bytes (the tied output's copy).
    fn token_embd_bytes(&self) -> u64 {
        self.weights
            .iter()
            .filter(|w| w.name.starts_with("token_embd.") || w.name == "model.embed_tokens.weight")
            .map(|w| w.bytes)
            .sum()
    }

    fn has_output(&self) -> bool {
        self.weights
            .iter()
            .any(|w| w.name == "output.weight" || w.name == "lm_head.weight")
    }

    pub fn total_bytes(&self) -> u64 {
        self.weights.iter().map(|w| w.bytes).sum()
    }
}

/// The device of each slot `0..=n_layer` (0 = CPU, 1.. = GPU k-1), as llama.cpp assigns them.
pub fn slot_devices(n_layer: u32, ngl: u32, split: &[f64]) -> Vec<usize> {
    let n = n_layer as i64;
    let i_gpu_start = (n - ngl as i64).max(0);
    let act = if split.is_empty() {
        0
    } else {
        (ngl as i64).min(n + 1)
    };
    let sum: f64 = split.iter().sum();
    let mut cum = Vec::with_capacity(split.len());
    let mut acc = 0.0;
    for s in split {
        acc += if sum > 0.0 {
            s / sum
        } else {
            1.0 / split.len() as f64
        };
        cum.push(acc);
    }
    (0..=n)
        .map(|il| {
            if il < i_gpu_start || il - i_gpu_start >= act {
                return 0;
            }
            let x = (il - i_gpu_start) as f64 / act as f64;
            let k = cum.iter().position(|&c| c > x).unwrap_or(split.len() - 1);
            k + 1
        })
        .collect()
}

/// Weight bytes per device (index 0 = CPU) for `ngl` GPU layers over `split.len()` GPUs.
pub fn weights_per_device(m: &Model, ngl: u32, split: &[f64]) -> Vec<u64> {
    let n_layer = m.hparams.n_layer;
    let slots = slot_devices(n_layer, ngl, split);
    let mut out = vec![0u64; split.len() + 1];
    for w in &m.weights {
        let dev = match role(&w.name) {
            Role::Input => 0,
            Role::Layer(il) => slots.get(il as usize).copied().unwrap_or(0),
            Role::Output => slots[n_layer as usize],
        };
        out[dev] += w.bytes;
    }
    let out_dev = slots[n_layer as usize];
    if !m.has_output() && out_dev > 0 {
        out[out_dev] += m.token_embd_bytes();
    }
    out
}

/// Reads a model: a `.gguf` file (all split parts), a `.safetensors` file, a
/// `model.safetensors.index.json`, or a folder holding one of those (with `config.json`).
pub fn open(path: &Path) -> Result<Model, String> {
    if path.is_dir() {
        let index = path.join("model.safetensors.index.json");
        let single = path.join("model.safetensors");
        return open(if index.exists() { &index } else { &single });
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.ends_with(".gguf") {
        return open_gguf(path);
    }
    if name.ends_with(".safetensors") || name.ends_with(".index.json") {
        return open_safetensors(path);
    }
    // Unknown extension: sniff the magic.
    let mut magic = [0u8; 4];
    use std::io::Read;
    let got = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if got == 4 && &magic == b"GGUF" {
        open_gguf(path)
    } else {
        open_safetensors(path)
    }
}

fn open_gguf(path: &Path) -> Result<Model, String> {
    let files = gguf::open_all(path)?;
    from_gguf(&files, &path.display().to_string()).map_err(|e| format!("{}: {e}", path.display()))
}

/// The model the parts of one GGUF file describe (`files[0]` holds the metadata); `source`
/// names it in reports.
pub fn from_gguf(files: &[gguf::GgufFile], source: &str) -> Result<Model, String> {
    let Some(f) = files.first() else {
        return Err("no GGUF file".to_string());
    };
    let hparams = Hparams::from_gguf(f)?;
    let weights: Vec<Weight> = files
        .iter()
        .flat_map(|f| f.tensors.iter())
        .map(|t| Weight {
            name: t.name.clone(),
            bytes: t.bytes,
        })
        .collect();
    let arch = &hparams.arch;
    let num = |k: &str| f.get(&format!("{arch}.{k}")).and_then(gguf::Value::as_u64);
    let n_vocab = num("vocab_size")
        .or_else(|| match f.get("tokenizer.ggml.tokens") {
            Some(gguf::Value::Array(a)) => Some(a.len() as u64),
            _ => None,
        })
        .or_else(|| {
            files
                .iter()
                .flat_map(|f| f.tensors.iter())
                .find(|t| t.name == "token_embd.weight")
                .and_then(|t| t.dims.get(1).copied())
        })
        .unwrap_or(0);
    let n_expert_used = num("expert_used_count").unwrap_or(0);
    let n_ff = if n_expert_used > 0 {
        // Saturating: a header may claim anything, and the estimate saturates its terms too.
        num("expert_feed_forward_length")
            .unwrap_or(0)
            .saturating_mul(n_expert_used)
    } else {
        0
    }
    .max(max_of(f.get(&format!("{arch}.feed_forward_length"))));
    let n_head = max_of(f.get(&format!("{arch}.attention.head_count")));
    Ok(Model {
        hparams,
        weights,
        n_vocab,
        n_ff,
        n_head,
        n_expert_used,
        source: source.to_string(),
    })
}

/// The largest integer of a scalar or per-layer array value.
fn max_of(v: Option<&gguf::Value>) -> u64 {
    match v {
        Some(gguf::Value::Array(a)) => a.iter().filter_map(gguf::Value::as_u64).max().unwrap_or(0),
        Some(v) => v.as_u64().unwrap_or(0),
        None => 0,
    }
}

fn open_safetensors(path: &Path) -> Result<Model, String> {
    let shards = if path.to_string_lossy().ends_with(".index.json") {
        safetensors::open_index(path)?
    } else {
        vec![(path.to_path_buf(), safetensors::open(path)?)]
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let config_path = dir.join("config.json");
    let json = safetensors::read_json(&config_path)
        .map_err(|e| format!("{e} (the architecture comes from config.json beside the weights)"))?;
    let shards: Vec<safetensors::SafetensorsFile> = shards.into_iter().map(|(_, f)| f).collect();
    from_safetensors(&shards, &json, &path.display().to_string())
}

/// The model that safetensors shards and their `config.json` (parsed) describe; `source` names
/// it in reports.
pub fn from_safetensors(
    shards: &[safetensors::SafetensorsFile],
    json: &serde_json::Value,
    source: &str,
) -> Result<Model, String> {
    let config = HfConfig::from_json(json)?;
    let hparams = config.hparams()?;
    let weights = shards
        .iter()
        .flat_map(|f| f.tensors.iter())
        .map(|t| Weight {
            name: t.name.clone(),
            bytes: t.bytes,
        })
        .collect();
    let n_expert_used = json
        .get("num_experts_per_tok")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let n_ff_exp = json
        .get("moe_intermediate_size")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    Ok(Model {
        n_vocab: config.vocab_size.unwrap_or(0),
        n_ff: config
            .intermediate_size
            .unwrap_or(0)
            .max(n_ff_exp.saturating_mul(n_expert_used)),
        n_head: config.num_attention_heads.unwrap_or(0),
        n_expert_used,
        hparams,
        weights,
        source: source.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(n_layer: u32, tied: bool) -> Model {
        let mut weights = vec![Weight {
            name: "token_embd.weight".into(),
            bytes: 1000,
        }];
        for il in 0..n_layer {
            weights.push(Weight {
                name: format!("blk.{il}.attn_q.weight"),
                bytes: 100,
            });
        }
        weights.push(Weight {
            name: "output_norm.weight".into(),
            bytes: 1,
        });
        if !tied {
            weights.push(Weight {
                name: "output.weight".into(),
                bytes: 500,
            });
        }
        Model {
            hparams: Hparams::dense("llama", n_layer, 64, 4, 4),
            weights,
            n_vocab: 10,
            n_ff: 128,
            n_head: 4,
            n_expert_used: 0,
            source: "test".into(),
        }
    }

    #[test]
    fn roles_from_gguf_and_hf_names() {
        assert_eq!(role("blk.12.ffn_up.weight"), Role::Layer(12));
        assert_eq!(role("model.layers.3.mlp.up_proj.weight"), Role::Layer(3));
        assert_eq!(role("output.weight"), Role::Output);
        assert_eq!(role("lm_head.weight"), Role::Output);
        assert_eq!(role("model.norm.weight"), Role::Output);
        assert_eq!(role("token_embd.weight"), Role::Input);
        assert_eq!(role("rope_freqs.weight"), Role::Input);
    }

    #[test]
    fn placement_follows_ngl_and_split() {
        // 4 layers: ngl 2 puts layers 2, 3 on the GPU, output on the CPU.
        assert_eq!(slot_devices(4, 2, &[1.0]), vec![0, 0, 1, 1, 0]);
        // ngl 5 (> n_layer) puts the output there too; ngl 99 the same.
        assert_eq!(slot_devices(4, 5, &[1.0]), vec![1; 5]);
        assert_eq!(slot_devices(4, 99, &[1.0]), vec![1; 5]);
        assert_eq!(slot_devices(4, 0, &[1.0]), vec![0; 5]);
        // Two GPUs 1:1 over 5 slots: fractions 0, .2, .4 on GPU0, .6, .8 on GPU1.
        assert_eq!(slot_devices(4, 99, &[1.0, 1.0]), vec![1, 1, 1, 2, 2]);
        // 3:1 split.
        assert_eq!(slot_devices(4, 99, &[3.0, 1.0]), vec![1, 1, 1, 1, 2]);
        // No GPU: everything on the CPU.
        assert_eq!(slot_devices(4, 99, &[]), vec![0; 5]);
        let m = model(4, false);
        assert_eq!(weights_per_device(&m, 4, &[1.0]), vec![1000 + 1 + 500, 400]);
        assert_eq!(weights_per_device(&m, 5, &[1.0]), vec![1000, 400 + 501]);
        assert_eq!(
            weights_per_device(&m, 99, &[1.0, 1.0]),
            vec![1000, 300, 100 + 501]
        );
        // Tied: the GPU holding the output holds a copy of the token embeddings.
        let t = model(4, true);
        assert_eq!(
            weights_per_device(&t, 5, &[1.0]),
            vec![1000, 400 + 1 + 1000]
        );
        assert_eq!(weights_per_device(&t, 4, &[1.0]), vec![1001, 400]);
    }
}
