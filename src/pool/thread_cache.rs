//! Per-thread caches of freed blocks: the fast path that needs no global lock.
//!
//! Each thread is assigned one of `N_SHARDS` shards on first use (a `const` thread-local index).
//! A shard holds, per size class, a FIFO of blocks with the epoch stamp they were freed in; a
//! block may leave the cache only when the shard's completed epoch has passed its stamp. Frees
//! push at the back, allocations pop at the front: the oldest block is the one most likely to be
//! safe already.
//!
//! Memory never strands in a thread's cache. A block goes back to the shard that allocated it
//! (`note_owner`/`owner_of`): a free by another thread (PyTorch's autograd thread frees what the
//! main thread allocated) lands on the owner's `remote` list, which the owner collects on its slow
//! path; a free whose owner is unknown or gone goes to the arena. Before the pool grows past its
//! bound, another thread takes remote lists and idle caches into the arena (`try_take_idle`). A thread's exit counts it out of
//! its shard (a destructor of two atomics, safe at process exit); pools then hand the shards left
//! without a thread back to their arena on their next slow path.
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
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

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
/// `remote` takes blocks other threads free that this shard's thread allocated; it sits on a line
/// of its own, so those frees do not pull the owner's line away.
#[repr(align(128))]
pub struct PaddedShard {
    local: SpinLock<Shard>,
    remote: Remote,
}

/// Blocks freed by other threads, waiting for the owner to collect them (mimalloc's
/// `thread_delayed_free`): pushed under a spin lock of their own, taken all at once.
#[repr(align(128))]
struct Remote {
    blocks: SpinLock<Vec<(DevicePtr, usize)>>,
    /// Bytes in `blocks`, read without the lock by the owner's slow path.
    bytes: AtomicUsize,
    /// The shard's allocation count when another thread's reclaim last looked at it
    /// (`try_take_idle`); on this line because only other threads touch it.
    reclaim_mark: AtomicU64,
}

/// Bytes a shard's remote list may hold; past that, frees go to the arena instead (the owner may
/// not allocate again for a long time).
pub const REMOTE_CAPACITY: usize = 256 << 20;

impl PaddedShard {
    pub fn new(trusting: bool) -> PaddedShard {
        PaddedShard {
            local: SpinLock::new(Shard::new(trusting)),
            remote: Remote {
                blocks: SpinLock::new(Vec::new()),
                bytes: AtomicUsize::new(0),
                reclaim_mark: AtomicU64::new(0),
            },
        }
    }

    #[inline]
    pub fn lock(&self) -> SpinGuard<'_, Shard> {
        self.local.lock()
    }

    /// Hands a block of `class` freed by another thread to this shard's owner. `false` when the
    /// shard has no live thread or its remote list is full: the caller gives it to the arena.
    pub fn push_remote(&self, index: usize, class: usize, addr: DevicePtr) -> bool {
        let size = class_size(class);
        let mut blocks = self.remote.blocks.lock();
        // Read under the lock: a thread exit decrements the count before it takes this lock to
        // drain the list, so a push that sees a live thread is drained by that exit if not sooner.
        if SHARD_THREADS[index].load(Ordering::Acquire) == 0
            || self.remote.bytes.load(Ordering::Relaxed) + size > REMOTE_CAPACITY
        {
            return false;
        }
        blocks.push((addr, class));
        self.remote.bytes.fetch_add(size, Ordering::Release);
        true
    }

    /// Both locks, for `fork` (see `CachingPool::lock_all`).
    pub fn lock_all(&self) -> ShardLocks<'_> {
        ShardLocks {
            _local: self.local.lock(),
            _remote: self.remote.blocks.lock(),
        }
    }

    /// Bytes waiting on the remote list.
    pub fn remote_bytes(&self) -> usize {
        self.remote.bytes.load(Ordering::Acquire)
    }

    /// Takes every block other threads freed to this shard, as (address, class).
    pub fn take_remote(&self) -> Vec<(DevicePtr, usize)> {
        if self.remote.bytes.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let mut blocks = self.remote.blocks.lock();
        self.remote.bytes.store(0, Ordering::Relaxed);
        std::mem::take(&mut *blocks)
    }

    /// For another thread's reclaim (slow path only, never waits): what this shard holds that its
    /// own thread is not using. The remote list always (blocks other threads freed, which the
    /// owner collects only on its slow path), as (address, class) for the arena; the cache only
    /// if the shard made no allocation since the previous such visit, so that a thread that keeps
    /// allocating keeps its working set (draining busy threads' caches on every growth cost a
    /// 16-thread pair loop on an H200 50-80x its throughput). A lock held elsewhere is skipped.
    /// `caches: false` takes the remote list only (an atomic read when it is empty; the owner's
    /// lock is not touched).
    pub fn try_take_idle(&self, caches: bool) -> (Vec<(DevicePtr, usize)>, Evicted) {
        let remote = match self.remote.bytes.load(Ordering::Acquire) {
            0 => Vec::new(),
            _ => self
                .remote
                .blocks
                .try_lock()
                .map_or_else(Vec::new, |mut b| {
                    self.remote.bytes.store(0, Ordering::Relaxed);
                    std::mem::take(&mut *b)
                }),
        };
        if !caches {
            return (remote, Vec::new());
        }
        let cached = match self.local.try_lock() {
            Some(mut shard) => {
                let allocs = shard.counters.allocs;
                let idle = self.remote.reclaim_mark.swap(allocs, Ordering::Relaxed) == allocs;
                if idle && shard.cached_bytes > 0 {
                    shard.drain()
                } else {
                    Vec::new()
                }
            }
            None => Vec::new(),
        };
        (remote, cached)
    }
}

/// A shard's two locks, held until dropped.
pub struct ShardLocks<'a> {
    _local: SpinGuard<'a, Shard>,
    _remote: SpinGuard<'a, Vec<(DevicePtr, usize)>>,
}

/// In a child after `fork`: only the calling thread survived, so every other thread's shard
/// has no thread now, and pools adopt those shards on their next slow path.
pub fn after_fork_child() {
    let mine = MY.with(|m| m.shard.get());
    for (i, count) in SHARD_THREADS.iter().enumerate() {
        count.store((i as u32 == mine) as u32, Ordering::Release);
    }
    EXITS.fetch_add(1, Ordering::Release);
}

static NEXT_SHARD: AtomicU32 = AtomicU32::new(0);

static NEXT_THREAD: AtomicUsize = AtomicUsize::new(1);

/// Live threads assigned to each shard index (all pools use the same index for a thread).
static SHARD_THREADS: [AtomicU32; N_SHARDS] = [const { AtomicU32::new(0) }; N_SHARDS];
/// Bumped whenever a thread with a shard exits: pools then adopt the shards left without a
/// thread (`orphans`).
static EXITS: AtomicU64 = AtomicU64::new(0);

/// Everything the pool keeps per thread, in one block, so one TLS address computation serves
/// the shard and the tag. A `const`-initialised `thread_local!` of a type without `Drop` needs no
/// lazy-init check and registers no destructor: the access is the platform's TLS access alone.
/// In `libhbmalloc.so` that is the general-dynamic model (a `__tls_get_addr` call, resolved to a
/// few loads after a thread's first use); initial-exec, which a preloaded library could use,
/// needs the unstable `-Z tls-model` or `#[thread_local]`, so stable Rust cannot ask for it. The
/// exit notice (`EXIT_NOTE`) has a destructor and lives apart, touched once per thread.
struct ThreadBlock {
    /// Shard index, `u32::MAX` until assigned.
    shard: Cell<u32>,
    /// `thread_tag`, 0 until assigned.
    tag: Cell<usize>,
}

thread_local! {
    static MY: ThreadBlock = const {
        ThreadBlock {
            shard: Cell::new(u32::MAX),
            tag: Cell::new(0),
        }
    };
    /// Registered on shard assignment; its destructor only counts the thread out (two atomics,
    /// no pool is touched: a pool may be gone by then, and at process exit nothing else may run).
    static EXIT_NOTE: ExitNote = const { ExitNote };
}

struct ExitNote;

impl Drop for ExitNote {
    fn drop(&mut self) {
        let shard = MY.with(|m| m.shard.get());
        if shard != u32::MAX {
            SHARD_THREADS[shard as usize].fetch_sub(1, Ordering::AcqRel);
            EXITS.fetch_add(1, Ordering::Release);
        }
    }
}

/// The number of thread exits so far; a pool that saw another value adopts `orphans`.
#[inline]
pub fn exits() -> u64 {
    EXITS.load(Ordering::Acquire)
}

/// Whether shard `index` has no live thread: its blocks belong in the arena.
pub fn is_orphan(index: usize) -> bool {
    SHARD_THREADS[index].load(Ordering::Acquire) == 0
}

/// A number unique to this thread for the life of the process (never 0).
#[inline]
pub fn thread_tag() -> usize {
    MY.with(|m| {
        if m.tag.get() == 0 {
            m.tag.set(NEXT_THREAD.fetch_add(1, Ordering::Relaxed));
        }
        m.tag.get()
    })
}

/// This thread's shard index, assigned round-robin on first use.
#[inline]
pub fn my_shard() -> usize {
    let i = MY.with(|m| m.shard.get());
    if i != u32::MAX {
        return i as usize;
    }
    assign_shard()
}

#[cold]
#[inline(never)]
fn assign_shard() -> usize {
    let i = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % N_SHARDS as u32;
    SHARD_THREADS[i as usize].fetch_add(1, Ordering::AcqRel);
    MY.with(|m| m.shard.set(i));
    // Fails only while this thread's thread-locals are being destroyed: then it is not counted
    // out either, so its shard is never taken for an orphan while it runs.
    let _ = EXIT_NOTE.try_with(|_| ());
    i as usize
}

/// Which shard allocated a block: a direct-mapped table of `address | shard + 1`, written by the
/// allocating thread (one plain store), read by the freeing one. Lossy: a later block that maps to
/// the same slot overwrites the entry, and its free then finds no owner (`owner_of` is `None`).
/// Never wrong: an entry names an address exactly, and an address is allocated again only after
/// it was freed (and then noted again).
static OWNERS: [AtomicUsize; 1 << OWNER_BITS] = [const { AtomicUsize::new(0) }; 1 << OWNER_BITS];
const OWNER_BITS: u32 = 18;

#[inline]
fn owner_slot(addr: DevicePtr) -> &'static AtomicUsize {
    let h = ((addr as u64 >> 9).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - OWNER_BITS)) as usize;
    &OWNERS[h]
}

/// Notes that shard `shard` allocated the block at `addr` (512-aligned).
#[inline]
pub fn note_owner(addr: DevicePtr, shard: usize) {
    owner_slot(addr).store(addr | (shard + 1), Ordering::Relaxed);
}

/// The shard that allocated the live block at `addr`, if the table still knows.
#[inline]
pub fn owner_of(addr: DevicePtr) -> Option<usize> {
    let entry = owner_slot(addr).load(Ordering::Relaxed);
    (entry & !511 == addr && entry & 511 != 0).then(|| (entry & 511) - 1)
}
