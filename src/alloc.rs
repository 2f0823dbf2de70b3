//! The tracked allocation path shared by the interposed `cuda*` hooks, the `hbm_device_*` API and
//! the command-line tool: pick the device's pool, allocate or free, keep the tracker informed.
//! Pure Rust; callers at the C boundary own NULL checks, panics and error codes.

use crate::backend::{DevicePtr, Stream};
use crate::config::StreamSafety;
use crate::error::{Error, Result};
use crate::pool::size_class::block_size;
use crate::runtime;
use crate::track::{self, Origin, Refused, Source, Taken, Want};

/// Which entry point asked, for the tracker and the diagnostics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Runtime,
    Hbm,
}

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
    };
    track::on_alloc(ptr, size, device, stream.unwrap_or(0), origin);
    Ok(ptr)
}

/// A free that freed nothing, as the caller must answer it.
#[derive(Debug)]
pub enum FreeError {
    /// No block of ours starts at the pointer: it may be the runtime's own memory, to forward.
    /// Nothing is counted or printed yet; `reject_unknown` does, if no one owns it.
    Unknown(DevicePtr),
    /// A live block of another kind (`origin`), left as it was; one line said so.
    WrongKind(Origin),
    /// A double free or an interior pointer (one diagnostic printed), or a pool's error.
    Refused(Error),
}

impl From<FreeError> for Error {
    fn from(e: FreeError) -> Error {
        match e {
            FreeError::Unknown(ptr) => Error::UnknownPointer(ptr),
            FreeError::WrongKind(_) => Error::InvalidValue("a block of another kind"),
            FreeError::Refused(e) => e,
        }
    }
}

/// What a free did.
#[derive(Debug, PartialEq, Eq)]
pub enum Freed {
    /// Back in its pool: a block of this many bytes.
    Pooled(usize),
    /// The record of memory the runtime handed out (managed, write-combined), removed: the
    /// caller gives the memory to the runtime, and `track::restore`s the record if it refuses.
    Forward(track::Live),
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
        Api::Runtime => Want::CUDA_FREE,
        Api::Hbm => Want::HBM_DEVICE_FREE,
    };
    // The record goes first: once the pool has the block back, another thread may get it (and
    // record it) at once.
    match track::take(ptr, want) {
        Ok(Taken::Pooled { size, device }) => {
            let pool = runtime::pool(device).map_err(FreeError::Refused)?;
            let block = block_size(size as usize).expect("a recorded size has a block");
            match free_route(stream, pool.stream_safety()) {
                Route::Async(s) => pool.free_async_unchecked(ptr, block, s),
                Route::Pool => pool.free_unchecked(ptr, block),
                Route::Keep => {}
            }
            Ok(Freed::Pooled(block))
        }
        Ok(Taken::Record(live)) => crate::host_alloc::free_forwarded(ptr, live),
        Err(Refused::Other(live)) => Err(wrong_kind(call_name(api), ptr, live.origin)),
        Err(Refused::NotLive) => Err(not_live(call_name(api), ptr, classify(ptr))),
    }
}

/// How a freed block goes back to its pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// Stream-ordered: reusable on its stream at once (the pool records an event).
    Async(Stream),
    /// Into the freeing thread's shard (under `stream_safety:eager`, after a synchronize).
    Pool,
    /// Nowhere: the process is exiting and giving it back would call the driver (a synchronize
    /// under `eager`); the memory goes with the process.
    Keep,
}

/// The route of a free. Only the routes that would reach the driver read the exit flag: a plain
/// `cudaFree` in the default mode reads nothing shared.
#[inline]
pub(crate) fn free_route(stream: Option<Stream>, safety: StreamSafety) -> Route {
    let eager = safety == StreamSafety::Eager;
    match (stream, eager) {
        (Some(s), _) if !track::exiting() => Route::Async(s),
        (None, false) => Route::Pool,
        (_, true) if track::exiting() => Route::Keep,
        // Exiting, a stream-ordered free goes back without its event: the epoch rule (a later
        // synchronize, which no one will make) keeps it safe.
        _ => Route::Pool,
    }
}

fn call_name(api: Api) -> &'static str {
    match api {
        Api::Runtime => "cudaFree",
        Api::Hbm => "hbm_device_free",
    }
}

/// A free of a live block of another kind: refused with one line, the record untouched.
#[cold]
pub(crate) fn wrong_kind(call: &str, ptr: DevicePtr, origin: Origin) -> FreeError {
    track::global().note_rejected();
    let how = match (call, origin.source()) {
        ("cudaFreeHost", Source::DevicePool | Source::Managed) => "; free it with cudaFree",
        ("cudaFree" | "hbm_device_free", Source::PinnedPool | Source::WriteCombined) => {
            "; free it with cudaFreeHost"
        }
        ("hbm_device_free", Source::Managed) => "; free it with cudaFree",
        _ => "",
    };
    eprintln!(
        "hbmalloc: {call}({ptr:#x}): a block from {}, not one this call frees{how}; nothing freed",
        origin.name()
    );
    FreeError::WrongKind(origin)
}

/// A free of a pointer with no live record: a double free or an interior pointer (`e`, from the
/// pool, with one diagnostic), or unknown to us (left to the caller, which may forward it).
#[cold]
pub(crate) fn not_live(call: &str, ptr: DevicePtr, e: Error) -> FreeError {
    if let Error::UnknownPointer(_) = e {
        return FreeError::Unknown(ptr);
    }
    let bad = track::reject(ptr);
    report_bad_free(call, ptr, &e, &bad);
    FreeError::Refused(e)
}

/// Counts a free that neither hbmalloc nor the runtime owns as rejected (the caller prints).
#[cold]
pub fn reject_unknown(ptr: DevicePtr) {
    let _ = track::reject(ptr);
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
/// tracker knows (`bad`).
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 18, defect 11: once exit has begun, no free calls the driver: under
    /// `stream_safety:eager` a `cudaFree` / `cudaFreeHost` makes no synchronize, and a
    /// `cudaFreeAsync` records no event. In a child process: it marks the process as exiting.
    #[test]
    fn no_driver_call_from_a_free_at_exit() {
        if crate::test_child::is_child() {
            return no_driver_call_child();
        }
        let out = crate::test_child::run(
            "alloc::tests::no_driver_call_from_a_free_at_exit",
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
        let h = crate::host_alloc::alloc_pinned(4096, Origin::CudaMallocHost).unwrap();

        let (p, q) = (
            alloc(0, 4096, None, Api::Runtime).unwrap(),
            alloc(0, 4096, None, Api::Runtime).unwrap(),
        );
        track::begin_exit();
        let (before, host_before) = (syncs(), runtime::host_pool().unwrap().stats().syncs);
        assert_eq!(free(p, None, Api::Runtime).unwrap(), Freed::Pooled(4096));
        assert_eq!(free(q, Some(7), Api::Runtime).unwrap(), Freed::Pooled(4096));
        crate::host_alloc::free_host(h).unwrap();
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
