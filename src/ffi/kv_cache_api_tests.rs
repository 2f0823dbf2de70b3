//! The KV cache's C API called from Rust, on whatever backend the process has: the simulated
//! device under `cargo test` (no GPU), CUDA on a machine with one. Data moves only through the
//! backend's copies, so the same checks hold on both.

use super::*;
use crate::backend::{DevicePtr, SharedBackend};
use crate::kv::half::{fp16_to_fp32, fp32_to_fp16};
use crate::kv::quant::{dequantize_row, quantize_row};
use std::ptr::{null, null_mut};

/// 2 layers of 2 KV heads of 64: rows of 128 elements.
const ROW: usize = 128;

fn backend() -> SharedBackend {
    runtime::backend(0).expect("device 0 (the simulated device under cargo test)")
}

fn params(type_k: HbmType, type_v: HbmType, growth: HbmKvGrowth) -> HbmKvParams {
    HbmKvParams {
        n_layer: 2,
        n_head_kv: 2,
        head_dim: 64,
        n_ctx_max: 64,
        n_seq_max: 2,
        type_k: type_k as i32,
        type_v: type_v as i32,
        device: 0,
        growth,
    }
}

/// Floats with a spread of block scales, some blocks all zero.
fn floats(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let scale = [1e-3f32, 1.0, 500.0, 0.0][(i / 32) % 4];
            (x as f32 / u32::MAX as f32 - 0.5) * scale
        })
        .collect()
}

/// Device memory for a test, freed on drop.
struct DevBuf {
    b: SharedBackend,
    ptr: DevicePtr,
    len: usize,
}

impl DevBuf {
    fn upload(bytes: &[u8]) -> DevBuf {
        let b = backend();
        let ptr = b.alloc(bytes.len()).unwrap();
        b.copy_from_host(ptr, bytes).unwrap();
        DevBuf {
            b,
            ptr,
            len: bytes.len(),
        }
    }

    fn zeroed(len: usize) -> DevBuf {
        DevBuf::upload(&vec![0u8; len])
    }

    fn read(&self) -> Vec<u8> {
        read_dev(self.ptr, self.len)
    }

    fn as_ptr(&self) -> *mut c_void {
        self.ptr as *mut c_void
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // Queued kernels may still read or write it; never panic here (a failing test unwinds).
        let _ = self.b.synchronize();
        let _ = self.b.free(self.ptr, self.len);
    }
}

fn read_dev(ptr: DevicePtr, len: usize) -> Vec<u8> {
    let b = backend();
    b.synchronize().unwrap();
    let mut out = vec![0u8; len];
    b.copy_to_host(&mut out, ptr).unwrap();
    out
}

/// A cache made through the C API, destroyed on drop; each method is one C call.
struct Cache(*mut HbmKvCache);

impl Cache {
    fn create(p: &HbmKvParams) -> std::result::Result<Cache, HbmStatus> {
        let mut out = null_mut();
        // SAFETY: `p` is a valid HbmKvParams and `out` a valid out-parameter.
        match unsafe { hbm_kv_cache_create(p, &mut out) } {
            HbmStatus::Ok => Ok(Cache(out)),
            status => {
                assert!(out.is_null(), "out_cache untouched on an error");
                Err(status)
            }
        }
    }

    fn reserve(&self, seq: u32, n: u32) -> HbmStatus {
        // SAFETY: a live handle.
        unsafe { hbm_kv_cache_reserve(self.0, seq, n) }
    }

    fn release(&self, seq: u32) -> HbmStatus {
        // SAFETY: a live handle.
        unsafe { hbm_kv_cache_release(self.0, seq) }
    }

    fn capacity(&self, seq: u32) -> std::result::Result<u32, HbmStatus> {
        let mut n = u32::MAX;
        // SAFETY: a live handle and a valid out-parameter.
        match unsafe { hbm_kv_cache_capacity(self.0, seq, &mut n) } {
            HbmStatus::Ok => Ok(n),
            status => Err(status),
        }
    }

    /// (k, v, stride_k, stride_v)
    fn layer(
        &self,
        layer: u32,
        seq: u32,
    ) -> std::result::Result<(DevicePtr, DevicePtr, usize, usize), HbmStatus> {
        let (mut k, mut v, mut sk, mut sv) = (null_mut(), null_mut(), 0, 0);
        // SAFETY: a live handle and valid out-parameters.
        match unsafe { hbm_kv_cache_layer(self.0, layer, seq, &mut k, &mut v, &mut sk, &mut sv) } {
            HbmStatus::Ok => Ok((k as DevicePtr, v as DevicePtr, sk, sv)),
            status => Err(status),
        }
    }

    fn stats(&self) -> HbmKvStats {
        let mut s = std::mem::MaybeUninit::<HbmKvStats>::uninit();
        // SAFETY: a live handle; `s` has room for one HbmKvStats.
        assert_eq!(
            unsafe { hbm_kv_cache_stats(self.0, s.as_mut_ptr()) },
            HbmStatus::Ok
        );
        // SAFETY: the call succeeded, so it wrote the whole struct.
        unsafe { s.assume_init() }
    }

    #[allow(clippy::too_many_arguments)]
    fn append(
        &self,
        layer: u32,
        seq: u32,
        pos: u32,
        k: *const c_void,
        v: *const c_void,
        ty: i32,
        n: u32,
    ) -> HbmStatus {
        // SAFETY: a live handle; the tests pass device buffers of the documented sizes, or
        // arguments the call refuses before reading anything.
        unsafe { hbm_kv_cache_append(self.0, layer, seq, pos, k, v, ty, n, null_mut()) }
    }

    #[allow(clippy::too_many_arguments)]
    fn dequantize(
        &self,
        layer: u32,
        seq: u32,
        pos: u32,
        n: u32,
        k: *mut c_void,
        v: *mut c_void,
        ty: i32,
    ) -> HbmStatus {
        // SAFETY: as for `append`.
        unsafe { hbm_kv_cache_dequantize(self.0, layer, seq, pos, n, k, v, ty, null_mut()) }
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        // SAFETY: a live handle, used by nobody after this.
        unsafe { hbm_kv_cache_destroy(self.0) };
    }
}

/// `n` rows of floats as `src_type` bytes, and the floats the device will see (F16 rounds).
fn source(src_type: HbmType, n_rows: usize, seed: u32) -> (Vec<u8>, Vec<f32>) {
    let x = floats(n_rows * ROW, seed);
    match src_type {
        HbmType::F32 => (x.iter().flat_map(|v| v.to_ne_bytes()).collect(), x),
        HbmType::F16 => {
            let h: Vec<u16> = x.iter().map(|v| fp32_to_fp16(*v)).collect();
            (
                h.iter().flat_map(|v| v.to_ne_bytes()).collect(),
                h.iter().map(|v| fp16_to_fp32(*v)).collect(),
            )
        }
        _ => unreachable!("sources are F32 or F16"),
    }
}

fn encode(ty: HbmType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.row_bytes(x.len()).unwrap()];
    quantize_row(ty, x, &mut out).unwrap();
    out
}

/// The CPU reference of dequantizing `bytes` (whole rows of `ty`) to `dst_type`.
fn decode(ty: HbmType, bytes: &[u8], dst_type: HbmType) -> Vec<u8> {
    let n = bytes.len() / ty.row_bytes(ROW).unwrap() * ROW;
    let mut x = vec![0.0f32; n];
    dequantize_row(ty, bytes, &mut x).unwrap();
    encode(dst_type, &x)
}

#[test]
fn append_and_dequantize_round_trip_every_type_and_growth_mode() {
    let growths = [
        HbmKvGrowth::Vmm,
        HbmKvGrowth::Realloc,
        HbmKvGrowth::Prealloc,
    ];
    for (i, &tk) in HbmType::ALL.iter().enumerate() {
        let tv = HbmType::ALL[(i + 2) % HbmType::ALL.len()];
        for growth in growths {
            for src_type in [HbmType::F32, HbmType::F16] {
                let what = format!("K {tk:?} V {tv:?} {growth:?} from {src_type:?}");
                let c = Cache::create(&params(tk, tv, growth)).unwrap();
                assert_eq!(c.reserve(1, 20), HbmStatus::Ok, "{what}");
                assert!(c.capacity(1).unwrap() >= 20);
                // Two appends, at 0 and at 12, of different data for K and V.
                let (k0, kx0) = source(src_type, 12, 1 + i as u32);
                let (v0, vx0) = source(src_type, 12, 100 + i as u32);
                let (k1, kx1) = source(src_type, 8, 200 + i as u32);
                let (v1, vx1) = source(src_type, 8, 300 + i as u32);
                let bufs = [&k0, &v0, &k1, &v1].map(|b| DevBuf::upload(b));
                let st = src_type as i32;
                assert_eq!(
                    c.append(1, 1, 0, bufs[0].as_ptr(), bufs[1].as_ptr(), st, 12),
                    HbmStatus::Ok,
                    "{what}"
                );
                assert_eq!(
                    c.append(1, 1, 12, bufs[2].as_ptr(), bufs[3].as_ptr(), st, 8),
                    HbmStatus::Ok,
                    "{what}"
                );
                let (k, v, sk, sv) = c.layer(1, 1).unwrap();
                assert_eq!(
                    (sk, sv),
                    (tk.row_bytes(ROW).unwrap(), tv.row_bytes(ROW).unwrap())
                );
                let want_k = [encode(tk, &kx0), encode(tk, &kx1)].concat();
                let want_v = [encode(tv, &vx0), encode(tv, &vx1)].concat();
                assert!(read_dev(k, 20 * sk) == want_k, "{what}: K bytes");
                assert!(read_dev(v, 20 * sv) == want_v, "{what}: V bytes");

                for dst_type in [HbmType::F32, HbmType::F16] {
                    let bytes = dst_type.row_bytes(ROW).unwrap() * 11;
                    let (dk, dv) = (DevBuf::zeroed(bytes), DevBuf::zeroed(bytes));
                    let dt = dst_type as i32;
                    assert_eq!(
                        c.dequantize(1, 1, 5, 11, dk.as_ptr(), dv.as_ptr(), dt),
                        HbmStatus::Ok
                    );
                    let ref_k = decode(tk, &want_k[5 * sk..16 * sk], dst_type);
                    let ref_v = decode(tv, &want_v[5 * sv..16 * sv], dst_type);
                    assert!(dk.read() == ref_k, "{what}: K to {dst_type:?}");
                    assert!(dv.read() == ref_v, "{what}: V to {dst_type:?}");
                }
                let s = c.stats();
                assert_eq!((s.n_seq, s.growth), (1, growth), "{what}");
            }
        }
    }
}

/// What a failed call must leave alone: counters, capacity, pointers and the rows' bytes.
fn snapshot(
    c: &Cache,
) -> (
    HbmKvStats,
    u32,
    (DevicePtr, DevicePtr, usize, usize),
    Vec<u8>,
) {
    let rows = c.layer(0, 0).unwrap();
    let bytes = [read_dev(rows.0, 16 * rows.2), read_dev(rows.1, 16 * rows.3)].concat();
    (c.stats(), c.capacity(0).unwrap(), rows, bytes)
}

#[test]
fn bad_inputs_give_their_status_and_change_nothing() {
    let mut p = params(HbmType::Q4_0, HbmType::Q8_0, HbmKvGrowth::Vmm);
    let c = Cache::create(&p).unwrap();
    assert_eq!(c.reserve(0, 16), HbmStatus::Ok);
    let (src, _) = source(HbmType::F32, 16, 9);
    let src = DevBuf::upload(&src);
    let s = src.as_ptr();
    assert_eq!(
        c.append(0, 0, 0, s, s, HbmType::F32 as i32, 16),
        HbmStatus::Ok
    );
    let before = snapshot(&c);
    let cap = before.1;

    // Creation.
    let mut out = null_mut();
    // SAFETY: NULL arguments are refused before anything is read or written.
    unsafe {
        assert_eq!(
            hbm_kv_cache_create(null(), &mut out),
            HbmStatus::NullParameter
        );
        assert_eq!(
            hbm_kv_cache_create(&p, null_mut()),
            HbmStatus::NullParameter
        );
    }
    p.head_dim = 40;
    p.n_head_kv = 1;
    assert_eq!(
        Cache::create(&p).err(),
        Some(HbmStatus::InvalidValue),
        "a row of 40 is not whole Q4_0 blocks"
    );
    let good = params(HbmType::F16, HbmType::F16, HbmKvGrowth::Vmm);
    for (bad, status) in [
        (HbmKvParams { type_k: 3, ..good }, HbmStatus::InvalidValue),
        (HbmKvParams { type_v: -1, ..good }, HbmStatus::InvalidValue),
        (HbmKvParams { n_layer: 0, ..good }, HbmStatus::InvalidValue),
        (
            HbmKvParams {
                n_ctx_max: 0,
                ..good
            },
            HbmStatus::InvalidValue,
        ),
        (
            HbmKvParams {
                device: 4096,
                ..good
            },
            HbmStatus::InvalidDevice,
        ),
        (HbmKvParams { device: -1, ..good }, HbmStatus::InvalidDevice),
    ] {
        assert_eq!(Cache::create(&bad).err(), Some(status), "{bad:?}");
    }
    // A growth mode C made up: refused, never read as a Rust enum.
    let raw = RawKvParams {
        n_layer: 1,
        n_head_kv: 1,
        head_dim: 32,
        n_ctx_max: 8,
        n_seq_max: 1,
        type_k: 1,
        type_v: 1,
        device: 0,
        growth: 7,
    };
    // SAFETY: `raw` has HbmKvParams's layout; the call reads the growth mode as an int.
    let st = unsafe { hbm_kv_cache_create((&raw as *const RawKvParams).cast(), &mut out) };
    assert_eq!(st, HbmStatus::InvalidValue);
    assert!(out.is_null());

    // Growth and release.
    assert_eq!(
        c.reserve(0, 65),
        HbmStatus::InvalidValue,
        "beyond n_ctx_max"
    );
    assert_eq!(
        c.reserve(2, 1),
        HbmStatus::InvalidValue,
        "seq beyond n_seq_max"
    );
    assert_eq!(c.release(2), HbmStatus::InvalidValue);
    assert_eq!(c.release(1), HbmStatus::InvalidValue, "never reserved");
    assert_eq!(c.capacity(1), Err(HbmStatus::InvalidValue));
    assert_eq!(
        c.layer(2, 0),
        Err(HbmStatus::InvalidValue),
        "layer beyond n_layer"
    );
    assert_eq!(c.layer(0, 1), Err(HbmStatus::InvalidValue));

    // Appends and reads, from data unlike the rows' so that a stray write would show.
    let other = DevBuf::upload(&source(HbmType::F32, 16, 77).0);
    let o = other.as_ptr();
    let (f32t, f16t) = (HbmType::F32 as i32, HbmType::F16 as i32);
    assert_eq!(
        c.append(0, 0, 0, null(), null(), f32t, 1),
        HbmStatus::NullParameter
    );
    assert_eq!(
        c.append(0, 0, 0, o, o, HbmType::Q8_0 as i32, 1),
        HbmStatus::InvalidValue
    );
    assert_eq!(c.append(0, 0, 0, o, o, 99, 1), HbmStatus::InvalidValue);
    assert_eq!(c.append(2, 0, 0, o, o, f32t, 1), HbmStatus::InvalidValue);
    assert_eq!(
        c.append(0, 1, 0, o, o, f32t, 1),
        HbmStatus::InvalidValue,
        "not live"
    );
    assert_eq!(
        c.append(0, 0, cap - 1, o, o, f32t, 2),
        HbmStatus::InvalidValue,
        "past capacity"
    );
    assert_eq!(
        c.append(0, 0, u32::MAX, o, o, f32t, 2),
        HbmStatus::InvalidValue
    );
    let odd = (other.ptr + 2) as *const c_void;
    assert_eq!(
        c.append(0, 0, 0, o, odd, f32t, 1),
        HbmStatus::InvalidValue,
        "misaligned V"
    );
    let d = src.as_ptr();
    assert_eq!(
        c.dequantize(0, 0, 0, 1, null_mut(), null_mut(), f16t),
        HbmStatus::NullParameter
    );
    assert_eq!(
        c.dequantize(0, 0, 0, 1, d, d, HbmType::BF16 as i32),
        HbmStatus::InvalidValue
    );
    assert_eq!(
        c.dequantize(0, 0, cap, 1, d, d, f16t),
        HbmStatus::InvalidValue
    );
    assert_eq!(
        c.dequantize(0, 1, 0, 1, d, d, f16t),
        HbmStatus::InvalidValue
    );

    // NULL handles and outputs.
    // SAFETY: NULL arguments are refused before anything is read or written.
    unsafe {
        assert_eq!(hbm_kv_cache_reserve(null(), 0, 1), HbmStatus::NullParameter);
        assert_eq!(hbm_kv_cache_release(null(), 0), HbmStatus::NullParameter);
        assert_eq!(
            hbm_kv_cache_trim(null(), null_mut()),
            HbmStatus::NullParameter
        );
        assert_eq!(
            hbm_kv_cache_capacity(c.0, 0, null_mut()),
            HbmStatus::NullParameter
        );
        assert_eq!(
            hbm_kv_cache_stats(c.0, null_mut()),
            HbmStatus::NullParameter
        );
        assert_eq!(
            hbm_kv_cache_stats(null(), null_mut()),
            HbmStatus::NullParameter
        );
        let mut k = null_mut();
        let mut n = 0usize;
        assert_eq!(
            hbm_kv_cache_layer(c.0, 0, 0, &mut k, null_mut(), &mut n, &mut n),
            HbmStatus::NullParameter
        );
        assert!(k.is_null(), "outputs untouched");
        assert_eq!(
            hbm_kv_cache_append(null(), 0, 0, 0, s, s, f32t, 1, null_mut()),
            HbmStatus::NullParameter
        );
        hbm_kv_cache_destroy(null_mut());
    }
    assert_eq!(snapshot(&c), before, "no failed call changed the cache");
}

#[test]
fn released_sequences_are_refused_then_reused() {
    let c = Cache::create(&params(HbmType::F16, HbmType::Q8_0, HbmKvGrowth::Vmm)).unwrap();
    let (src, _) = source(HbmType::F16, 4, 3);
    let src = DevBuf::upload(&src);
    let (s, f16t) = (src.as_ptr(), HbmType::F16 as i32);
    assert_eq!(c.reserve(0, 4), HbmStatus::Ok);
    assert_eq!(c.reserve(1, 4), HbmStatus::Ok);
    let rows1 = c.layer(0, 1).unwrap();
    assert_eq!(c.append(0, 1, 0, s, s, f16t, 4), HbmStatus::Ok);
    assert_eq!(c.release(1), HbmStatus::Ok);
    assert_eq!(c.stats().n_seq, 1);
    assert!(
        c.stats().cached > 0,
        "VMM keeps a released sequence's pages"
    );
    assert_eq!(c.release(1), HbmStatus::InvalidValue, "released twice");
    assert_eq!(c.append(0, 1, 0, s, s, f16t, 1), HbmStatus::InvalidValue);
    let d = DevBuf::zeroed(4 * ROW * 4);
    assert_eq!(
        c.dequantize(0, 1, 0, 1, d.as_ptr(), null_mut(), f16t),
        HbmStatus::InvalidValue
    );
    assert_eq!(c.layer(0, 1), Err(HbmStatus::InvalidValue));
    assert_eq!(c.capacity(1), Err(HbmStatus::InvalidValue));
    // Reused: the next sequence takes the released slot and its pages, nothing mapped anew.
    let committed = c.stats().committed;
    assert_eq!(c.reserve(1, 4), HbmStatus::Ok);
    assert_eq!(c.layer(0, 1).unwrap(), rows1);
    assert_eq!(c.stats().committed, committed);
    assert_eq!(c.append(0, 1, 0, s, s, f16t, 4), HbmStatus::Ok);
    assert_eq!(c.release(0), HbmStatus::Ok);
    let mut released = 0;
    // SAFETY: a live handle and a valid out-parameter.
    assert_eq!(
        unsafe { hbm_kv_cache_trim(c.0, &mut released) },
        HbmStatus::Ok
    );
    assert!(released > 0);
    assert_eq!(c.stats().cached, 0);
}

#[test]
fn out_of_memory_during_growth_changes_nothing() {
    let total = backend().mem_info().unwrap().1;
    let row = 32 * 128 * 4; // F32 rows of 32 heads of 128
                            // One sequence's K tensor alone is larger than the device, so the very first commit or
                            // allocation fails and nothing else sharing the device is squeezed while this test runs.
    let n_ctx_max = u32::try_from(total / row + 1).expect("a device below 64 TiB");
    for growth in [HbmKvGrowth::Vmm, HbmKvGrowth::Realloc] {
        let p = HbmKvParams {
            n_layer: 1,
            n_head_kv: 32,
            head_dim: 128,
            n_ctx_max,
            n_seq_max: 1,
            type_k: HbmType::F32 as i32,
            type_v: HbmType::F32 as i32,
            device: 0,
            growth,
        };
        let c = Cache::create(&p).unwrap();
        assert_eq!(c.reserve(0, 16), HbmStatus::Ok);
        let (src, _) = source(HbmType::F32, 16 * 32, 5);
        let src = DevBuf::upload(&src);
        assert_eq!(
            c.append(0, 0, 0, src.as_ptr(), src.as_ptr(), HbmType::F32 as i32, 16),
            HbmStatus::Ok
        );
        let before = snapshot(&c);
        assert_eq!(
            c.reserve(0, n_ctx_max),
            HbmStatus::OutOfMemory,
            "{growth:?}"
        );
        assert_eq!(
            snapshot(&c),
            before,
            "{growth:?}: a failed growth changed the cache"
        );
        assert_eq!(c.reserve(0, 17), HbmStatus::Ok, "{growth:?}: still usable");
    }
}

#[test]
fn prealloc_beyond_the_device_is_out_of_memory() {
    let total = backend().mem_info().unwrap().1;
    let p = HbmKvParams {
        n_layer: 1,
        n_head_kv: 32,
        head_dim: 128,
        n_ctx_max: u32::try_from(total / (32 * 128 * 2) + 1).unwrap(),
        n_seq_max: 1,
        type_k: HbmType::F16 as i32,
        type_v: HbmType::F16 as i32,
        device: 0,
        growth: HbmKvGrowth::Prealloc,
    };
    assert_eq!(Cache::create(&p).err(), Some(HbmStatus::OutOfMemory));
}

/// Issue 18, defect 8: every KV cache is on record while it lives, with the bytes it holds (as of
/// the last call that changed them), so a leaked cache counts in `hbm_leaks_since` and shows in
/// the exit report; a destroyed one does neither. In a child process: `leaks_since` counts
/// every thread's allocations, and the child's exit report is the one checked.
#[test]
fn kv_caches_are_tracked() {
    if crate::test_child::is_child() {
        return kv_caches_are_tracked_child();
    }
    let report = std::env::temp_dir().join(format!("hbm-kv-leak-{}.txt", std::process::id()));
    let conf = format!(
        "backend:sim,leak_report:full,report_path:{}",
        report.display()
    );
    let out = crate::test_child::run(
        "ffi::kv_cache_api::tests::kv_caches_are_tracked",
        Some(&conf),
    );
    assert!(out.contains("1 passed"), "the child ran no test: {out}");
    let text = std::fs::read_to_string(&report).unwrap();
    let _ = std::fs::remove_file(&report);
    assert!(
        text.contains("from kv_cache"),
        "the leaked cache is in the exit report: {text}"
    );
    assert!(
        text.contains("hbm_kv_cache_create"),
        "with the stack that created it: {text}"
    );
}

fn kv_caches_are_tracked_child() {
    let leaks = |mark| {
        let s = crate::track::leaks_since(mark);
        (s.bytes, s.count)
    };
    let mark = crate::track::checkpoint();
    let pre = Cache::create(&params(HbmType::F16, HbmType::F16, HbmKvGrowth::Prealloc)).unwrap();
    let held = pre.stats().committed;
    assert!(held > 0);
    assert_eq!(leaks(mark), (held, 1), "a preallocated cache holds it all");

    let vmm = Cache::create(&params(HbmType::Q8_0, HbmType::F16, HbmKvGrowth::Vmm)).unwrap();
    assert_eq!(leaks(mark), (held, 2), "a VMM cache holds nothing yet");
    assert_eq!(vmm.reserve(0, 40), HbmStatus::Ok);
    let grown = vmm.stats().committed;
    assert!(grown > 0);
    assert_eq!(
        leaks(mark),
        (held + grown, 2),
        "its record follows its growth"
    );
    assert_eq!(vmm.release(0), HbmStatus::Ok);
    // SAFETY: a live handle; NULL out-parameter allowed.
    assert_eq!(
        unsafe { hbm_kv_cache_trim(vmm.0, null_mut()) },
        HbmStatus::Ok
    );
    assert_eq!(leaks(mark), (held + vmm.stats().committed, 2));

    drop(vmm);
    drop(pre);
    assert_eq!(leaks(mark), (0, 0), "destroyed caches are off the record");

    // This one leaks: the exit report must show it.
    let leaked = Cache::create(&params(HbmType::F32, HbmType::F32, HbmKvGrowth::Prealloc)).unwrap();
    std::mem::forget(leaked);
}
