//! Recently freed blocks, and the diagnostic for a free the registry cannot match.
//!
//! Every successful free leaves a record (the block, its allocation stack, the free stack) in a
//! bounded ring, so that a later double free can say where the block came from and where it was
//! first freed. The ring is sharded by thread: a free locks only its own thread's shard, which no
//! other thread touches except to search it on the cold diagnostic path.

use super::registry::{Live, Tracker};
use super::stacks::StackId;
use super::symbolize::{format_frames, Symbolizer};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

const SHARDS: usize = 64;
/// Records per shard: 64 x 256 = 16384 recently freed blocks remembered in all.
const PER_SHARD: usize = 256;
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
    pub free_time_ns: u64,
}

#[derive(Default)]
struct Shard {
    records: Vec<FreedRecord>,
    next: usize,
}

pub(super) struct FreedRing {
    shards: Box<[Mutex<Shard>]>,
}

impl FreedRing {
    pub fn new() -> FreedRing {
        FreedRing {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    #[inline]
    pub fn push(&self, thread_slot: u32, record: FreedRecord) {
        let mut shard = lock(&self.shards[thread_slot as usize % SHARDS]);
        if shard.records.len() < PER_SHARD {
            shard.records.push(record);
        } else {
            let at = shard.next;
            shard.records[at] = record;
        }
        shard.next = (shard.next + 1) % PER_SHARD;
    }

    /// The most recent free of `ptr` still remembered: the one of the latest allocation (a block
    /// is freed at most once per allocation, so the allocation's sequence number orders frees).
    pub fn find(&self, ptr: usize) -> Option<FreedRecord> {
        self.shards
            .iter()
            .filter_map(|s| {
                lock(s)
                    .records
                    .iter()
                    .filter(|r| r.ptr == ptr)
                    .max_by_key(|r| r.live.seq)
                    .copied()
            })
            .max_by_key(|r| r.live.seq)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while a shard is held; if something did, the records are still plain data.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
                "hbmalloc: double free of {:#x} ({} bytes, {}, device {})",
                self.ptr,
                prev.live.size,
                prev.live.origin.name(),
                prev.live.device
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
            let frames = match tracker.stacks().frames(stack) {
                Some(raw) => sym.stack(&raw, DIAG_FRAMES),
                None => Vec::new(),
            };
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
            section(
                format!(
                    "first freed by thread {} at {:.3} s",
                    prev.free_thread,
                    prev.free_time_ns as f64 / 1e9
                ),
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
