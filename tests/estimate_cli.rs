//! The `hbmalloc` command-line tool, run as users run it: output, JSON fields and exit codes.

use std::path::PathBuf;
use std::process::{Command, Output};

fn run(args: &[&str], conf: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hbmalloc"))
        .args(args)
        .env("HBMALLOC_CONF", conf)
        .output()
        .expect("the hbmalloc binary runs")
}

fn hbm(args: &[&str]) -> Output {
    run(args, "backend:sim,leak_report:off")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(args: &[&str]) -> serde_json::Value {
    let o = hbm(args);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("valid JSON")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hbm-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn help_for_every_command() {
    for cmd in [
        &["--help"][..],
        &["demo", "--help"],
        &["inspect", "--help"],
        &["estimate", "--help"],
        &["fit", "--help"],
    ] {
        let o = hbm(cmd);
        assert_eq!(o.status.code(), Some(0), "{cmd:?}");
        assert!(stdout(&o).contains("Usage: hbmalloc"), "{cmd:?}");
    }
    assert!(stdout(&hbm(&["estimate", "--help"])).contains("--cache-type-k"));
    assert!(stdout(&hbm(&["version"])).starts_with("hbmalloc "));
}

#[test]
fn bad_usage_is_one_line_and_exit_code_2() {
    for args in [
        &[][..],
        &["bogus"],
        &["demo", "--steps"],
        &["demo", "--steps", "0"],
        &["demo", "extra"],
        &["estimate"],
        &["estimate", "--preset", "no-such-model"],
        &["estimate", "--preset", "llama-7b", "--ctk", "q5_0"],
        &["estimate", "--preset", "llama-7b", "--ctx", "many"],
        &["estimate", "--preset", "llama-7b", "--ts", "1,x"],
        &["fit", "--preset", "llama-7b", "--mem", "lots"],
        &["fit", "--preset", "llama-7b", "--ctx", "-1"],
        &["inspect"],
    ] {
        let o = hbm(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert_eq!(e.trim_end().lines().count(), 1, "{args:?}: {e}");
        assert!(e.starts_with("hbmalloc: "), "{args:?}: {e}");
        assert!(o.stdout.is_empty(), "{args:?}");
    }
    assert!(stderr(&hbm(&["demo", "--steps"])).contains("--steps"));
}

#[test]
fn estimate_json_contract() {
    let v = json(&[
        "estimate", "--preset", "llama-7b", "--ctx", "4000", "--json",
    ]);
    assert_eq!(v["n_ctx"], 4096);
    assert_eq!(v["type_k"], "f16");
    assert_eq!(v["type_v"], "f16");
    assert_eq!(v["kv_bytes"], 2u64 << 30);
    let devices = v["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    assert_eq!(devices[0]["name"], "CPU");
    assert_eq!(devices[1]["name"], "GPU0");
    let sum = |k: &str| devices.iter().map(|d| d[k].as_u64().unwrap()).sum::<u64>();
    for k in ["weights_bytes", "kv_bytes", "compute_bytes", "total_bytes"] {
        assert_eq!(v[k].as_u64().unwrap(), sum(k), "{k}");
    }
    assert_eq!(
        v["total_bytes"].as_u64().unwrap(),
        [
            "weights_bytes",
            "kv_bytes",
            "compute_bytes",
            "overhead_bytes"
        ]
        .iter()
        .map(|k| v[k].as_u64().unwrap())
        .sum::<u64>()
    );
    // Quantized cache, two GPUs, partial offload.
    let v = json(&[
        "estimate",
        "--preset",
        "llama-7b",
        "--cache-type-k",
        "q8_0",
        "--ctv",
        "q8_0",
        "--fa",
        "on",
        "--ngl",
        "20",
        "--ts",
        "1,1",
        "--json",
    ]);
    assert_eq!(v["type_k"], "q8_0");
    assert_eq!(v["n_gpu_layers"], 20);
    assert_eq!(v["devices"].as_array().unwrap().len(), 3);
    // A quantized V without flash attention is refused with a reason (exit 1: not bad usage).
    let o = hbm(&["estimate", "--preset", "llama-7b", "--ctv", "q8_0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("flash attention"));
    let list = stdout(&hbm(&["estimate", "--list-presets"]));
    assert!(
        list.contains("llama-3.1-8b") && list.contains("deepseek-v3"),
        "{list}"
    );
}

#[test]
fn sliding_window_split_and_assumption_are_shown() {
    // Gemma-2-9B at 32768: 21 full-attention layers keep 32768 cells, 21 sliding ones
    // pad256(4096 + 512) = 4608; a cell of a layer is 8 KV heads of 256, K and V, f16.
    let cell = 2 * 8 * 256 * 2u64;
    let v = json(&[
        "estimate",
        "--preset",
        "gemma-2-9b",
        "--ctx",
        "32768",
        "--json",
    ]);
    assert_eq!(v["swa_full"], false);
    let kv = &v["kv"];
    assert_eq!(
        (kv["n_swa"].as_u64(), kv["cells_swa"].as_u64()),
        (Some(4096), Some(4608))
    );
    assert_eq!(
        (kv["full_layers"].as_u64(), kv["swa_layers"].as_u64()),
        (Some(21), Some(21))
    );
    assert_eq!(kv["swa_bytes"].as_u64(), Some(21 * cell * 4608));
    assert_eq!(kv["layer_bytes"][0].as_u64(), Some(cell * 4608));
    assert_eq!(kv["layer_bytes"][1].as_u64(), Some(cell * 32768));
    assert_eq!(v["kv_bytes"].as_u64(), Some(21 * cell * (32768 + 4608)));
    let full = json(&[
        "estimate",
        "--preset",
        "gemma-2-9b",
        "--ctx",
        "32768",
        "--swa-full",
        "--json",
    ]);
    assert_eq!(full["swa_full"], true);
    assert_eq!(full["kv_bytes"].as_u64(), Some(42 * cell * 32768));
    let text = stdout(&hbm(&[
        "estimate",
        "--preset",
        "gemma-2-9b",
        "--ctx",
        "32768",
    ]));
    assert!(
        text.contains("21 sliding-window layers (window 4096) x 4608 cells"),
        "{text}"
    );
    assert!(text.contains("swa_full off"), "{text}");
    // Four sequences: a stream each of 1024 cells, unless --kv-unified.
    let per_seq = json(&[
        "estimate",
        "--preset",
        "llama-7b",
        "--parallel",
        "4",
        "--json",
    ]);
    assert_eq!(per_seq["kv"]["n_stream"].as_u64(), Some(4));
    let unified = json(&[
        "estimate",
        "--preset",
        "llama-7b",
        "--parallel",
        "4",
        "--kv-unified",
        "--json",
    ]);
    assert_eq!(unified["kv"]["n_stream"].as_u64(), Some(1));
    assert_eq!(
        per_seq["kv_bytes"], unified["kv_bytes"],
        "a full cache is the same size"
    );
}

#[test]
fn fit_walks_the_ladder() {
    let v = json(&["fit", "--preset", "llama-7b", "--mem", "24GiB", "--json"]);
    assert_eq!(v["rung"], "gpu-f16");
    assert_eq!(v["rejected"].as_array().unwrap().len(), 0);
    assert_eq!(v["llama_cpp_args"], "-ngl 33 -c 4096 -fa off");
    let v = json(&[
        "fit", "--preset", "llama-7b", "--free", "15660MiB", "--json",
    ]);
    assert_eq!(v["rung"], "gpu-q8_0");
    assert_eq!(v["type_k"], "q8_0");
    assert_eq!(v["flash_attn"], true);
    assert_eq!(v["rejected"][0]["rung"], "gpu-f16");
    assert!(v["rejected"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("short"));
    assert_eq!(
        v["llama_cpp_args"],
        "-ngl 33 -c 4096 -ctk q8_0 -ctv q8_0 -fa on"
    );
    let v = json(&["fit", "--preset", "llama-7b", "--mem", "8GiB", "--json"]);
    assert_eq!(v["rung"], "partial");
    let v = json(&["fit", "--preset", "llama-7b", "--mem", "1GiB", "--json"]);
    assert_eq!(v["rung"], "cpu");
    assert_eq!(v["n_gpu_layers"], 0);
    let v = json(&[
        "fit",
        "--preset",
        "llama-70b",
        "--mem",
        "80GiB,80GiB",
        "--ctx",
        "auto",
        "--json",
    ]);
    assert_eq!(v["tensor_split"], serde_json::json!([0.5, 0.5]));
    assert!(v["n_ctx"].as_u64().unwrap() % 256 == 0);
    // Without --mem: the device the backend reports (the simulated one here, 15660 MiB).
    let o = run(
        &["fit", "--preset", "llama-7b"],
        "backend:sim,sim_capacity:15660MiB,leak_report:off",
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("simulated device"));
    assert!(stdout(&o).contains("chosen   gpu-q8_0"), "{}", stdout(&o));
}

/// A minimal GGUF v3: llama metadata, two layers, token_embd and one attention tensor per layer.
fn write_gguf(path: &std::path::Path) {
    fn s(out: &mut Vec<u8>, x: &str) {
        out.extend_from_slice(&(x.len() as u64).to_le_bytes());
        out.extend_from_slice(x.as_bytes());
    }
    let kv: &[(&str, u32)] = &[
        ("llama.block_count", 2),
        ("llama.embedding_length", 64),
        ("llama.attention.head_count", 4),
        ("llama.context_length", 512),
        ("llama.feed_forward_length", 128),
    ];
    let tensors: &[(&str, [u64; 2])] = &[
        ("token_embd.weight", [64, 100]),
        ("blk.0.attn_q.weight", [64, 64]),
        ("blk.1.attn_q.weight", [64, 64]),
    ];
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kv.len() as u64 + 1).to_le_bytes());
    s(&mut out, "general.architecture");
    out.extend_from_slice(&8u32.to_le_bytes());
    s(&mut out, "llama");
    for (k, v) in kv {
        s(&mut out, k);
        out.extend_from_slice(&4u32.to_le_bytes());
        out.extend_from_slice(&v.to_le_bytes());
    }
    let mut off = 0u64;
    for (name, dims) in tensors {
        s(&mut out, name);
        out.extend_from_slice(&2u32.to_le_bytes());
        for d in dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&1u32.to_le_bytes()); // f16
        out.extend_from_slice(&off.to_le_bytes());
        off += dims[0] * dims[1] * 2;
    }
    out.resize(out.len().div_ceil(32) * 32 + off as usize, 0);
    std::fs::write(path, out).unwrap();
}

#[test]
fn inspect_and_estimate_files() {
    let d = tmp("files");
    let g = d.join("tiny.gguf");
    write_gguf(&g);
    let g = g.to_str().unwrap();
    let v = json(&["inspect", g, "--json"]);
    assert_eq!(v["format"], "gguf");
    assert_eq!(v["metadata"]["llama.block_count"], 2);
    assert_eq!(v["tensors"][0]["name"], "token_embd.weight");
    assert_eq!(v["tensors"][0]["type"], "f16");
    assert_eq!(v["tensors"][0]["bytes"], 64 * 100 * 2);
    assert!(stdout(&hbm(&["inspect", g])).contains("blk.1.attn_q.weight"));
    let v = json(&["estimate", g, "--ctx", "256", "--json"]);
    // Token embeddings on the CPU; both layers (and, tied, a copy of the embeddings) on GPU0.
    assert_eq!(v["devices"][0]["weights_bytes"], 64 * 100 * 2);
    assert_eq!(
        v["devices"][1]["weights_bytes"],
        2 * 64 * 64 * 2 + 64 * 100 * 2
    );
    assert_eq!(v["kv_bytes"], 2 * 256 * 2 * 64 * 2);
    // safetensors with config.json beside it.
    let json_hdr = r#"{"model.embed_tokens.weight":{"dtype":"BF16","shape":[100,64],"data_offsets":[0,12800]},"model.layers.0.self_attn.q_proj.weight":{"dtype":"BF16","shape":[64,64],"data_offsets":[12800,20992]}}"#;
    let mut st = (json_hdr.len() as u64).to_le_bytes().to_vec();
    st.extend_from_slice(json_hdr.as_bytes());
    st.resize(st.len() + 20992, 0);
    std::fs::write(d.join("model.safetensors"), st).unwrap();
    std::fs::write(
        d.join("config.json"),
        r#"{"model_type":"llama","num_hidden_layers":1,"hidden_size":64,"num_attention_heads":4,"vocab_size":100}"#,
    )
    .unwrap();
    let v = json(&[
        "inspect",
        d.join("model.safetensors").to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(v["format"], "safetensors");
    assert_eq!(v["tensor_bytes"], 20992);
    let v = json(&["estimate", d.to_str().unwrap(), "--ctx", "256", "--json"]);
    assert_eq!(v["weights_bytes"], 20992 + 12800);
    assert_eq!(v["kv_bytes"], 256 * 2 * 64 * 2);
    // Corrupt and missing files: one line, exit 1, the offset named.
    let bad = d.join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00\xff\xff").unwrap();
    let o = hbm(&["inspect", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("GGUF byte"), "{}", stderr(&o));
    let o = hbm(&["estimate", d.join("missing.gguf").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn demo_on_the_simulated_device() {
    let o = run(&["demo", "--steps", "1"], "backend:sim,leak_report:summary");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("simulated device"), "{}", stdout(&o));
    // Out of memory at start-up: a clear error, and nothing of the demo's own blamed as a leak.
    let o = run(&["demo"], "backend:sim,sim_capacity:64MiB,leak_report:full");
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("hbmalloc demo: out of memory"), "{e}");
    assert!(e.contains("sim_capacity"), "{e}");
    for line in e.lines().filter(|l| l.contains("LEAK SUMMARY")) {
        assert!(line.contains(" 0 bytes leaked"), "{e}");
    }
    assert!(!e.contains("allocations from"), "{e}");
}

/// Every byte of a GGUF file mutated, and the file cut at every byte: the whole path the
/// commands take (reader, hyperparameters, estimate, planner) gives an answer or an error, never a
/// panic.
#[test]
fn mutated_files_never_panic_the_estimate() {
    use hbmalloc::estimate::budget::{estimate, Params};
    use hbmalloc::estimate::plan::{fit, Ctx};
    use hbmalloc::estimate::weights;
    let d = tmp("fuzz");
    let good = d.join("good.gguf");
    write_gguf(&good);
    let bytes = std::fs::read(&good).unwrap();
    let header_end = bytes.len() - (64 * 100 + 2 * 64 * 64) * 2;
    let f = d.join("m.gguf");
    let check = |b: &[u8]| {
        std::fs::write(&f, b).unwrap();
        if let Ok(m) = weights::open(&f) {
            let _ = estimate(&m, &Params::default());
            let _ = fit(&m, &Params::default(), &[1 << 30], 0, Ctx::Auto);
        }
    };
    for i in 0..header_end {
        for v in [0u8, 0xFF, 0x7F, bytes[i] ^ 1] {
            let mut m = bytes.clone();
            m[i] = v;
            check(&m);
        }
        check(&bytes[..i]);
        assert!(weights::open(&f).is_err(), "cut at {i}");
    }
    let _ = std::fs::remove_dir_all(&d);
}
