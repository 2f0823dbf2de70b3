/* The allocators users would pick instead of hbmalloc, in the harness of alloc_bench.c.
 *
 * alloc_bench.c measures whatever serves cudaMalloc/cudaMallocAsync (the runtime, or hbmalloc under
 * LD_PRELOAD). This program measures allocators that have their own entry points, with the same
 * cases and the same output line, so that bench-table.py puts them side by side:
 *   pytorch     c10::cuda::CUDACachingAllocator::raw_alloc_with_stream / raw_delete
 *               (built with -DPEER_TORCH against the installed torch)
 *   rmm-pool    rmm::mr::pool_memory_resource over cuda_memory_resource   (-DPEER_RMM)
 *   rmm-arena   rmm::mr::arena_memory_resource over cuda_memory_resource  (-DPEER_RMM)
 *   hbmalloc    hbm_device_alloc / hbm_device_free, its C API             (-DPEER_HBM)
 * Each allocation is stream-ordered on the calling thread's per-thread default stream where the
 * allocator takes a stream, as PyTorch and RMM are used in practice.
 *
 * Usage: peer_bench <allocator> <case>   case: pair:<bytes> | step | threads:<n>
 * Prints one line: "<allocator> raw <case> <value> <unit>".
 */
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <memory>
#include <string>

#ifdef PEER_TORCH
#include <c10/cuda/CUDACachingAllocator.h>
#endif
#ifdef PEER_RMM
#include <rmm/mr/arena_memory_resource.hpp>
#include <rmm/mr/cuda_memory_resource.hpp>
#include <rmm/mr/pool_memory_resource.hpp>
#endif
#ifdef PEER_HBM
extern "C" {
#include "hbmalloc.h"
}
#endif

#define CHECK(call)                                                              \
    do {                                                                         \
        cudaError_t e_ = (call);                                                 \
        if (e_ != cudaSuccess) {                                                 \
            fprintf(stderr, "%s:%d: %s -> %d\n", __FILE__, __LINE__, #call, e_); \
            exit(1);                                                             \
        }                                                                        \
    } while (0)

/* One allocator under test: alloc and free of `n` bytes on stream `s`. */
struct Peer {
    virtual ~Peer() = default;
    virtual void *alloc(size_t n, cudaStream_t s) = 0;
    virtual void release(void *p, size_t n, cudaStream_t s) = 0;
};

#ifdef PEER_TORCH
struct TorchPeer : Peer {
    TorchPeer() { c10::cuda::CUDACachingAllocator::init(1); }
    void *alloc(size_t n, cudaStream_t s) override {
        return c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(n, s);
    }
    void release(void *p, size_t, cudaStream_t) override { c10::cuda::CUDACachingAllocator::raw_delete(p); }
};
#endif

#ifdef PEER_RMM
/* RMM's resources are shared handles: copies refer to one pool. */
template <class Mr>
struct RmmPeer : Peer {
    Mr mr;
    explicit RmmPeer(Mr m) : mr(std::move(m)) {}
    void *alloc(size_t n, cudaStream_t s) override { return mr.allocate(cuda::stream_ref{s}, n, 256); }
    void release(void *p, size_t n, cudaStream_t s) override { mr.deallocate(cuda::stream_ref{s}, p, n, 256); }
};
#endif

#ifdef PEER_HBM
struct HbmPeer : Peer {
    void *alloc(size_t n, cudaStream_t) override {
        void *p = nullptr;
        if (hbm_device_alloc(0, n, &p) != HBM_STATUS_OK) {
            fprintf(stderr, "hbm_device_alloc(%zu) failed\n", n);
            exit(1);
        }
        return p;
    }
    void release(void *p, size_t, cudaStream_t) override { hbm_device_free(p); }
};
#endif

static Peer *peer;

static double now_s() {
    timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Alloc+free pairs for about `budget` seconds; returns ns per pair. */
static double pairs(size_t size, cudaStream_t s, double budget) {
    for (int i = 0; i < 100; i++) peer->release(peer->alloc(size, s), size, s);
    long n = 0, batch = 64;
    double t0 = now_s(), t;
    do {
        for (long i = 0; i < batch; i++) peer->release(peer->alloc(size, s), size, s);
        n += batch;
        t = now_s();
    } while (t - t0 < budget);
    return (t - t0) * 1e9 / n;
}

/* One inference step, the same sizes as alloc_bench.c: 100 allocations of 1-16 MiB, then their frees. */
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
        if (round == 3) t0 = now_s();
        for (int i = 0; i < 100; i++) ptrs[i] = peer->alloc(sizes[i], s);
        for (int i = 0; i < 100; i++) peer->release(ptrs[i], sizes[i], s);
        if (round >= 3) n++;
        t = now_s();
        if (round >= 3 && t - t0 >= budget) break;
    }
    return (t - t0) * 1e6 / n;
}

struct Worker {
    pthread_t tid;
    pthread_barrier_t *start;
    double seconds;
    long pairs;
};

static void *worker_main(void *arg) {
    Worker *w = static_cast<Worker *>(arg);
    cudaStream_t s = cudaStreamPerThread;
    const size_t size = 64 << 10;
    for (int i = 0; i < 100; i++) peer->release(peer->alloc(size, s), size, s);
    pthread_barrier_wait(w->start);
    double t0 = now_s();
    long n = 0;
    while (now_s() - t0 < w->seconds) {
        for (int i = 0; i < 64; i++) peer->release(peer->alloc(size, s), size, s);
        n += 64;
    }
    w->pairs = n;
    return nullptr;
}

/* n threads of 64 KiB pairs for `budget` seconds; returns million pairs per second. */
static double threads(int n, double budget) {
    Worker *w = new Worker[n]();
    pthread_barrier_t start;
    pthread_barrier_init(&start, nullptr, n);
    for (int i = 0; i < n; i++) {
        w[i].start = &start;
        w[i].seconds = budget;
        pthread_create(&w[i].tid, nullptr, worker_main, &w[i]);
    }
    long total = 0;
    for (int i = 0; i < n; i++) {
        pthread_join(w[i].tid, nullptr);
        total += w[i].pairs;
    }
    delete[] w;
    return total / budget / 1e6;
}

static Peer *make_peer(const std::string &name) {
#ifdef PEER_TORCH
    if (name == "pytorch") return new TorchPeer();
#endif
#ifdef PEER_RMM
    /* Pools start at 1 GiB and may grow to what the device has, as RMM's users configure them. */
    if (name == "rmm-pool")
        return new RmmPeer<rmm::mr::pool_memory_resource>(
            rmm::mr::pool_memory_resource(rmm::mr::cuda_memory_resource{}, size_t(1) << 30));
    if (name == "rmm-arena")
        return new RmmPeer<rmm::mr::arena_memory_resource>(
            rmm::mr::arena_memory_resource(rmm::mr::cuda_memory_resource{}, size_t(8) << 30));
#endif
#ifdef PEER_HBM
    if (name == "hbmalloc") return new HbmPeer();
#endif
    return nullptr;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s <allocator> pair:<bytes>|step|threads:<n>\n", argv[0]);
        return 2;
    }
    double budget = getenv("BENCH_SECONDS") ? atof(getenv("BENCH_SECONDS")) : 1.0;
    CHECK(cudaFree(0));
    peer = make_peer(argv[1]);
    if (!peer) {
        fprintf(stderr, "peer_bench: allocator '%s' was not built into this binary\n", argv[1]);
        return 2;
    }
    cudaStream_t s = cudaStreamPerThread;
    const char *c = argv[2];
    if (strncmp(c, "pair:", 5) == 0) {
        printf("%s raw %s %.1f ns/pair\n", argv[1], c, pairs(strtoull(c + 5, nullptr, 10), s, budget));
    } else if (strcmp(c, "step") == 0) {
        printf("%s raw %s %.2f us/step\n", argv[1], c, step(s, budget));
    } else if (strncmp(c, "threads:", 8) == 0) {
        printf("%s raw %s %.3f Mpairs/s\n", argv[1], c, threads(atoi(c + 8), budget));
    } else {
        fprintf(stderr, "unknown case %s\n", c);
        return 2;
    }
    fflush(stdout);
    CHECK(cudaDeviceSynchronize());
    /* RMM's and PyTorch's pools tear down in static destructors that may race the runtime's own;
       the figure is printed, so leave without running them. */
    _exit(0);
}
