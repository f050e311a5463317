/*
 * The codecs on the GPU: launchers callable from C (no CUDA types; `stream` is a cudaStream_t).
 * Pages are bit-identical to the CPU encoder's (kvc_codec.h). All launchers enqueue on `stream`,
 * return before the work is done, never synchronize and never allocate.
 *
 * The device free stack: free_stack[0 .. *free_top) holds free chunk ids. A kernel takes n chunks
 * with old = atomicSub(free_top, n) and uses free_stack[old - n .. old), top first (so runs of
 * ascending ids come out in order); it returns chunks with old = atomicAdd(free_top, n) and
 * writes free_stack[old .. old + n) with its first id on top. Taking and returning never
 * happen in the same launch. The host's accounting guarantees the stack never runs dry; if it does,
 * the kernel sets *error (never corrupts a page) and the host reports KVC_ERR_INTERNAL.
 *
 * Built shapes: head_dim 64, 128, 256; dtype fp16 or bf16; block_tokens * head_dim <= 16384;
 * num_kv_heads <= 64. Anything else returns KVC_ERR_UNSUPPORTED (use the CPU codec).
 */
#ifndef KVC_CODEC_CUDA_H
#define KVC_CODEC_CUDA_H

#include <stdint.h>

#include "allocator/kvc_pool_layout.h"
#include "compress/kvc_codec.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvc_dev_pool {
  uint8_t *base;         /* device: num_chunks * chunk_bytes */
  uint32_t chunk_bytes;
  uint32_t num_chunks;
  uint32_t *free_stack;  /* device: [num_chunks] */
  int32_t *free_top;     /* device: one int */
  int32_t *error;        /* device: set non-zero when the stack ran dry */
} kvc_dev_pool_t;

/*
 * Compresses num_jobs full or partial blocks in one launch.
 *   blocks      device, [num_jobs] staging-layout blocks back to back (kvc_codec_staging_bytes each)
 *   n_tokens    device, [num_jobs] valid tokens of each block (1..block_tokens)
 *   block_ids   device, [num_jobs] where each page goes in `dir`
 *   dir         device, this layer's page directory; entries of block_ids are overwritten
 *               (kind COMPRESSED, codec, nbytes, chunks taken from the pool's free stack)
 *   page_bytes  device, [num_jobs] out: each page's size (for the host's accounting)
 * One CTA per job, so the same launch serves a prefill's many full blocks and the tails that filled
 * in a decode step (n_tokens may be partial). Pages equal kvc_codec_encode's bytes, policy included.
 * A page's chunks are taken as it grows (each pop takes only the chunks the page newly needs; in
 * total exactly kvc_chunks_for(page_bytes, chunk_bytes)), in stack order free_stack[old - n ..
 * old). A job whose pop fails (stack dry, or more than KVC_PAGE_MAX_CHUNKS chunks) sets *error,
 * writes page_bytes 0 and no directory entry; chunks it popped earlier stay taken (the host treats
 * the error as KVC_ERR_INTERNAL). A job with n_tokens out of range sets *error likewise.
 * KVC_OK, KVC_ERR_INVALID_ARGUMENT (NULL pointers, chunk_bytes not a power of two >= 256),
 * KVC_ERR_CUDA (launch failed), KVC_ERR_UNSUPPORTED (shape not built).
 */
kvc_status_t kvc_codec_cuda_compress(const kvc_codec_params_t *p, const void *blocks,
                                     const int32_t *n_tokens, const int32_t *block_ids,
                                     int num_jobs, kvc_page_entry_t *dir, kvc_dev_pool_t pool,
                                     uint32_t *page_bytes, void *stream);

/*
 * kvc_codec_cuda_compress with packing (allocator/kvc_pool_layout.h): the pages of `layer` start
 * inside their block's page of layer - 1 when that was the block's last (cursor[block_ids[i]],
 * device, [max_blocks], read and updated; layer -1 entries start fresh), and page_chunks[i]
 * (device, [num_jobs]) receives the chunks each page took from the stack. Everything else as
 * kvc_codec_cuda_compress. KVC_ERR_INVALID_ARGUMENT also for layer < 0 or a NULL page_chunks.
 */
kvc_status_t kvc_codec_cuda_compress_packed(const kvc_codec_params_t *p, const void *blocks,
                                            const int32_t *n_tokens, const int32_t *block_ids,
                                            int num_jobs, kvc_page_entry_t *dir,
                                            kvc_dev_pool_t pool, uint32_t *page_bytes,
                                            kvc_pack_cursor_t *cursor, int layer,
                                            uint8_t *page_chunks, void *stream);

/*
 * Standalone decompression (swap, migration, debugging): decodes the pages dir[block_ids[i]]
 * (compressed or staging) into out + i * kvc_codec_staging_bytes(p), staging layout, in p->dtype.
 * Rows past a compressed page's n_tokens are written as 0; a section that fails its format checks
 * (damaged bytes, or a page of another shape) is written as 0 too; EMPTY entries are skipped.
 * KVC_OK, KVC_ERR_INVALID_ARGUMENT, KVC_ERR_CUDA, KVC_ERR_UNSUPPORTED.
 */
kvc_status_t kvc_codec_cuda_decompress(const kvc_codec_params_t *p, const kvc_page_entry_t *dir,
                                       const int32_t *block_ids, int num_jobs,
                                       const uint8_t *pool_base, uint32_t chunk_bytes, void *out,
                                       void *stream);

/*
 * Compression CTAs resident per multiprocessor for p's shape on the current device (a benchmark's
 * occupancy figure; one CTA compresses one page). KVC_OK, KVC_ERR_INVALID_ARGUMENT (NULL
 * ctas_per_sm), KVC_ERR_UNSUPPORTED (shape not built), KVC_ERR_CUDA.
 */
kvc_status_t kvc_codec_cuda_compress_occupancy(const kvc_codec_params_t *p, int *ctas_per_sm);

#ifdef __cplusplus
}
#endif

#endif /* KVC_CODEC_CUDA_H */
