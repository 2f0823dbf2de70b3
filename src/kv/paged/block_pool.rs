//! Block ids and their reference counts: which blocks of a pool are free, which are held and by
//! how many sequences. Pure bookkeeping; the memory behind the ids is `storage`'s.
//!
//! Free blocks are handed out lowest id first, so the live blocks stay packed at the start of the
//! reservation and the memory committed for them stays close to what they need.

use std::collections::BTreeSet;

/// The ids `0 .. n` of one pool. Invariant: a block is in `free` exactly when its count is 0.
#[derive(Clone, Debug)]
pub struct BlockPool {
    refs: Vec<u32>,
    free: BTreeSet<u32>,
    shared: u32,
}

impl BlockPool {
    pub fn new(n: u32) -> BlockPool {
        BlockPool {
            refs: vec![0; n as usize],
            free: (0..n).collect(),
            shared: 0,
        }
    }

    pub fn total(&self) -> u32 {
        self.refs.len() as u32
    }

    pub fn free_count(&self) -> u32 {
        self.free.len() as u32
    }

    pub fn used_count(&self) -> u32 {
        self.total() - self.free_count()
    }

    /// Blocks held by more than one sequence.
    pub fn shared_count(&self) -> u32 {
        self.shared
    }

    /// Sequences holding block `b` (0: free); 0 for an id out of range.
    pub fn refcount(&self, b: u32) -> u32 {
        self.refs.get(b as usize).copied().unwrap_or(0)
    }

    /// Takes the `n` lowest free ids, each with count 1; `None` (nothing taken) if fewer are free.
    pub fn take(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let ids: Vec<u32> = self.free.iter().take(n).copied().collect();
        for &b in &ids {
            self.free.remove(&b);
            self.refs[b as usize] = 1;
        }
        Some(ids)
    }

    /// One more holder of live block `b`.
    ///
    /// # Panics
    /// If `b` is free: sharing a free block is a bookkeeping bug the tests must see.
    pub fn incref(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        assert!(*r > 0, "incref of free block {b}");
        *r += 1;
        if *r == 2 {
            self.shared += 1;
        }
    }

    /// One holder fewer; returns whether `b` became free.
    ///
    /// # Panics
    /// If `b` is already free.
    pub fn decref(&mut self, b: u32) -> bool {
        let r = &mut self.refs[b as usize];
        assert!(*r > 0, "decref of free block {b}");
        *r -= 1;
        if *r == 1 {
            self.shared -= 1;
        }
        if *r == 0 {
            self.free.insert(b);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_first_and_all_or_nothing() {
        let mut p = BlockPool::new(4);
        assert_eq!(p.take(2), Some(vec![0, 1]));
        assert_eq!(p.take(3), None, "only 2 free");
        assert_eq!((p.used_count(), p.free_count()), (2, 2));
        assert!(p.decref(0));
        assert_eq!(
            p.take(2),
            Some(vec![0, 2]),
            "the freed low id comes back first"
        );
    }

    #[test]
    fn counts_and_sharing() {
        let mut p = BlockPool::new(3);
        let b = p.take(1).unwrap()[0];
        p.incref(b);
        p.incref(b);
        assert_eq!((p.refcount(b), p.shared_count()), (3, 1));
        assert!(!p.decref(b));
        assert!(!p.decref(b));
        assert_eq!(p.shared_count(), 0);
        assert!(p.decref(b));
        assert_eq!((p.refcount(b), p.free_count()), (0, 3));
        assert_eq!(p.refcount(99), 0);
    }

    #[test]
    #[should_panic(expected = "decref of free block")]
    fn decref_of_a_free_block_panics() {
        BlockPool::new(2).decref(1);
    }
}
