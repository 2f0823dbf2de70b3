//! The tracker's map of live allocations: address -> `Live`, built for the allocation hot path.
//!
//! Why not a sharded map (`DashMap`, which this replaced): each insert and remove took a shard's
//! lock (two read-modify-writes on a line shared by every address of the shard), and the locks
//! were a third of a drop-in alloc+free pair; at 16 threads their lines moved between cores.
//! Here an insert is one compare-and-swap on the key's slot plus a store, a remove the same, and
//! two threads touch the same cache line only when their addresses hash to the same bucket.
//!
//! Layout: buckets of 8 key words (one cache line) and a parallel array of values. A key lives in
//! its home bucket or, when that is full, in one of the next `PROBE - 1` buckets, and past those
//! in a locked overflow map; the home bucket then carries a sticky `spilled` flag, so that a
//! lookup that misses a home bucket without it stops there. The table never grows; the
//! overflow map takes any number of entries, so it is only slower, never wrong, when full.
//!
//! A key word is 0 (empty), the address (live, value readable) or the address with its low bit
//! set (held: being written, read or removed by one thread, which owns the value meanwhile).
//! Holding is a compare-and-swap with acquire ordering and releasing a plain store with release
//! ordering, so the value moves between threads under the same rules as a spin lock's data. A
//! holder never waits for anything while it holds, so others spin only for a few instructions.
//! Addresses that are 0 or odd cannot be keys and go to the overflow map.

use super::registry::Live;
use std::cell::UnsafeCell;
use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

const SLOTS: usize = 8;
/// Buckets a key may occupy, starting at its home bucket.
const PROBE: usize = 4;
const HELD: usize = 1;
/// Default size: 2^14 buckets, 131,072 slots (1 MiB of keys, 6 MiB of values, touched only
/// where used). Far more live allocations than real programs keep fit before the overflow map.
pub const DEFAULT_BUCKET_BITS: u32 = 14;

#[repr(align(64))]
struct Bucket([AtomicUsize; SLOTS]);

pub struct LiveTable {
    buckets: Box<[Bucket]>,
    values: Box<[UnsafeCell<MaybeUninit<Live>>]>,
    /// Per bucket: some key homed here was placed in a later bucket or the overflow map.
    spilled: Box<[AtomicBool]>,
    bits: u32,
    overflow: Mutex<HashMap<usize, Live>>,
    overflow_len: AtomicUsize,
}

// SAFETY: a value is read or written only by the thread holding its slot's key word (see the
// module doc), whose acquire/release operations order those accesses; `Live` is plain data.
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
        // SAFETY: all-zero bytes are valid for each: eight zero atomics (empty slots), an
        // uninitialised value, `false`.
        let (buckets, values, spilled) =
            unsafe { (zeroed_slice(n), zeroed_slice(n * SLOTS), zeroed_slice(n)) };
        LiveTable {
            buckets,
            values,
            spilled,
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
        ptr != 0 && ptr & HELD == 0
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
                unsafe { (*self.values[slot].get()).write(make()) };
                key.store(ptr, Ordering::Release);
            }
            None => self.insert_overflow(ptr, make()),
        }
    }

    /// Holds a slot for `ptr`: its existing record's (a free we never saw) or an empty one.
    /// Returns the key word and the value's index; `None` sends the record to the overflow map.
    #[inline]
    fn claim(&self, ptr: usize) -> Option<(&AtomicUsize, usize)> {
        if !Self::fits(ptr) {
            return None;
        }
        let home = self.home(ptr);
        if self.spilled[home].load(Ordering::Relaxed) {
            // The address may be recorded past its home bucket: drop that record first.
            let _ = self.remove_if(ptr, |_| true);
        }
        for i in 0..PROBE {
            let b = self.bucket(home, i);
            if i == 1 {
                self.spilled[home].store(true, Ordering::Relaxed);
            }
            for (s, key) in self.buckets[b].0.iter().enumerate() {
                let k = key.load(Ordering::Relaxed);
                let claimed = if k != 0 && k & !HELD == ptr {
                    self.hold(key, ptr).is_some()
                } else {
                    k == 0
                        && key
                            .compare_exchange(0, ptr | HELD, Ordering::Acquire, Ordering::Relaxed)
                            .is_ok()
                };
                if claimed {
                    return Some((key, b * SLOTS + s));
                }
            }
        }
        None
    }

    #[cold]
    fn insert_overflow(&self, ptr: usize, live: Live) {
        if Self::fits(ptr) {
            self.spilled[self.home(ptr)].store(true, Ordering::Relaxed);
        }
        if self.overflow().insert(ptr, live).is_none() {
            self.overflow_len.fetch_add(1, Ordering::Release);
        }
    }

    /// Takes `key` from live `ptr` to held. `None` if it holds another address (it changed
    /// meanwhile); waits while another thread holds `ptr`'s record.
    #[inline]
    fn hold(&self, key: &AtomicUsize, ptr: usize) -> Option<()> {
        let mut spins = 0u32;
        loop {
            match key.compare_exchange_weak(ptr, ptr | HELD, Ordering::Acquire, Ordering::Relaxed) {
                Ok(_) => return Some(()),
                Err(k) if k == ptr | HELD => backoff(&mut spins),
                Err(k) if k == ptr => {}
                Err(_) => return None,
            }
        }
    }

    /// Removes `ptr`'s record if `accept` says so; returns it. A record that `accept` refuses
    /// stays live, and `None` is returned as for an address not recorded.
    #[inline]
    pub fn remove_if(&self, ptr: usize, accept: impl FnOnce(&Live) -> bool) -> Option<Live> {
        self.remove_with(ptr, |live| accept(live).then_some(*live))
    }

    /// Shows `ptr`'s record to `f`, in place, while holding it: the record is removed when `f`
    /// returns `Some`, kept when it returns `None`. `None` also when `ptr` is not recorded.
    /// In place because the free path needs a few fields and a copy for the freed ring, and
    /// moving the whole record through temporaries cost more than the lookup.
    #[inline]
    pub fn remove_with<R>(&self, ptr: usize, f: impl FnOnce(&Live) -> Option<R>) -> Option<R> {
        let Some((key, slot)) = self.find_and_hold(ptr) else {
            return self.overflow_remove_with(ptr, f);
        };
        // SAFETY: held by this thread; a key is released only after its value is written.
        let r = f(unsafe { (*self.values[slot].get()).assume_init_ref() });
        key.store(if r.is_some() { 0 } else { ptr }, Ordering::Release);
        r
    }

    /// A copy of `ptr`'s record.
    pub fn get(&self, ptr: usize) -> Option<Live> {
        let Some((key, slot)) = self.find_and_hold(ptr) else {
            if self.overflow_len.load(Ordering::Acquire) == 0 {
                return None;
            }
            return self.overflow().get(&ptr).copied();
        };
        // SAFETY: as in `remove_if`.
        let live = unsafe { (*self.values[slot].get()).assume_init() };
        key.store(ptr, Ordering::Release);
        Some(live)
    }

    /// Finds `ptr` in the buckets and holds its key word; returns it and the value's index.
    /// `None` if it is not there (it may still be in the overflow map).
    #[inline]
    fn find_and_hold(&self, ptr: usize) -> Option<(&AtomicUsize, usize)> {
        if !Self::fits(ptr) {
            return None;
        }
        let home = self.home(ptr);
        let probe = if self.spilled[home].load(Ordering::Relaxed) {
            PROBE
        } else {
            1
        };
        for i in 0..probe {
            let b = self.bucket(home, i);
            for (s, key) in self.buckets[b].0.iter().enumerate() {
                if key.load(Ordering::Relaxed) & !HELD == ptr && self.hold(key, ptr).is_some() {
                    return Some((key, b * SLOTS + s));
                }
            }
        }
        None
    }

    #[cold]
    fn overflow_remove_with<R>(&self, ptr: usize, f: impl FnOnce(&Live) -> Option<R>) -> Option<R> {
        if self.overflow_len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut map = self.overflow();
        let r = f(map.get(&ptr)?)?;
        map.remove(&ptr);
        self.overflow_len.fetch_sub(1, Ordering::Release);
        Some(r)
    }

    /// Calls `f` with a copy of every record. Records inserted or removed meanwhile by other
    /// threads may or may not be seen; every other record is seen exactly once.
    pub fn for_each(&self, mut f: impl FnMut(usize, Live)) {
        for (b, bucket) in self.buckets.iter().enumerate() {
            for (s, key) in bucket.0.iter().enumerate() {
                let mut spins = 0u32;
                loop {
                    let k = key.load(Ordering::Relaxed);
                    if k == 0 {
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
                    // SAFETY: held by this thread.
                    let live = unsafe { *(*self.values[b * SLOTS + s].get()).assume_init_ref() };
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
            device: 0,
            thread: 0,
            stack: StackId::NONE,
            origin: Origin::CudaMalloc,
        }
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
