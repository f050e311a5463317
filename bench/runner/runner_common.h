/*
 * The model runner (bench/runner/): a small Llama-architecture inference engine in C that keeps its
 * KV cache in kvcomp, used by `./kvc demo`, `./kvc eval` and tests/test_runner.c. It is a client of
 * the public API (kvcomp.h); only the evaluation harness also reads compress/kvc_codec.h to count
 * page bytes of baselines it emulates.
 *
 * Module prefix: kvc_runner_. Every fallible runner call returns a kvc_status_t and, when `err` is
 * not NULL, writes a one-line human-readable reason into it (the message a user sees before a
 * non-zero exit).
 */
#ifndef KVC_RUNNER_COMMON_H
#define KVC_RUNNER_COMMON_H

#include <stddef.h>

#include "kvcomp.h"

typedef struct kvc_runner_err {
  char msg[512];
} kvc_runner_err_t;

/* Formats the reason into err (if not NULL) and returns `status`, for `return kvc_runner_fail(...)`. */
kvc_status_t kvc_runner_fail(kvc_runner_err_t *err, kvc_status_t status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Reads a whole file into a malloc'd buffer (*data, *size; a NUL is appended past *size so text
 * files can be used as strings). Returns KVC_ERR_INVALID_ARGUMENT when it cannot be opened or read,
 * KVC_ERR_OUT_OF_HOST_MEMORY. */
kvc_status_t kvc_runner_read_file(const char *path, unsigned char **data, size_t *size,
                                  kvc_runner_err_t *err);

/* `rel` (e.g. "models/stories260K.gguf") under $KVC_SHARED_DIR, else under ../shared beside the
 * repository the runner was built from. Writes into buf[cap] and returns buf. */
const char *kvc_runner_shared_path(const char *rel, char *buf, size_t cap);

/* Monotonic wall-clock seconds. */
double kvc_runner_now(void);

#endif /* KVC_RUNNER_COMMON_H */
