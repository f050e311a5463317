/*
 * Sequence images (kvcomp.h, "Moving a sequence between caches"): a sequence's pages as they are
 * compressed, in one buffer of the backend's memory, written by kvc_seq_export and read by
 * kvc_seq_import of a cache of the same configuration.
 *
 * Layout (all offsets from the image's start, little-endian):
 *   [0, 64)              image_header_t
 *   [64, 64 + X)         the index: image_page_t [num_blocks][num_layers], X = round16 of its size;
 *                        what the importing host charges and mirrors
 *   [64 + X, bytes)      the extents, one per block in table order, back to back: the swap layout
 *                        (KVC__SWAP_HDR_BYTES in kvc_cache_internal.h), which the backends' swap
 *                        copies read and write
 * Full blocks hold a compressed page per layer, a partial last block a staging page per layer.
 */
#include <stddef.h>
#include <string.h>

#include "scheduler_hooks/kvc_backend.h"
#include "scheduler_hooks/kvc_cache_internal.h"

#define IMAGE_MAGIC 0x4943564Bu /* "KVCI" */
#define IMAGE_VERSION 1u

typedef struct image_header {
  uint32_t magic, version;
  uint32_t num_layers, num_kv_heads, head_dim, block_tokens, dtype, chunk_bytes;
  int32_t length, num_blocks;
  uint64_t codec_identity; /* codec, policy and bounds (they decide which pages attention reads) */
  uint64_t bytes;          /* of the whole image */
  uint64_t reserved;
} image_header_t;
_Static_assert(sizeof(image_header_t) == 64, "the image header is 64 bytes");

typedef struct image_page {
  uint32_t nbytes;
  uint8_t kind;   /* kvc_page_kind_t */
  uint8_t chunks; /* chunks the page took (a packed page: fewer than its size needs) */
  uint8_t codec;
  uint8_t pad;
} image_page_t;
_Static_assert(sizeof(image_page_t) == 8, "an index entry is 8 bytes");

static uint64_t index_end(int n, int layers) {
  return sizeof(image_header_t) + kvc__round16((uint64_t)n * (uint64_t)layers * 8u);
}

static const kvc__page_meta_t *meta_of(const kvc_cache_t *c, int layer, int32_t b) {
  return c->meta + (size_t)layer * (size_t)c->geo.max_blocks + (size_t)b;
}

/* The sequence's blocks with every page measured, or why it cannot be exported. */
static kvc_status_t exportable(kvc_cache_t *c, kvc_seq_id_t id, void *stream,
                               const int32_t **table, int *n) {
  kvc_seq_info_t info;
  kvc_status_t st = c->sticky;
  if (st == KVC_OK) st = kvc_bm_seq_info(c->bm, id, &info);
  if (st == KVC_OK &&
      (info.state == KVC_SEQ_SWAPPED || kvc_bm_step_open(c->bm) || info.length == 0))
    st = KVC_ERR_INVALID_STATE;
  if (st == KVC_OK) st = kvc__measure_seq(c, id, stream);
  if (st == KVC_OK) st = kvc_bm_seq_blocks(c->bm, id, table, n);
  if (st == KVC_OK && *n > c->geo.max_seq_blocks)
    st = kvc__fail_device(c, KVC_ERR_INTERNAL, "export of an oversized table");
  return st;
}

/* Image size of blocks table[n]; each block's extent offset (from the extents' start) goes to
 * c->swap_work_off. */
static uint64_t image_bytes(kvc_cache_t *c, const int32_t *table, int n) {
  uint64_t off = 0;
  for (int i = 0; i < n; i++) {
    c->swap_work_off[i] = off;
    off += kvc__swap_extent_bytes(c, table[i]);
  }
  return index_end(n, c->cfg.num_layers) + off;
}

kvc_status_t kvc_seq_export_bytes(kvc_cache_t *c, kvc_seq_id_t id, size_t *bytes, void *stream) {
  if (!c || !bytes) return KVC_ERR_INVALID_ARGUMENT;
  kvc__lock(c);
  const int32_t *table = NULL;
  int n = 0;
  kvc_status_t st = exportable(c, id, stream, &table, &n);
  if (st == KVC_OK) *bytes = (size_t)image_bytes(c, table, n);
  kvc__unlock(c);
  return st;
}

kvc_status_t kvc_seq_export(kvc_cache_t *c, kvc_seq_id_t id, void *image, size_t cap,
                            void *stream) {
  if (!c || !image) return KVC_ERR_INVALID_ARGUMENT;
  kvc__lock(c);
  const int32_t *table = NULL;
  int n = 0;
  kvc_status_t st = exportable(c, id, stream, &table, &n);
  const int L = c->cfg.num_layers;
  const uint64_t bytes = st == KVC_OK ? image_bytes(c, table, n) : 0;
  if (st == KVC_OK && cap < bytes) st = KVC_ERR_INVALID_ARGUMENT;
  const size_t head = (size_t)index_end(n, L);
  uint8_t *host = st == KVC_OK ? kvc_host_calloc(c->ha, 1, head) : NULL;
  if (st == KVC_OK && !host) st = KVC_ERR_OUT_OF_HOST_MEMORY;
  if (st == KVC_OK) {
    kvc_seq_info_t info;
    kvc_bm_seq_info(c->bm, id, &info);
    image_header_t h = {IMAGE_MAGIC,
                        IMAGE_VERSION,
                        (uint32_t)L,
                        (uint32_t)c->cfg.num_kv_heads,
                        (uint32_t)c->cfg.head_dim,
                        (uint32_t)c->cfg.block_tokens,
                        (uint32_t)c->cfg.dtype,
                        c->geo.chunk_bytes,
                        info.length,
                        n,
                        c->codec_identity,
                        bytes,
                        0};
    memcpy(host, &h, sizeof(h));
    image_page_t *index = (image_page_t *)(host + sizeof(h));
    for (int i = 0; i < n; i++)
      for (int l = 0; l < L; l++) {
        const kvc__page_meta_t *m = meta_of(c, l, table[i]);
        image_page_t *p = &index[(size_t)i * L + l];
        p->nbytes = m->nbytes;
        p->kind = m->kind;
        p->chunks = m->chunks;
        p->codec = m->codec;
      }
    st = c->ops->copy_bytes(c, image, host, head, 1, stream);
    if (st == KVC_OK)
      st = c->ops->swap_out(c, table, c->swap_work_off, n, (uint8_t *)image + head, 0, stream);
    if (st != KVC_OK) st = kvc__fail_device(c, st, "writing a sequence image");
  }
  kvc_host_free(c->ha, host);
  kvc__unlock(c);
  return st;
}

/* Checks an image's header against this cache; KVC_OK, KVC_ERR_INVALID_ARGUMENT (another
 * configuration), KVC_ERR_CORRUPT. */
static kvc_status_t check_header(const kvc_cache_t *c, const image_header_t *h, size_t bytes) {
  if (h->magic != IMAGE_MAGIC || h->version != IMAGE_VERSION) return KVC_ERR_CORRUPT;
  if (h->num_layers != (uint32_t)c->cfg.num_layers ||
      h->num_kv_heads != (uint32_t)c->cfg.num_kv_heads ||
      h->head_dim != (uint32_t)c->cfg.head_dim ||
      h->block_tokens != (uint32_t)c->cfg.block_tokens || h->dtype != (uint32_t)c->cfg.dtype ||
      h->chunk_bytes != c->geo.chunk_bytes || h->codec_identity != c->codec_identity) {
    kvc__log(c, KVC_LOG_ERROR, "kvc_seq_import: the image is of another cache configuration");
    return KVC_ERR_INVALID_ARGUMENT;
  }
  const int B = c->cfg.block_tokens;
  if (h->length < 1 || h->length > c->cfg.max_seq_len ||
      h->num_blocks != (h->length + B - 1) / B || h->num_blocks > c->geo.max_seq_blocks ||
      h->bytes > bytes || h->bytes < index_end(h->num_blocks, c->cfg.num_layers))
    return KVC_ERR_CORRUPT;
  return KVC_OK;
}

/* Checks the index against the header (pages of the right kinds and sizes, extents that fill
 * the image exactly) and writes the full blocks' page sizes and chunks, and the extents' offsets
 * into c->swap_work_off. */
static kvc_status_t check_index(kvc_cache_t *c, const image_header_t *h, const image_page_t *index,
                                uint32_t *page_bytes, uint8_t *page_chunks) {
  const int L = c->cfg.num_layers, full = h->length / c->cfg.block_tokens;
  uint64_t off = 0;
  for (int i = 0; i < h->num_blocks; i++) {
    c->swap_work_off[i] = off;
    off += kvc__round16((uint64_t)L * KVC__SWAP_HDR_BYTES);
    for (int l = 0; l < L; l++) {
      const image_page_t *p = &index[(size_t)i * L + l];
      const int ok = i < full ? p->kind == KVC_PAGE_COMPRESSED && p->nbytes >= 1 &&
                                    p->nbytes <= c->geo.max_page_bytes &&
                                    p->codec <= KVC_CODEC_HUFFMAN
                              : p->kind == KVC_PAGE_STAGING && p->nbytes == c->geo.staging_bytes;
      if (!ok) return KVC_ERR_CORRUPT;
      off += kvc__round16(p->nbytes);
      if (i < full) {
        page_bytes[(size_t)i * L + l] = p->nbytes;
        page_chunks[(size_t)i * L + l] = p->chunks;
      }
    }
  }
  return index_end(h->num_blocks, L) + off == h->bytes ? KVC_OK : KVC_ERR_CORRUPT;
}

/* Checks that the extents' own page headers (what the backend's copy will read) say what the
 * index says: n blocks' headers in hdr[n][num_layers * KVC__SWAP_HDR_BYTES]. The copy places a
 * compressed page as swap-in does: packed after its block's previous page if its header says it
 * was packed (kvc_pool_layout.h), so the chunks it takes follow from the headers; they must be
 * the chunks the index charges the block manager with, or its accounting and the pool part. */
static kvc_status_t check_extents(const kvc_cache_t *c, int n, const image_page_t *index,
                                  const uint8_t *hdr) {
  const int L = c->cfg.num_layers;
  const uint32_t cb = c->geo.chunk_bytes;
  const int packs = kvc_pack_codec(c->cfg.codec, c->cfg.policy);
  for (int b = 0; b < n; b++) {
    kvc_pack_cursor_t cur = {-1, 0, 0};
    for (int l = 0; l < L; l++) {
      const size_t i = (size_t)b * L + l;
      kvc_page_entry_t e;
      memcpy(&e, hdr + i * KVC__SWAP_HDR_BYTES, KVC__SWAP_HDR_BYTES);
      const image_page_t *p = &index[i];
      if (e.nbytes != p->nbytes || e.kind != p->kind) return KVC_ERR_CORRUPT;
      if (p->kind != KVC_PAGE_COMPRESSED) continue;
      if (e.codec != p->codec || (e.first && !packs)) return KVC_ERR_CORRUPT;
      kvc_page_entry_t placed;
      memset(&placed, 0, sizeof(placed));
      placed.first = (uint8_t)(e.first ? kvc_pack_after(&cur, l, cb) : 0);
      const uint32_t taken = kvc_pack_popped(placed.first, e.nbytes, cb);
      if (taken != p->chunks) return KVC_ERR_CORRUPT;
      placed.nchunks = (uint8_t)(taken + (placed.first ? 1 : 0));
      cur = kvc_pack_cursor_after(&placed, l, e.nbytes, cb);
    }
  }
  return KVC_OK;
}

kvc_status_t kvc_seq_import(kvc_cache_t *c, kvc_seq_id_t id, const void *image, size_t bytes,
                            void *stream) {
  if (!c || !image) return KVC_ERR_INVALID_ARGUMENT;
  kvc__lock(c);
  /* What this rank reads in its image decides only `local`, which the block manager agrees with
   * the other ranks' (so that every rank reaches the agreement); a failed copy is a device
   * failure. */
  kvc_status_t st = c->sticky, local = KVC_OK;
  image_header_t h;
  memset(&h, 0, sizeof(h));
  const int L = c->cfg.num_layers;
  uint8_t *host = NULL, *hdr = NULL;
  uint32_t *page_bytes = NULL;
  uint8_t *page_chunks = NULL;
  size_t head = 0;
  if (st == KVC_OK && bytes < sizeof(h)) local = KVC_ERR_CORRUPT;
  if (st == KVC_OK && local == KVC_OK) st = c->ops->copy_bytes(c, &h, image, sizeof(h), 0, stream);
  if (st == KVC_OK && local == KVC_OK) local = check_header(c, &h, bytes);
  const int n = local == KVC_OK ? h.num_blocks : 0;
  if (st == KVC_OK && local == KVC_OK) {
    const size_t pages = (size_t)n * (size_t)L;
    head = (size_t)index_end(n, L);
    host = kvc_host_malloc(c->ha, head);
    hdr = kvc_host_malloc(c->ha, pages * KVC__SWAP_HDR_BYTES);
    page_bytes = kvc_host_malloc(c->ha, pages * sizeof(uint32_t));
    page_chunks = kvc_host_malloc(c->ha, pages);
    if (!host || !hdr || !page_bytes || !page_chunks) local = KVC_ERR_OUT_OF_HOST_MEMORY;
  }
  if (st == KVC_OK && local == KVC_OK) st = c->ops->copy_bytes(c, host, image, head, 0, stream);
  const image_page_t *index = host ? (const image_page_t *)(host + sizeof(h)) : NULL;
  if (st == KVC_OK && local == KVC_OK) local = check_index(c, &h, index, page_bytes, page_chunks);
  if (st == KVC_OK && local == KVC_OK)
    st = c->ops->read_swap_headers(c, (const uint8_t *)image + head, c->swap_work_off, n, hdr,
                                   stream);
  if (st == KVC_OK && local == KVC_OK) local = check_extents(c, n, index, hdr);
  if (st != KVC_OK) st = kvc__fail_device(c, st, "reading a sequence image");
  kvc_bm_work_t w;
  if (st == KVC_OK)
    st = kvc__tp_status(c, kvc_bm_seq_import(c->bm, id, h.length, page_bytes, page_chunks, local,
                                             &w));
  if (st == KVC_OK) {
    /* Evicted blocks first (their ids may be among the new ones), then the new blocks' pages. */
    kvc_bm_work_t frees = w, copies = w;
    frees.num_swap = 0;
    copies.num_free = 0;
    st = kvc__run_work(c, &frees, 0, NULL, stream);
    for (int i = 0; st == KVC_OK && i < n; i++)
      for (int l = 0; l < L; l++) {
        const image_page_t *p = &index[(size_t)i * L + l];
        const int full = p->kind == KVC_PAGE_COMPRESSED;
        kvc__meta_set(c, l, w.swap_blocks[i], (kvc_page_kind_t)p->kind, p->nbytes,
                      full ? p->codec : 0, full ? p->chunks : 0, full);
      }
    if (st == KVC_OK) st = kvc__run_work(c, &copies, -1, (const uint8_t *)image + head, stream);
    if (st == KVC_OK && kvc__live_add(c, id))
      st = kvc__fail_device(c, KVC_ERR_INTERNAL, "importing a sequence");
  }
  kvc_host_free(c->ha, host);
  kvc_host_free(c->ha, hdr);
  kvc_host_free(c->ha, page_bytes);
  kvc_host_free(c->ha, page_chunks);
  kvc__unlock(c);
  return st;
}
