//! `hbmalloc inspect | estimate | fit`: memory answers from a model file's header or a preset.
//! The JSON field names are a contract (docs/estimate.md, README).

use clap::{Args, ValueEnum};
use hbmalloc::estimate::budget::{self, Estimate, Params};
use hbmalloc::estimate::ggml_type::GgmlType;
use hbmalloc::estimate::plan::{self, human, Ctx, Plan};
use hbmalloc::estimate::weights::{self, Model};
use hbmalloc::estimate::{gguf, presets, safetensors};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Which model: a file, or a preset.
#[derive(Args)]
pub struct ModelArgs {
    /// A .gguf file (split parts are found by name), a .safetensors file, a
    /// model.safetensors.index.json, or a folder holding one with its config.json.
    #[arg(value_name = "FILE", conflicts_with = "preset")]
    file: Option<PathBuf>,
    /// A built-in architecture instead of a file (see --list-presets).
    #[arg(long, value_name = "NAME")]
    preset: Option<String>,
    /// Weight type of a preset's matrices (f16, q8_0, q4_K, ...).
    #[arg(long, value_name = "T", default_value = "f16", value_parser = ggml_type)]
    wtype: GgmlType,
    /// List the presets and exit.
    #[arg(long)]
    list_presets: bool,
}

/// The run's shape, as llama.cpp's options name it.
#[derive(Args)]
pub struct RunArgs {
    /// Micro-batch (llama.cpp -ub).
    #[arg(long, value_name = "N", default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    ubatch: u64,
    /// Logical batch (llama.cpp -b).
    #[arg(long, value_name = "N", default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..))]
    batch: u64,
    /// Parallel sequences (llama.cpp -np).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    parallel: u64,
    /// Full-size cache for sliding-window layers (llama.cpp --swa-full); off by default, as in
    /// llama.cpp: a sliding layer keeps its window plus one micro-batch of cells.
    #[arg(long)]
    swa_full: bool,
    /// One KV stream shared by all sequences (llama.cpp --kv-unified); off by default, as in
    /// llama.cpp: each sequence has its own n_ctx / parallel cells.
    #[arg(long)]
    kv_unified: bool,
    /// Per-GPU overhead for the CUDA context and workspaces (measured: 593 MiB on an H200).
    #[arg(long, value_name = "SIZE", default_value = "600MiB", value_parser = size)]
    overhead: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Args)]
pub struct InspectArgs {
    /// A .gguf or .safetensors file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct EstimateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    run: RunArgs,
    /// Context length (padded to 256 as llama.cpp pads it).
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    ctx: u64,
    /// K cache type: f32, f16, bf16, q8_0, q4_0.
    #[arg(long, visible_alias = "cache-type-k", value_name = "T", default_value = "f16", value_parser = cache_type)]
    ctk: GgmlType,
    /// V cache type: f32, f16, bf16, q8_0, q4_0 (quantized needs --fa on).
    #[arg(long, visible_alias = "cache-type-v", value_name = "T", default_value = "f16", value_parser = cache_type)]
    ctv: GgmlType,
    /// Flash attention.
    #[arg(long, value_enum, default_value = "off")]
    fa: OnOff,
    /// Layers on the GPUs (llama.cpp -ngl; more than the layer count also offloads the output).
    #[arg(long, value_name = "N", default_value_t = 999)]
    ngl: u32,
    /// Tensor split over GPUs, e.g. 3,1 (llama.cpp -ts); its length is the GPU count.
    #[arg(long, value_name = "a,b,...", value_delimiter = ',', value_parser = fraction)]
    ts: Vec<f64>,
}

#[derive(Args)]
pub struct FitArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    run: RunArgs,
    /// Free memory per GPU, e.g. 80GiB,24GiB (default: what device 0 reports through the backend).
    #[arg(long, visible_alias = "free", value_name = "SIZE,...", value_delimiter = ',', value_parser = size)]
    mem: Vec<u64>,
    /// Memory kept free on each GPU.
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = size)]
    margin: u64,
    /// Context length, or auto for the largest that fits.
    #[arg(long, value_name = "N|auto", default_value = "4096", value_parser = ctx_arg)]
    ctx: Ctx,
    /// Flash attention on the F16 rung (the quantized rungs always use it).
    #[arg(long, value_enum, default_value = "off")]
    fa: OnOff,
}

fn ggml_type(s: &str) -> Result<GgmlType, String> {
    GgmlType::from_name(s).ok_or_else(|| format!("unknown ggml type '{s}'"))
}

fn cache_type(s: &str) -> Result<GgmlType, String> {
    let t = ggml_type(s)?;
    t.is_kv_cache_type()
        .then_some(t)
        .ok_or_else(|| format!("cache type '{s}' is not one of f32, f16, bf16, q8_0, q4_0"))
}

fn size(s: &str) -> Result<u64, String> {
    hbmalloc::config::parse_size(s)
        .map(|b| b as u64)
        .ok_or_else(|| format!("'{s}' is not a size (like 4096, 512MiB, 24GiB)"))
}

fn fraction(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|f| f.is_finite() && *f >= 0.0)
        .ok_or_else(|| format!("'{s}' is not a non-negative number"))
}

fn ctx_arg(s: &str) -> Result<Ctx, String> {
    if s == "auto" {
        return Ok(Ctx::Auto);
    }
    match s.parse::<u64>() {
        Ok(n) if n > 0 => Ok(Ctx::Fixed(n)),
        _ => Err(format!("'{s}' is not a positive context length or 'auto'")),
    }
}

/// Prints a one-line error and gives exit code 1 (a file or estimate problem, not bad usage).
fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("hbmalloc: {e}");
    ExitCode::FAILURE
}

fn usage(e: &str) -> ExitCode {
    eprintln!("hbmalloc: {e}");
    ExitCode::from(2)
}

fn list_presets() -> ExitCode {
    for p in presets::PRESETS {
        println!(
            "{:<16} {:<10} {:>3} layers  {:>7.2}B parameters  ctx {}",
            p.name,
            p.arch,
            p.n_layer,
            p.parameters() as f64 / 1e9,
            p.n_ctx_train
        );
    }
    ExitCode::SUCCESS
}

/// The model to estimate, or the exit code for why there is none (`None`: presets listed).
fn load(m: &ModelArgs) -> Result<Option<Model>, ExitCode> {
    if m.list_presets {
        return Err(list_presets());
    }
    match (&m.file, &m.preset) {
        (Some(f), None) => weights::open(f).map(Some).map_err(fail),
        (None, Some(p)) => match presets::find(p) {
            Some(p) => p.model(m.wtype).map(Some).map_err(fail),
            None => Err(usage(&format!("unknown preset '{p}' (see --list-presets)"))),
        },
        _ => Err(usage("give a model FILE or --preset NAME (try --help)")),
    }
}

fn device_json(e: &Estimate) -> Value {
    let devices: Vec<Value> = e
        .devices
        .iter()
        .map(|d| {
            json!({
                "name": d.name,
                "weights_bytes": d.weights_bytes,
                "kv_bytes": d.kv_bytes,
                "compute_bytes": d.compute_bytes,
                "overhead_bytes": d.overhead_bytes,
                "total_bytes": d.total_bytes,
            })
        })
        .collect();
    let (full_layers, full_bytes) = e.kv.group(false);
    let (swa_layers, swa_bytes) = e.kv.group(true);
    let kv = json!({
        "swa_full": e.swa_full,
        "kv_unified": e.kv_unified,
        "n_swa": e.n_swa,
        "n_stream": e.kv.n_stream,
        "cells_full": e.kv.cells_full,
        "cells_swa": if swa_layers > 0 { e.kv.cells_swa } else { 0 },
        "full_layers": full_layers,
        "full_bytes": full_bytes,
        "swa_layers": swa_layers,
        "swa_bytes": swa_bytes,
        "layer_bytes": e.kv.layers.iter().map(|l| l.bytes()).collect::<Vec<u64>>(),
    });
    json!({
        "n_ctx": e.n_ctx,
        "swa_full": e.swa_full,
        "kv_unified": e.kv_unified,
        "kv": kv,
        "type_k": e.type_k.name,
        "type_v": e.type_v.name,
        "flash_attn": e.flash_attn,
        "n_gpu_layers": e.n_gpu_layers,
        "weights_bytes": e.weights_bytes(),
        "kv_bytes": e.kv_bytes(),
        "compute_bytes": e.compute_bytes(),
        "overhead_bytes": e.overhead_bytes(),
        "total_bytes": e.total_bytes(),
        "devices": devices,
    })
}

fn print_table(e: &Estimate) {
    println!(
        "  n_ctx {} (padded)  K {}  V {}  flash attention {}  -ngl {}",
        e.n_ctx,
        e.type_k,
        e.type_v,
        if e.flash_attn { "on" } else { "off" },
        e.n_gpu_layers
    );
    print_kv(e);
    println!(
        "  {:<6} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "device", "weights", "KV cache", "compute", "overhead", "total"
    );
    for d in &e.devices {
        println!(
            "  {:<6} {:>12} {:>12} {:>12} {:>12} {:>12}",
            d.name,
            human(d.weights_bytes),
            human(d.kv_bytes),
            human(d.compute_bytes),
            human(d.overhead_bytes),
            human(d.total_bytes)
        );
    }
    println!(
        "  {:<6} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "all",
        human(e.weights_bytes()),
        human(e.kv_bytes()),
        human(e.compute_bytes()),
        human(e.overhead_bytes()),
        human(e.total_bytes())
    );
    println!(
        "  compute buffers are approximate; overhead is the stated per-GPU figure (--overhead)"
    );
}

/// The KV cache's split into full-attention and sliding-window layers, and what was assumed.
fn print_kv(e: &Estimate) {
    let (n_full, full) = e.kv.group(false);
    let (n_swa, swa) = e.kv.group(true);
    let streams = if e.kv.n_stream > 1 {
        format!(
            " in each of {} streams (one per sequence; --kv-unified shares one)",
            e.kv.n_stream
        )
    } else {
        String::new()
    };
    println!(
        "  KV cache: {n_full} full-attention layers x {} cells{streams} = {}",
        e.kv.cells_full,
        human(full)
    );
    if n_swa > 0 {
        println!(
            "            {n_swa} sliding-window layers (window {}) x {} cells = {}",
            e.n_swa,
            e.kv.cells_swa,
            human(swa)
        );
    }
    if e.n_swa > 0 {
        if e.swa_full {
            println!("            swa_full on: sliding-window layers keep every cell");
        } else {
            println!(
                "            swa_full off (llama.cpp's default): a sliding-window layer keeps its \
                 window plus one micro-batch, padded to 256; --swa-full keeps every cell"
            );
        }
    }
}

fn params(r: &RunArgs) -> Params {
    Params {
        n_batch: r.batch,
        n_ubatch: r.ubatch,
        n_seq: r.parallel,
        swa_full: r.swa_full,
        kv_unified: r.kv_unified,
        overhead: r.overhead,
        ..Params::default()
    }
}

pub fn estimate(a: EstimateArgs) -> ExitCode {
    let m = match load(&a.model) {
        Ok(Some(m)) => m,
        Ok(None) => return ExitCode::SUCCESS,
        Err(code) => return code,
    };
    let p = Params {
        n_ctx: a.ctx,
        type_k: a.ctk,
        type_v: a.ctv,
        flash_attn: matches!(a.fa, OnOff::On),
        n_gpu_layers: a.ngl,
        tensor_split: if a.ts.is_empty() {
            vec![1.0]
        } else {
            a.ts.clone()
        },
        ..params(&a.run)
    };
    let e = match budget::estimate(&m, &p) {
        Ok(e) => e,
        Err(e) => return fail(format!("{}: {e}", m.source)),
    };
    if a.run.json {
        let mut v = device_json(&e);
        v["source"] = json!(m.source);
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON"));
    } else {
        println!(
            "{} ({}, {} layers)",
            m.source, m.hparams.arch, m.hparams.n_layer
        );
        print_table(&e);
    }
    ExitCode::SUCCESS
}

/// Free memory of device 0 as the backend reports it (the simulated device without a GPU).
fn backend_free() -> Result<Vec<u64>, String> {
    let pool = hbmalloc::runtime::pool(0).map_err(|e| format!("cannot read device 0: {e}"))?;
    let (free, _) = pool.backend().mem_info().map_err(|e| e.to_string())?;
    if hbmalloc::runtime::active() == hbmalloc::runtime::Active::Sim {
        eprintln!(
            "hbmalloc: no --mem given; using the simulated device's {} (sim_capacity)",
            human(free as u64)
        );
    }
    Ok(vec![free as u64])
}

pub fn fit(a: FitArgs) -> ExitCode {
    let m = match load(&a.model) {
        Ok(Some(m)) => m,
        Ok(None) => return ExitCode::SUCCESS,
        Err(code) => return code,
    };
    let free = if a.mem.is_empty() {
        match backend_free() {
            Ok(f) => f,
            Err(e) => return fail(e),
        }
    } else {
        a.mem.clone()
    };
    let base = Params {
        flash_attn: matches!(a.fa, OnOff::On),
        ..params(&a.run)
    };
    let p: Plan = match plan::fit(&m, &base, &free, a.margin, a.ctx) {
        Ok(p) => p,
        Err(e) => return fail(format!("{}: {e}", m.source)),
    };
    let args = p.llama_cpp_args().join(" ");
    if a.run.json {
        let e = &p.estimate;
        let rejected: Vec<Value> = p
            .rejected
            .iter()
            .map(|r| json!({"rung": r.rung, "reason": r.reason}))
            .collect();
        let v = json!({
            "source": m.source,
            "rung": p.rung,
            "n_gpu_layers": e.n_gpu_layers,
            "tensor_split": p.tensor_split,
            "type_k": e.type_k.name,
            "type_v": e.type_v.name,
            "flash_attn": e.flash_attn,
            "n_ctx": e.n_ctx,
            "rejected": rejected,
            "llama_cpp_args": args,
            "estimate": device_json(e),
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON"));
    } else {
        let free_s: Vec<String> = free.iter().map(|&f| human(f)).collect();
        println!(
            "{} on {} free, {} margin per GPU",
            m.source,
            free_s.join(" + "),
            human(a.margin)
        );
        for r in &p.rejected {
            println!("  rejected {:<9} {}", r.rung, r.reason);
        }
        println!("  chosen   {:<9} llama.cpp: {args}", p.rung);
        print_table(&p.estimate);
    }
    ExitCode::SUCCESS
}

/// A GGUF metadata value as JSON; arrays over 64 values become `{"array_len": N}`.
fn gguf_json(v: &gguf::Value) -> Value {
    use gguf::Value as G;
    match v {
        G::Array(a) if a.len() > 64 => json!({ "array_len": a.len() }),
        G::Array(a) => Value::Array(a.iter().map(gguf_json).collect()),
        G::String(s) => json!(s),
        G::Bool(b) => json!(b),
        G::F32(f) => json!(f),
        G::F64(f) => json!(f),
        other => other
            .as_u64()
            .map(|u| json!(u))
            .unwrap_or_else(|| match other {
                G::I8(i) => json!(i),
                G::I16(i) => json!(i),
                G::I32(i) => json!(i),
                G::I64(i) => json!(i),
                _ => Value::Null,
            }),
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!(
            "{}...",
            &s[..s.char_indices().nth(77).map_or(s.len(), |(i, _)| i)]
        )
    } else {
        s
    }
}

pub fn inspect(a: InspectArgs) -> ExitCode {
    let path: &Path = &a.file;
    let is_gguf = std::fs::File::open(path)
        .and_then(|mut f| {
            let mut m = [0u8; 4];
            std::io::Read::read_exact(&mut f, &mut m).map(|_| &m == b"GGUF")
        })
        .unwrap_or(false);
    let (format, metadata, tensors): (&str, Vec<(String, Value)>, Vec<Value>) = if is_gguf {
        let f = match gguf::open(path) {
            Ok(f) => f,
            Err(e) => return fail(e),
        };
        let md = f
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), gguf_json(v)))
            .collect();
        let t = f
            .tensors
            .iter()
            .map(|t| json!({"name": t.name, "type": t.ty.name, "shape": t.dims, "bytes": t.bytes}))
            .collect();
        ("gguf", md, t)
    } else {
        let f = match safetensors::open(path) {
            Ok(f) => f,
            Err(e) => return fail(e),
        };
        let md = f
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        let t = f
            .tensors
            .iter()
            .map(|t| json!({"name": t.name, "type": t.dtype, "shape": t.shape, "bytes": t.bytes}))
            .collect();
        ("safetensors", md, t)
    };
    let total: u64 = tensors.iter().filter_map(|t| t["bytes"].as_u64()).sum();
    if a.json {
        let md: serde_json::Map<String, Value> = metadata.into_iter().collect();
        let v =
            json!({"format": format, "metadata": md, "tensors": tensors, "tensor_bytes": total});
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON"));
        return ExitCode::SUCCESS;
    }
    println!(
        "{} ({format}): {} tensors, {}",
        path.display(),
        tensors.len(),
        human(total)
    );
    println!("metadata:");
    for (k, v) in &metadata {
        println!("  {k} = {}", short(v));
    }
    println!("tensors:");
    for t in &tensors {
        println!(
            "  {:<40} {:<8} {:<24} {:>12}",
            t["name"].as_str().unwrap_or(""),
            t["type"].as_str().unwrap_or(""),
            t["shape"].to_string(),
            t["bytes"]
        );
    }
    ExitCode::SUCCESS
}
