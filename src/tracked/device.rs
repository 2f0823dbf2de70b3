//! Device memory from the caching pools, tracked: the interposed `cudaMalloc*` / `cudaFree*`, the
//! `hbm_device_*` API and the command-line tool. Pick the device's pool, allocate or free, keep
//! the tracker informed; `cudaFree` of managed memory goes on to `host`.

use super::{free_route, not_live, take, wrong_kind, FreeError, Freed, Route, Taken, Want};
use crate::backend::{DevicePtr, Stream};
use crate::error::{Error, Result};
use crate::pool::size_class::block_size;
use crate::track::{self, Origin, Refused};
use crate::{nvtx, runtime};

/// Which entry point asked, for the tracker and the diagnostics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Runtime,
    Hbm,
    /// `hbm_torch_malloc` / `hbm_torch_free` (PyTorch's pluggable allocator).
    Torch,
    /// The driver API's `cuMemAlloc_v2` / `cuMemFree_v2`.
    Driver,
}

/// Allocates `size` (> 0) bytes on `device`, stream-ordered on `stream` when given.
///
/// The tracker's registry is the one record of live blocks on this path: the pool keeps none
/// (`*_unchecked`), which saves a second map operation per allocation and per free. The block
/// size is a function of the request (`pool::size_class::block_size`), so the record's size
/// is enough to give the block back.
#[inline]
pub fn alloc(device: i32, size: usize, stream: Option<Stream>, api: Api) -> Result<DevicePtr> {
    let origin = match (api, stream) {
        (Api::Runtime, None) => Origin::CudaMalloc,
        (Api::Runtime, Some(_)) => Origin::CudaMallocAsync,
        (Api::Hbm, _) => Origin::HbmAlloc,
        (Api::Torch, _) => Origin::TorchMalloc,
        (Api::Driver, _) => Origin::CuMemAlloc,
    };
    alloc_as(device, size, stream, origin)
}

/// As `alloc`, recorded as `origin`, which must be a caching-pool origin (`cudaMallocPitch`,
/// `cudaMalloc3D`, `cuMemAlloc` name their own calls in the leak report).
#[inline]
pub fn alloc_as(
    device: i32,
    size: usize,
    stream: Option<Stream>,
    origin: Origin,
) -> Result<DevicePtr> {
    debug_assert_eq!(origin.source(), super::Source::DevicePool);
    let pool = runtime::pool(device)?;
    let (ptr, _block) = match stream {
        Some(s) => pool.alloc_async_unchecked(size, s)?,
        None => pool.alloc_unchecked(size)?,
    };
    track::on_alloc(ptr, size, device, stream.unwrap_or(0), origin);
    nvtx::region_add(ptr, size);
    Ok(ptr)
}

/// As `alloc` for PyTorch (`Origin::TorchMalloc`), into the CUDA graph pool `graph` of
/// `device`'s caching pool (`CachingPool::alloc_graph_unchecked`); freed with `free` as usual.
pub fn alloc_graph(
    device: i32,
    size: usize,
    stream: Stream,
    graph: crate::pool::capture::GraphId,
) -> Result<DevicePtr> {
    let pool = runtime::pool(device)?;
    let (ptr, _block) = pool.alloc_graph_unchecked(size, stream, graph)?;
    track::on_alloc(ptr, size, device, stream, Origin::TorchMalloc);
    nvtx::region_add(ptr, size);
    Ok(ptr)
}

/// Frees `ptr`, whichever device's pool holds it (the runtime frees across devices too);
/// `cudaFree` also takes managed memory back (freed here on the simulated device, handed to the
/// caller to forward on CUDA). Needs no current device: the record says whose block it is.
#[inline]
pub fn free(
    ptr: DevicePtr,
    stream: Option<Stream>,
    api: Api,
) -> std::result::Result<Freed, FreeError> {
    let want = match api {
        Api::Runtime | Api::Driver => Want::CUDA_FREE,
        Api::Hbm | Api::Torch => Want::HBM_DEVICE_FREE,
    };
    // The record goes first: once the pool has the block back, another thread may get it (and
    // record it) at once.
    match take(ptr, want) {
        Ok(Taken::Pooled { size, device }) => {
            super::unregister_block(ptr, device);
            let pool = runtime::pool(device).map_err(FreeError::Refused)?;
            let block = block_size(size as usize).expect("a recorded size has a block");
            match free_route(stream, pool.stream_safety()) {
                Route::Async(s) => pool.free_async_unchecked(ptr, block, s),
                Route::Pool => pool.free_unchecked(ptr, block),
                Route::Keep => {}
            }
            Ok(Freed::Pooled(block))
        }
        Ok(Taken::Record(live)) => super::host::free_forwarded(ptr, live),
        Err(Refused::Other(live)) => Err(wrong_kind(call_name(api), ptr, live.origin)),
        Err(Refused::NotLive) => Err(not_live(call_name(api), ptr, classify(ptr))),
    }
}

fn call_name(api: Api) -> &'static str {
    match api {
        Api::Runtime => "cudaFree",
        Api::Hbm => "hbm_device_free",
        Api::Torch => "hbm_torch_free",
        Api::Driver => "cuMemFree",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StreamSafety;

    /// Issue 18, defect 11: once exit has begun, no free calls the driver: under
    /// `stream_safety:eager` a `cudaFree` / `cudaFreeHost` makes no synchronize, and a
    /// `cudaFreeAsync` records no event. In a child process: it marks the process as exiting.
    #[test]
    fn no_driver_call_from_a_free_at_exit() {
        if crate::test_child::is_child() {
            return no_driver_call_child();
        }
        let out = crate::test_child::run(
            "tracked::device::tests::no_driver_call_from_a_free_at_exit",
            Some("backend:sim,stream_safety:eager,leak_report:off"),
        );
        assert!(out.contains("1 passed"), "the child ran no test: {out}");
    }

    fn no_driver_call_child() {
        let pool = runtime::pool(0).unwrap();
        let syncs = || pool.stats().syncs;
        let p = alloc(0, 4096, None, Api::Runtime).unwrap();
        let before = syncs();
        free(p, None, Api::Runtime).unwrap();
        assert_eq!(syncs(), before + 1, "eager: a free synchronizes");
        let h = crate::tracked::host::alloc_pinned(4096, Origin::CudaMallocHost).unwrap();

        let (p, q) = (
            alloc(0, 4096, None, Api::Runtime).unwrap(),
            alloc(0, 4096, None, Api::Runtime).unwrap(),
        );
        track::begin_exit();
        let (before, host_before) = (syncs(), runtime::host_pool().unwrap().stats().syncs);
        assert_eq!(free(p, None, Api::Runtime).unwrap(), Freed::Pooled(4096));
        assert_eq!(free(q, Some(7), Api::Runtime).unwrap(), Freed::Pooled(4096));
        crate::tracked::host::free_host(h).unwrap();
        assert_eq!(syncs(), before, "no synchronize at exit");
        assert_eq!(runtime::host_pool().unwrap().stats().syncs, host_before);
        assert_eq!(
            track::global().get(p),
            None,
            "the records are gone all the same"
        );
        // The routes: no event at exit, whatever the mode; no synchronize under eager.
        assert_eq!(free_route(Some(7), StreamSafety::Batched), Route::Pool);
        assert_eq!(free_route(Some(7), StreamSafety::Eager), Route::Keep);
        assert_eq!(free_route(None, StreamSafety::Eager), Route::Keep);
        assert_eq!(free_route(None, StreamSafety::Batched), Route::Pool);
    }
}
