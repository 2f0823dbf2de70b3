//! Every `extern "C"` item of the library, and only those.
//!
//! `cuda_api` holds the interposed CUDA runtime entry points of device memory (kept out of the
//! generated header so it can be included beside `cuda_runtime.h`), `cuda_host_api` those of
//! pinned host and managed memory; `cuda_pitch_api` the pitched allocations (pooled),
//! `cuda_array_api`, `cuda_mempool_api` and `cuda_register_api` what the runtime serves itself
//! and hbmalloc records (CUDA arrays, the program's memory pools, registered host ranges;
//! `forwarded_free` their one free path); `driver_api` the driver API's `cuMemAlloc_v2` and
//! `cuMemFree_v2`; `hbm_api` the library's own `hbm_*` functions.
//! Both go through the tracking adaptor (`crate::tracked`); `real_cuda` finds the runtime's own functions. `kv_api` holds the
//! KV sizes and the CPU reference of the element formats, `kv_cache_api` the KV cache object,
//! `pool_api` the ggml-style scratch pools, `track_api` the leak checks; `runtime_state` what the
//! runtime answers before looking at arguments (no device, sticky errors); `torch_api` PyTorch's
//! pluggable allocator.

pub mod cuda_api;
pub mod cuda_array_api;
pub mod cuda_host_api;
pub mod cuda_mempool_api;
pub mod cuda_pitch_api;
pub mod cuda_register_api;
pub mod driver_api;
pub mod estimate_api;
mod forwarded_free;
pub(crate) mod guard;
pub mod hbm_api;
pub mod kv_api;
pub mod kv_cache_api;
pub mod paged_kv_api;
pub mod paged_kv_api_batch;
pub mod pool_api;
mod real_cuda;
pub(crate) mod runtime_state;
pub mod status;
pub mod torch_api;
pub mod track_api;
