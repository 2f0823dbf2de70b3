//! Injected driver faults (`backend::fault`, `HBMALLOC_CONF=fault:...`): the driver refusing an
//! allocation, a VMM commit failing before or half-way through (set-access), an event that
//! cannot be recorded, a synchronize that fails. After each, the pools, the KV cache and the
//! tracker pass every invariant check (`harness::world::World::check`), the caller gets the
//! runtime's code, and one line on stderr says what happened.
//!
//! The first tests build the layers over a faulty simulated device directly; the last ones run
//! the C entry points in a child process of this test binary with `HBMALLOC_CONF` set.

use hbmalloc::backend::fault::FaultPlan;
use hbmalloc::config::StreamSafety;
use hbmalloc::error::Error;
use hbmalloc::ffi::status::to_cuda_error;
use hbmalloc::harness::world::{Setup, World};
use hbmalloc::kv::layout::Growth;
use std::process::Command;

const MIB: usize = 1 << 20;

fn world(faults: &str, setup: Setup) -> World {
    let w = World::new(&Setup {
        faults: FaultPlan::parse(faults).unwrap(),
        ..setup
    });
    w.check();
    w
}

fn code(e: &Error) -> i32 {
    to_cuda_error(e)
}

#[test]
fn a_refused_allocation_is_out_of_memory_and_changes_nothing() {
    // Calls 1 and 2: the shared chunk and then the block-sized one the pool falls back to.
    let mut w = world("alloc@1..2", Setup::default());
    let before = w.sim.used();
    w.pool_alloc(MIB, None);
    assert_eq!(w.failures, 1);
    assert!(w.live.is_empty(), "no block, no record");
    assert_eq!(w.sim.used(), before);
    w.check_full();
    w.pool_alloc(MIB, None);
    assert_eq!(w.live.len(), 1, "the next allocation is served");
    // The scratch pool and the KV cache (realloc growth) on a refusal too.
    let mut w2 = world(
        "alloc@1",
        Setup {
            growth: Growth::Realloc,
            ..Setup::default()
        },
    );
    let e = w2.scratch[0].as_ref().unwrap().alloc(MIB).unwrap_err();
    assert_eq!(code(&e), 2);
    w2.kv_reserve(0, 64);
    w2.check();
    w.check_full();
    w.drain();
    w2.drain();
}

#[test]
fn a_kv_commit_that_fails_on_its_second_tensor_is_rolled_back() {
    for (plan, want) in [
        ("map@2", 2),
        ("access@2", 999),
        ("map@4", 2),
        ("access@3", 999),
    ] {
        let mut w = world(plan, Setup::default());
        let kv = w.kv.as_ref().unwrap();
        // Four tensors (K and V of 2 layers): the failure comes after some committed.
        let e = kv.reserve(0, 1024).unwrap_err();
        assert_eq!(code(&e), want, "{plan}: {e:?}");
        let st = kv.stats();
        assert_eq!((st.committed, st.n_seq), (0, 0), "{plan}: nothing kept");
        assert_eq!(w.sim.used(), 0, "{plan}: every page went back");
        w.check();
        // The same request succeeds once the fault has passed.
        w.kv_reserve(0, 1024);
        assert_eq!(w.kv_seqs.get(&0), Some(&1024), "{plan}");
        w.check();
        w.drain();
    }
}

#[test]
fn a_vmm_scratch_pool_commit_that_fails_leaves_the_pool_as_it_was() {
    for (plan, want) in [("map@1", 2), ("access@1", 999)] {
        let mut w = world(plan, Setup::default());
        let pool = w.scratch[1].as_ref().unwrap();
        let e = pool.alloc(3 * MIB).unwrap_err();
        assert_eq!(code(&e), want, "{plan}");
        assert_eq!(pool.stats().committed, 0);
        w.check();
        w.scratch_alloc(1, 3 * MIB);
        assert_eq!(w.scratch_live[1].len(), 1, "{plan}: served after the fault");
        w.check();
        w.drain();
    }
}

#[test]
fn a_failed_event_record_still_frees_the_block_safely() {
    let mut w = world("event@1", Setup::default());
    w.pool_alloc(MIB, None);
    let p = *w.live.keys().next().unwrap();
    w.pool_free(p, Some(0x1000));
    assert_eq!(w.faults.injected(), 1);
    w.check();
    // Not reused at once on its stream (it has no event): it waits for a synchronize.
    w.pool_alloc(MIB, Some(0x1000));
    let q = *w.live.keys().next().unwrap();
    assert_ne!(
        p, q,
        "without its event the block is not reused on its stream at once"
    );
    w.check();
    w.drain();
}

#[test]
fn a_failed_synchronize_is_the_drivers_code_and_loses_nothing() {
    // Freed blocks waiting for a synchronize (8 MiB pending limit): the allocation that needs
    // them asks for one, which fails.
    let mut w = world(
        "sync@1",
        Setup {
            capacity: 64 * MIB,
            ..Setup::default()
        },
    );
    for _ in 0..40 {
        w.pool_alloc(MIB, None);
    }
    let blocks: Vec<usize> = w.live.keys().copied().collect();
    for p in blocks {
        w.pool_free(p, None);
    }
    let mut seen = None;
    for _ in 0..64 {
        match w.pool.alloc_unchecked(MIB) {
            Ok((p, b)) => {
                w.pool.free_unchecked(p, b);
            }
            Err(e) => {
                seen = Some(e);
                break;
            }
        }
    }
    let e = seen.expect("an allocation needed the synchronize");
    assert_eq!(code(&e), 700, "{e:?}");
    w.check_full();
    w.pool_alloc(MIB, None);
    assert_eq!(w.live.len(), 1, "served once the device answers again");
    w.drain();
}

#[test]
fn a_scratch_free_whose_synchronize_fails_is_still_a_free() {
    // max_cached 4: the fifth free gives its buffer back to the driver, after a synchronize.
    let mut w = world("sync@1..", Setup::default());
    for i in 0..5 {
        w.scratch_alloc(0, MIB + i * 4096);
    }
    let ptrs: Vec<usize> = w.scratch_live[0].keys().copied().collect();
    for p in ptrs {
        w.scratch_free(0, p);
        w.check();
    }
    assert!(w.faults.injected() >= 1, "the release tried to synchronize");
    let st = w.scratch[0].as_ref().unwrap().stats();
    assert_eq!((st.in_use, st.live), (0, 0));
    w.drain();
}

#[test]
fn a_kv_trim_whose_synchronize_fails_keeps_the_pages() {
    let mut w = world("sync@1..", Setup::default());
    w.kv_reserve(0, 512);
    w.kv_release(0);
    let held = w.sim.used();
    assert!(held > 0);
    w.kv_trim();
    assert_eq!(w.sim.used(), held, "no page unmapped without a synchronize");
    assert!(w.kv.as_ref().unwrap().stats().cached > 0, "still cached");
    w.check();
    w.drain();
}

#[test]
fn faults_leave_eager_and_trusting_pools_consistent_too() {
    for safety in [StreamSafety::Eager, StreamSafety::Off] {
        let mut w = world(
            "sync@2..+event@1..+alloc@3",
            Setup {
                stream_safety: safety,
                ..Setup::default()
            },
        );
        for i in 0..20 {
            w.pool_alloc((i + 1) * 100_000, (i % 2 == 1).then_some(0x2000));
            if i % 3 == 0 {
                let p = *w.live.keys().next().unwrap();
                w.pool_free(p, (i % 2 == 0).then_some(0x2000));
            }
            w.check();
        }
        w.pool_trim();
        w.check_full();
        w.drain();
    }
}

// ---- Through the C entry points, in a child process with HBMALLOC_CONF set.

/// Runs `scenario` in a child process under `conf`; returns its stderr.
fn child(scenario: &str, conf: &str) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_scenario",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("HBM_FAULT_SCENARIO", scenario)
        .env(
            "HBMALLOC_CONF",
            format!("backend:sim,sim_capacity:64MiB,leak_report:off,{conf}"),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{scenario}: {stdout}\n{stderr}");
    assert!(
        stdout.contains("scenario passed"),
        "{scenario}: {stdout}\n{stderr}"
    );
    stderr
}

fn fault_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.starts_with("hbmalloc: fault injected: "))
        .collect()
}

#[test]
fn cuda_malloc_refused_by_the_driver_returns_2_and_says_so_once() {
    let stderr = child("malloc_refused", "fault:alloc@1..2");
    let lines = fault_lines(&stderr);
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].contains("alloc call 1 on device 0 failed: out of memory"),
        "{stderr}"
    );
}

#[test]
fn cuda_malloc_after_a_failed_synchronize_returns_700_from_then_on() {
    let stderr = child("sync_fails", "fault:sync@1,pending_limit:4MiB");
    let lines = fault_lines(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0]
            .contains("sync call 1 on device 0 failed: cuCtxSynchronize failed with CUresult 700"),
        "{stderr}"
    );
}

#[test]
fn cuda_free_async_without_an_event_returns_0() {
    let stderr = child("event_fails", "fault:event@1..");
    assert!(!fault_lines(&stderr).is_empty(), "{stderr}");
}

#[test]
fn a_bad_fault_plan_is_one_warning_and_no_faults() {
    let stderr = child("no_faults", "fault:alloc@0");
    assert!(
        stderr.contains("hbmalloc: HBMALLOC_CONF key 'fault': bad value 'alloc@0'"),
        "{stderr}"
    );
    assert!(fault_lines(&stderr).is_empty(), "{stderr}");
}

/// The child's side of the tests above (a no-op when run without HBM_FAULT_SCENARIO).
#[test]
fn child_scenario() {
    use hbmalloc::ffi::cuda_api::*;
    use hbmalloc::ffi::hbm_api::{hbm_stats, HbmStats};
    use std::ffi::c_void;
    let Ok(scenario) = std::env::var("HBM_FAULT_SCENARIO") else {
        return;
    };
    let stats = || {
        let mut s = std::mem::MaybeUninit::<HbmStats>::zeroed();
        // SAFETY: a writable HbmStats.
        unsafe {
            hbm_stats(0, s.as_mut_ptr());
            s.assume_init()
        }
    };
    let mem = || {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: two writable out-parameters.
        assert_eq!(unsafe { cudaMemGetInfo(&mut free, &mut total) }, 0);
        free
    };
    let malloc = |size: usize| {
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: a writable out-parameter.
        let rc = unsafe { cudaMalloc(&mut p, size) };
        (rc, p)
    };
    let free_at_start = mem();
    match scenario.as_str() {
        "malloc_refused" => {
            let (rc, p) = malloc(MIB);
            assert_eq!((rc, p.is_null()), (2, true));
            assert_eq!(
                cudaGetLastError(),
                2,
                "the runtime's sticky-until-read error"
            );
            assert_eq!(cudaGetLastError(), 0);
            assert_eq!(stats().in_use, 0, "nothing recorded");
            let (rc, p) = malloc(MIB);
            assert_eq!(rc, 0);
            // SAFETY: a pointer cudaMalloc gave.
            assert_eq!(unsafe { cudaFree(p) }, 0);
        }
        "sync_fails" => {
            // Frees that wait for a synchronize (4 MiB pending limit), then allocations until
            // one needs it.
            let blocks: Vec<_> = (0..8).map(|_| malloc(MIB).1).collect();
            for p in blocks {
                // SAFETY: pointers cudaMalloc gave.
                assert_eq!(unsafe { cudaFree(p) }, 0);
            }
            let mut codes = Vec::new();
            let mut held = Vec::new();
            for _ in 0..80 {
                let (rc, p) = malloc(MIB);
                codes.push(rc);
                if rc == 0 {
                    held.push(p);
                } else {
                    assert_eq!(cudaGetLastError(), rc);
                }
            }
            // 700 is one of CUDA's sticky errors: from the failed synchronize on, the runtime
            // answers every call with it, and so does hbmalloc.
            let first = codes.iter().position(|&c| c != 0).expect("one failed");
            assert!(codes[first..].iter().all(|&c| c == 700), "{codes:?}");
            // Consistent all the same: exactly the blocks handed out are in use.
            let s = stats();
            assert_eq!(s.in_use, (held.len() * MIB) as u64);
            assert_eq!(s.allocs - s.frees, held.len() as u64);
            println!("scenario passed");
            return;
        }
        "event_fails" => {
            let blocks: Vec<_> = (0..4).map(|_| malloc(MIB).1).collect();
            for p in blocks {
                // SAFETY: pointers cudaMalloc gave; 0x1000 stands for a stream handle.
                assert_eq!(unsafe { cudaFreeAsync(p, 0x1000 as _) }, 0);
            }
        }
        "no_faults" => {
            let (rc, p) = malloc(MIB);
            assert_eq!(rc, 0);
            // SAFETY: a pointer cudaMalloc gave.
            assert_eq!(unsafe { cudaFree(p) }, 0);
        }
        other => panic!("unknown scenario {other}"),
    }
    let s = stats();
    assert_eq!((s.in_use, s.allocs - s.frees), (0, 0), "nothing leaked");
    let mut released = 0u64;
    // SAFETY: a writable out-parameter.
    unsafe { hbmalloc::ffi::hbm_api::hbm_trim(0, &mut released) };
    assert_eq!(mem(), free_at_start, "cudaMemGetInfo back where it started");
    println!("scenario passed");
}
