//! Facts about the process that every layer may read: the exit report has begun, this is a
//! child forked after the allocator started, CUDA is gone in it. At the bottom of the crate, so
//! that the backend, the tool annotations and the tracker can ask without reaching up to the
//! code that sets them (`track::exit`, `fork`).

pub mod init;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

/// Set when the exit report begins, never cleared. What runs after it (static destructors
/// registered before our handler, the runtime's own teardown) may free memory when the driver is
/// going or gone: from then on the allocator's frees make no driver call.
static EXITING: AtomicBool = AtomicBool::new(false);
/// Set in a child after fork.
static IN_CHILD: AtomicBool = AtomicBool::new(false);
/// Set in a child after fork of a process that used CUDA.
static CUDA_LOST: AtomicBool = AtomicBool::new(false);
static WATCH: Once = Once::new();

/// Whether the process is exiting (the exit report has begun). Read only on the free paths that
/// would reach the driver (an event for `cudaFreeAsync`, a synchronize under
/// `stream_safety:eager`), never on the plain `cudaFree`.
#[inline]
pub fn exiting() -> bool {
    EXITING.load(Ordering::Relaxed)
}

/// Marks the process as exiting; the exit handler's first act.
pub fn begin_exit() {
    EXITING.store(true, Ordering::Relaxed);
}

/// Whether this process is a child forked after the allocator started.
#[inline]
pub fn in_child() -> bool {
    IN_CHILD.load(Ordering::Relaxed)
}

/// Whether CUDA is unusable because this process is a forked child of a CUDA process.
#[inline]
pub fn cuda_lost() -> bool {
    CUDA_LOST.load(Ordering::Relaxed)
}

/// Records, in a forked child, that it is one and whether CUDA is gone (`fork`'s child handler).
pub fn note_forked_child(cuda_lost: bool) {
    IN_CHILD.store(true, Ordering::Relaxed);
    if cuda_lost {
        CUDA_LOST.store(true, Ordering::Relaxed);
    }
}

/// Makes sure `in_child` becomes true in every child forked from now on, for code that needs the
/// answer before any pool exists (the pools' own fork handlers, in `fork`, also set it).
pub fn watch_forks() {
    WATCH.call_once(|| {
        // SAFETY: `child` is an `extern "C" fn()` that never unwinds.
        let rc = unsafe { libc::pthread_atfork(None, None, Some(child)) };
        if rc != 0 {
            eprintln!("hbmalloc: could not register a fork handler ({rc})");
        }
    });
}

extern "C" fn child() {
    IN_CHILD.store(true, Ordering::Relaxed);
}
