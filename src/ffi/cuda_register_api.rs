//! The interposed `cudaHostRegister` and `cudaHostUnregister`: forwarded to the runtime, and the
//! registered range recorded (on the host, under `cudaHostRegister`), so that a range never
//! unregistered is a leak in the report, with the call site that registered it.
//!
//! On the simulated device, whose device memory is host memory anyway, registering only
//! records, with the runtime's checks: a NULL pointer, size 0 or a flag other than
//! `cudaHostRegisterDefault` (0), `Portable` (1), `Mapped` (2), `IoMemory` (4), `ReadOnly` (8)
//! or their combinations → `cudaErrorInvalidValue`; a range starting where a registered range
//! (or a block of hbmalloc's) starts → `cudaErrorHostMemoryAlreadyRegistered` (712); unregistering
//! a pointer that starts no registered range → `cudaErrorHostMemoryNotRegistered` (713).
//! Overlaps that start elsewhere are not detected there (the real runtime does detect them).

#![allow(non_snake_case)]

use super::cuda_api::{fail, refuse_early, CudaError, HookGuard};
use super::forwarded_free::free_through_runtime;
use super::guard::ffi_guard;
use super::real_cuda::{real, FreeFn, HostRegisterFn};
use super::status::cuda_error;
use crate::backend::HOST_DEVICE;
use crate::runtime::{self, Active};
use crate::track::{self, Origin};
use crate::tracked::{forwarded, Want};
use std::ffi::{c_uint, c_void};

/// Every flag `cudaHostRegister` accepts.
const HOST_REGISTER_FLAGS: c_uint = 0x1 | 0x2 | 0x4 | 0x8;
/// `cudaErrorHostMemoryAlreadyRegistered`, `cudaErrorHostMemoryNotRegistered`.
pub const HOST_MEMORY_ALREADY_REGISTERED: CudaError = 712;
pub const HOST_MEMORY_NOT_REGISTERED: CudaError = 713;

/// Where registrations go: the runtime's own functions, or the simulated device.
#[derive(Clone, Copy)]
pub(super) enum Registrar {
    Sim,
    /// The runtime's `cudaHostRegister` and `cudaHostUnregister` (`None`: not found).
    Runtime(Option<HostRegisterFn>, Option<FreeFn>),
}

impl Registrar {
    fn active() -> Registrar {
        match runtime::active() {
            Active::Sim => Registrar::Sim,
            Active::Cuda => Registrar::Runtime(real().host_register, real().host_unregister),
        }
    }
}

/// Body of `cudaHostRegister`.
///
/// # Safety
/// As the runtime's `cudaHostRegister`: `[ptr, ptr + size)` is the caller's host memory.
pub(super) unsafe fn host_register_hook(
    to: Registrar,
    ptr: *mut c_void,
    size: usize,
    flags: c_uint,
) -> CudaError {
    let rc = match to {
        Registrar::Sim if ptr.is_null() || size == 0 || flags & !HOST_REGISTER_FLAGS != 0 => {
            cuda_error::INVALID_VALUE
        }
        Registrar::Sim if track::global().get(ptr as usize).is_some() => {
            HOST_MEMORY_ALREADY_REGISTERED
        }
        Registrar::Sim => cuda_error::SUCCESS,
        Registrar::Runtime(register, _) => match (register, HookGuard::enter()) {
            // SAFETY: the runtime's own function, given the caller's arguments unchanged.
            (Some(register), Some(_guard)) => unsafe { register(ptr, size, flags) },
            _ => cuda_error::INITIALIZATION_ERROR,
        },
    };
    if rc == cuda_error::SUCCESS {
        forwarded::record(ptr as usize, size, HOST_DEVICE, Origin::CudaHostRegister);
    }
    fail(rc)
}

/// Body of `cudaHostUnregister`: the record goes, then the runtime unpins the range.
pub(super) fn host_unregister_hook(to: Registrar, ptr: *mut c_void) -> CudaError {
    if ptr.is_null() && matches!(to, Registrar::Sim) {
        return fail(cuda_error::INVALID_VALUE);
    }
    free_through_runtime(
        "cudaHostUnregister",
        ptr as usize,
        Want::CUDA_HOST_UNREGISTER,
        |known| match to {
            Registrar::Sim if known => cuda_error::SUCCESS,
            Registrar::Sim => HOST_MEMORY_NOT_REGISTERED,
            Registrar::Runtime(_, unregister) => match (unregister, HookGuard::enter()) {
                // SAFETY: the runtime's own function, given the caller's argument unchanged.
                (Some(unregister), Some(_guard)) => unsafe { unregister(ptr) },
                _ => cuda_error::INITIALIZATION_ERROR,
            },
        },
    )
}

/// `cudaHostRegister`: page-locks `[ptr, ptr + size)` through the runtime, recorded until
/// `cudaHostUnregister`.
///
/// # Safety
/// As the runtime's `cudaHostRegister`.
#[no_mangle]
pub unsafe extern "C" fn cudaHostRegister(
    ptr: *mut c_void,
    size: usize,
    flags: c_uint,
) -> CudaError {
    ffi_guard!(fail(cuda_error::UNKNOWN), {
        refuse_early!();
        // SAFETY: forwarded caller contract.
        unsafe { host_register_hook(Registrar::active(), ptr, size, flags) }
    })
}

/// `cudaHostUnregister`: drops the range's record and lets the runtime unpin it.
///
/// # Safety
/// `ptr` is any value; hbmalloc only compares it (the runtime checks it).
#[no_mangle]
pub unsafe extern "C" fn cudaHostUnregister(ptr: *mut c_void) -> CudaError {
    ffi_guard!(fail(cuda_error::UNKNOWN), {
        refuse_early!();
        host_unregister_hook(Registrar::active(), ptr)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_child::{self, is_child};
    use std::ffi::c_int;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static UNREGISTERED: AtomicUsize = AtomicUsize::new(0);

    unsafe extern "C" fn fake_register(p: *mut c_void, _: usize, _: c_uint) -> c_int {
        if p as usize == 0xdead_0000 {
            HOST_MEMORY_ALREADY_REGISTERED
        } else {
            0
        }
    }

    unsafe extern "C" fn fake_unregister(p: *mut c_void) -> c_int {
        UNREGISTERED.store(p as usize, Ordering::Relaxed);
        0
    }

    #[test]
    fn register_calls() {
        let out = test_child::run(
            "ffi::cuda_register_api::tests::child_register",
            Some("backend:sim,backtrace:off,leak_report:off"),
        );
        assert!(out.contains("child checks passed"), "{out}");
    }

    #[test]
    fn child_register() {
        if !is_child() {
            return;
        }
        let tracker = crate::track::global();
        let mut buf = vec![0u8; 1 << 16];
        let p = buf.as_mut_ptr().cast::<c_void>();
        // SAFETY: `buf` outlives every use; the fakes stand for the runtime.
        unsafe {
            assert_eq!(cudaHostRegister(p, buf.len(), 0x1 | 0x2), 0);
            let live = tracker.get(p as usize).unwrap();
            assert_eq!(
                (live.origin, live.size, live.device),
                (Origin::CudaHostRegister, 1 << 16, HOST_DEVICE)
            );
            assert_eq!(
                cudaHostRegister(p, buf.len(), 0),
                HOST_MEMORY_ALREADY_REGISTERED
            );
            // Bad input: NULL, size 0, an unknown flag.
            assert_eq!(cudaHostRegister(std::ptr::null_mut(), 4096, 0), 1);
            assert_eq!(cudaHostRegister(p.add(4096), 0, 0), 1);
            assert_eq!(cudaHostRegister(p.add(4096), 4096, 0x10), 1);
            // A registered range is no device memory: cudaFree and cudaFreeHost refuse it.
            assert_eq!(crate::ffi::cuda_api::cudaFree(p), 1);
            assert_eq!(crate::ffi::cuda_host_api::cudaFreeHost(p), 1);
            // The leak report names the call while the range is registered.
            let path =
                std::env::temp_dir().join(format!("hbm-register-{}.txt", std::process::id()));
            crate::track::write_report(path.to_str()).unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            let _ = std::fs::remove_file(&path);
            assert!(text.contains("from cudaHostRegister on the host"), "{text}");

            assert_eq!(cudaHostUnregister(p), 0);
            assert_eq!(tracker.get(p as usize), None);
            assert_eq!(cudaHostUnregister(p), HOST_MEMORY_NOT_REGISTERED, "twice");
            assert_eq!(cudaHostUnregister(p.add(1)), HOST_MEMORY_NOT_REGISTERED);
            assert_eq!(cudaHostUnregister(std::ptr::null_mut()), 1);
            // Unregistering device memory is refused, the block left allocated.
            let mut d = std::ptr::null_mut();
            assert_eq!(crate::ffi::cuda_api::cudaMalloc(&mut d, 4096), 0);
            assert_eq!(cudaHostUnregister(d), 1);
            assert_eq!(crate::ffi::cuda_api::cudaFree(d), 0);

            // Through a runtime: its refusal is returned and nothing recorded; a range it
            // registered before hbmalloc saw it is still its to unregister.
            let rt = Registrar::Runtime(Some(fake_register), Some(fake_unregister));
            assert_eq!(
                host_register_hook(rt, 0xdead_0000 as *mut c_void, 4096, 0),
                712
            );
            assert_eq!(tracker.get(0xdead_0000), None);
            assert_eq!(host_register_hook(rt, p, 4096, 0), 0);
            assert_eq!(host_unregister_hook(rt, p), 0);
            assert_eq!(UNREGISTERED.load(Ordering::Relaxed), p as usize);
            assert_eq!(
                host_unregister_hook(rt, p.add(64)),
                0,
                "the runtime's answer"
            );
            assert_eq!(UNREGISTERED.load(Ordering::Relaxed), p as usize + 64);
            assert_eq!(
                host_register_hook(Registrar::Runtime(None, None), p, 1, 0),
                3
            );
        }
        drop(buf);
        println!("child checks passed");
    }
}
