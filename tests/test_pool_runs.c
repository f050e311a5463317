/*
 * The free stack hands a page its chunks in ascending runs (scheduler_hooks/kvc_backend_cpu.c and
 * kvc_backend_cuda.cu: pop_chunks), which the CUDA decode kernel copies a run at a time: at small
 * chunks the number of copies, not the bytes, set its pace (bench/NOTES-capacity.md). Checked on
 * the CPU backend, with Huffman and raw pages: from a fresh pool every page owns one run of
 * consecutive chunk ids; after compression and frees have given chunks back, most of a page's
 * neighbouring chunks are still neighbours in the pool.
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

enum { LAYERS = 3, KV_HEADS = 2, Q_HEADS = 4, HEAD_DIM = 16, BT = 16, MAX_ROWS = 256 };
enum { ROW = KV_HEADS * HEAD_DIM, QROW = Q_HEADS * HEAD_DIM };

static float k_in[MAX_ROWS * ROW], v_in[MAX_ROWS * ROW], q_in[MAX_ROWS * QROW],
    out[MAX_ROWS * QROW];

static kvc_cache_t *create(kvc_codec_t codec) {
  kvc_config_t cfg = KVC_CONFIG_INIT;
  cfg.num_layers = LAYERS;
  cfg.num_q_heads = Q_HEADS;
  cfg.num_kv_heads = KV_HEADS;
  cfg.head_dim = HEAD_DIM;
  cfg.dtype = KVC_DTYPE_F32;
  cfg.block_tokens = BT;
  cfg.pool_bytes = (size_t)1 << 20;
  cfg.max_seqs = 8;
  cfg.max_seq_len = 1024;
  cfg.max_batch_tokens = MAX_ROWS;
  cfg.codec = codec;
  cfg.prefix_caching = 0;
  kvc_cache_t *c = NULL;
  assert_int_equal(kvc_cache_create(&cfg, &c), KVC_OK);
  uint32_t chunk = 0;
  kvc__cache_geometry(c, &chunk, NULL, NULL);
  /* A staging page (2 x heads x BT rows of f32) spans several chunks, so runs can break. */
  assert_true(2u * KV_HEADS * BT * HEAD_DIM * 4 >= 4 * chunk);
  return c;
}

/* Adds `id` with n tokens and runs one step (plan, store and attend every layer). */
static void add_and_step(kvc_cache_t *c, kvc_seq_id_t id, int32_t n, uint64_t seed) {
  int cached = -1;
  assert_int_equal(kvc_seq_add(c, id, NULL, 0, 0, &cached), KVC_OK);
  assert_int_equal(kvc_seq_reserve(c, id, n, 0), KVC_OK);
  kvc_test_rng_t r;
  kvc_test_rng_seed(&r, seed);
  for (int i = 0; i < n * ROW; i++) {
    k_in[i] = (float)kvc_test_rng_normal(&r);
    v_in[i] = (float)kvc_test_rng_normal(&r);
  }
  for (int i = 0; i < n * QROW; i++) q_in[i] = (float)kvc_test_rng_normal(&r);
  kvc_batch_t b = {1, &id, &n, NULL};
  assert_int_equal(kvc_plan(c, &b, NULL), KVC_OK);
  for (int l = 0; l < LAYERS; l++) {
    assert_int_equal(kvc_store(c, l, k_in, v_in, NULL), KVC_OK);
    assert_int_equal(kvc_attend(c, l, q_in, out, 0.25f, NULL), KVC_OK);
  }
}

/* Over the pages of `id` (every layer of every block) of kind `kind`: adds the page count and
 * the pairs of consecutive chunks the pages own, and of those the pairs adjacent in the pool. */
typedef struct {
  int pages, pairs, adjacent;
} runs_t;

static runs_t count_runs(kvc_cache_t *c, kvc_seq_id_t id, int kind) {
  static uint8_t page[1 << 16];
  int32_t blocks[64];
  int n = 0;
  runs_t r = {0, 0, 0};
  assert_int_equal(kvc__cache_seq_blocks(c, id, blocks, 64, &n), KVC_OK);
  for (int j = 0; j < n; j++)
    for (int l = 0; l < LAYERS; l++) {
      kvc_page_entry_t e;
      assert_int_equal(kvc__cache_read_page(c, l, blocks[j], &e, page, sizeof(page)), KVC_OK);
      if (e.kind != kind) continue;
      r.pages++;
      for (uint32_t i = kvc_page_own_first(&e) + 1; i < e.nchunks; i++) {
        r.pairs++;
        r.adjacent += e.chunk[i] == e.chunk[i - 1] + 1;
      }
    }
  return r;
}

static void pages_are_runs(kvc_codec_t codec) {
  kvc_cache_t *c = create(codec);
  /* From a fresh pool: every page is one run (3 full blocks and a tail, all staging). */
  add_and_step(c, 1, 50, 1);
  runs_t r = count_runs(c, 1, KVC_PAGE_STAGING);
  assert_int_equal(r.pages, 4 * LAYERS);
  assert_true(r.pairs > 0);
  assert_int_equal(r.adjacent, r.pairs);

  /* The next plans compress 1's full blocks into the chunks their staging pages gave back and
   * then reuse the chunks of freed sequence 1: pops that straddle two of the runs given back
   * break a page's run once, so most pairs stay adjacent (measured: 83-100%; in the reverse
   * order, none are). */
  add_and_step(c, 2, 40, 2);
  r = count_runs(c, 1, KVC_PAGE_COMPRESSED);
  assert_int_equal(r.pages, 3 * LAYERS);
  assert_true(4 * r.adjacent >= 3 * r.pairs);
  assert_int_equal(kvc_seq_free(c, 1), KVC_OK);
  add_and_step(c, 3, 37, 3);
  add_and_step(c, 4, 37, 4);
  const int seqs[3] = {2, 3, 4}, kinds[3] = {KVC_PAGE_COMPRESSED, KVC_PAGE_COMPRESSED,
                                            KVC_PAGE_STAGING};
  for (int i = 0; i < 3; i++) {
    r = count_runs(c, seqs[i], kinds[i]);
    assert_true(r.pages > 0);
    assert_true(4 * r.adjacent >= 3 * r.pairs);
  }
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  kvc_cache_destroy(c);
}

static void huffman_pages_are_runs(void **state) {
  (void)state;
  pages_are_runs(KVC_CODEC_HUFFMAN);
}

static void raw_pages_are_runs(void **state) {
  (void)state;
  pages_are_runs(KVC_CODEC_RAW);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(huffman_pages_are_runs),
      cmocka_unit_test(raw_pages_are_runs),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
