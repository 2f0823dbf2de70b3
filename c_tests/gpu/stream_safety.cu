// Stream safety of cudaFree under hbmalloc: a kernel is still writing block A when cudaFree(A)
// returns; the next allocation of the same size is then written on another stream. If the pool
// handed A out again before the kernel finished, the kernel's late writes corrupt the new data.
//
// Run under LD_PRELOAD=libhbmalloc.so. Prints "reused=<0|1> corrupt=<0|1>" and exits 1 when the
// data is corrupt. With HBMALLOC_CONF=stream_safety:off it is expected to fail (the test can).
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>

#include "cuda_check.h"

// Spins for about `cycles` clock cycles, then fills the buffer with 0xAA.
__global__ void late_writer(unsigned char *p, size_t n, long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {
    }
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        p[i] = 0xAA;
}

int main() {
    if (!dlsym(RTLD_DEFAULT, "hbm_version")) {
        fprintf(stderr, "stream_safety: hbmalloc is not preloaded; this test would prove nothing\n");
        return 2;
    }
    const size_t n = 64 << 20;
    cudaStream_t s1, s2;
    CHECK(cudaStreamCreateWithFlags(&s1, cudaStreamNonBlocking));
    CHECK(cudaStreamCreateWithFlags(&s2, cudaStreamNonBlocking));
    int corrupt_runs = 0, reused_runs = 0;
    unsigned char *host = (unsigned char *)malloc(n);
    for (int run = 0; run < 8; run++) {
        unsigned char *a = NULL, *b = NULL;
        CHECK(cudaMalloc(&a, n));
        late_writer<<<132, 256, 0, s1>>>(a, n, 200LL * 1000 * 1000);  // ~100 ms at 2 GHz
        CHECK(cudaGetLastError());
        CHECK(cudaFree(a));  // the kernel is still running here
        CHECK(cudaMalloc(&b, n));
        reused_runs += (a == b);
        CHECK(cudaMemsetAsync(b, 0x55, n, s2));
        CHECK(cudaStreamSynchronize(s2));
        CHECK(cudaDeviceSynchronize());
        CHECK(cudaMemcpy(host, b, n, cudaMemcpyDeviceToHost));
        size_t bad = 0;
        for (size_t i = 0; i < n; i++) bad += host[i] != 0x55;
        corrupt_runs += bad != 0;
        CHECK(cudaFree(b));
    }
    printf("stream_safety: runs=8 reused=%d corrupt=%d\n", reused_runs, corrupt_runs);
    free(host);
    return corrupt_runs ? 1 : 0;
}
