/* Status strings and the library version. */
#include "kvcomp.h"

const char *kvc_status_string(kvc_status_t status) {
  switch (status) {
  case KVC_OK: return "KVC_OK: success";
  case KVC_ERR_INVALID_ARGUMENT: return "KVC_ERR_INVALID_ARGUMENT: invalid argument";
  case KVC_ERR_NOT_FOUND: return "KVC_ERR_NOT_FOUND: unknown or freed sequence";
  case KVC_ERR_INVALID_STATE: return "KVC_ERR_INVALID_STATE: call out of order";
  case KVC_ERR_OUT_OF_MEMORY: return "KVC_ERR_OUT_OF_MEMORY: pool or swap space exhausted";
  case KVC_ERR_OUT_OF_HOST_MEMORY: return "KVC_ERR_OUT_OF_HOST_MEMORY: host allocation failed";
  case KVC_ERR_CUDA: return "KVC_ERR_CUDA: CUDA error";
  case KVC_ERR_NCCL: return "KVC_ERR_NCCL: NCCL error";
  case KVC_ERR_UNSUPPORTED: return "KVC_ERR_UNSUPPORTED: not supported by this build or backend";
  case KVC_ERR_CORRUPT: return "KVC_ERR_CORRUPT: corrupt page or data";
  case KVC_ERR_INTERNAL: return "KVC_ERR_INTERNAL: internal error";
  case KVC_STATUS_COUNT: break;
  }
  return "KVC_ERR_UNKNOWN: not a kvc_status_t value";
}

int kvc_version(void) { return KVC_VERSION_CODE; }
