/*
 * Model-based randomized test of the block manager. A reference model made of plain arrays and
 * linear searches predicts, for every random operation, its status and its visible effects: the
 * device work (evicted and freed blocks in order, swapped blocks, tail copies), every sequence's
 * length, reservation, state and block table, the plan's CSR arrays, rows, jobs and staging lists,
 * prefix hits (exact count of cached blocks attached), events, and the accounting in stats.
 * kvc_bm_validate runs after every operation.
 *
 * The model's prefix cache keys a block by (parent entry, salt, tokens), the same identity the
 * manager uses, but finds it by a linear scan instead of a hash. A separate fingerprint of the
 * whole token prefix checks every hit independently of that logic (no aliasing).
 *
 * Runs three configurations: the real hash, a hash that collides on purpose, prefix caching off.
 * KVC_TEST_SCALE multiplies the operation count (default: a few seconds in CI).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "kvc_test_util.h"
#include "test_blocks_util.h"

enum { L = 2, B = 4, W = 4, LW = L * W, MAXLEN = 48, MAXTAB = MAXLEN / B, NBLK = 30, NSEQ = 8 };
enum { NIDS = 11, STAGING_BYTES = 100, TOTAL_CHUNKS = LW * 24, MBT = 24 };
#define SWAP_BYTES 4000

typedef struct mseq {
  int live, swapped, planned, chain_ok;
  kvc_seq_id_t id;
  int len, reserved;
  uint64_t salt, last_gen, step;
  int32_t tok[MAXLEN]; /* -1: unknown id */
  int prompt_n;
  int32_t prompt[MAXLEN + 8];
  int nb;
  int32_t table[MAXTAB];
} mseq_t;

typedef struct mblock {
  int cached, swapped, full, hashed;
  uint64_t gen, parent_gen, salt, content, done_step;
  int32_t tok[B];
  uint32_t mchunks[L], mbytes[L];
} mblock_t;

typedef struct model {
  kvc_bm_config_t cfg;
  int prefix;
  uint32_t wm;
  mseq_t seq[NIDS];  /* indexed by id - 1 */
  mblock_t blk[NBLK];
  int32_t lru[NBLK];
  int nlru;
  uint64_t gen_next, step;
  int step_open;
  int64_t queries, hits, evictions, swap_outs, swap_ins, ignored;
  /* Expected events of the current operation. */
  int nev;
  kvc_event_kind_t ev_kind[256];
  int32_t ev_block[256];
  int ev_hashed[256];
} model_t;

typedef struct run {
  model_t m;
  kvc_host_alloc_t *ha;
  kvc_bm_t *bm;
  tb_events_t ev;
  kvc_test_rng_t rng;
  kvc_bm_work_t w;
  kvc_bm_plan_t plan;
  int64_t ops[16];
} run_t;

/* ---- model helpers ------------------------------------------------------------------------- */

static uint64_t fingerprint(uint64_t salt, const int32_t *tok, int n) {
  uint64_t h = salt * 0x9e3779b97f4a7c15ull + 12345;
  for (int i = 0; i < n; i++) {
    h ^= (uint64_t)(uint32_t)tok[i] + 0x632be59bd9b4e019ull + (h << 6) + (h >> 2);
    h *= 0xff51afd7ed558ccdull;
  }
  return h | 1;
}

static int mref(const model_t *m, int32_t b) {
  int r = 0;
  for (int s = 0; s < NIDS; s++)
    if (m->seq[s].live)
      for (int i = 0; i < m->seq[s].nb; i++) r += m->seq[s].table[i] == b;
  return r;
}

static int in_step(const model_t *m, const mseq_t *s) { return m->step_open && s->step == m->step; }

static uint32_t charge(const mblock_t *b) {
  uint32_t c = 0;
  for (int l = 0; l < L; l++) c += b->mbytes[l] ? b->mchunks[l] : W;
  return c;
}

typedef struct macct {
  int64_t charged, cached_chunks, reserved_ids, used_ids, ncached, active, swapped, tokens;
  int64_t m_pages, m_chunks, m_bytes, swap_bytes, partial;
} macct_t;

static int64_t swap_bytes_of(const mblock_t *b) {
  if (!b->full) return (int64_t)STAGING_BYTES * L;
  return (int64_t)b->mbytes[0] + b->mbytes[1];
}

static macct_t account(const model_t *m) {
  macct_t a;
  memset(&a, 0, sizeof(a));
  for (int32_t b = 0; b < NBLK; b++) {
    const mblock_t *k = &m->blk[b];
    int r = mref(m, b);
    if (!r && !k->cached) continue;
    a.used_ids++;
    if (k->swapped) {
      a.swapped++;
      a.swap_bytes += swap_bytes_of(k);
    } else {
      a.charged += charge(k);
      for (int l = 0; l < L; l++)
        if (k->mbytes[l]) a.m_pages++, a.m_chunks += k->mchunks[l], a.m_bytes += k->mbytes[l];
      if (k->cached) a.ncached++, a.cached_chunks += charge(k);
      else a.active++, a.partial += !k->full;
    }
  }
  for (int s = 0; s < NIDS; s++) {
    const mseq_t *q = &m->seq[s];
    if (!q->live) continue;
    a.reserved_ids += (q->reserved + B - 1) / B - q->nb;
  }
  /* Tokens over distinct blocks held by live sequences: full blocks count B, tails their fill. */
  for (int32_t b = 0; b < NBLK; b++) {
    if (!mref(m, b)) continue;
    if (m->blk[b].full) {
      a.tokens += B;
      continue;
    }
    for (int s = 0; s < NIDS; s++) {
      const mseq_t *q = &m->seq[s];
      if (q->live && q->nb && q->table[q->nb - 1] == b) a.tokens += q->len - (q->nb - 1) * B;
    }
  }
  return a;
}

static int64_t free_chunks(const macct_t *a) {
  return TOTAL_CHUNKS - a->charged - a->reserved_ids * LW;
}

static int can_make_room(const model_t *m, int64_t chunks, int64_t ids) {
  macct_t a = account(m);
  return free_chunks(&a) + a.cached_chunks >= chunks &&
         NBLK - a.used_ids - a.reserved_ids + a.ncached >= ids;
}

static void expect_event(model_t *m, kvc_event_kind_t kind, int32_t b, int hashed) {
  assert_true(m->nev < 256);
  m->ev_kind[m->nev] = kind;
  m->ev_block[m->nev] = b;
  m->ev_hashed[m->nev] = hashed;
  m->nev++;
}

static void block_reset(mblock_t *k) { memset(k, 0, sizeof(*k)); }

/* Evicts from the model's LRU front into want[] until the room exists. */
static int model_evict(model_t *m, int64_t chunks, int64_t ids, int32_t *want) {
  int n = 0;
  for (;;) {
    macct_t a = account(m);
    if (free_chunks(&a) >= chunks && NBLK - a.used_ids - a.reserved_ids >= ids) break;
    assert_true(m->nlru > 0);
    int32_t b = m->lru[0];
    memmove(m->lru, m->lru + 1, (size_t)(--m->nlru) * sizeof(int32_t));
    block_reset(&m->blk[b]);
    want[n++] = b;
    m->evictions++;
    expect_event(m, KVC_EVENT_BLOCK_EVICTED, b, 1);
  }
  return n;
}

static void lru_remove(model_t *m, int32_t b) {
  for (int i = 0; i < m->nlru; i++)
    if (m->lru[i] == b) {
      memmove(m->lru + i, m->lru + i + 1, (size_t)(m->nlru - i - 1) * sizeof(int32_t));
      m->nlru--;
      m->blk[b].cached = 0;
      return;
    }
  fail_msg("block %d not on the model LRU", b);
}

/* A hashed block with this key, or -1. */
static int32_t model_find(const model_t *m, uint64_t parent_gen, uint64_t salt, const int32_t *t) {
  for (int32_t b = 0; b < NBLK; b++) {
    const mblock_t *k = &m->blk[b];
    if (k->hashed && k->parent_gen == parent_gen && k->salt == salt &&
        memcmp(k->tok, t, sizeof(k->tok)) == 0)
      return b;
  }
  return -1;
}

static mseq_t *mseq(model_t *m, kvc_seq_id_t id) {
  return id >= 1 && id <= NIDS && m->seq[id - 1].live ? &m->seq[id - 1] : NULL;
}

static int live_count(const model_t *m) {
  int n = 0;
  for (int s = 0; s < NIDS; s++) n += m->seq[s].live;
  return n;
}

/* ---- comparing the manager to the model ------------------------------------------------- */

static void check_events(run_t *r) {
  model_t *m = &r->m;
  if (r->ev.n != m->nev) fail_msg("%d events, model expects %d", r->ev.n, m->nev);
  for (int i = 0; i < m->nev; i++) {
    assert_int_equal(r->ev.kind[i], m->ev_kind[i]);
    assert_int_equal(r->ev.block[i], m->ev_block[i]);
    assert_int_equal(r->ev.hash[i] != 0, m->ev_hashed[i]);
  }
  r->ev.n = 0;
  m->nev = 0;
}

static void check_all(run_t *r) {
  model_t *m = &r->m;
  TB_ASSERT_VALID(r->bm);
  check_events(r);
  macct_t a = account(m);
  kvc_bm_stats_t s;
  kvc_bm_get_stats(r->bm, &s);
  assert_int_equal(s.free_chunks, free_chunks(&a));
  assert_int_equal(s.charged_chunks, a.charged);
  assert_int_equal(s.reserved_chunks, a.reserved_ids * LW);
  assert_int_equal(s.cached_chunks, a.cached_chunks);
  assert_int_equal(s.cached_blocks, a.ncached);
  assert_int_equal(s.active_blocks, a.active);
  assert_int_equal(s.swapped_blocks, a.swapped);
  assert_int_equal(s.free_block_ids, NBLK - a.used_ids);
  assert_int_equal(s.tokens_stored, a.tokens);
  assert_int_equal(s.staging_blocks, a.partial);
  assert_int_equal(s.measured_pages, a.m_pages);
  assert_int_equal(s.measured_page_chunks, a.m_chunks);
  assert_int_equal(s.measured_page_bytes, a.m_bytes);
  assert_int_equal(s.unmeasured_chunks, a.charged - a.m_chunks);
  assert_int_equal(s.swap_used_bytes, a.swap_bytes);
  assert_int_equal(s.live_seqs, live_count(m));
  assert_int_equal(s.prefix_queries, m->queries);
  assert_int_equal(s.prefix_hits, m->hits);
  assert_int_equal(s.evictions, m->evictions);
  assert_int_equal(s.swap_outs, m->swap_outs);
  assert_int_equal(s.swap_ins, m->swap_ins);
  assert_int_equal(s.ignored_measurements, m->ignored);
  assert_int_equal(kvc_bm_step_open(r->bm), m->step_open);
  int swapped = 0;
  for (int i = 0; i < NIDS; i++) {
    const mseq_t *q = &m->seq[i];
    kvc_seq_info_t info;
    kvc_status_t st = kvc_bm_seq_info(r->bm, (kvc_seq_id_t)(i + 1), &info);
    if (!q->live) {
      assert_int_equal(st, KVC_ERR_NOT_FOUND);
      continue;
    }
    swapped += q->swapped;
    assert_int_equal(st, KVC_OK);
    assert_int_equal(info.length, q->len);
    assert_int_equal(info.reserved, q->reserved);
    assert_int_equal(info.num_blocks, q->nb);
    assert_int_equal(info.state, q->swapped ? KVC_SEQ_SWAPPED : KVC_SEQ_RUNNING);
    int shared = 0;
    for (int j = 0; j < q->nb; j++) shared += mref(m, q->table[j]) > 1;
    assert_int_equal(info.shared_blocks, shared);
    const int32_t *t;
    int n;
    assert_int_equal(kvc_bm_seq_blocks(r->bm, (kvc_seq_id_t)(i + 1), &t, &n), KVC_OK);
    assert_int_equal(n, q->nb);
    if (n) assert_memory_equal(t, q->table, (size_t)n * sizeof(int32_t));
  }
  assert_int_equal(s.swapped_seqs, swapped);
}

static void expect_work(const kvc_bm_work_t *w, const int32_t *free_ids, int nfree,
                        int32_t copy_src, int32_t copy_dst, const int32_t *swap, int nswap) {
  assert_int_equal(w->num_free, nfree);
  if (nfree) assert_memory_equal(w->free_blocks, free_ids, (size_t)nfree * sizeof(int32_t));
  assert_int_equal(w->copy_src, copy_src);
  assert_int_equal(w->copy_dst, copy_dst);
  assert_int_equal(w->num_swap, nswap);
  if (nswap) assert_memory_equal(w->swap_blocks, swap, (size_t)nswap * sizeof(int32_t));
}

/* ---- operations ---------------------------------------------------------------------------- */

static kvc_seq_id_t pick_id(run_t *r) { return 1 + kvc_test_rng_below(&r->rng, NIDS); }

/* Prompts come from four families so that prefixes repeat; small token alphabets make identical
 * blocks appear independently (the duplicate-entry path). */
static int make_prompt(run_t *r, int32_t *p, int max) {
  int n = (int)kvc_test_rng_below(&r->rng, (uint32_t)max + 1);
  int fam = (int)kvc_test_rng_below(&r->rng, 4), common = 4 + (int)kvc_test_rng_below(&r->rng, 40);
  for (int i = 0; i < n; i++)
    p[i] = i < common ? fam * 100 + i : (int32_t)kvc_test_rng_below(&r->rng, 3);
  return n;
}

static void op_add(run_t *r) {
  model_t *m = &r->m;
  kvc_seq_id_t id = kvc_test_rng_below(&r->rng, 20) == 0 ? KVC_SEQ_NONE : pick_id(r);
  int32_t p[MAXLEN + 8];
  int n = make_prompt(r, p, kvc_test_rng_below(&r->rng, 30) == 0 ? MAXLEN + 4 : MAXLEN);
  uint64_t salt = kvc_test_rng_below(&r->rng, 4) == 0;
  int cached = -1;
  kvc_status_t st = kvc_bm_seq_add(r->bm, id, p, n, salt, &cached, &r->w);
  kvc_status_t want = KVC_OK;
  if (id == KVC_SEQ_NONE || mseq(m, id) || n > MAXLEN) want = KVC_ERR_INVALID_ARGUMENT;
  else if (live_count(m) == NSEQ) want = KVC_ERR_OUT_OF_MEMORY;
  assert_int_equal(st, want);
  if (st != KVC_OK) return;

  /* The model's lookup: whole blocks, never the last prompt token. */
  int k = 0, queries = m->prefix && n > 0 ? (n - 1) / B : 0;
  uint64_t gen = 0;
  int32_t att[MAXTAB];
  for (; k < queries; k++) {
    int32_t b = model_find(m, gen, salt, p + k * B);
    if (b < 0 || m->blk[b].swapped) break;
    att[k] = b;
    gen = m->blk[b].gen;
  }
  assert_int_equal(cached, k * B);
  m->queries += queries;
  m->hits += k;
  mseq_t *q = &m->seq[id - 1];
  memset(q, 0, sizeof(*q));
  q->live = 1;
  q->id = id;
  q->salt = salt;
  q->chain_ok = 1;
  q->last_gen = gen;
  q->len = q->reserved = k * B;
  q->nb = k;
  for (int i = 0; i < MAXLEN; i++) q->tok[i] = i < k * B ? p[i] : -1;
  q->prompt_n = m->prefix ? n : 0;
  memcpy(q->prompt, p, (size_t)n * sizeof(int32_t));
  for (int i = 0; i < k; i++) {
    int32_t b = att[i];
    /* Independent of the key logic: the block holds exactly this prefix. */
    assert_int_equal(m->blk[b].content, fingerprint(salt, p, (i + 1) * B));
    if (m->blk[b].cached) lru_remove(m, b);
    q->table[i] = b;
  }
  expect_work(&r->w, NULL, 0, -1, -1, NULL, 0);
}

static void op_reserve(run_t *r) {
  model_t *m = &r->m;
  kvc_seq_id_t id = pick_id(r);
  int n_new = (int)kvc_test_rng_below(&r->rng, 24) - (kvc_test_rng_below(&r->rng, 40) == 0);
  int la = kvc_test_rng_below(&r->rng, 4) == 0 ? (int)kvc_test_rng_below(&r->rng, 4) : 0;
  kvc_status_t st = kvc_bm_seq_reserve(r->bm, id, n_new, la, &r->w);
  mseq_t *q = mseq(m, id);
  kvc_status_t want = KVC_OK;
  int64_t target = 0, need = 0, chunks = 0;
  if (n_new < 0) want = KVC_ERR_INVALID_ARGUMENT;
  else if (!q) want = KVC_ERR_NOT_FOUND;
  else if (q->swapped || in_step(m, q)) want = KVC_ERR_INVALID_STATE;
  else if ((target = (int64_t)q->len + n_new + la) > MAXLEN) want = KVC_ERR_INVALID_ARGUMENT;
  else if (target > q->reserved) {
    need = (target + B - 1) / B - (q->reserved + B - 1) / B;
    chunks = need * LW + (q->planned ? 0 : m->wm);
    if (need && !can_make_room(m, chunks, need)) want = KVC_ERR_OUT_OF_MEMORY;
  }
  assert_int_equal(st, want);
  if (st != KVC_OK) return;
  int32_t ev[NBLK];
  int nev = 0;
  if (target > q->reserved) {
    if (need) nev = model_evict(m, chunks, need, ev);
    q->reserved = (int)target;
  }
  expect_work(&r->w, ev, nev, -1, -1, NULL, 0);
}

static void op_fork(run_t *r) {
  model_t *m = &r->m;
  kvc_seq_id_t pid = pick_id(r), cid = kvc_test_rng_below(&r->rng, 20) ? pick_id(r) : KVC_SEQ_NONE;
  kvc_status_t st = kvc_bm_seq_fork(r->bm, pid, cid, &r->w);
  mseq_t *p = mseq(m, pid);
  int tail = p ? p->len % B : 0;
  kvc_status_t want = KVC_OK;
  if (!p) want = KVC_ERR_NOT_FOUND;
  else if (cid == KVC_SEQ_NONE || mseq(m, cid)) want = KVC_ERR_INVALID_ARGUMENT;
  else if (p->swapped || in_step(m, p)) want = KVC_ERR_INVALID_STATE;
  else if (live_count(m) == NSEQ) want = KVC_ERR_OUT_OF_MEMORY;
  else if (tail && !can_make_room(m, LW, 1)) want = KVC_ERR_OUT_OF_MEMORY;
  assert_int_equal(st, want);
  if (st != KVC_OK) return;
  int32_t ev[NBLK];
  int nev = tail ? model_evict(m, LW, 1, ev) : 0;
  mseq_t *c = &m->seq[cid - 1];
  *c = *p;
  c->id = cid;
  c->reserved = c->len;
  c->step = 0;
  int32_t src = -1, dst = -1;
  if (tail) {
    src = p->table[p->nb - 1];
    dst = r->w.copy_dst;
    assert_true(dst >= 0 && dst < NBLK);
    assert_int_equal(mref(m, dst), 0);
    assert_false(m->blk[dst].cached);
    c->table[c->nb - 1] = dst;
    block_reset(&m->blk[dst]);
  }
  expect_work(&r->w, ev, nev, src, dst, NULL, 0);
}

static void op_free(run_t *r) {
  model_t *m = &r->m;
  kvc_seq_id_t id = pick_id(r);
  kvc_status_t st = kvc_bm_seq_free(r->bm, id, &r->w);
  mseq_t *q = mseq(m, id);
  kvc_status_t want = !q ? KVC_ERR_NOT_FOUND : in_step(m, q) ? KVC_ERR_INVALID_STATE : KVC_OK;
  assert_int_equal(st, want);
  if (st != KVC_OK) return;
  q->live = 0;
  int32_t freed[MAXTAB];
  int nf = 0;
  for (int i = q->nb - 1; i >= 0; i--) {
    int32_t b = q->table[i];
    if (mref(m, b) > 0) continue;
    mblock_t *k = &m->blk[b];
    if (!k->swapped && k->hashed) {
      k->cached = 1;
      m->lru[m->nlru++] = b;
      continue;
    }
    expect_event(m, KVC_EVENT_BLOCK_REMOVED, b, k->hashed);
    block_reset(k);
    freed[nf++] = b;
  }
  expect_work(&r->w, freed, nf, -1, -1, NULL, 0);
}

static void op_swap_out(run_t *r) {
  model_t *m = &r->m;
  kvc_seq_id_t id = pick_id(r);
  kvc_status_t st = kvc_bm_seq_swap_out(r->bm, id, KVC_OK, &r->w);
  mseq_t *q = mseq(m, id);
  kvc_status_t want = KVC_OK;
  int64_t bytes = 0;
  int32_t moved[MAXTAB];
  int nm = 0;
  if (!q) want = KVC_ERR_NOT_FOUND;
  else if (q->swapped || in_step(m, q)) want = KVC_ERR_INVALID_STATE;
  else {
    for (int i = 0; i < q->nb; i++) {
      int32_t b = q->table[i];
      mblock_t *k = &m->blk[b];
      if (mref(m, b) > 1) continue;
      if (k->full && (!k->mbytes[0] || !k->mbytes[1])) want = KVC_ERR_INVALID_STATE;
      bytes += swap_bytes_of(k);
      moved[nm++] = b;
    }
    macct_t a = account(m);
    if (want == KVC_OK && a.swap_bytes + bytes > SWAP_BYTES) want = KVC_ERR_OUT_OF_MEMORY;
  }
  assert_int_equal(st, want);
  if (st != KVC_OK) return;
  for (int i = 0; i < nm; i++) m->blk[moved[i]].swapped = 1;
  q->swapped = 1;
  q->reserved = q->len;
  m->swap_outs++;
  expect_work(&r->w, NULL, 0, -1, -1, moved, nm);
}

static void op_swap_in(run_t *r) {
  model_t *m = &r->m;
  kvc_seq_id_t id = pick_id(r);
  kvc_status_t st = kvc_bm_seq_swap_in(r->bm, id, &r->w);
  mseq_t *q = mseq(m, id);
  kvc_status_t want = KVC_OK;
  int64_t need = m->wm;
  int32_t moved[MAXTAB];
  int nm = 0;
  if (!q) want = KVC_ERR_NOT_FOUND;
  else if (!q->swapped) want = KVC_ERR_INVALID_STATE;
  else {
    for (int i = 0; i < q->nb; i++)
      if (m->blk[q->table[i]].swapped) {
        need += charge(&m->blk[q->table[i]]);
        moved[nm++] = q->table[i];
      }
    if (!can_make_room(m, need, 0)) want = KVC_ERR_OUT_OF_MEMORY;
  }
  assert_int_equal(st, want);
  if (st != KVC_OK) return;
  int32_t ev[NBLK];
  int nev = model_evict(m, need, 0, ev);
  for (int i = 0; i < nm; i++) m->blk[moved[i]].swapped = 0;
  q->swapped = 0;
  m->swap_ins++;
  expect_work(&r->w, ev, nev, -1, -1, moved, nm);
}

static void op_measure(run_t *r) {
  model_t *m = &r->m;
  int32_t b;
  int layer;
  uint32_t chunks;
  /* Mostly a pending page, sometimes anything at all. */
  int32_t pending[NBLK * L][2];
  int np = 0;
  for (int32_t x = 0; x < NBLK; x++) {
    const mblock_t *k = &m->blk[x];
    if (!k->full || k->swapped || (!k->cached && !mref(m, x))) continue;
    for (int l = 0; l < L; l++)
      if (!k->mbytes[l]) pending[np][0] = x, pending[np][1] = l, np++;
  }
  if (np && kvc_test_rng_below(&r->rng, 5)) {
    int i = (int)kvc_test_rng_below(&r->rng, (uint32_t)np);
    b = pending[i][0];
    layer = pending[i][1];
    chunks = kvc_test_rng_below(&r->rng, W + 1); /* 0: a page packed into its block's chunks */
  } else {
    b = (int32_t)kvc_test_rng_below(&r->rng, NBLK + 2) - 1;
    layer = (int)kvc_test_rng_below(&r->rng, L + 1);
    chunks = kvc_test_rng_below(&r->rng, W + 2);
  }
  uint32_t bytes = (chunks ? chunks : 1) * 256 - kvc_test_rng_below(&r->rng, 200);
  if (kvc_test_rng_below(&r->rng, 16) == 0) bytes = 0; /* never a page's size */
  int by_step = (int)kvc_test_rng_below(&r->rng, 2);
  uint64_t step = 0;
  if (by_step) {
    step = b >= 0 && b < NBLK ? m->blk[b].done_step : 0;
    if (kvc_test_rng_below(&r->rng, 8) == 0) step++;
    kvc_bm_page_measured_step(r->bm, step, b, layer, bytes, chunks);
  } else {
    kvc_bm_page_measured(r->bm, b, layer, bytes, chunks);
  }
  int applies = b >= 0 && b < NBLK && layer < L && bytes > 0 && chunks <= W;
  if (applies) {
    mblock_t *k = &m->blk[b];
    applies = k->full && !k->swapped && (k->cached || mref(m, b)) && !k->mbytes[layer] &&
              (!by_step || k->done_step == step);
  }
  if (!applies) {
    m->ignored++;
    return;
  }
  m->blk[b].mchunks[layer] = chunks;
  m->blk[b].mbytes[layer] = bytes;
}

/* A batch of running sequences, sometimes with one deliberate error. */
static void op_plan(run_t *r) {
  model_t *m = &r->m;
  if (m->step_open) {
    kvc_seq_id_t id = 1;
    int32_t n = 1;
    kvc_bm_batch_t b = {1, &id, &n, NULL};
    assert_int_equal(kvc_bm_plan(r->bm, &b, &r->plan), KVC_ERR_INVALID_STATE);
    return;
  }
  kvc_seq_id_t ids[NIDS + 1];
  int32_t nn[NIDS + 1], toks[NIDS * MAXLEN];
  int n = 0, rows = 0;
  for (int s = 0; s < NIDS; s++) {
    mseq_t *q = &m->seq[s];
    if (!q->live || q->swapped || q->reserved == q->len || kvc_test_rng_below(&r->rng, 3) == 0)
      continue;
    int room = q->reserved - q->len;
    int add = kvc_test_rng_below(&r->rng, 2) ? 1 : 1 + (int)kvc_test_rng_below(&r->rng, (uint32_t)room);
    if (rows + add > MBT) continue;
    ids[n] = q->id;
    nn[n++] = add;
    rows += add;
  }
  if (n == 0) return;
  for (int i = 0; i < rows; i++) toks[i] = (int32_t)kvc_test_rng_below(&r->rng, 3);
  const int32_t *tok_ids = kvc_test_rng_below(&r->rng, 4) ? toks : NULL;
  kvc_status_t want = KVC_OK;
  switch (kvc_test_rng_below(&r->rng, 12)) {
    case 0:  /* an unknown id */
      for (kvc_seq_id_t id = 1; id <= NIDS; id++)
        if (!mseq(m, id)) {
          ids[n] = id, nn[n++] = 1, want = KVC_ERR_NOT_FOUND;
          break;
        }
      break;
    case 1: /* a duplicate */
      ids[n] = ids[0], nn[n++] = 1, want = KVC_ERR_INVALID_ARGUMENT;
      break;
    case 2: /* more than reserved */
      nn[0] += m->seq[ids[0] - 1].reserved - m->seq[ids[0] - 1].len, want = KVC_ERR_INVALID_ARGUMENT;
      break;
    case 3: /* a swapped sequence */
      for (int s = 0; s < NIDS; s++)
        if (m->seq[s].live && m->seq[s].swapped) {
          ids[n] = m->seq[s].id, nn[n++] = 1, want = KVC_ERR_INVALID_STATE;
          break;
        }
      break;
    default:
      break;
  }
  int total = 0;
  for (int i = 0; i < n; i++) total += nn[i];
  if (n > NSEQ || (want == KVC_OK && total > MBT)) want = KVC_ERR_INVALID_ARGUMENT;
  kvc_bm_batch_t batch = {n, ids, nn, tok_ids};
  kvc_status_t st = kvc_bm_plan(r->bm, &batch, &r->plan);
  assert_int_equal(st, want);
  if (st != KVC_OK) return;

  const kvc_bm_plan_t *p = &r->plan;
  const uint64_t step = ++m->step;
  m->step_open = 1;
  assert_int_equal(p->step, step);
  assert_int_equal(p->num_seqs, n);
  assert_int_equal(p->total_rows, rows);
  int row = 0, njobs = 0, nnew = 0, nbids = 0, max_kv = 0;
  for (int i = 0; i < n; i++) {
    mseq_t *q = &m->seq[ids[i] - 1];
    const int len0 = q->len, len1 = len0 + nn[i];
    assert_int_equal(p->qo_indptr[i], row);
    assert_int_equal(p->block_indptr[i], nbids);
    const int32_t *bids = p->block_ids + nbids;
    /* The existing table is untouched; new blocks were free in the model. */
    assert_memory_equal(bids, q->table, (size_t)q->nb * sizeof(int32_t));
    int nb1 = (len1 + B - 1) / B;
    for (int j = q->nb; j < nb1; j++) {
      int32_t b = bids[j];
      assert_true(b >= 0 && b < NBLK);
      assert_int_equal(mref(m, b), 0);
      assert_false(m->blk[b].cached);
      block_reset(&m->blk[b]);
      q->table[j] = b;
    }
    const int old_nb = q->nb;
    q->nb = nb1;
    for (int pos = len0; pos < len1; pos++, row++) {
      int bi = pos / B, slot = pos % B;
      int32_t b = q->table[bi];
      int full = (bi + 1) * B <= len1;
      assert_int_equal(p->row_block[row], b);
      assert_int_equal(p->row_slot[row], slot);
      int32_t t = tok_ids ? tok_ids[row] : pos < q->prompt_n ? q->prompt[pos] : -1;
      if (t < 0) q->chain_ok = 0;
      q->tok[pos] = q->chain_ok ? t : -1;
      if (slot != B - 1 && pos != len1 - 1) continue;
      /* Last row of this block in the step. */
      if (full) {
        assert_int_equal(p->job_block[njobs], b);
        int staged = bi == old_nb - 1 ? len0 % B : 0;
        assert_int_equal(p->job_staged[njobs], staged);
        njobs++;
        mblock_t *k = &m->blk[b];
        k->full = 1;
        k->done_step = step;
        int hashed = 0;
        if (m->prefix && q->chain_ok) {
          const int32_t *bt = q->tok + bi * B;
          k->content = fingerprint(q->salt, q->tok, (bi + 1) * B);
          int32_t e = model_find(m, q->last_gen, q->salt, bt);
          if (e >= 0) {
            q->last_gen = m->blk[e].gen;
          } else {
            hashed = 1;
            k->hashed = 1;
            k->gen = ++m->gen_next;
            k->parent_gen = q->last_gen;
            k->salt = q->salt;
            memcpy(k->tok, bt, sizeof(k->tok));
            q->last_gen = k->gen;
          }
        }
        expect_event(m, KVC_EVENT_BLOCK_STORED, b, hashed);
      } else if (bi >= old_nb) {
        assert_int_equal(p->new_staging[nnew++], b);
      }
    }
    q->len = len1;
    q->planned = 1;
    q->step = step;
    assert_int_equal(p->kv_len[i], len1);
    nbids += q->nb;
    if (len1 > max_kv) max_kv = len1;
  }
  assert_int_equal(p->qo_indptr[n], row);
  assert_int_equal(p->block_indptr[n], nbids);
  assert_int_equal(p->num_jobs, njobs);
  assert_int_equal(p->num_new_staging, nnew);
  assert_int_equal(p->max_kv_len, max_kv);
  /* Usually the step completes at once; sometimes it stays open across other operations. */
  if (kvc_test_rng_below(&r->rng, 4)) {
    kvc_bm_step_done(r->bm);
    m->step_open = 0;
  }
}

static void op_step_done(run_t *r) {
  kvc_bm_step_done(r->bm);
  r->m.step_open = 0;
}

/* ---- the runs ---------------------------------------------------------------------------- */

static uint64_t colliding_hash(uint64_t parent, const int32_t *tokens, int n, uint64_t identity,
                               uint64_t salt) {
  (void)parent, (void)n, (void)identity, (void)salt;
  return (uint64_t)(tokens[0] & 1) + 1;
}

static void run_model(int prefix, int colliding, uint64_t seed) {
  run_t *r = calloc(1, sizeof(*r));
  assert_non_null(r);
  kvc_bm_config_t c = tb_config();
  c.num_layers = L;
  c.block_tokens = B;
  c.worst_page_chunks = W;
  c.max_seqs = NSEQ;
  c.max_seq_len = MAXLEN;
  c.max_blocks = NBLK;
  c.total_chunks = TOTAL_CHUNKS;
  c.staging_bytes = STAGING_BYTES;
  c.swap_bytes = SWAP_BYTES;
  c.watermark = 0.05f;
  c.prefix_caching = prefix;
  c.max_batch_tokens = MBT;
  r->m.cfg = c;
  r->m.prefix = prefix;
  r->m.wm = (uint32_t)(0.05 * TOTAL_CHUNKS + 0.5);
  assert_int_equal(kvc_host_alloc_create(&r->ha), KVC_OK);
  assert_int_equal(kvc_bm_create(&c, r->ha, &r->bm), KVC_OK);
  if (colliding) kvc_bm_set_hash_fn(r->bm, colliding_hash);
  kvc_bm_set_event_sink(r->bm, tb_on_event, &r->ev);
  kvc_test_rng_seed(&r->rng, seed);
  int64_t iters = (int64_t)(40000 * kvc_test_scale());
  for (int64_t it = 0; it < iters; it++) {
    int op = (int)kvc_test_rng_below(&r->rng, 100);
    int kind;
    if (op < 12) kind = 0, op_add(r);
    else if (op < 30) kind = 1, op_reserve(r);
    else if (op < 55) kind = 2, op_plan(r);
    else if (op < 72) kind = 3, op_measure(r);
    else if (op < 78) kind = 4, op_fork(r);
    else if (op < 88) kind = 5, op_free(r);
    else if (op < 93) kind = 6, op_swap_out(r);
    else if (op < 97) kind = 7, op_swap_in(r);
    else kind = 8, op_step_done(r);
    r->ops[kind]++;
    check_all(r);
  }
  kvc_bm_stats_t s;
  kvc_bm_get_stats(r->bm, &s);
  /* The trace must have reached the interesting states, or the test proves little. */
  assert_true(s.evictions > 0 || !prefix);
  assert_true(s.swap_outs > 0 && s.swap_ins > 0);
  assert_true(!prefix || s.prefix_hits > 0);
  print_message("prefix %d colliding %d: %lld ops, %lld hits / %lld queries, %lld evictions, "
                "%lld swaps, %lld ignored measurements\n",
                prefix, colliding, (long long)iters, (long long)s.prefix_hits,
                (long long)s.prefix_queries, (long long)s.evictions, (long long)s.swap_outs,
                (long long)s.ignored_measurements);
  kvc_bm_destroy(r->bm);
  assert_int_equal(kvc_host_alloc_bytes(r->ha), 0);
  kvc_host_alloc_destroy(r->ha);
  free(r);
}

static void model_real_hash(void **state) {
  (void)state;
  run_model(1, 0, 1);
}

static void model_colliding_hash(void **state) {
  (void)state;
  run_model(1, 1, 2);
}

static void model_no_prefix_caching(void **state) {
  (void)state;
  run_model(0, 0, 3);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(model_real_hash),
      cmocka_unit_test(model_colliding_hash),
      cmocka_unit_test(model_no_prefix_caching),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
