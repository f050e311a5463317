/*
 * Decode attention on the GPU: kvcomp over Huffman pages, over bit-pack pages and over fp16 staging
 * pages, against cuBLAS attention (batched GEMM, softmax, batched GEMM) on dense fp16, and the
 * measured ceilings: device-to-device copy (read + write) and loads only (what attention does). bench/attention.sh adds torch SDPA (attention_torch.py)
 * and the speed-ups. Shape: 32 query heads, 8 kv heads, head_dim 128 (KVC_BENCH_HD at build time:
 * gpu_bench_attention_hd64 and _hd256 are this program at head_dim 64 and 256, over the same KV
 * bytes: 2^21 x 128 / head_dim tokens, so (16, 128k) is left out at 256), block_tokens 64
 * (KVC_BENCH_BT at build time), fp16,
 * one query token per sequence; (batch, context) = (1, 32k), (8, 32k), (32, 8k), (64, 4k),
 * (16, 128k).
 *
 * One logical KV of 2^21 tokens at head_dim 128 (16 x 128k, one layer: 8.6 GB in fp16) is
 * generated on the GPU from a hash of (token, channel) with model-like statistics (keys:
 * per-channel offset and scale, one channel in 16 an outlier; values: per-channel scale),
 * compressed once by the CUDA codec
 * (kvc_codec_cuda_compress) into a Huffman pool, a bit-pack pool and a raw-codec pool, and written
 * as staging pages into an fp16 pool; pages sit in shuffled chunks. The fp16 pool's staging pages
 * (row kvcomp_fp16_paged) are the layout of a cache's uncompressed tail; a cache of fp16 pages
 * stores full blocks as raw-codec pages (header, section table, rows: row kvcomp_fp16_raw).
 * cuBLAS reads the same values in dense layout.
 * A configuration uses disjoint slices of that KV in turn ("sets", up to 64) so that repeated runs
 * never find their inputs in the 50 MB L2. Each pool runs with the codec mask the cache passes for
 * it (fp16: raw only, v3 with units split between two warps; bit-pack: no Huffman, the v3 decode
 * kernel; Huffman: v3's Huffman instance), the Huffman pool also under a mask allowing every codec
 * (row kvcomp_huffman_any: the instance a cache with a per-page policy runs), the bit-pack pools
 * and the bf16 Huffman pool likewise (kvcomp_bitpack_any, kvcomp_bitpack_bf16_any,
 * kvcomp_huffman_bf16_any), the bit-pack pools and the Huffman pool under that mask in two passes
 * (kvc_attn_args_t.huffman_rare; rows *_any_2pass: what such a cache runs where its pages came
 * out bit-pack, and for Huffman pages the cost of that choice made wrongly), and each pool again
 * with mask 0 (v2, rows *_v2). The same KV rounded to bf16 fills a bf16 staging pool and bf16
 * bit-pack and Huffman pools, read with bf16 queries (rows kvcomp_bf16_paged, kvcomp_bitpack_bf16,
 * kvcomp_huffman_bf16; their rel_err includes bf16's rounding of K, V and Q, and bench/attention.sh
 * compares them with SDPA on fp16, which reads as many bytes). Then batches whose sequences share
 * prefixes, one for the whole batch or one per group of sequences (rows *_prefix: read by every
 * sequence; *_auto: the cascade where kvc_attn_cuda_cascade_pays, as the plan decides; *_cascade:
 * read once per group; their rel_err is against *_prefix, and their read TB/s counts the prefixes'
 * pages once). Then 8 sequences of 32k tokens with 2-256 query rows each (speculative tokens,
 * prefill chunks: rows qrows > 1; each pool with its cache's mask, which lets the launcher pick v3 over several
 * query tiles, and on v2; errors against fp16 pages on v2). Times: CUDA events around each call
 * after warm-up, median. Output: a table, then one JSON line:
 *   {"bench":"attention_kvcomp","copy_tbps":..,"read_ceiling_tbps":..,"sustain_ms":..,
 *    "rows":[{"impl","batch","context","prefix","groups","qrows","ms","logical_tbps","read_tbps",
 *    "rel_err_vs_fp16"}]}
 * Usage: gpu_bench_attention [--quick | --qrows [R [IMPL[,IMPL...]]] | --only B CTX [IMPL[,...]]]
 * (--qrows: the multi-query rows alone, or those of R rows and the IMPLs given (the fp16 v2
 * reference still runs once, untimed, before them; e.g. under a profiler); --quick: 2^18 tokens,
 * contexts / 8, for a smoke run; --only: the shape (B, CTX) alone, one of the five or any other
 * whose B x CTX tokens the bench's pages hold (2^21; CTX a multiple of 64), and of the kvcomp rows
 * only the IMPLs given, e.g. under a profiler)
 */
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "attention/kvc_attn.h"
#include "compress/kvc_codec.h"
#include "compress/kvc_codec_cuda.h"
#include "compress/kvc_page_format.h"

#define CK(x)                                                                                      \
  do {                                                                                             \
    cudaError_t e_ = (x);                                                                          \
    if (e_ != cudaSuccess) {                                                                       \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));         \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)
#define KV(x)                                                                                      \
  do {                                                                                             \
    kvc_status_t s_ = (x);                                                                         \
    if (s_ != KVC_OK) {                                                                            \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, kvc_status_string(s_));          \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)
#define CB(x)                                                                                      \
  do {                                                                                             \
    cublasStatus_t s_ = (x);                                                                       \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                             \
      fprintf(stderr, "%s:%d: %s: cuBLAS status %d\n", __FILE__, __LINE__, #x, (int)s_);          \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

namespace {

#ifndef KVC_BENCH_BT
#define KVC_BENCH_BT 64 /* block_tokens: another at build time (-DKVC_BENCH_BT=16) */
#endif
#ifndef KVC_BENCH_HD
#define KVC_BENCH_HD 128
#endif
constexpr int HQ = 32, HKV = 8, HD = KVC_BENCH_HD, BT = KVC_BENCH_BT, GROUP = HQ / HKV;
static_assert(HD == 64 || HD == 128 || HD == 256, "the CUDA backend's head sizes");
constexpr size_t kStaging = 2ull * HKV * BT * HD * 2; /* one staging page: 256 KiB at HD 128 */
/* Chunk sizes: 64 KiB for staging pages (4 chunks each; at most a staging page, which is 32 KiB
 * at head_dim 64 with 16-token blocks), 16 KiB for compressed pages, unless KVC_BENCH_CHUNK_KIB
 * (4-64, a power of two) sets both, e.g. to a cache's own (kvc_cache picks 8 KiB at this shape). */
constexpr uint32_t kFp16Chunk = 64 * 1024;
constexpr uint32_t kPageChunk = 16 * 1024;
/* Pool bytes per compressed page, on average. */
constexpr size_t kCompressedBudget = (size_t)160 * 1024 * HD / 128;
constexpr int kMaxSets = 64;

/* ---- synthetic model-like KV ------------------------------------------------------------------ */

__host__ __device__ inline uint64_t mix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
__device__ inline float uniform01(uint64_t h) { return (float)((h >> 40) + 1) * (1.0f / 16777217.0f); }
__device__ inline float normal(uint64_t h) {
  float u1 = uniform01(h), u2 = uniform01(mix64(h));
  return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}
/* tensor 0 = K, 1 = V; channel c = head * HD + d; token is global. */
__device__ inline float kv_value(int tensor, uint64_t token, int c) {
  const uint64_t hc = mix64(0xc0ffee00ull + (uint64_t)c);
  const bool outlier = ((hc >> 8) & 15) == 0;
  const uint64_t hv = mix64((token << 12) ^ ((uint64_t)c << 1) ^ (uint64_t)tensor);
  if (tensor == 0) {
    const float off = normal(mix64(hc + 1)) * (outlier ? 4.0f : 0.5f);
    const float sc = (0.5f + uniform01(mix64(hc + 2))) * (outlier ? 8.0f : 1.0f);
    return off + sc * normal(hv);
  }
  return (0.25f + uniform01(mix64(hc + 3))) * normal(hv);
}

/* Blocks [block0, block0 + nblk) in the staging layout, back to back:
 *   // [nblk][2][HKV][BT][HD] fp16 */
__global__ void gen_staging(__half *out, int64_t block0, int nblk) {
  const int64_t n = (int64_t)nblk * 2 * HKV * BT * HD / 8;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    int64_t e = i * 8;
    const int d = (int)(e % HD);
    e /= HD;
    const int t = (int)(e % BT);
    e /= BT;
    const int h = (int)(e % HKV);
    e /= HKV;
    const int tensor = (int)(e % 2);
    const int64_t b = e / 2;
    const uint64_t token = (uint64_t)(block0 + b) * BT + t;
    __align__(16) __half v[8];
    for (int j = 0; j < 8; j++) v[j] = __float2half_rn(kv_value(tensor, token, h * HD + d + j));
    *(uint4 *)(out + i * 8) = *(const uint4 *)v;
  }
}

/* Dense K and V of `nseq` sequences of `ctx` tokens, sequence s starting at global token
 * (seq0 + s) * ctx:   // k, v [nseq][HKV][ctx][HD] fp16 */
__global__ void gen_dense(__half *k, __half *v, int64_t seq0, int nseq, int ctx) {
  const int64_t n = (int64_t)nseq * HKV * ctx * HD / 8;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    int64_t e = i * 8;
    const int d = (int)(e % HD);
    e /= HD;
    const int t = (int)(e % ctx);
    e /= ctx;
    const int h = (int)(e % HKV);
    const int64_t s = e / HKV;
    const uint64_t token = (uint64_t)(seq0 + s) * ctx + t;
    __align__(16) __half kv[8], vv[8];
    for (int j = 0; j < 8; j++) {
      kv[j] = __float2half_rn(kv_value(0, token, h * HD + d + j));
      vv[j] = __float2half_rn(kv_value(1, token, h * HD + d + j));
    }
    *(uint4 *)(k + i * 8) = *(const uint4 *)kv;
    *(uint4 *)(v + i * 8) = *(const uint4 *)vv;
  }
}

/* Copies staging blocks into the fp16 pool of chunks of cb bytes: block b's 16-byte piece o goes
 * to chunk chunk_of[(block0 + b) * (kStaging / cb) + o / cb]. */
__global__ void scatter_staging(uint8_t *pool, const uint8_t *blocks, const uint32_t *chunk_of,
                                int64_t block0, int nblk, uint32_t cb) {
  const int64_t n = (int64_t)nblk * kStaging / 16;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = i / (kStaging / 16), o = (i % (kStaging / 16)) * 16;
    const uint32_t c = chunk_of[(block0 + b) * (kStaging / cb) + o / cb];
    *(uint4 *)(pool + (uint64_t)c * cb + o % cb) = *(const uint4 *)(blocks + i * 16);
  }
}

__global__ void to_bf16(const __half *x, __nv_bfloat16 *y, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    y[i] = __float2bfloat16_rn(__half2float(x[i]));
}

__global__ void fill_random_half(__half *x, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x)
    x[i] = __float2half_rn(normal(mix64(seed ^ (uint64_t)i)));
}

/* Row softmax for cuBLAS attention: s [rows][n] fp32 (already scaled) -> p [rows][n] fp16. */
/* Streams n 16-byte words with eight loads in flight per thread (evict-first: nothing is reused);
 * `sink` is written only so that the loads cannot be removed. */
__global__ void read_stream(const uint4 *x, size_t n, uint32_t *sink) {
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  uint32_t acc = 0;
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + 7 * stride < n; i += 8 * stride) {
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; u++) v[u] = __ldcs(x + i + u * stride);
#pragma unroll
    for (int u = 0; u < 8; u++) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n; i += stride) acc ^= x[i].x;
  if (acc == 0x9e3779b9u) *sink = acc;
}

__global__ void softmax_rows(const float *s, __half *p, int n) {
  const float *row = s + (size_t)blockIdx.x * n;
  __half *prow = p + (size_t)blockIdx.x * n;
  __shared__ float red[32];
  float mx = -INFINITY;
  for (int i = threadIdx.x; i < n; i += blockDim.x) mx = fmaxf(mx, row[i]);
  for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = mx;
  __syncthreads();
  mx = -INFINITY;
  for (int w = 0; w < (int)blockDim.x / 32; w++) mx = fmaxf(mx, red[w]);
  __syncthreads();
  float sum = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) sum += __expf(row[i] - mx);
  for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = sum;
  __syncthreads();
  sum = 0.f;
  for (int w = 0; w < (int)blockDim.x / 32; w++) sum += red[w];
  const float inv = 1.f / sum;
  for (int i = threadIdx.x; i < n; i += blockDim.x) prow[i] = __float2half_rn(__expf(row[i] - mx) * inv);
}

/* ---- timing ---------------------------------------------------------------------------------- */

/* KVC_BENCH_SUSTAIN_MS (default 0): before each timed loop, run the call for about that long.
 * Under load the H200 reaches its power cap within about a second and lowers the SM clock (seen:
 * 1.98 GHz -> 1.44-1.9 GHz at ~675 W); a timed loop of ~300 ms right after a pause runs partly
 * before that, so kernels bound by their instructions read faster than they run under sustained
 * load. */
double sustain_ms() {
  const char *e = getenv("KVC_BENCH_SUSTAIN_MS");
  return e ? std::max(0.0, atof(e)) : 0.0;
}

/* Median of CUDA-event times of fn(set) after warm-up (and KVC_BENCH_SUSTAIN_MS); sets rotate. */
template <class F> double median_ms(F fn, int sets, cudaStream_t st) {
  for (int i = 0; i < 3; i++) fn(i % sets);
  CK(cudaStreamSynchronize(st));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  CK(cudaEventRecord(a, st));
  fn(0);
  CK(cudaEventRecord(b, st));
  CK(cudaEventSynchronize(b));
  float once = 0;
  CK(cudaEventElapsedTime(&once, a, b));
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  const int iters = std::max(20, std::min(400, (int)(300.0 / std::max(once, 0.001f))));
  const int sustain = (int)std::min(1e6, sustain_ms() / std::max(once, 0.001f));
  for (int i = 0; i < sustain; i++) fn(i % sets);
  std::vector<cudaEvent_t> ev(2 * iters);
  for (auto &e : ev) CK(cudaEventCreate(&e));
  for (int i = 0; i < iters; i++) {
    CK(cudaEventRecord(ev[2 * i], st));
    fn(i % sets);
    CK(cudaEventRecord(ev[2 * i + 1], st));
  }
  CK(cudaStreamSynchronize(st));
  std::vector<float> t(iters);
  for (int i = 0; i < iters; i++) CK(cudaEventElapsedTime(&t[i], ev[2 * i], ev[2 * i + 1]));
  for (auto &e : ev) CK(cudaEventDestroy(e));
  std::sort(t.begin(), t.end());
  return t[iters / 2];
}

/* Whether `name` is one of the comma-separated names in `list`. */
bool in_list(const char *list, const char *name) {
  const size_t n = strlen(name);
  for (const char *s = list; s; s = strchr(s, ',')) {
    if (*s == ',') s++;
    if (strncmp(s, name, n) == 0 && (s[n] == ',' || s[n] == '\0')) return true;
  }
  return false;
}

double rel_l2(const std::vector<__half> &got, const std::vector<__half> &ref) {
  double e2 = 0, r2 = 0;
  for (size_t i = 0; i < got.size(); i++) {
    double g = __half2float(got[i]), r = __half2float(ref[i]);
    if (std::isnan(g)) return INFINITY;
    e2 += (g - r) * (g - r);
    r2 += r * r;
  }
  return std::sqrt(e2 / r2);
}

/* One pool of pages for every block of the logical KV. */
struct pages {
  const char *name;
  uint8_t *pool = nullptr;
  uint32_t chunk_bytes = 0;
  kvc_dtype_t dtype = KVC_DTYPE_F16;
  kvc_page_entry_t *dir = nullptr;
  std::vector<uint32_t> page_bytes; /* per block */
};

struct row {
  const char *impl;
  int batch, context;
  double ms, logical_tbps, read_tbps, rel_err;
  int prefix; /* tokens of the prefix each group of sequences shares (0: none) */
  int groups; /* the groups of sequences that share one */
  int qrows = 1; /* query rows per sequence (speculative tokens), the last ones of its context */
};

/* A device copy of h, remembered in `owned` (the caller frees it). */
int32_t *upload(const std::vector<int32_t> &h, std::vector<int32_t *> &owned) {
  int32_t *d;
  CK(cudaMalloc(&d, 4 * h.size()));
  CK(cudaMemcpy(d, h.data(), 4 * h.size(), cudaMemcpyHostToDevice));
  owned.push_back(d);
  return d;
}

/* Decode arguments over pool pg with codec_mask: B sequences of ctx tokens, one query row each
 * (the caller sets q and block_ids per call). */
kvc_attn_args_t decode_args(const pages &pg, uint32_t codec_mask, int B, int ctx,
                            const int32_t *qo, const int32_t *len, const int32_t *indptr,
                            void *out, void *ws, size_t ws_bytes, float scale) {
  kvc_attn_args_t a;
  memset(&a, 0, sizeof(a));
  a.num_q_heads = HQ;
  a.num_kv_heads = HKV;
  a.head_dim = HD;
  a.block_tokens = BT;
  a.dtype = pg.dtype;
  a.scale = scale;
  a.num_seqs = B;
  a.total_q_rows = B;
  a.qo_indptr = qo;
  a.kv_len = len;
  a.block_indptr = indptr;
  a.max_kv_len = ctx;
  a.max_qo_len = 1;
  a.dir = pg.dir;
  a.pool = pg.pool;
  a.chunk_bytes = pg.chunk_bytes;
  a.out = out;
  a.workspace = ws;
  a.workspace_bytes = ws_bytes;
  a.codec_mask = codec_mask;
  return a;
}

}  // namespace

int main(int argc, char **argv) {
  const bool quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
  /* --only B CTX: that configuration alone (e.g. under a profiler). */
  const bool only = argc > 3 && strcmp(argv[1], "--only") == 0;
  const int only_b = only ? atoi(argv[2]) : 0, only_ctx = only ? atoi(argv[3]) : 0;
  const char *only_impl = only && argc > 4 ? argv[4] : NULL;
  /* --qrows [R [IMPL,...]]: the multi-query rows alone (of R rows, of those IMPLs). */
  const bool qrows_only = argc > 1 && strcmp(argv[1], "--qrows") == 0;
  const int qrows_r = qrows_only && argc > 2 ? atoi(argv[2]) : 0;
  const char *qrows_impl = qrows_only && argc > 3 ? argv[3] : NULL;
  /* The same KV bytes at every head_dim. */
  const int64_t total_tokens = (quick ? (int64_t)1 << 18 : (int64_t)1 << 21) * 128 / HD;
  if (only && (only_b < 1 || only_ctx < BT || only_ctx % BT != 0 ||
               (int64_t)only_b * only_ctx > total_tokens)) {
    fprintf(stderr, "gpu_bench_attention: --only %d %d: B >= 1, CTX a multiple of %d, at most "
            "%lld tokens in all\n", only_b, only_ctx, BT, (long long)total_tokens);
    return 2;
  }
  uint32_t fp16_chunk = kFp16Chunk, page_chunk = kPageChunk;
  if (const char *e = getenv("KVC_BENCH_CHUNK_KIB")) {
    const int kib = atoi(e);
    if (kib < 4 || kib > 64 || (kib & (kib - 1)) != 0) {
      fprintf(stderr, "gpu_bench_attention: KVC_BENCH_CHUNK_KIB=%s: a power of two in 4..64\n", e);
      return 2;
    }
    fp16_chunk = page_chunk = (uint32_t)kib * 1024;
    printf("chunks of %d KiB (KVC_BENCH_CHUNK_KIB)\n", kib);
  }
  fp16_chunk = std::min(fp16_chunk, (uint32_t)kStaging);
  int dev = 0;
  cudaDeviceProp prop;
  if (cudaGetDeviceCount(&dev) != cudaSuccess || dev == 0) {
    fprintf(stderr, "gpu_bench_attention: no CUDA device\n");
    return 2;
  }
  CK(cudaGetDevice(&dev));
  CK(cudaGetDeviceProperties(&prop, dev));
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  printf("device: %s, %d SMs, L2 %d MB; head_dim %d\n", prop.name, prop.multiProcessorCount,
         prop.l2CacheSize >> 20, HD);

  /* Copy ceiling: bytes read plus bytes written over time. */
  double copy_tbps, read_ceil_tbps;
  {
    const size_t bytes = (size_t)2 << 30;
    void *x, *y;
    CK(cudaMalloc(&x, bytes));
    CK(cudaMalloc(&y, bytes));
    CK(cudaMemset(x, 1, bytes));
    double ms = median_ms([&](int) { CK(cudaMemcpyAsync(y, x, bytes, cudaMemcpyDeviceToDevice, st)); },
                          1, st);
    copy_tbps = 2.0 * bytes / (ms * 1e-3) / 1e12;
    /* Read ceiling: the same bytes loaded and discarded, the traffic pattern of attention. */
    uint32_t *sink = (uint32_t *)y;
    ms = median_ms([&](int) {
      read_stream<<<prop.multiProcessorCount * 8, 256, 0, st>>>((const uint4 *)x, bytes / 16, sink);
    }, 1, st);
    read_ceil_tbps = bytes / (ms * 1e-3) / 1e12;
    CK(cudaFree(x));
    CK(cudaFree(y));
  }
  printf("copy ceiling (read + write): %.2f TB/s; read ceiling (loads only): %.2f TB/s\n",
         copy_tbps, read_ceil_tbps);

  const int nblocks = (int)(total_tokens / BT);
  const int ctx_div = quick ? 8 : 1;
  std::vector<std::array<int, 2>> configs = {
      {1, 32768}, {8, 32768}, {32, 8192}, {64, 4096}, {16, 131072}};
  if (only) configs = {{only_b, only_ctx}};
  configs.erase(std::remove_if(configs.begin(), configs.end(),
                               [&](const std::array<int, 2> &c) {
                                 return (int64_t)c[0] * (c[1] / ctx_div) > total_tokens;
                               }),
                configs.end());
  if (qrows_only) configs.clear();

  /* ---- pages -------------------------------------------------------------------------------- */
  pages fp16{"kvcomp_fp16_paged"}, bitpack{"kvcomp_bitpack"}, huffman{"kvcomp_huffman"};
  pages fp16_raw{"kvcomp_fp16_raw"};
  pages bf16{"kvcomp_bf16_paged"}, bitpack_bf16{"kvcomp_bitpack_bf16"},
      huffman_bf16{"kvcomp_huffman_bf16"};
  bf16.dtype = bitpack_bf16.dtype = huffman_bf16.dtype = KVC_DTYPE_BF16;
  std::vector<uint32_t> perm((size_t)nblocks * (kStaging / fp16_chunk));
  for (size_t i = 0; i < perm.size(); i++) perm[i] = (uint32_t)i;
  uint64_t rs = 12345;
  for (size_t i = perm.size() - 1; i > 0; i--) std::swap(perm[i], perm[(rs = mix64(rs)) % (i + 1)]);
  uint32_t *chunk_of;
  CK(cudaMalloc(&chunk_of, perm.size() * 4));
  CK(cudaMemcpy(chunk_of, perm.data(), perm.size() * 4, cudaMemcpyHostToDevice));
  for (pages *raw : {&fp16, &bf16}) {
    raw->chunk_bytes = fp16_chunk;
    CK(cudaMalloc(&raw->pool, (size_t)nblocks * kStaging));
  }
  {
    std::vector<kvc_page_entry_t> dir(nblocks);
    for (int b = 0; b < nblocks; b++) {
      memset(&dir[b], 0, sizeof(dir[b]));
      dir[b].nbytes = (uint32_t)kStaging;
      dir[b].kind = KVC_PAGE_STAGING;
      dir[b].nchunks = (uint8_t)(kStaging / fp16_chunk);
      for (int c = 0; c < (int)(kStaging / fp16_chunk); c++)
        dir[b].chunk[c] = perm[(size_t)b * (kStaging / fp16_chunk) + c];
    }
    for (pages *raw : {&fp16, &bf16}) {
      CK(cudaMalloc(&raw->dir, sizeof(kvc_page_entry_t) * nblocks));
      CK(cudaMemcpy(raw->dir, dir.data(), sizeof(kvc_page_entry_t) * nblocks,
                    cudaMemcpyHostToDevice));
      raw->page_bytes.assign(nblocks, (uint32_t)kStaging);
    }
  }
  kvc_codec_params_t cp;
  memset(&cp, 0, sizeof(cp));
  cp.dtype = KVC_DTYPE_F16;
  cp.num_kv_heads = HKV;
  cp.head_dim = HD;
  cp.block_tokens = BT;
  cp.bound_mode = KVC_BOUND_RELATIVE;
  cp.k_bound = KVC_DEFAULT_K_BOUND;
  cp.v_bound = KVC_DEFAULT_V_BOUND;
  cp.policy = KVC_POLICY_FIXED;
  cp.size_budget = 0.35f;
  constexpr int kComp = 5;
  kvc_dev_pool_t pools[kComp];
  pages *comp[kComp] = {&bitpack, &huffman, &bitpack_bf16, &huffman_bf16, &fp16_raw};
  const kvc_codec_t codecs[kComp] = {KVC_CODEC_BITPACK, KVC_CODEC_HUFFMAN, KVC_CODEC_BITPACK,
                                     KVC_CODEC_HUFFMAN, KVC_CODEC_RAW};
  for (int i = 0; i < kComp; i++) {
    /* A raw-codec page: its header and table, then the rows, in whole chunks. */
    const size_t raw_page = kvc_page_sections_start(HKV, KVC_CODEC_RAW) + kStaging;
    const size_t budget = codecs[i] == KVC_CODEC_RAW
                              ? (raw_page + page_chunk - 1) / page_chunk * page_chunk
                              : kCompressedBudget;
    const uint32_t comp_chunks = (uint32_t)(nblocks * budget / page_chunk);
    comp[i]->chunk_bytes = page_chunk;
    CK(cudaMalloc(&comp[i]->pool, (size_t)comp_chunks * page_chunk));
    CK(cudaMalloc(&comp[i]->dir, sizeof(kvc_page_entry_t) * nblocks));
    CK(cudaMemset(comp[i]->dir, 0, sizeof(kvc_page_entry_t) * nblocks));
    kvc_dev_pool_t &p = pools[i];
    p.base = comp[i]->pool;
    p.chunk_bytes = page_chunk;
    p.num_chunks = comp_chunks;
    std::vector<uint32_t> stack(comp_chunks);
    for (uint32_t c = 0; c < comp_chunks; c++) stack[c] = c;
    for (uint32_t c = comp_chunks - 1; c > 0; c--) std::swap(stack[c], stack[(rs = mix64(rs)) % (c + 1)]);
    CK(cudaMalloc(&p.free_stack, 4ull * comp_chunks));
    CK(cudaMemcpy(p.free_stack, stack.data(), 4ull * comp_chunks, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&p.free_top, 4));
    const int32_t top = (int32_t)comp_chunks;
    CK(cudaMemcpy(p.free_top, &top, 4, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&p.error, 4));
    CK(cudaMemset(p.error, 0, 4));
    comp[i]->page_bytes.assign(nblocks, 0);
  }
  {
    const int batch = 2048;
    uint8_t *blocks, *blocks_bf16;
    int32_t *ntok, *ids;
    uint32_t *pbytes;
    CK(cudaMalloc(&blocks, (size_t)batch * kStaging));
    CK(cudaMalloc(&blocks_bf16, (size_t)batch * kStaging));
    CK(cudaMalloc(&ntok, 4 * batch));
    CK(cudaMalloc(&ids, 4 * batch));
    CK(cudaMalloc(&pbytes, 4 * batch));
    std::vector<int32_t> h(batch, BT);
    CK(cudaMemcpy(ntok, h.data(), 4 * batch, cudaMemcpyHostToDevice));
    std::vector<int32_t> hid(batch);
    cudaEvent_t t0, t1;
    CK(cudaEventCreate(&t0));
    CK(cudaEventCreate(&t1));
    float comp_ms[kComp] = {};
    for (int b0 = 0; b0 < nblocks; b0 += batch) {
      const int n = std::min(batch, nblocks - b0);
      for (int i = 0; i < n; i++) hid[i] = b0 + i;
      CK(cudaMemcpyAsync(ids, hid.data(), 4 * n, cudaMemcpyHostToDevice, st));
      gen_staging<<<1024, 256, 0, st>>>((__half *)blocks, b0, n);
      CK(cudaGetLastError());
      to_bf16<<<1024, 256, 0, st>>>((const __half *)blocks, (__nv_bfloat16 *)blocks_bf16,
                                    (int64_t)n * kStaging / 2);
      CK(cudaGetLastError());
      scatter_staging<<<1024, 256, 0, st>>>(fp16.pool, blocks, chunk_of, b0, n, fp16_chunk);
      CK(cudaGetLastError());
      scatter_staging<<<1024, 256, 0, st>>>(bf16.pool, blocks_bf16, chunk_of, b0, n, fp16_chunk);
      CK(cudaGetLastError());
      for (int i = 0; i < kComp; i++) {
        cp.codec = codecs[i];
        cp.dtype = comp[i]->dtype;
        const uint8_t *in = comp[i]->dtype == KVC_DTYPE_BF16 ? blocks_bf16 : blocks;
        CK(cudaEventRecord(t0, st));
        KV(kvc_codec_cuda_compress(&cp, in, ntok, ids, n, comp[i]->dir, pools[i], pbytes, st));
        CK(cudaEventRecord(t1, st));
        CK(cudaMemcpyAsync(comp[i]->page_bytes.data() + b0, pbytes, 4 * n, cudaMemcpyDeviceToHost,
                           st));
        CK(cudaStreamSynchronize(st));
        float ms;
        CK(cudaEventElapsedTime(&ms, t0, t1));
        comp_ms[i] += ms;
      }
    }
    CK(cudaStreamSynchronize(st));
    for (int i = 0; i < kComp; i++) {
      int32_t err = 0;
      CK(cudaMemcpy(&err, pools[i].error, 4, cudaMemcpyDeviceToHost));
      if (err) {
        fprintf(stderr, "gpu_bench_attention: the %s pool ran out of chunks\n", comp[i]->name);
        return 1;
      }
      double bytes = 0;
      for (uint32_t b : comp[i]->page_bytes) bytes += b;
      printf("%s: %.2f GB of pages for %.2f GB of 16-bit KV (ratio %.2f), compressed at %.1f "
             "GB/s\n",
             comp[i]->name, bytes / 1e9, (double)nblocks * kStaging / 1e9,
             (double)nblocks * kStaging / bytes, (double)nblocks * kStaging / (comp_ms[i] * 1e6));
    }
    CK(cudaFree(blocks));
    CK(cudaFree(blocks_bf16));
    CK(cudaFree(ntok));
    CK(cudaFree(ids));
    CK(cudaFree(pbytes));
  }

  /* ---- the configurations --------------------------------------------------------------------- */
  cublasHandle_t cublas;
  CB(cublasCreate(&cublas));
  CB(cublasSetStream(cublas, st));
  std::vector<row> rows;
  const float scale = 1.0f / sqrtf((float)HD);
  for (const auto &cfg : configs) {
    const int B = cfg[0], ctx = cfg[1] / ctx_div, bps = ctx / BT;
    const int sets = (int)std::min<int64_t>(kMaxSets, total_tokens / ((int64_t)B * ctx));
    const double logical = (double)B * ctx * HKV * HD * 2 * 2;
    /* CSR block tables, one per set: sequence i of set r holds blocks (r * B + i) * bps .. */
    std::vector<int32_t> indptr(B + 1), qo(B + 1), lens(B, ctx), ids((size_t)sets * B * bps);
    for (int i = 0; i <= B; i++) {
      indptr[i] = i * bps;
      qo[i] = i;
    }
    for (size_t i = 0; i < ids.size(); i++) ids[i] = (int32_t)i;
    int32_t *d_indptr, *d_qo, *d_len, *d_ids;
    CK(cudaMalloc(&d_indptr, 4 * (B + 1)));
    CK(cudaMalloc(&d_qo, 4 * (B + 1)));
    CK(cudaMalloc(&d_len, 4 * B));
    CK(cudaMalloc(&d_ids, 4 * ids.size()));
    CK(cudaMemcpy(d_indptr, indptr.data(), 4 * (B + 1), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_qo, qo.data(), 4 * (B + 1), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_len, lens.data(), 4 * B, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_ids, ids.data(), 4 * ids.size(), cudaMemcpyHostToDevice));
    const size_t qn = (size_t)B * HQ * HD;
    __half *q, *out;
    CK(cudaMalloc(&q, sizeof(__half) * qn * sets));
    CK(cudaMalloc(&out, sizeof(__half) * qn));
    fill_random_half<<<256, 256, 0, st>>>(q, (int64_t)qn * sets, 777);
    CK(cudaGetLastError());
    __nv_bfloat16 *q_bf16; /* the same queries for the bf16 pools */
    CK(cudaMalloc(&q_bf16, sizeof(__nv_bfloat16) * qn * sets));
    to_bf16<<<256, 256, 0, st>>>(q, q_bf16, (int64_t)qn * sets);
    CK(cudaGetLastError());
    const size_t ws_bytes = kvc_attn_cuda_workspace_bytes(B, HQ, HD, B, ctx, BT);
    void *ws;
    CK(cudaMalloc(&ws, ws_bytes));

    /* cuBLAS attention over dense K/V of the same tokens. */
    __half *dk, *dv, *pm, *ref_out;
    float *sm;
    const size_t dense = (size_t)B * HKV * ctx * HD;
    CK(cudaMalloc(&dk, sizeof(__half) * dense * sets));
    CK(cudaMalloc(&dv, sizeof(__half) * dense * sets));
    CK(cudaMalloc(&sm, sizeof(float) * (size_t)B * HQ * ctx));
    CK(cudaMalloc(&pm, sizeof(__half) * (size_t)B * HQ * ctx));
    CK(cudaMalloc(&ref_out, sizeof(__half) * qn));
    gen_dense<<<2048, 256, 0, st>>>(dk, dv, 0, B * sets, ctx);
    CK(cudaGetLastError());
    auto cublas_attn = [&](int r, __half *o) {
      const float one = 1.f, zero = 0.f;
      const __half *k = dk + dense * r, *v = dv + dense * r, *qq = q + qn * r;
      CB(cublasGemmStridedBatchedEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, ctx, GROUP, HD, &scale, k,
                                    CUDA_R_16F, HD, (long long)ctx * HD, qq, CUDA_R_16F, HD,
                                    (long long)GROUP * HD, &zero, sm, CUDA_R_32F, ctx,
                                    (long long)GROUP * ctx, B * HKV, CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT));
      softmax_rows<<<B * HQ, 256, 0, st>>>(sm, pm, ctx);
      CK(cudaGetLastError());
      CB(cublasGemmStridedBatchedEx(cublas, CUBLAS_OP_N, CUBLAS_OP_N, HD, GROUP, ctx, &one, v,
                                    CUDA_R_16F, HD, (long long)ctx * HD, pm, CUDA_R_16F, ctx,
                                    (long long)GROUP * ctx, &zero, o, CUDA_R_16F, HD,
                                    (long long)GROUP * HD, B * HKV, CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT));
    };
    cublas_attn(0, ref_out);
    CK(cudaStreamSynchronize(st));
    std::vector<__half> ref(qn), got(qn);
    CK(cudaMemcpy(ref.data(), ref_out, sizeof(__half) * qn, cudaMemcpyDeviceToHost));
    const double cublas_ms = median_ms([&](int r) { cublas_attn(r, out); }, sets, st);
    rows.push_back({"cublas", B, ctx, cublas_ms, logical / (cublas_ms * 1e-3) / 1e12,
                    logical / (cublas_ms * 1e-3) / 1e12, 0.0});
    CK(cudaFree(dk));
    CK(cudaFree(dv));
    CK(cudaFree(sm));
    CK(cudaFree(pm));

    /* Each pool with the codec mask the cache would pass (a raw cache's for the fp16 pool's
     * staging pages and for the raw-codec pages, v3 for bit-pack pages, v3's Huffman instance
     * for Huffman pages; Huffman and bit-pack pages also as a per-page policy's cache passes
     * them, every codec allowed), the bf16 pools as their caches pass them, then the fp16 pools
     * again with mask 0 (v2), for comparison. */
    struct variant {
      pages *pg;
      uint32_t codec_mask;
      const char *impl;
      int huffman_rare; /* kvc_attn_args_t's: two passes */
    };
    const uint32_t no_huffman = (1u << KVC_CODEC_RAW) | (1u << KVC_CODEC_BITPACK);
    const uint32_t any_codec = no_huffman | (1u << KVC_CODEC_HUFFMAN);
    const variant variants[] = {{&fp16, 1u << KVC_CODEC_RAW, fp16.name},
                                {&fp16_raw, 1u << KVC_CODEC_RAW, fp16_raw.name},
                                {&bitpack, no_huffman, bitpack.name},
                                {&huffman, 1u << KVC_CODEC_HUFFMAN, huffman.name},
                                {&huffman, any_codec, "kvcomp_huffman_any"},
                                {&bitpack, any_codec, "kvcomp_bitpack_any"},
                                {&bitpack, any_codec, "kvcomp_bitpack_any_2pass", 1},
                                {&huffman, any_codec, "kvcomp_huffman_any_2pass", 1},
                                {&bf16, 1u << KVC_CODEC_RAW, bf16.name},
                                {&bitpack_bf16, no_huffman, bitpack_bf16.name},
                                {&bitpack_bf16, any_codec, "kvcomp_bitpack_bf16_any"},
                                {&bitpack_bf16, any_codec, "kvcomp_bitpack_bf16_any_2pass", 1},
                                {&huffman_bf16, 1u << KVC_CODEC_HUFFMAN, huffman_bf16.name},
                                {&huffman_bf16, any_codec, "kvcomp_huffman_bf16_any"},
                                {&fp16, 0, "kvcomp_fp16_paged_v2"},
                                {&bitpack, 0, "kvcomp_bitpack_v2"},
                                {&huffman, 0, "kvcomp_huffman_v2"}};
    for (const variant &var : variants) {
      if (only_impl && !in_list(only_impl, var.impl)) continue;
      pages *pg = var.pg;
      kvc_attn_args_t a = decode_args(*pg, var.codec_mask, B, ctx, d_qo, d_len, d_indptr, out, ws,
                                      ws_bytes, scale);
      a.huffman_rare = var.huffman_rare;
      const bool is_bf16 = pg->dtype == KVC_DTYPE_BF16;
      auto run = [&](int r) {
        a.q = is_bf16 ? (const void *)(q_bf16 + qn * r) : (const void *)(q + qn * r);
        a.block_ids = d_ids + (size_t)r * B * bps;
        KV(kvc_attn_cuda(&a, st));
      };
      CK(cudaMemsetAsync(out, 0xFF, sizeof(__half) * qn, st));
      run(0);
      CK(cudaStreamSynchronize(st));
      CK(cudaMemcpy(got.data(), out, sizeof(__half) * qn, cudaMemcpyDeviceToHost));
      if (is_bf16) /* the same 2-byte elements, bf16 */
        for (__half &x : got) {
          __nv_bfloat16_raw b;
          memcpy(&b.x, &x, 2);
          x = __float2half_rn(__bfloat162float(__nv_bfloat16(b)));
        }
      const double err = rel_l2(got, ref);
      const double ms = median_ms(run, sets, st);
      double read = 0;
      for (int b = 0; b < B * bps; b++) read += pg->page_bytes[b];
      rows.push_back({var.impl, B, ctx, ms, logical / (ms * 1e-3) / 1e12, read / (ms * 1e-3) / 1e12,
                      err});
    }
    CK(cudaFree(d_indptr));
    CK(cudaFree(d_qo));
    CK(cudaFree(d_len));
    CK(cudaFree(d_ids));
    CK(cudaFree(q));
    CK(cudaFree(q_bf16));
    CK(cudaFree(out));
    CK(cudaFree(ws));
    CK(cudaFree(ref_out));
  }

  /* ---- prefixes that groups of sequences share ------------------------------------------------
   * (batch, groups, prefix, own tokens after it): the batch in `groups` runs of sequences, each
   * run sharing a prefix of its own (one group: a system prompt; many: parallel sampling). Each
   * pool without the cascade (every sequence reads its prefix), with the plan's choice
   * (kvc_attn_cuda_cascade_pays) and with the cascade forced; errors against the first. Logical
   * bytes count a prefix once per sequence, as dense KV would. */
  const int shared_cfgs[][4] = {{2, 1, 32768, 512},  {4, 1, 16384, 1024}, {8, 1, 16384, 1024},
                                {32, 1, 16384, 512}, {64, 1, 4096, 256},  {128, 1, 2048, 128},
                                {16, 1, 1024, 1024}, {32, 8, 8192, 512},  {64, 16, 4096, 512}};
  for (const auto &cfg : shared_cfgs) {
    if (only || qrows_only) break;
    const int B = cfg[0], G = cfg[1], gsz = B / G, prefix = cfg[2] / ctx_div, own = cfg[3] / ctx_div;
    const int pb = prefix / BT, ob = own / BT, ctx = prefix + own, per_set = G * pb + B * ob;
    const int sets = (int)std::min<int64_t>(kMaxSets, nblocks / per_set);
    const double logical = (double)B * ctx * HKV * HD * 2 * 2;
    /* Set r: blocks r * per_set + g * pb + [0, pb) are group g's prefix, then ob blocks per
     * sequence; sequence i (group i / gsz) has query row i. */
    std::vector<int32_t> indptr(B + 1), qo(B + 1), lens(B, ctx), ids((size_t)sets * B * (pb + ob));
    std::vector<int32_t> pqo(G + 1), prows(B), plen(G, prefix), pstart(G), suf_len(B, own),
        suf_start(B), seq_rows(B, 1), seq_group(B), group_rows(G, gsz), group_tokens(G, prefix);
    for (int i = 0; i <= B; i++) {
      indptr[i] = i * (pb + ob);
      qo[i] = i;
    }
    for (int g = 0; g <= G; g++) pqo[g] = g * gsz;
    for (int i = 0; i < B; i++) {
      prows[i] = i;
      suf_start[i] = indptr[i] + pb;
      seq_group[i] = i / gsz;
      if (i % gsz == 0) pstart[i / gsz] = indptr[i];
    }
    for (int r = 0; r < sets; r++)
      for (int i = 0; i < B; i++)
        for (int j = 0; j < pb + ob; j++)
          ids[((size_t)r * B + i) * (pb + ob) + j] =
              r * per_set + (j < pb ? i / gsz * pb + j : G * pb + i * ob + (j - pb));
    std::vector<int32_t *> dev;
    auto up = [&](const std::vector<int32_t> &h) { return upload(h, dev); };
    int32_t *d_indptr = up(indptr), *d_qo = up(qo), *d_len = up(lens), *d_ids = up(ids);
    int32_t *d_pqo = up(pqo), *d_prows = up(prows), *d_plen = up(plen), *d_pstart = up(pstart);
    int32_t *d_suf_len = up(suf_len), *d_suf_start = up(suf_start);
    const size_t qn = (size_t)B * HQ * HD;
    __half *q, *out;
    CK(cudaMalloc(&q, sizeof(__half) * qn * sets));
    CK(cudaMalloc(&out, sizeof(__half) * qn));
    fill_random_half<<<256, 256, 0, st>>>(q, (int64_t)qn * sets, 778);
    CK(cudaGetLastError());
    const size_t ws_bytes = kvc_attn_cuda_workspace_bytes(B, HQ, HD, B, ctx, BT);
    void *ws;
    CK(cudaMalloc(&ws, ws_bytes));
    struct variant {
      pages *pg;
      uint32_t codec_mask;
      const char *impl[3]; /* cascade 0, 1, 2 */
    };
    const uint32_t no_huffman = (1u << KVC_CODEC_RAW) | (1u << KVC_CODEC_BITPACK);
    const variant variants[] = {
        {&fp16, 1u << KVC_CODEC_RAW,
         {"kvcomp_fp16_paged_prefix", "kvcomp_fp16_paged_auto", "kvcomp_fp16_paged_cascade"}},
        {&bitpack, no_huffman, {"kvcomp_bitpack_prefix", "kvcomp_bitpack_auto", "kvcomp_bitpack_cascade"}},
        {&huffman, 1u << KVC_CODEC_HUFFMAN,
         {"kvcomp_huffman_prefix", "kvcomp_huffman_auto", "kvcomp_huffman_cascade"}}};
    for (const variant &var : variants) {
      std::vector<__half> ref(qn), got(qn);
      for (int mode = 0; mode < 3; mode++) {
        kvc_attn_args_t a = decode_args(*var.pg, var.codec_mask, B, ctx, d_qo, d_len, d_indptr, out,
                                        ws, ws_bytes, scale);
        a.prefix_seqs = G;
        a.prefix_max_rows = gsz;
        a.prefix_max_tokens = prefix;
        a.suffix_max_tokens = own;
        a.prefix_qo_indptr = d_pqo;
        a.prefix_rows = d_prows;
        a.prefix_kv_len = d_plen;
        a.prefix_block_start = d_pstart;
        a.suffix_kv_len = d_suf_len;
        a.suffix_block_start = d_suf_start;
        const bool pays = kvc_attn_cuda_cascade_pays(&a, G, group_rows.data(), group_tokens.data(),
                                                     seq_rows.data(), seq_group.data());
        a.cascade = mode == 2 || (mode == 1 && pays) ? 2 : 0;
        auto run = [&](int r) {
          a.q = q + qn * r;
          a.block_ids = d_ids + (size_t)r * B * (pb + ob);
          KV(kvc_attn_cuda(&a, st));
        };
        CK(cudaMemsetAsync(out, 0xFF, sizeof(__half) * qn, st));
        run(0);
        CK(cudaStreamSynchronize(st));
        CK(cudaMemcpy((mode ? got : ref).data(), out, sizeof(__half) * qn,
                      cudaMemcpyDeviceToHost));
        const double err = mode ? rel_l2(got, ref) : 0.0;
        const double ms = median_ms(run, sets, st);
        double read = 0; /* the pages once each */
        for (int b = 0; b < per_set; b++) read += var.pg->page_bytes[b];
        rows.push_back({var.impl[mode], B, ctx, ms, logical / (ms * 1e-3) / 1e12,
                        read / (ms * 1e-3) / 1e12, err, prefix, G});
      }
    }
    for (int32_t *d : dev) CK(cudaFree(d));
    CK(cudaFree(q));
    CK(cudaFree(out));
    CK(cudaFree(ws));
  }

  /* ---- several query rows per sequence -------------------------------------------------------
   * Speculative tokens (or a short chunk of prefill): R query rows per sequence, the last R
   * tokens of its context, causal, so R x GROUP query entries per kv head. Each pool with its
   * cache's codec mask (the launcher picks v3 over query tiles of 8 entries or v2's larger tiles
   * by its cost model) and with mask 0 (v2 always, rows *_v2); errors against fp16 pages on v2. */
  const int qrow_counts[] = {2, 3, 4, 6, 8, 16, 64, 256}; /* 64, 256: chunks of prefill */
  for (const int R : qrow_counts) {
    if (only) break;
    if (qrows_r && R != qrows_r) continue;
    const int B = 8, ctx = 32768 / ctx_div, bps = ctx / BT;
    const int sets = (int)std::min<int64_t>(kMaxSets, total_tokens / ((int64_t)B * ctx));
    const double logical = (double)B * ctx * HKV * HD * 2 * 2;
    std::vector<int32_t> indptr(B + 1), qo(B + 1), lens(B, ctx), ids((size_t)sets * B * bps);
    for (int i = 0; i <= B; i++) {
      indptr[i] = i * bps;
      qo[i] = i * R;
    }
    for (size_t i = 0; i < ids.size(); i++) ids[i] = (int32_t)i;
    std::vector<int32_t *> dev;
    auto up = [&](const std::vector<int32_t> &h) { return upload(h, dev); };
    int32_t *d_indptr = up(indptr), *d_qo = up(qo), *d_len = up(lens), *d_ids = up(ids);
    const size_t qn = (size_t)B * R * HQ * HD;
    __half *q, *out;
    CK(cudaMalloc(&q, sizeof(__half) * qn * sets));
    CK(cudaMalloc(&out, sizeof(__half) * qn));
    fill_random_half<<<256, 256, 0, st>>>(q, (int64_t)qn * sets, 779);
    CK(cudaGetLastError());
    const size_t ws_bytes = kvc_attn_cuda_workspace_bytes(B * R, HQ, HD, B, ctx, BT);
    void *ws;
    CK(cudaMalloc(&ws, ws_bytes));
    struct variant {
      pages *pg;
      uint32_t codec_mask;
      const char *impl;
      int huffman_rare; /* kvc_attn_args_t's: two passes */
    };
    const uint32_t no_huffman = (1u << KVC_CODEC_RAW) | (1u << KVC_CODEC_BITPACK);
    const variant variants[] = {{&fp16, 0, "kvcomp_fp16_paged_v2"},
                                {&fp16, 1u << KVC_CODEC_RAW, fp16.name},
                                {&bitpack, 0, "kvcomp_bitpack_v2"},
                                {&bitpack, no_huffman, bitpack.name},
                                {&huffman, 0, "kvcomp_huffman_v2"},
                                {&huffman, 1u << KVC_CODEC_HUFFMAN, huffman.name}};
    std::vector<__half> ref(qn), got(qn);
    bool have_ref = false;
    for (const variant &var : variants) {
      const bool timed = !qrows_impl || in_list(qrows_impl, var.impl);
      if (have_ref && !timed) continue;
      kvc_attn_args_t a = decode_args(*var.pg, var.codec_mask, B, ctx, d_qo, d_len, d_indptr, out,
                                      ws, ws_bytes, scale);
      a.total_q_rows = B * R;
      a.max_qo_len = R;
      auto run = [&](int r) {
        a.q = q + qn * r;
        a.block_ids = d_ids + (size_t)r * B * bps;
        KV(kvc_attn_cuda(&a, st));
      };
      CK(cudaMemsetAsync(out, 0xFF, sizeof(__half) * qn, st));
      run(0);
      CK(cudaStreamSynchronize(st));
      CK(cudaMemcpy((have_ref ? got : ref).data(), out, sizeof(__half) * qn,
                    cudaMemcpyDeviceToHost));
      const double err = have_ref ? rel_l2(got, ref) : 0.0;
      have_ref = true;
      if (!timed) continue;
      const double ms = median_ms(run, sets, st);
      double read = 0;
      for (int b = 0; b < B * bps; b++) read += var.pg->page_bytes[b];
      row rw = {var.impl, B, ctx, ms, logical / (ms * 1e-3) / 1e12, read / (ms * 1e-3) / 1e12,
                err, 0, 0};
      rw.qrows = R;
      rows.push_back(rw);
    }
    for (int32_t *d : dev) CK(cudaFree(d));
    CK(cudaFree(q));
    CK(cudaFree(out));
    CK(cudaFree(ws));
  }

  printf("\n%-20s %6s %8s %6s %9s %13s %11s %9s %12s\n", "impl", "batch", "context", "qrows",
         "ms", "logical TB/s", "read TB/s", "of copy", "err vs fp16");
  for (const row &r : rows)
    printf("%-20s %6d %8d %6d %9.4f %13.2f %11.2f %8.0f%% %12.2e\n", r.impl, r.batch, r.context,
           r.qrows, r.ms, r.logical_tbps, r.read_tbps, 100.0 * r.read_tbps / copy_tbps, r.rel_err);
  printf("{\"bench\":\"attention_kvcomp\",\"device\":\"%s\",\"head_dim\":%d,\"copy_tbps\":%.3f,"
         "\"read_ceiling_tbps\":%.3f,\"sustain_ms\":%g,\"rows\":[",
         prop.name, HD, copy_tbps, read_ceil_tbps, sustain_ms());
  for (size_t i = 0; i < rows.size(); i++)
    printf("%s{\"impl\":\"%s\",\"batch\":%d,\"context\":%d,\"prefix\":%d,\"groups\":%d,"
           "\"qrows\":%d,\"ms\":%.5f,\"logical_tbps\":%.3f,\"read_tbps\":%.3f,"
           "\"rel_err_vs_fp16\":%.3e}",
           i ? "," : "", rows[i].impl, rows[i].batch, rows[i].context, rows[i].prefix,
           rows[i].groups, rows[i].qrows, rows[i].ms, rows[i].logical_tbps, rows[i].read_tbps,
           rows[i].rel_err);
  printf("]}\n");
  CB(cublasDestroy(cublas));
  return 0;
}
