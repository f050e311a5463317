/*
 * kvc_runner_capture: a KV backend that forwards every call to the dense cache and appends each
 * step's K, V (kv->store) and Q (kv->attend) rows to the capture, layer by layer.
 */
#include <stdlib.h>
#include <string.h>

#include "runner_capture.h"
#include "runner_eval.h"

typedef struct capture_kv {
  kvc_runner_kv_t base; /* first: the forward pass calls through it */
  kvc_runner_kv_t *inner;
  kvc_runner_capture_t *out;
  int step_rows; /* new tokens of the planned step */
  int *stored;   /* [n_layers] rows captured so far; Q's follow the same count */
} capture_kv_t;

static capture_kv_t *self(kvc_runner_kv_t *kv) { return (capture_kv_t *)kv; }

static kvc_status_t cap_add(kvc_runner_kv_t *kv, kvc_seq_id_t id, const int32_t *t, int n,
                            int *c) {
  return self(kv)->inner->ops->seq_add(self(kv)->inner, id, t, n, c);
}
static kvc_status_t cap_reserve(kvc_runner_kv_t *kv, kvc_seq_id_t id, int n) {
  return self(kv)->inner->ops->seq_reserve(self(kv)->inner, id, n);
}
static kvc_status_t cap_free(kvc_runner_kv_t *kv, kvc_seq_id_t id) {
  return self(kv)->inner->ops->seq_free(self(kv)->inner, id);
}
static kvc_status_t cap_swap(kvc_runner_kv_t *kv, kvc_seq_id_t id) {
  (void)kv;
  (void)id;
  return KVC_ERR_UNSUPPORTED;
}
static kvc_status_t cap_plan(kvc_runner_kv_t *kv, const kvc_batch_t *b) {
  capture_kv_t *c = self(kv);
  c->step_rows = 0;
  for (int i = 0; i < b->num_seqs; i++) c->step_rows += b->num_new_tokens[i];
  return c->inner->ops->plan(c->inner, b);
}
static kvc_status_t cap_store(kvc_runner_kv_t *kv, int layer, const float *k, const float *v) {
  capture_kv_t *c = self(kv);
  const kvc_runner_shape_t *s = &c->out->shape;
  if (c->stored[layer] + c->step_rows > c->out->tokens) return KVC_ERR_INTERNAL;
  const size_t row = (size_t)s->n_kv_heads * s->head_dim;
  const size_t at = ((size_t)layer * c->out->tokens + c->stored[layer]) * row;
  memcpy(c->out->k + at, k, (size_t)c->step_rows * row * sizeof(float));
  memcpy(c->out->v + at, v, (size_t)c->step_rows * row * sizeof(float));
  return c->inner->ops->store(c->inner, layer, k, v);
}
static kvc_status_t cap_attend(kvc_runner_kv_t *kv, int layer, const float *q, float *out,
                               float scale) {
  capture_kv_t *c = self(kv);
  const kvc_runner_shape_t *s = &c->out->shape;
  const size_t row = (size_t)s->n_heads * s->head_dim;
  const size_t at = ((size_t)layer * c->out->tokens + c->stored[layer]) * row;
  memcpy(c->out->q + at, q, (size_t)c->step_rows * row * sizeof(float));
  c->stored[layer] += c->step_rows; /* store has checked the room */
  return c->inner->ops->attend(c->inner, layer, q, out, scale);
}
static kvc_status_t cap_stats(kvc_runner_kv_t *kv, kvc_stats_t *out) {
  return self(kv)->inner->ops->stats(self(kv)->inner, out);
}
static void cap_destroy(kvc_runner_kv_t *kv) { (void)kv; }

static const kvc_runner_kv_ops_t capture_ops = {cap_add,  cap_reserve, cap_free,   cap_swap,
                                                cap_swap, cap_plan,    cap_store,  cap_attend,
                                                cap_stats, cap_destroy};

kvc_status_t kvc_runner_capture(kvc_runner_ctx_t *ctx, const int32_t *stream, int n_stream,
                                int windows, int window_len, kvc_runner_capture_t *out,
                                kvc_runner_err_t *err) {
  memset(out, 0, sizeof *out);
  const kvc_runner_shape_t *s = &ctx->model->shape;
  out->shape = *s;
  out->tokens = windows * (window_len - 1);
  const size_t per_layer = (size_t)s->n_layers * (size_t)out->tokens;
  out->k = malloc(per_layer * (size_t)s->n_kv_heads * s->head_dim * sizeof(float));
  out->v = malloc(per_layer * (size_t)s->n_kv_heads * s->head_dim * sizeof(float));
  out->q = malloc(per_layer * (size_t)s->n_heads * s->head_dim * sizeof(float));
  capture_kv_t c;
  memset(&c, 0, sizeof c);
  c.stored = calloc((size_t)s->n_layers, sizeof *c.stored);
  kvc_status_t st = KVC_OK;
  if (!out->k || !out->v || !out->q || !c.stored) {
    st = kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "capture: out of memory");
    goto done;
  }
  if ((st = kvc_runner_kv_dense(s, NULL, &c.inner, err)) != KVC_OK) goto done;
  c.base.ops = &capture_ops;
  c.base.name = "dense";
  c.base.block_tokens = 64;
  c.out = out;
  const kvc_runner_ppl_opts_t pp = {windows, window_len, KVC_RUNNER_FEED_PREFILL, 1};
  kvc_runner_ppl_t p;
  if ((st = kvc_runner_perplexity(ctx, &c.base, stream, n_stream, &pp, &p, err)) != KVC_OK)
    goto done;
  out->ppl = p.ppl;
  kvc_runner_ppl_free(&p);
  for (int l = 0; l < s->n_layers; l++)
    if (c.stored[l] != out->tokens) {
      st = kvc_runner_fail(err, KVC_ERR_INTERNAL, "capture: layer %d holds %d of %d tokens", l,
                           c.stored[l], out->tokens);
      break;
    }
done:
  kvc_runner_kv_destroy(c.inner);
  free(c.stored);
  return st;
}

kvc_status_t kvc_runner_capture_files(const char *model_path, const char *tokenizer_path,
                                      const char *text_path, int windows, int window_len,
                                      kvc_runner_capture_t *out, kvc_runner_err_t *err) {
  memset(out, 0, sizeof *out);
  kvc_runner_model_t m;
  kvc_runner_ctx_t ctx;
  int32_t *stream = NULL;
  int n_stream = 0;
  memset(&m, 0, sizeof m);
  memset(&ctx, 0, sizeof ctx);
  kvc_status_t st = kvc_runner_model_load(&m, model_path, tokenizer_path, err);
  if (st == KVC_OK)
    st = kvc_runner_text_stream(&m.vocab, text_path, windows * (window_len - 1), &stream,
                                &n_stream, err);
  if (st == KVC_OK) st = kvc_runner_ctx_init(&ctx, &m, window_len - 1, err);
  if (st == KVC_OK) st = kvc_runner_capture(&ctx, stream, n_stream, windows, window_len, out, err);
  kvc_runner_ctx_free(&ctx);
  free(stream);
  kvc_runner_model_free(&m);
  return st;
}

void kvc_runner_capture_free(kvc_runner_capture_t *c) {
  free(c->k);
  free(c->v);
  free(c->q);
  memset(c, 0, sizeof *c);
}
