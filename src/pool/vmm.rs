//! The VMM scratch pool: one large virtual reservation, physical memory committed on demand.
//!
//! ggml's `ggml_cuda_pool_vmm` is a bump allocator over its reservation: frees must come in exact
//! reverse order, committed memory never goes back, and a refused reservation aborts. This pool
//! keeps the same address-space layout and fixes the three:
//! - The whole reservation is one chunk of an `Arena` (best fit, split, coalesce), so frees come
//!   in any order and neighbouring free blocks merge. Best fit prefers holes in committed memory
//!   over the free tail, which is as large as the uncommitted rest of the reservation.
//! - Committed memory is the prefix `[base, base + committed)`, a run of mappings, each made by
//!   one `vmm_map` of a granularity multiple. A block that ends past it commits one more mapping,
//!   just large enough, at the top (ggml grows the same way).
//! - `trim` and the release threshold unmap whole mappings from the top while they lie entirely
//!   in the free tail, after a synchronize. The driver unmaps only whole `cuMemMap` ranges, and a
//!   prefix keeps the address space simple: a free hole below a used block stays committed.
//!
//! Hot path: the last `RECENT` freed blocks wait in a short list before they go to the arena; an
//! allocation that the arena would answer with a block of exactly such a size takes it from there
//! (a scan of 16 entries, no tree operation, no heap allocation). Otherwise the smallest listed
//! block that fits goes back to the arena before its best fit, and the whole list does before
//! the pool would grow (so coalescing can spare the growth), before `trim` and before the release
//! threshold is applied. A take from the arena that fails for lack of address space also flushes.
//!
//! Cost: a hot-path allocation is one mutex and a short scan; an arena allocation a few B-tree
//! operations; one that grows adds a `vmm_map` (tens of microseconds on CUDA).

use super::arena::{Arena, Lookup, State as BlockState};
use super::scratch::{round_up, Counters, ScratchOptions, ScratchStats};
use super::size_class::MIN_BLOCK;
use crate::backend::{DevicePtr, SharedBackend};
use crate::error::{Error, Result};
use std::sync::{Mutex, MutexGuard};

struct State {
    /// Blocks over the whole reservation; committed or not is the business of `maps`.
    arena: Arena,
    /// Mappings in address order, each one `vmm_map` call. Invariant: they tile
    /// `[base, base + committed)` without gaps.
    maps: Vec<(DevicePtr, usize)>,
    /// Freed blocks not yet returned to the arena (still `Used` there), oldest first.
    recent: Vec<(DevicePtr, usize)>,
    counters: Counters,
}

/// Freed blocks kept out of the arena for exact-size reuse.
const RECENT: usize = 16;

impl State {
    /// Returns every recently freed block to the arena, where it coalesces.
    fn flush_recent(&mut self) {
        for (addr, _) in self.recent.drain(..) {
            self.arena.release(addr);
        }
    }
}

/// A VMM scratch pool over one backend. Thread-safe: one mutex around its state.
pub struct VmmPool {
    backend: SharedBackend,
    base: DevicePtr,
    reserve: usize,
    granularity: usize,
    alignment: usize,
    release_threshold: usize,
    state: Mutex<State>,
}

impl VmmPool {
    /// Reserves the address space. `NotSupported` without VMM; the driver's error when the
    /// reservation is refused; `InvalidValue` for an alignment above the granularity.
    pub fn new(backend: SharedBackend, options: ScratchOptions) -> Result<VmmPool> {
        let granularity = backend.vmm_granularity().ok_or(Error::NotSupported(
            "virtual memory management on this device",
        ))?;
        if options.alignment > granularity {
            return Err(Error::InvalidValue(
                "VMM pool alignment must not exceed the VMM granularity",
            ));
        }
        // More than the device holds could never be committed; a failed query caps nothing.
        let total = backend.mem_info().map_or(usize::MAX, |(_, total)| total);
        let reserve = round_up(options.reserve_size.min(total), granularity)
            .ok_or(Error::InvalidValue("reservation size overflows"))?;
        let base = backend.vmm_reserve(reserve)?;
        crate::nvtx::reserved_heap_add(base, reserve, crate::nvtx::HeapKind::ScratchPool);
        let mut arena = Arena::default();
        arena.add_chunk(base, reserve);
        Ok(VmmPool {
            backend,
            base,
            reserve,
            granularity,
            alignment: options.alignment,
            release_threshold: options.release_threshold,
            state: Mutex::new(State {
                arena,
                maps: Vec::new(),
                recent: Vec::with_capacity(RECENT),
                counters: Counters::default(),
            }),
        })
    }

    pub fn device(&self) -> i32 {
        self.backend.device()
    }

    /// The granularity the pool commits in.
    pub fn granularity(&self) -> usize {
        self.granularity
    }

    /// Bytes of address space reserved.
    pub fn reserve_size(&self) -> usize {
        self.reserve
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocates at least `size` bytes: the best-fitting free block, committed first if needed.
    pub fn alloc(&self, size: usize) -> Result<(DevicePtr, usize)> {
        if size == 0 {
            return Err(Error::InvalidValue("zero-byte pool allocation"));
        }
        let oom = Error::OutOfMemory { requested: size };
        // At least MIN_BLOCK: the arena never leaves a smaller block, so every size stays a
        // multiple of the alignment and every address aligned.
        let rounded = round_up(size.max(MIN_BLOCK), self.alignment)
            .filter(|&r| r <= self.reserve)
            .ok_or(oom.clone())?;
        let mut st = self.lock();
        // The block the arena would give: `rounded` bytes, or up to MIN_BLOCK more unsplit.
        let fits = |&(_, n): &(DevicePtr, usize)| n >= rounded && n - rounded < MIN_BLOCK;
        if let Some(i) = st.recent.iter().rposition(fits) {
            let (addr, actual) = st.recent.remove(i);
            st.counters.on_alloc(actual, true);
            return Ok((addr, actual));
        }
        self.alloc_slow(&mut st, rounded, oom)
    }

    /// Best fit from the arena. The smallest recently freed block that fits goes back to the
    /// arena first, so it competes (with whatever it merges with); all of them go back before
    /// the pool would grow, so that coalescing can spare the growth.
    #[cold]
    #[inline(never)]
    fn alloc_slow(&self, st: &mut State, rounded: usize, oom: Error) -> Result<(DevicePtr, usize)> {
        let smallest = (st.recent.iter().enumerate())
            .filter(|(_, &(_, n))| n >= rounded)
            .min_by_key(|(_, &(_, n))| n)
            .map(|(i, _)| i);
        if let Some(i) = smallest {
            let (addr, _) = st.recent.remove(i);
            st.arena.release(addr);
        }
        let top = self.base + st.counters.committed();
        let mut addr = st.arena.take_best_fit(rounded);
        let short = addr.map_or(true, |a| a + st.arena.size_of(a) > top);
        if short && !st.recent.is_empty() {
            if let Some(a) = addr {
                st.arena.release(a);
            }
            st.flush_recent();
            addr = st.arena.take_best_fit(rounded);
        }
        let addr = addr.ok_or(oom)?;
        let actual = st.arena.size_of(addr);
        let hit = addr + actual <= top;
        if !hit {
            if let Err(e) = self.grow(st, addr + actual) {
                st.arena.release(addr);
                return Err(e);
            }
        }
        st.counters.on_alloc(actual, hit);
        Ok((addr, actual))
    }

    /// Commits one mapping at the top, large enough to reach `end`.
    #[cold]
    #[inline(never)]
    fn grow(&self, st: &mut State, end: DevicePtr) -> Result<()> {
        let top = self.base + st.counters.committed();
        // `end` lies inside the reservation, whose size is a granularity multiple: no overflow,
        // and the mapping stays inside it.
        let size = (end - top).next_multiple_of(self.granularity);
        self.backend.vmm_map(top, size)?;
        st.maps.push((top, size));
        st.counters.on_commit(size);
        Ok(())
    }

    /// Takes back `ptr` of `actual` bytes; merges it with free neighbours. Above the release
    /// threshold, unmaps what it can from the top (after a synchronize).
    pub fn free(&self, ptr: DevicePtr, actual: usize) -> Result<()> {
        let mut st = self.lock();
        match st.arena.lookup(ptr) {
            Lookup::Start(BlockState::Used) => {}
            Lookup::Start(_) => return Err(Error::DoubleFree(ptr)),
            Lookup::Interior(block) => {
                let used = matches!(st.arena.containing(ptr), Some((_, _, BlockState::Used)));
                return Err(if used {
                    Error::InteriorPointer { ptr, block }
                } else {
                    Error::UnknownPointer(ptr)
                });
            }
            Lookup::NotOurs => return Err(Error::UnknownPointer(ptr)),
        }
        if st.recent.iter().any(|&(p, _)| p == ptr) {
            return Err(Error::DoubleFree(ptr));
        }
        if st.arena.size_of(ptr) != actual {
            return Err(Error::InvalidValue(
                "actual size does not match the allocation",
            ));
        }
        st.counters.on_free(actual);
        if st.recent.len() == RECENT {
            let (oldest, _) = st.recent.remove(0);
            st.arena.release(oldest);
        }
        st.recent.push((ptr, actual));
        if st.counters.committed() > self.release_threshold {
            // The free is done; unmapping is housekeeping that a failed synchronize defers to
            // a later free or trim (the mappings stay recorded).
            let _ = self.release_top(&mut st, self.release_threshold);
        }
        Ok(())
    }

    /// Unmaps whole mappings from the top while they are entirely free and more than `keep`
    /// bytes stay committed. One synchronize first, if anything goes. Returns the bytes unmapped.
    #[cold]
    fn release_top(&self, st: &mut State, keep: usize) -> Result<usize> {
        st.flush_recent();
        let committed = st.counters.committed();
        if committed == 0 {
            return Ok(0);
        }
        // The free tail, if the last committed byte is in it, starts at `free_from`.
        let free_from = match st.arena.containing(self.base + committed - 1) {
            Some((start, _, BlockState::Free)) => start,
            _ => return Ok(0),
        };
        let mut left = committed;
        let mut n = 0;
        for &(start, len) in st.maps.iter().rev() {
            if start < free_from || left <= keep {
                break;
            }
            left -= len;
            n += 1;
        }
        if n == 0 {
            return Ok(0);
        }
        self.backend.synchronize()?;
        let mut released = 0;
        for _ in 0..n {
            let (start, len) = *st.maps.last().expect("counted above");
            // One whole mapping per call: what `vmm_unmap` accepts on every backend. Forgotten
            // only once unmapped, so an error leaves the state true.
            self.backend.vmm_unmap(start, len)?;
            st.maps.pop();
            st.counters.on_release(len);
            released += len;
        }
        st.counters.on_trim();
        Ok(released)
    }

    /// Unmaps every free mapping at the top (after one synchronize); returns the bytes unmapped.
    pub fn trim(&self) -> Result<usize> {
        let mut st = self.lock();
        self.release_top(&mut st, 0)
    }

    pub fn stats(&self) -> ScratchStats {
        self.lock().counters.snapshot(Some(self.reserve))
    }

    /// Number of live mappings; for tests.
    pub fn mapping_count(&self) -> usize {
        self.lock().maps.len()
    }

    /// Checks every invariant of the pool and its arena; for tests.
    pub fn check(&self) {
        let st = self.lock();
        st.arena.check();
        for &(addr, size) in &st.recent {
            assert_eq!(st.arena.lookup(addr), Lookup::Start(BlockState::Used));
            assert_eq!(st.arena.size_of(addr), size);
        }
        let mut at = self.base;
        for &(start, len) in &st.maps {
            assert_eq!(start, at, "mappings tile the committed prefix");
            assert!(len > 0 && len % self.granularity == 0);
            at += len;
        }
        assert_eq!(at - self.base, st.counters.committed());
    }
}

impl Drop for VmmPool {
    /// Unmaps everything, live blocks included (the caller has reported those), after one
    /// synchronize, then releases the reservation. Errors are printed: nothing can return them.
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        crate::nvtx::heap_remove(self.base);
        if !st.maps.is_empty() {
            if let Err(e) = self.backend.synchronize() {
                eprintln!(
                    "hbmalloc: destroying a VMM pool: synchronize failed ({e}); unmapping anyway"
                );
            }
        }
        while let Some((start, len)) = st.maps.pop() {
            if let Err(e) = self.backend.vmm_unmap(start, len) {
                eprintln!("hbmalloc: destroying a VMM pool: unmapping {start:#x} failed: {e}");
            }
        }
        if let Err(e) = self.backend.vmm_release(self.base, self.reserve) {
            eprintln!("hbmalloc: destroying a VMM pool: releasing the reservation failed: {e}");
        }
    }
}
