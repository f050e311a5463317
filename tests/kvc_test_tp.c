/* The tensor-parallel test harness (tests/kvc_test_tp.h). */
#include "kvc_test_tp.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "allocator/kvc_host_alloc.h"
#include "kvc_test_util.h"
#include "scheduler_hooks/kvc_cache_test.h"

/* ---- the all-reduce over threads ------------------------------------------------------------ */

/* A rank that waits this long for the others gives up (the ranks called it different numbers of
 * times: a test failure, not a hang). */
enum { EXCHANGE_TIMEOUT_S = 60 };

void kvc_test_tp_group_init(kvc_test_tp_group_t *g, int ranks, kvc_test_tp_member_t *members) {
  memset(g, 0, sizeof(*g));
  g->ranks = ranks;
  pthread_mutex_init(&g->mu, NULL);
  pthread_cond_init(&g->cv, NULL);
  for (int r = 0; r < ranks; r++) {
    members[r].group = g;
    members[r].rank = r;
  }
}

void kvc_test_tp_group_destroy(kvc_test_tp_group_t *g) {
  pthread_cond_destroy(&g->cv);
  pthread_mutex_destroy(&g->mu);
}

int kvc_test_tp_allreduce_max(void *user, int64_t *values, int count) {
  kvc_test_tp_member_t *m = (kvc_test_tp_member_t *)user;
  kvc_test_tp_group_t *g = m->group;
  if (count < 1 || count > 2) return -1;
  pthread_mutex_lock(&g->mu);
  if (g->broken) {
    pthread_mutex_unlock(&g->mu);
    return -1;
  }
  memcpy(g->values[m->rank], values, (size_t)count * sizeof(int64_t));
  g->count[m->rank] = count;
  const int64_t gen = g->generation;
  if (++g->arrived == g->ranks) {
    int64_t r[2] = {INT64_MIN, INT64_MIN};
    for (int k = 0; k < g->ranks; k++) {
      if (g->count[k] != count) g->count_mismatches++;
      for (int i = 0; i < count; i++)
        if (g->values[k][i] > r[i]) r[i] = g->values[k][i];
    }
    for (int k = 0; k < g->ranks; k++) {
      if (g->values[k][0] != r[0]) g->overruled_status++;
      if (count > 1 && g->values[k][1] != r[1]) g->overruled_evictions++;
    }
    memcpy(g->result, r, sizeof(r));
    g->arrived = 0;
    g->generation++;
    pthread_cond_broadcast(&g->cv);
  } else {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += EXCHANGE_TIMEOUT_S;
    while (gen == g->generation && !g->broken)
      if (pthread_cond_timedwait(&g->cv, &g->mu, &until) == ETIMEDOUT) g->broken = 1;
    if (gen == g->generation) {
      pthread_cond_broadcast(&g->cv);
      pthread_mutex_unlock(&g->mu);
      return -1;
    }
  }
  memcpy(values, g->result, (size_t)count * sizeof(int64_t));
  pthread_mutex_unlock(&g->mu);
  return 0;
}

/* ---- the schedule --------------------------------------------------------------------------- */

enum {
  MAX_LEN = 320,       /* a sequence finishes here */
  SEQ_CAP = 512,       /* max_seq_len */
  PREFILL_CHUNK = 24,  /* prompt tokens per sequence per step */
  MAX_BATCH = 12,      /* sequences per step: MAX_BATCH * PREFILL_CHUNK = KVC_TEST_TP_MAX_ROWS */
  SYS_PROMPTS = 3,
  SYS_TOKENS = 40,
  VOCAB = 3000,
};

void kvc_test_tp_config(kvc_config_t *cfg, kvc_backend_t backend, int head_dim) {
  kvc_config_t init = KVC_CONFIG_INIT;
  *cfg = init;
  cfg->backend = backend;
  cfg->num_layers = KVC_TEST_TP_LAYERS;
  cfg->num_kv_heads = KVC_TEST_TP_KV_HEADS;
  cfg->num_q_heads = KVC_TEST_TP_Q_HEADS;
  cfg->head_dim = head_dim;
  cfg->block_tokens = 16;
  /* About 80 blocks of raw pages: admission runs into the pool every few steps. */
  cfg->pool_bytes = (size_t)20480 * (size_t)head_dim;
  cfg->swap_bytes = (size_t)4096 * (size_t)head_dim;
  cfg->max_seqs = KVC_TEST_TP_MAX_SEQS;
  cfg->max_seq_len = SEQ_CAP;
  cfg->max_batch_tokens = MAX_BATCH * PREFILL_CHUNK;
  cfg->log_level = KVC_LOG_ERROR;
}

typedef struct tseq {
  kvc_seq_id_t id;
  int live, swapped;
  int len;      /* tokens the cache holds */
  int n_tok;    /* tokens known: the prompt, then decoded ones */
  int32_t tok[SEQ_CAP];
} tseq_t;

typedef struct run {
  kvc_cache_t *c;
  int rank;
  const kvc_test_tp_io_t *io;
  kvc_test_tp_log_t *log;
  kvc_test_rng_t rng; /* the schedule's: the same on every rank */
  tseq_t seq[KVC_TEST_TP_MAX_SEQS];
  kvc_seq_id_t next_id;
  int32_t sys[SYS_PROMPTS][SYS_TOKENS];
  int op;
  uint16_t *k, *v, *q; /* one step's rows */
} run_t;

static uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/* Element (kind, layer, head, d) of position pos of sequence id on `rank`: each rank's statistics
 * differ, so its pages do: rank 0 mostly constant channels (small pages), rank 1 uniform noise
 * (large), others heavy-tailed. */
static float element(int rank, kvc_seq_id_t id, int pos, int kind, int layer, int head, int d) {
  uint64_t h = mix64(id * 0x9e3779b97f4a7c15ull ^ mix64((uint64_t)pos << 20 ^
                                                        (uint64_t)((kind * 8 + layer) * 64 + head)
                                                            << 9 ^ (uint64_t)d));
  double u = (double)(h >> 11) * 0x1.0p-53;
  switch (rank) {
  case 0: return d % 8 == 0 ? (float)(2.0 * u - 1.0) : 0.25f;
  case 1: return (float)(2.0 * u - 1.0);
  default: {
    double x = 2.0 * u - 1.0;
    return (float)(x * x * x);
  }
  }
}

static int head_dim_of(const kvc_cache_t *c) {
  kvc_config_t cfg = KVC_CONFIG_INIT;
  return kvc_cache_config(c, &cfg) == KVC_OK ? cfg.head_dim : 0;
}

static int log_status(run_t *r, kvc_status_t st) {
  kvc_test_tp_log_t *lg = r->log;
  if (lg->ops < KVC_TEST_TP_MAX_OPS) {
    lg->status[lg->ops] = st;
    lg->fit[lg->ops] = -1;
    lg->ops++;
  }
  if (st == KVC_ERR_OUT_OF_MEMORY) lg->oom++;
  kvc_event_t ev[256];
  int n = 0;
  do {
    if (kvc_poll_events(r->c, ev, 256, &n, NULL) != KVC_OK) break;
    for (int i = 0; i < n && lg->events < KVC_TEST_TP_MAX_EVENTS; i++)
      lg->event[lg->events++] = ev[i];
  } while (n == 256);
  if (st == KVC_OK || st == KVC_ERR_OUT_OF_MEMORY || st == KVC_ERR_OUT_OF_HOST_MEMORY) return 0;
  if (lg->failure == KVC_OK) {
    lg->failure = st;
    snprintf(lg->why, sizeof(lg->why), "rank %d op %d: unexpected %s", r->rank, lg->ops - 1,
             kvc_status_string(st));
  }
  return 1;
}

static tseq_t *pick(run_t *r, int want_swapped) {
  int n = 0, idx[KVC_TEST_TP_MAX_SEQS];
  for (int i = 0; i < KVC_TEST_TP_MAX_SEQS; i++)
    if (r->seq[i].live && r->seq[i].swapped == want_swapped) idx[n++] = i;
  return n ? &r->seq[idx[kvc_test_rng_below(&r->rng, (uint32_t)n)]] : NULL;
}

static tseq_t *free_slot(run_t *r) {
  for (int i = 0; i < KVC_TEST_TP_MAX_SEQS; i++)
    if (!r->seq[i].live) return &r->seq[i];
  return NULL;
}

static int do_free(run_t *r, tseq_t *s) {
  if (log_status(r, kvc_seq_free(r->c, s->id))) return 1;
  s->live = 0;
  return 0;
}

static int op_admit(run_t *r) {
  tseq_t *s = free_slot(r);
  if (!s) return 0;
  int n = 8 + (int)kvc_test_rng_below(&r->rng, 90);
  memset(s, 0, sizeof(*s));
  int k = 0;
  if (kvc_test_rng_below(&r->rng, 10) < 6) {
    const int32_t *sys = r->sys[kvc_test_rng_below(&r->rng, SYS_PROMPTS)];
    for (; k < SYS_TOKENS && k < n; k++) s->tok[k] = sys[k];
  }
  for (; k < n; k++) s->tok[k] = (int32_t)kvc_test_rng_below(&r->rng, VOCAB);
  s->id = r->next_id++;
  s->n_tok = n;
  int cached = 0;
  kvc_host_alloc_t *ha = kvc__cache_host_alloc(r->c);
  const int inject = r->io->inject_host_failure_op && r->op == r->io->inject_host_failure_op;
  if (inject) kvc_host_alloc_fail_after(ha, 0);
  kvc_status_t st = kvc_seq_add(r->c, s->id, s->tok, n, 0, &cached);
  if (inject) kvc_host_alloc_fail_after(ha, -1);
  if (log_status(r, st)) return 1;
  if (st != KVC_OK) return 0;
  s->live = 1;
  s->len = cached;
  r->log->prefix_hits += cached;
  st = kvc_seq_reserve(r->c, s->id, n - cached, 0);
  if (log_status(r, st)) return 1;
  return st == KVC_OK ? 0 : do_free(r, s);
}

static int op_fork(run_t *r) {
  tseq_t *p = pick(r, 0), *s = free_slot(r);
  if (!p || !s || p->len < p->n_tok) return 0;
  const kvc_seq_id_t id = r->next_id++;
  kvc_status_t st = kvc_seq_fork(r->c, p->id, id);
  if (log_status(r, st)) return 1;
  if (st == KVC_OK) {
    *s = *p;
    s->id = id;
    r->log->forks++;
  }
  return 0;
}

static int op_swap(run_t *r, int in) {
  tseq_t *s = pick(r, in);
  if (!s) return 0;
  kvc_status_t st = in ? kvc_seq_swap_in(r->c, s->id, r->io->stream)
                       : kvc_seq_swap_out(r->c, s->id, r->io->stream);
  if (log_status(r, st)) return 1;
  if (st == KVC_OK) {
    s->swapped = !in;
    *(in ? &r->log->swap_ins : &r->log->swap_outs) += 1;
  }
  return 0;
}

static int op_fit(run_t *r) {
  int64_t fit = -1;
  if (log_status(r, kvc_tokens_fit_agreed(r->c, &fit))) return 1;
  r->log->fit[r->log->ops - 1] = fit;
  return 0;
}

static int op_step(run_t *r) {
  const int hd = head_dim_of(r->c);
  tseq_t *batch[MAX_BATCH];
  kvc_seq_id_t ids[MAX_BATCH];
  int32_t nnew[MAX_BATCH], tokens[MAX_BATCH * PREFILL_CHUNK];
  int nb = 0, rows = 0;
  for (int i = 0; i < KVC_TEST_TP_MAX_SEQS && nb < MAX_BATCH; i++) {
    tseq_t *s = &r->seq[i];
    if (!s->live || s->swapped) continue;
    if (s->len >= MAX_LEN) { /* finished */
      if (do_free(r, s)) return 1;
      continue;
    }
    int want = s->len < s->n_tok ? s->n_tok - s->len : 1;
    if (want > PREFILL_CHUNK) want = PREFILL_CHUNK;
    kvc_status_t st = kvc_seq_reserve(r->c, s->id, want, 0);
    if (log_status(r, st)) return 1;
    if (st != KVC_OK) continue;
    if (s->len == s->n_tok) s->tok[s->n_tok++] = (int32_t)kvc_test_rng_below(&r->rng, VOCAB);
    batch[nb] = s;
    ids[nb] = s->id;
    nnew[nb] = want;
    memcpy(tokens + rows, s->tok + s->len, (size_t)want * sizeof(int32_t));
    rows += want;
    nb++;
  }
  if (nb == 0) return 0;
  kvc_batch_t b = {nb, ids, nnew, tokens};
  if (log_status(r, kvc_plan(r->c, &b, r->io->stream))) return 1;
  const int kvh = KVC_TEST_TP_KV_HEADS, qh = KVC_TEST_TP_Q_HEADS;
  for (int layer = 0; layer < KVC_TEST_TP_LAYERS; layer++) {
    int row = 0;
    for (int j = 0; j < nb; j++)
      for (int t = 0; t < nnew[j]; t++, row++) {
        const int pos = batch[j]->len + t;
        for (int h = 0; h < kvh; h++)
          for (int d = 0; d < hd; d++) {
            const size_t o = ((size_t)row * kvh + h) * hd + d;
            r->k[o] = kvc_test_f32_to_f16(element(r->rank, ids[j], pos, 0, layer, h, d));
            r->v[o] = kvc_test_f32_to_f16(element(r->rank, ids[j], pos, 1, layer, h, d));
          }
        for (int h = 0; h < qh; h++)
          for (int d = 0; d < hd; d++)
            r->q[((size_t)row * qh + h) * hd + d] =
                kvc_test_f32_to_f16(element(r->rank, ids[j], pos, 2, layer, h, d));
      }
    kvc_status_t st = r->io->store_attend(r->io->user, r->c, layer, r->k, r->v, r->q, rows,
                                          layer == 0);
    if (log_status(r, st)) return 1;
  }
  for (int j = 0; j < nb; j++) batch[j]->len += nnew[j];
  r->log->tokens += rows;
  return 0;
}

static uint64_t digest_tables(run_t *r) {
  uint64_t h = 1469598103934665603ull;
  int32_t blocks[SEQ_CAP];
  for (int i = 0; i < KVC_TEST_TP_MAX_SEQS; i++) {
    const tseq_t *s = &r->seq[i];
    if (!s->live) continue;
    kvc_seq_info_t info;
    int n = 0;
    if (kvc_seq_info(r->c, s->id, &info) != KVC_OK ||
        kvc__cache_seq_blocks(r->c, s->id, blocks, SEQ_CAP, &n) != KVC_OK)
      return 0;
    h = mix64(h ^ s->id);
    h = mix64(h ^ (uint64_t)info.length << 32 ^ (uint64_t)info.reserved);
    h = mix64(h ^ (uint64_t)info.num_blocks << 32 ^ (uint64_t)info.shared_blocks << 8 ^
              (uint64_t)info.state);
    for (int j = 0; j < n; j++) h = mix64(h ^ (uint64_t)(uint32_t)blocks[j]);
  }
  return h;
}

_Static_assert(MAX_BATCH * PREFILL_CHUNK == KVC_TEST_TP_MAX_ROWS, "one step's rows");

kvc_status_t kvc_test_tp_run(kvc_cache_t *c, int rank, uint64_t seed, int iters,
                             const kvc_test_tp_io_t *io, kvc_test_tp_log_t *log) {
  run_t *r = (run_t *)calloc(1, sizeof(run_t));
  const int hd = head_dim_of(c);
  const size_t rows = KVC_TEST_TP_MAX_ROWS;
  if (!r || hd == 0) {
    free(r);
    return KVC_ERR_OUT_OF_HOST_MEMORY;
  }
  r->k = (uint16_t *)malloc(rows * KVC_TEST_TP_KV_HEADS * hd * 2);
  r->v = (uint16_t *)malloc(rows * KVC_TEST_TP_KV_HEADS * hd * 2);
  r->q = (uint16_t *)malloc(rows * KVC_TEST_TP_Q_HEADS * hd * 2);
  memset(log, 0, sizeof(*log));
  log->failure = KVC_OK;
  r->c = c;
  r->rank = rank;
  r->io = io;
  r->log = log;
  r->next_id = 1;
  kvc_test_rng_seed(&r->rng, seed);
  for (int p = 0; p < SYS_PROMPTS; p++)
    for (int t = 0; t < SYS_TOKENS; t++)
      r->sys[p][t] = (int32_t)kvc_test_rng_below(&r->rng, VOCAB);
  int failed = !r->k || !r->v || !r->q;
  for (r->op = 1; !failed && r->op <= iters; r->op++) {
    const uint32_t x = kvc_test_rng_below(&r->rng, 100);
    tseq_t *s;
    if (x < 22) failed = op_admit(r);
    else if (x < 28) failed = op_fork(r);
    else if (x < 33) failed = (s = pick(r, 0)) && do_free(r, s);
    else if (x < 38) failed = op_swap(r, 0);
    else if (x < 44) failed = op_swap(r, 1);
    else if (x < 48) failed = op_fit(r);
    else failed = op_step(r);
  }
  if (!failed) log->tables = digest_tables(r);
  if (!failed && log->tables == 0) {
    log->failure = KVC_ERR_INTERNAL;
    snprintf(log->why, sizeof(log->why), "rank %d: reading the block tables failed", rank);
  }
  if (!failed && kvc_cache_validate(c) != KVC_OK && log->failure == KVC_OK) {
    log->failure = KVC_ERR_INTERNAL;
    snprintf(log->why, sizeof(log->why), "rank %d: kvc_cache_validate failed", rank);
  }
  free(r->k);
  free(r->v);
  free(r->q);
  free(r);
  return log->failure;
}

int kvc_test_tp_compare(const kvc_test_tp_log_t *a, const kvc_test_tp_log_t *b, char *why,
                        int cap) {
  const int n = a->ops < b->ops ? a->ops : b->ops;
  for (int i = 0; i < n; i++) {
    if (a->status[i] != b->status[i]) {
      snprintf(why, (size_t)cap, "op %d: status %d against %d", i, a->status[i], b->status[i]);
      return 1;
    }
    if (a->fit[i] != b->fit[i]) {
      snprintf(why, (size_t)cap, "op %d: tokens_fit_agreed %lld against %lld", i,
               (long long)a->fit[i], (long long)b->fit[i]);
      return 1;
    }
  }
  if (a->ops != b->ops) {
    snprintf(why, (size_t)cap, "%d calls against %d", a->ops, b->ops);
    return 1;
  }
  const int ne = a->events < b->events ? a->events : b->events;
  for (int i = 0; i < ne; i++)
    if (a->event[i].kind != b->event[i].kind || a->event[i].block_id != b->event[i].block_id ||
        a->event[i].block_hash != b->event[i].block_hash) {
      snprintf(why, (size_t)cap, "event %d: kind %d block %d against kind %d block %d", i,
               a->event[i].kind, a->event[i].block_id, b->event[i].kind, b->event[i].block_id);
      return 1;
    }
  if (a->events != b->events) {
    snprintf(why, (size_t)cap, "%d events against %d", a->events, b->events);
    return 1;
  }
  if (a->tables != b->tables) {
    snprintf(why, (size_t)cap, "the block tables differ");
    return 1;
  }
  return 0;
}
