//! The report at process exit, registered with `atexit`.
//!
//! At exit the handler makes no CUDA call (only the registry, which is host memory, is read), and
//! once it has begun no free of the allocator's does either (`exiting`); it uses
//! no thread-local with a destructor (those of the exiting thread have already run), never lets a
//! panic out, and writes stderr with `write(2)` directly, so nothing is left in a buffer. Other
//! threads may still be allocating and freeing: the snapshot takes each registry shard's lock in
//! turn, as at any other time.
//!
//! Handlers run in reverse order of registration; ours is registered when the first allocation is
//! recorded, so the handlers of libraries and interpreters set up after it (Python's `atexit`,
//! C++ static destructors of later-loaded libraries) run first and their frees are seen.

use super::registry::Tracker;
use crate::config::LeakReport;
use crate::process::init::InitCell;
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Once;

static INSTALL: Once = Once::new();
/// The pools' one-line summaries for `verbose:on`, given by the layer that owns the pools
/// (`runtime`), so that the tracker never reaches up to it.
static SUMMARIES: InitCell<fn() -> Vec<String>> = InitCell::new("track::summaries");

/// Sets what `verbose:on` prints at exit after the reports (the first call wins).
pub fn set_exit_summaries(lines: fn() -> Vec<String>) {
    let _ = SUMMARIES.set(lines);
}

pub use crate::process::{begin_exit, exiting};

/// Registers the exit report (idempotent). Called when the global tracker is first built.
pub fn install_exit_report() {
    INSTALL.call_once(|| {
        // SAFETY: `exit_handler` is an `extern "C" fn()` that never unwinds (it catches panics).
        let rc = unsafe { libc::atexit(exit_handler) };
        if rc != 0 {
            write_stderr(b"hbmalloc: could not register the leak report at exit\n");
        }
    });
}

extern "C" fn exit_handler() {
    begin_exit();
    let _ = std::panic::catch_unwind(|| {
        if crate::process::in_child() {
            return; // the parent's allocations are the parent's to report
        }
        if let Some(tracker) = super::global_if_started() {
            if let Some(trace) = tracker.trace() {
                trace.flush_at_exit();
            }
            tracker.write_exit_reports();
        }
        if crate::config::get().verbose {
            if let Some(summaries) = SUMMARIES.get() {
                for line in summaries() {
                    write_stderr(line.as_bytes());
                }
            }
        }
    });
}

impl Tracker {
    /// Writes every report its settings ask for: text (stderr or `report_path`), JSON, SVG,
    /// timeline (JSON and its chart). Errors are reported on stderr, never returned: this runs at exit.
    pub fn write_exit_reports(&self) {
        let s = self.settings();
        let wants_files = s.report_json.is_some() || s.report_svg.is_some() || s.timeline > 0;
        if s.leak_report == LeakReport::Off && !wants_files {
            return;
        }
        let report = self.leak_report();
        let mut text = match s.report_path {
            Some(_) => super::report_text::render(&report, s.leak_report),
            None => super::report_text::render_at_exit(
                &report,
                s.leak_report,
                crate::config::get().verbose,
            ),
        };
        // One line per file asked for, whatever the detail: where it went, or why it did not.
        let mut file = |path: &Path, what: &str, result: std::io::Result<()>, also: &str| {
            let path = absolute(path);
            let path = path.display();
            match result {
                Ok(()) => text.push_str(&format!("hbmalloc: {what} written to {path}{also}\n")),
                Err(e) => text.push_str(&format!("hbmalloc: could not write {what} {path}: {e}\n")),
            }
        };
        if let Some(path) = &s.report_json {
            let result = write_file(path, |w| super::report_json::write(&report, w));
            file(path, "JSON report", result, "");
        }
        if let Some(path) = &s.report_svg {
            let result = write_file(path, |w| super::report_svg::write(&report, w));
            file(path, "flame graph", result, "");
        }
        if s.timeline > 0 {
            let path = timeline_path(s.report_json.as_deref());
            let svg = timeline_svg_path(&path);
            match write_file(&path, |w| self.write_timeline_json(w)) {
                Ok(()) => {
                    let result = write_file(&svg, |w| self.write_timeline_svg(w));
                    let also = match &result {
                        Ok(()) => format!(" (chart: {})", absolute(&svg).display()),
                        Err(_) => String::new(),
                    };
                    match result {
                        Ok(()) => file(&path, "timeline", Ok(()), &also),
                        Err(e) => {
                            file(&path, "timeline", Ok(()), "");
                            file(&svg, "timeline chart", Err(e), "");
                        }
                    }
                }
                Err(e) => file(&path, "timeline", Err(e), ""),
            }
        }
        let written = match &s.report_path {
            Some(path) => std::fs::write(path, &text),
            None => {
                write_stderr(text.as_bytes());
                Ok(())
            }
        };
        if let (Err(e), Some(path)) = (written, &s.report_path) {
            let path = path.display();
            write_stderr(format!("hbmalloc: could not write {path}: {e}\n{text}").as_bytes());
        }
    }
}

/// `path` from the working directory, so a message says where a relative path went.
fn absolute(path: &Path) -> PathBuf {
    match std::env::current_dir() {
        Ok(cwd) if path.is_relative() => cwd.join(path),
        _ => path.to_path_buf(),
    }
}

/// `report.json` → `report.timeline.json`; without a JSON report, `hbmalloc-timeline.<pid>.json`.
fn timeline_path(report_json: Option<&Path>) -> PathBuf {
    match report_json {
        Some(p) => with_suffix(p, ".json", ".timeline.json"),
        None => format!("hbmalloc-timeline.{}.json", std::process::id()).into(),
    }
}

/// The chart beside the timeline's JSON: `x.timeline.json` → `x.timeline.svg`.
fn timeline_svg_path(json: &Path) -> PathBuf {
    with_suffix(json, ".json", ".svg")
}

/// `path` with its `old` ending replaced by `new` (or `new` appended), byte for byte.
fn with_suffix(path: &Path, old: &str, new: &str) -> PathBuf {
    let bytes = path.as_os_str().as_bytes();
    let stem = bytes.strip_suffix(old.as_bytes()).unwrap_or(bytes);
    PathBuf::from(OsStr::from_bytes(&[stem, new.as_bytes()].concat()))
}

fn write_file(
    path: &Path,
    body: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    body(&mut w)?;
    w.flush()
}

/// Writes all of `bytes` to file descriptor 2, retrying short writes and EINTR; gives up silently
/// on any other error (there is nowhere left to report it).
pub(crate) fn write_stderr(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is a valid readable buffer of the given length.
        let n = unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
        if n > 0 {
            bytes = &bytes[n as usize..];
        } else if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {
            continue;
        } else {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_file_names() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            timeline_path(Some(&p("/tmp/r.json"))),
            p("/tmp/r.timeline.json")
        );
        assert_eq!(timeline_path(Some(&p("/tmp/r"))), p("/tmp/r.timeline.json"));
        assert!(timeline_path(None)
            .to_string_lossy()
            .starts_with("hbmalloc-timeline."));
        assert_eq!(
            timeline_svg_path(&p("/tmp/r.timeline.json")),
            p("/tmp/r.timeline.svg")
        );
        // Not UTF-8: the bytes pass through.
        let latin1 = PathBuf::from(OsStr::from_bytes(b"/tmp/r\xe9.json"));
        assert_eq!(
            timeline_path(Some(&latin1)).as_os_str().as_bytes(),
            b"/tmp/r\xe9.timeline.json"
        );
    }
}
