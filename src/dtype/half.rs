//! fp16 and bf16 conversions, rounding exactly as ggml does.
//!
//! fp32 → fp16 rounds to nearest, ties to even, with gradual underflow and overflow to infinity:
//! the result of ggml's `GGML_FP32_TO_FP16` (its portable `ggml_compute_fp32_to_fp16`, and the same
//! bits as x86 F16C `_cvtss_sh(x, 0)` for every finite input and infinity). A NaN becomes the quiet
//! NaN `0x7E00` with the input's sign, as the portable path gives; F16C would keep the top payload
//! bits, which no quantization output depends on (a NaN scale only comes from NaN input).
//!
//! fp32 → bf16 is ggml's `ggml_compute_fp32_to_bf16`: round to nearest even on the top 16 bits,
//! subnormals kept, a NaN made quiet by setting bit 6.
//!
//! The widening conversions are exact. All of it is integer code so that `kernels/kv_quant.cu` can
//! do the same steps and produce the same bytes.

/// Rounds `f` to the nearest fp16 (ties to even); see the module notes for NaN.
pub fn fp32_to_fp16(f: f32) -> u16 {
    let x = f.to_bits();
    let sign = ((x >> 16) & 0x8000) as u16;
    let abs = x & 0x7fff_ffff;
    if abs > 0x7f80_0000 {
        return sign | 0x7e00;
    }
    // 2^16 and above (infinity included) overflow; 65520..65536 overflow through rounding below.
    if abs >= 0x4780_0000 {
        return sign | 0x7c00;
    }
    let exp = (abs >> 23) as i32; // biased by 127
    let half_exp = exp - 127 + 15;
    if half_exp <= 0 {
        // Subnormal result (or zero): value = mant * 2^(exp-150), counted in units of 2^-24.
        if half_exp < -10 {
            // Below 2^-25, half the smallest subnormal: rounds to zero.
            return sign;
        }
        let mant = (abs & 0x7f_ffff) | 0x80_0000;
        let shift = (14 - half_exp) as u32; // 14..=24
        return sign | round_shift_even(mant, shift) as u16;
    }
    // Normal: keep 10 of the 23 mantissa bits. A carry out of the mantissa bumps the exponent,
    // which is the right answer, up to and including infinity (0x7c00).
    let q = ((half_exp as u32) << 10) | ((abs & 0x7f_ffff) >> 13);
    let rem = abs & 0x1fff;
    let q = if rem > 0x1000 || (rem == 0x1000 && q & 1 == 1) {
        q + 1
    } else {
        q
    };
    sign | q as u16
}

/// `v >> shift` rounded to nearest, ties to even (`shift` in 1..=31).
fn round_shift_even(v: u32, shift: u32) -> u32 {
    let q = v >> shift;
    let rem = v & ((1 << shift) - 1);
    let half = 1 << (shift - 1);
    if rem > half || (rem == half && q & 1 == 1) {
        q + 1
    } else {
        q
    }
}

/// The fp32 value of fp16 bits `h`, exactly; a NaN stays a (quiet) NaN with its payload.
pub fn fp16_to_fp32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = match (exp, mant) {
        (0, 0) => sign,
        // Subnormal: mant * 2^-24, exact in fp32.
        (0, m) => sign | (m as f32 * f32::from_bits(0x3380_0000)).to_bits(),
        (31, 0) => sign | 0x7f80_0000,
        (31, m) => sign | 0x7fc0_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Rounds `f` to bfloat16 as ggml does: nearest even; NaN made quiet.
pub fn fp32_to_bf16(f: f32) -> u16 {
    let x = f.to_bits();
    if x & 0x7fff_ffff > 0x7f80_0000 {
        return ((x >> 16) | 64) as u16;
    }
    // Cannot overflow u32: the largest finite input plus 0x8000 is below 0x7f80_0000 + 2^16.
    ((x + 0x7fff + ((x >> 16) & 1)) >> 16) as u16
}

/// The fp32 value of bf16 bits `h` (exact: bf16 is the top half of an fp32).
pub fn bf16_to_fp32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An independent fp16 rounding: the nearest of all finite halves, ties to the even encoding,
    /// overflow from 65520 (halfway between 65504 and 2^16) up.
    fn oracle_fp16(f: f32) -> u16 {
        if f.is_nan() {
            return 0x7e00 | if f.is_sign_negative() { 0x8000 } else { 0 };
        }
        let sign = if f.is_sign_negative() { 0x8000u16 } else { 0 };
        let a = (f as f64).abs();
        if a >= 65520.0 {
            return sign | 0x7c00;
        }
        // Positive finite halves are ordered as their encodings.
        let (mut lo, mut hi) = (0u16, 0x7bffu16);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if (fp16_to_fp32(mid) as f64) <= a {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let below = lo;
        if below == 0x7bff {
            return sign | below;
        }
        let (dl, du) = (
            a - fp16_to_fp32(below) as f64,
            fp16_to_fp32(below + 1) as f64 - a,
        );
        let pick = if dl < du || (dl == du && below & 1 == 0) {
            below
        } else {
            below + 1
        };
        sign | pick
    }

    fn splitmix(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[test]
    fn fp16_edge_cases() {
        let cases: [(f32, u16); 18] = [
            (0.0, 0x0000),
            (-0.0, 0x8000),
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (65504.0, 0x7bff),
            (-65504.0, 0xfbff),
            (65519.99, 0x7bff), // just under the halfway point to 2^16
            (65520.0, 0x7c00),  // halfway, ties to "even" = infinity
            (1e10, 0x7c00),     // overflow
            (f32::INFINITY, 0x7c00),
            (f32::NEG_INFINITY, 0xfc00),
            (6.103_515_6e-5, 0x0400), // smallest normal 2^-14
            (5.960_464_5e-8, 0x0001), // smallest subnormal 2^-24
            (2.980_232_2e-8, 0x0000), // 2^-25: tie between 0 and 2^-24, to even = 0
            (2.980_232_6e-8, 0x0001), // just above 2^-25
            (8.940_697e-8, 0x0002),   // 1.5 * 2^-24: tie between 1 and 2 units, to even = 2
            (1.000_488_3, 0x3c00),    // 1 + 2^-11: tie between 1.0 and 1+2^-10, to even
            (1.001_464_8, 0x3c02),    // 1 + 3*2^-11: tie, to even (0x3c02)
        ];
        for (f, want) in cases {
            assert_eq!(fp32_to_fp16(f), want, "fp32_to_fp16({f:e})");
            assert_eq!(oracle_fp16(f), want, "oracle({f:e})");
        }
        assert_eq!(fp32_to_fp16(f32::NAN), 0x7e00);
        assert_eq!(fp32_to_fp16(-f32::NAN), 0xfe00);
        assert_eq!(fp32_to_fp16(f32::from_bits(0x7f80_0001)), 0x7e00, "sNaN");
        // fp32 subnormals are far below fp16's range.
        assert_eq!(fp32_to_fp16(f32::from_bits(0x0000_0001)), 0x0000);
        assert_eq!(fp32_to_fp16(f32::from_bits(0x8000_0001)), 0x8000);
    }

    #[test]
    fn fp16_widening_is_exact_and_round_trips() {
        assert_eq!(fp16_to_fp32(0x0001), 2f32.powi(-24));
        assert_eq!(fp16_to_fp32(0x03ff), 1023.0 * 2f32.powi(-24));
        assert_eq!(fp16_to_fp32(0x7bff), 65504.0);
        assert_eq!(fp16_to_fp32(0x7c00), f32::INFINITY);
        assert_eq!(fp16_to_fp32(0xfc00), f32::NEG_INFINITY);
        assert_eq!(fp16_to_fp32(0x8000).to_bits(), 0x8000_0000);
        assert_eq!(fp16_to_fp32(0x7e00).to_bits(), 0x7fc0_0000);
        assert!(fp16_to_fp32(0x7c01).is_nan(), "sNaN stays NaN");
        for h in 0..=u16::MAX {
            let f = fp16_to_fp32(h);
            if f.is_nan() {
                assert_eq!(h & 0x7c00, 0x7c00);
                continue;
            }
            assert_eq!(fp32_to_fp16(f), h, "round trip of {h:#06x}");
        }
    }

    #[test]
    fn fp16_matches_oracle_on_random_and_boundary_inputs() {
        let mut s = 7u64;
        for _ in 0..200_000 {
            let f = f32::from_bits(splitmix(&mut s) as u32);
            assert_eq!(
                fp32_to_fp16(f),
                oracle_fp16(f),
                "{f:e} ({:#010x})",
                f.to_bits()
            );
        }
        // Every half's neighbourhood and the midpoints between halves, where rounding decides.
        for h in 0..0x7bffu16 {
            let mid = (fp16_to_fp32(h) as f64 + fp16_to_fp32(h + 1) as f64) / 2.0;
            let mid = mid as f32; // exact: a midpoint needs only 12 significant bits
            for f in [
                mid,
                f32::from_bits(mid.to_bits() - 1),
                f32::from_bits(mid.to_bits() + 1),
            ] {
                assert_eq!(fp32_to_fp16(f), oracle_fp16(f), "{f:e}");
                assert_eq!(fp32_to_fp16(-f), oracle_fp16(-f), "{:e}", -f);
            }
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even_and_quiets_nan() {
        assert_eq!(fp32_to_bf16(1.0), 0x3f80);
        assert_eq!(fp32_to_bf16(-2.0), 0xc000);
        // 1 + 2^-8 is halfway between 1.0 (0x3f80) and 1+2^-7 (0x3f81): to even.
        assert_eq!(fp32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80);
        assert_eq!(fp32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82);
        assert_eq!(fp32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(fp32_to_bf16(f32::from_bits(0x3f80_7fff)), 0x3f80);
        // Overflow by rounding: the largest fp32 rounds up to infinity.
        assert_eq!(fp32_to_bf16(f32::MAX), 0x7f80);
        assert_eq!(fp32_to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(fp32_to_bf16(f32::NEG_INFINITY), 0xff80);
        // Subnormals are rounded, not flushed.
        assert_eq!(fp32_to_bf16(f32::from_bits(0x0001_8000)), 0x0002);
        assert_eq!(fp32_to_bf16(f32::from_bits(0x8000_8000)), 0x8000);
        // NaN: quiet bit forced, sign and top payload kept.
        assert_eq!(fp32_to_bf16(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert_eq!(fp32_to_bf16(f32::from_bits(0xff81_0000)), 0xffc1);
        assert_eq!(fp32_to_bf16(f32::NAN), 0x7fc0);
        assert_eq!(bf16_to_fp32(0x3f80), 1.0);
        assert_eq!(bf16_to_fp32(0xc049), f32::from_bits(0xc049_0000));
        for h in 0..=u16::MAX {
            let f = bf16_to_fp32(h);
            let back = fp32_to_bf16(f);
            if f.is_nan() {
                assert_eq!(back, h | 64);
            } else {
                assert_eq!(back, h);
            }
        }
    }
}
