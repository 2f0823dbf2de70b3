//! The estimate: weights, KV cache, compute buffers and overhead, per device.
//!
//! Compute buffers: `estimate::compute` rebuilds the graph llama.cpp reserves for one
//! micro-batch and replays ggml-alloc's placement on it, per device (docs/estimate.md).
//!
//! Overhead: each GPU also carries the CUDA context, cuBLAS and the kernels' workspaces, which
//! no file describes; it is a stated, configurable figure ([`DEFAULT_OVERHEAD`]).

use super::compute::{
    self,
    graph::{CacheType, Flavor, Layer, Shape},
};
use super::ggml_type::GgmlType;
use super::kv::{kv_layout, KvLayout, KvParams};
use super::weights::{slot_devices, weights_per_device, Model};

/// Per-GPU overhead assumed when none is given: 600 MiB. Measured on an H200 (CUDA 13.0, driver
/// 580; `scripts/gpu-check.sh overhead`, c_tests/gpu/context_overhead.cu): the context 527 MiB,
/// a cuBLAS handle and its first GEMM 66 more, 593 in all.
pub const DEFAULT_OVERHEAD: u64 = 600 << 20;

/// Largest context, batch and sequence count accepted (2^32 tokens, 2^24, 2^16).
pub const MAX_CTX: u64 = 1 << 32;
pub const MAX_BATCH: u64 = 1 << 24;
pub const MAX_SEQ: u64 = 1 << 16;

/// What to estimate for.
#[derive(Debug, Clone)]
pub struct Params {
    pub n_ctx: u64,
    pub n_batch: u64,
    pub n_ubatch: u64,
    pub n_seq: u64,
    pub type_k: GgmlType,
    pub type_v: GgmlType,
    pub flash_attn: bool,
    /// llama.cpp `--swa-full` (sliding-window layers keep every cell); off, as llama.cpp's default.
    pub swa_full: bool,
    /// llama.cpp `--kv-unified` (one KV stream for every sequence); off, as llama.cpp's default.
    pub kv_unified: bool,
    /// Layers on the GPUs (llama.cpp `-ngl`); more than n_layer also puts the output there.
    pub n_gpu_layers: u32,
    /// One fraction per GPU (`--tensor-split`); its length is the number of GPUs.
    pub tensor_split: Vec<f64>,
    /// Bytes added to each GPU.
    pub overhead: u64,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            n_ctx: 4096,
            n_batch: 2048,
            n_ubatch: 512,
            n_seq: 1,
            type_k: GgmlType::F16,
            type_v: GgmlType::F16,
            flash_attn: false,
            swa_full: false,
            kv_unified: false,
            n_gpu_layers: 999,
            tensor_split: vec![1.0],
            overhead: DEFAULT_OVERHEAD,
        }
    }
}

/// One device's share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEstimate {
    /// `CPU`, `GPU0`, `GPU1`, ...
    pub name: String,
    pub weights_bytes: u64,
    pub kv_bytes: u64,
    pub compute_bytes: u64,
    pub overhead_bytes: u64,
    pub total_bytes: u64,
}

/// The estimate for one set of [`Params`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    pub n_ctx: u64,
    pub type_k: GgmlType,
    pub type_v: GgmlType,
    pub flash_attn: bool,
    /// `-ngl` as given, capped at n_layer + 1.
    pub n_gpu_layers: u32,
    /// The KV cache's cells and per-layer bytes (with the `swa_full` and `kv_unified` assumed).
    pub kv: KvLayout,
    pub swa_full: bool,
    pub kv_unified: bool,
    /// The model's sliding window (0: none).
    pub n_swa: u64,
    pub devices: Vec<DeviceEstimate>,
}

impl Estimate {
    fn sum(&self, f: impl Fn(&DeviceEstimate) -> u64) -> u64 {
        self.devices.iter().map(f).sum()
    }
    pub fn weights_bytes(&self) -> u64 {
        self.sum(|d| d.weights_bytes)
    }
    pub fn kv_bytes(&self) -> u64 {
        self.sum(|d| d.kv_bytes)
    }
    pub fn compute_bytes(&self) -> u64 {
        self.sum(|d| d.compute_bytes)
    }
    pub fn overhead_bytes(&self) -> u64 {
        self.sum(|d| d.overhead_bytes)
    }
    pub fn total_bytes(&self) -> u64 {
        self.sum(|d| d.total_bytes)
    }
    /// The GPUs' shares (all but the CPU).
    pub fn gpus(&self) -> &[DeviceEstimate] {
        &self.devices[1..]
    }
}

/// Estimates memory per device (index 0 the CPU, then one per `tensor_split` entry).
pub fn estimate(m: &Model, p: &Params) -> Result<Estimate, String> {
    if p.n_ctx == 0 || p.n_ubatch == 0 || p.n_batch == 0 || p.n_seq == 0 {
        return Err("n_ctx, n_batch, n_ubatch and n_seq must be at least 1".into());
    }
    // Bounds far above any real run keep every product below 2^64.
    if p.n_ctx > MAX_CTX || p.n_ubatch > MAX_BATCH || p.n_batch > MAX_BATCH || p.n_seq > MAX_SEQ {
        return Err(format!(
            "n_ctx must be at most {MAX_CTX}, n_batch and n_ubatch at most {MAX_BATCH}, \
             n_seq at most {MAX_SEQ}"
        ));
    }
    if p.tensor_split.iter().any(|s| !s.is_finite() || *s < 0.0) {
        return Err("tensor split fractions must be finite and non-negative".into());
    }
    let h = &m.hparams;
    // llama.cpp caps the batch at the context (as given, before padding), the micro-batch at the
    // batch: a 256-token context reserves for 256-token micro-batches.
    let n_ubatch = p.n_ubatch.min(p.n_batch).min(p.n_ctx);
    let kvp = KvParams {
        n_ctx: p.n_ctx,
        n_ubatch,
        n_seq: p.n_seq,
        type_k: p.type_k,
        type_v: p.type_v,
        flash_attn: p.flash_attn,
        swa_full: p.swa_full,
        kv_unified: p.kv_unified,
    };
    let layout = kv_layout(h, &kvp)?;
    let ngl = p.n_gpu_layers.min(h.n_layer.saturating_add(1));
    let slots = slot_devices(h.n_layer, ngl, &p.tensor_split);
    let weights = weights_per_device(m, ngl, &p.tensor_split);
    let n_dev = p.tensor_split.len() + 1;
    let mut kv = vec![0u64; n_dev];
    for (il, l) in layout.layers.iter().enumerate() {
        kv[slots[il]] = kv[slots[il]].saturating_add(l.bytes());
    }
    let shape = compute_shape(m, p, n_ubatch, &layout);
    let out_dev = slots[h.n_layer as usize];
    let devices = (0..n_dev)
        .map(|d| {
            let on_d = |il: &usize| slots[*il] == d;
            let first = (0..h.n_layer as usize).find(on_d).unwrap_or(0);
            let end = (0..h.n_layer as usize).rfind(on_d).map_or(0, |l| l + 1);
            let (output, gpu) = (d == out_dev, d != 0);
            let compute = if d == 0 && first >= end && !output {
                compute::host_inputs_bytes(&shape)
            } else {
                compute::device_bytes(&shape, first, end, output, gpu)
            };
            let overhead = if d == 0 { 0 } else { p.overhead };
            DeviceEstimate {
                name: if d == 0 {
                    "CPU".into()
                } else {
                    format!("GPU{}", d - 1)
                },
                weights_bytes: weights[d],
                kv_bytes: kv[d],
                compute_bytes: compute,
                overhead_bytes: overhead,
                total_bytes: weights[d]
                    .saturating_add(kv[d])
                    .saturating_add(compute)
                    .saturating_add(overhead),
            }
        })
        .collect();
    Ok(Estimate {
        n_ctx: layout.n_ctx,
        type_k: p.type_k,
        type_v: p.type_v,
        flash_attn: p.flash_attn,
        n_gpu_layers: ngl,
        kv: layout,
        swa_full: p.swa_full,
        kv_unified: p.kv_unified,
        n_swa: h.n_swa,
        devices,
    })
}

/// The sizes of the graph llama.cpp reserves (`compute::graph`).
fn compute_shape(m: &Model, p: &Params, n_ubatch: u64, kv: &KvLayout) -> Shape {
    let h = &m.hparams;
    let quantized_rot = |t: GgmlType, hd: u64| t.is_quantized() && hd > 0 && hd % 64 == 0;
    Shape {
        flavor: Flavor::of(&h.arch),
        n_ubatch,
        n_embd: h.n_embd,
        n_head: m.n_head.max(1),
        head_dim_k: h.head_dim_k,
        head_dim_v: h.head_dim_v,
        n_ff: m.n_ff,
        n_vocab: m.n_vocab,
        layers: kv
            .layers
            .iter()
            .enumerate()
            .map(|(il, l)| Layer {
                n_kv: if l.swa { kv.cells_swa } else { kv.cells_full },
                swa: l.swa,
                n_head_kv: h.n_head_kv.get(il).copied().unwrap_or(0),
            })
            .collect(),
        flash_attn: p.flash_attn,
        k_rot: quantized_rot(p.type_k, h.head_dim_k),
        v_rot: quantized_rot(p.type_v, h.head_dim_v),
        k_cache: cache_type(p.type_k),
        v_cache: cache_type(p.type_v),
        v_is_k_view: h.kv_lora_rank > 0,
    }
}

fn cache_type(t: GgmlType) -> CacheType {
    if t == GgmlType::F16 {
        CacheType::F16
    } else if t == GgmlType::F32 {
        CacheType::F32
    } else {
        CacheType::Converted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::presets::find;

    const MIB: u64 = 1 << 20;

    fn llama7b() -> Model {
        find("llama-7b").unwrap().model(GgmlType::F16).unwrap()
    }

    #[test]
    fn all_on_one_gpu() {
        let m = llama7b();
        let e = estimate(&m, &Params::default()).unwrap();
        assert_eq!(e.devices.len(), 2);
        let (cpu, gpu) = (&e.devices[0], &e.devices[1]);
        // Token embeddings stay on the CPU: 32000 x 4096 f16.
        assert_eq!(cpu.weights_bytes, 32000 * 4096 * 2);
        assert_eq!(gpu.weights_bytes, m.total_bytes() - cpu.weights_bytes);
        assert_eq!(gpu.kv_bytes, 2 << 30);
        assert_eq!(cpu.kv_bytes, 0);
        // Layer 0's KQ (512 x 4096 x 32 f32 = 256 MiB) above the inputs (the f32 mask 8 MiB,
        // V's cache indices 512 x 4096 i64 = 16 MiB, 10 KiB of token ids, positions, K indices
        // and output ids), the residual, and a hole of the attention norm and the un-roped Q
        // (8 MiB each) that it does not fit in, plus the roped Q: 312 MiB + 10 KiB.
        assert_eq!(gpu.compute_bytes, 312 * MIB + 10 * 1024);
        // The host: the same inputs plus the embeddings input and their get_rows (8 MiB each).
        assert_eq!(cpu.compute_bytes, 40 * MIB + 10 * 1024);
        assert_eq!(gpu.overhead_bytes, DEFAULT_OVERHEAD);
        assert_eq!(
            e.total_bytes(),
            e.weights_bytes() + e.kv_bytes() + e.compute_bytes() + e.overhead_bytes()
        );
        // Flash attention drops the KQ matrix: layer 0's FFN (gate, up, swiglu: 3 x 512 x 11008
        // f32) is the peak, above the f16 mask, the residual and two 8 MiB holes.
        let fa = estimate(
            &m,
            &Params {
                flash_attn: true,
                ..Params::default()
            },
        )
        .unwrap();
        let ffn = 4 * 3 * 512 * 11008;
        assert_eq!(
            fa.devices[1].compute_bytes,
            4 * MIB + 3 * 8 * MIB + ffn + 14 * 1024
        );
    }

    #[test]
    fn a_short_context_caps_the_micro_batch() {
        // llama.cpp: n_batch = min(n_ctx, 2048), n_ubatch = min(n_batch, 512) = 256 here; layer
        // 0's FFN (3 x 256 x 11008 f32) is the peak (512 would double it), above the inputs
        // (V's indices 256 x 4096 i64 = 8 MiB, the f32 mask 256 KiB, 5 KiB of ids), the
        // residual and two holes of one hidden state (4 MiB) each.
        let e = estimate(
            &llama7b(),
            &Params {
                n_ctx: 256,
                ..Params::default()
            },
        )
        .unwrap();
        let inputs = 8 * MIB + 256 * 1024 + 5 * 1024;
        assert_eq!(
            e.devices[1].compute_bytes,
            inputs + 3 * 4 * MIB + 4 * 3 * 256 * 11008
        );
    }

    #[test]
    fn partial_offload_and_two_gpus() {
        let m = llama7b();
        let layer = m
            .weights
            .iter()
            .filter(|w| w.name.starts_with("blk.0."))
            .map(|w| w.bytes)
            .sum::<u64>();
        let e = estimate(
            &m,
            &Params {
                n_gpu_layers: 10,
                ..Params::default()
            },
        )
        .unwrap();
        assert_eq!(e.devices[1].weights_bytes, 10 * layer);
        assert_eq!(e.devices[1].kv_bytes, (2 << 30) / 32 * 10);
        assert_eq!(e.devices[0].kv_bytes, (2 << 30) / 32 * 22);
        let two = Params {
            tensor_split: vec![1.0, 1.0],
            ..Params::default()
        };
        let e = estimate(&m, &two).unwrap();
        assert_eq!(e.devices.len(), 3);
        // 33 slots: 17 (layers 0-16) on GPU0; layers 17-31 and the output on GPU1.
        assert_eq!(e.devices[1].weights_bytes, 17 * layer);
        assert_eq!(e.devices[1].kv_bytes, (2 << 30) / 32 * 17);
        assert_eq!(e.devices[2].kv_bytes, (2 << 30) / 32 * 15);
        let cpu_only = estimate(
            &m,
            &Params {
                n_gpu_layers: 0,
                ..Params::default()
            },
        )
        .unwrap();
        assert_eq!(cpu_only.devices[1].total_bytes, DEFAULT_OVERHEAD);
        assert!(estimate(
            &m,
            &Params {
                n_ctx: 0,
                ..Params::default()
            }
        )
        .is_err());
        assert!(estimate(
            &m,
            &Params {
                tensor_split: vec![f64::NAN],
                ..Params::default()
            }
        )
        .is_err());
    }
}
