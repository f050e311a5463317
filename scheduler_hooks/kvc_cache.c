/*
 * The cache: configuration, creation, the per-request hooks, plan/store/attend, and the loop that
 * brings measured page sizes back to the block manager. kvc_cache_internal.h gives the overview.
 *
 * A step, as the backends execute it (kvc_store, per layer):
 *   (1) take a staging page for every block in plan.new_staging and for every compress job whose
 *       block had none (job_staged == 0: the step fills it from its first slot);
 *   (2) write every new token row to its block's staging page slot.
 * Blocks the step completes (its compress jobs) are compressed later, by compress_deferred:
 *   (3) a job's rows move from its staging page into the step's compress scratch block, and the
 *       staging pages go back;
 *   (4) every job is compressed: the codec takes the page's chunks itself (on the device on CUDA)
 *       and reports the page's size into page_bytes[layer][job].
 * When every layer is stored the step is done for the block manager. The sizes reach the host
 * later without waiting: once compressed, the next plan copies them into a size slot (CUDA: D2H
 * with an event) and a plan after that, seeing the event complete, reports them
 * (kvc_bm_page_measured) so that the block's worst-case charge drops to its real size.
 *
 * Why compression is deferred. A step's queries must see the step's own new tokens exactly, as
 * stored, like any paged-KV engine's prefill does: only tokens stored by earlier steps may be
 * read through the lossy codec. Attention reads a block through its directory entry, and reads a
 * staging page exactly; so a block completed in step s keeps its staging page, full, until its
 * compression runs at the start of the next kvc_plan, which is after the last attend step s can
 * have (a step's attends end with the next plan). The attention kernels need no change.
 *   Memory: a completed block is charged its worst-case page in every layer until its size is
 *   measured, and worst_page_chunks >= staging_chunks, so holding its staging page one step longer
 *   stays within what the block manager has charged (a large single-shot prefill included); (3)
 *   gives a job's staging page back before (4) takes its page's chunks.
 *   Earlier compression: anything that needs the page itself compresses first, all deferred layers
 *   at once (compress_deferred): freeing or evicting a pending block (run_work; the step's attends
 *   have ended by then, see close_finished_plan), swapping out a sequence that holds one (its size
 *   must be known for swap space), and kvc_cache_synchronize (so stats and page sizes are complete
 *   after it; attends of the step after it read those blocks compressed). Forks and prefix hits
 *   share a pending block as it is: its content does not change, only its encoding.
 *   Validation accepts a pending block's staging page where a full block's page is expected.
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "scheduler_hooks/kvc_backend.h"
#include "scheduler_hooks/kvc_cache_test.h"

/* The first published kvc_config_t ends with log_level: a caller's struct_size is at least that. */
#define KVC__CONFIG_MIN_SIZE (offsetof(kvc_config_t, log_level) + sizeof(kvc_log_level_t))

/* ---- logging and statuses ------------------------------------------------------------------ */

static void log_with(const kvc_config_t *cfg, kvc_log_level_t level, const char *fmt, va_list ap) {
  if (level > cfg->log_level) return;
  char line[512];
  vsnprintf(line, sizeof(line), fmt, ap);
  if (cfg->log_fn)
    cfg->log_fn(cfg->log_user, level, line);
  else
    fprintf(stderr, "kvcomp: %s\n", line);
}

static void log_cfg(const kvc_config_t *cfg, kvc_log_level_t level, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
static void log_cfg(const kvc_config_t *cfg, kvc_log_level_t level, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  log_with(cfg, level, fmt, ap);
  va_end(ap);
}

void kvc__log(const kvc_cache_t *c, kvc_log_level_t level, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  log_with(&c->cfg, level, fmt, ap);
  va_end(ap);
}

kvc_status_t kvc__fail_device(kvc_cache_t *c, kvc_status_t st, const char *what) {
  if (c->sticky == KVC_OK) {
    c->sticky = st;
    kvc__log(c, KVC_LOG_ERROR,
             "%s failed after the block manager committed (%s); the cache is "
             "unusable from now on",
             what, kvc_status_string(st));
  }
  return c->sticky;
}

/* ---- configuration ------------------------------------------------------------------------- */

static int finite_positive(float x) { return isfinite(x) && x > 0.0f; }

static kvc_status_t check_config(const kvc_config_t *cfg) {
  const char *why = NULL;
  kvc_status_t st = KVC_ERR_INVALID_ARGUMENT;
  int hd = cfg->head_dim, bt = cfg->block_tokens;
  if (cfg->backend != KVC_BACKEND_CPU && cfg->backend != KVC_BACKEND_CUDA)
    why = "backend";
  else if (cfg->num_layers < 1)
    why = "num_layers must be >= 1";
  else if (cfg->num_kv_heads < 1)
    why = "num_kv_heads must be >= 1";
  else if (cfg->num_q_heads < 1 || cfg->num_q_heads % cfg->num_kv_heads)
    why = "num_q_heads must be a positive multiple of num_kv_heads";
  else if (hd < 8 || hd > 256 || hd % 8)
    why = "head_dim must be a multiple of 8 in 8..256";
  else if (cfg->dtype != KVC_DTYPE_F16 && cfg->dtype != KVC_DTYPE_BF16 &&
           cfg->dtype != KVC_DTYPE_F32)
    why = "dtype";
  else if (bt < 16 || bt > 256 || (bt & (bt - 1)))
    why = "block_tokens must be a power of two in 16..256";
  else if (cfg->pool_bytes == 0)
    why = "pool_bytes must be > 0";
  else if (cfg->max_seqs < 1 || cfg->max_seq_len < 1 || cfg->max_batch_tokens < 1)
    why = "max_seqs, max_seq_len and max_batch_tokens must be >= 1";
  else if (cfg->max_seqs > (INT32_MAX >> 2)) /* the block manager's limit */
    why = "max_seqs must be below 2^29";
  else if (!(cfg->watermark >= 0.0f && cfg->watermark < 1.0f))
    why = "watermark must be in [0, 1)";
  else if (cfg->prefix_caching != 0 && cfg->prefix_caching != 1)
    why = "prefix_caching must be 0 or 1";
  else if (cfg->policy != KVC_POLICY_FIXED && cfg->policy != KVC_POLICY_SMALLEST &&
           cfg->policy != KVC_POLICY_FASTEST_WITHIN)
    why = "policy";
  else if (cfg->codec != KVC_CODEC_RAW && cfg->codec != KVC_CODEC_BITPACK &&
           cfg->codec != KVC_CODEC_HUFFMAN)
    why = "codec";
  else if (!(cfg->size_budget > 0.0f && cfg->size_budget <= 1.0f))
    why = "size_budget must be in (0, 1]";
  else if (cfg->bound_mode != KVC_BOUND_RELATIVE && cfg->bound_mode != KVC_BOUND_ABSOLUTE)
    why = "bound_mode";
  else if (!finite_positive(cfg->k_bound) || !finite_positive(cfg->v_bound))
    why = "k_bound and v_bound must be finite and > 0";
  else if (cfg->log_level < KVC_LOG_ERROR || cfg->log_level > KVC_LOG_DEBUG)
    why = "log_level";
  else if (cfg->cascade < 0 || cfg->cascade > 2)
    why = "cascade must be 0, 1 or 2";
  else if (cfg->backend == KVC_BACKEND_CUDA) {
    st = KVC_ERR_UNSUPPORTED;
    if (!KVC_HAVE_CUDA)
      why = "the CUDA backend is not built";
    else if (hd != 64 && hd != 128 && hd != 256)
      why = "CUDA head_dim must be 64, 128 or 256";
    else if (cfg->dtype == KVC_DTYPE_F32)
      why = "CUDA dtype must be f16 or bf16";
    else if (bt > 128)
      why = "CUDA block_tokens must be at most 128";
    else if (hd == 256 && bt > 64 &&
             !(cfg->policy == KVC_POLICY_FIXED && cfg->codec == KVC_CODEC_RAW))
      why = "CUDA head_dim 256 takes block_tokens up to 64 unless every page is raw (policy "
            "FIXED, codec RAW)";
  }
  if (!why) return KVC_OK;
  log_cfg(cfg, KVC_LOG_ERROR, "kvc_cache_create: %s", why);
  return st;
}

static uint64_t mix(uint64_t h, uint64_t x) {
  h ^= x + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  h ^= h >> 31;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 29;
  return h;
}

static uint64_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

/* Blocks are only interchangeable between caches that would have coded them the same way. */
static uint64_t codec_identity(const kvc_config_t *cfg) {
  uint64_t h = 0x6b7663u; /* "kvc" */
  h = mix(h, (uint64_t)cfg->codec);
  h = mix(h, (uint64_t)cfg->policy);
  h = mix(h, float_bits(cfg->size_budget));
  h = mix(h, (uint64_t)cfg->bound_mode);
  h = mix(h, float_bits(cfg->k_bound));
  h = mix(h, float_bits(cfg->v_bound));
  h = mix(h, (uint64_t)cfg->dtype);
  h = mix(h, (uint64_t)cfg->block_tokens);
  return h ? h : 1;
}

static kvc_status_t compute_geometry(const kvc_config_t *cfg, const kvc_codec_params_t *p,
                                     kvc__geometry_t *g) {
  memset(g, 0, sizeof(*g));
  const uint64_t L = (uint64_t)cfg->num_layers;
  uint64_t staging = kvc_codec_staging_bytes(p), max_page = kvc_codec_max_page_bytes(p);
  if (max_page < staging || max_page > (uint64_t)UINT32_MAX / 2) {
    log_cfg(cfg, KVC_LOG_ERROR, "kvc_cache_create: a page of %llu bytes is too large",
            (unsigned long long)max_page);
    return KVC_ERR_UNSUPPORTED;
  }
  /* The largest page in KVC_PAGE_MAX_CHUNKS - 1 chunks: packed, it may lie in one more. */
  uint64_t cb = KVC_CHUNK_MIN_BYTES;
  while (max_page > (uint64_t)(KVC_PAGE_MAX_CHUNKS - 1) * cb) cb *= 2;
  /* Chunk ids and the device stack's top are 32-bit: a huge pool gets larger chunks instead. */
  while (cfg->pool_bytes / cb > (uint64_t)INT32_MAX) cb *= 2;
  if (cb > (uint64_t)1 << 31) { /* chunk_bytes is 32-bit: ~2^62 bytes are past any pool */
    log_cfg(cfg, KVC_LOG_ERROR, "kvc_cache_create: pool_bytes %zu is too large to address",
            cfg->pool_bytes);
    return KVC_ERR_INVALID_ARGUMENT;
  }
  g->chunk_bytes = (uint32_t)cb;
  g->total_chunks = (uint32_t)(cfg->pool_bytes / cb);
  g->staging_bytes = (uint32_t)staging;
  g->staging_chunks = kvc_chunks_for(staging, g->chunk_bytes);
  g->max_page_bytes = (uint32_t)max_page;
  g->worst_page_chunks = kvc_chunks_for(max_page, g->chunk_bytes);
  if (g->worst_page_chunks < g->staging_chunks) g->worst_page_chunks = g->staging_chunks;
  g->elem_bytes = cfg->dtype == KVC_DTYPE_F32 ? 4 : 2;
  g->row_bytes = (uint32_t)cfg->head_dim * g->elem_bytes;

  /* Block ids: no more than one chunk per page allows, nor more than the pool holds at 16x
   * compression (directories are sized by max_blocks; more ids than that would be unused). */
  uint64_t by_chunks = g->total_chunks / L;
  uint64_t per_block_16x = L * staging / 16;
  uint64_t by_ratio = cfg->pool_bytes / (per_block_16x ? per_block_16x : 1);
  uint64_t mb = by_chunks < by_ratio ? by_chunks : by_ratio;
  if (mb > (uint64_t)(INT32_MAX >> 1)) mb = (uint64_t)(INT32_MAX >> 1); /* the block manager's */
  g->max_blocks = (int32_t)mb;

  /* One sequence must be admissible: one worst-case block in every layer beyond the watermark. */
  uint64_t wm = (uint64_t)ceil((double)cfg->watermark * g->total_chunks);
  if (g->max_blocks < 1 || (uint64_t)g->total_chunks < L * g->worst_page_chunks + wm) {
    log_cfg(cfg, KVC_LOG_ERROR,
            "kvc_cache_create: pool_bytes %zu holds %u chunks of %u bytes; one block of every "
            "layer needs %llu plus %llu for the watermark",
            cfg->pool_bytes, g->total_chunks, g->chunk_bytes,
            (unsigned long long)(L * g->worst_page_chunks), (unsigned long long)wm);
    return KVC_ERR_INVALID_ARGUMENT;
  }
  int64_t seq_blocks = ((int64_t)cfg->max_seq_len + cfg->block_tokens - 1) / cfg->block_tokens;
  g->max_seq_blocks = (int32_t)(seq_blocks < g->max_blocks ? seq_blocks : g->max_blocks);
  g->max_rows = cfg->max_batch_tokens;
  g->max_plan_seqs = cfg->max_seqs < cfg->max_batch_tokens ? cfg->max_seqs : cfg->max_batch_tokens;
  /* A sequence completes at most n / block_tokens + 1 blocks with n new tokens, and every job
   * has at least one new row. */
  int64_t jobs = (int64_t)g->max_rows / cfg->block_tokens + g->max_plan_seqs;
  g->max_jobs = (int)(jobs < g->max_rows ? jobs : g->max_rows);
  g->max_table_entries = (int64_t)g->max_plan_seqs * g->max_seq_blocks;
  return KVC_OK;
}

/* ---- live sequence set --------------------------------------------------------------------- */

static uint32_t seq_hash(kvc_seq_id_t id) { return (uint32_t)(mix(0, id) >> 32); }

static int32_t seq_set_slot(const kvc__seq_set_t *s, kvc_seq_id_t id) {
  uint32_t i = seq_hash(id) & s->mask;
  while (s->index[i] >= 0 && s->ids[s->index[i]] != id) i = (i + 1) & s->mask;
  return (int32_t)i;
}

static int seq_set_add(kvc__seq_set_t *s, int cap, kvc_seq_id_t id) {
  if (s->n >= cap) return -1;
  int32_t i = seq_set_slot(s, id);
  if (s->index[i] >= 0) return -1;
  s->index[i] = s->n;
  s->ids[s->n++] = id;
  return 0;
}

/* Linear probing with backward-shift deletion: no tombstones, so lookups stay short. */
int kvc__live_add(kvc_cache_t *c, kvc_seq_id_t id) {
  return seq_set_add(&c->live, c->cfg.max_seqs, id);
}

static int seq_set_remove(kvc__seq_set_t *s, kvc_seq_id_t id) {
  uint32_t i = (uint32_t)seq_set_slot(s, id);
  int32_t pos = s->index[i];
  if (pos < 0) return -1;
  /* The last id fills the hole in ids[]; find its slot while ids[] still names both. */
  kvc_seq_id_t last = s->ids[--s->n];
  if (pos != s->n) {
    s->index[seq_set_slot(s, last)] = pos;
    s->ids[pos] = last;
  }
  s->index[i] = -1;
  for (uint32_t j = (i + 1) & s->mask; s->index[j] >= 0; j = (j + 1) & s->mask) {
    uint32_t home = seq_hash(s->ids[s->index[j]]) & s->mask;
    /* Entry j may move to the hole i when its home is not within (i, j] cyclically. */
    if (((j - home) & s->mask) >= ((j - i) & s->mask)) {
      s->index[i] = s->index[j];
      s->index[j] = -1;
      i = j;
    }
  }
  return 0;
}

/* ---- events -------------------------------------------------------------------------------- */

static void on_event(void *user, kvc_event_kind_t kind, int32_t block, uint64_t hash) {
  kvc_cache_t *c = user;
  if (c->ev_count == KVC__EVENT_CAP) {
    c->ev_first = (c->ev_first + 1) % KVC__EVENT_CAP;
    c->ev_count--;
    c->ev_dropped++;
  }
  kvc_event_t *e = &c->events[(c->ev_first + c->ev_count) % KVC__EVENT_CAP];
  e->kind = kind;
  e->block_id = block;
  e->block_hash = hash;
  c->ev_count++;
}

/* ---- the host mirror ----------------------------------------------------------------------- */

static kvc__page_meta_t *meta_at(kvc_cache_t *c, int layer, int32_t block) {
  return c->meta + (size_t)layer * (size_t)c->geo.max_blocks + (size_t)block;
}

/* Keeps the counters of pages in the pool in step with every change of a mirror entry. */
static void meta_count(kvc_cache_t *c, const kvc__page_meta_t *m, int64_t sign) {
  if (m->swapped) return;
  if (m->kind == KVC_PAGE_STAGING) {
    c->staging_pages += sign;
  } else if (m->kind == KVC_PAGE_COMPRESSED && m->measured) {
    c->measured_pages += sign;
    c->measured_bytes += (uint64_t)(sign * (int64_t)m->nbytes);
    c->measured_chunks += (uint64_t)(sign * (int64_t)m->chunks);
    c->pages_by_codec[m->codec] += sign;
  }
}

void kvc__meta_set(kvc_cache_t *c, int layer, int32_t block, kvc_page_kind_t kind,
                   uint32_t nbytes, uint8_t codec, uint8_t chunks, int measured) {
  kvc__page_meta_t *m = meta_at(c, layer, block);
  meta_count(c, m, -1);
  m->kind = (uint8_t)kind;
  m->nbytes = nbytes;
  m->codec = codec;
  m->chunks = chunks;
  m->measured = (uint8_t)measured;
  m->swapped = 0;
  meta_count(c, m, +1);
}

static void meta_set_swapped(kvc_cache_t *c, int layer, int32_t block, int swapped) {
  kvc__page_meta_t *m = meta_at(c, layer, block);
  meta_count(c, m, -1);
  m->swapped = (uint8_t)swapped;
  meta_count(c, m, +1);
}

uint64_t kvc__swap_extent_bytes(const kvc_cache_t *c, int32_t b) {
  uint64_t bytes = kvc__round16((uint64_t)c->cfg.num_layers * KVC__SWAP_HDR_BYTES);
  for (int l = 0; l < c->cfg.num_layers; l++) {
    const kvc__page_meta_t *m = c->meta + (size_t)l * (size_t)c->geo.max_blocks + (size_t)b;
    if (m->kind != KVC_PAGE_EMPTY) bytes += kvc__round16(m->nbytes);
  }
  return bytes;
}

/* ---- page sizes ---------------------------------------------------------------------------- */

/* Reports slot `s` (arrived) to the block manager. Jobs whose block was freed (or freed and
 * reused) since are skipped: pending_step no longer names this slot's step. */
static kvc_status_t report_slot(kvc_cache_t *c, const kvc__size_slot_t *s, const uint32_t *bytes,
                                const uint8_t *codecs, const uint8_t *chunks) {
  const size_t jobs = (size_t)c->geo.max_jobs;
  for (int j = 0; j < s->num_jobs; j++) {
    int32_t b = s->job_block[j];
    if (c->pending_step[b] != s->step) continue;
    for (int l = 0; l < c->cfg.num_layers; l++) {
      uint32_t nbytes = bytes[(size_t)l * jobs + j];
      uint8_t codec = codecs[(size_t)l * jobs + j], nch = chunks[(size_t)l * jobs + j];
      if (nbytes == 0 || nbytes > c->geo.max_page_bytes || codec > KVC_CODEC_HUFFMAN ||
          nch > kvc_chunks_for(nbytes, c->geo.chunk_bytes) ||
          meta_at(c, l, b)->kind != KVC_PAGE_COMPRESSED) {
        kvc__log(c, KVC_LOG_ERROR,
                 "page of block %d layer %d reported %u bytes, codec %u, %u chunks", (int)b, l,
                 nbytes, codec, nch);
        return KVC_ERR_INTERNAL;
      }
      kvc__meta_set(c, l, b, KVC_PAGE_COMPRESSED, nbytes, codec, nch, 1);
      kvc_bm_page_measured_step(c->bm, s->step, b, l, nbytes, nch);
    }
    c->pending_step[b] = 0;
  }
  return KVC_OK;
}

/* Retires the oldest slot in flight if it has arrived (waiting for it with `wait`). */
static kvc_status_t retire_oldest(kvc_cache_t *c, int wait, int *retired) {
  const kvc__size_slot_t *s = &c->slots[c->slot_first];
  const uint32_t *bytes;
  const uint8_t *codecs, *chunks;
  int ready = 0;
  *retired = 0;
  kvc_status_t st = c->ops->sizes_poll(c, c->slot_first, wait, &ready, &bytes, &codecs, &chunks);
  if (st == KVC_OK && ready) st = report_slot(c, s, bytes, codecs, chunks);
  if (st != KVC_OK) return kvc__fail_device(c, st, "collecting page sizes");
  if (ready) {
    c->slot_first = (c->slot_first + 1) % KVC__SIZE_SLOTS;
    c->slot_count--;
    *retired = 1;
  }
  return KVC_OK;
}

/* Reports every slot that has arrived, oldest first; with `wait`, waits for all of them. */
static kvc_status_t poll_slots(kvc_cache_t *c, int wait) {
  int retired = 1;
  kvc_status_t st = KVC_OK;
  while (st == KVC_OK && retired && c->slot_count > 0) st = retire_oldest(c, wait, &retired);
  return st;
}

/* Hands the finished step's page sizes to a size slot (once per step with jobs). */
static kvc_status_t fetch_step_sizes(kvc_cache_t *c, void *stream) {
  if (c->step_fetched || c->step == 0 || c->layers_stored != c->cfg.num_layers ||
      c->layers_deferred > 0)
    return KVC_OK;
  c->step_fetched = 1;
  if (c->step_num_jobs == 0) return KVC_OK;
  int retired;
  kvc_status_t st = KVC_OK;
  /* Only when the device is KVC__SIZE_SLOTS steps behind does this wait. */
  if (c->slot_count == KVC__SIZE_SLOTS) st = retire_oldest(c, 1, &retired);
  if (st != KVC_OK) return st;
  int slot = (c->slot_first + c->slot_count) % KVC__SIZE_SLOTS;
  kvc__size_slot_t *s = &c->slots[slot];
  st = c->ops->sizes_fetch(c, slot, c->step_num_jobs, stream);
  if (st != KVC_OK) return kvc__fail_device(c, st, "copying page sizes");
  s->step = c->step;
  s->num_jobs = c->step_num_jobs;
  memcpy(s->job_block, c->step_job_block, (size_t)c->step_num_jobs * sizeof(int32_t));
  c->slot_count++;
  return KVC_OK;
}

/* Steps (3) and (4) for every layer whose compression is deferred, on `stream`. */
static kvc_status_t compress_deferred(kvc_cache_t *c, void *stream) {
  for (int l = 0; l < c->cfg.num_layers && c->layers_deferred > 0; l++) {
    if (!c->layer_deferred[l]) continue;
    kvc_status_t st = c->ops->compress(c, l, stream);
    if (st != KVC_OK) return kvc__fail_device(c, st, "compressing");
    for (int j = 0; j < c->step_num_jobs; j++)
      kvc__meta_set(c, l, c->step_job_block[j], KVC_PAGE_COMPRESSED, 0, 0, 0, 0);
    c->layer_deferred[l] = 0;
    c->layers_deferred--;
  }
  return KVC_OK;
}

/* Whether one of blocks[0..n) is a block of the last step whose compression is pending. */
static int any_compress_pending(const kvc_cache_t *c, const int32_t *blocks, int n) {
  if (c->layers_deferred == 0) return 0;
  for (int i = 0; i < n; i++)
    if (c->pending_step[blocks[i]] == c->step) return 1;
  return 0;
}

kvc_status_t kvc__collect_all(kvc_cache_t *c) {
  kvc_status_t st = fetch_step_sizes(c, c->last_stream);
  if (st != KVC_OK) return st;
  st = c->ops->synchronize(c);
  if (st != KVC_OK) return kvc__fail_device(c, st, "synchronizing");
  return poll_slots(c, 1);
}

kvc_status_t kvc__measure_seq(kvc_cache_t *c, kvc_seq_id_t id, void *stream) {
  const int32_t *table = NULL;
  int n = 0;
  kvc_status_t st = kvc_bm_seq_blocks(c->bm, id, &table, &n);
  if (st == KVC_OK && !kvc_bm_step_open(c->bm) && any_compress_pending(c, table, n))
    st = compress_deferred(c, stream);
  return st == KVC_OK ? kvc__collect_all(c) : st;
}

/* ---- the block manager's work -------------------------------------------------------------- */

static void release_swap_extent(kvc_cache_t *c, int32_t b) {
  if (c->swap_off[b] == UINT64_MAX) return;
  kvc__swap_space_free(&c->swap, c->swap_off[b], c->swap_len[b]);
  c->swap_off[b] = UINT64_MAX;
  c->swap_len[b] = 0;
}

/* Executes `w` (free, then copy, then the swap direction given) on `stream` and mirrors it. A
 * swap-in from `mem` (a sequence image's extents; NULL: swap memory) takes its offsets from
 * c->swap_work_off, and the caller has set the mirror of the blocks it fills. */
kvc_status_t kvc__run_work(kvc_cache_t *c, const kvc_bm_work_t *w, int swap_dir, const void *mem,
                           void *stream) {
  const int L = c->cfg.num_layers;
  kvc_status_t st;
  /* Compression reads a pending block's staging page, which freeing it releases: compress the
   * deferred layers first. (A swap-out has compressed them before it asked the block manager.) */
  if (any_compress_pending(c, w->free_blocks, w->num_free)) {
    st = compress_deferred(c, stream);
    if (st != KVC_OK) return st;
  }
  if (w->num_free > 0) {
    st = c->ops->free_pages(c, w->free_blocks, w->num_free, stream);
    if (st != KVC_OK) return kvc__fail_device(c, st, "freeing pages");
    for (int i = 0; i < w->num_free; i++) {
      int32_t b = w->free_blocks[i];
      for (int l = 0; l < L; l++) kvc__meta_set(c, l, b, KVC_PAGE_EMPTY, 0, 0, 0, 0);
      c->pending_step[b] = 0;
      release_swap_extent(c, b);
    }
  }
  if (w->copy_src >= 0) {
    st = c->ops->copy_tail(c, w->copy_src, w->copy_dst, stream);
    if (st != KVC_OK) return kvc__fail_device(c, st, "copying a tail");
    for (int l = 0; l < L; l++)
      kvc__meta_set(c, l, w->copy_dst, KVC_PAGE_STAGING, c->geo.staging_bytes, 0, 0, 0);
  }
  if (w->num_swap > 0 && swap_dir > 0) {
    /* The caller placed the extents (swap_off) and listed them in swap_work_off. */
    st = c->ops->swap_out(c, w->swap_blocks, c->swap_work_off, w->num_swap, NULL, 1, stream);
    if (st != KVC_OK) return kvc__fail_device(c, st, "swapping out");
    for (int i = 0; i < w->num_swap; i++) {
      int32_t b = w->swap_blocks[i];
      for (int l = 0; l < L; l++)
        if (meta_at(c, l, b)->kind != KVC_PAGE_EMPTY) meta_set_swapped(c, l, b, 1);
    }
  } else if (w->num_swap > 0) {
    if (!mem)
      for (int i = 0; i < w->num_swap; i++) c->swap_work_off[i] = c->swap_off[w->swap_blocks[i]];
    st = c->ops->swap_in(c, w->swap_blocks, c->swap_work_off, w->num_swap, mem, stream);
    if (st != KVC_OK) return kvc__fail_device(c, st, "swapping in");
    for (int i = 0; i < w->num_swap; i++) {
      int32_t b = w->swap_blocks[i];
      for (int l = 0; l < L; l++)
        if (meta_at(c, l, b)->swapped) meta_set_swapped(c, l, b, 0);
      /* Stream order keeps a later swap-out from overwriting the extent before this copy. */
      release_swap_extent(c, b);
    }
  }
  return KVC_OK;
}

/* After the step's last store, frees and swap-outs may release pages the plan points at. */
static void close_finished_plan(kvc_cache_t *c) {
  if (!kvc_bm_step_open(c->bm)) c->plan_valid = 0;
}

/* ---- create / destroy ---------------------------------------------------------------------- */

static void destroy_cache(kvc_cache_t *c) {
  kvc_host_alloc_t *ha = c->ha;
  if (c->ops) c->ops->destroy(c);
  kvc_bm_destroy(c->bm);
  kvc__swap_space_release(&c->swap, ha);
  kvc_host_free(ha, c->meta);
  kvc_host_free(ha, c->layer_stored);
  kvc_host_free(ha, c->layer_deferred);
  kvc_host_free(ha, c->step_job_block);
  kvc_host_free(ha, c->pending_step);
  for (int i = 0; i < KVC__SIZE_SLOTS; i++) kvc_host_free(ha, c->slots[i].job_block);
  kvc_host_free(ha, c->swap_off);
  kvc_host_free(ha, c->swap_len);
  kvc_host_free(ha, c->swap_table);
  kvc_host_free(ha, c->swap_work_off);
  kvc_host_free(ha, c->live.ids);
  kvc_host_free(ha, c->live.index);
  kvc_host_free(ha, c->block_mark);
  kvc_host_free(ha, c->events);
  kvc_host_free(ha, c);
}

kvc_status_t kvc__cache_create_faulty(const kvc_config_t *config, int64_t fail_after,
                                      kvc_cache_t **out) {
  if (!config || !out) return KVC_ERR_INVALID_ARGUMENT;
  if (config->struct_size < KVC__CONFIG_MIN_SIZE) {
    kvc_config_t def = KVC_CONFIG_INIT;
    log_cfg(&def, KVC_LOG_ERROR,
            "kvc_cache_create: struct_size %zu is not a kvc_config_t size "
            "(start from KVC_CONFIG_INIT)",
            config->struct_size);
    return KVC_ERR_INVALID_ARGUMENT;
  }
  kvc_config_t cfg = KVC_CONFIG_INIT;
  memcpy(&cfg, config, config->struct_size < sizeof(cfg) ? config->struct_size : sizeof(cfg));
  cfg.struct_size = sizeof(cfg);
  kvc_status_t st = check_config(&cfg);
  if (st != KVC_OK) return st;

  kvc_codec_params_t cp = {cfg.dtype,      cfg.num_kv_heads, cfg.head_dim, cfg.block_tokens,
                           cfg.bound_mode, cfg.k_bound,      cfg.v_bound,  cfg.policy,
                           cfg.codec,      cfg.size_budget};
  st = kvc_codec_check_params(&cp);
  if (st != KVC_OK) {
    log_cfg(&cfg, KVC_LOG_ERROR, "kvc_cache_create: the codec refuses these parameters (%s)",
            kvc_status_string(st));
    return st;
  }
  kvc__geometry_t geo;
  st = compute_geometry(&cfg, &cp, &geo);
  if (st != KVC_OK) return st;

  kvc_host_alloc_t *ha = NULL;
  st = kvc_host_alloc_create(&ha);
  if (st != KVC_OK) return st;
  kvc_host_alloc_fail_after(ha, fail_after);
  kvc_cache_t *c = kvc_host_calloc(ha, 1, sizeof(*c));
  if (!c) {
    kvc_host_alloc_destroy(ha);
    return KVC_ERR_OUT_OF_HOST_MEMORY;
  }
  c->cfg = cfg;
  c->codec = cp;
  c->geo = geo;
  c->codec_identity = codec_identity(&cfg);
  c->ha = ha;
  c->last_stream = NULL;

  const size_t L = (size_t)cfg.num_layers, MB = (size_t)geo.max_blocks;
  uint32_t mask = 1;
  while (mask < 2u * (uint32_t)cfg.max_seqs) mask <<= 1;
  c->live.mask = mask - 1;
  c->meta = kvc_host_calloc(ha, L * MB, sizeof(kvc__page_meta_t));
  c->layer_stored = kvc_host_calloc(ha, L, 1);
  c->layer_deferred = kvc_host_calloc(ha, L, 1);
  c->step_job_block = kvc_host_malloc(ha, (size_t)geo.max_jobs * sizeof(int32_t));
  c->pending_step = kvc_host_calloc(ha, MB, sizeof(uint64_t));
  c->swap_off = kvc_host_malloc(ha, MB * sizeof(uint64_t));
  c->swap_len = kvc_host_calloc(ha, MB, sizeof(uint64_t));
  c->swap_table = kvc_host_malloc(ha, (size_t)geo.max_seq_blocks * sizeof(int32_t));
  c->swap_work_off = kvc_host_malloc(ha, (size_t)geo.max_seq_blocks * sizeof(uint64_t));
  c->live.ids = kvc_host_malloc(ha, (size_t)cfg.max_seqs * sizeof(kvc_seq_id_t));
  c->live.index = kvc_host_malloc(ha, (size_t)mask * sizeof(int32_t));
  c->block_mark = kvc_host_calloc(ha, MB, 1);
  c->events = kvc_host_malloc(ha, KVC__EVENT_CAP * sizeof(kvc_event_t));
  int ok = c->meta && c->layer_stored && c->layer_deferred && c->step_job_block &&
           c->pending_step && c->swap_off && c->swap_len && c->swap_table && c->swap_work_off &&
           c->block_mark && c->live.ids && c->live.index && c->events;
  for (int i = 0; ok && i < KVC__SIZE_SLOTS; i++) {
    c->slots[i].job_block = kvc_host_malloc(ha, (size_t)geo.max_jobs * sizeof(int32_t));
    ok = c->slots[i].job_block != NULL;
  }
  st = ok ? KVC_OK : KVC_ERR_OUT_OF_HOST_MEMORY;
  if (st == KVC_OK) {
    for (size_t b = 0; b < MB; b++) c->swap_off[b] = UINT64_MAX;
    memset(c->live.index, 0xff, (size_t)mask * sizeof(int32_t));
    /* The swap region never holds more extents than there are block ids. */
    st = kvc__swap_space_init(&c->swap, ha, cfg.swap_bytes, (int64_t)MB);
  }
  if (st == KVC_OK) {
    kvc_bm_config_t bc;
    memset(&bc, 0, sizeof(bc));
    bc.num_layers = cfg.num_layers;
    bc.block_tokens = cfg.block_tokens;
    bc.max_seqs = cfg.max_seqs;
    bc.max_seq_len = cfg.max_seq_len;
    bc.max_blocks = geo.max_blocks;
    bc.total_chunks = geo.total_chunks;
    bc.staging_chunks = geo.staging_chunks;
    bc.worst_page_chunks = geo.worst_page_chunks;
    bc.staging_bytes = geo.staging_bytes;
    bc.watermark = cfg.watermark;
    bc.prefix_caching = cfg.prefix_caching;
    bc.codec_identity = c->codec_identity;
    bc.swap_bytes = cfg.swap_bytes;
    bc.max_batch_tokens = cfg.max_batch_tokens;
    st = kvc_bm_create(&bc, ha, &c->bm);
    if (st == KVC_ERR_INVALID_ARGUMENT) st = KVC_ERR_INTERNAL; /* our geometry is always valid */
  }
  if (st == KVC_OK) {
    kvc_bm_set_event_sink(c->bm, on_event, c);
    kvc_bm_set_agreement(c->bm, cfg.tp_allreduce_max, cfg.tp_user);
#if KVC_HAVE_CUDA
    c->ops = cfg.backend == KVC_BACKEND_CUDA ? &kvc__backend_cuda : &kvc__backend_cpu;
#else
    c->ops = &kvc__backend_cpu;
#endif
    st = c->ops->create(c);
    if (st != KVC_OK) c->ops = NULL;
  }
  if (st == KVC_OK) {
    int err = pthread_mutex_init(&c->mu, NULL);
    if (err) st = err == ENOMEM ? KVC_ERR_OUT_OF_HOST_MEMORY : KVC_ERR_INTERNAL;
  }
  if (st != KVC_OK) {
    destroy_cache(c);
    kvc_host_alloc_destroy(ha);
    return st;
  }
  kvc_host_alloc_fail_after(ha, -1);
  kvc__log(c, KVC_LOG_INFO,
           "cache on %s: %u chunks of %u bytes, %d block ids, staging page %u "
           "bytes, largest page %u bytes",
           c->ops->name, geo.total_chunks, geo.chunk_bytes, (int)geo.max_blocks, geo.staging_bytes,
           geo.max_page_bytes);
  *out = c;
  return KVC_OK;
}

kvc_status_t kvc_cache_create(const kvc_config_t *config, kvc_cache_t **out) {
  return kvc__cache_create_faulty(config, -1, out);
}

void kvc_cache_destroy(kvc_cache_t *c) {
  if (!c) return;
  kvc_host_alloc_t *ha = c->ha;
  pthread_mutex_destroy(&c->mu);
  destroy_cache(c);
  kvc_host_alloc_destroy(ha);
}

kvc_status_t kvc_cache_config(const kvc_cache_t *c, kvc_config_t *out) {
  if (!c || !out || out->struct_size < KVC__CONFIG_MIN_SIZE) return KVC_ERR_INVALID_ARGUMENT;
  size_t n = out->struct_size < sizeof(c->cfg) ? out->struct_size : sizeof(c->cfg);
  kvc_config_t cfg = c->cfg;
  cfg.struct_size = n;
  memcpy(out, &cfg, n);
  return KVC_OK;
}

/* ---- per-request hooks --------------------------------------------------------------------- */

kvc_cache_t *kvc__lock(const kvc_cache_t *cc) {
  kvc_cache_t *c = (kvc_cache_t *)cc;
  pthread_mutex_lock(&c->mu);
  return c;
}

void kvc__unlock(kvc_cache_t *c) { pthread_mutex_unlock(&c->mu); }

/* The status of a call that may have agreed with the other tensor-parallel ranks: a failed
 * agreement leaves the ranks' caches possibly different, so this one is unusable from then on. */
kvc_status_t kvc__tp_status(kvc_cache_t *c, kvc_status_t st) {
  if (st != KVC_ERR_NCCL || c->sticky != KVC_OK) return st;
  c->sticky = st;
  kvc__log(c, KVC_LOG_ERROR,
           "the tensor-parallel agreement failed: the ranks' caches may differ, so this one is "
           "unusable from now on");
  return st;
}

kvc_status_t kvc_seq_add(kvc_cache_t *c, kvc_seq_id_t id, const int32_t *tokens, int n_tokens,
                         uint64_t salt, int *n_cached) {
  if (!c || (n_tokens > 0 && !tokens)) return KVC_ERR_INVALID_ARGUMENT;
  kvc__lock(c);
  kvc_bm_work_t w;
  int cached = 0;
  kvc_status_t st = c->sticky;
  if (st == KVC_OK)
    st = kvc__tp_status(c, kvc_bm_seq_add(c->bm, id, tokens, n_tokens, salt, &cached, &w));
  if (st == KVC_OK) {
    if (seq_set_add(&c->live, c->cfg.max_seqs, id))
      st = kvc__fail_device(c, KVC_ERR_INTERNAL, "adding a sequence");
    else
      st = kvc__run_work(c, &w, 0, NULL, c->last_stream);
    if (st == KVC_OK && n_cached) *n_cached = cached;
  }
  kvc__unlock(c);
  return st;
}

kvc_status_t kvc_seq_reserve(kvc_cache_t *c, kvc_seq_id_t id, int n_new, int n_lookahead) {
  if (!c) return KVC_ERR_INVALID_ARGUMENT;
  kvc__lock(c);
  kvc_bm_work_t w;
  kvc_status_t st = c->sticky;
  if (st == KVC_OK) st = kvc__tp_status(c, kvc_bm_seq_reserve(c->bm, id, n_new, n_lookahead, &w));
  if (st == KVC_OK) st = kvc__run_work(c, &w, 0, NULL, c->last_stream);
  kvc__unlock(c);
  return st;
}

kvc_status_t kvc_seq_fork(kvc_cache_t *c, kvc_seq_id_t parent, kvc_seq_id_t child) {
  if (!c) return KVC_ERR_INVALID_ARGUMENT;
  kvc__lock(c);
  kvc_bm_work_t w;
  kvc_status_t st = c->sticky;
  if (st == KVC_OK) st = kvc__tp_status(c, kvc_bm_seq_fork(c->bm, parent, child, &w));
  if (st == KVC_OK) {
    if (seq_set_add(&c->live, c->cfg.max_seqs, child))
      st = kvc__fail_device(c, KVC_ERR_INTERNAL, "forking");
    else
      st = kvc__run_work(c, &w, 0, NULL, c->last_stream);
  }
  kvc__unlock(c);
  return st;
}

kvc_status_t kvc_seq_free(kvc_cache_t *c, kvc_seq_id_t id) {
  if (!c) return KVC_ERR_INVALID_ARGUMENT;
  kvc__lock(c);
  kvc_bm_work_t w;
  kvc_status_t st = c->sticky;
  if (st == KVC_OK) st = kvc_bm_seq_free(c->bm, id, &w);
  if (st == KVC_OK) {
    if (seq_set_remove(&c->live, id))
      st = kvc__fail_device(c, KVC_ERR_INTERNAL, "freeing a sequence");
    else
      st = kvc__run_work(c, &w, 0, NULL, c->last_stream);
    close_finished_plan(c);
  }
  kvc__unlock(c);
  return st;
}

/* Places an extent for every block of the sequence (its table in swap_table[0..n)), as if all
 * of them moved: the block manager may move fewer (blocks shared with running sequences stay in
 * the pool), never more, so whatever it commits to has its place already. */
static kvc_status_t place_swap_extents(kvc_cache_t *c, int n) {
  for (int i = 0; i < n; i++) {
    int32_t b = c->swap_table[i];
    uint64_t len = kvc__swap_extent_bytes(c, b), off;
    if (c->swap_off[b] != UINT64_MAX) {
      while (i-- > 0) release_swap_extent(c, c->swap_table[i]);
      return kvc__fail_device(c, KVC_ERR_INTERNAL, "swap-out of a block already in swap");
    }
    if (kvc__swap_space_alloc(&c->swap, len, &off)) {
      while (i-- > 0) release_swap_extent(c, c->swap_table[i]);
      return KVC_ERR_OUT_OF_MEMORY;
    }
    c->swap_off[b] = off;
    c->swap_len[b] = len;
  }
  return KVC_OK;
}

kvc_status_t kvc_seq_swap_out(kvc_cache_t *c, kvc_seq_id_t id, void *stream) {
  if (!c) return KVC_ERR_INVALID_ARGUMENT;
  kvc__lock(c);
  kvc_status_t st = c->sticky;
  kvc_seq_info_t info;
  const int32_t *table = NULL;
  int n = 0;
  if (st == KVC_OK && c->cfg.swap_bytes == 0) st = KVC_ERR_UNSUPPORTED;
  if (st == KVC_OK) st = kvc_bm_seq_info(c->bm, id, &info);
  if (st == KVC_OK && info.state == KVC_SEQ_SWAPPED) st = KVC_ERR_INVALID_STATE;
  /* Swap space is accounted from measured page sizes (kvc__measure_seq). */
  if (st == KVC_OK) st = kvc__measure_seq(c, id, stream);
  if (st == KVC_OK) st = kvc_bm_seq_blocks(c->bm, id, &table, &n);
  if (st == KVC_OK && n > c->geo.max_seq_blocks)
    st = kvc__fail_device(c, KVC_ERR_INTERNAL, "swap-out of an oversized table");
  kvc_status_t space = KVC_OK; /* this rank's own placement: the manager agrees it with its own */
  if (st == KVC_OK) {
    if (n > 0) memcpy(c->swap_table, table, (size_t)n * sizeof(int32_t)); /* table: NULL if 0 */
    space = place_swap_extents(c, n);
    if (space != KVC_OK && space != KVC_ERR_OUT_OF_MEMORY) st = space;
  }
  if (st == KVC_OK) {
    kvc_bm_work_t w;
    st = kvc__tp_status(c, kvc_bm_seq_swap_out(c->bm, id, space, &w));
    if (st != KVC_OK) {
      if (space == KVC_OK)
        for (int i = 0; i < n; i++) release_swap_extent(c, c->swap_table[i]);
    } else {
      /* Blocks that stay in the pool give their extent back; the others' go in work order. */
      for (int i = 0; i < w.num_swap; i++) c->block_mark[w.swap_blocks[i]] = 1;
      for (int i = 0; i < n; i++)
        if (!c->block_mark[c->swap_table[i]]) release_swap_extent(c, c->swap_table[i]);
      for (int i = 0; i < w.num_swap; i++) {
        c->block_mark[w.swap_blocks[i]] = 0;
        c->swap_work_off[i] = c->swap_off[w.swap_blocks[i]];
      }
      st = kvc__run_work(c, &w, 1, NULL, stream);
      close_finished_plan(c);
    }
  }
  kvc__unlock(c);
  return st;
}

kvc_status_t kvc_seq_swap_in(kvc_cache_t *c, kvc_seq_id_t id, void *stream) {
  if (!c) return KVC_ERR_INVALID_ARGUMENT;
  kvc__lock(c);
  kvc_bm_work_t w;
  kvc_status_t st = c->sticky;
  if (st == KVC_OK && c->cfg.swap_bytes == 0) st = KVC_ERR_UNSUPPORTED;
  if (st == KVC_OK) st = kvc__tp_status(c, kvc_bm_seq_swap_in(c->bm, id, &w));
  if (st == KVC_OK && w.num_swap > c->geo.max_seq_blocks)
    st = kvc__fail_device(c, KVC_ERR_INTERNAL, "swap-in of an oversized table");
  if (st == KVC_OK) st = kvc__run_work(c, &w, -1, NULL, stream);
  kvc__unlock(c);
  return st;
}

kvc_status_t kvc_seq_info(const kvc_cache_t *cc, kvc_seq_id_t id, kvc_seq_info_t *out) {
  if (!cc || !out) return KVC_ERR_INVALID_ARGUMENT;
  kvc_cache_t *c = kvc__lock(cc);
  kvc_status_t st = kvc_bm_seq_info(c->bm, id, out);
  kvc__unlock(c);
  return st;
}

kvc_status_t kvc_tokens_fit(const kvc_cache_t *cc, int64_t *n_tokens) {
  if (!cc || !n_tokens) return KVC_ERR_INVALID_ARGUMENT;
  kvc_cache_t *c = kvc__lock(cc);
  *n_tokens = kvc_bm_tokens_fit(c->bm);
  kvc__unlock(c);
  return KVC_OK;
}

kvc_status_t kvc_tokens_fit_agreed(kvc_cache_t *c, int64_t *n_tokens) {
  if (!c || !n_tokens) return KVC_ERR_INVALID_ARGUMENT;
  kvc__lock(c);
  kvc_status_t st = c->sticky;
  int64_t fit = kvc_bm_tokens_fit(c->bm), neg = -fit;
  if (st == KVC_OK && c->cfg.tp_allreduce_max) {
    /* The smallest estimate; one above this rank's own means the exchange is no maximum. */
    if (c->cfg.tp_allreduce_max(c->cfg.tp_user, &neg, 1) != 0 || -neg > fit)
      st = kvc__tp_status(c, KVC_ERR_NCCL);
    else
      fit = -neg;
  }
  if (st == KVC_OK) *n_tokens = fit;
  kvc__unlock(c);
  return st;
}

/* ---- plan / store / attend ----------------------------------------------------------------- */

/* Everything after the block manager accepted the plan; failures here are device failures. */
static kvc_status_t begin_step(kvc_cache_t *c, const kvc_bm_plan_t *p, void *stream) {
  const kvc__geometry_t *g = &c->geo;
  if (p->num_seqs > g->max_plan_seqs || p->total_rows > g->max_rows || p->num_jobs > g->max_jobs ||
      p->block_indptr[p->num_seqs] > g->max_table_entries || p->num_new_staging > g->max_plan_seqs)
    return kvc__fail_device(c, KVC_ERR_INTERNAL, "planning (plan larger than its bounds)");
  /* The previous step's attends are over: its completed blocks are compressed now, before the
   * upload below replaces the job list the device reads. Their sizes leave before this step's
   * compression overwrites them. */
  kvc_status_t st = compress_deferred(c, stream);
  if (st == KVC_OK) st = fetch_step_sizes(c, stream);
  if (st != KVC_OK) return st;
  c->plan = *p;
  c->step = p->step;
  memset(c->layer_stored, 0, (size_t)c->cfg.num_layers);
  c->layers_stored = 0;
  c->step_fetched = 0;
  c->plan_valid = 0;
  c->step_num_jobs = p->num_jobs;
  memcpy(c->step_job_block, p->job_block, (size_t)p->num_jobs * sizeof(int32_t));
  for (int j = 0; j < p->num_jobs; j++) c->pending_step[p->job_block[j]] = c->step;
  st = poll_slots(c, 0);
  if (st != KVC_OK) return st;
  st = c->ops->plan(c, stream);
  if (st != KVC_OK) return kvc__fail_device(c, st, "uploading the plan");
  c->plan_valid = 1;
  return KVC_OK;
}

kvc_status_t kvc_plan(kvc_cache_t *c, const kvc_batch_t *batch, void *stream) {
  if (!c || !batch || batch->num_seqs < 1 || !batch->seq_ids || !batch->num_new_tokens)
    return KVC_ERR_INVALID_ARGUMENT;
  kvc__lock(c);
  kvc_status_t st = c->sticky;
  kvc_bm_plan_t p;
  kvc_bm_batch_t bb = {batch->num_seqs, batch->seq_ids, batch->num_new_tokens, batch->token_ids};
  if (st == KVC_OK) st = kvc_bm_plan(c->bm, &bb, &p);
  if (st == KVC_OK) st = begin_step(c, &p, stream);
  kvc__unlock(c);
  return st;
}

kvc_status_t kvc_store(kvc_cache_t *c, int layer, const void *k, const void *v, void *stream) {
  if (!c) return KVC_ERR_INVALID_ARGUMENT;
  kvc__lock(c);
  kvc_status_t st = c->sticky;
  if (st == KVC_OK && (layer < 0 || layer >= c->cfg.num_layers || !k || !v))
    st = KVC_ERR_INVALID_ARGUMENT;
  if (st == KVC_OK && (!c->plan_valid || c->layer_stored[layer])) st = KVC_ERR_INVALID_STATE;
  if (st == KVC_OK) {
    st = c->ops->store(c, layer, k, v, stream);
    if (st != KVC_OK) st = kvc__fail_device(c, st, "storing");
  }
  if (st == KVC_OK) {
    const kvc_bm_plan_t *p = &c->plan;
    for (int i = 0; i < p->num_new_staging; i++)
      kvc__meta_set(c, layer, p->new_staging[i], KVC_PAGE_STAGING, c->geo.staging_bytes, 0, 0, 0);
    /* Completed blocks hold their rows in staging pages until compress_deferred. */
    for (int j = 0; j < p->num_jobs; j++)
      kvc__meta_set(c, layer, p->job_block[j], KVC_PAGE_STAGING, c->geo.staging_bytes, 0, 0, 0);
    if (p->num_jobs > 0) {
      c->layer_deferred[layer] = 1;
      c->layers_deferred++;
    }
    c->layer_stored[layer] = 1;
    if (++c->layers_stored == c->cfg.num_layers) kvc_bm_step_done(c->bm);
  }
  kvc__unlock(c);
  return st;
}

kvc_status_t kvc_attend(kvc_cache_t *c, int layer, const void *q, void *out, float scale,
                        void *stream) {
  if (!c) return KVC_ERR_INVALID_ARGUMENT;
  kvc__lock(c);
  kvc_status_t st = c->sticky;
  if (st == KVC_OK &&
      (layer < 0 || layer >= c->cfg.num_layers || !q || !out || !isfinite(scale) || scale <= 0.0f))
    st = KVC_ERR_INVALID_ARGUMENT;
  if (st == KVC_OK && (!c->plan_valid || !c->layer_stored[layer])) st = KVC_ERR_INVALID_STATE;
  /* Attention only reads: a failure leaves the cache as it was. */
  if (st == KVC_OK) st = c->ops->attend(c, layer, q, out, scale, stream);
  kvc__unlock(c);
  return st;
}

kvc_status_t kvc_cache_synchronize(kvc_cache_t *c) {
  if (!c) return KVC_ERR_INVALID_ARGUMENT;
  kvc__lock(c);
  kvc_status_t st = c->sticky;
  if (st == KVC_OK) st = compress_deferred(c, c->last_stream);
  if (st == KVC_OK) st = kvc__collect_all(c);
  kvc__unlock(c);
  return st;
}

/* ---- test accessors (kvc_cache_test.h) ----------------------------------------------------- */

kvc_host_alloc_t *kvc__cache_host_alloc(kvc_cache_t *c) { return c->ha; }

kvc_status_t kvc__cache_read_page(kvc_cache_t *c, int layer, int32_t block, kvc_page_entry_t *entry,
                                  uint8_t *out, size_t cap) {
  if (!c || !entry || layer < 0 || layer >= c->cfg.num_layers || block < 0 ||
      block >= c->geo.max_blocks)
    return KVC_ERR_INVALID_ARGUMENT;
  kvc__lock(c);
  kvc_status_t st = c->ops->read_entry(c, layer, block, entry);
  if (st == KVC_OK && entry->kind != KVC_PAGE_EMPTY) {
    if (!out || cap < entry->nbytes)
      st = KVC_ERR_INVALID_ARGUMENT;
    else
      st = c->ops->read_page(c, entry, out);
  }
  kvc__unlock(c);
  return st;
}

kvc_status_t kvc__cache_seq_blocks(kvc_cache_t *c, kvc_seq_id_t id, int32_t *blocks, int cap,
                                   int *n) {
  if (!c || !n) return KVC_ERR_INVALID_ARGUMENT;
  kvc__lock(c);
  const int32_t *table = NULL;
  kvc_status_t st = kvc_bm_seq_blocks(c->bm, id, &table, n);
  if (st == KVC_OK && *n <= cap && blocks) {
    if (*n > 0) memcpy(blocks, table, (size_t)*n * sizeof(int32_t)); /* table: NULL if 0 */
  } else if (st == KVC_OK)
    st = KVC_ERR_INVALID_ARGUMENT;
  kvc__unlock(c);
  return st;
}

void kvc__cache_geometry(const kvc_cache_t *c, uint32_t *chunk_bytes, uint32_t *max_page_bytes,
                         int32_t *max_blocks) {
  if (chunk_bytes) *chunk_bytes = c->geo.chunk_bytes;
  if (max_page_bytes) *max_page_bytes = c->geo.max_page_bytes;
  if (max_blocks) *max_blocks = c->geo.max_blocks;
}
