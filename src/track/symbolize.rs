//! Turning raw return addresses into readable frames, only when a report is written.
//!
//! A call site's stack is trimmed before it is shown: the leading frames inside hbmalloc (the
//! entry point, the pool, the tracker) and the trailing frames of the C and Rust runtimes (`_start`,
//! `__libc_start_main`, `std::rt::lang_start`, thread start) are left out, so the first frame is
//! the caller's code that asked for the memory.

use std::collections::HashMap;
use std::ffi::CStr;
use std::fmt::Write as _;
use std::sync::OnceLock;

/// One frame of a symbolized stack. An address inside an inlined call yields several frames, the
/// inlined ones first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymFrame {
    /// The return address as captured.
    pub ip: usize,
    /// Demangled function name, without Rust's hash suffix.
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// File name of the executable or shared library holding `ip`.
    pub library: Option<String>,
    /// `ip`'s offset from the start of `library` (what `addr2line -e library` takes).
    pub offset: usize,
    pub inlined: bool,
}

impl SymFrame {
    /// `function` or, for an unresolved address, `library+0xoffset`.
    pub fn label(&self) -> String {
        match &self.function {
            Some(f) => f.clone(),
            None => match &self.library {
                Some(lib) => format!("{lib}+{:#x}", self.offset),
                None => format!("{:#x}", self.ip),
            },
        }
    }

    /// `file:line`, if debug info gave one.
    pub fn location(&self) -> Option<String> {
        let file = self.file.as_ref()?;
        Some(match self.line {
            Some(line) => format!("{file}:{line}"),
            None => file.clone(),
        })
    }
}

/// Resolves addresses with the `backtrace` crate (DWARF debug info, else the symbol table), caching
/// per address. Slow (the first address of each library loads its debug info); never on the
/// allocation path.
#[derive(Default)]
pub struct Symbolizer {
    cache: HashMap<usize, Vec<SymFrame>>,
}

impl Symbolizer {
    pub fn new() -> Symbolizer {
        Symbolizer::default()
    }

    /// The frames of one address, innermost (inlined) first.
    pub fn resolve(&mut self, ip: usize) -> &[SymFrame] {
        self.cache.entry(ip).or_insert_with(|| resolve_uncached(ip))
    }

    /// A captured stack, symbolized and trimmed to the caller's frames, at most `max` of them.
    /// Only its native part: Python frames (`python_frames::python_part`) are not addresses.
    pub fn stack(&mut self, raw: &[usize], max: usize) -> Vec<SymFrame> {
        let mut frames: Vec<SymFrame> = Vec::new();
        for &ip in super::python_frames::native_part(raw) {
            frames.extend_from_slice(self.resolve(ip));
        }
        let start = leading_own_frames(&frames);
        let mut end = frames
            .iter()
            .position(is_runtime_start)
            .unwrap_or(frames.len())
            .max(start);
        // Closures and `call_once` shims of the runtime below the caller's outermost frame.
        while end > start + 1 && is_neutral(&frames[end - 1]) {
            end -= 1;
        }
        let mut kept: Vec<SymFrame> = frames.drain(start..end).collect();
        kept.truncate(max);
        kept
    }
}

fn resolve_uncached(ip: usize) -> Vec<SymFrame> {
    let (library, base) = library_of(ip);
    let mut out: Vec<SymFrame> = Vec::new();
    // `resolve` looks the address up as `ip - 1`, inside the call instruction, as return addresses
    // need.
    backtrace::resolve(ip as *mut std::ffi::c_void, |sym| {
        out.push(SymFrame {
            ip,
            function: sym.name().map(|n| format!("{n:#}")),
            file: sym.filename().map(|p| shorten_path(&p.to_string_lossy())),
            line: sym.lineno(),
            library: library.clone(),
            offset: ip.wrapping_sub(base),
            inlined: true,
        });
    });
    match out.last_mut() {
        Some(outermost) => outermost.inlined = false,
        None => out.push(SymFrame {
            ip,
            function: None,
            file: None,
            line: None,
            library,
            offset: ip.wrapping_sub(base),
            inlined: false,
        }),
    }
    out
}

/// The library holding `ip` (file name only) and its load base, from `dladdr`.
fn library_of(ip: usize) -> (Option<String>, usize) {
    // SAFETY: dladdr only reads the loader's tables; `info` is a valid out-parameter, and
    // `dli_fname`, when non-NULL, is a NUL-terminated string owned by the loader.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(ip as *const libc::c_void, &mut info) == 0 || info.dli_fname.is_null() {
            return (None, 0);
        }
        let path = CStr::from_ptr(info.dli_fname).to_string_lossy();
        let name = path.rsplit('/').next().unwrap_or(&path).to_string();
        (Some(name), info.dli_fbase as usize)
    }
}

/// This crate's own library name when it is a shared object (libhbmalloc.so, LD_PRELOADed or
/// linked); `None` when it is linked into an executable (tests), where names decide instead.
fn own_shared_library() -> Option<&'static str> {
    static OWN: OnceLock<Option<String>> = OnceLock::new();
    OWN.get_or_init(|| {
        let (name, _) = library_of(own_shared_library as *const () as usize);
        name.filter(|n| n.contains(".so"))
    })
    .as_deref()
}

fn is_own(frame: &SymFrame) -> bool {
    if let (Some(own), Some(lib)) = (own_shared_library(), &frame.library) {
        if own == lib {
            return true;
        }
    }
    // The library's modules: a program built from this crate (the `hbmalloc` tool, the tests)
    // has functions under `hbmalloc::` too, and those are the caller's frames.
    const MODULES: [&str; 10] = [
        "backend", "config", "error", "ffi", "kernels", "kv", "pool", "runtime", "track", "tracked",
    ];
    // Linked into an executable and built with line tables only (the release profile), frames
    // carry short names ("on_alloc_owned"): then the module's source file says whose it is.
    if own_shared_library().is_none() {
        let in_module = |file: &str| {
            // The unwinder's frames too (the backtrace crate's sources, "backtrace-0.3.x/...").
            if file.starts_with("backtrace-") {
                return true;
            }
            let rest = file.strip_prefix("src/").unwrap_or("");
            // Not the C boundary's: its entry points (`hbm_kv_cache_create`, named without a
            // module path) are where a report's call site begins.
            MODULES.iter().filter(|&&m| m != "ffi").any(|m| {
                rest.strip_prefix(m)
                    .is_some_and(|r| r.starts_with('/') || r == ".rs")
            })
        };
        if frame.file.as_deref().is_some_and(in_module) {
            return true;
        }
    }
    let Some(f) = &frame.function else {
        return false;
    };
    let f = f.strip_prefix('<').unwrap_or(f);
    let ours = f.strip_prefix("hbmalloc::").is_some_and(|rest| {
        MODULES
            .iter()
            .any(|m| rest.strip_prefix(m).is_some_and(|r| r.starts_with("::")))
    });
    ours || f.starts_with("backtrace::") || f.starts_with("_Unwind_")
}

/// Library plumbing that may sit between the caller and hbmalloc (closures, catch_unwind, maps).
fn is_neutral(frame: &SymFrame) -> bool {
    let Some(f) = &frame.function else {
        return false;
    };
    let f = f.strip_prefix('<').unwrap_or(f);
    [
        "std::",
        "core::",
        "alloc::",
        "dashmap::",
        "once_cell::",
        "__rust_try",
    ]
    .iter()
    .any(|p| f.starts_with(p))
        || f.contains(" as core::ops::function::Fn")
}

/// How many leading frames to leave out: through the last hbmalloc frame of the leading run of
/// hbmalloc and library-plumbing frames.
fn leading_own_frames(frames: &[SymFrame]) -> usize {
    let mut last_own = None;
    for (i, frame) in frames.iter().enumerate() {
        if is_own(frame) {
            last_own = Some(i);
        } else if !is_neutral(frame) {
            break;
        }
    }
    last_own.map_or(0, |i| i + 1)
}

/// The first frame of the runtime's start-up code, where a stack stops being interesting.
fn is_runtime_start(frame: &SymFrame) -> bool {
    let Some(f) = &frame.function else {
        return false;
    };
    f.contains("__rust_begin_short_backtrace")
        || f.starts_with("std::rt::lang_start")
        || f.starts_with("__libc_start")
        || f == "_start"
        || f == "start_thread"
        || f == "__clone"
        || f == "__clone3"
        || f.starts_with("std::sys::") && f.contains("thread_start")
}

/// Paths under the current directory are shown relative to it; the Rust standard library's as
/// `rust/library/...`, a crate's from the cargo registry as `crate-1.2.3/src/...`.
fn shorten_path(path: &str) -> String {
    static CWD: OnceLock<Option<String>> = OnceLock::new();
    let cwd = CWD.get_or_init(|| {
        std::env::current_dir()
            .ok()
            .map(|d| format!("{}/", d.display()))
    });
    if let Some(rest) = cwd.as_deref().and_then(|cwd| path.strip_prefix(cwd)) {
        return rest.to_string();
    }
    if let Some(rest) = path.strip_prefix("/rustc/") {
        if let Some((_hash, rest)) = rest.split_once('/') {
            return format!("rust/{rest}");
        }
    }
    if let Some((_, rest)) = path.split_once("/.cargo/registry/src/") {
        if let Some((_index, rest)) = rest.split_once('/') {
            return rest.to_string();
        }
    }
    path.to_string()
}

/// One line per frame: `#N function at file:line (library)`, or a note when there are none.
pub fn format_frames(frames: &[SymFrame], indent: &str) -> String {
    let mut out = String::new();
    if frames.is_empty() {
        let _ = writeln!(out, "{indent}(no stack: backtrace:off, or none captured)");
    }
    for (i, frame) in frames.iter().enumerate() {
        let _ = write!(out, "{indent}#{i:<2} {}", frame.label());
        if let Some(loc) = frame.location() {
            let _ = write!(out, " at {loc}");
        }
        if frame.inlined {
            out.push_str(" (inlined)");
        }
        if let (Some(_), Some(lib)) = (&frame.function, &frame.library) {
            let _ = write!(out, " [{lib}]");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> SymFrame {
        SymFrame {
            ip: 1,
            function: Some(name.to_string()),
            file: None,
            line: None,
            library: Some("prog".to_string()),
            offset: 0,
            inlined: false,
        }
    }

    #[test]
    fn short_names_are_told_apart_by_their_source_file() {
        let at = |name: &str, file: &str| SymFrame {
            file: Some(file.to_string()),
            ..named(name)
        };
        // What a release build (line tables only) linked into a program gives.
        assert!(is_own(&at("on_alloc_owned", "src/track/registry.rs")));
        assert!(is_own(&at(
            "trace",
            "backtrace-0.3.77/src/backtrace/mod.rs"
        )));
        assert!(is_own(&at("alloc_cached", "src/pool/caching.rs")));
        assert!(is_own(&at("parse", "src/config.rs")));
        assert!(!is_own(&at("leak_a", "tests/track.rs")));
        assert!(!is_own(&at("main", "src/bin/hbmalloc.rs")));
        assert!(!is_own(&at("pooled", "src/pooling.rs")));
        assert!(!is_own(&at(
            "hbm_kv_cache_create",
            "src/ffi/kv_cache_api.rs"
        )));
    }

    #[test]
    fn trims_own_frames_and_runtime_start() {
        let frames: Vec<SymFrame> = [
            "hbmalloc::track::capture::capture_fp",
            "<hbmalloc::track::registry::Tracker>::on_alloc",
            "std::panicking::try",
            "hbmalloc::ffi::hook",
            "core::ops::function::FnOnce::call_once",
            "user::load_model",
            "hbmalloc::not_leading",
            "user::main",
            "std::rt::lang_start::{{closure}}",
            "main",
        ]
        .iter()
        .map(|n| named(n))
        .collect();
        assert_eq!(leading_own_frames(&frames), 4);
        let end = frames.iter().position(is_runtime_start).unwrap();
        assert_eq!(end, 8);
        let shim = "<fn() -> core::result::Result<(), alloc::string::String> as \
                    core::ops::function::FnOnce<()>>::call_once";
        assert!(is_neutral(&named(shim)));
        assert!(!is_neutral(&named("<user::Model as user::Load>::load")));
    }

    #[test]
    fn paths_are_shortened() {
        assert_eq!(
            shorten_path("/rustc/59807616e1/library/core/src/ops/function.rs"),
            "rust/library/core/src/ops/function.rs"
        );
        assert_eq!(
            shorten_path(
                "/root/.cargo/registry/src/index.crates.io-1949cf8c/dashmap-6.2.1/src/lib.rs"
            ),
            "dashmap-6.2.1/src/lib.rs"
        );
        let here = std::env::current_dir().unwrap().join("src/x.rs");
        assert_eq!(shorten_path(here.to_str().unwrap()), "src/x.rs");
        assert_eq!(shorten_path("/usr/include/x.h"), "/usr/include/x.h");
    }

    #[test]
    fn unresolved_frames_show_library_and_offset() {
        let mut f = named("x");
        f.function = None;
        f.offset = 0x1234;
        assert_eq!(f.label(), "prog+0x1234");
        assert!(format_frames(&[], "").contains("no stack"));
    }

    #[test]
    fn cpp_names_are_demangled() {
        // What a frame in libc10_cuda.so is called in its symbol table.
        let raw = b"_ZN3c104cuda20CUDACachingAllocator6Native22NativeCachingAllocator8allocateEm";
        let name = format!("{:#}", backtrace::SymbolName::new(raw));
        assert_eq!(
            name,
            "c10::cuda::CUDACachingAllocator::Native::NativeCachingAllocator::allocate(unsigned long)"
        );
    }
}
