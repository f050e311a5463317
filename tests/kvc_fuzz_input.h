/* A fuzz target's input read byte by byte, as its operations' arguments; bytes past the end read
 * as 0, so that every input is a valid program. */
#ifndef KVC_FUZZ_INPUT_H
#define KVC_FUZZ_INPUT_H

#include <stddef.h>
#include <stdint.h>

typedef struct kvc_fuzz_input {
  const uint8_t *p;
  size_t n;
} kvc_fuzz_input_t;

static inline uint8_t kvc_fuzz_next(kvc_fuzz_input_t *in) {
  if (!in->n) return 0;
  in->n--;
  return *in->p++;
}

#endif
