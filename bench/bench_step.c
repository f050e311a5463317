/*
 * bench_step (`./kvc bench step`): one full decode step — kvc_plan, then kvc_store of one token
 * per sequence and kvc_attend for every layer — with the cache filled to its capacity, for raw
 * (fp16 paged), bit-pack and Huffman pages. Each row fills its own cache the way bench_capacity
 * does (capacity_fill.h), keeps the sequences that can still grow by the steps to be run, then
 * times decode steps: CUDA events around the whole step on the CUDA backend (the GPU is idle when
 * a step starts, so the host's plan time is inside), the host clock on the CPU backend. Reports
 * the median and mean step time and tokens per second (sequences / step time) per GPU.
 *
 * The CPU backend runs the same protocol at a reduced default scale: it checks that the step works
 * and shows the trend; the figures that matter come from the CUDA backend.
 *
 * Prints a table, then one JSON line (last): {"bench":"step",...,"rows":[...]}.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "capacity_fill.h"
#include "kvcomp.h"

typedef struct options {
  const kvcb_shape_t *shape;
  double pool_gib;
  int layers;
  kvc_backend_t backend;
  int contexts[8];
  int num_contexts;
  kvc_codec_t codecs[3];
  int num_codecs;
  int chunk;
  int shared_prefix; /* tokens of a prefix every sequence shares (0: none) */
  int warmup;
  int steps;
  double target_bits;
  const char *target_source;
  uint64_t seed;
  kvcb_model_bits_t models[4]; /* --check: calibrate at real models' page shapes */
  int num_models;
} options_t;

typedef struct row {
  kvc_codec_t codec;
  int context;
  int admitted;  /* sequences the fill admitted */
  int sequences; /* of those, decoding (all could reserve warmup + steps more tokens) */
  double bits_per_value;
  double step_ms_median, step_ms_mean, step_ms_min, plan_ms_median;
  double tokens_per_s, tokens_per_s_amortized;
  double fill_seconds;
  int outputs_finite;
  kvc_status_t status;
} row_t;

/* Device (CUDA backend) or host buffers for one step's q and attention output. */
typedef struct step_buffers {
  size_t q_bytes;
  uint16_t *host_q, *host_out; // [n][num_q_heads][head_dim] fp16
  void *q, *out;               /* where the cache reads/writes them */
} step_buffers_t;

static void step_buffers_free(step_buffers_t *b, kvc_backend_t backend) {
#if KVC_HAVE_CUDA
  if (backend == KVC_BACKEND_CUDA) {
    if (b->q) cudaFree(b->q);
    if (b->out) cudaFree(b->out);
  }
#endif
  free(b->host_q);
  free(b->host_out);
  memset(b, 0, sizeof *b);
}

static int step_buffers_make(step_buffers_t *b, kvc_backend_t backend, int n, const kvcb_shape_t *s,
                             uint64_t seed) {
  memset(b, 0, sizeof *b);
  size_t values = (size_t)n * (size_t)s->num_q_heads * (size_t)s->head_dim;
  b->q_bytes = values * sizeof(uint16_t);
  b->host_q = malloc(b->q_bytes);
  b->host_out = malloc(b->q_bytes);
  if (!b->host_q || !b->host_out) return -1;
  kvcb_rng_t rng;
  kvcb_rng_seed(&rng, seed);
  for (size_t i = 0; i < values; i++)
    b->host_q[i] = kvc_codec_f32_to_f16((float)kvcb_rng_normal(&rng));
  if (backend == KVC_BACKEND_CPU) {
    b->q = b->host_q;
    b->out = b->host_out;
    return 0;
  }
#if KVC_HAVE_CUDA
  if (cudaMalloc(&b->q, b->q_bytes) != cudaSuccess) return b->q = NULL, -1;
  if (cudaMalloc(&b->out, b->q_bytes) != cudaSuccess) return b->out = NULL, -1;
  if (cudaMemcpy(b->q, b->host_q, b->q_bytes, cudaMemcpyHostToDevice) != cudaSuccess) return -1;
  return 0;
#else
  return -1;
#endif
}

/* Host view of the last step's attention output: every value finite. */
static int outputs_finite(step_buffers_t *b, kvc_backend_t backend) {
#if KVC_HAVE_CUDA
  if (backend == KVC_BACKEND_CUDA &&
      cudaMemcpy(b->host_out, b->out, b->q_bytes, cudaMemcpyDeviceToHost) != cudaSuccess)
    return 0;
#endif
  for (size_t i = 0; i < b->q_bytes / sizeof(uint16_t); i++)
    if ((b->host_out[i] & 0x7c00u) == 0x7c00u) return 0;
  return 1;
}

/* Every sequence must be able to grow by `grow` tokens: reserve it, dropping the most recently
 * admitted sequences while the pool cannot. Returns the sequences kept, or -1 on an error. */
static int make_headroom(kvc_cache_t *cache, int n, int grow) {
  for (int id = 1; id <= n; id++) {
    kvc_status_t st = kvc_seq_reserve(cache, (kvc_seq_id_t)id, grow, 0);
    if (st == KVC_ERR_OUT_OF_MEMORY) {
      if (kvc_cache_synchronize(cache) != KVC_OK) return -1;
      st = kvc_seq_reserve(cache, (kvc_seq_id_t)id, grow, 0);
    }
    if (st == KVC_ERR_OUT_OF_MEMORY) {
      if (kvc_seq_free(cache, (kvc_seq_id_t)n) != KVC_OK) return -1;
      n--;
      id--; /* retry this one with the space freed (or stop if it was the one dropped) */
      continue;
    }
    if (st != KVC_OK) {
      fprintf(stderr, "step: kvc_seq_reserve: %s\n", kvc_status_string(st));
      return -1;
    }
  }
  return n;
}

static void run_row(const options_t *o, const kvcb_bank_t *bank, size_t pool_bytes, row_t *r) {
  const kvcb_shape_t *s = o->shape;
  int grow = o->warmup + o->steps;
  /* With a shared prefix, sequences are bounded by their own tokens (and one holds the prefix). */
  int max_seqs = kvcb_max_seqs(s, o->layers, pool_bytes, r->context - o->shared_prefix,
                               bank->rows) + (o->shared_prefix > 0);
  int max_batch = max_seqs > o->chunk ? max_seqs : o->chunk;
  kvc_config_t cfg = kvcb_config(s, o->layers, o->backend, pool_bytes, r->codec, max_seqs,
                                 r->context + grow + 64, max_batch);
  kvc_cache_t *cache = NULL;
  kvcb_fill_t fill;
  step_buffers_t buf = {0};
  kvc_seq_id_t *ids = NULL;
  int32_t *ones = NULL;
  double *step_ms = NULL, *plan_ms = NULL;
  void *stream = NULL;
  const char *call = "";
  kvc_status_t st;
#if KVC_HAVE_CUDA
  cudaEvent_t ev0 = NULL, ev1 = NULL;
#endif
  r->status = KVC_ERR_INTERNAL;

  call = "kvc_cache_create";
  if ((st = kvc_cache_create(&cfg, &cache)) != KVC_OK) goto out;
#if KVC_HAVE_CUDA
  if (o->backend == KVC_BACKEND_CUDA) {
    cudaStream_t cs;
    call = "cudaStreamCreate / cudaEventCreate";
    st = KVC_ERR_CUDA;
    if (cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking) != cudaSuccess) goto out;
    stream = cs;
    if (cudaEventCreate(&ev0) != cudaSuccess || cudaEventCreate(&ev1) != cudaSuccess) goto out;
  }
#endif
  call = "fill";
  if ((st = kvcb_fill_to_capacity(cache, &cfg, bank, r->context, o->chunk, o->shared_prefix,
                                  o->seed, stream,
                                  &fill)) != KVC_OK)
    goto out;
  r->admitted = fill.sequences;
  r->fill_seconds = fill.seconds;
  r->bits_per_value = fill.stats.compression_ratio > 0 ? 16.0 / fill.stats.compression_ratio : 0;
  call = "make_headroom";
  st = KVC_ERR_INTERNAL;
  int n = make_headroom(cache, fill.sequences, grow);
  if (n <= 0) goto out;
  r->sequences = n;

  ids = malloc((size_t)n * sizeof *ids);
  ones = malloc((size_t)n * sizeof *ones);
  step_ms = malloc((size_t)o->steps * sizeof *step_ms);
  plan_ms = malloc((size_t)o->steps * sizeof *plan_ms);
  call = "host allocation";
  st = KVC_ERR_OUT_OF_HOST_MEMORY;
  if (!ids || !ones || !step_ms || !plan_ms) goto out;
  call = "step buffers";
  if (step_buffers_make(&buf, o->backend, n, s, o->seed + 99) != 0) goto out;
  for (int i = 0; i < n; i++) ids[i] = (kvc_seq_id_t)(i + 1), ones[i] = 1;
  kvc_batch_t batch = {n, ids, ones, NULL};
  float scale = 1.0f / sqrtf((float)s->head_dim);
  kvcb_rng_t rng;
  kvcb_rng_seed(&rng, o->seed + 7);

  for (int step = 0; step < grow; step++) {
#if KVC_HAVE_CUDA
    call = "cudaEventRecord";
    st = KVC_ERR_CUDA;
    if (ev0 && cudaEventRecord(ev0, (cudaStream_t)stream) != cudaSuccess) goto out;
#endif
    double t0 = kvcb_now();
    call = "kvc_plan";
    if ((st = kvc_plan(cache, &batch, stream)) != KVC_OK) goto out;
    double t_plan = kvcb_now();
    for (int layer = 0; layer < cfg.num_layers; layer++) {
      int row = (int)(kvcb_rng_u64(&rng) % (uint64_t)(bank->rows - n + 1));
      call = "kvc_store";
      st = kvc_store(cache, layer, kvcb_bank_rows(bank, o->backend, 0, row),
                     kvcb_bank_rows(bank, o->backend, 1, row), stream);
      if (st != KVC_OK) goto out;
      call = "kvc_attend";
      if ((st = kvc_attend(cache, layer, buf.q, buf.out, scale, stream)) != KVC_OK) goto out;
    }
    double ms = 0.0;
#if KVC_HAVE_CUDA
    if (ev0) {
      float gpu_ms = 0.0f;
      call = "cudaEventRecord / cudaEventSynchronize";
      st = KVC_ERR_CUDA;
      if (cudaEventRecord(ev1, (cudaStream_t)stream) != cudaSuccess ||
          cudaEventSynchronize(ev1) != cudaSuccess ||
          cudaEventElapsedTime(&gpu_ms, ev0, ev1) != cudaSuccess)
        goto out;
      ms = gpu_ms;
    }
#endif
    if (o->backend == KVC_BACKEND_CPU) ms = 1e3 * (kvcb_now() - t0);
    if (step >= o->warmup) {
      step_ms[step - o->warmup] = ms;
      plan_ms[step - o->warmup] = 1e3 * (t_plan - t0);
    }
  }
  call = "kvc_cache_synchronize";
  if ((st = kvc_cache_synchronize(cache)) != KVC_OK) goto out;
  r->outputs_finite = outputs_finite(&buf, o->backend);
  call = "kvc_cache_validate";
  if ((st = kvc_cache_validate(cache)) != KVC_OK) goto out;

  double sum = 0.0;
  for (int i = 0; i < o->steps; i++) sum += step_ms[i];
  r->step_ms_mean = sum / o->steps;
  r->step_ms_median = kvcb_median(step_ms, o->steps);
  r->step_ms_min = step_ms[0]; /* sorted by kvcb_median() */
  r->plan_ms_median = kvcb_median(plan_ms, o->steps);
  r->tokens_per_s = 1e3 * n / r->step_ms_median;
  r->tokens_per_s_amortized = 1e3 * n / r->step_ms_mean;
  st = KVC_OK;
out:
  r->status = st;
  if (st != KVC_OK)
    fprintf(stderr, "step: %s %s: %s: %s\n", kvcb_codec_name(r->codec),
            kvcb_context_label(r->context).s, call, kvc_status_string(st));
  kvc_cache_destroy(cache);
  step_buffers_free(&buf, o->backend);
#if KVC_HAVE_CUDA
  if (ev0) cudaEventDestroy(ev0);
  if (ev1) cudaEventDestroy(ev1);
  if (stream) cudaStreamDestroy((cudaStream_t)stream);
#endif
  free(ids);
  free(ones);
  free(step_ms);
  free(plan_ms);
}

static void usage(FILE *f) {
  fprintf(
      f,
      "usage: bench_step [--shape llama3-8b|llama3-70b-tp8] [--pool-gib G] [--layers L]\n"
      "                  [--backend auto|cpu|cuda] [--contexts 32768,...]\n"
      "                  [--codecs raw,bitpack,huffman] [--warmup N] [--steps N]\n"
      "                  [--chunk TOKENS] [--shared-prefix TOKENS] [--target-bits B]\n"
      "                  [--target-source TEXT] [--seed S]\n"
      "                  [--check NAME:KV_HEADS:HEAD_DIM:BITS]...  (data as bench_capacity's)\n"
      "  CUDA defaults: 40 GiB pool, all layers, 32k context, 8 warm-up + 56 timed steps (the\n"
      "                 last completes and compresses every sequence's new block).\n"
      "  CPU defaults:  1 GiB (full-model) pool, 1 layer, 1k context, 1 + 3 steps: a smoke run.\n"
      "  --shared-prefix: every sequence starts with the same TOKENS (a system prompt: forks of\n"
      "                 one sequence; a whole number of 64-token blocks, below every context).\n");
}

static int parse_list(const char *s, int *out, int cap, int *n, int is_codec) {
  *n = 0;
  while (*s) {
    const char *end = strchr(s, ',');
    size_t len = end ? (size_t)(end - s) : strlen(s);
    if (*n == cap) return -1;
    if (is_codec) {
      if (len == 3 && strncmp(s, "raw", 3) == 0)
        out[(*n)++] = KVC_CODEC_RAW;
      else if (len == 7 && strncmp(s, "bitpack", 7) == 0)
        out[(*n)++] = KVC_CODEC_BITPACK;
      else if (len == 7 && strncmp(s, "huffman", 7) == 0)
        out[(*n)++] = KVC_CODEC_HUFFMAN;
      else
        return -1;
    } else {
      char *e;
      long v = strtol(s, &e, 10);
      if (e == s) return -1;
      if (*e == 'k' || *e == 'K') v *= 1024, e++;
      if (e != s + len || v < 64 || v > (1 << 24)) return -1;
      out[(*n)++] = (int)v;
    }
    s += len + (end ? 1 : 0);
  }
  return *n ? 0 : -1;
}

static int parse_args(int argc, char **argv, options_t *o) {
  const char *backend = "auto", *contexts = NULL;
  int layers = 0, warmup = -1, steps = 0;
  double pool_gib = 0.0;
  *o = (options_t){.shape = kvcb_find_shape("llama3-8b"),
                   .codecs = {KVC_CODEC_RAW, KVC_CODEC_BITPACK, KVC_CODEC_HUFFMAN},
                   .num_codecs = 3,
                   .chunk = 2048,
                   .target_bits = KVCB_DEFAULT_TARGET_BITS,
                   .target_source = KVCB_DEFAULT_TARGET_SOURCE,
                   .seed = 1};
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
      usage(stdout);
      exit(0);
    }
    if (!v) return fprintf(stderr, "step: %s needs a value\n", a), -1;
    i++;
    if (strcmp(a, "--shape") == 0) {
      if (!(o->shape = kvcb_find_shape(v)))
        return fprintf(stderr, "step: unknown shape %s\n", v), -1;
    } else if (strcmp(a, "--pool-gib") == 0) {
      pool_gib = atof(v);
    } else if (strcmp(a, "--layers") == 0) {
      layers = atoi(v);
    } else if (strcmp(a, "--backend") == 0) {
      backend = v;
    } else if (strcmp(a, "--contexts") == 0) {
      contexts = v;
    } else if (strcmp(a, "--codecs") == 0) {
      int codecs[3];
      if (parse_list(v, codecs, 3, &o->num_codecs, 1) != 0)
        return fprintf(stderr, "step: bad --codecs %s\n", v), -1;
      for (int c = 0; c < o->num_codecs; c++) o->codecs[c] = (kvc_codec_t)codecs[c];
    } else if (strcmp(a, "--warmup") == 0) {
      warmup = atoi(v);
    } else if (strcmp(a, "--steps") == 0) {
      steps = atoi(v);
    } else if (strcmp(a, "--chunk") == 0) {
      o->chunk = atoi(v);
    } else if (strcmp(a, "--shared-prefix") == 0) {
      o->shared_prefix = atoi(v);
    } else if (strcmp(a, "--target-bits") == 0) {
      o->target_bits = atof(v);
    } else if (strcmp(a, "--target-source") == 0) {
      o->target_source = v;
    } else if (strcmp(a, "--check") == 0) {
      if (o->num_models == 4 || kvcb_parse_model_bits(v, &o->models[o->num_models]) != 0)
        return fprintf(stderr, "step: bad --check %s (NAME:KV_HEADS:HEAD_DIM:BITS)\n", v), -1;
      o->num_models++;
    } else if (strcmp(a, "--seed") == 0) {
      o->seed = strtoull(v, NULL, 10);
    } else {
      return fprintf(stderr, "step: unknown option %s\n", a), -1;
    }
  }
  if (kvcb_parse_backend("step", backend, &o->backend) != 0) return -1;
  int cuda = o->backend == KVC_BACKEND_CUDA;
  o->pool_gib = pool_gib > 0 ? pool_gib : cuda ? 40.0 : 1.0;
  o->layers = layers > 0 ? layers : cuda ? o->shape->num_layers : 1;
  o->warmup = warmup >= 0 ? warmup : cuda ? 8 : 1;
  o->steps = steps > 0 ? steps : cuda ? 56 : 3;
  if (parse_list(contexts ? contexts
                 : cuda   ? "32768"
                          : "1024",
                 o->contexts, 8, &o->num_contexts, 0) != 0)
    return fprintf(stderr, "step: bad --contexts\n"), -1;
  if (o->layers > o->shape->num_layers || o->chunk < 1 || o->chunk > 8192 || o->target_bits <= 0)
    return fprintf(stderr, "step: --layers, --chunk or --target-bits out of range\n"), -1;
  const int bt = ((kvc_config_t)KVC_CONFIG_INIT).block_tokens;
  for (int c = 0; c < o->num_contexts; c++)
    if (o->shared_prefix < 0 || o->shared_prefix % bt || o->shared_prefix >= o->contexts[c])
      return fprintf(stderr, "step: --shared-prefix must be a multiple of %d below every context\n",
                     bt), -1;
  return 0;
}

int main(int argc, char **argv) {
  options_t o;
  if (parse_args(argc, argv, &o) != 0) {
    usage(stderr);
    return 2;
  }
  const kvcb_shape_t *s = o.shape;
  int cuda = o.backend == KVC_BACKEND_CUDA;
  size_t pool_bytes = (size_t)(o.pool_gib * (double)(1ull << 30) * o.layers / s->num_layers);
  pool_bytes &= ~(size_t)((1u << 20) - 1);
  int rc = 1, num_rows = o.num_contexts * o.num_codecs;
  kvcb_bank_t bank = {0};
  row_t *rows = calloc((size_t)num_rows, sizeof *rows);
  if (!rows) return 1;

  printf("kvcomp decode step at capacity: %s (%d layers, %d query heads, %d kv heads, head_dim %d),"
         " fp16\n",
         s->description, s->num_layers, s->num_q_heads, s->num_kv_heads, s->head_dim);
  printf(
      "pool: %.2f GiB per GPU for the full model; this run: %d of %d layers, %.3f GiB %s pool.\n",
      o.pool_gib, o.layers, s->num_layers, (double)pool_bytes / (1 << 30),
      cuda ? "device" : "host");
  printf(
      "step: kvc_plan + for each layer kvc_store (1 token/sequence) + kvc_attend; %d warm-up and "
      "%d timed steps,\n  timed with %s. Sequences: admitted as in bench capacity (chunks of %d), "
      "then those that can\n  grow by %d tokens.\n",
      o.warmup, o.steps, cuda ? "CUDA events (host plan time included)" : "the host clock", o.chunk,
      o.warmup + o.steps);
  if (o.shared_prefix > 0)
    printf("Shared prefix: every sequence starts with the same %d tokens (forks of one sequence):\n"
           "  their blocks are held once, and attention reads them once per step where the plan's\n"
           "  cost model expects a gain (kvc_config_t::cascade, default).\n",
           o.shared_prefix);
  if (!cuda)
    printf("CPU backend: a functional run at reduced scale; the throughput that matters is the "
           "CUDA backend's.\n");

  kvcb_data_t data;
  double calibrated = 0.0;
  int chosen = -1;
  if (o.num_models > 0
          ? (chosen = kvcb_calibrate_models(s, o.models, o.num_models, o.seed, &data,
                                            &calibrated)) < 0
          : kvcb_calibrate(s, o.target_bits, o.seed, &data, &calibrated) != 0) {
    fprintf(stderr, "step: calibration failed\n");
    goto out;
  }
  if (kvcb_bank_make(&bank, s, 8192 > 4 * o.chunk ? 8192 : 4 * o.chunk, data, o.seed) != 0) {
    fprintf(stderr, "step: out of host memory for the data bank\n");
    goto out;
  }
#if KVC_HAVE_CUDA
  if (cuda && kvcb_bank_upload(&bank) != 0) {
    fprintf(stderr, "step: cannot copy the data bank to the device\n");
    goto out;
  }
#endif
  if (chosen >= 0)
    printf("data: calibrated at %s's page shape to the %.3f bits/value ./kvc eval measured on it;\n"
           "  Huffman pages of these data measure %.3f bits/value at this shape.\n",
           o.models[chosen].name, o.models[chosen].eval_bits, calibrated);
  else
    printf("data: calibrated to %.3f bits/value for Huffman pages (target %.3f, %s).\n",
           calibrated, o.target_bits, o.target_source);

  int failed = 0;
  for (int c = 0; c < o.num_contexts; c++) {
    for (int k = 0; k < o.num_codecs; k++) {
      row_t *r = &rows[c * o.num_codecs + k];
      r->codec = o.codecs[k];
      r->context = o.contexts[c];
      run_row(&o, &bank, pool_bytes, r);
      failed |= r->status != KVC_OK || !r->outputs_finite;
      fprintf(stderr, "  %-8s %6s: %d sequences, median step %.3f ms (fill %.1f s)\n",
              kvcb_codec_name(r->codec), kvcb_context_label(r->context).s, r->sequences,
              r->step_ms_median, r->fill_seconds);
    }
  }

  printf("\n%-8s %8s %9s %9s %9s %10s %10s %9s %11s %11s %8s\n", "codec", "context", "admitted",
         "decoding", "bits/val", "median ms", "mean ms", "plan ms", "tokens/s", "amortized",
         "vs raw");
  for (int i = 0; i < num_rows; i++) {
    const row_t *r = &rows[i], *raw = NULL;
    for (int j = (i / o.num_codecs) * o.num_codecs; j < (i / o.num_codecs + 1) * o.num_codecs; j++)
      if (rows[j].codec == KVC_CODEC_RAW) raw = &rows[j];
    printf("%-8s %7s %9d %9d %9.3f %10.3f %10.3f %9.3f %11.0f %11.0f %7.2fx%s\n",
           kvcb_codec_name(r->codec), kvcb_context_label(r->context).s, r->admitted, r->sequences,
           r->bits_per_value, r->step_ms_median, r->step_ms_mean, r->plan_ms_median,
           r->tokens_per_s, r->tokens_per_s_amortized,
           raw && raw->tokens_per_s > 0 ? r->tokens_per_s / raw->tokens_per_s : 0.0,
           r->status != KVC_OK  ? "  FAILED"
           : !r->outputs_finite ? "  NON-FINITE OUTPUT"
                                : "");
  }
  /* Sequences start at a whole number of blocks, so decode step i (from 0) completes their new
   * block, and compresses it, when i == block_tokens - 1. */
  kvc_config_t defaults = KVC_CONFIG_INIT;
  int completing = defaults.block_tokens - 1;
  int compress_timed = o.warmup <= completing && completing < o.warmup + o.steps;
  printf("\ntokens/s: decoding sequences / median step time (one token per sequence per step);\n"
         "amortized: / mean step time; the timed steps %s.%s\n",
         compress_timed ? "include the one that completes and compresses every sequence's new block"
                        : "include no block completion",
         o.layers < s->num_layers ? " Only some layers were run: a full-model step takes about "
                                    "model layers / layers run times longer."
                                  : "");

  printf("{\"bench\":\"step\",\"backend\":\"%s\",\"shape\":\"%s\",\"model_layers\":%d,"
         "\"layers_run\":%d,\"pool_gib\":%g,\"pool_bytes_run\":%zu,\"warmup\":%d,\"steps\":%d,"
         "\"timer\":\"%s\",\"target_bits\":%.4f,\"calibrated_bits\":%.4f,\"shared_prefix\":%d,"
         "\"ok\":%s,\"rows\":[",
         cuda ? "cuda" : "cpu", s->name, s->num_layers, o.layers, o.pool_gib, pool_bytes, o.warmup,
         o.steps, cuda ? "cuda events" : "host clock", o.target_bits, calibrated, o.shared_prefix,
         failed ? "false" : "true");
  for (int i = 0; i < num_rows; i++) {
    const row_t *r = &rows[i], *raw = NULL;
    for (int j = (i / o.num_codecs) * o.num_codecs; j < (i / o.num_codecs + 1) * o.num_codecs; j++)
      if (rows[j].codec == KVC_CODEC_RAW) raw = &rows[j];
    printf("%s{\"codec\":\"%s\",\"context\":%d,\"admitted\":%d,\"sequences\":%d,"
           "\"bits_per_value\":%.4f,\"step_ms_median\":%.4f,\"step_ms_mean\":%.4f,"
           "\"step_ms_min\":%.4f,\"plan_ms_median\":%.4f,\"tokens_per_s\":%.1f,"
           "\"tokens_per_s_amortized\":%.1f,\"speedup_vs_raw\":%.4f,\"ok\":%s}",
           i ? "," : "", kvcb_codec_name(r->codec), r->context, r->admitted, r->sequences,
           r->bits_per_value, r->step_ms_median, r->step_ms_mean, r->step_ms_min, r->plan_ms_median,
           r->tokens_per_s, r->tokens_per_s_amortized,
           raw && raw->tokens_per_s > 0 ? r->tokens_per_s / raw->tokens_per_s : 0.0,
           r->status == KVC_OK && r->outputs_finite ? "true" : "false");
  }
  printf("]}\n");
  rc = failed ? 1 : 0;
out:
  kvcb_bank_free(&bank);
  free(rows);
  return rc;
}
