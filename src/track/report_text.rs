//! The text leak report: the summary line, then one block per call site, largest first.
//!
//! ```text
//! hbmalloc: LEAK SUMMARY: 3145728 bytes leaked in 3 allocations
//! hbmalloc: 2097152 bytes (2.0 MiB) in 2 allocations from cudaMalloc on device 0
//!       py#0  load at /srv/serve.py:41      (Python frames, when Python allocated)
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
        "hbmalloc: LEAK SUMMARY: {} bytes leaked in {}",
        s.bytes,
        count(s.count, "allocation", "allocations")
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
            let _ = writeln!(
                out,
                "hbmalloc: ... and {} more {}: {bytes} bytes in {} \
                 (report_json:FILE lists every one)",
                rest.len(),
                if rest.len() == 1 {
                    "call site"
                } else {
                    "call sites"
                },
                count(count_of(rest), "allocation", "allocations"),
            );
        }
        if !report.backtraces && s.count > 0 {
            out.push_str("hbmalloc: call sites unknown: backtrace:off in HBMALLOC_CONF\n");
        }
    }
    if report.bad_frees > 0 {
        let _ = writeln!(
            out,
            "hbmalloc: {}",
            if report.bad_frees == 1 {
                "1 free of an unknown or already freed pointer was rejected".to_string()
            } else {
                format!(
                    "{} frees of unknown or already freed pointers were rejected",
                    report.bad_frees
                )
            }
        );
    }
    if report.stacks_overflowed > 0 {
        let _ = writeln!(
            out,
            "hbmalloc: {} recorded without a stack: more than {} distinct stacks",
            count(
                report.stacks_overflowed,
                "allocation was",
                "allocations were"
            ),
            super::stacks::MAX_STACKS
        );
    }
    out
}

/// What the exit report prints on stderr: nothing when nothing leaked and no free was rejected
/// (as users of LD_PRELOAD tools expect), one line under `verbose:on`; else the full report.
pub fn render_at_exit(report: &LeakReport, detail: Detail, verbose: bool) -> String {
    let clean = report.summary.count == 0 && report.bad_frees == 0 && report.stacks_overflowed == 0;
    match (clean, verbose) {
        (false, _) => render(report, detail),
        (true, true) if detail != Detail::Off => "hbmalloc: no leaks\n".to_string(),
        (true, _) => String::new(),
    }
}

/// `n` and the noun in its number: "1 allocation", "2 allocations".
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn count_of(sites: &[Site]) -> u64 {
    sites.iter().map(|s| s.count).sum()
}

fn render_site(out: &mut String, site: &Site) {
    let _ = write!(
        out,
        "hbmalloc: {} bytes{} in {} from {}",
        site.bytes,
        if site.bytes >= 1024 {
            format!(" ({})", human_bytes(site.bytes))
        } else {
            String::new()
        },
        count(site.count, "allocation", "allocations"),
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
    // The Python stack first: under PyTorch it is what names the tensor; the native frames
    // under it end in the interpreter.
    for (i, f) in site.python.iter().enumerate() {
        let _ = writeln!(
            out,
            "      py#{i:<2} {} at {}:{}",
            f.function, f.file, f.line
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::registry::Live;
    use crate::track::{LeakSummary, Origin};

    fn site(count: u64, origin: Origin) -> Site {
        let live = Live {
            size: 256,
            epoch: 0,
            time_ns: 0,
            stream: 0,
            device: 0,
            thread: 1,
            stack: crate::track::stacks::StackId::NONE,
            origin,
            owner: 0,
        };
        Site {
            bytes: 256 * count,
            count,
            frames: Vec::new(),
            python: Vec::new(),
            origins: vec![origin],
            devices: vec![0],
            allocations: vec![(0x1000, live)],
        }
    }

    fn report(sites: Vec<Site>, bad_frees: u64, stacks_overflowed: u64) -> LeakReport {
        LeakReport {
            summary: LeakSummary {
                bytes: sites.iter().map(|s| s.bytes).sum(),
                count: count_of(&sites),
            },
            sites,
            backtraces: true,
            bad_frees,
            stacks_overflowed,
        }
    }

    #[test]
    fn one_of_each_is_singular() {
        let text = render(&report(vec![site(1, Origin::HbmAlloc)], 1, 1), Detail::Full);
        assert!(
            text.contains("LEAK SUMMARY: 256 bytes leaked in 1 allocation\n"),
            "{text}"
        );
        assert!(
            text.contains("256 bytes in 1 allocation from hbm_device_alloc on device 0"),
            "{text}"
        );
        assert!(
            text.contains("hbmalloc: 1 free of an unknown or already freed pointer was rejected"),
            "{text}"
        );
        assert!(
            text.contains("hbmalloc: 1 allocation was recorded without a stack"),
            "{text}"
        );
    }

    #[test]
    fn many_are_plural() {
        let text = render(&report(vec![site(2, Origin::Pool)], 24, 3), Detail::Full);
        assert!(
            text.contains("LEAK SUMMARY: 512 bytes leaked in 2 allocations\n"),
            "{text}"
        );
        assert!(
            text.contains("512 bytes in 2 allocations from hbm_pool_alloc on device 0"),
            "{text}"
        );
        assert!(
            text.contains("hbmalloc: 24 frees of unknown or already freed pointers were rejected"),
            "{text}"
        );
        assert!(
            text.contains("hbmalloc: 3 allocations were recorded without a stack"),
            "{text}"
        );
    }

    #[test]
    fn sites_past_the_limit_are_counted_in_number() {
        let sites: Vec<Site> = (0..=MAX_TEXT_SITES as u64)
            .map(|_| site(1, Origin::CudaMalloc))
            .collect();
        let text = render(&report(sites, 0, 0), Detail::Full);
        assert!(
            text.contains("... and 1 more call site: 256 bytes in 1 allocation "),
            "{text}"
        );
    }

    #[test]
    fn a_clean_exit_says_nothing_unless_verbose() {
        let clean = report(Vec::new(), 0, 0);
        assert_eq!(render_at_exit(&clean, Detail::Full, false), "");
        assert_eq!(
            render_at_exit(&clean, Detail::Full, true),
            "hbmalloc: no leaks\n"
        );
        assert_eq!(render_at_exit(&clean, Detail::Off, true), "");
        let leaked = report(vec![site(1, Origin::CudaMalloc)], 0, 0);
        assert!(render_at_exit(&leaked, Detail::Summary, false).contains("LEAK SUMMARY"));
        let bad_free = report(Vec::new(), 1, 0);
        assert!(render_at_exit(&bad_free, Detail::Full, false).contains("was rejected"));
    }
}
