/* The hbm_* C API through the generated header, linked directly against libhbmalloc (no CUDA
 * runtime anywhere). Run with HBMALLOC_CONF=backend:sim; `--expect-backend sim` also checks
 * hbm_backend_name. CTest runs it a second time with a malformed HBMALLOC_CONF and checks that
 * it still passes and that stderr names the bad keys.
 *
 * The test never touches the memory it allocates, so it holds on a real device as well. */
#define _POSIX_C_SOURCE 200809L /* fileno, dup, dup2 */
#include "hbmalloc.h"

#include <inttypes.h>
#include <stdint.h>

#include "check.h"

static HbmStats stats_now(void) {
    HbmStats s;
    memset(&s, 0, sizeof s);
    enum HbmStatus st = hbm_stats(0, &s);
    REQUIRE(st == HBM_STATUS_OK, "hbm_stats(0) = %d (%s)", (int)st, hbm_status_str(st));
    return s;
}

static void identity(const char *expected_backend) {
    const char *v = hbm_version();
    REQUIRE(v != NULL, "hbm_version() is NULL");
    CHECK(strcmp(v, HBMALLOC_VERSION) == 0, "hbm_version() \"%s\", header says \"%s\"", v,
          HBMALLOC_VERSION);
    char from_macros[64];
    snprintf(from_macros, sizeof from_macros, "%d.%d.%d", HBMALLOC_VERSION_MAJOR,
             HBMALLOC_VERSION_MINOR, HBMALLOC_VERSION_PATCH);
    CHECK(strncmp(v, from_macros, strlen(from_macros)) == 0, "hbm_version() \"%s\" vs macros %s", v,
          from_macros);

    const char *backend = hbm_backend_name();
    REQUIRE(backend != NULL, "hbm_backend_name() is NULL");
    CHECK(strcmp(backend, "sim") == 0 || strcmp(backend, "cuda") == 0, "backend \"%s\"", backend);
    if (expected_backend != NULL) {
        CHECK(strcmp(backend, expected_backend) == 0, "backend \"%s\", want \"%s\"", backend,
              expected_backend);
    }
    CHECK(hbm_device_count() >= 1, "hbm_device_count() = %d", hbm_device_count());

    /* Every status has its own, non-empty text. Only declared values are passed: the parameter is
     * an enum, and a value outside it is undefined behaviour on the Rust side. */
    const enum HbmStatus all[] = {
        HBM_STATUS_OK,            HBM_STATUS_NULL_PARAMETER, HBM_STATUS_INVALID_VALUE,
        HBM_STATUS_OUT_OF_MEMORY, HBM_STATUS_INVALID_POINTER, HBM_STATUS_NOT_SUPPORTED,
        HBM_STATUS_INVALID_DEVICE, HBM_STATUS_DRIVER_ERROR,  HBM_STATUS_PANIC,
        HBM_STATUS_IO_ERROR,
    };
    const size_t n = sizeof all / sizeof all[0];
    CHECK(HBM_STATUS_OK == 0, "HBM_STATUS_OK is %d", (int)HBM_STATUS_OK);
    for (size_t i = 0; i < n; i++) {
        const char *text = hbm_status_str(all[i]);
        CHECK(text != NULL && text[0] != '\0', "hbm_status_str(%d) is empty", (int)all[i]);
        for (size_t j = 0; text != NULL && j < i; j++) {
            CHECK(strcmp(text, hbm_status_str(all[j])) != 0, "statuses %d and %d share \"%s\"",
                  (int)all[i], (int)all[j], text);
        }
    }
}

static void bad_inputs(void) {
    void *p = (void *)&p;
    HbmStats s;
    CHECK(hbm_device_alloc(0, 16, NULL) == HBM_STATUS_NULL_PARAMETER, "alloc with NULL out_ptr");
    CHECK(hbm_device_alloc(0, 0, NULL) == HBM_STATUS_NULL_PARAMETER, "alloc of 0 with NULL out_ptr");
    CHECK(hbm_stats(0, NULL) == HBM_STATUS_NULL_PARAMETER, "hbm_stats with NULL out_stats");

    CHECK(hbm_device_alloc(0, 0, &p) == HBM_STATUS_OK && p == NULL, "size 0: OK and NULL, got %p", p);
    CHECK(hbm_device_free(NULL) == HBM_STATUS_OK, "hbm_device_free(NULL)");

    p = NULL;
    CHECK(hbm_device_alloc(-1, 16, &p) == HBM_STATUS_INVALID_DEVICE && p == NULL, "device -1");
    CHECK(hbm_device_alloc(4096, 16, &p) == HBM_STATUS_INVALID_DEVICE && p == NULL, "device 4096");
    CHECK(hbm_stats(-1, &s) == HBM_STATUS_INVALID_DEVICE, "hbm_stats(-1)");
    CHECK(hbm_trim(4096, NULL) == HBM_STATUS_INVALID_DEVICE, "hbm_trim(4096)");

    const size_t huge[] = {SIZE_MAX, SIZE_MAX - 511, (size_t)256 << 40};
    for (size_t i = 0; i < sizeof huge / sizeof huge[0]; i++) {
        p = NULL;
        enum HbmStatus st = hbm_device_alloc(0, huge[i], &p);
        CHECK(st == HBM_STATUS_OUT_OF_MEMORY && p == NULL, "alloc of %zu: %d, %p", huge[i], (int)st, p);
    }

    /* Double, interior and foreign frees: INVALID_POINTER and one diagnostic line each. */
    void *block = NULL;
    REQUIRE(hbm_device_alloc(0, 4096, &block) == HBM_STATUS_OK && block != NULL, "alloc 4096");
    char text[1024];
    capture c;

    capture_begin(&c);
    enum HbmStatus st = hbm_device_free((char *)block + 512);
    capture_end(&c, text, sizeof text);
    CHECK(st == HBM_STATUS_INVALID_POINTER, "interior free = %d", (int)st);
    CHECK(strstr(text, "hbmalloc:") != NULL && strstr(text, "inside the block"),
          "interior free printed \"%s\"", text);

    CHECK(hbm_device_free(block) == HBM_STATUS_OK, "free of the block after the interior free");
    capture_begin(&c);
    st = hbm_device_free(block);
    capture_end(&c, text, sizeof text);
    CHECK(st == HBM_STATUS_INVALID_POINTER, "double free = %d", (int)st);
    CHECK(strstr(text, "hbmalloc:") != NULL && strstr(text, "double free"),
          "double free printed \"%s\"", text);

    int on_stack = 0;
    capture_begin(&c);
    st = hbm_device_free(&on_stack);
    capture_end(&c, text, sizeof text);
    CHECK(st == HBM_STATUS_INVALID_POINTER, "free of a stack address = %d", (int)st);
    CHECK(strstr(text, "hbmalloc:") != NULL, "foreign free printed \"%s\"", text);
}

/* Statistics add up; trimming returns every cached byte once nothing is in use. */
static void stats_and_trim(void) {
    enum { N = 100 };
    void *ptrs[N];
    size_t requested = 0;
    HbmStats before = stats_now();
    for (int i = 0; i < N; i++) {
        size_t size = (size_t)(i + 1) * 40000 + 7; /* 40 KB .. 4 MB, not multiples of anything */
        enum HbmStatus st = hbm_device_alloc(0, size, &ptrs[i]);
        REQUIRE(st == HBM_STATUS_OK && ptrs[i] != NULL, "alloc %zu = %d", size, (int)st);
        CHECK((uintptr_t)ptrs[i] % 512 == 0, "%p is not 512-aligned", ptrs[i]);
        requested += size;
    }
    HbmStats live = stats_now();
    CHECK(live.allocs == before.allocs + N, "allocs %" PRIu64 " -> %" PRIu64, before.allocs, live.allocs);
    CHECK(live.in_use >= before.in_use + requested, "in_use %" PRIu64 " < requested %zu",
          live.in_use - before.in_use, requested);
    CHECK(live.in_use <= before.in_use + requested + requested / 4 + (size_t)N * (2 << 20),
          "in_use %" PRIu64 " is far above the %zu requested", live.in_use - before.in_use, requested);
    CHECK(live.reserved >= live.in_use, "reserved %" PRIu64 " < in_use %" PRIu64, live.reserved,
          live.in_use);
    CHECK(live.peak_in_use >= live.in_use, "peak_in_use %" PRIu64 " < in_use %" PRIu64,
          live.peak_in_use, live.in_use);
    CHECK(live.peak_reserved >= live.reserved, "peak_reserved below reserved");
    CHECK(live.driver_allocs > before.driver_allocs, "no driver allocation for %zu bytes", requested);

    for (int i = 0; i < N; i += 2) { /* half, then the rest: in_use falls step by step */
        CHECK(hbm_device_free(ptrs[i]) == HBM_STATUS_OK, "free ptrs[%d]", i);
    }
    HbmStats half = stats_now();
    CHECK(half.in_use < live.in_use && half.in_use > before.in_use, "in_use %" PRIu64
          " after freeing half (was %" PRIu64 ")", half.in_use, live.in_use);
    for (int i = 1; i < N; i += 2) {
        CHECK(hbm_device_free(ptrs[i]) == HBM_STATUS_OK, "free ptrs[%d]", i);
    }
    HbmStats freed = stats_now();
    CHECK(freed.in_use == before.in_use, "in_use %" PRIu64 " after freeing all, was %" PRIu64,
          freed.in_use, before.in_use);
    CHECK(freed.frees == before.frees + N, "frees %" PRIu64 " -> %" PRIu64, before.frees, freed.frees);
    CHECK(freed.reserved > 0, "the pool should cache what was freed (reserved %" PRIu64 ")", freed.reserved);

    /* Reuse: the same sizes again come from the cache, not the driver. */
    HbmStats reuse_before = stats_now();
    for (int i = 0; i < N; i++) {
        REQUIRE(hbm_device_alloc(0, (size_t)(i + 1) * 40000 + 7, &ptrs[i]) == HBM_STATUS_OK, "realloc %d", i);
    }
    for (int i = N - 1; i >= 0; i--) {
        CHECK(hbm_device_free(ptrs[i]) == HBM_STATUS_OK, "free ptrs[%d]", i);
    }
    HbmStats reuse = stats_now();
    CHECK(reuse.pool_hits > reuse_before.pool_hits, "no allocation was served from the cache");

    uint64_t released = 0;
    HbmStats pre_trim = stats_now();
    CHECK(hbm_trim(0, &released) == HBM_STATUS_OK, "hbm_trim(0)");
    HbmStats trimmed = stats_now();
    CHECK(trimmed.reserved == 0, "reserved %" PRIu64 " after freeing all and trimming", trimmed.reserved);
    CHECK(released == pre_trim.reserved, "hbm_trim released %" PRIu64 ", %" PRIu64 " was reserved",
          released, pre_trim.reserved);
    CHECK(trimmed.driver_frees > pre_trim.driver_frees, "trim made no driver free");
    CHECK(trimmed.peak_reserved >= live.reserved, "peak_reserved forgot the peak");
    CHECK(hbm_trim(-1, NULL) == HBM_STATUS_OK, "hbm_trim(-1, NULL)");
    released = 12345;
    CHECK(hbm_trim(0, &released) == HBM_STATUS_OK && released == 0, "second trim released %" PRIu64,
          released);

    /* The pool still works after a trim. */
    void *p = NULL;
    CHECK(hbm_device_alloc(0, 1 << 20, &p) == HBM_STATUS_OK && p != NULL, "alloc after trim");
    CHECK(hbm_device_free(p) == HBM_STATUS_OK, "free after trim");
}

int main(int argc, char **argv) {
    const char *expected_backend = NULL;
    int leak = 0;  /* --leak: keep one 4096-byte block, for the exit report to name */
    int clean = 0; /* --clean: no bad input either, so the exit report has nothing to say */
    if (argc == 3 && strcmp(argv[1], "--expect-backend") == 0) {
        expected_backend = argv[2];
    } else if (argc == 2 && strcmp(argv[1], "--leak") == 0) {
        leak = 1;
    } else if (argc == 2 && strcmp(argv[1], "--clean") == 0) {
        clean = 1;
    } else if (argc != 1) {
        fprintf(stderr, "usage: %s [--expect-backend sim|cuda | --leak | --clean]\n", argv[0]);
        return 2;
    }
    identity(expected_backend);
    if (!clean) {
        bad_inputs();
    }
    stats_and_trim();
    HbmStats s = stats_now();
    CHECK(s.in_use == 0, "%" PRIu64 " bytes still in use at the end", s.in_use);
    if (leak) {
        void *kept = NULL;
        CHECK(hbm_device_alloc(0, 4096, &kept) == HBM_STATUS_OK && kept != NULL, "alloc to leak");
    }
    return check_summary("direct_link");
}
