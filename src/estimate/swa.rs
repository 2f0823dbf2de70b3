//! Which layers of a GGUF model use sliding-window attention (SWA), and how wide the window is,
//! decided as llama.cpp's loader decides it (`load_hparams` per architecture, and
//! `llama_hparams::set_swa_pattern`).
//!
//! llama.cpp reads two keys, and only for the architectures that have SWA layers:
//! - `{arch}.attention.sliding_window`: the window in tokens (`n_swa`);
//! - `{arch}.attention.sliding_window_pattern`: either a period `n` or one bool per layer
//!   (true: the layer slides). Without it, the architecture's own period applies (table below).
//!
//! A period `n` makes layer `il` slide when `il % n < n - 1`: every n-th layer (the last of each
//! group of n) keeps full attention; `n = 0` makes every layer slide, `n = 1` none.
//!
//! An architecture llama.cpp gives no SWA (the `llama` architecture of Mistral-7B v0.1, whose
//! window llama.cpp ignores, or Phi-3, where it is switched off) gets a full cache in every
//! layer here too, whatever the file says: the estimate follows what llama.cpp allocates.
//! Not handled: Llama 4's chunked attention and Gemma 3n's shared-KV layers (counted as full
//! attention, which overestimates: the safe direction).

use super::gguf::{GgufFile, Value};

/// An architecture whose SWA layers llama.cpp sets in code.
struct ArchSwa {
    /// `general.architecture` as llama.cpp names it.
    arch: &'static str,
    /// The period used when the file has no `sliding_window_pattern`.
    period: u32,
    /// The window used when the file has no `sliding_window` (None: the key is required).
    default_window: Option<u64>,
}

/// From llama.cpp's per-architecture hyperparameter loaders.
const ARCHS: &[ArchSwa] = &[
    ArchSwa {
        arch: "gemma2",
        period: 2,
        default_window: Some(4096),
    },
    ArchSwa {
        arch: "gemma3",
        period: 6,
        default_window: None,
    },
    ArchSwa {
        arch: "gemma-embedding",
        period: 6,
        default_window: None,
    },
    ArchSwa {
        arch: "cohere2",
        period: 4,
        default_window: None,
    },
    ArchSwa {
        arch: "gpt-oss",
        period: 2,
        default_window: None,
    },
];

/// llama.cpp's period for a Hugging Face `model_type` whose GGUF architecture has SWA layers
/// (`gemma2`, `gemma3`, `cohere2`, `gpt_oss`), or `None`: llama.cpp gives that model no SWA.
pub fn hf_period(model_type: &str) -> Option<u32> {
    let arch = match model_type {
        "gemma3_text" => "gemma3",
        "gpt_oss" => "gpt-oss",
        t => t,
    };
    ARCHS.iter().find(|a| a.arch == arch).map(|a| a.period)
}

/// The sliding layers of a period-`n` pattern (llama.cpp `set_swa_pattern(n)`, dense last).
pub fn pattern(n_layer: u32, period: u32) -> Vec<bool> {
    (0..n_layer)
        .map(|il| period == 0 || il % period < period - 1)
        .collect()
}

/// The window (0: none) and which layers slide, from a GGUF header.
pub fn from_gguf(f: &GgufFile, arch: &str, n_layer: u32) -> Result<(u64, Vec<bool>), String> {
    let none = || (0, vec![false; n_layer as usize]);
    let window_key = format!("{arch}.attention.sliding_window");
    let pattern_key = format!("{arch}.attention.sliding_window_pattern");
    let known = ARCHS.iter().find(|a| a.arch == arch);
    let pattern_value = f.get(&pattern_key);
    // llama.cpp reads the window only where the architecture has SWA layers, or where the file
    // says which layers slide (the architectures that read a per-layer array).
    if known.is_none() && pattern_value.is_none() {
        return Ok(none());
    }
    let window = match f.get(&window_key) {
        Some(v) => v
            .as_u64()
            .ok_or_else(|| format!("{window_key} must be a non-negative integer"))?,
        None => match known.and_then(|a| a.default_window) {
            Some(w) => w,
            None => return Err(format!("GGUF metadata lacks {window_key} (an integer)")),
        },
    };
    if window == 0 {
        // A zero window turns SWA off (Gemma 3 without sliding layers).
        return Ok(none());
    }
    let layers = match pattern_value {
        None => pattern(n_layer, known.map_or(0, |a| a.period)),
        Some(Value::Array(a)) => {
            let v: Option<Vec<bool>> = a
                .iter()
                .map(|x| match x {
                    Value::Bool(b) => Some(*b),
                    other => other.as_u64().map(|n| n != 0),
                })
                .collect();
            match v {
                Some(v) if v.len() == n_layer as usize => v,
                _ => {
                    return Err(format!(
                        "{pattern_key} must hold {n_layer} bools (one per layer)"
                    ))
                }
            }
        }
        Some(v) => {
            let period = v
                .as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| format!("{pattern_key} must be a period or one bool per layer"))?;
            pattern(n_layer, period)
        }
    };
    Ok((window, layers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(kv: Vec<(&str, Value)>) -> GgufFile {
        GgufFile::of_metadata(kv)
    }

    #[test]
    fn periods_keep_every_nth_layer_full() {
        assert_eq!(pattern(4, 2), vec![true, false, true, false]);
        assert_eq!(
            pattern(7, 6),
            vec![true, true, true, true, true, false, true]
        );
        assert_eq!(pattern(3, 0), vec![true; 3], "0: every layer slides");
        assert_eq!(pattern(3, 1), vec![false; 3], "1: none does");
    }

    #[test]
    fn architecture_defaults_and_file_overrides() {
        // Gemma 2 slides without any key: window 4096, every other layer.
        let (w, l) = from_gguf(&file(vec![]), "gemma2", 4).unwrap();
        assert_eq!((w, l), (4096, vec![true, false, true, false]));
        // gpt-oss needs its window; the period comes from the table.
        assert!(from_gguf(&file(vec![]), "gpt-oss", 2)
            .unwrap_err()
            .contains("gpt-oss.attention.sliding_window"));
        let f = file(vec![("gpt-oss.attention.sliding_window", Value::U32(128))]);
        assert_eq!(
            from_gguf(&f, "gpt-oss", 2).unwrap(),
            (128, vec![true, false])
        );
        // A period in the file replaces the table's.
        let f = file(vec![
            ("cohere2.attention.sliding_window", Value::U32(512)),
            ("cohere2.attention.sliding_window_pattern", Value::U32(2)),
        ]);
        assert_eq!(from_gguf(&f, "cohere2", 2).unwrap().1, vec![true, false]);
        // A per-layer array, on an architecture not in the table.
        let f = file(vec![
            ("gemma4.attention.sliding_window", Value::U32(1024)),
            (
                "gemma4.attention.sliding_window_pattern",
                Value::Array(vec![Value::Bool(false), Value::Bool(true)]),
            ),
        ]);
        assert_eq!(
            from_gguf(&f, "gemma4", 2).unwrap(),
            (1024, vec![false, true])
        );
        let short = file(vec![
            ("gemma4.attention.sliding_window", Value::U32(1024)),
            (
                "gemma4.attention.sliding_window_pattern",
                Value::Array(vec![Value::Bool(true)]),
            ),
        ]);
        assert!(from_gguf(&short, "gemma4", 2)
            .unwrap_err()
            .contains("must hold 2"));
    }

    #[test]
    fn hugging_face_model_types_map_to_llama_cpp_periods() {
        assert_eq!(hf_period("gemma2"), Some(2));
        assert_eq!(hf_period("gemma3_text"), Some(6));
        assert_eq!(hf_period("gpt_oss"), Some(2));
        assert_eq!(hf_period("mistral"), None);
    }

    #[test]
    fn windows_llama_cpp_ignores_give_no_swa() {
        // Mistral-7B v0.1 as the llama architecture: llama.cpp never reads the window.
        let f = file(vec![("llama.attention.sliding_window", Value::U32(4096))]);
        assert_eq!(from_gguf(&f, "llama", 3).unwrap(), (0, vec![false; 3]));
        // Gemma 3 with a zero window has no sliding layers.
        let f = file(vec![("gemma3.attention.sliding_window", Value::U32(0))]);
        assert_eq!(from_gguf(&f, "gemma3", 2).unwrap(), (0, vec![false; 2]));
    }
}
