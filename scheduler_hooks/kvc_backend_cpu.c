/*
 * The CPU backend: the pool, directories and free stack in host memory (from the cache's host
 * allocator), the same protocol as the CUDA backend (chunks popped from and pushed to a stack,
 * staging pages, one compress scratch block per job), executed at once. It is the reference the
 * CUDA backend is compared with, and what CI runs end to end. As there, a new staging page is not
 * cleared: its slots past the tail's length are unspecified and never read.
 */
#include <string.h>

#include "attention/kvc_attn.h"
#include "scheduler_hooks/kvc_backend.h"

typedef struct cpu_be {
  uint8_t *pool;        /* [total_chunks * chunk_bytes] */
  uint32_t *free_stack; /* [total_chunks]; free_stack[0 .. free_top) are free chunk ids */
  int32_t free_top;
  kvc_page_entry_t *dir; /* [num_layers][max_blocks] */
  uint8_t *scratch;      // [max_jobs][2][num_kv_heads][block_tokens][head_dim] staging layout
  uint8_t *page_buf;     /* [max_page_bytes]: one encoded page before it is scattered */
  void *encode_work;     /* [kvc_codec_work_bytes]: the encoder's work buffer */
  uint32_t *page_bytes;  /* [num_layers][max_jobs] sizes of this step's pages */
  uint8_t *page_codec;   /* [num_layers][max_jobs] */
  uint8_t *page_chunks;  /* [num_layers][max_jobs] chunks each page took from the stack */
  uint32_t *slot_bytes;  /* [KVC__SIZE_SLOTS][num_layers][max_jobs] */
  uint8_t *slot_codec;   /* [KVC__SIZE_SLOTS][num_layers][max_jobs] */
  uint8_t *slot_chunks;  /* [KVC__SIZE_SLOTS][num_layers][max_jobs] */
  kvc_pack_cursor_t *cursor; /* [max_blocks] where each block's last compressed page ended */
  uint8_t *swap;         /* [swap_bytes] */
  kvc_attn_args_t attn;  /* the step's attention arguments, less layer and tensors */
} cpu_be_t;

static cpu_be_t *be_of(const kvc_cache_t *c) { return (cpu_be_t *)c->be; }

static kvc_page_entry_t *entry(cpu_be_t *be, const kvc_cache_t *c, int layer, int32_t block) {
  return be->dir + (size_t)layer * (size_t)c->geo.max_blocks + (size_t)block;
}

/* Page bytes [off, off + n) <-> flat memory, split where the page's chunks end. */
static void page_write(const kvc_cache_t *c, uint8_t *pool, const kvc_page_entry_t *e, uint32_t off,
                       const uint8_t *src, size_t n) {
  const uint32_t cb = c->geo.chunk_bytes;
  while (n > 0) {
    size_t room = kvc_page_run(e, cb, off), m = n < room ? n : room;
    memcpy(kvc_page_byte(pool, cb, e, off), src, m);
    off += (uint32_t)m;
    src += m;
    n -= m;
  }
}

static void page_read(const kvc_cache_t *c, uint8_t *pool, const kvc_page_entry_t *e, uint32_t off,
                      uint8_t *dst, size_t n) {
  const uint32_t cb = c->geo.chunk_bytes;
  while (n > 0) {
    size_t room = kvc_page_run(e, cb, off), m = n < room ? n : room;
    memcpy(dst, kvc_page_byte(pool, cb, e, off), m);
    off += (uint32_t)m;
    dst += m;
    n -= m;
  }
}

/* Takes n chunks into e->chunk[at .. at + n) (at: 1 after a shared chunk, else 0). The block
 * manager's accounting makes a dry stack impossible; if it happens anyway the entry stays as it
 * was and the caller reports KVC_ERR_INTERNAL. */
static int pop_chunks(cpu_be_t *be, kvc_page_entry_t *e, uint32_t at, uint32_t n) {
  if (at + n > KVC_PAGE_MAX_CHUNKS || (uint32_t)be->free_top < n) return -1;
  /* The top n, top first; pushes put a page's first chunk on top: runs of ascending ids stay in
   * order, as on the CUDA backend (kvc_backend_cuda.cu: pop_chunks). */
  for (uint32_t i = 0; i < n; i++) e->chunk[at + i] = be->free_stack[be->free_top - 1 - (int)i];
  be->free_top -= (int32_t)n;
  e->nchunks = (uint8_t)(at + n);
  return 0;
}

/* Gives back the chunks the page owns (not a shared chunk[0]). */
static void release_entry(cpu_be_t *be, kvc_page_entry_t *e) {
  const uint32_t own = kvc_page_own_first(e);
  for (uint32_t i = e->nchunks; i > own; i--) be->free_stack[be->free_top++] = e->chunk[i - 1];
  e->nbytes = 0;
  e->kind = KVC_PAGE_EMPTY;
  e->nchunks = 0;
  e->codec = 0;
  e->first = 0;
}

/* Takes chunks for a compressed page of `bytes` of `block` in `layer`, packed after the block's
 * previous page when that was `layer` - 1's (kvc_pool_layout.h) and `pack`; sets the entry's
 * chunks and `first` and moves the block's cursor. Returns the chunks taken, or -1 (dry). */
static int take_page(cpu_be_t *be, const kvc_cache_t *c, kvc_page_entry_t *e, int32_t block,
                     int layer, uint32_t bytes, int pack) {
  const uint32_t cb = c->geo.chunk_bytes;
  kvc_pack_cursor_t *cur = &be->cursor[block];
  const uint32_t first = pack ? kvc_pack_after(cur, layer, cb) : 0;
  const uint32_t n = kvc_pack_popped(first, bytes, cb);
  if (pop_chunks(be, e, first ? 1 : 0, n)) return -1;
  if (first) e->chunk[0] = cur->chunk;
  e->first = (uint8_t)first;
  *cur = kvc_pack_cursor_after(e, layer, bytes, cb);
  return (int)n;
}

static void cpu_destroy(kvc_cache_t *c) {
  cpu_be_t *be = be_of(c);
  if (!be) return;
  kvc_host_free(c->ha, be->pool);
  kvc_host_free(c->ha, be->free_stack);
  kvc_host_free(c->ha, be->dir);
  kvc_host_free(c->ha, be->scratch);
  kvc_host_free(c->ha, be->page_buf);
  kvc_host_free(c->ha, be->encode_work);
  kvc_host_free(c->ha, be->page_bytes);
  kvc_host_free(c->ha, be->page_codec);
  kvc_host_free(c->ha, be->page_chunks);
  kvc_host_free(c->ha, be->slot_bytes);
  kvc_host_free(c->ha, be->slot_codec);
  kvc_host_free(c->ha, be->slot_chunks);
  kvc_host_free(c->ha, be->cursor);
  kvc_host_free(c->ha, be->swap);
  kvc_host_free(c->ha, be);
  c->be = NULL;
}

static kvc_status_t cpu_create(kvc_cache_t *c) {
  const kvc__geometry_t *g = &c->geo;
  size_t L = (size_t)c->cfg.num_layers, jobs = (size_t)g->max_jobs;
  cpu_be_t *be = kvc_host_calloc(c->ha, 1, sizeof(*be));
  if (!be) return KVC_ERR_OUT_OF_HOST_MEMORY;
  c->be = be;
  be->pool = kvc_host_malloc(c->ha, (size_t)g->total_chunks * g->chunk_bytes);
  be->free_stack = kvc_host_malloc(c->ha, (size_t)g->total_chunks * sizeof(uint32_t));
  be->dir = kvc_host_calloc(c->ha, L * (size_t)g->max_blocks, sizeof(kvc_page_entry_t));
  be->scratch = kvc_host_malloc(c->ha, jobs * g->staging_bytes);
  be->page_buf = kvc_host_malloc(c->ha, g->max_page_bytes);
  be->encode_work = kvc_host_malloc(c->ha, kvc_codec_work_bytes(&c->codec));
  be->page_bytes = kvc_host_calloc(c->ha, L * jobs, sizeof(uint32_t));
  be->page_codec = kvc_host_calloc(c->ha, L * jobs, 1);
  be->page_chunks = kvc_host_calloc(c->ha, L * jobs, 1);
  be->slot_bytes = kvc_host_calloc(c->ha, KVC__SIZE_SLOTS * L * jobs, sizeof(uint32_t));
  be->slot_codec = kvc_host_calloc(c->ha, KVC__SIZE_SLOTS * L * jobs, 1);
  be->slot_chunks = kvc_host_calloc(c->ha, KVC__SIZE_SLOTS * L * jobs, 1);
  be->cursor = kvc_host_malloc(c->ha, (size_t)g->max_blocks * sizeof(kvc_pack_cursor_t));
  if (c->cfg.swap_bytes) be->swap = kvc_host_malloc(c->ha, c->cfg.swap_bytes);
  if (!be->pool || !be->free_stack || !be->dir || !be->scratch || !be->page_buf ||
      !be->encode_work || !be->page_bytes || !be->page_codec || !be->page_chunks ||
      !be->slot_bytes || !be->slot_codec || !be->slot_chunks || !be->cursor ||
      (c->cfg.swap_bytes && !be->swap)) {
    cpu_destroy(c);
    return KVC_ERR_OUT_OF_HOST_MEMORY;
  }
  /* Low chunk ids on top, so a fresh cache fills the pool from its start. */
  for (uint32_t i = 0; i < g->total_chunks; i++) be->free_stack[i] = g->total_chunks - 1 - i;
  be->free_top = (int32_t)g->total_chunks;
  for (int32_t b = 0; b < g->max_blocks; b++) be->cursor[b].layer = -1;
  return KVC_OK;
}

static kvc_status_t cpu_plan(kvc_cache_t *c, void *stream) {
  cpu_be_t *be = be_of(c);
  const kvc_bm_plan_t *p = &c->plan;
  int max_qo = 0;
  for (int s = 0; s < p->num_seqs; s++) {
    int n = p->qo_indptr[s + 1] - p->qo_indptr[s];
    if (n > max_qo) max_qo = n;
  }
  kvc_attn_args_t a;
  memset(&a, 0, sizeof(a));
  a.num_q_heads = c->cfg.num_q_heads;
  a.num_kv_heads = c->cfg.num_kv_heads;
  a.head_dim = c->cfg.head_dim;
  a.block_tokens = c->cfg.block_tokens;
  a.dtype = c->cfg.dtype;
  a.num_seqs = p->num_seqs;
  a.total_q_rows = p->total_rows;
  a.qo_indptr = p->qo_indptr;
  a.kv_len = p->kv_len;
  a.block_indptr = p->block_indptr;
  a.block_ids = p->block_ids;
  a.max_kv_len = p->max_kv_len;
  a.max_qo_len = max_qo;
  a.pool = be->pool;
  a.chunk_bytes = c->geo.chunk_bytes;
  be->attn = a;
  return KVC_OK;
}

/* Takes a staging page for `block` in `layer`; KVC_ERR_INTERNAL if it has a page already. */
static kvc_status_t take_staging(cpu_be_t *be, const kvc_cache_t *c, int layer, int32_t block) {
  kvc_page_entry_t *e = entry(be, c, layer, block);
  if (e->kind != KVC_PAGE_EMPTY || pop_chunks(be, e, 0, c->geo.staging_chunks))
    return KVC_ERR_INTERNAL;
  e->kind = KVC_PAGE_STAGING;
  e->nbytes = c->geo.staging_bytes;
  e->codec = 0;
  return KVC_OK;
}

/* kvc_store on the CPU, the steps numbered as in kvc_cache.c. */
static kvc_status_t cpu_store(kvc_cache_t *c, int layer, const void *k, const void *v,
                              void *stream) {
  cpu_be_t *be = be_of(c);
  const kvc_bm_plan_t *p = &c->plan;
  const int H = c->cfg.num_kv_heads, bt = c->cfg.block_tokens, rb = (int)c->geo.row_bytes;
  kvc_status_t st = KVC_OK;

  /* (1) Staging pages for blocks left partial that had none, and for blocks the step fills. */
  for (int i = 0; st == KVC_OK && i < p->num_new_staging; i++)
    st = take_staging(be, c, layer, p->new_staging[i]);
  for (int j = 0; st == KVC_OK && j < p->num_jobs; j++)
    if (p->job_staged[j] == 0) st = take_staging(be, c, layer, p->job_block[j]);
  if (st != KVC_OK) return st;
  /* (2) Every new row goes to its block's staging page. */
  for (int r = 0; r < p->total_rows; r++) {
    const kvc_page_entry_t *e = entry(be, c, layer, p->row_block[r]);
    if (e->kind != KVC_PAGE_STAGING) return KVC_ERR_INTERNAL;
    for (int t = 0; t < 2; t++) {
      const uint8_t *src = (const uint8_t *)(t ? v : k) + (size_t)r * H * rb;
      for (int h = 0; h < H; h++, src += rb)
        page_write(c, be->pool, e, kvc_staging_row_offset(t, h, p->row_slot[r], H, bt, rb), src,
                   (size_t)rb);
    }
  }
  return KVC_OK;
}

/* The deferred compression of `layer`, the steps numbered as in kvc_cache.c. */
static kvc_status_t cpu_compress(kvc_cache_t *c, int layer, void *stream) {
  cpu_be_t *be = be_of(c);
  const kvc__geometry_t *g = &c->geo;
  const int H = c->cfg.num_kv_heads, bt = c->cfg.block_tokens, rb = (int)g->row_bytes;
  const int n = c->step_num_jobs;
  const int32_t *blocks = c->step_job_block;
  const size_t sb = g->staging_bytes;

  /* (3) Every job's rows into its scratch block; then the staging pages go back. */
  for (int j = 0; j < n; j++) {
    const kvc_page_entry_t *e = entry(be, c, layer, blocks[j]);
    if (e->kind != KVC_PAGE_STAGING) return KVC_ERR_INTERNAL;
    for (int t = 0; t < 2; t++) {
      for (int h = 0; h < H; h++) {
        uint32_t off = kvc_staging_row_offset(t, h, 0, H, bt, rb);
        page_read(c, be->pool, e, off, be->scratch + (size_t)j * sb + off, (size_t)bt * rb);
      }
    }
  }
  for (int j = 0; j < n; j++) release_entry(be, entry(be, c, layer, blocks[j]));
  /* (4) Compress each job, packed after the page its block got in the previous layer. */
  for (int j = 0; j < n; j++) {
    kvc_page_entry_t *e = entry(be, c, layer, blocks[j]);
    size_t size = 0;
    kvc_page_info_t info;
    kvc_status_t st = kvc_codec_encode_work(&c->codec, be->scratch + (size_t)j * sb, bt,
                                            be->encode_work, kvc_codec_work_bytes(&c->codec),
                                            be->page_buf, g->max_page_bytes, &size);
    if (st != KVC_OK) return st;
    st = kvc_codec_page_info(be->page_buf, size, &info);
    if (st != KVC_OK) return st;
    if (e->kind != KVC_PAGE_EMPTY) return KVC_ERR_INTERNAL;
    const int taken = take_page(be, c, e, blocks[j], layer, (uint32_t)size,
                                kvc_pack_codec(c->codec.codec, c->codec.policy));
    if (taken < 0) return KVC_ERR_INTERNAL;
    e->kind = KVC_PAGE_COMPRESSED;
    e->nbytes = (uint32_t)size;
    e->codec = (uint8_t)info.codec;
    page_write(c, be->pool, e, 0, be->page_buf, size);
    be->page_bytes[(size_t)layer * g->max_jobs + j] = (uint32_t)size;
    be->page_codec[(size_t)layer * g->max_jobs + j] = (uint8_t)info.codec;
    be->page_chunks[(size_t)layer * g->max_jobs + j] = (uint8_t)taken;
  }
  return KVC_OK;
}

static kvc_status_t cpu_attend(kvc_cache_t *c, int layer, const void *q, void *out, float scale,
                               void *stream) {
  cpu_be_t *be = be_of(c);
  kvc_attn_args_t a = be->attn;
  a.dir = entry(be, c, layer, 0);
  a.q = q;
  a.out = out;
  a.scale = scale;
  return kvc_attn_cpu(&a);
}

static kvc_status_t cpu_sizes_fetch(kvc_cache_t *c, int slot, int num_jobs, void *stream) {
  cpu_be_t *be = be_of(c);
  size_t L = (size_t)c->cfg.num_layers, jobs = (size_t)c->geo.max_jobs;
  for (size_t l = 0; l < L; l++) {
    memcpy(be->slot_bytes + ((size_t)slot * L + l) * jobs, be->page_bytes + l * jobs,
           (size_t)num_jobs * sizeof(uint32_t));
    memcpy(be->slot_codec + ((size_t)slot * L + l) * jobs, be->page_codec + l * jobs,
           (size_t)num_jobs);
    memcpy(be->slot_chunks + ((size_t)slot * L + l) * jobs, be->page_chunks + l * jobs,
           (size_t)num_jobs);
  }
  return KVC_OK;
}

static kvc_status_t cpu_sizes_poll(kvc_cache_t *c, int slot, int wait, int *ready,
                                   const uint32_t **bytes, const uint8_t **codecs,
                                   const uint8_t **chunks) {
  cpu_be_t *be = be_of(c);
  size_t per_slot = (size_t)c->cfg.num_layers * (size_t)c->geo.max_jobs;
  *ready = 1;
  *bytes = be->slot_bytes + (size_t)slot * per_slot;
  *codecs = be->slot_codec + (size_t)slot * per_slot;
  *chunks = be->slot_chunks + (size_t)slot * per_slot;
  return KVC_OK;
}

static kvc_status_t cpu_free_pages(kvc_cache_t *c, const int32_t *blocks, int n, void *stream) {
  cpu_be_t *be = be_of(c);
  for (int i = 0; i < n; i++) {
    for (int l = 0; l < c->cfg.num_layers; l++) {
      kvc_page_entry_t *e = entry(be, c, l, blocks[i]);
      if (e->kind != KVC_PAGE_EMPTY) release_entry(be, e);
    }
    be->cursor[blocks[i]].layer = -1;
  }
  return KVC_OK;
}

static kvc_status_t cpu_copy_tail(kvc_cache_t *c, int32_t src, int32_t dst, void *stream) {
  cpu_be_t *be = be_of(c);
  const kvc__geometry_t *g = &c->geo;
  for (int l = 0; l < c->cfg.num_layers; l++) {
    const kvc_page_entry_t *s = entry(be, c, l, src);
    kvc_page_entry_t *d = entry(be, c, l, dst);
    if (s->kind != KVC_PAGE_STAGING || d->kind != KVC_PAGE_EMPTY ||
        pop_chunks(be, d, 0, g->staging_chunks))
      return KVC_ERR_INTERNAL;
    for (uint32_t i = 0; i < g->staging_chunks; i++) {
      uint32_t n = g->staging_bytes - i * g->chunk_bytes;
      memcpy(be->pool + (size_t)d->chunk[i] * g->chunk_bytes,
             be->pool + (size_t)s->chunk[i] * g->chunk_bytes,
             n < g->chunk_bytes ? n : g->chunk_bytes);
    }
    d->kind = KVC_PAGE_STAGING;
    d->nbytes = g->staging_bytes;
    d->codec = 0;
  }
  return KVC_OK;
}

static kvc_status_t cpu_swap_out(kvc_cache_t *c, const int32_t *blocks, const uint64_t *offsets,
                                 int n, void *mem, int release, void *stream) {
  cpu_be_t *be = be_of(c);
  const int L = c->cfg.num_layers;
  for (int i = 0; i < n; i++) {
    uint8_t *base = (mem ? (uint8_t *)mem : be->swap) + offsets[i];
    uint64_t pos = kvc__round16((uint64_t)L * KVC__SWAP_HDR_BYTES);
    for (int l = 0; l < L; l++) {
      kvc_page_entry_t *e = entry(be, c, l, blocks[i]);
      memcpy(base + (size_t)l * KVC__SWAP_HDR_BYTES, e, KVC__SWAP_HDR_BYTES);
      if (e->kind == KVC_PAGE_EMPTY) continue;
      page_read(c, be->pool, e, 0, base + pos, e->nbytes);
      pos += kvc__round16(e->nbytes);
      if (release) release_entry(be, e);
    }
    if (release) be->cursor[blocks[i]].layer = -1;
  }
  return KVC_OK;
}

static kvc_status_t cpu_swap_in(kvc_cache_t *c, const int32_t *blocks, const uint64_t *offsets,
                                int n, const void *mem, void *stream) {
  cpu_be_t *be = be_of(c);
  const int L = c->cfg.num_layers;
  const kvc__geometry_t *g = &c->geo;
  for (int i = 0; i < n; i++) {
    const uint8_t *base = (mem ? (const uint8_t *)mem : be->swap) + offsets[i];
    uint64_t pos = kvc__round16((uint64_t)L * KVC__SWAP_HDR_BYTES);
    for (int l = 0; l < L; l++) {
      kvc_page_entry_t saved, *e = entry(be, c, l, blocks[i]);
      memcpy(&saved, base + (size_t)l * KVC__SWAP_HDR_BYTES, KVC__SWAP_HDR_BYTES);
      if (saved.kind == KVC_PAGE_EMPTY) continue;
      if (e->kind != KVC_PAGE_EMPTY) return KVC_ERR_INTERNAL;
      /* A page packed when it was made packs again: its block's pages come back in layer
       * order, so it lands where it was in its chunk and takes the chunks it took then. */
      if (saved.kind == KVC_PAGE_STAGING ? pop_chunks(be, e, 0, g->staging_chunks)
                                         : take_page(be, c, e, blocks[i], l, saved.nbytes,
                                                     saved.first != 0) < 0)
        return KVC_ERR_INTERNAL;
      e->kind = saved.kind;
      e->codec = saved.codec;
      e->nbytes = saved.nbytes;
      page_write(c, be->pool, e, 0, base + pos, saved.nbytes);
      pos += kvc__round16(saved.nbytes);
    }
  }
  return KVC_OK;
}

static kvc_status_t cpu_read_swap_headers(kvc_cache_t *c, const void *mem,
                                          const uint64_t *offsets, int n, uint8_t *out,
                                          void *stream) {
  const size_t h = (size_t)c->cfg.num_layers * KVC__SWAP_HDR_BYTES;
  for (int i = 0; i < n; i++) memcpy(out + (size_t)i * h, (const uint8_t *)mem + offsets[i], h);
  return KVC_OK;
}

static kvc_status_t cpu_copy_bytes(kvc_cache_t *c, void *dst, const void *src, size_t bytes,
                                   int host_to_backend, void *stream) {
  memcpy(dst, src, bytes);
  return KVC_OK;
}

static kvc_status_t cpu_synchronize(kvc_cache_t *c) { return KVC_OK; }

static kvc_status_t cpu_read_state(kvc_cache_t *c, kvc_page_entry_t *dir, uint32_t *free_stack,
                                   int32_t *free_top) {
  cpu_be_t *be = be_of(c);
  memcpy(dir, be->dir, (size_t)c->cfg.num_layers * (size_t)c->geo.max_blocks * sizeof(*dir));
  memcpy(free_stack, be->free_stack, (size_t)be->free_top * sizeof(uint32_t));
  *free_top = be->free_top;
  return KVC_OK;
}

static kvc_status_t cpu_read_entry(kvc_cache_t *c, int layer, int32_t block, kvc_page_entry_t *e) {
  *e = *entry(be_of(c), c, layer, block);
  return KVC_OK;
}

static kvc_status_t cpu_read_page(kvc_cache_t *c, const kvc_page_entry_t *e, uint8_t *out) {
  page_read(c, be_of(c)->pool, e, 0, out, e->nbytes);
  return KVC_OK;
}

static size_t cpu_overhead_bytes(const kvc_cache_t *c) { return 0; }

static size_t cpu_host_data_bytes(const kvc_cache_t *c) {
  return (size_t)c->geo.total_chunks * c->geo.chunk_bytes + c->cfg.swap_bytes;
}

const kvc__backend_ops_t kvc__backend_cpu = {
    .name = "cpu",
    .create = cpu_create,
    .destroy = cpu_destroy,
    .plan = cpu_plan,
    .store = cpu_store,
    .compress = cpu_compress,
    .attend = cpu_attend,
    .sizes_fetch = cpu_sizes_fetch,
    .sizes_poll = cpu_sizes_poll,
    .free_pages = cpu_free_pages,
    .copy_tail = cpu_copy_tail,
    .swap_out = cpu_swap_out,
    .swap_in = cpu_swap_in,
    .read_swap_headers = cpu_read_swap_headers,
    .copy_bytes = cpu_copy_bytes,
    .synchronize = cpu_synchronize,
    .read_state = cpu_read_state,
    .read_entry = cpu_read_entry,
    .read_page = cpu_read_page,
    .overhead_bytes = cpu_overhead_bytes,
    .host_data_bytes = cpu_host_data_bytes,
};
