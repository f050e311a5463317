/* Test helper: a real model's activations over the shared text (kvc_runner_capture, in tests that
 * link the runner: bench/runner/CMakeLists.txt). Include after <cmocka.h>. */
#ifndef KVC_TEST_CAPTURE_H
#define KVC_TEST_CAPTURE_H

#include "kvc_test_util.h"
#include "runner_capture.h"

/* Captures `windows` windows of 256 tokens of data/tinystories_val.txt through the model at
 * models/ `model_rel` (with its tokenizer `tok_rel`, or NULL). Returns 0 when a file is missing:
 * the caller skips (the test fails instead when KVC_REQUIRE_MODELS=1). Fails the test if the
 * capture does. The caller frees *out with kvc_runner_capture_free. */
static inline int kvc_test_capture(const char *model_rel, const char *tok_rel, int windows,
                                   kvc_runner_capture_t *out) {
  char mp[4096], tp[4096], xp[4096];
  const char *m = kvc_test_shared_path(model_rel, mp, sizeof mp);
  const char *t = tok_rel ? kvc_test_shared_path(tok_rel, tp, sizeof tp) : NULL;
  const char *x = kvc_test_shared_path("data/tinystories_val.txt", xp, sizeof xp);
  if (!m || (tok_rel && !t) || !x) {
    if (kvc_test_require_models())
      fail_msg("%s or its text missing and KVC_REQUIRE_MODELS=1", model_rel);
    return 0;
  }
  kvc_runner_err_t err;
  if (kvc_runner_capture_files(m, t, x, windows, 256, out, &err) != KVC_OK)
    fail_msg("%s: %s", m, err.msg);
  print_message("%s: %d tokens captured, perplexity %.4f\n", model_rel, out->tokens, out->ppl);
  return 1;
}

#endif
