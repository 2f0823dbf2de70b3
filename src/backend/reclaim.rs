//! `Reclaiming`: a backend adaptor for the consumers of device memory other than the caching
//! pool behind `cudaMalloc` (scratch pools, KV caches). When the device is out of memory it first
//! asks the process's caches to give memory back (the `reclaim` callback, installed by the layer
//! that owns the caches), then tries once more: memory freed by `cudaFree` and cached never makes
//! `hbm_pool_alloc` or a KV cache fail, as it never makes `cudaMalloc` fail.
//!
//! The caching pool itself sits on the plain backend: it reclaims its own cache on its slow path,
//! and a callback into it from under its own locks would deadlock.

use super::{Backend, DevicePtr, Event, KvRows, SharedBackend, Stream};
use crate::dtype::HbmType;
use crate::error::{Error, Result};

/// Releases cached memory of `device` to the driver; returns how many bytes it released.
pub type Reclaim = Box<dyn Fn(i32) -> usize + Send + Sync>;

pub struct Reclaiming {
    upstream: SharedBackend,
    reclaim: Reclaim,
}

impl Reclaiming {
    pub fn new(upstream: SharedBackend, reclaim: Reclaim) -> Reclaiming {
        Reclaiming { upstream, reclaim }
    }

    /// Runs `op`; on out of memory, reclaims and runs it once more if anything was released.
    /// An out of memory that stands is reported to the upstream (`Backend::report_out_of_memory`).
    fn retry<T>(&self, size: usize, op: impl Fn() -> Result<T>) -> Result<T> {
        let result = match op() {
            Err(Error::OutOfMemory { .. }) if (self.reclaim)(self.upstream.device()) > 0 => op(),
            other => other,
        };
        if let Err(Error::OutOfMemory { .. }) = result {
            self.upstream.report_out_of_memory(size);
        }
        result
    }
}

impl Backend for Reclaiming {
    fn name(&self) -> &'static str {
        self.upstream.name()
    }
    fn device(&self) -> i32 {
        self.upstream.device()
    }
    fn alloc(&self, size: usize) -> Result<DevicePtr> {
        self.retry(size, || self.upstream.alloc(size))
    }
    fn free(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        self.upstream.free(ptr, size)
    }
    fn mem_info(&self) -> Result<(usize, usize)> {
        self.upstream.mem_info()
    }
    fn report_out_of_memory(&self, requested: usize) {
        self.upstream.report_out_of_memory(requested)
    }
    fn synchronize(&self) -> Result<()> {
        self.upstream.synchronize()
    }
    fn event_record(&self, stream: Stream) -> Result<Event> {
        self.upstream.event_record(stream)
    }
    fn event_done(&self, event: Event) -> Result<bool> {
        self.upstream.event_done(event)
    }
    fn event_release(&self, event: Event) {
        self.upstream.event_release(event)
    }
    fn vmm_granularity(&self) -> Option<usize> {
        self.upstream.vmm_granularity()
    }
    fn vmm_reserve(&self, size: usize) -> Result<DevicePtr> {
        self.upstream.vmm_reserve(size)
    }
    fn vmm_release(&self, base: DevicePtr, size: usize) -> Result<()> {
        self.upstream.vmm_release(base, size)
    }
    fn vmm_map(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        self.retry(size, || self.upstream.vmm_map(ptr, size))
    }
    fn vmm_unmap(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        self.upstream.vmm_unmap(ptr, size)
    }
    fn copy_d2d(&self, dst: DevicePtr, src: DevicePtr, size: usize, stream: Stream) -> Result<()> {
        self.upstream.copy_d2d(dst, src, size, stream)
    }
    fn copy_to_host(&self, dst: &mut [u8], src: DevicePtr) -> Result<()> {
        self.upstream.copy_to_host(dst, src)
    }
    fn copy_from_host(&self, dst: DevicePtr, src: &[u8]) -> Result<()> {
        self.upstream.copy_from_host(dst, src)
    }
    fn kv_append(&self, src: DevicePtr, ty: HbmType, dst: &KvRows, stream: Stream) -> Result<()> {
        self.upstream.kv_append(src, ty, dst, stream)
    }
    fn kv_dequantize(&self, src: &KvRows, dst: DevicePtr, ty: HbmType, s: Stream) -> Result<()> {
        self.upstream.kv_dequantize(src, dst, ty, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sim::SimBackend;
    use crate::pool::{CachingPool, PoolSettings};
    use std::sync::Arc;

    /// 48 MiB freed into the caching pool of a 64 MiB device: a 32 MiB allocation and a 32 MiB
    /// commit by another consumer succeed, because the cache gives its memory back first.
    #[test]
    fn out_of_memory_releases_the_caches_first() {
        let sim: SharedBackend = Arc::new(SimBackend::new(0, 64 << 20));
        let pool = Arc::new(CachingPool::new(
            sim.clone(),
            PoolSettings::from_config(&crate::config::Config::default()),
        ));
        let (cached, block) = pool.alloc_unchecked(48 << 20).unwrap();
        pool.free_unchecked(cached, block);
        let caches = pool.clone();
        let consumer = Reclaiming::new(sim.clone(), Box::new(move |_| caches.trim().unwrap_or(0)));
        let p = consumer
            .alloc(32 << 20)
            .expect("the cached 48 MiB are given back");
        consumer.free(p, 32 << 20).unwrap();

        let (again, block) = pool.alloc_unchecked(48 << 20).unwrap();
        pool.free_unchecked(again, block);
        let gran = consumer.vmm_granularity().unwrap();
        let size = (32usize << 20).next_multiple_of(gran);
        let base = consumer.vmm_reserve(size).unwrap();
        consumer.vmm_map(base, size).expect("commit after reclaim");
        consumer.vmm_unmap(base, size).unwrap();
        consumer.vmm_release(base, size).unwrap();
    }

    #[test]
    fn nothing_released_means_the_first_answer_stands() {
        let sim: SharedBackend = Arc::new(SimBackend::new(0, 1 << 20));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = calls.clone();
        let consumer = Reclaiming::new(
            sim,
            Box::new(move |_| {
                seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                0
            }),
        );
        assert!(matches!(
            consumer.alloc(2 << 20),
            Err(Error::OutOfMemory { .. })
        ));
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}
