/*
 * The codecs' error bound on real data: the keys and values the real models of ../shared/models
 * compute over TinyStories text (post-RoPE, every layer; kvc_runner_capture), cut into 64-token
 * blocks as the cache cuts them (the last one partial), encoded by each lossy codec in each dtype
 * and bound mode, decoded, and every value checked against its bound (kvc_test_bound_ratio). Each
 * block must code with the codec asked for: real data must not fall back to raw pages, which
 * would leave the codec untested. The CUDA encoder writes the same pages (gpu_test_codec,
 * gpu_test_real_kv), so the bound holds for them too.
 *
 * Then attention end to end on the same data, in the models' own shapes (head_dim 8 and 16): a CPU
 * cache under absolute bounds holds token ranges of the stream as sequences (1 to 1002 tokens),
 * prefilled in chunks and then decoded, and every output row of every layer must be within the
 * tolerance the bounds imply (tests/kvc_test_toy.c) of float64 attention over the original K/V.
 *
 * Skips without the models unless KVC_REQUIRE_MODELS=1.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "compress/kvc_codec.h"
#include "kvc_test_capture.h"
#include "kvc_test_toy.h"
#include "kvc_test_util.h"

enum { WINDOWS = 8, BT = 64, CHUNK = 256, DECODE = 5 };

typedef struct setting {
  kvc_bound_mode_t mode;
  float k_bound, v_bound;
} setting_t;

/* The default bounds, a tight relative one, and absolute ones of the size ./kvc eval sweeps. */
static const setting_t kSettings[] = {
    {KVC_BOUND_RELATIVE, KVC_DEFAULT_K_BOUND, KVC_DEFAULT_V_BOUND},
    {KVC_BOUND_RELATIVE, 0.01f, 0.01f},
    {KVC_BOUND_ABSOLUTE, 0.08f, 0.02f},
};

static void store(kvc_dtype_t dt, void *raw, size_t i, float v, float *x) {
  if (dt == KVC_DTYPE_F32) {
    ((float *)raw)[i] = v;
    x[i] = v;
    return;
  }
  const uint16_t h = dt == KVC_DTYPE_F16 ? kvc_test_f32_to_f16(v) : kvc_test_f32_to_bf16(v);
  ((uint16_t *)raw)[i] = h;
  x[i] = dt == KVC_DTYPE_F16 ? kvc_test_f16_to_f32(h) : kvc_test_bf16_to_f32(h);
}

/* Every block of every layer of c, in every dtype, codec and setting: within its bound. */
static void codecs_meet_the_bound(const kvc_runner_capture_t *c, const char *name) {
  const int H = c->shape.n_kv_heads, hd = c->shape.head_dim;
  const size_t row = (size_t)H * hd;
  const kvc_dtype_t dts[3] = {KVC_DTYPE_F32, KVC_DTYPE_F16, KVC_DTYPE_BF16};
  const kvc_codec_t codecs[2] = {KVC_CODEC_BITPACK, KVC_CODEC_HUFFMAN};
  for (size_t si = 0; si < sizeof kSettings / sizeof kSettings[0]; si++)
    for (int di = 0; di < 3; di++)
      for (int ci = 0; ci < 2; ci++) {
        kvc_codec_params_t p;
        memset(&p, 0, sizeof p);
        p.dtype = dts[di];
        p.num_kv_heads = H;
        p.head_dim = hd;
        p.block_tokens = BT;
        p.bound_mode = kSettings[si].mode;
        p.k_bound = kSettings[si].k_bound;
        p.v_bound = kSettings[si].v_bound;
        p.policy = KVC_POLICY_FIXED;
        p.codec = codecs[ci];
        const size_t cap = kvc_codec_max_page_bytes(&p), count = 2 * (size_t)H * BT * hd;
        uint8_t *page = malloc(cap);
        void *raw = calloc(count, sizeof(float));
        float *x = calloc(count, sizeof(float)), *dec = malloc(count * sizeof(float));
        assert_true(page && raw && x && dec);
        double worst = 0, bytes = 0, values = 0;
        for (int l = 0; l < c->shape.n_layers; l++)
          for (int t0 = 0; t0 < c->tokens; t0 += BT) {
            const int n = c->tokens - t0 < BT ? c->tokens - t0 : BT;
            /* Staging layout: [K, V][head][token][channel]. */
            for (int tensor = 0; tensor < 2; tensor++) {
              const float *src = (tensor ? c->v : c->k) + ((size_t)l * c->tokens + t0) * row;
              for (int h = 0; h < H; h++)
                for (int t = 0; t < n; t++)
                  for (int d = 0; d < hd; d++)
                    store(p.dtype, raw, (((size_t)tensor * H + h) * BT + t) * hd + d,
                          src[(size_t)t * row + (size_t)h * hd + d], x);
            }
            size_t size = 0;
            const kvc_status_t st = kvc_codec_encode_with(&p, p.codec, raw, n, page, cap, &size);
            if (st != KVC_OK)
              fail_msg("%s layer %d tokens %d..: codec %d dtype %d setting %zu: status %d", name,
                       l, t0, p.codec, p.dtype, si, st);
            assert_int_equal(kvc_codec_decode(page, size, dec), KVC_OK);
            for (int s = 0; s < 2 * H; s++) {
              const int tensor = s / H;
              const double r = kvc_test_bound_ratio(
                  x + (size_t)s * BT * hd, dec + (size_t)s * n * hd, n, hd, tensor,
                  p.bound_mode == KVC_BOUND_RELATIVE, tensor == 0 ? p.k_bound : p.v_bound);
              if (!(r <= 1.0))
                fail_msg("%s layer %d tokens %d.. %s head %d: error %.3g of the bound (codec %d, "
                         "dtype %d, setting %zu)",
                         name, l, t0, tensor ? "V" : "K", s % H, r, p.codec, p.dtype, si);
              if (r > worst) worst = r;
            }
            bytes += (double)size;
            values += 2.0 * n * (double)row;
          }
        print_message("%s %s %s %s k %.3g v %.3g: worst %.3f of the bound, %.2f bits/value\n",
                      name, p.codec == KVC_CODEC_HUFFMAN ? "huffman" : "bitpack",
                      p.dtype == KVC_DTYPE_F32 ? "f32" : p.dtype == KVC_DTYPE_F16 ? "f16" : "bf16",
                      p.bound_mode == KVC_BOUND_RELATIVE ? "relative" : "absolute", p.k_bound,
                      p.v_bound, worst, 8.0 * bytes / values);
        free(page);
        free(raw);
        free(x);
        free(dec);
      }
}

/* Sequences of a cache over the captured stream: token ranges of these lengths, back to back. */
static const int kLens[] = {1, 37, 300, 700, 1002};
enum { SEQS = sizeof kLens / sizeof kLens[0] };

/*
 * Attention through a CPU cache (fp32, absolute bounds) over c's K, V and Q in the model's own
 * shape: each sequence's prompt in chunks of up to CHUNK rows, then DECODE steps of one token, all
 * sequences in the same steps; every output row of every layer within the tolerance the bounds
 * imply (kvc_test_toy_check) of float64 attention over the original K/V.
 */
static void attention_within_the_bound(const kvc_runner_capture_t *c, const char *name,
                                       kvc_codec_t codec) {
  const kvc_runner_shape_t *sh = &c->shape;
  const size_t kv_row = (size_t)sh->n_kv_heads * sh->head_dim;
  const size_t q_row = (size_t)sh->n_heads * sh->head_dim;
  kvc_config_t cfg = KVC_CONFIG_INIT;
  cfg.num_layers = sh->n_layers;
  cfg.num_q_heads = sh->n_heads;
  cfg.num_kv_heads = sh->n_kv_heads;
  cfg.head_dim = sh->head_dim;
  cfg.dtype = KVC_DTYPE_F32;
  cfg.block_tokens = BT;
  cfg.pool_bytes = (size_t)64 << 20;
  cfg.max_seq_len = 4096;
  cfg.max_batch_tokens = SEQS * CHUNK;
  cfg.codec = codec;
  cfg.bound_mode = KVC_BOUND_ABSOLUTE;
  cfg.k_bound = 0.08f;
  cfg.v_bound = 0.02f;
  kvc_cache_t *cache;
  assert_int_equal(kvc_cache_create(&cfg, &cache), KVC_OK);
  const kvc_test_toy_t toy = {sh->n_kv_heads, sh->n_heads, sh->head_dim, cfg.k_bound, cfg.v_bound,
                              0x1p-24, 0, 0};
  const int cap = SEQS * CHUNK;
  float *k = malloc(sizeof(float) * cap * kv_row), *v = malloc(sizeof(float) * cap * kv_row);
  float *q = malloc(sizeof(float) * cap * q_row), *out = malloc(sizeof(float) * cap * q_row);
  assert_true(k && v && q && out);
  int first[SEQS], held[SEQS] = {0}, src[SEQS * CHUNK], pos[SEQS * CHUNK], seq_of[SEQS * CHUNK];
  for (int i = 0, t = 0; i < SEQS; t += kLens[i], i++) {
    first[i] = t;
    int cached = -1;
    assert_int_equal(kvc_seq_add(cache, (kvc_seq_id_t)i, NULL, 0, 0, &cached), KVC_OK);
  }
  assert_true(first[SEQS - 1] + kLens[SEQS - 1] <= c->tokens);
  const float scale = 1.0f / sqrtf((float)sh->head_dim);
  double worst = 0;
  long long rows_checked = 0;
  char msg[256];
  for (;;) {
    kvc_seq_id_t ids[SEQS];
    int32_t n_new[SEQS];
    int n_seqs = 0, rows = 0;
    for (int i = 0; i < SEQS; i++) {
      const int prefill = kLens[i] > DECODE ? kLens[i] - DECODE : 0;
      int n = held[i] < prefill ? prefill - held[i] : kLens[i] - held[i];
      if (held[i] < prefill && n > CHUNK) n = CHUNK;
      if (held[i] >= prefill && n > 1) n = 1;
      if (n == 0) continue;
      ids[n_seqs] = (kvc_seq_id_t)i;
      n_new[n_seqs++] = n;
      assert_int_equal(kvc_seq_reserve(cache, (kvc_seq_id_t)i, n, 0), KVC_OK);
      for (int j = 0; j < n; j++, rows++) {
        src[rows] = first[i] + held[i] + j;
        pos[rows] = held[i] + j;
        seq_of[rows] = i;
      }
      held[i] += n;
    }
    if (n_seqs == 0) break;
    const kvc_batch_t batch = {n_seqs, ids, n_new, NULL};
    assert_int_equal(kvc_plan(cache, &batch, NULL), KVC_OK);
    for (int l = 0; l < sh->n_layers; l++) {
      const size_t base = (size_t)l * c->tokens;
      for (int r = 0; r < rows; r++) {
        memcpy(k + r * kv_row, c->k + (base + src[r]) * kv_row, sizeof(float) * kv_row);
        memcpy(v + r * kv_row, c->v + (base + src[r]) * kv_row, sizeof(float) * kv_row);
        memcpy(q + r * q_row, c->q + (base + src[r]) * q_row, sizeof(float) * q_row);
      }
      assert_int_equal(kvc_store(cache, l, k, v, NULL), KVC_OK);
      assert_int_equal(kvc_attend(cache, l, q, out, scale, NULL), KVC_OK);
      for (int r = 0; r < rows; r++) {
        const size_t at = (base + first[seq_of[r]]) * kv_row;
        const double e = kvc_test_toy_check(&toy, c->k + at, c->v + at, kv_row, pos[r] + 1,
                                            q + r * q_row, out + r * q_row, scale, msg, sizeof msg);
        if (!(e <= 1.0))
          fail_msg("%s codec %d layer %d sequence %d position %d: %s", name, codec, l, seq_of[r],
                   pos[r], msg);
        if (e > worst) worst = e;
      }
      rows_checked += rows;
    }
  }
  kvc_stats_t st = {.struct_size = sizeof st};
  assert_int_equal(kvc_cache_synchronize(cache), KVC_OK);
  assert_int_equal(kvc_get_stats(cache, &st), KVC_OK);
  assert_true(st.pages_by_codec[codec] > 0);
  print_message("%s attention over %s pages (absolute k %.2g v %.2g): %lld rows, worst %.3f of "
                "the tolerance\n",
                name, codec == KVC_CODEC_HUFFMAN ? "huffman" : "bitpack", cfg.k_bound, cfg.v_bound,
                rows_checked, worst);
  kvc_cache_destroy(cache);
  free(k);
  free(v);
  free(q);
  free(out);
}

static void stories260k(void **state) {
  (void)state;
  kvc_runner_capture_t c;
  if (!kvc_test_capture("models/stories260K.gguf", NULL, WINDOWS, &c)) skip();
  codecs_meet_the_bound(&c, "stories260K");
  attention_within_the_bound(&c, "stories260K", KVC_CODEC_HUFFMAN);
  attention_within_the_bound(&c, "stories260K", KVC_CODEC_BITPACK);
  kvc_runner_capture_free(&c);
}

static void babyllama(void **state) {
  (void)state;
  kvc_runner_capture_t c;
  if (!kvc_test_capture("models/babyllama-tok105.bin", "models/babyllama-tok105.tokenizer.bin",
                        WINDOWS, &c))
    skip();
  codecs_meet_the_bound(&c, "babyllama");
  attention_within_the_bound(&c, "babyllama", KVC_CODEC_HUFFMAN);
  attention_within_the_bound(&c, "babyllama", KVC_CODEC_BITPACK);
  kvc_runner_capture_free(&c);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(stories260k),
      cmocka_unit_test(babyllama),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
