//! hbmalloc: a GPU memory manager for LLM inference.
//!
//! Data flows one way: `ffi` (the C boundary) → `tracked` (the tracking adaptor) → `pool` / `kv`
//! → `backend`; `tracked` records every block with `track`. Only `ffi` is `extern "C"`; only `backend::cuda` calls CUDA.

pub mod backend;
pub mod config;
pub mod error;
pub mod estimate;
pub mod ffi;
pub mod fork;
pub mod harness;
pub mod kernels;
pub mod kv;
pub mod pool;
pub mod runtime;
pub mod sync;
#[cfg(test)]
mod test_child;
pub mod track;
pub mod tracked;
