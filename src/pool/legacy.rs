//! The legacy scratch pool: whole buffers from the driver, cached when freed, handed out again by
//! best fit, as ggml's `ggml_cuda_pool_leg` does.
//!
//! - Best fit: the smallest cached buffer at least as large as the request: a binary search in
//!   a vector kept sorted by size (ggml scans its 256 slots), which allocates nothing on the hot
//!   path (an ordered tree would allocate a node whenever the cache goes from empty to one).
//!   `reuse_limit_percent` can refuse a buffer much larger than the request; ggml never does.
//! - A miss allocates `size * (100 + overallocation_percent) / 100`, rounded up to the alignment
//!   (ggml: `size * 1.05` rounded up to 256), so a slightly larger request later still hits.
//! - Buffers are never split: `actual` is the whole buffer, and `free` takes that size back.
//! - Out of memory on a miss: synchronize, free every cached buffer, retry once (as ggml does).
//!
//! Cost: a hit is one mutex, one binary search, a short `memmove` and one hash insert; a miss is a
//! driver allocation. Memory goes back to the driver only on `trim`, the release threshold or a
//! full cache, each after a device synchronize.

use super::caching::PtrHasher;
use super::scratch::{round_up, Counters, ScratchOptions, ScratchStats, MIN_ALIGNMENT};
use crate::backend::{DevicePtr, SharedBackend};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::{Mutex, MutexGuard};

/// One buffer from the driver. The caller's pointer is `ptr`, `raw` rounded up to the alignment,
/// and `size` the bytes from there to the end: the `actual` size of the allocation.
#[derive(Clone, Copy, Debug)]
struct Buffer {
    ptr: DevicePtr,
    raw: DevicePtr,
    raw_size: usize,
    size: usize,
}

/// Device addresses hash by one multiply (`PtrHasher`); SipHash would double a hit's cost.
type PtrMap<V> = HashMap<DevicePtr, V, BuildHasherDefault<PtrHasher>>;

#[derive(Default)]
struct State {
    /// Handed out, by the caller's pointer.
    live: PtrMap<Buffer>,
    /// Cached, sorted by (size, pointer) for best fit.
    cached: Vec<Buffer>,
    counters: Counters,
}

impl State {
    /// What a pointer that is not live is: freed already, inside a live buffer, or foreign.
    #[cold]
    fn classify(&self, ptr: DevicePtr) -> Error {
        if self.cached.iter().any(|b| b.ptr == ptr) {
            return Error::DoubleFree(ptr);
        }
        match self
            .live
            .keys()
            .find(|&&p| ptr > p && ptr < p + self.live[&p].size)
        {
            Some(&block) => Error::InteriorPointer { ptr, block },
            None => Error::UnknownPointer(ptr),
        }
    }
}

/// A legacy scratch pool over one backend. Thread-safe: one mutex around its state.
pub struct LegacyPool {
    backend: SharedBackend,
    options: ScratchOptions,
    state: Mutex<State>,
}

impl LegacyPool {
    /// A pool over `backend`; `options` are already resolved (`ScratchOptions::resolved`).
    pub fn new(backend: SharedBackend, options: ScratchOptions) -> LegacyPool {
        LegacyPool {
            backend,
            options,
            state: Mutex::new(State::default()),
        }
    }

    pub fn device(&self) -> i32 {
        self.backend.device()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocates at least `size` bytes: the best-fitting cached buffer, else a new one.
    pub fn alloc(&self, size: usize) -> Result<(DevicePtr, usize)> {
        if size == 0 {
            return Err(Error::InvalidValue("zero-byte pool allocation"));
        }
        let mut st = self.lock();
        let i = st.cached.partition_point(|b| b.size < size);
        if let Some(&buf) = st.cached.get(i) {
            let limit = self.options.reuse_limit_percent as u128;
            if limit == 0 || buf.size as u128 * 100 <= size as u128 * (100 + limit) {
                st.cached.remove(i);
                st.live.insert(buf.ptr, buf);
                st.counters.on_alloc(buf.size, true);
                return Ok((buf.ptr, buf.size));
            }
        }
        self.alloc_slow(&mut st, size)
    }

    #[cold]
    #[inline(never)]
    fn alloc_slow(&self, st: &mut State, size: usize) -> Result<(DevicePtr, usize)> {
        let too_big = Error::OutOfMemory { requested: size };
        let align = self.options.alignment;
        let grown =
            (size as u128 * (100 + self.options.overallocation_percent as u128)).div_ceil(100);
        let want = usize::try_from(grown)
            .ok()
            .and_then(|g| round_up(g, align))
            .ok_or(too_big.clone())?;
        // The backend aligns to 256 only; a larger alignment costs its difference in slack.
        let raw_size = want.checked_add(align - MIN_ALIGNMENT).ok_or(too_big)?;
        let raw = match self.backend.alloc(raw_size) {
            Ok(raw) => raw,
            Err(Error::OutOfMemory { .. }) if !st.cached.is_empty() => {
                self.release_cached(st, 0)?;
                self.backend.alloc(raw_size)?
            }
            Err(e) => return Err(e),
        };
        crate::nvtx::heap_add(raw, raw_size, crate::nvtx::HeapKind::ScratchPool);
        let ptr = raw.next_multiple_of(align);
        let buf = Buffer {
            ptr,
            raw,
            raw_size,
            size: raw_size - (ptr - raw),
        };
        st.live.insert(ptr, buf);
        st.counters.on_commit(raw_size);
        st.counters.on_alloc(buf.size, false);
        Ok((ptr, buf.size))
    }

    /// Takes back `ptr` of `actual` bytes into the cache.
    pub fn free(&self, ptr: DevicePtr, actual: usize) -> Result<()> {
        let mut st = self.lock();
        let buf = match st.live.get(&ptr) {
            Some(b) if b.size == actual => *b,
            Some(_) => {
                return Err(Error::InvalidValue(
                    "actual size does not match the allocation",
                ))
            }
            None => return Err(st.classify(ptr)),
        };
        st.live.remove(&ptr);
        st.counters.on_free(actual);
        // The free is done from here on: giving memory back to the driver is housekeeping, and
        // if the device cannot do it now (a failed synchronize) the buffer stays cached, over
        // the limit, rather than being lost or the free reported as failed.
        let full = st.cached.len() >= self.options.max_cached_buffers as usize;
        // ggml gives the freed buffer itself back when its slots are full; so do we.
        if !(full && self.release_now(&mut st, buf)) {
            let at = st
                .cached
                .partition_point(|b| (b.size, b.ptr) < (buf.size, ptr));
            st.cached.insert(at, buf);
        }
        if st.counters.committed() > self.options.release_threshold {
            let _ = self.release_cached(&mut st, self.options.release_threshold);
        }
        Ok(())
    }

    /// Gives a freed buffer back to the driver after a synchronize; whether it went.
    fn release_now(&self, st: &mut State, buf: Buffer) -> bool {
        if self.backend.synchronize().is_err() {
            return false;
        }
        crate::nvtx::heap_remove(buf.raw);
        if self.backend.free(buf.raw, buf.raw_size).is_err() {
            crate::nvtx::heap_add(buf.raw, buf.raw_size, crate::nvtx::HeapKind::ScratchPool);
            return false;
        }
        st.counters.on_release(buf.raw_size);
        st.counters.on_trim();
        true
    }

    /// Frees cached buffers, largest first, until the pool holds at most `keep` bytes or nothing
    /// is cached. One synchronize first. Returns the bytes given back.
    #[cold]
    fn release_cached(&self, st: &mut State, keep: usize) -> Result<usize> {
        if st.cached.is_empty() || st.counters.committed() <= keep {
            return Ok(0);
        }
        self.backend.synchronize()?;
        let mut released = 0;
        while st.counters.committed() > keep {
            let Some(&buf) = st.cached.last() else {
                break;
            };
            // Forgotten only once the driver took it: on an error the cache stays consistent.
            crate::nvtx::heap_remove(buf.raw);
            self.backend.free(buf.raw, buf.raw_size)?;
            st.cached.pop();
            st.counters.on_release(buf.raw_size);
            released += buf.raw_size;
        }
        if released > 0 {
            st.counters.on_trim();
        }
        Ok(released)
    }

    /// Frees every cached buffer (after one synchronize); returns the bytes given back.
    pub fn trim(&self) -> Result<usize> {
        let mut st = self.lock();
        self.release_cached(&mut st, 0)
    }

    pub fn stats(&self) -> ScratchStats {
        self.lock().counters.snapshot(None)
    }

    /// Number of cached buffers; for tests.
    pub fn cached_count(&self) -> usize {
        self.lock().cached.len()
    }
}

impl Drop for LegacyPool {
    /// Gives every buffer back, live ones included (the caller has reported those), after one
    /// synchronize. Errors cannot be returned from here; they are printed.
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        if st.live.is_empty() && st.cached.is_empty() {
            return;
        }
        if let Err(e) = self.backend.synchronize() {
            eprintln!("hbmalloc: destroying a pool: synchronize failed ({e}); freeing anyway");
        }
        for buf in st.live.values().chain(st.cached.iter()) {
            crate::nvtx::heap_remove(buf.raw);
            if let Err(e) = self.backend.free(buf.raw, buf.raw_size) {
                eprintln!(
                    "hbmalloc: destroying a pool: freeing {:#x} failed: {e}",
                    buf.raw
                );
            }
        }
    }
}
