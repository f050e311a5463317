/*
 * A small continuous-batching scheduler written only against the public header (kvcomp.h), on the
 * CPU backend: hundreds of requests go through admission (kvc_seq_add with their prompt, then
 * kvc_seq_reserve step by step), prefix hits on shared system prompts, chunked prefill, decode,
 * parallel sampling (kvc_seq_fork), preemption by swap (kvc_seq_swap_out / _in) and by drop
 * (kvc_seq_free, later re-added with every token so far), and completion. kvc_cache_validate runs
 * after every step.
 *
 * A toy model makes K/V checkable: the key and value of position p in layer l are pseudo-random
 * normals seeded by a chained hash of the token ids 0..p (so two sequences with the same prefix
 * have the same K/V there, as in a real model, and a prefix hit must return exactly the blocks
 * this test would have computed). The test keeps its own copy of every running sequence's
 * original K/V and checks every attention output row against a dense float64 reference
 * (kvc_test_toy.h), within the tolerance the codec's absolute bounds imply (kvc_test_toy.c).
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvc_test_toy.h"
#include "kvc_test_util.h"
#include "kvcomp.h"

enum {
  LAYERS = 2,
  KV_HEADS = 2,
  Q_HEADS = 4,
  HEAD_DIM = 32,
  BT = 16,
  MAX_LEN = 256,      /* max_seq_len */
  MAX_BATCH = 256,    /* max_batch_tokens */
  MAX_RUNNING = 12,   /* the scheduler's own limit on running sequences (forks go beyond) */
  MAX_SEQS = 64,      /* max_seqs */
  PREFILL_CHUNK = 48, /* prompt tokens per sequence per step (chunked prefill) */
  NUM_PROMPTS = 4,
  PROMPT_TOKENS = 40,
  VOCAB = 5000,
};
static const float EPS_K = 2e-3f, EPS_V = 2e-3f;

enum { WAITING, RUNNING, SWAPPED, DONE };

typedef struct req {
  kvc_seq_id_t id;
  int32_t tok[MAX_LEN]; /* every token id known so far: prompt, then sampled */
  uint64_t ph[MAX_LEN]; /* chained hash of tok[0..p] */
  int ntok;             /* tokens known */
  int prompt_len;
  int final_len;     /* prompt_len + output tokens */
  int len;           /* tokens the cache holds for it */
  int fork_children; /* parallel samples still to fork once the prompt is in */
  int state;
  int64_t admitted; /* admission order, for choosing victims */
  float *kv;        /* [LAYERS][2][MAX_LEN][KV_HEADS][HEAD_DIM] originals, while admitted */
} req_t;

typedef struct loop {
  kvc_cache_t *c;
  kvc_test_rng_t rng;
  req_t **reqs;
  int nreq, cap;
  int64_t admissions, drops, swap_outs, swap_ins, forks, prefix_hit_tokens, rows_checked;
  double worst_ratio; /* max observed error / tolerance */
} loop_t;

static size_t kv_at(int layer, int tensor, int pos, int head, int d) {
  return ((((size_t)layer * 2 + (size_t)tensor) * MAX_LEN + (size_t)pos) * KV_HEADS +
          (size_t)head) *
             HEAD_DIM +
         (size_t)d;
}

static float f16(float x) { return kvc_test_f16_to_f32(kvc_test_f32_to_f16(x)); }

static const kvc_test_toy_t TOY = {KV_HEADS, Q_HEADS, HEAD_DIM, EPS_K, EPS_V, 0x1p-11, 0x1p-25, 0};

/* The toy model's K/V of position p, every layer. */
static void model_kv(req_t *r, int p) {
  r->ph[p] = kvc_test_toy_hash(p ? r->ph[p - 1] : KVC_TEST_TOY_SEED, r->tok[p]);
  for (int l = 0; l < LAYERS; l++)
    kvc_test_toy_kv(&TOY, r->ph[p], l, r->kv + kv_at(l, 0, p, 0, 0), r->kv + kv_at(l, 1, p, 0, 0));
}

static req_t *new_req(loop_t *L, int prompt_len, int final_len) {
  req_t *r = calloc(1, sizeof(*r));
  assert_non_null(r);
  if (L->nreq == L->cap) {
    L->cap = L->cap ? 2 * L->cap : 64;
    L->reqs = realloc(L->reqs, (size_t)L->cap * sizeof(*L->reqs));
    assert_non_null(L->reqs);
  }
  r->id = 1000 + (kvc_seq_id_t)L->nreq;
  r->prompt_len = prompt_len;
  r->final_len = final_len;
  r->state = WAITING;
  L->reqs[L->nreq++] = r;
  return r;
}

static void give_kv(req_t *r) {
  if (!r->kv) r->kv = malloc((size_t)LAYERS * 2 * MAX_LEN * KV_HEADS * HEAD_DIM * sizeof(float));
  assert_non_null(r->kv);
}

static void drop_kv(req_t *r) {
  free(r->kv);
  r->kv = NULL;
}

/* Preemption by drop: the cache forgets it; it waits to be added again with all its tokens. */
static void drop(loop_t *L, req_t *r) {
  assert_int_equal(kvc_seq_free(L->c, r->id), KVC_OK);
  r->state = WAITING;
  r->len = 0;
  drop_kv(r);
  L->drops++;
}

/* Preempts the youngest running request other than `keep` (or `keep` itself when it is the only
 * one): every other victim is swapped out when swap space allows, else dropped. */
static int preempt(loop_t *L, req_t *keep, const uint8_t *in_batch) {
  req_t *victim = NULL;
  for (int i = 0; i < L->nreq; i++) {
    req_t *r = L->reqs[i];
    if (r->state != RUNNING || r == keep || in_batch[i]) continue;
    if (!victim || r->admitted > victim->admitted) victim = r;
  }
  if (!victim) return 0;
  if (victim->admitted % 2 == 0) {
    kvc_status_t st = kvc_seq_swap_out(L->c, victim->id, NULL);
    if (st == KVC_OK) {
      victim->state = SWAPPED;
      L->swap_outs++;
      return 1;
    }
    assert_int_equal(st, KVC_ERR_OUT_OF_MEMORY);
  }
  drop(L, victim);
  return 1;
}

/* Adds a waiting request with every token it knows; 0 when the cache cannot take it now. */
static int admit(loop_t *L, req_t *r) {
  int cached = -1;
  kvc_status_t st = kvc_seq_add(L->c, r->id, r->tok, r->ntok, 0, &cached);
  if (st == KVC_ERR_OUT_OF_MEMORY) return 0;
  assert_int_equal(st, KVC_OK);
  assert_true(cached >= 0 && cached % BT == 0 && cached < r->ntok);
  st = kvc_seq_reserve(L->c, r->id,
                       r->ntok - cached < PREFILL_CHUNK ? r->ntok - cached : PREFILL_CHUNK, 0);
  if (st == KVC_ERR_OUT_OF_MEMORY) {
    assert_int_equal(kvc_seq_free(L->c, r->id), KVC_OK);
    return 0;
  }
  assert_int_equal(st, KVC_OK);
  give_kv(r);
  for (int p = 0; p < cached; p++) model_kv(r, p);
  r->len = cached;
  r->state = RUNNING;
  r->admitted = L->admissions++;
  L->prefix_hit_tokens += cached;
  return 1;
}

/* Checks one attention output row (f16) against the dense reference over the originals. */
static void check_row(loop_t *L, const req_t *r, int layer, int pos, const float *q,
                      const uint16_t *out, float scale) {
  float got[Q_HEADS * HEAD_DIM];
  char msg[256];
  for (int e = 0; e < Q_HEADS * HEAD_DIM; e++) got[e] = kvc_test_f16_to_f32(out[e]);
  const double ratio =
      kvc_test_toy_check(&TOY, r->kv + kv_at(layer, 0, 0, 0, 0), r->kv + kv_at(layer, 1, 0, 0, 0),
                         KV_HEADS * HEAD_DIM, pos + 1, q, got, scale, msg, sizeof(msg));
  if (ratio > 1)
    fail_msg("seq %llu layer %d pos %d %s", (unsigned long long)r->id, layer, pos, msg);
  if (ratio > L->worst_ratio) L->worst_ratio = ratio;
  L->rows_checked++;
}

/* One scheduler step. Returns 0 once every request is done. */
static int step(loop_t *L) {
  kvc_cache_t *c = L->c;
  int running = 0, live = 0;
  for (int i = 0; i < L->nreq; i++) {
    running += L->reqs[i]->state == RUNNING;
    live += L->reqs[i]->state != DONE;
  }
  if (live == 0) return 0;
  /* Resume swapped requests first (oldest first), then admit waiting ones. */
  for (int i = 0; i < L->nreq && running < MAX_RUNNING; i++) {
    req_t *r = L->reqs[i];
    if (r->state != SWAPPED) continue;
    kvc_status_t st = kvc_seq_swap_in(c, r->id, NULL);
    if (st == KVC_ERR_OUT_OF_MEMORY) break;
    assert_int_equal(st, KVC_OK);
    r->state = RUNNING;
    L->swap_ins++;
    running++;
  }
  for (int i = 0; i < L->nreq && running < MAX_RUNNING; i++) {
    req_t *r = L->reqs[i];
    if (r->state != WAITING) continue;
    if (!admit(L, r)) break;
    running++;
  }

  /* The batch, oldest admission first; a request that cannot grow preempts the youngest. */
  /* Forked children run beyond MAX_RUNNING; the cache's max_seqs bounds the batch. */
  static kvc_seq_id_t ids[MAX_SEQS];
  static int32_t n_new[MAX_SEQS], tok[MAX_BATCH];
  static req_t *members[MAX_SEQS];
  uint8_t *in_batch = calloc((size_t)L->nreq, 1);
  assert_non_null(in_batch);
  int n = 0, rows = 0;
  for (;;) {
    int best = -1;
    for (int i = 0; i < L->nreq; i++) {
      req_t *r = L->reqs[i];
      if (r->state == RUNNING && !in_batch[i] &&
          (best < 0 || r->admitted < L->reqs[best]->admitted))
        best = i;
    }
    if (best < 0) break;
    req_t *r = L->reqs[best];
    in_batch[best] = 1;
    if (r->len == r->ntok) {
      /* Decode: the token sampled last step is this step's input. */
      r->tok[r->ntok++] = (int32_t)kvc_test_rng_below(&L->rng, VOCAB);
    }
    int want = r->ntok - r->len;
    if (want > PREFILL_CHUNK) want = PREFILL_CHUNK;
    if (want > MAX_BATCH - rows) want = MAX_BATCH - rows;
    if (want == 0) continue;
    kvc_status_t st;
    while ((st = kvc_seq_reserve(c, r->id, want, 0)) == KVC_ERR_OUT_OF_MEMORY)
      if (!preempt(L, r, in_batch)) break;
    if (st == KVC_ERR_OUT_OF_MEMORY) {
      /* Nothing left to preempt but requests already in this batch: it waits a step. */
      if (n > 0) continue;
      fail_msg("a request alone in the pool cannot grow by %d tokens", want);
    }
    assert_int_equal(st, KVC_OK);
    members[n] = r;
    ids[n] = r->id;
    n_new[n] = want;
    memcpy(tok + rows, r->tok + r->len, (size_t)want * sizeof(int32_t));
    rows += want;
    n++;
  }
  free(in_batch);
  if (n == 0) return 1;

  kvc_batch_t batch = {n, ids, n_new, tok};
  assert_int_equal(kvc_plan(c, &batch, NULL), KVC_OK);
  for (int i = 0; i < n; i++)
    for (int p = members[i]->len; p < members[i]->len + n_new[i]; p++) model_kv(members[i], p);
  static uint16_t k[MAX_BATCH * KV_HEADS * HEAD_DIM], v[MAX_BATCH * KV_HEADS * HEAD_DIM];
  static uint16_t q[MAX_BATCH * Q_HEADS * HEAD_DIM], out[MAX_BATCH * Q_HEADS * HEAD_DIM];
  static float qf[MAX_BATCH * Q_HEADS * HEAD_DIM];
  const float scale = 1.0f / sqrtf((float)HEAD_DIM);
  for (int l = 0; l < LAYERS; l++) {
    int row = 0;
    for (int i = 0; i < n; i++) {
      for (int p = members[i]->len; p < members[i]->len + n_new[i]; p++, row++) {
        for (int h = 0; h < KV_HEADS; h++)
          for (int d = 0; d < HEAD_DIM; d++) {
            size_t e = ((size_t)row * KV_HEADS + (size_t)h) * HEAD_DIM + (size_t)d;
            k[e] = kvc_test_f32_to_f16(members[i]->kv[kv_at(l, 0, p, h, d)]);
            v[e] = kvc_test_f32_to_f16(members[i]->kv[kv_at(l, 1, p, h, d)]);
          }
        for (int e = 0; e < Q_HEADS * HEAD_DIM; e++) {
          float x = f16((float)kvc_test_rng_normal(&L->rng));
          qf[(size_t)row * Q_HEADS * HEAD_DIM + (size_t)e] = x;
          q[(size_t)row * Q_HEADS * HEAD_DIM + (size_t)e] = kvc_test_f32_to_f16(x);
        }
      }
    }
    assert_int_equal(kvc_store(c, l, k, v, NULL), KVC_OK);
    assert_int_equal(kvc_attend(c, l, q, out, scale, NULL), KVC_OK);
    row = 0;
    for (int i = 0; i < n; i++)
      for (int p = members[i]->len; p < members[i]->len + n_new[i]; p++, row++)
        check_row(L, members[i], l, p, qf + (size_t)row * Q_HEADS * HEAD_DIM,
                  out + (size_t)row * Q_HEADS * HEAD_DIM, scale);
  }

  /* After the step: lengths, parallel samples, completions. */
  for (int i = 0; i < n; i++) {
    req_t *r = members[i];
    r->len += n_new[i];
    kvc_seq_info_t info;
    assert_int_equal(kvc_seq_info(c, r->id, &info), KVC_OK);
    assert_int_equal(info.length, r->len);
    assert_int_equal(info.state, KVC_SEQ_RUNNING);
    while (r->fork_children > 0 && r->len >= r->prompt_len) {
      r->fork_children--;
      req_t *child =
          new_req(L, r->prompt_len, r->prompt_len + 1 + (int)kvc_test_rng_below(&L->rng, 30));
      kvc_status_t st = kvc_seq_fork(c, r->id, child->id);
      if (st == KVC_ERR_OUT_OF_MEMORY) {
        child->state = DONE; /* the sample is abandoned */
        continue;
      }
      assert_int_equal(st, KVC_OK);
      memcpy(child->tok, r->tok, (size_t)r->ntok * sizeof(int32_t));
      memcpy(child->ph, r->ph, (size_t)r->ntok * sizeof(uint64_t));
      child->ntok = r->ntok;
      child->len = r->len;
      give_kv(child);
      memcpy(child->kv, r->kv, (size_t)LAYERS * 2 * MAX_LEN * KV_HEADS * HEAD_DIM * sizeof(float));
      child->state = RUNNING;
      child->admitted = L->admissions++;
      L->forks++;
    }
    if (r->len >= r->final_len) {
      assert_int_equal(kvc_seq_free(c, r->id), KVC_OK);
      r->state = DONE;
      drop_kv(r);
    }
  }
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  return 1;
}

static void serving_loop(void **state) {
  (void)state;
  kvc_config_t cfg = KVC_CONFIG_INIT;
  cfg.num_layers = LAYERS;
  cfg.num_q_heads = Q_HEADS;
  cfg.num_kv_heads = KV_HEADS;
  cfg.head_dim = HEAD_DIM;
  cfg.block_tokens = BT;
  cfg.pool_bytes = 128 << 10;
  cfg.swap_bytes = 256 << 10;
  cfg.max_seqs = MAX_SEQS;
  cfg.max_seq_len = MAX_LEN;
  cfg.max_batch_tokens = MAX_BATCH;
  cfg.bound_mode = KVC_BOUND_ABSOLUTE;
  cfg.k_bound = EPS_K;
  cfg.v_bound = EPS_V;
  cfg.policy = KVC_POLICY_SMALLEST;
  loop_t L;
  memset(&L, 0, sizeof(L));
  assert_int_equal(kvc_cache_create(&cfg, &L.c), KVC_OK);
  kvc_test_rng_seed(&L.rng, 20240611);

  int32_t prompts[NUM_PROMPTS][PROMPT_TOKENS];
  for (int i = 0; i < NUM_PROMPTS; i++)
    for (int t = 0; t < PROMPT_TOKENS; t++)
      prompts[i][t] = (int32_t)kvc_test_rng_below(&L.rng, VOCAB);
  const int nreq = (int)(200 * kvc_test_scale());
  for (int i = 0; i < nreq; i++) {
    int sys = (int)kvc_test_rng_below(&L.rng, NUM_PROMPTS + 1); /* NUM_PROMPTS: none */
    int user = 1 + (int)kvc_test_rng_below(&L.rng, 64);
    int prompt = (sys < NUM_PROMPTS ? PROMPT_TOKENS : 0) + user;
    req_t *r = new_req(&L, prompt, prompt + 1 + (int)kvc_test_rng_below(&L.rng, 24));
    if (sys < NUM_PROMPTS) memcpy(r->tok, prompts[sys], sizeof(prompts[sys]));
    for (int t = sys < NUM_PROMPTS ? PROMPT_TOKENS : 0; t < prompt; t++)
      r->tok[t] = (int32_t)kvc_test_rng_below(&L.rng, VOCAB);
    r->ntok = prompt;
    r->fork_children =
        kvc_test_rng_below(&L.rng, 8) == 0 ? 1 + (int)kvc_test_rng_below(&L.rng, 2) : 0;
  }
  int steps = 0;
  while (step(&L)) assert_true(++steps < 100000);

  kvc_stats_t st = {.struct_size = sizeof(st)};
  assert_int_equal(kvc_get_stats(L.c, &st), KVC_OK);
  print_message("%d steps, %lld rows checked (worst error %.2f of tolerance), %lld admissions, "
                "%lld prefix-hit tokens, %lld forks, %lld swap-outs, %lld swap-ins, %lld drops, "
                "%lld evictions, compression %.2fx\n",
                steps, (long long)L.rows_checked, L.worst_ratio, (long long)L.admissions,
                (long long)L.prefix_hit_tokens, (long long)L.forks, (long long)L.swap_outs,
                (long long)L.swap_ins, (long long)L.drops, (long long)st.evictions,
                st.compression_ratio);
  /* The loop went through every path it claims to test. */
  assert_true(L.prefix_hit_tokens > 0 && st.prefix_hits > 0);
  assert_true(L.forks > 0 && L.swap_outs > 0 && L.swap_ins > 0 && L.drops > 0);
  assert_true(L.swap_outs == st.swap_outs && L.swap_ins == st.swap_ins);
  assert_int_equal(st.live_seqs, 0);
  assert_int_equal(st.tokens_stored, 0);
  for (int i = 0; i < L.nreq; i++) {
    assert_int_equal(L.reqs[i]->state, DONE);
    free(L.reqs[i]);
  }
  free(L.reqs);
  kvc_cache_destroy(L.c);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(serving_loop)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
