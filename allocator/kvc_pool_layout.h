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
 * Packing: a compressed page may start inside the last chunk of the page created just before it
 * for the same block (its previous layer), where that page ended, so that a block's pages leave
 * one partly used chunk instead of one each. Such a page's `first` is the offset of its byte 0 in
 * chunk[0], in units of chunk_bytes / 256 (16-byte aligned, so that no 16-byte read of a page
 * straddles two chunks; a 32-byte header may). chunk[0] is owned (popped and pushed) by the page
 * before it; the page's own chunks are the rest. A block's pages are freed, swapped and evicted
 * together, so a shared chunk never outlives its owner while in use. Staging pages never pack
 * (first 0), nor do the pages of a cache whose codec is raw (kvc_pack_codec): fp16 paged pages
 * stay chunk-aligned, as the attention reads them fastest.
 *
 * Staging pages (the tail) have no header; their layout is
 *   // [2 (K, V)][num_kv_heads][block_tokens][head_dim] in the cache dtype
 * A row of a power-of-two size (every head_dim of the CUDA backend) never straddles two chunks:
 * chunk_bytes, a power of two, exceeds half a row, since a staging page (32 rows or more) fits in
 * 63 chunks. Rows of other head_dims (the CPU backend's 24, 96, ...) may straddle two, and readers
 * copy them chunk by chunk.
 * Rows past a tail's length are unspecified (pages are not cleared when their chunks are taken);
 * readers use only the rows the block table says the tail holds. Compressed pages follow
 * compress/kvc_page_format.h.
 */
#ifndef KVC_POOL_LAYOUT_H
#define KVC_POOL_LAYOUT_H

#include <stdint.h>

#include "kvcomp.h"

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
  uint8_t nchunks;                      /* chunks the page lies in (packed: chunk[0] shared),
                                           <= KVC_PAGE_MAX_CHUNKS */
  uint8_t codec;                        /* kvc_codec_t of a compressed page */
  uint8_t first;                        /* packed: byte 0's offset in chunk[0] / (chunk_bytes /
                                           256); 0: the page's chunks are all its own */
  uint32_t chunk[KVC_PAGE_MAX_CHUNKS];  /* chunk ids, in page byte order */
} kvc_page_entry_t;

/* Where byte 0 of a page lies in its chunk[0] (0 unless packed). */
KVC_HD uint32_t kvc_page_start(const kvc_page_entry_t *e, uint32_t chunk_bytes) {
  return (uint32_t)e->first * (chunk_bytes >> 8);
}

/* Address of byte `offset` of a page. A read of n bytes at offset stays within one chunk when
 * offset % n == 0 and n divides chunk_bytes (every 16-byte aligned 16-byte load does). */
KVC_HD uint8_t *kvc_page_byte(uint8_t *pool, uint32_t chunk_bytes, const kvc_page_entry_t *e,
                              uint32_t offset) {
  const uint32_t o = offset + kvc_page_start(e, chunk_bytes);
  return pool + (uint64_t)e->chunk[o / chunk_bytes] * chunk_bytes + (o % chunk_bytes);
}

/* Bytes from page byte `offset` to the end of the chunk that holds it: how far a copy of page
 * bytes may run in one piece. */
KVC_HD uint32_t kvc_page_run(const kvc_page_entry_t *e, uint32_t chunk_bytes, uint32_t offset) {
  return chunk_bytes - (kvc_page_start(e, chunk_bytes) + offset) % chunk_bytes;
}

/* The chunks a page owns: chunk[kvc_page_own_first(e) .. nchunks). */
KVC_HD uint32_t kvc_page_own_first(const kvc_page_entry_t *e) { return e->first ? 1u : 0u; }

/* Byte offset of row (tensor 0=K / 1=V, kv head, token) in a staging page. */
KVC_HD uint32_t kvc_staging_row_offset(int tensor, int head, int token, int num_kv_heads,
                                       int block_tokens, int row_bytes) {
  return (uint32_t)(((tensor * num_kv_heads + head) * block_tokens + token) * row_bytes);
}

/* Chunks needed for `bytes`. */
KVC_HD uint32_t kvc_chunks_for(uint64_t bytes, uint32_t chunk_bytes) {
  return (uint32_t)((bytes + chunk_bytes - 1) / chunk_bytes);
}

/* Whether a cache of this codec and policy packs its pages: all but raw pages by policy. */
KVC_HD int kvc_pack_codec(int codec, int policy) {
  return !(codec == KVC_CODEC_RAW && policy == KVC_POLICY_FIXED);
}

/* Per block, where its most recent compressed page ended, for packing the next one: that page's
 * layer (-1: none), its last chunk and the bytes used in that chunk (1..chunk_bytes). */
typedef struct kvc_pack_cursor {
  int32_t layer;
  uint32_t chunk, end;
} kvc_pack_cursor_t;

/* Packing: where the next page of a block may start after a page that ended `end` bytes into its
 * last chunk (end in 1..chunk_bytes): 16-byte aligned, in units of chunk_bytes / 256; 0 when no
 * room is left. */
KVC_HD uint32_t kvc_pack_first(uint32_t end, uint32_t chunk_bytes) {
  const uint32_t unit = chunk_bytes >> 8, step = unit > 16u ? unit : 16u;
  const uint32_t at = (end + step - 1) / step * step;
  return at < chunk_bytes ? at / unit : 0u;
}

/* Where the page of `layer` starts after the block's cursor: kvc_pack_first of the cursor's end
 * when the cursor's page is the block's page of layer - 1, else 0 (a fresh chunk). */
KVC_HD uint32_t kvc_pack_after(const kvc_pack_cursor_t *cur, int layer, uint32_t chunk_bytes) {
  return layer > 0 && cur->layer == layer - 1 ? kvc_pack_first(cur->end, chunk_bytes) : 0u;
}

/* The cursor after page `e` (its chunks and `first` set, `bytes` long) of `layer`. */
KVC_HD kvc_pack_cursor_t kvc_pack_cursor_after(const kvc_page_entry_t *e, int layer,
                                               uint32_t bytes, uint32_t chunk_bytes) {
  kvc_pack_cursor_t c;
  c.layer = layer;
  c.chunk = e->chunk[e->nchunks - 1];
  c.end = kvc_page_start(e, chunk_bytes) + bytes - (e->nchunks - 1u) * chunk_bytes;
  return c;
}

/* Chunks a page of `bytes` starting at unit `first` of a shared chunk takes from the pool. */
KVC_HD uint32_t kvc_pack_popped(uint32_t first, uint64_t bytes, uint32_t chunk_bytes) {
  const uint64_t end = (uint64_t)first * (chunk_bytes >> 8) + bytes;
  return kvc_chunks_for(end, chunk_bytes) - (first ? 1u : 0u);
}

#endif /* KVC_POOL_LAYOUT_H */
