/*
 * Quantization and Huffman-construction primitives shared by the CPU encoder (kvc_codec.c) and the
 * CUDA encoder (kvc_codec_cuda.cu), so that both make the same decisions bit for bit. Every float
 * operation is one correctly rounded IEEE operation (device: __f*_rn / __d*_rn intrinsics; host:
 * plain operators, and this header is only compiled without -ffast-math and with FP contraction
 * impossible: no expression here has the shape a * b + c). Format and formulas:
 * kvc_page_format.h.
 */
#ifndef KVC_QUANT_H
#define KVC_QUANT_H

#include <stdint.h>

#include "compress/kvc_page_format.h"

#ifdef __CUDA_ARCH__
#define KVC_FDIV(a, b) __fdiv_rn((a), (b))
#define KVC_FMUL(a, b) __fmul_rn((a), (b))
#define KVC_DMUL(a, b) __dmul_rn((a), (b))
#define KVC_DSUB(a, b) __dsub_rn((a), (b))
#define KVC_RINT(a) rintf(a)
#define KVC_FABS(a) fabs(a)
#else
#include <math.h>
#define KVC_FDIV(a, b) ((a) / (b))
#define KVC_FMUL(a, b) ((a) * (b))
#define KVC_DMUL(a, b) ((a) * (b))
#define KVC_DSUB(a, b) ((a) - (b))
#define KVC_RINT(a) rintf(a)
#define KVC_FABS(a) fabs(a)
#endif

/* |q| must stay below this so that q, centres and bases fit int32 arithmetic. */
#define KVC_Q_ABS_LIMIT 1073741824.0f /* 2^30 */

/* q = rint(x / step); 0 when |x / step| >= 2^30 (or x is not finite). */
KVC_HD int kvc_q_of(float x, float step, int32_t *q) {
  float r = KVC_FDIV(x, step);
  if (!(r < KVC_Q_ABS_LIMIT && r > -KVC_Q_ABS_LIMIT)) return 0;
  *q = (int32_t)KVC_RINT(r);
  return 1;
}

/* The decoder's value for integer q. */
KVC_HD float kvc_q_recon(int32_t q, float step) { return KVC_FMUL((float)q, step); }

/* The bound check, in double: |recon - x| <= lim. */
KVC_HD int kvc_q_within(float recon, float x, double lim) {
  return KVC_FABS(KVC_DSUB((double)recon, (double)x)) <= lim;
}

/* Relative bound of a group with range [mn, mx]: lim = bound * (mx - mn); step target 2 * lim. */
KVC_HD double kvc_q_rel_lim(float bound, float mn, float mx) {
  return KVC_DMUL((double)bound, KVC_DSUB((double)mx, (double)mn));
}

/* Exponent of the lowest set bit of a finite non-zero float: x = odd * 2^k. */
KVC_HD int kvc_q_lowbit_exp(float x) {
  uint32_t b = kvc_f32_to_bits(x), ex = (b >> 23) & 0xffu, m = b & 0x7fffffu;
  int k;
  if (ex == 0) {
    k = -149;
  } else {
    m |= 0x800000u;
    k = (int)ex - 150;
  }
#ifdef __CUDA_ARCH__
  return k + (__ffs((int)m) - 1);
#else
  return k + __builtin_ctz(m);
#endif
}

/* Rounded mean of n integers with sum `sum` (ties upward), by floor division. */
KVC_HD int32_t kvc_q_center(int64_t sum, int n) {
  int64_t num = 2 * sum + n, den = 2 * (int64_t)n;
  int64_t f = num / den;
  if ((num % den != 0) && (num < 0)) f--;
  return (int32_t)f;
}

/* The encoders' longest code for a section of n_sym symbols: KVC_HUF_DIRECT_LEN when every symbol
 * is direct (the attention kernel's fast decoder then looks codes up in a 2^6-entry table, whose
 * 32 words a warp reads without bank conflicts; measured cost on the eval models and the capacity
 * bench's data: at most 0.011 bits/value), else KVC_HUF_MAX_LEN. */
KVC_HD int kvc_huf_len_limit(int n_sym) {
  return n_sym <= KVC_SYM_DIRECT ? KVC_HUF_DIRECT_LEN : KVC_HUF_MAX_LEN;
}

/* Folds a histogram of leaf depths bl[0..maxd] so that no depth exceeds limit (JPEG Annex K.3: a
 * pair of deepest leaves moves up, a shallower leaf moves down; each move keeps the Kraft sum, so
 * it ends for any limit with 2^limit >= the number of leaves). */
KVC_HD void kvc_huf_fold_depths(int *bl, int maxd, int limit) {
  for (int i = maxd; i > limit; i--) {
    while (bl[i] > 0) {
      int j = i - 2;
      while (bl[j] == 0) j--;
      bl[i] -= 2;
      bl[i - 1] += 1;
      bl[j + 1] += 2;
      bl[j] -= 1;
    }
  }
}

/*
 * Canonical length-limited Huffman code lengths (<= kvc_huf_len_limit(n_sym)) for symbol
 * counts[64].
 * Deterministic: leaves ordered by (count, symbol); when two smallest weights tie, a leaf is taken
 * before an internal node; lengths above the limit are folded with the JPEG (Annex K.3) procedure;
 * finally the lengths are handed out shortest first in (count descending, symbol ascending) order.
 * One symbol in use: all lengths 0 (it is coded with no bits). Returns n_sym = highest symbol in use
 * + 1 (0 when no symbol is used). Single-threaded; fine on the device (one thread per section).
 */
KVC_HD int kvc_huf_build_lengths(const uint32_t *counts, uint8_t *len) {
  uint8_t order[KVC_SYM_COUNT];
  uint32_t w[2 * KVC_SYM_COUNT];
  uint8_t parent[2 * KVC_SYM_COUNT], depth[2 * KVC_SYM_COUNT];
  int m = 0, n_sym = 0;
  for (int s = 0; s < KVC_SYM_COUNT; s++) {
    len[s] = 0;
    if (counts[s] == 0) continue;
    n_sym = s + 1;
    int i = m++;
    while (i > 0 && counts[order[i - 1]] > counts[s]) { /* stable: equal counts keep symbol order */
      order[i] = order[i - 1];
      i--;
    }
    order[i] = (uint8_t)s;
  }
  if (m <= 1) return n_sym;
  for (int i = 0; i < m; i++) w[i] = counts[order[i]];
  int leaf = 0, inode = m, next = m;
  for (int k = 0; k < m - 1; k++) {
    int pick[2];
    for (int j = 0; j < 2; j++) {
      if (leaf < m && (inode >= next || w[leaf] <= w[inode])) pick[j] = leaf++;
      else pick[j] = inode++;
    }
    w[next] = w[pick[0]] + w[pick[1]];
    parent[pick[0]] = parent[pick[1]] = (uint8_t)next;
    next++;
  }
  int bl[2 * KVC_SYM_COUNT];
  for (int i = 0; i < 2 * KVC_SYM_COUNT; i++) bl[i] = 0;
  depth[2 * m - 2] = 0;
  int maxd = 0;
  for (int i = 2 * m - 3; i >= 0; i--) {
    depth[i] = (uint8_t)(depth[parent[i]] + 1);
    if (i < m) {
      bl[depth[i]]++;
      if (depth[i] > maxd) maxd = depth[i];
    }
  }
  kvc_huf_fold_depths(bl, maxd, kvc_huf_len_limit(n_sym));
  /* order is (count ascending, symbol ascending); hand out lengths over (count descending, symbol
   * ascending): walk runs of equal counts from the end, each run in symbol order. */
  int l = 1, pos = m;
  while (pos > 0) {
    int start = pos - 1;
    while (start > 0 && counts[order[start - 1]] == counts[order[pos - 1]]) start--;
    for (int i = start; i < pos; i++) {
      while (bl[l] == 0) l++;
      len[order[i]] = (uint8_t)l;
      bl[l]--;
    }
    pos = start;
  }
  return n_sym;
}

/* Canonical codes (right-aligned, `len[s]` bits) for the lengths: ordered by (length, symbol). */
KVC_HD void kvc_huf_codes(const uint8_t *len, uint32_t *code) {
  uint32_t c = 0;
  for (int l = 1; l <= KVC_HUF_MAX_LEN; l++) {
    for (int s = 0; s < KVC_SYM_COUNT; s++)
      if (len[s] == l) code[s] = c++;
    c <<= 1;
  }
  for (int s = 0; s < KVC_SYM_COUNT; s++)
    if (len[s] == 0) code[s] = 0;
}

#endif /* KVC_QUANT_H */
