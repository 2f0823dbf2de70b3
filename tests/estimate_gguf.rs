//! The GGUF reader against files written by the `gguf` Python package (llama.cpp's writer).
//! Skips, saying so, only when python3 or the package is unavailable
//! (scripts/install-test-deps.sh installs it into .whl/py-gguf).

use std::path::PathBuf;
use std::process::Command;

use hbmalloc::estimate::ggml_type::GgmlType;
use hbmalloc::estimate::gguf::{self, Value};
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
