/*
 * The codecs on the GPU (kvc_codec_cuda.h): batched compression, one CTA per job (page), and
 * standalone decompression, one CTA per (job, section).
 *
 * Compression mirrors kvc_codec.c step by step with the shared primitives of kvc_quant.h, so pages
 * are bit-identical to the CPU encoder's. Per section (tensor, kv head) the CTA loads the rows into
 * shared memory, quantizes (group ranges, verification, power-of-two fallback, centres), computes
 * every code u and the symbol histogram, builds the Huffman lengths (thread 0), sums the lane
 * lengths, and writes the section into a shared staging buffer with shared atomicOr on 32-bit words;
 * then it copies the section into the page's chunks. Chunks are taken from the device free stack as
 * the page grows (policy FIXED: one pop per section that crosses into new chunks; other policies
 * first size every section under both codecs, then pop once). The page header and section table
 * are written last.
 *
 * Limits of this build: head_dim 64, 128, 256; dtype fp16 or bf16; block_tokens * head_dim <= 16384
 * (shared memory for the rows and the codes); num_kv_heads <= 64. Other shapes: KVC_ERR_UNSUPPORTED.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "compress/kvc_codec.h"
#include "compress/kvc_codec_cuda.h"
#include "compress/kvc_codec_device.cuh"
#include "compress/kvc_page_format.h"
#include "compress/kvc_quant.h"

namespace {

constexpr int kThreads = 256;
constexpr int kMaxSymbols = 16384; /* block_tokens * head_dim */
constexpr int kMaxHeads = 64;
constexpr int kMaxLanes = kMaxSymbols / KVC_LANE_SYMBOLS; /* 256 = kThreads: one lane per thread */
constexpr int kMaxGroups = 256;
constexpr int kEUnset = KVC_STEP_CODE_MIN - 2;
static_assert(kMaxLanes <= kThreads, "one thread per lane");

struct Args {
  const uint8_t *blocks;
  const int32_t *n_tokens;
  const int32_t *block_ids;
  kvc_page_entry_t *dir;
  kvc_dev_pool_t pool;
  uint32_t *page_bytes;
  uint64_t staging_bytes;
  int num_kv_heads;
  int block_tokens;
  int dtype;
  int bound_mode;
  float k_bound, v_bound;
  int policy;
  int codec;
  float size_budget;
};

/* Shared memory of the compression kernel, carved from the dynamic buffer. */
struct Smem {
  uint8_t *xs;        /* [S_max] input rows in the page dtype; reused as the section staging buffer */
  uint32_t *us;       /* [S_max] codes */
  int32_t *gmn, *gmx; /* [groups] order-preserving int keys of the group min / max */
  double *glim;       /* [groups] */
  int32_t *ge, *gbase, *gflag, *gqmin;
  float *gstep;
  unsigned long long *csum; /* [head_dim] */
  uint32_t *lane_bits, *lane_off; /* [kMaxLanes] */
  uint32_t *counts, *code;        /* [64] */
  uint8_t *len;                   /* [64] */
  uint8_t *hdr;                   /* [sections_start] page header and section table */
  uint32_t *chunks;               /* [KVC_PAGE_MAX_CHUNKS] */
  int *misc;                      /* [16] */
};

/* misc[]: per-section values first (reset by quantize), then per-page ones. */
enum { M_FAIL, M_ELO, M_EHI, M_BLO, M_BHI, M_MAXU, M_LLO, M_LHI, M_NSYM, M_HAVE, M_DRY, M_NMISC };

__host__ __device__ inline size_t align16z(size_t x) { return (x + 15) & ~(size_t)15; }

__host__ __device__ inline size_t smem_bytes(int smax, int hd, int heads) {
  size_t b = 0;
  b += align16z((size_t)smax * 2);            /* xs */
  b += align16z((size_t)smax * 4);            /* us */
  b += align16z((size_t)kMaxGroups * 8);      /* glim */
  b += align16z((size_t)kMaxGroups * 4) * 7;  /* gmn gmx ge gbase gflag gqmin gstep */
  b += align16z((size_t)hd * 8);              /* csum */
  b += align16z((size_t)kMaxLanes * 4) * 2;   /* lane_bits lane_off */
  b += 64 * 4 * 2 + 64;                       /* counts code len */
  b += align16z(kvc_page_sections_start((uint32_t)heads));
  b += KVC_PAGE_MAX_CHUNKS * 4 + M_NMISC * 4;
  return b + 64;
}

__device__ inline Smem carve(uint8_t *p, int smax, int hd, int heads) {
  Smem s;
  auto take = [&](size_t bytes) {
    uint8_t *r = p;
    p += align16z(bytes);
    return r;
  };
  s.xs = take((size_t)smax * 2);
  s.us = (uint32_t *)take((size_t)smax * 4);
  s.glim = (double *)take(kMaxGroups * 8);
  s.gmn = (int32_t *)take(kMaxGroups * 4);
  s.gmx = (int32_t *)take(kMaxGroups * 4);
  s.ge = (int32_t *)take(kMaxGroups * 4);
  s.gbase = (int32_t *)take(kMaxGroups * 4);
  s.gflag = (int32_t *)take(kMaxGroups * 4);
  s.gqmin = (int32_t *)take(kMaxGroups * 4);
  s.gstep = (float *)take(kMaxGroups * 4);
  s.csum = (unsigned long long *)take((size_t)hd * 8);
  s.lane_bits = (uint32_t *)take(kMaxLanes * 4);
  s.lane_off = (uint32_t *)take(kMaxLanes * 4);
  s.counts = (uint32_t *)take(64 * 4);
  s.code = (uint32_t *)take(64 * 4);
  s.len = take(64);
  s.hdr = take(kvc_page_sections_start((uint32_t)heads));
  s.chunks = (uint32_t *)take(KVC_PAGE_MAX_CHUNKS * 4);
  s.misc = (int *)take(M_NMISC * 4);
  return s;
}

/* Float <-> int keys whose int order is the float order (finite values). */
__device__ __forceinline__ int32_t fkey(float f) {
  int32_t b = __float_as_int(f);
  return b ^ ((b >> 31) & 0x7fffffff);
}
__device__ __forceinline__ float funkey(int32_t k) { return __int_as_float(k ^ ((k >> 31) & 0x7fffffff)); }

template <int DT> __device__ __forceinline__ float load_x(const uint8_t *xs, int s) {
  if (DT == KVC_DTYPE_F16) return __half2float(((const __half *)xs)[s]);
  return __bfloat162float(((const __nv_bfloat16 *)xs)[s]);
}

__device__ __forceinline__ int warp_min(int v) {
  for (int o = 16; o; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ int warp_max(int v) {
  for (int o = 16; o; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ int warp_or(int v) {
  for (int o = 16; o; o >>= 1) v |= __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/* ORs the w-bit (0..32) field v at bit p of the MSB-first word stream. */
__device__ __forceinline__ void put_bits(uint32_t *words, uint32_t p, uint32_t v, uint32_t w) {
  if (w == 0) return;
  uint32_t k = p >> 5, off = p & 31;
  uint64_t t = (uint64_t)v << (64 - off - w);
  atomicOr(&words[k], (uint32_t)(t >> 32));
  if ((uint32_t)t) atomicOr(&words[k + 1], (uint32_t)t);
}

/* The quantized form of one section; what kvc_codec.c's kvc__qsec_t holds, in shared memory. */
struct QInfo {
  int ok;      /* 0: the section cannot be quantized (KVC_ERR_UNSUPPORTED) */
  int mode;    /* KVC_QMODE_* */
  int groups;
  int e_min;
  int32_t b_min;
  uint32_t w_e, w_b, max_u;
  float abs_step;
};

/* Loads section rows and quantizes: fills us[], counts[], group state. All threads. */
template <int HD, int DT>
__device__ __noinline__ QInfo quantize(const Smem &sm, const uint8_t *rows, int n, int tensor, int mode_abs,
                          float bound) {
  const int tid = threadIdx.x, S = n * HD;
  const int esz = 2;
  /* A failed quantize returns right after its threads read misc[M_FAIL]; when the caller moves on
   * to the next section at once (policy sizing), no thread may reset misc or overwrite the rows
   * before every thread has read it. */
  __syncthreads();
  /* Rows -> shared (16-byte vectors; S * 2 is a multiple of 16). */
  for (int i = tid; i < S * esz / 16; i += kThreads)
    ((uint4 *)sm.xs)[i] = __ldg((const uint4 *)rows + i);
  if (tid < M_HAVE) sm.misc[tid] = 0;
  if (tid < 64) sm.counts[tid] = 0;
  for (int g = tid; g < kMaxGroups; g += kThreads) {
    sm.gmn[g] = INT32_MAX;
    sm.gmx[g] = INT32_MIN;
    sm.gqmin[g] = INT32_MAX;
    sm.gflag[g] = 0;
  }
  for (int d = tid; d < HD; d += kThreads) sm.csum[d] = 0;
  __syncthreads();
  if (tid == 0) {
    sm.misc[M_ELO] = INT32_MAX;
    sm.misc[M_EHI] = INT32_MIN;
    sm.misc[M_BLO] = INT32_MAX;
    sm.misc[M_BHI] = INT32_MIN;
  }
  QInfo q;
  q.ok = 1;
  q.abs_step = 0.0f;
  const int d0 = tid % HD; /* kThreads % HD == 0: a thread always sees the same channel */
  if (!mode_abs) {
    q.mode = KVC_QMODE_REL;
    const int G = tensor == 0 ? HD : n;
    q.groups = G;
    /* Group ranges. Keys: group = channel (per thread); values: group = token (per warp). */
    int lmn = INT32_MAX, lmx = INT32_MIN, bad = 0;
    for (int s = tid; s < S; s += kThreads) {
      float x = load_x<DT>(sm.xs, s);
      bad |= !isfinite(x);
      int k = fkey(x);
      if (tensor == 0) {
        lmn = min(lmn, k);
        lmx = max(lmx, k);
      } else {
        int a = warp_min(k), b = warp_max(k);
        if ((tid & 31) == 0) {
          atomicMin(&sm.gmn[s / HD], a);
          atomicMax(&sm.gmx[s / HD], b);
        }
      }
    }
    if (tensor == 0 && lmn <= lmx) {
      atomicMin(&sm.gmn[d0], lmn);
      atomicMax(&sm.gmx[d0], lmx);
    }
    if (bad) sm.misc[M_FAIL] = 1;
    __syncthreads();
    if (sm.misc[M_FAIL]) return QInfo{0};
    for (int g = tid; g < G; g += kThreads) {
      double lim = kvc_q_rel_lim(bound, funkey(sm.gmn[g]), funkey(sm.gmx[g]));
      int e = kvc_step_code_floor(KVC_DMUL(2.0, lim));
      sm.glim[g] = lim;
      sm.ge[g] = e;
      sm.gflag[g] = e < KVC_STEP_CODE_MIN;
      sm.gstep[g] = e < KVC_STEP_CODE_MIN ? 1.0f : kvc_step_from_code(e);
    }
    __syncthreads();
    /* Verify every value with its group's step; the smallest q is the group base. */
    int lq = INT32_MAX, lfail = 0;
    for (int s = tid; s < S; s += kThreads) {
      int g = tensor == 0 ? d0 : s / HD;
      float x = load_x<DT>(sm.xs, s), st = sm.gstep[g];
      int32_t v = 0;
      int fail = !kvc_q_of(x, st, &v) || !kvc_q_within(kvc_q_recon(v, st), x, sm.glim[g]);
      if (tensor == 0) {
        lq = min(lq, v);
        lfail |= fail;
      } else {
        int a = warp_min(v), f = warp_or(fail);
        if ((tid & 31) == 0) {
          atomicMin(&sm.gqmin[g], a);
          if (f) sm.gflag[g] = 1;
        }
      }
    }
    if (tensor == 0 && tid < S) {
      atomicMin(&sm.gqmin[d0], lq);
      if (lfail) sm.gflag[d0] = 1;
    }
    __syncthreads();
    /* Failed groups take the exact power-of-two step (rare; one thread per group). */
    const int len = tensor == 0 ? n : HD;
    for (int g = tid; g < G; g += kThreads) {
      int e = sm.ge[g];
      int32_t base = sm.gqmin[g];
      if (sm.gflag[g]) {
        int k = 1000;
        for (int i = 0; i < len; i++) {
          float x = load_x<DT>(sm.xs, tensor == 0 ? i * HD + g : g * HD + i);
          if (x != 0.0f) k = min(k, kvc_q_lowbit_exp(x));
        }
        if (k == 1000) {
          e = kEUnset;
          base = 0;
        } else if (k < KVC_STEP_CODE_MIN / 8) {
          sm.misc[M_FAIL] = 1;
        } else {
          e = 8 * k;
          float st = kvc_step_from_code(e);
          base = INT32_MAX;
          for (int i = 0; i < len; i++) {
            float x = load_x<DT>(sm.xs, tensor == 0 ? i * HD + g : g * HD + i);
            int32_t v;
            if (!kvc_q_of(x, st, &v) || !kvc_q_within(kvc_q_recon(v, st), x, sm.glim[g])) {
              sm.misc[M_FAIL] = 1;
              break;
            }
            base = min(base, v);
          }
        }
      }
      sm.ge[g] = e;
      sm.gbase[g] = base;
      if (e != kEUnset) {
        atomicMin(&sm.misc[M_ELO], e);
        atomicMax(&sm.misc[M_EHI], e);
      }
      atomicMin(&sm.misc[M_BLO], base);
      atomicMax(&sm.misc[M_BHI], base);
    }
    __syncthreads();
    if (sm.misc[M_FAIL]) return QInfo{0};
    int e_lo = sm.misc[M_ELO], e_hi = sm.misc[M_EHI];
    if (e_hi < e_lo) e_lo = e_hi = 0;
    for (int g = tid; g < G; g += kThreads) {
      if (sm.ge[g] == kEUnset) sm.ge[g] = e_lo;
      sm.gstep[g] = kvc_step_from_code(sm.ge[g]);
    }
    q.e_min = e_lo;
    q.b_min = sm.misc[M_BLO];
    q.w_e = kvc_bits_for((uint32_t)(e_hi - e_lo));
    q.w_b = kvc_bits_for((uint32_t)sm.misc[M_BHI] - (uint32_t)sm.misc[M_BLO]);
    __syncthreads();
    if (q.w_e > 16) return QInfo{0};
  } else {
    q.mode = KVC_QMODE_ABS;
    q.groups = HD;
    int e = kvc_step_code_floor(KVC_DMUL(2.0, (double)bound));
    if (e < KVC_STEP_CODE_MIN) return QInfo{0};
    const float st = kvc_step_from_code(e);
    const double lim = (double)bound;
    long long lsum = 0;
    int lfail = 0;
    for (int s = tid; s < S; s += kThreads) {
      float x = load_x<DT>(sm.xs, s);
      int32_t v = 0;
      lfail |= !isfinite(x) || !kvc_q_of(x, st, &v) || !kvc_q_within(kvc_q_recon(v, st), x, lim);
      lsum += v;
    }
    if (tid < S) atomicAdd(&sm.csum[d0], (unsigned long long)lsum);
    if (lfail) sm.misc[M_FAIL] = 1;
    __syncthreads();
    if (sm.misc[M_FAIL]) return QInfo{0};
    for (int d = tid; d < HD; d += kThreads) {
      int32_t c = kvc_q_center((long long)sm.csum[d], n);
      sm.gbase[d] = c;
      atomicMin(&sm.misc[M_BLO], c);
      atomicMax(&sm.misc[M_BHI], c);
    }
    __syncthreads();
    q.e_min = e;
    q.abs_step = st;
    q.b_min = sm.misc[M_BLO];
    q.w_e = 0;
    q.w_b = kvc_bits_for((uint32_t)sm.misc[M_BHI] - (uint32_t)sm.misc[M_BLO]);
  }
  /* Codes, histogram (warp-aggregated), largest code. */
  int lmaxu = 0, lfail = 0;
  for (int s = tid; s < S; s += kThreads) {
    float x = load_x<DT>(sm.xs, s);
    int32_t v = 0;
    uint32_t u;
    if (q.mode == KVC_QMODE_REL) {
      int g = tensor == 0 ? d0 : s / HD;
      kvc_q_of(x, sm.gstep[g], &v);
      u = (uint32_t)v - (uint32_t)sm.gbase[g];
    } else {
      kvc_q_of(x, q.abs_step, &v);
      u = kvc_zigzag((int32_t)((uint32_t)v - (uint32_t)sm.gbase[d0]));
    }
    lfail |= u >= (1u << KVC_Q_MAX_BITS);
    sm.us[s] = u;
    uint32_t sym = kvc_sym_of(min(u, (1u << KVC_Q_MAX_BITS) - 1));
    uint32_t peers = __match_any_sync(0xffffffffu, sym);
    if ((tid & 31) == __ffs(peers) - 1) atomicAdd(&sm.counts[sym], __popc(peers));
    lmaxu = max(lmaxu, (int)min(u, (1u << KVC_Q_MAX_BITS)));
  }
  lmaxu = warp_max(lmaxu);
  if ((tid & 31) == 0) atomicMax(&sm.misc[M_MAXU], lmaxu);
  if (lfail) sm.misc[M_FAIL] = 1;
  __syncthreads();
  if (sm.misc[M_FAIL]) return QInfo{0};
  q.max_u = (uint32_t)sm.misc[M_MAXU];
  return q;
}

__device__ __forceinline__ uint32_t qsec_bytes(uint64_t bits) {
  uint64_t words = (bits + 31) / 32;
  if (words == 0) words = 1;
  return (uint32_t)(KVC_QSEC_HEADER_BYTES + 4 * words);
}

/* Huffman lengths, codes and lane lengths of a quantized section (all threads); returns its bytes. */
__device__ __noinline__ uint32_t huffman_plan(const Smem &sm, const QInfo &q, int S, int *n_lanes_out,
                                 uint32_t *w_lane_out) {
  const int tid = threadIdx.x;
  if (tid == 0) {
    sm.misc[M_NSYM] = kvc_huf_build_lengths(sm.counts, sm.len);
    kvc_huf_codes(sm.len, sm.code);
    sm.misc[M_LLO] = INT32_MAX;
    sm.misc[M_LHI] = 0;
  }
  __syncthreads();
  int nl = (S + KVC_LANE_SYMBOLS - 1) / KVC_LANE_SYMBOLS;
  uint32_t bits = 0;
  if (tid < nl) {
    for (int s = tid; s < S; s += nl) {
      uint32_t sym = kvc_sym_of(sm.us[s]);
      bits += sm.len[sym] + kvc_sym_extra(sym);
    }
    sm.lane_bits[tid] = bits;
    atomicMin(&sm.misc[M_LLO], (int)bits);
    atomicMax(&sm.misc[M_LHI], (int)bits);
  }
  /* Exclusive scan of lane lengths over the block (lanes <= threads). */
  uint32_t incl = tid < nl ? bits : 0;
  for (int o = 1; o < 32; o <<= 1) {
    uint32_t v = __shfl_up_sync(0xffffffffu, incl, o);
    if ((tid & 31) >= o) incl += v;
  }
  __shared__ uint32_t warp_tot[kThreads / 32];
  if ((tid & 31) == 31) warp_tot[tid / 32] = incl;
  __syncthreads();
  uint32_t before = 0;
  for (int w = 0; w < tid / 32; w++) before += warp_tot[w];
  if (tid < nl) sm.lane_off[tid] = before + incl - bits;
  uint64_t total = 0;
  for (int w = 0; w < kThreads / 32; w++) total += warp_tot[w];
  uint32_t lo = (uint32_t)sm.misc[M_LLO], hi = (uint32_t)sm.misc[M_LHI];
  uint32_t w_lane = kvc_bits_for(hi - lo);
  *n_lanes_out = nl;
  *w_lane_out = w_lane;
  uint64_t meta = (uint64_t)q.groups * (q.w_e + q.w_b);
  uint32_t b = qsec_bytes(meta + 4u * (uint32_t)sm.misc[M_NSYM] + (uint64_t)nl * w_lane + total);
  __syncthreads();
  return b;
}

/* Writes the quantized section into the staging buffer sm.xs (all threads). */
__device__ __noinline__ void emit(const Smem &sm, const QInfo &q, int codec, int S, int n_lanes,
                     uint32_t w_lane, uint32_t bytes) {
  const int tid = threadIdx.x;
  uint32_t *wd = (uint32_t *)(sm.xs + KVC_QSEC_HEADER_BYTES);
  for (uint32_t i = tid; i < (uint32_t)align16z(bytes) / 4; i += kThreads) ((uint32_t *)sm.xs)[i] = 0;
  __syncthreads();
  const uint32_t width = kvc_bits_for(q.max_u);
  const int n_sym = sm.misc[M_NSYM];
  if (tid == 0) {
    kvc_qsec_header_t h;
    h.mode = (uint8_t)q.mode;
    h.w_e = (uint8_t)q.w_e;
    h.w_b = (uint8_t)q.w_b;
    h.e_min = (int16_t)q.e_min;
    h.b_min = q.b_min;
    if (codec == KVC_CODEC_BITPACK) {
      h.width = (uint8_t)width;
      h.n_lanes = 0;
      h.lane_info = 0;
    } else {
      h.width = (uint8_t)n_sym;
      h.n_lanes = (uint16_t)n_lanes;
      h.lane_info = (uint32_t)sm.misc[M_LLO] | (w_lane << 27);
    }
    uint8_t raw[16];
    kvc_qsec_header_write(raw, &h);
    for (int i = 0; i < 4; i++) ((uint32_t *)sm.xs)[i] = kvc_rd_u32(raw + 4 * i);
  }
  const int G = q.groups;
  const uint32_t pos_b = q.mode == KVC_QMODE_REL ? (uint32_t)G * q.w_e : 0;
  for (int g = tid; g < G; g += kThreads) {
    if (q.mode == KVC_QMODE_REL) put_bits(wd, (uint32_t)g * q.w_e, (uint32_t)(sm.ge[g] - q.e_min), q.w_e);
    put_bits(wd, pos_b + (uint32_t)g * q.w_b, (uint32_t)sm.gbase[g] - (uint32_t)q.b_min, q.w_b);
  }
  const uint32_t meta = pos_b + (uint32_t)G * q.w_b;
  if (codec == KVC_CODEC_BITPACK) {
    for (int s = tid; s < S; s += kThreads) put_bits(wd, meta + (uint32_t)s * width, sm.us[s], width);
  } else {
    if (tid < n_sym) put_bits(wd, meta + 4u * tid, sm.len[tid], 4);
    const uint32_t lanes_pos = meta + 4u * (uint32_t)n_sym;
    const uint32_t stream = lanes_pos + (uint32_t)n_lanes * w_lane;
    if (tid < n_lanes) {
      put_bits(wd, lanes_pos + (uint32_t)tid * w_lane, sm.lane_bits[tid] - (uint32_t)sm.misc[M_LLO],
               w_lane);
      uint32_t p = stream + sm.lane_off[tid];
      for (int s = tid; s < S; s += n_lanes) {
        uint32_t u = sm.us[s], sym = kvc_sym_of(u), ne = kvc_sym_extra(sym), l = sm.len[sym];
        put_bits(wd, p, (sm.code[sym] << ne) | (u - kvc_sym_base(sym)), l + ne);
        p += l + ne;
      }
    }
  }
  __syncthreads();
}

/* Makes sure the page's chunks cover `bytes` (thread 0 pops; all threads call). Returns false when
 * the free stack ran dry or the page would need more than KVC_PAGE_MAX_CHUNKS chunks. */
__device__ bool ensure_chunks(const Smem &sm, const Args &a, uint32_t bytes) {
  if (threadIdx.x == 0 && !sm.misc[M_DRY]) {
    uint32_t need = kvc_chunks_for(bytes, a.pool.chunk_bytes);
    int have = sm.misc[M_HAVE];
    if (need > KVC_PAGE_MAX_CHUNKS) {
      sm.misc[M_DRY] = 1;
    } else if ((int)need > have) {
      int k = (int)need - have;
      int old = atomicSub(a.pool.free_top, k);
      if (old < k) {
        atomicAdd(a.pool.free_top, k); /* nothing is pushed in this launch: undo is exact */
        sm.misc[M_DRY] = 1;
      } else {
        for (int i = 0; i < k; i++) sm.chunks[have + i] = a.pool.free_stack[old - k + i];
        sm.misc[M_HAVE] = (int)need;
      }
    }
    if (sm.misc[M_DRY]) atomicExch(a.pool.error, 1);
  }
  __syncthreads();
  return !sm.misc[M_DRY];
}

/* Copies align16(bytes) bytes from shared `src` to page offset `off` (16-aligned). */
__device__ void copy_out(const Smem &sm, const Args &a, const uint8_t *src, uint32_t off,
                         uint32_t bytes, bool global_src) {
  const uint32_t cb = a.pool.chunk_bytes;
  for (uint32_t i = threadIdx.x; i < (uint32_t)align16z(bytes) / 16; i += kThreads) {
    uint32_t o = off + 16 * i;
    uint4 v = global_src ? __ldg((const uint4 *)src + i) : ((const uint4 *)src)[i];
    *(uint4 *)(a.pool.base + (uint64_t)sm.chunks[o / cb] * cb + o % cb) = v;
  }
}

/* A job whose chunks could not be taken: no directory entry, size 0 (error already set). */
__device__ inline void fail_job(const Args &a, int job) {
  if (threadIdx.x == 0) a.page_bytes[job] = 0;
}

template <int HD, int DT>
__global__ void __launch_bounds__(kThreads) compress_kernel(Args a) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const int job = blockIdx.x, tid = threadIdx.x, H = a.num_kv_heads;
  const int n = a.n_tokens[job], smax = a.block_tokens * HD;
  Smem sm = carve(smem_raw, smax, HD, H);
  const int32_t bid = a.block_ids[job];
  if (n < 1 || n > a.block_tokens) {
    if (tid == 0) {
      atomicExch(a.pool.error, 1);
      a.page_bytes[job] = 0;
    }
    return;
  }
  const int S = n * HD;
  const uint8_t *block = a.blocks + (uint64_t)job * a.staging_bytes;
  const uint64_t row_stride = (uint64_t)a.block_tokens * HD * 2;
  const uint32_t raw = (uint32_t)S * 2, start = kvc_page_sections_start((uint32_t)H);
  if (tid == 0) {
    sm.misc[M_HAVE] = 0;
    sm.misc[M_DRY] = 0;
  }
  __syncthreads();

  int codec = a.codec;
  if (a.policy != KVC_POLICY_FIXED) {
    /* Size every section under both codecs, then pick like kvc_codec_encode. */
    size_t sz_bp = start, sz_hf = start;
    bool ok_bp = true, ok_hf = true;
    for (int i = 0; i < 2 * H; i++) {
      const int tensor = i / H;
      QInfo q = quantize<HD, DT>(sm, block + i * row_stride, n, tensor, a.bound_mode,
                                 tensor == 0 ? a.k_bound : a.v_bound);
      if (!q.ok) {
        ok_bp = ok_hf = false;
        continue;
      }
      uint32_t bp = qsec_bytes((uint64_t)q.groups * (q.w_e + q.w_b) + (uint64_t)S * kvc_bits_for(q.max_u));
      int nl;
      uint32_t wl;
      uint32_t hf = huffman_plan(sm, q, S, &nl, &wl);
      if (bp > raw) ok_bp = false;
      if (hf > raw) ok_hf = false;
      sz_bp += align16z(bp);
      sz_hf += align16z(hf);
    }
    size_t sz[3] = {start + (size_t)2 * H * align16z(raw), ok_bp ? sz_bp : 0, ok_hf ? sz_hf : 0};
    int best = 0;
    for (int c = 1; c < 3; c++)
      if (sz[c] && sz[c] < sz[best]) best = c;
    if (a.policy == KVC_POLICY_FASTEST_WITHIN) {
      double budget = KVC_DMUL((double)a.size_budget, (double)sz[0]);
      for (int c = 0; c < 3; c++) {
        if (sz[c] && (double)sz[c] <= budget) {
          best = c;
          break;
        }
      }
    }
    codec = best;
    if (!ensure_chunks(sm, a, (uint32_t)sz[best])) return fail_job(a, job);
  }

  /* Emit. A quantized section that cannot be coded turns the page raw (restart). */
  uint32_t pos = start;
  for (int pass = 0; pass < 2; pass++) {
    bool restart = false;
    pos = start;
    for (int i = 0; i < 2 * H && !restart; i++) {
      const int tensor = i / H;
      const uint8_t *rows = block + i * row_stride;
      uint32_t bytes = raw;
      if (codec != KVC_CODEC_RAW) {
        QInfo q = quantize<HD, DT>(sm, rows, n, tensor, a.bound_mode,
                                   tensor == 0 ? a.k_bound : a.v_bound);
        int nl = 0;
        uint32_t wl = 0;
        if (q.ok) {
          if (codec == KVC_CODEC_BITPACK)
            bytes = qsec_bytes((uint64_t)q.groups * (q.w_e + q.w_b) + (uint64_t)S * kvc_bits_for(q.max_u));
          else
            bytes = huffman_plan(sm, q, S, &nl, &wl);
        }
        if (!q.ok || bytes > raw) {
          restart = true;
          break;
        }
        emit(sm, q, codec, S, nl, wl, bytes);
        if (!ensure_chunks(sm, a, (uint32_t)align16z(pos + bytes))) return fail_job(a, job);
        copy_out(sm, a, sm.xs, pos, bytes, false);
      } else {
        if (!ensure_chunks(sm, a, (uint32_t)align16z(pos + bytes))) return fail_job(a, job);
        copy_out(sm, a, rows, pos, bytes, true);
      }
      if (tid == 0) kvc_wr_u32(sm.hdr + KVC_PAGE_HEADER_BYTES + 4 * i, pos + bytes);
      pos = (uint32_t)align16z(pos + bytes);
      __syncthreads(); /* staging buffer reused by the next section */
    }
    if (!restart) break;
    codec = KVC_CODEC_RAW;
  }

  /* Header last: zero the gap after the table, checksum, copy, directory entry. */
  if (tid == 0) {
    for (uint32_t b = KVC_PAGE_HEADER_BYTES + 8u * H; b < start; b++) sm.hdr[b] = 0;
    kvc_page_header_t h;
    h.magic = KVC_PAGE_MAGIC;
    h.version = KVC_PAGE_VERSION;
    h.codec = (uint8_t)codec;
    h.dtype = (uint8_t)DT;
    h.bound_mode = (uint8_t)a.bound_mode;
    h.n_tokens = (uint16_t)n;
    h.num_kv_heads = (uint16_t)H;
    h.head_dim = (uint16_t)HD;
    h.flags = 0;
    h.k_bound = a.k_bound;
    h.v_bound = a.v_bound;
    h.total_bytes = pos;
    h.checksum = 0;
    kvc_page_header_write(sm.hdr, &h);
    kvc_wr_u32(sm.hdr + 28, kvc_page_checksum(sm.hdr));
  }
  __syncthreads();
  copy_out(sm, a, sm.hdr, 0, start, false);
  if (tid == 0) {
    kvc_page_entry_t *e = &a.dir[bid];
    e->nbytes = pos;
    e->kind = KVC_PAGE_COMPRESSED;
    e->nchunks = (uint8_t)sm.misc[M_HAVE];
    e->codec = (uint8_t)codec;
    e->pad = 0;
    for (int c = 0; c < KVC_PAGE_MAX_CHUNKS; c++) e->chunk[c] = c < sm.misc[M_HAVE] ? sm.chunks[c] : 0;
    a.page_bytes[job] = pos;
  }
}

/* ---- decompression ------------------------------------------------------------------------ */

struct DArgs {
  const kvc_page_entry_t *dir;
  const int32_t *block_ids;
  const uint8_t *pool;
  uint32_t chunk_bytes;
  uint8_t *out;
  uint64_t staging_bytes;
  int num_kv_heads;
  int block_tokens;
  int dtype;
};

template <int HD>
__global__ void __launch_bounds__(kThreads) decompress_kernel(DArgs a) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  const int job = blockIdx.x, sec = blockIdx.y, H = a.num_kv_heads, bt = a.block_tokens;
  const kvc_page_entry_t *e = &a.dir[a.block_ids[job]];
  const uint32_t row = HD * 2;
  uint8_t *dst = a.out + (uint64_t)job * a.staging_bytes + (uint64_t)sec * bt * row;
  if (e->kind == KVC_PAGE_STAGING) {
    const uint32_t off = (uint32_t)sec * bt * row;
    kvc_dev_load_bytes(dst, a.pool, a.chunk_bytes, e, off, bt * row);
    return;
  }
  if (e->kind != KVC_PAGE_COMPRESSED) return;
  __shared__ kvc_page_header_t hdr;
  if (threadIdx.x == 0) kvc_dev_read_header(a.pool, a.chunk_bytes, e, &hdr);
  __syncthreads();
  /* Shared: section bytes (<= raw section), float tile, decode scratch. */
  uint8_t *sec_buf = smem_raw;
  float *tile = (float *)(smem_raw + align16z((size_t)bt * row));
  uint8_t *scratch = (uint8_t *)tile + align16z((size_t)bt * HD * 4);
  const bool shape_ok = hdr.num_kv_heads == H && hdr.head_dim == HD && hdr.n_tokens <= bt &&
                        hdr.dtype == a.dtype;
  uint32_t off = 0, bytes = 0;
  if (shape_ok) kvc_dev_page_section(a.pool, a.chunk_bytes, e, H, sec, &off, &bytes);
  bool ok = shape_ok && bytes <= bt * row && off + bytes <= e->nbytes;
  if (ok) kvc_dev_load_bytes(sec_buf, a.pool, a.chunk_bytes, e, off, bytes);
  __syncthreads();
  if (ok) ok = kvc_dev_decode_section<HD, float>(&hdr, sec / H, sec_buf, bytes, tile, HD, scratch, bt);
  const int n = ok ? hdr.n_tokens : 0;
  for (int i = threadIdx.x; i < bt * HD; i += kThreads) {
    float x = i < n * HD ? tile[i] : 0.0f;
    if (a.dtype == KVC_DTYPE_F16) ((__half *)dst)[i] = __float2half_rn(x);
    else ((__nv_bfloat16 *)dst)[i] = __float2bfloat16_rn(x);
  }
}

size_t decompress_smem(int hd, int bt) {
  return align16z((size_t)bt * hd * 2) + align16z((size_t)bt * hd * 4) +
         kvc_dev_decode_scratch_bytes(hd, bt);
}

kvc_status_t check_cuda_params(const kvc_codec_params_t *p) {
  kvc_status_t st = kvc_codec_check_params(p);
  if (st != KVC_OK) return st;
  if (p->head_dim != 64 && p->head_dim != 128 && p->head_dim != 256) return KVC_ERR_UNSUPPORTED;
  if (p->dtype != KVC_DTYPE_F16 && p->dtype != KVC_DTYPE_BF16) return KVC_ERR_UNSUPPORTED;
  if (p->block_tokens * p->head_dim > kMaxSymbols || p->num_kv_heads > kMaxHeads)
    return KVC_ERR_UNSUPPORTED;
  return KVC_OK;
}

template <int HD, int DT> kvc_status_t launch_compress(const Args &a, int jobs, cudaStream_t s) {
  size_t smem = smem_bytes(a.block_tokens * HD, HD, a.num_kv_heads);
  if (cudaFuncSetAttribute(compress_kernel<HD, DT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           (int)smem) != cudaSuccess)
    return KVC_ERR_CUDA;
  compress_kernel<HD, DT><<<jobs, kThreads, smem, s>>>(a);
  return cudaGetLastError() == cudaSuccess ? KVC_OK : KVC_ERR_CUDA;
}

template <int HD> kvc_status_t launch_decompress(const DArgs &a, int jobs, cudaStream_t s) {
  size_t smem = decompress_smem(HD, a.block_tokens);
  if (cudaFuncSetAttribute(decompress_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           (int)smem) != cudaSuccess)
    return KVC_ERR_CUDA;
  dim3 grid((unsigned)jobs, (unsigned)(2 * a.num_kv_heads));
  decompress_kernel<HD><<<grid, kThreads, smem, s>>>(a);
  return cudaGetLastError() == cudaSuccess ? KVC_OK : KVC_ERR_CUDA;
}

} // namespace

extern "C" kvc_status_t kvc_codec_cuda_compress(const kvc_codec_params_t *p, const void *blocks,
                                                const int32_t *n_tokens, const int32_t *block_ids,
                                                int num_jobs, kvc_page_entry_t *dir,
                                                kvc_dev_pool_t pool, uint32_t *page_bytes,
                                                void *stream) {
  kvc_status_t st = check_cuda_params(p);
  if (st != KVC_OK) return st;
  if (num_jobs < 0 || (num_jobs > 0 && (!blocks || !n_tokens || !block_ids || !dir ||
                                        !pool.base || !pool.free_stack || !pool.free_top ||
                                        !pool.error || !page_bytes)))
    return KVC_ERR_INVALID_ARGUMENT;
  if (pool.chunk_bytes < KVC_CHUNK_MIN_BYTES || (pool.chunk_bytes & (pool.chunk_bytes - 1)))
    return KVC_ERR_INVALID_ARGUMENT;
  if (num_jobs == 0) return KVC_OK;
  Args a;
  a.blocks = (const uint8_t *)blocks;
  a.n_tokens = n_tokens;
  a.block_ids = block_ids;
  a.dir = dir;
  a.pool = pool;
  a.page_bytes = page_bytes;
  a.staging_bytes = kvc_codec_staging_bytes(p);
  a.num_kv_heads = p->num_kv_heads;
  a.block_tokens = p->block_tokens;
  a.dtype = p->dtype;
  a.bound_mode = p->bound_mode;
  a.k_bound = p->k_bound;
  a.v_bound = p->v_bound;
  a.policy = p->policy;
  a.codec = p->codec;
  a.size_budget = p->size_budget;
  cudaStream_t s = (cudaStream_t)stream;
  const bool f16 = p->dtype == KVC_DTYPE_F16;
  switch (p->head_dim) {
  case 64: return f16 ? launch_compress<64, KVC_DTYPE_F16>(a, num_jobs, s) : launch_compress<64, KVC_DTYPE_BF16>(a, num_jobs, s);
  case 128: return f16 ? launch_compress<128, KVC_DTYPE_F16>(a, num_jobs, s) : launch_compress<128, KVC_DTYPE_BF16>(a, num_jobs, s);
  default: return f16 ? launch_compress<256, KVC_DTYPE_F16>(a, num_jobs, s) : launch_compress<256, KVC_DTYPE_BF16>(a, num_jobs, s);
  }
}

extern "C" kvc_status_t kvc_codec_cuda_decompress(const kvc_codec_params_t *p,
                                                  const kvc_page_entry_t *dir,
                                                  const int32_t *block_ids, int num_jobs,
                                                  const uint8_t *pool_base, uint32_t chunk_bytes,
                                                  void *out, void *stream) {
  kvc_status_t st = check_cuda_params(p);
  if (st != KVC_OK) return st;
  if (num_jobs < 0 || (num_jobs > 0 && (!dir || !block_ids || !pool_base || !out)))
    return KVC_ERR_INVALID_ARGUMENT;
  if (chunk_bytes < KVC_CHUNK_MIN_BYTES || (chunk_bytes & (chunk_bytes - 1)))
    return KVC_ERR_INVALID_ARGUMENT;
  if (num_jobs == 0) return KVC_OK;
  DArgs a;
  a.dir = dir;
  a.block_ids = block_ids;
  a.pool = pool_base;
  a.chunk_bytes = chunk_bytes;
  a.out = (uint8_t *)out;
  a.staging_bytes = kvc_codec_staging_bytes(p);
  a.num_kv_heads = p->num_kv_heads;
  a.block_tokens = p->block_tokens;
  a.dtype = p->dtype;
  cudaStream_t s = (cudaStream_t)stream;
  switch (p->head_dim) {
  case 64: return launch_decompress<64>(a, num_jobs, s);
  case 128: return launch_decompress<128>(a, num_jobs, s);
  default: return launch_decompress<256>(a, num_jobs, s);
  }
}
