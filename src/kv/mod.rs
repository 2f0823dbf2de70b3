//! The KV cache: element types, their sizes, and the CPU reference of ggml's formats.
//!
//! - `types`: `HbmType` (ggml's numbering), block sizes and row sizes.
//! - `half`: fp16 and bf16 conversions, rounding as ggml does.
//! - `quant`: Q8_0 / Q4_0 quantization bit-exact with ggml's reference, and row (de)quantization
//!   for every type.
//! - `layout`: how many bytes a cache of a given shape needs.
//! - `cache`: the cache object, grown by VMM commit, realloc, or allocated up front.

pub mod cache;
pub mod half;
pub mod layout;
pub mod paged;
pub mod quant;
pub mod types;

pub use types::HbmType;
