//! The memory estimate's `hbm_*` entry points: estimate a llama.cpp run from a model file or a
//! preset, and plan the settings that fit given free memory. Plain structs, each with a `size`
//! field the caller sets to `sizeof` the struct, so fields can be added without breaking callers.

use super::guard::ffi_guard;
use super::status::HbmStatus;
use crate::estimate::budget::{self, Estimate, Params, DEFAULT_OVERHEAD};
use crate::estimate::ggml_type::GgmlType;
use crate::estimate::plan::{self, Ctx};
use crate::estimate::presets;
use crate::estimate::weights::{self, Model};
use std::ffi::{c_char, CStr};
use std::path::Path;

/// Most GPUs an estimate describes.
pub const HBM_ESTIMATE_MAX_GPUS: usize = 16;
/// Entries of the `devices` array of `HbmEstimate`: the CPU and `HBM_ESTIMATE_MAX_GPUS` GPUs. A literal, not
/// `HBM_ESTIMATE_MAX_GPUS + 1`: the header generator cannot size an array by an expression
/// (it made the struct opaque, and C could not embed it).
pub const HBM_ESTIMATE_MAX_DEVICES: usize = 17;
const _: () = assert!(HBM_ESTIMATE_MAX_DEVICES == HBM_ESTIMATE_MAX_GPUS + 1);

/// What to estimate for. Fill it with `hbm_estimate_params_default`, then change fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HbmEstimateParams {
    /// `sizeof(HbmEstimateParams)`, set by the caller.
    pub size: usize,
    /// Context length (padded to 256 as llama.cpp pads it), logical batch, micro-batch,
    /// parallel sequences; each at least 1.
    pub n_ctx: u64,
    pub n_batch: u64,
    pub n_ubatch: u64,
    pub n_seq: u64,
    /// Cache types as `HBM_TYPE_*` (ggml's numbering): F32, F16, BF16, Q8_0, Q4_0.
    pub type_k: i32,
    pub type_v: i32,
    /// Flash attention: 0 off, 1 on. A quantized V cache needs it.
    pub flash_attn: i32,
    /// Layers on the GPUs (llama.cpp `-ngl`); more than the layer count also offloads the output.
    pub n_gpu_layers: u32,
    /// GPUs (1 to `HBM_ESTIMATE_MAX_GPUS`) and their split fractions (`--tensor-split`; the
    /// first `n_gpus` entries are read; all zero means equal shares).
    pub n_gpus: u32,
    pub tensor_split: [f32; HBM_ESTIMATE_MAX_GPUS],
    /// Bytes added to each GPU for the CUDA context and workspaces.
    pub overhead_bytes: u64,
    /// llama.cpp `--swa-full`: 1 gives sliding-window layers a full-size cache; 0 (the default,
    /// as llama.cpp's) keeps only the window plus a micro-batch of cells.
    pub swa_full: i32,
    /// llama.cpp `--kv-unified`: 1 shares one KV stream among all sequences; 0 (the default, as
    /// llama.cpp's) gives each sequence its own stream of n_ctx / n_seq cells.
    pub kv_unified: i32,
}

/// One device's share of an estimate.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HbmDeviceEstimate {
    pub weights_bytes: u64,
    pub kv_bytes: u64,
    pub compute_bytes: u64,
    pub overhead_bytes: u64,
    pub total_bytes: u64,
}

/// An estimate: totals, and per device (`devices[0]` the CPU, `devices[1 + k]` GPU k).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HbmEstimate {
    /// `sizeof(HbmEstimate)`, set by the caller.
    pub size: usize,
    /// Context after padding.
    pub n_ctx: u64,
    pub type_k: i32,
    pub type_v: i32,
    pub flash_attn: i32,
    pub n_gpu_layers: u32,
    pub total: HbmDeviceEstimate,
    /// Entries used in `devices`: 1 + the number of GPUs.
    pub n_devices: u32,
    pub devices: [HbmDeviceEstimate; HBM_ESTIMATE_MAX_DEVICES],
}

/// The rung of the degradation ladder a plan chose (`HBM_FIT_RUNG_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HbmFitRung {
    /// Everything on the GPUs, F16 KV cache.
    GpuF16 = 0,
    /// Everything on the GPUs, Q8_0 KV cache, flash attention.
    GpuQ80 = 1,
    /// Everything on the GPUs, Q4_0 KV cache, flash attention.
    GpuQ40 = 2,
    /// The most layers that fit on the GPUs, Q4_0 KV cache, flash attention.
    Partial = 3,
    /// No layers on the GPUs.
    Cpu = 4,
}

/// A plan: the rung, the estimate that realises it, the split and how many rungs were rejected.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HbmFitPlan {
    /// `sizeof(HbmFitPlan)`, set by the caller.
    pub size: usize,
    /// An `HbmFitRung` value (a plain int: the caller's struct may hold anything before the call).
    pub rung: i32,
    pub n_rejected: u32,
    pub tensor_split: [f32; HBM_ESTIMATE_MAX_GPUS],
    pub estimate: HbmEstimate,
}

fn type_ok(id: i32) -> Option<GgmlType> {
    let t = GgmlType::from_id(u32::try_from(id).ok()?)?;
    t.is_kv_cache_type().then_some(t)
}

fn params_from(p: &HbmEstimateParams) -> Option<Params> {
    let n = p.n_gpus as usize;
    if p.size < std::mem::size_of::<HbmEstimateParams>() || n == 0 || n > HBM_ESTIMATE_MAX_GPUS {
        return None;
    }
    let split: Vec<f64> = p.tensor_split[..n].iter().map(|&f| f as f64).collect();
    let flags = [p.flash_attn, p.swa_full, p.kv_unified];
    if split.iter().any(|f| !f.is_finite() || *f < 0.0)
        || flags.iter().any(|f| !(0..=1).contains(f))
    {
        return None;
    }
    Some(Params {
        n_ctx: p.n_ctx,
        n_batch: p.n_batch,
        n_ubatch: p.n_ubatch,
        n_seq: p.n_seq,
        type_k: type_ok(p.type_k)?,
        type_v: type_ok(p.type_v)?,
        flash_attn: p.flash_attn == 1,
        swa_full: p.swa_full == 1,
        kv_unified: p.kv_unified == 1,
        n_gpu_layers: p.n_gpu_layers,
        tensor_split: split,
        overhead: p.overhead_bytes,
    })
}

fn fill(e: &Estimate, out: &mut HbmEstimate) {
    let dev = |d: &budget::DeviceEstimate| HbmDeviceEstimate {
        weights_bytes: d.weights_bytes,
        kv_bytes: d.kv_bytes,
        compute_bytes: d.compute_bytes,
        overhead_bytes: d.overhead_bytes,
        total_bytes: d.total_bytes,
    };
    out.n_ctx = e.n_ctx;
    out.type_k = e.type_k.id as i32;
    out.type_v = e.type_v.id as i32;
    out.flash_attn = e.flash_attn as i32;
    out.n_gpu_layers = e.n_gpu_layers;
    out.total = HbmDeviceEstimate {
        weights_bytes: e.weights_bytes(),
        kv_bytes: e.kv_bytes(),
        compute_bytes: e.compute_bytes(),
        overhead_bytes: e.overhead_bytes(),
        total_bytes: e.total_bytes(),
    };
    out.n_devices = e.devices.len() as u32;
    out.devices = [HbmDeviceEstimate::default(); HBM_ESTIMATE_MAX_DEVICES];
    for (o, d) in out.devices.iter_mut().zip(&e.devices) {
        *o = dev(d);
    }
}

/// The model named by a path or a preset name; the status says why there is none.
///
/// # Safety
/// `text` must be NULL or a NUL-terminated string.
unsafe fn model(text: *const c_char, preset: bool) -> Result<Model, HbmStatus> {
    if text.is_null() {
        return Err(HbmStatus::NullParameter);
    }
    // SAFETY: the caller promises a NUL-terminated string; NULL was refused above.
    let s = unsafe { CStr::from_ptr(text) }
        .to_str()
        .map_err(|_| HbmStatus::InvalidValue)?;
    if preset {
        let p = presets::find(s).ok_or(HbmStatus::InvalidValue)?;
        return p.model(GgmlType::F16).map_err(|_| HbmStatus::InvalidValue);
    }
    let path = Path::new(s);
    if std::fs::metadata(path).is_err() {
        return Err(HbmStatus::IoError);
    }
    weights::open(path).map_err(|_| HbmStatus::InvalidValue)
}

/// Fills `*out_params` with the defaults: n_ctx 4096, n_batch 2048, n_ubatch 512, one sequence,
/// F16 K and V, flash attention off, every layer on one GPU, 600 MiB overhead.
///
/// Returns `HBM_STATUS_NULL_PARAMETER` if `out_params` is NULL, `HBM_STATUS_INVALID_VALUE` if
/// `out_params->size` is smaller than this version's `sizeof(HbmEstimateParams)`.
///
/// # Safety
/// `out_params` must be NULL or point to a writable `HbmEstimateParams` whose `size` is set.
#[no_mangle]
pub unsafe extern "C" fn hbm_estimate_params_default(
    out_params: *mut HbmEstimateParams,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if out_params.is_null() {
            return HbmStatus::NullParameter;
        }
        // SAFETY: not NULL; the caller promises a writable struct with its size set.
        let out = unsafe { &mut *out_params };
        if out.size < std::mem::size_of::<HbmEstimateParams>() {
            return HbmStatus::InvalidValue;
        }
        let d = Params::default();
        let mut split = [0.0f32; HBM_ESTIMATE_MAX_GPUS];
        split[0] = 1.0;
        *out = HbmEstimateParams {
            size: out.size,
            n_ctx: d.n_ctx,
            n_batch: d.n_batch,
            n_ubatch: d.n_ubatch,
            n_seq: d.n_seq,
            type_k: GgmlType::F16.id as i32,
            type_v: GgmlType::F16.id as i32,
            flash_attn: 0,
            n_gpu_layers: d.n_gpu_layers,
            n_gpus: 1,
            tensor_split: split,
            overhead_bytes: DEFAULT_OVERHEAD,
            swa_full: 0,
            kv_unified: 0,
        };
        HbmStatus::Ok
    })
}

/// Estimates the memory a llama.cpp run of a model needs, per component and per device, from
/// the model file's header alone (`.gguf`, `.safetensors` with `config.json` beside it, a
/// `model.safetensors.index.json`, or a folder), or from a built-in preset.
///
/// - `model`: the path, or with `is_preset` 1 a preset name (`llama-7b`, `llama-3.1-8b`, ...).
/// - `params`: from `hbm_estimate_params_default`, possibly changed; read only.
/// - `out`: written on success; its `size` must be set by the caller.
///
/// Returns `HBM_STATUS_OK`; `HBM_STATUS_NULL_PARAMETER` for a NULL argument;
/// `HBM_STATUS_IO_ERROR` if the file does not exist; `HBM_STATUS_INVALID_VALUE` for a malformed
/// file, an unknown preset, a bad parameter (a size field too small, an unsupported cache type,
/// a quantized V cache without flash attention, more than `HBM_ESTIMATE_MAX_GPUS` GPUs). Reads
/// only the header; allocates no device memory. `out` is untouched on an error.
///
/// # Safety
/// `model` must be a NUL-terminated string; `params` and `out` must point to valid structs.
#[no_mangle]
pub unsafe extern "C" fn hbm_estimate_model(
    model: *const c_char,
    is_preset: i32,
    params: *const HbmEstimateParams,
    out: *mut HbmEstimate,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if model.is_null() || params.is_null() || out.is_null() {
            return HbmStatus::NullParameter;
        }
        // SAFETY: not NULL; the caller promises valid structs.
        let (p, out) = unsafe { (&*params, &mut *out) };
        if out.size < std::mem::size_of::<HbmEstimate>() {
            return HbmStatus::InvalidValue;
        }
        let Some(p) = params_from(p) else {
            return HbmStatus::InvalidValue;
        };
        // SAFETY: `model` is a NUL-terminated string (caller's promise), not NULL.
        let m = match unsafe { self::model(model, is_preset != 0) } {
            Ok(m) => m,
            Err(s) => return s,
        };
        match budget::estimate(&m, &p) {
            Ok(e) => {
                fill(&e, out);
                HbmStatus::Ok
            }
            Err(_) => HbmStatus::InvalidValue,
        }
    })
}

/// Plans the llama.cpp settings that fit: walks F16 KV, Q8_0 KV, Q4_0 KV (both with flash
/// attention), partial offload and CPU only, and takes the first rung that fits every GPU.
///
/// - `model`, `is_preset`: as for `hbm_estimate_model`.
/// - `params`: batch sizes, sequences and overhead are read from it (the ladder sets the rest);
///   its `n_ctx` is the context to plan for, 0 for the largest that fits.
/// - `free_bytes`: `n_gpus` entries, each GPU's free memory; `margin_bytes` kept free on each.
/// - `out`: written on success; its `size` and `estimate.size` must be set by the caller.
///
/// Returns as `hbm_estimate_model` does; `n_gpus` 0 or above `HBM_ESTIMATE_MAX_GPUS` is
/// `HBM_STATUS_INVALID_VALUE`.
///
/// # Safety
/// `model` must be a NUL-terminated string, `params` and `out` valid structs, and `free_bytes`
/// valid for reading `n_gpus` values.
#[no_mangle]
pub unsafe extern "C" fn hbm_estimate_fit(
    model: *const c_char,
    is_preset: i32,
    params: *const HbmEstimateParams,
    free_bytes: *const u64,
    n_gpus: u32,
    margin_bytes: u64,
    out: *mut HbmFitPlan,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if model.is_null() || params.is_null() || free_bytes.is_null() || out.is_null() {
            return HbmStatus::NullParameter;
        }
        let n = n_gpus as usize;
        if n == 0 || n > HBM_ESTIMATE_MAX_GPUS || free_bytes as usize % 8 != 0 {
            return HbmStatus::InvalidValue;
        }
        // SAFETY: not NULL, aligned, and the caller promises n_gpus readable values.
        let free = unsafe { std::slice::from_raw_parts(free_bytes, n) }.to_vec();
        // SAFETY: not NULL; the caller promises valid structs.
        let (p, out) = unsafe { (&*params, &mut *out) };
        if out.size < std::mem::size_of::<HbmFitPlan>()
            || out.estimate.size < std::mem::size_of::<HbmEstimate>()
        {
            return HbmStatus::InvalidValue;
        }
        let ctx = if p.n_ctx == 0 {
            Ctx::Auto
        } else {
            Ctx::Fixed(p.n_ctx)
        };
        let Some(base) = params_from(&HbmEstimateParams {
            n_ctx: p.n_ctx.max(1),
            ..*p
        }) else {
            return HbmStatus::InvalidValue;
        };
        // SAFETY: `model` is a NUL-terminated string (caller's promise), not NULL.
        let m = match unsafe { self::model(model, is_preset != 0) } {
            Ok(m) => m,
            Err(s) => return s,
        };
        let plan = match plan::fit(&m, &base, &free, margin_bytes, ctx) {
            Ok(plan) => plan,
            Err(_) => return HbmStatus::InvalidValue,
        };
        out.rung = (match plan.rung {
            "gpu-f16" => HbmFitRung::GpuF16,
            "gpu-q8_0" => HbmFitRung::GpuQ80,
            "gpu-q4_0" => HbmFitRung::GpuQ40,
            "partial" => HbmFitRung::Partial,
            _ => HbmFitRung::Cpu,
        }) as i32;
        out.n_rejected = plan.rejected.len() as u32;
        out.tensor_split = [0.0; HBM_ESTIMATE_MAX_GPUS];
        for (o, f) in out.tensor_split.iter_mut().zip(&plan.tensor_split) {
            *o = *f as f32;
        }
        fill(&plan.estimate, &mut out.estimate);
        HbmStatus::Ok
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::mem::{size_of, MaybeUninit};

    fn defaults() -> HbmEstimateParams {
        // SAFETY: all-zero bytes are a valid HbmEstimateParams (plain numbers).
        let mut p: HbmEstimateParams = unsafe { MaybeUninit::zeroed().assume_init() };
        p.size = size_of::<HbmEstimateParams>();
        // SAFETY: a valid, writable struct.
        assert_eq!(
            unsafe { hbm_estimate_params_default(&mut p) },
            HbmStatus::Ok
        );
        p
    }

    fn blank_estimate() -> HbmEstimate {
        HbmEstimate {
            size: size_of::<HbmEstimate>(),
            n_ctx: 0,
            type_k: 0,
            type_v: 0,
            flash_attn: 0,
            n_gpu_layers: 0,
            total: HbmDeviceEstimate::default(),
            n_devices: 0,
            devices: [HbmDeviceEstimate::default(); HBM_ESTIMATE_MAX_GPUS + 1],
        }
    }

    #[test]
    fn estimate_a_preset_and_refuse_bad_input() {
        let p = defaults();
        let name = CString::new("llama-7b").unwrap();
        let mut e = blank_estimate();
        // SAFETY: valid string and structs throughout.
        unsafe {
            assert_eq!(
                hbm_estimate_model(name.as_ptr(), 1, &p, &mut e),
                HbmStatus::Ok
            );
            assert_eq!(e.n_ctx, 4096);
            assert_eq!(e.total.kv_bytes, 2 << 30);
            assert_eq!(e.n_devices, 2);
            assert_eq!(e.devices[0].weights_bytes, 32000 * 4096 * 2);
            assert_eq!(
                hbm_estimate_model(std::ptr::null(), 1, &p, &mut e),
                HbmStatus::NullParameter
            );
            assert_eq!(
                hbm_estimate_model(name.as_ptr(), 1, std::ptr::null(), &mut e),
                HbmStatus::NullParameter
            );
            assert_eq!(
                hbm_estimate_model(name.as_ptr(), 1, &p, std::ptr::null_mut()),
                HbmStatus::NullParameter
            );
            let bad = CString::new("no-such-preset").unwrap();
            assert_eq!(
                hbm_estimate_model(bad.as_ptr(), 1, &p, &mut e),
                HbmStatus::InvalidValue
            );
            let missing = CString::new("/nonexistent/model.gguf").unwrap();
            assert_eq!(
                hbm_estimate_model(missing.as_ptr(), 0, &p, &mut e),
                HbmStatus::IoError
            );
            let q8v = HbmEstimateParams { type_v: 8, ..p };
            assert_eq!(
                hbm_estimate_model(name.as_ptr(), 1, &q8v, &mut e),
                HbmStatus::InvalidValue
            );
            let q5 = HbmEstimateParams { type_k: 6, ..p };
            assert_eq!(
                hbm_estimate_model(name.as_ptr(), 1, &q5, &mut e),
                HbmStatus::InvalidValue
            );
            // Gemma-2-9B: 21 of 42 layers slide (window 4096); a cell of a layer is 8 KV heads
            // of 256, K and V, f16. The SWA layers keep pad(4096 + 512) cells unless swa_full.
            let gemma = CString::new("gemma-2-9b").unwrap();
            let long = HbmEstimateParams { n_ctx: 32768, ..p };
            let cell = 2 * 8 * 256 * 2;
            assert_eq!(
                hbm_estimate_model(gemma.as_ptr(), 1, &long, &mut e),
                HbmStatus::Ok
            );
            assert_eq!(e.total.kv_bytes, 21 * cell * 32768 + 21 * cell * 4608);
            let full = HbmEstimateParams {
                swa_full: 1,
                ..long
            };
            assert_eq!(
                hbm_estimate_model(gemma.as_ptr(), 1, &full, &mut e),
                HbmStatus::Ok
            );
            assert_eq!(e.total.kv_bytes, 42 * cell * 32768);
            for bad in [
                HbmEstimateParams { swa_full: 2, ..p },
                HbmEstimateParams {
                    kv_unified: -1,
                    ..p
                },
            ] {
                assert_eq!(
                    hbm_estimate_model(gemma.as_ptr(), 1, &bad, &mut e),
                    HbmStatus::InvalidValue
                );
            }
            let small = HbmEstimateParams { size: 8, ..p };
            assert_eq!(
                hbm_estimate_model(name.as_ptr(), 1, &small, &mut e),
                HbmStatus::InvalidValue
            );
            let many = HbmEstimateParams { n_gpus: 17, ..p };
            assert_eq!(
                hbm_estimate_model(name.as_ptr(), 1, &many, &mut e),
                HbmStatus::InvalidValue
            );
            assert_eq!(
                hbm_estimate_params_default(std::ptr::null_mut()),
                HbmStatus::NullParameter
            );
        }
    }

    #[test]
    fn fit_a_preset() {
        let p = defaults();
        let name = CString::new("llama-7b").unwrap();
        let mut plan = HbmFitPlan {
            size: size_of::<HbmFitPlan>(),
            rung: -1,
            n_rejected: 0,
            tensor_split: [0.0; HBM_ESTIMATE_MAX_GPUS],
            estimate: blank_estimate(),
        };
        let free = [(15u64 << 30) + (300 << 20)];
        // SAFETY: valid string, structs and a one-element array.
        unsafe {
            let s = hbm_estimate_fit(name.as_ptr(), 1, &p, free.as_ptr(), 1, 1 << 30, &mut plan);
            assert_eq!(s, HbmStatus::Ok);
            assert_eq!((plan.rung, plan.n_rejected), (HbmFitRung::GpuQ80 as i32, 1));
            assert_eq!(plan.estimate.type_k, 8);
            assert_eq!(plan.estimate.flash_attn, 1);
            assert_eq!(plan.tensor_split[0], 1.0);
            let s = hbm_estimate_fit(name.as_ptr(), 1, &p, free.as_ptr(), 0, 0, &mut plan);
            assert_eq!(s, HbmStatus::InvalidValue);
            let s = hbm_estimate_fit(name.as_ptr(), 1, &p, std::ptr::null(), 1, 0, &mut plan);
            assert_eq!(s, HbmStatus::NullParameter);
        }
    }
}
