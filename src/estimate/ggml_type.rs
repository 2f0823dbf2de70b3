//! The ggml tensor type table: ggml's numbering, block size and bytes per block, and the names
//! llama.cpp prints (`f16`, `q8_0`, `q4_K`, ...).
//!
//! Values follow `type_traits[]` in ggml's `ggml.c` (`blck_size`, `type_size` = `sizeof(block_*)`
//! from `ggml-common.h`). Ids 4, 5 (Q4_2/Q4_3), 31..=33 and 36..=38 (the removed repacked types) are
//! not types any more and are rejected; 40 (NVFP4) and 41 (Q1_0) are the newest upstream types.

use std::fmt;

/// One ggml type: its id, its name, how many elements a block holds and how many bytes a block takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType {
    /// ggml's `enum ggml_type` value, as stored in GGUF tensor infos.
    pub id: u32,
    /// The name ggml's `ggml_type_name` gives it (`q4_K` keeps the capital K).
    pub name: &'static str,
    /// Elements per block (`blck_size`).
    pub block_size: u64,
    /// Bytes per block (`type_size`).
    pub type_size: u64,
}

macro_rules! types {
    ($($konst:ident = $id:literal, $name:literal, $blck:literal, $size:literal;)*) => {
        impl GgmlType {
            $(pub const $konst: GgmlType =
                GgmlType { id: $id, name: $name, block_size: $blck, type_size: $size };)*
        }
        /// Every type ggml knows today, in id order.
        pub const ALL: &[GgmlType] = &[$(GgmlType::$konst),*];
    };
}

// QK_K = 256. Block layouts (ggml-common.h), ggml_half = 2 bytes:
//   q4_0 d+16, q4_1 d+m+16, q5_0 d+qh[4]+16, q5_1 d+m+qh[4]+16, q8_0 d+32, q8_1 d+s+32,
//   q2_K 16+64+d+dmin, q3_K 32+64+12+d, q4_K d+dmin+12+128, q5_K d+dmin+12+32+128,
//   q6_K 128+64+16+d, q8_K f32+256+int16[16], iq2_xxs d+64, iq2_xs d+64+8, iq3_xxs d+96,
//   iq1_s d+32+16, iq4_nl d+16, iq3_s d+64+8+32+4, iq2_s d+64+8+8, iq4_xs d+2+4+128,
//   iq1_m 32+16+8, tq1_0 48+4+d, tq2_0 64+d, mxfp4 e8m0+16, nvfp4 (QK 64) 4 ue4m3+32,
//   q1_0 (QK 128) d+16.
types! {
    F32 = 0, "f32", 1, 4;
    F16 = 1, "f16", 1, 2;
    Q4_0 = 2, "q4_0", 32, 18;
    Q4_1 = 3, "q4_1", 32, 20;
    Q5_0 = 6, "q5_0", 32, 22;
    Q5_1 = 7, "q5_1", 32, 24;
    Q8_0 = 8, "q8_0", 32, 34;
    Q8_1 = 9, "q8_1", 32, 36;
    Q2_K = 10, "q2_K", 256, 84;
    Q3_K = 11, "q3_K", 256, 110;
    Q4_K = 12, "q4_K", 256, 144;
    Q5_K = 13, "q5_K", 256, 176;
    Q6_K = 14, "q6_K", 256, 210;
    Q8_K = 15, "q8_K", 256, 292;
    IQ2_XXS = 16, "iq2_xxs", 256, 66;
    IQ2_XS = 17, "iq2_xs", 256, 74;
    IQ3_XXS = 18, "iq3_xxs", 256, 98;
    IQ1_S = 19, "iq1_s", 256, 50;
    IQ4_NL = 20, "iq4_nl", 32, 18;
    IQ3_S = 21, "iq3_s", 256, 110;
    IQ2_S = 22, "iq2_s", 256, 82;
    IQ4_XS = 23, "iq4_xs", 256, 136;
    I8 = 24, "i8", 1, 1;
    I16 = 25, "i16", 1, 2;
    I32 = 26, "i32", 1, 4;
    I64 = 27, "i64", 1, 8;
    F64 = 28, "f64", 1, 8;
    IQ1_M = 29, "iq1_m", 256, 56;
    BF16 = 30, "bf16", 1, 2;
    TQ1_0 = 34, "tq1_0", 256, 54;
    TQ2_0 = 35, "tq2_0", 256, 66;
    MXFP4 = 39, "mxfp4", 32, 17;
    NVFP4 = 40, "nvfp4", 64, 36;
    Q1_0 = 41, "q1_0", 128, 18;
}

/// Why a byte count could not be computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeError {
    /// A row's length is not a whole number of blocks (ggml asserts on this).
    NotBlockMultiple {
        ty: &'static str,
        ne0: u64,
        block_size: u64,
    },
    /// The element or byte count does not fit in 64 bits.
    Overflow,
    /// A tensor has no dimensions or more than ggml's 4.
    BadRank(usize),
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeError::NotBlockMultiple {
                ty,
                ne0,
                block_size,
            } => {
                write!(
                    f,
                    "row of {ne0} elements is not a multiple of {ty}'s block size {block_size}"
                )
            }
            SizeError::Overflow => write!(f, "tensor size overflows 64 bits"),
            SizeError::BadRank(n) => write!(f, "tensor has {n} dimensions (expected 1 to 4)"),
        }
    }
}

impl std::error::Error for SizeError {}

impl GgmlType {
    /// The type with ggml id `id`, or `None` for an unknown or removed id.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        ALL.iter().copied().find(|t| t.id == id)
    }

    /// The type llama.cpp calls `name` (case-insensitive: `Q8_0`, `q4_k` and `q4_K` all match).
    /// Whether llama.cpp's KV cache (and hbmalloc's) can hold this type: F32, F16, BF16, Q8_0, Q4_0.
    pub fn is_kv_cache_type(self) -> bool {
        matches!(
            self,
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 | GgmlType::Q4_0
        )
    }

    pub fn from_name(name: &str) -> Option<GgmlType> {
        ALL.iter()
            .copied()
            .find(|t| t.name.eq_ignore_ascii_case(name))
    }

    /// Whether the type is quantized (more than one element per block).
    pub fn is_quantized(&self) -> bool {
        self.block_size > 1
    }

    /// Bytes of one row of `ne0` elements, as `ggml_row_size`: `type_size * ne0 / block_size`.
    pub fn row_size(&self, ne0: u64) -> Result<u64, SizeError> {
        if ne0 % self.block_size != 0 {
            return Err(SizeError::NotBlockMultiple {
                ty: self.name,
                ne0,
                block_size: self.block_size,
            });
        }
        (ne0 / self.block_size)
            .checked_mul(self.type_size)
            .ok_or(SizeError::Overflow)
    }

    /// Bytes of a tensor with dims `ne` (ne[0] is the row length), as `ggml_nbytes` for a
    /// contiguous tensor: the row size times the product of the other dims.
    pub fn tensor_bytes(&self, ne: &[u64]) -> Result<u64, SizeError> {
        if ne.is_empty() || ne.len() > 4 {
            return Err(SizeError::BadRank(ne.len()));
        }
        let mut rows: u64 = 1;
        for &d in &ne[1..] {
            rows = rows.checked_mul(d).ok_or(SizeError::Overflow)?;
        }
        // A tensor with a zero dim holds nothing, but its row length must still be valid.
        let row = self.row_size(ne[0])?;
        // ggml also requires the element count to fit in int64.
        let mut elems = ne[0];
        for &d in &ne[1..] {
            elems = elems.checked_mul(d).ok_or(SizeError::Overflow)?;
        }
        if elems > i64::MAX as u64 {
            return Err(SizeError::Overflow);
        }
        row.checked_mul(rows).ok_or(SizeError::Overflow)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_round_trip() {
        for (i, t) in ALL.iter().enumerate() {
            assert_eq!(GgmlType::from_id(t.id), Some(*t));
            assert_eq!(GgmlType::from_name(t.name), Some(*t));
            assert_eq!(GgmlType::from_name(&t.name.to_uppercase()), Some(*t));
            for u in &ALL[i + 1..] {
                assert_ne!(t.id, u.id);
                assert_ne!(t.name, u.name);
            }
        }
        assert_eq!(ALL.len(), 34);
    }

    #[test]
    fn kv_cache_types_are_the_caches_own() {
        // The KV cache sizes rows with dtype::HbmType; the table must agree with it type for type.
        use crate::dtype::HbmType;
        for t in ALL.iter().filter(|t| t.is_kv_cache_type()) {
            let h = HbmType::from_i32(t.id as i32).expect("a KV cache type");
            assert_eq!((h.name(), h.block_size() as u64), (t.name, t.block_size));
            assert_eq!(h.block_bytes() as u64, t.type_size, "{t}");
        }
        assert_eq!(ALL.iter().filter(|t| t.is_kv_cache_type()).count(), 5);
    }

    #[test]
    fn removed_and_unknown_ids_are_rejected() {
        for id in [4, 5, 31, 32, 33, 36, 37, 38, 42, 1000, u32::MAX] {
            assert_eq!(GgmlType::from_id(id), None, "id {id}");
        }
        assert_eq!(GgmlType::from_name("q4_2"), None);
    }

    #[test]
    fn bits_per_weight_match_the_published_figures() {
        // bpw = 8 * type_size / block_size; published: q4_0 4.5, q8_0 8.5, q4_K 4.5, q6_K 6.5625,
        // q2_K 2.625, iq2_xxs 2.0625, iq4_xs 4.25, tq2_0 2.0625, mxfp4 4.25.
        let bpw = |t: GgmlType| 8.0 * t.type_size as f64 / t.block_size as f64;
        assert_eq!(bpw(GgmlType::Q4_0), 4.5);
        assert_eq!(bpw(GgmlType::Q8_0), 8.5);
        assert_eq!(bpw(GgmlType::Q4_K), 4.5);
        assert_eq!(bpw(GgmlType::Q6_K), 6.5625);
        assert_eq!(bpw(GgmlType::Q2_K), 2.625);
        assert_eq!(bpw(GgmlType::IQ2_XXS), 2.0625);
        assert_eq!(bpw(GgmlType::IQ4_XS), 4.25);
        assert_eq!(bpw(GgmlType::TQ2_0), 2.0625);
        assert_eq!(bpw(GgmlType::MXFP4), 4.25);
        assert_eq!(bpw(GgmlType::F16), 16.0);
        // Added upstream after MXFP4: nvfp4 4.5 bpw (64 per block), q1_0 1.125 bpw (128).
        assert_eq!(GgmlType::from_id(40), Some(GgmlType::NVFP4));
        assert_eq!(bpw(GgmlType::NVFP4), 4.5);
        assert_eq!(GgmlType::from_id(41), Some(GgmlType::Q1_0));
        assert_eq!(bpw(GgmlType::Q1_0), 1.125);
    }

    #[test]
    fn row_and_tensor_bytes() {
        assert_eq!(GgmlType::F32.row_size(4096), Ok(16384));
        assert_eq!(GgmlType::Q8_0.row_size(4096), Ok(128 * 34));
        assert_eq!(GgmlType::Q4_K.row_size(4096), Ok(16 * 144));
        assert_eq!(
            GgmlType::Q4_K.row_size(100),
            Err(SizeError::NotBlockMultiple {
                ty: "q4_K",
                ne0: 100,
                block_size: 256
            })
        );
        // LLaMA-7B token_embd in f16: 4096 x 32000.
        assert_eq!(GgmlType::F16.tensor_bytes(&[4096, 32000]), Ok(262_144_000));
        assert_eq!(
            GgmlType::Q6_K.tensor_bytes(&[4096, 32000, 1, 1]),
            Ok(16 * 210 * 32000)
        );
        assert_eq!(GgmlType::F16.tensor_bytes(&[0, 7]), Ok(0));
    }

    #[test]
    fn overflow_and_bad_rank_are_errors() {
        assert_eq!(
            GgmlType::F32.tensor_bytes(&[u64::MAX / 2, 3]),
            Err(SizeError::Overflow)
        );
        assert_eq!(
            GgmlType::F32.tensor_bytes(&[1 << 32, 1 << 32]),
            Err(SizeError::Overflow)
        );
        assert_eq!(GgmlType::F64.row_size(u64::MAX), Err(SizeError::Overflow));
        assert_eq!(GgmlType::F32.tensor_bytes(&[]), Err(SizeError::BadRank(0)));
        assert_eq!(
            GgmlType::F32.tensor_bytes(&[1; 5]),
            Err(SizeError::BadRank(5))
        );
    }
}
