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
 *   cudaMalloc, cudaMallocAsync   the runtime (always built): under LD_PRELOAD=libhbmalloc.so
 *               these are hbmalloc's drop-in path, and the line says "hbmalloc-dropin"
 * Each allocation is stream-ordered on the calling thread's per-thread default stream where the
 * allocator takes a stream, as PyTorch and RMM are used in practice.
 *
 * Usage: peer_bench <allocator> <case>...   (the cases run in order, in one process)
 *   case: pair:<bytes> | step | threads:<n>
 *         replay:<file>   replays a trace written with HBMALLOC_CONF=trace:FILE: one thread per
 *                         traced thread, each traced stream a stream of its own, a free that
 *                         another thread made waits for its allocation; ns per operation, the
 *                         best of BENCH_REPLAYS (default 3) timed replays after one untimed
 *                         warm-up (none when a memory: case replayed the same trace just before)
 *         memory:<file>   the same replay, untimed, reading the device's memory in use after every
 *                         allocation: peak reserved over peak in use (the trace's live bytes).
 *                         Run it first: it measures from the process's fresh pools.
 *                         BENCH_SERIES=FILE also writes memory over the replay to FILE: at most
 *                         1000 points "<ops done> <in use bytes> <reserved bytes>", each the
 *                         highest of its stretch of operations, so no peak is lost
 * Prints one line per case: "<allocator> raw <case> <value> <unit>" (memory: also the two peaks
 * in MiB).
 */
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <dlfcn.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

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

/* The runtime itself: plain, or hbmalloc's drop-in path under LD_PRELOAD. */
struct RuntimePeer : Peer {
    bool async;
    explicit RuntimePeer(bool a) : async(a) {
        if (async) {
            /* The runtime's pool keeps what it has: no release threshold, as its users set it. */
            cudaMemPool_t pool;
            uint64_t keep = UINT64_MAX;
            if (cudaDeviceGetDefaultMemPool(&pool, 0) == cudaSuccess)
                cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep);
        }
    }
    void *alloc(size_t n, cudaStream_t s) override {
        void *p = nullptr;
        CHECK(async ? cudaMallocAsync(&p, n, s) : cudaMalloc(&p, n));
        return p;
    }
    void release(void *p, size_t, cudaStream_t s) override { CHECK(async ? cudaFreeAsync(p, s) : cudaFree(p)); }
};

static Peer *peer;

static void *bench_alloc(size_t n, cudaStream_t s) { return peer->alloc(n, s); }
static void bench_free(void *p, size_t n, cudaStream_t s) { peer->release(p, n, s); }

/* pairs, step, threads: the same loops as alloc_bench.c's. */
#include "bench_cases.h"

/* ---- Trace replay ---- */

struct TraceOp {
    bool alloc;
    uint32_t id;     /* allocation number, shared by an allocation and its free */
    uint32_t stream; /* index into the replay's streams */
    size_t size;
};

struct Replay {
    std::vector<std::vector<TraceOp>> threads;
    std::vector<cudaStream_t> streams;
    size_t allocations = 0, ops = 0;
    size_t peak_live = 0; /* the trace's own peak of live bytes */
    std::vector<std::pair<uint32_t, size_t>> unfreed; /* allocations the trace never frees */
};

/* Reads a trace (src/track/trace.rs, version 1). Frees of pointers the trace never allocated
   (allocated before tracing began) are left out; allocations never freed are freed after the
   replay, untimed. */
static Replay read_trace(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "peer_bench: cannot open trace %s\n", path);
        exit(2);
    }
    Replay r;
    std::map<uint32_t, size_t> thread_index;
    std::map<uint64_t, uint32_t> stream_index, live; /* traced ptr -> allocation number */
    std::vector<size_t> sizes;
    size_t live_bytes = 0;
    char line[256];
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '#') continue;
        unsigned long long t, ptr, size, stream;
        unsigned thread;
        char op;
        int device;
        if (sscanf(line, "%llu %u %c %llx %llu %llx %d", &t, &thread, &op, &ptr, &size, &stream, &device) != 7) {
            fprintf(stderr, "peer_bench: bad trace line: %s", line);
            exit(2);
        }
        if (device != 0) continue; /* one device: the others' events are not replayed */
        auto th = thread_index.emplace(thread, r.threads.size()).first->second;
        if (th == r.threads.size()) r.threads.emplace_back();
        auto st = stream_index.emplace(stream, stream_index.size()).first->second;
        TraceOp o{op == 'a', 0, st, (size_t)size};
        if (o.alloc) {
            o.id = (uint32_t)sizes.size();
            sizes.push_back(o.size);
            live[ptr] = o.id;
            live_bytes += o.size;
            if (live_bytes > r.peak_live) r.peak_live = live_bytes;
        } else {
            auto it = live.find(ptr);
            if (it == live.end()) continue;
            o.id = it->second;
            o.size = sizes[o.id];
            live_bytes -= o.size;
            live.erase(it);
        }
        r.threads[th].push_back(o);
        r.ops++;
    }
    fclose(f);
    r.allocations = sizes.size();
    for (auto [ptr, id] : live) r.unfreed.emplace_back(id, sizes[id]);
    /* Traced handles 0 and 2 (the legacy and the per-thread default stream) keep their meaning;
       every other stream becomes a non-blocking stream of the replay's own. */
    r.streams.resize(stream_index.size());
    for (auto &[handle, index] : stream_index) {
        if (handle == 0 || handle == 2)
            r.streams[index] = (cudaStream_t)handle;
        else
            CHECK(cudaStreamCreateWithFlags(&r.streams[index], cudaStreamNonBlocking));
    }
    return r;
}

/* Memory the device has in use, from the driver (no allocator in this process interposes it). */
static size_t device_used() {
    typedef int (*mem_get_info_fn)(size_t *, size_t *);
    static mem_get_info_fn fn = [] {
        void *cuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
        if (!cuda) cuda = dlopen("libcuda.so.1", RTLD_NOW);
        return cuda ? (mem_get_info_fn)dlsym(cuda, "cuMemGetInfo_v2") : nullptr;
    }();
    size_t free_b = 0, total = 0;
    if (!fn || fn(&free_b, &total) != 0) {
        fprintf(stderr, "peer_bench: cuMemGetInfo_v2 unavailable\n");
        exit(2);
    }
    return total - free_b;
}

/* One point of a memory: replay, taken after an allocation. */
struct Sample {
    size_t op;   /* operations done, every thread's */
    size_t live; /* bytes the replay has allocated and not freed */
    size_t used; /* the device's memory in use above the process's baseline */
};

struct ReplayRun {
    Replay *r;
    std::vector<std::atomic<void *>> *slots;
    bool sample;
    size_t baseline;
    std::atomic<size_t> *peak_used;
    /* Only while sampling: the timed replays touch no shared counter. */
    std::atomic<size_t> *ops_done, *live;
    std::vector<std::vector<Sample>> *samples; /* one vector per replay thread */
};

static void replay_thread(ReplayRun *run, size_t t) {
    auto &slots = *run->slots;
    for (const TraceOp &o : run->r->threads[t]) {
        cudaStream_t s = run->r->streams[o.stream];
        if (o.alloc) {
            slots[o.id].store(peer->alloc(o.size, s), std::memory_order_release);
            if (run->sample) {
                size_t op = run->ops_done->fetch_add(1) + 1;
                size_t live = run->live->fetch_add(o.size) + o.size;
                size_t used = device_used(), seen = run->peak_used->load();
                while (used > seen && !run->peak_used->compare_exchange_weak(seen, used)) {
                }
                (*run->samples)[t].push_back({op, live, used > run->baseline ? used - run->baseline : 0});
            }
        } else {
            void *p;
            while (!(p = slots[o.id].load(std::memory_order_acquire))) sched_yield(); /* another thread's allocation */
            peer->release(p, o.size, s);
            if (run->sample) {
                run->ops_done->fetch_add(1);
                run->live->fetch_sub(o.size);
            }
        }
    }
}

/* Writes a memory: replay's samples as at most 1000 points, each the highest in-use and reserved
   figures of its stretch of operations (so the plot keeps every peak). */
static void write_series(const char *path, std::vector<std::vector<Sample>> &samples, size_t ops) {
    std::vector<Sample> all;
    for (auto &v : samples) all.insert(all.end(), v.begin(), v.end());
    std::sort(all.begin(), all.end(), [](const Sample &a, const Sample &b) { return a.op < b.op; });
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "peer_bench: cannot write series %s\n", path);
        exit(2);
    }
    fprintf(f, "# hbmalloc series v1: op in_use_bytes reserved_bytes\n");
    size_t stretch = ops / 1000 + 1;
    for (size_t i = 0; i < all.size();) {
        size_t end_op = (all[i].op / stretch + 1) * stretch, live = 0, used = 0, op = 0;
        for (; i < all.size() && all[i].op < end_op; i++) {
            live = std::max(live, all[i].live);
            used = std::max(used, all[i].used);
            op = all[i].op;
        }
        fprintf(f, "%zu %zu %zu\n", op, live, used);
    }
    fclose(f);
}

/* Replays the trace once; returns seconds. With `sample`, records the peak of device memory used
   above `baseline` and, given `series`, writes memory over the replay there. */
static double replay(Replay &r, bool sample, size_t baseline, size_t *peak_used, const char *series) {
    std::vector<std::atomic<void *>> slots(r.allocations);
    std::atomic<size_t> peak{0}, ops_done{0}, live{0};
    std::vector<std::vector<Sample>> samples(r.threads.size());
    ReplayRun run{&r, &slots, sample, baseline, &peak, &ops_done, &live, &samples};
    std::vector<pthread_t> tids(r.threads.size());
    struct Arg {
        ReplayRun *run;
        size_t t;
    };
    std::vector<Arg> args(r.threads.size());
    double t0 = now_s();
    for (size_t t = 0; t < r.threads.size(); t++) {
        args[t] = {&run, t};
        pthread_create(&tids[t], nullptr, [](void *a) -> void * {
            replay_thread(static_cast<Arg *>(a)->run, static_cast<Arg *>(a)->t);
            return nullptr;
        }, &args[t]);
    }
    for (pthread_t tid : tids) pthread_join(tid, nullptr);
    CHECK(cudaDeviceSynchronize());
    double seconds = now_s() - t0;
    /* What the trace never freed is freed now, untimed, so a second replay starts alike. */
    for (auto [id, size] : r.unfreed) peer->release(slots[id].load(), size, cudaStreamPerThread);
    CHECK(cudaDeviceSynchronize());
    if (peak_used) *peak_used = peak.load() > baseline ? peak.load() - baseline : 0;
    if (sample && series) write_series(series, samples, r.ops);
    return seconds;
}

static Peer *make_peer(const std::string &name) {
    if (name == "cudaMalloc") return new RuntimePeer(false);
    if (name == "cudaMallocAsync") return new RuntimePeer(true);
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

static const char *base_name(const char *path) {
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

/* Runs one case and prints its line; false for a case this program does not know. */
static bool run_case(const std::string &who, const char *c, double budget, size_t baseline) {
    cudaStream_t s = cudaStreamPerThread;
    /* The trace last replayed in this process: a replay: after a memory: of the same trace
       starts with the pools as the memory: replay left them, so it needs no warm-up. */
    static std::string warmed;
    if (strncmp(c, "replay:", 7) == 0) {
        Replay r = read_trace(c + 7);
        if (warmed != c + 7) replay(r, false, 0, nullptr, nullptr); /* the pools fill as a running program's would have */
        int reps = getenv("BENCH_REPLAYS") ? atoi(getenv("BENCH_REPLAYS")) : 3;
        double best = 1e30;
        for (int i = 0; i < (reps > 0 ? reps : 1); i++) {
            double t = replay(r, false, 0, nullptr, nullptr);
            best = t < best ? t : best;
        }
        warmed = c + 7;
        printf("%s raw replay:%s %.1f ns/op\n", who.c_str(), base_name(c + 7), best * 1e9 / r.ops);
    } else if (strncmp(c, "memory:", 7) == 0) {
        Replay r = read_trace(c + 7);
        size_t used = 0;
        replay(r, true, baseline, &used, getenv("BENCH_SERIES"));
        warmed = c + 7;
        printf("%s raw memory:%s %.3f reserved/in-use peak %.1f %.1f MiB\n", who.c_str(), base_name(c + 7),
               r.peak_live ? (double)used / r.peak_live : 0.0, used / 1048576.0, r.peak_live / 1048576.0);
    } else if (strncmp(c, "pair:", 5) == 0) {
        printf("%s raw %s %.1f ns/pair\n", who.c_str(), c, pairs(strtoull(c + 5, nullptr, 10), s, budget));
    } else if (strcmp(c, "step") == 0) {
        printf("%s raw %s %.2f us/step\n", who.c_str(), c, step(s, budget));
    } else if (strncmp(c, "threads:", 8) == 0) {
        printf("%s raw %s %.3f Mpairs/s\n", who.c_str(), c, threads(atoi(c + 8), budget));
    } else {
        fprintf(stderr, "peer_bench: unknown case %s\n", c);
        return false;
    }
    fflush(stdout);
    return true;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s <allocator> <case>...   case: pair:<bytes>|step|threads:<n>|replay:<trace>|memory:<trace>\n",
                argv[0]);
        return 2;
    }
    double budget = getenv("BENCH_SECONDS") ? atof(getenv("BENCH_SECONDS")) : 1.0;
    CHECK(cudaFree(0));
    /* What the device has in use before the allocator under test exists: memory: counts above it. */
    size_t baseline = 0;
    for (int i = 2; i < argc; i++)
        if (strncmp(argv[i], "memory:", 7) == 0) baseline = device_used();
    peer = make_peer(argv[1]);
    if (!peer) {
        fprintf(stderr, "peer_bench: allocator '%s' was not built into this binary\n", argv[1]);
        return 2;
    }
    /* Under LD_PRELOAD the runtime's entry points are hbmalloc's. */
    std::string who = argv[1];
    if ((who == "cudaMalloc" || who == "cudaMallocAsync") && dlsym(RTLD_DEFAULT, "hbm_version"))
        who = who == "cudaMalloc" ? "hbmalloc-dropin" : "hbmalloc-dropin-async";
    for (int i = 2; i < argc; i++)
        if (!run_case(who, argv[i], budget, baseline)) return 2;
    CHECK(cudaDeviceSynchronize());
    /* RMM's and PyTorch's pools tear down in static destructors that may race the runtime's own;
       the figures are printed, so leave without running them. */
    _exit(0);
}
