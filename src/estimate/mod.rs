//! Know before loading: memory estimates from model file headers (issue 10).
//!
//! `ggml_type` is the ggml type table; readers and the estimate build on it.

pub mod budget;
pub mod compute;
pub mod ggml_type;
pub mod gguf;
pub mod kv;
pub mod model;
pub mod plan;
pub mod presets;
pub mod safetensors;
pub mod swa;
pub mod weights;
