// KV cache kernels: append tokens in any cache type, dequantize rows back to F32 or F16.
//
// Compiled at run time by NVRTC (src/kernels.rs), so this file includes nothing: the fp16 and bf16
// conversions give the same bits as src/kv/half.rs (NaNs included), and every step of the quantization
// follows src/kv/quant.rs (and so ggml's quantize_row_q8_0_ref / quantize_row_q4_0_ref) with
// explicitly rounded single-precision operations, so the bytes equal the CPU reference's. Compile
// with --fmad=false as well: a fused x*id + 8.5f would round once where ggml rounds twice.
//
// Layout: a row is `row_elems` elements of one token (n_head_kv * head_dim); row r of a cache
// tensor starts at base + r * row_stride bytes. Types use ggml's numbers.
//
// Kernels: one per kind of cache type, so that the light F32/F16/BF16 kernels are not held to the
// registers and shared memory of the quantized ones (one kernel for all types ran 2 blocks per SM).
//   hbm_kv_append_plain, hbm_kv_dequantize_plain       F32, F16, BF16 tensors
//   hbm_kv_append_q8_0,  hbm_kv_dequantize_q8_0        Q8_0 tensors
//   hbm_kv_append_q4_0,  hbm_kv_dequantize_q4_0        Q4_0 tensors
//   hbm_kv_append_q8_0_f16, hbm_kv_append_q4_0_f16     the same from a 16-byte aligned F16
//                                                      source, with deeper prefetch
// All take the same parameters (below); src/kernels.rs picks one by the tensor's type (and for
// the appends to Q8_0/Q4_0, the source's).
//
// Threads (HBM_THREADS per block, HBM_QUANT_THREADS for the Q8_0/Q4_0 kernels;
// grid-stride loops, so any grid is correct; the launcher sizes it to the work):
// - F32/F16/BF16: when rows are a multiple of 8 elements and pointers and stride 16-byte
//   aligned, a unit is 8 elements (one 16-byte access on each side) when neither side is F32,
//   else 4 elements, one 16-byte (F32) or 8-byte (F16/BF16) access (4-element units on the
//   2-byte side halved its bytes per instruction, costing F16 -> F16 a tenth). Each pass a
//   block takes blockDim * HBM_UNITS consecutive units; its thread t takes units t,
//   t + blockDim, ..., so that every load and store instruction of a warp covers one contiguous
//   run (F32 units of 8 elements, two 16-byte stores 32 bytes apart per lane, left each store
//   half of every sector and ran widening kernels at 0.75-0.85 of copy), and issues all
//   HBM_UNITS loads before the first store. Otherwise one element per thread and step.
// - Q8_0/Q4_0: each warp takes tiles of 32 consecutive quantized blocks (row_elems % 32 == 0;
//   the launcher checks); lane i quantizes or expands block i of the tile on its own, in the
//   reference's order. The tile's F32/F16 side is contiguous and moves through shared memory as
//   16-byte vectors. The quantized side is one run of bytes per row the tile touches
//   ("segment"); the warp moves each segment between shared memory and the tensor as aligned
//   4-byte words, a few single bytes at its ends, staging it at the same address modulo 4 as in
//   the tensor. Each warp has two stages: the next tile's loads (cp.async, sm_80 and later)
//   land in one while it works on the other (an append's source must be 16-byte aligned for
//   this; otherwise it loads element by element into one stage).

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
// cvt.rn.f16.f32 is the IEEE conversion (nearest even, subnormal results kept, overflow to
// infinity: the same bits as the integer code in half.rs); only NaNs need ours, as the hardware
// gives its canonical NaN. One instruction instead of ~20 integer ones per element: with those
// the F16 paths were bound by integer throughput, not by memory.
__device__ __forceinline__ u16 hbm_fp32_to_fp16(float f) {
    const u32 x = __float_as_uint(f);
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return (x & 0x7fffffffu) > 0x7f800000u ? (u16)(((x >> 16) & 0x8000u) | 0x7e00u) : h;
}

// fp16 -> fp32, exact (cvt.f32.f16); a NaN keeps its sign and payload, made quiet, as half.rs.
__device__ __forceinline__ float hbm_fp16_to_fp32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    if (((u32)h & 0x7fffu) > 0x7c00u)
        return __uint_as_float((((u32)h & 0x8000u) << 16) | 0x7fc00000u | (((u32)h & 0x3ffu) << 13));
    return f;
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

// Threads per block of every launch; src/kernels.rs launches exactly this many.
#define HBM_THREADS 256
#define HBM_WARPS (HBM_THREADS / 32)
// Units (of 4 or 8 elements) per thread and pass in the F32/F16/BF16 kernels: HBM_UNITS loads of
// 16 or 8 bytes in flight per thread. src/kernels.rs sizes grids with the same numbers.
#ifndef HBM_UNITS
#define HBM_UNITS 8
#endif
// Blocks per SM the F32/F16/BF16 kernels are compiled for (a register cap of 80; 64 spills).
#ifndef HBM_PLAIN_MIN_BLOCKS
#define HBM_PLAIN_MIN_BLOCKS 3
#endif
// Shared staging per warp: 32 quantized blocks of 32 floats, each padded to 36 floats (9 float4)
// so that lane i reading float4 j of block i, and lanes writing consecutive float4s, hit
// distinct banks. The same space holds a tile's quantized bytes (at most 32 * 34 + 127) when
// those are staged.
#define HBM_STAGE (32 * 9)
// Threads per block of the Q8_0/Q4_0 kernels (src/kernels.rs launches exactly this many): each
// of their warps has two stages (9 KiB), and a block's static shared memory is at most 48 KiB.
#define HBM_QUANT_THREADS 128
// Blocks per SM the quantized kernels are compiled for: caps their registers, so that enough
// warps are resident to keep loads in flight (shared memory allows 6 of each). 6 blocks of 128
// give 80 registers (24 warps per SM), 5 give 96 (20 warps). Measured on an H200 with the F16
// fast paths: Q4_0 appends run best at 6 (0.71 of copy from F16 against 0.65 at 5; a few spills
// of loop state), Q8_0 appends at 5 (0.77 against 0.73: at 80 ptxas spills 128 bytes), and the
// dequantizes at 5 (at 80 ptxas spilled loop state around the F16 path's vote, and every
// dequantize, F32 ones included, lost a fifth).
#ifndef HBM_APPEND_Q4_0_MIN_BLOCKS
#define HBM_APPEND_Q4_0_MIN_BLOCKS 6
#endif
#ifndef HBM_APPEND_Q8_0_MIN_BLOCKS
#define HBM_APPEND_Q8_0_MIN_BLOCKS 5
#endif
#ifndef HBM_DEQUANTIZE_QUANT_MIN_BLOCKS
#define HBM_DEQUANTIZE_QUANT_MIN_BLOCKS 5
#endif

// r = u / n and k = u % n, in 32 bits when u fits (always, in practice): a 64-bit division is a
// long software routine.
__device__ __forceinline__ void hbm_divmod(u64 u, u32 n, u64 *r, u32 *k) {
    if (u <= 0xffffffffull) {
        const u32 q = (u32)u / n;
        *r = q;
        *k = (u32)u - q * n;
    } else {
        *r = u / n;
        *k = (u32)(u - *r * n);
    }
}

__device__ __forceinline__ bool hbm_aligned16(const void *p) { return ((u64)p & 15u) == 0; }

// Where float4 m (of 4) of block q of a staged F16 tile is, in float4s: L = 5, padded (block q at
// q * 5, 160 per tile) against bank conflicts; L = 4, unpadded (128 per tile), with m swizzled by
// q / 2 instead: the 8 lanes of a 16-byte shared access still hit 8 distinct bank groups, whether
// lanes read float4 m of blocks lane (the quantizer) or consecutive float4s (the copy in).
template <int L>
__device__ __forceinline__ u32 hbm_f16_at(u32 q, u32 m) {
    return L == 5 ? q * 5 + m : q * 4 + (m ^ ((q >> 1) & 3u));
}

__device__ __forceinline__ u32 hbm_pack2(u16 lo, u16 hi) { return (u32)lo | ((u32)hi << 16); }

__device__ __forceinline__ bool hbm_isnan2(float a, float b) { return (a != a) | (b != b); }

// Two fp32 -> packed fp16, as hbm_fp32_to_fp16 for every non-NaN (the caller handles NaNs):
// one cvt.rn.f16x2.f32 on sm_80 and later.
__device__ __forceinline__ u32 hbm_fp16x2_rn(float lo, float hi) {
#if __CUDA_ARCH__ >= 800
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return hbm_pack2(hbm_fp32_to_fp16(lo), hbm_fp32_to_fp16(hi));
#endif
}

__device__ __forceinline__ float hbm_fp16_to_fp32_hw(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// 4 fp16 (an 8-byte vector) -> fp32. The hardware conversion, then the exact one of
// hbm_fp16_to_fp32 only if a NaN came out (rare): one test per pair instead of one per element.
__device__ __forceinline__ void hbm_f16x4_to_f32(u32 w0, u32 w1, float *x) {
    const u32 w[2] = {w0, w1};
    bool nan = false;
#pragma unroll
    for (int j = 0; j < 2; j++) {
        x[2 * j] = hbm_fp16_to_fp32_hw((u16)(w[j] & 0xffffu));
        x[2 * j + 1] = hbm_fp16_to_fp32_hw((u16)(w[j] >> 16));
        nan |= hbm_isnan2(x[2 * j], x[2 * j + 1]);
    }
    if (nan) {
#pragma unroll
        for (int j = 0; j < 2; j++) {
            x[2 * j] = hbm_fp16_to_fp32((u16)(w[j] & 0xffffu));
            x[2 * j + 1] = hbm_fp16_to_fp32((u16)(w[j] >> 16));
        }
    }
}

__device__ __forceinline__ void hbm_f16x8_to_f32(uint4 v, float *x) {
    hbm_f16x4_to_f32(v.x, v.y, x);
    hbm_f16x4_to_f32(v.z, v.w, x + 4);
}

// 4 fp32 -> 4 fp16 (two words) as hbm_fp32_to_fp16 each, NaNs included.
__device__ __forceinline__ uint2 hbm_f32x4_to_f16(const float *x) {
    uint2 w = make_uint2(hbm_fp16x2_rn(x[0], x[1]), hbm_fp16x2_rn(x[2], x[3]));
    if (hbm_isnan2(x[0], x[1]) | hbm_isnan2(x[2], x[3]))
        w = make_uint2(hbm_pack2(hbm_fp32_to_fp16(x[0]), hbm_fp32_to_fp16(x[1])),
                       hbm_pack2(hbm_fp32_to_fp16(x[2]), hbm_fp32_to_fp16(x[3])));
    return w;
}

// 8 fp32 -> 8 fp16 as hbm_fp32_to_fp16 each, NaNs included.
__device__ __forceinline__ uint4 hbm_f32x8_to_f16(const float *x) {
    const uint2 a = hbm_f32x4_to_f16(x), b = hbm_f32x4_to_f16(x + 4);
    return make_uint4(a.x, a.y, b.x, b.y);
}

// F16 -> F16 through F32 (hbm_fp16_to_fp32, then hbm_fp32_to_fp16) is the identity but for NaNs,
// which become 0x7e00 with their sign: 8 halves at a time, as a copy with a rare fix-up.
__device__ __forceinline__ u32 hbm_f16x2_canonical(u32 w) {
    const u32 nan = __vcmpgtu2(w & 0x7fff7fffu, 0x7c007c00u);  // 0xffff in each NaN half
    return (w & ~nan) | (((w & 0x80008000u) | 0x7e007e00u) & nan);
}

// A unit of E elements as raw bytes: E = 8 only when both sides are F16/BF16 (16 bytes);
// E = 4 is 16 bytes (F32) or 8 (F16/BF16, in x and y).
template <int E>
__device__ __forceinline__ uint4 hbm_load_unit(const u8 *p, int type) {
    if (E == 8 || type == HBM_F32) return *(const uint4 *)p;
    const uint2 v = *(const uint2 *)p;
    return make_uint4(v.x, v.y, 0, 0);
}

__device__ __forceinline__ void hbm_bf16x2_to_f32(u32 w, float *x) {
    x[0] = __uint_as_float(w << 16);
    x[1] = __uint_as_float(w & 0xffff0000u);
}

template <int E>
__device__ __forceinline__ void hbm_unit_to_f32(uint4 u, int type, float *x) {
    if (E == 8) {
        if (type == HBM_F16) {
            hbm_f16x8_to_f32(u, x);
        } else {
            hbm_bf16x2_to_f32(u.x, x); hbm_bf16x2_to_f32(u.y, x + 2);
            hbm_bf16x2_to_f32(u.z, x + 4); hbm_bf16x2_to_f32(u.w, x + 6);
        }
    } else if (type == HBM_F32) {
        x[0] = __uint_as_float(u.x); x[1] = __uint_as_float(u.y);
        x[2] = __uint_as_float(u.z); x[3] = __uint_as_float(u.w);
    } else if (type == HBM_F16) {
        hbm_f16x4_to_f32(u.x, u.y, x);
    } else {
        hbm_bf16x2_to_f32(u.x, x); hbm_bf16x2_to_f32(u.y, x + 2);
    }
}

__device__ __forceinline__ u32 hbm_bf16x2(const float *x) {
    return hbm_pack2(hbm_fp32_to_bf16(x[0]), hbm_fp32_to_bf16(x[1]));
}

// E consecutive F32, F16 or BF16 elements at p, aligned to their size (16 or 8 bytes).
template <int E>
__device__ __forceinline__ void hbm_store_unit(u8 *p, int type, const float *x) {
    if (E == 8) {
        if (type == HBM_F16) *(uint4 *)p = hbm_f32x8_to_f16(x);
        else *(uint4 *)p = make_uint4(hbm_bf16x2(x), hbm_bf16x2(x + 2), hbm_bf16x2(x + 4),
                                      hbm_bf16x2(x + 6));
    } else if (type == HBM_F32) {
        *(float4 *)p = make_float4(x[0], x[1], x[2], x[3]);
    } else if (type == HBM_F16) {
        *(uint2 *)p = hbm_f32x4_to_f16(x);
    } else {
        *(uint2 *)p = make_uint2(hbm_bf16x2(x), hbm_bf16x2(x + 2));
    }
}

// Converts one unit from src_type to dst_type and stores it at p.
template <int E>
__device__ __forceinline__ void hbm_convert_unit(u8 *p, uint4 v, int src_type, int dst_type) {
    if (E == 8 && src_type == HBM_F16 && dst_type == HBM_F16) {
        *(uint4 *)p = make_uint4(hbm_f16x2_canonical(v.x), hbm_f16x2_canonical(v.y),
                                 hbm_f16x2_canonical(v.z), hbm_f16x2_canonical(v.w));
        return;
    }
    float x[E];
    hbm_unit_to_f32<E>(v, src_type, x);
    hbm_store_unit<E>(p, dst_type, x);
}

// Row r and unit k of units u, u + step, ... with n units per row: one division for the first,
// then additions (step = q * n + rem).
struct hbm_rowpos {
    u64 r;
    u32 k, n, q, rem;
    __device__ __forceinline__ void next() {
        r += q;
        k += rem;
        if (k >= n) {
            k -= n;
            r++;
        }
    }
};

__device__ __forceinline__ hbm_rowpos hbm_rowpos_at(u64 u, u32 n, u32 step) {
    hbm_rowpos p;
    hbm_divmod(u, n, &p.r, &p.k);
    p.n = n;
    p.q = step / n;
    p.rem = step - p.q * n;
    return p;
}

// One element of an F32/F16/BF16 row, any alignment of its type.
__device__ __forceinline__ float hbm_load1(const void *p, int type, u64 e) {
    switch (type) {
    case HBM_F16: return hbm_fp16_to_fp32(((const u16 *)p)[e]);
    case HBM_BF16: return hbm_bf16_to_fp32(((const u16 *)p)[e]);
    default: return ((const float *)p)[e];
    }
}

__device__ __forceinline__ void hbm_store1(void *p, int type, u64 e, float x) {
    switch (type) {
    case HBM_F16: ((u16 *)p)[e] = hbm_fp32_to_fp16(x); break;
    case HBM_BF16: ((u16 *)p)[e] = hbm_fp32_to_bf16(x); break;
    default: ((float *)p)[e] = x; break;
    }
}

__device__ __forceinline__ u32 hbm_esize(int type) { return type == HBM_F32 ? 4u : 2u; }

// The vector path of hbm_kv_append_plain, in units of E elements (see the top of the file).
template <int E>
__device__ __forceinline__ void hbm_append_plain_vec(const u8 *s, int src_type, u8 *d,
                                                     int dst_type, u64 dst_row_stride, u32 n,
                                                     const int *positions, i64 pos0, u64 n_rows) {
    const u32 ss = hbm_esize(src_type), ds = hbm_esize(dst_type);
    const u32 units_per_row = n / E;
    const u64 total = n_rows * units_per_row;
    const u64 chunk = (u64)blockDim.x * HBM_UNITS;
    for (u64 c = blockIdx.x * chunk; c < total; c += gridDim.x * chunk) {
        const u64 u0 = c + threadIdx.x;
        hbm_rowpos at = hbm_rowpos_at(u0, units_per_row, blockDim.x);
        uint4 v[HBM_UNITS];
        u8 *out[HBM_UNITS];
        // Every load of the pass first (source and positions), then the conversions and stores.
#pragma unroll
        for (int j = 0; j < HBM_UNITS; j++) {
            const u64 u = u0 + (u64)j * blockDim.x;
            if (j > 0) at.next();
            out[j] = 0;
            if (u < total) {
                const i64 p = positions ? (i64)positions[at.r] : pos0 + (i64)at.r;
                out[j] = d + (u64)p * dst_row_stride + (u64)at.k * E * ds;
                v[j] = hbm_load_unit<E>(s + u * E * ss, src_type);
            }
        }
#pragma unroll
        for (int j = 0; j < HBM_UNITS; j++)
            if (out[j]) hbm_convert_unit<E>(out[j], v[j], src_type, dst_type);
    }
}

// Appends to an F32, F16 or BF16 tensor. Vector path (see the top of the file): rows of a
// multiple of 8 elements and 16-byte aligned source, tensor base and stride. Otherwise one
// element per thread and step.
// (The body of hbm_kv_append_plain, also run per job by hbm_paged_append_plain.)
__device__ __forceinline__ void hbm_append_plain_rows(const void *src, int src_type, void *dst,
                                                      int dst_type, u64 dst_row_stride,
                                                      int row_elems, const int *positions,
                                                      i64 pos0, int n_rows) {
    const u32 n = (u32)row_elems;
    const u8 *s = (const u8 *)src;
    u8 *d = (u8 *)dst;
    if (n % 8 == 0 && hbm_aligned16(src) && hbm_aligned16(dst) && dst_row_stride % 16 == 0) {
        if (src_type != HBM_F32 && dst_type != HBM_F32)
            hbm_append_plain_vec<8>(s, src_type, d, dst_type, dst_row_stride, n, positions, pos0,
                                    (u64)n_rows);
        else
            hbm_append_plain_vec<4>(s, src_type, d, dst_type, dst_row_stride, n, positions, pos0,
                                    (u64)n_rows);
    } else {
        const u64 total = (u64)n_rows * n;
        for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
             i += (u64)gridDim.x * blockDim.x) {
            u64 r;
            u32 e;
            hbm_divmod(i, n, &r, &e);
            const i64 p = positions ? (i64)positions[r] : pos0 + (i64)r;
            hbm_store1(d + (u64)p * dst_row_stride, dst_type, e, hbm_load1(src, src_type, i));
        }
    }
}

extern "C" __global__ void __launch_bounds__(HBM_THREADS, HBM_PLAIN_MIN_BLOCKS)
hbm_kv_append_plain(const void *src, int src_type, void *dst, int dst_type, u64 dst_row_stride,
                    int row_elems, const int *positions, i64 pos0, int n_rows) {
    hbm_append_plain_rows(src, src_type, dst, dst_type, dst_row_stride, row_elems, positions,
                          pos0, n_rows);
}

// The tensor row of output row r of a dequantize: rows[r] for a gather through a row list (the
// paged cache's slots), row0 + r for consecutive rows (rows NULL: a constant in the per-tensor
// kernels, so the test folds away there).
__device__ __forceinline__ i64 hbm_row_at(const int *rows, i64 row0, u64 r) {
    return rows ? (i64)rows[r] : row0 + (i64)r;
}

// The vector path of hbm_kv_dequantize_plain, in units of E elements.
template <int E>
__device__ __forceinline__ void hbm_dequantize_plain_vec(const u8 *s, int src_type,
                                                         u64 src_row_stride, i64 row0,
                                                         const int *rows, u64 n_rows, u32 n,
                                                         u8 *d, int dst_type) {
    const u32 ss = hbm_esize(src_type), ds = hbm_esize(dst_type);
    const u32 units_per_row = n / E;
    const u64 total = n_rows * units_per_row;
    const u64 chunk = (u64)blockDim.x * HBM_UNITS;
    for (u64 c = blockIdx.x * chunk; c < total; c += gridDim.x * chunk) {
        const u64 u0 = c + threadIdx.x;
        hbm_rowpos at = hbm_rowpos_at(u0, units_per_row, blockDim.x);
        uint4 v[HBM_UNITS];
#pragma unroll
        for (int j = 0; j < HBM_UNITS; j++) {
            const u64 u = u0 + (u64)j * blockDim.x;
            if (j > 0) at.next();
            if (u < total) {
                const u8 *row = s + (u64)hbm_row_at(rows, row0, at.r) * src_row_stride;
                v[j] = hbm_load_unit<E>(row + (u64)at.k * E * ss, src_type);
            }
        }
#pragma unroll
        for (int j = 0; j < HBM_UNITS; j++) {
            const u64 u = u0 + (u64)j * blockDim.x;
            if (u < total) hbm_convert_unit<E>(d + u * E * ds, v[j], src_type, dst_type);
        }
    }
}

// Dequantizes from an F32, F16 or BF16 tensor, the mirror of hbm_kv_append_plain: vector path
// when rows are a multiple of 8 elements and source base, stride and destination are 16-byte
// aligned; otherwise one element per thread and step. Output row i is tensor row rows[i], or
// row0 + i when rows is NULL (hbm_row_at).
// (The body of hbm_kv_dequantize_plain, also run per job by hbm_paged_gather_plain.)
__device__ __forceinline__ void hbm_dequantize_plain_rows(const void *src, int src_type,
                                                          u64 src_row_stride, i64 row0,
                                                          const int *rows, int n_rows,
                                                          int row_elems, void *dst,
                                                          int dst_type) {
    const u32 n = (u32)row_elems;
    const u8 *s = (const u8 *)src;
    if (n % 8 == 0 && hbm_aligned16(src) && src_row_stride % 16 == 0 && hbm_aligned16(dst)) {
        if (src_type != HBM_F32 && dst_type != HBM_F32)
            hbm_dequantize_plain_vec<8>(s, src_type, src_row_stride, row0, rows, (u64)n_rows,
                                        n, (u8 *)dst, dst_type);
        else
            hbm_dequantize_plain_vec<4>(s, src_type, src_row_stride, row0, rows, (u64)n_rows,
                                        n, (u8 *)dst, dst_type);
    } else {
        const u64 total = (u64)n_rows * n;
        for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total;
             i += (u64)gridDim.x * blockDim.x) {
            u64 r;
            u32 e;
            hbm_divmod(i, n, &r, &e);
            const u8 *row = s + (u64)hbm_row_at(rows, row0, r) * src_row_stride;
            hbm_store1(dst, dst_type, i, hbm_load1(row, src_type, e));
        }
    }
}

extern "C" __global__ void __launch_bounds__(HBM_THREADS, HBM_PLAIN_MIN_BLOCKS)
hbm_kv_dequantize_plain(const void *src, int src_type, u64 src_row_stride, i64 row0, int n_rows,
                        int row_elems, void *dst, int dst_type) {
    hbm_dequantize_plain_rows(src, src_type, src_row_stride, row0, 0, n_rows, row_elems, dst,
                              dst_type);
}

// max.NaN: NaN when either operand is; the quantizers' fast paths see "no NaN, no infinity" in
// one comparison of the result.
__device__ __forceinline__ float hbm_max_nan(float a, float b) {
#if __CUDA_ARCH__ >= 800
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#else
    return (a != a || b != b) ? __uint_as_float(0x7fffffffu) : fmaxf(a, b);
#endif
}

// f16x2 arithmetic on words holding two halves (low half first), for the F16 fast paths of the
// quantized kernels (sm_80 and later: max.NaN/min.NaN need it). Each use says why its result is
// the F32 route's, bit for bit.
#if __CUDA_ARCH__ >= 800
#define HBM_F16X2 1
__device__ __forceinline__ u32 hbm_h2_max_nan(u32 a, u32 b) {
    u32 r;
    asm("max.NaN.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

__device__ __forceinline__ u32 hbm_h2_min_nan(u32 a, u32 b) {
    u32 r;
    asm("min.NaN.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

__device__ __forceinline__ u32 hbm_h2_abs(u32 a) {
    u32 r;
    asm("abs.f16x2 %0, %1;" : "=r"(r) : "r"(a));
    return r;
}

// Correctly rounded sums and products (.rn: never contracted into a fused multiply-add).
__device__ __forceinline__ u32 hbm_h2_add(u32 a, u32 b) {
    u32 r;
    asm("add.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

__device__ __forceinline__ u32 hbm_h2_mul(u32 a, u32 b) {
    u32 r;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

// max.NaN and min.NaN of a word's two halves, as fp32 (exactly).
__device__ __forceinline__ float hbm_h2_fold_max_nan(u32 a) {
    float r;
    asm("{.reg .b16 l, h; mov.b32 {l, h}, %1; max.NaN.f16 l, l, h; cvt.f32.f16 %0, l;}"
        : "=f"(r) : "r"(a));
    return r;
}

__device__ __forceinline__ float hbm_h2_fold_min_nan(u32 a) {
    float r;
    asm("{.reg .b16 l, h; mov.b32 {l, h}, %1; min.NaN.f16 l, l, h; cvt.f32.f16 %0, l;}"
        : "=f"(r) : "r"(a));
    return r;
}
#else
#define HBM_F16X2 0
#endif

// Bytes 2..5 of the 8 bytes lo:hi (little-endian), i.e. the word two bytes further on.
__device__ __forceinline__ u32 hbm_shift16(u32 lo, u32 hi) { return __byte_perm(lo, hi, 0x5432); }

// The low bytes of four ints, packed little-endian.
__device__ __forceinline__ u32 hbm_bytes4(u32 a, u32 b, u32 c, u32 e) {
    return __byte_perm(__byte_perm(a, b, 0x0040), __byte_perm(c, e, 0x0040), 0x5410);
}

// The quantizers come in two steps. hbm_q*_fast_ok says whether the block allows the fast path
// (no NaN, no infinity, a usable 1/d: always so for real data); the warp then takes the fast path
// if all its lanes may, else the general one, so that lanes never diverge between the two.
// Both give the bytes of ggml's reference; the general one follows it step for step.

// C's (int8_t)roundf(v) & 0xff for any v: trunc(v + copysign(0.5, v)) with the addition rounded
// toward zero is roundf(v) exactly (rounding toward zero never crosses the integer trunc returns;
// |v| >= 2^23 is already an integer); the conversion then gives C's INT_MIN (low byte 0) for NaN
// and below -2^31 itself, and only the saturation at 2^31 and above needs replacing. One
// conversion where roundf and hbm_c_float_to_i8 take two and a dozen instructions.
__device__ __forceinline__ u32 hbm_round_i8(float v) {
    const float r = __fadd_rz(v, copysignf(0.5f, v));
    return r >= 2147483648.0f ? 0u : (u32)__float2int_rz(r);
}

// The fast path's scale: amax is the plain maximum of |x|, which equals ggml's fold when the
// block holds no NaN (max.NaN makes any NaN or infinity fail the test), and a finite 1/d keeps
// every x*id within about +-127.
// The maximum of |x[0..32]| by max.NaN, as a tree (5 dependent steps instead of 32).
__device__ __forceinline__ float hbm_amax_nan(const float *x) {
    float m[16];
#pragma unroll
    for (int i = 0; i < 16; i++) m[i] = hbm_max_nan(fabsf(x[2 * i]), fabsf(x[2 * i + 1]));
#pragma unroll
    for (int level = 0; level < 4; level++)
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (i < (8 >> level)) m[i] = hbm_max_nan(m[2 * i], m[2 * i + 1]);
    return hbm_max_nan(0.0f, m[0]);
}

__device__ __forceinline__ bool hbm_q8_0_fast_ok(const float *x, float *d, float *id) {
    const float amax = hbm_amax_nan(x);
    *d = __fdiv_rn(amax, 127.0f);
    *id = hbm_inverse(*d);
    return amax < __int_as_float(0x7f800000) && *id < __int_as_float(0x7f800000);
}

// Element j of a block for the quantizers: x[j], or with `halves` the fp16 element j of w[]
// (16 words, low half first) converted as it is used (exactly: no NaN there, fast paths only).
template <bool halves>
__device__ __forceinline__ float hbm_elem(const float *x, const u32 *w, int j) {
    return halves ? hbm_fp16_to_fp32_hw((u16)(w[j / 2] >> (16 * (j & 1)))) : x[j];
}

// Quantizes one Q8_0 block x[0..32] into its 34 bytes as 9 little-endian words (the last one's
// low half used): the fp16 scale, then the 32 quants. d and id from hbm_q8_0_fast_ok when fast,
// else recomputed with ggml's fold.
template <bool fast, bool halves = false>
__device__ __forceinline__ void hbm_quantize_q8_0(const float *x, const u32 *w, float d, float id,
                                                  u32 *bw) {
    if (!fast) {
        // ggml folds amax = MAX(amax, |x_j|) with MAX(a, b) = a > b ? a : b, in element order: a
        // NaN makes amax NaN and the next element replaces it. Same fold, same order.
        float amax = 0.0f;
#pragma unroll
        for (int j = 0; j < 32; j++) {
            const float a = fabsf(x[j]);
            amax = amax > a ? amax : a;
        }
        d = __fdiv_rn(amax, 127.0f);
        id = hbm_inverse(d);
    }
    // Quants 2p and 2p + 1 in the low bytes of pr[p]; block bytes 4k .. 4k + 3 are pairs 2k - 1
    // and 2k (the scale before pair 0).
    u32 pr[16];
#pragma unroll
    for (int p = 0; p < 16; p++) {
        u32 q[2];
#pragma unroll
        for (int m = 0; m < 2; m++) {
            const float v = __fmul_rn(hbm_elem<halves>(x, w, 2 * p + m), id);
            // Fast: |v| < 128, so the range check is not needed.
            q[m] = fast ? (u32)__float2int_rz(__fadd_rz(v, copysignf(0.5f, v))) : hbm_round_i8(v);
        }
        pr[p] = __byte_perm(q[0], q[1], 0x0040);
    }
    bw[0] = __byte_perm((u32)hbm_fp32_to_fp16(d), pr[0], 0x5410);
#pragma unroll
    for (int k = 1; k < 8; k++) bw[k] = __byte_perm(pr[2 * k - 1], pr[2 * k], 0x5410);
    bw[8] = pr[15] & 0xffffu;
}

// The fast path's scale for Q4_0: with no NaN and no infinity the largest magnitude is the plain
// maximum of |x| and max the first element of that magnitude (a NaN can never win ggml's fold);
// d zero or normal keeps |x*id| <= 8 up to rounding.
__device__ __forceinline__ bool hbm_q4_0_fast_ok(const float *x, float *d, float *id) {
    const float amax = hbm_amax_nan(x);
    // The first element of magnitude amax, as a tree: each node keeps its left child if that
    // one matches (then it is its range's first match), else its right child.
    float c[16];
#pragma unroll
    for (int i = 0; i < 16; i++) c[i] = fabsf(x[2 * i]) == amax ? x[2 * i] : x[2 * i + 1];
#pragma unroll
    for (int level = 0; level < 4; level++)
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (i < (8 >> level)) c[i] = fabsf(c[2 * i]) == amax ? c[2 * i] : c[2 * i + 1];
    float max = c[0];
    max = amax > 0.0f ? max : 0.0f;  // all zeros: ggml's max stays +0, whatever their signs
    *d = __fdiv_rn(max, -8.0f);
    *id = hbm_inverse(*d);
    return amax < __int_as_float(0x7f800000) && (*d == 0.0f || fabsf(*d) >= 1.17549435e-38f);
}

#if HBM_F16X2
// hbm_q8_0_fast_ok for a block of 32 halves (16 words, as loaded from an F16 source): amax by
// max.NaN over |x| in f16x2. The maximum of exact conversions is the conversion of the maximum,
// so amax, d and id are those of the converted floats; a NaN or an infinity still fails.
__device__ __forceinline__ bool hbm_q8_0_fast_ok_h(const u32 *w, float *d, float *id) {
    u32 m[8];
#pragma unroll
    for (int i = 0; i < 8; i++) m[i] = hbm_h2_max_nan(hbm_h2_abs(w[2 * i]), hbm_h2_abs(w[2 * i + 1]));
#pragma unroll
    for (int n = 4; n >= 1; n >>= 1)
#pragma unroll
        for (int i = 0; i < n; i++) m[i] = hbm_h2_max_nan(m[2 * i], m[2 * i + 1]);
    const float amax = hbm_h2_fold_max_nan(m[0]);
    *d = __fdiv_rn(amax, 127.0f);
    *id = hbm_inverse(*d);
    return amax < __int_as_float(0x7f800000) && *id < __int_as_float(0x7f800000);
}

// hbm_q4_0_fast_ok for a block of 32 halves: the signed maximum mx and minimum mn by max.NaN and
// min.NaN in f16x2 (a NaN makes both NaN, an infinity makes amax infinite: either fails). When
// mx > -mn every element of magnitude amax is +mx, so the first one is; when -mn > mx, it is
// mn. Only when both +amax and -amax occur does the first one need finding (a loop, rare).
__device__ __forceinline__ bool hbm_q4_0_fast_ok_h(const u32 *w, const u16 *hs, u32 sw,
                                                   float *d, float *id) {
    u32 hi[8], lo[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        hi[i] = hbm_h2_max_nan(w[2 * i], w[2 * i + 1]);
        lo[i] = hbm_h2_min_nan(w[2 * i], w[2 * i + 1]);
    }
#pragma unroll
    for (int n = 4; n >= 1; n >>= 1)
#pragma unroll
        for (int i = 0; i < n; i++) {
            hi[i] = hbm_h2_max_nan(hi[2 * i], hi[2 * i + 1]);
            lo[i] = hbm_h2_min_nan(lo[2 * i], lo[2 * i + 1]);
        }
    const float mx = hbm_h2_fold_max_nan(hi[0]), mn = hbm_h2_fold_min_nan(lo[0]);
    const float amax = hbm_max_nan(mx, -mn);
    float max = mx > -mn ? mx : mn;
    if (mx == -mn && amax > 0.0f) {
        // +amax and -amax both occur: the first element of magnitude amax, found by a loop over
        // the block's halves hs[] in the stage (a loop, so that the other lanes skip it).
#pragma unroll 1
        for (int j = 0; j < 32; j++) {
            // Half j is in float4 j / 8 of the block, swizzled by sw (0: not).
            const float x = hbm_fp16_to_fp32_hw(hs[sw ? (int)((((u32)j / 8) ^ sw) * 8 + j % 8) : j]);
            if (fabsf(x) == amax) {
                max = x;
                break;
            }
        }
    }
    max = amax > 0.0f ? max : 0.0f;  // all zeros: ggml's max stays +0, whatever their signs
    *d = __fdiv_rn(max, -8.0f);
    *id = hbm_inverse(*d);
    return amax < __int_as_float(0x7f800000) && (*d == 0.0f || fabsf(*d) >= 1.17549435e-38f);
}
#endif

// Quantizes one Q4_0 block into its 18 bytes as 5 little-endian words (the last one half used).
// Fast: x*id + 8.5f lies in [0, 17), (int8_t) of it is its floor, which adding 2^23 rounded
// toward zero leaves in the low bits, and MIN(15, .) works on those bits. General: the
// reference's steps.
template <bool fast, bool halves = false>
__device__ __forceinline__ void hbm_quantize_q4_0(const float *x, const u32 *w, float d, float id,
                                                  u32 *bw) {
    if (!fast) {
        // max is the first element of the largest magnitude, with its sign; a NaN never wins.
        float amax = 0.0f, max = 0.0f;
#pragma unroll
        for (int j = 0; j < 32; j++) {
            const float a = fabsf(x[j]);
            if (amax < a) {
                amax = a;
                max = x[j];
            }
        }
        d = __fdiv_rn(max, -8.0f);
        id = hbm_inverse(d);
    }
    u32 qw[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        u32 q[4], h4[4];
#pragma unroll
        for (int m = 0; m < 4; m++) {
            const int j = 4 * i + m;
            const float lo = __fadd_rn(__fmul_rn(hbm_elem<halves>(x, w, j), id), 8.5f);
            const float hi = __fadd_rn(__fmul_rn(hbm_elem<halves>(x, w, j + 16), id), 8.5f);
            if (fast) {
                // 2^23 + floor(t): floor(t) <= 16 in the low byte (packed below).
                q[m] = __float_as_uint(__fadd_rz(lo, 8388608.0f));
                h4[m] = __float_as_uint(__fadd_rz(hi, 8388608.0f));
            } else {
                // MIN(15, (int8_t)t) as int, stored as uint8_t.
                int l = hbm_c_float_to_i8(lo), h = hbm_c_float_to_i8(hi);
                l = l < 15 ? l : 15;
                h = h < 15 ? h : 15;
                q[m] = (((u32)l & 0xffu) | (((u32)h & 0xffu) << 4)) & 0xffu;
            }
        }
        if (fast) {
            // The four low bytes of each side packed, MIN(15, .) on every byte at once (a byte
            // of 16 loses 1, found at its bit 4), then low nibbles | high nibbles << 4.
            u32 l = hbm_bytes4(q[0], q[1], q[2], q[3]), h = hbm_bytes4(h4[0], h4[1], h4[2], h4[3]);
            l -= (l >> 4) & 0x01010101u;
            h -= (h >> 4) & 0x01010101u;
            qw[i] = l | (h << 4);
        } else {
            qw[i] = hbm_bytes4(q[0], q[1], q[2], q[3]);
        }
    }
    bw[0] = (u32)hbm_fp32_to_fp16(d) | (qw[0] << 16);
#pragma unroll
    for (int i = 1; i < 4; i++) bw[i] = hbm_shift16(qw[i - 1], qw[i]);
    bw[4] = qw[3] >> 16;
}

// Bytes per quantized block, and 4-byte words covering one.
template <int QT> struct hbm_quant {
    static const u32 bytes = QT == HBM_Q8_0 ? 34 : 18;
    static const int words = QT == HBM_Q8_0 ? 9 : 5;
};

// Where each lane's block sits in the stage, grouped in segments (runs of blocks of one row,
// contiguous in the tensor). Lane `lane` (< nb valid) has its block at tensor address `addr`,
// `k` blocks into its row. Returns the lane's stage byte offset; *starts gets the lanes that
// begin a segment. A segment is staged contiguously at the tensor's address modulo 4, 4 bytes
// after the previous one at most, so that the warp can move its body as aligned words.
__device__ __forceinline__ u32 hbm_segments(u32 bytes, u64 addr, u32 k, int lane, u32 nb,
                                            u32 *starts) {
    const u32 s = __ballot_sync(FULL_MASK, (u32)lane < nb && (lane == 0 || k == 0));
    *starts = s;
    const u32 seg = __popc(s & (FULL_MASK >> (31 - lane))) - 1;
    return bytes * lane + 4 * seg + ((u32)(addr - (u64)bytes * lane) & 3u);
}

// 16 bytes global -> shared without passing through registers (cp.async, sm_80 and later):
// the next tile's source loads stay in flight while the warp quantizes the current one.
__device__ __forceinline__ void hbm_cp_async16(void *smem, const void *gmem) {
#if __CUDA_ARCH__ >= 800
    const u32 s = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
#else
    *(uint4 *)smem = *(const uint4 *)gmem;
#endif
}

// 4 bytes global -> shared, the same way (cp.async.ca: 4-byte copies bypass no cache level).
__device__ __forceinline__ void hbm_cp_async4(void *smem, const void *gmem) {
#if __CUDA_ARCH__ >= 800
    const u32 s = (u32)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(s), "l"(gmem) : "memory");
#else
    *(u32 *)smem = *(const u32 *)gmem;
#endif
}

__device__ __forceinline__ void hbm_cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits for all but the newest group of this thread's copies.
__device__ __forceinline__ void hbm_cp_async_wait_prior() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group 1;" ::: "memory");
#endif
}

// Waits for all but the newest n groups of this thread's copies.
template <int n>
__device__ __forceinline__ void hbm_cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(n) : "memory");
#endif
}

// The warp copies every segment between the stage (byte offsets from hbm_segments) and the
// tensor: to the tensor when `store`, else from it. Bodies go as aligned words, up to `words`
// per lane in flight at once (loads with cp.async when `async`: the caller waits); the at
// most 3 bytes at each end one by one.
template <bool store, int words, bool async = false>
__device__ __forceinline__ void hbm_copy_segments(u8 *stage, u32 bytes, u64 addr, u32 off,
                                                  u32 starts, u32 nb, int lane) {
    while (starts) {
        const u32 js = __ffs(starts) - 1;
        starts &= starts - 1;
        const u32 je = starts ? __ffs(starts) - 1 : nb;
        const u64 a = __shfl_sync(FULL_MASK, addr, js);
        const u32 o = __shfl_sync(FULL_MASK, off, js);
        const u32 len = (je - js) * bytes;  // >= 18: longer than head and tail
        const u32 head = (u32)(0 - a) & 3u;
        const u32 nw = (len - head) / 4, tail = (len - head) & 3u;
        u8 *g = (u8 *)a;
        u8 *sh = stage + o;
        if ((u32)lane < head) {
            if (store) g[lane] = sh[lane];
            else sh[lane] = g[lane];
        }
        const u32 te = head + 4 * nw + lane;
        if ((u32)lane < tail) {
            if (store) g[te] = sh[te];
            else sh[te] = g[te];
        }
        u32 *gw = (u32 *)(g + head);
        u32 *sw = (u32 *)(sh + head);
        if (!store && async) {
            for (u32 i = lane; i < nw; i += 32) hbm_cp_async4(sw + i, gw + i);
        } else {
            for (u32 i0 = 0; i0 < nw; i0 += 32 * words) {
                u32 v[words];
#pragma unroll
                for (int m = 0; m < words; m++) {
                    const u32 i = i0 + 32 * m + lane;
                    if (i < nw) v[m] = store ? sw[i] : gw[i];
                }
#pragma unroll
                for (int m = 0; m < words; m++) {
                    const u32 i = i0 + 32 * m + lane;
                    if (i < nw) {
                        if (store) gw[i] = v[m];
                        else sw[i] = v[m];
                    }
                }
            }
        }
    }
}

// Starts copying a tile's source (16-byte aligned) into the stage: F32 as floats, block q at
// stage[q * 9]; F16 as F16, float4 m of block q at stage[hbm_f16_at<L>(q, m)] (the lanes
// convert). Element order kept.
template <int L>
__device__ __forceinline__ void hbm_stage_source(const void *src, bool f16, u64 b0, u32 nb,
                                                 int lane, float4 *stage) {
    if (!f16) {
        const float4 *s = (const float4 *)src + b0 * 8;
#pragma unroll
        for (int it = 0; it < 8; it++) {
            const u32 j = it * 32 + lane;
            if (j < nb * 8) hbm_cp_async16(stage + (j / 8) * 9 + j % 8, s + j);
        }
    } else {
        const uint4 *s = (const uint4 *)src + b0 * 4;
#pragma unroll
        for (int it = 0; it < 4; it++) {
            const u32 j = it * 32 + lane;
            if (j < nb * 4)
                hbm_cp_async16(L == 5 ? stage + (j / 4) * 5 + j % 4 : stage + hbm_f16_at<L>(j / 4, j % 4),
                               s + j);
        }
    }
}

// Stores the quantized blocks of a tile: lane `lane` (< nb valid) holds its block's bytes as
// little-endian words bw[] and its tensor address `addr`, `k` blocks into its row. The bytes go
// through the stage (free when called; free again on return). A tile of 32 blocks within one row
// whose run starts 16-byte aligned (rows of a multiple of 1024 elements, aligned tensors) is one
// run of 16-byte stores; any other tile goes by segments (hbm_segments, hbm_copy_segments).
template <int QT>
__device__ __forceinline__ void hbm_store_blocks(const u32 *bw, u64 addr, u32 k, int lane,
                                                 u32 nb, u8 *stage_b) {
    const u32 bytes = hbm_quant<QT>::bytes;
    u32 starts;
    const u32 off = hbm_segments(bytes, addr, k, lane, nb, &starts);
    const u64 a0 = __shfl_sync(FULL_MASK, addr, 0);
    __syncwarp();  // every lane has read its source before the bytes overwrite it
    if (nb == 32 && starts == 1u && (a0 & 15u) == 0) {
        // Block i at stage byte bytes * i (bytes is 2 mod 4: odd blocks start 2 bytes into a
        // word), written as aligned words and one halfword, the same instructions in every lane.
        const bool odd = lane & 1;
        u8 *o = stage_b + bytes * lane;
        const u32 sel = odd ? 0x5432u : 0x3210u;
        u32 *ow = (u32 *)(o + (odd ? 2 : 0));
#pragma unroll
        for (int i = 0; i < (int)bytes / 4; i++) ow[i] = __byte_perm(bw[i], bw[i + 1], sel);
        *(u16 *)(odd ? o : o + bytes - 2) = (u16)(odd ? bw[0] : bw[bytes / 4]);
        __syncwarp();
        const uint4 *s = (const uint4 *)stage_b;
        uint4 *g = (uint4 *)a0;
#pragma unroll
        for (int j = 0; j < (int)(bytes * 2 + 31) / 32; j++) {
            const u32 i = 32 * j + lane;
            if (i < bytes * 2) g[i] = s[i];
        }
    } else {
        if ((u32)lane < nb) {
            u8 *o = stage_b + off;
            if ((off & 3u) == 0) {
#pragma unroll
                for (int i = 0; i < (int)bytes / 4; i++) ((u32 *)o)[i] = bw[i];
                *(u16 *)(o + bytes - 2) = (u16)bw[bytes / 4];
            } else if ((off & 1u) == 0) {
                *(u16 *)o = (u16)bw[0];
#pragma unroll
                for (int i = 0; i < (int)bytes / 4; i++)
                    ((u32 *)(o + 2))[i] = hbm_shift16(bw[i], bw[i + 1]);
            } else {
#pragma unroll
                for (u32 i = 0; i < bytes; i++) o[i] = (u8)(bw[i / 4] >> (8 * (i % 4)));
            }
        }
        __syncwarp();
        hbm_copy_segments<true, hbm_quant<QT>::words>(stage_b, bytes, addr, off, starts, nb,
                                                       lane);
    }
    __syncwarp();  // the stage is free for the next tile
}

// Quantizes the staged tile of nb blocks (hbm_stage_source's layout L, or floats at stage[q * 9]
// when !f16) and stores it: each lane quantizes its block, which is `k` blocks into row r of the
// append. Leaves the stage free.
template <int QT, int L = 5>
__device__ __forceinline__ void hbm_quantize_tile(bool f16, u32 nb, int lane, u64 r, u32 k,
                                                  u8 *dst, u64 dst_row_stride,
                                                  const int *positions, i64 pos0,
                                                  float4 *stage) {
    const u32 bytes = hbm_quant<QT>::bytes;
    const uint4 *stage_q = (const uint4 *)stage;
    const bool valid = (u32)lane < nb;
    float d = 0.0f, id = 0.0f;
    bool ok = true;
    u32 bw[hbm_quant<QT>::words];
    bool done = false;
#if HBM_F16X2
    if (f16) {
        // F16 source: the scale from the halves themselves (f16x2), and on the fast path plain
        // conversions as the quantizer uses them. A block with a NaN or an infinity sends the
        // warp to the general path below, which reads the stage again.
        u32 w[16];
        if (valid) {
#pragma unroll
            for (int m = 0; m < 4; m++) {
                const uint4 v = stage_q[hbm_f16_at<L>(lane, m)];
                w[4 * m] = v.x; w[4 * m + 1] = v.y; w[4 * m + 2] = v.z; w[4 * m + 3] = v.w;
            }
            ok = QT == HBM_Q8_0 ? hbm_q8_0_fast_ok_h(w, &d, &id)
                                : hbm_q4_0_fast_ok_h(w, (const u16 *)(stage_q + lane * L),
                                                     L == 5 ? 0u : ((u32)lane >> 1) & 3u, &d, &id);
        }
        done = __all_sync(FULL_MASK, ok);
        if (done && valid) {
            // The halves again from the stage, rather than kept in registers across the scale.
            asm volatile("" ::: "memory");
#pragma unroll
            for (int m = 0; m < 4; m++) {
                const uint4 v = stage_q[hbm_f16_at<L>(lane, m)];
                w[4 * m] = v.x; w[4 * m + 1] = v.y; w[4 * m + 2] = v.z; w[4 * m + 3] = v.w;
            }
            if (QT == HBM_Q8_0) hbm_quantize_q8_0<true, true>(0, w, d, id, bw);
            else hbm_quantize_q4_0<true, true>(0, w, d, id, bw);
        }
    }
#endif
    if (!done) {
        float x[32];
        if (valid) {
            if (f16) {
#pragma unroll
                for (int m = 0; m < 4; m++)
                    hbm_f16x8_to_f32(stage_q[hbm_f16_at<L>(lane, m)], x + 8 * m);
            } else {
#pragma unroll
                for (int m = 0; m < 8; m++) {
                    const float4 v = stage[lane * 9 + m];
                    x[4 * m] = v.x; x[4 * m + 1] = v.y; x[4 * m + 2] = v.z; x[4 * m + 3] = v.w;
                }
            }
            ok = QT == HBM_Q8_0 ? hbm_q8_0_fast_ok(x, &d, &id) : hbm_q4_0_fast_ok(x, &d, &id);
        }
        const bool fast = __all_sync(FULL_MASK, ok);
        if (valid) {
            // Two instantiations: the fast loop carries nothing of the general one.
            if (QT == HBM_Q8_0 && fast) hbm_quantize_q8_0<true>(x, 0, d, id, bw);
            else if (QT == HBM_Q8_0) hbm_quantize_q8_0<false>(x, 0, d, id, bw);
            else if (fast) hbm_quantize_q4_0<true>(x, 0, d, id, bw);
            else hbm_quantize_q4_0<false>(x, 0, d, id, bw);
        }
    }
    u64 addr = 0;
    if (valid) {
        const i64 p = positions ? (i64)positions[r] : pos0 + (i64)r;
        addr = (u64)dst + (u64)p * dst_row_stride + (u64)k * bytes;
    }
    hbm_store_blocks<QT>(bw, addr, k, lane, nb, (u8 *)stage);
}

// Appends to a Q8_0 or Q4_0 tensor (QT), a tile of 32 blocks (1024 source elements, contiguous
// in src even across rows) per warp and step. With a 16-byte aligned source each warp has two
// stages: the next tile's source is copied into one (cp.async) while it quantizes from the other.
template <int QT>
__device__ __forceinline__ void hbm_append_quant(const void *src, int src_type, u8 *dst,
                                                 u64 dst_row_stride, u32 row_elems,
                                                 const int *positions, i64 pos0, u64 n_rows,
                                                 float4 *stage0, float4 *stage1) {
    const int lane = threadIdx.x & 31;
    const u32 bpr = row_elems / 32;
    const u64 nblocks = n_rows * bpr;
    const u64 ntiles = (nblocks + 31) / 32;
    const u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const u64 nwarps = (u64)gridDim.x * blockDim.x / 32;
    // Row and block of this lane's block (tile * 32 + lane), advanced a stride of tiles per step.
    hbm_rowpos at = hbm_rowpos_at(warp * 32 + lane, bpr, (u32)(nwarps * 32));
    if (hbm_aligned16(src)) {
        const bool f16 = src_type == HBM_F16;
        // The tile being quantized is at stage0 + HBM_STAGE * parity (stage1 follows stage0).
        u32 parity = 0;
        if (warp < ntiles) {
            const u64 b0 = warp * 32;
            hbm_stage_source<5>(src, f16, b0, (u32)(nblocks - b0 < 32 ? nblocks - b0 : 32), lane,
                             stage0);
        }
        hbm_cp_async_commit();
        for (u64 tile = warp; tile < ntiles; tile += nwarps) {
            const u64 b0 = tile * 32;
            const u32 nb = (u32)(nblocks - b0 < 32 ? nblocks - b0 : 32);
            const u64 b1 = b0 + nwarps * 32;
            if (b1 < nblocks)
                hbm_stage_source<5>(src, f16, b1, (u32)(nblocks - b1 < 32 ? nblocks - b1 : 32), lane,
                                 stage0 + HBM_STAGE * (parity ^ 1));
            hbm_cp_async_commit();  // possibly empty: one group per step either way
            hbm_cp_async_wait_prior();
            __syncwarp();  // every lane's copies of this tile have landed
            hbm_quantize_tile<QT>(f16, nb, lane, at.r, at.k, dst, dst_row_stride, positions,
                                  pos0, stage0 + HBM_STAGE * parity);
            at.next();
            parity ^= 1;
        }
    } else {
        float *stage_f = (float *)stage0;
        for (u64 tile = warp; tile < ntiles; tile += nwarps) {
            const u64 b0 = tile * 32;
            const u32 nb = (u32)(nblocks - b0 < 32 ? nblocks - b0 : 32);
            for (u32 j = lane; j < nb * 32; j += 32)
                stage_f[(j / 32) * 36 + j % 32] = hbm_load1(src, src_type, b0 * 32 + j);
            __syncwarp();
            hbm_quantize_tile<QT>(false, nb, lane, at.r, at.k, dst, dst_row_stride, positions,
                                  pos0, stage0);
            at.next();
        }
    }
}

// Appends from a 16-byte aligned F16 source to a Q8_0 or Q4_0 tensor (QT): hbm_append_quant's
// F16 path with deeper prefetch. A tile of halves is 2 KiB, half an F32 one, so two stages of
// one tile each left a warp a single 2 KiB tile loading while it quantized; here the two stages'
// 576 float4 hold HBM_F16_DEPTH tiles of 128 float4 (layout 4), HBM_F16_DEPTH - 1 loading
// while the warp quantizes one. A kernel of its own (hbm_kv_append_*_f16), so that the F32
// append keeps its code and registers.
#define HBM_F16_DEPTH 4
#define HBM_F16_SLOT 128
template <int QT>
__device__ __forceinline__ void hbm_append_quant_f16(const void *src, u8 *dst,
                                                     u64 dst_row_stride, u32 row_elems,
                                                     const int *positions, i64 pos0, u64 n_rows,
                                                     float4 *stage0) {
    const int lane = threadIdx.x & 31;
    const u32 bpr = row_elems / 32;
    const u64 nblocks = n_rows * bpr;
    const u64 ntiles = (nblocks + 31) / 32;
    const u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const u64 nwarps = (u64)gridDim.x * blockDim.x / 32;
    const u64 step = nwarps * 32;
    hbm_rowpos at = hbm_rowpos_at(warp * 32 + lane, bpr, (u32)step);
#pragma unroll
    for (int i = 0; i < HBM_F16_DEPTH - 1; i++) {
        const u64 b = warp * 32 + (u64)i * step;
        if (b < nblocks)
            hbm_stage_source<4>(src, true, b, (u32)(nblocks - b < 32 ? nblocks - b : 32), lane,
                                stage0 + HBM_F16_SLOT * i);
        hbm_cp_async_commit();  // possibly empty: one group per tile either way
    }
    // The tile being quantized is in slot `slot`; the one quantized last step is free.
    u32 slot = 0;
    for (u64 tile = warp; tile < ntiles; tile += nwarps) {
        const u64 b0 = tile * 32;
        const u32 nb = (u32)(nblocks - b0 < 32 ? nblocks - b0 : 32);
        const u64 bn = b0 + (u64)(HBM_F16_DEPTH - 1) * step;
        const u32 ns = slot == 0 ? HBM_F16_DEPTH - 1 : slot - 1;
        if (bn < nblocks)
            hbm_stage_source<4>(src, true, bn, (u32)(nblocks - bn < 32 ? nblocks - bn : 32), lane,
                                stage0 + HBM_F16_SLOT * ns);
        hbm_cp_async_commit();
        hbm_cp_async_wait<HBM_F16_DEPTH - 1>();
        __syncwarp();  // every lane's copies of this tile have landed
        hbm_quantize_tile<QT, 4>(true, nb, lane, at.r, at.k, dst, dst_row_stride, positions, pos0,
                                 stage0 + HBM_F16_SLOT * slot);
        at.next();
        slot = slot + 1 == HBM_F16_DEPTH ? 0 : slot + 1;
    }
}

// Starts loading the quantized bytes of a tile of nb blocks into the stage with cp.async (lane's
// block is `k` blocks into row r of the read); returns this lane's stage offset. A tile of 32
// blocks within one row whose run starts 16-byte aligned is one run of 16-byte copies (block i at
// stage byte bytes * i, which hbm_segments also gives); any other goes by segments.
template <int QT>
__device__ __forceinline__ u32 hbm_dequantize_fetch(const u8 *src, u64 src_row_stride, i64 row0,
                                                    const int *rows, u64 r, u32 k, u32 nb,
                                                    int lane, float4 *stage) {
    const u32 bytes = hbm_quant<QT>::bytes;
    u64 addr = 0;
    if ((u32)lane < nb)
        addr = (u64)src + (u64)hbm_row_at(rows, row0, r) * src_row_stride + (u64)k * bytes;
    u32 starts;
    const u32 off = hbm_segments(bytes, addr, k, lane, nb, &starts);
    const u64 a0 = __shfl_sync(FULL_MASK, addr, 0);
    if (nb == 32 && starts == 1u && (a0 & 15u) == 0) {
        const uint4 *g = (const uint4 *)a0;
#pragma unroll
        for (int j = 0; j < (int)(bytes * 2 + 31) / 32; j++) {
            const u32 i = 32 * j + lane;
            if (i < bytes * 2) hbm_cp_async16((uint4 *)stage + i, g + i);
        }
    } else {
        hbm_copy_segments<false, hbm_quant<QT>::words, true>((u8 *)stage, bytes, addr, off,
                                                             starts, nb, lane);
    }
    return off;
}

// The nw words of a staged quantized block at stage byte `off` (any offset modulo 4), aligned.
// An empty asm with a memory clobber before the loads keeps them where they are written (each
// path of hbm_dequantize_tile loads its own: the words are not live across the vote).
template <int nw>
__device__ __forceinline__ void hbm_block_words(const u32 *stage_w, u32 off, u32 *b) {
    asm volatile("" ::: "memory");
    u32 w[nw + 1];
#pragma unroll
    for (int i = 0; i <= nw; i++) w[i] = stage_w[off / 4 + i];
#pragma unroll
    for (int i = 0; i < nw; i++) b[i] = __funnelshift_r(w[i], w[i + 1], 8 * (off & 3u));
}

// Expands the staged tile of blocks b0 .. b0 + nb (lane's block at byte `off`) and writes its
// 1024 outputs (contiguous in dst) with 16-byte stores when dst allows. Leaves the stage free.
template <int QT>
__device__ __forceinline__ void hbm_dequantize_tile(u64 b0, u32 nb, u32 off, int lane, void *dst,
                                                    int dst_type, float4 *stage) {
    const bool vec = hbm_aligned16(dst);
    float *stage_f = (float *)stage;
    const u32 *stage_w = (const u32 *)stage;
    uint4 *stage_q = (uint4 *)stage;
    const bool valid = (u32)lane < nb;
    // The block's bytes as aligned words b[], whatever off is modulo 4 (read after the vote on
    // the scales: fewer registers live across it).
    const int nw = hbm_quant<QT>::words;
    bool finite = true;
    if (valid)
        finite = (__funnelshift_r(stage_w[off / 4], stage_w[off / 4 + 1], 8 * (off & 3u)) &
                  0x7c00u) != 0x7c00u;
#if HBM_F16X2
    const bool fast16 = dst_type == HBM_F16 && __all_sync(FULL_MASK, finite);
#else
    const bool fast16 = false;
#endif
    u32 b[nw];
    if (fast16) {
        // F16 output, every scale finite: f16x2 arithmetic. A quant q (|q| <= 128) times an fp16
        // d has at most 19 significant bits, so the F32 route's product q * d is exact, and that
        // rounded to fp16 is mul.rn.f16x2 of q and d, bit for bit (subnormals and overflow
        // included). q is exact in fp16 too: 0x64uu is 1024 + u, 0x54u0 is 64 + u (nibble u),
        // less 1024 + 128 (Q8_0's bytes flipped to u = q + 128) or 1024 + 8 and 64 + 8 (Q4_0).
        u32 h[16];
        if (valid) {
            hbm_block_words<nw>(stage_w, off, b);
            const u32 d2 = __byte_perm(b[0], 0, 0x1010);
            // Quants 2j and 2j + 1 are block bytes 2 + 2j and 3 + 2j: word (j + 1) / 2, bytes
            // 2-3 for even j, 0-1 for odd j; spread into the low bytes of two halves.
            if (QT == HBM_Q8_0) {
#pragma unroll
                for (int j = 0; j < 16; j++) {
                    const u32 q = __byte_perm(b[(j + 1) / 2] ^ 0x80808080u, 0x64646464u,
                                              (j & 1) ? 0x4140 : 0x4342);
                    h[j] = hbm_h2_mul(hbm_h2_add(q, 0xe480e480u), d2);
                }
            } else {
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    const u32 q = __byte_perm(b[(j + 1) / 2], 0, (j & 1) ? 0x4140 : 0x4342);
                    const u32 lo = (q & 0x000f000fu) | 0x64006400u;
                    const u32 hi = (q & 0x00f000f0u) | 0x54005400u;
                    h[j] = hbm_h2_mul(hbm_h2_add(lo, 0xe408e408u), d2);
                    h[j + 8] = hbm_h2_mul(hbm_h2_add(hi, 0xd480d480u), d2);
                }
            }
        }
        __syncwarp();  // every lane has read its bytes before the outputs overwrite them
        if (valid) {
#pragma unroll
            for (int m = 0; m < 4; m++)
                stage_q[lane * 5 + m] =
                    make_uint4(h[4 * m], h[4 * m + 1], h[4 * m + 2], h[4 * m + 3]);
        }
    } else {
        float v[32];
        if (valid) {
            hbm_block_words<nw>(stage_w, off, b);
            const float d = hbm_fp16_to_fp32((u16)(b[0] & 0xffffu));
            // A quant byte u becomes a float exactly: 0x4b0000uu is 2^23 + u, less 2^23 and the
            // offset (128 for Q8_0's signed bytes, flipped to u = q + 128; 8 for Q4_0's nibbles).
            if (QT == HBM_Q8_0) {
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    const u32 q = hbm_shift16(b[i], b[i + 1]) ^ 0x80808080u;
#pragma unroll
                    for (int m = 0; m < 4; m++) {
                        const float f = __uint_as_float(__byte_perm(q, 0x4b000000u, 0x7540 + m));
                        v[4 * i + m] = __fmul_rn(__fsub_rn(f, 8388736.0f), d);
                    }
                }
            } else {
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const u32 q = hbm_shift16(b[i], b[i + 1]);
                    const u32 lo = q & 0x0f0f0f0fu, hi = (q >> 4) & 0x0f0f0f0fu;
#pragma unroll
                    for (int m = 0; m < 4; m++) {
                        const float fl = __uint_as_float(__byte_perm(lo, 0x4b000000u, 0x7540 + m));
                        const float fh = __uint_as_float(__byte_perm(hi, 0x4b000000u, 0x7540 + m));
                        v[4 * i + m] = __fmul_rn(__fsub_rn(fl, 8388616.0f), d);
                        v[16 + 4 * i + m] = __fmul_rn(__fsub_rn(fh, 8388616.0f), d);
                    }
                }
            }
        }
        __syncwarp();  // every lane has read its bytes before the outputs overwrite them
        if (valid) {
            if (dst_type == HBM_F16) {
                // 32 halves = 4 uint4, blocks 5 uint4 apart (bank-conflict padding).
#pragma unroll
                for (int m = 0; m < 4; m++) stage_q[lane * 5 + m] = hbm_f32x8_to_f16(v + 8 * m);
            } else {
#pragma unroll
                for (int m = 0; m < 8; m++)
                    stage[lane * 9 + m] =
                        make_float4(v[4 * m], v[4 * m + 1], v[4 * m + 2], v[4 * m + 3]);
            }
        }
    }
    __syncwarp();
    // The tile's outputs are elements b0 * 32 .. (b0 + nb) * 32 of dst.
    if (vec && nb == 32 && dst_type == HBM_F16) {
        // A whole tile: 4 uint4 per block; uint4 j = lane + 32 t is block j / 4, part j % 4.
        uint4 *d = (uint4 *)dst + b0 * 4 + lane;
        const uint4 *s = stage_q + (lane / 4) * 5 + lane % 4;
#pragma unroll
        for (int t = 0; t < 4; t++) d[32 * t] = s[40 * t];
    } else if (vec && nb == 32) {
        float4 *d = (float4 *)dst + b0 * 8 + lane;
        const float4 *s = stage + (lane / 8) * 9 + lane % 8;
#pragma unroll
        for (int t = 0; t < 8; t++) d[32 * t] = s[36 * t];
    } else if (vec && dst_type == HBM_F16) {
        uint4 *d = (uint4 *)dst + b0 * 4;
        for (u32 j = lane; j < nb * 4; j += 32) d[j] = stage_q[(j / 4) * 5 + j % 4];
    } else if (vec) {
        float4 *d = (float4 *)dst + b0 * 8;
        for (u32 j = lane; j < nb * 8; j += 32) d[j] = stage[(j / 8) * 9 + j % 8];
    } else if (dst_type == HBM_F16) {
        const u16 *h = (const u16 *)stage_q;
        for (u32 j = lane; j < nb * 32; j += 32)
            ((u16 *)dst)[b0 * 32 + j] = h[(j / 32) * 40 + j % 32];
    } else {
        for (u32 j = lane; j < nb * 32; j += 32)
            ((float *)dst)[b0 * 32 + j] = stage_f[(j / 32) * 36 + j % 32];
    }
    __syncwarp();  // the stage is free for the next tile
}

// Dequantizes from a Q8_0 or Q4_0 tensor (QT), a tile of 32 blocks per warp and step, with two
// stages per warp: the next tile's bytes load (cp.async) while the warp expands the current one.
template <int QT>
__device__ __forceinline__ void hbm_dequantize_quant(const u8 *src, u64 src_row_stride, i64 row0,
                                                     const int *rows, u64 n_rows,
                                                     u32 row_elems, void *dst,
                                                     int dst_type, float4 *stage0,
                                                     float4 *stage1) {
    const int lane = threadIdx.x & 31;
    const u32 bpr = row_elems / 32;
    const u64 nblocks = n_rows * bpr;
    const u64 ntiles = (nblocks + 31) / 32;
    const u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const u64 nwarps = (u64)gridDim.x * blockDim.x / 32;
    // The tile being expanded is at stage0 + HBM_STAGE * parity (stage1 follows stage0).
    u32 parity = 0;
    // Row and block of this lane's block in the tile being fetched.
    hbm_rowpos at = hbm_rowpos_at(warp * 32 + lane, bpr, (u32)(nwarps * 32));
    u32 off = 0;
    if (warp < ntiles) {
        const u64 b0 = warp * 32;
        off = hbm_dequantize_fetch<QT>(src, src_row_stride, row0, rows, at.r, at.k,
                                       (u32)(nblocks - b0 < 32 ? nblocks - b0 : 32), lane,
                                       stage0);
    }
    hbm_cp_async_commit();
    for (u64 tile = warp; tile < ntiles; tile += nwarps) {
        const u64 b0 = tile * 32;
        const u32 nb = (u32)(nblocks - b0 < 32 ? nblocks - b0 : 32);
        const u64 b1 = b0 + nwarps * 32;
        u32 off1 = 0;
        at.next();
        if (b1 < nblocks)
            off1 = hbm_dequantize_fetch<QT>(src, src_row_stride, row0, rows, at.r, at.k,
                                            (u32)(nblocks - b1 < 32 ? nblocks - b1 : 32), lane,
                                            stage0 + HBM_STAGE * (parity ^ 1));
        hbm_cp_async_commit();  // possibly empty: one group per step either way
        hbm_cp_async_wait_prior();
        __syncwarp();  // every lane's copies (and single bytes) of this tile have landed
        hbm_dequantize_tile<QT>(b0, nb, off, lane, dst, dst_type, stage0 + HBM_STAGE * parity);
        off = off1;
        parity ^= 1;
    }
}

// Entry points. Appends n_rows token rows to a cache tensor:
//   src: n_rows * row_elems elements of src_type (F32 or F16), contiguous.
//   dst: the tensor's base; row p starts at dst + p * dst_row_stride.
//   positions: n_rows destination rows, or NULL for pos0, pos0 + 1, ...
// Dequantizes rows row0 .. row0 + n_rows of a cache tensor into dst (dst_type F32 or F16),
// row_elems elements per row, contiguous. The tensor's type is the kernel's (dst_type of the
// appends and src_type of the dequantizes are passed for the plain kernels, and checked by the
// quantized ones). Launched with HBM_THREADS threads per block; any grid.
#define HBM_APPEND_QUANT(name, QT, MIN_BLOCKS)                                              \
    extern "C" __global__ void __launch_bounds__(HBM_QUANT_THREADS, MIN_BLOCKS)             \
    name(const void *src, int src_type, void *dst, int dst_type, u64 dst_row_stride,      \
         int row_elems, const int *positions, i64 pos0, int n_rows) {                     \
        __shared__ float4 stage[HBM_QUANT_THREADS / 32][2][HBM_STAGE];             \
        if (dst_type != QT) return;                                                        \
        hbm_append_quant<QT>(src, src_type, (u8 *)dst, dst_row_stride, (u32)row_elems,    \
                             positions, pos0, (u64)n_rows, stage[threadIdx.x / 32][0],    \
                             stage[threadIdx.x / 32][1]);                                 \
    }
HBM_APPEND_QUANT(hbm_kv_append_q8_0, HBM_Q8_0, HBM_APPEND_Q8_0_MIN_BLOCKS)
HBM_APPEND_QUANT(hbm_kv_append_q4_0, HBM_Q4_0, HBM_APPEND_Q4_0_MIN_BLOCKS)

// Appends from an F16 source at a 16-byte aligned address (src_type must be F16; src/kernels.rs
// launches these only then). Register caps measured on an H200 (2-wave grids, 4 tiles per warp
// in the stages; this loop then inside the general append kernels): Q8_0 at 4 blocks per SM
// (128 registers; 0.89 of copy against 0.80 at 5), Q4_0 at 5 (96 registers, no spills; 0.76
// against 0.65 at 6, whose 80 spilled).
#ifndef HBM_APPEND_Q8_0_F16_MIN_BLOCKS
#define HBM_APPEND_Q8_0_F16_MIN_BLOCKS 4
#endif
#ifndef HBM_APPEND_Q4_0_F16_MIN_BLOCKS
#define HBM_APPEND_Q4_0_F16_MIN_BLOCKS 5
#endif
#define HBM_APPEND_QUANT_F16(name, QT, MIN_BLOCKS)                                          \
    extern "C" __global__ void __launch_bounds__(HBM_QUANT_THREADS, MIN_BLOCKS)             \
    name(const void *src, int src_type, void *dst, int dst_type, u64 dst_row_stride,      \
         int row_elems, const int *positions, i64 pos0, int n_rows) {                     \
        __shared__ float4 stage[HBM_QUANT_THREADS / 32][2][HBM_STAGE];                     \
        if (dst_type != QT || src_type != HBM_F16 || !hbm_aligned16(src)) __trap();        \
        hbm_append_quant_f16<QT>(src, (u8 *)dst, dst_row_stride, (u32)row_elems, positions, \
                                 pos0, (u64)n_rows, stage[threadIdx.x / 32][0]);          \
    }
HBM_APPEND_QUANT_F16(hbm_kv_append_q8_0_f16, HBM_Q8_0, HBM_APPEND_Q8_0_F16_MIN_BLOCKS)
HBM_APPEND_QUANT_F16(hbm_kv_append_q4_0_f16, HBM_Q4_0, HBM_APPEND_Q4_0_F16_MIN_BLOCKS)

#define HBM_DEQUANTIZE_QUANT(name, QT)                                                            \
    extern "C" __global__ void __launch_bounds__(HBM_QUANT_THREADS, HBM_DEQUANTIZE_QUANT_MIN_BLOCKS)             \
    name(const void *src, int src_type, u64 src_row_stride, i64 row0, int n_rows,               \
         int row_elems, void *dst, int dst_type) {                                               \
        __shared__ float4 stage[HBM_QUANT_THREADS / 32][2][HBM_STAGE];                           \
        if (src_type != QT) return;                                                              \
        hbm_dequantize_quant<QT>((const u8 *)src, src_row_stride, row0, 0, (u64)n_rows,         \
                                 (u32)row_elems, dst, dst_type, stage[threadIdx.x / 32][0],     \
                                 stage[threadIdx.x / 32][1]);                                   \
    }
HBM_DEQUANTIZE_QUANT(hbm_kv_dequantize_q8_0, HBM_Q8_0)
HBM_DEQUANTIZE_QUANT(hbm_kv_dequantize_q4_0, HBM_Q4_0)
