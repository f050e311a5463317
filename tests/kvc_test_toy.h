/* A toy model for tests that check attention end to end (the serving loop, the cache fuzzer).
 * The key and value of a position, in every layer, are pseudo-random normals seeded by a chained
 * hash of the token ids up to that position, so sequences that share a prefix share its K/V, as
 * in a real model, and a prefix hit that returned the wrong blocks shows in the outputs. The
 * reference is float64 attention over the original K/V, with the tolerance that the codec's
 * absolute bounds imply (derived in kvc_test_toy.c). */
#ifndef KVC_TEST_TOY_H
#define KVC_TEST_TOY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvc_test_toy {
  int kv_heads, q_heads, head_dim;
  double eps_k, eps_v;     /* absolute bounds on every decoded key and value element */
  double out_rel, out_abs; /* the output dtype's rounding: half an ulp, relative, and the
                              absolute floor of its subnormals (fp16: 2^-11 and 2^-25) */
  double kern_rel;         /* the kernel's own rounding, relative: 0 where it computes in fp32
                              or better (the CPU backend); the GPU's rounds decoded keys, values
                              and the probabilities to the dtype (kvc_test_toy.c) */
} kvc_test_toy_t;

#define KVC_TEST_TOY_SEED 0x5eedull /* the hash before the first token */

/* The chained hash of a position: that of the previous position (or a seed) and its token. */
uint64_t kvc_test_toy_hash(uint64_t prev, int32_t token);

/* Key and value [kv_heads][head_dim] of the position whose chained hash is `hash`, in `layer`:
 * keys with per-channel offsets and a few wide channels, values plain normals; exact in fp16. */
void kvc_test_toy_kv(const kvc_test_toy_t *m, uint64_t hash, int layer, float *k, float *v);

/* Checks one output row out[q_heads][head_dim] of attention with q[q_heads][head_dim] over n
 * positions whose original key and value of kv head h, channel d, position p are
 * keys[p * stride + h * head_dim + d] and values[...]. Returns the largest error / tolerance
 * over the row; where it exceeds 1 (or an output is NaN), writes the first failing element to
 * msg[cap]. */
double kvc_test_toy_check(const kvc_test_toy_t *m, const float *keys, const float *values,
                          size_t stride, int n, const float *q, const float *out, float scale,
                          char *msg, size_t cap);

#ifdef __cplusplus
}
#endif

#endif
