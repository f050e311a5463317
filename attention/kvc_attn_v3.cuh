/*
 * Decode kernel v3 (CUDA C++; part of kvc_attn_cuda.cu, included after the producer and the v2
 * consumers, whose params, unit descriptors, PTX wrappers and producer it shares).
 *
 * For launches whose query tile is one 16-entry tile (decode) over pages without Huffman coding
 * (kvc_attn_args_t.codec_mask), head_dim 64 and 128. Two CTAs per SM, each the producer warp of v2
 * (issuing one bulk copy per section and chunk instead of 16-byte cp.async per lane, so every unit
 * lands as linear sections and rows) and kW3 consumer warps over a ring of ~85 KiB with kSlots3
 * units in flight. Consumer warp w takes units w, w + kW3, ... on its own: no CTA barrier in the
 * loop, a unit's "empty" barrier counts the 32 lanes of one warp, and the warps' (m, l, O) meet in
 * the epilogue as in v2.
 *
 * A warp attends to its unit 16 tokens at a time, with the K and V operands of mma.sync built in
 * registers straight from the ring bytes, never through a shared tile:
 *   - S = Q K^T (m16n8k16; M = the 16 query entries, K = channels, N = 8 tokens): lane (g, j)
 *     (g = lane / 4, j = lane % 4) supplies token g's channels [j HD/4, (j + 1) HD/4). Its k-slots
 *     pair channel i with i + 8 inside each run of 16 (see k_channel); the Q A-fragments, built
 *     once per CTA in qfrag, use the same permutation, so the sum over channels is unchanged.
 *   - O += P V (K = tokens, N = 8 channels): lane (g, c) supplies tokens 2c, 2c+1, 2c+8, 2c+9 of
 *     the 16 (the order of the S accumulators, as in v2) at channels g HD/8 + nb, nb = 0..HD/8-1
 *     (one n-block each); O's accumulators are therefore in permuted channel order, undone when
 *     the epilogue writes them (v_channel).
 * Operand sources (per page and tensor, warp-uniform):
 *   SRC_ROWS  staging / RAW rows of a page, linear in the ring: LDS.128 + one PRMT per pair.
 *   SRC_FAST  bit-pack, relative mode, width 1..8, fp16, every step and base*step a normal fp16:
 *             a lane loads its codes of a token as one run of 32-bit words (realigned by a funnel
 *             shift), a PRMT puts the two codes of a pair (equal bit offset mod 8) into the two
 *             halves, one shift + LOP3 adds the fp16 exponent of 1024 (0x6400 | u == 1024 + u),
 *             HSUB2 makes the codes exact halves and HFMA2 applies step and base*step (K: per
 *             channel pair, V: per token pair): the v2 fast decoder's arithmetic, so the values
 *             are those of v2's fp16 tiles.
 *   SRC_GEN   every other bit-pack section (absolute mode, width 0 or > 8, bf16, steps outside
 *             fp16): each value decoded on its own exactly as the CPU decoder does, rounded to T.
 * A Huffman page makes the unit's rows NaN (the launcher keeps such batches on v2).
 */
#ifndef KVC_ATTN_V3_CUH
#define KVC_ATTN_V3_CUH

namespace kvc_attn {

/* Consumer warps per CTA. Two CTAs per SM (two producers: one producer warp's serial per-unit
 * work was the limit at one CTA per SM), 12 warps: three per SM sub-partition, which caps
 * registers at 168 per thread (16384 / (3 * 32)). */
constexpr int kW3 = 5;
constexpr int kThreads3 = 32 * (kW3 + 1); /* + the producer warp */
constexpr int kSlots3 = 10;               /* units in flight at most (a multiple of kW3) */
static_assert(kSlots3 % kW3 == 0, "a slot must always come back to the same warp");

enum : int { SRC_ROWS = 0, SRC_FAST, SRC_GEN, SRC_BAD };

/* SRC_FAST is built for fp16 only. */
template <class T> constexpr bool kFast16 = half2_of<T>::magic == 0x64006400u;

/* Per-warp scratch (bytes): group bases and steps of the current page's K and V sections, and the
 * fast path's fp16 pairs (K: [4 lanes j][HD/8 pairs], V: per token). */
struct v3_scratch {
  static constexpr int kbase = 0, kstep = 512, vbase = 1024, vstep = 1536;
  static constexpr int kst2 = 2048, kbs2 = 2304, vst = 2560, vbs = 2816;
  static constexpr int bytes = 3072;
};

template <int HD> struct v3_layout {
  static_assert(HD == 64 || HD == 128, "v3 is built for head_dim 64 and 128");
  static constexpr int RB = 2 * HD;
  static constexpr int tile = kUnitTokens * RB;
  static constexpr int slots = kSlots3;
  static constexpr bool bulk = true; /* bulk copies; every unit lands as linear sections / rows */
  static constexpr int ring = (HD == 64 ? 88 : 82) * 1024;
  static constexpr int qtile_off = ring;
  static constexpr int qfrag_off = qtile_off + 16 * RB;         /* [HD/16 k-blocks][32 lanes] uint4 */
  static constexpr int desc_off = qfrag_off + (HD / 16) * 32 * 16;
  static constexpr int meta_off = desc_off + slots * (int)sizeof(unit_desc);
  static constexpr int chunks_off = meta_off + kBatch * (int)sizeof(page_meta);
  static constexpr int scr_off = align_up(chunks_off + kBatch * KVC_PAGE_MAX_CHUNKS * 4, 128);
  static constexpr int bar_off = scr_off + kW3 * v3_scratch::bytes;
  static constexpr int bytes = bar_off + 2 * slots * 8;
  static_assert(kW3 * 16 * (HD + 2) * 4 <= ring, "epilogue does not fit the ring");
  static_assert(2 * tile <= ring && 2 * kMaxBlockTokens * RB <= ring, "a unit must fit the ring");
  static_assert(2 * (bytes + 1024) <= 233472, "two CTAs per SM do not fit");
  static_assert(HD / 2 * 4 <= v3_scratch::kbs2 - v3_scratch::kst2, "scratch pairs");
};

/* Channel of k-slot `hi` (0: low half, 1: high half) of pair pi (b register pi % 2 of k-block
 * pi / 2) supplied by lane j in S = Q K^T. */
template <int HD> __device__ __forceinline__ int k_channel(int j, int pi, int hi) {
  return j * (HD / 4) + 16 * (pi / 8) + pi % 8 + 8 * hi;
}
/* Channel of n-slot n of n-block nb in O += P V. */
template <int HD> __device__ __forceinline__ int v_channel(int nb, int n) {
  return n * (HD / 8) + nb;
}

/*
 * Codes i1 (from words x) and i2 (from words y) of two runs of W-bit codes, each run held most
 * significant bit first in realigned words, as the low and high halves of the result (other bits
 * 0). The two codes' bit offsets must be equal modulo 8. Indices are compile-time constants after
 * unrolling, so this is one PRMT, a shift and an AND (and a funnel shift for a code that crosses a
 * word, shared by neighbouring codes). The PRMT takes the 16-bit half of each word that holds the
 * code where it can (else the two bytes from the code's lowest), so that the codes of one half
 * share it.
 */
template <int W, int NA>
__device__ __forceinline__ uint32_t code_pair(const uint32_t (&x)[NA], const uint32_t (&y)[NA],
                                              int i1, int i2) {
  const int o1 = i1 * W, o2 = i2 * W, q1 = o1 >> 5, f1 = o1 & 31, q2 = o2 >> 5, f2 = o2 & 31;
  const bool c1 = f1 + W > 32, c2 = f2 + W > 32;
  const uint32_t X = c1 ? __funnelshift_l(x[min(q1 + 1, NA - 1)], x[q1], 16) : x[q1];
  const uint32_t Y = c2 ? __funnelshift_l(y[min(q2 + 1, NA - 1)], y[q2], 16) : y[q2];
  const int L1 = (c1 ? 48 : 32) - f1 - W, L2 = (c2 ? 48 : 32) - f2 - W; /* lsb positions */
  const bool half = (L1 & 15) + W <= 16 && (L2 & 15) + W <= 16 && ((L1 - L2) & 15) == 0;
  const int k1 = half ? (L1 >> 4) * 2 : L1 >> 3, k2 = half ? (L2 >> 4) * 2 : L2 >> 3;
  const int r = L1 - 8 * k1;
  const uint32_t sel = (uint32_t)(k1 | (min(k1 + 1, 3) << 4) | ((k2 + 4) << 8) |
                                  ((min(k2 + 1, 3) + 4) << 12));
  return (__byte_perm(X, Y, sel) >> r) & (((1u << W) - 1u) * 0x10001u);
}

/* Words [k0, k0 + NA] of a section's stream shifted left by sh: the NA words of a bit run. */
template <int NA>
__device__ __forceinline__ void load_run(const uint32_t *w, uint32_t last, uint32_t start,
                                         uint32_t (&a)[NA]) {
  const uint32_t k0 = start >> 5, sh = start & 31;
  uint32_t prev = w[min(k0, last)];
#pragma unroll
  for (int m = 0; m < NA; m++) {
    const uint32_t nx = w[min(k0 + m + 1, last)];
    a[m] = __funnelshift_l(nx, prev, sh);
    prev = nx;
  }
}

/* A quantized section of the current page, as the operand builders read it. */
struct v3_sec {
  const uint32_t *w;
  uint32_t last, meta;
  int width, mode; /* mode: 0 REL keys (groups = channels), 1 REL values (tokens), 2 ABS */
};

/*
 * Reads the header of a quantized section (sec, sec_bytes in the ring) of a page of n_tokens, and
 * fills the warp's scratch with what the builders need for page tokens [t_lo, t_hi): group bases
 * and steps (every source), and for SRC_FAST the fp16 pairs. Warp-cooperative; returns the source
 * kind (SRC_FAST, SRC_GEN or SRC_BAD for a section inconsistent with the format), the same in
 * every lane. The scratch of `tensor` is rewritten: the caller's earlier reads of it must be done.
 */
template <int HD, class T>
__device__ int v3_setup_section(const uint8_t *sec, uint32_t sec_bytes, int tensor, int n_tokens,
                                int t_lo, int t_hi, uint8_t *scr, v3_sec &s) {
  const int lane = threadIdx.x & 31;
  if (!(sec_bytes >= KVC_QSEC_HEADER_BYTES + 4 && sec_bytes % 4 == 0 && n_tokens >= 1 &&
        n_tokens <= kMaxBlockTokens && 0 <= t_lo && t_lo < t_hi && t_hi <= n_tokens))
    return SRC_BAD;
  kvc_qsec_header_t qh;
  kvc_qsec_header_read(sec, &qh);
  if (!(qh.mode <= KVC_QMODE_ABS && qh.w_e <= 16 && qh.w_b <= 31 &&
        qh.e_min >= KVC_STEP_CODE_MIN && qh.e_min <= KVC_STEP_CODE_MAX &&
        (qh.mode == KVC_QMODE_REL || qh.w_e == 0) && qh.width <= KVC_Q_MAX_BITS && qh.n_lanes == 0))
    return SRC_BAD;
  s.w = (const uint32_t *)(sec + KVC_QSEC_HEADER_BYTES);
  const uint32_t nwords = (sec_bytes - KVC_QSEC_HEADER_BYTES) / 4;
  s.last = nwords - 1;
  const bool rel = qh.mode == KVC_QMODE_REL;
  const int G = rel ? (tensor == 0 ? HD : n_tokens) : HD;
  const uint32_t pos_b = rel ? (uint32_t)G * qh.w_e : 0u;
  const uint64_t meta = (uint64_t)pos_b + (uint64_t)G * qh.w_b;
  if (meta + (uint64_t)n_tokens * HD * qh.width > (uint64_t)nwords * 32) return SRC_BAD;
  s.meta = (uint32_t)meta;
  s.width = qh.width;
  s.mode = rel ? tensor : 2;
  int32_t *gb = (int32_t *)(scr + (tensor ? v3_scratch::vbase : v3_scratch::kbase));
  float *gs = (float *)(scr + (tensor ? v3_scratch::vstep : v3_scratch::kstep));
  const bool per_token = rel && tensor == 1;
  const int g_lo = per_token ? t_lo : 0, g_hi = per_token ? t_hi : HD;
  const float abs_step = kvc_step_from_code(qh.e_min);
  bool bad = false;
  for (int g = g_lo + lane; g < g_hi; g += 32) {
    gb[g] = (int32_t)((uint32_t)qh.b_min +
                      kvc_dev_top(kvc_dev_window(s.w, s.last, pos_b + (uint32_t)g * qh.w_b), qh.w_b));
    if (rel) {
      const int e =
          qh.e_min + (int)kvc_dev_top(kvc_dev_window(s.w, s.last, (uint32_t)g * qh.w_e), qh.w_e);
      bad |= e > KVC_STEP_CODE_MAX;
      gs[g] = kvc_step_from_code(min(e, KVC_STEP_CODE_MAX));
    } else {
      gs[g] = abs_step;
    }
  }
  if (__any_sync(0xffffffffu, bad)) return SRC_BAD;
  /* fp16 only (bf16's 8-bit significand would add an ulp of noise that v2's float path avoids);
   * width 0 is a constant section, cheap on the generic path. */
  if (!(rel && qh.width >= 1 && qh.width <= 8 && kFast16<T>)) return SRC_GEN;
  __syncwarp();
  bool h2_bad = false;
  /* fp16 holds a step exactly and base * step closely only in its normal range (as in v2). */
  auto h2_ok = [](float st, float bs) {
    return st >= 0x1p-14f && st <= 32768.f && fabsf(bs) <= 60000.f;
  };
  if (tensor == 0) {
    uint32_t *st2 = (uint32_t *)(scr + v3_scratch::kst2), *bs2 = (uint32_t *)(scr + v3_scratch::kbs2);
    for (int p = lane; p < HD / 2; p += 32) {
      const int j = p / (HD / 8), pi = p % (HD / 8);
      const int c0 = k_channel<HD>(j, pi, 0), c1 = k_channel<HD>(j, pi, 1);
      const float s0 = gs[c0], s1 = gs[c1];
      const float b0 = __fmul_rn((float)gb[c0], s0), b1 = __fmul_rn((float)gb[c1], s1);
      h2_bad |= !h2_ok(s0, b0) || !h2_ok(s1, b1);
      st2[p] = pack2<__half>(s0, s1);
      bs2[p] = pack2<__half>(b0, b1);
    }
  } else {
    uint16_t *vst = (uint16_t *)(scr + v3_scratch::vst), *vbs = (uint16_t *)(scr + v3_scratch::vbs);
    for (int t = t_lo + lane; t < t_hi; t += 32) {
      const float st = gs[t], bs = __fmul_rn((float)gb[t], st);
      h2_bad |= !h2_ok(st, bs);
      vst[t] = to_bits<__half>(st);
      vbs[t] = to_bits<__half>(bs);
    }
  }
  return __any_sync(0xffffffffu, h2_bad) ? SRC_GEN : SRC_FAST;
}

/* The exact value of code (t, d) of a section, as the CPU decoder computes it. */
__device__ __forceinline__ float v3_gen_value(const v3_sec &s, const int32_t *gb, const float *gs,
                                              int HD, int t, int d) {
  const uint32_t u =
      kvc_dev_top(kvc_dev_window(s.w, s.last, s.meta + (uint32_t)(t * HD + d) * s.width),
                  (uint32_t)s.width);
  const int g = s.mode == 1 ? t : d;
  const uint32_t b = (uint32_t)gb[g] + (s.mode == 2 ? (uint32_t)kvc_unzigzag(u) : u);
  return __fmul_rn(__int2float_rn((int)b), gs[g]);
}

/* ---- S = Q K^T: s[h] for tokens (page rows) pt[h], h = 0, 1 ------------------------------- */

/* s += Q K^T for one n-block, K operands kf in k_channel order; qfrag: this lane's A fragments. */
template <int HD, class T>
__device__ __forceinline__ void s_mma(const uint4 *qfrag, const uint32_t (&kf)[HD / 8],
                                      float (&s)[4]) {
#pragma unroll
  for (int kb = 0; kb < HD / 16; kb++) {
    const uint4 qa = qfrag[32 * kb];
    const uint32_t a[4] = {qa.x, qa.y, qa.z, qa.w};
    mma16816<T>(s, a, kf[2 * kb], kf[2 * kb + 1]);
  }
}

/* Rows of T starting at row[h]; both tokens at once, half a lane's channels (two 16-byte pieces
 * per token, k-blocks [8 gh, 8 gh + 8) / 2) at a time. */
template <int HD, class T>
__device__ __forceinline__ void s_rows(const uint8_t *const (&row)[2], int j, const uint4 *qfrag,
                                       float (&s)[2][4]) {
  constexpr int NP = HD / 32; /* 16-byte pieces of a lane's HD/4 channels: 2 per run of 16 */
#pragma unroll
  for (int gh = 0; gh < NP / 2; gh++) {
    uint32_t wd[2][8];
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
      for (int pc = 0; pc < 2; pc++) {
        const uint4 v = *(const uint4 *)(row[h] + ((j * NP + 2 * gh + pc) << 4));
        wd[h][4 * pc] = v.x;
        wd[h][4 * pc + 1] = v.y;
        wd[h][4 * pc + 2] = v.z;
        wd[h][4 * pc + 3] = v.w;
      }
#pragma unroll
    for (int kb = 4 * gh; kb < 4 * gh + 4; kb++) {
      const uint4 qa = qfrag[32 * kb];
      const uint32_t qf[4] = {qa.x, qa.y, qa.z, qa.w};
#pragma unroll
      for (int h = 0; h < 2; h++) {
        uint32_t b[2];
#pragma unroll
        for (int x = 0; x < 2; x++) {
          const int c = (2 * kb + x) % 8; /* channel of the low half in the run of 16 */
          b[x] = __byte_perm(wd[h][c / 2], wd[h][c / 2 + 4], c % 2 ? 0x7632 : 0x5410);
        }
        mma16816<T>(s[h], qf, b[0], b[1]);
      }
    }
  }
}

/* Both tokens at once, k-block by k-block: one A fragment and two step / addend pairs live at a
 * time, and the two accumulators' mma chains interleave. */
template <int HD, int W>
__device__ __forceinline__ void s_fast(const v3_sec &sec, const uint8_t *scr, int j,
                                       const int (&pt)[2], const uint4 *qfrag, float (&s)[2][4]) {
  constexpr int NC = HD / 4, NA = (NC * W + 31) / 32;
  const uint2 *st2 = (const uint2 *)(scr + v3_scratch::kst2) + j * (HD / 16);
  const uint2 *bs2 = (const uint2 *)(scr + v3_scratch::kbs2) + j * (HD / 16);
  const __half2 magic = as_h2<__half2>(0x64006400u);
  uint32_t a[2][NA];
  load_run<NA>(sec.w, sec.last, sec.meta + (uint32_t)(pt[0] * HD + j * NC) * W, a[0]);
  load_run<NA>(sec.w, sec.last, sec.meta + (uint32_t)(pt[1] * HD + j * NC) * W, a[1]);
#pragma unroll
  for (int kb = 0; kb < HD / 16; kb++) {
    const uint4 qa = qfrag[32 * kb];
    const uint32_t qf[4] = {qa.x, qa.y, qa.z, qa.w};
    const uint2 st = st2[kb], bs = bs2[kb];
#pragma unroll
    for (int h = 0; h < 2; h++) {
      uint32_t b[2];
#pragma unroll
      for (int x = 0; x < 2; x++) {
        const int pi = 2 * kb + x, c = 16 * (pi / 8) + pi % 8;
        const uint32_t u2 = code_pair<W, NA>(a[h], a[h], c, c + 8) | 0x64006400u;
        b[x] = h2_bits<__half2>(__hfma2(__hsub2(as_h2<__half2>(u2), magic),
                                        as_h2<__half2>(x ? st.y : st.x),
                                        as_h2<__half2>(x ? bs.y : bs.x)));
      }
      mma16816<__half>(s[h], qf, b[0], b[1]);
    }
  }
}

/* The generic path is rare (non-default sections): k-block by k-block, not unrolled, so that it
 * adds no register pressure to the kernel's fast paths. */
template <int HD, class T>
__device__ __forceinline__ void s_gen(const v3_sec &sec, const uint8_t *scr, int j,
                                      const int (&pt)[2], const uint4 *qfrag, float (&s)[2][4]) {
  const int32_t *gb = (const int32_t *)(scr + v3_scratch::kbase);
  const float *gs = (const float *)(scr + v3_scratch::kstep);
#pragma unroll 1
  for (int kb = 0; kb < HD / 16; kb++) {
    const uint4 qa = qfrag[32 * kb];
    const uint32_t qf[4] = {qa.x, qa.y, qa.z, qa.w};
#pragma unroll
    for (int h = 0; h < 2; h++) {
      uint32_t b[2];
#pragma unroll
      for (int x = 0; x < 2; x++)
        b[x] = pack2<T>(v3_gen_value(sec, gb, gs, HD, pt[h], k_channel<HD>(j, 2 * kb + x, 0)),
                        v3_gen_value(sec, gb, gs, HD, pt[h], k_channel<HD>(j, 2 * kb + x, 1)));
      mma16816<T>(s[h], qf, b[0], b[1]);
    }
  }
}

/* ---- PV: O += P V for the 16 tokens, tokens pt[0..3] = (2c, 2c+1, 2c+8, 2c+9) -------------- */

template <int HD, class T>
__device__ __forceinline__ void pv_rows(const uint8_t *const (&row)[4], int g, const uint32_t (&pa)[4],
                                        float (&o)[HD / 8][4]) {
  constexpr int NP = HD / 64; /* 16-byte pieces of a lane's HD/8 channels */
#pragma unroll
  for (int pc = 0; pc < NP; pc++) {
    uint32_t wd[4][4];
#pragma unroll
    for (int t = 0; t < 4; t++) {
      const uint4 v = *(const uint4 *)(row[t] + ((g * NP + pc) << 4));
      wd[t][0] = v.x;
      wd[t][1] = v.y;
      wd[t][2] = v.z;
      wd[t][3] = v.w;
    }
#pragma unroll
    for (int nb = 8 * pc; nb < 8 * pc + 8; nb++) {
      const uint32_t sel = nb % 2 ? 0x7632 : 0x5410;
      const int wi = (nb % 8) / 2;
      mma16816<T>(o[nb], pa, __byte_perm(wd[0][wi], wd[1][wi], sel),
                  __byte_perm(wd[2][wi], wd[3][wi], sel));
    }
  }
}

template <int HD, int W>
__device__ __forceinline__ void pv_fast(const v3_sec &s, const uint8_t *scr, int g,
                                        const int (&pt)[4], const uint32_t (&pa)[4],
                                        float (&o)[HD / 8][4]) {
  constexpr int NC = HD / 8, NA = (NC * W + 31) / 32;
  const uint16_t *vst = (const uint16_t *)(scr + v3_scratch::vst);
  const uint16_t *vbs = (const uint16_t *)(scr + v3_scratch::vbs);
  const __half2 st01 = as_h2<__half2>((uint32_t)vst[pt[0]] | ((uint32_t)vst[pt[1]] << 16));
  const __half2 st23 = as_h2<__half2>((uint32_t)vst[pt[2]] | ((uint32_t)vst[pt[3]] << 16));
  const __half2 bs01 = as_h2<__half2>((uint32_t)vbs[pt[0]] | ((uint32_t)vbs[pt[1]] << 16));
  const __half2 bs23 = as_h2<__half2>((uint32_t)vbs[pt[2]] | ((uint32_t)vbs[pt[3]] << 16));
  const __half2 magic = as_h2<__half2>(0x64006400u);
  uint32_t a[4][NA];
#pragma unroll
  for (int t = 0; t < 4; t++) load_run<NA>(s.w, s.last, s.meta + (uint32_t)(pt[t] * HD + g * NC) * W, a[t]);
#pragma unroll
  for (int nb = 0; nb < HD / 8; nb++) {
    const uint32_t u01 = code_pair<W, NA>(a[0], a[1], nb, nb) | 0x64006400u;
    const uint32_t u23 = code_pair<W, NA>(a[2], a[3], nb, nb) | 0x64006400u;
    const uint32_t b0 = h2_bits<__half2>(__hfma2(__hsub2(as_h2<__half2>(u01), magic), st01, bs01));
    const uint32_t b1 = h2_bits<__half2>(__hfma2(__hsub2(as_h2<__half2>(u23), magic), st23, bs23));
    mma16816<__half>(o[nb], pa, b0, b1);
  }
}

template <int HD, class T>
__device__ __forceinline__ void pv_gen(const v3_sec &s, const uint8_t *scr, int g,
                                       const int (&pt)[4], const uint32_t (&pa)[4],
                                       float (&o)[HD / 8][4]) {
  const int32_t *gb = (const int32_t *)(scr + v3_scratch::vbase);
  const float *gs = (const float *)(scr + v3_scratch::vstep);
#pragma unroll
  for (int nb = 0; nb < HD / 8; nb++) {
    const int d = v_channel<HD>(nb, g);
    mma16816<T>(o[nb], pa,
                pack2<T>(v3_gen_value(s, gb, gs, HD, pt[0], d), v3_gen_value(s, gb, gs, HD, pt[1], d)),
                pack2<T>(v3_gen_value(s, gb, gs, HD, pt[2], d), v3_gen_value(s, gb, gs, HD, pt[3], d)));
  }
}

/* ---- the kernel ------------------------------------------------------------------------------ */

/* Where the current page's K or V operands come from. */
struct v3_src {
  int kind;
  v3_sec sec;
  const uint8_t *rows; /* SRC_ROWS: the page's first row in the unit */
};

template <int HD, class T>
__global__ void __launch_bounds__(kThreads3, 2) attn_kernel_v3(const params p) {
  typedef v3_layout<HD> SL;
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int seq = blockIdx.z, kh = blockIdx.y;
  const int qt = blockIdx.x % p.qtiles, split = blockIdx.x / p.qtiles;
  const int q0 = p.qo_indptr[seq], nq = p.qo_indptr[seq + 1] - q0, len = p.kv_len[seq];
  const int group = p.group, entries = nq * group, e0 = qt * 16;
  if (e0 >= entries) return; /* the whole CTA: a query tile past this sequence's rows */
  const int pos_max = len - nq + (min(entries, e0 + 16) - 1) / group;
  const int units = (min(len, pos_max + 1) + kUnitTokens - 1) / kUnitTokens;
  const int u_begin = split * p.units_per_split;
  const int u_end = min(units, u_begin + p.units_per_split);
  const uint32_t bars = smem_u32(smem + SL::bar_off);
  constexpr int NS = SL::slots;

  if (tid == 0) {
    for (int i = 0; i < NS; i++) {
      mbar_init(bars + 8 * i, 32);        /* full: every producer lane */
      mbar_init(bars + 8 * (NS + i), 32); /* empty: every lane of the unit's consumer warp */
    }
  }
  load_q_tile<HD, T>(p, smem + SL::qtile_off, 16, q0, kh, e0, entries, tid, kThreads3);
  __syncthreads();
  /* Q's A fragments in the permuted channel order of k_channel, one uint4 per (k-block, lane). */
  for (int i = tid; i < (HD / 16) * 32; i += kThreads3) {
    const int kb = i / 32, ln = i % 32, g = ln >> 2, j = ln & 3;
    const uint8_t *qs = smem + SL::qtile_off;
    auto q16 = [&](int r, int d) -> uint32_t {
      return *(const uint16_t *)(qs + tile_off<HD>(r, d >> 3) + (d & 7) * 2);
    };
    uint32_t a[4];
#pragma unroll
    for (int x = 0; x < 4; x++) {
      const int r = g + 8 * (x & 1), pi = 2 * kb + (x >> 1);
      a[x] = q16(r, k_channel<HD>(j, pi, 0)) | (q16(r, k_channel<HD>(j, pi, 1)) << 16);
    }
    *(uint4 *)(smem + SL::qfrag_off + 16 * i) = make_uint4(a[0], a[1], a[2], a[3]);
  }
  __syncthreads();

  float o[HD / 8][4];
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  bool bad = false;
  if (warp == kW3) {
    producer<HD, SL>(p, smem, seq, kh, len, u_begin, u_end);
  } else {
#pragma unroll
    for (int n = 0; n < HD / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    const int g = lane >> 2, c = lane & 3;
    /* Entries past the rows attend like the last row; their output is never written. */
    const int er0 = e0 + g, er1 = er0 + 8;
    const int pos0 = len - nq + (er0 < entries ? er0 / group : nq - 1);
    const int pos1 = len - nq + (er1 < entries ? er1 / group : nq - 1);
    const int pos_warp = __reduce_max_sync(0xffffffffu, max(pos0, pos1));
    const unit_desc *descs = (const unit_desc *)(smem + SL::desc_off);
    uint8_t *scr = smem + SL::scr_off + warp * v3_scratch::bytes;
    const uint4 *qfrag = (const uint4 *)(smem + SL::qfrag_off) + lane;
    const int ubt = min(p.block_tokens, kUnitTokens); /* rows of a unit per page */
    for (int k = warp; u_begin + k < u_end; k += kW3) {
      const int slot = k % NS, token0 = (u_begin + k) * kUnitTokens;
      mbar_wait(bars + 8 * slot, (uint32_t)(k / NS) & 1u);
      const unit_desc *d = &descs[slot];
      const int32_t flags = d->flags;
      const int n_valid = d->n_valid;
      const uint8_t *ub = smem + d->ring_off;
      bool ok = !(flags & UNIT_BAD);
      v3_src ks = {SRC_BAD, {NULL, 0, 0, 0, 0}, NULL}, vs = ks;
      int cur = -1;
      for (int b = 0; ok && b < kUnitTokens / 16; b++) {
        const int tb = 16 * b;
        if (tb >= n_valid || token0 + tb > pos_warp) break; /* nothing visible from here on */
        const int q = tb / ubt;
        const unit_page pg = d->pages[q];
        if (q != cur) {
          cur = q;
          if (pg.cls == PG_STAGING || pg.cls == PG_RAW) {
            ks.kind = vs.kind = SRC_ROWS;
            ks.rows = ub + pg.k_ring;
            vs.rows = ub + pg.v_ring;
          } else if (pg.cls == PG_BITPACK) {
            __syncwarp(); /* the previous page's readers are done with the scratch */
            const int t_lo = pg.ptok0, t_hi = pg.ptok0 + pg.nrows;
            ks.kind = v3_setup_section<HD, T>(ub + pg.k_ring, pg.k_bytes, 0, pg.n_tokens, t_lo,
                                              t_hi, scr, ks.sec);
            vs.kind = v3_setup_section<HD, T>(ub + pg.v_ring, pg.v_bytes, 1, pg.n_tokens, t_lo,
                                              t_hi, scr, vs.sec);
            __syncwarp();
            ok = ks.kind != SRC_BAD && vs.kind != SRC_BAD;
            if (!ok) break;
          } else {
            ok = false; /* Huffman (or unknown): the launcher should not have chosen v3 */
            break;
          }
        }
        /* Unit row r of this page is page row min(r - row0, nrows - 1): rows past the page's
         * (masked below) read its last row, so that they stay finite and inside the section. */
        auto prow = [&](int r) { return min(r - pg.row0, pg.nrows - 1); };
        /* S for tokens tb + 8h + g, h = 0, 1. */
        float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        {
          const int tr[2] = {prow(tb + g), prow(tb + 8 + g)};
          if (ks.kind == SRC_ROWS) {
            const uint8_t *row[2] = {ks.rows + tr[0] * SL::RB, ks.rows + tr[1] * SL::RB};
            s_rows<HD, T>(row, c, qfrag, s);
          } else {
            const int pt[2] = {pg.ptok0 + tr[0], pg.ptok0 + tr[1]};
            if (ks.kind == SRC_GEN || !kFast16<T>) {
              s_gen<HD, T>(ks.sec, scr, c, pt, qfrag, s);
            } else if constexpr (kFast16<T>) {
              switch (ks.sec.width) {
#define KVC__KF(W)                                                                                 \
  case W:                                                                                          \
    s_fast<HD, W>(ks.sec, scr, c, pt, qfrag, s);                                                   \
    break;
                KVC__KF(1) KVC__KF(2) KVC__KF(3) KVC__KF(4) KVC__KF(5) KVC__KF(6) KVC__KF(7)
                KVC__KF(8)
#undef KVC__KF
              }
            }
          }
        }
        /* Online softmax over the 16 tokens (exp2, scale folded in). */
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
          for (int e = 0; e < 4; e++) {
            const int tr = tb + 8 * h + 2 * c + (e & 1);
            const bool visible = tr < n_valid && token0 + tr <= (e < 2 ? pos0 : pos1);
            s[h][e] = visible ? s[h][e] * p.scale_log2 : -INFINITY;
            if (e < 2) mx0 = fmaxf(mx0, s[h][e]);
            else mx1 = fmaxf(mx1, s[h][e]);
          }
#pragma unroll
        for (int o2 = 1; o2 <= 2; o2 <<= 1) {
          mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o2));
          mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o2));
        }
        const float mn0 = fmaxf(m[0], mx0), mn1 = fmaxf(m[1], mx1);
        /* Rescale only when some row's maximum grew (rare once the first tokens are in). */
        if (__any_sync(0xffffffffu, mn0 > m[0] || mn1 > m[1])) {
          const float c0 = mn0 == -INFINITY ? 1.f : exp2f(m[0] - mn0);
          const float c1 = mn1 == -INFINITY ? 1.f : exp2f(m[1] - mn1);
          m[0] = mn0;
          m[1] = mn1;
          l[0] *= c0;
          l[1] *= c1;
#pragma unroll
          for (int n = 0; n < HD / 8; n++) {
            o[n][0] *= c0;
            o[n][1] *= c0;
            o[n][2] *= c1;
            o[n][3] *= c1;
          }
        }
        /* A row with nothing visible yet keeps max -inf; subtract 0 instead so exp2 gives 0. */
        const float mu0 = m[0] == -INFINITY ? 0.f : m[0], mu1 = m[1] == -INFINITY ? 0.f : m[1];
        float pv[2][4];
#pragma unroll
        for (int h = 0; h < 2; h++) {
          pv[h][0] = exp2f(s[h][0] - mu0);
          pv[h][1] = exp2f(s[h][1] - mu0);
          pv[h][2] = exp2f(s[h][2] - mu1);
          pv[h][3] = exp2f(s[h][3] - mu1);
          l[0] += pv[h][0] + pv[h][1];
          l[1] += pv[h][2] + pv[h][3];
        }
        const uint32_t pa[4] = {pack2<T>(pv[0][0], pv[0][1]), pack2<T>(pv[0][2], pv[0][3]),
                                pack2<T>(pv[1][0], pv[1][1]), pack2<T>(pv[1][2], pv[1][3])};
        /* O += P V, tokens 2c, 2c+1, 2c+8, 2c+9 of the 16. */
        const int tv[4] = {prow(tb + 2 * c), prow(tb + 2 * c + 1), prow(tb + 2 * c + 8),
                           prow(tb + 2 * c + 9)};
        if (vs.kind == SRC_ROWS) {
          const uint8_t *row[4] = {vs.rows + tv[0] * SL::RB, vs.rows + tv[1] * SL::RB,
                                   vs.rows + tv[2] * SL::RB, vs.rows + tv[3] * SL::RB};
          pv_rows<HD, T>(row, g, pa, o);
        } else {
          const int pt[4] = {pg.ptok0 + tv[0], pg.ptok0 + tv[1], pg.ptok0 + tv[2],
                             pg.ptok0 + tv[3]};
          if (vs.kind == SRC_GEN || !kFast16<T>) {
            pv_gen<HD, T>(vs.sec, scr, g, pt, pa, o);
          } else if constexpr (kFast16<T>) {
            switch (vs.sec.width) {
#define KVC__PV(W)                                                                                 \
  case W:                                                                                          \
    pv_fast<HD, W>(vs.sec, scr, g, pt, pa, o);                                                     \
    break;
              KVC__PV(1) KVC__PV(2) KVC__PV(3) KVC__PV(4) KVC__PV(5) KVC__PV(6) KVC__PV(7)
              KVC__PV(8)
#undef KVC__PV
            }
          }
        }
      }
      bad |= !ok;
      mbar_arrive(bars + 8 * (NS + slot)); /* this lane is done with the unit's ring bytes */
    }
  }

  /* Epilogue: the consumer warps' (m, l, O) through the ring, combined per query entry. */
  const bool cta_bad = __syncthreads_or(bad);
  float *obuf = (float *)smem; /* [kW3 warps][16][HD] */
  float *mbuf = obuf + kW3 * 16 * HD, *lbuf = mbuf + kW3 * 16;
  if (warp < kW3) {
    const int g = lane >> 2, c = lane & 3;
    stash_row_stats(m, l, mbuf, lbuf, warp, lane);
    float *ow = obuf + warp * 16 * HD;
#pragma unroll
    for (int n = 0; n < HD / 8; n++) {
      const int d0 = v_channel<HD>(n, 2 * c), d1 = v_channel<HD>(n, 2 * c + 1);
      ow[g * HD + d0] = o[n][0];
      ow[g * HD + d1] = o[n][1];
      ow[(g + 8) * HD + d0] = o[n][2];
      ow[(g + 8) * HD + d1] = o[n][3];
    }
  }
  __syncthreads();
  for (int i = tid; i < 16 * (HD / 8); i += kThreads3) {
    const int r = i / (HD / 8), c8 = i % (HD / 8), e = e0 + r;
    if (e >= entries) continue;
    float acc[8], lsum, mu;
    merge_entry<HD, kW3>(obuf, mbuf, lbuf, r, c8, acc, &lsum, &mu);
    write_entry<HD, T>(p, acc, lsum, mu, cta_bad, q0 + e / group, kh * group + e % group, split, c8);
  }
}

}  // namespace kvc_attn

#endif /* KVC_ATTN_V3_CUH */
