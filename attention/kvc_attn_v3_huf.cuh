/*
 * Huffman pages in the v3 decode kernel (CUDA C++; included by attention/kvc_attn_v3.cuh before
 * the kernel, which it extends with one operand source, SRC_HUF / SRC_HUFG, and one layout, for the
 * instances attn_kernel_v3<HD, T, NB, true, FAST> that launches whose codec_mask allows Huffman
 * pages run).
 *
 * A Huffman section (compress/kvc_page_format.h) codes the page's n_tokens x HD symbols in n_lanes
 * strided streams: stream i holds symbols i, i + n_lanes, ... (symbol s = token s / HD, channel
 * s % HD). A stream can only be decoded from its start, so a consumer warp keeps every stream's
 * bit position in its shared-memory area across the four 16-token slabs of its unit, and decodes,
 * per slab and tensor, the slab's symbols of every stream into a per-warp tile laid out as v3's
 * A operands want it (v3h_area): K as channel pairs (c, c + 8) of each token in k_channel order, V
 * as token pairs (2p, 2p + 1) of each channel, so that S^T = K Q^T and O^T += V^T P^T read their
 * A registers with LDS.128 and no byte permutes (v3h_s, v3h_pv). The tile holds the values
 * themselves (the steps applied: O^T accumulates Huffman pages in units of 2^0, and keys take Q
 * as it is). K's slab is decoded before S, V's (into the same tile) right after S. Nothing here
 * touches the attention math. (Decoding K's and V's slabs together, eight independent chains per
 * lane instead of four, needs a second tile, 21 KiB of the ring at head_dim 128: measured slower,
 * bench/NOTES-huf4.md.)
 *
 * Per section and unit the warp first parses the header: group steps and bases (v3's scratch,
 * laid out as for bit-pack's generic path; fp16 steps and addends in the Huffman area), code
 * lengths (Kraft-checked), canonical codes (warp sums of the counts per length, a scan of their
 * Kraft weights, match_any for the order within a length), a decode table of 2^kHufTableBits
 * u16 entries indexed by the window's top kHufTableBits bits (shorter codes fill several), and
 * the stream starts (a warp scan of the lane lengths). A SRC_HUF table stays for the tensor's next
 * section when that has the same code lengths (v3h_sig), which skips its build.
 * The table is per warp and tensor (128 bytes each: a full 11-bit table for K and V of
 * five warps would not fit beside the ring with two CTAs per SM). One copy of the parser serves
 * both sections (a loop in v3h_page_setup), for the instruction cache.
 *
 * Two decoders, chosen per section (warp-uniform):
 *   SRC_HUF   the common case: relative mode, every symbol direct (n_sym <= 32: the symbol
 *             is the code u, no extra bits), longest code <= kHufTableBits, one stream per channel
 *             (n_lanes == HD: pages of 16, 32 or 64 tokens, kvc_huf_lanes), a slab of 16 page
 *             tokens at a time; fp16 tiles: steps and addends normal fp16
 *             numbers; bf16 tiles: bases below 2^24 in magnitude. Lane l
 *             decodes HD / 32 streams interleaved (independent chains; K: channels c0 + 8 i,
 *             so that it holds both halves of its pairs), 4 symbols per 32-bit
 *             window read at the stream's bit position (two word loads, a funnel shift; no
 *             branch, so the chains interleave). A table entry is the fp16 bits
 *             of u with the code length in the (zero) low six bits, so the entry itself is the
 *             window's shift and the entries' sum gives the bits used; one PRMT and one AND pair
 *             two codes as a half2 (values: two tokens of a channel; keys: channels c, c + 8 of a
 *             token, the tile's word) and one HFMA2 applies their steps and base * step in fp16,
 *             as v3's bit-pack fast path does. bf16 tiles take each value as the generic
 *             decoder computes it, (float)(b + u) * step rounded to bf16: an entry is the length
 *             and u << 10, one PRMT makes the float 32 + u, one FADD adds the float b - 32
 *             (v3h_setup keeps it in place of b), one FMUL the step, and one F2FP packs two values
 *             (7 instructions per pair of codes, 3 for fp16; session 14: 13% slower than fp16
 *             pages, 5.9x faster than the generic decoder it replaces).
 *   SRC_HUFG  everything else (absolute mode, extra bits, codes longer than the table, other
 *             n_lanes up to kHufLanes<HD>, blocks of 128 tokens, units starting inside a
 *             page): symbol by symbol, the exact value of the CPU decoder rounded to T; a table
 *             entry is the symbol and its length, or an escape to a search over the longer codes.
 * A section inconsistent with the format (lengths, Kraft sum, stream sizes past the section, more
 * than kHufLanes<HD> streams) makes the unit's rows NaN; a stream decoded to its end must stop
 * where the next one starts (as in v2 and the CPU decoder). Reads stay inside the section and the
 * ring's slack after it (the window loads clamp their word index; setup reads only fields that lie
 * before a stream start it has checked against the section), the table index inside the table, so
 * damaged bytes never read or write out of bounds.
 *
 * Operation count of SRC_HUF per symbol (SASS, head_dim 128: a window-loop trip of four streams
 * x four symbols was 137 instructions for K and 139 for V before session 13's rotated windows,
 * 12 fewer since): per lookup the address (LOP3), LDS.U16 and the advance (SHF): 3; per
 * 4-symbol window the word index and its clamp, the address, two LDS, the funnel shift, its
 * rotation and the position update (SHF, VIMNMX, IMAD, 2 LDS, 2 SHF, IADD3, IADD, LOP3, IADD:
 * 11); per pair of codes PRMT + AND + HFMA2 + STS; the rest (pointers, V's steps, the loop) ~5
 * per trip: ~7.9 per symbol.
 */
#ifndef KVC_ATTN_V3_HUF_CUH
#define KVC_ATTN_V3_HUF_CUH

namespace kvc_attn {

/* Streams per section a warp can track: the encoder's n_lanes for pages of up to 8192 symbols
 * (64 x 128, 128 x 64) at head_dim 64 and 128, and a 64-token page's 256 at head_dim 256; a lane
 * keeps kHufLanes<HD> / 32 of them (v3h_lane_starts). */
template <int HD> constexpr int kHufLanes = HD > 128 ? HD : 128;
/* Decode-table index bits: SRC_HUF's longest code, which the encoders guarantee for direct
 * sections (KVC_HUF_DIRECT_LEN). 64 u16 entries are 32 words, one per bank, so a warp's 32
 * lookups never meet a bank conflict (the 256 entries of 8 bits met 2.78 wavefronts per lookup);
 * four codes fit a 32-bit window. */
constexpr int kHufTableBits = 6;
static_assert(kHufTableBits == KVC_HUF_DIRECT_LEN, "direct sections' codes fit the table");
constexpr uint32_t kHufEsc = 0x8000u; /* generic entry: the code is longer than the table */
/* What a decode table is built from: lane l's code lengths la (symbol l) and lb (symbol 32 + l),
 * each <= KVC_HUF_MAX_LEN, and the symbol count (a section of one symbol has no code bits, and its
 * table holds that symbol). kSigNone matches no section. */
__device__ __forceinline__ uint32_t v3h_sig(uint32_t la, uint32_t lb, int n_sym) {
  return la | lb << 4 | (uint32_t)n_sym << 8;
}
constexpr uint32_t kSigNone = 0xffffu;

/* The Huffman operand sources (after v3's own kinds). */
enum : int { SRC_HUF = SRC_BAD + 1, SRC_HUFG };

/* Per-section decoder state (shared, warp-uniform). */
struct v3h_state {
  uint32_t stream_pos, lanes_pos, lane_min, end; /* end: of the last stream */
  int n_lanes, n_sym, w_lane, n_tokens;
  int tok_done; /* page tokens [0, tok_done) decoded by every stream */
};

/*
 * One consumer warp's Huffman area (bytes). The tile holds one tensor's slab at a time, in the
 * layout its mma operand wants (see v3h_kidx and the file comment):
 *   K  [16 tokens][kst bytes]: row t holds u32 channel pairs (c, c + 8), pair q = (c / 16) * 8 +
 *      c % 8 at word v3h_kidx(q) ^ v3h_kswz(t), so that lane j of S reads its pairs with
 *      LDS.128 (HD / 32 of them per row)
 *   V  [8 token pairs][vst bytes]: word d of row p holds tokens (2p, 2p + 1) of channel d, the
 *      register P V's B operand takes
 * V rows are padded by 16 bytes (conflict-free reads). K rows are not: odd rows swap their
 * 64-byte halves of each 128 bytes instead (v3h_kswz), so that S's quarter-warps, which read rows
 * g and g + 1, meet no bank conflict (padding rows to 17 16-byte units left them 2-way).
 */
template <int HD> struct v3h_area {
  static constexpr int kst = 2 * HD, vst = 4 * HD + 16;
  static constexpr int tile = 0;
  static constexpr int tile_bytes = 16 * kst > 8 * vst ? 16 * kst : 8 * vst;
  static constexpr int tab = tile + tile_bytes;                  /* [2][2^kHufTableBits] u16 */
  static constexpr int lanes = kHufLanes<HD>;
  static constexpr int pos = tab + 2 * (1 << kHufTableBits) * 2; /* [2][lanes] u32 positions */
  /* [2][symw] u32: code | len << 16 (SRC_HUFG: KVC_SYM_COUNT of them); SRC_HUF reads no codes
   * and keeps its stream starts here instead, as [lanes] u16 offsets from stream_pos, for its end
   * check */
  static constexpr int symw = KVC_SYM_COUNT > lanes / 2 ? KVC_SYM_COUNT : lanes / 2;
  static constexpr int sym = pos + 2 * lanes * 4;
  /* SRC_HUF's fp16 step and addend base * step: per channel (K, by channel pair: v3h_kslot), per
   * page token (V: the fast decoder's pages have 64 tokens) */
  static constexpr int kst2 = sym + 2 * symw * 4, kbs2 = kst2 + 2 * HD;
  static constexpr int vst2 = kbs2 + 2 * HD, vbs2 = vst2 + 2 * kUnitTokens;
  static constexpr int state = vbs2 + 2 * kUnitTokens;          /* [2] v3h_state */
  /* [2][32] u16: what each tensor's table was built from (v3h_sig), kSigNone when it is not a
   * SRC_HUF table (v3h_setup reuses a table built from the same code lengths) */
  static constexpr int sig = state + 2 * (int)sizeof(v3h_state);
  /* Whole 128-byte units, so that every warp's tables are 128-aligned (v3h_fast's lookups). */
  static constexpr int bytes = align_up(sig + 2 * 32 * 2, 128);
  static_assert(tab % 128 == 0 && (1 << kHufTableBits) * 2 == 128, "tables of 128 aligned bytes");
};

/* Marks both of a warp's tables as none (before its first page: shared memory holds what an
 * earlier kernel left). One word per lane; the first v3h_page_setup's __syncwarp orders it. */
template <int HD> __device__ __forceinline__ void v3h_sig_clear(uint8_t *area) {
  static_assert(2 * 32 * 2 == 32 * 4, "one word per lane");
  ((uint32_t *)(area + v3h_area<HD>::sig))[threadIdx.x & 31] = kSigNone * 0x10001u;
}

/* Shared-memory layout of the Huffman instance: v3's, with the per-warp Huffman areas after the
 * scratch and a smaller ring: what two CTAs per SM leave, in whole KiB (62 at head_dim 128, and 62
 * at 64, where seven warps' areas leave 12 KiB less than five would: one uncompressed 64-token unit
 * and more; the bench's Huffman units, ~6 KiB at head_dim 128, fill all ten slots), or one at
 * head_dim 256 (v3h_cps; 104 KiB for its seven warps). Huffman units are sensitive to it: with a
 * second slab tile per warp (ring 40 KiB, ~6 units for five warps) the consumers' waits for a unit
 * rose from 0.9% to 3.8% of the stall samples (bench/NOTES-huf4.md). Blocks whose sections or
 * streams may not fit (head_dim 128 and 256, 128 tokens) are left to v2 by the launcher. */
/* Q's B fragments (one query tile: HD / 2 bytes per lane), one copy per CTA: every consumer
 * warp's are the same, and in registers they leave the decode loops too few (ptxas then runs
 * two of a lane's four streams side by side instead of four, and the instance spills). Lane
 * stride HD / 2 + 16 bytes (an odd number of 16-byte units: LDS.128 without bank conflicts). */
template <int HD> constexpr int v3h_qf_stride() { return HD / 2 + 16; }
/* The ring takes the rest of a CTA's share of the SM (CPS CTAs per SM, W consumer warps), in whole
 * KiB. */
template <int HD, int CPS, int W> constexpr int v3h_ring_bytes() {
  return (233472 / CPS - 1024 - align_up(v3_after_ring<HD, 0, kBatch, 0, W>::end, 128) -
          W * v3h_area<HD>::bytes - 2 * v3_slots(W) * 8 - 32 * v3h_qf_stride<HD>()) /
         1024 * 1024;
}

/* CTAs per SM of the Huffman instance: two at head_dim 64 and 128; one at 256, where the per-warp
 * areas (~12 KiB each) and a unit of raw pages (64 KiB) do not fit two. */
template <int HD> constexpr int v3h_cps() { return HD == 256 ? 1 : 2; }

/* Consumer warps of the Huffman instance: kW3, but seven at head_dim 64 and 256, whose decoding
 * gains from more warps when they cost no spills (session 45, H200, Huffman pages):
 *   - head_dim 64: 16 warps per SM, four per sub-partition, at 128 registers, which its instances
 *     fit with 0-24 bytes of stack: (8, 32k) -10.5%, (16, 128k) -11.5%, (1, 32k) -5%; six warps
 *     (14 per SM) bought half as much.
 *   - head_dim 256 (one CTA per SM): 8 warps instead of 6, still 255 registers and no stack:
 *     (8, 32k) -8.6%, (32, 8k) -7.8%, (1, 32k) -5.3%.
 * Bit-pack pages in the instance with the fast path (FAST: launches that may meet both) run 3%
 * (head_dim 64) and 6-7% (256) slower; a bit-pack page costs under half a Huffman page there, so
 * a launch gains once ~15% of its pages are Huffman. At head_dim 128 the 128 registers of 14 or 16
 * warps spill 128-208 bytes (six warps ran 13-21% slower), and v3's other instances keep five
 * (head_dim 64 bit-pack pages with seven: +5.6%). */
template <int HD> constexpr int v3h_warps() { return HD == 128 ? kW3 : 7; }

template <int HD, int CPS = v3h_cps<HD>(), int W = v3h_warps<HD>()>
struct v3h_layout : v3_after_ring<HD, v3h_ring_bytes<HD, CPS, W>(), kBatch, 0, W> {
  static_assert(CPS == v3h_cps<HD>(), "v3h_cps");
  static constexpr int RB = 2 * HD;
  static constexpr int tile = kUnitTokens * RB;
  static constexpr bool fetch_ahead = false; /* producer: see v3_layout */
  static constexpr bool raw_from_shape = false; /* load_batch: see v3_layout */
  static constexpr bool ids_per_lane = false; /* load_batch: its Huffman pages ran slower */
  static constexpr int slack = v3_layout<HD>::slack;
  static constexpr int unit_tokens = kUnitTokens;
  typedef v3_after_ring<HD, v3h_ring_bytes<HD, CPS, W>(), kBatch, 0, W> A;
  using A::ring;
  using A::slots;
  using A::threads;
  using A::warps;
  static constexpr int qtile_off = 0; /* the Q tile, read before the producer starts */
  static constexpr int huf_off = align_up(A::end, 128); /* v3h_area's tables are 128-aligned */
  static constexpr int bar_off = huf_off + W * v3h_area<HD>::bytes;
  static constexpr int qf_off = bar_off + 2 * slots * 8, qf_stride = v3h_qf_stride<HD>();
  static constexpr int bytes = qf_off + 32 * qf_stride;
  /* Largest block_tokens whose K and V sections of one head (at most the raw size, in their ring
   * slots) fit the ring and whose streams (the encoder's n_lanes) fit the position arrays. */
  static constexpr int max_block_tokens =
      2 * (kMaxBlockTokens * RB + slack + kSlotExtra) <= ring &&
              HD * kMaxBlockTokens / KVC_LANE_SYMBOLS <= kHufLanes<HD>
          ? kMaxBlockTokens
          : 64;
  /* The epilogue's stash starts at the ring and may run on over the descriptors, the scratch and
   * the Huffman areas, which nobody reads after the work loop: up to the barriers. */
  static_assert(W * 16 * (HD + 2) * 4 <= bar_off, "epilogue does not fit");
  static_assert(2 * (64 * RB + slack + kSlotExtra) <= ring, "a unit must fit the ring");
  static_assert(HD * 64 / KVC_LANE_SYMBOLS <= kHufLanes<HD>, "a 64-token page's streams fit");
  static_assert(CPS * (bytes + 1024) <= 233472, "CPS CTAs per SM do not fit");
};

/* The layout of an instance, and where its warps' Huffman areas are (none without HUF). */
template <int HD, bool HUF, int UT, int CPS> struct v3_layout_of {
  typedef v3_layout<HD, UT, CPS> type;
  static constexpr int huf_off = 0, huf_bytes = 0;
  static constexpr int qf_off = type::qf_off, qf_stride = type::qf_stride;
};
template <int HD, int UT, int CPS> struct v3_layout_of<HD, true, UT, CPS> {
  static_assert(UT == kUnitTokens, "two raw pages would not fit the Huffman ring");
  typedef v3h_layout<HD, CPS> type;
  static constexpr int huf_off = type::huf_off, huf_bytes = v3h_area<HD>::bytes;
  static constexpr int qf_off = type::qf_off, qf_stride = type::qf_stride;
};

/* Word of K pair q (channels (c, c + 8), q = (c / 16) * 8 + c % 8) in a K tile row: lane j of S
 * takes pairs pi = q - j * HD / 8 (k_channel's order), four at a time, so words are grouped by
 * (pi / 4, j). */
template <int HD> __host__ __device__ constexpr int v3h_kidx(int q) {
  constexpr int NPL = HD / 8;
  const int j = q / NPL, pi = q % NPL;
  return (pi / 4) * 16 + j * 4 + pi % 4;
}
/* The K tile's word swizzle of row t: odd rows swap each 128 bytes' 64-byte halves. */
__host__ __device__ constexpr int v3h_kswz(int t) { return (t & 1) * 16; }
/* v3h_fast's K streams: lane l decodes channels c0 + 8 i, c0 = HD / 4 (l / 8) + l % 8, and for i
 * even writes pair v3h_kpair(l, i) = (c0 + 8 i, c0 + 8 i + 8): a warp's store of one pair per lane
 * then writes 32 words in distinct banks. */
template <int HD> __host__ __device__ constexpr int v3h_kc0(int l) {
  return HD / 4 * (l / 8) + l % 8;
}
template <int HD> __host__ __device__ constexpr int v3h_kpair(int l, int i) {
  return ((v3h_kc0<HD>(l) + 8 * i) / 16) * 8 + l % 8;
}
/* What v3h_fast's two K tile pointers rely on: lane l's pair for stream i lies 16 i words after
 * its pair for stream 0 under both rows' swizzles. */
template <int HD> constexpr bool v3h_k_pairs_strided() {
  for (int l = 0; l < 32; l++)
    for (int i = 0; i < HD / 32; i += 2)
      for (int r = 0; r < 2; r++)
        if ((v3h_kidx<HD>(v3h_kpair<HD>(l, i)) ^ v3h_kswz(r)) !=
            (v3h_kidx<HD>(v3h_kpair<HD>(l, 0)) ^ v3h_kswz(r)) + 16 * i)
          return false;
  return true;
}
static_assert(v3h_k_pairs_strided<64>() && v3h_k_pairs_strided<128>() &&
                  v3h_k_pairs_strided<256>(),
              "K pairs kq(i) of a lane 64 i bytes apart in every tile row");
/* Byte of element (slab token t, channel d) in the K and V tiles. */
template <int HD> __device__ __forceinline__ int v3h_kbyte(int t, int d) {
  return t * v3h_area<HD>::kst + 4 * (v3h_kidx<HD>((d / 16) * 8 + d % 8) ^ v3h_kswz(t)) +
         2 * ((d / 8) & 1);
}
template <int HD> __device__ __forceinline__ int v3h_vbyte(int t, int d) {
  return (t / 2) * v3h_area<HD>::vst + 4 * d + 2 * (t & 1);
}

/* Slot of channel c's fp16 step (and addend) in SRC_HUF's K arrays: by channel pair (c, c + 8),
 * pair q = (c / 16) * 8 + c % 8 as in v3h_kidx, so that the decoder loads a pair's two with one
 * word (slot 2 q + (c / 8) % 2). */
__device__ __forceinline__ int v3h_kslot(int c) {
  return (c / 16) * 16 + (c % 8) * 2 + (c / 8) % 2;
}

/* fp16 holds a step exactly and base * step closely only in its normal range (as in v3 bit-pack):
 * steps 2^-14 .. 2^15, i.e. step codes -112 .. 120, and |base * step| <= 60000 (checked apart).
 * bf16 tiles are computed in float (v3h_fast), for any step. */
template <class T> __device__ __forceinline__ bool v3h_h2_ok(int e_min, int e_max) {
  return !kFast16<T> || (e_min >= -14 * 8 && e_max <= 15 * 8);
}

/* SRC_HUF with bf16 tiles: the float 32 + u of a table entry (len | u << 10: u << 2 is the
 * mantissa's top byte), one PRMT. */
__device__ __forceinline__ float v3h_u32f(uint32_t e) {
  return __uint_as_float(__byte_perm(e, 0x42000000u, 0x7154));
}

/* Stream starts of streams SPL * lane .. SPL * lane + SPL - 1 (bit positions; streams past
 * n_lanes get the end of the last), and the end of the last stream. Warp-cooperative. In 32 bits:
 * a stream's length is clamped to kHufMaxBits, so the sums cannot wrap, and a clamped stream still
 * ends past its section (v3h_setup refuses sections of kHufMaxBits bits or more). */
constexpr uint32_t kHufMaxBits = 1u << 24;
template <int SPL>
__device__ __forceinline__ uint32_t v3h_lane_starts(const uint32_t *w, const v3h_state &h,
                                                    uint32_t (&start)[SPL]) {
  const int lane = threadIdx.x & 31;
  uint32_t len[SPL], sum = 0;
#pragma unroll
  for (int q = 0; q < SPL; q++) {
    /* The field of stream min(i, n_lanes - 1) lies in the section (before stream_pos). */
    const int i = SPL * lane + q;
    const uint32_t f = v3_field(w, h.lanes_pos + (uint32_t)(min(i, h.n_lanes - 1) * h.w_lane),
                                (uint32_t)h.w_lane);
    len[q] = i < h.n_lanes ? min(h.lane_min + f, kHufMaxBits) : 0u;
    sum += len[q];
  }
  uint32_t incl = sum;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  uint32_t run = h.stream_pos + incl - sum;
#pragma unroll
  for (int q = 0; q < SPL; q++) {
    start[q] = run;
    run += len[q];
  }
  return __shfl_sync(0xffffffffu, run, 31);
}

/*
 * Parses Huffman section `tensor` (sec, sec_bytes in the ring) of a page of n_tokens tokens, whose
 * tokens [t_lo, t_hi) the unit reads, into the warp's scratch (group bases and steps as v3's
 * generic path keeps them: per channel, or per page token & 63 for the 64-aligned run of tokens
 * that holds [t_lo, t_hi); absolute mode bases only) and Huffman area (SRC_HUF's fp16 steps and
 * addends, table, stream starts, state). Warp-cooperative; returns SRC_HUF, SRC_HUFG or SRC_BAD,
 * the same in every lane (s is set in full unless SRC_BAD). The caller has synchronised the warp
 * with earlier readers of the scratch and area.
 */
template <int HD, class T>
__device__ int v3h_setup(const uint8_t *sec, uint32_t sec_bytes, int tensor, int n_tokens,
                         int t_lo, int t_hi, uint8_t *scr, uint8_t *area, v3_sec &s) {
  typedef v3h_area<HD> A;
  const int lane = threadIdx.x & 31;
  if (!(sec_bytes >= KVC_QSEC_HEADER_BYTES + 4 && sec_bytes % 4 == 0 &&
        sec_bytes < kHufMaxBits / 8 && n_tokens >= 1 &&
        n_tokens <= kMaxBlockTokens && 0 <= t_lo && t_lo < t_hi && t_hi <= n_tokens))
    return SRC_BAD;
  kvc_qsec_header_t qh;
  qsec_header_load(sec, &qh);
  const int S = n_tokens * HD, n_sym = qh.width, n_lanes = qh.n_lanes;
  if (!(qh.mode <= KVC_QMODE_ABS && qh.w_e <= 16 && qh.w_b <= 31 &&
        qh.e_min >= KVC_STEP_CODE_MIN && qh.e_min <= KVC_STEP_CODE_MAX &&
        (qh.mode == KVC_QMODE_REL || qh.w_e == 0) && n_sym >= 1 && n_sym <= KVC_SYM_COUNT &&
        n_lanes >= 1 && n_lanes <= A::lanes && n_lanes <= S))
    return SRC_BAD;
  s.w = (const uint32_t *)(sec + KVC_QSEC_HEADER_BYTES);
  const uint32_t nwords = (sec_bytes - KVC_QSEC_HEADER_BYTES) / 4;
  const uint32_t cap = nwords * 32;
  s.last = nwords - 1;
  const bool rel = qh.mode == KVC_QMODE_REL;
  const int G = rel ? (tensor == 0 ? HD : n_tokens) : HD;
  const uint32_t pos_b = rel ? (uint32_t)G * qh.w_e : 0u;
  const uint32_t meta = pos_b + (uint32_t)G * qh.w_b;
  const uint32_t w_lane = qh.lane_info >> 27, lane_min = qh.lane_info & ((1u << 27) - 1);
  const uint32_t lanes_pos = meta + 4u * (uint32_t)n_sym;
  const uint32_t stream_pos = lanes_pos + (uint32_t)n_lanes * w_lane;
  if (stream_pos > cap) return SRC_BAD;
  s.meta = 0;
  s.width = 0;
  s.mode = rel ? tensor : 2;
  s.e = 0;
  s.step = v3_step(qh.e_min);
  /* Group bases and steps: every channel, or the page tokens of the unit's 64-aligned run (the
   * fast decoder writes whole slabs of a 64-token page, so it needs all of them): at most NG per
   * lane, unrolled. Every field lies before stream_pos <= cap, so the reads need no clamp (the
   * word after the last is the ring's slack). */
  typedef v3_scratch<HD> SC;
  int32_t *gb = (int32_t *)(scr + (tensor ? SC::vbase : SC::kbase));
  float *gs = (float *)(scr + (tensor ? SC::vstep : SC::kstep));
  const bool per_token = rel && tensor == 1;
  const int g_lo = per_token ? t_lo & ~(kUnitTokens - 1) : 0;
  const int g_hi = per_token ? min(n_tokens, g_lo + kUnitTokens) : G;
  uint16_t *st16 = (uint16_t *)(area + (tensor ? A::vst2 : A::kst2));
  uint16_t *bs16 = (uint16_t *)(area + (tensor ? A::vbs2 : A::kbs2));
  constexpr int NG = HD / 32;
  static_assert(NG * 32 >= kUnitTokens, "a lane holds at most NG groups");
  int e_hi = qh.e_min;  /* the lane's largest step code (every one is >= e_min) */
  float bs_max = 0.f;   /* and largest |base * step| (fp16), |base| (bf16) */
  /* slot of group x = lane + 32 i in st16 / bs16: v3h_kslot(lane + 32 i) = v3h_kslot(lane) + 32i */
  const int xs0 = tensor == 0 ? v3h_kslot(lane) : lane;
#pragma unroll
  for (int i = 0; i < NG; i++) {
    const int g = g_lo + lane + 32 * i;
    if (g < g_hi) {
      const int x = lane + 32 * i; /* g, or g & (kUnitTokens - 1) for per_token (g_lo % 64 == 0) */
      const int32_t b =
          (int32_t)((uint32_t)qh.b_min + v3_field(s.w, pos_b + (uint32_t)g * qh.w_b, qh.w_b));
      gb[x] = b;
      if (rel) {
        const int e = qh.e_min + (int)v3_field(s.w, (uint32_t)g * qh.w_e, qh.w_e);
        e_hi = max(e_hi, e);
        const float st = v3_step(e); /* meaningless past KVC_STEP_CODE_MAX: refused below */
        gs[x] = st;
        if constexpr (kFast16<T>) {
          const float bs = __fmul_rn((float)b, st);
          bs_max = fmaxf(bs_max, fabsf(bs));
          /* fp16 step and addend per channel (K, by pair) or token (V) for SRC_HUF */
          st16[xs0 + 32 * i] = to_bits<__half>(st);
          bs16[xs0 + 32 * i] = to_bits<__half>(bs);
        } else {
          bs_max = fmaxf(bs_max, fabsf((float)b));
        }
      }
    }
  }
  const int emax = __reduce_max_sync(0xffffffffu, e_hi);
  /* Code lengths: lane l holds symbols l (la) and 32 + l (lb); 0 = unused. */
  const uint32_t la = lane < n_sym ? v3_field(s.w, meta + 4u * lane, 4) : 0u;
  const uint32_t lb = lane + 32 < n_sym ? v3_field(s.w, meta + 4u * (lane + 32), 4) : 0u;
  if (emax > KVC_STEP_CODE_MAX ||
      __any_sync(0xffffffffu, la > KVC_HUF_MAX_LEN || lb > KVC_HUF_MAX_LEN))
    return SRC_BAD;
  const int lmax = (int)__reduce_max_sync(0xffffffffu, max(la, lb));
  /* Stream starts (before the table: SRC_HUF needs its streams within 2^16 bits). */
  v3h_state h;
  h.stream_pos = stream_pos;
  h.lanes_pos = lanes_pos;
  h.lane_min = lane_min;
  h.n_lanes = n_lanes;
  h.n_sym = n_sym;
  h.w_lane = (int)w_lane;
  h.n_tokens = n_tokens;
  h.tok_done = 0;
  constexpr int SPL = A::lanes / 32;
  uint32_t start[SPL];
  h.end = v3h_lane_starts(s.w, h, start);
  if (h.end > cap) return SRC_BAD;
  /* SRC_HUF: see the file comment. */
  /* bf16: b + u exact in float (|b| < 2^24 - 64; see below) */
  const bool fast = rel && n_sym <= KVC_SYM_DIRECT && lmax <= kHufTableBits && n_lanes == HD &&
                    n_tokens % 16 == 0 && n_tokens <= kUnitTokens &&
                    h.end - stream_pos <= 0xffffu &&
                    v3h_h2_ok<T>(qh.e_min, emax) &&
                    !__any_sync(0xffffffffu, bs_max > (kFast16<T> ? 60000.f : 16777152.f));
  if constexpr (!kFast16<T>) {
    /* SRC_HUF's bf16 value of code u in group x is (float)(b + u) * step rounded to bf16, as the
     * generic decoder's: the base is kept as the float b - 32, which the float 32 + u
     * (v3h_u32f) completes exactly. */
    if (fast)
#pragma unroll
      for (int i = 0; i < NG; i++) {
        const int x = lane + 32 * i;
        if (g_lo + x < g_hi) gb[x] = __float_as_int((float)gb[x] - 32.f);
      }
  }
  /* A SRC_HUF table built from the same code lengths and symbol count is still in the area (the
   * warp's last section of this tensor that had them): then the counts, the Kraft check, the
   * canonical codes and the table are skipped (value sections of one head mostly keep their
   * lengths from page to page). */
  uint16_t *sig = (uint16_t *)(area + A::sig) + 32 * tensor;
  const uint32_t mine = v3h_sig(la, lb, n_sym);
  const bool reuse = fast && __all_sync(0xffffffffu, sig[lane] == mine);
  uint32_t *sym = (uint32_t *)(area + A::sym) + tensor * A::symw;
  if (fast) {
    auto off = [&](int q) { return start[q] - stream_pos; }; /* <= h.end - stream_pos */
    if constexpr (SPL == 4)
      *(uint2 *)((uint16_t *)sym + 4 * lane) =
          make_uint2(off(0) | off(1) << 16, off(2) | off(3) << 16);
    else
      *(uint4 *)((uint16_t *)sym + 8 * lane) =
          make_uint4(off(0) | off(1) << 16, off(2) | off(3) << 16, off(4) | off(5) << 16,
                     off(6) | off(7) << 16);
  }
  if (!reuse) {
    uint32_t n[3], kr, kraft, ca, cb;
    /* Canonical codes, ordered by (length, symbol) as kvc_huf_codes assigns them: a symbol of
     * length l gets first_l plus the number of length-l symbols before it, first_l = sum over j < l
     * of n_j 2^(l - j) = K_l >> (11 - l), where K_l = sum over j < l of n_j 2^(11 - j) is the Kraft
     * sum of the shorter codes (units of 2^-11). The counts n_l come from three warp sums (a byte
     * per length: lengths 4w .. 4w + 3 in word w, n_l <= 64), the K_l from a scan of lanes 0..15
     * (lane l: n_l 2^(11 - l) for l = 1..11), which leaves K_(l + 1) in lane l: K_12, the Kraft sum
     * of every code, in lane 11. */
    {
      const uint32_t ta = 1u << 8 * (la & 3), tb = 1u << 8 * (lb & 3);
#pragma unroll
      for (int w = 0; w < 3; w++)
        n[w] = __reduce_add_sync(0xffffffffu, ((la >> 2) == (uint32_t)w ? ta : 0u) +
                                                  ((lb >> 2) == (uint32_t)w ? tb : 0u));
    }
    auto count = [&](uint32_t l) { /* n_l */
      return ((l < 4 ? n[0] : l < 8 ? n[1] : n[2]) >> 8 * (l & 3)) & 0xffu;
    };
    kr = lane >= 1 && lane <= KVC_HUF_MAX_LEN ? count(lane) << (KVC_HUF_MAX_LEN - lane) : 0u;
#pragma unroll
    for (int o = 1; o < 16; o <<= 1) {
      const uint32_t v = __shfl_up_sync(0xffffffffu, kr, o);
      if (lane >= o) kr += v;
    }
    kraft = __shfl_sync(0xffffffffu, kr, KVC_HUF_MAX_LEN);
    if (kraft != 0 && kraft != KVC_HUF_TABLE_SIZE) return SRC_BAD;
    /* Symbols of la's length before symbol lane: the lanes below with that la. Of lb's (symbol
     * 32 + lane): every la of it and the lanes below with that lb, i.e. n_lb - 1 less the lanes
     * above with that lb. (Lengths 0 get codes that nothing reads.) */
    const uint32_t lt = (1u << lane) - 1u, gt = ~lt << 1;
    const uint32_t ka = __shfl_sync(0xffffffffu, kr, (la - 1) & 31);
    const uint32_t kb = __shfl_sync(0xffffffffu, kr, (lb - 1) & 31);
    ca = (ka >> (KVC_HUF_MAX_LEN - la)) + __popc(__match_any_sync(0xffffffffu, la) & lt);
    cb = (kb >> (KVC_HUF_MAX_LEN - lb)) + count(lb) - 1u -
         __popc(__match_any_sync(0xffffffffu, lb) & gt);
    if (!fast) {
      sym[lane] = ca | (la << 16);
      sym[lane + 32] = cb | (lb << 16);
    }
    auto entry = [&](uint32_t sy, uint32_t len) -> uint32_t {
      if (!fast) return sy | (len << 6);
      return kFast16<T> ? (uint32_t)to_bits<__half>((float)sy) | len : len | sy << 10;
    };
    /* The table always has 2^kHufTableBits entries (a code of l bits fills 2^(kHufTableBits - l)):
     * lane l owns entries 2 l and 2 l + 1, one word, and the decoders index it by a constant number
     * of bits. */
    static_assert(1 << kHufTableBits == 32 * 2, "one word of entries per lane");
    uint32_t *row = (uint32_t *)(area + A::tab) + tensor * (1 << kHufTableBits) / 2 + lane;
    uint16_t *tab = (uint16_t *)(area + A::tab) + tensor * (1 << kHufTableBits);
    if (kraft == 0) { /* one symbol, no bits: every entry */
      *row = entry((uint32_t)n_sym - 1, 0) * 0x10001u;
    } else {
      /* Canonical ranges are consecutive in the table, so each code that fits writes its entry at
       * the start of its range only (entries are never 0: every length is >= 1), and the gaps take
       * the last entry before them: a forward fill over the lane's row, then its leading gap takes
       * the carry from the lanes before (a max-scan of (lane, last entry)). A longer code
       * then marks its kHufTableBits-bit prefix as an escape (its region lies past every short
       * range; codes sharing a prefix write the same value). */
      constexpr int TB = kHufTableBits;
      *row = 0;
      __syncwarp();
      if (la != 0 && la <= (uint32_t)TB) tab[ca << (TB - la)] = (uint16_t)entry((uint32_t)lane, la);
      if (lb != 0 && lb <= (uint32_t)TB)
        tab[cb << (TB - lb)] = (uint16_t)entry((uint32_t)lane + 32, lb);
      __syncwarp();
      const uint32_t r = *row;
      uint32_t v[2] = {r & 0xffffu, r >> 16};
      /* The row filled from its own starts: entries before the first stay 0, and run ends as its
       * last entry (0: no start in the row). */
      uint32_t run = 0;
#pragma unroll
      for (int j = 0; j < 2; j++) {
        if (v[j]) run = v[j];
        v[j] = run;
      }
      uint32_t key = run ? (uint32_t)(lane + 1) << 16 | run : 0u; /* the last start's lane, entry */
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const uint32_t k = __shfl_up_sync(0xffffffffu, key, o);
        if (lane >= o) key = max(key, k);
      }
      /* Lane 0's is unused: entry 0 is a start. */
      const uint32_t carry = __shfl_up_sync(0xffffffffu, key, 1) & 0xffffu;
#pragma unroll
      for (int j = 0; j < 2; j++)
        if (!v[j]) v[j] = carry;
      *row = v[0] | v[1] << 16;
      if (lmax > TB) {
        __syncwarp();
        if (la > (uint32_t)TB) tab[ca >> (la - TB)] = (uint16_t)kHufEsc;
        if (lb > (uint32_t)TB) tab[cb >> (lb - TB)] = (uint16_t)kHufEsc;
      }
    }
    sig[lane] = (uint16_t)(fast ? mine : kSigNone);
  }
  /* One 16-byte store per lane: positions past n_lanes (the end of the last stream) are never
   * read. */
  uint32_t *pos = (uint32_t *)(area + A::pos) + tensor * A::lanes;
#pragma unroll
  for (int q = 0; q < SPL; q += 4)
    *(uint4 *)(pos + SPL * lane + q) =
        make_uint4(start[q], start[q + 1], start[q + 2], start[q + 3]);
  if (lane == 0) ((v3h_state *)(area + A::state))[tensor] = h;
  return fast ? SRC_HUF : SRC_HUFG;
}

/*
 * SRC_HUF: page tokens [a, a + 16) of every stream (channel) into the tile. Four symbols per
 * 32-bit window (codes of at most kHufTableBits = 6 bits), read afresh at the stream's bit
 * position (two word loads and a funnel shift; the word index clamps to the section, and the one
 * word past it is the ring's slack), so no bit buffer stays live. The window loop is not unrolled:
 * unrolled, the K and V decoders were ~1,370 straight-line instructions per slab, and the
 * kernel's instruction fetch ("no instruction" stalls) cost more than the loop does.
 * Lane l decodes streams of channels: K c0 + 8 i, c0 = HD / 4 (l / 8) + l % 8, so that it holds
 * both channels of its K pairs and a warp's pair stores meet 32 banks; V l + 32 i.
 */
template <int HD, int TENSOR, class T>
__device__ __forceinline__ void v3h_fast(const v3_sec &sec, const uint16_t *tab, uint32_t *pos,
                                         const uint8_t *scr, const uint8_t *area, uint8_t *tile,
                                         int a) {
  typedef v3h_area<HD> A;
  constexpr bool F16 = kFast16<T>;
  constexpr int NS = HD / 32, SPW = 4;
  static_assert(SPW * kHufTableBits <= 32, "a window holds SPW codes");
  constexpr int KST = A::kst, VST = A::vst;
  const int lane = threadIdx.x & 31;
  const int c0 = v3h_kc0<HD>(lane); /* K: channels c0 + 8 i, pairs kq(i) (v3h_kpair) */
  const uint32_t last = sec.last;
  const uint32_t *w = sec.w;
  /* A window x holds the stream's next 32 bits rotated left by kHufTableBits + 1, so that the
   * next code's kHufTableBits bits sit at bits 1 .. kHufTableBits: with the table's 128 bytes
   * 128-aligned (v3h_area), its entry's shared address is one LOP3 (tab | x & 0x7e), and a code
   * of l bits is consumed by rotating x left by l (bits that come round again are never reached:
   * a window gives at most SPW * kHufTableBits = 24 of its 32 bits). Per lookup: LOP3, LDS, SHF
   * (was a shift for the index, an IMAD for the address, LDS and a shift). */
  static_assert(kHufTableBits == 6 && SPW * kHufTableBits + kHufTableBits <= 32, "x's layout");
  const uint32_t tab_s = smem_u32(tab);
  auto rotl = [](uint32_t v, uint32_t n) { return __funnelshift_l(v, v, n); };
  /* No memory clobber: the table is not written while this runs (v3h_setup writes it before the
   * caller's __syncwarp), and the address depends on window words loaded after that barrier. */
  auto lookup = [&](uint32_t v) {
    uint32_t r;
    asm("ld.shared.u16 %0, [%1];\n" : "=r"(r) : "r"(tab_s | (v & 0x7eu)));
    return r;
  };
  int ch[NS];
#pragma unroll
  for (int i = 0; i < NS; i++) ch[i] = TENSOR == 0 ? c0 + 8 * i : lane + 32 * i;
  auto kq = [&](int i) { return v3h_kpair<HD>(lane, i); }; /* pair of ch[i], i even */
  uint32_t p[NS]; /* bit positions */
#pragma unroll
  for (int i = 0; i < NS; i++) p[i] = pos[ch[i]];
  /* K: steps and addends of the channel pairs (ch[i], ch[i + 1]) = (c, c + 8), i even: pair
   * kq(i), one word each (v3h_kslot); bf16: each channel's float step and base - 32 (v3h_setup) */
  __half2 kst[NS / 2], kbs[NS / 2];
  float kstf[NS], kbf[NS];
  if (TENSOR == 0) {
    if constexpr (F16) {
#pragma unroll
      for (int i = 0; i < NS; i += 2) {
        kst[i / 2] = as_h2<__half2>(((const uint32_t *)(area + A::kst2))[kq(i)]);
        kbs[i / 2] = as_h2<__half2>(((const uint32_t *)(area + A::kbs2))[kq(i)]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < NS; i++) {
        kstf[i] = ((const float *)(scr + v3_scratch<HD>::kstep))[ch[i]];
        kbf[i] = ((const float *)(scr + v3_scratch<HD>::kbase))[ch[i]];
      }
    }
  }
  /* bf16: the value of entry e in a group of float step st and base b - 32 (fb), rounded as the
   * generic decoder rounds (float)(b + u) * st; two make a tile word. */
  auto bvalue = [](uint32_t e, float fb, float st) {
    return __fmul_rn(__fadd_rn(v3h_u32f(e), fb), st);
  };
  auto bword = [](float lo, float hi) {
    return h2_bits<__nv_bfloat162>(__floats2bfloat162_rn(lo, hi));
  };
  /* Pointers that step with the window loop (each trip's addresses are then immediate offsets):
   * V's token-pair steps (addends kUnitTokens / 2 words after them), V's tile column of channel
   * lane (+ 32 i: 128 i bytes), K's tile words of pair kq(0) in even and odd rows. Pair kq(i) is
   * kq(0) + 4 i, whose word lies 64 i bytes after kq(0)'s in every row (v3h_kidx: pi / 4 grows by
   * i, below the swizzle's bit), so two K pointers serve every pair. */
  static_assert(A::vbs2 == A::vst2 + 2 * kUnitTokens, "V's addends follow its steps");
  const uint32_t *vsb = (const uint32_t *)(area + A::vst2) + a / 2;
  uint8_t *vdst = tile + 4 * lane;
  uint8_t *kdst[2];
#pragma unroll
  for (int r = 0; r < 2; r++) kdst[r] = tile + r * KST + 4 * (v3h_kidx<HD>(kq(0)) ^ v3h_kswz(r));
#pragma unroll 1
  for (int t0 = 0; t0 < 16; t0 += SPW) {
    /* V: the token pairs' steps and addends, shared by the lane's streams (loaded once: the tile
     * stores in between could alias them for the compiler) */
    __half2 vs2[SPW / 2], vb2[SPW / 2];
    float vs[SPW], vb[SPW]; /* bf16: the trip's four tokens' steps and bases - 32 */
    if (TENSOR == 1 && !F16) {
      const int t = (a + t0) & (kUnitTokens - 1);
      const float4 s4 = *(const float4 *)((const float *)(scr + v3_scratch<HD>::vstep) + t);
      const float4 b4 = *(const float4 *)((const float *)(scr + v3_scratch<HD>::vbase) + t);
      vs[0] = s4.x, vs[1] = s4.y, vs[2] = s4.z, vs[3] = s4.w;
      vb[0] = b4.x, vb[1] = b4.y, vb[2] = b4.z, vb[3] = b4.w;
    }
    if (TENSOR == 1 && F16) {
      /* 8-byte loads: vsb advances by 8 bytes from a 32-byte multiple (a % 16 == 0) */
      static_assert(SPW == 4, "two token pairs per trip");
      const uint2 st = *(const uint2 *)vsb, bs = *(const uint2 *)(vsb + kUnitTokens / 2);
      vs2[0] = as_h2<__half2>(st.x);
      vs2[1] = as_h2<__half2>(st.y);
      vb2[0] = as_h2<__half2>(bs.x);
      vb2[1] = as_h2<__half2>(bs.y);
      vsb += SPW / 2;
    }
    /* The lane's NS streams step together, symbol y of every stream before symbol y + 1, and
     * the tile is written after the last lookup: each symbol is a dependent chain (shift, index,
     * LDS, shift), and a tile store between two streams' chains orders the second's loads after
     * it (V's streams ran one after another). ptxas runs the four streams side by side. */
    uint32_t x[NS], e[NS][SPW];
#pragma unroll
    for (int i = 0; i < NS; i++) {
      const uint32_t k = min(p[i] >> 5, last);
      x[i] = rotl(__funnelshift_l(w[k + 1], w[k], p[i]), kHufTableBits + 1);
    }
#pragma unroll
    for (int y = 0; y < SPW; y++)
#pragma unroll
      for (int i = 0; i < NS; i++) {
        e[i][y] = lookup(x[i]);
        if (y + 1 < SPW) x[i] = rotl(x[i], e[i][y]);
      }
    /* An entry's low six bits are its code length (fp16 bits of u < 32 end in six zeros): the
     * funnel shift uses the low five as the shift, the sum of the entries' low six bits is the
     * window's bits, and one PRMT and one AND pair two entries' u as a half2. */
    auto u2 = [&](uint32_t lo, uint32_t hi) {
      return as_h2<__half2>(__byte_perm(lo, hi, 0x5410) & 0xfff0fff0u);
    };
#pragma unroll
    for (int i = 0; i < NS; i++) {
      uint32_t n = 0;
#pragma unroll
      for (int y = 0; y < SPW; y++) n += e[i][y];
      p[i] += n & 63u;
    }
    if (TENSOR == 1) {
      /* Tokens (t0 + 2m, t0 + 2m + 1) of channel ch[i]: one word of tile row t0 / 2 + m. */
#pragma unroll
      for (int i = 0; i < NS; i++)
#pragma unroll
        for (int m = 0; m < SPW / 2; m++) {
          uint32_t wd;
          if constexpr (F16)
            wd = h2_bits<__half2>(__hfma2(u2(e[i][2 * m], e[i][2 * m + 1]), vs2[m], vb2[m]));
          else
            wd = bword(bvalue(e[i][2 * m], vb[2 * m], vs[2 * m]),
                       bvalue(e[i][2 * m + 1], vb[2 * m + 1], vs[2 * m + 1]));
          *(uint32_t *)(vdst + m * VST + 128 * i) = wd;
        }
      vdst += SPW / 2 * VST;
    } else {
      /* Channels (ch[i], ch[i] + 8) of token t0 + y: one word of tile row t0 + y (pair kq(i);
       * t0 is even, so the row's swizzle is y's), paired from the two streams' entries before
       * the step. */
#pragma unroll
      for (int i = 0; i < NS; i += 2) {
#pragma unroll
        for (int y = 0; y < SPW; y++) {
          uint32_t wd;
          if constexpr (F16)
            wd = h2_bits<__half2>(__hfma2(u2(e[i][y], e[i + 1][y]), kst[i / 2], kbs[i / 2]));
          else
            wd = bword(bvalue(e[i][y], kbf[i], kstf[i]),
                       bvalue(e[i + 1][y], kbf[i + 1], kstf[i + 1]));
          *(uint32_t *)(kdst[y & 1] + (y & ~1) * KST + 64 * i) = wd;
        }
      }
#pragma unroll
      for (int r = 0; r < 2; r++) kdst[r] += SPW * KST;
    }
  }
#pragma unroll
  for (int i = 0; i < NS; i++) pos[ch[i]] = p[i];
}

/* SRC_HUFG: page tokens [a, a + nr) of every stream into tile rows 0..nr-1, symbol by symbol. */
template <int HD, class T>
__device__ void v3h_generic(const v3_sec &sec, const v3h_state &h, const uint16_t *tab,
                            const uint32_t *sym, uint32_t *pos, const uint8_t *scr, int tensor,
                            uint8_t *tile, int a, int nr) {
  const int lane = threadIdx.x & 31, n_lanes = h.n_lanes;
  typedef v3_scratch<HD> SC;
  const int32_t *gb = (const int32_t *)(scr + (tensor ? SC::vbase : SC::kbase));
  const float *gs = (const float *)(scr + (tensor ? SC::vstep : SC::kstep));
  const int s_from = h.tok_done * HD, s_lo = a * HD, s_end = (a + nr) * HD;
  for (int i = lane; i < n_lanes; i += 32) {
    uint32_t p = pos[i];
    int s = i < s_from ? i + (s_from - i + n_lanes - 1) / n_lanes * n_lanes : i;
    for (; s < s_end; s += n_lanes) {
      const uint32_t win = kvc_dev_window(sec.w, sec.last, p);
      const uint32_t e = tab[kvc_dev_top(win, kHufTableBits)];
      uint32_t sy = e & 63u, len = (e >> 6) & 15u;
      if (e & kHufEsc) { /* a code longer than the table: search the longer codes */
        for (int c = 0; c < h.n_sym; c++) {
          const uint32_t x = sym[c], l = x >> 16;
          if ((int)l > kHufTableBits && kvc_dev_top(win, l) == (x & 0xffffu)) {
            sy = (uint32_t)c;
            len = l;
            break;
          }
        }
      }
      const uint32_t ne = kvc_sym_extra(sy);
      const uint32_t u = kvc_sym_base(sy) + kvc_dev_top(win << len, ne);
      p += len + ne;
      if (s >= s_lo) {
        /* Groups as v3h_setup keeps them: per channel, or per page token & 63. */
        const int t = s / HD, d = s % HD, g = sec.mode == 1 ? t & (kUnitTokens - 1) : d;
        const uint32_t b = (uint32_t)gb[g] + (sec.mode == 2 ? (uint32_t)kvc_unzigzag(u) : u);
        *(uint16_t *)(tile + (tensor ? v3h_vbyte<HD>(t - a, d) : v3h_kbyte<HD>(t - a, d))) =
            to_bits<T>(__fmul_rn(__int2float_rn((int)b), sec.mode == 2 ? sec.step : gs[g]));
      }
    }
    pos[i] = p;
  }
}

/* S^T += K Q^T from the K pair tile, tile rows min(g, nr - 1) and min(g + 8, nr - 1) (rows past
 * the slab's read its last, finite and masked): lane (g, c) reads its HD / 8 channel pairs of each
 * token, four per LDS.128, in k_channel order, so that k-block kb's A operand is {row g pair 2kb,
 * row g + 8 pair 2kb, row g pair 2kb + 1, row g + 8 pair 2kb + 1} as v3's builders give it. */
template <int HD, class T, int NB>
__device__ __forceinline__ void v3h_s(const uint8_t *tile, int g, int c, int nr,
                                      const qfrag_t<HD, NB> &qb, float (&s)[2][NB][4]) {
  constexpr int KST = v3h_area<HD>::kst;
  const int r[2] = {min(g, nr - 1), min(g + 8, nr - 1)};
  /* Row r's 16-byte unit of pairs 4 c .. 4 c + 3 in block p4 lies at 16 c + 64 (p4 ^ (r & 1)). */
  const uint8_t *row[2][2];
#pragma unroll
  for (int h = 0; h < 2; h++)
#pragma unroll
    for (int x = 0; x < 2; x++) row[h][x] = tile + r[h] * KST + 16 * c + 64 * (x ^ (r[h] & 1));
#pragma unroll
  for (int p4 = 0; p4 < HD / 32; p4++) {
    uint4 b[2];
#pragma unroll
    for (int h = 0; h < 2; h++) b[h] = *(const uint4 *)(row[h][p4 & 1] + 128 * (p4 / 2));
#pragma unroll
    for (int x = 0; x < 2; x++) {
      const int kb = 2 * p4 + x; /* pairs 2kb, 2kb + 1: words (x, y) or (z, w) */
      const uint32_t a[4] = {x ? b[0].z : b[0].x, x ? b[1].z : b[1].x, x ? b[0].w : b[0].y,
                             x ? b[1].w : b[1].y};
#pragma unroll
      for (int nb = 0; nb < NB; nb++) mma16816<T>(s[x][nb], a, qb[nb][kb][0], qb[nb][kb][1]);
    }
  }
}

/* O^T += V^T P^T from the V pair tile: lane (g, c) takes tokens (2c, 2c + 1) (tile row c) and
 * (2c + 8, 2c + 9) (row c + 4) of its run of channels g HD/8 .. g HD/8 + HD/8 - 1, two m-tiles per
 * LDS.128 pair: m-tile mt's A operand is {channel g HD/8 + 2 mt at tokens (2c, 2c + 1), the next
 * channel there, the first at tokens (2c + 8, 2c + 9), the next there}. */
template <int HD, class T, int NB>
__device__ __forceinline__ void v3h_pv(const uint8_t *tile, int g, int c,
                                       const uint32_t (&pb)[NB][2], oacc_t<HD, NB> &o) {
  constexpr int VST = v3h_area<HD>::vst;
  const uint8_t *r0 = tile + c * VST + 4 * g * (HD / 8), *r1 = r0 + 4 * VST;
#pragma unroll
  for (int n4 = 0; n4 < HD / 32; n4++) {
    const uint4 b0 = *(const uint4 *)(r0 + 16 * n4), b1 = *(const uint4 *)(r1 + 16 * n4);
    const uint32_t a0[4] = {b0.x, b0.y, b1.x, b1.y}, a1[4] = {b0.z, b0.w, b1.z, b1.w};
#pragma unroll
    for (int nb = 0; nb < NB; nb++) {
      mma16816<T>(o[2 * n4][nb], a0, pb[nb][0], pb[nb][1]);
      mma16816<T>(o[2 * n4 + 1][nb], a1, pb[nb][0], pb[nb][1]);
    }
  }
}

/*
 * Decodes page tokens [a, a + nr) of Huffman section `tensor` (set up by v3h_setup, decoded up to
 * token a so far: slabs come in order) into the warp's tile (slab tokens 0..nr-1; SRC_HUF: all
 * 16, a a multiple of 16; V: tokens nr..15 zeros). Returns false, in every lane, when the
 * section has been decoded to its end and a stream does not end where the next one starts. The
 * caller synchronises the warp before (the tile's earlier readers) and after (its readers).
 */
template <int HD, class T>
__device__ bool v3h_slab(const v3_src &src, int tensor, const uint8_t *scr, uint8_t *area, int a,
                         int nr) {
  typedef v3h_area<HD> A;
  const int lane = threadIdx.x & 31;
  const v3h_state h = ((const v3h_state *)(area + A::state))[tensor];
  const uint16_t *tab = (const uint16_t *)(area + A::tab) + tensor * (1 << kHufTableBits);
  uint32_t *pos = (uint32_t *)(area + A::pos) + tensor * A::lanes;
  int done = a + nr;
  if (src.kind == SRC_HUF) {
    uint8_t *tile = area + A::tile;
    if (tensor == 0) v3h_fast<HD, 0, T>(src.sec, tab, pos, scr, area, tile, a);
    else v3h_fast<HD, 1, T>(src.sec, tab, pos, scr, area, tile, a);
    done = a + 16;
  }
  if (src.kind != SRC_HUF) {
    if (tensor == 1 && nr < 16) {
      /* P V reads whole token pairs: rows past the page's become zeros (finite, masked). */
      for (int i = lane; i < A::tile_bytes / 16; i += 32)
        *(uint4 *)(area + A::tile + 16 * i) = make_uint4(0, 0, 0, 0);
      __syncwarp();
    }
    v3h_generic<HD, T>(src.sec, h, tab, (const uint32_t *)(area + A::sym) + tensor * A::symw,
                       pos, scr, tensor, area + A::tile, a, nr);
  }
  __syncwarp(); /* also: every lane has read h before lane 0 moves tok_done */
  /* only the generic decoder reads it (SRC_HUF decodes whole slabs in order) */
  if (src.kind != SRC_HUF && lane == 0) ((v3h_state *)(area + A::state))[tensor].tok_done = done;
  if (done < h.n_tokens) return true;
  /* Every stream decoded to its end: each must stop where the next one starts (nx: the starts
   * of the lane's streams' successors; SRC_HUF's kept by v3h_setup, SRC_HUFG's recomputed). */
  constexpr int SPL = A::lanes / 32;
  uint32_t start[SPL];
  if (src.kind == SRC_HUF) {
    const uint16_t *o = (const uint16_t *)(area + A::sym) + tensor * 2 * A::symw + SPL * lane;
#pragma unroll
    for (int q = 0; q < SPL; q += 4) {
      const uint2 v = *(const uint2 *)(o + q);
      start[q] = h.stream_pos + (v.x & 0xffffu);
      start[q + 1] = h.stream_pos + (v.x >> 16);
      start[q + 2] = h.stream_pos + (v.y & 0xffffu);
      start[q + 3] = h.stream_pos + (v.y >> 16);
    }
  } else {
    v3h_lane_starts(src.sec.w, h, start);
  }
  const uint32_t next_first = __shfl_down_sync(0xffffffffu, start[0], 1);
  uint32_t p[SPL];
#pragma unroll
  for (int q = 0; q < SPL; q += 4) {
    const uint4 v = *(const uint4 *)(pos + SPL * lane + q);
    p[q] = v.x, p[q + 1] = v.y, p[q + 2] = v.z, p[q + 3] = v.w;
  }
  bool ok = true;
#pragma unroll
  for (int q = 0; q < SPL; q++) {
    const int i = SPL * lane + q;
    const uint32_t nx = q + 1 < SPL ? start[q + 1] : next_first;
    ok &= i >= h.n_lanes || p[q] == (i + 1 < h.n_lanes ? nx : h.end);
  }
  return __all_sync(0xffffffffu, ok);
}

/* The K and V sources of Huffman page pg of the unit at ub (v3_page_setup's branch for
 * PG_HUFFMAN): the warp's scratch and Huffman area are rewritten. Warp-uniform; false for a
 * section inconsistent with the format (ks and vs are then not to be read). */
template <int HD, class T>
__device__ __forceinline__ bool v3h_page_setup(const unit_page &pg, const uint8_t *ub,
                                               uint8_t *scr, uint8_t *area, v3_src &ks,
                                               v3_src &vs) {
  __syncwarp(); /* the previous page's readers are done with the scratch and tables */
  const int t_lo = pg.ptok0, t_hi = pg.ptok0 + pg.nrows;
  /* One copy of the parser for both sections (a loop, not two inlined calls): it runs once per
   * page, and its straight-line code competes with the slab loop's for the instruction cache. */
  bool ok = true;
#pragma unroll 1
  for (int tensor = 0; tensor < 2; tensor++) {
    /* Set in full unless the section is refused; then nothing reads it (nor ks, vs: the unit's
     * rows become NaN), so the refusal paths carry no copy of it. */
    v3_sec sec;
    const int kind = v3h_setup<HD, T>(ub + (tensor ? pg.v_ring : pg.k_ring),
                                      tensor ? pg.v_bytes : pg.k_bytes, tensor, pg.n_tokens, t_lo,
                                      t_hi, scr, area, sec);
    if (kind == SRC_BAD) { /* warp-uniform */
      ok = false;
      break;
    }
    if (tensor == 0) {
      ks.kind = kind;
      ks.sec = sec;
    } else {
      vs.kind = kind;
      vs.sec = sec;
    }
  }
  __syncwarp();
  return ok;
}

}  // namespace kvc_attn

#endif /* KVC_ATTN_V3_HUF_CUH */
