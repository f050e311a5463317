/*
 * `./kvc demo`: a real model served through kvcomp with continuous batching.
 *
 * By default 32 requests share a system prompt and differ in their last words; each samples up to
 * --max-new tokens (temperature / top-p, fixed seed, one RNG per request so the text does not
 * depend on scheduling). The scheduler is vLLM's in miniature:
 *   - admission: kvc_seq_add (prefix-cache hits give n_cached) then kvc_seq_reserve for the prompt;
 *     a refused reserve leaves the request waiting; a per-step prefill budget staggers admission so
 *     that later requests find the shared prompt's blocks in the prefix cache;
 *   - every step each running sequence reserves room for its next token; when the pool refuses,
 *     the most recently admitted request is preempted: swapped out to host memory (swap_bytes > 0)
 *     or dropped and later recomputed (its blocks stay in the prefix cache);
 *   - one kvc_plan per step, then kvc_store / kvc_attend per layer (runner_forward.c).
 * The pool is deliberately small (--pool-kib) so that waiting and preemption happen.
 * It streams two completions, shows a progress line, and ends with a table and a JSON line.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "runner_eval.h"

enum { WAITING, RUNNING, SWAPPED, DONE };

typedef struct request {
  int idx;
  int32_t *tokens;      /* prompt, then generated tokens */
  int n_prompt, n_tokens, cap;
  int n_gen;
  int state;
  int pos0;             /* cache length: position of the next token fed */
  int pending;          /* tokens fed in the coming step */
  int admitted;         /* admission order (preemption victim: the latest) */
  uint64_t rng;
  char *text;           /* generated text */
  size_t text_len, text_cap;
} request_t;

typedef struct demo_opts {
  const char *model, *tokenizer, *text, *prompt;
  int requests, max_new, ppl_windows, prefill_budget, stream, dense, backend_cuda, backend_set;
  float temperature, top_p;
  uint64_t seed;
  size_t pool_bytes, swap_bytes;
  int pool_set;
} demo_opts_t;

static const char *SYSTEM_PROMPT =
    "Once upon a time, in a small town near a big forest, there lived many happy children. Every "
    "morning the sun came up and the birds sang in the trees. The children liked to play in the park "
    "with their friends, and their moms and dads watched them and smiled. They shared their toys and "
    "they were always kind to each other. One day, something new happened in the town.";
static const char *NAMES[16] = {"Lily", "Tom", "Ben", "Sue", "Max", "Mia", "Tim", "Anna",
                                "Sam", "Lucy", "Jack", "Sara", "Bob", "Emma", "Joe", "Kitty"};
static const char *STARTS[2] = {"wanted to", "found a"};

static void usage(FILE *f) {
  fprintf(f,
          "usage: kvc_demo [--model FILE] [--tokenizer FILE] [--text FILE] [--requests N]\n"
          "                [--max-new N] [--temperature T] [--top-p P] [--seed S] [--pool-kib N]\n"
          "                [--swap-kib N] [--prefill-budget N] [--ppl-windows N] [--backend cpu|cuda]\n"
          "                [--prompt TEXT] [--no-stream] [--dense]\n"
          "  defaults: stories260K.gguf under $KVC_SHARED_DIR or ../shared, 32 requests, 200 new\n"
          "  tokens each, temperature 0.8, top-p 0.9, seed 1234, a pool of a seventh of what the\n"
          "  requests would take in fp16, swap 4 MiB (0: preempt by drop and recompute), 8 windows\n"
          "  for the perplexity check, CUDA when built and a GPU is present.\n"
          "  --prompt replaces the shared system prompt (each request still adds a name and a verb).\n"
          "  --dense runs the runner's exact dense cache instead of kvcomp (development).\n");
}

static int parse_num(const char *s, double lo, double hi, double *out) {
  char *end;
  double v = strtod(s, &end);
  if (*end || !(v >= lo && v <= hi)) return -1;
  *out = v;
  return 0;
}

static int parse_args(int argc, char **argv, demo_opts_t *o) {
  memset(o, 0, sizeof *o);
  o->requests = 32;
  o->max_new = 200;
  o->ppl_windows = 8;
  o->prefill_budget = 512;
  o->stream = 1;
  o->temperature = 0.8f;
  o->top_p = 0.9f;
  o->seed = 1234;
  o->swap_bytes = (size_t)4 << 20;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    double x = 0;
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      usage(stdout);
      exit(0);
    }
    if (!strcmp(a, "--no-stream")) { o->stream = 0; continue; }
    if (!strcmp(a, "--dense")) { o->dense = 1; continue; }
    if (!v) {
      fprintf(stderr, "kvc_demo: %s needs a value (or is unknown)\n", a);
      return -1;
    }
    i++;
    int bad = 0;
    if (!strcmp(a, "--model")) o->model = v;
    else if (!strcmp(a, "--tokenizer")) o->tokenizer = v;
    else if (!strcmp(a, "--text")) o->text = v;
    else if (!strcmp(a, "--prompt")) o->prompt = v;
    else if (!strcmp(a, "--requests")) { bad = parse_num(v, 1, 4096, &x); o->requests = (int)x; }
    else if (!strcmp(a, "--max-new")) { bad = parse_num(v, 1, 1 << 20, &x); o->max_new = (int)x; }
    else if (!strcmp(a, "--ppl-windows")) { bad = parse_num(v, 0, 10000, &x); o->ppl_windows = (int)x; }
    else if (!strcmp(a, "--prefill-budget")) { bad = parse_num(v, 1, 1 << 20, &x); o->prefill_budget = (int)x; }
    else if (!strcmp(a, "--temperature")) { bad = parse_num(v, 0, 10, &x); o->temperature = (float)x; }
    else if (!strcmp(a, "--top-p")) { bad = parse_num(v, 1e-6, 1, &x); o->top_p = (float)x; }
    else if (!strcmp(a, "--seed")) { bad = parse_num(v, 0, 1e18, &x); o->seed = (uint64_t)x; }
    else if (!strcmp(a, "--pool-kib")) { bad = parse_num(v, 1, 1 << 30, &x); o->pool_bytes = (size_t)x << 10; o->pool_set = 1; }
    else if (!strcmp(a, "--swap-kib")) { bad = parse_num(v, 0, 1 << 30, &x); o->swap_bytes = (size_t)x << 10; }
    else if (!strcmp(a, "--backend")) {
      o->backend_set = 1;
      if (!strcmp(v, "cuda")) o->backend_cuda = 1;
      else if (strcmp(v, "cpu")) bad = 1;
    } else {
      fprintf(stderr, "kvc_demo: unknown option %s\n", a);
      usage(stderr);
      return -1;
    }
    if (bad) {
      fprintf(stderr, "kvc_demo: bad value '%s' for %s\n", v, a);
      return -1;
    }
  }
  return 0;
}

/* ---- sampling ---------------------------------------------------------------------------- */

static double rng_uniform(uint64_t *s) {
  *s ^= *s >> 12;
  *s ^= *s << 25;
  *s ^= *s >> 27;
  return (double)((*s * 0x2545F4914F6CDD1DULL) >> 11) * 0x1.0p-53;
}

typedef struct prob_idx {
  float p;
  int i;
} prob_idx_t;

static int by_prob_desc(const void *a, const void *b) {
  float pa = ((const prob_idx_t *)a)->p, pb = ((const prob_idx_t *)b)->p;
  return pa < pb ? 1 : pa > pb ? -1 : ((const prob_idx_t *)a)->i - ((const prob_idx_t *)b)->i;
}

/* Temperature + nucleus sampling; greedy at temperature 0. work: [vocab]. */
static int sample(const float *logits, int vocab, float temp, float top_p, uint64_t *rng, prob_idx_t *work) {
  int best = 0;
  for (int i = 1; i < vocab; i++)
    if (logits[i] > logits[best]) best = i;
  if (temp <= 0) return best;
  double sum = 0;
  for (int i = 0; i < vocab; i++) {
    work[i].p = (float)exp((logits[i] - logits[best]) / temp);
    work[i].i = i;
    sum += work[i].p;
  }
  qsort(work, (size_t)vocab, sizeof *work, by_prob_desc);
  double cum = 0;
  int n = 0;
  while (n < vocab && cum < top_p * sum) cum += work[n++].p;
  double r = rng_uniform(rng) * cum, acc = 0;
  for (int i = 0; i < n; i++) {
    acc += work[i].p;
    if (r < acc) return work[i].i;
  }
  return work[n - 1].i;
}

/* ---- the scheduler --------------------------------------------------------------------------- */

typedef struct demo {
  demo_opts_t o;
  kvc_runner_model_t m;
  kvc_runner_kv_t *kv;
  kvc_runner_ctx_t ctx;
  request_t *reqs;
  int n_reqs, n_done, admitted_counter;
  /* step arrays */
  kvc_seq_id_t *ids;
  int32_t *n_new, *pos0, *toks;
  request_t **batch;
  float *logits;
  prob_idx_t *work;
  /* figures */
  int64_t gen_tokens, fed_tokens, prompt_tokens, cached_tokens, swaps, recomputes, steps;
  int64_t peak_tokens;
  kvc_stats_t peak;     /* stats at the step with the most tokens stored */
  kvc_stats_t last;
  int hold;             /* after a preemption: bring nobody back until a request completes */
  int tty, width, lines_drawn;
} demo_t;

static int append_text(request_t *r, const char *s, int n) {
  if (r->text_len + (size_t)n + 1 > r->text_cap) {
    size_t cap = r->text_cap ? r->text_cap * 2 : 1024;
    while (cap < r->text_len + (size_t)n + 1) cap *= 2;
    char *t = realloc(r->text, cap);
    if (!t) return -1;
    r->text = t;
    r->text_cap = cap;
  }
  memcpy(r->text + r->text_len, s, (size_t)n);
  r->text_len += (size_t)n;
  r->text[r->text_len] = 0;
  return 0;
}

static kvc_status_t preempt(demo_t *d, request_t *r, kvc_runner_err_t *err) {
  kvc_status_t st = KVC_ERR_UNSUPPORTED;
  if (d->o.swap_bytes > 0) st = d->kv->ops->swap_out(d->kv, (kvc_seq_id_t)r->idx);
  d->hold = 1;
  if (st == KVC_OK) {
    r->state = SWAPPED;
    d->swaps++;
    return KVC_OK;
  }
  if (st != KVC_ERR_OUT_OF_MEMORY && st != KVC_ERR_UNSUPPORTED)
    return kvc_runner_fail(err, st, "swap_out of request %d: %s", r->idx, kvc_status_string(st));
  /* Drop: free now, recompute prompt + generated tokens when readmitted. */
  if ((st = d->kv->ops->seq_free(d->kv, (kvc_seq_id_t)r->idx)) != KVC_OK)
    return kvc_runner_fail(err, st, "seq_free of request %d: %s", r->idx, kvc_status_string(st));
  r->state = WAITING;
  d->recomputes++;
  return KVC_OK;
}

static request_t *latest_running(demo_t *d) {
  request_t *v = NULL;
  for (int i = 0; i < d->n_reqs; i++)
    if (d->reqs[i].state == RUNNING && (!v || d->reqs[i].admitted > v->admitted)) v = &d->reqs[i];
  return v;
}

/* Chooses this step's batch: *n_batch sequences in d->batch / ids / n_new / pos0 / toks (0 when
 * nothing can run). */
static kvc_status_t schedule(demo_t *d, int *n_batch, kvc_runner_err_t *err) {
  kvc_runner_kv_t *kv = d->kv;
  kvc_status_t st;
  int any_swapped = 0, running = 0;
  for (int i = 0; i < d->n_reqs; i++) running += d->reqs[i].state == RUNNING;
  /* Memory comes back when requests complete: bringing a preempted request back before that
     would only preempt another one (thrashing). With nothing running, there is room. */
  if (running == 0) d->hold = 0;
  /* 1. Swapped requests come back first, oldest preemption first (index order is close enough). */
  for (int i = 0; i < d->n_reqs; i++) {
    request_t *r = &d->reqs[i];
    if (r->state != SWAPPED) continue;
    if (d->hold) {
      any_swapped = 1;
      break;
    }
    st = kv->ops->swap_in(kv, (kvc_seq_id_t)r->idx);
    if (st == KVC_ERR_OUT_OF_MEMORY) {
      any_swapped = 1;
      break;
    }
    if (st != KVC_OK) return kvc_runner_fail(err, st, "swap_in of request %d: %s", r->idx, kvc_status_string(st));
    r->state = RUNNING;
  }
  /* 2. Room for every running sequence's next token, preempting the latest admitted if needed. */
  for (int i = 0; i < d->n_reqs; i++) {
    request_t *r = &d->reqs[i];
    if (r->state != RUNNING || r->pending != 1) continue;
    while ((st = kv->ops->seq_reserve(kv, (kvc_seq_id_t)r->idx, 1)) == KVC_ERR_OUT_OF_MEMORY) {
      request_t *victim = latest_running(d);
      if ((st = preempt(d, victim, err)) != KVC_OK) return st;
      if (victim == r) break;
    }
    if (r->state == RUNNING && st != KVC_OK)
      return kvc_runner_fail(err, st, "reserve for request %d: %s", r->idx, kvc_status_string(st));
  }
  /* 3. Admission while the pool and the prefill budget allow (not while some wait swapped out). */
  int budget = d->o.prefill_budget, admitted_now = 0;
  for (int i = 0; i < d->n_reqs && !any_swapped && !d->hold; i++) {
    request_t *r = &d->reqs[i];
    if (r->state != WAITING) continue;
    int n_cached = 0;
    st = kv->ops->seq_add(kv, (kvc_seq_id_t)r->idx, r->tokens, r->n_tokens, &n_cached);
    if (st == KVC_ERR_OUT_OF_MEMORY) break; /* max_seqs */
    if (st != KVC_OK) return kvc_runner_fail(err, st, "seq_add of request %d: %s", r->idx, kvc_status_string(st));
    int need = r->n_tokens - n_cached;
    if ((admitted_now && need > budget) ||
        (st = kv->ops->seq_reserve(kv, (kvc_seq_id_t)r->idx, need)) != KVC_OK) {
      kvc_status_t st2 = kv->ops->seq_free(kv, (kvc_seq_id_t)r->idx);
      if (st != KVC_OK && st != KVC_ERR_OUT_OF_MEMORY)
        return kvc_runner_fail(err, st, "reserve for request %d: %s", r->idx, kvc_status_string(st));
      if (st2 != KVC_OK) return kvc_runner_fail(err, st2, "seq_free: %s", kvc_status_string(st2));
      break; /* it waits; so do the ones behind it (FIFO) */
    }
    r->state = RUNNING;
    r->pos0 = n_cached;
    r->pending = need;
    r->admitted = ++d->admitted_counter;
    d->prompt_tokens += r->n_tokens;
    d->cached_tokens += n_cached;
    budget -= need;
    admitted_now++;
  }
  /* 4. The batch: every running request. */
  int n = 0, rows = 0;
  for (int i = 0; i < d->n_reqs; i++) {
    request_t *r = &d->reqs[i];
    if (r->state != RUNNING) continue;
    d->batch[n] = r;
    d->ids[n] = (kvc_seq_id_t)r->idx;
    d->n_new[n] = r->pending;
    d->pos0[n] = r->pos0;
    memcpy(d->toks + rows, r->tokens + r->pos0, (size_t)r->pending * sizeof *d->toks);
    rows += r->pending;
    n++;
  }
  *n_batch = n;
  return KVC_OK;
}

static void progress(demo_t *d, double t0, int final) {
  double dt = kvc_runner_now() - t0;
  int running = 0, waiting = 0, swapped = 0;
  for (int i = 0; i < d->n_reqs; i++) {
    running += d->reqs[i].state == RUNNING;
    waiting += d->reqs[i].state == WAITING;
    swapped += d->reqs[i].state == SWAPPED;
  }
  char line[512];
  double used = (double)(d->last.page_bytes + d->last.staging_bytes);
  snprintf(line, sizeof line, "step %4lld | run %2d wait %2d swap %2d done %2d/%d | %5lld tok %5.0f tok/s | "
           "KV %4.0f/%.0f KiB | preempt %lld", (long long)d->steps, running, waiting, swapped, d->n_done,
           d->n_reqs, (long long)d->gen_tokens, dt > 0 ? d->gen_tokens / dt : 0, used / 1024,
           (double)d->last.pool_bytes / 1024, (long long)(d->swaps + d->recomputes));
  if (!d->tty) {
    int due = d->steps % 50 == 0; /* every 50 steps, and at the end unless just printed */
    if (final ? !due : due) fprintf(stderr, "%s\n", line);
    return;
  }
  /* Redraw: two streamed completions (their last `width` characters) and the progress line. */
  if (d->lines_drawn) fprintf(stderr, "\033[%dF", d->lines_drawn);
  int shown = 0;
  for (int k = 0; k < 2 && k < d->n_reqs && d->o.stream; k++, shown++) {
    const request_t *r = &d->reqs[k];
    int w = d->width - 12;
    const char *t = r->text ? r->text : "";
    size_t len = r->text_len;
    const char *tail = len > (size_t)w ? t + len - w : t;
    fprintf(stderr, "\033[2K\033[36m[req %2d]\033[0m ", k);
    for (const char *c = tail; *c; c++) fputc(*c == '\n' ? ' ' : *c, stderr);
    fputc('\n', stderr);
  }
  fprintf(stderr, "\033[2K%.*s\n", d->width, line);
  d->lines_drawn = shown + 1;
  fflush(stderr);
}

static kvc_status_t run(demo_t *d, kvc_runner_err_t *err) {
  const kvc_runner_shape_t *s = &d->m.shape;
  double t0 = kvc_runner_now();
  kvc_status_t st;
  while (d->n_done < d->n_reqs) {
    int n = 0;
    if ((st = schedule(d, &n, err)) != KVC_OK) return st;
    if (n == 0)
      return kvc_runner_fail(err, KVC_ERR_OUT_OF_MEMORY, "nothing can run: the pool (%zu KiB) cannot "
                             "hold one request; raise --pool-kib", d->o.pool_bytes >> 10);
    kvc_runner_step_t step = {n, d->ids, d->n_new, d->pos0, d->toks, 0, 1, d->logits};
    if ((st = kvc_runner_forward(&d->ctx, d->kv, &step, err)) != KVC_OK) return st;
    d->steps++;
    for (int i = 0; i < n; i++) {
      request_t *r = d->batch[i];
      d->fed_tokens += r->pending;
      r->pos0 += r->pending;
      int tok = sample(d->logits + (size_t)i * s->vocab_size, s->vocab_size, d->o.temperature,
                       d->o.top_p, &r->rng, d->work);
      int stop = tok == d->m.vocab.eos || tok == d->m.vocab.bos;
      if (!stop) {
        char piece[64];
        int np = kvc_runner_decode(&d->m.vocab, r->tokens[r->n_tokens - 1], tok, piece, sizeof piece);
        if (r->n_tokens == r->cap || append_text(r, piece, np) != 0)
          return kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "out of memory");
        r->tokens[r->n_tokens++] = tok;
        r->n_gen++;
        d->gen_tokens++;
      }
      r->pending = 1;
      if (stop || r->n_gen >= d->o.max_new || r->n_tokens >= s->max_seq_len) {
        if ((st = d->kv->ops->seq_free(d->kv, (kvc_seq_id_t)r->idx)) != KVC_OK)
          return kvc_runner_fail(err, st, "seq_free: %s", kvc_status_string(st));
        r->state = DONE;
        d->n_done++;
        d->hold = 0;
      }
    }
    d->last.struct_size = sizeof d->last;
    if ((st = d->kv->ops->stats(d->kv, &d->last)) != KVC_OK)
      return kvc_runner_fail(err, st, "stats: %s", kvc_status_string(st));
    if (d->last.tokens_stored > d->peak_tokens) {
      d->peak_tokens = d->last.tokens_stored;
      d->peak = d->last;
    }
    progress(d, t0, 0);
  }
  progress(d, t0, 1);
  return KVC_OK;
}

/* ---- set-up, perplexity check, report ----------------------------------------------------- */

static kvc_status_t setup_requests(demo_t *d, kvc_runner_err_t *err) {
  const kvc_runner_shape_t *s = &d->m.shape;
  d->n_reqs = d->o.requests;
  d->reqs = calloc((size_t)d->n_reqs, sizeof *d->reqs);
  if (!d->reqs) return kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "out of memory");
  for (int i = 0; i < d->n_reqs; i++) {
    request_t *r = &d->reqs[i];
    r->idx = i;
    const char *shared = d->o.prompt ? d->o.prompt : SYSTEM_PROMPT;
    size_t plen = strlen(shared) + 32;
    char *prompt = malloc(plen);
    if (!prompt) return kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "out of memory");
    snprintf(prompt, plen, "%s %s %s", shared, NAMES[i % 16], STARTS[(i / 16) % 2]);
    r->cap = s->max_seq_len;
    r->tokens = malloc((size_t)r->cap * sizeof *r->tokens);
    if (!r->tokens) {
      free(prompt);
      return kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "out of memory");
    }
    int n = 0;
    kvc_status_t st = kvc_runner_encode(&d->m.vocab, prompt, 1, r->tokens, r->cap, &n, err);
    free(prompt);
    if (st == KVC_ERR_OUT_OF_HOST_MEMORY) return st;
    if (st != KVC_OK)
      return kvc_runner_fail(err, st, "the prompt needs %d tokens but the model's context is %d", n,
                             s->max_seq_len);
    if (n >= s->max_seq_len)
      return kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "the prompt needs %d tokens but the "
                             "model's context is %d", n, s->max_seq_len);
    r->n_prompt = r->n_tokens = n;
    r->rng = d->o.seed * 0x9E3779B97F4A7C15ULL + (uint64_t)i * 0xD1B54A32D192ED03ULL + 1;
    r->pending = n;
  }
  return KVC_OK;
}

static size_t fp16_bytes(const kvc_runner_shape_t *s, int64_t tokens) {
  return (size_t)tokens * (size_t)s->n_layers * 2u * (size_t)s->n_kv_heads * (size_t)s->head_dim * 2u;
}

static kvc_status_t ppl_slice(demo_t *d, const kvc_config_t *cfg, double *raw, double *lossy,
                              kvc_runner_err_t *err) {
  char path[4096];
  const char *text = d->o.text ? d->o.text : kvc_runner_shared_path("data/tinystories_val.txt", path, sizeof path);
  int W = d->o.ppl_windows;
  int32_t *stream = NULL;
  int n = 0;
  kvc_runner_ctx_t ctx;
  memset(&ctx, 0, sizeof ctx);
  kvc_status_t st = kvc_runner_text_stream(&d->m.vocab, text, W * 255, &stream, &n, err);
  if (st == KVC_OK) st = kvc_runner_ctx_init(&ctx, &d->m, W, err);
  for (int pass = 0; pass < 2 && st == KVC_OK; pass++) {
    /* fp32 on both sides, so the difference is the codec's alone. */
    kvc_config_t c = *cfg;
    c.backend = KVC_BACKEND_CPU;
    c.dtype = KVC_DTYPE_F32;
    c.pool_bytes = (size_t)64 << 20;
    c.swap_bytes = 0;
    c.prefix_caching = 0;
    if (pass == 0) {
      c.policy = KVC_POLICY_FIXED;
      c.codec = KVC_CODEC_RAW;
    }
    kvc_runner_kv_t *kv = NULL;
    kvc_runner_dense_opts_t dopts = {64, 0, 0, NULL, NULL};
    st = d->o.dense ? kvc_runner_kv_dense(&d->m.shape, &dopts, &kv, err)
                    : kvc_runner_kv_kvcomp(&d->m.shape, &c, &kv, err);
    if (st != KVC_OK) break;
    kvc_runner_ppl_opts_t po = {W, 256, KVC_RUNNER_FEED_DECODE, 0};
    kvc_runner_ppl_t p;
    st = kvc_runner_perplexity(&ctx, kv, stream, n, &po, &p, err);
    kvc_runner_kv_destroy(kv);
    if (st != KVC_OK) break;
    *(pass ? lossy : raw) = p.ppl;
    kvc_runner_ppl_free(&p);
  }
  kvc_runner_ctx_free(&ctx);
  free(stream);
  return st;
}

static void print_wrapped(const char *label, const char *text, int width) {
  printf("%s", label);
  int col = (int)strlen(label);
  for (const char *p = text; *p;) {
    const char *sp = p;
    while (*sp && *sp != ' ' && *sp != '\n') sp++;
    int wl = (int)(sp - p);
    if (col + wl > width && col > 8) {
      printf("\n        ");
      col = 8;
    }
    printf("%.*s", wl, p);
    col += wl;
    if (*sp == '\n') {
      printf("\n        ");
      col = 8;
      sp++;
    } else if (*sp == ' ') {
      putchar(' ');
      col++;
      sp++;
    }
    p = sp;
  }
  printf("\n");
}

static void demo_free(demo_t *d) {
  for (int i = 0; i < d->n_reqs && d->reqs; i++) {
    free(d->reqs[i].tokens);
    free(d->reqs[i].text);
  }
  free(d->reqs);
  kvc_runner_kv_destroy(d->kv);
  kvc_runner_ctx_free(&d->ctx);
  kvc_runner_model_free(&d->m);
  free(d->ids);
  free(d->n_new);
  free(d->pos0);
  free(d->toks);
  free(d->batch);
  free(d->logits);
  free(d->work);
}

int main(int argc, char **argv) {
  demo_t d;
  memset(&d, 0, sizeof d);
  if (parse_args(argc, argv, &d.o) != 0) return 2;
  kvc_runner_err_t err = {{0}};
  char mpath[4096];
  const char *model = d.o.model ? d.o.model : kvc_runner_shared_path("models/stories260K.gguf", mpath, sizeof mpath);
  kvc_status_t st = kvc_runner_model_load(&d.m, model, d.o.tokenizer, &err);
  if (st == KVC_OK) st = setup_requests(&d, &err);
  const kvc_runner_shape_t *s = &d.m.shape;
  int cap_tokens = 0;
  if (st == KVC_OK) {
    int64_t longest = 0, total = 0;
    for (int i = 0; i < d.n_reqs; i++) {
      int64_t need = d.reqs[i].n_prompt + d.o.max_new;
      total += need < s->max_seq_len ? need : s->max_seq_len;
      if (need > longest) longest = need;
    }
    /* A step feeds at most every request's prompt (admission) plus one token each. */
    cap_tokens = d.o.prefill_budget + (int)longest + d.n_reqs;
    if (!d.o.pool_set) {
      /* A seventh of what all requests would hold at once in fp16: with pages about a quarter of
         fp16 and a full staging tail per running sequence, that runs about half of them at
         once, so admission waits and preemption happen. */
      d.o.pool_bytes = fp16_bytes(s, total) / 7;
      /* ... but room for a few of the longest requests at their worst case (raw blocks). */
      size_t floor_bytes = 3 * fp16_bytes(s, (longest + 63) / 64 * 64);
      if (d.o.pool_bytes < floor_bytes) d.o.pool_bytes = floor_bytes;
    }
    d.ids = malloc((size_t)d.n_reqs * sizeof *d.ids);
    d.n_new = malloc((size_t)d.n_reqs * sizeof *d.n_new);
    d.pos0 = malloc((size_t)d.n_reqs * sizeof *d.pos0);
    d.batch = malloc((size_t)d.n_reqs * sizeof *d.batch);
    d.toks = malloc((size_t)cap_tokens * sizeof *d.toks);
    d.logits = malloc((size_t)d.n_reqs * s->vocab_size * sizeof *d.logits);
    d.work = malloc((size_t)s->vocab_size * sizeof *d.work);
    if (!d.ids || !d.n_new || !d.pos0 || !d.batch || !d.toks || !d.logits || !d.work)
      st = kvc_runner_fail(&err, KVC_ERR_OUT_OF_HOST_MEMORY, "out of memory");
  }
  if (st == KVC_OK) st = kvc_runner_ctx_init(&d.ctx, &d.m, cap_tokens, &err);
  kvc_config_t cfg = KVC_CONFIG_INIT; /* the library's default codec and error bounds */
  cfg.pool_bytes = d.o.pool_bytes;
  cfg.swap_bytes = d.o.swap_bytes;
  cfg.max_seqs = d.n_reqs;
  cfg.max_batch_tokens = cap_tokens;
  if (st == KVC_OK) {
    if (d.o.dense) {
      int64_t cap = (int64_t)(d.o.pool_bytes / (fp16_bytes(s, 1)));
      kvc_runner_dense_opts_t dopts = {64, d.n_reqs, cap, NULL, NULL};
      st = kvc_runner_kv_dense(s, &dopts, &d.kv, &err);
    } else {
      int want_cuda = d.o.backend_set ? d.o.backend_cuda : KVC_HAVE_CUDA;
      if (want_cuda) {
        cfg.backend = KVC_BACKEND_CUDA;
        st = kvc_runner_kv_kvcomp(s, &cfg, &d.kv, &err);
        if (st != KVC_OK && !d.o.backend_set) {
          fprintf(stderr, "kvc_demo: no CUDA backend here (%s); using the CPU backend\n", err.msg);
          st = KVC_OK;
        }
      }
      if (st == KVC_OK && !d.kv) {
        cfg.backend = KVC_BACKEND_CPU;
        st = kvc_runner_kv_kvcomp(s, &cfg, &d.kv, &err);
      }
    }
  }
  if (st != KVC_OK) {
    fprintf(stderr, "kvc_demo: %s\n", err.msg);
    demo_free(&d);
    return 1;
  }
  d.tty = isatty(STDERR_FILENO);
  d.width = 100;
  struct winsize ws;
  if (d.tty && ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col >= 40) d.width = ws.ws_col - 1;
  printf("kvc_demo: %s (%s, dim %d, %d layers, %d/%d heads, head_dim %d) on %s; %d requests sharing a "
         "%d-token prompt, up to %d new tokens each, temperature %.2f, top-p %.2f, seed %llu\n"
         "          pool %zu KiB, swap %zu KiB, codec %s, %s bounds k %g v %g\n",
         model, d.m.format, s->dim, s->n_layers, s->n_heads, s->n_kv_heads, s->head_dim, d.kv->name,
         d.n_reqs, d.reqs[0].n_prompt, d.o.max_new, (double)d.o.temperature, (double)d.o.top_p,
         (unsigned long long)d.o.seed, d.o.pool_bytes >> 10, d.o.swap_bytes >> 10,
         cfg.policy != KVC_POLICY_FIXED ? "by policy" : cfg.codec == KVC_CODEC_HUFFMAN ? "huffman"
         : cfg.codec == KVC_CODEC_BITPACK ? "bitpack" : "raw",
         cfg.bound_mode == KVC_BOUND_RELATIVE ? "relative" : "absolute", (double)cfg.k_bound,
         (double)cfg.v_bound);
  fflush(stdout);
  double t0 = kvc_runner_now();
  st = run(&d, &err);
  double secs = kvc_runner_now() - t0;
  if (st != KVC_OK) {
    fprintf(stderr, "kvc_demo: %s\n", err.msg);
    demo_free(&d);
    return 1;
  }
  double ppl_raw = NAN, ppl = NAN;
  if (d.o.ppl_windows > 0 && (st = ppl_slice(&d, &cfg, &ppl_raw, &ppl, &err)) != KVC_OK) {
    fprintf(stderr, "kvc_demo: perplexity check: %s\n", err.msg);
    demo_free(&d);
    return 1;
  }
  if (d.o.stream) {
    printf("\n");
    for (int k = 0; k < 2 && k < d.n_reqs; k++) {
      char label[32];
      snprintf(label, sizeof label, "[req %d] ", k);
      print_wrapped(label, d.reqs[k].text ? d.reqs[k].text : "", 100);
    }
  }
  const kvc_stats_t *pk = &d.peak;
  size_t used = pk->page_bytes + pk->staging_bytes, fp16 = fp16_bytes(s, pk->tokens_stored);
  double ratio = used ? (double)fp16 / (double)used : 0;
  /* Bits per value of the compressed pages alone: their fp16 bytes over the compression ratio. */
  double page_ratio = pk->compression_ratio > 0 ? pk->compression_ratio * (cfg.dtype == KVC_DTYPE_F32 ? 0.5 : 1.0) : 0;
  double hit_rate = d.last.prefix_queries ? (double)d.last.prefix_hits / (double)d.last.prefix_queries : 0;
  double tok_hit = d.prompt_tokens ? (double)d.cached_tokens / (double)d.prompt_tokens : 0;
  printf("\n| kvc_demo (%s) | |\n|---|---|\n", d.kv->name);
  printf("| requests | %d done, %lld tokens generated, %lld tokens fed in %lld steps |\n", d.n_done,
         (long long)d.gen_tokens, (long long)d.fed_tokens, (long long)d.steps);
  printf("| throughput | %.0f generated tokens/s, %.0f tokens/s fed (%.1f s) |\n", d.gen_tokens / secs,
         d.fed_tokens / secs, secs);
  printf("| KV bytes at peak | %.1f KiB (pages %.1f KiB + tails %.1f KiB) for %lld tokens; fp16 "
         "equivalent %.1f KiB |\n", used / 1024.0, pk->page_bytes / 1024.0, pk->staging_bytes / 1024.0,
         (long long)pk->tokens_stored, fp16 / 1024.0);
  printf("| compression ratio | %.2fx vs fp16 overall; compressed pages alone %.2fx (%.2f bits/value) |\n",
         ratio, page_ratio, page_ratio > 0 ? 16.0 / page_ratio : 0.0);
  printf("| prefix-cache hit rate | %.1f%% of blocks looked up (%lld/%lld); %.1f%% of prompt tokens "
         "served from the cache |\n", 100.0 * hit_rate, (long long)d.last.prefix_hits,
         (long long)d.last.prefix_queries, 100.0 * tok_hit);
  printf("| preemptions | %lld (%lld swapped out and back, %lld dropped and recomputed) |\n",
         (long long)(d.swaps + d.recomputes), (long long)d.swaps, (long long)d.recomputes);
  if (d.o.ppl_windows > 0)
    printf("| perplexity, %d windows | exact %.4f, with the default codec %.4f (%+.3f%%) |\n",
           d.o.ppl_windows, ppl_raw, ppl, 100.0 * (ppl / ppl_raw - 1.0));
  printf("{\"bench\":\"demo\",\"backend\":\"%s\",\"requests\":%d,\"generated_tokens\":%lld,"
         "\"seconds\":%.3f,\"tokens_per_s\":%.1f,\"kv_bytes_peak\":%zu,\"fp16_bytes_peak\":%zu,"
         "\"compression_ratio\":%.4f,\"page_compression_ratio\":%.4f,\"prefix_hit_rate\":%.4f,"
         "\"preemptions\":%lld,\"swaps\":%lld,\"recomputes\":%lld,\"ppl_exact\":%.6f,\"ppl\":%.6f,"
         "\"ppl_change\":%.6f}\n", d.kv->name, d.n_done, (long long)d.gen_tokens, secs,
         d.gen_tokens / secs, used, fp16, ratio, page_ratio, hit_rate,
         (long long)(d.swaps + d.recomputes), (long long)d.swaps, (long long)d.recomputes,
         isnan(ppl_raw) ? 0.0 : ppl_raw, isnan(ppl) ? 0.0 : ppl,
         isnan(ppl) ? 0.0 : ppl / ppl_raw - 1.0);
  demo_free(&d);
  return 0;
}
