// Paged KV cache kernels: batched appends and gathers over many tensors in one launch, and a
// reference decode attention that reads K and V through a block table.
//
// Compiled by NVRTC after kernels/kv_quant.cu, as one module (src/kernels.rs, PAGED_MODULE): the
// per-tensor bodies and conversions used here are that file's, so the bytes written are exactly
// those of hbm_kv_append_* and hbm_kv_dequantize_* (and so the CPU reference's).
//
// Batched launches: a grid of (x, n_jobs); blockIdx.y picks a job from a device array of job
// descriptors and the x blocks run the per-tensor body over that job alone (its loops are
// grid-stride in x, so any x is correct). A decode step of every layer's K and V is one launch
// per pair of (source type, cache type): one launch when K and V have the same type.

// One tensor of a batched append: n_rows contiguous rows at src, row i to row positions[i] of
// the tensor at dst. The layout of AppendJob in src/backend/mod.rs.
struct hbm_append_job {
    u64 src;
    u64 dst;
    u64 positions;
    u64 dst_row_stride;
    u32 row_elems;
    u32 n_rows;
};

// One tensor of a batched gather: n_rows rows of the tensor at src into contiguous rows at dst,
// output row i from tensor row rows[i] (a device array of n_rows ints: the slots of the tokens,
// so one job covers a sequence's tokens across all its blocks), or from row i when rows is 0.
// The layout of GatherJob in src/backend/mod.rs.
struct hbm_gather_job {
    u64 src;
    u64 src_row_stride;
    u64 dst;
    u64 rows;
    u32 row_elems;
    u32 n_rows;
};

extern "C" __global__ void __launch_bounds__(HBM_THREADS, HBM_PLAIN_MIN_BLOCKS)
hbm_paged_append_plain(const hbm_append_job *jobs, int src_type, int dst_type) {
    const hbm_append_job j = jobs[blockIdx.y];
    hbm_append_plain_rows((const void *)j.src, src_type, (void *)j.dst, dst_type,
                          j.dst_row_stride, (int)j.row_elems, (const int *)j.positions, 0,
                          (int)j.n_rows);
}

#define HBM_PAGED_APPEND_QUANT(name, QT, MIN_BLOCKS)                                         \
    extern "C" __global__ void __launch_bounds__(HBM_QUANT_THREADS, MIN_BLOCKS)             \
    name(const hbm_append_job *jobs, int src_type, int dst_type) {                          \
        __shared__ float4 stage[HBM_QUANT_THREADS / 32][2][HBM_STAGE];                     \
        if (dst_type != QT) return;                                                        \
        const hbm_append_job j = jobs[blockIdx.y];                                          \
        hbm_append_quant<QT>((const void *)j.src, src_type, (u8 *)j.dst, j.dst_row_stride,  \
                             j.row_elems, (const int *)j.positions, 0, (u64)j.n_rows,       \
                             stage[threadIdx.x / 32][0], stage[threadIdx.x / 32][1]);      \
    }
HBM_PAGED_APPEND_QUANT(hbm_paged_append_q8_0, HBM_Q8_0, HBM_APPEND_Q8_0_MIN_BLOCKS)
HBM_PAGED_APPEND_QUANT(hbm_paged_append_q4_0, HBM_Q4_0, HBM_APPEND_Q4_0_MIN_BLOCKS)

// From F16 sources all 16-byte aligned (src/kernels.rs launches these only then).
#define HBM_PAGED_APPEND_QUANT_F16(name, QT, MIN_BLOCKS)                                     \
    extern "C" __global__ void __launch_bounds__(HBM_QUANT_THREADS, MIN_BLOCKS)             \
    name(const hbm_append_job *jobs, int src_type, int dst_type) {                          \
        __shared__ float4 stage[HBM_QUANT_THREADS / 32][2][HBM_STAGE];                     \
        const hbm_append_job j = jobs[blockIdx.y];                                          \
        if (dst_type != QT || src_type != HBM_F16 || !hbm_aligned16((const void *)j.src))   \
            __trap();                                                                      \
        hbm_append_quant_f16<QT>((const void *)j.src, (u8 *)j.dst, j.dst_row_stride,        \
                                 j.row_elems, (const int *)j.positions, 0, (u64)j.n_rows,   \
                                 stage[threadIdx.x / 32][0]);                              \
    }
HBM_PAGED_APPEND_QUANT_F16(hbm_paged_append_q8_0_f16, HBM_Q8_0, HBM_APPEND_Q8_0_F16_MIN_BLOCKS)
HBM_PAGED_APPEND_QUANT_F16(hbm_paged_append_q4_0_f16, HBM_Q4_0, HBM_APPEND_Q4_0_F16_MIN_BLOCKS)

extern "C" __global__ void __launch_bounds__(HBM_THREADS, HBM_PLAIN_MIN_BLOCKS)
hbm_paged_gather_plain(const hbm_gather_job *jobs, int src_type, int dst_type) {
    const hbm_gather_job j = jobs[blockIdx.y];
    hbm_dequantize_plain_rows((const void *)j.src, src_type, j.src_row_stride, 0,
                              (const int *)j.rows, (int)j.n_rows, (int)j.row_elems,
                              (void *)j.dst, dst_type);
}

#define HBM_PAGED_GATHER_QUANT(name, QT)                                                     \
    extern "C" __global__ void __launch_bounds__(HBM_QUANT_THREADS,                         \
                                                 HBM_DEQUANTIZE_QUANT_MIN_BLOCKS)           \
    name(const hbm_gather_job *jobs, int src_type, int dst_type) {                          \
        __shared__ float4 stage[HBM_QUANT_THREADS / 32][2][HBM_STAGE];                     \
        if (src_type != QT) return;                                                        \
        const hbm_gather_job j = jobs[blockIdx.y];                                          \
        hbm_dequantize_quant<QT>((const u8 *)j.src, j.src_row_stride, 0,                   \
                                 (const int *)j.rows, (u64)j.n_rows,                       \
                                 j.row_elems, (void *)j.dst, dst_type,                     \
                                 stage[threadIdx.x / 32][0], stage[threadIdx.x / 32][1]);  \
    }
HBM_PAGED_GATHER_QUANT(hbm_paged_gather_q8_0, HBM_Q8_0)
HBM_PAGED_GATHER_QUANT(hbm_paged_gather_q4_0, HBM_Q4_0)

// Reference decode attention over a paged cache: one query token per sequence, one block per
// (query head, sequence), HBM_ATTN_THREADS threads. Written for clarity, not speed: the scores
// of the whole sequence sit in dynamic shared memory (max_len floats after the query's
// head_dim_k), then softmax (max-subtracted, expf), then each thread sums V for its output
// elements. K and V are F32, F16 or BF16 (quantized caches: gather first).
//   q   f32 [n_seqs, n_heads, head_dim_k]; out f32 [n_seqs, n_heads, head_dim_v]
//   k, v: tensor bases, k_row / v_row bytes per token row (n_kv_heads heads one after another)
//   block_table int32 [.., table_stride]; table_rows[i]: the row of query i; lens[i]: its tokens
#define HBM_ATTN_THREADS 128

__device__ __forceinline__ float hbm_block_reduce(float x, bool is_max, float *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
    for (int o = 16; o > 0; o >>= 1) {
        const float y = __shfl_xor_sync(FULL_MASK, x, o);
        x = is_max ? fmaxf(x, y) : x + y;
    }
    __syncthreads();  // scratch free from any earlier reduction
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = scratch[0];
    for (int w = 1; w < HBM_ATTN_THREADS / 32; w++) x = is_max ? fmaxf(x, scratch[w]) : x + scratch[w];
    return x;
}

extern "C" __global__ void __launch_bounds__(HBM_ATTN_THREADS)
hbm_paged_decode_attention(const float *q, float *out, const void *k, const void *v, int kv_type,
                           u64 k_row, u64 v_row, const int *block_table, int table_stride,
                           const int *table_rows, const int *lens, int block_tokens,
                           int n_heads, int n_kv_heads, int head_dim_k, int head_dim_v,
                           float scale) {
    extern __shared__ float smem[];
    __shared__ float scratch[HBM_ATTN_THREADS / 32];
    const int h = blockIdx.x, s = blockIdx.y;
    const int kvh = h / (n_heads / n_kv_heads);
    const int len = lens[s];
    const int *table = block_table + (i64)table_rows[s] * table_stride;
    float *qs = smem;
    float *p = smem + head_dim_k;
    const float *qh = q + ((i64)s * n_heads + h) * head_dim_k;
    for (int d = threadIdx.x; d < head_dim_k; d += blockDim.x) qs[d] = qh[d];
    __syncthreads();
    const u32 es = hbm_esize(kv_type);
    float m = __int_as_float(0xff800000);  // -infinity
    for (int t = threadIdx.x; t < len; t += blockDim.x) {
        const i64 slot = (i64)table[t / block_tokens] * block_tokens + t % block_tokens;
        const u8 *row = (const u8 *)k + slot * k_row + (u64)kvh * head_dim_k * es;
        float dot = 0.0f;
        for (int d = 0; d < head_dim_k; d++) dot += qs[d] * hbm_load1(row, kv_type, d);
        p[t] = dot * scale;
        m = fmaxf(m, p[t]);
    }
    m = hbm_block_reduce(m, true, scratch);
    float l = 0.0f;
    for (int t = threadIdx.x; t < len; t += blockDim.x) {
        p[t] = expf(p[t] - m);
        l += p[t];
    }
    l = hbm_block_reduce(l, false, scratch);  // its barriers also publish every p[t]
    float *oh = out + ((i64)s * n_heads + h) * head_dim_v;
    for (int d = threadIdx.x; d < head_dim_v; d += blockDim.x) {
        float acc = 0.0f;
        for (int t = 0; t < len; t++) {
            const i64 slot = (i64)table[t / block_tokens] * block_tokens + t % block_tokens;
            const u8 *row = (const u8 *)v + slot * v_row + (u64)kvh * head_dim_v * es;
            acc += p[t] * hbm_load1(row, kv_type, d);
        }
        oh[d] = len > 0 ? acc / l : 0.0f;
    }
}
