/* A stand-in for a tool's NVTX injection library (what compute-sanitizer names in
 * NVTX_INJECTION64_PATH), for tests/nvtx_regions.rs. It attaches the way a tool does: through
 * the core's export table (InitializeInjectionNvtx2, for nvtxDomainCreateA) and the memory
 * extension's slots (InitializeInjectionNvtxExtension), and it checks each call as
 * compute-sanitizer does: the domain is one it created, every descriptor's version, size and
 * type fields, a heap handle it returned, regions inside their heap, a region unregistered by
 * the pointer it was registered at. It logs one line per call to $FAKE_NVTX_LOG:
 *   domain NAME                                   attached
 *   heap_register H<n> <base> <size> <name>       heap_unregister H<n>
 *   heap_refused <base>                           (FAKE_NVTX_REJECT_HEAPS: returns NULL)
 *   region_register H<n> <ptr> <size>             region_unregister <ptr>
 *   reenter WHERE / reentered WHERE               (around the FAKE_NVTX_REENTER callback)
 *   bad <what>                                    (a call the real tool would refuse or crash on)
 *
 * Slot layout. The memory functions go where compute-sanitizer (CUDA 13.0) put them for a
 * module described as nvtxDetail/nvtxExtImplMem_v1.h describes it: callback id c in segment
 * slot c-1 (measured on an H200: a call to slot 1 reached its nvtxMemHeapUnregister).
 * FAKE_NVTX_LAYOUT=published puts callback id c in slot c, as that header reads them. Every
 * callback id 1..13 gets a function, so a call through the wrong slot is logged as the call it
 * reached ("bad unexpected nvtxMemRegionsResize", "bad heap_unregister ...").
 *
 * Other switches: FAKE_NVTX_REFUSE=1 fails the extension's initialization; FAKE_NVTX_NO_DOMAIN=1
 * leaves nvtxDomainCreateA unfilled; FAKE_NVTX_REENTER=0x<address> calls that function (a
 * `void (void)`, in the process under test) from InitializeInjectionNvtx2 and from each heap
 * registration, as a tool that allocates device memory there would re-enter an allocator that
 * interposes cudaMalloc. Layouts as nvToolsExtMem.h and nvtxDetail/nvtxTypes.h define them
 * (64-bit). */
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef const void *(*get_export_table_fn)(uint32_t id);
typedef struct {
    size_t struct_size;
    int (*get_module_function_table)(uint32_t module, void ***out_table, unsigned *out_size);
} callbacks_table;
typedef struct {
    size_t struct_size;
    uint32_t version, reserved0;
    void (*set_injection_nvtx_version)(uint32_t);
} version_info_table;

typedef struct {
    size_t segment_id, slot_count;
    intptr_t *slots;
} ext_segment;
typedef struct {
    uint16_t nvtx_ver, struct_size, module_id, compat_id;
    size_t segments_count;
    ext_segment *segments;
    void *get_export_function;
    const void *ext_info;
} ext_module_info;

typedef struct {
    size_t size;
    const void *ptr;
} range_desc;
typedef struct {
    uint16_t compat, struct_size;
    uint32_t reserved0, usage, type;
    size_t desc_size;
    const range_desc *desc;
    uint32_t category, message_type;
    const char *message;
} heap_desc;
typedef struct {
    uint16_t compat, struct_size;
    uint32_t region_type;
    void *heap;
    size_t count, element_size;
    const range_desc *elements;
    void **handles_out;
} regions_register_batch;
typedef struct {
    uint16_t compat, struct_size;
    uint32_t ref_type;
    size_t count, element_size;
    const void *const *refs;
} regions_unregister_batch;

#define COMPAT_MEM 0x0102
#define DOMAIN ((void *)0xd0)
#define HEAP_TAG 0x4ea9000000000000ull
#define MAX_HEAPS 4096
#define MAX_REGIONS 65536

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static FILE *log_file(void) {
    static FILE *f;
    if (!f) {
        const char *path = getenv("FAKE_NVTX_LOG");
        f = path ? fopen(path, "a") : stderr;
        if (!f) f = stderr;
    }
    return f;
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(log_file(), fmt, ap);
    va_end(ap);
    fputc('\n', log_file());
    fflush(log_file());
}

/* The tool's own record: live heaps and their live regions. */
static struct heap {
    unsigned long long id;
    uintptr_t base, size;
    int live;
} heaps[MAX_HEAPS];
static unsigned long long heap_count;
static struct region {
    unsigned long long heap;
    uintptr_t ptr, size;
    int live;
} regions[MAX_REGIONS];
static size_t region_count;

static struct heap *heap_by_handle(void *h) {
    uintptr_t v = (uintptr_t)h;
    if ((v & ~0xffffffffull) != HEAP_TAG) return NULL;
    unsigned long long id = v & 0xffffffffull;
    if (id == 0 || id > heap_count || !heaps[id - 1].live) return NULL;
    return &heaps[id - 1];
}

static int domain_ok(void *domain, const char *call) {
    /* Without nvtxDomainCreateA (FAKE_NVTX_NO_DOMAIN), the default domain, as compute-sanitizer
     * 2025.3 takes it. */
    if (domain == NULL && getenv("FAKE_NVTX_NO_DOMAIN")) return 1;
    if (domain != DOMAIN) {
        say("bad %s: domain %p is not one nvtxDomainCreateA returned", call, domain);
        return 0;
    }
    return 1;
}

/* FAKE_NVTX_REENTER: call back into the process, outside the tool's lock. */
static void reenter(const char *where) {
    const char *v = getenv("FAKE_NVTX_REENTER");
    if (!v) return;
    void (*f)(void) = (void (*)(void))(uintptr_t)strtoull(v, NULL, 16);
    if (!f) return;
    say("reenter %s", where);
    f();
    say("reentered %s", where);
}

static void *domain_create(const char *name) {
    say("domain %s", name ? name : "(null)");
    return DOMAIN;
}

static void *heap_register(void *domain, const heap_desc *d) {
    reenter("heap_register");
    if (!domain_ok(domain, "heap_register")) return NULL;
    if (!d || d->compat != COMPAT_MEM || d->struct_size != sizeof(heap_desc) || d->reserved0) {
        say("bad heap_register: descriptor header");
        return NULL;
    }
    /* compute-sanitizer takes only sub-allocator heaps of virtual addresses. */
    if (d->usage != 1 || d->type != 1 || d->desc_size != sizeof(range_desc) || !d->desc ||
        d->desc->size == 0) {
        say("bad heap_register: usage %u type %u", d->usage, d->type);
        return NULL;
    }
    uintptr_t base = (uintptr_t)d->desc->ptr, size = d->desc->size;
    if (getenv("FAKE_NVTX_REJECT_HEAPS")) {
        say("heap_refused %#zx", (size_t)base);
        return NULL;
    }
    pthread_mutex_lock(&lock);
    for (unsigned long long i = 0; i < heap_count; i++)
        if (heaps[i].live && base < heaps[i].base + heaps[i].size && heaps[i].base < base + size)
            say("bad heap_register: %#zx overlaps H%llu", (size_t)base, heaps[i].id);
    void *handle = NULL;
    if (heap_count < MAX_HEAPS) {
        struct heap *h = &heaps[heap_count++];
        h->id = heap_count;
        h->base = base;
        h->size = size;
        h->live = 1;
        handle = (void *)(uintptr_t)(HEAP_TAG | h->id);
        say("heap_register H%llu %#zx %zu %s", h->id, (size_t)base, (size_t)size,
            d->message_type == 1 && d->message ? d->message : "-");
    } else {
        say("bad heap_register: the fake's table is full");
    }
    pthread_mutex_unlock(&lock);
    return handle;
}

static void heap_unregister(void *domain, void *heap) {
    if (!domain_ok(domain, "heap_unregister")) return;
    pthread_mutex_lock(&lock);
    struct heap *h = heap_by_handle(heap);
    if (!h) {
        /* What compute-sanitizer reports as "Call to nvtxMemHeapUnregister failed". */
        say("bad heap_unregister: %p is no heap", heap);
    } else {
        h->live = 0;
        for (size_t i = 0; i < region_count; i++)
            if (regions[i].live && regions[i].heap == h->id) regions[i].live = 0;
        say("heap_unregister H%llu", h->id);
    }
    pthread_mutex_unlock(&lock);
}

static void regions_register(void *domain, const regions_register_batch *b) {
    if (!domain_ok(domain, "region_register")) return;
    if (!b || b->compat != COMPAT_MEM || b->struct_size != sizeof(*b) || b->region_type != 1 ||
        b->element_size != sizeof(range_desc) || b->count == 0 || !b->elements) {
        say("bad region_register: batch header");
        return;
    }
    pthread_mutex_lock(&lock);
    struct heap *h = heap_by_handle(b->heap);
    if (!h) {
        say("bad region_register: %p is no heap", b->heap);
    } else {
        for (size_t i = 0; i < b->count; i++) {
            uintptr_t p = (uintptr_t)b->elements[i].ptr, n = b->elements[i].size;
            if (n == 0 || p < h->base || p + n > h->base + h->size) {
                say("bad region_register: [%#zx, +%zu) outside H%llu", (size_t)p, (size_t)n, h->id);
                continue;
            }
            for (size_t j = 0; j < region_count; j++)
                if (regions[j].live && p < regions[j].ptr + regions[j].size && regions[j].ptr < p + n)
                    say("bad region_register: %#zx overlaps live region %#zx", (size_t)p,
                        (size_t)regions[j].ptr);
            if (region_count == MAX_REGIONS) {
                say("bad region_register: the fake's table is full");
                break;
            }
            regions[region_count++] = (struct region){h->id, p, n, 1};
            say("region_register H%llu %#zx %zu", h->id, (size_t)p, (size_t)n);
        }
    }
    pthread_mutex_unlock(&lock);
}

static void regions_unregister(void *domain, const regions_unregister_batch *b) {
    if (!domain_ok(domain, "region_unregister")) return;
    if (!b || b->compat != COMPAT_MEM || b->struct_size != sizeof(*b) || b->ref_type != 1 ||
        b->element_size != sizeof(void *) || b->count == 0 || !b->refs) {
        say("bad region_unregister: batch header");
        return;
    }
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < b->count; i++) {
        uintptr_t p = (uintptr_t)b->refs[i];
        size_t j = 0;
        while (j < region_count && !(regions[j].live && regions[j].ptr == p)) j++;
        if (j == region_count) {
            say("bad region_unregister: %#zx is no live region", (size_t)p);
            continue;
        }
        regions[j].live = 0;
        say("region_unregister %#zx", (size_t)p);
    }
    pthread_mutex_unlock(&lock);
}

/* The memory functions hbmalloc never calls: any call to one is a call through a wrong slot. */
#define UNEXPECTED(fn)                                                 \
    static void *fn(void *domain, void *arg) {                         \
        (void)domain;                                                  \
        (void)arg;                                                     \
        say("bad unexpected " #fn);                                    \
        return NULL;                                                   \
    }
UNEXPECTED(nvtxMemHeapReset)
UNEXPECTED(nvtxMemRegionsResize)
UNEXPECTED(nvtxMemRegionsName)
UNEXPECTED(nvtxMemPermissionsAssign)
UNEXPECTED(nvtxMemPermissionsCreate)
UNEXPECTED(nvtxMemPermissionsDestroy)
UNEXPECTED(nvtxMemPermissionsReset)
UNEXPECTED(nvtxMemPermissionsBind)
UNEXPECTED(nvtxMemPermissionsUnbind)

int InitializeInjectionNvtx2(get_export_table_fn get) {
    reenter("InitializeInjectionNvtx2");
    const callbacks_table *cb = get(1);
    const version_info_table *vi = get(3);
    if (!cb || cb->struct_size < sizeof(*cb) || !vi || vi->struct_size < sizeof(*vi) ||
        vi->version != 3) {
        say("bad export tables");
        return 0;
    }
    vi->set_injection_nvtx_version(3);
    /* Every module table as NVTX lays it out: entry 0 and entry `size` NULL, the rest slots. */
    static const unsigned sizes[] = {16, 9, 15, 7, 16, 7};
    for (uint32_t m = 1; m <= 6; m++) {
        void **table = NULL;
        unsigned size = 0;
        if (!cb->get_module_function_table(m, (void ***)&table, &size) || size != sizes[m - 1] ||
            table[0] || table[size]) {
            say("bad module table %u (size %u)", m, size);
            return 0;
        }
        for (unsigned i = 1; i < size; i++)
            if (!table[i]) {
                say("bad module table %u: slot %u missing", m, i);
                return 0;
            }
    }
    void **core2 = NULL;
    cb->get_module_function_table(5, (void ***)&core2, NULL);
    if (!getenv("FAKE_NVTX_NO_DOMAIN")) *(void **)core2[12] = (void *)domain_create;
    return 1;
}

int InitializeInjectionNvtxExtension(ext_module_info *m) {
    if (getenv("FAKE_NVTX_REFUSE")) return 0;
    if (m->module_id != 1) return 1; /* not the memory extension: nothing to attach */
    if (m->nvtx_ver != 3 || m->compat_id != COMPAT_MEM || m->struct_size != sizeof(*m) ||
        m->segments_count != 1 || m->segments[0].slot_count < 14) {
        say("bad ext_module_info");
        return 0;
    }
    void *fns[14] = {NULL,
                     (void *)heap_register,
                     (void *)heap_unregister,
                     (void *)nvtxMemHeapReset,
                     (void *)regions_register,
                     (void *)nvtxMemRegionsResize,
                     (void *)regions_unregister,
                     (void *)nvtxMemRegionsName,
                     (void *)nvtxMemPermissionsAssign,
                     (void *)nvtxMemPermissionsCreate,
                     (void *)nvtxMemPermissionsDestroy,
                     (void *)nvtxMemPermissionsReset,
                     (void *)nvtxMemPermissionsBind,
                     (void *)nvtxMemPermissionsUnbind};
    const char *layout = getenv("FAKE_NVTX_LAYOUT");
    int published = layout && strcmp(layout, "published") == 0;
    intptr_t *slots = m->segments[0].slots;
    for (int cbid = 1; cbid <= 13; cbid++) slots[published ? cbid : cbid - 1] = (intptr_t)fns[cbid];
    say("attached");
    return 1;
}
