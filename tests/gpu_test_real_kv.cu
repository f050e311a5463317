/*
 * The CUDA backend against the CPU backend on a real model's keys, values and queries.
 *
 * The real models of ../shared/models (BabyLlama, head_dim 16; stories260K, head_dim 8) run their
 * fp32 forward pass on the CPU (the runner, bench/runner) over windows of TinyStories text, and a
 * capturing KV backend keeps every layer's post-RoPE K and V and the queries. The CUDA kernels take
 * head_dim 64, 128 and 256 only, so the test lays the captured channels side by side: one kv head
 * of the test's cache holds m consecutive model layers' kv heads (m x n_kv_heads x head_dim
 * channels: m = 1, 2, 4 for BabyLlama at 64, 128, 256), and its query head j holds the query head
 * j of each of those model kv heads (GQA group 2, the models' own). Every channel is then a real
 * channel with its real values over the tokens; only the grouping of channels into heads is the
 * test's. Sequences are token ranges of the captured stream (1 to 2040 tokens; ranges cross the
 * windows' boundaries, where positions restart).
 *
 * A CPU cache and a CUDA cache with the same configuration run the same steps: chunked prefill of
 * up to 256 rows per sequence, then decode steps, the two mixed in a step as a continuous-batching
 * scheduler mixes them. Every attention output (the CUDA one poisoned with NaN first) must be
 * within the attention's precision of the CPU's: each element within gpu_test_cache's tolerance
 * and, in fp16, each query row's relative L2 error at most 1e-3 (issue 5's bound; in bf16 it is
 * reported only: the CPU backend rounds bit-pack values to bf16 where v3's fast path computes with
 * them exact, which can move a row by ~1e-2, attention/kvc_attn.h). At the end every full block's
 * compressed page must be the same bytes in both caches (the GPU encoder on real data). Codecs:
 * Huffman and bit-pack at the default bounds, at every head_dim the model's channels fill; fp16,
 * and bf16 at head_dim 128.
 *
 * Without a GPU the test skips; without the models it skips unless KVC_REQUIRE_MODELS=1.
 */
#include <cuda_runtime.h>

#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include <cmocka.h>

#include "runner_eval.h"
#include "runner_kv.h"
}

#include <algorithm>
#include <vector>

#include "kvc_test_cuda.h"
#include "kvc_test_util.h"
#include "kvcomp.h"
#include "kvcomp_cuda.h"
#include "scheduler_hooks/kvc_cache_test.h"

namespace {

constexpr int kWindows = 16, kWindowLen = 256, kFed = kWindowLen - 1; /* tokens fed per window */
constexpr int kChunk = 256, kDecode = 5, kBt = 64;
constexpr int kLens[] = {1, 37, 255, 600, 1021, 2040};
constexpr int kSeqs = (int)(sizeof kLens / sizeof kLens[0]);

/* ---- the model's activations ----------------------------------------------------------------- */

/* Every layer's K, V [tokens][kv_heads * head_dim] and Q [tokens][heads * head_dim], fp32. */
struct captured {
  kvc_runner_shape_t shape{};
  int tokens = 0;
  std::vector<std::vector<float>> k, v, q; /* [layer] */
};

/* A KV backend that forwards to the runner's dense cache and appends each step's rows. */
struct capture_kv {
  kvc_runner_kv_t base; /* first: the runner calls through it */
  kvc_runner_kv_t *inner;
  captured *out;
  int step_rows;
};

capture_kv *self(kvc_runner_kv_t *kv) { return reinterpret_cast<capture_kv *>(kv); }

kvc_status_t cap_add(kvc_runner_kv_t *kv, kvc_seq_id_t id, const int32_t *t, int n, int *c) {
  return self(kv)->inner->ops->seq_add(self(kv)->inner, id, t, n, c);
}
kvc_status_t cap_reserve(kvc_runner_kv_t *kv, kvc_seq_id_t id, int n) {
  return self(kv)->inner->ops->seq_reserve(self(kv)->inner, id, n);
}
kvc_status_t cap_free(kvc_runner_kv_t *kv, kvc_seq_id_t id) {
  return self(kv)->inner->ops->seq_free(self(kv)->inner, id);
}
kvc_status_t cap_swap(kvc_runner_kv_t *, kvc_seq_id_t) { return KVC_ERR_UNSUPPORTED; }
kvc_status_t cap_plan(kvc_runner_kv_t *kv, const kvc_batch_t *b) {
  self(kv)->step_rows = 0;
  for (int i = 0; i < b->num_seqs; i++) self(kv)->step_rows += b->num_new_tokens[i];
  return self(kv)->inner->ops->plan(self(kv)->inner, b);
}
kvc_status_t cap_store(kvc_runner_kv_t *kv, int layer, const float *k, const float *v) {
  capture_kv *c = self(kv);
  const size_t n = (size_t)c->step_rows * c->out->shape.n_kv_heads * c->out->shape.head_dim;
  c->out->k[layer].insert(c->out->k[layer].end(), k, k + n);
  c->out->v[layer].insert(c->out->v[layer].end(), v, v + n);
  return c->inner->ops->store(c->inner, layer, k, v);
}
kvc_status_t cap_attend(kvc_runner_kv_t *kv, int layer, const float *q, float *o, float scale) {
  capture_kv *c = self(kv);
  const size_t n = (size_t)c->step_rows * c->out->shape.n_heads * c->out->shape.head_dim;
  c->out->q[layer].insert(c->out->q[layer].end(), q, q + n);
  return c->inner->ops->attend(c->inner, layer, q, o, scale);
}
kvc_status_t cap_stats(kvc_runner_kv_t *kv, kvc_stats_t *out) {
  return self(kv)->inner->ops->stats(self(kv)->inner, out);
}
void cap_destroy(kvc_runner_kv_t *) {}

const kvc_runner_kv_ops_t kCaptureOps = {cap_add,  cap_reserve, cap_free,  cap_swap,  cap_swap,
                                         cap_plan, cap_store,   cap_attend, cap_stats, cap_destroy};

/* Runs the model over kWindows windows of the shared text, one window per step (the evaluation
 * protocol's prefill feed); false when the model or text is missing (the caller skips). */
bool capture(const char *model_rel, const char *tok_rel, captured &out) {
  char mp[4096], tp[4096], xp[4096];
  const char *m = kvc_test_shared_path(model_rel, mp, sizeof mp);
  const char *t = tok_rel ? kvc_test_shared_path(tok_rel, tp, sizeof tp) : nullptr;
  const char *x = kvc_test_shared_path("data/tinystories_val.txt", xp, sizeof xp);
  if (!m || (tok_rel && !t) || !x) {
    if (kvc_test_require_models()) fail_msg("%s or its text missing and KVC_REQUIRE_MODELS=1",
                                            model_rel);
    return false;
  }
  kvc_runner_err_t err;
  kvc_runner_model_t model;
  memset(&model, 0, sizeof model);
  if (kvc_runner_model_load(&model, m, t, &err) != KVC_OK) fail_msg("%s: %s", m, err.msg);
  int32_t *stream = nullptr;
  int n_stream = 0;
  if (kvc_runner_text_stream(&model.vocab, x, kWindows * kFed, &stream, &n_stream, &err) != KVC_OK)
    fail_msg("%s: %s", x, err.msg);
  kvc_runner_ctx_t ctx;
  assert_int_equal(kvc_runner_ctx_init(&ctx, &model, kFed, &err), KVC_OK);
  capture_kv cap;
  memset(&cap, 0, sizeof cap);
  assert_int_equal(kvc_runner_kv_dense(&model.shape, nullptr, &cap.inner, &err), KVC_OK);
  cap.base.ops = &kCaptureOps;
  cap.base.name = "dense";
  cap.base.block_tokens = kBt;
  cap.out = &out;
  out.shape = model.shape;
  out.k.resize(model.shape.n_layers);
  out.v.resize(model.shape.n_layers);
  out.q.resize(model.shape.n_layers);
  const kvc_runner_ppl_opts_t pp = {kWindows, kWindowLen, KVC_RUNNER_FEED_PREFILL, 1};
  kvc_runner_ppl_t ppl;
  if (kvc_runner_perplexity(&ctx, &cap.base, stream, n_stream, &pp, &ppl, &err) != KVC_OK)
    fail_msg("%s: %s", m, err.msg);
  out.tokens = kWindows * kFed;
  const size_t kv_row = (size_t)model.shape.n_kv_heads * model.shape.head_dim;
  assert_int_equal(out.k[0].size(), (size_t)out.tokens * kv_row);
  print_message("%s: %d tokens captured, perplexity %.4f\n", model_rel, out.tokens, ppl.ppl);
  kvc_runner_ppl_free(&ppl);
  kvc_runner_kv_destroy(cap.inner);
  kvc_runner_ctx_free(&ctx);
  free(stream);
  kvc_runner_model_free(&model);
  return true;
}

/* ---- the test's heads ------------------------------------------------------------------------ */

/* The captured activations as a cache of head_dim hd: kv head s holds model layers s*m..s*m+m-1
 * side by side (channel ((layer - s*m) * H + h) * d + i), query head s*G + j their query heads
 * j. */
struct layout {
  int hd, m, kv_heads, group, kv_row, q_row;
  layout(const captured &c, int head_dim) : hd(head_dim) {
    const kvc_runner_shape_t &s = c.shape;
    m = hd / (s.n_kv_heads * s.head_dim);
    kv_heads = m >= 1 && m * s.n_kv_heads * s.head_dim == hd ? s.n_layers / m : 0;
    group = s.n_heads / s.n_kv_heads;
    kv_row = kv_heads * hd;
    q_row = kv_heads * group * hd;
  }
  /* Token t's row of K (tensor 0), V (1) or Q (2) in this layout. */
  void row(const captured &c, int tensor, int t, float *dst) const {
    const kvc_runner_shape_t &s = c.shape;
    for (int kh = 0; kh < kv_heads; kh++)
      for (int j = 0; j < (tensor == 2 ? group : 1); j++)
        for (int lm = 0; lm < m; lm++)
          for (int h = 0; h < s.n_kv_heads; h++) {
            const int layer = kh * m + lm;
            const float *src =
                tensor == 2 ? &c.q[layer][((size_t)t * s.n_heads + h * group + j) * s.head_dim]
                : &(tensor ? c.v : c.k)[layer][((size_t)t * s.n_kv_heads + h) * s.head_dim];
            memcpy(dst + ((size_t)(kh * (tensor == 2 ? group : 1) + j) * hd +
                          (size_t)(lm * s.n_kv_heads + h) * s.head_dim),
                   src, sizeof(float) * s.head_dim);
          }
  }
};

/* ---- lockstep ------------------------------------------------------------------------------- */

uint16_t to_dtype(kvc_dtype_t t, float x) {
  return t == KVC_DTYPE_F16 ? kvc_test_f32_to_f16(x) : kvc_test_f32_to_bf16(x);
}
double from_dtype(kvc_dtype_t t, uint16_t h) {
  return t == KVC_DTYPE_F16 ? kvc_test_f16_to_f32(h) : kvc_test_bf16_to_f32(h);
}

struct results {
  double rel_l2 = 0, worst_tol = 0; /* largest per-row relative L2 error, largest error/tolerance */
  long long rows = 0, pages = 0;
};

/* Full blocks' pages of sequence id: the same codec, size and bytes in both caches. */
void same_pages(kvc_cache_t *cpu, kvc_cache_t *gpu, kvc_seq_id_t id, int len, results &r) {
  std::vector<int32_t> bc(len / kBt + 2), bg(len / kBt + 2);
  int nc = 0, ng = 0;
  assert_int_equal(kvc__cache_seq_blocks(cpu, id, bc.data(), (int)bc.size(), &nc), KVC_OK);
  assert_int_equal(kvc__cache_seq_blocks(gpu, id, bg.data(), (int)bg.size(), &ng), KVC_OK);
  assert_int_equal(nc, ng);
  std::vector<uint8_t> pc((size_t)1 << 20), pg((size_t)1 << 20);
  for (int j = 0; j < len / kBt; j++) {
    kvc_page_entry_t ec, eg;
    assert_int_equal(kvc__cache_read_page(cpu, 0, bc[j], &ec, pc.data(), pc.size()), KVC_OK);
    assert_int_equal(kvc__cache_read_page(gpu, 0, bg[j], &eg, pg.data(), pg.size()), KVC_OK);
    assert_int_equal(ec.kind, KVC_PAGE_COMPRESSED);
    if (eg.kind != ec.kind || eg.codec != ec.codec || eg.nbytes != ec.nbytes ||
        memcmp(pc.data(), pg.data(), ec.nbytes) != 0)
      fail_msg("sequence %llu block %d: CPU page codec %u, %u bytes; CUDA kind %u codec %u, %u "
               "bytes%s",
               (unsigned long long)id, j, ec.codec, ec.nbytes, eg.kind, eg.codec, eg.nbytes,
               eg.nbytes == ec.nbytes ? ", other bytes" : "");
    r.pages++;
  }
}

/* Both backends over the captured activations in layout L: prefill in chunks, then decode. */
results run(const captured &c, const layout &L, kvc_dtype_t dt, kvc_codec_t codec) {
  results r;
  kvc_cache_t *cache[2];
  for (int i = 0; i < 2; i++) {
    kvc_config_t cfg = KVC_CONFIG_INIT;
    cfg.backend = i ? KVC_BACKEND_CUDA : KVC_BACKEND_CPU;
    cfg.num_layers = 1;
    cfg.num_kv_heads = L.kv_heads;
    cfg.num_q_heads = L.kv_heads * L.group;
    cfg.head_dim = L.hd;
    cfg.dtype = dt;
    cfg.block_tokens = kBt;
    cfg.pool_bytes = (size_t)64 << 20;
    cfg.max_seqs = 16;
    cfg.max_seq_len = 4096;
    cfg.max_batch_tokens = kSeqs * kChunk;
    cfg.codec = codec;
    assert_int_equal(kvc_cache_create(&cfg, &cache[i]), KVC_OK);
  }
  kvc_cache_t *cpu = cache[0], *gpu = cache[1];
  cudaStream_t s;
  CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  const int cap = kSeqs * kChunk;
  std::vector<uint16_t> k((size_t)cap * L.kv_row), v(k.size()), q((size_t)cap * L.q_row);
  std::vector<uint16_t> out_c(q.size()), out_g(q.size());
  std::vector<float> f(L.q_row);
  uint16_t *dk, *dv, *dq, *dout;
  CUDA_OK(cudaMalloc(&dk, k.size() * 2));
  CUDA_OK(cudaMalloc(&dv, v.size() * 2));
  CUDA_OK(cudaMalloc(&dq, q.size() * 2));
  CUDA_OK(cudaMalloc(&dout, q.size() * 2));
  int first[kSeqs], held[kSeqs] = {0};
  for (int i = 0, t = 0; i < kSeqs; t += kLens[i], i++) {
    first[i] = t;
    int cached = -1;
    for (kvc_cache_t *cc : cache)
      assert_int_equal(kvc_seq_add(cc, (kvc_seq_id_t)i, nullptr, 0, 0, &cached), KVC_OK);
  }
  assert_true(first[kSeqs - 1] + kLens[kSeqs - 1] <= c.tokens);
  const float scale = 1.0f / sqrtf((float)L.hd);
  for (;;) {
    std::vector<kvc_seq_id_t> ids;
    std::vector<int32_t> n_new;
    std::vector<int> src; /* the stream token of each row */
    for (int i = 0; i < kSeqs; i++) {
      /* Up to kChunk prompt rows a step, then the last kDecode tokens one a step. */
      const int prefill = std::max(kLens[i] - kDecode, 0);
      const int n = held[i] < prefill ? std::min(kChunk, prefill - held[i])
                                      : std::min(1, kLens[i] - held[i]);
      if (n == 0) continue;
      ids.push_back((kvc_seq_id_t)i);
      n_new.push_back(n);
      for (int t = 0; t < n; t++) src.push_back(first[i] + held[i] + t);
      held[i] += n;
    }
    if (ids.empty()) break;
    const int rows = (int)src.size();
    for (int i = 0; i < (int)ids.size(); i++)
      for (kvc_cache_t *cc : cache)
        assert_int_equal(kvc_seq_reserve(cc, ids[i], n_new[i], 0), KVC_OK);
    for (int row = 0; row < rows; row++)
      for (int tensor = 0; tensor < 3; tensor++) {
        L.row(c, tensor, src[row], f.data());
        const int w = tensor == 2 ? L.q_row : L.kv_row;
        uint16_t *dst = (tensor == 0 ? k.data() : tensor == 1 ? v.data() : q.data()) +
                        (size_t)row * w;
        for (int e = 0; e < w; e++) dst[e] = to_dtype(dt, f[e]);
      }
    const kvc_batch_t batch = {(int)ids.size(), ids.data(), n_new.data(), nullptr};
    assert_int_equal(kvc_plan(cpu, &batch, nullptr), KVC_OK);
    assert_int_equal(kvc_plan_cuda(gpu, &batch, s), KVC_OK);
    CUDA_OK(cudaMemcpyAsync(dk, k.data(), (size_t)rows * L.kv_row * 2, cudaMemcpyHostToDevice, s));
    CUDA_OK(cudaMemcpyAsync(dv, v.data(), (size_t)rows * L.kv_row * 2, cudaMemcpyHostToDevice, s));
    CUDA_OK(cudaMemcpyAsync(dq, q.data(), (size_t)rows * L.q_row * 2, cudaMemcpyHostToDevice, s));
    CUDA_OK(cudaMemsetAsync(dout, 0xFF, (size_t)rows * L.q_row * 2, s)); /* NaN */
    assert_int_equal(kvc_store(cpu, 0, k.data(), v.data(), nullptr), KVC_OK);
    assert_int_equal(kvc_store_cuda(gpu, 0, dk, dv, s), KVC_OK);
    assert_int_equal(kvc_attend(cpu, 0, q.data(), out_c.data(), scale, nullptr), KVC_OK);
    assert_int_equal(kvc_attend_cuda(gpu, 0, dq, dout, scale, s), KVC_OK);
    CUDA_OK(cudaMemcpyAsync(out_g.data(), dout, (size_t)rows * L.q_row * 2,
                            cudaMemcpyDeviceToHost, s));
    CUDA_OK(cudaStreamSynchronize(s));
    const double bound = dt == KVC_DTYPE_F16 ? 1e-3 : 1e-2;
    for (int row = 0; row < rows; row++) {
      const uint16_t *a = &out_c[(size_t)row * L.q_row], *b = &out_g[(size_t)row * L.q_row];
      double mx = 0, num = 0, den = 0;
      for (int e = 0; e < L.q_row; e++) mx = fmax(mx, fabs(from_dtype(dt, a[e])));
      for (int e = 0; e < L.q_row; e++) {
        const double x = from_dtype(dt, a[e]), y = from_dtype(dt, b[e]);
        const double tol = bound * (fabs(x) + mx);
        if (!(fabs(x - y) <= tol))
          fail_msg("row %d (stream token %d) element %d: CPU %.6g CUDA %.6g (row max %.4g)", row,
                   src[row], e, x, y, mx);
        if (tol > 0) r.worst_tol = fmax(r.worst_tol, fabs(x - y) / tol);
        num += (x - y) * (x - y);
        den += x * x;
      }
      const double rel = den > 0 ? sqrt(num / den) : sqrt(num);
      if (!(rel <= bound) && dt == KVC_DTYPE_F16)
        fail_msg("row %d (stream token %d): relative L2 error %.3g > %.0e", row, src[row], rel,
                 bound);
      r.rel_l2 = fmax(r.rel_l2, rel);
    }
    r.rows += rows;
  }
  for (kvc_cache_t *cc : cache) assert_int_equal(kvc_cache_synchronize(cc), KVC_OK);
  for (int i = 0; i < kSeqs; i++) same_pages(cpu, gpu, (kvc_seq_id_t)i, kLens[i], r);
  /* Every full block in the codec asked for: real data the codec could not code (raw pages)
   * would leave that codec's decoder untested. */
  kvc_stats_t st = {};
  st.struct_size = sizeof st;
  assert_int_equal(kvc_get_stats(gpu, &st), KVC_OK);
  assert_int_equal(st.pages_by_codec[codec], r.pages);
  for (kvc_cache_t *cc : cache) {
    assert_int_equal(kvc_cache_validate(cc), KVC_OK);
    kvc_cache_destroy(cc);
  }
  CUDA_OK(cudaFree(dk));
  CUDA_OK(cudaFree(dv));
  CUDA_OK(cudaFree(dq));
  CUDA_OK(cudaFree(dout));
  CUDA_OK(cudaStreamDestroy(s));
  return r;
}

/* Every head_dim the model's channels fill, Huffman and bit-pack, fp16 (and bf16 at 128). */
void model_matches_cpu(const char *model_rel, const char *tok_rel) {
  if (!kvc_test_have_gpu()) skip();
  captured c;
  if (!capture(model_rel, tok_rel, c)) skip();
  int configs = 0;
  for (int hd : {64, 128, 256}) {
    const layout L(c, hd);
    if (L.kv_heads == 0) continue;
    for (kvc_dtype_t dt : {KVC_DTYPE_F16, KVC_DTYPE_BF16}) {
      if (dt == KVC_DTYPE_BF16 && hd != 128) continue;
      for (kvc_codec_t codec : {KVC_CODEC_HUFFMAN, KVC_CODEC_BITPACK}) {
        const results r = run(c, L, dt, codec);
        print_message("%s head_dim %d (%d kv heads, %d layers each) %s %s: %lld rows, largest "
                      "relative L2 %.3g, worst %.2f of tolerance; %lld pages identical\n",
                      model_rel, hd, L.kv_heads, L.m, dt == KVC_DTYPE_F16 ? "fp16" : "bf16",
                      codec == KVC_CODEC_HUFFMAN ? "huffman" : "bitpack", r.rows, r.rel_l2,
                      r.worst_tol, r.pages);
        configs++;
      }
    }
  }
  assert_true(configs >= 4);
}

void babyllama_matches_cpu(void **) {
  model_matches_cpu("models/babyllama-tok105.bin", "models/babyllama-tok105.tokenizer.bin");
}
void stories260k_matches_cpu(void **) { model_matches_cpu("models/stories260K.gguf", nullptr); }

} // namespace

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(babyllama_matches_cpu),
      cmocka_unit_test(stories260k_matches_cpu),
  };
  return cmocka_run_group_tests(tests, nullptr, nullptr);
}
