/* Host allocation failures in the block manager: for each operation, the k-th allocation fails
 * for k = 0, 1, 2, ... until the operation succeeds. Every failure must return
 * KVC_ERR_OUT_OF_HOST_MEMORY and leave the whole observable state (host bytes included) as it
 * was; every manager is destroyed with nothing left allocated (LSan checks libc builds too). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "kvc_test_util.h"
#include "test_blocks_util.h"

typedef struct ctx {
  kvc_host_alloc_t *ha;
  kvc_bm_t *bm;
  kvc_bm_work_t w;
  kvc_bm_plan_t plan;
  int32_t tok[64];
} ctx_t;

static const kvc_seq_id_t k_ids[] = {1, 2, 3, 4, 5, 6};
#define NIDS 6

static void ok(kvc_status_t st) { assert_int_equal(st, KVC_OK); }

static void step(ctx_t *c, kvc_seq_id_t id, int n) {
  int32_t nn = n;
  kvc_bm_batch_t b = {1, &id, &nn, NULL};
  ok(kvc_bm_plan(c->bm, &b, &c->plan));
  kvc_bm_step_done(c->bm);
}

static void measure(ctx_t *c) {
  for (int j = 0; j < c->plan.num_jobs; j++)
    for (int l = 0; l < 2; l++) kvc_bm_page_measured(c->bm, c->plan.job_block[j], l, 150, 1);
}

/* A running sequence with a partial tail, another one's blocks in the prefix cache, a
 * swapped-out sequence and a new one waiting for admission. */
static void scenario(ctx_t *c) {
  int cached;
  for (int i = 0; i < 64; i++) c->tok[i] = 500 + i;
  ok(kvc_bm_seq_add(c->bm, 1, c->tok, 13, 0, &cached, &c->w));
  ok(kvc_bm_seq_reserve(c->bm, 1, 13, 0, &c->w));
  step(c, 1, 13);
  measure(c);
  ok(kvc_bm_seq_add(c->bm, 2, c->tok + 20, 9, 0, &cached, &c->w));
  ok(kvc_bm_seq_reserve(c->bm, 2, 9, 0, &c->w));
  step(c, 2, 9);
  measure(c);
  ok(kvc_bm_seq_free(c->bm, 2, &c->w));
  ok(kvc_bm_seq_add(c->bm, 3, NULL, 0, 0, &cached, &c->w));
  ok(kvc_bm_seq_reserve(c->bm, 3, 6, 0, &c->w));
  step(c, 3, 6);
  measure(c);
  ok(kvc_bm_seq_swap_out(c->bm, 3, KVC_OK, &c->w));
  ok(kvc_bm_seq_add(c->bm, 5, NULL, 0, 0, &cached, &c->w));
}

typedef kvc_status_t (*op_fn)(ctx_t *c);

static kvc_status_t op_add_hit(ctx_t *c) {
  int n;
  return kvc_bm_seq_add(c->bm, 4, c->tok + 20, 9, 0, &n, &c->w);
}
static kvc_status_t op_add_miss(ctx_t *c) {
  int n;
  return kvc_bm_seq_add(c->bm, 4, c->tok + 40, 20, 7, &n, &c->w);
}
static kvc_status_t op_add_empty(ctx_t *c) {
  int n;
  return kvc_bm_seq_add(c->bm, 4, NULL, 0, 0, &n, &c->w);
}
static kvc_status_t op_reserve_grow(ctx_t *c) { return kvc_bm_seq_reserve(c->bm, 1, 40, 2, &c->w); }
/* 14 blocks: more than the free chunks, so the cached blocks must go. */
static kvc_status_t op_reserve_evicting(ctx_t *c) {
  kvc_status_t st = kvc_bm_seq_reserve(c->bm, 5, 56, 0, &c->w);
  if (st == KVC_OK) assert_int_equal(c->w.num_free, 1);
  return st;
}
static kvc_status_t op_fork_tail(ctx_t *c) { return kvc_bm_seq_fork(c->bm, 1, 6, &c->w); }
static kvc_status_t op_free(ctx_t *c) { return kvc_bm_seq_free(c->bm, 1, &c->w); }
static kvc_status_t op_free_swapped(ctx_t *c) { return kvc_bm_seq_free(c->bm, 3, &c->w); }
static kvc_status_t op_swap_out(ctx_t *c) {
  return kvc_bm_seq_swap_out(c->bm, 1, KVC_OK, &c->w);
}
static kvc_status_t op_swap_in(ctx_t *c) { return kvc_bm_seq_swap_in(c->bm, 3, &c->w); }
static kvc_status_t op_plan(ctx_t *c) {
  kvc_seq_id_t id = 1;
  int32_t n = 1;
  kvc_status_t st = kvc_bm_seq_reserve(c->bm, 1, 1, 0, &c->w);
  if (st != KVC_OK) return st;
  kvc_bm_batch_t b = {1, &id, &n, NULL};
  return kvc_bm_plan(c->bm, &b, &c->plan);
}

static void new_ctx(ctx_t *c, const kvc_bm_config_t *cfg) {
  memset(c, 0, sizeof(*c));
  ok(kvc_host_alloc_create(&c->ha));
  ok(kvc_bm_create(cfg, c->ha, &c->bm));
}

static void free_ctx(ctx_t *c) {
  kvc_bm_destroy(c->bm);
  assert_int_equal(kvc_host_alloc_bytes(c->ha), 0);
  kvc_host_alloc_destroy(c->ha);
}

/* Runs `op` after the scenario with the k-th allocation failing, for every k until it passes.
 * Returns how many k made it fail. */
static int fail_each_allocation(op_fn op, const kvc_bm_config_t *cfg) {
  static tb_snap_t before, after;
  for (int k = 0;; k++) {
    assert_true(k < 100);
    ctx_t c;
    new_ctx(&c, cfg);
    scenario(&c);
    tb_snap(c.bm, k_ids, NIDS, &before);
    kvc_host_alloc_fail_after(c.ha, k);
    kvc_status_t st = op(&c);
    kvc_host_alloc_fail_after(c.ha, -1);
    TB_ASSERT_VALID(c.bm);
    if (st == KVC_OK) {
      free_ctx(&c);
      return k;
    }
    assert_int_equal(st, KVC_ERR_OUT_OF_HOST_MEMORY);
    tb_snap(c.bm, k_ids, NIDS, &after);
    tb_snap_assert_equal(&before, &after);
    free_ctx(&c);
  }
}

static kvc_bm_config_t fault_config(void) {
  kvc_bm_config_t cfg = tb_config();
  cfg.max_seq_len = 4096; /* tables and the plan's id array grow past their first sizes */
  cfg.total_chunks = 8 * 16;
  return cfg;
}

static void every_allocation_in_every_op_fails_cleanly(void **state) {
  (void)state;
  kvc_bm_config_t cfg = fault_config();
  struct {
    const char *name;
    op_fn op;
    int min_failures; /* allocations the op is known to make */
  } ops[] = {
      {"add (prefix hit)", op_add_hit, 2},   /* table, prompt */
      {"add (miss)", op_add_miss, 1},        /* prompt */
      {"add (empty)", op_add_empty, 0},
      {"reserve (grow)", op_reserve_grow, 1},
      {"reserve (evicting)", op_reserve_evicting, 1},
      {"fork", op_fork_tail, 1},
      {"free", op_free, 0},
      {"free (swapped)", op_free_swapped, 0},
      {"swap out", op_swap_out, 0},
      {"swap in", op_swap_in, 0},
      {"plan", op_plan, 0},
  };
  for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++) {
    int failures = fail_each_allocation(ops[i].op, &cfg);
    if (failures < ops[i].min_failures)
      fail_msg("%s: only %d allocation sites failed", ops[i].name, failures);
    /* Ops that must not allocate at all. */
    if (ops[i].min_failures == 0 && failures != 0)
      fail_msg("%s: allocated %d times", ops[i].name, failures);
  }
}

static void create_fails_cleanly_at_every_allocation(void **state) {
  (void)state;
  kvc_bm_config_t cfg = fault_config();
  for (int k = 0;; k++) {
    assert_true(k < 100);
    kvc_host_alloc_t *ha;
    ok(kvc_host_alloc_create(&ha));
    kvc_host_alloc_fail_after(ha, k);
    kvc_bm_t *bm = NULL;
    kvc_status_t st = kvc_bm_create(&cfg, ha, &bm);
    kvc_host_alloc_fail_after(ha, -1);
    if (st == KVC_OK) {
      assert_true(k > 10);
      kvc_bm_destroy(bm);
      assert_int_equal(kvc_host_alloc_bytes(ha), 0);
      kvc_host_alloc_destroy(ha);
      break;
    }
    assert_int_equal(st, KVC_ERR_OUT_OF_HOST_MEMORY);
    assert_null(bm);
    assert_int_equal(kvc_host_alloc_bytes(ha), 0);
    kvc_host_alloc_destroy(ha);
  }
}

/* Random operations with allocations failing at random: every OUT_OF_HOST_MEMORY is clean. */
static void random_ops_under_random_faults(void **state) {
  (void)state;
  kvc_bm_config_t cfg = fault_config();
  cfg.max_seqs = 6;
  ctx_t c;
  new_ctx(&c, &cfg);
  kvc_test_rng_t rng;
  kvc_test_rng_seed(&rng, 77);
  static tb_snap_t before, after;
  for (int i = 0; i < 64; i++) c.tok[i] = (int32_t)(i % 8);
  int iters = (int)(3000 * kvc_test_scale());
  int faults = 0;
  for (int it = 0; it < iters; it++) {
    kvc_seq_id_t id = 1 + kvc_test_rng_below(&rng, NIDS);
    tb_snap(c.bm, k_ids, NIDS, &before);
    kvc_host_alloc_fail_after(c.ha, kvc_test_rng_below(&rng, 3));
    kvc_status_t st;
    int n, op = (int)kvc_test_rng_below(&rng, 6);
    switch (op) {
      case 0:
        st = kvc_bm_seq_add(c.bm, id, c.tok, 1 + (int)kvc_test_rng_below(&rng, 40), 0, &n, &c.w);
        break;
      case 1:
        st = kvc_bm_seq_reserve(c.bm, id, (int)kvc_test_rng_below(&rng, 300), 0, &c.w);
        break;
      case 2:
        st = kvc_bm_seq_fork(c.bm, id, 1 + kvc_test_rng_below(&rng, NIDS), &c.w);
        break;
      case 3:
        st = kvc_bm_seq_free(c.bm, id, &c.w);
        break;
      default: {
        kvc_seq_info_t info;
        st = kvc_bm_seq_info(c.bm, id, &info);
        if (st == KVC_OK && info.reserved > info.length && info.state == KVC_SEQ_RUNNING) {
          int32_t nn = 1 + (int32_t)kvc_test_rng_below(&rng, (uint32_t)(info.reserved - info.length));
          if (nn > cfg.max_batch_tokens) nn = cfg.max_batch_tokens;
          kvc_bm_batch_t b = {1, &id, &nn, c.tok};
          st = kvc_bm_plan(c.bm, &b, &c.plan);
          if (st == KVC_OK) {
            kvc_bm_step_done(c.bm);
            measure(&c);
          }
        }
      }
    }
    kvc_host_alloc_fail_after(c.ha, -1);
    TB_ASSERT_VALID(c.bm);
    if (st == KVC_ERR_OUT_OF_HOST_MEMORY) {
      faults++;
      tb_snap(c.bm, k_ids, NIDS, &after);
      tb_snap_assert_equal(&before, &after);
    }
  }
  assert_true(faults > iters / 50);
  free_ctx(&c);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(create_fails_cleanly_at_every_allocation),
      cmocka_unit_test(every_allocation_in_every_op_fails_cleanly),
      cmocka_unit_test(random_ops_under_random_faults),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
