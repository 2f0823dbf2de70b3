// One process under HBMALLOC_CONF=limit:...: cudaMemGetInfo must report the limit as the total,
// and cudaMalloc must give about the limit and then fail with cudaErrorMemoryAllocation (2).
// c_tests/gpu/limit_two_procs.sh runs two of these on one GPU at once, each with its own limit.
//
// Usage: limit_fill bytes N | fraction F   [READY_FILE RELEASE_FILE]
//   bytes N: the limit is N bytes; fraction F: F of the device's total memory.
//   With the two files: once full, create READY_FILE, then hold the memory until RELEASE_FILE
//   exists (at most 120 s), so that two processes hold their limits at the same time.
// Prints one line with the figures; exits 1 on a failed check, 2 if hbmalloc is not preloaded
// or a CUDA call fails.
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cuda_check.h"

#define MIB ((size_t)1 << 20)

static int failures = 0;
#define EXPECT(cond, ...)                                      \
    do {                                                       \
        if (!(cond)) {                                         \
            fprintf(stderr, "limit_fill: FAILED %s: ", #cond); \
            fprintf(stderr, __VA_ARGS__);                      \
            fprintf(stderr, "\n");                             \
            failures++;                                        \
        }                                                      \
    } while (0)

// Allocates `step`-byte blocks until cudaMalloc refuses; returns how many it got.
static int fill(void **held, int max, int n, size_t step, size_t *got) {
    for (; n < max; n++) {
        cudaError_t e = cudaMalloc(&held[n], step);
        if (e != cudaSuccess) {
            EXPECT(e == cudaErrorMemoryAllocation, "a refused cudaMalloc returned %d", (int)e);
            EXPECT(cudaGetLastError() == cudaErrorMemoryAllocation, "sticky error not 2");
            EXPECT(cudaGetLastError() == cudaSuccess, "the error was not cleared");
            break;
        }
        // Usable memory: a memset that reaches its last byte.
        CHECK(cudaMemset(held[n], 0x5a, step));
        *got += step;
    }
    return n;
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 5) {
        fprintf(stderr, "usage: limit_fill bytes N | fraction F [READY_FILE RELEASE_FILE]\n");
        return 2;
    }
    if (!dlsym(RTLD_DEFAULT, "hbm_stats")) {
        fprintf(stderr, "limit_fill: hbmalloc is not preloaded; this test would prove nothing\n");
        return 2;
    }
    // The device's real memory (cudaMemGetInfo is hbmalloc's answer; the properties are not).
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    size_t device_total = prop.totalGlobalMem;
    size_t limit;
    // The limit hbmalloc computes for a fraction, rounded down the same way.
    size_t slack = 0;
    if (strcmp(argv[1], "bytes") == 0) {
        limit = strtoull(argv[2], NULL, 10);
    } else if (strcmp(argv[1], "fraction") == 0) {
        limit = (size_t)((double)device_total * strtod(argv[2], NULL));
        // hbmalloc takes the device's total from cuMemGetInfo, which may differ from the
        // properties' total by a little.
        slack = 4 * MIB;
    } else {
        return 2;
    }

    size_t free0 = 0, total0 = 0;
    CHECK(cudaMemGetInfo(&free0, &total0));
    size_t diff = total0 > limit ? total0 - limit : limit - total0;
    EXPECT(diff <= slack, "cudaMemGetInfo total %zu, limit %zu", total0, limit);
    EXPECT(free0 <= total0, "free %zu above total %zu", free0, total0);

    // 256 MiB blocks, then 2 MiB ones to come close to the limit.
    enum { MAX = 1 << 16 };
    void **held = (void **)calloc(MAX, sizeof *held);
    size_t got = 0;
    int big = fill(held, MAX, 0, 256 * MIB, &got);
    int n = fill(held, MAX, big, 2 * MIB, &got);
    size_t free1 = 0, total1 = 0;
    CHECK(cudaMemGetInfo(&free1, &total1));

    EXPECT(got <= total0, "got %zu past the limit %zu", got, total0);
    // The caching pool may hold the remainder of a chunk it could not fill with 2 MiB blocks;
    // a few MiB below the limit is "about the limit".
    EXPECT(got + 64 * MIB >= total0, "got only %zu of the limit %zu", got, total0);
    EXPECT(free1 < 64 * MIB, "cudaMemGetInfo still says %zu free", free1);

    if (argc == 5) {
        FILE *f = fopen(argv[3], "w");
        if (f) fclose(f);
        for (int i = 0; i < 1200 && access(argv[4], F_OK) != 0; i++) usleep(100 * 1000);
    }
    CHECK(cudaDeviceSynchronize());
    for (int i = 0; i < n; i++) CHECK(cudaFree(held[i]));
    free(held);
    // Everything given back: the limit's worth is there again.
    void *p = NULL;
    EXPECT(cudaMalloc(&p, got / 2) == cudaSuccess, "half the limit after freeing everything");
    if (p) CHECK(cudaFree(p));

    printf("limit_fill: limit %zu MiB (device %zu MiB), cudaMemGetInfo total %zu MiB, got %zu MiB in %d "
           "allocations, then free %zu MiB: %s\n",
           limit / MIB, device_total / MIB, total0 / MIB, got / MIB, n, free1 / MIB,
           failures ? "FAILED" : "ok");
    return failures ? 1 : 0;
}
