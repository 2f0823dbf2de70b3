// The drop-in siblings of cudaMalloc on a real GPU, under LD_PRELOAD=libhbmalloc.so:
//  - cudaMallocPitch and cudaMalloc3D are served by hbmalloc's pool (hbm_stats counts them),
//    with the pitch the runtime itself returns (compared with libcudart's own functions, found
//    with dlsym on its handle), and cudaMemcpy2D / cudaMemcpy3D round trips return the data;
//  - the same edge cases (zero width, height or depth) get the runtime's own answers;
//  - cuMemAlloc_v2 in the primary context is served by the pool and round-trips data with
//    cuMemcpyHtoD/DtoH; in a context the program created it goes to the driver (the pool does
//    not count it) and still works; cuMemFree of either goes where it belongs;
//  - cudaMallocArray, cudaMallocFromPoolAsync and cudaHostRegister are the runtime's, recorded:
//    each is one live allocation in hbm_leaks_since until freed.
// Prints one line per part and "pitch3d: ok" at the end; exits 1 on a wrong answer or data,
// 2 on a CUDA error.
#include <cuda.h>
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../include/hbmalloc.h"
#include "cuda_check.h"

#define CU_CHECK(x)                                                                \
    do {                                                                           \
        CUresult r_ = (x);                                                         \
        if (r_ != CUDA_SUCCESS) {                                                  \
            fprintf(stderr, "%s:%d %s: CUresult %d\n", __FILE__, __LINE__, #x,     \
                    (int)r_);                                                      \
            exit(2);                                                               \
        }                                                                          \
    } while (0)

static int failures;
#define EXPECT(cond, ...)                                                          \
    do {                                                                           \
        if (!(cond)) {                                                             \
            failures++;                                                            \
            fprintf(stderr, "pitch3d: FAIL %s:%d: ", __FILE__, __LINE__);          \
            fprintf(stderr, __VA_ARGS__);                                          \
            fputc('\n', stderr);                                                   \
        }                                                                          \
    } while (0)

typedef HbmStatus (*stats_fn)(int, HbmStats *);
typedef uint64_t (*checkpoint_fn)(void);
typedef HbmStatus (*leaks_fn)(uint64_t, uint64_t *, uint64_t *);
typedef cudaError_t (*pitch_fn)(void **, size_t *, size_t, size_t);
typedef cudaError_t (*malloc3d_fn)(cudaPitchedPtr *, cudaExtent);
typedef cudaError_t (*free_fn)(void *);
static stats_fn stats;
static checkpoint_fn checkpoint;
static leaks_fn leaks_since;
static pitch_fn real_pitch;
static malloc3d_fn real_3d;
static free_fn real_free;

template <typename F> static F sym(void *handle, const char *name) {
    void *p = dlsym(handle, name);
    if (p == NULL) {
        fprintf(stderr, "pitch3d: %s not found\n", name);
        exit(2);
    }
    F f;
    memcpy(&f, &p, sizeof p);
    return f;
}

static uint64_t allocs_now() {
    HbmStats s;
    if (stats(0, &s) != HBM_STATUS_OK) exit(2);
    return s.allocs;
}

static uint64_t live_since(uint64_t mark) {
    uint64_t bytes = 0, count = 0;
    if (leaks_since(mark, &bytes, &count) != HBM_STATUS_OK) exit(2);
    return count;
}

static void fill(unsigned char *p, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(i * 31u + seed);
}

static void pitched() {
    const size_t w = 1000, h = 37;
    uint64_t before = allocs_now();
    void *d = NULL, *e = NULL;
    size_t pitch = 0, pitch_e = 0;
    CHECK(cudaMallocPitch(&d, &pitch, w, h));
    CHECK(cudaMallocPitch(&e, &pitch_e, w, h));
    EXPECT(allocs_now() == before + 2, "hbmalloc did not serve cudaMallocPitch");
    void *r = NULL;
    size_t real = 0;
    CHECK(real_pitch(&r, &real, w, h));
    CHECK(real_free(r));
    EXPECT(pitch == real, "pitch %zu, the runtime's %zu", pitch, real);
    // A round trip: host -> pitched -> pitched -> host.
    unsigned char *src = (unsigned char *)malloc(w * h), *dst = (unsigned char *)calloc(w * h, 1);
    fill(src, w * h, 7);
    CHECK(cudaMemcpy2D(d, pitch, src, w, w, h, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy2D(e, pitch_e, d, pitch, w, h, cudaMemcpyDeviceToDevice));
    CHECK(cudaMemcpy2D(dst, w, e, pitch_e, w, h, cudaMemcpyDeviceToHost));
    EXPECT(memcmp(src, dst, w * h) == 0, "cudaMemcpy2D round trip differs");
    CHECK(cudaFree(d));
    CHECK(cudaFree(e));
    // Edge cases, ours against the runtime's.
    const size_t edges[][2] = {{0, 10}, {100, 0}, {1, 1}, {512, 3}, {513, 3}};
    for (auto &c : edges) {
        void *p = &p, *q = &q;
        size_t pp = 99, qp = 99;
        cudaError_t ours = cudaMallocPitch(&p, &pp, c[0], c[1]);
        cudaError_t theirs = real_pitch(&q, &qp, c[0], c[1]);
        EXPECT(ours == theirs && (p == NULL) == (q == NULL) && pp == qp,
               "cudaMallocPitch(%zu, %zu): ours %d %p pitch %zu, the runtime's %d %p pitch %zu",
               c[0], c[1], (int)ours, p, pp, (int)theirs, q, qp);
        if (ours == cudaSuccess && p) CHECK(cudaFree(p));
        if (theirs == cudaSuccess && q) CHECK(real_free(q));
        cudaGetLastError();
    }
    printf("pitch3d: cudaMallocPitch pitch %zu (runtime %zu), 2D round trip ok\n", pitch, real);
    free(src);
    free(dst);
}

static void three_d() {
    cudaExtent ext = make_cudaExtent(300, 17, 5);
    uint64_t before = allocs_now();
    cudaPitchedPtr d;
    CHECK(cudaMalloc3D(&d, ext));
    EXPECT(allocs_now() == before + 1, "hbmalloc did not serve cudaMalloc3D");
    cudaPitchedPtr r;
    CHECK(real_3d(&r, ext));
    CHECK(real_free(r.ptr));
    EXPECT(d.pitch == r.pitch && d.xsize == r.xsize && d.ysize == r.ysize,
           "cudaMalloc3D pitch %zu xsize %zu ysize %zu, the runtime's %zu %zu %zu", d.pitch,
           d.xsize, d.ysize, r.pitch, r.xsize, r.ysize);
    size_t n = ext.width * ext.height * ext.depth;
    unsigned char *src = (unsigned char *)malloc(n), *dst = (unsigned char *)calloc(n, 1);
    fill(src, n, 3);
    cudaMemcpy3DParms up = {};
    up.srcPtr = make_cudaPitchedPtr(src, ext.width, ext.width, ext.height);
    up.dstPtr = d;
    up.extent = ext;
    up.kind = cudaMemcpyHostToDevice;
    CHECK(cudaMemcpy3D(&up));
    cudaMemcpy3DParms down = {};
    down.srcPtr = d;
    down.dstPtr = make_cudaPitchedPtr(dst, ext.width, ext.width, ext.height);
    down.extent = ext;
    down.kind = cudaMemcpyDeviceToHost;
    CHECK(cudaMemcpy3D(&down));
    EXPECT(memcmp(src, dst, n) == 0, "cudaMemcpy3D round trip differs");
    CHECK(cudaFree(d.ptr));
    cudaExtent zero = make_cudaExtent(64, 64, 0);
    cudaPitchedPtr zo, zt;
    cudaError_t ours = cudaMalloc3D(&zo, zero), theirs = real_3d(&zt, zero);
    EXPECT(ours == theirs && (zo.ptr == NULL) == (zt.ptr == NULL),
           "cudaMalloc3D(depth 0): ours %d %p, the runtime's %d %p", (int)ours, zo.ptr,
           (int)theirs, zt.ptr);
    cudaGetLastError();
    printf("pitch3d: cudaMalloc3D pitch %zu (runtime %zu), 3D round trip ok\n", d.pitch, r.pitch);
    free(src);
    free(dst);
}

static void driver_api() {
    CHECK(cudaSetDevice(0));
    CHECK(cudaFree(0)); // the primary context, current
    const size_t n = 1 << 20;
    unsigned char *src = (unsigned char *)malloc(n), *dst = (unsigned char *)calloc(n, 1);
    fill(src, n, 11);
    uint64_t before = allocs_now();
    CUdeviceptr d = 0;
    CU_CHECK(cuMemAlloc(&d, n));
    EXPECT(allocs_now() == before + 1, "hbmalloc did not serve cuMemAlloc in the primary context");
    CU_CHECK(cuMemcpyHtoD(d, src, n));
    CU_CHECK(cuMemcpyDtoH(dst, d, n));
    EXPECT(memcmp(src, dst, n) == 0, "cuMemAlloc round trip differs");
    CU_CHECK(cuMemFree(d));
    EXPECT(cuMemFree(d) == CUDA_ERROR_INVALID_VALUE, "a double cuMemFree");
    EXPECT(cuMemAlloc(&d, 0) == CUDA_ERROR_INVALID_VALUE, "cuMemAlloc of 0 bytes");
    // A context of the program's own: the driver serves it, not the pool.
    CUdevice dev;
    CU_CHECK(cuDeviceGet(&dev, 0));
    CUcontext own, primary;
    CU_CHECK(cuCtxGetCurrent(&primary));
#if CUDA_VERSION >= 13000
    CU_CHECK(cuCtxCreate(&own, NULL, 0, dev));
#else
    CU_CHECK(cuCtxCreate(&own, 0, dev));
#endif
    before = allocs_now();
    CU_CHECK(cuMemAlloc(&d, n));
    EXPECT(allocs_now() == before, "cuMemAlloc in a created context must go to the driver");
    memset(dst, 0, n);
    CU_CHECK(cuMemcpyHtoD(d, src, n));
    CU_CHECK(cuMemcpyDtoH(dst, d, n));
    EXPECT(memcmp(src, dst, n) == 0, "round trip in the created context differs");
    CU_CHECK(cuMemFree(d)); // not ours: the real cuMemFree_v2
    CU_CHECK(cuCtxDestroy(own));
    CU_CHECK(cuCtxSetCurrent(primary));
    // Either API frees the other's blocks.
    void *p = NULL;
    CHECK(cudaMalloc(&p, 4096));
    CU_CHECK(cuMemFree((CUdeviceptr)(uintptr_t)p));
    CU_CHECK(cuMemAlloc(&d, 4096));
    CHECK(cudaFree((void *)(uintptr_t)d));
    printf("pitch3d: cuMemAlloc_v2 pooled in the primary context, forwarded in a created one\n");
    free(src);
    free(dst);
}

static void forwarded() {
    uint64_t mark = checkpoint();
    cudaChannelFormatDesc desc = cudaCreateChannelDesc<float>();
    cudaArray_t a;
    CHECK(cudaMallocArray(&a, &desc, 64, 64, 0));
    EXPECT(live_since(mark) == 1, "cudaMallocArray not recorded");
    CHECK(cudaFreeArray(a));
    EXPECT(live_since(mark) == 0, "cudaFreeArray left its record");
    cudaMemPool_t pool;
    CHECK(cudaDeviceGetDefaultMemPool(&pool, 0));
    void *p = NULL;
    CHECK(cudaMallocFromPoolAsync(&p, 1 << 20, pool, 0));
    EXPECT(live_since(mark) == 1, "cudaMallocFromPoolAsync not recorded");
    CHECK(cudaFreeAsync(p, 0));
    CHECK(cudaDeviceSynchronize());
    EXPECT(live_since(mark) == 0, "cudaFreeAsync of pool memory left its record");
    static char host[1 << 16];
    CHECK(cudaHostRegister(host, sizeof host, cudaHostRegisterDefault));
    EXPECT(live_since(mark) == 1, "cudaHostRegister not recorded");
    CHECK(cudaHostUnregister(host));
    EXPECT(live_since(mark) == 0, "cudaHostUnregister left its record");
    printf("pitch3d: arrays, pool memory and registered ranges recorded and released\n");
}

int main() {
    void *self = dlsym(RTLD_DEFAULT, "hbm_stats");
    if (self == NULL) {
        fprintf(stderr, "pitch3d: hbmalloc is not preloaded; this test would prove nothing\n");
        return 2;
    }
    stats = sym<stats_fn>(RTLD_DEFAULT, "hbm_stats");
    checkpoint = sym<checkpoint_fn>(RTLD_DEFAULT, "hbm_checkpoint");
    leaks_since = sym<leaks_fn>(RTLD_DEFAULT, "hbm_leaks_since");
    void *cudart = dlopen("libcudart.so.13", RTLD_NOLOAD | RTLD_LAZY);
    if (cudart == NULL) cudart = dlopen("libcudart.so.12", RTLD_NOLOAD | RTLD_LAZY);
    if (cudart == NULL) {
        fprintf(stderr, "pitch3d: build with -cudart shared\n");
        return 2;
    }
    real_pitch = sym<pitch_fn>(cudart, "cudaMallocPitch");
    real_3d = sym<malloc3d_fn>(cudart, "cudaMalloc3D");
    real_free = sym<free_fn>(cudart, "cudaFree");
    if ((void *)real_pitch == dlsym(RTLD_DEFAULT, "cudaMallocPitch")) {
        fprintf(stderr, "pitch3d: cudaMallocPitch is not interposed\n");
        return 2;
    }
    CU_CHECK(cuInit(0));
    pitched();
    three_d();
    driver_api();
    forwarded();
    if (failures) {
        printf("pitch3d: %d failures\n", failures);
        return 1;
    }
    printf("pitch3d: ok\n");
    return 0;
}
