/*
 * kvc_attn_cpu against a naive dense attention computed here, in float64, over the values the
 * pages decode to (kvc_test_pages records them independently of the attention code). Awkward
 * sizes: 1, 3, 7, 37, 61 sequences; lengths shorter than a block and not multiples of it; GQA 1, 3,
 * 4, 8; head_dim 8, 64, 128, 256; f16, bf16, f32; several query rows per sequence (causal); every
 * page kind mixed in one batch; shared prefix blocks; compressed values used exactly
 * (ref_exact_codecs). Then the error paths.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "attention/kvc_attn.h"
#include "kvc_test_pages.h"
#include "kvc_test_util.h"

typedef struct attn_case {
  int num_seqs, num_q_heads, num_kv_heads, head_dim, block_tokens;
  kvc_dtype_t dtype;
  int max_len;     /* lengths drawn in [1, max_len] (a few pinned to awkward values) */
  int max_q;       /* query rows per sequence drawn in [1, max_q] */
  unsigned kinds;  /* page kinds of full blocks */
  int shared_prefix_blocks;
  uint64_t seed;
} attn_case_t;

static size_t esz(kvc_dtype_t t) { return t == KVC_DTYPE_F32 ? 4 : 2; }

static float get_value(kvc_dtype_t t, const uint8_t *p) {
  if (t == KVC_DTYPE_F32) {
    float f;
    memcpy(&f, p, 4);
    return f;
  }
  uint16_t h;
  memcpy(&h, p, 2);
  return t == KVC_DTYPE_F16 ? kvc_test_f16_to_f32(h) : kvc_test_bf16_to_f32(h);
}

static void put_value(kvc_dtype_t t, float f, uint8_t *p) {
  if (t == KVC_DTYPE_F32) {
    memcpy(p, &f, 4);
    return;
  }
  uint16_t h = t == KVC_DTYPE_F16 ? kvc_test_f32_to_f16(f) : kvc_test_f32_to_bf16(f);
  memcpy(p, &h, 2);
}

/* Naive causal attention over the decoded dense K/V of tp, one (row, head) at a time. */
static void naive_attention(const kvc_attn_args_t *a, const kvc_test_pages_t *tp, double *ref) {
  const int hq = a->num_q_heads, kvh = a->num_kv_heads, hd = a->head_dim;
  double *p = malloc(sizeof(double) * (size_t)a->max_kv_len);
  assert_non_null(p);
  for (int s = 0; s < a->num_seqs; s++) {
    int nq = a->qo_indptr[s + 1] - a->qo_indptr[s], len = a->kv_len[s];
    for (int r = 0; r < nq; r++) {
      int row = a->qo_indptr[s] + r, pos = len - nq + r;
      for (int h = 0; h < hq; h++) {
        int kh = h / (hq / kvh);
        const uint8_t *q = (const uint8_t *)a->q + ((size_t)row * hq + h) * hd * esz(a->dtype);
        double mx = -INFINITY, sum = 0;
        for (int t = 0; t <= pos; t++) {
          const float *kt = tp->k + ((size_t)(tp->token_offset[s] + t) * kvh + kh) * hd;
          double dot = 0;
          for (int d = 0; d < hd; d++) dot += (double)get_value(a->dtype, q + d * esz(a->dtype)) * kt[d];
          p[t] = dot * a->scale;
          if (p[t] > mx) mx = p[t];
        }
        for (int t = 0; t <= pos; t++) sum += (p[t] = exp(p[t] - mx));
        double *o = ref + ((size_t)row * hq + h) * hd;
        for (int d = 0; d < hd; d++) o[d] = 0;
        for (int t = 0; t <= pos; t++) {
          const float *vt = tp->v + ((size_t)(tp->token_offset[s] + t) * kvh + kh) * hd;
          for (int d = 0; d < hd; d++) o[d] += p[t] / sum * vt[d];
        }
      }
    }
  }
  free(p);
}

/* Everything one case owns. */
typedef struct attn_setup {
  kvc_test_pages_t tp;
  kvc_attn_args_t args;
  int32_t *qo_indptr;
  uint8_t *q, *out;
  double *ref;
} attn_setup_t;

/* The case's pages, queries and arguments; exact: kvc_attn_args_t.ref_exact_codecs, and the codecs
 * whose values the naive reference takes unrounded. */
static void setup_case(const attn_case_t *c, uint32_t exact, attn_setup_t *su) {
  memset(su, 0, sizeof(*su));
  kvc_test_rng_t rng;
  kvc_test_rng_seed(&rng, c->seed);
  int32_t *len = malloc(sizeof(int32_t) * c->num_seqs);
  assert_non_null(len);
  int64_t tokens = 0;
  for (int s = 0; s < c->num_seqs; s++) {
    len[s] = 1 + (int32_t)kvc_test_rng_below(&rng, (uint32_t)c->max_len);
    /* Pin a few awkward lengths: one token, exactly one block, one block plus one. */
    if (s % 5 == 1) len[s] = 1;
    if (s % 5 == 2 && c->block_tokens <= c->max_len) len[s] = c->block_tokens;
    if (s % 5 == 3 && c->block_tokens < c->max_len) len[s] = c->block_tokens + 1;
    tokens += len[s];
  }
  size_t width = (size_t)c->num_kv_heads * c->head_dim;
  float *k = malloc(sizeof(float) * tokens * width), *v = malloc(sizeof(float) * tokens * width);
  assert_non_null(k);
  assert_non_null(v);
  kvc_test_fill_kv(c->seed ^ 0x5eedull, tokens, c->num_kv_heads, c->head_dim, k, v);
  /* Chunks from the smallest that holds a staging page in 32 to four times that: pages straddle
   * chunks, and sometimes fit in a few. */
  size_t staging = 2 * width * (size_t)c->block_tokens * esz(c->dtype);
  uint32_t chunk = KVC_CHUNK_MIN_BYTES;
  while ((size_t)chunk * KVC_PAGE_MAX_CHUNKS < staging + 1024) chunk *= 2; /* + page header */
  chunk <<= kvc_test_rng_below(&rng, 3);
  kvc_test_pages_spec_t spec = {c->num_seqs, len, c->num_kv_heads, c->head_dim, c->block_tokens,
                                c->dtype, chunk, c->kinds, 0.05f, 0.05f, c->shared_prefix_blocks,
                                c->seed ^ 0xabcull, KVC_BOUND_RELATIVE, exact};
  assert_int_equal(kvc_test_pages_build(&spec, k, v, &su->tp), KVC_OK);
  free(k);
  free(v);
  free(len);

  su->qo_indptr = malloc(sizeof(int32_t) * (c->num_seqs + 1));
  assert_non_null(su->qo_indptr);
  su->qo_indptr[0] = 0;
  for (int s = 0; s < c->num_seqs; s++) {
    int nq = 1 + (int)kvc_test_rng_below(&rng, (uint32_t)c->max_q);
    if (nq > su->tp.kv_len[s]) nq = su->tp.kv_len[s];
    su->qo_indptr[s + 1] = su->qo_indptr[s] + nq;
  }
  int rows = su->qo_indptr[c->num_seqs];
  size_t elems = (size_t)rows * c->num_q_heads * c->head_dim;
  su->q = malloc(elems * esz(c->dtype));
  su->out = malloc(elems * esz(c->dtype));
  su->ref = malloc(elems * sizeof(double));
  assert_non_null(su->q);
  assert_non_null(su->out);
  assert_non_null(su->ref);
  for (size_t i = 0; i < elems; i++)
    put_value(c->dtype, (float)kvc_test_rng_normal(&rng), su->q + i * esz(c->dtype));
  memset(su->out, 0xFF, elems * esz(c->dtype)); /* NaN: an unwritten element cannot pass */

  kvc_attn_args_t *a = &su->args;
  a->num_q_heads = c->num_q_heads;
  a->num_kv_heads = c->num_kv_heads;
  a->head_dim = c->head_dim;
  a->block_tokens = c->block_tokens;
  a->dtype = c->dtype;
  a->scale = 1.0f / sqrtf((float)c->head_dim);
  a->num_seqs = c->num_seqs;
  a->total_q_rows = rows;
  a->qo_indptr = su->qo_indptr;
  a->kv_len = su->tp.kv_len;
  a->block_indptr = su->tp.block_indptr;
  a->block_ids = su->tp.block_ids;
  a->max_kv_len = su->tp.max_kv_len;
  a->dir = su->tp.dir;
  a->pool = su->tp.pool;
  a->chunk_bytes = su->tp.chunk_bytes;
  a->q = su->q;
  a->out = su->out;
  a->ref_exact_codecs = exact;
}

static void teardown_case(attn_setup_t *su) {
  kvc_test_pages_free(&su->tp);
  free(su->qo_indptr);
  free(su->q);
  free(su->out);
  free(su->ref);
}

/* Every output element within one rounding of the dtype of the float64 reference. */
static void check_case_exact(const attn_case_t *c, uint32_t exact) {
  attn_setup_t su;
  setup_case(c, exact, &su);
  assert_int_equal(kvc_attn_cpu(&su.args), KVC_OK);
  naive_attention(&su.args, &su.tp, su.ref);
  size_t elems = (size_t)su.args.total_q_rows * c->num_q_heads * c->head_dim;
  /* f16 keeps 11 significant bits, bf16 8; f32 gets float64 rounding noise over long sums. */
  double rel = c->dtype == KVC_DTYPE_F16 ? 1.0 / 1024 : c->dtype == KVC_DTYPE_BF16 ? 1.0 / 128 : 1e-6;
  double err2 = 0, ref2 = 0;
  for (size_t i = 0; i < elems; i++) {
    double got = get_value(c->dtype, su.out + i * esz(c->dtype)), want = su.ref[i];
    assert_false(isnan(got));
    if (fabs(got - want) > rel * fabs(want) + 1e-6) {
      print_error("case seed %llu: element %zu got %.9g want %.9g\n", (unsigned long long)c->seed,
                  i, got, want);
      fail();
    }
    err2 += (got - want) * (got - want);
    ref2 += want * want;
  }
  assert_true(ref2 > 0);
  assert_true(sqrt(err2 / ref2) < rel);
  teardown_case(&su);
}

static void check_case(const attn_case_t *c) { check_case_exact(c, 0); }

static void sweep_sizes_and_gqa(void **state) {
  (void)state;
  static const int nseqs[] = {1, 3, 7, 37, 61};
  static const int gqa[][2] = {{4, 4}, {8, 2}, {16, 2}, {6, 2}}; /* groups 1, 4, 8, 3 */
  uint64_t seed = 100;
  for (size_t i = 0; i < sizeof(nseqs) / sizeof(nseqs[0]); i++)
    for (size_t g = 0; g < sizeof(gqa) / sizeof(gqa[0]); g++) {
      attn_case_t c = {nseqs[i], gqa[g][0], gqa[g][1], 64, 16, KVC_DTYPE_F16,
                       nseqs[i] > 10 ? 70 : 150, 1, KVC_TEST_PAGE_ALL, 0, seed++};
      check_case(&c);
    }
}

static void head_dims_and_dtypes(void **state) {
  (void)state;
  static const int hds[] = {8, 64, 128, 256};
  static const kvc_dtype_t dts[] = {KVC_DTYPE_F16, KVC_DTYPE_BF16, KVC_DTYPE_F32};
  uint64_t seed = 200;
  for (size_t i = 0; i < 4; i++)
    for (size_t d = 0; d < 3; d++) {
      attn_case_t c = {3, 8, 2, hds[i], 32, dts[d], 100, 2, KVC_TEST_PAGE_ALL, 0, seed++};
      check_case(&c);
    }
}

/* Several query rows per sequence: chunked prefill and speculative tokens, causal. */
static void multi_query_causal(void **state) {
  (void)state;
  attn_case_t cases[] = {
      {7, 8, 2, 64, 16, KVC_DTYPE_F16, 120, 20, KVC_TEST_PAGE_ALL, 0, 300},
      {3, 8, 8, 128, 64, KVC_DTYPE_BF16, 200, 70, KVC_TEST_PAGE_ALL, 0, 301},
      {1, 16, 2, 64, 16, KVC_DTYPE_F32, 90, 90, KVC_TEST_PAGE_ALL, 0, 302},
      {37, 4, 1, 64, 16, KVC_DTYPE_F16, 40, 5, KVC_TEST_PAGE_ALL, 0, 303},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) check_case(&cases[i]);
}

/* Each page kind alone, and sequences sharing their first blocks. */
static void page_kinds_and_sharing(void **state) {
  (void)state;
  static const unsigned kinds[] = {KVC_TEST_PAGE_STAGING, KVC_TEST_PAGE_RAW, KVC_TEST_PAGE_BITPACK,
                                   KVC_TEST_PAGE_HUFFMAN};
  uint64_t seed = 400;
  for (size_t i = 0; i < 4; i++) {
    attn_case_t c = {5, 8, 2, 64, 16, KVC_DTYPE_F16, 100, 3, kinds[i], 0, seed++};
    check_case(&c);
  }
  attn_case_t shared = {7, 8, 2, 64, 16, KVC_DTYPE_BF16, 120, 4, KVC_TEST_PAGE_ALL, 3, seed++};
  check_case(&shared);
}

/* Elements of out farther from ref than one rounding to the dtype (unit roundoff 2^-11 for f16,
 * 2^-8 for bf16; the output is rounded from float64 through float, hence the 2^-20) plus float64
 * noise. */
static size_t beyond_one_rounding(const attn_case_t *c, const attn_setup_t *su) {
  const double u = c->dtype == KVC_DTYPE_F16 ? 1.0 / 2048 : 1.0 / 256;
  const size_t elems = (size_t)su->args.total_q_rows * c->num_q_heads * c->head_dim;
  size_t n = 0;
  for (size_t i = 0; i < elems; i++) {
    const double got = get_value(c->dtype, su->out + i * esz(c->dtype)), want = su->ref[i];
    n += !(fabs(got - want) <= (u + 1.0 / (1 << 20)) * fabs(want) + 1e-9);
  }
  return n;
}

/* ref_exact_codecs: compressed pages' values as the codec's floats. The output is then within one
 * rounding of a naive reference over those floats in every element; rounding the values to bf16
 * first (the default) moves some elements farther, so the option is seen to act. */
static void exact_codecs(void **state) {
  (void)state;
  const uint32_t lossy = (1u << KVC_CODEC_BITPACK) | (1u << KVC_CODEC_HUFFMAN);
  attn_case_t c = {3, 8, 2, 64, 16, KVC_DTYPE_BF16, 150, 3, KVC_TEST_PAGE_ALL, 0, 500};
  attn_setup_t su;
  setup_case(&c, lossy, &su);
  assert_true(su.tp.pages_by_kind[2] > 0 && su.tp.pages_by_kind[3] > 0);
  assert_int_equal(kvc_attn_cpu(&su.args), KVC_OK);
  naive_attention(&su.args, &su.tp, su.ref);
  assert_int_equal(beyond_one_rounding(&c, &su), 0);
  su.args.ref_exact_codecs = 0;
  assert_int_equal(kvc_attn_cpu(&su.args), KVC_OK);
  assert_true(beyond_one_rounding(&c, &su) > 0);
  teardown_case(&su);
  /* Bit-pack alone exact, in f16 too, through the usual check. */
  attn_case_t f16 = {5, 8, 2, 128, 32, KVC_DTYPE_F16, 100, 2, KVC_TEST_PAGE_ALL, 0, 501};
  check_case_exact(&f16, 1u << KVC_CODEC_BITPACK);
}

static void rejects_bad_arguments(void **state) {
  (void)state;
  attn_case_t c = {3, 8, 2, 64, 16, KVC_DTYPE_F16, 50, 2, KVC_TEST_PAGE_ALL, 0, 500};
  attn_setup_t su;
  setup_case(&c, 0, &su);
  kvc_attn_args_t a = su.args;
  assert_int_equal(kvc_attn_cpu(NULL), KVC_ERR_INVALID_ARGUMENT);
  a.num_q_heads = 7; /* not a multiple of num_kv_heads */
  assert_int_equal(kvc_attn_cpu(&a), KVC_ERR_INVALID_ARGUMENT);
  a = su.args;
  a.head_dim = 12;
  assert_int_equal(kvc_attn_cpu(&a), KVC_ERR_INVALID_ARGUMENT);
  a = su.args;
  a.total_q_rows += 1; /* disagrees with qo_indptr */
  assert_int_equal(kvc_attn_cpu(&a), KVC_ERR_INVALID_ARGUMENT);
  a = su.args;
  int32_t lens[3] = {su.tp.kv_len[0], su.tp.kv_len[1], su.tp.kv_len[2]};
  lens[0] = (su.tp.block_indptr[1] - su.tp.block_indptr[0]) * c.block_tokens + 1; /* > blocks */
  a.kv_len = lens;
  a.max_kv_len = lens[0] > a.max_kv_len ? lens[0] : a.max_kv_len;
  assert_int_equal(kvc_attn_cpu(&a), KVC_ERR_INVALID_ARGUMENT);
  a = su.args;
  a.max_kv_len = 0; /* smaller than a kv_len */
  assert_int_equal(kvc_attn_cpu(&a), KVC_ERR_INVALID_ARGUMENT);
  teardown_case(&su);
}

static void rejects_corrupt_pages(void **state) {
  (void)state;
  attn_case_t c = {3, 8, 2, 64, 16, KVC_DTYPE_F16, 60, 1, KVC_TEST_PAGE_HUFFMAN, 0, 600};
  attn_setup_t su;
  setup_case(&c, 0, &su);
  /* Sequence 2 holds exactly one full block (setup_case pins it), so a compressed page exists. */
  int found = -1;
  for (int i = 0; i < su.tp.block_indptr[3] && found < 0; i++)
    if (su.tp.dir[su.tp.block_ids[i]].kind == KVC_PAGE_COMPRESSED) found = su.tp.block_ids[i];
  assert_true(found >= 0);
  kvc_page_entry_t saved = su.tp.dir[found];
  /* A byte flipped in the section table: the header checksum must catch it. */
  uint8_t *b = kvc_page_byte(su.tp.pool, su.tp.chunk_bytes, &su.tp.dir[found], 36);
  *b ^= 0x10;
  assert_int_equal(kvc_attn_cpu(&su.args), KVC_ERR_CORRUPT);
  *b ^= 0x10;
  /* A page entry that claims more bytes than its chunks hold. */
  su.tp.dir[found].nbytes = saved.nchunks * su.tp.chunk_bytes + 1;
  assert_int_equal(kvc_attn_cpu(&su.args), KVC_ERR_CORRUPT);
  /* An empty entry where a block is needed. */
  su.tp.dir[found].kind = KVC_PAGE_EMPTY;
  su.tp.dir[found].nbytes = saved.nbytes;
  assert_int_equal(kvc_attn_cpu(&su.args), KVC_ERR_CORRUPT);
  su.tp.dir[found] = saved;
  assert_int_equal(kvc_attn_cpu(&su.args), KVC_OK);
  teardown_case(&su);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(sweep_sizes_and_gqa),     cmocka_unit_test(head_dims_and_dtypes),
      cmocka_unit_test(multi_query_causal),      cmocka_unit_test(page_kinds_and_sharing),
      cmocka_unit_test(exact_codecs),            cmocka_unit_test(rejects_bad_arguments),
      cmocka_unit_test(rejects_corrupt_pages),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
