//! Where device memory comes from: one small trait, one implementation per file.
//!
//! A backend serves exactly one device (or the host: the pinned host memory behind
//! `cudaMallocHost` comes from a backend whose device is `HOST_DEVICE`). It knows nothing of
//! pooling, tracking or interposition: pools sit above it and call it only on their slow paths.

/// Forwards the named `Backend` methods to `self.$up` unchanged. The adaptors over a backend
/// (`Limited`, `Reclaiming`, `Faulty`) change a few calls and must pass every other one through,
/// those with a default body too: a default would run in place of the upstream's own (the CUDA
/// backend's batched paged-KV kernels fell back to one launch per row through an adaptor).
/// Exported (hidden) for test backends in `tests/`.
#[doc(hidden)]
#[macro_export]
macro_rules! forward_backend {
    ($up:ident; $($m:ident),* $(,)?) => { $( $crate::forward_backend!(@ $up $m); )* };
    (@ $up:ident name) => { fn name(&self) -> &'static str { self.$up.name() } };
    (@ $up:ident device) => { fn device(&self) -> i32 { self.$up.device() } };
    (@ $up:ident alloc) => {
        fn alloc(&self, size: usize) -> $crate::error::Result<$crate::backend::DevicePtr> {
            self.$up.alloc(size)
        }
    };
    (@ $up:ident free) => {
        fn free(&self, ptr: $crate::backend::DevicePtr, size: usize) -> $crate::error::Result<()> {
            self.$up.free(ptr, size)
        }
    };
    (@ $up:ident mem_info) => {
        fn mem_info(&self) -> $crate::error::Result<(usize, usize)> { self.$up.mem_info() }
    };
    (@ $up:ident report_out_of_memory) => {
        fn report_out_of_memory(&self, requested: usize) { self.$up.report_out_of_memory(requested) }
    };
    (@ $up:ident synchronize) => {
        fn synchronize(&self) -> $crate::error::Result<()> { self.$up.synchronize() }
    };
    (@ $up:ident event_record) => {
        fn event_record(
            &self,
            stream: $crate::backend::Stream,
        ) -> $crate::error::Result<$crate::backend::Event> {
            self.$up.event_record(stream)
        }
    };
    (@ $up:ident event_done) => {
        fn event_done(&self, event: $crate::backend::Event) -> $crate::error::Result<bool> {
            self.$up.event_done(event)
        }
    };
    (@ $up:ident event_release) => {
        fn event_release(&self, event: $crate::backend::Event) { self.$up.event_release(event) }
    };
    (@ $up:ident stream_capture) => {
        fn stream_capture(
            &self,
            stream: $crate::backend::Stream,
        ) -> $crate::error::Result<$crate::backend::Capture> {
            self.$up.stream_capture(stream)
        }
    };
    (@ $up:ident exchange_capture_mode) => {
        fn exchange_capture_mode(
            &self,
            mode: $crate::backend::CaptureMode,
        ) -> $crate::error::Result<$crate::backend::CaptureMode> {
            self.$up.exchange_capture_mode(mode)
        }
    };
    (@ $up:ident lock_for_fork) => {
        fn lock_for_fork(&self) -> Option<Box<dyn $crate::backend::Held + '_>> {
            self.$up.lock_for_fork()
        }
    };
    (@ $up:ident vmm_granularity) => {
        fn vmm_granularity(&self) -> Option<usize> { self.$up.vmm_granularity() }
    };
    (@ $up:ident vmm_reserve) => {
        fn vmm_reserve(&self, size: usize) -> $crate::error::Result<$crate::backend::DevicePtr> {
            self.$up.vmm_reserve(size)
        }
    };
    (@ $up:ident vmm_release) => {
        fn vmm_release(
            &self,
            base: $crate::backend::DevicePtr,
            size: usize,
        ) -> $crate::error::Result<()> {
            self.$up.vmm_release(base, size)
        }
    };
    (@ $up:ident vmm_map) => {
        fn vmm_map(&self, ptr: $crate::backend::DevicePtr, size: usize) -> $crate::error::Result<()> {
            self.$up.vmm_map(ptr, size)
        }
    };
    (@ $up:ident vmm_unmap) => {
        fn vmm_unmap(
            &self,
            ptr: $crate::backend::DevicePtr,
            size: usize,
        ) -> $crate::error::Result<()> {
            self.$up.vmm_unmap(ptr, size)
        }
    };
    (@ $up:ident copy_d2d) => {
        fn copy_d2d(
            &self,
            dst: $crate::backend::DevicePtr,
            src: $crate::backend::DevicePtr,
            size: usize,
            stream: $crate::backend::Stream,
        ) -> $crate::error::Result<()> {
            self.$up.copy_d2d(dst, src, size, stream)
        }
    };
    (@ $up:ident copy_to_host) => {
        fn copy_to_host(
            &self,
            dst: &mut [u8],
            src: $crate::backend::DevicePtr,
        ) -> $crate::error::Result<()> {
            self.$up.copy_to_host(dst, src)
        }
    };
    (@ $up:ident copy_from_host) => {
        fn copy_from_host(
            &self,
            dst: $crate::backend::DevicePtr,
            src: &[u8],
        ) -> $crate::error::Result<()> {
            self.$up.copy_from_host(dst, src)
        }
    };
    (@ $up:ident copy_from_host_on) => {
        fn copy_from_host_on(
            &self,
            dst: $crate::backend::DevicePtr,
            src: &[u8],
            stream: $crate::backend::Stream,
        ) -> $crate::error::Result<()> {
            self.$up.copy_from_host_on(dst, src, stream)
        }
    };
    (@ $up:ident kv_append) => {
        fn kv_append(
            &self,
            src: $crate::backend::DevicePtr,
            ty: $crate::dtype::HbmType,
            dst: &$crate::backend::KvRows,
            stream: $crate::backend::Stream,
        ) -> $crate::error::Result<()> {
            self.$up.kv_append(src, ty, dst, stream)
        }
    };
    (@ $up:ident kv_dequantize) => {
        fn kv_dequantize(
            &self,
            src: &$crate::backend::KvRows,
            dst: $crate::backend::DevicePtr,
            ty: $crate::dtype::HbmType,
            stream: $crate::backend::Stream,
        ) -> $crate::error::Result<()> {
            self.$up.kv_dequantize(src, dst, ty, stream)
        }
    };
    (@ $up:ident kv_append_jobs) => {
        fn kv_append_jobs(
            &self,
            jobs: &[$crate::backend::AppendJob],
            device_jobs: $crate::backend::DevicePtr,
            src_type: $crate::dtype::HbmType,
            dst_type: $crate::dtype::HbmType,
            stream: $crate::backend::Stream,
        ) -> $crate::error::Result<()> {
            self.$up.kv_append_jobs(jobs, device_jobs, src_type, dst_type, stream)
        }
    };
    (@ $up:ident kv_dequantize_jobs) => {
        fn kv_dequantize_jobs(
            &self,
            jobs: &[$crate::backend::GatherJob],
            device_jobs: $crate::backend::DevicePtr,
            src_type: $crate::dtype::HbmType,
            dst_type: $crate::dtype::HbmType,
            stream: $crate::backend::Stream,
        ) -> $crate::error::Result<()> {
            self.$up.kv_dequantize_jobs(jobs, device_jobs, src_type, dst_type, stream)
        }
    };
    (@ $up:ident paged_decode_attention) => {
        fn paged_decode_attention(
            &self,
            a: &$crate::backend::DecodeAttention,
            stream: $crate::backend::Stream,
        ) -> $crate::error::Result<()> {
            self.$up.paged_decode_attention(a, stream)
        }
    };
}

pub mod cuda;

/// Devices a process may use (ordinals 0 to 63); every per-device table is this long.
pub const MAX_DEVICES: usize = 64;
pub mod fault;
pub mod limit;
pub mod reclaim;
pub mod sim;

#[cfg(test)]
mod forward_tests;

use crate::dtype::HbmType;
use crate::error::{Error, Result};
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

/// Whether a stream is being captured into a CUDA graph (`cuStreamIsCapturing`). While one is,
/// the driver refuses (and invalidates the capture for) the calls that would wait for or query
/// work: `cuEventQuery`, synchronizes, and in the default "global" mode `cuMemAlloc`/`cuMemFree`
/// too, from any thread whose mode is not relaxed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capture {
    None,
    Active,
    /// The capture was broken by an illegal call; it fails at its end.
    Invalidated,
}

/// A thread's stream-capture mode (`CUstreamCaptureMode`, the driver's numbers): which of its
/// calls a capture in progress forbids. `Relaxed` lets it allocate and free device memory.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureMode {
    Global = 0,
    ThreadLocal = 1,
    Relaxed = 2,
}

/// Runs `f` with the calling thread's capture mode relaxed, as PyTorch's own allocator does
/// around `cudaMalloc`, so that allocating or freeing a chunk while another stream captures does
/// not invalidate that capture. If the mode cannot be switched, `f` runs as it is.
pub fn relaxed<T>(backend: &(impl Backend + ?Sized), f: impl FnOnce() -> T) -> T {
    let previous = backend.exchange_capture_mode(CaptureMode::Relaxed).ok();
    let out = f();
    if let Some(mode) = previous {
        let _ = backend.exchange_capture_mode(mode);
    }
    out
}

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

    /// Told by a consumer that an allocation of `requested` bytes has failed as out of memory
    /// for good, after its own release-and-retry: an adaptor that refused it may say why, once
    /// (`limit::Limited`). Adaptors pass it on; the default does nothing.
    fn report_out_of_memory(&self, _requested: usize) {}

    /// Waits until all work queued on the device (in this process's context) has finished.
    fn synchronize(&self) -> Result<()>;

    /// Records an event on `stream`; it completes once the stream has passed this point.
    fn event_record(&self, stream: Stream) -> Result<Event>;

    /// Whether the event has completed; does not wait.
    fn event_done(&self, event: Event) -> Result<bool>;

    /// Gives an event back for reuse.
    fn event_release(&self, event: Event);

    /// Whether `stream` is being captured into a graph; does not wait, and is legal during a
    /// capture. The default, for a backend without graphs, is `Capture::None`.
    fn stream_capture(&self, _stream: Stream) -> Result<Capture> {
        Ok(Capture::None)
    }

    /// Sets the calling thread's capture mode; returns the one it replaces
    /// (`cuThreadExchangeStreamCaptureMode`). The default, without graphs, changes nothing.
    fn exchange_capture_mode(&self, _mode: CaptureMode) -> Result<CaptureMode> {
        Ok(CaptureMode::Global)
    }

    /// Holds the backend's own locks until dropped, for `fork` (`crate::runtime::fork`): a child must not
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

    /// Copies host memory to the device ordered on `stream`, so that work queued after it on
    /// that stream sees the bytes; `src` may be reused once the call returns (the driver stages
    /// pageable memory before returning). The default is the synchronous `copy_from_host`.
    fn copy_from_host_on(&self, dst: DevicePtr, src: &[u8], _stream: Stream) -> Result<()> {
        self.copy_from_host(dst, src)
    }

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

    /// Queues on `stream` every job's append (`AppendJob`); `jobs` is the host copy and
    /// `device_jobs` the same array in device memory, which a kernel reads. All jobs read
    /// `src_type` and write `dst_type`. Checked first; on an error nothing is queued. The
    /// default converts row by row through `kv_append` (the simulated device's CPU reference).
    fn kv_append_jobs(
        &self,
        jobs: &[AppendJob],
        _device_jobs: DevicePtr,
        src_type: HbmType,
        dst_type: HbmType,
        stream: Stream,
    ) -> Result<()> {
        check_append_jobs(jobs, src_type, dst_type)?;
        for j in jobs {
            let src_row = src_type
                .row_bytes(j.row_elems as usize)
                .ok_or(Error::InvalidValue("bad row"))?;
            for (i, p) in read_i32s(self, j.positions as DevicePtr, j.n_rows as usize)?
                .into_iter()
                .enumerate()
            {
                if p < 0 {
                    continue; // not stored, as the kernels' callers never pass
                }
                let dst = KvRows {
                    ptr: j.dst as usize + p as usize * j.dst_row_stride as usize,
                    ty: dst_type,
                    stride: j.dst_row_stride as usize,
                    row_elems: j.row_elems,
                    n_rows: 1,
                };
                self.kv_append(j.src as usize + i * src_row, src_type, &dst, stream)?;
            }
        }
        Ok(())
    }

    /// Queues on `stream` every job's conversion (`GatherJob`) from `src_type` tensors into
    /// `dst_type` (F32 or F16); `jobs` and `device_jobs` as in `kv_append_jobs`. The default
    /// goes through `kv_dequantize`, one call per job.
    fn kv_dequantize_jobs(
        &self,
        jobs: &[GatherJob],
        _device_jobs: DevicePtr,
        src_type: HbmType,
        dst_type: HbmType,
        stream: Stream,
    ) -> Result<()> {
        check_gather_jobs(jobs, src_type, dst_type)?;
        for j in jobs {
            let src = KvRows {
                ptr: j.src as usize,
                ty: src_type,
                stride: j.src_row_stride as usize,
                row_elems: j.row_elems,
                n_rows: j.n_rows,
            };
            if j.rows == 0 {
                self.kv_dequantize(&src, j.dst as usize, dst_type, stream)?;
                continue;
            }
            let dst_row = dst_type
                .row_bytes(j.row_elems as usize)
                .ok_or(Error::InvalidValue("bad row"))?;
            for (i, r) in read_i32s(self, j.rows as DevicePtr, j.n_rows as usize)?
                .into_iter()
                .enumerate()
            {
                let r = usize::try_from(r)
                    .map_err(|_| Error::InvalidValue("negative row in a gather"))?;
                let one = KvRows {
                    ptr: src.ptr + r * src.stride,
                    n_rows: 1,
                    ..src
                };
                self.kv_dequantize(&one, j.dst as usize + i * dst_row, dst_type, stream)?;
            }
        }
        Ok(())
    }

    /// Queues on `stream` the reference decode attention over a paged cache
    /// (`DecodeAttention`), checked first with `check_decode_attention`. The default computes it
    /// on the host through `copy_to_host` / `copy_from_host` (the simulated device): per query
    /// head, scores `q . k * scale` in f32 summed in element order, softmax (max subtracted),
    /// then the weighted sum of V, as `kernels/paged_kv.cu` does.
    fn paged_decode_attention(&self, a: &DecodeAttention, _stream: Stream) -> Result<()> {
        check_decode_attention(a)?;
        let n = a.n_seqs as usize;
        let (rows, lens) = (
            read_i32s(self, a.table_rows, n)?,
            read_i32s(self, a.lens, n)?,
        );
        let es = if a.kv_type == HbmType::F32 { 4 } else { 2 };
        let (dk, dv) = (a.head_dim_k as usize, a.head_dim_v as usize);
        let group = (a.n_heads / a.n_kv_heads) as usize;
        let bt = a.block_tokens as usize;
        let mut q_all = vec![0u8; n * a.n_heads as usize * dk * 4];
        self.copy_to_host(&mut q_all, a.q)?;
        let f32s = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|w| f32::from_ne_bytes(w.try_into().expect("4 bytes")))
                .collect()
        };
        let q_all = f32s(&q_all);
        let mut out = Vec::with_capacity(n * a.n_heads as usize * dv);
        for s in 0..n {
            let len = lens[s].max(0) as usize;
            let table = read_i32s(
                self,
                a.block_table + rows[s] as usize * a.table_stride as usize * 4,
                len.div_ceil(bt),
            )?;
            let slot = |t: usize| table[t / bt] as usize * bt + t % bt;
            let head = |base: DevicePtr, row: usize, kvh: usize, d: usize, t: usize| {
                let mut bytes = vec![0u8; d * es];
                self.copy_to_host(&mut bytes, base + slot(t) * row + kvh * d * es)?;
                let mut x = vec![0f32; d];
                crate::dtype::quant::dequantize_row(a.kv_type, &bytes, &mut x)?;
                Ok::<_, Error>(x)
            };
            for h in 0..a.n_heads as usize {
                let kvh = h / group;
                let q = &q_all[(s * a.n_heads as usize + h) * dk..][..dk];
                let mut p = Vec::with_capacity(len);
                for t in 0..len {
                    let k = head(a.k, a.k_row, kvh, dk, t)?;
                    let dot = q.iter().zip(&k).fold(0f32, |acc, (x, y)| acc + x * y);
                    p.push(dot * a.scale);
                }
                let m = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut l = 0f32;
                for x in &mut p {
                    *x = (*x - m).exp();
                    l += *x;
                }
                let mut acc = vec![0f32; dv];
                for (t, &w) in p.iter().enumerate() {
                    for (o, x) in acc.iter_mut().zip(head(a.v, a.v_row, kvh, dv, t)?) {
                        *o += w * x;
                    }
                }
                out.extend(acc.iter().map(|&x| if len > 0 { x / l } else { 0.0 }));
            }
        }
        let bytes: Vec<u8> = out.iter().flat_map(|x| x.to_ne_bytes()).collect();
        self.copy_from_host(a.out, &bytes)
    }
}

/// One tensor of a batched append (`Backend::kv_append_jobs`): `n_rows` contiguous F32/F16 rows
/// at `src`, row `i` written to row `positions[i]` (`int32`s in device memory) of the tensor at
/// `dst`, whose rows are `dst_row_stride` bytes apart. The layout of `hbm_append_job` in
/// `kernels/paged_kv.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppendJob {
    pub src: u64,
    pub dst: u64,
    pub positions: u64,
    pub dst_row_stride: u64,
    pub row_elems: u32,
    pub n_rows: u32,
}

/// One tensor of a batched gather (`Backend::kv_dequantize_jobs`): `n_rows` rows of the tensor
/// at `src` (`src_row_stride` bytes apart) converted into contiguous rows at `dst`, output row
/// `i` from tensor row `rows[i]` (`int32`s in device memory, each non-negative: a paged cache's
/// slots), or from row `i` when `rows` is 0. The layout of `hbm_gather_job` in
/// `kernels/paged_kv.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatherJob {
    pub src: u64,
    pub src_row_stride: u64,
    pub dst: u64,
    pub rows: u64,
    pub row_elems: u32,
    pub n_rows: u32,
}

/// Decode attention over a paged cache (`Backend::paged_decode_attention`), one query token per
/// sequence. All pointers are device memory. `q`: `f32 [n_seqs, n_heads, head_dim_k]`; `out`:
/// `f32 [n_seqs, n_heads, head_dim_v]`; `table_rows[i]` is the block-table row of query `i` and
/// `lens[i]` its tokens (`int32`s); K and V rows of token `o` of block `b` at
/// `k + (b * block_tokens + o) * k_row` (V likewise), query head `h` reading KV head
/// `h / (n_heads / n_kv_heads)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeAttention {
    pub q: DevicePtr,
    pub out: DevicePtr,
    pub k: DevicePtr,
    pub v: DevicePtr,
    pub kv_type: HbmType,
    pub k_row: usize,
    pub v_row: usize,
    pub block_table: DevicePtr,
    pub table_stride: u32,
    pub table_rows: DevicePtr,
    pub lens: DevicePtr,
    pub max_len: u32,
    pub n_seqs: u32,
    pub block_tokens: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim_k: u32,
    pub head_dim_v: u32,
    pub scale: f32,
}

/// Reads `n` `int32`s from device memory.
fn read_i32s(b: &(impl Backend + ?Sized), ptr: DevicePtr, n: usize) -> Result<Vec<i32>> {
    let mut bytes = vec![0u8; n * 4];
    b.copy_to_host(&mut bytes, ptr)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|w| i32::from_ne_bytes(w.try_into().expect("4 bytes")))
        .collect())
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

/// What every backend checks before `kv_append_jobs`: each job's source rows and destination
/// rows as `check_kv_io` wants them (the destination checked as one row at its base: positions
/// are device data, bounded by the caller), and a non-NULL position array.
pub fn check_append_jobs(jobs: &[AppendJob], src_type: HbmType, dst_type: HbmType) -> Result<()> {
    for j in jobs {
        let plain = KvRows::contiguous(j.src as usize, src_type, j.row_elems, j.n_rows)?;
        let cache = KvRows {
            ptr: j.dst as usize,
            ty: dst_type,
            stride: j.dst_row_stride as usize,
            row_elems: j.row_elems,
            n_rows: j.n_rows,
        };
        check_kv_io(&plain, &cache)?;
        if j.positions == 0 && j.n_rows > 0 {
            return Err(Error::InvalidValue("NULL positions"));
        }
    }
    Ok(())
}

/// What every backend checks before `kv_dequantize_jobs`: each job as `check_kv_io` wants it
/// (its row list is device data, bounded by the caller).
pub fn check_gather_jobs(jobs: &[GatherJob], src_type: HbmType, dst_type: HbmType) -> Result<()> {
    for j in jobs {
        let plain = KvRows::contiguous(j.dst as usize, dst_type, j.row_elems, j.n_rows)?;
        let cache = KvRows {
            ptr: j.src as usize,
            ty: src_type,
            stride: j.src_row_stride as usize,
            row_elems: j.row_elems,
            n_rows: j.n_rows,
        };
        check_kv_io(&plain, &cache)?;
    }
    Ok(())
}

/// What every backend checks before `paged_decode_attention`: an F32, F16 or BF16 cache, query
/// heads a multiple of KV heads, non-zero head sizes and block size, at most 65535 queries and
/// query heads, sequences short enough for the kernel's shared memory (`max_len + head_dim_k`
/// floats in 48 KiB), and no NULL operand.
pub fn check_decode_attention(a: &DecodeAttention) -> Result<()> {
    if !matches!(a.kv_type, HbmType::F32 | HbmType::F16 | HbmType::BF16) {
        return Err(Error::InvalidValue(
            "paged attention reads F32, F16 or BF16 caches (gather quantized ones first)",
        ));
    }
    if a.n_kv_heads == 0
        || a.n_heads == 0
        || a.n_heads % a.n_kv_heads != 0
        || a.n_heads > 65535
        || a.head_dim_k == 0
        || a.head_dim_v == 0
        || a.block_tokens == 0
        || a.n_seqs > 65535
    {
        return Err(Error::InvalidValue("attention shape"));
    }
    if (a.head_dim_k as usize + a.max_len as usize) * 4 > 48 << 10 {
        return Err(Error::InvalidValue(
            "sequence too long for the reference attention kernel",
        ));
    }
    if a.n_seqs > 0 && (a.q == 0 || a.out == 0 || a.table_rows == 0 || a.lens == 0) {
        return Err(Error::InvalidValue("NULL attention operand"));
    }
    Ok(())
}
