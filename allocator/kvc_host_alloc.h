/*
 * Host metadata allocation. Every host allocation of the library goes through one kvc_host_alloc_t
 * hanging off its cache: a dedicated jemalloc arena when built with KVC_HAVE_JEMALLOC=1 (so the
 * cache's metadata has its own size classes and statistics and never mixes with the application's
 * heap), libc malloc otherwise. jemalloc is found at run time, not linked (the library must load
 * with dlopen into a running process; kvc_host_alloc.c says why): the jemalloc already in the
 * process, else libjemalloc.so.2 by dlopen, else libc for that allocator, the reason readable
 * from kvc_host_alloc_backend. Builds with AddressSanitizer always use libc, so that ASan checks
 * metadata accesses. Tests inject failures: with fail_after = n, the (n+1)-th allocation from now
 * fails, so every allocation site can be made to fail in turn.
 *
 * Not thread-safe (the cache serializes its calls), except kvc_host_alloc_bytes and
 * kvc_host_alloc_backend: any thread.
 * A request for 0 bytes returns a unique pointer (to be freed), as malloc(0) does.
 */
#ifndef KVC_HOST_ALLOC_H
#define KVC_HOST_ALLOC_H

#include <stddef.h>
#include <stdint.h>

#include "kvcomp.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvc_host_alloc kvc_host_alloc_t;

/* KVC_OK, KVC_ERR_INVALID_ARGUMENT (out NULL) or KVC_ERR_OUT_OF_HOST_MEMORY (no memory, or
 * jemalloc found but refusing a new arena). Not finding jemalloc is not an error: see
 * kvc_host_alloc_backend. */
kvc_status_t kvc_host_alloc_create(kvc_host_alloc_t **out);
/* kvc_host_alloc_create with the search for jemalloc spelled out, so that tests reach each
 * outcome: look in the process when search_process != 0, then dlopen `soname` unless NULL.
 * kvc_host_alloc_create(out) is kvc__host_alloc_create_from(out, 1, "libjemalloc.so.2"). */
kvc_status_t kvc__host_alloc_create_from(kvc_host_alloc_t **out, int search_process,
                                         const char *soname);
/* Frees the allocator; everything allocated from it must have been freed. */
void kvc_host_alloc_destroy(kvc_host_alloc_t *ha);

void *kvc_host_malloc(kvc_host_alloc_t *ha, size_t bytes);   /* NULL on failure */
void *kvc_host_calloc(kvc_host_alloc_t *ha, size_t n, size_t size);
void *kvc_host_realloc(kvc_host_alloc_t *ha, void *p, size_t bytes); /* NULL: p unchanged */
void kvc_host_free(kvc_host_alloc_t *ha, void *p);          /* NULL is a no-op */

/* Bytes currently allocated (live), for the stats: usable sizes with jemalloc, requested sizes
 * with libc. Any thread. */
size_t kvc_host_alloc_bytes(const kvc_host_alloc_t *ha);

/* What the allocator allocates from, for logs and tests: "jemalloc arena N (in the process,
 * version V)", "jemalloc arena N (dlopen SONAME, version V)" or "libc (why not jemalloc)".
 * Owned by `ha`, valid until it is destroyed. Any thread. */
const char *kvc_host_alloc_backend(const kvc_host_alloc_t *ha);

/* Fault injection: after `n` more successful allocations (malloc, calloc and realloc count alike),
 * every allocation fails until reset with n = -1 (the default: never fail).
 * kvc_host_alloc_count: the number of successful allocations made so far. */
void kvc_host_alloc_fail_after(kvc_host_alloc_t *ha, int64_t n);
int64_t kvc_host_alloc_count(const kvc_host_alloc_t *ha);

#ifdef __cplusplus
}
#endif

#endif /* KVC_HOST_ALLOC_H */
