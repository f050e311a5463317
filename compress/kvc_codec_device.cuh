/*
 * Device-side page decoding for the attention kernels and the standalone decompressor (CUDA C++,
 * include from .cu files only). The format is compress/kvc_page_format.h.
 *
 * API (all functions __device__; "CTA-cooperative" ones must be called by every thread of a 1-D
 * block, with the same arguments, and contain __syncthreads()):
 *
 *   kvc_dev_read_header(pool, chunk_bytes, entry, &hdr)            one thread or all; 32-byte read
 *   kvc_dev_page_section(pool, chunk_bytes, entry, H, codec, idx, &off, &bytes)
 *       byte offset (16-aligned) and size of section idx = tensor * H + head of a page of that
 *       codec (the header's), read from the page's section table in the pool (one or two 4-byte
 *       loads). For a contiguous page in memory use kvc_page_section() from kvc_page_format.h.
 *   kvc_dev_load_bytes(dst, pool, chunk_bytes, entry, off, bytes)  CTA-cooperative, no sync inside
 *       copies page bytes [off, off + align16(bytes)) into dst (16-byte aligned, usually shared
 *       memory) with 16-byte loads; off must be 16-aligned (section offsets are), chunk_bytes a power
 *       of two. The caller syncs before reading dst.
 *   kvc_dev_decode_section<HEAD_DIM, T>(hdr, tensor, sec, sec_bytes, tile, row_stride, scratch,
 *                                       max_tokens)                 CTA-cooperative
 *       decodes one section (sec: 16-byte aligned, usually shared memory, sec_bytes from the table)
 *       into tile[t * row_stride + d] for t < hdr.n_tokens, d < HEAD_DIM, T = float or __half
 *       (fp32 values rounded once to T). `scratch` is 16-byte aligned memory (shared) of
 *       kvc_dev_decode_scratch_bytes(HEAD_DIM, max_tokens) bytes; max_tokens is what it was sized
 *       for. Handles RAW, BITPACK and HUFFMAN. Returns true when the section decoded, false (in
 *       every thread) when it is inconsistent with the header or the scratch size; it never reads
 *       outside sec[align4(sec_bytes)] or writes outside the tile rows < n_tokens, also for damaged
 *       bytes. Ends with __syncthreads(): the tile is ready for all threads on return. Decoded values
 *       equal the CPU decoder's (kvc_codec_decode_head) bit for bit when T = float.
 *
 * Typical use in a kernel handling kv head h of a page (one CTA):
 *     __shared__ kvc_page_header_t hdr;  (or registers: every thread may read it)
 *     if (threadIdx.x == 0) kvc_dev_read_header(pool, cb, e, &hdr);  __syncthreads();
 *     kvc_dev_page_section(pool, cb, e, hdr.num_kv_heads, hdr.codec, 0 * H + h, &off, &bytes);
 *     kvc_dev_load_bytes(sec_smem, pool, cb, e, off, bytes);  __syncthreads();
 *     kvc_dev_decode_section<128, __half>(&hdr, 0, sec_smem, bytes, k_tile, 128, scratch, 64);
 *
 * Huffman decode cost per symbol (one thread per lane, lanes strided over the tile): two shared
 * loads for a 32-bit window, one funnel shift, one table load, three bit-field extracts, one add,
 * the reconstruction (int->float, multiply) and one store; no branch depends on the code.
 */
#ifndef KVC_CODEC_DEVICE_CUH
#define KVC_CODEC_DEVICE_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stddef.h>
#include <stdint.h>

#include "compress/kvc_page_format.h"

/* Per-section decode state in scratch: groups = max(head_dim, max_tokens) (group base, step),
 * lanes = what a section of max_tokens x head_dim may use. */
__host__ __device__ constexpr int kvc_dev_decode_groups(int head_dim, int max_tokens) {
  return head_dim > max_tokens ? head_dim : max_tokens;
}
__host__ __device__ constexpr int kvc_dev_decode_lanes(int head_dim, int max_tokens) {
  /* kvc_huf_lanes of the largest section (max_tokens x head_dim) or of a 64-token one */
  const int of_largest = (head_dim * max_tokens + KVC_LANE_SYMBOLS - 1) / KVC_LANE_SYMBOLS;
  return of_largest > head_dim ? of_largest : head_dim;
}
/* Bytes of scratch kvc_dev_decode_section needs: the decode table (4 * 2^KVC_HUF_MAX_LEN), group
 * base and step (8 per group), lane starts (4 per lane), code starts and lengths, a flag. */
__host__ __device__ constexpr size_t kvc_dev_decode_scratch_bytes(int head_dim, int max_tokens) {
  return (size_t)4 * KVC_HUF_TABLE_SIZE + (size_t)8 * kvc_dev_decode_groups(head_dim, max_tokens) +
         (size_t)4 * ((kvc_dev_decode_lanes(head_dim, max_tokens) + 3) & ~3) +
         (size_t)4 * KVC_SYM_COUNT + KVC_SYM_COUNT + 16;
}

__device__ __forceinline__ void kvc_dev_read_header(const uint8_t *pool, uint32_t chunk_bytes,
                                                    const kvc_page_entry_t *e,
                                                    kvc_page_header_t *h) {
  /* Two 16-byte reads: a packed page's header may cross into its second chunk. */
  union {
    uint4 v[2];
    uint8_t b[32];
  } raw;
  raw.v[0] = *(const uint4 *)kvc_page_byte((uint8_t *)pool, chunk_bytes, e, 0);
  raw.v[1] = *(const uint4 *)kvc_page_byte((uint8_t *)pool, chunk_bytes, e, 16);
  kvc_page_header_read(raw.b, h);
}

__device__ __forceinline__ uint32_t kvc_dev_page_u32(const uint8_t *pool, uint32_t chunk_bytes,
                                                     const kvc_page_entry_t *e, uint32_t off) {
  return *(const uint32_t *)kvc_page_byte((uint8_t *)pool, chunk_bytes, e, off);
}

__device__ __forceinline__ void kvc_dev_page_section(const uint8_t *pool, uint32_t chunk_bytes,
                                                     const kvc_page_entry_t *e,
                                                     uint32_t num_kv_heads, uint32_t codec,
                                                     uint32_t idx, uint32_t *off, uint32_t *bytes) {
  uint32_t start = idx == 0 ? kvc_page_sections_start(num_kv_heads, codec)
                            : kvc_align16(kvc_dev_page_u32(pool, chunk_bytes, e,
                                                           KVC_PAGE_HEADER_BYTES + 4 * (idx - 1)));
  uint32_t end = kvc_dev_page_u32(pool, chunk_bytes, e, KVC_PAGE_HEADER_BYTES + 4 * idx);
  *off = start;
  *bytes = end > start ? end - start : 0;
}

__device__ __forceinline__ void kvc_dev_load_bytes(uint8_t *dst, const uint8_t *pool,
                                                   uint32_t chunk_bytes, const kvc_page_entry_t *e,
                                                   uint32_t off, uint32_t bytes) {
  uint32_t shift = (uint32_t)__ffs(chunk_bytes) - 1, mask = chunk_bytes - 1;
  uint32_t n = (bytes + 15) / 16;
  off += kvc_page_start(e, chunk_bytes); /* from chunk[0]'s start */
  for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) {
    uint32_t o = off + 16 * i;
    const uint4 *src = (const uint4 *)(pool + ((uint64_t)e->chunk[o >> shift] << shift) + (o & mask));
    ((uint4 *)dst)[i] = __ldg(src);
  }
}

/* ---- decoding ----------------------------------------------------------------------------- */

/* The 32 bits at `pos`; word indices clamp to `last` so damaged input stays in bounds (for a valid
 * stream the clamped word only feeds bits below the symbol being decoded, which are ignored). */
__device__ __forceinline__ uint32_t kvc_dev_window(const uint32_t *w, uint32_t last, uint32_t pos) {
  uint32_t k = pos >> 5;
  uint32_t hi = w[min(k, last)], lo = w[min(k + 1, last)];
  return __funnelshift_l(lo, hi, pos & 31);
}
/* Top n (0..32) bits of x. */
__device__ __forceinline__ uint32_t kvc_dev_top(uint32_t x, uint32_t n) {
  return __funnelshift_l(x, 0u, n);
}

template <typename T> __device__ __forceinline__ T kvc_dev_from_float(float x);
template <> __device__ __forceinline__ float kvc_dev_from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half kvc_dev_from_float<__half>(float x) {
  return __float2half_rn(x);
}

struct kvc_dev_scratch {
  uint32_t *table;      /* [KVC_HUF_TABLE_SIZE] */
  int32_t *base;        /* [groups] */
  float *step;          /* [groups] */
  uint32_t *lane_start; /* [lanes] */
  uint32_t *code_start; /* [KVC_SYM_COUNT] */
  uint8_t *len;         /* [KVC_SYM_COUNT] */
  int *flag;
};

__device__ __forceinline__ kvc_dev_scratch kvc_dev_scratch_split(uint8_t *s, int groups,
                                                                  int lanes) {
  kvc_dev_scratch r;
  r.table = (uint32_t *)s;
  s += 4 * KVC_HUF_TABLE_SIZE;
  r.base = (int32_t *)s;
  s += 4 * groups;
  r.step = (float *)s;
  s += 4 * groups;
  r.lane_start = (uint32_t *)s;
  s += 4 * ((lanes + 3) & ~3);
  r.code_start = (uint32_t *)s;
  s += 4 * KVC_SYM_COUNT;
  r.len = s;
  s += KVC_SYM_COUNT;
  r.flag = (int *)s;
  return r;
}

/* Reconstruction of code u at (t, d): MODE 0 = REL keys (group d), 1 = REL values (group t),
 * 2 = ABS (centre d, one step). */
template <int MODE>
__device__ __forceinline__ float kvc_dev_recon(const kvc_dev_scratch &sc, float abs_step,
                                               uint32_t u, int t, int d) {
  if (MODE == 0) return __fmul_rn(__int2float_rn((int)((uint32_t)sc.base[d] + u)), sc.step[d]);
  if (MODE == 1) return __fmul_rn(__int2float_rn((int)((uint32_t)sc.base[t] + u)), sc.step[t]);
  return __fmul_rn(__int2float_rn((int)((uint32_t)sc.base[d] + (uint32_t)kvc_unzigzag(u))),
                   abs_step);
}

template <int HEAD_DIM, typename T, int MODE>
__device__ __forceinline__ void kvc_dev_bitpack_run(const kvc_dev_scratch &sc, float abs_step,
                                                    const uint32_t *w, uint32_t last,
                                                    uint32_t pos0, uint32_t width, int S, T *tile,
                                                    int row_stride) {
  for (int s = threadIdx.x; s < S; s += blockDim.x) {
    uint32_t u = kvc_dev_top(kvc_dev_window(w, last, pos0 + (uint32_t)s * width), width);
    int t = s / HEAD_DIM, d = s % HEAD_DIM;
    tile[t * row_stride + d] = kvc_dev_from_float<T>(kvc_dev_recon<MODE>(sc, abs_step, u, t, d));
  }
}

/* A paired section (kvc_bp_paired) whose codes start at word k0: one item per (token pair p,
 * channel d) decodes both tokens' codes from the same words, the even token's row bits in their
 * low halves and the odd token's in their high halves (kvc_page_format.h). The code's row bits
 * [i, i + width) lie in the 16-bit units i / 16 .. (i + width - 1) / 16 <= i / 16 + 2. */
template <int HEAD_DIM, typename T, int MODE>
__device__ __forceinline__ void kvc_dev_bitpack_pairs_run(const kvc_dev_scratch &sc,
                                                          float abs_step, const uint32_t *w,
                                                          uint32_t last, uint32_t k0,
                                                          uint32_t width, int n, T *tile,
                                                          int row_stride) {
  const uint32_t block_words = HEAD_DIM * width / 16, mask = (1u << width) - 1u;
  const int items = (n + 1) / 2 * HEAD_DIM;
  for (int it = threadIdx.x; it < items; it += blockDim.x) {
    const int p = it / HEAD_DIM, d = it % HEAD_DIM, t = 2 * p;
    const uint32_t i = (uint32_t)d * width, o = i & 15u;
    const uint32_t k = k0 + (uint32_t)p * block_words + (i >> 4);
    const uint32_t w0 = w[min(k, last)], w1 = w[min(k + 1, last)];
    /* 48 row bits of each token from unit i / 16 on, most significant first */
    uint64_t ev = (uint64_t)(w0 & 0xffffu) << 32 | (uint64_t)(w1 & 0xffffu) << 16;
    uint64_t od = (uint64_t)(w0 >> 16) << 32 | (uint64_t)(w1 >> 16) << 16;
    if (o + width > 32) {
      const uint32_t w2 = w[min(k + 2, last)];
      ev |= w2 & 0xffffu;
      od |= w2 >> 16;
    }
    const uint32_t sh = 48 - o - width;
    tile[t * row_stride + d] = kvc_dev_from_float<T>(
        kvc_dev_recon<MODE>(sc, abs_step, (uint32_t)(ev >> sh) & mask, t, d));
    if (t + 1 < n)
      tile[(t + 1) * row_stride + d] = kvc_dev_from_float<T>(
          kvc_dev_recon<MODE>(sc, abs_step, (uint32_t)(od >> sh) & mask, t + 1, d));
  }
}

template <int HEAD_DIM, typename T, int MODE>
__device__ __forceinline__ void kvc_dev_huffman_run(const kvc_dev_scratch &sc, float abs_step,
                                                    const uint32_t *w, uint32_t last, int n_lanes,
                                                    int S, T *tile, int row_stride) {
  for (int lane = threadIdx.x; lane < n_lanes; lane += blockDim.x) {
    uint32_t pos = sc.lane_start[lane];
    for (int s = lane; s < S; s += n_lanes) {
      uint32_t win = kvc_dev_window(w, last, pos);
      uint32_t ent = sc.table[win >> (32 - KVC_HUF_MAX_LEN)];
      uint32_t tot = ent & 31u, ne = (ent >> 5) & 31u;
      uint32_t u = (ent >> 10) + (kvc_dev_top(win, tot) & ((1u << ne) - 1u));
      pos += tot;
      int t = s / HEAD_DIM, d = s % HEAD_DIM;
      tile[t * row_stride + d] = kvc_dev_from_float<T>(kvc_dev_recon<MODE>(sc, abs_step, u, t, d));
    }
  }
}

template <int HEAD_DIM, typename T>
__device__ bool kvc_dev_decode_section(const kvc_page_header_t *hdr, int tensor,
                                       const uint8_t *sec, uint32_t sec_bytes, T *tile,
                                       int row_stride, uint8_t *scratch, int max_tokens) {
  const int n = hdr->n_tokens, S = n * HEAD_DIM;
  const int tid = threadIdx.x, nt = blockDim.x;
  bool ok = hdr->head_dim == HEAD_DIM && n >= 1 && n <= max_tokens;
  if (ok && hdr->codec == 0) { /* RAW */
    ok = sec_bytes >= kvc_raw_section_bytes(n, HEAD_DIM, hdr->dtype) && hdr->dtype <= 2;
    if (ok) {
      for (int s = tid; s < S; s += nt) {
        float x = hdr->dtype == 0   ? __half2float(((const __half *)sec)[s])
                  : hdr->dtype == 1 ? __bfloat162float(((const __nv_bfloat16 *)sec)[s])
                                    : ((const float *)sec)[s];
        tile[(s / HEAD_DIM) * row_stride + s % HEAD_DIM] = kvc_dev_from_float<T>(x);
      }
    }
    __syncthreads();
    return ok;
  }
  kvc_qsec_header_t qh;
  if (ok) {
    ok = (hdr->codec == 1 || hdr->codec == 2) && sec_bytes >= KVC_QSEC_HEADER_BYTES + 4 &&
         (tensor == 0 || tensor == 1);
  }
  if (ok) {
    qh = *(const kvc_qsec_header_t *)sec;
    ok = qh.mode <= KVC_QMODE_ABS && qh.w_e <= 16 && qh.w_b <= 31;
  }
  if (!ok) {
    __syncthreads();
    return false;
  }
  const int groups_cap = kvc_dev_decode_groups(HEAD_DIM, max_tokens);
  const int lanes_cap = kvc_dev_decode_lanes(HEAD_DIM, max_tokens);
  kvc_dev_scratch sc = kvc_dev_scratch_split(scratch, groups_cap, lanes_cap);
  const uint32_t *w = (const uint32_t *)(sec + KVC_QSEC_HEADER_BYTES);
  const uint32_t nwords = (sec_bytes - KVC_QSEC_HEADER_BYTES) / 4, last = nwords - 1;
  const uint64_t cap_bits = (uint64_t)nwords * 32;

  /* Group parameters. */
  const bool rel = qh.mode == KVC_QMODE_REL;
  const int G = rel ? (tensor == 0 ? HEAD_DIM : n) : HEAD_DIM;
  const uint32_t pos_b = rel ? (uint32_t)G * qh.w_e : 0;
  const uint64_t meta = (uint64_t)G * ((rel ? qh.w_e : 0) + qh.w_b);
  for (int g = tid; g < G; g += nt) {
    uint32_t b = kvc_dev_top(kvc_dev_window(w, last, pos_b + (uint32_t)g * qh.w_b), qh.w_b);
    sc.base[g] = (int32_t)((uint32_t)qh.b_min + b);
    if (rel) {
      int e = qh.e_min + (int)kvc_dev_top(kvc_dev_window(w, last, (uint32_t)g * qh.w_e), qh.w_e);
      e = max(KVC_STEP_CODE_MIN, min(KVC_STEP_CODE_MAX, e));
      sc.step[g] = kvc_step_from_code(e);
    }
  }
  const float abs_step =
      kvc_step_from_code(max(KVC_STEP_CODE_MIN, min(KVC_STEP_CODE_MAX, (int)qh.e_min)));
  const int mode = rel ? tensor : 2;

  if (hdr->codec == 1) { /* BITPACK */
    /* Pairing follows the tensor in either mode (ABS values too). */
    const bool paired = kvc_bp_paired(tensor, HEAD_DIM);
    const uint32_t pos0 = kvc_bp_start((uint32_t)meta, paired);
    ok = qh.width <= KVC_Q_MAX_BITS &&
         pos0 + kvc_bp_code_bits((uint32_t)n, HEAD_DIM, qh.width, paired) <= cap_bits;
    __syncthreads();
    if (ok && paired) {
      /* REL keys (mode 0) are never paired */
      if (mode == 1)
        kvc_dev_bitpack_pairs_run<HEAD_DIM, T, 1>(sc, abs_step, w, last, pos0 >> 5, qh.width, n,
                                                  tile, row_stride);
      else
        kvc_dev_bitpack_pairs_run<HEAD_DIM, T, 2>(sc, abs_step, w, last, pos0 >> 5, qh.width, n,
                                                  tile, row_stride);
    } else if (ok) {
      if (mode == 0)
        kvc_dev_bitpack_run<HEAD_DIM, T, 0>(sc, abs_step, w, last, pos0, qh.width, S, tile,
                                            row_stride);
      else if (mode == 1)
        kvc_dev_bitpack_run<HEAD_DIM, T, 1>(sc, abs_step, w, last, pos0, qh.width, S, tile,
                                            row_stride);
      else
        kvc_dev_bitpack_run<HEAD_DIM, T, 2>(sc, abs_step, w, last, pos0, qh.width, S, tile,
                                            row_stride);
    }
    __syncthreads();
    return ok;
  }

  /* HUFFMAN: code lengths, canonical left-aligned code starts, decode table, lane starts. */
  const int n_sym = qh.width, n_lanes = qh.n_lanes;
  const uint32_t w_lane = qh.lane_info >> 27, lane_min = qh.lane_info & ((1u << 27) - 1);
  const uint64_t lens_pos = meta, lanes_pos = meta + 4u * (uint32_t)n_sym;
  const uint64_t stream_pos = lanes_pos + (uint64_t)n_lanes * w_lane;
  ok = n_sym >= 1 && n_sym <= KVC_SYM_COUNT && n_lanes >= 1 && n_lanes <= lanes_cap &&
       n_lanes <= S && stream_pos <= cap_bits;
  if (!ok) {
    __syncthreads();
    return false;
  }
  if (tid == 0) *sc.flag = 1;
  for (int s = tid; s < KVC_SYM_COUNT; s += nt) {
    uint32_t l = s < n_sym ? kvc_dev_top(kvc_dev_window(w, last, (uint32_t)lens_pos + 4 * s), 4) : 0;
    sc.len[s] = (uint8_t)l;
  }
  __syncthreads();
  for (int s = tid; s < KVC_SYM_COUNT; s += nt) {
    /* Canonical order is (length, symbol): a symbol's left-aligned start is the table space of all
     * symbols before it. The total must be exactly the table (a complete code), or zero (a single
     * symbol of length 0). */
    uint32_t ls = sc.len[s], start = 0, total = 0;
    for (int r = 0; r < KVC_SYM_COUNT; r++) {
      uint32_t lr = sc.len[r];
      uint32_t span = lr ? (lr <= KVC_HUF_MAX_LEN ? 1u << (KVC_HUF_MAX_LEN - lr) : 0x10000u) : 0u;
      total += span;
      if (lr && (lr < ls || (lr == ls && r < s))) start += span;
    }
    sc.code_start[s] = start;
    if (s == 0 && total != KVC_HUF_TABLE_SIZE && total != 0) *sc.flag = 0;
  }
  __syncthreads();
  const bool code_ok = *sc.flag != 0;
  __syncthreads(); /* everyone has read the flag before warp 0 may clear it below */
  if (!code_ok) return false;
  {
    bool single = true;
    for (int s = 0; s < n_sym; s++) single = single && sc.len[s] == 0;
    if (single) {
      uint32_t ent = kvc_huf_entry((uint32_t)n_sym - 1, 0);
      for (int i = tid; i < KVC_HUF_TABLE_SIZE; i += nt) sc.table[i] = ent;
    } else {
      for (int s = 0; s < n_sym; s++) {
        uint32_t l = sc.len[s];
        if (l == 0) continue;
        uint32_t a = sc.code_start[s], span = 1u << (KVC_HUF_MAX_LEN - l);
        uint32_t ent = kvc_huf_entry((uint32_t)s, l);
        for (uint32_t i = a + tid; i < a + span; i += nt) sc.table[i] = ent;
      }
    }
  }
  if (tid < 32) {
    /* Lane starts: warp 0 scans the lane lengths (each thread a contiguous run of lanes). */
    int per = (n_lanes + 31) / 32, lo = tid * per, hi = min(n_lanes, lo + per);
    uint64_t sum = 0;
    for (int i = lo; i < hi; i++)
      sum += lane_min + kvc_dev_top(kvc_dev_window(w, last, (uint32_t)lanes_pos + i * w_lane),
                                    w_lane);
    uint64_t incl = sum;
    for (int o = 1; o < 32; o <<= 1) {
      uint64_t v = __shfl_up_sync(0xffffffffu, incl, o);
      if (tid >= o) incl += v;
    }
    uint64_t run = stream_pos + incl - sum;
    for (int i = lo; i < hi; i++) {
      sc.lane_start[i] = (uint32_t)run;
      run += lane_min + kvc_dev_top(kvc_dev_window(w, last, (uint32_t)lanes_pos + i * w_lane),
                                    w_lane);
    }
    if (tid == 31 && stream_pos + incl > cap_bits) *sc.flag = 0;
  }
  __syncthreads();
  ok = *sc.flag != 0;
  if (ok) {
    if (mode == 0)
      kvc_dev_huffman_run<HEAD_DIM, T, 0>(sc, abs_step, w, last, n_lanes, S, tile, row_stride);
    else if (mode == 1)
      kvc_dev_huffman_run<HEAD_DIM, T, 1>(sc, abs_step, w, last, n_lanes, S, tile, row_stride);
    else
      kvc_dev_huffman_run<HEAD_DIM, T, 2>(sc, abs_step, w, last, n_lanes, S, tile, row_stride);
  }
  __syncthreads();
  return ok;
}

#endif /* KVC_CODEC_DEVICE_CUH */
