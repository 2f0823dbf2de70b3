//! The leak report's model: live allocations grouped by call site, largest first, symbolized.
//! The text, JSON and SVG writers all render one `LeakReport`, so they always agree.

use super::python_frames::{self, PyFrame};
use super::registry::{Live, Tracker};
use super::stacks::StackId;
use super::symbolize::{SymFrame, Symbolizer};
use super::{LeakSummary, Origin};
use std::collections::HashMap;

/// Live allocations that share a call site (the same frames once hbmalloc's own are left out).
#[derive(Clone, Debug)]
pub struct Site {
    pub bytes: u64,
    pub count: u64,
    /// Innermost first; empty for allocations recorded without a stack.
    pub frames: Vec<SymFrame>,
    /// The Python stack of the allocating thread, innermost first; empty when it was not
    /// running Python with the GIL held (`python_frames`).
    pub python: Vec<PyFrame>,
    /// Distinct entry points and devices of the site's allocations, sorted.
    pub origins: Vec<Origin>,
    pub devices: Vec<i32>,
    /// The allocations (pointer, record), largest first.
    pub allocations: Vec<(usize, Live)>,
}

/// Everything a leak report says.
#[derive(Clone, Debug)]
pub struct LeakReport {
    pub summary: LeakSummary,
    /// Largest first (bytes, then count).
    pub sites: Vec<Site>,
    /// Whether stacks were being captured.
    pub backtraces: bool,
    /// Frees the tracker rejected (unknown pointers, double frees).
    pub bad_frees: u64,
    /// Allocations recorded without a stack because the stack table was full.
    pub stacks_overflowed: u64,
}

impl Tracker {
    /// The report of every allocation still live.
    pub fn leak_report(&self) -> LeakReport {
        self.leak_report_since(0)
    }

    /// The report of live allocations made after `mark` (a `checkpoint`).
    pub fn leak_report_since(&self, mark: u64) -> LeakReport {
        let mut by_stack: HashMap<StackId, Vec<(usize, Live)>> = HashMap::new();
        let mut summary = LeakSummary::default();
        for (ptr, live) in self.snapshot() {
            if live.epoch >= mark {
                summary.bytes += live.size;
                summary.count += 1;
                by_stack.entry(live.stack).or_default().push((ptr, live));
            }
        }

        // Raw stacks that differ only inside hbmalloc (a different pool path to the same caller),
        // or only in which copy of an unrolled loop called, are one call site to the user: merge
        // by the source position of the frames shown (by address where there is no symbol).
        type FrameKey = (Option<String>, Option<String>, Option<u32>, usize);
        let mut sym = Symbolizer::new();
        let mut by_frames: HashMap<Vec<FrameKey>, Site> = HashMap::new();
        for (stack, allocations) in by_stack {
            let (frames, python) = match self.stacks().frames(stack) {
                Some(raw) => (
                    sym.stack(&raw, self.settings().max_frames),
                    python_frames::python_part(&raw),
                ),
                None => (Vec::new(), Vec::new()),
            };
            // The innermost frame by function alone: the copies of an unrolled loop's call map
            // to neighbouring lines there.
            // Python frames are part of the site: one native path reached from two Python lines
            // is two call sites to the user.
            let key = frames
                .iter()
                .enumerate()
                .map(|(i, f)| match (&f.function, f.line) {
                    (Some(_), Some(_)) if i == 0 => (f.function.clone(), f.file.clone(), None, 0),
                    (Some(_), Some(_)) => (f.function.clone(), f.file.clone(), f.line, 0),
                    _ => (f.function.clone(), None, None, f.ip),
                })
                .chain(python.iter().map(|p| {
                    (
                        Some(p.function.to_string()),
                        Some(p.file.to_string()),
                        Some(p.line),
                        usize::MAX,
                    )
                }))
                .collect();
            let site = by_frames.entry(key).or_insert_with(|| Site {
                bytes: 0,
                count: 0,
                frames,
                python,
                origins: Vec::new(),
                devices: Vec::new(),
                allocations: Vec::new(),
            });
            for (ptr, live) in allocations {
                site.bytes += live.size;
                site.count += 1;
                site.origins.push(live.origin);
                site.devices.push(live.device);
                site.allocations.push((ptr, live));
            }
        }

        let mut sites: Vec<Site> = by_frames.into_values().collect();
        for site in &mut sites {
            site.origins.sort();
            site.origins.dedup();
            site.devices.sort();
            site.devices.dedup();
            site.allocations
                .sort_by_key(|(ptr, live)| (std::cmp::Reverse(live.size), live.time_ns, *ptr));
        }
        sites.sort_by(|a, b| {
            (b.bytes, b.count).cmp(&(a.bytes, a.count)).then_with(|| {
                let first = |s: &Site| (s.allocations[0].1.time_ns, s.allocations[0].0);
                first(a).cmp(&first(b))
            })
        });
        LeakReport {
            summary,
            sites,
            backtraces: self.settings().backtrace,
            bad_frees: self.bad_free_count(),
            stacks_overflowed: self.stacks().overflowed(),
        }
    }
}

pub use crate::units::human_bytes;

#[cfg(test)]
mod tests {
    use super::*;

    /// A leaked block whose stack carries Python frames: every report names the Python line,
    /// and two Python lines over one native path are two call sites.
    #[test]
    fn python_frames_reach_every_report() {
        use crate::track::python_frames::{test_word, MARK};
        let t = Tracker::new(crate::track::Settings::default());
        let here = python_frames_reach_every_report as fn() as usize;
        let inner = test_word("/srv/train.py", "Trainer.make_cache", 42);
        let outer = test_word("/srv/train.py", "<module>", 90);
        let other = test_word("/srv/train.py", "Trainer.make_cache", 43);
        let a = t.stacks().intern(&[here, MARK, inner, outer]);
        let b = t.stacks().intern(&[here, MARK, other, outer]);
        let live = |size, stack| Live {
            size,
            epoch: 0,
            time_ns: 0,
            stream: 0,
            owner: 0,
            device: 0,
            thread: 1,
            stack,
            origin: Origin::TorchMalloc,
        };
        t.restore(0x7000_0000, live(3 << 20, a));
        t.restore(0x7100_0000, live(1 << 20, b));

        let report = t.leak_report();
        assert_eq!(report.sites.len(), 2, "two Python lines, two sites");
        let top = &report.sites[0];
        let lines: Vec<_> = top.python.iter().map(|f| (&*f.function, f.line)).collect();
        assert_eq!(lines, [("Trainer.make_cache", 42), ("<module>", 90)]);
        assert!(
            top.frames.iter().all(|f| f.ip != MARK),
            "the mark and Python words are not symbolized as addresses"
        );

        let text = super::super::report_text::render(&report, crate::config::LeakReport::Full);
        assert!(
            text.contains("py#0  Trainer.make_cache at /srv/train.py:42\n"),
            "{text}"
        );
        assert!(
            text.contains("py#1  <module> at /srv/train.py:90"),
            "{text}"
        );

        let mut json = Vec::new();
        super::super::report_json::write(&report, &mut json).unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let py = &doc["sites"][0]["python_frames"];
        assert_eq!(py[0]["file"], "/srv/train.py");
        assert_eq!(py[0]["function"], "Trainer.make_cache");
        assert_eq!(py[0]["line"], 42);
        assert_eq!(py[1]["line"], 90);

        let folded = super::super::report_svg::folded_lines(&report);
        assert!(
            folded[0]
                .starts_with("<module>_[/srv/train.py:90];Trainer.make_cache_[/srv/train.py:42];"),
            "outermost Python frame first: {}",
            folded[0]
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0 bytes");
        assert_eq!(human_bytes(1023), "1023 bytes");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
