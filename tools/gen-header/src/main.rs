//! Writes include/hbmalloc.h from the crate's Rust sources with cbindgen and cbindgen.toml.
//!
//! usage: gen-header [OUTPUT]   (default: include/hbmalloc.h of the repository)
//!
//! On top of cbindgen.toml it derives, from the sources themselves, what no one should have to
//! keep in a list by hand. The rule is the C API's naming (docs/c-api.md): functions `hbm_*`,
//! types `Hbm*`, constants `HBM_*`.
//! - Excluded: every `extern "C"` function not named `hbm_*` (the interposed `cuda*` hooks),
//!   every constant or static not named `HBM_*`/`hbm_*`, and every associated constant (cbindgen
//!   would print `impl HbmType { const ALL }` as a broken `#define HbmType_ALL`, and drag in
//!   the types of constants such as `StackId::NONE`). So the header holds the C API only, and
//!   can be included beside cuda_runtime.h.
//! - Included: every `#[repr(..)]` struct, enum or type alias named `Hbm*`, even when no function
//!   takes it (element types are passed as `int32_t`, yet C needs `HBM_TYPE_*`).
//! - The version macros, from `[package] version` in Cargo.toml.
//!
//! Everything else (new `hbm_*` functions, the types they use, their `///` docs) cbindgen picks
//! up by itself from `src/`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use syn::visit::Visit;

fn main() -> ExitCode {
    match run() {
        Ok(out) => {
            eprintln!("gen-header: wrote {}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gen-header: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .map_err(|e| format!("cannot find the repository root: {e}"))?;
    let out = match std::env::args_os().nth(1) {
        Some(path) => PathBuf::from(path),
        None => root.join("include/hbmalloc.h"),
    };

    let mut config = cbindgen::Config::from_file(root.join("cbindgen.toml"))
        .map_err(|e| format!("cbindgen.toml: {e}"))?;
    let scan = scan_sources(&root.join("src"))?;
    config.export.exclude.extend(scan.excluded);
    config.export.include.extend(scan.included);
    config.after_includes = Some(version_macros(&root.join("Cargo.toml"))?);

    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_crate(&root)
        .generate()
        .map_err(|e| format!("cbindgen failed: {e}"))?;
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut text = Vec::new();
    bindings.write(&mut text);
    let text = String::from_utf8(text).map_err(|e| format!("cbindgen wrote non-UTF-8: {e}"))?;
    fs::write(&out, c_speak(&text)).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(out)
}

/// The doc comments' rustdoc headings in C words: an `unsafe fn`'s `# Safety` section (which
/// clippy requires in the Rust source) is what a C caller must guarantee.
fn c_speak(header: &str) -> String {
    header.replace(" * # Safety\n", " * Requirements:\n")
}

/// `#define HBMALLOC_VERSION_MAJOR 0` ... from `[package] version = "0.1.0"`.
fn version_macros(cargo_toml: &Path) -> Result<String, String> {
    let text =
        fs::read_to_string(cargo_toml).map_err(|e| format!("{}: {e}", cargo_toml.display()))?;
    let version = package_version(&text)
        .ok_or_else(|| format!("{}: no [package] version", cargo_toml.display()))?;
    // "1.2.3-rc.1": the numbers are 1, 2, 3; the string keeps the suffix.
    let numbers: Vec<&str> = version
        .split(['-', '+'])
        .next()
        .unwrap_or("")
        .split('.')
        .collect();
    let [major, minor, patch] = numbers[..] else {
        return Err(format!("version '{version}' is not MAJOR.MINOR.PATCH"));
    };
    for n in [major, minor, patch] {
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("version '{version}' is not MAJOR.MINOR.PATCH"));
        }
    }
    Ok(format!(
        "\n/* The version of the library this header was generated from (Cargo.toml); \
         hbm_version() gives the one loaded at run time. */\n\
         #define HBMALLOC_VERSION_MAJOR {major}\n\
         #define HBMALLOC_VERSION_MINOR {minor}\n\
         #define HBMALLOC_VERSION_PATCH {patch}\n\
         #define HBMALLOC_VERSION \"{version}\""
    ))
}

/// The `version` value of the `[package]` table (a plain `version = "..."` line).
fn package_version(cargo_toml: &str) -> Option<String> {
    let mut in_package = false;
    for line in cargo_toml.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[package]";
            continue;
        }
        if !in_package {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            if key.trim() == "version" {
                let value = value.trim();
                return value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .map(str::to_string);
            }
        }
    }
    None
}

/// What to exclude from and include in the header, found in every `.rs` file under `src`.
fn scan_sources(src: &Path) -> Result<Scan, String> {
    let mut files = Vec::new();
    rust_files(src, &mut files)?;
    files.sort();
    let mut scan = Scan::default();
    for file in &files {
        let text = fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let ast = syn::parse_file(&text).map_err(|e| format!("{}: {e}", file.display()))?;
        scan.visit_file(&ast);
    }
    Ok(scan)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if path.is_dir() {
            rust_files(&path, out)?;
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

#[derive(Default)]
struct Scan {
    /// Names for cbindgen's `export.exclude`.
    excluded: BTreeSet<String>,
    /// Names for cbindgen's `export.include`.
    included: BTreeSet<String>,
}

fn has_repr(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| a.path().is_ident("repr"))
}

impl<'ast> Visit<'ast> for Scan {
    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        let is_extern_c = f
            .sig
            .abi
            .as_ref()
            .is_some_and(|abi| abi.name.as_ref().is_none_or(|n| n.value() == "C"));
        let name = f.sig.ident.to_string();
        if is_extern_c && !name.starts_with("hbm_") {
            self.excluded.insert(name);
        }
        syn::visit::visit_item_fn(self, f);
    }

    fn visit_item_const(&mut self, c: &'ast syn::ItemConst) {
        let name = c.ident.to_string();
        if !name.starts_with("HBM_") {
            self.excluded.insert(name);
        }
        syn::visit::visit_item_const(self, c);
    }

    fn visit_item_impl(&mut self, item: &'ast syn::ItemImpl) {
        // cbindgen names an associated constant by the constant's name followed by its type's
        // (`ALL` of `HbmType` is "ALLHbmType"), and matches `export.exclude` against that.
        if let syn::Type::Path(ty) = &*item.self_ty {
            if let Some(last) = ty.path.segments.last() {
                for impl_item in &item.items {
                    if let syn::ImplItem::Const(c) = impl_item {
                        self.excluded.insert(format!("{}{}", c.ident, last.ident));
                    }
                }
            }
        }
        syn::visit::visit_item_impl(self, item);
    }

    fn visit_item_struct(&mut self, s: &'ast syn::ItemStruct) {
        self.include_if_c_api_type(&s.ident, &s.attrs, true);
        syn::visit::visit_item_struct(self, s);
    }

    fn visit_item_enum(&mut self, e: &'ast syn::ItemEnum) {
        self.include_if_c_api_type(&e.ident, &e.attrs, true);
        syn::visit::visit_item_enum(self, e);
    }

    fn visit_item_type(&mut self, t: &'ast syn::ItemType) {
        self.include_if_c_api_type(&t.ident, &t.attrs, false);
        syn::visit::visit_item_type(self, t);
    }

    fn visit_item_static(&mut self, s: &'ast syn::ItemStatic) {
        let name = s.ident.to_string();
        if !name.starts_with("HBM_") && !name.starts_with("hbm_") {
            self.excluded.insert(name);
        }
        syn::visit::visit_item_static(self, s);
    }
}

impl Scan {
    /// `Hbm*` types are the C API's; structs and enums only with a defined layout (`#[repr]`).
    fn include_if_c_api_type(
        &mut self,
        ident: &syn::Ident,
        attrs: &[syn::Attribute],
        needs_repr: bool,
    ) {
        let name = ident.to_string();
        if name.starts_with("Hbm") && (!needs_repr || has_repr(attrs)) {
            self.included.insert(name);
        }
    }
}
