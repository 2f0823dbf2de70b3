//! Batched appends and gathers on the simulated device, byte for byte against the CPU reference
//! (`kv::quant`), with sliding windows, mixed K and V types, refusals that queue nothing, and
//! staging buffers never overwritten while a launch may read them.

use super::*;
use crate::backend::sim::{self, SimBackend};
use crate::backend::Backend;
use crate::kv::half::fp32_to_fp16;
use crate::kv::quant::{dequantize_row, quantize_row};
use crate::kv::HbmType;
use std::sync::Arc;

/// Rows of 64 elements (2 heads of 32); blocks of 4 tokens; layer 2 keeps a window of 6.
fn params(type_k: HbmType, type_v: HbmType) -> PagedParams {
    let mut p = PagedParams::uniform(3, 2, 32, type_k, 64, 8, 64);
    p.type_v = type_v;
    p.block_tokens = 4;
    p.layers[2].window = 6;
    p
}

const ELEMS: usize = 64;

fn floats(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let scale = [1e-3f32, 1.0, 300.0, 0.0][(i / 32) % 4];
            (x as f32 / u32::MAX as f32 - 0.5) * scale
        })
        .collect()
}

fn read(b: &dyn Backend, ptr: DevicePtr, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    b.copy_to_host(&mut out, ptr).unwrap();
    out
}

fn upload(b: &dyn Backend, bytes: &[u8]) -> DevicePtr {
    let p = b.alloc(bytes.len().max(1)).unwrap();
    b.copy_from_host(p, bytes).unwrap();
    p
}

/// Source rows as `src_type` bytes, and the floats the cache must see (F16 rounded).
fn source(n_tokens: usize, seed: u32, src_type: HbmType) -> (Vec<u8>, Vec<f32>) {
    let x = floats(n_tokens * ELEMS, seed);
    match src_type {
        HbmType::F32 => (x.iter().flat_map(|f| f.to_ne_bytes()).collect(), x),
        _ => {
            let h: Vec<u16> = x.iter().map(|&f| fp32_to_fp16(f)).collect();
            let mut back = vec![0f32; x.len()];
            let bytes: Vec<u8> = h.iter().flat_map(|v| v.to_ne_bytes()).collect();
            dequantize_row(HbmType::F16, &bytes, &mut back).unwrap();
            (bytes, back)
        }
    }
}

/// One step: `add_tokens` for each sequence, then `append_step` from fresh sources; checks every
/// stored row against `quantize_row` of its source. Returns the source floats per (layer, K/V).
fn step(
    c: &PagedKvCache,
    b: &dyn Backend,
    seqs: &[u32],
    n_new: &[u32],
    src_type: HbmType,
    seed: u32,
) -> Vec<[Vec<f32>; 2]> {
    for (&s, &n) in seqs.iter().zip(n_new) {
        c.add_tokens(s, n, 0).unwrap();
    }
    let n: usize = n_new.iter().map(|&n| n as usize).sum();
    let mut srcs = Vec::new();
    let (mut ks, mut vs) = (Vec::new(), Vec::new());
    for l in 0..3u32 {
        let (kb, kf) = source(n, seed + 10 * l, src_type);
        let (vb, vf) = source(n, seed + 10 * l + 5, src_type);
        ks.push(upload(b, &kb));
        vs.push(upload(b, &vb));
        srcs.push([kf, vf]);
    }
    c.append_step(seqs, n_new, &ks, &vs, src_type, 0).unwrap();
    let p = c.params();
    for l in 0..3u32 {
        let slots = c.slot_mapping(l, seqs, n_new).unwrap();
        let (kbase, vbase, row_k, row_v) = c.layer_tensors(l).unwrap();
        for (kv, (base, ty, row)) in [(kbase, p.type_k, row_k), (vbase, p.type_v, row_v)]
            .into_iter()
            .enumerate()
        {
            for (i, &s) in slots.iter().enumerate() {
                if s < 0 {
                    continue;
                }
                let mut want = vec![0u8; row];
                let x = &srcs[l as usize][kv][i * ELEMS..(i + 1) * ELEMS];
                quantize_row(ty, x, &mut want).unwrap();
                let got = read(b, base + s as usize * row, row);
                assert_eq!(got, want, "{ty:?} layer {l} kv {kv} token {i} slot {s}");
            }
        }
    }
    srcs
}

#[test]
fn a_step_appends_every_layer_byte_exact() {
    for (tk, tv) in [
        (HbmType::Q8_0, HbmType::Q8_0),
        (HbmType::Q4_0, HbmType::F16),
        (HbmType::F32, HbmType::BF16),
    ] {
        for src_type in [HbmType::F32, HbmType::F16] {
            let b = Arc::new(SimBackend::new(0, 1 << 30));
            let c = PagedKvCache::new(b.clone(), params(tk, tv)).unwrap();
            // Prefill: seq 2's 13 tokens overrun layer 2's window, whose first block is dropped
            // in the same step (slots -1 in the middle of the step's rows).
            step(&c, b.as_ref(), &[0, 1, 2], &[5, 3, 13], src_type, 1);
            let dropped = c.slot_mapping(2, &[0, 1, 2], &[5, 3, 13]).unwrap();
            assert!(dropped.contains(&-1), "the window dropped tokens mid-step");
            // Decode steps, one token each.
            for k in 0..6 {
                step(&c, b.as_ref(), &[0, 1, 2], &[1, 1, 1], src_type, 100 + k);
            }
        }
    }
}

#[test]
fn gather_layers_is_dequantize_of_the_stored_rows() {
    let b = Arc::new(SimBackend::new(0, 1 << 30));
    let c = PagedKvCache::new(b.clone(), params(HbmType::Q4_0, HbmType::Q8_0)).unwrap();
    let srcs = step(&c, b.as_ref(), &[3], &[11], HbmType::F32, 7);
    for dst_type in [HbmType::F32, HbmType::F16] {
        let row = dst_type.row_bytes(ELEMS).unwrap();
        // Tokens 1..11 of layers 0 and 1 (layer 2's window gave back block 0: skipped).
        let dst: Vec<DevicePtr> = (0..6).map(|_| b.alloc(10 * row).unwrap()).collect();
        let (k, v) = ([dst[0], dst[1], 0], [dst[3], dst[4], 0]);
        c.gather_layers(3, 1, 10, &k, &v, dst_type, 0).unwrap();
        for l in 0..2 {
            for (kv, (ptr, ty)) in [(k[l], HbmType::Q4_0), (v[l], HbmType::Q8_0)]
                .into_iter()
                .enumerate()
            {
                let mut want = Vec::new();
                for t in 1..11 {
                    let mut q = vec![0u8; ty.row_bytes(ELEMS).unwrap()];
                    quantize_row(ty, &srcs[l][kv][t * ELEMS..(t + 1) * ELEMS], &mut q).unwrap();
                    let mut back = vec![0f32; ELEMS];
                    dequantize_row(ty, &q, &mut back).unwrap();
                    let mut out = vec![0u8; row];
                    quantize_row(dst_type, &back, &mut out).unwrap();
                    want.extend(out);
                }
                assert_eq!(
                    read(b.as_ref(), ptr, 10 * row),
                    want,
                    "{dst_type:?} {l} {kv}"
                );
            }
        }
        // The same bytes as the layer-by-layer gather.
        c.gather(1, 3, 1, 10, dst[2], dst[5], dst_type, 0).unwrap();
        assert_eq!(
            read(b.as_ref(), dst[2], 10 * row),
            read(b.as_ref(), dst[1], 10 * row)
        );
        assert_eq!(
            read(b.as_ref(), dst[5], 10 * row),
            read(b.as_ref(), dst[4], 10 * row)
        );
        // Layer 2 lost tokens 0..4 to its window: refused.
        let all = [dst[0], dst[1], dst[2]];
        assert!(c.gather_layers(3, 1, 10, &all, &[], dst_type, 0).is_err());
    }
}

#[test]
fn a_refused_step_changes_nothing() {
    let b = Arc::new(SimBackend::new(0, 1 << 30));
    let c = PagedKvCache::new(b.clone(), params(HbmType::Q8_0, HbmType::Q8_0)).unwrap();
    c.add_tokens(0, 6, 0).unwrap();
    c.fork(0, 1).unwrap(); // seq 1 shares seq 0's blocks; its last block is partly filled
    c.add_tokens(2, 2, 0).unwrap();
    let (kbase, _, row, _) = c.layer_tensors(0).unwrap();
    let before = read(b.as_ref(), kbase, 64 * 4 * row);
    let (src, _) = source(8, 3, HbmType::F32);
    let s = upload(b.as_ref(), &src);
    let srcs = [s, s, s];
    type Step<'a> = (&'a [u32], &'a [u32], &'a [DevicePtr], HbmType);
    let refused: [Step; 6] = [
        // Token 5 of seq 1 lies in a block it shares with seq 0.
        (&[2, 1], &[2, 1], &srcs, HbmType::F32),
        (&[2], &[3], &srcs, HbmType::F32), // more new tokens than it holds
        (&[2, 7], &[2, 1], &srcs, HbmType::F32), // seq 7 is not live
        (&[2], &[2], &srcs[..2], HbmType::F32), // a layer without a source
        (&[2], &[2], &[s + 2, s, s], HbmType::F32), // misaligned F32 source
        (&[2], &[2], &srcs, HbmType::Q8_0), // not F32 or F16
    ];
    for (i, (seqs, n, k, ty)) in refused.into_iter().enumerate() {
        assert!(c.append_step(seqs, n, k, &[], ty, 0).is_err(), "case {i}");
        assert_eq!(read(b.as_ref(), kbase, 64 * 4 * row), before, "case {i}");
    }
    assert!(c
        .append_step(&[2], &[2], &srcs, &srcs[..1], HbmType::F32, 0)
        .is_err());
    // The same step with seq 1's block copied first goes through.
    c.add_tokens(1, 1, 0).unwrap();
    c.append_step(&[2, 1], &[2, 1], &srcs, &srcs, HbmType::F32, 0)
        .unwrap();
    assert_ne!(read(b.as_ref(), kbase, 64 * 4 * row), before);
}

/// Run in a child process: holding the simulated device's events is process-wide.
#[test]
fn staging_is_reused_only_after_its_launch_completed() {
    if !crate::test_child::is_child() {
        let out = crate::test_child::run(
            "kv::paged::batch_tests::staging_is_reused_only_after_its_launch_completed",
            Some("backend:sim,leak_report:off"),
        );
        assert!(out.contains("child checks passed"), "{out}");
        return;
    }
    let b = Arc::new(SimBackend::new(0, 1 << 30));
    let c = PagedKvCache::new(b.clone(), params(HbmType::F16, HbmType::F16)).unwrap();
    for k in 0..5 {
        step(&c, b.as_ref(), &[0, 1], &[1, 1], HbmType::F32, k);
    }
    assert_eq!(c.lock().staging.len(), 1, "done launches free their buffer");
    sim::hold_events();
    let first = {
        step(&c, b.as_ref(), &[0, 1], &[1, 1], HbmType::F32, 20);
        c.lock().staging.len()
    };
    step(&c, b.as_ref(), &[0, 1], &[1, 1], HbmType::F32, 21);
    assert_eq!(
        c.lock().staging.len(),
        first + 1,
        "a buffer a queued launch may read is not overwritten"
    );
    let held = c.lock().staging.held_host_bytes();
    assert!(held > 0, "the host source of a queued copy is kept");
    sim::complete_held_events();
    let n = c.lock().staging.len();
    step(&c, b.as_ref(), &[0, 1], &[1, 1], HbmType::F32, 22);
    assert_eq!(c.lock().staging.len(), n, "completed: reused");
    assert!(
        c.lock().staging.held_host_bytes() < held,
        "completed copies give their host source back"
    );
    println!("child checks passed");
}

/// Attention of one query over contiguous K and V rows (`[t][kv head][d]`), in f64.
#[allow(clippy::too_many_arguments)]
fn contiguous_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    len: usize,
    n_heads: usize,
    n_kv: usize,
    d: usize,
    scale: f64,
) -> Vec<f64> {
    let mut out = Vec::new();
    for h in 0..n_heads {
        let kvh = h / (n_heads / n_kv);
        let s: Vec<f64> = (0..len)
            .map(|t| {
                (0..d)
                    .map(|e| q[h * d + e] as f64 * k[(t * n_kv + kvh) * d + e] as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let l: f64 = w.iter().sum();
        for e in 0..d {
            out.push(
                (0..len)
                    .map(|t| w[t] * v[(t * n_kv + kvh) * d + e] as f64)
                    .sum::<f64>()
                    / l,
            );
        }
    }
    out
}

#[test]
fn decode_attention_through_block_tables_equals_a_contiguous_cache() {
    let b = Arc::new(SimBackend::new(0, 1 << 30));
    let mut p = PagedParams::uniform(1, 2, 32, HbmType::F16, 64, 8, 64);
    p.block_tokens = 4;
    let c = PagedKvCache::new(b.clone(), p).unwrap();
    // Seq 0: 9 tokens; seq 1 forks it and adds 3 (shares two whole blocks, copies the third).
    let mut rows: Vec<[Vec<f32>; 2]> = vec![[Vec::new(), Vec::new()]; 2];
    let s0 = step_one_layer(&c, b.as_ref(), &[0], &[9], 1);
    rows[0] = s0.clone();
    c.fork(0, 1).unwrap();
    let s1 = step_one_layer(&c, b.as_ref(), &[1, 0], &[3, 2], 2);
    for kv in 0..2 {
        rows[1][kv] = [&s0[kv][..], &s1[kv][..3 * ELEMS]].concat();
        rows[0][kv].extend_from_slice(&s1[kv][3 * ELEMS..]);
    }
    let (n_heads, d) = (4usize, 32usize);
    let q = floats(2 * n_heads * d, 9);
    let qd = upload(
        b.as_ref(),
        &q.iter().flat_map(|f| f.to_ne_bytes()).collect::<Vec<_>>(),
    );
    let out = b.alloc(2 * n_heads * d * 4).unwrap();
    let scale = 1.0 / (d as f32).sqrt();
    c.decode_attention(0, &[0, 1], n_heads as u32, qd, out, scale, 0)
        .unwrap();
    let got: Vec<f32> = read(b.as_ref(), out, 2 * n_heads * d * 4)
        .chunks_exact(4)
        .map(|w| f32::from_ne_bytes(w.try_into().unwrap()))
        .collect();
    for (i, len) in [(0usize, 11usize), (1, 12)] {
        let want = contiguous_attention(
            &q[i * n_heads * d..][..n_heads * d],
            &rows[i][0],
            &rows[i][1],
            len,
            n_heads,
            2,
            d,
            scale as f64,
        );
        for (e, (&g, &w)) in got[i * n_heads * d..][..n_heads * d]
            .iter()
            .zip(&want)
            .enumerate()
        {
            assert!(
                (g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "seq {i} elem {e}: {g} vs {w}"
            );
        }
    }
    // Quantized caches, windows and uneven heads are refused.
    assert!(c.decode_attention(0, &[0], 3, qd, out, scale, 0).is_err());
    assert!(c.decode_attention(0, &[5], 4, qd, out, scale, 0).is_err());
}

/// `step` for a one-layer cache, sources as F16-rounded floats: returns [K, V] floats.
fn step_one_layer(
    c: &PagedKvCache,
    b: &dyn Backend,
    seqs: &[u32],
    n_new: &[u32],
    seed: u32,
) -> [Vec<f32>; 2] {
    for (&s, &n) in seqs.iter().zip(n_new) {
        c.add_tokens(s, n, 0).unwrap();
    }
    let n: usize = n_new.iter().map(|&n| n as usize).sum();
    let (kb, kf) = source(n, seed, HbmType::F16);
    let (vb, vf) = source(n, seed + 1, HbmType::F16);
    let (k, v) = (upload(b, &kb), upload(b, &vb));
    c.append_step(seqs, n_new, &[k], &[v], HbmType::F16, 0)
        .unwrap();
    [kf, vf]
}

/// The gathers a backend was asked for: (jobs per call, rows per job).
struct GatherRecorder {
    sim: SimBackend,
    calls: std::sync::Mutex<Vec<Vec<u32>>>,
}

impl Backend for GatherRecorder {
    crate::forward_backend!(sim; name, device, alloc, free, mem_info, report_out_of_memory,
        synchronize, event_record, event_done, event_release, lock_for_fork, vmm_granularity,
        vmm_reserve, vmm_release, vmm_map, vmm_unmap, copy_d2d, copy_to_host, copy_from_host,
        copy_from_host_on, kv_append, kv_dequantize, kv_append_jobs, paged_decode_attention);
    fn kv_dequantize_jobs(
        &self,
        jobs: &[crate::backend::GatherJob],
        device_jobs: DevicePtr,
        src_type: HbmType,
        dst_type: HbmType,
        stream: crate::backend::Stream,
    ) -> crate::error::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(jobs.iter().map(|j| j.n_rows).collect());
        self.sim
            .kv_dequantize_jobs(jobs, device_jobs, src_type, dst_type, stream)
    }
}

/// A gather is one job per (layer, K/V) over all the sequence's blocks, rows found through the
/// slots on the device: a job per block made a long sequence's gather thousands of descriptors
/// to build and upload, which bounded it far below the kernel's bandwidth.
#[test]
fn a_gather_is_one_job_per_tensor_whatever_the_blocks() {
    let b = Arc::new(GatherRecorder {
        sim: SimBackend::new(0, 1 << 30),
        calls: Default::default(),
    });
    let c = PagedKvCache::new(b.clone(), params(HbmType::Q8_0, HbmType::Q8_0)).unwrap();
    // Another sequence first, so that seq 1's blocks are not the lowest ids.
    step(&c, b.as_ref(), &[0], &[3], HbmType::F32, 1);
    let srcs = step(&c, b.as_ref(), &[1], &[21], HbmType::F32, 2); // 6 blocks of 4
    step(&c, b.as_ref(), &[0], &[5], HbmType::F32, 3); // interleaves the pools' blocks
    let row = HbmType::F32.row_bytes(ELEMS).unwrap();
    let dst: Vec<DevicePtr> = (0..4).map(|_| b.alloc(19 * row).unwrap()).collect();
    let (k, v) = ([dst[0], dst[1], 0], [dst[2], dst[3], 0]);
    c.gather_layers(1, 2, 19, &k, &v, HbmType::F32, 0).unwrap();
    assert_eq!(*b.calls.lock().unwrap(), vec![vec![19; 4]]);
    for l in 0..2 {
        for (kv, ptr) in [k[l], v[l]].into_iter().enumerate() {
            let mut want = Vec::new();
            for t in 2..21 {
                let mut q = vec![0u8; HbmType::Q8_0.row_bytes(ELEMS).unwrap()];
                quantize_row(HbmType::Q8_0, &srcs[l][kv][t * ELEMS..][..ELEMS], &mut q).unwrap();
                let mut back = vec![0f32; ELEMS];
                dequantize_row(HbmType::Q8_0, &q, &mut back).unwrap();
                want.extend(back.iter().flat_map(|x| x.to_ne_bytes()));
            }
            assert_eq!(read(b.as_ref(), ptr, 19 * row), want, "layer {l} kv {kv}");
        }
    }
}
