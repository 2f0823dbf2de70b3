//! Memory the CUDA runtime hands out itself and hbmalloc only records, so that leak reports
//! and their call sites cover it: CUDA arrays (`cudaMallocArray`, `cudaMalloc3DArray`), memory
//! from the program's own memory pools (`cudaMallocFromPoolAsync`, `cudaMemPoolImportPointer`)
//! and page-locked host ranges (`cudaHostRegister`). None of it is pooled: arrays are opaque
//! handles to texture memory, pool memory follows the pool's own rules, and a registered range
//! is the program's memory.
//!
//! Callers at the C boundary call the runtime; here the record is made after the runtime
//! succeeded and taken before the runtime frees (put back with `restore` if it refuses).

use super::{take, wrong_kind, FreeError, Source, Taken, Want};
use crate::backend::DevicePtr;
use crate::track::{self, Live, Origin};

/// Records what the runtime just handed out: `key` is the pointer, or an array's handle.
pub fn record(key: usize, size: usize, device: i32, origin: Origin) {
    debug_assert!(matches!(
        origin.source(),
        Source::RuntimeDevice | Source::RuntimeArray | Source::HostRegistered
    ));
    track::on_alloc(key, size, device, 0, origin);
}

/// Takes the record of `key` for the free entry point `call`, whose blocks `want` names.
/// `Unknown` when there is none (the runtime may still own it: the caller forwards);
/// `WrongKind` (one line printed, record untouched) for a live block of another kind.
pub fn take_record(key: usize, want: Want, call: &str) -> Result<Live, FreeError> {
    match take(key, want) {
        Ok(Taken::Record(live)) => Ok(live),
        // `want` names no pooled source; a pooled record would be a caller's mistake, and
        // taking it would lose the block: refuse instead.
        Ok(Taken::Pooled { .. }) => unreachable!("{call}: a forwarded free took a pooled block"),
        Err(track::Refused::Other(live)) => Err(wrong_kind(call, key, live.origin)),
        Err(track::Refused::NotLive) => Err(FreeError::Unknown(key as DevicePtr)),
    }
}

/// Whether `key` is a live record of `origin` (the simulated device's "already registered").
pub fn is_live_as(key: usize, origin: Origin) -> bool {
    track::global()
        .get(key)
        .is_some_and(|live| live.origin == origin)
}
