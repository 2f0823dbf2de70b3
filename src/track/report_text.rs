//! The text leak report: the summary line, then one block per call site, largest first.
//!
//! ```text
//! hbmalloc: LEAK SUMMARY: 3145728 bytes leaked in 3 allocations
//! hbmalloc: 2097152 bytes (2.0 MiB) in 2 allocations from cudaMalloc on device 0
//!       #0  app::load_weights at src/model.rs:41 [app]
//!       #1  app::main at src/main.rs:12 [app]
//!       largest: 0x7f3a00000000, 1048576 bytes, thread 4242, 0.014 s after start
//! ```

use super::registry::Tracker;
use super::report::{human_bytes, LeakReport, Site};
use super::symbolize::format_frames;
use crate::config::LeakReport as Detail;
use std::fmt::Write as _;

/// Call sites printed in full; the rest are summed on one line (the JSON report lists them all).
const MAX_TEXT_SITES: usize = 100;

/// Renders `report`; `Detail::Off` gives an empty string, `Summary` the summary line only.
pub fn render(report: &LeakReport, detail: Detail) -> String {
    let mut out = String::new();
    if detail == Detail::Off {
        return out;
    }
    let s = report.summary;
    let _ = write!(
        out,
        "hbmalloc: LEAK SUMMARY: {} bytes leaked in {} allocations",
        s.bytes, s.count
    );
    if s.bytes >= 1024 {
        let _ = write!(out, " ({})", human_bytes(s.bytes));
    }
    out.push('\n');
    if detail == Detail::Full {
        for site in report.sites.iter().take(MAX_TEXT_SITES) {
            render_site(&mut out, site);
        }
        if report.sites.len() > MAX_TEXT_SITES {
            let rest = &report.sites[MAX_TEXT_SITES..];
            let bytes: u64 = rest.iter().map(|s| s.bytes).sum();
            let count: u64 = rest.iter().map(|s| s.count).sum();
            let _ = writeln!(
                out,
                "hbmalloc: ... and {} more call sites: {bytes} bytes in {count} allocations \
                 (report_json:FILE lists every one)",
                rest.len()
            );
        }
        if !report.backtraces && s.count > 0 {
            out.push_str("hbmalloc: call sites unknown: backtrace:off in HBMALLOC_CONF\n");
        }
    }
    if report.bad_frees > 0 {
        let _ = writeln!(
            out,
            "hbmalloc: {} frees of unknown or already freed pointers were rejected",
            report.bad_frees
        );
    }
    if report.stacks_overflowed > 0 {
        let _ = writeln!(
            out,
            "hbmalloc: {} allocations were recorded without a stack: more than {} distinct stacks",
            report.stacks_overflowed,
            super::stacks::MAX_STACKS
        );
    }
    out
}

fn render_site(out: &mut String, site: &Site) {
    let _ = write!(
        out,
        "hbmalloc: {} bytes{} in {} allocation{} from {}",
        site.bytes,
        if site.bytes >= 1024 {
            format!(" ({})", human_bytes(site.bytes))
        } else {
            String::new()
        },
        site.count,
        if site.count == 1 { "" } else { "s" },
        site.origins
            .iter()
            .map(|o| o.name())
            .collect::<Vec<_>>()
            .join(", "),
    );
    // Pinned host memory is recorded on device -1, CUDA's `cudaCpuDeviceId`.
    let host = site.devices.contains(&crate::backend::HOST_DEVICE);
    let devices: Vec<String> = site
        .devices
        .iter()
        .filter(|d| **d != crate::backend::HOST_DEVICE)
        .map(i32::to_string)
        .collect();
    let _ = match (devices.len(), host) {
        (0, _) => writeln!(out, " on the host"),
        (n, _) => writeln!(
            out,
            " on device{} {}{}",
            if n == 1 { "" } else { "s" },
            devices.join(", "),
            if host { " and the host" } else { "" }
        ),
    };
    out.push_str(&format_frames(&site.frames, "      "));
    if let Some((ptr, live)) = site.allocations.first() {
        let _ = writeln!(
            out,
            "      {}: {ptr:#x}, {} bytes, stream {:#x}, thread {}, {:.3} s after start",
            if site.count == 1 { "block" } else { "largest" },
            live.size,
            live.stream,
            live.thread,
            live.time_ns as f64 / 1e9
        );
    }
}

impl Tracker {
    /// The text report of every live allocation at the given detail.
    pub fn render_text_report(&self, detail: Detail) -> String {
        render(&self.leak_report(), detail)
    }

    /// Writes the text report to `path` (created or truncated), or to stderr for `None`.
    pub fn write_text_report(&self, path: Option<&str>, detail: Detail) -> std::io::Result<()> {
        let text = self.render_text_report(detail);
        match path {
            Some(path) => std::fs::write(path, text),
            None => {
                super::exit::write_stderr(text.as_bytes());
                Ok(())
            }
        }
    }
}
