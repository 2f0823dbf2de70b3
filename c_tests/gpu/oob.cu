// compute-sanitizer must see a pool block as the cudaMalloc block it stands for. A kernel writes
// one float past the end of a 1000-float cudaMalloc block (built with -DOOB_CLEAN: exactly the
// 1000 floats, the clean twin). A second block is allocated after the first, so that under
// hbmalloc the stray write lands inside the same pool chunk, where only NVTX regions let memcheck
// see it. Run it under `compute-sanitizer --tool memcheck`, plain and with
// LD_PRELOAD=libhbmalloc.so: the planted one must report one invalid write both ways, the clean
// one 0 errors both ways (scripts/gpu-check.sh, section `sanitizer`).
// OOB_EXPECT=hbmalloc or plain: exits 2 unless hbmalloc is (or is not) preloaded, so a run that
// proves nothing cannot pass.
#include <dlfcn.h>
#include <string.h>

#include "cuda_check.h"

#define N 1000

__global__ void fill(float *p, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = 1.0f + i;
}

int main() {
    const char *expect = getenv("OOB_EXPECT");
    bool preloaded = dlsym(RTLD_DEFAULT, "hbm_version") != NULL;
    if (!expect || (strcmp(expect, "hbmalloc") == 0) != preloaded) {
        fprintf(stderr, "oob: OOB_EXPECT=%s but hbmalloc is %spreloaded\n", expect ? expect : "(unset)",
                preloaded ? "" : "not ");
        return 2;
    }
    float *a = NULL, *b = NULL;
    CHECK(cudaMalloc(&a, N * sizeof(float)));
    CHECK(cudaMalloc(&b, N * sizeof(float)));
#ifdef OOB_CLEAN
    const int n = N;
#else
    const int n = N + 1;
#endif
    fill<<<(n + 255) / 256, 256>>>(a, n);
    fill<<<(N + 255) / 256, 256>>>(b, N);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    float h[N];
    CHECK(cudaMemcpy(h, a, sizeof h, cudaMemcpyDeviceToHost));
    for (int i = 0; i < N; i++) {
        if (h[i] != 1.0f + i) {
            fprintf(stderr, "oob: a[%d] = %g\n", i, h[i]);
            return 1;
        }
    }
    CHECK(cudaFree(a));
    CHECK(cudaFree(b));
    printf("oob: %s, %d floats written into a %d-float block, a=%p b=%p\n",
           preloaded ? "hbmalloc" : "plain", n, N, (void *)a, (void *)b);
    return 0;
}
