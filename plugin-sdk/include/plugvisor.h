/*
 * plugvisor.h — the plugvisor plugin ABI for C, C++, Zig, Go (cgo) and any
 * language that can export a C symbol from a shared library.
 *
 * This is the same ABI as plugin-sdk/src/lib.rs (the Rust SDK); a unit test
 * of that crate compiles plugin-sdk/c-tests/layout.c against this header and
 * compares every size, field offset and constant with the Rust side, so the
 * two cannot drift.
 *
 * A plugin is a shared library exporting one symbol, `plugvisor_plugin`, a
 * `const PvPluginDescriptor`. The host reads `abi_version` first (offset 0 in
 * every ABI version), then checks `descriptor_size`, `name` and `version`
 * against the package's plugin.toml before it calls anything.
 *
 * Threading: `handle` is called from many threads at once, on one instance;
 * it must be thread-safe. `init` runs once per loaded version, before any
 * other call; `shutdown` runs once, after the last `handle` of that version
 * has returned. `health` and `degrade` may run concurrently with `handle`.
 *
 * Memory: a PvBuf a plugin fills (a response, an error message) is owned by
 * the plugin's allocator; the host hands it back through the descriptor's
 * `free`, exactly once. A PvBuf the host passes in starts empty
 * ({NULL, 0, 0}); leaving it empty is a valid empty answer. Request bytes
 * are borrowed for the duration of the call only.
 *
 * Crashes: the host bounds `init` by `[reload] init_timeout` and `handle` by
 * the listener's `request_timeout`; a call that overruns is abandoned (its
 * thread keeps running). C has no unwinding to catch: a segfault or abort
 * in a plugin takes the process down, and the next start quarantines the
 * version that did it (see docs/RELIABILITY.md).
 */
#ifndef PLUGVISOR_H
#define PLUGVISOR_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI version this header describes; the host refuses any other. */
#define PLUGVISOR_ABI_VERSION 1u

/* The name of the exported descriptor symbol, as a string. */
#define PLUGVISOR_DESCRIPTOR_SYMBOL "plugvisor_plugin"

/* Status codes every entry point returns. */
enum {
    /* Success. */
    PV_OK = 0,
    /* The plugin reports an error; the out-buffer holds its message (UTF-8).
     * From `init`: the version is refused and the previous one serves on.
     * From `handle`: the client gets the message as an error answer. */
    PV_ERROR = 1,
    /* The plugin caught a fault of its own (the Rust SDK: a panic). */
    PV_PANIC = 2,
    /* An optional operation (`degrade`) the plugin does not implement. */
    PV_UNSUPPORTED = 3
};

/* A borrowed UTF-8 string: pointer and length, no terminator needed. */
typedef struct PvStr {
    const uint8_t *ptr;
    size_t len;
} PvStr;

/* A buffer the plugin allocated; the host returns it through `free`. */
typedef struct PvBuf {
    uint8_t *ptr;
    size_t len;
    size_t cap;
} PvBuf;

/* init(out_instance, out_error) -> status: creates the instance. */
typedef int32_t (*PvInitFn)(void **out_instance, PvBuf *out_error);
/* handle(instance, request, request_len, out_response) -> status; concurrent. */
typedef int32_t (*PvHandleFn)(void *instance, const uint8_t *request,
                              size_t request_len, PvBuf *out_response);
/* health(instance) -> status (PV_OK = healthy). Optional: NULL. */
typedef int32_t (*PvHealthFn)(void *instance);
/* degrade(instance, level) -> status; level 0 restores full service. Optional: NULL. */
typedef int32_t (*PvDegradeFn)(void *instance, uint32_t level);
/* shutdown(instance): the last call on the instance. */
typedef void (*PvShutdownFn)(void *instance);
/* free(buffer): returns a buffer to the plugin's allocator. */
typedef void (*PvFreeFn)(PvBuf buffer);

/* The exported descriptor. Field order is the ABI: append only, and the
 * ABI version changes with any change. */
typedef struct PvPluginDescriptor {
    /* PLUGVISOR_ABI_VERSION; always the first field. */
    uint32_t abi_version;
    /* sizeof(PvPluginDescriptor) as the plugin saw it. */
    uint32_t descriptor_size;
    /* Must equal plugin.toml's `name`. */
    PvStr name;
    /* Semver; must equal plugin.toml's `version`. */
    PvStr version;
    PvInitFn init;
    PvHandleFn handle;
    PvHealthFn health;   /* may be NULL */
    PvDegradeFn degrade; /* may be NULL */
    PvShutdownFn shutdown;
    PvFreeFn free;
} PvPluginDescriptor;

/* A PvStr over a string literal, for the descriptor's initialiser. */
#define PV_STR(literal) { (const uint8_t *)(literal), sizeof(literal) - 1 }

#ifdef __cplusplus
}
#endif

#endif /* PLUGVISOR_H */
