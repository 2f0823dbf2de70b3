//! Model files from arbitrary bytes, through everything the `estimate` and `fit` commands do
//! with them: the reader, the hyperparameters, the estimate and the planner. An answer or an
//! error, never a panic. The fuzz target `model_files` and its corpus replay.

use crate::estimate::budget::{estimate, Params};
use crate::estimate::plan::{fit, Ctx};
use crate::estimate::weights::{self, Model};
use crate::estimate::{gguf, safetensors};

/// The first byte picks the format. GGUF: the rest is the file. Safetensors: a little-endian
/// u16 gives the length of the `config.json` text that follows; the rest is the file.
pub fn run(data: &[u8]) {
    let Some((&format, rest)) = data.split_first() else {
        return;
    };
    let model = if format & 1 == 0 {
        gguf_model(rest)
    } else {
        safetensors_model(rest)
    };
    if let Ok(m) = model {
        plan(&m);
    }
}

/// A GGUF file read from memory, as `weights::open` reads one from disk.
pub fn gguf_model(file: &[u8]) -> Result<Model, String> {
    let f = gguf::parse(file, file.len() as u64).map_err(|e| e.to_string())?;
    weights::from_gguf(&[f], "fuzz.gguf")
}

/// A safetensors file and its `config.json`, from memory.
pub fn safetensors_model(data: &[u8]) -> Result<Model, String> {
    let n = data.len().min(2);
    let json_len = u16::from_le_bytes([
        data.first().copied().unwrap_or(0),
        data.get(1).copied().unwrap_or(0),
    ]);
    let rest = &data[n..];
    let (json, file) = rest.split_at((json_len as usize).min(rest.len()));
    let json: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let f = safetensors::parse(file, file.len() as u64).map_err(|e| e.to_string())?;
    weights::from_safetensors(&[f], &json, "fuzz.safetensors")
}

/// The estimate and the planner over a few devices and settings.
fn plan(m: &Model) {
    let _ = estimate(m, &Params::default());
    let two = Params {
        tensor_split: vec![1.0, 3.0],
        n_ctx: 131072,
        ..Params::default()
    };
    let _ = estimate(m, &two);
    let _ = fit(m, &Params::default(), &[1 << 30], 0, Ctx::Auto);
    let _ = fit(m, &two, &[80 << 30, 1 << 20], 1 << 20, Ctx::Fixed(8192));
}
