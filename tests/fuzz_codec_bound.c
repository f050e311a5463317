/*
 * libFuzzer target for the CPU encoder's error-bound contract (compress/kvc_codec.h) on any input
 * values: the first bytes choose the dtype, kv heads, head_dim, block size, token count, bound
 * mode and bounds (2^-15 to 8) and the codec policy; the rest are the block's bytes as they are,
 * so every bit pattern of fp16, bf16 and fp32 occurs (NaN, infinities, subnormals, huge and tiny
 * neighbours), or (a bit of the first byte) those made finite. The block is encoded under the
 * policy and with each codec alone. Each page must decode; a block holding NaN or Inf must come
 * back raw and exact; every other decoded value must lie within its bound of the input, evaluated
 * here in double precision (relative: the bound times the range of its group, keys per channel
 * over the tokens, values per token); no page may be larger than the raw page. A codec alone may
 * refuse a block (KVC_ERR_UNSUPPORTED), the policy never. Any violation aborts.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compress/kvc_codec.h"
#include "kvc_fuzz_input.h"
#include "kvc_test_util.h"

static void violation(const char *what, kvc_codec_t codec, size_t i) {
  fprintf(stderr, "fuzz_codec_bound: codec %d, value %zu: %s\n", (int)codec, i, what);
  abort();
}

/* Value i of the block (staging layout) as float, exactly. */
static float input(const kvc_codec_params_t *p, const uint8_t *block, size_t i) {
  if (p->dtype == KVC_DTYPE_F32) {
    float f;
    memcpy(&f, block + 4 * i, 4);
    return f;
  }
  uint16_t h;
  memcpy(&h, block + 2 * i, 2);
  return p->dtype == KVC_DTYPE_F16 ? kvc_test_f16_to_f32(h) : kvc_test_bf16_to_f32(h);
}

/* Makes value i finite if it is not: its exponent, all ones, loses its lowest bit. */
static void make_finite(const kvc_codec_params_t *p, uint8_t *block, size_t i) {
  if (isfinite(input(p, block, i))) return;
  if (p->dtype == KVC_DTYPE_F32)
    block[4 * i + 2] ^= 0x80; /* bit 23 */
  else if (p->dtype == KVC_DTYPE_F16)
    block[2 * i + 1] ^= 0x04; /* bit 10 */
  else
    block[2 * i] ^= 0x80; /* bf16: bit 7 */
}

/* Checks a page of the first n tokens of `block` against the contract. */
static void check_page(const kvc_codec_params_t *p, const uint8_t *block, int n,
                       const uint8_t *page, size_t size, size_t raw_size, float *dec,
                       kvc_codec_t asked) {
  const int H = p->num_kv_heads, hd = p->head_dim, bt = p->block_tokens;
  kvc_page_info_t info;
  if (kvc_codec_page_info(page, size, &info) != KVC_OK || info.n_tokens != n)
    violation("the page does not read back", asked, 0);
  if (size > raw_size) violation("the page is larger than the raw page", asked, 0);
  if (kvc_codec_decode(page, size, dec) != KVC_OK) violation("the page does not decode", asked, 0);
  int finite = 1;
  for (int t = 0; t < 2; t++)
    for (int h = 0; h < H; h++)
      for (int r = 0; r < n; r++)
        for (int d = 0; d < hd; d++)
          finite &= isfinite(input(p, block, (((size_t)t * H + h) * bt + r) * hd + d)) != 0;
  if (!finite && info.codec != KVC_CODEC_RAW) violation("a non-finite block was coded", asked, 0);
  for (int t = 0; t < 2; t++)
    for (int h = 0; h < H; h++)
      for (int r = 0; r < n; r++)
        for (int d = 0; d < hd; d++) {
          const size_t i = (((size_t)t * H + h) * bt + r) * hd + d;
          const float x = input(p, block, i), y = dec[(((size_t)t * H + h) * n + r) * hd + d];
          if (info.codec == KVC_CODEC_RAW) {
            if (isnan(x) ? !isnan(y) : x != y) violation("a raw value changed", asked, i);
            continue;
          }
          double lim = t == 0 ? p->k_bound : p->v_bound;
          if (p->bound_mode == KVC_BOUND_RELATIVE) {
            double lo = INFINITY, hi = -INFINITY; /* the group: K per channel, V per token */
            for (int g = 0; g < (t == 0 ? n : hd); g++) {
              const size_t j = t == 0 ? (((size_t)t * H + h) * bt + g) * hd + d
                                      : (((size_t)t * H + h) * bt + r) * hd + g;
              const double v = input(p, block, j);
              lo = v < lo ? v : lo;
              hi = v > hi ? v : hi;
            }
            lim *= hi - lo;
          }
          if (!(fabs((double)y - (double)x) <= lim))
            violation("a value breaks its bound", asked, i);
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  kvc_fuzz_input_t in = {data, size};
  const uint8_t b0 = kvc_fuzz_next(&in), b1 = kvc_fuzz_next(&in), b2 = kvc_fuzz_next(&in);
  const uint8_t b3 = kvc_fuzz_next(&in), b4 = kvc_fuzz_next(&in);
  kvc_codec_params_t p;
  memset(&p, 0, sizeof p);
  p.dtype = (kvc_dtype_t)(b0 % 3);
  p.num_kv_heads = 1 + b0 / 3 % 2;
  p.head_dim = 8 * (1 + b1 % 8);
  p.block_tokens = 16 << (b1 / 8 % 3);
  const int n = 1 + b2 % p.block_tokens;
  p.bound_mode = (kvc_bound_mode_t)(b3 & 1);
  p.k_bound = ldexpf((float)(1 + (b3 >> 1 & 7)), (b3 >> 4) - 15);
  p.v_bound = ldexpf((float)(1 + (b4 & 7)), (b4 >> 4) - 15);
  kvc_config_t cfg = KVC_CONFIG_INIT;
  kvc_fuzz_codec(b4 >> 3 & 7, &cfg);
  p.policy = cfg.policy;
  p.codec = cfg.codec;
  p.size_budget = cfg.size_budget;
  if (kvc_codec_check_params(&p) != KVC_OK) return 0;

  const size_t sb = kvc_codec_staging_bytes(&p), cap = kvc_codec_max_page_bytes(&p);
  uint8_t *block = calloc(1, sb), *page = malloc(cap);
  float *dec = malloc(sb / (p.dtype == KVC_DTYPE_F32 ? 4 : 2) * sizeof(float));
  if (!block || !page || !dec) abort();
  memcpy(block, in.p, in.n < sb ? in.n : sb);
  if (b0 & 0x80) /* finite values only */
    for (size_t i = 0; i < sb / (p.dtype == KVC_DTYPE_F32 ? 4 : 2); i++) make_finite(&p, block, i);
  size_t raw_size = 0, psize = 0;
  if (kvc_codec_encode_with(&p, KVC_CODEC_RAW, block, n, page, cap, &raw_size) != KVC_OK)
    violation("raw refused the block", KVC_CODEC_RAW, 0);
  check_page(&p, block, n, page, raw_size, raw_size, dec, KVC_CODEC_RAW);
  for (int c = KVC_CODEC_BITPACK; c <= KVC_CODEC_HUFFMAN; c++) {
    kvc_status_t st = kvc_codec_encode_with(&p, (kvc_codec_t)c, block, n, page, cap, &psize);
    if (st == KVC_OK)
      check_page(&p, block, n, page, psize, raw_size, dec, (kvc_codec_t)c);
    else if (st != KVC_ERR_UNSUPPORTED)
      violation("the codec failed", (kvc_codec_t)c, 0);
  }
  if (kvc_codec_encode(&p, block, n, page, cap, &psize) != KVC_OK)
    violation("the policy failed", p.codec, 0);
  check_page(&p, block, n, page, psize, raw_size, dec, p.codec);
  free(block);
  free(page);
  free(dec);
  return 0;
}
