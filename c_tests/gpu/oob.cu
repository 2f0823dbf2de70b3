// compute-sanitizer must see a pool block as the allocation it stands for. A kernel writes one
// float past the end of a 1000-float block (built with -DOOB_CLEAN: exactly the 1000 floats, the
// clean twin). A second block is taken after the first, so that under hbmalloc the stray write
// lands inside memory the pool holds, where only NVTX regions let memcheck see it. Run it under
// `compute-sanitizer --tool memcheck`, plain and with LD_PRELOAD=libhbmalloc.so: the planted one
// must report one invalid write, the clean one 0 errors (scripts/gpu-check.sh, `sanitizer`).
//
// argv[1], where the block comes from: `cudaMalloc` (the default; plain or preloaded), or, with
// hbmalloc only, `pool-legacy` / `pool-vmm` (hbm_pool_alloc of 4000 bytes), `kv-prealloc` /
// `kv-vmm` (sequence 0's K rows of a KV cache whose row is 1000 floats and whose sequences hold
// one token; the stray write lands in sequence 1's slot, allocated or committed but unbound).
// OOB_EXPECT=hbmalloc or plain: exits 2 unless hbmalloc is (or is not) preloaded, so a run that
// proves nothing cannot pass.
#include <dlfcn.h>
#include <string.h>

#include "cuda_check.h"
#include "hbmalloc.h"

#define N 1000

__global__ void fill(float *p, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = 1.0f + i;
}

// The hbm_* API, found in the preloaded library (this program links only the runtime; decltype
// names each function's type without referencing the symbol).
template <typename F> static F api(const char *name) {
    F f = (F)dlsym(RTLD_DEFAULT, name);
    if (!f) {
        fprintf(stderr, "oob: %s not found\n", name);
        exit(2);
    }
    return f;
}
#define API(name) api<decltype(&name)>(#name)
#define HBM(x)                                                          \
    do {                                                                \
        HbmStatus s_ = (x);                                             \
        if (s_ != HBM_STATUS_OK) {                                      \
            fprintf(stderr, "%s:%d %s: status %d\n", __FILE__, __LINE__, #x, (int)s_); \
            exit(2);                                                    \
        }                                                               \
    } while (0)

int main(int argc, char **argv) {
    const char *target = argc > 1 ? argv[1] : "cudaMalloc";
    const char *expect = getenv("OOB_EXPECT");
    bool preloaded = dlsym(RTLD_DEFAULT, "hbm_version") != NULL;
    if (!expect || (strcmp(expect, "hbmalloc") == 0) != preloaded ||
        (strcmp(target, "cudaMalloc") != 0 && !preloaded)) {
        fprintf(stderr, "oob: OOB_EXPECT=%s, target %s, but hbmalloc is %spreloaded\n",
                expect ? expect : "(unset)", target, preloaded ? "" : "not ");
        return 2;
    }
    float *a = NULL, *b = NULL;
    HbmPool *pool = NULL;
    HbmKvCache *kv = NULL;
    size_t actual_a = 0, actual_b = 0;
    if (strcmp(target, "cudaMalloc") == 0) {
        CHECK(cudaMalloc(&a, N * sizeof(float)));
        CHECK(cudaMalloc(&b, N * sizeof(float)));
    } else if (strncmp(target, "pool-", 5) == 0) {
        int kind = strcmp(target, "pool-vmm") == 0 ? HBM_POOL_KIND_VMM : HBM_POOL_KIND_LEGACY;
        HBM(API(hbm_pool_create)(0, kind, NULL, &pool));
        HBM(API(hbm_pool_alloc)(pool, N * sizeof(float), (void **)&a, &actual_a));
        HBM(API(hbm_pool_alloc)(pool, N * sizeof(float), (void **)&b, &actual_b));
    } else if (strncmp(target, "kv-", 3) == 0) {
        HbmKvParams p;
        memset(&p, 0, sizeof p);
        p.n_layer = 1;
        p.n_head_kv = 1;
        p.head_dim = N;
        p.n_ctx_max = 1;
        p.n_seq_max = 2;
        p.type_k = p.type_v = HBM_TYPE_F32;
        p.device = 0;
        p.growth = strcmp(target, "kv-vmm") == 0 ? HBM_KV_GROWTH_VMM : HBM_KV_GROWTH_PREALLOC;
        HBM(API(hbm_kv_cache_create)(&p, &kv));
        HBM(API(hbm_kv_cache_reserve)(kv, 0, 1));
        size_t sk, sv;
        HBM(API(hbm_kv_cache_layer)(kv, 0, 0, (void **)&a, (void **)&b, &sk, &sv));
    } else {
        fprintf(stderr, "oob: unknown target %s\n", target);
        return 2;
    }
#ifdef OOB_CLEAN
    const int n = N;
#else
    const int n = N + 1;
#endif
    fill<<<(n + 255) / 256, 256>>>(a, n);
    fill<<<(N + 255) / 256, 256>>>(b, N);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    static float h[N];
    CHECK(cudaMemcpy(h, a, sizeof h, cudaMemcpyDeviceToHost));
    for (int i = 0; i < N; i++) {
        if (h[i] != 1.0f + i) {
            fprintf(stderr, "oob: a[%d] = %g\n", i, h[i]);
            return 1;
        }
    }
    if (pool) {
        HBM(API(hbm_pool_free)(pool, a, actual_a));
        HBM(API(hbm_pool_free)(pool, b, actual_b));
        API(hbm_pool_destroy)(pool);
    } else if (kv) {
        API(hbm_kv_cache_destroy)(kv);
    } else {
        CHECK(cudaFree(a));
        CHECK(cudaFree(b));
    }
    printf("oob: %s, %s, %d floats written into a %d-float block, a=%p b=%p\n",
           preloaded ? "hbmalloc" : "plain", target, n, N, (void *)a, (void *)b);
    return 0;
}
