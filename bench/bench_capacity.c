/*
 * bench_capacity (`./kvc bench capacity`): how many sequences of a given context fit in a fixed KV
 * pool, for fp16 paged, fp8, KIVI-style 4 and 2 bits, kvcomp bit-pack and kvcomp Huffman.
 *
 * kvcomp rows (fp16 = KVC_CODEC_RAW pages, bit-pack, Huffman) are measured: a real cache is filled
 * through the public API until kvc_seq_reserve refuses (capacity_fill.h: chunked prefill, data
 * calibrated to a target bits per value). fp8 and KIVI are not kvcomp codecs: their rows run the
 * same admission loop over a pool accounted in their exact bytes per block (scales included), which
 * is what a paged allocator of fixed-size blocks of those formats would admit.
 *
 * Scale. Capacity is accounted per block (pages are independent of the sequence they belong to),
 * so storing sequences of context / K tokens, prefilled in chunks of chunk / K, in pool / K leaves
 * the sequences admitted unchanged: pages keep their real shape, so page sizes, chunk rounding, the
 * watermark and the charge for blocks in flight are the same fractions of the pool. Layers are not
 * independent: a block's pages pack into shared chunks (allocator/kvc_pool_layout.h), so a run of
 * fewer layers than the model's (--layers L, pool * L / num_layers) rounds more per page and admits
 * fewer sequences than the model would (at 32k on llama3-8b, one layer: bit-pack 39 and Huffman 45
 * sequences, the model's 43 and 48). Both defaults run every layer; the CPU's K = 32 compresses
 * 1/32 of what the full model at full context does (about 6 minutes per context on 2 cores), the
 * CUDA's K = 1 all of it.
 *
 * Prints a table, then one JSON line (last): {"bench":"capacity",...,"rows":[...]}.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "capacity_fill.h"
#include "kvcomp.h"
#include "page_bits.h"
#include "scheduler_hooks/kvc_cache_test.h"

typedef enum row_kind { ROW_KVCOMP, ROW_ACCOUNTED } row_kind_t;

/* One format of the comparison. */
typedef struct format {
  const char *name;
  row_kind_t kind;
  kvc_codec_t codec; /* ROW_KVCOMP: the cache's codec */
  int code_bits;     /* ROW_ACCOUNTED: bits per value code */
  int kivi;          /* ROW_ACCOUNTED: KIVI groups (fp16 scale and zero point each), fp16 tail */
  const char *how;
  float k_bound, v_bound; /* ROW_KVCOMP: relative bounds; 0 = the library's defaults */
} format_t;

typedef struct options {
  const kvcb_shape_t *shape;
  double pool_gib; /* of the full model */
  int layers;      /* layers instantiated */
  kvc_backend_t backend;
  int contexts[8];
  int num_contexts;
  int chunk;
  int token_scale; /* K: sequences of context / K tokens in pool / K */
  int threads;
  double target_bits;
  const char *target_source;
  uint64_t seed;
  kvcb_model_bits_t checks[4];
  int num_checks;
} options_t;

typedef struct job {
  const format_t *format;
  int context;
  /* What the job found. */
  int sequences;
  int64_t tokens;
  double bits_per_value;      /* page (or block) bytes per value, bits */
  double pool_bits_per_value; /* pool bytes occupied per value held, bits (chunk rounding, tails) */
  double seconds;
  int sync_retries;
  int stopped_by_max_seqs;
  uint32_t chunk_bytes;   /* ROW_KVCOMP: the pool's chunk size */
  kvcb_page_bits_t parts; /* ROW_KVCOMP: where the bits of the pages held after the fill go */
  kvc_status_t status;
} job_t;

typedef struct shared {
  const options_t *opt;
  const kvcb_bank_t *bank;
  size_t pool_bytes;
  job_t *jobs;
  int num_jobs;
  int next;
  pthread_mutex_t lock;
} shared_t;

static const format_t formats[] = {
    {"fp16", ROW_KVCOMP, KVC_CODEC_RAW, 0, 0, "kvcomp raw pages (fp16 paged), measured", 0, 0},
    {"fp8-e4m3", ROW_ACCOUNTED, KVC_CODEC_RAW, 8, 0,
     "accounted: 1 B/value, one scale per tensor per layer, vLLM-style fixed blocks", 0, 0},
    {"kivi-4", ROW_ACCOUNTED, KVC_CODEC_RAW, 4, 1,
     "accounted: 4 bits + fp16 scale/zero per key channel per block and per value token per head, "
     "fp16 tail", 0, 0},
    {"kivi-2", ROW_ACCOUNTED, KVC_CODEC_RAW, 2, 1, "accounted: as kivi-4 with 2 bits", 0, 0},
    {"kvcomp-bitpack", ROW_KVCOMP, KVC_CODEC_BITPACK, 0, 0,
     "kvcomp bit-pack pages, default bounds, measured", 0, 0},
    {"kvcomp-huffman", ROW_KVCOMP, KVC_CODEC_HUFFMAN, 0, 0,
     "kvcomp Huffman pages, default bounds, measured", 0, 0},
    /* Relative K 0.03 / V 0.04: a bound whose perplexity change is no larger than KIVI-style
     * 4-bit's on both real models of ./kvc eval (40 windows, decode feed, a step's own tokens
     * exact), with top-1 agreement no lower: stories260K +0.186% / 0.9880 (KIVI-4 +0.257% /
     * 0.9874), BabyLlama +0.073% / 0.9946 (KIVI-4 +0.075% / 0.9933); `kvc_eval --sweep
     * 'relkv:0.03/0.04'`. BabyLlama's perplexity margin is inside the noise: on four more disjoint
     * 40-window slices of the text (--text) it ranges -0.050..+0.056 points against KIVI-4. With a
     * block's pages packed into shared chunks its pages take 4.28 pool bits/value: 37 sequences at
     * 32k against KIVI-4's 36 (bench/NOTES-capacity.md; before packing, 4.5 and 35). */
    {"kvcomp-huffman-kivi-acc", ROW_KVCOMP, KVC_CODEC_HUFFMAN, 0, 0,
     "kvcomp Huffman pages, relative K 0.03 / V 0.04 (accuracy no worse than KIVI-4 in ./kvc "
     "eval), measured",
     0.03f, 0.04f},
};
enum { NUM_FORMATS = sizeof formats / sizeof formats[0] };

/* Bytes of one full block of one layer in an accounted format, and of a partial (tail) block. */
static void accounted_block_bytes(const format_t *f, const kvcb_shape_t *s, int block_tokens,
                                  double *full, double *tail) {
  double heads = s->num_kv_heads, hd = s->head_dim, bt = block_tokens;
  double fp16 = 2.0 * heads * bt * hd * 2.0, bits = f->code_bits;
  if (!f->kivi) {
    /* Stored in the format from the first token (fp8: the per-tensor scales are two floats per
     * layer for the whole cache, negligible and left out). */
    *full = *tail = fp16 * bits / 16.0;
    return;
  }
  /* Keys: per (head, channel) over the block's tokens; values: per (head, token) over head_dim.
   * Each group: codes + fp16 scale + fp16 zero point. The tail (KIVI's residual) stays fp16. */
  double keys = heads * hd * (bt * bits / 8.0 + 4.0);
  double values = heads * bt * (hd * bits / 8.0 + 4.0);
  *full = keys + values;
  *tail = fp16;
}

/* The admission loop of kvcb_fill_to_capacity over a pool accounted in bytes: chunked prefill,
 * the watermark kept free when a sequence is admitted, a refused chunk drops its sequence. */
static int accounted_fill(double pool_per_layer, double watermark, int context, int chunk,
                          int block_tokens, double full, double tail, int max_seqs) {
  double used = 0.0;
  int seqs = 0;
  while (seqs < max_seqs) {
    double held = 0.0;
    int len = 0;
    while (len < context) {
      int n = context - len < chunk ? context - len : chunk;
      int after = len + n;
      double bytes = (double)(after / block_tokens) * full + (after % block_tokens ? tail : 0.0);
      double limit = len == 0 ? pool_per_layer * (1.0 - watermark) : pool_per_layer;
      if (used + bytes - held > limit) return seqs;
      used += bytes - held;
      held = bytes;
      len = after;
    }
    seqs++;
  }
  return seqs;
}

/* `pool_bytes` and `run_context` below are the run's (scaled) figures. */
static int max_seqs_for(const options_t *o, size_t pool_bytes, int run_context) {
  return kvcb_max_seqs(o->shape, o->layers, pool_bytes, run_context, 16384);
}

/* The accounted admission for plain fp16 blocks: checks the accounting against kvcomp raw pages. */
static int fp16_accounted(const options_t *o, size_t pool_bytes, int context) {
  kvc_config_t d = KVC_CONFIG_INIT;
  double block = 2.0 * o->shape->num_kv_heads * d.block_tokens * o->shape->head_dim * 2.0;
  int run_context = context / o->token_scale;
  return accounted_fill((double)pool_bytes / o->layers, d.watermark, run_context,
                        o->chunk / o->token_scale, d.block_tokens, block, block,
                        max_seqs_for(o, pool_bytes, run_context));
}

/* Splits the bits of every compressed page of layer 0 the filled cache holds (sequences
 * 1..sequences; the other layers hold pages of the same data) into their parts (page_bits.h). */
static kvc_status_t page_parts(kvc_cache_t *cache, const kvc_config_t *cfg, int sequences,
                               job_t *j) {
  uint32_t max_page = 0;
  kvc__cache_geometry(cache, &j->chunk_bytes, &max_page, NULL);
  kvcb_page_bits_init(&j->parts);
  int cap = cfg->max_seq_len / cfg->block_tokens + 1;
  int32_t *blocks = malloc((size_t)cap * sizeof *blocks);
  uint8_t *page = malloc(max_page);
  kvc_status_t st = blocks && page ? KVC_OK : KVC_ERR_OUT_OF_HOST_MEMORY;
  for (kvc_seq_id_t id = 1; st == KVC_OK && id <= (kvc_seq_id_t)sequences; id++) {
    int n = 0;
    st = kvc__cache_seq_blocks(cache, id, blocks, cap, &n);
    for (int b = 0; st == KVC_OK && b < n; b++) {
      kvc_page_entry_t e;
      st = kvc__cache_read_page(cache, 0, blocks[b], &e, page, max_page);
      if (st == KVC_OK && e.kind == KVC_PAGE_COMPRESSED)
        kvcb_page_bits_add(&j->parts, page, e.nbytes, j->chunk_bytes);
    }
  }
  free(blocks);
  free(page);
  return st;
}

static void run_job(const shared_t *sh, job_t *j) {
  const options_t *o = sh->opt;
  kvc_config_t defaults = KVC_CONFIG_INIT;
  double t0 = kvcb_now();
  int run_context = j->context / o->token_scale, run_chunk = o->chunk / o->token_scale;
  j->status = KVC_OK;
  if (j->format->kind == ROW_ACCOUNTED) {
    double full, tail;
    accounted_block_bytes(j->format, o->shape, defaults.block_tokens, &full, &tail);
    j->sequences = accounted_fill((double)sh->pool_bytes / o->layers, defaults.watermark,
                                  run_context, run_chunk, defaults.block_tokens, full, tail,
                                  max_seqs_for(o, sh->pool_bytes, run_context));
    j->tokens = (int64_t)j->sequences * j->context;
    j->bits_per_value =
        8.0 * full /
        ((double)defaults.block_tokens * (double)kvcb_values_per_token_layer(o->shape));
    j->pool_bits_per_value = j->bits_per_value;
    j->seconds = kvcb_now() - t0;
    return;
  }
  kvc_config_t cfg =
      kvcb_config(o->shape, o->layers, o->backend, sh->pool_bytes, j->format->codec,
                  max_seqs_for(o, sh->pool_bytes, run_context), run_context, run_chunk);
  if (j->format->k_bound > 0) {
    cfg.bound_mode = KVC_BOUND_RELATIVE;
    cfg.k_bound = j->format->k_bound;
    cfg.v_bound = j->format->v_bound;
  }
  kvc_cache_t *cache = NULL;
  kvcb_fill_t fill;
  j->status = kvc_cache_create(&cfg, &cache);
  if (j->status != KVC_OK) {
    fprintf(stderr, "capacity: kvc_cache_create (%s, pool %zu bytes): %s\n", j->format->name,
            sh->pool_bytes, kvc_status_string(j->status));
    return;
  }
  j->status = kvcb_fill_to_capacity(cache, &cfg, sh->bank, run_context, run_chunk, 0,
                                    o->seed + (uint64_t)j->context, NULL, &fill);
  if (j->status == KVC_OK) {
    double values = (double)fill.tokens * (double)kvcb_values_per_token_layer(o->shape) * o->layers;
    j->sequences = fill.sequences;
    j->tokens = (int64_t)fill.sequences * j->context;
    j->bits_per_value = fill.stats.compression_ratio > 0 ? 16.0 / fill.stats.compression_ratio : 0;
    j->pool_bits_per_value =
        values > 0 ? 8.0 * (double)(fill.stats.page_alloc_bytes + fill.stats.staging_bytes) / values
                   : 0;
    j->sync_retries = fill.sync_retries;
    j->stopped_by_max_seqs = fill.stopped_by_max_seqs;
    j->status = kvc_cache_validate(cache);
  }
  if (j->status == KVC_OK) j->status = page_parts(cache, &cfg, fill.sequences, j);
  kvc_cache_destroy(cache);
  j->seconds = kvcb_now() - t0;
}

static void *worker(void *arg) {
  shared_t *sh = arg;
  for (;;) {
    pthread_mutex_lock(&sh->lock);
    int i = sh->next < sh->num_jobs ? sh->next++ : -1;
    pthread_mutex_unlock(&sh->lock);
    if (i < 0) return NULL;
    job_t *j = &sh->jobs[i];
    run_job(sh, j);
    if (j->format->kind == ROW_KVCOMP)
      fprintf(stderr, "  %-23s %6s: %d sequences, %.3f bits/value, %.1f s%s\n", j->format->name,
              kvcb_context_label(j->context).s, j->sequences, j->bits_per_value, j->seconds,
              j->status == KVC_OK ? "" : " FAILED");
  }
}

/* The table of where the page bits go: one column per kvcomp row, per context. */
static void print_page_parts(const options_t *o, const job_t *jobs) {
  for (int c = 0; c < o->num_contexts; c++) {
    const job_t *row = &jobs[c * NUM_FORMATS];
    printf("\nwhere the bits go at %s (bits per value; the pages of layer 0 after the fill):\n"
           "%-28s",
           kvcb_context_label(o->contexts[c]).s, "part");
    for (int f = 0; f < NUM_FORMATS; f++)
      if (row[f].format->kind == ROW_KVCOMP)
        printf(" %14.14s", strncmp(row[f].format->name, "kvcomp-", 7) == 0 ? row[f].format->name + 7
                                                                          : row[f].format->name);
    printf("\n");
    for (int k = 0; k <= KVCB_BITS_PARTS + 1; k++) {
      printf("%-28s", k < KVCB_BITS_PARTS    ? kvcb_bits_part_names[k]
                      : k == KVCB_BITS_PARTS ? "= page bytes"
                                             : "= pool chunks");
      for (int f = 0; f < NUM_FORMATS; f++) {
        const kvcb_page_bits_t *b = &row[f].parts;
        if (row[f].format->kind != ROW_KVCOMP) continue;
        double v = 0.0;
        for (int i = 0; i < KVCB_BITS_PARTS; i++)
          if (k == i || (k >= KVCB_BITS_PARTS && !kvcb_bits_part_is_share(i) &&
                         (i < KVCB_BITS_CHUNK_PAD || k > KVCB_BITS_PARTS)))
            v += b->bits[i];
        printf(" %14.4f", b->values > 0 ? v / b->values : 0.0);
      }
      printf("\n");
    }
    printf("%-28s", "pages");
    for (int f = 0; f < NUM_FORMATS; f++)
      if (row[f].format->kind == ROW_KVCOMP) printf(" %14lld", (long long)row[f].parts.pages);
    printf("\n%-28s", "page bytes, smallest");
    for (int f = 0; f < NUM_FORMATS; f++)
      if (row[f].format->kind == ROW_KVCOMP) printf(" %14u", row[f].parts.min_bytes);
    printf("\n%-28s", "page bytes, largest");
    for (int f = 0; f < NUM_FORMATS; f++)
      if (row[f].format->kind == ROW_KVCOMP) printf(" %14u", row[f].parts.max_bytes);
    printf("\n%-28s", "pool chunk bytes");
    for (int f = 0; f < NUM_FORMATS; f++)
      if (row[f].format->kind == ROW_KVCOMP) printf(" %14u", row[f].chunk_bytes);
    printf("\n");
    for (int i = 0; i < KVCB_WHATIF_CHUNKS; i++) {
      char label[40];
      snprintf(label, sizeof label, "pool b/v in %u KiB chunks", (KVCB_WHATIF_CHUNK << i) / 1024);
      printf("%-28s", label);
      for (int f = 0; f < NUM_FORMATS; f++)
        if (row[f].format->kind == ROW_KVCOMP)
          printf(" %14.4f", row[f].parts.values > 0
                                ? 8.0 * row[f].parts.bytes_at_chunk[i] / row[f].parts.values
                                : 0.0);
      printf("\n");
    }
  }
}

static void usage(FILE *f) {
  fprintf(
      f,
      "usage: bench_capacity [--shape llama3-8b|llama3-70b-tp8] [--pool-gib G] [--layers L]\n"
      "                      [--backend auto|cpu|cuda] [--contexts 4096,32768,131072]\n"
      "                      [--chunk TOKENS] [--token-scale K] [--threads N] [--target-bits B]\n"
      "                      [--target-source TEXT] [--seed S]\n"
      "  --pool-gib   KV pool of the full model on one GPU/rank (default 40)\n"
      "  --layers     layers actually run (default: all); the pool allocated is pool-gib *\n"
      "               layers / model layers; fewer layers than the model's admit fewer\n"
      "               sequences (a block's pages pack into shared chunks)\n"
      "  --chunk      chunked-prefill size (default 2048)\n"
      "  --token-scale  store sequences of context/K tokens (chunks of chunk/K) in pool/K: the\n"
      "               same sequences are admitted (default: 32 on CPU, 1 on CUDA)\n"
      "  --target-bits  bits per value the synthetic data's Huffman pages must measure at\n"
      "               this shape (used without --check)\n"
      "  --check NAME:KV_HEADS:HEAD_DIM:BITS  a real model ./kvc eval measured: calibrate the\n"
      "               data at its page shape to its bits (repeatable; the least compressible\n"
      "               result at this shape is used)\n");
}

static int parse_contexts(const char *s, options_t *o) {
  o->num_contexts = 0;
  while (*s) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || errno || v > (1 << 24) || o->num_contexts == 8) return -1;
    if (*end == 'k' || *end == 'K') v *= 1024, end++;
    if (v < 64 || v > (1 << 24)) return -1;
    o->contexts[o->num_contexts++] = (int)v;
    s = *end == ',' ? end + 1 : end;
    if (*end && *end != ',') return -1;
  }
  return o->num_contexts ? 0 : -1;
}

static int parse_args(int argc, char **argv, options_t *o) {
  const char *backend = "auto";
  int layers = 0, token_scale = 0;
  *o = (options_t){.shape = kvcb_find_shape("llama3-8b"),
                   .pool_gib = 40.0,
                   .contexts = {4096, 32768, 131072},
                   .num_contexts = 3,
                   .chunk = 2048,
                   .threads = 0,
                   .target_bits = KVCB_DEFAULT_TARGET_BITS,
                   .target_source = KVCB_DEFAULT_TARGET_SOURCE,
                   .seed = 1};
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
      usage(stdout);
      exit(0);
    }
    if (!v) return fprintf(stderr, "capacity: %s needs a value\n", a), -1;
    i++;
    if (strcmp(a, "--shape") == 0) {
      if (!(o->shape = kvcb_find_shape(v)))
        return fprintf(stderr, "capacity: unknown shape %s\n", v), -1;
    } else if (strcmp(a, "--pool-gib") == 0) {
      o->pool_gib = atof(v);
    } else if (strcmp(a, "--layers") == 0) {
      layers = atoi(v);
    } else if (strcmp(a, "--backend") == 0) {
      backend = v;
    } else if (strcmp(a, "--contexts") == 0) {
      if (parse_contexts(v, o) != 0) return fprintf(stderr, "capacity: bad --contexts %s\n", v), -1;
    } else if (strcmp(a, "--chunk") == 0) {
      o->chunk = atoi(v);
    } else if (strcmp(a, "--token-scale") == 0) {
      token_scale = atoi(v);
    } else if (strcmp(a, "--threads") == 0) {
      o->threads = atoi(v);
    } else if (strcmp(a, "--target-bits") == 0) {
      o->target_bits = atof(v);
    } else if (strcmp(a, "--target-source") == 0) {
      o->target_source = v;
    } else if (strcmp(a, "--seed") == 0) {
      o->seed = strtoull(v, NULL, 10);
    } else if (strcmp(a, "--check") == 0) {
      if (o->num_checks == 4 || kvcb_parse_model_bits(v, &o->checks[o->num_checks]) != 0)
        return fprintf(stderr, "capacity: bad --check %s (NAME:KV_HEADS:HEAD_DIM:BITS)\n", v), -1;
      o->num_checks++;
    } else {
      return fprintf(stderr, "capacity: unknown option %s\n", a), -1;
    }
  }
  if (kvcb_parse_backend("capacity", backend, &o->backend) != 0) return -1;
  o->layers = layers > 0 ? layers : o->shape->num_layers;
  o->token_scale = token_scale > 0 ? token_scale : o->backend == KVC_BACKEND_CUDA ? 1 : 32;
  kvc_config_t defaults = KVC_CONFIG_INIT;
  for (int c = 0; c < o->num_contexts; c++)
    if (o->contexts[c] % (o->token_scale * defaults.block_tokens) != 0)
      return fprintf(stderr,
                     "capacity: context %d is not a multiple of %d blocks of %d tokens "
                     "(--token-scale %d)\n",
                     o->contexts[c], o->token_scale, defaults.block_tokens, o->token_scale),
             -1;
  if (o->chunk % o->token_scale != 0)
    return fprintf(stderr, "capacity: --chunk must be a multiple of --token-scale\n"), -1;
  if (o->layers > o->shape->num_layers || o->pool_gib <= 0 || o->chunk < 1 || o->chunk > 8192 ||
      o->target_bits <= 0)
    return fprintf(stderr,
                   "capacity: --layers, --pool-gib, --chunk or --target-bits out of range\n"),
           -1;
  if (o->threads <= 0) o->threads = o->backend == KVC_BACKEND_CUDA ? 1 : 2;
  if (o->backend == KVC_BACKEND_CUDA) o->threads = 1; /* one device, one cache at a time */
  return 0;
}

static void json_string(FILE *f, const char *s) {
  fputc('"', f);
  for (; *s; s++) {
    if (*s == '"' || *s == '\\') fputc('\\', f);
    if ((unsigned char)*s >= 0x20) fputc(*s, f);
  }
  fputc('"', f);
}

int main(int argc, char **argv) {
  options_t o;
  if (parse_args(argc, argv, &o) != 0) {
    usage(stderr);
    return 2;
  }
  const kvcb_shape_t *s = o.shape;
  size_t pool_bytes =
      (size_t)(o.pool_gib * (double)(1ull << 30) * o.layers / s->num_layers / o.token_scale);
  pool_bytes &= ~(size_t)((1u << 20) - 1); /* whole MiB */
  kvc_config_t defaults = KVC_CONFIG_INIT;
  int rc = 1;
  kvcb_bank_t bank = {0};
  job_t *jobs = NULL;
  pthread_t *threads = NULL;
  int num_jobs = 0;

  printf("kvcomp capacity: %s (%d layers, %d query heads, %d kv heads, head_dim %d), fp16 K/V\n",
         s->description, s->num_layers, s->num_q_heads, s->num_kv_heads, s->head_dim);
  printf("pool: %.2f GiB per GPU for the full model. This run: %d of %d layers, sequences of "
         "context/%d\n  tokens, in a %.1f MiB %s pool (the full pool x %d/%d / %d). Pages keep "
         "their real shape and\n  capacity is accounted per block, so the sequences admitted are "
         "the full model's%s.\n",
         o.pool_gib, o.layers, s->num_layers, o.token_scale, (double)pool_bytes / (1 << 20),
         o.backend == KVC_BACKEND_CUDA ? "device" : "host", o.layers, s->num_layers, o.token_scale,
         o.layers < s->num_layers ? " or fewer (with fewer layers a block's pages pack less)" : "");
  printf(
      "admission: sequences added one by one, prefill in chunks of %d run tokens (reserve, plan,\n"
      "  store), until kvc_seq_reserve refuses (watermark %.0f%% kept free at admission; blocks "
      "not\n"
      "  yet compressed are charged as raw pages until measured; on a refusal pending page sizes\n"
      "  are collected and the reserve retried once; the refused partial sequence is dropped).\n",
      o.chunk / o.token_scale, 100.0 * defaults.watermark);

  /* Calibrate the data, then build the bank every kvcomp row stores from. With real models'
   * figures, at their own page shapes; otherwise to the target at this shape. */
  kvcb_data_t data;
  double calibrated_bits = 0.0;
  double t0 = kvcb_now();
  int chosen = -1;
  if (o.num_checks > 0) {
    chosen = kvcb_calibrate_models(s, o.checks, o.num_checks, o.seed, &data, &calibrated_bits);
    if (chosen < 0) {
      fprintf(stderr, "capacity: calibration failed (library not working?)\n");
      goto out;
    }
  } else if (kvcb_calibrate(s, o.target_bits, o.seed, &data, &calibrated_bits) != 0) {
    fprintf(stderr, "capacity: calibration failed (library not working?)\n");
    goto out;
  }
  int bank_rows = 4 * o.chunk / o.token_scale < 8192 ? 8192 : 4 * o.chunk / o.token_scale;
  if (kvcb_bank_make(&bank, s, bank_rows, data, o.seed) != 0) {
    fprintf(stderr, "capacity: out of host memory for the data bank\n");
    goto out;
  }
#if KVC_HAVE_CUDA
  if (o.backend == KVC_BACKEND_CUDA && kvcb_bank_upload(&bank) != 0) {
    fprintf(stderr, "capacity: cannot copy the data bank to the device\n");
    goto out;
  }
#endif
  printf("data: keys per-channel offset/spread, samples generalized-Gaussian with shape %.3f\n"
         "  (spread %.4g), at the default bounds (%s, K %.4g, V %.4g).\n",
         data.beta, data.scale, defaults.bound_mode == KVC_BOUND_RELATIVE ? "relative" : "absolute",
         defaults.k_bound, defaults.v_bound);
  for (int i = 0; i < o.num_checks; i++) {
    const kvcb_model_bits_t *c = &o.checks[i];
    printf("  %s: calibrated at its page shape (%d kv heads, head_dim %d) to the %.3f bits/value\n"
           "    ./kvc eval measured on its real K/V (%.3f measured); the same data at this shape: "
           "%.3f%s\n",
           c->name, c->num_kv_heads, c->head_dim, c->eval_bits, c->model_bits, c->run_bits,
           i == chosen ? "  <- used (the least compressible here)" : "");
  }
  if (o.num_checks == 0) {
    printf("  calibrated so that Huffman pages at this shape measure the target %.3f bits/value "
           "(%s): %.3f measured.\n", o.target_bits, o.target_source, calibrated_bits);
    if (fabs(calibrated_bits - o.target_bits) > 0.02 * o.target_bits)
      printf("  The target is out of reach at this bound: %s data give %.3f bits/value.\n",
             calibrated_bits < o.target_bits
                 ? "the least compressible (near-uniform in every group)"
                 : "the most compressible",
             calibrated_bits);
  }
  printf("  Huffman pages of these data measure %.3f bits/value at this shape (%.1f s).\n",
         calibrated_bits, kvcb_now() - t0);

  num_jobs = o.num_contexts * NUM_FORMATS;
  jobs = calloc((size_t)num_jobs, sizeof *jobs);
  threads = calloc((size_t)o.threads, sizeof *threads);
  if (!jobs || !threads) goto out;
  for (int c = 0; c < o.num_contexts; c++)
    for (int f = 0; f < NUM_FORMATS; f++)
      jobs[c * NUM_FORMATS + f] = (job_t){.format = &formats[f], .context = o.contexts[c]};
  shared_t sh = {.opt = &o,
                 .bank = &bank,
                 .pool_bytes = pool_bytes,
                 .jobs = jobs,
                 .num_jobs = num_jobs,
                 .next = 0};
  if (pthread_mutex_init(&sh.lock, NULL) != 0) goto out;
  int started = 0;
  t0 = kvcb_now();
  for (; started < o.threads; started++)
    if (pthread_create(&threads[started], NULL, worker, &sh) != 0) break;
  if (started == 0) worker(&sh);
  for (int i = 0; i < started; i++) pthread_join(threads[i], NULL);
  pthread_mutex_destroy(&sh.lock);
  double wall = kvcb_now() - t0;

  int failed = 0;
  for (int i = 0; i < num_jobs; i++) failed |= jobs[i].status != KVC_OK;
  /* An ideal fp16 paged allocator (no page headers, no chunk rounding), to show what the
   * ratios would be against it too. */
  int fp16_acc[8];
  for (int c = 0; c < o.num_contexts; c++)
    fp16_acc[c] = fp16_accounted(&o, pool_bytes, o.contexts[c]);

  printf("\n%-23s %8s %10s %12s %10s %10s %9s  %s\n", "codec", "context", "sequences", "tokens",
         "bits/val", "pool b/v", "vs fp16", "how");
  for (int c = 0; c < o.num_contexts; c++) {
    const job_t *fp16 = &jobs[c * NUM_FORMATS];
    for (int f = 0; f < NUM_FORMATS; f++) {
      const job_t *j = &jobs[c * NUM_FORMATS + f];
      double ratio = fp16->sequences ? (double)j->sequences / fp16->sequences : 0.0;
      printf("%-23s %7s %10d %12lld %10.3f %10.3f %8.2fx  %s%s\n", j->format->name,
             kvcb_context_label(j->context).s, j->sequences, (long long)j->tokens,
             j->bits_per_value, j->pool_bits_per_value, ratio, j->format->how,
             j->stopped_by_max_seqs ? " (stopped by max_seqs!)" : "");
    }
  }
  print_page_parts(&o, jobs);
  printf(
      "\naccounting check: the byte accounting used for fp8/KIVI, applied to fp16 blocks, admits");
  for (int c = 0; c < o.num_contexts; c++) printf(" %d", fp16_acc[c]);
  printf(" sequences (kvcomp raw pages:");
  for (int c = 0; c < o.num_contexts; c++) printf(" %d", jobs[c * NUM_FORMATS].sequences);
  printf(").\n");
  printf(
      "\nbits/val: page bytes per value stored (headers, scales, codebooks included); pool b/v:\n"
      "pool bytes occupied (chunk rounding included) per value held. %d jobs in %.1f s on %d "
      "thread(s).\n",
      num_jobs, wall, o.threads);

  printf(
      "{\"bench\":\"capacity\",\"backend\":\"%s\",\"shape\":\"%s\",\"model_layers\":%d,"
      "\"layers_run\":%d,\"pool_gib\":%g,\"pool_bytes_run\":%zu,\"block_tokens\":%d,"
      "\"prefill_chunk\":%d,\"token_scale\":%d,\"k_bound\":%g,\"v_bound\":%g,\"bound_mode\":\"%s\","
      "\"target_bits\":%.4f,\"target_source\":",
      o.backend == KVC_BACKEND_CUDA ? "cuda" : "cpu", s->name, s->num_layers, o.layers, o.pool_gib,
      pool_bytes, defaults.block_tokens, o.chunk, o.token_scale, defaults.k_bound, defaults.v_bound,
      defaults.bound_mode == KVC_BOUND_RELATIVE ? "relative" : "absolute", o.target_bits);
  json_string(stdout, o.target_source);
  printf(",\"calibrated_bits\":%.4f,\"data_beta\":%.4f,\"data_scale\":%.6g,\"seconds\":%.1f,"
         "\"ok\":%s,\"eval_checks\":[",
         calibrated_bits, data.beta, data.scale, wall, failed ? "false" : "true");
  for (int i = 0; i < o.num_checks; i++) {
    printf("%s{\"model\":", i ? "," : "");
    json_string(stdout, o.checks[i].name);
    printf(",\"num_kv_heads\":%d,\"head_dim\":%d,\"eval_bits\":%.4f,\"synthetic_bits\":%.4f,"
           "\"bits_at_run_shape\":%.4f,\"used\":%s}",
           o.checks[i].num_kv_heads, o.checks[i].head_dim, o.checks[i].eval_bits,
           o.checks[i].model_bits, o.checks[i].run_bits, i == chosen ? "true" : "false");
  }
  printf("],\"rows\":[");
  for (int i = 0; i < num_jobs; i++) {
    const job_t *j = &jobs[i], *fp16 = &jobs[(i / NUM_FORMATS) * NUM_FORMATS];
    printf("%s{\"codec\":\"%s\",\"method\":\"%s\",\"context\":%d,\"sequences\":%d,\"tokens\":%lld,"
           "\"bits_per_value\":%.4f,\"pool_bits_per_value\":%.4f,\"ratio_vs_fp16\":%.4f,"
           "\"ratio_vs_fp16_accounted\":%.4f,\"sync_retries\":%d,\"seconds\":%.2f",
           i ? "," : "", j->format->name, j->format->kind == ROW_KVCOMP ? "measured" : "accounted",
           j->context, j->sequences, (long long)j->tokens, j->bits_per_value,
           j->pool_bits_per_value, fp16->sequences ? (double)j->sequences / fp16->sequences : 0.0,
           fp16_acc[i / NUM_FORMATS] ? (double)j->sequences / fp16_acc[i / NUM_FORMATS] : 0.0,
           j->sync_retries, j->seconds);
    if (j->format->kind == ROW_KVCOMP && j->parts.values > 0) {
      printf(",\"chunk_bytes\":%u,\"bits_parts\":{", j->chunk_bytes);
      for (int k = 0; k < KVCB_BITS_PARTS; k++)
        printf("%s\"%s\":%.4f", k ? "," : "", kvcb_bits_part_keys[k],
               j->parts.bits[k] / j->parts.values);
      printf("}");
    }
    printf("}");
  }
  printf("]}\n");
  rc = failed ? 1 : 0;
out:
  free(jobs);
  free(threads);
  kvcb_bank_free(&bank);
  return rc;
}
