//! Where device memory comes from: one small trait, one implementation per file.
//!
//! A backend serves exactly one device (or the host: the pinned host memory behind
//! `cudaMallocHost` comes from a backend whose device is `HOST_DEVICE`). It knows nothing of
//! pooling, tracking or interposition: pools sit above it and call it only on their slow paths.

pub mod cuda;
pub mod fault;
pub mod reclaim;
pub mod sim;

use crate::error::{Error, Result};
use crate::kv::HbmType;
use std::sync::Arc;

/// A device address (`CUdeviceptr` on CUDA, a host address on the simulated device).
pub type DevicePtr = usize;

/// The "device" of pinned host memory: CUDA's `cudaCpuDeviceId`. The backend behind
/// `cudaMallocHost` answers `device()` with it, and the tracker records pinned blocks on it.
pub const HOST_DEVICE: i32 = -1;

/// (free, total) bytes of the host's RAM, as `sysinfo(2)` counts them; (0, 0) if it fails.
pub fn host_memory() -> (usize, usize) {
    // SAFETY: an all-zero `sysinfo` is a valid value of this plain C struct.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable `struct sysinfo` for the call.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return (0, 0);
    }
    let unit = (info.mem_unit as usize).max(1);
    (
        (info.freeram as usize).saturating_mul(unit),
        (info.totalram as usize).saturating_mul(unit),
    )
}

/// A stream handle as the CUDA runtime passes it (`cudaStream_t`); 0 is the legacy default stream.
pub type Stream = usize;

/// An event recorded on a stream; backends hand out and take back their own handles.
pub type Event = usize;

/// Anything held for its `Drop` (a lock guard, see `Backend::lock_for_fork`).
pub trait Held {}
impl<T> Held for T {}

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

    /// Holds the backend's own locks until dropped, for `fork` (`crate::fork`): a child must not
    /// inherit one held by a thread it lacks. `None` when the backend has none.
    fn lock_for_fork(&self) -> Option<Box<dyn Held + '_>> {
        None
    }

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

    /// Queues on `stream` the append of `dst.n_rows` token rows: `src` holds that many rows of
    /// `dst.row_elems` elements of `src_type` (F32 or F16), contiguous, and each is written into
    /// `dst`'s row in `dst.ty`'s encoding, byte for byte what `kv::quant::quantize_row` gives.
    /// Checked first with `check_kv_io`; on an error nothing is queued. The default, for a
    /// backend without kernels, is `NotSupported`.
    fn kv_append(
        &self,
        _src: DevicePtr,
        _src_type: HbmType,
        _dst: &KvRows,
        _stream: Stream,
    ) -> Result<()> {
        Err(Error::NotSupported("KV append on this backend"))
    }

    /// Queues on `stream` the conversion of the rows `src` describes into `dst` as `dst_type` (F32
    /// or F16), contiguous: exactly `kv::quant::dequantize_row`, then fp16 rounding for F16.
    /// Checked first with `check_kv_io`; on an error nothing is queued. The default is
    /// `NotSupported`.
    fn kv_dequantize(
        &self,
        _src: &KvRows,
        _dst: DevicePtr,
        _dst_type: HbmType,
        _stream: Stream,
    ) -> Result<()> {
        Err(Error::NotSupported("KV dequantize on this backend"))
    }
}

/// Token rows of a KV cache tensor in device memory: `n_rows` rows of `row_elems` elements of
/// `ty`, row `r` at `ptr + r * stride` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvRows {
    pub ptr: DevicePtr,
    pub ty: HbmType,
    pub stride: usize,
    pub row_elems: u32,
    pub n_rows: u32,
}

impl KvRows {
    /// Rows packed one after the other (stride = row bytes), as a caller's F32/F16 buffer is.
    pub fn contiguous(ptr: DevicePtr, ty: HbmType, row_elems: u32, n_rows: u32) -> Result<KvRows> {
        let stride = ty
            .row_bytes(row_elems as usize)
            .ok_or(Error::InvalidValue("row is not a whole number of blocks"))?;
        Ok(KvRows {
            ptr,
            ty,
            stride,
            row_elems,
            n_rows,
        })
    }

    /// Bytes of one row's elements, once the rows are checked: whole blocks, within the stride,
    /// and the address and stride aligned for the element type (the kernels load F32 as 4-byte
    /// and F16/BF16 as 2-byte words; quantized blocks are read and written bytewise).
    fn checked_row_bytes(&self) -> Result<usize> {
        let bytes = self
            .ty
            .row_bytes(self.row_elems as usize)
            .ok_or(Error::InvalidValue("row is not a whole number of blocks"))?;
        let align = match self.ty {
            HbmType::F32 => 4,
            HbmType::F16 | HbmType::BF16 => 2,
            HbmType::Q8_0 | HbmType::Q4_0 => 1,
        };
        if self.row_elems > i32::MAX as u32 || self.stride < bytes {
            return Err(Error::InvalidValue("row stride smaller than a row"));
        }
        if self.ptr % align != 0 || self.stride % align != 0 {
            return Err(Error::InvalidValue(
                "rows misaligned for their element type",
            ));
        }
        let last = (self.n_rows as usize)
            .checked_sub(1)
            .map_or(Some(0), |n| n.checked_mul(self.stride)?.checked_add(bytes));
        if last.and_then(|n| self.ptr.checked_add(n)).is_none() {
            return Err(Error::InvalidValue(
                "rows run past the end of the address space",
            ));
        }
        Ok(bytes)
    }
}

/// What every backend checks before a KV append or dequantize: `plain` (the caller's buffer) is
/// F32 or F16 and contiguous, both sides hold the same rows, each is whole blocks within its
/// stride and aligned for its type, and a NULL address is refused. Returns the row bytes of
/// (`plain`, `cache`).
pub fn check_kv_io(plain: &KvRows, cache: &KvRows) -> Result<(usize, usize)> {
    if !matches!(plain.ty, HbmType::F32 | HbmType::F16) {
        return Err(Error::InvalidValue(
            "KV rows are appended from and dequantized to F32 or F16 only",
        ));
    }
    if plain.row_elems != cache.row_elems || plain.n_rows != cache.n_rows {
        return Err(Error::InvalidValue("source and destination rows differ"));
    }
    if plain.ptr == 0 || cache.ptr == 0 {
        return Err(Error::InvalidValue("NULL KV rows"));
    }
    let (p, c) = (plain.checked_row_bytes()?, cache.checked_row_bytes()?);
    if plain.stride != p {
        return Err(Error::InvalidValue("F32/F16 rows must be contiguous"));
    }
    Ok((p, c))
}

/// A backend shared by the pools of one device.
pub type SharedBackend = Arc<dyn Backend>;
