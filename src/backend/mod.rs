//! Where device memory comes from: one small trait, one implementation per file.
//!
//! A backend serves exactly one device. It knows nothing of pooling, tracking or interposition:
//! pools sit above it and call it only on their slow paths.

pub mod cuda;
pub mod sim;

use crate::error::Result;
use std::sync::Arc;

/// A device address (`CUdeviceptr` on CUDA, a host address on the simulated device).
pub type DevicePtr = usize;

/// A stream handle as the CUDA runtime passes it (`cudaStream_t`); 0 is the legacy default stream.
pub type Stream = usize;

/// An event recorded on a stream; backends hand out and take back their own handles.
pub type Event = usize;

/// A source of device memory and the few device operations a pool needs.
///
/// Every method may be called from any thread. Implementations make their device's context current
/// themselves; callers never deal with contexts.
pub trait Backend: Send + Sync {
    /// "cuda" or "sim", for messages.
    fn name(&self) -> &'static str;

    /// The device ordinal this backend serves.
    fn device(&self) -> i32;

    /// Allocates `size` bytes (> 0) of device memory, aligned to at least 256 bytes.
    /// Out of memory is `Error::OutOfMemory`, never a panic.
    fn alloc(&self, size: usize) -> Result<DevicePtr>;

    /// Returns memory from `alloc`. The caller guarantees no queued work still uses it.
    fn free(&self, ptr: DevicePtr, size: usize) -> Result<()>;

    /// (free, total) bytes of the device, as the driver sees them.
    fn mem_info(&self) -> Result<(usize, usize)>;

    /// Waits until all work queued on the device (in this process's context) has finished.
    fn synchronize(&self) -> Result<()>;

    /// Records an event on `stream`; it completes once the stream has passed this point.
    fn event_record(&self, stream: Stream) -> Result<Event>;

    /// Whether the event has completed; does not wait.
    fn event_done(&self, event: Event) -> Result<bool>;

    /// Gives an event back for reuse.
    fn event_release(&self, event: Event);

    /// Virtual-memory granularity in bytes, or `None` when the device cannot reserve and map.
    fn vmm_granularity(&self) -> Option<usize>;

    /// Reserves `size` bytes of address space (a multiple of the granularity), nothing committed.
    fn vmm_reserve(&self, size: usize) -> Result<DevicePtr>;

    /// Releases a whole reservation; every mapping inside must already be unmapped.
    fn vmm_release(&self, base: DevicePtr, size: usize) -> Result<()>;

    /// Commits physical memory to `[ptr, ptr+size)` inside a reservation and makes it read-write.
    fn vmm_map(&self, ptr: DevicePtr, size: usize) -> Result<()>;

    /// Unmaps and frees the physical memory of `[ptr, ptr+size)`. The caller synchronizes first.
    fn vmm_unmap(&self, ptr: DevicePtr, size: usize) -> Result<()>;

    /// Copies `size` bytes device to device, ordered on `stream`.
    fn copy_d2d(&self, dst: DevicePtr, src: DevicePtr, size: usize, stream: Stream) -> Result<()>;

    /// Copies device memory to the host, synchronously.
    fn copy_to_host(&self, dst: &mut [u8], src: DevicePtr) -> Result<()>;

    /// Copies host memory to the device, synchronously.
    fn copy_from_host(&self, dst: DevicePtr, src: &[u8]) -> Result<()>;
}

/// A backend shared by the pools of one device.
pub type SharedBackend = Arc<dyn Backend>;
