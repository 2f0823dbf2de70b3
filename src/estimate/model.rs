//! Architecture hyperparameters, read from GGUF metadata (`{arch}.block_count`, ...).

use super::gguf::{GgufFile, Value};

/// The most layers a model may declare.
pub const MAX_LAYERS: u32 = 1 << 16;

/// What the KV cache and weight split need to know about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Hparams {
    pub arch: String,
    pub n_layer: u32,
    pub n_embd: u64,
    /// KV heads per layer (0: the layer has no attention and no cache).
    pub n_head_kv: Vec<u64>,
    /// Per-head K and V widths (`{arch}.attention.key_length` / `.value_length`).
    pub head_dim_k: u64,
    pub head_dim_v: u64,
    /// Sliding window (0: none) and which layers use it (`estimate::swa`).
    pub n_swa: u64,
    pub swa_layers: Vec<bool>,
    /// MLA (DeepSeek-2/3): compressed KV rank and rope dims (0: not MLA).
    pub kv_lora_rank: u64,
    pub rope_dim: u64,
    pub n_ctx_train: u64,
    pub n_expert: u64,
}

impl Hparams {
    /// A dense model with the same KV head count in every layer and no sliding window.
    pub fn dense(arch: &str, n_layer: u32, n_embd: u64, n_head: u64, n_head_kv: u64) -> Hparams {
        let head_dim = n_embd / n_head;
        Hparams {
            arch: arch.into(),
            n_layer,
            n_embd,
            n_head_kv: vec![n_head_kv; n_layer as usize],
            head_dim_k: head_dim,
            head_dim_v: head_dim,
            n_swa: 0,
            swa_layers: vec![false; n_layer as usize],
            kv_lora_rank: 0,
            rope_dim: 0,
            n_ctx_train: 0,
            n_expert: 0,
        }
    }

    /// Reads the hyperparameters from a GGUF header; a missing required key is an error naming it.
    pub fn from_gguf(f: &GgufFile) -> Result<Hparams, String> {
        let arch = f
            .get("general.architecture")
            .and_then(Value::as_str)
            .ok_or("GGUF metadata lacks general.architecture")?
            .to_string();
        let key = |k: &str| format!("{arch}.{k}");
        let num = |k: &str| f.get(&key(k)).and_then(Value::as_u64);
        let need =
            |k: &str| num(k).ok_or_else(|| format!("GGUF metadata lacks {} (an integer)", key(k)));
        // Bounded before per-layer vectors are sized by it (real models have at most a few hundred).
        let n_layer = u32::try_from(need("block_count")?)
            .ok()
            .filter(|&n| n <= MAX_LAYERS)
            .ok_or_else(|| format!("{} of at most {MAX_LAYERS}", key("block_count")))?;
        let n_embd = need("embedding_length")?;
        let per_layer = |k: &str, default: u64| -> Result<Vec<u64>, String> {
            match f.get(&key(k)) {
                None => Ok(vec![default; n_layer as usize]),
                Some(Value::Array(a)) => {
                    let v: Option<Vec<u64>> = a.iter().map(Value::as_u64).collect();
                    match v {
                        Some(v) if v.len() == n_layer as usize => Ok(v),
                        _ => Err(format!("{} must hold {n_layer} integers", key(k))),
                    }
                }
                Some(v) => v
                    .as_u64()
                    .map(|x| vec![x; n_layer as usize])
                    .ok_or_else(|| format!("{} must be an integer", key(k))),
            }
        };
        let n_head = per_layer("attention.head_count", 0)?;
        let n_head0 = n_head.iter().copied().find(|&h| h > 0).unwrap_or(0);
        if n_head0 == 0 {
            return Err(format!(
                "GGUF metadata lacks {}",
                key("attention.head_count")
            ));
        }
        let mut n_head_kv = per_layer("attention.head_count_kv", 0)?;
        if f.get(&key("attention.head_count_kv")).is_none() {
            n_head_kv = n_head.clone();
        }
        let head_dim_k = num("attention.key_length").unwrap_or(n_embd / n_head0);
        let head_dim_v = num("attention.value_length").unwrap_or(n_embd / n_head0);
        let (n_swa, swa_layers) = super::swa::from_gguf(f, &arch, n_layer)?;
        Ok(Hparams {
            n_layer,
            n_embd,
            n_head_kv,
            head_dim_k,
            head_dim_v,
            n_swa,
            swa_layers,
            kv_lora_rank: num("attention.kv_lora_rank").unwrap_or(0),
            rope_dim: num("rope.dimension_count").unwrap_or(0),
            n_ctx_train: num("context_length").unwrap_or(0),
            n_expert: num("expert_count").unwrap_or(0),
            arch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(kv: Vec<(&str, Value)>) -> GgufFile {
        GgufFile::of_metadata(kv)
    }

    #[test]
    fn reads_llama_metadata_with_defaults() {
        let f = file(vec![
            ("general.architecture", Value::String("llama".into())),
            ("llama.block_count", Value::U32(2)),
            ("llama.embedding_length", Value::U32(4096)),
            ("llama.attention.head_count", Value::U32(32)),
            (
                "llama.attention.head_count_kv",
                Value::Array(vec![Value::U32(8), Value::U32(0)]),
            ),
            ("llama.context_length", Value::U64(8192)),
        ]);
        let h = Hparams::from_gguf(&f).unwrap();
        assert_eq!(h.n_layer, 2);
        assert_eq!(h.n_head_kv, vec![8, 0]);
        assert_eq!((h.head_dim_k, h.head_dim_v), (128, 128));
        assert_eq!(h.n_ctx_train, 8192);
        assert_eq!(h.n_swa, 0);
    }

    #[test]
    fn missing_or_malformed_keys_are_named() {
        let e = Hparams::from_gguf(&file(vec![(
            "general.architecture",
            Value::String("qwen2".into()),
        )]))
        .unwrap_err();
        assert!(e.contains("qwen2.block_count"), "{e}");
        let f = file(vec![
            ("general.architecture", Value::String("x".into())),
            ("x.block_count", Value::U32(3)),
            ("x.embedding_length", Value::U32(64)),
            ("x.attention.head_count", Value::U32(4)),
            (
                "x.attention.head_count_kv",
                Value::Array(vec![Value::U32(1)]),
            ),
        ]);
        assert!(Hparams::from_gguf(&f).unwrap_err().contains("must hold 3"));
        // A lying layer count is refused before anything is sized by it.
        let f = file(vec![
            ("general.architecture", Value::String("x".into())),
            ("x.block_count", Value::U32(u32::MAX)),
            ("x.embedding_length", Value::U32(64)),
            ("x.attention.head_count", Value::U32(4)),
        ]);
        assert!(Hparams::from_gguf(&f).unwrap_err().contains("at most"));
    }
}
