/*
 * ./kvc bench codec (GPU part): throughput of kvc_codec_cuda_compress (GB/s of fp16 input) and
 * kvc_codec_cuda_decompress (GB/s of fp16 output) on a ~1 GiB prefill batch: 4096 blocks of 64
 * tokens x 8 kv heads x head_dim 128 (K and V), synthetic K/V generated on the device (per-channel
 * offsets and scales, like bench_codec). CUDA events, one warm-up, median of 5 runs; the free stack
 * is reset between runs (a pop does not modify the stack array). Also checks, on the first 16
 * pages, that the GPU pages equal the CPU encoder's bytes, and reports bits per value (all bytes)
 * from the page sizes.
 *
 * Prints the compression CTAs resident per SM, and the spread (max - min over median) of the timed
 * compress runs.
 *
 * Options: --jobs N (default 4096), --head-dim D (64/128/256; default 128), --heads H (default 8).
 * Last line: {"bench":"codec_gpu","rows":[{"codec","mode","bound","bits_per_value",
 * "compress_gbps","decompress_gbps","compress_spread_pct","ctas_per_sm","pages_match_cpu"}]}.
 */
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <string>
#include <vector>

#include "compress/kvc_codec.h"
#include "compress/kvc_codec_cuda.h"

#define CK(x)                                                                                      \
  do {                                                                                             \
    cudaError_t e_ = (x);                                                                          \
    if (e_ != cudaSuccess) {                                                                       \
      fprintf(stderr, "gpu_bench_codec: %s: %s (line %d)\n", #x, cudaGetErrorString(e_), __LINE__); \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

__device__ __forceinline__ uint32_t hash32(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return (uint32_t)x;
}
__device__ __forceinline__ float normal(uint64_t key) {
  float u1 = (hash32(key) + 1.0f) * 2.3283064e-10f, u2 = hash32(key ^ 0x5bd1e995ull) * 2.3283064e-10f;
  return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

/* blocks: [jobs][2][H][bt][hd] fp16. Keys: channel offset + scale * noise; values: scale * noise. */
__global__ void gen(__half *blocks, size_t total, int H, int bt, int hd) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
       i += (size_t)gridDim.x * blockDim.x) {
    int d = (int)(i % hd);
    size_t r = i / hd;
    int h = (int)((r / bt) % H), tensor = (int)((r / bt / H) % 2);
    uint64_t ch = (uint64_t)(h * hd + d) * 7919u;
    float scale = expf(0.5f * normal(ch + 11)), off = 0.7f * normal(ch + 13);
    float v = tensor == 0 ? off + scale * normal(i * 3 + 1) : scale * normal(i * 3 + 2);
    blocks[i] = __float2half_rn(v);
  }
}

/* Largest |decoded - input| / bound of a full block (staging layout, fp16 input, float decode). */
static double err_over_bound(const kvc_codec_params_t &p, const uint16_t *blk, const float *dec) {
  const int H = p.num_kv_heads, hd = p.head_dim, n = p.block_tokens;
  double worst = 0;
  for (int sec = 0; sec < 2 * H; sec++) {
    const uint16_t *x = blk + (size_t)sec * n * hd;
    const float *y = dec + (size_t)sec * n * hd;
    const float bound = sec < H ? p.k_bound : p.v_bound;
    for (int t = 0; t < n; t++) {
      for (int d = 0; d < hd; d++) {
        double lim = bound;
        if (p.bound_mode == KVC_BOUND_RELATIVE) {
          float mn = INFINITY, mx = -INFINITY;
          for (int i = 0; i < (sec < H ? n : hd); i++) {
            float v = kvc_codec_f16_to_f32(sec < H ? x[(size_t)i * hd + d] : x[(size_t)t * hd + i]);
            mn = std::min(mn, v);
            mx = std::max(mx, v);
          }
          lim = (double)bound * ((double)mx - (double)mn);
        }
        double e = fabs((double)y[(size_t)t * hd + d] - (double)kvc_codec_f16_to_f32(x[(size_t)t * hd + d]));
        worst = std::max(worst, lim > 0 ? e / lim : (e > 0 ? INFINITY : 0.0));
      }
    }
  }
  return worst;
}

static float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int main(int argc, char **argv) {
  int jobs = 4096, hd = 128, H = 8;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--jobs") && i + 1 < argc) jobs = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--head-dim") && i + 1 < argc) hd = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--heads") && i + 1 < argc) H = atoi(argv[++i]);
    else {
      fprintf(stderr, "usage: gpu_bench_codec [--jobs N] [--head-dim D] [--heads H]\n");
      return 2;
    }
  }
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    fprintf(stderr, "gpu_bench_codec: no GPU\n");
    return 1;
  }
  const int bt = 64;
  kvc_codec_params_t p;
  memset(&p, 0, sizeof p);
  p.dtype = KVC_DTYPE_F16;
  p.num_kv_heads = H;
  p.head_dim = hd;
  p.block_tokens = bt;
  p.policy = KVC_POLICY_FIXED;
  p.size_budget = 1;
  const size_t sb = kvc_codec_staging_bytes(&p), maxpage = kvc_codec_max_page_bytes(&p);
  /* Chunks large enough that a raw page fits in KVC_PAGE_MAX_CHUNKS of them. */
  uint32_t chunk_bytes = 4096;
  while ((size_t)chunk_bytes * KVC_PAGE_MAX_CHUNKS < maxpage) chunk_bytes *= 2;
  const uint32_t num_chunks = (uint32_t)(jobs * (size_t)kvc_chunks_for(maxpage, chunk_bytes));
  const size_t in_bytes = sb * jobs;
  printf("codec GPU: %d jobs x (2 x %d kv heads x %d tokens x head_dim %d) fp16 = %.2f GiB input; "
         "pool %u chunks of %u B\n",
         jobs, H, bt, hd, in_bytes / 1073741824.0, num_chunks, chunk_bytes);

  __half *d_blocks;
  uint8_t *d_out;
  int32_t *d_ntok, *d_ids;
  kvc_page_entry_t *d_dir;
  uint32_t *d_sizes;
  kvc_dev_pool_t pool;
  pool.chunk_bytes = chunk_bytes;
  pool.num_chunks = num_chunks;
  CK(cudaMalloc((void **)&d_blocks, in_bytes));
  CK(cudaMalloc((void **)&d_out, in_bytes));
  CK(cudaMalloc((void **)&pool.base, (size_t)chunk_bytes * num_chunks));
  CK(cudaMalloc((void **)&pool.free_stack, 4 * (size_t)num_chunks));
  CK(cudaMalloc((void **)&pool.free_top, 4));
  CK(cudaMalloc((void **)&pool.error, 4));
  CK(cudaMalloc((void **)&d_ntok, 4 * (size_t)jobs));
  CK(cudaMalloc((void **)&d_ids, 4 * (size_t)jobs));
  CK(cudaMalloc((void **)&d_dir, sizeof(kvc_page_entry_t) * jobs));
  CK(cudaMalloc((void **)&d_sizes, 4 * (size_t)jobs));
  gen<<<4096, 256>>>(d_blocks, in_bytes / 2, H, bt, hd);
  CK(cudaGetLastError());
  {
    std::vector<uint32_t> ids(num_chunks);
    for (uint32_t i = 0; i < num_chunks; i++) ids[i] = i;
    CK(cudaMemcpy(pool.free_stack, ids.data(), 4 * (size_t)num_chunks, cudaMemcpyHostToDevice));
    std::vector<int32_t> v(jobs, bt), b(jobs);
    for (int j = 0; j < jobs; j++) b[j] = j;
    CK(cudaMemcpy(d_ntok, v.data(), 4 * (size_t)jobs, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_ids, b.data(), 4 * (size_t)jobs, cudaMemcpyHostToDevice));
  }
  CK(cudaMemset(pool.error, 0, 4));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));

  struct Cfg {
    kvc_codec_t codec;
    kvc_bound_mode_t mode;
    float bound;
    const char *name;
  } cfgs[] = {{KVC_CODEC_HUFFMAN, KVC_BOUND_RELATIVE, 0.05f, "huffman"},
              {KVC_CODEC_HUFFMAN, KVC_BOUND_RELATIVE, 0.01f, "huffman"},
              {KVC_CODEC_HUFFMAN, KVC_BOUND_ABSOLUTE, 0.05f, "huffman"},
              {KVC_CODEC_BITPACK, KVC_BOUND_RELATIVE, 0.05f, "bitpack"},
              {KVC_CODEC_BITPACK, KVC_BOUND_ABSOLUTE, 0.05f, "bitpack"},
              {KVC_CODEC_RAW, KVC_BOUND_RELATIVE, 0.05f, "raw"}};
  /* Occupancy depends on the shape alone; the query checks the whole parameter set. */
  int ctas = 0;
  p.codec = KVC_CODEC_HUFFMAN;
  p.bound_mode = KVC_BOUND_RELATIVE;
  p.k_bound = p.v_bound = 0.05f;
  if (kvc_codec_cuda_compress_occupancy(&p, &ctas) != KVC_OK) {
    fprintf(stderr, "gpu_bench_codec: occupancy query failed\n");
    return 1;
  }
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  printf("%s, %d SMs; compression: %d CTAs (pages) resident per SM\n", prop.name,
         prop.multiProcessorCount, ctas);
  printf("  %-8s %-4s %6s %10s %14s %16s %9s %14s\n", "codec", "mode", "bound", "bits/value",
         "compress GB/s", "decompress GB/s", "=CPU", "c spread (%)");
  std::string json = "{\"bench\":\"codec_gpu\",\"rows\":[";
  const int ncheck = std::min(jobs, 16);
  std::vector<uint16_t> hblocks(sb / 2 * ncheck);
  CK(cudaMemcpy(hblocks.data(), d_blocks, sb * ncheck, cudaMemcpyDeviceToHost));
  std::vector<uint8_t> hpool;
  for (size_t c = 0; c < sizeof cfgs / sizeof cfgs[0]; c++) {
    p.codec = cfgs[c].codec;
    p.bound_mode = cfgs[c].mode;
    p.k_bound = p.v_bound = cfgs[c].bound;
    std::vector<float> tc, td;
    for (int it = 0; it < 6; it++) {
      int32_t top = (int32_t)num_chunks;
      CK(cudaMemcpy(pool.free_top, &top, 4, cudaMemcpyHostToDevice));
      CK(cudaEventRecord(e0));
      kvc_status_t st = kvc_codec_cuda_compress(&p, d_blocks, d_ntok, d_ids, jobs, d_dir, pool, d_sizes, NULL);
      CK(cudaEventRecord(e1));
      if (st != KVC_OK) {
        fprintf(stderr, "gpu_bench_codec: compress: %s\n", kvc_status_string(st));
        return 1;
      }
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (it) tc.push_back(ms);
      CK(cudaEventRecord(e0));
      st = kvc_codec_cuda_decompress(&p, d_dir, d_ids, jobs, pool.base, chunk_bytes, d_out, NULL);
      CK(cudaEventRecord(e1));
      if (st != KVC_OK) {
        fprintf(stderr, "gpu_bench_codec: decompress: %s\n", kvc_status_string(st));
        return 1;
      }
      CK(cudaEventSynchronize(e1));
      CK(cudaEventElapsedTime(&ms, e0, e1));
      if (it) td.push_back(ms);
    }
    int32_t err;
    CK(cudaMemcpy(&err, pool.error, 4, cudaMemcpyDeviceToHost));
    if (err) {
      fprintf(stderr, "gpu_bench_codec: the free stack ran dry\n");
      return 1;
    }
    std::vector<uint32_t> sizes(jobs);
    CK(cudaMemcpy(sizes.data(), d_sizes, 4 * (size_t)jobs, cudaMemcpyDeviceToHost));
    double total = 0;
    for (int j = 0; j < jobs; j++) total += sizes[j];
    double bits = total * 8 / (in_bytes / 2.0);
    /* First pages: GPU bytes == CPU bytes. */
    std::vector<kvc_page_entry_t> dir(ncheck);
    CK(cudaMemcpy(dir.data(), d_dir, sizeof(kvc_page_entry_t) * ncheck, cudaMemcpyDeviceToHost));
    bool match = true;
    double worst = 0;
    std::vector<uint8_t> ref(maxpage), page;
    std::vector<float> dec(sb / 2);
    for (int j = 0; j < ncheck && match; j++) {
      size_t size;
      if (kvc_codec_encode(&p, hblocks.data() + sb / 2 * j, bt, ref.data(), maxpage, &size) != KVC_OK ||
          size != dir[j].nbytes) {
        match = false;
        break;
      }
      page.resize(size);
      for (uint32_t k = 0; k < dir[j].nchunks; k++) {
        uint32_t n = std::min<uint32_t>(chunk_bytes, (uint32_t)size - k * chunk_bytes);
        CK(cudaMemcpy(page.data() + (size_t)k * chunk_bytes,
                      pool.base + (size_t)dir[j].chunk[k] * chunk_bytes, n, cudaMemcpyDeviceToHost));
      }
      match = memcmp(page.data(), ref.data(), size) == 0;
      if (!match || kvc_codec_decode(page.data(), size, dec.data()) != KVC_OK) {
        match = false;
        break;
      }
      worst = std::max(worst, err_over_bound(p, hblocks.data() + sb / 2 * j, dec.data()));
    }
    float mc = median(tc), md = median(td);
    /* Spread of the timed compress runs: a difference between versions below it is noise. */
    const double spread = 100.0 * (*std::max_element(tc.begin(), tc.end()) -
                                   *std::min_element(tc.begin(), tc.end())) / mc;
    double cg = in_bytes / (mc * 1e-3) / 1e9, dg = in_bytes / (md * 1e-3) / 1e9;
    const char *mode = cfgs[c].mode == KVC_BOUND_RELATIVE ? "rel" : "abs";
    printf("  %-8s %-4s %6.3f %10.3f %14.1f %16.1f %9s %14.1f\n", cfgs[c].name, mode, cfgs[c].bound,
           bits, cg, dg, match ? "yes" : "NO", spread);
    char row[512];
    snprintf(row, sizeof row,
             "%s{\"codec\":\"%s\",\"mode\":\"%s\",\"bound\":%g,\"head_dim\":%d,\"kv_heads\":%d,"
             "\"bits_per_value\":%.4f,\"max_err_over_bound\":%.4f,\"compress_gbps\":%.1f,\"decompress_gbps\":%.1f,"
             "\"compress_ms\":%.3f,\"decompress_ms\":%.3f,\"compress_spread_pct\":%.1f,"
             "\"ctas_per_sm\":%d,\"pages_match_cpu\":%s}",
             c ? "," : "", cfgs[c].name, mode, (double)cfgs[c].bound, hd, H, bits, worst, cg, dg, mc, md,
             spread, ctas, match ? "true" : "false");
    json += row;
  }
  json += "]}";
  printf("%s\n", json.c_str());
  return 0;
}
