/* A minimal user of the installed package: <hbmalloc.h> from the include path, libhbmalloc from
 * the library path. Run with HBMALLOC_CONF=backend:sim. argv[1] names how it was built. */
#include <hbmalloc.h>

#include <stdio.h>
#include <string.h>

int main(int argc, char **argv) {
    const char *how = argc > 1 ? argv[1] : "?";
    const char *version = hbm_version();
    if (version == NULL || strcmp(version, HBMALLOC_VERSION) != 0) {
        fprintf(stderr, "consumer (%s): library %s, header %s\n", how, version ? version : "NULL",
                HBMALLOC_VERSION);
        return 1;
    }
    void *p = NULL;
    enum HbmStatus st = hbm_device_alloc(0, 1 << 20, &p);
    if (st != HBM_STATUS_OK || p == NULL) {
        fprintf(stderr, "consumer (%s): hbm_device_alloc: %s\n", how, hbm_status_str(st));
        return 1;
    }
    HbmStats stats;
    st = hbm_stats(0, &stats);
    if (st != HBM_STATUS_OK || stats.in_use < (1 << 20)) {
        fprintf(stderr, "consumer (%s): hbm_stats: %s\n", how, hbm_status_str(st));
        return 1;
    }
    st = hbm_device_free(p);
    if (st != HBM_STATUS_OK) {
        fprintf(stderr, "consumer (%s): hbm_device_free: %s\n", how, hbm_status_str(st));
        return 1;
    }
    printf("consumer (%s): hbmalloc %s on backend %s: allocated and freed 1 MiB\n", how, version,
           hbm_backend_name());
    return 0;
}
