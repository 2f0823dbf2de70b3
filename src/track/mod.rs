//! Allocation tracking: a registry of every live allocation with its call stack, leak reports
//! (text, JSON, SVG flame graph) at exit or on demand, double-free diagnostics, and an optional
//! timeline of alloc/free events.
//!
//! The core is `Tracker`, which takes its `Settings` explicitly (tests build their own). The free
//! functions below drive one process-wide `Tracker` built from `HBMALLOC_CONF` on first use; that
//! is what the tracking adaptor (`crate::tracked`) calls.
//!
//! Decision: tracking is always on. The registry is what makes `hbm_leaks_since`, on-demand
//! reports and double-free diagnostics work, and without backtraces it costs tens of nanoseconds
//! per alloc+free (bench/BENCHMARKS.md). `backtrace:off` skips the stack capture (entries are then
//! site-less); `leak_report:off` only silences the report at exit.
//!
//! Layout: `capture` (raw return addresses), `python_frames` (the Python stack beside them),
//! `stacks` (interning), `registry` (the `Tracker`) with
//! `live_table` (live and recently freed allocations), `freed` (bad-free diagnostics),
//! `symbolize`, `report` (the leak report's model) with `report_text`, `report_json`,
//! `report_svg`, `timeline` with `timeline_svg`, `exit`.

pub mod capture;
mod exit;
pub mod freed;
pub mod live_table;
pub mod python_frames;
pub mod registry;
pub mod report;
mod report_json;
mod report_svg;
mod report_text;
pub mod stacks;
pub mod symbolize;
pub mod timeline;
pub mod timeline_svg;
pub mod trace;

use crate::config::{self, Config, LeakReport, PythonFrames, StackWalk};
use crate::process::init::InitCell;

pub use capture::Unwinder;
#[cfg(test)]
pub(crate) use exit::begin_exit;
pub use exit::{exiting, install_exit_report, set_exit_summaries};
pub use freed::BadFree;
pub use registry::{Live, Refused, Tracker};
pub use stacks::StackId;

/// Which entry point handed out an allocation. Four bytes, so that `Live` is whole words (a
/// one-byte field made the compiler copy its tail byte by byte, which stalled the wide loads
/// after it on the free path).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum Origin {
    CudaMalloc,
    CudaMallocAsync,
    HbmAlloc,
    Pool,
    KvCache,
    /// Pinned host memory from the host pool, by `cudaMallocHost` / `cudaHostAlloc`.
    CudaMallocHost,
    CudaHostAlloc,
    /// Write-combined pinned memory: the runtime's own `cudaHostAlloc`, forwarded (not pooled).
    CudaHostAllocWriteCombined,
    /// The runtime's own `cudaMallocManaged`, forwarded (not pooled).
    CudaMallocManaged,
    /// PyTorch's pluggable allocator (`hbm_torch_malloc`): the caching pool, stream-ordered.
    TorchMalloc,
    /// Pitched linear memory from the caching pool (`cudaMallocPitch`, `cudaMalloc3D`); freed by
    /// `cudaFree` like `cudaMalloc` memory.
    CudaMallocPitch,
    CudaMalloc3D,
    /// The driver API's `cuMemAlloc_v2`, from the caching pool of the current primary context.
    CuMemAlloc,
    /// CUDA arrays: the runtime's own, forwarded and recorded (keyed by their handle).
    CudaMallocArray,
    CudaMalloc3DArray,
    /// Stream-ordered memory from a pool the program made (`cudaMallocFromPoolAsync`), or
    /// imported from another process's pool (`cudaMemPoolImportPointer`): the runtime's own,
    /// forwarded and recorded; freed by `cudaFree`/`cudaFreeAsync`, forwarded.
    CudaMallocFromPoolAsync,
    CudaMemPoolImportPointer,
    /// A host range page-locked by `cudaHostRegister`, until `cudaHostUnregister`.
    CudaHostRegister,
}

impl Origin {
    pub fn name(self) -> &'static str {
        match self {
            Origin::CudaMalloc => "cudaMalloc",
            Origin::CudaMallocAsync => "cudaMallocAsync",
            // The C functions as users call them.
            Origin::HbmAlloc => "hbm_device_alloc",
            Origin::Pool => "hbm_pool_alloc",
            Origin::KvCache => "kv_cache",
            Origin::CudaMallocHost => "cudaMallocHost",
            Origin::CudaHostAlloc => "cudaHostAlloc",
            Origin::CudaHostAllocWriteCombined => "cudaHostAlloc(WriteCombined)",
            Origin::CudaMallocManaged => "cudaMallocManaged",
            Origin::TorchMalloc => "hbm_torch_malloc",
            Origin::CudaMallocPitch => "cudaMallocPitch",
            Origin::CudaMalloc3D => "cudaMalloc3D",
            Origin::CuMemAlloc => "cuMemAlloc",
            Origin::CudaMallocArray => "cudaMallocArray",
            Origin::CudaMalloc3DArray => "cudaMalloc3DArray",
            Origin::CudaMallocFromPoolAsync => "cudaMallocFromPoolAsync",
            Origin::CudaMemPoolImportPointer => "cudaMemPoolImportPointer",
            Origin::CudaHostRegister => "cudaHostRegister",
        }
    }
}

/// Bytes and allocations, as in "N bytes leaked in M allocations".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeakSummary {
    pub bytes: u64,
    pub count: u64,
}

/// What a `Tracker` records and what its exit report writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Capture a call stack per allocation and per free.
    pub backtrace: bool,
    /// With `backtrace`, also record the Python stack of allocations (`python_frames`).
    pub python_frames: PythonFrames,
    pub unwinder: Unwinder,
    /// Frames kept per call site in reports, after the tracker's own frames are left out.
    pub max_frames: usize,
    pub leak_report: LeakReport,
    /// Text report file; `None` = stderr.
    pub report_path: Option<std::path::PathBuf>,
    pub report_json: Option<std::path::PathBuf>,
    pub report_svg: Option<std::path::PathBuf>,
    /// Capacity of the alloc/free event ring; 0 = no timeline.
    pub timeline: usize,
    /// `trace:FILE`: one line per allocation and free (see `trace`).
    pub trace: Option<std::path::PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings::from_config(&Config::default())
    }
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Settings {
        Settings {
            backtrace: cfg.backtrace,
            python_frames: cfg.python_frames,
            unwinder: match cfg.unwinder {
                StackWalk::FramePointer => Unwinder::FramePointer,
                StackWalk::Dwarf => Unwinder::Dwarf,
            },
            max_frames: cfg.max_frames.clamp(1, capture::MAX_FRAMES),
            leak_report: cfg.leak_report,
            report_path: cfg.report_path.clone(),
            report_json: cfg.report_json.clone(),
            report_svg: cfg.report_svg.clone(),
            timeline: cfg.timeline,
            trace: cfg.trace.clone(),
        }
    }
}

/// An `InitCell`: a fork waits for the tracker's set-up (`process::init`).
static GLOBAL: InitCell<Tracker> = InitCell::new("track::global");

/// The process-wide tracker, built from `HBMALLOC_CONF` on first use. Building it also registers
/// the exit report, so every entry point that records an allocation gets one.
pub fn global() -> &'static Tracker {
    GLOBAL.get_or_init(|| {
        let tracker = Tracker::new(Settings::from_config(config::get()));
        // The unit-test process frees bad pointers on purpose in many tests at once: its exit
        // report would read like a failure among passing tests. Tests of the exit report run in
        // child processes (`test_child`), which install it.
        #[cfg(test)]
        let wanted = crate::test_child::is_child();
        #[cfg(not(test))]
        let wanted = true;
        if wanted {
            install_exit_report();
        }
        tracker
    })
}

/// The global tracker if anything has been recorded; the exit report uses it so that a process
/// that never allocated does not build one at exit.
pub(crate) fn global_if_started() -> Option<&'static Tracker> {
    GLOBAL.get()
}

/// In a child after `fork`: drops the table keys threads the child lacks were holding.
/// The global tracker's lock, held for `fork` (`runtime::fork`); `None` before any tracking.
pub fn lock_for_fork() -> Option<live_table::OverflowLock<'static>> {
    GLOBAL.get().map(Tracker::lock_for_fork)
}

pub fn after_fork_child() {
    if let Some(t) = GLOBAL.get() {
        t.after_fork_child();
    }
}

/// Records a new live allocation in the global tracker (and its stack, if `backtrace:on`).
#[inline]
pub fn on_alloc(ptr: usize, size: usize, device: i32, stream: usize, origin: Origin) {
    global().on_alloc(ptr, size, device, stream, origin);
}

/// Records a free. True if `ptr` was live. Otherwise prints one diagnostic to stderr: where the
/// block was allocated and first freed (for a double free), or that the pointer is unknown.
#[inline]
pub fn on_free(ptr: usize) -> bool {
    match global().on_free(ptr) {
        Ok(_) => true,
        Err(bad) => {
            global().print_bad_free(&bad);
            false
        }
    }
}

/// Always true: see the module doc for why the registry is never switched off.
pub fn enabled() -> bool {
    true
}

/// Starts a new checkpoint epoch and returns it as a mark: allocations made after this call returns
/// (by this thread, or by threads synchronized with it) are "since" the mark; allocations racing
/// with the call from other threads may fall on either side. See `Tracker::checkpoint`.
pub fn checkpoint() -> u64 {
    global().checkpoint()
}

/// Allocations made since `mark` (from `checkpoint`) that are still live.
pub fn leaks_since(mark: u64) -> LeakSummary {
    global().leaks_since(mark)
}

/// Writes the full text leak report of the global tracker to `path`, or to stderr for `None`.
pub fn write_report(path: Option<&str>) -> std::io::Result<()> {
    global().write_text_report(path, LeakReport::Full)
}

/// Prints the diagnostic of a bad free (`Tracker::reject`).
#[cold]
pub fn report_bad_free(bad: &BadFree) {
    global().print_bad_free(bad);
}
