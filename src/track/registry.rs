//! The `Tracker`: the registry of live allocations.
//!
//! Cost (BENCHMARKS.md): one insert and one remove in the `LiveTable` per alloc+free (a
//! compare-and-swap and a store each; the free leaves the record in place, marked freed, for a
//! later double free's diagnostic), a plain load of the checkpoint epoch and one coarse clock
//! read (on the allocation). With backtraces, a frame-pointer walk and a per-thread interning
//! cache hit on each side. No global lock and no read-modify-write of a shared atomic: the live
//! table's lines are touched only by the threads whose addresses they hold, the stack table is
//! sharded, and the epoch is only written by `checkpoint`.

use super::capture::{self, ReentryGuard};
use super::freed::{BadFree, FreedRecord};
use super::live_table::{FreeMark, LiveTable};
use super::python_frames;
use super::stacks::{StackId, StackTable};
use super::timeline::{EventKind, Timeline};
use super::trace::{Op, Trace, TraceEvent};
use super::{LeakSummary, Origin, Settings};
use crate::config::PythonFrames;
use std::sync::atomic::{AtomicU64, Ordering};

/// One live allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Live {
    pub size: u64,
    /// The tracker's epoch when the allocation was recorded: how many `checkpoint`s came before.
    pub epoch: u64,
    /// Nanoseconds since the tracker was created.
    pub time_ns: u64,
    pub stream: usize,
    /// The pool object the block belongs to, for memory whose free must name its pool (a scratch
    /// pool's address, a KV cache's handle); 0 for the process-wide pools.
    pub owner: usize,
    pub device: i32,
    /// Kernel thread id of the allocating thread.
    pub thread: u32,
    pub stack: StackId,
    pub origin: Origin,
}

/// Why `Tracker::take` left a record where it was (or found none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// A live block this free is not for (another entry point's, another pool's, another
    /// size): its record, as it still stands.
    Other(Live),
    /// No live block starts at the pointer. Nothing is counted yet: the caller may still find
    /// an owner for it (the runtime), or `reject` it.
    NotLive,
}

/// Capture buffer kept on the stack (native frames, the Python mark and Python frames at the
/// default `max_frames`); deeper settings use the heap.
const INLINE_FRAMES: usize = 80;

/// Whether a capture also records the Python stack: allocations do, frees do not (the free side
/// of a pair stays as cheap as without Python).
#[derive(Clone, Copy, PartialEq, Eq)]
enum WithPython {
    /// Only if the thread holds the GIL, or also taking it back (`python_frames::Acquire`).
    Yes(python_frames::Acquire),
    No,
}
/// Frames captured beyond `max_frames`, for the tracker's and the allocator's own frames that
/// the report leaves out.
const OWN_FRAMES_SLACK: usize = 8;

pub struct Tracker {
    settings: Settings,
    live: LiveTable,
    stacks: StackTable,
    /// Bumped by `checkpoint` only; allocations load it. Read-mostly, so its cache line stays
    /// shared by every core (a per-allocation counter here was the pair's one contended line).
    epoch: AtomicU64,
    timeline: Option<Timeline>,
    trace: Option<Trace>,
    /// CLOCK_MONOTONIC when the tracker was created; times are relative to it.
    start_ns: u64,
    pub(super) bad_frees: AtomicU64,
}

impl Tracker {
    /// In a child after `fork` (see `LiveTable::after_fork_child`).
    pub fn after_fork_child(&self) {
        self.live.after_fork_child();
    }

    /// The tracker's one lock, for `fork` (`LiveTable::lock_for_fork`).
    pub fn lock_for_fork(&self) -> super::live_table::OverflowLock<'_> {
        self.live.lock_for_fork()
    }

    pub fn new(settings: Settings) -> Tracker {
        Tracker {
            live: LiveTable::default(),
            stacks: StackTable::new(),
            epoch: AtomicU64::new(0),
            timeline: (settings.timeline > 0).then(|| Timeline::new(settings.timeline)),
            trace: settings.trace.as_deref().and_then(|path| {
                Trace::create(path)
                    .map_err(|e| {
                        eprintln!("hbmalloc: trace file {}: {e}; no trace", path.display())
                    })
                    .ok()
            }),
            start_ns: monotonic_ns(false),
            bad_frees: AtomicU64::new(0),
            settings,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn stacks(&self) -> &StackTable {
        &self.stacks
    }

    pub fn timeline(&self) -> Option<&Timeline> {
        self.timeline.as_ref()
    }

    /// Records a live allocation. A pointer already live is replaced (the old record was a free
    /// this tracker never saw).
    #[inline]
    pub fn on_alloc(&self, ptr: usize, size: usize, device: i32, stream: usize, origin: Origin) {
        self.on_alloc_owned(ptr, size, device, stream, origin, 0);
    }

    /// As `on_alloc`, for a block of the pool object `owner` (see `Live::owner`).
    #[inline]
    pub fn on_alloc_owned(
        &self,
        ptr: usize,
        size: usize,
        device: i32,
        stream: usize,
        origin: Origin,
        owner: usize,
    ) {
        // Everything that can fail or take long (the stack walk) happens before the slot is
        // held: a panic while holding it would leave the address locked for good.
        let stack = self.capture_stack(self.python_for(origin));
        let thread = capture::thread_id();
        let time_ns = self.now_ns();
        // Relaxed: an allocation ordered after a `checkpoint` (same thread, or synchronized with
        // it) reads the new epoch by coherence; one racing with it may read either.
        let epoch = self.epoch.load(Ordering::Relaxed);
        self.live.insert_with(ptr, || Live {
            size: size as u64,
            epoch,
            time_ns,
            stream,
            owner,
            device,
            thread,
            stack,
            origin,
        });
        if let Some(timeline) = &self.timeline {
            timeline.push(time_ns, EventKind::Alloc, ptr, size as u64, device, stack);
        }
        if let Some(trace) = &self.trace {
            trace.record(&TraceEvent {
                time_ns,
                thread,
                op: Op::Alloc,
                ptr,
                size: size as u64,
                stream,
                device,
            });
        }
    }

    /// The `trace:FILE` writer, when one is open.
    pub fn trace(&self) -> Option<&Trace> {
        self.trace.as_ref()
    }

    /// Puts back, as it was, a record that `take` removed for a free that then did not happen
    /// (the runtime refused a forwarded free, a pool refused the block).
    #[cold]
    pub fn restore(&self, ptr: usize, live: Live) {
        self.live.insert(ptr, live);
    }

    /// Changes the live record at `ptr` in place (a KV cache's size as it grows); false if
    /// `ptr` is not live.
    pub fn update(&self, ptr: usize, f: impl FnOnce(&mut Live)) -> bool {
        self.live.update(ptr, f)
    }

    /// Records a free. `Err` for a pointer that is not live; the error describes what is known of
    /// it (`print_bad_free` / `BadFree::render` turn it into the diagnostic).
    #[inline]
    pub fn on_free(&self, ptr: usize) -> Result<Live, Box<BadFree>> {
        self.on_free_if(ptr, |_| true)
    }

    /// As `on_free`, for an allocation whose record `accept`s; any other is left live and the
    /// free is reported as bad.
    pub fn on_free_if(
        &self,
        ptr: usize,
        accept: impl FnOnce(&Live) -> bool,
    ) -> Result<Live, Box<BadFree>> {
        self.on_free_map(ptr, accept, |live| *live)
    }

    /// As `on_free_if`, returning `map` of the record rather than a copy of it. Any refusal is
    /// a bad free here; the allocator's entry points use `take`, which tells them apart.
    #[inline]
    pub fn on_free_map<R>(
        &self,
        ptr: usize,
        accept: impl FnOnce(&Live) -> bool,
        map: impl FnOnce(&Live) -> R,
    ) -> Result<R, Box<BadFree>> {
        self.take(ptr, accept, map).map_err(|_| self.reject(ptr))
    }

    /// Removes the record at `ptr` if `accept`s it, and returns `map` of it (the free path needs
    /// two fields; see `LiveTable::remove_with`). One look-up: a record refused is left exactly
    /// as it was (`Refused::Other`), and a pointer with no record costs nothing more
    /// (`Refused::NotLive`): neither is counted or diagnosed until the caller `reject`s it.
    ///
    /// The free's stack is captured before the record is held, so a panic in the walk leaves
    /// the table as it was.
    #[inline]
    pub fn take<R>(
        &self,
        ptr: usize,
        accept: impl FnOnce(&Live) -> bool,
        map: impl FnOnce(&Live) -> R,
    ) -> Result<R, Refused> {
        let mark = self.free_mark();
        let mut other = None;
        let mut event = None;
        let want_event = self.timeline.is_some() || self.trace.is_some();
        let taken = self.live.remove_with(ptr, |live| {
            if !accept(live) {
                other = Some(*live);
                return None;
            }
            if want_event {
                event = Some((live.size, live.device, live.stack, live.stream));
            }
            Some((map(live), mark))
        });
        if let (Some(timeline), Some((size, device, stack, _)), Some(time_ns)) =
            (&self.timeline, event, mark.time_ns)
        {
            timeline.push(time_ns, EventKind::Free, ptr, size, device, stack);
        }
        if let (Some(trace), Some((size, device, _, stream))) = (&self.trace, event) {
            trace.record(&TraceEvent {
                time_ns: mark.time_ns.unwrap_or_else(|| self.now_ns()),
                thread: mark.thread,
                op: Op::Free,
                ptr,
                size,
                stream,
                device,
            });
        }
        match (taken, other) {
            (Some(r), _) => Ok(r),
            (None, Some(live)) => Err(Refused::Other(live)),
            (None, None) => Err(Refused::NotLive),
        }
    }

    /// What the freed slot keeps for a later double free's diagnostic.
    #[inline]
    fn free_mark(&self) -> FreeMark {
        let stack = self.capture_stack(WithPython::No);
        let thread = capture::thread_id();
        // Only the timeline needs the time of a free; the double-free diagnostic shows it when
        // known. Without a timeline the pair reads the clock once, on the allocation.
        let time_ns = self.timeline.as_ref().map(|_| self.now_ns());
        FreeMark {
            stack,
            thread,
            time_ns,
        }
    }

    /// Counts a free that nothing owns as rejected and gathers what its diagnostic says: where
    /// the block was allocated and first freed (a double free), or the live block the pointer
    /// is inside of (cold: scans the registry).
    #[cold]
    #[inline(never)]
    pub fn reject(&self, ptr: usize) -> Box<BadFree> {
        self.bad_free(ptr)
    }

    #[cold]
    #[inline(never)]
    fn bad_free(&self, ptr: usize) -> Box<BadFree> {
        self.bad_frees.fetch_add(1, Ordering::Relaxed);
        let free_stack = self.capture_stack(WithPython::No);
        let thread = capture::thread_id();
        let previous = self.live.freed(ptr).map(|(live, free)| FreedRecord {
            ptr,
            live,
            free_stack: free.stack,
            free_thread: free.thread,
            free_time_ns: free.time_ns,
        });
        let containing = match previous {
            Some(_) => None,
            None => self.block_containing(ptr),
        };
        Box::new(BadFree {
            ptr,
            previous,
            containing,
            free_stack,
            thread,
        })
    }

    /// The live block that `ptr` points inside of, if any (cold: scans the registry).
    fn block_containing(&self, ptr: usize) -> Option<(usize, Live)> {
        let mut found = None;
        self.live.for_each(|start, live| {
            if ptr > start && ptr - start < live.size as usize {
                found = Some((start, live));
            }
        });
        found
    }

    /// How an allocation from `origin` records its Python stack (`config::PythonFrames`):
    /// `hbm_torch_malloc` is called by PyTorch with the GIL released and no lock of PyTorch's
    /// held, so taking the GIL back there cannot deadlock; `cudaMalloc` under LD_PRELOAD is called
    /// inside PyTorch's caching allocator's lock, which a thread holding the GIL may wait for.
    #[inline]
    fn python_for(&self, origin: Origin) -> WithPython {
        use python_frames::Acquire;
        match (self.settings.python_frames, origin) {
            (PythonFrames::Off, _) => WithPython::No,
            (PythonFrames::On, Origin::TorchMalloc) => WithPython::Yes(Acquire::MainThread),
            (PythonFrames::On, _) => WithPython::Yes(Acquire::Never),
            (PythonFrames::Acquire, _) => WithPython::Yes(Acquire::AnyThread),
        }
    }

    /// `NONE` without backtraces: only this test is inlined into the hot path.
    #[inline]
    fn capture_stack(&self, python: WithPython) -> StackId {
        if !self.settings.backtrace {
            return StackId::NONE;
        }
        self.capture_and_intern(python)
    }

    #[inline(never)]
    fn capture_and_intern(&self, python: WithPython) -> StackId {
        // A re-entrant call (the tracker's own diagnostics allocating through a hooked path) is
        // recorded without a stack rather than captured again.
        let Some(_guard) = ReentryGuard::enter() else {
            return StackId::NONE;
        };
        let native = self.settings.max_frames + OWN_FRAMES_SLACK;
        // Room for the mark and up to max_frames Python frames after the native ones.
        let want = native
            + match python {
                WithPython::No => 0,
                WithPython::Yes(_) => 1 + self.settings.max_frames,
            };
        if want <= INLINE_FRAMES {
            let mut buf = [0usize; INLINE_FRAMES];
            let n = self.capture_into(&mut buf[..want], native, python);
            self.stacks.intern(&buf[..n])
        } else {
            let mut buf = vec![0usize; want];
            let n = self.capture_into(&mut buf, native, python);
            self.stacks.intern(&buf[..n])
        }
    }

    /// Native frames (at most `native`), then, unless `python` is `No` and if the thread is
    /// running Python,
    /// `python_frames::MARK` and its Python frames. Returns the words written.
    #[inline(always)]
    fn capture_into(&self, buf: &mut [usize], native: usize, python: WithPython) -> usize {
        let n = capture::capture(self.settings.unwinder, &mut buf[..native]);
        let WithPython::Yes(acquire) = python else {
            return n;
        };
        match python_frames::capture(&mut buf[n + 1..], acquire) {
            0 => n,
            m => {
                buf[n] = python_frames::MARK;
                n + 1 + m
            }
        }
    }

    /// Time since the tracker started. Without a timeline, the coarse clock (a few ms of
    /// resolution, ~5 ns a read instead of ~25): enough to say when a leak was allocated.
    #[inline]
    fn now_ns(&self) -> u64 {
        monotonic_ns(self.timeline.is_none()).saturating_sub(self.start_ns)
    }

    /// Starts a new epoch and returns it as a mark for `leaks_since`: every allocation recorded
    /// after this call returns, by this thread or by one that synchronized with it since, has an
    /// epoch of at least the mark; every allocation recorded before the call began has a smaller
    /// one. Allocations by other threads concurrent with the call may fall on either side.
    /// Marks increase from 1; 0 is the epoch before any checkpoint.
    ///
    /// The one read-modify-write of the epoch is here, so that allocations only load it.
    pub fn checkpoint(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Live allocations recorded since `mark` was returned by `checkpoint` (epoch >= mark), with
    /// the same caveat for allocations concurrent with that call. `leaks_since(0)` is everything
    /// live.
    pub fn leaks_since(&self, mark: u64) -> LeakSummary {
        let mut sum = LeakSummary::default();
        self.live.for_each(|_, live| {
            if live.epoch >= mark {
                sum.bytes += live.size;
                sum.count += 1;
            }
        });
        sum
    }

    /// The live allocation at `ptr`, if any.
    pub fn get(&self, ptr: usize) -> Option<Live> {
        self.live.get(ptr)
    }

    /// A copy of every live allocation, in no particular order. Other threads may allocate and free
    /// meanwhile: an entry they add or remove concurrently is either in or out, never torn.
    pub fn snapshot(&self) -> Vec<(usize, Live)> {
        let mut all = Vec::new();
        self.live.for_each(|ptr, live| all.push((ptr, live)));
        all
    }

    /// Counts a free refused for a block of another kind (its record stands; nothing to scan).
    #[cold]
    pub fn note_rejected(&self) {
        self.bad_frees.fetch_add(1, Ordering::Relaxed);
    }

    /// Frees this tracker has rejected (unknown pointers, double frees, blocks of another kind).
    pub fn bad_free_count(&self) -> u64 {
        self.bad_frees.load(Ordering::Relaxed)
    }
}

/// CLOCK_MONOTONIC (or its coarse variant, same origin) in nanoseconds; vDSO, no system call.
#[inline]
pub(super) fn monotonic_ns(coarse: bool) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let clock = if coarse {
        libc::CLOCK_MONOTONIC_COARSE
    } else {
        libc::CLOCK_MONOTONIC
    };
    // SAFETY: `ts` is a valid, writable timespec; both clocks exist on every Linux since 2.6.32.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::capture::PANIC_IN_NEXT_CAPTURE;
    use std::sync::{mpsc, Arc};
    use std::time::Duration;

    /// Runs `f` on another thread and waits at most 10 s: a key left held makes it spin for ever.
    fn within_10s<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the table stayed locked after a panic")
    }

    /// Issue 18, defect 11: a panic in the stack walk (during an allocation or a free) leaves no
    /// slot of the live table held: the address is usable afterwards, its record as it was.
    #[test]
    fn a_panicking_stack_walk_leaves_the_table_usable() {
        let t = Arc::new(Tracker::new(Settings {
            backtrace: true,
            ..Settings::default()
        }));
        let p = 0x6a6a_0000_1000;
        t.on_alloc(p, 4096, 0, 0, Origin::CudaMalloc);
        PANIC_IN_NEXT_CAPTURE.with(|f| f.set(true));
        let freed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.on_free(p)));
        assert!(freed.is_err(), "the walk panicked");
        let t2 = t.clone();
        let live = within_10s(move || t2.get(p));
        assert_eq!(live.map(|l| l.size), Some(4096), "not freed, still live");
        assert!(t.on_free(p).is_ok());

        PANIC_IN_NEXT_CAPTURE.with(|f| f.set(true));
        let alloc = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            t.on_alloc(p, 512, 0, 0, Origin::CudaMalloc)
        }));
        assert!(alloc.is_err());
        let t2 = t.clone();
        within_10s(move || t2.on_alloc(p, 512, 0, 0, Origin::CudaMalloc));
        assert_eq!(t.get(p).map(|l| l.size), Some(512));
    }
}
