/*
 * The tensor-parallel agreement over NCCL ("Tensor parallelism" in kvcomp.h), in builds with
 * KVC_NCCL (libkvcomp then links NCCL). Per rank:
 *
 *     kvc_nccl_tp_t *tp;
 *     kvc_nccl_tp_create(comm, &tp);               // comm: this rank's communicator
 *     cfg.tp_allreduce_max = kvc_nccl_tp_allreduce_max;
 *     cfg.tp_user = tp;
 *     kvc_cache_create(&cfg, &cache);              // cfg.device: the communicator's device
 *     ...
 *     kvc_cache_destroy(cache);
 *     kvc_nccl_tp_destroy(tp);
 *
 * Each agreement is one ncclAllReduce of one or two int64 values (ncclMax) on a stream of the
 * handle's own, followed by a host wait for it: the hooks that agree (admission, growth, fork,
 * swap, import) are scheduler calls, not the per-layer hot path, which exchanges nothing. Like
 * any NCCL collective it must be reached by every rank of the communicator: ranks make the same
 * calls in the same order.
 *
 * The communicator: a blocking one (the default; a non-blocking communicator's ncclInProgress
 * counts as a failure), used by nothing that could issue collectives on it concurrently with a
 * cache's hooks: give the caches a communicator of their own (ncclCommSplit of the model's),
 * and one handle to one cache.
 */
#ifndef KVCOMP_NCCL_H
#define KVCOMP_NCCL_H

#include <nccl.h>

#include "kvcomp.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvc_nccl_tp kvc_nccl_tp_t;

/* One rank's agreement over `comm` (borrowed: it must outlive the handle and every cache using
 * it). Takes 16 bytes of device memory and 16 of pinned host memory, and a non-blocking stream,
 * on the communicator's device (the calling thread's current device is left as it was).
 * Returns KVC_OK, KVC_ERR_INVALID_ARGUMENT (NULL), KVC_ERR_NCCL, KVC_ERR_CUDA,
 * KVC_ERR_OUT_OF_HOST_MEMORY; *out is set only on KVC_OK. */
kvc_status_t kvc_nccl_tp_create(ncclComm_t comm, kvc_nccl_tp_t **out);

/* Releases the handle (after the caches using it are destroyed). NULL is a no-op. */
void kvc_nccl_tp_destroy(kvc_nccl_tp_t *tp);

/* A kvc_tp_allreduce_fn (user: the handle). Returns 0, or -1 when a CUDA or NCCL call failed. */
int kvc_nccl_tp_allreduce_max(void *tp, int64_t *values, int count);

#ifdef __cplusplus
}
#endif

#endif /* KVCOMP_NCCL_H */
