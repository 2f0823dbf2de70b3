//! Recently freed blocks, and the diagnostic for a free the registry cannot match.
//!
//! Every successful free leaves a record (the block, its allocation stack, the free stack) in a
//! bounded ring, so that a later double free can say where the block came from and where it was
//! first freed. The ring is sharded by thread: a free locks only its own thread's shard, which no
//! other thread touches except to search it on the cold diagnostic path.
//!
//! The record is best-effort: a free that finds its shard locked (a diagnostic searching it, or a
//! thread sharing the shard past `SHARDS` threads) skips its record rather than wait, so the hot
//! path never blocks on it. Such a block's double free is then reported as an unknown pointer.

use super::registry::{Live, Tracker};
use super::stacks::StackId;
use super::symbolize::{format_frames, Symbolizer};
use crate::sync::SpinLock;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

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
    /// Set when the tracker reads the clock on frees (with a timeline).
    pub free_time_ns: Option<u64>,
}

#[derive(Default)]
struct Shard {
    records: Vec<FreedRecord>,
    next: usize,
}

/// A shard on cache lines of its own (each is written by one thread). A free that finds it held
/// skips its record (`try_lock`), so the hot path never waits on a diagnostic.
#[repr(align(128))]
#[derive(Default)]
struct ShardCell(SpinLock<Shard>);

pub(super) struct FreedRing {
    shards: Box<[ShardCell]>,
}

impl FreedRing {
    pub fn new() -> FreedRing {
        FreedRing {
            shards: (0..SHARDS).map(|_| ShardCell::default()).collect(),
        }
    }

    /// Remembers `record` unless the thread's shard is busy (see the module doc).
    #[inline]
    pub fn push(&self, thread_slot: u32, record: FreedRecord) {
        let Some(mut shard) = self.shards[thread_slot as usize % SHARDS].0.try_lock() else {
            return;
        };
        if shard.records.len() < PER_SHARD {
            shard.records.push(record);
        } else {
            let at = shard.next;
            shard.records[at] = record;
        }
        shard.next = (shard.next + 1) % PER_SHARD;
    }

    /// The most recent free of `ptr` still remembered. Within a shard, ring order says which is
    /// the latest. Across shards (the block was freed by different threads), the latest allocation
    /// wins, by its coarse allocation time: frees of the same address by two threads within one
    /// clock tick may be told apart wrongly, which only changes which earlier free is shown.
    pub fn find(&self, ptr: usize) -> Option<FreedRecord> {
        self.shards
            .iter()
            .filter_map(|s| {
                let shard = s.0.lock();
                let (newer, older) = shard.records.split_at(shard.next.min(shard.records.len()));
                // Newest first: the records before `next`, backwards, then the wrapped-around tail.
                newer
                    .iter()
                    .rev()
                    .chain(older.iter().rev())
                    .find(|r| r.ptr == ptr)
                    .copied()
            })
            .max_by_key(|r| (r.live.time_ns, r.free_time_ns))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::Origin;

    fn record(ptr: usize, time_ns: u64, free_thread: u32) -> FreedRecord {
        let live = Live {
            size: 1,
            epoch: 0,
            time_ns,
            stream: 0,
            device: 0,
            thread: 1,
            stack: StackId::NONE,
            origin: Origin::HbmAlloc,
        };
        FreedRecord {
            ptr,
            live,
            free_stack: StackId::NONE,
            free_thread,
            free_time_ns: None,
        }
    }

    #[test]
    fn find_returns_the_latest_free_after_wrapping() {
        let ring = FreedRing::new();
        // Same coarse time throughout: ring order alone must pick the latest.
        for i in 0..(PER_SHARD + 10) as u32 {
            ring.push(3, record(0xa000 + (i as usize % 5) * 0x100, 7, i));
        }
        let last = (PER_SHARD + 10 - 1) as u32;
        assert_eq!(
            ring.find(0xa000 + (last as usize % 5) * 0x100)
                .unwrap()
                .free_thread,
            last
        );
        assert!(ring.find(0xb000).is_none());
    }

    #[test]
    fn find_prefers_the_later_allocation_across_threads() {
        let ring = FreedRing::new();
        ring.push(1, record(0xa000, 200, 1));
        ring.push(2, record(0xa000, 100, 2));
        assert_eq!(ring.find(0xa000).unwrap().free_thread, 1);
    }

    #[test]
    fn a_busy_shard_skips_the_record() {
        let ring = FreedRing::new();
        let held = ring.shards[5].0.lock();
        ring.push(5, record(0xa000, 1, 1));
        drop(held);
        assert!(ring.find(0xa000).is_none(), "skipped, not waited for");
        ring.push(5, record(0xa000, 1, 1));
        assert!(ring.find(0xa000).is_some());
    }
}
