//! The paged KV cache on a real GPU: one scenario (add tokens, append, fork, copy-on-write,
//! truncate, a sliding-window layer, gather, trim) run on the CUDA backend and on the simulated
//! device must read back the same bytes, in every cache type. The simulated device's append and
//! gather are the CPU reference of ggml's formats, so this checks the CUDA paths (VMM block
//! storage, block tables, copy-on-write copies, the conversion kernels) against it.
//!
//! `#[ignore]`d: `scripts/gpu-check.sh` runs it with `--ignored`. Without a GPU it fails.

use hbmalloc::backend::cuda::CudaBackend;
use hbmalloc::backend::sim::SimBackend;
use hbmalloc::backend::{Backend, DevicePtr, SharedBackend};
use hbmalloc::kernels::nvrtc_available;
use hbmalloc::kv::paged::{LayerSpec, PagedKvCache, PagedParams};
use hbmalloc::kv::HbmType;
use std::sync::Arc;

const HEADS: u32 = 4;
const HEAD_DIM: u32 = 64;
const ELEMS: usize = (HEADS * HEAD_DIM) as usize;

/// Floats whose scale changes every 32 elements (one quantized block).
fn floats(seed: u32, n: usize) -> Vec<f32> {
    let mut x = seed.max(1);
    let mut scale = 1.0f32;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if i % 32 == 0 {
                scale = 10f32.powi((x % 7) as i32 - 3);
            }
            ((x >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

fn upload(b: &dyn Backend, data: &[f32]) -> DevicePtr {
    let bytes: Vec<u8> = data.iter().flat_map(|f| f.to_ne_bytes()).collect();
    let p = b.alloc(bytes.len()).unwrap();
    b.copy_from_host(p, &bytes).unwrap();
    p
}

/// Appends `n` tokens of fresh rows to `seq` in every layer.
fn append(cache: &PagedKvCache, b: &dyn Backend, seq: u32, n: u32, seed: u32, layers: u32) {
    cache.add_tokens(seq, n, 0).unwrap();
    let len = cache.seq_len(seq).unwrap();
    for layer in 0..layers {
        let slots: Vec<i64> = (len - n..len)
            .map(|pos| {
                let blocks = cache.seq_blocks(layer, seq).unwrap();
                let bt = cache.params().block_tokens;
                blocks[(pos / bt) as usize] as i64 * bt as i64 + (pos % bt) as i64
            })
            .collect();
        let k = upload(b, &floats(seed + layer * 7, n as usize * ELEMS));
        let v = upload(b, &floats(seed + layer * 7 + 3, n as usize * ELEMS));
        cache.append(layer, k, v, HbmType::F32, &slots, 0).unwrap();
        b.synchronize().unwrap();
        b.free(k, n as usize * ELEMS * 4).unwrap();
        b.free(v, n as usize * ELEMS * 4).unwrap();
    }
}

/// What the scenario reads back: every live sequence's rows of every layer as F32 (tokens a
/// window gave back left out), then the statistics that must agree.
fn scenario(b: SharedBackend, ty: HbmType) -> (Vec<u8>, [u64; 4]) {
    // Layer 2 keeps a window of 24 tokens; the others keep everything.
    let mut layers = vec![LayerSpec::full(HEADS, HEAD_DIM); 3];
    layers[2].window = 24;
    let params = PagedParams {
        type_k: ty,
        type_v: ty,
        ..PagedParams::uniform(3, HEADS, HEAD_DIM, ty, 256, 8, 512)
    };
    let params = PagedParams { layers, ..params };
    let cache = PagedKvCache::new(b.clone(), params).unwrap();
    append(&cache, &*b, 0, 40, 11, 3); // two and a half blocks
    cache.fork(0, 1).unwrap(); // shares them; the half block is copied on the next append
    append(&cache, &*b, 1, 9, 23, 3);
    append(&cache, &*b, 0, 30, 37, 3);
    cache.truncate(0, 60).unwrap(); // its window still holds tokens 36..60
    append(&cache, &*b, 2, 5, 41, 3);
    cache.free(2).unwrap();
    cache.trim();
    let mut out = Vec::new();
    for seq in [0u32, 1] {
        let len = cache.seq_len(seq).unwrap();
        for layer in 0..3u32 {
            // From the first block the layer still holds (a window gives older ones back).
            let blocks = cache.seq_blocks(layer, seq).unwrap();
            let first = blocks.iter().position(|&id| id >= 0).unwrap() as u32;
            let start = first * cache.params().block_tokens;
            let n = len - start;
            let bytes = n as usize * ELEMS * 4;
            let (k, v) = (b.alloc(bytes).unwrap(), b.alloc(bytes).unwrap());
            cache
                .gather(layer, seq, start, n, k, v, HbmType::F32, 0)
                .unwrap();
            b.synchronize().unwrap();
            for p in [k, v] {
                let mut host = vec![0u8; bytes];
                b.copy_to_host(&mut host, p).unwrap();
                out.extend_from_slice(&host);
                b.free(p, bytes).unwrap();
            }
        }
    }
    let s = cache.stats();
    (
        out,
        [s.blocks_used, s.blocks_shared, s.tokens, s.cow_copies],
    )
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn paged_cache_on_cuda_reads_back_what_the_reference_does() {
    assert!(
        CudaBackend::available(),
        "this test needs a CUDA driver and a device"
    );
    assert!(
        nvrtc_available(),
        "libnvrtc.so.13 must be on the loader path"
    );
    let cuda: SharedBackend = Arc::new(CudaBackend::new(0).unwrap());
    let sim: SharedBackend = Arc::new(SimBackend::new(0, 8 << 30));
    for ty in [
        HbmType::F32,
        HbmType::F16,
        HbmType::BF16,
        HbmType::Q8_0,
        HbmType::Q4_0,
    ] {
        let (want, want_stats) = scenario(sim.clone(), ty);
        let (got, got_stats) = scenario(cuda.clone(), ty);
        assert_eq!(got_stats, want_stats, "{ty:?}: statistics");
        assert_eq!(got.len(), want.len(), "{ty:?}");
        let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(first_diff, None, "{ty:?}: first differing byte");
        assert!(want_stats[3] > 0, "the scenario copied a shared block");
    }
}

/// The scenario itself (without a GPU): every step succeeds, a shared block is copied, a window
/// gives blocks back, and what is read back is the rows written, not zeros.
#[test]
fn the_scenario_runs_on_the_simulated_device() {
    let sim: SharedBackend = Arc::new(SimBackend::new(0, 8 << 30));
    let (bytes, [used, _shared, tokens, cow]) = scenario(sim, HbmType::Q8_0);
    assert!(cow > 0 && used > 0 && tokens > 0);
    let floats: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
        .collect();
    assert!(floats.iter().filter(|f| **f != 0.0).count() > floats.len() / 2);
}
