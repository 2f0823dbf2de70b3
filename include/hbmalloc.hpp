/* hbmalloc: GPU memory manager for LLM inference. C++17 RAII wrappers over the C API.
 * SPDX-License-Identifier: MIT OR Apache-2.0
 *
 * Header-only; link libhbmalloc. Every owning type here is move-only and gives its memory back
 * in its destructor, which never throws. Every other failure throws hbm::error, which carries the
 * HbmStatus of the call that failed.
 *
 *   hbm::pool pool(0, HBM_POOL_KIND_VMM);          // a scratch pool on device 0
 *   {
 *       hbm::pool_alloc<float> tmp(pool, n);      // like ggml's ggml_cuda_pool_alloc<float>
 *       kernel<<<grid, block, 0, stream>>>(tmp.get(), n);
 *   }                                             // freed here, reusable at once on `stream`
 *   hbm::device_buffer<half> weights(n_weights);  // hbm_device_alloc / hbm_device_free
 */
#ifndef HBMALLOC_HPP
#define HBMALLOC_HPP

#include "hbmalloc.h"

#include <cstddef>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>

namespace hbm {

/** A failed hbmalloc call: what() names the call and the reason; status() is its HbmStatus. */
class error : public std::runtime_error {
public:
    error(HbmStatus status, const char *call)
        : std::runtime_error(std::string(call) + ": " + hbm_status_str(status)), status_(status) {}

    HbmStatus status() const noexcept { return status_; }

private:
    HbmStatus status_;
};

namespace detail {

inline void check(HbmStatus status, const char *call) {
    if (status != HBM_STATUS_OK) {
        throw error(status, call);
    }
}

/** n * sizeof(T), or an hbm::error if that does not fit in size_t. */
template <typename T>
std::size_t bytes_of(std::size_t n, const char *call) {
    if (n > std::numeric_limits<std::size_t>::max() / sizeof(T)) {
        throw error(HBM_STATUS_INVALID_VALUE, call);
    }
    return n * sizeof(T);
}

} // namespace detail

/** An owning scratch pool (hbm_pool_create / hbm_pool_destroy). Thread-safe, move-only.
 *  Destroying it frees everything it handed out; outlive every pool_alloc taken from it. */
class pool {
public:
    /** A pool of `kind` on `device`; `options` NULL for the defaults. A VMM pool that the device
     *  cannot serve becomes a legacy pool (kind() tells). Throws hbm::error. */
    explicit pool(int device = 0, HbmPoolKind kind = HBM_POOL_KIND_VMM,
                  const HbmPoolOptions *options = nullptr) {
        detail::check(hbm_pool_create(device, kind, options, &pool_), "hbm_pool_create");
    }

    ~pool() { hbm_pool_destroy(pool_); }

    pool(pool &&other) noexcept : pool_(std::exchange(other.pool_, nullptr)) {}
    pool &operator=(pool &&other) noexcept {
        if (this != &other) {
            hbm_pool_destroy(pool_);
            pool_ = std::exchange(other.pool_, nullptr);
        }
        return *this;
    }
    pool(const pool &) = delete;
    pool &operator=(const pool &) = delete;

    /** At least `size` bytes; `*actual` receives what free() needs back. ggml's alloc(). */
    void *alloc(std::size_t size, std::size_t *actual) {
        void *ptr = nullptr;
        detail::check(hbm_pool_alloc(pool_, size, &ptr, actual), "hbm_pool_alloc");
        return ptr;
    }

    /** Returns `ptr` with the `actual` size alloc() gave. ggml's free(). Throws on a bad pointer
     *  or size (nothing is freed then). */
    void free(void *ptr, std::size_t actual) {
        detail::check(hbm_pool_free(pool_, ptr, actual), "hbm_pool_free");
    }

    /** Gives unused memory back to the device (after a synchronize); returns the bytes. */
    std::size_t trim() {
        std::size_t released = 0;
        detail::check(hbm_pool_trim(pool_, &released), "hbm_pool_trim");
        return released;
    }

    HbmPoolStats stats() const {
        HbmPoolStats s{};
        detail::check(hbm_pool_stats(pool_, &s), "hbm_pool_stats");
        return s;
    }

    /** The kind in force (HBM_POOL_KIND_LEGACY after a VMM fallback). */
    HbmPoolKind kind() const { return stats().kind; }

    /** The C handle, still owned by this object (NULL after a move). */
    HbmPool *get() const noexcept { return pool_; }
    explicit operator bool() const noexcept { return pool_ != nullptr; }

private:
    HbmPool *pool_ = nullptr;
};

/** `n` elements of T from a pool, given back when it goes out of scope: ggml's
 *  ggml_cuda_pool_alloc<T>. Move-only. The pool must outlive it. */
template <typename T>
class pool_alloc {
public:
    pool_alloc() noexcept = default;
    explicit pool_alloc(pool &p) noexcept : pool_(p.get()) {}
    pool_alloc(pool &p, std::size_t n) : pool_(p.get()) { alloc(n); }

    ~pool_alloc() { reset(); }

    pool_alloc(pool_alloc &&other) noexcept
        : pool_(other.pool_), ptr_(std::exchange(other.ptr_, nullptr)),
          actual_(std::exchange(other.actual_, 0)) {}
    pool_alloc &operator=(pool_alloc &&other) noexcept {
        if (this != &other) {
            reset();
            pool_ = other.pool_;
            ptr_ = std::exchange(other.ptr_, nullptr);
            actual_ = std::exchange(other.actual_, 0);
        }
        return *this;
    }
    pool_alloc(const pool_alloc &) = delete;
    pool_alloc &operator=(const pool_alloc &) = delete;

    /** Allocates `n` elements (n 0 gives NULL). One allocation at a time: throws
     *  HBM_STATUS_INVALID_VALUE if this object already holds one (ggml asserts). */
    T *alloc(std::size_t n) {
        if (ptr_ != nullptr) {
            throw error(HBM_STATUS_INVALID_VALUE, "hbm::pool_alloc::alloc: already allocated");
        }
        const std::size_t bytes = detail::bytes_of<T>(n, "hbm::pool_alloc::alloc");
        void *ptr = nullptr;
        std::size_t actual = 0;
        detail::check(hbm_pool_alloc(pool_, bytes, &ptr, &actual), "hbm_pool_alloc");
        ptr_ = static_cast<T *>(ptr);
        actual_ = actual;
        return ptr_;
    }

    /** Binds to `p`, then allocates `n` elements. */
    T *alloc(pool &p, std::size_t n) {
        if (ptr_ != nullptr) {
            throw error(HBM_STATUS_INVALID_VALUE, "hbm::pool_alloc::alloc: already allocated");
        }
        pool_ = p.get();
        return alloc(n);
    }

    /** Gives the allocation back now; a no-op when empty. */
    void reset() noexcept {
        if (ptr_ != nullptr) {
            // Cannot fail for a pointer this object got from the same pool.
            (void)hbm_pool_free(pool_, ptr_, actual_);
            ptr_ = nullptr;
            actual_ = 0;
        }
    }

    T *get() const noexcept { return ptr_; }
    /** Bytes actually reserved (at least n * sizeof(T)). */
    std::size_t actual_size() const noexcept { return actual_; }

private:
    HbmPool *pool_ = nullptr;
    T *ptr_ = nullptr;
    std::size_t actual_ = 0;
};

/** `n` elements of T of plain device memory (hbm_device_alloc / hbm_device_free), tracked like
 *  any cudaMalloc. Move-only. */
template <typename T>
class device_buffer {
public:
    device_buffer() noexcept = default;

    /** Allocates `n` elements on `device` (n 0 gives NULL). Throws hbm::error. */
    explicit device_buffer(std::size_t n, int device = 0) {
        void *ptr = nullptr;
        const std::size_t bytes = detail::bytes_of<T>(n, "hbm::device_buffer");
        detail::check(hbm_device_alloc(device, bytes, &ptr), "hbm_device_alloc");
        ptr_ = static_cast<T *>(ptr);
        size_ = n;
    }

    ~device_buffer() { reset(); }

    device_buffer(device_buffer &&other) noexcept
        : ptr_(std::exchange(other.ptr_, nullptr)), size_(std::exchange(other.size_, 0)) {}
    device_buffer &operator=(device_buffer &&other) noexcept {
        if (this != &other) {
            reset();
            ptr_ = std::exchange(other.ptr_, nullptr);
            size_ = std::exchange(other.size_, 0);
        }
        return *this;
    }
    device_buffer(const device_buffer &) = delete;
    device_buffer &operator=(const device_buffer &) = delete;

    /** Frees the memory now; a no-op when empty. */
    void reset() noexcept {
        if (ptr_ != nullptr) {
            (void)hbm_device_free(ptr_);
            ptr_ = nullptr;
            size_ = 0;
        }
    }

    /** Gives up ownership: the caller frees the pointer with hbm_device_free. */
    T *release() noexcept {
        size_ = 0;
        return std::exchange(ptr_, nullptr);
    }

    T *get() const noexcept { return ptr_; }
    /** Elements, and bytes. */
    std::size_t size() const noexcept { return size_; }
    std::size_t bytes() const noexcept { return size_ * sizeof(T); }
    explicit operator bool() const noexcept { return ptr_ != nullptr; }

private:
    T *ptr_ = nullptr;
    std::size_t size_ = 0;
};

} // namespace hbm

#endif /* HBMALLOC_HPP */
