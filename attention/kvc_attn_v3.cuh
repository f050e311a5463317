/*
 * Decode kernel v3 (CUDA C++; part of kvc_attn_cuda.cu, included after the producer and the v2
 * consumers, whose params, unit descriptors, PTX wrappers and producer it shares).
 *
 * For launches whose query entries fit one tile of 8 * NB entries with a known codec mask
 * (kvc_attn_args_t.codec_mask): attn_kernel_v3<HD, T, NB, false, true> for pages without
 * Huffman coding, attn_kernel_v3<HD, T, NB, true, FAST> (attention/kvc_attn_v3_huf.cuh: one
 * more operand source and a layout with per-warp Huffman areas and a smaller ring, 62 KiB at
 * head_dim 128 and 64; one CTA per SM and 104 KiB at 256) when Huffman is allowed, with the
 * bit-pack fast path (FAST) only when bit-pack pages are too. The launcher instantiates NB = 1
 * (decode with GQA groups up to 8): at NB = 2 the kernel needs more than the 168 registers of
 * two CTAs per SM (~450 bytes of spills), so more entries take several tiles of 8 or v2 (the
 * launcher's tile_reads). Two CTAs per SM (one for launches over rows alone at head_dim 256: CPS),
 * each the producer warp of v2 (one bulk copy per section and run of chunks, so every unit lands as
 * linear sections and rows) and kW3 consumer warps (seven in the Huffman instances at head_dim 64
 * and 256) over a 96 KiB ring (three uncompressed 64-token units at head_dim 128, six at 64; 81 KiB
 * at 256, 197 KiB at one CTA per SM: v3_ring_bytes). The consumer warps take work items: an item is
 * a whole unit, or half a unit (p.unit_split_lg = 1) in launches whose pages are all rows, so that
 * all five warps work while the ring holds three fp16 units, and in launches without Huffman over
 * blocks of 32 or 64 tokens, which take units of 128 tokens (v3_layout's UT: half the producer's
 * steps per token) in halves of 64. The Huffman instance and the 128-token one hand items out from
 * a shared counter (a warp that runs faster takes more); the others give warp w items w, w + kW3,
 * ... (v3_claims). No CTA barrier in the loop: a unit's "empty" barrier counts the lanes of its
 * warps, and the warps' (m, l, O) meet in the epilogue.
 *
 * A warp attends to its unit 16 tokens at a time with mma.sync m16n8k16 in the "swapped" form
 * (the query entries are the N dimension, so a GQA group of 4 to 8 wastes no M rows):
 *   - S^T = K Q^T: A = K (M = 16 tokens, K = channels), B = Q^T (N = 8 entries per n-block).
 *     Lane (g, c) (g = lane / 4, c = lane % 4) supplies tokens g and g + 8 at channels
 *     [c HD/4, (c + 1) HD/4); its k-slots pair channel i with i + 8 inside each run of 16
 *     (k_channel), and Q's B fragments (built once per CTA; registers, or shared memory in the
 *     Huffman instance) use the same order.
 *     Accumulators: s[nb][0..3] = (token g, entry 2c), (g, 2c+1), (g+8, 2c), (g+8, 2c+1).
 *   - O^T += V^T P^T: A = V^T (M = 16 channels per m-tile, K = the 16 tokens), B = P^T, made from
 *     the S^T accumulators by movmatrix.trans (no shuffles). Lane (g, c) supplies tokens 2c, 2c+1,
 *     2c+8, 2c+9 at channels v_channel(mt, g) and v_channel(mt, g + 8), mt = 0..HD/16-1: a run of
 *     HD/8 channels starting at g HD/8. O^T needs HD/16 x NB x 4 registers (32 for NB = 1 at head
 *     dim 128, half of the unswapped form's).
 *
 * Operand sources, chosen per page and tensor (warp-uniform), each a setup step that fills the
 * warp's scratch and a pair of builders (s_<src> for S^T's A operand, pv_<src> for O^T's A
 * operand) that read only the ring bytes, the scratch and the v3_src they are given; a new source
 * adds an SRC_ value, its setup in v3_page_setup and a case in v3_s / v3_pv:
 *   SRC_ROWS  staging / RAW rows of a page, linear in the ring: LDS.128 + one PRMT per pair.
 *   SRC_FAST  bit-pack, relative mode, width 1..8, group bases b with |b - 2^W| <= 2048 and
 *             b <= 2048, and the largest step of the section within 2^+-60: the operands hold
 *             each code u exactly as the fp16 u 2^(r - 24) (r + W <= 11): keys' r the code's
 *             offset in its byte where the mantissa allows (pair_r; code_pair: one PRMT and one
 *             LOP3, no shift at the default widths); values' from their paired sections' words,
 *             whose halves hold a token pair's codes (vpair_r; vpair_code: one LOP3, a shift or a
 *             PRMT before it for some). The rest of (u + b) * step is folded out of them:
 *             keys' per-channel steps into Q's B fragments (Q' = Q * step * 2^(-e - r), built
 *             once per page outside the Huffman instances, else one HMUL2 per Q pair and k-block
 *             and slab; S scaled by 2^(e + 24) after the mma) and their bases into a per-page,
 *             per-entry term of S (s_fast_const: one mma per k-block with the b 2^(r - 24) of
 *             every channel as the tokens' rows, once per page);
 *             values' per-token steps into P (P' = P * step * 2^(W - e)) and their bases into a
 *             per-entry sum of P' b / 2^W (in the hot-width loop one more mma per slab) that the
 *             epilogue adds to every channel (vcorr). O^T's row of channel offset n in its lane's
 *             run accumulates O * 2^(-e - lg(W, n)), rescaled when a page needs another e or W
 *             (o_units). Subnormals have no constant part to cancel: with operands 1 + u 2^(r -
 *             10), the tensor cores' fp32 accumulation of the large constant products lost the low
 *             bits of the codes' part (values: a warp's mma over 32k tokens of 3-bit codes,
 *             relative L2 error 6.1e-4 at r = 7, doubling per bit lower; as subnormals 1.4e-4 at
 *             every r). Keys' sums are short (head_dim terms): as subnormals they measured the
 *             same error and time as 1 + u 2^(r - 10), without a 1.0 held in a register. What did
 *             matter for keys is Q' 's rounding, shared by every token of a page: S^T takes Q' 's
 *             remainder too in fp16 launches (q_resid).
 *             Rounding differs from the CPU reference, which rounds each decoded value (u + b) *
 *             step to fp16: here the values are exact and Q' and P' carry one fp16 rounding each
 *             (the base terms use the same rounded Q' and P'), so the error against the
 *             default reference includes that reference's own rounding of K and V, which in bf16
 *             can reach ~1e-2 (kvc_attn.h: the tests also compare with a reference over the exact
 *             values, ref_exact_codecs). A lane's run of key codes is read whole where the
 *             section's layout puts it at a whole word (always at head_dim 128:
 *             load_run_aligned), else word by word and shifted (load_run); of value codes, as the
 *             words of its block (vpair_load: whole words at head_dim 128 and 256).
 *             bf16 launches use the same fp16 operands and mma, with bf16 Q scaled into fp16 Q'
 *             (q_scaled) when every |Q| of the CTA's tile is at most 65504 (qfits).
 *   SRC_GEN   every other bit-pack section (absolute mode, width 0 or > 8, bf16 Q beyond fp16's
 *             range, steps or bases out of those ranges): each value decoded on its own exactly as
 *             the CPU decoder does, rounded to T.
 *   SRC_HUF, SRC_HUFG (HUF instance only) Huffman sections, decoded slab by slab into a per-warp
 *             tile of the values (e = 0) that v3h_s / v3h_pv read in the builders' operand order
 *             (attention/kvc_attn_v3_huf.cuh).
 * Without HUF a Huffman page makes the unit's rows NaN (the launcher should have chosen HUF).
 */
#ifndef KVC_ATTN_V3_CUH
#define KVC_ATTN_V3_CUH

namespace kvc_attn {

/* Consumer warps per CTA (but the Huffman instances at head_dim 64 and 256: v3h_warps). Two CTAs
 * per SM (two producers: one producer warp's serial per-unit work was the limit at one CTA per
 * SM), 12 warps: three per SM sub-partition, which caps registers at 168 per thread (16384 / (3 x
 * 32)). Measured: 7 consumer warps (128 registers, ~200 bytes of spills, Q's fragments reloaded
 * from local memory) ran (8, 32k) 1.25x (bit-pack) and 1.9x (fp16 pages) slower. */
constexpr int kW3 = 5;
/* A layout's units in flight at most, for W consumer warps: a multiple of W, so that with items w,
 * w + W, ... a slot comes back to the same warps. Each layout also says its `warps` (W) and
 * `threads` (W + 1 warps: the producer's too); v3_layout has kW3, v3h_layout v3h_warps. */
constexpr int v3_slots(int W) { return 2 * W; }
constexpr int kMaxW3 = 8; /* the most consumer warps any layout has (the probe's slots) */

/* The directory entries of the producer's first metadata batch (pages of units from u_begin on),
 * fetched into L2 by the producer warp while the consumer warps load the Q tile (a tile of 8
 * entries is at most 128 uint4s: the first 128 threads), so that the first load_batch finds them
 * there instead of in DRAM. Measured (session 13): (8, 32k) -0.2..-0.7%, (1, 32k) -1..-2%. */
template <int UT, int NP>
__device__ __forceinline__ void prefetch_first_batch(const params &p, int seq, int len,
                                                     int u_begin) {
  const int lane = threadIdx.x & 31, bt_lg = 31 - __clz(p.block_tokens);
  const int j = ((u_begin * UT) >> bt_lg) + lane;
  if (lane < NP && j < ((len + p.block_tokens - 1) >> bt_lg)) {
    prefetch_dir_entry(p, p.block_ids[p.block_indptr[seq] + j]);
  }
}

/* Whether an instance's warps claim their items from a shared counter rather than take every
 * kW3-th. Two consumer warps of an SM share their sub-partition with a producer warp and the
 * others with a third consumer, so warps run at different speeds. Measured (session 9, ms): the
 * Huffman instance (8, 32k) -2.2%; bit-pack over units of 128 tokens in halves (8, 32k) -3.5%,
 * (16, 128k) -3.4%, but +1.9% with whole 128-token items; fp16 paged (rows, 64-token units in
 * halves) +0.4%, so the 64-token instance without Huffman keeps the fixed order. */
template <bool HUF, int UT> constexpr bool v3_claims() { return HUF || UT > kUnitTokens; }

enum : int { SRC_ROWS = 0, SRC_FAST, SRC_GEN, SRC_BAD };

/* How far (log2 units) a score may exceed its entry's running maximum before the maximum moves:
 * softmax weights stay below 2^kMaxSlack, so bit-pack's P' = P * step * 2^(W - e) (< 2^(6 + 8))
 * and Huffman's and rows' P stay inside fp16. */
constexpr float kMaxSlack = 6.f;

/* The uint4 of v3_scratch<HD>::kq for lane c's channels of k-block kb. */
__device__ __forceinline__ int kq_index(int c, int kb) { return 4 * kb + c; }

/* Whether T is fp16. SRC_FAST's operands are fp16 for either T: a bf16 launch's Q' is scaled
 * into fp16 (q_scaled) when every |Q| <= 65504 (the kernel's qfits), else its bit-pack pages take
 * SRC_GEN. */
template <class T> constexpr bool kFast16 = half2_of<T>::magic == 0x64006400u;

/* Per-warp scratch (bytes), rewritten at each page: K's region, then V's, each holding either
 * SRC_GEN's group bases and steps or SRC_FAST's tables (same bytes). K fast: per (k-block, lane c)
 * a uint4 (kq, kq_index: the four c of a k-block side by side, so that a warp's read of them is
 * one wavefront, not four in one bank) {b0, s0, b1, s1}: for the k-block's two channel pairs in
 * k_channel order, fp16 pairs of the bases b 2^(r - 24) and of the steps step 2^(-e - r)
 * (v3_fast_tables), bases first so that the uint4 as loaded is s_fast_const's A operand, and
 * per lane s_fast_const's float2 per n-block (kc). V fast: per page token the floats step *
 * 2^(W - e) (vmul) and the fp16 b / 2^W (vbt, exact: |b| <= 2048). Per-token entries are
 * indexed by page token & 63 (a unit reads at most 64 tokens of a page, aligned to 64); absolute
 * mode keeps bases only (per channel; its one step is v3_sec.step). Sized for head_dim H =
 * max(HD, 128) (head_dim 64 keeps 128's layout, the one measured): K's tables take 4 H bytes
 * each, V's region the larger of its two per-token tables (4 bytes per unit token each: SRC_GEN's
 * steps and bases) and absolute mode's bases (4 H bytes). */
template <int HD> struct v3_scratch {
  static constexpr int H = HD < 128 ? 128 : HD;
  static constexpr int kbase = 0, kstep = 4 * H, kq = 0, kc = 4 * H;
  static constexpr int vbase = 8 * H, vstep = 8 * H + 256, vmul = 8 * H, vbt = 8 * H + 256;
  static constexpr int bytes = 8 * H + (4 * H > 512 ? 4 * H : 512);
  static_assert(kUnitTokens * 4 == 256, "V's per-token tables hold one entry per unit token");
};

/* What both v3 layouts place after a ring of RING bytes, alike: the unit descriptors, the
 * producer's metadata batch (NP pages, and ENTS of their descriptor entries: producer()), the
 * consumer warps' scratch and the next unclaimed work item (v3_claims), up to `end`. */
template <int HD, int RING, int NP = kBatch, int ENTS = 0, int W = kW3> struct v3_after_ring {
  static_assert(W <= kMaxW3, "kMaxW3");
  static constexpr int warps = W, threads = 32 * (W + 1), slots = v3_slots(W);
  static constexpr int ring = RING;
  static constexpr int batch = NP;
  static constexpr int desc_off = RING;
  static constexpr int meta_off = desc_off + slots * (int)sizeof(unit_desc);
  static constexpr int chunks_off = meta_off + NP * (int)sizeof(page_meta);
  static constexpr int ents_off = chunks_off + NP * KVC_PAGE_MAX_CHUNKS * 4;
  static constexpr int scr_off = align_up(ents_off + ENTS * (int)sizeof(unit_page), 128);
  static constexpr int claim_off = scr_off + W * v3_scratch<HD>::bytes;
  static constexpr int end = claim_off + 16;
};

/* Pages of the producer's metadata batch: 32 for units of two pages, 16 for 64-token units, whose
 * launches (fp16 pages) keep the 96 KiB ring that the larger batch's chunk ids would take 4 KiB
 * of. A batch costs its round trips (block id, directory entry, header), not its lanes, and the
 * consumers wait while it loads. Measured (session 32, ms, 16 -> 32 pages): bit-pack (8, 32k)
 * -1.8%, (16, 128k) -2.6..-3.6%, bf16 -2.1% / -3.2..-4.2%; with the ring at 76 KiB instead of
 * 92, bit-pack ran only 0.5-1.4% slower than at 92. */
template <int UT> constexpr int v3_batch() { return UT > kUnitTokens ? 32 : kBatch; }
/* The batch's pages' descriptor entries, built with it: units of whole pages (UT > 64) only. */
template <int UT> constexpr int v3_ents() { return UT > kUnitTokens ? v3_batch<UT>() : 0; }

/* v3_after_ring of a v3_layout over UT-token units, at a ring of RING bytes. */
template <int HD, int UT, int RING>
using v3_after_ring_of = v3_after_ring<HD, RING, v3_batch<UT>(), v3_ents<UT>()>;

/* Bytes of a v3 layout past its ring (v3_layout's tail: from v3_after_ring on). */
template <int HD, int UT> constexpr int v3_tail_bytes() {
  return v3_after_ring_of<HD, UT, 0>::end + 2 * v3_slots(kW3) * 8 +
         (HD == 256 ? 2 : 1) * 32 * (HD / 2 + 16);
}

/* The ring, for CPS CTAs per SM. Two: 96 KiB, three uncompressed units at head_dim 128 (92 and 91
 * KiB at head_dim 64 and 128 with units of whole pages, whose metadata batch takes more: what is
 * left); 81 KiB at head_dim 256, where the scratch and a second copy of Q take more, and a unit of
 * fp16 rows takes 64 KiB (K and V): the epilogue's 80.6 KiB and one such unit fit. One (head_dim
 * 256, launches whose pages are all rows): the rest of the SM's shared memory, in whole KiB (197
 * KiB, three units of fp16 rows), so that the producer copies the next units while the consumers
 * read one. */
template <int HD, int CPS, int UT> constexpr int v3_ring_bytes() {
  constexpr int rest = (233472 / CPS - 1024 - v3_tail_bytes<HD, UT>()) / 1024 * 1024;
  return CPS == 1 ? rest : HD == 256 ? 81 * 1024 : rest < 96 * 1024 ? rest : 96 * 1024;
}

/* v3_after_ring of a v3_layout: its ring and metadata batch. */
template <int HD, int UT, int CPS>
using v3_tail_of = v3_after_ring_of<HD, UT, v3_ring_bytes<HD, CPS, UT>()>;

/* UT: tokens per unit, kUnitTokens or two pages' 128 (launches with block_tokens 32 or 64 whose
 * pages are not all rows: the producer's steps per unit, not per page, bound bit-pack). */
template <int HD, int UT = kUnitTokens, int CPS = 2>
struct v3_layout : v3_tail_of<HD, UT, CPS> {
  static_assert(HD == 64 || HD == 128 || HD == 256, "v3 is built for head_dim 64, 128 and 256");
  static_assert(CPS == 2 || (CPS == 1 && HD == 256), "one CTA per SM at head_dim 256 only");
  typedef v3_tail_of<HD, UT, CPS> A;
  using A::end;
  using A::ring;
  static_assert(UT == kUnitTokens || UT == 2 * kUnitTokens, "units of 64 or 128 tokens");
  static constexpr int RB = 2 * HD;
  static constexpr int tile = kUnitTokens * RB;
  static constexpr int unit_tokens = UT;
  using A::slots;
  using A::threads;
  using A::warps;
  /* The producer prefetches the next metadata batch's directory entries (load_batch): for the
   * 64-token instance only (fp16 pages' launches, bound by DRAM), since every change to the
   * producer's code moves the compressed instances' times by ptxas's allocation alone. */
  static constexpr bool fetch_ahead = UT == kUnitTokens;
  /* Full RAW pages take their sections' offsets from the launch's shape and have their headers
   * checked a batch later (raw_check), in the same instance only: the other instances' code
   * stays as it was (their pages are compressed, and the change cost bit-pack 1-2% by ptxas's
   * allocation alone, bench/NOTES-attention.md, session 57). */
  static constexpr bool raw_from_shape = UT == kUnitTokens;
  static constexpr bool ids_per_lane = true; /* load_batch */
  /* Bytes after each compressed section that no copy writes: load_run reads up to one word past
   * a section's last code word (masked off), so it needs no clamp per load. */
  static constexpr int slack = 16;
  /* The Q tile, read before the producer starts. */
  static constexpr int qtile_off = 0;
  static constexpr int bar_off = end;
  /* Q's B fragments, one copy per CTA (lane stride HD / 2 + 16 bytes: LDS.128 without bank
   * conflicts), from which the consumers build each page's operand (the kernel's qx). */
  static constexpr int qf_off = bar_off + 2 * slots * 8, qf_stride = HD / 2 + 16;
  /* At head_dim 256, a second copy of the fragments, in fp16 (bf16 launches' fast path: the
   * kernel's Q16). */
  static constexpr int qh_off = qf_off + 32 * qf_stride;
  static constexpr int bytes = qh_off + (HD == 256 ? 32 * qf_stride : 0);
  /* Largest block_tokens whose K and V sections of one head (at most the raw size, in their ring
   * slots) fit the ring twice; launch_v3 leaves larger blocks to v2 (head_dim 256: 64). */
  static constexpr int max_block_tokens =
      2 * (kMaxBlockTokens * RB + slack + kSlotExtra) <= ring ? kMaxBlockTokens : 64;
  static_assert(warps * 16 * (HD + 2) * 4 <= ring, "epilogue does not fit the ring");
  static_assert((HD == 256 ? 2 : 3) * tile <= ring &&
                    2 * (64 * RB + slack + kSlotExtra) <= ring &&
                    2 * UT * RB + 2 * kMaxUnitPages * (slack + kSlotExtra) <= ring,
                "a unit must fit the ring");
  static_assert(bytes - ring == v3_tail_bytes<HD, UT>(), "v3_tail_bytes matches the layout");
  static_assert(CPS * (bytes + 1024) <= 233472, "CPS CTAs per SM do not fit");
};

/* Channel of k-slot `hi` (0: low half, 1: high half) of pair pi (k-block pi / 2, A registers 0-1
 * for even pi, 2-3 for odd) supplied by lane c in S^T = K Q^T. */
template <int HD> __device__ __forceinline__ int k_channel(int c, int pi, int hi) {
  return c * (HD / 4) + 16 * (pi / 8) + pi % 8 + 8 * hi;
}
/* Channel of row r (0..15) of m-tile mt in O^T: lane g's run of HD/8 channels holds rows g and
 * g + 8 of every m-tile. */
template <int HD> __device__ __forceinline__ int v_channel(int mt, int r) {
  return (r % 8) * (HD / 8) + 2 * mt + r / 8;
}

/* The lane's index, from %laneid rather than threadIdx.x & 31: ptxas rematerialises threadIdx.x
 * (an S2R, tens of cycles before its result) wherever registers run short, which put one at the
 * head of every slab and of the page setup's field reads; the %laneid value (one S2R, shared by
 * every use) it keeps in a register. */
__device__ __forceinline__ int lane_id() {
  int l;
  asm("mov.u32 %0, %%laneid;" : "=r"(l));
  return l;
}

/* 2^x (approximate, like exp2f's fast path; results below 2^-126 flush to 0, which the softmax
 * weights of tokens so far below the maximum do not miss). */
__device__ __forceinline__ float ex2_ftz(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t r;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
  return r;
}

/* The words that hold codes i1 of run x and i2 of run y (X, Y: a word, or for a code that
 * crosses a word the funnel shift that brings it into the low half), and the codes' lsb
 * positions in them. */
template <int W, int NA>
__device__ __forceinline__ void pair_words(const uint32_t (&x)[NA], const uint32_t (&y)[NA],
                                           int i1, int i2, uint32_t &X, uint32_t &Y, int &L1,
                                           int &L2) {
  const int o1 = i1 * W, o2 = i2 * W, q1 = o1 >> 5, f1 = o1 & 31, q2 = o2 >> 5, f2 = o2 & 31;
  const bool c1 = f1 + W > 32, c2 = f2 + W > 32;
  X = c1 ? __funnelshift_l(x[min(q1 + 1, NA - 1)], x[q1], 16) : x[q1];
  Y = c2 ? __funnelshift_l(y[min(q2 + 1, NA - 1)], y[q2], 16) : y[q2];
  L1 = (c1 ? 48 : 32) - f1 - W;
  L2 = (c2 ? 48 : 32) - f2 - W;
}

/* Where code_pair puts code i1 of a run of W-bit codes (codes side by side from the run's most
 * significant bit, as load_run realigns them): at bit r of its half, r its lsb's offset in the
 * byte that holds it (0..7: the PRMT moves whole bytes), or 10 - W where that is lower, so that
 * the code lies inside fp16's mantissa (bits 0-9). Only codes with r > 10 - W (some at widths
 * 5-7) are shifted. Equal for codes i and i + 8: r depends on W (i + 1) modulo 8 alone. */
__host__ __device__ constexpr int pair_r(int W, int i1) {
  const int o1 = i1 * W, f1 = o1 & 31;
  const int L1 = (f1 + W > 32 ? 48 : 32) - f1 - W; /* the code's lsb, as pair_words finds it */
  return (L1 & 7) <= 10 - W ? (L1 & 7) : 10 - W;
}

/* Codes i1 (from words x) and i2 (from words y) of two runs of W-bit codes (code lsbs equal
 * modulo 8) as the low and high halves of the result, each at bits [r, r + W) of its half, r =
 * pair_r(W, i1), the other bits 0: one PRMT (shared by the codes of a byte pair) and an AND, a
 * shift before it for r > 10 - W. A half is then exactly u 2^r as an fp16 subnormal (u 2^(r -
 * 24)). */
template <int W, int NA>
__device__ __forceinline__ uint32_t code_pair(const uint32_t (&x)[NA], const uint32_t (&y)[NA],
                                              int i1, int i2) {
  uint32_t X, Y;
  int L1, L2;
  pair_words<W, NA>(x, y, i1, i2, X, Y, L1, L2);
  const int k1 = L1 >> 3, k2 = L2 >> 3, r = L1 & 7, re = pair_r(W, i1);
  const uint32_t sel = (uint32_t)(k1 | (min(k1 + 1, 3) << 4) | ((k2 + 4) << 8) |
                                  ((min(k2 + 1, 3) + 4) << 12));
  const uint32_t v = __byte_perm(X, Y, sel);
  return (v >> (r - re)) & ((((1u << W) - 1u) << re) * 0x10001u);
}

/* Words p[0 .. NA] of a section's stream shifted left by sh: the NA words of a bit run. No
 * clamps: v3_setup_section checked that every run of the section's tokens ends inside the section,
 * so the one word past the run at most is the layout's slack. */
template <int NA>
__device__ __forceinline__ void load_run(const uint32_t *p, uint32_t sh, uint32_t (&a)[NA]) {
  uint32_t prev = p[0];
#pragma unroll
  for (int m = 0; m < NA; m++) {
    const uint32_t nx = p[m + 1];
    a[m] = __funnelshift_l(nx, prev, sh);
    prev = nx;
  }
}

/* 32-bit words of alignment of every run of NC codes of width W in a section whose codes start at a
 * multiple of G bits (the runs start at multiples of NC W bits after it), or 0 below a word. */
constexpr int run_align_words(int G, int NC, int W) {
  int a = G, b = NC * W;
  while (b) {
    const int t = a % b;
    a = b;
    b = t;
  }
  return a >= 32 ? a / 32 : 0;
}

/* load_run for a run that starts at a multiple of AW >= 1 words (no shift): its NA words in
 * vector loads of the most words (up to 4) that divide both. Neighbouring lanes' runs are
 * adjacent, so a warp's vector load reads one contiguous span: without bank conflicts, where the
 * word loads of runs 2^k words apart met 2^k-way conflicts (bench/NOTES-attention.md). */
template <int NA, int AW>
__device__ __forceinline__ void load_run_aligned(const uint32_t *p, uint32_t (&a)[NA]) {
  constexpr int V = (AW % 4 == 0 && NA % 4 == 0) ? 4 : (AW % 2 == 0 && NA % 2 == 0) ? 2 : 1;
#pragma unroll
  for (int m = 0; m < NA; m += V) {
    if constexpr (V == 4) {
      const uint4 x = *(const uint4 *)(p + m);
      a[m] = x.x, a[m + 1] = x.y, a[m + 2] = x.z, a[m + 3] = x.w;
    } else if constexpr (V == 2) {
      const uint2 x = *(const uint2 *)(p + m);
      a[m] = x.x, a[m + 1] = x.y;
    } else {
      a[m] = p[m];
    }
  }
}

/* Where a lane's code runs of NT tokens start in a section whose tokens are HD codes of width W
 * apart: the first token's run at bit sh (0..31) of word p, token t's dt[t] tokens after it. A
 * token's codes are HD W bits, whole words, so every run starts at the same bit of a word: one
 * start, one shift for all. (Whole slabs give dt as constants and advance p: the kernel.) */
template <int NT> struct token_runs {
  const uint32_t *p;
  uint32_t sh;
  int dt[NT];
};

/* token_runs of the runs from channel ch0 of page tokens pt of a section. */
template <int HD, int W, int NT>
__device__ __forceinline__ token_runs<NT> token_runs_of(const uint32_t *w, uint32_t meta, int ch0,
                                                        const int (&pt)[NT]) {
  static_assert(HD * W % 32 == 0, "a token's codes are whole words");
  const uint32_t start = meta + (uint32_t)(pt[0] * HD + ch0) * W;
  token_runs<NT> r;
  r.p = w + (start >> 5);
  r.sh = start & 31;
#pragma unroll
  for (int t = 0; t < NT; t++) r.dt[t] = pt[t] - pt[0];
  return r;
}

/* The runs of NA words of tr, starting dw words further into each token: AW > 0, runs that start
 * at a multiple of AW words (load_run_aligned, tr.sh = 0), else load_run. */
template <int HD, int W, int NA, int AW, int NT>
__device__ __forceinline__ void load_token_runs(const token_runs<NT> &tr, int dw,
                                                uint32_t (&a)[NT][NA]) {
  constexpr int TW = HD * W / 32;
#pragma unroll
  for (int t = 0; t < NT; t++) {
    const uint32_t *p = tr.p + tr.dt[t] * TW + dw;
    if constexpr (AW > 0) load_run_aligned<NA, AW>(p, a[t]);
    else load_run<NA>(p, tr.sh, a[t]);
  }
}

/* A quantized section of the current page, as the operand builders read it. */
struct v3_sec {
  const uint32_t *w;
  uint32_t last, meta;
  int width, mode; /* mode: 0 REL keys (groups = channels), 1 REL values (tokens), 2 ABS */
  int e; /* SRC_FAST: the power of two folded out (steps * 2^-e <= 1); keys: e + W, S's unit */
  float step;      /* absolute mode: the section's step */
};

/* Where the current page's K or V operands come from. */
struct v3_src {
  int kind;            /* SRC_* */
  v3_sec sec;          /* SRC_FAST, SRC_GEN */
  const uint8_t *rows; /* SRC_ROWS: the page's first row in the ring */
  int ptok0;           /* SRC_FAST, SRC_GEN: page token of the page's first row in the unit */
};

/* The power of two 2^e as a float, |e| <= 126. */
__device__ __forceinline__ float pow2i(int e) { return __int_as_float((127 + e) << 23); }

/* Bits [pos, pos + n) of a section's stream, n <= 31, without clamps: the caller keeps pos + n
 * inside the section, so the second word read is at most the layout's slack. (No pos & 31: the
 * funnel shift takes its amount modulo 32.) */
__device__ __forceinline__ uint32_t v3_field(const uint32_t *w, uint32_t pos, uint32_t n) {
  const uint32_t k = pos >> 5;
  return kvc_dev_top(__funnelshift_l(w[k + 1], w[k], pos), n);
}

/* step(e) of kvc_step_from_code, bit-identical, with the mantissa table M[e & 7] - 32 taken by
 * one PRMT from its two 32-bit halves instead of a 64-bit shift. */
__device__ __forceinline__ float v3_step(int e) {
  const uint32_t m = __byte_perm((uint32_t)KVC_STEP_MANT_PACKED,
                                 (uint32_t)(KVC_STEP_MANT_PACKED >> 32), (uint32_t)e & 7u);
  return __int_as_float((int)(((uint32_t)((e >> 3) + 127) << 23) | (m << 18)));
}

/* v3_step(e), bit-identical, from E = e + 823 (e in [KVC_STEP_CODE_MIN, KVC_STEP_CODE_MAX]; E may
 * be negative): E << 20 carries (e >> 3) + 127 - 24 into bit 23 and e & 7 into bits 20-22, and
 * c << 18 adds the rest, c = M[e & 7] - 32 - 4 (e & 7) + 4 (1..4) taken by one PRMT (table
 * indexed by E & 7 = (e + 1015) & 7) whose bytes 1-3 repeat the table's byte 0 (3): 3 * 2^26 =
 * 24 << 23 more, the 24 that E's bias leaves out. Four instructions, no 127 to add. */
__device__ __forceinline__ float v3_step_x(int E) {
  const uint32_t c = __byte_perm(0x01010203u, 0x04030201u, (uint32_t)E & 7u);
  return __uint_as_float(((uint32_t)E << 20) + (c << 18));
}

/* A quantized section's header (kvc_qsec_header_t), as v3_header reads it. */
struct v3_hdr {
  const uint32_t *w; /* the code words, after the header */
  uint32_t nwords, w_e, w_b, width, b_min, pos_b, meta; /* pos_b, meta: bit offsets in w */
  int e_min;
  bool rel;
};

/* What a section must satisfy before its header is read: a header and a word, whole words, and
 * t_lo < t_hi <= n_tokens <= kMaxBlockTokens (as unsigned: also 0 <= t_lo and 1 <= n_tokens).
 * & rather than &&: one predicate. */
__device__ __forceinline__ bool v3_shape_ok(uint32_t sec_bytes, int n_tokens, int t_lo, int t_hi) {
  return (sec_bytes >= KVC_QSEC_HEADER_BYTES + 4) & (sec_bytes % 4 == 0) &
         ((uint32_t)(n_tokens - 1) < (uint32_t)kMaxBlockTokens) &
         ((uint32_t)t_lo < (uint32_t)t_hi) & ((uint32_t)t_hi <= (uint32_t)n_tokens);
}

/* Reads the header of a section of tensor TS (0 K, 1 V) that passed v3_shape_ok; false for one
 * inconsistent with the format. No branches, so that two sections' reads can overlap. */
template <int HD, int TS>
__device__ __forceinline__ bool v3_header(const uint8_t *sec, uint32_t sec_bytes, int n_tokens,
                                          v3_hdr &hd) {
  /* In one load (sections are 16-aligned), checked on its words: h.x = mode | w_e << 8 | w_b << 16
   * | width << 24, h.y = (uint16_t)e_min | n_lanes << 16. */
  const uint4 h = *(const uint4 *)sec;
  hd.w_e = __byte_perm(h.x, 0u, 0x4441);
  hd.w_b = __byte_perm(h.x, 0u, 0x4442);
  hd.width = h.x >> 24;
  hd.rel = (h.x & 0xffu) == KVC_QMODE_REL;
  hd.e_min = (int)(int16_t)(h.y & 0xffffu);
  hd.b_min = h.z;
  hd.w = (const uint32_t *)(sec + KVC_QSEC_HEADER_BYTES);
  hd.nwords = (sec_bytes - KVC_QSEC_HEADER_BYTES) / 4;
  const uint32_t G = hd.rel ? (TS == 0 ? (uint32_t)HD : (uint32_t)n_tokens) : (uint32_t)HD;
  hd.pos_b = G * hd.w_e; /* 0 in absolute mode (w_e = 0) */
  /* Value codes are paired (kvc_bp_paired: every v3 head_dim is a multiple of 16): they start at a
   * word and take whole token pairs. */
  hd.meta = kvc_bp_start(hd.pos_b + G * hd.w_b, TS == 1);
  const uint32_t code_rows = TS == 1 ? (uint32_t)(n_tokens + 1) & ~1u : (uint32_t)n_tokens;
  /* mode <= 1 and w_b <= 31: bits 1-7 and 21-23 clear; width <= KVC_Q_MAX_BITS; w_e <= 16 (REL)
   * or 0 (ABS); e_min in [KVC_STEP_CODE_MIN, KVC_STEP_CODE_MAX] and n_lanes == 0 at once: with
   * e_min's sign bit flipped, h.y is e_min + 32768 + n_lanes * 65536. Then every code lies inside
   * the section (load_run's runs and v3_field's fields end inside it): meta + code_rows HD width
   * (< 2^20 with the fields in range) <= 32 nwords, i.e. its count of words rounded up <=
   * nwords. & rather than &&: one predicate, no branches. */
  return ((h.x & 0x00e000feu) == 0) & (h.x < ((KVC_Q_MAX_BITS + 1u) << 24)) &
         (hd.w_e <= (hd.rel ? 16u : 0u)) &
         ((h.y ^ 0x8000u) - (uint32_t)(32768 + KVC_STEP_CODE_MIN) <=
          (uint32_t)(KVC_STEP_CODE_MAX - KVC_STEP_CODE_MIN)) &
         ((hd.meta + code_rows * (HD * hd.width) + 31u) >> 5 <= hd.nwords);
}

/* A lane's groups of a relative-mode section: NG channels (keys: HD / 32, k_channel pair order:
 * pairs lane + 32 (i / 2), half i % 2, both channels of a pair in one lane, so SRC_FAST's key
 * pairs need no exchange) or tokens t_lo + lane + 32 i (values: a unit reads at most 64 rows of a
 * page, aligned to 64 page tokens). Per group u = b - 2^W + 2048 (mod 2^32; SRC_FAST's condition
 * on a base b is b - 2^W >= -2048 and b <= 2048, i.e. u <= 4096 - 2^W (widths 1..8), so that b
 * times a power of two is exact in fp16: keys' b 2^(r - 24), values' b / 2^W, vbt) and
 * E = e + 823, the step code as v3_step_x takes it; in: the token is below t_hi (a token past it
 * reads token t_hi - 1's fields, inside the section, whose step code and base leave emax and inb
 * as they are). */
template <int HD, int TS> struct v3_groups {
  static constexpr int NG = TS == 0 ? HD / 32 : kUnitTokens / 32;
  uint32_t u[NG];
  int E[NG];
  bool in[NG];
  int emax; /* the lane's largest E */
  bool inb; /* every u of the lane <= 4096 - 2^W */
};

/* The lane's groups of a relative-mode section whose header passed v3_header. No branches. */
template <int HD, int TS>
__device__ __forceinline__ void v3_groups_read(const v3_hdr &h, int t_lo, int t_hi,
                                               v3_groups<HD, TS> &gr) {
  constexpr int NG = v3_groups<HD, TS>::NG;
  const int lane = lane_id();
  const uint32_t *const w = h.w;
  /* 1 << width: any power of two for widths past 8 (never SRC_FAST). */
  const uint32_t cb = h.b_min - (1u << h.width) + 2048u;
  const int ce = h.e_min + 823;
  uint32_t pb[NG], pe[NG], sb[NG], se[NG]; /* fields' first words and bit offsets (mod 32) */
  gr.emax = ce;
  gr.inb = true;
#pragma unroll
  for (int i = 0; i < NG; i++) {
    if (TS == 0 ? i >= 2 : i >= 1) {
      /* Channel g + 64 (keys, i >= 2) or token g + 32 (values): its fields start 2 w or w words
       * after group i - 2's or i - 1's, at the same bit offset modulo 32 (a value token past t_hi
       * re-reads its partner's fields). */
      const int ip = TS == 0 ? i - 2 : i - 1;
      uint32_t dw_b = TS == 0 ? 2 * h.w_b : h.w_b, dw_e = TS == 0 ? 2 * h.w_e : h.w_e;
      if constexpr (TS == 1) {
        gr.in[i] = t_lo + lane + 32 * i < t_hi;
        dw_b = gr.in[i] ? dw_b : 0u;
        dw_e = gr.in[i] ? dw_e : 0u;
      } else {
        gr.in[i] = true;
      }
      pb[i] = pb[ip] + dw_b;
      pe[i] = pe[ip] + dw_e;
      sb[i] = sb[ip];
      se[i] = se[ip];
    } else {
      uint32_t g;
      if constexpr (TS == 0) {
        /* k_channel(lane / (HD / 8), lane % (HD / 8), i) = lane % 8 + 16 (lane / 8) + 8 i, i.e.
         * lane + (lane & 24) + 8 i (every head_dim). */
        g = (uint32_t)(lane + (lane & 24) + 8 * i);
        gr.in[i] = true;
      } else {
        const int tk = t_lo + lane + 32 * i;
        gr.in[i] = tk < t_hi;
        g = (uint32_t)min(tk, t_hi - 1);
      }
      sb[i] = h.pos_b + g * h.w_b;
      se[i] = g * h.w_e;
      pb[i] = sb[i] >> 5;
      pe[i] = se[i] >> 5;
    }
    gr.u[i] = kvc_dev_top(__funnelshift_l(w[pb[i] + 1], w[pb[i]], sb[i]), h.w_b) + cb;
    gr.E[i] = (int)kvc_dev_top(__funnelshift_l(w[pe[i] + 1], w[pe[i]], se[i]), h.w_e) + ce;
    gr.emax = max(gr.emax, gr.E[i]);
    gr.inb &= gr.u[i] <= 4096u - (1u << h.width);
  }
}

/* The power of two SRC_FAST folds out of a section's steps, from the warp's largest step code
 * emax or a bound above it (v3_hdr_emax): the folded steps step * 2^-e lie in (0, 1] (step(emax)
 * is in [2^(emax >> 3), 2^((emax >> 3) + 1)) and lands in [1/2, 1) at e_need; with a bound the
 * largest lands lower, which costs bits only to steps that fp16 then holds as subnormals, an
 * error below 2^-25 absolute), with e small enough that O^T's rescaling factors stay normal
 * floats (the caller checks |e| <= 60). (emax >> 3) + 1 of the unbiased code: 823 + 1 = 103 * 8.
 * Values keep e_keep, O^T's, when it suits (no rescale). */
template <int TS> __device__ __forceinline__ int v3_fast_e(int emax, int e_keep) {
  const int e_need = ((emax + 1) >> 3) - 102;
  return TS == 1 && (uint32_t)(e_keep - e_need) <= 3u ? e_keep : e_need; /* e_need..e_need + 3 */
}

/* v3_sec of a section read by v3_header (s.step: absolute mode's alone, set there). Written only
 * on the way out of SRC_GEN and SRC_FAST (SRC_BAD's is never read), so that the early returns
 * carry no register copies. */
__device__ __forceinline__ void v3_set_sec(const v3_hdr &h, int mode, int e, v3_sec &s) {
  s.w = h.w;
  s.last = h.nwords - 1;
  s.meta = h.meta;
  s.width = (int)h.width;
  s.mode = mode;
  s.e = e;
}

/* SRC_GEN's tables of a relative-mode section: its groups' bases and steps. */
template <int HD, int TS>
__device__ __forceinline__ void v3_gen_tables(const v3_hdr &h, const v3_groups<HD, TS> &gr,
                                              int t_lo, uint8_t *scr, v3_sec &s) {
  const int lane = lane_id();
  int32_t *wb = (int32_t *)(scr + (TS ? v3_scratch<HD>::vbase : v3_scratch<HD>::kbase));
  float *ws = (float *)(scr + (TS ? v3_scratch<HD>::vstep : v3_scratch<HD>::kstep));
#pragma unroll
  for (int i = 0; i < v3_groups<HD, TS>::NG; i++)
    if (gr.in[i]) {
      int x;
      if constexpr (TS == 0) {
        const int pr = lane + 32 * (i / 2);
        x = k_channel<HD>(pr / (HD / 8), pr % (HD / 8), i % 2);
      } else {
        x = (t_lo + lane + 32 * i) & (kUnitTokens - 1);
      }
      wb[x] = (int32_t)(gr.u[i] + (1u << h.width) - 2048u);
      ws[x] = v3_step_x(gr.E[i]);
    }
  v3_set_sec(h, TS, 0, s);
}

/* SRC_FAST's tables of a relative-mode section of width 1..8 with the folded power of two e. */
template <int HD, int TS>
__device__ __forceinline__ void v3_fast_tables(const v3_hdr &h, const v3_groups<HD, TS> &gr,
                                               int t_lo, int e, uint8_t *scr, v3_sec &s) {
  const int lane = lane_id();
  /* (b - 2^W) / 2^W = u / 2^W - 2048 / 2^W in one FFMA, exact (u <= 4096; +0 for b = 2^W). */
  const float inv = pow2i(-e), winv = pow2i(-(int)h.width), wofs = -2048.f * winv;
  if constexpr (TS == 0) {
    /* Pair pr = lane + 32 (i / 2): pi = pr % (HD / 8) of lane j = pr / (HD / 8), i.e. the pi % 2-th
     * base and step pairs of uint4 kq_index(j, pi / 2). Its codes lie at bit r of their halves
     * (code_pair): operand u 2^(r - 24), so the steps take 2^-r and the bases b 2^(r - 24) = (u +
     * 2^W - 2048) 2^(r - 24), in one FFMA, exact (|b| <= 2048: v3_groups). HD / 8 divides 32, so
     * pi = lane % (HD / 8) for every pair of the lane: one r and one set of factors, computed
     * once (not per pair). */
    static_assert(32 % (HD / 8) == 0, "a lane's pairs share pi");
    const int pi = lane % (HD / 8);
    const int r = pair_r((int)h.width, 16 * (pi / 8) + pi % 8);
    const float rinv = inv * pow2i(-r), bm = pow2i(r - 24);
    const float bo = (float)((1 << h.width) - 2048) * bm;
    uint32_t *kq = (uint32_t *)(scr + v3_scratch<HD>::kq) +
                   4 * kq_index(lane / (HD / 8), pi / 2) + 2 * (pi % 2);
#pragma unroll
    for (int i = 0; i < v3_groups<HD, TS>::NG; i += 2) {
      /* j = pr / (HD / 8) moves by 32 / (HD / 8) per pair: kq_index(j, .) by as many uint4s */
      uint32_t *q = kq + 4 * (32 / (HD / 8)) * (i / 2);
      q[0] = pack2<__half>(fmaf(__uint2float_rn(gr.u[i]), bm, bo),
                           fmaf(__uint2float_rn(gr.u[i + 1]), bm, bo));
      q[1] = pack2<__half>(v3_step_x(gr.E[i]) * rinv, v3_step_x(gr.E[i + 1]) * rinv);
    }
    v3_set_sec(h, TS, e + 24, s); /* S^T's unit: (u + b) / 2^24 times Q * step * 2^-e */
  } else {
    /* Every one of the 64 entries (tokens past t_hi: 0). b / 2^W = u / 2^W + (1 - 2048 / 2^W):
     * exact, and in fp16 (|b| <= 2048: v3_groups). */
    const float fw = pow2i((int)h.width);
#pragma unroll
    for (int i = 0; i < v3_groups<HD, TS>::NG; i++) {
      const int x = (t_lo + lane + 32 * i) & (kUnitTokens - 1);
      ((float *)(scr + v3_scratch<HD>::vmul))[x] = v3_step_x(gr.E[i]) * inv * (gr.in[i] ? fw : 0.f);
      ((__half *)(scr + v3_scratch<HD>::vbt))[x] =
          __float2half_rn(gr.in[i] ? fmaf(__uint2float_rn(gr.u[i]), winv, wofs + 1.f) : 0.f);
    }
    v3_set_sec(h, TS, e, s);
  }
}

/*
 * Reads the header of a quantized section (sec, sec_bytes in the ring) of tensor TS (0 K, 1 V) of
 * a page of n_tokens, and fills the warp's scratch with what the builders need for page tokens
 * [t_lo, t_hi): group bases and steps (SRC_GEN), or SRC_FAST's tables. e_keep (values only): the
 * exponent the warp's O^T accumulates in, kept when it suits the section's steps (no rescale).
 * Warp-cooperative; returns the source kind (SRC_FAST, SRC_GEN or SRC_BAD for a section
 * inconsistent with the format), the same in every lane. The scratch of the tensor is rewritten:
 * the caller's earlier reads of it must be done, and its reads of what this writes wait for a
 * __syncwarp.
 * Each lane computes its groups' bases and step codes in registers (v3_groups) and writes only the
 * tables of the path chosen. One warp reduction (the largest step code: damaged codes and the
 * folded exponent) and one vote (every base in SRC_FAST's range) decide the path.
 */
template <int HD, class T, int TS, bool FAST>
__device__ __forceinline__ int v3_setup_section(const uint8_t *sec, uint32_t sec_bytes,
                                                int n_tokens, int t_lo, int t_hi, int e_keep,
                                                bool qfits, uint8_t *scr, v3_sec &s) {
  if (!v3_shape_ok(sec_bytes, n_tokens, t_lo, t_hi)) return SRC_BAD;
  v3_hdr h;
  if (!v3_header<HD, TS>(sec, sec_bytes, n_tokens, h)) return SRC_BAD;
  if (!h.rel) {
    /* Absolute mode: per-channel centres and the one step e_min, always SRC_GEN. */
    const int lane = lane_id();
    int32_t *wb = (int32_t *)(scr + (TS ? v3_scratch<HD>::vbase : v3_scratch<HD>::kbase));
    constexpr int NGC = HD / 32;
#pragma unroll
    for (int i = 0; i < NGC; i++) {
      const int pr = lane + 32 * (i / 2);
      const int g = k_channel<HD>(pr / (HD / 8), pr % (HD / 8), i % 2);
      wb[g] = (int32_t)(h.b_min + v3_field(h.w, (uint32_t)g * h.w_b, h.w_b));
    }
    v3_set_sec(h, 2, 0, s);
    s.step = v3_step(h.e_min);
    return SRC_GEN;
  }
  v3_groups<HD, TS> gr;
  v3_groups_read<HD, TS>(h, t_lo, t_hi, gr);
  const int emax = __reduce_max_sync(0xffffffffu, gr.emax);
  if (emax > KVC_STEP_CODE_MAX + 823) return SRC_BAD;
  /* fp16 operands (kFast16's comment); width 0 is a constant section, cheap on the generic
   * path. */
  bool fast = h.width - 1u < 8u && FAST && qfits;
  int e = 0;
  if (fast) {
    e = v3_fast_e<TS>(emax, e_keep);
    fast = __all_sync(0xffffffffu, gr.inb) && e >= -60 && e <= 60;
  }
  if (!fast) {
    v3_gen_tables<HD, TS>(h, gr, t_lo, scr, s);
    return SRC_GEN;
  }
  v3_fast_tables<HD, TS>(h, gr, t_lo, e, scr, s);
  return SRC_FAST;
}

/* The largest step code (as v3_groups' E) and whether every base is in SRC_FAST's range
 * (v3_groups::inb), for any groups of a relative-mode section of width 1..8, from its header
 * alone: each field holds fewer than 2^w_e (2^w_b) values above e_min (b_min). Bounds rather
 * than the groups' own values, so they need no warp reduction, and they hold for a damaged
 * section too. */
__device__ __forceinline__ int v3_hdr_emax(const v3_hdr &h) {
  return h.e_min + 823 + (int)(1u << h.w_e) - 1;
}
__device__ __forceinline__ bool v3_hdr_inb(const v3_hdr &h) {
  const uint32_t room = 4096u - (1u << h.width), span = (1u << h.w_b) - 1u;
  return span <= room && h.b_min - (1u << h.width) + 2048u <= room - span;
}

/*
 * Both sections of a bit-pack page (e_keep, scr: as v3_setup_section) when both are SRC_FAST, the
 * common case, read side by side: each section's setup is a chain of dependent steps (header,
 * fields, tables), and with the two chains in the same basic blocks each fills the other's
 * latencies. The path and the folded powers of two come from the headers (v3_hdr_emax,
 * v3_hdr_inb), not from the fields: no reduction or vote between the fields and the tables.
 * Returns true having written SRC_FAST's scratch and v3_secs for both, as v3_setup_section
 * would with those bounds in place of the groups' values; false (nothing written) otherwise, and
 * the caller runs v3_setup_section on each. (e <= 60 implies the step code check that
 * v3_setup_section makes first: e >= e_need, and e_need <= 60 needs emax <= 163 * 8 - 2, below
 * KVC_STEP_CODE_MAX + 823.)
 */
template <int HD>
__device__ __forceinline__ bool v3_setup_fast_pair(const unit_page &pg, const uint8_t *ub,
                                                   int e_keep, uint8_t *scr, v3_sec &ks,
                                                   v3_sec &vs) {
  const int t_lo = pg.ptok0, t_hi = pg.ptok0 + pg.nrows;
  if (!(v3_shape_ok(pg.k_bytes, pg.n_tokens, t_lo, t_hi) &
        v3_shape_ok(pg.v_bytes, pg.n_tokens, t_lo, t_hi)))
    return false;
  v3_hdr hk, hv;
  const bool kok = v3_header<HD, 0>(ub + pg.k_ring, pg.k_bytes, pg.n_tokens, hk);
  const bool vok = v3_header<HD, 1>(ub + pg.v_ring, pg.v_bytes, pg.n_tokens, hv);
  if (!(kok & vok & hk.rel & hv.rel & (hk.width - 1u < 8u) & (hv.width - 1u < 8u))) return false;
  const int ek = v3_fast_e<0>(v3_hdr_emax(hk), 0);
  const int ev = v3_fast_e<1>(v3_hdr_emax(hv), e_keep);
  if (!(v3_hdr_inb(hk) & v3_hdr_inb(hv) & ((uint32_t)(ek + 60) <= 120u) &
        ((uint32_t)(ev + 60) <= 120u)))
    return false;
  v3_groups<HD, 0> gk;
  v3_groups<HD, 1> gv;
  v3_groups_read<HD, 0>(hk, t_lo, t_hi, gk);
  v3_groups_read<HD, 1>(hv, t_lo, t_hi, gv);
  v3_fast_tables<HD, 0>(hk, gk, t_lo, ek, scr, ks);
  v3_fast_tables<HD, 1>(hv, gv, t_lo, ev, scr, vs);
  return true;
}

/* The exact value of code u at (t, d) of a section, as the CPU decoder computes it. */
__device__ __forceinline__ float v3_gen_recon(const v3_sec &s, const int32_t *gb, const float *gs,
                                              uint32_t u, int t, int d) {
  const int g = s.mode == 1 ? t & (kUnitTokens - 1) : d;
  const uint32_t b = (uint32_t)gb[g] + (s.mode == 2 ? (uint32_t)kvc_unzigzag(u) : u);
  return __fmul_rn(__int2float_rn((int)b), s.mode == 2 ? s.step : gs[g]);
}

/*
 * ---- S^T = K Q^T for tokens (unit rows) tb + g, tb + g + 8 --------------------------------------
 * Builders: s[p][nb] += the A operand of each k-block kb (p = kb % 2 where unrolled: two short
 * mma chains instead of one long one) times Q's B fragments qb[nb][kb]. A operand of k-block kb:
 * {token g pair 2kb, token g+8 pair 2kb, token g pair 2kb+1, token g+8 pair 2kb+1}, pair pi of a
 * token = channels k_channel(c, pi, 0) (low half) and k_channel(c, pi, 1) (high half).
 */
template <int HD, int NB> using qfrag_t = uint32_t[NB][HD / 16][2];

/* Rows of T: both tokens, one run of 16 channels (two 16-byte pieces per token) at a time.
 * Rows lie 2 HD bytes apart, so the quarter warp of an LDS.128 (tokens g and g + 1, lanes c 0-3)
 * would read the same bank group for both tokens; lanes of odd g (lane & 4) therefore read each
 * run's two pieces in the other order and take their byte permutes' operands swapped (selector
 * nibbles ^ 4). Conflicts per LDS.128: head_dim 128 2-way (was 4-way), head_dim 64 none (was
 * 2-way). */
template <int HD, class T, int NB, bool SWAP>
__device__ __forceinline__ void s_rows(const uint8_t *const (&row)[2], int c,
                                       const qfrag_t<HD, NB> &qb, float (&s)[2][NB][4]) {
  constexpr int NP = HD / 32; /* 16-byte pieces of a lane's HD/4 channels: 2 per run of 16 */
  const uint32_t odd = SWAP ? lane_id() & 4 : 0;
  const uint32_t swap = odd * 0x1111u; /* 0x4444 for odd g: swaps a byte permute's operands */
  const int first = (int)odd << 2;     /* byte offset of the piece read first: 16 for odd g */
#pragma unroll
  for (int gh = 0; gh < NP / 2; gh++) {
    uint32_t wd[2][8];
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
      for (int pc = 0; pc < 2; pc++) {
        const int off = pc ? 16 - first : first;
        const uint4 v = *(const uint4 *)(row[h] + ((c * NP + 2 * gh) << 4) + off);
        wd[h][4 * pc] = v.x;
        wd[h][4 * pc + 1] = v.y;
        wd[h][4 * pc + 2] = v.z;
        wd[h][4 * pc + 3] = v.w;
      }
#pragma unroll
    for (int kb = 4 * gh; kb < 4 * gh + 4; kb++) {
      uint32_t b[2][2];
#pragma unroll
      for (int h = 0; h < 2; h++)
#pragma unroll
        for (int x = 0; x < 2; x++) {
          const int ch = (2 * kb + x) % 8; /* channel of the low half in the run of 16 */
          const uint32_t sel = (ch % 2 ? 0x7632 : 0x5410) ^ swap;
          b[h][x] = __byte_perm(wd[h][ch / 2], wd[h][ch / 2 + 4], sel);
        }
      const uint32_t a[4] = {b[0][0], b[1][0], b[0][1], b[1][1]};
#pragma unroll
      for (int nb = 0; nb < NB; nb++) mma16816<T>(s[kb % 2][nb], a, qb[nb][kb][0], qb[nb][kb][1]);
    }
  }
}

/* A word of Q's B fragments times a lane's step pair st: Q' = Q * step * 2^-e, one rounding.
 * s_fast and s_fast_const round Q' alike, so both take it from here (or from q_page, which
 * applies it once per page), with q_resid's remainder. */
template <class T> __device__ __forceinline__ uint32_t q_scaled(uint32_t q, uint32_t st) {
  if constexpr (kFast16<T>) {
    return h2_bits<__half2>(__hmul2(as_h2<__half2>(q), as_h2<__half2>(st)));
  } else { /* bf16 Q times the fp16 steps in float, one rounding to fp16 */
    const float2 a = __bfloat1622float2(as_h2<__nv_bfloat162>(q));
    const float2 b = __half22float2(as_h2<__half2>(st));
    return h2_bits<__half2>(__floats2half2_rn(a.x * b.x, a.y * b.y));
  }
}

/* What q_scaled's rounding dropped from the word q times st: Q * step * 2^-e - Q' (qh), rounded
 * to fp16 (fp16: one HFMA2). The keys' fast path multiplies the codes by Q' and by this, so
 * that Q' errs by ~2^-22 instead of ~2^-12: Q' alone errs alike for every token of a page (a
 * query perturbed per channel), which attention does not average out; fp16 outputs erred up
 * to 1.8e-3 at head_dim 64 and 8,000 tokens, growing with the context (session 37). */
template <class T>
__device__ __forceinline__ uint32_t q_resid(uint32_t q, uint32_t st, uint32_t qh) {
  if constexpr (kFast16<T>) {
    return h2_bits<__half2>(
        __hfma2(as_h2<__half2>(q), as_h2<__half2>(st), __hneg2(as_h2<__half2>(qh))));
  } else { /* bf16 Q's product is exact in float (8 + 11 significant bits) */
    const float2 a = __bfloat1622float2(as_h2<__nv_bfloat162>(q));
    const float2 b = __half22float2(as_h2<__half2>(st));
    const float2 h = __half22float2(as_h2<__half2>(qh));
    return h2_bits<__half2>(__floats2half2_rn(fmaf(a.x, b.x, -h.x), fmaf(a.y, b.y, -h.y)));
  }
}

/* Q's fragments from shared address qa (the CTA's copy, v3_layout::qf_off), with opaque loads:
 * ptxas would otherwise keep the Q tile's halves and rebuild the fragments from them at their
 * uses (two PRMTs per k-block in every slab of the bit-pack builders). */
template <int HD, int NB>
__device__ __forceinline__ void q_load(uint32_t qa, qfrag_t<HD, NB> &q) {
  constexpr int NQ = (int)sizeof(qfrag_t<HD, NB>) / 16; /* uint4s: two k-blocks each */
#pragma unroll
  for (int i = 0; i < NQ; i++) {
    const int nb = i / (HD / 32), kb = 2 * (i % (HD / 32));
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(q[nb][kb][0]), "=r"(q[nb][kb][1]), "=r"(q[nb][kb + 1][0]),
                   "=r"(q[nb][kb + 1][1])
                 : "r"(qa + 16 * i)
                 : "memory");
  }
}

/* Whether this lane supplies Q' 's remainder rather than Q': with lo4 (the kernel's), the lanes of
 * odd g, which supply the B operand's odd columns. */
__device__ __forceinline__ bool remainder_lane(bool lo4) { return lo4 && (lane_id() & 4); }

/* The B operands of SRC_FAST keys for k-block kb and n-block nb: Q' (q) and with HL its
 * remainder (l); lanes with lo (lo4, odd g) take the remainder as q. PRE: from qb and ql as
 * q_page left them, else formed here from Q (qb) and the step pairs sb. */
template <int HD, int NB, class T, bool PRE, bool HL>
__device__ __forceinline__ void fast_q(const qfrag_t<HD, NB> &qb, const qfrag_t<HD, NB> &ql,
                                       const uint4 &sb, int nb, int kb, bool lo, uint32_t (&q)[2],
                                       uint32_t (&l)[2]) {
#pragma unroll
  for (int x = 0; x < 2; x++) {
    const uint32_t st = x ? sb.w : sb.y;
    q[x] = PRE ? qb[nb][kb][x] : q_scaled<T>(qb[nb][kb][x], st);
    l[x] = 0u;
    if constexpr (HL) {
      l[x] = PRE ? ql[nb][kb][x] : q_resid<T>(qb[nb][kb][x], st, q[x]);
      if (!PRE && lo) q[x] = l[x];
    }
  }
}

/* Bit-pack fast path: the exact u 2^(r - 24) of each code times Q' = Q * step * 2^(-e - r),
 * added to s_fast_const's sums (the bases; KC: s[0] starts from them, else the caller adds them,
 * s being 0). With HL, times Q' 's remainder too: with lo4 in the odd columns of the same mma
 * (the caller adds each to the even column before it), else into sl (two more mma chains,
 * zeroed by the caller, who adds them to s: fp16 (8, 32k) 10% slower than without the
 * remainder; in s's own chains, twice as long, 13%). PRE: qb and ql hold the operands already
 * (q_page), else qb is Q (ql unused). */
template <int HD, int W, int NB, class T, bool PRE, bool HL, bool KC = true>
__device__ __forceinline__ void s_fast(const token_runs<2> &tr, const uint8_t *scr, int c,
                                       const qfrag_t<HD, NB> &qb, const qfrag_t<HD, NB> &ql,
                                       bool lo4, float (&s)[2][NB][4], float (&sl)[2][NB][4]) {
  const bool lo = remainder_lane(lo4);
  /* The lane's HD / 4 channels in NH parts of 32 at most, a part's run loaded before its
   * k-blocks (head_dim 256: two, so that half the codes are live at a time). */
  constexpr int NC = HD / 4, NH = NC > 32 ? NC / 32 : 1, NCP = NC / NH, KBP = HD / 16 / NH;
  constexpr int NA = (NCP * W + 31) / 32;
  static_assert(NH == 1 || NCP * W % 32 == 0, "a part's run starts at a whole word of the first");
  const uint4 *kq = (const uint4 *)(scr + v3_scratch<HD>::kq);
  if constexpr (KC) {
    /* With lo4, the odd columns hold only the remainder's terms, which the caller adds to the
     * even ones: the sums start there alone. */
    const float2 *kc = (const float2 *)(scr + v3_scratch<HD>::kc) + lane_id() * NB;
#pragma unroll
    for (int nb = 0; nb < NB; nb++) {
      const float2 k0 = kc[nb];
#pragma unroll
      for (int e = 0; e < 4; e++) s[0][nb][e] = e & 1 ? (lo4 ? 0.f : k0.y) : k0.x;
    }
  }
#pragma unroll
  for (int part = 0; part < NH; part++) {
    uint32_t a[2][NA];
    /* Key codes start at a multiple of HD bits (HD groups' fields before them). */
    load_token_runs<HD, W, NA, run_align_words(HD, NCP, W)>(tr, part * NCP * W / 32, a);
#pragma unroll
    for (int kb = part * KBP; kb < (part + 1) * KBP; kb++) {
      uint4 sb = make_uint4(0u, 0u, 0u, 0u); /* the step pairs (y, w), unless Q' is given */
      if constexpr (!PRE) sb = kq[kq_index(c, kb)];
      uint32_t b[2][2];
#pragma unroll
      for (int h = 0; h < 2; h++)
#pragma unroll
        for (int x = 0; x < 2; x++) {
          const int pi = 2 * kb + x, ch = 16 * (pi / 8) + pi % 8 - part * NCP;
          b[h][x] = code_pair<W, NA>(a[h], a[h], ch, ch + 8);
        }
      const uint32_t av[4] = {b[0][0], b[1][0], b[0][1], b[1][1]};
#pragma unroll
      for (int nb = 0; nb < NB; nb++) {
        uint32_t q[2], l[2];
        fast_q<HD, NB, T, PRE, HL>(qb, ql, sb, nb, kb, lo, q, l);
        mma16816<__half>(s[kb % 2][nb], av, q[0], q[1]);
        if (HL && !lo4) mma16816<__half>(sl[kb % 2][nb], av, l[0], l[1]);
      }
    }
  }
}

/* The base sums' two chains, zeroed (s_fast_const, q_page). */
template <int NB> __device__ __forceinline__ void kc_zero(float (&acc)[2][NB][4]) {
#pragma unroll
  for (int p = 0; p < 2; p++)
#pragma unroll
    for (int nb = 0; nb < NB; nb++)
#pragma unroll
      for (int e = 0; e < 4; e++) acc[p][nb][e] = 0.f;
}

/* One k-block kb of the keys' per-entry base sums (s_fast_const, q_page): rows g of the A operand
 * are the base terms, rows g + 8 take the steps, whose products are not used (the uint4 sb is
 * the operand as loaded, without register copies); B is Q' (and with HL its remainder) as
 * fast_q gives it. Two mma chains (even and odd k-blocks), as in s_fast: the sums run between the
 * page setup and the page's first softmax, on the unit's serial path. */
template <int HD, int NB, class T, bool PRE, bool HL>
__device__ __forceinline__ void kc_block(float (&acc)[2][NB][4], const uint4 &sb,
                                         const qfrag_t<HD, NB> &qb, const qfrag_t<HD, NB> &ql,
                                         int kb, bool lo, bool lo4) {
  const uint32_t av[4] = {sb.x, sb.y, sb.z, sb.w};
#pragma unroll
  for (int nb = 0; nb < NB; nb++) {
    uint32_t q[2], l[2];
    fast_q<HD, NB, T, PRE, HL>(qb, ql, sb, nb, kb, lo, q, l);
    mma16816<__half>(acc[kb % 2][nb], av, q[0], q[1]);
    if (HL && !lo4) mma16816<__half>(acc[(kb + 1) % 2][nb], av, l[0], l[1]);
  }
}

/* s_fast_const's two chains' sums into the scratch's kc (rows g: the base terms; with HL and lo4,
 * column 2c + 1 holds the remainder's terms of column 2c's entry). */
template <int HD, int NB, bool HL>
__device__ __forceinline__ void store_kc(uint8_t *scr, const float (&acc)[2][NB][4], bool lo4) {
  float2 *kc = (float2 *)(scr + v3_scratch<HD>::kc) + lane_id() * NB;
#pragma unroll
  for (int nb = 0; nb < NB; nb++) {
    float2 k = make_float2(acc[0][nb][0] + acc[1][nb][0], acc[0][nb][1] + acc[1][nb][1]);
    if (HL && lo4) k.x += k.y;
    kc[nb] = k;
  }
}

/* What SRC_FAST keys add to every token's S^T, per entry: sum over channels of Q' b 2^(r - 24),
 * with Q' (and with HL its remainder) as s_fast takes them, formed here from Q (qb) and the step
 * pairs. Once per page, into the scratch (v3_scratch<HD>::kc). For the instances without PRE
 * (with it, q_page makes these sums with Q'). lo4: as s_fast's. */
template <int HD, int NB, class T, bool HL>
__device__ __forceinline__ void s_fast_const(uint8_t *scr, int c, const qfrag_t<HD, NB> &qb,
                                             const qfrag_t<HD, NB> &ql, bool lo4) {
  const bool lo = remainder_lane(lo4);
  const uint4 *kq = (const uint4 *)(scr + v3_scratch<HD>::kq);
  float acc[2][NB][4];
  kc_zero<NB>(acc);
#pragma unroll
  for (int kb = 0; kb < HD / 16; kb++) {
    const uint4 sb = kq[kq_index(c, kb)];
    kc_block<HD, NB, T, false, HL>(acc, sb, qb, ql, kb, lo, lo4);
  }
  store_kc<HD, NB, HL>(scr, acc, lo4);
}

/* The operands of a page's SRC_FAST keys, and s_fast_const's sums with them, in one pass over the
 * k-blocks (PRE): Q' (q_scaled) of every k-block in place of Q's fragments q, and with HL its
 * remainder (q_resid): in ql, or with lo4 in place of q in lanes of odd g (the kernel's lo4).
 * From the page's step pairs in the scratch, once per page instead of once per slab (s_fast's
 * PRE): an fp16 word takes an HMUL2, an HFMA2 and a select, a bf16 word seven instructions. Each
 * k-block's pairs are loaded once and its mma issued as soon as its Q' is formed; the sums are
 * those s_fast_const would make from q and ql afterwards, bit for bit (the same operands, chains
 * and order). */
template <int HD, int NB, class T, bool HL>
__device__ __forceinline__ void q_page(uint8_t *scr, int c, qfrag_t<HD, NB> &q,
                                       qfrag_t<HD, NB> &ql, bool lo4) {
  const uint4 *kq = (const uint4 *)(scr + v3_scratch<HD>::kq);
  const bool lo = remainder_lane(lo4);
  float acc[2][NB][4];
  kc_zero<NB>(acc);
#pragma unroll
  for (int kb = 0; kb < HD / 16; kb++) {
    const uint4 sb = kq[kq_index(c, kb)];
#pragma unroll
    for (int nb = 0; nb < NB; nb++)
#pragma unroll
      for (int x = 0; x < 2; x++) {
        const uint32_t st = x ? sb.w : sb.y, qh = q_scaled<T>(q[nb][kb][x], st);
        if constexpr (HL) {
          const uint32_t rl = q_resid<T>(q[nb][kb][x], st, qh);
          ql[nb][kb][x] = rl;
          q[nb][kb][x] = lo ? rl : qh;
        } else {
          q[nb][kb][x] = qh;
        }
      }
    kc_block<HD, NB, T, true, HL>(acc, sb, q, ql, kb, lo, lo4);
  }
  store_kc<HD, NB, HL>(scr, acc, lo4);
}

/* The generic path is rare (non-default sections): k-block by k-block, not unrolled, so that it
 * adds no register pressure to the kernel's fast paths. */
template <int HD, class T, int NB>
__device__ __forceinline__ void s_gen(const v3_sec &sec, const uint8_t *scr, int c,
                                      const int (&pt)[2], const qfrag_t<HD, NB> &qb,
                                      float (&s)[2][NB][4]) {
  const int32_t *gb = (const int32_t *)(scr + v3_scratch<HD>::kbase);
  const float *gs = (const float *)(scr + v3_scratch<HD>::kstep);
  auto key = [&](int t, int d) { /* keys are linear */
    const uint32_t pos = sec.meta + (uint32_t)(t * HD + d) * sec.width;
    const uint32_t u = kvc_dev_top(kvc_dev_window(sec.w, sec.last, pos), (uint32_t)sec.width);
    return v3_gen_recon(sec, gb, gs, u, t, d);
  };
#pragma unroll 1
  for (int kb = 0; kb < HD / 16; kb++) {
    uint32_t b[2][2];
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
      for (int x = 0; x < 2; x++)
        b[h][x] = pack2<T>(key(pt[h], k_channel<HD>(c, 2 * kb + x, 0)),
                           key(pt[h], k_channel<HD>(c, 2 * kb + x, 1)));
    const uint32_t a[4] = {b[0][0], b[1][0], b[0][1], b[1][1]};
#pragma unroll
    for (int nb = 0; nb < NB; nb++) mma16816<T>(s[0][nb], a, qb[nb][kb][0], qb[nb][kb][1]);
  }
}

/* The builder of a page's operands, as one switch value: 0 rows, W in 1..8 SRC_FAST of width W,
 * 9 SRC_GEN (HUF's sources have their own builders). v3_s and v3_pv switch on it once per slab:
 * the kind and width tests before them were a tree of up to six dependent branches per tensor
 * and slab. */
__device__ __forceinline__ int v3_sel(const v3_src &s) {
  return s.kind == SRC_FAST ? s.sec.width : s.kind == SRC_ROWS ? 0 : 9;
}

/* S^T from source ks for rows tr of the current page's rows in the unit. PRE: qb is the page's
 * operand (Q' for SRC_FAST keys, else Q; the kernel's qx), else Q. qf: SRC_FAST's Q, of type TQ
 * (qb, or without PRE its fp16 copy: the kernel's Q16); ql: with PRE, Q' 's remainder (q_page).
 * qs: Q's fragments for the generic path's indexed reads (the CTA's copy in shared memory). HL,
 * lo4, sl: s_fast's. */
template <int HD, class T, int NB, bool FAST, bool SWAP, bool PRE, bool HL, class TQ>
__device__ __forceinline__ void v3_s(const v3_src &ks, const uint8_t *scr, int c,
                                     const int (&tr)[2], const qfrag_t<HD, NB> &qb,
                                     const qfrag_t<HD, NB> &qf, const qfrag_t<HD, NB> &ql,
                                     const qfrag_t<HD, NB> &qs, bool lo4, float (&s)[2][NB][4],
                                     float (&sl)[2][NB][4]) {
  const int pt[2] = {ks.ptok0 + tr[0], ks.ptok0 + tr[1]};
  auto runs = [&](auto w) {
    return token_runs_of<HD, decltype(w)::value>(ks.sec.w, ks.sec.meta, c * (HD / 4), pt);
  };
  switch (v3_sel(ks)) {
  case 0: {
    const uint8_t *row[2] = {ks.rows + tr[0] * (2 * HD), ks.rows + tr[1] * (2 * HD)};
    s_rows<HD, T, NB, SWAP>(row, c, qb, s);
    break;
  }
#define KVC__KF(W)                                                                                 \
  case W:                                                                                          \
    if constexpr (FAST)                                                                            \
      s_fast<HD, W, NB, TQ, PRE, HL>(runs(std::integral_constant<int, W>()), scr, c, qf, ql, lo4, \
                                     s, sl);                                                      \
    break;
    KVC__KF(1) KVC__KF(2) KVC__KF(3) KVC__KF(4) KVC__KF(5) KVC__KF(6) KVC__KF(7) KVC__KF(8)
#undef KVC__KF
  default:
    s_gen<HD, T, NB>(ks.sec, scr, c, pt, qs, s);
  }
}

/*
 * ---- O^T += V^T P^T for the 16 tokens; lane supplies tokens pt = (2c, 2c+1, 2c+8, 2c+9) ------
 * A operand of m-tile mt: {channel v_channel(mt, g) tokens (2c, 2c+1), v_channel(mt, g + 8) the
 * same tokens, then both channels at tokens (2c+8, 2c+9)}; channels v_channel(mt, g + 8 r) =
 * g HD/8 + 2 mt + r: position 2 mt + r of the lane's run.
 */
template <int HD, int NB> using oacc_t = float[HD / 16][NB][4];

/* The m-tiles [m0, m1) of O^T += V^T P^T; pair(mt, r, lo, hi) builds row r's (0, 1) token pairs:
 * lo = tokens (2c, 2c+1), hi = tokens (2c+8, 2c+9). Every source shares this skeleton. */
template <class T, int MT, int NB, class F>
__device__ __forceinline__ void pv_tiles(const uint32_t (&pb)[NB][2], float (&o)[MT][NB][4], int m0,
                                         int m1, F &&pair) {
#pragma unroll
  for (int mt = m0; mt < m1; mt++) {
    uint32_t lo[2], hi[2];
#pragma unroll
    for (int r = 0; r < 2; r++) pair(mt, r, lo[r], hi[r]);
    const uint32_t a[4] = {lo[0], lo[1], hi[0], hi[1]};
#pragma unroll
    for (int nb = 0; nb < NB; nb++) mma16816<T>(o[mt][nb], a, pb[nb][0], pb[nb][1]);
  }
}

/* Rows of V: lane g's HD / 8 channels of four tokens. The four lanes c of a quarter warp read
 * the same channels of different rows, 2 HD bytes apart: at head_dim 128 (two pieces per lane)
 * lanes of odd c (lane & 1) read their pieces in the other order and select them back, so that
 * an LDS.128 meets 2-way conflicts instead of 4-way (SWAP; one SEL per word). */
template <int HD, class T, int NB, bool SWAP>
__device__ __forceinline__ void pv_rows(const uint8_t *const (&row)[4], int g,
                                        const uint32_t (&pb)[NB][2], oacc_t<HD, NB> &o) {
  constexpr int NP = HD / 64; /* 16-byte pieces of a lane's HD/8 channels */
  constexpr bool SW = SWAP && NP == 2;
  const bool odd = SW && (lane_id() & 1);
  uint32_t ld[NP][4][4]; /* [read][token][word]: read i is piece i ^ odd */
#pragma unroll
  for (int i = 0; i < NP; i++)
#pragma unroll
    for (int t = 0; t < 4; t++) {
      const int off = !SW ? 16 * i : i ? 16 - 16 * odd : 16 * odd; /* of piece i ^ odd */
      const uint4 v = *(const uint4 *)(row[t] + ((g * NP) << 4) + off);
      ld[i][t][0] = v.x;
      ld[i][t][1] = v.y;
      ld[i][t][2] = v.z;
      ld[i][t][3] = v.w;
    }
#pragma unroll
  for (int pc = 0; pc < NP; pc++) {
    uint32_t wd[4][4];
#pragma unroll
    for (int t = 0; t < 4; t++)
#pragma unroll
      for (int x = 0; x < 4; x++) wd[t][x] = SW && odd ? ld[pc ^ 1][t][x] : ld[pc][t][x];
    auto pair = [&](int mt, int r, uint32_t &lo, uint32_t &hi) {
      const int n = (2 * mt + r) % 8; /* position in the piece */
      const uint32_t sel = n % 2 ? 0x7632 : 0x5410;
      lo = __byte_perm(wd[0][n / 2], wd[1][n / 2], sel);
      hi = __byte_perm(wd[2][n / 2], wd[3][n / 2], sel);
    };
    pv_tiles<T>(pb, o, 4 * pc, 4 * pc + 4, pair);
  }
}

/* ---- values of paired sections (kvc_page_format.h): a word of a token pair's block holds 16 row
 * bits of both tokens, the even token's in its low half, so one word gives a code's fp16 operand
 * pair (tokens 2c, 2c + 1 or 2c + 8, 2c + 9: the A operand's k order) in a LOP3 or two. */

/* Words of a paired block (two tokens' rows) of width W. */
template <int HD, int W> constexpr int vpair_block_words() { return HD * W / 16; }

/* Words of a lane's run (HD / 8 channels) as vpair_load gives it: at head_dim 64 a run of odd
 * width starts mid-half for odd g, and is realigned from one word more. */
template <int HD, int W> constexpr int vpair_run_words() {
  return HD == 64 ? (W + 1) / 2 : HD * W / 128;
}

/* The first word of lane g's run in the block of page token t, codes from word s.meta / 32 on. */
template <int HD, int W>
__device__ __forceinline__ const uint32_t *vpair_at(const v3_sec &s, int t, int g) {
  return s.w + (s.meta >> 5) + (t >> 1) * vpair_block_words<HD, W>() +
         ((g * (HD / 8) * W) >> 4);
}

/* Lane g's run from p, so that its code n lies at run bit n W: the halves of words from 8 bits
 * on (PRMT 0x2705: a half's low byte, then the next half's high byte) where the run starts
 * mid-half. No clamps: v3_header checked that the section holds its blocks, and the one word past
 * a block at most is the layout's slack. */
template <int HD, int W, int NR = vpair_run_words<HD, W>()>
__device__ __forceinline__ void vpair_load(const uint32_t *p, uint32_t (&a)[NR]) {
  if constexpr (HD == 64 && (W & 1)) {
    const uint32_t sel = lane_id() & 4 ? 0x2705u : 0x3210u; /* odd g */
    uint32_t x[NR + 1];
#pragma unroll
    for (int m = 0; m <= NR; m++) x[m] = p[m];
#pragma unroll
    for (int m = 0; m < NR; m++) a[m] = __byte_perm(x[m], x[m + 1], sel);
  } else {
#pragma unroll
    for (int m = 0; m < NR; m++) a[m] = p[m];
  }
}

/* Where vpair_code puts code n of a run of width W: its lsb at bit r of each half, r + W <= 11, so
 * that the half is exactly u 2^(r - 24) in fp16 (bits below 2^11 read as a subnormal or as
 * exponent field 1, both u 2^-24). A code at bits [f, f + W) of its 16-bit unit (f from the top):
 * as it lies (r = 16 - f - W) for f >= 5, else shifted right by 5; a code that crosses into the
 * next unit: from the PRMT of both halves' neighbouring bytes, as it lies there (r = 24 - f - W)
 * for f >= 13, else shifted to r = 11 - W. */
__host__ __device__ constexpr int vpair_r(int W, int n) {
  const int f = n * W & 15;
  return f + W <= 16 ? (f >= 5 ? 16 - f - W : 11 - f - W) : (f >= 13 ? 24 - f - W : 11 - W);
}

/* Code n of both tokens of a run (vpair_load) as the operand pair u 2^(vpair_r(W, n) - 24): a
 * LOP3, after a shift or a PRMT for some. */
template <int W, int NR>
__device__ __forceinline__ uint32_t vpair_code(const uint32_t (&a)[NR], int n) {
  const int j = n * W >> 4, f = n * W & 15, r = vpair_r(W, n);
  const uint32_t mask = (((1u << W) - 1u) << r) * 0x10001u;
  if (f + W <= 16) return (a[j] >> (16 - f - W - r)) & mask;
  return (__byte_perm(a[j], a[j + 1], 0x2705u) >> (24 - f - W - r)) & mask;
}

/* Bit-pack fast path: each code u as the fp16 u 2^(vpair_r(W, n) - 24), n its channel's offset in
 * the lane's run, from the runs at pa (tokens 2c, 2c + 1) and pb (2c + 8, 2c + 9) (P' = P * step *
 * 2^(W - e), built by the caller, which also adds what the bases give every channel to its vcorr).
 * Row n of O^T accumulates in units of 2^lg(W, n) (o_units). */
template <int HD, int W, int NB>
__device__ __forceinline__ void pv_fast(const uint32_t *pa, const uint32_t *pb_,
                                        const uint32_t (&pb)[NB][2], oacc_t<HD, NB> &o) {
  constexpr int NR = vpair_run_words<HD, W>();
  uint32_t a[NR], b[NR];
  vpair_load<HD, W>(pa, a);
  vpair_load<HD, W>(pb_, b);
  pv_tiles<__half>(pb, o, 0, HD / 16, [&](int mt, int r, uint32_t &lo, uint32_t &hi) {
    lo = vpair_code<W>(a, 2 * mt + r);
    hi = vpair_code<W>(b, 2 * mt + r);
  });
}

/* vpair_r(W, n) for n = 0..15 as 4-bit fields (0 for W = 0), per width 0..8: o_units' table. */
constexpr uint64_t vpair_r_fields(int W) {
  uint64_t x = 0;
  for (int n = 0; n < 16 && W > 0; n++) x |= (uint64_t)vpair_r(W, n) << (4 * n);
  return x;
}
__constant__ uint64_t kVpairR[9] = {vpair_r_fields(0), vpair_r_fields(1), vpair_r_fields(2),
                                    vpair_r_fields(3), vpair_r_fields(4), vpair_r_fields(5),
                                    vpair_r_fields(6), vpair_r_fields(7), vpair_r_fields(8)};

/* O^T from units 2^(e + lg(w_from, n)) to 2^(e - de + lg(w_to, n)) per row n (its channel's
 * offset in the lane's run), lg(W, n) = 24 - W - vpair_r(W, n) while the values are SRC_FAST of
 * width W (pv_fast: 2^(24 - r) from the operand, 2^-W from P'), 0 for every other source (W = 0):
 * one factor for all when the width stays, else one per row n modulo 16 from kVpairR, computed
 * where it is used (a table of factors, or vpair_r at run time, held registers enough to spill at
 * the kernel's peak). O^T's register e of m-tile mt is row n = 2 mt + e / 2 (v_channel). */
template <int HD, int NB>
__device__ __forceinline__ void o_units(oacc_t<HD, NB> &o, int de, int w_from, int w_to) {
  if (w_from == w_to) {
    const float f = pow2i(de);
#pragma unroll
    for (int mt = 0; mt < HD / 16; mt++)
#pragma unroll
      for (int nb = 0; nb < NB; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[mt][nb][e] *= f;
    return;
  }
  const uint64_t rf = kVpairR[w_from], rt = kVpairR[w_to];
  const int base = de + (w_from ? 24 - w_from : 0) - (w_to ? 24 - w_to : 0);
#pragma unroll
  for (int mt = 0; mt < HD / 16; mt++)
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const int n4 = 4 * ((2 * mt + h) & 15);
      const float f = pow2i(base - (int)((rf >> n4) & 15u) + (int)((rt >> n4) & 15u));
#pragma unroll
      for (int nb = 0; nb < NB; nb++) {
        o[mt][nb][2 * h] *= f;
        o[mt][nb][2 * h + 1] *= f;
      }
    }
}

template <int HD, class T, int NB>
__device__ __forceinline__ void pv_gen(const v3_sec &s, const uint8_t *scr, int g,
                                       const int (&pt)[4], const uint32_t (&pb)[NB][2],
                                       oacc_t<HD, NB> &o) {
  const int32_t *gb = (const int32_t *)(scr + v3_scratch<HD>::vbase);
  const float *gs = (const float *)(scr + v3_scratch<HD>::vstep);
  /* Values are paired: tokens pt[0] and pt[2] are even and each the first of its block, pt[1]
   * and pt[3] the second but where rows past the page's are clamped, whose P is 0 (their codes
   * are then the block's second token's, their groups their own: a finite value). No clamps on
   * the words (one base address per block, not three clamped ones: they spilled at head_dim 256):
   * v3_header checked that the section holds its blocks, and a window reads at most two words
   * past its block's, inside the next block or the layout's slack. */
  const uint32_t wd = (uint32_t)s.width, bw = (uint32_t)HD * wd / 16;
  const uint32_t *b0 = s.w + (s.meta >> 5) + ((uint32_t)pt[0] >> 1) * bw;
  const uint32_t *b2 = s.w + (s.meta >> 5) + ((uint32_t)pt[2] >> 1) * bw;
  auto pair = [&](int mt, int r, uint32_t &lo, uint32_t &hi) {
    const int d = g * (HD / 8) + 2 * mt + r;
    const uint32_t i = (uint32_t)d * wd, j = i >> 4;
    uint32_t u[4];
    bp_pair_windows(b0[j], b0[j + 1], b0[j + 2], i & 15, u[0], u[1]);
    bp_pair_windows(b2[j], b2[j + 1], b2[j + 2], i & 15, u[2], u[3]);
#pragma unroll
    for (int k = 0; k < 4; k++) u[k] = kvc_dev_top(u[k], wd);
    lo = pack2<T>(v3_gen_recon(s, gb, gs, u[0], pt[0], d), v3_gen_recon(s, gb, gs, u[1], pt[1], d));
    hi = pack2<T>(v3_gen_recon(s, gb, gs, u[2], pt[2], d), v3_gen_recon(s, gb, gs, u[3], pt[3], d));
  };
  pv_tiles<T>(pb, o, 0, HD / 16, pair);
}

/* O^T += V^T P^T from source vs for rows tv of the current page's rows in the unit. */
template <int HD, class T, int NB, bool FAST, bool SWAP>
__device__ __forceinline__ void v3_pv(const v3_src &vs, const uint8_t *scr, int g,
                                      const int (&tv)[4], const uint32_t (&pb)[NB][2],
                                      oacc_t<HD, NB> &o) {
  const int pt[4] = {vs.ptok0 + tv[0], vs.ptok0 + tv[1], vs.ptok0 + tv[2], vs.ptok0 + tv[3]};
  switch (v3_sel(vs)) {
  case 0: {
    const uint8_t *row[4] = {vs.rows + tv[0] * (2 * HD), vs.rows + tv[1] * (2 * HD),
                             vs.rows + tv[2] * (2 * HD), vs.rows + tv[3] * (2 * HD)};
    pv_rows<HD, T, NB, SWAP>(row, g, pb, o);
    break;
  }
  /* Tokens pt[0] and pt[2] are even (units and pages start at even tokens), and pt[1], pt[3] the
   * next ones but where rows past the page's are clamped (their P is 0: any finite operand). */
#define KVC__PV(W)                                                                                 \
  case W:                                                                                          \
    if constexpr (FAST)                                                                            \
      pv_fast<HD, W, NB>(vpair_at<HD, W>(vs.sec, pt[0], g), vpair_at<HD, W>(vs.sec, pt[2], g), pb, \
                         o);                                                                       \
    break;
    KVC__PV(1) KVC__PV(2) KVC__PV(3) KVC__PV(4) KVC__PV(5) KVC__PV(6) KVC__PV(7) KVC__PV(8)
#undef KVC__PV
  default:
    pv_gen<HD, T, NB>(vs.sec, scr, g, pt, pb, o);
  }
}

}  // namespace kvc_attn

#include "attention/kvc_attn_probe.cuh"
#include "attention/kvc_attn_v3_huf.cuh"

namespace kvc_attn {

/*
 * The K and V sources of page pg of the unit at ub (the warp's scratch, and with HUF its Huffman
 * area, are rewritten; e_keep: the exponent O^T accumulates in). Warp-uniform; false for a page v3
 * cannot read (damaged section, Huffman without HUF, or unknown class). A new source plugs in here
 * and in v3_s / v3_pv (Huffman's builders read its tile: the kernel calls them).
 */
template <int HD, class T, bool HUF, bool FAST>
__device__ __forceinline__ bool v3_page_setup(const unit_page &pg, const uint8_t *ub, uint8_t *scr,
                                              uint8_t *harea, int e_keep, bool qfits, v3_src &ks,
                                              v3_src &vs) {
  ks.ptok0 = vs.ptok0 = pg.ptok0;
  if (pg.cls == PG_STAGING || pg.cls == PG_RAW) {
    ks.kind = vs.kind = SRC_ROWS;
    ks.rows = ub + pg.k_ring;
    vs.rows = ub + pg.v_ring;
    return true;
  }
  if constexpr (HUF) {
    if (pg.cls == PG_HUFFMAN) return v3h_page_setup<HD, T>(pg, ub, scr, harea, ks, vs);
  }
  /* Huffman without HUF (or unknown): the launcher should have chosen another instance. */
  if (pg.cls != PG_BITPACK) return false;
  __syncwarp(); /* the previous page's readers are done with the scratch */
  bool both_fast = false;
  if constexpr (FAST)
    if (qfits) both_fast = v3_setup_fast_pair<HD>(pg, ub, e_keep, scr, ks.sec, vs.sec);
  if (both_fast) {
    ks.kind = vs.kind = SRC_FAST;
  } else {
    const int t_lo = pg.ptok0, t_hi = pg.ptok0 + pg.nrows;
    ks.kind = v3_setup_section<HD, T, 0, FAST>(ub + pg.k_ring, pg.k_bytes, pg.n_tokens, t_lo,
                                               t_hi, 0, qfits, scr, ks.sec);
    vs.kind = v3_setup_section<HD, T, 1, FAST>(ub + pg.v_ring, pg.v_bytes, pg.n_tokens, t_lo,
                                               t_hi, e_keep, qfits, scr, vs.sec);
  }
  __syncwarp();
  return ks.kind != SRC_BAD && vs.kind != SRC_BAD;
}

/* Where the epilogue stashes values 4 G .. 4 G + 3 of stash entry wi = 16 w + 8 nb + 2 c + x
 * (warp w's query entry 8 nb + 2 c + x), as an offset in floats: row 16 w + 8 nb + 4 x + c of HD
 * floats, granule G ^ (c | ((G >> 3) & 1) << 2). A lane holds runs of HD / 8 channels of its
 * entries, so it stores whole granules, and a quarter-warp's 16-byte stores (lanes of four c, two
 * g) meet in eight bank groups (head_dim 128, 256; four at 64), where one float per store into
 * rows in entry order met 16-way (head_dim 128) to 32-way (256) bank conflicts. The merge's reads
 * stay 2-way, as before. */
template <int HD> __device__ __forceinline__ int v3_stash_off(int wi, int G) {
  const int c = (wi & 7) >> 1, row = (wi & ~7) + 4 * (wi & 1) + c;
  return row * HD + 4 * (G ^ (c | ((G >> 3) & 1) << 2));
}

/* ---- the kernel ------------------------------------------------------------------------------ */

/* The section widths the default error bounds give bit-pack pages (KVC_DEFAULT_K_BOUND and
 * _V_BOUND: keys 4 bits, values 3): pages with both take a copy of the slab loop with those
 * builders inlined, no dispatch on the width per slab and (whole slabs) no row clamps. The
 * decode instances (one query tile) at head_dim 64 and 128 carry it: the bit-pack kernel's, and
 * for bf16 the instance that takes every codec (fp16's then spilled, and its Huffman pages ran 3%
 * slower: session 30). At head_dim 64 it measured no faster in session 30, and 26-27% faster with
 * whole slabs and subnormal values (session 34). bench/NOTES-attention.md. */
constexpr int kHotKeyWidth = 4, kHotValueWidth = 3;
template <int HD, class T, int NB, bool HUF, bool FAST> constexpr bool v3_hot_widths() {
  return FAST && NB == 1 && HD <= 128 && (!HUF || !kFast16<T>);
}

/* Whether an instance takes part in launches of two passes (attn_kernel_v3's TP; params::huf_pass:
 * pass 1 runs an instance without Huffman, pass 2 a Huffman one). At head_dim 64 and 128 every
 * instance does; at 256 only those built for two passes, since pass 1's check made the bit-pack
 * instance that launches of one pass run 8-12% slower at (8, 32k): a flag set in the unit loop
 * (sessions 59, 61) and, for bf16, even today's check in the epilogue of bad CTAs alone
 * (bench/NOTES-attention.md, session 61). */
template <int HD> constexpr bool kTpDefault = HD < 256;

/* Whether a page of a sequence's units [begin, end) (of UT tokens; len: its tokens) is Huffman
 * coded by the directory's codec. Every thread of the CTA. */
template <int UT>
__device__ bool v3_units_huffman(const params &p, int seq, int len, int begin, int end) {
  const int bt_lg = 31 - __clz(p.block_tokens);
  const int j0 = (begin * UT) >> bt_lg;
  const int j1 = end > begin ? (min(end * UT, len) + p.block_tokens - 1) >> bt_lg : j0;
  const int32_t *ids = p.block_ids + p.block_indptr[seq];
  bool huf = false;
  for (int j = j0 + (int)threadIdx.x; j < j1; j += (int)blockDim.x) {
    /* The entry's second word: kind, nchunks, codec, first (allocator/kvc_pool_layout.h). */
    const uint32_t w = __ldg((const uint32_t *)(p.dir + ids[j]) + 1);
    huf |= (w & 0xffu) == KVC_PAGE_COMPRESSED && ((w >> 16) & 0xffu) == KVC_CODEC_HUFFMAN;
  }
  return __syncthreads_or(huf) != 0;
}

/*
 * Pass 2 of a launch in two passes (params::huf_pass; the Huffman instance): CTA c's units, those
 * pass 1 gave it in its units of UT << p.range_lg tokens (lim: the tokens a row sees), and whether
 * a page of them is Huffman coded by the directory's codec; where none is, pass 1 wrote the CTA's
 * results and it exits. Pass 1 leaves a CTA unwritten only where the same check finds one (and a
 * damaged page the directory calls Huffman gives NaN rows in both). Every thread of the CTA.
 */
template <int UT>
__device__ bool v3_pass2_range(const params &p, const cta_place &c, int len, int lim, int units,
                               int *begin, int *end) {
  const int ul = p.range_lg, ut1 = UT << ul;
  split_range(p, c, (lim + ut1 - 1) / ut1, begin, end);
  *begin <<= ul;
  *end = min(*end << ul, units);
  return v3_units_huffman<UT>(p, c.seq, len, *begin, *end);
}

/* NB n-blocks of 8 query entries per CTA (one query tile). HUF: the instance for launches that may
 * meet Huffman pages (attention/kvc_attn_v3_huf.cuh). FAST: SRC_FAST is built (else bit-pack
 * sections take SRC_GEN); the Huffman instance for launches without bit-pack pages leaves it out,
 * since its code alone made the Huffman slabs 2.8% slower (bench/NOTES-attention.md, session 8).
 * UT: tokens per unit (v3_layout). CPS: CTAs per SM, the ring's share (v3_ring_bytes). LO4: the
 * instance for launches whose query tiles hold at most 4 entries each (lo4 below; fp16 without
 * Huffman only). TP: the instance takes part in launches of two passes (kTpDefault). */
template <int HD, class T, int NB, bool HUF, bool FAST, int UT, int CPS = 2, bool LO4 = false,
          bool TP = kTpDefault<HD>>
__global__ void __launch_bounds__(v3_layout_of<HD, HUF, UT, CPS>::type::threads, CPS)
    attn_kernel_v3(const params p) {
  static_assert(HUF || FAST, "without Huffman pages the fast path is what v3 is for");
  typedef v3_layout_of<HD, HUF, UT, CPS> LO;
  typedef typename LO::type SL;
  constexpr int NW = SL::warps; /* consumer warps: 0 .. NW - 1; warp NW is the producer */
  constexpr int NE = 8 * NB;
  extern __shared__ __align__(128) uint8_t smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = lane_id(), g = lane >> 2, c = lane & 3;
  const cta_place cta = cta_of(p);
  const int seq = cta.seq, kh = cta.kh, qt = cta.qt, split = cta.split;
  const int q0 = p.qo_indptr[seq], nq = p.qo_indptr[seq + 1] - q0, len = p.kv_len[seq];
  const int group = p.group, entries = nq * group, e0 = qt * NE;
  if (e0 >= entries) return; /* the whole CTA: a query tile past this sequence's rows */
  const int pos_max = len - nq + p.pos_shift + (min(entries, e0 + NE) - 1) / group;
  const int units = (min(len, pos_max + 1) + UT - 1) / UT;
  int u_begin, u_end;
  if (HUF && TP && p.huf_pass == 2) {
    if (!v3_pass2_range<UT>(p, cta, len, min(len, pos_max + 1), units, &u_begin, &u_end)) return;
  } else {
    split_range(p, cta, units, &u_begin, &u_end);
  }
  const uint32_t bars = smem_u32(smem + SL::bar_off);
  constexpr int NS = SL::slots;

  if (tid == 0) {
    for (int i = 0; i < NS; i++) {
      mbar_init(bars + 8 * i, 32);        /* full: every producer lane */
      mbar_init(bars + 8 * (NS + i), 32 << p.unit_split_lg); /* empty: every lane of its warps */
    }
    *(int *)(smem + SL::claim_off) = NW; /* items 0 .. NW - 1 go to warps 0 .. NW - 1 */
  }
  /* The producer warp loads none of Q. */
  if (warp == NW) prefetch_first_batch<UT, SL::batch>(p, seq, len, u_begin);
  load_q_tile<HD, T, false>(p, smem + SL::qtile_off, NE, q0, kh, e0, entries, tid, SL::threads);
  __syncthreads();
  /* Q's B fragments, in the channel order of k_channel: entry 8 nb + g of the tile. From the
   * unit loop on (PRE), the current page's operand: Q or Q' (q_page) while the current page's
   * keys are SRC_FAST (qx_scaled), built once per page rather than per slab. The Huffman
   * instances keep Q and scale it per slab (their registers are taken by the decoder), and so
   * does head_dim 256, whose 32 registers of Q made ptxas spill ~280 bytes: measured (session 25,
   * bit-pack (8, 32k)) fp16 0.386 -> 0.303 ms. */
  qfrag_t<HD, NB> qx, ql; /* ql: with PRE and HL, Q' 's remainder while qx is Q' (q_page) */
  constexpr bool PRE = !HUF && HD < 256;
  /* SRC_FAST keys take Q' 's remainder (q_resid) in fp16 launches. bf16 launches keep one mma:
   * Q' 's error (2^-12) is below their outputs' own rounding (2^-9). */
  constexpr bool HL = FAST && kFast16<T>;
  /* With at most 4 entries in the tile (a GQA group of 4 or fewer, one query row), 4 of the B
   * operand's 8 columns are free: column 2j holds entry j and column 2j + 1 its Q again, which
   * q_page makes Q' 's remainder for SRC_FAST keys, so that S^T's one mma per k-block sums both
   * and each lane adds its odd column to its even one, instead of two more mma chains (s_fast's
   * sl: fp16 (8, 32k) 10% slower; entries in columns 0..3 and the remainder in 4..7, added by
   * shuffles: 5%). Entry e0 + j of the tile is then column 2j; the odd columns are entries
   * nobody reads. Outside the Huffman instances it is the instance's (LO4, the launcher's
   * choice): decided at run time, the other path's remainder registers (ql) stayed live and cost
   * 8% at (8, 32k); as an instance, 4.4% (the per-page remainder and the additions), less the
   * odd columns' softmax, which it skips (column_used below: -1.5% at (8, 32k), -2.9% at (16,
   * 128k)). At head_dim 256 (Q' formed per slab) the run-time choice kept the other path's mma
   * as predicated-off instructions in every slab. */
  const bool lo4 = HUF ? HL && NB == 1 && entries - e0 <= 4 : LO4;
  static_assert(!LO4 || (!HUF && HL && NB == 1), "LO4: fp16 instances without Huffman");
  auto column_entry = [&](int col) { return lo4 ? col >> 1 : col; }; /* entry offset in the tile */
  /* Whether SRC_FAST may take this CTA's Q as fp16 (kFast16's comment); warp-uniform. */
  bool qfits = true;
  if (warp < NW) {
    const uint8_t *qs = smem + SL::qtile_off;
    auto q16 = [&](int r, int d) -> uint32_t {
      return *(const uint16_t *)(qs + tile_off<HD>(r, d >> 3) + (d & 7) * 2);
    };
#pragma unroll
    for (int nb = 0; nb < NB; nb++)
#pragma unroll
      for (int kb = 0; kb < HD / 16; kb++)
#pragma unroll
        for (int x = 0; x < 2; x++) {
          const int r = column_entry(8 * nb + g), pi = 2 * kb + x;
          qx[nb][kb][x] =
              q16(r, k_channel<HD>(c, pi, 0)) | (q16(r, k_channel<HD>(c, pi, 1)) << 16);
        }
    if constexpr (!kFast16<T> && FAST) {
      bool big = false; /* |q| > 65504 (0x477f: bf16's largest below it), inf or NaN */
#pragma unroll
      for (int nb = 0; nb < NB; nb++)
#pragma unroll
        for (int kb = 0; kb < HD / 16; kb++)
#pragma unroll
          for (int x = 0; x < 2; x++) {
            const uint32_t w = qx[nb][kb][x];
            big |= (w & 0x7fffu) > 0x477fu || ((w >> 16) & 0x7fffu) > 0x477fu;
          }
      qfits = !__any_sync(0xffffffffu, big);
    }
  }
  /* One copy of the fragments per CTA. The Huffman instance and head_dim 256 read them where
   * used (!PRE; v3h_layout says why); the others hold the current page's operand in registers
   * (qx), and their generic path reads Q from the copy. */
  static_assert(sizeof(qfrag_t<HD, NB>) + 16 <= LO::qf_stride, "Q's fragments fit their slot");
  qfrag_t<HD, NB> *qs = (qfrag_t<HD, NB> *)(smem + LO::qf_off + lane * LO::qf_stride);
  /* bf16 at head_dim 256 reads Q where used too (!PRE), and its fast path takes Q converted to
   * fp16 once here (Q16: TQ, the copy qh), so that its per-slab Q' is one HMUL2 (q_scaled) rather
   * than two conversions and a multiply. The conversion is exact for every |Q| the fast path
   * takes (qfits) down to fp16's normal range. */
  constexpr bool Q16 = !HUF && HD == 256 && !kFast16<T>;
  typedef std::conditional_t<Q16, __half, T> TQ;
  qfrag_t<HD, NB> *qh = qs;
  if constexpr (Q16) qh = (qfrag_t<HD, NB> *)(smem + SL::qh_off + lane * LO::qf_stride);
  if (warp == 0)
#pragma unroll
    for (int nb = 0; nb < NB; nb++)
#pragma unroll
      for (int kb = 0; kb < HD / 16; kb++)
#pragma unroll
        for (int x = 0; x < 2; x++) {
          (*qs)[nb][kb][x] = qx[nb][kb][x];
          if constexpr (Q16)
            (*qh)[nb][kb][x] = h2_bits<__half2>(
                __float22half2_rn(__bfloat1622float2(as_h2<__nv_bfloat162>(qx[nb][kb][x]))));
        }
  __syncthreads(); /* the Q tile's bytes belong to the ring from here on */
  bool qx_scaled = false;
  if constexpr (PRE)
    if (warp < NW) q_load<HD, NB>(smem_u32(qs), qx);
  const qfrag_t<HD, NB> &qb = PRE ? qx : *qs;
  const qfrag_t<HD, NB> &qf = Q16 ? *(const qfrag_t<HD, NB> *)qh : qb; /* SRC_FAST's Q, as TQ */

  oacc_t<HD, NB> o;
  float m[NB][2], l[NB][2];
  /* What SRC_FAST values add to every channel of entry 8 nb + 2c + x's O^T (their bases), kept
   * apart and added in the epilogue: this lane's tokens' part. */
  float vcorr[NB][2];
  /* vcorr holds O * 2^-e_o, O^T's row n O * 2^(-e_o - lg(w_o, n)) (o_units) */
  int e_o = 0, w_o = 0;
  bool bad = LO4 && entries - e0 > 4; /* a tile LO4 cannot take: NaN rather than wrong values */
  if (warp == NW) {
    const bool late_bad = produce<HD, SL>(p, smem, seq, kh, len, u_begin, u_end);
    /* Only where it can be true: folding a constant false into `bad` reordered the other
     * instances' code (bench/NOTES-attention.md, session 57). */
    if constexpr (SL::raw_from_shape) bad |= late_bad;
  } else {
#pragma unroll
    for (int mt = 0; mt < HD / 16; mt++)
#pragma unroll
      for (int nb = 0; nb < NB; nb++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[mt][nb][e] = 0.f;
    /* Positions of the lane's entries 8 nb + 2c + x; entries past the rows attend like the last
     * row (their output is never written). */
    int pos[NB][2], pos_lane = 0;
#pragma unroll
    for (int nb = 0; nb < NB; nb++)
#pragma unroll
      for (int x = 0; x < 2; x++) {
        const int en = e0 + column_entry(8 * nb + 2 * c + x);
        pos[nb][x] = len - nq + p.pos_shift + (en < entries ? en / group : nq - 1);
        pos_lane = max(pos_lane, pos[nb][x]);
        m[nb][x] = -INFINITY;
        vcorr[nb][x] = 0.f;
        l[nb][x] = 0.f;
      }
    const int pos_warp = __reduce_max_sync(0xffffffffu, pos_lane);
    const unit_desc *descs = (const unit_desc *)(smem + SL::desc_off);
    uint8_t *scr = smem + SL::scr_off + warp * v3_scratch<HD>::bytes;
    uint8_t *harea = smem + LO::huf_off + warp * LO::huf_bytes; /* HUF: this warp's Huffman area */
    if constexpr (HUF) v3h_sig_clear<HD>(harea);
    /* Rows of a unit per page (a power of two): unit row r is on page r >> ubt_lg. */
    const int ubt_lg = 31 - __clz(min(p.block_tokens, UT));

    /* Work items: item i is part i % split of unit i / split (split = 2^p.unit_split_lg). Warp w
     * starts with item w, then claims the next unclaimed one (v3_claims) or takes item w + NW.
     * The split is re-read from the parameters where it is used (no registers held across the
     * loop: with them the fp16 head_dim-128 instance spilled). */
    auto split_lg = [&] { return HUF ? 0 : p.unit_split_lg; };
    /* The slabs of item it: [part * n, (part + 1) * n), n = UT / 16 / split. */
    auto slab = [&](int it, int end) {
      return ((it & ((1 << split_lg()) - 1)) + end) * (UT / 16 >> split_lg());
    };
    constexpr bool claims = v3_claims<HUF, UT>();
    probe pr((int)blockIdx.x * NW + warp); /* empty unless built with KVC_ATTN_PROBE */
    for (int it = warp; u_begin + (it >> split_lg()) < u_end;) {
      const int k = it >> split_lg();
      const int slot = k % NS, token0 = (u_begin + k) * UT;
      pr.mark();
      /* With claimed items, another warp may still hold unit k - NS: once it is released, the
       * slot's "full" barrier is in unit k's phase (the parity alone cannot tell the two apart).
       * In the fixed order this warp released it itself. */
      if (claims && k >= NS) mbar_wait(bars + 8 * (NS + slot), (uint32_t)(k / NS - 1) & 1u);
      mbar_wait(bars + 8 * slot, (uint32_t)(k / NS) & 1u);
      pr.add(PR_WAIT);
      pr.count(PR_ITEMS);
      const unit_desc *d = &descs[slot];
      const int32_t flags = d->flags;
      const int n_valid = d->n_valid;
      const uint8_t *ub = smem + d->ring_off;
      bool ok = !(flags & UNIT_BAD);
      /* Unit row t is visible to the lane's entry (nb, x) iff t < lim[nb][x]. */
      int lim[NB][2];
#pragma unroll
      for (int nb = 0; nb < NB; nb++)
#pragma unroll
        for (int x = 0; x < 2; x++) lim[nb][x] = min(n_valid, pos[nb][x] - token0 + 1);
      /* The item's slabs up to the last one a row of the warp can see (tb < n_valid and token0
       * + tb <= pos_warp; none when either bound is negative). */
      const int b_end = min(slab(it, 1), (min(n_valid - 1, pos_warp - token0) >> 4) + 1);
      /* Page by page: its setup once, then its slabs (a page holds 1..4 whole slabs: 2^ubt_lg
       * rows, 16..64), so that the slabs' bookkeeping is per page. */
      for (int b = slab(it, 0); ok && b < b_end;) {
        pr.mark();
        const int q = (16 * b) >> ubt_lg;
        const int b_pg = min(b_end, ((q + 1) << ubt_lg) >> 4); /* past the page's last slab */
        const unit_page pg = d->pages[q];
        v3_src ks, vs;
        ok = v3_page_setup<HD, T, HUF, FAST>(pg, ub, scr, harea, e_o, qfits, ks, vs);
        pr.add(PR_SETUP);
        if (!ok) break;
        /* S^T to log2 units: softmax scale (and 2^e of SRC_FAST keys) */
        float kmul = p.scale_log2;
        if constexpr (PRE) { /* the page's operand (qx) */
          const bool kfast = FAST && ks.kind == SRC_FAST;
          if (kfast || qx_scaled) q_load<HD, NB>(smem_u32(qs), qx);
          if (kfast) q_page<HD, NB, T, HL>(scr, c, qx, ql, lo4); /* with s_fast_const's sums */
          qx_scaled = kfast;
        }
        if (FAST && ks.kind == SRC_FAST) {
          kmul *= pow2i(ks.sec.e);
          if constexpr (!PRE) s_fast_const<HD, NB, TQ, HL>(scr, c, qf, ql, lo4);
          __syncwarp();
        }
        pr.add(PR_QK);
        /* O^T's units: those of this page's V operand (2^e and the rows' lg for SRC_FAST, else
         * 1). */
        const int ev = FAST && vs.kind == SRC_FAST ? vs.sec.e : 0;
        const int wv = FAST && vs.kind == SRC_FAST ? vs.sec.width : 0;
        if (ev != e_o || wv != w_o) {
          o_units<HD, NB>(o, e_o - ev, w_o, wv);
          const float f = pow2i(e_o - ev);
#pragma unroll
          for (int nb = 0; nb < NB; nb++) {
            vcorr[nb][0] *= f;
            vcorr[nb][1] *= f;
          }
          e_o = ev;
          w_o = wv;
        }
        /* The page's slabs. KW, VW > 0: both sections SRC_FAST of those widths, known at compile
         * time (no builder dispatch in the slab), and every slab row a row of the page that every
         * entry sees; 0: dispatched per slab. */
        auto slabs = [&](auto kw, auto vw) {
          constexpr int KW = decltype(kw)::value, VW = decltype(vw)::value;
          /* Unit row r of this page is page row min(r - row0, nrows - 1): rows past the page's
           * (masked below) read its last row, so that they stay finite and inside the section. */
          auto prow = [&](int r) { return KW ? r - pg.row0 : min(r - pg.row0, pg.nrows - 1); };
          /* With KW: the slab's code runs (kr, vr) and V's factors (from index vi + tb) lie at
           * constant distances from their first, which moves by 16 tokens per slab: no clamps,
           * no per-slab offsets. */
          token_runs<2> kr{};
          const uint32_t *vr = nullptr; /* pv_fast's run of tokens (2c, 2c + 1) */
          int vi = 0, vbi = 0;
          if constexpr (KW > 0) {
            const int t0 = pg.ptok0 + 16 * b - pg.row0;
            const int kt[2] = {t0 + g, t0 + g + 8};
            kr = token_runs_of<HD, KW>(ks.sec.w, ks.sec.meta, c * (HD / 4), kt);
            vr = vpair_at<HD, VW>(vs.sec, t0 + 2 * c, g);
            vi = (pg.ptok0 & (kUnitTokens - 1)) - pg.row0 + g;
            vbi = vi - g + 2 * c;
          }
          /* With KW: the keys' base terms (s_fast_const's, in log2 units) enter the softmax's
           * FFMA as mk = kc kmul - m, per page and after each move of m, instead of starting S's
           * mma chain in every slab (a load and two moves per slab). */
          const float2 *kc = (const float2 *)(scr + v3_scratch<HD>::kc) + lane_id() * NB;
          float mk[NB][2];
          if constexpr (KW > 0) {
#pragma unroll
            for (int nb = 0; nb < NB; nb++) {
              const float2 k0 = kc[nb];
              mk[nb][0] = fmaf(k0.x, kmul, -m[nb][0]);
              mk[nb][1] = fmaf(k0.y, kmul, -m[nb][1]);
            }
          }
          for (; ok && b < b_pg; b++) {
            const int tb = 16 * b;
            /* S^T for tokens tb + g, tb + g + 8. */
            float s[2][NB][4], sl[2][NB][4]; /* sl: s_fast's chains of Q' 's remainder (HL) */
#pragma unroll
            for (int h = 0; h < 2; h++)
#pragma unroll
              for (int nb = 0; nb < NB; nb++)
#pragma unroll
                for (int e = 0; e < 4; e++) s[h][nb][e] = sl[h][nb][e] = 0.f;
            const int tr[2] = {prow(tb + g), prow(tb + 8 + g)};
            /* SRC_FAST values' factors of tokens tr (P' and vcorr below), loaded at the slab's
             * start so that S and the softmax hide their latency: loaded after the softmax (ptxas
             * sinks them there from anywhere after S), they held P' up by a round trip. Loaded
             * for every page (no branch; only SRC_FAST's are used): the scratch is written only by
             * the page setups, between warp syncs. The bases b / 2^W (fp16): with VMMA, lanes g = 0
             * take those of their P V tokens (2c, 2c + 1) and (2c + 8, 2c + 9) (neighbours, a
             * word each) as row 0 of an mma's A operand, the other rows 0 (vbw); else every lane
             * those of tokens tr (vbf). VMMA: the hot widths' copy where Q' is held in registers
             * (PRE; in the Huffman instances the mma's registers made ptxas reload Q per slab). */
            constexpr bool VMMA = KW > 0 && PRE;
            const bool vfast = VW > 0 || (FAST && vs.kind == SRC_FAST);
            const __half *vbt = (const __half *)(scr + v3_scratch<HD>::vbt);
            float vm[2], vbf[2];
            uint32_t vbw[2] = {0u, 0u};
#pragma unroll
            for (int h = 0; h < 2; h++) {
              const int t = KW ? vi + tb + 8 * h : (vs.ptok0 + tr[h]) & (kUnitTokens - 1);
              vm[h] = ((const float *)(scr + v3_scratch<HD>::vmul))[t];
              if constexpr (VMMA) {
                if (g == 0) vbw[h] = *(const uint32_t *)(vbt + vbi + tb + 8 * h);
              } else {
                vbf[h] = __half2float(vbt[t]);
              }
            }
            bool huf = false; /* a Huffman page: K and V both come through the warp's tile */
            if constexpr (HUF) huf = ks.kind >= SRC_HUF;
            if constexpr (KW > 0) {
              s_fast<HD, KW, NB, TQ, PRE, HL, false>(kr, scr, c, qf, ql, lo4, s, sl);
              kr.p += 16 * HD * KW / 32;
            } else if (huf) {
              if constexpr (HUF) {
                /* The slab's page tokens [a, a + nr) through the tile (tile row = page row -
                 * r0). */
                const int r0 = tb - pg.row0, a = pg.ptok0 + r0, nr = min(16, pg.nrows - r0);
                uint8_t *tile = harea + v3h_area<HD>::tile;
                __syncwarp(); /* the previous slab's O^T update is done with the tile */
                ok &= v3h_slab<HD, T>(ks, 0, scr, harea, a, nr);
                __syncwarp();
                v3h_s<HD, T, NB>(tile, g, c, nr, qb, s);
                /* V's slab next, into the same tile (S's loads have returned): its independent
                 * decode chains overlap S's mma chains and the softmax. */
                __syncwarp();
                ok &= v3h_slab<HD, T>(vs, 1, scr, harea, a, nr);
                __syncwarp();
              }
            } else {
              /* Rows read with fewer bank conflicts (s_rows, pv_rows) except in the Huffman
               * instances, which read rows only for raw and staging pages and spilled with it. */
              v3_s<HD, T, NB, FAST, !HUF, PRE, HL, TQ>(ks, scr, c, tr, qb, qf, ql, *qs, lo4, s,
                                                       sl);
            }
            if constexpr (HL) { /* S^T's terms of Q' 's remainder (s_fast) */
              if (!lo4) {
#pragma unroll
                for (int nb = 0; nb < NB; nb++)
#pragma unroll
                  for (int e = 0; e < 4; e++) s[0][nb][e] += sl[0][nb][e] + sl[1][nb][e];
              } else if (KW > 0 || (FAST && ks.kind == SRC_FAST)) {
#pragma unroll
                for (int e = 0; e < 4; e += 2) /* column 2c + 1 to column 2c */
                  s[0][0][e] += s[1][0][e] + (s[0][0][e + 1] + s[1][0][e + 1]);
                /* -0: the softmax's s[0] + s[1] is then s[0] itself, and ptxas drops the add */
#pragma unroll
                for (int e = 0; e < 4; e += 2) s[1][0][e] = -0.f;
              }
            }
            /* Online softmax over the 16 tokens (exp2, scale folded in). An entry's running
             * maximum moves only when one of its scores exceeds it by more than kMaxSlack: until
             * then P = 2^(s - m) < 2^kMaxSlack, and the slab needs no shuffles for the maximum
             * (most slabs once the first tokens are in). When it moves, it moves to the exact
             * maximum.
             * sx: the scores relative to the maximum, s kmul - m in one FFMA (the hot widths' s
             * without the keys' base terms: + mk), +inf while m is -inf (so that any visible score
             * moves it), -inf for rows not visible. */
            auto visible = [&](int nb, int e) {
              return KW > 0 || tb + g + 8 * (e >> 1) < lim[nb][e & 1];
            };
            /* LO4: the odd columns are no entry's (Q' 's remainder, or Q again), so their
             * scores, weights and sums are not computed (their P is 0, their O^T unread). */
            auto column_used = [](int e) { return !(LO4 && (e & 1)); };
            float sx[NB][4];
            bool grow = false;
#pragma unroll
            for (int nb = 0; nb < NB; nb++)
#pragma unroll
              for (int e = 0; e < 4; e++) {
                if (!column_used(e)) {
                  sx[nb][e] = -INFINITY;
                  continue;
                }
                const float ms = KW > 0 ? mk[nb][e & 1] : -m[nb][e & 1];
                sx[nb][e] = visible(nb, e) ? fmaf(s[0][nb][e] + s[1][nb][e], kmul, ms) : -INFINITY;
                grow |= sx[nb][e] > kMaxSlack;
              }
            if (__any_sync(0xffffffffu, grow)) {
              /* The scores themselves, their maximum over the tokens (over g), and sx again. */
              float sa[NB][4], cf[NB][2], kb[NB][2] = {};
              if constexpr (KW > 0) {
#pragma unroll
                for (int nb = 0; nb < NB; nb++) {
                  const float2 k0 = kc[nb];
                  kb[nb][0] = k0.x * kmul;
                  kb[nb][1] = k0.y * kmul;
                }
              }
#pragma unroll
              for (int nb = 0; nb < NB; nb++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                  sa[nb][e] = visible(nb, e)
                                  ? fmaf(s[0][nb][e] + s[1][nb][e], kmul, kb[nb][e & 1])
                                  : -INFINITY;
#pragma unroll
              for (int nb = 0; nb < NB; nb++)
#pragma unroll
                for (int x = 0; x < 2; x++) {
                  float mx = fmaxf(sa[nb][x], sa[nb][x + 2]);
#pragma unroll
                  for (int o2 = 4; o2 <= 16; o2 <<= 1)
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o2));
                  const float mn = fmaxf(m[nb][x], mx);
                  cf[nb][x] = mn == -INFINITY ? 1.f : ex2_ftz(m[nb][x] - mn);
                  m[nb][x] = mn;
                  if constexpr (KW > 0) mk[nb][x] = kb[nb][x] - mn;
                  l[nb][x] *= cf[nb][x];
                  vcorr[nb][x] *= cf[nb][x];
                }
              /* A visible score has a finite maximum; the others stay -inf (an entry with nothing
               * visible yet keeps m = -inf, and -inf - m would be NaN). */
#pragma unroll
              for (int nb = 0; nb < NB; nb++)
#pragma unroll
                for (int e = 0; e < 4; e++)
                  sx[nb][e] = visible(nb, e) ? sa[nb][e] - m[nb][e & 1] : -INFINITY;
#pragma unroll
              for (int mt = 0; mt < HD / 16; mt++)
#pragma unroll
                for (int nb = 0; nb < NB; nb++)
#pragma unroll
                  for (int e = 0; e < 4; e++) o[mt][nb][e] *= cf[nb][e & 1];
            }
            /* P^T as the B operand: S^T's accumulator pairs (token g or g+8, entries 2c, 2c+1)
             * transposed by movmatrix into (tokens 2c, 2c+1 or 2c+8, 2c+9; entry g). */
            float pv[NB][4];
#pragma unroll
            for (int nb = 0; nb < NB; nb++)
#pragma unroll
              for (int e = 0; e < 4; e++) {
                pv[nb][e] = 0.f;
                if (!column_used(e)) continue;
                pv[nb][e] = ex2_ftz(sx[nb][e]);
                l[nb][e & 1] += pv[nb][e];
              }
            uint32_t pb[NB][2];
            if (vfast) {
              /* SRC_FAST values: P' = P * step * 2^(W - e) per token, and their bases' products
               * with P' as the mma takes it go to vcorr (with VMMA the 16 tokens' sum by one mma,
               * in lanes g = 0). */
              const uint32_t av[4] = {vbw[0], 0u, vbw[1], 0u};
#pragma unroll
              for (int nb = 0; nb < NB; nb++) {
                auto pw = [&](int e) { return column_used(e) ? pv[nb][e] * vm[e >> 1] : 0.f; };
                const uint32_t p0 = pack2<__half>(pw(0), pw(1));
                const uint32_t p1 = pack2<__half>(pw(2), pw(3));
                pb[nb][0] = movmatrix_trans(p0);
                pb[nb][1] = movmatrix_trans(p1);
                if constexpr (VMMA) {
                  float d[4] = {0.f, 0.f, 0.f, 0.f};
                  mma16816<__half>(d, av, pb[nb][0], pb[nb][1]);
                  vcorr[nb][0] += d[0];
                  vcorr[nb][1] += d[1];
                } else {
                  const float2 f0 = __half22float2(as_h2<__half2>(p0));
                  const float2 f1 = __half22float2(as_h2<__half2>(p1));
                  vcorr[nb][0] += f0.x * vbf[0] + f1.x * vbf[1];
                  vcorr[nb][1] += f0.y * vbf[0] + f1.y * vbf[1];
                }
              }
            } else {
#pragma unroll
              for (int nb = 0; nb < NB; nb++) {
                pb[nb][0] = movmatrix_trans(pack2<T>(pv[nb][0], pv[nb][1]));
                pb[nb][1] = movmatrix_trans(pack2<T>(pv[nb][2], pv[nb][3]));
              }
            }
            const int tv[4] = {prow(tb + 2 * c), prow(tb + 2 * c + 1), prow(tb + 2 * c + 8),
                               prow(tb + 2 * c + 9)};
            if constexpr (VW > 0) {
              pv_fast<HD, VW, NB>(vr, vr + 4 * vpair_block_words<HD, VW>(), pb, o);
              vr += 8 * vpair_block_words<HD, VW>();
            } else if (huf) {
              if constexpr (HUF) v3h_pv<HD, T, NB>(harea + v3h_area<HD>::tile, g, c, pb, o);
            } else {
              v3_pv<HD, T, NB, FAST, !HUF>(vs, scr, g, tv, pb, o);
            }
          }
        };
        constexpr bool hot = v3_hot_widths<HD, T, NB, HUF, FAST>();
        /* The hot widths' copy takes a page's slabs when they hold only its rows and every entry
         * sees every row (not the last, partial page of a sequence). */
        auto all_visible = [&] {
          bool v = 16 * b_pg <= pg.row0 + pg.nrows;
#pragma unroll
          for (int nb = 0; nb < NB; nb++) v &= 16 * b_pg <= min(lim[nb][0], lim[nb][1]);
          return __all_sync(0xffffffffu, v);
        };
        pr.add(PR_PREP);
        pr.count(PR_PAGES);
        if (hot && ks.kind == SRC_FAST && ks.sec.width == kHotKeyWidth && vs.kind == SRC_FAST &&
            vs.sec.width == kHotValueWidth && all_visible())
          slabs(std::integral_constant<int, hot ? kHotKeyWidth : 0>(),
                std::integral_constant<int, hot ? kHotValueWidth : 0>());
        else
          slabs(std::integral_constant<int, 0>(), std::integral_constant<int, 0>());
        pr.add(PR_SLABS);
      }
      bad |= !ok;
      mbar_arrive(bars + 8 * (NS + slot)); /* this lane is done with the unit's ring bytes */
      if (claims) {
        int next = 0;
        if (lane == 0) next = atomicAdd((int *)(smem + SL::claim_off), 1);
        it = __shfl_sync(0xffffffffu, next, 0);
      } else {
        it += NW;
      }
      pr.add(PR_CLAIM);
    }
    pr.loop_end();
  }

  /* Epilogue: the consumer warps' (m, l, O) through the ring (in a Huffman layout possibly on past
   * it, up to the barriers: v3h_layout), combined per query entry. */
  const bool cta_bad = __syncthreads_or(bad);
  /* Pass 1 of two (params::huf_pass) leaves a CTA whose pages include a Huffman page, which it
   * cannot read (so it is bad), to pass 2. */
  if constexpr (!HUF && TP)
    if (p.huf_pass == 1 && cta_bad && v3_units_huffman<UT>(p, seq, len, u_begin, u_end)) return;
  float *obuf = (float *)smem; /* [NW warps][16][HD] */
  float *mbuf = obuf + NW * 16 * HD, *lbuf = mbuf + NW * 16;
  if (warp < NW) {
#pragma unroll
    for (int nb = 0; nb < NB; nb++)
#pragma unroll
      for (int x = 0; x < 2; x++) {
#pragma unroll
        for (int o2 = 4; o2 <= 16; o2 <<= 1) l[nb][x] += __shfl_xor_sync(0xffffffffu, l[nb][x], o2);
        if (g == 0) {
          mbuf[warp * 16 + 8 * nb + 2 * c + x] = m[nb][x];
          lbuf[warp * 16 + 8 * nb + 2 * c + x] = l[nb][x];
        }
      }
    /* vcorr of the lane's entries 2c + x, summed over the tokens of every g. */
#pragma unroll
    for (int nb = 0; nb < NB; nb++)
#pragma unroll
      for (int x = 0; x < 2; x++)
#pragma unroll
        for (int o2 = 4; o2 <= 16; o2 <<= 1)
          vcorr[nb][x] += __shfl_xor_sync(0xffffffffu, vcorr[nb][x], o2);
    if (w_o) o_units<HD, NB>(o, 0, w_o, 0);
    const float f = pow2i(e_o);
    /* Granule k of the lane's run (channels g HD / 8 + 4 k ..: v_channel) of entry 8 nb + 2 c + x
     * is rows x, x + 2 (e) of m-tiles 2 k and 2 k + 1. */
#pragma unroll
    for (int nb = 0; nb < NB; nb++)
#pragma unroll
      for (int x = 0; x < 2; x++)
#pragma unroll
        for (int k = 0; k < HD / 32; k++) {
          const float v = vcorr[nb][x];
          *(float4 *)(obuf + v3_stash_off<HD>(warp * 16 + 8 * nb + 2 * c + x, g * (HD / 32) + k)) =
              make_float4((o[2 * k][nb][x] + v) * f, (o[2 * k][nb][x + 2] + v) * f,
                          (o[2 * k + 1][nb][x] + v) * f, (o[2 * k + 1][nb][x + 2] + v) * f);
        }
  }
  __syncthreads();
  /* The merge runs on the consumer warps only (as in v2: racecheck does not follow the producer
   * warp's barriers). */
  if (warp == NW) return;
  for (int i = tid; i < NE * (HD / 8); i += 32 * NW) {
    const int r = i / (HD / 8), c8 = i % (HD / 8), e = e0 + r;
    if (e >= entries) continue; /* with lo4: r < 4 */
    float acc[8], lsum, mu;
    merge_entry<NW>(
        [&](int wi, int G) { return *(const float4 *)(obuf + v3_stash_off<HD>(wi, G)); }, mbuf,
        lbuf, lo4 ? 2 * r : r, c8, acc, &lsum, &mu);
    write_entry<HD, T>(p, acc, lsum, mu, cta_bad, q0 + e / group, kh * group + e % group, split,
                       c8);
  }
}

}  // namespace kvc_attn

#endif /* KVC_ATTN_V3_CUH */
