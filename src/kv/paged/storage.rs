//! The memory of one tensor of the paged cache, `[num_blocks, block_tokens, heads, head_dim]`:
//! address space for every block reserved once, physical memory mapped one granule at a time as
//! blocks come into use. Pointers never move.
//!
//! A granule is mapped by its own `vmm_map` call and unmapped by its own `vmm_unmap`, as CUDA
//! requires (an unmap must cover whole mappings). On a device without VMM the whole tensor is
//! allocated at creation instead.

use crate::backend::{Backend, DevicePtr};
use crate::error::{Error, Result};

#[derive(Debug)]
pub struct BlockStorage {
    base: DevicePtr,
    /// Bytes reserved (VMM) or allocated (no VMM).
    size: usize,
    block_bytes: usize,
    /// VMM granularity; 0 when the tensor is one allocation.
    granule: usize,
    mapped: Vec<bool>,
    n_mapped: usize,
}

impl BlockStorage {
    /// Reserves (or, without VMM, allocates) room for `num_blocks` blocks of `block_bytes`.
    pub fn new(b: &dyn Backend, num_blocks: u32, block_bytes: usize) -> Result<BlockStorage> {
        let bytes = block_bytes
            .checked_mul(num_blocks as usize)
            .ok_or(Error::InvalidValue("paged KV size overflows"))?;
        match b.vmm_granularity() {
            Some(g) => {
                let size = bytes
                    .checked_next_multiple_of(g)
                    .ok_or(Error::InvalidValue("paged KV size overflows"))?;
                let base = b.vmm_reserve(size)?;
                Ok(BlockStorage {
                    base,
                    size,
                    block_bytes,
                    granule: g,
                    mapped: vec![false; size / g],
                    n_mapped: 0,
                })
            }
            None => Ok(BlockStorage {
                base: b.alloc(bytes)?,
                size: bytes,
                block_bytes,
                granule: 0,
                mapped: Vec::new(),
                n_mapped: 0,
            }),
        }
    }

    /// Device address of block `b` (token 0 of it).
    pub fn block_ptr(&self, b: u32) -> DevicePtr {
        self.base + b as usize * self.block_bytes
    }

    pub fn base(&self) -> DevicePtr {
        self.base
    }

    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// Bytes of device memory behind the tensor now.
    pub fn committed(&self) -> u64 {
        if self.granule == 0 {
            self.size as u64
        } else {
            (self.n_mapped * self.granule) as u64
        }
    }

    pub fn reserved(&self) -> u64 {
        if self.granule == 0 {
            0
        } else {
            self.size as u64
        }
    }

    /// Granules block `b` touches.
    fn granules_of(&self, b: u32) -> std::ops::Range<usize> {
        let start = b as usize * self.block_bytes;
        start / self.granule..(start + self.block_bytes).div_ceil(self.granule)
    }

    /// Maps every granule `blocks` touch that is not mapped yet, appending the granules it mapped
    /// to `fresh` (so that a caller can undo them). On an error the granules this call mapped are
    /// in `fresh` and still mapped.
    pub fn map_blocks(
        &mut self,
        b: &dyn Backend,
        blocks: &[u32],
        fresh: &mut Vec<usize>,
    ) -> Result<()> {
        if self.granule == 0 || self.block_bytes == 0 {
            return Ok(());
        }
        for &blk in blocks {
            for g in self.granules_of(blk) {
                if !self.mapped[g] {
                    b.vmm_map(self.base + g * self.granule, self.granule)?;
                    self.mapped[g] = true;
                    self.n_mapped += 1;
                    fresh.push(g);
                }
            }
        }
        Ok(())
    }

    /// Unmaps granules `map_blocks` reported (the caller synchronized, or nothing used them).
    pub fn unmap_granules(&mut self, b: &dyn Backend, granules: &[usize]) {
        for &g in granules {
            if self.mapped[g]
                && b.vmm_unmap(self.base + g * self.granule, self.granule)
                    .is_ok()
            {
                self.mapped[g] = false;
                self.n_mapped -= 1;
            }
        }
    }

    /// Unmaps every mapped granule no live block touches (`live(b)`); returns the bytes given
    /// back. The caller synchronized first.
    pub fn trim(&mut self, b: &dyn Backend, live: impl Fn(u32) -> bool) -> u64 {
        if self.granule == 0 || self.block_bytes == 0 {
            return 0;
        }
        let idle: Vec<usize> = (0..self.mapped.len())
            .filter(|&g| self.mapped[g])
            .filter(|&g| {
                let first = g * self.granule / self.block_bytes;
                let last = ((g + 1) * self.granule - 1) / self.block_bytes;
                (first..=last).all(|blk| !live(blk as u32))
            })
            .collect();
        let before = self.n_mapped;
        self.unmap_granules(b, &idle);
        ((before - self.n_mapped) * self.granule) as u64
    }

    /// Gives everything back; the caller synchronized first.
    pub fn release(&mut self, b: &dyn Backend) {
        if self.granule == 0 {
            let _ = b.free(self.base, self.size);
            return;
        }
        let all: Vec<usize> = (0..self.mapped.len()).filter(|&g| self.mapped[g]).collect();
        self.unmap_granules(b, &all);
        let _ = b.vmm_release(self.base, self.size);
    }
}
