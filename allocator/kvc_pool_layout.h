/*
 * Where page bytes live in the pool. Shared by the host code, the CPU backend and the CUDA kernels
 * (plain C, no CUDA types; functions are usable on host and device).
 *
 * The pool is an array of fixed-size chunks (`chunk_bytes`, a power of two >= 256). A page — the
 * compressed K/V of one block for one layer, or the uncompressed staging bytes of a sequence's tail
 * block for one layer — is a short list of chunks, at most KVC_PAGE_MAX_CHUNKS (64). Chunk ids come from
 * a free stack that lives where the pool lives (device memory on the CUDA backend), so a kernel that
 * has just compressed a block takes the chunks for its page itself, without asking the host.
 *
 * Each layer has a page directory indexed by block id: kvc_page_entry_t[max_blocks].
 *
 * Staging pages (the tail) have no header; their layout is
 *   // [2 (K, V)][num_kv_heads][block_tokens][head_dim] in the cache dtype
 * so that a row of head_dim values (a power of two times the element size, <= chunk_bytes) never
 * straddles two chunks. Rows past a tail's length are unspecified (pages are not cleared when their
 * chunks are taken); readers use only the rows the block table says the tail holds. Compressed pages follow compress/kvc_page_format.h.
 */
#ifndef KVC_POOL_LAYOUT_H
#define KVC_POOL_LAYOUT_H

#include <stdint.h>

#ifdef __CUDACC__
#define KVC_HD __host__ __device__ __forceinline__
#else
#define KVC_HD static inline
#endif

#define KVC_PAGE_MAX_CHUNKS 64
#define KVC_CHUNK_MIN_BYTES 256

typedef enum kvc_page_kind {
  KVC_PAGE_EMPTY = 0,      /* no page for this (layer, block) */
  KVC_PAGE_STAGING = 1,    /* uncompressed tail block, layout above */
  KVC_PAGE_COMPRESSED = 2, /* a self-contained page, compress/kvc_page_format.h */
} kvc_page_kind_t;

typedef struct kvc_page_entry {
  uint32_t nbytes;                      /* bytes of the page (staging: the full staging size) */
  uint8_t kind;                         /* kvc_page_kind_t */
  uint8_t nchunks;                      /* chunks in use, <= KVC_PAGE_MAX_CHUNKS */
  uint8_t codec;                        /* kvc_codec_t of a compressed page */
  uint8_t pad;
  uint32_t chunk[KVC_PAGE_MAX_CHUNKS];  /* chunk ids, in page byte order */
} kvc_page_entry_t;

/* Address of byte `offset` of a page. A read of n bytes at offset stays within one chunk when
 * offset % n == 0 and n divides chunk_bytes (every 16-byte aligned 16-byte load does). */
KVC_HD uint8_t *kvc_page_byte(uint8_t *pool, uint32_t chunk_bytes, const kvc_page_entry_t *e,
                              uint32_t offset) {
  return pool + (uint64_t)e->chunk[offset / chunk_bytes] * chunk_bytes + (offset % chunk_bytes);
}

/* Byte offset of row (tensor 0=K / 1=V, kv head, token) in a staging page. */
KVC_HD uint32_t kvc_staging_row_offset(int tensor, int head, int token, int num_kv_heads,
                                       int block_tokens, int row_bytes) {
  return (uint32_t)(((tensor * num_kv_heads + head) * block_tokens + token) * row_bytes);
}

/* Chunks needed for `bytes`. */
KVC_HD uint32_t kvc_chunks_for(uint64_t bytes, uint32_t chunk_bytes) {
  return (uint32_t)((bytes + chunk_bytes - 1) / chunk_bytes);
}

#endif /* KVC_POOL_LAYOUT_H */
