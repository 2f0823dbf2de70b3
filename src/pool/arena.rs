//! The slow-path allocator: best fit over chunks from the driver, blocks split and coalesced.
//!
//! An `Arena` is plain data; the pool keeps it behind a mutex and calls it only when the
//! per-thread caches cannot serve. Every block is in exactly one state:
//! - `Free`: in `free` (by size, then address), reusable by any stream now;
//! - `Used`: handed out, or parked in a per-thread cache (the arena cannot tell the two apart);
//! - `Pending`: freed, but work queued before the free may still use it: reusable once the
//!   pool's completed epoch passes the stamp in `pending`;
//! - `StreamPending`: freed with `cudaFreeAsync`: reusable at once on its stream (best fit, split),
//!   elsewhere once its event completes.
//!
//! Invariants: two adjacent blocks of one chunk are never both `Free`, nor both `StreamPending`
//! on one stream (they are merged); a `StreamPending` block has an event of its own.

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
    /// The blocks of `stream_freed` by stream, then size and address: the same-stream reuse of
    /// every `cudaMallocAsync` / `hbm_torch_malloc` takes the best fit among its stream's (a
    /// scan of all waiting blocks there cost a PyTorch step more than its own allocator's).
    same_stream: BTreeSet<(Stream, usize, DevicePtr)>,
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
        self.blocks
            .get_mut(&addr)
            .expect("free set names a block")
            .state = State::Used;
        if rest >= MIN_BLOCK {
            let tail = self.split(addr, size, State::Used);
            self.make_free(tail);
        }
        Some(addr)
    }

    /// Takes `size` bytes from the smallest block of at most `largest` bytes freed
    /// asynchronously on `stream`: the stream's own order makes it safe to reuse at once, as
    /// PyTorch's allocator reuses any block of a stream's pool. The rest of a larger block is
    /// split off and keeps waiting, with the block's event, for other streams (so the block
    /// handed out is exactly `size`: callers that keep no record of it rely on that). Returns
    /// the block and, when it was taken whole, its event, which nothing needs any more.
    pub fn take_same_stream(
        &mut self,
        size: usize,
        largest: usize,
        stream: Stream,
    ) -> Option<(DevicePtr, Option<Event>)> {
        let &key @ (_, found, addr) = self
            .same_stream
            .range((stream, size, 0)..=(stream, largest, DevicePtr::MAX))
            .next()?;
        self.same_stream.remove(&key);
        let f = self
            .stream_freed
            .remove(&addr)
            .expect("indexed blocks wait for their event");
        self.blocks
            .get_mut(&addr)
            .expect("stream-freed block exists")
            .state = State::Used;
        let rest = found - size;
        if rest == 0 {
            return Some((addr, Some(f.event)));
        }
        debug_assert!(rest >= MIN_BLOCK, "block sizes are multiples of MIN_BLOCK");
        let tail = self.split(addr, size, State::StreamPending);
        self.stream_freed
            .insert(tail, StreamFreed { addr: tail, ..f });
        self.same_stream.insert((stream, rest, tail));
        Some((addr, None))
    }

    /// Cuts the block at `addr` to `size` bytes; the rest becomes a block of its own in `state`,
    /// whose address is returned (the caller files it in the set that state needs).
    fn split(&mut self, addr: DevicePtr, size: usize, state: State) -> DevicePtr {
        let block = self.blocks.get_mut(&addr).expect("block exists");
        let rest = block.size - size;
        block.size = size;
        let tail = addr + size;
        let next = block.next.replace(tail);
        self.blocks.insert(
            tail,
            Block {
                size: rest,
                prev: Some(addr),
                next,
                state,
            },
        );
        if let Some(n) = next {
            self.blocks.get_mut(&n).expect("neighbour exists").prev = Some(tail);
        }
        tail
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
    /// epoch was `epoch`, and merges it with neighbours freed on the same stream, as PyTorch's
    /// allocator merges the free blocks of a stream's pool (else a request larger than any one
    /// piece grows the pool while the stream's own freed memory waits). The caller records
    /// `event` while holding the arena, so it is the newest event of every block here: once it
    /// completes the stream has passed the neighbours' frees too, and the merged block keeps it
    /// and this epoch. Returns the neighbours' events, which nothing needs any more.
    #[must_use = "the merged-away events go back to the backend"]
    pub fn mark_stream_pending(
        &mut self,
        addr: DevicePtr,
        stream: Stream,
        event: Event,
        epoch: u64,
    ) -> Vec<Event> {
        let block = self
            .blocks
            .get_mut(&addr)
            .expect("stream-freed block exists");
        debug_assert_eq!(block.state, State::Used);
        block.state = State::StreamPending;
        let mut merged = Vec::new();
        // A free neighbour taken in may itself border a block freed on this stream: keep going
        // (at most two steps a side, as two free blocks are never adjacent).
        while let Some(n) = self.blocks[&addr].next {
            if !self.take_neighbour(n, stream, &mut merged) {
                break;
            }
            self.join(addr, n);
        }
        let mut start = addr;
        while let Some(p) = self.blocks[&start].prev {
            if !self.take_neighbour(p, stream, &mut merged) {
                break;
            }
            self.join(p, start);
            start = p;
        }
        let merged_block = self.blocks.get_mut(&start).expect("block exists");
        merged_block.state = State::StreamPending;
        let size = merged_block.size;
        self.stream_freed.insert(
            start,
            StreamFreed {
                addr: start,
                stream,
                event,
                epoch,
            },
        );
        self.same_stream.insert((stream, size, start));
        merged
    }

    /// Takes neighbour `n` out of its set if a block freed on `stream` may absorb it: a free
    /// block (which then waits with it: on a busy device, for about as long as the stream takes
    /// to pass the free), or one freed on the same stream (its event goes to `events`).
    fn take_neighbour(&mut self, n: DevicePtr, stream: Stream, events: &mut Vec<Event>) -> bool {
        match self.blocks[&n].state {
            State::Free => {
                let size = self.blocks[&n].size;
                self.free.remove(&(size, n));
                self.free_bytes -= size;
                true
            }
            State::StreamPending if self.stream_freed[&n].stream == stream => {
                events.push(self.unindex(n));
                true
            }
            _ => false,
        }
    }

    /// Takes a stream-freed block out of the waiting records (its block stays); returns its
    /// event.
    fn unindex(&mut self, addr: DevicePtr) -> Event {
        let f = self.stream_freed.remove(&addr).expect("stream-freed block");
        let size = self.blocks[&addr].size;
        let indexed = self.same_stream.remove(&(f.stream, size, addr));
        debug_assert!(indexed, "every stream-freed block is indexed");
        f.event
    }

    /// Merges the block at `next` into its neighbour `at`, keeping `at`'s state.
    fn join(&mut self, at: DevicePtr, next: DevicePtr) {
        let nb = self.blocks.remove(&next).expect("neighbour exists");
        let b = self.blocks.get_mut(&at).expect("block exists");
        debug_assert_eq!(b.next, Some(next));
        b.size += nb.size;
        b.next = nb.next;
        if let Some(nn) = nb.next {
            self.blocks.get_mut(&nn).expect("neighbour exists").prev = Some(at);
        }
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
            self.unindex(f.addr);
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
                let stream_of = |a: &DevicePtr| self.stream_freed.get(a).map(|f| f.stream);
                assert!(
                    stream_of(&addr).is_none() || stream_of(&addr) != stream_of(&n),
                    "one stream's freed neighbours unmerged at {addr:#x}"
                );
            }
            if b.state == State::Free {
                free_bytes += b.size;
                assert!(self.free.contains(&(b.size, addr)));
            }
        }
        assert_eq!(free_bytes, self.free_bytes);
        assert_eq!(
            self.same_stream.len(),
            self.stream_freed.len(),
            "same-stream index"
        );
        let mut events = std::collections::HashSet::new();
        for &(stream, size, a) in &self.same_stream {
            assert_eq!(self.stream_freed[&a].stream, stream);
            assert_eq!(self.blocks[&a].size, size);
            assert_eq!(self.blocks[&a].state, State::StreamPending);
            // Each event guards one block: giving it back when that block settles is safe.
            assert!(events.insert(self.stream_freed[&a].event), "shared event");
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

    /// Same-stream reuse finds its block by stream among many waiting ones, best fit, and
    /// blocks settled by their events leave the index.
    #[test]
    fn same_stream_reuse_takes_the_best_fit_of_its_stream() {
        let mut a = Arena::default();
        // Exactly the blocks below: no free rest for the last one to absorb.
        a.add_chunk(0x100000, 34 * 1024);
        let blocks: Vec<DevicePtr> = (0..32).map(|_| a.take_best_fit(1024).unwrap()).collect();
        let big = a.take_best_fit(2048).unwrap();
        for (i, &p) in blocks.iter().enumerate() {
            assert_eq!(
                a.mark_stream_pending(p, 8 + 8 * (i % 4), 1000 + i, 9),
                Vec::<Event>::new()
            );
        }
        assert_eq!(a.mark_stream_pending(big, 16, 2000, 9), Vec::<Event>::new());
        a.check();
        assert_eq!(a.take_same_stream(2048, 4096, 16), Some((big, Some(2000))));
        assert_eq!(
            a.take_same_stream(2048, 4096, 16),
            None,
            "stream 16's other blocks are smaller"
        );
        assert_eq!(
            a.take_same_stream(1024, 4096, 40),
            None,
            "no block freed on stream 40"
        );
        // Stream 24 freed blocks 2, 6, 10, ...: the lowest address of the best size first.
        assert_eq!(
            a.take_same_stream(1024, 4096, 24),
            Some((blocks[2], Some(1002)))
        );
        a.check();
        let settled = a.settle_stream_freed(0, |e| e % 4 == 0);
        assert_eq!(settled.len(), 8, "events of stream 8's blocks: {settled:?}");
        a.check();
        assert_eq!(
            a.take_same_stream(1024, 4096, 8),
            None,
            "settled blocks are free, not indexed"
        );
        assert_eq!(
            a.take_same_stream(1024, 4096, 32),
            Some((blocks[3], Some(1003)))
        );
        a.check();
    }

    /// A larger block of the stream serves a smaller request at once; the rest keeps the event
    /// and serves the stream again, or settles with it.
    #[test]
    fn same_stream_reuse_splits_a_larger_block() {
        let mut a = Arena::default();
        a.add_chunk(0x100000, 8192);
        let p = a.take_best_fit(8192).unwrap();
        assert_eq!(a.mark_stream_pending(p, 16, 77, 3), Vec::<Event>::new());
        assert_eq!(
            a.take_same_stream(1024, 2048, 16),
            None,
            "8 KiB is more than the largest split allowed for 1 KiB"
        );
        assert_eq!(a.take_same_stream(1024, 8192, 16), Some((p, None)));
        a.check();
        assert_eq!(a.lookup(p + 1024), Lookup::Start(State::StreamPending));
        assert_eq!(a.take_same_stream(2048, 8192, 16), Some((p + 1024, None)));
        assert_eq!(a.take_same_stream(1024, 8192, 8), None, "another stream");
        a.check();
        // The remaining 5 KiB settles with the event; the taken parts come back free.
        assert_eq!(a.settle_stream_freed(0, |e| e == 77), vec![77]);
        a.release(p);
        a.release(p + 1024);
        a.check();
        assert_eq!(a.take_free_chunks(), vec![(0x100000, 8192)]);
    }

    #[test]
    fn a_stream_freed_block_waits_for_its_event_or_a_synchronize_begun_after_it() {
        let mut a = Arena::default();
        a.add_chunk(0x10000, 2048);
        let p = a.take_best_fit(1024).unwrap();
        let q = a.take_best_fit(1024).unwrap();
        assert_eq!(a.mark_stream_pending(p, 8, 100, 5), Vec::<Event>::new());
        assert_eq!(
            a.mark_stream_pending(q, 16, 101, 7),
            Vec::<Event>::new(),
            "another stream's"
        );
        // A synchronize that began in epoch 5 completed (completed = 6): it covers p only, and
        // q's event is not done yet.
        assert_eq!(a.settle_stream_freed(6, |_| false), vec![100]);
        assert_eq!(a.lookup(q), Lookup::Start(State::StreamPending));
        // q's event completes: released without a synchronize.
        assert_eq!(a.settle_stream_freed(6, |e| e == 101), vec![101]);
        a.check();
        assert_eq!(a.take_free_chunks(), vec![(0x10000, 2048)]);
    }

    /// A block freed on a stream absorbs its free neighbours, which then wait with it.
    #[test]
    fn a_stream_freed_block_absorbs_its_free_neighbours() {
        let mut a = Arena::default();
        a.add_chunk(0x10000, 4096);
        let p = a.take_best_fit(1024).unwrap();
        let q = a.take_best_fit(1024).unwrap();
        a.release(p);
        assert_eq!(a.mark_stream_pending(q, 8, 100, 5), Vec::<Event>::new());
        a.check();
        assert_eq!(a.free_bytes, 0);
        assert_eq!(a.take_best_fit(1024), None, "all of it waits for stream 8");
        assert_eq!(a.take_same_stream(4096, 8192, 8), Some((p, Some(100))));
        a.check();
    }

    /// A free neighbour taken in brings the stream's block beyond it along (found by the fuzzer:
    /// the merged block and that one were left side by side).
    #[test]
    fn a_free_neighbour_brings_the_streams_block_beyond_it() {
        let mut a = Arena::default();
        a.add_chunk(0x10000, 5 * 1024);
        let b: Vec<DevicePtr> = (0..5).map(|_| a.take_best_fit(1024).unwrap()).collect();
        assert_eq!(a.mark_stream_pending(b[0], 8, 100, 5), Vec::<Event>::new());
        assert_eq!(a.mark_stream_pending(b[4], 8, 104, 5), Vec::<Event>::new());
        a.release(b[1]);
        a.release(b[3]);
        a.check();
        // b[2]: free b[1] and b[3] on either side, stream 8's b[0] and b[4] beyond them.
        assert_eq!(a.mark_stream_pending(b[2], 8, 102, 6), vec![104, 100]);
        a.check();
        assert_eq!(
            a.take_same_stream(5 * 1024, 8192, 8),
            Some((b[0], Some(102)))
        );
        a.check();
    }

    /// Neighbours freed on one stream merge into one block that keeps the newest event and
    /// epoch (the stream passes the older frees first), so a larger request of the stream fits.
    #[test]
    fn a_streams_freed_neighbours_merge_under_the_newest_event() {
        let mut a = Arena::default();
        a.add_chunk(0x10000, 4096);
        let b: Vec<DevicePtr> = (0..4).map(|_| a.take_best_fit(1024).unwrap()).collect();
        assert_eq!(a.mark_stream_pending(b[0], 8, 100, 5), Vec::<Event>::new());
        assert_eq!(a.mark_stream_pending(b[2], 8, 102, 6), Vec::<Event>::new());
        assert_eq!(
            a.mark_stream_pending(b[3], 16, 103, 6),
            Vec::<Event>::new(),
            "not stream 8's"
        );
        a.check();
        assert_eq!(a.take_same_stream(3072, 4096, 8), None);
        // b[1] joins both of stream 8's neighbours: their events go back.
        assert_eq!(a.mark_stream_pending(b[1], 8, 101, 7), vec![102, 100]);
        a.check();
        assert_eq!(a.lookup(b[1]), Lookup::Interior(b[0]));
        // A synchronize begun in epoch 5 covered b[0] alone; the merged block waits for the one
        // of epoch 7 or its own event, not for b[0]'s.
        assert_eq!(a.settle_stream_freed(6, |e| e == 100), Vec::<Event>::new());
        assert_eq!(a.take_same_stream(3072, 4096, 8), Some((b[0], Some(101))));
        a.check();
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
