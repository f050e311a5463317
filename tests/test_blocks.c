/* The block manager, operation by operation: results, device work, statistics, and for every bad
 * input its status with the whole observable state unchanged. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "allocator/kvc_pool_layout.h"
#include "test_blocks_util.h"

typedef struct fx {
  kvc_host_alloc_t *ha;
  kvc_bm_t *bm;
  tb_events_t ev;
  kvc_bm_work_t w;
  kvc_bm_plan_t plan;
} fx_t;

static fx_t *fx_new(const kvc_bm_config_t *cfg) {
  fx_t *f = calloc(1, sizeof(*f));
  assert_non_null(f);
  assert_int_equal(kvc_host_alloc_create(&f->ha), KVC_OK);
  assert_int_equal(kvc_bm_create(cfg, f->ha, &f->bm), KVC_OK);
  kvc_bm_set_event_sink(f->bm, tb_on_event, &f->ev);
  TB_ASSERT_VALID(f->bm);
  return f;
}

static void fx_free(fx_t *f) {
  TB_ASSERT_VALID(f->bm);
  kvc_bm_destroy(f->bm);
  assert_int_equal(kvc_host_alloc_bytes(f->ha), 0);
  kvc_host_alloc_destroy(f->ha);
  free(f);
}

static int add(fx_t *f, kvc_seq_id_t id, const int32_t *tok, int n, uint64_t salt) {
  int cached = -1;
  assert_int_equal(kvc_bm_seq_add(f->bm, id, tok, n, salt, &cached, &f->w), KVC_OK);
  TB_ASSERT_VALID(f->bm);
  return cached;
}

static void reserve(fx_t *f, kvc_seq_id_t id, int n) {
  assert_int_equal(kvc_bm_seq_reserve(f->bm, id, n, 0, &f->w), KVC_OK);
  TB_ASSERT_VALID(f->bm);
}

/* One sequence, n tokens (token ids optional), planned and completed. */
static const kvc_bm_plan_t *step1(fx_t *f, kvc_seq_id_t id, int n, const int32_t *tok) {
  int32_t nn = n;
  kvc_bm_batch_t b = {1, &id, &nn, tok};
  assert_int_equal(kvc_bm_plan(f->bm, &b, &f->plan), KVC_OK);
  TB_ASSERT_VALID(f->bm);
  kvc_bm_step_done(f->bm);
  return &f->plan;
}

static kvc_bm_stats_t stats(fx_t *f) {
  kvc_bm_stats_t s;
  kvc_bm_get_stats(f->bm, &s);
  return s;
}

static void iota(int32_t *t, int n, int32_t base) {
  for (int i = 0; i < n; i++) t[i] = base + i;
}

/* Asserts that `call` returns `status` and leaves the state of `ids` and the stats as they were. */
#define EXPECT_UNCHANGED(f, ids, nids, status, call)                                               \
  do {                                                                                             \
    static tb_snap_t before_, after_;                                                              \
    tb_snap((f)->bm, (ids), (nids), &before_);                                                     \
    int events_ = (f)->ev.n;                                                                       \
    assert_int_equal((call), (status));                                                            \
    tb_snap((f)->bm, (ids), (nids), &after_);                                                      \
    tb_snap_assert_equal(&before_, &after_);                                                       \
    assert_int_equal((f)->ev.n, events_);                                                          \
    TB_ASSERT_VALID((f)->bm);                                                                      \
  } while (0)

/* ---- creation ------------------------------------------------------------------------------ */

static void create_rejects_bad_configs(void **state) {
  (void)state;
  kvc_host_alloc_t *ha;
  assert_int_equal(kvc_host_alloc_create(&ha), KVC_OK);
  kvc_bm_t *bm = NULL;
  kvc_bm_config_t c = tb_config();
  assert_int_equal(kvc_bm_create(NULL, ha, &bm), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_bm_create(&c, NULL, &bm), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_bm_create(&c, ha, NULL), KVC_ERR_INVALID_ARGUMENT);
  struct {
    const char *what;
    kvc_bm_config_t c;
  } bad[16];
  int n = 0;
#define BAD(field, value)                                                                          \
  do {                                                                                             \
    bad[n].what = #field "=" #value;                                                               \
    bad[n].c = tb_config();                                                                        \
    bad[n].c.field = value;                                                                        \
    n++;                                                                                           \
  } while (0)
  BAD(num_layers, 0);
  BAD(block_tokens, 0);
  BAD(block_tokens, 6);
  BAD(block_tokens, 8192);
  BAD(max_seqs, 0);
  BAD(max_seq_len, 0);
  BAD(max_blocks, 0);
  BAD(staging_chunks, 0);
  BAD(worst_page_chunks, 1);   /* below staging_chunks */
  BAD(worst_page_chunks, KVC_PAGE_MAX_CHUNKS + 1);
  BAD(watermark, -0.1f);
  BAD(watermark, 1.0f);
  BAD(max_batch_tokens, 0);
  BAD(total_chunks, 7);        /* pool too small for one block (2 layers x 4 chunks) */
  BAD(watermark, 0.99f);       /* the watermark leaves no room for one block */
#undef BAD
  for (int i = 0; i < n; i++) {
    bm = NULL;
    if (kvc_bm_create(&bad[i].c, ha, &bm) != KVC_ERR_INVALID_ARGUMENT)
      fail_msg("accepted %s", bad[i].what);
    assert_null(bm);
  }
  assert_int_equal(kvc_host_alloc_bytes(ha), 0);
  /* Exactly one block fits: accepted. */
  c.total_chunks = 8;
  assert_int_equal(kvc_bm_create(&c, ha, &bm), KVC_OK);
  kvc_bm_destroy(bm);
  assert_int_equal(kvc_host_alloc_bytes(ha), 0);
  kvc_host_alloc_destroy(ha);
}

/* ---- add / reserve -------------------------------------------------------------------------- */

static void add_checks_ids_and_limits(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  c.max_seqs = 2;
  fx_t *f = fx_new(&c);
  kvc_seq_id_t ids[] = {1, 2, 3, KVC_SEQ_NONE};
  int32_t tok[65];
  iota(tok, 65, 100);
  int cached = -1;
  assert_int_equal(add(f, 1, tok, 5, 0), 0);
  kvc_seq_info_t info;
  assert_int_equal(kvc_bm_seq_info(f->bm, 1, &info), KVC_OK);
  assert_int_equal(info.length, 0);
  assert_int_equal(info.reserved, 0);
  assert_int_equal(info.num_blocks, 0);
  assert_int_equal(info.state, KVC_SEQ_RUNNING);
  EXPECT_UNCHANGED(f, ids, 4, KVC_ERR_INVALID_ARGUMENT,
                   kvc_bm_seq_add(f->bm, 1, tok, 5, 0, &cached, &f->w));
  EXPECT_UNCHANGED(f, ids, 4, KVC_ERR_INVALID_ARGUMENT,
                   kvc_bm_seq_add(f->bm, KVC_SEQ_NONE, tok, 5, 0, &cached, &f->w));
  EXPECT_UNCHANGED(f, ids, 4, KVC_ERR_INVALID_ARGUMENT,
                   kvc_bm_seq_add(f->bm, 2, tok, 65, 0, &cached, &f->w));
  EXPECT_UNCHANGED(f, ids, 4, KVC_ERR_INVALID_ARGUMENT,
                   kvc_bm_seq_add(f->bm, 2, tok, -1, 0, &cached, &f->w));
  EXPECT_UNCHANGED(f, ids, 4, KVC_ERR_INVALID_ARGUMENT,
                   kvc_bm_seq_add(f->bm, 2, NULL, 3, 0, &cached, &f->w));
  assert_int_equal(add(f, 2, NULL, 0, 0), 0);
  EXPECT_UNCHANGED(f, ids, 4, KVC_ERR_OUT_OF_MEMORY,
                   kvc_bm_seq_add(f->bm, 3, tok, 5, 0, &cached, &f->w));
  assert_int_equal(kvc_bm_seq_info(f->bm, 3, &info), KVC_ERR_NOT_FOUND);
  assert_int_equal(stats(f).live_seqs, 2);
  fx_free(f);
}

static void reserve_charges_worst_case_blocks(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  fx_t *f = fx_new(&c);
  kvc_seq_id_t ids[] = {1, 2};
  add(f, 1, NULL, 0, 0);
  reserve(f, 1, 10); /* 3 blocks of 4 tokens, 8 chunks each */
  kvc_bm_stats_t s = stats(f);
  assert_int_equal(s.reserved_chunks, 24);
  assert_int_equal(s.free_chunks, 512 - 24);
  assert_int_equal(s.charged_chunks, 0);
  kvc_seq_info_t info;
  kvc_bm_seq_info(f->bm, 1, &info);
  assert_int_equal(info.reserved, 10);
  /* Growing within the third block costs nothing; asking for less never shrinks. */
  reserve(f, 1, 12);
  assert_int_equal(stats(f).reserved_chunks, 24);
  reserve(f, 1, 2);
  kvc_bm_seq_info(f->bm, 1, &info);
  assert_int_equal(info.reserved, 12);
  assert_int_equal(kvc_bm_seq_reserve(f->bm, 1, 10, 3, &f->w), KVC_OK);
  kvc_bm_seq_info(f->bm, 1, &info);
  assert_int_equal(info.reserved, 13);
  assert_int_equal(stats(f).reserved_chunks, 32);

  EXPECT_UNCHANGED(f, ids, 2, KVC_ERR_INVALID_ARGUMENT, kvc_bm_seq_reserve(f->bm, 1, -1, 0, &f->w));
  EXPECT_UNCHANGED(f, ids, 2, KVC_ERR_INVALID_ARGUMENT, kvc_bm_seq_reserve(f->bm, 1, 0, -1, &f->w));
  EXPECT_UNCHANGED(f, ids, 2, KVC_ERR_NOT_FOUND, kvc_bm_seq_reserve(f->bm, 2, 1, 0, &f->w));
  /* Past max_seq_len (64), counting lookahead slots. */
  EXPECT_UNCHANGED(f, ids, 2, KVC_ERR_INVALID_ARGUMENT, kvc_bm_seq_reserve(f->bm, 1, 65, 0, &f->w));
  EXPECT_UNCHANGED(f, ids, 2, KVC_ERR_INVALID_ARGUMENT, kvc_bm_seq_reserve(f->bm, 1, 60, 5, &f->w));
  reserve(f, 1, 64);
  assert_int_equal(stats(f).reserved_chunks, 16 * 8);
  fx_free(f);
}

static void reserve_fails_cleanly_when_the_pool_is_full(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  c.total_chunks = 40; /* five unmeasured blocks */
  fx_t *f = fx_new(&c);
  kvc_seq_id_t ids[] = {1, 2};
  add(f, 1, NULL, 0, 0);
  add(f, 2, NULL, 0, 0);
  reserve(f, 1, 12);
  EXPECT_UNCHANGED(f, ids, 2, KVC_ERR_OUT_OF_MEMORY, kvc_bm_seq_reserve(f->bm, 2, 9, 0, &f->w));
  reserve(f, 2, 8);
  assert_int_equal(stats(f).free_chunks, 0);
  EXPECT_UNCHANGED(f, ids, 2, KVC_ERR_OUT_OF_MEMORY, kvc_bm_seq_reserve(f->bm, 1, 13, 0, &f->w));
  fx_free(f);
}

static void block_ids_are_a_resource_too(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  c.max_blocks = 3; /* plenty of chunks, three ids */
  fx_t *f = fx_new(&c);
  kvc_seq_id_t ids[] = {1};
  add(f, 1, NULL, 0, 0);
  reserve(f, 1, 12);
  EXPECT_UNCHANGED(f, ids, 1, KVC_ERR_OUT_OF_MEMORY, kvc_bm_seq_reserve(f->bm, 1, 13, 0, &f->w));
  assert_int_equal(kvc_bm_tokens_fit(f->bm), 0);
  fx_free(f);
}

static void watermark_applies_to_admission_only(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  c.total_chunks = 100;
  c.watermark = 0.2f; /* 20 chunks */
  fx_t *f = fx_new(&c);
  kvc_seq_id_t ids[] = {1, 2};
  add(f, 1, NULL, 0, 0);
  reserve(f, 1, 32); /* 8 blocks: 64 chunks, 36 left >= 20 */
  step1(f, 1, 1, NULL);
  add(f, 2, NULL, 0, 0);
  /* Admitting 2 blocks (16 chunks) would leave 20: allowed; 3 blocks would leave 12: refused. */
  EXPECT_UNCHANGED(f, ids, 2, KVC_ERR_OUT_OF_MEMORY, kvc_bm_seq_reserve(f->bm, 2, 12, 0, &f->w));
  /* The running sequence may use the headroom. */
  reserve(f, 1, 47); /* to 48 tokens: 4 more blocks */
  assert_int_equal(stats(f).free_chunks, 100 - 64 - 32);
  EXPECT_UNCHANGED(f, ids, 2, KVC_ERR_OUT_OF_MEMORY, kvc_bm_seq_reserve(f->bm, 2, 1, 0, &f->w));
  kvc_bm_work_t w;
  assert_int_equal(kvc_bm_seq_free(f->bm, 1, &w), KVC_OK);
  reserve(f, 2, 12);
  /* tokens_fit: (free - watermark) over a worst-case block, before any page is measured. */
  assert_int_equal(kvc_bm_tokens_fit(f->bm), (100 - 24 - 20) / 8 * 4);
  fx_free(f);
}

/* ---- plan -------------------------------------------------------------------------------- */

static void plan_prefill_then_decode(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  fx_t *f = fx_new(&c);
  add(f, 7, NULL, 0, 0);
  reserve(f, 7, 10);
  const kvc_bm_plan_t *p = step1(f, 7, 10, NULL);
  assert_int_equal(p->num_seqs, 1);
  assert_int_equal(p->total_rows, 10);
  assert_int_equal(p->max_kv_len, 10);
  assert_int_equal(p->qo_indptr[0], 0);
  assert_int_equal(p->qo_indptr[1], 10);
  assert_int_equal(p->kv_len[0], 10);
  assert_int_equal(p->block_indptr[1], 3);
  int32_t b0 = p->block_ids[0], b1 = p->block_ids[1], b2 = p->block_ids[2];
  assert_true(b0 != b1 && b1 != b2 && b0 != b2);
  for (int r = 0; r < 10; r++) {
    assert_int_equal(p->row_block[r], p->block_ids[r / 4]);
    assert_int_equal(p->row_slot[r], r % 4);
  }
  assert_int_equal(p->num_jobs, 2);
  assert_int_equal(p->job_block[0], b0);
  assert_int_equal(p->job_block[1], b1);
  assert_int_equal(p->job_staged[0], 0);
  assert_int_equal(p->job_staged[1], 0);
  assert_int_equal(p->num_new_staging, 1);
  assert_int_equal(p->new_staging[0], b2);
  kvc_bm_stats_t s = stats(f);
  assert_int_equal(s.charged_chunks, 24);
  assert_int_equal(s.unmeasured_chunks, 24);
  assert_int_equal(s.reserved_chunks, 0);
  assert_int_equal(s.active_blocks, 3);
  assert_int_equal(s.tokens_stored, 10);
  assert_int_equal(s.staging_blocks, 1);

  /* Decode: the tail fills at token 12; its job notes the 3 rows it held before. */
  reserve(f, 7, 1);
  assert_int_equal(stats(f).reserved_chunks, 0);
  p = step1(f, 7, 1, NULL);
  assert_int_equal(p->num_jobs, 0);
  assert_int_equal(p->row_block[0], b2);
  assert_int_equal(p->row_slot[0], 2);
  assert_int_equal(p->num_new_staging, 0);
  reserve(f, 7, 1);
  p = step1(f, 7, 1, NULL);
  assert_int_equal(p->num_jobs, 1);
  assert_int_equal(p->job_block[0], b2);
  assert_int_equal(p->job_staged[0], 3);
  assert_int_equal(p->row_block[0], b2);
  assert_int_equal(p->row_slot[0], 3);
  assert_int_equal(p->num_new_staging, 0);
  assert_int_equal(stats(f).staging_blocks, 0);
  /* The next token opens a fresh block, taken out of the reservation. */
  reserve(f, 7, 1);
  assert_int_equal(stats(f).reserved_chunks, 8);
  p = step1(f, 7, 1, NULL);
  assert_int_equal(stats(f).reserved_chunks, 0);
  assert_int_equal(p->block_indptr[1], 4);
  assert_int_equal(p->num_new_staging, 1);
  assert_int_equal(p->new_staging[0], p->block_ids[3]);
  assert_true(p->step >= 4);
  fx_free(f);
}

static void plan_batch_builds_csr_for_all(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  fx_t *f = fx_new(&c);
  kvc_seq_id_t id[3] = {10, 11, 12};
  int32_t nn[3] = {5, 1, 8};
  for (int i = 0; i < 3; i++) {
    add(f, id[i], NULL, 0, 0);
    reserve(f, id[i], nn[i]);
  }
  kvc_bm_batch_t b = {3, id, nn, NULL};
  assert_int_equal(kvc_bm_plan(f->bm, &b, &f->plan), KVC_OK);
  const kvc_bm_plan_t *p = &f->plan;
  assert_int_equal(p->total_rows, 14);
  assert_int_equal(p->max_kv_len, 8);
  int32_t qo[] = {0, 5, 6, 14}, bi[] = {0, 2, 3, 5};
  for (int i = 0; i < 4; i++) {
    assert_int_equal(p->qo_indptr[i], qo[i]);
    assert_int_equal(p->block_indptr[i], bi[i]);
  }
  assert_int_equal(p->num_jobs, 3); /* 10's first block and both of 12's */
  assert_int_equal(p->num_new_staging, 2);
  for (int i = 0; i < 3; i++) {
    const int32_t *t;
    int n;
    assert_int_equal(kvc_bm_seq_blocks(f->bm, id[i], &t, &n), KVC_OK);
    assert_int_equal(n, bi[i + 1] - bi[i]);
    assert_memory_equal(t, p->block_ids + bi[i], (size_t)n * sizeof(int32_t));
  }
  kvc_bm_step_done(f->bm);
  fx_free(f);
}

static void plan_rejects_bad_batches(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  c.max_batch_tokens = 16;
  fx_t *f = fx_new(&c);
  kvc_seq_id_t ids[] = {1, 2, 3};
  add(f, 1, NULL, 0, 0);
  add(f, 2, NULL, 0, 0);
  reserve(f, 1, 20);
  reserve(f, 2, 4);
  kvc_seq_id_t id2[2] = {1, 2}, dup[2] = {1, 1}, unknown[2] = {1, 3};
  int32_t ok[2] = {1, 1}, zero[2] = {1, 0}, over[2] = {1, 5}, big[2] = {17, 1};
  kvc_bm_batch_t b;
#define BATCH(n, s, t) (b = (kvc_bm_batch_t){(n), (s), (t), NULL}, &b)
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_ARGUMENT, kvc_bm_plan(f->bm, BATCH(0, id2, ok), &f->plan));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_ARGUMENT, kvc_bm_plan(f->bm, BATCH(9, id2, ok), &f->plan));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_ARGUMENT, kvc_bm_plan(f->bm, BATCH(2, dup, ok), &f->plan));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_NOT_FOUND, kvc_bm_plan(f->bm, BATCH(2, unknown, ok), &f->plan));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_ARGUMENT, kvc_bm_plan(f->bm, BATCH(2, id2, zero), &f->plan));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_ARGUMENT, kvc_bm_plan(f->bm, BATCH(2, id2, over), &f->plan));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_ARGUMENT, kvc_bm_plan(f->bm, BATCH(2, id2, big), &f->plan));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_ARGUMENT, kvc_bm_plan(f->bm, NULL, &f->plan));
  /* A failed plan leaves no trace: the same sequences plan fine afterwards. */
  assert_int_equal(kvc_bm_plan(f->bm, BATCH(2, id2, ok), &f->plan), KVC_OK);
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_STATE, kvc_bm_plan(f->bm, BATCH(2, id2, ok), &f->plan));
  kvc_bm_step_done(f->bm);
#undef BATCH
  fx_free(f);
}

static void plan_never_allocates(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  fx_t *f = fx_new(&c);
  add(f, 1, NULL, 0, 0);
  reserve(f, 1, 40);
  kvc_host_alloc_fail_after(f->ha, 0);
  for (int i = 0; i < 10; i++) step1(f, 1, 4, NULL);
  kvc_host_alloc_fail_after(f->ha, -1);
  fx_free(f);
}

static void steps_block_calls_on_their_sequences(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  fx_t *f = fx_new(&c);
  kvc_seq_id_t ids[] = {1, 2, 3};
  add(f, 1, NULL, 0, 0);
  add(f, 2, NULL, 0, 0);
  reserve(f, 1, 8);
  reserve(f, 2, 8);
  step1(f, 1, 2, NULL);
  step1(f, 2, 2, NULL);
  kvc_seq_id_t one = 1;
  int32_t n1 = 1;
  kvc_bm_batch_t b = {1, &one, &n1, NULL};
  assert_int_equal(kvc_bm_plan(f->bm, &b, &f->plan), KVC_OK);
  assert_true(kvc_bm_step_open(f->bm));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_STATE, kvc_bm_seq_reserve(f->bm, 1, 1, 0, &f->w));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_STATE, kvc_bm_seq_fork(f->bm, 1, 3, &f->w));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_STATE, kvc_bm_seq_free(f->bm, 1, &f->w));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_STATE, kvc_bm_seq_swap_out(f->bm, 1, KVC_OK, &f->w));
  kvc_seq_info_t info;
  kvc_bm_seq_info(f->bm, 1, &info);
  assert_int_equal(info.length, 3); /* planned tokens count */
  /* Sequences outside the step are free to change. */
  reserve(f, 2, 3);
  assert_int_equal(kvc_bm_seq_fork(f->bm, 2, 3, &f->w), KVC_OK);
  assert_int_equal(kvc_bm_seq_free(f->bm, 3, &f->w), KVC_OK);
  kvc_bm_step_done(f->bm);
  assert_false(kvc_bm_step_open(f->bm));
  assert_int_equal(kvc_bm_seq_fork(f->bm, 1, 3, &f->w), KVC_OK);
  assert_int_equal(kvc_bm_seq_free(f->bm, 1, &f->w), KVC_OK);
  fx_free(f);
}

/* ---- free --------------------------------------------------------------------------------- */

static void free_returns_blocks_and_double_free_is_not_found(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  c.prefix_caching = 0;
  fx_t *f = fx_new(&c);
  kvc_seq_id_t ids[] = {1, 2};
  add(f, 1, NULL, 0, 0);
  reserve(f, 1, 20);
  const kvc_bm_plan_t *p = step1(f, 1, 10, NULL);
  int32_t blocks[3];
  memcpy(blocks, p->block_ids, sizeof(blocks));
  assert_int_equal(kvc_bm_seq_free(f->bm, 1, &f->w), KVC_OK);
  assert_int_equal(f->w.num_free, 3);
  for (int i = 0; i < 3; i++) assert_int_equal(f->w.free_blocks[i], blocks[2 - i]);
  assert_int_equal(f->w.copy_src, -1);
  assert_int_equal(f->w.num_swap, 0);
  kvc_bm_stats_t s = stats(f);
  assert_int_equal(s.free_chunks, 512);
  assert_int_equal(s.free_block_ids, 64);
  assert_int_equal(s.tokens_stored, 0);
  assert_int_equal(s.cached_blocks, 0);
  assert_int_equal(f->ev.n, 2 + 3); /* 2 stored, 3 removed */
  assert_int_equal(f->ev.kind[4], KVC_EVENT_BLOCK_REMOVED);
  EXPECT_UNCHANGED(f, ids, 2, KVC_ERR_NOT_FOUND, kvc_bm_seq_free(f->bm, 1, &f->w));
  EXPECT_UNCHANGED(f, ids, 2, KVC_ERR_NOT_FOUND, kvc_bm_seq_free(f->bm, 2, &f->w));
  fx_free(f);
}

/* ---- prefix cache ------------------------------------------------------------------------- */

static void prefix_hit_attaches_whole_blocks(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  fx_t *f = fx_new(&c);
  int32_t tok[13];
  iota(tok, 13, 1000);
  assert_int_equal(add(f, 1, tok, 13, 0), 0);
  reserve(f, 1, 13);
  step1(f, 1, 13, NULL); /* token ids come from the prompt */
  assert_int_equal(f->ev.n, 3);
  for (int i = 0; i < 3; i++) {
    assert_int_equal(f->ev.kind[i], KVC_EVENT_BLOCK_STORED);
    assert_int_not_equal(f->ev.hash[i], 0);
  }
  /* The hash chains through the blocks and covers the codec identity and salt. */
  uint64_t h0 = kvc_bm_block_hash(0, tok, 4, c.codec_identity, 0);
  assert_int_equal(f->ev.hash[0], h0);
  assert_int_equal(f->ev.hash[1], kvc_bm_block_hash(h0, tok + 4, 4, c.codec_identity, 0));
  const int32_t *t1;
  int n1;
  kvc_bm_seq_blocks(f->bm, 1, &t1, &n1);
  int32_t first[4];
  memcpy(first, t1, sizeof(first));

  /* While 1 still runs, 2 shares its full blocks: never the whole prompt. */
  assert_int_equal(add(f, 2, tok, 13, 0), 12);
  assert_int_equal(add(f, 3, tok, 12, 0), 8);
  assert_int_equal(add(f, 4, tok, 3, 0), 0);
  kvc_seq_info_t info;
  kvc_bm_seq_info(f->bm, 2, &info);
  assert_int_equal(info.length, 12);
  assert_int_equal(info.reserved, 12);
  assert_int_equal(info.num_blocks, 3);
  assert_int_equal(info.shared_blocks, 3);
  const int32_t *t2;
  int n2;
  kvc_bm_seq_blocks(f->bm, 2, &t2, &n2);
  assert_memory_equal(t2, first, 3 * sizeof(int32_t));
  kvc_bm_stats_t s = stats(f);
  assert_int_equal(s.prefix_queries, 3 + 3 + 2 + 0);
  assert_int_equal(s.prefix_hits, 3 + 2);
  assert_int_equal(s.tokens_stored, 13);

  /* After every holder is freed the blocks stay cached, then come back on a hit. */
  kvc_seq_id_t all[] = {1, 2, 3, 4};
  for (int i = 0; i < 4; i++) assert_int_equal(kvc_bm_seq_free(f->bm, all[i], &f->w), KVC_OK);
  s = stats(f);
  assert_int_equal(s.cached_blocks, 3);
  assert_int_equal(s.cached_chunks, 24);
  assert_int_equal(s.active_blocks, 0);
  assert_int_equal(s.free_chunks, 512 - 24);
  assert_int_equal(add(f, 5, tok, 13, 0), 12);
  s = stats(f);
  assert_int_equal(s.cached_blocks, 0);
  assert_int_equal(s.active_blocks, 3);
  assert_int_equal(s.tokens_stored, 12);
  fx_free(f);
}

static void prefix_hit_respects_salt_and_codec_identity(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  fx_t *f = fx_new(&c);
  int32_t tok[9];
  iota(tok, 9, 7);
  add(f, 1, tok, 9, 42);
  reserve(f, 1, 9);
  step1(f, 1, 9, NULL);
  assert_int_equal(add(f, 2, tok, 9, 0), 0);
  assert_int_equal(add(f, 3, tok, 9, 43), 0);
  assert_int_equal(add(f, 4, tok, 9, 42), 8);
  /* A different codec identity yields different block hashes for the same tokens and salt. */
  assert_int_equal(f->ev.hash[0], kvc_bm_block_hash(0, tok, 4, c.codec_identity, 42));
  assert_int_not_equal(f->ev.hash[0], kvc_bm_block_hash(0, tok, 4, c.codec_identity + 1, 42));
  assert_int_not_equal(kvc_bm_block_hash(0, tok, 4, 1, 0), kvc_bm_block_hash(0, tok, 4, 2, 0));
  assert_int_not_equal(kvc_bm_block_hash(0, tok, 4, 1, 0), kvc_bm_block_hash(1, tok, 4, 1, 0));
  fx_free(f);

  /* And a manager with another identity reports other hashes for the same work. */
  kvc_bm_config_t c2 = tb_config();
  c2.codec_identity = c.codec_identity + 1;
  fx_t *g = fx_new(&c2);
  add(g, 1, tok, 9, 42);
  reserve(g, 1, 9);
  step1(g, 1, 9, NULL);
  assert_int_equal(g->ev.hash[0], kvc_bm_block_hash(0, tok, 4, c2.codec_identity, 42));
  fx_free(g);
}

static uint64_t constant_hash(uint64_t parent, const int32_t *tokens, int n, uint64_t identity,
                              uint64_t salt) {
  (void)parent, (void)tokens, (void)n, (void)identity, (void)salt;
  return 0x1234;
}

static void hash_collisions_never_alias(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  fx_t *f = fx_new(&c);
  kvc_bm_set_hash_fn(f->bm, constant_hash);
  /* x = [X1 X2 t], y = [Y1 X2 t]: every block hashes alike, and y's second block even has x's
   * second block's tokens. Only the chain (parent entry) tells them apart. */
  int32_t x[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9}, y[9] = {11, 12, 13, 14, 5, 6, 7, 8, 9};
  add(f, 1, x, 9, 0);
  reserve(f, 1, 9);
  step1(f, 1, 9, NULL);
  assert_int_equal(add(f, 2, y, 9, 0), 0);
  reserve(f, 2, 9);
  step1(f, 2, 9, NULL);
  const int32_t *bx, *by;
  int n;
  int32_t xb[2], yb[2];
  kvc_bm_seq_blocks(f->bm, 1, &bx, &n);
  memcpy(xb, bx, sizeof(xb));
  kvc_bm_seq_blocks(f->bm, 2, &by, &n);
  memcpy(yb, by, sizeof(yb));
  assert_int_equal(stats(f).active_blocks, 6);
  assert_int_equal(kvc_bm_seq_free(f->bm, 1, &f->w), KVC_OK);
  assert_int_equal(kvc_bm_seq_free(f->bm, 2, &f->w), KVC_OK);
  assert_int_equal(stats(f).cached_blocks, 4);
  assert_int_equal(add(f, 3, y, 9, 0), 8);
  assert_int_equal(add(f, 4, x, 9, 0), 8);
  kvc_bm_seq_blocks(f->bm, 3, &by, &n);
  assert_memory_equal(by, yb, sizeof(yb));
  kvc_bm_seq_blocks(f->bm, 4, &bx, &n);
  assert_memory_equal(bx, xb, sizeof(xb));
  /* A prompt that matches nothing still misses, hash or not. */
  int32_t z[9] = {1, 2, 3, 4, 99, 6, 7, 8, 9};
  assert_int_equal(add(f, 5, z, 9, 0), 4);
  fx_free(f);
}

static void identical_blocks_computed_twice_are_cached_once(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  fx_t *f = fx_new(&c);
  int32_t tok[5];
  iota(tok, 5, 50);
  add(f, 1, tok, 5, 0);
  add(f, 2, tok, 5, 0); /* nothing cached yet: both compute the same block */
  reserve(f, 1, 5);
  reserve(f, 2, 5);
  step1(f, 1, 5, NULL);
  step1(f, 2, 5, NULL);
  assert_int_not_equal(f->ev.hash[0], 0);
  assert_int_equal(f->ev.hash[1], 0); /* the duplicate is not a cache entry */
  assert_int_equal(kvc_bm_seq_free(f->bm, 2, &f->w), KVC_OK);
  assert_int_equal(f->w.num_free, 2);
  assert_int_equal(kvc_bm_seq_free(f->bm, 1, &f->w), KVC_OK);
  assert_int_equal(f->w.num_free, 1);
  assert_int_equal(stats(f).cached_blocks, 1);
  fx_free(f);
}

static void blocks_with_unknown_tokens_are_not_cached(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  fx_t *f = fx_new(&c);
  int32_t tok[4] = {1, 2, 3, 4}, more[4] = {5, 6, 7, 8};
  add(f, 1, tok, 2, 0);
  reserve(f, 1, 12);
  step1(f, 1, 2, NULL);       /* prompt tokens: known */
  step1(f, 1, 2, more);       /* batch token ids: known, completes block 0 */
  step1(f, 1, 4, NULL);       /* no ids, past the prompt: block 1 unknown */
  step1(f, 1, 4, more);       /* block 2's ids are known, but its prefix is not */
  assert_int_equal(f->ev.n, 3);
  assert_int_not_equal(f->ev.hash[0], 0);
  assert_int_equal(f->ev.hash[1], 0);
  assert_int_equal(f->ev.hash[2], 0);
  int32_t prompt[13] = {1, 2, 5, 6, 0, 0, 0, 0, 5, 6, 7, 8, 9};
  assert_int_equal(add(f, 2, prompt, 13, 0), 4);
  fx_free(f);
}

/* On a pool of seven unmeasured blocks: sequences 1 and 2 (prompts 100.. and 200.., 12 tokens
 * each stored) freed, so that their blocks ab and bb are cached, a's last first in eviction
 * order, then b's; one block is free. */
static void cache_two_prompts(fx_t *f, int32_t *a, int32_t ab[3], int32_t bb[3]) {
  int32_t b[13];
  iota(a, 13, 100);
  iota(b, 13, 200);
  add(f, 1, a, 13, 0);
  reserve(f, 1, 12);
  step1(f, 1, 12, NULL);
  add(f, 2, b, 13, 0);
  reserve(f, 2, 12);
  step1(f, 2, 12, NULL);
  const int32_t *t;
  int n;
  kvc_bm_seq_blocks(f->bm, 1, &t, &n);
  memcpy(ab, t, 3 * sizeof(int32_t));
  kvc_bm_seq_blocks(f->bm, 2, &t, &n);
  memcpy(bb, t, 3 * sizeof(int32_t));
  assert_int_equal(kvc_bm_seq_free(f->bm, 1, &f->w), KVC_OK);
  assert_int_equal(kvc_bm_seq_free(f->bm, 2, &f->w), KVC_OK);
  assert_int_equal(f->w.num_free, 0);
  assert_int_equal(stats(f).cached_blocks, 6);
}

static void eviction_takes_least_recent_and_last_blocks_first(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  c.total_chunks = 8 * 7; /* seven unmeasured blocks */
  fx_t *f = fx_new(&c);
  int32_t a[13], ab[3], bb[3];
  cache_two_prompts(f, a, ab, bb);
  /* Touch a's first block through a hit: it becomes the most recently used. */
  int32_t a4[5] = {100, 101, 102, 103, 0};
  assert_int_equal(add(f, 3, a4, 5, 0), 4);
  assert_int_equal(kvc_bm_seq_free(f->bm, 3, &f->w), KVC_OK);
  /* 1 block free; 5 more needed: a's last two, then b's three, last first. */
  add(f, 4, NULL, 0, 0);
  int events = f->ev.n;
  reserve(f, 4, 24);
  int32_t want[5] = {ab[2], ab[1], bb[2], bb[1], bb[0]};
  assert_int_equal(f->w.num_free, 5);
  assert_memory_equal(f->w.free_blocks, want, sizeof(want));
  assert_int_equal(f->ev.n, events + 5);
  for (int i = 0; i < 5; i++) {
    assert_int_equal(f->ev.kind[events + i], KVC_EVENT_BLOCK_EVICTED);
    assert_int_equal(f->ev.block[events + i], want[i]);
    assert_int_not_equal(f->ev.hash[events + i], 0);
  }
  kvc_bm_stats_t s = stats(f);
  assert_int_equal(s.evictions, 5);
  assert_int_equal(s.cached_blocks, 1);
  assert_int_equal(s.free_chunks, 0);
  /* Nothing more to evict but a's first block: the next admission is refused cleanly. */
  kvc_seq_id_t ids[] = {4, 5};
  add(f, 5, NULL, 0, 0);
  EXPECT_UNCHANGED(f, ids, 2, KVC_ERR_OUT_OF_MEMORY, kvc_bm_seq_reserve(f->bm, 5, 5, 0, &f->w));
  reserve(f, 5, 4);
  assert_int_equal(f->w.num_free, 1);
  assert_int_equal(f->w.free_blocks[0], ab[0]);
  fx_free(f);
}

/* ---- tensor-parallel agreement -------------------------------------------------------------- */

/* Another rank, as an agreement sees it: its own values (or a failed exchange). */
typedef struct other_rank {
  int64_t v[2];
  int fail, calls;
  int64_t own[2]; /* what this rank brought to the last exchange */
} other_rank_t;

static int other_allreduce(void *user, int64_t *v, int count) {
  other_rank_t *o = user;
  o->calls++;
  o->own[0] = v[0];
  o->own[1] = count > 1 ? v[1] : 0;
  if (o->fail) return -1;
  for (int i = 0; i < count; i++)
    if (o->v[i] > v[i]) v[i] = o->v[i];
  return 0;
}

static void agreement_decides_status_and_evictions(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  c.total_chunks = 8 * 7; /* seven unmeasured blocks */
  fx_t *f = fx_new(&c);
  other_rank_t o = {{KVC_OK, 0}, 0, 0, {0, 0}};
  kvc_bm_set_agreement(f->bm, other_allreduce, &o);
  int32_t a[13], ab[3], bb[3];
  cache_two_prompts(f, a, ab, bb);
  assert_int_equal(o.calls, 4); /* each add and growing reserve agreed once */
  add(f, 3, NULL, 0, 0);
  kvc_seq_id_t ids[] = {3, 4, 5};
  /* Another rank has no room: refused here too, though this rank has, and nothing is evicted. */
  o.v[0] = KVC_ERR_OUT_OF_MEMORY;
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_OUT_OF_MEMORY, kvc_bm_seq_reserve(f->bm, 3, 4, 0, &f->w));
  assert_int_equal(o.own[0], KVC_OK);
  assert_int_equal(o.own[1], 0);
  /* Another rank must evict two blocks: this one evicts the same two, least recently used. */
  o.v[0] = KVC_OK;
  o.v[1] = 2;
  int events = f->ev.n;
  reserve(f, 3, 4);
  assert_int_equal(f->w.num_free, 2);
  assert_int_equal(f->w.free_blocks[0], ab[2]);
  assert_int_equal(f->w.free_blocks[1], ab[1]);
  assert_int_equal(f->ev.n, events + 2);
  assert_int_equal(f->ev.kind[events], KVC_EVENT_BLOCK_EVICTED);
  o.v[1] = 0;
  /* Every agreeing hook fails alike when another rank cannot do it. */
  o.v[0] = KVC_ERR_OUT_OF_MEMORY;
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_OUT_OF_MEMORY, kvc_bm_seq_fork(f->bm, 3, 4, &f->w));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_OUT_OF_MEMORY,
                   kvc_bm_seq_swap_out(f->bm, 3, KVC_OK, &f->w));
  o.v[0] = KVC_ERR_OUT_OF_HOST_MEMORY;
  int cached = -1;
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_OUT_OF_HOST_MEMORY,
                   kvc_bm_seq_add(f->bm, 5, a, 13, 0, &cached, &f->w));
  assert_int_equal(stats(f).live_seqs, 1);
  /* This rank's own swap placement failed: agreed, and refused. */
  o.v[0] = KVC_OK;
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_OUT_OF_MEMORY,
                   kvc_bm_seq_swap_out(f->bm, 3, KVC_ERR_OUT_OF_MEMORY, &f->w));
  assert_int_equal(o.own[0], KVC_ERR_OUT_OF_MEMORY);
  assert_int_equal(kvc_bm_seq_swap_out(f->bm, 3, KVC_OK, &f->w), KVC_OK);
  o.v[0] = KVC_ERR_OUT_OF_MEMORY;
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_OUT_OF_MEMORY, kvc_bm_seq_swap_in(f->bm, 3, &f->w));
  o.v[0] = KVC_OK;
  assert_int_equal(kvc_bm_seq_swap_in(f->bm, 3, &f->w), KVC_OK);
  /* A failed exchange is KVC_ERR_NCCL, and changes nothing here. */
  o.fail = 1;
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_NCCL, kvc_bm_seq_reserve(f->bm, 3, 8, 0, &f->w));
  o.fail = 0;
  /* Refusals every rank reaches alike, and growth within a reservation, exchange nothing. */
  reserve(f, 3, 4);
  const int calls = o.calls;
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_NOT_FOUND, kvc_bm_seq_reserve(f->bm, 9, 4, 0, &f->w));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_ARGUMENT,
                   kvc_bm_seq_add(f->bm, 3, a, 13, 0, &cached, &f->w));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_STATE, kvc_bm_seq_swap_in(f->bm, 3, &f->w));
  reserve(f, 3, 3);
  assert_int_equal(o.calls, calls);
  fx_free(f);
}

/* ---- fork ------------------------------------------------------------------------------- */

static void fork_shares_full_blocks_and_copies_the_tail(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  fx_t *f = fx_new(&c);
  kvc_seq_id_t ids[] = {1, 2, 3};
  int32_t tok[10];
  iota(tok, 10, 1);
  add(f, 1, tok, 10, 0);
  reserve(f, 1, 10);
  step1(f, 1, 10, NULL);
  const int32_t *pt;
  int pn;
  kvc_bm_seq_blocks(f->bm, 1, &pt, &pn);
  int32_t parent[3];
  memcpy(parent, pt, sizeof(parent));

  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_NOT_FOUND, kvc_bm_seq_fork(f->bm, 9, 2, &f->w));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_ARGUMENT, kvc_bm_seq_fork(f->bm, 1, 1, &f->w));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_ARGUMENT,
                   kvc_bm_seq_fork(f->bm, 1, KVC_SEQ_NONE, &f->w));

  assert_int_equal(kvc_bm_seq_fork(f->bm, 1, 2, &f->w), KVC_OK);
  TB_ASSERT_VALID(f->bm);
  assert_int_equal(f->w.copy_src, parent[2]);
  assert_int_not_equal(f->w.copy_dst, parent[2]);
  assert_int_equal(f->w.num_free, 0);
  const int32_t *ct;
  int cn;
  kvc_bm_seq_blocks(f->bm, 2, &ct, &cn);
  assert_int_equal(cn, 3);
  assert_memory_equal(ct, parent, 2 * sizeof(int32_t));
  assert_int_equal(ct[2], f->w.copy_dst);
  kvc_seq_info_t info;
  kvc_bm_seq_info(f->bm, 2, &info);
  assert_int_equal(info.length, 10);
  assert_int_equal(info.reserved, 10);
  assert_int_equal(info.shared_blocks, 2);
  kvc_bm_seq_info(f->bm, 1, &info);
  assert_int_equal(info.shared_blocks, 2);
  kvc_bm_stats_t s = stats(f);
  assert_int_equal(s.active_blocks, 4);
  assert_int_equal(s.tokens_stored, 12);
  assert_int_equal(s.staging_blocks, 2);

  /* The child grows on its own: its tail fills and its cached prefix keeps chaining. */
  reserve(f, 2, 3);
  int32_t more[3] = {11, 12, 13};
  const kvc_bm_plan_t *p = step1(f, 2, 3, more);
  assert_int_equal(p->num_jobs, 1);
  assert_int_equal(p->job_block[0], ct[2]);
  assert_int_equal(p->job_staged[0], 2);
  assert_int_not_equal(f->ev.hash[f->ev.n - 1], 0);

  /* Freeing the parent keeps the shared blocks for the child. */
  assert_int_equal(kvc_bm_seq_free(f->bm, 1, &f->w), KVC_OK);
  assert_int_equal(f->w.num_free, 1);
  assert_int_equal(f->w.free_blocks[0], parent[2]);
  kvc_bm_seq_info(f->bm, 2, &info);
  assert_int_equal(info.shared_blocks, 0);
  int32_t want[13];
  iota(want, 10, 1);
  memcpy(want + 10, more, sizeof(more));
  int32_t prompt[14];
  memcpy(prompt, want, sizeof(want));
  prompt[13] = 0;
  assert_int_equal(add(f, 3, prompt, 14, 0), 12);

  /* An aligned parent shares everything and copies nothing. */
  assert_int_equal(kvc_bm_seq_fork(f->bm, 3, 4, &f->w), KVC_OK);
  assert_int_equal(f->w.copy_src, -1);
  kvc_bm_seq_info(f->bm, 4, &info);
  assert_int_equal(info.shared_blocks, 3);
  fx_free(f);
}

/* Groups of a plan's sequences that share a prefix (cascade attention): the same first block,
 * then the whole blocks all members hold at the same places before their first query rows. */
static int groups_of(const kvc_bm_plan_t *p, int bt, int32_t *seq_group, int32_t *blocks) {
  uint64_t scratch[8];
  assert_true(p->num_seqs <= 8);
  return kvc_bm_plan_prefix_groups(p, bt, seq_group, blocks, scratch);
}

static void prefix_groups_of_a_plan(void **state) {
  (void)state;
  /* Tables of three sequences, 4-token blocks: {1, 2, 3, 4}, {1, 2, 3, 9}, {1, 2, 3, 4, 5}. */
  int32_t ids[] = {1, 2, 3, 4, 1, 2, 3, 9, 1, 2, 3, 4, 5};
  int32_t bptr[] = {0, 4, 8, 13};
  int32_t kv[] = {16, 14, 18};
  int32_t qo[] = {0, 1, 2, 3};
  kvc_bm_plan_t p;
  memset(&p, 0, sizeof(p));
  p.num_seqs = 3;
  p.total_rows = 3;
  p.qo_indptr = qo;
  p.kv_len = kv;
  p.block_indptr = bptr;
  p.block_ids = ids;
  int32_t g[8], b[8];
  assert_int_equal(groups_of(&p, 4, g, b), 1);
  assert_int_equal(b[0], 3);
  assert_true(g[0] == 0 && g[1] == 0 && g[2] == 0);
  /* Query rows inside block 2 of the second sequence: 14 - 4 rows = 10 tokens, 2 whole blocks. */
  int32_t qo4[] = {0, 1, 5, 6};
  p.qo_indptr = qo4;
  assert_int_equal(groups_of(&p, 4, g, b), 1);
  assert_int_equal(b[0], 2);
  /* Rows right after block 3 (12 tokens before them): all three. */
  int32_t qo2[] = {0, 1, 3, 4};
  p.qo_indptr = qo2;
  assert_int_equal(groups_of(&p, 4, g, b), 1);
  assert_int_equal(b[0], 3);
  /* One sequence alone shares nothing; a third that starts elsewhere stays out. */
  p.qo_indptr = qo;
  p.num_seqs = 1;
  assert_int_equal(groups_of(&p, 4, g, b), 0);
  assert_int_equal(g[0], -1);
  p.num_seqs = 3;
  ids[8] = 7;
  assert_int_equal(groups_of(&p, 4, g, b), 1);
  assert_true(g[0] == 0 && g[1] == 0 && g[2] == -1);
  assert_int_equal(b[0], 3);
  ids[8] = 1;
  ids[9] = 7;
  assert_int_equal(groups_of(&p, 4, g, b), 1);
  assert_int_equal(b[0], 1);

  /* Two groups: {1, 2, 3} and {1, 2, 4} share 2 blocks, {5, 6} and {5, 6, 7} one (the first has
   * only 7 tokens before its query row); {8} holds its query row in its only block. */
  int32_t ids2[] = {1, 2, 3, 5, 6, 1, 2, 4, 5, 6, 7, 8};
  int32_t bptr2[] = {0, 3, 5, 8, 11, 12};
  int32_t kv2[] = {12, 8, 12, 12, 3};
  int32_t qo5[] = {0, 1, 2, 3, 4, 5};
  p.num_seqs = 5;
  p.total_rows = 5;
  p.qo_indptr = qo5;
  p.kv_len = kv2;
  p.block_indptr = bptr2;
  p.block_ids = ids2;
  assert_int_equal(groups_of(&p, 4, g, b), 2);
  assert_true(g[0] == 0 && g[2] == 0 && g[1] == 1 && g[3] == 1 && g[4] == -1);
  assert_true(b[0] == 2 && b[1] == 1);

  /* From the block manager: a forked pair shares its two full blocks. */
  kvc_bm_config_t c = tb_config();
  fx_t *f = fx_new(&c);
  int32_t tok[10];
  iota(tok, 10, 1);
  add(f, 1, tok, 10, 0);
  reserve(f, 1, 10);
  step1(f, 1, 10, NULL);
  assert_int_equal(kvc_bm_seq_fork(f->bm, 1, 2, &f->w), KVC_OK);
  reserve(f, 1, 1);
  reserve(f, 2, 1);
  kvc_seq_id_t both[] = {1, 2};
  int32_t one[] = {1, 1};
  kvc_bm_batch_t batch = {2, both, one, NULL};
  assert_int_equal(kvc_bm_plan(f->bm, &batch, &f->plan), KVC_OK);
  assert_int_equal(groups_of(&f->plan, c.block_tokens, g, b), 1);
  assert_true(g[0] == 0 && g[1] == 0 && b[0] == 2);
  kvc_bm_step_done(f->bm);
  fx_free(f);
}

static void fork_fails_cleanly_without_room(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  c.total_chunks = 16;
  c.max_seqs = 3;
  fx_t *f = fx_new(&c);
  kvc_seq_id_t ids[] = {1, 2, 3, 4};
  add(f, 1, NULL, 0, 0);
  reserve(f, 1, 6);
  step1(f, 1, 6, NULL); /* 2 blocks: the pool is full */
  EXPECT_UNCHANGED(f, ids, 4, KVC_ERR_OUT_OF_MEMORY, kvc_bm_seq_fork(f->bm, 1, 2, &f->w));
  /* Measuring the full block frees 6 chunks: still no room for a worst-case tail. */
  for (int l = 0; l < 2; l++) kvc_bm_page_measured(f->bm, f->plan.job_block[0], l, 100, 1);
  EXPECT_UNCHANGED(f, ids, 4, KVC_ERR_OUT_OF_MEMORY, kvc_bm_seq_fork(f->bm, 1, 2, &f->w));
  reserve(f, 1, 2); /* fill the tail: 8 tokens, aligned */
  step1(f, 1, 2, NULL);
  assert_int_equal(kvc_bm_seq_fork(f->bm, 1, 2, &f->w), KVC_OK);
  assert_int_equal(kvc_bm_seq_fork(f->bm, 2, 3, &f->w), KVC_OK);
  EXPECT_UNCHANGED(f, ids, 4, KVC_ERR_OUT_OF_MEMORY, kvc_bm_seq_fork(f->bm, 1, 4, &f->w));
  fx_free(f);
}

/* ---- swap ------------------------------------------------------------------------------- */

static void swap_moves_exclusive_blocks_and_back(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  fx_t *f = fx_new(&c);
  kvc_seq_id_t ids[] = {1, 2, 3};
  int32_t tok[10];
  iota(tok, 10, 1);
  add(f, 1, tok, 10, 0);
  reserve(f, 1, 20);
  const kvc_bm_plan_t *p = step1(f, 1, 10, NULL);
  assert_int_equal(kvc_bm_seq_fork(f->bm, 1, 2, &f->w), KVC_OK);
  assert_int_equal(kvc_bm_seq_free(f->bm, 2, &f->w), KVC_OK); /* was only for sharing below */
  assert_int_equal(add(f, 2, tok, 5, 0), 4);                   /* shares block 0 */
  /* Pages not measured yet: the swap size is unknown. */
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_STATE, kvc_bm_seq_swap_out(f->bm, 1, KVC_OK, &f->w));
  kvc_bm_page_measured(f->bm, p->job_block[0], 0, 300, 2);
  kvc_bm_page_measured(f->bm, p->job_block[0], 1, 310, 2);
  kvc_bm_page_measured(f->bm, p->job_block[1], 0, 200, 1);
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_STATE, kvc_bm_seq_swap_out(f->bm, 1, KVC_OK, &f->w));
  kvc_bm_page_measured(f->bm, p->job_block[1], 1, 210, 1);
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_NOT_FOUND, kvc_bm_seq_swap_out(f->bm, 3, KVC_OK, &f->w));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_STATE, kvc_bm_seq_swap_in(f->bm, 1, &f->w));
  kvc_bm_stats_t before = stats(f);

  assert_int_equal(kvc_bm_seq_swap_out(f->bm, 1, KVC_OK, &f->w), KVC_OK);
  TB_ASSERT_VALID(f->bm);
  /* Block 0 is shared with 2 and stays; block 1 (410 bytes) and the tail (2 x 500) move. */
  const int32_t *t;
  int n;
  kvc_bm_seq_blocks(f->bm, 1, &t, &n);
  assert_int_equal(f->w.num_swap, 2);
  assert_int_equal(f->w.swap_blocks[0], t[1]);
  assert_int_equal(f->w.swap_blocks[1], t[2]);
  kvc_bm_stats_t s = stats(f);
  assert_int_equal(s.swap_used_bytes, 410 + 1000);
  assert_int_equal(s.swapped_blocks, 2);
  assert_int_equal(s.swapped_seqs, 1);
  assert_int_equal(s.swap_outs, 1);
  assert_int_equal(s.charged_chunks, before.charged_chunks - 2 - 8);
  assert_int_equal(s.reserved_chunks, 0); /* the reservation went with it */
  assert_int_equal(s.tokens_stored, before.tokens_stored);
  kvc_seq_info_t info;
  kvc_bm_seq_info(f->bm, 1, &info);
  assert_int_equal(info.state, KVC_SEQ_SWAPPED);
  assert_int_equal(info.reserved, 10);

  kvc_seq_id_t one = 1;
  int32_t n1 = 1;
  kvc_bm_batch_t b = {1, &one, &n1, NULL};
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_STATE, kvc_bm_plan(f->bm, &b, &f->plan));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_STATE, kvc_bm_seq_reserve(f->bm, 1, 1, 0, &f->w));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_STATE, kvc_bm_seq_fork(f->bm, 1, 3, &f->w));
  EXPECT_UNCHANGED(f, ids, 3, KVC_ERR_INVALID_STATE, kvc_bm_seq_swap_out(f->bm, 1, KVC_OK, &f->w));
  /* Its cached prefix is not handed out while its pages are in host memory. */
  assert_int_equal(add(f, 3, tok, 10, 0), 4);
  assert_int_equal(kvc_bm_seq_free(f->bm, 3, &f->w), KVC_OK);

  assert_int_equal(kvc_bm_seq_swap_in(f->bm, 1, &f->w), KVC_OK);
  TB_ASSERT_VALID(f->bm);
  assert_int_equal(f->w.num_swap, 2);
  assert_int_equal(f->w.swap_blocks[0], t[1]);
  assert_int_equal(f->w.swap_blocks[1], t[2]);
  s = stats(f);
  assert_int_equal(s.swap_used_bytes, 0);
  assert_int_equal(s.swap_ins, 1);
  assert_int_equal(s.charged_chunks, before.charged_chunks);
  assert_int_equal(s.measured_pages, before.measured_pages);
  reserve(f, 1, 1);
  step1(f, 1, 1, NULL);

  /* Freeing a swapped-out sequence releases its host copies too. */
  assert_int_equal(kvc_bm_seq_swap_out(f->bm, 1, KVC_OK, &f->w), KVC_OK);
  assert_int_equal(kvc_bm_seq_free(f->bm, 1, &f->w), KVC_OK);
  assert_int_equal(f->w.num_free, 2);
  s = stats(f);
  assert_int_equal(s.swap_used_bytes, 0);
  assert_int_equal(s.swapped_blocks, 0);
  assert_int_equal(s.swapped_seqs, 0);
  fx_free(f);
}

static void swap_space_and_pool_limits(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  c.swap_bytes = 999;
  c.total_chunks = 24;
  fx_t *f = fx_new(&c);
  kvc_seq_id_t ids[] = {1, 2};
  add(f, 1, NULL, 0, 0);
  reserve(f, 1, 2);
  step1(f, 1, 2, NULL); /* a tail: 2 x 500 bytes in swap */
  EXPECT_UNCHANGED(f, ids, 2, KVC_ERR_OUT_OF_MEMORY, kvc_bm_seq_swap_out(f->bm, 1, KVC_OK, &f->w));
  fx_free(f);

  c.swap_bytes = 1000;
  f = fx_new(&c);
  add(f, 1, NULL, 0, 0);
  reserve(f, 1, 2);
  step1(f, 1, 2, NULL);
  assert_int_equal(kvc_bm_seq_swap_out(f->bm, 1, KVC_OK, &f->w), KVC_OK);
  /* Meanwhile another sequence takes the pool; swap-in must wait. */
  add(f, 2, NULL, 0, 0);
  reserve(f, 2, 12);
  EXPECT_UNCHANGED(f, ids, 2, KVC_ERR_OUT_OF_MEMORY, kvc_bm_seq_swap_in(f->bm, 1, &f->w));
  assert_int_equal(kvc_bm_seq_free(f->bm, 2, &f->w), KVC_OK);
  assert_int_equal(kvc_bm_seq_swap_in(f->bm, 1, &f->w), KVC_OK);
  fx_free(f);

  c.swap_bytes = 0;
  f = fx_new(&c);
  add(f, 1, NULL, 0, 0);
  EXPECT_UNCHANGED(f, ids, 2, KVC_ERR_UNSUPPORTED, kvc_bm_seq_swap_out(f->bm, 1, KVC_OK, &f->w));
  EXPECT_UNCHANGED(f, ids, 2, KVC_ERR_UNSUPPORTED, kvc_bm_seq_swap_in(f->bm, 1, &f->w));
  fx_free(f);
}

/* ---- measurements ----------------------------------------------------------------------- */

static void measurements_lower_charges_and_stale_ones_are_ignored(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  c.max_blocks = 256; /* so that chunks, not ids, bound tokens_fit */
  fx_t *f = fx_new(&c);
  add(f, 1, NULL, 0, 0);
  reserve(f, 1, 6);
  const kvc_bm_plan_t *p = step1(f, 1, 6, NULL);
  int32_t full = p->job_block[0], tail = p->new_staging[0];
  uint64_t step = p->step;
  kvc_bm_page_measured(f->bm, full, 0, 700, 3);
  kvc_bm_stats_t s = stats(f);
  assert_int_equal(s.charged_chunks, 16 - 1);
  assert_int_equal(s.unmeasured_chunks, 16 - 4);
  assert_int_equal(s.measured_page_bytes, 700);
  assert_int_equal(s.measured_page_chunks, 3);
  assert_int_equal(s.measured_pages, 1);
  kvc_seq_id_t ids[] = {1};
  /* Each of these is ignored and counted. */
  struct {
    int32_t block;
    int layer;
    uint32_t bytes, chunks;
  } stale[] = {{full, 0, 100, 2}, {tail, 0, 100, 1}, {full, 2, 100, 1}, {full, -1, 100, 1},
               {full, 1, 0, 1},   {full, 1, 100, 5}, {-1, 0, 100, 1},   {256, 0, 100, 1},
               {40, 0, 100, 1}};
  int nstale = (int)(sizeof(stale) / sizeof(stale[0]));
  for (int i = 0; i < nstale; i++) {
    static tb_snap_t a, b;
    tb_snap(f->bm, ids, 1, &a);
    kvc_bm_page_measured(f->bm, stale[i].block, stale[i].layer, stale[i].bytes, stale[i].chunks);
    tb_snap(f->bm, ids, 1, &b);
    a.stats.ignored_measurements++;
    tb_snap_assert_equal(&a, &b);
  }
  kvc_bm_page_measured_step(f->bm, step + 1, full, 1, 100, 1);
  assert_int_equal(stats(f).ignored_measurements, nstale + 1);
  /* A page packed into its block's chunks takes none of its own. */
  kvc_bm_page_measured_step(f->bm, step, full, 1, 100, 0);
  s = stats(f);
  assert_int_equal(s.ignored_measurements, nstale + 1);
  assert_int_equal(s.charged_chunks, 16 - 1 - 4);
  assert_int_equal(s.measured_pages, 2);
  TB_ASSERT_VALID(f->bm);
  /* tokens_fit now charges a block two average measured pages (1.5 chunks): 3 chunks. */
  assert_int_equal(kvc_bm_tokens_fit(f->bm), (512 - 11) / 3 * 4);
  fx_free(f);
}

/* Packing's arithmetic (allocator/kvc_pool_layout.h): a page starts 16-byte aligned, in units of
 * chunk_bytes / 256, after the previous page's end, or in a fresh chunk when none is left; the
 * chunks it takes; its bytes' addresses. */
static void packing_arithmetic(void **state) {
  (void)state;
  /* 8 KiB chunks: units of 32 bytes. */
  assert_int_equal(kvc_pack_first(1, 8192), 1);
  assert_int_equal(kvc_pack_first(32, 8192), 1);
  assert_int_equal(kvc_pack_first(33, 8192), 2);
  assert_int_equal(kvc_pack_first(8160, 8192), 255);
  assert_int_equal(kvc_pack_first(8161, 8192), 0); /* rounds up to the chunk's end */
  assert_int_equal(kvc_pack_first(8192, 8192), 0);
  /* 1 KiB chunks: units of 4 bytes, starts still 16-byte aligned. */
  assert_int_equal(kvc_pack_first(1, 1024), 4);
  assert_int_equal(kvc_pack_first(17, 1024), 8);
  assert_int_equal(kvc_pack_first(1008, 1024), 252);
  assert_int_equal(kvc_pack_first(1009, 1024), 0);
  /* Chunks taken: none when the page fits in the rest of the shared chunk. */
  assert_int_equal(kvc_pack_popped(0, 8192, 8192), 1);
  assert_int_equal(kvc_pack_popped(0, 8193, 8192), 2);
  assert_int_equal(kvc_pack_popped(128, 4096, 8192), 0);
  assert_int_equal(kvc_pack_popped(128, 4097, 8192), 1);
  assert_int_equal(kvc_pack_popped(255, 59136, 8192), 8); /* 8160 + 59136 bytes: 9 chunks */
  /* A packed page's bytes: from unit 2 (byte 64) of chunk 5, then chunk 9. */
  static uint8_t pool[16 * 8192];
  kvc_page_entry_t e;
  memset(&e, 0, sizeof(e));
  e.kind = KVC_PAGE_COMPRESSED;
  e.first = 2;
  e.nchunks = 2;
  e.chunk[0] = 5;
  e.chunk[1] = 9;
  assert_int_equal(kvc_page_start(&e, 8192), 64);
  assert_ptr_equal(kvc_page_byte(pool, 8192, &e, 0), pool + 5 * 8192 + 64);
  assert_ptr_equal(kvc_page_byte(pool, 8192, &e, 8192 - 65), pool + 5 * 8192 + 8191);
  assert_ptr_equal(kvc_page_byte(pool, 8192, &e, 8192 - 64), pool + 9 * 8192);
  assert_int_equal(kvc_page_own_first(&e), 1);
  e.first = 0;
  assert_int_equal(kvc_page_own_first(&e), 0);
  assert_ptr_equal(kvc_page_byte(pool, 8192, &e, 8192), pool + 9 * 8192);
  /* Raw caches do not pack; raw pages of a per-page policy do. */
  assert_true(kvc_pack_codec(KVC_CODEC_HUFFMAN, KVC_POLICY_FIXED));
  assert_true(kvc_pack_codec(KVC_CODEC_BITPACK, KVC_POLICY_FIXED));
  assert_false(kvc_pack_codec(KVC_CODEC_RAW, KVC_POLICY_FIXED));
  assert_true(kvc_pack_codec(KVC_CODEC_RAW, KVC_POLICY_SMALLEST));
}

/* Pages packed into chunks their block already holds measure 0 chunks; a block still costs one
 * chunk in tokens_fit's estimate (the fuzzer found a division by zero here). */
static void packed_pages_of_no_chunks(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  c.max_blocks = 256;
  fx_t *f = fx_new(&c);
  add(f, 1, NULL, 0, 0);
  reserve(f, 1, 6);
  const kvc_bm_plan_t *p = step1(f, 1, 6, NULL);
  int32_t full = p->job_block[0];
  const uint32_t charged = stats(f).charged_chunks;
  for (int l = 0; l < 2; l++) kvc_bm_page_measured(f->bm, full, l, 100, 0);
  kvc_bm_stats_t s = stats(f);
  assert_int_equal(s.measured_pages, 2);
  assert_int_equal(s.measured_page_chunks, 0);
  assert_int_equal(s.charged_chunks, charged - 2 * c.worst_page_chunks);
  TB_ASSERT_VALID(f->bm);
  /* One chunk a block, so the free block ids (256, less the full block and the tail) bound it. */
  assert_true(512 - s.charged_chunks > 256 - 2);
  assert_int_equal(kvc_bm_tokens_fit(f->bm), (256 - 2) * 4);
  fx_free(f);
}

static void measuring_a_cached_block_frees_evictable_chunks(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  fx_t *f = fx_new(&c);
  int32_t tok[5];
  iota(tok, 5, 3);
  add(f, 1, tok, 5, 0);
  reserve(f, 1, 4);
  const kvc_bm_plan_t *p = step1(f, 1, 4, NULL);
  int32_t b = p->job_block[0];
  assert_int_equal(kvc_bm_seq_free(f->bm, 1, &f->w), KVC_OK);
  assert_int_equal(stats(f).cached_chunks, 8);
  kvc_bm_page_measured(f->bm, b, 0, 10, 1);
  kvc_bm_page_measured(f->bm, b, 1, 10, 1);
  kvc_bm_stats_t s = stats(f);
  assert_int_equal(s.cached_chunks, 2);
  assert_int_equal(s.charged_chunks, 2);
  assert_int_equal(s.free_chunks, 510);
  fx_free(f);
}

static void plan_arrays_survive_a_growing_reserve(void **state) {
  (void)state;
  kvc_bm_config_t c = tb_config();
  c.num_layers = 1;
  c.staging_chunks = 1;
  c.worst_page_chunks = 1;
  c.max_seq_len = 8192;
  c.max_blocks = 4096;
  c.total_chunks = 4096;
  fx_t *f = fx_new(&c);
  add(f, 1, NULL, 0, 0);
  reserve(f, 1, 16);
  const kvc_bm_plan_t *p = step1(f, 1, 16, NULL);
  const int32_t *ids = p->block_ids;
  int32_t copy[4];
  memcpy(copy, ids, sizeof(copy));
  add(f, 2, NULL, 0, 0);
  reserve(f, 2, 4 * 2000); /* the plan's block-id array must grow */
  /* The previous plan's arrays stay readable until the next plan (ASan checks the read). */
  assert_memory_equal(ids, copy, sizeof(copy));
  reserve(f, 1, 4 * 1500);  /* grows again: that buffer was never handed out */
  assert_memory_equal(ids, copy, sizeof(copy));
  step1(f, 2, 64, NULL);
  fx_free(f);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(create_rejects_bad_configs),
      cmocka_unit_test(add_checks_ids_and_limits),
      cmocka_unit_test(reserve_charges_worst_case_blocks),
      cmocka_unit_test(reserve_fails_cleanly_when_the_pool_is_full),
      cmocka_unit_test(block_ids_are_a_resource_too),
      cmocka_unit_test(watermark_applies_to_admission_only),
      cmocka_unit_test(plan_prefill_then_decode),
      cmocka_unit_test(plan_batch_builds_csr_for_all),
      cmocka_unit_test(plan_rejects_bad_batches),
      cmocka_unit_test(plan_never_allocates),
      cmocka_unit_test(steps_block_calls_on_their_sequences),
      cmocka_unit_test(free_returns_blocks_and_double_free_is_not_found),
      cmocka_unit_test(prefix_hit_attaches_whole_blocks),
      cmocka_unit_test(prefix_hit_respects_salt_and_codec_identity),
      cmocka_unit_test(hash_collisions_never_alias),
      cmocka_unit_test(identical_blocks_computed_twice_are_cached_once),
      cmocka_unit_test(blocks_with_unknown_tokens_are_not_cached),
      cmocka_unit_test(eviction_takes_least_recent_and_last_blocks_first),
      cmocka_unit_test(agreement_decides_status_and_evictions),
      cmocka_unit_test(fork_shares_full_blocks_and_copies_the_tail),
      cmocka_unit_test(fork_fails_cleanly_without_room),
      cmocka_unit_test(prefix_groups_of_a_plan),
      cmocka_unit_test(swap_moves_exclusive_blocks_and_back),
      cmocka_unit_test(swap_space_and_pool_limits),
      cmocka_unit_test(measurements_lower_charges_and_stale_ones_are_ignored),
      cmocka_unit_test(packed_pages_of_no_chunks),
      cmocka_unit_test(packing_arithmetic),
      cmocka_unit_test(measuring_a_cached_block_frees_evictable_chunks),
      cmocka_unit_test(plan_arrays_survive_a_growing_reserve),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
