// Stream safety of cudaFreeHost under hbmalloc: a copy from pinned block A to the device is still
// queued (behind a long kernel) when cudaFreeHost(A) returns; the next cudaMallocHost of the same
// size, B, is then filled on the CPU. If the pool handed A out again before the copy ran, the
// copy reads B's bytes and the device gets the wrong data. (The runtime's own cudaFreeHost
// synchronizes, so this never happens without hbmalloc.)
//
// Run under LD_PRELOAD=libhbmalloc.so. Prints "pinned_safety: runs=8 reused=<n> corrupt=<n>"
// (reused: how many runs got B == A) and exits 1 when the device got corrupt data, 2 on a CUDA
// error. With HBMALLOC_CONF=stream_safety:off it is expected to fail (the test can).
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_check.h"

// Spins for about `cycles` clock cycles: holds the stream so the copy queued after it waits.
__global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {
    }
}

int main() {
    if (!dlsym(RTLD_DEFAULT, "hbm_version")) {
        fprintf(stderr, "pinned_safety: hbmalloc is not preloaded; this test would prove nothing\n");
        return 2;
    }
    const size_t n = 64 << 20;
    const int runs = 8;
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    unsigned char *dev = NULL;
    CHECK(cudaMalloc(&dev, n));
    unsigned char *check = (unsigned char *)malloc(n);
    if (check == NULL) {
        fprintf(stderr, "pinned_safety: malloc failed\n");
        return 2;
    }
    int corrupt_runs = 0, reused_runs = 0;
    for (int run = 0; run < runs; run++) {
        unsigned char *a = NULL, *b = NULL;
        CHECK(cudaMallocHost((void **)&a, n));
        memset(a, 0x11, n);
        CHECK(cudaMemsetAsync(dev, 0, n, s));  // on `s`: ordered before the copy
        spin<<<1, 1, 0, s>>>(200LL * 1000 * 1000);  // ~100 ms at 2 GHz
        CHECK(cudaGetLastError());
        CHECK(cudaMemcpyAsync(dev, a, n, cudaMemcpyHostToDevice, s));
        CHECK(cudaFreeHost(a));  // the copy has not run yet: the kernel ahead of it still spins
        CHECK(cudaMallocHost((void **)&b, n));
        reused_runs += (a == b);
        memset(b, 0x22, n);  // ~10 ms: done long before the kernel ends
        CHECK(cudaStreamSynchronize(s));
        CHECK(cudaMemcpy(check, dev, n, cudaMemcpyDeviceToHost));
        size_t bad = 0;
        for (size_t i = 0; i < n; i++) bad += check[i] != 0x11;
        corrupt_runs += bad != 0;
        CHECK(cudaFreeHost(b));
    }
    printf("pinned_safety: runs=%d reused=%d corrupt=%d (B==A in %d of %d runs)\n", runs,
           reused_runs, corrupt_runs, reused_runs, runs);
    free(check);
    CHECK(cudaFree(dev));
    CHECK(cudaStreamDestroy(s));
    return corrupt_runs ? 1 : 0;
}
