/*
 * The CUDA backend against the CPU backend on a real model's keys, values and queries.
 *
 * The real models of ../shared/models (BabyLlama, head_dim 16; stories260K, head_dim 8) run their
 * fp32 forward pass on the CPU over windows of TinyStories text, which keeps every layer's
 * post-RoPE K and V and the queries (kvc_runner_capture, bench/runner). The CUDA kernels take
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
 * KVC_TEST_SCALE below 1 shortens the sequences (the sanitizer sweep). Without a GPU the test
 * skips; without the models it skips unless KVC_REQUIRE_MODELS=1.
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

#include "kvc_test_capture.h"
}

#include <algorithm>
#include <vector>

#include "kvc_test_cuda.h"
#include "kvc_test_util.h"
#include "kvcomp.h"
#include "kvcomp_cuda.h"
#include "scheduler_hooks/kvc_cache_test.h"

namespace {

constexpr int kWindows = 16; /* of 255 tokens: 4080 */
constexpr int kChunk = 256, kDecode = 5, kBt = 64;
constexpr int kLens[] = {1, 37, 255, 600, 1021, 2040};
constexpr int kSeqs = (int)(sizeof kLens / sizeof kLens[0]);

/* ---- the test's heads ------------------------------------------------------------------------ */

/* The captured activations as a cache of head_dim hd: kv head s holds model layers s*m..s*m+m-1
 * side by side (channel ((layer - s*m) * H + h) * d + i), query head s*G + j their query heads
 * j. */
struct layout {
  int hd, m, kv_heads, group, kv_row, q_row;
  layout(const kvc_runner_capture_t &c, int head_dim) : hd(head_dim) {
    const kvc_runner_shape_t &s = c.shape;
    m = hd / (s.n_kv_heads * s.head_dim);
    kv_heads = m >= 1 && m * s.n_kv_heads * s.head_dim == hd ? s.n_layers / m : 0;
    group = s.n_heads / s.n_kv_heads;
    kv_row = kv_heads * hd;
    q_row = kv_heads * group * hd;
  }
  /* Token t's row of K (tensor 0), V (1) or Q (2) in this layout. */
  void row(const kvc_runner_capture_t &c, int tensor, int t, float *dst) const {
    const kvc_runner_shape_t &s = c.shape;
    for (int kh = 0; kh < kv_heads; kh++)
      for (int j = 0; j < (tensor == 2 ? group : 1); j++)
        for (int lm = 0; lm < m; lm++)
          for (int h = 0; h < s.n_kv_heads; h++) {
            const int layer = kh * m + lm;
            const size_t at = (size_t)layer * c.tokens + t;
            const float *src =
                tensor == 2 ? c.q + ((at * s.n_heads + h * group + j) * s.head_dim)
                            : (tensor ? c.v : c.k) + (at * s.n_kv_heads + h) * s.head_dim;
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
results run(const kvc_runner_capture_t &c, const layout &L, kvc_dtype_t dt, kvc_codec_t codec) {
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
  /* KVC_TEST_SCALE below 1 (the sanitizer sweep's 0.05) shortens the sequences, to a fifth at
   * most: ten compressed pages remain. */
  const double sc = std::min(1.0, std::max(0.2, kvc_test_scale()));
  int lens[kSeqs], first[kSeqs], held[kSeqs] = {0};
  for (int i = 0; i < kSeqs; i++) lens[i] = std::max(1, (int)lround(kLens[i] * sc));
  for (int i = 0, t = 0; i < kSeqs; t += lens[i], i++) {
    first[i] = t;
    int cached = -1;
    for (kvc_cache_t *cc : cache)
      assert_int_equal(kvc_seq_add(cc, (kvc_seq_id_t)i, nullptr, 0, 0, &cached), KVC_OK);
  }
  assert_true(first[kSeqs - 1] + lens[kSeqs - 1] <= c.tokens);
  const float scale = 1.0f / sqrtf((float)L.hd);
  for (;;) {
    std::vector<kvc_seq_id_t> ids;
    std::vector<int32_t> n_new;
    std::vector<int> src; /* the stream token of each row */
    for (int i = 0; i < kSeqs; i++) {
      /* Up to kChunk prompt rows a step, then the last kDecode tokens one a step. */
      const int prefill = std::max(lens[i] - kDecode, 0);
      const int n = held[i] < prefill ? std::min(kChunk, prefill - held[i])
                                      : std::min(1, lens[i] - held[i]);
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
  for (int i = 0; i < kSeqs; i++) same_pages(cpu, gpu, (kvc_seq_id_t)i, lens[i], r);
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
  kvc_runner_capture_t c;
  if (!kvc_test_capture(model_rel, tok_rel, kWindows, &c)) skip();
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
  kvc_runner_capture_free(&c);
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
