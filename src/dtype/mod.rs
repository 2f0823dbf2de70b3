//! Element types of device buffers (the KV cache's, and the backend's kernels'), numbered as
//! ggml numbers them (`enum ggml_type`), so values pass straight between the two. At the bottom
//! of the crate: the backend's kernel interface and the KV cache both speak in these.
//!
//! - `half`: fp16 and bf16 conversions, rounding as ggml does.
//! - `quant`: Q8_0 / Q4_0 quantization bit-exact with ggml's reference, and row (de)quantization
//!   for every type (the simulated device's kernels, and the tests' reference).

pub mod half;
pub mod quant;

/// Element type of a KV cache tensor (`HBM_TYPE_*` in C). The numbers are ggml's `GGML_TYPE_*`.
///
/// Quantized types store blocks of 32 elements: `Q8_0` is an fp16 scale then 32 `int8` (34 bytes),
/// `Q4_0` an fp16 scale then 16 bytes of nibbles (18 bytes), both bit-compatible with ggml.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HbmType {
    /// 32-bit IEEE float.
    F32 = 0,
    /// 16-bit IEEE half.
    F16 = 1,
    /// 4-bit blocks of 32: fp16 scale `d`, element j in the low nibble of byte j, element j+16 in
    /// its high nibble; value = (nibble - 8) * d.
    Q4_0 = 2,
    /// 8-bit blocks of 32: fp16 scale `d`, then 32 `int8`; value = q * d.
    Q8_0 = 8,
    /// bfloat16 (the top half of an fp32).
    BF16 = 30,
}

impl HbmType {
    /// Every type, in ggml's numeric order.
    pub const ALL: [HbmType; 5] = [
        HbmType::F32,
        HbmType::F16,
        HbmType::Q4_0,
        HbmType::Q8_0,
        HbmType::BF16,
    ];

    /// The type with ggml number `v`, or `None` for a number this library does not store.
    pub fn from_i32(v: i32) -> Option<HbmType> {
        HbmType::ALL.into_iter().find(|t| *t as i32 == v)
    }

    /// ggml's name for the type ("f16", "q8_0", ...).
    pub fn name(self) -> &'static str {
        match self {
            HbmType::F32 => "f32",
            HbmType::F16 => "f16",
            HbmType::Q4_0 => "q4_0",
            HbmType::Q8_0 => "q8_0",
            HbmType::BF16 => "bf16",
        }
    }

    /// Elements per block: 32 for the quantized types, 1 otherwise.
    pub const fn block_size(self) -> usize {
        match self {
            HbmType::Q4_0 | HbmType::Q8_0 => 32,
            HbmType::F32 | HbmType::F16 | HbmType::BF16 => 1,
        }
    }

    /// Bytes per block (`ggml_type_size`).
    pub const fn block_bytes(self) -> usize {
        match self {
            HbmType::F32 => 4,
            HbmType::F16 | HbmType::BF16 => 2,
            HbmType::Q4_0 => 18,
            HbmType::Q8_0 => 34,
        }
    }

    /// Whether the type is stored in blocks with a scale (Q8_0, Q4_0).
    pub const fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes of a row of `n` elements (`ggml_row_size`), or `None` when `n` is not a multiple of
    /// the block size or the size overflows.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if n % self.block_size() != 0 {
            return None;
        }
        (n / self.block_size()).checked_mul(self.block_bytes())
    }
}

/// Bytes of a row of `n` elements of type `ty`; see [`HbmType::row_bytes`].
pub fn row_bytes(ty: HbmType, n: usize) -> Option<usize> {
    ty.row_bytes(n)
}

/// Bytes of one K or V tensor of a KV cache: `rows` token rows of `elems` elements each
/// (`ggml_row_size(ty, elems) * rows`, as llama.cpp sizes its cache tensors). The one size
/// function of KV bytes: the paged cache sizes its block tensors with it and the memory
/// estimate its per-layer cache, so the two cannot disagree. `None` when `elems` is not whole
/// blocks of `ty` or the size overflows 64 bits.
pub fn kv_rows_bytes(ty: HbmType, elems: u64, rows: u64) -> Option<u64> {
    let row = ty.row_bytes(usize::try_from(elems).ok()?)?;
    (row as u64).checked_mul(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_ggml_numbers() {
        assert_eq!(HbmType::F32 as i32, 0);
        assert_eq!(HbmType::F16 as i32, 1);
        assert_eq!(HbmType::Q4_0 as i32, 2);
        assert_eq!(HbmType::Q8_0 as i32, 8);
        assert_eq!(HbmType::BF16 as i32, 30);
        for t in HbmType::ALL {
            assert_eq!(HbmType::from_i32(t as i32), Some(t));
        }
        for v in [-1, 3, 4, 5, 6, 7, 9, 29, 31, i32::MAX, i32::MIN] {
            assert_eq!(HbmType::from_i32(v), None, "{v} is not a KV type");
        }
    }

    #[test]
    fn row_sizes_match_ggml() {
        assert_eq!(row_bytes(HbmType::F32, 4096), Some(16384));
        assert_eq!(row_bytes(HbmType::F16, 4096), Some(8192));
        assert_eq!(row_bytes(HbmType::BF16, 4096), Some(8192));
        assert_eq!(row_bytes(HbmType::Q8_0, 4096), Some(128 * 34));
        assert_eq!(row_bytes(HbmType::Q4_0, 4096), Some(128 * 18));
        assert_eq!(row_bytes(HbmType::Q8_0, 32), Some(34));
        assert_eq!(row_bytes(HbmType::Q4_0, 0), Some(0));
        assert_eq!(row_bytes(HbmType::F16, 7), Some(14));
        assert_eq!(
            row_bytes(HbmType::Q8_0, 48),
            None,
            "48 is not a multiple of 32"
        );
        assert_eq!(row_bytes(HbmType::Q4_0, 33), None);
        assert_eq!(row_bytes(HbmType::F32, usize::MAX), None, "overflow");
        assert!(HbmType::Q4_0.is_quantized() && !HbmType::BF16.is_quantized());
    }

    #[test]
    fn kv_tensor_bytes_are_rows_times_row_bytes() {
        // LLaMA-7B, one layer's K at 2048 cells in F16: 4096 * 2 * 2048 = 16 MiB.
        assert_eq!(kv_rows_bytes(HbmType::F16, 4096, 2048), Some(16 << 20));
        assert_eq!(kv_rows_bytes(HbmType::Q8_0, 512, 100), Some(16 * 34 * 100));
        assert_eq!(kv_rows_bytes(HbmType::Q4_0, 576, 3), Some(18 * 18 * 3));
        assert_eq!(
            kv_rows_bytes(HbmType::Q4_0, 40, 1),
            None,
            "40 is not whole blocks"
        );
        assert_eq!(
            kv_rows_bytes(HbmType::F32, 1 << 40, 1 << 30),
            None,
            "overflow"
        );
        assert_eq!(kv_rows_bytes(HbmType::BF16, 8, 0), Some(0));
    }
}
