//! KV cache objects, tracked. Each cache is on the tracker's record while it lives, as one block of
//! origin `KvCache` keyed by its handle (a host address, never mistaken for a device block), with
//! the device memory it holds (committed bytes, as of the last call that changed them) and the
//! stack that created it: a leaked cache shows in the exit report and in `hbm_leaks_since`.

use super::{take, Want};
use crate::backend::SharedBackend;
use crate::error::Result;
use crate::kv::cache::{Growth, KvCache, KvParams};
use crate::nvtx;
use crate::track::{self, Origin};

/// Makes a cache on `backend` (device `device`), boxed so that its address is its handle, and
/// records it.
pub fn create(backend: SharedBackend, params: KvParams, device: i32) -> Result<Box<KvCache>> {
    let cache = Box::new(KvCache::new(backend, params)?);
    let handle = handle(&cache);
    let held = cache.stats().committed as usize;
    track::global().on_alloc_owned(handle, held, device, 0, Origin::KvCache, handle);
    if nvtx::active() {
        for ((base, size), _) in cache.tensor_regions() {
            match params.growth {
                // A VMM cache's tensors are reserved address ranges.
                Growth::Vmm => nvtx::reserved_heap_add(base, size, nvtx::HeapKind::KvCache),
                _ => nvtx::heap_add(base, size, nvtx::HeapKind::KvCache),
            }
        }
    }
    Ok(cache)
}

/// Brings the cache's record to what it holds now (after a reserve, release or trim).
pub fn resized(cache: &KvCache) {
    let held = cache.stats().committed;
    track::global().update(handle(cache), |live| live.size = held);
    // A tool sees each bound sequence's rows as a region of its tensors; the rest is off limits.
    if nvtx::active() {
        super::settle_for_tool(cache.device());
        for ((base, _), rows) in cache.tensor_regions() {
            nvtx::heap_set_regions(base, &rows);
        }
    }
}

/// Takes the cache off the record, then frees it. The record goes first: once the box is freed,
/// another cache may get its address.
pub fn destroy(cache: Box<KvCache>) {
    let handle = handle(&cache);
    let _ = take(handle, Want::kv_cache(handle));
    if nvtx::active() {
        for ((base, _), _) in cache.tensor_regions() {
            nvtx::heap_remove(base);
        }
    }
    drop(cache);
}

fn handle(cache: &KvCache) -> usize {
    cache as *const KvCache as usize
}
