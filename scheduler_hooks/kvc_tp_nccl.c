/* The tensor-parallel agreement over NCCL (include/kvcomp_nccl.h). Built with KVC_NCCL only. */
#include <stdlib.h>

#include <cuda_runtime.h>

#include "kvcomp_nccl.h"

struct kvc_nccl_tp {
  ncclComm_t comm;
  int device;
  cudaStream_t stream;
  int64_t *dev;  /* [2] */
  int64_t *host; /* [2], pinned */
};

/* Makes `device` current; *prev receives the caller's device, restored by leave(). */
static int enter(int device, int *prev) {
  return cudaGetDevice(prev) == cudaSuccess && cudaSetDevice(device) == cudaSuccess ? 0 : -1;
}
static void leave(int prev) { (void)cudaSetDevice(prev); }

void kvc_nccl_tp_destroy(kvc_nccl_tp_t *tp) {
  if (!tp) return;
  int prev = 0;
  const int entered = enter(tp->device, &prev) == 0;
  if (tp->stream) (void)cudaStreamDestroy(tp->stream);
  (void)cudaFree(tp->dev);
  (void)cudaFreeHost(tp->host);
  if (entered) leave(prev);
  free(tp);
}

kvc_status_t kvc_nccl_tp_create(ncclComm_t comm, kvc_nccl_tp_t **out) {
  if (!comm || !out) return KVC_ERR_INVALID_ARGUMENT;
  kvc_nccl_tp_t *tp = calloc(1, sizeof(*tp));
  if (!tp) return KVC_ERR_OUT_OF_HOST_MEMORY;
  tp->comm = comm;
  if (ncclCommCuDevice(comm, &tp->device) != ncclSuccess) {
    free(tp);
    return KVC_ERR_NCCL;
  }
  int prev = 0;
  if (enter(tp->device, &prev) != 0) {
    free(tp);
    return KVC_ERR_CUDA;
  }
  const int ok = cudaStreamCreateWithFlags(&tp->stream, cudaStreamNonBlocking) == cudaSuccess &&
                 cudaMalloc((void **)&tp->dev, 2 * sizeof(int64_t)) == cudaSuccess &&
                 cudaMallocHost((void **)&tp->host, 2 * sizeof(int64_t)) == cudaSuccess;
  leave(prev);
  if (!ok) {
    kvc_nccl_tp_destroy(tp);
    return KVC_ERR_CUDA;
  }
  *out = tp;
  return KVC_OK;
}

int kvc_nccl_tp_allreduce_max(void *user, int64_t *values, int count) {
  kvc_nccl_tp_t *tp = user;
  if (!tp || !values || count < 1 || count > 2) return -1;
  int prev = 0;
  if (enter(tp->device, &prev) != 0) return -1;
  for (int i = 0; i < count; i++) tp->host[i] = values[i];
  const size_t bytes = (size_t)count * sizeof(int64_t);
  int ok = cudaMemcpyAsync(tp->dev, tp->host, bytes, cudaMemcpyHostToDevice, tp->stream) ==
               cudaSuccess &&
           ncclAllReduce(tp->dev, tp->dev, (size_t)count, ncclInt64, ncclMax, tp->comm,
                         tp->stream) == ncclSuccess &&
           cudaMemcpyAsync(tp->host, tp->dev, bytes, cudaMemcpyDeviceToHost, tp->stream) ==
               cudaSuccess &&
           cudaStreamSynchronize(tp->stream) == cudaSuccess;
  leave(prev);
  if (!ok) return -1;
  for (int i = 0; i < count; i++) values[i] = tp->host[i];
  return 0;
}
