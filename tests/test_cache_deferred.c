/*
 * Deferred compression (scheduler_hooks/kvc_cache.c): a block a step completes stays a full
 * staging page until the next kvc_plan compresses it, so the step's attention reads its own new
 * tokens exactly. Here, every way a block can leave that state early or be shared meanwhile, on
 * the CPU backend with a lossy codec, each followed by kvc_cache_validate:
 *   - validation leaves pending blocks as they are; the next plan compresses them;
 *   - freeing a sequence whose blocks are pending, then reusing their ids;
 *   - a pending block kept by the prefix cache: hit by a new sequence, then evicted;
 *   - a fork sharing pending blocks;
 *   - a swap-out of a sequence holding pending blocks, and its swap-in;
 *   - kvc_cache_synchronize compresses them (stats complete), attention still works;
 *   - a single-shot prefill in the smallest pool that admits it: the pending staging pages fit in
 *     what the block manager charged (validation compares chunks in use with the charge).
 * test_cache_store_attend checks the values attention reads.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvc_test_util.h"
#include "kvcomp.h"
#include "scheduler_hooks/kvc_cache_test.h"

enum { LAYERS = 2, KV_HEADS = 2, Q_HEADS = 4, HEAD_DIM = 16, BT = 16, MAX_SEQS = 8 };
enum { MAX_ROWS = 256, ROW = KV_HEADS * HEAD_DIM, QROW = Q_HEADS * HEAD_DIM };

/* Creation logs why a pool is too small; prefill_in_smallest_pool tries such pools on purpose. */
static void quiet(void *user, kvc_log_level_t level, const char *msg) {
  (void)user;
  (void)level;
  (void)msg;
}

static kvc_config_t config(size_t pool_bytes, int prefix_caching) {
  kvc_config_t cfg = KVC_CONFIG_INIT;
  cfg.num_layers = LAYERS;
  cfg.num_q_heads = Q_HEADS;
  cfg.num_kv_heads = KV_HEADS;
  cfg.head_dim = HEAD_DIM;
  cfg.dtype = KVC_DTYPE_F32;
  cfg.block_tokens = BT;
  cfg.pool_bytes = pool_bytes;
  cfg.swap_bytes = (size_t)1 << 20;
  cfg.max_seqs = MAX_SEQS;
  cfg.max_seq_len = 1024;
  cfg.max_batch_tokens = MAX_ROWS;
  cfg.prefix_caching = prefix_caching;
  cfg.log_fn = quiet;
  return cfg;
}

static float k_in[MAX_ROWS * ROW], v_in[MAX_ROWS * ROW], q_in[MAX_ROWS * QROW],
    out[MAX_ROWS * QROW];

/* A complete step (plan, store and attend every layer) with random K/V/Q. */
static void step(kvc_cache_t *c, const kvc_seq_id_t *ids, const int32_t *n_new, int n,
                 const int32_t *token_ids, uint64_t seed) {
  kvc_test_rng_t r;
  kvc_test_rng_seed(&r, seed);
  for (int i = 0; i < MAX_ROWS * ROW; i++) {
    k_in[i] = (float)kvc_test_rng_normal(&r);
    v_in[i] = (float)kvc_test_rng_normal(&r);
  }
  for (int i = 0; i < MAX_ROWS * QROW; i++) q_in[i] = (float)kvc_test_rng_normal(&r);
  kvc_batch_t b = {n, ids, n_new, token_ids};
  assert_int_equal(kvc_plan(c, &b, NULL), KVC_OK);
  for (int l = 0; l < LAYERS; l++) {
    assert_int_equal(kvc_store(c, l, k_in, v_in, NULL), KVC_OK);
    assert_int_equal(kvc_attend(c, l, q_in, out, 0.25f, NULL), KVC_OK);
  }
}

static void add_and_step(kvc_cache_t *c, kvc_seq_id_t id, int32_t n, const int32_t *tokens,
                         uint64_t seed) {
  int cached = -1;
  assert_int_equal(kvc_seq_add(c, id, tokens, tokens ? n : 0, 0, &cached), KVC_OK);
  assert_int_equal(cached, 0);
  assert_int_equal(kvc_seq_reserve(c, id, n, 0), KVC_OK);
  step(c, &id, &n, 1, tokens, seed);
}

/* The kind of every layer's page of the j-th block of `id`; all layers must agree. */
static int block_kind(kvc_cache_t *c, kvc_seq_id_t id, int j) {
  int32_t blocks[64];
  int n = 0;
  static uint8_t page[1 << 16];
  assert_int_equal(kvc__cache_seq_blocks(c, id, blocks, 64, &n), KVC_OK);
  assert_true(j < n);
  int kind = -1;
  for (int l = 0; l < LAYERS; l++) {
    kvc_page_entry_t e;
    assert_int_equal(kvc__cache_read_page(c, l, blocks[j], &e, page, sizeof(page)), KVC_OK);
    if (l > 0) assert_int_equal(e.kind, kind);
    kind = e.kind;
  }
  return kind;
}

static kvc_stats_t stats(kvc_cache_t *c) {
  kvc_stats_t s = {.struct_size = sizeof(s)};
  assert_int_equal(kvc_get_stats(c, &s), KVC_OK);
  return s;
}

static int64_t compressed_pages(const kvc_stats_t *s) {
  return s->pages_by_codec[0] + s->pages_by_codec[1] + s->pages_by_codec[2];
}

/* Validation, and the next plan, with blocks pending; then freeing them and reusing their ids. */
static void free_while_pending(void **state) {
  (void)state;
  kvc_config_t cfg = config((size_t)1 << 20, 0);
  kvc_cache_t *c = NULL;
  assert_int_equal(kvc_cache_create(&cfg, &c), KVC_OK);
  const size_t free0 = stats(c).free_bytes;
  add_and_step(c, 1, 40, NULL, 1);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  /* Validation brought nothing forward: both full blocks are still staging pages. */
  for (int j = 0; j < 3; j++) assert_int_equal(block_kind(c, 1, j), KVC_PAGE_STAGING);
  kvc_stats_t s = stats(c);
  assert_int_equal(compressed_pages(&s), 0);

  /* The next plan compresses them; the block it completes waits in turn. */
  add_and_step(c, 2, 20, NULL, 2);
  assert_int_equal(block_kind(c, 1, 0), KVC_PAGE_COMPRESSED);
  assert_int_equal(block_kind(c, 1, 1), KVC_PAGE_COMPRESSED);
  assert_int_equal(block_kind(c, 2, 0), KVC_PAGE_STAGING);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);

  /* Freed while pending: its pages go (compressed first), the accounting returns to zero, and
   * the next steps may reuse the block ids. */
  assert_int_equal(kvc_seq_free(c, 2), KVC_OK);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  assert_int_equal(kvc_seq_free(c, 1), KVC_OK);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  s = stats(c);
  assert_int_equal(s.page_bytes, 0);
  assert_int_equal(s.staging_bytes, 0);
  assert_int_equal(s.free_bytes, free0);
  add_and_step(c, 3, 48, NULL, 3);
  add_and_step(c, 4, 17, NULL, 4);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  kvc_cache_destroy(c);
}

/* Reserves as many tokens for `id` as the pool allows (failed reservations change nothing). */
static int reserve_most(kvc_cache_t *c, kvc_seq_id_t id, int most) {
  for (int n = most; n > 0; n -= BT)
    if (kvc_seq_reserve(c, id, n, 0) == KVC_OK) return n;
  fail_msg("no reservation fits");
  return 0;
}

/* A pending block kept by the prefix cache after its sequence is freed: still a staging page
 * (nothing needed it compressed), hit by a new sequence, compressed by the next plan. And pending
 * cached blocks evicted by a reservation that needs all the room there is. */
static void cached_while_pending(void **state) {
  (void)state;
  int32_t prompt[40];
  for (int i = 0; i < 40; i++) prompt[i] = 1000 + i;
  kvc_config_t cfg = config((size_t)256 << 10, 1);
  kvc_cache_t *c = NULL;
  assert_int_equal(kvc_cache_create(&cfg, &c), KVC_OK);
  add_and_step(c, 1, 40, prompt, 1);
  assert_int_equal(kvc_seq_free(c, 1), KVC_OK);
  kvc_stats_t s = stats(c);
  assert_int_equal(s.cached_blocks, 2);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  assert_int_equal(compressed_pages(&s), 0);

  /* A hit on the two pending blocks, then a step of the new sequence. */
  int cached = 0;
  assert_int_equal(kvc_seq_add(c, 2, prompt, 40, 0, &cached), KVC_OK);
  assert_int_equal(cached, 32);
  assert_int_equal(block_kind(c, 2, 0), KVC_PAGE_STAGING);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  assert_int_equal(kvc_seq_reserve(c, 2, 8, 0), KVC_OK);
  kvc_seq_id_t id = 2;
  int32_t n = 8;
  step(c, &id, &n, 1, prompt + 32, 2);
  assert_int_equal(block_kind(c, 2, 0), KVC_PAGE_COMPRESSED);
  assert_int_equal(block_kind(c, 2, 1), KVC_PAGE_COMPRESSED);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  kvc_cache_destroy(c);

  /* In a fresh cache, the only cached blocks are pending ones; the largest reservation must
   * evict them (each is charged a worst-case block, which a larger reservation could use). */
  assert_int_equal(kvc_cache_create(&cfg, &c), KVC_OK);
  add_and_step(c, 3, 40, prompt, 3);
  assert_int_equal(kvc_seq_free(c, 3), KVC_OK);
  assert_int_equal(stats(c).cached_blocks, 2);
  assert_int_equal(kvc_seq_add(c, 4, NULL, 0, 0, &cached), KVC_OK);
  int most = reserve_most(c, 4, cfg.max_seq_len);
  assert_true(most < cfg.max_seq_len);
  s = stats(c);
  assert_int_equal(s.evictions, 2);
  assert_int_equal(s.cached_blocks, 0);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  id = 4;
  n = most < MAX_ROWS ? most : MAX_ROWS;
  step(c, &id, &n, 1, NULL, 4);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  kvc_cache_destroy(c);
}

/* A fork shares the pending blocks as they are; the next plan compresses them for both. */
static void fork_while_pending(void **state) {
  (void)state;
  kvc_config_t cfg = config((size_t)1 << 20, 0);
  kvc_cache_t *c = NULL;
  assert_int_equal(kvc_cache_create(&cfg, &c), KVC_OK);
  add_and_step(c, 1, 40, NULL, 1);
  assert_int_equal(kvc_seq_fork(c, 1, 2), KVC_OK);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  assert_int_equal(block_kind(c, 2, 1), KVC_PAGE_STAGING);
  kvc_seq_id_t ids[2] = {1, 2};
  int32_t n_new[2] = {1, 9};
  assert_int_equal(kvc_seq_reserve(c, 1, 1, 0), KVC_OK);
  assert_int_equal(kvc_seq_reserve(c, 2, 9, 0), KVC_OK);
  step(c, ids, n_new, 2, NULL, 2);
  for (int j = 0; j < 2; j++) {
    assert_int_equal(block_kind(c, 1, j), KVC_PAGE_COMPRESSED);
    assert_int_equal(block_kind(c, 2, j), KVC_PAGE_COMPRESSED);
  }
  assert_int_equal(block_kind(c, 2, 2), KVC_PAGE_STAGING); /* the child's block completed now */
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  assert_int_equal(kvc_seq_free(c, 2), KVC_OK);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  assert_int_equal(kvc_seq_free(c, 1), KVC_OK);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  kvc_cache_destroy(c);
}

/* Swapping out a sequence right after the step that completed its blocks. */
static void swap_while_pending(void **state) {
  (void)state;
  kvc_config_t cfg = config((size_t)1 << 20, 0);
  kvc_cache_t *c = NULL;
  assert_int_equal(kvc_cache_create(&cfg, &c), KVC_OK);
  add_and_step(c, 1, 40, NULL, 1);
  add_and_step(c, 2, 40, NULL, 2);
  assert_int_equal(kvc_seq_swap_out(c, 2, NULL), KVC_OK);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  assert_int_equal(kvc_seq_swap_in(c, 2, NULL), KVC_OK);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  assert_int_equal(block_kind(c, 2, 0), KVC_PAGE_COMPRESSED);
  assert_int_equal(block_kind(c, 2, 1), KVC_PAGE_COMPRESSED);
  assert_int_equal(block_kind(c, 2, 2), KVC_PAGE_STAGING);
  assert_int_equal(kvc_seq_reserve(c, 2, 8, 0), KVC_OK);
  kvc_seq_id_t id = 2;
  int32_t n = 8;
  step(c, &id, &n, 1, NULL, 3);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  kvc_stats_t s = stats(c);
  assert_int_equal(s.swap_outs, 1);
  assert_int_equal(s.swap_ins, 1);
  kvc_cache_destroy(c);
}

/* kvc_cache_synchronize compresses pending blocks, so stats are complete after it; the step's
 * attention still runs (reading them compressed). */
static void synchronize_compresses(void **state) {
  (void)state;
  kvc_config_t cfg = config((size_t)1 << 20, 0);
  kvc_cache_t *c = NULL;
  assert_int_equal(kvc_cache_create(&cfg, &c), KVC_OK);
  add_and_step(c, 1, 40, NULL, 1);
  kvc_stats_t before = stats(c);
  assert_int_equal(compressed_pages(&before), 0);
  assert_int_equal(kvc_cache_synchronize(c), KVC_OK);
  kvc_stats_t after = stats(c);
  assert_int_equal(compressed_pages(&after), 2 * LAYERS);
  assert_true(after.page_bytes > 0);
  assert_int_equal(after.staging_bytes * 3, before.staging_bytes);
  assert_int_equal(block_kind(c, 1, 1), KVC_PAGE_COMPRESSED);
  assert_int_equal(kvc_attend(c, 0, q_in, out, 0.25f, NULL), KVC_OK);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  kvc_cache_destroy(c);
}

/* The smallest pool (in 4 KiB steps) that admits one MAX_ROWS-token prompt: the prefill holds
 * every block it completes as a staging page in every layer until the next plan. */
static void prefill_in_smallest_pool(void **state) {
  (void)state;
  kvc_cache_t *c = NULL;
  size_t pool = 4096;
  for (;; pool += 4096) {
    kvc_config_t cfg = config(pool, 0);
    cfg.watermark = 0.0f;
    if (kvc_cache_create(&cfg, &c) != KVC_OK) continue;
    int cached = 0;
    assert_int_equal(kvc_seq_add(c, 1, NULL, 0, 0, &cached), KVC_OK);
    if (kvc_seq_reserve(c, 1, MAX_ROWS, 0) == KVC_OK) break;
    kvc_cache_destroy(c);
    assert_true(pool < ((size_t)8 << 20));
  }
  kvc_seq_id_t id = 1;
  int32_t n = MAX_ROWS;
  step(c, &id, &n, 1, NULL, 1);
  assert_int_equal(block_kind(c, 1, MAX_ROWS / BT - 1), KVC_PAGE_STAGING);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  assert_int_equal(kvc_cache_synchronize(c), KVC_OK);
  assert_int_equal(block_kind(c, 1, MAX_ROWS / BT - 1), KVC_PAGE_COMPRESSED);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  kvc_cache_destroy(c);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(free_while_pending),     cmocka_unit_test(cached_while_pending),
      cmocka_unit_test(fork_while_pending),     cmocka_unit_test(swap_while_pending),
      cmocka_unit_test(synchronize_compresses), cmocka_unit_test(prefill_in_smallest_pool),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
