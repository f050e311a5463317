/*
 * The codecs' error bound on real data: the keys and values the real models of ../shared/models
 * compute over TinyStories text (post-RoPE, every layer; kvc_runner_capture), cut into 64-token
 * blocks as the cache cuts them (the last one partial), encoded by each lossy codec in each dtype
 * and bound mode, decoded, and every value checked against its bound (kvc_test_bound_ratio). Each
 * block must code with the codec asked for: real data must not fall back to raw pages, which
 * would leave the codec untested. The CUDA encoder writes the same pages (gpu_test_codec,
 * gpu_test_real_kv), so the bound holds for them too.
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
#include "kvc_test_util.h"

enum { WINDOWS = 8, BT = 64 };

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

static void stories260k(void **state) {
  (void)state;
  kvc_runner_capture_t c;
  if (!kvc_test_capture("models/stories260K.gguf", NULL, WINDOWS, &c)) skip();
  codecs_meet_the_bound(&c, "stories260K");
  kvc_runner_capture_free(&c);
}

static void babyllama(void **state) {
  (void)state;
  kvc_runner_capture_t c;
  if (!kvc_test_capture("models/babyllama-tok105.bin", "models/babyllama-tok105.tokenizer.bin",
                        WINDOWS, &c))
    skip();
  codecs_meet_the_bound(&c, "babyllama");
  kvc_runner_capture_free(&c);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(stories260k),
      cmocka_unit_test(babyllama),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
