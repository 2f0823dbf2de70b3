//! A test backend: the simulated device held to CUDA's unmap rule (a `vmm_unmap` must be made of
//! whole ranges given to `vmm_map`; the simulated device does not check that by itself), and
//! optionally without VMM, or refusing to reserve address space.

// Each test binary uses part of this module.
#![allow(dead_code)]

use hbmalloc::backend::sim::{SimBackend, SIM_GRANULARITY};
use hbmalloc::backend::{Backend, DevicePtr};
use hbmalloc::error::{Error, Result};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

const G: usize = SIM_GRANULARITY;

/// The simulated device, held to CUDA's unmap rule, optionally without VMM or refusing to reserve.
pub struct Strict {
    sim: SimBackend,
    no_vmm: bool,
    refuse_reserve: bool,
    maps: Mutex<BTreeMap<DevicePtr, usize>>,
    pub violations: AtomicUsize,
}

impl Strict {
    pub fn new(capacity: usize) -> Arc<Strict> {
        Strict::with(capacity, false, false)
    }

    pub fn with(capacity: usize, no_vmm: bool, refuse_reserve: bool) -> Arc<Strict> {
        Arc::new(Strict {
            sim: SimBackend::new(0, capacity),
            no_vmm,
            refuse_reserve,
            maps: Mutex::new(BTreeMap::new()),
            violations: AtomicUsize::new(0),
        })
    }

    pub fn used(&self) -> usize {
        self.sim.used()
    }

    /// Unmap calls that would have cut a mapping on CUDA.
    pub fn violations(&self) -> usize {
        self.violations.load(Ordering::Relaxed)
    }

    pub fn sync_count(&self) -> usize {
        self.sim.sync_count()
    }
}

impl Backend for Strict {
    hbmalloc::forward_backend!(sim; alloc, free, mem_info, synchronize, event_record, event_done, event_release, copy_d2d, copy_to_host, copy_from_host);
    fn name(&self) -> &'static str {
        "strict-sim"
    }
    fn device(&self) -> i32 {
        0
    }
    fn vmm_granularity(&self) -> Option<usize> {
        (!self.no_vmm).then_some(G)
    }
    fn vmm_reserve(&self, size: usize) -> Result<DevicePtr> {
        if self.refuse_reserve {
            return Err(Error::OutOfMemory { requested: size });
        }
        self.sim.vmm_reserve(size)
    }
    fn vmm_release(&self, base: DevicePtr, size: usize) -> Result<()> {
        let maps = self.maps.lock().unwrap();
        assert!(
            maps.range(base..base + size).next().is_none(),
            "release with live mappings"
        );
        self.sim.vmm_release(base, size)
    }
    fn vmm_map(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        self.sim.vmm_map(ptr, size)?;
        self.maps.lock().unwrap().insert(ptr, size);
        Ok(())
    }
    fn vmm_unmap(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        let mut maps = self.maps.lock().unwrap();
        let mut covered = ptr;
        let whole: Vec<_> = maps.range(ptr..ptr + size).map(|(&s, &l)| (s, l)).collect();
        for &(s, l) in &whole {
            if s != covered || s + l > ptr + size {
                break;
            }
            covered = s + l;
        }
        if size == 0 || covered != ptr + size {
            self.violations.fetch_add(1, Ordering::Relaxed);
            return Err(Error::InvalidValue("unmap cuts a mapping"));
        }
        for (s, _) in whole {
            maps.remove(&s);
        }
        self.sim.vmm_unmap(ptr, size)
    }
}
