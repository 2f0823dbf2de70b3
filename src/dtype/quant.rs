//! The CPU reference of the KV cache's element formats: Q8_0 and Q4_0 quantization bit-exact with
//! ggml's `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref`, their dequantization, and row
//! conversion for every `HbmType`. `kernels/kv_quant.cu` follows the same steps.
//!
//! Bit-exactness rests on doing the same IEEE single-precision operations in the same order with
//! no fused multiply-add: `d = amax / 127` (Q8_0) or `d = max / -8` (Q4_0, `max` the element of
//! largest magnitude with its sign, the first one on ties), `id = d != 0 ? 1 / d : 0`, then
//! `x * id` per element. Q8_0 rounds that half away from zero (`roundf`); Q4_0 adds 8.5 and
//! truncates. Byte order is the machine's, as ggml's structs are laid out in memory.

use super::half::{bf16_to_fp32, fp16_to_fp32, fp32_to_bf16, fp32_to_fp16};
use super::HbmType;
use crate::error::{Error, Result};

/// Elements per Q8_0 / Q4_0 block (ggml's `QK8_0`, `QK4_0`).
pub const QK: usize = 32;

/// C's `(int8_t)f` as x86-64 compilers emit it: truncate to a 32-bit integer (`cvttss2si`, which
/// gives `INT_MIN` for NaN and out-of-range values), then keep the low byte. C leaves out-of-range
/// conversions undefined; this is what ggml's reference produces on x86-64. It only matters when
/// `1 / d` overflows to infinity (a block whose largest magnitude is below about 1e-37), where every
/// quant comes out 0 instead of saturating.
fn c_float_to_i8(v: f32) -> i8 {
    let wide = if (-2_147_483_648.0..2_147_483_648.0).contains(&v) {
        v as i32
    } else {
        i32::MIN
    };
    wide as i8
}

/// The reciprocal of the scale as ggml computes it: 0 for a zero scale (C's `d ? 1.0f/d : 0.0f`,
/// where a NaN scale counts as true).
fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// Quantizes `src` (a multiple of 32 elements) into Q8_0 blocks in `dst` (34 bytes per block).
///
/// # Panics
/// If the lengths disagree; [`quantize_row`] checks them and returns an error instead.
pub fn quantize_row_q8_0(src: &[f32], dst: &mut [u8]) {
    assert!(src.len() % QK == 0 && dst.len() == src.len() / QK * 34);
    for (x, y) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(34)) {
        // C's MAX(a, b) is `a > b ? a : b`: a NaN element is dropped by the next comparison, and
        // the order of the operands matters for that; keep it.
        let amax = x
            .iter()
            .fold(0.0f32, |m, v| if m > v.abs() { m } else { v.abs() });
        let d = amax / 127.0;
        let id = inverse(d);
        y[..2].copy_from_slice(&fp32_to_fp16(d).to_ne_bytes());
        for (q, v) in y[2..].iter_mut().zip(x) {
            // f32::round is roundf: half away from zero.
            *q = c_float_to_i8((v * id).round()) as u8;
        }
    }
}

/// Quantizes `src` (a multiple of 32 elements) into Q4_0 blocks in `dst` (18 bytes per block).
///
/// # Panics
/// If the lengths disagree; [`quantize_row`] checks them and returns an error instead.
pub fn quantize_row_q4_0(src: &[f32], dst: &mut [u8]) {
    assert!(src.len() % QK == 0 && dst.len() == src.len() / QK * 18);
    for (x, y) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(18)) {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in x {
            // Strictly greater: the first element of the largest magnitude wins, sign and all.
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = inverse(d);
        y[..2].copy_from_slice(&fp32_to_fp16(d).to_ne_bytes());
        for j in 0..QK / 2 {
            // MIN(15, (int8_t)(x*id + 8.5f)), compared as int, then stored as uint8_t: a negative
            // value would keep its high bits, as in C (unreachable for finite scales).
            let lo = c_float_to_i8(x[j] * id + 8.5).min(15) as u8;
            let hi = c_float_to_i8(x[j + QK / 2] * id + 8.5).min(15) as u8;
            y[2 + j] = lo | (hi << 4);
        }
    }
}

/// Dequantizes Q8_0 blocks: element = q * d.
///
/// # Panics
/// If the lengths disagree; [`dequantize_row`] checks them and returns an error instead.
pub fn dequantize_row_q8_0(src: &[u8], dst: &mut [f32]) {
    assert!(dst.len() % QK == 0 && src.len() == dst.len() / QK * 34);
    for (x, y) in src.chunks_exact(34).zip(dst.chunks_exact_mut(QK)) {
        let d = fp16_to_fp32(u16::from_ne_bytes([x[0], x[1]]));
        for (out, &q) in y.iter_mut().zip(&x[2..]) {
            *out = q as i8 as f32 * d;
        }
    }
}

/// Dequantizes Q4_0 blocks: element j = (low nibble of byte j - 8) * d, element j+16 the same
/// with the high nibble.
///
/// # Panics
/// If the lengths disagree; [`dequantize_row`] checks them and returns an error instead.
pub fn dequantize_row_q4_0(src: &[u8], dst: &mut [f32]) {
    assert!(dst.len() % QK == 0 && src.len() == dst.len() / QK * 18);
    for (x, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(QK)) {
        let d = fp16_to_fp32(u16::from_ne_bytes([x[0], x[1]]));
        for j in 0..QK / 2 {
            y[j] = ((x[2 + j] & 0x0f) as i32 - 8) as f32 * d;
            y[j + QK / 2] = ((x[2 + j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

fn check_row(ty: HbmType, n: usize, bytes: usize) -> Result<()> {
    match ty.row_bytes(n) {
        None => Err(Error::InvalidValue(
            "row length is not a multiple of the type's block size",
        )),
        Some(b) if b != bytes => Err(Error::InvalidValue(
            "buffer size does not match the row length",
        )),
        Some(_) => Ok(()),
    }
}

/// Converts a row of fp32 values into `ty`'s encoding: F32 copies, F16/BF16 round to nearest
/// even, Q8_0/Q4_0 quantize as ggml's reference does.
///
/// `dst` must hold exactly `ty.row_bytes(src.len())` bytes; otherwise, or when `src.len()` is not a
/// multiple of the block size, this is `InvalidValue` and `dst` is untouched.
pub fn quantize_row(ty: HbmType, src: &[f32], dst: &mut [u8]) -> Result<()> {
    check_row(ty, src.len(), dst.len())?;
    match ty {
        HbmType::F32 => {
            for (out, v) in dst.chunks_exact_mut(4).zip(src) {
                out.copy_from_slice(&v.to_ne_bytes());
            }
        }
        HbmType::F16 => {
            for (out, v) in dst.chunks_exact_mut(2).zip(src) {
                out.copy_from_slice(&fp32_to_fp16(*v).to_ne_bytes());
            }
        }
        HbmType::BF16 => {
            for (out, v) in dst.chunks_exact_mut(2).zip(src) {
                out.copy_from_slice(&fp32_to_bf16(*v).to_ne_bytes());
            }
        }
        HbmType::Q8_0 => quantize_row_q8_0(src, dst),
        HbmType::Q4_0 => quantize_row_q4_0(src, dst),
    }
    Ok(())
}

/// Converts a row in `ty`'s encoding back to fp32 (exact for F32/F16/BF16).
///
/// `src` must hold exactly `ty.row_bytes(dst.len())` bytes; otherwise, or when `dst.len()` is not a
/// multiple of the block size, this is `InvalidValue` and `dst` is untouched.
pub fn dequantize_row(ty: HbmType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    check_row(ty, dst.len(), src.len())?;
    match ty {
        HbmType::F32 => {
            for (out, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *out = f32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        HbmType::F16 => {
            for (out, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *out = fp16_to_fp32(u16::from_ne_bytes([b[0], b[1]]));
            }
        }
        HbmType::BF16 => {
            for (out, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *out = bf16_to_fp32(u16::from_ne_bytes([b[0], b[1]]));
            }
        }
        HbmType::Q8_0 => dequantize_row_q8_0(src, dst),
        HbmType::Q4_0 => dequantize_row_q4_0(src, dst),
    }
    Ok(())
}

#[cfg(test)]
#[path = "quant_tests.rs"]
mod tests;
