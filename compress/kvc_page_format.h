/*
 * The compressed page format, version 3: the bytes of one block (all kv heads, K and V) for one
 * layer. Plain C, no CUDA types; the KVC_HD helpers below run on host and device, so the CPU codec,
 * the CUDA encoder and the attention kernels read one definition. All multi-byte fields are
 * little-endian (every supported host and NVIDIA GPUs are).
 *
 * Page:
 *   [0, 32)          kvc_page_header_t
 *   [32, 32 + 8*H)   section table: uint32 section_end[2 * H], H = num_kv_heads; section
 *                    i = tensor * H + head (tensor 0 = K, 1 = V) occupies [start_i, section_end[i])
 *                    with start_0 = align16(32 + 8*H), align128 on RAW pages (version 3), and
 *                    start_i = align16(section_end[i-1]).
 *   sections, each starting 16-byte aligned; total_bytes = align16(section_end[2H-1]).
 * RAW pages start their sections 128-byte aligned so that, with rows of a multiple of 128 bytes
 * (head_dim >= 64 at 16 bits), every section lies 128-byte aligned in a pool of chunk-aligned
 * pages: the GPU's bulk copies (TMA) read sources off that alignment up to ~20% slower
 * (bench/NOTES-capacity.md, session 54).
 * The header checksum (kvc_page_checksum) covers the header (checksum field taken as 0) and the
 * section table. Section payloads are not checksummed: a decoder given damaged payload bytes still
 * never reads or writes out of bounds (it produces wrong values instead).
 *
 * A section holds one (tensor, kv head): n_tokens x head_dim values, symbol s = t * head_dim + d.
 *
 * RAW section: the values as given, [n_tokens][head_dim] in the page dtype (fp16/bf16/fp32).
 *
 * Quantized section (BITPACK, HUFFMAN): kvc_qsec_header_t (16 bytes), then one bit array read as
 * little-endian uint32 words, most significant bit first (stream bit b is bit 31 - b % 32 of word
 * b / 32), holding back to back, without padding (but before a paired section's codes, below):
 *   REL mode  e_g - e_min      [n_groups] x w_e bits  (step code of each group)
 *             base_g - b_min   [n_groups] x w_b bits  (n_groups: head_dim for K, n_tokens for V)
 *   ABS mode  center_c - b_min [head_dim] x w_b bits  (per-channel integer centre; step code e_min)
 *   HUFFMAN   code lengths     [n_sym] x 4 bits (0 = unused; all 0: symbol n_sym-1 has length 0)
 *             lane_bits_i - lane_min [n_lanes] x w_lane bits
 *   stream    BITPACK: u_s in `width` bits for s = 0..S-1 (S = n_tokens * head_dim), back to
 *                       back, except in paired sections (below)
 *             HUFFMAN: lane 0's bits, lane 1's bits, ...; lane i codes symbols i, i + n_lanes,
 *             i + 2 n_lanes, ... (strided, so that a warp's lanes write neighbouring outputs;
 *             the encoders' n_lanes: kvc_huf_lanes, one lane per channel for 16-64 tokens)
 * The section's byte count is 16 + 4 * words; words cover every bit above.
 *
 * Paired sections (kvc_bp_paired: BITPACK values, head_dim a multiple of 16) hold their codes by
 * token pairs, so that one 32-bit word gives two tokens' codes of the same channels, at the same
 * bits of its two halves (the fused kernel's fp16 operand pairs). A token's row is its head_dim
 * codes back to back (R = head_dim * width bits, channel 0 first, most significant bit first).
 * The codes start at the first word boundary after the group fields (kvc_bp_start); block p
 * (tokens 2p, 2p + 1; p < ceil(n_tokens / 2)) is the R / 16 words from word start / 32 + p R / 16
 * on; its word m holds row bits [16 m, 16 m + 16) of token 2p in its low half and of token 2p + 1
 * in its high half, each half most significant bit first; a token past n_tokens is all zero bits.
 * kvc_bp_bit maps a row bit to its stream bit.
 *
 * Quantization (the error-bound contract; x = input value as float, exactly):
 *   step(e)  = kvc_step_from_code(e) = M[e & 7] / 32 * 2^(e >> 3), M = {32,35,38,41,45,49,54,59}
 *              (8 steps per octave, 6 significant bits, always a normal float: exact products)
 *   q        = rintf(x / step) (IEEE float division, round half to even), an int32
 *   REL      group g = channel d (K) or token t (V); step_g = step(e_g); base_g = min q over g;
 *            u = q - base_g; decoded value = (float)(base_g + u) * step_g
 *   ABS      one step e_min; u = zigzag(q - center_d); decoded value = (float)(center_d +
 *            unzigzag(u)) * step
 * The encoder verifies every value in double precision: |decoded - x| <= bound * (max_g - min_g)
 * (REL) or <= bound (ABS); a REL group that fails takes the exact power-of-two step that divides
 * all its values (this also codes constant groups exactly). u < 2^KVC_Q_MAX_BITS always.
 *
 * Symbols (HUFFMAN): u < 32 is symbol u; above, two symbols per octave with extra raw bits after
 * the code: kvc_sym_of / kvc_sym_base / kvc_sym_extra. Codes are canonical (ordered by length,
 * then symbol) and at most KVC_HUF_MAX_LEN bits, so one KVC_HUF_MAX_LEN-bit lookup decodes a
 * symbol; KVC_HUF_MAX_LEN + extra <= 30 bits, so a 32-bit window always holds code and extra bits.
 * The encoders give a section whose symbols are all direct (n_sym <= KVC_SYM_DIRECT) codes of at
 * most KVC_HUF_DIRECT_LEN bits (kvc_huf_len_limit), which the fused attention kernel decodes with
 * a 64-entry table; decoders accept any length up to KVC_HUF_MAX_LEN.
 */
#ifndef KVC_PAGE_FORMAT_H
#define KVC_PAGE_FORMAT_H

#include <stdint.h>
#ifndef __CUDACC__
#include <string.h>
#endif

#include "allocator/kvc_pool_layout.h"

#define KVC_PAGE_MAGIC 0x5043564Bu /* "KVCP" */
#define KVC_PAGE_VERSION 3 /* 2: paired value sections; 3: RAW sections 128-byte aligned */
#define KVC_PAGE_HEADER_BYTES 32
#define KVC_PAGE_ALIGN 16
#define KVC_QSEC_HEADER_BYTES 16

#define KVC_QMODE_REL 0 /* per-group step and base (relative bound) */
#define KVC_QMODE_ABS 1 /* one step, per-channel centre (absolute bound) */

#define KVC_HUF_MAX_LEN 11                     /* longest code, bits */
#define KVC_HUF_TABLE_SIZE (1 << KVC_HUF_MAX_LEN) /* decode table entries */
#define KVC_SYM_DIRECT 32                      /* symbols 0..31 code u itself */
#define KVC_HUF_DIRECT_LEN 6                   /* encoders' longest code when n_sym <= 32 */
#define KVC_SYM_COUNT 64                       /* alphabet size */
#define KVC_Q_MAX_BITS 21                      /* u < 2^21 */
#define KVC_LANE_SYMBOLS 64                    /* the encoder's most symbols per lane */
#define KVC_MAX_LANES 1024
#define KVC_FMT_MAX_HEAD_DIM 256
#define KVC_FMT_MAX_TOKENS 256
#define KVC_STEP_CODE_MIN (-126 * 8)    /* step(e) >= 2^-126 */
#define KVC_STEP_CODE_MAX (127 * 8 + 7) /* step(e) < 2^128 */

/* Wire layout of the page header (32 bytes). */
typedef struct kvc_page_header {
  uint32_t magic;        /* KVC_PAGE_MAGIC */
  uint8_t version;       /* KVC_PAGE_VERSION */
  uint8_t codec;         /* kvc_codec_t, the same for every section */
  uint8_t dtype;         /* kvc_dtype_t of the input and of RAW sections */
  uint8_t bound_mode;    /* kvc_bound_mode_t the page was coded with */
  uint16_t n_tokens;     /* 1..256 */
  uint16_t num_kv_heads; /* >= 1 */
  uint16_t head_dim;     /* multiple of 8, 8..256 */
  uint16_t flags;        /* 0 */
  float k_bound;
  float v_bound;
  uint32_t total_bytes;  /* the page, a multiple of 16 */
  uint32_t checksum;     /* kvc_page_checksum */
} kvc_page_header_t;

/* Wire layout of a quantized section's header (16 bytes). */
typedef struct kvc_qsec_header {
  uint8_t mode;       /* KVC_QMODE_REL or KVC_QMODE_ABS */
  uint8_t w_e;        /* REL: bits per (e_g - e_min); ABS: 0 */
  uint8_t w_b;        /* bits per (base_g - b_min) or (center_c - b_min), 0..31 */
  uint8_t width;      /* BITPACK: bits per code, 0..KVC_Q_MAX_BITS; HUFFMAN: n_sym, 1..64 */
  int16_t e_min;      /* REL: smallest group step code; ABS: the step code */
  uint16_t n_lanes;   /* HUFFMAN: 1..min(S, KVC_MAX_LANES); BITPACK: 0 */
  int32_t b_min;
  uint32_t lane_info; /* HUFFMAN: lane_min (bits 0..26) | w_lane << 27; BITPACK: 0 */
} kvc_qsec_header_t;

KVC_HD uint32_t kvc_align16(uint32_t x) { return (x + 15u) & ~15u; }

/* The lanes (streams) the encoders give a Huffman section of n_tokens x head_dim symbols: one per
 * channel for 16 to 64 tokens (blocks of 16, 32 and 64 tokens), so that a decoder takes every
 * page's channels as independent chains; else ceil(S / KVC_LANE_SYMBOLS) (fewer, longer streams
 * for a few tokens, whose stream lengths would outweigh their codes). Decoders take any n_lanes
 * in 1..min(S, KVC_MAX_LANES). */
KVC_HD int kvc_huf_lanes(int n_tokens, int head_dim) {
  const int S = n_tokens * head_dim;
  const int l = n_tokens >= 16 && n_tokens <= KVC_LANE_SYMBOLS
                    ? head_dim
                    : (S + KVC_LANE_SYMBOLS - 1) / KVC_LANE_SYMBOLS;
  return l > KVC_MAX_LANES ? KVC_MAX_LANES : l;
}

KVC_HD uint32_t kvc_rd_u16(const uint8_t *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }
KVC_HD uint32_t kvc_rd_u32(const uint8_t *p) {
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
KVC_HD void kvc_wr_u16(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)v;
  p[1] = (uint8_t)(v >> 8);
}
KVC_HD void kvc_wr_u32(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)v;
  p[1] = (uint8_t)(v >> 8);
  p[2] = (uint8_t)(v >> 16);
  p[3] = (uint8_t)(v >> 24);
}
KVC_HD float kvc_bits_to_f32(uint32_t b) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(b);
#else
  float f;
  memcpy(&f, &b, 4);
  return f;
#endif
}
KVC_HD uint32_t kvc_f32_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t b;
  memcpy(&b, &f, 4);
  return b;
#endif
}

/* Parses the header at p (any alignment). */
KVC_HD void kvc_page_header_read(const uint8_t *p, kvc_page_header_t *h) {
  h->magic = kvc_rd_u32(p);
  h->version = p[4];
  h->codec = p[5];
  h->dtype = p[6];
  h->bound_mode = p[7];
  h->n_tokens = (uint16_t)kvc_rd_u16(p + 8);
  h->num_kv_heads = (uint16_t)kvc_rd_u16(p + 10);
  h->head_dim = (uint16_t)kvc_rd_u16(p + 12);
  h->flags = (uint16_t)kvc_rd_u16(p + 14);
  h->k_bound = kvc_bits_to_f32(kvc_rd_u32(p + 16));
  h->v_bound = kvc_bits_to_f32(kvc_rd_u32(p + 20));
  h->total_bytes = kvc_rd_u32(p + 24);
  h->checksum = kvc_rd_u32(p + 28);
}

KVC_HD void kvc_page_header_write(uint8_t *p, const kvc_page_header_t *h) {
  kvc_wr_u32(p, h->magic);
  p[4] = h->version;
  p[5] = h->codec;
  p[6] = h->dtype;
  p[7] = h->bound_mode;
  kvc_wr_u16(p + 8, h->n_tokens);
  kvc_wr_u16(p + 10, h->num_kv_heads);
  kvc_wr_u16(p + 12, h->head_dim);
  kvc_wr_u16(p + 14, h->flags);
  kvc_wr_u32(p + 16, kvc_f32_to_bits(h->k_bound));
  kvc_wr_u32(p + 20, kvc_f32_to_bits(h->v_bound));
  kvc_wr_u32(p + 24, h->total_bytes);
  kvc_wr_u32(p + 28, h->checksum);
}

KVC_HD void kvc_qsec_header_read(const uint8_t *p, kvc_qsec_header_t *s) {
  s->mode = p[0];
  s->w_e = p[1];
  s->w_b = p[2];
  s->width = p[3];
  s->e_min = (int16_t)kvc_rd_u16(p + 4);
  s->n_lanes = (uint16_t)kvc_rd_u16(p + 6);
  s->b_min = (int32_t)kvc_rd_u32(p + 8);
  s->lane_info = kvc_rd_u32(p + 12);
}

KVC_HD void kvc_qsec_header_write(uint8_t *p, const kvc_qsec_header_t *s) {
  p[0] = s->mode;
  p[1] = s->w_e;
  p[2] = s->w_b;
  p[3] = s->width;
  kvc_wr_u16(p + 4, (uint16_t)s->e_min);
  kvc_wr_u16(p + 6, s->n_lanes);
  kvc_wr_u32(p + 8, (uint32_t)s->b_min);
  kvc_wr_u32(p + 12, s->lane_info);
}

/* Bytes of the section table, and where the first section of a page of `codec` starts. */
KVC_HD uint32_t kvc_page_table_bytes(uint32_t num_kv_heads) { return 8u * num_kv_heads; }
KVC_HD uint32_t kvc_page_sections_start(uint32_t num_kv_heads, uint32_t codec) {
  const uint32_t end = KVC_PAGE_HEADER_BYTES + kvc_page_table_bytes(num_kv_heads);
  return codec == KVC_CODEC_RAW ? (end + 127u) & ~127u : kvc_align16(end);
}

/* One checksum step over a 32-bit word (FNV-1a on words, with a final avalanche per step). */
KVC_HD uint32_t kvc_checksum_step(uint32_t h, uint32_t w) {
  h = (h ^ w) * 16777619u;
  return h ^ (h >> 15);
}
#define KVC_CHECKSUM_SEED 2166136261u

/* Checksum of the header (checksum field as 0) and the section table of the page at p; the
 * caller has checked that p holds 32 + 8 * num_kv_heads bytes. */
KVC_HD uint32_t kvc_page_checksum(const uint8_t *p) {
  uint32_t h = KVC_CHECKSUM_SEED;
  uint32_t n = (KVC_PAGE_HEADER_BYTES + kvc_page_table_bytes(kvc_rd_u16(p + 10))) / 4;
  for (uint32_t i = 0; i < n; i++) h = kvc_checksum_step(h, i == 7 ? 0u : kvc_rd_u32(p + 4 * i));
  return h;
}

/* Section `idx` (tensor * H + head) of a page whose header and table are at p: byte offset and
 * byte count. Trusts the table (kvc_codec_page_info validates it on the host). */
KVC_HD void kvc_page_section(const uint8_t *p, uint32_t num_kv_heads, uint32_t idx, uint32_t *off,
                             uint32_t *bytes) {
  uint32_t start = idx == 0 ? kvc_page_sections_start(num_kv_heads, p[5] /* codec */)
                            : kvc_align16(kvc_rd_u32(p + KVC_PAGE_HEADER_BYTES + 4 * (idx - 1)));
  uint32_t end = kvc_rd_u32(p + KVC_PAGE_HEADER_BYTES + 4 * idx);
  *off = start;
  *bytes = end > start ? end - start : 0;
}

/* Element size of a dtype (kvc_dtype_t): 2, 2, 4; 0 for an unknown value. */
KVC_HD uint32_t kvc_dtype_bytes(uint32_t dtype) {
  return dtype == 0 ? 2u : dtype == 1 ? 2u : dtype == 2 ? 4u : 0u;
}

/* Bytes of a RAW section. */
KVC_HD uint32_t kvc_raw_section_bytes(uint32_t n_tokens, uint32_t head_dim, uint32_t dtype) {
  return n_tokens * head_dim * kvc_dtype_bytes(dtype);
}

/* ---- quantization ------------------------------------------------------------------------- */

/* M[i] - 32 for i = 0..7, one byte each. */
#define KVC_STEP_MANT_PACKED 0x1B16110D09060300ull

KVC_HD int kvc_step_code_exp(int e) { return (e - (e & 7)) / 8; }

/* step(e) for KVC_STEP_CODE_MIN <= e <= KVC_STEP_CODE_MAX: built from bits, so bit-identical on
 * every compiler and device. */
KVC_HD float kvc_step_from_code(int e) {
  uint32_t m = (uint32_t)(KVC_STEP_MANT_PACKED >> (8 * (e & 7))) & 0xffu;
  uint32_t bits = ((uint32_t)(kvc_step_code_exp(e) + 127) << 23) | (m << 18);
  return kvc_bits_to_f32(bits);
}

/* Largest step code e <= KVC_STEP_CODE_MAX with step(e) <= t, or KVC_STEP_CODE_MIN - 1 when even
 * the smallest step exceeds t (or t is not a positive number). Integer-only on t's bits. */
KVC_HD int kvc_step_code_floor(double t) {
  if (!(t > 0.0)) return KVC_STEP_CODE_MIN - 1;
  uint64_t b;
#ifdef __CUDA_ARCH__
  b = (uint64_t)__double_as_longlong(t);
#else
  memcpy(&b, &t, 8);
#endif
  int ex = (int)((b >> 52) & 0x7ff) - 1023;
  if (ex > 127) return KVC_STEP_CODE_MAX; /* also +inf */
  if (ex < -126) return KVC_STEP_CODE_MIN - 1;
  uint64_t frac = b & ((1ull << 52) - 1);
  int i = 7;
  while (i > 0 && ((KVC_STEP_MANT_PACKED >> (8 * i)) & 0xffu) << 47 > frac) i--;
  return ex * 8 + i;
}

KVC_HD uint32_t kvc_zigzag(int32_t d) { return ((uint32_t)d << 1) ^ (uint32_t)(d >> 31); }
KVC_HD int32_t kvc_unzigzag(uint32_t u) { return (int32_t)((u >> 1) ^ (0u - (u & 1u))); }

KVC_HD uint32_t kvc_clz32(uint32_t x) {
#ifdef __CUDA_ARCH__
  return (uint32_t)__clz(x);
#else
  return x ? (uint32_t)__builtin_clz(x) : 32u;
#endif
}

/* Huffman symbol of a code u (< 2^KVC_Q_MAX_BITS). */
KVC_HD uint32_t kvc_sym_of(uint32_t u) {
  if (u < KVC_SYM_DIRECT) return u;
  uint32_t j = 31u - kvc_clz32(u); /* 5..20 */
  return KVC_SYM_DIRECT + 2u * (j - 5u) + ((u >> (j - 1u)) & 1u);
}
/* Number of raw bits after symbol s's code, and the smallest u it stands for. */
KVC_HD uint32_t kvc_sym_extra(uint32_t s) {
  return s < KVC_SYM_DIRECT ? 0u : (s - KVC_SYM_DIRECT) / 2u + 4u;
}
KVC_HD uint32_t kvc_sym_base(uint32_t s) {
  return s < KVC_SYM_DIRECT ? s : (2u + (s & 1u)) << kvc_sym_extra(s);
}

/* Decode-table entry: bits consumed (code + extra) | extra << 5 | base << 10. */
KVC_HD uint32_t kvc_huf_entry(uint32_t sym, uint32_t len) {
  uint32_t ne = kvc_sym_extra(sym);
  return (len + ne) | (ne << 5) | (kvc_sym_base(sym) << 10);
}

/* The 32 stream bits starting at bit `pos` of words[nwords] (little-endian uint32 words at any
 * alignment); bits past the end read as 0. */
KVC_HD uint32_t kvc_bits_window(const uint8_t *words, uint32_t nwords, uint64_t pos) {
  uint64_t k = pos >> 5;
  uint64_t hi = k < nwords ? kvc_rd_u32(words + 4 * k) : 0;
  uint64_t lo = k + 1 < nwords ? kvc_rd_u32(words + 4 * (k + 1)) : 0;
  return (uint32_t)((((hi << 32) | lo) << (pos & 31)) >> 32);
}

/* The w-bit (0..32) field at bit `pos`. */
KVC_HD uint32_t kvc_bits_get(const uint8_t *words, uint32_t nwords, uint64_t pos, uint32_t w) {
  return (uint32_t)((uint64_t)kvc_bits_window(words, nwords, pos) >> (32 - w));
}

/* ---- bit-pack codes ------------------------------------------------------------------------ */

/* Whether a BITPACK section of tensor (0 K, 1 V) at head_dim holds its codes by token pairs. */
KVC_HD int kvc_bp_paired(int tensor, uint32_t head_dim) {
  return tensor == 1 && head_dim % 16 == 0;
}

/* Stream bit where a BITPACK section's codes start, its group fields taking bits [0, meta). */
KVC_HD uint32_t kvc_bp_start(uint32_t meta, int paired) {
  return paired ? (meta + 31u) & ~31u : meta;
}

/* Bits of a BITPACK section's codes, from kvc_bp_start on. */
KVC_HD uint64_t kvc_bp_code_bits(uint32_t n_tokens, uint32_t head_dim, uint32_t width, int paired) {
  const uint64_t rows = paired ? (n_tokens + 1u) & ~1u : n_tokens;
  return rows * head_dim * width;
}

/* Stream bit, counted from kvc_bp_start, of bit i of token t's row (row_bits = head_dim * width
 * bits per token). */
KVC_HD uint64_t kvc_bp_bit(int paired, uint32_t row_bits, uint32_t t, uint32_t i) {
  if (!paired) return (uint64_t)t * row_bits + i;
  return (uint64_t)(t >> 1) * 2u * row_bits + 32u * (i >> 4) + (t & 1u ? 0u : 16u) + (i & 15u);
}

/* Code d (width w, 0..KVC_Q_MAX_BITS) of token t of a BITPACK section whose codes start at stream
 * bit `start`: read piece by piece where a paired row's bits are not contiguous. */
KVC_HD uint32_t kvc_bp_get(const uint8_t *words, uint32_t nwords, uint64_t start, int paired,
                           uint32_t head_dim, uint32_t t, uint32_t d, uint32_t w) {
  const uint32_t row_bits = head_dim * w;
  uint32_t i = d * w;
  if (!paired) return kvc_bits_get(words, nwords, start + kvc_bp_bit(0, row_bits, t, i), w);
  uint32_t u = 0;
  while (w) {
    const uint32_t n = w < 16u - (i & 15u) ? w : 16u - (i & 15u);
    u = (u << n) | kvc_bits_get(words, nwords, start + kvc_bp_bit(1, row_bits, t, i), n);
    i += n;
    w -= n;
  }
  return u;
}

/* Bits needed to hold values 0..v. */
KVC_HD uint32_t kvc_bits_for(uint32_t v) { return 32u - kvc_clz32(v); }

#endif /* KVC_PAGE_FORMAT_H */
