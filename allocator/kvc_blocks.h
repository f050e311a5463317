/*
 * The block manager: host-side bookkeeping of blocks, sequences, the prefix cache and the pool's
 * capacity. It does no device work and touches no page bytes: a call that needs device work (free a
 * block's pages, copy a tail, swap) describes it in a kvc_bm_work_t that the caller executes, in
 * order, on the backend, before its next call into the block manager.
 *
 * Blocks. Block ids are int32 in [0, max_blocks), the same for every layer. A block is
 *   FREE      on the free-id list;
 *   ACTIVE    referenced by >= 1 sequence (a sequence's last block may be partial: its tail;
 *             a block shared when a sequence was swapped out stays ACTIVE);
 *   CACHED    full, hashed, referenced by no sequence: kept for prefix hits until evicted (LRU);
 *   SWAPPED   owned by a swapped-out sequence; its pages are in host swap memory.
 * Full blocks are immutable and shared by reference count; only a tail is ever written.
 *
 * Capacity is counted in pool chunks (allocator/kvc_pool_layout.h). Every block that holds pages is
 * charged, per layer, its measured page size in chunks, or the worst case (worst_page_chunks, which
 * is >= staging_chunks) while that size is not known yet: tails, and pages compressed in a step
 * whose sizes have not been read back. Reservations are charged the worst case for each block they
 * may still need. The pool can therefore never run out of chunks for work the manager has allowed.
 * Block ids are counted the same way: a reservation also holds the ids its blocks will take.
 *
 * Reservations. A sequence may grow to `reserved` tokens (kvc_seq_info_t); blocks are allocated
 * lazily by kvc_bm_plan out of the reservation, which meanwhile holds their worst-case charge.
 * Admission is a reserve on a sequence that has never been planned (a new sequence, with or
 * without a cached prefix): it must also leave the watermark free, as must kvc_bm_seq_swap_in.
 * A reservation or fork that lacks room evicts CACHED blocks, least recently used first.
 *
 * Prefix cache. A full block's hash chains (parent block's hash, its token ids, codec_identity,
 * salt); a hit also compares the tokens, the salt and the identity of the parent entry, so a hash
 * collision never aliases two different prefixes. A freed sequence's hashed blocks become CACHED
 * with its last block first in eviction order. Blocks of a swapped-out sequence are never handed
 * out by a lookup. Costs block_tokens * 4 bytes of host memory per block id when enabled.
 *
 * Errors: every call that fails changes nothing (sequences, blocks, statistics, host bytes).
 * Not thread-safe: one caller at a time (the cache serializes).
 */
#ifndef KVC_BLOCKS_H
#define KVC_BLOCKS_H

#include <stddef.h>
#include <stdint.h>

#include "allocator/kvc_host_alloc.h"
#include "kvcomp.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvc_bm kvc_bm_t;

typedef struct kvc_bm_config {
  int num_layers;
  int block_tokens;            /* a power of two, 1..4096 */
  int max_seqs;
  int max_seq_len;
  int32_t max_blocks;          /* block ids are [0, max_blocks) */
  uint32_t total_chunks;       /* chunks in the pool */
  uint32_t staging_chunks;     /* chunks of one staging page (one layer) */
  uint32_t worst_page_chunks;  /* chunks of the largest page of one layer, >= staging_chunks,
                                  <= KVC_PAGE_MAX_CHUNKS; num_layers * worst_page_chunks plus the
                                  watermark must fit in total_chunks (else INVALID_ARGUMENT) */
  uint32_t staging_bytes;      /* bytes of one staging page (one layer) */
  float watermark;             /* fraction of total_chunks kept free when admitting (rounded to
                                  the nearest chunk) */
  int prefix_caching;
  uint64_t codec_identity;     /* codec, policy and bounds: part of every block hash */
  size_t swap_bytes;           /* host swap capacity; 0 disables swap */
  int max_batch_tokens;        /* >= 1: new tokens one plan may hold (plan arrays are sized once) */
} kvc_bm_config_t;

/* Device work a call asks for, to run in this order. Arrays are owned by the block manager and
 * valid until its next call. */
typedef struct kvc_bm_work {
  const int32_t *free_blocks;  /* release every layer's page of these blocks (push their chunks);
                                  for a block of a swapped-out sequence, its host swap copy */
  int num_free;
  int32_t copy_src;            /* -1, or: copy every layer's staging page of copy_src into a new */
  int32_t copy_dst;            /*   staging page of copy_dst (fork of a partial tail) */
  const int32_t *swap_blocks;  /* swap_out: copy these blocks' pages to host, then free them;
                                  swap_in: take chunks and copy them back (same ids) */
  int num_swap;
} kvc_bm_work_t;

/* One planned step; arrays owned by the block manager, valid until the next kvc_bm_plan. */
typedef struct kvc_bm_plan {
  uint64_t step;                /* number of this step (1, 2, ...), for kvc_bm_page_measured_step */
  int num_seqs;
  int total_rows;               /* new tokens over the batch */
  int max_kv_len;
  /* CSR block tables after this step, as kvc_attn_args_t wants them. */
  const int32_t *qo_indptr;     /* [num_seqs + 1] */
  const int32_t *kv_len;        /* [num_seqs] */
  const int32_t *block_indptr;  /* [num_seqs + 1] */
  const int32_t *block_ids;     /* [block_indptr[num_seqs]] */
  /* Where each new token row goes. */
  const int32_t *row_block;     /* [total_rows] block id */
  const int32_t *row_slot;      /* [total_rows] token slot in the block, 0..block_tokens-1 */
  /* Blocks that become full this step: each is one compress job. */
  int num_jobs;
  const int32_t *job_block;     /* [num_jobs] */
  const int32_t *job_staged;    /* [num_jobs] tokens the block held before this step (0: the
                                   block is new and has no staging page yet) */
  /* Blocks left partial by this step that had no staging page yet. */
  int num_new_staging;
  const int32_t *new_staging;
} kvc_bm_plan_t;

/* A batch as the block manager sees it (validated by the caller for NULLs). */
typedef struct kvc_bm_batch {
  int num_seqs;
  const kvc_seq_id_t *seq_ids;
  const int32_t *num_new_tokens;
  const int32_t *token_ids;     /* may be NULL */
} kvc_bm_batch_t;

typedef struct kvc_bm_stats {
  uint32_t free_chunks;         /* chunks not charged to anything */
  uint32_t charged_chunks;      /* to blocks (measured or worst case) */
  uint32_t reserved_chunks;     /* to reservations for blocks not allocated yet */
  uint32_t unmeasured_chunks;   /* part of charged_chunks still at the worst case */
  uint64_t measured_page_bytes; /* exact bytes of measured pages */
  uint32_t measured_page_chunks;/* chunks those pages occupy */
  int64_t measured_pages;
  int64_t active_blocks, cached_blocks, swapped_blocks, free_block_ids;
  int64_t live_seqs, swapped_seqs;
  int64_t tokens_stored;
  int64_t prefix_queries, prefix_hits, evictions, swap_outs, swap_ins;
  size_t swap_used_bytes;
  size_t host_bytes;            /* live bytes of the host allocator `ha` (all its users) */
  uint32_t cached_chunks;       /* part of charged_chunks held by CACHED blocks (evictable) */
  int64_t staging_blocks;       /* partial tail blocks in the pool (each has a staging page per
                                   layer once its step is done) */
  int64_t ignored_measurements; /* kvc_bm_page_measured calls that matched no pending page */
} kvc_bm_stats_t;

/* KVC_OK, KVC_ERR_INVALID_ARGUMENT, KVC_ERR_OUT_OF_HOST_MEMORY. `ha` must outlive the manager. */
kvc_status_t kvc_bm_create(const kvc_bm_config_t *cfg, kvc_host_alloc_t *ha, kvc_bm_t **out);
void kvc_bm_destroy(kvc_bm_t *bm);

/* The public per-request hooks (kvcomp.h documents their semantics and statuses). Each fills
 * *work (never NULL) with the device work to do; on failure *work is empty and nothing changed.
 * Also KVC_ERR_OUT_OF_HOST_MEMORY from add, reserve and fork (block tables grow there, so that
 * kvc_bm_plan never allocates). A forked child's reservation is its length: reserve before
 * growing it. Swapping out releases the sequence's reservation (reserve again after swap-in).
 * Freeing a swapped-out sequence lists its swapped blocks in work->free_blocks. */
kvc_status_t kvc_bm_seq_add(kvc_bm_t *bm, kvc_seq_id_t id, const int32_t *tokens, int n_tokens,
                            uint64_t salt, int *n_cached, kvc_bm_work_t *work);
kvc_status_t kvc_bm_seq_reserve(kvc_bm_t *bm, kvc_seq_id_t id, int n_new, int n_lookahead,
                                kvc_bm_work_t *work);
kvc_status_t kvc_bm_seq_fork(kvc_bm_t *bm, kvc_seq_id_t parent, kvc_seq_id_t child,
                             kvc_bm_work_t *work);
kvc_status_t kvc_bm_seq_free(kvc_bm_t *bm, kvc_seq_id_t id, kvc_bm_work_t *work);
/* Swap space is accounted from measured page bytes (staging_bytes per layer for a tail): the
 * caller measures every page of the sequence first (KVC_ERR_INVALID_STATE otherwise). Only blocks
 * the sequence alone references move; shared blocks stay in the pool. `space` is the outcome of
 * the caller's own placement of the swap copies (KVC_OK or KVC_ERR_OUT_OF_MEMORY), failed and
 * agreed with the manager's check (kvc_bm_set_agreement). */
kvc_status_t kvc_bm_seq_swap_out(kvc_bm_t *bm, kvc_seq_id_t id, kvc_status_t space,
                                 kvc_bm_work_t *work);
kvc_status_t kvc_bm_seq_swap_in(kvc_bm_t *bm, kvc_seq_id_t id, kvc_bm_work_t *work);
/* A sequence brought in from another cache (kvc_seq_import): `length` tokens in
 * ceil(length / block_tokens) new blocks, the full ones holding pages of page_bytes and
 * page_chunks [full blocks][num_layers] (charged as measured), a partial last one a staging page
 * per layer. An admission: it also keeps the watermark free, evicts cached blocks for room and
 * agrees (kvc_bm_set_agreement). Its blocks are not in the prefix cache, nor will the blocks it
 * completes later be (their token ids are unknown); its reservation is its length.
 * work->swap_blocks lists the new blocks in table order, for the copy of their pages. `local` is
 * the outcome of the caller's own reading of the image (KVC_OK, or why it cannot be imported:
 * then length and the arrays are not read), failed and agreed with the manager's checks. With an
 * agreement it exchanges twice: first the lengths (images of different lengths on different
 * ranks are KVC_ERR_INVALID_ARGUMENT everywhere), then the outcome.
 * KVC_ERR_INVALID_ARGUMENT (id in use or KVC_SEQ_NONE, length out of 1..max_seq_len, a page of 0
 * bytes or more than worst_page_chunks), KVC_ERR_OUT_OF_MEMORY (max_seqs, pool, block ids),
 * KVC_ERR_OUT_OF_HOST_MEMORY, or `local`. */
kvc_status_t kvc_bm_seq_import(kvc_bm_t *bm, kvc_seq_id_t id, int length,
                               const uint32_t *page_bytes, const uint8_t *page_chunks,
                               kvc_status_t local, kvc_bm_work_t *work);
kvc_status_t kvc_bm_seq_info(const kvc_bm_t *bm, kvc_seq_id_t id, kvc_seq_info_t *out);

/* Plans a step (kvc_plan's checks and statuses; more than max_batch_tokens new tokens is
 * KVC_ERR_INVALID_ARGUMENT); the step is open until kvc_bm_step_done. While a step is open,
 * sequences in it cannot be reserved, forked, freed or swapped (KVC_ERR_INVALID_STATE) and no other
 * step can be planned. Blocks completed by the step enter the prefix cache here when their token
 * ids are known: from batch->token_ids, else from the prompt given to kvc_bm_seq_add; once a
 * sequence has a token whose id is unknown, none of its later blocks is cached. Emits
 * KVC_EVENT_BLOCK_STORED per completed block. Allocates nothing; O(rows + blocks in the batch). */
kvc_status_t kvc_bm_plan(kvc_bm_t *bm, const kvc_bm_batch_t *batch, kvc_bm_plan_t *plan);
void kvc_bm_step_done(kvc_bm_t *bm);
int kvc_bm_step_open(const kvc_bm_t *bm);
/* The groups of `plan`'s sequences that share a prefix (kvc_attn_args_t's cascade): sequences
 * whose tables start with the same block, at least two, each with a whole block before its first
 * query row; a group's prefix is the whole blocks that all its members hold at the same places
 * before their first query rows (at least one). Writes seq_group [num_seqs] (each sequence's
 * group, -1 for none) and group_blocks [groups] (each group's prefix blocks); scratch: num_seqs
 * values. Returns the number of groups (<= num_seqs / 2). O(n log n + the blocks shared). */
int kvc_bm_plan_prefix_groups(const kvc_bm_plan_t *plan, int block_tokens, int32_t *seq_group,
                              int32_t *group_blocks, uint64_t *scratch);

/* A page's size became known: its charge drops from the worst case to `nchunks`. Applies only to
 * a full ACTIVE or CACHED block whose page of `layer` is not measured yet, with
 * nbytes > 0 and nchunks <= worst_page_chunks (0 for a page packed into chunks its block already
 * holds); anything else is counted in stats.ignored_measurements.
 * Sizes read back asynchronously can arrive after their block was freed and its id reused:
 * kvc_bm_page_measured_step ignores a size unless the block was filled in step `step`
 * (kvc_bm_plan_t.step of the plan that made it a compress job). */
void kvc_bm_page_measured(kvc_bm_t *bm, int32_t block, int layer, uint32_t nbytes,
                          uint32_t nchunks);
void kvc_bm_page_measured_step(kvc_bm_t *bm, uint64_t step, int32_t block, int layer,
                               uint32_t nbytes, uint32_t nchunks);

/* Conservative token capacity from the measured average page size (kvc_tokens_fit): free and
 * evictable chunks beyond the watermark over a block's charge at the average measured page size
 * (num_layers pages, rounded up to a whole chunk, at least one; the worst case before any page is
 * measured), also bounded by block ids. */
int64_t kvc_bm_tokens_fit(const kvc_bm_t *bm);

/* The block table of `id` (block ids in order, the tail last); valid until the next call. */
kvc_status_t kvc_bm_seq_blocks(const kvc_bm_t *bm, kvc_seq_id_t id, const int32_t **blocks,
                               int *n);

void kvc_bm_get_stats(const kvc_bm_t *bm, kvc_bm_stats_t *out);

/* Checks every invariant; KVC_OK or KVC_ERR_INTERNAL with a message written to why[cap]. */
kvc_status_t kvc_bm_validate(const kvc_bm_t *bm, char *why, size_t cap);

/* Events, delivered synchronously to a caller-provided sink (NULL: none): BLOCK_STORED per block
 * completed by a plan, BLOCK_REMOVED per block freed by kvc_bm_seq_free (in work->free_blocks
 * order), BLOCK_EVICTED per cached block evicted. hash is 0 for a block that is not in the prefix
 * cache (a block whose tokens are unknown, or a duplicate of an existing entry). */
typedef void (*kvc_bm_event_fn)(void *user, kvc_event_kind_t kind, int32_t block, uint64_t hash);
void kvc_bm_set_event_sink(kvc_bm_t *bm, kvc_bm_event_fn fn, void *user);

/* Tensor parallelism (kvcomp.h, "Tensor parallelism"): every rank's manager is given the same
 * calls, and whatever in them depends on this rank alone (its page sizes, its host memory, its
 * swap space) is agreed with the other ranks through `fn` between a hook's checks and its commit:
 * add, reserve, fork and swap-in each call it exactly once when their deterministic checks pass,
 * and all ranks then fail or commit alike, evicting the same cached blocks. NULL: none. */
void kvc_bm_set_agreement(kvc_bm_t *bm, kvc_tp_allreduce_fn fn, void *user);
/* One agreement: KVC_OK when every rank's st is KVC_OK, else the largest status of any rank
 * (KVC_ERR_NCCL when the exchange itself fails or returns what no rank in step could have sent:
 * a status or fewer evictions below this rank's own, more evictions than its cached blocks); *evict (may be NULL) becomes the
 * largest count of cached blocks any rank must evict. Without an agreement returns st and leaves *evict. The
 * cache agrees its own swap space through it before kvc_bm_seq_swap_out. */
kvc_status_t kvc_bm_agree(kvc_bm_t *bm, kvc_status_t st, int64_t *evict);

/* The chained block hash: of tokens[n] after `parent` (0 for a sequence's first block), never 0. */
uint64_t kvc_bm_block_hash(uint64_t parent, const int32_t *tokens, int n, uint64_t codec_identity,
                           uint64_t salt);
/* Testing hook: replaces the block hash (NULL restores kvc_bm_block_hash), e.g. by a constant to
 * force collisions. Only on a manager whose prefix cache is empty. */
typedef uint64_t (*kvc_bm_hash_fn)(uint64_t parent, const int32_t *tokens, int n,
                                   uint64_t codec_identity, uint64_t salt);
void kvc_bm_set_hash_fn(kvc_bm_t *bm, kvc_bm_hash_fn fn);

#ifdef __cplusplus
}
#endif

#endif /* KVC_BLOCKS_H */
