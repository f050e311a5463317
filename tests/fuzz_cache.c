/*
 * libFuzzer target for the cache's public API on the CPU backend, or, built with KVC_FUZZ_CUDA
 * (gpu_fuzz_cache_replay), on the CUDA backend. The input is a configuration (three bytes: block
 * size, codec policy, prefix caching, swap, head_dim, GQA group, pool size, dtype, bounds,
 * max_seqs, cascade, and tensor-parallel ranks whose answers the input gives, as fuzz_blocks has
 * them) and then a sequence of calls, each an opcode byte and its argument bytes (missing bytes
 * read as 0), on sequence ids 1..7: add, reserve, fork, free, swap-out, swap-in, steps (plan,
 * then store and attend of some layers), prefills (a prompt's rest in one step), stores and
 * attends out of order, export and import, synchronize; and host allocation failures injected
 * into the next call (through the cache's allocator: kvc_cache_test.h). Tokens come from a
 * three-token alphabet, and a prompt may start with another sequence's tokens, so that the
 * prefix cache hits.
 *
 * A shadow of every sequence (its tokens, the length the cache holds, swapped or not, whether the
 * open step lists it) predicts each call's status: exactly where the header is exact (a call on
 * an unknown id, a batch that is valid or not), as a set where the pool or the other ranks
 * decide; a failed allocation may surface only where the header lists KVC_ERR_OUT_OF_HOST_MEMORY.
 * After every call kvc_cache_validate passes, and a call that fails leaves everything a caller
 * can observe as it was (kvc_test_snap), except where kvcomp.h says otherwise: a swap-out refused
 * for lack of swap space or by another rank has compressed the last step's blocks first (only the
 * sequences are compared), and a failed exchange leaves the cache unusable (the input ends
 * there). Every attention output row is within the tolerance of a float64 reference over the toy
 * model's K/V (kvc_test_toy.h, absolute bounds), which holds only if prefix hits, forks, swaps
 * and imports give each sequence exactly the blocks of its own tokens. Any violation aborts.
 * On the CUDA backend head_dim is 64, 128 or 256 and the dtype fp16 or bf16; K, V, Q, outputs and
 * sequence images go through device memory, and the tolerance takes the kernels' rounding to the
 * dtype (kern_rel).
 * KVC_FUZZ_TRACE=1 prints every call (to read a saved crash: tests/fuzz_replay.c runs one without
 * libFuzzer).
 */
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvc_fuzz_input.h"
#include "kvc_test_snap.h"
#include "kvc_test_toy.h"
#include "kvc_test_util.h"
#include "kvcomp.h"
#include "scheduler_hooks/kvc_cache_test.h"

#ifdef KVC_FUZZ_CUDA
#include <cuda_runtime_api.h>
#define FUZZ_BACKEND KVC_BACKEND_CUDA
#define FUZZ_MAX_HD 256
#else
#define FUZZ_BACKEND KVC_BACKEND_CPU
#define FUZZ_MAX_HD 32
#endif

enum {
  IDS = 7, /* sequence ids 1..IDS (kvc_test_snap records 1..8) */
  LAYERS = 2,
  KV_HEADS = 2,
  MAX_HD = FUZZ_MAX_HD,
  MAX_QH = 8,
  ROW = KV_HEADS * MAX_HD, /* the shadow's K/V row stride */
  MAX_LEN = 96,            /* max_seq_len */
  MAX_BATCH = 48,          /* max_batch_tokens */
  MAX_MEMBERS = 4,         /* sequences listed in one step's batch */
  ALPHABET = 3,
};

typedef struct seq {
  int live, swapped;
  uint64_t salt;
  int ntok; /* tokens known: the prompt, then each step's */
  int len;  /* tokens the cache holds (kvc_plan advances it) */
  int32_t tok[MAX_LEN];
  uint64_t hash[MAX_LEN];
  float kv[LAYERS][2][MAX_LEN][ROW]; /* the toy model's K/V of positions < len */
} seq_t;

typedef struct world {
  kvc_cache_t *c;
  kvc_config_t cfg;
  kvc_test_toy_t toy;
  size_t esize; /* bytes per element of the cache's dtype */
  seq_t seq[IDS + 1];
  /* The last plan's step. */
  int attendable;   /* kvc_attend may run (the plan stands: see close_finished_plan) */
  int layers_done;  /* layers stored */
  int n_members;
  int member[MAX_MEMBERS], first[MAX_MEMBERS], n_new[MAX_MEMBERS];
  int rows;
  float q[LAYERS][MAX_BATCH * MAX_QH * MAX_HD]; /* each stored layer's queries */
  uint64_t q_seed;
  void *tens; /* k, v, q, out staging in the cache's dtype */
  void *dev;  /* the same on the device (CUDA backend; else NULL) */
  /* Host allocation failure for the next call: after fail_after successful allocations (-1:
   * none armed); `injected` while that call's status is checked. */
  int64_t fail_after;
  int injected;
  int tp;                /* tp_allreduce_max: other ranks as the input says (other_ranks) */
  int dead;              /* an exchange failed: the cache is unusable */
  kvc_fuzz_input_t *in;  /* where the other ranks' answers come from */
  int64_t cached_blocks; /* in the last snapshot: the most that ranks in step can evict */
  int import_lengths;    /* the next exchange is an import's (length, -length) */
  int trace;  /* KVC_FUZZ_TRACE set: every call and its status to stderr */
} world_t;

/* What the inputs reached, over all of them (kvc_fuzz_report): to see that a run of random inputs
 * gets past the configuration into hits, forks, swaps and checked attention. */
static struct {
  long caches, steps, prefix_hits, forks, swaps_in, imports, rows;
  double worst; /* the largest error / tolerance of any attention output */
} reached;

void kvc_fuzz_report(void) {
  printf("fuzz_cache reached: %ld caches, %ld steps, %ld prefix hits, %ld forks, %ld swap-ins, "
         "%ld imports, %ld attention rows checked, worst %.3f of tolerance\n", reached.caches,
         reached.steps, reached.prefix_hits, reached.forks, reached.swaps_in, reached.imports,
         reached.rows, reached.worst);
}

static void violation(const char *what, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void violation(const char *what, ...) {
  va_list ap;
  va_start(ap, what);
  fprintf(stderr, "fuzz_cache: ");
  vfprintf(stderr, what, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  abort();
}

/* With KVC_FUZZ_TRACE set, a line per call with its arguments (to read a saved crash). */
static void trace(const world_t *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void trace(const world_t *w, const char *fmt, ...) {
  if (!w->trace) return;
  va_list ap;
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
}

#define BIT(s) (1u << (s))
/* Markers in a call's allowed statuses, which check() resolves. HOST_OOM: the header lists
 * KVC_ERR_OUT_OF_HOST_MEMORY, allowed where an allocation failure was injected. AGREES: a hook
 * that agrees with the other tensor-parallel ranks; where this rank would proceed, they may
 * refuse (out of pool or host memory) or the exchange may fail (KVC_ERR_NCCL). */
#define HOST_OOM (1u << 31)
#define AGREES (1u << 30)

/* CALL(w, call): the library call, with the armed allocation failure (if any) in force. */
static void arm(world_t *w) {
  if (w->fail_after >= 0) kvc_host_alloc_fail_after(kvc__cache_host_alloc(w->c), w->fail_after);
}
static kvc_status_t disarm(world_t *w, kvc_status_t st) {
  if (w->fail_after >= 0) {
    kvc_host_alloc_fail_after(kvc__cache_host_alloc(w->c), -1);
    w->fail_after = -1;
    w->injected = 1;
  }
  return st;
}
#define CALL(w, call) (arm(w), disarm((w), (call)))

static int step_open(const world_t *w) { return w->attendable && w->layers_done < LAYERS; }

static int in_step(const world_t *w, int id) {
  if (!step_open(w)) return 0;
  for (int i = 0; i < w->n_members; i++)
    if (w->member[i] == id) return 1;
  return 0;
}

static int live_count(const world_t *w) {
  int n = 0;
  for (int i = 1; i <= IDS; i++) n += w->seq[i].live;
  return n;
}

static void snap(world_t *w, kvc_test_snap_t *s) {
  kvc_status_t st = kvc_test_snap_take(w->c, s);
  if (st != KVC_OK) violation("snapshot: %s", kvc_status_string(st));
  w->cached_blocks = s->stats.cached_blocks;
}

/* The other ranks, in step with this one: they ask to evict no more cached blocks than it holds
 * (a rank out of step is the failed exchange, byte 255). */
static int other_ranks(void *user, int64_t *v, int count) {
  world_t *w = user;
  if (w->import_lengths) {
    /* Their images: of the same length, or (odd byte) of a longer one. */
    w->import_lengths = 0;
    const uint8_t x = kvc_fuzz_next(w->in);
    if (x == 255) return -1;
    v[0] += x & 1;
    return 0;
  }
  const int64_t own = count > 1 ? v[1] : 0;
  const int r = kvc_fuzz_other_ranks(w->in, v, count);
  const int64_t most = own > w->cached_blocks ? own : w->cached_blocks;
  if (count > 1 && v[1] > most) v[1] = most;
  return r;
}

/* Every call's epilogue: the status is one of `allowed`, the cache validates, a failure changed
 * nothing, and a live sequence's info agrees with the shadow. */
static void check(world_t *w, const char *what, kvc_status_t st, unsigned allowed,
                  const kvc_test_snap_t *before, int infos_only) {
  trace(w, "  [%s: %s%s]\n", what, kvc_status_string(st),
        w->injected ? ", allocation failing" : "");
  if (w->injected && (allowed & HOST_OOM)) allowed |= BIT(KVC_ERR_OUT_OF_HOST_MEMORY);
  if (w->tp && (allowed & AGREES) && (allowed & BIT(KVC_OK)))
    allowed |= BIT(KVC_ERR_OUT_OF_MEMORY) | BIT(KVC_ERR_OUT_OF_HOST_MEMORY) | BIT(KVC_ERR_NCCL);
  w->injected = 0;
  if (!(allowed & BIT(st))) violation("%s returned %s", what, kvc_status_string(st));
  if (st == KVC_ERR_NCCL) {
    w->dead = 1; /* unusable from now on (kvcomp.h): the input ends here */
    return;
  }
  kvc_test_snap_t after;
  snap(w, &after);
  if (st != KVC_OK) {
    const char *changed = kvc_test_snap_diff(before, &after, infos_only);
    if (changed) violation("%s failed with %s and changed the %s", what, kvc_status_string(st),
                           changed);
  }
  for (int id = 1; id <= IDS; id++) {
    const seq_t *s = &w->seq[id];
    kvc_status_t is = after.info_status[id - 1];
    if (is != (s->live ? KVC_OK : KVC_ERR_NOT_FOUND))
      violation("after %s: sequence %d info %s", what, id, kvc_status_string(is));
    const kvc_seq_info_t *info = &after.info[id - 1];
    if (s->live && (info->length != s->len ||
                    info->state != (s->swapped ? KVC_SEQ_SWAPPED : KVC_SEQ_RUNNING)))
      violation("after %s: sequence %d has length %d state %d, expected %d %d", what, id,
                info->length, (int)info->state, s->len, s->swapped);
  }
}

static void set_hashes(seq_t *s, int from) {
  for (int p = from; p < s->ntok; p++)
    s->hash[p] = kvc_test_toy_hash(p ? s->hash[p - 1] : KVC_TEST_TOY_SEED ^ s->salt, s->tok[p]);
}

static void put(const world_t *w, void *dst, size_t i, float x) {
  if (w->cfg.dtype == KVC_DTYPE_F32)
    ((float *)dst)[i] = x;
  else if (w->cfg.dtype == KVC_DTYPE_BF16)
    ((uint16_t *)dst)[i] = kvc_test_f32_to_bf16(x);
  else
    ((uint16_t *)dst)[i] = kvc_test_f32_to_f16(x);
}

static float get(const world_t *w, const void *src, size_t i) {
  if (w->cfg.dtype == KVC_DTYPE_F32) return ((const float *)src)[i];
  const uint16_t h = ((const uint16_t *)src)[i];
  return w->cfg.dtype == KVC_DTYPE_BF16 ? kvc_test_bf16_to_f32(h) : kvc_test_f16_to_f32(h);
}

/* x as the cache's dtype holds it. */
static float in_dtype(const world_t *w, float x) {
  float h; /* room for any dtype's element */
  put(w, &h, 0, x);
  return get(w, &h, 0);
}

/* The toy model's K/V of positions [from, to), as the cache's dtype holds them (exact in fp16). */
static void fill_kv(const world_t *w, seq_t *s, int from, int to) {
  for (int p = from; p < to; p++)
    for (int l = 0; l < LAYERS; l++) {
      kvc_test_toy_kv(&w->toy, s->hash[p], l, s->kv[l][0][p], s->kv[l][1][p]);
      for (int t = 0; t < 2; t++)
        for (int e = 0; e < KV_HEADS * w->cfg.head_dim; e++)
          s->kv[l][t][p][e] = in_dtype(w, s->kv[l][t][p][e]);
    }
}

/* ---- per-request hooks ---------------------------------------------------------------------- */

static void op_add(world_t *w, kvc_fuzz_input_t *in) {
  const int id = 1 + kvc_fuzz_next(in) % IDS, n = kvc_fuzz_next(in) % (MAX_LEN + 4);
  const uint8_t b = kvc_fuzz_next(in);
  const uint64_t salt = b & 1;
  /* A prompt that starts with the tokens of another sequence, live or freed (whose blocks the
   * prefix cache may still hold), if the input asks: random tokens alone hit far too seldom. */
  const seq_t *from = b & 2 ? &w->seq[1 + (b >> 2) % IDS] : NULL;
  const int copied = from ? (from->ntok < n ? from->ntok : n) : 0;
  int32_t tok[MAX_LEN + 4];
  for (int i = 0; i < n; i++) tok[i] = i < copied ? from->tok[i] : kvc_fuzz_next(in) % ALPHABET;
  unsigned allowed;
  if (w->seq[id].live || n > MAX_LEN)
    allowed = BIT(KVC_ERR_INVALID_ARGUMENT);
  else
    allowed = live_count(w) >= w->cfg.max_seqs ? BIT(KVC_ERR_OUT_OF_MEMORY) : BIT(KVC_OK);
  trace(w, "add %d, %d tokens (%d of %d), salt %d", id, n, copied,
        from ? (int)(from - w->seq) : 0, (int)salt);
  kvc_test_snap_t before;
  snap(w, &before);
  int cached = -1;
  kvc_status_t st = CALL(w, kvc_seq_add(w->c, (kvc_seq_id_t)id, n ? tok : NULL, n, salt, &cached));
  trace(w, ": %d cached", cached);
  if (st == KVC_OK) {
    reached.prefix_hits += cached > 0;
    if (cached < 0 || cached % w->cfg.block_tokens || (n ? cached >= n : cached != 0) ||
        (!w->cfg.prefix_caching && cached))
      violation("add of %d tokens found %d cached", n, cached);
    seq_t *s = &w->seq[id];
    s->live = 1;
    s->swapped = 0;
    s->salt = salt;
    s->ntok = n;
    memcpy(s->tok, tok, (size_t)n * sizeof(int32_t));
    set_hashes(s, 0);
    s->len = cached;
    fill_kv(w, s, 0, cached);
  }
  check(w, "kvc_seq_add", st, allowed | HOST_OOM | AGREES, &before, 0);
}

static void reserve(world_t *w, int id, int n_new, int n_la) {
  const seq_t *s = &w->seq[id];
  unsigned allowed = 0;
  if (n_new < 0 || n_la < 0 || (s->live && s->len + n_new + n_la > MAX_LEN))
    allowed |= BIT(KVC_ERR_INVALID_ARGUMENT);
  if (!s->live) allowed |= BIT(KVC_ERR_NOT_FOUND);
  if (s->live && (s->swapped || in_step(w, id))) allowed |= BIT(KVC_ERR_INVALID_STATE);
  if (!allowed) allowed = BIT(KVC_OK) | BIT(KVC_ERR_OUT_OF_MEMORY);
  kvc_test_snap_t before;
  snap(w, &before);
  trace(w, "reserve %d, %d + %d", id, n_new, n_la);
  kvc_status_t st = CALL(w, kvc_seq_reserve(w->c, (kvc_seq_id_t)id, n_new, n_la));
  check(w, "kvc_seq_reserve", st, allowed | HOST_OOM | AGREES, &before, 0);
  if (st == KVC_OK) {
    kvc_seq_info_t info;
    if (kvc_seq_info(w->c, (kvc_seq_id_t)id, &info) != KVC_OK || info.reserved < s->len + n_new)
      violation("reserve of %d tokens left %d reserved at length %d", n_new, info.reserved, s->len);
  }
}

static void op_reserve(world_t *w, kvc_fuzz_input_t *in) {
  const int id = 1 + kvc_fuzz_next(in) % IDS, n_new = (int)kvc_fuzz_next(in) % 40 - 2;
  const int n_la = kvc_fuzz_next(in) % 4;
  reserve(w, id, n_new, n_la);
}

static void op_fork(world_t *w, kvc_fuzz_input_t *in) {
  const int parent = 1 + kvc_fuzz_next(in) % IDS, child = 1 + kvc_fuzz_next(in) % IDS;
  const seq_t *p = &w->seq[parent];
  unsigned allowed = 0;
  if (!p->live) allowed |= BIT(KVC_ERR_NOT_FOUND);
  if (w->seq[child].live) allowed |= BIT(KVC_ERR_INVALID_ARGUMENT);
  if (p->live && (p->swapped || in_step(w, parent))) allowed |= BIT(KVC_ERR_INVALID_STATE);
  if (!allowed) allowed = BIT(KVC_OK) | BIT(KVC_ERR_OUT_OF_MEMORY);
  kvc_test_snap_t before;
  snap(w, &before);
  trace(w, "fork %d -> %d", parent, child);
  kvc_status_t st = CALL(w, kvc_seq_fork(w->c, (kvc_seq_id_t)parent, (kvc_seq_id_t)child));
  if (st == KVC_OK) {
    w->seq[child] = *p;
    reached.forks++;
  }
  check(w, "kvc_seq_fork", st, allowed | HOST_OOM | AGREES, &before, 0);
}

static void op_free(world_t *w, kvc_fuzz_input_t *in) {
  const int id = 1 + kvc_fuzz_next(in) % IDS;
  seq_t *s = &w->seq[id];
  unsigned allowed = !s->live        ? BIT(KVC_ERR_NOT_FOUND)
                     : in_step(w, id) ? BIT(KVC_ERR_INVALID_STATE)
                                      : BIT(KVC_OK);
  kvc_test_snap_t before;
  snap(w, &before);
  trace(w, "free %d", id);
  kvc_status_t st = CALL(w, kvc_seq_free(w->c, (kvc_seq_id_t)id));
  if (st == KVC_OK) {
    s->live = 0;
    if (!step_open(w)) w->attendable = 0;
  }
  check(w, "kvc_seq_free", st, allowed, &before, 0);
}

static void op_swap(world_t *w, kvc_fuzz_input_t *in, int out) {
  const int id = 1 + kvc_fuzz_next(in) % IDS;
  seq_t *s = &w->seq[id];
  unsigned allowed = 0;
  if (w->cfg.swap_bytes == 0) allowed |= BIT(KVC_ERR_UNSUPPORTED);
  else if (!s->live) allowed |= BIT(KVC_ERR_NOT_FOUND);
  else if (s->swapped == out || (out && in_step(w, id))) allowed |= BIT(KVC_ERR_INVALID_STATE);
  else allowed = BIT(KVC_OK) | BIT(KVC_ERR_OUT_OF_MEMORY);
  kvc_test_snap_t before;
  snap(w, &before);
  trace(w, "swap %s %d", out ? "out" : "in", id);
  kvc_status_t st = CALL(w, out ? kvc_seq_swap_out(w->c, (kvc_seq_id_t)id, NULL)
                                : kvc_seq_swap_in(w->c, (kvc_seq_id_t)id, NULL));
  if (st == KVC_OK) {
    s->swapped = out;
    reached.swaps_in += !out;
    if (out && !step_open(w)) w->attendable = 0;
  }
  /* A swap-out that gets past its argument checks compresses the last step's blocks first. */
  check(w, out ? "kvc_seq_swap_out" : "kvc_seq_swap_in", st, allowed | AGREES, &before,
        out && (st == KVC_ERR_OUT_OF_MEMORY || st == KVC_ERR_OUT_OF_HOST_MEMORY));
}

/* ---- steps ---------------------------------------------------------------------------------- */

#ifdef KVC_FUZZ_CUDA
/* The device copy of a staging address (the same offset in w->dev as in w->tens). */
static uint8_t *dev_of(const world_t *w, const void *host) {
  return (uint8_t *)w->dev + ((const uint8_t *)host - (const uint8_t *)w->tens);
}
#endif

/* The backend's address of staging bytes [host, host + bytes): the host bytes themselves on the
 * CPU backend; on the CUDA backend their copy on the device (uploaded when `upload`). */
static void *backend_ptr(const world_t *w, void *host, size_t bytes, int upload) {
#ifdef KVC_FUZZ_CUDA
  uint8_t *dev = dev_of(w, host);
  if (upload && cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice) != cudaSuccess)
    violation("cudaMemcpy to the device failed");
  return dev;
#else
  (void)w, (void)bytes, (void)upload;
  return host;
#endif
}

/* Brings staging bytes [host, host + bytes) back from the backend (CUDA: from the device). */
static void download(const world_t *w, void *host, size_t bytes) {
#ifdef KVC_FUZZ_CUDA
  if (cudaMemcpy(host, dev_of(w, host), bytes, cudaMemcpyDeviceToHost) != cudaSuccess)
    violation("cudaMemcpy from the device failed");
#else
  (void)w, (void)host, (void)bytes;
#endif
}

/* Attention of `layer` for the step's rows, with that layer's queries, against the reference. */
static void attend_and_check(world_t *w, int layer) {
  const int hd = w->cfg.head_dim, qh = w->cfg.num_q_heads, qrow = qh * hd;
  uint8_t *q = (uint8_t *)w->tens + 2 * (size_t)MAX_BATCH * ROW * w->esize;
  uint8_t *out = q + (size_t)MAX_BATCH * MAX_QH * MAX_HD * w->esize;
  for (size_t e = 0; e < (size_t)w->rows * qrow; e++) {
    put(w, q, e, w->q[layer][e]);
    put(w, out, e, NAN);
  }
  const size_t bytes = (size_t)w->rows * qrow * w->esize;
  void *bq = backend_ptr(w, q, bytes, 1), *bout = backend_ptr(w, out, bytes, 1);
  const float scale = 1.0f / sqrtf((float)hd);
  trace(w, "attend layer %d\n", layer);
  kvc_test_snap_t before;
  snap(w, &before);
  kvc_status_t st = CALL(w, kvc_attend(w->c, layer, bq, bout, scale, NULL));
  if (w->injected && st != KVC_OK) {
    check(w, "kvc_attend", st, HOST_OOM, &before, 0);
    st = kvc_attend(w->c, layer, bq, bout, scale, NULL);
  }
  w->injected = 0;
  if (st != KVC_OK) violation("kvc_attend of layer %d returned %s", layer, kvc_status_string(st));
  download(w, out, bytes);
  float got[MAX_QH * MAX_HD];
  char msg[256];
  for (int i = 0, row = 0; i < w->n_members; i++) {
    const seq_t *s = &w->seq[w->member[i]];
    for (int p = w->first[i]; p < w->first[i] + w->n_new[i]; p++, row++) {
      for (int e = 0; e < qrow; e++) got[e] = get(w, out, (size_t)row * qrow + e);
      double r = kvc_test_toy_check(&w->toy, &s->kv[layer][0][0][0], &s->kv[layer][1][0][0], ROW,
                                    p + 1, w->q[layer] + (size_t)row * qrow, got, scale, msg,
                                    sizeof(msg));
      reached.rows++;
      if (r > reached.worst) reached.worst = r;
      if (r > 1) violation("sequence %d layer %d position %d: %s", w->member[i], layer, p, msg);
    }
  }
}

/* Stores the open step's next layer from the shadow, then attends it. */
static void store_next(world_t *w) {
  const int layer = w->layers_done, hd = w->cfg.head_dim;
  uint8_t *k = w->tens, *v = k + (size_t)MAX_BATCH * ROW * w->esize;
  for (int i = 0, row = 0; i < w->n_members; i++) {
    const seq_t *s = &w->seq[w->member[i]];
    for (int p = w->first[i]; p < w->first[i] + w->n_new[i]; p++, row++)
      for (int e = 0; e < KV_HEADS * hd; e++) {
        put(w, k, (size_t)row * KV_HEADS * hd + e, s->kv[layer][0][p][e]);
        put(w, v, (size_t)row * KV_HEADS * hd + e, s->kv[layer][1][p][e]);
      }
  }
  kvc_test_rng_t g;
  kvc_test_rng_seed(&g, w->q_seed++);
  for (size_t e = 0; e < (size_t)w->rows * w->cfg.num_q_heads * hd; e++)
    w->q[layer][e] = in_dtype(w, kvc_test_f16_to_f32(kvc_test_f32_to_f16(
                                     (float)kvc_test_rng_normal(&g))));
  const size_t bytes = (size_t)w->rows * KV_HEADS * hd * w->esize;
  void *bk = backend_ptr(w, k, bytes, 1), *bv = backend_ptr(w, v, bytes, 1);
  kvc_test_snap_t before;
  snap(w, &before);
  trace(w, "store layer %d", layer);
  kvc_status_t st = CALL(w, kvc_store(w->c, layer, bk, bv, NULL));
  if (st == KVC_OK) w->layers_done++;
  check(w, "kvc_store", st, BIT(KVC_OK), &before, 0);
  attend_and_check(w, layer);
}

/* Plans a step of members[n] with n_new[i] new tokens each (reserved first if flags & 1; tokens
 * past a prompt come from the input), then stores and attends as flags say (op_step). */
static void run_step(world_t *w, kvc_fuzz_input_t *in, uint8_t flags, int n, const int *member,
                     int32_t *n_new) {
  kvc_seq_id_t ids[MAX_MEMBERS];
  int32_t tok[MAX_MEMBERS * 32];
  int total = 0, valid = !step_open(w);
  for (int i = 0; i < n; i++) {
    ids[i] = (kvc_seq_id_t)member[i];
    if (flags & 1) reserve(w, member[i], n_new[i], 0);
    if (w->dead) return;
  }
  for (int i = 0; i < n; i++) {
    const seq_t *s = &w->seq[member[i]];
    kvc_seq_info_t info = {0};
    if (s->live) kvc_seq_info(w->c, ids[i], &info);
    valid &= s->live && !s->swapped && n_new[i] >= 1 && s->len + n_new[i] <= info.reserved;
    for (int j = 0; j < i; j++) valid &= member[j] != member[i];
    for (int t = 0; t < n_new[i]; t++) {
      const int p = s->live ? s->len + t : 0;
      tok[total + t] = p < s->ntok ? s->tok[p] : kvc_fuzz_next(in) % ALPHABET;
    }
    total += n_new[i];
  }
  valid &= total <= MAX_BATCH;
  kvc_batch_t batch = {n, ids, n_new, flags & 2 ? NULL : tok};
  kvc_test_snap_t before;
  snap(w, &before);
  trace(w, "plan");
  for (int i = 0; i < n; i++) trace(w, " %d+%d", member[i], n_new[i]);
  kvc_status_t st = CALL(w, kvc_plan(w->c, &batch, NULL));
  if (st == KVC_OK) {
    w->attendable = 1;
    reached.steps++;
    w->layers_done = 0;
    w->n_members = n;
    w->rows = total;
    for (int i = 0, row = 0; i < n; i++) {
      seq_t *s = &w->seq[member[i]];
      w->member[i] = member[i];
      w->first[i] = s->len;
      w->n_new[i] = n_new[i];
      for (int t = 0; t < n_new[i]; t++) s->tok[s->len + t] = tok[row + t];
      row += n_new[i];
      /* Positions below ntok took the prompt's tokens; those past it are new. */
      const int old_ntok = s->ntok;
      if (s->len + n_new[i] > s->ntok) s->ntok = s->len + n_new[i];
      set_hashes(s, old_ntok);
      fill_kv(w, s, s->len, s->len + n_new[i]);
      s->len += n_new[i];
    }
  }
  check(w, "kvc_plan", st,
        valid ? BIT(KVC_OK)
              : BIT(KVC_ERR_INVALID_ARGUMENT) | BIT(KVC_ERR_NOT_FOUND) | BIT(KVC_ERR_INVALID_STATE),
        &before, 0);
  if (st != KVC_OK) return;
  const int layers = flags & 0x20 ? (flags >> 2) & 1 : LAYERS;
  while (w->layers_done < layers) store_next(w);
}

/* A step: its members and their new token counts from the input, optionally reserved first; a
 * batch the shadow finds valid must plan, any other must fail. Then stores (and attends) every
 * layer, or only some: the step stays open. */
static void op_step(world_t *w, kvc_fuzz_input_t *in) {
  const uint8_t flags = kvc_fuzz_next(in);
  const int n = 1 + kvc_fuzz_next(in) % MAX_MEMBERS;
  int member[MAX_MEMBERS];
  int32_t n_new[MAX_MEMBERS];
  for (int i = 0; i < n; i++) {
    member[i] = 1 + kvc_fuzz_next(in) % IDS;
    n_new[i] = flags & 0x10 ? kvc_fuzz_next(in) % 32 : 1 + kvc_fuzz_next(in) % 16;
  }
  run_step(w, in, flags, n, member, n_new);
}

/* A prefill, as an engine runs one: the rest of a sequence's prompt (at most a batch) in a step
 * of its own, reserved first, every layer stored. Random inputs seldom string together the
 * reserve and steps that fill whole blocks, which the prefix cache needs before it can hit. */
static void op_prefill(world_t *w, kvc_fuzz_input_t *in) {
  const int id = 1 + kvc_fuzz_next(in) % IDS;
  const seq_t *s = &w->seq[id];
  const int left = s->ntok - s->len;
  int32_t n_new = left < 1 ? 1 : left < MAX_BATCH ? left : MAX_BATCH;
  run_step(w, in, 1, 1, &id, &n_new);
}

/* The open step's next layer; without one, a store that must be refused. */
static void op_store(world_t *w, kvc_fuzz_input_t *in) {
  const uint8_t b = kvc_fuzz_next(in);
  if (step_open(w) && !(b & 0x80)) {
    store_next(w);
    return;
  }
  const int layer = b % (LAYERS + 1);
  const int null_tensor = (b >> 2) & 1;
  unsigned allowed = BIT(KVC_ERR_INVALID_STATE);
  if (layer >= LAYERS || null_tensor) allowed |= BIT(KVC_ERR_INVALID_ARGUMENT);
  if (step_open(w) && layer >= w->layers_done && layer < LAYERS && !null_tensor)
    return; /* a valid store of a later layer: not what this op tests */
  kvc_test_snap_t before;
  snap(w, &before);
  trace(w, "store layer %d%s", layer, null_tensor ? " (NULL)" : "");
  void *kv = null_tensor ? NULL : backend_ptr(w, w->tens, 0, 0);
  kvc_status_t st = kvc_store(w->c, layer, kv, kv, NULL);
  check(w, "kvc_store out of order", st, allowed, &before, 0);
}

/* Attention again over a stored layer of the last step (the same outputs within tolerance), or
 * one that must be refused. */
static void op_attend(world_t *w, kvc_fuzz_input_t *in) {
  const uint8_t b = kvc_fuzz_next(in);
  const int layer = b % (LAYERS + 1), bad_scale = (b >> 2) & 1;
  if (w->attendable && layer < w->layers_done && !bad_scale) {
    attend_and_check(w, layer);
    return;
  }
  unsigned allowed = 0;
  if (!w->attendable || layer >= w->layers_done) allowed |= BIT(KVC_ERR_INVALID_STATE);
  if (layer >= LAYERS || bad_scale) allowed |= BIT(KVC_ERR_INVALID_ARGUMENT);
  kvc_test_snap_t before;
  snap(w, &before);
  uint8_t *q = (uint8_t *)w->tens + 2 * (size_t)MAX_BATCH * ROW * w->esize;
  uint8_t *out = q + (size_t)MAX_BATCH * MAX_QH * MAX_HD * w->esize;
  void *bq = backend_ptr(w, q, 0, 0), *bout = backend_ptr(w, out, 0, 0);
  trace(w, "attend layer %d%s", layer, bad_scale ? " (scale NaN)" : "");
  kvc_status_t st = CALL(w, kvc_attend(w->c, layer, bq, bout, bad_scale ? NAN : 1.0f, NULL));
  check(w, "kvc_attend out of order", st, allowed, &before, 0);
}

/* ---- moving a sequence ---------------------------------------------------------------------- */

/* A sequence image's buffer, in the backend's memory (kvcomp.h, kvc_seq_export). */
static void *image_alloc(size_t bytes) {
  void *p = NULL;
#ifdef KVC_FUZZ_CUDA
  if (cudaMalloc(&p, bytes) != cudaSuccess) violation("cudaMalloc of %zu bytes failed", bytes);
#else
  p = malloc(bytes);
  if (!p) abort();
#endif
  return p;
}

static void image_free(void *p) {
#ifdef KVC_FUZZ_CUDA
  cudaFree(p);
#else
  free(p);
#endif
}

/* Exports one sequence and imports it under another id (or refuses either). */
static void op_move(world_t *w, kvc_fuzz_input_t *in) {
  const int src = 1 + kvc_fuzz_next(in) % IDS, dst = 1 + kvc_fuzz_next(in) % IDS;
  const seq_t *s = &w->seq[src];
  unsigned allowed = !s->live                     ? BIT(KVC_ERR_NOT_FOUND)
                     : s->swapped || s->len == 0 || step_open(w) ? BIT(KVC_ERR_INVALID_STATE)
                                                                  : BIT(KVC_OK);
  kvc_test_snap_t before;
  snap(w, &before);
  trace(w, "export %d", src);
  size_t bytes = 0;
  kvc_status_t st = CALL(w, kvc_seq_export_bytes(w->c, (kvc_seq_id_t)src, &bytes, NULL));
  check(w, "kvc_seq_export_bytes", st, allowed | HOST_OOM, &before, 0);
  if (st != KVC_OK) return;
  void *image = image_alloc(bytes);
  snap(w, &before);
  st = kvc_seq_export(w->c, (kvc_seq_id_t)src, image, bytes - 1, NULL);
  check(w, "kvc_seq_export into too small a buffer", st, BIT(KVC_ERR_INVALID_ARGUMENT), &before, 0);
  snap(w, &before);
  st = kvc_seq_export(w->c, (kvc_seq_id_t)src, image, bytes, NULL);
  check(w, "kvc_seq_export", st, BIT(KVC_OK), &before, 0);
  allowed = w->seq[dst].live ? BIT(KVC_ERR_INVALID_ARGUMENT)
            : live_count(w) >= w->cfg.max_seqs
                ? BIT(KVC_ERR_OUT_OF_MEMORY)
                : BIT(KVC_OK) | BIT(KVC_ERR_OUT_OF_MEMORY);
  snap(w, &before);
  trace(w, "import %d", dst);
  w->import_lengths = w->tp;
  st = CALL(w, kvc_seq_import(w->c, (kvc_seq_id_t)dst, image, bytes, NULL));
  w->import_lengths = 0;
  if (st == KVC_OK) {
    w->seq[dst] = *s;
    reached.imports++;
  }
  /* Under tensor parallelism the other ranks' images may be of another length. */
  if (w->tp && (allowed & BIT(KVC_OK))) allowed |= BIT(KVC_ERR_INVALID_ARGUMENT);
  check(w, "kvc_seq_import", st, allowed | HOST_OOM | AGREES, &before, 0);
  image_free(image);
}

static void op_sync(world_t *w) {
  kvc_test_snap_t before;
  snap(w, &before);
  trace(w, "synchronize");
  check(w, "kvc_cache_synchronize", CALL(w, kvc_cache_synchronize(w->c)), BIT(KVC_OK), &before, 0);
  int64_t fit = 0;
  snap(w, &before);
  trace(w, "tokens_fit_agreed");
  kvc_status_t st = CALL(w, kvc_tokens_fit_agreed(w->c, &fit));
  check(w, "kvc_tokens_fit_agreed", st, BIT(KVC_OK) | (w->tp ? BIT(KVC_ERR_NCCL) : 0), &before, 0);
}

/* ---- the target ----------------------------------------------------------------------------- */

static void quiet(void *user, kvc_log_level_t level, const char *message) {
  (void)user, (void)level, (void)message;
}

static world_t W; /* ~0.8 MB of shadows: static, reset per input */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  kvc_fuzz_input_t in = {data, size};
  const uint8_t c0 = kvc_fuzz_next(&in), c1 = kvc_fuzz_next(&in), c2 = kvc_fuzz_next(&in);
  world_t *w = &W;
  void *tens = w->tens, *dev = w->dev;
  memset(w, 0, sizeof(*w));
  w->tens = tens;
  w->dev = dev;
  w->trace = getenv("KVC_FUZZ_TRACE") != NULL;
  w->fail_after = -1;
  w->in = &in;
  kvc_config_t cfg = KVC_CONFIG_INIT;
  cfg.backend = FUZZ_BACKEND;
  cfg.block_tokens = c0 & 1 ? 32 : 16;
  kvc_fuzz_codec(c0 >> 1, &cfg);
  cfg.prefix_caching = (c0 >> 4) & 1 ? 0 : 1;
  cfg.swap_bytes = (c0 >> 5) & 1 ? 0 : 48 << 10;
#ifdef KVC_FUZZ_CUDA
  cfg.head_dim = 64 << (c0 >> 6) % 3;
  cfg.dtype = (c1 >> 5) & 1 ? KVC_DTYPE_BF16 : KVC_DTYPE_F16;
#else
  cfg.head_dim = 8 * (1 + (c0 >> 6));
  cfg.dtype = (c1 >> 5) & 1 ? KVC_DTYPE_F32 : KVC_DTYPE_F16;
#endif
  cfg.num_layers = LAYERS;
  cfg.num_kv_heads = KV_HEADS;
  cfg.num_q_heads = KV_HEADS * (1 + (c1 & 3));
  w->esize = cfg.dtype == KVC_DTYPE_F32 ? 4 : 2;
  /* From about one worst-case block of every layer (and the watermark) up: admissions, reserves
   * and swap-ins run out of pool space often. */
  const size_t block_bytes =
      (size_t)LAYERS * 2 * KV_HEADS * cfg.block_tokens * cfg.head_dim * w->esize + 4096;
  cfg.pool_bytes = block_bytes * (2 + ((c1 >> 2) & 7));
  cfg.bound_mode = KVC_BOUND_ABSOLUTE;
  cfg.k_bound = cfg.v_bound = (c1 >> 6) & 1 ? 0.05f : 0.002f;
  cfg.max_seqs = c1 >> 7 ? 6 : 4;
  cfg.max_seq_len = MAX_LEN;
  cfg.max_batch_tokens = MAX_BATCH;
  cfg.log_fn = quiet;
  cfg.cascade = (c2 >> 1) % 3;
  if (c2 & 1) {
    w->tp = 1;
    cfg.tp_allreduce_max = other_ranks;
    cfg.tp_user = w;
  }
  w->cfg = cfg;
  /* Half an ulp of the dtype: bf16 has 8 significant bits, fp16 11 and fp32 24. */
  const double half_ulp = cfg.dtype == KVC_DTYPE_F32    ? 0x1p-24
                          : cfg.dtype == KVC_DTYPE_BF16 ? 0x1p-8
                                                        : 0x1p-11;
  /* The GPU's kernels round to the dtype on the way (queries scaled by a page's steps, decoded
   * values, the probabilities): kern_rel allows two roundings of each. The CPU's compute in
   * fp64. */
  const double kern_rel = FUZZ_BACKEND == KVC_BACKEND_CUDA ? 2 * half_ulp : 0;
  w->toy = (kvc_test_toy_t){KV_HEADS, cfg.num_q_heads, cfg.head_dim, cfg.k_bound, cfg.v_bound,
                            half_ulp, cfg.dtype == KVC_DTYPE_F16 ? 0x1p-25 : 0, kern_rel};
  trace(w, "config: block %d, policy %d codec %d, prefix caching %d, swap %zu, head_dim %d, "
        "q heads %d, dtype %d, pool %zu, bound %g, max_seqs %d, cascade %d, tp %d\n",
        cfg.block_tokens, (int)cfg.policy, (int)cfg.codec, cfg.prefix_caching, cfg.swap_bytes,
        cfg.head_dim, cfg.num_q_heads, (int)cfg.dtype, cfg.pool_bytes, cfg.k_bound, cfg.max_seqs,
        cfg.cascade, w->tp);
  kvc_status_t st = kvc_cache_create(&cfg, &w->c);
  if (st == KVC_ERR_INVALID_ARGUMENT) return 0; /* a pool below one block of every layer */
  if (st != KVC_OK) violation("kvc_cache_create returned %s", kvc_status_string(st));
  reached.caches++;
  const size_t tens_bytes =
      (2 * (size_t)MAX_BATCH * ROW + 2 * (size_t)MAX_BATCH * MAX_QH * MAX_HD) * 4;
  if (!w->tens) {
    w->tens = malloc(tens_bytes);
    if (!w->tens) abort();
  }
#ifdef KVC_FUZZ_CUDA
  if (!w->dev && cudaMalloc(&w->dev, tens_bytes) != cudaSuccess) violation("cudaMalloc failed");
#endif
  for (int ops = 0; in.n && !w->dead && ops < 200; ops++) {
    switch (kvc_fuzz_next(&in) % 13) {
    case 0: op_add(w, &in); break;
    case 1: op_reserve(w, &in); break;
    case 2: op_fork(w, &in); break;
    case 3: op_free(w, &in); break;
    case 4: op_swap(w, &in, 1); break;
    case 5: op_swap(w, &in, 0); break;
    case 6: op_step(w, &in); break;
    case 7: op_store(w, &in); break;
    case 8: op_attend(w, &in); break;
    case 9: op_move(w, &in); break;
    case 10: op_sync(w); break;
    case 11: op_prefill(w, &in); break;
    default: w->fail_after = kvc_fuzz_next(&in) % 4; break;
    }
  }
  kvc_cache_destroy(w->c);
  return 0;
}
