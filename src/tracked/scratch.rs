//! Scratch-pool blocks (`hbm_pool_alloc` / `hbm_pool_free`), tracked. Each record names its pool
//! (`Live::owner`, the pool's address), so a free into another pool, or with another size, is
//! refused before anything is touched.

use super::{restore, take, Taken, Want};
use crate::backend::DevicePtr;
use crate::error::{Error, Result};
use crate::nvtx;
use crate::pool::ScratchPool;
use crate::track::{self, Origin, Refused};

/// A pool's identity in its blocks' records: its address, unique while it lives.
fn owner(pool: &ScratchPool) -> usize {
    pool as *const ScratchPool as usize
}

/// Allocates at least `size` (> 0) bytes from `pool` and records the block with the caller's
/// stack; returns (pointer, `actual` size).
pub fn alloc(pool: &ScratchPool, size: usize) -> Result<(DevicePtr, usize)> {
    let (ptr, actual) = pool.alloc(size)?;
    track::global().on_alloc_owned(ptr, actual, pool.device(), 0, Origin::Pool, owner(pool));
    nvtx::region_add(ptr, size);
    Ok((ptr, actual))
}

/// Removes the records of every block still live in `pool`, which is being destroyed with them
/// (its memory goes back as a whole): they are freed, not leaked. Scans the live table once;
/// destroying a pool is rare.
pub fn forget_pool(pool: &ScratchPool) {
    let tracker = track::global();
    for (ptr, live) in tracker.snapshot() {
        if live.origin == Origin::Pool && live.owner == owner(pool) {
            let _ = take(ptr, Want::scratch(owner(pool), live.size));
        }
    }
}

/// Frees `ptr`, which `alloc` gave with `actual`. The record goes before the pool can hand the
/// block to another thread, and only a block of this pool of exactly `actual` bytes is taken:
/// any other record (another entry point's block, another pool's, a wrong size) stays exactly
/// as it was. `InvalidValue` for a wrong size; a pointer error for anything else.
pub fn free(pool: &ScratchPool, ptr: DevicePtr, actual: usize) -> Result<()> {
    match take(ptr, Want::scratch(owner(pool), actual as u64)) {
        Ok(taken) => {
            super::unregister_block(ptr, pool.device());
            pool.free(ptr, actual).inspect_err(|_| {
                // The pool disagrees with its record: keep the block on record.
                if let Taken::Record(live) = taken {
                    restore(ptr, live);
                }
            })
        }
        Err(Refused::Other(live)) if live.origin == Origin::Pool && live.owner == owner(pool) => {
            Err(Error::InvalidValue("not the size hbm_pool_alloc gave"))
        }
        // Another entry point's block, or another pool's: not this pool's to free.
        Err(Refused::Other(_)) => {
            track::global().note_rejected();
            Err(Error::UnknownPointer(ptr))
        }
        // No record: the pool says why (freed already, inside a block, never its own).
        Err(Refused::NotLive) => pool.free(ptr, actual),
    }
}
