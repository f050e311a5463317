/*
 * The dense in-runner KV cache: every sequence's K and V in fp32 arrays, attention in fp64.
 * Exact (the reference the kvcomp path is tested against) unless a block hook rewrites full blocks.
 * As kvcomp compresses them, the hook rewrites the blocks a step completes at the next plan (or at
 * a seq_free before it), so a step's attention reads its own new tokens exactly.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "runner_kv.h"

typedef struct dense_seq {
  kvc_seq_id_t id;
  int len;      /* tokens stored, including the current step's */
  int reserved; /* tokens guaranteed by reserve */
  int cap;      /* rows allocated per layer */
  float **k;    /* [n_layers] -> [cap][n_kv_heads * head_dim] */
  float **v;
} dense_seq_t;

typedef struct dense {
  kvc_runner_kv_t base;
  kvc_runner_shape_t shape;
  kvc_runner_dense_opts_t opts;
  dense_seq_t *seqs; /* [opts.max_seqs], the first n_seqs live */
  int n_seqs;
  int64_t reserved_total;
  /* The planned step. */
  int step_seqs;
  int *step_idx;       /* [max_seqs] index into seqs */
  int *step_start;     /* [max_seqs] first new position */
  int *step_count;     /* [max_seqs] new tokens */
  unsigned char *stored; /* [n_layers] store done for this step */
  int planned;         /* 0 none, 1 step in progress, 2 every layer stored (attend still allowed) */
  int pending;         /* the step's completed blocks have not been given to on_full_block */
  double *scores;      /* [max_seq_len] attention scratch */
} dense_t;

static int find_seq(const dense_t *d, kvc_seq_id_t id) {
  for (int i = 0; i < d->n_seqs; i++)
    if (d->seqs[i].id == id) return i;
  return -1;
}

static void free_seq(dense_t *d, dense_seq_t *s) {
  for (int l = 0; l < d->shape.n_layers; l++) {
    if (s->k) free(s->k[l]);
    if (s->v) free(s->v[l]);
  }
  free(s->k);
  free(s->v);
}

/* Gives the blocks the planned step completed, in every layer it stored, to on_full_block. */
static void flush_pending(dense_t *d) {
  if (!d->pending) return;
  size_t row = (size_t)d->shape.n_kv_heads * (size_t)d->shape.head_dim;
  int B = d->opts.block_tokens;
  for (int i = 0; i < d->step_seqs; i++) {
    dense_seq_t *s = &d->seqs[d->step_idx[i]];
    int start = d->step_start[i], n = d->step_count[i];
    for (int layer = 0; layer < d->shape.n_layers; layer++) {
      if (!d->stored[layer]) continue;
      for (int blk = start / B; (blk + 1) * B <= start + n; blk++)
        d->opts.on_full_block(d->opts.user, layer, s->k[layer] + (size_t)blk * B * row,
                              s->v[layer] + (size_t)blk * B * row, B, d->shape.n_kv_heads,
                              d->shape.head_dim);
    }
  }
  d->pending = 0;
}

static kvc_status_t d_seq_add(kvc_runner_kv_t *kv, kvc_seq_id_t id, const int32_t *tokens, int n,
                              int *n_cached) {
  dense_t *d = (dense_t *)kv;
  (void)tokens;
  if (d->planned == 1) return KVC_ERR_INVALID_STATE;
  if (id == KVC_SEQ_NONE || find_seq(d, id) >= 0 || n < 0 || n > d->shape.max_seq_len)
    return KVC_ERR_INVALID_ARGUMENT;
  if (d->n_seqs == d->opts.max_seqs) return KVC_ERR_OUT_OF_MEMORY;
  dense_seq_t *s = &d->seqs[d->n_seqs];
  memset(s, 0, sizeof *s);
  s->id = id;
  s->k = calloc((size_t)d->shape.n_layers, sizeof *s->k);
  s->v = calloc((size_t)d->shape.n_layers, sizeof *s->v);
  if (!s->k || !s->v) {
    free_seq(d, s);
    return KVC_ERR_OUT_OF_HOST_MEMORY;
  }
  d->n_seqs++;
  d->planned = 0;
  if (n_cached) *n_cached = 0;
  return KVC_OK;
}

static kvc_status_t d_seq_reserve(kvc_runner_kv_t *kv, kvc_seq_id_t id, int n_new) {
  dense_t *d = (dense_t *)kv;
  int i = find_seq(d, id);
  if (i < 0) return KVC_ERR_NOT_FOUND;
  if (d->planned == 1) return KVC_ERR_INVALID_STATE;
  dense_seq_t *s = &d->seqs[i];
  if (n_new < 0 || s->len + n_new > d->shape.max_seq_len) return KVC_ERR_INVALID_ARGUMENT;
  int want = s->len + n_new;
  if (want <= s->reserved) return KVC_OK;
  if (d->opts.capacity_tokens > 0 && d->reserved_total + (want - s->reserved) > d->opts.capacity_tokens)
    return KVC_ERR_OUT_OF_MEMORY;
  if (want > s->cap) {
    int cap = s->cap ? s->cap : 64;
    while (cap < want) cap *= 2;
    if (cap > d->shape.max_seq_len) cap = d->shape.max_seq_len;
    size_t row = (size_t)d->shape.n_kv_heads * (size_t)d->shape.head_dim;
    for (int l = 0; l < d->shape.n_layers; l++) {
      float *k = realloc(s->k[l], (size_t)cap * row * sizeof(float));
      if (k) s->k[l] = k;
      float *v = realloc(s->v[l], (size_t)cap * row * sizeof(float));
      if (v) s->v[l] = v;
      if (!k || !v) return KVC_ERR_OUT_OF_HOST_MEMORY; /* grown arrays are harmless to keep */
    }
    s->cap = cap;
  }
  d->reserved_total += want - s->reserved;
  s->reserved = want;
  return KVC_OK;
}

static kvc_status_t d_seq_free(kvc_runner_kv_t *kv, kvc_seq_id_t id) {
  dense_t *d = (dense_t *)kv;
  int i = find_seq(d, id);
  if (i < 0) return KVC_ERR_NOT_FOUND;
  if (d->planned == 1) return KVC_ERR_INVALID_STATE;
  flush_pending(d);
  d->planned = 0; /* step indices below would go stale */
  d->reserved_total -= d->seqs[i].reserved;
  free_seq(d, &d->seqs[i]);
  d->seqs[i] = d->seqs[--d->n_seqs];
  return KVC_OK;
}

static kvc_status_t d_swap(kvc_runner_kv_t *kv, kvc_seq_id_t id) {
  (void)kv;
  (void)id;
  return KVC_ERR_UNSUPPORTED;
}

static kvc_status_t d_plan(kvc_runner_kv_t *kv, const kvc_batch_t *b) {
  dense_t *d = (dense_t *)kv;
  if (!b || b->num_seqs < 1 || b->num_seqs > d->n_seqs || !b->seq_ids || !b->num_new_tokens)
    return KVC_ERR_INVALID_ARGUMENT;
  if (d->planned == 1) return KVC_ERR_INVALID_STATE;
  for (int i = 0; i < b->num_seqs; i++) {
    int si = find_seq(d, b->seq_ids[i]);
    if (si < 0) return KVC_ERR_NOT_FOUND;
    for (int j = 0; j < i; j++)
      if (b->seq_ids[j] == b->seq_ids[i]) return KVC_ERR_INVALID_ARGUMENT;
    if (b->num_new_tokens[i] < 1 || d->seqs[si].len + b->num_new_tokens[i] > d->seqs[si].reserved)
      return KVC_ERR_INVALID_ARGUMENT;
  }
  flush_pending(d);
  for (int i = 0; i < b->num_seqs; i++) {
    int si = find_seq(d, b->seq_ids[i]);
    d->step_idx[i] = si;
    d->step_start[i] = d->seqs[si].len;
    d->step_count[i] = b->num_new_tokens[i];
    d->seqs[si].len += b->num_new_tokens[i];
  }
  d->step_seqs = b->num_seqs;
  d->planned = 1;
  memset(d->stored, 0, (size_t)d->shape.n_layers);
  return KVC_OK;
}

static kvc_status_t d_store(kvc_runner_kv_t *kv, int layer, const float *k, const float *v) {
  dense_t *d = (dense_t *)kv;
  if (layer < 0 || layer >= d->shape.n_layers || !k || !v) return KVC_ERR_INVALID_ARGUMENT;
  if (!d->planned || d->stored[layer]) return KVC_ERR_INVALID_STATE;
  size_t row = (size_t)d->shape.n_kv_heads * (size_t)d->shape.head_dim;
  for (int i = 0; i < d->step_seqs; i++) {
    dense_seq_t *s = &d->seqs[d->step_idx[i]];
    int start = d->step_start[i], n = d->step_count[i];
    memcpy(s->k[layer] + (size_t)start * row, k, (size_t)n * row * sizeof(float));
    memcpy(s->v[layer] + (size_t)start * row, v, (size_t)n * row * sizeof(float));
    k += (size_t)n * row;
    v += (size_t)n * row;
  }
  d->stored[layer] = 1;
  if (d->opts.on_full_block) d->pending = 1;
  int all = 1;
  for (int l = 0; l < d->shape.n_layers; l++) all &= d->stored[l];
  if (all) d->planned = 2; /* complete: the next plan may come, attend still allowed */
  return KVC_OK;
}

static kvc_status_t d_attend(kvc_runner_kv_t *kv, int layer, const float *q, float *out,
                             float scale) {
  dense_t *d = (dense_t *)kv;
  if (layer < 0 || layer >= d->shape.n_layers || !q || !out) return KVC_ERR_INVALID_ARGUMENT;
  if (!d->planned || !d->stored[layer]) return KVC_ERR_INVALID_STATE;
  int H = d->shape.n_heads, KH = d->shape.n_kv_heads, hd = d->shape.head_dim, group = H / KH;
  size_t row = (size_t)KH * (size_t)hd;
  double acc[512];
  for (int i = 0; i < d->step_seqs; i++) {
    const dense_seq_t *s = &d->seqs[d->step_idx[i]];
    for (int j = 0; j < d->step_count[i]; j++) {
      int pos = d->step_start[i] + j;
      for (int h = 0; h < H; h++) {
        const float *qh = q + (size_t)h * hd;
        const float *kbase = s->k[layer] + (size_t)(h / group) * hd;
        const float *vbase = s->v[layer] + (size_t)(h / group) * hd;
        double mx = -INFINITY;
        for (int t = 0; t <= pos; t++) {
          const float *kt = kbase + (size_t)t * row;
          double dot = 0;
          for (int e = 0; e < hd; e++) dot += (double)qh[e] * kt[e];
          d->scores[t] = dot * scale;
          if (d->scores[t] > mx) mx = d->scores[t];
        }
        double sum = 0;
        for (int e = 0; e < hd; e++) acc[e] = 0;
        for (int t = 0; t <= pos; t++) {
          double p = exp(d->scores[t] - mx);
          sum += p;
          const float *vt = vbase + (size_t)t * row;
          for (int e = 0; e < hd; e++) acc[e] += p * vt[e];
        }
        for (int e = 0; e < hd; e++) out[(size_t)h * hd + e] = (float)(acc[e] / sum);
      }
      q += (size_t)H * hd;
      out += (size_t)H * hd;
    }
  }
  return KVC_OK;
}

static kvc_status_t d_stats(kvc_runner_kv_t *kv, kvc_stats_t *out) {
  dense_t *d = (dense_t *)kv;
  size_t sz = out->struct_size;
  memset(out, 0, sizeof *out);
  out->struct_size = sz;
  for (int i = 0; i < d->n_seqs; i++) out->tokens_stored += d->seqs[i].len;
  out->live_seqs = d->n_seqs;
  return KVC_OK;
}

static void d_destroy(kvc_runner_kv_t *kv) {
  dense_t *d = (dense_t *)kv;
  for (int i = 0; i < d->n_seqs; i++) free_seq(d, &d->seqs[i]);
  free(d->seqs);
  free(d->step_idx);
  free(d->step_start);
  free(d->step_count);
  free(d->stored);
  free(d->scores);
  free(d);
}

static const kvc_runner_kv_ops_t dense_ops = {d_seq_add, d_seq_reserve, d_seq_free, d_swap, d_swap,
                                              d_plan,    d_store,       d_attend,   d_stats, d_destroy};

kvc_status_t kvc_runner_kv_dense(const kvc_runner_shape_t *shape, const kvc_runner_dense_opts_t *opts,
                                 kvc_runner_kv_t **out, kvc_runner_err_t *err) {
  if (shape->head_dim > 512)
    return kvc_runner_fail(err, KVC_ERR_UNSUPPORTED, "dense KV: head_dim %d > 512", shape->head_dim);
  dense_t *d = calloc(1, sizeof *d);
  if (!d) return kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "dense KV: out of memory");
  d->shape = *shape;
  if (opts) d->opts = *opts;
  if (d->opts.block_tokens <= 0) d->opts.block_tokens = 64;
  if (d->opts.max_seqs <= 0) d->opts.max_seqs = 256;
  int ms = d->opts.max_seqs;
  d->seqs = calloc((size_t)ms, sizeof *d->seqs);
  d->step_idx = calloc((size_t)ms, sizeof(int));
  d->step_start = calloc((size_t)ms, sizeof(int));
  d->step_count = calloc((size_t)ms, sizeof(int));
  d->stored = calloc((size_t)shape->n_layers, 1);
  d->scores = calloc((size_t)shape->max_seq_len, sizeof(double));
  if (!d->seqs || !d->step_idx || !d->step_start || !d->step_count || !d->stored || !d->scores) {
    d_destroy(&d->base);
    return kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "dense KV: out of memory");
  }
  d->base.ops = &dense_ops;
  d->base.name = "dense";
  d->base.block_tokens = d->opts.block_tokens;
  *out = &d->base;
  return KVC_OK;
}
