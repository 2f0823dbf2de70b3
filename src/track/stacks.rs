//! Interning of captured stacks: each distinct stack is stored once and named by a `StackId`.
//!
//! Most allocations come from a few call sites, so the common case is a hit in a small per-thread
//! cache: one hash of the raw addresses, no lock and no shared cache line. A cache miss looks the
//! stack up in the shared table (one shard read lock); a table miss copies it in (slow path).
//!
//! The per-thread cache matches on the 64-bit hash of the addresses alone, not on the addresses:
//! two distinct stacks would have to collide in 64 bits to be confused, a chance of about 2^-64
//! per lookup per cached stack. The shared table compares the addresses in full.

use dashmap::DashMap;
use std::cell::Cell;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// Slots of the per-thread cache (direct-mapped by hash): 64 x 16 bytes of thread-local memory.
const CACHE_SLOTS: usize = 64;

#[derive(Clone, Copy)]
struct CacheEntry {
    hash: u64,
    /// `StackTable::serial` of the table the id belongs to; 0 in an empty slot.
    table: u32,
    id: StackId,
}

thread_local! {
    // `const` and `Copy` contents: no destructor, usable at exit and from any thread.
    static CACHE: [Cell<CacheEntry>; CACHE_SLOTS] =
        const { [const { Cell::new(CacheEntry { hash: 0, table: 0, id: StackId::NONE }) }; CACHE_SLOTS] };
}

/// Serial numbers of tables, so that a thread's cache never answers for another table.
static NEXT_TABLE: AtomicU32 = AtomicU32::new(1);

/// A distinct stack in a `StackTable`; `StackId::NONE` is "no stack recorded".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct StackId(pub u32);

impl StackId {
    pub const NONE: StackId = StackId(0);

    pub fn is_none(self) -> bool {
        self.0 == 0
    }
}

/// The most distinct stacks one table holds; past that, new stacks are recorded as `NONE` and
/// counted in `StackTable::overflowed`. A program that reaches it allocates from unbounded recursion
/// depths or JIT code; 1M stacks of 32 frames is ~300 MiB, which is the ceiling we accept.
pub const MAX_STACKS: u32 = 1 << 20;

/// A fast hasher for addresses and short address slices: FxHash's mixing step per word and a
/// murmur3 finalizer, so that 256-byte-aligned pointers still spread over every bucket bit.
#[derive(Default, Clone, Copy)]
pub struct AddrHasher(u64);

impl Hasher for AddrHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    #[inline]
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }

    #[inline]
    fn write_u32(&mut self, x: u32) {
        self.write_u64(x as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

pub type AddrBuildHasher = BuildHasherDefault<AddrHasher>;

/// The set of distinct stacks seen so far.
pub struct StackTable {
    serial: u32,
    by_frames: DashMap<Arc<[usize]>, StackId, AddrBuildHasher>,
    by_id: DashMap<StackId, Arc<[usize]>, AddrBuildHasher>,
    next: AtomicU32,
    overflowed: AtomicU64,
}

impl Default for StackTable {
    fn default() -> Self {
        StackTable::new()
    }
}

impl StackTable {
    pub fn new() -> StackTable {
        StackTable {
            serial: NEXT_TABLE.fetch_add(1, Ordering::Relaxed),
            by_frames: DashMap::with_hasher(AddrBuildHasher::default()),
            by_id: DashMap::with_hasher(AddrBuildHasher::default()),
            next: AtomicU32::new(1),
            overflowed: AtomicU64::new(0),
        }
    }

    /// The id of `frames`, adding it on first sight. An empty stack is `NONE`.
    #[inline]
    pub fn intern(&self, frames: &[usize]) -> StackId {
        if frames.is_empty() {
            return StackId::NONE;
        }
        let hash = AddrBuildHasher::default().hash_one(frames);
        let slot = hash as usize % CACHE_SLOTS;
        let cached = CACHE.with(|c| c[slot].get());
        if cached.hash == hash && cached.table == self.serial {
            return cached.id;
        }
        let id = self.intern_shared(frames);
        if !id.is_none() {
            let entry = CacheEntry {
                hash,
                table: self.serial,
                id,
            };
            CACHE.with(|c| c[slot].set(entry));
        }
        id
    }

    #[inline]
    fn intern_shared(&self, frames: &[usize]) -> StackId {
        if let Some(id) = self.by_frames.get(frames) {
            return *id;
        }
        self.intern_slow(frames)
    }

    #[cold]
    #[inline(never)]
    fn intern_slow(&self, frames: &[usize]) -> StackId {
        if self.next.load(Ordering::Relaxed) >= MAX_STACKS {
            self.overflowed.fetch_add(1, Ordering::Relaxed);
            return StackId::NONE;
        }
        let key: Arc<[usize]> = Arc::from(frames);
        // The entry's shard lock is held while the id is taken and published in `by_id`, so two
        // threads racing on one new stack agree on its id. Lock order is always by_frames → by_id.
        *self.by_frames.entry(key.clone()).or_insert_with(|| {
            let id = StackId(self.next.fetch_add(1, Ordering::Relaxed));
            self.by_id.insert(id, key);
            id
        })
    }

    /// The frames of `id`, innermost first; `None` for `NONE` or an id this table never gave.
    pub fn frames(&self, id: StackId) -> Option<Arc<[usize]>> {
        self.by_id.get(&id).map(|f| f.clone())
    }

    /// Number of distinct stacks stored.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Stacks that were recorded as `NONE` because the table was full.
    pub fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_stacks_share_an_id() {
        let table = StackTable::new();
        let a = table.intern(&[1, 2, 3]);
        let b = table.intern(&[1, 2, 4]);
        assert_ne!(a, b);
        assert_eq!(table.intern(&[1, 2, 3]), a);
        assert_eq!(table.intern(&[]), StackId::NONE);
        assert_eq!(table.len(), 2);
        assert_eq!(&*table.frames(a).unwrap(), &[1, 2, 3]);
        assert!(table.frames(StackId::NONE).is_none());
    }

    #[test]
    fn thread_cache_never_answers_for_another_table() {
        let (a, b) = (StackTable::new(), StackTable::new());
        b.intern(&[9, 9, 9]);
        let in_a = a.intern(&[5, 6, 7]);
        let in_b = b.intern(&[5, 6, 7]);
        assert_eq!(in_a, StackId(1));
        assert_eq!(in_b, StackId(2), "b's own numbering, not a's cached id");
        assert_eq!(a.intern(&[5, 6, 7]), in_a);
        assert_eq!(b.intern(&[5, 6, 7]), in_b);
    }

    #[test]
    fn racing_threads_agree_on_ids() {
        let table = StackTable::new();
        let ids: Vec<Vec<StackId>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..200).map(|i| table.intern(&[i, i + 1])).collect()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ids.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(table.len(), 200);
    }

    #[test]
    fn aligned_pointers_spread_over_low_bits() {
        let build = AddrBuildHasher::default();
        let mut low = std::collections::HashSet::new();
        for i in 0..1024usize {
            low.insert(build.hash_one(0x7f00_0000_0000usize + (i << 8)) & 0xff);
        }
        assert!(low.len() > 200, "only {} distinct low bytes", low.len());
    }
}
