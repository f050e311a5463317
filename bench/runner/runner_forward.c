/* The fp32 forward pass (see runner_forward.h), llama2.c's math batched over tokens. */
#include "runner_forward.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void kvc_runner_ctx_free(kvc_runner_ctx_t *ctx) {
  free(ctx->x);
  free(ctx->xb);
  free(ctx->xb2);
  free(ctx->q);
  free(ctx->att);
  free(ctx->k);
  free(ctx->v);
  free(ctx->hb);
  free(ctx->hb2);
  free(ctx->rope);
  free(ctx->positions);
  free(ctx->ids);
  memset(ctx, 0, sizeof *ctx);
}

kvc_status_t kvc_runner_ctx_init(kvc_runner_ctx_t *ctx, const kvc_runner_model_t *model,
                                 int cap_tokens, kvc_runner_err_t *err) {
  memset(ctx, 0, sizeof *ctx);
  const kvc_runner_shape_t *s = &model->shape;
  if (cap_tokens < 1)
    return kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "step capacity %d < 1", cap_tokens);
  size_t T = (size_t)cap_tokens, qd = (size_t)s->n_heads * s->head_dim;
  size_t kvd = (size_t)s->n_kv_heads * s->head_dim, half = (size_t)s->head_dim / 2;
  ctx->model = model;
  ctx->cap_tokens = cap_tokens;
  ctx->x = malloc(T * s->dim * sizeof(float));
  ctx->xb = malloc(T * s->dim * sizeof(float));
  ctx->xb2 = malloc(T * s->dim * sizeof(float));
  ctx->q = malloc(T * qd * sizeof(float));
  ctx->att = malloc(T * qd * sizeof(float));
  ctx->k = malloc(T * kvd * sizeof(float));
  ctx->v = malloc(T * kvd * sizeof(float));
  ctx->hb = malloc(T * s->hidden_dim * sizeof(float));
  ctx->hb2 = malloc(T * s->hidden_dim * sizeof(float));
  ctx->rope = malloc((size_t)s->max_seq_len * half * 2 * sizeof(float));
  ctx->positions = malloc(T * sizeof(int32_t));
  ctx->ids = malloc(T * sizeof(kvc_seq_id_t));
  if (!ctx->x || !ctx->xb || !ctx->xb2 || !ctx->q || !ctx->att || !ctx->k || !ctx->v || !ctx->hb ||
      !ctx->hb2 || !ctx->rope || !ctx->positions || !ctx->ids) {
    kvc_runner_ctx_free(ctx);
    return kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "forward: out of memory");
  }
  /* Rotation angles in double so long positions keep their precision. */
  for (int p = 0; p < s->max_seq_len; p++) {
    for (size_t i = 0; i < half; i++) {
      double freq = pow((double)s->rope_theta, -(double)(2 * i) / (double)s->head_dim);
      double a = p * freq;
      ctx->rope[((size_t)p * half + i) * 2] = (float)cos(a);
      ctx->rope[((size_t)p * half + i) * 2 + 1] = (float)sin(a);
    }
  }
  return KVC_OK;
}

/* Dot product with 8 independent partial sums: vectorizes without reassociating a single sum. */
static float dot(const float *a, const float *b, int n) {
  float acc[8] = {0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

/* out[T][n] = in[T][d] * W^T, W [n][d] row-major. */
static void matmul(float *out, const float *in, const float *w, int T, int d, int n) {
  for (int t = 0; t < T; t++)
    for (int o = 0; o < n; o++) out[(size_t)t * n + o] = dot(in + (size_t)t * d, w + (size_t)o * d, d);
}

static void rmsnorm(float *out, const float *x, const float *w, int T, int d, float eps) {
  for (int t = 0; t < T; t++) {
    const float *xt = x + (size_t)t * d;
    double ss = 0;
    for (int i = 0; i < d; i++) ss += (double)xt[i] * xt[i];
    float r = (float)(1.0 / sqrt(ss / d + eps));
    for (int i = 0; i < d; i++) out[(size_t)t * d + i] = w[i] * (r * xt[i]);
  }
}

/* Rotates pairs (2i, 2i+1) of every head of rows [T][heads * head_dim] by each row's position. */
static void rope(float *x, int T, int heads, int hd, const int32_t *pos, const float *table) {
  int half = hd / 2;
  for (int t = 0; t < T; t++) {
    const float *cs = table + (size_t)pos[t] * half * 2;
    for (int h = 0; h < heads; h++) {
      float *v = x + ((size_t)t * heads + h) * hd;
      for (int i = 0; i < half; i++) {
        float c = cs[2 * i], s = cs[2 * i + 1], a = v[2 * i], b = v[2 * i + 1];
        v[2 * i] = a * c - b * s;
        v[2 * i + 1] = a * s + b * c;
      }
    }
  }
}

kvc_status_t kvc_runner_forward(kvc_runner_ctx_t *ctx, kvc_runner_kv_t *kv,
                                const kvc_runner_step_t *step, kvc_runner_err_t *err) {
  const kvc_runner_model_t *m = ctx->model;
  const kvc_runner_shape_t *s = &m->shape;
  int T = 0;
  for (int i = 0; i < step->n_seqs; i++) {
    if (step->n_new[i] < 1 || step->pos0[i] < 0 || step->pos0[i] + step->n_new[i] > s->max_seq_len)
      return kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "forward: sequence %d: %d tokens at "
                             "position %d exceed the model's context of %d", i, step->n_new[i],
                             step->pos0[i], s->max_seq_len);
    if (T + step->n_new[i] > ctx->cap_tokens)
      return kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "forward: more than %d tokens in a step",
                             ctx->cap_tokens);
    for (int j = 0; j < step->n_new[i]; j++) ctx->positions[T + j] = step->pos0[i] + j;
    T += step->n_new[i];
  }
  for (int t = 0; t < T; t++)
    if (step->tokens[t] < 0 || step->tokens[t] >= s->vocab_size)
      return kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "forward: token id %d out of the "
                             "vocabulary (%d)", step->tokens[t], s->vocab_size);
  kvc_batch_t batch = {step->n_seqs, step->seq_ids, step->n_new,
                       step->pass_token_ids ? step->tokens : NULL};
  kvc_status_t st = kv->ops->plan(kv, &batch);
  if (st != KVC_OK)
    return kvc_runner_fail(err, st, "%s: plan: %s", kv->name, kvc_status_string(st));

  int D = s->dim, hd = s->head_dim, qd = s->n_heads * hd, kvd = s->n_kv_heads * hd;
  int Hf = s->hidden_dim;
  float scale = 1.0f / sqrtf((float)hd);
  for (int t = 0; t < T; t++)
    memcpy(ctx->x + (size_t)t * D, m->tok_emb + (size_t)step->tokens[t] * D, D * sizeof(float));
  for (int l = 0; l < s->n_layers; l++) {
    const kvc_runner_layer_t *ly = &m->layers[l];
    rmsnorm(ctx->xb, ctx->x, ly->attn_norm, T, D, s->norm_eps);
    matmul(ctx->q, ctx->xb, ly->wq, T, D, qd);
    matmul(ctx->k, ctx->xb, ly->wk, T, D, kvd);
    matmul(ctx->v, ctx->xb, ly->wv, T, D, kvd);
    rope(ctx->q, T, s->n_heads, hd, ctx->positions, ctx->rope);
    rope(ctx->k, T, s->n_kv_heads, hd, ctx->positions, ctx->rope);
    if ((st = kv->ops->store(kv, l, ctx->k, ctx->v)) != KVC_OK)
      return kvc_runner_fail(err, st, "%s: store layer %d: %s", kv->name, l, kvc_status_string(st));
    if ((st = kv->ops->attend(kv, l, ctx->q, ctx->att, scale)) != KVC_OK)
      return kvc_runner_fail(err, st, "%s: attend layer %d: %s", kv->name, l, kvc_status_string(st));
    matmul(ctx->xb2, ctx->att, ly->wo, T, qd, D);
    for (size_t i = 0; i < (size_t)T * D; i++) ctx->x[i] += ctx->xb2[i];
    rmsnorm(ctx->xb, ctx->x, ly->ffn_norm, T, D, s->norm_eps);
    matmul(ctx->hb, ctx->xb, ly->w_gate, T, D, Hf);
    matmul(ctx->hb2, ctx->xb, ly->w_up, T, D, Hf);
    for (size_t i = 0; i < (size_t)T * Hf; i++) {
      float g = ctx->hb[i];
      ctx->hb[i] = g / (1.0f + expf(-g)) * ctx->hb2[i];
    }
    matmul(ctx->xb2, ctx->hb, ly->w_down, T, Hf, D);
    for (size_t i = 0; i < (size_t)T * D; i++) ctx->x[i] += ctx->xb2[i];
  }
  /* Logits for the rows asked for. */
  int rows = 0, t0 = 0;
  for (int i = 0; i < step->n_seqs; i++) {
    int first = step->logits_all ? t0 : t0 + step->n_new[i] - 1;
    for (int t = first; t < t0 + step->n_new[i]; t++, rows++)
      if (rows != t) memcpy(ctx->x + (size_t)rows * D, ctx->x + (size_t)t * D, D * sizeof(float));
    t0 += step->n_new[i];
  }
  rmsnorm(ctx->xb, ctx->x, m->final_norm, rows, D, s->norm_eps);
  matmul(step->logits, ctx->xb, m->classifier, rows, D, s->vocab_size);
  return KVC_OK;
}
