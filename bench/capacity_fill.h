/*
 * What bench_capacity and bench_step share: the model shapes, synthetic K/V whose compressed size
 * matches a measured bits-per-value figure, and the admission loop that fills a cache to capacity
 * through the public API (kvc_seq_add, kvc_seq_reserve, kvc_plan, kvc_store), with chunked prefill.
 *
 * Data. Keys have per-channel offsets and scales (the outlier channels of real keys); within a
 * channel, and for values, samples follow a generalized Gaussian of shape beta (2 = Gaussian,
 * 1 = Laplace, large = near uniform). With relative error bounds the codec normalizes each group by
 * its range, so the code entropy depends on the shape only: heavier tails (small beta) put most
 * values in a few central bins. With absolute bounds it depends on the spread instead. Either knob
 * is calibrated (kvcb_calibrate) so that Huffman pages at the configured bound measure the target
 * bits per value, every page byte counted; kvcb_calibrate_models does it at real models' own page
 * shapes, against what ./kvc eval measured on their K/V.
 *
 * Data lives in a bank of rows [rows][num_kv_heads][head_dim] fp16 for K and for V; a store takes
 * a window of consecutive rows at a random offset, so every page sees fresh values without
 * generating gigabytes of random numbers.
 *
 * Everything here is static (included by one benchmark program each); no global state.
 */
#ifndef KVC_BENCH_CAPACITY_FILL_H
#define KVC_BENCH_CAPACITY_FILL_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "compress/kvc_codec.h"
#include "kvcomp.h"

#if KVC_HAVE_CUDA
#include <cuda_runtime.h>
#endif

/* ---- model shapes ---------------------------------------------------------------------------- */

typedef struct kvcb_shape {
  const char *name;
  const char *description;
  int num_layers;
  int num_q_heads;
  int num_kv_heads;
  int head_dim;
} kvcb_shape_t;

static const kvcb_shape_t kvcb_shapes[] = {
    {"llama3-8b", "Llama-3-8B, one GPU", 32, 32, 8, 128},
    {"llama3-70b-tp8", "Llama-3-70B, one rank of TP=8", 80, 8, 1, 128},
};

static inline const kvcb_shape_t *kvcb_find_shape(const char *name) {
  for (size_t i = 0; i < sizeof kvcb_shapes / sizeof kvcb_shapes[0]; i++)
    if (strcmp(kvcb_shapes[i].name, name) == 0) return &kvcb_shapes[i];
  return NULL;
}

/* K and V values of one token in one layer (fp16: twice as many bytes). */
static inline int64_t kvcb_values_per_token_layer(const kvcb_shape_t *s) {
  return 2 * (int64_t)s->num_kv_heads * s->head_dim;
}

/* ---- random numbers and fp16 ----------------------------------------------------------------- */

typedef struct kvcb_rng {
  uint64_t s;
} kvcb_rng_t;

static inline void kvcb_rng_seed(kvcb_rng_t *r, uint64_t seed) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  r->s = (z ^ (z >> 31)) | 1;
}

static inline uint64_t kvcb_rng_u64(kvcb_rng_t *r) {
  uint64_t x = r->s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  r->s = x;
  return x * 0x2545f4914f6cdd1dull;
}

/* Uniform in (0, 1): never 0, so logs and powers stay finite. */
static inline double kvcb_rng_uniform(kvcb_rng_t *r) {
  return ((double)(kvcb_rng_u64(r) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

static inline double kvcb_rng_normal(kvcb_rng_t *r) {
  double u1 = kvcb_rng_uniform(r), u2 = kvcb_rng_uniform(r);
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

/* Gamma(shape a, scale 1): Marsaglia and Tsang; shape < 1 through the a + 1 boost. */
static inline double kvcb_rng_gamma(kvcb_rng_t *r, double a) {
  if (a < 1.0) return kvcb_rng_gamma(r, a + 1.0) * pow(kvcb_rng_uniform(r), 1.0 / a);
  double d = a - 1.0 / 3.0, c = 1.0 / sqrt(9.0 * d);
  for (;;) {
    double x = kvcb_rng_normal(r), v = 1.0 + c * x;
    if (v <= 0.0) continue;
    v = v * v * v;
    if (log(kvcb_rng_uniform(r)) < 0.5 * x * x + d - d * v + d * log(v)) return d * v;
  }
}

/* Generalized Gaussian of shape beta with unit variance: sign * Gamma(1/beta)^(1/beta), scaled. */
static inline double kvcb_rng_gengauss(kvcb_rng_t *r, double beta, double unit) {
  double g = pow(kvcb_rng_gamma(r, 1.0 / beta), 1.0 / beta) * unit;
  return (kvcb_rng_u64(r) >> 63) ? g : -g;
}

static inline double kvcb_gengauss_unit(double beta) {
  return 1.0 / sqrt(tgamma(3.0 / beta) / tgamma(1.0 / beta));
}

static inline int kvcb_cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* The median of v[n] (n >= 1), which it sorts. */
static inline double kvcb_median(double *v, int n) {
  qsort(v, (size_t)n, sizeof *v, kvcb_cmp_double);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* "32k" for whole multiples of 1024 tokens, else the count; in a caller-provided buffer. */
typedef struct kvcb_label {
  char s[16];
} kvcb_label_t;

static inline kvcb_label_t kvcb_context_label(int tokens) {
  kvcb_label_t l;
  if (tokens % 1024 == 0)
    snprintf(l.s, sizeof l.s, "%dk", tokens / 1024);
  else
    snprintf(l.s, sizeof l.s, "%d", tokens);
  return l;
}

static inline double kvcb_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Default bits per value for the synthetic data: kvcomp Huffman at the default bound, all bytes
 * counted, as `./kvc eval` measured it on a real model (bench/capacity.sh passes the latest
 * recorded figure instead when bench/results/ holds one). */
#define KVCB_DEFAULT_TARGET_BITS 4.705
#define KVCB_DEFAULT_TARGET_SOURCE                                                                 \
  "built-in: ./kvc eval's default on stories260K when this was written"

/* ---- the data bank --------------------------------------------------------------------------- */

/* How the synthetic K/V are drawn: the calibrated knob is `beta` (relative bounds) or `scale`
 * (absolute bounds). */
typedef struct kvcb_data {
  double beta;  /* generalized-Gaussian shape of each group's samples */
  double scale; /* standard deviation of values; keys' channels spread around it */
} kvcb_data_t;

typedef struct kvcb_bank {
  int rows;            /* token rows */
  int row_values;      /* num_kv_heads * head_dim */
  uint16_t *k, *v;     // host, [rows][num_kv_heads][head_dim] fp16
  void *dev_k, *dev_v; /* the same on the device (CUDA backend), or NULL */
} kvcb_bank_t;

static inline void kvcb_bank_free(kvcb_bank_t *b) {
  free(b->k);
  free(b->v);
#if KVC_HAVE_CUDA
  if (b->dev_k) cudaFree(b->dev_k);
  if (b->dev_v) cudaFree(b->dev_v);
#endif
  memset(b, 0, sizeof *b);
}

/* Fills a bank of `rows` rows for `shape` with data `d`, reproducibly from `seed`. Key channel c of
 * head h has offset mu[h][c] ~ N(0, sigma[h][c]) and spread sigma[h][c] = scale * exp(0.5 N(0, 1));
 * values are i.i.d. with spread `scale`. Returns 0, or -1 when out of memory. */
static inline int kvcb_bank_make(kvcb_bank_t *b, const kvcb_shape_t *shape, int rows, kvcb_data_t d,
                                 uint64_t seed) {
  memset(b, 0, sizeof *b);
  b->rows = rows;
  b->row_values = shape->num_kv_heads * shape->head_dim;
  size_t n = (size_t)rows * (size_t)b->row_values;
  double *mu = malloc((size_t)b->row_values * sizeof *mu);
  double *sigma = malloc((size_t)b->row_values * sizeof *sigma);
  b->k = malloc(n * sizeof *b->k);
  b->v = malloc(n * sizeof *b->v);
  if (!mu || !sigma || !b->k || !b->v) {
    free(mu);
    free(sigma);
    kvcb_bank_free(b);
    return -1;
  }
  kvcb_rng_t rng;
  kvcb_rng_seed(&rng, seed);
  double unit = kvcb_gengauss_unit(d.beta);
  for (int c = 0; c < b->row_values; c++) {
    sigma[c] = d.scale * exp(0.5 * kvcb_rng_normal(&rng));
    mu[c] = sigma[c] * kvcb_rng_normal(&rng);
  }
  for (size_t i = 0; i < n; i++) {
    size_t c = i % (size_t)b->row_values;
    const double k = mu[c] + sigma[c] * kvcb_rng_gengauss(&rng, d.beta, unit);
    b->k[i] = kvc_codec_f32_to_f16((float)k);
    b->v[i] = kvc_codec_f32_to_f16((float)(d.scale * kvcb_rng_gengauss(&rng, d.beta, unit)));
  }
  free(mu);
  free(sigma);
  return 0;
}

#if KVC_HAVE_CUDA
/* Copies the bank to the current device (for a CUDA-backend cache). Returns 0 or -1. */
static inline int kvcb_bank_upload(kvcb_bank_t *b) {
  size_t bytes = (size_t)b->rows * (size_t)b->row_values * sizeof(uint16_t);
  if (cudaMalloc(&b->dev_k, bytes) != cudaSuccess) return b->dev_k = NULL, -1;
  if (cudaMalloc(&b->dev_v, bytes) != cudaSuccess) return b->dev_v = NULL, -1;
  if (cudaMemcpy(b->dev_k, b->k, bytes, cudaMemcpyHostToDevice) != cudaSuccess) return -1;
  if (cudaMemcpy(b->dev_v, b->v, bytes, cudaMemcpyHostToDevice) != cudaSuccess) return -1;
  return 0;
}
#endif

/* Rows [row, row + n) of K (tensor 0) or V (tensor 1), where the cache reads them. */
static inline const void *kvcb_bank_rows(const kvcb_bank_t *b, kvc_backend_t backend, int tensor,
                                         int row) {
  size_t off = (size_t)row * (size_t)b->row_values;
  if (backend == KVC_BACKEND_CUDA) return (const uint16_t *)(tensor ? b->dev_v : b->dev_k) + off;
  return (tensor ? b->v : b->k) + off;
}

/* ---- cache configuration --------------------------------------------------------------------- */

/* The cache for `shape` with `layers` of its layers, a pool of `pool_bytes`, one fixed codec at
 * the library's default bounds, fp16, no prefix caching (admission must not be helped by sharing).
 */
static inline kvc_config_t kvcb_config(const kvcb_shape_t *shape, int layers, kvc_backend_t backend,
                                       size_t pool_bytes, kvc_codec_t codec, int max_seqs,
                                       int max_seq_len, int max_batch_tokens) {
  kvc_config_t cfg = KVC_CONFIG_INIT;
  cfg.backend = backend;
  cfg.num_layers = layers;
  cfg.num_q_heads = shape->num_q_heads;
  cfg.num_kv_heads = shape->num_kv_heads;
  cfg.head_dim = shape->head_dim;
  cfg.dtype = KVC_DTYPE_F16;
  cfg.pool_bytes = pool_bytes;
  cfg.max_seqs = max_seqs;
  cfg.max_seq_len = max_seq_len;
  cfg.max_batch_tokens = max_batch_tokens;
  cfg.prefix_caching = 0;
  cfg.policy = KVC_POLICY_FIXED;
  cfg.codec = codec;
  return cfg;
}

static inline const char *kvcb_codec_name(kvc_codec_t c) {
  return c == KVC_CODEC_RAW ? "raw" : c == KVC_CODEC_BITPACK ? "bitpack" : "huffman";
}

/* Stores rows [row, row + n) of the bank as the planned step's K/V of every layer; a different
 * window per layer so that layers do not hold identical pages. */
static inline kvc_status_t kvcb_store_all_layers(kvc_cache_t *cache, const kvc_config_t *cfg,
                                                 const kvcb_bank_t *bank, int n, kvcb_rng_t *rng,
                                                 void *stream) {
  for (int layer = 0; layer < cfg->num_layers; layer++) {
    int row = (int)(kvcb_rng_u64(rng) % (uint64_t)(bank->rows - n + 1));
    kvc_status_t st = kvc_store(cache, layer, kvcb_bank_rows(bank, cfg->backend, 0, row),
                                kvcb_bank_rows(bank, cfg->backend, 1, row), stream);
    if (st != KVC_OK) return st;
  }
  return KVC_OK;
}

/* ---- calibration ----------------------------------------------------------------------------- */

/* Bits per value of `codec` pages (every page byte) at the library's default bounds for data `d`,
 * measured on a small CPU-backend cache of one layer: `blocks` full blocks, then the stats. The CPU
 * codec is the reference; CUDA pages are bit-identical. Returns a negative value on failure. */
static inline double kvcb_measure_bits(const kvcb_shape_t *shape, kvc_codec_t codec, kvcb_data_t d,
                                       int blocks, uint64_t seed) {
  kvcb_bank_t bank;
  kvc_cache_t *cache = NULL;
  double bits = -1.0;
  if (kvcb_bank_make(&bank, shape, blocks * 64, d, seed) != 0) return -1.0;
  kvc_config_t cfg =
      kvcb_config(shape, 1, KVC_BACKEND_CPU, (size_t)64 << 20, codec, 4, blocks * 64, blocks * 64);
  cfg.block_tokens = 64;
  kvc_seq_id_t id = 1;
  int32_t n = blocks * 64;
  kvc_batch_t batch = {1, &id, &n, NULL};
  int n_cached;
  kvc_stats_t stats = {.struct_size = sizeof stats};
  if (kvc_cache_create(&cfg, &cache) != KVC_OK) goto out;
  if (kvc_seq_add(cache, id, NULL, 0, 0, &n_cached) != KVC_OK) goto out;
  if (kvc_seq_reserve(cache, id, n, 0) != KVC_OK) goto out;
  if (kvc_plan(cache, &batch, NULL) != KVC_OK) goto out;
  if (kvc_store(cache, 0, bank.k, bank.v, NULL) != KVC_OK) goto out;
  if (kvc_cache_synchronize(cache) != KVC_OK) goto out;
  if (kvc_get_stats(cache, &stats) != KVC_OK) goto out;
  bits = 8.0 * (double)stats.page_bytes / ((double)n * (double)kvcb_values_per_token_layer(shape));
out:
  kvc_cache_destroy(cache);
  kvcb_bank_free(&bank);
  return bits;
}

/* The data whose Huffman pages measure `target` bits per value at the default bounds: bisection
 * on the shape (relative bounds) or the spread (absolute bounds), on log scale, with the bank seed
 * the benchmark then uses (its key channels' offsets and spreads matter with absolute bounds).
 * When the target is out of reach the nearest end is used; *measured says what the data gives
 * (the caller reports it). Returns 0, or -1 when a measurement failed. */
static inline int kvcb_calibrate(const kvcb_shape_t *shape, double target, uint64_t seed,
                                 kvcb_data_t *out, double *measured) {
  kvc_config_t defaults = KVC_CONFIG_INIT;
  int absolute = defaults.bound_mode == KVC_BOUND_ABSOLUTE;
  /* Relative: beta from Laplace-like tails to near uniform (below ~0.75 the measured size stops
   * falling: tails so heavy that the codec spends bits on outliers). Absolute: spread from one
   * bound to thousands. */
  double lo = absolute ? log(defaults.k_bound) : log(0.75);
  double hi = absolute ? log(defaults.k_bound * 4096.0) : log(32.0);
  kvcb_data_t d = {2.0, 1.0};
  double bits_lo, bits_hi, bits = -1.0;
  enum { BLOCKS = 8, ITERATIONS = 14 };
#define KVCB_AT(x) (absolute ? (kvcb_data_t){2.0, exp(x)} : (kvcb_data_t){exp(x), 1.0})
  bits_lo = kvcb_measure_bits(shape, KVC_CODEC_HUFFMAN, KVCB_AT(lo), BLOCKS, seed);
  bits_hi = kvcb_measure_bits(shape, KVC_CODEC_HUFFMAN, KVCB_AT(hi), BLOCKS, seed);
  if (bits_lo < 0 || bits_hi < 0) return -1;
  if (target <= bits_lo) {
    d = KVCB_AT(lo), bits = bits_lo;
  } else if (target >= bits_hi) {
    d = KVCB_AT(hi), bits = bits_hi;
  } else {
    for (int i = 0; i < ITERATIONS; i++) {
      double mid = 0.5 * (lo + hi);
      bits = kvcb_measure_bits(shape, KVC_CODEC_HUFFMAN, KVCB_AT(mid), BLOCKS, seed);
      if (bits < 0) return -1;
      d = KVCB_AT(mid);
      if (bits < target)
        lo = mid;
      else
        hi = mid;
    }
  }
#undef KVCB_AT
  *out = d;
  *measured = bits;
  return 0;
}

/* A real model `./kvc eval` measured: its page shape and the bits per value of kvcomp Huffman at
 * the default bound on its K/V ("NAME:KV_HEADS:HEAD_DIM:BITS" on the command line); then what the
 * calibration found for it. */
typedef struct kvcb_model_bits {
  char name[64];
  int num_kv_heads, head_dim;
  double eval_bits;  /* measured by ./kvc eval on the real K/V */
  kvcb_data_t data;  /* synthetic data calibrated to eval_bits at the model's page shape */
  double model_bits; /* what those data measure at the model's page shape */
  double run_bits;   /* and at the benchmark's shape */
} kvcb_model_bits_t;

/* --backend NAME: cpu, cuda, or auto (cuda when this build has it and a GPU is present). Prints
 * why on stderr (prefixed with prog) and returns -1 for an unknown name or cuda without CUDA. */
static inline int kvcb_parse_backend(const char *prog, const char *name, kvc_backend_t *out) {
  if (strcmp(name, "cpu") == 0) {
    *out = KVC_BACKEND_CPU;
  } else if (strcmp(name, "cuda") == 0) {
    *out = KVC_BACKEND_CUDA;
  } else if (strcmp(name, "auto") == 0) {
    *out = KVC_BACKEND_CPU;
#if KVC_HAVE_CUDA
    int devices = 0;
    if (cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) *out = KVC_BACKEND_CUDA;
#endif
  } else {
    return fprintf(stderr, "%s: unknown backend %s\n", prog, name), -1;
  }
#if !KVC_HAVE_CUDA
  if (*out == KVC_BACKEND_CUDA)
    return fprintf(stderr, "%s: this build has no CUDA backend (configure with KVC_CUDA=ON)\n",
                   prog),
           -1;
#endif
  return 0;
}

static inline int kvcb_parse_model_bits(const char *v, kvcb_model_bits_t *m) {
  memset(m, 0, sizeof *m);
  if (sscanf(v, "%63[^:]:%d:%d:%lf", m->name, &m->num_kv_heads, &m->head_dim, &m->eval_bits) != 4 ||
      m->num_kv_heads < 1 || m->head_dim < 8 || m->head_dim % 8 != 0 || m->eval_bits <= 0)
    return -1;
  return 0;
}

/*
 * Data whose Huffman pages measure what ./kvc eval measured on each real model *at that model's own
 * page shape* (its head_dim decides how much of a page is per-group metadata, so the bits of one
 * shape do not carry to another); the same data are then measured at `run`'s shape. Of the models'
 * data, returns (in *out, *run_bits) the one that compresses least at `run`'s shape: the
 * conservative choice. Returns the index of that model, or -1 on failure.
 */
static inline int kvcb_calibrate_models(const kvcb_shape_t *run, kvcb_model_bits_t *m, int n,
                                        uint64_t seed, kvcb_data_t *out, double *run_bits) {
  int best = -1;
  for (int i = 0; i < n; i++) {
    kvcb_shape_t shape = {m[i].name, m[i].name, 1, m[i].num_kv_heads, m[i].num_kv_heads,
                          m[i].head_dim};
    if (kvcb_calibrate(&shape, m[i].eval_bits, seed, &m[i].data, &m[i].model_bits) != 0) return -1;
    m[i].run_bits = kvcb_measure_bits(run, KVC_CODEC_HUFFMAN, m[i].data, 8, seed);
    if (m[i].run_bits < 0) return -1;
    if (best < 0 || m[i].run_bits > m[best].run_bits) best = i;
  }
  if (best >= 0) {
    *out = m[best].data;
    *run_bits = m[best].run_bits;
  }
  return best;
}

/* ---- fill to capacity ------------------------------------------------------------------------ */

typedef struct kvcb_fill {
  int sequences;           /* admitted and fully stored, ids 1..sequences */
  int64_t tokens;          /* tokens they hold */
  int stopped_by_max_seqs; /* the cache's max_seqs, not the pool, stopped admission */
  int sync_retries;        /* refusals retried after kvc_cache_synchronize measured pending pages */
  double seconds;
  kvc_stats_t stats; /* after the fill, all pages measured */
} kvcb_fill_t;

/* Stores tokens [from, to) of sequence id in chunks of `chunk` (reserve, plan, store every
 * layer). A reserve the pool refuses is retried once after kvc_cache_synchronize has measured the
 * pending pages; *refused is set when it still is. Returns KVC_OK or the status of the failing
 * call, named in *call. */
static inline kvc_status_t kvcb_store_range(kvc_cache_t *cache, const kvc_config_t *cfg,
                                            const kvcb_bank_t *bank, kvc_seq_id_t id, int from,
                                            int to, int chunk, kvcb_rng_t *rng, void *stream,
                                            kvcb_fill_t *out, int *refused, const char **call) {
  kvc_status_t st = KVC_OK;
  for (int stored = from; stored < to;) {
    int32_t n = to - stored < chunk ? to - stored : chunk;
    *call = "kvc_seq_reserve";
    st = kvc_seq_reserve(cache, id, n, 0);
    if (st == KVC_ERR_OUT_OF_MEMORY) {
      *call = "kvc_cache_synchronize";
      if ((st = kvc_cache_synchronize(cache)) != KVC_OK) return st;
      *call = "kvc_seq_reserve";
      st = kvc_seq_reserve(cache, id, n, 0);
      if (st == KVC_OK) out->sync_retries++;
    }
    if (st == KVC_ERR_OUT_OF_MEMORY) {
      *refused = 1;
      return KVC_OK;
    }
    if (st != KVC_OK) return st;
    kvc_batch_t batch = {1, &id, &n, NULL};
    *call = "kvc_plan";
    if ((st = kvc_plan(cache, &batch, stream)) != KVC_OK) return st;
    *call = "kvc_store";
    if ((st = kvcb_store_all_layers(cache, cfg, bank, n, rng, stream)) != KVC_OK) return st;
    stored += n;
  }
  return st;
}

/* The sequence that holds a shared prefix while kvcb_fill_to_capacity forks from it. */
#define KVCB_PREFIX_SEQ (KVC_SEQ_NONE - 1)

/*
 * Admits sequences of `context` tokens until kvc_seq_reserve refuses, the way a vLLM-style
 * scheduler does with chunked prefill: each sequence is added, then each chunk of `chunk` tokens is
 * reserved, planned and stored for all layers. Only the chunk in flight is charged at the worst
 * case (a raw page per block) until its pages are measured. When a reserve is refused, pending
 * page sizes are collected (kvc_cache_synchronize) and the reserve is tried once more; if it is
 * still refused, the partial sequence is freed and admission stops. With shared_prefix tokens (a
 * whole number of blocks, below context), a sequence of those tokens is stored first and every
 * admitted sequence starts as its fork (a system prompt they all share); it is freed at the end,
 * its blocks held by the forks. Returns KVC_OK or the first unexpected status (with its call
 * named on stderr).
 */
static inline kvc_status_t kvcb_fill_to_capacity(kvc_cache_t *cache, const kvc_config_t *cfg,
                                                 const kvcb_bank_t *bank, int context, int chunk,
                                                 int shared_prefix, uint64_t seed, void *stream,
                                                 kvcb_fill_t *out) {
  kvc_status_t st = KVC_OK;
  kvcb_rng_t rng;
  kvcb_rng_seed(&rng, seed);
  memset(out, 0, sizeof *out);
  double t0 = kvcb_now();
  const char *call = "";
  int refused = 0;
  if (shared_prefix > 0) {
    int n_cached = 0;
    call = "kvc_seq_add";
    if ((st = kvc_seq_add(cache, KVCB_PREFIX_SEQ, NULL, 0, 0, &n_cached)) != KVC_OK) goto out;
    st = kvcb_store_range(cache, cfg, bank, KVCB_PREFIX_SEQ, 0, shared_prefix, chunk, &rng, stream,
                          out, &refused, &call);
    if (st != KVC_OK) goto out;
    if (refused) {
      call = "the shared prefix";
      st = KVC_ERR_OUT_OF_MEMORY;
      goto out;
    }
    call = "kvc_cache_synchronize";
    if ((st = kvc_cache_synchronize(cache)) != KVC_OK) goto out;
  }
  for (kvc_seq_id_t id = 1;; id++) {
    int n_cached = 0;
    call = shared_prefix > 0 ? "kvc_seq_fork" : "kvc_seq_add";
    st = shared_prefix > 0 ? kvc_seq_fork(cache, KVCB_PREFIX_SEQ, id)
                           : kvc_seq_add(cache, id, NULL, 0, 0, &n_cached);
    if (st == KVC_ERR_OUT_OF_MEMORY) { /* max_seqs live sequences (or no room for a fork) */
      out->stopped_by_max_seqs = 1;
      st = KVC_OK;
      break;
    }
    if (st != KVC_OK) goto out;
    st = kvcb_store_range(cache, cfg, bank, id, shared_prefix, context, chunk, &rng, stream, out,
                          &refused, &call);
    if (st != KVC_OK) goto out;
    if (refused) {
      call = "kvc_seq_free";
      st = kvc_seq_free(cache, id);
      if (st != KVC_OK) goto out;
      break;
    }
    out->sequences++;
    out->tokens += context;
  }
  if (shared_prefix > 0) {
    call = "kvc_seq_free";
    if ((st = kvc_seq_free(cache, KVCB_PREFIX_SEQ)) != KVC_OK) goto out;
  }
  call = "kvc_cache_synchronize";
  if ((st = kvc_cache_synchronize(cache)) != KVC_OK) goto out;
  out->stats.struct_size = sizeof out->stats;
  call = "kvc_get_stats";
  st = kvc_get_stats(cache, &out->stats);
out:
  out->seconds = kvcb_now() - t0;
  if (st != KVC_OK) fprintf(stderr, "fill: %s: %s\n", call, kvc_status_string(st));
  return st;
}

/* Upper bound on sequences of `context` tokens a pool can hold, at one bit per value: max_seqs is
 * set from it so that it never limits admission before the pool does. */
static inline int kvcb_max_seqs(const kvcb_shape_t *shape, int layers, size_t pool_bytes,
                                int context, int cap) {
  double bytes_per_seq =
      (double)context * (double)kvcb_values_per_token_layer(shape) * layers / 8.0;
  double n = (double)pool_bytes / bytes_per_seq + 16.0;
  return n > cap ? cap : (int)n;
}

#endif /* KVC_BENCH_CAPACITY_FILL_H */
