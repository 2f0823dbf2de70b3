//! The tracked allocation path shared by the interposed `cuda*` hooks, the `hbm_device_*` API and
//! the command-line tool: pick the device's pool, allocate or free, keep the tracker informed.
//! Pure Rust; callers at the C boundary own NULL checks, panics and error codes.

use crate::backend::{DevicePtr, Stream};
use crate::error::{Error, Result};
use crate::pool::CachingPool;
use crate::runtime;
use crate::track::{self, Origin};

/// Which entry point asked, for the tracker and the diagnostics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Runtime,
    Hbm,
}

/// Allocates `size` (> 0) bytes on `device`, stream-ordered on `stream` when given.
pub fn alloc(device: i32, size: usize, stream: Option<Stream>, api: Api) -> Result<DevicePtr> {
    let pool = runtime::pool(device)?;
    let ptr = match stream {
        Some(s) => pool.alloc_async(size, s)?,
        None => pool.alloc(size)?,
    };
    let origin = match (api, stream) {
        (Api::Runtime, None) => Origin::CudaMalloc,
        (Api::Runtime, Some(_)) => Origin::CudaMallocAsync,
        (Api::Hbm, _) => Origin::HbmAlloc,
    };
    track::on_alloc(ptr, size, device, stream.unwrap_or(0), origin);
    Ok(ptr)
}

/// Frees `ptr`, whichever device's pool owns it (the runtime frees across devices too).
/// `Err(UnknownPointer)` means no pool knows it: the caller may forward it to the runtime.
pub fn free(
    ptr: DevicePtr,
    current_device: i32,
    stream: Option<Stream>,
    api: Api,
) -> Result<usize> {
    // The tracker first: once the pool has the block back, another thread may get it at once.
    let tracked = track::forget(ptr);
    // The current device's pool first: one live-map operation in the common case.
    let result = free_in(runtime::pool(current_device)?, ptr, stream);
    let result = match result {
        Err(Error::UnknownPointer(_) | Error::DoubleFree(_) | Error::InteriorPointer { .. }) => {
            match runtime::pools().find(|(d, p)| *d != current_device && p.owns(ptr)) {
                Some((_, other)) => free_in(other, ptr, stream),
                None => result,
            }
        }
        other => other,
    };
    if let Err(e) = &result {
        diagnose(ptr, e, api, tracked.err());
    }
    result
}

fn free_in(pool: &CachingPool, ptr: DevicePtr, stream: Option<Stream>) -> Result<usize> {
    match stream {
        Some(s) => pool.free_async(ptr, s),
        None => pool.free(ptr),
    }
}

/// One diagnostic for a bad free. An unknown pointer is left to the caller, which may still
/// forward it to the runtime (it may be memory the runtime allocated before we were loaded).
#[cold]
fn diagnose(ptr: DevicePtr, e: &Error, api: Api, bad: Option<Box<track::BadFree>>) {
    let call = match api {
        Api::Runtime => "cudaFree",
        Api::Hbm => "hbm_device_free",
    };
    match e {
        // The tracker remembers where the block was allocated and first freed, and says so.
        Error::DoubleFree(_) => match bad {
            Some(bad) => track::report_bad_free(&bad),
            None => eprintln!("hbmalloc: {call}({ptr:#x}): double free; nothing done"),
        },
        Error::InteriorPointer { block, .. } => eprintln!(
            "hbmalloc: {call}({ptr:#x}): pointer is inside the block at {block:#x}, not its start; nothing freed"
        ),
        _ => {}
    }
}
