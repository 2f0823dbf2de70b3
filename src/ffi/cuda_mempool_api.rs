//! The interposed allocations from memory pools the program manages itself through the
//! runtime (`cudaMemPoolCreate`, `cudaMemPoolSetAttribute`, ...): `cudaMallocFromPoolAsync` and
//! `cudaMemPoolImportPointer`. Forwarded to the runtime unchanged, since the pool's own rules
//! (its release threshold, its sharing with other processes) decide where the memory comes from;
//! what the runtime hands out is recorded so that the leak report covers it. `cudaFree` and
//! `cudaFreeAsync` (in `cuda_api`) take the record and give the memory back to the runtime.
//!
//! A record of `cudaMemPoolImportPointer` carries size 0: the export data does not say how
//! large the allocation is, and asking the driver would cost a call per import.
//!
//! On the simulated device, which has no memory pools: NULL out-parameters or a NULL pool are
//! `cudaErrorInvalidValue`, anything else `cudaErrorNotSupported` (801).

#![allow(non_snake_case)]

use super::cuda_api::{fail, refuse_early, CudaError, CudaStream, HookGuard};
use super::guard::ffi_guard;
use super::real_cuda::{real, MallocFromPoolAsyncFn, MemPoolImportPointerFn};
use super::status::cuda_error;
use crate::runtime::{self, Active};
use crate::track::Origin;
use crate::tracked::forwarded;
use std::ffi::c_void;

/// `cudaMemPool_t`.
pub type CudaMemPool = *mut c_void;

/// Records the pointer the runtime wrote to `ptr` on success.
///
/// # Safety
/// `ptr` is valid for one read when `rc` is success.
unsafe fn record_pointer(
    rc: CudaError,
    ptr: *mut *mut c_void,
    size: usize,
    origin: Origin,
) -> CudaError {
    if rc == cuda_error::SUCCESS && !ptr.is_null() {
        // SAFETY: the runtime wrote the pointer on success.
        let p = unsafe { *ptr } as usize;
        if p != 0 {
            forwarded::record(p, size, runtime::current_device(), origin);
        }
    }
    fail(rc)
}

/// Body of `cudaMallocFromPoolAsync` on the runtime `forward` (`None`: no runtime found).
///
/// # Safety
/// `ptr` is NULL or valid for one pointer write; the handles are the caller's.
pub(super) unsafe fn malloc_from_pool_async_hook(
    forward: Option<MallocFromPoolAsyncFn>,
    ptr: *mut *mut c_void,
    size: usize,
    pool: CudaMemPool,
    stream: CudaStream,
) -> CudaError {
    let (Some(forward), Some(_guard)) = (forward, HookGuard::enter()) else {
        return fail(cuda_error::INITIALIZATION_ERROR);
    };
    // SAFETY: the runtime's own function, given the caller's arguments unchanged; it checks them.
    let rc = unsafe { forward(ptr, size, pool, stream) };
    // SAFETY: as `record_pointer` requires.
    unsafe { record_pointer(rc, ptr, size, Origin::CudaMallocFromPoolAsync) }
}

/// Body of `cudaMemPoolImportPointer` on the runtime `forward`.
///
/// # Safety
/// As the runtime's `cudaMemPoolImportPointer`.
pub(super) unsafe fn mem_pool_import_pointer_hook(
    forward: Option<MemPoolImportPointerFn>,
    ptr: *mut *mut c_void,
    pool: CudaMemPool,
    export_data: *mut c_void,
) -> CudaError {
    let (Some(forward), Some(_guard)) = (forward, HookGuard::enter()) else {
        return fail(cuda_error::INITIALIZATION_ERROR);
    };
    // SAFETY: the runtime's own function, given the caller's arguments unchanged.
    let rc = unsafe { forward(ptr, pool, export_data) };
    // SAFETY: as `record_pointer` requires.
    unsafe { record_pointer(rc, ptr, 0, Origin::CudaMemPoolImportPointer) }
}

/// What the simulated device answers: 1 for NULL out-parameters or pool, else 801.
fn sim_answer(ptr: *mut *mut c_void, pool: CudaMemPool) -> CudaError {
    if ptr.is_null() || pool.is_null() {
        fail(cuda_error::INVALID_VALUE)
    } else {
        fail(cuda_error::NOT_SUPPORTED)
    }
}

/// `cudaMallocFromPoolAsync`: the runtime's allocation from `pool`, recorded. Freed by
/// `cudaFree` / `cudaFreeAsync`.
///
/// # Safety
/// As the runtime's `cudaMallocFromPoolAsync`: `ptr` is NULL or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn cudaMallocFromPoolAsync(
    ptr: *mut *mut c_void,
    size: usize,
    pool: CudaMemPool,
    stream: CudaStream,
) -> CudaError {
    ffi_guard!(fail(cuda_error::UNKNOWN), {
        refuse_early!();
        match runtime::active() {
            Active::Sim => sim_answer(ptr, pool),
            // SAFETY: forwarded caller contract.
            Active::Cuda => unsafe {
                malloc_from_pool_async_hook(real().malloc_from_pool_async, ptr, size, pool, stream)
            },
        }
    })
}

/// `cudaMemPoolImportPointer`: the runtime's import of another process's allocation, recorded.
/// Freed by `cudaFree` / `cudaFreeAsync`.
///
/// # Safety
/// As the runtime's `cudaMemPoolImportPointer`.
#[no_mangle]
pub unsafe extern "C" fn cudaMemPoolImportPointer(
    ptr: *mut *mut c_void,
    pool: CudaMemPool,
    export_data: *mut c_void,
) -> CudaError {
    ffi_guard!(fail(cuda_error::UNKNOWN), {
        refuse_early!();
        match runtime::active() {
            Active::Sim if export_data.is_null() => fail(cuda_error::INVALID_VALUE),
            Active::Sim => sim_answer(ptr, pool),
            // SAFETY: forwarded caller contract.
            Active::Cuda => unsafe {
                mem_pool_import_pointer_hook(real().mem_pool_import_pointer, ptr, pool, export_data)
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::cuda_api::{cudaFree, cudaFreeAsync};
    use crate::test_child::{self, is_child};
    use std::ffi::c_int;
    use std::ptr::null_mut;

    unsafe extern "C" fn fake_from_pool(
        p: *mut *mut c_void,
        size: usize,
        _: *mut c_void,
        _: *mut c_void,
    ) -> c_int {
        if p.is_null() {
            return cuda_error::INVALID_VALUE;
        }
        if size == 0 {
            // SAFETY: non-NULL, the caller's out-parameter.
            unsafe { *p = null_mut() };
            return 0;
        }
        // SAFETY: as above. An address no other test of this child uses.
        unsafe { *p = (0x7b00_0000_0000 + size) as *mut c_void };
        0
    }

    unsafe extern "C" fn fake_import(p: *mut *mut c_void, _: *mut c_void, _: *mut c_void) -> c_int {
        // SAFETY: the test passes a local.
        unsafe { *p = 0x7b10_0000_0000 as *mut c_void };
        0
    }

    #[test]
    fn mempool_calls() {
        let out = test_child::run(
            "ffi::cuda_mempool_api::tests::child_mempool",
            Some("backend:sim,backtrace:off,leak_report:off"),
        );
        assert!(out.contains("child checks passed"), "{out}");
    }

    #[test]
    fn child_mempool() {
        if !is_child() {
            return;
        }
        let tracker = crate::track::global();
        let pool = 0x5000 as CudaMemPool;
        let mut p = null_mut();
        let mut data = [0u8; 64];
        let data = data.as_mut_ptr().cast();
        // SAFETY: locals as out-parameters; the fakes are the "runtime".
        unsafe {
            // The simulated device: no pools.
            assert_eq!(cudaMallocFromPoolAsync(&mut p, 4096, pool, null_mut()), 801);
            assert_eq!(
                cudaMallocFromPoolAsync(null_mut(), 4096, pool, null_mut()),
                1
            );
            assert_eq!(
                cudaMallocFromPoolAsync(&mut p, 4096, null_mut(), null_mut()),
                1
            );
            assert_eq!(cudaMemPoolImportPointer(&mut p, pool, data), 801);
            assert_eq!(cudaMemPoolImportPointer(&mut p, pool, null_mut()), 1);
            assert_eq!(cudaMemPoolImportPointer(null_mut(), pool, data), 1);

            // Through a runtime: recorded, freed by cudaFree or cudaFreeAsync. With no runtime
            // to hand the memory back to (the simulated device), the free is refused and the
            // record stays: nothing is lost.
            let fwd = Some(fake_from_pool as MallocFromPoolAsyncFn);
            assert_eq!(
                malloc_from_pool_async_hook(fwd, &mut p, 4096, pool, null_mut()),
                0
            );
            let live = tracker.get(p as usize).unwrap();
            assert_eq!(
                (live.origin, live.size),
                (Origin::CudaMallocFromPoolAsync, 4096)
            );
            assert_eq!(cudaFreeAsync(p, null_mut()), 1, "no runtime to free it");
            assert!(tracker.get(p as usize).is_some(), "the record is back");
            // The runtime's answer is returned; a NULL it hands out is not recorded.
            let count = tracker.snapshot().len();
            assert_eq!(
                malloc_from_pool_async_hook(fwd, &mut p, 0, pool, null_mut()),
                0
            );
            assert!(p.is_null());
            assert_eq!(
                malloc_from_pool_async_hook(fwd, null_mut(), 8, pool, null_mut()),
                1
            );
            assert_eq!(tracker.snapshot().len(), count);
            assert_eq!(
                malloc_from_pool_async_hook(None, &mut p, 8, pool, null_mut()),
                3
            );

            let mut q = null_mut();
            let imp = Some(fake_import as MemPoolImportPointerFn);
            assert_eq!(mem_pool_import_pointer_hook(imp, &mut q, pool, data), 0);
            assert_eq!(
                tracker.get(q as usize).map(|l| l.origin),
                Some(Origin::CudaMemPoolImportPointer)
            );
            assert_eq!(cudaFree(q), 1);
            assert!(tracker.get(q as usize).is_some());
            let path = std::env::temp_dir().join(format!("hbm-mempool-{}.txt", std::process::id()));
            crate::track::write_report(path.to_str()).unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            let _ = std::fs::remove_file(&path);
            assert!(
                text.contains("cudaMallocFromPoolAsync")
                    && text.contains("cudaMemPoolImportPointer"),
                "{text}"
            );
        }
        println!("child checks passed");
    }
}
