//! The fit planner: walks a degradation ladder until the estimate fits the GPUs' free memory.
//!
//! Rungs, in order (each uses less GPU memory than the one before):
//! 1. `gpu-f16`: everything on the GPUs, F16 KV cache;
//! 2. `gpu-q8_0`: Q8_0 KV cache with flash attention (llama.cpp needs it for a quantized V);
//! 3. `gpu-q4_0`: Q4_0 KV cache with flash attention;
//! 4. `partial`: Q4_0 KV, the most layers that fit on the GPUs, the rest on the CPU;
//! 5. `cpu`: no layers on the GPUs, F16 KV.
//!
//! A device fits when its total plus the margin is at most its free memory. Several GPUs share
//! the layers in proportion to their free memory (llama.cpp's `--tensor-split`). With
//! `--ctx auto` a GPU rung is accepted when at least `min(training context, 4096)` tokens fit,
//! and then gets the largest context that fits (a multiple of 256, at most the training context).

use super::budget::{estimate, Estimate, Params};
use super::ggml_type::GgmlType;
use super::kv::CTX_PAD;
use super::weights::Model;

/// The context to plan for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ctx {
    Fixed(u64),
    Auto,
}

/// A rejected rung and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub rung: &'static str,
    pub reason: String,
}

/// The chosen rung with its estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub rung: &'static str,
    pub estimate: Estimate,
    pub tensor_split: Vec<f64>,
    pub rejected: Vec<Rejected>,
}

impl Plan {
    /// The llama.cpp arguments that realise the plan.
    pub fn llama_cpp_args(&self) -> Vec<String> {
        let e = &self.estimate;
        let mut a = vec![
            "-ngl".to_string(),
            e.n_gpu_layers.to_string(),
            "-c".into(),
            e.n_ctx.to_string(),
        ];
        if self.tensor_split.len() > 1 {
            let ts: Vec<String> = self
                .tensor_split
                .iter()
                .map(|f| format!("{f:.3}"))
                .collect();
            a.extend(["-ts".into(), ts.join(",")]);
        }
        if e.type_k != GgmlType::F16 || e.type_v != GgmlType::F16 {
            a.extend([
                "-ctk".into(),
                e.type_k.name.into(),
                "-ctv".into(),
                e.type_v.name.into(),
            ]);
        }
        a.extend(["-fa".into(), if e.flash_attn { "on" } else { "off" }.into()]);
        a
    }
}

/// Why `e` does not fit `free` with `margin`, naming the first device short and by how much.
fn shortfall(e: &Estimate, free: &[u64], margin: u64) -> Option<String> {
    e.gpus().iter().zip(free).find_map(|(d, &f)| {
        let need = d.total_bytes.saturating_add(margin);
        (need > f).then(|| {
            format!(
                "{} needs {} + {} margin, has {} free: {} short",
                d.name,
                human(d.total_bytes),
                human(margin),
                human(f),
                human(need - f)
            )
        })
    })
}

pub fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let (mut v, mut i) = (b as f64, 0);
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

/// Plans for `free` bytes per GPU, starting from `base` (batch sizes, overhead, ...).
pub fn fit(m: &Model, base: &Params, free: &[u64], margin: u64, ctx: Ctx) -> Result<Plan, String> {
    if free.is_empty() {
        return Err("fit needs the free memory of at least one GPU".into());
    }
    let total: u64 = free.iter().sum();
    let split: Vec<f64> = free
        .iter()
        .map(|&f| {
            if total == 0 {
                1.0
            } else {
                f as f64 / total as f64
            }
        })
        .collect();
    let n_layer = m.hparams.n_layer;
    let train = if m.hparams.n_ctx_train > 0 {
        m.hparams.n_ctx_train
    } else {
        4096
    };
    let ctx_min = match ctx {
        Ctx::Fixed(n) => n,
        Ctx::Auto => train.min(4096),
    };
    let with = |tk: GgmlType, tv: GgmlType, fa: bool, ngl: u32, n_ctx: u64| Params {
        n_ctx,
        type_k: tk,
        type_v: tv,
        flash_attn: fa,
        n_gpu_layers: ngl,
        tensor_split: split.clone(),
        ..base.clone()
    };
    let fits = |p: &Params| -> Result<(Estimate, Option<String>), String> {
        let e = estimate(m, p)?;
        let s = shortfall(&e, free, margin);
        Ok((e, s))
    };
    let mut rejected = Vec::new();
    let all = n_layer + 1;
    let ladder: [(&'static str, GgmlType, bool); 3] = [
        ("gpu-f16", GgmlType::F16, base.flash_attn),
        ("gpu-q8_0", GgmlType::Q8_0, true),
        ("gpu-q4_0", GgmlType::Q4_0, true),
    ];
    for (rung, t, fa) in ladder {
        let (e, short) = fits(&with(t, t, fa, all, ctx_min))?;
        if let Some(reason) = short {
            rejected.push(Rejected {
                rung,
                reason: format!("at {} tokens: {reason}", e.n_ctx),
            });
            continue;
        }
        let e = if ctx == Ctx::Auto {
            // Largest multiple of 256 in [ctx_min, train] that fits (fitting shrinks with n_ctx).
            let (mut lo, mut hi) = (ctx_min.div_ceil(CTX_PAD), train / CTX_PAD);
            while lo < hi {
                let mid = lo + (hi - lo).div_ceil(2);
                if fits(&with(t, t, fa, all, mid * CTX_PAD))?.1.is_none() {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            fits(&with(t, t, fa, all, (lo * CTX_PAD).max(ctx_min)))?.0
        } else {
            e
        };
        return Ok(Plan {
            rung,
            estimate: e,
            tensor_split: split,
            rejected,
        });
    }
    // Partial offload: the most layers that fit (fitting only shrinks as layers leave).
    let q4 = GgmlType::Q4_0;
    let (mut lo, mut hi) = (0u32, n_layer);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(&with(q4, q4, true, mid, ctx_min))?.1.is_none() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let (e, short) = fits(&with(q4, q4, true, lo, ctx_min))?;
    if lo > 0 && short.is_none() {
        return Ok(Plan {
            rung: "partial",
            estimate: e,
            tensor_split: split,
            rejected,
        });
    }
    let (one, _) = fits(&with(q4, q4, true, 1, ctx_min))?;
    rejected.push(Rejected {
        rung: "partial",
        reason: format!(
            "not even one layer fits: {}",
            shortfall(&one, free, margin)
                .unwrap_or_else(|| "the fixed overhead does not fit".into())
        ),
    });
    let (e, _) = fits(&with(GgmlType::F16, GgmlType::F16, false, 0, ctx_min))?;
    Ok(Plan {
        rung: "cpu",
        estimate: e,
        tensor_split: split,
        rejected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::presets::find;

    const GIB: u64 = 1 << 30;

    fn plan(name: &str, free: &[u64], ctx: Ctx) -> Plan {
        let m = find(name).unwrap().model(GgmlType::F16).unwrap();
        fit(&m, &Params::default(), free, GIB, ctx).unwrap()
    }

    #[test]
    fn every_rung_is_reached_by_a_chosen_budget() {
        // LLaMA-7B F16: ~12.3 GiB on the GPU + 2 GiB KV at 4096 + compute + overhead.
        let p = plan("llama-7b", &[24 * GIB], Ctx::Fixed(4096));
        assert_eq!((p.rung, p.rejected.len()), ("gpu-f16", 0));
        assert_eq!(p.llama_cpp_args().join(" "), "-ngl 33 -c 4096 -fa off");
        let p = plan("llama-7b", &[15 * GIB + 300 * (1 << 20)], Ctx::Fixed(4096));
        assert_eq!(p.rung, "gpu-q8_0");
        assert_eq!(p.rejected[0].rung, "gpu-f16");
        assert!(
            p.rejected[0].reason.contains("GPU0 needs"),
            "{}",
            p.rejected[0].reason
        );
        assert!(p.rejected[0].reason.contains("short"));
        assert_eq!(
            p.llama_cpp_args().join(" "),
            "-ngl 33 -c 4096 -ctk q8_0 -ctv q8_0 -fa on"
        );
        let p = plan("llama-7b", &[14 * GIB + 900 * (1 << 20)], Ctx::Fixed(4096));
        assert_eq!(p.rung, "gpu-q4_0");
        let p = plan("llama-7b", &[8 * GIB], Ctx::Fixed(4096));
        assert_eq!(p.rung, "partial");
        assert_eq!(p.rejected.len(), 3);
        let ngl = p.estimate.n_gpu_layers;
        assert!(ngl > 0 && ngl < 32, "{ngl}");
        // One more layer would not fit.
        let m = find("llama-7b").unwrap().model(GgmlType::F16).unwrap();
        let more = Params {
            n_gpu_layers: ngl + 1,
            type_k: GgmlType::Q4_0,
            type_v: GgmlType::Q4_0,
            flash_attn: true,
            ..Params::default()
        };
        assert!(estimate(&m, &more).unwrap().devices[1].total_bytes + GIB > 8 * GIB);
        let p = plan("llama-7b", &[GIB], Ctx::Fixed(4096));
        assert_eq!(
            (p.rung, p.estimate.n_gpu_layers, p.rejected.len()),
            ("cpu", 0, 4)
        );
        assert!(p.rejected[3].reason.contains("not even one layer"));
    }

    #[test]
    fn ctx_auto_and_two_gpus() {
        let p = plan("llama-3.1-8b", &[24 * GIB], Ctx::Auto);
        assert_eq!(p.rung, "gpu-f16");
        let n = p.estimate.n_ctx;
        assert!(n >= 4096 && n % 256 == 0 && n < 131072, "{n}");
        // 256 more tokens would not fit.
        let m = find("llama-3.1-8b").unwrap().model(GgmlType::F16).unwrap();
        let more = Params {
            n_ctx: n + 256,
            ..Params::default()
        };
        assert!(estimate(&m, &more).unwrap().devices[1].total_bytes + GIB > 24 * GIB);
        let p = plan("llama-70b", &[80 * GIB, 80 * GIB], Ctx::Fixed(4096));
        assert_eq!(p.rung, "gpu-f16");
        assert_eq!(p.tensor_split, vec![0.5, 0.5]);
        assert!(p.llama_cpp_args().join(" ").contains("-ts 0.500,0.500"));
        assert!(fit(&m, &Params::default(), &[], GIB, Ctx::Auto).is_err());
    }
}
