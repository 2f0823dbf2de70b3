//! Sequences over the block pools: add tokens, fork, truncate, free.
//!
//! Every operation plans first (which blocks it takes, copies and gives back, in every group),
//! checks the plan against the pools, then does the fallible device work (mapping granules,
//! copying shared blocks, writing block tables), undoing it on an error, and only then changes the
//! bookkeeping, which cannot fail. So a failed call changes nothing a caller can see.

use super::{live, Group, PagedKvCache, Seq, State};
use crate::backend::{Backend, Stream};
use crate::error::{Error, Result};

/// What `add_tokens` does to one group.
struct GroupPlan {
    /// The sequence's table once done (ids of the new blocks filled in after `take`).
    table: Vec<i32>,
    /// Logical indices that get a fresh block.
    fresh_at: Vec<usize>,
    /// The shared partial block being appended to, copied into a fresh one: (index, old id).
    cow: Option<(usize, u32)>,
    /// Blocks given back: out of the window, and the old copy of `cow`.
    give_back: Vec<u32>,
    /// First table entry that changes (`table.len()` when none does).
    first_changed: usize,
}

/// First block a sliding window still needs once the sequence is `len` tokens long: the window
/// keeps the last `window` tokens.
fn keep_from(window: u32, len: u32, block_tokens: u32) -> usize {
    if window == 0 {
        0
    } else {
        (len.saturating_sub(window) / block_tokens) as usize
    }
}

impl PagedKvCache {
    /// Makes `seq` `n_tokens` longer, taking blocks as it needs them, and starts it if it is not
    /// live. A shared last block about to be appended to is first copied (copy-on-write) for this
    /// sequence, on `stream`; a sliding-window layer group gives back the blocks that fell out of
    /// its window. The new tokens' slots are then in `slot_mapping`.
    ///
    /// `InvalidValue` for a `seq` beyond `max_seqs` or a length beyond `max_seq_tokens`;
    /// `OutOfMemory` when a pool has too few free blocks or the device too little memory. On an
    /// error nothing changes.
    pub fn add_tokens(&self, seq: u32, n_tokens: u32, stream: Stream) -> Result<()> {
        let mut st = self.lock();
        let cur = match st.seqs.get(seq as usize) {
            None => return Err(Error::InvalidValue("sequence id beyond max_seqs")),
            Some(Some(s)) => s.clone(),
            Some(None) => Seq {
                len: 0,
                tables: vec![Vec::new(); st.groups.len()],
            },
        };
        let new_len = cur
            .len
            .checked_add(n_tokens)
            .filter(|&n| n <= self.params.max_seq_tokens)
            .ok_or(Error::InvalidValue("sequence longer than max_seq_tokens"))?;
        let mut plans: Vec<GroupPlan> = st
            .groups
            .iter()
            .zip(&cur.tables)
            .map(|(g, t)| self.plan_add(g, t, cur.len, new_len))
            .collect();
        for (g, p) in st.groups.iter().zip(&plans) {
            if p.fresh_at.len() > g.pool.free_count() as usize {
                return Err(Error::OutOfMemory {
                    requested: p.fresh_at.len()
                        * g.tensors().map(|t| t.block_bytes()).sum::<usize>(),
                });
            }
        }
        let taken: Vec<Vec<u32>> = st
            .groups
            .iter_mut()
            .zip(&plans)
            .map(|(g, p)| g.pool.take(p.fresh_at.len()).expect("checked above"))
            .collect();
        for (p, ids) in plans.iter_mut().zip(&taken) {
            for (&at, &id) in p.fresh_at.iter().zip(ids) {
                p.table[at] = id as i32;
            }
        }
        let st = &mut *st;
        if let Err(e) = self.commit_device(st, seq, &cur, &plans, &taken, stream) {
            for (g, ids) in st.groups.iter_mut().zip(&taken) {
                for &b in ids {
                    g.pool.decref(b);
                }
            }
            return Err(e);
        }
        // From here nothing fails.
        for (g, p) in st.groups.iter_mut().zip(&plans) {
            for &b in &p.give_back {
                g.pool.decref(b);
            }
            st.cow_copies += p.cow.is_some() as u64;
        }
        st.seqs[seq as usize] = Some(Seq {
            len: new_len,
            tables: plans.into_iter().map(|p| p.table).collect(),
        });
        Ok(())
    }

    fn plan_add(&self, g: &Group, table: &[i32], len: u32, new_len: u32) -> GroupPlan {
        let bt = self.params.block_tokens;
        let keep = keep_from(g.window, new_len, bt);
        let mut p = GroupPlan {
            table: table.to_vec(),
            fresh_at: Vec::new(),
            cow: None,
            give_back: Vec::new(),
            first_changed: usize::MAX,
        };
        for i in 0..keep.min(table.len()) {
            if p.table[i] >= 0 {
                p.give_back.push(p.table[i] as u32);
                p.table[i] = -1;
                p.first_changed = p.first_changed.min(i);
            }
        }
        let n_blocks = new_len.div_ceil(bt) as usize;
        p.table.resize(n_blocks, -1);
        let last = (len / bt) as usize;
        if new_len > len && len % bt != 0 && last >= keep {
            // Invariant: blocks at or after the window's start are present.
            let old = p.table[last] as u32;
            if g.pool.refcount(old) > 1 {
                p.cow = Some((last, old));
                p.fresh_at.push(last);
                p.give_back.push(old);
            }
        }
        // Blocks wholly out of the window at once (a prefill longer than it) are never taken;
        // their slots map to -1.
        p.fresh_at
            .extend((len.div_ceil(bt) as usize..n_blocks).filter(|&i| i >= keep));
        if let Some(&i) = p.fresh_at.first() {
            p.first_changed = p.first_changed.min(i);
        }
        p.first_changed = p.first_changed.min(n_blocks);
        p
    }

    /// The device side of `add_tokens`: map the fresh blocks' granules, copy the shared blocks,
    /// write the tables. On an error whatever it did is undone (best effort for the tables).
    fn commit_device(
        &self,
        st: &mut State,
        seq: u32,
        cur: &Seq,
        plans: &[GroupPlan],
        taken: &[Vec<u32>],
        stream: Stream,
    ) -> Result<()> {
        let b = self.backend.as_ref();
        let mut fresh: Vec<Vec<Vec<usize>>> = Vec::new();
        let result = (|| -> Result<()> {
            for (g, ids) in st.groups.iter_mut().zip(taken) {
                // Pushed before mapping, so that an error leaves what was mapped in `fresh`.
                fresh.push(Vec::new());
                let per_tensor = fresh.last_mut().expect("just pushed");
                for t in g.tensors_mut() {
                    per_tensor.push(Vec::new());
                    t.map_blocks(b, ids, per_tensor.last_mut().expect("just pushed"))?;
                }
            }
            let filled = (cur.len % self.params.block_tokens) as usize;
            for (g, p) in st.groups.iter().zip(plans) {
                if let Some((at, old)) = p.cow {
                    let new = p.table[at] as u32;
                    for t in g.tensors() {
                        let bytes = filled * t.block_bytes() / self.params.block_tokens as usize;
                        b.copy_d2d(t.block_ptr(new), t.block_ptr(old), bytes, stream)?;
                    }
                }
            }
            let rows: Vec<Vec<i32>> = plans.iter().map(|p| p.table.clone()).collect();
            let from: Vec<usize> = plans.iter().map(|p| p.first_changed).collect();
            self.write_rows(&st.groups, seq, &rows, &cur.tables, &from)
        })();
        if result.is_err() {
            // Queued copies may still read or write the fresh blocks.
            let _ = b.synchronize();
            for (g, per_tensor) in st.groups.iter_mut().zip(&fresh) {
                for (t, granules) in g.tensors_mut().zip(per_tensor) {
                    t.unmap_granules(b, granules);
                }
            }
        }
        result
    }

    /// Writes `entries` into `seq`'s row of `g`'s table from entry `from` on.
    fn write_table(
        &self,
        b: &dyn Backend,
        g: &Group,
        seq: u32,
        from: usize,
        entries: &[i32],
    ) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_ne_bytes()).collect();
        let row = seq as usize * self.derived.max_blocks_per_seq as usize;
        b.copy_from_host(g.table + (row + from) * 4, &bytes)
    }

    /// Replaces `seq`'s rows `old` with `new` in every group's table (entries from `from[g]` on,
    /// -1 where `new` is shorter). On an error the groups already written get `old` back.
    fn write_rows(
        &self,
        groups: &[Group],
        seq: u32,
        new: &[Vec<i32>],
        old: &[Vec<i32>],
        from: &[usize],
    ) -> Result<()> {
        let b = self.backend.as_ref();
        let padded = |row: &[i32], to: usize| {
            let mut r = row.to_vec();
            r.resize(to.max(row.len()), -1);
            r
        };
        for (i, g) in groups.iter().enumerate() {
            let row = padded(&new[i], old[i].len());
            let f = from[i].min(row.len());
            if let Err(e) = self.write_table(b, g, seq, f, &row[f..]) {
                for (j, g) in groups.iter().enumerate().take(i) {
                    let _ = self.write_table(b, g, seq, 0, &padded(&old[j], new[j].len()));
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Starts `dst` as a copy of live `src`: the same length, sharing all its blocks (each held
    /// once more). Appending to either later copies a shared partial block first.
    /// `InvalidValue` when `src` is not live, `dst` is live or either is beyond `max_seqs`.
    pub fn fork(&self, src: u32, dst: u32) -> Result<()> {
        let mut st = self.lock();
        let s = live(&st, src)?.clone();
        match st.seqs.get(dst as usize) {
            None => return Err(Error::InvalidValue("sequence id beyond max_seqs")),
            Some(Some(_)) => return Err(Error::InvalidValue("fork into a live sequence")),
            Some(None) => {}
        }
        let empty = vec![Vec::new(); st.groups.len()];
        self.write_rows(&st.groups, dst, &s.tables, &empty, &vec![0; empty.len()])?;
        for (g, t) in st.groups.iter_mut().zip(&s.tables) {
            for &id in t.iter().filter(|&&id| id >= 0) {
                g.pool.incref(id as u32);
            }
        }
        st.seqs[dst as usize] = Some(s);
        Ok(())
    }

    /// Shortens live `seq` to `n_tokens`, giving back the blocks past the new end (a shared block
    /// is only held once less). `InvalidValue` for `n_tokens` beyond its length, or a sliding
    /// window whose blocks for the new last tokens were already given back; nothing changes then.
    pub fn truncate(&self, seq: u32, n_tokens: u32) -> Result<()> {
        let mut st = self.lock();
        let s = live(&st, seq)?.clone();
        if n_tokens > s.len {
            return Err(Error::InvalidValue("truncate beyond the sequence's length"));
        }
        let bt = self.params.block_tokens;
        let n_blocks = n_tokens.div_ceil(bt) as usize;
        for (g, t) in st.groups.iter().zip(&s.tables) {
            let keep = keep_from(g.window, n_tokens, bt);
            if (keep..n_blocks).any(|i| t[i] < 0) {
                return Err(Error::InvalidValue(
                    "truncate into blocks the sliding window already gave back",
                ));
            }
        }
        let mut tables = s.tables.clone();
        for t in &mut tables {
            t.truncate(n_blocks);
        }
        let from: Vec<usize> = tables.iter().map(Vec::len).collect();
        self.write_rows(&st.groups, seq, &tables, &s.tables, &from)?;
        for (g, t) in st.groups.iter_mut().zip(&s.tables) {
            for &id in t.iter().skip(n_blocks).filter(|&&id| id >= 0) {
                g.pool.decref(id as u32);
            }
        }
        st.seqs[seq as usize] = Some(Seq {
            len: n_tokens,
            tables,
        });
        Ok(())
    }

    /// Ends live `seq`, giving back its blocks (shared ones are held once less) and clearing its
    /// table row to -1. `InvalidValue` when it is not live.
    pub fn free(&self, seq: u32) -> Result<()> {
        let mut st = self.lock();
        let s = live(&st, seq)?.clone();
        let empty = vec![Vec::new(); st.groups.len()];
        self.write_rows(&st.groups, seq, &empty, &s.tables, &vec![0; empty.len()])?;
        for (g, t) in st.groups.iter_mut().zip(&s.tables) {
            for &id in t.iter().filter(|&&id| id >= 0) {
                g.pool.decref(id as u32);
            }
        }
        st.seqs[seq as usize] = None;
        Ok(())
    }
}
