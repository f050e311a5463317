/*
 * Test helper: builds a pool, a page directory and CSR block tables from dense K/V, the way the
 * cache would hold them, so attention can be tested without the rest of the library.
 *
 * Every full block becomes a page of a kind drawn from `kinds` (staging, or compressed with
 * kvc_codec_encode_with: raw, bit-pack, Huffman; a block a codec refuses falls back to raw); every
 * partial last block is a staging page. Pages live in randomly chosen chunks (so a page's chunks
 * are not contiguous and neighbouring pages interleave), block ids are a random permutation with
 * gaps, and unused pool bytes are 0xFF (a NaN in f16, bf16 and f32) so that any read outside a
 * page shows up as NaN in the output.
 *
 * Alongside, the helper records what each token's K and V decode to (`k`, `v`, float): the values
 * the cache's dtype holds — kvc_codec_decode's floats (compressed pages) or the inputs (staging
 * pages), rounded to the dtype (except the codecs of spec.exact_codecs). A test computes its naive
 * reference over these, independently of the attention code.
 */
#ifndef KVC_TEST_PAGES_H
#define KVC_TEST_PAGES_H

#include <stddef.h>
#include <stdint.h>

#include "allocator/kvc_pool_layout.h"
#include "kvcomp.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Bits of kvc_test_pages_spec_t.kinds. */
enum {
  KVC_TEST_PAGE_STAGING = 1 << 0,
  KVC_TEST_PAGE_RAW = 1 << 1,
  KVC_TEST_PAGE_BITPACK = 1 << 2,
  KVC_TEST_PAGE_HUFFMAN = 1 << 3,
  KVC_TEST_PAGE_ALL = 15,
};

typedef struct kvc_test_pages_spec {
  int num_seqs;
  const int32_t *kv_len;     /* [num_seqs], each >= 1 */
  int num_kv_heads;
  int head_dim;
  int block_tokens;
  kvc_dtype_t dtype;
  uint32_t chunk_bytes;      /* power of two >= KVC_CHUNK_MIN_BYTES */
  unsigned kinds;            /* KVC_TEST_PAGE_* bits allowed for full blocks (0: all) */
  float k_bound, v_bound;    /* error bounds for the lossy codecs (see bound_mode) */
  int shared_prefix_blocks;  /* sequences s > 0 reuse up to this many of sequence 0's first full
                                blocks (same block ids), as prefix sharing does */
  uint64_t seed;
  kvc_bound_mode_t bound_mode; /* of k_bound, v_bound (0: relative) */
  uint32_t exact_codecs;     /* 1 << KVC_CODEC_x: k, v hold these pages' decoded floats as they
                                are, not rounded (kvc_attn_args_t.ref_exact_codecs) */
} kvc_test_pages_spec_t;

typedef struct kvc_test_pages {
  uint8_t *pool;             /* [num_chunks * chunk_bytes] */
  uint32_t chunk_bytes;
  uint32_t num_chunks;
  kvc_page_entry_t *dir;     /* [dir_len]; entries no block uses are KVC_PAGE_EMPTY */
  int dir_len;
  int num_seqs;
  int32_t *kv_len;           /* [num_seqs] */
  int32_t *block_indptr;     /* [num_seqs + 1] */
  int32_t *block_ids;        /* [block_indptr[num_seqs]] */
  int max_kv_len;
  int64_t *token_offset;     /* [num_seqs + 1]: sequence s's tokens are rows token_offset[s].. */
  float *k, *v;              /* [token_offset[num_seqs]][num_kv_heads][head_dim], as decoded and
                                rounded to the dtype */
  size_t page_bytes;         /* bytes of all distinct pages (shared ones once) */
  int pages_by_kind[4];      /* staging, raw, bit-pack, Huffman */
} kvc_test_pages_t;

/*
 * Builds the pages of dense k, v [sum kv_len][num_kv_heads][head_dim] (sequence after sequence).
 * With shared_prefix_blocks, the shared tokens' input values of sequences s > 0 are ignored (they
 * are sequence 0's). Everything is allocated with malloc; release with kvc_test_pages_free.
 * Returns KVC_OK, KVC_ERR_INVALID_ARGUMENT, KVC_ERR_OUT_OF_HOST_MEMORY or a codec error.
 */
kvc_status_t kvc_test_pages_build(const kvc_test_pages_spec_t *spec, const float *k,
                                  const float *v, kvc_test_pages_t *out);

void kvc_test_pages_free(kvc_test_pages_t *p);

/*
 * Fills k, v [n_tokens][num_kv_heads][head_dim] with values shaped like a real model's: keys with a
 * per-channel offset and scale, a few outlier channels an order of magnitude larger; values
 * roughly normal with a per-channel scale. Deterministic in `seed`.
 */
void kvc_test_fill_kv(uint64_t seed, int64_t n_tokens, int num_kv_heads, int head_dim, float *k,
                      float *v);

#ifdef __cplusplus
}
#endif

#endif
