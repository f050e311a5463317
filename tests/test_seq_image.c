/*
 * Moving a sequence between caches (kvc_seq_export / kvc_seq_import) on the CPU backend: the
 * imported sequence attends exactly as the original does (the same pages: bitwise the same
 * outputs), before and after both go on decoding; lengths with and without a tail; an import that
 * evicts cached blocks for room; and every refusal (another configuration, an id in use, a
 * damaged header or index, no room, a short buffer, a swapped-out or unknown sequence) with
 * nothing changed. tests/fuzz_seq_image.c damages images at random.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvc_test_util.h"
#include "kvcomp.h"

enum { LAYERS = 3, KV_HEADS = 2, Q_HEADS = 4, HEAD_DIM = 32, BT = 16, MAX_ROWS = 128 };
enum { ROW = KV_HEADS * HEAD_DIM, QROW = Q_HEADS * HEAD_DIM };

static kvc_config_t config(void) {
  kvc_config_t cfg = KVC_CONFIG_INIT;
  cfg.num_layers = LAYERS;
  cfg.num_q_heads = Q_HEADS;
  cfg.num_kv_heads = KV_HEADS;
  cfg.head_dim = HEAD_DIM;
  cfg.block_tokens = BT;
  cfg.pool_bytes = (size_t)1 << 20;
  cfg.swap_bytes = (size_t)1 << 20;
  cfg.max_seqs = 8;
  cfg.max_seq_len = 4096;
  cfg.max_batch_tokens = MAX_ROWS;
  cfg.log_level = KVC_LOG_ERROR;
  return cfg;
}

static kvc_cache_t *create(const kvc_config_t *cfg) {
  kvc_cache_t *c = NULL;
  assert_int_equal(kvc_cache_create(cfg, &c), KVC_OK);
  return c;
}

/* One step of n tokens for each cache in cs[nc] (the same sequence id and the same K/V, seeded
 * by `seed`), attending in every layer; outs[i] receives cache i's outputs of the last layer. */
static void step_all(kvc_cache_t **cs, int nc, kvc_seq_id_t id, int n, uint64_t seed,
                     uint16_t (*outs)[MAX_ROWS * QROW]) {
  static uint16_t k[MAX_ROWS * ROW], v[MAX_ROWS * ROW], q[MAX_ROWS * QROW];
  int32_t nn = n;
  kvc_batch_t b = {1, &id, &nn, NULL};
  for (int i = 0; i < nc; i++) {
    assert_int_equal(kvc_seq_reserve(cs[i], id, n, 0), KVC_OK);
    assert_int_equal(kvc_plan(cs[i], &b, NULL), KVC_OK);
  }
  for (int l = 0; l < LAYERS; l++) {
    kvc_test_rng_t r;
    kvc_test_rng_seed(&r, seed * 131 + (uint64_t)l);
    for (int j = 0; j < n * ROW; j++) k[j] = kvc_test_f32_to_f16((float)kvc_test_rng_normal(&r));
    for (int j = 0; j < n * ROW; j++) v[j] = kvc_test_f32_to_f16((float)kvc_test_rng_normal(&r));
    for (int j = 0; j < n * QROW; j++) q[j] = kvc_test_f32_to_f16((float)kvc_test_rng_normal(&r));
    for (int i = 0; i < nc; i++) {
      assert_int_equal(kvc_store(cs[i], l, k, v, NULL), KVC_OK);
      assert_int_equal(kvc_attend(cs[i], l, q, outs[i], 0.2f, NULL), KVC_OK);
    }
  }
}

/* Grows sequence `id` of c to `len` tokens (it has `from`), in steps of at most MAX_ROWS. */
static void grow(kvc_cache_t *c, kvc_seq_id_t id, int from, int len, uint64_t seed) {
  static uint16_t out[1][MAX_ROWS * QROW];
  for (int at = from; at < len; at += MAX_ROWS) {
    const int n = len - at < MAX_ROWS ? len - at : MAX_ROWS;
    step_all(&c, 1, id, n, seed + (uint64_t)at, out);
  }
}

static void *export_image(kvc_cache_t *c, kvc_seq_id_t id, size_t *bytes) {
  assert_int_equal(kvc_seq_export_bytes(c, id, bytes, NULL), KVC_OK);
  void *image = malloc(*bytes);
  assert_non_null(image);
  assert_int_equal(kvc_seq_export(c, id, image, *bytes, NULL), KVC_OK);
  return image;
}

/* The imported sequence attends bitwise as the original, then and after both decode on. */
static void check_move(int len) {
  kvc_config_t cfg = config();
  kvc_cache_t *cs[2] = {create(&cfg), create(&cfg)};
  assert_int_equal(kvc_seq_add(cs[0], 5, NULL, 0, 0, NULL), KVC_OK);
  grow(cs[0], 5, 0, len, 1000 + (uint64_t)len);
  size_t bytes = 0;
  void *image = export_image(cs[0], 5, &bytes);
  assert_int_equal(kvc_seq_import(cs[1], 5, image, bytes, NULL), KVC_OK);
  free(image);
  kvc_seq_info_t a, b;
  assert_int_equal(kvc_seq_info(cs[0], 5, &a), KVC_OK);
  assert_int_equal(kvc_seq_info(cs[1], 5, &b), KVC_OK);
  assert_int_equal(a.length, len);
  assert_int_equal(b.length, len);
  assert_int_equal(b.num_blocks, a.num_blocks);
  assert_int_equal(b.reserved, len);
  static uint16_t outs[2][MAX_ROWS * QROW];
  for (int s = 0; s < BT + 3; s++) { /* over a block boundary: the tail compresses on both */
    const int n = s == 0 ? 3 : 1;
    step_all(cs, 2, 5, n, 7 + (uint64_t)s, outs);
    assert_memory_equal(outs[0], outs[1], (size_t)n * QROW * 2);
  }
  kvc_stats_t st0, st1;
  memset(&st0, 0, sizeof(st0));
  memset(&st1, 0, sizeof(st1));
  st0.struct_size = st1.struct_size = sizeof(st0);
  for (int i = 0; i < 2; i++) assert_int_equal(kvc_cache_validate(cs[i]), KVC_OK);
  kvc_get_stats(cs[0], &st0);
  kvc_get_stats(cs[1], &st1);
  assert_int_equal(st1.page_bytes, st0.page_bytes);
  assert_int_equal(st1.page_alloc_bytes, st0.page_alloc_bytes);
  kvc_cache_destroy(cs[0]);
  kvc_cache_destroy(cs[1]);
}

static void moved_sequence_attends_as_the_original(void **state) {
  (void)state;
  const int lens[] = {1, 7, BT, 3 * BT, 5 * BT + 9, 300};
  for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) check_move(lens[i]);
}

/* What a caller can observe of a cache: stats and the sequences 1..8. */
typedef struct obs {
  kvc_stats_t stats;
  kvc_status_t st[8];
  kvc_seq_info_t info[8];
} obs_t;

static void observe(kvc_cache_t *c, obs_t *o) {
  memset(o, 0, sizeof(*o));
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  o->stats.struct_size = sizeof(o->stats);
  assert_int_equal(kvc_get_stats(c, &o->stats), KVC_OK);
  for (int i = 0; i < 8; i++) o->st[i] = kvc_seq_info(c, (kvc_seq_id_t)i + 1, &o->info[i]);
}

#define EXPECT_UNCHANGED(c, status, call)                                                          \
  do {                                                                                             \
    obs_t before_, after_;                                                                         \
    observe((c), &before_);                                                                        \
    assert_int_equal((call), (status));                                                            \
    observe((c), &after_);                                                                         \
    assert_memory_equal(&before_, &after_, sizeof(before_));                                       \
  } while (0)

static void refusals_change_nothing(void **state) {
  (void)state;
  kvc_config_t cfg = config();
  kvc_cache_t *src = create(&cfg), *dst = create(&cfg);
  assert_int_equal(kvc_seq_add(src, 1, NULL, 0, 0, NULL), KVC_OK);
  grow(src, 1, 0, 5 * BT + 3, 11);
  size_t bytes = 0;
  uint8_t *image = export_image(src, 1, &bytes);
  /* Exports that cannot be. */
  uint8_t small[64];
  EXPECT_UNCHANGED(src, KVC_ERR_INVALID_ARGUMENT, kvc_seq_export(src, 1, small, 64, NULL));
  EXPECT_UNCHANGED(src, KVC_ERR_NOT_FOUND, kvc_seq_export_bytes(src, 9, &bytes, NULL));
  assert_int_equal(kvc_seq_add(src, 7, NULL, 0, 0, NULL), KVC_OK); /* nothing to export */
  EXPECT_UNCHANGED(src, KVC_ERR_INVALID_STATE, kvc_seq_export_bytes(src, 7, &bytes, NULL));
  assert_int_equal(kvc_seq_free(src, 7), KVC_OK);
  assert_int_equal(kvc_seq_add(src, 2, NULL, 0, 0, NULL), KVC_OK);
  grow(src, 2, 0, 20, 12);
  assert_int_equal(kvc_seq_swap_out(src, 2, NULL), KVC_OK);
  EXPECT_UNCHANGED(src, KVC_ERR_INVALID_STATE, kvc_seq_export(src, 2, image, bytes, NULL));
  /* Imports that cannot be. */
  assert_int_equal(kvc_seq_add(dst, 3, NULL, 0, 0, NULL), KVC_OK);
  EXPECT_UNCHANGED(dst, KVC_ERR_INVALID_ARGUMENT, kvc_seq_import(dst, 3, image, bytes, NULL));
  EXPECT_UNCHANGED(dst, KVC_ERR_CORRUPT, kvc_seq_import(dst, 1, image, 40, NULL));
  EXPECT_UNCHANGED(dst, KVC_ERR_CORRUPT, kvc_seq_import(dst, 1, image, bytes - 16, NULL));
  uint8_t *bad = malloc(bytes);
  memcpy(bad, image, bytes);
  bad[0] ^= 1; /* magic */
  EXPECT_UNCHANGED(dst, KVC_ERR_CORRUPT, kvc_seq_import(dst, 1, bad, bytes, NULL));
  memcpy(bad, image, bytes);
  bad[64 + 4] = 7; /* the first page's kind */
  EXPECT_UNCHANGED(dst, KVC_ERR_CORRUPT, kvc_seq_import(dst, 1, bad, bytes, NULL));
  memcpy(bad, image, bytes);
  bad[64] ^= 0x10; /* the first page's size: the extents no longer fill the image */
  EXPECT_UNCHANGED(dst, KVC_ERR_CORRUPT, kvc_seq_import(dst, 1, bad, bytes, NULL));
  /* The chunks the index charges for a page, one fewer or one more than its copy will take
   * (found by tests/fuzz_seq_image.c: the block manager's accounting and the pool parted). */
  for (int delta = -1; delta <= 1; delta += 2) {
    memcpy(bad, image, bytes);
    bad[64 + 8 + 5] = (uint8_t)(bad[64 + 8 + 5] + delta); /* block 0, layer 1 */
    EXPECT_UNCHANGED(dst, KVC_ERR_CORRUPT, kvc_seq_import(dst, 1, bad, bytes, NULL));
  }
  /* The first extent's own header of its first page (what the copy reads), after the index of
   * 6 blocks x LAYERS pages: a size the index does not say. */
  const size_t extents = 64 + ((6 * LAYERS * 8 + 15) & ~(size_t)15);
  memcpy(bad, image, bytes);
  bad[extents] ^= 0x20;
  EXPECT_UNCHANGED(dst, KVC_ERR_CORRUPT, kvc_seq_import(dst, 1, bad, bytes, NULL));
  memcpy(bad, image, bytes);
  bad[extents + 4] = 1; /* and a kind: staging (allocator/kvc_pool_layout.h) */
  EXPECT_UNCHANGED(dst, KVC_ERR_CORRUPT, kvc_seq_import(dst, 1, bad, bytes, NULL));
  free(bad);
  kvc_config_t other = config();
  other.head_dim = 64;
  kvc_cache_t *wide = create(&other);
  EXPECT_UNCHANGED(wide, KVC_ERR_INVALID_ARGUMENT, kvc_seq_import(wide, 1, image, bytes, NULL));
  kvc_cache_destroy(wide);
  other = config();
  other.codec = KVC_CODEC_BITPACK;
  kvc_cache_t *bitpack = create(&other);
  EXPECT_UNCHANGED(bitpack, KVC_ERR_INVALID_ARGUMENT,
                   kvc_seq_import(bitpack, 1, image, bytes, NULL));
  kvc_cache_destroy(bitpack);
  /* No room: a pool that holds the other sequence's reservation and little else. */
  other = config();
  other.pool_bytes = (size_t)96 << 10;
  kvc_cache_t *tight = create(&other);
  assert_int_equal(kvc_seq_add(tight, 4, NULL, 0, 0, NULL), KVC_OK);
  int64_t fit = 0;
  assert_int_equal(kvc_tokens_fit(tight, &fit), KVC_OK);
  assert_int_equal(kvc_seq_reserve(tight, 4, (int)fit - BT, 0), KVC_OK);
  EXPECT_UNCHANGED(tight, KVC_ERR_OUT_OF_MEMORY, kvc_seq_import(tight, 1, image, bytes, NULL));
  kvc_cache_destroy(tight);
  /* And the same image imports where it fits. */
  assert_int_equal(kvc_seq_import(dst, 1, image, bytes, NULL), KVC_OK);
  assert_int_equal(kvc_cache_validate(dst), KVC_OK);
  free(image);
  kvc_cache_destroy(src);
  kvc_cache_destroy(dst);
}

/* An import evicts cached blocks for room, least recently used first, as an admission does. */
static void import_evicts_cached_blocks(void **state) {
  (void)state;
  kvc_config_t cfg = config();
  cfg.pool_bytes = (size_t)160 << 10;
  kvc_cache_t *src = create(&cfg), *dst = create(&cfg);
  /* Fill dst's pool with cached blocks: prompts whose blocks stay in the prefix cache. */
  int32_t tok[MAX_ROWS];
  static uint16_t kv[MAX_ROWS * ROW];
  kvc_test_rng_t r;
  kvc_test_rng_seed(&r, 5);
  for (int j = 0; j < MAX_ROWS * ROW; j++)
    kv[j] = kvc_test_f32_to_f16((float)kvc_test_rng_normal(&r));
  for (kvc_seq_id_t id = 2; id < 8; id++) {
    for (int i = 0; i < MAX_ROWS; i++) tok[i] = (int32_t)(id * 1000 + (uint64_t)i);
    int cached = 0;
    assert_int_equal(kvc_seq_add(dst, id, tok, MAX_ROWS, 0, &cached), KVC_OK);
    assert_int_equal(kvc_seq_reserve(dst, id, MAX_ROWS, 0), KVC_OK);
    int32_t nn = MAX_ROWS;
    kvc_batch_t b = {1, &id, &nn, tok};
    assert_int_equal(kvc_plan(dst, &b, NULL), KVC_OK);
    for (int l = 0; l < LAYERS; l++) assert_int_equal(kvc_store(dst, l, kv, kv, NULL), KVC_OK);
    assert_int_equal(kvc_seq_free(dst, id), KVC_OK);
  }
  assert_int_equal(kvc_cache_synchronize(dst), KVC_OK);
  kvc_stats_t d, a;
  memset(&d, 0, sizeof(d));
  d.struct_size = sizeof(d);
  a = d;
  assert_int_equal(kvc_get_stats(dst, &d), KVC_OK);
  assert_true(d.cached_blocks > 0);
  /* A sequence whose pages need more than dst's free chunks, and less than those and the cached
   * blocks' together. */
  assert_int_equal(kvc_seq_add(src, 1, NULL, 0, 0, NULL), KVC_OK);
  int len = 0;
  do {
    grow(src, 1, len, len + BT, 21 + (uint64_t)len);
    len += BT;
    assert_int_equal(kvc_cache_synchronize(src), KVC_OK);
    assert_int_equal(kvc_get_stats(src, &a), KVC_OK);
  } while (a.page_alloc_bytes <= d.free_bytes);
  assert_true(a.page_alloc_bytes < d.free_bytes + d.page_alloc_bytes);
  size_t bytes = 0;
  void *image = export_image(src, 1, &bytes);
  assert_int_equal(kvc_seq_import(dst, 1, image, bytes, NULL), KVC_OK);
  kvc_stats_t after = d;
  assert_int_equal(kvc_get_stats(dst, &after), KVC_OK);
  print_message("%d tokens (%zu page bytes in %zu of chunks) into %zu free bytes beside %lld "
                "cached blocks: %lld evicted\n",
                len, a.page_bytes, a.page_alloc_bytes, d.free_bytes, (long long)d.cached_blocks,
                (long long)(after.evictions - d.evictions));
  assert_true(after.evictions > d.evictions);
  assert_int_equal(kvc_cache_validate(dst), KVC_OK);
  static uint16_t outs[2][MAX_ROWS * QROW];
  kvc_cache_t *cs[2] = {src, dst};
  step_all(cs, 2, 1, 2, 99, outs);
  assert_memory_equal(outs[0], outs[1], (size_t)2 * QROW * 2);
  free(image);
  kvc_cache_destroy(src);
  kvc_cache_destroy(dst);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(moved_sequence_attends_as_the_original),
      cmocka_unit_test(refusals_change_nothing),
      cmocka_unit_test(import_evicts_cached_blocks),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
