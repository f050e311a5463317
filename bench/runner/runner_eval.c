/* The perplexity protocol and the emulated baselines (see runner_eval.h). */
#include "runner_eval.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

kvc_status_t kvc_runner_text_stream(const kvc_runner_vocab_t *vocab, const char *path,
                                    int min_tokens, int32_t **tokens, int *n, kvc_runner_err_t *err) {
  unsigned char *data = NULL;
  size_t size = 0;
  int32_t *out = NULL, *para = NULL;
  char *buf = NULL;
  int have = 0, cap = 0;
  kvc_status_t st = kvc_runner_read_file(path, &data, &size, err);
  if (st != KVC_OK) return st;
  buf = malloc(size + 1);
  para = malloc((size + 2) * sizeof *para);
  if (!buf || !para) {
    st = kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "%s: out of memory", path);
    goto out;
  }
  const char *text = (const char *)data, *end = text + size;
  while (text < end && (min_tokens <= 0 || have < min_tokens)) {
    /* Paragraph: up to the next "\n\n" (Python's str.split("\n\n")). */
    const char *stop = strstr(text, "\n\n");
    if (!stop || stop > end) stop = end;
    const char *a = text, *b = stop;
    while (a < b && is_space(*a)) a++;
    while (b > a && is_space(b[-1])) b--;
    size_t len = (size_t)(b - a);
    for (size_t i = 0; i < len; i++) buf[i] = a[i] == '\n' ? ' ' : a[i];
    buf[len] = 0;
    text = stop + (stop < end ? 2 : 0);
    if (len == 0) continue;
    int np = 0;
    if ((st = kvc_runner_encode(vocab, buf, 0, para, (int)size + 2, &np, err)) != KVC_OK) goto out;
    if (have + np > cap) {
      int ncap = cap ? cap : 4096;
      while (ncap < have + np) ncap *= 2;
      int32_t *grown = realloc(out, (size_t)ncap * sizeof *out);
      if (!grown) {
        st = kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "%s: out of memory", path);
        goto out;
      }
      out = grown;
      cap = ncap;
    }
    memcpy(out + have, para, (size_t)np * sizeof *para);
    have += np;
  }
  if (min_tokens > 0 && have < min_tokens) {
    st = kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "%s: the text gives %d tokens, %d needed",
                         path, have, min_tokens);
    goto out;
  }
  *tokens = out;
  *n = have;
  out = NULL;
out:
  free(out);
  free(para);
  free(buf);
  free(data);
  return st;
}

void kvc_runner_ppl_free(kvc_runner_ppl_t *r) {
  free(r->argmax);
  memset(r, 0, sizeof *r);
}

double kvc_runner_agreement(const int32_t *a, const int32_t *b, int64_t n) {
  int64_t same = 0;
  for (int64_t i = 0; i < n; i++) same += a[i] == b[i];
  return n ? (double)same / (double)n : 0.0;
}

/* Scores one row of logits against `target`: adds -log p(target); returns the argmax. */
static int score_row(const float *logits, int vocab, int target, double *nll) {
  int best = 0;
  for (int i = 1; i < vocab; i++)
    if (logits[i] > logits[best]) best = i;
  double sum = 0;
  for (int i = 0; i < vocab; i++) sum += exp((double)logits[i] - logits[best]);
  *nll += -((double)logits[target] - logits[best] - log(sum));
  return best;
}

kvc_status_t kvc_runner_perplexity(kvc_runner_ctx_t *ctx, kvc_runner_kv_t *kv, const int32_t *stream,
                                   int n_stream, const kvc_runner_ppl_opts_t *opts,
                                   kvc_runner_ppl_t *out, kvc_runner_err_t *err) {
  return kvc_runner_perplexity_chunked(ctx, kv, stream, n_stream, opts, 0, out, err);
}

kvc_status_t kvc_runner_perplexity_chunked(kvc_runner_ctx_t *ctx, kvc_runner_kv_t *kv,
                                           const int32_t *stream, int n_stream,
                                           const kvc_runner_ppl_opts_t *opts, int chunk,
                                           kvc_runner_ppl_t *out, kvc_runner_err_t *err) {
  const kvc_runner_shape_t *s = &ctx->model->shape;
  int W = opts->windows, L = (opts->window_len > 0 ? opts->window_len : 256) - 1;
  int G = opts->group > 0 && opts->group < W ? opts->group : W;
  int prefill = opts->feed == KVC_RUNNER_FEED_PREFILL;
  /* Tokens of each window per step: 1 (decode), a chunk, or the whole window. */
  int C = !prefill ? 1 : chunk > 0 && chunk < L ? chunk : L;
  memset(out, 0, sizeof *out);
  if (W < 1 || L < 1 || (int64_t)W * L > n_stream)
    return kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "perplexity: %d windows of %d tokens need "
                           "%lld text tokens, have %d", W, L + 1, (long long)W * L, n_stream);
  if (L + 1 > s->max_seq_len)
    return kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "perplexity: window of %d tokens is longer "
                           "than the model's context (%d)", L + 1, s->max_seq_len);
  if (G * C > ctx->cap_tokens)
    return kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "perplexity: step capacity %d too small",
                           ctx->cap_tokens);
  kvc_status_t st = KVC_OK;
  int rows = G * C;
  kvc_seq_id_t *ids = malloc((size_t)G * sizeof *ids);
  int32_t *n_new = malloc((size_t)G * sizeof *n_new);
  int32_t *pos0 = malloc((size_t)G * sizeof *pos0);
  int32_t *toks = malloc((size_t)rows * sizeof *toks);
  float *logits = malloc((size_t)rows * s->vocab_size * sizeof *logits);
  out->argmax = malloc((size_t)W * L * sizeof *out->argmax);
  int64_t correct = 0;
  int added = 0;
  double t0 = kvc_runner_now();
  if (!ids || !n_new || !pos0 || !toks || !logits || !out->argmax) {
    st = kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "perplexity: out of memory");
    goto out;
  }
  for (int w0 = 0; w0 < W; w0 += G) {
    int g = W - w0 < G ? W - w0 : G;
    for (added = 0; added < g; added++) {
      ids[added] = (kvc_seq_id_t)added;
      /* No prompt tokens: windows are scored, not looked up in the prefix cache. */
      int n_cached = 0;
      if ((st = kv->ops->seq_add(kv, ids[added], NULL, 0, &n_cached)) != KVC_OK) {
        kvc_runner_fail(err, st, "%s: seq_add: %s", kv->name, kvc_status_string(st));
        goto out;
      }
      if (n_cached != 0 || (st = kv->ops->seq_reserve(kv, ids[added], L)) != KVC_OK) {
        if (st == KVC_OK) st = KVC_ERR_INTERNAL;
        kvc_runner_fail(err, st, "%s: admitting window %d: %s (n_cached %d)", kv->name, w0 + added,
                        kvc_status_string(st), n_cached);
        added++;
        goto out;
      }
    }
    int steps = (L + C - 1) / C;
    for (int j = 0; j < steps; j++) {
      for (int i = 0; i < g; i++) {
        const int32_t *win = stream + (size_t)(w0 + i) * L;
        n_new[i] = L - j * C < C ? L - j * C : C;
        pos0[i] = j * C;
        int32_t *dst = toks + (size_t)i * n_new[i];
        for (int t = 0; t < n_new[i]; t++) {
          int p = pos0[i] + t;
          dst[t] = p == 0 ? ctx->model->vocab.bos : win[p - 1];
        }
      }
      kvc_runner_step_t step = {g, ids, n_new, pos0, toks, prefill, 0, logits};
      if ((st = kvc_runner_forward(ctx, kv, &step, err)) != KVC_OK) goto out;
      for (int i = 0; i < g; i++) {
        const int32_t *win = stream + (size_t)(w0 + i) * L;
        for (int t = 0; t < n_new[i]; t++) {
          int p = pos0[i] + t;
          const float *row = logits + ((size_t)i * n_new[i] + t) * s->vocab_size;
          int best = score_row(row, s->vocab_size, win[p], &out->nll);
          out->argmax[(size_t)(w0 + i) * L + p] = best;
          correct += best == win[p];
        }
      }
    }
    kvc_stats_t stats;
    memset(&stats, 0, sizeof stats);
    stats.struct_size = sizeof stats;
    if ((st = kv->ops->stats(kv, &stats)) != KVC_OK) {
      kvc_runner_fail(err, st, "%s: stats: %s", kv->name, kvc_status_string(st));
      goto out;
    }
    out->page_bytes += (double)stats.page_bytes;
    out->full_blocks += (int64_t)g * (L / kv->block_tokens) * s->n_layers;
    for (int i = 0; i < g; i++) {
      if ((st = kv->ops->seq_free(kv, ids[i])) != KVC_OK) {
        kvc_runner_fail(err, st, "%s: seq_free: %s", kv->name, kvc_status_string(st));
        goto out;
      }
    }
    added = 0;
  }
  out->n_scored = (int64_t)W * L;
  out->ppl = exp(out->nll / (double)out->n_scored);
  out->top1_text = (double)correct / (double)out->n_scored;
  out->seconds = kvc_runner_now() - t0;
out:
  if (st != KVC_OK) {
    for (int i = 0; i < added; i++) kv->ops->seq_free(kv, ids[i]);
    kvc_runner_ppl_free(out);
  }
  free(ids);
  free(n_new);
  free(pos0);
  free(toks);
  free(logits);
  return st;
}

kvc_status_t kvc_runner_greedy(kvc_runner_ctx_t *ctx, kvc_runner_kv_t *kv, kvc_seq_id_t id,
                               const int32_t *prompt, int n_prompt, int n_new, int32_t *out,
                               kvc_runner_err_t *err) {
  const kvc_runner_shape_t *s = &ctx->model->shape;
  if (n_prompt < 1 || n_new < 0 || n_prompt + n_new > s->max_seq_len)
    return kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "a prompt of %d tokens plus %d new ones "
                           "does not fit the model's context of %d tokens", n_prompt, n_new,
                           s->max_seq_len);
  float *logits = malloc((size_t)s->vocab_size * sizeof *logits);
  if (!logits) return kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "out of memory");
  int n_cached = 0;
  kvc_status_t st = kv->ops->seq_add(kv, id, prompt, n_prompt, &n_cached);
  if (st != KVC_OK) {
    free(logits);
    return kvc_runner_fail(err, st, "%s: seq_add: %s", kv->name, kvc_status_string(st));
  }
  if ((st = kv->ops->seq_reserve(kv, id, n_prompt - n_cached + n_new)) != KVC_OK)
    kvc_runner_fail(err, st, "%s: seq_reserve: %s", kv->name, kvc_status_string(st));
  int32_t n = n_prompt - n_cached, pos = n_cached;
  const int32_t *feed = prompt + n_cached;
  for (int i = 0; i < n_new && st == KVC_OK; i++) {
    kvc_runner_step_t step = {1, &id, &n, &pos, feed, 0, 1, logits};
    if ((st = kvc_runner_forward(ctx, kv, &step, err)) != KVC_OK) break;
    int best = 0;
    for (int t = 1; t < s->vocab_size; t++)
      if (logits[t] > logits[best]) best = t;
    out[i] = best;
    feed = &out[i];
    pos += n;
    n = 1;
  }
  kvc_status_t st2 = kv->ops->seq_free(kv, id);
  if (st == KVC_OK && st2 != KVC_OK)
    st = kvc_runner_fail(err, st2, "%s: seq_free: %s", kv->name, kvc_status_string(st2));
  free(logits);
  return st;
}

float kvc_runner_round_f16(float x) {
  if (!isfinite(x)) return x;
  float a = fabsf(x);
  if (a >= 65520.0f) return copysignf(INFINITY, x);
  int e;
  frexpf(a, &e); /* a = m * 2^e, m in [0.5, 1) */
  /* 11 significant bits for normals (e - 1 >= -14), a fixed step of 2^-24 for subnormals. */
  float step = e - 1 >= -14 ? ldexpf(1.0f, e - 11) : ldexpf(1.0f, -24);
  return copysignf(rintf(a / step) * step, x);
}

float kvc_runner_round_e4m3(float x) {
  if (isnan(x)) return x;
  float a = fabsf(x);
  if (a >= 448.0f) return copysignf(448.0f, x); /* saturate, like vLLM's scaled conversion */
  int e;
  frexpf(a, &e);
  /* 4 significant bits for normals (exponent >= -6), a fixed step of 2^-9 for subnormals. */
  float step = e - 1 >= -6 ? ldexpf(1.0f, e - 4) : ldexpf(1.0f, -9);
  float r = rintf(a / step) * step;
  return copysignf(r > 448.0f ? 448.0f : r, x);
}

/* Asymmetric b-bit quantization of n values at stride `stride` with fp16 min and scale. */
static void kivi_group(float *x, int n, size_t stride, int bits) {
  float lo = INFINITY, hi = -INFINITY;
  for (int i = 0; i < n; i++) {
    float v = x[(size_t)i * stride];
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  int levels = (1 << bits) - 1;
  float zero = kvc_runner_round_f16(lo);
  float scale = kvc_runner_round_f16((hi - zero) / (float)levels);
  for (int i = 0; i < n; i++) {
    float *v = &x[(size_t)i * stride];
    float q = scale > 0 ? rintf((*v - zero) / scale) : 0.0f;
    q = q < 0 ? 0 : q > (float)levels ? (float)levels : q;
    *v = zero + q * scale;
  }
}

void kvc_runner_quant_block(void *user, int layer, float *k, float *v, int n_tokens, int n_kv_heads,
                            int head_dim) {
  kvc_runner_quant_t *q = user;
  size_t row = (size_t)n_kv_heads * (size_t)head_dim, n = (size_t)n_tokens * row;
  q->values += 2 * (int64_t)n;
  switch (q->kind) {
  case KVC_RUNNER_Q_FP16:
    for (size_t i = 0; i < n; i++) {
      k[i] = kvc_runner_round_f16(k[i]);
      v[i] = kvc_runner_round_f16(v[i]);
    }
    q->bytes += 2.0 * 2.0 * (double)n;
    break;
  case KVC_RUNNER_Q_FP8: {
    /* vLLM's fp8 KV cache: x / scale in e4m3, scale = amax / 448 per layer and tensor. */
    float ks = q->k_amax[layer] > 0 ? q->k_amax[layer] / 448.0f : 1.0f;
    float vs = q->v_amax[layer] > 0 ? q->v_amax[layer] / 448.0f : 1.0f;
    for (size_t i = 0; i < n; i++) {
      k[i] = kvc_runner_round_e4m3(k[i] / ks) * ks;
      v[i] = kvc_runner_round_e4m3(v[i] / vs) * vs;
    }
    q->bytes += 2.0 * (double)n; /* the two fp32 scales per layer are amortized over the cache */
    break;
  }
  case KVC_RUNNER_Q_KIVI:
    for (size_t c = 0; c < row; c++) kivi_group(k + c, n_tokens, row, q->bits);
    for (int t = 0; t < n_tokens; t++) kivi_group(v + (size_t)t * row, (int)row, 1, q->bits);
    /* Codes, then fp16 scale + zero per key channel and per value token. */
    q->bytes += 2.0 * (double)n * q->bits / 8.0 + 4.0 * (double)row + 4.0 * (double)n_tokens;
    break;
  case KVC_RUNNER_Q_AMAX:
    for (size_t i = 0; i < n; i++) {
      if (fabsf(k[i]) > q->k_amax[layer]) q->k_amax[layer] = fabsf(k[i]);
      if (fabsf(v[i]) > q->v_amax[layer]) q->v_amax[layer] = fabsf(v[i]);
    }
    q->bytes += 2.0 * 4.0 * (double)n;
    break;
  }
}
