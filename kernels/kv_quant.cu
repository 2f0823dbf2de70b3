// KV cache kernels: append tokens in any cache type, dequantize rows back to F32 or F16.
//
// Compiled at run time by NVRTC (src/kernels.rs), so this file includes nothing: the fp16 and bf16
// conversions are integer code identical to src/kv/half.rs, and every step of the quantization
// follows src/kv/quant.rs (and so ggml's quantize_row_q8_0_ref / quantize_row_q4_0_ref) with
// explicitly rounded single-precision operations, so the bytes equal the CPU reference's. Compile
// with --fmad=false as well: a fused x*id + 8.5f would round once where ggml rounds twice.
//
// Layout: a row is `row_elems` elements of one token (n_head_kv * head_dim); row r of a cache
// tensor starts at base + r * row_stride bytes. Types use ggml's numbers.
//
// Threads: one per element, in (row, element) order. For Q8_0 and Q4_0 the 32 lanes of a warp
// hold one block, which needs row_elems % 32 == 0 and blockDim.x % 32 == 0 (the launcher checks).

#define HBM_F32 0
#define HBM_F16 1
#define HBM_Q4_0 2
#define HBM_Q8_0 8
#define HBM_BF16 30

#define FULL_MASK 0xffffffffu

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

// fp32 -> fp16, round to nearest even; NaN -> quiet 0x7e00 with the sign (src/kv/half.rs).
__device__ __forceinline__ u16 hbm_fp32_to_fp16(float f) {
    const u32 x = __float_as_uint(f);
    const u32 sign = (x >> 16) & 0x8000u;
    const u32 abs = x & 0x7fffffffu;
    if (abs > 0x7f800000u) return (u16)(sign | 0x7e00u);
    if (abs >= 0x47800000u) return (u16)(sign | 0x7c00u);
    const int half_exp = (int)(abs >> 23) - 127 + 15;
    if (half_exp <= 0) {
        if (half_exp < -10) return (u16)sign;
        const u32 mant = (abs & 0x7fffffu) | 0x800000u;
        const u32 shift = (u32)(14 - half_exp);
        u32 q = mant >> shift;
        const u32 rem = mant & ((1u << shift) - 1u);
        const u32 half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) q += 1u;
        return (u16)(sign | q);
    }
    u32 q = ((u32)half_exp << 10) | ((abs & 0x7fffffu) >> 13);
    const u32 rem = abs & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) q += 1u;
    return (u16)(sign | q);
}

// fp16 -> fp32, exact; NaN stays NaN with its payload, made quiet.
__device__ __forceinline__ float hbm_fp16_to_fp32(u16 h) {
    const u32 sign = ((u32)h & 0x8000u) << 16;
    const u32 exp = ((u32)h >> 10) & 0x1fu;
    const u32 mant = (u32)h & 0x3ffu;
    if (exp == 0) {
        if (mant == 0) return __uint_as_float(sign);
        // mant * 2^-24 is exact.
        return __uint_as_float(sign | __float_as_uint(__fmul_rn((float)mant, 5.9604644775390625e-8f)));
    }
    if (exp == 31) return __uint_as_float(sign | (mant ? (0x7fc00000u | (mant << 13)) : 0x7f800000u));
    return __uint_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// fp32 -> bf16 as ggml's ggml_compute_fp32_to_bf16: nearest even, NaN made quiet.
__device__ __forceinline__ u16 hbm_fp32_to_bf16(float f) {
    const u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 64u);
    return (u16)((x + (0x7fffu + ((x >> 16) & 1u))) >> 16);
}

__device__ __forceinline__ float hbm_bf16_to_fp32(u16 h) {
    return __uint_as_float((u32)h << 16);
}

// C's (int8_t)f as x86-64 does it (truncate to int32, INT_MIN when out of range or NaN, keep the
// low byte); the GPU's own conversion saturates instead, which would differ when 1/d overflows.
__device__ __forceinline__ int hbm_c_float_to_i8(float v) {
    const int w = (v >= -2147483648.0f && v < 2147483648.0f) ? (int)v : (int)0x80000000u;
    return (int)(signed char)(w & 0xff);
}

__device__ __forceinline__ float hbm_inverse(float d) {
    // C's `d ? 1.0f/d : 0.0f`: a NaN d counts as true.
    return d != 0.0f ? __frcp_rn(d) : 0.0f;
}

__device__ __forceinline__ float hbm_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) {
        const float other = __shfl_xor_sync(FULL_MASK, v, o);
        v = other > v ? other : v;
    }
    return v;
}

__device__ __forceinline__ void hbm_store_u16(u8 *p, u16 v) {
    // Blocks are 34 or 18 bytes: their scale is 2-byte aligned only if the row is; store bytes.
    p[0] = (u8)(v & 0xffu);
    p[1] = (u8)(v >> 8);
}

__device__ __forceinline__ u16 hbm_load_u16(const u8 *p) {
    return (u16)(p[0] | ((u16)p[1] << 8));
}

// Q8_0 block held by a warp, lane j holding element j (ggml's quantize_row_q8_0_ref).
__device__ __forceinline__ void hbm_quantize_q8_0_warp(float x, int lane, u8 *block) {
    // ggml folds amax = MAX(amax, |x_j|) with MAX(a, b) = a > b ? a : b: a NaN makes amax NaN,
    // and the next element replaces it. So amax is the maximum after the last NaN, NaN if the
    // last element is one.
    const u32 nan_mask = __ballot_sync(FULL_MASK, x != x);
    const int last_nan = nan_mask ? 31 - __clz((int)nan_mask) : -1;
    float amax = hbm_warp_max(lane > last_nan ? fabsf(x) : 0.0f);
    if (last_nan == 31) amax = __uint_as_float(0x7fc00000u);
    const float d = __fdiv_rn(amax, 127.0f);
    const float id = hbm_inverse(d);
    if (lane == 0) hbm_store_u16(block, hbm_fp32_to_fp16(d));
    block[2 + lane] = (u8)hbm_c_float_to_i8(roundf(__fmul_rn(x, id)));
}

// Q4_0 block held by a warp (ggml's quantize_row_q4_0_ref).
__device__ __forceinline__ void hbm_quantize_q4_0_warp(float x, int lane, u8 *block) {
    // max is the first element of the largest magnitude, with its sign; a NaN never wins.
    const float mag = (x == x) ? fabsf(x) : 0.0f;
    const float amax = hbm_warp_max(mag);
    const u32 at_max = __ballot_sync(FULL_MASK, amax > 0.0f && mag == amax);
    const float first = __shfl_sync(FULL_MASK, x, at_max ? __ffs((int)at_max) - 1 : 0);
    const float max = at_max ? first : 0.0f;
    const float d = __fdiv_rn(max, -8.0f);
    const float id = hbm_inverse(d);
    int q = hbm_c_float_to_i8(__fadd_rn(__fmul_rn(x, id), 8.5f));
    q = q < 15 ? q : 15;
    const u32 hi = (u32)__shfl_down_sync(FULL_MASK, q, 16);
    if (lane == 0) hbm_store_u16(block, hbm_fp32_to_fp16(d));
    if (lane < 16) block[2 + lane] = (u8)(((u32)q & 0xffu) | (hi << 4));
}

// Appends n_rows token rows to a cache tensor.
//   src: n_rows * row_elems elements of src_type (F32 or F16), contiguous.
//   dst: the tensor's base; row p starts at dst + p * dst_row_stride.
//   positions: n_rows destination rows, or NULL for pos0, pos0 + 1, ...
extern "C" __global__ void hbm_kv_append(const void *src, int src_type, void *dst, int dst_type,
                                         u64 dst_row_stride, int row_elems, const int *positions,
                                         i64 pos0, int n_rows) {
    const i64 total = (i64)n_rows * row_elems;
    const i64 step = (i64)gridDim.x * blockDim.x;
    const int lane = threadIdx.x & 31;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
        const i64 r = t / row_elems;
        const int e = (int)(t - r * row_elems);
        const float x = src_type == HBM_F16 ? hbm_fp16_to_fp32(((const u16 *)src)[t])
                                            : ((const float *)src)[t];
        const i64 p = positions ? (i64)positions[r] : pos0 + r;
        u8 *row = (u8 *)dst + (u64)p * dst_row_stride;
        switch (dst_type) {
        case HBM_F32: ((float *)row)[e] = x; break;
        case HBM_F16: ((u16 *)row)[e] = hbm_fp32_to_fp16(x); break;
        case HBM_BF16: ((u16 *)row)[e] = hbm_fp32_to_bf16(x); break;
        case HBM_Q8_0: hbm_quantize_q8_0_warp(x, lane, row + (e / 32) * 34); break;
        case HBM_Q4_0: hbm_quantize_q4_0_warp(x, lane, row + (e / 32) * 18); break;
        default: break;
        }
    }
}

// Dequantizes rows row0 .. row0 + n_rows of a cache tensor into dst (dst_type F32 or F16),
// row_elems elements per row, contiguous.
extern "C" __global__ void hbm_kv_dequantize(const void *src, int src_type, u64 src_row_stride,
                                             i64 row0, int n_rows, int row_elems, void *dst,
                                             int dst_type) {
    const i64 total = (i64)n_rows * row_elems;
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += step) {
        const i64 r = t / row_elems;
        const int e = (int)(t - r * row_elems);
        const u8 *row = (const u8 *)src + (u64)(row0 + r) * src_row_stride;
        float v = 0.0f;
        switch (src_type) {
        case HBM_F32: v = ((const float *)row)[e]; break;
        case HBM_F16: v = hbm_fp16_to_fp32(((const u16 *)row)[e]); break;
        case HBM_BF16: v = hbm_bf16_to_fp32(((const u16 *)row)[e]); break;
        case HBM_Q8_0: {
            const u8 *block = row + (e / 32) * 34;
            const float d = hbm_fp16_to_fp32(hbm_load_u16(block));
            v = __fmul_rn((float)(signed char)block[2 + e % 32], d);
            break;
        }
        case HBM_Q4_0: {
            const u8 *block = row + (e / 32) * 18;
            const float d = hbm_fp16_to_fp32(hbm_load_u16(block));
            const int j = e % 32;
            const int nibble = j < 16 ? (block[2 + j] & 0x0f) : (block[2 + j - 16] >> 4);
            v = __fmul_rn((float)(nibble - 8), d);
            break;
        }
        default: break;
        }
        if (dst_type == HBM_F16) {
            ((u16 *)dst)[t] = hbm_fp32_to_fp16(v);
        } else {
            ((float *)dst)[t] = v;
        }
    }
}
