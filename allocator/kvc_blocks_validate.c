/*
 * kvc_bm_validate: recomputes everything the block manager keeps incrementally and compares.
 * O(max_blocks * num_layers + table entries); meant for tests and debugging, not the hot path.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "allocator/kvc_blocks_internal.h"

static kvc_status_t fail(char *why, size_t cap, const char *fmt, ...) {
  if (why && cap) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, cap, fmt, ap);
    va_end(ap);
  }
  return KVC_ERR_INTERNAL;
}

#define CHECK(cond, ...)                                                                           \
  do {                                                                                             \
    if (!(cond)) return fail(why, cap, __VA_ARGS__);                                               \
  } while (0)

static kvc_status_t check_sequences(const kvc_bm_t *bm, char *why, size_t cap) {
  const int B = bm->cfg.block_tokens;
  int32_t *ref = bm->v_ref, *mark = bm->v_mark;
  int64_t live = 0, swapped = 0, reserved_ids = 0, table_blocks = 0;
  for (int32_t slot = 0; slot < bm->cfg.max_seqs; slot++) {
    const kvc__seq_t *s = &bm->seq[slot];
    if (s->id == KVC_SEQ_NONE) continue;
    live++;
    swapped += s->swapped;
    CHECK(kvc__seq_find(bm, s->id) == slot, "seq %llu (slot %d) not found by id",
          (unsigned long long)s->id, slot);
    CHECK(s->len >= 0 && s->len <= s->reserved && s->reserved <= bm->cfg.max_seq_len,
          "seq %llu: len %d reserved %d", (unsigned long long)s->id, s->len, s->reserved);
    CHECK(s->nblocks == kvc__blocks_for(bm, s->len), "seq %llu: %d blocks for %d tokens",
          (unsigned long long)s->id, s->nblocks, s->len);
    int32_t want = kvc__blocks_for(bm, s->reserved);
    CHECK(s->cap >= want && s->cap <= bm->max_table && (s->cap == 0 || s->table),
          "seq %llu: table capacity %d for %d reserved blocks", (unsigned long long)s->id, s->cap,
          want);
    CHECK(!s->swapped || s->reserved == s->len, "swapped seq %llu keeps a reservation",
          (unsigned long long)s->id);
    CHECK(!s->prompt || (s->prompt->refs >= 1 && s->prompt->start <= s->len &&
                         s->len < s->prompt->start + s->prompt->n),
          "seq %llu: stale prompt", (unsigned long long)s->id);
    CHECK(!bm->step_open || s->step <= bm->step, "seq %llu planned in a future step",
          (unsigned long long)s->id);
    reserved_ids += want - s->nblocks;
    table_blocks += want;
    for (int32_t i = 0; i < s->nblocks; i++) {
      int32_t b = s->table[i];
      CHECK(b >= 0 && b < bm->cfg.max_blocks, "seq %llu: block id %d out of range",
            (unsigned long long)s->id, b);
      CHECK(mark[b] != slot, "seq %llu holds block %d twice", (unsigned long long)s->id, b);
      mark[b] = slot;
      ref[b]++;
      const kvc__block_t *blk = &bm->blk[b];
      int32_t ntok = i + 1 < s->nblocks ? B : s->len - i * B;
      CHECK(blk->ntok == ntok, "seq %llu: block %d (#%d) has %d tokens, table says %d",
            (unsigned long long)s->id, b, i, blk->ntok, ntok);
      /* A block shared when its sequence was swapped out stays in the pool, even after the
       * other holders are gone. */
      if (s->swapped)
        CHECK(blk->state == KVC__SWAPPED || blk->state == KVC__ACTIVE,
              "swapped seq %llu: block %d in state %d", (unsigned long long)s->id, b, blk->state);
      else
        CHECK(blk->state == KVC__ACTIVE, "seq %llu: block %d in state %d",
              (unsigned long long)s->id, b, blk->state);
      CHECK(ntok == B || blk->ref == 1, "partial block %d shared (ref %d)", b, blk->ref);
    }
  }
  CHECK(live == bm->live_seqs && live + bm->nseq_free == bm->cfg.max_seqs,
        "live sequences: %lld counted, %lld recorded, %d free slots", (long long)live,
        (long long)bm->live_seqs, bm->nseq_free);
  CHECK(swapped == bm->swapped_seqs, "swapped sequences %lld, recorded %lld", (long long)swapped,
        (long long)bm->swapped_seqs);
  CHECK(reserved_ids == bm->reserved_ids, "reserved ids %lld, recorded %lld",
        (long long)reserved_ids, (long long)bm->reserved_ids);
  CHECK(table_blocks == bm->table_blocks && table_blocks <= bm->p_bids_cap,
        "table blocks %lld, recorded %lld, plan capacity %lld", (long long)table_blocks,
        (long long)bm->table_blocks, (long long)bm->p_bids_cap);
  for (int32_t i = 0; i < bm->nseq_free; i++) {
    int32_t slot = bm->seq_free[i];
    CHECK(slot >= 0 && slot < bm->cfg.max_seqs && bm->seq[slot].id == KVC_SEQ_NONE,
          "free sequence slot %d is in use", slot);
  }
  int64_t mapped = 0;
  for (uint32_t i = 0; i <= bm->idmask; i++) {
    int32_t slot = bm->idmap[i];
    if (slot < 0) continue;
    mapped++;
    CHECK(slot < bm->cfg.max_seqs && bm->seq[slot].id != KVC_SEQ_NONE,
          "id map entry %u names unused slot %d", i, slot);
  }
  CHECK(mapped == live, "id map holds %lld entries for %lld sequences", (long long)mapped,
        (long long)live);
  return KVC_OK;
}

static kvc_status_t check_blocks(const kvc_bm_t *bm, char *why, size_t cap) {
  const int B = bm->cfg.block_tokens, L = bm->cfg.num_layers;
  const uint32_t W = bm->cfg.worst_page_chunks;
  uint64_t charged = 0, unmeasured = 0, m_bytes = 0, m_chunks = 0, cached_chunks = 0, swap = 0;
  int64_t m_pages = 0, n_free = 0, n_active = 0, n_cached = 0, n_swapped = 0, n_hashed = 0;
  int64_t tokens = 0, partial = 0;
  for (int32_t b = 0; b < bm->cfg.max_blocks; b++) {
    const kvc__block_t *blk = &bm->blk[b];
    CHECK(blk->ref == bm->v_ref[b], "block %d: refcount %d, %d table references", b, blk->ref,
          bm->v_ref[b]);
    uint32_t mc = 0;
    uint64_t mb = 0;
    int32_t nm = 0;
    for (int l = 0; l < L; l++) {
      uint8_t c = bm->pg_chunks[(size_t)b * L + l];
      if (!bm->pg_bytes[(size_t)b * L + l]) {
        CHECK(c == 0, "block %d layer %d: %u chunks, not measured", b, l, c);
        continue;
      }
      CHECK(c <= W, "block %d layer %d: %u chunks", b, l, c);
      mc += c;
      mb += bm->pg_bytes[(size_t)b * L + l];
      nm++;
    }
    CHECK(mc == blk->mchunks && mb == blk->mbytes && nm == blk->nmeasured,
          "block %d: measured sums disagree with its pages", b);
    CHECK(nm == 0 || blk->ntok == B, "block %d: partial block with measured pages", b);
    CHECK(!blk->hashed || (blk->ntok == B && blk->serial > 0 && blk->serial < bm->serial_next),
          "block %d: bad cache entry", b);
    switch (blk->state) {
      case KVC__FREE:
        n_free++;
        CHECK(blk->ref == 0 && !blk->hashed && blk->ntok == 0 && nm == 0,
              "free block %d: ref %d hashed %d ntok %d", b, blk->ref, blk->hashed, blk->ntok);
        break;
      case KVC__ACTIVE:
      case KVC__CACHED: {
        uint32_t charge = kvc__charge(bm, blk);
        charged += charge;
        unmeasured += (uint64_t)(L - nm) * W;
        m_bytes += mb;
        m_chunks += mc;
        m_pages += nm;
        if (blk->state == KVC__ACTIVE) {
          n_active++;
          tokens += blk->ntok;
          partial += blk->ntok < B;
          CHECK(blk->ref >= 1 && blk->ntok >= 1, "active block %d: ref %d ntok %d", b, blk->ref,
                blk->ntok);
        } else {
          n_cached++;
          cached_chunks += charge;
          CHECK(blk->ref == 0 && blk->hashed, "cached block %d: ref %d hashed %d", b, blk->ref,
                blk->hashed);
        }
        break;
      }
      case KVC__SWAPPED:
        n_swapped++;
        tokens += blk->ntok;
        swap += kvc__swap_bytes(bm, blk);
        CHECK(blk->ref == 1, "swapped block %d: ref %d", b, blk->ref);
        CHECK(blk->ntok < B || nm == L, "swapped block %d not fully measured", b);
        break;
      default:
        return fail(why, cap, "block %d: state %d", b, blk->state);
    }
    n_hashed += blk->hashed;
  }
  CHECK(n_free == bm->nfree && n_active == bm->active_blocks && n_cached == bm->ncached &&
            n_swapped == bm->swapped_blocks && n_hashed == bm->nhashed,
        "block counts: free %lld/%d active %lld/%lld cached %lld/%lld swapped %lld/%lld "
        "hashed %lld/%lld",
        (long long)n_free, bm->nfree, (long long)n_active, (long long)bm->active_blocks,
        (long long)n_cached, (long long)bm->ncached, (long long)n_swapped,
        (long long)bm->swapped_blocks, (long long)n_hashed, (long long)bm->nhashed);
  CHECK(charged == bm->charged && unmeasured == bm->unmeasured && cached_chunks == bm->cached_chunks,
        "chunks: charged %llu/%llu unmeasured %llu/%llu cached %llu/%llu",
        (unsigned long long)charged, (unsigned long long)bm->charged,
        (unsigned long long)unmeasured, (unsigned long long)bm->unmeasured,
        (unsigned long long)cached_chunks, (unsigned long long)bm->cached_chunks);
  CHECK(m_bytes == bm->m_bytes && m_chunks == bm->m_chunks && m_pages == bm->m_pages,
        "measured pages disagree with the totals");
  CHECK(swap == bm->swap_used && swap <= bm->cfg.swap_bytes, "swap bytes %llu, recorded %zu",
        (unsigned long long)swap, bm->swap_used);
  CHECK(tokens == bm->tokens_stored && partial == bm->partial_tails,
        "tokens %lld/%lld partial tails %lld/%lld", (long long)tokens,
        (long long)bm->tokens_stored, (long long)partial, (long long)bm->partial_tails);
  CHECK(bm->charged + (uint64_t)bm->reserved_ids * bm->lw <= bm->cfg.total_chunks,
        "charged %llu + reserved %lld blocks exceed the pool", (unsigned long long)bm->charged,
        (long long)bm->reserved_ids);
  CHECK(bm->reserved_ids >= 0 && bm->reserved_ids <= bm->nfree,
        "%lld ids reserved, %d free", (long long)bm->reserved_ids, bm->nfree);
  return KVC_OK;
}

static kvc_status_t check_free_ids(const kvc_bm_t *bm, char *why, size_t cap) {
  int32_t *seen = bm->v_mark;
  memset(seen, 0, (size_t)bm->cfg.max_blocks * sizeof(int32_t));
  for (int32_t i = 0; i < bm->nfree; i++) {
    int32_t b = bm->free_ids[i];
    CHECK(b >= 0 && b < bm->cfg.max_blocks, "free id %d out of range", b);
    CHECK(bm->blk[b].state == KVC__FREE, "block %d on the free list in state %d", b,
          bm->blk[b].state);
    CHECK(!seen[b], "block %d twice on the free list", b);
    seen[b] = 1;
  }
  return KVC_OK;
}

static kvc_status_t check_prefix_cache(const kvc_bm_t *bm, char *why, size_t cap) {
  int64_t n = 0;
  int32_t prev = -1;
  for (int32_t b = bm->lru_head; b >= 0; b = bm->blk[b].lru_next) {
    CHECK(++n <= bm->ncached, "LRU list longer than %lld cached blocks (cycle?)",
          (long long)bm->ncached);
    CHECK(bm->blk[b].state == KVC__CACHED, "block %d on the LRU in state %d", b,
          bm->blk[b].state);
    CHECK(bm->blk[b].lru_prev == prev, "LRU back link of block %d", b);
    prev = b;
  }
  CHECK(n == bm->ncached && prev == bm->lru_tail, "LRU holds %lld of %lld cached blocks",
        (long long)n, (long long)bm->ncached);
  if (!bm->cfg.prefix_caching) {
    CHECK(bm->nhashed == 0, "hashed blocks without prefix caching");
    return KVC_OK;
  }
  int64_t entries = 0;
  for (uint32_t i = 0; i <= bm->hmask; i++) {
    for (int32_t b = bm->hbucket[i]; b >= 0; b = bm->blk[b].hnext) {
      CHECK(++entries <= bm->nhashed, "hash table longer than %lld entries (cycle?)",
            (long long)bm->nhashed);
      const kvc__block_t *blk = &bm->blk[b];
      CHECK(blk->hashed && ((uint32_t)blk->hash & bm->hmask) == i,
            "block %d in hash bucket %u (hashed %d)", b, i, blk->hashed);
      /* The first equal entry must be this one: no two entries share a full key. */
      const int32_t *t = bm->block_tok + (size_t)b * bm->cfg.block_tokens;
      CHECK(kvc__hash_find(bm, blk->hash, blk->parent_serial, blk->salt, t) == b,
            "block %d: duplicate prefix cache entry", b);
    }
  }
  CHECK(entries == bm->nhashed, "hash table holds %lld of %lld entries", (long long)entries,
        (long long)bm->nhashed);
  return KVC_OK;
}

kvc_status_t kvc_bm_validate(const kvc_bm_t *bm, char *why, size_t cap) {
  if (!bm) return fail(why, cap, "NULL block manager");
  if (why && cap) why[0] = '\0';
  size_t nb = (size_t)bm->cfg.max_blocks;
  memset(bm->v_ref, 0, nb * sizeof(int32_t));
  memset(bm->v_mark, 0xff, nb * sizeof(int32_t));
  kvc_status_t st = check_sequences(bm, why, cap);
  if (st == KVC_OK) st = check_blocks(bm, why, cap);
  if (st == KVC_OK) st = check_free_ids(bm, why, cap);
  if (st == KVC_OK) st = check_prefix_cache(bm, why, cap);
  return st;
}
