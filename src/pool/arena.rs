//! The slow-path allocator: best fit over chunks from the driver, blocks split and coalesced.
//!
//! An `Arena` is plain data; the pool keeps it behind a mutex and calls it only when the
//! per-thread caches cannot serve. Every block is in exactly one state:
//! - `Free`: in `free` (by size, then address), reusable by any stream now;
//! - `Used`: handed out, or parked in a per-thread cache (the arena cannot tell the two apart);
//! - `Pending`: freed, but work queued before the free may still use it: reusable once the
//!   pool's completed epoch passes the stamp in `pending`;
//! - `StreamPending`: freed with `cudaFreeAsync`: reusable at once on its stream, elsewhere once
//!   its event completes.
//!
//! Invariant: two adjacent blocks of one chunk are never both `Free` (they are merged).

use super::size_class::MIN_BLOCK;
use crate::backend::{DevicePtr, Event, Stream};
use std::collections::{BTreeMap, BTreeSet, HashMap};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Free,
    Used,
    Pending,
    StreamPending,
}

#[derive(Clone, Copy, Debug)]
pub struct Block {
    pub size: usize,
    /// Neighbours inside the same chunk; `None` at the chunk's ends.
    prev: Option<DevicePtr>,
    next: Option<DevicePtr>,
    pub state: State,
}

/// A block freed by `cudaFreeAsync`, with the event recorded on its stream at the free.
#[derive(Clone, Copy, Debug)]
pub struct StreamFreed {
    pub addr: DevicePtr,
    pub stream: Stream,
    pub event: Event,
    /// The pool epoch read after the event was recorded: a synchronize that began at or after
    /// it (completed epoch above it) has waited for the event.
    pub epoch: u64,
}

#[derive(Default)]
pub struct Arena {
    blocks: BTreeMap<DevicePtr, Block>,
    free: BTreeSet<(usize, DevicePtr)>,
    pending: Vec<(DevicePtr, u64)>,
    pending_bytes: usize,
    stream_freed: HashMap<DevicePtr, StreamFreed>,
    /// The blocks of `stream_freed` by (stream, block size), most recently freed last: the
    /// same-stream reuse of every `cudaMallocAsync` / `hbm_torch_malloc` looks one up (a scan of
    /// all waiting blocks there cost a PyTorch step more than its own allocator's).
    same_stream: HashMap<(Stream, usize), Vec<DevicePtr>>,
    /// The completed epoch `settle_pending` last ran with.
    settled_at: u64,
    /// Bytes obtained from the driver and not yet given back.
    pub reserved: usize,
    /// Bytes in `Free` blocks.
    pub free_bytes: usize,
}

/// What a pointer is to the arena, for diagnosing a bad free.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The start of a block in this state.
    Start(State),
    /// Strictly inside the block starting at this address.
    Interior(DevicePtr),
    NotOurs,
}

impl Arena {
    /// Adds a chunk fresh from the driver as one free block.
    pub fn add_chunk(&mut self, base: DevicePtr, size: usize) {
        self.reserved += size;
        let block = Block {
            size,
            prev: None,
            next: None,
            state: State::Used,
        };
        self.blocks.insert(base, block);
        self.make_free(base);
    }

    /// Takes the smallest free block of at least `size` bytes, splitting off the rest.
    pub fn take_best_fit(&mut self, size: usize) -> Option<DevicePtr> {
        self.take_fit_within(size, usize::MAX)
    }

    /// As `take_best_fit`, from a free block of at most `largest` bytes.
    pub fn take_fit_within(&mut self, size: usize, largest: usize) -> Option<DevicePtr> {
        let &(found, addr) = self.free.range((size, 0)..(largest, usize::MAX)).next()?;
        self.free.remove(&(found, addr));
        self.free_bytes -= found;
        let rest = found - size;
        let block = self.blocks.get_mut(&addr).expect("free set names a block");
        block.state = State::Used;
        if rest >= MIN_BLOCK {
            block.size = size;
            let tail = addr + size;
            let next = block.next.replace(tail);
            self.blocks.insert(
                tail,
                Block {
                    size: rest,
                    prev: Some(addr),
                    next,
                    state: State::Used,
                },
            );
            if let Some(n) = next {
                self.blocks.get_mut(&n).expect("neighbour exists").prev = Some(tail);
            }
            self.make_free(tail);
        }
        Some(addr)
    }

    /// Takes a block of exactly `size` bytes freed asynchronously on `stream`: the stream's own
    /// order makes it safe to reuse at once. Exact, so that the block size stays a function of
    /// the request (callers that keep no record of it rely on that).
    pub fn take_same_stream(&mut self, size: usize, stream: Stream) -> Option<(DevicePtr, Event)> {
        let bucket = self.same_stream.get_mut(&(stream, size))?;
        let addr = bucket.pop().expect("no empty buckets are kept");
        if bucket.is_empty() {
            self.same_stream.remove(&(stream, size));
        }
        let f = self
            .stream_freed
            .remove(&addr)
            .expect("indexed blocks wait for their event");
        self.blocks
            .get_mut(&f.addr)
            .expect("stream-freed block exists")
            .state = State::Used;
        Some((f.addr, f.event))
    }

    /// Size of the block starting at `addr` (which must be one).
    pub fn size_of(&self, addr: DevicePtr) -> usize {
        self.blocks[&addr].size
    }

    /// Marks a handed-out block freed, not yet safe to reuse before epoch `stamp` completes.
    pub fn mark_pending(&mut self, addr: DevicePtr, stamp: u64) {
        let block = self.blocks.get_mut(&addr).expect("pending block exists");
        debug_assert_eq!(block.state, State::Used);
        block.state = State::Pending;
        self.pending_bytes += block.size;
        self.pending.push((addr, stamp));
    }

    /// Marks a handed-out block freed on `stream`, guarded by `event`, recorded before the pool
    /// epoch was `epoch`.
    pub fn mark_stream_pending(
        &mut self,
        addr: DevicePtr,
        stream: Stream,
        event: Event,
        epoch: u64,
    ) {
        let block = self
            .blocks
            .get_mut(&addr)
            .expect("stream-freed block exists");
        debug_assert_eq!(block.state, State::Used);
        block.state = State::StreamPending;
        let size = block.size;
        self.stream_freed.insert(
            addr,
            StreamFreed {
                addr,
                stream,
                event,
                epoch,
            },
        );
        self.same_stream
            .entry((stream, size))
            .or_default()
            .push(addr);
    }

    /// Returns a handed-out block that is already safe (synchronized) to the free set.
    pub fn release(&mut self, addr: DevicePtr) {
        debug_assert_eq!(self.blocks[&addr].state, State::Used);
        self.make_free(addr);
    }

    /// Bytes freed but waiting for an epoch to complete.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Frees every pending block whose stamp is below `completed`. Cheap when nothing completed
    /// since the last call, which is the common case on the slow path.
    pub fn settle_pending(&mut self, completed: u64) {
        if completed == self.settled_at || self.pending.is_empty() {
            return;
        }
        self.settled_at = completed;
        let mut i = 0;
        while i < self.pending.len() {
            let (addr, stamp) = self.pending[i];
            if stamp < completed {
                self.pending.swap_remove(i);
                self.pending_bytes -= self.blocks[&addr].size;
                self.make_free(addr);
            } else {
                i += 1;
            }
        }
    }

    /// Frees every stream-freed block that a synchronize has covered (epoch below `completed`)
    /// or whose event `done` reports complete. Returns the events to give back. Not every
    /// block after a synchronize: one freed while it ran may still be in use.
    pub fn settle_stream_freed(
        &mut self,
        completed: u64,
        mut done: impl FnMut(Event) -> bool,
    ) -> Vec<Event> {
        let settled: Vec<StreamFreed> = self
            .stream_freed
            .values()
            .filter(|f| f.epoch < completed || done(f.event))
            .copied()
            .collect();
        for f in &settled {
            self.stream_freed.remove(&f.addr);
            let key = (f.stream, self.blocks[&f.addr].size);
            let bucket = self.same_stream.get_mut(&key).expect("indexed");
            bucket.retain(|&a| a != f.addr);
            if bucket.is_empty() {
                self.same_stream.remove(&key);
            }
            self.make_free(f.addr);
        }
        settled.into_iter().map(|f| f.event).collect()
    }

    pub fn has_stream_freed(&self) -> bool {
        !self.stream_freed.is_empty()
    }

    /// Removes every chunk that is entirely free and returns (base, size) for the driver.
    pub fn take_free_chunks(&mut self) -> Vec<(DevicePtr, usize)> {
        let whole: Vec<(usize, DevicePtr)> = self
            .free
            .iter()
            .copied()
            .filter(|(_, a)| {
                let b = &self.blocks[a];
                b.prev.is_none() && b.next.is_none()
            })
            .collect();
        for &(size, addr) in &whole {
            self.free.remove(&(size, addr));
            self.blocks.remove(&addr);
            self.free_bytes -= size;
            self.reserved -= size;
        }
        whole.into_iter().map(|(s, a)| (a, s)).collect()
    }

    /// What `ptr` is to this arena.
    pub fn lookup(&self, ptr: DevicePtr) -> Lookup {
        match self.blocks.range(..=ptr).next_back() {
            Some((&addr, b)) if addr == ptr => Lookup::Start(b.state),
            Some((&addr, b)) if ptr < addr + b.size => Lookup::Interior(addr),
            _ => Lookup::NotOurs,
        }
    }

    /// The block that holds `ptr`: its start, size and state.
    pub fn containing(&self, ptr: DevicePtr) -> Option<(DevicePtr, usize, State)> {
        match self.blocks.range(..=ptr).next_back() {
            Some((&addr, b)) if ptr < addr + b.size => Some((addr, b.size, b.state)),
            _ => None,
        }
    }

    /// Number of blocks (used, free or pending); for tests.
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// Marks `addr` free, merging it with free neighbours.
    fn make_free(&mut self, mut addr: DevicePtr) {
        let mut block = self.blocks[&addr];
        if let Some(p) = block.prev.filter(|p| self.blocks[p].state == State::Free) {
            let this = self.blocks.remove(&addr).expect("block exists");
            let pb = self.blocks.get_mut(&p).expect("neighbour exists");
            self.free.remove(&(pb.size, p));
            self.free_bytes -= pb.size;
            pb.size += this.size;
            pb.next = this.next;
            block = *pb;
            if let Some(n) = this.next {
                self.blocks.get_mut(&n).expect("neighbour exists").prev = Some(p);
            }
            addr = p;
        }
        if let Some(n) = block.next.filter(|n| self.blocks[n].state == State::Free) {
            let nb = self.blocks.remove(&n).expect("neighbour exists");
            self.free.remove(&(nb.size, n));
            self.free_bytes -= nb.size;
            let b = self.blocks.get_mut(&addr).expect("block exists");
            b.size += nb.size;
            b.next = nb.next;
            if let Some(nn) = nb.next {
                self.blocks.get_mut(&nn).expect("neighbour exists").prev = Some(addr);
            }
        }
        let b = self.blocks.get_mut(&addr).expect("block exists");
        b.state = State::Free;
        self.free.insert((b.size, addr));
        self.free_bytes += b.size;
    }

    /// Checks every invariant; for tests.
    pub fn check(&self) {
        let mut free_bytes = 0;
        for (&addr, b) in &self.blocks {
            assert!(
                b.size >= MIN_BLOCK && addr % 256 == 0,
                "block {addr:#x} size {}",
                b.size
            );
            if let Some(n) = b.next {
                assert_eq!(n, addr + b.size, "next of {addr:#x} is adjacent");
                let nb = &self.blocks[&n];
                assert_eq!(nb.prev, Some(addr));
                assert!(
                    !(b.state == State::Free && nb.state == State::Free),
                    "unmerged at {addr:#x}"
                );
            }
            if b.state == State::Free {
                free_bytes += b.size;
                assert!(self.free.contains(&(b.size, addr)));
            }
        }
        assert_eq!(free_bytes, self.free_bytes);
        let indexed: usize = self.same_stream.values().map(Vec::len).sum();
        assert_eq!(indexed, self.stream_freed.len(), "same-stream index");
        for (&(stream, size), addrs) in &self.same_stream {
            for a in addrs {
                assert_eq!(self.stream_freed[a].stream, stream);
                assert_eq!(self.blocks[a].size, size);
                assert_eq!(self.blocks[a].state, State::StreamPending);
            }
        }
        assert_eq!(
            self.free.len(),
            self.blocks
                .values()
                .filter(|b| b.state == State::Free)
                .count()
        );
        let pending: usize = self.pending.iter().map(|(a, _)| self.blocks[a].size).sum();
        assert_eq!(pending, self.pending_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_then_coalesce_returns_one_block() {
        let mut a = Arena::default();
        a.add_chunk(0x10000, 8192);
        let x = a.take_best_fit(1024).unwrap();
        let y = a.take_best_fit(2048).unwrap();
        let z = a.take_best_fit(1024).unwrap();
        assert_eq!((x, y, z), (0x10000, 0x10400, 0x10c00));
        a.check();
        a.release(y);
        a.mark_pending(x, 5);
        a.release(z);
        a.check();
        assert_eq!(a.take_free_chunks(), vec![], "chunk still partly in use");
        a.settle_pending(5);
        assert_eq!(
            a.pending_bytes(),
            1024,
            "stamp 5 is not below completed epoch 5"
        );
        a.settle_pending(6);
        a.check();
        assert_eq!(a.take_free_chunks(), vec![(0x10000, 8192)]);
        assert_eq!(a.reserved, 0);
    }

    /// Same-stream reuse finds its block by (stream, size) among many waiting ones, and blocks
    /// settled by their events leave the index.
    #[test]
    fn same_stream_reuse_takes_the_matching_block_among_many() {
        let mut a = Arena::default();
        a.add_chunk(0x100000, 64 * 1024);
        let blocks: Vec<DevicePtr> = (0..32).map(|_| a.take_best_fit(1024).unwrap()).collect();
        let big = a.take_best_fit(2048).unwrap();
        for (i, &p) in blocks.iter().enumerate() {
            a.mark_stream_pending(p, 8 + 8 * (i % 4), 1000 + i, 9);
        }
        a.mark_stream_pending(big, 16, 2000, 9);
        a.check();
        assert_eq!(a.take_same_stream(2048, 16), Some((big, 2000)));
        assert_eq!(a.take_same_stream(2048, 16), None);
        assert_eq!(
            a.take_same_stream(1024, 40),
            None,
            "no block freed on stream 40"
        );
        // Stream 24 freed blocks 2, 6, 10, ...: the last freed comes first.
        assert_eq!(a.take_same_stream(1024, 24), Some((blocks[30], 1030)));
        a.check();
        let settled = a.settle_stream_freed(0, |e| e % 4 == 0);
        assert_eq!(settled.len(), 8, "events of stream 8's blocks: {settled:?}");
        a.check();
        assert_eq!(
            a.take_same_stream(1024, 8),
            None,
            "settled blocks are free, not indexed"
        );
        assert_eq!(a.take_same_stream(1024, 32), Some((blocks[31], 1031)));
        a.check();
    }

    #[test]
    fn a_stream_freed_block_waits_for_its_event_or_a_synchronize_begun_after_it() {
        let mut a = Arena::default();
        a.add_chunk(0x10000, 2048);
        let p = a.take_best_fit(1024).unwrap();
        let q = a.take_best_fit(1024).unwrap();
        a.mark_stream_pending(p, 8, 100, 5);
        a.mark_stream_pending(q, 8, 101, 7);
        // A synchronize that began in epoch 5 completed (completed = 6): it covers p only, and
        // q's event is not done yet.
        assert_eq!(a.settle_stream_freed(6, |_| false), vec![100]);
        assert_eq!(a.lookup(q), Lookup::Start(State::StreamPending));
        // q's event completes: released without a synchronize.
        assert_eq!(a.settle_stream_freed(6, |e| e == 101), vec![101]);
        a.check();
        assert_eq!(a.take_free_chunks(), vec![(0x10000, 2048)]);
    }

    #[test]
    fn best_fit_prefers_the_smallest_block() {
        let mut a = Arena::default();
        a.add_chunk(0x100000, 4096);
        a.add_chunk(0x200000, 1024);
        assert_eq!(a.take_best_fit(1024), Some(0x200000));
        assert_eq!(a.take_best_fit(8192), None);
    }

    #[test]
    fn lookup_tells_interior_from_start() {
        let mut a = Arena::default();
        a.add_chunk(0x100000, 4096);
        let p = a.take_best_fit(1024).unwrap();
        assert_eq!(a.lookup(p), Lookup::Start(State::Used));
        assert_eq!(a.lookup(p + 8), Lookup::Interior(p));
        assert_eq!(a.lookup(0x100000 + 4096), Lookup::NotOurs);
        assert_eq!(a.lookup(0x10), Lookup::NotOurs);
    }
}
