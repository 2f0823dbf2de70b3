//! The batched calls through the C exports on the process's backend (the simulated device under
//! `cargo test`): NULLs refused, a step appended and gathered back, attention answered.

use super::super::paged_kv_api::{
    hbm_paged_kv_create, hbm_paged_kv_destroy, hbm_paged_kv_seq_add_tokens, HbmPagedKvLayer,
    HbmPagedKvParams,
};
use super::*;
use crate::kv::quant::{dequantize_row, quantize_row};
use std::ptr::{null, null_mut};

/// Two layers of 2 KV heads of 32 (64-element rows), Q8_0 K, F16 V, 16-token blocks.
fn create() -> *mut HbmPagedKv {
    let layers = [HbmPagedKvLayer {
        n_kv_heads: 2,
        head_dim_k: 32,
        head_dim_v: 32,
        window: 0,
    }; 2];
    let p = HbmPagedKvParams {
        layers: layers.as_ptr(),
        n_layer: 2,
        type_k: HbmType::Q8_0 as i32,
        type_v: HbmType::F16 as i32,
        block_tokens: 0,
        num_blocks: 16,
        max_seqs: 4,
        max_seq_tokens: 64,
        device: 0,
    };
    let mut kv = null_mut();
    // SAFETY: valid params and out-pointer.
    assert_eq!(unsafe { hbm_paged_kv_create(&p, &mut kv) }, HbmStatus::Ok);
    kv
}

fn floats(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
        .collect()
}

#[test]
fn null_arguments_are_refused() {
    let kv = create();
    let k = [null::<c_void>(); 2];
    let seqs = [0u32];
    let mut q = [0f32; 64];
    // SAFETY: every pointer is NULL or valid for what the call reads.
    unsafe {
        for (s, n, ks) in [
            (seqs.as_ptr(), seqs.as_ptr(), null()),
            (null(), seqs.as_ptr(), k.as_ptr()),
            (seqs.as_ptr(), null(), k.as_ptr()),
        ] {
            let rc = hbm_paged_kv_append_step(kv, s, n, 1, ks, null(), 0, null_mut());
            assert_eq!(rc, HbmStatus::NullParameter);
        }
        let rc =
            hbm_paged_kv_append_step(null(), null(), null(), 0, k.as_ptr(), null(), 0, null_mut());
        assert_eq!(rc, HbmStatus::NullParameter);
        let rc = hbm_paged_kv_append_step(kv, null(), null(), 0, k.as_ptr(), null(), 7, null_mut());
        assert_eq!(rc, HbmStatus::InvalidValue, "not a type");
        let rc = hbm_paged_kv_gather_layers(kv, 0, 0, 1, null(), null(), 0, null_mut());
        assert_eq!(rc, HbmStatus::NullParameter);
        let qp = q.as_mut_ptr();
        let rc = hbm_paged_kv_decode_attention(kv, 0, null(), 1, 2, qp, qp, 1.0, null_mut());
        assert_eq!(rc, HbmStatus::NullParameter);
        let rc =
            hbm_paged_kv_decode_attention(kv, 0, seqs.as_ptr(), 1, 2, null(), qp, 1.0, null_mut());
        assert_eq!(rc, HbmStatus::NullParameter);
        let rc = hbm_paged_kv_decode_attention(kv, 0, seqs.as_ptr(), 1, 2, qp, qp, 1.0, null_mut());
        assert_eq!(
            rc,
            HbmStatus::InvalidValue,
            "a Q8_0 cache, and seq 0 not live"
        );
        hbm_paged_kv_destroy(kv);
    }
}

#[test]
fn a_step_through_the_exports_reads_back_exactly() {
    let kv = create();
    let seqs = [0u32, 2];
    let n_new = [3u32, 18];
    let elems = 64;
    let n = 21;
    let k: Vec<Vec<f32>> = (0..2).map(|l| floats(n * elems, 10 + l)).collect();
    let v: Vec<Vec<f32>> = (0..2).map(|l| floats(n * elems, 20 + l)).collect();
    let ks = [k[0].as_ptr().cast::<c_void>(), k[1].as_ptr().cast()];
    let vs = [v[0].as_ptr().cast::<c_void>(), null()]; // layer 1's V not written
    let mut out_k = vec![0f32; 18 * elems * 2];
    let mut out_v = vec![0f32; 18 * elems];
    // SAFETY: live handle; host memory is the simulated device's memory; arrays of 2 layers.
    unsafe {
        for (&s, &m) in seqs.iter().zip(&n_new) {
            assert_eq!(
                hbm_paged_kv_seq_add_tokens(kv, s, m, null_mut()),
                HbmStatus::Ok
            );
        }
        let rc = hbm_paged_kv_append_step(
            kv,
            seqs.as_ptr(),
            n_new.as_ptr(),
            2,
            ks.as_ptr(),
            vs.as_ptr(),
            HbmType::F32 as i32,
            null_mut(),
        );
        assert_eq!(rc, HbmStatus::Ok);
        let kd = [
            out_k.as_mut_ptr().cast::<c_void>(),
            out_k[18 * elems..].as_mut_ptr().cast(),
        ];
        let vd = [out_v.as_mut_ptr().cast::<c_void>(), null_mut()];
        let rc = hbm_paged_kv_gather_layers(
            kv,
            2,
            0,
            18,
            kd.as_ptr(),
            vd.as_ptr(),
            HbmType::F32 as i32,
            null_mut(),
        );
        assert_eq!(rc, HbmStatus::Ok);
        hbm_paged_kv_destroy(kv);
    }
    // Seq 2's rows are tokens 3.. of the step's sources, through Q8_0 (K) and F16 (V).
    let through = |ty: HbmType, x: &[f32]| {
        let mut q = vec![0u8; ty.row_bytes(elems).unwrap()];
        quantize_row(ty, x, &mut q).unwrap();
        let mut back = vec![0f32; elems];
        dequantize_row(ty, &q, &mut back).unwrap();
        back
    };
    for t in 0..18 {
        let row = |x: &[f32]| x[(3 + t) * elems..(4 + t) * elems].to_vec();
        for l in 0..2 {
            let got = &out_k[(l * 18 + t) * elems..][..elems];
            assert_eq!(got, &through(HbmType::Q8_0, &row(&k[l]))[..], "K {l} {t}");
        }
        let got = &out_v[t * elems..][..elems];
        assert_eq!(got, &through(HbmType::F16, &row(&v[0]))[..], "V {t}");
    }
}
