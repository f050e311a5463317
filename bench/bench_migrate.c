/*
 * bench_migrate (`./kvc bench migrate`): moving one sequence between caches, as prefill→decode
 * disaggregation does: kvc_seq_export on the source, the transfer of its image, kvc_seq_import on
 * the destination; against moving the same tokens' K/V as fp16 bytes over the same transport,
 * measured in the same run. With two GPUs the source cache is on GPU 0 and the destination on GPU
 * 1, and the transport is NCCL (ncclSend / ncclRecv; cudaMemcpyPeerAsync in builds without NCCL);
 * with one GPU both caches share it and the transport is a device copy; on the CPU backend, a
 * memcpy. The data are bench_capacity's synthetic K/V (capacity_fill.h), whose Huffman pages
 * measure the target bits per value.
 *
 * Each phase is timed on the host around the call and a wait for its stream, because export and
 * import also wait for the host (the header and index); medians over --reps repetitions after
 * --warmup. Prints a table, then one JSON line (last): {"bench":"migrate",...,"rows":[...]}.
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "capacity_fill.h"
#include "kvcomp.h"
#if KVC_HAVE_NCCL
#include <nccl.h>
#endif

enum { MAX_CONTEXTS = 8, MAX_REPS = 200, CHUNK = 4096 };

typedef struct side {
  int device;
  kvc_cache_t *cache;
  void *stream; /* cudaStream_t, or NULL */
  void *image;
} side_t;

typedef struct options {
  const kvcb_shape_t *shape;
  kvc_backend_t backend;
  int contexts[MAX_CONTEXTS], num_contexts;
  kvc_codec_t codecs[3];
  int num_codecs;
  int warmup, reps;
  double target_bits;
  const char *target_source;
  kvcb_model_bits_t models[4]; /* --check: calibrate at real models' page shapes */
  int num_models;
} options_t;

typedef struct transport {
  const char *name;
#if KVC_HAVE_NCCL
  ncclComm_t comm[2];
#endif
  int nccl;
} transport_t;


static int sync_side(const side_t *s) {
#if KVC_HAVE_CUDA
  if (s->stream)
    return cudaSetDevice(s->device) == cudaSuccess &&
                   cudaStreamSynchronize((cudaStream_t)s->stream) == cudaSuccess
               ? 0
               : -1;
#endif
  (void)s;
  return 0;
}

/* Device memory on the side's device (host memory on the CPU backend). */
static void *side_alloc(const side_t *s, size_t bytes) {
#if KVC_HAVE_CUDA
  if (s->stream) {
    void *p = NULL;
    return cudaSetDevice(s->device) == cudaSuccess && cudaMalloc(&p, bytes) == cudaSuccess ? p
                                                                                          : NULL;
  }
#endif
  return malloc(bytes);
}
static void side_free(const side_t *s, void *p) {
#if KVC_HAVE_CUDA
  if (s->stream) {
    cudaSetDevice(s->device);
    cudaFree(p);
    return;
  }
#endif
  free(p);
}

/* Moves `bytes` from a's buffer to b's, waiting for it. */
static int transfer(const transport_t *t, const side_t *a, const void *src, const side_t *b,
                    void *dst, size_t bytes) {
#if KVC_HAVE_CUDA
  if (a->stream) {
#if KVC_HAVE_NCCL
    if (t->nccl) {
      if (ncclGroupStart() != ncclSuccess) return -1;
      cudaSetDevice(a->device);
      if (ncclSend(src, bytes, ncclUint8, 1, t->comm[0], (cudaStream_t)a->stream) != ncclSuccess)
        return -1;
      cudaSetDevice(b->device);
      if (ncclRecv(dst, bytes, ncclUint8, 0, t->comm[1], (cudaStream_t)b->stream) != ncclSuccess)
        return -1;
      if (ncclGroupEnd() != ncclSuccess) return -1;
      return sync_side(a) || sync_side(b) ? -1 : 0;
    }
#endif
    (void)t;
    cudaSetDevice(b->device);
    if (cudaMemcpyPeerAsync(dst, b->device, src, a->device, bytes, (cudaStream_t)b->stream) !=
        cudaSuccess)
      return -1;
    return sync_side(b);
  }
#endif
  (void)t, (void)a, (void)b;
  memcpy(dst, src, bytes);
  return 0;
}

/* Sequence 1 of `context` tokens in a's cache, stored from the bank in chunks. */
static kvc_status_t fill(const side_t *a, const kvc_config_t *cfg, const kvcb_bank_t *bank,
                         int context, kvcb_rng_t *rng) {
  kvc_seq_id_t id = 1;
  int cached = 0;
  kvc_status_t st = kvc_seq_add(a->cache, id, NULL, 0, 0, &cached);
  if (st == KVC_OK) st = kvc_seq_reserve(a->cache, id, context, 0);
  for (int at = 0; st == KVC_OK && at < context; at += CHUNK) {
    int32_t n = context - at < CHUNK ? context - at : CHUNK;
    kvc_batch_t b = {1, &id, &n, NULL};
    st = kvc_plan(a->cache, &b, a->stream);
    if (st == KVC_OK) st = kvcb_store_all_layers(a->cache, cfg, bank, n, rng, a->stream);
  }
  return st == KVC_OK ? kvc_cache_synchronize(a->cache) : st;
}

typedef struct row {
  kvc_codec_t codec;
  int context;
  size_t image_bytes, fp16_bytes;
  double export_ms, transfer_ms, import_ms, total_ms, fp16_ms;
  kvc_status_t status;
} row_t;

static row_t run_row(const options_t *o, side_t *a, side_t *b, const transport_t *t,
                     kvc_codec_t codec, int context, const kvcb_bank_t *bank) {
  row_t r = {codec, context, 0, 0, 0, 0, 0, 0, 0, KVC_OK};
  const kvcb_shape_t *sh = o->shape;
  kvc_config_t cfg = kvcb_config(sh, sh->num_layers, o->backend,
                                 (size_t)context * (size_t)sh->num_layers *
                                         (size_t)kvcb_values_per_token_layer(sh) * 2 +
                                     ((size_t)256 << 20),
                                 codec, 4, context, CHUNK);
  r.fp16_bytes = (size_t)context * (size_t)sh->num_layers *
                 (size_t)kvcb_values_per_token_layer(sh) * 2;
  double ex[MAX_REPS], tr[MAX_REPS], im[MAX_REPS], tot[MAX_REPS], fp[MAX_REPS];
  void *fa = NULL, *fb = NULL;
  kvcb_rng_t rng;
  kvcb_rng_seed(&rng, 7);
  cfg.device = a->device;
  r.status = kvc_cache_create(&cfg, &a->cache);
  cfg.device = b->device;
  if (r.status == KVC_OK) r.status = kvc_cache_create(&cfg, &b->cache);
  if (r.status == KVC_OK) r.status = fill(a, &cfg, bank, context, &rng);
  if (r.status == KVC_OK) r.status = kvc_seq_export_bytes(a->cache, 1, &r.image_bytes, a->stream);
  if (r.status == KVC_OK) {
    a->image = side_alloc(a, r.image_bytes);
    b->image = side_alloc(b, r.image_bytes);
    fa = side_alloc(a, r.fp16_bytes);
    fb = side_alloc(b, r.fp16_bytes);
    if (!a->image || !b->image || !fa || !fb) r.status = KVC_ERR_OUT_OF_MEMORY;
  }
  for (int i = 0; r.status == KVC_OK && i < o->warmup + o->reps; i++) {
    const double t0 = kvcb_now();
    r.status = kvc_seq_export(a->cache, 1, a->image, r.image_bytes, a->stream);
    if (r.status == KVC_OK && sync_side(a)) r.status = KVC_ERR_CUDA;
    const double t1 = kvcb_now();
    if (r.status == KVC_OK && transfer(t, a, a->image, b, b->image, r.image_bytes))
      r.status = KVC_ERR_NCCL;
    const double t2 = kvcb_now();
    if (r.status == KVC_OK)
      r.status = kvc_seq_import(b->cache, 1, b->image, r.image_bytes, b->stream);
    if (r.status == KVC_OK && sync_side(b)) r.status = KVC_ERR_CUDA;
    const double t3 = kvcb_now();
    if (r.status == KVC_OK && transfer(t, a, fa, b, fb, r.fp16_bytes)) r.status = KVC_ERR_NCCL;
    const double t4 = kvcb_now();
    if (r.status == KVC_OK) r.status = kvc_seq_free(b->cache, 1);
    if (r.status == KVC_OK && i >= o->warmup) {
      const int k = i - o->warmup;
      ex[k] = 1e3 * (t1 - t0), tr[k] = 1e3 * (t2 - t1), im[k] = 1e3 * (t3 - t2);
      tot[k] = 1e3 * (t3 - t0), fp[k] = 1e3 * (t4 - t3);
    }
  }
  if (r.status == KVC_OK) {
    r.export_ms = kvcb_median(ex, o->reps), r.transfer_ms = kvcb_median(tr, o->reps);
    r.import_ms = kvcb_median(im, o->reps), r.total_ms = kvcb_median(tot, o->reps);
    r.fp16_ms = kvcb_median(fp, o->reps);
  }
  side_free(a, a->image), side_free(b, b->image), side_free(a, fa), side_free(b, fb);
  a->image = b->image = NULL;
  kvc_cache_destroy(a->cache);
  kvc_cache_destroy(b->cache);
  a->cache = b->cache = NULL;
  return r;
}

static int parse_list(const char *s, int *out, int cap) {
  int n = 0;
  for (const char *p = s; *p && n < cap;) {
    char *end;
    long v = strtol(p, &end, 10);
    if (end == p || v < 1) return -1;
    if (*end == 'k') v *= 1024, end++;
    out[n++] = (int)v;
    p = *end == ',' ? end + 1 : end;
    if (*end && *end != ',') return -1;
  }
  return n;
}

int main(int argc, char **argv) {
  options_t o;
  memset(&o, 0, sizeof o);
  o.shape = kvcb_find_shape("llama3-8b");
  o.contexts[0] = 4096, o.contexts[1] = 32768, o.num_contexts = 2;
  o.codecs[0] = KVC_CODEC_HUFFMAN, o.codecs[1] = KVC_CODEC_BITPACK, o.codecs[2] = KVC_CODEC_RAW;
  o.num_codecs = 3;
  o.warmup = 2, o.reps = 9;
  o.target_bits = KVCB_DEFAULT_TARGET_BITS, o.target_source = KVCB_DEFAULT_TARGET_SOURCE;
  const char *backend = "auto";
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (strcmp(a, "--shape") == 0 && v && kvcb_find_shape(v)) o.shape = kvcb_find_shape(v), i++;
    else if (strcmp(a, "--backend") == 0 && v) backend = v, i++;
    else if (strcmp(a, "--contexts") == 0 && v) {
      o.num_contexts = parse_list(v, o.contexts, MAX_CONTEXTS);
      if (o.num_contexts < 1) return fprintf(stderr, "bench_migrate: bad --contexts\n"), 2;
      i++;
    } else if (strcmp(a, "--reps") == 0 && v) o.reps = atoi(v), i++;
    else if (strcmp(a, "--warmup") == 0 && v) o.warmup = atoi(v), i++;
    else if (strcmp(a, "--target-bits") == 0 && v) o.target_bits = atof(v), i++;
    else if (strcmp(a, "--target-source") == 0 && v) o.target_source = v, i++;
    else if (strcmp(a, "--check") == 0 && v && o.num_models < 4 &&
             kvcb_parse_model_bits(v, &o.models[o.num_models]) == 0)
      o.num_models++, i++;
    else {
      fprintf(stderr,
              "usage: bench_migrate [--shape llama3-8b|llama3-70b-tp8] [--backend cpu|cuda|auto] "
              "[--contexts 4k,32k] [--reps N] [--warmup N] [--target-bits B] "
              "[--check NAME:KV_HEADS:HEAD_DIM:BITS]... (data as bench_capacity's)\n");
      return 2;
    }
  }
  if (o.reps < 1 || o.reps > MAX_REPS || o.warmup < 0) return fprintf(stderr, "bad --reps\n"), 2;
  if (kvcb_parse_backend("bench_migrate", backend, &o.backend) != 0) return 2;
  side_t a = {0, NULL, NULL, NULL}, b = {0, NULL, NULL, NULL};
  transport_t t;
  memset(&t, 0, sizeof t);
  t.name = "memcpy";
#if KVC_HAVE_CUDA
  if (o.backend == KVC_BACKEND_CUDA) {
    int devices = 0;
    cudaGetDeviceCount(&devices);
    b.device = devices > 1 ? 1 : 0;
    cudaSetDevice(a.device);
    cudaStreamCreate((cudaStream_t *)&a.stream);
    cudaSetDevice(b.device);
    cudaStreamCreate((cudaStream_t *)&b.stream);
    t.name = b.device ? "cudaMemcpyPeerAsync, GPU 0 to GPU 1" : "device copy, one GPU";
#if KVC_HAVE_NCCL
    int devs[2] = {0, 1};
    if (b.device == 1 && ncclCommInitAll(t.comm, 2, devs) == ncclSuccess)
      t.nccl = 1, t.name = "ncclSend / ncclRecv, GPU 0 to GPU 1";
#endif
  }
#endif
  if (o.backend == KVC_BACKEND_CPU && o.num_contexts == 2 && o.contexts[1] == 32768)
    o.num_contexts = 1; /* the CPU run: 4k only by default */
  kvcb_data_t data;
  double measured = 0;
  if (o.num_models > 0
          ? kvcb_calibrate_models(o.shape, o.models, o.num_models, 11, &data, &measured) < 0
          : kvcb_calibrate(o.shape, o.target_bits, 11, &data, &measured) != 0)
    return fprintf(stderr, "bench_migrate: calibration failed\n"), 1;
  kvcb_bank_t bank;
  if (kvcb_bank_make(&bank, o.shape, 2 * CHUNK, data, 3) != 0) return 1;
#if KVC_HAVE_CUDA
  if (o.backend == KVC_BACKEND_CUDA) {
    cudaSetDevice(a.device);
    if (kvcb_bank_upload(&bank) != 0) return fprintf(stderr, "bench_migrate: upload\n"), 1;
  }
#endif
  printf("bench_migrate: %s (%d layers, %d kv heads, head_dim %d), %s backend, transport: %s\n",
         o.shape->description, o.shape->num_layers, o.shape->num_kv_heads, o.shape->head_dim,
         o.backend == KVC_BACKEND_CUDA ? "cuda" : "cpu", t.name);
  printf("data: Huffman pages at %.3f bits/value (%s %.3f: %s); medians of %d after %d\n",
         measured, o.num_models ? "calibrated at the real models' page shapes to" : "target",
         o.target_bits, o.target_source, o.reps, o.warmup);
  printf("%-8s %7s %11s %11s %9s %9s %9s %9s %9s %8s\n", "codec", "context", "image MB",
         "fp16 MB", "export", "transfer", "import", "total ms", "fp16 ms", "x fp16");
  row_t rows[3 * MAX_CONTEXTS];
  int nr = 0, failed = 0;
  for (int ci = 0; ci < o.num_contexts; ci++)
    for (int k = 0; k < o.num_codecs; k++) {
      row_t r = run_row(&o, &a, &b, &t, o.codecs[k], o.contexts[ci], &bank);
      rows[nr++] = r;
      kvcb_label_t lab = kvcb_context_label(r.context);
      if (r.status != KVC_OK) {
        printf("%-8s %7s failed: %s\n", kvcb_codec_name(r.codec), lab.s,
               kvc_status_string(r.status));
        failed = 1;
        continue;
      }
      printf("%-8s %7s %11.1f %11.1f %9.3f %9.3f %9.3f %9.3f %9.3f %8.2f\n",
             kvcb_codec_name(r.codec), lab.s, r.image_bytes / 1e6, r.fp16_bytes / 1e6,
             r.export_ms, r.transfer_ms, r.import_ms, r.total_ms, r.fp16_ms,
             r.fp16_ms / r.total_ms);
    }
  printf("{\"bench\":\"migrate\",\"shape\":\"%s\",\"backend\":\"%s\",\"transport\":\"%s\","
         "\"bits_per_value\":%.4f,\"reps\":%d,\"rows\":[",
         o.shape->name, o.backend == KVC_BACKEND_CUDA ? "cuda" : "cpu", t.name, measured, o.reps);
  for (int i = 0, first = 1; i < nr; i++) {
    const row_t *r = &rows[i];
    if (r->status != KVC_OK) continue;
    printf("%s{\"codec\":\"%s\",\"context\":%d,\"image_bytes\":%zu,\"fp16_bytes\":%zu,"
           "\"export_ms\":%.4f,\"transfer_ms\":%.4f,\"import_ms\":%.4f,\"total_ms\":%.4f,"
           "\"fp16_transfer_ms\":%.4f,\"speedup_vs_fp16_transfer\":%.3f}",
           first ? "" : ",", kvcb_codec_name(r->codec), r->context, r->image_bytes,
           r->fp16_bytes, r->export_ms, r->transfer_ms, r->import_ms, r->total_ms, r->fp16_ms,
           r->fp16_ms / r->total_ms);
    first = 0;
  }
  printf("]}\n");
  kvcb_bank_free(&bank);
#if KVC_HAVE_NCCL
  if (t.nccl) ncclCommDestroy(t.comm[0]), ncclCommDestroy(t.comm[1]);
#endif
  return failed;
}
