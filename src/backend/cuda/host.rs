//! Pinned (page-locked) host memory from the driver: the backend of the pool behind
//! `cudaMallocHost` and `cudaHostAlloc`.
//!
//! Every chunk is `cuMemHostAlloc(PORTABLE | DEVICEMAP)`: usable from every context and device,
//! and mapped into the device address space, which is what `cudaMallocHost`,
//! `cudaHostAllocDefault`, `cudaHostAllocPortable` and `cudaHostAllocMapped` promise, all at
//! once, so one pool serves them all. (Write-combined memory is not pooled: it reads slowly from
//! the CPU, so the drop-in hands those requests to the runtime.)
//!
//! A chunk is allocated in the primary context of the calling thread's device (the context the
//! runtime would use) and freed through the same one.
//!
//! A pinned block may feed a copy on any device, so `synchronize` waits for every device whose
//! primary context is active: a pool that reuses a freed block after it cannot hand out memory
//! that a copy queued before the free, on any device, still reads. Contexts the program made
//! itself with the driver API (`cuCtxCreate`) are not seen; the runtime API never makes those.

use super::{check, check_alloc, CudaBackend};
use crate::backend::MAX_DEVICES;
use crate::backend::{host_memory, Backend, DevicePtr, Event, Stream, HOST_DEVICE};
use crate::error::{Error, Result};
use cudarc::driver::sys::{self, CUdevice, CUresult};
use once_cell::sync::OnceCell;
use std::collections::HashMap;
use std::ffi::{c_int, c_uint, c_void};
use std::sync::Mutex;

/// Pinned host memory through the driver, for every device of the process.
///
/// Cost: `alloc` and `free` are one driver call each (pinning pages is slow: milliseconds for
/// large chunks, which is why a pool sits above this); `synchronize` is one
/// `cuDevicePrimaryCtxGetState` per device plus one `cuCtxSynchronize` per active device.
pub struct PinnedHostBackend {
    /// One `CudaBackend` per device that a chunk was allocated on or that was synchronized: its
    /// primary context, retained once and never released (see `CudaBackend`'s doc on exit).
    devices: [OnceCell<CudaBackend>; MAX_DEVICES],
    /// Chunk base -> the device whose context allocated it, so the free goes through it too.
    chunks: Mutex<HashMap<DevicePtr, i32>>,
}

impl PinnedHostBackend {
    /// The backend, or `Error::InvalidDevice` when there is no driver or no device.
    pub fn new() -> Result<PinnedHostBackend> {
        if !CudaBackend::available() {
            return Err(Error::InvalidDevice(HOST_DEVICE));
        }
        Ok(PinnedHostBackend {
            devices: [const { OnceCell::new() }; MAX_DEVICES],
            chunks: Mutex::new(HashMap::new()),
        })
    }

    fn device_backend(&self, device: i32) -> Result<&CudaBackend> {
        let slot = usize::try_from(device)
            .ok()
            .and_then(|d| self.devices.get(d))
            .ok_or(Error::InvalidDevice(device))?;
        slot.get_or_try_init(|| CudaBackend::new(device))
    }

    /// Whether `device`'s primary context exists now (created by the runtime or by a pool), so
    /// that synchronizing never creates a context on a device the program does not use.
    fn primary_context_active(device: i32) -> Result<bool> {
        let mut dev: CUdevice = 0;
        // SAFETY: the driver is initialised (`new` checked a device exists); `dev` is a valid
        // out-parameter.
        check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut dev, device) })?;
        let (mut flags, mut active): (c_uint, c_int) = (0, 0);
        // SAFETY: `dev` came from cuDeviceGet; both out-parameters are valid. The query creates
        // nothing.
        check("cuDevicePrimaryCtxGetState", unsafe {
            sys::cuDevicePrimaryCtxGetState(dev, &mut flags, &mut active)
        })?;
        Ok(active != 0)
    }

    fn lock_chunks(&self) -> std::sync::MutexGuard<'_, HashMap<DevicePtr, i32>> {
        self.chunks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Backend for PinnedHostBackend {
    fn name(&self) -> &'static str {
        "cuda pinned host"
    }

    fn device(&self) -> i32 {
        HOST_DEVICE
    }

    fn alloc(&self, size: usize) -> Result<DevicePtr> {
        if size == 0 {
            return Err(Error::InvalidValue("zero-byte backend allocation"));
        }
        let device = CudaBackend::current_device();
        let _bound = self.device_backend(device)?.bind()?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
        // SAFETY: the device's primary context is current; `ptr` is a valid out-parameter. The
        // driver returns page-aligned memory (more than the trait's 256 bytes).
        let rc = unsafe { sys::cuMemHostAlloc(&mut ptr, size, flags) };
        check_alloc("cuMemHostAlloc", rc, size)?;
        self.lock_chunks().insert(ptr as DevicePtr, device);
        Ok(ptr as DevicePtr)
    }

    fn free(&self, ptr: DevicePtr, _size: usize) -> Result<()> {
        let known = self.lock_chunks().remove(&ptr);
        let device = known.unwrap_or_else(CudaBackend::current_device);
        let _bound = self.device_backend(device)?.bind()?;
        // SAFETY: a context is current; the driver checks `ptr` itself and refuses a pointer
        // that `cuMemHostAlloc` did not return.
        match unsafe { sys::cuMemFreeHost(ptr as *mut c_void) } {
            CUresult::CUDA_SUCCESS => Ok(()),
            rc => {
                if let Some(device) = known {
                    self.lock_chunks().insert(ptr, device);
                }
                match rc {
                    CUresult::CUDA_ERROR_INVALID_VALUE => Err(Error::UnknownPointer(ptr)),
                    rc => check("cuMemFreeHost", rc),
                }
            }
        }
    }

    /// The host's RAM: what pinned memory is taken from.
    fn mem_info(&self) -> Result<(usize, usize)> {
        Ok(host_memory())
    }

    fn synchronize(&self) -> Result<()> {
        for device in 0..CudaBackend::device_count().min(MAX_DEVICES as i32) {
            if Self::primary_context_active(device)? {
                self.device_backend(device)?.synchronize()?;
            }
        }
        Ok(())
    }

    /// Host blocks are freed with `cudaFreeHost`, which takes no stream: the pool never asks.
    fn event_record(&self, _stream: Stream) -> Result<Event> {
        Err(Error::NotSupported(
            "stream-ordered frees of pinned host memory",
        ))
    }

    fn event_done(&self, _event: Event) -> Result<bool> {
        Ok(true)
    }

    fn event_release(&self, _event: Event) {}

    fn vmm_granularity(&self) -> Option<usize> {
        None
    }

    fn vmm_reserve(&self, _size: usize) -> Result<DevicePtr> {
        Err(Error::NotSupported("reserving pinned host memory"))
    }

    fn vmm_release(&self, _base: DevicePtr, _size: usize) -> Result<()> {
        Err(Error::NotSupported("reserving pinned host memory"))
    }

    fn vmm_map(&self, _ptr: DevicePtr, _size: usize) -> Result<()> {
        Err(Error::NotSupported("reserving pinned host memory"))
    }

    fn vmm_unmap(&self, _ptr: DevicePtr, _size: usize) -> Result<()> {
        Err(Error::NotSupported("reserving pinned host memory"))
    }

    fn copy_d2d(&self, _dst: DevicePtr, _src: DevicePtr, _size: usize, _s: Stream) -> Result<()> {
        Err(Error::NotSupported(
            "copies through the pinned host backend",
        ))
    }

    fn copy_to_host(&self, _dst: &mut [u8], _src: DevicePtr) -> Result<()> {
        Err(Error::NotSupported(
            "copies through the pinned host backend",
        ))
    }

    fn copy_from_host(&self, _dst: DevicePtr, _src: &[u8]) -> Result<()> {
        Err(Error::NotSupported(
            "copies through the pinned host backend",
        ))
    }
}
