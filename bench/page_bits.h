/*
 * Where a page's bits go: splits the bytes of compressed pages (compress/kvc_page_format.h) into
 * the page header and section table, each quantized section's header, group fields (step codes,
 * bases or centres), code lengths, lane lengths, code stream, and the padding of the stream words
 * and of each section's 16-byte alignment, plus the pool chunk rounding of the page. Raw
 * sections count as payload. Used by bench_capacity on the pages a filled cache holds.
 *
 * Everything here is static (included by one benchmark program); no global state.
 */
#ifndef KVC_BENCH_PAGE_BITS_H
#define KVC_BENCH_PAGE_BITS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <math.h>

#include "allocator/kvc_pool_layout.h"
#include "compress/kvc_page_format.h"
#include "compress/kvc_quant.h"
#include "kvcomp.h"

#define KVCB_WHATIF_CHUNK 1024u
#define KVCB_WHATIF_CHUNKS 5 /* 1, 2, 4, 8, 16 KiB */

/* Bit totals over a set of pages, by part. */
enum {
  KVCB_BITS_PAGE_HEADER, /* page header, section table, alignment to the first section */
  KVCB_BITS_QSEC_HEADER, /* the 16-byte header of each quantized section */
  KVCB_BITS_STEP_CODES,  /* REL: e_g - e_min per group */
  KVCB_BITS_BASES,       /* REL: base_g - b_min per group; ABS: per-channel centres */
  KVCB_BITS_CODEBOOK,    /* Huffman code lengths */
  KVCB_BITS_LANE_TABLE,  /* Huffman lane lengths */
  KVCB_BITS_STREAM,      /* codes (bit-pack or Huffman with extra bits), or raw values */
  KVCB_BITS_ENTROPY,     /* of which, Huffman: the symbols' entropy (each section's own counts) */
  KVCB_BITS_EXTRA,       /* of which, Huffman: raw bits after symbols >= 32 */
  KVCB_BITS_WORD_PAD,    /* unused stream bits: the last word's, and in paired bit-pack sections
                            the gap before the codes' first word and an odd token's zero row */
  KVCB_BITS_SECTION_PAD, /* 16-byte alignment after each section */
  KVCB_BITS_CHUNK_PAD,   /* pool chunk rounding of the page */
  KVCB_BITS_PARTS
};

/* The parts' keys in bench_capacity's JSON line. */
static const char *const kvcb_bits_part_keys[KVCB_BITS_PARTS] = {
    "page_header",  "section_headers", "step_codes",   "bases",
    "code_lengths", "lane_lengths",    "stream",       "stream_entropy",
    "extra_bits",   "word_padding",    "section_align", "chunk_rounding"};

/* Parts that are shares of the code stream, not added to the page's bytes again. */
static inline int kvcb_bits_part_is_share(int k) {
  return k == KVCB_BITS_ENTROPY || k == KVCB_BITS_EXTRA;
}

static const char *const kvcb_bits_part_names[KVCB_BITS_PARTS] = {
    "page header + section table", "section headers", "group step codes", "group bases",
    "Huffman code lengths",        "Huffman lane lengths", "code stream",
    "  of it: symbol entropy",     "  of it: extra bits",  "stream word padding",
    "section 16-byte alignment",   "pool chunk rounding"};

typedef struct kvcb_page_bits {
  double bits[KVCB_BITS_PARTS];
  double values; /* K and V values the pages hold */
  int64_t pages;
  int64_t bad_pages; /* pages this parser could not read (should stay 0) */
  uint32_t min_bytes, max_bytes;
  int64_t pages_by_chunks[KVC_PAGE_MAX_CHUNKS + 1]; /* at the pool's chunk size */
  /* The same pages in chunks of KVCB_WHATIF_CHUNK << i bytes, for comparison (bytes occupied). */
  double bytes_at_chunk[KVCB_WHATIF_CHUNKS];
} kvcb_page_bits_t;

static inline void kvcb_page_bits_init(kvcb_page_bits_t *b) {
  memset(b, 0, sizeof *b);
  b->min_bytes = UINT32_MAX;
}

/* The bits of a Huffman section's streams (back to back, so decoded as one) at bit `pos` of
 * words[nwords]: *entropy, the empirical
 * entropy of its symbols (their counts in this section), and *extra, the raw bits after them.
 * Returns -1 when a stream does not decode (a code not in the table). */
static inline int kvcb_huf_stream_entropy(const uint8_t *words, uint32_t nwords, uint64_t pos,
                                          const uint8_t *len, uint32_t n_sym, uint32_t symbols,
                                          double *entropy, double *extra) {
  static const int kBits = KVC_HUF_MAX_LEN;
  uint16_t table[1 << KVC_HUF_MAX_LEN]; /* symbol + 1 for every window prefix; 0: no code */
  uint32_t code[KVC_SYM_COUNT], counts[KVC_SYM_COUNT] = {0};
  kvc_huf_codes(len, code);
  memset(table, 0, sizeof table);
  int used = 0, only = -1;
  for (uint32_t s = 0; s < n_sym; s++) {
    if (len[s] == 0) continue;
    used++;
    uint32_t first = code[s] << (kBits - len[s]), n = 1u << (kBits - len[s]);
    for (uint32_t i = 0; i < n; i++) table[first + i] = (uint16_t)(s + 1);
  }
  if (used == 0) only = (int)n_sym - 1; /* one symbol, coded with no bits */
  uint64_t bits_extra = 0;
  for (uint32_t i = 0; i < symbols; i++) {
    int s = only;
    if (s < 0) {
      uint32_t t = table[kvc_bits_window(words, nwords, pos) >> (32 - kBits)];
      if (t == 0) return -1;
      s = (int)t - 1;
      pos += len[s];
    }
    uint32_t ne = kvc_sym_extra((uint32_t)s);
    pos += ne;
    bits_extra += ne;
    counts[s]++;
  }
  double h = 0.0;
  for (int s = 0; s < KVC_SYM_COUNT; s++)
    if (counts[s]) h -= counts[s] * log2((double)counts[s] / symbols);
  *entropy = h;
  *extra = (double)bits_extra;
  return 0;
}

/* Adds the page at p (size bytes, stored in chunks of chunk_bytes) to b. Returns 0, or -1 for a
 * page whose header or sections this parser does not accept (counted in bad_pages). */
static inline int kvcb_page_bits_add(kvcb_page_bits_t *b, const uint8_t *p, uint32_t size,
                                     uint32_t chunk_bytes) {
  kvc_page_header_t h;
  if (size < KVC_PAGE_HEADER_BYTES) goto bad;
  kvc_page_header_read(p, &h);
  const uint32_t H = h.num_kv_heads, hd = h.head_dim, n = h.n_tokens;
  if (h.magic != KVC_PAGE_MAGIC || h.total_bytes != size || H == 0 ||
      kvc_page_sections_start(H, h.codec) > size)
    goto bad;
  double part[KVCB_BITS_PARTS] = {0};
  part[KVCB_BITS_PAGE_HEADER] = 8.0 * kvc_page_sections_start(H, h.codec);
  for (uint32_t i = 0; i < 2 * H; i++) {
    uint32_t off, bytes;
    kvc_page_section(p, H, i, &off, &bytes);
    if (off + bytes > size) goto bad;
    uint32_t next = i + 1 < 2 * H ? kvc_align16(off + bytes) : size;
    part[KVCB_BITS_SECTION_PAD] += 8.0 * (next - (off + bytes));
    if (h.codec == KVC_CODEC_RAW) {
      part[KVCB_BITS_STREAM] += 8.0 * bytes;
      continue;
    }
    if (bytes < KVC_QSEC_HEADER_BYTES) goto bad;
    kvc_qsec_header_t q;
    kvc_qsec_header_read(p + off, &q);
    const uint8_t *words = p + off + KVC_QSEC_HEADER_BYTES;
    const uint32_t nwords = (bytes - KVC_QSEC_HEADER_BYTES) / 4;
    const uint32_t groups = q.mode == KVC_QMODE_ABS ? hd : i < H ? hd : n;
    uint64_t pos = 0, used;
    part[KVCB_BITS_QSEC_HEADER] += 8.0 * KVC_QSEC_HEADER_BYTES;
    if (q.mode == KVC_QMODE_REL) part[KVCB_BITS_STEP_CODES] += (double)groups * q.w_e;
    part[KVCB_BITS_BASES] += (double)groups * q.w_b;
    pos = (uint64_t)groups * ((q.mode == KVC_QMODE_REL ? q.w_e : 0u) + q.w_b);
    if (h.codec == KVC_CODEC_BITPACK) {
      /* The codes proper; a paired section's alignment and zero row fall to KVCB_BITS_WORD_PAD. */
      const int paired = kvc_bp_paired(i >= H, hd);
      const uint64_t end = kvc_bp_start((uint32_t)pos, paired) + kvc_bp_code_bits(n, hd, q.width,
                                                                                 paired);
      if (end > 32ull * nwords) goto bad;
      part[KVCB_BITS_STREAM] += (double)n * hd * q.width;
      used = pos + (uint64_t)n * hd * q.width;
    } else {
      const uint32_t w_lane = q.lane_info >> 27, lane_min = q.lane_info & ((1u << 27) - 1);
      part[KVCB_BITS_CODEBOOK] += 4.0 * q.width;
      pos += 4u * q.width;
      part[KVCB_BITS_LANE_TABLE] += (double)q.n_lanes * w_lane;
      uint64_t stream = 0;
      for (uint32_t l = 0; l < q.n_lanes; l++)
        stream += lane_min + kvc_bits_get(words, nwords, pos + (uint64_t)l * w_lane, w_lane);
      part[KVCB_BITS_STREAM] += (double)stream;
      uint8_t len[KVC_SYM_COUNT] = {0};
      for (uint32_t s = 0; s < q.width && s < KVC_SYM_COUNT; s++)
        len[s] = (uint8_t)kvc_bits_get(words, nwords, pos - 4u * q.width + 4u * s, 4);
      double entropy, extra;
      if (kvcb_huf_stream_entropy(words, nwords, pos + (uint64_t)q.n_lanes * w_lane, len, q.width,
                                  n * hd, &entropy, &extra) != 0)
        goto bad;
      part[KVCB_BITS_ENTROPY] += entropy;
      part[KVCB_BITS_EXTRA] += extra;
      used = pos + (uint64_t)q.n_lanes * w_lane + stream;
    }
    if (used > 32ull * nwords) goto bad;
    part[KVCB_BITS_WORD_PAD] += 8.0 * (bytes - KVC_QSEC_HEADER_BYTES) - (double)used;
  }
  uint32_t chunks = kvc_chunks_for(size, chunk_bytes);
  part[KVCB_BITS_CHUNK_PAD] = 8.0 * ((double)chunks * chunk_bytes - size);
  for (int k = 0; k < KVCB_BITS_PARTS; k++) b->bits[k] += part[k];
  b->values += 2.0 * H * n * hd;
  b->pages++;
  if (size < b->min_bytes) b->min_bytes = size;
  if (size > b->max_bytes) b->max_bytes = size;
  b->pages_by_chunks[chunks <= KVC_PAGE_MAX_CHUNKS ? chunks : KVC_PAGE_MAX_CHUNKS]++;
  for (int i = 0; i < KVCB_WHATIF_CHUNKS; i++) {
    uint32_t cb = KVCB_WHATIF_CHUNK << i;
    b->bytes_at_chunk[i] += (double)kvc_chunks_for(size, cb) * cb;
  }
  return 0;
bad:
  b->bad_pages++;
  return -1;
}

#endif /* KVC_BENCH_PAGE_BITS_H */
