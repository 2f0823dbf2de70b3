//! The `hbm_pool_*` exports called from Rust, on whichever backend the process uses (the
//! simulated device without a GPU).

use super::*;
use std::ptr::{null, null_mut};

fn create(kind: HbmPoolKind, options: Option<&HbmPoolOptions>) -> *mut HbmPool {
    let mut pool = null_mut();
    let options = options.map_or(null(), |o| o as *const HbmPoolOptions);
    // SAFETY: `options` is NULL or a live struct; `pool` a local.
    let st = unsafe { hbm_pool_create(0, kind as c_int, options, &mut pool) };
    assert_eq!(st, HbmStatus::Ok);
    assert!(!pool.is_null());
    pool
}

fn stats(pool: *mut HbmPool) -> HbmPoolStats {
    let mut s = std::mem::MaybeUninit::uninit();
    // SAFETY: a live pool and a local to write.
    assert_eq!(
        unsafe { hbm_pool_stats(pool, s.as_mut_ptr()) },
        HbmStatus::Ok
    );
    // SAFETY: written by the successful call above.
    unsafe { s.assume_init() }
}

#[test]
fn defaults_are_ggmls() {
    let mut o = std::mem::MaybeUninit::<HbmPoolOptions>::uninit();
    // SAFETY: a local to write, then read once written.
    let o = unsafe {
        assert_eq!(hbm_pool_options_default(o.as_mut_ptr()), HbmStatus::Ok);
        o.assume_init()
    };
    assert_eq!(o.reserve_size, 32 << 30);
    assert_eq!(o.release_threshold, usize::MAX);
    assert_eq!((o.alignment, o.overallocation_percent), (256, 5));
    assert_eq!((o.reuse_limit_percent, o.max_cached_buffers), (0, 256));
    // SAFETY: NULL is the case under test.
    assert_eq!(
        unsafe { hbm_pool_options_default(null_mut()) },
        HbmStatus::NullParameter
    );
}

#[test]
fn both_kinds_round_trip_through_the_exports() {
    for kind in [HbmPoolKind::Legacy, HbmPoolKind::Vmm] {
        let pool = create(kind, None);
        let (mut p, mut actual) = (null_mut(), 0usize);
        // SAFETY: a live pool and locals to write; freed pointers come from this pool.
        unsafe {
            assert_eq!(
                hbm_pool_alloc(pool, 1000, &mut p, &mut actual),
                HbmStatus::Ok
            );
            assert!(!p.is_null() && actual >= 1000 && p as usize % 256 == 0);
            assert_eq!(
                hbm_pool_free(pool, p, actual + 256),
                HbmStatus::InvalidValue
            );
            assert_eq!(
                hbm_pool_free(pool, (p as *mut u8).add(256).cast(), 256),
                HbmStatus::InvalidPointer
            );
            assert_eq!(stats(pool).live, 1, "{kind:?}: bad frees freed nothing");
            assert_eq!(hbm_pool_free(pool, p, actual), HbmStatus::Ok);
            assert_eq!(
                hbm_pool_free(pool, p, actual),
                HbmStatus::InvalidPointer,
                "{kind:?}: double free"
            );
            assert_eq!(hbm_pool_free(pool, null_mut(), 0), HbmStatus::Ok);
            assert_eq!(hbm_pool_alloc(pool, 0, &mut p, &mut actual), HbmStatus::Ok);
            assert!(p.is_null() && actual == 0);
            let s = stats(pool);
            assert_eq!(s.kind, kind, "the simulated device has VMM");
            assert_eq!((s.allocs, s.frees, s.live, s.in_use), (1, 1, 0, 0));
            let mut released = 0usize;
            assert_eq!(hbm_pool_trim(pool, &mut released), HbmStatus::Ok);
            assert!(released > 0, "{kind:?}: trim gave back the cached memory");
            assert_eq!(stats(pool).committed, 0);
            hbm_pool_destroy(pool);
        }
    }
}

#[test]
fn null_and_bad_arguments_give_statuses() {
    let (mut p, mut actual, mut pool) = (null_mut(), 0usize, null_mut());
    // SAFETY: every call fails its checks before touching anything but the locals.
    unsafe {
        assert_eq!(
            hbm_pool_create(0, 0, null(), null_mut()),
            HbmStatus::NullParameter
        );
        assert_eq!(
            hbm_pool_create(0, 7, null(), &mut pool),
            HbmStatus::InvalidValue
        );
        assert_eq!(
            hbm_pool_create(-1, 0, null(), &mut pool),
            HbmStatus::InvalidDevice
        );
        let mut o = std::mem::zeroed::<HbmPoolOptions>();
        o.alignment = 384;
        assert_eq!(
            hbm_pool_create(0, 1, &o, &mut pool),
            HbmStatus::InvalidValue
        );
        assert!(pool.is_null(), "no pool on failure");
        assert_eq!(
            hbm_pool_alloc(null_mut(), 8, &mut p, &mut actual),
            HbmStatus::NullParameter
        );
        assert_eq!(hbm_pool_free(null_mut(), p, 0), HbmStatus::NullParameter);
        assert_eq!(
            hbm_pool_trim(null_mut(), null_mut()),
            HbmStatus::NullParameter
        );
        assert_eq!(hbm_pool_stats(null(), null_mut()), HbmStatus::NullParameter);
        hbm_pool_destroy(null_mut());
    }
    let pool = create(HbmPoolKind::Legacy, None);
    // SAFETY: a live pool; the NULL outputs are the case under test.
    unsafe {
        assert_eq!(
            hbm_pool_alloc(pool, 8, null_mut(), &mut actual),
            HbmStatus::NullParameter
        );
        assert_eq!(
            hbm_pool_alloc(pool, 8, &mut p, null_mut()),
            HbmStatus::NullParameter
        );
        assert_eq!(
            hbm_pool_alloc(pool, usize::MAX, &mut p, &mut actual),
            HbmStatus::OutOfMemory
        );
        hbm_pool_destroy(pool);
    }
}

#[test]
fn destroy_frees_live_allocations() {
    let mut o = std::mem::MaybeUninit::<HbmPoolOptions>::uninit();
    // SAFETY: a local to write, then read once written.
    let mut o = unsafe {
        hbm_pool_options_default(o.as_mut_ptr());
        o.assume_init()
    };
    o.reserve_size = 64 << 20;
    let pool = create(HbmPoolKind::Vmm, Some(&o));
    let s = stats(pool);
    assert_eq!(s.reserved, 64 << 20);
    let (mut p, mut actual) = (null_mut(), 0usize);
    // SAFETY: a live pool and locals; destroy gives it up.
    unsafe {
        assert_eq!(
            hbm_pool_alloc(pool, 3 << 20, &mut p, &mut actual),
            HbmStatus::Ok
        );
        assert_eq!(stats(pool).committed, 4 << 20, "two granules commit 3 MiB");
        assert!(crate::track::global().get(p as usize).is_some());
        hbm_pool_destroy(pool);
    }
    // Freed with its pool, not leaked: the block's record goes too.
    assert_eq!(crate::track::global().get(p as usize), None);
}

/// Issue 18, defect 1: `hbm_pool_free` of a block another entry point handed out is refused
/// without touching its record, so the owner's free still works; a refused free with a wrong
/// `actual` leaves the pool block's record (size, checkpoint epoch) as it was.
#[test]
fn refused_pool_free_leaves_the_record_alone() {
    use crate::tracked::device::{self as alloc, Api};
    use crate::tracked::host as host_alloc;
    let pool = create(HbmPoolKind::Legacy, None);
    for api in [Api::Runtime, Api::Hbm] {
        let p = alloc::alloc(0, 1000, None, api).unwrap();
        let before = crate::track::global().get(p).unwrap();
        // SAFETY: a live pool; the pointer is only looked up.
        let st = unsafe { hbm_pool_free(pool, p as *mut c_void, 4096) };
        assert_eq!(st, HbmStatus::InvalidPointer);
        assert_eq!(crate::track::global().get(p), Some(before), "{api:?}");
        alloc::free(p, None, api).expect("the owner's free still works");
    }
    let h = host_alloc::alloc_pinned(1000, crate::track::Origin::CudaMallocHost).unwrap();
    let before = crate::track::global().get(h).unwrap();
    // SAFETY: as above.
    let st = unsafe { hbm_pool_free(pool, h as *mut c_void, 4096) };
    assert_eq!(st, HbmStatus::InvalidPointer);
    assert_eq!(crate::track::global().get(h), Some(before));
    host_alloc::free_host(h).expect("cudaFreeHost still works");

    let (mut p, mut actual) = (null_mut(), 0);
    // SAFETY: a live pool and locals to write.
    assert_eq!(
        unsafe { hbm_pool_alloc(pool, 1000, &mut p, &mut actual) },
        HbmStatus::Ok
    );
    let before = crate::track::global().get(p as usize).unwrap();
    // SAFETY: a live pool; a wrong size is refused.
    let st = unsafe { hbm_pool_free(pool, p, actual + 256) };
    assert_eq!(st, HbmStatus::InvalidValue);
    assert_eq!(crate::track::global().get(p as usize), Some(before));

    // The right size, the wrong pool: refused, and the record (its checkpoint epoch included)
    // is as it was, so it does not count as new in `hbm_leaks_since`.
    let other = create(HbmPoolKind::Legacy, None);
    let mark = crate::track::checkpoint();
    // SAFETY: live pools; `p` is `pool`'s block.
    let st = unsafe { hbm_pool_free(other, p, actual) };
    assert_eq!(st, HbmStatus::InvalidPointer);
    assert_eq!(crate::track::global().get(p as usize), Some(before));
    assert!(before.epoch < mark);
    assert_eq!(stats(pool).live, 1);
    // SAFETY: the right size and pool now.
    assert_eq!(unsafe { hbm_pool_free(pool, p, actual) }, HbmStatus::Ok);
    assert_eq!(crate::track::global().get(p as usize), None);
    // SAFETY: live pools, not used again.
    unsafe {
        hbm_pool_destroy(other);
        hbm_pool_destroy(pool);
    }
}

/// Issue 18, defect 1, the owner check itself: a block of pool A freed through pool B with the
/// right size is refused as a pointer B does not own, and counted nowhere but as that refusal:
/// no free in the timeline, the record as it was, pool A's count unchanged. (Without the
/// check, B took the record, logged a free, then put the record back when its pool refused.)
#[test]
fn a_block_freed_through_another_pool_is_refused_and_logs_no_free() {
    if crate::test_child::is_child() {
        return freed_through_another_pool();
    }
    // The timeline is written at exit beside `report_json`: into a temporary place, not the
    // working directory.
    let report = std::env::temp_dir().join(format!("hbm-owner-check-{}.json", std::process::id()));
    let out = crate::test_child::run(
        "ffi::pool_api::tests::a_block_freed_through_another_pool_is_refused_and_logs_no_free",
        Some(&format!(
            "backend:sim,backtrace:off,leak_report:off,timeline:4096,report_json:{}",
            report.display()
        )),
    );
    for ext in ["json", "timeline.json", "timeline.svg"] {
        let _ = std::fs::remove_file(report.with_extension(ext));
    }
    assert!(out.contains("owner checks passed"), "{out}");
}

fn freed_through_another_pool() {
    use crate::track::timeline::EventKind;
    let tracker = crate::track::global();
    let frees_of = |p: usize| {
        let (events, dropped) = tracker.timeline().expect("timeline:4096").events();
        assert_eq!(dropped, 0);
        events
            .iter()
            .filter(|e| e.ptr == p && e.kind == EventKind::Free)
            .count()
    };
    for kind in [HbmPoolKind::Legacy, HbmPoolKind::Vmm] {
        let (a, b) = (create(kind, None), create(kind, None));
        let (mut p, mut actual) = (null_mut(), 0);
        // SAFETY: a live pool and locals to write.
        assert_eq!(
            unsafe { hbm_pool_alloc(a, 1000, &mut p, &mut actual) },
            HbmStatus::Ok
        );
        let before = tracker.get(p as usize).unwrap();
        let rejected = tracker.bad_free_count();
        // SAFETY: live pools; `p` is `a`'s block, of `actual` bytes.
        let st = unsafe { hbm_pool_free(b, p, actual) };
        assert_eq!(st, HbmStatus::InvalidPointer, "{kind:?}");
        assert_eq!(frees_of(p as usize), 0, "{kind:?}: no free logged");
        assert_eq!(
            tracker.bad_free_count(),
            rejected + 1,
            "{kind:?}: one refusal"
        );
        assert_eq!(tracker.get(p as usize), Some(before), "{kind:?}");
        assert_eq!((stats(a).live, stats(b).live), (1, 0), "{kind:?}");
        // SAFETY: the right pool now.
        assert_eq!(unsafe { hbm_pool_free(a, p, actual) }, HbmStatus::Ok);
        assert_eq!(frees_of(p as usize), 1, "{kind:?}: the real free is logged");
        // SAFETY: live pools, not used again.
        unsafe {
            hbm_pool_destroy(b);
            hbm_pool_destroy(a);
        }
    }
    println!("owner checks passed");
}
