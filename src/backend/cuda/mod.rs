//! The CUDA backend: device memory straight from the driver API (`cudarc::driver::sys`, loaded at
//! run time, so neither the build nor a machine without a GPU needs CUDA).
//!
//! One `CudaBackend` serves one device through that device's *primary* context, the context the
//! CUDA runtime uses, so every pointer handed out is valid for runtime calls (`cudaMemcpy`, kernels
//! launched through the runtime) as well. Reserve-and-commit (VMM) lives in `vmm.rs`; pinned
//! host memory, for the pool behind `cudaMallocHost`, in `host.rs`.
//!
//! Every call here is a driver call of its own: pools call the backend only on their slow paths.

mod host;
pub mod kernels;
mod vmm;

pub use host::PinnedHostBackend;

use super::{
    check_append_jobs, check_gather_jobs, check_kv_io, AppendJob, Backend, Capture, CaptureMode,
    DecodeAttention, DevicePtr, Event, GatherJob, KvRows, Stream,
};
use crate::dtype::HbmType;
use crate::error::{Error, Result};
use cudarc::driver::sys::{self, CUcontext, CUdevice, CUdeviceptr, CUevent, CUresult, CUstream};
use kernels::KvKernels;
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::Mutex;

/// A backend for one CUDA device.
///
/// Cost: every method is one to three driver calls, plus `cuCtxGetCurrent` (tens of ns) to check
/// the calling thread's context. Methods may be called from any thread; each makes the device's
/// primary context current for the duration of the call and then restores whatever context the
/// thread had (see `bind`).
///
/// There is deliberately no `Drop`: backends live in process-wide statics and go away at exit,
/// when the driver may already have been torn down, and a driver call then can crash the host
/// program. So the retained primary context, the idle events and any memory still allocated are
/// left to the driver, which reclaims all of them when the process ends. A backend dropped earlier
/// (only tests do that) leaks its idle events and one primary-context reference; nothing else.
pub struct CudaBackend {
    device: i32,
    dev: CUdevice,
    /// The device's primary context, retained once in `new` and never released (see above).
    ctx: CUcontext,
    /// Events created earlier and given back: `event_record` reuses them rather than paying for
    /// `cuEventCreate` each time.
    idle_events: Mutex<Vec<CUevent>>,
    vmm: vmm::Vmm,
}

// SAFETY: `ctx` and the events are opaque driver handles that this type never dereferences. The
// driver API is thread-safe: a context may be current on any number of threads at once, and its
// events may be recorded and queried from any of them. The event list sits behind a mutex.
unsafe impl Send for CudaBackend {}
// SAFETY: as for `Send`; no method hands out `&mut` access to shared state without the mutex.
unsafe impl Sync for CudaBackend {}

/// Device count found by the first probe (0 when there is no usable driver); before that
/// `UNPROBED`, or, while a thread probes, minus the pid of its process. Not a once-cell: the
/// probe runs outside the set-up lock that a fork waits for (`process::init`: the driver's
/// initialisation may fork, register fork handlers or unload a library, each of which waits for
/// a fork in progress before glibc 2.36), so a child may be forked mid-probe and must not wait
/// for it.
static DEVICE_COUNT: AtomicI32 = AtomicI32::new(UNPROBED);
const UNPROBED: i32 = i32::MIN;

/// Primary context of each device with a backend, as an address (0 = none yet): lets
/// `current_device` name the thread's device without a driver call beyond `cuCtxGetCurrent`.
static PRIMARY_CONTEXTS: [AtomicUsize; crate::backend::MAX_DEVICES] =
    [const { AtomicUsize::new(0) }; crate::backend::MAX_DEVICES];

/// Loads and initialises the driver and counts its devices; 0 on any failure, never a panic.
fn probe_device_count() -> i32 {
    // SAFETY: loading libcuda runs its initialisers, which is what using CUDA means; the probe
    // opens the library and closes it again, touching nothing of ours.
    if !unsafe { sys::is_culib_present() } {
        // cudarc panics on the first call into a library it cannot load: stop here.
        return 0;
    }
    // cudarc also panics when a symbol is missing (a driver far older than the one it was built
    // for); that is a driver we cannot use, not a reason to take the host program down.
    std::panic::catch_unwind(|| {
        // SAFETY: cuInit takes flags (must be 0) and may be called any number of times.
        if unsafe { sys::cuInit(0) } != CUresult::CUDA_SUCCESS {
            return 0;
        }
        let mut count = 0;
        // SAFETY: `count` is a valid out-parameter for the duration of the call.
        match unsafe { sys::cuDeviceGetCount(&mut count) } {
            CUresult::CUDA_SUCCESS => count.max(0),
            _ => 0,
        }
    })
    .unwrap_or(0)
}

#[cold]
fn device_count_slow() -> i32 {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    loop {
        match DEVICE_COUNT.load(Ordering::Acquire) {
            n if n >= 0 => return n,
            // Another thread of this process probes: the driver takes its time.
            n if n == -me => std::thread::sleep(std::time::Duration::from_micros(100)),
            UNPROBED => {
                let won = DEVICE_COUNT
                    .compare_exchange(UNPROBED, -me, Ordering::Acquire, Ordering::Acquire)
                    .is_ok();
                if won {
                    let n = probe_device_count();
                    DEVICE_COUNT.store(n, Ordering::Release);
                    return n;
                }
            }
            // A forked child of a process that was probing: the driver was being initialised at
            // the fork, and does not survive it. No device.
            n => {
                let _ = DEVICE_COUNT.compare_exchange(n, 0, Ordering::AcqRel, Ordering::Acquire);
            }
        }
    }
}

/// `Err(Error::Driver)` unless the call succeeded.
fn check(call: &'static str, rc: CUresult) -> Result<()> {
    match rc {
        CUresult::CUDA_SUCCESS => Ok(()),
        _ => Err(Error::Driver {
            call,
            code: rc as i32,
        }),
    }
}

/// As `check`, but running out of device memory is `Error::OutOfMemory { requested }`.
fn check_alloc(call: &'static str, rc: CUresult, requested: usize) -> Result<()> {
    match rc {
        CUresult::CUDA_ERROR_OUT_OF_MEMORY => Err(Error::OutOfMemory { requested }),
        _ => check(call, rc),
    }
}

/// While alive, the backend's context is current on this thread; dropping it puts back the
/// context the thread had before, if `bind` had to switch. Not `Send`: it is about one thread.
struct Bound {
    /// The context to restore (possibly null: no context), or `None` when nothing was switched.
    prev: Option<CUcontext>,
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Some(prev) = self.prev {
            // SAFETY: `prev` was current on this thread when `bind` ran (or is null, which leaves
            // the thread without a context), and nothing in between could destroy it: only the
            // backend's own driver calls ran. A failure cannot be reported from here and leaves
            // the backend's context current, which the caller's next runtime call tolerates.
            let _ = unsafe { sys::cuCtxSetCurrent(prev) };
        }
    }
}

impl CudaBackend {
    /// Whether libcuda loads, initialises and reports at least one device. Probed once, cached;
    /// false (never a panic) on a machine without the driver.
    pub fn available() -> bool {
        Self::device_count() > 0
    }

    /// Whether the driver library (`libcuda.so.1`) can be loaded at all.
    pub fn driver_present() -> bool {
        // SAFETY: opens and closes the library; touches nothing of ours.
        unsafe { sys::is_culib_present() }
    }

    /// Number of CUDA devices (0 when the driver is absent or fails to initialise). Cached.
    pub fn device_count() -> i32 {
        match DEVICE_COUNT.load(Ordering::Acquire) {
            n if n >= 0 => n,
            _ => device_count_slow(),
        }
    }

    /// The device the CUDA runtime considers current on this thread: the device of the thread's
    /// current context, or 0 when it has none (the runtime's default). One `cuCtxGetCurrent`, plus
    /// `cuCtxGetDevice` only for a context that is no device's primary context.
    pub fn current_device() -> i32 {
        if Self::device_count() == 0 {
            return 0;
        }
        let mut current: CUcontext = std::ptr::null_mut();
        // SAFETY: `current` is a valid out-parameter; the driver is loaded (device count > 0).
        if unsafe { sys::cuCtxGetCurrent(&mut current) } != CUresult::CUDA_SUCCESS
            || current.is_null()
        {
            return 0;
        }
        for (device, ctx) in PRIMARY_CONTEXTS.iter().enumerate() {
            if ctx.load(Ordering::Acquire) == current as usize {
                return device as i32;
            }
        }
        let mut device: CUdevice = 0;
        // SAFETY: a context is current on this thread (checked above); `device` is valid.
        match unsafe { sys::cuCtxGetDevice(&mut device) } {
            CUresult::CUDA_SUCCESS => device,
            _ => 0,
        }
    }

    /// The thread's current context and its device, or `None` without a driver or a context.
    /// For the driver-API hooks, which serve only a primary context's allocations.
    pub fn current_context() -> Option<(usize, i32)> {
        if Self::device_count() == 0 {
            return None;
        }
        let mut current: CUcontext = std::ptr::null_mut();
        // SAFETY: `current` is a valid out-parameter; the driver is loaded (device count > 0).
        if unsafe { sys::cuCtxGetCurrent(&mut current) } != CUresult::CUDA_SUCCESS
            || current.is_null()
        {
            return None;
        }
        let mut device: CUdevice = 0;
        // SAFETY: a context is current on this thread (checked above); `device` is valid.
        match unsafe { sys::cuCtxGetDevice(&mut device) } {
            CUresult::CUDA_SUCCESS => Some((current as usize, device)),
            _ => None,
        }
    }

    /// The primary context of `device` as its backend retained it; `None` while no backend for
    /// `device` exists.
    pub fn known_primary_context(device: i32) -> Option<usize> {
        let ctx = PRIMARY_CONTEXTS
            .get(device as usize)?
            .load(Ordering::Acquire);
        (ctx != 0).then_some(ctx)
    }

    /// Whether `device`'s primary context exists (is active) now; asking creates nothing.
    pub fn primary_context_active(device: i32) -> bool {
        if device < 0 || device >= Self::device_count() {
            return false;
        }
        let (mut flags, mut active) = (0, 0);
        // SAFETY: the driver is initialised (device_count > 0); valid out-parameters. A device
        // ordinal is its `CUdevice` handle, as `cuDeviceGet` returns it.
        let rc = unsafe { sys::cuDevicePrimaryCtxGetState(device, &mut flags, &mut active) };
        rc == CUresult::CUDA_SUCCESS && active != 0
    }

    /// A backend for `device`, using that device's primary context (the runtime's context).
    ///
    /// `Error::InvalidDevice` when there is no such device, or no driver at all.
    pub fn new(device: i32) -> Result<CudaBackend> {
        // Also what keeps us from touching cudarc when libcuda is missing: the count is then 0.
        if device < 0 || device >= Self::device_count() {
            return Err(Error::InvalidDevice(device));
        }
        let mut dev: CUdevice = 0;
        // SAFETY: the driver is initialised (device_count > 0); `dev` is a valid out-parameter.
        check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut dev, device) })?;
        let mut ctx: CUcontext = std::ptr::null_mut();
        // SAFETY: `dev` came from cuDeviceGet; `ctx` is a valid out-parameter. Retaining the
        // primary context creates it if the runtime has not yet, exactly as the runtime would.
        check("cuDevicePrimaryCtxRetain", unsafe {
            sys::cuDevicePrimaryCtxRetain(&mut ctx, dev)
        })?;
        if let Some(slot) = PRIMARY_CONTEXTS.get(device as usize) {
            slot.store(ctx as usize, Ordering::Release);
        }
        Ok(CudaBackend {
            device,
            dev,
            ctx,
            idle_events: Mutex::new(Vec::new()),
            vmm: vmm::Vmm::new(dev, device),
        })
    }

    /// Makes this backend's context current on the calling thread until the guard drops.
    ///
    /// The common case, a thread already in this context, costs one `cuCtxGetCurrent`. Otherwise
    /// the context is switched and switched back afterwards: the runtime takes the current
    /// context as the current device, so leaving ours behind would silently move an application
    /// thread that had called `cudaSetDevice(1)` onto this device.
    fn bind(&self) -> Result<Bound> {
        let mut current: CUcontext = std::ptr::null_mut();
        // SAFETY: `current` is a valid out-parameter.
        check("cuCtxGetCurrent", unsafe {
            sys::cuCtxGetCurrent(&mut current)
        })?;
        if current == self.ctx {
            return Ok(Bound { prev: None });
        }
        if current.is_null() && self.device == 0 {
            // A thread without a context is on device 0 as far as the runtime is concerned, and
            // the runtime would make device 0's primary context current on its first call there.
            // Leaving it current saves two context switches on every later call of this thread.
            // SAFETY: as below.
            check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.ctx) })?;
            return Ok(Bound { prev: None });
        }
        // SAFETY: `self.ctx` is a primary context this backend holds a reference to, so it is
        // alive; making it current affects only the calling thread, and `Bound` restores it.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.ctx) })?;
        Ok(Bound {
            prev: Some(current),
        })
    }

    /// The KV kernels loaded into this context (compiled by NVRTC for this device's compute
    /// capability on first use). The caller has bound the context.
    fn kv_kernels(&self) -> Result<&'static KvKernels> {
        KvKernels::for_device(self.device, || {
            let attr = |a: sys::CUdevice_attribute| {
                let mut v = 0;
                // SAFETY: `self.dev` came from cuDeviceGet; `v` is a valid out-parameter.
                check("cuDeviceGetAttribute", unsafe {
                    sys::cuDeviceGetAttribute(&mut v, a, self.dev)
                })
                .map(|_| v)
            };
            let major =
                attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
            let minor =
                attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
            Ok(format!("compute_{major}{minor}"))
        })
    }

    /// An event of this context for `event_record`: a reused one, or a fresh one.
    fn take_event(&self) -> Result<CUevent> {
        let idle = self
            .idle_events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        if let Some(event) = idle {
            return Ok(event);
        }
        let mut event: CUevent = std::ptr::null_mut();
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        // SAFETY: the caller has bound this context; `event` is a valid out-parameter. Events
        // without timing are the cheap kind, and all a pool needs to know is "has it passed".
        check("cuEventCreate", unsafe {
            sys::cuEventCreate(&mut event, flags)
        })?;
        Ok(event)
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn device(&self) -> i32 {
        self.device
    }

    fn alloc(&self, size: usize) -> Result<DevicePtr> {
        if size == 0 {
            return Err(Error::InvalidValue("zero-byte backend allocation"));
        }
        let _bound = self.bind()?;
        let mut ptr: CUdeviceptr = 0;
        // SAFETY: this context is current; `ptr` is a valid out-parameter. cuMemAlloc returns
        // memory aligned to at least 256 bytes, as the trait promises.
        let rc = unsafe { sys::cuMemAlloc_v2(&mut ptr, size) };
        check_alloc("cuMemAlloc_v2", rc, size)?;
        Ok(ptr as DevicePtr)
    }

    fn free(&self, ptr: DevicePtr, _size: usize) -> Result<()> {
        let _bound = self.bind()?;
        // SAFETY: this context is current. The driver checks `ptr` itself: a pointer it never
        // handed out, or an interior one, is refused with CUDA_ERROR_INVALID_VALUE.
        match unsafe { sys::cuMemFree_v2(ptr as CUdeviceptr) } {
            // The simulated backend's answer for the same mistake, so both read alike above.
            CUresult::CUDA_ERROR_INVALID_VALUE => Err(Error::UnknownPointer(ptr)),
            rc => check("cuMemFree_v2", rc),
        }
    }

    fn mem_info(&self) -> Result<(usize, usize)> {
        let _bound = self.bind()?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: this context is current; both out-parameters are valid.
        check("cuMemGetInfo_v2", unsafe {
            sys::cuMemGetInfo_v2(&mut free, &mut total)
        })?;
        Ok((free, total))
    }

    fn synchronize(&self) -> Result<()> {
        let _bound = self.bind()?;
        // SAFETY: this context is current; the call only waits.
        check("cuCtxSynchronize", unsafe { sys::cuCtxSynchronize() })
    }

    fn event_record(&self, stream: Stream) -> Result<Event> {
        let _bound = self.bind()?;
        let event = self.take_event()?;
        // SAFETY: `event` belongs to this context, which is current. `stream` is a
        // `cudaStream_t` from the caller (the trait's contract), the same handle as a `CUstream`;
        // 0 and the runtime's special handles (legacy, per-thread) mean the same to the driver.
        let rc = unsafe { sys::cuEventRecord(event, stream as CUstream) };
        if let Err(e) = check("cuEventRecord", rc) {
            self.event_release(event as Event);
            return Err(e);
        }
        Ok(event as Event)
    }

    fn event_done(&self, event: Event) -> Result<bool> {
        let _bound = self.bind()?;
        // SAFETY: `event` is a handle `event_record` gave out and the caller has not released
        // (the trait's contract); querying does not wait.
        match unsafe { sys::cuEventQuery(event as CUevent) } {
            CUresult::CUDA_SUCCESS => Ok(true),
            CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            rc => Err(Error::Driver {
                call: "cuEventQuery",
                code: rc as i32,
            }),
        }
    }

    fn event_release(&self, event: Event) {
        // Kept, not destroyed: the next `event_record` re-records it, which the driver allows
        // even while an earlier record is pending. Never-given-out 0 is ignored.
        if event != 0 {
            self.idle_events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(event as CUevent);
        }
    }

    fn stream_capture(&self, stream: Stream) -> Result<Capture> {
        // The legacy default stream (0, 1) cannot be captured, and asking about it while a
        // blocking stream captures is itself an illegal implicit synchronization: never ask.
        if stream <= 1 {
            return Ok(Capture::None);
        }
        let _bound = self.bind()?;
        let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // SAFETY: `stream` is the caller's `cudaStream_t` (see `event_record`); `status` is a
        // valid out-parameter. The query is legal during a capture and does not wait.
        check("cuStreamIsCapturing", unsafe {
            sys::cuStreamIsCapturing(stream as CUstream, &mut status)
        })?;
        Ok(match status {
            sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE => Capture::None,
            sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE => Capture::Active,
            _ => Capture::Invalidated,
        })
    }

    fn exchange_capture_mode(&self, mode: CaptureMode) -> Result<CaptureMode> {
        let mut m = match mode {
            CaptureMode::Global => sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL,
            CaptureMode::ThreadLocal => {
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
            }
            CaptureMode::Relaxed => sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
        };
        // SAFETY: `m` is a valid in/out parameter; the mode is the calling thread's alone and
        // needs no context.
        check("cuThreadExchangeStreamCaptureMode", unsafe {
            sys::cuThreadExchangeStreamCaptureMode(&mut m)
        })?;
        Ok(match m {
            sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL => CaptureMode::Global,
            sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL => {
                CaptureMode::ThreadLocal
            }
            _ => CaptureMode::Relaxed,
        })
    }

    fn vmm_granularity(&self) -> Option<usize> {
        if let Some(known) = self.vmm.granularity_if_known() {
            return known;
        }
        // Not cached when binding fails: that says nothing about the device.
        let _bound = self.bind().ok()?;
        self.vmm.granularity()
    }

    fn vmm_reserve(&self, size: usize) -> Result<DevicePtr> {
        let _bound = self.bind()?;
        self.vmm.reserve(size)
    }

    fn vmm_release(&self, base: DevicePtr, size: usize) -> Result<()> {
        let _bound = self.bind()?;
        self.vmm.release(base, size)
    }

    fn vmm_map(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        let _bound = self.bind()?;
        self.vmm.map(ptr, size)
    }

    fn vmm_unmap(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        let _bound = self.bind()?;
        self.vmm.unmap(ptr, size)
    }

    fn copy_d2d(&self, dst: DevicePtr, src: DevicePtr, size: usize, stream: Stream) -> Result<()> {
        if size == 0 {
            return Ok(());
        }
        let _bound = self.bind()?;
        // SAFETY: this context is current; the driver checks that both ranges are device
        // memory, and `stream` is the caller's `cudaStream_t` (see `event_record`).
        let rc = unsafe {
            sys::cuMemcpyDtoDAsync_v2(
                dst as CUdeviceptr,
                src as CUdeviceptr,
                size,
                stream as CUstream,
            )
        };
        check("cuMemcpyDtoDAsync_v2", rc)
    }

    fn copy_to_host(&self, dst: &mut [u8], src: DevicePtr) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        let _bound = self.bind()?;
        // SAFETY: this context is current; `dst` is a writable host buffer of exactly the length
        // passed, borrowed mutably for the whole (synchronous) copy.
        let rc =
            unsafe { sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), src as CUdeviceptr, dst.len()) };
        check("cuMemcpyDtoH_v2", rc)
    }

    fn copy_from_host(&self, dst: DevicePtr, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        let _bound = self.bind()?;
        // SAFETY: this context is current; `src` is a readable host buffer of exactly the length
        // passed, borrowed for the whole (synchronous) copy.
        let rc =
            unsafe { sys::cuMemcpyHtoD_v2(dst as CUdeviceptr, src.as_ptr().cast(), src.len()) };
        check("cuMemcpyHtoD_v2", rc)
    }

    fn copy_from_host_on(&self, dst: DevicePtr, src: &[u8], stream: Stream) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        let _bound = self.bind()?;
        // SAFETY: this context is current; `src` is a readable host buffer of exactly the length
        // passed. It is pageable (not registered), so the driver stages it before returning and
        // the borrow may end with the call; the copy itself is ordered on the caller's stream.
        let rc = unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                dst as CUdeviceptr,
                src.as_ptr().cast(),
                src.len(),
                stream as CUstream,
            )
        };
        check("cuMemcpyHtoDAsync_v2", rc)
    }

    fn kv_append(
        &self,
        src: DevicePtr,
        src_type: HbmType,
        dst: &KvRows,
        stream: Stream,
    ) -> Result<()> {
        check_kv_io(
            &KvRows::contiguous(src, src_type, dst.row_elems, dst.n_rows)?,
            dst,
        )?;
        let _bound = self.bind()?;
        self.kv_kernels()?.launch_append(
            src,
            src_type,
            dst.ptr,
            dst.ty,
            dst.stride,
            dst.row_elems,
            0,
            0,
            dst.n_rows,
            stream,
        )
    }

    fn kv_dequantize(
        &self,
        src: &KvRows,
        dst: DevicePtr,
        dst_type: HbmType,
        stream: Stream,
    ) -> Result<()> {
        check_kv_io(
            &KvRows::contiguous(dst, dst_type, src.row_elems, src.n_rows)?,
            src,
        )?;
        let _bound = self.bind()?;
        self.kv_kernels()?.launch_dequantize(
            src.ptr,
            src.ty,
            src.stride,
            0,
            src.n_rows,
            src.row_elems,
            dst,
            dst_type,
            stream,
        )
    }

    fn kv_append_jobs(
        &self,
        jobs: &[AppendJob],
        device_jobs: DevicePtr,
        src_type: HbmType,
        dst_type: HbmType,
        stream: Stream,
    ) -> Result<()> {
        check_append_jobs(jobs, src_type, dst_type)?;
        let _bound = self.bind()?;
        self.kv_kernels()?
            .launch_append_jobs(jobs, device_jobs, src_type, dst_type, stream)
    }

    fn kv_dequantize_jobs(
        &self,
        jobs: &[GatherJob],
        device_jobs: DevicePtr,
        src_type: HbmType,
        dst_type: HbmType,
        stream: Stream,
    ) -> Result<()> {
        check_gather_jobs(jobs, src_type, dst_type)?;
        let _bound = self.bind()?;
        self.kv_kernels()?
            .launch_gather_jobs(jobs, device_jobs, src_type, dst_type, stream)
    }

    fn paged_decode_attention(&self, a: &DecodeAttention, stream: Stream) -> Result<()> {
        let _bound = self.bind()?;
        self.kv_kernels()?.launch_decode_attention(a, stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A child forked while another thread probed the driver answers "no device" at once,
    /// rather than waiting for a probe no thread of it runs (the parent's pid stands in the
    /// state; in a child process of the test binary, which owns its `DEVICE_COUNT`).
    #[test]
    fn a_probe_begun_before_fork_is_not_waited_for() {
        if !crate::test_child::is_child() {
            let text = crate::test_child::run_with_env(
                "backend::cuda::tests::a_probe_begun_before_fork_is_not_waited_for",
                Some("backend:sim"),
                &[],
                std::time::Duration::from_secs(60),
            );
            assert!(text.contains("child checks passed"), "{text}");
            return;
        }
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getppid() };
        DEVICE_COUNT.store(-parent, Ordering::Release);
        assert_eq!(CudaBackend::device_count(), 0);
        assert!(!CudaBackend::available());
        println!("child checks passed");
    }

    #[test]
    fn driver_results_map_to_errors() {
        assert_eq!(check("x", CUresult::CUDA_SUCCESS), Ok(()));
        assert_eq!(
            check("cuMemFree_v2", CUresult::CUDA_ERROR_INVALID_VALUE),
            Err(Error::Driver {
                call: "cuMemFree_v2",
                code: 1
            })
        );
        assert_eq!(
            check_alloc("cuMemAlloc_v2", CUresult::CUDA_ERROR_OUT_OF_MEMORY, 1 << 50),
            Err(Error::OutOfMemory { requested: 1 << 50 })
        );
        assert_eq!(
            check_alloc("cuMemCreate", CUresult::CUDA_ERROR_INVALID_VALUE, 7),
            Err(Error::Driver {
                call: "cuMemCreate",
                code: 1
            })
        );
    }
}
