//! The GGUF reader against files written by the `gguf` Python package (llama.cpp's writer), and
//! the sliding-window KV cache of Gemma-style and gpt-oss-style files.
//! Skips, saying so, only when python3 or the package is unavailable
//! (scripts/install-test-deps.sh installs it into .whl/py-gguf).

use std::path::{Path, PathBuf};
use std::process::Command;

use hbmalloc::estimate::ggml_type::GgmlType;
use hbmalloc::estimate::gguf::{self, Value};
use hbmalloc::estimate::kv::{kv_bytes_per_layer, KvParams};
use hbmalloc::estimate::model::Hparams;

const SCRIPT: &str = r#"
import sys, numpy as np, gguf
w = gguf.GGUFWriter(sys.argv[1], "llama")
w.add_block_count(2)
w.add_embedding_length(64)
w.add_head_count(4)
w.add_head_count_kv(2)
w.add_context_length(128)
w.add_array("t.arr", [1, 2, 3])
w.add_string("t.s", "hello")
w.add_tensor("token_embd.weight", np.zeros((10, 64), dtype=np.float16))
w.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), dtype=np.float32))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
"#;

#[test]
fn reads_files_written_by_the_gguf_package() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut py_path = root.join(".whl/py-gguf").display().to_string();
    if let Ok(p) = std::env::var("PYTHONPATH") {
        py_path = format!("{py_path}:{p}");
    }
    let probe = Command::new("python3")
        .args(["-c", "import gguf, numpy"])
        .env("PYTHONPATH", &py_path)
        .output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        eprintln!("SKIP: python3 with the gguf package is not available (run scripts/install-test-deps.sh)");
        return;
    }
    let file = std::env::temp_dir().join(format!("hbm-pygguf-{}.gguf", std::process::id()));
    let out = Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(&file)
        .env("PYTHONPATH", &py_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gguf writer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = gguf::open(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    assert_eq!(f.version, 3);
    assert_eq!(f.get("t.s").and_then(Value::as_str), Some("hello"));
    assert!(matches!(f.get("t.arr"), Some(Value::Array(a)) if a.len() == 3));
    assert_eq!(f.tensors.len(), 2);
    assert_eq!(f.tensors[0].dims, vec![64, 10]);
    assert_eq!(f.tensors[0].ty, GgmlType::F16);
    assert_eq!(f.tensors[0].bytes, 64 * 10 * 2);
    assert_eq!(f.tensors[1].bytes, 64 * 64 * 4);
    assert_eq!(
        f.data_offset + f.tensors[1].offset + f.tensors[1].bytes,
        f.file_len
    );
    let h = Hparams::from_gguf(&f).unwrap();
    assert_eq!(
        (h.n_layer, h.n_embd, h.n_head_kv.clone(), h.head_dim_k),
        (2, 64, vec![2, 2], 16)
    );
}

/// The `gguf` package's PYTHONPATH, or `None` (and a SKIP line) when python3 or the package is
/// missing.
fn py_gguf() -> Option<String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut py_path = root.join(".whl/py-gguf").display().to_string();
    if let Ok(p) = std::env::var("PYTHONPATH") {
        py_path = format!("{py_path}:{p}");
    }
    let probe = Command::new("python3")
        .args(["-c", "import gguf, numpy"])
        .env("PYTHONPATH", &py_path)
        .output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        eprintln!("SKIP: python3 with the gguf package is not available (run scripts/install-test-deps.sh)");
        return None;
    }
    Some(py_path)
}

/// Writes a header-only model with the `gguf` package: `script` gets `w`, a GGUFWriter for
/// `arch`, and adds the architecture's keys.
fn write_gguf(py_path: &str, name: &str, arch: &str, script: &str) -> PathBuf {
    let file = std::env::temp_dir().join(format!("hbm-{name}-{}.gguf", std::process::id()));
    let program = format!(
        "import sys, numpy as np, gguf\nw = gguf.GGUFWriter(sys.argv[1], {arch:?})\n{script}\n\
         w.add_tensor('token_embd.weight', np.zeros((16, 64), dtype=np.float16))\n\
         w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()\n"
    );
    let out = Command::new("python3")
        .args(["-c", &program])
        .arg(&file)
        .env("PYTHONPATH", py_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gguf writer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    file
}

fn kv_of(file: &Path, n_ctx: u64, n_seq: u64, swa_full: bool) -> (Vec<u64>, Hparams) {
    let f = gguf::open(file).unwrap();
    let h = Hparams::from_gguf(&f).unwrap();
    let p = KvParams {
        n_ctx,
        n_ubatch: 512,
        n_seq,
        type_k: GgmlType::F16,
        type_v: GgmlType::F16,
        flash_attn: false,
        swa_full,
        kv_unified: false,
    };
    (kv_bytes_per_layer(&h, &p).unwrap(), h)
}

/// Rounds up to llama.cpp's padding of 256 cells.
fn pad(n: u64) -> u64 {
    n.div_ceil(256) * 256
}

#[test]
fn gemma_style_file_keeps_a_window_in_five_of_six_layers() {
    let Some(py) = py_gguf() else { return };
    // Gemma 3: period 6 (layers 0-4 slide, 5 is full, 6 slides again), window 512; 4 query
    // heads, 2 KV heads of 128 (key_length, not n_embd / n_head).
    let file = write_gguf(
        &py,
        "gemma3",
        "gemma3",
        "w.add_block_count(7); w.add_embedding_length(64); w.add_head_count(4)\n\
         w.add_head_count_kv(2); w.add_key_length(128); w.add_value_length(128)\n\
         w.add_sliding_window(512); w.add_context_length(8192)",
    );
    let (per, h) = kv_of(&file, 8192, 1, false);
    let (full, _) = kv_of(&file, 8192, 1, true);
    let _ = std::fs::remove_file(&file);
    assert_eq!(h.n_swa, 512);
    // K and V, 2 heads of 128 f16 each: 1024 bytes a cell. The full layer keeps 8192 cells,
    // a sliding one pad(min(8192, 512 + 512)) = 1024.
    let cell = 2 * 2 * 128 * 2;
    let (swa, dense) = (cell * pad(512 + 512), cell * 8192);
    assert_eq!(per, vec![swa, swa, swa, swa, swa, dense, swa]);
    assert_eq!(full, vec![dense; 7], "--swa-full");
}

#[test]
fn gpt_oss_style_file_alternates_and_pads_per_sequence() {
    let Some(py) = py_gguf() else { return };
    // gpt-oss: window 128, every other layer slides (0, 2 slide; 1, 3 full), 8 KV heads of 64.
    let file = write_gguf(
        &py,
        "gptoss",
        "gpt-oss",
        "w.add_block_count(4); w.add_embedding_length(64); w.add_head_count(16)\n\
         w.add_head_count_kv(8); w.add_key_length(64); w.add_value_length(64)\n\
         w.add_sliding_window(128); w.add_context_length(131072)",
    );
    // Two sequences of 4096 tokens: each its own stream of 4096 cells, whose sliding layers
    // keep pad(128 + 512) = 768 cells.
    let (per, _) = kv_of(&file, 8192, 2, false);
    let cell = 2 * 8 * 64 * 2;
    let (swa, dense) = (2 * cell * pad(128 + 512), 2 * cell * 4096);
    assert_eq!(per, vec![swa, dense, swa, dense]);
    // A file's own pattern, as one bool per layer, replaces the architecture's period.
    let _ = std::fs::remove_file(&file);
    let file = write_gguf(
        &py,
        "gptoss-array",
        "gpt-oss",
        "w.add_block_count(4); w.add_embedding_length(64); w.add_head_count(16)\n\
         w.add_head_count_kv(8); w.add_key_length(64); w.add_value_length(64)\n\
         w.add_sliding_window(128); w.add_sliding_window_pattern([False, True, True, False])",
    );
    let (per, _) = kv_of(&file, 8192, 2, false);
    let _ = std::fs::remove_file(&file);
    assert_eq!(per, vec![dense, swa, swa, dense]);
}

#[test]
fn a_window_llama_cpp_ignores_is_not_counted() {
    let Some(py) = py_gguf() else { return };
    // Mistral-7B v0.1 converts to the llama architecture with its 4096 window in the metadata;
    // llama.cpp's llama architecture never reads it and allocates every cell.
    let file = write_gguf(
        &py,
        "mistral",
        "llama",
        "w.add_block_count(2); w.add_embedding_length(64); w.add_head_count(4)\n\
         w.add_head_count_kv(1); w.add_sliding_window(256)",
    );
    let (per, h) = kv_of(&file, 4096, 1, false);
    let _ = std::fs::remove_file(&file);
    assert_eq!(h.n_swa, 0);
    assert_eq!(per, vec![2 * 16 * 2 * 4096; 2]);
}
