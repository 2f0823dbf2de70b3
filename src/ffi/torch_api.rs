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
use crate::backend::Stream;
use crate::error::Error;
use crate::tracked::device::{self as device_alloc, Api};
use crate::tracked::{self, FreeError};
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};

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
        if size <= 0 {
            if size < 0 {
                eprintln!("hbmalloc: hbm_torch_malloc({size}): negative size; returning NULL");
            }
            return std::ptr::null_mut();
        }
        match device_alloc::alloc(device, size as usize, Some(stream as Stream), Api::Torch) {
            Ok(ptr) => ptr as *mut c_void,
            Err(e) => {
                malloc_failed(size, device, &e);
                std::ptr::null_mut()
            }
        }
    })
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
        match device_alloc::free(ptr as usize, Some(stream as Stream), Api::Torch) {
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
