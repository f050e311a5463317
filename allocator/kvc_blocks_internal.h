/*
 * Internals of the block manager (kvc_blocks.h), shared by its source files:
 *   kvc_blocks.c         create/destroy, sequences (add, reserve, fork, free, swap), capacity, stats
 *   kvc_prefix_cache.c   block hash, the hash table of cached blocks, LRU eviction
 *   kvc_blocks_plan.c    plan / step_done / page measurements
 *   kvc_blocks_validate.c  the invariant checker
 *
 * Accounting, in pool chunks (LW = num_layers * worst_page_chunks, the charge of a block none of
 * whose pages is measured):
 *   charged   = sum over ACTIVE and CACHED blocks of charge(b),
 *               charge(b) = mchunks(b) + (num_layers - nmeasured(b)) * worst_page_chunks
 *   reserved  = reserved_ids * LW, reserved_ids = sum over sequences of
 *               ceil(reserved / block_tokens) - nblocks (blocks a reservation may still allocate)
 *   free      = total_chunks - charged - reserved
 * SWAPPED blocks are charged nothing (their pages are in host swap). Block ids are a second
 * resource: free ids - reserved_ids is what new reservations can take (plus evictable blocks).
 *
 * Every mutating entry point first checks arguments and capacity and allocates whatever it needs
 * (nothing is installed yet), then commits with operations that cannot fail.
 */
#ifndef KVC_BLOCKS_INTERNAL_H
#define KVC_BLOCKS_INTERNAL_H

#include <stdint.h>

#include "allocator/kvc_blocks.h"

enum { KVC__FREE = 0, KVC__ACTIVE = 1, KVC__CACHED = 2, KVC__SWAPPED = 3 };

typedef struct kvc__block {
  uint64_t hash;          /* chained prefix hash; meaningful when `hashed` */
  uint64_t serial;        /* unique identity of this cache entry (never reused); 0: none */
  uint64_t parent_serial; /* serial of the entry this block's hash chains from; 0: the root */
  uint64_t salt;
  uint64_t done_step;     /* step that filled the block (its pages were compressed then) */
  uint64_t mbytes;        /* sum of measured page bytes over layers */
  int32_t ref;            /* block tables referencing it */
  int32_t hnext;          /* next block in its hash bucket, -1 */
  int32_t lru_prev, lru_next; /* CACHED blocks, oldest first; -1 */
  uint32_t mchunks;       /* sum of measured page chunks over layers */
  int32_t nmeasured;      /* layers whose page size is known */
  int32_t ntok;           /* tokens in the block (block_tokens when full) */
  uint8_t state;
  uint8_t hashed;         /* in the prefix hash table */
} kvc__block_t;

/* The prompt tokens a sequence has not computed yet, for hashing the blocks they complete;
 * shared (reference counted) between a sequence and its forks. */
typedef struct kvc__prompt {
  int32_t refs;
  int32_t start;          /* position of tok[0] in the sequence */
  int32_t n;
  int32_t tok[];
} kvc__prompt_t;

typedef struct kvc__seq {
  kvc_seq_id_t id;        /* KVC_SEQ_NONE: slot unused */
  int32_t *table;         /* [cap] block ids, nblocks used */
  int32_t nblocks, cap;
  int32_t len, reserved;
  uint64_t salt;
  uint64_t last_hash;     /* hash of the last full block (chain state); 0 before the first */
  uint64_t last_serial;   /* cache entry the next full block chains from */
  kvc__prompt_t *prompt;  /* NULL without prefix caching or once no prompt token is pending */
  uint64_t step;          /* last step it was planned in (in the open step when == bm->step) */
  uint64_t mark;          /* duplicate check of the plan being built */
  uint8_t swapped;
  uint8_t planned;        /* has been in a step: its reserves no longer count as admission */
  uint8_t chain_ok;       /* every token so far is known: blocks it completes can be hashed */
} kvc__seq_t;

struct kvc_bm {
  kvc_bm_config_t cfg;
  kvc_host_alloc_t *ha;
  int bshift;             /* log2(block_tokens) */
  uint32_t lw;            /* num_layers * worst_page_chunks */
  uint32_t wm_chunks;     /* watermark in chunks */
  int32_t max_table;      /* ceil(max_seq_len / block_tokens) */

  /* Blocks. */
  kvc__block_t *blk;      /* [max_blocks] */
  uint8_t *pg_chunks;     /* [max_blocks * num_layers] measured chunks (a packed page: 0 or more) */
  uint32_t *pg_bytes;     /* [max_blocks * num_layers] measured bytes, 0: not measured */
  int32_t *block_tok;     /* [max_blocks * block_tokens] token ids (prefix caching only) */
  int32_t *free_ids;      /* [max_blocks] stack */
  int32_t nfree;

  /* Prefix cache: hash table (chained through blk[].hnext) and LRU of CACHED blocks. */
  int32_t *hbucket;       /* [hmask + 1] */
  uint32_t hmask;
  int64_t nhashed;
  int32_t lru_head, lru_tail;
  int64_t ncached;
  uint64_t cached_chunks; /* charge of CACHED blocks: what eviction can give back */
  uint64_t serial_next;
  kvc_bm_hash_fn hash_fn;

  /* Sequences: slots, free slots, and an open-addressing map id -> slot. */
  kvc__seq_t *seq;        /* [max_seqs] */
  int32_t *seq_free;      /* [max_seqs] stack */
  int32_t nseq_free;
  int32_t *idmap;         /* [idmask + 1], -1 empty */
  uint32_t idmask;
  int64_t table_blocks;   /* sum over live sequences of max(nblocks, ceil(reserved/B)) */

  /* Accounting (see the top of this file). */
  uint64_t charged;
  int64_t reserved_ids;
  uint64_t unmeasured;    /* part of `charged` at the worst case */
  uint64_t m_bytes;       /* measured pages of ACTIVE and CACHED blocks */
  uint64_t m_chunks;
  int64_t m_pages;
  size_t swap_used;

  int64_t active_blocks, swapped_blocks, live_seqs, swapped_seqs, tokens_stored, partial_tails;
  int64_t prefix_queries, prefix_hits, evictions, swap_outs, swap_ins, ignored_measurements;

  /* Steps. */
  uint64_t step;          /* number of the last planned step */
  int step_open;
  uint64_t plan_mark;     /* bumped by every kvc_bm_plan call, failed ones included */

  /* Work handed to the caller. */
  int32_t *w_free;        /* [max_blocks] */
  int32_t *w_swap;        /* [max_blocks] */
  int32_t *match;         /* [max_table] prefix lookup scratch */

  /* Plan arrays, reused every step. */
  int32_t *p_slot;        /* [max_seqs] sequence slot of each batch entry */
  int32_t *p_qo, *p_kvlen, *p_bindptr;  /* [max_seqs + 1] */
  int32_t *p_bids;        /* [p_bids_cap], grown by add/reserve/fork to cover table_blocks */
  int64_t p_bids_cap;
  int32_t *p_bids_retired;/* replaced while the last plan still points to it; freed by the next */
  int p_bids_handed;      /* p_bids is what the last plan returned */
  int32_t *p_row_block, *p_row_slot;             /* [max_batch_tokens] */
  int32_t *p_job_block, *p_job_staged;           /* [max_jobs] */
  int32_t max_jobs;
  int32_t *p_new_staging;                        /* [max_seqs] */

  /* Validation scratch (written by kvc_bm_validate through the const handle's pointers). */
  int32_t *v_ref;         /* [max_blocks] */
  int32_t *v_mark;        /* [max_blocks] */

  kvc_bm_event_fn event_fn;
  void *event_user;
  kvc_tp_allreduce_fn agree_fn; /* kvc_bm_set_agreement; NULL: this manager decides alone */
  void *agree_user;
};

static inline uint64_t kvc__mix64(uint64_t x) {
  x ^= x >> 32;
  x *= 0xd6e8feb86659fd93ull;
  x ^= x >> 32;
  x *= 0xd6e8feb86659fd93ull;
  x ^= x >> 32;
  return x;
}

static inline int32_t kvc__blocks_for(const kvc_bm_t *bm, int64_t tokens) {
  return (int32_t)((tokens + bm->cfg.block_tokens - 1) >> bm->bshift);
}

static inline uint32_t kvc__charge(const kvc_bm_t *bm, const kvc__block_t *b) {
  return b->mchunks + (uint32_t)(bm->cfg.num_layers - b->nmeasured) * bm->cfg.worst_page_chunks;
}

static inline uint64_t kvc__free_chunks(const kvc_bm_t *bm) {
  return (uint64_t)bm->cfg.total_chunks - bm->charged - (uint64_t)bm->reserved_ids * bm->lw;
}

/* Host swap bytes of a block: its measured pages, or a staging page per layer for a tail. */
static inline uint64_t kvc__swap_bytes(const kvc_bm_t *bm, const kvc__block_t *b) {
  return b->ntok == bm->cfg.block_tokens ? b->mbytes
                                         : (uint64_t)bm->cfg.staging_bytes * bm->cfg.num_layers;
}

static inline void kvc__event(kvc_bm_t *bm, kvc_event_kind_t kind, int32_t block, uint64_t hash) {
  if (bm->event_fn) bm->event_fn(bm->event_user, kind, block, hash);
}

/* Slot of sequence `id`, or -1. */
int32_t kvc__seq_find(const kvc_bm_t *bm, kvc_seq_id_t id);
/* Takes a free block id for `ntok` new tokens of a sequence: ACTIVE, one reference, charged the
 * worst case. The caller has made sure an id is free. */
int32_t kvc__block_take(kvc_bm_t *bm, int32_t ntok);
void kvc__prompt_release(kvc_bm_t *bm, kvc__prompt_t *p);

/* Prefix cache (kvc_prefix_cache.c). */
void kvc__hash_insert(kvc_bm_t *bm, int32_t b);
void kvc__hash_remove(kvc_bm_t *bm, int32_t b);
/* The entry equal to (hash, parent_serial, salt, tokens), or -1. Includes SWAPPED entries. */
int32_t kvc__hash_find(const kvc_bm_t *bm, uint64_t hash, uint64_t parent_serial, uint64_t salt,
                       const int32_t *tokens);
void kvc__lru_push(kvc_bm_t *bm, int32_t b);
void kvc__lru_remove(kvc_bm_t *bm, int32_t b);
/* How many CACHED blocks, least recently used first, must be evicted to leave `chunks` free
 * chunks (beyond the reservations) and `ids` unreserved block ids; -1 when all of them would not.
 * kvc__evict evicts the n least recently used (n <= ncached), appending them to w_free at
 * *nfree. */
int64_t kvc__evictions_for(const kvc_bm_t *bm, uint64_t chunks, int64_t ids);
void kvc__evict(kvc_bm_t *bm, int64_t n, int *nfree);
/* Returns a block that no table references to the free-id list (its pages are released by the
 * caller's free work), dropping its charge and measurements. */
void kvc__block_release(kvc_bm_t *bm, int32_t b);

#endif /* KVC_BLOCKS_INTERNAL_H */
