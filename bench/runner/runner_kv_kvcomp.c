/*
 * The kvcomp KV backend: the runner's per-step calls go straight to the library's hooks. With
 * dtype F32 (CPU backend) the runner's tensors are passed through untouched; F16/BF16 are
 * converted on the host; on the CUDA backend the tensors are staged through device buffers.
 */
#include <stdlib.h>
#include <string.h>

#include "compress/kvc_codec.h"
#include "runner_kv.h"

#if KVC_HAVE_CUDA
#include <cuda_runtime.h>
#endif

typedef struct kvcomp_kv {
  kvc_runner_kv_t base;
  kvc_config_t cfg;
  size_t q_row, kv_row; /* values per token row of q/out and of k/v */
  size_t elt;           /* bytes per value in cfg.dtype */
  int step_tokens;      /* rows of the planned step */
  void *hk, *hv, *hq, *hout; /* host conversion buffers (NULL for F32 on the CPU backend) */
  void *dk, *dv, *dq, *dout; /* device buffers (CUDA backend) */
} kvcomp_kv_t;

static void to_dtype(kvc_dtype_t dt, void *dst, const float *src, size_t n) {
  uint16_t *d = dst;
  for (size_t i = 0; i < n; i++)
    d[i] = dt == KVC_DTYPE_F16 ? kvc_codec_f32_to_f16(src[i]) : kvc_codec_f32_to_bf16(src[i]);
}

static void from_dtype(kvc_dtype_t dt, float *dst, const void *src, size_t n) {
  const uint16_t *s = src;
  for (size_t i = 0; i < n; i++)
    dst[i] = dt == KVC_DTYPE_F16 ? kvc_codec_f16_to_f32(s[i]) : kvc_codec_bf16_to_f32(s[i]);
}

static kvc_status_t k_seq_add(kvc_runner_kv_t *kv, kvc_seq_id_t id, const int32_t *tokens, int n,
                              int *n_cached) {
  return kvc_seq_add(kv->cache, id, tokens, n, 0, n_cached);
}

static kvc_status_t k_seq_reserve(kvc_runner_kv_t *kv, kvc_seq_id_t id, int n_new) {
  return kvc_seq_reserve(kv->cache, id, n_new, 0);
}

static kvc_status_t k_seq_free(kvc_runner_kv_t *kv, kvc_seq_id_t id) {
  return kvc_seq_free(kv->cache, id);
}

static kvc_status_t k_swap_out(kvc_runner_kv_t *kv, kvc_seq_id_t id) {
  return kvc_seq_swap_out(kv->cache, id, NULL);
}

static kvc_status_t k_swap_in(kvc_runner_kv_t *kv, kvc_seq_id_t id) {
  return kvc_seq_swap_in(kv->cache, id, NULL);
}

static kvc_status_t k_plan(kvc_runner_kv_t *kv, const kvc_batch_t *b) {
  kvcomp_kv_t *c = (kvcomp_kv_t *)kv;
  kvc_status_t st = kvc_plan(kv->cache, b, NULL);
  if (st == KVC_OK) {
    c->step_tokens = 0;
    for (int i = 0; i < b->num_seqs; i++) c->step_tokens += b->num_new_tokens[i];
  }
  return st;
}

/* Puts n values of src where the library reads them: the runner's buffer itself (F32, CPU), a
 * converted host copy, or a device copy. Returns the pointer to hand to the library. */
static const void *stage_in(kvcomp_kv_t *c, const float *src, size_t n, void *host, void *dev,
                            kvc_status_t *st) {
  const void *p = src;
  if (host) {
    to_dtype(c->cfg.dtype, host, src, n);
    p = host;
  }
#if KVC_HAVE_CUDA
  if (dev) {
    if (cudaMemcpy(dev, p, n * c->elt, cudaMemcpyHostToDevice) != cudaSuccess) *st = KVC_ERR_CUDA;
    p = dev;
  }
#else
  (void)dev;
  (void)st;
#endif
  return p;
}

static kvc_status_t k_store(kvc_runner_kv_t *kv, int layer, const float *k, const float *v) {
  kvcomp_kv_t *c = (kvcomp_kv_t *)kv;
  kvc_status_t st = KVC_OK;
  size_t n = (size_t)c->step_tokens * c->kv_row;
  const void *pk = stage_in(c, k, n, c->hk, c->dk, &st);
  const void *pv = stage_in(c, v, n, c->hv, c->dv, &st);
  if (st != KVC_OK) return st;
  return kvc_store(kv->cache, layer, pk, pv, NULL);
}

static kvc_status_t k_attend(kvc_runner_kv_t *kv, int layer, const float *q, float *out,
                             float scale) {
  kvcomp_kv_t *c = (kvcomp_kv_t *)kv;
  kvc_status_t st = KVC_OK;
  size_t n = (size_t)c->step_tokens * c->q_row;
  const void *pq = stage_in(c, q, n, c->hq, c->dq, &st);
  if (st != KVC_OK) return st;
  void *pout = c->dout ? c->dout : c->hout ? c->hout : (void *)out;
  if ((st = kvc_attend(kv->cache, layer, pq, pout, scale, NULL)) != KVC_OK) return st;
#if KVC_HAVE_CUDA
  if (c->dout) {
    /* Ordered after the attention on the legacy default stream the cache was given. */
    void *dst = c->hout ? c->hout : (void *)out;
    if (cudaMemcpy(dst, c->dout, n * c->elt, cudaMemcpyDeviceToHost) != cudaSuccess)
      return KVC_ERR_CUDA;
  }
#endif
  if (c->hout) from_dtype(c->cfg.dtype, out, c->hout, n);
  return KVC_OK;
}

static kvc_status_t k_stats(kvc_runner_kv_t *kv, kvc_stats_t *out) {
  kvc_status_t st = kvc_cache_synchronize(kv->cache);
  if (st != KVC_OK) return st;
  return kvc_get_stats(kv->cache, out);
}

static void k_destroy(kvc_runner_kv_t *kv) {
  kvcomp_kv_t *c = (kvcomp_kv_t *)kv;
  kvc_cache_destroy(kv->cache);
  free(c->hk);
  free(c->hv);
  free(c->hq);
  free(c->hout);
#if KVC_HAVE_CUDA
  cudaFree(c->dk);
  cudaFree(c->dv);
  cudaFree(c->dq);
  cudaFree(c->dout);
#endif
  free(c);
}

static const kvc_runner_kv_ops_t kvcomp_ops = {k_seq_add, k_seq_reserve, k_seq_free, k_swap_out,
                                               k_swap_in, k_plan,        k_store,    k_attend,
                                               k_stats,   k_destroy};

kvc_status_t kvc_runner_kv_kvcomp(const kvc_runner_shape_t *shape, const kvc_config_t *config,
                                  kvc_runner_kv_t **out, kvc_runner_err_t *err) {
  kvcomp_kv_t *c = calloc(1, sizeof *c);
  if (!c) return kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "kvcomp KV: out of memory");
  c->cfg = *config;
  c->cfg.struct_size = sizeof c->cfg;
  c->cfg.num_layers = shape->n_layers;
  c->cfg.num_q_heads = shape->n_heads;
  c->cfg.num_kv_heads = shape->n_kv_heads;
  c->cfg.head_dim = shape->head_dim;
  if (c->cfg.max_seq_len > shape->max_seq_len) c->cfg.max_seq_len = shape->max_seq_len;
  c->q_row = (size_t)shape->n_heads * shape->head_dim;
  c->kv_row = (size_t)shape->n_kv_heads * shape->head_dim;
  c->elt = c->cfg.dtype == KVC_DTYPE_F32 ? 4 : 2;
  kvc_status_t st = kvc_cache_create(&c->cfg, &c->base.cache);
  if (st != KVC_OK) {
    free(c);
    return kvc_runner_fail(err, st, "kvc_cache_create (%s backend, head_dim %d, dtype %d, pool %zu "
                           "bytes): %s", config->backend == KVC_BACKEND_CUDA ? "CUDA" : "CPU",
                           shape->head_dim, (int)config->dtype, config->pool_bytes,
                           kvc_status_string(st));
  }
  kvc_cache_config(c->base.cache, &c->cfg); /* defaults filled in: max_batch_tokens, block size */
  size_t T = (size_t)c->cfg.max_batch_tokens;
  int convert = c->cfg.dtype != KVC_DTYPE_F32;
  int ok = 1;
  if (convert) {
    c->hk = malloc(T * c->kv_row * c->elt);
    c->hv = malloc(T * c->kv_row * c->elt);
    c->hq = malloc(T * c->q_row * c->elt);
    c->hout = malloc(T * c->q_row * c->elt);
    ok = c->hk && c->hv && c->hq && c->hout;
  }
  if (!ok) {
    k_destroy(&c->base);
    return kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "kvcomp KV: out of memory");
  }
  if (c->cfg.backend == KVC_BACKEND_CUDA) {
#if KVC_HAVE_CUDA
    if (cudaMalloc(&c->dk, T * c->kv_row * c->elt) != cudaSuccess ||
        cudaMalloc(&c->dv, T * c->kv_row * c->elt) != cudaSuccess ||
        cudaMalloc(&c->dq, T * c->q_row * c->elt) != cudaSuccess ||
        cudaMalloc(&c->dout, T * c->q_row * c->elt) != cudaSuccess) {
      k_destroy(&c->base);
      return kvc_runner_fail(err, KVC_ERR_CUDA, "kvcomp KV: cudaMalloc of staging buffers failed");
    }
#else
    k_destroy(&c->base);
    return kvc_runner_fail(err, KVC_ERR_UNSUPPORTED, "kvcomp KV: CUDA backend not built");
#endif
  }
  c->base.ops = &kvcomp_ops;
  c->base.name = c->cfg.backend == KVC_BACKEND_CUDA ? "kvcomp-cuda" : "kvcomp-cpu";
  c->base.block_tokens = c->cfg.block_tokens;
  *out = &c->base;
  return KVC_OK;
}
