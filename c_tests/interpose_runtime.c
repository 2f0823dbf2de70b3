/* The interposed CUDA runtime entry points, seen from an unmodified C program.
 *
 * Built against the real cuda_runtime.h and linked dynamically against the real libcudart.so.13
 * (both from the nvidia-cuda-runtime wheel); run with
 *     LD_PRELOAD=libhbmalloc.so HBMALLOC_CONF=backend:sim,sim_capacity:4GiB interpose_runtime 4294967296
 * (argument: the sim_capacity in bytes). First it proves that hbmalloc, not libcudart, serves the
 * calls, and stops at once if not; then it checks every row of the contract table in docs/contract.md and the
 * bad inputs a program may pass, the data path, and a 16-thread stress. The same for the pinned
 * host siblings (cudaMallocHost, cudaHostAlloc, cudaFreeHost, from hbmalloc's pinned pool) and
 * cudaMallocManaged (the runtime's, tracked), and it leaves one block of each allocated on
 * purpose, for the leak report at exit.
 *
 * Under backend:sim the "device" memory hbmalloc hands out is ordinary host memory (anonymous
 * mmap), so this test writes and reads it with memset/memcmp directly. On a real GPU
 * (scripts/gpu-check.sh runs it with the argument `cuda` and backend:cuda) the same checks go
 * through cudaMemset and cudaMemcpy instead, and the capacity is the device's own.
 *
 * hbmalloc.h is included beside cuda_runtime.h on purpose: the generated header must not clash
 * with the runtime's declarations. This program does not link libhbmalloc; it finds hbm_stats
 * with dlsym, which is also how it proves the preload happened. */
#define _GNU_SOURCE
#include <cuda_runtime.h>

#include "hbmalloc.h"

#include <dlfcn.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdint.h>

#include "check.h"

typedef enum HbmStatus (*hbm_stats_fn)(int device, HbmStats *out_stats);
static hbm_stats_fn hbm_stats_ptr;

static HbmStats stats_now(void) {
    HbmStats s;
    memset(&s, 0, sizeof s);
    enum HbmStatus st = hbm_stats_ptr(0, &s);
    REQUIRE(st == HBM_STATUS_OK, "hbm_stats(0) returned %d", (int)st);
    return s;
}

/* Set when running on a real GPU: device memory is then reached through the runtime only. */
static int on_device;

/* Writes `byte` over [p, p+n) of device memory. */
static void dev_set(void *p, int byte, size_t n) {
    if (on_device) {
        cudaError_t err = cudaMemset(p, byte, n);
        REQUIRE(err == cudaSuccess, "cudaMemset(%p, %zu) = %d", p, n, (int)err);
    } else {
        memset(p, byte, n); /* sim: device memory is host memory */
    }
}

/* The byte at p + off of device memory. */
static unsigned char dev_byte(const void *p, size_t off) {
    unsigned char b = 0;
    if (on_device) {
        cudaError_t err = cudaMemcpy(&b, (const unsigned char *)p + off, 1, cudaMemcpyDeviceToHost);
        REQUIRE(err == cudaSuccess, "cudaMemcpy from %p = %d", p, (int)err);
    } else {
        b = ((const unsigned char *)p)[off];
    }
    return b;
}

/* A function's address as a data pointer, without the cast ISO C leaves undefined. */
#define CODE_ADDRESS(out, fn)                                                                 \
    do {                                                                                      \
        __typeof__(&(fn)) fn_ = &(fn);                                                        \
        _Static_assert(sizeof(out) == sizeof fn_, "function and data pointers differ in size"); \
        memcpy(&(out), &fn_, sizeof(out));                                                    \
    } while (0)

/* Stops the test unless `name`, as this program binds it, is hbmalloc's definition, shadowing
 * the real one in libcudart, and `program_calls` (the address this program's calls to it go to)
 * is that definition. Returns the file that defines it. */
static const char *require_interposed(void *cudart, const char *name, void *program_calls) {
    void *bound = dlsym(RTLD_DEFAULT, name);
    void *runtime_own = dlsym(cudart, name);
    Dl_info info;
    memset(&info, 0, sizeof info);
    REQUIRE(bound != NULL && dladdr(bound, &info) != 0 && info.dli_fname != NULL,
            "cannot locate the %s this program binds to", name);
    REQUIRE(strstr(info.dli_fname, "libhbmalloc") != NULL,
            "%s resolves to %s, not libhbmalloc: hbmalloc did NOT interpose", name, info.dli_fname);
    REQUIRE(runtime_own != NULL && runtime_own != bound,
            "libcudart's own %s (%p) should exist and differ from the bound one (%p)", name,
            runtime_own, bound);
    REQUIRE(program_calls == bound, "this program's %s calls go to %p, not to hbmalloc's %p", name,
            program_calls, bound);
    return info.dli_fname;
}

/* Stops the test unless the cudaMalloc this program calls is hbmalloc's. Without this, every
 * check below could "pass" against some other implementation (or none). */
static void prove_hbmalloc_serves_the_runtime_api(void) {
    void *cudart = dlopen("libcudart.so.13", RTLD_NOLOAD | RTLD_LAZY);
    REQUIRE(cudart != NULL, "libcudart.so.13 is not loaded: this program must link the real "
                            "CUDA runtime dynamically");
    void *sym = dlsym(RTLD_DEFAULT, "hbm_stats");
    REQUIRE(sym != NULL, "hbmalloc is not loaded (no hbm_stats in the process): run this test "
                         "with LD_PRELOAD=libhbmalloc.so");
    memcpy(&hbm_stats_ptr, &sym, sizeof sym);

    /* The definition this program's calls bind to is hbmalloc's, and it shadows a real one. */
    void *calls;
    CODE_ADDRESS(calls, cudaMalloc);
    const char *lib = require_interposed(cudart, "cudaMalloc", calls);
    REQUIRE(dlclose(cudart) == 0, "dlclose: %s", dlerror());

    /* And it really serves them: its statistics count the call. */
    HbmStats before = stats_now();
    void *p = NULL;
    cudaError_t err = cudaMalloc(&p, 1024);
    REQUIRE(err == cudaSuccess && p != NULL, "cudaMalloc(1024) = %d, %p", (int)err, p);
    HbmStats after = stats_now();
    REQUIRE(after.allocs == before.allocs + 1,
            "hbmalloc did not serve cudaMalloc: its allocs went %" PRIu64 " -> %" PRIu64,
            before.allocs, after.allocs);
    REQUIRE(after.in_use >= before.in_use + 1024, "in_use did not grow by the allocation");
    REQUIRE(cudaFree(p) == cudaSuccess, "cudaFree of a fresh allocation failed");
    REQUIRE(stats_now().frees == after.frees + 1, "hbmalloc did not serve cudaFree");
    printf("interposition proven: cudaMalloc is %s's, hbm_stats counts the calls\n", lib);
}

/* Runs one bad free with stderr captured; checks its result and its diagnostic. */
static void bad_free(void *ptr, cudaError_t expected, const char *diagnostic) {
    char text[1024];
    capture c;
    capture_begin(&c);
    cudaError_t err = cudaFree(ptr);
    capture_end(&c, text, sizeof text);
    CHECK(err == expected, "cudaFree(%p) = %d, want %d", ptr, (int)err, (int)expected);
    CHECK(strstr(text, "hbmalloc:") != NULL && strstr(text, diagnostic) != NULL,
          "cudaFree(%p) printed \"%s\", want a line with \"hbmalloc:\" and \"%s\"", ptr, text,
          diagnostic);
    /* Like the runtime, a failed call is what cudaGetLastError reports next, once. */
    CHECK(cudaGetLastError() == expected, "cudaGetLastError after a bad free");
    CHECK(cudaGetLastError() == cudaSuccess, "cudaGetLastError resets");
}

static void contract_table(void) {
    void *p;
    cudaError_t err;
    cudaStream_t stream = cudaStreamPerThread; /* a handle only: nothing is launched on it */

    /* cudaMalloc(&p, 0) / cudaMallocAsync(&p, 0, s): 0, pointer set to NULL. */
    p = (void *)&p;
    err = cudaMalloc(&p, 0);
    CHECK(err == cudaSuccess && p == NULL, "cudaMalloc(&p, 0) = %d, p = %p", (int)err, p);
    p = (void *)&p;
    err = cudaMallocAsync(&p, 0, stream);
    CHECK(err == cudaSuccess && p == NULL, "cudaMallocAsync(&p, 0) = %d, p = %p", (int)err, p);
    p = (void *)&p;
    err = cudaMallocAsync(&p, 0, NULL);
    CHECK(err == cudaSuccess && p == NULL, "cudaMallocAsync(&p, 0, NULL) = %d, p = %p", (int)err, p);

    /* cudaMalloc(NULL, 16): 1, and cudaGetLastError reports it once. */
    CHECK(cudaMalloc(NULL, 16) == cudaErrorInvalidValue, "cudaMalloc(NULL, 16)");
    CHECK(cudaGetLastError() == cudaErrorInvalidValue, "cudaGetLastError after cudaMalloc(NULL)");
    CHECK(cudaGetLastError() == cudaSuccess, "cudaGetLastError resets");
    CHECK(cudaMallocAsync(NULL, 16, stream) == cudaErrorInvalidValue, "cudaMallocAsync(NULL, 16)");
    CHECK(cudaGetLastError() == cudaErrorInvalidValue, "cudaGetLastError after cudaMallocAsync(NULL)");

    /* cudaFree(NULL), cudaFreeAsync(NULL, s): 0. */
    CHECK(cudaFree(NULL) == cudaSuccess, "cudaFree(NULL)");
    CHECK(cudaFreeAsync(NULL, stream) == cudaSuccess, "cudaFreeAsync(NULL, s)");
    CHECK(cudaFreeAsync(NULL, NULL) == cudaSuccess, "cudaFreeAsync(NULL, NULL)");
    CHECK(cudaGetLastError() == cudaSuccess, "no error recorded by the NULL frees");

    /* cudaFree of an interior pointer, a freed pointer, a pointer never allocated: 1. */
    void *block = NULL;
    REQUIRE(cudaMalloc(&block, 4096) == cudaSuccess && block != NULL, "cudaMalloc(4096)");
    bad_free((char *)block + 256, cudaErrorInvalidValue, "inside the block");
    bad_free((char *)block + 1, cudaErrorInvalidValue, "hbmalloc:");
    /* The interior frees freed nothing: the block is still live and frees normally, once. */
    CHECK(cudaFree(block) == cudaSuccess, "cudaFree of the block after interior frees");
    bad_free(block, cudaErrorInvalidValue, "double free");
    int on_stack = 0;
    bad_free(&on_stack, cudaErrorInvalidValue, "not a pointer hbmalloc allocated");
    void *host = malloc(64);
    REQUIRE(host != NULL, "malloc");
    bad_free(host, cudaErrorInvalidValue, "not a pointer hbmalloc allocated");
    free(host);
    bad_free((void *)(uintptr_t)0x1000, cudaErrorInvalidValue, "not a pointer hbmalloc allocated");

    /* cudaFreeAsync twice: 0, then 1. */
    REQUIRE(cudaMallocAsync(&p, 1 << 20, stream) == cudaSuccess && p != NULL, "cudaMallocAsync(1 MiB)");
    CHECK(cudaFreeAsync(p, stream) == cudaSuccess, "first cudaFreeAsync");
    CHECK(cudaFreeAsync(p, stream) == cudaErrorInvalidValue, "second cudaFreeAsync");
    CHECK(cudaGetLastError() == cudaErrorInvalidValue, "cudaGetLastError after the second cudaFreeAsync");
    CHECK(cudaGetLastError() == cudaSuccess, "cudaGetLastError resets");
    /* A cudaMalloc block freed with cudaFreeAsync, and the other way round. */
    REQUIRE(cudaMalloc(&p, 3000) == cudaSuccess, "cudaMalloc(3000)");
    CHECK(cudaFreeAsync(p, stream) == cudaSuccess, "cudaFreeAsync of a cudaMalloc block");
    REQUIRE(cudaMallocAsync(&p, 3000, stream) == cudaSuccess, "cudaMallocAsync(3000)");
    CHECK(cudaFree(p) == cudaSuccess, "cudaFree of a cudaMallocAsync block");

    /* cudaMalloc of 256 TiB or SIZE_MAX: 2, and cudaGetLastError then also returns 2 (once). */
    const size_t sizes[] = {(size_t)256 << 40, SIZE_MAX, SIZE_MAX - 255, (size_t)1 << 63};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        p = NULL;
        err = cudaMalloc(&p, sizes[i]);
        CHECK(err == cudaErrorMemoryAllocation, "cudaMalloc(%zu) = %d", sizes[i], (int)err);
        CHECK(p == NULL, "cudaMalloc(%zu) failed but set p = %p", sizes[i], p);
        CHECK(cudaPeekAtLastError() == cudaErrorMemoryAllocation, "cudaPeekAtLastError after OOM");
        CHECK(cudaPeekAtLastError() == cudaErrorMemoryAllocation, "cudaPeekAtLastError does not reset");
        CHECK(cudaGetLastError() == cudaErrorMemoryAllocation, "cudaGetLastError after OOM");
        CHECK(cudaGetLastError() == cudaSuccess, "cudaGetLastError resets after OOM");
        err = cudaMallocAsync(&p, sizes[i], stream);
        CHECK(err == cudaErrorMemoryAllocation, "cudaMallocAsync(%zu) = %d", sizes[i], (int)err);
        CHECK(cudaGetLastError() == cudaErrorMemoryAllocation, "cudaGetLastError after async OOM");
    }
    /* A success does not clear the last error; cudaGetLastError does. */
    CHECK(cudaMalloc(&p, SIZE_MAX) == cudaErrorMemoryAllocation, "cudaMalloc(SIZE_MAX)");
    REQUIRE(cudaMalloc(&p, 512) == cudaSuccess, "cudaMalloc(512)");
    CHECK(cudaGetLastError() == cudaErrorMemoryAllocation, "a later success keeps the last error");
    CHECK(cudaFree(p) == cudaSuccess, "cudaFree(512 B block)");
    CHECK(cudaGetLastError() == cudaSuccess, "last error cleared");
}

/* Any successful cudaMalloc: a pointer aligned to at least 256 bytes. */
static void alignment(void) {
    enum { N = 200 };
    void *ptrs[N];
    cudaStream_t stream = cudaStreamPerThread;
    size_t size = 1;
    for (int i = 0; i < N; i++) {
        size = (size * 7 + 13) % (3 << 20) + 1; /* odd sizes, 1 B to 3 MiB */
        cudaError_t err = (i % 2) ? cudaMalloc(&ptrs[i], size) : cudaMallocAsync(&ptrs[i], size, stream);
        REQUIRE(err == cudaSuccess && ptrs[i] != NULL, "allocation %d of %zu bytes = %d", i, size, (int)err);
        CHECK((uintptr_t)ptrs[i] % 256 == 0, "allocation of %zu bytes at %p is not 256-aligned",
              size, ptrs[i]);
    }
    for (int i = 0; i < N; i++) {
        CHECK(cudaFree(ptrs[i]) == cudaSuccess, "cudaFree(ptrs[%d])", i);
    }
}

static void mem_get_info(size_t expected_total) {
    size_t free_bytes = 0, total = 0;
    CHECK(cudaMemGetInfo(NULL, &total) == cudaErrorInvalidValue, "cudaMemGetInfo(NULL, &total)");
    CHECK(cudaMemGetInfo(&free_bytes, NULL) == cudaErrorInvalidValue, "cudaMemGetInfo(&free, NULL)");
    CHECK(cudaMemGetInfo(NULL, NULL) == cudaErrorInvalidValue, "cudaMemGetInfo(NULL, NULL)");
    CHECK(cudaGetLastError() == cudaErrorInvalidValue, "cudaGetLastError after cudaMemGetInfo(NULL)");
    CHECK(cudaGetLastError() == cudaSuccess, "cudaGetLastError resets");

    CHECK(cudaMemGetInfo(&free_bytes, &total) == cudaSuccess, "cudaMemGetInfo");
    if (on_device) {
        expected_total = total; /* the card's own size; the runtime's figure, checked below */
    }
    CHECK(total == expected_total, "total %zu, want sim_capacity %zu", total, expected_total);
    CHECK(free_bytes <= total && free_bytes > 0, "free %zu of total %zu", free_bytes, total);

    /* Memory held by the program is not free. */
    void *p = NULL;
    REQUIRE(cudaMalloc(&p, (size_t)1 << 30) == cudaSuccess, "cudaMalloc(1 GiB)");
    size_t free_held = 0;
    CHECK(cudaMemGetInfo(&free_held, &total) == cudaSuccess, "cudaMemGetInfo");
    CHECK(free_held + ((size_t)1 << 30) <= total, "1 GiB in use, yet free %zu of %zu", free_held, total);
    CHECK(cudaFree(p) == cudaSuccess, "cudaFree(1 GiB)");
    /* Cached but unused memory counts as free again. */
    size_t free_after = 0;
    CHECK(cudaMemGetInfo(&free_after, &total) == cudaSuccess, "cudaMemGetInfo");
    CHECK(free_after > free_held, "freeing 1 GiB did not raise free (%zu -> %zu)", free_held, free_after);

    /* More than the device holds fails cleanly: sim_capacity is in force. */
    CHECK(cudaMalloc(&p, expected_total + 1) == cudaErrorMemoryAllocation, "cudaMalloc(capacity + 1)");
    CHECK(cudaGetLastError() == cudaErrorMemoryAllocation, "cudaGetLastError after cudaMalloc(capacity + 1)");
}

/* Deterministic generator, so a failure reproduces. */
static uint32_t next_random(uint32_t *state) {
    *state = *state * 1664525u + 1013904223u;
    return *state >> 8;
}

static int by_address(const void *a, const void *b) {
    uintptr_t x = *(const uintptr_t *)a, y = *(const uintptr_t *)b;
    return (x > y) - (x < y);
}

/* Many live allocations: disjoint, and what is written through each survives the others. */
static void data_and_overlap(void) {
    enum { N = 1000 };
    static void *ptrs[N];
    static size_t sizes[N];
    static uintptr_t ranges[N][2];
    uint32_t rng = 12345;
    HbmStats before = stats_now();
    for (int i = 0; i < N; i++) {
        sizes[i] = 1 + next_random(&rng) % ((i % 10 == 0) ? (8u << 20) : (64u << 10));
        cudaError_t err = cudaMalloc(&ptrs[i], sizes[i]);
        REQUIRE(err == cudaSuccess && ptrs[i] != NULL, "cudaMalloc(%zu) = %d", sizes[i], (int)err);
        dev_set(ptrs[i], i & 0xff, sizes[i]);
        ranges[i][0] = (uintptr_t)ptrs[i];
        ranges[i][1] = (uintptr_t)ptrs[i] + sizes[i];
    }
    HbmStats live = stats_now();
    CHECK(live.allocs == before.allocs + N, "allocs counted %" PRIu64, live.allocs - before.allocs);
    qsort(ranges, N, sizeof ranges[0], by_address);
    int overlaps = 0;
    for (int i = 1; i < N; i++) {
        overlaps += ranges[i][0] < ranges[i - 1][1];
    }
    CHECK(overlaps == 0, "%d of %d live allocations overlap their neighbour", overlaps, N);
    int corrupted = 0;
    for (int i = 0; i < N; i++) {
        size_t step = on_device ? (sizes[i] / 4 + 1) : 61; /* a copy per byte is slow on a GPU */
        for (size_t j = 0; j < sizes[i]; j += step) {
            if (dev_byte(ptrs[i], j) != (unsigned char)(i & 0xff)) {
                corrupted++;
                break;
            }
        }
        corrupted += dev_byte(ptrs[i], sizes[i] - 1) != (unsigned char)(i & 0xff);
    }
    CHECK(corrupted == 0, "%d allocations lost what was written to them", corrupted);
    for (int i = 0; i < N; i++) {
        CHECK(cudaFree(ptrs[i]) == cudaSuccess, "cudaFree(ptrs[%d])", i);
    }
    HbmStats after = stats_now();
    CHECK(after.frees == before.frees + N, "frees counted %" PRIu64, after.frees - before.frees);
    CHECK(after.in_use == before.in_use, "in_use %" PRIu64 " after freeing all, was %" PRIu64,
          after.in_use, before.in_use);
}

/* 16 threads allocate, fill, verify and free, synchronously and stream-ordered. A block handed
 * to two threads at once shows up as a pattern the other thread wrote. */
enum { THREADS = 16, ITERATIONS = 3000, LIVE = 8 };

struct worker {
    int id;
    int failures;
    char first_failure[256];
};

static void worker_fail(struct worker *w, const char *what, int i, long code) {
    if (w->failures++ == 0) {
        snprintf(w->first_failure, sizeof w->first_failure, "%s (iteration %d, code %ld)", what, i, code);
    }
}

static void fill(unsigned char *p, size_t size, uint32_t tag) {
    /* Small blocks in full, large ones at both ends and every 4 KiB (on a GPU: in full, one
     * cudaMemset), which is enough to see a block shared by two threads. */
    if (size <= 4096 || on_device) {
        dev_set(p, (int)(tag & 0xff), size);
        return;
    }
    for (size_t off = 0; off < size; off += 4096) {
        memset(p + off, (int)(tag & 0xff), size - off < 64 ? size - off : 64);
    }
    memset(p + size - 64, (int)(tag & 0xff), 64);
}

static int intact(const unsigned char *p, size_t size, uint32_t tag) {
    unsigned char want = (unsigned char)(tag & 0xff);
    size_t step = on_device ? size / 2 + 1 : (size <= 4096 ? 1 : 4096);
    for (size_t off = 0; off < size; off += step) {
        if (dev_byte(p, off) != want) {
            return 0;
        }
    }
    return dev_byte(p, size - 1) == want;
}

static void *stress_worker(void *arg) {
    struct worker *w = arg;
    void *ptrs[LIVE] = {0};
    size_t sizes[LIVE] = {0};
    uint32_t tags[LIVE] = {0};
    int async[LIVE] = {0};
    uint32_t rng = 0x9e3779b9u * (uint32_t)(w->id + 1);
    cudaStream_t stream = cudaStreamPerThread;
    for (int i = 0; i < ITERATIONS; i++) {
        int slot = (int)(next_random(&rng) % LIVE);
        if (ptrs[slot] != NULL) {
            if (!intact(ptrs[slot], sizes[slot], tags[slot])) {
                worker_fail(w, "a live block was overwritten by someone else", i, (long)sizes[slot]);
            }
            cudaError_t err = async[slot] ? cudaFreeAsync(ptrs[slot], stream) : cudaFree(ptrs[slot]);
            if (err != cudaSuccess) {
                worker_fail(w, "free failed", i, err);
            }
            ptrs[slot] = NULL;
        }
        uint32_t r = next_random(&rng);
        sizes[slot] = 1 + (r % 50 == 0 ? r % (4u << 20) : r % (64u << 10));
        async[slot] = (r & 0x100) != 0;
        tags[slot] = (uint32_t)(w->id * 16 + (i & 15)) | 1;
        cudaError_t err = async[slot] ? cudaMallocAsync(&ptrs[slot], sizes[slot], stream)
                                      : cudaMalloc(&ptrs[slot], sizes[slot]);
        if (err != cudaSuccess || ptrs[slot] == NULL) {
            worker_fail(w, "allocation failed", i, err);
            ptrs[slot] = NULL;
            continue;
        }
        if ((uintptr_t)ptrs[slot] % 256 != 0) {
            worker_fail(w, "allocation not 256-aligned", i, (long)(uintptr_t)ptrs[slot]);
        }
        fill(ptrs[slot], sizes[slot], tags[slot]);
    }
    for (int slot = 0; slot < LIVE; slot++) {
        if (ptrs[slot] == NULL) {
            continue;
        }
        if (!intact(ptrs[slot], sizes[slot], tags[slot])) {
            worker_fail(w, "a live block was overwritten by someone else", ITERATIONS, (long)sizes[slot]);
        }
        if (cudaFree(ptrs[slot]) != cudaSuccess) {
            worker_fail(w, "final free failed", ITERATIONS, 0);
        }
    }
    return NULL;
}

static void thread_stress(void) {
    pthread_t threads[THREADS];
    struct worker workers[THREADS];
    HbmStats before = stats_now();
    /* Every call below is valid, so hbmalloc must print nothing: a diagnostic here (a "double
     * free" of a block another thread was handed, say) means its bookkeeping raced. fd 2 is
     * captured for the whole process, so the workers' output is caught too. */
    static char diagnostics[64 * 1024];
    capture c;
    capture_begin(&c);
    for (int t = 0; t < THREADS; t++) {
        memset(&workers[t], 0, sizeof workers[t]);
        workers[t].id = t;
        int rc = pthread_create(&threads[t], NULL, stress_worker, &workers[t]);
        REQUIRE(rc == 0, "pthread_create: %s", strerror(rc));
    }
    for (int t = 0; t < THREADS; t++) {
        int rc = pthread_join(threads[t], NULL);
        REQUIRE(rc == 0, "pthread_join: %s", strerror(rc));
        CHECK(workers[t].failures == 0, "thread %d: %d failures, first: %s", t, workers[t].failures,
              workers[t].first_failure);
    }
    capture_end(&c, diagnostics, sizeof diagnostics);
    CHECK(strstr(diagnostics, "hbmalloc") == NULL,
          "valid calls from %d threads made hbmalloc print diagnostics (shown above)", THREADS);
    HbmStats after = stats_now();
    uint64_t allocs = after.allocs - before.allocs, frees = after.frees - before.frees;
    CHECK(allocs == frees, "stress: %" PRIu64 " allocations but %" PRIu64 " frees", allocs, frees);
    CHECK(allocs == (uint64_t)THREADS * ITERATIONS, "stress: %" PRIu64 " allocations counted", allocs);
    CHECK(after.in_use == before.in_use, "stress: in_use %" PRIu64 ", was %" PRIu64, after.in_use,
          before.in_use);
}

/* hbm_checkpoint / hbm_leaks_since, found with dlsym: what the tracker holds since a mark. */
typedef uint64_t (*hbm_checkpoint_fn)(void);
typedef enum HbmStatus (*hbm_leaks_since_fn)(uint64_t mark, uint64_t *out_bytes, uint64_t *out_count);
static hbm_checkpoint_fn hbm_checkpoint_ptr;
static hbm_leaks_since_fn hbm_leaks_since_ptr;

/* Live allocations the tracker recorded since `mark` (this program is single-threaded there). */
static uint64_t live_since(uint64_t mark, uint64_t *bytes) {
    uint64_t b = 0, n = 0;
    enum HbmStatus st = hbm_leaks_since_ptr(mark, &b, &n);
    REQUIRE(st == HBM_STATUS_OK, "hbm_leaks_since returned %d", (int)st);
    if (bytes != NULL) {
        *bytes = b;
    }
    return n;
}

/* The pinned-host and managed siblings are hbmalloc's too: each binds to its definition, and
 * what each hands out is in hbmalloc's tracker until it is freed. */
static void prove_host_and_managed_are_interposed(void) {
    void *cudart = dlopen("libcudart.so.13", RTLD_NOLOAD | RTLD_LAZY);
    REQUIRE(cudart != NULL, "libcudart.so.13 is not loaded");
    void *calls;
    CODE_ADDRESS(calls, cudaMallocHost);
    require_interposed(cudart, "cudaMallocHost", calls);
    CODE_ADDRESS(calls, cudaHostAlloc);
    require_interposed(cudart, "cudaHostAlloc", calls);
    CODE_ADDRESS(calls, cudaFreeHost);
    require_interposed(cudart, "cudaFreeHost", calls);
    CODE_ADDRESS(calls, cudaMallocManaged);
    require_interposed(cudart, "cudaMallocManaged", calls);
    REQUIRE(dlclose(cudart) == 0, "dlclose: %s", dlerror());

    void *sym = dlsym(RTLD_DEFAULT, "hbm_checkpoint");
    REQUIRE(sym != NULL, "no hbm_checkpoint in the process");
    memcpy(&hbm_checkpoint_ptr, &sym, sizeof sym);
    sym = dlsym(RTLD_DEFAULT, "hbm_leaks_since");
    REQUIRE(sym != NULL, "no hbm_leaks_since in the process");
    memcpy(&hbm_leaks_since_ptr, &sym, sizeof sym);

    uint64_t mark = hbm_checkpoint_ptr(), bytes = 0;
    void *h = NULL, *a = NULL, *m = NULL;
    REQUIRE(cudaMallocHost(&h, 1000) == cudaSuccess && h != NULL, "cudaMallocHost(1000)");
    REQUIRE(live_since(mark, &bytes) == 1 && bytes == 1000,
            "hbmalloc's tracker did not record cudaMallocHost (%" PRIu64 " bytes)", bytes);
    REQUIRE(cudaHostAlloc(&a, 3000, cudaHostAllocPortable | cudaHostAllocMapped) == cudaSuccess &&
                a != NULL,
            "cudaHostAlloc(3000, Portable|Mapped)");
    REQUIRE(cudaMallocManaged(&m, 5000, cudaMemAttachGlobal) == cudaSuccess && m != NULL,
            "cudaMallocManaged(5000)");
    REQUIRE(live_since(mark, &bytes) == 3 && bytes == 9000,
            "hbmalloc's tracker did not record cudaHostAlloc and cudaMallocManaged");
    REQUIRE(cudaFreeHost(h) == cudaSuccess && cudaFreeHost(a) == cudaSuccess, "cudaFreeHost");
    REQUIRE(cudaFree(m) == cudaSuccess, "cudaFree of managed memory");
    REQUIRE(live_since(mark, NULL) == 0, "the frees did not reach hbmalloc's tracker");
    printf("interposition proven: cudaMallocHost, cudaHostAlloc, cudaFreeHost and "
           "cudaMallocManaged are hbmalloc's, its tracker records them\n");
}

/* Runs one bad cudaFreeHost with stderr captured; checks its result and its diagnostic. */
static void bad_free_host(void *ptr, const char *diagnostic) {
    char text[1024];
    capture c;
    capture_begin(&c);
    cudaError_t err = cudaFreeHost(ptr);
    capture_end(&c, text, sizeof text);
    CHECK(err == cudaErrorInvalidValue, "cudaFreeHost(%p) = %d, want 1", ptr, (int)err);
    CHECK(strstr(text, "hbmalloc:") != NULL && strstr(text, diagnostic) != NULL,
          "cudaFreeHost(%p) printed \"%s\", want a line with \"hbmalloc:\" and \"%s\"", ptr, text,
          diagnostic);
    CHECK(cudaGetLastError() == cudaErrorInvalidValue, "cudaGetLastError after a bad cudaFreeHost");
    CHECK(cudaGetLastError() == cudaSuccess, "cudaGetLastError resets");
}

/* Pinned host memory: the runtime's contract for every input, page alignment, data, and the
 * device reaching it (on a GPU). */
static void pinned_host(void) {
    void *p;
    cudaError_t err;
    /* Size 0: success and NULL (docs/contract.md), for both entry points. */
    p = (void *)&p;
    err = cudaMallocHost(&p, 0);
    CHECK(err == cudaSuccess && p == NULL, "cudaMallocHost(&p, 0) = %d, p = %p", (int)err, p);
    p = (void *)&p;
    err = cudaHostAlloc(&p, 0, cudaHostAllocDefault);
    CHECK(err == cudaSuccess && p == NULL, "cudaHostAlloc(&p, 0) = %d, p = %p", (int)err, p);

    /* NULL out-pointer, unknown flags: invalid value, reported once by cudaGetLastError. */
    CHECK(cudaMallocHost(NULL, 16) == cudaErrorInvalidValue, "cudaMallocHost(NULL, 16)");
    CHECK(cudaGetLastError() == cudaErrorInvalidValue, "cudaGetLastError after cudaMallocHost(NULL)");
    CHECK(cudaGetLastError() == cudaSuccess, "cudaGetLastError resets");
    CHECK(cudaHostAlloc(NULL, 16, 0) == cudaErrorInvalidValue, "cudaHostAlloc(NULL, 16)");
    const unsigned bad_flags[] = {0x8, 0x10, 0x80000000u, 0x7 | 0x100};
    for (size_t i = 0; i < sizeof bad_flags / sizeof bad_flags[0]; i++) {
        p = NULL;
        err = cudaHostAlloc(&p, 4096, bad_flags[i]);
        CHECK(err == cudaErrorInvalidValue && p == NULL, "cudaHostAlloc(flags %#x) = %d, p = %p",
              bad_flags[i], (int)err, p);
    }
    CHECK(cudaGetLastError() == cudaErrorInvalidValue, "cudaGetLastError after bad flags");

    /* cudaFreeHost(NULL): 0. */
    CHECK(cudaFreeHost(NULL) == cudaSuccess, "cudaFreeHost(NULL)");
    CHECK(cudaGetLastError() == cudaSuccess, "no error recorded by cudaFreeHost(NULL)");

    /* Out of memory: cudaErrorMemoryAllocation, pointer untouched, cudaGetLastError reports it. */
    const size_t huge[] = {(size_t)256 << 40, SIZE_MAX, SIZE_MAX - 4095};
    for (size_t i = 0; i < sizeof huge / sizeof huge[0]; i++) {
        p = NULL;
        err = cudaMallocHost(&p, huge[i]);
        CHECK(err == cudaErrorMemoryAllocation && p == NULL, "cudaMallocHost(%zu) = %d, p = %p",
              huge[i], (int)err, p);
        CHECK(cudaGetLastError() == cudaErrorMemoryAllocation, "cudaGetLastError after pinned OOM");
        err = cudaHostAlloc(&p, huge[i], cudaHostAllocMapped);
        CHECK(err == cudaErrorMemoryAllocation && p == NULL, "cudaHostAlloc(%zu) = %d", huge[i],
              (int)err);
        CHECK(cudaGetLastError() == cudaErrorMemoryAllocation, "cudaGetLastError after pinned OOM");
    }

    /* Interior pointer, double free, pointers never allocated: 1, one line, nothing changed. */
    void *h = NULL;
    REQUIRE(cudaMallocHost(&h, 10000) == cudaSuccess && h != NULL, "cudaMallocHost(10000)");
    bad_free_host((char *)h + 4096, "inside the block");
    bad_free_host((char *)h + 1, "hbmalloc:");
    CHECK(cudaFreeHost(h) == cudaSuccess, "cudaFreeHost of the block after interior frees");
    bad_free_host(h, "double free");
    int on_stack = 0;
    bad_free_host(&on_stack, "not a pointer hbmalloc allocated");
    void *heap = malloc(64);
    REQUIRE(heap != NULL, "malloc");
    bad_free_host(heap, "not a pointer hbmalloc allocated");
    free(heap);

    /* Each free refuses the other kind of memory, and frees nothing. */
    void *d = NULL;
    REQUIRE(cudaMalloc(&d, 4096) == cudaSuccess, "cudaMalloc(4096)");
    bad_free_host(d, "not pinned host memory");
    CHECK(cudaFree(d) == cudaSuccess, "the device block survived cudaFreeHost");
    REQUIRE(cudaMallocHost(&h, 4096) == cudaSuccess, "cudaMallocHost(4096)");
    bad_free(h, cudaErrorInvalidValue, "free it with cudaFreeHost");
    CHECK(cudaFreeAsync(h, cudaStreamPerThread) == cudaErrorInvalidValue, "cudaFreeAsync(pinned)");
    CHECK(cudaGetLastError() == cudaErrorInvalidValue, "cudaGetLastError after cudaFreeAsync(pinned)");
    CHECK(cudaFreeHost(h) == cudaSuccess, "the pinned block survived cudaFree");

    /* Page-aligned, disjoint, and what the CPU writes stays; on a GPU the device reaches it. */
    enum { N = 64 };
    static void *ptrs[N];
    static size_t sizes[N];
    uint32_t rng = 777;
    for (int i = 0; i < N; i++) {
        sizes[i] = 1 + next_random(&rng) % ((i % 8 == 0) ? (6u << 20) : (40u << 10));
        err = (i % 2) ? cudaMallocHost(&ptrs[i], sizes[i])
                      : cudaHostAlloc(&ptrs[i], sizes[i], (unsigned)(i / 2) % 4);
        REQUIRE(err == cudaSuccess && ptrs[i] != NULL, "pinned allocation %d of %zu = %d", i,
                sizes[i], (int)err);
        CHECK((uintptr_t)ptrs[i] % 4096 == 0, "pinned %zu bytes at %p is not page-aligned",
              sizes[i], ptrs[i]);
        memset(ptrs[i], i, sizes[i]);
    }
    int corrupted = 0;
    for (int i = 0; i < N; i++) {
        const unsigned char *b = ptrs[i];
        for (size_t j = 0; j < sizes[i]; j += 97) {
            corrupted += b[j] != (unsigned char)i;
        }
        corrupted += b[sizes[i] - 1] != (unsigned char)i;
    }
    CHECK(corrupted == 0, "%d bytes of pinned memory lost what was written", corrupted);
    if (on_device) {
        /* Through the device and back, and the block is mapped for it (cudaHostAllocMapped). */
        size_t n = sizes[1];
        void *dev = NULL;
        REQUIRE(cudaMalloc(&dev, n) == cudaSuccess, "cudaMalloc(%zu)", n);
        CHECK(cudaMemcpy(dev, ptrs[1], n, cudaMemcpyHostToDevice) == cudaSuccess, "H2D from pinned");
        memset(ptrs[1], 0, n);
        CHECK(cudaMemcpy(ptrs[1], dev, n, cudaMemcpyDeviceToHost) == cudaSuccess, "D2H to pinned");
        CHECK(((unsigned char *)ptrs[1])[n - 1] == 1, "pinned data did not survive the device");
        CHECK(cudaFree(dev) == cudaSuccess, "cudaFree");
        void *mapped = NULL;
        err = cudaHostGetDevicePointer(&mapped, ptrs[2], 0);
        CHECK(err == cudaSuccess && mapped != NULL, "cudaHostGetDevicePointer = %d", (int)err);
        struct cudaPointerAttributes attr;
        memset(&attr, 0, sizeof attr);
        err = cudaPointerGetAttributes(&attr, ptrs[3]);
        CHECK(err == cudaSuccess && attr.type == cudaMemoryTypeHost,
              "cudaPointerGetAttributes(pinned) = %d, type %d", (int)err, (int)attr.type);
    }
    /* hbm_trim(-1) returns the pinned pool's cached memory too: the device pools are emptied
     * first, so what the second trim releases is the pinned blocks freed in between. */
    typedef enum HbmStatus (*hbm_trim_fn)(int device, uint64_t *out_released);
    hbm_trim_fn trim = NULL;
    void *trim_sym = dlsym(RTLD_DEFAULT, "hbm_trim");
    REQUIRE(trim_sym != NULL, "hbm_trim not found");
    memcpy(&trim, &trim_sym, sizeof trim_sym);
    uint64_t released = 0;
    CHECK(trim(-1, NULL) == HBM_STATUS_OK, "hbm_trim(-1) before the pinned frees");
    for (int i = 0; i < N; i++) {
        CHECK(cudaFreeHost(ptrs[i]) == cudaSuccess, "cudaFreeHost(ptrs[%d])", i);
    }
    CHECK(trim(-1, &released) == HBM_STATUS_OK && released >= (1u << 20),
          "hbm_trim(-1) released %" PRIu64 " bytes after the pinned frees", released);

    /* Write-combined memory: the runtime's own on a GPU (not pooled), still tracked. */
    uint64_t mark = hbm_checkpoint_ptr();
    void *wc = NULL;
    err = cudaHostAlloc(&wc, 8192, cudaHostAllocWriteCombined | cudaHostAllocMapped);
    CHECK(err == cudaSuccess && wc != NULL, "cudaHostAlloc(WriteCombined) = %d", (int)err);
    if (wc != NULL) {
        memset(wc, 0x3c, 8192);
        CHECK(live_since(mark, NULL) == 1, "write-combined memory is not tracked");
        bad_free(wc, cudaErrorInvalidValue, "free it with cudaFreeHost");
        CHECK(cudaFreeHost(wc) == cudaSuccess, "cudaFreeHost(write-combined)");
        CHECK(live_since(mark, NULL) == 0, "freed write-combined memory is still tracked");
    }
    CHECK(cudaGetLastError() == cudaSuccess, "no error left by the pinned checks");
}

/* Managed memory: the runtime's own (host memory on backend:sim), tracked, freed by cudaFree. */
static void managed(void) {
    void *m = NULL;
    cudaError_t err;
    uint64_t mark = hbm_checkpoint_ptr();
    /* Size 0: success and NULL (the CUDA 13 runtime on an H200, though documented as
     * cudaErrorInvalidValue), nothing recorded. */
    m = NULL;
    err = cudaMallocManaged(&m, 0, cudaMemAttachGlobal);
    CHECK(err == cudaSuccess && m == NULL, "cudaMallocManaged(0) = %d, %p", (int)err, m);
    /* NULL, flags other than exactly one of cudaMemAttachGlobal / cudaMemAttachHost. On a GPU
     * the runtime answers these itself, so only "it failed and nothing was recorded" is
     * hbmalloc's part; on sim, the exact code. */
    struct {
        int null_ptr;
        size_t size;
        unsigned flags;
    } bad[] = {{1, 16, cudaMemAttachGlobal}, {0, 16, 0},
               {0, 16, cudaMemAttachGlobal | cudaMemAttachHost}, {0, 16, 0x4}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        m = NULL;
        err = cudaMallocManaged(bad[i].null_ptr ? NULL : &m, bad[i].size, bad[i].flags);
        if (on_device) {
            CHECK(err != cudaSuccess, "cudaMallocManaged(bad input %zu) succeeded", i);
        } else {
            CHECK(err == cudaErrorInvalidValue, "cudaMallocManaged(bad input %zu) = %d", i, (int)err);
        }
        CHECK(m == NULL, "cudaMallocManaged(bad input %zu) set %p", i, m);
        CHECK(cudaGetLastError() == err, "cudaGetLastError after cudaMallocManaged(bad input %zu)", i);
    }
    if (!on_device) {
        err = cudaMallocManaged(&m, SIZE_MAX, cudaMemAttachGlobal);
        CHECK(err == cudaErrorMemoryAllocation && m == NULL, "cudaMallocManaged(SIZE_MAX) = %d",
              (int)err);
        CHECK(cudaGetLastError() == cudaErrorMemoryAllocation, "cudaGetLastError after managed OOM");
    }
    CHECK(live_since(mark, NULL) == 0, "a failed cudaMallocManaged was recorded");

    /* Both flags; the CPU reads back what it wrote; cudaFreeHost refuses it; cudaFree frees it
     * once. */
    const unsigned flags[] = {cudaMemAttachGlobal, cudaMemAttachHost};
    for (size_t i = 0; i < 2; i++) {
        m = NULL;
        err = cudaMallocManaged(&m, 100000, flags[i]);
        REQUIRE(err == cudaSuccess && m != NULL, "cudaMallocManaged(100000, %u) = %d", flags[i],
                (int)err);
        CHECK((uintptr_t)m % 256 == 0, "managed memory at %p is not 256-aligned", m);
        memset(m, 0x5a, 100000);
        CHECK(((unsigned char *)m)[99999] == 0x5a, "managed memory lost what was written");
        CHECK(live_since(mark, NULL) == 1, "managed memory is not tracked");
        bad_free_host(m, "not pinned host memory");
        CHECK(cudaFree(m) == cudaSuccess, "cudaFree(managed)");
        CHECK(live_since(mark, NULL) == 0, "freed managed memory is still tracked");
        CHECK(cudaFree(m) == cudaErrorInvalidValue, "second cudaFree(managed)");
        CHECK(cudaGetLastError() == cudaErrorInvalidValue, "cudaGetLastError after a double free");
    }
}

/* Pinned memory from 8 threads at once: no block handed to two threads, nothing printed. */
enum { HOST_THREADS = 8, HOST_ITERATIONS = 2000 };

static void *pinned_worker(void *arg) {
    struct worker *w = arg;
    void *ptrs[4] = {0};
    size_t sizes[4] = {0};
    uint32_t rng = 0x51ed270bu * (uint32_t)(w->id + 1);
    for (int i = 0; i < HOST_ITERATIONS; i++) {
        int slot = (int)(next_random(&rng) % 4);
        unsigned char tag = (unsigned char)(w->id * 16 + (i & 15)) | 1;
        if (ptrs[slot] != NULL) {
            const unsigned char *b = ptrs[slot];
            unsigned char want = b[0];
            for (size_t j = 0; j < sizes[slot]; j += 512) {
                if (b[j] != want || (want >> 4) != (unsigned)w->id) {
                    worker_fail(w, "a live pinned block was overwritten", i, (long)sizes[slot]);
                    break;
                }
            }
            if (cudaFreeHost(ptrs[slot]) != cudaSuccess) {
                worker_fail(w, "cudaFreeHost failed", i, 0);
            }
            ptrs[slot] = NULL;
        }
        sizes[slot] = 1 + next_random(&rng) % (256u << 10);
        cudaError_t err = (i & 1) ? cudaMallocHost(&ptrs[slot], sizes[slot])
                                  : cudaHostAlloc(&ptrs[slot], sizes[slot], cudaHostAllocPortable);
        if (err != cudaSuccess || ptrs[slot] == NULL) {
            worker_fail(w, "pinned allocation failed", i, err);
            ptrs[slot] = NULL;
            continue;
        }
        memset(ptrs[slot], tag, sizes[slot]);
    }
    for (int slot = 0; slot < 4; slot++) {
        if (ptrs[slot] != NULL && cudaFreeHost(ptrs[slot]) != cudaSuccess) {
            worker_fail(w, "final cudaFreeHost failed", HOST_ITERATIONS, 0);
        }
    }
    return NULL;
}

static void pinned_threads(void) {
    pthread_t threads[HOST_THREADS];
    struct worker workers[HOST_THREADS];
    static char diagnostics[64 * 1024];
    uint64_t mark = hbm_checkpoint_ptr();
    capture c;
    capture_begin(&c);
    for (int t = 0; t < HOST_THREADS; t++) {
        memset(&workers[t], 0, sizeof workers[t]);
        workers[t].id = t;
        int rc = pthread_create(&threads[t], NULL, pinned_worker, &workers[t]);
        REQUIRE(rc == 0, "pthread_create: %s", strerror(rc));
    }
    for (int t = 0; t < HOST_THREADS; t++) {
        int rc = pthread_join(threads[t], NULL);
        REQUIRE(rc == 0, "pthread_join: %s", strerror(rc));
        CHECK(workers[t].failures == 0, "pinned thread %d: %d failures, first: %s", t,
              workers[t].failures, workers[t].first_failure);
    }
    capture_end(&c, diagnostics, sizeof diagnostics);
    CHECK(strstr(diagnostics, "hbmalloc") == NULL,
          "valid pinned calls from %d threads made hbmalloc print diagnostics", HOST_THREADS);
    CHECK(live_since(mark, NULL) == 0, "pinned blocks left on record after the threads");
}

/* Left allocated on purpose: the leak report at exit must name both (CTest checks it). */
static void leak_on_purpose(void) {
    void *h = NULL, *m = NULL;
    REQUIRE(cudaMallocHost(&h, 12345) == cudaSuccess, "cudaMallocHost(12345)");
    REQUIRE(cudaMallocManaged(&m, 23456, cudaMemAttachGlobal) == cudaSuccess,
            "cudaMallocManaged(23456)");
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s SIM_CAPACITY_BYTES|cuda   (run with LD_PRELOAD=libhbmalloc.so "
                        "HBMALLOC_CONF=backend:sim,sim_capacity:... or backend:cuda)\n", argv[0]);
        return 2;
    }
    on_device = strcmp(argv[1], "cuda") == 0;
    if (on_device) {
        argv[1] = "1"; /* replaced by the device's total in mem_get_info */
    }
    char *end = NULL;
    errno = 0;
    unsigned long long capacity = strtoull(argv[1], &end, 10);
    REQUIRE(errno == 0 && end != argv[1] && *end == '\0' && capacity > 0,
            "bad SIM_CAPACITY_BYTES '%s'", argv[1]);

    prove_hbmalloc_serves_the_runtime_api();
    prove_host_and_managed_are_interposed();
    contract_table();
    alignment();
    mem_get_info((size_t)capacity);
    data_and_overlap();
    thread_stress();
    pinned_host();
    managed();
    pinned_threads();
    leak_on_purpose();

    HbmStats s = stats_now();
    CHECK(s.in_use == 0, "%" PRIu64 " bytes still in use at the end", s.in_use);
    printf("pool: %" PRIu64 " allocs, %" PRIu64 " frees, %" PRIu64 " hits, %" PRIu64
           " driver allocs, %" PRIu64 " syncs, peak reserved %" PRIu64 " B\n",
           s.allocs, s.frees, s.pool_hits, s.driver_allocs, s.syncs, s.peak_reserved);
    return check_summary("interpose_runtime");
}
