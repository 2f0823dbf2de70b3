//! The paged KV cache's C API called from Rust, on the process's backend (the simulated device
//! under `cargo test`): NULL and bad arguments refused, a step driven through the exports.

use super::*;
use crate::backend::SharedBackend;
use crate::kv::quant::quantize_row;
use std::ptr::{null, null_mut};

fn backend() -> SharedBackend {
    runtime::backend(0).expect("device 0 (the simulated device under cargo test)")
}

/// Layer 0: 2 heads of 32, full attention; layer 1: 1 head of 64, K only (MLA-like).
const LAYERS: [HbmPagedKvLayer; 2] = [
    HbmPagedKvLayer {
        n_kv_heads: 2,
        head_dim_k: 32,
        head_dim_v: 32,
        window: 0,
    },
    HbmPagedKvLayer {
        n_kv_heads: 1,
        head_dim_k: 64,
        head_dim_v: 0,
        window: 0,
    },
];

fn params(ty: HbmType) -> HbmPagedKvParams {
    HbmPagedKvParams {
        layers: LAYERS.as_ptr(),
        n_layer: 2,
        type_k: ty as i32,
        type_v: ty as i32,
        block_tokens: 0,
        num_blocks: 32,
        max_seqs: 4,
        max_seq_tokens: 128,
        device: 0,
    }
}

fn create(p: &HbmPagedKvParams) -> *mut HbmPagedKv {
    let mut kv = null_mut();
    // SAFETY: valid params and out-pointer.
    assert_eq!(unsafe { hbm_paged_kv_create(p, &mut kv) }, HbmStatus::Ok);
    kv
}

fn stats(kv: *const HbmPagedKv) -> HbmPagedKvStats {
    let mut s = HbmPagedKvStats::from(PagedStats::default());
    // SAFETY: live handle, writable out-pointer.
    assert_eq!(unsafe { hbm_paged_kv_stats(kv, &mut s) }, HbmStatus::Ok);
    s
}

#[test]
fn create_refuses_null_and_bad_params() {
    let mut kv = null_mut();
    let p = params(HbmType::F16);
    // SAFETY: every call passes NULL or valid pointers; none succeeds, so nothing is held.
    unsafe {
        assert_eq!(
            hbm_paged_kv_create(null(), &mut kv),
            HbmStatus::NullParameter
        );
        assert_eq!(
            hbm_paged_kv_create(&p, null_mut()),
            HbmStatus::NullParameter
        );
        let no_layers = HbmPagedKvParams {
            layers: null(),
            ..p
        };
        assert_eq!(
            hbm_paged_kv_create(&no_layers, &mut kv),
            HbmStatus::NullParameter
        );
        for bad in [
            HbmPagedKvParams { n_layer: 0, ..p },
            HbmPagedKvParams { type_k: 3, ..p },
            HbmPagedKvParams { type_v: -1, ..p },
            HbmPagedKvParams { num_blocks: 0, ..p },
            HbmPagedKvParams { max_seqs: 0, ..p },
            HbmPagedKvParams {
                max_seq_tokens: 0,
                ..p
            },
        ] {
            assert_eq!(hbm_paged_kv_create(&bad, &mut kv), HbmStatus::InvalidValue);
        }
        assert_eq!(
            hbm_paged_kv_create(&HbmPagedKvParams { device: 99, ..p }, &mut kv),
            HbmStatus::InvalidDevice
        );
        assert!(kv.is_null(), "untouched on every error");
        hbm_paged_kv_destroy(null_mut());
    }
}

#[test]
fn null_out_params_and_handles_are_refused() {
    let kv = create(&params(HbmType::F16));
    let mut n = 0u32;
    let mut t = null();
    let (mut k, mut v, mut rk, mut rv) = (null_mut(), null_mut(), 0usize, 0usize);
    let mut slots = [0i64; 4];
    let mut n_slots = 0usize;
    // SAFETY: `kv` is live; the other pointers are NULL or valid.
    unsafe {
        assert_eq!(
            hbm_paged_kv_seq_add_tokens(null(), 0, 1, null_mut()),
            HbmStatus::NullParameter
        );
        assert_eq!(
            hbm_paged_kv_seq_fork(null(), 0, 1),
            HbmStatus::NullParameter
        );
        assert_eq!(
            hbm_paged_kv_seq_truncate(null(), 0, 0),
            HbmStatus::NullParameter
        );
        assert_eq!(hbm_paged_kv_seq_free(null(), 0), HbmStatus::NullParameter);
        assert_eq!(
            hbm_paged_kv_seq_len(kv, 0, null_mut()),
            HbmStatus::NullParameter
        );
        assert_eq!(
            hbm_paged_kv_seq_len(null(), 0, &mut n),
            HbmStatus::NullParameter
        );
        assert_eq!(
            hbm_paged_kv_block_table(kv, 0, null_mut(), &mut n),
            HbmStatus::NullParameter
        );
        assert_eq!(
            hbm_paged_kv_block_table(kv, 0, &mut t, null_mut()),
            HbmStatus::NullParameter
        );
        assert_eq!(
            hbm_paged_kv_layer(kv, 0, &mut k, null_mut(), &mut rk, &mut rv),
            HbmStatus::NullParameter
        );
        assert_eq!(
            hbm_paged_kv_slot_mapping(
                kv,
                0,
                null(),
                null(),
                1,
                slots.as_mut_ptr(),
                4,
                &mut n_slots
            ),
            HbmStatus::NullParameter
        );
        assert_eq!(
            hbm_paged_kv_slot_mapping(kv, 0, null(), null(), 0, null_mut(), 4, &mut n_slots),
            HbmStatus::NullParameter
        );
        assert_eq!(
            hbm_paged_kv_append(kv, 0, null(), null(), 0, null(), 0, null_mut()),
            HbmStatus::NullParameter
        );
        let src = [0f32; 64];
        assert_eq!(
            hbm_paged_kv_append(kv, 0, src.as_ptr().cast(), null(), 0, null(), 1, null_mut()),
            HbmStatus::NullParameter,
            "slots NULL with tokens to write"
        );
        assert_eq!(
            hbm_paged_kv_gather(kv, 0, 0, 0, 0, null_mut(), null_mut(), 0, null_mut()),
            HbmStatus::NullParameter
        );
        assert_eq!(hbm_paged_kv_stats(kv, null_mut()), HbmStatus::NullParameter);
        assert_eq!(
            hbm_paged_kv_trim(null(), null_mut()),
            HbmStatus::NullParameter
        );
        // Out-of-range arguments.
        assert_eq!(
            hbm_paged_kv_seq_len(kv, 0, &mut n),
            HbmStatus::InvalidValue,
            "not live"
        );
        assert_eq!(
            hbm_paged_kv_layer(kv, 2, &mut k, &mut v, &mut rk, &mut rv),
            HbmStatus::InvalidValue
        );
        assert_eq!(
            hbm_paged_kv_seq_add_tokens(kv, 4, 1, null_mut()),
            HbmStatus::InvalidValue
        );
        assert_eq!(
            hbm_paged_kv_seq_add_tokens(kv, 0, 129, null_mut()),
            HbmStatus::InvalidValue
        );
        hbm_paged_kv_destroy(kv);
    }
}

#[test]
fn out_of_blocks_is_out_of_memory_and_changes_nothing() {
    let kv = create(&HbmPagedKvParams {
        num_blocks: 8,
        ..params(HbmType::F16)
    });
    // SAFETY: `kv` is live; the out-pointer is valid.
    unsafe {
        assert_eq!(
            hbm_paged_kv_seq_add_tokens(kv, 0, 120, null_mut()),
            HbmStatus::Ok
        );
        let before = stats(kv);
        assert_eq!(
            hbm_paged_kv_seq_add_tokens(kv, 1, 9, null_mut()),
            HbmStatus::OutOfMemory
        );
        assert_eq!(
            hbm_paged_kv_seq_add_tokens(kv, 0, 8, null_mut()),
            HbmStatus::Ok,
            "fills block 7"
        );
        assert_eq!(
            hbm_paged_kv_seq_add_tokens(kv, 0, 1, null_mut()),
            HbmStatus::InvalidValue,
            "past 128"
        );
        let mut n = 0;
        assert_eq!(
            hbm_paged_kv_seq_len(kv, 1, &mut n),
            HbmStatus::InvalidValue,
            "never started"
        );
        assert_eq!(stats(kv).blocks_used, before.blocks_used);
        hbm_paged_kv_destroy(kv);
    }
}

/// One step through the exports: two sequences, one forked, slots, append (slots in device
/// memory), the block table as a kernel reads it, gather, free.
#[test]
fn a_step_through_the_exports() {
    let b = backend();
    let kv = create(&params(HbmType::Q8_0));
    let elems = 64;
    let row = HbmType::Q8_0.row_bytes(elems).unwrap();
    // SAFETY: `kv` is live; every pointer passed is valid for the sizes the calls read/write
    // (device memory is host memory on the simulated device).
    unsafe {
        // Step 1: seq 0 prefills 20 tokens, seq 2 one token, in one append.
        assert_eq!(
            hbm_paged_kv_seq_add_tokens(kv, 0, 20, null_mut()),
            HbmStatus::Ok
        );
        assert_eq!(
            hbm_paged_kv_seq_add_tokens(kv, 2, 1, null_mut()),
            HbmStatus::Ok
        );
        let (seqs, n_new) = ([0u32, 2], [20u32, 1]);
        let mut slots = [0i64; 21];
        let mut n_slots = 0;
        let map = |slots: &mut [i64], seqs: &[u32], n_new: &[u32], n_slots: &mut usize| {
            hbm_paged_kv_slot_mapping(
                kv,
                1,
                seqs.as_ptr(),
                n_new.as_ptr(),
                seqs.len(),
                slots.as_mut_ptr(),
                slots.len(),
                n_slots,
            )
        };
        assert_eq!(
            map(&mut slots[..20], &seqs, &n_new, &mut n_slots),
            HbmStatus::InvalidValue,
            "capacity too small"
        );
        assert_eq!(n_slots, 21, "the count needed is reported");
        assert_eq!(map(&mut slots, &seqs, &n_new, &mut n_slots), HbmStatus::Ok);
        // Seq 0 holds blocks 0 and 1, seq 2 block 2.
        assert_eq!(slots[..3], [0, 1, 2]);
        assert_eq!((slots[19], slots[20]), (16 + 3, 2 * 16));
        let src: Vec<f32> = (0..22 * elems).map(|i| (i as f32 * 0.37).sin()).collect();
        let src_bytes: Vec<u8> = src.iter().flat_map(|x| x.to_ne_bytes()).collect();
        let k_dev = b.alloc(src_bytes.len()).unwrap();
        b.copy_from_host(k_dev, &src_bytes).unwrap();
        let slots_dev = b.alloc(21 * 8).unwrap();
        let upload = |slots: &[i64]| {
            let bytes: Vec<u8> = slots.iter().flat_map(|x| x.to_ne_bytes()).collect();
            b.copy_from_host(slots_dev, &bytes).unwrap();
        };
        upload(&slots);
        let k_src = k_dev as *const c_void;
        let append = |k: *const c_void, v: *const c_void, n: u32| {
            hbm_paged_kv_append(kv, 1, k, v, 0, slots_dev as *const i64, n, null_mut())
        };
        assert_eq!(
            append(k_src, k_src, 21),
            HbmStatus::InvalidValue,
            "layer 1 has no V"
        );
        assert_eq!(append(k_src, null(), 21), HbmStatus::Ok);
        // Step 2: seq 1 forks seq 0 and appends one token: its shared partial block is copied.
        assert_eq!(hbm_paged_kv_seq_fork(kv, 0, 1), HbmStatus::Ok);
        assert_eq!(
            hbm_paged_kv_seq_fork(kv, 0, 1),
            HbmStatus::InvalidValue,
            "dst live"
        );
        assert_eq!(stats(kv).blocks_shared, 2);
        upload(&slots[..1]);
        assert_eq!(
            append(k_src, null(), 1),
            HbmStatus::InvalidValue,
            "block 0 is shared now"
        );
        assert_eq!(
            hbm_paged_kv_seq_add_tokens(kv, 1, 1, null_mut()),
            HbmStatus::Ok
        );
        assert_eq!(stats(kv).cow_copies, 1);
        let mut slot = [0i64; 1];
        assert_eq!(map(&mut slot, &[1], &[1], &mut n_slots), HbmStatus::Ok);
        assert_eq!(slot[0], 3 * 16 + 4, "offset 4 of the copy, block 3");
        upload(&slot);
        let token_21 = (k_dev + 21 * elems * 4) as *const c_void;
        assert_eq!(append(token_21, null(), 1), HbmStatus::Ok);
        let (mut k, mut v, mut rk, mut rv) = (null_mut(), null_mut(), 0usize, 0usize);
        assert_eq!(
            hbm_paged_kv_layer(kv, 1, &mut k, &mut v, &mut rk, &mut rv),
            HbmStatus::Ok
        );
        assert!(v.is_null());
        assert_eq!((rk, rv), (row, 0));
        // Read seq 1's token 20 the way a paged kernel would: block table, then block and offset.
        let mut table = null();
        let mut mbps = 0u32;
        assert_eq!(
            hbm_paged_kv_block_table(kv, 1, &mut table, &mut mbps),
            HbmStatus::Ok
        );
        assert_eq!(mbps, 8);
        let mut id = [0u8; 4];
        b.copy_to_host(&mut id, table as usize + (mbps as usize + 1) * 4)
            .unwrap();
        let id = i32::from_ne_bytes(id) as usize;
        let row_at = |block: usize, off: usize| {
            let mut got = vec![0u8; row];
            b.copy_to_host(&mut got, k as usize + (block * 16 + off) * row)
                .unwrap();
            got
        };
        let want = |token: usize| {
            let mut q = vec![0u8; row];
            quantize_row(
                HbmType::Q8_0,
                &src[token * elems..(token + 1) * elems],
                &mut q,
            )
            .unwrap();
            q
        };
        assert_eq!(row_at(id, 4), want(21));
        assert_eq!(row_at(id, 3), want(19), "the copy kept seq 0's rows");
        assert_eq!(row_at(1, 3), want(19));
        // Gather seq 1's 21 tokens as F16.
        let out = b.alloc(21 * elems * 2).unwrap();
        assert_eq!(
            hbm_paged_kv_gather(
                kv,
                1,
                1,
                0,
                21,
                out as *mut c_void,
                null_mut(),
                1,
                null_mut()
            ),
            HbmStatus::Ok
        );
        assert_eq!(
            hbm_paged_kv_gather(
                kv,
                1,
                1,
                0,
                22,
                out as *mut c_void,
                null_mut(),
                1,
                null_mut()
            ),
            HbmStatus::InvalidValue,
            "past the end"
        );
        assert_eq!(
            hbm_paged_kv_seq_truncate(kv, 1, 22),
            HbmStatus::InvalidValue
        );
        assert_eq!(hbm_paged_kv_seq_truncate(kv, 1, 16), HbmStatus::Ok);
        let mut n = 0;
        assert_eq!(hbm_paged_kv_seq_len(kv, 1, &mut n), HbmStatus::Ok);
        assert_eq!(n, 16);
        assert_eq!(hbm_paged_kv_seq_free(kv, 0), HbmStatus::Ok);
        assert_eq!(hbm_paged_kv_seq_free(kv, 1), HbmStatus::Ok);
        assert_eq!(hbm_paged_kv_seq_free(kv, 2), HbmStatus::Ok);
        let s = stats(kv);
        assert_eq!((s.blocks_used, s.n_seq, s.blocks_total), (0, 0, 32));
        let mut released = 0;
        assert_eq!(hbm_paged_kv_trim(kv, &mut released), HbmStatus::Ok);
        assert_eq!(released, s.bytes_committed);
        for p in [
            (k_dev, src_bytes.len()),
            (slots_dev, 21 * 8),
            (out, 21 * elems * 2),
        ] {
            b.free(p.0, p.1).unwrap();
        }
        hbm_paged_kv_destroy(kv);
    }
}
