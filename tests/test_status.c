/* Every status has its own string; the version matches the header. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>

#include <cmocka.h>

#include "kvcomp.h"

static void every_status_has_a_distinct_string(void **state) {
  (void)state;
  for (int s = 0; s < KVC_STATUS_COUNT; s++) {
    const char *str = kvc_status_string((kvc_status_t)s);
    assert_non_null(str);
    assert_true(strncmp(str, "KVC_", 4) == 0);
    assert_null(strstr(str, "UNKNOWN"));
    for (int t = 0; t < s; t++) assert_string_not_equal(str, kvc_status_string((kvc_status_t)t));
  }
  assert_non_null(strstr(kvc_status_string((kvc_status_t)999), "UNKNOWN"));
  assert_non_null(strstr(kvc_status_string((kvc_status_t)-1), "UNKNOWN"));
}

static void version_matches_header(void **state) {
  (void)state;
  assert_int_equal(kvc_version(), KVC_VERSION_CODE);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(every_status_has_a_distinct_string),
      cmocka_unit_test(version_matches_header),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
