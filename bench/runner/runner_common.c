/* Error messages, whole-file reads and the clock shared by the runner's modules. */
#define _POSIX_C_SOURCE 200809L
#include "runner_common.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

kvc_status_t kvc_runner_fail(kvc_runner_err_t *err, kvc_status_t status, const char *fmt, ...) {
  if (err) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
  }
  return status;
}

kvc_status_t kvc_runner_read_file(const char *path, unsigned char **data, size_t *size,
                                  kvc_runner_err_t *err) {
  kvc_status_t st = KVC_OK;
  unsigned char *buf = NULL;
  FILE *f = fopen(path, "rb");
  if (!f) return kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "%s: %s", path, strerror(errno));
  if (fseek(f, 0, SEEK_END) != 0) {
    st = kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "%s: cannot seek: %s", path, strerror(errno));
    goto out;
  }
  long len = ftell(f);
  if (len < 0 || fseek(f, 0, SEEK_SET) != 0) {
    st = kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "%s: not a regular file", path);
    goto out;
  }
  buf = malloc((size_t)len + 1);
  if (!buf) {
    st = kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "%s: out of memory (%ld bytes)", path, len);
    goto out;
  }
  if (len > 0 && fread(buf, 1, (size_t)len, f) != (size_t)len) {
    st = kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "%s: read error", path);
    free(buf);
    buf = NULL;
    goto out;
  }
  buf[len] = 0;
  *data = buf;
  *size = (size_t)len;
out:
  fclose(f);
  return st;
}

#ifndef KVC_RUNNER_REPO_DIR
#define KVC_RUNNER_REPO_DIR "."
#endif

const char *kvc_runner_shared_path(const char *rel, char *buf, size_t cap) {
  const char *dir = getenv("KVC_SHARED_DIR");
  if (dir && *dir) snprintf(buf, cap, "%s/%s", dir, rel);
  else snprintf(buf, cap, "%s/../shared/%s", KVC_RUNNER_REPO_DIR, rel);
  return buf;
}

double kvc_runner_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
