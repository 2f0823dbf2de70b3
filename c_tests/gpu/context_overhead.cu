// What a CUDA process holds on the device besides its own allocations: the context, then cuBLAS
// (its handle, its first GEMM's workspace and kernels), then one kernel of this program's own.
// `hbmalloc estimate` adds such a figure per GPU (`--overhead`, docs/estimate.md); this program
// measures it. Each line is the device memory in use (total - free from cudaMemGetInfo) at that
// point; what an idle device already shows as used (nvidia-smi, before the program runs) is
// passed as the first argument, in MiB, and subtracted. Run on an otherwise idle GPU, without
// hbmalloc (what it measures is the runtime's and cuBLAS's own).
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

#include "cuda_check.h"

static double used_mib(void) {
    size_t free_b, total_b;
    CHECK(cudaMemGetInfo(&free_b, &total_b));
    return (double)(total_b - free_b) / (1 << 20);
}

__global__ void touch(float *p) { p[threadIdx.x] += 1.0f; }

int main(int argc, char **argv) {
    double idle = argc > 1 ? atof(argv[1]) : 0.0;
    CHECK(cudaFree(0));
    double context = used_mib();
    float *buf;
    const int n = 256;
    CHECK(cudaMalloc(&buf, 3 * n * n * sizeof(float)));
    CHECK(cudaMemset(buf, 0, 3 * n * n * sizeof(float)));
    double with_buffer = used_mib();
    cublasHandle_t h;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) return 2;
    const float one = 1.0f, zero = 0.0f;
    if (cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, buf, n, buf + n * n, n, &zero,
                    buf + 2 * n * n, n) != CUBLAS_STATUS_SUCCESS)
        return 2;
    CHECK(cudaDeviceSynchronize());
    double cublas = used_mib();
    touch<<<1, 32>>>(buf);
    CHECK(cudaDeviceSynchronize());
    double kernel = used_mib();
    printf("context_overhead: idle %.0f MiB; context %.0f MiB; cuBLAS handle and first GEMM +%.0f MiB; "
           "a kernel of its own +%.0f MiB; process total %.0f MiB (its %.1f MiB buffer left out)\n",
           idle, context - idle, cublas - with_buffer, kernel - cublas,
           kernel - idle - (with_buffer - context), with_buffer - context);
    cublasDestroy(h);
    CHECK(cudaFree(buf));
    return 0;
}
