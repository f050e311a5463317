// The public headers compile as C++ and keep C linkage.
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

extern "C" {
#include <cmocka.h>
}

#include "kvcomp.h"
#include "kvcomp.h" // include guard

static void config_init_from_cpp(void **) {
  kvc_config_t cfg = KVC_CONFIG_INIT;
  assert_int_equal(cfg.struct_size, sizeof(kvc_config_t));
  assert_int_equal(cfg.block_tokens, 64);
  assert_string_equal(kvc_status_string(KVC_OK), "KVC_OK: success");
}

int main() {
  const struct CMUnitTest tests[] = {cmocka_unit_test(config_init_from_cpp)};
  return cmocka_run_group_tests(tests, nullptr, nullptr);
}
