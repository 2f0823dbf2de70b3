//! CUDA graph capture on the stream-ordered path (PyTorch's pluggable allocator).
//!
//! While a stream captures a graph, the driver refuses the calls this pool's stream path
//! otherwise makes: querying an event (stream-ordered reuse across streams), synchronizing (the
//! out-of-memory release), and in the default "global" capture mode allocating or freeing device
//! memory from any thread; one such call invalidates the capture. So while any capture is under
//! way (`underway`, process-wide: a global-mode capture forbids these calls on every thread) or
//! the calling thread's own stream captures (`CapturingHere`), the pool is *quiet*: no event is
//! queried or recorded, no synchronize, no chunk given back, and a new chunk is taken in the
//! relaxed capture mode, as PyTorch's own allocator does.
//!
//! Memory a graph uses must not be handed to other work while the graph may replay: its
//! kernels write it again on every replay. PyTorch brackets each capture with
//! `beginAllocateToPool(pool)` / `endAllocateToPool(pool)` and drops a graph with
//! `releasePool(pool)`. Blocks allocated to a graph pool (`GraphPools::note`) belong to it until
//! it is released: when freed they are parked in it, reused only by later allocations to the
//! same pool (within one capture, by the same stream: stream order is what the graph replays),
//! and go back to the pool's arena only once the graph pool is released, waiting there for a
//! device synchronize (replays may still be queued on any stream). Blocks freed while a
//! capture is under way that are not a graph's get their stream-ordered event once the last
//! capture has ended (`GraphPools::end`), like PyTorch's deferred events.
//!
//! A capture that no hook announced (PyTorch's hooks not installed: `hbm_torch_malloc` called
//! directly) puts its blocks in `UNHOOKED`, a pool never released: they are never reused.

use crate::backend::{DevicePtr, Stream};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// PyTorch's `MempoolId_t`: a pair of numbers naming a graph's memory pool.
pub type GraphId = (u64, u64);

/// The pool of captures that no hook announced; never released.
pub const UNHOOKED: GraphId = (u64::MAX, u64::MAX);

/// Captures begun (`GraphPools::begin`) and not yet ended, over every device.
static UNDERWAY: AtomicUsize = AtomicUsize::new(0);

std::thread_local! {
    /// Set while this thread serves a call on a stream that captures (`CapturingHere`).
    static HERE: Cell<bool> = const { Cell::new(false) };
}

/// Whether the pool must make no driver call that a capture forbids: a capture is under way
/// somewhere, or the calling thread's stream captures. One relaxed load and one thread-local
/// read.
#[inline]
pub fn quiet() -> bool {
    UNDERWAY.load(Ordering::Relaxed) > 0 || HERE.with(|h| h.get())
}

/// Captures under way, as the hooks announced them.
pub fn underway() -> usize {
    UNDERWAY.load(Ordering::Acquire)
}

/// Marks the calling thread as serving a capturing stream until dropped.
pub struct CapturingHere {
    before: bool,
}

impl CapturingHere {
    pub fn new() -> CapturingHere {
        CapturingHere {
            before: HERE.with(|h| h.replace(true)),
        }
    }
}

impl Default for CapturingHere {
    fn default() -> Self {
        CapturingHere::new()
    }
}

impl Drop for CapturingHere {
    fn drop(&mut self) {
        HERE.with(|h| h.set(self.before));
    }
}

/// What a stream-ordered free of a block becomes (`GraphPools::free`).
#[derive(Debug, PartialEq, Eq)]
pub enum FreeRoute {
    /// Not a graph's block and no capture under way: the usual event-ordered free.
    Stream,
    /// Parked in its graph pool, or deferred until the captures end: nothing more to do.
    Kept,
    /// A block of a released graph pool: to the arena, waiting for a device synchronize.
    AfterSync,
}

struct Graph {
    /// Captures begun into this pool that their graphs have not released yet.
    refs: usize,
    /// Parked blocks: (address, block size, the stream that freed it during a capture).
    free: Vec<(DevicePtr, usize, Option<Stream>)>,
}

#[derive(Default)]
struct Inner {
    graphs: HashMap<GraphId, Graph>,
    /// Every block that belongs to a graph pool, live or parked.
    owner: HashMap<DevicePtr, GraphId>,
    /// Blocks freed while a capture was under way, waiting for their event: (address, block,
    /// stream).
    deferred: Vec<(DevicePtr, usize, Stream)>,
}

/// One device's graph pools (a field of its `CachingPool`).
#[derive(Default)]
pub struct GraphPools {
    inner: Mutex<Inner>,
    /// Blocks in `owner` plus those deferred, so that a free skips the lock when there are none.
    known: AtomicUsize,
}

impl GraphPools {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds this registry's lock until dropped, for `fork` (`CachingPool::lock_all`).
    pub fn lock_for_fork(&self) -> Box<dyn crate::backend::Held + '_> {
        Box::new(self.lock())
    }

    /// A capture into `id` begins (PyTorch's `beginAllocateToPool`): the pool lives until as
    /// many `release` calls.
    pub fn begin(&self, id: GraphId) {
        let mut inner = self.lock();
        inner
            .graphs
            .entry(id)
            .or_insert(Graph {
                refs: 0,
                free: Vec::new(),
            })
            .refs += 1;
        UNDERWAY.fetch_add(1, Ordering::AcqRel);
    }

    /// A capture into `id` has ended (`endAllocateToPool`). Blocks parked during it may serve
    /// any stream of a later capture into the same pool. Returns, once no capture is under way,
    /// the deferred frees, for their events.
    pub fn end(&self, id: GraphId) -> Vec<(DevicePtr, usize, Stream)> {
        let mut inner = self.lock();
        // Saturating: an `end` without its `begin` (a hook set up mid-capture) counts nothing.
        let left = UNDERWAY
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .map_or(0, |n| n - 1);
        if let Some(g) = inner.graphs.get_mut(&id) {
            for b in g.free.iter_mut() {
                b.2 = None;
            }
        }
        if left > 0 {
            return Vec::new();
        }
        let deferred = std::mem::take(&mut inner.deferred);
        self.known.fetch_sub(deferred.len(), Ordering::AcqRel);
        deferred
    }

    /// A graph that allocated into `id` is gone (`releasePool`). When it was the last, the
    /// pool's parked blocks are returned for the arena (after a synchronize); its live ones follow
    /// as they are freed. An unknown id (released twice) returns nothing.
    pub fn release(&self, id: GraphId) -> Vec<(DevicePtr, usize)> {
        let mut inner = self.lock();
        let Some(g) = inner.graphs.get_mut(&id) else {
            return Vec::new();
        };
        g.refs = g.refs.saturating_sub(1);
        if g.refs > 0 || id == UNHOOKED {
            return Vec::new();
        }
        let g = inner.graphs.remove(&id).expect("just found");
        for &(ptr, _, _) in &g.free {
            inner.owner.remove(&ptr);
        }
        self.known.fetch_sub(g.free.len(), Ordering::AcqRel);
        g.free.into_iter().map(|(p, b, _)| (p, b)).collect()
    }

    /// A parked block of `id` of exactly `block` bytes for `stream`, if one is safe: parked
    /// since the capture that freed it ended, or freed by this very stream.
    pub fn take(&self, id: GraphId, block: usize, stream: Stream) -> Option<DevicePtr> {
        if id == UNHOOKED {
            return None;
        }
        let mut inner = self.lock();
        let g = inner.graphs.get_mut(&id)?;
        let i = g
            .free
            .iter()
            .position(|&(_, b, s)| b == block && s.map_or(true, |s| s == stream))?;
        Some(g.free.swap_remove(i).0)
    }

    /// Whether `id` is a pool a capture has begun into and no release has ended.
    pub fn is_live(&self, id: GraphId) -> bool {
        self.lock().graphs.contains_key(&id)
    }

    /// Records a block newly allocated to `id`; for `UNHOOKED`, creates that pool.
    pub fn note(&self, ptr: DevicePtr, id: GraphId) {
        let mut inner = self.lock();
        if id == UNHOOKED {
            inner.graphs.entry(id).or_insert(Graph {
                refs: 1,
                free: Vec::new(),
            });
        }
        if inner.owner.insert(ptr, id).is_none() {
            self.known.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Decides a stream-ordered free of `ptr` (`block` bytes) on `stream`.
    pub fn free(&self, ptr: DevicePtr, block: usize, stream: Stream) -> FreeRoute {
        if self.known.load(Ordering::Acquire) == 0 && !quiet() {
            return FreeRoute::Stream;
        }
        let mut inner = self.lock();
        let capturing = quiet();
        if let Some(&id) = inner.owner.get(&ptr) {
            return match inner.graphs.get_mut(&id) {
                Some(g) => {
                    if id != UNHOOKED {
                        g.free.push((ptr, block, capturing.then_some(stream)));
                    }
                    FreeRoute::Kept
                }
                None => {
                    inner.owner.remove(&ptr);
                    self.known.fetch_sub(1, Ordering::AcqRel);
                    FreeRoute::AfterSync
                }
            };
        }
        if !capturing {
            return FreeRoute::Stream;
        }
        if underway() == 0 {
            // The caller's own stream captures, unannounced: no end will come to record its
            // event, so a device synchronize (the epoch rule) orders it instead.
            return FreeRoute::AfterSync;
        }
        inner.deferred.push((ptr, block, stream));
        self.known.fetch_add(1, Ordering::AcqRel);
        FreeRoute::Kept
    }

    /// Bytes parked in graph pools (for statistics and tests).
    pub fn parked_bytes(&self) -> usize {
        self.lock()
            .graphs
            .values()
            .flat_map(|g| g.free.iter().map(|&(_, b, _)| b))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // `UNDERWAY` is process-wide: the test runs in a child process of its own, so that
    // parallel tests in this binary never see its captures.
    #[test]
    fn a_graph_pool_keeps_its_blocks_until_released() {
        if !crate::test_child::is_child() {
            let out = crate::test_child::run(
                "pool::capture::tests::a_graph_pool_keeps_its_blocks_until_released",
                Some("backend:sim,leak_report:off"),
            );
            assert!(out.contains("1 passed"), "{out}");
            return;
        }
        let g = GraphPools::default();
        let id = (7, 0);
        assert_eq!(g.free(0x1000, 512, 0x10), FreeRoute::Stream);
        g.begin(id);
        assert!(quiet());
        g.note(0x2000, id);
        g.note(0x3000, id);
        // Freed inside the capture: reusable by the same stream only.
        assert_eq!(g.free(0x2000, 512, 0x10), FreeRoute::Kept);
        assert_eq!(g.take(id, 512, 0x20), None);
        assert_eq!(g.take(id, 1024, 0x10), None, "exact block sizes only");
        assert_eq!(g.take(id, 512, 0x10), Some(0x2000));
        assert_eq!(g.free(0x2000, 512, 0x10), FreeRoute::Kept);
        // Not a graph block, freed during the capture: deferred until it ends.
        assert_eq!(g.free(0x4000, 512, 0x30), FreeRoute::Kept);
        assert_eq!(g.end(id), vec![(0x4000, 512, 0x30)]);
        // After the capture: parked blocks serve any stream of a later capture into the pool;
        // a live graph block freed now is parked, not handed to other work.
        assert_eq!(g.free(0x3000, 512, 0x40), FreeRoute::Kept);
        assert_eq!(g.parked_bytes(), 1024);
        assert_eq!(g.take(id, 512, 0x50), Some(0x2000));
        g.note(0x2000, id);
        assert_eq!(g.release(id), vec![(0x3000, 512)]);
        assert!(!g.is_live(id));
        assert_eq!(g.release(id), vec![], "released twice: nothing");
        // The graph is gone: its last live block waits for a synchronize.
        assert_eq!(g.free(0x2000, 512, 0x10), FreeRoute::AfterSync);
        assert_eq!(g.free(0x2000, 512, 0x10), FreeRoute::Stream);
        // A capture nobody announced: its blocks are never reused.
        let _here = CapturingHere::new();
        g.note(0x5000, UNHOOKED);
        assert_eq!(g.free(0x5000, 512, 0x10), FreeRoute::Kept);
        assert_eq!(g.take(UNHOOKED, 512, 0x10), None);
        assert_eq!(g.release(UNHOOKED), vec![]);
        assert_eq!(g.free(0x6000, 512, 0x10), FreeRoute::AfterSync);
    }
}
