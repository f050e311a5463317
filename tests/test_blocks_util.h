/* Helpers shared by the block manager tests (header-only: each test is one program): a small
 * default configuration, full-state snapshots for "a failed call changes nothing", an event
 * recorder, and a validate assertion. Include after <cmocka.h>. */
#ifndef TEST_BLOCKS_UTIL_H
#define TEST_BLOCKS_UTIL_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "allocator/kvc_blocks.h"

/* 2 layers, 4-token blocks, pages of at most 4 chunks: a block costs 8 chunks unmeasured. */
static inline kvc_bm_config_t tb_config(void) {
  kvc_bm_config_t c;
  memset(&c, 0, sizeof(c));
  c.num_layers = 2;
  c.block_tokens = 4;
  c.max_seqs = 8;
  c.max_seq_len = 64;
  c.max_blocks = 64;
  c.total_chunks = 64 * 8;
  c.staging_chunks = 2;
  c.worst_page_chunks = 4;
  c.staging_bytes = 500;
  c.watermark = 0.0f;
  c.prefix_caching = 1;
  c.codec_identity = 0x5eed;
  c.swap_bytes = 1 << 20;
  c.max_batch_tokens = 64;
  return c;
}

#define TB_ASSERT_VALID(bm)                                                                        \
  do {                                                                                             \
    char tb_why_[256];                                                                             \
    kvc_status_t tb_st_ = kvc_bm_validate((bm), tb_why_, sizeof(tb_why_));                         \
    if (tb_st_ != KVC_OK) fail_msg("validate: %s", tb_why_);                                       \
  } while (0)

/* Everything observable about a manager: its stats and, for each listed id, whether it exists,
 * its info and its block table. */
#define TB_SNAP_SEQS 64
#define TB_SNAP_BLOCKS 4096
typedef struct tb_snap {
  kvc_bm_stats_t stats;
  int64_t tokens_fit;
  int step_open;
  int nseq;
  kvc_status_t found[TB_SNAP_SEQS];
  kvc_seq_info_t info[TB_SNAP_SEQS];
  int nblocks[TB_SNAP_SEQS];
  int off[TB_SNAP_SEQS];
  int32_t blocks[TB_SNAP_BLOCKS];
} tb_snap_t;

static inline void tb_snap(const kvc_bm_t *bm, const kvc_seq_id_t *ids, int n, tb_snap_t *s) {
  memset(s, 0, sizeof(*s));
  kvc_bm_get_stats(bm, &s->stats);
  s->tokens_fit = kvc_bm_tokens_fit(bm);
  s->step_open = kvc_bm_step_open(bm);
  s->nseq = n;
  int used = 0;
  for (int i = 0; i < n && i < TB_SNAP_SEQS; i++) {
    s->found[i] = kvc_bm_seq_info(bm, ids[i], &s->info[i]);
    s->off[i] = used;
    const int32_t *b;
    int nb = 0;
    if (kvc_bm_seq_blocks(bm, ids[i], &b, &nb) == KVC_OK && used + nb <= TB_SNAP_BLOCKS) {
      if (nb) memcpy(s->blocks + used, b, (size_t)nb * sizeof(int32_t));
      used += nb;
    }
    s->nblocks[i] = nb;
  }
}

static inline void tb_snap_assert_equal(const tb_snap_t *a, const tb_snap_t *b) {
  const kvc_bm_stats_t *x = &a->stats, *y = &b->stats;
#define TB_EQ(f) assert_int_equal(x->f, y->f)
  TB_EQ(free_chunks); TB_EQ(charged_chunks); TB_EQ(reserved_chunks); TB_EQ(unmeasured_chunks);
  TB_EQ(measured_page_bytes); TB_EQ(measured_page_chunks); TB_EQ(measured_pages);
  TB_EQ(active_blocks); TB_EQ(cached_blocks); TB_EQ(swapped_blocks); TB_EQ(free_block_ids);
  TB_EQ(live_seqs); TB_EQ(swapped_seqs); TB_EQ(tokens_stored); TB_EQ(prefix_queries);
  TB_EQ(prefix_hits); TB_EQ(evictions); TB_EQ(swap_outs); TB_EQ(swap_ins); TB_EQ(swap_used_bytes);
  TB_EQ(host_bytes); TB_EQ(cached_chunks); TB_EQ(staging_blocks); TB_EQ(ignored_measurements);
#undef TB_EQ
  assert_int_equal(a->tokens_fit, b->tokens_fit);
  assert_int_equal(a->step_open, b->step_open);
  assert_int_equal(a->nseq, b->nseq);
  for (int i = 0; i < a->nseq && i < TB_SNAP_SEQS; i++) {
    assert_int_equal(a->found[i], b->found[i]);
    assert_int_equal(a->info[i].length, b->info[i].length);
    assert_int_equal(a->info[i].reserved, b->info[i].reserved);
    assert_int_equal(a->info[i].num_blocks, b->info[i].num_blocks);
    assert_int_equal(a->info[i].shared_blocks, b->info[i].shared_blocks);
    assert_int_equal(a->info[i].state, b->info[i].state);
    assert_int_equal(a->nblocks[i], b->nblocks[i]);
    assert_memory_equal(a->blocks + a->off[i], b->blocks + b->off[i],
                        (size_t)a->nblocks[i] * sizeof(int32_t));
  }
}

/* Records events in order. */
#define TB_MAX_EVENTS 4096
typedef struct tb_events {
  int n;
  kvc_event_kind_t kind[TB_MAX_EVENTS];
  int32_t block[TB_MAX_EVENTS];
  uint64_t hash[TB_MAX_EVENTS];
} tb_events_t;

static inline void tb_on_event(void *user, kvc_event_kind_t kind, int32_t block, uint64_t hash) {
  tb_events_t *e = user;
  if (e->n < TB_MAX_EVENTS) {
    e->kind[e->n] = kind;
    e->block[e->n] = block;
    e->hash[e->n] = hash;
    e->n++;
  }
}

#endif /* TEST_BLOCKS_UTIL_H */
