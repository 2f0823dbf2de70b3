//! The import graph between the crate's top-level modules has no arrow upward, and only the
//! backend uses the CUDA driver bindings (docs/architecture.md). Read from the sources: every
//! `crate::<module>` a module's non-test code names must be of a lower layer.
//!
//! Not counted: comments, `#[cfg(test)] mod tests` blocks at the end of a file, `*_tests.rs`
//! files, and `test_child` (test-only). The C boundary's forwarding of a caller's own call to the
//! runtime or driver (`ffi/real_cuda.rs`, `ffi/driver_api.rs`, by `dlsym`) is the boundary's job
//! and uses no bindings.

use std::collections::BTreeMap;
use std::path::Path;

/// Layers, lowest first; a module may import only modules of a lower layer (or its own).
const LAYERS: &[&[&str]] = &[
    &["error", "sync", "units", "process", "fault_plan"],
    &["config", "dtype"],
    &["backend", "nvtx", "estimate"],
    &["pool", "kv", "track"],
    &["runtime"],
    &["tracked"],
    &["ffi"],
    // Checked runs over every layer, for the fuzz targets and their corpus replay.
    &["harness"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Non-test source of a file: lines that are not comments, up to a trailing test module.
fn code_of(text: &str) -> String {
    let end = text.find("#[cfg(test)]\nmod tests").unwrap_or(text.len());
    text[..end]
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `crate::<name>` references in `code`.
fn crate_refs(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        // `$crate::name!` in a macro names the exported macro at the crate root, not a module.
        if rest[..i].ends_with('$') {
            rest = after;
            continue;
        }
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
            .collect();
        if !name.is_empty() {
            out.push(name);
        }
        rest = after;
    }
    out
}

/// Every `.rs` file under `dir`, with the top-level module it belongs to.
fn sources(dir: &Path, top: Option<&str>, out: &mut Vec<(String, std::path::PathBuf)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let module = top.map(str::to_string).unwrap_or_else(|| name.clone());
        if path.is_dir() {
            sources(&path, Some(&module), out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push((module, path));
        }
    }
}

fn modules_and_files() -> Vec<(String, std::path::PathBuf)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, None, &mut files);
    files.retain(|(m, p)| {
        !matches!(m.as_str(), "lib" | "bin" | "test_child")
            && !p.to_string_lossy().ends_with("_tests.rs")
    });
    files
}

#[test]
fn no_module_imports_one_above_it() {
    let mut upward: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (module, path) in modules_and_files() {
        let Some(mine) = layer_of(&module) else {
            panic!(
                "module `{module}` ({}) has no layer in LAYERS",
                path.display()
            );
        };
        let code = code_of(&std::fs::read_to_string(&path).unwrap());
        for name in crate_refs(&code) {
            if name == module || name == "test_child" {
                continue;
            }
            let theirs = layer_of(&name)
                .unwrap_or_else(|| panic!("{} names crate::{name}: no layer", path.display()));
            if theirs >= mine {
                upward
                    .entry(format!("{module} -> {name}"))
                    .or_default()
                    .push(path.display().to_string());
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that go up or sideways: {upward:#?}"
    );
}

#[test]
fn only_the_backend_uses_the_driver_bindings() {
    let outside: Vec<String> = modules_and_files()
        .into_iter()
        .filter(|(m, _)| m != "backend")
        .filter(|(_, p)| code_of(&std::fs::read_to_string(p).unwrap()).contains("cudarc"))
        .map(|(_, p)| p.display().to_string())
        .collect();
    assert!(
        outside.is_empty(),
        "cudarc used outside src/backend/: {outside:?}"
    );
}

#[test]
fn the_scan_sees_an_upward_import() {
    // The scanner itself: a backend file naming the tracker would be caught.
    let code = code_of("use crate::error::Result;\n// crate::runtime in a comment\nfn f() { crate::track::global(); }\n#[cfg(test)]\nmod tests { use crate::ffi; }\n");
    assert_eq!(crate_refs(&code), vec!["error", "track"]);
}
