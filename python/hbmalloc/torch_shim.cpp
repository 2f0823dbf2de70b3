// The shim between PyTorch's CUDAPluggableAllocator and libhbmalloc.so, compiled by
// hbmalloc/_shim.py against the installed torch's headers (and libc10), loaded by
// hbmalloc.torch.enable(). Two things only C++ compiled against that torch can do:
//
// 1. Out of memory. CUDAPluggableAllocator::malloc does not check its function's result: a NULL
//    becomes a tensor at address 0. hbm_shim_malloc throws c10::OutOfMemoryError instead, which
//    unwinds through PyTorch's frames (it is what the native allocator throws) into Python as
//    torch.OutOfMemoryError. libhbmalloc itself never unwinds: it answers with a status.
// 2. CUDA graphs. PyTorch announces a capture with beginAllocateToPool(device, pool, filter),
//    where filter(stream) says which allocations belong to the graph; the hooks' signatures carry
//    std::function and std::pair, so they are received here and passed on as plain numbers.
//
// No CUDA header is needed: streams are opaque pointers here.

#include <c10/util/Exception.h>

#include <sys/types.h>

#include <atomic>
#include <cstdio>
#include <cstdint>
#include <functional>
#include <mutex>
#include <utility>
#include <vector>

struct CUstream_st;
using cudaStream_t = CUstream_st*;
// c10::cuda::MempoolId_t, spelled out so that no CUDA header is needed.
using MempoolId = std::pair<unsigned long long, unsigned long long>;

namespace {

using TryMallocFn = int (*)(ssize_t, int, void*, void**);
using GraphMallocFn = int (*)(ssize_t, int, void*, uint64_t, uint64_t, void**);
using FreeFn = void (*)(void*, ssize_t, int, void*);
using GraphHookFn = int (*)(int, uint64_t, uint64_t);
using StatusStrFn = const char* (*)(int);

// libhbmalloc's entry points, set once by hbm_shim_bind before PyTorch gets the allocator.
struct Api {
  TryMallocFn try_malloc = nullptr;
  GraphMallocFn graph_malloc = nullptr;
  FreeFn free = nullptr;
  GraphHookFn begin = nullptr;
  GraphHookFn end = nullptr;
  GraphHookFn release = nullptr;
  StatusStrFn status_str = nullptr;
};
Api api;

constexpr int kStatusOutOfMemory = 3;  // HBM_STATUS_OUT_OF_MEMORY

struct Capture {
  int device;
  MempoolId pool;
  std::function<bool(cudaStream_t)> filter;
};
std::mutex captures_mutex;
std::vector<Capture> captures;
// Captures under way: the allocation fast path reads only this.
std::atomic<int> n_captures{0};

// The pool of the capture that claims an allocation on `stream`, if any.
bool claimed_by(int device, cudaStream_t stream, MempoolId* pool) {
  if (n_captures.load(std::memory_order_acquire) == 0) {
    return false;
  }
  std::lock_guard<std::mutex> lock(captures_mutex);
  for (const Capture& c : captures) {
    if (c.device == device && c.filter(stream)) {
      *pool = c.pool;
      return true;
    }
  }
  return false;
}

// The hooks, with the exact types PyTorch's set_begin_allocate_to_pool & co. cast to.
void begin_allocate_to_pool(
    int device,
    MempoolId pool,
    std::function<bool(cudaStream_t)> filter) {
  {
    std::lock_guard<std::mutex> lock(captures_mutex);
    captures.push_back(Capture{device, pool, std::move(filter)});
    n_captures.fetch_add(1, std::memory_order_release);
  }
  api.begin(device, pool.first, pool.second);
}

void end_allocate_to_pool(int device, MempoolId pool) {
  {
    std::lock_guard<std::mutex> lock(captures_mutex);
    for (auto it = captures.begin(); it != captures.end(); ++it) {
      if (it->device == device && it->pool == pool) {
        captures.erase(it);
        n_captures.fetch_sub(1, std::memory_order_release);
        break;
      }
    }
  }
  api.end(device, pool.first, pool.second);
}

void release_pool(int device, MempoolId pool) {
  api.release(device, pool.first, pool.second);
}

}  // namespace

extern "C" {

// Hands the shim libhbmalloc's functions (addresses from the library Python loaded, so that
// both speak to one allocator). Returns 0, or -1 if one is missing.
int hbm_shim_bind(
    void* try_malloc,
    void* graph_malloc,
    void* free,
    void* begin,
    void* end,
    void* release,
    void* status_str) {
  if (!try_malloc || !graph_malloc || !free || !begin || !end || !release || !status_str) {
    return -1;
  }
  api.try_malloc = reinterpret_cast<TryMallocFn>(try_malloc);
  api.graph_malloc = reinterpret_cast<GraphMallocFn>(graph_malloc);
  api.free = reinterpret_cast<FreeFn>(free);
  api.begin = reinterpret_cast<GraphHookFn>(begin);
  api.end = reinterpret_cast<GraphHookFn>(end);
  api.release = reinterpret_cast<GraphHookFn>(release);
  api.status_str = reinterpret_cast<StatusStrFn>(status_str);
  return 0;
}

// The hook functions' addresses, for set_begin_allocate_to_pool (0),
// set_end_allocate_to_pool_fn (1) and set_release_pool (2); NULL for another number.
void* hbm_shim_hook(int which) {
  switch (which) {
    case 0:
      return reinterpret_cast<void*>(&begin_allocate_to_pool);
    case 1:
      return reinterpret_cast<void*>(&end_allocate_to_pool);
    case 2:
      return reinterpret_cast<void*>(&release_pool);
    default:
      return nullptr;
  }
}

// CUDAPluggableAllocator's malloc. Size 0 gives NULL (an empty tensor); a refusal throws.
void* hbm_shim_malloc(ssize_t size, int device, cudaStream_t stream) {
  TORCH_CHECK(api.try_malloc != nullptr, "hbmalloc: the torch shim was loaded but not bound");
  void* ptr = nullptr;
  MempoolId pool;
  int status = claimed_by(device, stream, &pool)
      ? api.graph_malloc(size, device, stream, pool.first, pool.second, &ptr)
      : api.try_malloc(size, device, stream, &ptr);
  if (status == 0) {
    return ptr;
  }
  // The message is formatted with snprintf and handed to TORCH_CHECK as one string, so no C++
  // stream is used here. Where the linker finds only libstdc++.a (seen on a GPU host: the shim
  // then carries its own copy of the library), c10::str's ostringstream mixed that copy's
  // locale with the process's libstdc++ and crashed (SIGSEGV) instead of raising.
  char msg[320];
  if (status == kStatusOutOfMemory) {
    std::snprintf(
        msg,
        sizeof msg,
        "CUDA out of memory. hbmalloc could not allocate %lld bytes on device %d even after "
        "releasing its cached memory and retrying (its one-line explanation is on stderr).",
        static_cast<long long>(size),
        device);
    TORCH_CHECK_WITH(OutOfMemoryError, false, static_cast<const char*>(msg));
  }
  std::snprintf(
      msg,
      sizeof msg,
      "hbmalloc: allocating %lld bytes on device %d failed: %s",
      static_cast<long long>(size),
      device,
      api.status_str(status));
  TORCH_CHECK(false, static_cast<const char*>(msg));
  return nullptr;  // not reached: TORCH_CHECK(false, ...) throws
}

// CUDAPluggableAllocator's free.
void hbm_shim_free(void* ptr, ssize_t size, int device, cudaStream_t stream) {
  if (api.free != nullptr) {
    api.free(ptr, size, device, stream);
  }
}

}  // extern "C"
