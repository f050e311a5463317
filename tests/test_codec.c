/*
 * CPU codec: every codec x bound mode x dtype on random and adversarial blocks, partial blocks,
 * head_dim 8..256. Every decoded value is checked against the bound (computed here independently
 * from the input, in double), pages are checked for determinism and self-description, policies
 * for their choice, and damaged pages for KVC_ERR_CORRUPT-or-valid (ASan in CI catches any
 * out-of-bounds access).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "compress/kvc_codec.h"
#include "compress/kvc_page_format.h"
#include "compress/kvc_quant.h"
#include "kvc_test_util.h"

/* ---- helpers ------------------------------------------------------------------------------ */

typedef enum {
  DATA_NORMAL,      /* per-channel offsets and scales, like real keys */
  DATA_CONSTANT,    /* every value the same */
  DATA_OUTLIER,     /* normal with one huge value */
  DATA_UNIFORM,     /* uniform over a range: all symbols equally likely */
  DATA_DENORMAL,    /* tiny values (fp16 subnormals) */
  DATA_OFFSET,      /* large offset, tiny range */
  DATA_ZERO,        /* all zeros, with negative zeros */
  DATA_COUNT
} data_kind_t;

typedef struct block {
  kvc_codec_params_t p;
  int n;          /* valid tokens */
  void *raw;      /* staging layout, p.dtype */
  float *x;       /* [2][H][block_tokens][hd] the input as float (exactly) */
} block_t;

static uint16_t to_half(kvc_dtype_t dt, float v) {
  return dt == KVC_DTYPE_F16 ? kvc_test_f32_to_f16(v) : kvc_test_f32_to_bf16(v);
}
static float from_half(kvc_dtype_t dt, uint16_t h) {
  return dt == KVC_DTYPE_F16 ? kvc_test_f16_to_f32(h) : kvc_test_bf16_to_f32(h);
}

static void block_set(block_t *b, size_t i, float v) {
  if (b->p.dtype == KVC_DTYPE_F32) {
    ((float *)b->raw)[i] = v;
    b->x[i] = v;
  } else {
    uint16_t h = to_half(b->p.dtype, v);
    ((uint16_t *)b->raw)[i] = h;
    b->x[i] = from_half(b->p.dtype, h);
  }
}

static kvc_codec_params_t params(kvc_dtype_t dt, int H, int hd, int bt, kvc_bound_mode_t mode,
                                 float bound) {
  kvc_codec_params_t p;
  memset(&p, 0, sizeof p);
  p.dtype = dt;
  p.num_kv_heads = H;
  p.head_dim = hd;
  p.block_tokens = bt;
  p.bound_mode = mode;
  p.k_bound = bound;
  p.v_bound = bound * 1.5f;
  p.policy = KVC_POLICY_FIXED;
  p.codec = KVC_CODEC_HUFFMAN;
  p.size_budget = 0.35f;
  return p;
}

static void block_make(block_t *b, const kvc_codec_params_t *p, int n, data_kind_t kind,
                       uint64_t seed) {
  b->p = *p;
  b->n = n;
  size_t count = kvc_codec_staging_bytes(p) / kvc_dtype_bytes(p->dtype);
  b->raw = calloc(count, kvc_dtype_bytes(p->dtype));
  b->x = calloc(count, sizeof(float));
  assert_non_null(b->raw);
  assert_non_null(b->x);
  kvc_test_rng_t r;
  kvc_test_rng_seed(&r, seed);
  const int hd = p->head_dim, bt = p->block_tokens;
  float cst = (float)(kvc_test_rng_normal(&r) * 3.0);
  for (size_t i = 0; i < count; i++) {
    int d = (int)(i % hd), t = (int)((i / hd) % bt);
    float v;
    switch (kind) {
    case DATA_CONSTANT: v = cst; break;
    case DATA_UNIFORM: v = (float)(kvc_test_rng_uniform(&r) * 4.0 - 2.0); break;
    case DATA_DENORMAL: v = (float)(kvc_test_rng_normal(&r) * 3e-6); break;
    case DATA_OFFSET: v = 1000.0f + (float)(kvc_test_rng_uniform(&r) * 0.01); break;
    case DATA_ZERO: v = (i & 1) ? -0.0f : 0.0f; break;
    default: {
      double scale = 0.2 + (d % 7) * 0.4, off = ((d * 37) % 11) - 5.0;
      v = (float)(off + scale * kvc_test_rng_normal(&r));
      if (kind == DATA_OUTLIER && t == 3 && d == hd / 2) v = p->dtype == KVC_DTYPE_F16 ? 6.0e4f : 3.0e6f;
    }
    }
    block_set(b, i, v);
  }
}

static void block_free(block_t *b) {
  free(b->raw);
  free(b->x);
}

/* Largest |decoded - input| / bound over section (tensor, head); +inf if a zero bound is broken. */
static double err_over_bound(const block_t *b, int tensor, int head, const float *dec) {
  const kvc_codec_params_t *p = &b->p;
  const float *x = b->x + ((size_t)tensor * p->num_kv_heads + head) * p->block_tokens * p->head_dim;
  return kvc_test_bound_ratio(x, dec, b->n, p->head_dim, tensor,
                              p->bound_mode == KVC_BOUND_RELATIVE,
                              tensor == 0 ? p->k_bound : p->v_bound);
}

/* Encodes (policy or one codec), checks the page fully; returns the page (caller frees). */
static uint8_t *encode_check(const block_t *b, int with, kvc_codec_t codec, kvc_status_t want,
                             size_t *size_out, kvc_codec_t *codec_out, double *worst_out) {
  const kvc_codec_params_t *p = &b->p;
  size_t cap = kvc_codec_max_page_bytes(p), size = 0, size2 = 0;
  uint8_t *page = malloc(cap), *page2 = malloc(cap);
  assert_non_null(page);
  assert_non_null(page2);
  memset(page, 0xAB, cap);
  memset(page2, 0x5C, cap);
  kvc_status_t st = with ? kvc_codec_encode_with(p, codec, b->raw, b->n, page, cap, &size)
                         : kvc_codec_encode(p, b->raw, b->n, page, cap, &size);
  assert_int_equal(st, want);
  if (st != KVC_OK) {
    free(page);
    free(page2);
    return NULL;
  }
  /* Deterministic, independent of the output buffer's previous contents (and, with the caller's
   * work buffer, of that buffer's). */
  const size_t wb = kvc_codec_work_bytes(p);
  void *work = malloc(wb);
  assert_non_null(work);
  memset(work, 0xE7, wb);
  st = with ? kvc_codec_encode_with(p, codec, b->raw, b->n, page2, cap, &size2)
            : kvc_codec_encode_work(p, b->raw, b->n, work, wb, page2, cap, &size2);
  free(work);
  assert_int_equal(st, KVC_OK);
  assert_int_equal(size, size2);
  assert_memory_equal(page, page2, size);
  free(page2);
  assert_true(size <= cap);
  assert_int_equal(size % 16, 0);

  kvc_page_info_t info;
  assert_int_equal(kvc_codec_page_info(page, size, &info), KVC_OK);
  assert_int_equal(info.bytes, size);
  assert_int_equal(info.n_tokens, b->n);
  assert_int_equal(info.head_dim, p->head_dim);
  assert_int_equal(info.num_kv_heads, p->num_kv_heads);
  assert_int_equal(info.dtype, p->dtype);
  if (with) assert_int_equal(info.codec, codec);
  /* A page is valid inside a larger buffer, not in a shorter one. */
  assert_int_equal(kvc_codec_page_info(page, cap, &info), KVC_OK);
  assert_int_equal(kvc_codec_page_info(page, size - 16, &info), KVC_ERR_CORRUPT);

  const int H = p->num_kv_heads, hd = p->head_dim, n = b->n;
  float *all = malloc(sizeof(float) * 2 * H * n * hd), *one = malloc(sizeof(float) * n * hd);
  assert_non_null(all);
  assert_non_null(one);
  assert_int_equal(kvc_codec_decode(page, size, all), KVC_OK);
  double worst = 0;
  for (int s = 0; s < 2 * H; s++) {
    assert_int_equal(kvc_codec_decode_head(page, size, s / H, s % H, one), KVC_OK);
    assert_memory_equal(one, all + (size_t)s * n * hd, sizeof(float) * n * hd);
    double w = err_over_bound(b, s / H, s % H, one);
    if (info.codec == KVC_CODEC_RAW) assert_true(w == 0.0);
    if (w > worst) worst = w;
  }
  assert_true(worst <= 1.0);
  free(all);
  free(one);
  if (size_out) *size_out = size;
  if (codec_out) *codec_out = info.codec;
  if (worst_out) *worst_out = worst;
  return page;
}

/* ---- tests -------------------------------------------------------------------------------- */

static void every_codec_mode_dtype_and_shape_meets_the_bound(void **state) {
  (void)state;
  const kvc_dtype_t dts[3] = {KVC_DTYPE_F16, KVC_DTYPE_BF16, KVC_DTYPE_F32};
  const int hds[6] = {8, 16, 24, 64, 128, 256};
  const float bounds[3] = {0.01f, 0.05f, 0.2f};
  uint64_t seed = 1;
  for (int di = 0; di < 3; di++) {
    for (int hi = 0; hi < 6; hi++) {
      for (int mode = 0; mode < 2; mode++) {
        for (int bi = 0; bi < 3; bi++) {
          int hd = hds[hi], bt = hd >= 128 ? 32 : 64, H = 1 + (int)(seed % 3);
          int n = (int)(seed % 4) == 0 ? 1 + (int)(seed % (unsigned)bt) : bt; /* partial blocks */
          kvc_codec_params_t p = params(dts[di], H, hd, bt, (kvc_bound_mode_t)mode, bounds[bi]);
          block_t b;
          block_make(&b, &p, n, DATA_NORMAL, seed++);
          size_t sz[3];
          /* A quantized section has a 16-byte header and at least one word, and keys of a block
           * of very few tokens are per-channel groups of very few values (exact, wide codes): a
           * codec refuses (never enlarges) such sections; from 8 tokens and 64 values on it must
           * code. */
          int tiny = n * hd < 64 || n < 8;
          for (int c = 0; c < 3; c++) {
            kvc_status_t want = KVC_OK;
            if (c != 0 && tiny) {
              size_t cap = kvc_codec_max_page_bytes(&p), size;
              uint8_t *tmp = malloc(cap);
              assert_non_null(tmp);
              want = kvc_codec_encode_with(&p, (kvc_codec_t)c, b.raw, n, tmp, cap, &size);
              assert_true(want == KVC_OK || want == KVC_ERR_UNSUPPORTED);
              free(tmp);
            }
            uint8_t *page = encode_check(&b, 1, (kvc_codec_t)c, want, &sz[c], NULL, NULL);
            free(page);
          }
          /* Quantized pages are smaller than raw ones; Huffman beats bit-pack on this data
           * unless the block is small (codebook and lane overhead). */
          if (!tiny) assert_true(sz[1] < sz[0]);
          if (n * hd >= 1024) assert_true(sz[2] <= sz[1]);
          block_free(&b);
        }
      }
    }
  }
}

static void adversarial_blocks_meet_the_bound(void **state) {
  (void)state;
  const kvc_dtype_t dts[3] = {KVC_DTYPE_F16, KVC_DTYPE_BF16, KVC_DTYPE_F32};
  uint64_t seed = 100;
  for (int kind = DATA_CONSTANT; kind < DATA_COUNT; kind++) {
    for (int di = 0; di < 3; di++) {
      for (int mode = 0; mode < 2; mode++) {
        for (int c = 1; c < 3; c++) {
          float bound = mode == KVC_BOUND_ABSOLUTE && kind == DATA_DENORMAL ? 1e-7f : 0.05f;
          kvc_codec_params_t p = params(dts[di], 2, 64, 64, (kvc_bound_mode_t)mode, bound);
          block_t b;
          int n = 64 - (int)(seed % 2) * 17;
          block_make(&b, &p, n, (data_kind_t)kind, seed++);
          /* Encoding with a codec may refuse (too wide a range) but then the policy stores raw. */
          size_t cap = kvc_codec_max_page_bytes(&p), size;
          uint8_t *tmp = malloc(cap);
          assert_non_null(tmp);
          kvc_status_t st = kvc_codec_encode_with(&p, (kvc_codec_t)c, b.raw, b.n, tmp, cap, &size);
          free(tmp);
          assert_true(st == KVC_OK || st == KVC_ERR_UNSUPPORTED);
          /* Codable kinds must be coded (not refused) by both codecs. */
          if (kind == DATA_CONSTANT || kind == DATA_UNIFORM || kind == DATA_ZERO ||
              (kind == DATA_OFFSET && mode == KVC_BOUND_RELATIVE))
            assert_int_equal(st, KVC_OK);
          free(encode_check(&b, 1, (kvc_codec_t)c, st, NULL, NULL, NULL));
          b.p.codec = (kvc_codec_t)c;
          kvc_codec_t got;
          free(encode_check(&b, 0, 0, KVC_OK, NULL, &got, NULL));
          assert_int_equal(got, st == KVC_OK ? (kvc_codec_t)c : KVC_CODEC_RAW);
          block_free(&b);
        }
      }
    }
  }
}

static void constant_and_zero_blocks_are_exact_and_tiny(void **state) {
  (void)state;
  for (int kind = DATA_CONSTANT; kind <= DATA_ZERO; kind += DATA_ZERO - DATA_CONSTANT) {
    kvc_codec_params_t p = params(KVC_DTYPE_F16, 4, 128, 64, KVC_BOUND_RELATIVE, 0.05f);
    block_t b;
    block_make(&b, &p, 64, (data_kind_t)kind, 7);
    size_t size;
    double worst;
    free(encode_check(&b, 1, KVC_CODEC_HUFFMAN, KVC_OK, &size, NULL, &worst));
    assert_true(worst == 0.0);
    /* Header + table + 8 sections of header + a few words: far below 1 bit per value. */
    assert_true(size * 8 < (size_t)2 * 4 * 64 * 128 / 8);
    block_free(&b);
  }
}

/* Page format 3: a RAW page's sections start 128-byte aligned whenever its rows are a multiple of
 * 128 bytes (the GPU's bulk copies read such sources at full speed), and its gap before the first
 * section is part of what page_info checks. Quantized pages keep the 16-byte start. */
static void raw_sections_start_128_byte_aligned(void **state) {
  (void)state;
  const int heads[] = {1, 2, 3, 4, 8, 13};
  for (int hi = 0; hi < 6; hi++) {
    for (int hd = 64; hd <= 256; hd *= 2) {
      const int H = heads[hi], n = 1 + (hi * 23 + hd) % 64;
      kvc_codec_params_t p = params(KVC_DTYPE_F16, H, hd, 64, KVC_BOUND_RELATIVE, 0.05f);
      block_t b;
      block_make(&b, &p, n, DATA_NORMAL, 900 + (uint64_t)(hi * 4 + hd));
      size_t size;
      uint8_t *page = encode_check(&b, 1, KVC_CODEC_RAW, KVC_OK, &size, NULL, NULL);
      for (uint32_t i = 0; i < 2u * (uint32_t)H; i++) {
        uint32_t off, bytes;
        kvc_page_section(page, (uint32_t)H, i, &off, &bytes);
        assert_int_equal(off % 128, 0);
        assert_int_equal(bytes, (uint32_t)n * (uint32_t)hd * 2u);
      }
      const uint32_t table_end = KVC_PAGE_HEADER_BYTES + kvc_page_table_bytes((uint32_t)H);
      kvc_page_info_t info;
      if (table_end % 128 != 0) {
        page[table_end] ^= 1; /* a gap byte */
        assert_int_equal(kvc_codec_page_info(page, size, &info), KVC_ERR_CORRUPT);
        page[table_end] ^= 1;
      }
      assert_int_equal(kvc_codec_page_info(page, size, &info), KVC_OK);
      free(page);
      block_free(&b);
      block_make(&b, &p, 64, DATA_NORMAL, 950 + (uint64_t)(hi * 4 + hd)); /* codable as bit-pack */
      page = encode_check(&b, 1, KVC_CODEC_BITPACK, KVC_OK, &size, NULL, NULL);
      uint32_t off0, bytes0;
      kvc_page_section(page, (uint32_t)H, 0, &off0, &bytes0);
      assert_int_equal(off0, kvc_align16(table_end));
      free(page);
      block_free(&b);
    }
  }
}

static void non_finite_blocks_are_stored_raw(void **state) {
  (void)state;
  const float bad[3] = {NAN, INFINITY, -INFINITY};
  for (int i = 0; i < 3; i++) {
    for (int di = 0; di < 3; di++) {
      kvc_codec_params_t p = params((kvc_dtype_t)di, 2, 16, 16, (kvc_bound_mode_t)(i % 2), 0.05f);
      block_t b;
      block_make(&b, &p, 16, DATA_NORMAL, 40 + i);
      block_set(&b, (size_t)(3 * 16 * 16 + 5 * 16 + 7), bad[i]); /* V, head 1, token 5 */
      for (int c = 1; c < 3; c++) {
        size_t cap = kvc_codec_max_page_bytes(&p), size;
        uint8_t *page = malloc(cap);
        assert_non_null(page);
        assert_int_equal(kvc_codec_encode_with(&p, (kvc_codec_t)c, b.raw, 16, page, cap, &size),
                         KVC_ERR_UNSUPPORTED);
        free(page);
      }
      for (int pol = 0; pol < 3; pol++) {
        p.policy = (kvc_codec_policy_t)pol;
        b.p = p;
        kvc_codec_t got;
        size_t cap = kvc_codec_max_page_bytes(&p), size;
        uint8_t *page = malloc(cap);
        float *out = malloc(sizeof(float) * 16 * 16);
        assert_non_null(page);
        assert_non_null(out);
        assert_int_equal(kvc_codec_encode(&p, b.raw, 16, page, cap, &size), KVC_OK);
        kvc_page_info_t info;
        assert_int_equal(kvc_codec_page_info(page, size, &info), KVC_OK);
        got = info.codec;
        assert_int_equal(got, KVC_CODEC_RAW);
        assert_int_equal(kvc_codec_decode_head(page, size, 1, 1, out), KVC_OK);
        float v = out[5 * 16 + 7];
        if (isnan(bad[i])) assert_true(isnan(v));
        else assert_true(v == bad[i]);
        free(page);
        free(out);
      }
      block_free(&b);
    }
  }
}

static void policies_pick_as_documented(void **state) {
  (void)state;
  for (int mode = 0; mode < 2; mode++) {
    kvc_codec_params_t p = params(KVC_DTYPE_F16, 2, 64, 64, (kvc_bound_mode_t)mode, 0.05f);
    block_t b;
    block_make(&b, &p, 64, DATA_NORMAL, 77 + mode);
    size_t sz[3];
    for (int c = 0; c < 3; c++) free(encode_check(&b, 1, (kvc_codec_t)c, KVC_OK, &sz[c], NULL, NULL));
    int smallest = 0;
    for (int c = 1; c < 3; c++)
      if (sz[c] < sz[smallest]) smallest = c;
    kvc_codec_t got;
    size_t size;
    b.p.policy = KVC_POLICY_SMALLEST;
    free(encode_check(&b, 0, 0, KVC_OK, &size, &got, NULL));
    assert_int_equal(got, smallest);
    assert_int_equal(size, sz[smallest]);
    /* Fastest within the budget: raw only fits a budget >= 1; then bit-pack, then Huffman. */
    b.p.policy = KVC_POLICY_FASTEST_WITHIN;
    b.p.size_budget = 1.0f;
    free(encode_check(&b, 0, 0, KVC_OK, NULL, &got, NULL));
    assert_int_equal(got, KVC_CODEC_RAW);
    b.p.size_budget = (float)((double)sz[1] / (double)sz[0]) + 1e-4f;
    free(encode_check(&b, 0, 0, KVC_OK, NULL, &got, NULL));
    assert_int_equal(got, KVC_CODEC_BITPACK);
    b.p.size_budget = (float)((double)(sz[1] - 16) / (double)sz[0]);
    free(encode_check(&b, 0, 0, KVC_OK, NULL, &got, NULL));
    double budget = (double)b.p.size_budget * (double)sz[0];
    assert_true((double)sz[1] > budget);
    assert_int_equal(got, (double)sz[2] <= budget ? KVC_CODEC_HUFFMAN : (kvc_codec_t)smallest);
    b.p.size_budget = 0.01f; /* nothing fits: smallest */
    free(encode_check(&b, 0, 0, KVC_OK, NULL, &got, NULL));
    assert_int_equal(got, smallest);
    for (int c = 0; c < 3; c++) {
      b.p.policy = KVC_POLICY_FIXED;
      b.p.codec = (kvc_codec_t)c;
      free(encode_check(&b, 0, 0, KVC_OK, NULL, &got, NULL));
      assert_int_equal(got, c);
    }
    block_free(&b);
  }
}

static void bad_arguments_are_rejected(void **state) {
  (void)state;
  kvc_codec_params_t p = params(KVC_DTYPE_F16, 2, 64, 64, KVC_BOUND_RELATIVE, 0.05f);
  assert_int_equal(kvc_codec_check_params(&p), KVC_OK);
  assert_int_equal(kvc_codec_check_params(NULL), KVC_ERR_INVALID_ARGUMENT);
  kvc_codec_params_t q = p;
  q.k_bound = 0;
  assert_int_equal(kvc_codec_check_params(&q), KVC_ERR_INVALID_ARGUMENT);
  q = p;
  q.v_bound = NAN;
  assert_int_equal(kvc_codec_check_params(&q), KVC_ERR_INVALID_ARGUMENT);
  q = p;
  q.head_dim = 12;
  assert_int_equal(kvc_codec_check_params(&q), KVC_ERR_UNSUPPORTED);
  q = p;
  q.head_dim = 512;
  assert_int_equal(kvc_codec_check_params(&q), KVC_ERR_UNSUPPORTED);
  q = p;
  q.dtype = (kvc_dtype_t)7;
  assert_int_equal(kvc_codec_check_params(&q), KVC_ERR_INVALID_ARGUMENT);
  q = p;
  q.policy = KVC_POLICY_FASTEST_WITHIN;
  q.size_budget = 0;
  assert_int_equal(kvc_codec_check_params(&q), KVC_ERR_INVALID_ARGUMENT);

  size_t cap = kvc_codec_max_page_bytes(&p), size;
  uint8_t *page = calloc(1, cap);
  void *blk = calloc(1, kvc_codec_staging_bytes(&p));
  float out[64];
  assert_non_null(page);
  assert_non_null(blk);
  assert_int_equal(kvc_codec_encode(&p, blk, 0, page, cap, &size), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_codec_encode(&p, blk, 65, page, cap, &size), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_codec_encode(&p, blk, 64, page, cap - 1, &size), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_codec_encode_with(&p, (kvc_codec_t)3, blk, 64, page, cap, &size),
                   KVC_ERR_INVALID_ARGUMENT);
  const size_t wb = kvc_codec_work_bytes(&p);
  uint8_t *work = malloc(wb + 4); /* the work buffer: too small, absent, misaligned, right */
  assert_non_null(work);
  assert_int_equal(kvc_codec_encode_work(&p, blk, 64, work, wb - 1, page, cap, &size),
                   KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_codec_encode_work(&p, blk, 64, NULL, wb, page, cap, &size),
                   KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_codec_encode_work(&p, blk, 64, work + 1, wb, page, cap, &size),
                   KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_codec_encode_work(&p, blk, 64, work, wb, page, cap, &size), KVC_OK);
  free(work);
  assert_int_equal(kvc_codec_encode(&p, blk, 1, page, cap, &size), KVC_OK);
  assert_int_equal(kvc_codec_decode_head(page, size, 2, 0, out), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_codec_decode_head(page, size, 0, 2, out), KVC_ERR_INVALID_ARGUMENT);
  assert_int_equal(kvc_codec_page_info(NULL, size, NULL), KVC_ERR_CORRUPT);
  free(page);
  free(blk);
}

/* Flips bytes / truncates pages: every call returns KVC_ERR_CORRUPT or decodes; damage to the
 * header or section table is always caught by the checksum or the format checks. */
static void damaged_pages_are_caught_or_decoded_in_bounds(void **state) {
  (void)state;
  const int iters = (int)(300 * kvc_test_scale());
  kvc_test_rng_t r;
  kvc_test_rng_seed(&r, 9);
  for (int mode = 0; mode < 2; mode++) {
    for (int c = 0; c < 3; c++) {
      kvc_codec_params_t p = params(KVC_DTYPE_F16, 2, 32, 32, (kvc_bound_mode_t)mode, 0.05f);
      block_t b;
      block_make(&b, &p, 29, DATA_NORMAL, 500 + (uint64_t)c);
      size_t size;
      uint8_t *page = encode_check(&b, 1, (kvc_codec_t)c, KVC_OK, &size, NULL, NULL);
      uint8_t *bad = malloc(size);
      float *out = malloc(sizeof(float) * 4 * 32 * 32);
      assert_non_null(bad);
      assert_non_null(out);
      const size_t meta = kvc_page_sections_start(2, (uint32_t)c);
      int corrupt = 0, decoded = 0;
      for (int it = 0; it < iters; it++) {
        memcpy(bad, page, size);
        size_t at = it % 3 == 0 ? kvc_test_rng_below(&r, (uint32_t)meta)
                                : kvc_test_rng_below(&r, (uint32_t)size);
        int flips = 1 + (int)kvc_test_rng_below(&r, 3);
        for (int f = 0; f < flips; f++) {
          size_t a = f == 0 ? at : kvc_test_rng_below(&r, (uint32_t)size);
          bad[a] ^= (uint8_t)(1u << kvc_test_rng_below(&r, 8));
        }
        size_t len = it % 7 == 0 ? kvc_test_rng_below(&r, (uint32_t)size + 1) : size;
        kvc_status_t st = kvc_codec_decode(bad, len, out);
        assert_true(st == KVC_OK || st == KVC_ERR_CORRUPT);
        if (at < meta && flips == 1) assert_int_equal(st, KVC_ERR_CORRUPT);
        for (int s = 0; s < 4; s++) {
          kvc_status_t sh = kvc_codec_decode_head(bad, len, s / 2, s % 2, out);
          assert_true(sh == KVC_OK || sh == KVC_ERR_CORRUPT);
        }
        if (st == KVC_OK) decoded++;
        else corrupt++;
      }
      assert_true(corrupt > 0);
      /* Raw payload bytes have no redundancy: flips there must still decode. */
      if (c == KVC_CODEC_RAW) assert_true(decoded > 0);
      free(page);
      free(bad);
      free(out);
      block_free(&b);
    }
  }
}

/* Stream bits [pos, pos + w) of MSB-first words, read bit by bit (bit b: bit 31 - b % 32 of word
 * b / 32). */
static uint32_t stream_field(const uint8_t *words, uint64_t pos, uint32_t w) {
  uint32_t v = 0;
  for (uint64_t b = pos; b < pos + w; b++)
    v = v << 1 | ((kvc_rd_u32(words + 4 * (b / 32)) >> (31 - b % 32)) & 1u);
  return v;
}

/* Row bit i of token t of a paired section whose codes start at word k0, row_bits per token: word
 * m = i / 16 of block t / 2 (row_bits / 16 words), low half for an even t, high for an odd one,
 * each half most significant bit first. */
static uint32_t paired_row_bit(const uint8_t *words, uint32_t k0, uint32_t row_bits, int t,
                               uint32_t i) {
  const uint32_t word = kvc_rd_u32(words + 4 * (k0 + (uint32_t)t / 2 * (row_bits / 16) + i / 16));
  const uint32_t half = t % 2 ? word >> 16 : word & 0xffffu;
  return (half >> (15 - i % 16)) & 1u;
}

/*
 * The bit-pack layout, pinned by hand: blocks of 5 tokens (odd) at head_dim 16, 24 and 64, with
 * integers whose codes are known without the codec. Relative bound 1/32 of a range of 16 gives
 * step 1, so a code is the value less its group's smallest (keys: channel offsets, values: token
 * offsets); absolute bound 0.5 gives step 1 and codes zigzag(x - centre), centre = the channel's
 * mean rounded half up. Values of head_dim 16 and 64 must be paired (codes from the first word
 * after the group fields, two tokens per word), keys and head_dim 24 linear; sizes exact.
 */
static void bitpack_value_sections_pair_tokens(void **state) {
  (void)state;
  enum { N = 5, BT = 8, H = 2 };
  const int hds[3] = {16, 24, 64};
  for (int hi = 0; hi < 3; hi++) {
    for (int mode = 0; mode < 2; mode++) {
      const int hd = hds[hi];
      const float bound = mode == KVC_BOUND_RELATIVE ? 1.0f / 32 : 0.5f;
      kvc_codec_params_t p = params(KVC_DTYPE_F16, H, hd, BT, (kvc_bound_mode_t)mode, bound);
      p.v_bound = bound;
      block_t b = {p, N, NULL, NULL};
      const size_t count = kvc_codec_staging_bytes(&p) / 2;
      b.raw = calloc(count, 2);
      b.x = calloc(count, sizeof(float));
      assert_non_null(b.raw);
      assert_non_null(b.x);
      /* Each key channel and each value token spans exactly [offset, offset + 16]. */
      uint32_t *want = malloc(sizeof(uint32_t) * N * hd);
      assert_non_null(want);
      for (int sec = 0; sec < 2 * H; sec++) {
        const int keys = sec < H;
        for (int t = 0; t < N; t++) {
          for (int d = 0; d < hd; d++) {
            const int i = keys ? t : d, g = (7 * t + 3 * d) % 17;
            const int off = keys ? 2 * d + 1 + sec * 5 : 3 * t + 1 + sec * 5;
            block_set(&b, ((size_t)sec * BT + t) * hd + d, (float)(off + (i < 2 ? 16 * i : g)));
          }
        }
      }
      size_t size;
      double worst;
      uint8_t *page = encode_check(&b, 1, KVC_CODEC_BITPACK, KVC_OK, &size, NULL, &worst);
      assert_true(worst == 0.0); /* step 1 on integers */
      for (int sec = 0; sec < 2 * H; sec++) {
        const int tensor = sec / H, paired = tensor == 1 && hd % 16 == 0;
        const float *x = b.x + (size_t)sec * BT * hd;
        uint32_t max_u = 0;
        for (int t = 0; t < N; t++) {
          for (int d = 0; d < hd; d++) {
            const int v = (int)x[(size_t)t * hd + d];
            uint32_t u;
            if (mode == KVC_BOUND_RELATIVE) {
              float lo = INFINITY;
              for (int i = 0; i < (tensor == 0 ? N : hd); i++)
                lo = fminf(lo, x[tensor == 0 ? (size_t)i * hd + d : (size_t)t * hd + i]);
              u = (uint32_t)(v - (int)lo);
            } else {
              int64_t sum = 0;
              for (int i = 0; i < N; i++) sum += (int64_t)x[(size_t)i * hd + d];
              const int dev = v - (int)floor((double)sum / N + 0.5);
              u = dev < 0 ? (uint32_t)(-2 * dev - 1) : (uint32_t)(2 * dev);
            }
            want[t * hd + d] = u;
            if (u > max_u) max_u = u;
          }
        }
        uint32_t off, bytes;
        kvc_page_section(page, H, (uint32_t)sec, &off, &bytes);
        kvc_qsec_header_t qh;
        kvc_qsec_header_read(page + off, &qh);
        const uint32_t w = qh.width, groups = mode == KVC_BOUND_ABSOLUTE || tensor == 0 ? hd : N;
        assert_int_equal(w, 32 - __builtin_clz(max_u));
        if (mode == KVC_BOUND_RELATIVE) assert_int_equal(w, 5); /* codes 0..16 */
        const uint32_t meta = groups * (qh.w_e + qh.w_b), row_bits = (uint32_t)hd * w;
        const uint8_t *words = page + off + KVC_QSEC_HEADER_BYTES;
        if (paired) {
          const uint32_t k0 = (meta + 31) / 32;
          assert_int_equal(bytes, KVC_QSEC_HEADER_BYTES + 4 * (k0 + (N + 1) / 2 * row_bits / 16));
          assert_int_equal(stream_field(words, meta, 32 * k0 - meta), 0); /* the gap */
          for (int t = 0; t <= N; t++) { /* token N: the odd token's zero row */
            for (int d = 0; d < hd; d++) {
              uint32_t u = 0;
              for (uint32_t i = (uint32_t)d * w; i < (uint32_t)(d + 1) * w; i++)
                u = u << 1 | paired_row_bit(words, k0, row_bits, t, i);
              assert_int_equal(u, t < N ? want[t * hd + d] : 0);
            }
          }
        } else {
          assert_int_equal(bytes, KVC_QSEC_HEADER_BYTES + 4 * ((meta + N * row_bits + 31) / 32));
          for (int t = 0; t < N; t++)
            for (int d = 0; d < hd; d++)
              assert_int_equal(stream_field(words, meta + (uint64_t)t * row_bits + d * w, w),
                               want[t * hd + d]);
        }
      }
      free(want);
      free(page);
      block_free(&b);
    }
  }
}

static void huffman_lengths_are_limited_complete_and_optimal_when_short(void **state) {
  (void)state;
  uint32_t counts[KVC_SYM_COUNT];
  uint8_t len[KVC_SYM_COUNT];
  /* Fibonacci counts force an unlimited depth of n - 1; the limit folds it to
   * KVC_HUF_DIRECT_LEN when every symbol is direct (30 of them), else to KVC_HUF_MAX_LEN (the
   * same counts on symbols 10..39). */
  for (int first = 0; first <= 10; first += 10) {
    memset(counts, 0, sizeof counts);
    uint32_t a = 1, bb = 1;
    for (int s = first; s < first + 30; s++) {
      counts[s] = a;
      uint32_t t = a + bb;
      a = bb;
      bb = t;
    }
    const int limit = first == 0 ? KVC_HUF_DIRECT_LEN : KVC_HUF_MAX_LEN;
    assert_int_equal(kvc_huf_len_limit(first + 30), limit);
    assert_int_equal(kvc_huf_build_lengths(counts, len), first + 30);
    uint32_t kraft = 0;
    int longest = 0;
    for (int s = 0; s < KVC_SYM_COUNT; s++) {
      assert_true(len[s] <= limit);
      assert_true((len[s] == 0) == (counts[s] == 0));
      if (len[s] > longest) longest = len[s];
      if (len[s]) kraft += 1u << (KVC_HUF_MAX_LEN - len[s]);
    }
    assert_int_equal(longest, limit); /* the fold ran */
    assert_int_equal(kraft, KVC_HUF_TABLE_SIZE);
    /* More frequent symbols never get longer codes. */
    for (int s = first + 1; s < first + 30; s++) assert_true(len[s] <= len[s - 1]);
  }
  /* Dyadic counts give exactly -log2 p. */
  memset(counts, 0, sizeof counts);
  counts[3] = 8;
  counts[9] = 4;
  counts[40] = 2;
  counts[63] = 2;
  assert_int_equal(kvc_huf_build_lengths(counts, len), 64);
  assert_int_equal(len[3], 1);
  assert_int_equal(len[9], 2);
  assert_int_equal(len[40], 3);
  assert_int_equal(len[63], 3);
  /* One symbol: no bits at all. */
  memset(counts, 0, sizeof counts);
  counts[5] = 100;
  assert_int_equal(kvc_huf_build_lengths(counts, len), 6);
  for (int s = 0; s < KVC_SYM_COUNT; s++) assert_int_equal(len[s], 0);
}

static void step_codes_and_symbols_are_consistent(void **state) {
  (void)state;
  for (int e = KVC_STEP_CODE_MIN; e < KVC_STEP_CODE_MAX; e++) {
    float a = kvc_step_from_code(e), b = kvc_step_from_code(e + 1);
    assert_true(a > 0 && a < b && isnormal(a));
    assert_int_equal(kvc_step_code_floor((double)a), e);
    assert_int_equal(kvc_step_code_floor(nextafter((double)b, 0.0)), e);
  }
  assert_int_equal(kvc_step_code_floor(0.0), KVC_STEP_CODE_MIN - 1);
  assert_int_equal(kvc_step_code_floor(1e-300), KVC_STEP_CODE_MIN - 1);
  assert_int_equal(kvc_step_code_floor(INFINITY), KVC_STEP_CODE_MAX);
  for (uint32_t u = 0; u < (1u << KVC_Q_MAX_BITS); u += 1 + u / 64) {
    uint32_t s = kvc_sym_of(u);
    assert_true(s < KVC_SYM_COUNT);
    assert_true(u >= kvc_sym_base(s) && u - kvc_sym_base(s) < (1u << kvc_sym_extra(s)));
    assert_true(kvc_sym_extra(s) + KVC_HUF_MAX_LEN <= 30);
  }
  for (int32_t d = -5000; d < 5000; d += 7) assert_int_equal(kvc_unzigzag(kvc_zigzag(d)), d);
  assert_int_equal(kvc_q_center(-3, 2), -1); /* -1.5 rounds up to -1 */
  assert_int_equal(kvc_q_center(3, 2), 2);
  assert_int_equal(kvc_q_center(-7, 3), -2);
}

static void half_conversions_are_exact(void **state) {
  (void)state;
  for (uint32_t h = 0; h < 65536; h++) {
    float a = kvc_codec_f16_to_f32((uint16_t)h), b = kvc_test_f16_to_f32((uint16_t)h);
    if (isnan(b)) assert_true(isnan(a));
    else assert_memory_equal(&a, &b, 4);
    a = kvc_codec_bf16_to_f32((uint16_t)h);
    b = kvc_test_bf16_to_f32((uint16_t)h);
    assert_memory_equal(&a, &b, 4);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(every_codec_mode_dtype_and_shape_meets_the_bound),
      cmocka_unit_test(adversarial_blocks_meet_the_bound),
      cmocka_unit_test(constant_and_zero_blocks_are_exact_and_tiny),
      cmocka_unit_test(raw_sections_start_128_byte_aligned),
      cmocka_unit_test(non_finite_blocks_are_stored_raw),
      cmocka_unit_test(policies_pick_as_documented),
      cmocka_unit_test(bad_arguments_are_rejected),
      cmocka_unit_test(damaged_pages_are_caught_or_decoded_in_bounds),
      cmocka_unit_test(bitpack_value_sections_pair_tokens),
      cmocka_unit_test(huffman_lengths_are_limited_complete_and_optimal_when_short),
      cmocka_unit_test(step_codes_and_symbols_are_consistent),
      cmocka_unit_test(half_conversions_are_exact),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
