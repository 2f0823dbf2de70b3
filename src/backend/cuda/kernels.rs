//! The CUDA kernels in `kernels/*.cu`, compiled at run time by NVRTC (no CUDA toolkit at build
//! time), loaded once per device, and launched on a caller's stream.
//!
//! NVRTC and the driver are loaded with `dlopen` by cudarc, which panics when a library is missing:
//! every path here asks `is_culib_present()` first. The sources include nothing, so they compile
//! wherever `libnvrtc.so` alone is present (the `nvidia-cuda-nvrtc` wheel is enough).

use crate::backend::MAX_DEVICES;
use crate::backend::{AppendJob, DecodeAttention, DevicePtr, GatherJob, Stream};
use crate::dtype::HbmType;
use crate::error::{Error, Result};
use cudarc::driver::sys as cu;
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use once_cell::sync::OnceCell;
use std::ffi::{c_void, CString};

/// KV cache kernels: `hbm_kv_append_*` and `hbm_kv_dequantize_*`, one of each per kind of cache
/// type (`KV_ENTRIES`).
pub const KV_QUANT_CU: &str = include_str!("../../../kernels/kv_quant.cu");

/// The entry points of `kernels/kv_quant.cu`: appends, then dequantizes, each for F32/F16/BF16
/// tensors, Q8_0 and Q4_0; then the Q8_0 and Q4_0 appends from a 16-byte aligned F16 source.
pub const KV_ENTRIES: [&str; 8] = [
    "hbm_kv_append_plain",
    "hbm_kv_append_q8_0",
    "hbm_kv_append_q4_0",
    "hbm_kv_dequantize_plain",
    "hbm_kv_dequantize_q8_0",
    "hbm_kv_dequantize_q4_0",
    "hbm_kv_append_q8_0_f16",
    "hbm_kv_append_q4_0_f16",
];

/// The paged cache's kernels (`kernels/paged_kv.cu`): batched appends and gathers, and the
/// reference decode attention. They use `kv_quant.cu`'s bodies, so they compile after it as one
/// module: `PAGED_MODULE`, which is what a device loads.
pub const PAGED_KV_CU: &str = include_str!("../../../kernels/paged_kv.cu");

/// `kv_quant.cu` then `paged_kv.cu`: the one module loaded per device.
pub const PAGED_MODULE: &str = concat!(
    include_str!("../../../kernels/kv_quant.cu"),
    "\n",
    include_str!("../../../kernels/paged_kv.cu")
);

/// The entry points of `kernels/paged_kv.cu`: batched appends (F32/F16/BF16, Q8_0, Q4_0, then
/// Q8_0 and Q4_0 from aligned F16), batched gathers (F32/F16/BF16, Q8_0, Q4_0), attention.
pub const PAGED_ENTRIES: [&str; 9] = [
    "hbm_paged_append_plain",
    "hbm_paged_append_q8_0",
    "hbm_paged_append_q4_0",
    "hbm_paged_append_q8_0_f16",
    "hbm_paged_append_q4_0_f16",
    "hbm_paged_gather_plain",
    "hbm_paged_gather_q8_0",
    "hbm_paged_gather_q4_0",
    "hbm_paged_decode_attention",
];

/// Every kernel source by file name, each as NVRTC compiles it (`paged_kv.cu` after
/// `kv_quant.cu`, whose bodies it runs).
pub const SOURCES: &[(&str, &str)] = &[("kv_quant.cu", KV_QUANT_CU), ("paged_kv.cu", PAGED_MODULE)];

/// Most jobs (`gridDim.y`) per batched launch.
const MAX_JOBS: usize = 65535;

/// Threads of the reference attention kernel: `HBM_ATTN_THREADS` in `kernels/paged_kv.cu`.
const ATTN_THREADS: u32 = 128;

/// Options every kernel is compiled with. `--fmad=false` keeps `x * id + 8.5f` two roundings, as
/// ggml's reference computes it; precise division and no flush-to-zero for the same reason.
const NVRTC_OPTIONS: [&str; 4] = [
    "--fmad=false",
    "--ftz=false",
    "--prec-div=true",
    "--prec-sqrt=true",
];

/// Threads per block of the F32/F16/BF16 kernels: `HBM_THREADS` in `kernels/kv_quant.cu`.
const BLOCK_THREADS: u32 = 256;

/// Threads per block of the Q8_0/Q4_0 kernels: `HBM_QUANT_THREADS`, whose shared staging (two
/// stages per warp, within the 48 KiB of static shared memory) has room for exactly this many
/// warps.
const QUANT_THREADS: u32 = 128;

/// Threads per block of the kernels for tensors of type `ty`.
fn block_threads(ty: HbmType) -> u32 {
    if ty.is_quantized() {
        QUANT_THREADS
    } else {
        BLOCK_THREADS
    }
}

/// Most blocks per launch; the kernels loop grid-stride over the rest.
const MAX_GRID: u64 = 1 << 16;

/// Units each thread of the F32/F16/BF16 kernels moves per pass: `HBM_UNITS` in
/// `kernels/kv_quant.cu`.
const PLAIN_UNITS: u64 = 8;

/// Elements per unit of the F32/F16/BF16 kernels' vector path: 8 when both sides are 2-byte
/// types (one 16-byte access each), else 4.
fn unit_elems(ty: HbmType, plain: HbmType) -> u64 {
    if ty != HbmType::F32 && plain != HbmType::F32 {
        8
    } else {
        4
    }
}

/// Threads a launch needs for `n_rows` rows of `row_elems` elements of the cache type `ty`, whose
/// other side is `plain` (F32 or F16): one per 32-element block for Q8_0/Q4_0 (a warp per tile
/// of 32 blocks), one per `PLAIN_UNITS` units otherwise (the kernels' vector path; their
/// one-element fallback loops over the same grid). The grid only sets speed: every loop in the
/// kernels is grid-stride.
fn threads_for(ty: HbmType, plain: HbmType, row_elems: u32, n_rows: u32) -> u64 {
    let elems = n_rows as u64 * row_elems as u64;
    if ty.is_quantized() {
        elems / 32
    } else {
        elems.div_ceil(unit_elems(ty, plain) * PLAIN_UNITS)
    }
}

/// Most blocks per launch of a Q8_0/Q4_0 kernel whose other side is F16, in waves of the blocks
/// resident on the whole device at once. Each warp then loops over many tiles, so that its
/// cp.async prefetch of the next tiles overlaps its work: with a tile per warp (the grid of one
/// thread per block) no warp ever prefetched; it loaded its tile, waited, worked and exited.
/// Measured on an H200 (1024-element rows): dequantize to F16 0.81/0.86 -> 0.88/0.90 of copy
/// (Q4_0/Q8_0) at 2 waves (0.88/0.88 at 1, 0.90/0.92 at 4). Launches with an F32 side keep a
/// tile per warp: a wave or two cost them 0.05-0.08 (dequantize from Q4_0 0.94 -> 0.87).
const QUANT_WAVES: u64 = 2;

/// `max_grid` of `KvKernels` for `functions` (`KV_ENTRIES` order), in the current context.
fn quant_grid_caps(functions: &[cu::CUfunction; 8]) -> Result<[u64; 8]> {
    let mut caps = [MAX_GRID; 8];
    let mut dev: cu::CUdevice = 0;
    // SAFETY: out-parameter only; the caller has a current context.
    check("cuCtxGetDevice", unsafe { cu::cuCtxGetDevice(&mut dev) })?;
    let mut sms = 0i32;
    // SAFETY: out-parameter only.
    check("cuDeviceGetAttribute", unsafe {
        cu::cuDeviceGetAttribute(
            &mut sms,
            cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            dev,
        )
    })?;
    for (i, cap) in caps.iter_mut().enumerate() {
        if i == 0 || i == 3 {
            continue; // F32/F16/BF16: not capped
        }
        let mut per_sm = 0i32;
        // SAFETY: `functions[i]` is a loaded kernel; out-parameter only.
        check("cuOccupancyMaxActiveBlocksPerMultiprocessor", unsafe {
            cu::cuOccupancyMaxActiveBlocksPerMultiprocessor(
                &mut per_sm,
                functions[i],
                QUANT_THREADS as i32,
                0,
            )
        })?;
        *cap = (QUANT_WAVES * sms.max(1) as u64 * per_sm.max(1) as u64).min(MAX_GRID);
    }
    Ok(caps)
}

/// Index in `KV_ENTRIES` (less 3 for the dequantizes) of the kernel for tensors of type `ty`.
fn kind(ty: HbmType) -> usize {
    match ty {
        HbmType::Q8_0 => 1,
        HbmType::Q4_0 => 2,
        _ => 0,
    }
}

/// Whether `libnvrtc` can be loaded (found through the loader's path, e.g. `LD_LIBRARY_PATH`).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library under its usual names; calls nothing in it.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles kernel source `src` (named `name` in messages) to PTX for `arch`, a virtual
/// architecture such as `compute_80` or `compute_90`. The error is NVRTC's log.
pub fn compile(name: &str, src: &str, arch: &str) -> std::result::Result<String, String> {
    let digits = arch.strip_prefix("compute_").unwrap_or("");
    if digits.is_empty()
        || !digits
            .trim_end_matches('a')
            .chars()
            .all(|c| c.is_ascii_digit())
    {
        return Err(format!(
            "{arch:?} is not a virtual architecture like compute_80"
        ));
    }
    if !nvrtc_available() {
        return Err("libnvrtc could not be loaded; see scripts/nvrtc-env.sh".into());
    }
    let mut options: Vec<String> = NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    let opts = CompileOptions {
        options,
        name: Some(name.to_string()),
        ..Default::default()
    };
    compile_ptx_with_opts(src, opts)
        .map(|ptx| ptx.to_src())
        .map_err(|e| format!("{name} for {arch}: {e}"))
}

/// Compiles the KV cache kernels (`PAGED_MODULE`: `kernels/kv_quant.cu` and
/// `kernels/paged_kv.cu`) to PTX for `arch` (`compute_90`, ...).
pub fn compile_ptx(arch: &str) -> std::result::Result<String, String> {
    compile("paged_kv.cu", PAGED_MODULE, arch)
}

fn check(call: &'static str, rc: cu::CUresult) -> Result<()> {
    if rc == cu::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::Driver {
            call,
            code: rc as i32,
        })
    }
}

/// The KV kernels loaded into one device's context.
pub struct KvKernels {
    module: cu::CUmodule,
    /// `KV_ENTRIES`, in order.
    functions: [cu::CUfunction; 8],
    /// Most blocks of each function per launch with an F16 side (`KV_ENTRIES` order):
    /// `QUANT_WAVES` of the device's resident blocks for the Q8_0/Q4_0 kernels, `MAX_GRID` for
    /// the others.
    max_grid: [u64; 8],
    /// `PAGED_ENTRIES`, in order.
    paged: [cu::CUfunction; 9],
    /// Most blocks per batched launch (all jobs together) of each `PAGED_ENTRIES` append and
    /// gather with an F16 side, as `max_grid`.
    paged_grid: [u64; 9],
}

// SAFETY: module and function handles are plain driver handles, valid from any thread while
// their context lives; the driver serializes what needs serializing.
unsafe impl Send for KvKernels {}
// SAFETY: as above; launching through a shared handle is what the driver API is made for.
unsafe impl Sync for KvKernels {}

static LOADED: [OnceCell<KvKernels>; MAX_DEVICES] = [const { OnceCell::new() }; MAX_DEVICES];

impl KvKernels {
    /// Loads PTX from `compile_ptx` into the current context.
    pub fn load(ptx: &str) -> Result<KvKernels> {
        // SAFETY: only dlopens the driver library.
        if !unsafe { cu::is_culib_present() } {
            return Err(Error::NotSupported("CUDA driver not present"));
        }
        let image = CString::new(ptx).map_err(|_| Error::InvalidValue("PTX contains a NUL"))?;
        let mut module = std::ptr::null_mut();
        // SAFETY: `image` is NUL-terminated PTX; `module` receives the handle.
        check("cuModuleLoadData", unsafe {
            cu::cuModuleLoadData(&mut module, image.as_ptr().cast())
        })?;
        let get = |name: &std::ffi::CStr| {
            let mut f = std::ptr::null_mut();
            // SAFETY: `module` was just loaded; `name` is NUL-terminated.
            check("cuModuleGetFunction", unsafe {
                cu::cuModuleGetFunction(&mut f, module, name.as_ptr())
            })
            .map(|_| f)
        };
        let mut functions = [std::ptr::null_mut(); 8];
        for (f, name) in functions.iter_mut().zip(KV_ENTRIES) {
            let name = CString::new(name).expect("entry names hold no NUL");
            match get(&name) {
                Ok(g) => *f = g,
                Err(e) => {
                    // SAFETY: the module is ours and nothing uses it yet.
                    unsafe { cu::cuModuleUnload(module) };
                    return Err(e);
                }
            }
        }
        let mut paged = [std::ptr::null_mut(); 9];
        let mut found = Ok(());
        for (f, name) in paged.iter_mut().zip(PAGED_ENTRIES) {
            let name = CString::new(name).expect("entry names hold no NUL");
            match get(&name) {
                Ok(g) => *f = g,
                Err(e) => {
                    found = Err(e);
                    break;
                }
            }
        }
        let caps = found.and_then(|_| {
            let max_grid = quant_grid_caps(&functions)?;
            // The batched kernels share their per-tensor bodies' occupancy.
            let same = [0, 1, 2, 6, 7, 3, 4, 5];
            let mut paged_grid = [MAX_GRID; 9];
            for (p, &f) in paged_grid.iter_mut().zip(&same) {
                *p = max_grid[f];
            }
            Ok((max_grid, paged_grid))
        });
        let (max_grid, paged_grid) = match caps {
            Ok(c) => c,
            Err(e) => {
                // SAFETY: the module is ours and nothing uses it yet.
                unsafe { cu::cuModuleUnload(module) };
                return Err(e);
            }
        };
        Ok(KvKernels {
            module,
            functions,
            max_grid,
            paged,
            paged_grid,
        })
    }

    /// The kernels for `device`, compiled for the virtual architecture `arch()` gives
    /// (`compute_90`, ...) and loaded on first use; later calls cost one load. The caller has made
    /// `device`'s context current.
    pub fn for_device(
        device: i32,
        arch: impl FnOnce() -> Result<String>,
    ) -> Result<&'static KvKernels> {
        let slot = LOADED
            .get(usize::try_from(device).map_err(|_| Error::InvalidDevice(device))?)
            .ok_or(Error::InvalidDevice(device))?;
        slot.get_or_try_init(|| {
            let ptx = compile_ptx(&arch()?).map_err(|log| {
                eprintln!("hbmalloc: NVRTC failed: {log}");
                Error::NotSupported("NVRTC compilation of the KV kernels")
            })?;
            KvKernels::load(&ptx)
        })
    }

    fn launch(
        &self,
        entry: usize,
        f16_side: bool,
        threads: u64,
        block: u32,
        args: &mut [*mut c_void],
        stream: Stream,
    ) -> Result<()> {
        if threads == 0 {
            return Ok(());
        }
        let f = self.functions[entry];
        let most = if f16_side {
            self.max_grid[entry]
        } else {
            MAX_GRID
        };
        let grid = threads.div_ceil(block as u64).min(most) as u32;
        // SAFETY: `f` belongs to this module; `args` points at values of the kernel's parameter
        // types, in order, alive for the call; the stream is the caller's.
        check("cuLaunchKernel", unsafe {
            cu::cuLaunchKernel(
                f,
                grid,
                1,
                1,
                block,
                1,
                1,
                0,
                stream as cu::CUstream,
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }

    /// Queues on `stream` the append of `n_rows` rows of `row_elems` elements from `src` (F32 or
    /// F16, contiguous) into the tensor at `dst` (row `p` at `dst + p * dst_row_stride`), at rows
    /// `positions[i]` (a device array of `n_rows` ints) or, when `positions` is 0, `pos0 + i`.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_append(
        &self,
        src: DevicePtr,
        src_type: HbmType,
        dst: DevicePtr,
        dst_type: HbmType,
        dst_row_stride: usize,
        row_elems: u32,
        positions: DevicePtr,
        pos0: i64,
        n_rows: u32,
        stream: Stream,
    ) -> Result<()> {
        if !matches!(src_type, HbmType::F32 | HbmType::F16) {
            return Err(Error::InvalidValue("append reads F32 or F16"));
        }
        check_rows(dst_type, dst_row_stride, row_elems)?;
        let (mut src, mut st, mut dst, mut dt) =
            (src as u64, src_type as i32, dst as u64, dst_type as i32);
        let (mut stride, mut elems, mut pos) =
            (dst_row_stride as u64, row_elems as i32, positions as u64);
        let (mut pos0, mut rows) = (pos0, n_rows as i32);
        let mut args = [
            arg(&mut src),
            arg(&mut st),
            arg(&mut dst),
            arg(&mut dt),
            arg(&mut stride),
            arg(&mut elems),
            arg(&mut pos),
            arg(&mut pos0),
            arg(&mut rows),
        ];
        // Q8_0/Q4_0 from an aligned F16 source: the kernels with deeper prefetch.
        let entry = match kind(dst_type) {
            k @ (1 | 2) if src_type == HbmType::F16 && src % 16 == 0 => 5 + k,
            k => k,
        };
        self.launch(
            entry,
            src_type == HbmType::F16,
            threads_for(dst_type, src_type, row_elems, n_rows),
            block_threads(dst_type),
            &mut args,
            stream,
        )
    }

    /// Queues on `stream` the conversion of rows `row0 .. row0 + n_rows` of the tensor at `src`
    /// (row stride `src_row_stride`) into `dst` as F32 or F16, contiguous.
    #[allow(clippy::too_many_arguments)]
    pub fn launch_dequantize(
        &self,
        src: DevicePtr,
        src_type: HbmType,
        src_row_stride: usize,
        row0: i64,
        n_rows: u32,
        row_elems: u32,
        dst: DevicePtr,
        dst_type: HbmType,
        stream: Stream,
    ) -> Result<()> {
        if !matches!(dst_type, HbmType::F32 | HbmType::F16) {
            return Err(Error::InvalidValue("dequantize writes F32 or F16"));
        }
        check_rows(src_type, src_row_stride, row_elems)?;
        let (mut src, mut st, mut stride, mut row0) =
            (src as u64, src_type as i32, src_row_stride as u64, row0);
        let (mut rows, mut elems, mut dst, mut dt) =
            (n_rows as i32, row_elems as i32, dst as u64, dst_type as i32);
        let mut args = [
            arg(&mut src),
            arg(&mut st),
            arg(&mut stride),
            arg(&mut row0),
            arg(&mut rows),
            arg(&mut elems),
            arg(&mut dst),
            arg(&mut dt),
        ];
        self.launch(
            3 + kind(src_type),
            dst_type == HbmType::F16,
            threads_for(src_type, dst_type, row_elems, n_rows),
            block_threads(src_type),
            &mut args,
            stream,
        )
    }
}

impl KvKernels {
    /// Launches `f` over `grid` x `n_jobs` blocks (`gridDim.y` in chunks of `MAX_JOBS`, the job
    /// array advanced by `job_bytes` each), passing the chunk's job array, then `tail`.
    #[allow(clippy::too_many_arguments)]
    fn launch_jobs(
        &self,
        f: cu::CUfunction,
        grid: u64,
        block: u32,
        jobs: DevicePtr,
        n_jobs: usize,
        job_bytes: usize,
        (mut st, mut dt): (i32, i32),
        stream: Stream,
    ) -> Result<()> {
        let mut first = 0;
        while first < n_jobs {
            let n = (n_jobs - first).min(MAX_JOBS);
            let mut ptr = (jobs + first * job_bytes) as u64;
            let mut args = [arg(&mut ptr), arg(&mut st), arg(&mut dt)];
            // SAFETY: `f` belongs to this module and takes (job array, int, int); `args` points
            // at values of those types alive for the call; the stream is the caller's.
            check("cuLaunchKernel", unsafe {
                cu::cuLaunchKernel(
                    f,
                    grid.max(1) as u32,
                    n as u32,
                    1,
                    block,
                    1,
                    1,
                    0,
                    stream as cu::CUstream,
                    args.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            })?;
            first += n;
        }
        Ok(())
    }

    /// The x extent of a batched launch: enough for the largest job, and for F16-side quantized
    /// kernels at most their resident-wave cap spread over all jobs.
    fn jobs_grid(
        &self,
        entry: usize,
        f16_side: bool,
        threads: u64,
        block: u32,
        n_jobs: usize,
    ) -> u64 {
        let most = if f16_side {
            (self.paged_grid[entry] / n_jobs.min(MAX_JOBS) as u64).max(1)
        } else {
            MAX_GRID
        };
        threads.div_ceil(block as u64).min(most)
    }

    /// Queues on `stream` every append of `jobs` (host copy; `device_jobs` the same array in
    /// device memory) in one launch per `MAX_JOBS` jobs. Checked by the caller
    /// (`check_append_jobs`).
    pub fn launch_append_jobs(
        &self,
        jobs: &[AppendJob],
        device_jobs: DevicePtr,
        src_type: HbmType,
        dst_type: HbmType,
        stream: Stream,
    ) -> Result<()> {
        if !matches!(src_type, HbmType::F32 | HbmType::F16) {
            return Err(Error::InvalidValue("append reads F32 or F16"));
        }
        let rows = jobs
            .iter()
            .map(|j| (j.dst_row_stride, j.row_elems, j.n_rows));
        let Some(extent) = batch_extent(dst_type, rows)? else {
            return Ok(());
        };
        let aligned = jobs.iter().all(|j| j.src % 16 == 0);
        let entry = match kind(dst_type) {
            k @ (1 | 2) if src_type == HbmType::F16 && aligned => k + 2,
            k => k,
        };
        let batch = Batch::of::<AppendJob>(device_jobs, jobs.len(), dst_type, src_type, extent);
        self.launch_batch(entry, batch, (src_type, dst_type), stream)
    }

    /// Queues on `stream` every gather of `jobs` (as `launch_append_jobs`).
    pub fn launch_gather_jobs(
        &self,
        jobs: &[GatherJob],
        device_jobs: DevicePtr,
        src_type: HbmType,
        dst_type: HbmType,
        stream: Stream,
    ) -> Result<()> {
        if !matches!(dst_type, HbmType::F32 | HbmType::F16) {
            return Err(Error::InvalidValue("dequantize writes F32 or F16"));
        }
        let rows = jobs
            .iter()
            .map(|j| (j.src_row_stride, j.row_elems, j.n_rows));
        let Some(extent) = batch_extent(src_type, rows)? else {
            return Ok(());
        };
        let batch = Batch::of::<GatherJob>(device_jobs, jobs.len(), src_type, dst_type, extent);
        self.launch_batch(5 + kind(src_type), batch, (src_type, dst_type), stream)
    }

    /// Launches kernel `entry` of the paged module over `batch`, sized by its cache-side type.
    fn launch_batch(
        &self,
        entry: usize,
        batch: Batch,
        (src_type, dst_type): (HbmType, HbmType),
        stream: Stream,
    ) -> Result<()> {
        let (elems, rows) = batch.extent;
        let block = block_threads(batch.cache_type);
        let threads = threads_for(batch.cache_type, batch.plain_type, elems, rows);
        let f16_side = batch.plain_type == HbmType::F16;
        let grid = self.jobs_grid(entry, f16_side, threads, block, batch.n_jobs);
        self.launch_jobs(
            self.paged[entry],
            grid,
            block,
            batch.jobs,
            batch.n_jobs,
            batch.job_bytes,
            (src_type as i32, dst_type as i32),
            stream,
        )
    }

    /// Queues on `stream` the reference decode attention (`DecodeAttention`): one block per
    /// (query head, sequence), the sequence's scores in shared memory (`max_len` of them, at
    /// most 48 KiB with the query).
    pub fn launch_decode_attention(&self, a: &DecodeAttention, stream: Stream) -> Result<()> {
        crate::backend::check_decode_attention(a)?;
        let shared = (a.head_dim_k as usize + a.max_len as usize) * 4;
        if a.n_seqs == 0 {
            return Ok(());
        }
        let (mut q, mut out, mut k, mut v) = (a.q as u64, a.out as u64, a.k as u64, a.v as u64);
        let (mut ty, mut k_row, mut v_row) = (a.kv_type as i32, a.k_row as u64, a.v_row as u64);
        let (mut table, mut stride) = (a.block_table as u64, a.table_stride as i32);
        let (mut rows, mut lens, mut bt) =
            (a.table_rows as u64, a.lens as u64, a.block_tokens as i32);
        let (mut nh, mut nkv) = (a.n_heads as i32, a.n_kv_heads as i32);
        let (mut dk, mut dv, mut scale) = (a.head_dim_k as i32, a.head_dim_v as i32, a.scale);
        let mut args = [
            arg(&mut q),
            arg(&mut out),
            arg(&mut k),
            arg(&mut v),
            arg(&mut ty),
            arg(&mut k_row),
            arg(&mut v_row),
            arg(&mut table),
            arg(&mut stride),
            arg(&mut rows),
            arg(&mut lens),
            arg(&mut bt),
            arg(&mut nh),
            arg(&mut nkv),
            arg(&mut dk),
            arg(&mut dv),
            arg(&mut scale),
        ];
        // SAFETY: the function belongs to this module; `args` match its parameters in type and
        // order and live for the call; the stream is the caller's.
        check("cuLaunchKernel", unsafe {
            cu::cuLaunchKernel(
                self.paged[8],
                a.n_heads,
                a.n_seqs,
                1,
                ATTN_THREADS,
                1,
                1,
                shared as u32,
                stream as cu::CUstream,
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }
}

impl Drop for KvKernels {
    fn drop(&mut self) {
        // SAFETY: the module is ours; kernels cached in `LOADED` are never dropped (no CUDA at exit).
        unsafe { cu::cuModuleUnload(self.module) };
    }
}

fn arg<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast()
}

/// A batch of paged jobs in device memory: the cache side's type (quantized or not) sizes the
/// launch, the plain side (F32 or F16) says whether the F16 kernels' wave cap applies.
struct Batch {
    jobs: DevicePtr,
    n_jobs: usize,
    job_bytes: usize,
    cache_type: HbmType,
    plain_type: HbmType,
    /// The longest row and the most rows of any job.
    extent: (u32, u32),
}

impl Batch {
    fn of<J>(
        jobs: DevicePtr,
        n_jobs: usize,
        cache: HbmType,
        plain: HbmType,
        extent: (u32, u32),
    ) -> Self {
        Batch {
            jobs,
            n_jobs,
            job_bytes: std::mem::size_of::<J>(),
            cache_type: cache,
            plain_type: plain,
            extent,
        }
    }
}

/// The longest row and the most rows over a batch's jobs (row stride, row elements, rows), each
/// job's cache-side rows checked; `None` when there is nothing to launch.
fn batch_extent(
    cache_type: HbmType,
    jobs: impl Iterator<Item = (u64, u32, u32)>,
) -> Result<Option<(u32, u32)>> {
    let (mut elems, mut rows, mut any) = (0, 0, false);
    for (stride, row_elems, n_rows) in jobs {
        check_rows(cache_type, stride as usize, row_elems)?;
        elems = elems.max(row_elems);
        rows = rows.max(n_rows);
        any = true;
    }
    Ok((any && rows > 0).then_some((elems, rows)))
}

/// A row must be whole blocks, fit the stride, and keep every row aligned for its element type.
fn check_rows(ty: HbmType, row_stride: usize, row_elems: u32) -> Result<()> {
    let bytes = ty
        .row_bytes(row_elems as usize)
        .ok_or(Error::InvalidValue("row is not a whole number of blocks"))?;
    let align = if ty == HbmType::F32 { 4 } else { 2 };
    if row_elems > i32::MAX as u32 || row_stride < bytes || row_stride % align != 0 {
        return Err(Error::InvalidValue("row stride too small or misaligned"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_architectures_are_refused_before_nvrtc() {
        for arch in ["sm_80", "compute_", "compute_8x", "80", ""] {
            assert!(compile_ptx(arch).is_err(), "{arch:?}");
        }
    }

    #[test]
    fn row_checks() {
        assert!(check_rows(HbmType::Q8_0, 34 * 4, 128).is_ok());
        assert!(
            check_rows(HbmType::Q8_0, 34 * 4 - 2, 128).is_err(),
            "stride too small"
        );
        assert!(
            check_rows(HbmType::Q4_0, 18 * 4, 100).is_err(),
            "not whole blocks"
        );
        assert!(
            check_rows(HbmType::F32, 514, 128).is_err(),
            "misaligned F32 rows"
        );
        assert!(check_rows(HbmType::F16, 258, 128).is_ok());
    }
}
