/* The drop-in siblings of cudaMalloc, seen from an unmodified C program on the simulated device:
 * cudaMallocPitch and cudaMalloc3D (pooled), CUDA arrays and memory pools (the runtime's; the
 * simulated device has none), cudaHostRegister/cudaHostUnregister (recorded), and the driver
 * API's cuMemAlloc_v2/cuMemFree_v2 (pooled).
 *
 * Built against the real cuda_runtime.h and cuda.h and linked against the real libcudart.so.13;
 * run with
 *     LD_PRELOAD=libhbmalloc.so HBMALLOC_CONF=backend:sim,backtrace:off interpose_dropin
 * It stops at once unless hbmalloc's definitions shadow libcudart's. The driver functions are
 * found with dlsym(RTLD_DEFAULT), the global lookup that binds a program linked against libcuda
 * (no libcuda is needed to build or run this). It leaves one pitched block, one cuMemAlloc
 * block and one registered range behind on purpose, for the leak report at exit.
 *
 * It also shows the rule hbmalloc's own CUDA backend relies on: dlsym on a library's handle
 * finds that library's definition, never the preloaded one, so the backend (which finds the
 * driver's functions with dlsym on libcuda's handle) reaches the real driver. */
#define _GNU_SOURCE
#include <cuda.h>
#include <cuda_runtime.h>

#include "hbmalloc.h"

#include <dlfcn.h>
#include <inttypes.h>
#include <stdint.h>

#include "check.h"

typedef enum HbmStatus (*hbm_stats_fn)(int device, HbmStats *out_stats);
typedef CUresult (*cu_mem_alloc_fn)(CUdeviceptr *, size_t);
typedef CUresult (*cu_mem_free_fn)(CUdeviceptr);
static hbm_stats_fn hbm_stats_ptr;
static cu_mem_alloc_fn cu_mem_alloc;
static cu_mem_free_fn cu_mem_free;

static HbmStats stats_now(void) {
    HbmStats s;
    memset(&s, 0, sizeof s);
    REQUIRE(hbm_stats_ptr(0, &s) == HBM_STATUS_OK, "hbm_stats(0)");
    return s;
}

/* `name` as the program binds it is hbmalloc's; libcudart's own (found on its handle) differs. */
static void require_shadowed(void *cudart, const char *name) {
    void *bound = dlsym(RTLD_DEFAULT, name);
    Dl_info info;
    memset(&info, 0, sizeof info);
    REQUIRE(bound != NULL && dladdr(bound, &info) != 0 && info.dli_fname != NULL &&
                strstr(info.dli_fname, "libhbmalloc") != NULL,
            "%s is not hbmalloc's: run with LD_PRELOAD=libhbmalloc.so", name);
    if (cudart != NULL) {
        void *own = dlsym(cudart, name);
        REQUIRE(own != NULL && own != bound,
                "dlsym on libcudart's handle must find libcudart's %s (%p), not hbmalloc's (%p)",
                name, own, bound);
    }
}

static void prove_interposed(void) {
    void *sym = dlsym(RTLD_DEFAULT, "hbm_stats");
    REQUIRE(sym != NULL, "hbmalloc is not loaded (no hbm_stats in the process): run this test "
                         "with LD_PRELOAD=libhbmalloc.so");
    memcpy(&hbm_stats_ptr, &sym, sizeof sym);
    void *cudart = dlopen("libcudart.so.13", RTLD_NOLOAD | RTLD_LAZY);
    REQUIRE(cudart != NULL, "libcudart.so.13 is not loaded");
    const char *runtime_calls[] = {"cudaMallocPitch",         "cudaMalloc3D",
                                   "cudaMallocArray",         "cudaMalloc3DArray",
                                   "cudaFreeArray",           "cudaMallocFromPoolAsync",
                                   "cudaMemPoolImportPointer", "cudaHostRegister",
                                   "cudaHostUnregister"};
    for (size_t i = 0; i < sizeof runtime_calls / sizeof runtime_calls[0]; i++) {
        require_shadowed(cudart, runtime_calls[i]);
    }
    dlclose(cudart);
    require_shadowed(NULL, "cuMemAlloc_v2");
    require_shadowed(NULL, "cuMemFree_v2");
    sym = dlsym(RTLD_DEFAULT, "cuMemAlloc_v2");
    memcpy(&cu_mem_alloc, &sym, sizeof sym);
    sym = dlsym(RTLD_DEFAULT, "cuMemFree_v2");
    memcpy(&cu_mem_free, &sym, sizeof sym);
    printf("interposition proven: the drop-in calls are hbmalloc's\n");
}

static void pitched(void) {
    void *p = NULL;
    size_t pitch = 0;
    HbmStats before = stats_now();
    CHECK(cudaMallocPitch(&p, &pitch, 100, 3) == cudaSuccess, "cudaMallocPitch(100, 3)");
    CHECK(pitch == 512 && p != NULL && (uintptr_t)p % 512 == 0, "pitch %zu, p %p", pitch, p);
    HbmStats after = stats_now();
    CHECK(after.allocs == before.allocs + 1 && after.in_use >= before.in_use + 3 * 512,
          "hbmalloc's pool served cudaMallocPitch");
    memset(p, 0x5a, 3 * pitch); /* sim: device memory is host memory */
    CHECK(cudaFree(p) == cudaSuccess, "cudaFree of pitched memory");
    CHECK(stats_now().frees == after.frees + 1, "and the pool took it back");
    CHECK(cudaFree(p) == cudaErrorInvalidValue, "a second cudaFree");
    CHECK(cudaGetLastError() == cudaErrorInvalidValue, "reported once");

    CHECK(cudaMallocPitch(NULL, &pitch, 100, 3) == cudaErrorInvalidValue, "NULL devPtr");
    CHECK(cudaMallocPitch(&p, NULL, 100, 3) == cudaErrorInvalidValue, "NULL pitch");
    p = &p;
    CHECK(cudaMallocPitch(&p, &pitch, 100, 0) == cudaSuccess && p == NULL, "height 0");
    p = &p;
    CHECK(cudaMallocPitch(&p, &pitch, 0, 10) == cudaSuccess && p == NULL, "width 0");
    p = NULL;
    CHECK(cudaMallocPitch(&p, &pitch, SIZE_MAX, 1) == cudaErrorMemoryAllocation, "pitch overflow");
    CHECK(cudaMallocPitch(&p, &pitch, (size_t)1 << 40, (size_t)1 << 40) ==
              cudaErrorMemoryAllocation, "pitch * height overflow");
    CHECK(p == NULL, "untouched on failure");
    (void)cudaGetLastError();

    struct cudaPitchedPtr pp;
    memset(&pp, 0, sizeof pp);
    CHECK(cudaMalloc3D(&pp, make_cudaExtent(700, 2, 3)) == cudaSuccess, "cudaMalloc3D");
    CHECK(pp.ptr != NULL && pp.pitch == 1024 && pp.xsize == 700 && pp.ysize == 2,
          "cudaMalloc3D: %p pitch %zu xsize %zu ysize %zu", pp.ptr, pp.pitch, pp.xsize, pp.ysize);
    memset(pp.ptr, 0x3c, 6 * pp.pitch);
    CHECK(cudaFree(pp.ptr) == cudaSuccess, "cudaFree of 3D memory");
    CHECK(cudaMalloc3D(NULL, make_cudaExtent(1, 1, 1)) == cudaErrorInvalidValue, "NULL pitchedDevPtr");
    CHECK(cudaMalloc3D(&pp, make_cudaExtent(64, 64, 0)) == cudaSuccess && pp.ptr == NULL, "depth 0");
    CHECK(cudaMalloc3D(&pp, make_cudaExtent(512, SIZE_MAX, 2)) == cudaErrorMemoryAllocation,
          "height * depth overflow");
    (void)cudaGetLastError();
}

static void arrays_and_pools(void) {
    cudaArray_t a = NULL;
    struct cudaChannelFormatDesc desc = cudaCreateChannelDesc(32, 0, 0, 0, cudaChannelFormatKindFloat);
    CHECK(cudaMallocArray(&a, &desc, 64, 64, 0) == cudaErrorNotSupported, "no arrays on sim");
    CHECK(cudaMalloc3DArray(&a, &desc, make_cudaExtent(8, 8, 8), 0) == cudaErrorNotSupported,
          "no 3D arrays on sim");
    CHECK(cudaMallocArray(NULL, &desc, 64, 64, 0) == cudaErrorInvalidValue, "NULL array");
    CHECK(cudaFreeArray(NULL) == cudaSuccess, "cudaFreeArray(NULL)");
    CHECK(a == NULL, "no handle written");
    void *p = NULL;
    cudaMemPool_t pool = (cudaMemPool_t)(uintptr_t)0x1000;
    CHECK(cudaMallocFromPoolAsync(&p, 4096, pool, NULL) == cudaErrorNotSupported, "no pools on sim");
    CHECK(cudaMallocFromPoolAsync(NULL, 4096, pool, NULL) == cudaErrorInvalidValue, "NULL ptr");
    CHECK(p == NULL, "no pointer written");
    (void)cudaGetLastError();
}

static char registered[3][8192];

static void host_register(void) {
    CHECK(cudaHostRegister(registered[0], sizeof registered[0], cudaHostRegisterDefault) ==
              cudaSuccess, "cudaHostRegister");
    CHECK(cudaHostRegister(registered[0], sizeof registered[0], 0) ==
              cudaErrorHostMemoryAlreadyRegistered, "registered twice");
    CHECK(cudaHostRegister(NULL, 4096, 0) == cudaErrorInvalidValue, "NULL");
    CHECK(cudaHostRegister(registered[1], 0, 0) == cudaErrorInvalidValue, "size 0");
    CHECK(cudaHostRegister(registered[1], 4096, 0x100) == cudaErrorInvalidValue, "bad flags");
    char text[1024];
    capture c;
    capture_begin(&c);
    cudaError_t err = cudaFree(registered[0]);
    capture_end(&c, text, sizeof text);
    CHECK(err == cudaErrorInvalidValue, "cudaFree of a registered range = %d", (int)err);
    CHECK(strstr(text, "release it with cudaHostUnregister") != NULL,
          "cudaFree of a registered range printed \"%s\"", text);
    CHECK(cudaHostUnregister(registered[0]) == cudaSuccess, "cudaHostUnregister");
    CHECK(cudaHostUnregister(registered[0]) == cudaErrorHostMemoryNotRegistered, "twice");
    CHECK(cudaHostUnregister(registered[1]) == cudaErrorHostMemoryNotRegistered, "never registered");
    (void)cudaGetLastError();
}

static void driver_api(void) {
    CUdeviceptr d = 0;
    HbmStats before = stats_now();
    CHECK(cu_mem_alloc(&d, 1000) == CUDA_SUCCESS && d != 0 && d % 512 == 0, "cuMemAlloc_v2");
    CHECK(stats_now().allocs == before.allocs + 1, "hbmalloc's pool served cuMemAlloc_v2");
    memset((void *)(uintptr_t)d, 1, 1000);
    CHECK(cu_mem_free(d) == CUDA_SUCCESS, "cuMemFree_v2");
    CHECK(cu_mem_free(d) == CUDA_ERROR_INVALID_VALUE, "double cuMemFree_v2");
    CHECK(cu_mem_alloc(NULL, 16) == CUDA_ERROR_INVALID_VALUE, "NULL dptr");
    CHECK(cu_mem_alloc(&d, 0) == CUDA_ERROR_INVALID_VALUE, "bytesize 0");
    CHECK(cu_mem_alloc(&d, SIZE_MAX) == CUDA_ERROR_OUT_OF_MEMORY, "SIZE_MAX");
    CHECK(cu_mem_free(0x1000) == CUDA_ERROR_INVALID_VALUE, "a pointer never allocated");
    CHECK(cudaGetLastError() == cudaSuccess, "the driver API leaves the runtime's last error alone");
    /* Either API frees the other's memory, as with the real runtime and driver. */
    void *p = NULL;
    CHECK(cudaMalloc(&p, 4096) == cudaSuccess, "cudaMalloc");
    CHECK(cu_mem_free((CUdeviceptr)(uintptr_t)p) == CUDA_SUCCESS, "cuMemFree of cudaMalloc memory");
    CHECK(cu_mem_alloc(&d, 4096) == CUDA_SUCCESS, "cuMemAlloc_v2");
    CHECK(cudaFree((void *)(uintptr_t)d) == cudaSuccess, "cudaFree of cuMemAlloc memory");
}

/* Left allocated on purpose: the exit report must name each call. */
static void leak_on_purpose(void) {
    void *p = NULL;
    size_t pitch = 0;
    CUdeviceptr d = 0;
    REQUIRE(cudaMallocPitch(&p, &pitch, 1000, 2) == cudaSuccess, "cudaMallocPitch to leak");
    REQUIRE(cu_mem_alloc(&d, 3000) == CUDA_SUCCESS, "cuMemAlloc_v2 to leak");
    REQUIRE(cudaHostRegister(registered[2], sizeof registered[2], 0) == cudaSuccess,
            "cudaHostRegister to leak");
}

int main(void) {
    prove_interposed();
    pitched();
    arrays_and_pools();
    host_register();
    driver_api();
    leak_on_purpose();
    return check_summary("interpose_dropin");
}
