// Verified churn under hbmalloc: threads allocate and free blocks of random sizes on random streams,
// every live block carries a pattern of its own written by a kernel, and a kernel verifies it just
// before the block is freed. A block handed out while an earlier owner's kernel still touched it, or
// two live blocks that overlap, show up as a pattern mismatch.
//
// Run under LD_PRELOAD=libhbmalloc.so. Environment: CHURN_OPS (total operations, default 10^6),
// CHURN_THREADS (16). Prints "ops=<n> corrupt=<words> ..." and exits 1 when any word was wrong.
//
// Each kernel touches a bounded sample of its block, so 10^7 operations take seconds, not hours:
// the first 64 words, the last word, and every word at a 4 KiB boundary of the address space. The
// boundary words are absolute, so two overlapping blocks always share sampled words.
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "cuda_check.h"

#define HEAD_WORDS 64

// The index-th sampled word of the block [p, p + n), or NULL past the last one.
__device__ uint32_t *sample(uint32_t *p, size_t n, size_t index) {
    size_t words = n / 4;
    if (index < HEAD_WORDS) return index < words ? p + index : NULL;
    if (index == HEAD_WORDS) return p + words - 1;
    uintptr_t first = ((uintptr_t)p + 4095) & ~(uintptr_t)4095;
    uintptr_t at = first + (index - HEAD_WORDS - 1) * 4096;
    return at + 4 <= (uintptr_t)p + n ? (uint32_t *)at : NULL;
}

__device__ uint32_t pattern(uint64_t tag, const uint32_t *at) {
    uint64_t x = tag ^ ((uintptr_t)at * 0x9E3779B97F4A7C15ULL);
    x ^= x >> 29;
    return (uint32_t)(x * 0xBF58476D1CE4E5B9ULL >> 32);
}

__global__ void fill(uint32_t *p, size_t n, uint64_t tag, size_t samples) {
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < samples; i += gridDim.x * blockDim.x) {
        uint32_t *at = sample(p, n, i);
        if (at) *at = pattern(tag, at);
    }
}

__global__ void verify(const uint32_t *p, size_t n, uint64_t tag, size_t samples, unsigned long long *bad) {
    for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < samples; i += gridDim.x * blockDim.x) {
        uint32_t *at = sample((uint32_t *)p, n, i);
        if (at && *at != pattern(tag, at)) atomicAdd(bad, 1ULL);
    }
}

static size_t samples_of(size_t n) { return HEAD_WORDS + 1 + n / 4096 + 1; }

static void launch_fill(uint32_t *p, size_t n, uint64_t tag, cudaStream_t s) {
    size_t k = samples_of(n);
    fill<<<(unsigned)((k + 255) / 256 < 64 ? (k + 255) / 256 : 64), 256, 0, s>>>(p, n, tag, k);
}

static void launch_verify(uint32_t *p, size_t n, uint64_t tag, cudaStream_t s, unsigned long long *bad) {
    size_t k = samples_of(n);
    verify<<<(unsigned)((k + 255) / 256 < 64 ? (k + 255) / 256 : 64), 256, 0, s>>>(p, n, tag, k, bad);
}

struct Block {
    uint32_t *p;
    size_t n;
    uint64_t tag;
    int async;  // from cudaMallocAsync: may be freed with cudaFreeAsync
    cudaStream_t s;  // where its kernels run, in order
};

struct Worker {
    pthread_t tid;
    int id;
    long ops;
    long frees_async;
    unsigned long long bad;
};

static uint64_t next(uint64_t *x) {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

// Log-uniform from 512 B to 64 MiB, in multiples of 4 bytes.
static size_t random_size(uint64_t *x) {
    int shift = 9 + (int)(next(x) % 17);  // 2^9 .. 2^25, then up to twice that
    size_t base = (size_t)1 << shift;
    return (base + next(x) % base) & ~(size_t)3;
}

static void *worker_main(void *arg) {
    Worker *w = (Worker *)arg;
    enum { STREAMS = 3, LIVE = 24 };
    cudaStream_t streams[STREAMS];
    for (int i = 0; i < STREAMS; i++) CHECK(cudaStreamCreateWithFlags(&streams[i], cudaStreamNonBlocking));
    cudaEvent_t ev;
    CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    unsigned long long *bad;
    CHECK(cudaMalloc(&bad, sizeof *bad));
    CHECK(cudaMemset(bad, 0, sizeof *bad));
    CHECK(cudaDeviceSynchronize());  // the streams below do not wait for the legacy stream
    Block live[LIVE] = {};
    uint64_t x = 0x2545F4914F6CDD1DULL * (w->id + 1);
    for (long op = 0; op < w->ops; op++) {
        Block *b = &live[next(&x) % LIVE];
        if (b->p) {  // verify, then free
            cudaStream_t s = b->s;
            launch_verify(b->p, b->n, b->tag, s, bad);
            CHECK(cudaGetLastError());
            if (b->async && next(&x) % 2) {
                // Freed on another stream than the one that verified: ordered by an event, as a
                // correct program must.
                cudaStream_t f = streams[next(&x) % STREAMS];
                CHECK(cudaEventRecord(ev, s));
                CHECK(cudaStreamWaitEvent(f, ev, 0));
                CHECK(cudaFreeAsync(b->p, f));
                w->frees_async++;
            } else {
                CHECK(cudaFree(b->p));
            }
            b->p = NULL;
        } else {  // allocate, then fill
            cudaStream_t s = b->s = streams[next(&x) % STREAMS];
            b->n = random_size(&x);
            b->async = next(&x) % 2;
            b->tag = next(&x);
            if (b->async)
                CHECK(cudaMallocAsync((void **)&b->p, b->n, s));
            else
                CHECK(cudaMalloc((void **)&b->p, b->n));
            launch_fill(b->p, b->n, b->tag, s);
            CHECK(cudaGetLastError());
        }
    }
    for (int i = 0; i < LIVE; i++) {
        if (!live[i].p) continue;
        launch_verify(live[i].p, live[i].n, live[i].tag, live[i].s, bad);
        CHECK(cudaFree(live[i].p));
    }
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemcpy(&w->bad, bad, sizeof *bad, cudaMemcpyDeviceToHost));
    CHECK(cudaFree(bad));
    CHECK(cudaEventDestroy(ev));
    for (int i = 0; i < STREAMS; i++) CHECK(cudaStreamDestroy(streams[i]));
    return NULL;
}

int main() {
    if (!dlsym(RTLD_DEFAULT, "hbm_version")) {
        fprintf(stderr, "churn: hbmalloc is not preloaded; this test would prove nothing\n");
        return 2;
    }
    long total = getenv("CHURN_OPS") ? atol(getenv("CHURN_OPS")) : 1000000;
    int n = getenv("CHURN_THREADS") ? atoi(getenv("CHURN_THREADS")) : 16;
    if (n < 1 || n > 256 || total < n) {
        fprintf(stderr, "churn: CHURN_THREADS must be 1-256 and CHURN_OPS at least that\n");
        return 2;
    }
    CHECK(cudaFree(0));
    Worker *w = (Worker *)calloc(n, sizeof *w);
    for (int i = 0; i < n; i++) {
        w[i].id = i;
        w[i].ops = total / n;
        pthread_create(&w[i].tid, NULL, worker_main, &w[i]);
    }
    unsigned long long bad = 0;
    long ops = 0, async = 0;
    for (int i = 0; i < n; i++) {
        pthread_join(w[i].tid, NULL);
        bad += w[i].bad;
        ops += w[i].ops;
        async += w[i].frees_async;
    }
    free(w);
    printf("ops=%ld threads=%d cudaFreeAsync=%ld corrupt=%llu\n", ops, n, async, bad);
    return bad ? 1 : 0;
}
