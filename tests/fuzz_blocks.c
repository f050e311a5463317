/*
 * libFuzzer target for the block manager. The input is a byte-coded operation sequence: the first
 * byte picks a configuration, the second a colliding hash or not and a tensor-parallel agreement
 * or not, then each operation is an opcode byte followed by its argument bytes (missing bytes
 * read as 0). After every operation kvc_bm_validate must pass, and a call that fails must leave
 * the statistics exactly as they were. Host allocation failures are injected by an opcode too;
 * with the agreement, each exchange reads a byte: the other ranks' status and eviction count
 * (anything, also counts no rank in step could send), or a failed exchange. Any violation
 * aborts.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "allocator/kvc_blocks.h"
#include "kvc_fuzz_input.h"

static uint64_t collide(uint64_t parent, const int32_t *tokens, int n, uint64_t identity,
                        uint64_t salt) {
  (void)parent, (void)n, (void)identity, (void)salt;
  return (uint64_t)(tokens[0] & 3);
}

static void die(const char *what, const char *why) {
  fprintf(stderr, "fuzz_blocks: %s: %s\n", what, why);
  abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  kvc_fuzz_input_t in = {data, size};
  uint8_t conf = kvc_fuzz_next(&in);
  kvc_bm_config_t c;
  memset(&c, 0, sizeof(c));
  c.num_layers = 1 + (conf & 1);
  c.block_tokens = 2 << ((conf >> 1) & 1);
  c.max_seqs = 6;
  c.max_seq_len = 40;
  c.max_blocks = 24;
  c.staging_chunks = 1;
  c.worst_page_chunks = 3;
  c.total_chunks = (uint32_t)(c.num_layers * 3 * (4 + ((conf >> 2) & 7) * 3));
  c.staging_bytes = 64;
  c.watermark = (conf & 0x20) ? 0.1f : 0.0f;
  c.prefix_caching = !(conf & 0x40);
  c.codec_identity = 9;
  c.swap_bytes = (conf & 0x80) ? 0 : 2000;
  c.max_batch_tokens = 16;

  kvc_host_alloc_t *ha;
  if (kvc_host_alloc_create(&ha) != KVC_OK) return 0;
  kvc_bm_t *bm;
  if (kvc_bm_create(&c, ha, &bm) != KVC_OK) die("create", "valid config refused");
  const uint8_t mode = kvc_fuzz_next(&in);
  if (mode & 1) kvc_bm_set_hash_fn(bm, collide);
  if (mode & 2) kvc_bm_set_agreement(bm, kvc_fuzz_other_ranks, &in);
  kvc_bm_work_t w;
  kvc_bm_plan_t plan;
  int32_t tokens[64];
  char why[256];
  while (in.n) {
    uint8_t op = kvc_fuzz_next(&in), a = kvc_fuzz_next(&in), b = kvc_fuzz_next(&in);
    kvc_seq_id_t id = 1 + a % 8; /* ids 7 and 8 are often unknown */
    kvc_bm_stats_t before, after;
    kvc_bm_get_stats(bm, &before);
    kvc_status_t st = KVC_OK;
    switch (op % 13) {
      case 0: {
        int n = b % 48;
        for (int i = 0; i < n; i++)
          tokens[i] = (i < (a >> 4) * 4) ? i : (int32_t)(kvc_fuzz_next(&in) & 3);
        int cached;
        st = kvc_bm_seq_add(bm, id, tokens, n, a >> 7, &cached, &w);
        break;
      }
      case 1:
        st = kvc_bm_seq_reserve(bm, id, b % 24 - (b == 255), (a >> 4) % 3, &w);
        break;
      case 2:
      case 3: {
        kvc_seq_id_t ids[4];
        int32_t nn[4];
        int n = 1 + (a >> 6);
        for (int i = 0; i < n; i++) {
          ids[i] = 1 + kvc_fuzz_next(&in) % 8;
          nn[i] = 1 + kvc_fuzz_next(&in) % 6;
        }
        for (int i = 0; i < 16; i++) tokens[i] = kvc_fuzz_next(&in) & 3;
        kvc_bm_batch_t batch = {n, ids, nn, (b & 1) ? tokens : NULL};
        st = kvc_bm_plan(bm, &batch, &plan);
        if (st == KVC_OK && !(b & 2)) kvc_bm_step_done(bm);
        break;
      }
      case 4:
        kvc_bm_step_done(bm);
        break;
      case 5:
        st = kvc_bm_seq_fork(bm, id, 1 + b % 8, &w);
        break;
      case 6:
        st = kvc_bm_seq_free(bm, id, &w);
        break;
      case 7:
        st = kvc_bm_seq_swap_out(bm, id, KVC_OK, &w);
        break;
      case 8:
        st = kvc_bm_seq_swap_in(bm, id, &w);
        break;
      case 9:
        kvc_bm_page_measured(bm, (int32_t)(a % 26) - 1, b % 3, 100,
                             (uint32_t)(kvc_fuzz_next(&in) % 5));
        break;
      case 10:
        kvc_host_alloc_fail_after(ha, a % 4);
        break;
      case 11: { /* a sequence from another cache: pages of any size, also invalid ones */
        uint32_t pb[64];
        uint8_t pc[64];
        for (int i = 0; i < 64; i++) {
          pb[i] = kvc_fuzz_next(&in) % 4 ? 100 : 0;
          pc[i] = (uint8_t)(kvc_fuzz_next(&in) % 5);
        }
        st = kvc_bm_seq_import(bm, id, b % 41 - (b == 255), pb, pc,
                               a & 1 ? KVC_OK : KVC_ERR_CORRUPT, &w);
        break;
      }
      default:
        (void)kvc_bm_tokens_fit(bm);
        break;
    }
    if (kvc_bm_validate(bm, why, sizeof(why)) != KVC_OK) die("validate", why);
    if (st != KVC_OK) {
      kvc_bm_get_stats(bm, &after);
      if (memcmp(&before, &after, sizeof(before)) != 0) die("failed call", "changed the stats");
    }
  }
  kvc_host_alloc_fail_after(ha, -1);
  kvc_bm_destroy(bm);
  if (kvc_host_alloc_bytes(ha) != 0) die("destroy", "host bytes left");
  kvc_host_alloc_destroy(ha);
  return 0;
}
