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
//! thread has a Python thread state of its own (`PyGILState_GetThisThreadState`; PyTorch's
//! autograd and other C++ threads have none and get a native stack only). If that state is the
//! current one, the thread holds the GIL (`PyGILState_Check`'s test, without its shortcut that
//! answers 1 whenever the check is disabled) and the walk runs at once. If not, the thread
//! released the GIL around the call that allocates (ctypes.CDLL, `Py_BEGIN_ALLOW_THREADS`, and
//! every PyTorch operator: its Python bindings release the GIL before calling into ATen), and
//! the walk runs only when the caller allows taking the GIL back (`PyGILState_Ensure`, then
//! `PyGILState_Release`), as PyTorch's own memory history does: `python_frames:on` allows it on
//! the pluggable allocator's path (where PyTorch holds no lock of its own) from the main thread
//! (`Acquire::MainThread` says why), and `python_frames:acquire` everywhere from any thread (see
//! docs/pytorch.md for the deadlock and the abort at shutdown that it risks). Frees never walk Python (the free side stays as cheap as before).
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
    gil_ensure: unsafe extern "C" fn() -> c_int,
    gil_release: unsafe extern "C" fn(c_int),
    get_frame: unsafe extern "C" fn() -> Obj,
    frame_back: unsafe extern "C" fn(Obj) -> Obj,
    frame_code: unsafe extern "C" fn(Obj) -> Obj,
    frame_line: unsafe extern "C" fn(Obj) -> c_int,
    /// 3.11+: the frame's instruction offset, which with the code object fixes the line, so
    /// that CPython's line-table scan runs once per call site rather than per allocation.
    frame_lasti: Option<unsafe extern "C" fn(Obj) -> c_int>,
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
            current_state: resolve!(
                c"PyThreadState_GetUnchecked",
                c"_PyThreadState_UncheckedGet"
            )?,
            this_thread_state: resolve!(c"PyGILState_GetThisThreadState")?,
            gil_ensure: resolve!(c"PyGILState_Ensure")?,
            gil_release: resolve!(c"PyGILState_Release")?,
            get_frame: resolve!(c"PyEval_GetFrame")?,
            frame_back: resolve!(c"PyFrame_GetBack")?,
            frame_code: resolve!(c"PyFrame_GetCode")?,
            frame_line: resolve!(c"PyFrame_GetLineNumber")?,
            frame_lasti: resolve!(c"PyFrame_GetLasti"),
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

    /// Whether the calling thread holds the GIL, is a Python thread that released it, or
    /// neither (see the module doc).
    ///
    /// # Safety
    /// The functions are CPython's, callable from any thread at any time.
    unsafe fn gil(&self) -> Gil {
        if (self.is_initialized)() == 0 || (self.is_finalizing)() != 0 {
            return Gil::NotPython;
        }
        let mine = (self.this_thread_state)();
        if mine.is_null() {
            return Gil::NotPython;
        }
        // 3.12+: the current state is per thread, NULL once released; up to 3.11 it is the
        // holder's, whichever thread that is.
        if (self.current_state)() == mine {
            Gil::Held
        } else {
            Gil::Released
        }
    }
}

enum Gil {
    Held,
    /// This thread runs Python but let the GIL go around the call that allocates.
    Released,
    NotPython,
}

/// Whether CPython's functions were found in this process (resolving them on first call).
pub fn python_present() -> bool {
    API.get_or_init(Api::resolve).is_some()
}

/// Whether a capture may take the GIL back from a Python thread that released it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquire {
    Never,
    /// Only on the process's main thread. Python (up to 3.13) ends a daemon thread that waits
    /// for the GIL while the interpreter finalizes with `pthread_exit`, whose forced unwind
    /// through hbmalloc's frames aborts the process; the main thread is the one finalizing,
    /// and other non-daemon threads have been joined by then.
    MainThread,
    /// On any Python thread (`python_frames:acquire`: the user accepts that risk).
    AnyThread,
}

/// Writes the calling thread's Python stack into `out`, innermost first, as `pack`ed words;
/// returns how many. 0 without Python, on a thread that is not running Python, while the
/// interpreter finalizes, and on a Python thread that released the GIL unless `acquire` allows
/// taking it back for the walk (which may wait for another thread to let it go, and must not be
/// done where the caller holds a lock that a GIL holder may wait for).
#[inline]
pub fn capture(out: &mut [usize], acquire: Acquire) -> usize {
    match API.get_or_init(Api::resolve) {
        Some(api) if !out.is_empty() => capture_with(api, out, acquire),
        _ => 0,
    }
}

#[inline(never)]
fn capture_with(api: &Api, out: &mut [usize], acquire: Acquire) -> usize {
    // SAFETY: CPython's thread-state queries may be called without the GIL.
    match unsafe { api.gil() } {
        // SAFETY: this thread holds the GIL.
        Gil::Held => unsafe { walk(api, out) },
        Gil::Released if may_acquire(acquire) => {
            // SAFETY: this thread has its own thread state (gil()), so Ensure takes the GIL with
            // it (creating none) and Release gives it back, as the thread had it.
            unsafe {
                let state = (api.gil_ensure)();
                let n = walk(api, out);
                (api.gil_release)(state);
                n
            }
        }
        _ => 0,
    }
}

fn may_acquire(acquire: Acquire) -> bool {
    match acquire {
        Acquire::Never => false,
        // SAFETY: gettid and getpid have no preconditions. Not cached: a forked child's main
        // thread has a new id.
        Acquire::MainThread => unsafe { libc::gettid() == libc::getpid() },
        Acquire::AnyThread => true,
    }
}

/// # Safety
/// The calling thread holds the GIL.
unsafe fn walk(api: &Api, out: &mut [usize]) -> usize {
    // Every call below is made under the GIL, with references this function owns
    // (PyEval_GetFrame's borrowed frame is increfed first).
    let gc_was_on = api.gc_disable.map(|off| off() != 0);
    let mut frame = (api.get_frame)();
    let mut n = 0;
    if !frame.is_null() {
        (api.incref)(frame);
    }
    while !frame.is_null() && n < out.len() {
        let code = (api.frame_code)(frame);
        out[n] = frame_word(api, frame, code);
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

const CACHE_SLOTS: usize = 256;

#[derive(Clone, Copy)]
struct CacheEntry {
    code: usize,
    /// Instruction offset + 1 (0: not known, the entry names the code object only).
    lasti: u32,
    word: usize,
}

thread_local! {
    // `const` and `Copy` contents: no destructor, usable at exit and from any thread. 4 KiB.
    static CACHE: [Cell<CacheEntry>; CACHE_SLOTS] =
        const { [const { Cell::new(CacheEntry { code: 0, lasti: 0, word: 0 }) }; CACHE_SLOTS] };
}

/// A frame's stack word. Code objects are never freed once named (see the module doc), so a
/// code address and an instruction offset are one line for good and the per-thread cache needs
/// no invalidation. Without `PyFrame_GetLasti` (before 3.11) the line is computed each time.
///
/// # Safety
/// Under the GIL, with strong references to `frame` and its `code`.
#[inline]
unsafe fn frame_word(api: &Api, frame: Obj, code: Obj) -> usize {
    let addr = code as usize;
    let lasti = match api.frame_lasti {
        Some(lasti) => (lasti(frame).max(-1) + 1) as u32,
        None => 0,
    };
    let slot = ((addr >> 4) ^ (lasti as usize).wrapping_mul(0x9e37)) % CACHE_SLOTS;
    let hit = CACHE.with(|c| c[slot].get());
    if hit.code == addr && hit.lasti == lasti && addr != 0 {
        return match lasti {
            0 => hit.word | (api.frame_line)(frame).max(0) as usize,
            _ => hit.word,
        };
    }
    let id = pack(code_id(api, code), 0);
    let word = id | (api.frame_line)(frame).max(0) as usize;
    let entry = CacheEntry {
        code: addr,
        lasti,
        // Without an offset the entry holds the code's id only; the line is added per call.
        word: if lasti == 0 { id } else { word },
    };
    CACHE.with(|c| c[slot].set(entry));
    word
}

/// The id of a code object (`Codes`), naming it on first sight.
#[cold]
#[inline(never)]
fn code_id(api: &Api, code: Obj) -> u32 {
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
    let (mut t, mut v, mut tb) = (
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    );
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
        assert_eq!(capture(&mut out, Acquire::AnyThread), 0);
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
        assert_eq!(
            (&*py[0].file, &*py[0].function, py[0].line),
            ("train.py", "Model.step", 42)
        );
        assert_eq!(py[1].line, 7);
        assert!(python_part(&raw[..2]).is_empty());
        assert_eq!(native_part(&raw[..2]), &raw[..2]);
        // A word naming no code object reads as unknown, not a panic.
        let unknown = python_part(&[MARK, pack(u32::MAX - 1, 3)]);
        assert_eq!((&*unknown[0].file, unknown[0].line), ("??", 3));
    }
}
