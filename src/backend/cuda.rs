//! CUDA driver backend. PLACEHOLDER: the real implementation replaces this file.

use super::{Backend, DevicePtr, Event, Stream};
use crate::error::{Error, Result};

pub struct CudaBackend {
    device: i32,
}

impl CudaBackend {
    /// Whether libcuda loads, initialises and reports at least one device.
    pub fn available() -> bool {
        false
    }

    /// Number of CUDA devices (0 when the driver is absent).
    pub fn device_count() -> i32 {
        0
    }

    /// A backend for `device`, using that device's primary context (the runtime's context).
    pub fn new(device: i32) -> Result<CudaBackend> {
        Err(Error::InvalidDevice(device))
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }
    fn device(&self) -> i32 {
        self.device
    }
    fn alloc(&self, _size: usize) -> Result<DevicePtr> {
        Err(Error::NotSupported("cuda"))
    }
    fn free(&self, _ptr: DevicePtr, _size: usize) -> Result<()> {
        Err(Error::NotSupported("cuda"))
    }
    fn mem_info(&self) -> Result<(usize, usize)> {
        Err(Error::NotSupported("cuda"))
    }
    fn synchronize(&self) -> Result<()> {
        Err(Error::NotSupported("cuda"))
    }
    fn event_record(&self, _s: Stream) -> Result<Event> {
        Err(Error::NotSupported("cuda"))
    }
    fn event_done(&self, _e: Event) -> Result<bool> {
        Err(Error::NotSupported("cuda"))
    }
    fn event_release(&self, _e: Event) {}
    fn vmm_granularity(&self) -> Option<usize> {
        None
    }
    fn vmm_reserve(&self, _s: usize) -> Result<DevicePtr> {
        Err(Error::NotSupported("cuda"))
    }
    fn vmm_release(&self, _b: DevicePtr, _s: usize) -> Result<()> {
        Err(Error::NotSupported("cuda"))
    }
    fn vmm_map(&self, _p: DevicePtr, _s: usize) -> Result<()> {
        Err(Error::NotSupported("cuda"))
    }
    fn vmm_unmap(&self, _p: DevicePtr, _s: usize) -> Result<()> {
        Err(Error::NotSupported("cuda"))
    }
    fn copy_d2d(&self, _d: DevicePtr, _s: DevicePtr, _n: usize, _st: Stream) -> Result<()> {
        Err(Error::NotSupported("cuda"))
    }
    fn copy_to_host(&self, _d: &mut [u8], _s: DevicePtr) -> Result<()> {
        Err(Error::NotSupported("cuda"))
    }
    fn copy_from_host(&self, _d: DevicePtr, _s: &[u8]) -> Result<()> {
        Err(Error::NotSupported("cuda"))
    }
}
