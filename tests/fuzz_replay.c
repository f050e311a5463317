/*
 * Runs a libFuzzer target (tests/fuzz_*.c) without libFuzzer, so that ctest exercises every
 * target with any compiler: each argument is an input file to replay (a crash libFuzzer saved, a
 * corpus entry); without arguments, KVC_FUZZ_RUNS (default 2000 x KVC_TEST_SCALE) pseudo-random
 * inputs of 1 to 4096 bytes from a fixed seed. A target reports a violation by aborting; one that
 * defines kvc_fuzz_report prints there what the inputs reached.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "kvc_test_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
void kvc_fuzz_report(void) __attribute__((weak));

static int replay(const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    perror(path);
    return 1;
  }
  uint8_t *buf = NULL;
  size_t n = 0, cap = 0;
  for (;;) {
    if (n == cap) {
      cap = cap ? 2 * cap : 4096;
      uint8_t *grown = realloc(buf, cap);
      if (!grown) abort();
      buf = grown;
    }
    size_t got = fread(buf + n, 1, cap - n, f);
    if (got == 0) break;
    n += got;
  }
  fclose(f);
  LLVMFuzzerTestOneInput(buf, n);
  free(buf);
  return 0;
}

int main(int argc, char **argv) {
  if (argc > 1) {
    int failed = 0;
    for (int i = 1; i < argc; i++) failed |= replay(argv[i]);
    return failed;
  }
  const char *env = getenv("KVC_FUZZ_RUNS");
  const long runs = env ? atol(env) : (long)(2000 * kvc_test_scale());
  static uint8_t buf[4096];
  kvc_test_rng_t r;
  kvc_test_rng_seed(&r, 0xf022);
  for (long i = 0; i < runs; i++) {
    const size_t n = 1 + kvc_test_rng_below(&r, sizeof(buf));
    for (size_t j = 0; j < n; j++) buf[j] = (uint8_t)kvc_test_rng_u64(&r);
    LLVMFuzzerTestOneInput(buf, n);
  }
  printf("%ld random inputs\n", runs);
  if (kvc_fuzz_report) kvc_fuzz_report();
  return 0;
}
