//! Scratch pools in the shape of ggml's `ggml_cuda_pool`: `alloc(size) -> (ptr, actual)` and
//! `free(ptr, actual)`. Two kinds, one interface:
//! - `Legacy` (`legacy.rs`): whole cached buffers, best fit, as ggml's `ggml_cuda_pool_leg`;
//! - `Vmm` (`vmm.rs`): one virtual reservation, physical memory committed on demand, frees in any
//!   order with coalescing, as ggml's `ggml_cuda_pool_vmm` without its reverse-order rule.
//!
//! A `Vmm` pool on a device without VMM support, or whose reservation the driver refuses, becomes
//! a `Legacy` pool with one notice line: a scratch pool never aborts its host for lack of VMM.
//!
//! Stream contract (ggml's): a pool serves one stream. A freed block may be handed out again at
//! once, because work on that stream runs in order; memory given back to the driver (trim, the
//! release threshold, destruction) is given back only after `backend.synchronize()`.

use super::legacy::LegacyPool;
use super::vmm::VmmPool;
use crate::backend::{DevicePtr, SharedBackend};
use crate::error::{Error, Result};

/// Which scratch pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScratchKind {
    Legacy,
    Vmm,
}

/// How a scratch pool behaves. `Default` gives ggml's choices where ggml has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScratchOptions {
    /// `Vmm`: bytes of address space to reserve; 0 is the default, 32 GiB (ggml's). Capped at the
    /// device's total memory (rounded up to the granularity): more could never be committed.
    pub reserve_size: usize,
    /// Bytes the pool may keep from the driver while they are unused. When a free leaves the pool
    /// holding more (committed, for `Vmm`; in use plus cached, for `Legacy`), unused memory above
    /// it goes back to the driver at once, after a device synchronize. `usize::MAX` (the default)
    /// keeps everything until `trim`, as ggml does; 0 gives back everything unused at every free.
    pub release_threshold: usize,
    /// Alignment of every pointer handed out, a power of two; at least 256 is always given.
    /// 0 is the default, 256. `Vmm`: at most the VMM granularity.
    pub alignment: usize,
    /// `Legacy`: a new buffer is this many percent larger than the request (ggml: 5), so that a
    /// slightly larger request later still finds it in the cache.
    pub overallocation_percent: u32,
    /// `Legacy`: a cached buffer serves a request only if it is at most this many percent larger
    /// than the request; 0 means any larger buffer serves (ggml's rule, the default).
    pub reuse_limit_percent: u32,
    /// `Legacy`: most buffers kept cached (ggml: 256); a buffer freed into a full cache goes back
    /// to the driver (after a synchronize).
    pub max_cached_buffers: u32,
}

/// ggml's reservation for its VMM pool.
pub const DEFAULT_RESERVE: usize = 32 << 30;
/// `cudaMalloc`'s alignment, and ggml's legacy pool rounding.
pub const MIN_ALIGNMENT: usize = 256;

impl Default for ScratchOptions {
    fn default() -> Self {
        ScratchOptions {
            reserve_size: DEFAULT_RESERVE,
            release_threshold: usize::MAX,
            alignment: MIN_ALIGNMENT,
            overallocation_percent: 5,
            reuse_limit_percent: 0,
            max_cached_buffers: 256,
        }
    }
}

impl ScratchOptions {
    /// Checks the options and fills in the defaults that 0 stands for.
    pub fn resolved(mut self) -> Result<ScratchOptions> {
        if self.reserve_size == 0 {
            self.reserve_size = DEFAULT_RESERVE;
        }
        if self.alignment == 0 {
            self.alignment = MIN_ALIGNMENT;
        }
        if !self.alignment.is_power_of_two() || self.alignment > (1 << 30) {
            return Err(Error::InvalidValue(
                "pool alignment must be a power of two of at most 1 GiB",
            ));
        }
        self.alignment = self.alignment.max(MIN_ALIGNMENT);
        if self.overallocation_percent > 1000 || self.reuse_limit_percent > 100_000 {
            return Err(Error::InvalidValue("pool percentages out of range"));
        }
        Ok(self)
    }
}

/// A snapshot of one scratch pool's statistics. Bytes are `actual` sizes, as handed out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScratchStats {
    /// Bytes handed out and not yet freed, and how many allocations that is.
    pub in_use: u64,
    pub live: u64,
    pub peak_in_use: u64,
    /// Bytes of device memory the pool holds: mapped (`Vmm`) or allocated (`Legacy`).
    pub committed: u64,
    pub peak_committed: u64,
    /// `Vmm`: bytes of address space reserved; `Legacy`: the same as `committed`.
    pub reserved: u64,
    pub allocs: u64,
    pub frees: u64,
    /// Allocations served from memory the pool held, and those that went to the driver.
    pub hits: u64,
    pub misses: u64,
    /// Times memory went back to the driver (trim, release threshold, full cache), and how much.
    pub trims: u64,
    pub released_bytes: u64,
}

/// A scratch pool of either kind.
pub enum ScratchPool {
    Legacy(LegacyPool),
    Vmm(VmmPool),
}

impl ScratchPool {
    /// Creates a pool of `kind` on `backend`. A `Vmm` request that the device cannot serve (no
    /// VMM, or the reservation refused) gives a `Legacy` pool and prints one notice line; bad
    /// options are `InvalidValue`, for either kind.
    pub fn new(
        backend: SharedBackend,
        kind: ScratchKind,
        options: ScratchOptions,
    ) -> Result<ScratchPool> {
        let options = options.resolved()?;
        match kind {
            ScratchKind::Legacy => Ok(ScratchPool::Legacy(LegacyPool::new(backend, options))),
            ScratchKind::Vmm => match VmmPool::new(backend.clone(), options) {
                Ok(pool) => Ok(ScratchPool::Vmm(pool)),
                Err(e @ Error::InvalidValue(_)) => Err(e),
                Err(why) => {
                    eprintln!(
                        "hbmalloc: notice: device {}: VMM pool unavailable ({why}); using the legacy pool",
                        backend.device()
                    );
                    Ok(ScratchPool::Legacy(LegacyPool::new(backend, options)))
                }
            },
        }
    }

    /// The kind in force (`Legacy` after a fallback).
    pub fn kind(&self) -> ScratchKind {
        match self {
            ScratchPool::Legacy(_) => ScratchKind::Legacy,
            ScratchPool::Vmm(_) => ScratchKind::Vmm,
        }
    }

    /// The device this pool allocates on.
    pub fn device(&self) -> i32 {
        match self {
            ScratchPool::Legacy(p) => p.device(),
            ScratchPool::Vmm(p) => p.device(),
        }
    }

    /// Allocates at least `size` (> 0) bytes; returns the pointer and the `actual` size to pass
    /// back to `free`.
    pub fn alloc(&self, size: usize) -> Result<(DevicePtr, usize)> {
        match self {
            ScratchPool::Legacy(p) => p.alloc(size),
            ScratchPool::Vmm(p) => p.alloc(size),
        }
    }

    /// Frees `ptr`, which `alloc` returned with `actual`. A wrong size is `InvalidValue` and an
    /// unknown, interior or freed pointer its `Error`; either way nothing is freed.
    pub fn free(&self, ptr: DevicePtr, actual: usize) -> Result<()> {
        match self {
            ScratchPool::Legacy(p) => p.free(ptr, actual),
            ScratchPool::Vmm(p) => p.free(ptr, actual),
        }
    }

    /// Gives every unused byte the pool can back to the driver (after one synchronize); returns
    /// the bytes given back. `Vmm` gives back whole mappings at the top of its committed region.
    pub fn trim(&self) -> Result<usize> {
        match self {
            ScratchPool::Legacy(p) => p.trim(),
            ScratchPool::Vmm(p) => p.trim(),
        }
    }

    pub fn stats(&self) -> ScratchStats {
        match self {
            ScratchPool::Legacy(p) => p.stats(),
            ScratchPool::Vmm(p) => p.stats(),
        }
    }
}

/// Rounds `size` up to `align` (a power of two); `None` on overflow.
pub(super) fn round_up(size: usize, align: usize) -> Option<usize> {
    size.checked_next_multiple_of(align)
}

/// The counters behind `ScratchStats`, kept inside each pool's mutex.
#[derive(Default)]
pub(super) struct Counters {
    s: ScratchStats,
}

impl Counters {
    pub(super) fn on_alloc(&mut self, actual: usize, hit: bool) {
        let s = &mut self.s;
        s.in_use += actual as u64;
        s.peak_in_use = s.peak_in_use.max(s.in_use);
        s.live += 1;
        s.allocs += 1;
        if hit {
            s.hits += 1;
        } else {
            s.misses += 1;
        }
    }

    pub(super) fn on_free(&mut self, actual: usize) {
        self.s.in_use -= actual as u64;
        self.s.live -= 1;
        self.s.frees += 1;
    }

    pub(super) fn on_commit(&mut self, bytes: usize) {
        self.s.committed += bytes as u64;
        self.s.peak_committed = self.s.peak_committed.max(self.s.committed);
    }

    /// Memory given back to the driver; `on_trim` counts the event, once per group of releases.
    pub(super) fn on_release(&mut self, bytes: usize) {
        self.s.committed -= bytes as u64;
        self.s.released_bytes += bytes as u64;
    }

    pub(super) fn on_trim(&mut self) {
        self.s.trims += 1;
    }

    pub(super) fn committed(&self) -> usize {
        self.s.committed as usize
    }

    pub(super) fn snapshot(&self, reserved: Option<usize>) -> ScratchStats {
        let mut s = self.s;
        s.reserved = reserved.map_or(s.committed, |r| r as u64);
        s
    }
}
