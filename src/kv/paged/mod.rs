//! The paged KV cache: fixed-size blocks of `block_tokens` tokens from a pool shared by every
//! sequence, with per-sequence block tables in device memory, the form paged-attention kernels
//! (vLLM, FlashInfer, FlashAttention's `block_table`) take.
//!
//! - `layer_spec`: the shape (per-layer heads, K and V head sizes, windows) and its checks.
//! - `block_pool`: block ids and reference counts.
//! - `storage`: one tensor's memory, `[num_blocks, block_tokens, heads, head_dim]`, over a VMM
//!   reservation whose granules are mapped as blocks come into use.
//! - `sequences`: add tokens, fork, copy-on-write, truncate, free.
//! - `append`: the slot mapping of a step, the append of one layer through it, and gather.
//! - `batch`: a whole step's appends (and a sequence's gathers) over every layer, as job lists
//!   the backend runs in one launch per pair of element types.
//! - `attention`: the reference decode attention through the block tables.
//! - `staging`: device buffers for those job lists (and the host bytes copied into them),
//!   reused once the device is done with them.
//!
//! Layers with the same window form a group: they share block ids (block `b` of every layer of the
//! group belongs to the same sequence positions), one pool and one block table per sequence. Full
//! attention layers are one group; each distinct sliding window is another, whose sequences give
//! back the blocks that fell out of their window.

mod append;
mod attention;
mod batch;
pub mod block_pool;
pub mod layer_spec;
mod sequences;
mod staging;
mod storage;

pub use layer_spec::{LayerSpec, PagedParams, DEFAULT_BLOCK_TOKENS};

use crate::backend::{DevicePtr, SharedBackend};
use crate::error::{Error, Result};
use block_pool::BlockPool;
use layer_spec::Derived;
use staging::Staging;
use std::sync::Mutex;
use storage::BlockStorage;

/// Counters of a paged cache, summed over its pools (one per group).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagedStats {
    pub blocks_total: u64,
    /// Blocks held by at least one sequence.
    pub blocks_used: u64,
    pub blocks_free: u64,
    /// Of `blocks_used`, those held by more than one sequence (shared prefixes).
    pub blocks_shared: u64,
    /// Device memory behind the block tensors (mapped granules; everything without VMM).
    pub bytes_committed: u64,
    /// Address space reserved for the block tensors (0 without VMM).
    pub bytes_reserved: u64,
    /// Device memory of the block tables.
    pub bytes_tables: u64,
    /// Live sequences.
    pub n_seq: u32,
    /// Tokens of all live sequences, shared ones counted in each.
    pub tokens: u64,
    /// Blocks copied because a shared block was appended to.
    pub cow_copies: u64,
}

/// One group of layers with the same window: its pool, tensors and block table.
struct Group {
    window: u32,
    pool: BlockPool,
    /// K of each layer of the group, in layer order; V likewise (`None`: the layer has no V).
    k: Vec<BlockStorage>,
    v: Vec<Option<BlockStorage>>,
    /// `int32 [max_seqs, max_blocks_per_seq]` in device memory.
    table: DevicePtr,
}

impl Group {
    fn tensors(&self) -> impl Iterator<Item = &BlockStorage> {
        self.k.iter().chain(self.v.iter().flatten())
    }

    fn tensors_mut(&mut self) -> impl Iterator<Item = &mut BlockStorage> {
        self.k.iter_mut().chain(self.v.iter_mut().flatten())
    }
}

/// A live sequence: its length and, per group, its block table (logical block -> id; -1 for a
/// block a sliding window gave back).
#[derive(Clone, Debug, Default)]
struct Seq {
    len: u32,
    tables: Vec<Vec<i32>>,
}

struct State {
    groups: Vec<Group>,
    seqs: Vec<Option<Seq>>,
    cow_copies: u64,
    /// Job descriptors and slot mappings of batched launches, in device memory.
    staging: Staging,
}

/// A paged KV cache on one device. Every method takes `&self` and the cache's lock.
///
/// Guarantees: a call that fails leaves every sequence, block count and block table as it was
/// (all or nothing); a block is written only by the one sequence holding it (shared blocks are
/// copied before an append reaches them); pointers into the tensors never move.
pub struct PagedKvCache {
    backend: SharedBackend,
    params: PagedParams,
    derived: Derived,
    state: Mutex<State>,
}

impl PagedKvCache {
    /// Creates the cache: address space for `num_blocks` blocks of every tensor, nothing mapped
    /// (without VMM, every block allocated), and the block tables, all -1. `InvalidValue` for a
    /// bad shape (`PagedParams::check`); `OutOfMemory` when the device refuses, with everything
    /// made so far given back.
    pub fn new(backend: SharedBackend, params: PagedParams) -> Result<PagedKvCache> {
        let derived = params.check()?;
        let cache = PagedKvCache {
            backend,
            params,
            derived,
            state: Mutex::new(State {
                groups: Vec::new(),
                seqs: Vec::new(),
                cow_copies: 0,
                staging: Staging::default(),
            }),
        };
        {
            let mut st = cache.lock();
            st.seqs = vec![None; cache.params.max_seqs as usize];
            // On an error `cache` drops and gives back the groups built so far.
            for (window, layers) in &cache.derived.groups {
                let group = cache.new_group(*window, layers)?;
                st.groups.push(group);
            }
        }
        Ok(cache)
    }

    fn new_group(&self, window: u32, layers: &[u32]) -> Result<Group> {
        let b = self.backend.as_ref();
        let bt = self.params.block_tokens as usize;
        let mut g = Group {
            window,
            pool: BlockPool::new(self.params.num_blocks),
            k: Vec::new(),
            v: Vec::new(),
            table: 0,
        };
        let made = (|| -> Result<()> {
            for &l in layers {
                let (rk, rv) = (
                    self.derived.row_k[l as usize],
                    self.derived.row_v[l as usize],
                );
                g.k.push(BlockStorage::new(b, self.params.num_blocks, rk * bt)?);
                g.v.push(match rv {
                    0 => None,
                    _ => Some(BlockStorage::new(b, self.params.num_blocks, rv * bt)?),
                });
            }
            let bytes = self.table_bytes();
            g.table = b.alloc(bytes)?;
            b.copy_from_host(g.table, &vec![0xffu8; bytes])
        })();
        if let Err(e) = made {
            release_group(b, &mut g, self.table_bytes());
            return Err(e);
        }
        Ok(g)
    }

    fn table_bytes(&self) -> usize {
        self.params.max_seqs as usize * self.derived.max_blocks_per_seq as usize * 4
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn params(&self) -> &PagedParams {
        &self.params
    }

    /// Entries per sequence in a block table: the row stride of `block_table`, in `int32`s.
    pub fn max_blocks_per_seq(&self) -> u32 {
        self.derived.max_blocks_per_seq
    }

    fn layer_group(&self, layer: u32) -> Result<(usize, usize)> {
        self.derived
            .layer_group
            .get(layer as usize)
            .copied()
            .ok_or(Error::InvalidValue("layer beyond the cache's layers"))
    }

    /// The block table `layer` reads: `int32 [max_seqs, max_blocks_per_seq]` in device memory,
    /// row `seq` holding the sequence's block ids in order, -1 past its end and for blocks its
    /// window gave back. Layers of the same window share one table.
    pub fn block_table(&self, layer: u32) -> Result<DevicePtr> {
        let (g, _) = self.layer_group(layer)?;
        Ok(self.lock().groups[g].table)
    }

    /// `layer`'s K and V tensors: base addresses (V is 0 when the layer has none) and bytes per
    /// token row. Token `o` of block `b` is at `base + (b * block_tokens + o) * row`.
    pub fn layer_tensors(&self, layer: u32) -> Result<(DevicePtr, DevicePtr, usize, usize)> {
        let (g, i) = self.layer_group(layer)?;
        let st = self.lock();
        let grp = &st.groups[g];
        let l = layer as usize;
        let v = grp.v[i].as_ref().map_or(0, BlockStorage::base);
        Ok((
            grp.k[i].base(),
            v,
            self.derived.row_k[l],
            self.derived.row_v[l],
        ))
    }

    /// A host copy of `seq`'s block table for `layer`'s group (as on the device, without the -1
    /// padding past its end).
    pub fn seq_blocks(&self, layer: u32, seq: u32) -> Result<Vec<i32>> {
        let (g, _) = self.layer_group(layer)?;
        let st = self.lock();
        Ok(live(&st, seq)?.tables[g].clone())
    }

    /// Tokens `seq` holds.
    pub fn seq_len(&self, seq: u32) -> Result<u32> {
        Ok(live(&self.lock(), seq)?.len)
    }

    /// Sequences holding block `block` of `layer`'s group (0: free).
    pub fn refcount(&self, layer: u32, block: u32) -> Result<u32> {
        let (g, _) = self.layer_group(layer)?;
        Ok(self.lock().groups[g].pool.refcount(block))
    }

    /// Unmaps the granules no live block touches, after one device synchronize; returns the
    /// bytes given back. Freed blocks otherwise keep their memory for the next ones.
    pub fn trim(&self) -> u64 {
        let mut st = self.lock();
        if self.backend.synchronize().is_err() {
            return 0;
        }
        let b = self.backend.as_ref();
        let mut given = 0;
        for grp in &mut st.groups {
            let Group { pool, k, v, .. } = grp;
            for t in k.iter_mut().chain(v.iter_mut().flatten()) {
                given += t.trim(b, |blk| pool.refcount(blk) > 0);
            }
        }
        given
    }

    pub fn stats(&self) -> PagedStats {
        let st = self.lock();
        let mut s = PagedStats {
            cow_copies: st.cow_copies,
            ..PagedStats::default()
        };
        for grp in &st.groups {
            s.blocks_total += grp.pool.total() as u64;
            s.blocks_used += grp.pool.used_count() as u64;
            s.blocks_free += grp.pool.free_count() as u64;
            s.blocks_shared += grp.pool.shared_count() as u64;
            s.bytes_tables += self.table_bytes() as u64;
            for t in grp.tensors() {
                s.bytes_committed += t.committed();
                s.bytes_reserved += t.reserved();
            }
        }
        for seq in st.seqs.iter().flatten() {
            s.n_seq += 1;
            s.tokens += seq.len as u64;
        }
        s
    }
}

/// The live sequence `seq`, or `InvalidValue`.
fn live(st: &State, seq: u32) -> Result<&Seq> {
    st.seqs
        .get(seq as usize)
        .ok_or(Error::InvalidValue("sequence id beyond max_seqs"))?
        .as_ref()
        .ok_or(Error::InvalidValue("sequence is not live"))
}

fn release_group(b: &dyn crate::backend::Backend, g: &mut Group, table_bytes: usize) {
    for t in g.tensors_mut() {
        t.release(b);
    }
    if g.table != 0 {
        let _ = b.free(g.table, table_bytes);
    }
}

impl Drop for PagedKvCache {
    fn drop(&mut self) {
        // Unmap only once the device is done with the blocks.
        let _ = self.backend.synchronize();
        let table_bytes = self.table_bytes();
        let b = self.backend.clone();
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for g in &mut st.groups {
            release_group(b.as_ref(), g, table_bytes);
        }
        st.staging.release(b.as_ref());
    }
}

#[cfg(test)]
#[path = "paged_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "batch_tests.rs"]
mod batch_tests;
