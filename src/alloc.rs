//! The tracked allocation path shared by the interposed `cuda*` hooks, the `hbm_device_*` API and
//! the command-line tool: pick the device's pool, allocate or free, keep the tracker informed.
//! Pure Rust; callers at the C boundary own NULL checks, panics and error codes.

use crate::backend::{DevicePtr, Stream};
use crate::error::{Error, Result};
use crate::pool::size_class::block_size;
use crate::runtime;
use crate::track::{self, Origin};

/// Which entry point asked, for the tracker and the diagnostics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Runtime,
    Hbm,
    Torch,
}

/// The origins of blocks that live in the caching pools.
const POOL_ORIGINS: [Origin; 4] = [
    Origin::CudaMalloc,
    Origin::CudaMallocAsync,
    Origin::HbmAlloc,
    Origin::TorchMalloc,
];

/// Allocates `size` (> 0) bytes on `device`, stream-ordered on `stream` when given.
///
/// The tracker's registry is the one record of live blocks on this path: the pool keeps none
/// (`*_unchecked`), which saves a second map operation per allocation and per free. The block
/// size is a function of the request (`pool::size_class::block_size`), so the record's size
/// is enough to give the block back.
#[inline]
pub fn alloc(device: i32, size: usize, stream: Option<Stream>, api: Api) -> Result<DevicePtr> {
    let pool = runtime::pool(device)?;
    let (ptr, _block) = match stream {
        Some(s) => pool.alloc_async_unchecked(size, s)?,
        None => pool.alloc_unchecked(size)?,
    };
    let origin = match (api, stream) {
        (Api::Runtime, None) => Origin::CudaMalloc,
        (Api::Runtime, Some(_)) => Origin::CudaMallocAsync,
        (Api::Hbm, _) => Origin::HbmAlloc,
        (Api::Torch, _) => Origin::TorchMalloc,
    };
    track::on_alloc(ptr, size, device, stream.unwrap_or(0), origin);
    Ok(ptr)
}

/// Frees `ptr`, whichever device's pool holds it (the runtime frees across devices too).
/// `Err(UnknownPointer)` means no pool knows it: the caller may forward it to the runtime.
/// Needs no current device: the record says whose block it is.
#[inline]
pub fn free(ptr: DevicePtr, stream: Option<Stream>, api: Api) -> Result<usize> {
    // The record goes first: once the pool has the block back, another thread may get it (and
    // record it) at once.
    match track::forget_block(ptr, &POOL_ORIGINS) {
        Ok((size, device)) => {
            let pool = runtime::pool(device)?;
            let block = block_size(size as usize).expect("a recorded size has a block");
            match stream {
                Some(s) => pool.free_async_unchecked(ptr, block, s),
                None => pool.free_unchecked(ptr, block),
            }
            Ok(block)
        }
        Err(bad) => {
            let e = classify(ptr);
            let call = match api {
                Api::Runtime => "cudaFree",
                Api::Hbm => "hbm_device_free",
                Api::Torch => "hbm_torch_free",
            };
            report_bad_free(call, ptr, &e, &bad);
            Err(e)
        }
    }
}

/// What a pointer that is no live block is: freed already, inside a block, or none of ours.
#[cold]
fn classify(ptr: DevicePtr) -> Error {
    runtime::pools()
        .map(|(_, pool)| pool.diagnose(ptr))
        .find(|e| !matches!(e, Error::UnknownPointer(_)))
        .unwrap_or(Error::UnknownPointer(ptr))
}

/// One diagnostic for a bad free through `call`, given what the pool found (`e`) and what the
/// tracker knows (`bad`). An unknown pointer is left to the caller, which may still forward it
/// to the runtime (it may be memory the runtime allocated before we were loaded).
#[cold]
pub(crate) fn report_bad_free(call: &str, ptr: DevicePtr, e: &Error, bad: &track::BadFree) {
    match e {
        // The tracker remembers where the block was allocated and first freed, and says so.
        Error::DoubleFree(_) if bad.is_double_free() => track::report_bad_free(bad),
        // Its freed record was reused since: the pool's word alone.
        Error::DoubleFree(_) => eprintln!("hbmalloc: {call}({ptr:#x}): double free; nothing done"),
        Error::InteriorPointer { block, .. } => eprintln!(
            "hbmalloc: {call}({ptr:#x}): pointer is inside the block at {block:#x}, not its start; nothing freed"
        ),
        _ => {}
    }
}
