/*
 * Page-section decoders for the fused attention kernel (CUDA C++; included by kvc_attn_cuda.cu).
 *
 * The format is compress/kvc_page_format.h; the reference decoders are the CPU codec and
 * compress/kvc_codec_device.cuh. These decode the same bytes to the same float values (then round
 * once to the tile type), but fit the attention kernel's structure, which the CTA-wide decoder does
 * not: they run on a *pair* of warps (64 threads, synchronised by a named barrier) while the other
 * pair decodes the V section and a producer warp keeps loading, so they may not use
 * __syncthreads(); they write bf16 as well as fp16; they decode only the token rows a 64-token
 * attention unit needs; and they write straight into the XOR-swizzled tile the tensor cores read
 * (ldmatrix, wgmma), with a 16-byte store per 8 values where the code layout allows it.
 *
 * Tile layout (shared memory), for one of K or V of a 64-token unit (kv_tile_off):
 *   // [HD / 64 channel groups][64 rows (tokens)][64] of T: row r of group g is the 128-byte line
 *   // at g * 8192 + r * 128, its 16-byte piece c stored at piece (c ^ (r & 7)), so eight
 *   // consecutive rows of one piece hit eight different bank groups (wgmma's 128-byte swizzle).
 *
 * Every function here is "pair-cooperative": all 64 threads of the pair call it with the same
 * arguments; `pt` is the thread's index in the pair (0..63), `bar` the pair's named barrier.
 * Damaged section bytes never make them read or write out of bounds; they make them return false.
 */
#ifndef KVC_ATTN_DECODE_CUH
#define KVC_ATTN_DECODE_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "compress/kvc_codec_device.cuh"
#include "compress/kvc_page_format.h"

namespace kvc_attn {

constexpr int kUnitTokens = 64;          /* tokens of one attention unit (one smem tile) */
constexpr int kMaxBlockTokens = 128;     /* largest block_tokens the CUDA kernels accept */

/* Byte offset of 16-byte piece `piece` of row `row` in a swizzled tile with HD values per row. */
template <int HD>
__device__ __forceinline__ uint32_t tile_off(int row, int piece) {
  return (uint32_t)(row * (HD * 2) + ((piece ^ (row & 7)) << 4));
}

/* The same in a K/V tile (kUnitTokens rows, 1024-byte aligned): 64 values of a row per 128-byte
 * line, the lines of each group of 64 channels together, the pieces of line r XORed with r & 7:
 * the tensor cores' 128-byte swizzled layout, which wgmma reads (as K-major B for K, N-major B for
 * V) and ldmatrix reads without bank conflicts. */
template <int HD>
__device__ __forceinline__ uint32_t kv_tile_off(int row, int piece) {
  return (uint32_t)((piece >> 3) * (kUnitTokens * 128) + row * 128 +
                    (((piece & 7) ^ (row & 7)) << 4));
}

__device__ __forceinline__ void pair_sync(int bar) {
  asm volatile("bar.sync %0, 64;\n" ::"r"(bar) : "memory");
}

/* A pair barrier that also returns whether `x` held in any thread of the pair. */
__device__ __forceinline__ bool pair_any(bool x, int bar) {
  uint32_t r;
  asm volatile(
      "{\n .reg .pred p, q;\n setp.ne.u32 p, %1, 0;\n bar.red.or.pred q, %2, 64, p;\n"
      " selp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(r)
      : "r"((uint32_t)x), "r"(bar)
      : "memory");
  return r != 0;
}

template <class T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&h);
}
template <class T> __device__ __forceinline__ uint16_t to_bits(float x);
template <> __device__ __forceinline__ uint16_t to_bits<__half>(float x) {
  return __half_as_ushort(__float2half_rn(x));
}
template <> __device__ __forceinline__ uint16_t to_bits<__nv_bfloat16>(float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

/* Per-pair decode scratch in shared memory. */
template <int HD> struct scratch_layout {
  static constexpr int groups = HD > kMaxBlockTokens ? HD : kMaxBlockTokens;
  static constexpr int lanes = HD * kMaxBlockTokens / KVC_LANE_SYMBOLS; /* <= KVC_MAX_LANES */
  static constexpr int table_off = 0;
  static constexpr int base_off = table_off + 4 * KVC_HUF_TABLE_SIZE;
  static constexpr int step_off = base_off + 4 * groups;
  static constexpr int bs_off = step_off + 4 * groups;
  static constexpr int lane_off = bs_off + 4 * groups;
  static constexpr int cnt_off = lane_off + 4 * (lanes + 4);
  static constexpr int bytes = cnt_off + 4 * (2 * 16 + 4);
  /* The paired value decoders load a token pair's steps and addends as one float2. */
  static_assert(step_off % 8 == 0 && bs_off % 8 == 0, "8-byte aligned step and bs");
};

struct scratch {
  uint32_t *table;
  int32_t *base;
  float *step;
  float *bs;            /* base * step, where exact (the fast paths' FFMA addend) */
  uint32_t *lane_start; /* [n_lanes + 1] */
  int32_t *cnt;         /* [2 warps][16 lengths], then the lane scan's carry at [32] */
};

template <int HD> __device__ __forceinline__ scratch make_scratch(uint8_t *p) {
  typedef scratch_layout<HD> L;
  scratch s;
  s.table = (uint32_t *)(p + L::table_off);
  s.base = (int32_t *)(p + L::base_off);
  s.step = (float *)(p + L::step_off);
  s.bs = (float *)(p + L::bs_off);
  s.lane_start = (uint32_t *)(p + L::lane_off);
  s.cnt = (int32_t *)(p + L::cnt_off);
  return s;
}

/* The header of a quantized section in the ring (sections are 16-byte aligned there): one
 * 16-byte load instead of 16 byte loads. */
__device__ __forceinline__ void qsec_header_load(const uint8_t *sec, kvc_qsec_header_t *qh) {
  static_assert(KVC_QSEC_HEADER_BYTES == 16, "one 16-byte load");
  union {
    uint4 v;
    uint8_t b[KVC_QSEC_HEADER_BYTES];
  } hb;
  hb.v = *(const uint4 *)sec;
  kvc_qsec_header_read(hb.b, qh);
}

/*
 * Copies rows [0, nrows) of a row section (staging rows or a RAW section in the tile dtype,
 * [nrows][HD] at `src`, 16-byte aligned) to tile rows row0.. .
 */
template <int HD>
__device__ __forceinline__ void copy_rows(const uint8_t *src, int nrows, int row0, uint8_t *tile,
                                          int pt) {
  constexpr int P = HD / 8;
  for (int i = pt; i < nrows * P; i += 64) {
    int r = i / P, c = i % P;
    *(uint4 *)(tile + kv_tile_off<HD>(row0 + r, c)) = *(const uint4 *)(src + (r * P + c) * 16);
  }
}

/* Zeroes tile rows [r0, 64). */
template <int HD>
__device__ __forceinline__ void zero_rows(int r0, uint8_t *tile, int pt) {
  constexpr int P = HD / 8;
  for (int i = r0 * P + pt; i < kUnitTokens * P; i += 64)
    *(uint4 *)(tile + kv_tile_off<HD>(i / P, i % P)) = make_uint4(0, 0, 0, 0);
}

/* The value of code u at (t, d): (base + u) * step for relative mode (group d for keys, t for
 * values), (centre_d + unzigzag(u)) * step for absolute mode; exactly the CPU decoder's float. */
template <int MODE>
__device__ __forceinline__ float recon(const scratch &sc, float abs_step, uint32_t u, int t,
                                       int d) {
  if (MODE == 0) return __fmul_rn(__int2float_rn((int)((uint32_t)sc.base[d] + u)), sc.step[d]);
  if (MODE == 1) return __fmul_rn(__int2float_rn((int)((uint32_t)sc.base[t] + u)), sc.step[t]);
  return __fmul_rn(__int2float_rn((int)((uint32_t)sc.base[d] + (uint32_t)kvc_unzigzag(u))),
                   abs_step);
}

/* The 32 bits from bit sh (0..15) of the halves in words w0, w1, w2 of a paired block (the
 * words of both tokens' halves j, j + 1, j + 2): the even token's (ev) and the odd token's (od).
 * A PRMT joins a token's first two halves, another takes its third. */
__device__ __forceinline__ void bp_pair_windows(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t sh,
                                                uint32_t &ev, uint32_t &od) {
  ev = __funnelshift_l(__byte_perm(w2, 0u, 0x1044u), __byte_perm(w0, w1, 0x1054u), sh);
  od = __funnelshift_l(__byte_perm(w2, 0u, 0x3244u), __byte_perm(w0, w1, 0x3276u), sh);
}

/* A bit-pack section's codes by token rows (row_bits = HD * width bits each). Linear sections are
 * read through the windows (word indices clamp to `last`, as kvc_dev_window's); paired ones
 * (kvc_bp_paired) by token pairs, from the words of their blocks. */
struct bp_rows {
  const uint32_t *w;
  uint32_t last, start, row_bits; /* start: kvc_bp_start */
  bool paired;

  /* Linear: the 32 bits of token t's row from row bit i. */
  __device__ __forceinline__ uint32_t window(int t, uint32_t i) const {
    return kvc_dev_window(w, last, start + (uint32_t)t * row_bits + i);
  }
  /* Linear: the 64 bits of token t's row from row bit i, as hi:lo. */
  __device__ __forceinline__ void window64(int t, uint32_t i, uint32_t &hi, uint32_t &lo) const {
    const uint32_t pos = start + (uint32_t)t * row_bits + i, k = pos >> 5, sh = pos & 31;
    const uint32_t w0 = w[min(k, last)], w1 = w[min(k + 1, last)], w2 = w[min(k + 2, last)];
    hi = __funnelshift_l(w1, w0, sh);
    lo = __funnelshift_l(w2, w1, sh);
  }
  /* Paired: the index of word j (both tokens' halves j) of block p. */
  __device__ __forceinline__ uint32_t pair_word(int p, uint32_t j) const {
    return (start >> 5) + (uint32_t)p * (row_bits >> 4) + j;
  }
};

/*
 * Paired, width W <= 8: the (W + 1) / 2 words of block p that hold column c's codes (row bits
 * [8 c W, 8 c W + 8 W) of both tokens, from half c W / 2 on, 8 bits into it when c W is odd),
 * the rest zero. No clamps: decode_quant's size check keeps each block of the page's tokens in
 * the section.
 */
template <int HD, int W>
__device__ __forceinline__ void pair_column_words(const bp_rows &br, int p, int c,
                                                  uint32_t (&x)[4]) {
  const uint32_t *b = br.w + (br.start >> 5) + (uint32_t)(p * (HD * W / 16) + c * W / 2);
#pragma unroll
  for (int j = 0; j < 4; j++) x[j] = j < (W + 1) / 2 ? b[j] : 0u;
}

/* The same as two 64-bit windows from row bit 8 c W, hi:lo, of token 2p (ev: the words' low
 * halves) and token 2p + 1 (od: their high halves). */
template <int HD, int W>
__device__ __forceinline__ void pair_windows64(const bp_rows &br, int p, int c, uint32_t &ehi,
                                               uint32_t &elo, uint32_t &ohi, uint32_t &olo) {
  uint32_t x[4];
  pair_column_words<HD, W>(br, p, c, x);
  ehi = __byte_perm(x[0], x[1], 0x1054u);
  elo = __byte_perm(x[2], x[3], 0x1054u);
  ohi = __byte_perm(x[0], x[1], 0x3276u);
  olo = __byte_perm(x[2], x[3], 0x3276u);
  if (W & 1) {
    const uint32_t o = (uint32_t)(c & 1) * 8;
    ehi = __funnelshift_l(elo, ehi, o);
    elo <<= o;
    ohi = __funnelshift_l(olo, ohi, o);
    olo <<= o;
  }
}

/* Bit-pack: eight consecutive codes per thread, one 16-byte store per eight values. Paired
 * sections (values: MODE 1 or 2) go by token pairs: a thread decodes a column of both tokens of
 * a block from the same words, and writes the rows of the pair that lie in the range (the first
 * pair's even token precedes it when ptok0 is odd, the last's odd token may follow it). */
template <int HD, class T, int MODE>
__device__ __forceinline__ void bitpack_rows(const scratch &sc, float abs_step, const bp_rows &br,
                                             uint32_t width, int ptok0, int nrows, int row0,
                                             uint8_t *tile, int pt) {
  constexpr int P = HD / 8;
  if (MODE != 0 && br.paired) {
    const int t0 = ptok0 & ~1, t_end = ptok0 + nrows;
    for (int i = pt; i < (t_end - t0 + 1) / 2 * P; i += 64) {
      const int t = t0 + 2 * (i / P), c = i % P, r = t - ptok0;
      const uint32_t pos = (uint32_t)(c * 8) * width;
      uint32_t ve[4], vo[4];
#pragma unroll
      for (int j = 0; j < 8; j += 2) {
        uint32_t ue[2], uo[2];
#pragma unroll
        for (int h = 0; h < 2; h++) {
          const uint32_t b = pos + (j + h) * width, k = br.pair_word(t >> 1, b >> 4);
          bp_pair_windows(br.w[min(k, br.last)], br.w[min(k + 1, br.last)],
                          br.w[min(k + 2, br.last)], b & 15, ue[h], uo[h]);
        }
        const int d = c * 8 + j;
        ve[j / 2] = pack2<T>(recon<MODE>(sc, abs_step, kvc_dev_top(ue[0], width), t, d),
                             recon<MODE>(sc, abs_step, kvc_dev_top(ue[1], width), t, d + 1));
        vo[j / 2] = pack2<T>(recon<MODE>(sc, abs_step, kvc_dev_top(uo[0], width), t + 1, d),
                             recon<MODE>(sc, abs_step, kvc_dev_top(uo[1], width), t + 1, d + 1));
      }
      if (r >= 0)
        *(uint4 *)(tile + kv_tile_off<HD>(row0 + r, c)) = make_uint4(ve[0], ve[1], ve[2], ve[3]);
      if (r + 1 < nrows)
        *(uint4 *)(tile + kv_tile_off<HD>(row0 + r + 1, c)) =
            make_uint4(vo[0], vo[1], vo[2], vo[3]);
    }
    return;
  }
  for (int i = pt; i < nrows * P; i += 64) {
    const int r = i / P, c = i % P, t = ptok0 + r;
    const uint32_t pos = (uint32_t)(c * 8) * width;
    uint32_t v[4];
#pragma unroll
    for (int j = 0; j < 8; j += 2) {
      uint32_t u0 = kvc_dev_top(br.window(t, pos + j * width), width);
      uint32_t u1 = kvc_dev_top(br.window(t, pos + (j + 1) * width), width);
      v[j / 2] = pack2<T>(recon<MODE>(sc, abs_step, u0, t, c * 8 + j),
                          recon<MODE>(sc, abs_step, u1, t, c * 8 + j + 1));
    }
    *(uint4 *)(tile + kv_tile_off<HD>(row0 + r, c)) = make_uint4(v[0], v[1], v[2], v[3]);
  }
}

/*
 * Huffman: one thread per lane (the format's independently decodable sub-streams); lane i codes
 * symbols i, i + n_lanes, ...; it stops after the last symbol of the rows this unit needs and
 * writes only those rows. A lane decoded to its end must stop exactly where the next one starts.
 */
template <int HD, class T, int MODE>
__device__ __forceinline__ bool huffman_rows(const scratch &sc, float abs_step, const uint32_t *w,
                                             uint32_t last, int n_lanes, int lmax, int S,
                                             int ptok0, int nrows, int row0, uint8_t *tile,
                                             int pt) {
  const int s_begin = ptok0 * HD, s_end = (ptok0 + nrows) * HD;
  bool ok = true;
  for (int lane = pt; lane < n_lanes; lane += 64) {
    uint32_t pos = sc.lane_start[lane];
    int s = lane;
    for (; s < s_end; s += n_lanes) {
      uint32_t win = kvc_dev_window(w, last, pos);
      uint32_t ent = sc.table[kvc_dev_top(win, (uint32_t)lmax)];
      uint32_t tot = ent & 31u, ne = (ent >> 5) & 31u;
      uint32_t u = (ent >> 10) + (kvc_dev_top(win, tot) & ((1u << ne) - 1u));
      pos += tot;
      if (s >= s_begin) {
        const int t = s / HD, d = s % HD, row = row0 + t - ptok0;
        *(uint16_t *)(tile + kv_tile_off<HD>(row, d >> 3) + (d & 7) * 2) =
            to_bits<T>(recon<MODE>(sc, abs_step, u, t, d));
      }
    }
    if (s >= S && pos != sc.lane_start[lane + 1]) ok = false;
  }
  return ok;
}

/*
 * Fast paths. Both reconstruct relative-mode values as fmaf(u, step, base * step): with |base| <
 * 2^18 and a 6-bit step mantissa, base * step is exact, so the one rounding of the FMA gives the
 * CPU decoder's (float)(base + u) * step bit for bit, in two operations instead of an int->float
 * conversion (a quarter-rate instruction) and a multiply.
 */

/* Code j (0..7) of eight W-bit codes held most significant first in hi:lo. */
template <int W>
__device__ __forceinline__ uint32_t code_at(uint32_t hi, uint32_t lo, int j) {
  if constexpr (W == 0) {
    return 0u;
  } else {
    const int b = j * W;
    if (b + W <= 32) return (hi << b) >> (32 - W);
    if (b >= 32) return (lo << (b - 32)) >> (32 - W);
    return __funnelshift_l(lo, hi, b) >> (32 - W);
  }
}

/* Exact float of a small non-negative integer (< 2^23) without the conversion unit. */
__device__ __forceinline__ float small_uint_to_float(uint32_t u) {
  return __uint_as_float(0x4B000000u | u) - 8388608.0f;
}

/*
 * Bit-pack, relative mode, width W <= 8: each thread owns one 16-byte column (8 channels) of the
 * tile, so key steps and addends sit in registers; a row's eight codes come from one 64-bit
 * window (three word loads; paired: both tokens' from (W + 1) / 2 words and four PRMTs) and
 * leave as one 16-byte store. Paired sections (values) go by token pairs, as bitpack_rows.
 */
template <int HD, class T, int MODE, int W>
__device__ __forceinline__ void bitpack_rows_fast(const scratch &sc, const bp_rows &br, int ptok0,
                                                  int nrows, int row0, uint8_t *tile, int pt) {
  constexpr int P = HD / 8, RSTEP = 64 / P;
  const int c = pt % P;
  float kst[8], kbs[8];
  if (MODE == 0) {
#pragma unroll
    for (int j = 0; j < 8; j++) {
      kst[j] = sc.step[8 * c + j];
      kbs[j] = sc.bs[8 * c + j];
    }
  }
  /* Tile row r from its token's window hi:lo and (values) step and addend. */
  auto row = [&](uint32_t hi, uint32_t lo, float vst, float vbs, int r) {
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; j++) {
      const float uf = small_uint_to_float(code_at<W>(hi, lo, j));
      v[j] = MODE == 0 ? __fmaf_rn(uf, kst[j], kbs[j]) : __fmaf_rn(uf, vst, vbs);
    }
    *(uint4 *)(tile + kv_tile_off<HD>(row0 + r, c)) =
        make_uint4(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]), pack2<T>(v[4], v[5]),
                   pack2<T>(v[6], v[7]));
  };
  if (MODE == 1 && br.paired) {
    for (int t = (ptok0 & ~1) + 2 * (pt / P); t < ptok0 + nrows; t += 2 * RSTEP) {
      const int r = t - ptok0;
      uint32_t ehi, elo, ohi, olo;
      pair_windows64<HD, W>(br, t >> 1, c, ehi, elo, ohi, olo);
      const float2 st = *(const float2 *)(sc.step + t), bs = *(const float2 *)(sc.bs + t);
      if (r >= 0) row(ehi, elo, st.x, bs.x, r);
      if (r + 1 < nrows) row(ohi, olo, st.y, bs.y, r + 1);
    }
    return;
  }
  for (int r = pt / P; r < nrows; r += RSTEP) {
    const int t = ptok0 + r;
    uint32_t hi, lo;
    br.window64(t, (uint32_t)(8 * c * W), hi, lo);
    row(hi, lo, MODE == 1 ? sc.step[t] : 0.f, MODE == 1 ? sc.bs[t] : 0.f, r);
  }
}

/*
 * Half-precision arithmetic for bit-pack codes (the tile type's own pairs): 0x6400 | u is the fp16
 * 1024 + u exactly for u < 1024 (bf16: 0x4300 | u is 128 + u for u < 128), so one OR builds two
 * codes, one HSUB2 makes them exact halves and one HFMA2 reconstructs u * step + base * step with
 * step and base * step rounded to the tile type. Steps (6-bit significands) are exact in fp16's
 * normal range, and so is base * step when base is small, so the result is usually the CPU
 * decoder's value rounded to fp16, else within an ulp of it. The caller takes this path for fp16
 * tiles when every step and addend is a normal fp16 number.
 */
template <class T> struct half2_of;
template <> struct half2_of<__half> {
  typedef __half2 type;
  static constexpr uint32_t magic = 0x64006400u;
  static __device__ __forceinline__ type from_floats(float a, float b) {
    return __floats2half2_rn(a, b);
  }
};
template <> struct half2_of<__nv_bfloat16> {
  typedef __nv_bfloat162 type;
  static constexpr uint32_t magic = 0x43004300u;
  static __device__ __forceinline__ type from_floats(float a, float b) {
    return __floats2bfloat162_rn(a, b);
  }
};

template <class H2> __device__ __forceinline__ H2 as_h2(uint32_t x) {
  return *reinterpret_cast<const H2 *>(&x);
}
template <class H2> __device__ __forceinline__ uint32_t h2_bits(H2 x) {
  return *reinterpret_cast<const uint32_t *>(&x);
}

template <int HD, class T, int MODE, int W>
__device__ __forceinline__ void bitpack_rows_h2(const scratch &sc, const bp_rows &br, int ptok0,
                                                int nrows, int row0, uint8_t *tile, int pt) {
  typedef half2_of<T> HT;
  typedef typename HT::type H2;
  constexpr int P = HD / 8, RSTEP = 64 / P;
  const int c = pt % P;
  const H2 magic = as_h2<H2>(HT::magic);
  H2 kst[4], kbs[4];
  if (MODE == 0) {
#pragma unroll
    for (int q = 0; q < 4; q++) {
      kst[q] = HT::from_floats(sc.step[8 * c + 2 * q], sc.step[8 * c + 2 * q + 1]);
      kbs[q] = HT::from_floats(sc.bs[8 * c + 2 * q], sc.bs[8 * c + 2 * q + 1]);
    }
  }
  /* Tile row r from its token's window hi:lo and (values) step and addend pairs. */
  auto row = [&](uint32_t hi, uint32_t lo, H2 vst, H2 vbs, int r) {
    uint32_t out[4];
    if (W == 4) {
      /* Codes j and j + 4 sit 16 bits apart: one shift and one LOP3 make both halves. */
      uint32_t pr[4];
#pragma unroll
      for (int j = 0; j < 4; j++) {
        /* low half: code j + 4, high half: code j */
        const H2 u = __hsub2(as_h2<H2>(((hi >> (12 - 4 * j)) & 0x000F000Fu) | HT::magic), magic);
        pr[j] = h2_bits<H2>(u);
      }
      /* Reorder to (0,1) (2,3) (4,5) (6,7), then reconstruct pairwise. */
      uint32_t q01 = __byte_perm(pr[0], pr[1], 0x7632), q23 = __byte_perm(pr[2], pr[3], 0x7632);
      uint32_t q45 = __byte_perm(pr[0], pr[1], 0x5410), q67 = __byte_perm(pr[2], pr[3], 0x5410);
      const uint32_t q[4] = {q01, q23, q45, q67};
#pragma unroll
      for (int p2 = 0; p2 < 4; p2++)
        out[p2] = h2_bits<H2>(__hfma2(as_h2<H2>(q[p2]), MODE == 0 ? kst[p2] : vst,
                                      MODE == 0 ? kbs[p2] : vbs));
    } else {
#pragma unroll
      for (int p2 = 0; p2 < 4; p2++) {
        const uint32_t u0 = code_at<W>(hi, lo, 2 * p2), u1 = code_at<W>(hi, lo, 2 * p2 + 1);
        const H2 u = __hsub2(as_h2<H2>(u0 | (u1 << 16) | HT::magic), magic);
        out[p2] = h2_bits<H2>(__hfma2(u, MODE == 0 ? kst[p2] : vst, MODE == 0 ? kbs[p2] : vbs));
      }
    }
    *(uint4 *)(tile + kv_tile_off<HD>(row0 + r, c)) = make_uint4(out[0], out[1], out[2], out[3]);
  };
  if (MODE == 1 && br.paired) {
    /* Token pairs, as bitpack_rows. */
    for (int t = (ptok0 & ~1) + 2 * (pt / P); t < ptok0 + nrows; t += 2 * RSTEP) {
      const int r = t - ptok0;
      const float2 st = *(const float2 *)(sc.step + t), bs = *(const float2 *)(sc.bs + t);
      if constexpr (W == 1 || W == 2 || W == 4 || W == 8) {
        /* No code crosses a half: one shift and one LOP3 give channel j's codes of both tokens
         * (the even token's in the low half), one HFMA2 with both tokens' steps reconstructs
         * them, and PRMTs regroup each token's channel pairs. */
        uint32_t x[4], f[8], ev[4], od[4];
        pair_column_words<HD, W>(br, t >> 1, c, x);
        const uint32_t o = W == 1 ? (uint32_t)(c & 1) * 8 : 0u, m = ((1u << W) - 1u) * 0x10001u;
        const H2 pst = HT::from_floats(st.x, st.y), pbs = HT::from_floats(bs.x, bs.y);
#pragma unroll
        for (int j = 0; j < 8; j++) {
          const int b = j * W;
          const uint32_t y = (x[b / 16] >> (16 - W - b % 16 - o)) & m;
          f[j] = h2_bits<H2>(__hfma2(__hsub2(as_h2<H2>(y | HT::magic), magic), pst, pbs));
        }
#pragma unroll
        for (int q = 0; q < 4; q++) {
          ev[q] = __byte_perm(f[2 * q], f[2 * q + 1], 0x5410);
          od[q] = __byte_perm(f[2 * q], f[2 * q + 1], 0x7632);
        }
        if (r >= 0)
          *(uint4 *)(tile + kv_tile_off<HD>(row0 + r, c)) = make_uint4(ev[0], ev[1], ev[2], ev[3]);
        if (r + 1 < nrows)
          *(uint4 *)(tile + kv_tile_off<HD>(row0 + r + 1, c)) =
              make_uint4(od[0], od[1], od[2], od[3]);
      } else {
        uint32_t ehi, elo, ohi, olo;
        pair_windows64<HD, W>(br, t >> 1, c, ehi, elo, ohi, olo);
        if (r >= 0) row(ehi, elo, HT::from_floats(st.x, st.x), HT::from_floats(bs.x, bs.x), r);
        if (r + 1 < nrows)
          row(ohi, olo, HT::from_floats(st.y, st.y), HT::from_floats(bs.y, bs.y), r + 1);
      }
    }
    return;
  }
  for (int r = pt / P; r < nrows; r += RSTEP) {
    const int t = ptok0 + r;
    uint32_t hi, lo;
    br.window64(t, (uint32_t)(8 * c * W), hi, lo);
    H2 vst, vbs;
    if (MODE == 1) {
      vst = HT::from_floats(sc.step[t], sc.step[t]);
      vbs = HT::from_floats(sc.bs[t], sc.bs[t]);
    }
    row(hi, lo, vst, vbs, r);
  }
}

template <int HD, class T, int MODE>
__device__ __forceinline__ void bitpack_rows_fast_w(const scratch &sc, const bp_rows &br,
                                                    uint32_t width, int ptok0, int nrows, int row0,
                                                    uint8_t *tile, int pt) {
  switch (width) {
#define KVC__W(W)                                                                                  \
  case W:                                                                                          \
    bitpack_rows_fast<HD, T, MODE, W>(sc, br, ptok0, nrows, row0, tile, pt);                       \
    break;
    KVC__W(0) KVC__W(1) KVC__W(2) KVC__W(3) KVC__W(4) KVC__W(5) KVC__W(6) KVC__W(7) KVC__W(8)
#undef KVC__W
  }
}

/* Table entry of the direct-symbol Huffman path: the symbol's value as a float (< 32: its low 18
 * bits are zero) with the code length in the low four bits. */
__device__ __forceinline__ uint32_t fast_huf_entry(uint32_t sym, uint32_t len) {
  return __float_as_uint((float)sym) | len;
}

/*
 * Huffman, relative mode, every symbol direct (no extra bits, codes <= 11 bits), lanes a multiple
 * of both 64 and head_dim (so lane i always codes channel i % head_dim). Each thread decodes LPT
 * lanes interleaved (independent chains: the loads of one hide the latency of the others), two
 * symbols per 32-bit window (11 + 11 bits always fit), from a two-word bit buffer refilled as it
 * drains. Returns false when a lane decoded to its end does not end where the next one starts.
 */
/*
 * The same for the common shape, a whole 64-token page into a whole unit (lane i is channel i,
 * symbol k is token k): each lane's eight swizzled column offsets are compile-time indexed
 * registers, so a symbol costs one store, and a value row's step and addend are loaded once for
 * all of the thread's lanes. The pair decodes lanes [lane0, lane0 + nl): LPT per thread, threads
 * past nl idle.
 */
template <int HD, class T, int MODE, int LPT>
__device__ __forceinline__ bool huffman_rows_fast64(const scratch &sc, const uint32_t *w,
                                                    uint32_t last, int lmax, uint8_t *tile,
                                                    int pt, int lane0, int nl) {
  if (pt >= nl) return true;
  uint32_t cur[LPT], nxt[LPT], used[LPT], widx[LPT], off[LPT][8];
  float kst[LPT], kbs[LPT];
#pragma unroll
  for (int l = 0; l < LPT; l++) {
    const int d = lane0 + pt + 64 * l;
    const uint32_t pos = sc.lane_start[d];
    widx[l] = pos >> 5;
    used[l] = pos & 31;
    cur[l] = w[min(widx[l], last)];
    nxt[l] = w[min(widx[l] + 1, last)];
    kst[l] = MODE == 0 ? sc.step[d] : 0.f;
    kbs[l] = MODE == 0 ? sc.bs[d] : 0.f;
#pragma unroll
    for (int j = 0; j < 8; j++) off[l][j] = kv_tile_off<HD>(j, d >> 3) + (d & 7) * 2;
  }
  for (int k0 = 0; k0 < kUnitTokens; k0 += 8) {
    uint8_t *rows = tile + k0 * 128; /* kv_tile_off: line r at 128 r */
#pragma unroll
    for (int kk = 0; kk < 8; kk += 2) {
      float vst0 = 0.f, vbs0 = 0.f, vst1 = 0.f, vbs1 = 0.f;
      if (MODE == 1) {
        vst0 = sc.step[k0 + kk];
        vbs0 = sc.bs[k0 + kk];
        vst1 = sc.step[k0 + kk + 1];
        vbs1 = sc.bs[k0 + kk + 1];
      }
#pragma unroll
      for (int l = 0; l < LPT; l++) {
        const uint32_t win = __funnelshift_l(nxt[l], cur[l], used[l]);
        const uint32_t e1 = sc.table[kvc_dev_top(win, (uint32_t)lmax)];
        const uint32_t len1 = e1 & 15u;
        const uint32_t e2 = sc.table[kvc_dev_top(win << len1, (uint32_t)lmax)];
        used[l] += len1 + (e2 & 15u);
        if (used[l] >= 32) {
          cur[l] = nxt[l];
          widx[l]++;
          nxt[l] = w[min(widx[l] + 1, last)];
          used[l] -= 32;
        }
        const float u1 = __uint_as_float(e1 & ~15u), u2 = __uint_as_float(e2 & ~15u);
        const float v1 = MODE == 0 ? __fmaf_rn(u1, kst[l], kbs[l]) : __fmaf_rn(u1, vst0, vbs0);
        const float v2 = MODE == 0 ? __fmaf_rn(u2, kst[l], kbs[l]) : __fmaf_rn(u2, vst1, vbs1);
        *(uint16_t *)(rows + off[l][kk]) = to_bits<T>(v1);
        *(uint16_t *)(rows + off[l][kk + 1]) = to_bits<T>(v2);
      }
    }
  }
  bool ok = true;
#pragma unroll
  for (int l = 0; l < LPT; l++)
    ok &= widx[l] * 32 + used[l] == sc.lane_start[lane0 + pt + 64 * l + 1];
  return ok;
}

template <int HD, class T, int MODE, int LPT>
__device__ __forceinline__ bool huffman_rows_fast(const scratch &sc, const uint32_t *w,
                                                  uint32_t last, int n_lanes, int lmax, int S,
                                                  int ptok0, int nrows, int row0, uint8_t *tile,
                                                  int pt) {
  const int m = n_lanes / HD; /* tokens a lane advances per symbol */
  const int per_lane = S / n_lanes;
  const int t_end = ptok0 + nrows;
  uint32_t cur[LPT], nxt[LPT], used[LPT], widx[LPT];
  float kst[LPT], kbs[LPT];
  int d[LPT], t0[LPT];
#pragma unroll
  for (int l = 0; l < LPT; l++) {
    const int lane = pt + 64 * l;
    const uint32_t pos = sc.lane_start[lane];
    widx[l] = pos >> 5;
    used[l] = pos & 31;
    cur[l] = w[min(widx[l], last)];
    nxt[l] = w[min(widx[l] + 1, last)];
    d[l] = lane % HD;
    t0[l] = lane / HD;
    kst[l] = MODE == 0 ? sc.step[d[l]] : 0.f;
    kbs[l] = MODE == 0 ? sc.bs[d[l]] : 0.f;
  }
  /* Symbols each lane decodes: up to the last needed token, rounded up to a pair. */
  int steps = (t_end + m - 1) / m;
  steps = min(per_lane, steps + (steps & 1));
  for (int k = 0; k < steps; k += 2) {
#pragma unroll
    for (int l = 0; l < LPT; l++) {
      const uint32_t win = __funnelshift_l(nxt[l], cur[l], used[l]);
      const uint32_t e1 = sc.table[kvc_dev_top(win, (uint32_t)lmax)];
      const uint32_t len1 = e1 & 15u;
      const uint32_t e2 = sc.table[kvc_dev_top(win << len1, (uint32_t)lmax)];
      const uint32_t len2 = e2 & 15u;
      used[l] += len1 + len2;
      if (used[l] >= 32) {
        cur[l] = nxt[l];
        widx[l]++;
        nxt[l] = w[min(widx[l] + 1, last)];
        used[l] -= 32;
      }
      const float u1 = __uint_as_float(e1 & ~15u), u2 = __uint_as_float(e2 & ~15u);
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const int t = t0[l] + (k + h) * m;
        if (t >= ptok0 && t < t_end && k + h < per_lane) {
          const float uf = h ? u2 : u1;
          const float v = MODE == 0 ? __fmaf_rn(uf, kst[l], kbs[l])
                                    : __fmaf_rn(uf, sc.step[t], sc.bs[t]);
          const int row = row0 + t - ptok0;
          *(uint16_t *)(tile + kv_tile_off<HD>(row, d[l] >> 3) + (d[l] & 7) * 2) = to_bits<T>(v);
        }
      }
    }
  }
  bool ok = true;
  if (steps == per_lane) {
#pragma unroll
    for (int l = 0; l < LPT; l++)
      ok &= widx[l] * 32 + used[l] == sc.lane_start[pt + 64 * l + 1];
  }
  return ok;
}

/*
 * Decodes tokens [ptok0, ptok0 + nrows) of a quantized section (bit-pack or Huffman) of a page
 * with n_tokens tokens into tile rows row0.. . `sec` (16-byte aligned, shared) holds sec_bytes.
 * Returns false, in every thread of the pair, for a section inconsistent with the format. The
 * caller synchronizes the readers of the tile with its writers. PARTS pairs share the section,
 * this one being `part`: each reads the header and builds the tables in its own scratch, then
 * writes its share (bit-pack: a range of the rows; Huffman: a range of the lanes of a whole
 * 64-token page, and otherwise part 0 all of it).
 */
template <int HD, class T, int PARTS>
__device__ bool decode_quant(const uint8_t *sec, uint32_t sec_bytes, int codec, int tensor,
                             int n_tokens, int ptok0, int nrows, int row0, uint8_t *tile,
                             const scratch &sc, int pt, int bar, int part) {
  typedef scratch_layout<HD> SL;
  const int S = n_tokens * HD;
  pair_sync(bar); /* the previous section's readers are done with the scratch */
  bool bad = false, h2_bad = false;
  bool ok = sec_bytes >= KVC_QSEC_HEADER_BYTES + 4 && sec_bytes % 4 == 0 && n_tokens >= 1 &&
            n_tokens <= kMaxBlockTokens && ptok0 >= 0 && ptok0 + nrows <= n_tokens;
  kvc_qsec_header_t qh;
  if (ok) {
    qsec_header_load(sec, &qh);
    ok = qh.mode <= KVC_QMODE_ABS && qh.w_e <= 16 && qh.w_b <= 31 &&
         qh.e_min >= KVC_STEP_CODE_MIN && qh.e_min <= KVC_STEP_CODE_MAX &&
         (qh.mode == KVC_QMODE_REL || qh.w_e == 0);
  }
  if (!ok) return false; /* uniform: every thread computed the same from the same bytes */
  const uint32_t *w = (const uint32_t *)(sec + KVC_QSEC_HEADER_BYTES);
  const uint32_t nwords = (sec_bytes - KVC_QSEC_HEADER_BYTES) / 4, last = nwords - 1;
  const uint64_t cap = (uint64_t)nwords * 32;
  const bool rel = qh.mode == KVC_QMODE_REL;
  const int G = rel ? (tensor == 0 ? HD : n_tokens) : HD;
  const uint32_t pos_b = rel ? (uint32_t)G * qh.w_e : 0;
  const uint64_t meta = (uint64_t)pos_b + (uint64_t)G * qh.w_b;
  if (meta > cap || G > SL::groups) return false;
  for (int g = pt; g < G; g += 64) {
    sc.base[g] = (int32_t)((uint32_t)qh.b_min +
                           kvc_dev_top(kvc_dev_window(w, last, pos_b + (uint32_t)g * qh.w_b),
                                       qh.w_b));
    if (rel) {
      int e = qh.e_min + (int)kvc_dev_top(kvc_dev_window(w, last, (uint32_t)g * qh.w_e), qh.w_e);
      bad |= e > KVC_STEP_CODE_MAX;
      sc.step[g] = kvc_step_from_code(min(e, KVC_STEP_CODE_MAX));
      sc.bs[g] = __fmul_rn((float)sc.base[g], sc.step[g]);
      /* fp16 holds the step exactly and the addend closely only in its normal range */
      h2_bad |= sizeof(T) == 2 && half2_of<T>::magic == 0x64006400u &&
                !(sc.step[g] >= 0x1p-14f && sc.step[g] <= 32768.f && fabsf(sc.bs[g]) <= 60000.f);
    }
  }
  const float abs_step = kvc_step_from_code(qh.e_min);
  const int mode = rel ? tensor : 2;
  /* The fast paths' FMA is exact when every base has at most 18 significant bits. */
  const bool exact = rel && qh.b_min > -(1 << 18) &&
                     (int64_t)qh.b_min + ((int64_t)1 << qh.w_b) <= (int64_t)1 << 18;

  if (codec == KVC_CODEC_BITPACK) {
    const bool paired = kvc_bp_paired(tensor, HD);
    const uint32_t start = kvc_bp_start((uint32_t)meta, paired);
    if (qh.width > KVC_Q_MAX_BITS || qh.n_lanes != 0 ||
        start + kvc_bp_code_bits(n_tokens, HD, qh.width, paired) > cap)
      return false;
    const bp_rows br = {w, last, start, (uint32_t)HD * qh.width, paired};
    if (pair_any(bad, bar)) return false;
    const int ra = nrows * part / PARTS, rb = nrows * (part + 1) / PARTS;
    ptok0 += ra;
    row0 += ra;
    nrows = rb - ra;
    /* fp16 tiles only: bf16's 8-bit significand would add up to an ulp of noise to values the
     * float path rounds exactly. */
    const bool f16 = half2_of<T>::magic == 0x64006400u;
    if (f16 && rel && qh.width <= 8 && !pair_any(h2_bad, bar)) {
      switch (qh.width) {
#define KVC__W(W)                                                                                  \
  case W:                                                                                          \
    if (mode == 0)                                                                                 \
      bitpack_rows_h2<HD, T, 0, W>(sc, br, ptok0, nrows, row0, tile, pt);                          \
    else                                                                                           \
      bitpack_rows_h2<HD, T, 1, W>(sc, br, ptok0, nrows, row0, tile, pt);                          \
    break;
        KVC__W(0) KVC__W(1) KVC__W(2) KVC__W(3) KVC__W(4) KVC__W(5) KVC__W(6) KVC__W(7) KVC__W(8)
#undef KVC__W
      }
    } else if (exact && qh.width <= 8) {
      if (mode == 0)
        bitpack_rows_fast_w<HD, T, 0>(sc, br, qh.width, ptok0, nrows, row0, tile, pt);
      else
        bitpack_rows_fast_w<HD, T, 1>(sc, br, qh.width, ptok0, nrows, row0, tile, pt);
    } else if (mode == 0)
      bitpack_rows<HD, T, 0>(sc, abs_step, br, qh.width, ptok0, nrows, row0, tile, pt);
    else if (mode == 1)
      bitpack_rows<HD, T, 1>(sc, abs_step, br, qh.width, ptok0, nrows, row0, tile, pt);
    else
      bitpack_rows<HD, T, 2>(sc, abs_step, br, qh.width, ptok0, nrows, row0, tile, pt);
    return true;
  }
  if (codec != KVC_CODEC_HUFFMAN) return false;

  /* Huffman: code lengths, canonical table (only as many index bits as the longest code), lanes. */
  const int n_sym = qh.width, n_lanes = qh.n_lanes;
  const uint32_t w_lane = qh.lane_info >> 27, lane_min = qh.lane_info & ((1u << 27) - 1);
  const uint64_t lens_pos = meta, lanes_pos = meta + 4u * (uint32_t)n_sym;
  const uint64_t stream_pos = lanes_pos + (uint64_t)n_lanes * w_lane;
  if (n_sym < 1 || n_sym > KVC_SYM_COUNT || n_lanes < 1 || n_lanes > SL::lanes || n_lanes > S ||
      stream_pos > cap)
    return false;
  /* Every symbol direct (below 32, no extra bits), lanes on fixed channels, 64 symbols each. */
  const int lpt = n_lanes / 64;
  const bool fast = exact && n_sym <= KVC_SYM_DIRECT && n_lanes % 64 == 0 && n_lanes % HD == 0 &&
                    n_lanes * KVC_LANE_SYMBOLS == S && (lpt == 1 || lpt == 2 || lpt == 4);
  const int wp = pt >> 5, ln = pt & 31;
  const uint32_t len =
      pt < n_sym ? kvc_dev_top(kvc_dev_window(w, last, (uint32_t)lens_pos + 4 * pt), 4) : 0u;
  bad |= len > KVC_HUF_MAX_LEN;
  /* Rank of this symbol among the symbols of its length, in symbol order, per warp. */
  const uint32_t same = __match_any_sync(0xffffffffu, len);
  const uint32_t below = same & ((1u << ln) - 1u);
  if (ln < 16) sc.cnt[wp * 16 + ln] = 0;
  __syncwarp();
  if (below == 0 && len <= KVC_HUF_MAX_LEN) sc.cnt[wp * 16 + len] = __popc(same);
  pair_sync(bar);
  uint32_t kraft = 0, first = 0;
  int lmax = 0;
  for (int l = 1; l <= KVC_HUF_MAX_LEN; l++) {
    const uint32_t c = (uint32_t)(sc.cnt[l] + sc.cnt[16 + l]);
    if ((uint32_t)l < len) first += c << (KVC_HUF_MAX_LEN - l);
    kraft += c << (KVC_HUF_MAX_LEN - l);
    if (c) lmax = l;
  }
  const bool single = kraft == 0; /* one symbol (n_sym - 1), coded with no bits */
  if (!single && kraft != KVC_HUF_TABLE_SIZE) return false;
  /* Table: the thread of each code fills its range, 2^(lmax - len) entries from the code's
   * canonical start (a multiple of the range's size, so 16-byte stores from 4 entries on). The
   * pair_any below orders the fill before the decoders' reads. */
  if (len > 0 && len <= KVC_HUF_MAX_LEN) {
    const uint32_t rank = (uint32_t)__popc(below) + (wp ? (uint32_t)sc.cnt[len] : 0u);
    const uint32_t start = first + (rank << (KVC_HUF_MAX_LEN - len));
    const uint32_t a = start >> (KVC_HUF_MAX_LEN - lmax), n = 1u << (lmax - len);
    const uint32_t ent =
        fast ? fast_huf_entry((uint32_t)pt, len) : kvc_huf_entry((uint32_t)pt, len);
    if (n >= 4) {
      for (uint32_t i = 0; i < n; i += 4)
        *(uint4 *)(sc.table + a + i) = make_uint4(ent, ent, ent, ent);
    } else {
      sc.table[a] = ent;
      if (n == 2) sc.table[a + 1] = ent;
    }
  }
  if (single && pt == 0)
    sc.table[0] = fast ? fast_huf_entry((uint32_t)n_sym - 1, 0)
                       : kvc_huf_entry((uint32_t)n_sym - 1, 0);
  /* Lane starts: exclusive scan of the lane lengths (each thread a contiguous run of lanes). */
  const int per = (n_lanes + 63) / 64, lo = min(n_lanes, pt * per), hi = min(n_lanes, lo + per);
  uint32_t sum = 0;
  for (int i = lo; i < hi; i++)
    sum += lane_min +
           kvc_dev_top(kvc_dev_window(w, last, (uint32_t)lanes_pos + i * w_lane), w_lane);
  uint32_t incl = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    uint32_t v = __shfl_up_sync(0xffffffffu, incl, o);
    if (ln >= o) incl += v;
  }
  /* The carry has a slot of its own: the length counts above may still be being read (with
   * vector loads that cover cnt[0]) by the other warp. */
  if (wp == 0 && ln == 31) sc.cnt[32] = (int32_t)incl;
  pair_sync(bar);
  const uint32_t carry = wp ? (uint32_t)sc.cnt[32] : 0u;
  uint32_t run = (uint32_t)stream_pos + carry + incl - sum;
  for (int i = lo; i < hi; i++) {
    sc.lane_start[i] = run;
    run += lane_min +
           kvc_dev_top(kvc_dev_window(w, last, (uint32_t)lanes_pos + i * w_lane), w_lane);
  }
  if (hi == n_lanes && lo < hi) {
    sc.lane_start[n_lanes] = run;
    bad |= (uint64_t)run > cap;
  }
  if (pair_any(bad, bar)) return false;
  bool lanes_ok;
  if (fast && n_lanes == HD && n_tokens == kUnitTokens && ptok0 == 0 && nrows == kUnitTokens &&
      row0 == 0) {
    constexpr int NL = HD / PARTS, L64 = NL >= 64 ? NL / 64 : 1;
    lanes_ok = mode == 0
                   ? huffman_rows_fast64<HD, T, 0, L64>(sc, w, last, lmax, tile, pt, part * NL, NL)
                   : huffman_rows_fast64<HD, T, 1, L64>(sc, w, last, lmax, tile, pt, part * NL, NL);
  } else if (part != 0) {
    lanes_ok = true;
  } else if (fast) {
#define KVC__FAST(MODE, LPT)                                                                       \
  huffman_rows_fast<HD, T, MODE, LPT>(sc, w, last, n_lanes, lmax, S, ptok0, nrows, row0, tile, pt)
    if (mode == 0)
      lanes_ok = lpt == 1 ? KVC__FAST(0, 1) : lpt == 2 ? KVC__FAST(0, 2) : KVC__FAST(0, 4);
    else
      lanes_ok = lpt == 1 ? KVC__FAST(1, 1) : lpt == 2 ? KVC__FAST(1, 2) : KVC__FAST(1, 4);
#undef KVC__FAST
  } else if (mode == 0)
    lanes_ok = huffman_rows<HD, T, 0>(sc, abs_step, w, last, n_lanes, lmax, S, ptok0, nrows, row0,
                                      tile, pt);
  else if (mode == 1)
    lanes_ok = huffman_rows<HD, T, 1>(sc, abs_step, w, last, n_lanes, lmax, S, ptok0, nrows, row0,
                                      tile, pt);
  else
    lanes_ok = huffman_rows<HD, T, 2>(sc, abs_step, w, last, n_lanes, lmax, S, ptok0, nrows, row0,
                                      tile, pt);
  return !pair_any(!lanes_ok, bar);
}

}  // namespace kvc_attn

#endif /* KVC_ATTN_DECODE_CUH */
