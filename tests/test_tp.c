/*
 * Tensor parallelism on the CPU backend: three ranks (threads), each with its own cache over its
 * share of the kv heads and K/V of its own statistics (so each rank's pages compress to sizes of
 * their own), run the same serving schedule through an all-reduce over threads. Every call must
 * return the same status on every rank, the events (block ids stored, evicted, removed) and the
 * block tables must be the same, every cache must validate, and the agreement must actually have
 * overruled ranks' own decisions (else the test would show nothing). A second run shows that the
 * same schedule without the agreement does make the ranks' caches differ.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvc_test_tp.h"
#include "kvc_test_util.h"
#include "kvcomp.h"

enum { RANKS = 3, HEAD_DIM = 32 };

static kvc_status_t cpu_store_attend(void *user, kvc_cache_t *c, int layer, const uint16_t *k,
                                     const uint16_t *v, const uint16_t *q, int rows, int attend) {
  uint16_t *out = (uint16_t *)user;
  kvc_status_t st = kvc_store(c, layer, k, v, NULL);
  if (st == KVC_OK && attend) st = kvc_attend(c, layer, q, out, 0.17f, NULL);
  (void)rows;
  return st;
}

typedef struct rank_job {
  int rank, iters, agree, inject_op;
  uint64_t seed;
  kvc_test_tp_member_t *member;
  kvc_test_tp_log_t *log;
  kvc_status_t create, run;
} rank_job_t;

static void *rank_main(void *arg) {
  rank_job_t *j = (rank_job_t *)arg;
  kvc_config_t cfg;
  kvc_test_tp_config(&cfg, KVC_BACKEND_CPU, HEAD_DIM);
  if (j->agree) {
    cfg.tp_allreduce_max = kvc_test_tp_allreduce_max;
    cfg.tp_user = j->member;
  }
  kvc_cache_t *c = NULL;
  j->create = kvc_cache_create(&cfg, &c);
  if (j->create != KVC_OK) return NULL;
  uint16_t *out =
      (uint16_t *)malloc((size_t)KVC_TEST_TP_MAX_ROWS * KVC_TEST_TP_Q_HEADS * HEAD_DIM * 2);
  kvc_test_tp_io_t io = {out, cpu_store_attend, NULL, j->inject_op};
  j->run = kvc_test_tp_run(c, j->rank, j->seed, j->iters, &io, j->log);
  kvc_cache_destroy(c);
  free(out);
  return NULL;
}

/* Runs RANKS ranks; inject_op: the op at which rank 1's host allocations fail (0: none). */
static void run_ranks(int agree, uint64_t seed, int iters, int inject_op, kvc_test_tp_group_t *g,
                      kvc_test_tp_log_t **logs) {
  kvc_test_tp_member_t members[RANKS];
  kvc_test_tp_group_init(g, RANKS, members);
  rank_job_t jobs[RANKS];
  pthread_t th[RANKS];
  for (int r = 0; r < RANKS; r++) {
    jobs[r] = (rank_job_t){r, iters, agree, r == 1 ? inject_op : 0, seed, &members[r], logs[r],
                           KVC_OK, KVC_OK};
    assert_int_equal(pthread_create(&th[r], NULL, rank_main, &jobs[r]), 0);
  }
  for (int r = 0; r < RANKS; r++) pthread_join(th[r], NULL);
  for (int r = 0; r < RANKS; r++) {
    assert_int_equal(jobs[r].create, KVC_OK);
    if (jobs[r].run != KVC_OK) fail_msg("%s", logs[r]->why);
  }
}

static kvc_test_tp_log_t **alloc_logs(void) {
  kvc_test_tp_log_t **logs = (kvc_test_tp_log_t **)calloc(RANKS, sizeof(*logs));
  for (int r = 0; r < RANKS; r++) logs[r] = (kvc_test_tp_log_t *)calloc(1, sizeof(**logs));
  return logs;
}

static void free_logs(kvc_test_tp_log_t **logs) {
  for (int r = 0; r < RANKS; r++) free(logs[r]);
  free(logs);
}

static void ranks_agree_on_every_call(void **state) {
  (void)state;
  const int iters = (int)(450 * kvc_test_scale()) + 50;
  int64_t overruled = 0, evict_overruled = 0, oom = 0;
  for (uint64_t seed = 1; seed <= 3; seed++) {
    kvc_test_tp_group_t g;
    kvc_test_tp_log_t **logs = alloc_logs();
    run_ranks(1, seed, iters, 0, &g, logs);
    char why[200];
    for (int r = 1; r < RANKS; r++)
      if (kvc_test_tp_compare(logs[0], logs[r], why, sizeof(why)))
        fail_msg("seed %llu, rank 0 against rank %d: %s", (unsigned long long)seed, r, why);
    assert_int_equal(g.count_mismatches, 0);
    assert_false(g.broken);
    assert_true(logs[0]->tokens > 1000);
    const kvc_test_tp_log_t *l = logs[0];
    print_message("seed %llu: %d calls, %lld exchanges, %lld statuses and %lld eviction counts "
                  "overruled, %lld out of memory, %lld tokens stored, %lld prefix-hit tokens, "
                  "%lld forks, %lld swap-outs, %lld swap-ins\n",
                  (unsigned long long)seed, l->ops, (long long)g.generation,
                  (long long)g.overruled_status, (long long)g.overruled_evictions,
                  (long long)l->oom, (long long)l->tokens, (long long)l->prefix_hits,
                  (long long)l->forks, (long long)l->swap_outs, (long long)l->swap_ins);
    assert_true(l->prefix_hits > 0 && l->forks > 0 && l->swap_outs > 0 && l->swap_ins > 0);
    overruled += g.overruled_status;
    evict_overruled += g.overruled_evictions;
    oom += logs[0]->oom;
    kvc_test_tp_group_destroy(&g);
    free_logs(logs);
  }
  /* The schedule must have made the ranks disagree, about admission and about evictions. */
  assert_true(overruled > 0);
  assert_true(evict_overruled > 0);
  assert_true(oom > 0);
}

/* Without the agreement the same schedule makes the ranks' caches differ: the test above would
 * fail if the hooks did not agree. */
static void ranks_differ_without_agreement(void **state) {
  (void)state;
  const int iters = (int)(450 * kvc_test_scale()) + 50;
  int differ = 0;
  for (uint64_t seed = 1; seed <= 3 && !differ; seed++) {
    kvc_test_tp_group_t g;
    kvc_test_tp_log_t **logs = alloc_logs();
    run_ranks(0, seed, iters, 0, &g, logs);
    char why[200];
    for (int r = 1; r < RANKS; r++) differ |= kvc_test_tp_compare(logs[0], logs[r], why, 200);
    kvc_test_tp_group_destroy(&g);
    free_logs(logs);
  }
  assert_true(differ);
}

/* A host allocation that fails on one rank only fails the call on every rank. */
static void host_failure_on_one_rank(void **state) {
  (void)state;
  int injected = 0;
  for (int op = 3; op <= 40 && injected < 3; op++) {
    kvc_test_tp_group_t g;
    kvc_test_tp_log_t **logs = alloc_logs();
    run_ranks(1, 7, 60, op, &g, logs);
    char why[200];
    for (int r = 1; r < RANKS; r++)
      if (kvc_test_tp_compare(logs[0], logs[r], why, sizeof(why)))
        fail_msg("injection at op %d, rank 0 against rank %d: %s", op, r, why);
    for (int i = 0; i < logs[0]->ops; i++)
      injected += logs[0]->status[i] == KVC_ERR_OUT_OF_HOST_MEMORY;
    kvc_test_tp_group_destroy(&g);
    free_logs(logs);
  }
  assert_true(injected > 0);
}

typedef struct import_job {
  kvc_test_tp_member_t *member;
  const uint8_t *first, *second; /* the images this rank imports, in order (`bytes` each) */
  size_t bytes;
  kvc_status_t st[2], valid;
} import_job_t;

static void *import_main(void *arg) {
  import_job_t *j = (import_job_t *)arg;
  kvc_config_t cfg;
  kvc_test_tp_config(&cfg, KVC_BACKEND_CPU, HEAD_DIM);
  cfg.tp_allreduce_max = kvc_test_tp_allreduce_max;
  cfg.tp_user = j->member;
  kvc_cache_t *c = NULL;
  if (kvc_cache_create(&cfg, &c) != KVC_OK) return NULL;
  j->st[0] = kvc_seq_import(c, 1, j->first, j->bytes, NULL);
  j->st[1] = kvc_seq_import(c, 1, j->second, j->bytes, NULL);
  j->valid = kvc_cache_validate(c);
  kvc_cache_destroy(c);
  return NULL;
}

/* The image of a sequence of n tokens (random K/V, seed), from a cache of the test's shape. */
static uint8_t *make_image(int n, uint64_t seed, size_t *bytes) {
  kvc_config_t cfg;
  kvc_test_tp_config(&cfg, KVC_BACKEND_CPU, HEAD_DIM);
  kvc_cache_t *src = NULL;
  assert_int_equal(kvc_cache_create(&cfg, &src), KVC_OK);
  assert_int_equal(kvc_seq_add(src, 1, NULL, 0, 0, NULL), KVC_OK);
  assert_int_equal(kvc_seq_reserve(src, 1, n, 0), KVC_OK);
  const size_t values = (size_t)n * KVC_TEST_TP_KV_HEADS * HEAD_DIM;
  uint16_t *k = malloc(values * 2), *v = malloc(values * 2);
  kvc_test_rng_t r;
  kvc_test_rng_seed(&r, seed);
  for (size_t i = 0; i < values; i++) {
    k[i] = kvc_test_f32_to_f16((float)kvc_test_rng_normal(&r));
    v[i] = kvc_test_f32_to_f16((float)kvc_test_rng_normal(&r));
  }
  kvc_seq_id_t id = 1;
  int32_t nn = n;
  kvc_batch_t b = {1, &id, &nn, NULL};
  assert_int_equal(kvc_plan(src, &b, NULL), KVC_OK);
  for (int l = 0; l < KVC_TEST_TP_LAYERS; l++)
    assert_int_equal(kvc_store(src, l, k, v, NULL), KVC_OK);
  assert_int_equal(kvc_seq_export_bytes(src, 1, bytes, NULL), KVC_OK);
  uint8_t *image = malloc(*bytes);
  assert_int_equal(kvc_seq_export(src, 1, image, *bytes, NULL), KVC_OK);
  free(k);
  free(v);
  kvc_cache_destroy(src);
  return image;
}

/* Two ranks import first[r], then second[r]; returns with jobs[r] filled. */
static void import_on_two_ranks(import_job_t jobs[2]) {
  kvc_test_tp_group_t g;
  kvc_test_tp_member_t members[2];
  kvc_test_tp_group_init(&g, 2, members);
  pthread_t th[2];
  for (int i = 0; i < 2; i++) {
    jobs[i].member = &members[i];
    assert_int_equal(pthread_create(&th[i], NULL, import_main, &jobs[i]), 0);
  }
  for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
  assert_false(g.broken);
  assert_int_equal(g.count_mismatches, 0);
  kvc_test_tp_group_destroy(&g);
}

/* An image that one rank cannot import (damaged on its way), or images of different sequences,
 * are refused on every rank, without a rank left waiting in the agreement; the next import, good
 * everywhere, succeeds everywhere. */
static void import_refused_on_one_rank_is_refused_on_all(void **state) {
  (void)state;
  size_t bytes = 0, other_bytes = 0;
  uint8_t *good = make_image(40, 3, &bytes), *other = make_image(57, 4, &other_bytes);
  uint8_t *bad = malloc(bytes);
  memcpy(bad, good, bytes);
  bad[0] ^= 1; /* the magic */
  import_job_t jobs[2] = {{NULL, good, good, bytes, {KVC_OK, KVC_OK}, KVC_OK},
                          {NULL, bad, good, bytes, {KVC_OK, KVC_OK}, KVC_OK}};
  import_on_two_ranks(jobs);
  for (int i = 0; i < 2; i++) {
    assert_int_equal(jobs[i].st[0], KVC_ERR_CORRUPT);
    assert_int_equal(jobs[i].st[1], KVC_OK);
    assert_int_equal(jobs[i].valid, KVC_OK);
  }
  import_job_t mixed[2] = {{NULL, good, good, bytes, {KVC_OK, KVC_OK}, KVC_OK},
                           {NULL, other, other, other_bytes, {KVC_OK, KVC_OK}, KVC_OK}};
  import_on_two_ranks(mixed);
  for (int i = 0; i < 2; i++) {
    assert_int_equal(mixed[i].st[0], KVC_ERR_INVALID_ARGUMENT);
    assert_int_equal(mixed[i].st[1], KVC_ERR_INVALID_ARGUMENT);
    assert_int_equal(mixed[i].valid, KVC_OK);
  }
  free(good);
  free(bad);
  free(other);
}

static int failing_allreduce(void *user, int64_t *values, int count) {
  int *calls_left = (int *)user;
  (void)values;
  (void)count;
  return (*calls_left)-- > 0 ? 0 : -1;
}

/* A failed exchange leaves the ranks possibly different: the cache says KVC_ERR_NCCL from then
 * on, and the agreed capacity query exchanges as the hooks do. */
static void failed_exchange_makes_the_cache_unusable(void **state) {
  (void)state;
  kvc_config_t cfg;
  kvc_test_tp_config(&cfg, KVC_BACKEND_CPU, HEAD_DIM);
  int calls_left = 2;
  cfg.tp_allreduce_max = failing_allreduce;
  cfg.tp_user = &calls_left;
  kvc_cache_t *c = NULL;
  assert_int_equal(kvc_cache_create(&cfg, &c), KVC_OK);
  int32_t tok[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  int cached = -1;
  int64_t fit = -1, local = -1;
  assert_int_equal(kvc_seq_add(c, 1, tok, 8, 0, &cached), KVC_OK);   /* exchange 1 */
  assert_int_equal(kvc_tokens_fit_agreed(c, &fit), KVC_OK);         /* exchange 2 */
  assert_int_equal(kvc_tokens_fit(c, &local), KVC_OK);
  assert_int_equal(fit, local); /* one rank: its own estimate */
  assert_int_equal(kvc_seq_reserve(c, 1, 8, 0), KVC_ERR_NCCL);      /* exchange 3 fails */
  assert_int_equal(calls_left, -1);
  assert_int_equal(kvc_seq_reserve(c, 1, 8, 0), KVC_ERR_NCCL);
  assert_int_equal(kvc_tokens_fit_agreed(c, &fit), KVC_ERR_NCCL);
  assert_int_equal(calls_left, -1); /* an unusable cache exchanges nothing more */
  kvc_cache_destroy(c);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(ranks_agree_on_every_call),
      cmocka_unit_test(ranks_differ_without_agreement),
      cmocka_unit_test(host_failure_on_one_rank),
      cmocka_unit_test(failed_exchange_makes_the_cache_unusable),
      cmocka_unit_test(import_refused_on_one_rank_is_refused_on_all),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
