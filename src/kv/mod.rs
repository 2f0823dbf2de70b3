//! The KV cache: element types, their sizes, and the CPU reference of ggml's formats.
//!
//! - `types`: `HbmType` (ggml's numbering), block sizes and row sizes (`crate::dtype`, below
//!   the backend, which launches kernels over these types).
//! - `half`, `quant`: fp16/bf16 conversions and Q8_0/Q4_0 bit-exact with ggml (`crate::dtype`).
//! - `layout`: how many bytes a cache of a given shape needs.
//! - `cache`: the cache object, grown by VMM commit, realloc, or allocated up front.

pub mod cache;
pub use crate::dtype::half;
pub mod layout;
pub mod paged;
pub use crate::dtype as types;
pub use crate::dtype::quant;

pub use types::HbmType;
