/*
 * GPU codec against the CPU reference, on a real device pool and free stack:
 *   - kvc_codec_cuda_compress writes, for every job, exactly the bytes kvc_codec_encode writes
 *     (random and adversarial blocks, partial blocks, every policy, both bound modes, fp16/bf16,
 *     head_dim 64/128/256), takes exactly kvc_chunks_for(size) distinct chunks per page from the
 *     free stack, and fills the directory entry;
 *   - kvc_dev_decode_section (the attention kernels' decoder) equals kvc_codec_decode_head bit for
 *     bit (T = float) and to the rounding of T = __half;
 *   - kvc_codec_cuda_decompress equals the CPU decode rounded to the dtype;
 *   - a free stack that runs dry sets the error flag and writes no directory entry;
 *   - shapes not built return KVC_ERR_UNSUPPORTED.
 * Skips when no GPU is present.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

extern "C" {
#include <cmocka.h>
}
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "compress/kvc_codec.h"
#include "compress/kvc_codec_cuda.h"
#include "compress/kvc_codec_device.cuh"
#include "compress/kvc_page_format.h"
extern "C" {
#include "kvc_test_util.h"
}

#define CK(x) assert_int_equal((int)(x), (int)cudaSuccess)

enum Kind { NORMAL, CONSTANT, OUTLIER, UNIFORM, DENORMAL, ZERO, NONFINITE, NKINDS };

static void fill_block(const kvc_codec_params_t &p, Kind kind, uint64_t seed, uint16_t *out) {
  kvc_test_rng_t r;
  kvc_test_rng_seed(&r, seed);
  size_t count = kvc_codec_staging_bytes(&p) / 2;
  const int hd = p.head_dim;
  float cst = (float)kvc_test_rng_normal(&r);
  for (size_t i = 0; i < count; i++) {
    int d = (int)(i % hd);
    float v;
    switch (kind) {
    case CONSTANT: v = cst; break;
    case UNIFORM: v = (float)(kvc_test_rng_uniform(&r) * 4 - 2); break;
    case DENORMAL: v = (float)(kvc_test_rng_normal(&r) * 3e-6); break;
    case ZERO: v = (i & 1) ? -0.0f : 0.0f; break;
    default:
      v = (float)(((d * 37) % 11) - 5.0 + (0.2 + (d % 7) * 0.4) * kvc_test_rng_normal(&r));
      if (kind == OUTLIER && i == count / 3) v = 6.0e4f;
      if (kind == NONFINITE && i == count / 2) v = NAN;
    }
    out[i] = p.dtype == KVC_DTYPE_F16 ? kvc_test_f32_to_f16(v) : kvc_test_f32_to_bf16(v);
  }
}

static int have_gpu(void) {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

/* A device pool with a shuffled free stack. */
struct DevPool {
  kvc_dev_pool_t p;
  std::vector<uint32_t> ids;
  void init(uint32_t chunk_bytes, uint32_t num_chunks, uint64_t seed) {
    p.chunk_bytes = chunk_bytes;
    p.num_chunks = num_chunks;
    CK(cudaMalloc((void **)&p.base, (size_t)chunk_bytes * num_chunks));
    CK(cudaMemset(p.base, 0xEE, (size_t)chunk_bytes * num_chunks));
    CK(cudaMalloc((void **)&p.free_stack, 4 * (size_t)num_chunks));
    CK(cudaMalloc((void **)&p.free_top, 4));
    CK(cudaMalloc((void **)&p.error, 4));
    ids.resize(num_chunks);
    kvc_test_rng_t r;
    kvc_test_rng_seed(&r, seed);
    for (uint32_t i = 0; i < num_chunks; i++) ids[i] = i;
    for (uint32_t i = num_chunks; i > 1; i--) std::swap(ids[i - 1], ids[kvc_test_rng_below(&r, i)]);
    CK(cudaMemcpy(p.free_stack, ids.data(), 4 * (size_t)num_chunks, cudaMemcpyHostToDevice));
    int32_t top = (int32_t)num_chunks, zero = 0;
    CK(cudaMemcpy(p.free_top, &top, 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(p.error, &zero, 4, cudaMemcpyHostToDevice));
  }
  void destroy() {
    CK(cudaFree(p.base));
    CK(cudaFree(p.free_stack));
    CK(cudaFree(p.free_top));
    CK(cudaFree(p.error));
  }
};

/* Device decode of every section of every job with kvc_dev_decode_section. */
template <int HD, typename T>
__global__ void decode_sections(const kvc_page_entry_t *dir, const int32_t *ids, const uint8_t *pool,
                                uint32_t chunk_bytes, int bt, T *out, int *ok) {
  extern __shared__ __align__(16) uint8_t sm[];
  __shared__ kvc_page_header_t hdr;
  const int job = blockIdx.x, sec = blockIdx.y;
  const kvc_page_entry_t *e = &dir[ids[job]];
  if (threadIdx.x == 0) kvc_dev_read_header(pool, chunk_bytes, e, &hdr);
  __syncthreads();
  uint32_t off, bytes;
  kvc_dev_page_section(pool, chunk_bytes, e, hdr.num_kv_heads, sec, &off, &bytes);
  uint8_t *secbuf = sm;
  uint8_t *scratch = sm + ((bt * HD * 4 + 15) & ~15);
  kvc_dev_load_bytes(secbuf, pool, chunk_bytes, e, off, bytes);
  __syncthreads();
  T *tile = out + ((size_t)job * gridDim.y + sec) * bt * HD;
  bool r = kvc_dev_decode_section<HD, T>(&hdr, sec / hdr.num_kv_heads, secbuf, bytes, tile, HD,
                                         scratch, bt);
  if (threadIdx.x == 0) ok[job * gridDim.y + sec] = r;
}

template <int HD, typename T>
static void run_decode(const kvc_page_entry_t *d_dir, const int32_t *d_ids, const DevPool &pool,
                       int jobs, int H, int bt, T *d_out, int *d_ok) {
  size_t smem = (((size_t)bt * HD * 4 + 15) & ~(size_t)15) + kvc_dev_decode_scratch_bytes(HD, bt);
  CK(cudaFuncSetAttribute(decode_sections<HD, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                          (int)smem));
  decode_sections<HD, T><<<dim3(jobs, 2 * H), 128, smem>>>(d_dir, d_ids, pool.p.base,
                                                          pool.p.chunk_bytes, bt, d_out, d_ok);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
}

/* One batch: jobs of mixed data kinds and lengths; everything compared against the CPU. */
static void check_batch(kvc_codec_params_t p, int jobs, uint64_t seed) {
  const int H = p.num_kv_heads, hd = p.head_dim, bt = p.block_tokens;
  const size_t sb = kvc_codec_staging_bytes(&p), cap = kvc_codec_max_page_bytes(&p);
  const uint32_t chunk_bytes = 1024;
  const int max_blocks = 2 * jobs + 3;
  std::vector<uint16_t> blocks(sb / 2 * jobs);
  std::vector<int32_t> ntok(jobs), ids(jobs);
  kvc_test_rng_t r;
  kvc_test_rng_seed(&r, seed);
  for (int j = 0; j < jobs; j++) {
    Kind kind = j < NKINDS ? (Kind)j : NORMAL;
    fill_block(p, kind, seed * 100 + j, blocks.data() + sb / 2 * j);
    ntok[j] = j % 3 == 2 ? 1 + (int)kvc_test_rng_below(&r, bt) : bt;
    ids[j] = 2 * j + 1; /* gaps: entries in between must stay untouched */
  }
  /* CPU reference pages. */
  std::vector<std::vector<uint8_t>> ref(jobs);
  size_t total_chunks = 0;
  for (int j = 0; j < jobs; j++) {
    ref[j].resize(cap);
    size_t size;
    assert_int_equal(kvc_codec_encode(&p, blocks.data() + sb / 2 * j, ntok[j], ref[j].data(), cap, &size),
                     KVC_OK);
    ref[j].resize(size);
    total_chunks += kvc_chunks_for(size, chunk_bytes);
  }
  DevPool pool;
  pool.init(chunk_bytes, (uint32_t)(total_chunks + 7), seed);
  void *d_blocks;
  int32_t *d_ntok, *d_ids;
  kvc_page_entry_t *d_dir;
  uint32_t *d_sizes;
  CK(cudaMalloc(&d_blocks, sb * jobs));
  CK(cudaMalloc((void **)&d_ntok, 4 * jobs));
  CK(cudaMalloc((void **)&d_ids, 4 * jobs));
  CK(cudaMalloc((void **)&d_dir, sizeof(kvc_page_entry_t) * max_blocks));
  CK(cudaMalloc((void **)&d_sizes, 4 * jobs));
  CK(cudaMemcpy(d_blocks, blocks.data(), sb * jobs, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_ntok, ntok.data(), 4 * jobs, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_ids, ids.data(), 4 * jobs, cudaMemcpyHostToDevice));
  CK(cudaMemset(d_dir, 0x5A, sizeof(kvc_page_entry_t) * max_blocks));
  assert_int_equal(kvc_codec_cuda_compress(&p, d_blocks, d_ntok, d_ids, jobs, d_dir, pool.p, d_sizes, NULL),
                   KVC_OK);
  CK(cudaDeviceSynchronize());

  std::vector<kvc_page_entry_t> dir(max_blocks);
  std::vector<uint32_t> sizes(jobs);
  std::vector<uint8_t> poolh((size_t)chunk_bytes * pool.p.num_chunks);
  int32_t top, err;
  CK(cudaMemcpy(dir.data(), d_dir, sizeof(kvc_page_entry_t) * max_blocks, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(sizes.data(), d_sizes, 4 * jobs, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(poolh.data(), pool.p.base, poolh.size(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(&top, pool.p.free_top, 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(&err, pool.p.error, 4, cudaMemcpyDeviceToHost));
  assert_int_equal(err, 0);
  assert_int_equal(top, 7);
  std::vector<int> used(pool.p.num_chunks, 0);
  for (int j = 0; j < jobs; j++) {
    const kvc_page_entry_t &e = dir[ids[j]];
    assert_int_equal(sizes[j], ref[j].size());
    assert_int_equal(e.nbytes, ref[j].size());
    assert_int_equal(e.kind, KVC_PAGE_COMPRESSED);
    assert_int_equal(e.nchunks, kvc_chunks_for(ref[j].size(), chunk_bytes));
    assert_int_equal(e.codec, ref[j][5]);
    std::vector<uint8_t> page(e.nbytes);
    for (uint32_t c = 0; c < e.nchunks; c++) {
      assert_true(e.chunk[c] < pool.p.num_chunks);
      assert_int_equal(used[e.chunk[c]]++, 0);
      uint32_t n = std::min(chunk_bytes, e.nbytes - c * chunk_bytes);
      memcpy(page.data() + c * chunk_bytes, poolh.data() + (size_t)e.chunk[c] * chunk_bytes, n);
    }
    assert_memory_equal(page.data(), ref[j].data(), ref[j].size());
    /* Directory gaps untouched. */
    const uint8_t *gap = (const uint8_t *)&dir[ids[j] - 1];
    for (size_t b = 0; b < sizeof(kvc_page_entry_t); b++) assert_int_equal(gap[b], 0x5A);
  }
  /* The chunks taken are exactly the top of the stack. */
  for (uint32_t i = 7; i < pool.p.num_chunks; i++) assert_int_equal(used[pool.ids[i]], 1);

  /* Device decoder == CPU decoder (float: bit-exact; half: the rounding of it). */
  const size_t per = (size_t)bt * hd, nsec = (size_t)jobs * 2 * H;
  float *d_f;
  __half *d_h;
  int *d_ok;
  CK(cudaMalloc((void **)&d_f, 4 * per * nsec));
  CK(cudaMalloc((void **)&d_h, 2 * per * nsec));
  CK(cudaMalloc((void **)&d_ok, 4 * nsec));
  switch (hd) {
  case 64:
    run_decode<64, float>(d_dir, d_ids, pool, jobs, H, bt, d_f, d_ok);
    run_decode<64, __half>(d_dir, d_ids, pool, jobs, H, bt, d_h, d_ok);
    break;
  case 128:
    run_decode<128, float>(d_dir, d_ids, pool, jobs, H, bt, d_f, d_ok);
    run_decode<128, __half>(d_dir, d_ids, pool, jobs, H, bt, d_h, d_ok);
    break;
  default:
    run_decode<256, float>(d_dir, d_ids, pool, jobs, H, bt, d_f, d_ok);
    run_decode<256, __half>(d_dir, d_ids, pool, jobs, H, bt, d_h, d_ok);
  }
  std::vector<float> gf(per * nsec), cpu(per);
  std::vector<__half> gh(per * nsec);
  std::vector<int> ok(nsec);
  CK(cudaMemcpy(gf.data(), d_f, 4 * per * nsec, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(gh.data(), d_h, 2 * per * nsec, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(ok.data(), d_ok, 4 * nsec, cudaMemcpyDeviceToHost));
  /* Standalone decompression into the staging layout, in the dtype. */
  uint16_t *d_stage;
  CK(cudaMalloc((void **)&d_stage, sb * jobs));
  assert_int_equal(kvc_codec_cuda_decompress(&p, d_dir, d_ids, jobs, pool.p.base, chunk_bytes, d_stage, NULL),
                   KVC_OK);
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> stage(sb / 2 * jobs);
  CK(cudaMemcpy(stage.data(), d_stage, sb * jobs, cudaMemcpyDeviceToHost));
  for (int j = 0; j < jobs; j++) {
    for (int s = 0; s < 2 * H; s++) {
      size_t k = (size_t)j * 2 * H + s;
      assert_int_equal(ok[k], 1);
      assert_int_equal(kvc_codec_decode_head(ref[j].data(), ref[j].size(), s / H, s % H, cpu.data()),
                       KVC_OK);
      const size_t m = (size_t)ntok[j] * hd;
      for (size_t i = 0; i < m; i++) {
        /* NaN (only in raw pages) may change payload in conversions: compare as NaN. */
        if (isnan(cpu[i])) {
          assert_true(isnan(gf[k * per + i]));
          continue;
        }
        assert_memory_equal(&gf[k * per + i], &cpu[i], 4);
        __half want = __float2half_rn(cpu[i]);
        assert_memory_equal(&gh[k * per + i], &want, 2);
        uint16_t st = stage[(size_t)j * sb / 2 + s * per + i];
        uint16_t w = p.dtype == KVC_DTYPE_F16 ? kvc_test_f32_to_f16(cpu[i]) : kvc_test_f32_to_bf16(cpu[i]);
        assert_int_equal(st, w);
      }
    }
  }
  CK(cudaFree(d_stage));
  CK(cudaFree(d_f));
  CK(cudaFree(d_h));
  CK(cudaFree(d_ok));
  CK(cudaFree(d_blocks));
  CK(cudaFree(d_ntok));
  CK(cudaFree(d_ids));
  CK(cudaFree(d_dir));
  CK(cudaFree(d_sizes));
  pool.destroy();
}

static kvc_codec_params_t mk(kvc_dtype_t dt, int H, int hd, int bt, kvc_bound_mode_t mode, float bound,
                             kvc_codec_policy_t pol, kvc_codec_t codec) {
  kvc_codec_params_t p;
  memset(&p, 0, sizeof p);
  p.dtype = dt;
  p.num_kv_heads = H;
  p.head_dim = hd;
  p.block_tokens = bt;
  p.bound_mode = mode;
  p.k_bound = bound;
  p.v_bound = bound * 1.5f;
  p.policy = pol;
  p.codec = codec;
  p.size_budget = 0.35f;
  return p;
}

static void gpu_pages_equal_cpu_pages(void **state) {
  (void)state;
  if (!have_gpu()) skip();
  const int hds[3] = {64, 128, 256};
  uint64_t seed = 1;
  for (int hi = 0; hi < 3; hi++) {
    for (int dt = 0; dt < 2; dt++) {
      for (int mode = 0; mode < 2; mode++) {
        for (int pc = 0; pc < 5; pc++) {
          kvc_codec_policy_t pol = pc < 3 ? KVC_POLICY_FIXED : (kvc_codec_policy_t)(pc - 2);
          kvc_codec_t codec = pc < 3 ? (kvc_codec_t)(2 - pc) : KVC_CODEC_HUFFMAN;
          int bt = hds[hi] == 256 ? 32 : 64;
          float bound = mode == KVC_BOUND_RELATIVE ? (seed % 2 ? 0.05f : 0.01f) : 0.05f;
          kvc_codec_params_t p = mk((kvc_dtype_t)dt, 1 + (int)(seed % 3), hds[hi], bt,
                                    (kvc_bound_mode_t)mode, bound, pol, codec);
          check_batch(p, NKINDS + 4, seed++);
        }
      }
    }
  }
  /* A larger batch, several kv heads, 16-token blocks. */
  check_batch(mk(KVC_DTYPE_F16, 8, 128, 16, KVC_BOUND_RELATIVE, 0.05f, KVC_POLICY_FIXED,
                 KVC_CODEC_HUFFMAN), 200, 99);
}

static void dry_free_stack_sets_the_error_and_leaves_the_directory(void **state) {
  (void)state;
  if (!have_gpu()) skip();
  kvc_codec_params_t p = mk(KVC_DTYPE_F16, 2, 128, 64, KVC_BOUND_RELATIVE, 0.05f, KVC_POLICY_FIXED,
                            KVC_CODEC_RAW);
  const size_t sb = kvc_codec_staging_bytes(&p);
  std::vector<uint16_t> blocks(sb / 2);
  fill_block(p, NORMAL, 5, blocks.data());
  DevPool pool;
  pool.init(1024, 4, 5); /* a raw page needs 65 chunks */
  void *d_blocks;
  int32_t *d_ntok, *d_ids;
  kvc_page_entry_t *d_dir;
  uint32_t *d_sizes;
  int32_t n = 64, id = 0;
  CK(cudaMalloc(&d_blocks, sb));
  CK(cudaMalloc((void **)&d_ntok, 4));
  CK(cudaMalloc((void **)&d_ids, 4));
  CK(cudaMalloc((void **)&d_dir, sizeof(kvc_page_entry_t)));
  CK(cudaMalloc((void **)&d_sizes, 4));
  CK(cudaMemcpy(d_blocks, blocks.data(), sb, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_ntok, &n, 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_ids, &id, 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(d_dir, 0, sizeof(kvc_page_entry_t)));
  assert_int_equal(kvc_codec_cuda_compress(&p, d_blocks, d_ntok, d_ids, 1, d_dir, pool.p, d_sizes, NULL),
                   KVC_OK);
  CK(cudaDeviceSynchronize());
  kvc_page_entry_t e;
  int32_t err, top;
  CK(cudaMemcpy(&e, d_dir, sizeof e, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(&err, pool.p.error, 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(&top, pool.p.free_top, 4, cudaMemcpyDeviceToHost));
  assert_int_not_equal(err, 0);
  assert_int_equal(e.kind, KVC_PAGE_EMPTY);
  assert_true(top >= 0 && top <= 4);
  CK(cudaFree(d_blocks));
  CK(cudaFree(d_ntok));
  CK(cudaFree(d_ids));
  CK(cudaFree(d_dir));
  CK(cudaFree(d_sizes));
  pool.destroy();
}

static void unbuilt_shapes_are_unsupported(void **state) {
  (void)state;
  if (!have_gpu()) skip();
  kvc_dev_pool_t pool;
  memset(&pool, 0, sizeof pool);
  pool.chunk_bytes = 1024;
  kvc_codec_params_t p = mk(KVC_DTYPE_F16, 2, 32, 64, KVC_BOUND_RELATIVE, 0.05f, KVC_POLICY_FIXED,
                            KVC_CODEC_HUFFMAN);
  assert_int_equal(kvc_codec_cuda_compress(&p, NULL, NULL, NULL, 1, NULL, pool, NULL, NULL),
                   KVC_ERR_UNSUPPORTED);
  p.head_dim = 128;
  p.dtype = KVC_DTYPE_F32;
  assert_int_equal(kvc_codec_cuda_compress(&p, NULL, NULL, NULL, 1, NULL, pool, NULL, NULL),
                   KVC_ERR_UNSUPPORTED);
  assert_int_equal(kvc_codec_cuda_decompress(&p, NULL, NULL, 1, NULL, 1024, NULL, NULL),
                   KVC_ERR_UNSUPPORTED);
  p.dtype = KVC_DTYPE_F16;
  p.block_tokens = 256;
  assert_int_equal(kvc_codec_cuda_compress(&p, NULL, NULL, NULL, 1, NULL, pool, NULL, NULL),
                   KVC_ERR_UNSUPPORTED);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(gpu_pages_equal_cpu_pages),
      cmocka_unit_test(dry_free_stack_sets_the_error_and_leaves_the_directory),
      cmocka_unit_test(unbuilt_shapes_are_unsupported),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
