/* The host metadata allocator: where it allocates from, live-byte accounting, realloc, and fault
 * injection. The behaviour tests run three times: on the default allocator, on one that had to
 * fall back to libc, and on one that found jemalloc by dlopen. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "allocator/kvc_host_alloc.h"

#if defined(__SANITIZE_ADDRESS__)
#define ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ASAN 1
#endif
#endif
#ifndef ASAN
#define ASAN 0
#endif

/* This program links jemalloc (CMake does, when it finds the library) and the build may use it
 * (ASan builds deliberately do not): then every allocator must get its own jemalloc arena. */
#define EXPECT_JEMALLOC (KVC_HAVE_JEMALLOC && KVC_JEMALLOC_LINKED && !ASAN)
#if EXPECT_JEMALLOC
#include <jemalloc/jemalloc.h>
#endif

#define NO_SUCH_LIBRARY "libkvc-test-no-such-jemalloc.so.0"

static int setup(void **state) {
  kvc_host_alloc_t *ha = NULL;
  if (kvc_host_alloc_create(&ha) != KVC_OK) return -1;
  *state = ha;
  return 0;
}

/* As if jemalloc were neither in the process nor loadable. */
static int setup_fallback(void **state) {
  kvc_host_alloc_t *ha = NULL;
  if (kvc__host_alloc_create_from(&ha, 0, NO_SUCH_LIBRARY) != KVC_OK) return -1;
  *state = ha;
  return 0;
}

/* jemalloc through dlopen and the handle's symbols, not the process's. */
static int setup_dlopen(void **state) {
  kvc_host_alloc_t *ha = NULL;
  if (kvc__host_alloc_create_from(&ha, 0, "libjemalloc.so.2") != KVC_OK) return -1;
  *state = ha;
  return 0;
}

static int teardown(void **state) {
  kvc_host_alloc_destroy(*state);
  return 0;
}

static int starts_with(const char *s, const char *prefix) {
  return strncmp(s, prefix, strlen(prefix)) == 0;
}

/* The libc fallback states a reason: "libc (" ... ")", with something in between. */
static void assert_libc_with_reason(const char *backend) {
  size_t n = strlen(backend);
  assert_true(starts_with(backend, "libc ("));
  assert_true(n > strlen("libc ()") && backend[n - 1] == ')');
#if ASAN
  assert_non_null(strstr(backend, "AddressSanitizer"));
#elif !KVC_HAVE_JEMALLOC
  assert_non_null(strstr(backend, "KVC_JEMALLOC=OFF"));
#endif
}

#if EXPECT_JEMALLOC
/* The arena named by the backend string, which must be a jemalloc one found `how`. */
static unsigned arena_of(const kvc_host_alloc_t *ha, const char *how) {
  const char *backend = kvc_host_alloc_backend(ha);
  unsigned arena = 0;
  assert_int_equal(sscanf(backend, "jemalloc arena %u", &arena), 1);
  assert_non_null(strstr(backend, how));
  return arena;
}

/* jemalloc's own answer to "which arena holds p". */
static unsigned arena_holding(const void *p) {
  unsigned arena = 0;
  size_t len = sizeof(arena);
  assert_int_equal(mallctl("arenas.lookup", &arena, &len, (void *)&p, sizeof(p)), 0);
  return arena;
}
#endif

static void backend_is_jemalloc_where_expected(void **state) {
  (void)state;
  kvc_host_alloc_t *a = NULL, *b = NULL;
  assert_int_equal(kvc_host_alloc_create(&a), KVC_OK);
  assert_int_equal(kvc_host_alloc_create(&b), KVC_OK);
#if EXPECT_JEMALLOC
  unsigned arena_a = arena_of(a, "(in the process, version "), arena_b = arena_of(b, "(in the process, version ");
  assert_int_not_equal(arena_a, arena_b);
  /* Small and large blocks land in the allocator's own arena, and the application's malloc
   * (jemalloc's, in this program) does not. */
  void *small = kvc_host_malloc(a, 24), *large = kvc_host_malloc(a, 4 << 20);
  void *other = kvc_host_malloc(b, 24), *app = malloc(24);
  assert_non_null(small);
  assert_non_null(large);
  assert_non_null(other);
  assert_non_null(app);
  assert_int_equal(arena_holding(small), arena_a);
  assert_int_equal(arena_holding(large), arena_a);
  assert_int_equal(arena_holding(other), arena_b);
  assert_int_not_equal(arena_holding(app), arena_a);
  assert_int_not_equal(arena_holding(app), arena_b);
  free(app);
  kvc_host_free(a, small);
  kvc_host_free(a, large);
  kvc_host_free(b, other);
#else
  assert_libc_with_reason(kvc_host_alloc_backend(a));
  assert_string_equal(kvc_host_alloc_backend(a), kvc_host_alloc_backend(b));
#endif
  kvc_host_alloc_destroy(a);
  kvc_host_alloc_destroy(b);
}

static void fallback_says_why(void **state) {
  const char *backend = kvc_host_alloc_backend(*state);
  assert_libc_with_reason(backend);
#if KVC_HAVE_JEMALLOC && !ASAN
  /* dlerror's message names the library it could not open. */
  assert_non_null(strstr(backend, NO_SUCH_LIBRARY));
  assert_null(strstr(backend, "in the process"));
#endif
}

static void dlopen_finds_jemalloc(void **state) {
#if EXPECT_JEMALLOC
  kvc_host_alloc_t *ha = *state;
  unsigned arena = arena_of(ha, "(dlopen libjemalloc.so.2, version ");
  void *p = kvc_host_malloc(ha, 100);
  assert_non_null(p);
  assert_int_equal(arena_holding(p), arena);
  kvc_host_free(ha, p);
#else
  assert_libc_with_reason(kvc_host_alloc_backend(*state));
#endif
}

static void create_rejects_null(void **state) {
  (void)state;
  assert_int_equal(kvc_host_alloc_create(NULL), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc__host_alloc_create_from(NULL, 1, "libjemalloc.so.2"),
                   KVC_ERR_INVALID_ARGUMENT);
  kvc_host_alloc_destroy(NULL);
}

static void live_bytes_follow_allocations(void **state) {
  kvc_host_alloc_t *ha = *state;
  assert_int_equal(kvc_host_alloc_bytes(ha), 0);
  void *p[64];
  size_t want = 0;
  for (int i = 0; i < 64; i++) {
    size_t n = (size_t)(i * 37 + 1);
    p[i] = kvc_host_malloc(ha, n);
    assert_non_null(p[i]);
    memset(p[i], i, n);
    want += n;
  }
  /* jemalloc counts usable sizes (size classes round up), libc the requested sizes. */
  assert_true(kvc_host_alloc_bytes(ha) >= want);
  assert_true(kvc_host_alloc_bytes(ha) <= 2 * want);
  assert_int_equal(kvc_host_alloc_count(ha), 64);
  for (int i = 0; i < 64; i++) kvc_host_free(ha, p[i]);
  assert_int_equal(kvc_host_alloc_bytes(ha), 0);
  kvc_host_free(ha, NULL);
  assert_int_equal(kvc_host_alloc_bytes(ha), 0);
}

static void zero_bytes_gives_a_unique_pointer(void **state) {
  kvc_host_alloc_t *ha = *state;
  void *a = kvc_host_malloc(ha, 0), *b = kvc_host_malloc(ha, 0);
  assert_non_null(a);
  assert_non_null(b);
  assert_ptr_not_equal(a, b);
  kvc_host_free(ha, a);
  kvc_host_free(ha, b);
  assert_int_equal(kvc_host_alloc_bytes(ha), 0);
}

static void calloc_zeroes_and_checks_overflow(void **state) {
  kvc_host_alloc_t *ha = *state;
  uint8_t *p = kvc_host_calloc(ha, 1000, 3);
  assert_non_null(p);
  for (int i = 0; i < 3000; i++) assert_int_equal(p[i], 0);
  kvc_host_free(ha, p);
  int64_t count = kvc_host_alloc_count(ha);
  assert_null(kvc_host_calloc(ha, SIZE_MAX / 2, 3));
  assert_int_equal(kvc_host_alloc_count(ha), count);
  assert_null(kvc_host_malloc(ha, SIZE_MAX - 8));
  assert_int_equal(kvc_host_alloc_bytes(ha), 0);
}

static void realloc_keeps_contents(void **state) {
  kvc_host_alloc_t *ha = *state;
  int32_t *p = kvc_host_realloc(ha, NULL, 16 * sizeof(int32_t));
  assert_non_null(p);
  for (int i = 0; i < 16; i++) p[i] = i * i;
  p = kvc_host_realloc(ha, p, 100000 * sizeof(int32_t));
  assert_non_null(p);
  for (int i = 0; i < 16; i++) assert_int_equal(p[i], i * i);
  assert_true(kvc_host_alloc_bytes(ha) >= 100000 * sizeof(int32_t));
  p = kvc_host_realloc(ha, p, 8 * sizeof(int32_t));
  assert_non_null(p);
  for (int i = 0; i < 8; i++) assert_int_equal(p[i], i * i);
  assert_true(kvc_host_alloc_bytes(ha) < 1024);
  kvc_host_free(ha, p);
  assert_int_equal(kvc_host_alloc_bytes(ha), 0);
}

static void fail_after_counts_successes(void **state) {
  kvc_host_alloc_t *ha = *state;
  kvc_host_alloc_fail_after(ha, 2);
  void *a = kvc_host_malloc(ha, 10);
  void *b = kvc_host_calloc(ha, 2, 10);
  assert_non_null(a);
  assert_non_null(b);
  /* Every further allocation fails, whichever function makes it. */
  assert_null(kvc_host_malloc(ha, 10));
  assert_null(kvc_host_calloc(ha, 1, 1));
  void *c = kvc_host_realloc(ha, a, 4096);
  assert_null(c);
  /* A failed realloc leaves the block valid and counted. */
  memset(a, 7, 10);
  size_t live = kvc_host_alloc_bytes(ha);
  assert_true(live >= 30);
  kvc_host_alloc_fail_after(ha, -1);
  c = kvc_host_realloc(ha, a, 4096);
  assert_non_null(c);
  assert_int_equal(((uint8_t *)c)[9], 7);
  kvc_host_free(ha, b);
  kvc_host_free(ha, c);
  assert_int_equal(kvc_host_alloc_bytes(ha), 0);
  assert_int_equal(kvc_host_alloc_count(ha), 3);

  kvc_host_alloc_fail_after(ha, 0);
  assert_null(kvc_host_malloc(ha, 1));
  kvc_host_alloc_fail_after(ha, -5); /* any negative value means "never fail" */
  void *d = kvc_host_malloc(ha, 1);
  assert_non_null(d);
  kvc_host_free(ha, d);
}

static void allocators_are_independent(void **state) {
  kvc_host_alloc_t *ha = *state, *hb = NULL;
  assert_int_equal(kvc_host_alloc_create(&hb), KVC_OK);
  void *a = kvc_host_malloc(ha, 1000);
  void *b = kvc_host_malloc(hb, 50);
  assert_non_null(a);
  assert_non_null(b);
  assert_true(kvc_host_alloc_bytes(ha) >= 1000);
  assert_true(kvc_host_alloc_bytes(hb) >= 50 && kvc_host_alloc_bytes(hb) < 1000);
  kvc_host_alloc_fail_after(hb, 0);
  assert_null(kvc_host_malloc(hb, 1));
  void *c = kvc_host_malloc(ha, 1);
  assert_non_null(c);
  kvc_host_free(ha, a);
  kvc_host_free(ha, c);
  kvc_host_free(hb, b);
  kvc_host_alloc_destroy(hb);
  assert_int_equal(kvc_host_alloc_bytes(ha), 0);
}

/* The behaviour tests, each on an allocator made by `setup_fn`. */
#define BEHAVIOUR_TESTS(setup_fn)                                                              \
  cmocka_unit_test_setup_teardown(live_bytes_follow_allocations, setup_fn, teardown),          \
      cmocka_unit_test_setup_teardown(zero_bytes_gives_a_unique_pointer, setup_fn, teardown),  \
      cmocka_unit_test_setup_teardown(calloc_zeroes_and_checks_overflow, setup_fn, teardown),  \
      cmocka_unit_test_setup_teardown(realloc_keeps_contents, setup_fn, teardown),             \
      cmocka_unit_test_setup_teardown(fail_after_counts_successes, setup_fn, teardown),        \
      cmocka_unit_test_setup_teardown(allocators_are_independent, setup_fn, teardown)

int main(void) {
  const struct CMUnitTest backend[] = {
      cmocka_unit_test(create_rejects_null),
      cmocka_unit_test(backend_is_jemalloc_where_expected),
      cmocka_unit_test_setup_teardown(fallback_says_why, setup_fallback, teardown),
      cmocka_unit_test_setup_teardown(dlopen_finds_jemalloc, setup_dlopen, teardown),
  };
  const struct CMUnitTest by_default[] = {BEHAVIOUR_TESTS(setup)};
  const struct CMUnitTest on_fallback[] = {BEHAVIOUR_TESTS(setup_fallback)};
  const struct CMUnitTest on_dlopen[] = {BEHAVIOUR_TESTS(setup_dlopen)};
  int failed = cmocka_run_group_tests_name("backend", backend, NULL, NULL);
  failed += cmocka_run_group_tests_name("default allocator", by_default, NULL, NULL);
  failed += cmocka_run_group_tests_name("libc fallback", on_fallback, NULL, NULL);
  failed += cmocka_run_group_tests_name("jemalloc by dlopen", on_dlopen, NULL, NULL);
  return failed;
}
