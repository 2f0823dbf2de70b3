//! Capturing the raw return addresses of the current call stack, cheaply.
//!
//! Two unwinders, chosen by `Unwinder`:
//! - `FramePointer` (the default): walks the `rbp`/`x29` chain. About 1.8 ns a frame, 38 ns for 21
//!   frames (bench/BENCHMARKS.md). Sound
//!   for any caller: every frame pointer is checked to lie inside the current thread's stack, above
//!   the previous one and aligned before it is read, so a frame compiled without frame pointers (whose
//!   `rbp` holds anything) ends the walk instead of faulting. Such a frame costs the report frames:
//!   the walk stops there, or skips the caller of a function that left `rbp` alone.
//! - `Dwarf`: `_Unwind_Backtrace` over `.eh_frame`, exact through code without frame pointers, but
//!   about 130-200 ns a frame here (3.3-4.6 us for 25 frames): too slow to leave on.
//!
//! What a caller without frame pointers costs: the first frame record read is hbmalloc's own
//! entry point's, whose return address is the caller's call site, so the immediate caller is always
//! named; frames above it are kept only as far as the `rbp` chain stays valid.
//!
//! The frame-pointer walk falls back to `Dwarf` when the current frame is not on the thread's
//! known stack (a signal's alternate stack, a coroutine's own stack).
//!
//! Per-thread state is one `const` thread-local `Cell` of a `Copy` struct: no destructor is ever
//! registered, so it is usable at exit and from any thread.

use std::cell::Cell;

/// Which unwinder captures stacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unwinder {
    FramePointer,
    Dwarf,
}

/// The most frames one capture keeps; `max_frames` is clamped to it.
pub const MAX_FRAMES: usize = 256;

#[derive(Clone, Copy)]
struct ThreadInfo {
    /// Kernel thread id (what gdb and `top -H` show); 0 until first asked for.
    tid: u32,
    /// This thread's stack, `[stack_lo, stack_hi)`; `stack_hi` is 0 until known, 1 when
    /// unknowable.
    stack_lo: usize,
    stack_hi: usize,
    /// Set while this thread is inside the tracker (re-entrancy guard).
    busy: bool,
}

thread_local! {
    static THREAD: Cell<ThreadInfo> =
        const { Cell::new(ThreadInfo { tid: 0, stack_lo: 0, stack_hi: 0, busy: false }) };
}

/// The kernel thread id of the calling thread (never 0), read once per thread.
#[inline]
pub fn thread_id() -> u32 {
    let tid = THREAD.with(Cell::get).tid;
    if tid != 0 {
        return tid;
    }
    thread_id_slow()
}

#[cold]
#[inline(never)]
fn thread_id_slow() -> u32 {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as u32;
    THREAD.with(|t| {
        let mut info = t.get();
        info.tid = tid;
        t.set(info);
    });
    tid
}

/// Marks the calling thread as inside the tracker until the guard drops. `None` if it already was:
/// the caller is re-entering (from a diagnostic or a report) and must not capture or report again.
pub struct ReentryGuard(());

impl ReentryGuard {
    #[inline]
    pub fn enter() -> Option<ReentryGuard> {
        THREAD.with(|t| {
            let mut info = t.get();
            if info.busy {
                return None;
            }
            info.busy = true;
            t.set(info);
            Some(ReentryGuard(()))
        })
    }
}

impl Drop for ReentryGuard {
    #[inline]
    fn drop(&mut self) {
        THREAD.with(|t| {
            let mut info = t.get();
            info.busy = false;
            t.set(info);
        });
    }
}

/// Fills `out` with return addresses, innermost first, and returns how many it wrote.
/// The first entries are the tracker's own frames; the report leaves them out.
#[inline(never)]
pub fn capture(unwinder: Unwinder, out: &mut [usize]) -> usize {
    #[cfg(test)]
    if PANIC_IN_NEXT_CAPTURE.with(|p| p.replace(false)) {
        panic!("test: the stack walk panics");
    }
    match unwinder {
        Unwinder::FramePointer => capture_fp(out),
        Unwinder::Dwarf => capture_dwarf(out),
    }
}

/// `_Unwind_Backtrace` through the `backtrace` crate.
#[inline(never)]
pub fn capture_dwarf(out: &mut [usize]) -> usize {
    let mut n = 0;
    let mut visit = |frame: &backtrace::Frame| {
        if n == out.len() {
            return false;
        }
        out[n] = frame.ip() as usize;
        n += 1;
        true
    };
    // SAFETY: `trace_unsynchronized` is unsafe only because some platforms' unwinders (Windows'
    // dbghelp) are not thread-safe; on Linux `_Unwind_Backtrace` is, and the closure neither
    // panics nor unwinds (it only writes into `out` within bounds).
    unsafe { backtrace::trace_unsynchronized(&mut visit) };
    n
}

/// The frame-pointer walk. Falls back to `capture_dwarf` on an architecture without a known frame
/// record layout, or when the current frame is not on the thread's stack.
#[inline(never)]
pub fn capture_fp(out: &mut [usize]) -> usize {
    let Some(fp) = current_frame_pointer() else {
        return capture_dwarf(out);
    };
    let (lo, hi) = stack_bounds();
    // On a signal's alternate stack or a coroutine's own, fp is outside the thread's stack, and
    // the bounds say nothing about what is mapped around it: the exact unwinder takes over.
    if hi <= 1 || fp < lo || fp >= hi {
        return capture_dwarf(out);
    }
    walk_frames(fp, lo, hi, out)
}

/// Follows frame records `[fp] = caller's fp, [fp + 8] = return address` (x86_64 `push rbp; mov
/// rbp, rsp`; AArch64 `stp x29, x30`) from `fp` while each record is valid. Reads only inside
/// `[lo, hi)`, the thread's stack.
#[inline(always)]
fn walk_frames(mut fp: usize, lo: usize, hi: usize, out: &mut [usize]) -> usize {
    let word = std::mem::size_of::<usize>();
    let mut n = 0;
    while n < out.len() {
        // Invariant checked before every read: fp is word-aligned and the whole record
        // [fp, fp + 16) lies inside the stack, [lo, hi). fp only ever grows, so once the live
        // stack pointer is below it, every byte up to hi is mapped (the thread is using it).
        if fp % word != 0 || fp < lo || fp.checked_add(2 * word).map_or(true, |end| end > hi) {
            break;
        }
        // SAFETY: [fp, fp + 16) is inside this thread's mapped stack, between the current frame
        // and the stack's top (checked above), and aligned for usize.
        let (next, ret) = unsafe {
            (
                std::ptr::read(fp as *const usize),
                std::ptr::read((fp + word) as *const usize),
            )
        };
        if ret == 0 {
            break;
        }
        out[n] = ret;
        n += 1;
        if next <= fp {
            break; // 0 at the outermost frame; anything not above fp is not a frame record
        }
        fp = next;
    }
    n
}

#[inline(always)]
fn current_frame_pointer() -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        let fp: usize;
        // SAFETY: reads a register; no memory access, no side effects.
        unsafe {
            std::arch::asm!("mov {}, rbp", out(reg) fp, options(nomem, nostack, preserves_flags))
        };
        Some(fp)
    }
    #[cfg(target_arch = "aarch64")]
    {
        let fp: usize;
        // SAFETY: reads a register; no memory access, no side effects.
        unsafe {
            std::arch::asm!("mov {}, x29", out(reg) fp, options(nomem, nostack, preserves_flags))
        };
        Some(fp)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        None
    }
}

/// The calling thread's stack, `[lo, hi)`; `hi` is 1 if it cannot be known.
#[inline]
fn stack_bounds() -> (usize, usize) {
    let info = THREAD.with(Cell::get);
    if info.stack_hi != 0 {
        return (info.stack_lo, info.stack_hi);
    }
    stack_bounds_slow()
}

#[cold]
#[inline(never)]
fn stack_bounds_slow() -> (usize, usize) {
    let (lo, hi) = query_stack().unwrap_or((1, 1));
    THREAD.with(|t| {
        let mut info = t.get();
        info.stack_lo = lo;
        info.stack_hi = hi;
        t.set(info);
    });
    (lo, hi)
}

fn query_stack() -> Option<(usize, usize)> {
    // SAFETY: `attr` is initialized by pthread_getattr_np before it is read and destroyed once;
    // the out-parameters are valid locals.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return None;
        }
        let mut addr: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let rc = libc::pthread_attr_getstack(&attr, &mut addr, &mut size);
        libc::pthread_attr_destroy(&mut attr);
        if rc != 0 || addr.is_null() {
            return None;
        }
        Some((addr as usize, (addr as usize).checked_add(size)?))
    }
}

#[cfg(test)]
thread_local! {
    /// Tests: makes this thread's next capture panic, as a bug in an unwinder would.
    pub(crate) static PANIC_IN_NEXT_CAPTURE: Cell<bool> = const { Cell::new(false) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn depth(n: usize, unwinder: Unwinder, out: &mut [usize]) -> usize {
        if n == 0 {
            capture(unwinder, out)
        } else {
            let got = depth(n - 1, unwinder, out);
            std::hint::black_box(got)
        }
    }

    #[test]
    fn both_unwinders_see_recursion() {
        for unwinder in [Unwinder::FramePointer, Unwinder::Dwarf] {
            let mut shallow = [0usize; 64];
            let mut deep = [0usize; 64];
            let a = depth(2, unwinder, &mut shallow);
            let b = depth(12, unwinder, &mut deep);
            assert!(
                b >= a + 10,
                "{unwinder:?}: {a} frames at depth 2, {b} at depth 12"
            );
        }
    }

    #[test]
    fn fp_walk_stops_on_garbage_and_bounds() {
        // A fake chain in a local array: valid record, then a pointer going down, which must stop.
        let mut records = [0usize; 8];
        let base = records.as_ptr() as usize;
        records[0] = base + 32; // next record at index 4
        records[1] = 0x1111;
        records[4] = base; // goes backwards: invalid
        records[5] = 0x2222;
        let hi = base + std::mem::size_of_val(&records);
        let mut out = [0usize; 8];
        let n = walk_frames(base, base, hi, &mut out);
        assert_eq!(&out[..n], &[0x1111, 0x2222]);
        // A record straddling the top of the stack is never read.
        assert_eq!(walk_frames(hi - 8, base, hi, &mut out), 0);
        // Misaligned.
        assert_eq!(walk_frames(base + 1, base, hi, &mut out), 0);
    }

    /// Issue 18, defect 11: a frame pointer below the stack's bottom (garbage in rbp on a
    /// coroutine or signal stack) is never read from, though a valid-looking chain sits there.
    #[test]
    fn fp_walk_never_reads_below_the_stack() {
        let mut records = [0usize; 8];
        let base = records.as_ptr() as usize;
        records[0] = base + 32;
        records[1] = 0x1111;
        records[5] = 0x2222;
        let hi = base + std::mem::size_of_val(&records);
        let mut out = [0usize; 8];
        // The "stack" starts at records[4]: the record at `base` is outside it.
        assert_eq!(walk_frames(base, base + 32, hi, &mut out), 0);
        // And from inside, the walk is as before.
        assert_eq!(walk_frames(base + 32, base + 32, hi, &mut out), 1);
    }

    #[test]
    fn this_threads_stack_holds_its_frames() {
        let (lo, hi) = stack_bounds();
        let here = &lo as *const usize as usize;
        assert!(
            lo > 1 && lo < here && here < hi,
            "{lo:#x} {here:#x} {hi:#x}"
        );
        // A frame pointer below the stack: the frame-pointer walk does not start from it.
        let mut out = [0usize; 4];
        assert_eq!(walk_frames(lo - 4096, lo, hi, &mut out), 0);
    }

    #[test]
    fn capacity_is_respected() {
        let mut out = [0usize; 3];
        assert_eq!(depth(10, Unwinder::FramePointer, &mut out), 3);
        assert_eq!(depth(10, Unwinder::Dwarf, &mut out), 3);
    }

    #[test]
    fn reentry_guard_nests_once() {
        let outer = ReentryGuard::enter();
        assert!(outer.is_some());
        assert!(ReentryGuard::enter().is_none());
        drop(outer);
        assert!(ReentryGuard::enter().is_some());
    }
}
