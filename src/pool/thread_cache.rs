//! Per-thread caches of freed blocks: the fast path that needs no global lock.
//!
//! Each thread is assigned one of `N_SHARDS` shards on first use (a `const` thread-local index, no
//! destructor, so nothing runs at thread or process exit). A shard holds, per size class, a FIFO of
//! blocks with the epoch stamp they were freed in; a block may leave the cache only when the
//! shard's completed epoch has passed its stamp. Frees push at the back, allocations pop at the
//! front: the oldest block is the one most likely to be safe already.
//!
//! The epochs are the shard's own (see `CachingPool` for the pool-wide ones): a synchronize by
//! the shard's thread starts a new shard epoch and completes the earlier ones. Synchronizes by
//! other threads count on the slow path only (`credit`): a shard epoch closed against the pool's
//! epoch completes once the pool's completed epoch passes that mark. Why not the pool's epoch
//! on the fast path: at 16 threads each thread's synchronize rewrote it, and every free and
//! allocation on every core then missed on its cache line. A block leaving the shard for the
//! arena gets a pool-wide stamp: `SAFE` if its shard epoch completed, else `UNSYNCED`, which the
//! pool replaces by its current epoch (a later stamp than the free's is always conservative).
//!
//! Two threads share a shard only when more than `N_SHARDS` threads allocate; the lock keeps that
//! correct, and an uncontended lock costs one atomic swap and a store.

use super::size_class::{class_size, N_CLASSES};
use crate::backend::DevicePtr;
use crate::sync::{SpinGuard, SpinLock};
use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// Number of shards per pool: enough for one per core on the machines this is meant for.
pub const N_SHARDS: usize = 64;
/// Largest block a shard caches; bigger ones go straight back to the arena.
pub const MAX_CACHED_BLOCK: usize = super::size_class::MAX_CLASS_SIZE;
/// Bytes a shard may hold before it hands its oldest blocks back to the arena. Generous on
/// purpose: an inference step frees hundreds of MiB and allocates the same sizes again, and a
/// cached block is reused without a lock. Out of memory and `hbm_trim` empty every shard.
/// Above the largest synchronize batch (`caching::SyncBatch`), so that a batch waits here.
pub const SHARD_CAPACITY: usize = 2 << 30;
/// Blocks per class a shard may hold: above the pool's per-class synchronize batch, so that a
/// batch waits here rather than spilling into the arena.
const MAX_PER_CLASS: usize = 512;

/// Whether blocks of `class` are cached per thread.
pub fn is_cached_class(class: usize) -> bool {
    class < N_CLASSES && class_size(class) <= MAX_CACHED_BLOCK
}

/// An evicted block's pool-wide stamp: reusable at once.
pub const SAFE: u64 = 0;
/// An evicted block's stamp when its shard epoch has not completed: the pool stamps it anew.
pub const UNSYNCED: u64 = u64::MAX;

/// Closed shard epochs a shard remembers (see `Shard::credit`).
const MAX_CLOSED: usize = 8;
/// The mark of an epoch closed by this thread's own synchronize (`end_sync` completes it).
const OWN: u64 = u64::MAX;

/// Counters a shard keeps under its own lock; the pool sums them for statistics.
#[derive(Clone, Copy, Default, Debug)]
pub struct ShardCounters {
    /// Bytes allocated through this shard minus bytes freed through it (may be negative when
    /// blocks move between threads; the sum over shards is exact).
    pub in_use: i64,
    pub allocs: u64,
    pub frees: u64,
    /// Allocations served from this shard's cache.
    pub hits: u64,
}

pub struct Shard {
    lists: Vec<VecDeque<(DevicePtr, u64)>>,
    /// The stamp of frees now; blocks stamped below `completed` are safe to hand out.
    epoch: u64,
    completed: u64,
    /// Shard epochs closed but not complete, oldest first: (shard epoch, pool epoch when closed,
    /// bytes freed in it and in older dropped entries). Closed on the slow path against the pool's
    /// epoch: once the pool's completed epoch passes that mark, another thread's synchronize
    /// completed it. Closed by `begin_sync` with mark `OWN`: this thread's synchronize completes
    /// it. At most `MAX_CLOSED`; a newer entry covers every older one, so the oldest may merge
    /// into the next.
    closed: VecDeque<(u64, u64, usize)>,
    /// Bytes freed in the current epoch.
    epoch_bytes: usize,
    pub cached_bytes: usize,
    pub counters: ShardCounters,
}

/// A cached block's pool-wide stamp, given its shard's completed epoch (see the module doc).
fn pool_stamp(stamp: u64, completed: u64) -> u64 {
    if stamp < completed {
        SAFE
    } else {
        UNSYNCED
    }
}

/// What a shard gives back when it is over capacity: blocks for the arena, with their pool-wide
/// stamps (`SAFE`, `UNSYNCED`, or a pool epoch).
pub type Evicted = Vec<(DevicePtr, usize, u64)>;

impl Shard {
    /// An empty shard; `trusting` (stream safety off) makes every block safe at once.
    pub fn new(trusting: bool) -> Shard {
        Shard {
            lists: Vec::new(),
            epoch: 1,
            completed: if trusting { u64::MAX } else { 1 },
            closed: VecDeque::new(),
            epoch_bytes: 0,
            cached_bytes: 0,
            counters: ShardCounters::default(),
        }
    }

    /// Called before this shard's thread synchronizes the device: frees from now on wait for a
    /// later synchronize. Returns the token for `end_sync`.
    pub fn begin_sync(&mut self) -> u64 {
        let started = self.epoch;
        self.close(OWN);
        started
    }

    /// The synchronize begun with `started` returned: every block freed before it is safe.
    pub fn end_sync(&mut self, started: u64) {
        self.completed = self.completed.max(started + 1);
        while self.closed.front().is_some_and(|&(e, _, _)| e <= started) {
            self.closed.pop_front();
        }
    }

    /// Ends the current epoch: frees from now on get the next one.
    fn close(&mut self, mark: u64) {
        if self.closed.len() == MAX_CLOSED {
            let (_, _, bytes) = self.closed.pop_front().expect("full");
            self.closed[0].2 += bytes;
        }
        self.closed.push_back((self.epoch, mark, self.epoch_bytes));
        self.epoch_bytes = 0;
        self.epoch += 1;
    }

    /// Takes credit for synchronizes by other threads (slow path only): completes the epochs
    /// closed earlier whose pool mark the pool's completed epoch has passed, then closes the
    /// current epoch against `pool_epoch` if frees were stamped with it. A pool synchronize
    /// that begins after `pool_epoch` was read began after every free of the closed epochs.
    pub fn credit(&mut self, pool_epoch: u64, pool_completed: u64) {
        while let Some(&(epoch, mark, _)) = self.closed.front() {
            if mark >= pool_completed {
                break;
            }
            self.completed = self.completed.max(epoch + 1);
            self.closed.pop_front();
        }
        if self.epoch_bytes > 0 && self.epoch >= self.completed {
            self.close(pool_epoch);
        }
    }

    fn list(&mut self, class: usize) -> &mut VecDeque<(DevicePtr, u64)> {
        if self.lists.is_empty() {
            self.lists = (0..N_CLASSES).map(|_| VecDeque::new()).collect();
        }
        &mut self.lists[class]
    }

    /// Pops the oldest block of `class` if it is safe.
    #[inline]
    pub fn pop_safe(&mut self, class: usize) -> Option<DevicePtr> {
        let list = self.lists.get_mut(class)?;
        match list.front() {
            Some(&(addr, stamp)) if stamp < self.completed => {
                list.pop_front();
                self.cached_bytes -= class_size(class);
                Some(addr)
            }
            _ => None,
        }
    }

    /// Caches a freed block. Returns blocks pushed out to stay within capacity (oldest first).
    #[inline]
    pub fn push(&mut self, class: usize, addr: DevicePtr) -> Option<Evicted> {
        let size = class_size(class);
        let stamp = self.epoch;
        self.epoch_bytes += size;
        self.cached_bytes += size;
        let list = self.list(class);
        list.push_back((addr, stamp));
        if list.len() > MAX_PER_CLASS || self.cached_bytes > SHARD_CAPACITY {
            return Some(self.evict_slow(class));
        }
        None
    }

    #[cold]
    #[inline(never)]
    fn evict_slow(&mut self, class: usize) -> Evicted {
        let mut out = Vec::new();
        // Halve the list that overflowed; then, if still over capacity, drain others oldest-first.
        let keep = self.lists[class].len() / 2;
        while self.lists[class].len() > keep {
            let (a, s) = self.lists[class].pop_front().expect("non-empty");
            self.cached_bytes -= class_size(class);
            out.push((a, class_size(class), pool_stamp(s, self.completed)));
        }
        let mut c = N_CLASSES;
        while self.cached_bytes > SHARD_CAPACITY / 2 && c > 0 {
            c -= 1;
            while let Some((a, s)) = self.lists[c].pop_front() {
                self.cached_bytes -= class_size(c);
                out.push((a, class_size(c), pool_stamp(s, self.completed)));
                if self.cached_bytes <= SHARD_CAPACITY / 2 {
                    break;
                }
            }
        }
        out
    }

    /// Adds blocks the arena just handed over. They are free, hence safe at once: stamp 0 is below
    /// every completed epoch (which start at 1), and they go to the front, ahead of blocks still
    /// waiting.
    pub fn refill(&mut self, class: usize, blocks: &[DevicePtr]) {
        self.cached_bytes += blocks.len() * class_size(class);
        let list = self.list(class);
        for &a in blocks {
            list.push_front((a, 0));
        }
    }

    /// Bytes of `class` blocks cached here. Called on the slow path, when the oldest block of the
    /// class is not yet safe: then none of them is, since stamps only grow along the list.
    pub fn waiting(&self, class: usize) -> usize {
        self.lists
            .get(class)
            .map_or(0, |l| l.len() * class_size(class))
    }

    /// Bytes freed into this shard that only another synchronize would release.
    pub fn unsynced_bytes(&self) -> usize {
        if self.epoch < self.completed {
            return 0; // trusting: everything is safe at once
        }
        self.epoch_bytes + self.closed.iter().map(|&(_, _, b)| b).sum::<usize>()
    }

    /// Empties the shard: every cached block with its size and pool-wide stamp.
    pub fn drain(&mut self) -> Evicted {
        let mut out = Vec::new();
        let completed = self.completed;
        for (c, list) in self.lists.iter_mut().enumerate() {
            out.extend(
                list.drain(..)
                    .map(|(a, s)| (a, class_size(c), pool_stamp(s, completed))),
            );
        }
        self.cached_bytes = 0;
        self.epoch_bytes = 0;
        for entry in self.closed.iter_mut() {
            entry.2 = 0;
        }
        out
    }
}

/// A shard on its own cache lines, so neighbouring shards' locks do not share a line. A spin
/// lock: every critical section is a few list operations (no driver call is made under it).
#[repr(align(128))]
pub struct PaddedShard(pub SpinLock<Shard>);

impl PaddedShard {
    pub fn new(trusting: bool) -> PaddedShard {
        PaddedShard(SpinLock::new(Shard::new(trusting)))
    }

    #[inline]
    pub fn lock(&self) -> SpinGuard<'_, Shard> {
        self.0.lock()
    }
}

static NEXT_SHARD: AtomicU32 = AtomicU32::new(0);

static NEXT_THREAD: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    static MY_SHARD: Cell<u32> = const { Cell::new(u32::MAX) };
    static MY_TAG: Cell<usize> = const { Cell::new(0) };
}

/// A number unique to this thread for the life of the process (never 0).
#[inline]
pub fn thread_tag() -> usize {
    MY_TAG.with(|t| {
        if t.get() == 0 {
            t.set(NEXT_THREAD.fetch_add(1, Ordering::Relaxed));
        }
        t.get()
    })
}

/// This thread's shard index, assigned round-robin on first use.
#[inline]
pub fn my_shard() -> usize {
    MY_SHARD.with(|s| {
        let mut i = s.get();
        if i == u32::MAX {
            i = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % N_SHARDS as u32;
            s.set(i);
        }
        i as usize
    })
}
