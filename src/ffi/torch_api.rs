//! PyTorch's pluggable allocator: the two entry points that
//! `torch.cuda.memory.CUDAPluggableAllocator(path, "hbm_torch_malloc", "hbm_torch_free")` loads.
//!
//! Both run on the device's caching pool, stream-ordered as `cudaMallocAsync`/`cudaFreeAsync` are
//! (`CachingPool::alloc_async` / `free_async`): a block freed on stream `s` is reused at once by
//! allocations on `s`, and by other streams only once an event recorded at the free has
//! completed. Neither entry point synchronizes the device; only running out of memory does (the
//! pool releases its cache, which needs the device idle, and retries once). Allocations are
//! tracked like every other (origin `hbm_torch_malloc`), so leak reports, checkpoints and
//! `hbm_report_json` see them.
//!
//! PyTorch's contract: it calls `malloc(size, device, stream)` with the current stream, and
//! `free(ptr, size, device, stream)` with the same size, device and stream, once. A size of 0
//! (an empty tensor) gets NULL, and the NULL comes back to `free` (recent versions wrap every
//! pointer in a deleter context, NULL included): both are quiet no-ops.

use super::guard::ffi_guard;
use super::status::HbmStatus;
use crate::backend::{Capture, Stream};
use crate::error::{Error, Result};
use crate::pool::capture::{CapturingHere, GraphId, UNHOOKED};
use crate::tracked::device::{self as device_alloc, Api};
use crate::tracked::{self, FreeError};
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Allocations `hbm_torch_malloc` refused for want of memory.
static OOMS: AtomicU64 = AtomicU64::new(0);

/// Allocates `size` bytes on `device` for PyTorch, ordered on `stream` (a `cudaStream_t`; NULL
/// is the legacy default stream). The signature is the one `CUDAPluggableAllocator` loads.
///
/// Returns the block (aligned to at least 512 bytes), or NULL: for `size` 0 (nothing printed,
/// as PyTorch expects for an empty tensor), for a negative size or a bad device (one line on
/// stderr), and when the device is out of memory even after the pool released its cached memory
/// and retried (one line on stderr saying how much is in use and cached; counted by
/// `hbm_torch_oom_count`). Free it with `hbm_torch_free`.
#[no_mangle]
pub extern "C" fn hbm_torch_malloc(size: isize, device: c_int, stream: *mut c_void) -> *mut c_void {
    ffi_guard!(std::ptr::null_mut(), {
        if size < 0 {
            eprintln!("hbmalloc: hbm_torch_malloc({size}): negative size; returning NULL");
        }
        serve_or_null(size, device, stream, Keep::Unhooked)
    })
}

/// The two NULL-on-failure entry points' body: NULL for `size` <= 0, else the block, or NULL
/// with the failure said and counted (`malloc_failed`).
fn serve_or_null(size: isize, device: c_int, stream: *mut c_void, keep: Keep) -> *mut c_void {
    if size <= 0 {
        return std::ptr::null_mut();
    }
    match serve(size as usize, device, torch_stream(stream), keep) {
        Ok(ptr) => ptr as *mut c_void,
        Err(e) => {
            malloc_failed(size, device, &e);
            std::ptr::null_mut()
        }
    }
}

/// `hbm_torch_malloc` for segments of PyTorch's own caching allocator
/// (`torch.cuda.MemPool(...)`, `hbmalloc.torch.pool()`), which keeps a CUDA graph's memory out of
/// other work itself: during a capture the block is served without a call the capture forbids,
/// and is an ordinary block once freed. Otherwise as `hbm_torch_malloc` (NULL on out of memory:
/// PyTorch's allocator checks it and raises).
#[no_mangle]
pub extern "C" fn hbm_torch_segment_malloc(
    size: isize,
    device: c_int,
    stream: *mut c_void,
) -> *mut c_void {
    ffi_guard!(
        std::ptr::null_mut(),
        serve_or_null(size, device, stream, Keep::Caller)
    )
}

/// `hbm_torch_malloc` with a status, for callers that turn a refusal into an exception (the
/// C++ shim of `hbmalloc.torch`, which raises `torch.OutOfMemoryError`): writes the block (NULL
/// for `size` 0) to `*out_ptr` and returns `HBM_STATUS_OK`, or returns
/// `HBM_STATUS_OUT_OF_MEMORY` after releasing the cache and retrying (one line on stderr;
/// counted by `hbm_torch_oom_count`), `HBM_STATUS_INVALID_VALUE` for a negative size,
/// `HBM_STATUS_INVALID_DEVICE`, or `HBM_STATUS_NULL_PARAMETER` for a NULL `out_ptr`; then
/// `*out_ptr` is NULL.
///
/// # Safety
/// `out_ptr` is NULL or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn hbm_torch_try_malloc(
    size: isize,
    device: c_int,
    stream: *mut c_void,
    out_ptr: *mut *mut c_void,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if out_ptr.is_null() {
            return HbmStatus::NullParameter;
        }
        // SAFETY: non-NULL, and the caller promises it is writable.
        unsafe { *out_ptr = std::ptr::null_mut() };
        let served = match size {
            ..0 => Err(Error::InvalidValue("negative size")),
            0 => return HbmStatus::Ok,
            _ => serve(size as usize, device, torch_stream(stream), Keep::Unhooked),
        };
        finish(served, size, device, out_ptr)
    })
}

/// Allocates for a CUDA graph that captures into PyTorch's memory pool `(pool_hi, pool_lo)`
/// (its `MempoolId_t`), between `hbm_torch_graph_begin` and `hbm_torch_graph_end` of that pool.
/// The block belongs to the pool until `hbm_torch_graph_release`: freed, it is reused only by
/// allocations into the same pool. Returns and writes `*out_ptr` as `hbm_torch_try_malloc`;
/// `HBM_STATUS_INVALID_VALUE` for a pool no capture has begun into.
///
/// # Safety
/// `out_ptr` is NULL or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn hbm_torch_graph_malloc(
    size: isize,
    device: c_int,
    stream: *mut c_void,
    pool_hi: u64,
    pool_lo: u64,
    out_ptr: *mut *mut c_void,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if out_ptr.is_null() {
            return HbmStatus::NullParameter;
        }
        // SAFETY: non-NULL, and the caller promises it is writable.
        unsafe { *out_ptr = std::ptr::null_mut() };
        let graph = (pool_hi, pool_lo);
        let served = match size {
            ..0 => Err(Error::InvalidValue("negative size")),
            0 => return HbmStatus::Ok,
            _ => crate::runtime::pool(device).and_then(|pool| {
                if !pool.graph_is_live(graph) {
                    return Err(Error::InvalidValue("no capture has begun into this pool"));
                }
                let _here = CapturingHere::new();
                device_alloc::alloc_graph(device, size as usize, torch_stream(stream), graph)
            }),
        };
        finish(served, size, device, out_ptr)
    })
}

/// A CUDA graph capture into PyTorch's pool `(pool_hi, pool_lo)` on `device` is about to begin
/// (PyTorch's `beginAllocateToPool`). Until the matching `hbm_torch_graph_end`, hbmalloc makes
/// no driver call a capture forbids, on any thread. Returns `HBM_STATUS_INVALID_DEVICE` for a
/// device without a pool.
#[no_mangle]
pub extern "C" fn hbm_torch_graph_begin(device: c_int, pool_hi: u64, pool_lo: u64) -> HbmStatus {
    ffi_guard!(
        HbmStatus::Panic,
        on_pool(device, |pool| pool.graph_begin((pool_hi, pool_lo)))
    )
}

/// The capture into `(pool_hi, pool_lo)` has ended (`endAllocateToPool`).
#[no_mangle]
pub extern "C" fn hbm_torch_graph_end(device: c_int, pool_hi: u64, pool_lo: u64) -> HbmStatus {
    ffi_guard!(
        HbmStatus::Panic,
        on_pool(device, |pool| pool.graph_end((pool_hi, pool_lo)))
    )
}

/// A graph that captured into `(pool_hi, pool_lo)` is destroyed (`releasePool`). With the last
/// of the pool's graphs, its freed blocks go back to the caching pool, reusable once the device
/// has been synchronized (replays may still be queued). An unknown pool is a quiet no-op.
#[no_mangle]
pub extern "C" fn hbm_torch_graph_release(device: c_int, pool_hi: u64, pool_lo: u64) -> HbmStatus {
    ffi_guard!(
        HbmStatus::Panic,
        on_pool(device, |pool| pool.graph_release((pool_hi, pool_lo)))
    )
}

/// The graph hooks' body: `f` on `device`'s caching pool, or the status of why there is none.
fn on_pool(device: c_int, f: impl FnOnce(&crate::pool::CachingPool)) -> HbmStatus {
    match crate::runtime::pool(device) {
        Ok(pool) => {
            f(pool);
            HbmStatus::Ok
        }
        Err(e) => HbmStatus::from(&e),
    }
}

/// Who keeps memory allocated during a capture out of other work while the graph lives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// The caller (PyTorch's caching allocator, over `hbm_torch_segment_malloc`).
    Caller,
    /// Nobody told hbmalloc when the graph dies: the block is never reused
    /// (`capture::UNHOOKED`).
    Unhooked,
}

/// PyTorch's stream as the pool keys it. PyTorch is built with the legacy default stream, so its
/// NULL is the process's one legacy stream, the same on every thread; the pool keys a bare 0 by
/// thread (as under `--default-stream per-thread`), which would keep the main thread from
/// reusing at once what PyTorch's autograd thread frees on that stream. Handle 1 is
/// `CU_STREAM_LEGACY`: that stream by name, for events too.
fn torch_stream(stream: *mut c_void) -> Stream {
    match stream as Stream {
        0 => 1,
        s => s,
    }
}

/// Serves one PyTorch allocation. On a stream that captures a graph (one no hook announced:
/// the announced ones come through `hbm_torch_graph_malloc`), no call the capture forbids.
fn serve(size: usize, device: c_int, stream: Stream, keep: Keep) -> Result<usize> {
    if !stream_captures(device, stream) {
        return device_alloc::alloc(device, size, Some(stream), Api::Torch);
    }
    let _here = CapturingHere::new();
    if keep == Keep::Caller {
        return device_alloc::alloc(device, size, Some(stream), Api::Torch);
    }
    warn_unhooked_once();
    device_alloc::alloc_graph(device, size, stream, UNHOOKED as GraphId)
}

/// Whether `stream` captures a graph. The default streams (0, 1) never do, and are not asked
/// about (eager PyTorch allocates there: no driver call on that path).
fn stream_captures(device: c_int, stream: Stream) -> bool {
    stream > 1
        && crate::runtime::pool(device).is_ok_and(|p| {
            p.backend()
                .stream_capture(stream)
                .is_ok_and(|c| c != Capture::None)
        })
}

#[cold]
fn warn_unhooked_once() {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "hbmalloc: hbm_torch_malloc on a stream capturing a CUDA graph, with no graph pool \
             announced (hbmalloc.torch.enable() installs PyTorch's graph hooks): that memory is \
             never reused"
        );
    }
}

/// Writes a served block to `*out_ptr` or reports the failure; the status for either.
fn finish(
    served: Result<usize>,
    size: isize,
    device: c_int,
    out_ptr: *mut *mut c_void,
) -> HbmStatus {
    match served {
        Ok(ptr) => {
            // SAFETY: checked non-NULL and writable by the callers.
            unsafe { *out_ptr = ptr as *mut c_void };
            HbmStatus::Ok
        }
        Err(e) => {
            malloc_failed(size, device, &e);
            HbmStatus::from(&e)
        }
    }
}

/// Frees a block from `hbm_torch_malloc`, ordered on `stream`: it is reused at once by
/// allocations on `stream`, by other streams once `stream` has passed this point. `size` and
/// `device` are PyTorch's record; hbmalloc's own record decides (a block freed with another
/// device's ordinal still goes back to its own pool).
///
/// NULL is a no-op. A pointer hbmalloc did not allocate, one already freed, or one inside a block
/// frees nothing, prints one line on stderr, and is counted as a bad free in the leak report;
/// it never crashes the process.
#[no_mangle]
pub extern "C" fn hbm_torch_free(
    ptr: *mut c_void,
    size: isize,
    device: c_int,
    stream: *mut c_void,
) {
    ffi_guard!((), {
        if ptr.is_null() {
            return;
        }
        let _here = stream_captures(device, torch_stream(stream)).then(CapturingHere::new);
        match device_alloc::free(ptr as usize, Some(torch_stream(stream)), Api::Torch) {
            Ok(_) => {}
            // The tracked path has said what it found (a double free, an interior pointer,
            // a block of another kind).
            Err(FreeError::WrongKind(_))
            | Err(FreeError::Refused(Error::DoubleFree(_) | Error::InteriorPointer { .. })) => {}
            Err(FreeError::Unknown(_)) => {
                tracked::reject_unknown(ptr as usize);
                eprintln!(
                    "hbmalloc: hbm_torch_free({ptr:p}, {size}, device {device}): not a pointer \
                     hbmalloc allocated; nothing freed"
                )
            }
            Err(FreeError::Refused(e)) => {
                eprintln!("hbmalloc: hbm_torch_free({ptr:p}): {e}; nothing freed")
            }
        }
    })
}

/// Number of `hbm_torch_malloc` calls that returned NULL because the device was out of memory
/// (what `torch.cuda.memory_stats()` calls `num_ooms`).
#[no_mangle]
pub extern "C" fn hbm_torch_oom_count() -> u64 {
    OOMS.load(Ordering::Relaxed)
}

#[cold]
fn malloc_failed(size: isize, device: c_int, e: &Error) {
    match e {
        // The pool printed the one line that explains it (in use, cached, device free).
        Error::OutOfMemory { .. } => {
            OOMS.fetch_add(1, Ordering::Relaxed);
        }
        _ => eprintln!("hbmalloc: hbm_torch_malloc({size}, device {device}): {e}; returning NULL"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sim;
    use crate::track::{self, Origin};

    const S1: *mut c_void = 0x1000 as *mut c_void;
    const S2: *mut c_void = 0x2000 as *mut c_void;
    const S3: *mut c_void = 0x3000 as *mut c_void;

    fn pool_stats() -> crate::pool::PoolStats {
        crate::runtime::pool(0).unwrap().stats()
    }

    /// Runs the calling test's body in a child process of its own (the tests hold the simulated
    /// device's events, size the device, or count process-wide figures). True in the child.
    fn in_child(name: &str, conf: &str) -> bool {
        if crate::test_child::is_child() {
            return true;
        }
        let out = crate::test_child::run(&format!("ffi::torch_api::tests::{name}"), Some(conf));
        assert!(out.contains("child checks passed"), "{out}");
        false
    }

    /// PyTorch's NULL stream is the legacy stream, one for every thread: what its autograd
    /// thread frees there, the main thread reuses at once.
    #[test]
    fn the_null_stream_is_one_stream_for_every_thread() {
        if !in_child(
            "the_null_stream_is_one_stream_for_every_thread",
            "backend:sim,leak_report:off",
        ) {
            return;
        }
        let size = 12 << 20;
        sim::hold_events();
        let a = hbm_torch_malloc(size, 0, std::ptr::null_mut()) as usize;
        assert_ne!(a, 0);
        std::thread::spawn(move || hbm_torch_free(a as *mut c_void, size, 0, std::ptr::null_mut()))
            .join()
            .unwrap();
        let b = hbm_torch_malloc(size, 0, std::ptr::null_mut());
        assert_eq!(b as usize, a, "the free's stream is this thread's too");
        let c = hbm_torch_malloc(size, 0, S1);
        hbm_torch_free(b, size, 0, std::ptr::null_mut());
        let d = hbm_torch_malloc(size, 0, S2);
        assert_ne!(d as usize, a, "another stream waits for the event");
        sim::complete_held_events();
        hbm_torch_free(c, size, 0, S1);
        hbm_torch_free(d, size, 0, S2);
        println!("child checks passed");
    }

    /// 12 MiB blocks get a chunk each, so no other free memory can serve a request in their place.
    #[test]
    fn same_stream_reuses_at_once_other_streams_after_the_event() {
        if !in_child(
            "same_stream_reuses_at_once_other_streams_after_the_event",
            "backend:sim,leak_report:off",
        ) {
            return;
        }
        let size = 12 << 20;
        let syncs = pool_stats().syncs;
        sim::hold_events();
        let a = hbm_torch_malloc(size, 0, S1);
        assert!(!a.is_null());
        hbm_torch_free(a, size, 0, S1);
        let b = hbm_torch_malloc(size, 0, S1);
        assert_eq!(b, a, "the freeing stream reuses the block at once");
        hbm_torch_free(b, size, 0, S1);

        let c = hbm_torch_malloc(size, 0, S2);
        assert!(!c.is_null());
        assert_ne!(
            c, a,
            "another stream must not get it before the free's event completes"
        );
        sim::complete_held_events();
        let d = hbm_torch_malloc(size, 0, S3);
        assert_eq!(d, a, "once the event completed, any stream reuses it");
        assert_eq!(
            pool_stats().syncs,
            syncs,
            "no device synchronize on this path"
        );
        hbm_torch_free(c, size, 0, S2);
        hbm_torch_free(d, size, 0, S3);
        println!("child checks passed");
    }

    #[test]
    fn out_of_memory_releases_the_cache_retries_then_returns_null() {
        if !in_child(
            "out_of_memory_releases_the_cache_retries_then_returns_null",
            "backend:sim,sim_capacity:64MiB,leak_report:off",
        ) {
            return;
        }
        let a = hbm_torch_malloc(40 << 20, 0, S1);
        assert!(!a.is_null());
        hbm_torch_free(a, 40 << 20, 0, S1);
        // 48 MiB fits only once the cached 40 MiB go back to the device.
        let big = hbm_torch_malloc(48 << 20, 0, S2);
        assert!(
            !big.is_null(),
            "the cache must be released and the request retried"
        );
        assert_eq!(pool_stats().oom_retries, 1);
        assert_eq!(hbm_torch_oom_count(), 0);
        assert!(hbm_torch_malloc(1 << 40, 0, S2).is_null());
        assert_eq!(hbm_torch_oom_count(), 1);
        hbm_torch_free(big, 48 << 20, 0, S2);
        // Not out of memory: an empty tensor, a negative size, a device that does not exist.
        assert!(hbm_torch_malloc(0, 0, S1).is_null());
        assert!(hbm_torch_malloc(-5, 0, S1).is_null());
        assert!(hbm_torch_malloc(4096, 7, S1).is_null());
        assert_eq!(hbm_torch_oom_count(), 1);
        assert!(!hbm_torch_malloc(48 << 20, 0, S1).is_null(), "still usable");
        println!("child checks passed");
    }

    #[test]
    fn bad_frees_are_reported_counted_and_harmless() {
        if !in_child(
            "bad_frees_are_reported_counted_and_harmless",
            "backend:sim,leak_report:off",
        ) {
            return;
        }
        let bad = || track::global().bad_free_count();
        let mark = track::checkpoint();
        let a = hbm_torch_malloc(4096, 0, S1);
        assert_eq!(
            track::global().get(a as usize).map(|l| l.origin),
            Some(Origin::TorchMalloc)
        );
        assert_eq!(track::leaks_since(mark).count, 1);
        hbm_torch_free(std::ptr::null_mut(), 0, 0, S1);
        assert_eq!(bad(), 0, "NULL (an empty tensor) is no bad free");
        hbm_torch_free(0xdead_0000 as *mut c_void, 4096, 0, S1);
        assert_eq!(bad(), 1, "a pointer never allocated");
        hbm_torch_free(a.wrapping_byte_add(512), 4096, 0, S1);
        assert_eq!(bad(), 2, "an interior pointer");
        assert_eq!(track::leaks_since(mark).count, 1, "nothing was freed");
        hbm_torch_free(a, 4096, 0, S1);
        assert_eq!(track::leaks_since(mark).count, 0);
        hbm_torch_free(a, 4096, 0, S1);
        assert_eq!(bad(), 3, "a double free");
        assert!(!hbm_torch_malloc(4096, 0, S1).is_null(), "still usable");
        println!("child checks passed");
    }

    /// `try_malloc`'s statuses, which the C++ shim turns into PyTorch's exceptions.
    #[test]
    fn try_malloc_says_why_it_refused() {
        if !in_child(
            "try_malloc_says_why_it_refused",
            "backend:sim,sim_capacity:64MiB,leak_report:off",
        ) {
            return;
        }
        let mut p: *mut c_void = 0x1 as *mut c_void;
        // SAFETY: `p` is a valid out-parameter in every call below.
        unsafe {
            assert_eq!(
                hbm_torch_try_malloc(1 << 40, 0, S1, &mut p),
                HbmStatus::OutOfMemory
            );
            assert!(p.is_null());
            assert_eq!(hbm_torch_oom_count(), 1);
            assert_eq!(
                hbm_torch_try_malloc(-1, 0, S1, &mut p),
                HbmStatus::InvalidValue
            );
            assert_eq!(
                hbm_torch_try_malloc(64, 9, S1, &mut p),
                HbmStatus::InvalidDevice
            );
            assert_eq!(
                hbm_torch_try_malloc(64, 0, S1, std::ptr::null_mut()),
                HbmStatus::NullParameter
            );
            assert_eq!(hbm_torch_try_malloc(0, 0, S1, &mut p), HbmStatus::Ok);
            assert!(p.is_null(), "an empty tensor");
            assert_eq!(hbm_torch_try_malloc(4096, 0, S1, &mut p), HbmStatus::Ok);
        }
        assert!(!p.is_null());
        hbm_torch_free(p, 4096, 0, S1);
        assert_eq!(hbm_torch_oom_count(), 1);
        println!("child checks passed");
    }

    /// A capture nobody announced (no PyTorch hooks): the stream path makes no call the capture
    /// forbids (the simulated driver invalidates the capture otherwise), and what the capture
    /// allocated is never handed to other work.
    #[test]
    fn an_unannounced_capture_stays_valid_and_keeps_its_memory() {
        if !in_child(
            "an_unannounced_capture_stays_valid_and_keeps_its_memory",
            "backend:sim,leak_report:off",
        ) {
            return;
        }
        let size = 12 << 20;
        sim::hold_events();
        // A block waiting for its event on S2: reusing it elsewhere needs an event query.
        let a = hbm_torch_malloc(size, 0, S2);
        hbm_torch_free(a, size, 0, S2);
        sim::begin_capture(S1 as Stream);
        let x = hbm_torch_malloc(size, 0, S1);
        assert!(!x.is_null(), "allocating during a capture works");
        assert_ne!(x, a);
        hbm_torch_free(x, size, 0, S1);
        // A segment of PyTorch's own allocator: served quietly too, its owner keeps it.
        let seg = hbm_torch_segment_malloc(size, 0, S1);
        assert!(!seg.is_null());
        sim::end_capture(S1 as Stream).expect("the capture stayed valid");
        hbm_torch_free(seg, size, 0, S1);
        sim::complete_held_events();
        let after: Vec<_> = (0..3).map(|_| hbm_torch_malloc(size, 0, S3)).collect();
        assert!(
            after.contains(&seg),
            "a segment is an ordinary block once freed"
        );
        assert!(
            after.contains(&a),
            "the block freed before the capture is reused"
        );
        assert!(
            !after.contains(&x),
            "the graph's block is never handed out again"
        );
        println!("child checks passed");
    }

    /// PyTorch's hooks: a graph pool's blocks serve its capture (freed and reused there on one
    /// stream), stay out of other work while the graph lives, and go back once it is released;
    /// while the capture is under way no thread's allocation or free breaks it.
    #[test]
    fn a_graph_pool_serves_its_capture_and_nothing_else_until_released() {
        if !in_child(
            "a_graph_pool_serves_its_capture_and_nothing_else_until_released",
            "backend:sim,leak_report:off",
        ) {
            return;
        }
        let size = 12 << 20;
        let pool = crate::runtime::pool(0).unwrap();
        let graph_malloc = |stream| {
            let mut p = std::ptr::null_mut();
            // SAFETY: `p` is a valid out-parameter.
            let st = unsafe { hbm_torch_graph_malloc(size, 0, stream, 5, 0, &mut p) };
            assert_eq!(st, HbmStatus::Ok);
            p
        };
        sim::hold_events();
        let before = hbm_torch_malloc(size, 0, S2);
        let waiting = hbm_torch_malloc(size, 0, S2);
        hbm_torch_free(waiting, size, 0, S2);
        let mut p = std::ptr::null_mut();
        // SAFETY: `p` is a valid out-parameter.
        let unbegun = unsafe { hbm_torch_graph_malloc(size, 0, S1, 5, 0, &mut p) };
        assert_eq!(
            unbegun,
            HbmStatus::InvalidValue,
            "no capture into pool 5 yet"
        );

        assert_eq!(hbm_torch_graph_begin(0, 5, 0), HbmStatus::Ok);
        sim::begin_capture(S1 as Stream);
        let temp = graph_malloc(S1);
        hbm_torch_free(temp, size, 0, S1);
        assert_eq!(
            graph_malloc(S1),
            temp,
            "reused within the capture, same stream"
        );
        let output = graph_malloc(S1);
        hbm_torch_free(temp, size, 0, S1);
        // Other streams meanwhile: no event query (the waiting block), no event for a free.
        let other = hbm_torch_malloc(size, 0, S3);
        assert!(!other.is_null() && other != waiting);
        hbm_torch_free(before, size, 0, S3);
        sim::end_capture(S1 as Stream).expect("the capture stayed valid");
        assert_eq!(hbm_torch_graph_end(0, 5, 0), HbmStatus::Ok);

        sim::complete_held_events();
        hbm_torch_free(output, size, 0, S2);
        let later: Vec<_> = (0..4).map(|_| hbm_torch_malloc(size, 0, S3)).collect();
        assert!(
            later.contains(&waiting) && later.contains(&before),
            "{later:?}"
        );
        assert!(
            !later.contains(&temp) && !later.contains(&output),
            "the graph's blocks stay out of other work while it lives"
        );
        assert_eq!(pool.graph_parked_bytes(), 2 * size as usize);
        assert_eq!(hbm_torch_graph_release(0, 5, 0), HbmStatus::Ok);
        assert_eq!(pool.graph_parked_bytes(), 0);
        assert_eq!(
            hbm_torch_graph_release(0, 5, 0),
            HbmStatus::Ok,
            "twice: no-op"
        );
        let reserved = pool.stats().reserved;
        pool.trim().unwrap();
        assert!(
            pool.stats().reserved <= reserved - 2 * size as u64,
            "released to the driver"
        );
        for p in later.into_iter().chain([other]) {
            hbm_torch_free(p, size, 0, S3);
        }
        println!("child checks passed");
    }

    /// The JSON report the Python package reads for its snapshots names each torch allocation.
    #[test]
    fn json_report_lists_torch_allocations() {
        use crate::ffi::status::HbmStatus;
        use crate::ffi::track_api::hbm_report_json;
        if !in_child(
            "json_report_lists_torch_allocations",
            "backend:sim,leak_report:off",
        ) {
            return;
        }
        let a = hbm_torch_malloc(3 << 20, 0, S2);
        let path = std::env::temp_dir().join(format!("hbm-torch-{}.json", std::process::id()));
        let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { hbm_report_json(c_path.as_ptr()) }, HbmStatus::Ok);
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let _ = std::fs::remove_file(&path);
        let ours: Vec<&serde_json::Value> = doc["sites"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["allocations"].as_array().unwrap())
            .filter(|x| x["ptr"] == format!("{:#x}", a as usize))
            .collect();
        assert_eq!(ours.len(), 1, "{doc}");
        assert_eq!(ours[0]["origin"], "hbm_torch_malloc");
        assert_eq!(ours[0]["size"], 3 << 20);
        assert_eq!(ours[0]["stream"], "0x2000");
        // SAFETY: a valid NUL-terminated path into a directory that does not exist.
        let bad = unsafe { hbm_report_json(c"/nonexistent-dir/x/r.json".as_ptr()) };
        assert_eq!(bad, HbmStatus::IoError);
        hbm_torch_free(a, 3 << 20, 0, S2);
        println!("child checks passed");
    }
}
