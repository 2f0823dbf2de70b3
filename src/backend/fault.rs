//! `Faulty`: a backend adaptor that makes chosen driver calls fail, for testing what every layer
//! above does when the driver says no (`HBMALLOC_CONF=fault:...`, see docs/configuration.md).
//!
//! Each injected failure is the one the CUDA driver gives for that call, so the code a caller
//! finally sees is the runtime's: an allocation refused is out of memory (`cudaErrorMemoryAllocation`,
//! 2), a failed synchronize is `CUDA_ERROR_ILLEGAL_ADDRESS` (700, the way a faulting kernel
//! surfaces). Every injection prints one line on stderr saying which call failed. Calls are
//! counted per operation and per device, from 1, so a plan picks the Nth call exactly.

use super::{Backend, DevicePtr, Event, SharedBackend, Stream};
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub use crate::fault_plan::{FaultOp, FaultPlan, FaultRule, OPS};

/// The error the driver gives for `op`.
fn driver_error(op: FaultOp, size: usize) -> Error {
    match op {
        FaultOp::Alloc | FaultOp::Reserve | FaultOp::Map => Error::OutOfMemory { requested: size },
        FaultOp::Access => Error::Driver {
            call: "cuMemSetAccess",
            code: 999, // CUDA_ERROR_UNKNOWN
        },
        FaultOp::Event => Error::Driver {
            call: "cuEventRecord",
            code: 2, // CUDA_ERROR_OUT_OF_MEMORY
        },
        FaultOp::Sync => Error::Driver {
            call: "cuCtxSynchronize",
            code: 700, // CUDA_ERROR_ILLEGAL_ADDRESS
        },
    }
}

/// The backend adaptor: passes every call through, except those the plan makes fail.
pub struct Faulty {
    upstream: SharedBackend,
    plan: FaultPlan,
    /// Calls so far of each `FaultOp`, in `OPS` order.
    calls: [AtomicU64; OPS.len()],
    injected: AtomicU64,
    armed: AtomicBool,
    quiet: AtomicBool,
}

impl Faulty {
    pub fn new(upstream: SharedBackend, plan: FaultPlan) -> Faulty {
        Faulty {
            upstream,
            plan,
            calls: Default::default(),
            injected: AtomicU64::new(0),
            armed: AtomicBool::new(true),
            quiet: AtomicBool::new(false),
        }
    }

    /// Stops (or resumes) injecting; calls made while disarmed are not counted. For tests that
    /// clean up after the faults.
    pub fn set_armed(&self, armed: bool) {
        self.armed.store(armed, Ordering::Relaxed);
    }

    /// Stops (or resumes) the line on stderr per injected fault; for fuzzing, which injects
    /// thousands.
    pub fn set_quiet(&self, quiet: bool) {
        self.quiet.store(quiet, Ordering::Relaxed);
    }

    /// How many failures this adaptor has injected.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// Counts a call of `op`; the error to return if the plan makes this one fail.
    fn inject(&self, op: FaultOp, size: usize) -> Option<Error> {
        if !self.armed.load(Ordering::Relaxed) {
            return None;
        }
        let index = OPS.iter().position(|o| o.0 == op).unwrap_or(0);
        let call = self.calls[index].fetch_add(1, Ordering::Relaxed) + 1;
        if !self.plan.fails(op, call) {
            return None;
        }
        self.injected.fetch_add(1, Ordering::Relaxed);
        let error = driver_error(op, size);
        if self.quiet.load(Ordering::Relaxed) {
            return Some(error);
        }
        eprintln!(
            "hbmalloc: fault injected: {} call {call} on device {} failed: {error}",
            op.name(),
            self.upstream.device()
        );
        Some(error)
    }

    fn check(&self, op: FaultOp, size: usize) -> Result<()> {
        self.inject(op, size).map_or(Ok(()), Err)
    }
}

impl Backend for Faulty {
    fn alloc(&self, size: usize) -> Result<DevicePtr> {
        self.check(FaultOp::Alloc, size)?;
        self.upstream.alloc(size)
    }
    fn synchronize(&self) -> Result<()> {
        self.check(FaultOp::Sync, 0)?;
        self.upstream.synchronize()
    }
    fn event_record(&self, stream: Stream) -> Result<Event> {
        self.check(FaultOp::Event, 0)?;
        self.upstream.event_record(stream)
    }
    fn vmm_reserve(&self, size: usize) -> Result<DevicePtr> {
        self.check(FaultOp::Reserve, size)?;
        self.upstream.vmm_reserve(size)
    }
    fn vmm_map(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        self.check(FaultOp::Map, size)?;
        self.upstream.vmm_map(ptr, size)?;
        if let Some(e) = self.inject(FaultOp::Access, size) {
            // Committed, but without access: undo the commit, as a driver-side failure here
            // leaves the caller nothing to clean up.
            let _ = self.upstream.vmm_unmap(ptr, size);
            return Err(e);
        }
        Ok(())
    }
    forward_backend!(upstream; name, device, free, mem_info, report_out_of_memory, event_done, event_release, stream_capture, exchange_capture_mode, lock_for_fork, vmm_granularity, vmm_release, vmm_unmap, copy_d2d, copy_to_host, copy_from_host, copy_from_host_on, kv_append, kv_dequantize, kv_append_jobs, kv_dequantize_jobs, paged_decode_attention);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sim::SimBackend;
    use std::sync::Arc;

    #[test]
    fn plans_parse_and_bad_ones_say_why() {
        let plan = FaultPlan::parse("alloc@3+sync+map@2..+access@4..5").unwrap();
        assert_eq!(
            plan.rules,
            vec![
                FaultRule {
                    op: FaultOp::Alloc,
                    first: 3,
                    last: 3
                },
                FaultRule {
                    op: FaultOp::Sync,
                    first: 1,
                    last: u64::MAX
                },
                FaultRule {
                    op: FaultOp::Map,
                    first: 2,
                    last: u64::MAX
                },
                FaultRule {
                    op: FaultOp::Access,
                    first: 4,
                    last: 5
                },
            ]
        );
        for (bad, why) in [
            ("", "unknown operation ''"),
            ("malloc@1", "unknown operation 'malloc'"),
            ("alloc@0", "bad call number '0'"),
            ("alloc@", "bad call number ''"),
            ("alloc@x", "bad call number 'x'"),
            ("alloc@5..2", "bad call number '5..2'"),
            ("alloc@-1", "bad call number '-1'"),
            ("alloc@1+", "unknown operation ''"),
        ] {
            let err = FaultPlan::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn the_chosen_calls_fail_with_the_drivers_error_and_others_pass() {
        let sim = Arc::new(SimBackend::new(0, 64 << 20));
        let f = Faulty::new(sim.clone(), FaultPlan::parse("alloc@2+sync@1").unwrap());
        let a = f.alloc(1 << 20).unwrap();
        assert_eq!(
            f.alloc(1 << 20),
            Err(Error::OutOfMemory { requested: 1 << 20 })
        );
        let b = f.alloc(1 << 20).unwrap();
        assert_eq!(
            f.synchronize(),
            Err(Error::Driver {
                call: "cuCtxSynchronize",
                code: 700
            })
        );
        f.synchronize().unwrap();
        assert_eq!(f.injected(), 2);
        f.free(a, 1 << 20).unwrap();
        f.free(b, 1 << 20).unwrap();
        assert_eq!(sim.used(), 0);
    }

    #[test]
    fn a_commit_that_fails_half_way_is_undone() {
        let sim = Arc::new(SimBackend::new(0, 64 << 20));
        let f = Faulty::new(sim.clone(), FaultPlan::parse("access@1").unwrap());
        let g = f.vmm_granularity().unwrap();
        let base = f.vmm_reserve(4 * g).unwrap();
        assert!(matches!(
            f.vmm_map(base, 2 * g),
            Err(Error::Driver {
                call: "cuMemSetAccess",
                ..
            })
        ));
        assert_eq!(sim.used(), 0, "the committed pages went back");
        f.vmm_map(base, 2 * g)
            .expect("the range is free to map again");
        f.vmm_unmap(base, 2 * g).unwrap();
        f.vmm_release(base, 4 * g).unwrap();
    }
}
