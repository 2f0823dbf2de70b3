//! The CUDA backend through its public API.
//!
//! The first test runs everywhere (CI has no driver). The others need a CUDA GPU and are ignored
//! by default; `scripts/gpu-check.sh` runs them with `cargo test --release -- --ignored`. They take
//! one lock, so they run one at a time: `mem_info` figures must not move under another test.

use cudarc::driver::sys;
use hbmalloc::backend::cuda::{CudaBackend, PinnedHostBackend};
use hbmalloc::backend::{Backend, HOST_DEVICE};
use hbmalloc::error::Error;
use std::sync::{Mutex, MutexGuard};

#[test]
fn without_a_driver_nothing_is_available_and_nothing_panics() {
    // SAFETY: only probes whether libcuda can be loaded.
    let present = unsafe { sys::is_culib_present() };
    let count = CudaBackend::device_count();
    assert!(count >= 0);
    assert_eq!(CudaBackend::available(), count > 0);
    // Out-of-range devices are refused with a driver or without one.
    assert!(matches!(CudaBackend::new(count), Err(Error::InvalidDevice(d)) if d == count));
    assert!(matches!(
        CudaBackend::new(-1),
        Err(Error::InvalidDevice(-1))
    ));
    if !present {
        assert!(!CudaBackend::available());
        assert_eq!(count, 0);
        assert!(matches!(CudaBackend::new(0), Err(Error::InvalidDevice(0))));
    }
}

static GPU: Mutex<()> = Mutex::new(());

/// The GPU lock and a backend for device 0.
fn gpu() -> (MutexGuard<'static, ()>, CudaBackend) {
    let lock = GPU.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        CudaBackend::available(),
        "this test needs a CUDA driver and a device"
    );
    let backend = CudaBackend::new(0).expect("a backend for device 0");
    (lock, backend)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_alloc_is_aligned_and_free_refuses_a_freed_pointer() {
    let (_lock, cuda) = gpu();
    let sizes = [1usize, 255, 256, 4097, 1 << 20, (64 << 20) + 3];
    let ptrs: Vec<_> = sizes.iter().map(|&n| cuda.alloc(n).unwrap()).collect();
    for &p in &ptrs {
        assert_ne!(p, 0);
        assert_eq!(p % 256, 0, "{p:#x} is not 256-byte aligned");
    }
    for (&p, &n) in ptrs.iter().zip(&sizes) {
        cuda.free(p, n).unwrap();
    }
    assert_eq!(
        cuda.free(ptrs[0], sizes[0]),
        Err(Error::UnknownPointer(ptrs[0]))
    );
    assert!(cuda.alloc(0).is_err(), "zero bytes is the caller's case");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_mem_info_follows_allocations() {
    let (_lock, cuda) = gpu();
    const GIB: usize = 1 << 30;
    const SLACK: usize = 64 << 20;
    let (free0, total) = cuda.mem_info().unwrap();
    assert!(free0 > 0 && free0 <= total, "free {free0}, total {total}");
    let p = cuda.alloc(GIB).unwrap();
    let (free1, total1) = cuda.mem_info().unwrap();
    assert_eq!(total1, total);
    assert!(free1 + GIB <= free0, "1 GiB allocated: {free0} -> {free1}");
    cuda.free(p, GIB).unwrap();
    let (free2, _) = cuda.mem_info().unwrap();
    assert!(free2 + SLACK >= free0, "1 GiB freed: {free0} -> {free2}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_copies_round_trip_host_device_device_host() {
    let (_lock, cuda) = gpu();
    let n = (1 << 20) + 13;
    let src = pattern(n, 5);
    let a = cuda.alloc(n).unwrap();
    let b = cuda.alloc(n).unwrap();
    cuda.copy_from_host(a, &src).unwrap();
    cuda.copy_d2d(b, a, n, 0).unwrap();
    cuda.synchronize().unwrap();
    let mut back = vec![0u8; n];
    cuda.copy_to_host(&mut back, b).unwrap();
    assert!(back == src, "device-to-device copy changed the data");
    cuda.free(a, n).unwrap();
    cuda.free(b, n).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_events_complete_after_synchronize_and_are_reused() {
    let (_lock, cuda) = gpu();
    // Work for the event to wait on: 256 MiB copied on the legacy default stream.
    let n = 256 << 20;
    let (a, b) = (cuda.alloc(n).unwrap(), cuda.alloc(n).unwrap());
    cuda.copy_d2d(b, a, n, 0).unwrap();
    let first = cuda.event_record(0).unwrap();
    assert!(
        cuda.event_done(first).is_ok(),
        "pending or done, never an error"
    );
    cuda.synchronize().unwrap();
    assert_eq!(cuda.event_done(first), Ok(true));
    cuda.event_release(first);

    let again = cuda.event_record(0).unwrap();
    assert_eq!(
        again, first,
        "a released event is recorded again, not created anew"
    );
    // The runtime's per-thread default stream (cudaStreamPerThread = 2) is a valid stream too.
    let per_thread = cuda.event_record(2).unwrap();
    assert_ne!(per_thread, again);
    cuda.synchronize().unwrap();
    assert_eq!(cuda.event_done(again), Ok(true));
    assert_eq!(cuda.event_done(per_thread), Ok(true));
    cuda.event_release(again);
    cuda.event_release(per_thread);
    cuda.free(a, n).unwrap();
    cuda.free(b, n).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_vmm_reserve_map_copy_unmap_release() {
    let (_lock, cuda) = gpu();
    let g = cuda.vmm_granularity().expect("an H100/H200 supports VMM");
    assert!(g.is_power_of_two(), "granularity {g}");
    let base = cuda.vmm_reserve(4 * g).unwrap();
    assert_eq!(base % g, 0);

    let (free0, _) = cuda.mem_info().unwrap();
    cuda.vmm_map(base, 3 * g).unwrap();
    let (free1, _) = cuda.mem_info().unwrap();
    assert!(
        free1 + 3 * g <= free0,
        "3 granules committed: {free0} -> {free1}"
    );

    // Across granule boundaries, and a device-to-device copy inside the mapping.
    let src = pattern(3 * g, 9);
    cuda.copy_from_host(base, &src).unwrap();
    let mut back = vec![0u8; 3 * g];
    cuda.copy_to_host(&mut back, base).unwrap();
    assert!(back == src, "data read back differs from data written");
    cuda.copy_d2d(base + 2 * g, base, g, 0).unwrap();
    cuda.synchronize().unwrap();
    let mut last = vec![0u8; g];
    cuda.copy_to_host(&mut last, base + 2 * g).unwrap();
    assert!(
        last[..] == src[..g],
        "device-to-device copy inside the mapping"
    );

    cuda.synchronize().unwrap();
    cuda.vmm_unmap(base, 3 * g).unwrap();
    let (free2, _) = cuda.mem_info().unwrap();
    assert!(
        free2 + g >= free0,
        "unmapping frees the memory: {free0} -> {free2}"
    );
    cuda.vmm_release(base, 4 * g).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_vmm_unmap_takes_whole_mappings_only() {
    let (_lock, cuda) = gpu();
    let g = cuda.vmm_granularity().expect("an H100/H200 supports VMM");
    let base = cuda.vmm_reserve(4 * g).unwrap();
    cuda.vmm_map(base, 3 * g).unwrap();
    assert!(matches!(
        cuda.vmm_map(base + g, g),
        Err(Error::InvalidValue(_))
    ));
    assert!(matches!(
        cuda.vmm_unmap(base, g),
        Err(Error::InvalidValue(_))
    ));
    assert!(matches!(
        cuda.vmm_release(base, 4 * g),
        Err(Error::InvalidValue(_))
    ));
    // A refused unmap left the mapping whole and usable.
    cuda.copy_from_host(base + 2 * g, &[42u8; 16]).unwrap();
    cuda.synchronize().unwrap();
    cuda.vmm_unmap(base, 3 * g).unwrap();

    // Adjacent mappings made one by one go back in one call; a hole is refused.
    cuda.vmm_map(base, g).unwrap();
    cuda.vmm_map(base + g, 2 * g).unwrap();
    assert!(matches!(
        cuda.vmm_unmap(base, 4 * g),
        Err(Error::InvalidValue(_))
    ));
    cuda.vmm_unmap(base, 3 * g).unwrap();
    cuda.vmm_release(base, 4 * g).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_absurd_allocation_is_out_of_memory_not_a_panic() {
    let (_lock, cuda) = gpu();
    assert_eq!(
        cuda.alloc(1 << 50),
        Err(Error::OutOfMemory { requested: 1 << 50 })
    );
    let p = cuda
        .alloc(1 << 20)
        .expect("the device still works after OOM");
    cuda.free(p, 1 << 20).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cuda_calls_leave_the_threads_context_as_found() {
    let (_lock, cuda) = gpu();
    let current = || {
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: `ctx` is a valid out-parameter.
        let rc = unsafe { sys::cuCtxGetCurrent(&mut ctx) };
        assert_eq!(rc, sys::CUresult::CUDA_SUCCESS);
        ctx
    };
    std::thread::scope(|s| {
        // A thread with no context is on device 0 to the runtime; the backend leaves device 0's
        // primary context current there, which is what the runtime's first call would do.
        s.spawn(|| {
            assert!(current().is_null(), "a fresh thread has no context");
            let p = cuda.alloc(4096).unwrap();
            cuda.free(p, 4096).unwrap();
            assert!(
                !current().is_null(),
                "device 0's primary context is current now"
            );
            assert_eq!(CudaBackend::current_device(), 0);
        });
        // A thread in a context of its own gets it back after every call.
        s.spawn(|| {
            let mut own: sys::CUcontext = std::ptr::null_mut();
            let mut dev: sys::CUdevice = 0;
            // SAFETY: valid out-parameters; device 0 exists (gpu() checked).
            unsafe {
                assert_eq!(sys::cuDeviceGet(&mut dev, 0), sys::CUresult::CUDA_SUCCESS);
                let rc = sys::cuCtxCreate_v4(&mut own, std::ptr::null_mut(), 0, dev);
                assert_eq!(rc, sys::CUresult::CUDA_SUCCESS, "cuCtxCreate_v4");
            }
            assert_eq!(current(), own, "cuCtxCreate makes the new context current");
            let p = cuda.alloc(4096).unwrap();
            cuda.free(p, 4096).unwrap();
            assert_eq!(current(), own, "the thread's own context is restored");
            // SAFETY: `own` was created above and is no longer used.
            unsafe { sys::cuCtxDestroy_v2(own) };
        });
    });
}

#[test]
fn pinned_host_backend_without_a_driver_is_refused() {
    if !CudaBackend::available() {
        assert!(matches!(
            PinnedHostBackend::new(),
            Err(Error::InvalidDevice(HOST_DEVICE))
        ));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn pinned_host_memory_is_page_aligned_usable_and_freed_once() {
    let (_lock, device) = gpu();
    let host = PinnedHostBackend::new().expect("a pinned host backend");
    assert_eq!(host.device(), HOST_DEVICE);
    let n = 3 << 20;
    let p = host.alloc(n).expect("cuMemHostAlloc");
    assert_eq!(p % 4096, 0, "pinned memory at {p:#x} is not page-aligned");
    // SAFETY: [p, p+n) is pinned host memory just allocated, used by nobody else.
    let bytes = unsafe { std::slice::from_raw_parts_mut(p as *mut u8, n) };
    bytes.fill(0x7b);
    // Pinned, portable and mapped, as the driver sees it, interior pointers included.
    let mut flags = 0;
    // SAFETY: `flags` is a valid out-parameter; the pointer lies inside a live allocation.
    let rc = unsafe { sys::cuMemHostGetFlags(&mut flags, (p + 4096) as *mut _) };
    assert_eq!(rc, sys::CUresult::CUDA_SUCCESS);
    let want = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
    assert_eq!(flags & want, want, "flags {flags:#x}");
    let d = device.alloc(n).expect("cuMemAlloc");
    device.copy_from_host(d, bytes).unwrap();
    host.synchronize().expect("synchronize every active device");
    let mut back = vec![0u8; n];
    device.copy_to_host(&mut back, d).unwrap();
    assert!(back.iter().all(|&b| b == 0x7b));
    device.free(d, n).unwrap();
    host.free(p, n).expect("cuMemFreeHost");
    assert_eq!(host.free(p, n), Err(Error::UnknownPointer(p)));
    assert!(matches!(
        host.alloc(256 << 40),
        Err(Error::OutOfMemory { .. })
    ));
}
