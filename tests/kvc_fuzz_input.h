/* A fuzz target's input read byte by byte, as its operations' arguments; bytes past the end read
 * as 0, so that every input is a valid program. */
#ifndef KVC_FUZZ_INPUT_H
#define KVC_FUZZ_INPUT_H

#include <stddef.h>
#include <stdint.h>

#include "kvcomp.h"

typedef struct kvc_fuzz_input {
  const uint8_t *p;
  size_t n;
} kvc_fuzz_input_t;

static inline uint8_t kvc_fuzz_next(kvc_fuzz_input_t *in) {
  if (!in->n) return 0;
  in->n--;
  return *in->p++;
}

/* The i % 5-th way a cache codes its blocks: raw, bit-pack and Huffman pages, then the
 * smallest and the fastest-within-budget policies. */
static inline void kvc_fuzz_codec(int i, kvc_config_t *cfg) {
  static const struct {
    kvc_codec_policy_t policy;
    kvc_codec_t codec;
  } ways[5] = {{KVC_POLICY_FIXED, KVC_CODEC_RAW},
               {KVC_POLICY_FIXED, KVC_CODEC_BITPACK},
               {KVC_POLICY_FIXED, KVC_CODEC_HUFFMAN},
               {KVC_POLICY_SMALLEST, KVC_CODEC_HUFFMAN},
               {KVC_POLICY_FASTEST_WITHIN, KVC_CODEC_HUFFMAN}};
  cfg->policy = ways[i % 5].policy;
  cfg->codec = ways[i % 5].codec;
}

/* The other tensor-parallel ranks of an agreement (kvc_tp_allreduce_fn, user: the input), as
 * the input's next byte says: 255 fails the exchange; otherwise its low two bits give their
 * status (OK twice as often as OUT_OF_MEMORY or OUT_OF_HOST_MEMORY) and the rest the evictions
 * the neediest of them asks for. */
static inline int kvc_fuzz_other_ranks(void *user, int64_t *v, int count) {
  static const int64_t status[4] = {KVC_OK, KVC_OK, KVC_ERR_OUT_OF_MEMORY,
                                    KVC_ERR_OUT_OF_HOST_MEMORY};
  const uint8_t x = kvc_fuzz_next((kvc_fuzz_input_t *)user);
  if (x == 255) return -1;
  if (status[x & 3] > v[0]) v[0] = status[x & 3];
  if (count > 1 && (x >> 2) % 16 > v[1]) v[1] = (x >> 2) % 16;
  return 0;
}

#endif
