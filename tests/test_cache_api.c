/*
 * Every public entry point with bad input or in the wrong order returns its documented status and
 * leaves the cache exactly as it was: statistics, every sequence's info, no events, and
 * kvc_cache_validate still passing. Then every host allocation site fails in turn (fault
 * injection through the cache's host allocator): the call reports KVC_ERR_OUT_OF_HOST_MEMORY and
 * nothing changes (host bytes included, so nothing leaked); ASan/LSan in CI checks the rest.
 * Also: the Prometheus text, the event queue's overflow, the configuration round trip, and stats
 * read from another thread while the scheduler thread runs steps.
 */
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kvc_test_snap.h"
#include "kvc_test_util.h"
#include "kvcomp.h"
#include "scheduler_hooks/kvc_cache_test.h"

enum { LAYERS = 2, KV_HEADS = 1, Q_HEADS = 2, HEAD_DIM = 16, BT = 16, MAX_SEQS = 8 };
enum { MAX_ROWS = 64, ROW = KV_HEADS * HEAD_DIM, QROW = Q_HEADS * HEAD_DIM };

static int log_lines;
static char last_error[256]; /* the last error line logged */
static void count_log(void *user, kvc_log_level_t level, const char *msg) {
  (void)user;
  if (level != KVC_LOG_ERROR) return;
  log_lines++;
  snprintf(last_error, sizeof(last_error), "%s", msg);
}

static kvc_config_t base_config(void) {
  kvc_config_t cfg = KVC_CONFIG_INIT;
  cfg.num_layers = LAYERS;
  cfg.num_q_heads = Q_HEADS;
  cfg.num_kv_heads = KV_HEADS;
  cfg.head_dim = HEAD_DIM;
  cfg.block_tokens = BT;
  cfg.pool_bytes = (size_t)1 << 20;
  cfg.swap_bytes = (size_t)1 << 20;
  cfg.max_seqs = MAX_SEQS;
  cfg.max_seq_len = 8192;
  cfg.max_batch_tokens = MAX_ROWS;
  cfg.log_fn = count_log;
  return cfg;
}

/* ---- snapshots ------------------------------------------------------------------------------ */

typedef kvc_test_snap_t snap_t;

static void take(kvc_cache_t *c, snap_t *s) { assert_int_equal(kvc_test_snap_take(c, s), KVC_OK); }

/* After a call that failed: nothing observable changed and no event was emitted. */
static void assert_unchanged(kvc_cache_t *c, const snap_t *before, const char *what) {
  snap_t after;
  take(c, &after);
  const char *changed = kvc_test_snap_diff(before, &after, 0);
  if (changed) fail_msg("%s changed the %s", what, changed);
}

#define EXPECT_FAILS(c, call, status)                                                              \
  do {                                                                                             \
    snap_t before_;                                                                                \
    take((c), &before_);                                                                           \
    assert_int_equal((call), (status));                                                            \
    assert_unchanged((c), &before_, #call);                                                        \
  } while (0)

/* ---- steps ---------------------------------------------------------------------------------- */

typedef struct tensors {
  uint16_t k[MAX_ROWS * ROW], v[MAX_ROWS * ROW], q[MAX_ROWS * QROW], out[MAX_ROWS * QROW];
} tensors_t;

static void fill(tensors_t *t, uint64_t seed) {
  kvc_test_rng_t r;
  kvc_test_rng_seed(&r, seed);
  for (int i = 0; i < MAX_ROWS * ROW; i++) {
    t->k[i] = kvc_test_f32_to_f16((float)kvc_test_rng_normal(&r));
    t->v[i] = kvc_test_f32_to_f16((float)kvc_test_rng_normal(&r));
  }
  for (int i = 0; i < MAX_ROWS * QROW; i++)
    t->q[i] = kvc_test_f32_to_f16((float)kvc_test_rng_normal(&r));
}

/* A complete step (plan, store and attend every layer). */
static void step(kvc_cache_t *c, const kvc_seq_id_t *ids, const int32_t *n_new, int n) {
  static tensors_t t;
  fill(&t, 7);
  kvc_batch_t b = {n, ids, n_new, NULL};
  assert_int_equal(kvc_plan(c, &b, NULL), KVC_OK);
  for (int l = 0; l < LAYERS; l++) {
    assert_int_equal(kvc_store(c, l, t.k, t.v, NULL), KVC_OK);
    assert_int_equal(kvc_attend(c, l, t.q, t.out, 0.25f, NULL), KVC_OK);
  }
}

static void grow(kvc_cache_t *c, kvc_seq_id_t id, int n) {
  assert_int_equal(kvc_seq_reserve(c, id, n, 0), KVC_OK);
  int32_t k = n;
  step(c, &id, &k, 1);
}

/* The fixture: 1 running (40 tokens, reserved 48), 2 its fork, 3 swapped out, 4 freed. */
static kvc_cache_t *fixture(void) {
  kvc_config_t cfg = base_config();
  kvc_cache_t *c = NULL;
  assert_int_equal(kvc_cache_create(&cfg, &c), KVC_OK);
  int cached = -1;
  for (kvc_seq_id_t id = 1; id <= 4; id++) {
    if (id == 2) continue;
    assert_int_equal(kvc_seq_add(c, id, NULL, 0, 0, &cached), KVC_OK);
  }
  assert_int_equal(kvc_seq_reserve(c, 1, 40, 8), KVC_OK);
  int32_t n1 = 40;
  kvc_seq_id_t one = 1;
  step(c, &one, &n1, 1);
  assert_int_equal(kvc_seq_fork(c, 1, 2), KVC_OK);
  grow(c, 3, 20);
  grow(c, 4, 5);
  assert_int_equal(kvc_seq_swap_out(c, 3, NULL), KVC_OK);
  assert_int_equal(kvc_seq_free(c, 4), KVC_OK);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  return c;
}

/* ---- tests ---------------------------------------------------------------------------------- */

/* The i-th bad configuration: base_config() with one field broken. 0 past the last. */
#define BAD_CONFIGS(X)                                                                             \
  X(struct_size = 0, KVC_ERR_INVALID_ARGUMENT)                                                     \
  X(struct_size = 8, KVC_ERR_INVALID_ARGUMENT)                                                     \
  X(backend = (kvc_backend_t)7, KVC_ERR_INVALID_ARGUMENT)                                          \
  X(num_layers = 0, KVC_ERR_INVALID_ARGUMENT)                                                      \
  X(num_kv_heads = 0, KVC_ERR_INVALID_ARGUMENT)                                                    \
  X(num_kv_heads = 3, KVC_ERR_INVALID_ARGUMENT)                                                    \
  X(num_q_heads = 0, KVC_ERR_INVALID_ARGUMENT)                                                     \
  X(head_dim = 12, KVC_ERR_INVALID_ARGUMENT)                                                       \
  X(head_dim = 264, KVC_ERR_INVALID_ARGUMENT)                                                      \
  X(head_dim = 0, KVC_ERR_INVALID_ARGUMENT)                                                        \
  X(dtype = (kvc_dtype_t)9, KVC_ERR_INVALID_ARGUMENT)                                              \
  X(block_tokens = 24, KVC_ERR_INVALID_ARGUMENT)                                                   \
  X(block_tokens = 8, KVC_ERR_INVALID_ARGUMENT)                                                    \
  X(block_tokens = 512, KVC_ERR_INVALID_ARGUMENT)                                                  \
  X(pool_bytes = 0, KVC_ERR_INVALID_ARGUMENT)                                                      \
  X(pool_bytes = 2048, KVC_ERR_INVALID_ARGUMENT) /* less than one block of every layer */          \
  X(pool_bytes = SIZE_MAX, KVC_ERR_INVALID_ARGUMENT) /* chunks past 32 bits: divided by 0 */       \
  X(max_seqs = 0, KVC_ERR_INVALID_ARGUMENT)                                                        \
  X(max_seqs = 1 << 29, KVC_ERR_INVALID_ARGUMENT) /* was KVC_ERR_INTERNAL */                       \
  X(max_seqs = INT_MAX, KVC_ERR_INVALID_ARGUMENT) /* was an endless loop */                        \
  X(max_seq_len = 0, KVC_ERR_INVALID_ARGUMENT)                                                     \
  X(max_batch_tokens = 0, KVC_ERR_INVALID_ARGUMENT)                                                \
  X(watermark = -0.1f, KVC_ERR_INVALID_ARGUMENT)                                                   \
  X(watermark = 1.0f, KVC_ERR_INVALID_ARGUMENT)                                                    \
  X(watermark = NAN, KVC_ERR_INVALID_ARGUMENT)                                                     \
  X(prefix_caching = 2, KVC_ERR_INVALID_ARGUMENT)                                                  \
  X(policy = (kvc_codec_policy_t)9, KVC_ERR_INVALID_ARGUMENT)                                      \
  X(codec = (kvc_codec_t)9, KVC_ERR_INVALID_ARGUMENT)                                              \
  X(size_budget = 0.0f, KVC_ERR_INVALID_ARGUMENT)                                                  \
  X(size_budget = 1.5f, KVC_ERR_INVALID_ARGUMENT)                                                  \
  X(bound_mode = (kvc_bound_mode_t)5, KVC_ERR_INVALID_ARGUMENT)                                    \
  X(k_bound = 0.0f, KVC_ERR_INVALID_ARGUMENT)                                                      \
  X(k_bound = NAN, KVC_ERR_INVALID_ARGUMENT)                                                       \
  X(v_bound = -1.0f, KVC_ERR_INVALID_ARGUMENT)                                                     \
  X(v_bound = INFINITY, KVC_ERR_INVALID_ARGUMENT)                                                  \
  X(log_level = (kvc_log_level_t)9, KVC_ERR_INVALID_ARGUMENT)                                      \
  X(backend = KVC_BACKEND_CUDA, KVC_ERR_UNSUPPORTED) /* not built, or head_dim 16 */

static int bad_config(int i, kvc_config_t *cfg, const char **name, kvc_status_t *want) {
  int k = 0;
  *cfg = base_config();
#define X(edit, status)                                                                            \
  if (i == k++) {                                                                                  \
    cfg->edit;                                                                                     \
    *name = #edit;                                                                                 \
    *want = status;                                                                                \
    return 1;                                                                                      \
  }
  BAD_CONFIGS(X)
#undef X
  return 0;
}

static void create_rejects_bad_configs(void **state) {
  (void)state;
  kvc_cache_t *sentinel = (kvc_cache_t *)&sentinel, *c = sentinel;
  kvc_config_t cfg = base_config();
  assert_int_equal(kvc_cache_create(NULL, &c), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_cache_create(&cfg, NULL), KVC_ERR_INVALID_ARGUMENT);
  const char *name;
  kvc_status_t want;
  for (int i = 0; bad_config(i, &cfg, &name, &want); i++) {
    int logged = log_lines;
    c = sentinel;
    kvc_status_t st = kvc_cache_create(&cfg, &c);
    if (st != want)
      fail_msg("%s: %s, expected %s", name, kvc_status_string(st), kvc_status_string(want));
    assert_ptr_equal(c, sentinel); /* *out is set only on success */
    /* A rejected configuration says why (once the struct is readable at all). */
    if (cfg.struct_size >= sizeof(cfg) && log_lines == logged)
      fail_msg("%s: rejected without a log line saying why", name);
  }
  kvc_cache_destroy(NULL);
}

/* The CUDA backend's block sizes (attention/kvc_attn.h): refused at creation, saying why, rather
 * than at every step. Checked only where CUDA is built (elsewhere the backend itself is refused). */
static void create_rejects_cuda_block_sizes(void **state) {
  (void)state;
  if (!KVC_HAVE_CUDA) skip();
  static const struct {
    int head_dim, block_tokens;
    kvc_codec_t codec;
  } bad[] = {{128, 256, KVC_CODEC_RAW},
             {256, 128, KVC_CODEC_HUFFMAN},
             {256, 128, KVC_CODEC_BITPACK}};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    kvc_config_t cfg = base_config();
    cfg.backend = KVC_BACKEND_CUDA;
    cfg.head_dim = bad[i].head_dim;
    cfg.block_tokens = bad[i].block_tokens;
    cfg.codec = bad[i].codec;
    kvc_cache_t *c = NULL;
    last_error[0] = 0;
    assert_int_equal(kvc_cache_create(&cfg, &c), KVC_ERR_UNSUPPORTED);
    assert_null(c);
    assert_non_null(strstr(last_error, "block_tokens"));
  }
}

static void config_round_trip(void **state) {
  (void)state;
  kvc_config_t cfg = base_config(), got = KVC_CONFIG_INIT;
  kvc_cache_t *c = NULL;
  assert_int_equal(kvc_cache_create(&cfg, &c), KVC_OK);
  assert_int_equal(kvc_cache_config(NULL, &got), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_cache_config(c, NULL), KVC_ERR_INVALID_ARGUMENT);
  got.struct_size = 4;
  assert_int_equal(kvc_cache_config(c, &got), KVC_ERR_INVALID_ARGUMENT);
  got.struct_size = sizeof(got);
  assert_int_equal(kvc_cache_config(c, &got), KVC_OK);
  assert_memory_equal(&cfg, &got, sizeof(cfg));
  kvc_cache_destroy(c);

  /* A caller compiled against a larger (future) struct: fields beyond ours are ignored. */
  struct {
    kvc_config_t cfg;
    char future[64];
  } big;
  memset(&big, 0x5a, sizeof(big));
  big.cfg = base_config();
  big.cfg.struct_size = sizeof(big);
  assert_int_equal(kvc_cache_create(&big.cfg, &c), KVC_OK);
  got.struct_size = sizeof(got);
  assert_int_equal(kvc_cache_config(c, &got), KVC_OK);
  assert_int_equal(got.struct_size, sizeof(kvc_config_t));
  assert_int_equal(got.num_layers, LAYERS);
  kvc_cache_destroy(c);
}

static void hooks_reject_bad_input(void **state) {
  (void)state;
  kvc_cache_t *c = fixture();
  const int32_t tok[4] = {1, 2, 3, 4};
  int cached = 0;
  kvc_seq_info_t info;

  /* kvc_seq_add */
  assert_int_equal(kvc_seq_add(NULL, 9, tok, 4, 0, &cached), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_seq_add(c, 9, NULL, 4, 0, &cached), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_seq_add(c, 9, tok, -1, 0, &cached), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_seq_add(c, 9, tok, 8193, 0, &cached), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_seq_add(c, 1, tok, 4, 0, &cached), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_seq_add(c, 3, tok, 4, 0, &cached), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_seq_add(c, KVC_SEQ_NONE, tok, 4, 0, &cached), KVC_ERR_INVALID_ARGUMENT);

  /* kvc_seq_reserve */
  assert_int_equal(kvc_seq_reserve(NULL, 1, 1, 0), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_seq_reserve(c, 99, 1, 0), KVC_ERR_NOT_FOUND);
  EXPECT_FAILS(c, kvc_seq_reserve(c, 4, 1, 0), KVC_ERR_NOT_FOUND); /* freed */
  EXPECT_FAILS(c, kvc_seq_reserve(c, 1, -1, 0), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_seq_reserve(c, 1, 0, -1), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_seq_reserve(c, 1, 8192 - 40 + 1, 0), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_seq_reserve(c, 1, 8100, 60), KVC_ERR_INVALID_ARGUMENT); /* with look-ahead */
  EXPECT_FAILS(c, kvc_seq_reserve(c, 1, 8000, 0), KVC_ERR_OUT_OF_MEMORY);     /* pool holds ~6k */
  EXPECT_FAILS(c, kvc_seq_reserve(c, 3, 1, 0), KVC_ERR_INVALID_STATE);        /* swapped out */

  /* kvc_seq_fork */
  assert_int_equal(kvc_seq_fork(NULL, 1, 9), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_seq_fork(c, 99, 9), KVC_ERR_NOT_FOUND);
  EXPECT_FAILS(c, kvc_seq_fork(c, 4, 9), KVC_ERR_NOT_FOUND);
  EXPECT_FAILS(c, kvc_seq_fork(c, 1, 2), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_seq_fork(c, 1, KVC_SEQ_NONE), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_seq_fork(c, 3, 9), KVC_ERR_INVALID_STATE); /* parent swapped out */

  /* kvc_seq_free */
  assert_int_equal(kvc_seq_free(NULL, 1), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_seq_free(c, 99), KVC_ERR_NOT_FOUND);
  EXPECT_FAILS(c, kvc_seq_free(c, 4), KVC_ERR_NOT_FOUND); /* double free */

  /* kvc_seq_swap_out / kvc_seq_swap_in */
  assert_int_equal(kvc_seq_swap_out(NULL, 1, NULL), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_seq_swap_in(NULL, 3, NULL), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_seq_swap_out(c, 99, NULL), KVC_ERR_NOT_FOUND);
  EXPECT_FAILS(c, kvc_seq_swap_out(c, 3, NULL), KVC_ERR_INVALID_STATE);
  EXPECT_FAILS(c, kvc_seq_swap_in(c, 99, NULL), KVC_ERR_NOT_FOUND);
  EXPECT_FAILS(c, kvc_seq_swap_in(c, 1, NULL), KVC_ERR_INVALID_STATE);

  /* kvc_seq_info / kvc_tokens_fit */
  assert_int_equal(kvc_seq_info(NULL, 1, &info), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_seq_info(c, 1, NULL), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_seq_info(c, 99, &info), KVC_ERR_NOT_FOUND);
  assert_int_equal(kvc_seq_info(c, 1, &info), KVC_OK);
  assert_int_equal(info.length, 40);
  assert_int_equal(info.reserved, 48);
  assert_int_equal(info.num_blocks, 3);
  assert_int_equal(info.shared_blocks, 2); /* the fork shares the two full blocks */
  assert_int_equal(info.state, KVC_SEQ_RUNNING);
  assert_int_equal(kvc_seq_info(c, 3, &info), KVC_OK);
  assert_int_equal(info.state, KVC_SEQ_SWAPPED);
  assert_int_equal(kvc_tokens_fit(NULL, &(int64_t){0}), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_tokens_fit(c, NULL), KVC_ERR_INVALID_ARGUMENT);

  /* A swapped-out sequence comes back with its reservation released (reserve again). */
  assert_int_equal(kvc_seq_swap_in(c, 3, NULL), KVC_OK);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  assert_int_equal(kvc_seq_info(c, 3, &info), KVC_OK);
  assert_int_equal(info.length, 20);
  assert_int_equal(info.state, KVC_SEQ_RUNNING);
  grow(c, 3, 30);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  kvc_cache_destroy(c);

  /* Swap disabled, and swap space too small. */
  kvc_config_t cfg = base_config();
  cfg.swap_bytes = 0;
  assert_int_equal(kvc_cache_create(&cfg, &c), KVC_OK);
  assert_int_equal(kvc_seq_add(c, 1, NULL, 0, 0, &cached), KVC_OK);
  grow(c, 1, 20);
  EXPECT_FAILS(c, kvc_seq_swap_out(c, 1, NULL), KVC_ERR_UNSUPPORTED);
  EXPECT_FAILS(c, kvc_seq_swap_in(c, 1, NULL), KVC_ERR_UNSUPPORTED);
  kvc_cache_destroy(c);
  cfg.swap_bytes = 1024;
  assert_int_equal(kvc_cache_create(&cfg, &c), KVC_OK);
  assert_int_equal(kvc_seq_add(c, 1, NULL, 0, 0, &cached), KVC_OK);
  grow(c, 1, 40);
  /* The two blocks the step completed wait for their compression (kvc_store); a swap-out needs
   * their sizes, so it compresses them before it can learn that swap space is short, and that is
   * all a failed swap-out changes. */
  assert_int_equal(kvc_seq_swap_out(c, 1, NULL), KVC_ERR_OUT_OF_MEMORY);
  EXPECT_FAILS(c, kvc_seq_swap_out(c, 1, NULL), KVC_ERR_OUT_OF_MEMORY);
  kvc_cache_destroy(c);
}

static void max_seqs_and_swap_in_without_room(void **state) {
  (void)state;
  kvc_cache_t *c = fixture();
  int cached = 0;
  for (kvc_seq_id_t id = 10; id < 10 + MAX_SEQS - 3; id++)
    assert_int_equal(kvc_seq_add(c, id, NULL, 0, 0, &cached), KVC_OK);
  EXPECT_FAILS(c, kvc_seq_add(c, 99, NULL, 0, 0, &cached), KVC_ERR_OUT_OF_MEMORY);
  EXPECT_FAILS(c, kvc_seq_fork(c, 1, 99), KVC_ERR_OUT_OF_MEMORY);
  for (kvc_seq_id_t id = 10; id < 10 + MAX_SEQS - 3; id++)
    assert_int_equal(kvc_seq_free(c, id), KVC_OK);

  /* Fill the pool with reservations so that sequence 3 cannot come back. */
  assert_int_equal(kvc_seq_add(c, 5, NULL, 0, 0, &cached), KVC_OK);
  int64_t lo = 0, hi = 8000;
  while (lo < hi) {
    int64_t mid = (lo + hi + 1) / 2;
    kvc_status_t st = kvc_seq_reserve(c, 5, (int)mid, 0);
    if (st == KVC_OK)
      lo = mid;
    else {
      assert_int_equal(st, KVC_ERR_OUT_OF_MEMORY);
      hi = mid - 1;
    }
  }
  EXPECT_FAILS(c, kvc_seq_swap_in(c, 3, NULL), KVC_ERR_OUT_OF_MEMORY);
  assert_int_equal(kvc_seq_free(c, 5), KVC_OK);
  assert_int_equal(kvc_seq_swap_in(c, 3, NULL), KVC_OK);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  kvc_cache_destroy(c);
}

static void steps_reject_bad_input_and_order(void **state) {
  (void)state;
  kvc_cache_t *c = fixture();
  static tensors_t t;
  fill(&t, 3);
  kvc_seq_id_t ids[3] = {1, 2, 1};
  int32_t n_new[3] = {1, 1, 1}, zero = 0, many = MAX_ROWS + 1;

  /* Before any plan of this cache's current state: store and attend are out of order. */
  kvc_config_t cfg = base_config();
  kvc_cache_t *fresh = NULL;
  assert_int_equal(kvc_cache_create(&cfg, &fresh), KVC_OK);
  EXPECT_FAILS(fresh, kvc_store(fresh, 0, t.k, t.v, NULL), KVC_ERR_INVALID_STATE);
  EXPECT_FAILS(fresh, kvc_attend(fresh, 0, t.q, t.out, 0.25f, NULL), KVC_ERR_INVALID_STATE);
  kvc_cache_destroy(fresh);

  kvc_batch_t b = {2, ids, n_new, NULL};
  assert_int_equal(kvc_plan(NULL, &b, NULL), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_plan(c, NULL, NULL), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_plan(c, &(kvc_batch_t){0, ids, n_new, NULL}, NULL), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_plan(c, &(kvc_batch_t){1, NULL, n_new, NULL}, NULL),
               KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_plan(c, &(kvc_batch_t){1, ids, NULL, NULL}, NULL), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_plan(c, &(kvc_batch_t){3, ids, n_new, NULL}, NULL), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_plan(c, &(kvc_batch_t){1, ids, &zero, NULL}, NULL), KVC_ERR_INVALID_ARGUMENT);
  /* Sequence 2 (the fork) has no reservation beyond its length; 1 has 8 tokens left. */
  EXPECT_FAILS(c, kvc_plan(c, &(kvc_batch_t){1, ids + 1, n_new, NULL}, NULL),
               KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_plan(c, &(kvc_batch_t){1, ids, &(int32_t){9}, NULL}, NULL),
               KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_seq_reserve(c, 2, MAX_ROWS + 1, 0), KVC_OK);
  EXPECT_FAILS(c, kvc_plan(c, &(kvc_batch_t){1, ids + 1, &many, NULL}, NULL),
               KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_plan(c, &(kvc_batch_t){1, &(kvc_seq_id_t){99}, n_new, NULL}, NULL),
               KVC_ERR_NOT_FOUND);
  EXPECT_FAILS(c, kvc_plan(c, &(kvc_batch_t){1, &(kvc_seq_id_t){3}, n_new, NULL}, NULL),
               KVC_ERR_INVALID_STATE);

  /* A step: sequences 1 and 2 with one token each. */
  assert_int_equal(kvc_plan(c, &b, NULL), KVC_OK);
  EXPECT_FAILS(c, kvc_plan(c, &b, NULL), KVC_ERR_INVALID_STATE); /* a step is open */
  EXPECT_FAILS(c, kvc_attend(c, 0, t.q, t.out, 0.25f, NULL),
               KVC_ERR_INVALID_STATE); /* not stored */
  EXPECT_FAILS(c, kvc_store(c, 0, NULL, t.v, NULL), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_store(c, 0, t.k, NULL, NULL), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_store(c, -1, t.k, t.v, NULL), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_store(c, LAYERS, t.k, t.v, NULL), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_store(NULL, 0, t.k, t.v, NULL), KVC_ERR_INVALID_ARGUMENT);
  /* Mid-step: the step's sequences cannot be reserved, forked, freed or swapped. */
  EXPECT_FAILS(c, kvc_seq_reserve(c, 1, 1, 0), KVC_ERR_INVALID_STATE);
  EXPECT_FAILS(c, kvc_seq_fork(c, 1, 9), KVC_ERR_INVALID_STATE);
  EXPECT_FAILS(c, kvc_seq_free(c, 2), KVC_ERR_INVALID_STATE);
  EXPECT_FAILS(c, kvc_seq_swap_out(c, 1, NULL), KVC_ERR_INVALID_STATE);
  assert_int_equal(kvc_store(c, 0, t.k, t.v, NULL), KVC_OK);
  EXPECT_FAILS(c, kvc_store(c, 0, t.k, t.v, NULL), KVC_ERR_INVALID_STATE); /* stored twice */
  EXPECT_FAILS(c, kvc_attend(c, 1, t.q, t.out, 0.25f, NULL), KVC_ERR_INVALID_STATE);
  EXPECT_FAILS(c, kvc_attend(c, 0, NULL, t.out, 0.25f, NULL), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_attend(c, 0, t.q, NULL, 0.25f, NULL), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_attend(c, -1, t.q, t.out, 0.25f, NULL), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_attend(c, LAYERS, t.q, t.out, 0.25f, NULL), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_attend(c, 0, t.q, t.out, NAN, NULL), KVC_ERR_INVALID_ARGUMENT);
  EXPECT_FAILS(c, kvc_attend(c, 0, t.q, t.out, 0.0f, NULL), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_attend(NULL, 0, t.q, t.out, 0.25f, NULL), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_attend(c, 0, t.q, t.out, 0.25f, NULL), KVC_OK);
  assert_int_equal(kvc_store(c, 1, t.k, t.v, NULL), KVC_OK);
  EXPECT_FAILS(c, kvc_store(c, 1, t.k, t.v, NULL), KVC_ERR_INVALID_STATE); /* step complete */
  assert_int_equal(kvc_attend(c, 1, t.q, t.out, 0.25f, NULL), KVC_OK);
  /* Freeing a sequence of the finished step closes the plan: its pages may be gone. */
  assert_int_equal(kvc_seq_free(c, 2), KVC_OK);
  EXPECT_FAILS(c, kvc_attend(c, 1, t.q, t.out, 0.25f, NULL), KVC_ERR_INVALID_STATE);

  assert_int_equal(kvc_cache_synchronize(NULL), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_cache_validate(NULL), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_cache_synchronize(c), KVC_OK);
  kvc_cache_destroy(c);
}

static int prom_line_ok(const char *line, size_t n) {
  if (n >= 2 && line[0] == '#')
    return strncmp(line, "# HELP kvc_", 11) == 0 || strncmp(line, "# TYPE kvc_", 11) == 0;
  if (strncmp(line, "kvc_", 4) != 0) return 0;
  const char *sp = memchr(line, ' ', n);
  if (!sp || sp + 1 >= line + n) return 0;
  char num[64];
  size_t m = (size_t)(line + n - sp - 1);
  if (m >= sizeof(num)) return 0;
  memcpy(num, sp + 1, m);
  num[m] = 0;
  char *end;
  strtod(num, &end);
  return *end == 0;
}

static void stats_prometheus_and_events(void **state) {
  (void)state;
  kvc_cache_t *c = fixture();
  kvc_stats_t st;
  st.struct_size = 8;
  assert_int_equal(kvc_get_stats(c, &st), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_get_stats(NULL, &st), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_get_stats(c, NULL), KVC_ERR_INVALID_ARGUMENT);
  st.struct_size = sizeof(st);
  assert_int_equal(kvc_get_stats(c, &st), KVC_OK);
  assert_int_equal(st.live_seqs, 3);
  assert_int_equal(st.swapped_seqs, 1);
  assert_int_equal(st.swap_outs, 1);
  assert_true(st.page_bytes <= st.page_alloc_bytes);
  assert_true(st.free_bytes + st.reserved_bytes <= st.pool_bytes);
  assert_true(st.metadata_bytes > 0);

  size_t needed = 0;
  assert_int_equal(kvc_stats_prometheus(NULL, NULL, 0, &needed), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_stats_prometheus(c, NULL, 0, NULL), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_stats_prometheus(c, NULL, 10, &needed), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_stats_prometheus(c, NULL, 0, &needed), KVC_ERR_INVALID_ARGUMENT);
  assert_true(needed > 200);
  char *buf = malloc(needed + 1);
  assert_non_null(buf);
  memset(buf, 'x', needed + 1);
  size_t again = 0;
  assert_int_equal(kvc_stats_prometheus(c, buf, needed, &again), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(again, needed);
  for (size_t i = 0; i <= needed; i++) assert_int_equal(buf[i], 'x'); /* nothing written */
  assert_int_equal(kvc_stats_prometheus(c, buf, needed + 1, &again), KVC_OK);
  assert_int_equal(strlen(buf), needed);
  assert_non_null(strstr(buf, "# TYPE kvc_pool_bytes gauge\nkvc_pool_bytes "));
  assert_non_null(strstr(buf, "# TYPE kvc_swap_outs_total counter\nkvc_swap_outs_total 1\n"));
  assert_non_null(strstr(buf, "kvc_live_sequences 3\n"));
  assert_non_null(strstr(buf, "kvc_pages{codec=\"huffman\"} "));
  for (const char *line = buf; *line;) {
    const char *nl = strchr(line, '\n');
    assert_non_null(nl);
    if (!prom_line_ok(line, (size_t)(nl - line)))
      fail_msg("bad exposition line: %.*s", (int)(nl - line), line);
    line = nl + 1;
  }
  free(buf);

  int n = -1;
  kvc_event_t ev[4];
  assert_int_equal(kvc_poll_events(NULL, ev, 4, &n, NULL), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_poll_events(c, ev, 4, NULL, NULL), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_poll_events(c, ev, -1, &n, NULL), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_poll_events(c, NULL, 4, &n, NULL), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_poll_events(c, NULL, 0, &n, NULL), KVC_OK);
  assert_int_equal(n, 0);
  /* The fixture completed blocks (stored) and freed sequence 4's only block (removed). */
  int64_t dropped = -1;
  int stored = 0, removed = 0;
  do {
    assert_int_equal(kvc_poll_events(c, ev, 4, &n, &dropped), KVC_OK);
    assert_int_equal(dropped, 0);
    for (int i = 0; i < n; i++) {
      stored += ev[i].kind == KVC_EVENT_BLOCK_STORED;
      removed += ev[i].kind == KVC_EVENT_BLOCK_REMOVED;
    }
  } while (n == 4);
  assert_int_equal(stored, 2 + 1); /* 40 tokens: 2 full blocks; 20 tokens: 1 */
  assert_int_equal(removed, 1);
  kvc_cache_destroy(c);
}

static void event_queue_keeps_the_newest(void **state) {
  (void)state;
  kvc_config_t cfg = base_config();
  cfg.codec = KVC_CODEC_RAW;
  cfg.prefix_caching = 0;
  cfg.max_batch_tokens = 2048;
  cfg.pool_bytes = (size_t)4 << 20;
  kvc_cache_t *c = NULL;
  assert_int_equal(kvc_cache_create(&cfg, &c), KVC_OK);
  static uint16_t k[2048 * ROW], v[2048 * ROW];
  const int blocks = 2048 / BT, rounds = 65536 / (2 * blocks) + 4;
  int cached = 0;
  for (int i = 0; i < rounds; i++) {
    kvc_seq_id_t id = 1000 + (kvc_seq_id_t)i;
    int32_t n = 2048;
    assert_int_equal(kvc_seq_add(c, id, NULL, 0, 0, &cached), KVC_OK);
    assert_int_equal(kvc_seq_reserve(c, id, n, 0), KVC_OK);
    kvc_batch_t b = {1, &id, &n, NULL};
    assert_int_equal(kvc_plan(c, &b, NULL), KVC_OK);
    for (int l = 0; l < LAYERS; l++) assert_int_equal(kvc_store(c, l, k, v, NULL), KVC_OK);
    assert_int_equal(kvc_seq_free(c, id), KVC_OK); /* one STORED then one REMOVED per block */
  }
  const int64_t total = (int64_t)rounds * 2 * blocks;
  kvc_event_t *ev = malloc(70000 * sizeof(*ev));
  assert_non_null(ev);
  int n = 0;
  int64_t dropped = 0;
  assert_int_equal(kvc_poll_events(c, ev, 70000, &n, &dropped), KVC_OK);
  assert_int_equal(n, 65536);
  assert_int_equal(dropped, total - 65536);
  /* Oldest kept first: the newest event is the last round's last removal. */
  assert_int_equal(ev[n - 1].kind, KVC_EVENT_BLOCK_REMOVED);
  assert_int_equal(ev[n - 1 - blocks].kind, KVC_EVENT_BLOCK_STORED);
  assert_int_equal(kvc_poll_events(c, ev, 70000, &n, &dropped), KVC_OK);
  assert_int_equal(n, 0);
  assert_int_equal(dropped, 0);
  free(ev);
  kvc_cache_destroy(c);
}

/* ---- fault injection ------------------------------------------------------------------------ */

static void create_survives_every_allocation_failure(void **state) {
  (void)state;
  kvc_config_t cfg = base_config();
  int failures = 0;
  for (int64_t n = 0;; n++) {
    kvc_cache_t *c = NULL;
    kvc_status_t st = kvc__cache_create_faulty(&cfg, n, &c);
    if (st == KVC_OK) {
      assert_int_equal(kvc_cache_validate(c), KVC_OK);
      kvc_cache_destroy(c);
      break;
    }
    assert_int_equal(st, KVC_ERR_OUT_OF_HOST_MEMORY);
    assert_null(c);
    failures++;
    assert_true(n < 1000);
  }
  assert_true(failures > 10); /* the cache, its arrays, the block manager, the backend */
}

typedef kvc_status_t (*op_fn)(kvc_cache_t *c);

static kvc_status_t op_add_prompt(kvc_cache_t *c) {
  int32_t tok[100];
  int cached = 0;
  for (int i = 0; i < 100; i++) tok[i] = i;
  return kvc_seq_add(c, 7, tok, 100, 0, &cached);
}
static kvc_status_t op_reserve(kvc_cache_t *c) { return kvc_seq_reserve(c, 1, 8 + 2000, 0); }
static kvc_status_t op_fork(kvc_cache_t *c) { return kvc_seq_fork(c, 1, 7); }
static kvc_status_t op_swap_out(kvc_cache_t *c) { return kvc_seq_swap_out(c, 1, NULL); }
static kvc_status_t op_swap_in(kvc_cache_t *c) { return kvc_seq_swap_in(c, 3, NULL); }
static kvc_status_t op_free(kvc_cache_t *c) { return kvc_seq_free(c, 1); }
static kvc_status_t op_plan(kvc_cache_t *c) {
  kvc_seq_id_t id = 1;
  int32_t n = 8;
  kvc_batch_t b = {1, &id, &n, NULL};
  return kvc_plan(c, &b, NULL);
}

static void hooks_survive_every_allocation_failure(void **state) {
  (void)state;
  /* Hooks that grow host tables allocate; the others must not need to (they cannot fail then). */
  const struct {
    const char *name;
    op_fn op;
    int allocates;
  } ops[] = {{"add", op_add_prompt, 1},    {"reserve", op_reserve, 1}, {"fork", op_fork, 1},
             {"swap_out", op_swap_out, 0}, {"swap_in", op_swap_in, 0}, {"free", op_free, 0},
             {"plan", op_plan, 0}};
  for (size_t i = 0; i < sizeof(ops) / sizeof(ops[0]); i++) {
    kvc_cache_t *c = fixture();
    kvc_host_alloc_t *ha = kvc__cache_host_alloc(c);
    int64_t n = 0;
    for (;; n++) {
      snap_t before;
      take(c, &before);
      kvc_host_alloc_fail_after(ha, n);
      kvc_status_t st = ops[i].op(c);
      kvc_host_alloc_fail_after(ha, -1);
      if (st == KVC_OK) break;
      if (st != KVC_ERR_OUT_OF_HOST_MEMORY)
        fail_msg("%s with allocation %lld failing: %s", ops[i].name, (long long)n,
                 kvc_status_string(st));
      assert_unchanged(c, &before, ops[i].name);
      assert_true(n < 100);
    }
    if ((n > 0) != ops[i].allocates)
      fail_msg("%s: %lld allocations failed in turn", ops[i].name, (long long)n);
    assert_int_equal(kvc_cache_validate(c), KVC_OK);
    kvc_cache_destroy(c);
  }
}

/* ---- threads -------------------------------------------------------------------------------- */

typedef struct reader {
  kvc_cache_t *c;
  atomic_int stop;
  int reads;
  int bad;
} reader_t;

static void *read_stats(void *arg) {
  reader_t *r = arg;
  char *buf = malloc(1 << 16);
  while (!atomic_load(&r->stop) && buf) {
    kvc_stats_t st = {.struct_size = sizeof(st)};
    size_t needed = 0;
    if (kvc_get_stats(r->c, &st) != KVC_OK || st.page_bytes > st.page_alloc_bytes ||
        st.free_bytes + st.reserved_bytes > st.pool_bytes || st.live_seqs < 0 ||
        st.live_seqs > MAX_SEQS)
      r->bad++;
    if (kvc_stats_prometheus(r->c, buf, 1 << 16, &needed) != KVC_OK || strlen(buf) != needed)
      r->bad++;
    r->reads++;
  }
  free(buf);
  return NULL;
}

static void stats_from_another_thread(void **state) {
  (void)state;
  kvc_config_t cfg = base_config();
  kvc_cache_t *c = NULL;
  assert_int_equal(kvc_cache_create(&cfg, &c), KVC_OK);
  reader_t r = {c, 0, 0, 0};
  pthread_t th;
  assert_int_equal(pthread_create(&th, NULL, read_stats, &r), 0);
  int cached = 0;
  for (int round = 0; round < 40; round++) {
    kvc_seq_id_t id = 100 + (kvc_seq_id_t)round;
    assert_int_equal(kvc_seq_add(c, id, NULL, 0, 0, &cached), KVC_OK);
    grow(c, id, 1 + round % 37);
    grow(c, id, 1);
    if (round % 3 == 0) assert_int_equal(kvc_seq_free(c, id), KVC_OK);
    if (round % 3 == 1) assert_int_equal(kvc_seq_swap_out(c, id, NULL), KVC_OK);
    if (round % 3 == 2) {
      assert_int_equal(kvc_seq_free(c, id - 1), KVC_OK);
      assert_int_equal(kvc_seq_free(c, id), KVC_OK);
    }
  }
  atomic_store(&r.stop, 1);
  assert_int_equal(pthread_join(th, NULL), 0);
  assert_int_equal(r.bad, 0);
  assert_true(r.reads > 0);
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  kvc_cache_destroy(c);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(create_rejects_bad_configs),
      cmocka_unit_test(create_rejects_cuda_block_sizes),
      cmocka_unit_test(config_round_trip),
      cmocka_unit_test(hooks_reject_bad_input),
      cmocka_unit_test(max_seqs_and_swap_in_without_room),
      cmocka_unit_test(steps_reject_bad_input_and_order),
      cmocka_unit_test(stats_prometheus_and_events),
      cmocka_unit_test(event_queue_keeps_the_newest),
      cmocka_unit_test(create_survives_every_allocation_failure),
      cmocka_unit_test(hooks_survive_every_allocation_failure),
      cmocka_unit_test(stats_from_another_thread),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
