/*
 * GPU codec against the CPU reference, on a real device pool and free stack:
 *   - kvc_codec_cuda_compress writes, for every job, exactly the bytes kvc_codec_encode writes
 *     (random and adversarial blocks, partial blocks, every policy, both bound modes, fp16/bf16,
 *     head_dim 64/128/256), takes exactly kvc_chunks_for(size) distinct chunks per page from the
 *     free stack, and fills the directory entry (policy FIXED runs the kernel without the sizing
 *     pass, bit-pack there without the histogram; the other policies the kernel with it);
 *   - kvc_dev_decode_section (the attention kernels' decoder) equals kvc_codec_decode_head bit for
 *     bit (T = float) and to the rounding of T = __half;
 *   - kvc_codec_cuda_decompress equals the CPU decode rounded to the dtype;
 *   - a free stack that runs dry, or a page over KVC_PAGE_MAX_CHUNKS chunks, sets the error flag
 *     and writes no directory entry;
 *   - shapes not built return KVC_ERR_UNSUPPORTED;
 *   - the encoder's warp-parallel Huffman build (kvc_codec_huf_warp.cuh) gives the lengths and codes
 *     of kvc_huf_build_lengths / kvc_huf_codes on histograms of every shape, deep trees (length
 *     folding) included.
 * A mismatch names the case (head_dim, dtype, bound mode, policy/codec, heads, job and its data
 * kind) and where the bytes first diverge (header field, section table entry, or section: raw
 * element, quantized-section header field, group parameter, code length, lane length or lane
 * stream), and every case of the sweep runs before the test fails, so one GPU run locates a bug.
 * KVC_TEST_SCALE (default 1) shortens the histogram sweep and the large batch (e.g. 0.1 under
 * compute-sanitizer). Skips when no GPU is present.
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
#include "compress/kvc_codec_huf_warp.cuh"
#include "compress/kvc_page_format.h"
#include "compress/kvc_quant.h"
extern "C" {
#include "kvc_test_util.h"
}
#include "kvc_test_cuda.h"

#define CK(x) assert_int_equal((int)(x), (int)cudaSuccess)

enum Kind { NORMAL, CONSTANT, OUTLIER, UNIFORM, DENORMAL, ZERO, NONFINITE, NKINDS };
static const char *const kKindName[NKINDS] = {"normal", "constant", "outlier", "uniform",
                                              "denormal", "zero", "nonfinite"};

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

/* ---- mismatch reports ----------------------------------------------------------------------- */

/* Problems of one batch; the first few are described on stderr, all are counted. */
struct Report {
  char ctx[200]; /* the case */
  int problems = 0;
  bool say() { return ++problems <= 6; }
};

static const char *header_field(uint32_t b) {
  static const struct {
    uint32_t end;
    const char *name;
  } f[] = {{4, "magic"},     {5, "version"},   {6, "codec"},    {7, "dtype"},
           {8, "bound_mode"}, {10, "n_tokens"}, {12, "num_kv_heads"}, {14, "head_dim"},
           {16, "flags"},     {20, "k_bound"},  {24, "v_bound"},  {28, "total_bytes"},
           {32, "checksum"}};
  for (const auto &x : f)
    if (b < x.end) return x.name;
  return "?";
}

static const char *qsec_field(uint32_t b) {
  return b < 1 ? "mode" : b < 2 ? "w_e" : b < 3 ? "w_b" : b < 4 ? "width/n_sym" : b < 6 ? "e_min"
         : b < 8 ? "n_lanes" : b < 12 ? "b_min" : "lane_info";
}

static void say_qsec(const char *who, const uint8_t *sec) {
  kvc_qsec_header_t h;
  kvc_qsec_header_read(sec, &h);
  fprintf(stderr, "    %s qsec: mode %u w_e %u w_b %u width/n_sym %u e_min %d n_lanes %u b_min %d "
                  "lane_min %u w_lane %u\n",
          who, h.mode, h.w_e, h.w_b, h.width, h.e_min, h.n_lanes, h.b_min,
          h.lane_info & ((1u << 27) - 1), h.lane_info >> 27);
}

/* Which part of a quantized section (laid out as the CPU page says) stream bit `bit` is in. */
static void say_stream_bit(const uint8_t *sec, uint32_t bytes, int codec, int tensor, int n,
                           int hd, uint64_t bit) {
  kvc_qsec_header_t h;
  kvc_qsec_header_read(sec, &h);
  const uint8_t *w = sec + KVC_QSEC_HEADER_BYTES;
  const uint32_t nwords = (bytes - KVC_QSEC_HEADER_BYTES) / 4;
  const bool rel = h.mode == KVC_QMODE_REL;
  const uint64_t G = rel ? (tensor == 0 ? hd : n) : hd;
  const uint64_t pos_b = rel ? G * h.w_e : 0, meta = pos_b + G * h.w_b;
  if (bit < pos_b) {
    fprintf(stderr, "    in the step codes: group %llu\n", (unsigned long long)(bit / h.w_e));
  } else if (bit < meta) {
    fprintf(stderr, "    in the %s: group %llu\n", rel ? "group bases" : "channel centres",
            (unsigned long long)((bit - pos_b) / h.w_b));
  } else if (codec == KVC_CODEC_BITPACK) {
    const int paired = kvc_bp_paired(tensor, (uint32_t)hd);
    const uint64_t start = kvc_bp_start((uint32_t)meta, paired), row_bits = (uint64_t)hd * h.width;
    if (bit < start) {
      fprintf(stderr, "    in the padding before the codes (paired section)\n");
      return;
    }
    if (bit >= start + kvc_bp_code_bits((uint32_t)n, (uint32_t)hd, h.width, paired)) {
      fprintf(stderr, "    in the padding after the codes\n");
      return;
    }
    /* Token and row bit: the inverse of kvc_bp_bit. */
    const uint64_t b = bit - start, r = b % (2 * row_bits), o = r % 32;
    const uint64_t t = paired ? 2 * (b / (2 * row_bits)) + (o < 16) : b / row_bits;
    const uint64_t i = paired ? 16 * (r / 32) + o % 16 : b % row_bits;
    if (t >= (uint64_t)n)
      fprintf(stderr, "    in the odd token's zero row (paired section)\n");
    else
      fprintf(stderr, "    in the codes%s: token %llu, channel %llu, bit %llu of its code\n",
              paired ? " (paired)" : "", (unsigned long long)t,
              (unsigned long long)(i / h.width), (unsigned long long)(i % h.width));
  } else {
    const uint64_t lanes_pos = meta + 4ull * h.width;
    const uint32_t w_lane = h.lane_info >> 27, lane_min = h.lane_info & ((1u << 27) - 1);
    const uint64_t stream = lanes_pos + (uint64_t)h.n_lanes * w_lane;
    if (bit < lanes_pos) {
      fprintf(stderr, "    in the code lengths: symbol %llu\n",
              (unsigned long long)((bit - meta) / 4));
    } else if (bit < stream) {
      fprintf(stderr, "    in the lane lengths: lane %llu\n",
              (unsigned long long)((bit - lanes_pos) / w_lane));
    } else {
      uint64_t p = stream;
      for (int l = 0; l < h.n_lanes; l++) {
        uint64_t len = lane_min + kvc_bits_get(w, nwords, lanes_pos + (uint64_t)l * w_lane, w_lane);
        if (bit < p + len) {
          fprintf(stderr, "    in the stream: lane %d, bit %llu of its %llu\n", l,
                  (unsigned long long)(bit - p), (unsigned long long)len);
          return;
        }
        p += len;
      }
      fprintf(stderr, "    in the padding after the stream\n");
    }
  }
}

/* Describes where a GPU page first differs from the CPU page. */
static void say_page_diff(const uint8_t *cpu, size_t cpu_size, const uint8_t *gpu, size_t gpu_size,
                          int hd) {
  kvc_page_header_t hc, hg;
  kvc_page_header_read(cpu, &hc);
  kvc_page_header_read(gpu, &hg);
  fprintf(stderr, "    CPU: %zu bytes codec %u; GPU: %zu bytes codec %u\n", cpu_size, hc.codec,
          gpu_size, hg.codec);
  for (uint32_t b = 0; b < KVC_PAGE_HEADER_BYTES; b++) {
    if (cpu[b] == gpu[b]) continue;
    fprintf(stderr, "    header field %s differs (first at byte %u: CPU 0x%02x GPU 0x%02x)\n",
            header_field(b), b, cpu[b], gpu[b]);
    while (b + 1 < KVC_PAGE_HEADER_BYTES && header_field(b + 1) == header_field(b)) b++;
  }
  const uint32_t H = hc.num_kv_heads, start = kvc_page_sections_start(H, hc.codec);
  const size_t m = std::min(cpu_size, gpu_size);
  size_t b = KVC_PAGE_HEADER_BYTES;
  while (b < m && cpu[b] == gpu[b]) b++;
  if (b == m) {
    fprintf(stderr, "    the first %zu bytes past the header agree\n", m);
    return;
  }
  if (b < KVC_PAGE_HEADER_BYTES + 8u * H) {
    uint32_t i = (uint32_t)(b - KVC_PAGE_HEADER_BYTES) / 4;
    fprintf(stderr, "    section table entry %u (%c head %u): CPU end %u GPU end %u\n", i,
            i < H ? 'K' : 'V', i % H, kvc_rd_u32(cpu + KVC_PAGE_HEADER_BYTES + 4 * i),
            kvc_rd_u32(gpu + KVC_PAGE_HEADER_BYTES + 4 * i));
    return;
  }
  if (b < start) {
    fprintf(stderr, "    table padding byte %zu: CPU 0x%02x GPU 0x%02x\n", b, cpu[b], gpu[b]);
    return;
  }
  for (uint32_t i = 0; i < 2 * H; i++) {
    uint32_t off, bytes;
    kvc_page_section(cpu, H, i, &off, &bytes);
    if (b >= kvc_align16(off + bytes)) continue;
    const int tensor = (int)(i / H);
    const uint32_t o = (uint32_t)(b - off);
    fprintf(stderr, "    section %u (%c head %u, %u bytes at %u), byte %u: CPU 0x%02x GPU 0x%02x\n",
            i, tensor ? 'V' : 'K', i % H, bytes, off, o, cpu[b], gpu[b]);
    if (o >= bytes) {
      fprintf(stderr, "    in the 16-byte alignment padding\n");
    } else if (hc.codec == KVC_CODEC_RAW) {
      uint32_t el = o / kvc_dtype_bytes(hc.dtype);
      fprintf(stderr, "    raw element token %u channel %u\n", el / hd, el % hd);
    } else if (o < KVC_QSEC_HEADER_BYTES) {
      fprintf(stderr, "    quantized-section header field %s\n", qsec_field(o));
      say_qsec("CPU", cpu + off);
      say_qsec("GPU", gpu + off);
    } else {
      uint32_t wi = (o - KVC_QSEC_HEADER_BYTES) / 4;
      uint32_t a = kvc_rd_u32(cpu + off + KVC_QSEC_HEADER_BYTES + 4 * wi);
      uint32_t g = kvc_rd_u32(gpu + off + KVC_QSEC_HEADER_BYTES + 4 * wi);
      uint64_t bit = 32ull * wi + kvc_clz32(a ^ g);
      fprintf(stderr, "    stream bit %llu (word %u: CPU 0x%08x GPU 0x%08x)\n",
              (unsigned long long)bit, wi, a, g);
      say_qsec("CPU", cpu + off);
      say_stream_bit(cpu + off, bytes, hc.codec, tensor, hc.n_tokens, hd, bit);
    }
    return;
  }
  fprintf(stderr, "    past the CPU page's last section (byte %zu)\n", b);
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
  kvc_dev_page_section(pool, chunk_bytes, e, hdr.num_kv_heads, hdr.codec, sec, &off, &bytes);
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

/* Device decoder == CPU decoder (float: bit-exact; half: the rounding of it), and standalone
 * decompression == the CPU decode rounded to the dtype, for pages already known to equal `ref`. */
static void check_decoders(const kvc_codec_params_t &p, int jobs, const std::vector<Kind> &kinds,
                           const std::vector<int32_t> &ntok,
                           const std::vector<std::vector<uint8_t>> &ref,
                           const kvc_page_entry_t *d_dir, const int32_t *d_ids, const DevPool &pool,
                           Report &rep) {
  const int H = p.num_kv_heads, hd = p.head_dim, bt = p.block_tokens;
  const size_t sb = kvc_codec_staging_bytes(&p);
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
  assert_int_equal(kvc_codec_cuda_decompress(&p, d_dir, d_ids, jobs, pool.p.base, pool.p.chunk_bytes,
                                             d_stage, NULL),
                   KVC_OK);
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> stage(sb / 2 * jobs);
  CK(cudaMemcpy(stage.data(), d_stage, sb * jobs, cudaMemcpyDeviceToHost));
  for (int j = 0; j < jobs; j++) {
    for (int s = 0; s < 2 * H; s++) {
      const size_t k = (size_t)j * 2 * H + s;
      const char sec[] = {s < H ? 'K' : 'V', '\0'};
      if (ok[k] != 1) {
        if (rep.say())
          fprintf(stderr, "%s: job %d (%s, %d tokens) section %s head %d: kvc_dev_decode_section "
                          "returned false (codec %u)\n",
                  rep.ctx, j, kKindName[kinds[j]], ntok[j], sec, s % H, ref[j][5]);
        continue;
      }
      assert_int_equal(kvc_codec_decode_head(ref[j].data(), ref[j].size(), s / H, s % H, cpu.data()),
                       KVC_OK);
      const size_t m = (size_t)ntok[j] * hd;
      for (size_t i = 0; i < m; i++) {
        /* NaN (only in raw pages) may change payload in conversions: compare as NaN. */
        const float f = gf[k * per + i];
        const __half want = __float2half_rn(cpu[i]);
        const uint16_t st = stage[(size_t)j * sb / 2 + s * per + i];
        const uint16_t w = p.dtype == KVC_DTYPE_F16 ? kvc_test_f32_to_f16(cpu[i])
                                                    : kvc_test_f32_to_bf16(cpu[i]);
        const char *what = NULL;
        if (isnan(cpu[i])) what = isnan(f) ? NULL : "float decode (NaN expected)";
        else if (memcmp(&f, &cpu[i], 4) != 0) what = "float decode";
        else if (memcmp(&gh[k * per + i], &want, 2) != 0) what = "half decode";
        else if (st != w) what = "standalone decompression";
        if (!what) continue;
        if (rep.say())
          fprintf(stderr, "%s: job %d (%s, %d tokens, codec %u) section %s head %d token %zu "
                          "channel %zu: %s differs: CPU %.9g GPU float %.9g half %.9g staged 0x%04x "
                          "(want 0x%04x)\n",
                  rep.ctx, j, kKindName[kinds[j]], ntok[j], ref[j][5], sec, s % H, i / hd, i % hd,
                  what, cpu[i], f, __half2float(gh[k * per + i]), st, w);
        break; /* one report per section */
      }
    }
  }
  CK(cudaFree(d_stage));
  CK(cudaFree(d_f));
  CK(cudaFree(d_h));
  CK(cudaFree(d_ok));
}

/* Chunk size as the cache picks it (kvc_cache.c): the smallest power of two >= 256 that holds the
 * largest page in KVC_PAGE_MAX_CHUNKS chunks. Smaller chunks are a caller error (the kernel refuses
 * such pages through the error flag), and small chunks make pages straddle many of them. */
static uint32_t chunk_bytes_for(size_t max_page) {
  uint32_t cb = KVC_CHUNK_MIN_BYTES;
  while (max_page > (size_t)KVC_PAGE_MAX_CHUNKS * cb) cb *= 2;
  return cb;
}

/* One batch: jobs of mixed data kinds and lengths; everything compared against the CPU. Returns
 * the number of problems (each of the first few described on stderr with the case). */
static int check_batch(kvc_codec_params_t p, int jobs, uint64_t seed) {
  const int H = p.num_kv_heads, hd = p.head_dim, bt = p.block_tokens;
  const size_t sb = kvc_codec_staging_bytes(&p), cap = kvc_codec_max_page_bytes(&p);
  const uint32_t chunk_bytes = chunk_bytes_for(cap);
  const int max_blocks = 2 * jobs + 3;
  Report rep;
  snprintf(rep.ctx, sizeof rep.ctx,
           "seed %llu: head_dim %d %s %s bound k %g v %g, policy %d codec %d, %d kv heads, "
           "block_tokens %d, chunk %u B",
           (unsigned long long)seed, hd, p.dtype == KVC_DTYPE_F16 ? "fp16" : "bf16",
           p.bound_mode == KVC_BOUND_RELATIVE ? "rel" : "abs", p.k_bound, p.v_bound, p.policy,
           p.codec, H, bt, chunk_bytes);
  std::vector<uint16_t> blocks(sb / 2 * jobs);
  std::vector<int32_t> ntok(jobs), ids(jobs);
  std::vector<Kind> kinds(jobs);
  kvc_test_rng_t r;
  kvc_test_rng_seed(&r, seed);
  for (int j = 0; j < jobs; j++) {
    kinds[j] = j < NKINDS ? (Kind)j : NORMAL;
    fill_block(p, kinds[j], seed * 100 + j, blocks.data() + sb / 2 * j);
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
  if (err != 0) {
    rep.problems++;
    fprintf(stderr, "%s: the kernel set the pool's error flag (free top %d, expected 7)\n", rep.ctx,
            top);
    for (int j = 0; j < jobs; j++)
      if (sizes[j] == 0)
        fprintf(stderr, "    job %d (%s, %d tokens): no page; the CPU page is %zu bytes = %u chunks "
                        "(at most %d)\n",
                j, kKindName[kinds[j]], ntok[j], ref[j].size(),
                kvc_chunks_for(ref[j].size(), chunk_bytes), KVC_PAGE_MAX_CHUNKS);
  } else if (top != 7) {
    rep.problems++;
    fprintf(stderr, "%s: free top %d after the launch, expected 7\n", rep.ctx, top);
  }
  std::vector<int> used(pool.p.num_chunks, 0);
  for (int j = 0; j < jobs; j++) {
    const kvc_page_entry_t &e = dir[ids[j]];
    if (sizes[j] == 0 && err != 0) continue; /* reported above; it has no directory entry */
    /* Directory gaps untouched. */
    const uint8_t *gap = (const uint8_t *)&dir[ids[j] - 1];
    for (size_t b = 0; b < sizeof(kvc_page_entry_t); b++) assert_int_equal(gap[b], 0x5A);
    const bool entry_ok = sizes[j] == e.nbytes && e.kind == KVC_PAGE_COMPRESSED &&
                          e.nchunks == kvc_chunks_for(e.nbytes, chunk_bytes) &&
                          e.nbytes <= KVC_PAGE_MAX_CHUNKS * chunk_bytes && e.nbytes >= 32;
    if (!entry_ok) {
      if (rep.say())
        fprintf(stderr, "%s: job %d (%s, %d tokens): bad entry: size %u, nbytes %u kind %u "
                        "nchunks %u (CPU page %zu bytes)\n",
                rep.ctx, j, kKindName[kinds[j]], ntok[j], sizes[j], e.nbytes, e.kind, e.nchunks,
                ref[j].size());
      continue;
    }
    std::vector<uint8_t> page(e.nbytes);
    for (uint32_t c = 0; c < e.nchunks; c++) {
      assert_true(e.chunk[c] < pool.p.num_chunks);
      assert_int_equal(used[e.chunk[c]]++, 0);
      uint32_t n = std::min(chunk_bytes, e.nbytes - c * chunk_bytes);
      memcpy(page.data() + c * chunk_bytes, poolh.data() + (size_t)e.chunk[c] * chunk_bytes, n);
    }
    const bool same = e.nbytes == ref[j].size() && e.codec == ref[j][5] &&
              memcmp(page.data(), ref[j].data(), ref[j].size()) == 0;
    if (!same && rep.say()) {
      fprintf(stderr, "%s: job %d (%s, %d tokens): GPU page differs from the CPU page\n", rep.ctx,
              j, kKindName[kinds[j]], ntok[j]);
      say_page_diff(ref[j].data(), ref[j].size(), page.data(), page.size(), hd);
    }
  }
  if (err != 0 || rep.problems) {
    /* Pages are missing or wrong: decoding them would compare garbage (or read through entries
     * that were never written). */
    fprintf(stderr, "%s: %d problem(s); decoder checks skipped\n", rep.ctx, rep.problems);
  } else {
    /* The chunks taken are exactly the top of the stack. */
    for (uint32_t i = 7; i < pool.p.num_chunks; i++) assert_int_equal(used[pool.ids[i]], 1);
    check_decoders(p, jobs, kinds, ntok, ref, d_dir, d_ids, pool, rep);
  }
  CK(cudaFree(d_blocks));
  CK(cudaFree(d_ntok));
  CK(cudaFree(d_ids));
  CK(cudaFree(d_dir));
  CK(cudaFree(d_sizes));
  pool.destroy();
  return rep.problems;
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
  if (!kvc_test_have_gpu()) skip();
  const int hds[3] = {64, 128, 256};
  uint64_t seed = 1;
  int problems = 0, bad_cases = 0, cases = 0;
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
          int n = check_batch(p, NKINDS + 4, seed++);
          problems += n;
          bad_cases += n != 0;
          cases++;
        }
      }
    }
  }
  /* The largest section built (64 tokens x head_dim 256 = 256 lanes: one encoder thread per lane;
   * partial blocks of <= 32 tokens: two threads per lane), both codecs. */
  for (int pc = 0; pc < 2; pc++) {
    int n = check_batch(mk(KVC_DTYPE_BF16, 2, 256, 64, KVC_BOUND_RELATIVE, 0.01f, KVC_POLICY_FIXED,
                           pc ? KVC_CODEC_BITPACK : KVC_CODEC_HUFFMAN), NKINDS + 4, 97 + (uint64_t)pc);
    problems += n;
    bad_cases += n != 0;
    cases++;
  }
  /* A larger batch, several kv heads, 16-token blocks (KVC_TEST_SCALE scales it, >= 20 jobs). */
  int n = check_batch(mk(KVC_DTYPE_F16, 8, 128, 16, KVC_BOUND_RELATIVE, 0.05f, KVC_POLICY_FIXED,
                         KVC_CODEC_HUFFMAN), std::max(20, (int)(200 * kvc_test_scale())), 99);
  problems += n;
  bad_cases += n != 0;
  cases++;
  if (problems) fail_msg("%d problem(s) in %d of %d cases (described above)", problems, bad_cases, cases);
}

/* Compresses one full raw block (2 kv heads x 64 tokens x 128, fp16: a 65584-byte page) into a pool
 * of num_chunks chunks that cannot take it: the error flag must be set, page_bytes 0 and the
 * directory entry untouched. Returns the free stack's top afterwards. */
static int32_t refused_page(uint32_t chunk_bytes, uint32_t num_chunks) {
  kvc_codec_params_t p = mk(KVC_DTYPE_F16, 2, 128, 64, KVC_BOUND_RELATIVE, 0.05f, KVC_POLICY_FIXED,
                            KVC_CODEC_RAW);
  const size_t sb = kvc_codec_staging_bytes(&p);
  std::vector<uint16_t> blocks(sb / 2);
  fill_block(p, NORMAL, 5, blocks.data());
  DevPool pool;
  pool.init(chunk_bytes, num_chunks, 5);
  void *d_blocks;
  int32_t *d_ntok, *d_ids;
  kvc_page_entry_t *d_dir;
  uint32_t *d_sizes;
  int32_t n = 64, id = 0;
  uint32_t size = 1234;
  CK(cudaMalloc(&d_blocks, sb));
  CK(cudaMalloc((void **)&d_ntok, 4));
  CK(cudaMalloc((void **)&d_ids, 4));
  CK(cudaMalloc((void **)&d_dir, sizeof(kvc_page_entry_t)));
  CK(cudaMalloc((void **)&d_sizes, 4));
  CK(cudaMemcpy(d_blocks, blocks.data(), sb, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_ntok, &n, 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_ids, &id, 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(d_sizes, &size, 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(d_dir, 0, sizeof(kvc_page_entry_t)));
  assert_int_equal(kvc_codec_cuda_compress(&p, d_blocks, d_ntok, d_ids, 1, d_dir, pool.p, d_sizes, NULL),
                   KVC_OK);
  CK(cudaDeviceSynchronize());
  kvc_page_entry_t e;
  int32_t err, top;
  CK(cudaMemcpy(&e, d_dir, sizeof e, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(&size, d_sizes, 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(&err, pool.p.error, 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(&top, pool.p.free_top, 4, cudaMemcpyDeviceToHost));
  assert_int_not_equal(err, 0);
  assert_int_equal(e.kind, KVC_PAGE_EMPTY);
  assert_int_equal(size, 0);
  CK(cudaFree(d_blocks));
  CK(cudaFree(d_ntok));
  CK(cudaFree(d_ids));
  CK(cudaFree(d_dir));
  CK(cudaFree(d_sizes));
  pool.destroy();
  return top;
}

static void dry_free_stack_sets_the_error_and_leaves_the_directory(void **state) {
  (void)state;
  if (!kvc_test_have_gpu()) skip();
  /* 2048-byte chunks: the page needs 33, the stack holds 4; the failed pop is undone exactly. */
  assert_int_equal(refused_page(2048, 4), 4);
}

static void page_over_the_chunk_limit_sets_the_error(void **state) {
  (void)state;
  if (!kvc_test_have_gpu()) skip();
  /* 1024-byte chunks: the page would need 65 > KVC_PAGE_MAX_CHUNKS; the stack has room. Chunks
   * popped for the first sections stay taken (the host treats the error as internal). */
  int32_t top = refused_page(1024, 100);
  assert_true(top >= 100 - KVC_PAGE_MAX_CHUNKS && top <= 100);
}

static void unbuilt_shapes_are_unsupported(void **state) {
  (void)state;
  if (!kvc_test_have_gpu()) skip();
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

/* One warp per histogram: kvc_huf_warp_build on counts[h], results to len/code/n_sym. */
__global__ void huf_warp_kernel(const uint32_t *counts, uint8_t *len, uint32_t *code, int *n_sym) {
  __shared__ uint32_t c[KVC_SYM_COUNT], cd[KVC_SYM_COUNT];
  __shared__ uint8_t l[KVC_SYM_COUNT];
  __shared__ __align__(16) uint8_t scratch[KVC_HUF_WARP_SCRATCH];
  const int h = blockIdx.x, lane = threadIdx.x;
  c[lane] = counts[h * KVC_SYM_COUNT + lane];
  c[lane + 32] = counts[h * KVC_SYM_COUNT + lane + 32];
  __syncwarp();
  const int ns = kvc_huf_warp_build(c, l, cd, scratch);
  for (int s = lane; s < KVC_SYM_COUNT; s += 32) {
    len[h * KVC_SYM_COUNT + s] = l[s];
    code[h * KVC_SYM_COUNT + s] = cd[s];
  }
  if (lane == 0) n_sym[h] = ns;
}

/* Histograms of the shapes a section produces (few symbols, a geometric tail, counts summing to up
 * to 16384) and adversarial ones: Fibonacci-like counts (trees deeper than KVC_HUF_MAX_LEN, so the
 * fold runs), powers of two, ties everywhere, one or two symbols, none. */
static void huf_histogram(kvc_test_rng_t *r, int kind, uint32_t *c) {
  memset(c, 0, KVC_SYM_COUNT * sizeof *c);
  const int nz = 1 + (int)kvc_test_rng_below(r, KVC_SYM_COUNT);
  switch (kind) {
  case 0:
    for (int i = 0; i < nz; i++) c[kvc_test_rng_below(r, 64)] = 1 + kvc_test_rng_below(r, 20);
    break;
  case 1: {
    uint32_t a = 1, b = 1;
    for (int i = 0; i < nz; i++) {
      c[kvc_test_rng_below(r, 64)] = a;
      const uint32_t t = a + b;
      a = b;
      b = t;
      if (b > 16384) a = b = 1;
    }
    break;
  }
  case 2:
    for (int i = 0; i < 64; i++)
      if (kvc_test_rng_below(r, 3) == 0) c[i] = 8192u >> kvc_test_rng_below(r, 14);
    break;
  case 3: {
    uint32_t total = 16384;
    for (int i = 0; i < 64 && total > 0; i++) {
      uint32_t v = kvc_test_rng_below(r, 2) ? total / 2 : 1 + kvc_test_rng_below(r, 3);
      if (kvc_test_rng_below(r, 4) == 0) v = 0;
      c[kvc_test_rng_below(r, 64)] += v;
      total -= v;
    }
    break;
  }
  case 4:
    for (int i = 0; i < 64; i++) c[i] = kvc_test_rng_below(r, 5) == 0 ? 7 : 0;
    break;
  case 5:
  {
    const int k = (int)kvc_test_rng_below(r, 3);
    for (int i = 0; i < k; i++) c[kvc_test_rng_below(r, 64)] = 1 + kvc_test_rng_below(r, 9);
    break;
  }
  default: /* section-like: a two-sided geometric distribution around a few symbols */
    for (int i = 0; i < 8192; i++) {
      uint32_t s = 0;
      while (s < 63 && kvc_test_rng_below(r, 8) < 5) s++;
      c[s]++;
    }
  }
}

static void warp_huffman_build_equals_cpu(void **state) {
  (void)state;
  if (!kvc_test_have_gpu()) skip();
  /* KVC_TEST_SCALE shortens the sweep (e.g. under compute-sanitizer); 2100 still reach the fold. */
  const int n = 7 * std::max(300, (int)(3000 * kvc_test_scale()));
  std::vector<uint32_t> counts((size_t)n * KVC_SYM_COUNT), code((size_t)n * KVC_SYM_COUNT);
  std::vector<uint8_t> len((size_t)n * KVC_SYM_COUNT);
  std::vector<int> nsym(n);
  kvc_test_rng_t r;
  kvc_test_rng_seed(&r, 4242);
  for (int h = 0; h < n; h++) huf_histogram(&r, h % 7, &counts[(size_t)h * KVC_SYM_COUNT]);
  uint32_t *d_counts, *d_code;
  uint8_t *d_len;
  int *d_nsym;
  CK(cudaMalloc((void **)&d_counts, 4 * counts.size()));
  CK(cudaMalloc((void **)&d_code, 4 * code.size()));
  CK(cudaMalloc((void **)&d_len, len.size()));
  CK(cudaMalloc((void **)&d_nsym, 4 * (size_t)n));
  CK(cudaMemcpy(d_counts, counts.data(), 4 * counts.size(), cudaMemcpyHostToDevice));
  huf_warp_kernel<<<n, 32>>>(d_counts, d_len, d_code, d_nsym);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  CK(cudaMemcpy(code.data(), d_code, 4 * code.size(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(len.data(), d_len, len.size(), cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(nsym.data(), d_nsym, 4 * (size_t)n, cudaMemcpyDeviceToHost));
  int bad = 0, folded = 0;
  for (int h = 0; h < n; h++) {
    uint8_t l[KVC_SYM_COUNT];
    uint32_t cd[KVC_SYM_COUNT];
    const int ns = kvc_huf_build_lengths(&counts[(size_t)h * KVC_SYM_COUNT], l);
    kvc_huf_codes(l, cd);
    for (int s = 0; s < KVC_SYM_COUNT; s++) folded += l[s] == KVC_HUF_MAX_LEN;
    if (ns == nsym[h] && memcmp(l, &len[(size_t)h * KVC_SYM_COUNT], sizeof l) == 0 &&
        memcmp(cd, &code[(size_t)h * KVC_SYM_COUNT], sizeof cd) == 0)
      continue;
    if (bad++ < 3) {
      fprintf(stderr, "histogram %d (kind %d): n_sym CPU %d GPU %d; symbol: count len(CPU,GPU) code(CPU,GPU)\n",
              h, h % 7, ns, nsym[h]);
      for (int s = 0; s < KVC_SYM_COUNT; s++)
        if (counts[(size_t)h * KVC_SYM_COUNT + s])
          fprintf(stderr, "  %d: %u %u,%u %u,%u\n", s, counts[(size_t)h * KVC_SYM_COUNT + s], l[s],
                  len[(size_t)h * KVC_SYM_COUNT + s], cd[s], code[(size_t)h * KVC_SYM_COUNT + s]);
    }
  }
  CK(cudaFree(d_counts));
  CK(cudaFree(d_code));
  CK(cudaFree(d_len));
  CK(cudaFree(d_nsym));
  assert_true(folded > 0); /* the sweep reached the length limit */
  if (bad) fail_msg("%d of %d histograms differ from the CPU build", bad, n);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(warp_huffman_build_equals_cpu),
      cmocka_unit_test(gpu_pages_equal_cpu_pages),
      cmocka_unit_test(dry_free_stack_sets_the_error_and_leaves_the_directory),
      cmocka_unit_test(page_over_the_chunk_limit_sets_the_error),
      cmocka_unit_test(unbuilt_shapes_are_unsupported),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
