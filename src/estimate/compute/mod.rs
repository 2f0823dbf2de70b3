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
//! - flash attention: with a quantized or BF16 cache, ggml-cuda's multi-token kernels convert
//!   K and V to f16 into space the CUDA buffer type adds to the attention node's size
//!   ([`graph::CacheType::Converted`]); the CPU kernel reads them as stored. Q's f16 cast and
//!   cuBLAS's f16 copies of activations come from the CUDA pool (`ggml_cuda_pool`), which is
//!   part of the per-GPU overhead.
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
    build(
        s,
        Part {
            first,
            end,
            output,
            gpu,
        },
    )
    .reserve(align)
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
            gpu: false,
        },
    )
    .inputs_bytes(CPU_ALIGN)
    .saturating_add(s.n_embd.saturating_mul(4 * s.n_ubatch))
}

#[cfg(test)]
mod tests {
    use super::graph::{CacheType, Flavor, Layer, Shape};
    use super::*;

    const MIB: f64 = (1 << 20) as f64;

    /// The models of scripts/estimate-vs-llamacpp.sh: 512 wide, vocabulary 2000, FFN 1408.
    fn shape(flavor: Flavor, n_head: u64, hd: u64, layers: Vec<Layer>) -> Shape {
        Shape {
            flavor,
            n_ubatch: 512,
            n_embd: 512,
            n_head,
            head_dim_k: hd,
            head_dim_v: hd,
            n_ff: 1408,
            n_vocab: 2000,
            layers,
            flash_attn: false,
            k_rot: false,
            v_rot: false,
            k_cache: CacheType::F16,
            v_cache: CacheType::F16,
            v_is_k_view: false,
        }
    }

    fn gqa(n_kv: u64) -> Shape {
        let l = Layer {
            n_kv,
            swa: false,
            n_head_kv: 2,
        };
        shape(Flavor::Llama, 8, 64, vec![l; 4])
    }

    /// Gemma-3 of the script: layers 0-4 and 6 slide (768 cells at n_ctx 8192), layer 5 not.
    fn gemma3_8192() -> Shape {
        let layers = (0..7)
            .map(|il| Layer {
                n_kv: if il == 5 { 8192 } else { 768 },
                swa: il != 5,
                n_head_kv: 2,
            })
            .collect();
        shape(Flavor::Gemma3, 4, 128, layers)
    }

    fn cpu_only(s: &Shape) -> u64 {
        device_bytes(s, 0, s.layers.len(), true, false)
    }

    /// Within llama.cpp's printed precision (4 decimals of MiB in its `~llama_context` line).
    fn assert_mib(bytes: u64, llama_cpp: f64) {
        let mib = bytes as f64 / MIB;
        assert!(
            (mib - llama_cpp).abs() < 0.00006,
            "{mib:.5} MiB, llama.cpp {llama_cpp} MiB"
        );
    }

    // Measured with llama.cpp of llama-cpp-python 0.3.36 (vendor), CPU-only build, -ngl 0,
    // -c CTX -ub 512 (default), `~llama_context: CPU compute buffer size is X MiB`.

    #[test]
    fn llama_gqa_without_flash_attention() {
        // The peak is layer 0's KQ (8 MiB) placed above the inputs (2.51 MiB), the residual, and
        // a 2 MiB hole (attention norm and the un-roped Q) that it does not fit in.
        assert_eq!(cpu_only(&gqa(512)), 15_214_592);
        assert_mib(cpu_only(&gqa(512)), 14.5098);
    }

    #[test]
    fn llama_gqa_flash_attention_long_context() {
        // The peak moves to layer 0's FFN: gate, up and swiglu (2.75 MiB each) above two 1 MiB
        // holes they do not fit in; the f16 mask (4 MiB) stays below them.
        let s = Shape {
            flash_attn: true,
            ..gqa(4096)
        };
        assert_mib(cpu_only(&s), 16.2637);
    }

    #[test]
    fn gemma3_sliding_window_q8_0_cache() {
        // Two masks (768 and 8192 cells, f16) and two pairs of Hadamard rotations.
        let s = Shape {
            flash_attn: true,
            k_rot: true,
            v_rot: true,
            ..gemma3_8192()
        };
        assert_mib(cpu_only(&s), 20.1777);
    }

    // Measured with the same llama.cpp built with CUDA on an H200, -ngl 99, `CUDA0 compute buffer
    // size` as the comparison table prints it, to 0.01 MiB
    // (bench/results-h200-2026-12-04-estimate-vs-llamacpp.md).

    fn assert_mib2(bytes: u64, llama_cpp: f64) {
        let mib = bytes as f64 / MIB;
        assert!(
            (mib - llama_cpp).abs() < 0.005,
            "{mib:.4} MiB, llama.cpp {llama_cpp} MiB"
        );
    }

    #[test]
    fn cuda_flash_attention_converts_a_quantized_cache_in_its_own_node() {
        let f16 = Shape {
            flash_attn: true,
            ..gqa(4096)
        };
        let gpu = |s: &Shape| device_bytes(s, 0, 4, true, true);
        assert_mib2(gpu(&f16), 15.26);
        // q8_0 K and V: the rotations (16 KiB each) and, behind each attention output (1 MiB),
        // f16 copies of the 4096-cell K and V views (1 MiB each). The copies are f16 whatever
        // the cache holds: llama.cpp's q4_0 row is the same 15.29.
        let q8 = Shape {
            k_rot: true,
            v_rot: true,
            k_cache: CacheType::Converted,
            v_cache: CacheType::Converted,
            ..f16.clone()
        };
        assert_mib2(gpu(&q8), 15.29);
        // Without the copies (the CPU's kernel reads the cache as stored) the GPU would need a
        // MiB less: what the estimate said before it modelled them.
        let stored = Shape {
            k_cache: CacheType::F16,
            v_cache: CacheType::F16,
            ..q8.clone()
        };
        assert_mib2(gpu(&stored), 14.29);
    }

    #[test]
    fn cuda_flash_attention_copies_each_layers_own_window() {
        // Gemma-3: the copies of the 768-cell sliding layers and of the 8192-cell full one.
        let s = Shape {
            flash_attn: true,
            k_rot: true,
            v_rot: true,
            k_cache: CacheType::Converted,
            v_cache: CacheType::Converted,
            ..gemma3_8192()
        };
        assert_mib2(device_bytes(&s, 0, 7, true, true), 20.93);
        // At n_ctx 1024 the full layer has 1024 cells, the sliding ones still 768.
        let mut s1024 = s.clone();
        s1024.layers[5].n_kv = 1024;
        assert_mib2(device_bytes(&s1024, 0, 7, true, true), 13.18);
    }

    #[test]
    fn a_gpu_run_keeps_the_inputs_on_the_host() {
        let s = gqa(512);
        // tokens, inp_embd, positions, k/v indices (v transposed: 512 x 128 i64), the f32 mask,
        // out_ids; and the embeddings' get_rows.
        let inputs = 2048 + (1 << 20) + 2048 + 4096 + (512 << 10) + (1 << 20) + 2048;
        assert_eq!(host_inputs_bytes(&s), inputs + (1 << 20));
        // The GPU replays the same graph less the host's embeddings input (1 MiB here, at the
        // bottom of the buffer); CUDA's 128-byte alignment changes nothing at these sizes.
        assert_eq!(device_bytes(&s, 0, 4, true, true), cpu_only(&s) - (1 << 20));
        assert_eq!(device_bytes(&s, 0, 0, false, true), 0);
    }
}
