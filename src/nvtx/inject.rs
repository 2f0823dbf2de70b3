//! NVTX v3's injection protocol, this side of it: what the header-only NVTX library does inside
//! every program that includes it, done once here. A tool (compute-sanitizer, Nsight) names its
//! injection library in `NVTX_INJECTION64_PATH`; we make sure the CUDA runtime is initialized
//! (compute-sanitizer takes no NVTX call before), load the library, hand its
//! `InitializeInjectionNvtx2` our export table (so it can fill the core's function slots),
//! create our domain with `nvtxDomainCreateA` (the tool takes no memory call without one), hand
//! its `InitializeInjectionNvtxExtension` the memory extension's slot table, and keep the
//! functions it put there, read at the slots its layout says (`SlotLayout`). Nothing here runs
//! unless the variable is set.
//!
//! The export-table callbacks below are `extern "C"` because the tool calls them; they are
//! function pointers handed over at run time, never exported symbols (the header has none).

use super::abi::*;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The memory functions a tool gave us, and our domain in it.
#[derive(Clone, Copy)]
pub struct Tool {
    pub domain: Domain,
    /// Where the tool put its memory functions (reported with `verbose:on`).
    pub layout: SlotLayout,
    /// Whether the tool takes a reserved (VMM) address range as a heap: compute-sanitizer
    /// refuses one ("Call to nvtxMemHeapRegister failed", counted as an error: seen on an H200).
    pub takes_reserved_ranges: bool,
    pub heap_register: HeapRegister,
    pub heap_unregister: HeapUnregister,
    pub regions_register: RegionsRegister,
    pub regions_unregister: RegionsUnregister,
}

// SAFETY: the domain is an opaque handle the tool hands out for use from any thread.
unsafe impl Send for Tool {}
unsafe impl Sync for Tool {}

/// The environment variable a tool sets (the 64-bit one: this crate is 64-bit only).
pub const INJECTION_PATH_VAR: &str = "NVTX_INJECTION64_PATH";

/// Loads the tool named by `NVTX_INJECTION64_PATH` and attaches to it; `None` without the
/// variable, or (with one line on stderr) when the library cannot be loaded, gives no domain or
/// offers no memory extension.
#[cold]
pub fn attach() -> Option<Tool> {
    let path = std::env::var_os(INJECTION_PATH_VAR)?;
    match attach_to(&path) {
        Ok(tool) => Some(tool),
        Err(why) => {
            eprintln!(
                "hbmalloc: {INJECTION_PATH_VAR}={}: {why}; pool blocks are not annotated for the tool",
                path.to_string_lossy()
            );
            None
        }
    }
}

fn attach_to(path: &std::ffi::OsStr) -> Result<Tool, String> {
    use std::os::unix::ffi::OsStrExt;
    let cpath = CString::new(path.as_bytes()).map_err(|_| "the path holds a NUL byte")?;
    // SAFETY: a NUL-terminated path; the handle is never closed (the tool's functions stay ours
    // for the life of the process, as NVTX itself keeps them).
    let lib = unsafe { libc::dlopen(cpath.as_ptr(), libc::RTLD_LAZY) };
    if lib.is_null() {
        // SAFETY: dlerror returns NULL or a NUL-terminated message.
        let err = unsafe { libc::dlerror() };
        let msg = if err.is_null() {
            "dlopen failed".to_string()
        } else {
            // SAFETY: see above.
            unsafe { CStr::from_ptr(err) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(format!("cannot load it ({msg})"));
    }
    // Before the tool's first NVTX call, its initialization included.
    init_cuda_runtime();
    // A tool that gives no domain gets NVTX's default one (NULL): compute-sanitizer 2025.3 (CUDA
    // 13.0) fills no slot during InitializeInjectionNvtx2 and yet takes memory calls in the NULL
    // domain, as its own NVTX clients' first nvtxDomainCreateA returns NULL there (seen on an
    // H200: a plain client's planted write was reported so).
    let domain = match init_core(lib) {
        Ok(domain) => domain,
        Err(Core::NoDomain(why)) => {
            if crate::config::get().verbose {
                eprintln!("hbmalloc: NVTX: the tool created no domain ({why}); using the default (NULL) domain");
            }
            std::ptr::null_mut()
        }
        Err(Core::Refused(why)) => return Err(why),
    };
    let slots = init_mem_extension(lib)?;
    let layout = SlotLayout::of(slots[0].load(Ordering::Acquire));
    let slot = |cbid: usize| match slots[layout.slot(cbid)].load(Ordering::Acquire) {
        SLOT_FRESH | SLOT_DISABLED => None,
        f => Some(f),
    };
    let (Some(hr), Some(hu), Some(rr), Some(ru)) = (
        slot(CBID_MEM_HEAP_REGISTER),
        slot(CBID_MEM_HEAP_UNREGISTER),
        slot(CBID_MEM_REGIONS_REGISTER),
        slot(CBID_MEM_REGIONS_UNREGISTER),
    ) else {
        return Err("the tool does not take NVTX heap and region registrations".into());
    };
    // SAFETY: each slot, read at the tool's layout, holds its implementation of the function of
    // that callback id, whose prototype nvToolsExtMem.h fixes.
    unsafe {
        Ok(Tool {
            domain,
            layout,
            takes_reserved_ranges: takes_reserved_ranges(path),
            heap_register: std::mem::transmute::<usize, HeapRegister>(hr),
            heap_unregister: std::mem::transmute::<usize, HeapUnregister>(hu),
            regions_register: std::mem::transmute::<usize, RegionsRegister>(rr),
            regions_unregister: std::mem::transmute::<usize, RegionsUnregister>(ru),
        })
    }
}

/// Whether the tool injected from `path` takes a reserved (VMM) address range as a heap: not
/// compute-sanitizer (`libsanitizer-collection.so`), which refuses one.
fn takes_reserved_ranges(path: &std::ffi::OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    !path.as_bytes().windows(9).any(|w| w == b"sanitizer")
}

/// The runtime libraries a program may have loaded, newest first.
const CUDART_SONAMES: [&CStr; 4] = [
    c"libcudart.so.13",
    c"libcudart.so.12",
    c"libcudart.so.11.0",
    c"libcudart.so",
];

/// compute-sanitizer takes no NVTX call before the CUDA runtime is initialized, and documents
/// `cudaFree(0)` as the way to make sure. Under `LD_PRELOAD` the program's first `cudaMalloc`
/// is served by our pool through the driver, so the runtime may not have run yet: call the
/// loaded runtime's own `cudaFree(NULL)` (found on its handle, never our hook). No runtime
/// loaded (a program using only the `hbm_*` API): nothing to do.
fn init_cuda_runtime() {
    type CudaFree = unsafe extern "C" fn(*mut c_void) -> c_int;
    for soname in CUDART_SONAMES {
        // SAFETY: a NUL-terminated name; RTLD_NOLOAD loads nothing, it finds a loaded library.
        let handle = unsafe { libc::dlopen(soname.as_ptr(), libc::RTLD_NOLOAD | libc::RTLD_LAZY) };
        if handle.is_null() {
            continue;
        }
        let free = symbol(handle, c"cudaFree");
        if let Some(free) = free {
            // SAFETY: the runtime's cudaFree, whose prototype is fixed; NULL frees nothing and
            // initializes the runtime.
            let free = unsafe { std::mem::transmute::<usize, CudaFree>(free) };
            // SAFETY: see above.
            let _ = unsafe { free(std::ptr::null_mut()) };
        }
        // SAFETY: balances the dlopen above; the library stays loaded by its other references.
        unsafe { libc::dlclose(handle) };
        if free.is_some() {
            return;
        }
    }
}

fn symbol(lib: *mut c_void, name: &CStr) -> Option<usize> {
    // SAFETY: a live handle and a NUL-terminated name.
    let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
    (!p.is_null()).then_some(p as usize)
}

/// The core's function slots, one array per callback module, which the tool fills through
/// `GetModuleFunctionTable`. Only `nvtxDomainCreateA` is read back.
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: AtomicUsize = AtomicUsize::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_MODULE: [AtomicUsize; 16] = [EMPTY; 16];
static CORE_SLOTS: [[AtomicUsize; 16]; 6] = [EMPTY_MODULE; 6];

/// Per module: [0, &slot 1, .., &slot size-1, 0], as NVTX lays out its tables.
fn module_tables() -> &'static [Vec<usize>; 6] {
    static TABLES: OnceLock<[Vec<usize>; 6]> = OnceLock::new();
    TABLES.get_or_init(|| {
        std::array::from_fn(|m| {
            let mut t = vec![0usize];
            t.extend((1..CORE_MODULE_SIZES[m]).map(|i| &CORE_SLOTS[m][i] as *const _ as usize));
            t.push(0);
            t
        })
    })
}

unsafe extern "C" fn get_module_function_table(
    module: u32,
    out_table: *mut *const usize,
    out_size: *mut c_uint,
) -> c_int {
    if module < 32 {
        MODULES_ASKED.fetch_or(1 << module, Ordering::AcqRel);
    }
    let Some(table) = (module as usize)
        .checked_sub(1)
        .and_then(|m| module_tables().get(m))
    else {
        return 0;
    };
    if !out_table.is_null() {
        // SAFETY: the tool passes a writable pointer (checked non-NULL).
        unsafe { *out_table = table.as_ptr() };
    }
    if !out_size.is_null() {
        // SAFETY: as above.
        unsafe { *out_size = (table.len() - 1) as c_uint };
    }
    1
}

unsafe extern "C" fn set_injection_nvtx_version(_version: u32) {}

static CALLBACKS: ExportCallbacks = ExportCallbacks {
    struct_size: std::mem::size_of::<ExportCallbacks>(),
    get_module_function_table,
};

static VERSION_INFO: ExportVersionInfo = ExportVersionInfo {
    struct_size: std::mem::size_of::<ExportVersionInfo>(),
    version: NVTX_VERSION as u32,
    reserved0: 0,
    set_injection_nvtx_version,
};

unsafe extern "C" fn get_export_table(id: u32) -> *const c_void {
    TABLES_ASKED.fetch_or(1 << id.min(31), Ordering::AcqRel);
    match id {
        ETID_CALLBACKS => &CALLBACKS as *const ExportCallbacks as *const c_void,
        ETID_VERSIONINFO => &VERSION_INFO as *const ExportVersionInfo as *const c_void,
        _ => std::ptr::null(),
    }
}

/// Why `init_core` gave no domain: the tool refused NVTX, or took it and made no domain.
enum Core {
    Refused(String),
    NoDomain(String),
}

/// Initializes the tool's core side and creates our domain. Each way this can fail says, in the
/// line the caller prints, what the tool did (which export tables and modules it asked for,
/// which of the domain module's slots it filled), so that one run under a tool tells what it
/// expects; `Core::NoDomain` lets the caller go on in the default domain.
fn init_core(lib: *mut c_void) -> Result<Domain, Core> {
    let Some(init) = symbol(lib, c"InitializeInjectionNvtx2") else {
        return Err(Core::Refused("it has no InitializeInjectionNvtx2".into()));
    };
    // SAFETY: the symbol NVTX's loader calls under this name, with this prototype.
    let init = unsafe { std::mem::transmute::<usize, InitCore>(init) };
    // SAFETY: our export table lives for the whole process.
    if unsafe { init(get_export_table) } == 0 {
        return Err(Core::Refused(format!(
            "its InitializeInjectionNvtx2 returned 0 ({})",
            what_the_tool_did()
        )));
    }
    let core2 = &CORE_SLOTS[MODULE_CORE2 as usize - 1];
    match core2[CBID_CORE2_DOMAIN_CREATE_A].load(Ordering::Acquire) {
        0 => Err(Core::NoDomain(format!(
            "it left nvtxDomainCreateA's slot empty ({})",
            what_the_tool_did()
        ))),
        f => {
            // SAFETY: the tool's nvtxDomainCreateA, called with a NUL-terminated name.
            let create = unsafe { std::mem::transmute::<usize, DomainCreateA>(f) };
            let domain = unsafe { create(c"hbmalloc".as_ptr() as *const c_char) };
            match domain.is_null() {
                true => Err(Core::NoDomain("its nvtxDomainCreateA returned NULL".into())),
                false => Ok(domain),
            }
        }
    }
}

/// Bit `t` set: the tool asked for export table `t` (`get_export_table`; 31 for any above).
static TABLES_ASKED: AtomicU32 = AtomicU32::new(0);

/// Bit `m` set: the tool asked for module `m`'s function table (`get_module_function_table`).
static MODULES_ASKED: AtomicU32 = AtomicU32::new(0);

/// "modules asked: [..]; CORE2 slots filled: [..]", for `init_core`'s errors.
fn what_the_tool_did() -> String {
    let asked = MODULES_ASKED.load(Ordering::Acquire);
    let modules: Vec<u32> = (0..32).filter(|m| asked & (1 << m) != 0).collect();
    let tables_asked = TABLES_ASKED.load(Ordering::Acquire);
    let tables: Vec<u32> = (0..32).filter(|t| tables_asked & (1 << t) != 0).collect();
    let core2 = &CORE_SLOTS[MODULE_CORE2 as usize - 1];
    let filled: Vec<usize> = (0..core2.len())
        .filter(|&i| core2[i].load(Ordering::Acquire) != 0)
        .collect();
    format!(
        "export tables asked for: {tables:?}; modules asked for: {modules:?}; CORE2 slots filled: {filled:?}"
    )
}

/// The memory extension's slots: [module state, slot 0 .. slot 62], as the header keeps them.
static MEM_SLOTS: [AtomicUsize; MEM_SLOT_COUNT + 1] = [EMPTY; MEM_SLOT_COUNT + 1];

/// Offers the tool the memory extension; returns its function slots once it has filled them.
fn init_mem_extension(lib: *mut c_void) -> Result<&'static [AtomicUsize], String> {
    let init = symbol(lib, c"InitializeInjectionNvtxExtension")
        .ok_or("no InitializeInjectionNvtxExtension (no NVTX extensions)")?;
    // SAFETY: the symbol NVTX's extension loader calls under this name, with this prototype.
    let init = unsafe { std::mem::transmute::<usize, InitExtension>(init) };
    let slots = &MEM_SLOTS[1..];
    let mut segment = ExtModuleSegment {
        segment_id: MEM_SEGMENT_ID,
        slot_count: MEM_SLOT_COUNT,
        function_slots: slots.as_ptr() as *mut usize,
    };
    let mut module = ExtModuleInfo {
        nvtx_ver: NVTX_VERSION,
        struct_size: std::mem::size_of::<ExtModuleInfo>() as u16,
        module_id: EXT_MODULEID_MEM,
        compat_id: EXT_COMPATID_MEM,
        segments_count: 1,
        segments: &mut segment,
        get_export_function: std::ptr::null(),
        ext_info: std::ptr::null(),
    };
    // SAFETY: the module description and its segment outlive the call; the slots it points at
    // are atomics the tool may write (a usize each, like the header's intptr_t).
    if unsafe { init(&mut module) } == 0 {
        return Err("its InitializeInjectionNvtxExtension refused the memory extension".into());
    }
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_sanitizer_is_offered_no_reserved_range() {
        let path = |p: &str| std::ffi::OsString::from(p);
        assert!(!takes_reserved_ranges(&path("libsanitizer-collection.so")));
        assert!(!takes_reserved_ranges(&path(
            "/usr/local/cuda/compute-sanitizer/libsanitizer-collection.so"
        )));
        assert!(takes_reserved_ranges(&path(
            "/tmp/libnvtx_fake_injection.so"
        )));
    }
}
