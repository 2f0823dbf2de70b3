//! The binary layout NVTX v3 shares with a tool's injection library: the core's export tables
//! (`nvtxGetExportTable`), the extension module description (`InitializeInjectionNvtxExtension`)
//! and the memory extension's descriptors (`nvToolsExtMem.h`, compatibility id 0x0102). Written
//! from the published layout, field for field (64-bit only; `NVTX_INJECTION64_PATH`).

use std::ffi::{c_char, c_int, c_uint, c_void};

/// `NVTX_VERSION`: the API version this instance speaks.
pub const NVTX_VERSION: u16 = 3;

/// `NvtxExportTableID`.
pub const ETID_CALLBACKS: u32 = 1;
pub const ETID_VERSIONINFO: u32 = 3;

/// `NvtxCallbackModule` and each module's callback count (`NVTX_CBID_<MODULE>_SIZE`, id 0 being
/// invalid): CORE, CUDA, OPENCL, CUDART, CORE2, SYNC.
pub const CORE_MODULE_SIZES: [usize; 6] = [16, 9, 15, 7, 16, 7];
/// `NVTX_CB_MODULE_CORE2` and its `NVTX_CBID_CORE2_DomainCreateA`.
pub const MODULE_CORE2: u32 = 5;
pub const CBID_CORE2_DOMAIN_CREATE_A: usize = 12;

/// The memory extension: `NVTX_EXT_MODULEID_MEM`, `NVTX_EXT_COMPATID_MEM`, its one segment's id
/// and slot count.
pub const EXT_MODULEID_MEM: u16 = 1;
pub const EXT_COMPATID_MEM: u16 = 0x0102;
pub const MEM_SEGMENT_ID: usize = 1;
pub const MEM_SLOT_COUNT: usize = 63;

/// `NvtxExtMemCallbackId`: the callback ids of the memory functions this crate calls (0 is
/// invalid). Which segment slot holds each depends on the tool: see `SlotLayout`.
pub const CBID_MEM_HEAP_REGISTER: usize = 1;
pub const CBID_MEM_HEAP_UNREGISTER: usize = 2;
pub const CBID_MEM_REGIONS_REGISTER: usize = 4;
pub const CBID_MEM_REGIONS_UNREGISTER: usize = 6;

/// Where a tool put the function of callback id `c` in the memory segment's slots. The two
/// header generations disagree: `nvtxDetail/nvtxExtImplMem_v1.h` (NVTX 3.1 on) reads slot `c`,
/// slot 0 unused; the first memory-extension headers (`nvtxExtDetail/nvtxExtImplMem1.h`, 2021)
/// read slot `c - 1`. compute-sanitizer of CUDA 13.0 fills slot `c - 1` for a module described
/// exactly as the newer header describes it (seen on an H200: our call to slot 1, meant for
/// `nvtxMemHeapRegister`, reached its `nvtxMemHeapUnregister`, and the call to slot 4 its
/// `nvtxMemRegionsResize`, which crashed on our register batch). Slot 0 tells them apart: only a
/// tool counting from 0 puts a function there, callback id 0 being invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotLayout {
    /// Callback id `c` in slot `c` (the published header's reading).
    ById,
    /// Callback id `c` in slot `c - 1` (the older headers', and CUDA 13.0 compute-sanitizer's).
    FromZero,
}

impl SlotLayout {
    /// The layout a tool used, from the slots it filled.
    pub fn of(slot0: usize) -> SlotLayout {
        match slot0 {
            SLOT_FRESH | SLOT_DISABLED => SlotLayout::ById,
            _ => SlotLayout::FromZero,
        }
    }

    /// The slot holding callback id `cbid` (at least 1).
    pub fn slot(self, cbid: usize) -> usize {
        match self {
            SlotLayout::ById => cbid,
            SlotLayout::FromZero => cbid - 1,
        }
    }
}

/// What `nvtxMemHeapRegister` returns when it registered nothing: NULL (a failed registration,
/// and the value of `NVTX_MEM_HEAP_HANDLE_PROCESS_WIDE`, which `nvtxMemHeapUnregister` refuses)
/// or `NVTX_MEM_HEAP_HANDLE_NO_TOOL`.
pub fn heap_refused(handle: Heap) -> bool {
    handle.is_null() || handle as isize == -1
}

/// A slot the tool left alone (`NVTX_EXTENSION_FRESH`) or turned off (`NVTX_EXTENSION_DISABLED`).
pub const SLOT_FRESH: usize = 0;
pub const SLOT_DISABLED: usize = 1;

/// `NVTX_MEM_HEAP_USAGE_TYPE_SUB_ALLOCATOR`, `NVTX_MEM_TYPE_VIRTUAL_ADDRESS`,
/// `NVTX_MEM_REGION_REF_TYPE_POINTER`, `NVTX_MESSAGE_TYPE_ASCII`.
pub const HEAP_USAGE_SUB_ALLOCATOR: u32 = 1;
pub const MEM_TYPE_VIRTUAL_ADDRESS: u32 = 1;
pub const REGION_REF_POINTER: u32 = 1;
pub const MESSAGE_TYPE_ASCII: u32 = 1;

pub type Domain = *mut c_void;
pub type Heap = *mut c_void;

pub type GetExportTable = unsafe extern "C" fn(u32) -> *const c_void;
/// `InitializeInjectionNvtx2`: non-zero on success.
pub type InitCore = unsafe extern "C" fn(GetExportTable) -> c_int;
/// `InitializeInjectionNvtxExtension`: non-zero on success.
pub type InitExtension = unsafe extern "C" fn(*mut ExtModuleInfo) -> c_int;
pub type DomainCreateA = unsafe extern "C" fn(*const c_char) -> Domain;
pub type HeapRegister = unsafe extern "C" fn(Domain, *const HeapDesc) -> Heap;
pub type HeapUnregister = unsafe extern "C" fn(Domain, Heap);
pub type RegionsRegister = unsafe extern "C" fn(Domain, *const RegionsRegisterBatch);
pub type RegionsUnregister = unsafe extern "C" fn(Domain, *const RegionsUnregisterBatch);

/// `NvtxExportTableCallbacks`.
#[repr(C)]
pub struct ExportCallbacks {
    pub struct_size: usize,
    /// Fills `*out_table` with the module's array of pointers to function-pointer slots (entry 0
    /// and the last unused) and `*out_size` with its callback count; 0 for an unknown module.
    pub get_module_function_table: unsafe extern "C" fn(
        module: u32,
        out_table: *mut *const usize,
        out_size: *mut c_uint,
    ) -> c_int,
}

/// `NvtxExportTableVersionInfo`.
#[repr(C)]
pub struct ExportVersionInfo {
    pub struct_size: usize,
    pub version: u32,
    pub reserved0: u32,
    pub set_injection_nvtx_version: unsafe extern "C" fn(u32),
}

/// `nvtxExtModuleSegment_t`.
#[repr(C)]
pub struct ExtModuleSegment {
    pub segment_id: usize,
    pub slot_count: usize,
    /// `slot_count` slots; the tool writes function addresses at the callback ids it serves.
    pub function_slots: *mut usize,
}

/// `nvtxExtModuleInfo_t`.
#[repr(C)]
pub struct ExtModuleInfo {
    pub nvtx_ver: u16,
    pub struct_size: u16,
    pub module_id: u16,
    pub compat_id: u16,
    pub segments_count: usize,
    pub segments: *mut ExtModuleSegment,
    pub get_export_function: *const c_void,
    pub ext_info: *const c_void,
}

/// `nvtxMemVirtualRangeDesc_t`: a heap's or a region's range.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VirtualRangeDesc {
    pub size: usize,
    pub ptr: *const c_void,
}

/// `nvtxMemHeapDesc_t`.
#[repr(C)]
pub struct HeapDesc {
    pub ext_compat_id: u16,
    pub struct_size: u16,
    pub reserved0: u32,
    pub usage: u32,
    pub kind: u32,
    pub type_specific_desc_size: usize,
    pub type_specific_desc: *const c_void,
    pub category: u32,
    pub message_type: u32,
    /// `nvtxMessageValue_t`, here its ASCII member.
    pub message: *const c_char,
}

/// `nvtxMemRegionsRegisterBatch_t`.
#[repr(C)]
pub struct RegionsRegisterBatch {
    pub ext_compat_id: u16,
    pub struct_size: u16,
    pub region_type: u32,
    pub heap: Heap,
    pub region_count: usize,
    pub region_desc_element_size: usize,
    pub region_desc_elements: *const c_void,
    /// May be NULL for virtual-address regions: the pointer is the region's reference.
    pub region_handle_elements_out: *mut *mut c_void,
}

/// `nvtxMemRegionsUnregisterBatch_t`, with `nvtxMemRegionRef_t` as its pointer member.
#[repr(C)]
pub struct RegionsUnregisterBatch {
    pub ext_compat_id: u16,
    pub struct_size: u16,
    pub ref_type: u32,
    pub ref_count: usize,
    pub ref_element_size: usize,
    pub ref_elements: *const *const c_void,
}

// The sizes the published headers give on 64-bit Linux.
const _: () = assert!(std::mem::size_of::<ExtModuleInfo>() == 40);
const _: () = assert!(std::mem::size_of::<HeapDesc>() == 48);
const _: () = assert!(std::mem::size_of::<RegionsRegisterBatch>() == 48);
const _: () = assert!(std::mem::size_of::<RegionsUnregisterBatch>() == 32);
