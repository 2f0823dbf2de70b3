//! NVTX memory annotations, so that a tool such as compute-sanitizer sees pool blocks as the
//! allocations they are. Without them a kernel writing past a `cudaMalloc` block lands inside the
//! pool's chunk, which the tool sees as one valid allocation, and memcheck says nothing.
//!
//! Each chunk a pool takes from the driver is a heap (`nvtxMemHeapRegister`, usage
//! `NVTX_MEM_HEAP_USAGE_TYPE_SUB_ALLOCATOR`: nothing in it is valid until registered); each block
//! handed out is a region of its heap (`nvtxMemRegionsRegister`), of the size asked for, and is
//! unregistered when freed (`nvtxMemRegionsUnregister`); a chunk going back to the driver is
//! unregistered first (`nvtxMemHeapUnregister`, which drops its regions). See docs/tools.md.
//!
//! Cost: with no tool attached (no `NVTX_INJECTION64_PATH`), one relaxed atomic load per call
//! after the first, which reads the variable once. With a tool, a mutex-guarded map per call and
//! the tool's own work: the tool is the slow part.
//!
//! A tool may call back into CUDA from inside a call we make to it (its own allocations reach our
//! hooks under `LD_PRELOAD`): nested calls on that thread annotate nothing (`reentry`).
//!
//! Modules: `abi` (the layouts shared with the tool), `inject` (loading and attaching to it),
//! `reentry` (the per-thread guard around calls into the tool).

mod abi;
mod inject;
mod reentry;

pub use inject::INJECTION_PATH_VAR;

use abi::*;
use inject::Tool;
use reentry::Inside;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

const UNKNOWN: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;
/// One thread is loading the tool; the others wait for it.
const LOOKING: u8 = 3;

/// Whether a tool is attached: `UNKNOWN` until the first call looks.
static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);
/// Set once, before `STATE` becomes `ON`.
static TOOL: OnceLock<Tool> = OnceLock::new();

/// A call into the attached tool: this thread is inside it while this lives.
struct Call {
    tool: &'static Tool,
    _inside: Inside,
}

/// The attached tool, if any, and this thread is not already inside a call to it. One relaxed
/// load once the answer is known and no tool is attached.
#[inline]
fn tool() -> Option<Call> {
    match STATE.load(Ordering::Relaxed) {
        OFF => None,
        _ => tool_slow(),
    }
}

#[cold]
#[inline(never)]
fn tool_slow() -> Option<Call> {
    // Once exit has begun the tool may be tearing down: annotate nothing more. Nor in a forked
    // child: CUDA is gone there, and a lock here (the book's, or the look-up below, never
    // finished by a thread the child lacks) may be held forever.
    if crate::process::exiting() || crate::process::in_child() {
        return None;
    }
    // The tool called back into CUDA from inside our call (while attaching too): not again.
    let inside = Inside::enter()?;
    loop {
        match STATE.load(Ordering::Acquire) {
            ON => {
                return TOOL.get().map(|tool| Call {
                    tool,
                    _inside: inside,
                })
            }
            OFF => return None,
            UNKNOWN => {
                if STATE
                    .compare_exchange(UNKNOWN, LOOKING, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    // A fork while this thread looks must find the child handler in place.
                    crate::process::watch_forks();
                    let on = crate::config::get().nvtx
                        && inject::attach().is_some_and(|t| TOOL.set(t).is_ok());
                    STATE.store(if on { ON } else { OFF }, Ordering::Release);
                    if on && crate::config::get().verbose {
                        if let Some(t) = TOOL.get() {
                            let domain = match t.domain.is_null() {
                                true => "the default domain",
                                false => "domain hbmalloc",
                            };
                            eprintln!(
                                "hbmalloc: NVTX tool attached: {domain}, memory functions in the {:?} slot layout",
                                t.layout
                            );
                        }
                    }
                }
            }
            // Another thread is loading the tool (once per process, microseconds without one).
            _ => std::thread::yield_now(),
        }
    }
}

/// Whether a tool takes annotations (loads it on the first call). False on a thread that is
/// inside a call to the tool.
#[inline]
pub fn active() -> bool {
    tool().is_some()
}

/// What is registered with the tool: heaps by base address, each with its live regions. The tool
/// needs a region's heap handle, and a heap's unregistration drops its regions there as here.
#[derive(Default)]
struct Book {
    heaps: BTreeMap<usize, HeapEntry>,
}

struct HeapEntry {
    size: usize,
    handle: Heap,
    /// Region start → size.
    regions: BTreeMap<usize, usize>,
}

// SAFETY: a heap handle is an opaque token the tool accepts from any thread.
unsafe impl Send for HeapEntry {}

impl Book {
    /// The heap holding `[ptr, ptr + size)`.
    fn heap_of(&mut self, ptr: usize, size: usize) -> Option<&mut HeapEntry> {
        let (&base, heap) = self.heaps.range_mut(..=ptr).next_back()?;
        (ptr - base)
            .checked_add(size)
            .filter(|&end| end <= heap.size)?;
        Some(heap)
    }
}

fn book() -> MutexGuard<'static, Book> {
    static BOOK: OnceLock<Mutex<Book>> = OnceLock::new();
    let m = BOOK.get_or_init(Default::default);
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a heap is, as the tool will name it in its reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeapKind {
    /// A chunk of a device's caching pool (`cudaMalloc`, `hbm_device_alloc`).
    CachingPool,
    /// A scratch pool's buffer or reservation (`hbm_pool_*`).
    ScratchPool,
    /// One K or V tensor of a KV cache, holding every sequence slot.
    KvCache,
}

impl HeapKind {
    fn name(self) -> &'static std::ffi::CStr {
        match self {
            HeapKind::CachingPool => c"hbmalloc caching pool chunk",
            HeapKind::ScratchPool => c"hbmalloc scratch pool",
            HeapKind::KvCache => c"hbmalloc KV cache tensor",
        }
    }
}

/// A pool took `[base, base + size)` from the driver: registers it as a sub-allocator heap.
#[inline]
pub fn heap_add(base: usize, size: usize, kind: HeapKind) {
    if let Some(call) = tool() {
        heap_add_slow(call.tool, base, size, kind);
    }
}

/// As `heap_add`, for a reserved (VMM) address range, which a tool that does not take one as a
/// heap (compute-sanitizer) is not offered: its blocks then go unannotated.
pub fn reserved_heap_add(base: usize, size: usize, kind: HeapKind) {
    if let Some(call) = tool() {
        if call.tool.takes_reserved_ranges {
            heap_add_slow(call.tool, base, size, kind);
        }
    }
}

#[cold]
fn heap_add_slow(tool: &Tool, base: usize, size: usize, kind: HeapKind) {
    let mut book = book();
    if let Some(stale) = book.heaps.remove(&base) {
        // SAFETY: a handle this tool gave for a heap registered in this domain.
        unsafe { (tool.heap_unregister)(tool.domain, stale.handle) };
    }
    let range = VirtualRangeDesc {
        size,
        ptr: base as *const c_void,
    };
    let desc = HeapDesc {
        ext_compat_id: EXT_COMPATID_MEM,
        struct_size: std::mem::size_of::<HeapDesc>() as u16,
        reserved0: 0,
        usage: HEAP_USAGE_SUB_ALLOCATOR,
        kind: MEM_TYPE_VIRTUAL_ADDRESS,
        type_specific_desc_size: std::mem::size_of::<VirtualRangeDesc>(),
        type_specific_desc: &range as *const VirtualRangeDesc as *const c_void,
        category: 0,
        message_type: MESSAGE_TYPE_ASCII,
        message: kind.name().as_ptr() as *const c_char,
    };
    // SAFETY: a descriptor laid out as nvtxMemHeapDesc_t, valid for the call.
    let handle = unsafe { (tool.heap_register)(tool.domain, &desc) };
    if heap_refused(handle) {
        // Not booked: no region is registered in it, and it is never unregistered (NULL is the
        // process-wide heap, which nvtxMemHeapUnregister refuses). The tool sees the chunk as the
        // plain allocation it is.
        note_refused_heap(base, size, kind);
        return;
    }
    book.heaps.insert(
        base,
        HeapEntry {
            size,
            handle,
            regions: BTreeMap::new(),
        },
    );
}

/// One line on stderr, the first time the tool refuses a heap.
#[cold]
fn note_refused_heap(base: usize, size: usize, kind: HeapKind) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        eprintln!(
            "hbmalloc: the NVTX tool refused the heap {:?} at {base:#x} ({size} bytes); blocks in heaps it refuses are not annotated",
            kind.name()
        );
    }
}

/// The heap at `base` goes back to the driver (call before giving it back): unregisters it and,
/// with it, its regions.
#[inline]
pub fn heap_remove(base: usize) {
    if let Some(call) = tool() {
        heap_remove_slow(call.tool, base);
    }
}

#[cold]
fn heap_remove_slow(tool: &Tool, base: usize) {
    if let Some(heap) = book().heaps.remove(&base) {
        // SAFETY: a handle this tool gave for a heap registered in this domain.
        unsafe { (tool.heap_unregister)(tool.domain, heap.handle) };
    }
}

/// A block `[ptr, ptr + size)` was handed out: registers it in the heap that holds it. Memory in
/// no registered heap (the runtime's own, a whole driver allocation) is left to the tool.
#[inline]
pub fn region_add(ptr: usize, size: usize) {
    if let Some(call) = tool() {
        region_add_slow(call.tool, ptr, size);
    }
}

#[cold]
fn region_add_slow(tool: &Tool, ptr: usize, size: usize) {
    let mut book = book();
    let Some(heap) = book.heap_of(ptr, size) else {
        return;
    };
    if heap.regions.contains_key(&ptr) {
        unregister_regions(tool, &[ptr]);
    }
    register_regions(tool, heap.handle, &[(ptr, size)]);
    heap.regions.insert(ptr, size);
}

/// The block at `ptr` was freed: unregisters its region, if it has one.
#[inline]
pub fn region_remove(ptr: usize) {
    if let Some(call) = tool() {
        region_remove_slow(call.tool, ptr);
    }
}

#[cold]
fn region_remove_slow(tool: &Tool, ptr: usize) {
    let mut book = book();
    let Some(heap) = book.heap_of(ptr, 0) else {
        return;
    };
    if heap.regions.remove(&ptr).is_some() {
        unregister_regions(tool, &[ptr]);
    }
}

/// Makes the regions of the heap at `base` exactly `regions` (start, size): unregisters those
/// gone or resized, registers those new. For objects that know their live ranges but not each
/// change (a KV cache's sequence slots).
pub fn heap_set_regions(base: usize, regions: &[(usize, usize)]) {
    let Some(call) = tool() else {
        return;
    };
    let tool = call.tool;
    let mut book = book();
    let Some(heap) = book.heaps.get_mut(&base) else {
        return;
    };
    let want: BTreeMap<usize, usize> = regions
        .iter()
        .copied()
        .filter(|&(p, n)| {
            n > 0 && p >= base && (p - base).checked_add(n).is_some_and(|e| e <= heap.size)
        })
        .collect();
    let gone: Vec<usize> = heap
        .regions
        .iter()
        .filter(|(p, n)| want.get(p) != Some(n))
        .map(|(&p, _)| p)
        .collect();
    let new: Vec<(usize, usize)> = want
        .iter()
        .filter(|(p, n)| heap.regions.get(p) != Some(n))
        .map(|(&p, &n)| (p, n))
        .collect();
    if !gone.is_empty() {
        unregister_regions(tool, &gone);
    }
    if !new.is_empty() {
        register_regions(tool, heap.handle, &new);
    }
    heap.regions = want;
}

fn register_regions(tool: &Tool, heap: Heap, regions: &[(usize, usize)]) {
    let descs: Vec<VirtualRangeDesc> = regions
        .iter()
        .map(|&(ptr, size)| VirtualRangeDesc {
            size,
            ptr: ptr as *const c_void,
        })
        .collect();
    let batch = RegionsRegisterBatch {
        ext_compat_id: EXT_COMPATID_MEM,
        struct_size: std::mem::size_of::<RegionsRegisterBatch>() as u16,
        region_type: MEM_TYPE_VIRTUAL_ADDRESS,
        heap,
        region_count: descs.len(),
        region_desc_element_size: std::mem::size_of::<VirtualRangeDesc>(),
        region_desc_elements: descs.as_ptr() as *const c_void,
        region_handle_elements_out: std::ptr::null_mut(),
    };
    // SAFETY: a batch laid out as nvtxMemRegionsRegisterBatch_t over `descs`, valid for the call.
    unsafe { (tool.regions_register)(tool.domain, &batch) };
}

fn unregister_regions(tool: &Tool, ptrs: &[usize]) {
    let refs: Vec<*const c_void> = ptrs.iter().map(|&p| p as *const c_void).collect();
    let batch = RegionsUnregisterBatch {
        ext_compat_id: EXT_COMPATID_MEM,
        struct_size: std::mem::size_of::<RegionsUnregisterBatch>() as u16,
        ref_type: REGION_REF_POINTER,
        ref_count: refs.len(),
        ref_element_size: std::mem::size_of::<*const c_void>(),
        ref_elements: refs.as_ptr(),
    };
    // SAFETY: a batch laid out as nvtxMemRegionsUnregisterBatch_t over `refs`, valid for the call.
    unsafe { (tool.regions_unregister)(tool.domain, &batch) };
}
