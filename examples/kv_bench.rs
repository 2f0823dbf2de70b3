//! KV cache benchmark on a CUDA device (device 0); prints markdown tables.
//!
//! 1. Growth of one sequence from 1 GiB to 32 GiB in 1 GiB steps (32 layers, 8 KV heads of 128,
//!    F16), VMM against realloc: time, bytes copied, moves, peak memory of the cache.
//! 2. The append and dequantize kernels against a device-to-device copy (`cuMemcpyDtoDAsync`)
//!    moving the same number of bytes, in the same run: bandwidth counted as bytes read plus
//!    bytes written, and the ratio (target: at least 0.8).
//!
//! `KV_BENCH_GIB` (default 32) sets the growth target, `KV_BENCH_ITERS` (default 50) the kernel
//! repetitions. Exits 2 on the simulated device (no GPU, or `HBMALLOC_CONF=backend:sim`), 1 on
//! an error.

use hbmalloc::backend::{DevicePtr, KvRows, SharedBackend};
use hbmalloc::kv::cache::{Growth, KvCache, KvParams};
use hbmalloc::kv::half::fp32_to_fp16;
use hbmalloc::kv::HbmType;
use hbmalloc::runtime::{self, Active};
use std::time::Instant;

const GIB: usize = 1 << 30;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB as f64
}

fn main() {
    if runtime::active() != Active::Cuda {
        eprintln!(
            "kv_bench: the backend is the simulated device (no CUDA GPU, or HBMALLOC_CONF=backend:sim); \
             this benchmark measures a GPU and has nothing to measure here"
        );
        std::process::exit(2);
    }
    if let Err(e) = run() {
        eprintln!("kv_bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let backend = runtime::backend(0)?;
    let (free, total) = backend.mem_info()?;
    println!(
        "# KV cache benchmark: device 0, {:.1} GiB total, {:.1} GiB free",
        gib(total as u64),
        gib(free as u64)
    );
    growth_table(&backend)?;
    kernel_table(&backend)?;
    Ok(())
}

/// What one growth run measured.
struct GrowthRun {
    mode: Growth,
    steps: usize,
    total_ms: f64,
    slowest_ms: f64,
    moves: u64,
    copied: u64,
    peak: u64,
    device_peak: u64,
    stable: bool,
}

fn growth_table(backend: &SharedBackend) -> Res<()> {
    // 32 layers x (K + V) x 8 heads x 128 x 2 bytes = 128 KiB per token: 8192 tokens per GiB.
    const TOKENS_PER_GIB: u32 = 8192;
    let (free, _) = backend.mem_info()?;
    let mut target = env_or("KV_BENCH_GIB", 32).max(2);
    // Realloc holds the old and the doubled buffers at once: up to 1.5x the target (48 GiB for
    // 32); shrink the target rather than fail on a smaller card.
    let fits = ((free.saturating_sub(2 * GIB)) as f64 / 1.5 / GIB as f64) as usize;
    if fits < target {
        println!("\n(only {fits} GiB fit realloc's peak on this card: growing to {fits} GiB, not {target})");
        target = fits.max(2);
    }
    let mut runs = Vec::new();
    for mode in [Growth::Vmm, Growth::Realloc] {
        let params = KvParams {
            n_layer: 32,
            n_head_kv: 8,
            head_dim: 128,
            n_ctx_max: target as u32 * TOKENS_PER_GIB,
            n_seq_max: 1,
            type_k: HbmType::F16,
            type_v: HbmType::F16,
            growth: mode,
        };
        let (free0, _) = backend.mem_info()?;
        let cache = KvCache::new(backend.clone(), params)?;
        if cache.params().growth != mode {
            return Err("the device has no VMM: the vmm run would measure realloc".into());
        }
        cache.reserve(0, TOKENS_PER_GIB)?;
        backend.synchronize()?;
        let first = cache.seq_rows(0, 0)?;
        let (mut peak, mut device_peak) = (cache.stats().committed, 0u64);
        let (mut total_ms, mut slowest_ms, mut stable) = (0.0f64, 0.0f64, true);
        for step in 2..=target as u32 {
            let before = cache.stats();
            let t = Instant::now();
            cache.reserve(0, step * TOKENS_PER_GIB)?;
            backend.synchronize()?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let after = cache.stats();
            total_ms += ms;
            slowest_ms = slowest_ms.max(ms);
            // A realloc move holds the old and the new buffers until the copy is done.
            let moved = after.generation > before.generation;
            peak = peak.max(if moved {
                before.committed + after.committed
            } else {
                after.committed
            });
            let (free1, _) = backend.mem_info()?;
            device_peak = device_peak.max(free0.saturating_sub(free1) as u64);
            stable &= cache.seq_rows(0, 0)? == first;
        }
        let stats = cache.stats();
        runs.push(GrowthRun {
            mode,
            steps: target - 1,
            total_ms,
            slowest_ms,
            moves: stats.generation,
            copied: stats.copied,
            peak,
            device_peak,
            stable,
        });
        drop(cache);
    }
    println!("\n## Growth of one sequence from 1 GiB to {target} GiB in 1 GiB steps");
    println!("32 layers, 8 KV heads x 128, F16 K and V (128 KiB per token); each step is `reserve` + device synchronize.\n");
    println!("| mode | steps | total time | slowest step | moves | bytes copied | peak cache memory | device memory in use (max after a step) | pointers stable |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &runs {
        println!(
            "| {:?} | {} | {:.1} ms | {:.2} ms | {} | {:.1} GiB | {:.1} GiB | {:.1} GiB | {} |",
            r.mode,
            r.steps,
            r.total_ms,
            r.slowest_ms,
            r.moves,
            gib(r.copied),
            gib(r.peak),
            gib(r.device_peak),
            if r.stable { "yes" } else { "no" }
        );
    }
    Ok(())
}

/// Device memory freed on drop.
struct Buf<'a> {
    b: &'a SharedBackend,
    ptr: DevicePtr,
    len: usize,
}

impl<'a> Buf<'a> {
    fn new(b: &'a SharedBackend, len: usize) -> Res<Buf<'a>> {
        Ok(Buf {
            b,
            ptr: b.alloc(len)?,
            len,
        })
    }
}

impl Drop for Buf<'_> {
    fn drop(&mut self) {
        let _ = self.b.synchronize();
        let _ = self.b.free(self.ptr, self.len);
    }
}

/// Seconds per call of `f`, averaged over `iters` calls queued back to back after one warm-up.
fn time_per_call(
    backend: &SharedBackend,
    iters: usize,
    mut f: impl FnMut() -> hbmalloc::error::Result<()>,
) -> Res<f64> {
    f()?;
    backend.synchronize()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    backend.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

fn kernel_table(backend: &SharedBackend) -> Res<()> {
    let iters = env_or("KV_BENCH_ITERS", 50).max(1);
    // 64 Ki tokens of 8 heads x 128: 256 MiB of F32, 128 MiB of F16 per operand.
    let (row_elems, n_rows) = (1024u32, 65536u32);
    let elems = row_elems as usize * n_rows as usize;
    let plain = Buf::new(backend, elems * 4)?;
    let cache = Buf::new(backend, elems * 4)?;
    let copy_a = Buf::new(backend, elems * 4)?;
    let copy_b = Buf::new(backend, elems * 4)?;
    // Real numbers in every operand, in its own type: uninitialised memory, F32 bytes read as
    // F16, or a previous dequantize's output may hold NaNs and infinities, which send the
    // quantizing kernels down their slow paths. `plain` is rewritten before each pair of
    // measurements (dequantize overwrites it); each append fills the cache that the following
    // dequantize reads.
    let mut x = 0x9e37_79b9u32;
    let values: Vec<f32> = (0..elems)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32 - 0.5) * 8.0
        })
        .collect();
    let host_f32: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
    let host_f16: Vec<u8> = values
        .iter()
        .flat_map(|v| fp32_to_fp16(*v).to_ne_bytes())
        .collect();
    backend.copy_from_host(cache.ptr, &host_f32)?;
    backend.copy_from_host(copy_a.ptr, &host_f32)?;

    println!(
        "\n## Append and dequantize kernels against a device-to-device copy of the same bytes"
    );
    println!(
        "{n_rows} tokens of {row_elems} elements per call, {iters} calls queued back to back; GB/s counts bytes read + written (1 GB = 1e9 B).\n"
    );
    println!("| kernel | cache type | F32/F16 side | bytes moved per call | kernel GB/s | copy GB/s | ratio |");
    println!("|---|---|---|---|---|---|---|");
    let mut worst = f64::INFINITY;
    for ty in HbmType::ALL {
        let row = ty
            .row_bytes(row_elems as usize)
            .ok_or("row not whole blocks")?;
        let rows = KvRows {
            ptr: cache.ptr,
            ty,
            stride: row,
            row_elems,
            n_rows,
        };
        for plain_ty in [HbmType::F32, HbmType::F16] {
            let plain_bytes = plain_ty.row_bytes(elems).ok_or("size")?;
            let host = if plain_ty == HbmType::F32 {
                &host_f32
            } else {
                &host_f16
            };
            backend.copy_from_host(plain.ptr, host)?;
            let moved = plain_bytes + row * n_rows as usize;
            // The copy moves the same bytes: half read, half written.
            let copy = time_per_call(backend, iters, || {
                backend.copy_d2d(copy_b.ptr, copy_a.ptr, moved / 2, 0)
            })?;
            let append = time_per_call(backend, iters, || {
                backend.kv_append(plain.ptr, plain_ty, &rows, 0)
            })?;
            let dequantize = time_per_call(backend, iters, || {
                backend.kv_dequantize(&rows, plain.ptr, plain_ty, 0)
            })?;
            for (name, secs) in [("append", append), ("dequantize", dequantize)] {
                let ratio = copy / secs;
                worst = worst.min(ratio);
                println!(
                    "| {name} | {} | {} | {:.0} MiB | {:.0} | {:.0} | {:.2} |",
                    ty.name(),
                    plain_ty.name(),
                    moved as f64 / (1 << 20) as f64,
                    moved as f64 / secs / 1e9,
                    moved as f64 / copy / 1e9,
                    ratio
                );
            }
        }
    }
    println!(
        "\nlowest kernel/copy ratio: {worst:.2} (target >= 0.80: {})",
        if worst >= 0.8 { "met" } else { "NOT met" }
    );
    Ok(())
}
