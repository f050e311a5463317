/*
 * The prefix cache: the chained block hash, the hash table of hashed blocks (ACTIVE, CACHED or
 * SWAPPED; chained through blk[].hnext so that inserting never allocates), the LRU list of CACHED
 * blocks, and eviction.
 *
 * A table entry is identified by (hash, parent_serial, salt, tokens): matching the parent entry's
 * serial instead of only its hash is what makes a hit exact by induction from the root — two
 * prefixes that collide on every hash still differ in some block's tokens or in a parent serial.
 */
#include <string.h>

#include "allocator/kvc_blocks_internal.h"

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

uint64_t kvc_bm_block_hash(uint64_t parent, const int32_t *tokens, int n, uint64_t codec_identity,
                           uint64_t salt) {
  uint64_t h = kvc__mix64(parent ^ 0x9e3779b97f4a7c15ull);
  h ^= kvc__mix64(codec_identity + 0x632be59bd9b4e019ull);
  h = rotl64(h, 23) ^ kvc__mix64(salt + 0x85157af5ull);
  int i = 0;
  for (; i + 1 < n; i += 2) {
    uint64_t w = (uint64_t)(uint32_t)tokens[i] | (uint64_t)(uint32_t)tokens[i + 1] << 32;
    h = rotl64(h ^ (w * 0x87c37b91114253d5ull), 31) * 0x4cf5ad432745937full;
  }
  if (i < n) h = rotl64(h ^ ((uint64_t)(uint32_t)tokens[i] * 0x87c37b91114253d5ull), 31) *
                 0x4cf5ad432745937full;
  h = kvc__mix64(h ^ (uint64_t)n);
  /* 0 means "not cached" in events. */
  return h ? h : 1;
}

void kvc_bm_set_hash_fn(kvc_bm_t *bm, kvc_bm_hash_fn fn) {
  bm->hash_fn = fn ? fn : kvc_bm_block_hash;
}

void kvc__hash_insert(kvc_bm_t *bm, int32_t b) {
  kvc__block_t *blk = &bm->blk[b];
  uint32_t i = (uint32_t)blk->hash & bm->hmask;
  blk->hnext = bm->hbucket[i];
  bm->hbucket[i] = b;
  blk->hashed = 1;
  bm->nhashed++;
}

void kvc__hash_remove(kvc_bm_t *bm, int32_t b) {
  kvc__block_t *blk = &bm->blk[b];
  int32_t *link = &bm->hbucket[(uint32_t)blk->hash & bm->hmask];
  while (*link != b) link = &bm->blk[*link].hnext;
  *link = blk->hnext;
  blk->hnext = -1;
  blk->hashed = 0;
  bm->nhashed--;
}

int32_t kvc__hash_find(const kvc_bm_t *bm, uint64_t hash, uint64_t parent_serial, uint64_t salt,
                       const int32_t *tokens) {
  size_t row = (size_t)bm->cfg.block_tokens * sizeof(int32_t);
  for (int32_t b = bm->hbucket[(uint32_t)hash & bm->hmask]; b >= 0; b = bm->blk[b].hnext) {
    const kvc__block_t *blk = &bm->blk[b];
    if (blk->hash == hash && blk->parent_serial == parent_serial && blk->salt == salt &&
        memcmp(bm->block_tok + (size_t)b * bm->cfg.block_tokens, tokens, row) == 0)
      return b;
  }
  return -1;
}

void kvc__lru_push(kvc_bm_t *bm, int32_t b) {
  kvc__block_t *blk = &bm->blk[b];
  blk->lru_next = -1;
  blk->lru_prev = bm->lru_tail;
  if (bm->lru_tail >= 0) bm->blk[bm->lru_tail].lru_next = b;
  else bm->lru_head = b;
  bm->lru_tail = b;
}

void kvc__lru_remove(kvc_bm_t *bm, int32_t b) {
  kvc__block_t *blk = &bm->blk[b];
  if (blk->lru_prev >= 0) bm->blk[blk->lru_prev].lru_next = blk->lru_next;
  else bm->lru_head = blk->lru_next;
  if (blk->lru_next >= 0) bm->blk[blk->lru_next].lru_prev = blk->lru_prev;
  else bm->lru_tail = blk->lru_prev;
  blk->lru_prev = blk->lru_next = -1;
}

void kvc__block_release(kvc_bm_t *bm, int32_t b) {
  kvc__block_t *blk = &bm->blk[b];
  int layers = bm->cfg.num_layers;
  if (blk->state == KVC__SWAPPED) {
    bm->swap_used -= kvc__swap_bytes(bm, blk);
    bm->swapped_blocks--;
  } else {
    uint32_t charge = kvc__charge(bm, blk);
    bm->charged -= charge;
    bm->unmeasured -= (uint64_t)(layers - blk->nmeasured) * bm->cfg.worst_page_chunks;
    bm->m_bytes -= blk->mbytes;
    bm->m_chunks -= blk->mchunks;
    bm->m_pages -= blk->nmeasured;
    if (blk->state == KVC__CACHED) {
      kvc__lru_remove(bm, b);
      bm->cached_chunks -= charge;
      bm->ncached--;
    } else {
      bm->active_blocks--;
      if (blk->ntok < bm->cfg.block_tokens) bm->partial_tails--;
    }
  }
  if (blk->hashed) kvc__hash_remove(bm, b);
  if (blk->nmeasured) {
    memset(bm->pg_chunks + (size_t)b * layers, 0, (size_t)layers);
    memset(bm->pg_bytes + (size_t)b * layers, 0, (size_t)layers * sizeof(uint32_t));
  }
  blk->mbytes = 0;
  blk->mchunks = 0;
  blk->nmeasured = 0;
  blk->ntok = 0;
  blk->serial = 0;
  blk->state = KVC__FREE;
  bm->free_ids[bm->nfree++] = b;
}

int64_t kvc__evictions_for(const kvc_bm_t *bm, uint64_t chunks, int64_t ids) {
  uint64_t free = kvc__free_chunks(bm);
  int64_t unreserved = bm->nfree - bm->reserved_ids, n = 0;
  for (int32_t b = bm->lru_head; free < chunks || unreserved < ids; b = bm->blk[b].lru_next) {
    if (b < 0) return -1;
    free += kvc__charge(bm, &bm->blk[b]);
    unreserved++;
    n++;
  }
  return n;
}

void kvc__evict(kvc_bm_t *bm, int64_t n, int *nfree) {
  for (; n > 0; n--) {
    int32_t b = bm->lru_head;
    uint64_t hash = bm->blk[b].hash;
    kvc__block_release(bm, b);
    bm->w_free[(*nfree)++] = b;
    bm->evictions++;
    kvc__event(bm, KVC_EVENT_BLOCK_EVICTED, b, hash);
  }
}
