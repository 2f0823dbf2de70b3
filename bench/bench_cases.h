/* The cases alloc_bench.c and peer_bench.cpp both run, written once so that every allocator is
 * measured by the same loops: pairs of one size, the 100-allocation step, n threads of pairs.
 *
 * The including file defines, before including this one,
 *   static void *bench_alloc(size_t n, cudaStream_t s);
 *   static void bench_free(void *p, size_t n, cudaStream_t s);
 * as plain functions (not pointers), so the compiler can inline them into the loops as it did
 * when each program had its own copy: a call through a pointer would add its cost to every pair.
 * C and C++ alike.
 */
#ifndef HBM_BENCH_CASES_H
#define HBM_BENCH_CASES_H

#include <cuda_runtime.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Alloc+free pairs for about `budget` seconds, after 100 to warm the caches; returns ns per pair. */
static double pairs(size_t size, cudaStream_t s, double budget) {
    for (int i = 0; i < 100; i++) bench_free(bench_alloc(size, s), size, s);
    long n = 0, batch = 64;
    double t0 = now_s(), t;
    do {
        for (long i = 0; i < batch; i++) bench_free(bench_alloc(size, s), size, s);
        n += batch;
        t = now_s();
    } while (t - t0 < budget);
    return (t - t0) * 1e9 / n;
}

/* One inference step: 100 allocations of 1-16 MiB (fixed pseudo-random sizes), then their frees,
   repeated for about `budget` seconds after three warm-up steps; returns us per step. */
static double step(cudaStream_t s, double budget) {
    size_t sizes[100];
    uint64_t x = 42;
    for (int i = 0; i < 100; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        sizes[i] = (1u << 20) + (size_t)((x >> 33) % (15u << 20));
    }
    void *ptrs[100];
    long n = 0;
    double t0 = 0, t;
    for (int round = 0;; round++) {
        if (round == 3) t0 = now_s(); /* three warm-up steps fill the caches */
        for (int i = 0; i < 100; i++) ptrs[i] = bench_alloc(sizes[i], s);
        for (int i = 0; i < 100; i++) bench_free(ptrs[i], sizes[i], s);
        if (round >= 3) n++;
        t = now_s();
        if (round >= 3 && t - t0 >= budget) break;
    }
    return (t - t0) * 1e6 / n;
}

struct bench_worker {
    pthread_t tid;
    pthread_barrier_t *start;
    double seconds;
    long pairs;
};

/* One thread of 64 KiB pairs on its per-thread default stream, started with the others. */
static void *bench_worker_main(void *arg) {
    struct bench_worker *w = (struct bench_worker *)arg;
    cudaStream_t s = cudaStreamPerThread;
    const size_t size = 64 << 10;
    for (int i = 0; i < 100; i++) bench_free(bench_alloc(size, s), size, s);
    pthread_barrier_wait(w->start);
    double t0 = now_s();
    long n = 0;
    while (now_s() - t0 < w->seconds) {
        for (int i = 0; i < 64; i++) bench_free(bench_alloc(size, s), size, s);
        n += 64;
    }
    w->pairs = n;
    return NULL;
}

/* n threads of 64 KiB pairs for `budget` seconds; returns million pairs per second, all together. */
static double threads(int n, double budget) {
    struct bench_worker *w = (struct bench_worker *)calloc(n, sizeof *w);
    pthread_barrier_t start;
    pthread_barrier_init(&start, NULL, n);
    for (int i = 0; i < n; i++) {
        w[i].start = &start;
        w[i].seconds = budget;
        pthread_create(&w[i].tid, NULL, bench_worker_main, &w[i]);
    }
    long total = 0;
    for (int i = 0; i < n; i++) {
        pthread_join(w[i].tid, NULL);
        total += w[i].pairs;
    }
    pthread_barrier_destroy(&start);
    free(w);
    return total / budget / 1e6;
}

#endif
