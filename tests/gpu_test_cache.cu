/*
 * The CUDA backend against the CPU backend, and a step captured in a CUDA graph.
 *
 * cuda_matches_cpu: a continuous-batching loop (admission with prompts and prefix hits, chunked
 * prefill, decode, parallel sampling by fork, preemption by swap and by drop, completion) drives a
 * CPU cache and a CUDA cache with identical configurations and inputs in lockstep. Every call must
 * return the same status on both (both caches are synchronized after each step, so the block
 * managers see the same page sizes and make the same decisions); every attention output must
 * agree within the attention's precision (relative to the row's largest output: 1e-3 for fp16,
 * 1e-2 for bf16, whose probabilities the tensor cores take with 8 significant bits); every page
 * completed in a step, every tail, and every page of a sequence swapped back in must be identical
 * (same kind, codec, size and chunk count; compressed pages byte for byte, staging pages in the
 * rows the tail holds: slots past a tail's length are unspecified on both backends, whatever the
 * chunks held before, and no reader looks at them); both caches validate after every step. The
 * pool is small enough that sequences are preempted (swapped and dropped) often. Blocks a step
 * completes are compared twice: as the full staging pages they stay until compressed, and (after
 * kvc_cache_synchronize compresses them) as compressed pages. Variants: fp16
 * and bf16 with the smallest-page policy, fp16 with the fastest codec within the default budget
 * (bit-pack pages; launches too short for two passes), and the raw codec (pages of staging size
 * plus a header, so one chunk more than a staging page).
 *
 * graph_capture: two CUDA caches run the same steps; for one step, cache A's stores and attends of
 * every layer are captured on a non-default stream (cudaStreamBeginCapture), instantiated and
 * launched, while cache B runs them directly. Outputs and pages (tails in their rows) must be
 * equal, and both caches must go on working (another step, validation). A CPU cache stores the
 * same steps; B's pages must equal its pages. Nothing synchronizes these caches between steps, so
 * the blocks a step completes are compressed by the next kvc_plan (from the job list of the
 * step's upload, before the plan's own upload replaces it).
 *
 * cascade_matches_cpu: two groups of sequences sharing their prompt's blocks (prefix-cache hits),
 * prefilled and decoded together on a CUDA cache that reads each group's prefix once
 * (kvc_config_t::cascade 2) and on a CPU cache; outputs within the same tolerance.
 *
 * two_passes_matches_cpu: decode steps over 131k tokens of mostly bit-pack pages and a few Huffman
 * ones, long enough for the backend to run v3 in two passes; outputs within the same tolerance.
 *
 * Without a GPU every test skips.
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
}

#include <string>
#include <vector>

#include "kvc_test_cuda.h"
#include "kvc_test_util.h"
#include "kvcomp.h"
#include "kvcomp_cuda.h"
#include "scheduler_hooks/kvc_cache_test.h"

namespace {

constexpr int kLayers = 2, kKvHeads = 2, kQHeads = 8, kHeadDim = 64, kBt = 16;
constexpr int kMaxLen = 256, kMaxBatch = 256, kMaxSeqs = 48, kMaxRunning = 10, kChunk = 48;
constexpr int kKvRow = kKvHeads * kHeadDim, kQRow = kQHeads * kHeadDim;

kvc_config_t config(kvc_backend_t backend, kvc_dtype_t dtype, size_t pool_bytes) {
  kvc_config_t cfg = KVC_CONFIG_INIT;
  cfg.backend = backend;
  cfg.num_layers = kLayers;
  cfg.num_q_heads = kQHeads;
  cfg.num_kv_heads = kKvHeads;
  cfg.head_dim = kHeadDim;
  cfg.dtype = dtype;
  cfg.block_tokens = kBt;
  cfg.pool_bytes = pool_bytes;
  cfg.swap_bytes = (size_t)512 << 10;
  cfg.max_seqs = kMaxSeqs;
  cfg.max_seq_len = kMaxLen;
  cfg.max_batch_tokens = kMaxBatch;
  cfg.policy = KVC_POLICY_SMALLEST;
  return cfg;
}

uint16_t to_dtype(kvc_dtype_t t, float x) {
  return t == KVC_DTYPE_F16 ? kvc_test_f32_to_f16(x) : kvc_test_f32_to_bf16(x);
}
float from_dtype(kvc_dtype_t t, uint16_t h) {
  return t == KVC_DTYPE_F16 ? kvc_test_f16_to_f32(h) : kvc_test_bf16_to_f32(h);
}

/* Host and device copies of one step's tensors, of up to `rows` rows. */
struct tensors {
  std::vector<uint16_t> k, v, q, out_cpu, out_gpu;
  uint16_t *dk = nullptr, *dv = nullptr, *dq = nullptr, *dout = nullptr;
  explicit tensors(int rows = kMaxBatch)
      : k((size_t)rows * kKvRow), v((size_t)rows * kKvRow), q((size_t)rows * kQRow),
        out_cpu((size_t)rows * kQRow), out_gpu((size_t)rows * kQRow) {
    CUDA_OK(cudaMalloc(&dk, k.size() * 2));
    CUDA_OK(cudaMalloc(&dv, v.size() * 2));
    CUDA_OK(cudaMalloc(&dq, q.size() * 2));
    CUDA_OK(cudaMalloc(&dout, q.size() * 2));
  }
  ~tensors() {
    cudaFree(dk);
    cudaFree(dv);
    cudaFree(dq);
    cudaFree(dout);
  }
  void fill(kvc_test_rng_t *r, kvc_dtype_t t, int rows) {
    for (int i = 0; i < rows * kKvRow; i++) {
      k[i] =
          to_dtype(t, (float)(kvc_test_rng_normal(r) * (i % 7 == 0 ? 4.0 : 1.0) + 0.3 * (i % 5)));
      v[i] = to_dtype(t, (float)kvc_test_rng_normal(r));
    }
    for (int i = 0; i < rows * kQRow; i++) q[i] = to_dtype(t, (float)kvc_test_rng_normal(r));
  }
  void upload(int rows, cudaStream_t s) {
    CUDA_OK(cudaMemcpyAsync(dk, k.data(), (size_t)rows * kKvRow * 2, cudaMemcpyHostToDevice, s));
    CUDA_OK(cudaMemcpyAsync(dv, v.data(), (size_t)rows * kKvRow * 2, cudaMemcpyHostToDevice, s));
    CUDA_OK(cudaMemcpyAsync(dq, q.data(), (size_t)rows * kQRow * 2, cudaMemcpyHostToDevice, s));
  }
};

/* Both caches' pages of (layer, block) must be the same: kind, codec, size, chunk count, and the
 * bytes (of a staging page, the rows of its first `tokens` slots, which is all the tail holds). */
void same_page(kvc_cache_t *a, kvc_cache_t *b, int layer, int32_t block, int tokens,
               std::vector<uint8_t> &pa, std::vector<uint8_t> &pb) {
  kvc_page_entry_t ea, eb;
  assert_int_equal(kvc__cache_read_page(a, layer, block, &ea, pa.data(), pa.size()), KVC_OK);
  assert_int_equal(kvc__cache_read_page(b, layer, block, &eb, pb.data(), pb.size()), KVC_OK);
  if (ea.kind != eb.kind || ea.nbytes != eb.nbytes || ea.codec != eb.codec ||
      ea.nchunks != eb.nchunks)
    fail_msg("layer %d block %d: kind %u/%u, %u/%u bytes, codec %u/%u, %u/%u chunks", layer,
             (int)block, ea.kind, eb.kind, ea.nbytes, eb.nbytes, ea.codec, eb.codec, ea.nchunks,
             eb.nchunks);
  if (ea.kind == KVC_PAGE_COMPRESSED && memcmp(pa.data(), pb.data(), ea.nbytes) != 0)
    fail_msg("layer %d block %d: compressed pages of %u bytes differ", layer, (int)block,
             ea.nbytes);
  if (ea.kind != KVC_PAGE_STAGING) return;
  const int row_bytes = kHeadDim * 2;
  for (int t = 0; t < 2; t++)
    for (int h = 0; h < kKvHeads; h++) {
      uint32_t off = kvc_staging_row_offset(t, h, 0, kKvHeads, kBt, row_bytes);
      for (int i = 0; i < tokens * row_bytes; i++)
        if (pa[off + i] != pb[off + i])
          fail_msg("layer %d block %d: staging pages differ in %s head %d token %d (of %d)", layer,
                   (int)block, t ? "V" : "K", h, i / row_bytes, tokens);
    }
}

/* Every page of a sequence of `len` tokens whose table is blocks[0..n), in both caches. */
void same_pages(kvc_cache_t *a, kvc_cache_t *b, const int32_t *blocks, int first, int n, int len,
                std::vector<uint8_t> &pa, std::vector<uint8_t> &pb) {
  for (int j = first; j < n; j++) {
    int tokens = len - j * kBt < kBt ? len - j * kBt : kBt;
    for (int l = 0; l < kLayers; l++) same_page(a, b, l, blocks[j], tokens, pa, pb);
  }
}

/* "block:kind/codec/chunks ..." of a sequence's pages in one layer, for failure messages. */
std::string describe_pages(kvc_cache_t *c, kvc_seq_id_t id, int layer, std::vector<uint8_t> &buf) {
  int32_t blocks[kMaxLen / kBt + 1];
  int n = 0;
  std::string s;
  if (kvc__cache_seq_blocks(c, id, blocks, kMaxLen / kBt + 1, &n) != KVC_OK) return "?";
  for (int j = 0; j < n; j++) {
    kvc_page_entry_t e;
    char one[64];
    if (kvc__cache_read_page(c, layer, blocks[j], &e, buf.data(), buf.size()) != KVC_OK) return "?";
    snprintf(one, sizeof(one), " %d:%s/%u/%u", (int)blocks[j],
             e.kind == KVC_PAGE_STAGING ? "staging" : e.kind == KVC_PAGE_COMPRESSED ? "page" : "empty",
             e.codec, e.nchunks);
    s += one;
  }
  return s;
}

/* ---- the lockstep loop ---------------------------------------------------------------------- */

enum { WAITING, RUNNING, SWAPPED, DONE };

struct request {
  kvc_seq_id_t id;
  std::vector<int32_t> tok;
  int prompt_len, final_len, len = 0, forks = 0, state = WAITING;
  int64_t admitted = 0;
};

struct lockstep {
  kvc_cache_t *cpu = nullptr, *gpu = nullptr;
  cudaStream_t s = nullptr;
  kvc_dtype_t dtype;
  kvc_test_rng_t rng;
  std::vector<request> reqs;
  std::vector<uint8_t> pa, pb; /* page buffers of max_page_bytes */
  int64_t admissions = 0, drops = 0, swaps = 0, swap_ins = 0, forks = 0, hits = 0, rows = 0,
          pages = 0;
  double worst = 0; /* largest |CPU - CUDA| / tolerance */

  /* Runs a call on both caches; the statuses must agree. */
  template <typename F> kvc_status_t both(const char *what, F f) {
    kvc_status_t a = f(cpu, (void *)nullptr), b = f(gpu, (void *)s);
    if (a != b) fail_msg("%s: CPU %s, CUDA %s", what, kvc_status_string(a), kvc_status_string(b));
    return a;
  }
};

void drop(lockstep &L, request &r) {
  kvc_seq_id_t id = r.id;
  assert_int_equal(L.both("free", [&](kvc_cache_t *c, void *) { return kvc_seq_free(c, id); }),
                   KVC_OK);
  r.state = WAITING;
  r.len = 0;
  L.drops++;
}

bool preempt(lockstep &L, size_t keep, const std::vector<char> &in_batch) {
  long victim = -1;
  for (size_t i = 0; i < L.reqs.size(); i++)
    if (L.reqs[i].state == RUNNING && i != keep && !in_batch[i] &&
        (victim < 0 || L.reqs[i].admitted > L.reqs[(size_t)victim].admitted))
      victim = (long)i;
  if (victim < 0) return false;
  request &r = L.reqs[(size_t)victim];
  kvc_seq_id_t id = r.id;
  if (r.admitted % 2 == 0) {
    kvc_status_t st =
        L.both("swap_out", [&](kvc_cache_t *c, void *s) { return kvc_seq_swap_out(c, id, s); });
    if (st == KVC_OK) {
      r.state = SWAPPED;
      L.swaps++;
      return true;
    }
    assert_int_equal(st, KVC_ERR_OUT_OF_MEMORY);
  }
  drop(L, r);
  return true;
}

/* Tolerance of one attention output element: CPU a against CUDA, mx the row's largest |output|. */
double tolerance(kvc_dtype_t t, double a, double mx) {
  return (t == KVC_DTYPE_F16 ? 1e-3 : 1e-2) * (fabs(a) + mx);
}

bool lockstep_step(lockstep &L, tensors &T) {
  int running = 0, live = 0;
  for (auto &r : L.reqs) {
    running += r.state == RUNNING;
    live += r.state != DONE;
  }
  if (live == 0) return false;
  for (auto &r : L.reqs) {
    if (running >= kMaxRunning) break;
    if (r.state != SWAPPED) continue;
    kvc_seq_id_t id = r.id;
    kvc_status_t st =
        L.both("swap_in", [&](kvc_cache_t *c, void *s) { return kvc_seq_swap_in(c, id, s); });
    if (st == KVC_ERR_OUT_OF_MEMORY) break;
    assert_int_equal(st, KVC_OK);
    r.state = RUNNING;
    running++;
    /* The swap-in copied the pages back (into other chunks): all of them must be as before. */
    int32_t blocks[kMaxLen / kBt + 1];
    int nb = 0;
    assert_int_equal(kvc__cache_seq_blocks(L.gpu, id, blocks, kMaxLen / kBt + 1, &nb), KVC_OK);
    same_pages(L.cpu, L.gpu, blocks, 0, nb, r.len, L.pa, L.pb);
    L.swap_ins++;
  }
  for (auto &r : L.reqs) {
    if (running >= kMaxRunning) break;
    if (r.state != WAITING) continue;
    kvc_seq_id_t id = r.id;
    int cached[2] = {-1, -1}, which = 0;
    kvc_status_t st = L.both("add", [&](kvc_cache_t *c, void *) {
      return kvc_seq_add(c, id, r.tok.data(), (int)r.tok.size(), 0, &cached[which++]);
    });
    if (st == KVC_ERR_OUT_OF_MEMORY) break;
    assert_int_equal(st, KVC_OK);
    assert_int_equal(cached[0], cached[1]);
    int first = (int)r.tok.size() - cached[0] < kChunk ? (int)r.tok.size() - cached[0] : kChunk;
    st =
        L.both("reserve", [&](kvc_cache_t *c, void *) { return kvc_seq_reserve(c, id, first, 0); });
    if (st == KVC_ERR_OUT_OF_MEMORY) {
      assert_int_equal(L.both("free", [&](kvc_cache_t *c, void *) { return kvc_seq_free(c, id); }),
                       KVC_OK);
      break;
    }
    assert_int_equal(st, KVC_OK);
    r.len = cached[0];
    r.state = RUNNING;
    r.admitted = L.admissions++;
    L.hits += cached[0];
    running++;
  }

  std::vector<char> in_batch(L.reqs.size(), 0);
  std::vector<kvc_seq_id_t> ids;
  std::vector<int32_t> n_new, toks;
  std::vector<size_t> members;
  for (;;) {
    long best = -1;
    for (size_t i = 0; i < L.reqs.size(); i++)
      if (L.reqs[i].state == RUNNING && !in_batch[i] &&
          (best < 0 || L.reqs[i].admitted < L.reqs[(size_t)best].admitted))
        best = (long)i;
    if (best < 0) break;
    request &r = L.reqs[(size_t)best];
    in_batch[(size_t)best] = 1;
    if (r.len == (int)r.tok.size()) r.tok.push_back((int32_t)kvc_test_rng_below(&L.rng, 5000));
    int want = (int)r.tok.size() - r.len;
    if (want > kChunk) want = kChunk;
    if (want > kMaxBatch - (int)toks.size()) want = kMaxBatch - (int)toks.size();
    if (want == 0) continue;
    kvc_seq_id_t id = r.id;
    kvc_status_t st;
    while ((st = L.both("reserve", [&](kvc_cache_t *c, void *) {
             return kvc_seq_reserve(c, id, want, 0);
           })) == KVC_ERR_OUT_OF_MEMORY)
      if (!preempt(L, (size_t)best, in_batch)) break;
    if (st == KVC_ERR_OUT_OF_MEMORY && !ids.empty()) continue;
    assert_int_equal(st, KVC_OK);
    members.push_back((size_t)best);
    ids.push_back(id);
    n_new.push_back(want);
    toks.insert(toks.end(), r.tok.begin() + r.len, r.tok.begin() + r.len + want);
  }
  if (ids.empty()) return true;

  const int rows = (int)toks.size();
  kvc_batch_t batch = {(int)ids.size(), ids.data(), n_new.data(), toks.data()};
  assert_int_equal(L.both("plan", [&](kvc_cache_t *c, void *s) { return kvc_plan(c, &batch, s); }),
                   KVC_OK);
  const float scale = 1.0f / sqrtf((float)kHeadDim);
  for (int l = 0; l < kLayers; l++) {
    T.fill(&L.rng, L.dtype, rows);
    T.upload(rows, L.s);
    assert_int_equal(kvc_store(L.cpu, l, T.k.data(), T.v.data(), nullptr), KVC_OK);
    assert_int_equal(kvc_store_cuda(L.gpu, l, T.dk, T.dv, L.s), KVC_OK);
    assert_int_equal(kvc_attend(L.cpu, l, T.q.data(), T.out_cpu.data(), scale, nullptr), KVC_OK);
    assert_int_equal(kvc_attend_cuda(L.gpu, l, T.dq, T.dout, scale, L.s), KVC_OK);
    CUDA_OK(cudaMemcpyAsync(T.out_gpu.data(), T.dout, (size_t)rows * kQRow * 2,
                            cudaMemcpyDeviceToHost, L.s));
    CUDA_OK(cudaStreamSynchronize(L.s));
    for (int row = 0; row < rows; row++) {
      double mx = 0;
      for (int e = 0; e < kQRow; e++)
        mx = fmax(mx, fabs(from_dtype(L.dtype, T.out_cpu[(size_t)row * kQRow + e])));
      for (int e = 0; e < kQRow; e++) {
        double a = from_dtype(L.dtype, T.out_cpu[(size_t)row * kQRow + e]);
        double b = from_dtype(L.dtype, T.out_gpu[(size_t)row * kQRow + e]);
        double tol = tolerance(L.dtype, a, mx);
        if (!(fabs(a - b) <= tol)) {
          size_t m = 0;
          for (int first = 0; row >= first + n_new[m]; m++) first += n_new[m];
          fail_msg("layer %d row %d element %d: CPU %.6g CUDA %.6g (row max %.4g); sequence %llu "
                   "of %d tokens, pages (block:kind/codec/chunks):%s",
                   l, row, e, a, b, mx, (unsigned long long)ids[m],
                   L.reqs[members[m]].len + n_new[m],
                   describe_pages(L.gpu, ids[m], l, L.pa).c_str());
        }
        if (tol > 0) L.worst = fmax(L.worst, fabs(a - b) / tol);
      }
    }
    L.rows += rows;
  }
  /* Blocks this step completed wait for the next plan as full staging pages (their rows equal on
   * both), and validation leaves them so; synchronizing compresses them. */
  for (size_t m = 0; m < members.size(); m++) {
    const request &r = L.reqs[members[m]];
    int32_t blocks[kMaxLen / kBt + 1];
    int nb = 0;
    assert_int_equal(kvc__cache_seq_blocks(L.gpu, r.id, blocks, kMaxLen / kBt + 1, &nb), KVC_OK);
    for (int j = r.len / kBt; j < (r.len + n_new[m]) / kBt; j++)
      for (int l = 0; l < kLayers; l++) {
        kvc_page_entry_t e;
        assert_int_equal(kvc__cache_read_page(L.gpu, l, blocks[j], &e, L.pa.data(), L.pa.size()),
                         KVC_OK);
        assert_int_equal(e.kind, KVC_PAGE_STAGING);
      }
    same_pages(L.cpu, L.gpu, blocks, r.len / kBt, nb, r.len + n_new[m], L.pa, L.pb);
  }
  assert_int_equal(kvc_cache_validate(L.cpu), KVC_OK);
  assert_int_equal(kvc_cache_validate(L.gpu), KVC_OK);
  assert_int_equal(kvc_cache_synchronize(L.cpu), KVC_OK);
  assert_int_equal(kvc_cache_synchronize(L.gpu), KVC_OK);

  /* Pages this step completed, and tails, byte for byte. */
  for (size_t m = 0; m < members.size(); m++) {
    request &r = L.reqs[members[m]];
    int len0 = r.len;
    r.len += n_new[m];
    int32_t blocks[kMaxLen / kBt + 1];
    int nb = 0, nb2 = 0;
    int32_t blocks2[kMaxLen / kBt + 1];
    assert_int_equal(kvc__cache_seq_blocks(L.cpu, r.id, blocks, kMaxLen / kBt + 1, &nb), KVC_OK);
    assert_int_equal(kvc__cache_seq_blocks(L.gpu, r.id, blocks2, kMaxLen / kBt + 1, &nb2), KVC_OK);
    assert_int_equal(nb, nb2);
    assert_memory_equal(blocks, blocks2, (size_t)nb * sizeof(int32_t));
    same_pages(L.cpu, L.gpu, blocks, len0 / kBt, nb, r.len, L.pa, L.pb);
    L.pages += nb - len0 / kBt;
  }
  for (size_t m = 0; m < members.size(); m++) {
    request &r = L.reqs[members[m]];
    kvc_seq_id_t id = r.id;
    while (r.forks > 0 && r.len >= r.prompt_len) {
      r.forks--;
      request child;
      child.id = 5000 + (kvc_seq_id_t)L.reqs.size();
      child.tok = r.tok;
      child.prompt_len = r.prompt_len;
      child.final_len = r.len + 1 + (int)kvc_test_rng_below(&L.rng, 12);
      child.len = r.len;
      kvc_seq_id_t cid = child.id;
      kvc_status_t st =
          L.both("fork", [&](kvc_cache_t *c, void *) { return kvc_seq_fork(c, id, cid); });
      if (st == KVC_ERR_OUT_OF_MEMORY) continue;
      assert_int_equal(st, KVC_OK);
      child.state = RUNNING;
      child.admitted = L.admissions++;
      L.forks++;
      L.reqs.push_back(child); /* may move `r`: no more forks of it this step */
      break;
    }
    request &rr = L.reqs[members[m]];
    if (rr.len >= rr.final_len) {
      kvc_seq_id_t fid = rr.id;
      assert_int_equal(L.both("free", [&](kvc_cache_t *c, void *) { return kvc_seq_free(c, fid); }),
                       KVC_OK);
      rr.state = DONE;
    }
  }
  assert_int_equal(kvc_cache_validate(L.cpu), KVC_OK);
  assert_int_equal(kvc_cache_validate(L.gpu), KVC_OK);
  return true;
}

/* The caches' codec policy, and with KVC_POLICY_FIXED their codec. The pool holds a few
 * full-length sequences' pages, so that running sequences outgrow it and get preempted. Returns
 * the CUDA cache's pages by codec at the end. */
std::vector<long long> run_lockstep(kvc_dtype_t dtype, kvc_codec_policy_t policy,
                                    kvc_codec_t codec) {
  lockstep L;
  L.dtype = dtype;
  const bool raw = policy == KVC_POLICY_FIXED && codec == KVC_CODEC_RAW;
  const size_t pool = raw ? (size_t)512 << 10 : (size_t)256 << 10;
  kvc_config_t c_cpu = config(KVC_BACKEND_CPU, dtype, pool);
  kvc_config_t c_gpu = config(KVC_BACKEND_CUDA, dtype, pool);
  c_cpu.policy = c_gpu.policy = policy;
  c_cpu.codec = c_gpu.codec = codec;
  assert_int_equal(kvc_cache_create(&c_cpu, &L.cpu), KVC_OK);
  assert_int_equal(kvc_cache_create(&c_gpu, &L.gpu), KVC_OK);
  CUDA_OK(cudaStreamCreateWithFlags(&L.s, cudaStreamNonBlocking));
  kvc_test_rng_seed(&L.rng, 77 + (uint64_t)dtype + (raw ? 100 : 0) +
                                (policy == KVC_POLICY_FASTEST_WITHIN ? 300 : 0));
  std::vector<int32_t> prompts[3];
  for (auto &p : prompts)
    for (int t = 0; t < 40; t++) p.push_back((int32_t)kvc_test_rng_below(&L.rng, 5000));
  /* Fewer than about 30 requests may not fill the pool. */
  const int n = 30 + (int)(120 * kvc_test_scale());
  for (int i = 0; i < n; i++) {
    request r;
    r.id = 1000 + (kvc_seq_id_t)i;
    int sys = (int)kvc_test_rng_below(&L.rng, 4);
    if (sys < 3) r.tok = prompts[sys];
    int user = 1 + (int)kvc_test_rng_below(&L.rng, 60);
    for (int t = 0; t < user; t++) r.tok.push_back((int32_t)kvc_test_rng_below(&L.rng, 5000));
    r.prompt_len = (int)r.tok.size();
    r.final_len = r.prompt_len + 1 + (int)kvc_test_rng_below(&L.rng, 100);
    r.forks = kvc_test_rng_below(&L.rng, 8) == 0;
    L.reqs.push_back(r);
  }
  tensors T;
  uint32_t max_page = 0;
  kvc__cache_geometry(L.cpu, nullptr, &max_page, nullptr);
  L.pa.resize(max_page);
  L.pb.resize(max_page);
  int steps = 0;
  while (lockstep_step(L, T)) assert_true(++steps < 100000);
  kvc_stats_t sa = {}, sb = {};
  sa.struct_size = sb.struct_size = sizeof(kvc_stats_t);
  assert_int_equal(kvc_get_stats(L.cpu, &sa), KVC_OK);
  assert_int_equal(kvc_get_stats(L.gpu, &sb), KVC_OK);
  print_message(
      "%d steps, %lld rows, %lld block pages compared (and those of %lld swap-ins), worst %.2f "
      "of tolerance; %lld prefix-hit tokens, %lld forks, %lld swaps, %lld drops; pages by codec "
      "raw/bitpack/huffman %lld/%lld/%lld\n",
      steps, (long long)L.rows, (long long)L.pages, (long long)L.swap_ins, L.worst,
      (long long)L.hits, (long long)L.forks, (long long)L.swaps, (long long)L.drops,
      (long long)sb.pages_by_codec[0], (long long)sb.pages_by_codec[1],
      (long long)sb.pages_by_codec[2]);
  assert_true(L.hits > 0 && L.forks > 0 && L.swaps > 0 && L.swap_ins > 0 && L.drops > 0);
  assert_int_equal(sa.swap_outs, sb.swap_outs);
  assert_int_equal(sa.prefix_hits, sb.prefix_hits);
  assert_int_equal(sa.live_seqs, 0);
  assert_int_equal(sb.live_seqs, 0);
  kvc_cache_destroy(L.cpu);
  kvc_cache_destroy(L.gpu);
  CUDA_OK(cudaStreamDestroy(L.s));
  return {(long long)sb.pages_by_codec[0], (long long)sb.pages_by_codec[1],
          (long long)sb.pages_by_codec[2]};
}

void cuda_matches_cpu_f16(void **) {
  if (!kvc_test_have_gpu()) skip();
  run_lockstep(KVC_DTYPE_F16, KVC_POLICY_SMALLEST, KVC_CODEC_HUFFMAN);
}

void cuda_matches_cpu_bf16(void **) {
  if (!kvc_test_have_gpu()) skip();
  run_lockstep(KVC_DTYPE_BF16, KVC_POLICY_SMALLEST, KVC_CODEC_HUFFMAN);
}

void cuda_matches_cpu_raw(void **) {
  if (!kvc_test_have_gpu()) skip();
  run_lockstep(KVC_DTYPE_F16, KVC_POLICY_FIXED, KVC_CODEC_RAW);
}

/* The fastest codec within the default size budget: bit-pack pages (at most one Huffman page in
 * 1024, which the end's counts confirm), the pages for which the backend asks for two passes
 * (kvc_attn_args_t.huffman_rare) in launches of enough tokens (kvc_attn_cuda_two_passes_pay);
 * these sequences' launches are too short for that and run in one launch. Two passes are
 * checked against the reference here by two_passes_matches_cpu, and in gpu_test_attn. */
void cuda_matches_cpu_fastest(void **) {
  if (!kvc_test_have_gpu()) skip();
  const std::vector<long long> by =
      run_lockstep(KVC_DTYPE_F16, KVC_POLICY_FASTEST_WITHIN, KVC_CODEC_HUFFMAN);
  assert_true(by[KVC_CODEC_BITPACK] > 0 && by[KVC_CODEC_HUFFMAN] * 1024 <= by[KVC_CODEC_BITPACK]);
}

/* ---- graph capture -------------------------------------------------------------------------- */

void graph_capture(void **) {
  if (!kvc_test_have_gpu()) skip();
  kvc_config_t cfg = config(KVC_BACKEND_CUDA, KVC_DTYPE_F16, (size_t)1 << 20);
  kvc_config_t cfg_cpu = config(KVC_BACKEND_CPU, KVC_DTYPE_F16, (size_t)1 << 20);
  kvc_cache_t *a = nullptr, *b = nullptr, *h = nullptr;
  assert_int_equal(kvc_cache_create(&cfg, &a), KVC_OK);
  assert_int_equal(kvc_cache_create(&cfg, &b), KVC_OK);
  assert_int_equal(kvc_cache_create(&cfg_cpu, &h), KVC_OK);
  cudaStream_t s;
  CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  /* Every layer's inputs live in their own device buffers, uploaded before a capture begins:
   * a capture records work, it does not run it. */
  tensors in[kLayers];
  uint16_t *out_a[kLayers], *out_b[kLayers];
  for (int l = 0; l < kLayers; l++) {
    CUDA_OK(cudaMalloc(&out_a[l], (size_t)kMaxBatch * kQRow * 2));
    CUDA_OK(cudaMalloc(&out_b[l], (size_t)kMaxBatch * kQRow * 2));
  }
  std::vector<uint16_t> ha((size_t)kMaxBatch * kQRow), hb((size_t)kMaxBatch * kQRow);
  uint32_t max_page = 0;
  kvc__cache_geometry(a, nullptr, &max_page, nullptr);
  std::vector<uint8_t> pa(max_page), pb(max_page);
  kvc_test_rng_t rng;
  kvc_test_rng_seed(&rng, 4242);
  kvc_seq_id_t ids[4] = {1, 2, 3, 4};
  int cached = 0;
  for (kvc_cache_t *c : {a, b, h})
    for (int i = 0; i < 4; i++) {
      assert_int_equal(kvc_seq_add(c, ids[i], nullptr, 0, 0, &cached), KVC_OK);
      assert_int_equal(kvc_seq_reserve(c, ids[i], 160, 0), KVC_OK);
    }
  /* Steps of prefill, decode and mixes that complete blocks, take and give back staging pages;
   * step 2 is captured on cache A. */
  const int32_t plan_tokens[5][4] = {
      {37, 16, 1, 70}, {1, 1, 1, 1}, {15, 1, 31, 2}, {1, 16, 1, 1}, {9, 1, 40, 3}};
  const int captured = 2;
  const float scale = 0.125f;
  int lens[4] = {0, 0, 0, 0};
  for (int st = 0; st < 5; st++) {
    int rows = 0;
    for (int i = 0; i < 4; i++) {
      rows += plan_tokens[st][i];
      lens[i] += plan_tokens[st][i];
    }
    for (int l = 0; l < kLayers; l++) {
      in[l].fill(&rng, KVC_DTYPE_F16, rows);
      in[l].upload(rows, s);
    }
    kvc_batch_t batch = {4, ids, plan_tokens[st], nullptr};
    assert_int_equal(kvc_plan_cuda(a, &batch, s), KVC_OK);
    assert_int_equal(kvc_plan_cuda(b, &batch, s), KVC_OK);
    assert_int_equal(kvc_plan(h, &batch, nullptr), KVC_OK);
    for (int l = 0; l < kLayers; l++)
      assert_int_equal(kvc_store(h, l, in[l].k.data(), in[l].v.data(), nullptr), KVC_OK);
    if (st == captured) {
      cudaGraph_t graph = nullptr;
      cudaGraphExec_t exec = nullptr;
      CUDA_OK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
      for (int l = 0; l < kLayers; l++) {
        assert_int_equal(kvc_store_cuda(a, l, in[l].dk, in[l].dv, s), KVC_OK);
        assert_int_equal(kvc_attend_cuda(a, l, in[l].dq, out_a[l], scale, s), KVC_OK);
      }
      CUDA_OK(cudaStreamEndCapture(s, &graph));
      size_t nodes = 0;
      CUDA_OK(cudaGraphGetNodes(graph, nullptr, &nodes));
      assert_true(nodes >= 2 * kLayers);
      CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
      CUDA_OK(cudaGraphLaunch(exec, s));
      CUDA_OK(cudaStreamSynchronize(s));
      CUDA_OK(cudaGraphExecDestroy(exec));
      CUDA_OK(cudaGraphDestroy(graph));
    } else {
      for (int l = 0; l < kLayers; l++) {
        assert_int_equal(kvc_store_cuda(a, l, in[l].dk, in[l].dv, s), KVC_OK);
        assert_int_equal(kvc_attend_cuda(a, l, in[l].dq, out_a[l], scale, s), KVC_OK);
      }
    }
    for (int l = 0; l < kLayers; l++) {
      assert_int_equal(kvc_store_cuda(b, l, in[l].dk, in[l].dv, s), KVC_OK);
      assert_int_equal(kvc_attend_cuda(b, l, in[l].dq, out_b[l], scale, s), KVC_OK);
    }
    CUDA_OK(cudaStreamSynchronize(s));
    for (int l = 0; l < kLayers; l++) {
      CUDA_OK(cudaMemcpy(ha.data(), out_a[l], (size_t)rows * kQRow * 2, cudaMemcpyDeviceToHost));
      CUDA_OK(cudaMemcpy(hb.data(), out_b[l], (size_t)rows * kQRow * 2, cudaMemcpyDeviceToHost));
      if (memcmp(ha.data(), hb.data(), (size_t)rows * kQRow * 2) != 0)
        fail_msg("step %d layer %d: outputs differ%s", st, l, st == captured ? " (captured)" : "");
    }
    assert_int_equal(kvc_cache_validate(a), KVC_OK);
    assert_int_equal(kvc_cache_validate(b), KVC_OK);
    for (int i = 0; i < 4; i++) {
      int32_t ba[kMaxLen / kBt + 1], bb[kMaxLen / kBt + 1];
      int na = 0, nb = 0;
      assert_int_equal(kvc__cache_seq_blocks(a, ids[i], ba, kMaxLen / kBt + 1, &na), KVC_OK);
      assert_int_equal(kvc__cache_seq_blocks(b, ids[i], bb, kMaxLen / kBt + 1, &nb), KVC_OK);
      assert_int_equal(na, nb);
      assert_memory_equal(ba, bb, (size_t)na * sizeof(int32_t));
      same_pages(a, b, ba, 0, na, lens[i], pa, pb);
      int32_t bh[kMaxLen / kBt + 1];
      int nh = 0;
      assert_int_equal(kvc__cache_seq_blocks(h, ids[i], bh, kMaxLen / kBt + 1, &nh), KVC_OK);
      assert_int_equal(na, nh);
      assert_memory_equal(ba, bh, (size_t)na * sizeof(int32_t));
      same_pages(h, b, bh, 0, nh, lens[i], pa, pb);
    }
  }
  assert_int_equal(kvc_cache_validate(h), KVC_OK);
  kvc_stats_t sa = {}, sb = {};
  sa.struct_size = sb.struct_size = sizeof(kvc_stats_t);
  assert_int_equal(kvc_get_stats(a, &sa), KVC_OK);
  assert_int_equal(kvc_get_stats(b, &sb), KVC_OK);
  assert_int_equal(sa.page_bytes, sb.page_bytes);
  assert_int_equal(sa.tokens_stored, sb.tokens_stored);
  kvc_cache_destroy(a);
  kvc_cache_destroy(b);
  kvc_cache_destroy(h);
  for (int l = 0; l < kLayers; l++) {
    CUDA_OK(cudaFree(out_a[l]));
    CUDA_OK(cudaFree(out_b[l]));
  }
  CUDA_OK(cudaStreamDestroy(s));
}

/* One step of `ids` (n_new tokens each, token ids toks) on both caches, fresh K, V and Q per
 * layer: every CUDA output within tolerance of the CPU's. Returns the worst |CPU - CUDA| /
 * tolerance. */
double step_both(kvc_cache_t *cpu, kvc_cache_t *gpu, cudaStream_t s, tensors &T,
                 kvc_test_rng_t *rng, std::vector<kvc_seq_id_t> &ids, std::vector<int32_t> &n_new,
                 std::vector<int32_t> &toks) {
  const kvc_dtype_t dt = KVC_DTYPE_F16;
  const int rows = (int)toks.size();
  kvc_batch_t batch = {(int)ids.size(), ids.data(), n_new.data(), toks.data()};
  assert_int_equal(kvc_plan(cpu, &batch, nullptr), KVC_OK);
  assert_int_equal(kvc_plan(gpu, &batch, s), KVC_OK);
  const float scale = 1.0f / sqrtf((float)kHeadDim);
  double worst = 0;
  for (int l = 0; l < kLayers; l++) {
    T.fill(rng, dt, rows);
    T.upload(rows, s);
    assert_int_equal(kvc_store(cpu, l, T.k.data(), T.v.data(), nullptr), KVC_OK);
    assert_int_equal(kvc_store_cuda(gpu, l, T.dk, T.dv, s), KVC_OK);
    assert_int_equal(kvc_attend(cpu, l, T.q.data(), T.out_cpu.data(), scale, nullptr), KVC_OK);
    CUDA_OK(cudaMemsetAsync(T.dout, 0xFF, (size_t)rows * kQRow * 2, s));
    assert_int_equal(kvc_attend_cuda(gpu, l, T.dq, T.dout, scale, s), KVC_OK);
    CUDA_OK(cudaMemcpyAsync(T.out_gpu.data(), T.dout, (size_t)rows * kQRow * 2,
                            cudaMemcpyDeviceToHost, s));
    CUDA_OK(cudaStreamSynchronize(s));
    for (int row = 0; row < rows; row++) {
      double mx = 0;
      for (int e = 0; e < kQRow; e++)
        mx = fmax(mx, fabs(from_dtype(dt, T.out_cpu[(size_t)row * kQRow + e])));
      for (int e = 0; e < kQRow; e++) {
        const double a = from_dtype(dt, T.out_cpu[(size_t)row * kQRow + e]);
        const double b = from_dtype(dt, T.out_gpu[(size_t)row * kQRow + e]);
        const double tol = tolerance(dt, a, mx);
        if (!(fabs(a - b) <= tol))
          fail_msg("layer %d row %d element %d: CPU %.6g CUDA %.6g (row max %.4g)", l, row, e, a,
                   b, mx);
        if (tol > 0) worst = fmax(worst, fabs(a - b) / tol);
      }
    }
  }
  assert_int_equal(kvc_cache_validate(cpu), KVC_OK);
  assert_int_equal(kvc_cache_validate(gpu), KVC_OK);
  return worst;
}

/*
 * Sequences that share two prompts' blocks through prefix-cache hits, on a CUDA cache that reads
 * the prefix each group of a step's sequences shares once for the group (cascade 2) and on the
 * CPU: the two prompts' prefill (sequences 1 and 10), then thirteen more sequences in one step of
 * several rows each (eight on the first prompt's six blocks, four on the second's), then decode
 * steps of all fifteen (after kvc_cache_synchronize has compressed the prompts' blocks), and a
 * step of one group only. Every output within tolerance of the CPU's.
 */
void cascade_matches_cpu(void **state) {
  (void)state;
  if (!kvc_test_have_gpu()) skip();
  kvc_config_t cc = config(KVC_BACKEND_CPU, KVC_DTYPE_F16, (size_t)4 << 20);
  kvc_config_t cg = config(KVC_BACKEND_CUDA, KVC_DTYPE_F16, (size_t)4 << 20);
  cg.cascade = 2;
  kvc_cache_t *cpu, *gpu;
  assert_int_equal(kvc_cache_create(&cc, &cpu), KVC_OK);
  assert_int_equal(kvc_cache_create(&cg, &gpu), KVC_OK);
  cudaStream_t s;
  CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  kvc_test_rng_t rng;
  kvc_test_rng_seed(&rng, 4242);
  tensors T;
  const int kPrompt = 6 * kBt + 4, kOwn = 7;
  std::vector<int32_t> prompts[2];
  for (auto &p : prompts)
    for (int t = 0; t < kPrompt; t++) p.push_back((int32_t)kvc_test_rng_below(&rng, 5000));
  /* Sequences 1-9 on the first prompt, 10-14 on the second; 1 and 10 prefill it. */
  auto prompt_of = [&](int id) -> const std::vector<int32_t> & { return prompts[id >= 10]; };
  double worst = 0;
  auto add = [&](kvc_seq_id_t id, const std::vector<int32_t> &tok, int want_cached) {
    int cached_c = -1, cached_g = -1;
    assert_int_equal(kvc_seq_add(cpu, id, tok.data(), (int)tok.size(), 0, &cached_c), KVC_OK);
    assert_int_equal(kvc_seq_add(gpu, id, tok.data(), (int)tok.size(), 0, &cached_g), KVC_OK);
    assert_int_equal(cached_c, want_cached);
    assert_int_equal(cached_g, want_cached);
    assert_int_equal(kvc_seq_reserve(cpu, id, (int)tok.size() - want_cached, 0), KVC_OK);
    assert_int_equal(kvc_seq_reserve(gpu, id, (int)tok.size() - want_cached, 0), KVC_OK);
  };
  auto sync = [&] {
    assert_int_equal(kvc_cache_synchronize(cpu), KVC_OK);
    assert_int_equal(kvc_cache_synchronize(gpu), KVC_OK);
  };
  std::vector<kvc_seq_id_t> ids;
  std::vector<int32_t> n_new, toks;
  for (int id : {1, 10}) {
    add((kvc_seq_id_t)id, prompt_of(id), 0);
    ids.push_back((kvc_seq_id_t)id);
    n_new.push_back(kPrompt);
    toks.insert(toks.end(), prompt_of(id).begin(), prompt_of(id).end());
  }
  worst = fmax(worst, step_both(cpu, gpu, s, T, &rng, ids, n_new, toks));
  sync();
  /* The prompts' text and their own tokens: hits on their prompt's six full blocks. */
  ids.clear();
  n_new.clear();
  toks.clear();
  for (int id = 2; id <= 14; id++) {
    if (id == 10) continue;
    std::vector<int32_t> tok = prompt_of(id);
    for (int t = 0; t < kOwn; t++) tok.push_back((int32_t)kvc_test_rng_below(&rng, 5000));
    add((kvc_seq_id_t)id, tok, 6 * kBt);
    ids.push_back((kvc_seq_id_t)id);
    n_new.push_back(kPrompt + kOwn - 6 * kBt);
    toks.insert(toks.end(), tok.begin() + 6 * kBt, tok.end());
  }
  worst = fmax(worst, step_both(cpu, gpu, s, T, &rng, ids, n_new, toks));
  sync();
  /* Every sequence's table starts with its prompt's six blocks. */
  int32_t lead[2][kMaxLen / kBt + 1], blocks[kMaxLen / kBt + 1];
  int n = 0;
  assert_int_equal(kvc__cache_seq_blocks(gpu, 1, lead[0], kMaxLen / kBt + 1, &n), KVC_OK);
  assert_int_equal(kvc__cache_seq_blocks(gpu, 10, lead[1], kMaxLen / kBt + 1, &n), KVC_OK);
  assert_true(lead[0][0] != lead[1][0]);
  for (int id = 2; id <= 14; id++) {
    assert_int_equal(kvc__cache_seq_blocks(gpu, (kvc_seq_id_t)id, blocks, kMaxLen / kBt + 1, &n),
                     KVC_OK);
    assert_memory_equal(blocks, lead[id >= 10], 6 * sizeof(int32_t));
  }
  /* Decode: both groups (steps 0-4), then the second group alone (step 5). */
  for (int step = 0; step < 6; step++) {
    ids.clear();
    n_new.clear();
    toks.clear();
    for (int id = step < 5 ? 1 : 10; id <= 14; id++) {
      assert_int_equal(kvc_seq_reserve(cpu, (kvc_seq_id_t)id, 1, 0), KVC_OK);
      assert_int_equal(kvc_seq_reserve(gpu, (kvc_seq_id_t)id, 1, 0), KVC_OK);
      ids.push_back((kvc_seq_id_t)id);
      n_new.push_back(1);
      toks.push_back((int32_t)kvc_test_rng_below(&rng, 5000));
    }
    worst = fmax(worst, step_both(cpu, gpu, s, T, &rng, ids, n_new, toks));
  }
  print_message("cascade: worst %.2f of tolerance\n", worst);
  kvc_cache_destroy(cpu);
  kvc_cache_destroy(gpu);
  CUDA_OK(cudaStreamDestroy(s));
}

/*
 * The backend's choice of two passes (kvc_attn_args_t.huffman_rare), end to end: a cache whose
 * per-page policy (the fastest codec within the default budget, an absolute bound) codes nearly
 * every page bit-pack, and a few Huffman, holding enough tokens for two passes to pay
 * (kvc_attn_cuda_two_passes_pay: 2^18 tokens x kv heads at head_dim 64). Seven sequences of
 * awkward lengths are prefilled without attention (no CPU reference over prompts this long);
 * four blocks are sparse (most values near zero, a few large: bit-pack needs the whole range,
 * Huffman codes the zeros short), so their pages in both layers come out Huffman. Then decode
 * steps: every CUDA output within tolerance of the CPU's; the planned launch of every sequence's
 * step is v3 in two passes (with 131207 tokens, just past the threshold), whose second pass alone
 * reads the Huffman pages' CTAs (without it their rows, or the combine of the partials pass 1
 * left unwritten, fail the comparison), and a step of the shortest sequence alone is one launch
 * of v3's Huffman instance.
 */
void two_passes_matches_cpu(void **state) {
  (void)state;
  if (!kvc_test_have_gpu()) skip();
  const int lens[] = {16411, 23000, 9001, 30000, 17777, 20011, 15000};
  const int kChunkRows = 4096;
  const int n_seqs = (int)(sizeof lens / sizeof lens[0]);
  /* (sequence, block) of the sparse blocks: the first block, a last full one, middles. */
  const int sparse[4][2] = {{0, 0}, {2, 9001 / kBt - 1}, {3, 1000}, {5, 700}};
  kvc_config_t cfg[2];
  kvc_cache_t *c[2];
  for (int i = 0; i < 2; i++) {
    cfg[i] = config(i ? KVC_BACKEND_CUDA : KVC_BACKEND_CPU, KVC_DTYPE_F16, (size_t)96 << 20);
    cfg[i].policy = KVC_POLICY_FASTEST_WITHIN;
    cfg[i].bound_mode = KVC_BOUND_ABSOLUTE;
    cfg[i].k_bound = cfg[i].v_bound = 0.3f;
    cfg[i].max_seq_len = 32768;
    cfg[i].max_batch_tokens = kChunkRows;
    assert_int_equal(kvc_cache_create(&cfg[i], &c[i]), KVC_OK);
  }
  kvc_cache_t *cpu = c[0], *gpu = c[1];
  cudaStream_t s;
  CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  kvc_test_rng_t rng;
  kvc_test_rng_seed(&rng, 909);
  tensors T(kChunkRows);
  std::vector<kvc_seq_id_t> ids;
  long long tokens = 0;
  for (int q = 0; q < n_seqs; q++) {
    const kvc_seq_id_t id = (kvc_seq_id_t)(1 + q);
    ids.push_back(id);
    tokens += lens[q];
    int cached = -1;
    for (kvc_cache_t *cc : c)
      assert_int_equal(kvc_seq_add(cc, id, nullptr, 0, 0, &cached), KVC_OK);
  }
  /* Prefill, kChunkRows rows of one sequence per step, stores only (the uploads from pageable
   * memory copy T's rows before they return, and the store reads them on the same stream). */
  for (int q = 0; q < n_seqs; q++)
    for (int t0 = 0; t0 < lens[q]; t0 += kChunkRows) {
      const int rows = lens[q] - t0 < kChunkRows ? lens[q] - t0 : kChunkRows;
      const kvc_batch_t batch = {1, &ids[q], &rows, nullptr};
      for (kvc_cache_t *cc : c) assert_int_equal(kvc_seq_reserve(cc, ids[q], rows, 0), KVC_OK);
      assert_int_equal(kvc_plan(cpu, &batch, nullptr), KVC_OK);
      assert_int_equal(kvc_plan(gpu, &batch, s), KVC_OK);
      for (int l = 0; l < kLayers; l++) {
        for (int r = 0; r < rows; r++) {
          bool sp = false;
          for (const auto &b : sparse) sp |= b[0] == q && b[1] == (t0 + r) / kBt;
          for (int e = 0; e < kKvRow; e++) {
            const size_t i = (size_t)r * kKvRow + e;
            double k = kvc_test_rng_normal(&rng) + 0.3 * (e % kHeadDim % 5);
            double v = kvc_test_rng_normal(&rng);
            if (sp) {
              k = kvc_test_rng_below(&rng, 20) == 0 ? 5 * k : 0.1 * k;
              v = kvc_test_rng_below(&rng, 20) == 0 ? 5 * v : 0.1 * v;
            }
            T.k[i] = kvc_test_f32_to_f16((float)k);
            T.v[i] = kvc_test_f32_to_f16((float)v);
          }
        }
        T.upload(rows, s);
        assert_int_equal(kvc_store(cpu, l, T.k.data(), T.v.data(), nullptr), KVC_OK);
        assert_int_equal(kvc_store_cuda(gpu, l, T.dk, T.dv, s), KVC_OK);
      }
    }
  kvc_stats_t st[2];
  for (int i = 0; i < 2; i++) {
    assert_int_equal(kvc_cache_synchronize(c[i]), KVC_OK);
    st[i] = {};
    st[i].struct_size = sizeof(kvc_stats_t);
    assert_int_equal(kvc_get_stats(c[i], &st[i]), KVC_OK);
    assert_int_equal(st[i].pages_by_codec[KVC_CODEC_HUFFMAN], 4 * kLayers);
    assert_int_equal(st[i].pages_by_codec[KVC_CODEC_RAW], 0);
    assert_true(st[i].pages_by_codec[KVC_CODEC_BITPACK] >= 4 * kLayers * 1024);
  }
  assert_int_equal(st[0].pages_by_codec[KVC_CODEC_BITPACK],
                   st[1].pages_by_codec[KVC_CODEC_BITPACK]);
  /* Decode: every sequence (two steps), then the shortest alone, too short for two passes. */
  double worst = 0;
  for (int step = 0; step < 3; step++) {
    std::vector<kvc_seq_id_t> step_ids;
    std::vector<int32_t> toks;
    for (int q = step < 2 ? 0 : 2; q < (step < 2 ? n_seqs : 3); q++) {
      step_ids.push_back(ids[q]);
      toks.push_back((int32_t)kvc_test_rng_below(&rng, 5000));
      for (kvc_cache_t *cc : c) assert_int_equal(kvc_seq_reserve(cc, ids[q], 1, 0), KVC_OK);
    }
    std::vector<int32_t> n_new(step_ids.size(), 1);
    worst = fmax(worst, step_both(cpu, gpu, s, T, &rng, step_ids, n_new, toks));
    assert_int_equal(kvc__cache_cuda_kernel(gpu), step < 2 ? 3 : 2);
    assert_int_equal(kvc__cache_cuda_kernel(cpu), -1);
  }
  print_message("two passes: %lld tokens, pages by codec bitpack/huffman %lld/%lld, worst %.2f of "
                "tolerance\n",
                tokens, (long long)st[1].pages_by_codec[KVC_CODEC_BITPACK],
                (long long)st[1].pages_by_codec[KVC_CODEC_HUFFMAN], worst);
  kvc_cache_destroy(cpu);
  kvc_cache_destroy(gpu);
  CUDA_OK(cudaStreamDestroy(s));
}

} // namespace

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(cuda_matches_cpu_f16),
      cmocka_unit_test(cuda_matches_cpu_bf16),
      cmocka_unit_test(cuda_matches_cpu_raw),
      cmocka_unit_test(cuda_matches_cpu_fastest),
      cmocka_unit_test(graph_capture),
      cmocka_unit_test(cascade_matches_cpu),
      cmocka_unit_test(two_passes_matches_cpu),
  };
  /* KVC_TEST_FILTER: run only the tests whose names match (cmocka pattern), e.g. under a sanitizer. */
  if (getenv("KVC_TEST_FILTER")) cmocka_set_test_filter(getenv("KVC_TEST_FILTER"));
  return cmocka_run_group_tests(tests, NULL, NULL);
}
