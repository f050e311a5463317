/*
 * `./kvc eval`: the accuracy/size study of kvcomp on real models (issue 7).
 *
 * For each model: perplexity over the README protocol's windows with the KV cache kept
 *   - exactly (kvcomp raw codec, fp32: the reference every change is measured against),
 *   - by the baselines, emulated in the runner's dense cache on full blocks only (fp16; fp8 e4m3
 *     with a per-tensor scale; KIVI-style 5/4/3/2-bit integers, scales counted),
 *   - by kvcomp itself: bit-pack and Huffman over a sweep of relative and absolute error bounds,
 *     and the library's default setting; bits per value from the page bytes the library reports.
 * All full 64-token blocks are compressed, the current tail is exact (runner_eval.h: DECODE).
 *
 * Output: a Markdown table (stdout and OUT/EVAL.md), OUT/eval.json, OUT/eval.png (when python3
 * with matplotlib is there) and, last on stdout, the JSON line {"bench":"eval",...}.
 * `--dump-kv FILE` instead writes the model's real keys and values for the codec benchmark.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "compress/kvc_codec.h"
#include "runner_capture.h"
#include "runner_eval.h"

#ifndef KVC_RUNNER_SOURCE_DIR
#define KVC_RUNNER_SOURCE_DIR "bench/runner"
#endif

#define MAX_ROWS 96
#define MAX_MODELS 4

typedef struct row {
  char name[80];
  char family[24]; /* exact, fp16, fp8, kivi, bitpack-rel, bitpack-abs, huffman-rel, huffman-abs, default */
  double ppl, change, agreement, bits, top1_text, seconds;
  int is_kvc;
  kvc_config_t cfg;
} row_t;

typedef struct opts {
  const char *models[MAX_MODELS];
  int n_models;
  const char *tokenizer;
  const char *text;
  int windows;
  kvc_runner_feed_t feed;
  int chunk;       /* prefill feed: tokens per step, 0: whole windows */
  char feed_name[48];
  int dense_codec; /* kvcomp rows through the codec API in the dense cache instead of the library */
  const char *out_dir;
  const char *dump_kv;
  const char *sweep;
  int quick;
} opts_t;

typedef struct model_run {
  char label[64];
  kvc_runner_model_t m;
  int32_t *stream;
  int n_stream;
  kvc_runner_ctx_t ctx;
  kvc_runner_ppl_t ref;
  row_t rows[MAX_ROWS];
  int n_rows;
  int default_row;
  float *k_amax, *v_amax;
} model_run_t;

static void usage(FILE *f) {
  fprintf(f,
          "usage: kvc_eval [--model FILE [--tokenizer FILE]]... [--text FILE] [--windows N]\n"
          "                [--feed decode|prefill [--chunk N]] [--path kvcomp|dense] [--out DIR]\n"
          "                [--sweep SPEC] [--quick] [--dump-kv FILE]\n"
          "  --model      GGUF or llama2.c checkpoint (repeatable; default: stories260K and\n"
          "               babyllama-tok105 from $KVC_SHARED_DIR or ../shared)\n"
          "  --tokenizer  llama2.c tokenizer.bin for the preceding llama2.c --model\n"
          "  --text       evaluation text (default ../shared/data/tinystories_val.txt)\n"
          "  --windows    windows of 256 tokens (default 40)\n"
          "  --feed       decode: one token per step (default);\n"
          "               prefill: each window as one prompt\n"
          "  --chunk      with --feed prefill: N tokens of each window per step (chunked prefill)\n"
          "  --path       kvcomp: kvcomp rows through the cache (default); dense: through the codec\n"
          "               API applied to full blocks of the runner's dense cache\n"
          "  --out        directory for EVAL.md, eval.json, eval.png (default bench/runner/results)\n"
          "  --sweep      e.g. 'rel:0.02,0.05;abs:0.01;relkv:0.02/0.08' (relkv: k_bound/v_bound)\n"
          "  --quick      fewer rows (tests, smoke runs)\n"
          "  --dump-kv    write real post-RoPE K and V (see bench/runner/README.md) and exit\n");
}

static int parse_args(int argc, char **argv, opts_t *o) {
  memset(o, 0, sizeof *o);
  o->windows = 40;
  o->out_dir = KVC_RUNNER_SOURCE_DIR "/results";
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    const char *val = i + 1 < argc ? argv[i + 1] : NULL;
    int takes = 1;
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      usage(stdout);
      exit(0);
    } else if (!strcmp(a, "--quick")) {
      o->quick = 1;
      takes = 0;
    } else if (!val) {
      fprintf(stderr, "kvc_eval: %s needs a value (or is unknown)\n", a);
      return -1;
    } else if (!strcmp(a, "--model")) {
      if (o->n_models == MAX_MODELS) {
        fprintf(stderr, "kvc_eval: at most %d models\n", MAX_MODELS);
        return -1;
      }
      o->models[o->n_models++] = val;
    } else if (!strcmp(a, "--tokenizer")) {
      o->tokenizer = val;
    } else if (!strcmp(a, "--text")) {
      o->text = val;
    } else if (!strcmp(a, "--windows")) {
      char *end;
      long w = strtol(val, &end, 10);
      if (*end || w < 1 || w > 100000) {
        fprintf(stderr, "kvc_eval: --windows wants a positive integer, got '%s'\n", val);
        return -1;
      }
      o->windows = (int)w;
    } else if (!strcmp(a, "--feed")) {
      if (!strcmp(val, "decode")) o->feed = KVC_RUNNER_FEED_DECODE;
      else if (!strcmp(val, "prefill")) o->feed = KVC_RUNNER_FEED_PREFILL;
      else {
        fprintf(stderr, "kvc_eval: --feed is decode or prefill\n");
        return -1;
      }
    } else if (!strcmp(a, "--chunk")) {
      char *end;
      long n = strtol(val, &end, 10);
      if (*end || n < 1 || n > 255) {
        fprintf(stderr, "kvc_eval: --chunk wants an integer in 1..255, got '%s'\n", val);
        return -1;
      }
      o->chunk = (int)n;
    } else if (!strcmp(a, "--path")) {
      if (!strcmp(val, "kvcomp")) o->dense_codec = 0;
      else if (!strcmp(val, "dense")) o->dense_codec = 1;
      else {
        fprintf(stderr, "kvc_eval: --path is kvcomp or dense\n");
        return -1;
      }
    } else if (!strcmp(a, "--out")) {
      o->out_dir = val;
    } else if (!strcmp(a, "--sweep")) {
      o->sweep = val;
    } else if (!strcmp(a, "--dump-kv")) {
      o->dump_kv = val;
    } else {
      fprintf(stderr, "kvc_eval: unknown option %s\n", a);
      usage(stderr);
      return -1;
    }
    i += takes;
  }
  if (o->tokenizer && o->n_models != 1) {
    fprintf(stderr, "kvc_eval: --tokenizer goes with exactly one --model\n");
    return -1;
  }
  if (o->chunk && o->feed != KVC_RUNNER_FEED_PREFILL) {
    fprintf(stderr, "kvc_eval: --chunk goes with --feed prefill\n");
    return -1;
  }
  if (o->chunk >= 255) o->chunk = 0; /* the whole window */
  if (o->feed == KVC_RUNNER_FEED_DECODE)
    snprintf(o->feed_name, sizeof o->feed_name, "decode");
  else if (o->chunk)
    snprintf(o->feed_name, sizeof o->feed_name, "prefill (chunks of %d)", o->chunk);
  else
    snprintf(o->feed_name, sizeof o->feed_name, "prefill");
  return 0;
}

/* ---- running one configuration ----------------------------------------------------------- */

static int step_capacity(const opts_t *o) {
  return o->feed == KVC_RUNNER_FEED_PREFILL ? 16 * (o->chunk ? o->chunk : 255) : o->windows;
}

static kvc_runner_ppl_opts_t ppl_opts(const opts_t *o) {
  kvc_runner_ppl_opts_t p = {o->windows, 256, o->feed, o->feed == KVC_RUNNER_FEED_PREFILL ? 16 : 0};
  return p;
}

/* The cache configuration of a kvcomp row: fp32 on the CPU backend, so that only the codec
 * changes the values the attention sees. */
static kvc_config_t kvc_row_config(kvc_codec_t codec, kvc_bound_mode_t mode, float kb, float vb) {
  kvc_config_t c = KVC_CONFIG_INIT;
  c.dtype = KVC_DTYPE_F32;
  c.policy = KVC_POLICY_FIXED;
  c.codec = codec;
  c.bound_mode = mode;
  c.k_bound = kb;
  c.v_bound = vb;
  c.prefix_caching = 0;
  c.pool_bytes = (size_t)512 << 20;
  return c;
}

/* Codec emulation in the dense cache: each full block goes through kvc_codec_encode/decode. */
typedef struct codec_emul {
  kvc_codec_params_t p;
  uint8_t *page;
  size_t cap;
  float *staging, *decoded; /* [2][kv_heads][block_tokens][head_dim] */
  double bytes;
  int64_t values;
  kvc_status_t st;
} codec_emul_t;

static void codec_block(void *user, int layer, float *k, float *v, int n, int kvh, int hd) {
  codec_emul_t *e = user;
  (void)layer;
  int B = e->p.block_tokens;
  for (int tensor = 0; tensor < 2; tensor++) {
    const float *src = tensor ? v : k;
    for (int t = 0; t < n; t++)
      for (int h = 0; h < kvh; h++)
        memcpy(e->staging + (((size_t)tensor * kvh + h) * B + t) * hd, src + ((size_t)t * kvh + h) * hd,
               (size_t)hd * sizeof(float));
  }
  size_t size = 0;
  kvc_status_t st = kvc_codec_encode(&e->p, e->staging, n, e->page, e->cap, &size);
  if (st == KVC_OK) st = kvc_codec_decode(e->page, size, e->decoded);
  if (st != KVC_OK) {
    if (e->st == KVC_OK) e->st = st;
    return;
  }
  e->bytes += (double)size;
  e->values += 2 * (int64_t)n * kvh * hd;
  for (int tensor = 0; tensor < 2; tensor++) {
    float *dst = tensor ? v : k;
    for (int t = 0; t < n; t++)
      for (int h = 0; h < kvh; h++)
        memcpy(dst + ((size_t)t * kvh + h) * hd, e->decoded + (((size_t)tensor * kvh + h) * n + t) * hd,
               (size_t)hd * sizeof(float));
  }
}

static void finish_row(model_run_t *mr, row_t *r, const kvc_runner_ppl_t *p) {
  r->ppl = p->ppl;
  r->change = mr->ref.n_scored ? p->ppl / mr->ref.ppl - 1.0 : 0.0;
  r->agreement = mr->ref.argmax ? kvc_runner_agreement(p->argmax, mr->ref.argmax, p->n_scored) : 1.0;
  r->top1_text = p->top1_text;
  r->seconds = p->seconds;
}

static kvc_status_t run_dense(model_run_t *mr, const opts_t *o, kvc_runner_block_fn fn, void *user,
                              kvc_runner_ppl_t *p, kvc_runner_err_t *err) {
  kvc_runner_dense_opts_t d = {64, 0, 0, fn, user};
  kvc_runner_kv_t *kv = NULL;
  kvc_status_t st = kvc_runner_kv_dense(&mr->m.shape, &d, &kv, err);
  if (st != KVC_OK) return st;
  kvc_runner_ppl_opts_t po = ppl_opts(o);
  st = kvc_runner_perplexity_chunked(&mr->ctx, kv, mr->stream, mr->n_stream, &po, o->chunk, p,
                                     err);
  kvc_runner_kv_destroy(kv);
  return st;
}

/* Runs kvcomp row r; with `keep`, its perplexity result (argmax included) is moved there. */
static kvc_status_t run_kvc_row(model_run_t *mr, const opts_t *o, row_t *r, kvc_runner_ppl_t *keep,
                                kvc_runner_err_t *err) {
  kvc_runner_ppl_t p;
  kvc_status_t st;
  const kvc_runner_shape_t *s = &mr->m.shape;
  if (o->dense_codec) {
    codec_emul_t e;
    memset(&e, 0, sizeof e);
    e.p = (kvc_codec_params_t){KVC_DTYPE_F32, s->n_kv_heads, s->head_dim, 64, r->cfg.bound_mode,
                               r->cfg.k_bound, r->cfg.v_bound, r->cfg.policy, r->cfg.codec,
                               r->cfg.size_budget};
    if ((st = kvc_codec_check_params(&e.p)) != KVC_OK)
      return kvc_runner_fail(err, st, "codec parameters of %s: %s", r->name, kvc_status_string(st));
    e.cap = kvc_codec_max_page_bytes(&e.p);
    e.page = malloc(e.cap);
    e.staging = malloc(kvc_codec_staging_bytes(&e.p));
    e.decoded = malloc(kvc_codec_staging_bytes(&e.p));
    if (!e.page || !e.staging || !e.decoded) st = kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "out of memory");
    else st = run_dense(mr, o, codec_block, &e, &p, err);
    if (st == KVC_OK && e.st != KVC_OK)
      st = kvc_runner_fail(err, e.st, "codec on %s: %s", r->name, kvc_status_string(e.st));
    if (st == KVC_OK) r->bits = 8.0 * e.bytes / (double)e.values;
    free(e.page);
    free(e.staging);
    free(e.decoded);
  } else {
    kvc_runner_kv_t *kv = NULL;
    if ((st = kvc_runner_kv_kvcomp(s, &r->cfg, &kv, err)) != KVC_OK) return st;
    kvc_runner_ppl_opts_t po = ppl_opts(o);
    st = kvc_runner_perplexity_chunked(&mr->ctx, kv, mr->stream, mr->n_stream, &po, o->chunk, &p,
                                       err);
    kvc_runner_kv_destroy(kv);
    if (st == KVC_OK) {
      double values = (double)p.full_blocks * 64.0 * 2.0 * s->n_kv_heads * s->head_dim;
      r->bits = values > 0 ? 8.0 * p.page_bytes / values : 0.0;
    }
  }
  if (st != KVC_OK) return st;
  finish_row(mr, r, &p);
  if (keep) *keep = p;
  else kvc_runner_ppl_free(&p);
  return KVC_OK;
}

static row_t *new_row(model_run_t *mr, const char *family, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static row_t *new_row(model_run_t *mr, const char *family, const char *fmt, ...) {
  if (mr->n_rows == MAX_ROWS) return NULL;
  row_t *r = &mr->rows[mr->n_rows++];
  memset(r, 0, sizeof *r);
  snprintf(r->family, sizeof r->family, "%s", family);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(r->name, sizeof r->name, fmt, ap);
  va_end(ap);
  return r;
}

static void print_row(const row_t *r) {
  fprintf(stderr, "  %-40s ppl %.4f  change %+7.3f%%  agree %.4f  bits/value %6.3f  (%.1fs)\n",
          r->name, r->ppl, 100.0 * r->change, r->agreement, r->bits, r->seconds);
}

/* ---- the study of one model -------------------------------------------------------------- */

static const char *codec_name(kvc_codec_t c) {
  return c == KVC_CODEC_RAW ? "raw" : c == KVC_CODEC_BITPACK ? "bitpack" : "huffman";
}

/* Adds the bit-pack and Huffman rows of one bound setting; -1 when the table is full. */
static int add_kvc_rows(model_run_t *mr, kvc_bound_mode_t mode, float kb, float vb) {
  for (int c = KVC_CODEC_BITPACK; c <= KVC_CODEC_HUFFMAN; c++) {
    const char *m = mode == KVC_BOUND_RELATIVE ? "rel" : "abs";
    char fam[24];
    snprintf(fam, sizeof fam, "%s-%s", codec_name((kvc_codec_t)c), m);
    row_t *r = kb == vb ? new_row(mr, fam, "kvcomp %s %s %g", codec_name((kvc_codec_t)c), m, (double)kb)
                        : new_row(mr, fam, "kvcomp %s %s k%g v%g", codec_name((kvc_codec_t)c), m,
                                  (double)kb, (double)vb);
    if (!r) return -1;
    r->is_kvc = 1;
    r->cfg = kvc_row_config((kvc_codec_t)c, mode, kb, vb);
  }
  return 0;
}

/* Parses "rel:0.02,0.05;abs:0.01;relkv:0.02/0.08;abskv:0.01/0.05" into kvcomp rows. */
static int add_sweep(model_run_t *mr, const char *spec) {
  char buf[1024];
  snprintf(buf, sizeof buf, "%s", spec);
  for (char *part = strtok(buf, ";"); part; part = strtok(NULL, ";")) {
    char *colon = strchr(part, ':');
    if (!colon) return -1;
    *colon = 0;
    int pairs = !strcmp(part, "relkv") || !strcmp(part, "abskv");
    kvc_bound_mode_t mode = !strncmp(part, "rel", 3) ? KVC_BOUND_RELATIVE : KVC_BOUND_ABSOLUTE;
    if (strcmp(part, "rel") && strcmp(part, "abs") && !pairs) return -1;
    char *save = NULL;
    for (char *v = strtok_r(colon + 1, ",", &save); v; v = strtok_r(NULL, ",", &save)) {
      char *end;
      float kb = strtof(v, &end), vb = kb;
      if (pairs) {
        if (*end != '/') return -1;
        vb = strtof(end + 1, &end);
      }
      if (*end || !(kb > 0) || !(vb > 0) || add_kvc_rows(mr, mode, kb, vb) != 0) return -1;
    }
  }
  return 0;
}

/* KIVI's bits/value at a given perplexity change, interpolated between the two KIVI rows around
 * it: linearly in log(change) (the change roughly quarters per bit) when both are positive, else
 * linearly. NAN when no two KIVI rows bracket the change or it is not positive. */
static double kivi_bits_at(const model_run_t *mr, double change) {
  const row_t *lo = NULL, *hi = NULL; /* lo: the most bits with change >= target; hi: the fewest below */
  if (!(change > 0)) return NAN;
  for (int i = 0; i < mr->n_rows; i++) {
    const row_t *r = &mr->rows[i];
    if (strcmp(r->family, "kivi")) continue;
    if (r->change >= change && (!lo || r->bits > lo->bits)) lo = r;
    if (r->change < change && (!hi || r->bits < hi->bits)) hi = r;
  }
  if (!lo || !hi) return NAN;
  double a = lo->change, b = hi->change, x = change;
  if (b > 0) {
    a = log(a);
    b = log(b);
    x = log(x);
  }
  return a == b ? lo->bits : lo->bits + (hi->bits - lo->bits) * (x - a) / (b - a);
}

static kvc_status_t study_model(model_run_t *mr, const opts_t *o, const char *path, const char *tok,
                                const char *text, kvc_runner_err_t *err) {
  kvc_status_t st = kvc_runner_model_load(&mr->m, path, tok, err);
  if (st != KVC_OK) return st;
  const char *file = strrchr(path, '/');
  file = file ? file + 1 : path;
  snprintf(mr->label, sizeof mr->label, "%.*s", (int)(strcspn(file, ".")), file);
  if (256 > mr->m.shape.max_seq_len)
    return kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "%s: context %d is shorter than the "
                           "protocol's 256-token windows", path, mr->m.shape.max_seq_len);
  if ((st = kvc_runner_text_stream(&mr->m.vocab, text, o->windows * 255, &mr->stream,
                                   &mr->n_stream, err)) != KVC_OK)
    return st;
  if ((st = kvc_runner_ctx_init(&mr->ctx, &mr->m, step_capacity(o), err)) != KVC_OK) return st;
  const kvc_runner_shape_t *s = &mr->m.shape;
  fprintf(stderr, "%s: %s, dim %d, %d layers, %d/%d heads, head_dim %d, vocab %d; %d windows, %s feed\n",
          mr->label, mr->m.format, s->dim, s->n_layers, s->n_heads, s->n_kv_heads, s->head_dim,
          s->vocab_size, o->windows, o->feed_name);

  /* The exact dense run: the cross-check of the kvcomp reference and the fp8 calibration. */
  mr->k_amax = calloc((size_t)s->n_layers, sizeof(float));
  mr->v_amax = calloc((size_t)s->n_layers, sizeof(float));
  if (!mr->k_amax || !mr->v_amax) return kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "out of memory");
  kvc_runner_quant_t amax = {KVC_RUNNER_Q_AMAX, 0, s->n_layers, mr->k_amax, mr->v_amax, 0, 0};
  kvc_runner_ppl_t dense;
  if ((st = run_dense(mr, o, kvc_runner_quant_block, &amax, &dense, err)) != KVC_OK) return st;

  row_t *ref = new_row(mr, "exact", "%s", o->dense_codec ? "exact fp32 (dense)" : "kvcomp raw fp32 (exact)");
  if (!ref) return kvc_runner_fail(err, KVC_ERR_INTERNAL, "row table full");
  if (o->dense_codec) {
    mr->ref = dense;
    ref->bits = 32.0;
  } else {
    ref->is_kvc = 1;
    ref->cfg = kvc_row_config(KVC_CODEC_RAW, KVC_BOUND_RELATIVE, KVC_DEFAULT_K_BOUND, KVC_DEFAULT_V_BOUND);
    if ((st = run_kvc_row(mr, o, ref, &mr->ref, err)) != KVC_OK) {
      kvc_runner_ppl_free(&dense);
      return st;
    }
    const kvc_runner_ppl_t *p = &mr->ref;
    double diff = fabs(dense.ppl / p->ppl - 1.0);
    fprintf(stderr, "  exact dense runner ppl %.5f vs kvcomp raw fp32 %.5f (relative difference %.2e)\n",
            dense.ppl, p->ppl, diff);
    if (diff > 1e-4) {
      kvc_runner_ppl_free(&dense);
      return kvc_runner_fail(err, KVC_ERR_INTERNAL, "%s: kvcomp's raw fp32 cache gives perplexity "
                             "%.5f but the exact dense cache %.5f", mr->label, p->ppl, dense.ppl);
    }
    kvc_runner_ppl_free(&dense);
  }
  finish_row(mr, ref, &mr->ref);
  print_row(ref);
  if (!strcmp(mr->label, "stories260K") && o->windows == 40)
    fprintf(stderr, "  reference protocol: perplexity %.4f (README: 4.2852, %+.3f%%)\n", mr->ref.ppl,
            100.0 * (mr->ref.ppl / 4.2852 - 1.0));

  /* Baselines in the dense cache. */
  kvc_runner_quant_t q16 = {KVC_RUNNER_Q_FP16, 0, s->n_layers, NULL, NULL, 0, 0};
  kvc_runner_quant_t q8 = {KVC_RUNNER_Q_FP8, 0, s->n_layers, mr->k_amax, mr->v_amax, 0, 0};
  struct { kvc_runner_quant_t q; const char *family; char name[64]; } base[8];
  int nb = 0;
  base[nb].q = q16;
  base[nb].family = "fp16";
  snprintf(base[nb++].name, 64, "raw fp16");
  base[nb].q = q8;
  base[nb].family = "fp8";
  snprintf(base[nb++].name, 64, "fp8 e4m3, per-tensor scale");
  int kivi_bits[] = {5, 4, 3, 2};
  for (int i = 0; i < 4; i++) {
    if (o->quick && kivi_bits[i] != 4 && kivi_bits[i] != 3) continue;
    base[nb].q = (kvc_runner_quant_t){KVC_RUNNER_Q_KIVI, kivi_bits[i], s->n_layers, NULL, NULL, 0, 0};
    base[nb].family = "kivi";
    snprintf(base[nb++].name, 64, "KIVI-style %d-bit", kivi_bits[i]);
  }
  for (int i = 0; i < nb; i++) {
    kvc_runner_ppl_t p;
    row_t *r = new_row(mr, base[i].family, "%s", base[i].name);
    if (!r) break;
    if ((st = run_dense(mr, o, kvc_runner_quant_block, &base[i].q, &p, err)) != KVC_OK) return st;
    finish_row(mr, r, &p);
    r->bits = 8.0 * base[i].q.bytes / (double)base[i].q.values;
    kvc_runner_ppl_free(&p);
    print_row(r);
  }

  /* kvcomp: the library default, then the sweep. */
  int first_kvc = mr->n_rows;
  row_t *def = new_row(mr, "default", "kvcomp default");
  if (!def) return kvc_runner_fail(err, KVC_ERR_INTERNAL, "row table full");
  def->is_kvc = 1;
  def->cfg = kvc_row_config(KVC_CODEC_HUFFMAN, KVC_BOUND_RELATIVE, 0, 0);
  {
    kvc_config_t init = KVC_CONFIG_INIT; /* whatever the library's defaults are */
    def->cfg.policy = init.policy;
    def->cfg.codec = init.codec;
    def->cfg.size_budget = init.size_budget;
    def->cfg.bound_mode = init.bound_mode;
    def->cfg.k_bound = init.k_bound;
    def->cfg.v_bound = init.v_bound;
    snprintf(def->name, sizeof def->name, "kvcomp default (%s %s k%g v%g)",
             init.policy == KVC_POLICY_FIXED ? codec_name(init.codec) : "policy",
             init.bound_mode == KVC_BOUND_RELATIVE ? "rel" : "abs", (double)init.k_bound,
             (double)init.v_bound);
  }
  mr->default_row = first_kvc;
  const char *spec = o->sweep ? o->sweep
                     : o->quick ? "rel:0.05"
                                : "rel:0.01,0.03,0.05,0.08;relkv:0.02/0.08,0.03/0.1,0.04/0.12,0.05/0.15;"
                                  "abs:0.02,0.08;abskv:0.2/0.05,0.3/0.08";
  if (add_sweep(mr, spec) != 0)
    return kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "bad --sweep '%s' (or more than %d rows)",
                           spec, MAX_ROWS);
  for (int i = first_kvc; i < mr->n_rows; i++) {
    if ((st = run_kvc_row(mr, o, &mr->rows[i], NULL, err)) != KVC_OK) return st;
    print_row(&mr->rows[i]);
  }
  return KVC_OK;
}

static void model_run_free(model_run_t *mr) {
  kvc_runner_ppl_free(&mr->ref);
  kvc_runner_ctx_free(&mr->ctx);
  kvc_runner_model_free(&mr->m);
  free(mr->stream);
  free(mr->k_amax);
  free(mr->v_amax);
}

/* ---- output ------------------------------------------------------------------------------ */

static const row_t *best_within(const model_run_t *mr, double max_change) {
  const row_t *best = NULL;
  for (int i = 0; i < mr->n_rows; i++) {
    const row_t *r = &mr->rows[i];
    if (!r->is_kvc || !strcmp(r->family, "exact") || r->change > max_change) continue;
    if (!best || r->bits < best->bits) best = r;
  }
  return best;
}

static void json_row(FILE *f, const row_t *r, const model_run_t *mr) {
  double kivi = kivi_bits_at(mr, r->change);
  fprintf(f, "{\"name\":\"%s\",\"family\":\"%s\",\"ppl\":%.6f,\"ppl_change\":%.6f,\"agreement\":%.6f,"
          "\"bits_per_value\":%.4f", r->name, r->family, r->ppl, r->change, r->agreement, r->bits);
  if (r->is_kvc && strcmp(r->family, "exact"))
    fprintf(f, ",\"codec\":\"%s\",\"bound_mode\":\"%s\",\"k_bound\":%g,\"v_bound\":%g",
            r->cfg.policy == KVC_POLICY_FIXED ? codec_name(r->cfg.codec) : "policy",
            r->cfg.bound_mode == KVC_BOUND_RELATIVE ? "relative" : "absolute", (double)r->cfg.k_bound,
            (double)r->cfg.v_bound);
  if (isfinite(kivi) && strcmp(r->family, "kivi"))
    fprintf(f, ",\"kivi_bits_at_same_change\":%.4f,\"bits_saved_vs_kivi\":%.4f", kivi, 1.0 - r->bits / kivi);
  fputc('}', f);
}

static void write_json(FILE *f, model_run_t *runs, int n, const opts_t *o) {
  fprintf(f, "{\"bench\":\"eval\",\"windows\":%d,\"feed\":\"%s\",\"path\":\"%s\",\"models\":{", o->windows,
          o->feed_name, o->dense_codec ? "dense" : "kvcomp");
  for (int m = 0; m < n; m++) {
    model_run_t *mr = &runs[m];
    fprintf(f, "%s\"%s\":{\"reference_ppl\":%.6f,\"top1_text\":%.6f,\"rows\":[", m ? "," : "", mr->label,
            mr->ref.ppl, mr->ref.n_scored ? mr->rows[0].top1_text : 0.0);
    for (int i = 0; i < mr->n_rows; i++) {
      if (i) fputc(',', f);
      json_row(f, &mr->rows[i], mr);
    }
    fprintf(f, "],\"default\":");
    json_row(f, &mr->rows[mr->default_row], mr);
    const row_t *best = best_within(mr, 0.005);
    if (best) {
      fprintf(f, ",\"best_within_0.5pct\":");
      json_row(f, best, mr);
    }
    fputc('}', f);
  }
  fprintf(f, "}}\n");
}

static void write_markdown(FILE *f, model_run_t *runs, int n, const opts_t *o) {
  fprintf(f, "# kvcomp accuracy/size study (`./kvc eval`)\n\n"
          "Protocol: ../shared/models/README.md — windows of [BOS] + 255 text tokens of "
          "tinystories_val.txt, %d windows, %s feed; a step reads the 64-token blocks completed "
          "by earlier steps compressed and every token it stores itself exact (kvcomp compresses "
          "a block at the plan after the step that fills it). Δ perplexity and top-1 agreement "
          "are against the exact fp32 cache. "
          "Bits/value count every stored byte of the full blocks (page headers, section tables, "
          "scales, codebooks, padding; KIVI: fp16 scale and zero per group). kvcomp rows: %s.\n\n",
          o->windows, o->feed == KVC_RUNNER_FEED_DECODE ? "decode (one token per step)" : o->feed_name,
          o->dense_codec ? "the codec API applied to full blocks of the runner's dense cache"
                         : "the library's CPU backend, fp32, bits from kvc_get_stats page_bytes");
  for (int m = 0; m < n; m++) {
    model_run_t *mr = &runs[m];
    const kvc_runner_shape_t *s = &mr->m.shape;
    fprintf(f, "## %s\n\n%s; dim %d, %d layers, %d query / %d kv heads, head_dim %d, vocab %d. "
            "Exact perplexity %.4f, top-1 accuracy against the text %.4f.\n\n", mr->label,
            mr->m.format, s->dim, s->n_layers, s->n_heads, s->n_kv_heads, s->head_dim, s->vocab_size,
            mr->ref.ppl, mr->rows[0].top1_text);
    fprintf(f, "| setting | perplexity | Δ perplexity | top-1 agreement | bits/value | bits vs KIVI at same Δ |\n"
               "|---|---:|---:|---:|---:|---:|\n");
    for (int i = 0; i < mr->n_rows; i++) {
      const row_t *r = &mr->rows[i];
      double kivi = kivi_bits_at(mr, r->change);
      char vs[32] = "";
      if (r->is_kvc && strcmp(r->family, "exact") && isfinite(kivi))
        snprintf(vs, sizeof vs, "%+.1f%% bits", 100.0 * (r->bits / kivi - 1.0));
      fprintf(f, "| %s%s%s | %.4f | %+.3f%% | %.4f | %.3f | %s |\n", i == mr->default_row ? "**" : "",
              r->name, i == mr->default_row ? "**" : "", r->ppl, 100.0 * r->change, r->agreement,
              r->bits, vs);
    }
    const row_t *d = &mr->rows[mr->default_row];
    double kivi = kivi_bits_at(mr, d->change);
    fprintf(f, "\nDefault: Δ perplexity %+.3f%% at %.3f bits/value", 100.0 * d->change, d->bits);
    if (isfinite(kivi))
      fprintf(f, "; KIVI-style interpolated to the same Δ needs %.3f bits/value, so the default stores "
              "%.1f%% %s bits", kivi, 100.0 * fabs(1.0 - d->bits / kivi), d->bits <= kivi ? "fewer" : "more");
    fprintf(f, ".\n");
    const row_t *best = best_within(mr, 0.005);
    if (best) {
      double kb = kivi_bits_at(mr, best->change);
      fprintf(f, "Smallest kvcomp setting within Δ ≤ 0.5%%: %s, %.3f bits/value, Δ %+.3f%%", best->name,
              best->bits, 100.0 * best->change);
      if (isfinite(kb))
        fprintf(f, " (%.1f%% %s bits than KIVI at that Δ)", 100.0 * fabs(1.0 - best->bits / kb),
                best->bits <= kb ? "fewer" : "more");
      fprintf(f, ".\n");
    }
    fprintf(f, "\n");
  }
}

/* ---- --dump-kv ----------------------------------------------------------------------------- */

static kvc_status_t dump_kv(const opts_t *o, const char *model, const char *tok, const char *text,
                            kvc_runner_err_t *err) {
  kvc_runner_capture_t c;
  FILE *f = NULL;
  kvc_status_t st = kvc_runner_capture_files(model, tok, text, o->windows, 256, &c, err);
  if (st != KVC_OK) goto out;
  const kvc_runner_shape_t *s = &c.shape;
  f = fopen(o->dump_kv, "wb");
  if (!f) {
    st = kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "%s: %s", o->dump_kv, strerror(errno));
    goto out;
  }
  const char *base = strrchr(model, '/');
  base = base ? base + 1 : model;
  /* The codec benchmark's format (bench/NOTES-codec.md); line 1 may carry more after "v1". */
  fprintf(f, "kvcomp-kv-dump v1 model=%.*s windows=%d window_tokens=255 positions=0..254 rope=applied "
          "ppl=%.6f\nlayers %d tokens %lld kv_heads %d head_dim %d\n", (int)strcspn(base, "."), base,
          o->windows, c.ppl, s->n_layers, (long long)c.tokens, s->n_kv_heads, s->head_dim);
  size_t n = (size_t)s->n_layers * (size_t)c.tokens * (size_t)s->n_kv_heads * s->head_dim;
  if (fwrite(c.k, sizeof(float), n, f) != n || fwrite(c.v, sizeof(float), n, f) != n || fclose(f) != 0) {
    f = NULL;
    st = kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "%s: write failed", o->dump_kv);
    goto out;
  }
  f = NULL;
  fprintf(stderr, "wrote %s: %d layers x %lld tokens x %d kv heads x %d, K then V (exact ppl %.4f)\n",
          o->dump_kv, s->n_layers, (long long)c.tokens, s->n_kv_heads, s->head_dim, c.ppl);
out:
  if (f) fclose(f);
  kvc_runner_capture_free(&c);
  return st;
}

/* ---- main ---------------------------------------------------------------------------------- */

int main(int argc, char **argv) {
  opts_t o;
  if (parse_args(argc, argv, &o) != 0) return 2;
  char defm[2][4096], deft[4096];
  const char *tokenizers[MAX_MODELS] = {NULL};
  if (o.n_models == 0) {
    o.models[o.n_models++] = kvc_runner_shared_path("models/stories260K.gguf", defm[0], sizeof defm[0]);
    o.models[o.n_models++] = kvc_runner_shared_path("models/babyllama-tok105.bin", defm[1], sizeof defm[1]);
  }
  tokenizers[0] = o.tokenizer;
  const char *text = o.text ? o.text : kvc_runner_shared_path("data/tinystories_val.txt", deft, sizeof deft);
  kvc_runner_err_t err = {{0}};
  if (o.dump_kv) {
    kvc_status_t st = dump_kv(&o, o.models[0], tokenizers[0], text, &err);
    if (st != KVC_OK) {
      fprintf(stderr, "kvc_eval: %s\n", err.msg);
      return 1;
    }
    return 0;
  }
  model_run_t *runs = calloc((size_t)o.n_models, sizeof *runs);
  if (!runs) {
    fprintf(stderr, "kvc_eval: out of memory\n");
    return 1;
  }
  int rc = 0;
  double t0 = kvc_runner_now();
  for (int m = 0; m < o.n_models && rc == 0; m++) {
    kvc_status_t st = study_model(&runs[m], &o, o.models[m], tokenizers[m], text, &err);
    if (st != KVC_OK) {
      fprintf(stderr, "kvc_eval: %s\n", err.msg);
      rc = 1;
    }
  }
  if (rc == 0) {
    write_markdown(stdout, runs, o.n_models, &o);
    char path[4096];
    if (mkdir(o.out_dir, 0777) != 0 && errno != EEXIST) {
      fprintf(stderr, "kvc_eval: cannot create %s: %s\n", o.out_dir, strerror(errno));
      rc = 1;
    }
    FILE *f = NULL;
    snprintf(path, sizeof path, "%s/EVAL.md", o.out_dir);
    if (rc == 0 && (f = fopen(path, "w"))) {
      write_markdown(f, runs, o.n_models, &o);
      fclose(f);
    }
    snprintf(path, sizeof path, "%s/eval.json", o.out_dir);
    if (rc == 0 && (f = fopen(path, "w"))) {
      write_json(f, runs, o.n_models, &o);
      fclose(f);
    }
    if (rc == 0) {
      /* The plot is optional: python3 with matplotlib may be missing; the tables say it all. */
      char cmd[8192];
      snprintf(cmd, sizeof cmd, "python3 '%s/plot_eval.py' '%s/eval.json' '%s/eval.png' >&2",
               KVC_RUNNER_SOURCE_DIR, o.out_dir, o.out_dir);
      if (system(cmd) != 0)
        fprintf(stderr, "kvc_eval: no plot (needs python3 with matplotlib: pip install matplotlib)\n");
      fprintf(stderr, "kvc_eval: wrote %s/EVAL.md, eval.json, eval.png in %.1fs\n", o.out_dir,
              kvc_runner_now() - t0);
    }
    write_json(stdout, runs, o.n_models, &o);
  }
  for (int m = 0; m < o.n_models; m++) model_run_free(&runs[m]);
  free(runs);
  return rc;
}
