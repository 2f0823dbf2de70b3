//! The contiguous view for llama.cpp-shaped users (issue 12, item 4): one KV cache slot per
//! layer holding every cell of every sequence, as llama.cpp's unified cache keeps them, that
//! starts small and grows without copying. It is `KvCache` in `Growth::Vmm` mode with
//! `n_seq_max = 1`: the slot reserves address space for `n_ctx_max` cells and commits pages as
//! `reserve(0, n_ctx)` grows, so `n_ctx` can start at what the first batch needs.

use hbmalloc::backend::sim::{SimBackend, SIM_GRANULARITY};
use hbmalloc::backend::Backend;
use hbmalloc::kv::cache::{Growth, KvCache, KvParams};
use hbmalloc::kv::HbmType;
use std::sync::Arc;

#[test]
fn a_unified_buffer_grows_in_place_with_its_cells() {
    // 4 layers, 8 KV heads of 128, F16: 2 KiB rows, 1024 cells per 2 MiB granule.
    let b = Arc::new(SimBackend::new(0, 4 << 30));
    let params = KvParams {
        n_layer: 4,
        n_head_kv: 8,
        head_dim: 128,
        n_ctx_max: 65536,
        n_seq_max: 1,
        type_k: HbmType::F16,
        type_v: HbmType::F16,
        growth: Growth::Vmm,
    };
    let kv = KvCache::new(b.clone(), params).unwrap();
    let row = kv.row_bytes_k();
    assert_eq!(row, 2048);
    let tensors = 2 * 4;
    assert_eq!(
        kv.stats().committed,
        0,
        "nothing committed before the first reserve"
    );

    kv.reserve(0, 512).unwrap();
    let committed =
        |cells: usize| (tensors * (cells * row).next_multiple_of(SIM_GRANULARITY)) as u64;
    assert_eq!(kv.stats().committed, committed(512));
    let before: Vec<_> = (0..4).map(|l| kv.seq_rows(l, 0).unwrap()).collect();
    // Cells of several sequences, as llama.cpp places them: the engine owns the cell map.
    for (l, &(k, v)) in before.iter().enumerate() {
        for cell in [0usize, 100, 511] {
            b.copy_from_host(k + cell * row, &[l as u8 + 1; 2048])
                .unwrap();
            b.copy_from_host(v + cell * row, &[l as u8 + 101; 2048])
                .unwrap();
        }
    }

    kv.reserve(0, 20_000).unwrap(); // n_ctx grows 40x
    assert_eq!(kv.stats().committed, committed(20_000));
    // Capacity is what the granules committed hold: 20 480 cells.
    assert_eq!(
        kv.capacity(0).unwrap() as u64,
        committed(20_000) / tensors as u64 / row as u64
    );
    let after: Vec<_> = (0..4).map(|l| kv.seq_rows(l, 0).unwrap()).collect();
    assert_eq!(after, before, "the buffers did not move");
    assert_eq!(
        (kv.stats().generation, kv.stats().copied),
        (0, 0),
        "nothing was copied"
    );
    for (l, &(k, v)) in after.iter().enumerate() {
        for cell in [0usize, 100, 511] {
            let (mut hk, mut hv) = (vec![0u8; 2048], vec![0u8; 2048]);
            b.copy_to_host(&mut hk, k + cell * row).unwrap();
            b.copy_to_host(&mut hv, v + cell * row).unwrap();
            assert_eq!(hk, vec![l as u8 + 1; 2048], "layer {l} K cell {cell}");
            assert_eq!(hv, vec![l as u8 + 101; 2048], "layer {l} V cell {cell}");
        }
        // The new cells are there to write.
        b.copy_from_host(k + 19_999 * row, &[7; 2048]).unwrap();
    }
    // The whole of n_ctx_max is address space only.
    assert!(kv.stats().reserved >= (tensors * 65536 * row) as u64);
    assert!(kv.stats().committed < kv.stats().reserved / 3);
}
