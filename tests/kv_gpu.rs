//! The KV cache on a real GPU: the NVRTC kernels against the CPU reference (byte for byte), VMM
//! growth to many GiB with stable pointers and intact contents, release and reuse, realloc
//! growth, and the C API end to end on the CUDA backend.
//!
//! Every test here needs a GPU and is `#[ignore]`d; `scripts/gpu-check.sh` runs them with
//! `--ignored --test-threads=1`. Without a GPU (or without libnvrtc on the loader path) they fail:
//! nothing is skipped silently. They take the GPU lock, so they run one at a time anyway, and use
//! at most about 17 GiB of device memory.

use cudarc::driver::sys;
use hbmalloc::backend::cuda::kernels::{nvrtc_available, KvKernels};
use hbmalloc::backend::cuda::CudaBackend;
use hbmalloc::backend::sim::SimBackend;
use hbmalloc::backend::{Backend, DevicePtr, KvRows, SharedBackend};
use hbmalloc::kv::cache::{Growth, KvCache, KvParams};
use hbmalloc::kv::half::{fp16_to_fp32, fp32_to_fp16};
use hbmalloc::kv::quant::{dequantize_row, quantize_row};
use hbmalloc::kv::HbmType;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

const GIB: f64 = (1u64 << 30) as f64;

static GPU: Mutex<()> = Mutex::new(());

/// The GPU lock and a backend for device 0; fails (never skips) without a GPU or NVRTC.
fn gpu() -> (MutexGuard<'static, ()>, SharedBackend) {
    let lock = GPU.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        CudaBackend::available(),
        "this test needs a CUDA driver and a device"
    );
    assert!(
        nvrtc_available(),
        "libnvrtc.so.13 is not on the loader path (LD_LIBRARY_PATH={:?}); the KV kernels are \
         compiled at run time",
        std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
    );
    let backend = CudaBackend::new(0).expect("a backend for device 0");
    (lock, Arc::new(backend))
}

/// xorshift32: the same data on every run.
struct Rng(u32);

impl Rng {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }

    /// Floats whose scale changes every 32 elements (one quantized block), from 1e-4 to 1e4.
    fn floats(&mut self, n: usize) -> Vec<f32> {
        let mut scale = 1.0f32;
        (0..n)
            .map(|i| {
                if i % 32 == 0 {
                    scale = 10f32.powi((self.next() % 9) as i32 - 4);
                }
                (self.next() as f32 / u32::MAX as f32 - 0.5) * scale
            })
            .collect()
    }
}

/// Source bytes of `x` as `src_type`, and the floats the kernel sees after reading them.
fn source(src_type: HbmType, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    match src_type {
        HbmType::F32 => (x.iter().flat_map(|v| v.to_ne_bytes()).collect(), x.to_vec()),
        HbmType::F16 => {
            let h: Vec<u16> = x.iter().map(|v| fp32_to_fp16(*v)).collect();
            (
                h.iter().flat_map(|v| v.to_ne_bytes()).collect(),
                h.iter().map(|v| fp16_to_fp32(*v)).collect(),
            )
        }
        other => unreachable!("{other:?} is not a source type"),
    }
}

/// Device memory freed on drop.
struct DevBuf<'a> {
    b: &'a dyn Backend,
    ptr: DevicePtr,
    len: usize,
}

impl<'a> DevBuf<'a> {
    fn new(b: &'a dyn Backend, len: usize) -> DevBuf<'a> {
        let ptr = b.alloc(len.max(1)).expect("device memory for the test");
        DevBuf { b, ptr, len }
    }

    fn upload(b: &'a dyn Backend, bytes: &[u8]) -> DevBuf<'a> {
        let d = DevBuf::new(b, bytes.len());
        b.copy_from_host(d.ptr, bytes).unwrap();
        d
    }

    fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.len);
        read_dev(self.b, self.ptr + offset, len)
    }
}

impl Drop for DevBuf<'_> {
    fn drop(&mut self) {
        let _ = self.b.synchronize();
        let _ = self.b.free(self.ptr, self.len.max(1));
    }
}

fn read_dev(b: &dyn Backend, ptr: DevicePtr, len: usize) -> Vec<u8> {
    b.synchronize().unwrap();
    let mut out = vec![0u8; len];
    b.copy_to_host(&mut out, ptr).unwrap();
    out
}

/// Index and bytes of the first row where two sets of rows differ, for a readable failure.
fn first_difference(got: &[u8], want: &[u8], row: usize) -> Option<(usize, Vec<u8>, Vec<u8>)> {
    let r = got
        .chunks(row)
        .zip(want.chunks(row))
        .position(|(a, b)| a != b)?;
    let show = |v: &[u8]| v[r * row..(r * row + row).min(r * row + 40)].to_vec();
    Some((r, show(got), show(want)))
}

/// Appends `x` (as `src_type`) into strided rows of `ty` on the GPU, compares the bytes with the
/// CPU reference, then dequantizes to F32 and F16 on the GPU and compares with the CPU again.
fn kernels_match_reference(
    cuda: &dyn Backend,
    ty: HbmType,
    src_type: HbmType,
    x: &[f32],
    row_elems: u32,
) {
    let n = row_elems as usize;
    let n_rows = (x.len() / n) as u32;
    let what = format!("{ty:?} from {src_type:?}, rows of {n}");
    let (src_bytes, seen) = source(src_type, x);
    let row = ty.row_bytes(n).unwrap();
    // A stride wider than the row, and rows starting past the tensor's base, as in a cache.
    let stride = row + 64;
    let offset = 3 * stride;
    let src = DevBuf::upload(cuda, &src_bytes);
    let tensor = DevBuf::upload(cuda, &vec![0xa5u8; offset + n_rows as usize * stride]);
    let rows = KvRows {
        ptr: tensor.ptr + offset,
        ty,
        stride,
        row_elems,
        n_rows,
    };
    cuda.kv_append(src.ptr, src_type, &rows, 0).unwrap();

    let mut want = vec![0u8; row];
    let got = tensor.read(0, tensor.len);
    assert!(
        got[..offset].iter().all(|b| *b == 0xa5),
        "{what}: wrote before the rows"
    );
    let mut packed_got = Vec::new();
    let mut packed_want = Vec::new();
    for r in 0..n_rows as usize {
        quantize_row(ty, &seen[r * n..(r + 1) * n], &mut want).unwrap();
        let at = offset + r * stride;
        packed_got.extend_from_slice(&got[at..at + row]);
        packed_want.extend_from_slice(&want);
        assert!(
            got[at + row..at + stride].iter().all(|b| *b == 0xa5),
            "{what}: row {r} wrote past its end"
        );
    }
    if let Some((r, g, w)) = first_difference(&packed_got, &packed_want, row) {
        panic!(
            "{what}: GPU bytes differ from the CPU reference at row {r}:\n gpu {g:?}\n cpu {w:?}"
        );
    }

    for dst_type in [HbmType::F32, HbmType::F16] {
        let out_row = dst_type.row_bytes(n).unwrap();
        let dst = DevBuf::new(cuda, out_row * n_rows as usize);
        cuda.kv_dequantize(&rows, dst.ptr, dst_type, 0).unwrap();
        let mut cpu = Vec::with_capacity(dst.len);
        let mut f = vec![0.0f32; n];
        for r in packed_want.chunks(row) {
            dequantize_row(ty, r, &mut f).unwrap();
            let mut bytes = vec![0u8; out_row];
            quantize_row(dst_type, &f, &mut bytes).unwrap();
            cpu.extend_from_slice(&bytes);
        }
        // Dequantized values are compared bit for bit, except that every NaN equals every NaN:
        // a NaN scale gives NaNs whose sign and payload are the processor's choice (x86 keeps
        // the input's, the GPU gives its canonical one); quantized bytes above are exact.
        let got = canonical_nans(&dst.read(0, dst.len), dst_type);
        let cpu = canonical_nans(&cpu, dst_type);
        if let Some((r, g, w)) = first_difference(&got, &cpu, out_row) {
            panic!("{what}: dequantized to {dst_type:?}, row {r} differs:\n gpu {g:?}\n cpu {w:?}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn kernels_are_byte_identical_to_the_cpu_reference_on_random_data() {
    let (_lock, cuda) = gpu();
    random_data(cuda, 1);
}

/// Every type and source type over three row shapes; `thin` divides the row counts (the
/// simulated device's CPU reference is slow in debug builds).
fn random_data(cuda: SharedBackend, thin: usize) {
    let mut rng = Rng(0x1234_5678);
    let t = Instant::now();
    let mut checked = 0usize;
    for ty in HbmType::ALL {
        // 8 heads of 128 (warps never straddle rows), 3 blocks per row (256-thread blocks
        // straddle rows), and for the unblocked types a row of 40.
        let mut shapes = vec![(1024u32, 777usize), (96, 301)];
        if !ty.is_quantized() {
            shapes.push((40, 123));
        }
        if ty.is_quantized() && thin == 1 {
            // Enough tiles that every warp of a one-wave grid takes several (its prefetch of the
            // next tiles then runs), within rows and straddling them.
            shapes.extend([(1024, 16384), (96, 200_003)]);
        }
        for (row_elems, n_rows) in shapes {
            for src_type in [HbmType::F32, HbmType::F16] {
                let x = rng.floats(row_elems as usize * (n_rows / thin));
                kernels_match_reference(&*cuda, ty, src_type, &x, row_elems);
                checked += x.len();
            }
        }
    }
    eprintln!(
        "kernels on {}: {checked} elements appended and dequantized, all byte-identical ({:.1} s, \
         the first launch compiles them)",
        cuda.name(),
        t.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn kernels_match_the_cpu_reference_on_edge_values() {
    let (_lock, cuda) = gpu();
    edge_values(cuda);
}

fn edge_values(cuda: SharedBackend) {
    // One block per case: zeros, a single large element, all equal, ties at +-max (either sign
    // first, alone or among zeros), values near fp16's limits, tiny values whose 1/d overflows,
    // infinities and NaNs.
    let mut blocks: Vec<Vec<f32>> = vec![
        vec![0.0; 32],
        (0..32).map(|i| if i == 7 { 3.0 } else { 0.0 }).collect(),
        vec![-2.5; 32],
        (0..32)
            .map(|i| if i % 2 == 0 { 4.0 } else { -4.0 })
            .collect(),
        (0..32)
            .map(|i| if i % 2 == 0 { -4.0 } else { 4.0 })
            .collect(),
        (0..32)
            .map(|i| match i {
                9 => 2.0,
                20 => -2.0,
                _ => 0.0,
            })
            .collect(),
        (0..32).map(|i| -4.0 + i as f32 * 0.25).collect(),
        (0..32).map(|i| 65504.0 * (i as f32 - 16.0) / 8.0).collect(),
        (0..32).map(|i| 1e-38 * i as f32).collect(),
        (0..32).map(|i| 6e-8 * (i as f32 - 16.0)).collect(),
        (0..32)
            .map(|i| if i == 3 { f32::INFINITY } else { i as f32 })
            .collect(),
        (0..32)
            .map(|i| if i == 31 { f32::NAN } else { i as f32 })
            .collect(),
        (0..32)
            .map(|i| if i == 0 { f32::NAN } else { -(i as f32) })
            .collect(),
        (0..32)
            .map(|i| if i == 5 { f32::NEG_INFINITY } else { 1.0 })
            .collect(),
    ];
    // Half-way cases of the rounding in Q8_0 (x * 127 / amax = k + 0.5).
    blocks.push((0..32).map(|i| (i as f32 + 0.5) / 127.0 * 4.0).collect());
    let x: Vec<f32> = blocks.concat();
    for ty in HbmType::ALL {
        for src_type in [HbmType::F32, HbmType::F16] {
            kernels_match_reference(&*cuda, ty, src_type, &x, 32);
        }
    }
}

/// The context current on this thread while alive: KvKernels launch into the current context.
struct Current;

impl Current {
    fn primary(device: i32) -> Current {
        let mut ctx = std::ptr::null_mut();
        // SAFETY: the driver is initialised (a backend exists); `ctx` is a valid out-parameter.
        assert_eq!(
            unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, device) },
            sys::CUresult::CUDA_SUCCESS
        );
        // SAFETY: a retained, live primary context; current on this thread only.
        assert_eq!(
            unsafe { sys::cuCtxSetCurrent(ctx) },
            sys::CUresult::CUDA_SUCCESS
        );
        Current
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        // SAFETY: undoes `primary`: no context on this thread, one reference given back.
        unsafe {
            sys::cuCtxSetCurrent(std::ptr::null_mut());
            sys::cuDevicePrimaryCtxRelease_v2(0);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn append_kernel_scatters_rows_to_given_positions() {
    let (_lock, cuda) = gpu();
    let _ctx = Current::primary(0);
    let arch = || {
        let attr = |a| {
            let mut v = 0;
            // SAFETY: device 0 exists; `v` is a valid out-parameter.
            unsafe { sys::cuDeviceGetAttribute(&mut v, a, 0) };
            v
        };
        use sys::CUdevice_attribute::*;
        Ok(format!(
            "compute_{}{}",
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        ))
    };
    let kernels = KvKernels::for_device(0, arch).expect("NVRTC compiles and the module loads");
    let (n, n_rows, n_slots) = (256usize, 50usize, 200usize);
    let x = Rng(99).floats(n * n_rows);
    let positions: Vec<i32> = (0..n_rows as i32).map(|i| (i * 37 + 11) % 200).collect();
    let pos_bytes: Vec<u8> = positions.iter().flat_map(|p| p.to_ne_bytes()).collect();
    let (src_bytes, _) = source(HbmType::F32, &x);
    let src = DevBuf::upload(&*cuda, &src_bytes);
    let pos = DevBuf::upload(&*cuda, &pos_bytes);
    for ty in [HbmType::Q8_0, HbmType::Q4_0, HbmType::BF16] {
        let row = ty.row_bytes(n).unwrap();
        let dst = DevBuf::upload(&*cuda, &vec![0u8; row * n_slots]);
        kernels
            .launch_append(
                src.ptr,
                HbmType::F32,
                dst.ptr,
                ty,
                row,
                n as u32,
                pos.ptr,
                0,
                n_rows as u32,
                0,
            )
            .unwrap();
        let got = dst.read(0, dst.len);
        let mut want = vec![0u8; row];
        for (i, &p) in positions.iter().enumerate() {
            quantize_row(ty, &x[i * n..(i + 1) * n], &mut want).unwrap();
            let p = p as usize;
            assert!(
                got[p * row..(p + 1) * row] == want[..],
                "{ty:?}: row {i} at position {p}"
            );
        }
        let untouched = (0..n_slots).filter(|p| !positions.contains(&(*p as i32)));
        for p in untouched {
            assert!(
                got[p * row..(p + 1) * row].iter().all(|b| *b == 0),
                "{ty:?}: slot {p}"
            );
        }
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn vmm_growth_to_16_gib_keeps_pointers_and_contents() {
    let (_lock, cuda) = gpu();
    vmm_growth(cuda);
}

fn vmm_growth(cuda: SharedBackend) {
    let backend = cuda.clone();
    // 8 layers of 8 KV heads of 128, F16: 2 KiB per row, 32 KiB per token over all tensors;
    // 512 Ki tokens make 16 GiB for one sequence.
    let params = KvParams {
        n_layer: 8,
        n_head_kv: 8,
        head_dim: 128,
        n_ctx_max: 512 << 10,
        n_seq_max: 2,
        type_k: HbmType::F16,
        type_v: HbmType::F16,
        growth: Growth::Vmm,
    };
    let (free0, total) = cuda.mem_info().unwrap();
    assert!(
        free0 > 20 << 30,
        "needs 20 GiB free, has {free0} of {total}"
    );
    let cache = KvCache::new(backend.clone(), params).unwrap();
    assert_eq!(cache.params().growth, Growth::Vmm, "an H100/H200 has VMM");
    let row = cache.row_bytes_k();

    cache.reserve(0, 1024).unwrap();
    let rows: Vec<_> = (0..8).map(|l| cache.seq_rows(l, 0).unwrap()).collect();
    // Markers at the start: 1 MiB written from the host into every tensor, and 16 tokens
    // appended by the kernel into the last layer.
    let markers: Vec<Vec<u8>> = (0..16).map(|i| pattern(512 * row, i as u8)).collect();
    for (l, (k, v)) in rows.iter().enumerate() {
        cuda.copy_from_host(*k, &markers[2 * l]).unwrap();
        cuda.copy_from_host(*v, &markers[2 * l + 1]).unwrap();
    }
    let x = Rng(7).floats(16 * 1024);
    let (src_bytes, seen) = source(HbmType::F32, &x);
    let src = DevBuf::upload(&*cuda, &src_bytes);
    cache
        .append(7, 0, 600, 16, src.ptr, src.ptr, HbmType::F32, 0)
        .unwrap();
    let mut appended = vec![0u8; 16 * row];
    for r in 0..16 {
        quantize_row(
            HbmType::F16,
            &seen[r * 1024..(r + 1) * 1024],
            &mut appended[r * row..(r + 1) * row],
        )
        .unwrap();
    }

    // Grow in 16 steps of 32 Ki tokens (1 GiB each) to 512 Ki tokens.
    let mut step_ms = Vec::new();
    let t = Instant::now();
    for step in 1..=16u32 {
        let n = step * (32 << 10);
        let s = Instant::now();
        cache.reserve(0, n).unwrap();
        step_ms.push(s.elapsed().as_secs_f64() * 1e3);
        assert!(cache.capacity(0).unwrap() >= n);
        for l in 0..8 {
            assert_eq!(
                cache.seq_rows(l, 0).unwrap(),
                rows[l as usize],
                "pointers moved"
            );
        }
        // The newest page is usable: write and read back the last row.
        let last = rows[3].1 + (n as usize - 1) * row;
        cuda.copy_from_host(last, &pattern(row, step as u8))
            .unwrap();
        assert_eq!(read_dev(&*cuda, last, row), pattern(row, step as u8));
    }
    let grow_s = t.elapsed().as_secs_f64();
    let stats = cache.stats();
    let (free1, _) = cuda.mem_info().unwrap();
    assert_eq!(stats.committed, 16 << 30, "16 GiB committed");
    assert_eq!(stats.copied, 0, "VMM growth copies nothing");
    assert!(
        free0 - free1 >= 16 << 30,
        "the device lost 16 GiB: {free0} -> {free1}"
    );
    for (l, (k, v)) in rows.iter().enumerate() {
        assert!(
            read_dev(&*cuda, *k, 512 * row) == markers[2 * l],
            "layer {l} K start"
        );
        assert!(
            read_dev(&*cuda, *v, 512 * row) == markers[2 * l + 1],
            "layer {l} V start"
        );
    }
    assert!(
        read_dev(&*cuda, rows[7].0 + 600 * row, 16 * row) == appended,
        "appended K rows"
    );
    assert!(
        read_dev(&*cuda, rows[7].1 + 600 * row, 16 * row) == appended,
        "appended V rows"
    );
    eprintln!(
        "vmm growth 0.03 -> {:.1} GiB in 16 steps: {:.1} ms total, step min {:.2} ms max {:.2} ms; \
         device free {:.1} -> {:.1} GiB; pointers unchanged, contents intact",
        stats.committed as f64 / GIB,
        grow_s * 1e3,
        step_ms.iter().cloned().fold(f64::INFINITY, f64::min),
        step_ms.iter().cloned().fold(0.0, f64::max),
        free0 as f64 / GIB,
        free1 as f64 / GIB
    );

    // Release and reuse: the next sequence takes the slot and its pages; nothing is mapped.
    cache.release(0).unwrap();
    assert_eq!(cache.stats().cached, 16 << 30);
    let s = Instant::now();
    cache.reserve(1, 100_000).unwrap();
    let reuse_ms = s.elapsed().as_secs_f64() * 1e3;
    assert_eq!(
        cache.seq_rows(0, 1).unwrap(),
        rows[0],
        "sequence 1 reuses the slot"
    );
    assert_eq!(cache.capacity(1).unwrap(), 512 << 10, "with all its pages");
    assert_eq!(cache.stats().committed, 16 << 30);
    assert!(cache.seq_rows(0, 0).is_err(), "sequence 0 is gone");
    cache
        .append(0, 1, 0, 16, src.ptr, 0, HbmType::F32, 0)
        .unwrap();
    assert!(
        read_dev(&*cuda, rows[0].0, 16 * row) == appended,
        "reused rows are writable"
    );
    cache.release(1).unwrap();
    let s = Instant::now();
    let trimmed = cache.trim();
    let trim_ms = s.elapsed().as_secs_f64() * 1e3;
    assert_eq!(trimmed, 16 << 30);
    let (free2, _) = cuda.mem_info().unwrap();
    assert!(
        free2 + (1 << 30) >= free0,
        "trim gave the memory back: {free0} -> {free2}"
    );
    eprintln!("vmm reuse of a released 16 GiB sequence: {reuse_ms:.3} ms; trim: {trim_ms:.1} ms");
    drop(src);
    drop(cache);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn realloc_growth_moves_rows_and_keeps_contents() {
    let (_lock, cuda) = gpu();
    realloc_growth(cuda);
}

fn realloc_growth(cuda: SharedBackend) {
    let backend = cuda.clone();
    let params = KvParams {
        n_layer: 4,
        n_head_kv: 8,
        head_dim: 128,
        n_ctx_max: 65536,
        n_seq_max: 2,
        type_k: HbmType::Q8_0,
        type_v: HbmType::Q4_0,
        growth: Growth::Realloc,
    };
    let cache = KvCache::new(backend, params).unwrap();
    cache.reserve(0, 1000).unwrap();
    cache.reserve(1, 10).unwrap();
    let x = Rng(3).floats(1000 * 1024);
    let (src_bytes, _) = source(HbmType::F16, &x);
    let src = DevBuf::upload(&*cuda, &src_bytes);
    for l in 0..4 {
        cache
            .append(l, 0, 0, 1000, src.ptr, src.ptr, HbmType::F16, 0)
            .unwrap();
    }
    let (rk, rv) = (cache.row_bytes_k(), cache.row_bytes_v());
    let before: Vec<_> = (0..4)
        .map(|l| {
            let (k, v) = cache.seq_rows(l, 0).unwrap();
            (
                read_dev(&*cuda, k, 1000 * rk),
                read_dev(&*cuda, v, 1000 * rv),
            )
        })
        .collect();
    let old = cache.seq_rows(0, 0).unwrap();
    let seq1 = cache.seq_rows(2, 1).unwrap();
    let generation = cache.generation();
    let s = Instant::now();
    cache.reserve(0, 50_000).unwrap();
    let grow_ms = s.elapsed().as_secs_f64() * 1e3;
    assert_eq!(cache.generation(), generation + 1);
    assert_ne!(cache.seq_rows(0, 0).unwrap(), old, "realloc moves the rows");
    assert_eq!(cache.seq_rows(2, 1).unwrap(), seq1, "other sequences stay");
    for (l, (k_bytes, v_bytes)) in before.iter().enumerate() {
        let (k, v) = cache.seq_rows(l as u32, 0).unwrap();
        assert!(
            read_dev(&*cuda, k, 1000 * rk) == *k_bytes,
            "layer {l} K after the move"
        );
        assert!(
            read_dev(&*cuda, v, 1000 * rv) == *v_bytes,
            "layer {l} V after the move"
        );
    }
    let stats = cache.stats();
    assert_eq!(
        stats.copied,
        4 * 1000 * (rk + rv) as u64,
        "the old rows were copied once"
    );
    // Appending past the old capacity lands in the new buffers.
    cache
        .append(1, 0, 40_000, 1000, src.ptr, src.ptr, HbmType::F16, 0)
        .unwrap();
    let (k, _) = cache.seq_rows(1, 0).unwrap();
    assert!(read_dev(&*cuda, k + 40_000 * rk, 1000 * rk) == before[1].0);
    eprintln!(
        "realloc growth 1000 -> 50000 tokens (4 layers, Q8_0 K, Q4_0 V): {grow_ms:.2} ms, {} bytes copied, generation {}",
        stats.copied, stats.generation
    );
    cache.release(0).unwrap();
    cache.release(1).unwrap();
    assert_eq!(cache.stats().committed, 0);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn c_api_round_trip_on_the_cuda_backend() {
    use hbmalloc::ffi::hbm_api::hbm_backend_name;
    use hbmalloc::ffi::kv_cache_api::*;
    use hbmalloc::ffi::status::HbmStatus;
    use std::ffi::{c_void, CStr};
    let (_lock, cuda) = gpu();
    // SAFETY: a static NUL-terminated string.
    let name = unsafe { CStr::from_ptr(hbm_backend_name()) };
    assert_eq!(
        name.to_str().unwrap(),
        "cuda",
        "HBMALLOC_CONF must leave backend:auto or cuda"
    );
    for growth in [
        HbmKvGrowth::Vmm,
        HbmKvGrowth::Realloc,
        HbmKvGrowth::Prealloc,
    ] {
        for ty in HbmType::ALL {
            let p = HbmKvParams {
                n_layer: 2,
                n_head_kv: 4,
                head_dim: 64,
                n_ctx_max: 4096,
                n_seq_max: 2,
                type_k: ty as i32,
                type_v: HbmType::Q8_0 as i32,
                device: 0,
                growth,
            };
            let mut c = std::ptr::null_mut();
            // SAFETY: valid params and out-parameter; every later call uses the live handle,
            // device buffers of the documented sizes, and valid out-parameters.
            unsafe {
                assert_eq!(hbm_kv_cache_create(&p, &mut c), HbmStatus::Ok);
                assert_eq!(hbm_kv_cache_reserve(c, 1, 300), HbmStatus::Ok);
                let x = Rng(ty as u32 + 1).floats(300 * 256);
                let (src_bytes, seen) = source(HbmType::F32, &x);
                let src = DevBuf::upload(&*cuda, &src_bytes);
                let s = src.ptr as *const c_void;
                let st = hbm_kv_cache_append(c, 1, 1, 0, s, s, 0, 300, std::ptr::null_mut());
                assert_eq!(st, HbmStatus::Ok, "{growth:?} {ty:?}");
                let (mut k, mut v, mut sk, mut sv) =
                    (std::ptr::null_mut(), std::ptr::null_mut(), 0, 0);
                let st = hbm_kv_cache_layer(c, 1, 1, &mut k, &mut v, &mut sk, &mut sv);
                assert_eq!(st, HbmStatus::Ok);
                let mut want = vec![0u8; 300 * sk];
                for r in 0..300 {
                    quantize_row(
                        ty,
                        &seen[r * 256..(r + 1) * 256],
                        &mut want[r * sk..(r + 1) * sk],
                    )
                    .unwrap();
                }
                assert!(
                    read_dev(&*cuda, k as DevicePtr, 300 * sk) == want,
                    "{growth:?} {ty:?}"
                );
                let out = DevBuf::new(&*cuda, 300 * 256 * 2);
                let st = hbm_kv_cache_dequantize(
                    c,
                    1,
                    1,
                    0,
                    300,
                    out.ptr as *mut c_void,
                    std::ptr::null_mut(),
                    1,
                    std::ptr::null_mut(),
                );
                assert_eq!(st, HbmStatus::Ok);
                let mut f = vec![0.0f32; 300 * 256];
                dequantize_row(ty, &want, &mut f).unwrap();
                let mut half = vec![0u8; 300 * 256 * 2];
                quantize_row(HbmType::F16, &f, &mut half).unwrap();
                assert!(
                    out.read(0, out.len) == half,
                    "{growth:?} {ty:?} dequantized"
                );
                let mut stats = std::mem::zeroed::<HbmKvStats>();
                assert_eq!(hbm_kv_cache_stats(c, &mut stats), HbmStatus::Ok);
                assert_eq!((stats.n_seq, stats.growth), (1, growth));
                assert_eq!(hbm_kv_cache_reserve(c, 1, 4097), HbmStatus::InvalidValue);
                drop(out);
                drop(src);
                hbm_kv_cache_destroy(c);
            }
        }
    }
}

/// The checks above, run on the simulated device (whose kernels are the CPU reference itself):
/// this proves the tests' own indexing, sizes and bookkeeping in CI, so that a failure on a GPU
/// means the GPU, not the test.
#[test]
fn the_gpu_tests_own_checks_hold_on_the_simulated_device() {
    let _lock = GPU.lock().unwrap_or_else(|e| e.into_inner());
    // 24 GiB of simulated device: reserved with MAP_NORESERVE, only touched pages cost memory.
    let sim: SharedBackend = Arc::new(SimBackend::new(0, 24 << 30));
    random_data(sim.clone(), 8);
    edge_values(sim.clone());
    vmm_growth(sim.clone());
    realloc_growth(sim);
}

/// `bytes` (F32 or F16 values) with every NaN replaced by one canonical NaN.
fn canonical_nans(bytes: &[u8], ty: HbmType) -> Vec<u8> {
    match ty {
        HbmType::F32 => bytes
            .chunks(4)
            .flat_map(|c| {
                let v = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                let is_nan = v & 0x7f80_0000 == 0x7f80_0000 && v & 0x007f_ffff != 0;
                (if is_nan { 0x7fc0_0000 } else { v }).to_le_bytes()
            })
            .collect(),
        _ => bytes
            .chunks(2)
            .flat_map(|c| {
                let v = u16::from_le_bytes([c[0], c[1]]);
                let is_nan = v & 0x7c00 == 0x7c00 && v & 0x03ff != 0;
                (if is_nan { 0x7e00 } else { v }).to_le_bytes()
            })
            .collect(),
    }
}
