// include/hbmalloc.h compiled as C++, after cuda_runtime.h: no clash with the runtime's own
// declarations, and extern "C" linkage (this links and calls the hbm_* functions).
#if __has_include(<cuda_runtime.h>)
#include <cuda_runtime.h> // first, so a clash with the runtime would show
#endif

#include "hbmalloc.h"

#include <cstdio>
#include <cstring>

int main() {
    static_assert(HBM_STATUS_OK == 0, "HBM_STATUS_OK is 0");
    const char *version = hbm_version();
    if (version == nullptr || std::strcmp(version, HBMALLOC_VERSION) != 0) {
        std::fprintf(stderr, "FAIL: hbm_version() does not match HBMALLOC_VERSION\n");
        return 1;
    }
    void *p = nullptr;
    HbmStatus st = hbm_device_alloc(0, 1000, &p);
    if (st != HBM_STATUS_OK || p == nullptr || hbm_device_free(p) != HBM_STATUS_OK) {
        std::fprintf(stderr, "FAIL: hbm_device_alloc/free from C++: %s\n", hbm_status_str(st));
        return 1;
    }
    std::printf("header_cxx: hbmalloc %s from C++ beside cuda_runtime.h\n", version);
    return 0;
}
