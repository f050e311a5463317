/*
 * Host metadata allocator: a private jemalloc arena, or libc.
 *
 * Finding jemalloc: libkvcomp never links it. Debian's libjemalloc.so.2 uses initial-exec TLS,
 * which glibc can only place in a process's spare static TLS; a library that needs jemalloc then
 * cannot be dlopen'ed into a running process (Python's ctypes, an engine's plugin loader: "cannot
 * allocate memory in static TLS block"). So each allocator looks for jemalloc when it is created:
 * first in the process (an application that links or preloads jemalloc), then by dlopen, which
 * works when the process still has room for jemalloc's TLS; failing both it uses libc and records
 * why (kvc_host_alloc_backend). Each allocator keeps the entry points it found: no global state.
 * The build only needs jemalloc's header, for the MALLOCX_* flag encodings (stable across 5.x;
 * the version check below refuses older libraries, which lack "arenas.create").
 *
 * jemalloc: the arena comes from "arenas.create" and every call passes MALLOCX_ARENA(ind) with
 * MALLOCX_TCACHE_NONE, so no thread cache ever holds one of our extents; that is what makes
 * "arena.<i>.destroy" at the end safe and complete. Live bytes are the usable sizes (sallocx).
 *
 * libc: a 16-byte header in front of each block records its size, so live bytes are exact and
 * the returned pointer keeps malloc's 16-byte alignment. Builds with AddressSanitizer use this path
 * even when jemalloc is available: ASan only sees (and checks) memory that comes from its own
 * malloc, and metadata overflows are exactly what the sanitizer build is there to catch.
 */
#define _GNU_SOURCE /* RTLD_DEFAULT, RTLD_NODELETE, dladdr */

#include "allocator/kvc_host_alloc.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SANITIZE_ADDRESS__)
#define KVC__ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KVC__ASAN 1
#endif
#endif
#ifndef KVC__ASAN
#define KVC__ASAN 0
#endif

#if KVC_HAVE_JEMALLOC && !KVC__ASAN
#define KVC__USE_JEMALLOC 1
#include <dlfcn.h>
#include <jemalloc/jemalloc.h>
#else
#define KVC__USE_JEMALLOC 0
#endif

/* jemalloc's entry points, as its header declares them (unprefixed, as distributions ship it). */
typedef int (*kvc__mallctl_fn)(const char *name, void *oldp, size_t *oldlenp, void *newp,
                               size_t newlen);
typedef void *(*kvc__mallocx_fn)(size_t size, int flags);
typedef void *(*kvc__rallocx_fn)(void *ptr, size_t size, int flags);
typedef void (*kvc__dallocx_fn)(void *ptr, int flags);
typedef size_t (*kvc__sallocx_fn)(const void *ptr, int flags);

/* The jemalloc one allocator uses, all entry points from one loaded object. */
typedef struct kvc__je {
  kvc__mallctl_fn mallctl;   /* NULL: this allocator uses libc */
  kvc__mallocx_fn mallocx;
  kvc__rallocx_fn rallocx;
  kvc__dallocx_fn dallocx;
  kvc__sallocx_fn sallocx;
  const char *version;       /* jemalloc's own string, e.g. "5.3.0-0-g54eaed1d..." */
  void *handle;              /* ours to dlclose; NULL when jemalloc was found in the process */
} kvc__je_t;

struct kvc_host_alloc {
  atomic_size_t live;   /* bytes held by callers; read by stats from any thread */
  int64_t count;        /* successful allocations so far */
  int64_t fail_after;   /* -1: never fail; n >= 0: n more successes, then every call fails */
  kvc__je_t je;
  unsigned arena;       /* with jemalloc: our arena, and the flags every call passes: */
  int flags;            /* MALLOCX_ARENA(arena) | MALLOCX_TCACHE_NONE */
  char backend[320];    /* kvc_host_alloc_backend */
};

/* Counts an allocation attempt; 0 when fault injection says it must fail. */
static int admit(kvc_host_alloc_t *ha) {
  if (ha->fail_after == 0) return 0;
  if (ha->fail_after > 0) ha->fail_after--;
  return 1;
}

/* ---- jemalloc -------------------------------------------------------------------------------- */

static void *je_malloc(kvc_host_alloc_t *ha, size_t bytes) {
  if (!admit(ha)) return NULL;
  /* mallocx(0) is undefined; a 1-byte block gives malloc(0)'s "unique pointer" behaviour. */
  void *p = ha->je.mallocx(bytes ? bytes : 1, ha->flags);
  if (!p) return NULL;
  ha->count++;
  atomic_fetch_add_explicit(&ha->live, ha->je.sallocx(p, ha->flags), memory_order_relaxed);
  return p;
}

static void *je_realloc(kvc_host_alloc_t *ha, void *p, size_t bytes) {
  if (!admit(ha)) return NULL;
  size_t old = ha->je.sallocx(p, ha->flags);
  void *q = ha->je.rallocx(p, bytes ? bytes : 1, ha->flags);
  if (!q) return NULL;
  ha->count++;
  atomic_fetch_add_explicit(&ha->live, ha->je.sallocx(q, ha->flags), memory_order_relaxed);
  atomic_fetch_sub_explicit(&ha->live, old, memory_order_relaxed);
  return q;
}

static void je_free(kvc_host_alloc_t *ha, void *p) {
  atomic_fetch_sub_explicit(&ha->live, ha->je.sallocx(p, ha->flags), memory_order_relaxed);
  ha->je.dallocx(p, ha->flags);
}

#if KVC__USE_JEMALLOC

/* Takes jemalloc's entry points from `where` (RTLD_DEFAULT or a dlopen handle) into *je. 1 when
 * all are there, come from one object (not, say, a mallctl of one allocator and a mallocx of
 * another) and the version has arenas.create; 0 with the reason in why[n] otherwise. */
static int je_resolve(kvc__je_t *je, void *where, char *why, size_t n) {
  static const char *const names[] = {"mallctl", "mallocx", "rallocx", "dallocx", "sallocx"};
  void *sym[sizeof(names) / sizeof(names[0])];
  void *base = NULL;
  for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
    Dl_info info;
    sym[i] = dlsym(where, names[i]);
    if (!sym[i] || !dladdr(sym[i], &info)) {
      snprintf(why, n, "no %s", names[i]);
      return 0;
    }
    if (i > 0 && info.dli_fbase != base) {
      snprintf(why, n, "%s and %s come from different objects", names[0], names[i]);
      return 0;
    }
    base = info.dli_fbase;
  }
  /* POSIX dlsym returns functions as void *; converting them back is what dlsym is for. */
  kvc__je_t found = {(kvc__mallctl_fn)sym[0], (kvc__mallocx_fn)sym[1], (kvc__rallocx_fn)sym[2],
                     (kvc__dallocx_fn)sym[3], (kvc__sallocx_fn)sym[4], NULL, NULL};
  size_t len = sizeof(found.version);
  if (found.mallctl("version", &found.version, &len, NULL, 0) != 0 || !found.version) {
    snprintf(why, n, "mallctl(\"version\") failed");
    return 0;
  }
  if (atoi(found.version) < 5) {
    snprintf(why, n, "jemalloc %.16s predates 5.0 (no arenas.create)", found.version);
    return 0;
  }
  *je = found;
  return 1;
}

/* Sets ha up on jemalloc if it can be found (see the top of the file), else on libc with the
 * reason in ha->backend. KVC_ERR_OUT_OF_HOST_MEMORY: jemalloc was found but would not create an
 * arena; nothing is held then, and the caller frees ha. */
static kvc_status_t je_open(kvc_host_alloc_t *ha, int search_process, const char *soname) {
  char in_process[96] = "", opened[160] = "";
  const char *how = NULL;
  kvc__je_t je;
  if (search_process) {
    if (je_resolve(&je, RTLD_DEFAULT, in_process, sizeof(in_process))) how = "in the process";
  }
  if (!how && soname) {
    /* NODELETE: jemalloc's thread-exit destructors must stay mapped after our last allocator
     * releases it. LOCAL: its malloc/free stay out of the global scope, so libraries loaded
     * later keep binding to the process's allocator. */
    void *handle = dlopen(soname, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
    if (!handle) {
      const char *err = dlerror(); /* names soname and says why, e.g. "static TLS block" */
      snprintf(opened, sizeof(opened), "%s", err ? err : soname);
    } else {
      char why[96];
      if (je_resolve(&je, handle, why, sizeof(why))) {
        je.handle = handle;
        how = "dlopen";
      } else {
        snprintf(opened, sizeof(opened), "%.60s: %s", soname, why);
        dlclose(handle);
      }
    }
  }
  if (!how) {
    if (!search_process && !soname) snprintf(opened, sizeof(opened), "jemalloc not searched for");
    snprintf(ha->backend, sizeof(ha->backend), "libc (%s%s%s%s)",
             search_process ? "jemalloc not in the process: " : "", in_process,
             search_process && soname ? "; " : "", opened);
    return KVC_OK;
  }

  unsigned arena;
  size_t len = sizeof(arena);
  if (je.mallctl("arenas.create", &arena, &len, NULL, 0) != 0) {
    if (je.handle) dlclose(je.handle);
    return KVC_ERR_OUT_OF_HOST_MEMORY;
  }
  ha->je = je;
  ha->arena = arena;
  ha->flags = (int)MALLOCX_ARENA(arena) | MALLOCX_TCACHE_NONE;
  snprintf(ha->backend, sizeof(ha->backend), "jemalloc arena %u (%s%s%.60s, version %.*s)", arena,
           how, je.handle ? " " : "", je.handle ? soname : "", (int)strcspn(je.version, "-"),
           je.version);
  return KVC_OK;
}

#endif /* KVC__USE_JEMALLOC */

/* ---- libc ------------------------------------------------------------------------------------ */

/* Header in front of each block: its requested size, padded to keep 16-byte alignment. */
typedef union kvc__hdr {
  size_t bytes;
  max_align_t align;
} kvc__hdr_t;

static void *libc_malloc(kvc_host_alloc_t *ha, size_t bytes) {
  if (bytes > SIZE_MAX - sizeof(kvc__hdr_t) || !admit(ha)) return NULL;
  kvc__hdr_t *h = malloc(sizeof(*h) + bytes);
  if (!h) return NULL;
  h->bytes = bytes;
  ha->count++;
  atomic_fetch_add_explicit(&ha->live, bytes, memory_order_relaxed);
  return h + 1;
}

static void *libc_realloc(kvc_host_alloc_t *ha, void *p, size_t bytes) {
  if (bytes > SIZE_MAX - sizeof(kvc__hdr_t) || !admit(ha)) return NULL;
  kvc__hdr_t *h = (kvc__hdr_t *)p - 1;
  size_t old = h->bytes;
  kvc__hdr_t *q = realloc(h, sizeof(*q) + bytes);
  if (!q) return NULL;
  q->bytes = bytes;
  ha->count++;
  atomic_fetch_add_explicit(&ha->live, bytes, memory_order_relaxed);
  atomic_fetch_sub_explicit(&ha->live, old, memory_order_relaxed);
  return q + 1;
}

static void libc_free(kvc_host_alloc_t *ha, void *p) {
  kvc__hdr_t *h = (kvc__hdr_t *)p - 1;
  atomic_fetch_sub_explicit(&ha->live, h->bytes, memory_order_relaxed);
  free(h);
}

/* ---- the API --------------------------------------------------------------------------------- */

kvc_status_t kvc__host_alloc_create_from(kvc_host_alloc_t **out, int search_process,
                                         const char *soname) {
  if (!out) return KVC_ERR_INVALID_ARGUMENT;
  /* The handle itself is libc's: it must exist before we know which backend we get. */
  kvc_host_alloc_t *ha = calloc(1, sizeof(*ha));
  if (!ha) return KVC_ERR_OUT_OF_HOST_MEMORY;
  atomic_init(&ha->live, 0);
  ha->fail_after = -1;
#if KVC__USE_JEMALLOC
  kvc_status_t st = je_open(ha, search_process, soname);
  if (st != KVC_OK) {
    free(ha);
    return st;
  }
#else
  snprintf(ha->backend, sizeof(ha->backend), "libc (%s)",
           KVC__ASAN ? "AddressSanitizer build" : "built with KVC_JEMALLOC=OFF");
#endif
  *out = ha;
  return KVC_OK;
}

kvc_status_t kvc_host_alloc_create(kvc_host_alloc_t **out) {
  return kvc__host_alloc_create_from(out, 1, "libjemalloc.so.2");
}

void kvc_host_alloc_destroy(kvc_host_alloc_t *ha) {
  if (!ha) return;
#if KVC__USE_JEMALLOC
  if (ha->je.mallctl) {
    /* Destroying the arena returns every extent it still maps to the system. */
    char name[64];
    snprintf(name, sizeof(name), "arena.%u.destroy", ha->arena);
    ha->je.mallctl(name, NULL, NULL, NULL, 0);
    if (ha->je.handle) dlclose(ha->je.handle);
  }
#endif
  free(ha);
}

const char *kvc_host_alloc_backend(const kvc_host_alloc_t *ha) { return ha->backend; }

void *kvc_host_malloc(kvc_host_alloc_t *ha, size_t bytes) {
  return ha->je.mallctl ? je_malloc(ha, bytes) : libc_malloc(ha, bytes);
}

void *kvc_host_realloc(kvc_host_alloc_t *ha, void *p, size_t bytes) {
  if (!p) return kvc_host_malloc(ha, bytes);
  return ha->je.mallctl ? je_realloc(ha, p, bytes) : libc_realloc(ha, p, bytes);
}

void kvc_host_free(kvc_host_alloc_t *ha, void *p) {
  if (!p) return;
  if (ha->je.mallctl)
    je_free(ha, p);
  else
    libc_free(ha, p);
}

void *kvc_host_calloc(kvc_host_alloc_t *ha, size_t n, size_t size) {
  if (size && n > SIZE_MAX / size) return NULL;
  void *p = kvc_host_malloc(ha, n * size);
  if (p) memset(p, 0, n * size);
  return p;
}

size_t kvc_host_alloc_bytes(const kvc_host_alloc_t *ha) {
  return atomic_load_explicit(&ha->live, memory_order_relaxed);
}

void kvc_host_alloc_fail_after(kvc_host_alloc_t *ha, int64_t n) { ha->fail_after = n < 0 ? -1 : n; }

int64_t kvc_host_alloc_count(const kvc_host_alloc_t *ha) { return ha->count; }
