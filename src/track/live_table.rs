//! The tracker's map of live allocations, address -> `Live`, built for the allocation hot path;
//! it also remembers recently freed blocks for the double-free diagnostic.
//!
//! Why not a sharded map (`DashMap`, which this replaced): each insert and remove took a shard's
//! lock (two read-modify-writes on a line shared by every address of the shard), and the locks
//! were a third of a drop-in alloc+free pair; at 16 threads their lines moved between cores.
//! Here an insert is one compare-and-swap on the key's slot plus a store, a remove the same, and
//! two threads touch the same cache line only when their addresses hash to the same bucket.
//!
//! Layout: buckets of 7 key words and a flag (one cache line) and a parallel array of slots, one line
//! each. A key lives in its home bucket or, when that is full, in one of the next `PROBE - 1`
//! buckets, and past those in a locked overflow map; the home bucket then carries a sticky
//! `spilled` flag, so that a lookup that misses a home bucket without it stops there. The table
//! never grows; the overflow map takes any number of entries, so it is only slower, never
//! wrong, when full.
//!
//! Key words: 0 (empty), `addr` (live), `addr | FREED` (freed: the slot still holds the record,
//! now with who freed it, until an insert reuses the slot), either with `HELD` set (one thread
//! is writing, reading or removing it and owns the slot meanwhile). A free thus leaves its
//! record where it was, at no cost beyond the key store, instead of copying it to a ring.
//! Holding is a compare-and-swap with acquire ordering and releasing a plain store with release
//! ordering, so the slot moves between threads under the same rules as a spin lock's data. A
//! holder never waits for anything while it holds, so others spin only for a few instructions.
//! Addresses that are 0 or not 4-byte aligned cannot be keys and go to the overflow map, whose
//! freed entries are not remembered.

use super::registry::Live;
use super::stacks::StackId;
use std::cell::UnsafeCell;
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::ptr::{addr_of, addr_of_mut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Keys per bucket: seven, and the bucket's `spilled` flag in the eighth word, so that a lookup
/// reads one cache line.
const SLOTS: usize = 7;
/// Buckets a key may occupy, starting at its home bucket.
const PROBE: usize = 4;
const HELD: usize = 1;
const FREED: usize = 2;
const TAG: usize = HELD | FREED;
/// Default size: 2^15 buckets, 229,376 slots (2 MiB of keys, 14 MiB of slots, touched only
/// where used, a page per key at most). Far more live allocations than real programs keep fit
/// before the overflow map. 2^15 rather than 2^14: at 16 threads, fewer buckets hold keys of
/// several threads, whose compare-and-swaps then move the bucket's line between cores (H200
/// host, same run: 88 vs 56 M pairs/s).
pub const DEFAULT_BUCKET_BITS: u32 = 15;

#[repr(align(64))]
struct Bucket {
    keys: [AtomicUsize; SLOTS],
    /// Some key homed here was placed in a later bucket or the overflow map (sticky).
    spilled: AtomicBool,
}

/// Who freed a block, as its slot remembers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreeMark {
    pub stack: StackId,
    pub thread: u32,
    /// Known when the tracker reads the clock on frees (with a timeline).
    pub time_ns: Option<u64>,
}

/// A slot's contents: one cache line. `live` is written before a key first names the slot,
/// `free` before a key marks it `FREED`; neither is read before.
#[repr(align(64))]
struct Slot {
    live: Live,
    free: FreeMark,
}

pub struct LiveTable {
    buckets: Box<[Bucket]>,
    slots: Box<[UnsafeCell<MaybeUninit<Slot>>]>,
    bits: u32,
    overflow: Mutex<HashMap<usize, Live>>,
    overflow_len: AtomicUsize,
}

impl LiveTable {
    /// In a child after `fork`: every key another thread held at the fork is dropped. Its
    /// holder does not exist here, so it would never be released, and the next thread to probe
    /// that bucket would spin forever; the entry was being written or removed, so its record is
    /// not to be trusted either (the child reports none of the parent's allocations). Only the
    /// forking thread runs, so plain stores suffice.
    pub fn after_fork_child(&self) {
        for bucket in self.buckets.iter() {
            for key in &bucket.keys {
                if key.load(Ordering::Relaxed) & HELD != 0 {
                    key.store(0, Ordering::Relaxed);
                }
            }
        }
    }
}

/// The overflow map's lock, held until dropped (`LiveTable::lock_for_fork`).
pub struct OverflowLock<'a>(#[allow(dead_code)] std::sync::MutexGuard<'a, HashMap<usize, Live>>);

// SAFETY: a slot is read or written only by the thread holding its key word (see the module
// doc), whose acquire/release operations order those accesses; `Slot` is plain data.
unsafe impl Sync for LiveTable {}
unsafe impl Send for LiveTable {}

impl Default for LiveTable {
    fn default() -> Self {
        LiveTable::with_bucket_bits(DEFAULT_BUCKET_BITS)
    }
}

impl LiveTable {
    /// A table of 2^`bits` buckets (at least `PROBE`).
    pub fn with_bucket_bits(bits: u32) -> LiveTable {
        let bits = bits.clamp(2, 30);
        let n = 1usize << bits;
        // SAFETY: all-zero bytes are valid for each: zero atomics (empty keys), uninitialised
        // slots, `false`.
        let (buckets, slots) = unsafe { (zeroed_slice(n), zeroed_slice(n * SLOTS)) };
        LiveTable {
            buckets,
            slots,
            bits,
            overflow: Mutex::new(HashMap::new()),
            overflow_len: AtomicUsize::new(0),
        }
    }

    #[inline]
    fn home(&self, ptr: usize) -> usize {
        // Fibonacci hashing; device addresses are at least 256-byte aligned, so drop those bits.
        (((ptr >> 8) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - self.bits)) as usize
    }

    #[inline]
    fn bucket(&self, home: usize, i: usize) -> usize {
        (home + i) & ((1 << self.bits) - 1)
    }

    #[inline]
    fn fits(ptr: usize) -> bool {
        ptr != 0 && ptr & TAG == 0
    }

    /// The slot behind key `b`, `s`. Callers dereference it only while holding the key.
    #[inline]
    fn slot(&self, b: usize, s: usize) -> *mut Slot {
        self.slots[b * SLOTS + s].get().cast()
    }

    /// Holds the overflow map's lock for `fork` (`runtime::fork`): a child forked while another
    /// thread held it would wait for it forever on its first record that does not fit the table.
    /// A leaf lock: nothing is taken under it, so it comes after every pool lock.
    pub fn lock_for_fork(&self) -> OverflowLock<'_> {
        OverflowLock(self.overflow())
    }

    fn overflow(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Live>> {
        // Every update under this lock is one map operation: a poisoned map is consistent.
        self.overflow.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `ptr` as live, replacing a record of the same address if there is one.
    #[inline]
    pub fn insert(&self, ptr: usize, live: Live) {
        self.insert_with(ptr, || live)
    }

    /// As `insert`, with the record built by `make` once a slot is held, straight into the slot
    /// (a record built first and then copied in was read back before its stores had retired).
    #[inline]
    pub fn insert_with(&self, ptr: usize, make: impl FnOnce() -> Live) {
        match self.claim(ptr) {
            Some((key, slot)) => {
                // SAFETY: this thread holds `key` (set to `ptr | HELD` by `claim`).
                unsafe { addr_of_mut!((*slot).live).write(make()) };
                key.store(ptr, Ordering::Release);
            }
            None => self.insert_overflow(ptr, make()),
        }
    }

    /// Holds a slot for `ptr`: its existing record's (live: a free we never saw; or freed), else
    /// an empty or freed one. Returns the key word and the slot; `None` sends the record to the
    /// overflow map.
    #[inline]
    fn claim(&self, ptr: usize) -> Option<(&AtomicUsize, *mut Slot)> {
        if !Self::fits(ptr) {
            return None;
        }
        let home = self.home(ptr);
        if self.buckets[home].spilled.load(Ordering::Relaxed) {
            // The address may be recorded past its home bucket: drop that record first.
            let _ = self.remove_if(ptr, |_| true);
        }
        for i in 0..PROBE {
            let b = self.bucket(home, i);
            if i == 1 {
                self.buckets[home].spilled.store(true, Ordering::Relaxed);
            }
            let keys = &self.buckets[b].keys;
            // This address's own record first (one cache line: cheap), then any free slot.
            let own = keys
                .iter()
                .position(|k| k.load(Ordering::Relaxed) & !TAG == ptr);
            for s in own.into_iter().chain(0..SLOTS) {
                if self.take_free_or_own(&keys[s], ptr) {
                    return Some((&keys[s], self.slot(b, s)));
                }
            }
        }
        None
    }

    /// Takes `key` to `ptr | HELD` if it is empty, freed, or `ptr`'s own (waiting while another
    /// thread holds `ptr`'s record). False if it holds another live address.
    #[inline]
    fn take_free_or_own(&self, key: &AtomicUsize, ptr: usize) -> bool {
        let mut spins = 0u32;
        loop {
            let k = key.load(Ordering::Relaxed);
            let free = k == 0 || k & TAG == FREED;
            if !free && k & !TAG != ptr {
                return false;
            }
            if k & HELD != 0 {
                if k & !TAG != ptr {
                    return false;
                }
                backoff(&mut spins);
                continue;
            }
            if key
                .compare_exchange_weak(k, ptr | HELD, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return true;
            }
        }
    }

    #[cold]
    fn insert_overflow(&self, ptr: usize, live: Live) {
        if Self::fits(ptr) {
            self.buckets[self.home(ptr)]
                .spilled
                .store(true, Ordering::Relaxed);
        }
        if self.overflow().insert(ptr, live).is_none() {
            self.overflow_len.fetch_add(1, Ordering::Release);
        }
    }

    /// Takes `key` from `want` to `want | HELD`. False if it holds something else (it changed
    /// meanwhile); waits while another thread holds `want`.
    #[inline]
    fn hold(&self, key: &AtomicUsize, want: usize) -> bool {
        let mut spins = 0u32;
        loop {
            match key.compare_exchange_weak(want, want | HELD, Ordering::Acquire, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(k) if k == want | HELD => backoff(&mut spins),
                Err(k) if k == want => {}
                Err(_) => return false,
            }
        }
    }

    /// Removes `ptr`'s record if `accept` says so; returns it. A record that `accept` refuses
    /// stays live, and `None` is returned as for an address not recorded. Remembers no free.
    #[inline]
    pub fn remove_if(&self, ptr: usize, accept: impl FnOnce(&Live) -> bool) -> Option<Live> {
        self.remove_with(ptr, |live| {
            let mark = FreeMark {
                stack: StackId::NONE,
                thread: 0,
                time_ns: None,
            };
            accept(live).then_some((*live, mark))
        })
    }

    /// Shows `ptr`'s record to `f`, in place, while holding it. When `f` returns `Some((r,
    /// mark))` the record is freed: it stays in its slot with `mark` (see `freed`) until the slot
    /// is reused, and `r` is returned. `None` keeps it live. `None` also when `ptr` is not live.
    /// In place because the free path needs a few fields, and moving the whole record through
    /// temporaries cost more than the lookup.
    #[inline]
    pub fn remove_with<R>(
        &self,
        ptr: usize,
        f: impl FnOnce(&Live) -> Option<(R, FreeMark)>,
    ) -> Option<R> {
        let Some((key, slot)) = self.find_and_hold(ptr) else {
            return self.overflow_remove_with(ptr, f);
        };
        // Released on every way out, a panic in `f` included: live unless freed below.
        let mut held = Held { key, to: ptr };
        // SAFETY: held by this thread; a live key's `live` was written before it was released.
        let (r, mark) = f(unsafe { &*addr_of!((*slot).live) })?;
        // SAFETY: held by this thread.
        unsafe { addr_of_mut!((*slot).free).write(mark) };
        held.to = ptr | FREED;
        Some(r)
    }

    /// Changes `ptr`'s live record in place; false if it is not live.
    pub fn update(&self, ptr: usize, f: impl FnOnce(&mut Live)) -> bool {
        let Some((key, slot)) = self.find_and_hold(ptr) else {
            if self.overflow_len.load(Ordering::Acquire) == 0 {
                return false;
            }
            return self.overflow().get_mut(&ptr).map(f).is_some();
        };
        let _held = Held { key, to: ptr };
        // SAFETY: held by this thread; a live key's `live` was written before it was released.
        f(unsafe { &mut *addr_of_mut!((*slot).live) });
        true
    }

    /// A copy of `ptr`'s record.
    pub fn get(&self, ptr: usize) -> Option<Live> {
        let Some((key, slot)) = self.find_and_hold(ptr) else {
            if self.overflow_len.load(Ordering::Acquire) == 0 {
                return None;
            }
            return self.overflow().get(&ptr).copied();
        };
        // SAFETY: as in `remove_with`.
        let live = unsafe { addr_of!((*slot).live).read() };
        key.store(ptr, Ordering::Release);
        Some(live)
    }

    /// The record of `ptr`'s last free, if its slot has not been reused since (cold: for the
    /// double-free diagnostic).
    pub fn freed(&self, ptr: usize) -> Option<(Live, FreeMark)> {
        if !Self::fits(ptr) {
            return None;
        }
        let home = self.home(ptr);
        // A freed record may sit in any bucket its key could have used, spilled flag or not.
        for i in 0..PROBE {
            let b = self.bucket(home, i);
            for (s, key) in self.buckets[b].keys.iter().enumerate() {
                if key.load(Ordering::Relaxed) & !HELD == ptr | FREED && self.hold(key, ptr | FREED)
                {
                    let slot = self.slot(b, s);
                    // SAFETY: held by this thread; a freed key's slot has both parts written.
                    let found =
                        unsafe { (addr_of!((*slot).live).read(), addr_of!((*slot).free).read()) };
                    key.store(ptr | FREED, Ordering::Release);
                    return Some(found);
                }
            }
        }
        None
    }

    /// Finds live `ptr` in the buckets and holds its key word; returns it and the slot. `None`
    /// if it is not there (it may still be in the overflow map).
    #[inline]
    fn find_and_hold(&self, ptr: usize) -> Option<(&AtomicUsize, *mut Slot)> {
        if !Self::fits(ptr) {
            return None;
        }
        let home = self.home(ptr);
        let probe = if self.buckets[home].spilled.load(Ordering::Relaxed) {
            PROBE
        } else {
            1
        };
        for i in 0..probe {
            let b = self.bucket(home, i);
            for (s, key) in self.buckets[b].keys.iter().enumerate() {
                if key.load(Ordering::Relaxed) & !HELD == ptr && self.hold(key, ptr) {
                    return Some((key, self.slot(b, s)));
                }
            }
        }
        None
    }

    #[cold]
    fn overflow_remove_with<R>(
        &self,
        ptr: usize,
        f: impl FnOnce(&Live) -> Option<(R, FreeMark)>,
    ) -> Option<R> {
        if self.overflow_len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut map = self.overflow();
        let (r, _) = f(map.get(&ptr)?)?;
        map.remove(&ptr);
        self.overflow_len.fetch_sub(1, Ordering::Release);
        Some(r)
    }

    /// Calls `f` with a copy of every live record. Records inserted or removed meanwhile by
    /// other threads may or may not be seen; every other record is seen exactly once.
    pub fn for_each(&self, mut f: impl FnMut(usize, Live)) {
        for (b, bucket) in self.buckets.iter().enumerate() {
            for (s, key) in bucket.keys.iter().enumerate() {
                let mut spins = 0u32;
                loop {
                    let k = key.load(Ordering::Relaxed);
                    if k == 0 || k & TAG == FREED {
                        break;
                    }
                    if k & HELD != 0 {
                        backoff(&mut spins);
                        continue;
                    }
                    if key
                        .compare_exchange_weak(k, k | HELD, Ordering::Acquire, Ordering::Relaxed)
                        .is_err()
                    {
                        continue;
                    }
                    // SAFETY: held by this thread; the key is live, so `live` was written.
                    let live = unsafe { addr_of!((*self.slot(b, s)).live).read() };
                    key.store(k, Ordering::Release);
                    f(k, live);
                    break;
                }
            }
        }
        if self.overflow_len.load(Ordering::Acquire) > 0 {
            let copy: Vec<(usize, Live)> = self.overflow().iter().map(|(&p, &l)| (p, l)).collect();
            for (p, l) in copy {
                f(p, l);
            }
        }
    }
}

/// A boxed slice of `n` zero-filled `T`s. Large zeroed allocations come from fresh mappings, so
/// a table costs address space until its slots are used.
///
/// # Safety
/// All-zero bytes must be a valid `T`.
unsafe fn zeroed_slice<T>(n: usize) -> Box<[T]> {
    let layout = std::alloc::Layout::array::<T>(n).expect("table size fits in memory");
    // SAFETY: `layout` has a non-zero size (n >= 4, T is not zero-sized here).
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) } as *mut T;
    if ptr.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    // SAFETY: `ptr` holds `n` zeroed, hence (by the caller's promise) valid, `T`s, allocated by
    // the global allocator with `T`'s array layout, as `Box` frees it.
    unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, n)) }
}

/// A held key word, released to `to` when dropped: on return and on unwinding alike, so that a
/// panic in a caller's closure cannot leave an address held for ever.
struct Held<'a> {
    key: &'a AtomicUsize,
    to: usize,
}

impl Drop for Held<'_> {
    #[inline]
    fn drop(&mut self) {
        self.key.store(self.to, Ordering::Release);
    }
}

/// Spins briefly, then yields: a holder may have been preempted.
#[inline]
fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::{Origin, StackId};
    use std::sync::Arc;

    fn live(size: u64) -> Live {
        Live {
            size,
            epoch: 0,
            time_ns: 0,
            stream: 0,
            owner: 0,
            device: 0,
            thread: 0,
            stack: StackId::NONE,
            origin: Origin::CudaMalloc,
        }
    }

    /// A key held by a thread that is gone (a child after `fork`) is dropped by
    /// `after_fork_child`, so the next look-up of its bucket does not spin forever.
    #[test]
    fn a_key_held_at_fork_is_dropped_in_the_child() {
        let t = Arc::new(LiveTable::default());
        t.insert(0x1000, live(64));
        let held = t
            .buckets
            .iter()
            .flat_map(|b| b.keys.iter())
            .find(|k| k.load(Ordering::Relaxed) == 0x1000)
            .expect("the key is in its bucket");
        held.store(0x1000 | HELD, Ordering::Relaxed); // its holder "forked away"
        t.after_fork_child();
        let t2 = t.clone();
        let done = std::thread::spawn(move || (t2.get(0x1000), t2.remove_if(0x1000, |_| true)));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !done.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "a look-up spun on the held key"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let (got, removed) = done.join().unwrap();
        assert!(
            got.is_none() && removed.is_none(),
            "the half-written entry is gone"
        );
        t.insert(0x1000, live(128));
        assert_eq!(t.get(0x1000).map(|l| l.size), Some(128));
    }

    fn all(t: &LiveTable) -> Vec<(usize, u64)> {
        let mut v = Vec::new();
        t.for_each(|p, l| v.push((p, l.size)));
        v.sort();
        v
    }

    #[test]
    fn insert_get_remove() {
        let t = LiveTable::with_bucket_bits(4);
        t.insert(0x1000, live(1));
        t.insert(0x2000, live(2));
        assert_eq!(t.get(0x1000).map(|l| l.size), Some(1));
        assert_eq!(t.remove_if(0x1000, |_| true).map(|l| l.size), Some(1));
        assert_eq!(t.remove_if(0x1000, |_| true), None, "removed twice");
        assert_eq!(t.get(0x1000), None);
        assert_eq!(all(&t), vec![(0x2000, 2)]);
    }

    fn mark(thread: u32) -> FreeMark {
        FreeMark {
            stack: StackId(thread + 100),
            thread,
            time_ns: Some(thread as u64),
        }
    }

    #[test]
    fn a_free_is_remembered_until_the_address_is_reused() {
        let t = LiveTable::with_bucket_bits(4);
        t.insert(0x1000, live(64));
        assert_eq!(t.freed(0x1000), None, "live, not freed");
        let size = t.remove_with(0x1000, |l| Some((l.size, mark(7))));
        assert_eq!(size, Some(64));
        let (was, how) = t.freed(0x1000).expect("remembered");
        assert_eq!((was.size, how), (64, mark(7)));
        assert_eq!(t.get(0x1000), None, "freed is not live");
        assert!(all(&t).is_empty(), "freed records are not listed");
        assert_eq!(t.remove_with(0x1000, |l| Some((l.size, mark(8)))), None);
        // Reallocating the address takes its slot back; freeing it again remembers the new free.
        t.insert(0x1000, live(128));
        assert_eq!(t.freed(0x1000), None);
        t.remove_with(0x1000, |l| Some((l.size, mark(9))));
        assert_eq!(
            t.freed(0x1000).map(|(l, m)| (l.size, m)),
            Some((128, mark(9)))
        );
    }

    #[test]
    fn freed_slots_are_reused_by_other_addresses() {
        // 4 buckets x 8 slots: 32 slots. Allocate and free 1000 distinct addresses: all must
        // land in the table (freed slots reused), none in the overflow map.
        let t = LiveTable::with_bucket_bits(2);
        for i in 1..=1000usize {
            t.insert(i << 12, live(i as u64));
            assert!(t.remove_with(i << 12, |_| Some(((), mark(1)))).is_some());
        }
        assert_eq!(t.overflow_len.load(Ordering::Relaxed), 0);
        t.insert(0x5000_0000, live(5));
        assert_eq!(all(&t), vec![(0x5000_0000, 5)]);
    }

    /// A panic in the closure that sees a record releases its key: the address stays usable.
    #[test]
    fn a_panic_while_holding_a_record_releases_it() {
        let t = Arc::new(LiveTable::with_bucket_bits(4));
        t.insert(0x1000, live(7));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            t.remove_with(0x1000, |_| -> Option<((), FreeMark)> {
                panic!("in the closure")
            })
        }));
        assert!(r.is_err());
        let (tx, rx) = std::sync::mpsc::channel();
        let t2 = t.clone();
        std::thread::spawn(move || tx.send(t2.get(0x1000).map(|l| l.size)).unwrap());
        let got = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(got, Ok(Some(7)), "the key was left held");
    }

    #[test]
    fn refused_remove_keeps_the_record() {
        let t = LiveTable::with_bucket_bits(4);
        t.insert(0x1000, live(7));
        assert_eq!(t.remove_if(0x1000, |l| l.size == 8), None);
        assert_eq!(t.get(0x1000).map(|l| l.size), Some(7));
    }

    #[test]
    fn insert_replaces_a_record_of_the_same_address() {
        let t = LiveTable::with_bucket_bits(2);
        // Enough keys that some spill past their home bucket and into the overflow map.
        for p in 1..=200usize {
            t.insert(p << 12, live(p as u64));
        }
        for p in 1..=200usize {
            t.insert(p << 12, live(1000 + p as u64));
        }
        let v = all(&t);
        assert_eq!(v.len(), 200, "one record per address");
        assert!(v.iter().all(|&(p, s)| s == 1000 + (p >> 12) as u64));
    }

    #[test]
    fn full_table_spills_and_odd_addresses_work() {
        // 4 buckets x 8 slots = 32 slots for 1000 keys: most go to the overflow map.
        let t = LiveTable::with_bucket_bits(2);
        let keys: Vec<usize> = (1..=1000usize)
            .map(|i| i * 512)
            .chain([3, 0x1001])
            .collect();
        for &k in &keys {
            t.insert(k, live(k as u64));
        }
        assert_eq!(all(&t).len(), keys.len());
        for &k in &keys {
            assert_eq!(t.get(k).map(|l| l.size), Some(k as u64), "key {k:#x}");
        }
        for &k in keys.iter().step_by(2) {
            assert_eq!(t.remove_if(k, |_| true).map(|l| l.size), Some(k as u64));
        }
        let left: Vec<usize> = all(&t).into_iter().map(|(p, _)| p).collect();
        let mut want: Vec<usize> = keys.iter().skip(1).step_by(2).copied().collect();
        want.sort();
        assert_eq!(left, want);
    }

    #[test]
    fn threads_insert_and_remove_their_own_keys_while_another_iterates() {
        let t = Arc::new(LiveTable::with_bucket_bits(6));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (t, stop) = (t.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    t.for_each(|p, l| {
                        // A record is never seen torn: its size encodes its address.
                        assert_eq!(l.size, p as u64);
                        seen += 1;
                    });
                }
                seen
            })
        };
        let workers: Vec<_> = (0..4usize)
            .map(|w| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for round in 0..2000usize {
                        let keys: Vec<usize> = (0..16)
                            .map(|i| ((w << 20) | (i << 10) | 1 << 30) + round % 3 * 512)
                            .collect();
                        for &k in &keys {
                            t.insert(k, live(k as u64));
                        }
                        for &k in &keys {
                            assert_eq!(t.remove_if(k, |_| true).map(|l| l.size), Some(k as u64));
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        assert!(all(&t).is_empty());
    }
}
