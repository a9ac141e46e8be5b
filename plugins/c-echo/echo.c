/*
 * The echo plugin, in C: the same answers as plugins/echo (Rust), through
 * plugin-sdk/include/plugvisor.h alone.
 *
 *   version     -> the plugin's version
 *   lang        -> "c"
 *   upper TEXT  -> TEXT upper-cased (unless degraded)
 *   anything    -> echoed
 *
 * Every answer starts with "[NAME VERSION] ", so a client sees which
 * version served it. The build stamps name, version and (for the tests of
 * a lying descriptor) the ABI version it claims:
 *
 *   cc -shared -fPIC -O2 -I plugin-sdk/include \
 *      -DPV_VERSION='"2.0.0"' -o libc_echo.so plugins/c-echo/echo.c
 */
#include <ctype.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "plugvisor.h"

#ifndef PV_NAME
#define PV_NAME "echo"
#endif
#ifndef PV_VERSION
#define PV_VERSION "0.1.0"
#endif
#ifndef PV_ABI
#define PV_ABI PLUGVISOR_ABI_VERSION
#endif

/* One instance per loaded version; `handle` runs on many threads at once,
 * so the only mutable state is atomic. */
struct echo {
    atomic_uint level;
};

/* A buffer of `len` bytes from this library's allocator, or 0 on failure. */
static int alloc_buf(PvBuf *out, size_t len) {
    out->ptr = malloc(len ? len : 1);
    if (!out->ptr) {
        return 0;
    }
    out->len = len;
    out->cap = len ? len : 1;
    return 1;
}

static int32_t set_error(PvBuf *out, const char *message) {
    size_t n = strlen(message);
    if (alloc_buf(out, n)) {
        memcpy(out->ptr, message, n);
    }
    return PV_ERROR;
}

static int32_t echo_init(void **out_instance, PvBuf *out_error) {
    struct echo *e = calloc(1, sizeof *e);
    if (!e) {
        return set_error(out_error, "c-echo: out of memory in init");
    }
    atomic_init(&e->level, 0);
    *out_instance = e;
    return PV_OK;
}

static int starts_with(const uint8_t *req, size_t len, const char *prefix) {
    size_t n = strlen(prefix);
    return len >= n && memcmp(req, prefix, n) == 0;
}

static int32_t echo_handle(void *instance, const uint8_t *req, size_t len, PvBuf *out) {
    struct echo *e = instance;
    static const char head[] = "[" PV_NAME " " PV_VERSION "] ";
    const size_t head_len = sizeof head - 1;
    const uint8_t *body = req;
    size_t body_len = len;
    int upper = 0;

    if (len == 7 && memcmp(req, "version", 7) == 0) {
        body = (const uint8_t *)PV_VERSION;
        body_len = strlen(PV_VERSION);
    } else if (len == 4 && memcmp(req, "lang", 4) == 0) {
        body = (const uint8_t *)"c";
        body_len = 1;
    } else if (atomic_load(&e->level) == 0 && starts_with(req, len, "upper ")) {
        body = req + 6;
        body_len = len - 6;
        upper = 1;
    }
    if (!alloc_buf(out, head_len + body_len)) {
        return set_error(out, "c-echo: out of memory in handle");
    }
    memcpy(out->ptr, head, head_len);
    for (size_t i = 0; i < body_len; i++) {
        out->ptr[head_len + i] = upper ? (uint8_t)toupper(body[i]) : body[i];
    }
    return PV_OK;
}

static int32_t echo_health(void *instance) {
    (void)instance;
    return PV_OK;
}

static int32_t echo_degrade(void *instance, uint32_t level) {
    struct echo *e = instance;
    atomic_store(&e->level, level);
    return PV_OK;
}

static void echo_shutdown(void *instance) {
    free(instance);
}

static void echo_free(PvBuf buf) {
    free(buf.ptr);
}

/* `used` and default visibility keep the symbol exported under
 * -fvisibility=hidden and --gc-sections builds too. */
__attribute__((visibility("default"), used))
const PvPluginDescriptor plugvisor_plugin = {
    .abi_version = PV_ABI,
    .descriptor_size = sizeof(PvPluginDescriptor),
    .name = PV_STR(PV_NAME),
    .version = PV_STR(PV_VERSION),
    .init = echo_init,
    .handle = echo_handle,
    .health = echo_health,
    .degrade = echo_degrade,
    .shutdown = echo_shutdown,
    .free = echo_free,
};
