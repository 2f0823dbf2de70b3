//! `Limited`: a backend adaptor that caps the device memory this process holds on one device
//! (`HBMALLOC_CONF=limit:SIZE` or `limit:FRACTION`, see docs/configuration.md).
//!
//! It counts the bytes held from the device below it, allocations (`alloc`) and committed VMM
//! pages (`vmm_map`), and refuses as out of memory any growth past the limit. Reserving address
//! space (`vmm_reserve`) holds no memory and is not counted. Every consumer of a device (the
//! caching pool behind `cudaMalloc`, the scratch pools, KV caches, paged KV block pools) sits on
//! the same `Limited`, so the limit is one sum over all of them; the retry paths above it (the
//! caching pool's release-and-retry, `Reclaiming`) give cached memory back before a refusal stands.
//!
//! Cost: one atomic read-modify-write per driver allocation or commit, which only the pools' slow
//! paths make. The count is this process's own: processes sharing a GPU each have their limit.

use super::{Backend, DevicePtr, SharedBackend};
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

pub struct Limited {
    upstream: SharedBackend,
    limit: usize,
    /// Invariant: the sum of the sizes of the successful `alloc`s and `vmm_map`s not yet given
    /// back, and never above `limit`. Charged before the upstream call, refunded if it fails, so
    /// racing allocations can never together pass the limit.
    held: AtomicUsize,
    /// Whether the line saying the limit was reached has been printed (once per device).
    reported: AtomicBool,
}

impl Limited {
    /// Caps what is held from `upstream` at `limit` bytes.
    pub fn new(upstream: SharedBackend, limit: usize) -> Limited {
        Limited {
            upstream,
            limit,
            held: AtomicUsize::new(0),
            reported: AtomicBool::new(false),
        }
    }

    /// The cap in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held from the device now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    fn charge(&self, size: usize) -> Result<()> {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(size).filter(|&n| n <= self.limit)
            })
            .map(drop)
            .map_err(|_| Error::OutOfMemory { requested: size })
    }

    fn refund(&self, size: usize) {
        // Saturating: a caller that gives back more than it took must not wrap the count into
        // "everything held" and lock the device out.
        let _ = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                Some(held.saturating_sub(size))
            });
    }

    /// Runs `op` with `size` bytes charged; the charge stays only if `op` succeeds.
    fn charged<T>(&self, size: usize, op: impl FnOnce() -> Result<T>) -> Result<T> {
        self.charge(size)?;
        op().inspect_err(|_| self.refund(size))
    }
}

impl Backend for Limited {
    fn alloc(&self, size: usize) -> Result<DevicePtr> {
        self.charged(size, || self.upstream.alloc(size))
    }
    fn free(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        self.upstream.free(ptr, size)?;
        self.refund(size);
        Ok(())
    }
    /// The limit as the device's total (the device's own total if that is smaller), and as free
    /// what the limit leaves, never more than the device really has free.
    fn mem_info(&self) -> Result<(usize, usize)> {
        let (free, total) = self.upstream.mem_info()?;
        let total = total.min(self.limit);
        let left = self.limit.saturating_sub(self.held());
        Ok((free.min(left).min(total), total))
    }
    fn report_out_of_memory(&self, requested: usize) {
        let held = self.held();
        let ours = held.saturating_add(requested) > self.limit;
        if ours && !self.reported.swap(true, Ordering::AcqRel) {
            use crate::units::human_bytes as h;
            eprintln!(
                "hbmalloc: device {}: memory limit reached: limit {} ({} bytes), held {}, {} more requested; allocations past the limit fail as out of memory (printed once)",
                self.device(),
                h(self.limit as u64),
                self.limit,
                h(held as u64),
                h(requested as u64),
            );
        }
        self.upstream.report_out_of_memory(requested);
    }
    fn vmm_map(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        self.charged(size, || self.upstream.vmm_map(ptr, size))
    }
    fn vmm_unmap(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        self.upstream.vmm_unmap(ptr, size)?;
        self.refund(size);
        Ok(())
    }
    forward_backend!(upstream; name, device, synchronize, event_record, event_done, event_release, stream_capture, exchange_capture_mode, lock_for_fork, vmm_granularity, vmm_reserve, vmm_release, copy_d2d, copy_to_host, copy_from_host, copy_from_host_on, kv_append, kv_dequantize, kv_append_jobs, kv_dequantize_jobs, paged_decode_attention);
}

#[cfg(test)]
#[path = "limit_tests.rs"]
mod tests;
