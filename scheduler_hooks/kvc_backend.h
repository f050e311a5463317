/*
 * A backend: the pool, the per-layer page directories, the free stack of chunks, and the code
 * that moves page bytes. Two implementations: kvc__backend_cpu (host memory, plain C, always
 * built) and kvc__backend_cuda (device memory, CUDA builds only). The cache layer (kvc_cache.c)
 * decides what to do; a backend does it, in call order.
 *
 * Stream order. Every operation that enqueues work takes the stream of the public call (the
 * cache's last-used stream for hooks that take none). The CUDA backend keeps the cache's work in
 * one total order across streams: when a call's stream differs from the previous call's, the new
 * stream first waits (cudaStreamWaitEvent, no host wait) for everything enqueued before. The CPU
 * backend runs everything at once and ignores streams.
 *
 * Failure. Operations that only read (attend) or run before anything is committed (create, plan's
 * upload) may fail and leave the cache as it was; operations that execute the block manager's
 * committed work fail only for device reasons (KVC_ERR_CUDA), which the cache then makes sticky.
 * The CPU backend's work operations cannot fail: everything they need is allocated at creation.
 */
#ifndef KVC_BACKEND_H
#define KVC_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "scheduler_hooks/kvc_cache_internal.h"

#ifdef __cplusplus
extern "C" {
#endif

struct kvc__backend_ops {
  const char *name;

  /* Takes the pool, directories (all EMPTY), free stack (every chunk free), step buffers sized
   * from c->geo, and swap memory of cfg.swap_bytes; sets c->be. On failure frees what it took.
   * KVC_OK, KVC_ERR_OUT_OF_MEMORY (device), KVC_ERR_OUT_OF_HOST_MEMORY, KVC_ERR_CUDA. */
  kvc_status_t (*create)(kvc_cache_t *c);
  /* Waits for outstanding work and frees everything; c->be may be NULL. */
  void (*destroy)(kvc_cache_t *c);

  /* The step in c->plan: makes its arrays available to store/attend (CUDA: one async upload) and
   * builds the attention arguments. Nothing is committed before it returns KVC_OK. */
  kvc_status_t (*plan)(kvc_cache_t *c, void *stream);
  /* kvc_store's device part for `layer` (kvc_cache.c lists the steps): every new row goes to
   * its block's staging page, a block completed by the step included. */
  kvc_status_t (*store)(kvc_cache_t *c, int layer, const void *k, const void *v, void *stream);
  /* The deferred compression of `layer` (kvc_cache.c): compresses the step's jobs
   * (c->step_job_block[0 .. c->step_num_jobs), every one a full staging page in this layer) and
   * gives their staging pages back; page sizes go to page_bytes[layer][job] (codecs to
   * page_codec, the chunks each took to page_chunks: fewer than its size needs when it is packed
   * after its block's page of layer - 1, allocator/kvc_pool_layout.h). Runs after the step's store
   * of `layer` and before the next plan (the CUDA backend reads the job list from the step's
   * upload). */
  kvc_status_t (*compress)(kvc_cache_t *c, int layer, void *stream);
  /* Attention of the planned step over `layer`. */
  kvc_status_t (*attend)(kvc_cache_t *c, int layer, const void *q, void *out, float scale,
                         void *stream);

  /* Copies the current step's page sizes, codecs and chunks taken ([num_layers][max_jobs],
   * first num_jobs of each layer) into size slot `slot` (CUDA: async D2H into pinned memory, plus
   * an event). */
  kvc_status_t (*sizes_fetch)(kvc_cache_t *c, int slot, int num_jobs, void *stream);
  /* Whether slot `slot` has arrived (waiting for it when `wait`); then *bytes, *codecs, *chunks
   * point at its [num_layers][max_jobs] arrays. KVC_ERR_INTERNAL when the device reported a pool
   * error (free stack dry, entry in the wrong state). */
  kvc_status_t (*sizes_poll)(kvc_cache_t *c, int slot, int wait, int *ready, const uint32_t **bytes,
                             const uint8_t **codecs, const uint8_t **chunks);

  /* The block manager's work. free_pages releases every layer's page of each block (EMPTY
   * entries are skipped). copy_tail gives `dst` a staging page in every layer holding a copy of
   * `src`'s. swap_out copies every layer's entry header and page of each block to `mem` (NULL:
   * the cache's swap memory; else a sequence image's extents, in the backend's memory) at
   * offsets[i] (layout: KVC__SWAP_HDR_BYTES in kvc_cache_internal.h), then, when `release`,
   * releases the pages; swap_in takes chunks and copies them back from `mem` (NULL: swap
   * memory), restoring kind, codec and size (a page that was packed packs again, in layer order,
   * and takes the chunks it took before: in the same cache, or one of the same geometry). */
  kvc_status_t (*free_pages)(kvc_cache_t *c, const int32_t *blocks, int n, void *stream);
  kvc_status_t (*copy_tail)(kvc_cache_t *c, int32_t src, int32_t dst, void *stream);
  kvc_status_t (*swap_out)(kvc_cache_t *c, const int32_t *blocks, const uint64_t *offsets, int n,
                           void *mem, int release, void *stream);
  kvc_status_t (*swap_in)(kvc_cache_t *c, const int32_t *blocks, const uint64_t *offsets, int n,
                          const void *mem, void *stream);
  /* Copies the page headers at the start of n extents of `mem` (in the backend's memory, at
   * offsets[i], n <= max_seq_blocks) to out[n][num_layers * KVC__SWAP_HDR_BYTES] (host),
   * synchronously, after the work on `stream`: what swap_in would read, for the caller to check. */
  kvc_status_t (*read_swap_headers)(kvc_cache_t *c, const void *mem, const uint64_t *offsets,
                                    int n, uint8_t *out, void *stream);
  /* Synchronous copy of `bytes` between host memory and the backend's memory (CUDA: device
   * memory of the cache's device), ordered after the work on `stream`: host_to_backend from
   * src (host) to dst, else from src to dst (host). */
  kvc_status_t (*copy_bytes)(kvc_cache_t *c, void *dst, const void *src, size_t bytes,
                             int host_to_backend, void *stream);

  /* Waits for all work the cache enqueued. */
  kvc_status_t (*synchronize)(kvc_cache_t *c);

  /* Synchronous copies for validation and tests: every directory [num_layers][max_blocks], the
   * free stack and its top; one directory entry; the bytes of one page (e->nbytes) into out. */
  kvc_status_t (*read_state)(kvc_cache_t *c, kvc_page_entry_t *dir, uint32_t *free_stack,
                             int32_t *free_top);
  kvc_status_t (*read_entry)(kvc_cache_t *c, int layer, int32_t block, kvc_page_entry_t *e);
  kvc_status_t (*read_page)(kvc_cache_t *c, const kvc_page_entry_t *e, uint8_t *out);

  /* Memory the backend holds besides the pool and swap memory (directories, step buffers), and
   * how much of the host allocator's live bytes is pool or swap memory (CPU backend). */
  size_t (*overhead_bytes)(const kvc_cache_t *c);
  size_t (*host_data_bytes)(const kvc_cache_t *c);
};

extern const kvc__backend_ops_t kvc__backend_cpu;
#if KVC_HAVE_CUDA
extern const kvc__backend_ops_t kvc__backend_cuda;
#endif

#ifdef __cplusplus
}
#endif

#endif /* KVC_BACKEND_H */
