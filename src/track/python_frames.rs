//! Python call sites: the Python stack of an allocating thread that holds the GIL, recorded
//! beside its native stack, so that leak reports, timelines and snapshots name the Python line
//! that allocated (a native stack under PyTorch ends in the interpreter's eval loop).
//!
//! CPython is found at run time with `dlsym(RTLD_DEFAULT)`, once, on the first capture: there is
//! no link-time dependency on libpython, and in a process without Python (or a Python older than
//! 3.9, or one missing any function below) nothing is captured and each allocation pays one load
//! and one branch. The same path serves the pluggable allocator and LD_PRELOAD: either way the
//! interpreter's symbols are in the process's global scope (the `python` executable exports them,
//! or links libpython).
//!
//! The functions used, and where they come from (all exported by every CPython >= 3.9):
//! - `PyFrame_GetCode`, `PyFrame_GetLineNumber`, `PyGC_Disable`/`PyGC_Enable`,
//!   `PyUnicode_AsUTF8AndSize`: stable ABI since 3.10 (the first two exist since 3.9; the GC
//!   switch is optional, see below).
//! - `PyEval_GetFrame`, `PyObject_GetAttrString`, `Py_IncRef`, `Py_DecRef`, `Py_IsInitialized`,
//!   `PyGILState_GetThisThreadState`, `PyErr_Fetch`/`PyErr_Restore`: stable ABI.
//! - `PyFrame_GetBack` (3.9+): public C API, not in the stable ABI.
//! - The current thread state: `PyThreadState_GetUnchecked` (3.13+), else
//!   `_PyThreadState_UncheckedGet` (3.5-3.12). Finalizing: `Py_IsFinalizing` (3.13+), else
//!   `_Py_IsFinalizing` (3.7-3.12).
//!
//! When the walk happens: the interpreter is initialized and not finalizing, and the calling
//! thread's current thread state is non-NULL and is this thread's own (`PyGILState_Check`'s test
//! without its shortcut, which answers 1 whenever the check is disabled): a thread that released
//! the GIL (ctypes.CDLL, `Py_BEGIN_ALLOW_THREADS`, PyTorch's autograd threads) has no current
//! state, and its allocation gets a native stack only. Frees never walk Python (the free side of
//! a pair stays as cheap as before).
//!
//! Safety of the walk: every frame and code reference taken is a strong one and is released;
//! code objects are kept alive for good the first time they are seen (`Py_IncRef`), so their
//! address names them for the rest of the process and their file and function names are read
//! once, under the GIL (no Python object is touched at report time, when the interpreter may be
//! gone). Python 3.11 creates frame objects on demand in `PyEval_GetFrame` / `PyFrame_GetBack`,
//! and a 3.11 allocation of a GC object can run a collection on the spot (finalizers that free
//! tensors, re-entering the allocator that is calling us): the walk runs with the collector
//! disabled and restores its state. A pending exception is saved and restored around the name
//! look-ups.
//!
//! Cost (python_frames benchmark in docs/pytorch.md): a hit in a per-thread cache of code
//! objects per frame, plus CPython's own frame and line-number calls.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, Mutex, OnceLock};

/// Ends the native frames of a captured stack; the words after it are Python frames
/// (`pack`), innermost first. No return address is `usize::MAX`.
pub const MARK: usize = usize::MAX;

/// Code objects named; past this, frames are recorded under one "(too many code objects)" name.
const MAX_CODES: u32 = 1 << 24;

/// One frame of a Python stack.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PyFrame {
    pub file: Arc<str>,
    /// `co_qualname` (3.11+), else `co_name`.
    pub function: Arc<str>,
    /// 0 when CPython does not know it.
    pub line: u32,
}

type Obj = *mut c_void;

/// The CPython functions the walk calls, resolved once.
struct Api {
    is_initialized: unsafe extern "C" fn() -> c_int,
    is_finalizing: unsafe extern "C" fn() -> c_int,
    current_state: unsafe extern "C" fn() -> Obj,
    this_thread_state: unsafe extern "C" fn() -> Obj,
    get_frame: unsafe extern "C" fn() -> Obj,
    frame_back: unsafe extern "C" fn(Obj) -> Obj,
    frame_code: unsafe extern "C" fn(Obj) -> Obj,
    frame_line: unsafe extern "C" fn(Obj) -> c_int,
    incref: unsafe extern "C" fn(Obj),
    decref: unsafe extern "C" fn(Obj),
    getattr: unsafe extern "C" fn(Obj, *const c_char) -> Obj,
    utf8: unsafe extern "C" fn(Obj, *mut isize) -> *const c_char,
    err_fetch: unsafe extern "C" fn(*mut Obj, *mut Obj, *mut Obj),
    err_restore: unsafe extern "C" fn(Obj, Obj, Obj),
    gc_disable: Option<unsafe extern "C" fn() -> c_int>,
    gc_enable: Option<unsafe extern "C" fn() -> c_int>,
}

static API: OnceLock<Option<Api>> = OnceLock::new();

fn symbol(name: &CStr) -> Option<*mut c_void> {
    // SAFETY: dlsym only reads the loader's tables; `name` is NUL-terminated.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    (!p.is_null()).then_some(p)
}

macro_rules! resolve {
    ($($name:literal),+) => {{
        let found = None$(.or_else(|| symbol($name)))+;
        // SAFETY: each name is a CPython function whose C signature is the field's type (see the
        // module doc); a data pointer and a function pointer have one size on Linux.
        found.map(|p| unsafe { std::mem::transmute::<*mut c_void, _>(p) })
    }};
}

impl Api {
    fn resolve() -> Option<Api> {
        Some(Api {
            is_initialized: resolve!(c"Py_IsInitialized")?,
            is_finalizing: resolve!(c"Py_IsFinalizing", c"_Py_IsFinalizing")?,
            current_state: resolve!(c"PyThreadState_GetUnchecked", c"_PyThreadState_UncheckedGet")?,
            this_thread_state: resolve!(c"PyGILState_GetThisThreadState")?,
            get_frame: resolve!(c"PyEval_GetFrame")?,
            frame_back: resolve!(c"PyFrame_GetBack")?,
            frame_code: resolve!(c"PyFrame_GetCode")?,
            frame_line: resolve!(c"PyFrame_GetLineNumber")?,
            incref: resolve!(c"Py_IncRef")?,
            decref: resolve!(c"Py_DecRef")?,
            getattr: resolve!(c"PyObject_GetAttrString")?,
            utf8: resolve!(c"PyUnicode_AsUTF8AndSize")?,
            err_fetch: resolve!(c"PyErr_Fetch")?,
            err_restore: resolve!(c"PyErr_Restore")?,
            gc_disable: resolve!(c"PyGC_Disable"),
            gc_enable: resolve!(c"PyGC_Enable"),
        })
    }

    /// True if the calling thread may walk its Python stack now (see the module doc).
    ///
    /// # Safety
    /// The functions are CPython's, callable from any thread at any time.
    unsafe fn may_walk(&self) -> bool {
        if (self.is_initialized)() == 0 || (self.is_finalizing)() != 0 {
            return false;
        }
        let current = (self.current_state)();
        !current.is_null() && current == (self.this_thread_state)()
    }
}

/// Whether CPython's functions were found in this process (resolving them on first call).
pub fn python_present() -> bool {
    API.get_or_init(Api::resolve).is_some()
}

/// Writes the calling thread's Python stack into `out`, innermost first, as `pack`ed words;
/// returns how many. 0 without Python, without the GIL, or while the interpreter finalizes.
#[inline]
pub fn capture(out: &mut [usize]) -> usize {
    match API.get_or_init(Api::resolve) {
        Some(api) if !out.is_empty() => capture_with(api, out),
        _ => 0,
    }
}

#[inline(never)]
fn capture_with(api: &Api, out: &mut [usize]) -> usize {
    // SAFETY: CPython's thread-state queries may be called without the GIL.
    if !unsafe { api.may_walk() } {
        return 0;
    }
    // SAFETY: this thread holds the GIL (may_walk): every call below is made under it, with
    // references this function owns (PyEval_GetFrame's borrowed frame is increfed first).
    unsafe {
        let gc_was_on = api.gc_disable.map(|off| off() != 0);
        let mut frame = (api.get_frame)();
        let mut n = 0;
        if !frame.is_null() {
            (api.incref)(frame);
        }
        while !frame.is_null() && n < out.len() {
            let code = (api.frame_code)(frame);
            let line = (api.frame_line)(frame).max(0) as u32;
            out[n] = pack(code_id(api, code), line);
            n += 1;
            (api.decref)(code);
            let back = (api.frame_back)(frame);
            (api.decref)(frame);
            frame = back;
        }
        if !frame.is_null() {
            (api.decref)(frame);
        }
        if let (Some(true), Some(on)) = (gc_was_on, api.gc_enable) {
            on();
        }
        n
    }
}

/// A frame as one word: code id in the high half, line in the low half.
#[inline]
fn pack(code: u32, line: u32) -> usize {
    ((code as usize) << 32) | line as usize
}

/// The native part of a captured stack (everything before `MARK`).
#[inline]
pub fn native_part(raw: &[usize]) -> &[usize] {
    match raw.iter().position(|&w| w == MARK) {
        Some(i) => &raw[..i],
        None => raw,
    }
}

/// The Python frames of a captured stack, innermost first; empty when it has none.
pub fn python_part(raw: &[usize]) -> Vec<PyFrame> {
    let Some(i) = raw.iter().position(|&w| w == MARK) else {
        return Vec::new();
    };
    let codes = codes();
    raw[i + 1..]
        .iter()
        .map(|&w| {
            let (file, function) = codes
                .names
                .get(w >> 32)
                .cloned()
                .unwrap_or_else(|| (Arc::from("??"), Arc::from("??")));
            PyFrame {
                file,
                function,
                line: w as u32,
            }
        })
        .collect()
}

/// Code objects seen so far: address → id, and each id's file and function.
#[derive(Default)]
struct Codes {
    by_addr: HashMap<usize, u32>,
    names: Vec<(Arc<str>, Arc<str>)>,
}

static CODES: OnceLock<Mutex<Codes>> = OnceLock::new();

fn codes() -> std::sync::MutexGuard<'static, Codes> {
    // Each update is one push and one insert: a poisoned table is still consistent.
    CODES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

const CACHE_SLOTS: usize = 128;

thread_local! {
    // `const` and `Copy` contents: no destructor, usable at exit and from any thread.
    static CACHE: [Cell<(usize, u32)>; CACHE_SLOTS] =
        const { [const { Cell::new((0, 0)) }; CACHE_SLOTS] };
}

/// The id of a code object. Code objects are never freed once named (see the module doc), so an
/// address is one code object for good and the per-thread cache needs no invalidation.
#[inline]
fn code_id(api: &Api, code: Obj) -> u32 {
    let addr = code as usize;
    let slot = (addr >> 4) % CACHE_SLOTS;
    let (cached, id) = CACHE.with(|c| c[slot].get());
    if cached == addr && addr != 0 {
        return id;
    }
    let id = code_id_slow(api, code);
    CACHE.with(|c| c[slot].set((addr, id)));
    id
}

#[cold]
#[inline(never)]
fn code_id_slow(api: &Api, code: Obj) -> u32 {
    let addr = code as usize;
    if let Some(&id) = codes().by_addr.get(&addr) {
        return id;
    }
    // Read outside the table's lock: the look-ups may run Python's allocator.
    // SAFETY: called under the GIL (capture_with) with a strong reference to `code`.
    let (file, function) = unsafe { code_names(api, code) };
    let mut table = codes();
    if let Some(&id) = table.by_addr.get(&addr) {
        return id;
    }
    let id = table.names.len() as u32;
    if id >= MAX_CODES {
        return overflow_id(&mut table);
    }
    table.names.push((file, function));
    table.by_addr.insert(addr, id);
    // SAFETY: under the GIL; the reference is kept for good, so `addr` is never reused.
    unsafe { (api.incref)(code) };
    id
}

#[cold]
fn overflow_id(table: &mut Codes) -> u32 {
    if let Some(&id) = table.by_addr.get(&0) {
        return id;
    }
    let id = table.names.len() as u32;
    table
        .names
        .push((Arc::from("??"), Arc::from("(too many code objects)")));
    table.by_addr.insert(0, id);
    id
}

/// `co_filename` and `co_qualname` (or `co_name`) of a code object.
///
/// # Safety
/// Under the GIL, with a strong reference to `code`.
unsafe fn code_names(api: &Api, code: Obj) -> (Arc<str>, Arc<str>) {
    let (mut t, mut v, mut tb) = (std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut());
    (api.err_fetch)(&mut t, &mut v, &mut tb);
    let file = attr_str(api, code, c"co_filename");
    let function = attr_str(api, code, c"co_qualname").or_else(|| attr_str(api, code, c"co_name"));
    // Clears what a failed look-up raised, and puts back what was pending before.
    (api.err_restore)(t, v, tb);
    (
        Arc::from(file.as_deref().unwrap_or("??")),
        Arc::from(function.as_deref().unwrap_or("??")),
    )
}

/// `str(getattr(obj, name))` for a `str` attribute; `None` if missing or not text.
///
/// # Safety
/// Under the GIL, with a strong reference to `obj`.
unsafe fn attr_str(api: &Api, obj: Obj, name: &CStr) -> Option<String> {
    let value = (api.getattr)(obj, name.as_ptr());
    if value.is_null() {
        return None;
    }
    let mut len: isize = 0;
    let text = (api.utf8)(value, &mut len);
    let out = (!text.is_null() && len >= 0).then(|| {
        let bytes = std::slice::from_raw_parts(text as *const u8, len as usize);
        String::from_utf8_lossy(bytes).into_owned()
    });
    (api.decref)(value);
    out
}

/// Tests: the stack word of a Python frame, its code object named `file`, `function`.
#[cfg(test)]
pub(crate) fn test_word(file: &str, function: &str, line: u32) -> usize {
    let mut table = codes();
    let id = table.names.len() as u32;
    table.names.push((Arc::from(file), Arc::from(function)));
    pack(id, line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_python_in_a_rust_test_process() {
        // The test binary links no libpython: nothing found, nothing captured.
        assert!(!python_present());
        let mut out = [7usize; 4];
        assert_eq!(capture(&mut out), 0);
        assert_eq!(out, [7; 4], "nothing written");
    }

    #[test]
    fn a_stack_splits_at_the_mark() {
        let (a, b) = (
            test_word("train.py", "Model.step", 42),
            test_word("train.py", "Model.step", 7),
        );
        let raw = [0x1000, 0x2000, MARK, a, b];
        assert_eq!(native_part(&raw), &[0x1000, 0x2000]);
        let py = python_part(&raw);
        assert_eq!(py.len(), 2);
        assert_eq!((&*py[0].file, &*py[0].function, py[0].line), ("train.py", "Model.step", 42));
        assert_eq!(py[1].line, 7);
        assert!(python_part(&raw[..2]).is_empty());
        assert_eq!(native_part(&raw[..2]), &raw[..2]);
        // A word naming no code object reads as unknown, not a panic.
        let unknown = python_part(&[MARK, pack(u32::MAX - 1, 3)]);
        assert_eq!((&*unknown[0].file, unknown[0].line), ("??", 3));
    }
}
