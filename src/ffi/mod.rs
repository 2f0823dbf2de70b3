//! Every `extern "C"` item of the library, and only those.
//!
//! `cuda_api` holds the interposed CUDA runtime entry points (kept out of the generated header so
//! it can be included beside `cuda_runtime.h`); `hbm_api` the library's own `hbm_*` functions.

pub(crate) mod guard;
pub mod status;
pub mod track_api;
