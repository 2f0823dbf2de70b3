//! The diagnostic for a free the registry cannot match: a double free (with where the block was
//! allocated and first freed) or an unknown pointer (possibly inside a live block).
//!
//! What a double free can say comes from the live table: a free leaves the record in its slot,
//! marked freed, with the free's thread and stack, until an allocation homed in the same bucket
//! reuses the slot (`LiveTable::freed`). A block whose slot was reused since is reported as an
//! unknown pointer by the tracker; the allocator still calls it a double free when its pool
//! knows the block is free.

use super::registry::{Live, Tracker};
use super::stacks::StackId;
use super::symbolize::{format_frames, Symbolizer};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

/// Diagnostics printed per tracker before the rest are only counted.
const MAX_PRINTED: u64 = 100;
/// Frames printed per stack in a diagnostic.
const DIAG_FRAMES: usize = 12;

/// A block that was freed, as remembered for diagnostics.
#[derive(Clone, Copy, Debug)]
pub struct FreedRecord {
    pub ptr: usize,
    /// The allocation as it was when freed.
    pub live: Live,
    pub free_stack: StackId,
    pub free_thread: u32,
    /// Set when the tracker reads the clock on frees (with a timeline).
    pub free_time_ns: Option<u64>,
}

/// A free of a pointer that is not live, with what is known about it.
#[derive(Clone, Debug)]
pub struct BadFree {
    pub ptr: usize,
    /// Set when the pointer was freed before: this is a double free.
    pub previous: Option<FreedRecord>,
    /// Set when the pointer lies inside a live block (start, allocation).
    pub containing: Option<(usize, Live)>,
    /// Where the bad free happened.
    pub free_stack: StackId,
    pub thread: u32,
}

impl BadFree {
    pub fn is_double_free(&self) -> bool {
        self.previous.is_some()
    }

    /// The diagnostic: a headline, then the stacks that are known, each indented under a label.
    pub fn render(&self, tracker: &Tracker) -> String {
        let mut sym = Symbolizer::new();
        let mut out = String::new();
        let headline = match (&self.previous, &self.containing) {
            (Some(prev), _) => format!(
                "hbmalloc: double free of {:#x} ({} bytes, {}, {})",
                self.ptr,
                prev.live.size,
                prev.live.origin.name(),
                match prev.live.device {
                    crate::backend::HOST_DEVICE => "host".to_string(),
                    device => format!("device {device}"),
                }
            ),
            (None, Some((start, live))) => format!(
                "hbmalloc: free of unknown pointer {:#x}: it points {} bytes into the live block \
                 {:#x} ({} bytes)",
                self.ptr,
                self.ptr - start,
                start,
                live.size
            ),
            (None, None) => format!(
                "hbmalloc: free of unknown pointer {:#x} (never allocated here, or freed long ago)",
                self.ptr
            ),
        };
        let _ = writeln!(out, "{headline}");
        let mut section = |label: String, stack: StackId| {
            let _ = writeln!(out, "hbmalloc:   {label}:");
            let (frames, python) = match tracker.stacks().frames(stack) {
                Some(raw) => (
                    sym.stack(&raw, DIAG_FRAMES),
                    super::python_frames::python_part(&raw),
                ),
                None => (Vec::new(), Vec::new()),
            };
            // The allocation's Python stack, when it had one (frees record none).
            for (i, f) in python.iter().take(DIAG_FRAMES).enumerate() {
                let _ = writeln!(
                    out,
                    "      py#{i:<2} {} at {}:{}",
                    f.function, f.file, f.line
                );
            }
            out.push_str(&format_frames(&frames, "      "));
        };
        section(
            format!("this free (thread {})", self.thread),
            self.free_stack,
        );
        let allocation = self
            .previous
            .map(|p| p.live)
            .or(self.containing.map(|(_, live)| live));
        if let Some(live) = allocation {
            section(
                format!(
                    "allocated by thread {} at {:.3} s",
                    live.thread,
                    live.time_ns as f64 / 1e9
                ),
                live.stack,
            );
        }
        if let Some(prev) = &self.previous {
            let when = match prev.free_time_ns {
                Some(ns) => format!(" at {:.3} s", ns as f64 / 1e9),
                None => String::new(),
            };
            section(
                format!("first freed by thread {}{when}", prev.free_thread),
                prev.free_stack,
            );
        }
        out
    }
}

impl Tracker {
    /// Prints `bad`'s diagnostic to stderr as one write; after `MAX_PRINTED` of them, only a note
    /// that the rest are suppressed.
    pub fn print_bad_free(&self, bad: &BadFree) {
        let n = self.bad_frees.load(Ordering::Relaxed);
        let text = if n <= MAX_PRINTED {
            bad.render(self)
        } else if n == MAX_PRINTED + 1 {
            format!("hbmalloc: more than {MAX_PRINTED} bad frees; no more are printed\n")
        } else {
            return;
        };
        super::exit::write_stderr(text.as_bytes());
    }
}
