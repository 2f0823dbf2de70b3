//! The KV cache's `hbm_*` entry points: sizes and the CPU reference of the element formats.

use super::guard::ffi_guard;
use super::status::HbmStatus;
use crate::kv::layout::kv_cache_bytes;
use crate::kv::quant::{dequantize_row, quantize_row};
use crate::kv::HbmType;
use std::ffi::c_void;

/// Bytes that a KV cache of this shape needs:
/// `n_layer * n_ctx * n_seq * (row_bytes(type_k) + row_bytes(type_v))`, a row being
/// `n_head_kv * head_dim` elements (ggml's `ggml_row_size`).
///
/// `type_k` and `type_v` are `HBM_TYPE_*` values (ggml's numbering). LLaMA-7B (32 layers, 32 KV
/// heads, head dim 128) at 2048 tokens, one sequence, F16: 1,073,741,824.
///
/// Returns 0 for an unknown type, a row that is not a whole number of blocks (Q8_0 and Q4_0 need
/// `n_head_kv * head_dim` divisible by 32), or a size that does not fit in `size_t`; a shape with a
/// zero dimension also gives 0. Allocates nothing.
#[no_mangle]
pub extern "C" fn hbm_kv_cache_bytes(
    n_layer: u32,
    n_head_kv: u32,
    head_dim: u32,
    n_ctx: u32,
    n_seq: u32,
    type_k: i32,
    type_v: i32,
) -> usize {
    ffi_guard!(0, {
        let (Some(tk), Some(tv)) = (HbmType::from_i32(type_k), HbmType::from_i32(type_v)) else {
            return 0;
        };
        kv_cache_bytes(n_layer, n_head_kv, head_dim, n_ctx, n_seq, tk, tv)
            .and_then(|b| usize::try_from(b).ok())
            .unwrap_or(0)
    })
}

/// Checks what `from_raw_parts` needs of a `T` buffer of `n` elements besides its validity, which
/// the caller promises: not NULL (checked before), aligned, and at most `isize::MAX` bytes.
fn buffer_ok<T>(ptr: *const T, n: usize) -> bool {
    ptr as usize % std::mem::align_of::<T>() == 0
        && n.checked_mul(std::mem::size_of::<T>())
            .is_some_and(|b| b <= isize::MAX as usize)
}

/// Encodes `n` floats as a row of `type` (`HBM_TYPE_*`): F32 copies, F16 and BF16 round to nearest
/// even, Q8_0 and Q4_0 quantize bit for bit as ggml's `quantize_row_q8_0_ref` /
/// `quantize_row_q4_0_ref` do (blocks of 32: fp16 scale, then the quants).
///
/// - `src`: `n` floats, 4-byte aligned; read only.
/// - `dst`: room for the row's bytes, which `hbm_kv_cache_bytes(1, 1, n, 1, 1, type, type) / 2`
///   gives (`n * 4`, `n * 2`, `n / 32 * 34`, `n / 32 * 18`); any alignment. Owned by the caller.
/// - `n`: elements; a multiple of 32 for Q8_0 and Q4_0.
///
/// Returns `HBM_STATUS_OK`; `HBM_STATUS_NULL_PARAMETER` if `src` or `dst` is NULL;
/// `HBM_STATUS_INVALID_VALUE` for an unknown type, `n` not a multiple of the block size, or a
/// misaligned `src`. On an error `dst` is untouched. Runs on the CPU; allocates nothing.
///
/// # Safety
/// `src` must be valid for reading `n` floats and `dst` for writing the row's bytes, and the two
/// must not overlap.
#[no_mangle]
pub unsafe extern "C" fn hbm_quantize_row(
    r#type: i32,
    src: *const f32,
    dst: *mut c_void,
    n: usize,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if src.is_null() || dst.is_null() {
            return HbmStatus::NullParameter;
        }
        let Some(ty) = HbmType::from_i32(r#type) else {
            return HbmStatus::InvalidValue;
        };
        let Some(bytes) = ty.row_bytes(n) else {
            return HbmStatus::InvalidValue;
        };
        if !buffer_ok(src, n) || !buffer_ok(dst as *const u8, bytes) {
            return HbmStatus::InvalidValue;
        }
        // SAFETY: the caller promises `src` holds `n` floats and `dst` the row's bytes, without
        // overlap; they are non-NULL, aligned and within isize::MAX bytes (checked above).
        let (src, dst) = unsafe {
            (
                std::slice::from_raw_parts(src, n),
                std::slice::from_raw_parts_mut(dst as *mut u8, bytes),
            )
        };
        HbmStatus::from(quantize_row(ty, src, dst))
    })
}

/// Decodes a row of `n` elements of `type` (`HBM_TYPE_*`) into floats: exact for F32, F16 and
/// BF16; `q * d` per element for Q8_0, `(q - 8) * d` for Q4_0, as ggml's `dequantize_row_*` do.
///
/// - `src`: the row's bytes (see `hbm_quantize_row`), any alignment; read only.
/// - `dst`: room for `n` floats, 4-byte aligned. Owned by the caller.
/// - `n`: elements; a multiple of 32 for Q8_0 and Q4_0.
///
/// Returns `HBM_STATUS_OK`; `HBM_STATUS_NULL_PARAMETER` if `src` or `dst` is NULL;
/// `HBM_STATUS_INVALID_VALUE` for an unknown type, `n` not a multiple of the block size, or a
/// misaligned `dst`. On an error `dst` is untouched. Runs on the CPU; allocates nothing.
///
/// # Safety
/// `src` must be valid for reading the row's bytes and `dst` for writing `n` floats, and the two
/// must not overlap.
#[no_mangle]
pub unsafe extern "C" fn hbm_dequantize_row(
    r#type: i32,
    src: *const c_void,
    dst: *mut f32,
    n: usize,
) -> HbmStatus {
    ffi_guard!(HbmStatus::Panic, {
        if src.is_null() || dst.is_null() {
            return HbmStatus::NullParameter;
        }
        let Some(ty) = HbmType::from_i32(r#type) else {
            return HbmStatus::InvalidValue;
        };
        let Some(bytes) = ty.row_bytes(n) else {
            return HbmStatus::InvalidValue;
        };
        if !buffer_ok(dst as *const f32, n) || !buffer_ok(src as *const u8, bytes) {
            return HbmStatus::InvalidValue;
        }
        // SAFETY: the caller promises `src` holds the row's bytes and `dst` room for `n` floats,
        // without overlap; they are non-NULL, aligned and within isize::MAX bytes (checked above).
        let (src, dst) = unsafe {
            (
                std::slice::from_raw_parts(src as *const u8, bytes),
                std::slice::from_raw_parts_mut(dst, n),
            )
        };
        HbmStatus::from(dequantize_row(ty, src, dst))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr::{null, null_mut};

    #[test]
    fn cache_bytes_export() {
        assert_eq!(
            hbm_kv_cache_bytes(32, 32, 128, 2048, 1, 1, 1),
            1_073_741_824
        );
        assert_eq!(hbm_kv_cache_bytes(80, 8, 128, 2048, 1, 1, 1), 671_088_640);
        assert_eq!(
            hbm_kv_cache_bytes(32, 32, 128, 2048, 1, 8, 2),
            65536 * (4352 + 2304)
        );
        assert_eq!(
            hbm_kv_cache_bytes(32, 32, 128, 2048, 1, 3, 1),
            0,
            "type 3 unknown"
        );
        assert_eq!(hbm_kv_cache_bytes(32, 32, 128, 2048, 1, 1, -1), 0);
        assert_eq!(hbm_kv_cache_bytes(1, 1, 40, 16, 1, 8, 8), 0, "40 % 32");
        let m = u32::MAX;
        assert_eq!(hbm_kv_cache_bytes(m, m, m, m, m, 0, 0), 0, "overflow");
    }

    #[test]
    fn quantize_and_dequantize_every_type() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.25).collect();
        for ty in HbmType::ALL {
            let bytes = ty.row_bytes(64).unwrap();
            let mut row = vec![0u8; bytes];
            // SAFETY: buffers of the documented sizes.
            let st =
                unsafe { hbm_quantize_row(ty as i32, x.as_ptr(), row.as_mut_ptr().cast(), 64) };
            assert_eq!(st, HbmStatus::Ok, "{ty:?}");
            let mut want = vec![0u8; bytes];
            quantize_row(ty, &x, &mut want).unwrap();
            assert_eq!(row, want, "{ty:?} export and Rust agree");
            let mut back = vec![0.0f32; 64];
            // SAFETY: as above.
            let st = unsafe {
                hbm_dequantize_row(ty as i32, row.as_ptr().cast(), back.as_mut_ptr(), 64)
            };
            assert_eq!(st, HbmStatus::Ok);
            let tol = match ty {
                HbmType::Q4_0 => 1.1, // a full step (d = 8/8 here) at the clipped end
                HbmType::Q8_0 => 0.05,
                _ => 0.0,
            };
            for (a, b) in x.iter().zip(&back) {
                assert!((a - b).abs() <= tol, "{ty:?}: {a} -> {b}");
            }
        }
    }

    #[test]
    fn bad_arguments_give_statuses() {
        let x = [1.0f32; 64];
        let mut row = [0x5au8; 136];
        let mut out = [3.0f32; 64];
        // SAFETY: every call either fails before touching memory or uses the buffers above.
        unsafe {
            assert_eq!(
                hbm_quantize_row(8, null(), row.as_mut_ptr().cast(), 64),
                HbmStatus::NullParameter
            );
            assert_eq!(
                hbm_quantize_row(8, x.as_ptr(), null_mut(), 64),
                HbmStatus::NullParameter
            );
            assert_eq!(
                hbm_dequantize_row(8, null(), out.as_mut_ptr(), 64),
                HbmStatus::NullParameter
            );
            assert_eq!(
                hbm_dequantize_row(8, row.as_ptr().cast(), null_mut(), 64),
                HbmStatus::NullParameter
            );
            assert_eq!(
                hbm_quantize_row(8, x.as_ptr(), row.as_mut_ptr().cast(), 48),
                HbmStatus::InvalidValue
            );
            assert_eq!(
                hbm_quantize_row(2, x.as_ptr(), row.as_mut_ptr().cast(), 33),
                HbmStatus::InvalidValue
            );
            assert_eq!(
                hbm_quantize_row(7, x.as_ptr(), row.as_mut_ptr().cast(), 32),
                HbmStatus::InvalidValue
            );
            let misaligned = (x.as_ptr() as *const u8).add(1) as *const f32;
            assert_eq!(
                hbm_quantize_row(0, misaligned, row.as_mut_ptr().cast(), 4),
                HbmStatus::InvalidValue
            );
            assert!(row.iter().all(|b| *b == 0x5a), "dst untouched on errors");
            assert_eq!(
                hbm_dequantize_row(2, row.as_ptr().cast(), out.as_mut_ptr(), 40),
                HbmStatus::InvalidValue
            );
            assert_eq!(
                hbm_dequantize_row(99, row.as_ptr().cast(), out.as_mut_ptr(), 32),
                HbmStatus::InvalidValue
            );
            assert!(out.iter().all(|v| *v == 3.0));
            // Zero elements is a valid, empty row.
            assert_eq!(
                hbm_quantize_row(8, x.as_ptr(), row.as_mut_ptr().cast(), 0),
                HbmStatus::Ok
            );
        }
    }
}
