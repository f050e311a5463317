/*
 * Planning a step: the batch is checked completely first (nothing changes on failure), then every
 * sequence's new tokens get their rows, new blocks come out of the reservations, full blocks
 * become compress jobs and enter the prefix cache, and the CSR block tables are copied out.
 * Everything writes into arrays sized at creation (or grown by the reserving calls), so planning
 * never allocates and costs O(new rows + blocks of the batch's tables).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "allocator/kvc_blocks_internal.h"

static kvc_status_t check_batch(kvc_bm_t *bm, const kvc_bm_batch_t *batch, int64_t *rows) {
  int n = batch->num_seqs;
  if (n < 1 || n > bm->cfg.max_seqs || !batch->seq_ids || !batch->num_new_tokens)
    return KVC_ERR_INVALID_ARGUMENT;
  uint64_t mark = ++bm->plan_mark;
  int64_t total = 0;
  for (int i = 0; i < n; i++) {
    int32_t add = batch->num_new_tokens[i];
    if (add < 1) return KVC_ERR_INVALID_ARGUMENT;
    int32_t slot = kvc__seq_find(bm, batch->seq_ids[i]);
    if (slot < 0) return KVC_ERR_NOT_FOUND;
    kvc__seq_t *s = &bm->seq[slot];
    if (s->mark == mark) return KVC_ERR_INVALID_ARGUMENT; /* listed twice */
    s->mark = mark;
    if (s->swapped) return KVC_ERR_INVALID_STATE;
    if ((int64_t)s->len + add > s->reserved) return KVC_ERR_INVALID_ARGUMENT;
    total += add;
    bm->p_slot[i] = slot;
  }
  if (total > bm->cfg.max_batch_tokens) return KVC_ERR_INVALID_ARGUMENT;
  *rows = total;
  return KVC_OK;
}

/* A block that just became full with known tokens: enters the prefix cache unless an equal entry
 * is already there (then the chain continues from that entry). Returns the hash to report, 0 when
 * the block itself is not cached. */
static uint64_t cache_full_block(kvc_bm_t *bm, kvc__seq_t *s, int32_t b) {
  const int32_t *t = bm->block_tok + (size_t)b * bm->cfg.block_tokens;
  uint64_t h = bm->hash_fn(s->last_hash, t, bm->cfg.block_tokens, bm->cfg.codec_identity, s->salt);
  int32_t e = kvc__hash_find(bm, h, s->last_serial, s->salt, t);
  s->last_hash = h;
  if (e >= 0) {
    s->last_serial = bm->blk[e].serial;
    return 0;
  }
  kvc__block_t *blk = &bm->blk[b];
  blk->hash = h;
  blk->parent_serial = s->last_serial;
  blk->salt = s->salt;
  blk->serial = bm->serial_next++;
  kvc__hash_insert(bm, b);
  s->last_serial = blk->serial;
  return h;
}

kvc_status_t kvc_bm_plan(kvc_bm_t *bm, const kvc_bm_batch_t *batch, kvc_bm_plan_t *plan) {
  if (!bm || !batch || !plan) return KVC_ERR_INVALID_ARGUMENT;
  if (bm->step_open) return KVC_ERR_INVALID_STATE;
  int64_t total_rows;
  kvc_status_t st = check_batch(bm, batch, &total_rows);
  if (st != KVC_OK) return st;

  if (bm->p_bids_retired) {
    kvc_host_free(bm->ha, bm->p_bids_retired);
    bm->p_bids_retired = NULL;
  }
  const int B = bm->cfg.block_tokens, n = batch->num_seqs;
  const uint64_t step = ++bm->step;
  bm->step_open = 1;
  bm->p_bids_handed = 1;
  int32_t row = 0, nbids = 0, njobs = 0, nnew = 0, max_kv = 0;
  bm->p_qo[0] = 0;
  bm->p_bindptr[0] = 0;
  for (int i = 0; i < n; i++) {
    kvc__seq_t *s = &bm->seq[bm->p_slot[i]];
    const int32_t len0 = s->len, len1 = len0 + batch->num_new_tokens[i];
    const int32_t staged = len0 & (B - 1);
    s->step = step;
    s->planned = 1;
    for (int32_t pos = len0; pos < len1;) {
      const int32_t bi = pos >> bm->bshift, slot0 = pos & (B - 1);
      const int32_t end = len1 < (bi + 1) * B ? len1 : (bi + 1) * B, cnt = end - pos;
      const int full = slot0 + cnt == B, fresh = bi == s->nblocks;
      int32_t b;
      if (fresh) {
        b = kvc__block_take(bm, cnt);
        s->table[s->nblocks++] = b;
        bm->reserved_ids--;
      } else {
        b = s->table[bi];
        bm->blk[b].ntok += cnt;
        bm->tokens_stored += cnt;
        if (full) bm->partial_tails--;
      }
      if (full) {
        bm->p_job_block[njobs] = b;
        bm->p_job_staged[njobs++] = fresh ? 0 : staged;
        bm->blk[b].done_step = step;
      } else if (fresh) {
        bm->p_new_staging[nnew++] = b;
      }
      for (int32_t r = 0; r < cnt; r++) {
        bm->p_row_block[row + r] = b;
        bm->p_row_slot[row + r] = slot0 + r;
      }
      if (bm->block_tok && s->chain_ok) {
        int32_t *dst = bm->block_tok + (size_t)b * B + slot0;
        const kvc__prompt_t *p = s->prompt;
        for (int32_t r = 0; r < cnt; r++) {
          int32_t at = pos + r;
          if (batch->token_ids) dst[r] = batch->token_ids[row + r];
          else if (p && at - p->start < p->n) dst[r] = p->tok[at - p->start];
          else s->chain_ok = 0;
        }
      }
      uint64_t hash = full && bm->block_tok && s->chain_ok ? cache_full_block(bm, s, b) : 0;
      if (full) kvc__event(bm, KVC_EVENT_BLOCK_STORED, b, hash);
      row += cnt;
      pos = end;
    }
    s->len = len1;
    if (s->prompt && len1 >= s->prompt->start + s->prompt->n) {
      kvc__prompt_release(bm, s->prompt);
      s->prompt = NULL;
    }
    bm->p_qo[i + 1] = row;
    bm->p_kvlen[i] = len1;
    memcpy(bm->p_bids + nbids, s->table, (size_t)s->nblocks * sizeof(int32_t));
    nbids += s->nblocks;
    bm->p_bindptr[i + 1] = nbids;
    if (len1 > max_kv) max_kv = len1;
  }

  plan->step = step;
  plan->num_seqs = n;
  plan->total_rows = (int)total_rows;
  plan->max_kv_len = max_kv;
  plan->qo_indptr = bm->p_qo;
  plan->kv_len = bm->p_kvlen;
  plan->block_indptr = bm->p_bindptr;
  plan->block_ids = bm->p_bids;
  plan->row_block = bm->p_row_block;
  plan->row_slot = bm->p_row_slot;
  plan->num_jobs = njobs;
  plan->job_block = bm->p_job_block;
  plan->job_staged = bm->p_job_staged;
  plan->num_new_staging = nnew;
  plan->new_staging = bm->p_new_staging;
  return KVC_OK;
}

static int cmp_u64(const void *a, const void *b) {
  const uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

int kvc_bm_plan_prefix_groups(const kvc_bm_plan_t *plan, int block_tokens, int32_t *seq_group,
                              int32_t *group_blocks, uint64_t *scratch) {
  const int n = plan->num_seqs;
  int m = 0;
  for (int s = 0; s < n; s++) {
    seq_group[s] = -1;
    /* Only whole blocks before the sequence's first query row. */
    const int before_rows = plan->kv_len[s] - (plan->qo_indptr[s + 1] - plan->qo_indptr[s]);
    if (before_rows >= block_tokens && plan->block_indptr[s + 1] > plan->block_indptr[s])
      scratch[m++] = (uint64_t)(uint32_t)plan->block_ids[plan->block_indptr[s]] << 32 | (uint32_t)s;
  }
  qsort(scratch, (size_t)m, sizeof(uint64_t), cmp_u64);
  int groups = 0;
  for (int i = 0, j; i < m; i = j) {
    for (j = i + 1; j < m && scratch[j] >> 32 == scratch[i] >> 32;) j++;
    if (j - i < 2) continue;
    /* The run's sequences start with the same block: the blocks all of them share. */
    const int lead = (int)(uint32_t)scratch[i];
    const int32_t *first = plan->block_ids + plan->block_indptr[lead];
    int shared = INT32_MAX;
    for (int k = i; k < j; k++) {
      const int s = (int)(uint32_t)scratch[k];
      const int before_rows = plan->kv_len[s] - (plan->qo_indptr[s + 1] - plan->qo_indptr[s]);
      const int blocks = plan->block_indptr[s + 1] - plan->block_indptr[s];
      const int lim = before_rows / block_tokens < blocks ? before_rows / block_tokens : blocks;
      const int32_t *t = plan->block_ids + plan->block_indptr[s];
      int b = 0;
      while (b < shared && b < lim && t[b] == first[b]) b++;
      shared = b;
    }
    for (int k = i; k < j; k++) seq_group[(uint32_t)scratch[k]] = groups;
    group_blocks[groups++] = shared;
  }
  return groups;
}

void kvc_bm_step_done(kvc_bm_t *bm) { bm->step_open = 0; }

int kvc_bm_step_open(const kvc_bm_t *bm) { return bm->step_open; }

static void measured(kvc_bm_t *bm, int check_step, uint64_t step, int32_t block, int layer,
                     uint32_t nbytes, uint32_t nchunks) {
  if (block < 0 || block >= bm->cfg.max_blocks || layer < 0 || layer >= bm->cfg.num_layers ||
      nbytes == 0 || nchunks > bm->cfg.worst_page_chunks) {
    bm->ignored_measurements++;
    return;
  }
  kvc__block_t *blk = &bm->blk[block];
  const size_t at = (size_t)block * bm->cfg.num_layers + layer;
  if ((blk->state != KVC__ACTIVE && blk->state != KVC__CACHED) ||
      blk->ntok != bm->cfg.block_tokens || bm->pg_bytes[at] ||
      (check_step && blk->done_step != step)) {
    bm->ignored_measurements++;
    return;
  }
  bm->pg_chunks[at] = (uint8_t)nchunks;
  bm->pg_bytes[at] = nbytes;
  blk->mchunks += nchunks;
  blk->mbytes += nbytes;
  blk->nmeasured++;
  uint32_t saved = bm->cfg.worst_page_chunks - nchunks;
  bm->charged -= saved;
  if (blk->state == KVC__CACHED) bm->cached_chunks -= saved;
  bm->unmeasured -= bm->cfg.worst_page_chunks;
  bm->m_bytes += nbytes;
  bm->m_chunks += nchunks;
  bm->m_pages++;
}

void kvc_bm_page_measured(kvc_bm_t *bm, int32_t block, int layer, uint32_t nbytes,
                          uint32_t nchunks) {
  measured(bm, 0, 0, block, layer, nbytes, nchunks);
}

void kvc_bm_page_measured_step(kvc_bm_t *bm, uint64_t step, int32_t block, int layer,
                               uint32_t nbytes, uint32_t nchunks) {
  measured(bm, 1, step, block, layer, nbytes, nchunks);
}
