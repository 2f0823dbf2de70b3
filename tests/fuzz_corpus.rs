//! The fuzz targets' seed corpus (fuzz/corpus/<target>/), replayed on stable Rust as ordinary
//! tests, so that a regression shows without the fuzzer. `seed-*` files are hand-made
//! (fuzz/make_seeds.py); `regress-*` files are inputs the fuzzer found crashing, kept after the
//! fix.

use hbmalloc::harness::{conf, model_files, ops};
use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{target}: corpus missing");
    files
}

#[test]
fn pool_ops_corpus_keeps_every_invariant() {
    let mut injected = 0;
    for (name, data) in corpus("pool_ops") {
        let summary = ops::run(&data);
        assert!(summary.operations > 0, "{name}");
        if name.starts_with("seed-fault-") {
            assert!(summary.faults_injected > 0, "{name} injects its fault");
        }
        injected += summary.faults_injected;
    }
    assert!(injected >= 12, "{injected} faults injected");
}

#[test]
fn conf_corpus_parses_to_one_line_warnings() {
    for (_, data) in corpus("conf") {
        conf::run(&data);
    }
}

#[test]
fn model_files_corpus_reaches_the_planner() {
    for (name, data) in corpus("model_files") {
        model_files::run(&data);
        // The hand-made files are good models, so the fuzzer starts from inputs that get past
        // the readers.
        if name.starts_with("seed-gguf") {
            model_files::gguf_model(&data[1..]).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else if name.starts_with("seed-safetensors") {
            model_files::safetensors_model(&data[1..]).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}

/// The regression inputs fail without their fixes: a scratch-pool free whose synchronize failed
/// was reported as a failed free (and its buffer lost), a warning could span lines, and a GGUF
/// header's expert sizes overflowed a multiplication (a panic with overflow checks, a wrong
/// estimate without).
#[test]
fn regressions_are_in_the_corpus() {
    let names: Vec<String> = ["pool_ops", "conf", "model_files"]
        .iter()
        .flat_map(|t| corpus(t).into_iter().map(|(n, _)| n))
        .collect();
    for want in [
        "regress-scratch-free-sync-fails-a",
        "regress-warning-newline",
        "regress-fault-plan-newline",
        "regress-expert-ffn-overflow",
    ] {
        assert!(names.iter().any(|n| n == want), "{want}");
    }
}
