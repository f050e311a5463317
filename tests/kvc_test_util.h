/* Helpers shared by the tests: deterministic random numbers, fp16/bf16 conversion, and where the
 * real models are. */
#ifndef KVC_TEST_UTIL_H
#define KVC_TEST_UTIL_H

#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* splitmix64-seeded xorshift; reproducible across machines. */
typedef struct kvc_test_rng { uint64_t s; } kvc_test_rng_t;
void kvc_test_rng_seed(kvc_test_rng_t *r, uint64_t seed);
uint64_t kvc_test_rng_u64(kvc_test_rng_t *r);
uint32_t kvc_test_rng_below(kvc_test_rng_t *r, uint32_t n); /* uniform in [0, n) */
double kvc_test_rng_uniform(kvc_test_rng_t *r);             /* [0, 1) */
double kvc_test_rng_normal(kvc_test_rng_t *r);

uint16_t kvc_test_f32_to_f16(float f);
float kvc_test_f16_to_f32(uint16_t h);
uint16_t kvc_test_f32_to_bf16(float f);
float kvc_test_bf16_to_f32(uint16_t h);

/* Path of `rel` (e.g. "models/stories260K.gguf") under KVC_SHARED_DIR, else ../shared beside the
 * checkout. Returns NULL when the file does not exist. */
const char *kvc_test_shared_path(const char *rel, char *buf, size_t cap);
/* Non-zero when KVC_REQUIRE_MODELS=1: a missing model must fail the test, not skip it. */
int kvc_test_require_models(void);
/* The codec's error bound over one section (compress/kvc_codec.h): the largest |dec - x| / limit
 * over its n tokens x hd channels (x, dec [n][hd]; x the input's exact values), the limit being
 * `bound` (absolute) or, when `relative`, bound x (max - min) of the value's quantization group
 * (keys, tensor 0: its channel over the n tokens; values: its token over the hd channels). +inf
 * for a NaN, or any error where the limit is 0. The contract holds where the result is <= 1. */
double kvc_test_bound_ratio(const float *x, const float *dec, int n, int hd, int tensor,
                            int relative, float bound);
/* Scale iteration counts: KVC_TEST_SCALE (default 1) multiplies randomized-test lengths. */
double kvc_test_scale(void);

#ifdef __cplusplus
}
#endif

#endif
