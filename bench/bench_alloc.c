/*
 * bench_alloc (`./kvc bench alloc`): the host-side block manager (allocator/kvc_blocks.h) under a
 * serving workload, with no device work. Three measurements:
 *
 * 1. Churn. A Llama-3-8B-like shape (32 layers, 8 kv heads, head_dim 128, 64-token blocks, fp16)
 *    on a fixed pool. Requests arrive as a Poisson process; prompt and output lengths are
 *    log-normal; half the prompts start with one of eight shared system prompts. A vLLM-like
 *    scheduler loop gives each step a budget of 8192 tokens: running requests first (a decode
 *    token or the next prefill chunk each, reserved for that step; a failed reservation preempts
 *    the newest request: swap when its pages are all measured, else drop and recompute), then
 *    swapped requests come back, then new ones are admitted (kvc_bm_seq_add with its prefix
 *    lookup, and a reservation for their first chunk). One kvc_bm_plan per step; finished
 *    requests are freed. Compressed page sizes arrive
 *    one step late through kvc_bm_page_measured_step, as the device would report them: 131072
 *    values x b bits + a 3 KiB header (scales, codebooks), b ~ N(4, 0.4) clipped to [3, 5].
 *    A block's pages pack into shared chunks as a cache's do (each starts where the previous
 *    layer's ended), and each page reports the chunks it took from the pool.
 *    Reported: block-manager calls per second, and fragmentation of the measured pages at steady
 *    state, (chunk bytes - page bytes) / chunk bytes, sampled every 100 steps after warm-up.
 * 2. The chunk-size rule. The pool's chunk is the smallest power of two >= 256 bytes in which the
 *    largest possible page (raw fp16 + header) fits in KVC_PAGE_MAX_CHUNKS - 1 chunks (a packed
 *    page may lie in one more, allocator/kvc_pool_layout.h); the table shows the fragmentation
 *    every candidate chunk size would give for the same page sizes.
 * 3. Plan time: kvc_bm_plan for a decode step of 256 sequences of 32k tokens (513 blocks each),
 *    median over `--plan-steps` steps (includes the steps where every sequence opens a new block or
 *    completes one).
 *
 * Prints a table, then one JSON line (last):
 *   {"bench":"alloc","ops_per_s":...,"fragmentation":...,"plan_us":...,...}
 * Options: --steps N (churn steps, default 20000), --plan-steps N (default 400), --rate R
 * (arrivals per step, default 0.12: close to what the pool sustains), --seed S.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "allocator/kvc_blocks.h"
#include "allocator/kvc_pool_layout.h"

/* The shape: Llama-3-8B, one rank. */
#define LAYERS 32
#define KV_HEADS 8
#define HEAD_DIM 128
#define BLOCK 64
#define PAGE_VALUES (2 * KV_HEADS * BLOCK * HEAD_DIM)
#define STAGING_BYTES (PAGE_VALUES * 2)
#define PAGE_HEADER 3072
#define MAX_PAGE_BYTES (STAGING_BYTES + 4096) /* a raw page and its header */

#define MAX_SEQS 256
#define MAX_SEQ_LEN 32768
#define MAX_BATCH_TOKENS 8192
#define POOL_BYTES ((uint64_t)8 << 30)
#define SWAP_BYTES ((size_t)16 << 30)

#define CHECK(call)                                                                                \
  do {                                                                                             \
    kvc_status_t st_ = (call);                                                                     \
    if (st_ != KVC_OK) {                                                                           \
      fprintf(stderr, "bench_alloc: %s failed: %s (line %d)\n", #call, kvc_status_string(st_),     \
              __LINE__);                                                                           \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* ---- random numbers (xorshift64*, Box-Muller) ------------------------------------------------ */

static uint64_t rng_state;
static uint64_t rng_u64(void) {
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 0x2545f4914f6cdd1dull;
}
static double rng_uniform(void) { return (double)(rng_u64() >> 11) * (1.0 / 9007199254740992.0); }
static double rng_normal(void) {
  double u = rng_uniform();
  if (u < 1e-300) u = 1e-300;
  return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * rng_uniform());
}
static int rng_poisson(double lambda) {
  double l = exp(-lambda), p = 1.0;
  int k = 0;
  do {
    k++;
    p *= rng_uniform();
  } while (p > l);
  return k - 1;
}
static int lognormal_len(double median, double sigma, int lo, int hi) {
  double x = median * exp(sigma * rng_normal());
  return x < lo ? lo : x > hi ? hi : (int)x;
}

static uint32_t chunk_rule(uint64_t max_page) {
  uint64_t cb = KVC_CHUNK_MIN_BYTES;
  while (max_page > (uint64_t)(KVC_PAGE_MAX_CHUNKS - 1) * cb) cb *= 2;
  return (uint32_t)cb;
}

static uint32_t sample_page_bytes(void) {
  double bits = 4.0 + 0.4 * rng_normal();
  bits = bits < 3.0 ? 3.0 : bits > 5.0 ? 5.0 : bits;
  return (uint32_t)(PAGE_VALUES * bits / 8.0) + PAGE_HEADER;
}

static kvc_bm_t *make_bm(kvc_host_alloc_t *ha, uint32_t chunk, uint64_t total_chunks,
                         int32_t max_blocks, int max_seq_len, float watermark, size_t swap) {
  kvc_bm_config_t c;
  memset(&c, 0, sizeof(c));
  c.num_layers = LAYERS;
  c.block_tokens = BLOCK;
  c.max_seqs = MAX_SEQS;
  c.max_seq_len = max_seq_len;
  c.max_blocks = max_blocks;
  c.total_chunks = (uint32_t)total_chunks;
  c.staging_chunks = kvc_chunks_for(STAGING_BYTES, chunk);
  c.worst_page_chunks = kvc_chunks_for(MAX_PAGE_BYTES, chunk);
  c.staging_bytes = STAGING_BYTES;
  c.watermark = watermark;
  c.prefix_caching = 1;
  c.codec_identity = 0x4c6c616d61;
  c.swap_bytes = swap;
  c.max_batch_tokens = MAX_BATCH_TOKENS;
  kvc_bm_t *bm;
  CHECK(kvc_bm_create(&c, ha, &bm));
  return bm;
}

/* ---- 1. churn -------------------------------------------------------------------------------- */

enum { WAITING, RUNNING, SWAPPED, DONE };

typedef struct req {
  kvc_seq_id_t id;
  int prompt, output, len, state;
  int32_t *tok; /* [prompt + output] */
} req_t;

typedef struct pending {
  uint64_t step;
  int32_t block;
} pending_t;

typedef struct churn {
  kvc_bm_t *bm;
  uint32_t chunk;
  int64_t ops, measurements;
  int64_t admitted, finished, preempt_swap, preempt_drop, admit_refused, tokens;
  double frag_sum, util_sum;
  int frag_samples;
  /* Sampled page sizes, for the chunk-size table. */
  uint32_t *page_sizes;
  int64_t npage_sizes, page_sizes_cap;
} churn_t;

static int32_t system_prompt(int family, int i) { return 1000000 * (family + 1) + i; }

static req_t *new_request(kvc_seq_id_t id) {
  req_t *r = calloc(1, sizeof(*r));
  if (!r) exit(1);
  r->id = id;
  int shared = rng_uniform() < 0.5, family = (int)(rng_u64() % 8);
  int own = lognormal_len(600, 1.0, 8, 12000);
  r->prompt = (shared ? 1024 : 0) + own;
  r->output = lognormal_len(400, 1.0, 4, 8192);
  r->tok = malloc((size_t)(r->prompt + r->output) * sizeof(int32_t));
  if (!r->tok) exit(1);
  for (int i = 0; i < r->prompt + r->output; i++)
    r->tok[i] = shared && i < 1024 ? system_prompt(family, i) : (int32_t)(rng_u64() % 128000);
  r->state = WAITING;
  return r;
}

/* Chunks the page of `layer` takes from the pool when a block's pages pack into shared chunks as
 * a cache's do (allocator/kvc_pool_layout.h): it starts where the previous layer's page ended,
 * inside that page's last chunk. *cur follows the block's pages in layer order. */
static uint32_t packed_chunks(kvc_pack_cursor_t *cur, int layer, uint32_t bytes, uint32_t chunk) {
  const uint32_t first = kvc_pack_after(cur, layer, chunk);
  const uint32_t popped = kvc_pack_popped(first, bytes, chunk);
  const uint32_t nchunks = popped + (first ? 1u : 0u);
  cur->layer = layer;
  cur->end = first * (chunk >> 8) + bytes - (nchunks - 1u) * chunk;
  return popped;
}

static void deliver_measurements(churn_t *c, pending_t *p, int n) {
  for (int i = 0; i < n; i++) {
    kvc_pack_cursor_t cur = {-1, 0, 0};
    for (int l = 0; l < LAYERS; l++) {
      uint32_t bytes = sample_page_bytes();
      kvc_bm_page_measured_step(c->bm, p[i].step, p[i].block, l, bytes,
                                packed_chunks(&cur, l, bytes, c->chunk));
      c->ops++;
      c->measurements++;
      if (c->npage_sizes < c->page_sizes_cap) c->page_sizes[c->npage_sizes++] = bytes;
    }
  }
}

/* Moves a running request out of the pool: a decoding one is swapped when every page it alone
 * holds is measured; otherwise it is dropped (freed, to be recomputed, its prompt mostly from the
 * prefix cache). */
static void preempt(churn_t *c, req_t *r, req_t **waiting, int *nwaiting, req_t **swapped,
                    int *nswapped) {
  kvc_bm_work_t w;
  c->ops++;
  if (r->len >= r->prompt && kvc_bm_seq_swap_out(c->bm, r->id, KVC_OK, &w) == KVC_OK) {
    r->state = SWAPPED;
    swapped[(*nswapped)++] = r;
    c->preempt_swap++;
    return;
  }
  c->ops++;
  CHECK(kvc_bm_seq_free(c->bm, r->id, &w));
  r->len = 0;
  r->state = WAITING;
  memmove(waiting + 1, waiting, (size_t)*nwaiting * sizeof(*waiting));
  waiting[0] = r;
  (*nwaiting)++;
  c->preempt_drop++;
}

/* Appends `r`'s next `n` tokens as batch entry `i` (rows from `row`); returns n. */
static int add_to_batch(req_t *r, int n, req_t **batch, kvc_seq_id_t *ids, int32_t *nn,
                        int32_t *tok, int i, int row) {
  batch[i] = r;
  ids[i] = r->id;
  nn[i] = n;
  memcpy(tok + row, r->tok + r->len, (size_t)n * sizeof(int32_t));
  return n;
}

static double run_churn(churn_t *c, int steps, double arrivals_per_step) {
  const int cap = 1 << 16;
  req_t **waiting = malloc(cap * sizeof(req_t *)), **running = malloc(MAX_SEQS * sizeof(req_t *));
  req_t **swapped = malloc(MAX_SEQS * sizeof(req_t *));
  pending_t *pend = malloc(MAX_BATCH_TOKENS * sizeof(pending_t));
  kvc_seq_id_t *ids = malloc(MAX_SEQS * sizeof(kvc_seq_id_t));
  int32_t *nn = malloc(MAX_SEQS * sizeof(int32_t)), *tok = malloc(MAX_BATCH_TOKENS * sizeof(int32_t));
  req_t **batch = malloc(MAX_SEQS * sizeof(req_t *));
  if (!waiting || !running || !swapped || !pend || !ids || !nn || !tok || !batch) exit(1);
  int nwaiting = 0, nrunning = 0, nswapped = 0, npend = 0;
  kvc_seq_id_t next_id = 1;
  kvc_bm_work_t w;
  kvc_bm_plan_t plan;
  const int warmup = steps / 5;
  double t0 = now_s();
  for (int step = 0; step < steps; step++) {
    /* Page sizes of the previous step's compressed blocks. */
    deliver_measurements(c, pend, npend);
    npend = 0;
    for (int k = rng_poisson(arrivals_per_step); k > 0 && nwaiting < cap; k--)
      waiting[nwaiting++] = new_request(next_id++);

    /* Running requests first, oldest first, within the step's token budget: a decode token or
     * the next prefill chunk each, reserved now; a failed reservation preempts the newest. */
    int n = 0, rows = 0;
    for (int i = 0; i < nrunning && rows < MAX_BATCH_TOKENS; i++) {
      req_t *r = running[i];
      int want = r->len < r->prompt ? r->prompt - r->len : 1;
      if (want > MAX_BATCH_TOKENS - rows) want = MAX_BATCH_TOKENS - rows;
      c->ops++;
      while (kvc_bm_seq_reserve(c->bm, r->id, want, 0, &w) != KVC_OK) {
        req_t *victim = running[--nrunning];
        preempt(c, victim, waiting, &nwaiting, swapped, &nswapped);
        if (victim == r) break;
        c->ops++;
      }
      if (r->state != RUNNING) break;
      rows += add_to_batch(r, want, batch, ids, nn, tok, n, rows);
      n++;
    }
    /* Then swapped requests come back, then new ones are admitted, FIFO, with the budget left. */
    while (nswapped > 0 && nrunning < MAX_SEQS) {
      c->ops++;
      if (kvc_bm_seq_swap_in(c->bm, swapped[0]->id, &w) != KVC_OK) break;
      swapped[0]->state = RUNNING;
      running[nrunning++] = swapped[0];
      memmove(swapped, swapped + 1, (size_t)--nswapped * sizeof(*swapped));
    }
    while (nswapped == 0 && nwaiting > 0 && nrunning < MAX_SEQS && rows < MAX_BATCH_TOKENS) {
      req_t *r = waiting[0];
      int cached;
      c->ops++;
      CHECK(kvc_bm_seq_add(c->bm, r->id, r->tok, r->prompt, 0, &cached, &w));
      int want = r->prompt - cached;
      if (want > MAX_BATCH_TOKENS - rows) want = MAX_BATCH_TOKENS - rows;
      c->ops++;
      if (kvc_bm_seq_reserve(c->bm, r->id, want, 0, &w) != KVC_OK) {
        c->ops++;
        CHECK(kvc_bm_seq_free(c->bm, r->id, &w));
        c->admit_refused++;
        break;
      }
      r->len = cached;
      r->state = RUNNING;
      running[nrunning++] = r;
      memmove(waiting, waiting + 1, (size_t)--nwaiting * sizeof(*waiting));
      c->admitted++;
      rows += add_to_batch(r, want, batch, ids, nn, tok, n, rows);
      n++;
    }
    if (n == 0) continue;
    kvc_bm_batch_t b = {n, ids, nn, tok};
    c->ops++;
    CHECK(kvc_bm_plan(c->bm, &b, &plan));
    kvc_bm_step_done(c->bm);
    c->tokens += rows;
    for (int j = 0; j < plan.num_jobs; j++) pend[npend++] = (pending_t){plan.step, plan.job_block[j]};

    /* Finished requests leave; their blocks stay in the prefix cache. */
    for (int i = 0; i < n; i++) batch[i]->len += nn[i];
    for (int i = 0; i < nrunning;) {
      req_t *r = running[i];
      if (r->len < r->prompt + r->output) {
        i++;
        continue;
      }
      c->ops++;
      CHECK(kvc_bm_seq_free(c->bm, r->id, &w));
      free(r->tok);
      free(r);
      memmove(running + i, running + i + 1, (size_t)(--nrunning - i) * sizeof(*running));
      c->finished++;
    }

    if (step >= warmup && step % 100 == 0) {
      kvc_bm_stats_t s;
      kvc_bm_get_stats(c->bm, &s);
      double alloc = (double)s.measured_page_chunks * c->chunk;
      if (alloc > 0) {
        c->frag_sum += (alloc - (double)s.measured_page_bytes) / alloc;
        c->util_sum += (double)(s.charged_chunks + s.reserved_chunks) /
                       (double)(s.charged_chunks + s.reserved_chunks + s.free_chunks);
        c->frag_samples++;
      }
    }
  }
  double elapsed = now_s() - t0;
  char why[256];
  if (kvc_bm_validate(c->bm, why, sizeof(why)) != KVC_OK) {
    fprintf(stderr, "bench_alloc: validate after churn: %s\n", why);
    exit(1);
  }
  for (int i = 0; i < nwaiting; i++) free(waiting[i]->tok), free(waiting[i]);
  for (int i = 0; i < nrunning; i++) free(running[i]->tok), free(running[i]);
  for (int i = 0; i < nswapped; i++) free(swapped[i]->tok), free(swapped[i]);
  free(waiting), free(running), free(swapped), free(pend), free(ids), free(nn), free(tok), free(batch);
  return elapsed;
}

/* ---- 3. plan time ---------------------------------------------------------------------------- */

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

static void plan_time(uint32_t chunk, int steps, double *median_us, double *p99_us,
                      double *max_us) {
  const int nseq = 256, ctx = 32768, max_len = ctx + steps;
  int32_t max_blocks = nseq * (max_len / BLOCK + 1);
  uint64_t total = (uint64_t)max_blocks * LAYERS * kvc_chunks_for(MAX_PAGE_BYTES, chunk);
  kvc_host_alloc_t *ha;
  CHECK(kvc_host_alloc_create(&ha));
  kvc_bm_t *bm = make_bm(ha, chunk, total, max_blocks, max_len, 0.0f, 0);
  kvc_bm_work_t w;
  kvc_bm_plan_t plan;
  int32_t *tok = malloc(MAX_BATCH_TOKENS * sizeof(int32_t));
  kvc_seq_id_t ids[256];
  int32_t nn[256];
  double *us = malloc((size_t)steps * sizeof(double));
  if (!tok || !us) exit(1);
  /* Fill: 256 distinct 32k-token sequences, prefilled 8192 tokens a step. */
  for (int s = 0; s < nseq; s++) {
    int cached;
    ids[s] = (kvc_seq_id_t)(s + 1);
    CHECK(kvc_bm_seq_add(bm, ids[s], NULL, 0, 0, &cached, &w));
    CHECK(kvc_bm_seq_reserve(bm, ids[s], ctx, 0, &w));
    for (int done = 0; done < ctx; done += MAX_BATCH_TOKENS) {
      for (int i = 0; i < MAX_BATCH_TOKENS; i++) tok[i] = (int32_t)(rng_u64() % 128000);
      int32_t n = MAX_BATCH_TOKENS;
      kvc_bm_batch_t b = {1, &ids[s], &n, tok};
      CHECK(kvc_bm_plan(bm, &b, &plan));
      kvc_bm_step_done(bm);
    }
  }
  for (int s = 0; s < nseq; s++) nn[s] = 1;
  for (int k = 0; k < steps; k++) {
    for (int s = 0; s < nseq; s++) CHECK(kvc_bm_seq_reserve(bm, ids[s], 1, 0, &w));
    for (int s = 0; s < nseq; s++) tok[s] = (int32_t)(rng_u64() % 128000);
    kvc_bm_batch_t b = {nseq, ids, nn, tok};
    double t0 = now_s();
    kvc_status_t st = kvc_bm_plan(bm, &b, &plan);
    double t1 = now_s();
    CHECK(st);
    kvc_bm_step_done(bm);
    if (plan.block_indptr[nseq] < nseq * (ctx / BLOCK)) exit(1);
    us[k] = (t1 - t0) * 1e6;
  }
  qsort(us, (size_t)steps, sizeof(double), cmp_double);
  *median_us = us[steps / 2];
  *p99_us = us[(int)(steps * 0.99)];
  *max_us = us[steps - 1];
  free(us);
  free(tok);
  kvc_bm_destroy(bm);
  kvc_host_alloc_destroy(ha);
}

/* ---- main ------------------------------------------------------------------------------------ */

int main(int argc, char **argv) {
  int steps = 20000, plan_steps = 400;
  double rate = 0.12; /* arrivals per step: about what the pool sustains */
  uint64_t seed = 1;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--plan-steps") && i + 1 < argc) plan_steps = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoull(argv[++i], NULL, 0);
    else if (!strcmp(argv[i], "--rate") && i + 1 < argc) rate = atof(argv[++i]);
    else {
      fprintf(stderr, "usage: bench_alloc [--steps N] [--plan-steps N] [--rate R] [--seed S]\n");
      return 2;
    }
  }
  if (steps < 100 || plan_steps < 10 || !(rate > 0 && rate < 100)) {
    fprintf(stderr, "bench_alloc: --steps >= 100, --plan-steps >= 10, 0 < --rate < 100\n");
    return 2;
  }
  rng_state = seed * 0x9e3779b97f4a7c15ull + 1;

  const uint32_t chunk = chunk_rule(MAX_PAGE_BYTES);
  const uint64_t total_chunks = POOL_BYTES / chunk;
  /* Block ids: as the cache sizes them (no more than 16x compression could use). */
  int32_t max_blocks = (int32_t)(POOL_BYTES / ((uint64_t)LAYERS * STAGING_BYTES / 16));
  kvc_host_alloc_t *ha;
  CHECK(kvc_host_alloc_create(&ha));
  churn_t c;
  memset(&c, 0, sizeof(c));
  c.chunk = chunk;
  c.bm = make_bm(ha, chunk, total_chunks, max_blocks, MAX_SEQ_LEN, 0.01f, SWAP_BYTES);
  c.page_sizes_cap = 1 << 20;
  c.page_sizes = malloc((size_t)c.page_sizes_cap * sizeof(uint32_t));
  if (!c.page_sizes) return 1;
  double churn_s = run_churn(&c, steps, rate);
  kvc_bm_stats_t s;
  kvc_bm_get_stats(c.bm, &s);
  double ops_per_s = (double)c.ops / churn_s;
  double frag = c.frag_samples ? c.frag_sum / c.frag_samples : 0.0;
  double util = c.frag_samples ? c.util_sum / c.frag_samples : 0.0;

  double plan_med, plan_p99, plan_max;
  plan_time(chunk, plan_steps, &plan_med, &plan_p99, &plan_max);

  printf("bench_alloc: host block manager, %d layers x %d kv heads x head_dim %d, %d-token blocks\n",
         LAYERS, KV_HEADS, HEAD_DIM, BLOCK);
  printf("churn: %d steps, %.2f arrivals a step, pool %.0f GiB = %llu chunks of %u B, %d block ids, largest page %d B "
         "(%u chunks)\n",
         steps, rate, (double)POOL_BYTES / (1 << 30), (unsigned long long)total_chunks, chunk,
         max_blocks, MAX_PAGE_BYTES, kvc_chunks_for(MAX_PAGE_BYTES, chunk));
  printf("  %-34s %14.0f   (%lld calls in %.2f s; %lld of them page sizes)\n",
         "block-manager calls / s", ops_per_s, (long long)c.ops, churn_s,
         (long long)c.measurements);
  printf("  %-34s %14.0f\n", "tokens planned / s", (double)c.tokens / churn_s);
  printf("  %-34s %14lld   finished %lld, refused at admission %lld\n", "requests admitted",
         (long long)c.admitted, (long long)c.finished, (long long)c.admit_refused);
  printf("  %-34s %14lld   by swap %lld, by drop %lld\n", "preemptions",
         (long long)(c.preempt_swap + c.preempt_drop), (long long)c.preempt_swap,
         (long long)c.preempt_drop);
  printf("  %-34s %13.1f%%   %lld of %lld blocks\n", "prefix-cache hit rate",
         s.prefix_queries ? 100.0 * (double)s.prefix_hits / (double)s.prefix_queries : 0.0,
         (long long)s.prefix_hits, (long long)s.prefix_queries);
  printf("  %-34s %14lld\n", "evictions", (long long)s.evictions);
  printf("  %-34s %13.1f%%\n", "pool charged or reserved (mean)*", 100.0 * util);
  printf("  %-34s %13.2f%%   target <= 10%%\n", "fragmentation at steady state", 100.0 * frag);
  printf("  * cached blocks included: they are evicted on demand\n");

  printf("chunk-size rule: smallest power of two >= %d B holding the largest page in <= %d chunks\n",
         KVC_CHUNK_MIN_BYTES, KVC_PAGE_MAX_CHUNKS - 1);
  printf("  %10s %18s %16s\n", "chunk B", "largest page chunks", "fragmentation");
  for (uint32_t cb = chunk / 4; cb <= chunk * 4; cb *= 2) {
    double alloc = 0, used = 0;
    kvc_pack_cursor_t cur = {-1, 0, 0};
    for (int64_t i = 0; i < c.npage_sizes; i++) { /* a block's LAYERS pages, in layer order */
      if (i % LAYERS == 0) cur.layer = -1;
      alloc += (double)packed_chunks(&cur, (int)(i % LAYERS), c.page_sizes[i], cb) * cb;
      used += c.page_sizes[i];
    }
    uint32_t worst = kvc_chunks_for(MAX_PAGE_BYTES, cb);
    printf("  %10u %18u %15.2f%%%s\n", cb, worst, alloc > 0 ? 100.0 * (alloc - used) / alloc : 0.0,
           cb == chunk                      ? "   <- the rule"
           : worst > KVC_PAGE_MAX_CHUNKS - 1 ? "   (too many chunks)"
                                             : "");
  }
  printf("plan: 256 sequences x 32768 tokens (513 blocks each), one decode token each, %d steps\n",
         plan_steps);
  printf("  %-34s %14.1f us   p99 %.1f us, max %.1f us; target <= 100 us\n", "kvc_bm_plan median",
         plan_med, plan_p99, plan_max);
  printf("{\"bench\":\"alloc\",\"ops_per_s\":%.0f,\"fragmentation\":%.4f,\"plan_us\":%.1f,"
         "\"plan_p99_us\":%.1f,\"chunk_bytes\":%u,\"tokens_per_s\":%.0f,\"prefix_hit_rate\":%.3f,"
         "\"preemptions\":%lld,\"steps\":%d}\n",
         ops_per_s, frag, plan_med, plan_p99, chunk, (double)c.tokens / churn_s,
         s.prefix_queries ? (double)s.prefix_hits / (double)s.prefix_queries : 0.0,
         (long long)(c.preempt_swap + c.preempt_drop), steps);
  free(c.page_sizes);
  kvc_bm_destroy(c.bm);
  kvc_host_alloc_destroy(ha);
  return 0;
}
