//! Compute buffers: llama.cpp's graph reserve, replayed (issue 10).
//!
//! llama.cpp sizes each backend's compute buffer by running ggml-alloc over the worst-case graph
//! of one micro-batch (`llama_context::sched_reserve` → `graph_reserve(n_ubatch, ..)`, every
//! cell of every cache visible, `n_outputs = n_ubatch`). The figure is ggml-alloc's high-water
//! mark, holes included, so a closed formula of live tensors misses it by the fragmentation
//! (measured: 0.5-37% low). This module rebuilds that graph with sizes only (`graph`) and
//! replays ggml-alloc's placement on it (`galloc`); docs/estimate.md has the derivation.
//!
//! Where CPU and CUDA differ, as modelled:
//! - alignment: the CPU buffer type aligns tensors to 32 bytes (`TENSOR_ALIGNMENT`), CUDA's to
//!   128 ([`CPU_ALIGN`], [`CUDA_ALIGN`]); either is noise beside the MiB-sized tensors;
//! - inputs: llama.cpp creates every graph input on the CPU; on a run with layers on a GPU the
//!   scheduler copies the inputs a GPU split reads into that GPU's buffer, so the CPU buffer
//!   holds the inputs and the token embeddings' `get_rows` (the embeddings stay on the CPU),
//!   and each GPU replays its layers with its own copy of the inputs;
//! - flash attention: the CUDA kernel's f16 casts of K/V/Q and cuBLAS's f16 copies of
//!   activations come from the CUDA pool (`ggml_cuda_pool`), not from the compute buffer, so
//!   the graph is the same on both; the pool is part of the per-GPU overhead.
//! - Not modelled: pipeline parallelism (several GPUs with every layer offloaded keep
//!   `n_copies` = 4 graph copies), op offload of CPU layers' matrix products to the GPU.

pub mod galloc;
pub mod graph;

use graph::{build, Part, Shape};

/// `ggml_backend_cpu_buffer_type`'s alignment (`TENSOR_ALIGNMENT`).
pub const CPU_ALIGN: u64 = 32;
/// `ggml_backend_cuda_buffer_type`'s alignment.
pub const CUDA_ALIGN: u64 = 128;

/// The compute buffer of one device running layers `first..end` (and the output when
/// `output`); `gpu`: a CUDA buffer, else the CPU's.
pub fn device_bytes(s: &Shape, first: usize, end: usize, output: bool, gpu: bool) -> u64 {
    if first >= end && !output {
        return 0;
    }
    let align = if gpu { CUDA_ALIGN } else { CPU_ALIGN };
    build(s, Part { first, end, output }).reserve(align)
}

/// The CPU buffer of a run whose layers are all on GPUs: the graph inputs, which llama.cpp
/// creates on the CPU, and the token embeddings' `get_rows` beside them.
pub fn host_inputs_bytes(s: &Shape) -> u64 {
    build(
        s,
        Part {
            first: 0,
            end: s.layers.len(),
            output: false,
        },
    )
    .inputs_bytes(CPU_ALIGN)
    .saturating_add(4 * s.n_ubatch * s.n_embd)
}
