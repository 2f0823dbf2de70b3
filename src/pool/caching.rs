//! The caching pool behind `cudaMalloc`/`cudaFree`: one per device.
//!
//! Fast path: a thread pops a block of its size class from its own shard (`thread_cache`); free
//! does the reverse. The pool keeps no map of live blocks: its caller's tracker does. No global lock, no driver call.
//! Slow path (`*_slow`): best fit from the arena (`arena`), refilling the shard in batches; else a
//! device synchronize if enough freed memory waits for one; else a new chunk from the driver; on
//! out-of-memory, release every cached byte and retry once (one release per storm of threads
//! running out together: `backend::reclaim::ReleaseGate`).
//!
//! Stream safety. The runtime's `cudaFree` synchronizes the device, so work queued before the
//! free can never see the block reused. This pool gets the same guarantee without paying a
//! synchronize per free: every free is stamped with the current *epoch*; a synchronize starts a
//! new epoch and, when it returns, marks every earlier epoch complete. A block is handed out again
//! only once its stamp is below the completed epoch, i.e. after a device-wide synchronize that
//! began after the free. Synchronizes are batched: the pool issues one only when enough freed
//! memory waits for it (`SyncBatch`) or memory runs out, and grows otherwise, so a steady
//! workload pays one synchronize per batch of frees. `stream_safety:eager` synchronizes in every
//! free, as the runtime does; `stream_safety:off` trusts the program.

use super::arena::{Arena, Lookup, State};
use super::capture::{self, FreeRoute, GraphId, GraphPools};
use super::size_class::{
    block_size, chunk_size, class_of, class_size, MAX_CLASS_SIZE, SMALL_LIMIT,
};
use super::stats::{PoolStats, SlowCounters};
use super::thread_cache::{
    exits, is_cached_class, is_orphan, my_shard, note_owner, owner_of, thread_tag, Evicted,
    PaddedShard, N_SHARDS, UNSYNCED,
};
use crate::backend::reclaim::{ReleaseGate, Released};
use crate::backend::{DevicePtr, SharedBackend, Stream};
use crate::config::{Config, StreamSafety};
use crate::error::{Error, Result};
use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

/// The pool's settings, taken from `HBMALLOC_CONF` by the runtime or set directly by tests.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub stream_safety: StreamSafety,
    /// Bytes of freed blocks a thread lets wait for a synchronize before the pool synchronizes
    /// rather than grow; `None`: sized by the device (`SyncBatch::auto`).
    pub pending_limit: Option<usize>,
}

impl PoolSettings {
    pub fn from_config(cfg: &Config) -> PoolSettings {
        PoolSettings {
            stream_safety: cfg.stream_safety,
            pending_limit: cfg.pending_limit,
        }
    }
}

/// Hashes device addresses (256-byte aligned, so the low bits carry nothing) by one multiply.
#[derive(Default)]
pub struct PtrHasher(u64);

impl Hasher for PtrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = ((n as u64) >> 8).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// How much freed memory waits for one synchronize: a thread lets freed blocks wait while they
/// are fewer than `LARGE_BATCH_BLOCKS` blocks of the size it asks for, but at least `floor` and
/// at most `cap` bytes; past that, a synchronize (about 1 us on an idle GPU) is cheaper than
/// growing. Small blocks: 64 MiB of them per synchronize. Large ones: without the block count, a
/// loop of 16 MiB blocks paid one synchronize per 4 blocks (~210 ns a pair on an H200); with it,
/// one per 64 blocks, for at most 1/128 of the device's memory held back per thread.
#[derive(Clone, Copy, Debug)]
struct SyncBatch {
    floor: usize,
    cap: usize,
}

const LARGE_BATCH_BLOCKS: usize = 64;
const DEFAULT_PENDING: usize = 64 << 20;
const MAX_AUTO_PENDING: usize = 1 << 30;

impl SyncBatch {
    fn new(pending_limit: Option<usize>, device_bytes: Option<usize>) -> SyncBatch {
        match pending_limit {
            Some(limit) => SyncBatch {
                floor: limit,
                cap: limit,
            },
            None => SyncBatch {
                floor: DEFAULT_PENDING,
                cap: device_bytes
                    .map_or(DEFAULT_PENDING, |b| b / 128)
                    .clamp(DEFAULT_PENDING, MAX_AUTO_PENDING),
            },
        }
    }

    /// Bytes waiting in all (this thread's and the arenas') that justify a synchronize before
    /// growing the pool for a `block`.
    fn pending(&self, block: usize) -> usize {
        block
            .saturating_mul(LARGE_BATCH_BLOCKS)
            .clamp(self.floor, self.cap)
            .max(1)
    }

    /// Bytes of `block`-sized blocks waiting in this thread's cache that justify a synchronize
    /// even while the arena could serve: `SHARD_SYNC_BLOCKS` of them, fewer for large blocks
    /// (at least 4).
    fn class(&self, block: usize) -> usize {
        block
            .saturating_mul(SHARD_SYNC_BLOCKS)
            .min(self.pending(block))
            .max(block * 4)
    }
}

/// Blocks of at most this many bytes in total are moved from the arena into a shard per refill.
const REFILL_BYTES: usize = 256 << 10;
const MAX_REFILL: usize = 16;
/// A thread's cache of one size class asks for a synchronize once it holds this many blocks (or
/// fewer, see `SyncBatch::class`) all waiting for one: one synchronize then serves that many
/// allocations. Not more: the blocks a thread cycles through between synchronizes are its
/// working set in the tracker's table too (1024 was slower at 16 threads on an H200).
const SHARD_SYNC_BLOCKS: usize = 256;
/// The pool makes what it holds usable before growing past 1 + 1/`SLACK_DIVISOR` times its peak
/// in use (`reclaim_before_grow`). 40 (2.5%): on the recorded PyTorch traces (bench/traces:
/// training, inference over varying lengths, Hugging Face generate) peak reserved then stays
/// within 1.10x of peak in use with chunk granularity on top (training 1.08x, generate 1.02x);
/// 20 left training at 1.10x and generate at 1.05x, 10 training at 1.14x.
const SLACK_DIVISOR: usize = 40;
/// ... but never below this much above the peak: a pool of a few chunks grows as before (the
/// slack of a small pool is one chunk, and a synchronize per allocation buys nothing there).
const RECLAIM_FLOOR: usize = 20 << 20;

pub struct CachingPool {
    backend: SharedBackend,
    settings: PoolSettings,
    batch: SyncBatch,
    shards: Box<[PaddedShard]>,
    /// Blocks up to `SMALL_LIMIT` live in 2 MiB chunks of their own, so that small, long-lived
    /// blocks never pin large chunks.
    small: Mutex<Arena>,
    large: Mutex<Arena>,
    /// Pool-wide epochs: the current one (stamped into blocks that reach the arena unsynced) and
    /// the one below which all such blocks are safe. Thread caches keep their own (`thread_cache`).
    epoch: AtomicU64,
    completed: AtomicU64,
    /// Number of blocks waiting in `Arena::stream_freed` (each holds its own event), to skip the
    /// lock when there are none.
    stream_freed: AtomicUsize,
    /// Held while a synchronize runs (`sync_and_settle`).
    sync_lock: Mutex<()>,
    /// `thread_cache::exits()` when this pool last adopted the shards of exited threads.
    seen_exits: AtomicU64,
    slow: SlowCounters,
    /// The pool's driver allocations when a reclaim last took idle threads' caches
    /// (`idle_visit_due`).
    last_idle_visit: AtomicU64,
    /// Out-of-memory releases of the cache, one per storm; counted as `oom_retries`.
    releases: ReleaseGate,
    /// CUDA graphs' memory on the stream path (`capture`).
    graphs: GraphPools,
}

impl CachingPool {
    pub fn new(backend: SharedBackend, settings: PoolSettings) -> CachingPool {
        // Epochs start at 1 so that stamp 0 means "safe from the start" (blocks straight from
        // the arena); under `off` every stamp is below the completed epoch.
        let trusting = settings.stream_safety == StreamSafety::Off;
        let completed = match settings.stream_safety {
            StreamSafety::Off => u64::MAX,
            StreamSafety::Batched | StreamSafety::Eager => 1,
        };
        let batch = SyncBatch::new(
            settings.pending_limit,
            backend.mem_info().ok().map(|(_, total)| total),
        );
        CachingPool {
            backend,
            settings,
            batch,
            shards: (0..N_SHARDS).map(|_| PaddedShard::new(trusting)).collect(),
            small: Mutex::new(Arena::default()),
            large: Mutex::new(Arena::default()),
            epoch: AtomicU64::new(1),
            completed: AtomicU64::new(completed),
            stream_freed: AtomicUsize::new(0),
            sync_lock: Mutex::new(()),
            seen_exits: AtomicU64::new(0),
            slow: SlowCounters::default(),
            last_idle_visit: AtomicU64::new(0),
            releases: ReleaseGate::default(),
            graphs: GraphPools::default(),
        }
    }

    pub fn backend(&self) -> &SharedBackend {
        &self.backend
    }

    /// Allocates at least `size` (> 0) bytes, aligned to 512; returns (address, block size).
    /// Never blocks on the device unless enough freed blocks wait for a synchronize or memory
    /// runs out. The pool keeps no record of the block: the caller (the tracker, in production
    /// and in the tests) must give exactly that back to `free_unchecked`/`free_async_unchecked`,
    /// once; one map of live blocks is enough, and it saves a map operation per call.
    #[inline]
    pub fn alloc_unchecked(&self, size: usize) -> Result<(DevicePtr, usize)> {
        self.alloc_cached(size, Ordered::Device)
    }

    /// `alloc_unchecked`, saying whether the caller's contract allows a device synchronize.
    #[inline]
    fn alloc_cached(&self, size: usize, ordered: Ordered) -> Result<(DevicePtr, usize)> {
        let block = checked_block(size)?;
        if let Some(class) = cache_class(block) {
            let me = my_shard();
            let mut shard = self.shards[me].lock();
            if let Some(ptr) = shard.pop_safe(class) {
                shard.counters.in_use += block as i64;
                shard.counters.allocs += 1;
                shard.counters.hits += 1;
                drop(shard);
                note_owner(ptr, me);
                return Ok((ptr, block));
            }
        }
        self.alloc_slow(block, ordered).map(|ptr| (ptr, block))
    }

    /// Returns a block from `alloc_unchecked`/`alloc_async_unchecked`.
    ///
    /// The caller guarantees (`ptr`, `block`) is exactly what one of those returned and has not
    /// been given back yet; the pool does not check. Memory safety does not depend on it (this is
    /// device memory), but the pool's bookkeeping does.
    #[inline]
    pub fn free_unchecked(&self, ptr: DevicePtr, block: usize) {
        let me = my_shard();
        let mut shard = self.shards[me].lock();
        shard.counters.in_use -= block as i64;
        shard.counters.frees += 1;
        let evicted = match cache_class(block) {
            Some(class) if owner_of(ptr) == Some(me) => shard.push(class, ptr),
            Some(class) => {
                drop(shard);
                return self.free_remote_slow(ptr, block, class);
            }
            None => Some(vec![(ptr, block, UNSYNCED)]),
        };
        drop(shard);
        if let Some(evicted) = evicted {
            self.return_to_arena(evicted);
        }
        if self.settings.stream_safety == StreamSafety::Eager {
            // As the runtime's cudaFree: the block is safe once this returns. A failed
            // synchronize leaves it waiting for a later one.
            let _ = self.sync_and_settle();
        }
    }

    /// A block another thread allocated goes back to that thread's shard, so that a thread that
    /// frees what others allocate does not pile it up; with its owner unknown or gone, to the
    /// arena.
    #[cold]
    #[inline(never)]
    fn free_remote_slow(&self, ptr: DevicePtr, block: usize, class: usize) {
        let taken = owner_of(ptr).is_some_and(|o| self.shards[o].push_remote(o, class, ptr));
        if !taken {
            self.return_to_arena(vec![(ptr, block, UNSYNCED)]);
        }
        if self.settings.stream_safety == StreamSafety::Eager {
            let _ = self.sync_and_settle();
        }
    }

    /// `cudaMallocAsync`: reuses a block freed on the same stream at once; else as
    /// `alloc_unchecked` (keeping no record either).
    pub fn alloc_async_unchecked(&self, size: usize, stream: Stream) -> Result<(DevicePtr, usize)> {
        let block = checked_block(size)?;
        if self.stream_freed.load(Ordering::Acquire) > 0 {
            let taken = self.arena_for(block).take_same_stream(
                block,
                largest_split(block),
                stream_key(stream),
            );
            if let Some((ptr, event)) = taken {
                // A split block's rest keeps the event (and stays counted).
                if let Some(event) = event {
                    self.stream_freed.fetch_sub(1, Ordering::AcqRel);
                    self.backend.event_release(event);
                }
                self.count_alloc(block, true);
                note_owner(ptr, my_shard());
                return Ok((ptr, block));
            }
        }
        self.alloc_cached(size, Ordered::Stream)
    }

    /// `cudaFreeAsync` of a block from an `*_unchecked` allocation (see `free_unchecked`): the
    /// block is reusable at once on `stream`, elsewhere once `stream` has passed this point (an
    /// event recorded now).
    pub fn free_async_unchecked(&self, ptr: DevicePtr, block: usize, stream: Stream) {
        self.count_free(block);
        match self.graphs.free(ptr, block, stream) {
            FreeRoute::Stream => self.free_after_event(ptr, block, stream),
            FreeRoute::Kept => {}
            FreeRoute::AfterSync => self.return_to_arena(vec![(ptr, block, UNSYNCED)]),
        }
    }

    /// As `alloc_async_unchecked`, for a CUDA graph capturing into `graph` (PyTorch's
    /// `beginAllocateToPool`): a block the graph pool holds, else a new one that then belongs
    /// to it until `graph_release` (see `capture`).
    pub fn alloc_graph_unchecked(
        &self,
        size: usize,
        stream: Stream,
        graph: GraphId,
    ) -> Result<(DevicePtr, usize)> {
        let block = checked_block(size)?;
        if let Some(ptr) = self.graphs.take(graph, block, stream) {
            self.count_alloc(block, true);
            return Ok((ptr, block));
        }
        let (ptr, block) = self.alloc_async_unchecked(size, stream)?;
        self.graphs.note(ptr, graph);
        Ok((ptr, block))
    }

    /// A capture into `graph` begins; until it ends the pool makes no call a capture forbids.
    pub fn graph_begin(&self, graph: GraphId) {
        self.graphs.begin(graph);
    }

    /// A capture into `graph` has ended: once none is under way, the frees deferred during
    /// captures get their events.
    pub fn graph_end(&self, graph: GraphId) {
        for (ptr, block, stream) in self.graphs.end(graph) {
            self.free_after_event(ptr, block, stream);
        }
    }

    /// A graph of `graph` is gone; with the last one, the pool's parked blocks go back to the
    /// arena, reusable after a device synchronize (replays may still be queued).
    pub fn graph_release(&self, graph: GraphId) {
        let blocks = self.graphs.release(graph);
        self.return_to_arena(blocks.into_iter().map(|(p, b)| (p, b, UNSYNCED)).collect());
    }

    /// Whether a capture has begun into `graph` and its graphs are not all released.
    pub fn graph_is_live(&self, graph: GraphId) -> bool {
        self.graphs.is_live(graph)
    }

    /// Bytes parked in graph pools, reused only by their graphs' captures.
    pub fn graph_parked_bytes(&self) -> usize {
        self.graphs.parked_bytes()
    }

    fn free_after_event(&self, ptr: DevicePtr, block: usize, stream: Stream) {
        // Recorded under the arena, so that one stream's events there are recorded in the order
        // they are marked (the arena's merge of a stream's neighbours relies on it).
        let mut arena = self.arena_for(block);
        match self.backend.event_record(stream) {
            Ok(event) => {
                let epoch = self.epoch.load(Ordering::SeqCst);
                let merged = arena.mark_stream_pending(ptr, stream_key(stream), event, epoch);
                drop(arena);
                self.stream_freed.fetch_add(1, Ordering::AcqRel);
                self.release_events(merged);
            }
            // Without an event, the epoch rule (a later device synchronize) still keeps it safe.
            Err(_) => {
                drop(arena);
                self.return_to_arena(vec![(ptr, block, self.epoch.load(Ordering::SeqCst))]);
            }
        }
    }

    /// The stream-safety mode in force (a plain field: free to read on the free path).
    #[inline]
    pub fn stream_safety(&self) -> StreamSafety {
        self.settings.stream_safety
    }

    /// Why `ptr` is not a live block: double free, interior pointer, or not ours at all.
    #[cold]
    pub fn diagnose(&self, ptr: DevicePtr) -> Error {
        for arena in [&self.small, &self.large] {
            match lock(arena).lookup(ptr) {
                Lookup::Start(_) => return Error::DoubleFree(ptr),
                Lookup::Interior(block) => return Error::InteriorPointer { ptr, block },
                Lookup::NotOurs => {}
            }
        }
        Error::UnknownPointer(ptr)
    }

    /// Returns every cached byte that can be returned to the driver; returns how many.
    pub fn trim(&self) -> Result<usize> {
        for shard in self.shards.iter() {
            let drained = shard.lock().drain();
            self.return_to_arena(drained);
            self.return_to_arena(unsynced(shard.take_remote()));
        }
        self.sync_and_settle()?;
        Ok(self.release_free_chunks(usize::MAX))
    }

    /// A statistics snapshot (takes every shard's lock once).
    pub fn stats(&self) -> PoolStats {
        let mut s = PoolStats::default();
        let mut in_use: i64 = 0;
        for shard in self.shards.iter() {
            let c = shard.lock().counters;
            in_use += c.in_use;
            s.allocs += c.allocs;
            s.frees += c.frees;
            s.pool_hits += c.hits;
        }
        let in_use = in_use.max(0) as usize;
        let peak = self
            .slow
            .peak_in_use
            .fetch_max(in_use, Ordering::Relaxed)
            .max(in_use);
        s.in_use = in_use as u64;
        s.peak_in_use = peak as u64;
        s.reserved = self.slow.reserved.load(Ordering::Relaxed) as u64;
        s.peak_reserved = self.slow.peak_reserved.load(Ordering::Relaxed) as u64;
        s.driver_allocs = self.slow.driver_allocs.load(Ordering::Relaxed);
        s.driver_frees = self.slow.driver_frees.load(Ordering::Relaxed);
        s.pool_misses = self.slow.misses.load(Ordering::Relaxed);
        s.oom_retries = self.releases.releases();
        s.syncs = self.slow.syncs.load(Ordering::Relaxed);
        s
    }

    /// Takes every lock of the pool, in the one order no other path can deadlock against (the
    /// synchronize lock, the arenas, each shard's two locks, the graph pools', then the
    /// backend's; no path holds a shard lock while it waits for another, the graph pools' lock
    /// is held over no other, and the backend calls nothing above it), for
    /// `fork`: the child then finds none held by a thread it lacks.
    pub fn lock_all(&self) -> PoolLocks<'_> {
        let release = self.releases.lock_for_fork();
        let sync = lock(&self.sync_lock);
        let small = lock(&self.small);
        let large = lock(&self.large);
        let shards = self.shards.iter().map(PaddedShard::lock_all).collect();
        let graphs = self.graphs.lock_for_fork();
        PoolLocks {
            _graphs: graphs,
            storm: release,
            _sync: sync,
            _arenas: [small, large],
            _shards: shards,
            _backend: self.backend.lock_for_fork(),
        }
    }

    /// Checks the arenas' invariants; for tests.
    pub fn check(&self) {
        for arena in [&self.small, &self.large] {
            lock(arena).check();
        }
    }

    /// Checks that a block the caller holds (`ptr`, `block` from an `*_unchecked` allocation) is
    /// handed out in its arena, whole; for tests.
    pub fn check_block(&self, ptr: DevicePtr, block: usize) {
        let a = self.arena_for(block);
        assert_eq!(
            a.lookup(ptr),
            Lookup::Start(State::Used),
            "live block {ptr:#x}"
        );
        assert_eq!(a.size_of(ptr), block, "live block {ptr:#x}");
    }

    #[cold]
    #[inline(never)]
    fn alloc_slow(&self, block: usize, ordered: Ordered) -> Result<DevicePtr> {
        self.collect();
        let (ptr, from_cache) = self.take_or_grow_slow(block, ordered)?;
        self.count_alloc(block, from_cache);
        if cache_class(block).is_some() {
            note_owner(ptr, my_shard());
        }
        Ok(ptr)
    }

    /// Takes in what other threads freed to this thread's shard, and hands the shards of exited
    /// threads back to the arena.
    fn collect(&self) {
        let me = my_shard();
        let remote = self.shards[me].take_remote();
        if !remote.is_empty() {
            let mut shard = self.shards[me].lock();
            let evicted: Evicted = remote
                .into_iter()
                .filter_map(|(ptr, class)| shard.push(class, ptr))
                .flatten()
                .collect();
            drop(shard);
            self.return_to_arena(evicted);
        }
        self.adopt_orphans();
    }

    /// Empties every shard whose threads have all exited into the arena (once per exit seen).
    fn adopt_orphans(&self) {
        let now = exits();
        if self.seen_exits.swap(now, Ordering::AcqRel) == now {
            return;
        }
        for (i, shard) in self.shards.iter().enumerate() {
            if is_orphan(i) {
                let drained = shard.lock().drain();
                self.return_to_arena(drained);
                self.return_to_arena(unsynced(shard.take_remote()));
            }
        }
    }

    /// Bytes cached in thread caches (after adopting the caches of exited threads); for tests
    /// and diagnostics: cheap enough, but takes every shard's lock.
    pub fn thread_cached_bytes(&self) -> usize {
        self.adopt_orphans();
        self.shards
            .iter()
            .map(|s| s.lock().cached_bytes + s.remote_bytes())
            .sum()
    }

    /// Finds memory for one block: (address, whether it came from cached memory).
    fn take_or_grow_slow(&self, block: usize, ordered: Ordered) -> Result<(DevicePtr, bool)> {
        // Enough blocks of this size wait in this thread's cache: one synchronize makes them all
        // reusable, which is cheaper than growing the arena by as many blocks again.
        let mut own_waiting = 0;
        if let Some(class) = cache_class(block) {
            // Other threads' synchronizes may have made this thread's blocks safe already.
            // The pool epoch is read under the shard's lock, after every free the shard holds
            // (threads beyond N_SHARDS share shards).
            let mut shard = self.shards[my_shard()].lock();
            shard.credit(
                self.epoch.load(Ordering::SeqCst),
                self.completed.load(Ordering::Acquire),
            );
            if let Some(ptr) = shard.pop_safe(class) {
                return Ok((ptr, true));
            }
            let waiting = shard.waiting(class);
            own_waiting = waiting;
            drop(shard);
            if waiting >= self.batch.class(block) && !capture::quiet() {
                self.sync_and_settle()?;
                if let Some(ptr) = self.take_from_shard(block) {
                    return Ok((ptr, true));
                }
            }
        }
        if let Some(ptr) = self.take_from_arena(block) {
            return Ok((ptr, true));
        }
        if !capture::quiet() && self.waiting_bytes() >= self.batch.pending(block) {
            self.sync_and_settle()?;
            if let Some(ptr) = self
                .take_from_shard(block)
                .or_else(|| self.take_from_arena(block))
            {
                return Ok((ptr, true));
            }
        }
        if let Some(ptr) = self.reclaim_before_grow(block, own_waiting, ordered)? {
            return Ok((ptr, true));
        }
        let ticket = self.releases.ticket();
        match self.grow(block) {
            Ok(ptr) => Ok((ptr, false)),
            Err(e @ Error::OutOfMemory { .. }) => self.retry_after_oom_slow(block, ticket, e),
            Err(e) => Err(e),
        }
    }

    /// Before the pool grows past 1 + 1/`SLACK_DIVISOR` times the most it has had in use, the
    /// memory it holds is made usable instead: this thread's cache goes back to the arena (blocks
    /// of other sizes merge with their neighbours there), one synchronize makes what waits for
    /// one reusable (not for stream-ordered callers, whose contract has none: for them, what the
    /// events say is done), and the block is taken by best fit. If it still does not fit, wholly free
    /// chunks go back to the driver, largest first, until growing stays within that bound. This
    /// keeps peak reserved near peak in use when sizes keep changing (a transformer's activations
    /// over varying sequence lengths); below the bound the pool grows as before, so a loop whose
    /// need repeats never gives memory back only to ask for it again.
    fn reclaim_before_grow(
        &self,
        block: usize,
        own_waiting: usize,
        ordered: Ordered,
    ) -> Result<Option<DevicePtr>> {
        // Giving chunks back and synchronizing are both refused during a capture.
        if capture::quiet() {
            return Ok(None);
        }
        // Cheap first: atomics only. The peak is the one the pool samples as it grows.
        let reserved = self.slow.reserved.load(Ordering::Relaxed);
        let peak = self.slow.peak_in_use.load(Ordering::Relaxed);
        let bound = peak.saturating_add((peak / SLACK_DIVISOR).max(RECLAIM_FLOOR));
        let grown = reserved.saturating_add(chunk_size(block));
        if grown <= bound {
            return Ok(None);
        }
        // What can be made usable: this thread's own cache (other sizes, and blocks waiting for a
        // synchronize), the arenas, and what other threads hold but do not use
        // (`reclaim_idle_shards`: a few try-locks, here only, past the bound; visiting them only
        // once the rest had failed left training at 1.12x, as a shard's idleness is seen over
        // two visits). This thread's own blocks of this size that wait for a synchronize are
        // left to the batch rule above (a pair loop synchronizes once per batch, not per pair).
        let shard = &self.shards[my_shard()];
        let mine = shard.lock().cached_bytes + shard.remote_bytes();
        self.reclaim_idle_shards(self.idle_visit_due());
        if (mine + self.arena_bytes()).saturating_sub(own_waiting) < block {
            return Ok(None);
        }
        // A device that cannot give the chunk is out of memory: the release there is the
        // out-of-memory path's, once per storm (`ReleaseGate`), not one per thread here.
        if self
            .backend
            .mem_info()
            .is_ok_and(|(free, _)| free < chunk_size(block))
        {
            return Ok(None);
        }
        let drained = shard.lock().drain();
        self.return_to_arena(drained);
        self.return_to_arena(unsynced(shard.take_remote()));
        if ordered == Ordered::Device {
            self.sync_and_settle()?;
        }
        if let Some(ptr) = self.take_from_arena(block) {
            return Ok(Some(ptr));
        }
        self.release_free_chunks(grown - bound);
        Ok(None)
    }

    /// Whether this reclaim also takes idle threads' caches (`reclaim_idle_shards`), not only
    /// their remote lists: once per growth of the pool (a driver allocation since the last such
    /// visit), so visits follow what memory is taken, not how often threads come by. Doing it on
    /// every reclaim past the bound (a pair loop makes one per synchronize batch) cut a
    /// 16-thread pair loop on an H200 from 71-81 to 3-5 M pairs/s: visits came microseconds
    /// apart, so a thread descheduled or queued on the synchronize lock looked idle and lost
    /// its cache, and every visit took every shard's lock, the line its owner's fast path uses.
    fn idle_visit_due(&self) -> bool {
        let grown = self.slow.driver_allocs.load(Ordering::Relaxed);
        let last = self.last_idle_visit.load(Ordering::Relaxed);
        grown > last
            && self
                .last_idle_visit
                .compare_exchange(last, grown, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Bytes in the arenas that are free or wait for a synchronize.
    fn arena_bytes(&self) -> usize {
        [&self.small, &self.large]
            .iter()
            .map(|a| {
                let a = lock(a);
                a.free_bytes + a.pending_bytes()
            })
            .sum()
    }

    /// Moves into the arena what other threads' shards hold and do not use: their remote lists
    /// (frees their owners have not collected yet) and the caches of shards that allocated
    /// nothing since the previous visit (`PaddedShard::try_take_idle`). Under PyTorch the
    /// autograd thread frees what the main thread allocated, and each thread's cache sits idle
    /// while the other one's phase runs: without this the pool grew past its bound beside them
    /// (train trace: 1650 MiB reserved for 1237 MiB in use). Slow path only, past the growth
    /// bound; never waits for a lock. Returns the bytes moved.
    fn reclaim_idle_shards(&self, caches: bool) -> usize {
        let me = my_shard();
        let mut moved = 0;
        for (i, shard) in self.shards.iter().enumerate() {
            if i == me {
                continue;
            }
            let (remote, cached) = shard.try_take_idle(caches);
            let remote = unsynced(remote);
            moved += remote.iter().chain(&cached).map(|b| b.1).sum::<usize>();
            self.return_to_arena(remote);
            self.return_to_arena(cached);
        }
        moved
    }

    /// Gives wholly free chunks back to the driver, largest first, until at least `enough` bytes
    /// are released (`usize::MAX`: all of them); returns the bytes released.
    fn release_free_chunks(&self, enough: usize) -> usize {
        let mut released = 0;
        for arena in [&self.large, &self.small] {
            if released >= enough {
                break;
            }
            let mut chunks = lock(arena).take_free_chunks();
            chunks.sort_unstable_by_key(|&(_, size)| std::cmp::Reverse(size));
            for (base, size) in chunks {
                if released >= enough {
                    lock(arena).add_chunk(base, size);
                    continue;
                }
                crate::nvtx::heap_remove(base);
                match self.backend.free(base, size) {
                    Ok(()) => {
                        self.slow.sub_reserved(size);
                        released += size;
                    }
                    // The driver refused: keep the chunk rather than lose track of it.
                    Err(_) => {
                        crate::nvtx::heap_add(base, size, crate::nvtx::HeapKind::CachingPool);
                        lock(arena).add_chunk(base, size)
                    }
                }
            }
        }
        released
    }

    /// The driver is out of memory: release everything cached (once per storm), then try once
    /// more. `ticket` was taken before the failed attempt.
    #[cold]
    #[inline(never)]
    fn retry_after_oom_slow(
        &self,
        block: usize,
        ticket: u64,
        oom: Error,
    ) -> Result<(DevicePtr, bool)> {
        let retry = || match self.take_from_arena(block) {
            Some(ptr) => Ok((ptr, true)),
            None => self.grow(block).map(|p| (p, false)),
        };
        // The release synchronizes and frees chunks: not while a capture is under way.
        let retried = match capture::quiet() {
            true => Err(oom),
            false => self
                .release_then(ticket, block, retry)
                .1
                .unwrap_or(Err(oom)),
        };
        retried.inspect_err(|e| {
            if matches!(e, Error::OutOfMemory { .. }) {
                self.report_oom(block);
            }
        })
    }

    /// After an attempt that took `ticket` (`release_ticket`) ran out of memory wanting
    /// `bytes`: joins the out-of-memory storm and gives every cached byte back to the driver,
    /// unless a release already served the storm or the ticket, or releasing cannot make room
    /// (free device memory plus the cache fall short); then runs `retry` if it may succeed,
    /// before leaving the storm (`ReleaseGate::release_then`).
    pub fn release_then<T>(
        &self,
        ticket: u64,
        bytes: usize,
        retry: impl FnOnce() -> T,
    ) -> (Released, Option<T>) {
        let room = || {
            let s = self.stats();
            let cached = s.reserved.saturating_sub(s.in_use) as usize;
            let free = self.backend.mem_info().map_or(usize::MAX, |(free, _)| free);
            cached > 0 && free.saturating_add(cached) >= bytes
        };
        self.releases
            .release_then(ticket, room, || self.trim().unwrap_or(0), retry)
    }

    /// A ticket for `release_then`, taken before an attempt that may run out of memory.
    pub fn release_ticket(&self) -> u64 {
        self.releases.ticket()
    }

    /// Best fit from the arena; for cached classes, also moves a batch into this thread's shard.
    fn take_from_arena(&self, block: usize) -> Option<DevicePtr> {
        let completed = self.completed.load(Ordering::Acquire);
        let mut arena = self.arena_for(block);
        arena.settle_pending(completed);
        let largest = largest_split(block);
        let ptr = match arena.take_fit_within(block, largest) {
            Some(p) => p,
            // Querying events is what a capture forbids first.
            None if arena.has_stream_freed() && !capture::quiet() => {
                let backend = &self.backend;
                let done = arena
                    .settle_stream_freed(completed, |e| backend.event_done(e).unwrap_or(false));
                self.release_events(done);
                arena.take_fit_within(block, largest)?
            }
            None => return None,
        };
        if let Some(class) = cache_class(block) {
            let want = (REFILL_BYTES / block).clamp(1, MAX_REFILL) - 1;
            let extra: Vec<DevicePtr> = (0..want)
                .map_while(|_| arena.take_best_fit(block))
                .collect();
            drop(arena);
            if !extra.is_empty() {
                self.shards[my_shard()].lock().refill(class, &extra);
            }
        }
        Some(ptr)
    }

    fn take_from_shard(&self, block: usize) -> Option<DevicePtr> {
        let class = cache_class(block)?;
        self.shards[my_shard()].lock().pop_safe(class)
    }

    /// Gets a new chunk from the driver and takes the block from it. When the device cannot
    /// give a whole shared chunk (a small device, or one nearly full), a chunk of just the block
    /// is asked for: any allocation that fits in the device is served.
    fn grow(&self, block: usize) -> Result<DevicePtr> {
        let shared = chunk_size(block);
        let alloc = |n| {
            if capture::quiet() {
                crate::backend::relaxed(&*self.backend, || self.backend.alloc(n))
            } else {
                self.backend.alloc(n)
            }
        };
        let (base, size) = match alloc(shared) {
            Ok(base) => (base, shared),
            Err(Error::OutOfMemory { .. }) if shared > block => (alloc(block)?, block),
            Err(e) => return Err(e),
        };
        self.slow.add_reserved(size);
        SlowCounters::bump(&self.slow.misses);
        self.sample_peak_in_use();
        crate::nvtx::heap_add(base, size, crate::nvtx::HeapKind::CachingPool);
        let mut arena = self.arena_for(block);
        arena.add_chunk(base, size);
        Ok(arena
            .take_best_fit(block)
            .expect("a fresh chunk holds the block"))
    }

    /// Bytes that a synchronize now would make reusable (this thread's shard and the arenas).
    fn waiting_bytes(&self) -> usize {
        let mine = self.shards[my_shard()].lock().unsynced_bytes();
        mine + lock(&self.small).pending_bytes() + lock(&self.large).pending_bytes()
    }

    /// A device synchronize that began after this call; then every block freed before the call
    /// is reusable.
    ///
    /// Group commit: threads that need a synchronize while one runs wait for it, and the first
    /// to get the lock afterwards issues one for all of them; the others find their frees
    /// covered and return. At 16 threads each issuing its own, synchronizes cost the most
    /// (halving the batch cost a quarter of the throughput on an H200).
    fn sync_and_settle(&self) -> Result<()> {
        let shard = &self.shards[my_shard()];
        let started_here = shard.lock().begin_sync();
        // A synchronize whose epoch is at least `need` began after this thread's frees.
        let need = self.epoch.load(Ordering::SeqCst);
        {
            let _leader = lock(&self.sync_lock);
            let trusting = self.settings.stream_safety == StreamSafety::Off;
            if trusting || self.completed.load(Ordering::Acquire) <= need {
                let started = self.epoch.fetch_add(1, Ordering::SeqCst);
                self.backend.synchronize()?;
                self.completed.fetch_max(started + 1, Ordering::SeqCst);
                SlowCounters::bump(&self.slow.syncs);
            }
        }
        shard.lock().end_sync(started_here);
        let completed = self.completed.load(Ordering::Acquire);
        for arena in [&self.small, &self.large] {
            let mut a = lock(arena);
            a.settle_pending(completed);
            let done = a.settle_stream_freed(completed, |_| false);
            drop(a);
            self.release_events(done);
        }
        Ok(())
    }

    fn release_events(&self, events: Vec<crate::backend::Event>) {
        self.stream_freed.fetch_sub(events.len(), Ordering::AcqRel);
        for e in events {
            self.backend.event_release(e);
        }
    }

    fn return_to_arena(&self, blocks: Evicted) {
        if blocks.is_empty() {
            return;
        }
        let completed = self.completed.load(Ordering::Acquire);
        // A block whose shard epoch had not completed waits for a pool synchronize that begins
        // after now, which also began after its free.
        let now = self.epoch.load(Ordering::SeqCst);
        let (mut small, mut large) = (None, None);
        for (ptr, size, stamp) in blocks {
            let stamp = if stamp == UNSYNCED { now } else { stamp };
            let arena = if size <= SMALL_LIMIT {
                small.get_or_insert_with(|| lock(&self.small))
            } else {
                large.get_or_insert_with(|| lock(&self.large))
            };
            if stamp < completed {
                arena.release(ptr);
            } else {
                arena.mark_pending(ptr, stamp);
            }
        }
    }

    fn count_alloc(&self, block: usize, hit: bool) {
        let mut shard = self.shards[my_shard()].lock();
        shard.counters.in_use += block as i64;
        shard.counters.allocs += 1;
        shard.counters.hits += hit as u64;
    }

    fn count_free(&self, block: usize) {
        let mut shard = self.shards[my_shard()].lock();
        shard.counters.in_use -= block as i64;
        shard.counters.frees += 1;
    }

    fn sample_peak_in_use(&self) {
        let _ = self.stats();
    }

    #[cold]
    fn report_oom(&self, block: usize) {
        self.backend.report_out_of_memory(block);
        let s = self.stats();
        let (free, total) = self.backend.mem_info().unwrap_or((0, 0));
        let (place, memory) = match self.backend.device() {
            crate::backend::HOST_DEVICE => ("pinned host memory".to_string(), "host"),
            device => (format!("device {device}"), "device"),
        };
        eprintln!(
            "hbmalloc: out of memory on {place}: requested {} bytes; in use {}, cached {}; {memory} free {} of {}",
            block,
            s.in_use,
            s.reserved.saturating_sub(s.in_use),
            free,
            total
        );
    }

    fn arena_for(&self, block: usize) -> MutexGuard<'_, Arena> {
        lock(if block <= SMALL_LIMIT {
            &self.small
        } else {
            &self.large
        })
    }
}

/// What orders an allocation after the frees whose memory it may reuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ordered {
    /// `cudaMalloc`: the runtime's `cudaFree` synchronizes the device, so the pool may too.
    Device,
    /// `cudaMallocAsync` and PyTorch's pluggable allocator: stream order and events only; the
    /// pool's own memory policy never synchronizes for them.
    Stream,
}

/// The largest free block a `block` may be cut from: a small request split off a large free
/// block pins all of it (its chunk cannot go back to the driver while the small block lives), so
/// it takes at most twice its size or its own chunk size, and the pool grows a chunk of the
/// right size instead; `reclaim_before_grow` returns the large one if it stays free.
fn largest_split(block: usize) -> usize {
    block.saturating_mul(2).max(chunk_size(block))
}

/// The key under which blocks freed on `stream` are reused at once by allocations on it.
/// Handles 0 (the default stream, per-thread under `--default-stream per-thread`) and 2
/// (`cudaStreamPerThread`) name a different stream on every thread, so they are keyed by thread
/// too. The key has bit 2 set, so it never equals a real stream handle (8-byte aligned) or the
/// legacy stream's handle 1.
fn stream_key(stream: Stream) -> Stream {
    match stream {
        0 | 2 => (thread_tag() << 4) | 0b100 | stream,
        _ => stream,
    }
}

/// Every lock of one pool, held until dropped (`CachingPool::lock_all`).
pub struct PoolLocks<'a> {
    storm: MutexGuard<'a, crate::backend::reclaim::Storm>,
    _sync: MutexGuard<'a, ()>,
    _arenas: [MutexGuard<'a, Arena>; 2],
    _shards: Vec<super::thread_cache::ShardLocks<'a>>,
    _graphs: Box<dyn crate::backend::Held + 'a>,
    _backend: Option<Box<dyn crate::backend::Held + 'a>>,
}

impl PoolLocks<'_> {
    /// In a child after `fork`, before the locks go: the threads the child lacks are in no
    /// out-of-memory storm (one left counted in would keep the storm open, and its release spent,
    /// for good).
    pub fn after_fork_child(&mut self) {
        self.storm.forget_threads();
    }
}

/// Blocks from a remote list, for the arena: they wait for a pool synchronize begun after now.
fn unsynced(blocks: Vec<(DevicePtr, usize)>) -> Evicted {
    blocks
        .into_iter()
        .map(|(ptr, class)| (ptr, class_size(class), UNSYNCED))
        .collect()
}

/// The rounded block size for a request, or why there is none.
fn checked_block(size: usize) -> Result<usize> {
    if size == 0 {
        return Err(Error::InvalidValue("zero-byte pool allocation"));
    }
    block_size(size).ok_or(Error::OutOfMemory { requested: size })
}

/// The shard class of a block, if blocks of its size are cached per thread (its size must be a
/// class size exactly: blocks reused whole by `alloc_async` may not be).
#[inline]
fn cache_class(block: usize) -> Option<usize> {
    if block > MAX_CLASS_SIZE {
        return None;
    }
    let class = class_of(block);
    (is_cached_class(class) && class_size(class) == block).then_some(class)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Arena updates are completed before any call that could panic, so a poisoned lock still
    // guards consistent data: take it rather than turn one panic into many.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sim::SimBackend;
    use std::sync::Arc;

    fn pool(capacity: usize, stream_safety: StreamSafety) -> (Arc<SimBackend>, Arc<CachingPool>) {
        let sim = Arc::new(SimBackend::new(0, capacity));
        let settings = PoolSettings {
            stream_safety,
            pending_limit: Some(1 << 20),
        };
        (sim.clone(), Arc::new(CachingPool::new(sim, settings)))
    }

    /// Runs `f` on a thread of its own and waits for it (a thread that then exits).
    fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().unwrap()
    }

    #[test]
    fn a_block_freed_by_another_thread_goes_back_to_its_owners_cache() {
        // 256 KiB blocks: the arena refills no extra blocks of that size into the shard.
        const SIZE: usize = 256 << 10;
        let (_sim, pool) = pool(1 << 30, StreamSafety::Off);
        let blocks: Vec<(DevicePtr, usize)> = (0..100)
            .map(|_| pool.alloc_unchecked(SIZE).unwrap())
            .collect();
        let before = pool.stats();
        let consumer = {
            let (pool, blocks) = (pool.clone(), blocks.clone());
            // The consumer stays alive while its cache is inspected: only frees count here.
            on_thread(move || {
                for (p, b) in blocks {
                    pool.free_unchecked(p, b);
                }
                pool.shards[my_shard()].lock().cached_bytes
            })
        };
        assert_eq!(consumer, 0, "the freeing thread keeps nothing");
        let again: Vec<DevicePtr> = (0..100)
            .map(|_| pool.alloc_unchecked(SIZE).unwrap().0)
            .collect();
        let s = pool.stats();
        assert_eq!(
            s.driver_allocs, before.driver_allocs,
            "no new driver allocation"
        );
        assert_eq!(s.pool_hits - before.pool_hits, 100);
        assert!(
            blocks.iter().all(|(p, _)| again.contains(p)),
            "the owner's next allocations are its own blocks, from its cache"
        );
        assert_eq!(
            pool.shards[my_shard()].lock().cached_bytes,
            0,
            "all taken from the owner's cache, none from the arena"
        );
        for p in again {
            pool.free_unchecked(p, SIZE);
        }
        pool.check();
    }

    #[test]
    fn a_thread_that_exits_leaves_nothing_in_thread_caches() {
        // 8 MiB device, filled by one thread that frees everything and exits: another thread's
        // allocations are served from the arena, without the out-of-memory trim.
        let (_sim, pool) = pool(8 << 20, StreamSafety::Batched);
        {
            let pool = pool.clone();
            on_thread(move || {
                let blocks: Vec<_> = (0..8)
                    .map(|_| pool.alloc_unchecked(1 << 20).unwrap())
                    .collect();
                for (p, b) in blocks {
                    pool.free_unchecked(p, b);
                }
            });
        }
        assert_eq!(pool.thread_cached_bytes(), 0, "the exited thread's cache");
        let served = on_thread({
            let pool = pool.clone();
            move || {
                (0..8)
                    .map(|_| pool.alloc_unchecked(1 << 20).unwrap())
                    .collect::<Vec<_>>()
            }
        });
        let s = pool.stats();
        assert_eq!(s.oom_retries, 0, "served without an out-of-memory trim");
        assert_eq!(s.driver_allocs, 4);
        for (p, b) in served {
            pool.free_unchecked(p, b);
        }
        pool.check();
    }
}
