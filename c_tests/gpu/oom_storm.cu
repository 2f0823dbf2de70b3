// Out-of-memory storm under hbmalloc: threads allocate past the device's memory together, with
// memory cached when the storm hits, several rounds in a row. Every failed cudaMalloc must
// return cudaErrorMemoryAllocation (2) and leave nothing sticky (cudaGetLastError clears it, the
// next small allocation succeeds); every successful one must be usable memory; after everything
// is freed, cudaMemGetInfo must report what it did at the start.
//
// The caches are released once per storm (threads failing together), not once per failing
// allocation. To make "once" exact, each round is one storm in two phases: the threads fill 70%
// of the device and free a quarter of what they hold (the cache); then, past a barrier, they
// allocate without freeing until each has failed three times. After the storm's release the
// caches cannot fill again, so a second release would mean a release per failure. Each round
// prints its failures and its cache releases (hbm_stats' oom_retries: releases that gave memory
// back); the run fails if a round has more than one (a release per failure was the defect: 233
// in one run on an H200). A round can have none: the pool may have reused or returned the cache
// itself before the device ran out.
//
// Run under LD_PRELOAD=libhbmalloc.so. Environment: STORM_THREADS (16), STORM_ROUNDS (3).
// Prints one line per round and one with the totals (threads, successes, failures, cache
// releases, cudaMemGetInfo free before and after) and exits 1 on a wrong code, unusable memory,
// memory not returned, or more than one cache release in a round.
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_check.h"

// hbmalloc's statistics, looked up at run time (the layout of include/hbmalloc.h's HbmStats).
typedef struct {
    uint64_t in_use, reserved, peak_in_use, peak_reserved, driver_allocs, driver_frees, pool_hits,
        pool_misses, oom_retries, syncs, allocs, frees;
} Stats;
typedef int (*stats_fn)(int, Stats *);

struct Worker {
    pthread_t tid;
    int id;
    size_t share;  // bytes this thread holds after the fill phase
    pthread_barrier_t *filled, *done_failing;
    long ok, failed, wrong_code;
};

// One allocation of `size`: usable memory (a memset that reaches its last byte) or the right,
// non-sticky error. Returns the block or NULL.
static void *try_alloc(struct Worker *w, size_t size) {
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, size);
    if (e == cudaSuccess) {
        w->ok++;
        CHECK(cudaMemset(p, w->id, size));
        return p;
    }
    w->failed++;
    if (e != cudaErrorMemoryAllocation) w->wrong_code++;
    // Not sticky: the error is cleared by cudaGetLastError and a small allocation works.
    cudaGetLastError();
    if (cudaGetLastError() != cudaSuccess) w->wrong_code++;
    return NULL;
}

static void *worker_main(void *arg) {
    struct Worker *w = (struct Worker *)arg;
    enum { MAX = 4096 };
    void **held = (void **)calloc(MAX, sizeof *held);
    int n = 0;
    // Sizes 256 MiB to 1 GiB: a handful of threads fills an H200 in a few dozen allocations each.
    uint64_t x = 0x9E3779B97F4A7C15ULL * (w->id + 1);
    size_t held_bytes = 0;
    while (held_bytes < w->share && n < MAX) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        size_t size = ((size_t)256 << 20) + (size_t)(x % (768u << 20));
        void *p = try_alloc(w, size);
        if (!p) break;
        held[n++] = p, held_bytes += size;
    }
    // A quarter back to the cache, then the storm: nothing is freed until every thread is done.
    CHECK(cudaDeviceSynchronize());
    for (int i = 0; i < n; i += 4) {
        CHECK(cudaFree(held[i]));
        held[i] = NULL;
    }
    pthread_barrier_wait(w->filled);
    long failed_before = w->failed;
    while (w->failed - failed_before < 3 && n < MAX) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        size_t size = ((size_t)256 << 20) + (size_t)(x % (768u << 20));
        void *p = try_alloc(w, size);
        if (p) held[n++] = p;
    }
    pthread_barrier_wait(w->done_failing);
    CHECK(cudaDeviceSynchronize());
    for (int i = 0; i < n; i++)
        if (held[i]) CHECK(cudaFree(held[i]));
    free(held);
    return NULL;
}

int main() {
    stats_fn stats = (stats_fn)dlsym(RTLD_DEFAULT, "hbm_stats");
    if (!stats) {
        fprintf(stderr, "oom_storm: hbmalloc is not preloaded; this test would prove nothing\n");
        return 2;
    }
    int threads = getenv("STORM_THREADS") ? atoi(getenv("STORM_THREADS")) : 16;
    int rounds = getenv("STORM_ROUNDS") ? atoi(getenv("STORM_ROUNDS")) : 3;
    if (threads < 1 || threads > 256 || rounds < 1) return 2;
    CHECK(cudaFree(0));
    size_t free0, total;
    CHECK(cudaMemGetInfo(&free0, &total));
    Stats before;
    stats(0, &before);
    long ok = 0, failed = 0, wrong = 0;
    unsigned long long worst_round = 0;
    for (int r = 0; r < rounds; r++) {
        Stats round_start;
        stats(0, &round_start);
        long round_ok = 0, round_failed = 0;
        pthread_barrier_t filled, done_failing;
        pthread_barrier_init(&filled, NULL, threads);
        pthread_barrier_init(&done_failing, NULL, threads);
        struct Worker *w = (struct Worker *)calloc(threads, sizeof *w);
        for (int i = 0; i < threads; i++) {
            w[i].id = i;
            w[i].share = (size_t)(free0 * 0.7) / threads;
            w[i].filled = &filled;
            w[i].done_failing = &done_failing;
            pthread_create(&w[i].tid, NULL, worker_main, &w[i]);
        }
        for (int i = 0; i < threads; i++) {
            pthread_join(w[i].tid, NULL);
            ok += w[i].ok, failed += w[i].failed, wrong += w[i].wrong_code;
            round_ok += w[i].ok, round_failed += w[i].failed;
        }
        Stats round_end;
        stats(0, &round_end);
        unsigned long long released = round_end.oom_retries - round_start.oom_retries;
        if (released > worst_round) worst_round = released;
        printf("round %d: threads=%d successes=%ld failures=%ld cache_releases=%llu%s\n", r, threads,
               round_ok, round_failed, released, released > 1 ? " (more than one: the storm released twice)" : "");
        free(w);
        pthread_barrier_destroy(&filled);
        pthread_barrier_destroy(&done_failing);
    }
    void *small = NULL;
    cudaError_t after_storm = cudaMalloc(&small, 1 << 20);
    if (after_storm == cudaSuccess) CHECK(cudaFree(small));
    Stats after;
    stats(0, &after);
    size_t free1;
    CHECK(cudaMemGetInfo(&free1, &total));
    // hbmalloc counts what its caches hold as free; allow 1% for the runtime's own bookkeeping.
    long long drift = (long long)free0 - (long long)free1;
    int returned = drift < (long long)(total / 100);
    unsigned long long releases = after.oom_retries - before.oom_retries;
    printf("threads=%d rounds=%d successes=%ld failures=%ld wrong_codes=%ld cache_releases=%llu "
           "(most in a round %llu) in_use_after=%llu mem_free_before=%zu MiB mem_free_after=%zu MiB "
           "free_drift=%lld MiB small_alloc_after=%d\n",
           threads, rounds, ok, failed, wrong, releases, worst_round, (unsigned long long)after.in_use,
           free0 >> 20, free1 >> 20, drift >> 20, (int)after_storm);
    // Once per storm: every round is one storm, and a release serves all its failures.
    int released_once = worst_round <= 1;
    if (!released_once) printf("oom_storm: %llu cache releases in one round (storm)\n", worst_round);
    int pass = wrong == 0 && failed >= (long)threads * rounds && after.in_use == before.in_use && returned &&
               after_storm == cudaSuccess && released_once;
    return pass ? 0 : 1;
}
