/*
 * CUDA conveniences over kvcomp.h: the same calls with a typed cudaStream_t. Include after
 * <cuda_runtime.h>. Tensors passed to a cache on the CUDA backend are device pointers on the
 * cache's device; every call enqueues on the given stream and returns before the work is done.
 */
#ifndef KVCOMP_CUDA_H
#define KVCOMP_CUDA_H

#include <cuda_runtime.h>

#include "kvcomp.h"

#ifdef __cplusplus
extern "C" {
#endif

static inline kvc_status_t kvc_plan_cuda(kvc_cache_t *c, const kvc_batch_t *b, cudaStream_t s) {
  return kvc_plan(c, b, (void *)s);
}
static inline kvc_status_t kvc_store_cuda(kvc_cache_t *c, int layer, const void *k, const void *v,
                                          cudaStream_t s) {
  return kvc_store(c, layer, k, v, (void *)s);
}
static inline kvc_status_t kvc_attend_cuda(kvc_cache_t *c, int layer, const void *q, void *out,
                                           float scale, cudaStream_t s) {
  return kvc_attend(c, layer, q, out, scale, (void *)s);
}
static inline kvc_status_t kvc_seq_swap_out_cuda(kvc_cache_t *c, kvc_seq_id_t id, cudaStream_t s) {
  return kvc_seq_swap_out(c, id, (void *)s);
}
static inline kvc_status_t kvc_seq_swap_in_cuda(kvc_cache_t *c, kvc_seq_id_t id, cudaStream_t s) {
  return kvc_seq_swap_in(c, id, (void *)s);
}

#ifdef __cplusplus
}
#endif

#endif /* KVCOMP_CUDA_H */
