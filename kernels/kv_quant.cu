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
// Threads (HBM_THREADS per block, grid-stride loops, so any grid is correct; the launcher sizes
// it to the work): F32/F16/BF16 rows take 8 elements per thread with 16-byte loads and stores
// when rows and pointers allow it, else one element per thread. Q8_0/Q4_0 take one whole
// 32-element block per thread, a warp staging 32 blocks through shared memory so that global
// accesses are coalesced (row_elems % 32 == 0; the launcher checks).

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
// Shared staging per warp: 32 quantized blocks of 32 floats, each padded to 36 floats (9 float4)
// so that lane i reading float4 j of block i, and lanes writing consecutive float4s, hit
// distinct banks. The same space holds a tile's quantized bytes (32 * 34) when those are staged.
#define HBM_STAGE (32 * 9)

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

__device__ __forceinline__ u32 hbm_pack2(u16 lo, u16 hi) { return (u32)lo | ((u32)hi << 16); }

// 8 consecutive source elements (F32 or F16) at element index i; 16-byte aligned.
__device__ __forceinline__ void hbm_load8(const void *src, int type, u64 i, float *x) {
    if (type == HBM_F16) {
        const uint4 v = *(const uint4 *)((const u16 *)src + i);
        const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            x[2 * j] = hbm_fp16_to_fp32((u16)(w[j] & 0xffffu));
            x[2 * j + 1] = hbm_fp16_to_fp32((u16)(w[j] >> 16));
        }
    } else {
        const float4 *s = (const float4 *)((const float *)src + i);
        const float4 a = s[0], b = s[1];
        x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
        x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
    }
}

// 8 consecutive F32, F16 or BF16 elements at element e of row; 16-byte aligned.
__device__ __forceinline__ void hbm_store8(u8 *row, int type, u64 e, const float *x) {
    if (type == HBM_F32) {
        float4 *d = (float4 *)((float *)row + e);
        d[0] = make_float4(x[0], x[1], x[2], x[3]);
        d[1] = make_float4(x[4], x[5], x[6], x[7]);
    } else {
        u32 w[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            w[j] = type == HBM_F16
                       ? hbm_pack2(hbm_fp32_to_fp16(x[2 * j]), hbm_fp32_to_fp16(x[2 * j + 1]))
                       : hbm_pack2(hbm_fp32_to_bf16(x[2 * j]), hbm_fp32_to_bf16(x[2 * j + 1]));
        }
        *(uint4 *)((u16 *)row + e) = make_uint4(w[0], w[1], w[2], w[3]);
    }
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

// Quantizes one Q8_0 block x[0..32] into 17 little-endian half-words: the fp16 scale, then the
// 32 quants two per half-word (ggml's quantize_row_q8_0_ref, step for step).
__device__ __forceinline__ void hbm_quantize_q8_0(const float *x, u16 *out) {
    // ggml folds amax = MAX(amax, |x_j|) with MAX(a, b) = a > b ? a : b, in element order: a NaN
    // makes amax NaN and the next element replaces it. Same fold, same order, same operands.
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 32; j++) {
        const float a = fabsf(x[j]);
        amax = amax > a ? amax : a;
    }
    const float d = __fdiv_rn(amax, 127.0f);
    const float id = hbm_inverse(d);
    out[0] = hbm_fp32_to_fp16(d);
#pragma unroll
    for (int j = 0; j < 16; j++) {
        const u32 q0 = (u32)hbm_c_float_to_i8(roundf(__fmul_rn(x[2 * j], id))) & 0xffu;
        const u32 q1 = (u32)hbm_c_float_to_i8(roundf(__fmul_rn(x[2 * j + 1], id))) & 0xffu;
        out[1 + j] = (u16)(q0 | (q1 << 8));
    }
}

// Quantizes one Q4_0 block into 9 half-words: the fp16 scale, then 16 bytes whose low nibble is
// element j and high nibble element j + 16 (ggml's quantize_row_q4_0_ref).
__device__ __forceinline__ void hbm_quantize_q4_0(const float *x, u16 *out) {
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
    const float d = __fdiv_rn(max, -8.0f);
    const float id = hbm_inverse(d);
    out[0] = hbm_fp32_to_fp16(d);
    u32 bytes[16];
#pragma unroll
    for (int j = 0; j < 16; j++) {
        // MIN(15, (int8_t)(x*id + 8.5f)) as int, stored as uint8_t: two roundings, no FMA.
        int lo = hbm_c_float_to_i8(__fadd_rn(__fmul_rn(x[j], id), 8.5f));
        int hi = hbm_c_float_to_i8(__fadd_rn(__fmul_rn(x[j + 16], id), 8.5f));
        lo = lo < 15 ? lo : 15;
        hi = hi < 15 ? hi : 15;
        bytes[j] = (((u32)lo & 0xffu) | (((u32)hi & 0xffu) << 4)) & 0xffu;
    }
#pragma unroll
    for (int j = 0; j < 8; j++) out[1 + j] = (u16)(bytes[2 * j] | (bytes[2 * j + 1] << 8));
}

// A quantized block's half-word at p: blocks are 34 or 18 bytes and strides even, so p is
// 2-byte aligned exactly when the tensor's base is; otherwise go byte by byte.
__device__ __forceinline__ void hbm_store_u16(u8 *p, u16 v, bool odd) {
    if (odd) {
        p[0] = (u8)(v & 0xffu);
        p[1] = (u8)(v >> 8);
    } else {
        *(u16 *)p = v;
    }
}

__device__ __forceinline__ u16 hbm_load_u16(const u8 *p, bool odd) {
    return odd ? (u16)(p[0] | ((u16)p[1] << 8)) : *(const u16 *)p;
}

// Appends to an F32, F16 or BF16 tensor. Vector path: each thread converts 8 elements with
// 16-byte loads and stores; needs rows of a multiple of 8 elements and 16-byte aligned source,
// tensor base and stride. Otherwise one element per thread.
__device__ void hbm_append_plain(const void *src, int src_type, u8 *dst, int dst_type,
                                 u64 dst_row_stride, u32 row_elems, const int *positions,
                                 i64 pos0, u64 n_rows) {
    const bool vec = row_elems % 8 == 0 && hbm_aligned16(src) && hbm_aligned16(dst) &&
                     dst_row_stride % 16 == 0;
    const u32 per = vec ? 8 : 1;
    const u32 units_per_row = row_elems / per;
    const u64 total = n_rows * units_per_row;
    const u64 step = (u64)gridDim.x * blockDim.x;
    for (u64 u = (u64)blockIdx.x * blockDim.x + threadIdx.x; u < total; u += step) {
        u64 r;
        u32 k;
        hbm_divmod(u, units_per_row, &r, &k);
        const u64 e = (u64)k * per;
        const i64 p = positions ? (i64)positions[r] : pos0 + (i64)r;
        u8 *row = dst + (u64)p * dst_row_stride;
        const u64 i = r * row_elems + e;
        if (vec) {
            float x[8];
            hbm_load8(src, src_type, i, x);
            hbm_store8(row, dst_type, e, x);
        } else {
            hbm_store1(row, dst_type, e, hbm_load1(src, src_type, i));
        }
    }
}

// Appends to a Q8_0 or Q4_0 tensor. Each warp takes tiles of 32 consecutive quantized blocks
// (1024 source elements, contiguous in src even across rows): it loads them coalesced into shared
// memory, each lane quantizes one whole block sequentially (the reference's order, no
// shuffles), the packed blocks go back to shared memory, and the warp stores them as
// half-words, consecutive lanes at consecutive addresses.
__device__ void hbm_append_quant(const void *src, int src_type, u8 *dst, int dst_type,
                                 u64 dst_row_stride, u32 row_elems, const int *positions,
                                 i64 pos0, u64 n_rows, float4 *stage) {
    const int lane = threadIdx.x & 31;
    const u32 bpr = row_elems / 32;
    const u32 halves = dst_type == HBM_Q8_0 ? 17 : 9;  // half-words per block
    const u64 nblocks = n_rows * bpr;
    const u64 ntiles = (nblocks + 31) / 32;
    const u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const u64 nwarps = (u64)gridDim.x * blockDim.x / 32;
    const bool vec = hbm_aligned16(src);
    const bool odd = ((u64)dst & 1u) != 0;
    float *stage_f = (float *)stage;
    u16 *stage_h = (u16 *)stage;
    for (u64 tile = warp; tile < ntiles; tile += nwarps) {
        const u64 b0 = tile * 32;
        const u32 nb = (u32)(nblocks - b0 < 32 ? nblocks - b0 : 32);
        // Stage the tile's source as floats: block q at stage[q * 9], element order kept.
        if (vec && src_type == HBM_F32) {
            const float4 *s = (const float4 *)src + b0 * 8;
            float4 v[8];
#pragma unroll
            for (int it = 0; it < 8; it++) {
                const u32 j = it * 32 + lane;
                if (j < nb * 8) v[it] = s[j];
            }
#pragma unroll
            for (int it = 0; it < 8; it++) {
                const u32 j = it * 32 + lane;
                if (j < nb * 8) stage[(j / 8) * 9 + j % 8] = v[it];
            }
        } else if (vec) {
            const uint4 *s = (const uint4 *)src + b0 * 4;
            uint4 v[4];
#pragma unroll
            for (int it = 0; it < 4; it++) {
                const u32 j = it * 32 + lane;
                if (j < nb * 4) v[it] = s[j];
            }
#pragma unroll
            for (int it = 0; it < 4; it++) {
                const u32 j = it * 32 + lane;
                if (j < nb * 4) {
                    const u32 w[4] = {v[it].x, v[it].y, v[it].z, v[it].w};
                    float x[8];
#pragma unroll
                    for (int m = 0; m < 4; m++) {
                        x[2 * m] = hbm_fp16_to_fp32((u16)(w[m] & 0xffffu));
                        x[2 * m + 1] = hbm_fp16_to_fp32((u16)(w[m] >> 16));
                    }
                    float4 *d = stage + (j / 4) * 9 + (j % 4) * 2;
                    d[0] = make_float4(x[0], x[1], x[2], x[3]);
                    d[1] = make_float4(x[4], x[5], x[6], x[7]);
                }
            }
        } else {
            for (u32 j = lane; j < nb * 32; j += 32)
                stage_f[(j / 32) * 36 + j % 32] = hbm_load1(src, src_type, b0 * 32 + j);
        }
        __syncwarp();
        // Lane i quantizes block b0 + i and finds where it goes.
        u16 out[17];
        u64 addr = 0;
        if ((u32)lane < nb) {
            float x[32];
#pragma unroll
            for (int m = 0; m < 8; m++) {
                const float4 v = stage[lane * 9 + m];
                x[4 * m] = v.x; x[4 * m + 1] = v.y; x[4 * m + 2] = v.z; x[4 * m + 3] = v.w;
            }
            if (dst_type == HBM_Q8_0) hbm_quantize_q8_0(x, out);
            else hbm_quantize_q4_0(x, out);
            u64 r;
            u32 k;
            hbm_divmod(b0 + lane, bpr, &r, &k);
            const i64 p = positions ? (i64)positions[r] : pos0 + (i64)r;
            addr = (u64)dst + (u64)p * dst_row_stride + (u64)k * (halves * 2);
        }
        __syncwarp();  // every lane has read its floats before the bytes overwrite them
        if ((u32)lane < nb) {
#pragma unroll
            for (int m = 0; m < 17; m++)
                if (m < (int)halves) stage_h[lane * halves + m] = out[m];
        }
        __syncwarp();
        // Half-word j of the tile belongs to block j / halves; its address comes from that lane.
        for (u32 it = 0; it < halves; it++) {
            const u32 j = it * 32 + lane;
            const u32 from = j / halves;
            const u64 a = __shfl_sync(FULL_MASK, addr, from < 32 ? from : 31);
            if (j < nb * halves) hbm_store_u16((u8 *)a + 2 * (j % halves), stage_h[j], odd);
        }
        __syncwarp();  // the stage is free for the next tile
    }
}

// Appends n_rows token rows to a cache tensor.
//   src: n_rows * row_elems elements of src_type (F32 or F16), contiguous.
//   dst: the tensor's base; row p starts at dst + p * dst_row_stride.
//   positions: n_rows destination rows, or NULL for pos0, pos0 + 1, ...
// Launched with HBM_THREADS threads per block; any grid (the loops are grid-stride).
extern "C" __global__ void __launch_bounds__(HBM_THREADS)
hbm_kv_append(const void *src, int src_type, void *dst, int dst_type, u64 dst_row_stride,
              int row_elems, const int *positions, i64 pos0, int n_rows) {
    __shared__ float4 stage[HBM_WARPS][HBM_STAGE];
    if (dst_type == HBM_Q8_0 || dst_type == HBM_Q4_0) {
        hbm_append_quant(src, src_type, (u8 *)dst, dst_type, dst_row_stride, (u32)row_elems,
                         positions, pos0, (u64)n_rows, stage[threadIdx.x / 32]);
    } else if (dst_type == HBM_F32 || dst_type == HBM_F16 || dst_type == HBM_BF16) {
        hbm_append_plain(src, src_type, (u8 *)dst, dst_type, dst_row_stride, (u32)row_elems,
                         positions, pos0, (u64)n_rows);
    }
}

// Dequantizes from an F32, F16 or BF16 tensor: 8 elements per thread with 16-byte accesses
// when rows are a multiple of 8 elements and source base, stride and destination are 16-byte
// aligned; otherwise one element per thread.
__device__ void hbm_dequantize_plain(const u8 *src, int src_type, u64 src_row_stride, i64 row0,
                                     u64 n_rows, u32 row_elems, void *dst, int dst_type) {
    const bool vec = row_elems % 8 == 0 && hbm_aligned16(src) && src_row_stride % 16 == 0 &&
                     hbm_aligned16(dst);
    const u32 per = vec ? 8 : 1;
    const u32 units_per_row = row_elems / per;
    const u64 total = n_rows * units_per_row;
    const u64 step = (u64)gridDim.x * blockDim.x;
    for (u64 u = (u64)blockIdx.x * blockDim.x + threadIdx.x; u < total; u += step) {
        u64 r;
        u32 k;
        hbm_divmod(u, units_per_row, &r, &k);
        const u64 e = (u64)k * per;
        const u8 *row = src + (u64)(row0 + (i64)r) * src_row_stride;
        const u64 i = r * row_elems + e;
        if (vec) {
            float x[8];
            if (src_type == HBM_F32) {
                hbm_load8(row, HBM_F32, e, x);
            } else {
                const uint4 v = *(const uint4 *)((const u16 *)row + e);
                const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const u16 lo = (u16)(w[j] & 0xffffu), hi = (u16)(w[j] >> 16);
                    x[2 * j] = src_type == HBM_F16 ? hbm_fp16_to_fp32(lo) : hbm_bf16_to_fp32(lo);
                    x[2 * j + 1] =
                        src_type == HBM_F16 ? hbm_fp16_to_fp32(hi) : hbm_bf16_to_fp32(hi);
                }
            }
            hbm_store8((u8 *)dst, dst_type, i, x);
        } else {
            hbm_store1(dst, dst_type, i, hbm_load1(row, src_type, e));
        }
    }
}

// Dequantizes from a Q8_0 or Q4_0 tensor. Each warp takes tiles of 32 consecutive blocks: it
// loads their bytes as half-words into shared memory (consecutive lanes, consecutive
// addresses), each lane expands one block, and the warp writes the tile's 1024 outputs
// (contiguous in dst) with 16-byte stores.
__device__ void hbm_dequantize_quant(const u8 *src, int src_type, u64 src_row_stride, i64 row0,
                                     u64 n_rows, u32 row_elems, void *dst, int dst_type,
                                     float4 *stage) {
    const int lane = threadIdx.x & 31;
    const u32 bpr = row_elems / 32;
    const u32 halves = src_type == HBM_Q8_0 ? 17 : 9;
    const u64 nblocks = n_rows * bpr;
    const u64 ntiles = (nblocks + 31) / 32;
    const u64 warp = ((u64)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const u64 nwarps = (u64)gridDim.x * blockDim.x / 32;
    const bool vec = hbm_aligned16(dst);
    const bool odd = ((u64)src & 1u) != 0;
    float *stage_f = (float *)stage;
    u16 *stage_h = (u16 *)stage;
    uint4 *stage_q = (uint4 *)stage;
    for (u64 tile = warp; tile < ntiles; tile += nwarps) {
        const u64 b0 = tile * 32;
        const u32 nb = (u32)(nblocks - b0 < 32 ? nblocks - b0 : 32);
        u64 addr = 0;
        if ((u32)lane < nb) {
            u64 r;
            u32 k;
            hbm_divmod(b0 + lane, bpr, &r, &k);
            addr = (u64)src + (u64)(row0 + (i64)r) * src_row_stride + (u64)k * (halves * 2);
        }
        for (u32 it = 0; it < halves; it++) {
            const u32 j = it * 32 + lane;
            const u32 from = j / halves;
            const u64 a = __shfl_sync(FULL_MASK, addr, from < 32 ? from : 31);
            if (j < nb * halves) stage_h[j] = hbm_load_u16((const u8 *)a + 2 * (j % halves), odd);
        }
        __syncwarp();
        float v[32];
        if ((u32)lane < nb) {
            u16 in[17];
#pragma unroll
            for (int m = 0; m < 17; m++)
                if (m < (int)halves) in[m] = stage_h[lane * halves + m];
            const float d = hbm_fp16_to_fp32(in[0]);
            if (src_type == HBM_Q8_0) {
#pragma unroll
                for (int j = 0; j < 32; j++) {
                    const u32 q = (in[1 + j / 2] >> (8 * (j % 2))) & 0xffu;
                    v[j] = __fmul_rn((float)(signed char)q, d);
                }
            } else {
#pragma unroll
                for (int j = 0; j < 16; j++) {
                    const u32 byte = (in[1 + j / 2] >> (8 * (j % 2))) & 0xffu;
                    v[j] = __fmul_rn((float)((int)(byte & 0x0fu) - 8), d);
                    v[j + 16] = __fmul_rn((float)((int)(byte >> 4) - 8), d);
                }
            }
        }
        __syncwarp();  // every lane has read its bytes before the outputs overwrite them
        if ((u32)lane < nb) {
            if (dst_type == HBM_F16) {
                // 32 halves = 4 uint4, blocks 5 uint4 apart (bank-conflict padding).
#pragma unroll
                for (int m = 0; m < 4; m++) {
                    u32 w[4];
#pragma unroll
                    for (int n = 0; n < 4; n++)
                        w[n] = hbm_pack2(hbm_fp32_to_fp16(v[8 * m + 2 * n]),
                                         hbm_fp32_to_fp16(v[8 * m + 2 * n + 1]));
                    stage_q[lane * 5 + m] = make_uint4(w[0], w[1], w[2], w[3]);
                }
            } else {
#pragma unroll
                for (int m = 0; m < 8; m++)
                    stage[lane * 9 + m] =
                        make_float4(v[4 * m], v[4 * m + 1], v[4 * m + 2], v[4 * m + 3]);
            }
        }
        __syncwarp();
        // The tile's outputs are elements b0 * 32 .. (b0 + nb) * 32 of dst.
        if (vec && dst_type == HBM_F16) {
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
}

// Dequantizes rows row0 .. row0 + n_rows of a cache tensor into dst (dst_type F32 or F16),
// row_elems elements per row, contiguous. Launched like hbm_kv_append.
extern "C" __global__ void __launch_bounds__(HBM_THREADS)
hbm_kv_dequantize(const void *src, int src_type, u64 src_row_stride, i64 row0, int n_rows,
                  int row_elems, void *dst, int dst_type) {
    __shared__ float4 stage[HBM_WARPS][HBM_STAGE];
    if (src_type == HBM_Q8_0 || src_type == HBM_Q4_0) {
        hbm_dequantize_quant((const u8 *)src, src_type, src_row_stride, row0, (u64)n_rows,
                             (u32)row_elems, dst, dst_type, stage[threadIdx.x / 32]);
    } else if (src_type == HBM_F32 || src_type == HBM_F16 || src_type == HBM_BF16) {
        hbm_dequantize_plain((const u8 *)src, src_type, src_row_stride, row0, (u64)n_rows,
                             (u32)row_elems, dst, dst_type);
    }
}
