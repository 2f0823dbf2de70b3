// The C++ wrappers of include/hbmalloc.hpp over the scratch pools and plain device memory.
// Runs on the simulated device (HBMALLOC_CONF=backend:sim unless the environment says otherwise);
// exits non-zero on the first failed check.

#include "hbmalloc.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

static int failures = 0;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);         \
            ++failures;                                                                            \
        }                                                                                          \
    } while (0)

// Runs `body`, which must throw hbm::error with `want`.
template <typename F>
static void expect_error(HbmStatus want, F body, int line) {
    try {
        body();
        std::fprintf(stderr, "line %d: no exception\n", line);
        ++failures;
    } catch (const hbm::error &e) {
        if (e.status() != want) {
            std::fprintf(stderr, "line %d: status %d (%s), wanted %d\n", line, (int)e.status(),
                         e.what(), (int)want);
            ++failures;
        }
    }
}
#define EXPECT_ERROR(want, ...) expect_error(want, [&] { __VA_ARGS__; }, __LINE__)

static_assert(!std::is_copy_constructible<hbm::pool>::value, "pool is move-only");
static_assert(!std::is_copy_constructible<hbm::pool_alloc<float>>::value, "move-only");
static_assert(!std::is_copy_assignable<hbm::device_buffer<int>>::value, "move-only");
static_assert(std::is_nothrow_move_constructible<hbm::pool_alloc<float>>::value, "");
static_assert(std::is_base_of<std::runtime_error, hbm::error>::value, "");

// The scratch pattern of ggml's operators: nested allocations, freed in reverse order on scope
// exit, then the same again (every block is reused).
static void scratch_pattern(hbm::pool &pool, bool sim) {
    for (int round = 0; round < 3; ++round) {
        hbm::pool_alloc<float> a(pool, 1 << 16);
        {
            hbm::pool_alloc<char> b(pool, 3000);
            hbm::pool_alloc<double> c(pool);
            c.alloc(777);
            CHECK(a.get() && b.get() && c.get());
            CHECK(a.actual_size() >= (1u << 16) * sizeof(float));
            CHECK(c.actual_size() >= 777 * sizeof(double));
            CHECK(reinterpret_cast<uintptr_t>(b.get()) % 256 == 0);
            if (sim) { // device pointers are host memory on the simulated device
                std::memset(b.get(), 0x5a, 3000);
            }
            CHECK(pool.stats().live == 3);
        }
        CHECK(pool.stats().live == 1);
    }
    HbmPoolStats s = pool.stats();
    CHECK(s.live == 0 && s.in_use == 0);
    CHECK(s.allocs == 9 && s.frees == 9);
    CHECK(s.hits >= 6); // rounds 2 and 3 reuse round 1's memory
}

static void pools(bool sim) {
    hbm::pool vmm(0, HBM_POOL_KIND_VMM);
    CHECK(vmm.kind() == HBM_POOL_KIND_VMM || !sim);
    scratch_pattern(vmm, sim);

    HbmPoolOptions o;
    CHECK(hbm_pool_options_default(&o) == HBM_STATUS_OK);
    o.overallocation_percent = 0;
    hbm::pool legacy(0, HBM_POOL_KIND_LEGACY, &o);
    CHECK(legacy.kind() == HBM_POOL_KIND_LEGACY);
    scratch_pattern(legacy, sim);
    CHECK(legacy.trim() > 0); // else best fit hands out a cached 3 KiB buffer
    {
        hbm::pool_alloc<char> x(legacy, 1000);
        CHECK(x.actual_size() == 1024); // 256-byte rounding, no over-allocation
    }

    // Frees in any order through the raw interface, as ggml's pool->free(ptr, actual).
    size_t n1 = 0, n2 = 0, n3 = 0;
    void *p1 = vmm.alloc(1 << 20, &n1), *p2 = vmm.alloc(1 << 18, &n2), *p3 = vmm.alloc(5000, &n3);
    vmm.free(p2, n2);
    vmm.free(p1, n1);
    EXPECT_ERROR(HBM_STATUS_INVALID_VALUE, vmm.free(p3, n3 + 256));
    EXPECT_ERROR(HBM_STATUS_INVALID_POINTER, vmm.free(p1, n1));
    vmm.free(p3, n3);
    CHECK(vmm.trim() > 0);
    CHECK(vmm.stats().committed == 0);
    CHECK(legacy.trim() > 0);

    // Move semantics: exactly one owner frees.
    hbm::pool_alloc<int> m1(vmm, 100);
    int *raw = m1.get();
    hbm::pool_alloc<int> m2(std::move(m1));
    CHECK(m1.get() == nullptr && m2.get() == raw);
    hbm::pool_alloc<int> m3;
    m3 = std::move(m2);
    CHECK(m3.get() == raw && vmm.stats().live == 1);
    EXPECT_ERROR(HBM_STATUS_INVALID_VALUE, m3.alloc(1));
    m3.reset();
    CHECK(vmm.stats().live == 0);
    hbm::pool_alloc<int> unbound;
    EXPECT_ERROR(HBM_STATUS_NULL_PARAMETER, unbound.alloc(1));
    CHECK(unbound.alloc(vmm, 10) != nullptr);
    EXPECT_ERROR(HBM_STATUS_OUT_OF_MEMORY, hbm::pool_alloc<char>(vmm, SIZE_MAX / 2));
    EXPECT_ERROR(HBM_STATUS_INVALID_VALUE, hbm::pool_alloc<double>(vmm, SIZE_MAX / 4));

    hbm::pool moved(std::move(legacy));
    CHECK(!legacy && moved);
    EXPECT_ERROR(HBM_STATUS_NULL_PARAMETER, legacy.stats());
    EXPECT_ERROR(HBM_STATUS_INVALID_DEVICE, hbm::pool(99, HBM_POOL_KIND_LEGACY));
    // `unbound` is still live: it is freed before `vmm` is destroyed (reverse declaration order).
}

static void device_buffers(bool sim) {
    HbmStats before{}, after{};
    CHECK(hbm_stats(0, &before) == HBM_STATUS_OK);
    {
        hbm::device_buffer<int> a(1024);
        CHECK(a && a.size() == 1024 && a.bytes() == 4096);
        if (sim) {
            a.get()[1023] = 7;
        }
        hbm::device_buffer<int> b(std::move(a));
        CHECK(!a && b.size() == 1024);
        hbm::device_buffer<int> c;
        c = std::move(b);
        CHECK(c.get() != nullptr);
        hbm::device_buffer<char> empty(0);
        CHECK(!empty);
        int *kept = hbm::device_buffer<int>(16).release();
        CHECK(hbm_device_free(kept) == HBM_STATUS_OK);
    }
    CHECK(hbm_stats(0, &after) == HBM_STATUS_OK);
    CHECK(after.allocs - before.allocs == after.frees - before.frees);
    EXPECT_ERROR(HBM_STATUS_OUT_OF_MEMORY, hbm::device_buffer<char>(SIZE_MAX / 2));
    EXPECT_ERROR(HBM_STATUS_INVALID_VALUE, hbm::device_buffer<double>(SIZE_MAX / 4));
}

int main() {
    setenv("HBMALLOC_CONF", "backend:sim", 0); // before the library's first call reads it
    const bool sim = std::strcmp(hbm_backend_name(), "sim") == 0;
    try {
        pools(sim);
        device_buffers(sim);
    } catch (const hbm::error &e) {
        std::fprintf(stderr, "unexpected hbm::error: %s (status %d)\n", e.what(), (int)e.status());
        return 1;
    }
    if (failures != 0) {
        std::fprintf(stderr, "pool_raii: %d check(s) failed\n", failures);
        return 1;
    }
    std::printf("pool_raii: ok (%s backend)\n", hbm_backend_name());
    return 0;
}
