//! The C API of allocation tracking: on-demand leak reports and checkpoints.
//!
//! They act on the process-wide tracker (`crate::track::global`), the one every allocation entry
//! point records into.

use super::guard::ffi_guard;
use super::status::HbmStatus;
use crate::track;
use std::ffi::{c_char, CStr};

/// Writes the full text leak report of every allocation still live, now.
///
/// `path`: a NUL-terminated file path, created or truncated; NULL writes to stderr. The string is
/// only read during the call; the caller keeps ownership.
///
/// Returns `HBM_STATUS_OK`, `HBM_STATUS_INVALID_VALUE` if `path` is not UTF-8, or
/// `HBM_STATUS_IO_ERROR` if the file could not be written.
///
/// # Safety
/// `path` is NULL or points to a NUL-terminated string valid for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn hbm_report_leaks(path: *const c_char) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        let path = if path.is_null() {
            None
        } else {
            // SAFETY: non-NULL `path` is a NUL-terminated string valid for this call (contract).
            match unsafe { CStr::from_ptr(path) }.to_str() {
                Ok(p) => Some(p),
                Err(_) => return HbmStatus::InvalidValue,
            }
        };
        match track::write_report(path) {
            Ok(()) => HbmStatus::Ok,
            Err(_) => HbmStatus::IoError,
        }
    })
}

/// Writes the JSON report of every allocation still live, now: what `report_json` writes at exit
/// (each call site's frames, and each allocation's address, size, device, stream and origin).
/// The Python package builds its snapshots from it.
///
/// `path`: as for `hbm_report_leaks` (NULL writes to stderr). Returns as `hbm_report_leaks` does.
///
/// # Safety
/// `path` is NULL or points to a NUL-terminated string valid for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn hbm_report_json(path: *const c_char) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        let written = if path.is_null() {
            track::global().write_json_report(&mut std::io::stderr().lock())
        } else {
            // SAFETY: non-NULL `path` is a NUL-terminated string valid for this call (contract).
            let Ok(path) = (unsafe { CStr::from_ptr(path) }).to_str() else {
                return HbmStatus::InvalidValue;
            };
            std::fs::File::create(path).and_then(|f| {
                let mut w = std::io::BufWriter::new(f);
                track::global().write_json_report(&mut w)?;
                std::io::Write::flush(&mut w)
            })
        };
        match written {
            Ok(()) => HbmStatus::Ok,
            Err(_) => HbmStatus::IoError,
        }
    })
}

/// Writes the alloc/free timeline kept so far (`timeline:N` in `HBMALLOC_CONF`) as JSON, now: each
/// event's time, kind, address, size, device and call site, and each call site's native and
/// Python frames (the format `timeline` writes at exit). The Python package builds a snapshot's
/// `device_traces` from it.
///
/// `path`: a NUL-terminated file path, created or truncated (not NULL). Returns `HBM_STATUS_OK`,
/// `HBM_STATUS_NULL_PARAMETER` for NULL, `HBM_STATUS_INVALID_VALUE` if `path` is not UTF-8,
/// `HBM_STATUS_NOT_SUPPORTED` when no timeline is kept (`timeline:0`, the default; no file is
/// written), or `HBM_STATUS_IO_ERROR` if the file could not be written.
///
/// # Safety
/// `path` is NULL or points to a NUL-terminated string valid for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn hbm_report_timeline_json(path: *const c_char) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if path.is_null() {
            return HbmStatus::NullParameter;
        }
        // SAFETY: non-NULL `path` is a NUL-terminated string valid for this call (contract).
        let Ok(path) = (unsafe { CStr::from_ptr(path) }).to_str() else {
            return HbmStatus::InvalidValue;
        };
        if track::global().timeline().is_none() {
            return HbmStatus::NotSupported;
        }
        let written = std::fs::File::create(path).and_then(|f| {
            let mut w = std::io::BufWriter::new(f);
            track::global().write_timeline_json(&mut w)?;
            std::io::Write::flush(&mut w)
        });
        match written {
            Ok(()) => HbmStatus::Ok,
            Err(_) => HbmStatus::IoError,
        }
    })
}

/// Starts a new checkpoint epoch and returns it as a mark for `hbm_leaks_since`: every allocation
/// made after this call returns, by this thread or by a thread that synchronized with it since
/// (a mutex, a join), is "since" the mark. Allocations by other threads while the call runs may
/// fall on either side. Marks increase from 1. Never fails; 0 on an internal error (0 is the mark
/// of the tracker's start: the check then counts everything live, and stays meaningful).
///
/// # Safety
/// None: no pointer arguments.
#[no_mangle]
pub unsafe extern "C" fn hbm_checkpoint() -> u64 {
    ffi_guard!(0, track::checkpoint())
}

/// Counts the allocations made after `mark` (from `hbm_checkpoint`) that are still live, so that a
/// test can assert that a region of code freed everything it allocated.
///
/// `out_bytes`, `out_count`: where the total size and the number of such allocations are written;
/// owned by the caller.
///
/// Returns `HBM_STATUS_OK`, or `HBM_STATUS_NULL_PARAMETER` (nothing written) if either is NULL.
///
/// # Safety
/// `out_bytes` and `out_count` are NULL or valid, aligned, writable `uint64_t` pointers.
#[no_mangle]
pub unsafe extern "C" fn hbm_leaks_since(
    mark: u64,
    out_bytes: *mut u64,
    out_count: *mut u64,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if out_bytes.is_null() || out_count.is_null() {
            return HbmStatus::NullParameter;
        }
        let leaks = track::leaks_since(mark);
        // SAFETY: both pointers are non-NULL and, by contract, valid for writing a u64.
        unsafe {
            out_bytes.write(leaks.bytes);
            out_count.write(leaks.count);
        }
        HbmStatus::Ok
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::Origin;

    /// Other unit tests of this process allocate through the global tracker at the same time,
    /// and `hbm_leaks_since` counts every thread's allocations: the checks run in a child process
    /// of this test binary that runs only them.
    #[test]
    fn checkpoint_and_leaks_since_through_the_c_api() {
        let stdout = crate::test_child::run(
            "ffi::track_api::tests::checkpoint_child",
            Some("leak_report:off"),
        );
        assert!(
            stdout.contains("1 passed"),
            "the child ran no test: {stdout}"
        );
    }

    #[test]
    fn timeline_json_refuses_null_and_a_tracker_without_timeline() {
        // SAFETY: NULL is allowed; the path is a NUL-terminated literal.
        assert_eq!(
            unsafe { hbm_report_timeline_json(std::ptr::null()) },
            HbmStatus::NullParameter
        );
        if track::global().timeline().is_some() {
            return; // HBMALLOC_CONF of this run keeps one
        }
        let path = std::env::temp_dir().join(format!("hbm-tl-{}.json", std::process::id()));
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: as above.
        assert_eq!(
            unsafe { hbm_report_timeline_json(c.as_ptr()) },
            HbmStatus::NotSupported
        );
        assert!(!path.exists(), "no file written");
    }

    #[test]
    fn checkpoint_child() {
        if !crate::test_child::is_child() {
            return;
        }
        // SAFETY: no arguments.
        let mark = unsafe { hbm_checkpoint() };
        // Addresses no other test of this process uses with the global tracker.
        track::on_alloc(0x5a5a_0000_1000, 4096, 0, 0, Origin::HbmAlloc);
        track::on_alloc(0x5a5a_0000_3000, 512, 0, 0, Origin::HbmAlloc);
        assert!(track::on_free(0x5a5a_0000_3000));
        let (mut bytes, mut count) = (0u64, 0u64);
        // SAFETY: valid out-pointers to locals.
        let status = unsafe { hbm_leaks_since(mark, &mut bytes, &mut count) };
        assert_eq!(status, HbmStatus::Ok);
        assert_eq!((bytes, count), (4096, 1));
        // SAFETY: a NULL out-pointer is the case under test; nothing is written through it.
        let status = unsafe { hbm_leaks_since(mark, std::ptr::null_mut(), &mut count) };
        assert_eq!(status, HbmStatus::NullParameter);
        assert!(track::on_free(0x5a5a_0000_1000));
    }

    #[test]
    fn report_to_file_and_bad_paths() {
        let path = std::env::temp_dir().join(format!("hbm-ffi-report-{}.txt", std::process::id()));
        let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { hbm_report_leaks(c_path.as_ptr()) }, HbmStatus::Ok);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("hbmalloc: LEAK SUMMARY: "), "{text}");
        let _ = std::fs::remove_file(&path);
        // SAFETY: a valid NUL-terminated path into a directory that does not exist.
        let bad = unsafe { hbm_report_leaks(c"/nonexistent-dir/x/report.txt".as_ptr()) };
        assert_eq!(bad, HbmStatus::IoError);
        let not_utf8 = [0xffu8 as c_char, 0];
        // SAFETY: a NUL-terminated (non-UTF-8) string.
        assert_eq!(
            unsafe { hbm_report_leaks(not_utf8.as_ptr()) },
            HbmStatus::InvalidValue
        );
    }
}
