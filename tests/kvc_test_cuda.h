/* Helpers of the GPU tests (tests/gpu_test_*.cu): whether there is a GPU, and a CUDA runtime call
 * that must succeed. Include after <cmocka.h>. */
#ifndef KVC_TEST_CUDA_H
#define KVC_TEST_CUDA_H

#include <cuda_runtime.h>

/* Non-zero when a CUDA device is visible; the GPU tests skip without one. */
static inline int kvc_test_have_gpu(void) {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

/* Fails the running test, naming the call and CUDA's message, unless it returns cudaSuccess. */
#define CUDA_OK(call)                                                                              \
  do {                                                                                             \
    cudaError_t e_ = (call);                                                                       \
    if (e_ != cudaSuccess) fail_msg("%s: %s", #call, cudaGetErrorString(e_));                      \
  } while (0)

#endif
