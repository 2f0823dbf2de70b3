//! hbmalloc: a GPU memory manager for LLM inference.
//!
//! Data flows one way: `ffi` (the C boundary) → `pool` / `kv` → `backend`, with `track` beside
//! them. Only `ffi` is `extern "C"`; only `backend::cuda` calls CUDA.

pub mod alloc;
pub mod backend;
pub mod config;
pub mod error;
pub mod estimate;
pub mod ffi;
pub mod fork;
pub mod host_alloc;
pub mod kernels;
pub mod kv;
pub mod pool;
pub mod runtime;
pub mod sync;
#[cfg(test)]
mod test_child;
pub mod track;
