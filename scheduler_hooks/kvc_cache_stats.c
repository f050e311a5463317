/*
 * Observability and self-checks: kvc_get_stats, kvc_stats_prometheus, kvc_poll_events and
 * kvc_cache_validate.
 *
 * Validation compares three views that are maintained independently: the block manager's (its
 * own kvc_bm_validate, its tables and counters), the host mirror of the directories, and the
 * backend's actual directories and free stack (copied to the host on CUDA). Every chunk must be
 * on the free stack or in exactly one directory entry; every entry must agree with the mirror;
 * every block of a running sequence must hold the page its length implies (compressed when full,
 * or a full staging page while its compression is deferred; staging when partial; nothing
 * beyond); blocks holding pages that no sequence references are exactly the block manager's
 * cached blocks; the mirror's counters and the block manager's measured-page accounting must
 * add up.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "scheduler_hooks/kvc_backend.h"

#define KVC__STATS_MIN_SIZE (offsetof(kvc_stats_t, pages_by_codec) + 3 * sizeof(int64_t))

static kvc_cache_t *lock(const kvc_cache_t *cc) {
  kvc_cache_t *c = (kvc_cache_t *)cc;
  pthread_mutex_lock(&c->mu);
  return c;
}

static void unlock(kvc_cache_t *c) { pthread_mutex_unlock(&c->mu); }

/* ---- stats --------------------------------------------------------------------------------- */

static void fill_stats(const kvc_cache_t *c, kvc_stats_t *s) {
  kvc_bm_stats_t b;
  kvc_bm_get_stats(c->bm, &b);
  const uint64_t cb = c->geo.chunk_bytes;
  memset(s, 0, sizeof(*s));
  s->struct_size = sizeof(*s);
  s->pool_bytes = (size_t)((uint64_t)c->geo.total_chunks * cb);
  s->page_bytes = (size_t)c->measured_bytes;
  s->page_alloc_bytes = (size_t)(c->measured_chunks * cb);
  s->staging_bytes = (size_t)((uint64_t)c->staging_pages * c->geo.staging_chunks * cb);
  s->reserved_bytes = (size_t)(((uint64_t)b.reserved_chunks + b.unmeasured_chunks) * cb);
  s->free_bytes = (size_t)((uint64_t)b.free_chunks * cb);
  size_t host = kvc_host_alloc_bytes(c->ha), data = c->ops->host_data_bytes(c);
  s->metadata_bytes = (host > data ? host - data : 0) + c->ops->overhead_bytes(c);
  s->fragmentation = s->page_alloc_bytes ? (double)(s->page_alloc_bytes - s->page_bytes) /
                                               (double)s->page_alloc_bytes
                                         : 0.0;
  /* Every compressed page holds one full block of one layer: staging_bytes of raw K/V. */
  s->compression_ratio =
      s->page_bytes ? (double)c->measured_pages * c->geo.staging_bytes / (double)s->page_bytes
                    : 0.0;
  s->tokens_stored = b.tokens_stored;
  s->live_seqs = b.live_seqs;
  s->swapped_seqs = b.swapped_seqs;
  s->cached_blocks = b.cached_blocks;
  s->prefix_queries = b.prefix_queries;
  s->prefix_hits = b.prefix_hits;
  s->evictions = b.evictions;
  s->swap_outs = b.swap_outs;
  s->swap_ins = b.swap_ins;
  for (int i = 0; i < 3; i++) s->pages_by_codec[i] = c->pages_by_codec[i];
}

kvc_status_t kvc_get_stats(const kvc_cache_t *cc, kvc_stats_t *out) {
  if (!cc || !out || out->struct_size < KVC__STATS_MIN_SIZE) return KVC_ERR_INVALID_ARGUMENT;
  kvc_stats_t s;
  kvc_cache_t *c = lock(cc);
  fill_stats(c, &s);
  unlock(c);
  size_t n = out->struct_size < sizeof(s) ? out->struct_size : sizeof(s);
  s.struct_size = n;
  memcpy(out, &s, n);
  return KVC_OK;
}

/* Appends to buf[cap] while it fits, and counts what the whole text needs either way. */
typedef struct text {
  char *buf;
  size_t cap, len;
} text_t;

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static void
put(text_t *t, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  size_t room = t->len < t->cap ? t->cap - t->len : 0;
  int n = vsnprintf(room ? t->buf + t->len : NULL, room, fmt, ap);
  va_end(ap);
  if (n > 0) t->len += (size_t)n;
}

static void metric(text_t *t, const char *name, const char *type, const char *help, double v) {
  put(t, "# HELP %s %s\n# TYPE %s %s\n%s %.17g\n", name, help, name, type, name, v);
}

static void prometheus_text(const kvc_stats_t *s, text_t *t) {
  metric(t, "kvc_pool_bytes", "gauge", "Bytes of the pool.", (double)s->pool_bytes);
  metric(t, "kvc_page_bytes", "gauge",
         "Bytes of compressed pages (headers, codebooks and scales included).",
         (double)s->page_bytes);
  metric(t, "kvc_page_alloc_bytes", "gauge", "Chunk bytes the compressed pages occupy.",
         (double)s->page_alloc_bytes);
  metric(t, "kvc_staging_bytes", "gauge", "Chunk bytes of uncompressed tail blocks.",
         (double)s->staging_bytes);
  metric(t, "kvc_reserved_bytes", "gauge",
         "Chunk bytes promised to reservations and to pages of unknown size.",
         (double)s->reserved_bytes);
  metric(t, "kvc_free_bytes", "gauge", "Chunk bytes available to new reservations.",
         (double)s->free_bytes);
  metric(t, "kvc_metadata_bytes", "gauge", "Bytes of directories, tables and host metadata.",
         (double)s->metadata_bytes);
  metric(t, "kvc_fragmentation_ratio", "gauge",
         "Unused share of the chunk bytes held by compressed pages.", s->fragmentation);
  metric(t, "kvc_compression_ratio", "gauge", "Raw bytes of compressed blocks over their pages.",
         s->compression_ratio);
  metric(t, "kvc_tokens_stored", "gauge", "Tokens held by live sequences (shared blocks once).",
         (double)s->tokens_stored);
  metric(t, "kvc_live_sequences", "gauge", "Live sequences (running and swapped).",
         (double)s->live_seqs);
  metric(t, "kvc_swapped_sequences", "gauge", "Sequences swapped out to host memory.",
         (double)s->swapped_seqs);
  metric(t, "kvc_cached_blocks", "gauge", "Full blocks addressable by the prefix cache.",
         (double)s->cached_blocks);
  metric(t, "kvc_prefix_queries_total", "counter", "Blocks looked up in the prefix cache.",
         (double)s->prefix_queries);
  metric(t, "kvc_prefix_hits_total", "counter", "Blocks found in the prefix cache.",
         (double)s->prefix_hits);
  metric(t, "kvc_evictions_total", "counter", "Cached blocks evicted to make room.",
         (double)s->evictions);
  metric(t, "kvc_swap_outs_total", "counter", "Sequences swapped out.", (double)s->swap_outs);
  metric(t, "kvc_swap_ins_total", "counter", "Sequences swapped in.", (double)s->swap_ins);
  static const char *const codec_names[3] = {"raw", "bitpack", "huffman"};
  put(t, "# HELP kvc_pages Compressed pages in the pool by codec.\n# TYPE kvc_pages gauge\n");
  for (int i = 0; i < 3; i++)
    put(t, "kvc_pages{codec=\"%s\"} %lld\n", codec_names[i], (long long)s->pages_by_codec[i]);
}

kvc_status_t kvc_stats_prometheus(const kvc_cache_t *cc, char *buf, size_t cap, size_t *needed) {
  if (!cc || !needed || (cap > 0 && !buf)) return KVC_ERR_INVALID_ARGUMENT;
  kvc_stats_t s;
  kvc_cache_t *c = lock(cc);
  fill_stats(c, &s);
  unlock(c);
  text_t measure = {NULL, 0, 0};
  prometheus_text(&s, &measure);
  *needed = measure.len;
  if (cap < measure.len + 1) return KVC_ERR_INVALID_ARGUMENT;
  text_t out = {buf, cap, 0};
  prometheus_text(&s, &out);
  return KVC_OK;
}

/* ---- events -------------------------------------------------------------------------------- */

kvc_status_t kvc_poll_events(kvc_cache_t *c, kvc_event_t *events, int cap, int *n,
                             int64_t *dropped) {
  if (!c || !n || cap < 0 || (cap > 0 && !events)) return KVC_ERR_INVALID_ARGUMENT;
  lock(c);
  int m = c->ev_count < cap ? c->ev_count : cap;
  for (int i = 0; i < m; i++) events[i] = c->events[(c->ev_first + i) % KVC__EVENT_CAP];
  c->ev_first = (c->ev_first + m) % KVC__EVENT_CAP;
  c->ev_count -= m;
  *n = m;
  if (dropped) *dropped = c->ev_dropped;
  c->ev_dropped = 0;
  unlock(c);
  return KVC_OK;
}

/* ---- validation ---------------------------------------------------------------------------- */

typedef struct vstate {
  kvc_page_entry_t *dir; /* [L][max_blocks] the backend's directories */
  uint32_t *stack;       /* [total_chunks] */
  uint8_t *chunk_seen;   /* [total_chunks] */
  uint8_t *referenced;   /* [max_blocks] in the table of a live sequence */
} vstate_t;

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static kvc_status_t
invalid(const kvc_cache_t *c, const char *fmt, ...) {
  char line[400];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof(line), fmt, ap);
  va_end(ap);
  kvc__log(c, KVC_LOG_ERROR, "kvc_cache_validate: %s", line);
  return KVC_ERR_INTERNAL;
}

static kvc_status_t check_chunks(const kvc_cache_t *c, vstate_t *v, int32_t top) {
  const uint32_t total = c->geo.total_chunks, cb = c->geo.chunk_bytes;
  uint64_t seen = 0;
  if (top < 0 || (uint32_t)top > total) return invalid(c, "free stack top %d of %u", top, total);
  for (int32_t i = 0; i < top; i++) {
    uint32_t id = v->stack[i];
    if (id >= total || v->chunk_seen[id]) return invalid(c, "free stack entry %d: chunk %u", i, id);
    v->chunk_seen[id] = 1;
    seen++;
  }
  for (int l = 0; l < c->cfg.num_layers; l++) {
    for (int32_t b = 0; b < c->geo.max_blocks; b++) {
      const size_t MB = (size_t)c->geo.max_blocks;
      const kvc_page_entry_t *e = &v->dir[(size_t)l * MB + (size_t)b];
      /* A packed page starts where packing puts it after the block's page of layer l - 1: in
       * that page's last chunk, just past its end. */
      if (e->first) {
        const kvc_page_entry_t *pe = l > 0 ? &v->dir[(size_t)(l - 1) * MB + (size_t)b] : NULL;
        int ok = e->kind == KVC_PAGE_COMPRESSED && pe && pe->kind == KVC_PAGE_COMPRESSED &&
                 pe->nchunks >= 1 && pe->nchunks <= KVC_PAGE_MAX_CHUNKS;
        if (ok) {
          const kvc_pack_cursor_t pc = kvc_pack_cursor_after(pe, l - 1, pe->nbytes, cb);
          ok = pc.chunk == e->chunk[0] && e->first == kvc_pack_after(&pc, l, cb);
        }
        if (!ok)
          return invalid(c, "layer %d block %d: packed page not after its previous layer's", l,
                         (int)b);
      }
      for (int i = (int)kvc_page_own_first(e); i < e->nchunks && i < KVC_PAGE_MAX_CHUNKS; i++) {
        uint32_t id = e->chunk[i];
        if (id >= total || v->chunk_seen[id])
          return invalid(c, "layer %d block %d chunk %u is out of range or owned twice", l, (int)b,
                         id);
        v->chunk_seen[id] = 1;
        seen++;
      }
    }
  }
  if (seen != total)
    return invalid(c, "%llu of %u chunks accounted for", (unsigned long long)seen, total);
  return KVC_OK;
}

/* Every entry against its mirror; the mirror's counters recomputed. */
static kvc_status_t check_entries(const kvc_cache_t *c, vstate_t *v) {
  const kvc__geometry_t *g = &c->geo;
  int64_t staging = 0, measured = 0, by_codec[3] = {0, 0, 0};
  uint64_t mbytes = 0, mchunks = 0;
  for (int l = 0; l < c->cfg.num_layers; l++) {
    for (int32_t b = 0; b < g->max_blocks; b++) {
      size_t at = (size_t)l * (size_t)g->max_blocks + (size_t)b;
      const kvc_page_entry_t *e = &v->dir[at];
      const kvc__page_meta_t *m = &c->meta[at];
      int want_kind = m->swapped ? KVC_PAGE_EMPTY : m->kind;
      if (e->kind != want_kind)
        return invalid(c, "layer %d block %d: directory kind %u, mirror %u%s", l, (int)b, e->kind,
                       m->kind, m->swapped ? " (swapped)" : "");
      if (m->swapped && c->swap_off[b] == UINT64_MAX)
        return invalid(c, "block %d swapped out without a swap extent", (int)b);
      switch (e->kind) {
      case KVC_PAGE_EMPTY:
        if (e->nchunks != 0)
          return invalid(c, "layer %d block %d: empty entry holds chunks", l, (int)b);
        break;
      case KVC_PAGE_STAGING:
        if (e->nbytes != g->staging_bytes || e->nchunks != g->staging_chunks)
          return invalid(c, "layer %d block %d: staging page of %u bytes in %u chunks", l, (int)b,
                         e->nbytes, e->nchunks);
        staging++;
        break;
      case KVC_PAGE_COMPRESSED:
        if (e->nbytes == 0 || e->nbytes > g->max_page_bytes || e->codec > KVC_CODEC_HUFFMAN ||
            e->nchunks != kvc_chunks_for(kvc_page_start(e, g->chunk_bytes) + (uint64_t)e->nbytes,
                                         g->chunk_bytes))
          return invalid(c, "layer %d block %d: compressed page of %u bytes, codec %u, %u chunks",
                         l, (int)b, e->nbytes, e->codec, e->nchunks);
        if (m->measured) {
          if (m->nbytes != e->nbytes || m->codec != e->codec ||
              m->chunks != e->nchunks - kvc_page_own_first(e))
            return invalid(c, "layer %d block %d: mirror says %u bytes codec %u, page %u codec %u",
                           l, (int)b, m->nbytes, m->codec, e->nbytes, e->codec);
          measured++;
          mbytes += e->nbytes;
          mchunks += e->nchunks - kvc_page_own_first(e);
          by_codec[e->codec]++;
        } else if (c->pending_step[b] == 0) {
          return invalid(c, "layer %d block %d: compressed page never measured", l, (int)b);
        }
        break;
      default: return invalid(c, "layer %d block %d: kind %u", l, (int)b, e->kind);
      }
    }
  }
  if (staging != c->staging_pages || measured != c->measured_pages || mbytes != c->measured_bytes ||
      mchunks != c->measured_chunks || by_codec[0] != c->pages_by_codec[0] ||
      by_codec[1] != c->pages_by_codec[1] || by_codec[2] != c->pages_by_codec[2])
    return invalid(c,
                   "mirror counters drifted: staging %lld/%lld measured %lld/%lld bytes "
                   "%llu/%llu",
                   (long long)staging, (long long)c->staging_pages, (long long)measured,
                   (long long)c->measured_pages, (unsigned long long)mbytes,
                   (unsigned long long)c->measured_bytes);
  return KVC_OK;
}

/* Blocks of live sequences hold what their lengths imply; the rest is the prefix cache. */
static kvc_status_t check_tables(const kvc_cache_t *c, vstate_t *v, const kvc_bm_stats_t *bs) {
  const int L = c->cfg.num_layers, bt = c->cfg.block_tokens;
  const size_t MB = (size_t)c->geo.max_blocks;
  if (c->live.n != bs->live_seqs)
    return invalid(c, "%d live sequences here, %lld in the block manager", c->live.n,
                   (long long)bs->live_seqs);
  for (int s = 0; s < c->live.n; s++) {
    kvc_seq_id_t id = c->live.ids[s];
    kvc_seq_info_t info;
    const int32_t *table;
    int n;
    if (kvc_bm_seq_info(c->bm, id, &info) != KVC_OK ||
        kvc_bm_seq_blocks(c->bm, id, &table, &n) != KVC_OK)
      return invalid(c, "live sequence %llu unknown to the block manager", (unsigned long long)id);
    for (int j = 0; j < n; j++) {
      int32_t b = table[j];
      int64_t tok = (int64_t)info.length - (int64_t)j * bt;
      int want = tok >= bt ? KVC_PAGE_COMPRESSED : tok > 0 ? KVC_PAGE_STAGING : KVC_PAGE_EMPTY;
      v->referenced[b] = 1;
      for (int l = 0; l < L; l++) {
        const kvc__page_meta_t *m = &c->meta[(size_t)l * MB + (size_t)b];
        int ok_kind = m->kind == want || (want == KVC_PAGE_COMPRESSED &&
                                          m->kind == KVC_PAGE_STAGING &&
                                          kvc__compress_pending(c, l, b));
        if (!ok_kind || (m->swapped && info.state != KVC_SEQ_SWAPPED))
          return invalid(c,
                         "sequence %llu (length %d%s) block %d (#%d) layer %d holds kind %u%s, "
                         "expected %d",
                         (unsigned long long)id, info.length,
                         info.state == KVC_SEQ_SWAPPED ? ", swapped" : "", (int)b, j, l, m->kind,
                         m->swapped ? " (swapped)" : "", want);
      }
    }
  }
  int64_t cached = 0, swapped_blocks = 0;
  for (size_t b = 0; b < MB; b++) {
    int has_pages = 0;
    for (int l = 0; l < L; l++) has_pages |= v->dir[(size_t)l * MB + b].kind != KVC_PAGE_EMPTY;
    if (c->swap_off[b] != UINT64_MAX) swapped_blocks++;
    if (v->referenced[b] || !has_pages) continue;
    for (int l = 0; l < L; l++) {
      uint8_t kind = v->dir[(size_t)l * MB + b].kind;
      if (kind != KVC_PAGE_COMPRESSED &&
          !(kind == KVC_PAGE_STAGING && kvc__compress_pending(c, l, (int32_t)b)))
        return invalid(c, "unreferenced block %d layer %d is not a compressed page", (int)b, l);
    }
    cached++;
  }
  if (cached != bs->cached_blocks)
    return invalid(c, "%lld unreferenced blocks hold pages, the block manager caches %lld",
                   (long long)cached, (long long)bs->cached_blocks);
  if (swapped_blocks != bs->swapped_blocks || swapped_blocks != c->swap.extents)
    return invalid(
        c, "%lld blocks have swap extents, %lld swapped in the block manager, %lld extents",
        (long long)swapped_blocks, (long long)bs->swapped_blocks, (long long)c->swap.extents);
  return KVC_OK;
}

kvc_status_t kvc__validate_locked(kvc_cache_t *c) {
  char why[256] = "";
  kvc_status_t st = kvc__collect_all(c);
  if (st != KVC_OK) return st;
  if (kvc_bm_validate(c->bm, why, sizeof(why)) != KVC_OK)
    return invalid(c, "block manager: %s", why);
  if (kvc__swap_space_check(&c->swap, why, sizeof(why)) != KVC_OK) return invalid(c, "%s", why);

  const size_t L = (size_t)c->cfg.num_layers, MB = (size_t)c->geo.max_blocks;
  vstate_t v;
  v.dir = kvc_host_malloc(c->ha, L * MB * sizeof(kvc_page_entry_t));
  v.stack = kvc_host_malloc(c->ha, (size_t)c->geo.total_chunks * sizeof(uint32_t));
  v.chunk_seen = kvc_host_calloc(c->ha, c->geo.total_chunks, 1);
  v.referenced = kvc_host_calloc(c->ha, MB, 1);
  int32_t top = 0;
  if (!v.dir || !v.stack || !v.chunk_seen || !v.referenced) st = KVC_ERR_OUT_OF_HOST_MEMORY;
  if (st == KVC_OK) st = c->ops->read_state(c, v.dir, v.stack, &top);
  if (st != KVC_OK && st != KVC_ERR_OUT_OF_HOST_MEMORY)
    st = invalid(c, "reading the backend's state: %s", kvc_status_string(st));
  if (st == KVC_OK) st = check_chunks(c, &v, top);
  if (st == KVC_OK) st = check_entries(c, &v);
  if (st == KVC_OK) {
    kvc_bm_stats_t bs;
    kvc_bm_get_stats(c->bm, &bs);
    uint64_t in_use = c->geo.total_chunks - (uint32_t)top;
    if (in_use > bs.charged_chunks)
      st = invalid(c, "%llu chunks in use, %u charged", (unsigned long long)in_use,
                   bs.charged_chunks);
    else if (bs.measured_page_bytes != c->measured_bytes ||
             bs.measured_page_chunks != c->measured_chunks ||
             bs.measured_pages != c->measured_pages)
      st = invalid(c,
                   "measured pages: block manager %lld pages %llu bytes %u chunks, mirror %lld "
                   "pages %llu bytes %llu chunks",
                   (long long)bs.measured_pages, (unsigned long long)bs.measured_page_bytes,
                   bs.measured_page_chunks, (long long)c->measured_pages,
                   (unsigned long long)c->measured_bytes, (unsigned long long)c->measured_chunks);
    /* Mid-step, layers not stored yet legitimately lag the tables. */
    else if (!kvc_bm_step_open(c->bm))
      st = check_tables(c, &v, &bs);
  }
  kvc_host_free(c->ha, v.dir);
  kvc_host_free(c->ha, v.stack);
  kvc_host_free(c->ha, v.chunk_seen);
  kvc_host_free(c->ha, v.referenced);
  return st;
}

kvc_status_t kvc_cache_validate(kvc_cache_t *c) {
  if (!c) return KVC_ERR_INVALID_ARGUMENT;
  lock(c);
  kvc_status_t st = c->sticky;
  if (st == KVC_OK) st = kvc__validate_locked(c);
  unlock(c);
  return st;
}
