/*
 * The codecs, host side: error-bounded quantization followed by Huffman or bit-pack coding, or raw.
 * This is the exact CPU reference; the CUDA kernels (kvc_codec_cuda.h) produce bit-identical pages.
 *
 * A codec turns one *block* for one layer — the K and V of up to block_tokens tokens for all kv
 * heads — into one self-contained *page* (format: kvc_page_format.h). Input blocks use the staging
 * layout of allocator/kvc_pool_layout.h:
 *   // [2 (K, V)][num_kv_heads][block_tokens][head_dim] in `dtype`, first n_tokens rows of each valid
 *
 * Error bound contract: every decoded value differs from the input by at most the bound (relative
 * mode: bound * (max - min) of its quantization group; keys are grouped per channel over the block's
 * tokens, values per token; absolute mode: bound), evaluated in double precision on the exact
 * input values. Blocks holding NaN or Inf are stored raw (exactly, NaN payloads included); -0.0 may
 * decode as +0.0. No page is larger than the raw page and no quantized section larger than its raw
 * form: a codec that would enlarge a block refuses it and the policy stores it raw. Also stored raw:
 * blocks whose codes would need 2^21 or more levels per group, and near-constant groups of values
 * below 2^-126 (fp32/bf16 subnormals). Encoding is thread-safe (no state); kvc_codec_encode_work
 * allocates nothing, the other encoders one work buffer per call.
 */
#ifndef KVC_CODEC_H
#define KVC_CODEC_H

#include <stddef.h>
#include <stdint.h>

#include "kvcomp.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvc_codec_params {
  kvc_dtype_t dtype;
  int num_kv_heads;
  int head_dim;
  int block_tokens;            /* staging row stride, in tokens */
  kvc_bound_mode_t bound_mode;
  float k_bound;
  float v_bound;
  kvc_codec_policy_t policy;
  kvc_codec_t codec;           /* for KVC_POLICY_FIXED */
  float size_budget;           /* for KVC_POLICY_FASTEST_WITHIN */
} kvc_codec_params_t;

/* KVC_OK or KVC_ERR_INVALID_ARGUMENT / KVC_ERR_UNSUPPORTED for parameters no codec accepts. */
kvc_status_t kvc_codec_check_params(const kvc_codec_params_t *p);

/* Bytes of a staging block (the input of one encode). */
size_t kvc_codec_staging_bytes(const kvc_codec_params_t *p);

/* Largest page any codec/policy can produce for these parameters (a raw page with its header). */
size_t kvc_codec_max_page_bytes(const kvc_codec_params_t *p);

/* Bytes of the work buffer an encode needs (one section's codes, block_tokens x head_dim x 4). */
size_t kvc_codec_work_bytes(const kvc_codec_params_t *p);

/*
 * Encodes the first n_tokens (1..block_tokens) tokens of `block` (staging layout) into out[cap]
 * with the codec the policy picks; *size is the page size. Deterministic: same input, same bytes.
 * work[work_bytes]: the caller's scratch, 4-byte aligned, at least kvc_codec_work_bytes; the
 * encode allocates nothing. Returns KVC_ERR_INVALID_ARGUMENT (cap < kvc_codec_max_page_bytes,
 * bad n_tokens, work too small).
 */
kvc_status_t kvc_codec_encode_work(const kvc_codec_params_t *p, const void *block, int n_tokens,
                                   void *work, size_t work_bytes, uint8_t *out, size_t cap,
                                   size_t *size);

/* kvc_codec_encode_work with a work buffer of its own (KVC_ERR_OUT_OF_HOST_MEMORY if it cannot
 * have one). */
kvc_status_t kvc_codec_encode(const kvc_codec_params_t *p, const void *block, int n_tokens,
                              uint8_t *out, size_t cap, size_t *size);

/* Encodes with one given codec (no policy); KVC_ERR_UNSUPPORTED if that codec cannot code this
 * block (non-finite values, quantized range too wide, a section that would be larger than raw) —
 * the caller falls back to raw; KVC_ERR_OUT_OF_HOST_MEMORY without room for its work buffer
 * (codecs other than RAW). The contents of out are unspecified after an error. */
kvc_status_t kvc_codec_encode_with(const kvc_codec_params_t *p, kvc_codec_t codec,
                                   const void *block, int n_tokens, uint8_t *out, size_t cap,
                                   size_t *size);

/* What a page says about itself, after checking its header (checksum, version, sizes vs `size`). */
typedef struct kvc_page_info {
  kvc_codec_t codec;
  kvc_dtype_t dtype;
  int num_kv_heads;
  int head_dim;
  int n_tokens;
  size_t bytes;
} kvc_page_info_t;

/* KVC_OK or KVC_ERR_CORRUPT. Never reads outside page[size]. */
kvc_status_t kvc_codec_page_info(const uint8_t *page, size_t size, kvc_page_info_t *info);

/*
 * Decodes one (tensor 0=K / 1=V, head) of a page into out[n_tokens][head_dim] as float.
 * Never reads outside page[size] nor writes outside out[n_tokens * head_dim]; returns
 * KVC_ERR_CORRUPT for a page that is inconsistent, KVC_ERR_INVALID_ARGUMENT for a bad tensor/head.
 */
kvc_status_t kvc_codec_decode_head(const uint8_t *page, size_t size, int tensor, int head,
                                   float *out);

/* Decodes a whole page into the staging layout, as float:
 *   // out[2][num_kv_heads][n_tokens][head_dim]
 */
kvc_status_t kvc_codec_decode(const uint8_t *page, size_t size, float *out);

/* Exact conversions of one fp16 / bf16 value (bits) to float, as the codec reads its input. */
float kvc_codec_f16_to_f32(uint16_t h);
float kvc_codec_bf16_to_f32(uint16_t h);
/* A float rounded to fp16 / bf16 bits (to nearest even; overflow to infinity, NaN stays NaN): how
 * a cache of that dtype holds a value. */
uint16_t kvc_codec_f32_to_f16(float f);
uint16_t kvc_codec_f32_to_bf16(float f);

#ifdef __cplusplus
}
#endif

#endif /* KVC_CODEC_H */
