/*
 * CPU reference codec: error-bounded quantization, bit-pack and Huffman coding, page assembly,
 * page checks and decoding. Format: kvc_page_format.h; shared primitives: kvc_quant.h. An encode
 * keeps a section's codes in a work array (up to 64K values, too many for the stack; the caller's
 * with kvc_codec_encode_work): each value is read once and quantized while its group's step is
 * searched; the counts, the Huffman plan and the emitted stream then read its code.
 */
/* The encoder must round exactly like the CUDA encoder: no fused multiply-add anywhere. */
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "compress/kvc_codec.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "compress/kvc_page_format.h"
#include "compress/kvc_quant.h"

/* ---- input access ------------------------------------------------------------------------- */

float kvc_codec_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, ex = (h >> 10) & 0x1fu, m = h & 0x3ffu, b;
  if (ex == 0) {
    if (m == 0) {
      b = sign;
    } else {
      int e = 0;
      while (!(m & 0x400u)) {
        m <<= 1;
        e++;
      }
      b = sign | ((uint32_t)(113 - e) << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (ex == 31) {
    b = sign | 0x7f800000u | (m << 13);
  } else {
    b = sign | ((ex + 112) << 23) | (m << 13);
  }
  return kvc_bits_to_f32(b);
}

float kvc_codec_bf16_to_f32(uint16_t h) { return kvc_bits_to_f32((uint32_t)h << 16); }

uint16_t kvc_codec_f32_to_f16(float f) {
  const uint32_t x = kvc_f32_to_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u, exp = (x >> 23) & 0xffu, mant = x & 0x7fffffu;
  if (exp == 0xff) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0));
  int e = (int)exp - 127 + 15;
  if (e >= 31) return (uint16_t)(sign | 0x7c00u);
  if (e <= 0) {
    if (e < -10) return (uint16_t)sign;
    mant |= 0x800000u;
    int shift = 14 - e;
    uint32_t half = mant >> shift, rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) half++;
    return (uint16_t)(sign | half);
  }
  /* A carry out of the mantissa rounds into the exponent, which is the right result. */
  uint32_t half = sign | ((uint32_t)e << 10) | (mant >> 13), rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1))) half++;
  return (uint16_t)half;
}

uint16_t kvc_codec_f32_to_bf16(float f) {
  uint32_t x = kvc_f32_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
}

/* One (tensor, head) of a staging block: rows [n][hd] of `dtype` at `rows`. */
typedef struct kvc__src {
  const uint8_t *rows;
  int dtype;
  int hd;
  int n;
} kvc__src_t;

static inline float kvc__ld(const kvc__src_t *s, int t, int d) {
  size_t i = (size_t)t * s->hd + d;
  if (s->dtype == KVC_DTYPE_F32) {
    float f;
    memcpy(&f, s->rows + 4 * i, 4);
    return f;
  }
  uint16_t h = (uint16_t)kvc_rd_u16(s->rows + 2 * i);
  return s->dtype == KVC_DTYPE_F16 ? kvc_codec_f16_to_f32(h) : kvc_codec_bf16_to_f32(h);
}

/* ---- parameters --------------------------------------------------------------------------- */

static int kvc__finite_pos(float x) { return x > 0.0f && isfinite(x); }

kvc_status_t kvc_codec_check_params(const kvc_codec_params_t *p) {
  if (!p) return KVC_ERR_INVALID_ARGUMENT;
  if (p->dtype != KVC_DTYPE_F16 && p->dtype != KVC_DTYPE_BF16 && p->dtype != KVC_DTYPE_F32)
    return KVC_ERR_INVALID_ARGUMENT;
  if (p->num_kv_heads < 1 || p->head_dim < 1 || p->block_tokens < 1)
    return KVC_ERR_INVALID_ARGUMENT;
  if (p->bound_mode != KVC_BOUND_RELATIVE && p->bound_mode != KVC_BOUND_ABSOLUTE)
    return KVC_ERR_INVALID_ARGUMENT;
  if (!kvc__finite_pos(p->k_bound) || !kvc__finite_pos(p->v_bound)) return KVC_ERR_INVALID_ARGUMENT;
  if (p->policy != KVC_POLICY_FIXED && p->policy != KVC_POLICY_SMALLEST &&
      p->policy != KVC_POLICY_FASTEST_WITHIN)
    return KVC_ERR_INVALID_ARGUMENT;
  if (p->codec != KVC_CODEC_RAW && p->codec != KVC_CODEC_BITPACK && p->codec != KVC_CODEC_HUFFMAN)
    return KVC_ERR_INVALID_ARGUMENT;
  if (p->policy == KVC_POLICY_FASTEST_WITHIN && !kvc__finite_pos(p->size_budget))
    return KVC_ERR_INVALID_ARGUMENT;
  if (p->head_dim % 8 != 0 || p->head_dim > KVC_FMT_MAX_HEAD_DIM ||
      p->block_tokens > KVC_FMT_MAX_TOKENS || p->num_kv_heads > 0xffff)
    return KVC_ERR_UNSUPPORTED;
  if (kvc_codec_max_page_bytes(p) > 0xfffffff0u) return KVC_ERR_UNSUPPORTED;
  return KVC_OK;
}

size_t kvc_codec_staging_bytes(const kvc_codec_params_t *p) {
  return (size_t)2 * p->num_kv_heads * p->block_tokens * p->head_dim * kvc_dtype_bytes(p->dtype);
}

static size_t kvc__raw_page_bytes(const kvc_codec_params_t *p, int n_tokens) {
  return kvc_page_sections_start((uint32_t)p->num_kv_heads, KVC_CODEC_RAW) +
         (size_t)2 * p->num_kv_heads *
             (((size_t)n_tokens * p->head_dim * kvc_dtype_bytes(p->dtype) + 15) & ~(size_t)15);
}

size_t kvc_codec_max_page_bytes(const kvc_codec_params_t *p) {
  return kvc__raw_page_bytes(p, p->block_tokens);
}

/* ---- quantization ------------------------------------------------------------------------- */

#define KVC__MAX_GROUPS 256
#define KVC__E_UNSET (KVC_STEP_CODE_MIN - 2)

/* A quantized section's parameters; the code u of each value is in an array beside it. */
typedef struct kvc__qsec {
  int mode; /* KVC_QMODE_* */
  int groups;
  int e_min;
  int32_t b_min;
  uint32_t w_e, w_b;
  uint32_t max_u;
  int e[KVC__MAX_GROUPS];
  int32_t base[KVC__MAX_GROUPS]; /* REL: group base; ABS: channel centre */
  uint32_t counts[KVC_SYM_COUNT];
} kvc__qsec_t;

/* Index of value i of group g in [n][hd] order: groups are channels (by_channel: g = d, i = t) or
 * tokens (g = t, i = d). */
static inline size_t kvc__grp_at(int hd, int by_channel, int g, int i) {
  return by_channel ? (size_t)i * hd + g : (size_t)g * hd + i;
}

/* The len values of group g, as floats. */
static void kvc__grp_load(const kvc__src_t *s, int by_channel, int g, int len, float *x) {
  for (int i = 0; i < len; i++) x[i] = by_channel ? kvc__ld(s, i, g) : kvc__ld(s, g, i);
}

/* Tries step code e on a group's values x[len]: every value within lim; sets their q and base,
 * the smallest q. */
static int kvc__rel_try(const float *x, int len, int e, double lim, int32_t *q, int32_t *base) {
  float step = kvc_step_from_code(e);
  int32_t mn = INT32_MAX;
  for (int i = 0; i < len; i++) {
    if (!kvc_q_of(x[i], step, &q[i]) || !kvc_q_within(kvc_q_recon(q[i], step), x[i], lim))
      return 0;
    if (q[i] < mn) mn = q[i];
  }
  *base = mn;
  return 1;
}

/* Quantizes section s (tensor 0 = K, 1 = V) into q and the codes u[n][hd]. */
static kvc_status_t kvc__quantize(const kvc__src_t *s, int tensor, kvc_bound_mode_t mode,
                                  float bound, kvc__qsec_t *q, uint32_t *u) {
  const int n = s->n, hd = s->hd;
  float x[KVC__MAX_GROUPS]; /* one group's values (at most 256 tokens or channels) */
  int32_t qv[KVC__MAX_GROUPS]; /* and their q */
  memset(q->counts, 0, sizeof q->counts);
  if (mode == KVC_BOUND_RELATIVE) {
    q->mode = KVC_QMODE_REL;
    const int by_channel = tensor == 0, G = by_channel ? hd : n, len = by_channel ? n : hd;
    q->groups = G;
    int e_lo = KVC_STEP_CODE_MAX + 1, e_hi = KVC_STEP_CODE_MIN - 1;
    for (int g = 0; g < G; g++) {
      kvc__grp_load(s, by_channel, g, len, x);
      float mn = INFINITY, mx = -INFINITY;
      for (int i = 0; i < len; i++) {
        if (!isfinite(x[i])) return KVC_ERR_UNSUPPORTED;
        if (x[i] < mn) mn = x[i];
        if (x[i] > mx) mx = x[i];
      }
      double lim = kvc_q_rel_lim(bound, mn, mx);
      int e = kvc_step_code_floor(KVC_DMUL(2.0, lim));
      if (!(e >= KVC_STEP_CODE_MIN && kvc__rel_try(x, len, e, lim, qv, &q->base[g]))) {
        /* Exact fallback: the power of two dividing every value. */
        int k = 1000;
        for (int i = 0; i < len; i++) {
          if (x[i] != 0.0f) {
            int kb = kvc_q_lowbit_exp(x[i]);
            if (kb < k) k = kb;
          }
        }
        if (k == 1000) {
          e = KVC__E_UNSET; /* all zero: any step codes them as 0 */
          q->base[g] = 0;
          memset(qv, 0, (size_t)len * sizeof *qv);
        } else {
          if (k < KVC_STEP_CODE_MIN / 8) return KVC_ERR_UNSUPPORTED;
          e = 8 * k;
          if (!kvc__rel_try(x, len, e, lim, qv, &q->base[g])) return KVC_ERR_UNSUPPORTED;
        }
      }
      for (int i = 0; i < len; i++)
        u[kvc__grp_at(hd, by_channel, g, i)] = (uint32_t)qv[i] - (uint32_t)q->base[g];
      q->e[g] = e;
      if (e != KVC__E_UNSET) {
        if (e < e_lo) e_lo = e;
        if (e > e_hi) e_hi = e;
      }
    }
    if (e_hi < e_lo) e_lo = e_hi = 0;
    int32_t b_lo = INT32_MAX, b_hi = INT32_MIN;
    for (int g = 0; g < G; g++) {
      if (q->e[g] == KVC__E_UNSET) q->e[g] = e_lo;
      if (q->base[g] < b_lo) b_lo = q->base[g];
      if (q->base[g] > b_hi) b_hi = q->base[g];
    }
    q->e_min = e_lo;
    q->b_min = b_lo;
    q->w_e = kvc_bits_for((uint32_t)(e_hi - e_lo));
    q->w_b = kvc_bits_for((uint32_t)b_hi - (uint32_t)b_lo);
    if (q->w_e > 16) return KVC_ERR_UNSUPPORTED;
  } else {
    q->mode = KVC_QMODE_ABS;
    q->groups = hd;
    int e = kvc_step_code_floor(KVC_DMUL(2.0, (double)bound));
    if (e < KVC_STEP_CODE_MIN) return KVC_ERR_UNSUPPORTED;
    float step = kvc_step_from_code(e);
    double lim = (double)bound;
    int32_t c_lo = INT32_MAX, c_hi = INT32_MIN;
    for (int d = 0; d < hd; d++) {
      kvc__grp_load(s, 1, d, n, x);
      int64_t sum = 0;
      for (int t = 0; t < n; t++) {
        if (!isfinite(x[t]) || !kvc_q_of(x[t], step, &qv[t]) ||
            !kvc_q_within(kvc_q_recon(qv[t], step), x[t], lim))
          return KVC_ERR_UNSUPPORTED;
        sum += qv[t];
      }
      int32_t c = kvc_q_center(sum, n);
      for (int t = 0; t < n; t++)
        u[kvc__grp_at(hd, 1, d, t)] = kvc_zigzag((int32_t)((uint32_t)qv[t] - (uint32_t)c));
      q->base[d] = c;
      if (c < c_lo) c_lo = c;
      if (c > c_hi) c_hi = c;
    }
    q->e_min = e;
    q->b_min = c_lo;
    q->w_e = 0;
    q->w_b = kvc_bits_for((uint32_t)c_hi - (uint32_t)c_lo);
  }
  uint32_t max_u = 0;
  for (size_t i = 0; i < (size_t)n * hd; i++) {
    if (u[i] >= (1u << KVC_Q_MAX_BITS)) return KVC_ERR_UNSUPPORTED;
    if (u[i] > max_u) max_u = u[i];
    q->counts[kvc_sym_of(u[i])]++;
  }
  q->max_u = max_u;
  return KVC_OK;
}

/* ---- section coding ----------------------------------------------------------------------- */

typedef struct kvc__bitw {
  uint8_t *words;
  uint64_t acc;
  uint32_t nacc;
  uint32_t widx;
} kvc__bitw_t;

static void kvc__put(kvc__bitw_t *w, uint32_t v, uint32_t nbits) {
  if (nbits == 0) return;
  w->acc = (w->acc << nbits) | (uint64_t)v;
  w->nacc += nbits;
  if (w->nacc >= 32) {
    w->nacc -= 32;
    kvc_wr_u32(w->words + 4 * w->widx++, (uint32_t)(w->acc >> w->nacc));
  }
}

static void kvc__flush(kvc__bitw_t *w) {
  if (w->nacc) kvc_wr_u32(w->words + 4 * w->widx++, (uint32_t)(w->acc << (32 - w->nacc)));
  w->nacc = 0;
}

/* Huffman layout of a quantized section. */
typedef struct kvc__huf {
  uint8_t len[KVC_SYM_COUNT];
  uint32_t code[KVC_SYM_COUNT];
  int n_sym;
  int n_lanes;
  uint32_t lane_min, w_lane;
  uint64_t lane_total;
  uint32_t lane_bits[KVC_MAX_LANES]; /* each lane's stream bits */
} kvc__huf_t;

static uint32_t kvc__sym_bits(const kvc__huf_t *h, uint32_t u) {
  uint32_t s = kvc_sym_of(u);
  return h->len[s] + kvc_sym_extra(s);
}

/* Plans the Huffman coding of a section's S = n_tokens x head_dim codes u. */
static void kvc__huf_plan(const uint32_t *u, int S, int head_dim, const kvc__qsec_t *q,
                          kvc__huf_t *h) {
  h->n_sym = kvc_huf_build_lengths(q->counts, h->len);
  kvc_huf_codes(h->len, h->code);
  h->n_lanes = kvc_huf_lanes(S / head_dim, head_dim);
  uint32_t lo = UINT32_MAX, hi = 0;
  h->lane_total = 0;
  for (int lane = 0; lane < h->n_lanes; lane++) {
    uint32_t bits = 0;
    for (int i = lane; i < S; i += h->n_lanes) bits += kvc__sym_bits(h, u[i]);
    h->lane_bits[lane] = bits;
    if (bits < lo) lo = bits;
    if (bits > hi) hi = bits;
    h->lane_total += bits;
  }
  h->lane_min = lo;
  h->w_lane = kvc_bits_for(hi - lo);
}

static uint64_t kvc__meta_bits(const kvc__qsec_t *q) {
  return (uint64_t)q->groups * (q->w_e + q->w_b);
}

static uint32_t kvc__qsec_bytes(uint64_t bits) {
  uint64_t words = (bits + 31) / 32;
  if (words == 0) words = 1;
  return (uint32_t)(KVC_QSEC_HEADER_BYTES + 4 * words);
}

/* Bytes of a BITPACK section of tensor (0 K, 1 V), n tokens x hd channels. */
static uint32_t kvc__bitpack_bytes(const kvc__qsec_t *q, int tensor, int n, int hd) {
  const int paired = kvc_bp_paired(tensor, (uint32_t)hd);
  return kvc__qsec_bytes(kvc_bp_start((uint32_t)kvc__meta_bits(q), paired) +
                         kvc_bp_code_bits((uint32_t)n, (uint32_t)hd, kvc_bits_for(q->max_u),
                                          paired));
}

static uint32_t kvc__huffman_bytes(const kvc__qsec_t *q, const kvc__huf_t *h) {
  return kvc__qsec_bytes(kvc__meta_bits(q) + 4u * (uint32_t)h->n_sym +
                         (uint64_t)h->n_lanes * h->w_lane + h->lane_total);
}

/* Bytes of a quantized section of tensor (0 K, 1 V), codes u[n][hd], with `codec`; plans h for
 * HUFFMAN. */
static uint32_t kvc__qsec_size(const uint32_t *u, int tensor, int n, int hd, const kvc__qsec_t *q,
                               kvc_codec_t codec, kvc__huf_t *h) {
  if (codec == KVC_CODEC_BITPACK) return kvc__bitpack_bytes(q, tensor, n, hd);
  kvc__huf_plan(u, n * hd, hd, q, h);
  return kvc__huffman_bytes(q, h);
}

/* ORs the n-bit field v at stream bit pos of the MSB-first words (the field within one word). */
static void kvc__or_bits(uint8_t *words, uint64_t pos, uint32_t v, uint32_t n) {
  uint8_t *at = words + 4 * (pos >> 5);
  kvc_wr_u32(at, kvc_rd_u32(at) | v << (32 - n - (uint32_t)(pos & 31)));
}

/* Writes the codes u[n][hd] of width (1..KVC_Q_MAX_BITS) bits of a paired section at stream bit
 * start (word-aligned) of the zeroed words: a code that crosses a 16-bit unit of its row goes in
 * pieces, as kvc_bp_get reads it. The odd token's partner row stays zero. */
static void kvc__put_paired(uint8_t *words, uint64_t start, const uint32_t *u, int n, int hd,
                            uint32_t width) {
  const uint32_t row_bits = (uint32_t)hd * width;
  for (int t = 0; t < n; t++) {
    for (int d = 0; d < hd; d++) {
      const uint32_t v = u[(size_t)t * hd + d];
      uint32_t i = (uint32_t)d * width, left = width;
      while (left) {
        const uint32_t k = left < 16u - (i & 15u) ? left : 16u - (i & 15u);
        left -= k;
        kvc__or_bits(words, start + kvc_bp_bit(1, row_bits, (uint32_t)t, i),
                     (v >> left) & ((1u << k) - 1u), k);
        i += k;
      }
    }
  }
}

/* Writes a quantized section of tensor (0 K, 1 V), codes u[n][hd], with `codec` (sizes already
 * known to fit) at dst (zeroed). */
static void kvc__emit(const uint32_t *u, int tensor, int n, int hd, const kvc__qsec_t *q,
                      const kvc__huf_t *h, kvc_codec_t codec, uint8_t *dst) {
  const int S = n * hd;
  kvc_qsec_header_t sh;
  memset(&sh, 0, sizeof sh);
  sh.mode = (uint8_t)q->mode;
  sh.w_e = (uint8_t)q->w_e;
  sh.w_b = (uint8_t)q->w_b;
  sh.e_min = (int16_t)q->e_min;
  sh.b_min = q->b_min;
  uint32_t width = kvc_bits_for(q->max_u);
  if (codec == KVC_CODEC_BITPACK) {
    sh.width = (uint8_t)width;
  } else {
    sh.width = (uint8_t)h->n_sym;
    sh.n_lanes = (uint16_t)h->n_lanes;
    sh.lane_info = h->lane_min | (h->w_lane << 27);
  }
  kvc_qsec_header_write(dst, &sh);
  kvc__bitw_t w = {dst + KVC_QSEC_HEADER_BYTES, 0, 0, 0};
  if (q->mode == KVC_QMODE_REL) {
    for (int g = 0; g < q->groups; g++) kvc__put(&w, (uint32_t)(q->e[g] - q->e_min), q->w_e);
  }
  for (int g = 0; g < q->groups; g++)
    kvc__put(&w, (uint32_t)q->base[g] - (uint32_t)q->b_min, q->w_b);
  if (codec == KVC_CODEC_BITPACK && kvc_bp_paired(tensor, (uint32_t)hd)) {
    kvc__flush(&w);
    if (width)
      kvc__put_paired(w.words, kvc_bp_start((uint32_t)kvc__meta_bits(q), 1), u, n, hd, width);
    return;
  }
  if (codec == KVC_CODEC_BITPACK) {
    for (int i = 0; i < S; i++) kvc__put(&w, u[i], width);
  } else {
    for (int sym = 0; sym < h->n_sym; sym++) kvc__put(&w, h->len[sym], 4);
    for (int lane = 0; lane < h->n_lanes; lane++)
      kvc__put(&w, h->lane_bits[lane] - h->lane_min, h->w_lane);
    for (int lane = 0; lane < h->n_lanes; lane++) {
      for (int i = lane; i < S; i += h->n_lanes) {
        uint32_t sym = kvc_sym_of(u[i]), ne = kvc_sym_extra(sym);
        kvc__put(&w, h->code[sym], h->len[sym]);
        kvc__put(&w, u[i] - kvc_sym_base(sym), ne);
      }
    }
  }
  kvc__flush(&w);
}

/* ---- pages -------------------------------------------------------------------------------- */

static kvc__src_t kvc__section_src(const kvc_codec_params_t *p, const void *block, int n,
                                   int tensor, int head) {
  kvc__src_t s;
  size_t row = (size_t)p->head_dim * kvc_dtype_bytes(p->dtype);
  s.rows = (const uint8_t *)block + ((size_t)tensor * p->num_kv_heads + head) * p->block_tokens * row;
  s.dtype = p->dtype;
  s.hd = p->head_dim;
  s.n = n;
  return s;
}

/* Quantizes section (tensor, head) of the block into q and its codes u[n][head_dim]. */
static kvc_status_t kvc__section_quantize(const kvc_codec_params_t *p, const void *block, int n,
                                          int tensor, int head, kvc__qsec_t *q, uint32_t *u) {
  kvc__src_t s = kvc__section_src(p, block, n, tensor, head);
  return kvc__quantize(&s, tensor, p->bound_mode, tensor == 0 ? p->k_bound : p->v_bound, q, u);
}

/* Writes section (tensor, head) with `codec` at dst (zeroed); u: room for its codes (unused by
 * RAW). */
static kvc_status_t kvc__section(const kvc_codec_params_t *p, const void *block, int n, int tensor,
                                 int head, kvc_codec_t codec, uint32_t *u, uint8_t *dst,
                                 uint32_t *bytes) {
  uint32_t raw = kvc_raw_section_bytes((uint32_t)n, (uint32_t)p->head_dim, (uint32_t)p->dtype);
  if (codec == KVC_CODEC_RAW) {
    memcpy(dst, kvc__section_src(p, block, n, tensor, head).rows, raw);
    *bytes = raw;
    return KVC_OK;
  }
  kvc__qsec_t q;
  kvc__huf_t h;
  kvc_status_t st = kvc__section_quantize(p, block, n, tensor, head, &q, u);
  if (st != KVC_OK) return st;
  uint32_t b = kvc__qsec_size(u, tensor, n, p->head_dim, &q, codec, &h);
  /* No section is larger than its raw form, so no page exceeds kvc_codec_max_page_bytes and
   * decoders can size section buffers by the raw section. */
  if (b > raw) return KVC_ERR_UNSUPPORTED;
  kvc__emit(u, tensor, n, p->head_dim, &q, &h, codec, dst);
  *bytes = b;
  return KVC_OK;
}

static void kvc__write_header(const kvc_codec_params_t *p, int n, kvc_codec_t codec, uint8_t *out,
                              uint32_t total) {
  kvc_page_header_t h;
  h.magic = KVC_PAGE_MAGIC;
  h.version = KVC_PAGE_VERSION;
  h.codec = (uint8_t)codec;
  h.dtype = (uint8_t)p->dtype;
  h.bound_mode = (uint8_t)p->bound_mode;
  h.n_tokens = (uint16_t)n;
  h.num_kv_heads = (uint16_t)p->num_kv_heads;
  h.head_dim = (uint16_t)p->head_dim;
  h.flags = 0;
  h.k_bound = p->k_bound;
  h.v_bound = p->v_bound;
  h.total_bytes = total;
  h.checksum = 0;
  kvc_page_header_write(out, &h);
  kvc_wr_u32(out + 28, kvc_page_checksum(out));
}

/* Writes the page with `codec` into out (cap >= raw page size checked by the caller); u: room
 * for a section's codes. */
static kvc_status_t kvc__write_page(const kvc_codec_params_t *p, kvc_codec_t codec,
                                    const void *block, int n, uint32_t *u, uint8_t *out,
                                    size_t *size) {
  const uint32_t H = (uint32_t)p->num_kv_heads;
  uint32_t pos = kvc_page_sections_start(H, codec);
  memset(out, 0, pos);
  for (uint32_t i = 0; i < 2 * H; i++) {
    uint32_t b;
    /* Zero the largest the section can be (its raw size, rounded), so padding bytes are 0. */
    uint32_t raw = kvc_raw_section_bytes((uint32_t)n, (uint32_t)p->head_dim, (uint32_t)p->dtype);
    memset(out + pos, 0, kvc_align16(raw));
    kvc_status_t st =
        kvc__section(p, block, n, (int)(i / H), (int)(i % H), codec, u, out + pos, &b);
    if (st != KVC_OK) return st;
    kvc_wr_u32(out + KVC_PAGE_HEADER_BYTES + 4 * i, pos + b);
    pos = kvc_align16(pos + b);
  }
  kvc__write_header(p, n, codec, out, pos);
  *size = pos;
  return KVC_OK;
}

static kvc_status_t kvc__check_encode(const kvc_codec_params_t *p, const void *block, int n_tokens,
                                      const uint8_t *out, size_t cap, const size_t *size) {
  kvc_status_t st = kvc_codec_check_params(p);
  if (st != KVC_OK) return st;
  if (!block || !out || !size || n_tokens < 1 || n_tokens > p->block_tokens)
    return KVC_ERR_INVALID_ARGUMENT;
  if (cap < kvc_codec_max_page_bytes(p)) return KVC_ERR_INVALID_ARGUMENT;
  return KVC_OK;
}

/* The codes of one section of n tokens (uint32 each): the work an encode that quantizes needs. */
size_t kvc_codec_work_bytes(const kvc_codec_params_t *p) {
  return (size_t)p->block_tokens * p->head_dim * sizeof(uint32_t);
}

kvc_status_t kvc_codec_encode_with(const kvc_codec_params_t *p, kvc_codec_t codec,
                                   const void *block, int n_tokens, uint8_t *out, size_t cap,
                                   size_t *size) {
  kvc_status_t st = kvc__check_encode(p, block, n_tokens, out, cap, size);
  if (st != KVC_OK) return st;
  if (codec != KVC_CODEC_RAW && codec != KVC_CODEC_BITPACK && codec != KVC_CODEC_HUFFMAN)
    return KVC_ERR_INVALID_ARGUMENT;
  uint32_t *u = NULL;
  if (codec != KVC_CODEC_RAW && !(u = malloc(kvc_codec_work_bytes(p))))
    return KVC_ERR_OUT_OF_HOST_MEMORY;
  st = kvc__write_page(p, codec, block, n_tokens, u, out, size);
  free(u);
  return st;
}

/* Page sizes with BITPACK (sz[0]) and HUFFMAN (sz[1]), 0 for a codec that cannot code the block;
 * each section is quantized once for both. */
static void kvc__page_sizes(const kvc_codec_params_t *p, const void *block, int n, uint32_t *u,
                            size_t sz[2]) {
  const kvc_codec_t codec[2] = {KVC_CODEC_BITPACK, KVC_CODEC_HUFFMAN};
  const uint32_t H = (uint32_t)p->num_kv_heads;
  const uint32_t raw =
      kvc_raw_section_bytes((uint32_t)n, (uint32_t)p->head_dim, (uint32_t)p->dtype);
  sz[0] = sz[1] = kvc_page_sections_start(H, KVC_CODEC_BITPACK); /* both quantized codecs' */
  for (uint32_t i = 0; i < 2 * H && (sz[0] || sz[1]); i++) {
    kvc__qsec_t q;
    kvc__huf_t h;
    if (kvc__section_quantize(p, block, n, (int)(i / H), (int)(i % H), &q, u) != KVC_OK) {
      sz[0] = sz[1] = 0;
      return;
    }
    for (int c = 0; c < 2; c++) {
      if (!sz[c]) continue;
      uint32_t b = kvc__qsec_size(u, (int)(i / H), n, p->head_dim, &q, codec[c], &h);
      sz[c] = b > raw ? 0 : sz[c] + kvc_align16(b);
    }
  }
}

/* The codec a size policy (not KVC_POLICY_FIXED) picks; u: room for a section's codes. */
static kvc_codec_t kvc__policy_pick(const kvc_codec_params_t *p, const void *block, int n,
                                    uint32_t *u) {
  /* Candidates from fastest to slowest decode; ties go to the faster. */
  const kvc_codec_t order[3] = {KVC_CODEC_RAW, KVC_CODEC_BITPACK, KVC_CODEC_HUFFMAN};
  size_t sz[3];
  sz[0] = kvc__raw_page_bytes(p, n);
  kvc__page_sizes(p, block, n, u, sz + 1);
  int best = 0;
  for (int i = 1; i < 3; i++)
    if (sz[i] && sz[i] < sz[best]) best = i;
  if (p->policy == KVC_POLICY_FASTEST_WITHIN) {
    double budget = (double)p->size_budget * (double)sz[0];
    for (int i = 0; i < 3; i++) {
      if (sz[i] && (double)sz[i] <= budget) {
        best = i;
        break;
      }
    }
  }
  return order[best];
}

kvc_status_t kvc_codec_encode_work(const kvc_codec_params_t *p, const void *block, int n_tokens,
                                   void *work, size_t work_bytes, uint8_t *out, size_t cap,
                                   size_t *size) {
  kvc_status_t st = kvc__check_encode(p, block, n_tokens, out, cap, size);
  if (st != KVC_OK) return st;
  if (!work || work_bytes < kvc_codec_work_bytes(p) || (uintptr_t)work % sizeof(uint32_t) != 0)
    return KVC_ERR_INVALID_ARGUMENT;
  uint32_t *u = work;
  kvc_codec_t pick =
      p->policy == KVC_POLICY_FIXED ? p->codec : kvc__policy_pick(p, block, n_tokens, u);
  st = kvc__write_page(p, pick, block, n_tokens, u, out, size);
  if (st == KVC_ERR_UNSUPPORTED && pick != KVC_CODEC_RAW)
    st = kvc__write_page(p, KVC_CODEC_RAW, block, n_tokens, u, out, size);
  return st;
}

kvc_status_t kvc_codec_encode(const kvc_codec_params_t *p, const void *block, int n_tokens,
                              uint8_t *out, size_t cap, size_t *size) {
  kvc_status_t st = kvc__check_encode(p, block, n_tokens, out, cap, size);
  if (st != KVC_OK) return st;
  void *work = malloc(kvc_codec_work_bytes(p));
  if (!work) return KVC_ERR_OUT_OF_HOST_MEMORY;
  st = kvc_codec_encode_work(p, block, n_tokens, work, kvc_codec_work_bytes(p), out, cap, size);
  free(work);
  return st;
}

/* ---- checking and decoding ---------------------------------------------------------------- */

kvc_status_t kvc_codec_page_info(const uint8_t *page, size_t size, kvc_page_info_t *info) {
  if (!page || !info || size < KVC_PAGE_HEADER_BYTES) return KVC_ERR_CORRUPT;
  kvc_page_header_t h;
  kvc_page_header_read(page, &h);
  if (h.magic != KVC_PAGE_MAGIC || h.version != KVC_PAGE_VERSION || h.codec > KVC_CODEC_HUFFMAN ||
      h.dtype > KVC_DTYPE_F32 || h.bound_mode > KVC_BOUND_ABSOLUTE || h.flags != 0)
    return KVC_ERR_CORRUPT;
  if (h.n_tokens < 1 || h.n_tokens > KVC_FMT_MAX_TOKENS || h.num_kv_heads < 1 || h.head_dim < 8 ||
      h.head_dim > KVC_FMT_MAX_HEAD_DIM || h.head_dim % 8 != 0)
    return KVC_ERR_CORRUPT;
  const uint32_t H = h.num_kv_heads, start = kvc_page_sections_start(H, h.codec);
  if (h.total_bytes > size || h.total_bytes % KVC_PAGE_ALIGN != 0 || h.total_bytes < start)
    return KVC_ERR_CORRUPT;
  if (kvc_page_checksum(page) != h.checksum) return KVC_ERR_CORRUPT;
  /* The gap before the first section (RAW pages' alignment) is written as zeros. */
  for (uint32_t b = KVC_PAGE_HEADER_BYTES + kvc_page_table_bytes(H); b < start; b++)
    if (page[b] != 0) return KVC_ERR_CORRUPT;
  const uint32_t raw = kvc_raw_section_bytes(h.n_tokens, h.head_dim, h.dtype);
  uint32_t pos = start;
  for (uint32_t i = 0; i < 2 * H; i++) {
    uint32_t end = kvc_rd_u32(page + KVC_PAGE_HEADER_BYTES + 4 * i);
    if (end < pos || end > h.total_bytes) return KVC_ERR_CORRUPT;
    uint32_t b = end - pos;
    if (h.codec == KVC_CODEC_RAW ? b != raw
                                 : (b < KVC_QSEC_HEADER_BYTES + 4 || b % 4 != 0 || b > raw))
      return KVC_ERR_CORRUPT;
    pos = kvc_align16(end);
  }
  if (pos != h.total_bytes) return KVC_ERR_CORRUPT;
  info->codec = (kvc_codec_t)h.codec;
  info->dtype = (kvc_dtype_t)h.dtype;
  info->num_kv_heads = (int)H;
  info->head_dim = h.head_dim;
  info->n_tokens = h.n_tokens;
  info->bytes = h.total_bytes;
  return KVC_OK;
}

/* Decodes a quantized section (checked sizes: sec[bytes], bytes >= 20, multiple of 4). */
static kvc_status_t kvc__decode_q(const kvc_page_header_t *h, int tensor, const uint8_t *sec,
                                  uint32_t bytes, float *out) {
  const int n = h->n_tokens, hd = h->head_dim, S = n * hd;
  kvc_qsec_header_t qh;
  kvc_qsec_header_read(sec, &qh);
  const uint8_t *w = sec + KVC_QSEC_HEADER_BYTES;
  const uint32_t nwords = (bytes - KVC_QSEC_HEADER_BYTES) / 4;
  const uint64_t cap = (uint64_t)nwords * 32;
  if (qh.mode > KVC_QMODE_ABS || qh.w_e > 16 || qh.w_b > 31 || qh.e_min < KVC_STEP_CODE_MIN ||
      qh.e_min > KVC_STEP_CODE_MAX || (qh.mode == KVC_QMODE_ABS && qh.w_e != 0))
    return KVC_ERR_CORRUPT;
  const int rel = qh.mode == KVC_QMODE_REL;
  const int G = rel ? (tensor == 0 ? hd : n) : hd;
  int32_t base[KVC__MAX_GROUPS];
  float step[KVC__MAX_GROUPS];
  const uint64_t pos_b = rel ? (uint64_t)G * qh.w_e : 0;
  const uint64_t meta = pos_b + (uint64_t)G * qh.w_b;
  if (meta > cap) return KVC_ERR_CORRUPT;
  for (int g = 0; g < G; g++) {
    base[g] = (int32_t)((uint32_t)qh.b_min + kvc_bits_get(w, nwords, pos_b + (uint64_t)g * qh.w_b,
                                                           qh.w_b));
    if (rel) {
      int e = qh.e_min + (int)kvc_bits_get(w, nwords, (uint64_t)g * qh.w_e, qh.w_e);
      if (e > KVC_STEP_CODE_MAX) return KVC_ERR_CORRUPT;
      step[g] = kvc_step_from_code(e);
    }
  }
  const float abs_step = kvc_step_from_code(qh.e_min);
#define KVC__RECON(u, t, d)                                                                        \
  (rel ? kvc_q_recon((int32_t)((uint32_t)base[tensor == 0 ? (d) : (t)] + (u)),                     \
                     step[tensor == 0 ? (d) : (t)])                                                \
       : kvc_q_recon((int32_t)((uint32_t)base[(d)] + (uint32_t)kvc_unzigzag(u)), abs_step))
  if (h->codec == KVC_CODEC_BITPACK) {
    const int paired = kvc_bp_paired(tensor, (uint32_t)hd);
    const uint64_t start = kvc_bp_start((uint32_t)meta, paired);
    if (qh.width > KVC_Q_MAX_BITS || qh.n_lanes != 0 || qh.lane_info != 0 ||
        start + kvc_bp_code_bits((uint32_t)n, (uint32_t)hd, qh.width, paired) > cap)
      return KVC_ERR_CORRUPT;
    for (int t = 0; t < n; t++) {
      for (int d = 0; d < hd; d++) {
        uint32_t u = kvc_bp_get(w, nwords, start, paired, (uint32_t)hd, (uint32_t)t, (uint32_t)d,
                                qh.width);
        out[(size_t)t * hd + d] = KVC__RECON(u, t, d);
      }
    }
    return KVC_OK;
  }
  const int n_sym = qh.width, n_lanes = qh.n_lanes;
  const uint32_t w_lane = qh.lane_info >> 27, lane_min = qh.lane_info & ((1u << 27) - 1);
  if (n_sym < 1 || n_sym > KVC_SYM_COUNT || n_lanes < 1 || n_lanes > KVC_MAX_LANES || n_lanes > S)
    return KVC_ERR_CORRUPT;
  uint8_t len[KVC_SYM_COUNT] = {0};
  uint32_t kraft = 0;
  for (int s = 0; s < n_sym; s++) {
    len[s] = (uint8_t)kvc_bits_get(w, nwords, meta + 4u * (uint32_t)s, 4);
    if (len[s] > KVC_HUF_MAX_LEN) return KVC_ERR_CORRUPT;
    if (len[s]) kraft += 1u << (KVC_HUF_MAX_LEN - len[s]);
  }
  uint32_t table[KVC_HUF_TABLE_SIZE];
  if (kraft == 0) {
    uint32_t ent = kvc_huf_entry((uint32_t)n_sym - 1, 0);
    for (int i = 0; i < KVC_HUF_TABLE_SIZE; i++) table[i] = ent;
  } else {
    if (kraft != KVC_HUF_TABLE_SIZE) return KVC_ERR_CORRUPT;
    uint32_t code[KVC_SYM_COUNT];
    kvc_huf_codes(len, code);
    for (int s = 0; s < n_sym; s++) {
      if (!len[s]) continue;
      uint32_t a = code[s] << (KVC_HUF_MAX_LEN - len[s]), span = 1u << (KVC_HUF_MAX_LEN - len[s]);
      for (uint32_t i = 0; i < span; i++) table[a + i] = kvc_huf_entry((uint32_t)s, len[s]);
    }
  }
  const uint64_t lanes_pos = meta + 4u * (uint32_t)n_sym;
  uint64_t pos = lanes_pos + (uint64_t)n_lanes * w_lane;
  if (pos > cap) return KVC_ERR_CORRUPT;
  for (int lane = 0; lane < n_lanes; lane++) {
    uint64_t lane_bits = lane_min + (uint64_t)kvc_bits_get(w, nwords, lanes_pos +
                                                           (uint64_t)lane * w_lane, w_lane);
    uint64_t end = pos + lane_bits;
    if (end > cap) return KVC_ERR_CORRUPT;
    for (int i = lane; i < S; i += n_lanes) {
      uint32_t win = kvc_bits_window(w, nwords, pos);
      uint32_t ent = table[win >> (32 - KVC_HUF_MAX_LEN)];
      uint32_t tot = ent & 31u, ne = (ent >> 5) & 31u;
      uint32_t u = (ent >> 10) + ((uint32_t)((uint64_t)win >> (32 - tot)) & ((1u << ne) - 1u));
      pos += tot;
      out[i] = KVC__RECON(u, i / hd, i % hd);
    }
    /* Each lane must end exactly where the next begins: catches most payload damage. */
    if (pos != end) return KVC_ERR_CORRUPT;
  }
#undef KVC__RECON
  return KVC_OK;
}

kvc_status_t kvc_codec_decode_head(const uint8_t *page, size_t size, int tensor, int head,
                                   float *out) {
  kvc_page_info_t info;
  kvc_status_t st = kvc_codec_page_info(page, size, &info);
  if (st != KVC_OK) return st;
  if (!out || tensor < 0 || tensor > 1 || head < 0 || head >= info.num_kv_heads)
    return KVC_ERR_INVALID_ARGUMENT;
  kvc_page_header_t h;
  kvc_page_header_read(page, &h);
  uint32_t off, bytes;
  kvc_page_section(page, h.num_kv_heads, (uint32_t)(tensor * info.num_kv_heads + head), &off,
                   &bytes);
  const uint8_t *sec = page + off;
  if (h.codec == KVC_CODEC_RAW) {
    kvc__src_t s = {sec, h.dtype, h.head_dim, h.n_tokens};
    for (int t = 0; t < h.n_tokens; t++)
      for (int d = 0; d < h.head_dim; d++) out[(size_t)t * h.head_dim + d] = kvc__ld(&s, t, d);
    return KVC_OK;
  }
  return kvc__decode_q(&h, tensor, sec, bytes, out);
}

kvc_status_t kvc_codec_decode(const uint8_t *page, size_t size, float *out) {
  kvc_page_info_t info;
  kvc_status_t st = kvc_codec_page_info(page, size, &info);
  if (st != KVC_OK) return st;
  if (!out) return KVC_ERR_INVALID_ARGUMENT;
  size_t per = (size_t)info.n_tokens * info.head_dim;
  for (int i = 0; i < 2 * info.num_kv_heads; i++) {
    st = kvc_codec_decode_head(page, size, i / info.num_kv_heads, i % info.num_kv_heads,
                               out + (size_t)i * per);
    if (st != KVC_OK) return st;
  }
  return KVC_OK;
}
