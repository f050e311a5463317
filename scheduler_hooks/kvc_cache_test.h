/*
 * Internal accessors for the tests (not installed; not part of the public API).
 */
#ifndef KVC_CACHE_TEST_H
#define KVC_CACHE_TEST_H

#include <stddef.h>
#include <stdint.h>

#include "allocator/kvc_host_alloc.h"
#include "allocator/kvc_pool_layout.h"
#include "kvcomp.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The cache's host allocator, for fault injection (kvc_host_alloc_fail_after) and leak checks. */
kvc_host_alloc_t *kvc__cache_host_alloc(kvc_cache_t *c);

/* kvc_cache_create with fault injection active from the host allocator's creation on: the
 * (fail_after + 1)-th allocation fails (-1: none). Injection is switched off once the cache is
 * created. */
kvc_status_t kvc__cache_create_faulty(const kvc_config_t *config, int64_t fail_after,
                                      kvc_cache_t **out);

/* Synchronously copies the directory entry of (layer, block) to *entry and, unless it is EMPTY,
 * its page bytes (entry->nbytes of them) to out[cap]. KVC_ERR_INVALID_ARGUMENT for a bad
 * layer/block or cap too small. */
kvc_status_t kvc__cache_read_page(kvc_cache_t *c, int layer, int32_t block, kvc_page_entry_t *entry,
                                  uint8_t *out, size_t cap);

/* The block table of `id` copied to blocks[cap]; *n its length. */
kvc_status_t kvc__cache_seq_blocks(kvc_cache_t *c, kvc_seq_id_t id, int32_t *blocks, int cap,
                                   int *n);

/* Sizes the cache derived from its configuration (any pointer may be NULL). */
void kvc__cache_geometry(const kvc_cache_t *c, uint32_t *chunk_bytes, uint32_t *max_page_bytes,
                         int32_t *max_blocks);

#if KVC_HAVE_CUDA
/* The kernel the CUDA backend's attention of the planned step runs (kvc_attn_cuda_kernel of the
 * launch arguments its plan built: 3 means two passes); -1 for a cache of another backend. */
int kvc__cache_cuda_kernel(const kvc_cache_t *c);
#endif

#ifdef __cplusplus
}
#endif

#endif /* KVC_CACHE_TEST_H */
