/*
 * bench/page_bits.h, the capacity benchmark's split of page bytes into parts: on pages of every
 * codec the parts add up to the page, the pool chunk rounding is the chunks' slack, the fields
 * have the sizes the format gives them (a paired bit-pack section's zero row is padding), the
 * Huffman stream's symbol entropy is at most the stream and exactly 0 for a section of one symbol,
 * and a damaged page is refused.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "bench/page_bits.h"
#include "compress/kvc_codec.h"
#include "kvc_test_util.h"

enum { H = 4, HD = 16, BT = 64 };

static kvc_codec_params_t params(void) {
  kvc_codec_params_t p = {.dtype = KVC_DTYPE_F16,
                          .num_kv_heads = H,
                          .head_dim = HD,
                          .block_tokens = BT,
                          .bound_mode = KVC_BOUND_RELATIVE,
                          .k_bound = 0.03f,
                          .v_bound = 0.04f,
                          .policy = KVC_POLICY_FIXED,
                          .codec = KVC_CODEC_HUFFMAN};
  return p;
}

/* A staging block [2][H][BT][HD] fp16 of Gaussian values (constant = 0: all values equal). */
static uint16_t *make_block(uint64_t seed, int constant) {
  size_t n = (size_t)2 * H * BT * HD;
  uint16_t *b = malloc(n * sizeof *b);
  assert_non_null(b);
  kvc_test_rng_t r;
  kvc_test_rng_seed(&r, seed);
  for (size_t i = 0; i < n; i++)
    b[i] = kvc_test_f32_to_f16(constant ? 1.5f : (float)kvc_test_rng_normal(&r));
  return b;
}

/* Encodes the block with `codec` and adds the page to *bits; returns the page size. */
static uint32_t add_page(kvc_codec_t codec, const uint16_t *block, uint32_t chunk_bytes,
                         kvcb_page_bits_t *bits, uint8_t **page_out) {
  kvc_codec_params_t p = params();
  size_t cap = kvc_codec_max_page_bytes(&p), size = 0;
  uint8_t *page = malloc(cap);
  assert_non_null(page);
  assert_int_equal(kvc_codec_encode_with(&p, codec, block, BT, page, cap, &size), KVC_OK);
  assert_int_equal(kvcb_page_bits_add(bits, page, (uint32_t)size, chunk_bytes), 0);
  if (page_out)
    *page_out = page;
  else
    free(page);
  return (uint32_t)size;
}

/* The parts that make up the page bytes (not the chunk rounding, not the stream's shares). */
static double page_part_bits(const kvcb_page_bits_t *b) {
  double s = 0.0;
  for (int k = 0; k < KVCB_BITS_CHUNK_PAD; k++)
    if (!kvcb_bits_part_is_share(k)) s += b->bits[k];
  return s;
}

static void parts_add_up_for_every_codec(void **state) {
  (void)state;
  uint16_t *block = make_block(7, 0);
  const kvc_codec_t codecs[3] = {KVC_CODEC_RAW, KVC_CODEC_BITPACK, KVC_CODEC_HUFFMAN};
  for (int c = 0; c < 3; c++) {
    kvcb_page_bits_t b;
    kvcb_page_bits_init(&b);
    const uint32_t cb = 1024;
    uint32_t size = add_page(codecs[c], block, cb, &b, NULL);
    assert_int_equal(b.pages, 1);
    assert_int_equal(b.bad_pages, 0);
    assert_true(b.values == 2.0 * H * BT * HD);
    assert_true(page_part_bits(&b) == 8.0 * size);
    assert_true(b.bits[KVCB_BITS_CHUNK_PAD] == 8.0 * (kvc_chunks_for(size, cb) * cb - size));
    assert_true(b.bits[KVCB_BITS_PAGE_HEADER] == 8.0 * kvc_page_sections_start(H, codecs[c]));
    assert_int_equal(b.min_bytes, size);
    assert_int_equal(b.max_bytes, size);
    assert_int_equal(b.pages_by_chunks[kvc_chunks_for(size, cb)], 1);
    for (int i = 0; i < KVCB_WHATIF_CHUNKS; i++) {
      uint32_t w = KVCB_WHATIF_CHUNK << i;
      assert_true(b.bytes_at_chunk[i] == (double)kvc_chunks_for(size, w) * w);
    }
    if (codecs[c] == KVC_CODEC_RAW) {
      assert_true(b.bits[KVCB_BITS_STREAM] == 16.0 * b.values);
      assert_true(b.bits[KVCB_BITS_QSEC_HEADER] == 0.0);
    } else {
      assert_true(b.bits[KVCB_BITS_QSEC_HEADER] == 8.0 * KVC_QSEC_HEADER_BYTES * 2 * H);
      assert_true(b.bits[KVCB_BITS_STEP_CODES] > 0.0 && b.bits[KVCB_BITS_BASES] > 0.0);
      assert_true(b.bits[KVCB_BITS_WORD_PAD] >= 0.0 && b.bits[KVCB_BITS_WORD_PAD] < 32.0 * 2 * H);
      assert_true(b.bits[KVCB_BITS_SECTION_PAD] >= 0.0 &&
                  b.bits[KVCB_BITS_SECTION_PAD] < 128.0 * 2 * H);
    }
    if (codecs[c] == KVC_CODEC_HUFFMAN) {
      /* BT * HD = 1024 symbols per section: 16 lanes of 64. */
      assert_true(b.bits[KVCB_BITS_LANE_TABLE] > 0.0);
      assert_true(fmod(b.bits[KVCB_BITS_CODEBOOK], 4.0) == 0.0 && b.bits[KVCB_BITS_CODEBOOK] > 0);
      assert_true(b.bits[KVCB_BITS_ENTROPY] > 0.0);
      assert_true(b.bits[KVCB_BITS_ENTROPY] + b.bits[KVCB_BITS_EXTRA] <=
                  b.bits[KVCB_BITS_STREAM] + 1e-6);
      /* Huffman is within one bit per symbol of the entropy. */
      assert_true(b.bits[KVCB_BITS_STREAM] - b.bits[KVCB_BITS_EXTRA] <
                  b.bits[KVCB_BITS_ENTROPY] + b.values);
    } else {
      assert_true(b.bits[KVCB_BITS_ENTROPY] == 0.0 && b.bits[KVCB_BITS_LANE_TABLE] == 0.0);
    }
  }
  free(block);
}

/* A bit-pack page of an odd token count: each value section (paired, kvc_bp_paired) holds a zero
 * row for its last token's partner, which counts as word padding, not as stream. */
static void paired_padding_is_not_stream(void **state) {
  (void)state;
  uint16_t *block = make_block(3, 0);
  kvc_codec_params_t p = params();
  size_t cap = kvc_codec_max_page_bytes(&p), size = 0;
  uint8_t *page = malloc(cap);
  assert_non_null(page);
  assert_int_equal(kvc_codec_encode_with(&p, KVC_CODEC_BITPACK, block, BT - 1, page, cap, &size),
                   KVC_OK);
  kvcb_page_bits_t b;
  kvcb_page_bits_init(&b);
  assert_int_equal(kvcb_page_bits_add(&b, page, (uint32_t)size, 1024), 0);
  assert_true(page_part_bits(&b) == 8.0 * size);
  double stream = 0.0, zero_rows = 0.0;
  for (uint32_t i = 0; i < 2 * H; i++) {
    uint32_t off, bytes;
    kvc_page_section(page, H, i, &off, &bytes);
    kvc_qsec_header_t q;
    kvc_qsec_header_read(page + off, &q);
    stream += (double)(BT - 1) * HD * q.width;
    if (i >= H) zero_rows += (double)HD * q.width;
  }
  assert_true(zero_rows > 0.0);
  assert_true(b.bits[KVCB_BITS_STREAM] == stream);
  /* Besides the zero rows, less than a word per section (a value section's codes end on one). */
  assert_true(b.bits[KVCB_BITS_WORD_PAD] >= zero_rows &&
              b.bits[KVCB_BITS_WORD_PAD] < zero_rows + 32.0 * 2 * H);
  free(page);
  free(block);
}

static void one_symbol_sections_have_no_stream(void **state) {
  (void)state;
  uint16_t *block = make_block(0, 1);
  kvcb_page_bits_t b;
  kvcb_page_bits_init(&b);
  add_page(KVC_CODEC_HUFFMAN, block, 4096, &b, NULL);
  assert_int_equal(b.bad_pages, 0);
  assert_true(b.bits[KVCB_BITS_STREAM] == 0.0);
  assert_true(b.bits[KVCB_BITS_ENTROPY] == 0.0);
  assert_true(b.bits[KVCB_BITS_LANE_TABLE] == 0.0);
  free(block);
}

static void pages_accumulate_and_damage_is_refused(void **state) {
  (void)state;
  uint16_t *a = make_block(1, 0), *c = make_block(2, 0);
  kvcb_page_bits_t b;
  kvcb_page_bits_init(&b);
  uint8_t *page = NULL;
  uint32_t sa = add_page(KVC_CODEC_HUFFMAN, a, 2048, &b, NULL);
  uint32_t sc = add_page(KVC_CODEC_HUFFMAN, c, 2048, &b, &page);
  assert_int_equal(b.pages, 2);
  assert_true(page_part_bits(&b) == 8.0 * ((double)sa + sc));
  assert_int_equal(b.min_bytes, sa < sc ? sa : sc);
  assert_int_equal(b.max_bytes, sa < sc ? sc : sa);
  kvcb_page_bits_t before = b;
  /* A size that disagrees with the header, then a damaged magic: refused, nothing added. */
  assert_int_equal(kvcb_page_bits_add(&b, page, sc - 16, 2048), -1);
  page[0] ^= 0xff;
  assert_int_equal(kvcb_page_bits_add(&b, page, sc, 2048), -1);
  assert_int_equal(b.bad_pages, 2);
  assert_int_equal(b.pages, 2);
  assert_memory_equal(b.bits, before.bits, sizeof b.bits);
  free(page);
  free(a);
  free(c);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(parts_add_up_for_every_codec),
      cmocka_unit_test(paired_padding_is_not_stream),
      cmocka_unit_test(one_symbol_sections_have_no_stream),
      cmocka_unit_test(pages_accumulate_and_damage_is_refused),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
