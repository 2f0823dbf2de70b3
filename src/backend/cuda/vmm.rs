//! Reserve-and-commit through the driver's virtual memory management (`cuMemAddressReserve`,
//! `cuMemCreate`, `cuMemMap`): address space first, physical memory later, pointers stable.
//!
//! Every method expects the backend's context to be current (the caller holds a `Bound`).
//!
//! Invariant: every mapping made here holds the *only* reference to its physical memory. `map`
//! releases its allocation handle as soon as the memory is mapped, so `cuMemUnmap` alone frees it.
//!
//! The driver unmaps only whole mappings (`cuMemUnmap` cannot cut one made by a single `cuMemMap`),
//! and a mapping cannot be split after the fact: `cuMemMap` takes no offset into a handle. So the
//! live mappings are tracked here, and `unmap` takes a range made of whole `map` ranges, one or
//! several adjacent ones; a range that cuts a mapping or covers a hole is refused before any
//! driver call. Mapping one granule per handle would lift that rule, at the cost of one ~30 us
//! driver round trip per granule instead of per call.

use super::{check, check_alloc};
use crate::backend::DevicePtr;
use crate::error::{Error, Result};
use cudarc::driver::sys::{self, CUdevice, CUdeviceptr, CUmemGenericAllocationHandle, CUresult};
use once_cell::sync::OnceCell;
use std::collections::BTreeMap;
use std::sync::Mutex;

pub(super) struct Vmm {
    /// The driver's handle of the device, for attribute queries.
    device: CUdevice,
    /// The device's ordinal: what `CUmemLocation::id` names.
    ordinal: i32,
    /// Minimum granularity, or `None` without VMM support; probed once.
    granularity: OnceCell<Option<usize>>,
    /// Live mappings, start -> length.
    maps: Mutex<BTreeMap<DevicePtr, usize>>,
}

/// Pinned memory on device `ordinal`, no shareable handle: the only kind this backend maps.
fn device_memory(ordinal: i32) -> sys::CUmemAllocationProp {
    sys::CUmemAllocationProp {
        type_: sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE,
        location: sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: ordinal,
        },
        win32HandleMetaData: std::ptr::null_mut(),
        allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    }
}

/// Asks the driver whether the device can reserve and map, and at what granularity.
fn probe_granularity(device: CUdevice, ordinal: i32) -> Option<usize> {
    let mut supported = 0;
    let attr = sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED;
    // SAFETY: `device` came from cuDeviceGet; `supported` is a valid out-parameter.
    let rc = unsafe { sys::cuDeviceGetAttribute(&mut supported, attr, device) };
    if rc != CUresult::CUDA_SUCCESS || supported == 0 {
        return None;
    }
    let prop = device_memory(ordinal);
    let mut granularity = 0usize;
    let option = sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM;
    // SAFETY: `prop` is a fully initialised property block and `granularity` a valid
    // out-parameter, both alive for the call.
    let rc = unsafe { sys::cuMemGetAllocationGranularity(&mut granularity, &prop, option) };
    (rc == CUresult::CUDA_SUCCESS && granularity > 0).then_some(granularity)
}

/// Maps `handle` at `[ptr, ptr+size)` and makes it read-write for device `ordinal`; undoes the
/// mapping if access cannot be granted. The handle stays the caller's to release.
fn map_read_write(
    ordinal: i32,
    ptr: DevicePtr,
    size: usize,
    handle: CUmemGenericAllocationHandle,
) -> Result<()> {
    // SAFETY: the range is granularity-aligned inside a reservation (checked by `map`) and not
    // mapped yet; `handle` is a live allocation of exactly `size` bytes. Offset and flags must be 0.
    let rc = unsafe { sys::cuMemMap(ptr as CUdeviceptr, size, 0, handle, 0) };
    check_alloc("cuMemMap", rc, size)?;
    let access = sys::CUmemAccessDesc {
        location: sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: ordinal,
        },
        flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    };
    // SAFETY: the range was mapped just above; `access` is one valid descriptor, alive for the
    // call, and the count says one.
    let rc = unsafe { sys::cuMemSetAccess(ptr as CUdeviceptr, size, &access, 1) };
    if let Err(e) = check_alloc("cuMemSetAccess", rc, size) {
        // Best effort: the access error is the one to report.
        // SAFETY: exactly the range mapped above; nothing can have used it without access.
        let _ = unsafe { sys::cuMemUnmap(ptr as CUdeviceptr, size) };
        return Err(e);
    }
    Ok(())
}

impl Vmm {
    pub(super) fn new(device: CUdevice, ordinal: i32) -> Vmm {
        Vmm {
            device,
            ordinal,
            granularity: OnceCell::new(),
            maps: Mutex::new(BTreeMap::new()),
        }
    }

    /// The granularity if already probed; lets the caller skip binding its context.
    pub(super) fn granularity_if_known(&self) -> Option<Option<usize>> {
        self.granularity.get().copied()
    }

    /// Minimum VMM granularity of the device, or `None` when it cannot reserve and map.
    pub(super) fn granularity(&self) -> Option<usize> {
        *self
            .granularity
            .get_or_init(|| probe_granularity(self.device, self.ordinal))
    }

    fn granularity_or_refuse(&self) -> Result<usize> {
        self.granularity().ok_or(Error::NotSupported(
            "virtual memory management on this device",
        ))
    }

    pub(super) fn reserve(&self, size: usize) -> Result<DevicePtr> {
        let granularity = self.granularity_or_refuse()?;
        if size == 0 || size % granularity != 0 {
            return Err(Error::InvalidValue(
                "reservation size must be a multiple of the granularity",
            ));
        }
        let mut base: CUdeviceptr = 0;
        // SAFETY: `base` is a valid out-parameter; no fixed address is asked for (0), and the
        // alignment is the granularity, so every granule inside starts a mappable range.
        let rc = unsafe { sys::cuMemAddressReserve(&mut base, size, granularity, 0, 0) };
        check_alloc("cuMemAddressReserve", rc, size)?;
        Ok(base as DevicePtr)
    }

    pub(super) fn release(&self, base: DevicePtr, size: usize) -> Result<()> {
        let end = base
            .checked_add(size)
            .ok_or(Error::InvalidValue("reservation wraps the address space"))?;
        let maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        if maps.range(base..end).next().is_some() {
            return Err(Error::InvalidValue(
                "reservation still has mapped ranges; unmap them first",
            ));
        }
        // SAFETY: nothing inside the range is mapped by this backend (checked above); the driver
        // refuses a range that is not exactly one of its reservations.
        check("cuMemAddressFree", unsafe {
            sys::cuMemAddressFree(base as CUdeviceptr, size)
        })
    }

    pub(super) fn map(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        let granularity = self.granularity_or_refuse()?;
        let end = match ptr.checked_add(size) {
            Some(end) if size > 0 && ptr % granularity == 0 && size % granularity == 0 => end,
            _ => {
                return Err(Error::InvalidValue(
                    "range is not granularity-aligned inside a reservation",
                ))
            }
        };
        // Held across the driver calls: makes the overlap check and the insertion one step. This
        // is a slow path of ~30 us that the driver serialises internally anyway.
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        let overlaps_before = maps
            .range(..ptr)
            .next_back()
            .is_some_and(|(&start, &len)| start + len > ptr);
        let overlaps_after = maps.range(ptr..end).next().is_some();
        if overlaps_before || overlaps_after {
            return Err(Error::InvalidValue("range is already mapped"));
        }

        let prop = device_memory(self.ordinal);
        let mut handle: CUmemGenericAllocationHandle = 0;
        // SAFETY: `prop` is fully initialised and `handle` a valid out-parameter; `size` is a
        // multiple of the granularity for exactly this `prop`. Flags must be 0.
        let rc = unsafe { sys::cuMemCreate(&mut handle, size, &prop, 0) };
        check_alloc("cuMemCreate", rc, size)?;
        let mapped = map_read_write(self.ordinal, ptr, size, handle);
        // Either way our reference goes now: a mapping keeps the memory alive on its own, and
        // without one this frees it (see the module's invariant).
        // SAFETY: `handle` came from cuMemCreate above and is released exactly once.
        let released = check("cuMemRelease", unsafe { sys::cuMemRelease(handle) });
        mapped?;
        if let Err(e) = released {
            // The handle would keep the memory alive after unmapping: give the range back
            // rather than hand out a mapping that can never be freed.
            // SAFETY: exactly the range mapped above, not yet handed to the caller.
            let _ = unsafe { sys::cuMemUnmap(ptr as CUdeviceptr, size) };
            return Err(e);
        }
        maps.insert(ptr, size);
        Ok(())
    }

    pub(super) fn unmap(&self, ptr: DevicePtr, size: usize) -> Result<()> {
        const SPLIT: Error = Error::InvalidValue(
            "range must consist of whole mapped ranges (cuMemUnmap cannot split a mapping)",
        );
        let end = ptr.checked_add(size).ok_or(SPLIT)?;
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        // The range must tile exactly: start on a mapping, continue without gaps, end on one.
        let mut covered = ptr;
        let mut inside = Vec::new();
        for (&start, &len) in maps.range(ptr..end) {
            if start != covered || start + len > end {
                return Err(SPLIT);
            }
            inside.push((start, len));
            covered = start + len;
        }
        if size == 0 || covered != end {
            return Err(SPLIT);
        }
        for (start, len) in inside {
            // SAFETY: `[start, start+len)` is one whole live mapping of this backend, and the
            // caller has synchronized (the trait's contract), so no queued work still uses it.
            // Its memory has no other reference (module invariant), so unmapping frees it.
            let rc = unsafe { sys::cuMemUnmap(start as CUdeviceptr, len) };
            // On failure the mappings already unmapped stay forgotten; the rest stay recorded.
            check("cuMemUnmap", rc)?;
            maps.remove(&start);
        }
        Ok(())
    }
}
