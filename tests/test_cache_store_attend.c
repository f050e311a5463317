/*
 * The CPU backend end to end: sequences of awkward lengths (1, 3, 63, 64, 65, 200 tokens) are
 * prefilled in one step, then grown by decode steps (one token) and a multi-token step, for every
 * codec and policy and every dtype, at head_dim 32 and at two whose rows are not a power of two
 * in size (24, 96). After each step, for every layer:
 *   - the pages the cache holds are read back through the directory (kvc__cache_read_page) and
 *     decoded with the CPU codec (kvc_codec_decode_head); staging pages must hold the stored values
 *     exactly, compressed pages must be within the configured error bound of them; blocks completed
 *     by an earlier step must be compressed, those completed by this step still staging pages
 *     (their compression waits for the next plan, so the step reads its own tokens exactly);
 *   - kvc_attend's output must equal a dense float64 reference computed over those decoded values
 *     (rounded to the cache dtype, as attention reads them),
 *     up to the rounding of the output dtype (1e-6 relative for f32);
 *   - with the raw codec and f32, the decoded values equal the originals, so the output equals
 *     dense attention over the original K/V; so does the prefill's with every codec (it reads
 *     nothing but its own tokens);
 *   - kvc_cache_validate passes.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "compress/kvc_codec.h"
#include "kvc_test_util.h"
#include "kvcomp.h"
#include "scheduler_hooks/kvc_cache_test.h"

enum { NUM_LAYERS = 2, KV_HEADS = 2, Q_HEADS = 4, NUM_SEQS = 6 };
static const int prompt_len[NUM_SEQS] = {1, 3, 63, 64, 65, 200};

typedef struct scenario {
  kvc_dtype_t dtype;
  kvc_codec_policy_t policy;
  kvc_codec_t codec;
  kvc_bound_mode_t bound_mode;
  int block_tokens;
  int head_dim;
} scenario_t;

/* The running scenario's head_dim: 32, or one whose rows (24 or 96 values) are not a power of two
 * in size and so may straddle two pool chunks once freed pages have scattered the free chunks. */
static int head_dim;

/* ---- dtype helpers ------------------------------------------------------------------------- */

static size_t esize(kvc_dtype_t t) { return t == KVC_DTYPE_F32 ? 4 : 2; }

static float round_to(kvc_dtype_t t, float x) {
  if (t == KVC_DTYPE_F16) return kvc_test_f16_to_f32(kvc_test_f32_to_f16(x));
  if (t == KVC_DTYPE_BF16) return kvc_test_bf16_to_f32(kvc_test_f32_to_bf16(x));
  return x;
}

static void put_value(kvc_dtype_t t, void *base, size_t i, float x) {
  if (t == KVC_DTYPE_F32) {
    ((float *)base)[i] = x;
  } else {
    uint16_t h = t == KVC_DTYPE_F16 ? kvc_test_f32_to_f16(x) : kvc_test_f32_to_bf16(x);
    ((uint16_t *)base)[i] = h;
  }
}

static float get_value(kvc_dtype_t t, const void *base, size_t i) {
  if (t == KVC_DTYPE_F32) return ((const float *)base)[i];
  uint16_t h = ((const uint16_t *)base)[i];
  return t == KVC_DTYPE_F16 ? kvc_test_f16_to_f32(h) : kvc_test_bf16_to_f32(h);
}

/* Half an ulp of the output dtype, relative. */
static double out_eps(kvc_dtype_t t) {
  return t == KVC_DTYPE_F16 ? ldexp(1.0, -11) : t == KVC_DTYPE_BF16 ? ldexp(1.0, -8) : 1e-6;
}

/* ---- the test's own copy of every sequence ------------------------------------------------- */

typedef struct seq {
  int len;
  float *k, *v;   /* [NUM_LAYERS][cap][KV_HEADS][head_dim] originals (dtype-rounded) */
  float *dk, *dv; /* same shape: what the cache's pages decode to */
} seq_t;

enum { SEQ_CAP = 256 };

static size_t at(int layer, int pos, int h, int d) {
  return (((size_t)layer * SEQ_CAP + (size_t)pos) * KV_HEADS + (size_t)h) * head_dim + (size_t)d;
}

/* Keys get a per-channel offset and a few wide channels, as real keys do; values are plain. */
static float gen_value(kvc_test_rng_t *r, int tensor, int h, int d) {
  double x = kvc_test_rng_normal(r);
  if (tensor == 0) x = x * (d % 7 == 0 ? 6.0 : 1.0) + 0.5 * (double)((d * 5 + h * 3) % 11 - 5);
  return (float)x;
}

/* Reads every page of `s` (`len` tokens, `len0` of them stored before this step) back and
 * decodes it into s->dk/s->dv; checks staging pages are exact and compressed pages within the
 * bound of the originals. Blocks completed by an earlier step must be compressed; blocks this
 * step completed must still be staging pages, so that this step's attention reads its own new
 * tokens exactly. */
/* Compressed pages read by decode_sequence that were packed (allocator/kvc_pool_layout.h). */
static int64_t packed_pages;

/* A packed page starts in the last chunk of its block's page of the previous layer, at or past
 * where that page ends; raw caches and layer 0 never pack. */
static void check_packing(kvc_cache_t *c, const kvc_config_t *cfg, int l, int32_t block,
                          const kvc_page_entry_t *e, uint8_t *page, size_t page_cap) {
  if (!e->first) return;
  uint32_t cb = 0;
  kvc__cache_geometry(c, &cb, NULL, NULL);
  assert_true(l > 0 && kvc_pack_codec(cfg->codec, cfg->policy));
  kvc_page_entry_t prev;
  assert_int_equal(kvc__cache_read_page(c, l - 1, block, &prev, page, page_cap), KVC_OK);
  assert_int_equal(prev.kind, KVC_PAGE_COMPRESSED);
  assert_true(prev.chunk[prev.nchunks - 1] == e->chunk[0]);
  assert_true(kvc_page_start(e, cb) >=
              kvc_page_start(&prev, cb) + prev.nbytes - (prev.nchunks - 1u) * cb);
  packed_pages++;
}

static void decode_sequence(kvc_cache_t *c, const kvc_config_t *cfg, kvc_seq_id_t id, seq_t *s,
                            int len0, int len, int l, uint8_t *page, size_t page_cap) {
  const int bt = cfg->block_tokens;
  const size_t rb = head_dim * esize(cfg->dtype);
  int32_t blocks[SEQ_CAP];
  int nblocks = 0;
  assert_int_equal(kvc__cache_seq_blocks(c, id, blocks, SEQ_CAP, &nblocks), KVC_OK);
  assert_int_equal(nblocks, (len + bt - 1) / bt);
  float *tmp = malloc((size_t)bt * head_dim * sizeof(float));
  assert_non_null(tmp);
  {
    for (int j = 0; j < nblocks; j++) {
      kvc_page_entry_t e;
      int ntok = len - j * bt < bt ? len - j * bt : bt;
      assert_int_equal(kvc__cache_read_page(c, l, blocks[j], &e, page, page_cap), KVC_OK);
      int earlier = (j + 1) * bt <= len0;
      assert_int_equal(e.kind, ntok == bt && earlier ? KVC_PAGE_COMPRESSED : KVC_PAGE_STAGING);
      if (e.kind == KVC_PAGE_COMPRESSED) {
        check_packing(c, cfg, l, blocks[j], &e, page, page_cap);
        assert_int_equal(kvc__cache_read_page(c, l, blocks[j], &e, page, page_cap), KVC_OK);
      }
      for (int t = 0; t < 2; t++) {
        float *orig = t ? s->v : s->k, *dec = t ? s->dv : s->dk;
        for (int h = 0; h < KV_HEADS; h++) {
          if (e.kind == KVC_PAGE_STAGING) {
            for (int tok = 0; tok < ntok; tok++) {
              size_t off = (((size_t)t * KV_HEADS + h) * bt + tok) * rb;
              for (int d = 0; d < head_dim; d++) {
                float x = get_value(cfg->dtype, page + off, (size_t)d);
                size_t i = at(l, j * bt + tok, h, d);
                assert_true(x == orig[i]); /* staging pages hold the values as stored */
                dec[i] = x;
              }
            }
            continue;
          }
          kvc_page_info_t info;
          assert_int_equal(kvc_codec_page_info(page, e.nbytes, &info), KVC_OK);
          assert_int_equal(info.n_tokens, bt);
          assert_int_equal((int)info.codec, (int)e.codec);
          assert_int_equal(kvc_codec_decode_head(page, e.nbytes, t, h, tmp), KVC_OK);
          /* The bound: absolute, or relative to the quantization group's range (keys: a channel
           * over the block's tokens; values: a token over its channels). */
          for (int tok = 0; tok < bt; tok++) {
            for (int d = 0; d < head_dim; d++) {
              size_t i = at(l, j * bt + tok, h, d);
              double x = orig[i], y = tmp[(size_t)tok * head_dim + d], lim;
              float bound = t ? cfg->v_bound : cfg->k_bound;
              if (cfg->bound_mode == KVC_BOUND_ABSOLUTE || info.codec == KVC_CODEC_RAW) {
                lim = info.codec == KVC_CODEC_RAW ? 0.0 : bound;
              } else {
                double mn = INFINITY, mx = -INFINITY;
                for (int g = 0; g < (t ? head_dim : bt); g++) {
                  double z = t ? orig[at(l, j * bt + tok, h, g)] : orig[at(l, j * bt + g, h, d)];
                  mn = z < mn ? z : mn;
                  mx = z > mx ? z : mx;
                }
                lim = bound * (mx - mn);
              }
              if (fabs(y - x) > lim * (1 + 1e-6))
                fail_msg("layer %d block %d codec %d t%d h%d tok %d d %d: decoded %.9g, original "
                         "%.9g, bound %.9g",
                         l, j, (int)info.codec, t, h, tok, d, y, x, lim);
              dec[i] = round_to(cfg->dtype, (float)y); /* attention reads the dtype */
            }
          }
        }
      }
    }
  }
  free(tmp);
}

/* Dense causal attention in float64 over k/v [NUM_LAYERS][SEQ_CAP][KV_HEADS][head_dim]. */
static void reference(const float *k, const float *v, int layer, int pos, const float *q,
                      float scale, double *out) {
  const int group = Q_HEADS / KV_HEADS;
  double *w = malloc((size_t)(pos + 1) * sizeof(double));
  assert_non_null(w);
  for (int hq = 0; hq < Q_HEADS; hq++) {
    int h = hq / group;
    double mx = -INFINITY, sum = 0;
    for (int p = 0; p <= pos; p++) {
      double dot = 0;
      for (int d = 0; d < head_dim; d++)
        dot += (double)q[hq * head_dim + d] * k[at(layer, p, h, d)];
      w[p] = dot * scale;
      mx = w[p] > mx ? w[p] : mx;
    }
    for (int p = 0; p <= pos; p++) sum += (w[p] = exp(w[p] - mx));
    for (int d = 0; d < head_dim; d++) {
      double acc = 0;
      for (int p = 0; p <= pos; p++) acc += w[p] * v[at(layer, p, h, d)];
      out[hq * head_dim + d] = acc / sum;
    }
  }
  free(w);
}

static void compare(const scenario_t *sc, const void *out, size_t row, const double *ref,
                    const char *what, int step, int seq, int pos, int layer) {
  double mx = 0;
  for (int i = 0; i < Q_HEADS * head_dim; i++) mx = fabs(ref[i]) > mx ? fabs(ref[i]) : mx;
  for (int i = 0; i < Q_HEADS * head_dim; i++) {
    double o = get_value(sc->dtype, out, row * Q_HEADS * head_dim + (size_t)i);
    double tol = out_eps(sc->dtype) * fabs(ref[i]) + 1e-6 * mx + 1e-30;
    if (!(fabs(o - ref[i]) <= tol))
      fail_msg("%s: step %d seq %d pos %d layer %d element %d: got %.9g want %.9g (tol %.3g)", what,
               step, seq, pos, layer, i, o, ref[i], tol);
  }
}

/* One step: `add[i]` new tokens for each sequence; stores, attends and checks every layer. */
static void run_step(kvc_cache_t *c, const kvc_config_t *cfg, const scenario_t *sc, seq_t *seqs,
                     const int *add, int step, kvc_test_rng_t *rng, uint8_t *page,
                     size_t page_cap) {
  kvc_seq_id_t ids[NUM_SEQS];
  int32_t n_new[NUM_SEQS];
  int n = 0, rows = 0;
  for (int i = 0; i < NUM_SEQS; i++) {
    if (!add[i]) continue;
    ids[n] = 100 + (kvc_seq_id_t)i;
    n_new[n++] = add[i];
    rows += add[i];
  }
  kvc_batch_t batch = {n, ids, n_new, NULL};
  assert_int_equal(kvc_plan(c, &batch, NULL), KVC_OK);
  const size_t es = esize(sc->dtype), kv_row = KV_HEADS * head_dim, q_row = Q_HEADS * head_dim;
  uint8_t *k = malloc((size_t)rows * kv_row * es), *v = malloc((size_t)rows * kv_row * es);
  uint8_t *q = malloc((size_t)rows * q_row * es), *out = malloc((size_t)rows * q_row * es);
  float *qf = malloc((size_t)rows * q_row * sizeof(float));
  double *ref = malloc(q_row * sizeof(double));
  assert_true(k && v && q && out && qf && ref);
  const float scale = 1.0f / sqrtf((float)head_dim);

  for (int l = 0; l < NUM_LAYERS; l++) {
    int r = 0;
    for (int i = 0; i < NUM_SEQS; i++) {
      for (int t = 0; t < add[i]; t++, r++) {
        int pos = seqs[i].len + t;
        for (int h = 0; h < KV_HEADS; h++) {
          for (int d = 0; d < head_dim; d++) {
            size_t idx = (size_t)r * kv_row + (size_t)h * head_dim + (size_t)d;
            float kx = round_to(sc->dtype, gen_value(rng, 0, h, d));
            float vx = round_to(sc->dtype, gen_value(rng, 1, h, d));
            put_value(sc->dtype, k, idx, kx);
            put_value(sc->dtype, v, idx, vx);
            seqs[i].k[at(l, pos, h, d)] = kx;
            seqs[i].v[at(l, pos, h, d)] = vx;
          }
        }
        for (size_t e = 0; e < q_row; e++) {
          float x = round_to(sc->dtype, (float)kvc_test_rng_normal(rng));
          put_value(sc->dtype, q, (size_t)r * q_row + e, x);
          qf[(size_t)r * q_row + e] = x;
        }
      }
    }
    assert_int_equal(kvc_store(c, l, k, v, NULL), KVC_OK);
    assert_int_equal(kvc_attend(c, l, q, out, scale, NULL), KVC_OK);
    if (l == 0) {
      /* Stored layer 0, not layer 1 yet: the second store of a layer and an attend of a layer
       * not stored are out of order. */
      assert_int_equal(kvc_store(c, 0, k, v, NULL), KVC_ERR_INVALID_STATE);
      assert_int_equal(kvc_attend(c, 1, q, out, scale, NULL), KVC_ERR_INVALID_STATE);
      assert_int_equal(kvc_attend(c, 0, q, out, scale, NULL), KVC_OK);
    }
    for (int i = 0; i < NUM_SEQS; i++)
      if (add[i])
        decode_sequence(c, cfg, 100 + (kvc_seq_id_t)i, &seqs[i], seqs[i].len,
                        seqs[i].len + add[i], l, page, page_cap);
    r = 0;
    for (int i = 0; i < NUM_SEQS; i++) {
      for (int t = 0; t < add[i]; t++, r++) {
        int pos = seqs[i].len + t;
        reference(seqs[i].dk, seqs[i].dv, l, pos, qf + (size_t)r * q_row, scale, ref);
        compare(sc, out, (size_t)r, ref, "decoded reference", step, i, pos, l);
        /* A prefill attends to nothing but its own tokens: exactly, whatever the codec. */
        if (step == 0 || (sc->dtype == KVC_DTYPE_F32 && sc->policy == KVC_POLICY_FIXED &&
                          sc->codec == KVC_CODEC_RAW)) {
          reference(seqs[i].k, seqs[i].v, l, pos, qf + (size_t)r * q_row, scale, ref);
          compare(sc, out, (size_t)r, ref, "original reference", step, i, pos, l);
        }
      }
    }
  }
  for (int i = 0; i < NUM_SEQS; i++) seqs[i].len += add[i];
  assert_int_equal(kvc_cache_validate(c), KVC_OK);
  /* Once the step is complete no layer can be stored again until the next plan. */
  assert_int_equal(kvc_store(c, 0, k, v, NULL), KVC_ERR_INVALID_STATE);
  free(k);
  free(v);
  free(q);
  free(out);
  free(qf);
  free(ref);
}

static void run_scenario(const scenario_t *sc) {
  kvc_config_t cfg = KVC_CONFIG_INIT;
  head_dim = sc->head_dim;
  cfg.num_layers = NUM_LAYERS;
  cfg.num_q_heads = Q_HEADS;
  cfg.num_kv_heads = KV_HEADS;
  cfg.head_dim = head_dim;
  cfg.dtype = sc->dtype;
  cfg.block_tokens = sc->block_tokens;
  cfg.pool_bytes = (size_t)4 << 20;
  cfg.max_seqs = 16;
  cfg.max_seq_len = SEQ_CAP;
  cfg.max_batch_tokens = 512;
  cfg.prefix_caching = 0;
  cfg.policy = sc->policy;
  cfg.codec = sc->codec;
  cfg.bound_mode = sc->bound_mode;
  if (sc->bound_mode == KVC_BOUND_ABSOLUTE) cfg.k_bound = cfg.v_bound = 0.02f;
  kvc_cache_t *c = NULL;
  assert_int_equal(kvc_cache_create(&cfg, &c), KVC_OK);

  uint32_t max_page = 0;
  kvc__cache_geometry(c, NULL, &max_page, NULL);
  uint8_t *page = malloc(max_page);
  assert_non_null(page);
  seq_t seqs[NUM_SEQS];
  const size_t n = (size_t)NUM_LAYERS * SEQ_CAP * KV_HEADS * head_dim;
  for (int i = 0; i < NUM_SEQS; i++) {
    seqs[i].len = 0;
    seqs[i].k = calloc(n, sizeof(float));
    seqs[i].v = calloc(n, sizeof(float));
    seqs[i].dk = calloc(n, sizeof(float));
    seqs[i].dv = calloc(n, sizeof(float));
    assert_true(seqs[i].k && seqs[i].v && seqs[i].dk && seqs[i].dv);
    int cached = -1;
    assert_int_equal(kvc_seq_add(c, 100 + (kvc_seq_id_t)i, NULL, 0, 0, &cached), KVC_OK);
    assert_int_equal(cached, 0);
    assert_int_equal(kvc_seq_reserve(c, 100 + (kvc_seq_id_t)i, prompt_len[i] + 8, 0), KVC_OK);
  }
  kvc_test_rng_t rng;
  kvc_test_rng_seed(&rng, 1234 + (uint64_t)sc->dtype * 100 + (uint64_t)sc->policy * 10 +
                              (uint64_t)sc->codec);
  /* Prefill, three decode steps, then a multi-query step of 4 tokens for some sequences. */
  packed_pages = 0;
  run_step(c, &cfg, sc, seqs, prompt_len, 0, &rng, page, max_page);
  const int one[NUM_SEQS] = {1, 1, 1, 1, 1, 1};
  for (int s = 1; s <= 3; s++) run_step(c, &cfg, sc, seqs, one, s, &rng, page, max_page);
  const int some[NUM_SEQS] = {4, 0, 4, 1, 0, 4};
  run_step(c, &cfg, sc, seqs, some, 4, &rng, page, max_page);

  kvc_stats_t st = {.struct_size = sizeof(st)};
  assert_int_equal(kvc_cache_synchronize(c), KVC_OK);
  assert_int_equal(kvc_get_stats(c, &st), KVC_OK);
  int64_t full = 0, tokens = 0;
  for (int i = 0; i < NUM_SEQS; i++) {
    full += seqs[i].len / sc->block_tokens;
    tokens += seqs[i].len;
  }
  assert_int_equal(st.tokens_stored, tokens);
  assert_int_equal(st.pages_by_codec[0] + st.pages_by_codec[1] + st.pages_by_codec[2],
                   full * NUM_LAYERS);
  /* A fixed codec falls back to raw only for blocks it cannot code; these it can. */
  if (sc->policy == KVC_POLICY_FIXED)
    assert_int_equal(st.pages_by_codec[sc->codec], full * NUM_LAYERS);
  /* Pages (a few KiB at most here) pack after their previous layer's, except in a raw cache. */
  if (kvc_pack_codec(cfg.codec, cfg.policy))
    assert_true(packed_pages > 0);
  else
    assert_int_equal(packed_pages, 0);
  for (int i = 0; i < NUM_SEQS; i++) {
    assert_int_equal(kvc_seq_free(c, 100 + (kvc_seq_id_t)i), KVC_OK);
    assert_int_equal(kvc_cache_validate(c), KVC_OK);
    free(seqs[i].k);
    free(seqs[i].v);
    free(seqs[i].dk);
    free(seqs[i].dv);
  }
  assert_int_equal(kvc_get_stats(c, &st), KVC_OK);
  assert_int_equal(st.live_seqs, 0);
  assert_int_equal(st.page_bytes, 0);
  assert_int_equal(st.staging_bytes, 0);
  free(page);
  kvc_cache_destroy(c);
}

static void every_codec(kvc_dtype_t dtype, int block_tokens, kvc_bound_mode_t mode, int hd) {
  const struct {
    kvc_codec_policy_t policy;
    kvc_codec_t codec;
  } cases[] = {
      {KVC_POLICY_FIXED, KVC_CODEC_RAW},
      {KVC_POLICY_FIXED, KVC_CODEC_BITPACK},
      {KVC_POLICY_FIXED, KVC_CODEC_HUFFMAN},
      {KVC_POLICY_SMALLEST, KVC_CODEC_HUFFMAN},
      {KVC_POLICY_FASTEST_WITHIN, KVC_CODEC_HUFFMAN},
  };
  for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
    scenario_t sc = {dtype, cases[i].policy, cases[i].codec, mode, block_tokens, hd};
    run_scenario(&sc);
  }
}

static void f16_block16_relative(void **state) {
  every_codec(KVC_DTYPE_F16, 16, KVC_BOUND_RELATIVE, 32);
}
static void f16_block64_absolute(void **state) {
  every_codec(KVC_DTYPE_F16, 64, KVC_BOUND_ABSOLUTE, 32);
}
static void bf16_block16_relative(void **state) {
  every_codec(KVC_DTYPE_BF16, 16, KVC_BOUND_RELATIVE, 32);
}
static void f32_block64_relative(void **state) {
  every_codec(KVC_DTYPE_F32, 64, KVC_BOUND_RELATIVE, 32);
}
static void f32_block16_absolute(void **state) {
  every_codec(KVC_DTYPE_F32, 16, KVC_BOUND_ABSOLUTE, 32);
}
static void f16_block64_head_dim_96(void **state) {
  every_codec(KVC_DTYPE_F16, 64, KVC_BOUND_RELATIVE, 96);
}
static void f32_block16_head_dim_24(void **state) {
  every_codec(KVC_DTYPE_F32, 16, KVC_BOUND_ABSOLUTE, 24);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(f16_block16_relative),    cmocka_unit_test(f16_block64_absolute),
      cmocka_unit_test(bf16_block16_relative),   cmocka_unit_test(f32_block64_relative),
      cmocka_unit_test(f32_block16_absolute),    cmocka_unit_test(f16_block64_head_dim_96),
      cmocka_unit_test(f32_block16_head_dim_24),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
