/*
 * The model runner (bench/runner/) against the facts in ../shared/models/README.md, through the
 * kvcomp cache and against its own exact dense cache:
 *   - stories260K greedy from BOS starts with the documented sample;
 *   - the reference protocol's perplexity over 20 windows is 4.0836 within 0.1% through kvcomp's
 *     raw fp32 cache, and kvcomp (raw, prefill feed) equals the dense path on a few windows;
 *   - the default codec keeps perplexity and top-1 agreement close while storing far fewer bytes;
 *   - babyllama (llama2.c checkpoint + tokenizer.bin) runs identically on both paths;
 *   - bad input: crafted GGUF / llama2.c / tokenizer files (truncated, corrupt, unknown tensor
 *     type, tokenizer/model mismatch, non-finite weights) and prompts longer than the context give
 *     a status and a message, never a crash.
 * Tiny models written by the test itself cover the loaders and both KV paths without the shared
 * models; the real-model tests skip when the models are missing unless KVC_REQUIRE_MODELS=1.
 */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "kvc_test_util.h"
#include "runner_eval.h"

/* ---- helpers ------------------------------------------------------------------------------- */

/* Sanitized Debug builds run the model ~30x slower: they check the same properties on fewer
 * windows (the normal build checks the README's 20-window figure). */
#if defined(__SANITIZE_ADDRESS__)
#define KVC_RUNNER_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(undefined_behavior_sanitizer)
#define KVC_RUNNER_SANITIZED 1
#endif
#endif
#ifndef KVC_RUNNER_SANITIZED
#define KVC_RUNNER_SANITIZED 0
#endif

static int windows(int n) {
  int w = KVC_RUNNER_SANITIZED ? (n + 4) / 5 : n;
  w = (int)(w * kvc_test_scale());
  return w < 1 ? 1 : w;
}

static char g_dir[64]; /* the test's temporary directory */

static const char *tmp_path(const char *name, char *buf, size_t cap) {
  snprintf(buf, cap, "%s/%s", g_dir, name);
  return buf;
}

static void write_file(const char *path, const void *data, size_t n) {
  FILE *f = fopen(path, "wb");
  assert_non_null(f);
  assert_int_equal(fwrite(data, 1, n, f), n);
  assert_int_equal(fclose(f), 0);
}

/* A growable byte buffer for writing model files. */
typedef struct buf {
  unsigned char *p;
  size_t n, cap;
} buf_t;

static void put(buf_t *b, const void *src, size_t n) {
  if (b->n + n > b->cap) {
    b->cap = (b->n + n) * 2 + 256;
    b->p = realloc(b->p, b->cap);
    assert_non_null(b->p);
  }
  memcpy(b->p + b->n, src, n);
  b->n += n;
}
static void put_u32(buf_t *b, uint32_t x) { put(b, &x, 4); }
static void put_u64(buf_t *b, uint64_t x) { put(b, &x, 8); }
static void put_f32(buf_t *b, float x) { put(b, &x, 4); }
static void put_str(buf_t *b, const char *s) {
  put_u64(b, strlen(s));
  put(b, s, strlen(s));
}

/* Loads a real model, or says why not: NULL means skip (or fail when models are required). */
static kvc_runner_model_t *load_shared(const char *rel, const char *tok_rel) {
  char mp[4096], tp[4096];
  const char *m = kvc_test_shared_path(rel, mp, sizeof mp);
  const char *t = tok_rel ? kvc_test_shared_path(tok_rel, tp, sizeof tp) : NULL;
  if (!m || (tok_rel && !t)) {
    if (kvc_test_require_models()) fail_msg("%s missing and KVC_REQUIRE_MODELS=1", rel);
    return NULL;
  }
  kvc_runner_model_t *model = calloc(1, sizeof *model);
  assert_non_null(model);
  kvc_runner_err_t err;
  kvc_status_t st = kvc_runner_model_load(model, m, t, &err);
  if (st != KVC_OK) fail_msg("loading %s: %s", m, err.msg);
  return model;
}

static void free_model(kvc_runner_model_t *m) {
  kvc_runner_model_free(m);
  free(m);
}

static kvc_runner_kv_t *make_kvcomp(const kvc_runner_model_t *m, kvc_codec_t codec, int use_defaults) {
  kvc_config_t c = KVC_CONFIG_INIT;
  c.dtype = KVC_DTYPE_F32;
  c.pool_bytes = (size_t)64 << 20;
  c.prefix_caching = 0;
  if (!use_defaults) {
    c.policy = KVC_POLICY_FIXED;
    c.codec = codec;
  }
  kvc_runner_kv_t *kv = NULL;
  kvc_runner_err_t err;
  kvc_status_t st = kvc_runner_kv_kvcomp(&m->shape, &c, &kv, &err);
  if (st != KVC_OK) fail_msg("%s", err.msg);
  return kv;
}

static kvc_runner_kv_t *make_dense(const kvc_runner_model_t *m) {
  kvc_runner_kv_t *kv = NULL;
  kvc_runner_err_t err;
  assert_int_equal(kvc_runner_kv_dense(&m->shape, NULL, &kv, &err), KVC_OK);
  return kv;
}

static kvc_runner_ppl_t perplexity(const kvc_runner_model_t *m, kvc_runner_kv_t *kv, int windows,
                                   kvc_runner_feed_t feed) {
  char tp[4096];
  const char *text = kvc_test_shared_path("data/tinystories_val.txt", tp, sizeof tp);
  if (!text) {
    if (kvc_test_require_models()) fail_msg("data/tinystories_val.txt missing and KVC_REQUIRE_MODELS=1");
    skip();
  }
  int32_t *stream = NULL;
  int n = 0;
  kvc_runner_err_t err;
  kvc_status_t st = kvc_runner_text_stream(&m->vocab, text, windows * 255, &stream, &n, &err);
  if (st != KVC_OK) fail_msg("%s", err.msg);
  kvc_runner_ctx_t ctx;
  assert_int_equal(kvc_runner_ctx_init(&ctx, m, windows * 255, &err), KVC_OK);
  kvc_runner_ppl_opts_t o = {windows, 256, feed, 0};
  kvc_runner_ppl_t r;
  st = kvc_runner_perplexity(&ctx, kv, stream, n, &o, &r, &err);
  if (st != KVC_OK) fail_msg("%s: %s", kv->name, err.msg);
  kvc_runner_ctx_free(&ctx);
  free(stream);
  return r;
}

/* ---- real models --------------------------------------------------------------------------- */

static void stories_greedy_sample(void **state) {
  (void)state;
  kvc_runner_model_t *m = load_shared("models/stories260K.gguf", NULL);
  if (!m) skip();
  const char *want = "Once upon a time, there was a little girl named Lily. She loved to play outside "
                     "in the park.";
  kvc_runner_ctx_t ctx;
  kvc_runner_err_t err;
  assert_int_equal(kvc_runner_ctx_init(&ctx, m, 8, &err), KVC_OK);
  int32_t bos = m->vocab.bos, out[2][40];
  for (int path = 0; path < 2; path++) {
    kvc_runner_kv_t *kv = path ? make_kvcomp(m, KVC_CODEC_RAW, 0) : make_dense(m);
    assert_int_equal(kvc_runner_greedy(&ctx, kv, 5, &bos, 1, 40, out[path], &err), KVC_OK);
    char text[1024] = "", piece[64];
    int prev = bos;
    for (int i = 0; i < 40; i++) {
      kvc_runner_decode(&m->vocab, prev, out[path][i], piece, sizeof piece);
      strncat(text, piece, sizeof text - strlen(text) - 1);
      prev = out[path][i];
    }
    if (strncmp(text, want, strlen(want)) != 0) fail_msg("%s greedy: '%s'", kv->name, text);
    kvc_runner_kv_destroy(kv);
  }
  assert_memory_equal(out[0], out[1], sizeof out[0]);
  kvc_runner_ctx_free(&ctx);
  free_model(m);
}

static void stories_reference_perplexity(void **state) {
  (void)state;
  kvc_runner_model_t *m = load_shared("models/stories260K.gguf", NULL);
  if (!m) skip();
  /* README: 20 windows, 4.0836; within 0.1% through kvcomp's exact (raw fp32) cache. */
  if (!KVC_RUNNER_SANITIZED) {
    kvc_runner_kv_t *kv = make_kvcomp(m, KVC_CODEC_RAW, 0);
    kvc_runner_ppl_t r = perplexity(m, kv, 20, KVC_RUNNER_FEED_DECODE);
    if (fabs(r.ppl / 4.0836 - 1.0) > 1e-3) fail_msg("20-window perplexity %.5f, want 4.0836", r.ppl);
    assert_int_equal(r.n_scored, 20 * 255);
    kvc_runner_ppl_free(&r);
    kvc_runner_kv_destroy(kv);
  }

  /* A prefill of whole windows through kvcomp equals the exact dense cache. */
  kvc_runner_kv_t *dense = make_dense(m), *raw = make_kvcomp(m, KVC_CODEC_RAW, 0);
  kvc_runner_ppl_t a = perplexity(m, dense, windows(6), KVC_RUNNER_FEED_PREFILL);
  kvc_runner_ppl_t b = perplexity(m, raw, windows(6), KVC_RUNNER_FEED_PREFILL);
  if (fabs(a.ppl / b.ppl - 1.0) > 1e-5) fail_msg("dense %.6f vs kvcomp raw %.6f", a.ppl, b.ppl);
  assert_true(kvc_runner_agreement(a.argmax, b.argmax, a.n_scored) > 0.999);
  kvc_runner_ppl_free(&a);
  kvc_runner_ppl_free(&b);
  kvc_runner_kv_destroy(dense);
  kvc_runner_kv_destroy(raw);
  free_model(m);
}

static void stories_default_codec_keeps_quality(void **state) {
  (void)state;
  kvc_runner_model_t *m = load_shared("models/stories260K.gguf", NULL);
  if (!m) skip();
  kvc_runner_kv_t *raw = make_kvcomp(m, KVC_CODEC_RAW, 0), *def = make_kvcomp(m, KVC_CODEC_RAW, 1);
  kvc_runner_ppl_t a = perplexity(m, raw, windows(6), KVC_RUNNER_FEED_DECODE);
  kvc_runner_ppl_t b = perplexity(m, def, windows(6), KVC_RUNNER_FEED_DECODE);
  double change = b.ppl / a.ppl - 1.0, agree = kvc_runner_agreement(a.argmax, b.argmax, a.n_scored);
  double raw_bytes = (double)b.full_blocks * 64 * 2 * m->shape.n_kv_heads * m->shape.head_dim * 4;
  /* The default setting is lossy (pages well under a third of fp32) yet close to exact. */
  if (fabs(change) > 0.02 || agree < 0.9 || !(b.page_bytes > 0) || b.page_bytes > raw_bytes / 3)
    fail_msg("default codec: ppl %.5f vs %.5f (%+.3f%%), agreement %.4f, %.0f page bytes for %.0f "
             "raw", b.ppl, a.ppl, 100 * change, agree, b.page_bytes, raw_bytes);
  assert_true(a.page_bytes >= raw_bytes); /* raw pages hold every fp32 value, plus headers */
  kvc_runner_ppl_free(&a);
  kvc_runner_ppl_free(&b);
  kvc_runner_kv_destroy(raw);
  kvc_runner_kv_destroy(def);
  free_model(m);
}

static void babyllama_both_paths(void **state) {
  (void)state;
  kvc_runner_model_t *m = load_shared("models/babyllama-tok105.bin", "models/babyllama-tok105.tokenizer.bin");
  if (!m) skip();
  assert_int_equal(m->shape.head_dim, 16);
  assert_int_equal(m->vocab.size, 105);
  assert_int_equal(m->vocab.byte_base, -1);
  kvc_runner_kv_t *dense = make_dense(m), *raw = make_kvcomp(m, KVC_CODEC_RAW, 0);
  kvc_runner_ppl_t a = perplexity(m, dense, windows(3), KVC_RUNNER_FEED_DECODE);
  kvc_runner_ppl_t b = perplexity(m, raw, windows(3), KVC_RUNNER_FEED_DECODE);
  if (fabs(a.ppl / b.ppl - 1.0) > 1e-5 || a.ppl > 3.0)
    fail_msg("babyllama dense %.6f vs kvcomp %.6f (a character model should be below 3)", a.ppl, b.ppl);
  kvc_runner_ppl_free(&a);
  kvc_runner_ppl_free(&b);
  kvc_runner_kv_destroy(dense);
  kvc_runner_kv_destroy(raw);
  free_model(m);
}

static void stories_tokenizer(void **state) {
  (void)state;
  kvc_runner_model_t *m = load_shared("models/stories260K.gguf", NULL);
  if (!m) skip();
  const kvc_runner_vocab_t *v = &m->vocab;
  assert_int_equal(v->byte_base, 3);
  /* Characters without a piece fall back to bytes + 3; decoding gives the text back. */
  const char *text = "Once upon a time, Zoë saw 你 and a \xF0\x9F\x90\xB1.";
  int32_t toks[256];
  int n = 0;
  kvc_runner_err_t err;
  assert_int_equal(kvc_runner_encode(v, text, 1, toks, 256, &n, &err), KVC_OK);
  assert_int_equal(toks[0], v->bos);
  int bytes = 0;
  for (int i = 0; i < n; i++) bytes += toks[i] >= 3 && toks[i] < 259;
  assert_true(bytes >= 3 + 4); /* 你 (3 bytes) and the cat (4 bytes) at least */
  char out[512] = "", piece[64];
  for (int i = 1; i < n; i++) {
    kvc_runner_decode(v, toks[i - 1], toks[i], piece, sizeof piece);
    strncat(out, piece, sizeof out - strlen(out) - 1);
  }
  assert_string_equal(out, text);
  /* Too small an output: a status and the count needed. */
  assert_int_equal(kvc_runner_encode(v, text, 1, toks, 3, &n, &err), KVC_ERR_INVALID_ARGUMENT);
  assert_true(n > 3);
  free_model(m);
}

/* ---- crafted files -------------------------------------------------------------------------- */

/* The tiny model: dim 16, hidden 32, 1 layer, 2 query heads, 1 kv head (head_dim 8), vocab 8,
 * context 64. */
enum { T_DIM = 16, T_HID = 32, T_HEADS = 2, T_KV = 1, T_HD = 8, T_VOCAB = 8, T_CTX = 64 };
/* SentencePiece pieces: U+2581 (E2 96 81) stands for a space. */
static const char *T_PIECES[T_VOCAB] = {"<unk>", "<s>", "</s>", "\xE2\x96\x81", "a", "b",
                                        "\xE2\x96\x81\x61" /* "▁a" */, "ab"};

typedef struct gguf_knobs {
  uint32_t version;
  uint32_t q_type;       /* ggml type of blk.0.attn_q.weight */
  int n_tokens;          /* tokenizer entries */
  uint64_t k_rows;       /* attn_k's second dimension */
  int omit_ffn_up;
  int nan_weight;
  int huge_string;       /* a metadata string whose length runs past the file */
  size_t truncate;       /* keep this many bytes (0: all) */
} gguf_knobs_t;

static gguf_knobs_t good_gguf(void) {
  gguf_knobs_t k = {3, 0, T_VOCAB, T_KV * T_HD, 0, 0, 0, 0};
  return k;
}

static void kv_u32(buf_t *b, const char *key, uint32_t v) {
  put_str(b, key);
  put_u32(b, 4);
  put_u32(b, v);
}

static void write_gguf(const char *path, const gguf_knobs_t *k) {
  struct { const char *name; uint64_t d0, d1; } t[] = {
      {"token_embd.weight", T_DIM, T_VOCAB},   {"output_norm.weight", T_DIM, 0},
      {"blk.0.attn_norm.weight", T_DIM, 0},    {"blk.0.attn_q.weight", T_DIM, T_HEADS * T_HD},
      {"blk.0.attn_k.weight", T_DIM, k->k_rows}, {"blk.0.attn_v.weight", T_DIM, T_KV * T_HD},
      {"blk.0.attn_output.weight", T_HEADS * T_HD, T_DIM}, {"blk.0.ffn_norm.weight", T_DIM, 0},
      {"blk.0.ffn_gate.weight", T_DIM, T_HID}, {"blk.0.ffn_down.weight", T_HID, T_DIM},
      {"blk.0.ffn_up.weight", T_DIM, T_HID}};
  int nt = (int)(sizeof t / sizeof t[0]) - (k->omit_ffn_up ? 1 : 0);
  buf_t b = {0};
  put(&b, "GGUF", 4);
  put_u32(&b, k->version);
  put_u64(&b, (uint64_t)nt);
  put_u64(&b, 13);
  put_str(&b, "general.architecture");
  put_u32(&b, 8);
  if (k->huge_string) put_u64(&b, 1ull << 40);
  else put_str(&b, "llama");
  kv_u32(&b, "llama.context_length", T_CTX);
  kv_u32(&b, "llama.embedding_length", T_DIM);
  kv_u32(&b, "llama.feed_forward_length", T_HID);
  kv_u32(&b, "llama.block_count", 1);
  kv_u32(&b, "llama.attention.head_count", T_HEADS);
  kv_u32(&b, "llama.attention.head_count_kv", T_KV);
  put_str(&b, "llama.attention.layer_norm_rms_epsilon");
  put_u32(&b, 6);
  put_f32(&b, 1e-5f);
  put_str(&b, "tokenizer.ggml.model");
  put_u32(&b, 8);
  put_str(&b, "llama");
  put_str(&b, "tokenizer.ggml.tokens");
  put_u32(&b, 9);
  put_u32(&b, 8);
  put_u64(&b, (uint64_t)k->n_tokens);
  for (int i = 0; i < k->n_tokens; i++) put_str(&b, T_PIECES[i % T_VOCAB]);
  put_str(&b, "tokenizer.ggml.scores");
  put_u32(&b, 9);
  put_u32(&b, 6);
  put_u64(&b, (uint64_t)k->n_tokens);
  for (int i = 0; i < k->n_tokens; i++) put_f32(&b, i >= 6 ? (float)(-i) : 0.0f);
  kv_u32(&b, "tokenizer.ggml.bos_token_id", 1);
  kv_u32(&b, "tokenizer.ggml.eos_token_id", 2);
  uint64_t off = 0;
  for (int i = 0; i < nt; i++) {
    put_str(&b, t[i].name);
    put_u32(&b, t[i].d1 ? 2 : 1);
    put_u64(&b, t[i].d0);
    if (t[i].d1) put_u64(&b, t[i].d1);
    put_u32(&b, i == 3 ? k->q_type : 0);
    put_u64(&b, off);
    off += (t[i].d0 * (t[i].d1 ? t[i].d1 : 1) * 4 + 31) / 32 * 32;
  }
  while (b.n % 32) put(&b, "", 1);
  kvc_test_rng_t rng;
  kvc_test_rng_seed(&rng, 7);
  for (int i = 0; i < nt; i++) {
    uint64_t n = t[i].d0 * (t[i].d1 ? t[i].d1 : 1);
    for (uint64_t e = 0; e < n; e++) {
      float w = t[i].d1 ? (float)(0.3 * kvc_test_rng_normal(&rng)) : 1.0f;
      if (k->nan_weight && i == 6 && e == 5) w = NAN;
      put_f32(&b, w);
    }
    while (b.n % 32) put(&b, "", 1);
  }
  write_file(path, b.p, k->truncate ? k->truncate : b.n);
  free(b.p);
}

/* llama2.c checkpoint of the same shape (shared classifier), and its tokenizer.bin. */
static size_t write_llama2c(const char *path, size_t truncate_by) {
  int32_t h[7] = {T_DIM, T_HID, 1, T_HEADS, T_KV, T_VOCAB, T_CTX};
  size_t nw = T_VOCAB * T_DIM + T_DIM + T_DIM * T_DIM + 2 * T_DIM * T_KV * T_HD + T_DIM * T_DIM +
              T_DIM + 3 * T_DIM * T_HID + T_DIM + T_CTX * T_HD;
  buf_t b = {0};
  put(&b, h, sizeof h);
  kvc_test_rng_t rng;
  kvc_test_rng_seed(&rng, 11);
  for (size_t i = 0; i < nw; i++) put_f32(&b, (float)(0.3 * kvc_test_rng_normal(&rng)));
  write_file(path, b.p, b.n - truncate_by);
  size_t n = b.n;
  free(b.p);
  return n;
}

static void write_tokenizer_bin(const char *path, int n_tokens, size_t truncate_by) {
  buf_t b = {0};
  put_u32(&b, 8);
  for (int i = 0; i < n_tokens; i++) {
    const char *p = i == 3 ? " " : i == 6 ? " a" : T_PIECES[i % T_VOCAB];
    put_f32(&b, i >= 6 ? (float)(-i) : 0.0f);
    put_u32(&b, (uint32_t)strlen(p));
    put(&b, p, strlen(p));
  }
  write_file(path, b.p, b.n - truncate_by);
  free(b.p);
}

static kvc_status_t try_load(const char *model, const char *tok, kvc_runner_err_t *err) {
  kvc_runner_model_t m;
  kvc_status_t st = kvc_runner_model_load(&m, model, tok, err);
  if (st == KVC_OK) kvc_runner_model_free(&m);
  else assert_true(strlen(err->msg) > 0);
  return st;
}

static void expect_failure(const char *model, const char *tok, kvc_status_t want, const char *words) {
  kvc_runner_err_t err = {{0}};
  kvc_status_t st = try_load(model, tok, &err);
  if (st != want || !strstr(err.msg, words))
    fail_msg("%s: got %s '%s', want %s mentioning '%s'", model, kvc_status_string(st), err.msg,
             kvc_status_string(want), words);
}

static void tiny_models_run_on_both_paths(void **state) {
  (void)state;
  char gp[128], lp[128], tp[128];
  gguf_knobs_t k = good_gguf();
  write_gguf(tmp_path("tiny.gguf", gp, sizeof gp), &k);
  write_llama2c(tmp_path("tiny.bin", lp, sizeof lp), 0);
  write_tokenizer_bin(tmp_path("tiny.tokenizer.bin", tp, sizeof tp), T_VOCAB, 0);
  for (int f = 0; f < 2; f++) {
    kvc_runner_model_t m;
    kvc_runner_err_t err;
    /* The llama2.c checkpoint finds tiny.tokenizer.bin beside itself. */
    if (kvc_runner_model_load(&m, f ? lp : gp, NULL, &err) != KVC_OK) fail_msg("%s", err.msg);
    assert_int_equal(m.shape.head_dim, T_HD);
    assert_int_equal(m.shape.max_seq_len, T_CTX);
    assert_int_equal(m.vocab.size, T_VOCAB);
    /* " ab a" -> " a" "b" " a"? merges: " a"(-6) beats "ab"(-7): [" a", "b", " a"]. */
    int32_t toks[16];
    int n = 0;
    assert_int_equal(kvc_runner_encode(&m.vocab, "ab a", 0, toks, 16, &n, &err), KVC_OK);
    assert_int_equal(n, 3);
    assert_int_equal(toks[0], 6);
    assert_int_equal(toks[1], 5);
    assert_int_equal(toks[2], 6);
    kvc_runner_ctx_t ctx;
    assert_int_equal(kvc_runner_ctx_init(&ctx, &m, 64, &err), KVC_OK);
    int32_t prompt[20], out[2][30];
    for (int i = 0; i < 20; i++) prompt[i] = i == 0 ? 1 : 3 + i % 5;
    for (int path = 0; path < 2; path++) {
      kvc_runner_kv_t *kv = path ? make_kvcomp(&m, KVC_CODEC_RAW, 0) : make_dense(&m);
      if (kvc_runner_greedy(&ctx, kv, 1, prompt, 20, 30, out[path], &err) != KVC_OK)
        fail_msg("%s", err.msg);
      /* Past the context: refused with a message, nothing run. */
      assert_int_equal(kvc_runner_greedy(&ctx, kv, 2, prompt, 20, T_CTX, out[path], &err),
                       KVC_ERR_INVALID_ARGUMENT);
      assert_non_null(strstr(err.msg, "context"));
      kvc_runner_kv_destroy(kv);
    }
    assert_memory_equal(out[0], out[1], sizeof out[0]);
    /* A step whose positions run past the context is refused by the forward pass itself. */
    kvc_runner_kv_t *kv = make_dense(&m);
    kvc_seq_id_t id = 3;
    int32_t nn = 8, pos = T_CTX - 4;
    float logits[8 * T_VOCAB];
    kvc_runner_step_t step = {1, &id, &nn, &pos, prompt, 1, 0, logits};
    assert_int_equal(kvc_runner_forward(&ctx, kv, &step, &err), KVC_ERR_INVALID_ARGUMENT);
    assert_non_null(strstr(err.msg, "context"));
    kvc_runner_kv_destroy(kv);
    kvc_runner_ctx_free(&ctx);
    kvc_runner_model_free(&m);
  }
}

static void bad_files_are_reported(void **state) {
  (void)state;
  char p[128], tp[128], lp[128];
  gguf_knobs_t k = good_gguf();
  tmp_path("bad.gguf", p, sizeof p);

  write_gguf(p, &k);
  FILE *f = fopen(p, "rb");
  assert_non_null(f);
  fseek(f, 0, SEEK_END);
  size_t full = (size_t)ftell(f);
  fclose(f);
  /* Truncated: in the header, in the metadata, in the tensor data. */
  size_t cuts[] = {3, 20, 200, full / 2, full - 4};
  for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
    k = good_gguf();
    k.truncate = cuts[i];
    write_gguf(p, &k);
    kvc_runner_err_t err = {{0}};
    kvc_status_t st = try_load(p, NULL, &err);
    if (st != KVC_ERR_CORRUPT) fail_msg("cut at %zu: %s '%s'", cuts[i], kvc_status_string(st), err.msg);
  }
  k = good_gguf();
  k.truncate = full - 4;
  write_gguf(p, &k);
  expect_failure(p, NULL, KVC_ERR_CORRUPT, "truncated");
  k = good_gguf();
  k.q_type = 8;
  write_gguf(p, &k);
  expect_failure(p, NULL, KVC_ERR_UNSUPPORTED, "Q8_0");
  k.q_type = 99;
  write_gguf(p, &k);
  expect_failure(p, NULL, KVC_ERR_UNSUPPORTED, "unknown ggml type 99");
  k = good_gguf();
  k.version = 9;
  write_gguf(p, &k);
  expect_failure(p, NULL, KVC_ERR_UNSUPPORTED, "version 9");
  k = good_gguf();
  k.n_tokens = T_VOCAB - 1;
  write_gguf(p, &k);
  expect_failure(p, NULL, KVC_ERR_INVALID_ARGUMENT, "do not match");
  k = good_gguf();
  k.k_rows = 2 * T_HD;
  write_gguf(p, &k);
  expect_failure(p, NULL, KVC_ERR_CORRUPT, "blk.0.attn_k.weight has shape");
  k = good_gguf();
  k.omit_ffn_up = 1;
  write_gguf(p, &k);
  expect_failure(p, NULL, KVC_ERR_CORRUPT, "blk.0.ffn_up.weight is missing");
  k = good_gguf();
  k.nan_weight = 1;
  write_gguf(p, &k);
  expect_failure(p, NULL, KVC_ERR_CORRUPT, "non-finite");
  k = good_gguf();
  k.huge_string = 1;
  write_gguf(p, &k);
  expect_failure(p, NULL, KVC_ERR_CORRUPT, "metadata");

  /* Not a model at all, empty, missing. */
  unsigned char noise[4096];
  kvc_test_rng_t rng;
  kvc_test_rng_seed(&rng, 3);
  for (size_t i = 0; i < sizeof noise; i++) noise[i] = (unsigned char)kvc_test_rng_below(&rng, 256);
  write_file(p, noise, sizeof noise);
  expect_failure(p, NULL, KVC_ERR_CORRUPT, "");
  write_file(p, noise, 0);
  expect_failure(p, NULL, KVC_ERR_CORRUPT, "");
  expect_failure(tmp_path("does-not-exist.gguf", tp, sizeof tp), NULL, KVC_ERR_INVALID_ARGUMENT,
                 "No such file");

  /* llama2.c checkpoints and tokenizer.bin. */
  tmp_path("tiny2.bin", lp, sizeof lp);
  tmp_path("tiny2.tokenizer.bin", tp, sizeof tp);
  write_tokenizer_bin(tp, T_VOCAB, 0);
  write_llama2c(lp, 4);
  expect_failure(lp, NULL, KVC_ERR_CORRUPT, "truncated");
  write_llama2c(lp, 0);
  write_tokenizer_bin(tp, T_VOCAB - 1, 0);
  expect_failure(lp, NULL, KVC_ERR_INVALID_ARGUMENT, "do not match");
  write_tokenizer_bin(tp, T_VOCAB, 3);
  expect_failure(lp, NULL, KVC_ERR_CORRUPT, "tokenizer");
  write_tokenizer_bin(tp, T_VOCAB, 0);
  expect_failure(lp, NULL, KVC_OK, "");
  unlink(tp);
  expect_failure(lp, NULL, KVC_ERR_INVALID_ARGUMENT, "No such file");
  /* A GGUF model with an explicit tokenizer.bin of the wrong size. */
  k = good_gguf();
  write_gguf(p, &k);
  write_tokenizer_bin(tp, T_VOCAB + 2, 0);
  expect_failure(p, tp, KVC_ERR_INVALID_ARGUMENT, "do not match");
}

static int setup(void **state) {
  (void)state;
  snprintf(g_dir, sizeof g_dir, "/tmp/kvc_test_runner_XXXXXX");
  return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown(void **state) {
  (void)state;
  const char *names[] = {"tiny.gguf", "tiny.bin", "tiny.tokenizer.bin", "bad.gguf", "tiny2.bin",
                         "tiny2.tokenizer.bin"};
  char p[128];
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) unlink(tmp_path(names[i], p, sizeof p));
  return rmdir(g_dir);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(tiny_models_run_on_both_paths),
      cmocka_unit_test(bad_files_are_reported),
      cmocka_unit_test(stories_tokenizer),
      cmocka_unit_test(stories_greedy_sample),
      cmocka_unit_test(stories_reference_perplexity),
      cmocka_unit_test(stories_default_codec_keeps_quality),
      cmocka_unit_test(babyllama_both_paths),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
