/*
 * A model's real activations: every layer's post-RoPE keys and values and its queries over windows
 * of text, as the fp32 forward pass computes them with the exact dense cache (one window per step:
 * the evaluation protocol's prefill feed, runner_eval.h). For `kvc_eval --dump-kv` (the codec
 * benchmark's real K/V) and the tests on real data (tests/test_runner_real_kv.c,
 * tests/gpu_test_real_kv.cu).
 */
#ifndef KVC_RUNNER_CAPTURE_H
#define KVC_RUNNER_CAPTURE_H

#include "runner_forward.h"

typedef struct kvc_runner_capture {
  kvc_runner_shape_t shape;
  int tokens;   /* windows * (window_len - 1): window after window, positions 0.. in each */
  float *k, *v; /* [n_layers][tokens][n_kv_heads * head_dim] */
  float *q;     /* [n_layers][tokens][n_heads * head_dim] */
  double ppl;   /* the exact cache's perplexity over the windows */
} kvc_runner_capture_t;

/*
 * Runs ctx's model over `windows` windows of window_len tokens of `stream` (n_stream >= windows *
 * (window_len - 1); ctx->cap_tokens >= window_len - 1) and fills *out, which the caller frees
 * with kvc_runner_capture_free (also after a failure). Returns KVC_ERR_OUT_OF_HOST_MEMORY or the
 * forward pass's statuses.
 */
kvc_status_t kvc_runner_capture(kvc_runner_ctx_t *ctx, const int32_t *stream, int n_stream,
                                int windows, int window_len, kvc_runner_capture_t *out,
                                kvc_runner_err_t *err);

/* The same from files: loads the model (model_path and tokenizer_path as kvc_runner_model_load
 * takes them) and the protocol's token stream of text_path, then captures. Also returns the
 * loader's statuses. */
kvc_status_t kvc_runner_capture_files(const char *model_path, const char *tokenizer_path,
                                      const char *text_path, int windows, int window_len,
                                      kvc_runner_capture_t *out, kvc_runner_err_t *err);

void kvc_runner_capture_free(kvc_runner_capture_t *c);

#endif /* KVC_RUNNER_CAPTURE_H */
