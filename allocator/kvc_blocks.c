/*
 * The block manager: creation, the sequence map, and the per-request hooks (add, reserve, fork,
 * free, swap), capacity and statistics. Plan and page measurements are in kvc_blocks_plan.c, the
 * prefix cache in kvc_prefix_cache.c, the invariant checker in kvc_blocks_validate.c.
 */
#include <math.h>
#include <string.h>

#include "allocator/kvc_blocks_internal.h"
#include "allocator/kvc_pool_layout.h"

static void work_clear(kvc_bm_work_t *w) {
  w->free_blocks = NULL;
  w->num_free = 0;
  w->copy_src = -1;
  w->copy_dst = -1;
  w->swap_blocks = NULL;
  w->num_swap = 0;
}

static int in_step(const kvc_bm_t *bm, const kvc__seq_t *s) {
  return bm->step_open && s->step == bm->step;
}

static uint32_t pow2_at_least(uint64_t n) {
  uint32_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

/* Rounded to nearest: 0.2f of 100 chunks is 20, not the 21 that float's 0.2000000030 would ceil to. */
static uint32_t watermark_chunks(const kvc_bm_config_t *c) {
  return (uint32_t)llround((double)c->watermark * c->total_chunks);
}

static kvc_status_t check_config(const kvc_bm_config_t *c) {
  if (c->num_layers < 1 || c->block_tokens < 1 || c->block_tokens > 4096 ||
      (c->block_tokens & (c->block_tokens - 1)) || c->max_seqs < 1 || c->max_seq_len < 1 ||
      c->max_blocks < 1 || c->max_blocks > (INT32_MAX >> 1) || c->staging_chunks < 1 ||
      c->worst_page_chunks < c->staging_chunks || c->worst_page_chunks > KVC_PAGE_MAX_CHUNKS ||
      c->max_batch_tokens < 1 || !(c->watermark >= 0.0f && c->watermark < 1.0f) ||
      c->max_seqs > (INT32_MAX >> 2))
    return KVC_ERR_INVALID_ARGUMENT;
  uint64_t lw = (uint64_t)c->num_layers * c->worst_page_chunks;
  uint64_t wm = watermark_chunks(c);
  /* A pool that cannot admit one block into an empty cache is a configuration error. */
  if (lw + wm > c->total_chunks) return KVC_ERR_INVALID_ARGUMENT;
  return KVC_OK;
}

kvc_status_t kvc_bm_create(const kvc_bm_config_t *cfg, kvc_host_alloc_t *ha, kvc_bm_t **out) {
  if (!cfg || !ha || !out) return KVC_ERR_INVALID_ARGUMENT;
  kvc_status_t st = check_config(cfg);
  if (st != KVC_OK) return st;
  kvc_bm_t *bm = kvc_host_calloc(ha, 1, sizeof(*bm));
  if (!bm) return KVC_ERR_OUT_OF_HOST_MEMORY;
  bm->cfg = *cfg;
  bm->cfg.prefix_caching = cfg->prefix_caching != 0;
  bm->ha = ha;
  while ((1 << bm->bshift) < cfg->block_tokens) bm->bshift++;
  bm->lw = (uint32_t)cfg->num_layers * cfg->worst_page_chunks;
  bm->wm_chunks = watermark_chunks(cfg);
  bm->max_table = kvc__blocks_for(bm, cfg->max_seq_len);
  bm->max_jobs = cfg->max_batch_tokens / cfg->block_tokens + cfg->max_seqs;
  if (bm->max_jobs > cfg->max_batch_tokens) bm->max_jobs = cfg->max_batch_tokens;
  bm->lru_head = bm->lru_tail = -1;
  bm->serial_next = 1;
  bm->hash_fn = kvc_bm_block_hash;

  size_t nb = (size_t)cfg->max_blocks, ns = (size_t)cfg->max_seqs, L = (size_t)cfg->num_layers;
  size_t mbt = (size_t)cfg->max_batch_tokens;
  bm->idmask = pow2_at_least(2 * ns) - 1;
  int ok = (bm->blk = kvc_host_calloc(ha, nb, sizeof(kvc__block_t))) &&
           (bm->pg_chunks = kvc_host_calloc(ha, nb, L)) &&
           (bm->pg_bytes = kvc_host_calloc(ha, nb * L, sizeof(uint32_t))) &&
           (bm->free_ids = kvc_host_malloc(ha, nb * sizeof(int32_t))) &&
           (bm->seq = kvc_host_calloc(ha, ns, sizeof(kvc__seq_t))) &&
           (bm->seq_free = kvc_host_malloc(ha, ns * sizeof(int32_t))) &&
           (bm->idmap = kvc_host_malloc(ha, ((size_t)bm->idmask + 1) * sizeof(int32_t))) &&
           (bm->w_free = kvc_host_malloc(ha, nb * sizeof(int32_t))) &&
           (bm->w_swap = kvc_host_malloc(ha, nb * sizeof(int32_t))) &&
           (bm->match = kvc_host_malloc(ha, (size_t)bm->max_table * sizeof(int32_t))) &&
           (bm->p_slot = kvc_host_malloc(ha, ns * sizeof(int32_t))) &&
           (bm->p_qo = kvc_host_malloc(ha, (ns + 1) * sizeof(int32_t))) &&
           (bm->p_kvlen = kvc_host_malloc(ha, ns * sizeof(int32_t))) &&
           (bm->p_bindptr = kvc_host_malloc(ha, (ns + 1) * sizeof(int32_t))) &&
           (bm->p_row_block = kvc_host_malloc(ha, mbt * sizeof(int32_t))) &&
           (bm->p_row_slot = kvc_host_malloc(ha, mbt * sizeof(int32_t))) &&
           (bm->p_job_block = kvc_host_malloc(ha, (size_t)bm->max_jobs * sizeof(int32_t))) &&
           (bm->p_job_staged = kvc_host_malloc(ha, (size_t)bm->max_jobs * sizeof(int32_t))) &&
           (bm->p_new_staging = kvc_host_malloc(ha, ns * sizeof(int32_t))) &&
           (bm->v_ref = kvc_host_malloc(ha, nb * sizeof(int32_t))) &&
           (bm->v_mark = kvc_host_malloc(ha, nb * sizeof(int32_t)));
  if (ok && bm->cfg.prefix_caching) {
    bm->hmask = pow2_at_least(nb) - 1;
    ok = (bm->hbucket = kvc_host_malloc(ha, ((size_t)bm->hmask + 1) * sizeof(int32_t))) &&
         (bm->block_tok = kvc_host_malloc(ha, nb * (size_t)cfg->block_tokens * sizeof(int32_t)));
    if (ok) memset(bm->hbucket, 0xff, ((size_t)bm->hmask + 1) * sizeof(int32_t));
  }
  if (!ok) {
    kvc_bm_destroy(bm);
    return KVC_ERR_OUT_OF_HOST_MEMORY;
  }
  /* Ids pop in increasing order from a fresh manager (easier to read in traces and tests). */
  for (size_t i = 0; i < nb; i++) {
    kvc__block_t *b = &bm->blk[i];
    b->hnext = b->lru_prev = b->lru_next = -1;
    bm->free_ids[i] = (int32_t)(nb - 1 - i);
  }
  bm->nfree = (int32_t)nb;
  for (size_t i = 0; i < ns; i++) {
    bm->seq[i].id = KVC_SEQ_NONE;
    bm->seq_free[i] = (int32_t)(ns - 1 - i);
  }
  bm->nseq_free = (int32_t)ns;
  memset(bm->idmap, 0xff, ((size_t)bm->idmask + 1) * sizeof(int32_t));
  *out = bm;
  return KVC_OK;
}

void kvc_bm_destroy(kvc_bm_t *bm) {
  if (!bm) return;
  kvc_host_alloc_t *ha = bm->ha;
  if (bm->seq) {
    for (int i = 0; i < bm->cfg.max_seqs; i++) {
      if (bm->seq[i].id == KVC_SEQ_NONE) continue;
      kvc_host_free(ha, bm->seq[i].table);
      kvc__prompt_release(bm, bm->seq[i].prompt);
    }
  }
  void *arrays[] = {bm->blk,         bm->pg_chunks,    bm->pg_bytes,      bm->block_tok,
                    bm->free_ids,    bm->hbucket,      bm->seq,           bm->seq_free,
                    bm->idmap,       bm->w_free,       bm->w_swap,        bm->match,
                    bm->p_slot,      bm->p_qo,         bm->p_kvlen,       bm->p_bindptr,
                    bm->p_bids,      bm->p_bids_retired, bm->p_row_block, bm->p_row_slot,
                    bm->p_job_block, bm->p_job_staged, bm->p_new_staging, bm->v_ref,
                    bm->v_mark};
  for (size_t i = 0; i < sizeof(arrays) / sizeof(arrays[0]); i++) kvc_host_free(ha, arrays[i]);
  kvc_host_free(ha, bm);
}

/* ---- sequence map (linear probing, backward-shift deletion: no tombstones) ----------------- */

static uint32_t id_home(const kvc_bm_t *bm, kvc_seq_id_t id) {
  return (uint32_t)kvc__mix64(id) & bm->idmask;
}

int32_t kvc__seq_find(const kvc_bm_t *bm, kvc_seq_id_t id) {
  for (uint32_t i = id_home(bm, id);; i = (i + 1) & bm->idmask) {
    int32_t s = bm->idmap[i];
    if (s < 0) return -1;
    if (bm->seq[s].id == id) return s;
  }
}

static void idmap_insert(kvc_bm_t *bm, int32_t slot) {
  uint32_t i = id_home(bm, bm->seq[slot].id);
  while (bm->idmap[i] >= 0) i = (i + 1) & bm->idmask;
  bm->idmap[i] = slot;
}

static void idmap_delete(kvc_bm_t *bm, kvc_seq_id_t id) {
  uint32_t i = id_home(bm, id);
  while (bm->seq[bm->idmap[i]].id != id) i = (i + 1) & bm->idmask;
  /* Pull later entries of the probe run back so that every lookup still finds its entry. */
  for (uint32_t j = (i + 1) & bm->idmask; bm->idmap[j] >= 0; j = (j + 1) & bm->idmask) {
    uint32_t home = id_home(bm, bm->seq[bm->idmap[j]].id);
    if (((j - home) & bm->idmask) >= ((j - i) & bm->idmask)) {
      bm->idmap[i] = bm->idmap[j];
      i = j;
    }
  }
  bm->idmap[i] = -1;
}

static int32_t slot_take(kvc_bm_t *bm, kvc_seq_id_t id) {
  int32_t slot = bm->seq_free[--bm->nseq_free];
  kvc__seq_t *s = &bm->seq[slot];
  memset(s, 0, sizeof(*s));
  s->id = id;
  idmap_insert(bm, slot);
  bm->live_seqs++;
  return slot;
}

static void slot_release(kvc_bm_t *bm, int32_t slot) {
  idmap_delete(bm, bm->seq[slot].id);
  bm->seq[slot].id = KVC_SEQ_NONE;
  bm->seq_free[bm->nseq_free++] = slot;
  bm->live_seqs--;
}

void kvc__prompt_release(kvc_bm_t *bm, kvc__prompt_t *p) {
  if (p && --p->refs == 0) kvc_host_free(bm->ha, p);
}

int32_t kvc__block_take(kvc_bm_t *bm, int32_t ntok) {
  int32_t b = bm->free_ids[--bm->nfree];
  kvc__block_t *blk = &bm->blk[b];
  blk->state = KVC__ACTIVE;
  blk->ref = 1;
  blk->ntok = ntok;
  blk->done_step = 0;
  bm->charged += bm->lw;
  bm->unmeasured += bm->lw;
  bm->active_blocks++;
  bm->tokens_stored += ntok;
  if (ntok < bm->cfg.block_tokens) bm->partial_tails++;
  return b;
}

/* ---- growth of block tables and of the plan's block-id array, prepared before committing ---- */

typedef struct grow {
  int32_t *table;   /* new table buffer, or NULL when the current one is big enough */
  int32_t table_cap;
  int32_t *bids;    /* new plan block-id buffer, or NULL */
  int64_t bids_cap;
} grow_t;

static void grow_abort(kvc_bm_t *bm, grow_t *g) {
  kvc_host_free(bm->ha, g->table);
  kvc_host_free(bm->ha, g->bids);
}

/* Prepares a table of at least `table_need` entries for a sequence whose table has `cap`, and a
 * plan block-id array for `bids_need` ids. KVC_OK or KVC_ERR_OUT_OF_HOST_MEMORY (nothing kept). */
static kvc_status_t grow_prepare(kvc_bm_t *bm, int32_t cap, int32_t table_need, int64_t bids_need,
                                 grow_t *g) {
  memset(g, 0, sizeof(*g));
  if (table_need > cap) {
    /* Doubling keeps a sequence that reserves a block at a time at O(1) amortized copies. */
    int64_t c = (int64_t)cap * 2;
    if (c < 4) c = 4;
    if (c < table_need) c = table_need;
    if (c > bm->max_table) c = bm->max_table;
    g->table_cap = (int32_t)c;
    g->table = kvc_host_malloc(bm->ha, (size_t)c * sizeof(int32_t));
    if (!g->table) return KVC_ERR_OUT_OF_HOST_MEMORY;
  }
  if (bids_need > bm->p_bids_cap) {
    int64_t c = bm->p_bids_cap * 2;
    if (c < 1024) c = 1024;
    if (c < bids_need) c = bids_need;
    g->bids_cap = c;
    g->bids = kvc_host_malloc(bm->ha, (size_t)c * sizeof(int32_t));
    if (!g->bids) {
      grow_abort(bm, g);
      return KVC_ERR_OUT_OF_HOST_MEMORY;
    }
  }
  return KVC_OK;
}

static void grow_commit(kvc_bm_t *bm, kvc__seq_t *s, grow_t *g) {
  if (g->table) {
    if (s->nblocks) memcpy(g->table, s->table, (size_t)s->nblocks * sizeof(int32_t));
    kvc_host_free(bm->ha, s->table);
    s->table = g->table;
    s->cap = g->table_cap;
  }
  if (g->bids) {
    /* The last plan's block_ids stay valid until the next plan. */
    if (bm->p_bids_handed) bm->p_bids_retired = bm->p_bids;
    else kvc_host_free(bm->ha, bm->p_bids);
    bm->p_bids_handed = 0;
    bm->p_bids = g->bids;
    bm->p_bids_cap = g->bids_cap;
  }
}

/* Room for a hook: the cached blocks to evict for `chunks` free chunks and `ids` unreserved block
 * ids (*evict), and a table of table_need entries for a sequence whose table has `cap` (and plan
 * arrays for bids_need ids), agreed with the other ranks. On KVC_OK the caller commits, evicting
 * *evict blocks first; on failure nothing changed. */
static kvc_status_t prepare_room(kvc_bm_t *bm, uint64_t chunks, int64_t ids, int32_t cap,
                                 int32_t table_need, int64_t bids_need, int64_t *evict,
                                 grow_t *g) {
  *evict = kvc__evictions_for(bm, chunks, ids);
  kvc_status_t st = *evict < 0 ? KVC_ERR_OUT_OF_MEMORY
                               : grow_prepare(bm, cap, table_need, bids_need, g);
  const kvc_status_t local = st;
  st = kvc_bm_agree(bm, st, evict);
  if (st != KVC_OK && local == KVC_OK) grow_abort(bm, g);
  return st;
}

/* ---- the per-request hooks ------------------------------------------------------------------ */

kvc_status_t kvc_bm_seq_add(kvc_bm_t *bm, kvc_seq_id_t id, const int32_t *tokens, int n_tokens,
                            uint64_t salt, int *n_cached, kvc_bm_work_t *work) {
  if (!bm || !work || !n_cached) return KVC_ERR_INVALID_ARGUMENT;
  work_clear(work);
  if (id == KVC_SEQ_NONE || n_tokens < 0 || n_tokens > bm->cfg.max_seq_len ||
      (n_tokens > 0 && !tokens) || kvc__seq_find(bm, id) >= 0)
    return KVC_ERR_INVALID_ARGUMENT;
  if (bm->nseq_free == 0) return KVC_ERR_OUT_OF_MEMORY;

  /* Longest run of cached blocks, always leaving the last prompt token to compute. */
  const int B = bm->cfg.block_tokens;
  int queries = 0, k = 0;
  uint64_t hash = 0, serial = 0;
  if (bm->cfg.prefix_caching && n_tokens > 0) {
    queries = (n_tokens - 1) >> bm->bshift;
    for (; k < queries; k++) {
      const int32_t *t = tokens + (size_t)k * B;
      uint64_t h = bm->hash_fn(hash, t, B, bm->cfg.codec_identity, salt);
      int32_t b = kvc__hash_find(bm, h, serial, salt, t);
      if (b < 0 || bm->blk[b].state == KVC__SWAPPED) break;
      bm->match[k] = b;
      hash = h;
      serial = bm->blk[b].serial;
    }
  }

  grow_t g;
  kvc_status_t st = grow_prepare(bm, 0, k, bm->table_blocks + k, &g);
  kvc__prompt_t *prompt = NULL;
  if (st == KVC_OK && bm->cfg.prefix_caching && n_tokens > 0) {
    int n = n_tokens - k * B;
    prompt = kvc_host_malloc(bm->ha, sizeof(*prompt) + (size_t)n * sizeof(int32_t));
    if (prompt) {
      prompt->refs = 1;
      prompt->start = k * B;
      prompt->n = n;
      memcpy(prompt->tok, tokens + (size_t)k * B, (size_t)n * sizeof(int32_t));
    } else {
      grow_abort(bm, &g);
      st = KVC_ERR_OUT_OF_HOST_MEMORY;
    }
  }
  const kvc_status_t local = st;
  st = kvc_bm_agree(bm, st, NULL);
  if (st != KVC_OK) {
    if (local == KVC_OK) {
      grow_abort(bm, &g);
      kvc_host_free(bm->ha, prompt);
    }
    return st;
  }

  int32_t slot = slot_take(bm, id);
  kvc__seq_t *s = &bm->seq[slot];
  grow_commit(bm, s, &g);
  for (int i = 0; i < k; i++) {
    int32_t b = bm->match[i];
    kvc__block_t *blk = &bm->blk[b];
    if (blk->state == KVC__CACHED) {
      kvc__lru_remove(bm, b);
      bm->cached_chunks -= kvc__charge(bm, blk);
      bm->ncached--;
      bm->active_blocks++;
      bm->tokens_stored += B;
      blk->state = KVC__ACTIVE;
    }
    blk->ref++;
    s->table[i] = b;
  }
  s->nblocks = k;
  s->len = s->reserved = k * B;
  s->salt = salt;
  s->last_hash = hash;
  s->last_serial = serial;
  s->chain_ok = 1;
  s->prompt = prompt;
  bm->table_blocks += k;
  bm->prefix_queries += queries;
  bm->prefix_hits += k;
  *n_cached = k * B;
  return KVC_OK;
}

kvc_status_t kvc_bm_seq_reserve(kvc_bm_t *bm, kvc_seq_id_t id, int n_new, int n_lookahead,
                                kvc_bm_work_t *work) {
  if (!bm || !work) return KVC_ERR_INVALID_ARGUMENT;
  work_clear(work);
  if (n_new < 0 || n_lookahead < 0) return KVC_ERR_INVALID_ARGUMENT;
  int32_t slot = kvc__seq_find(bm, id);
  if (slot < 0) return KVC_ERR_NOT_FOUND;
  kvc__seq_t *s = &bm->seq[slot];
  if (s->swapped || in_step(bm, s)) return KVC_ERR_INVALID_STATE;
  int64_t target = (int64_t)s->len + n_new + n_lookahead;
  if (target > bm->cfg.max_seq_len) return KVC_ERR_INVALID_ARGUMENT;
  if (target <= s->reserved) return KVC_OK;
  int32_t have = kvc__blocks_for(bm, s->reserved), want = kvc__blocks_for(bm, target);
  int32_t need = want - have;
  if (need == 0) {
    s->reserved = (int32_t)target;
    return KVC_OK;
  }
  uint64_t chunks = (uint64_t)need * bm->lw + (s->planned ? 0 : bm->wm_chunks);
  int64_t evict;
  grow_t g;
  kvc_status_t st =
      prepare_room(bm, chunks, need, s->cap, want, bm->table_blocks + need, &evict, &g);
  if (st != KVC_OK) return st;

  int nf = 0;
  kvc__evict(bm, evict, &nf);
  grow_commit(bm, s, &g);
  bm->reserved_ids += need;
  bm->table_blocks += need;
  s->reserved = (int32_t)target;
  work->free_blocks = bm->w_free;
  work->num_free = nf;
  return KVC_OK;
}

kvc_status_t kvc_bm_seq_fork(kvc_bm_t *bm, kvc_seq_id_t parent, kvc_seq_id_t child,
                             kvc_bm_work_t *work) {
  if (!bm || !work) return KVC_ERR_INVALID_ARGUMENT;
  work_clear(work);
  int32_t pslot = kvc__seq_find(bm, parent);
  if (pslot < 0) return KVC_ERR_NOT_FOUND;
  if (child == KVC_SEQ_NONE || kvc__seq_find(bm, child) >= 0) return KVC_ERR_INVALID_ARGUMENT;
  if (bm->seq[pslot].swapped || in_step(bm, &bm->seq[pslot])) return KVC_ERR_INVALID_STATE;
  if (bm->nseq_free == 0) return KVC_ERR_OUT_OF_MEMORY;
  const int B = bm->cfg.block_tokens;
  int tail = bm->seq[pslot].len & (B - 1);
  int32_t nblocks = bm->seq[pslot].nblocks;
  int64_t evict;
  grow_t g;
  kvc_status_t st = prepare_room(bm, tail ? bm->lw : 0, tail ? 1 : 0, 0, nblocks,
                                 bm->table_blocks + nblocks, &evict, &g);
  if (st != KVC_OK) return st;

  int nf = 0;
  kvc__evict(bm, evict, &nf);
  int32_t cslot = slot_take(bm, child);
  kvc__seq_t *p = &bm->seq[pslot], *c = &bm->seq[cslot];
  grow_commit(bm, c, &g);
  int32_t shared = tail ? nblocks - 1 : nblocks;
  for (int32_t i = 0; i < shared; i++) {
    c->table[i] = p->table[i];
    bm->blk[p->table[i]].ref++;
  }
  if (tail) {
    int32_t src = p->table[nblocks - 1], dst = kvc__block_take(bm, tail);
    c->table[nblocks - 1] = dst;
    if (bm->block_tok)
      memcpy(bm->block_tok + (size_t)dst * B, bm->block_tok + (size_t)src * B,
             (size_t)tail * sizeof(int32_t));
    work->copy_src = src;
    work->copy_dst = dst;
  }
  c->nblocks = nblocks;
  c->len = c->reserved = p->len;
  c->salt = p->salt;
  c->last_hash = p->last_hash;
  c->last_serial = p->last_serial;
  c->chain_ok = p->chain_ok;
  c->planned = p->planned;
  c->prompt = p->prompt;
  if (c->prompt) c->prompt->refs++;
  bm->table_blocks += nblocks;
  work->free_blocks = bm->w_free;
  work->num_free = nf;
  return KVC_OK;
}

kvc_status_t kvc_bm_seq_free(kvc_bm_t *bm, kvc_seq_id_t id, kvc_bm_work_t *work) {
  if (!bm || !work) return KVC_ERR_INVALID_ARGUMENT;
  work_clear(work);
  int32_t slot = kvc__seq_find(bm, id);
  if (slot < 0) return KVC_ERR_NOT_FOUND;
  kvc__seq_t *s = &bm->seq[slot];
  if (in_step(bm, s)) return KVC_ERR_INVALID_STATE;

  int nf = 0;
  /* Last block first: appended to the LRU first, so evicted before the blocks it extends. */
  for (int32_t i = s->nblocks - 1; i >= 0; i--) {
    int32_t b = s->table[i];
    kvc__block_t *blk = &bm->blk[b];
    if (--blk->ref > 0) continue;
    bm->tokens_stored -= blk->ntok;
    if (blk->state == KVC__ACTIVE && blk->hashed) {
      blk->state = KVC__CACHED;
      bm->active_blocks--;
      bm->ncached++;
      bm->cached_chunks += kvc__charge(bm, blk);
      kvc__lru_push(bm, b);
      continue;
    }
    uint64_t hash = blk->hashed ? blk->hash : 0;
    kvc__block_release(bm, b);
    bm->w_free[nf++] = b;
    kvc__event(bm, KVC_EVENT_BLOCK_REMOVED, b, hash);
  }
  int32_t unallocated = kvc__blocks_for(bm, s->reserved) - s->nblocks;
  bm->reserved_ids -= unallocated;
  bm->table_blocks -= s->nblocks + unallocated;
  if (s->swapped) bm->swapped_seqs--;
  kvc__prompt_release(bm, s->prompt);
  kvc_host_free(bm->ha, s->table);
  slot_release(bm, slot);
  work->free_blocks = bm->w_free;
  work->num_free = nf;
  return KVC_OK;
}

kvc_status_t kvc_bm_seq_swap_out(kvc_bm_t *bm, kvc_seq_id_t id, kvc_status_t space,
                                 kvc_bm_work_t *work) {
  if (!bm || !work) return KVC_ERR_INVALID_ARGUMENT;
  work_clear(work);
  if (bm->cfg.swap_bytes == 0) return KVC_ERR_UNSUPPORTED;
  int32_t slot = kvc__seq_find(bm, id);
  if (slot < 0) return KVC_ERR_NOT_FOUND;
  kvc__seq_t *s = &bm->seq[slot];
  if (s->swapped || in_step(bm, s)) return KVC_ERR_INVALID_STATE;
  uint64_t bytes = 0;
  for (int32_t i = 0; i < s->nblocks; i++) {
    const kvc__block_t *blk = &bm->blk[s->table[i]];
    if (blk->ref > 1) continue;
    if (blk->ntok == bm->cfg.block_tokens && blk->nmeasured < bm->cfg.num_layers)
      return KVC_ERR_INVALID_STATE;
    bytes += kvc__swap_bytes(bm, blk);
  }
  if (space == KVC_OK && bytes > bm->cfg.swap_bytes - bm->swap_used) space = KVC_ERR_OUT_OF_MEMORY;
  kvc_status_t st = kvc_bm_agree(bm, space, NULL);
  if (st != KVC_OK) return st;

  int ns = 0;
  for (int32_t i = 0; i < s->nblocks; i++) {
    int32_t b = s->table[i];
    kvc__block_t *blk = &bm->blk[b];
    if (blk->ref > 1) continue;
    bm->charged -= kvc__charge(bm, blk);
    bm->unmeasured -= (uint64_t)(bm->cfg.num_layers - blk->nmeasured) * bm->cfg.worst_page_chunks;
    bm->m_bytes -= blk->mbytes;
    bm->m_chunks -= blk->mchunks;
    bm->m_pages -= blk->nmeasured;
    bm->active_blocks--;
    if (blk->ntok < bm->cfg.block_tokens) bm->partial_tails--;
    bm->swapped_blocks++;
    blk->state = KVC__SWAPPED;
    bm->w_swap[ns++] = b;
  }
  int32_t unallocated = kvc__blocks_for(bm, s->reserved) - s->nblocks;
  bm->reserved_ids -= unallocated;
  bm->table_blocks -= unallocated;
  s->reserved = s->len;
  s->swapped = 1;
  bm->swapped_seqs++;
  bm->swap_outs++;
  bm->swap_used += bytes;
  work->swap_blocks = bm->w_swap;
  work->num_swap = ns;
  return KVC_OK;
}

kvc_status_t kvc_bm_seq_swap_in(kvc_bm_t *bm, kvc_seq_id_t id, kvc_bm_work_t *work) {
  if (!bm || !work) return KVC_ERR_INVALID_ARGUMENT;
  work_clear(work);
  if (bm->cfg.swap_bytes == 0) return KVC_ERR_UNSUPPORTED;
  int32_t slot = kvc__seq_find(bm, id);
  if (slot < 0) return KVC_ERR_NOT_FOUND;
  kvc__seq_t *s = &bm->seq[slot];
  if (!s->swapped) return KVC_ERR_INVALID_STATE;
  uint64_t need = bm->wm_chunks;
  for (int32_t i = 0; i < s->nblocks; i++) {
    const kvc__block_t *blk = &bm->blk[s->table[i]];
    if (blk->state == KVC__SWAPPED) need += kvc__charge(bm, blk);
  }
  int64_t evict = kvc__evictions_for(bm, need, 0);
  kvc_status_t st = kvc_bm_agree(bm, evict < 0 ? KVC_ERR_OUT_OF_MEMORY : KVC_OK, &evict);
  if (st != KVC_OK) return st;

  int nf = 0, ns = 0;
  kvc__evict(bm, evict, &nf);
  for (int32_t i = 0; i < s->nblocks; i++) {
    int32_t b = s->table[i];
    kvc__block_t *blk = &bm->blk[b];
    if (blk->state != KVC__SWAPPED) continue;
    bm->swap_used -= kvc__swap_bytes(bm, blk);
    bm->charged += kvc__charge(bm, blk);
    bm->unmeasured += (uint64_t)(bm->cfg.num_layers - blk->nmeasured) * bm->cfg.worst_page_chunks;
    bm->m_bytes += blk->mbytes;
    bm->m_chunks += blk->mchunks;
    bm->m_pages += blk->nmeasured;
    bm->active_blocks++;
    if (blk->ntok < bm->cfg.block_tokens) bm->partial_tails++;
    bm->swapped_blocks--;
    blk->state = KVC__ACTIVE;
    bm->w_swap[ns++] = b;
  }
  s->swapped = 0;
  bm->swapped_seqs--;
  bm->swap_ins++;
  work->free_blocks = bm->w_free;
  work->num_free = nf;
  work->swap_blocks = bm->w_swap;
  work->num_swap = ns;
  return KVC_OK;
}

kvc_status_t kvc_bm_seq_import(kvc_bm_t *bm, kvc_seq_id_t id, int length,
                               const uint32_t *page_bytes, const uint8_t *page_chunks,
                               kvc_status_t local, kvc_bm_work_t *work) {
  if (!bm || !work) return KVC_ERR_INVALID_ARGUMENT;
  work_clear(work);
  if (id == KVC_SEQ_NONE || kvc__seq_find(bm, id) >= 0) return KVC_ERR_INVALID_ARGUMENT;
  if (bm->nseq_free == 0) return KVC_ERR_OUT_OF_MEMORY;
  /* What the image says is this rank's own: from here on every failure is agreed. */
  const int B = bm->cfg.block_tokens, L = bm->cfg.num_layers;
  int32_t n = 0, full = 0;
  uint64_t chunks = bm->wm_chunks; /* full blocks at their pages, a tail at the worst case */
  kvc_status_t st = local;
  if (st == KVC_OK && (length < 1 || length > bm->cfg.max_seq_len)) st = KVC_ERR_INVALID_ARGUMENT;
  /* The ranks' images must be of one sequence: their lengths' largest and smallest must agree
   * (a first exchange, which every rank makes; -1 for an image this rank could not read). */
  if (bm->agree_fn) {
    const int64_t mine = st == KVC_OK ? length : -1;
    int64_t v[2] = {mine, -mine};
    if (bm->agree_fn(bm->agree_user, v, 2) != 0 || v[0] < mine || -v[1] > mine)
      return KVC_ERR_NCCL;
    if (st == KVC_OK && v[0] != -v[1]) st = KVC_ERR_INVALID_ARGUMENT;
  }
  if (st == KVC_OK) {
    n = kvc__blocks_for(bm, length), full = length / B;
    chunks += full < n ? bm->lw : 0;
    if (full > 0 && (!page_bytes || !page_chunks)) st = KVC_ERR_INVALID_ARGUMENT;
    for (size_t i = 0; st == KVC_OK && i < (size_t)full * (size_t)L; i++) {
      if (page_bytes[i] == 0 || page_chunks[i] > bm->cfg.worst_page_chunks)
        st = KVC_ERR_INVALID_ARGUMENT;
      chunks += page_chunks[i];
    }
  }
  int64_t evict = 0;
  grow_t g;
  st = st == KVC_OK ? prepare_room(bm, chunks, n, 0, n, bm->table_blocks + n, &evict, &g)
                    : kvc_bm_agree(bm, st, NULL);
  if (st != KVC_OK) return st;

  int nf = 0;
  kvc__evict(bm, evict, &nf);
  kvc__seq_t *s = &bm->seq[slot_take(bm, id)];
  grow_commit(bm, s, &g);
  for (int32_t i = 0; i < n; i++) {
    const int32_t b = kvc__block_take(bm, i < full ? B : length - full * B);
    s->table[i] = b;
    bm->w_swap[i] = b;
    for (int l = 0; i < full && l < L; l++) {
      const size_t at = (size_t)i * L + l;
      kvc_bm_page_measured(bm, b, l, page_bytes[at], page_chunks[at]);
    }
  }
  s->nblocks = n;
  s->len = s->reserved = length;
  s->planned = 1; /* it holds its blocks, as a running sequence does */
  bm->table_blocks += n;
  work->free_blocks = bm->w_free;
  work->num_free = nf;
  work->swap_blocks = bm->w_swap;
  work->num_swap = n;
  return KVC_OK;
}

kvc_status_t kvc_bm_seq_info(const kvc_bm_t *bm, kvc_seq_id_t id, kvc_seq_info_t *out) {
  if (!bm || !out) return KVC_ERR_INVALID_ARGUMENT;
  int32_t slot = kvc__seq_find(bm, id);
  if (slot < 0) return KVC_ERR_NOT_FOUND;
  const kvc__seq_t *s = &bm->seq[slot];
  int shared = 0;
  for (int32_t i = 0; i < s->nblocks; i++) shared += bm->blk[s->table[i]].ref > 1;
  out->length = s->len;
  out->reserved = s->reserved;
  out->num_blocks = s->nblocks;
  out->shared_blocks = shared;
  out->state = s->swapped ? KVC_SEQ_SWAPPED : KVC_SEQ_RUNNING;
  return KVC_OK;
}

kvc_status_t kvc_bm_seq_blocks(const kvc_bm_t *bm, kvc_seq_id_t id, const int32_t **blocks,
                               int *n) {
  if (!bm || !blocks || !n) return KVC_ERR_INVALID_ARGUMENT;
  int32_t slot = kvc__seq_find(bm, id);
  if (slot < 0) return KVC_ERR_NOT_FOUND;
  *blocks = bm->seq[slot].table;
  *n = bm->seq[slot].nblocks;
  return KVC_OK;
}

int64_t kvc_bm_tokens_fit(const kvc_bm_t *bm) {
  uint64_t avail = kvc__free_chunks(bm) + bm->cached_chunks;
  avail = avail > bm->wm_chunks ? avail - bm->wm_chunks : 0;
  uint64_t per_block = bm->lw;
  if (bm->m_pages > 0) {
    /* A block's layers at the average measured page, rounded up once per block: packed pages
     * take fractions of a chunk on average, and some take none. */
    const uint64_t L = (uint64_t)bm->cfg.num_layers, m = bm->m_pages;
    per_block = (bm->m_chunks * L + m - 1) / m;
    if (per_block < 1) per_block = 1;
  }
  int64_t blocks = (int64_t)(avail / per_block);
  int64_t ids = bm->nfree - bm->reserved_ids + bm->ncached;
  if (blocks > ids) blocks = ids;
  return blocks * bm->cfg.block_tokens;
}

void kvc_bm_get_stats(const kvc_bm_t *bm, kvc_bm_stats_t *out) {
  memset(out, 0, sizeof(*out));
  out->free_chunks = (uint32_t)kvc__free_chunks(bm);
  out->charged_chunks = (uint32_t)bm->charged;
  out->reserved_chunks = (uint32_t)((uint64_t)bm->reserved_ids * bm->lw);
  out->unmeasured_chunks = (uint32_t)bm->unmeasured;
  out->measured_page_bytes = bm->m_bytes;
  out->measured_page_chunks = (uint32_t)bm->m_chunks;
  out->measured_pages = bm->m_pages;
  out->active_blocks = bm->active_blocks;
  out->cached_blocks = bm->ncached;
  out->swapped_blocks = bm->swapped_blocks;
  out->free_block_ids = bm->nfree;
  out->live_seqs = bm->live_seqs;
  out->swapped_seqs = bm->swapped_seqs;
  out->tokens_stored = bm->tokens_stored;
  out->prefix_queries = bm->prefix_queries;
  out->prefix_hits = bm->prefix_hits;
  out->evictions = bm->evictions;
  out->swap_outs = bm->swap_outs;
  out->swap_ins = bm->swap_ins;
  out->swap_used_bytes = bm->swap_used;
  out->host_bytes = kvc_host_alloc_bytes(bm->ha);
  out->cached_chunks = (uint32_t)bm->cached_chunks;
  out->staging_blocks = bm->partial_tails;
  out->ignored_measurements = bm->ignored_measurements;
}

void kvc_bm_set_event_sink(kvc_bm_t *bm, kvc_bm_event_fn fn, void *user) {
  bm->event_fn = fn;
  bm->event_user = user;
}

void kvc_bm_set_agreement(kvc_bm_t *bm, kvc_tp_allreduce_fn fn, void *user) {
  bm->agree_fn = fn;
  bm->agree_user = user;
}

kvc_status_t kvc_bm_agree(kvc_bm_t *bm, kvc_status_t st, int64_t *evict) {
  if (!bm->agree_fn) return st;
  const int64_t own = evict ? *evict : 0;
  int64_t v[2] = {(int64_t)st, own};
  if (bm->agree_fn(bm->agree_user, v, 2) != 0) return KVC_ERR_NCCL;
  /* Ranks in step hold the same cached blocks: a result no rank could have sent means they are
   * not, or the all-reduce is not a maximum (below this rank's own values). */
  if (v[0] < (int64_t)st || v[0] >= KVC_STATUS_COUNT || v[1] < own || v[1] > bm->ncached)
    return KVC_ERR_NCCL;
  if (evict) *evict = v[1];
  return (kvc_status_t)v[0];
}
