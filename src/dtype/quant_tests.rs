//! Tests of `quant`: hand-computed blocks, error bounds on random data, and a digest of ggml's
//! reference output.

use super::*;

fn block_q8(d: u16, qs: [i8; 32]) -> Vec<u8> {
    let mut b = d.to_ne_bytes().to_vec();
    b.extend(qs.iter().map(|q| *q as u8));
    b
}

fn block_q4(d: u16, qs: [u8; 16]) -> Vec<u8> {
    let mut b = d.to_ne_bytes().to_vec();
    b.extend(qs);
    b
}

fn q8(x: &[f32]) -> Vec<u8> {
    let mut y = vec![0xaa; x.len() / QK * 34];
    quantize_row_q8_0(x, &mut y);
    y
}

fn q4(x: &[f32]) -> Vec<u8> {
    let mut y = vec![0xaa; x.len() / QK * 18];
    quantize_row_q4_0(x, &mut y);
    y
}

/// SplitMix64, also used (in C) to produce the reference digest below.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Block `b` of the test data: uniform in (-scale, scale), the scale cycling over six decades.
fn random_blocks(seed: u64, n_blocks: usize) -> Vec<f32> {
    const SCALES: [f32; 6] = [1e-3, 0.1, 1.0, 10.0, 1000.0, 60000.0];
    let mut s = seed;
    let mut x = Vec::with_capacity(n_blocks * QK);
    for b in 0..n_blocks {
        for _ in 0..QK {
            let u = (splitmix(&mut s) >> 40) as f32 * (1.0 / 16_777_216.0);
            x.push((u * 2.0 - 1.0) * SCALES[b % SCALES.len()]);
        }
    }
    x
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[test]
fn zeros() {
    assert_eq!(q8(&[0.0; 32]), block_q8(0, [0; 32]));
    // d = 0 / -8 is -0 (fp16 0x8000); id = 0, so every quant is (int8)(0 + 8.5) = 8.
    assert_eq!(q4(&[0.0; 32]), block_q4(0x8000, [0x88; 16]));
}

#[test]
fn all_equal_blocks() {
    // d = 1/127 rounds to fp16 0x2008 (0.0078735...); every element is the maximum.
    assert_eq!(q8(&[1.0; 32]), block_q8(0x2008, [127; 32]));
    assert_eq!(q8(&[-1.0; 32]), block_q8(0x2008, [-127; 32]));
    // max = 1 gives d = -1/8 (fp16 0xb000), id = -8: 1*-8 + 8.5 = 0.5, truncated to 0.
    assert_eq!(q4(&[1.0; 32]), block_q4(0xb000, [0x00; 16]));
    assert_eq!(q4(&[-1.0; 32]), block_q4(0x3000, [0x00; 16]));
}

#[test]
fn halves_round_as_ggml_does() {
    // amax 127: d = 1, id = 1, so quants are roundf(x): halves go away from zero.
    let mut x = [0.0f32; 32];
    x[..7].copy_from_slice(&[127.0, 0.5, 1.5, -0.5, -2.5, 2.5, -127.0]);
    let mut want = [0i8; 32];
    want[..7].copy_from_slice(&[127, 1, 2, -1, -3, 3, -127]);
    assert_eq!(q8(&x), block_q8(0x3c00, want));

    // Negative max -8: d = 1, id = 1, quant = trunc(x + 8.5), clipped to 15: halves go up.
    let mut x = [0.0f32; 32];
    x[..7].copy_from_slice(&[-8.0, 0.5, -0.5, 1.5, -1.5, 7.0, 7.5]);
    x[16] = 3.49;
    x[17] = -7.9;
    let lo = [0u8, 9, 8, 10, 7, 15, 15, 8, 8, 8, 8, 8, 8, 8, 8, 8];
    let hi = [11u8, 0, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8];
    let qs: [u8; 16] = std::array::from_fn(|j| lo[j] | hi[j] << 4);
    assert_eq!(q4(&x), block_q4(0x3c00, qs));
}

#[test]
fn extreme_values() {
    let mut x = [0.0f32; 32];
    x[0] = 65504.0;
    x[1] = -65504.0;
    // d = 65504/127 = 515.78 rounds to fp16 516.0 (0x6008).
    let mut want = [0i8; 32];
    want[0] = 127;
    want[1] = -127;
    assert_eq!(q8(&x), block_q8(0x6008, want));
    // The first of equal magnitudes is the max: d = 65504 / -8 = -8188 (fp16 0xefff).
    // 65504 maps to 0, -65504 to trunc(16.5) = 16, clipped to 15; zeros to 8.
    let mut qs = [0x88u8; 16];
    qs[0] = 0x80;
    qs[1] = 0x8f;
    assert_eq!(q4(&x), block_q4(0xefff, qs));
    // A scale beyond fp16's range is stored as infinity, as ggml stores it.
    assert_eq!(q8(&[1e7; 32]), block_q8(0x7c00, [127; 32]));
}

#[test]
fn alternating_signs_and_negative_max() {
    let pos_first: Vec<f32> = (0..32)
        .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let neg_first: Vec<f32> = pos_first.iter().map(|v| -v).collect();
    let q8_want: [i8; 32] = std::array::from_fn(|i| if i % 2 == 0 { 127 } else { -127 });
    assert_eq!(q8(&pos_first), block_q8(0x2008, q8_want));
    // max = +1: d = -1/8; +1 -> 0, -1 -> trunc(16.5) clipped to 15. Q4_0 is asymmetric:
    // -1 comes back as 7 * -1/8 = -0.875.
    let qs: [u8; 16] = std::array::from_fn(|j| if j % 2 == 0 { 0x00 } else { 0xff });
    assert_eq!(q4(&pos_first), block_q4(0xb000, qs));
    // max = -1 keeps its sign: d = +1/8, and the same nibbles.
    assert_eq!(q4(&neg_first), block_q4(0x3000, qs));
    let mut back = [0.0f32; 32];
    dequantize_row_q4_0(&q4(&pos_first), &mut back);
    assert_eq!(&back[..2], &[1.0, -0.875]);
}

#[test]
fn tiny_blocks_follow_x86_conversion() {
    // 1/d overflows to infinity: x*id is ±inf or NaN, which x86's conversion turns into 0.
    let mut x = [0.0f32; 32];
    x[3] = 1e-38;
    x[4] = -5e-39;
    assert_eq!(q8(&x), block_q8(0x0000, [0; 32]));
    // d = 1e-38 / -8 is a negative subnormal that rounds to fp16 -0.
    assert_eq!(q4(&x), block_q4(0x8000, [0x00; 16]));
}

#[test]
fn nan_input() {
    // MAX(amax, NaN) is NaN, but only until the next element replaces it: a NaN last in the block
    // gives a NaN scale, and every quant NaN, which converts to 0.
    let mut x = [1.0f32; 32];
    x[31] = f32::NAN;
    assert_eq!(q8(&x), block_q8(0x7e00, [0; 32]));
    // A NaN first is forgotten: the block quantizes as all ones, the NaN itself to 0.
    x[31] = 1.0;
    x[0] = f32::NAN;
    let mut want = [127i8; 32];
    want[0] = 0;
    assert_eq!(q8(&x), block_q8(0x2008, want));
}

/// Digest of ggml's reference output for `random_blocks(42, 4096)`, computed once by compiling
/// ggml's `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref` with gcc 12 (-O2 -ffp-contract=off,
/// x86-64) with both its portable fp16 conversion and F16C `_cvtss_sh`, which agreed.
#[test]
fn matches_ggml_reference_digest() {
    let x = random_blocks(42, 4096);
    assert_eq!(fnv1a(&q8(&x)), GGML_Q8_0_DIGEST, "q8_0 differs from ggml");
    assert_eq!(fnv1a(&q4(&x)), GGML_Q4_0_DIGEST, "q4_0 differs from ggml");
}
const GGML_Q8_0_DIGEST: u64 = 0x87cc_6806_e0c6_6c7e;
const GGML_Q4_0_DIGEST: u64 = 0x1a5c_4945_38d6_062d;

#[test]
fn q8_0_round_trip_error_is_bounded() {
    let x = random_blocks(1, 600);
    let mut back = vec![0.0f32; x.len()];
    dequantize_row(HbmType::Q8_0, &q8(&x), &mut back).unwrap();
    for (xb, yb) in x.chunks_exact(QK).zip(back.chunks_exact(QK)) {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let d16 = fp16_to_fp32(fp32_to_fp16(d));
        // Half a step, plus the scale's fp16 rounding times the largest quant, plus float slack.
        let bound = d / 2.0 + 127.0 * (d - d16).abs() + amax * 1e-6;
        for (a, b) in xb.iter().zip(yb) {
            assert!((a - b).abs() <= bound, "{a} -> {b}, bound {bound}");
        }
    }
}

#[test]
fn q4_0_round_trip_error_is_bounded() {
    let x = random_blocks(2, 600);
    let mut back = vec![0.0f32; x.len()];
    dequantize_row(HbmType::Q4_0, &q4(&x), &mut back).unwrap();
    for (xb, yb) in x.chunks_exact(QK).zip(back.chunks_exact(QK)) {
        let max = xb
            .iter()
            .fold(0.0f32, |m, v| if m.abs() < v.abs() { *v } else { m });
        let d = (max / -8.0).abs();
        let d16 = fp16_to_fp32(fp32_to_fp16(d));
        let slack = 8.0 * (d - d16).abs() + max.abs() * 1e-6;
        for (a, b) in xb.iter().zip(yb) {
            // Values opposite the max would need quant 16 and are clipped to 15: a full step off.
            let bound = if a.signum() == -max.signum() && a.abs() > 7.4 * d {
                d + slack
            } else {
                d / 2.0 + slack
            };
            assert!((a - b).abs() <= bound, "{a} -> {b}, bound {bound}");
        }
        // The max itself comes back within its scale's rounding.
        let i = xb.iter().position(|v| *v == max).unwrap();
        assert!((yb[i] - max).abs() <= slack, "max {max} -> {}", yb[i]);
    }
}

#[test]
fn float_types_convert_exactly_or_round_to_nearest() {
    let x = [
        1.0f32,
        -2.5,
        65504.0,
        1e-8,
        3.140625,
        f32::INFINITY,
        -0.0,
        0.1,
    ];
    for ty in [HbmType::F32, HbmType::F16, HbmType::BF16] {
        let mut bytes = vec![0u8; ty.row_bytes(x.len()).unwrap()];
        quantize_row(ty, &x, &mut bytes).unwrap();
        let mut back = [0.0f32; 8];
        dequantize_row(ty, &bytes, &mut back).unwrap();
        for (a, b) in x.iter().zip(back) {
            let want = match ty {
                HbmType::F32 => *a,
                HbmType::F16 => fp16_to_fp32(fp32_to_fp16(*a)),
                _ => bf16_to_fp32(fp32_to_bf16(*a)),
            };
            assert_eq!(b.to_bits(), want.to_bits(), "{ty:?} {a}");
        }
    }
    let mut bytes = [0u8; 4];
    quantize_row(HbmType::F16, &[1.0, -2.0], &mut bytes).unwrap();
    assert_eq!(bytes, [0x00, 0x3c, 0x00, 0xc0]);
}

#[test]
fn bad_lengths_are_refused_and_leave_dst_alone() {
    let x = [1.0f32; 48];
    let mut dst = vec![0x55u8; 64];
    assert!(
        quantize_row(HbmType::Q8_0, &x, &mut dst).is_err(),
        "48 % 32 != 0"
    );
    assert!(
        quantize_row(HbmType::Q4_0, &x[..32], &mut dst).is_err(),
        "dst too big"
    );
    assert!(quantize_row(HbmType::F16, &x, &mut dst[..10]).is_err());
    assert!(dst.iter().all(|b| *b == 0x55));
    let mut out = [7.0f32; 32];
    assert!(dequantize_row(HbmType::Q8_0, &dst[..33], &mut out).is_err());
    assert!(out.iter().all(|v| *v == 7.0));
    assert!(quantize_row(HbmType::Q8_0, &x[..32], &mut dst[..34]).is_ok());
}
