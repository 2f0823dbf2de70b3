//! The tracking adaptor: every allocation and free of every entry point goes through here, over
//! each memory source. An allocation asks its pool (or the runtime, or a pool object), then
//! records the block with the tracker (`track`); a free takes the record, then gives the block
//! back to what its record says it came from. The one origin check of every free ("this free is
//! for a block of my kind": its source, and for blocks of a pool object, its owner and size) is
//! `Want::accepts`, applied inside the tracker's one look-up (`take`).
//!
//! The call path of a `cudaFree(p)` goes down once: the boundary (`ffi::cuda_api::cudaFree`)
//! calls `device::free`, which takes `p`'s record (`take` → `track::Tracker::take` →
//! `LiveTable::remove_with`, one look-up) and gives the block to its device's caching pool
//! (`CachingPool::free_unchecked`), which reaches the backend only in its slow path. What the
//! adaptor cannot finish itself it hands back to the boundary as a value, never by calling up:
//! memory the runtime owns (`Freed::Forward`: managed, write-combined) and pointers no one here
//! knows (`FreeError::Unknown`), which the boundary gives to the runtime's own free.
//!
//! Modules, one per kind of memory: `device` (`cudaMalloc*`, `cudaMallocPitch`, `cudaMalloc3D`,
//! `cuMemAlloc_v2`, `hbm_device_*`, the command-line tool), `host` (pinned and managed memory),
//! `forwarded` (what the runtime hands out and we only record: arrays, pool memory, registered
//! host ranges), `scratch` (`hbm_pool_*` blocks), `kv` (KV cache
//! objects). Pure Rust: callers at the C boundary own NULL checks, panics and error codes.
//!
//! Cost on the hot path, per pair: the pool's own fast path, one live-table insert and one
//! remove (a compare-and-swap and a store each), and `Want::accepts` (a shift and a mask) inside
//! the remove. No lock, no read-modify-write of a shared atomic.

pub mod device;
pub mod forwarded;
pub mod host;
pub mod kv;
pub mod scratch;

use crate::backend::{DevicePtr, Stream};
use crate::config::StreamSafety;
use crate::error::Error;
use crate::track::{self, BadFree, Live, Origin, Refused};

/// Where a block's memory lives, which is what its free must give it back to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Source {
    /// A device's caching pool (`cudaMalloc*`, `hbm_device_alloc`).
    DevicePool,
    /// The pinned host pool (`cudaMallocHost`, `cudaHostAlloc`).
    PinnedPool,
    /// The runtime's managed memory (the simulated device's host memory under `backend:sim`).
    Managed,
    /// The runtime's write-combined pinned memory.
    WriteCombined,
    /// A scratch pool (`hbm_pool_*`); the record's `owner` names which.
    Scratch,
    /// A KV cache object; the record's `owner` is its handle.
    KvCache,
    /// Device memory the runtime handed out from a pool of its own (`cudaMallocFromPoolAsync`,
    /// `cudaMemPoolImportPointer`): `cudaFree` takes its record and forwards the memory.
    RuntimeDevice,
    /// A CUDA array, the runtime's; only `cudaFreeArray` takes it.
    RuntimeArray,
    /// A host range the runtime page-locked (`cudaHostRegister`); only `cudaHostUnregister`
    /// takes it.
    HostRegistered,
}

impl Origin {
    #[inline]
    pub const fn source(self) -> Source {
        match self {
            Origin::CudaMalloc
            | Origin::CudaMallocAsync
            | Origin::HbmAlloc
            | Origin::TorchMalloc
            | Origin::CudaMallocPitch
            | Origin::CudaMalloc3D
            | Origin::CuMemAlloc => Source::DevicePool,
            Origin::CudaMallocFromPoolAsync | Origin::CudaMemPoolImportPointer => {
                Source::RuntimeDevice
            }
            Origin::CudaMallocArray | Origin::CudaMalloc3DArray => Source::RuntimeArray,
            Origin::CudaHostRegister => Source::HostRegistered,
            Origin::CudaMallocHost | Origin::CudaHostAlloc => Source::PinnedPool,
            Origin::CudaMallocManaged => Source::Managed,
            Origin::CudaHostAllocWriteCombined => Source::WriteCombined,
            Origin::Pool => Source::Scratch,
            Origin::KvCache => Source::KvCache,
        }
    }
}

/// What one free entry point takes: the sources its blocks may come from and, for blocks of a
/// pool object, the owner and size their record must carry. `accepts` is the one origin check
/// of every free ("this free is for a block of my kind").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    /// One bit per `Source`.
    sources: u16,
    /// 0: any owner (the process-wide pools record none).
    owner: usize,
    size: Option<u64>,
}

impl Want {
    /// `cudaFree` / `cudaFreeAsync` / `cuMemFree_v2`: a caching-pool block, managed memory, or
    /// memory from a pool of the runtime's.
    pub const CUDA_FREE: Want =
        Want::of(&[Source::DevicePool, Source::Managed, Source::RuntimeDevice]);
    /// `cudaFreeArray`: a CUDA array only.
    pub const CUDA_FREE_ARRAY: Want = Want::of(&[Source::RuntimeArray]);
    /// `cudaHostUnregister`: a registered host range only.
    pub const CUDA_HOST_UNREGISTER: Want = Want::of(&[Source::HostRegistered]);
    /// `hbm_device_free`: a caching-pool block only.
    pub const HBM_DEVICE_FREE: Want = Want::of(&[Source::DevicePool]);
    /// `cudaFreeHost`: a pinned-pool block, or write-combined memory.
    pub const CUDA_FREE_HOST: Want = Want::of(&[Source::PinnedPool, Source::WriteCombined]);

    const fn of(sources: &[Source]) -> Want {
        let mut bits = 0u16;
        let mut i = 0;
        while i < sources.len() {
            bits |= 1 << sources[i] as u16;
            i += 1;
        }
        Want {
            sources: bits,
            owner: 0,
            size: None,
        }
    }

    /// `hbm_pool_free(pool, p, actual)`: a block of the scratch pool `owner`, of `actual` bytes.
    pub const fn scratch(owner: usize, actual: u64) -> Want {
        Want {
            owner,
            size: Some(actual),
            ..Want::of(&[Source::Scratch])
        }
    }

    /// `hbm_kv_cache_destroy`: the record of the cache whose handle is `owner`.
    pub const fn kv_cache(owner: usize) -> Want {
        Want {
            owner,
            ..Want::of(&[Source::KvCache])
        }
    }

    #[inline]
    pub fn accepts(&self, live: &Live) -> bool {
        self.sources & (1 << live.origin.source() as u16) != 0
            && (self.owner == 0 || live.owner == self.owner)
            && self.size.map_or(true, |size| size == live.size)
    }
}

/// What `take` hands back: for a pooled block (the hot path) the two fields its free needs;
/// for any other kind the whole record, which `restore` puts back if the free then fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    Pooled { size: u64, device: i32 },
    Record(Live),
}

/// Records the free of a block `want` takes: removes its record, in one look-up, before the
/// block can be handed out again. A record of another kind stays as it was (`Refused::Other`);
/// a pointer with no record (`Refused::NotLive`) is neither counted nor diagnosed until the
/// caller, finding no other owner, `reject`s it.
#[inline]
pub fn take(ptr: usize, want: Want) -> Result<Taken, Refused> {
    track::global().take(
        ptr,
        |live| want.accepts(live),
        |live| match live.origin.source() {
            Source::DevicePool | Source::PinnedPool => Taken::Pooled {
                size: live.size,
                device: live.device,
            },
            _ => Taken::Record(*live),
        },
    )
}

/// Puts back a record `take` removed, as it was (a forwarded free the runtime refused).
#[cold]
pub fn restore(ptr: usize, live: Live) {
    track::global().restore(ptr, live);
}

/// Counts a free no one owns as rejected; returns what its diagnostic can say (cold: scans).
#[cold]
pub fn reject(ptr: usize) -> Box<BadFree> {
    track::global().reject(ptr)
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
    /// caller gives the memory to the runtime, and `restore`s the record if it refuses.
    Forward(Live),
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

/// A pool block is being freed but stays in its pool: unregisters its region with an attached
/// tool (`nvtx`), after waiting for `device` as the runtime's own `cudaFree` does, so that the
/// tool never sees work queued before the free touch a block that is no longer registered.
/// Nothing, not even the wait, without a tool (nor during exit).
#[inline]
pub(crate) fn unregister_block(ptr: DevicePtr, device: i32) {
    if crate::nvtx::active() {
        unregister_block_slow(ptr, device);
    }
}

#[cold]
fn unregister_block_slow(ptr: DevicePtr, device: i32) {
    settle_for_tool(device);
    crate::nvtx::region_remove(ptr);
}

/// With a tool attached, waits for `device` before regions shrink (see `unregister_block`).
#[cold]
pub(crate) fn settle_for_tool(device: i32) {
    if let Ok(backend) = crate::runtime::backend(device) {
        let _ = backend.synchronize();
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
        ("hbm_device_free", Source::Managed | Source::RuntimeDevice) => "; free it with cudaFree",
        ("cudaFreeArray" | "cudaHostUnregister", Source::DevicePool | Source::Managed)
        | ("cudaFreeArray" | "cudaHostUnregister", Source::RuntimeDevice) => {
            "; free it with cudaFree"
        }
        (_, Source::RuntimeArray) => "; free it with cudaFreeArray",
        (_, Source::HostRegistered) => "; release it with cudaHostUnregister",
        ("cudaFreeArray" | "cudaHostUnregister", Source::PinnedPool | Source::WriteCombined) => {
            "; free it with cudaFreeHost"
        }
        _ => "",
    };
    let not = match call {
        "cudaFreeHost" => "not pinned host memory",
        "hbm_device_free" => "not from hbm_device_alloc",
        "cudaFreeArray" => "not a CUDA array",
        "cudaHostUnregister" => "not a registered host range",
        _ => "not from cudaMalloc",
    };
    eprintln!(
        "hbmalloc: {call}({ptr:#x}): a block from {}, {not}{how}; nothing freed",
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
    let bad = reject(ptr);
    report_bad_free(call, ptr, &e, &bad);
    FreeError::Refused(e)
}

/// Counts a free that neither hbmalloc nor the runtime owns as rejected (the caller prints).
#[cold]
pub fn reject_unknown(ptr: DevicePtr) {
    let _ = reject(ptr);
}

/// One diagnostic for a bad free through `call`, given what the pool found (`e`) and what the
/// tracker knows (`bad`).
#[cold]
pub(crate) fn report_bad_free(call: &str, ptr: DevicePtr, e: &Error, bad: &BadFree) {
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
    use crate::track::StackId;

    fn record(origin: Origin, owner: usize, size: u64) -> Live {
        Live {
            size,
            epoch: 0,
            time_ns: 0,
            stream: 0,
            owner,
            device: 0,
            thread: 0,
            stack: StackId::NONE,
            origin,
        }
    }

    /// Every origin against every free entry point: which free takes which block. The match
    /// makes a new origin a compile error here until its row is written.
    #[test]
    fn each_free_takes_only_its_own_kinds() {
        let all = [
            Origin::CudaMalloc,
            Origin::CudaMallocAsync,
            Origin::HbmAlloc,
            Origin::TorchMalloc,
            Origin::Pool,
            Origin::KvCache,
            Origin::CudaMallocHost,
            Origin::CudaHostAlloc,
            Origin::CudaHostAllocWriteCombined,
            Origin::CudaMallocManaged,
            Origin::CudaMallocPitch,
            Origin::CudaMalloc3D,
            Origin::CuMemAlloc,
            Origin::CudaMallocArray,
            Origin::CudaMalloc3DArray,
            Origin::CudaMallocFromPoolAsync,
            Origin::CudaMemPoolImportPointer,
            Origin::CudaHostRegister,
        ];
        for origin in all {
            // (cudaFree, hbm_device_free, cudaFreeHost, hbm_pool_free of pool 1, kv destroy of 1,
            //  cudaFreeArray, cudaHostUnregister)
            let want = match origin {
                Origin::CudaMalloc
                | Origin::CudaMallocAsync
                | Origin::HbmAlloc
                | Origin::TorchMalloc
                | Origin::CudaMallocPitch
                | Origin::CudaMalloc3D
                | Origin::CuMemAlloc => [true, true, false, false, false, false, false],
                Origin::CudaMallocManaged
                | Origin::CudaMallocFromPoolAsync
                | Origin::CudaMemPoolImportPointer => {
                    [true, false, false, false, false, false, false]
                }
                Origin::CudaMallocHost
                | Origin::CudaHostAlloc
                | Origin::CudaHostAllocWriteCombined => {
                    [false, false, true, false, false, false, false]
                }
                Origin::Pool => [false, false, false, true, false, false, false],
                Origin::KvCache => [false, false, false, false, true, false, false],
                Origin::CudaMallocArray | Origin::CudaMalloc3DArray => {
                    [false, false, false, false, false, true, false]
                }
                Origin::CudaHostRegister => [false, false, false, false, false, false, true],
            };
            let live = record(origin, 1, 4096);
            let got = [
                Want::CUDA_FREE.accepts(&live),
                Want::HBM_DEVICE_FREE.accepts(&live),
                Want::CUDA_FREE_HOST.accepts(&live),
                Want::scratch(1, 4096).accepts(&live),
                Want::kv_cache(1).accepts(&live),
                Want::CUDA_FREE_ARRAY.accepts(&live),
                Want::CUDA_HOST_UNREGISTER.accepts(&live),
            ];
            assert_eq!(got, want, "{origin:?}");
        }
        // A pool object's blocks: its own owner and, for scratch pools, its own size only.
        let block = record(Origin::Pool, 1, 4096);
        assert!(!Want::scratch(2, 4096).accepts(&block), "another pool");
        assert!(!Want::scratch(1, 4352).accepts(&block), "another size");
        assert!(!Want::kv_cache(2).accepts(&record(Origin::KvCache, 1, 0)));
    }
}
