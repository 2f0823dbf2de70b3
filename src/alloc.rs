//! The tracked allocation path shared by the interposed `cuda*` hooks, the `hbm_device_*` API and
//! the command-line tool: pick the device's pool, allocate or free, keep the tracker informed.
//! Pure Rust; callers at the C boundary own NULL checks, panics and error codes.

use crate::backend::{DevicePtr, Stream};
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
            match stream {
                Some(s) => pool.free_async_unchecked(ptr, block, s),
                None => pool.free_unchecked(ptr, block),
            }
            Ok(Freed::Pooled(block))
        }
        Ok(Taken::Record(live)) => crate::host_alloc::free_forwarded(ptr, live),
        Err(Refused::Other(live)) => Err(wrong_kind(call_name(api), ptr, live.origin)),
        Err(Refused::NotLive) => Err(not_live(call_name(api), ptr, classify(ptr))),
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
