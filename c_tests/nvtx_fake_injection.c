/* A stand-in for a tool's NVTX injection library (what compute-sanitizer names in
 * NVTX_INJECTION64_PATH), for tests/nvtx_regions.rs. It attaches the way a tool does: through
 * the core's export table (InitializeInjectionNvtx2, for nvtxDomainCreateA) and the memory
 * extension's slots (InitializeInjectionNvtxExtension), checks every descriptor's version and
 * size fields, and logs each heap and region call, one line each, to $FAKE_NVTX_LOG:
 *   domain NAME
 *   heap_register H<n> <base> <size> <name>       heap_unregister H<n>
 *   region_register H<n> <ptr> <size>             region_unregister <ptr>
 *   bad <what>                                    (a field other than the layout says)
 * FAKE_NVTX_REFUSE=1 makes the extension's initialization fail.
 * Layouts as nvToolsExtMem.h and nvtxDetail/nvtxTypes.h define them (64-bit). */
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

#define DOMAIN ((void *)0xd0)
#define HEAP_TAG 0x4ea9000000000000ull

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
#include <stdarg.h>
static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(log_file(), fmt, ap);
    va_end(ap);
    fputc('\n', log_file());
    fflush(log_file());
}

static void *domain_create(const char *name) {
    say("domain %s", name ? name : "(null)");
    return DOMAIN;
}

static unsigned long long heaps;

static void *heap_register(void *domain, const heap_desc *d) {
    if (domain != DOMAIN) say("bad domain %p", domain);
    if (d->compat != 0x0102 || d->struct_size != sizeof(heap_desc)) say("bad heap_desc header");
    if (d->usage != 1 || d->type != 1 || d->desc_size != sizeof(range_desc)) say("bad heap_desc kind");
    unsigned long long id = ++heaps;
    say("heap_register H%llu %#zx %zu %s", id, (size_t)d->desc->ptr, d->desc->size,
        d->message_type == 1 && d->message ? d->message : "-");
    return (void *)(uintptr_t)(HEAP_TAG | id);
}

static unsigned long long heap_id(void *heap) {
    uintptr_t h = (uintptr_t)heap;
    if ((h & ~0xffffffffull) != HEAP_TAG) say("bad heap handle %p", heap);
    return h & 0xffffffffull;
}

static void heap_unregister(void *domain, void *heap) {
    if (domain != DOMAIN) say("bad domain %p", domain);
    say("heap_unregister H%llu", heap_id(heap));
}

static void regions_register(void *domain, const regions_register_batch *b) {
    if (domain != DOMAIN) say("bad domain %p", domain);
    if (b->compat != 0x0102 || b->struct_size != sizeof(*b) || b->region_type != 1 ||
        b->element_size != sizeof(range_desc))
        say("bad regions_register_batch");
    for (size_t i = 0; i < b->count; i++)
        say("region_register H%llu %#zx %zu", heap_id(b->heap), (size_t)b->elements[i].ptr,
            b->elements[i].size);
}

static void regions_unregister(void *domain, const regions_unregister_batch *b) {
    if (domain != DOMAIN) say("bad domain %p", domain);
    if (b->compat != 0x0102 || b->struct_size != sizeof(*b) || b->ref_type != 1 ||
        b->element_size != sizeof(void *))
        say("bad regions_unregister_batch");
    for (size_t i = 0; i < b->count; i++) say("region_unregister %#zx", (size_t)b->refs[i]);
}

int InitializeInjectionNvtx2(get_export_table_fn get) {
    const callbacks_table *cb = get(1);
    if (!cb || cb->struct_size < sizeof(*cb)) {
        say("bad callbacks table");
        return 0;
    }
    void **core2;
    unsigned size = 0;
    if (!cb->get_module_function_table(5, (void ***)&core2, &size) || size != 16) {
        say("bad CORE2 table (size %u)", size);
        return 0;
    }
    *(void **)core2[12] = (void *)domain_create;
    return 1;
}

int InitializeInjectionNvtxExtension(ext_module_info *m) {
    if (getenv("FAKE_NVTX_REFUSE")) return 0;
    if (m->module_id != 1) return 1; /* not the memory extension: nothing to attach */
    if (m->nvtx_ver != 3 || m->compat_id != 0x0102 || m->struct_size != sizeof(*m) ||
        m->segments_count != 1 || m->segments[0].slot_count < 7) {
        say("bad ext_module_info");
        return 0;
    }
    intptr_t *slots = m->segments[0].slots;
    slots[1] = (intptr_t)heap_register;
    slots[2] = (intptr_t)heap_unregister;
    slots[4] = (intptr_t)regions_register;
    slots[6] = (intptr_t)regions_unregister;
    say("attached");
    return 1;
}
