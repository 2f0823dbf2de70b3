//! hbmalloc: a GPU memory manager for LLM inference.
//!
//! Data flows one way: `ffi` (the C boundary) → `tracked` (the tracking adaptor) → `pool` / `kv`
//! → `backend`; `tracked` records every block with `track`. Only `ffi` is `extern "C"`; only `backend::cuda` calls CUDA.

pub mod backend;
pub mod config;
pub mod dtype;
pub mod error;
pub mod estimate;
pub mod fault_plan;
pub mod ffi;
pub mod harness;
pub mod kv;
pub mod nvtx;
pub mod pool;
pub mod process;
pub mod runtime;
pub mod sync;
#[cfg(test)]
mod test_child;
pub mod track;
pub mod tracked;
pub mod units;
