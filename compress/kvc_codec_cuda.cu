/*
 * The codecs on the GPU (kvc_codec_cuda.h): batched compression, one CTA per job (page), and
 * standalone decompression, one CTA per (job, section).
 *
 * Compression mirrors kvc_codec.c step by step with the shared primitives of kvc_quant.h, so pages
 * are bit-identical to the CPU encoder's. Per section (tensor, kv head) the CTA loads the rows into
 * shared memory and quantizes them with each thread owning 8 neighbouring channels of some rows
 * (16-byte vectors): group ranges, verification (which keeps every q for the code pass, so each
 * value is divided once; q_verify decides like kvc_q_of + kvc_q_within without their conversions),
 * power-of-two fallback, centres, then codes u and, for Huffman only, the symbol histogram.
 * Warp 0 builds the Huffman code (kvc_codec_huf_warp.cuh) while warps 1-7 zero the staging buffer
 * and write the group fields; the code pass kept each value's symbol above its u in us[]. Each lane
 * (in two halves, one per thread, when there are <= 128 lanes) is coded from a 64-bit register
 * accumulator into the us[] slots of its own values, a block scan of the halves' bit lengths
 * places them, and each half's words are then shifted into the stream, whole words with plain
 * stores and only the two words it may share with its neighbours with atomicOr. Fixed-width fields
 * (group parameters, code lengths, lane lengths, bit-pack codes) are written one output word per
 * thread, gathered from the fields it overlaps (paired value codes: two words per thread, from the
 * same 32 row bits of two tokens).
 * The section is staged in shared memory, then copied into the page's chunks. Chunks are taken
 * from the device free stack as the page grows (policy FIXED: one pop per section that crosses into
 * new chunks, issued before the emit and published by its barrier; other policies first size every
 * section under both codecs, then pop once). The page header and section table are written last.
 * Packed (kvc_codec_cuda_compress_packed), a page starts where its block's page of the previous
 * layer ended, inside that page's last chunk (chunks[0], not popped), and every offset is from
 * there (misc[M_BASE]).
 * Shared memory is sized to the launch's shape (56 KB at 64 tokens x head_dim 128: four CTAs per
 * SM). Policy FIXED runs a kernel instantiation without the sizing pass. Throughput and its
 * accounting: bench/NOTES-codec.md.
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
#include "compress/kvc_codec_huf_warp.cuh"
#include "compress/kvc_page_format.h"
#include "compress/kvc_quant.h"

namespace {

constexpr int kThreads = 256;
#ifndef KVC_CODEC_MIN_BLOCKS
#define KVC_CODEC_MIN_BLOCKS 4
#endif
/* CTAs per SM the register budget is set for: shared memory allows 4 at 64 x 128 (64 registers,
 * some spills); 3 gives 80 registers (measured slower: bench/NOTES-codec.md). */
constexpr int kMinBlocks = KVC_CODEC_MIN_BLOCKS;
constexpr int kMaxSymbols = 16384; /* block_tokens * head_dim */
constexpr int kMaxHeads = 64;
constexpr int kMaxLanes = kMaxSymbols / KVC_LANE_SYMBOLS; /* 256 = kThreads: one lane per thread */
constexpr int kEUnset = KVC_STEP_CODE_MIN - 2;
constexpr unsigned kFull = 0xffffffffu;
/* us[] keeps each Huffman symbol above its code u (u < 2^KVC_Q_MAX_BITS): the lane-length pass and
 * the lane streams read it instead of recomputing kvc_sym_of; bit-pack masks it off. */
constexpr int kSymShift = 26;
constexpr uint32_t kUMask = (1u << KVC_Q_MAX_BITS) - 1u;
static_assert(KVC_Q_MAX_BITS <= kSymShift && KVC_SYM_COUNT <= (1 << (32 - kSymShift)), "symbol fits");
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
  kvc_pack_cursor_t *cursor; /* packing (kvc_codec_cuda_compress_packed), else NULL */
  int layer;
  uint8_t *page_chunks;      /* with cursor: the chunks each page took */
};

/* Shared memory of the compression kernel, carved from the dynamic buffer. Groups: at most
 * max(head_dim, block_tokens) (channels of K, tokens of V); lanes: kvc_huf_lanes of the block. */
struct Smem {
  uint8_t *xs;        /* [S_max] input rows in the page dtype; reused as the section staging buffer */
  uint32_t *us;       /* [S_max] q after verification, then the codes u */
  int32_t *gmn, *gmx; /* [groups] order-preserving int keys of the group min / max (REL) */
  unsigned long long *csum; /* [head_dim] channel sums of q (ABS); the same bytes as gmn, gmx */
  double *glim;       /* [groups] */
  float *glo;         /* [groups] q_verify's float pre-test limit (lim_lo) */
  int32_t *ge, *gbase, *gflag, *gqmin;
  float *gstep;
  uint32_t *lane_bits;            /* [lanes] lane lengths in bits */
  uint8_t *huf;                   /* KVC_HUF_WARP_SCRATCH bytes; the same bytes as lane_bits */
  uint32_t *counts, *code, *enc;  /* [64]; enc: code << 10 | extra << 5 | (length + extra) */
  uint8_t *len;                   /* [64] */
  uint8_t *hdr;                   /* [sections_start] page header and section table */
  uint32_t *chunks;               /* [KVC_PAGE_MAX_CHUNKS] */
  int *misc;                      /* [M_NMISC] */
  size_t bytes;                   /* total */
};

/* misc[]: per-section values first (reset by quantize), then per-page ones. */
/* M_BASE: where the page starts in chunks[0] (a packed page), in bytes. */
enum { M_FAIL, M_ELO, M_EHI, M_BLO, M_BHI, M_MAXU, M_LLO, M_LHI, M_NSYM, M_HAVE, M_DRY, M_BASE,
       M_NMISC };

__host__ __device__ inline size_t align16z(size_t x) { return (x + 15) & ~(size_t)15; }

/* The carve of the shared buffer at p; with p = nullptr only .bytes is set (the host's size). */
__host__ __device__ inline Smem carve(uint8_t *p, int smax, int hd, int bt, int heads) {
  Smem s;
  size_t off = 0;
  auto take = [&](size_t bytes) {
    uint8_t *r = p ? p + off : nullptr;
    off += align16z(bytes);
    return r;
  };
  const size_t groups = (size_t)(hd > bt ? hd : bt);
  const size_t lanes = (size_t)kvc_huf_lanes(smax / hd, hd);
  /* The Huffman build's scratch is dead before the lane lengths are computed. */
  const size_t lane_bytes = lanes * 4 > KVC_HUF_WARP_SCRATCH ? lanes * 4 : KVC_HUF_WARP_SCRATCH;
  s.xs = take((size_t)smax * 2);
  s.us = (uint32_t *)take((size_t)smax * 4);
  /* gmn and gmx (REL) and csum (ABS) are never live in one launch: groups >= head_dim. */
  s.gmn = (int32_t *)take(groups * 8);
  s.gmx = p ? s.gmn + groups : nullptr;
  s.csum = (unsigned long long *)s.gmn;
  s.glim = (double *)take(groups * 8);
  s.glo = (float *)take(groups * 4);
  s.ge = (int32_t *)take(groups * 4);
  s.gbase = (int32_t *)take(groups * 4);
  s.gflag = (int32_t *)take(groups * 4);
  s.gqmin = (int32_t *)take(groups * 4);
  s.gstep = (float *)take(groups * 4);
  s.huf = take(lane_bytes);
  s.lane_bits = (uint32_t *)s.huf;
  s.counts = (uint32_t *)take(64 * 4);
  s.code = (uint32_t *)take(64 * 4);
  s.enc = (uint32_t *)take(64 * 4);
  s.len = take(64);
  s.hdr = take(kvc_page_sections_start((uint32_t)heads, KVC_CODEC_RAW)); /* the larger start */
  s.chunks = (uint32_t *)take(KVC_PAGE_MAX_CHUNKS * 4);
  s.misc = (int *)take(M_NMISC * 4);
  s.bytes = off;
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

/* The 8 values of 16-byte vector vi of the rows (exact widening, as load_x). */
template <int DT> __device__ __forceinline__ void load8(const uint8_t *xs, int vi, float (&x)[8]) {
  const uint4 v = ((const uint4 *)xs)[vi];
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; j++) {
    if (DT == KVC_DTYPE_F16) {
      x[2 * j] = __half2float(__ushort_as_half((unsigned short)(w[j] & 0xffffu)));
      x[2 * j + 1] = __half2float(__ushort_as_half((unsigned short)(w[j] >> 16)));
    } else {
      x[2 * j] = __uint_as_float(w[j] << 16);
      x[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
  }
}

__device__ __forceinline__ void store8(uint32_t *dst, const uint32_t (&v)[8]) {
  ((uint4 *)dst)[0] = make_uint4(v[0], v[1], v[2], v[3]);
  ((uint4 *)dst)[1] = make_uint4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void load8u(const uint32_t *src, uint32_t (&v)[8]) {
  const uint4 a = ((const uint4 *)src)[0], b = ((const uint4 *)src)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

__device__ __forceinline__ int warp_max(int v) {
  for (int o = 16; o; o >>= 1) v = max(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ int warp_min(int v) {
  for (int o = 16; o; o >>= 1) v = min(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

/* Folds a warp's range [lo, hi] into misc[i_lo], misc[i_hi] (all lanes call): one shared atomic
 * per warp instead of one per thread on the same word (those serialize). */
__device__ __forceinline__ void warp_range_to(int *misc, int i_lo, int i_hi, int lo, int hi) {
  lo = warp_min(lo);
  hi = warp_max(hi);
  if ((threadIdx.x & 31) == 0) {
    atomicMin(&misc[i_lo], lo);
    atomicMax(&misc[i_hi], hi);
  }
}

/* Reductions over the TPR lanes of one row (xor offsets below TPR) and over the rows a warp holds
 * of one channel group (offsets TPR..16). TPR divides 32, so both stay inside aligned lane sets. */
template <typename T, typename Op> __device__ __forceinline__ T xor_reduce(T v, int lo, int hi, Op op) {
  for (int o = lo; o < hi; o <<= 1) v = op(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
struct OpMin {
  __device__ int operator()(int a, int b) const { return min(a, b); }
};
struct OpMax {
  __device__ int operator()(int a, int b) const { return max(a, b); }
};
struct OpOr {
  __device__ unsigned operator()(unsigned a, unsigned b) const { return a | b; }
};
struct OpAdd64 {
  __device__ long long operator()(long long a, long long b) const { return a + b; }
};

/*
 * The verification of one value, with the result of kvc_q_of(x, st, v) &&
 * kvc_q_within(kvc_q_recon(*v, st), x, *lim) and the same *v (set exactly when kvc_q_of sets it),
 * without conversions in the common case (|x / st| < 2^21, error clearly inside the bound):
 *   - rint: r + 1.5 * 2^23 lies in [2^23, 2^24), where floats are the integers, so the add rounds
 *     r to the nearest integer, ties to even (1.5 * 2^23 is even), as rintf; the integer is the
 *     sum's low mantissa bits, and subtracting 1.5 * 2^23 back is exact (so rf == (float)*v);
 *   - bound: e = |recon - x| in float is the exact difference D rounded once; when e <= lo, with lo
 *     = lim_lo(lim) <= lim * (1 - 2^-21) and >= 2^-125, D <= e * (1 + 2^-24) (e normal) or
 *     D < 2^-125 (e subnormal) is below lim, so the double check (lim is a double: rounding D to
 *     double keeps it <= lim) passes too. Otherwise (rare) the double check decides.
 * The conversions it avoids (rint, float <-> int, two float -> double) run at a quarter of the
 * FP32 rate; the verification pass did five per value.
 */
__device__ __forceinline__ float lim_lo(double lim) {
  const float lo = __double2float_rd(KVC_DMUL(lim, 1.0 - 0x1p-20));
  return lo >= 0x1p-125f ? lo : -1.0f; /* -1: every value takes the double check */
}
__device__ __forceinline__ bool q_verify(float x, float st, float lo, const double *lim, int32_t *v) {
  const float r = KVC_FDIV(x, st);
  if (fabsf(r) < 0x1p21f) {
    const float t = __fadd_rn(r, 0x1.8p23f);
    *v = __float_as_int(t) - __float_as_int(0x1.8p23f);
    const float rec = __fmul_rn(__fsub_rn(t, 0x1.8p23f), st);
    return fabsf(__fsub_rn(rec, x)) <= lo || kvc_q_within(rec, x, *lim);
  }
  return kvc_q_of(x, st, v) && kvc_q_within(kvc_q_recon(*v, st), x, *lim);
}

/* The 8 group parameters of this thread's values (float steps or int32 bases): channels c0..c0+7
 * (K: two 16-byte shared loads; the arrays are 16-byte aligned and c0 is a multiple of 8) or row
 * r's group, 8 times (V). */
template <class E>
__device__ __forceinline__ void group8(const E *p, bool is_k, int c0, int r, E (&v)[8]) {
  static_assert(sizeof(E) == 4, "group parameters are 32-bit");
  if (is_k) {
    const uint4 a = ((const uint4 *)(p + c0))[0], b = ((const uint4 *)(p + c0))[1];
    const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int j = 0; j < 8; j++) memcpy(&v[j], &w[j], 4);
  } else {
    const E x = p[r];
#pragma unroll
    for (int j = 0; j < 8; j++) v[j] = x;
  }
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

/*
 * Loads section rows and quantizes: fills us[] (codes; with `hist`, each value's symbol above its
 * code), counts[] (with `hist`: bit-pack needs no histogram), group state. All threads.
 * Thread mapping: TPR = HD / 8 threads per row, each owning channels [8 cg, 8 cg + 8) of rows
 * r0, r0 + RPP, ...; a row's partial results combine with xor shuffles over its TPR lanes, a
 * channel's over the warp's rows, then shared atomics across warps.
 */
template <int HD, int DT>
__device__ __forceinline__ QInfo quantize(const Smem &sm, const uint8_t *rows, int n, int tensor, int mode_abs,
                          float bound, bool hist) {
  constexpr int TPR = HD / 8, RPP = kThreads / TPR;
  static_assert(32 % TPR == 0 && TPR <= 32, "a row's lanes sit in one warp");
  const int tid = threadIdx.x, S = n * HD, lane = tid & 31;
  const int cg = tid % TPR, r0 = tid / TPR, c0 = 8 * cg;
  const int iters = (n + RPP - 1) / RPP;
  const bool is_k = tensor == 0;
  /* A failed quantize returns right after its threads read misc[M_FAIL]; when the caller moves on
   * to the next section at once (policy sizing), no thread may reset misc or overwrite the rows
   * before every thread has read it. */
  __syncthreads();
  /* Rows -> shared (16-byte vectors; S * 2 is a multiple of 16). */
  for (int i = tid; i < S / 8; i += kThreads) ((uint4 *)sm.xs)[i] = __ldg((const uint4 *)rows + i);
  if (tid < M_HAVE) sm.misc[tid] = 0;
  if (tid < 64) sm.counts[tid] = 0;
  const int G = mode_abs ? HD : (is_k ? HD : n);
  for (int g = tid; g < G; g += kThreads) {
    if (mode_abs) {
      sm.csum[g] = 0;
    } else {
      sm.gmn[g] = INT32_MAX;
      sm.gmx[g] = INT32_MIN;
    }
    sm.gqmin[g] = INT32_MAX;
    sm.gflag[g] = 0;
  }
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
  if (!mode_abs) {
    q.mode = KVC_QMODE_REL;
    q.groups = G;
    /* Group ranges. */
    int kmn[8], kmx[8], bad = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) kmn[j] = INT32_MAX, kmx[j] = INT32_MIN;
    for (int it = 0; it < iters; it++) {
      const int r = r0 + it * RPP;
      const bool valid = r < n;
      int rmn = INT32_MAX, rmx = INT32_MIN;
      if (valid) {
        float x[8];
        load8<DT>(sm.xs, r * TPR + cg, x);
#pragma unroll
        for (int j = 0; j < 8; j++) {
          bad |= !isfinite(x[j]);
          const int k = fkey(x[j]);
          kmn[j] = min(kmn[j], k);
          kmx[j] = max(kmx[j], k);
          rmn = min(rmn, k);
          rmx = max(rmx, k);
        }
      }
      if (!is_k) {
        rmn = xor_reduce(rmn, 1, TPR, OpMin());
        rmx = xor_reduce(rmx, 1, TPR, OpMax());
        if (valid && cg == 0) {
          sm.gmn[r] = rmn;
          sm.gmx[r] = rmx;
        }
      }
    }
    if (is_k) {
#pragma unroll
      for (int j = 0; j < 8; j++) {
        kmn[j] = xor_reduce(kmn[j], TPR, 32, OpMin());
        kmx[j] = xor_reduce(kmx[j], TPR, 32, OpMax());
        if (lane < TPR) {
          atomicMin(&sm.gmn[c0 + j], kmn[j]);
          atomicMax(&sm.gmx[c0 + j], kmx[j]);
        }
      }
    }
    if (bad) sm.misc[M_FAIL] = 1;
    __syncthreads();
    if (sm.misc[M_FAIL]) return QInfo{0};
    for (int g = tid; g < G; g += kThreads) {
      double lim = kvc_q_rel_lim(bound, funkey(sm.gmn[g]), funkey(sm.gmx[g]));
      int e = kvc_step_code_floor(KVC_DMUL(2.0, lim));
      sm.glim[g] = lim;
      sm.glo[g] = lim_lo(lim);
      sm.ge[g] = e;
      sm.gflag[g] = e < KVC_STEP_CODE_MIN;
      sm.gstep[g] = e < KVC_STEP_CODE_MIN ? 1.0f : kvc_step_from_code(e);
    }
    __syncthreads();
    /* Verify every value with its group's step; the smallest q is the group base. q is kept in
     * us[] for the code pass (a group that fails is redone there with its fallback step). */
    int kq[8];
    unsigned kf = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) kq[j] = INT32_MAX;
    for (int it = 0; it < iters; it++) {
      const int r = r0 + it * RPP;
      const bool valid = r < n;
      int rq = INT32_MAX;
      unsigned rf = 0;
      if (valid) {
        float x[8];
        uint32_t qv[8];
        load8<DT>(sm.xs, r * TPR + cg, x);
        float st8[8], lo8[8];
        group8(sm.gstep, is_k, c0, r, st8);
        group8(sm.glo, is_k, c0, r, lo8);
#pragma unroll
        for (int j = 0; j < 8; j++) {
          const int g = is_k ? c0 + j : r;
          const float st = st8[j];
          int32_t v = 0;
          const unsigned fail = !q_verify(x[j], st, lo8[j], &sm.glim[g], &v);
          qv[j] = (uint32_t)v;
          kq[j] = min(kq[j], v);
          kf |= fail << j;
          rq = min(rq, v);
          rf |= fail;
        }
        store8(sm.us + r * HD + c0, qv);
      }
      if (!is_k) {
        rq = xor_reduce(rq, 1, TPR, OpMin());
        rf = xor_reduce(rf, 1, TPR, OpOr());
        if (valid && cg == 0) {
          sm.gqmin[r] = rq;
          if (rf) sm.gflag[r] = 1;
        }
      }
    }
    if (is_k) {
      kf = xor_reduce(kf, TPR, 32, OpOr());
#pragma unroll
      for (int j = 0; j < 8; j++) {
        kq[j] = xor_reduce(kq[j], TPR, 32, OpMin());
        if (lane < TPR) {
          atomicMin(&sm.gqmin[c0 + j], kq[j]);
          if ((kf >> j) & 1u) sm.gflag[c0 + j] = 1;
        }
      }
    }
    __syncthreads();
    /* Failed groups take the exact power-of-two step (rare; one thread per group). */
    const int len = is_k ? n : HD;
    int elo = INT32_MAX, ehi = INT32_MIN, blo = INT32_MAX, bhi = INT32_MIN;
    for (int g = tid; g < G; g += kThreads) {
      int e = sm.ge[g];
      int32_t base = sm.gqmin[g];
      if (sm.gflag[g]) {
        int k = 1000;
        for (int i = 0; i < len; i++) {
          float x = load_x<DT>(sm.xs, is_k ? i * HD + g : g * HD + i);
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
            float x = load_x<DT>(sm.xs, is_k ? i * HD + g : g * HD + i);
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
        elo = min(elo, e);
        ehi = max(ehi, e);
      }
      blo = min(blo, base);
      bhi = max(bhi, base);
    }
    warp_range_to(sm.misc, M_ELO, M_EHI, elo, ehi);
    warp_range_to(sm.misc, M_BLO, M_BHI, blo, bhi);
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
    const float lo = lim_lo(lim);
    long long ks[8];
    int lfail = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) ks[j] = 0;
    for (int it = 0; it < iters; it++) {
      const int r = r0 + it * RPP;
      if (r >= n) continue;
      float x[8];
      uint32_t qv[8];
      load8<DT>(sm.xs, r * TPR + cg, x);
#pragma unroll
      for (int j = 0; j < 8; j++) {
        int32_t v = 0;
        lfail |= !isfinite(x[j]) || !q_verify(x[j], st, lo, &lim, &v);
        ks[j] += v;
        qv[j] = (uint32_t)v;
      }
      store8(sm.us + r * HD + c0, qv);
    }
#pragma unroll
    for (int j = 0; j < 8; j++) {
      ks[j] = xor_reduce(ks[j], TPR, 32, OpAdd64());
      if (lane < TPR) atomicAdd(&sm.csum[c0 + j], (unsigned long long)ks[j]);
    }
    if (lfail) sm.misc[M_FAIL] = 1;
    __syncthreads();
    if (sm.misc[M_FAIL]) return QInfo{0};
    int blo = INT32_MAX, bhi = INT32_MIN;
    for (int d = tid; d < HD; d += kThreads) {
      int32_t c = kvc_q_center((long long)sm.csum[d], n);
      sm.gbase[d] = c;
      blo = min(blo, c);
      bhi = max(bhi, c);
    }
    warp_range_to(sm.misc, M_BLO, M_BHI, blo, bhi);
    __syncthreads();
    q.e_min = e;
    q.abs_step = st;
    q.b_min = sm.misc[M_BLO];
    q.w_e = 0;
    q.w_b = kvc_bits_for((uint32_t)sm.misc[M_BHI] - (uint32_t)sm.misc[M_BLO]);
  }
  /* Codes from the kept q (groups that fell back: from their new step), histogram
   * (warp-aggregated), largest code. */
  unsigned redo = 0;
  if (q.mode == KVC_QMODE_REL && is_k) {
#pragma unroll
    for (int j = 0; j < 8; j++) redo |= (sm.gflag[c0 + j] != 0) << j;
  }
  int lmaxu = 0, lfail = 0;
  for (int it = 0; it < iters; it++) {
    const int r = r0 + it * RPP;
    const bool valid = r < n;
    uint32_t uv[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (valid) {
      load8u(sm.us + r * HD + c0, uv);
      if (q.mode == KVC_QMODE_REL) {
        const unsigned need = is_k ? redo : (sm.gflag[r] ? 0xffu : 0u);
        if (need) {
          float x[8];
          load8<DT>(sm.xs, r * TPR + cg, x);
#pragma unroll
          for (int j = 0; j < 8; j++) {
            if (!((need >> j) & 1u)) continue;
            int32_t v = 0;
            kvc_q_of(x[j], sm.gstep[is_k ? c0 + j : r], &v);
            uv[j] = (uint32_t)v;
          }
        }
        int32_t b8[8];
        group8(sm.gbase, is_k, c0, r, b8);
#pragma unroll
        for (int j = 0; j < 8; j++) uv[j] -= (uint32_t)b8[j];
      } else {
        int32_t b8[8];
        group8(sm.gbase, true, c0, r, b8);
#pragma unroll
        for (int j = 0; j < 8; j++) uv[j] = kvc_zigzag((int32_t)(uv[j] - (uint32_t)b8[j]));
      }
    }
#pragma unroll
    for (int j = 0; j < 8; j++) {
      const uint32_t u = uv[j];
      if (valid) {
        lfail |= u > kUMask;
        lmaxu = max(lmaxu, (int)min(u, kUMask + 1u));
      }
      uv[j] = u & kUMask; /* u > kUMask fails the section */
      if (hist) {
        /* Rows past n (only in the last pass of a partial block) take symbol 64: never counted. */
        const uint32_t sym = valid ? kvc_sym_of(uv[j]) : 64u;
        const uint32_t peers = __match_any_sync(kFull, sym);
        if (valid && lane == __ffs(peers) - 1) atomicAdd(&sm.counts[sym], __popc(peers));
        uv[j] |= sym << kSymShift;
      }
    }
    if (valid) store8(sm.us + r * HD + c0, uv);
  }
  lmaxu = warp_max(lmaxu);
  if (lane == 0) atomicMax(&sm.misc[M_MAXU], lmaxu);
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

/* Bytes of a BITPACK section of tensor (0 K, 1 V), n tokens x hd channels. */
__device__ __forceinline__ uint32_t bitpack_bytes(const QInfo &q, int tensor, int n, int hd) {
  const int paired = kvc_bp_paired(tensor, (uint32_t)hd);
  return qsec_bytes(kvc_bp_start((uint32_t)q.groups * (q.w_e + q.w_b), paired) +
                    kvc_bp_code_bits((uint32_t)n, (uint32_t)hd, kvc_bits_for(q.max_u), paired));
}

/* The bits of fields i = 0..n-1 of w (1..31) bits, field i = val(i) at bit p0 + i w of an
 * MSB-first word stream, that fall in word k (0 where none does). */
template <class F>
__device__ __forceinline__ uint32_t field_word(uint32_t k, uint32_t p0, uint32_t n, uint32_t w,
                                               F val) {
  const uint32_t wb = k << 5;
  uint32_t word = 0;
  for (uint32_t i = wb > p0 ? (wb - p0) / w : 0; i < n; i++) {
    const uint32_t b = p0 + i * w;
    if (b >= wb + 32) break;
    const uint64_t v = val(i);
    const int sh = (int)b - (int)wb; /* field start in the word; > -w */
    word |= sh >= 0 ? (uint32_t)((v << (64 - w)) >> (32 + sh))
                    : (uint32_t)(v << (32 - (int)w - sh));
  }
  return word;
}

/*
 * Writes n fields of w (0..31) bits, field i = val(i), at bit p0 of the zeroed MSB-first word
 * stream wd (threads t = 0..nt-1 of the caller's set): one output word per thread, ORed from the
 * fields it overlaps. A word that lies wholly inside the fields is this thread's alone (plain
 * store); the two end words may hold bits of the neighbouring arrays (atomicOr).
 */
template <class F>
__device__ __forceinline__ void put_fields(uint32_t *wd, uint32_t p0, uint32_t n, uint32_t w, int t, int nt,
                                           F val) {
  if (w == 0 || n == 0) return;
  const uint32_t end = p0 + n * w;
  for (uint32_t k = (p0 >> 5) + (uint32_t)t; k <= (end - 1) >> 5; k += (uint32_t)nt) {
    const uint32_t wb = k << 5, word = field_word(k, p0, n, w, val);
    if (wb >= p0 && wb + 32 <= end) wd[k] = word;
    else atomicOr(&wd[k], word);
  }
}

/*
 * Writes the codes of a paired section (kvc_bp_paired), code d of token r = val(r * hd + d) of
 * w (1..31) bits for r < n, into the zeroed stream wd from word k0 (kvc_bp_start / 32) on
 * (threads t = 0..nt-1 of the caller's set). One item per (token pair p, row word j): the thread
 * gathers row bits [32 j, 32 j + 32) of both tokens and builds words 2j and 2j + 1 of block p
 * from their halves. The code area is whole words of no other field: plain stores.
 */
template <class F>
__device__ __forceinline__ void put_paired(uint32_t *wd, uint32_t k0, uint32_t n, uint32_t hd,
                                           uint32_t w, int t, int nt, F val) {
  const uint32_t block_words = hd * w / 16, row_words = (block_words + 1) / 2;
  const uint32_t items = (n + 1) / 2 * row_words;
  for (uint32_t it = (uint32_t)t; it < items; it += (uint32_t)nt) {
    const uint32_t p = it / row_words, j = it % row_words, s0 = 2 * p * hd, s1 = s0 + hd;
    const uint32_t a = field_word(j, 0, hd, w, [&](uint32_t d) { return val(s0 + d); });
    const uint32_t b =
        2 * p + 1 < n ? field_word(j, 0, hd, w, [&](uint32_t d) { return val(s1 + d); }) : 0u;
    uint32_t *o = wd + k0 + p * block_words + 2 * j;
    o[0] = (a >> 16) | (b & 0xffff0000u);
    if (2 * j + 1 < block_words) o[1] = (a & 0xffffu) | (b << 16);
  }
}

/*
 * Writes the group fields (step codes, then bases), which do not depend on the code, after the
 * section header of the staging buffer sm.xs as whole words, and zeroes the words after them up to
 * byte align16z(zero_bytes) (threads t = 0..nt-1; the caller syncs before other threads write
 * into those words). Every word has one writer, so the threads need no barrier among
 * themselves: warps 1-7 run this while warp 0 builds the Huffman code. (A named barrier of warps
 * 1-7 here once made compute-sanitizer's racecheck report false hazards for the rest of the
 * kernel: tests/sanitizer/racecheck_named_barriers.cu.)
 */
__device__ __forceinline__ void stage_groups(const Smem &sm, const QInfo &q, uint32_t zero_bytes,
                                             int t, int nt) {
  uint32_t *xw = (uint32_t *)sm.xs, *wd = xw + KVC_QSEC_HEADER_BYTES / 4;
  const uint32_t G = (uint32_t)q.groups;
  const bool rel = q.mode == KVC_QMODE_REL;
  const uint32_t pos_b = rel ? G * q.w_e : 0, nw = (pos_b + G * q.w_b + 31) >> 5;
  auto step_code = [&](uint32_t g) { return (uint32_t)(sm.ge[g] - q.e_min); };
  auto base = [&](uint32_t g) { return (uint32_t)sm.gbase[g] - (uint32_t)q.b_min; };
  for (uint32_t k = (uint32_t)t; k < nw; k += (uint32_t)nt)
    wd[k] = (rel && q.w_e ? field_word(k, 0, G, q.w_e, step_code) : 0u) |
            (q.w_b ? field_word(k, pos_b, G, q.w_b, base) : 0u);
  /* The rest: single words up to a 16-byte boundary, then 16 bytes at a time. */
  const uint32_t z0 = KVC_QSEC_HEADER_BYTES / 4 + nw, z1 = (uint32_t)align16z(zero_bytes) / 4;
  const uint32_t v0 = min(z1, (z0 + 3) & ~3u);
  for (uint32_t i = z0 + (uint32_t)t; i < v0; i += (uint32_t)nt) xw[i] = 0;
  for (uint32_t i = v0 / 4 + (uint32_t)t; i < z1 / 4; i += (uint32_t)nt)
    ((uint4 *)sm.xs)[i] = make_uint4(0, 0, 0, 0);
}

/* The part of the lane streams this thread codes: lane l holds values l, l + nl, l + 2 nl, ... (at
 * most KVC_LANE_SYMBOLS). With nl <= kThreads / 2, threads 2l and 2l + 1 take the first and the
 * second half of lane l, so the streams' bit order is the threads' order; else thread l takes lane
 * l. Sets [*s, *s_end) (stride nl), empty for a thread without a lane. */
__device__ __forceinline__ void lane_part(int S, int nl, int *s, int *s_end) {
  const int two = nl <= kThreads / 2, l = threadIdx.x >> two, part = threadIdx.x & two;
  const int per = KVC_LANE_SYMBOLS >> two;
  *s = l + part * per * nl;
  *s_end = l < nl ? min(S, l + (part + 1) * per * nl) : 0;
}

/*
 * Huffman lengths, codes and lane lengths of a quantized section (all threads); returns its bytes.
 * With `stage` (the emit pass), warps 1-7 zero the staging buffer and write the group fields while
 * warp 0 builds the code, and each thread codes its part (lane_part) into the us[] slots of the
 * part's values (emit then writes only the code-dependent parts); without it (sizing) only the
 * lengths are summed. *off_out: the bit offset, from the start of the lane streams, of this
 * thread's part; *part_bits_out: its length. No trailing barrier: the caller's next step either
 * writes only code-dependent words (emit) or starts with one (quantize).
 */
__device__ __forceinline__ uint32_t huffman_plan(const Smem &sm, const QInfo &q, int S, int hd,
                                                 bool stage, int *n_lanes_out, uint32_t *w_lane_out,
                                                 uint32_t *off_out, uint32_t *part_bits_out) {
  const int tid = threadIdx.x;
  if (tid < 32) {
    const int n_sym = kvc_huf_warp_build(sm.counts, sm.len, sm.code, sm.huf);
    for (int s = tid; s < KVC_SYM_COUNT; s += 32) {
      const uint32_t ne = kvc_sym_extra((uint32_t)s);
      sm.enc[s] = (sm.code[s] << 10) | (ne << 5) | (sm.len[s] + ne);
    }
    if (tid == 0) {
      sm.misc[M_NSYM] = n_sym;
      sm.misc[M_LLO] = INT32_MAX;
      sm.misc[M_LHI] = 0;
    }
  } else if (stage) {
    stage_groups(sm, q, (uint32_t)S * 2, tid - 32, kThreads - 32);
  }
  __syncthreads();
  const int nl = kvc_huf_lanes(S / hd, hd);
  int s, s_end;
  lane_part(S, nl, &s, &s_end);
  uint32_t bits = 0;
  if (stage) {
    /* Code the part into its own slots of us[] (word w into the slot of its value w): after value
     * i the part has at most 31 (i + 1) bits, so every completed word's slot was read already.
     * emit then moves ~bits / 32 words instead of re-coding the values. */
    uint64_t acc = 0;
    uint32_t nacc = 0;
    int slot = s;
#pragma unroll 4
    for (; s < s_end; s += nl) {
      const uint32_t v = sm.us[s], e = sm.enc[v >> kSymShift];
      const uint32_t ne = (e >> 5) & 31u, nb = e & 31u;
      acc = (acc << nb) | (((e >> 10) << ne) | (v & ((1u << ne) - 1u)));
      nacc += nb;
      bits += nb;
      if (nacc >= 32) {
        nacc -= 32;
        sm.us[slot] = (uint32_t)(acc >> nacc);
        slot += nl;
      }
    }
    if (nacc) sm.us[slot] = (uint32_t)(acc << (32 - nacc));
  } else {
#pragma unroll 4
    for (; s < s_end; s += nl) bits += sm.enc[sm.us[s] >> kSymShift] & 31u;
  }
  *part_bits_out = bits;
  /* Lane totals (two parts: the odd thread's bits join the even one's). */
  uint32_t lane_tot = bits;
  const int two = nl <= kThreads / 2;
  if (two) lane_tot += __shfl_down_sync(kFull, bits, 1);
  int llo = INT32_MAX, lhi = 0;
  if ((tid >> two) < nl && !(tid & two)) {
    sm.lane_bits[tid >> two] = lane_tot;
    llo = lhi = (int)lane_tot;
  }
  warp_range_to(sm.misc, M_LLO, M_LHI, llo, lhi);
  /* Exclusive scan of the parts' lengths over the block, in thread order = stream order. */
  uint32_t incl = bits;
  for (int o = 1; o < 32; o <<= 1) {
    uint32_t v = __shfl_up_sync(kFull, incl, o);
    if ((tid & 31) >= o) incl += v;
  }
  __shared__ uint32_t warp_tot[kThreads / 32];
  if ((tid & 31) == 31) warp_tot[tid / 32] = incl;
  __syncthreads();
  uint32_t before = 0;
  for (int w = 0; w < tid / 32; w++) before += warp_tot[w];
  *off_out = before + incl - bits;
  uint64_t total = 0;
  for (int w = 0; w < kThreads / 32; w++) total += warp_tot[w];
  uint32_t lo = (uint32_t)sm.misc[M_LLO], hi = (uint32_t)sm.misc[M_LHI];
  uint32_t w_lane = kvc_bits_for(hi - lo);
  *n_lanes_out = nl;
  *w_lane_out = w_lane;
  uint64_t meta = (uint64_t)q.groups * (q.w_e + q.w_b);
  return qsec_bytes(meta + 4u * (uint32_t)sm.misc[M_NSYM] + (uint64_t)nl * w_lane + total);
}

/* Writes the quantized section of tensor (0 K, 1 V), S = n_tokens x hd codes, into the staging
 * buffer sm.xs (all threads; no trailing barrier). Huffman: huffman_plan(stage = true) has zeroed
 * it, written the group fields and coded this thread's part (part_bits bits, in the us[] slots of
 * its values). */
__device__ __forceinline__ void emit(const Smem &sm, const QInfo &q, int codec, int tensor, int S,
                                     int hd, int n_lanes, uint32_t w_lane, uint32_t lane_part_off,
                                     uint32_t part_bits, uint32_t bytes) {
  const int tid = threadIdx.x;
  uint32_t *wd = (uint32_t *)(sm.xs + KVC_QSEC_HEADER_BYTES);
  if (codec == KVC_CODEC_BITPACK) {
    stage_groups(sm, q, bytes, tid, kThreads);
    __syncthreads(); /* the values go into the words staged above, the first ORed into the last */
  }
  const uint32_t width = kvc_bits_for(q.max_u);
  const int n_sym = sm.misc[M_NSYM];
  const uint32_t lane_min = (uint32_t)sm.misc[M_LLO];
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
      h.lane_info = lane_min | (w_lane << 27);
    }
    uint8_t raw[16];
    kvc_qsec_header_write(raw, &h);
    for (int i = 0; i < 4; i++) ((uint32_t *)sm.xs)[i] = kvc_rd_u32(raw + 4 * i);
  }
  const uint32_t G = (uint32_t)q.groups;
  const uint32_t meta = (q.mode == KVC_QMODE_REL ? G * q.w_e : 0) + G * q.w_b;
  auto code = [&](uint32_t s) { return sm.us[s] & kUMask; };
  if (codec == KVC_CODEC_BITPACK && kvc_bp_paired(tensor, (uint32_t)hd)) {
    if (width)
      put_paired(wd, kvc_bp_start(meta, 1) >> 5, (uint32_t)(S / hd), (uint32_t)hd, width, tid,
                 kThreads, code);
  } else if (codec == KVC_CODEC_BITPACK) {
    put_fields(wd, meta, (uint32_t)S, width, tid, kThreads, code);
  } else {
    put_fields(wd, meta, (uint32_t)n_sym, 4, tid, kThreads, [&](uint32_t s) { return (uint32_t)sm.len[s]; });
    const uint32_t lanes_pos = meta + 4u * (uint32_t)n_sym;
    put_fields(wd, lanes_pos, (uint32_t)n_lanes, w_lane, tid, kThreads,
               [&](uint32_t l) { return sm.lane_bits[l] - lane_min; });
    int s, s_end;
    lane_part(S, n_lanes, &s, &s_end);
    if (s < s_end) {
      /* acc holds nacc pending bits of word k (right-aligned); the first p % 32 of them belong to
       * what precedes this part and are 0 here. */
      const uint32_t p = lanes_pos + (uint32_t)n_lanes * w_lane + lane_part_off;
      uint32_t k = p >> 5, nacc = p & 31;
      bool shared_word = nacc != 0;
      uint64_t acc = 0;
      /* huffman_plan coded the part into its slots: move its words, the last one left-aligned. */
      for (uint32_t w = 0; 32 * w < part_bits; w++, s += n_lanes) {
        const uint32_t v = sm.us[s], nb = min(32u, part_bits - 32 * w);
        acc = (acc << nb) | (v >> (32 - nb));
        nacc += nb;
        if (nacc >= 32) {
          nacc -= 32;
          const uint32_t word = (uint32_t)(acc >> nacc);
          if (shared_word) atomicOr(&wd[k], word);
          else wd[k] = word;
          shared_word = false;
          k++;
        }
      }
      if (nacc) atomicOr(&wd[k], (uint32_t)(acc << (32 - nacc)));
    }
  }
}

/* Taking chunks from the device free stack so that the page's chunks cover `bytes`, in two steps
 * so that thread 0's global atomic overlaps the emit: pop_begin issues it, pop_end stores the
 * popped chunk ids (or marks the page dry); the caller's next barrier publishes them. Dry: the free
 * stack ran out or the page would need more than KVC_PAGE_MAX_CHUNKS chunks. */
struct Pop {
  int k, old;
};
__device__ __forceinline__ Pop pop_begin(const Smem &sm, const Args &a, uint32_t bytes) {
  Pop p = {0, 0};
  if (threadIdx.x == 0 && !sm.misc[M_DRY]) {
    uint32_t need = kvc_chunks_for((uint64_t)sm.misc[M_BASE] + bytes, a.pool.chunk_bytes);
    int have = sm.misc[M_HAVE];
    if (need > KVC_PAGE_MAX_CHUNKS) {
      sm.misc[M_DRY] = 1;
      atomicExch(a.pool.error, 1);
    } else if ((int)need > have) {
      p.k = (int)need - have;
      p.old = atomicSub(a.pool.free_top, p.k);
    }
  }
  return p;
}
__device__ __forceinline__ void pop_end(const Smem &sm, const Args &a, Pop p) {
  if (threadIdx.x == 0 && p.k) {
    const int have = sm.misc[M_HAVE];
    if (p.old < p.k) {
      atomicAdd(a.pool.free_top, p.k); /* nothing is pushed in this launch: undo is exact */
      sm.misc[M_DRY] = 1;
      atomicExch(a.pool.error, 1);
    } else {
      /* Top first, as pop_chunks (kvc_backend_cuda.cu) takes them: ascending runs. */
      for (int i = 0; i < p.k; i++) sm.chunks[have + i] = a.pool.free_stack[p.old - 1 - i];
      sm.misc[M_HAVE] = have + p.k;
    }
  }
}

/* Makes sure the page's chunks cover `bytes` (all threads call). Returns false when dry. */
__device__ bool ensure_chunks(const Smem &sm, const Args &a, uint32_t bytes) {
  pop_end(sm, a, pop_begin(sm, a, bytes));
  __syncthreads();
  return !sm.misc[M_DRY];
}

/* Copies align16(bytes) bytes from shared `src` to page offset `off` (16-aligned). */
__device__ void copy_out(const Smem &sm, const Args &a, const uint8_t *src, uint32_t off,
                         uint32_t bytes, bool global_src) {
  const uint32_t cb = a.pool.chunk_bytes;
  off += (uint32_t)sm.misc[M_BASE];
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

/* The compression kernel's dynamic shared memory, at namespace scope so that every access through
 * the carved pointers (all inlined) compiles to a shared-memory instruction. */
extern __shared__ __align__(16) uint8_t compress_smem[];

/* SIZING = false: policy FIXED only, without the sizing pass in the kernel, which frees registers
 * for the rest (ptxas at 128 x fp16: 9.7k instructions and 64 bytes of spills, against 15.5k and
 * 296 with it; bench/NOTES-codec.md, v5). */
template <int HD, int DT, bool SIZING>
__global__ void __launch_bounds__(kThreads, kMinBlocks) compress_kernel(Args a) {
  const int job = blockIdx.x, tid = threadIdx.x, H = a.num_kv_heads;
  const int n = a.n_tokens[job], smax = a.block_tokens * HD;
  Smem sm = carve(compress_smem, smax, HD, a.block_tokens, H);
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
  const uint32_t raw = (uint32_t)S * 2;
  /* Where the sections start: after the header and table, 128-byte aligned on RAW pages. */
  const uint32_t qstart = kvc_page_sections_start((uint32_t)H, KVC_CODEC_BITPACK);
  const uint32_t rstart = kvc_page_sections_start((uint32_t)H, KVC_CODEC_RAW);
  if (tid == 0) {
    /* Packed after the block's page of the previous layer when that was its last page. */
    const bool pack = a.cursor && a.layer > 0 && kvc_pack_codec(a.codec, a.policy);
    const kvc_pack_cursor_t cur = pack ? a.cursor[bid] : kvc_pack_cursor_t{-1, 0, 0};
    const uint32_t first = kvc_pack_after(&cur, a.layer, a.pool.chunk_bytes);
    sm.chunks[0] = cur.chunk;
    sm.misc[M_HAVE] = first ? 1 : 0;
    sm.misc[M_BASE] = (int)(first * (a.pool.chunk_bytes >> 8));
    sm.misc[M_DRY] = 0;
  }
  __syncthreads();

  int codec = a.codec;
  if (SIZING && a.policy != KVC_POLICY_FIXED) {
    /* Size every section under both codecs, then pick like kvc_codec_encode. */
    size_t sz_bp = qstart, sz_hf = qstart;
    bool ok_bp = true, ok_hf = true;
    for (int i = 0; i < 2 * H; i++) {
      const int tensor = i / H;
      QInfo q = quantize<HD, DT>(sm, block + i * row_stride, n, tensor, a.bound_mode,
                                 tensor == 0 ? a.k_bound : a.v_bound, true);
      if (!q.ok) {
        ok_bp = ok_hf = false;
        continue;
      }
      uint32_t bp = bitpack_bytes(q, tensor, n, HD);
      int nl;
      uint32_t wl, off, pb;
      uint32_t hf = huffman_plan(sm, q, S, HD, false, &nl, &wl, &off, &pb);
      if (bp > raw) ok_bp = false;
      if (hf > raw) ok_hf = false;
      sz_bp += align16z(bp);
      sz_hf += align16z(hf);
    }
    size_t sz[3] = {rstart + (size_t)2 * H * align16z(raw), ok_bp ? sz_bp : 0, ok_hf ? sz_hf : 0};
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
  uint32_t pos = 0, start = 0;
  for (int pass = 0; pass < 2; pass++) {
    bool restart = false;
    start = codec == KVC_CODEC_RAW ? rstart : qstart;
    pos = start;
    for (int i = 0; i < 2 * H && !restart; i++) {
      const int tensor = i / H;
      const uint8_t *rows = block + i * row_stride;
      uint32_t bytes = raw;
      if (codec != KVC_CODEC_RAW) {
        QInfo q = quantize<HD, DT>(sm, rows, n, tensor, a.bound_mode, tensor == 0 ? a.k_bound : a.v_bound,
                                   codec == KVC_CODEC_HUFFMAN);
        int nl = 0;
        uint32_t wl = 0, off = 0, pb = 0;
        if (q.ok) {
          if (codec == KVC_CODEC_BITPACK)
            bytes = bitpack_bytes(q, tensor, n, HD);
          else
            bytes = huffman_plan(sm, q, S, HD, true, &nl, &wl, &off, &pb);
        }
        if (!q.ok || bytes > raw) {
          restart = true;
          break;
        }
        /* One barrier publishes the staged section and the chunks popped meanwhile. */
        const Pop pp = pop_begin(sm, a, (uint32_t)align16z(pos + bytes));
        emit(sm, q, codec, tensor, S, HD, nl, wl, off, pb, bytes);
        pop_end(sm, a, pp);
        __syncthreads();
        if (sm.misc[M_DRY]) return fail_job(a, job);
        copy_out(sm, a, sm.xs, pos, bytes, false);
        /* No barrier here: the next quantize starts with one before it overwrites sm.xs. */
      } else {
        if (!ensure_chunks(sm, a, (uint32_t)align16z(pos + bytes))) return fail_job(a, job);
        copy_out(sm, a, rows, pos, bytes, true);
        __syncthreads(); /* every thread has read misc[M_DRY] before the next pop may set it */
      }
      if (tid == 0) kvc_wr_u32(sm.hdr + KVC_PAGE_HEADER_BYTES + 4 * i, pos + bytes);
      pos = (uint32_t)align16z(pos + bytes);
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
    const int have = sm.misc[M_HAVE], base = sm.misc[M_BASE];
    const uint32_t cb = a.pool.chunk_bytes;
    e->nchunks = (uint8_t)have;
    e->codec = (uint8_t)codec;
    e->first = (uint8_t)(base / (int)(cb >> 8));
    for (int c = 0; c < KVC_PAGE_MAX_CHUNKS; c++) e->chunk[c] = c < have ? sm.chunks[c] : 0;
    a.page_bytes[job] = pos;
    if (a.cursor) {
      a.page_chunks[job] = (uint8_t)(have - (base ? 1 : 0));
      /* kvc_pack_cursor_after(e, ...), from the shared copies rather than the entry just written */
      a.cursor[bid] = kvc_pack_cursor_t{a.layer, sm.chunks[have - 1],
                                        (uint32_t)base + pos - (uint32_t)(have - 1) * cb};
    }
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
  if (shape_ok) kvc_dev_page_section(a.pool, a.chunk_bytes, e, H, hdr.codec, sec, &off, &bytes);
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

template <int HD, int DT, bool SIZING> kvc_status_t launch_compress_as(const Args &a, int jobs, cudaStream_t s) {
  size_t smem = carve(nullptr, a.block_tokens * HD, HD, a.block_tokens, a.num_kv_heads).bytes;
  /* The whole unified L1 as shared memory: four 56 KB CTAs per SM at 64 x 128. */
  if (cudaFuncSetAttribute(compress_kernel<HD, DT, SIZING>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           (int)smem) != cudaSuccess ||
      cudaFuncSetAttribute(compress_kernel<HD, DT, SIZING>, cudaFuncAttributePreferredSharedMemoryCarveout,
                           cudaSharedmemCarveoutMaxShared) != cudaSuccess)
    return KVC_ERR_CUDA;
  compress_kernel<HD, DT, SIZING><<<jobs, kThreads, smem, s>>>(a);
  return cudaGetLastError() == cudaSuccess ? KVC_OK : KVC_ERR_CUDA;
}
/* Policy FIXED runs the instantiation without the sizing pass (bench/NOTES-codec.md, v5). */
template <int HD, int DT> kvc_status_t launch_compress(const Args &a, int jobs, cudaStream_t s) {
  return a.policy != KVC_POLICY_FIXED ? launch_compress_as<HD, DT, true>(a, jobs, s) : launch_compress_as<HD, DT, false>(a, jobs, s);
}

template <int HD, int DT, bool SIZING> kvc_status_t compress_occupancy_as(const kvc_codec_params_t *p, int *ctas) {
  size_t smem = carve(nullptr, p->block_tokens * HD, HD, p->block_tokens, p->num_kv_heads).bytes;
  if (cudaFuncSetAttribute(compress_kernel<HD, DT, SIZING>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           (int)smem) != cudaSuccess ||
      cudaFuncSetAttribute(compress_kernel<HD, DT, SIZING>, cudaFuncAttributePreferredSharedMemoryCarveout,
                           cudaSharedmemCarveoutMaxShared) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(ctas, compress_kernel<HD, DT, SIZING>, kThreads, smem) !=
          cudaSuccess)
    return KVC_ERR_CUDA;
  return KVC_OK;
}
template <int HD, int DT> kvc_status_t compress_occupancy(const kvc_codec_params_t *p, int *ctas) {
  return p->policy != KVC_POLICY_FIXED ? compress_occupancy_as<HD, DT, true>(p, ctas) : compress_occupancy_as<HD, DT, false>(p, ctas);
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
  return kvc_codec_cuda_compress_packed(p, blocks, n_tokens, block_ids, num_jobs, dir, pool,
                                        page_bytes, NULL, 0, NULL, stream);
}

extern "C" kvc_status_t kvc_codec_cuda_compress_packed(
    const kvc_codec_params_t *p, const void *blocks, const int32_t *n_tokens,
    const int32_t *block_ids, int num_jobs, kvc_page_entry_t *dir, kvc_dev_pool_t pool,
    uint32_t *page_bytes, kvc_pack_cursor_t *cursor, int layer, uint8_t *page_chunks,
    void *stream) {
  kvc_status_t st = check_cuda_params(p);
  if (st != KVC_OK) return st;
  if (num_jobs < 0 || (num_jobs > 0 && (!blocks || !n_tokens || !block_ids || !dir ||
                                        !pool.base || !pool.free_stack || !pool.free_top ||
                                        !pool.error || !page_bytes)) ||
      (cursor && (layer < 0 || !page_chunks)))
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
  a.cursor = cursor;
  a.layer = layer;
  a.page_chunks = page_chunks;
  cudaStream_t s = (cudaStream_t)stream;
  const bool f16 = p->dtype == KVC_DTYPE_F16;
  switch (p->head_dim) {
  case 64: return f16 ? launch_compress<64, KVC_DTYPE_F16>(a, num_jobs, s) : launch_compress<64, KVC_DTYPE_BF16>(a, num_jobs, s);
  case 128: return f16 ? launch_compress<128, KVC_DTYPE_F16>(a, num_jobs, s) : launch_compress<128, KVC_DTYPE_BF16>(a, num_jobs, s);
  default: return f16 ? launch_compress<256, KVC_DTYPE_F16>(a, num_jobs, s) : launch_compress<256, KVC_DTYPE_BF16>(a, num_jobs, s);
  }
}

extern "C" kvc_status_t kvc_codec_cuda_compress_occupancy(const kvc_codec_params_t *p,
                                                          int *ctas_per_sm) {
  kvc_status_t st = check_cuda_params(p);
  if (st != KVC_OK) return st;
  if (!ctas_per_sm) return KVC_ERR_INVALID_ARGUMENT;
  const bool f16 = p->dtype == KVC_DTYPE_F16;
  switch (p->head_dim) {
  case 64: return f16 ? compress_occupancy<64, KVC_DTYPE_F16>(p, ctas_per_sm) : compress_occupancy<64, KVC_DTYPE_BF16>(p, ctas_per_sm);
  case 128: return f16 ? compress_occupancy<128, KVC_DTYPE_F16>(p, ctas_per_sm) : compress_occupancy<128, KVC_DTYPE_BF16>(p, ctas_per_sm);
  default: return f16 ? compress_occupancy<256, KVC_DTYPE_F16>(p, ctas_per_sm) : compress_occupancy<256, KVC_DTYPE_BF16>(p, ctas_per_sm);
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
