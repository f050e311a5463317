/*
 * Where the runner keeps keys and values: a small interface with the shape of kvcomp's hooks
 * (kvcomp.h), so the same forward pass runs over
 *   - the kvcomp cache (kvc_runner_kv_kvcomp): kvc_seq_add / reserve / plan / store / attend; the
 *     product path, used by default everywhere;
 *   - a dense, exact in-runner cache (kvc_runner_kv_dense): fp32 storage, fp64 attention, no limit
 *     but an optional token budget; the development reference and the host of the emulated
 *     baselines (a block hook rewrites each full block of block_tokens tokens in place, exactly
 *     when the library would compress it).
 *
 * Tensors are host fp32 in the runner's layout: k, v [total_new_tokens][n_kv_heads][head_dim],
 * q, out [total_new_tokens][n_heads][head_dim], rows in the order of the planned batch.
 * Statuses are kvcomp's; KVC_ERR_OUT_OF_MEMORY from reserve means "not now" to the scheduler.
 */
#ifndef KVC_RUNNER_KV_H
#define KVC_RUNNER_KV_H

#include "kvcomp.h"
#include "runner_common.h"
#include "runner_model.h"

typedef struct kvc_runner_kv kvc_runner_kv_t;

typedef struct kvc_runner_kv_ops {
  kvc_status_t (*seq_add)(kvc_runner_kv_t *kv, kvc_seq_id_t id, const int32_t *tokens, int n,
                          int *n_cached);
  kvc_status_t (*seq_reserve)(kvc_runner_kv_t *kv, kvc_seq_id_t id, int n_new);
  kvc_status_t (*seq_free)(kvc_runner_kv_t *kv, kvc_seq_id_t id);
  kvc_status_t (*swap_out)(kvc_runner_kv_t *kv, kvc_seq_id_t id);
  kvc_status_t (*swap_in)(kvc_runner_kv_t *kv, kvc_seq_id_t id);
  kvc_status_t (*plan)(kvc_runner_kv_t *kv, const kvc_batch_t *batch);
  kvc_status_t (*store)(kvc_runner_kv_t *kv, int layer, const float *k, const float *v);
  kvc_status_t (*attend)(kvc_runner_kv_t *kv, int layer, const float *q, float *out, float scale);
  /* Fills what the backend knows (struct_size set by the caller); synchronizes. */
  kvc_status_t (*stats)(kvc_runner_kv_t *kv, kvc_stats_t *out);
  void (*destroy)(kvc_runner_kv_t *kv);
} kvc_runner_kv_ops_t;

struct kvc_runner_kv {
  const kvc_runner_kv_ops_t *ops;
  const char *name;      /* "kvcomp-cpu", "kvcomp-cuda", "dense" */
  int block_tokens;      /* block size (compression granularity) */
  kvc_cache_t *cache;    /* the kvcomp cache, NULL for the dense backend */
};

/*
 * Rewrites one full block of one layer in place (the dense backend calls it once per layer per
 * block, as kvcomp compresses: at the plan after the step that stored the block's last token, or
 * when a sequence is freed before that plan): k, v [n_tokens][n_kv_heads][head_dim].
 * Baselines count the bytes the block would occupy through `user`.
 */
typedef void (*kvc_runner_block_fn)(void *user, int layer, float *k, float *v, int n_tokens,
                                    int n_kv_heads, int head_dim);

typedef struct kvc_runner_dense_opts {
  int block_tokens;            /* default 64 */
  int max_seqs;                /* default 256 */
  int64_t capacity_tokens;     /* reserve refuses beyond this many tokens in total; 0: no limit */
  kvc_runner_block_fn on_full_block; /* NULL: exact */
  void *user;
} kvc_runner_dense_opts_t;

kvc_status_t kvc_runner_kv_dense(const kvc_runner_shape_t *shape, const kvc_runner_dense_opts_t *opts,
                                 kvc_runner_kv_t **out, kvc_runner_err_t *err);

/*
 * A kvcomp cache for this model. `config` supplies everything but the model shape (layers, heads,
 * head_dim are set from `shape`); dtype KVC_DTYPE_F32 passes the runner's fp32 tensors through,
 * KVC_DTYPE_F16/BF16 convert them. On KVC_BACKEND_CUDA (builds with CUDA only) tensors are copied
 * to and from the device around each call. Returns kvc_cache_create's statuses.
 */
kvc_status_t kvc_runner_kv_kvcomp(const kvc_runner_shape_t *shape, const kvc_config_t *config,
                                  kvc_runner_kv_t **out, kvc_runner_err_t *err);

static inline void kvc_runner_kv_destroy(kvc_runner_kv_t *kv) {
  if (kv) kv->ops->destroy(kv);
}

#endif /* KVC_RUNNER_KV_H */
