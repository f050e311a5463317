/*
 * libFuzzer target for the CPU page decoder: kvc_codec_page_info, kvc_codec_decode_head and
 * kvc_codec_decode must never read or write out of bounds and must return KVC_OK or
 * KVC_ERR_CORRUPT for any bytes. Three ways to use the input (first byte % 3):
 *   0: the rest is a page, as is;
 *   1: the rest is a page whose header checksum is recomputed first, so mutations reach the
 *      section decoders instead of stopping at the checksum;
 *   2: the next bytes choose parameters and fill a block, which is encoded; the remaining bytes are
 *      (offset, xor) pairs applied to the page, then the checksum is recomputed (structure-aware
 *      damage to valid pages of every codec).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "compress/kvc_codec.h"
#include "compress/kvc_page_format.h"

static void kvc__fix_checksum(uint8_t *page, size_t size) {
  if (size < KVC_PAGE_HEADER_BYTES) return;
  uint32_t h = kvc_rd_u16(page + 10);
  if (KVC_PAGE_HEADER_BYTES + kvc_page_table_bytes(h) > size) return;
  kvc_wr_u32(page + 28, kvc_page_checksum(page));
}

static void kvc__decode_all(const uint8_t *page, size_t size) {
  kvc_page_info_t info;
  kvc_status_t st = kvc_codec_page_info(page, size, &info);
  if (st != KVC_OK) {
    if (st != KVC_ERR_CORRUPT) abort();
    return;
  }
  size_t per = (size_t)info.n_tokens * info.head_dim;
  float *out = malloc(sizeof(float) * per * 2 * (size_t)info.num_kv_heads);
  if (!out) return;
  for (int s = 0; s < 2 * info.num_kv_heads; s++) {
    st = kvc_codec_decode_head(page, size, s / info.num_kv_heads, s % info.num_kv_heads,
                               out + (size_t)s * per);
    if (st != KVC_OK && st != KVC_ERR_CORRUPT) abort();
  }
  st = kvc_codec_decode(page, size, out);
  if (st != KVC_OK && st != KVC_ERR_CORRUPT) abort();
  free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  int how = data[0] % 3;
  data++;
  size--;
  if (how < 2) {
    uint8_t *page = malloc(size ? size : 1);
    if (!page) return 0;
    memcpy(page, data, size);
    if (how == 1) kvc__fix_checksum(page, size);
    kvc__decode_all(page, size);
    free(page);
    return 0;
  }
  if (size < 4) return 0;
  kvc_codec_params_t p;
  memset(&p, 0, sizeof p);
  p.dtype = (kvc_dtype_t)(data[0] % 3);
  p.num_kv_heads = 1 + data[0] / 3 % 3;
  p.head_dim = 8 * (1 + data[1] % 4);
  p.block_tokens = 1 + data[1] / 4 % 32;
  p.bound_mode = (kvc_bound_mode_t)(data[2] % 2);
  p.k_bound = p.v_bound = (float)(1 + data[2] / 2) / 256.0f;
  p.policy = KVC_POLICY_FIXED;
  p.codec = (kvc_codec_t)(data[3] % 3);
  int n = 1 + data[3] / 3 % p.block_tokens;
  data += 4;
  size -= 4;
  size_t sb = kvc_codec_staging_bytes(&p), cap = kvc_codec_max_page_bytes(&p), psize;
  uint8_t *block = calloc(1, sb), *page = malloc(cap);
  if (block && page) {
    size_t take = size < sb ? size : sb;
    memcpy(block, data, take);
    data += take;
    size -= take;
    if (kvc_codec_encode(&p, block, n, page, cap, &psize) != KVC_OK) abort();
    for (; size >= 3; data += 3, size -= 3) page[kvc_rd_u16(data) % psize] ^= data[2];
    kvc__fix_checksum(page, psize);
    kvc__decode_all(page, psize);
  }
  free(block);
  free(page);
  return 0;
}
