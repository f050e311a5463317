/*
 * Fused paged attention on the GPU: kvc_attn_cuda (attention/kvc_attn.h).
 *
 * One CTA handles (sequence, kv head, query tile, split): a query tile is 16 * WM "query entries"
 * (a query row times one head of the kv head's GQA group, flattened row-major), a split a range of
 * the sequence's 64-token *units*. A producer warp and four consumer warps (eight in the instance
 * of 128 entries, WM = 8):
 *
 *   producer (warp 4)  walks the split's units: reads block ids, page entries, page headers and
 *                      section tables a batch of pages at a time (16; 32 in v3's two-page units),
 *                      takes space in a shared-memory byte ring and issues bulk copies (the TMA
 *                      engine; lane s the unit's section s, one copy per section and run of chunks
 *                      adjacent in the pool: copy_bulk), so that each unit lands as its pages'
 *                      sections: compressed bytes or uncompressed rows (v3's units of whole pages:
 *                      each page's descriptor entry comes with the batch, load_batch). A unit's
 *                      completion is tracked by an mbarrier ("full", by bytes), its release by the
 *                      consumers by another ("empty"); every thread arrives itself, so each arrive
 *                      releases that thread's own accesses. The producer runs ahead as far as the
 *                      ring allows; its dependent metadata loads still cost the consumers a wait at
 *                      each batch (session 32's profile, bench/NOTES-attention.md). (Per-lane
 *                      16-byte cp.async into the swizzled tile, as first written, held fp16
 *                      launches to ~1.5 TB/s: bench/NOTES-attention.md, session 21.)
 *   consumers (0..3)   per unit: decode compressed sections, or copy rows, into a shared K/V tile
 *                      (pairs of warps: pair p decodes tensor p & 1 (K, V) of each section; with
 *                      eight warps, part p >> 1 of two, attention/kvc_attn_decode.cuh), then
 *                      S = Q K^T with mma.sync m16n8k16 (M = the 16 query entries, so the GQA group
 *                      shares every K/V value it loads), online softmax in fp32 (exp2, scale folded
 *                      in), O += P V with mma.sync. With one query tile (decode) the four warps
 *                      split the unit's 64 tokens; with more entries each warp owns 16 of them,
 *                      and the instances of 64 and 128 entries (head_dim 64/128, built for
 *                      sm_90a) run S and P V on wgmma, each warpgroup over its 64 entries, so
 *                      that K and V are read from shared memory once per warpgroup.
 *                      (Eight warps of which only half took part in the decode, with pairs on
 *                      named barriers, made compute-sanitizer's racecheck report hazards in
 *                      race-free code: bench/NOTES-attention.md, session 21.)
 *
 * Decode instances (16 query entries) are sized for two CTAs per SM; see ring_bytes.
 *
 * Decode launches whose caller passes a codec mask run v3 instead (v3_built; head_dim 256: blocks
 * up to 64 tokens unless the pages are all rows) (attention/kvc_attn_v3.cuh): the same producer,
 * and consumer warps that each take whole units (half units when all pages are rows) and build the
 * mma operands (K and V as the A operand, the query entries as N) in registers from the ring bytes;
 * a mask that allows Huffman pages selects v3's Huffman instance (attention/kvc_attn_v3_huf.cuh),
 * which leaves blocks of 128 tokens at head_dim 128 and 256 to v2. Launches with more query
 * entries per kv head (several rows per sequence: speculative tokens, short prefill chunks; a
 * cascade's prefixes) run v3 over several query tiles of 8 where tile_reads expects that to cost
 * less than v2's tiles of 16-128 (each v3 tile decodes the pages again).
 *
 * Nothing decoded leaves shared memory. Partial results of a split go to the workspace as
 * (O / l, log2-sum-exp) and a second kernel combines them; with one split the CTA writes `out`.
 * A call whose sequences form groups that start with the same blocks may run as a cascade
 * (kvc_attn_args_t::prefix_seqs): one launch over the groups' prefixes, each group's query rows
 * as one sequence (params::row_map gathers them, params::pos_shift puts them past the prefix's
 * last token), one over each sequence's blocks after its prefix, both writing partials, and one
 * combine over both launches' splits.
 * A page that fails its checks makes the rows of every CTA that reads it NaN: the kernels cannot
 * return a status, and NaN is never mistaken for attention output.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#ifdef KVC_ATTN_PROBE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#endif

#include "attention/kvc_attn.h"
#include "attention/kvc_attn_decode.cuh"
#include "attention/kvc_attn_ptx.cuh"
#include "attention/kvc_attn_ring.h"
#include "compress/kvc_page_format.h"

namespace kvc_attn {

#ifdef NDEBUG
constexpr bool kDebug = false;
#else
constexpr bool kDebug = true; /* bounds checks on every pool read the producer issues */
#endif

/* Consumer warps of the instance with WM m-tiles of 16 query entries: four (4 / WM of them share
 * an m-tile, splitting a unit's tokens), or one per m-tile above that; its threads (+ the producer
 * warp); and the parts each section's decode is split into (one per pair of K pairs). */
template <int WM> constexpr int consumer_warps() { return WM > 4 ? WM : 4; }
template <int WM> constexpr int threads_of() { return 32 * (consumer_warps<WM>() + 1); }
template <int WM> constexpr int decode_parts() { return consumer_warps<WM>() / 4; }
constexpr int kSlots = 8;                        /* units in flight at most */
constexpr int kMaxUnitPages = kUnitTokens / 16;  /* pages in a unit (block_tokens >= 16) */
constexpr int kBatch = 16; /* pages of metadata the producer loads at once (layouts' `batch`) */
static_assert(KVC_PAGE_MAX_CHUNKS <= 64, "the producer loads two chunk ids per lane and page");
/* Splitting stops at this many CTAs: large batches (a decode step at capacity: 39 sequences x 8
 * kv heads) still split when that fills the last wave of CTAs better. */
constexpr int kMaxCtasForSplit = 4096;
constexpr int kMaxSplits = 64;
constexpr int kWsEntries = 16384; /* (row, head) partials the workspace is sized for */

enum : uint8_t { PG_NONE = 0, PG_STAGING, PG_RAW, PG_BITPACK, PG_HUFFMAN, PG_BAD };
enum : int32_t { UNIT_BAD = 1 }; /* unit_desc::flags */
/* A bad page's ring bytes in page_meta::end: above any ring, and a unit's pages' sum of them
 * does not overflow. */
constexpr uint32_t kBadUnit = 1u << 29;

/* What the producer knows about one page of its current batch. */
struct page_meta {
  uint32_t k_off, k_bytes, v_off, v_bytes; /* chunk-chain offsets (a packed page: + its
                                              start) and sizes of this head's K and V */
  uint16_t n_tokens;                       /* tokens the page holds */
  uint8_t cls;                             /* PG_* */
  uint8_t nchunks;                         /* for the debug bounds checks */
  uint32_t end;                            /* whole-page units: ring bytes of its unit's pages
                                              up to this one (kBadUnit and up: one is bad) */
  uint64_t runs;                           /* bit i: chunk i + 1 follows chunk i in the pool
                                              (bit 63 clear); 0 where not built: chunks of
                                              kRunChunkBytes and more, the transposed loads */
};

/* Pools of chunks smaller than this take one bulk copy per run of chunks that follow each other
 * in the pool (page_meta::runs) instead of one per chunk. At 1 KiB chunks (the cache's pick for
 * one-kv-head pages, e.g. Llama-3-70B at TP 8) the producer's cost per copy set the pace: runs
 * took the 70B step's fp16 and bit-pack rows (8 layers) from 1.69 / 2.61 ms to 1.48 / 2.29 ms.
 * At 8 KiB and more a section lies in one or two chunks, and looking for runs there made bit-pack
 * 3-7% slower over the attention bench's 16 KiB chunks (bench/NOTES-capacity.md, session 51). */
constexpr uint32_t kRunChunkBytes = 4096;

/* Compressed sections' ring slots (kvc_attn_ring_slot) hold at most this many bytes past the
 * section and slack; the layouts' fit checks count it. */
constexpr int kSlotExtra = KVC_ATTN_SLOT_EXTRA;

/* One page of a unit, as the consumers see it. */
struct unit_page {
  uint32_t k_ring, v_ring;   /* offsets of its K / V bytes from the unit's ring offset */
  uint32_t k_bytes, v_bytes;
  uint16_t n_tokens;
  int16_t ptok0;             /* first page token the unit uses */
  int16_t row0;              /* the unit row it goes to */
  int16_t nrows;
  uint8_t cls;
  uint8_t pad[3];
};

struct unit_desc {
  uint32_t ring_off;
  int32_t flags;             /* UNIT_* */
  int16_t n_valid;           /* rows of the unit below kv_len */
  int16_t npages;
  int32_t pad;
  unit_page pages[kMaxUnitPages];
};

struct params {
  const int32_t *qo_indptr, *kv_len, *block_indptr, *block_ids;
  /* NULL, or the row of q and out of each of the launch's query rows (a cascade's prefix launch:
   * its sequences are groups of the call's sequences, whose rows need not be adjacent). */
  const int32_t *row_map;
  const kvc_page_entry_t *dir;
  const uint8_t *pool;
  const void *q;
  void *out;
  /* Partial results: [split][total_q_rows][num_q_heads] x head_dim (ws_o) and the log2-sum-exp
   * (ws_lse). A launch writes `out` when ws_lse is NULL, else its partials (splits from 0 at
   * these pointers: a cascade's second launch gets pointers past the first's). */
  float *ws_o;
  float *ws_lse;
  uint32_t chunk_bytes, chunk_shift;
  int num_q_heads, num_kv_heads, group, block_tokens, dtype;
  int total_q_rows, qtiles, nsplits, units_per_split;
  /* The grid and the splits' ranges (cta_of, split_range): sequences in this launch, units of
   * its longest sequence, and, where the launch is one wave of two CTAs per SM, the blocks that
   * enter their SM first (first_ctas, else 0) and their share against the others' 64 (first_w). */
  int num_seqs, units_max, first_ctas, first_w;
  int unit_split_lg; /* v3: log2 of the consumer warps sharing each unit (see attn_kernel_v3) */
  /* Added to every query row's position: 0 (causal), or the rows - 1 of a cascade's prefix
   * launch, whose one sequence's rows then all sit at or past its last token and see all of it. */
  int pos_shift;
  /* A v3 launch in two passes (kvc_attn_args_t.huffman_rare): 0 none; 1 the instance without
   * Huffman, whose CTAs that meet a Huffman page write nothing; 2 the Huffman instance over pass
   * 1's grid and ranges (units of kUnitTokens << range_lg tokens there), only its CTAs whose pages
   * include a Huffman page (v3_pass2_range). */
  int huf_pass, range_lg;
  float scale_log2;
};

constexpr int align_up(int x, int a) { return (x + a - 1) / a * a; }

/* A CTA's place in the launch. The grid is one-dimensional with the splits outermost: block
 * split x groups + group, the groups (sequence, kv head, query tile) with the query tile fastest.
 * So a group's splits fall both below and above the SM count, in both of an SM's placements. */
struct cta_place {
  int qt, kh, seq, split, group;
};

__device__ __forceinline__ cta_place cta_of(const params &p) {
  const int groups = p.qtiles * p.num_kv_heads * p.num_seqs, b = (int)blockIdx.x;
  cta_place c;
  c.split = b / groups;
  c.group = b - c.split * groups;
  c.qt = c.group % p.qtiles;
  const int r = c.group / p.qtiles;
  c.kh = r % p.num_kv_heads;
  c.seq = r / p.num_kv_heads;
  return c;
}

/*
 * Units [*begin, *end) of CTA c's split of a sequence of `units` units. Even splits of
 * units_per_split, unless the launch is one wave of two CTAs per SM (first_ctas > 0): of the
 * two CTAs an SM holds, the one that entered second runs ~13% slower (the warp schedulers prefer
 * older warps; bench/NOTES-attention.md, session 40) and the launch ended with it. There the
 * splits of a group that enter first (blocks below first_ctas, which the block scheduler places
 * first: splits 0 .. k - 1 of the group) take first_w units for every 64 of the others', over
 * the longest sequence's units, so that the two CTAs of an SM end closer together. Static, so a
 * group's ranges, and the order of every sum, do not depend on timing.
 */
__device__ __forceinline__ void split_range(const params &p, const cta_place &c, int units,
                                            int *begin, int *end) {
  if (p.first_ctas == 0) {
    *begin = c.split * p.units_per_split;
    *end = min(units, *begin + p.units_per_split);
    return;
  }
  const int groups = p.qtiles * p.num_kv_heads * p.num_seqs;
  const int k = c.group >= p.first_ctas
                    ? 0
                    : min(p.nsplits, (p.first_ctas - c.group + groups - 1) / groups);
  auto prefix = [&](int s) {
    return (long)min(s, k) * p.first_w + (long)max(s - k, 0) * 64;
  };
  const long total = prefix(p.nsplits);
  *begin = (int)(p.units_max * prefix(c.split) / total);
  *end = min(units, (int)(p.units_max * prefix(c.split + 1) / total));
}

/*
 * Ring size per instance. Decode (WM = 1) and speculative (WM = 2) instances are sized for two CTAs
 * per SM, so that one CTA decodes while the other computes or waits for memory; that leaves room
 * for two uncompressed 64-token units (head_dim 64) or one and a half (head_dim 128), and for the
 * sections of blocks up to 64 tokens. The WM = 4 and 8 instances (many query rows) take a whole SM
 * and what is left beside their two K/V tiles and scratch (WM = 8: eight warps' scratch), at least
 * a ring for blocks of 128 tokens; head_dim 256 has one instance, one CTA per SM.
 */
template <int HD, int WM> constexpr int ring_bytes() {
  return HD == 64 ? (WM == 1 ? 64 : WM == 2 ? 56 : WM == 4 ? 48 : 96) * 1024
         : HD == 128 ? (WM == 1 ? 48 : WM == 2 ? 40 : WM == 4 ? 112 : 72) * 1024
                     : 112 * 1024;
}

template <int HD, int WM> struct smem_layout {
  static constexpr int RB = 2 * HD;
  static constexpr int tile = kUnitTokens * RB; /* one of K, V */
  static constexpr int unit_tokens = kUnitTokens;
  static constexpr int ring = ring_bytes<HD, WM>();
  static constexpr int slots = kSlots;
  static constexpr bool fetch_ahead = false; /* producer: see fetch_ahead in v3_layout */
  static constexpr bool raw_from_shape = false; /* load_batch: see raw_from_shape in v3_layout */
  static constexpr bool ids_per_lane = true; /* load_batch */
  static constexpr int slack = 0;     /* bytes left after each compressed section */
  /* Instances of one CTA per SM decode unit k + 1 into a second K/V tile while slower warps
   * still attend unit k, so a unit costs the consumers one barrier instead of two. */
  static constexpr int dtiles = WM >= 4 && HD <= 128 ? 2 : 1;
  static constexpr int dtile_off = ring;
  static constexpr int scratch_bytes = align_up(scratch_layout<HD>::bytes, 128);
  static constexpr int scratch_off = dtile_off + dtiles * 2 * tile;
  /* wgmma reads the Q tile of the WM >= 4 instances by descriptor: 1024-byte aligned. */
  static constexpr int qtile_off =
      align_up(scratch_off + consumer_warps<WM>() / 2 * scratch_bytes, WM >= 4 ? 1024 : 16);
  static constexpr int desc_off = qtile_off + 16 * WM * RB;
  static constexpr int meta_off = desc_off + kSlots * (int)sizeof(unit_desc);
  static constexpr int batch = kBatch;
  static constexpr int chunks_off = meta_off + batch * (int)sizeof(page_meta);
  static constexpr int bar_off = align_up(chunks_off + batch * KVC_PAGE_MAX_CHUNKS * 4, 8);
  static constexpr int bytes = bar_off + 2 * kSlots * 8;
  /* The epilogue reuses the ring for the warps' partial results. */
  static_assert(consumer_warps<WM>() * 16 * (HD + 2) * 4 <= ring,
                "epilogue does not fit the ring");
  static_assert(2 * tile <= ring, "one uncompressed unit must fit the ring");
  static_assert(bytes <= 232448, "more than the 227 KiB of shared memory a CTA may have");
  static_assert(WM >= 4 || HD == 256 || bytes + 1024 <= 233472 / 2, "two CTAs per SM do not fit");
};

/* ---- producer -------------------------------------------------------------------------------- */

/* Address in the pool of byte `off` of the page whose chunk ids are `chunks` (shared). */
__device__ __forceinline__ const uint8_t *page_addr(const params &p, const uint32_t *chunks,
                                                    uint32_t off) {
  return p.pool + ((uint64_t)chunks[off >> p.chunk_shift] << p.chunk_shift) +
         (off & (p.chunk_bytes - 1));
}

/* Fetches the directory entry of block `bid` (its head and chunk ids) into L2. */
__device__ __forceinline__ void prefetch_dir_entry(const params &p, int bid) {
  const uint8_t *e = (const uint8_t *)(p.dir + bid);
#pragma unroll
  for (int o = 0; o < (int)sizeof(*p.dir) + 127; o += 128)
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(e + min(o, (int)sizeof(*p.dir) - 1)));
}

/*
 * A full RAW page (its directory entry's codec RAW and size that of block_tokens rows per
 * section) takes its sections' offsets from the shape instead of from its header: the header's
 * round trip, after the directory's, held up each batch's first copies, with only three units of
 * rows in the ring to cover it. A cache's fp16 pages (raw) read 8% slower than staging pages at
 * (8, 32k); this took 3% of it (bench/NOTES-attention.md, session 57). The header and this head's
 * table words are loaded with the batch all the same and checked when the next batch loads or
 * the producer ends; a page they disagree with makes the CTA's outputs NaN, as a bad page does.
 * Its rows are copied first, from inside the page's own chunks (the directory's size bounds the
 * offsets).
 */
struct raw_check {
  uint4 h;        /* header bytes [0, 16): magic, version, codec, dtype, n_tokens, H, head_dim */
  uint32_t total; /* header bytes [24, 28): total_bytes */
  uint32_t w[4];  /* load_batch's table words: ends of sections kh - 1, kh, H + kh - 1, H + kh */
  bool pending;   /* this lane's page of the last batch took the shape's offsets */
};

/* Bytes of a full RAW page, and where its first section starts. */
__device__ __forceinline__ uint32_t raw_page_start(const params &p) {
  return kvc_page_sections_start((uint32_t)p.num_kv_heads, KVC_CODEC_RAW);
}
template <int HD>
__device__ __forceinline__ uint32_t raw_page_bytes(const params &p) {
  return raw_page_start(p) + 2u * (uint32_t)p.num_kv_heads * (uint32_t)p.block_tokens * 2u * HD;
}

/* Whether this lane's pending page (if any) has the header and table words of a full RAW page of
 * the launch's shape for head kh. */
template <int HD>
__device__ __forceinline__ bool raw_check_ok(const params &p, const raw_check &c, int kh) {
  if (!c.pending) return true;
  const uint32_t H = (uint32_t)p.num_kv_heads, bt = (uint32_t)p.block_tokens, S = bt * 2u * HD;
  const uint32_t k0 = raw_page_start(p) + (uint32_t)kh * S, v0 = k0 + H * S;
  const uint32_t ver_codec_dtype = KVC_PAGE_VERSION | KVC_CODEC_RAW << 8 | (uint32_t)p.dtype << 16;
  return c.h.x == KVC_PAGE_MAGIC && (c.h.y & 0xffffffu) == ver_codec_dtype &&
         c.h.z == (bt | H << 16) && (c.h.w & 0xffffu) == (uint32_t)HD &&
         c.total == raw_page_bytes<HD>(p) && (kh == 0 || c.w[0] == k0) && c.w[1] == k0 + S &&
         c.w[2] == v0 && c.w[3] == v0 + S;
}

/*
 * Loads the metadata of pages [first, first + NP) of the sequence into meta[] / chunks[]
 * (lane i < NP <= 32: page first + i): block id, then the directory entry and its chunk ids,
 * then (compressed pages) the header and this head's two section-table entries. Validates
 * everything the consumers and the copies rely on; a page that fails is PG_BAD, except that a
 * full RAW page's header is left to `later` (raw_check). Layouts over units of whole pages
 * (SL::unit_tokens > 64) also get each page's descriptor entry in ents[] and its unit's ring
 * bytes so far in meta[].end.
 */
template <int HD, class SL, bool RUNS>
__device__ void load_batch(const params &p, int first, int nblocks, int bi0, int kh, int len,
                           page_meta *meta, uint32_t *chunks, unit_page *ents, raw_check &later) {
  constexpr int NP = SL::batch, UT = SL::unit_tokens;
  const int lane = threadIdx.x & 31, j = first + lane, H = p.num_kv_heads, bt = p.block_tokens;
  const bool valid = lane < NP && j < nblocks;
  const int bid = valid ? p.block_ids[bi0 + j] : 0;
  /* SL::fetch_ahead: the next batch's block ids are loaded with this batch's and their directory
   * entries prefetched into L2 once this batch's chunk ids are in, so that the next load_batch
   * finds them there. Two units later (sessions 7-56) the wait for those ids would also wait for
   * the full RAW pages' header loads that raw_check leaves in flight (ptxas gives them one
   * scoreboard); right after this batch's directory load, the prefetch held up its chunk ids
   * (staging pages +1.9% at head_dim 256, session 57; bench/NOTES-attention.md, session 58). */
  static_assert(!SL::fetch_ahead || SL::ids_per_lane, "the prefetch follows the ids per lane");
  int ahead_bid = -1;
  if constexpr (SL::fetch_ahead)
    if (lane < NP && j + NP < nblocks) ahead_bid = p.block_ids[bi0 + j + NP];
  later.pending = false;
  uint2 head = make_uint2(0, 0);
  /* nbytes; kind | nchunks << 8 | codec << 16 | first << 24 */
  if (valid) head = *(const uint2 *)(p.dir + bid);
  /* IDS_PER_LANE: the lane's page's chunk ids, two per 8-byte load: the first kFirstIds without
   * waiting for the head (most pages lie in that many chunks), the rest once nchunks is known.
   * The producer shares the SM's shared-memory and load pipes with the consumer warps, so it
   * pays for every warp-wide operation, and a batch then takes ~kFirstIds of them instead of the
   * 5 NP of the transposed loads (page i's ids 32 lanes at a time). Measured (session 31,
   * ms): bit-pack (8, 32k) -3.1%, (16, 128k) -6.1%, fp16 pages -2..-5%, but Huffman pages in
   * v3's Huffman instance +1.4..+3.9%, so that instance keeps the transposed loads. */
  uint64_t runs = 0; /* page_meta::runs */
  if constexpr (SL::ids_per_lane) {
    constexpr int kFirstIds = 8;
    static_assert(offsetof(kvc_page_entry_t, chunk) % 8 == 0 &&
                      sizeof(kvc_page_entry_t) % 8 == 0 && KVC_PAGE_MAX_CHUNKS % kFirstIds == 0,
                  "chunk ids read two at a time, in whole blocks");
    uint32_t *my_ids = chunks + lane * KVC_PAGE_MAX_CHUNKS;
    const uint2 *ids = (const uint2 *)p.dir[bid].chunk;
    uint32_t prev = 0; /* the id before the group copy_ids takes */
    /* The last batch's ids were read by other lanes (page_addr: the copies, lanes 2i and 2i + 1
     * page i's; below, lanes past the batch page 0's); each lane overwrites its own page's below,
     * so the warp's reads come first (session 42's racecheck; shuffles do not order memory). */
    __syncwarp();
    /* ids [c, c + kFirstIds): the loads, the stores, then (small chunks) their bits of `runs`
     * (c - 1 .. c + 6; the page's ids past nchunks give bits copy_bulk never reads). */
    auto copy_ids = [&](int c) {
      uint2 v[kFirstIds / 2];
#pragma unroll
      for (int i = 0; i < kFirstIds / 2; i++) v[i] = ids[c / 2 + i];
#pragma unroll
      for (int i = 0; i < kFirstIds / 2; i++) ((uint2 *)my_ids)[c / 2 + i] = v[i];
      if (!RUNS) return;
      uint32_t bits = c > 0 && v[0].x == prev + 1 ? 1u : 0u;
#pragma unroll
      for (int i = 0; i < kFirstIds - 1; i++) {
        const uint32_t a = i % 2 ? v[i / 2].y : v[i / 2].x;
        const uint32_t b = i % 2 ? v[i / 2 + 1].x : v[i / 2].y;
        bits |= (b == a + 1 ? 2u : 0u) << i;
      }
      runs |= c > 0 ? (uint64_t)bits << (c - 1) : (uint64_t)(bits >> 1);
      prev = v[kFirstIds / 2 - 1].y;
    };
    if (valid) {
      copy_ids(0);
      const int n = min((int)((head.y >> 8) & 0xffu), KVC_PAGE_MAX_CHUNKS);
      for (int c = kFirstIds; c < n; c += kFirstIds) copy_ids(c);
    }
    if constexpr (SL::fetch_ahead)
      if (ahead_bid >= 0) prefetch_dir_entry(p, ahead_bid);
  } else {
    uint32_t cv[2 * NP];
#pragma unroll
    for (int i = 0; i < NP; i++) {
      const int bi = __shfl_sync(0xffffffffu, bid, i);
      const bool ok = first + i < nblocks;
      cv[2 * i] = ok ? p.dir[bi].chunk[lane] : 0u;
      cv[2 * i + 1] = ok && 32 + lane < KVC_PAGE_MAX_CHUNKS ? p.dir[bi].chunk[32 + lane] : 0u;
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < NP; i++) {
      chunks[i * KVC_PAGE_MAX_CHUNKS + lane] = cv[2 * i];
      if (32 + lane < KVC_PAGE_MAX_CHUNKS)
        chunks[i * KVC_PAGE_MAX_CHUNKS + 32 + lane] = cv[2 * i + 1];
    }
  }
  __syncwarp();
  const uint32_t *my = chunks + (valid ? lane : 0) * KVC_PAGE_MAX_CHUNKS;
  const uint32_t nbytes = head.x, kind = head.y & 0xffu, nchunks = (head.y >> 8) & 0xffu;
  const uint32_t codec = (head.y >> 16) & 0xffu;
  /* A packed page starts fo bytes into its chunk[0] (allocator/kvc_pool_layout.h): its offsets
   * below are from there, so that page_addr and the copies need nothing else. */
  const uint32_t fo = (head.y >> 24) * (p.chunk_bytes >> 8);
  const uint32_t RB = 2 * HD;
  const int need = valid ? min(bt, len - j * bt) : 0;
  page_meta pm;
  pm.cls = valid ? PG_BAD : PG_NONE;
  pm.n_tokens = 0;
  pm.k_off = pm.k_bytes = pm.v_off = pm.v_bytes = 0;
  pm.nchunks = (uint8_t)nchunks;
  pm.runs = runs;
  const bool sized = nchunks >= 1 && nchunks <= KVC_PAGE_MAX_CHUNKS &&
                     (uint64_t)fo + nbytes <= (uint64_t)nchunks * p.chunk_bytes;
  if (valid && sized && kind == KVC_PAGE_STAGING && fo == 0) {
    if ((uint64_t)nbytes >= 2ull * H * bt * RB) {
      pm.cls = PG_STAGING;
      pm.n_tokens = (uint16_t)bt;
      pm.k_off = kvc_staging_row_offset(0, kh, 0, H, bt, (int)RB);
      pm.v_off = kvc_staging_row_offset(1, kh, 0, H, bt, (int)RB);
      pm.k_bytes = pm.v_bytes = (uint32_t)bt * RB;
    }
  } else if (valid && sized && kind == KVC_PAGE_COMPRESSED && nbytes >= KVC_PAGE_HEADER_BYTES) {
    if (SL::raw_from_shape && codec == KVC_CODEC_RAW && nbytes == raw_page_bytes<HD>(p)) {
      /* The header and this head's table words (as below), loaded into `later` and left in
       * flight: raw_check_ok reads them with the next batch (a copy into other registers here
       * would wait for them). */
      auto word = [&](uint32_t o) { return __ldg((const uint32_t *)page_addr(p, my, fo + o)); };
      const uint32_t tk = KVC_PAGE_HEADER_BYTES + 4u * kh, tv = tk + 4u * H;
      later.h = __ldg((const uint4 *)page_addr(p, my, fo));
      later.total = word(24);
      later.w[0] = kh > 0 ? word(tk - 4) : 0u;
      later.w[1] = word(tk);
      later.w[2] = word(tv - 4);
      later.w[3] = word(tv);
      later.pending = true;
      const uint32_t S = (uint32_t)bt * RB;
      pm.cls = PG_RAW;
      pm.n_tokens = (uint16_t)bt;
      pm.k_off = fo + raw_page_start(p) + (uint32_t)kh * S;
      pm.v_off = pm.k_off + (uint32_t)H * S;
      pm.k_bytes = pm.v_bytes = S;
    } else {
      /* This head's section-table words: end[kh - 1], end[kh], end[H + kh - 1], end[H + kh]. */
      const uint32_t tk = KVC_PAGE_HEADER_BYTES + 4u * kh, tv = tk + 4u * H;
      uint32_t w[4] = {0, 0, 0, 0};
      const bool table_ok = tv + 4 <= nbytes;
      const uint8_t *hp = page_addr(p, my, fo);
      union {
        uint4 v[2];
        uint8_t b[32];
      } raw;
      raw.v[0] = __ldg((const uint4 *)hp);
      raw.v[1] = __ldg((const uint4 *)page_addr(p, my, fo + 16)); /* may be in the next chunk */
      if (table_ok) {
        if (kh > 0) w[0] = __ldg((const uint32_t *)page_addr(p, my, fo + tk - 4));
        w[1] = __ldg((const uint32_t *)page_addr(p, my, fo + tk));
        w[2] = __ldg((const uint32_t *)page_addr(p, my, fo + tv - 4));
        w[3] = __ldg((const uint32_t *)page_addr(p, my, fo + tv));
      }
      kvc_page_header_t h;
      kvc_page_header_read(raw.b, &h);
      const uint32_t k0 = kh > 0 ? kvc_align16(w[0]) : kvc_page_sections_start((uint32_t)H, codec);
      const uint32_t v0 = kvc_align16(w[2]);
      bool ok = table_ok && h.magic == KVC_PAGE_MAGIC && h.version == KVC_PAGE_VERSION &&
                h.codec == codec && codec <= KVC_CODEC_HUFFMAN && h.num_kv_heads == H &&
                h.head_dim == HD && h.n_tokens >= need && h.n_tokens <= bt &&
                h.total_bytes <= nbytes && k0 <= w[1] && w[1] <= h.total_bytes && v0 <= w[3] &&
                w[3] <= h.total_bytes;
      const uint32_t raw_bytes = (uint32_t)h.n_tokens * RB;
      const uint32_t kb = w[1] - k0, vb = w[3] - v0;
      if (ok && codec == KVC_CODEC_RAW) {
        if (h.dtype == (uint32_t)p.dtype && kb >= raw_bytes && vb >= raw_bytes) pm.cls = PG_RAW;
      } else if (ok) {
        if (kb >= KVC_QSEC_HEADER_BYTES + 4 && vb >= KVC_QSEC_HEADER_BYTES + 4 && kb <= raw_bytes &&
            vb <= raw_bytes && kb % 4 == 0 && vb % 4 == 0)
          pm.cls = codec == KVC_CODEC_BITPACK ? PG_BITPACK : PG_HUFFMAN;
      }
      if (pm.cls != PG_BAD) {
        pm.n_tokens = h.n_tokens;
        pm.k_off = fo + k0;
        pm.v_off = fo + v0;
        pm.k_bytes = kb;
        pm.v_bytes = vb;
      }
    }
  }
  pm.end = 0;
  if constexpr (UT > kUnitTokens) {
    /* Units of whole pages (block_tokens < UT; batches start at a unit's first page): the page's
     * entry in its unit's descriptor, and its ring bytes up to here (a scan over the unit's
     * pages, poisoned by a bad page), so that a unit costs the producer no per-page work. */
    const int bt_lg = 31 - __clz(bt), ppu = UT >> bt_lg, q = lane & (ppu - 1);
    const bool rows = pm.cls == PG_STAGING || pm.cls == PG_RAW;
    const int nrows = valid ? min(bt, len - j * bt) : 0;
    const uint32_t kb = rows ? (uint32_t)nrows * RB : pm.k_bytes;
    const uint32_t vb = rows ? (uint32_t)nrows * RB : pm.v_bytes;
    const uint32_t lk = kvc_attn_ring_lead(rows, pm.k_off);
    const uint32_t lv = kvc_attn_ring_lead(rows, pm.v_off);
    const uint32_t szk = kvc_attn_ring_slot(rows, kb, lk, SL::slack);
    const uint32_t szv = kvc_attn_ring_slot(rows, vb, lv, SL::slack);
    const uint32_t sz = pm.cls == PG_BAD || pm.cls == PG_NONE ? kBadUnit : szk + szv;
    uint32_t end = sz;
    for (int o = 1; o < ppu; o <<= 1) {
      const uint32_t x = __shfl_up_sync(0xffffffffu, end, o);
      if (q >= o) end += x;
    }
    pm.end = end;
    unit_page e;
    e.k_ring = end - sz + lk;
    e.v_ring = end - sz + szk + lv;
    e.k_bytes = kb;
    e.v_bytes = vb;
    e.n_tokens = pm.n_tokens;
    e.ptok0 = 0;
    e.row0 = (int16_t)(q * bt);
    e.nrows = (int16_t)nrows;
    e.cls = pm.cls;
    e.pad[0] = e.pad[1] = e.pad[2] = 0;
    if (lane < NP) ents[lane] = e;
  }
  if (lane < NP) meta[lane] = pm;
  __syncwarp();
}

/* One thread: copies page bytes [src_off, src_off + align16(bytes)) to shared address dst with
 * bulk copies that complete on mbarrier `bar`, one per chunk, or with RUNS (produce) one per
 * run of chunks (`runs`: page_meta::runs); returns the bytes, for the barrier's expected
 * transaction count. */
template <bool RUNS>
__device__ __forceinline__ uint32_t copy_bulk(const params &p, const uint32_t *chunks,
                                              uint64_t runs, uint32_t nchunks_dbg,
                                              uint32_t src_off, uint32_t bytes, uint32_t dst,
                                              uint32_t bar) {
  const uint32_t total = (bytes + 15) & ~15u, mask = p.chunk_bytes - 1;
  for (uint32_t done = 0; done < total;) {
    const uint32_t o = src_off + done;
    if constexpr (RUNS) {
      const uint32_t c = o >> p.chunk_shift;
      /* The run [c, e] ends at the clear bit of `runs` at or after c (bit 63 is clear). */
      const uint32_t e = c + (uint32_t)__ffsll((long long)~(runs >> c)) - 1;
      const uint32_t n = min(total - done, ((e + 1) << p.chunk_shift) - o);
      if (kDebug && ((o + n - 1) >> p.chunk_shift) >= nchunks_dbg) __trap(); /* its last chunk */
      bulk_copy(dst + done, p.pool + ((uint64_t)chunks[c] << p.chunk_shift) + (o & mask), n, bar);
      done += n;
    } else {
      if (kDebug && (o >> p.chunk_shift) >= nchunks_dbg) __trap();
      const uint32_t n = min(total - done, p.chunk_bytes - (o & mask));
      bulk_copy(dst + done, page_addr(p, chunks, o), n, bar);
      done += n;
    }
  }
  return total;
}

/* SL: the kernel's shared-memory layout (ring, desc_off, meta_off, chunks_off, ents_off (units
 * of whole pages only), bar_off, tile, slots (the units in flight at most, <= 32), batch (pages
 * of a metadata batch, <= 32: one lane each), slack (bytes the ring keeps unwritten after each
 * compressed section) and unit_tokens (64, or 128 for v3's instance over units of whole pages:
 * then block_tokens is 32 or 64, so a unit holds at most kMaxUnitPages pages)). RUNS: the
 * batches build page_meta::runs and the copies follow them (produce's choice). */
template <int HD, class SL, bool RUNS>
__device__ bool producer(const params &p, uint8_t *smem, int seq, int kh, int len, int u_begin,
                         int u_end) {
  constexpr int kSlots = SL::slots;
  static_assert(kSlots <= 32, "one lane per slot holds its ring offset");
  const int lane = threadIdx.x & 31, bt = p.block_tokens;
  const int bt_lg = 31 - __clz(bt); /* block_tokens is a power of two (kvc_attn_cuda checks) */
  const int nblocks = (len + bt - 1) >> bt_lg, bi0 = p.block_indptr[seq];
  const uint32_t ring = smem_u32(smem), bars = smem_u32(smem + SL::bar_off);
  unit_desc *descs = (unit_desc *)(smem + SL::desc_off);
  page_meta *meta = (page_meta *)(smem + SL::meta_off);
  uint32_t *chunks = (uint32_t *)(smem + SL::chunks_off);
  constexpr int UT = SL::unit_tokens;
  unit_page *ents = nullptr; /* units of whole pages: the batch's pages' descriptor entries */
  if constexpr (UT > kUnitTokens) ents = (unit_page *)(smem + SL::ents_off);
  const uint32_t RB = 2 * HD;
  constexpr int NP = SL::batch;
  static_assert(NP <= 32, "one lane per page of the metadata batch");
  int batch = -1 - NP; /* first page of the loaded batch */
  raw_check later = {};
  bool bad_header = false; /* a page of an earlier batch failed raw_check_ok */
  /* Units [rel, k) are live (attention/kvc_attn_ring.h); lane s holds the ring offset of slot
   * s's unit. Slots and barrier phases are counted, not divided out. */
  kvc_attn_ring_t rg = {0, 0, 0};
  int rel = 0, rel_slot = 0; /* units [0, rel) are known to be released */
  uint32_t rel_phase = 0, live_off = 0;
  auto release_oldest = [&](int k) {
    mbar_wait(bars + 8 * (kSlots + rel_slot), rel_phase);
    rel++;
    if (++rel_slot == kSlots) {
      rel_slot = 0;
      rel_phase ^= 1u;
    }
    if (rel < k) kvc_attn_ring_advance(&rg, __shfl_sync(0xffffffffu, live_off, rel_slot));
  };

  for (int k = 0, slot = 0; u_begin + k < u_end; k++, slot = slot + 1 == kSlots ? 0 : slot + 1) {
    const int u = u_begin + k;
    const int t0 = u * UT, n_valid = min(UT, len - t0);
    while (rel <= k - kSlots) release_oldest(k);
    const int jf = t0 >> bt_lg;
    const int npg = bt >= UT ? 1 : min(UT >> bt_lg, nblocks - jf);
    if (jf + npg > batch + NP) {
      batch = jf;
      if constexpr (SL::raw_from_shape) bad_header |= !raw_check_ok<HD>(p, later, kh);
      load_batch<HD, SL, RUNS>(p, batch, nblocks, bi0, kh, len, meta, chunks, ents, later);
    }
    /* Lane s < 2 npg takes section s of the unit: page s / 2, its K (even s) or V (odd s), so
     * that the unit's copies and page entries take one pass of the warp rather than one per page
     * (the producer's serial time per unit bounds every kernel's unit rate). */
    const int q = min(lane >> 1, npg - 1);
    const bool v = lane & 1, mine = lane < 2 * npg;
    const page_meta pm = meta[jf + q - batch];
    uint32_t sec_ring, sec_bytes, need, rofs = 0;
    int nrows = 0, ptok0 = 0;
    bool bad;
    if constexpr (UT > kUnitTokens) {
      /* Units of whole pages: the sections' ring offsets and the unit's bytes come with the
       * batch (load_batch), so a unit costs no scan. */
      const unit_page &e = ents[jf + q - batch];
      sec_ring = v ? e.v_ring : e.k_ring;
      sec_bytes = v ? e.v_bytes : e.k_bytes;
      need = meta[jf + npg - 1 - batch].end;
      bad = need > (uint32_t)SL::ring;
    } else {
      const bool rows = pm.cls == PG_STAGING || pm.cls == PG_RAW;
      nrows = bt >= UT ? n_valid : min(bt, len - (jf + q) * bt);
      ptok0 = bt >= UT ? t0 - jf * bt : 0;
      rofs = rows ? (uint32_t)ptok0 * RB : 0;
      sec_bytes = rows ? (uint32_t)nrows * RB : v ? pm.v_bytes : pm.k_bytes;
      const uint32_t lead = kvc_attn_ring_lead(rows, (v ? pm.v_off : pm.k_off) + rofs);
      const uint32_t sz = mine ? kvc_attn_ring_slot(rows, sec_bytes, lead, SL::slack) : 0u;
      /* The sections in lane order: ring offsets by an inclusive scan of their sizes. */
      uint32_t end = sz;
#pragma unroll
      for (int o = 1; o < 2 * kMaxUnitPages; o <<= 1) {
        const uint32_t x = __shfl_up_sync(0xffffffffu, end, o);
        if (lane >= o) end += x;
      }
      sec_ring = end - sz + lead;
      need = __shfl_sync(0xffffffffu, end, 2 * kMaxUnitPages - 1);
      bad = __any_sync(0xffffffffu, mine && (pm.cls == PG_BAD || pm.cls == PG_NONE)) ||
            need > (uint32_t)SL::ring;
    }
    int32_t flags = 0;
    if (bad) {
      flags = UNIT_BAD;
      need = 0;
    }
    /* Ring space: wait for the oldest units until the unit fits. */
    uint32_t off;
    while (!kvc_attn_ring_place(&rg, (uint32_t)SL::ring, need, rel < k, &off)) release_oldest(k);
    if (lane == slot) live_off = off;
    /* Each section's copies; its lane adds their bytes to the phase's transaction count before
     * it arrives. */
    if (mine && flags == 0) {
      const uint32_t *pc = chunks + (jf + q - batch) * KVC_PAGE_MAX_CHUNKS;
      const uint32_t src = (v ? pm.v_off : pm.k_off) + rofs;
      mbar_expect_tx(bars + 8 * slot,
                     copy_bulk<RUNS>(p, pc, pm.runs, pm.nchunks, src, sec_bytes,
                                                 ring + off + sec_ring, bars + 8 * slot));
    }
    unit_desc &d = descs[slot];
    if constexpr (UT > kUnitTokens) {
      /* The descriptor: lane 0 the unit's fields, lanes < 7 npg the words of the page entries. */
      static_assert(sizeof(unit_page) == 28 && offsetof(unit_desc, pages) == 16 &&
                        offsetof(unit_desc, n_valid) == 8 && offsetof(unit_desc, npages) == 10,
                    "the descriptor's words");
      if (lane == 0)
        *(uint4 *)&d = make_uint4(off, (uint32_t)flags,
                                  (uint32_t)(uint16_t)n_valid | (uint32_t)npg << 16, 0u);
      if (lane < 7 * npg)
        ((uint32_t *)d.pages)[lane] = ((const uint32_t *)(ents + jf - batch))[lane];
    } else {
      /* The descriptor: lane 0 the unit's fields, the K lane of each page its entry. */
      const uint32_t v_ring = __shfl_down_sync(0xffffffffu, sec_ring, 1);
      const uint32_t v_bytes = __shfl_down_sync(0xffffffffu, sec_bytes, 1);
      if (lane == 0) {
        d.ring_off = off;
        d.flags = flags;
        d.n_valid = (int16_t)n_valid;
        d.npages = (int16_t)npg;
      }
      if (mine && !v) {
        unit_page &x = d.pages[q];
        x.cls = pm.cls;
        x.n_tokens = pm.n_tokens;
        x.ptok0 = (int16_t)ptok0;
        x.row0 = (int16_t)(bt >= UT ? 0 : q * bt);
        x.nrows = (int16_t)nrows;
        x.k_bytes = sec_bytes;
        x.v_bytes = v_bytes;
        x.k_ring = sec_ring;
        x.v_ring = v_ring;
      }
    }
    /* Every lane arrives (each arrive releases the lane's writes to the descriptor); the copies
     * complete the phase by their byte count. */
    mbar_arrive(bars + 8 * slot);
  }
  if constexpr (!SL::raw_from_shape) return false;
  return __any_sync(0xffffffffu, bad_header || !raw_check_ok<HD>(p, later, kh));
}

/* The producer warp's loop, in the form for the launch's pool: the runs of chunks where its
 * layout builds them (ids per lane) and its chunks are below kRunChunkBytes. Two copies of the
 * loop rather than a test per copy: looking for runs cost bit-pack 1.0-1.6% over large chunks
 * (bench/NOTES-capacity.md, session 51) although those never take them. Returns whether a page
 * failed its later header check (raw_check, SL::raw_from_shape only): the CTA's outputs must
 * then be NaN. */
template <int HD, class SL>
__device__ bool produce(const params &p, uint8_t *smem, int seq, int kh, int len, int u_begin,
                        int u_end) {
  if constexpr (SL::ids_per_lane)
    if (p.chunk_bytes < kRunChunkBytes)
      return producer<HD, SL, true>(p, smem, seq, kh, len, u_begin, u_end);
  return producer<HD, SL, false>(p, smem, seq, kh, len, u_begin, u_end);
}

/* ---- consumers ------------------------------------------------------------------------------- */

/*
 * One warp's share of a unit: tokens [tb, tb + NT) of the tiles at kt, vt (shared addresses)
 * against the 16 query entries of the warp's Q tile at qt. Rows g and g + 8 of the M tile sit at
 * positions pos0 and pos1 (causal limits; pos_warp is the largest over the warp); tokens past
 * n_valid are masked. WG: the four warps of each warpgroup call it together, each with its own 16
 * entries and all 64 tokens, and S and P V run on wgmma (64 entries per instruction, so K and V
 * are read from shared memory once per warpgroup instead of once per warp); qt is then the
 * warpgroup's 64 entries (load_q_tile's KV layout), which S reads by descriptor. Else mma.sync.
 * PIPE (wgmma only): P V is left in flight; the caller runs wgmma_wait before o is read or the V
 * tile is written again.
 */
template <int HD, class T, int NT, bool WG, bool PIPE>
__device__ __forceinline__ void attend(uint32_t kt, uint32_t vt, uint32_t qt, int tb, int n_valid,
                                       int token0, int pos0, int pos1, int pos_warp,
                                       float scale_log2, float (&o)[HD / 8][4], float (&m)[2],
                                       float (&l)[2]) {
  static_assert(!WG || (NT == 64 && HD <= 128), "wgmma: a warpgroup takes whole units");
  const int lane = threadIdx.x & 31, c = lane & 3, mi = lane >> 3, ri = lane & 7;
  /* Warp-uniform: nothing of this slice is visible to any of the warp's rows. (Not with wgmma,
   * whose instructions the whole warpgroup issues.) */
  if (!WG && (tb >= n_valid || token0 + tb > pos_warp)) return;
  float s[NT / 8][4];
#pragma unroll
  for (int j = 0; j < NT / 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
  if constexpr (WG) {
    wgmma_fence();
    /* Q (the warpgroup's 64 entries) as the K-major A operand and K as the K-major B operand:
     * channels 16 kk.. (both in kv_tile_off's layout). */
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++)
      wgmma_ss64<T>(s, wgmma_desc(qt + kv_tile_off<HD>(0, 2 * kk), 16, 1024),
                    wgmma_desc(kt + kv_tile_off<HD>(0, 2 * kk), 16, 1024));
    wgmma_commit();
    wgmma_wait();
  } else {
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
      uint32_t a[4];
      ldsm_x4(a, qt + tile_off<HD>(ri + ((mi & 1) << 3), 2 * kk + (mi >> 1)));
#pragma unroll
      for (int jj = 0; jj < NT / 16; jj++) {
        uint32_t b[4];
        ldsm_x4(b, kt + kv_tile_off<HD>(tb + 16 * jj + ri + ((mi >> 1) << 3), 2 * kk + (mi & 1)));
        mma16816<T>(s[2 * jj], a, b[0], b[1]);
        mma16816<T>(s[2 * jj + 1], a, b[2], b[3]);
      }
    }
  }
  float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
  for (int j = 0; j < NT / 8; j++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      const int tr = tb + 8 * j + 2 * c + (e & 1);
      const bool visible = tr < n_valid && token0 + tr <= (e < 2 ? pos0 : pos1);
      s[j][e] = visible ? s[j][e] * scale_log2 : -INFINITY;
      if (e < 2) mx0 = fmaxf(mx0, s[j][e]);
      else mx1 = fmaxf(mx1, s[j][e]);
    }
#pragma unroll
  for (int o2 = 1; o2 <= 2; o2 <<= 1) {
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o2));
  }
  const float mn0 = fmaxf(m[0], mx0), mn1 = fmaxf(m[1], mx1);
  /* A row with nothing visible yet keeps max -inf; subtract 0 instead so that exp2 gives 0. */
  const float mu0 = mn0 == -INFINITY ? 0.f : mn0, mu1 = mn1 == -INFINITY ? 0.f : mn1;
  const float c0 = exp2f(m[0] - mu0), c1 = exp2f(m[1] - mu1);
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
  uint32_t pa[NT / 16][4];
#pragma unroll
  for (int jj = 0; jj < NT / 16; jj++) {
    float pv[2][4];
#pragma unroll
    for (int h = 0; h < 2; h++) {
      pv[h][0] = exp2f(s[2 * jj + h][0] - mu0);
      pv[h][1] = exp2f(s[2 * jj + h][1] - mu0);
      pv[h][2] = exp2f(s[2 * jj + h][2] - mu1);
      pv[h][3] = exp2f(s[2 * jj + h][3] - mu1);
      l[0] += pv[h][0] + pv[h][1];
      l[1] += pv[h][2] + pv[h][3];
    }
    pa[jj][0] = pack2<T>(pv[0][0], pv[0][1]);
    pa[jj][1] = pack2<T>(pv[0][2], pv[0][3]);
    pa[jj][2] = pack2<T>(pv[1][0], pv[1][1]);
    pa[jj][3] = pack2<T>(pv[1][2], pv[1][3]);
  }
  if constexpr (WG) {
    /* V as the N-major B operand: tokens 16 jj.., all channels. */
    wgmma_fence();
#pragma unroll
    for (int jj = 0; jj < NT / 16; jj++)
      wgmma_rs<HD, 1, T>(o, pa[jj], wgmma_desc(vt + kv_tile_off<HD>(16 * jj, 0), 64 * 128, 1024));
    wgmma_commit();
    if (!PIPE) wgmma_wait();
  } else {
#pragma unroll
    for (int jj = 0; jj < NT / 16; jj++)
#pragma unroll
      for (int dn = 0; dn < HD / 16; dn++) {
        uint32_t b[4];
        ldsm_x4_trans(b, vt + kv_tile_off<HD>(tb + 16 * jj + ri + ((mi & 1) << 3),
                                              2 * dn + (mi >> 1)));
        mma16816<T>(o[2 * dn], pa[jj], b[0], b[1]);
        mma16816<T>(o[2 * dn + 1], pa[jj], b[2], b[3]);
      }
  }
}

template <class T> __device__ __forceinline__ uint4 pack8(const float (&x)[8]) {
  return make_uint4(pack2<T>(x[0], x[1]), pack2<T>(x[2], x[3]), pack2<T>(x[4], x[5]),
                    pack2<T>(x[6], x[7]));
}

/* Row `r` of the launch as a row of q and out (params::row_map). */
__device__ __forceinline__ int q_row(const params &p, int r) {
  return p.row_map ? p.row_map[r] : r;
}

/* The CTA's Q tile (rows entries e0 .. e0 + rows - 1) at `tile`: entry e is query row
 * q0 + e / group, head kh * group + e % group; zeros past the sequence's entries. Swizzled rows
 * (tile_off), or KV: blocks of 64 rows laid out as K/V tiles (kv_tile_off), wgmma's A operand.
 * Threads tid of nthreads share the copy; the caller syncs. */
template <int HD, class T, bool KV>
__device__ __forceinline__ void load_q_tile(const params &p, uint8_t *tile, int rows, int q0,
                                            int kh, int e0, int entries, int tid, int nthreads) {
  const int group = p.group;
  for (int i = tid; i < rows * (HD / 8); i += nthreads) {
    const int r = i / (HD / 8), c8 = i % (HD / 8), e = e0 + r;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (e < entries) {
      const T *src =
          (const T *)p.q +
          ((size_t)q_row(p, q0 + e / group) * p.num_q_heads + kh * group + e % group) * HD;
      v = __ldg((const uint4 *)(src + 8 * c8));
    }
    *(uint4 *)(tile + (KV ? (r >> 6) * (kUnitTokens * 2 * HD) + kv_tile_off<HD>(r & 63, c8)
                          : tile_off<HD>(r, c8))) = v;
  }
}

/* Epilogue, per consumer warp: l summed over the four lanes that share a row, then the (m, l) of
 * the warp's rows g and g + 8 stored at mbuf / lbuf[warp * 16 + row]. */
__device__ __forceinline__ void stash_row_stats(const float (&m)[2], float (&l)[2], float *mbuf,
                                                float *lbuf, int warp, int lane) {
#pragma unroll
  for (int o2 = 1; o2 <= 2; o2 <<= 1) {
    l[0] += __shfl_xor_sync(0xffffffffu, l[0], o2);
    l[1] += __shfl_xor_sync(0xffffffffu, l[1], o2);
  }
  const int g = lane >> 2;
  if ((lane & 3) == 0) {
    mbuf[warp * 16 + g] = m[0];
    mbuf[warp * 16 + g + 8] = m[1];
    lbuf[warp * 16 + g] = l[0];
    lbuf[warp * 16 + g + 8] = l[1];
  }
}

/* Epilogue: merges NW warps' partials of one query entry, stashed at mbuf / lbuf index base +
 * 16 w (w < NW) and, for output values 8 * c8 .. 8 * c8 + 7, in the float4s at(base + 16 w, 2 c8)
 * and at(base + 16 w, 2 c8 + 1) (at(i, G): values 4 G .. 4 G + 3 of stash entry i, in the
 * caller's layout): acc relative to the joint max *mu (0 when every row was -inf), *lsum the joint
 * sum. */
template <int NW, class At>
__device__ __forceinline__ void merge_entry(At at, const float *mbuf, const float *lbuf, int base,
                                            int c8, float (&acc)[8], float *lsum, float *mu) {
  float mx = -INFINITY;
#pragma unroll
  for (int w = 0; w < NW; w++) mx = fmaxf(mx, mbuf[base + 16 * w]);
  *mu = mx == -INFINITY ? 0.f : mx;
  *lsum = 0.f;
#pragma unroll
  for (int j = 0; j < 8; j++) acc[j] = 0.f;
#pragma unroll
  for (int w = 0; w < NW; w++) {
    const int wi = base + 16 * w;
    const float f = exp2f(mbuf[wi] - *mu);
    *lsum += lbuf[wi] * f;
    const float4 x0 = at(wi, 2 * c8), x1 = at(wi, 2 * c8 + 1);
    acc[0] += x0.x * f, acc[1] += x0.y * f, acc[2] += x0.z * f, acc[3] += x0.w * f;
    acc[4] += x1.x * f, acc[5] += x1.y * f, acc[6] += x1.z * f, acc[7] += x1.w * f;
  }
}

/*
 * Writes output values 8 * c8 .. 8 * c8 + 7 of query entry (launch row r, head qh) once a CTA has
 * merged its warps: acc (unnormalised, relative to the running max mu) over lsum, to `out` with
 * one split, else to the workspace with the entry's log2-sum-exp; NaN when the CTA met a bad page.
 */
template <int HD, class T>
__device__ __forceinline__ void write_entry(const params &p, float (&acc)[8], float lsum, float mu,
                                            bool cta_bad, int r, int qh, int split, int c8) {
  const int hq = p.num_q_heads, row = q_row(p, r);
  const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
#pragma unroll
  for (int j = 0; j < 8; j++) acc[j] = cta_bad ? __int_as_float(0x7fc00000) : acc[j] * inv;
  if (!p.ws_lse) {
    *(uint4 *)((T *)p.out + ((size_t)row * hq + qh) * HD + 8 * c8) = pack8<T>(acc);
  } else {
    const size_t pe = ((size_t)split * p.total_q_rows + row) * hq + qh;
    float4 *dst = (float4 *)(p.ws_o + pe * HD + 8 * c8);
    dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    if (c8 == 0) p.ws_lse[pe] = cta_bad ? 0.f : lsum > 0.f ? mu + log2f(lsum) : -INFINITY;
  }
}

/* CTAs per SM the instance is sized for (shared memory, see ring_bytes). */
template <int HD, int WM> constexpr int min_ctas_per_sm() { return HD <= 128 && WM <= 2 ? 2 : 1; }

template <int HD, class T, int WM>
__global__ void __launch_bounds__(threads_of<WM>(), (min_ctas_per_sm<HD, WM>()))
    attn_kernel(const params p) {
  typedef smem_layout<HD, WM> SL;
  constexpr int kConsumerWarps = consumer_warps<WM>(), kConsumers = 32 * kConsumerWarps;
  constexpr int kThreads = threads_of<WM>(), kParts = decode_parts<WM>();
  constexpr int WN = kConsumerWarps / WM, NT = kUnitTokens / WN;
  /* S and P V on wgmma: every warpgroup of consumers owns 64 entries and all of a unit's tokens. */
  constexpr bool WG = kHaveWgmma && WN == 1 && kConsumerWarps % 4 == 0 && HD <= 128;
  /* P V of unit k runs under the decode of unit k + 1 (two K/V tiles keep its V tile intact). */
  constexpr bool PIPE = WG && SL::dtiles == 2;
  extern __shared__ __align__(1024) uint8_t smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const cta_place cta = cta_of(p);
  const int seq = cta.seq, kh = cta.kh, qt = cta.qt, split = cta.split;
  const int q0 = p.qo_indptr[seq], nq = p.qo_indptr[seq + 1] - q0, len = p.kv_len[seq];
  const int group = p.group, entries = nq * group, e0 = qt * 16 * WM;
  if (e0 >= entries) return; /* the whole CTA: a query tile past this sequence's rows */
  const int pos_max = len - nq + p.pos_shift + (min(entries, e0 + 16 * WM) - 1) / group;
  const int units = (min(len, pos_max + 1) + kUnitTokens - 1) / kUnitTokens;
  int u_begin, u_end;
  split_range(p, cta, units, &u_begin, &u_end);
  const uint32_t bars = smem_u32(smem + SL::bar_off);
  const uint32_t qtile = smem_u32(smem + SL::qtile_off);

  if (tid == 0) {
    for (int i = 0; i < kSlots; i++) {
      mbar_init(bars + 8 * i, 32);                          /* full: every producer lane */
      mbar_init(bars + 8 * (kSlots + i), kConsumers);       /* empty: every consumer thread */
    }
  }
  load_q_tile<HD, T, WG>(p, smem + SL::qtile_off, 16 * WM, q0, kh, e0, entries, tid, kThreads);
  if (WG) fence_proxy_async(); /* wgmma reads the Q tile */
  __syncthreads();

  float o[HD / 8][4];
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  bool bad = false;
  if (warp == kConsumerWarps) {
    produce<HD, SL>(p, smem, seq, kh, len, u_begin, u_end); /* v2's layouts: never bad */
  } else {
#pragma unroll
    for (int n = 0; n < HD / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    const int mt = warp / WN, tb = (warp % WN) * NT, g = lane >> 2;
    const int er0 = e0 + mt * 16 + g, er1 = er0 + 8;
    /* Entries past the rows attend like the last row; their output is never written. */
    const int pos0 = len - nq + p.pos_shift + (er0 < entries ? er0 / group : nq - 1);
    const int pos1 = len - nq + p.pos_shift + (er1 < entries ? er1 / group : nq - 1);
    const int pos_warp = __reduce_max_sync(0xffffffffu, max(pos0, pos1));
    const uint32_t qw = qtile + (WG ? (warp >> 2) * 64 : mt * 16) * SL::RB;
    const unit_desc *descs = (const unit_desc *)(smem + SL::desc_off);
    uint8_t *dtile = smem + SL::dtile_off;
    /* Pair pr decodes tensor pr & 1 (K, V) of each section, part pr >> 1 of kParts. */
    const int pr = warp >> 1, pt = tid & 63, tensor = pr & 1, part = pr >> 1;
    const scratch sc = make_scratch<HD>(smem + SL::scratch_off + pr * SL::scratch_bytes);
    for (int k = 0; u_begin + k < u_end; k++) {
      const int slot = k % kSlots, token0 = (u_begin + k) * kUnitTokens;
      mbar_wait(bars + 8 * slot, (uint32_t)(k / kSlots) & 1u);
      const unit_desc *d = &descs[slot];
      const int32_t flags = d->flags;
      const int n_valid = d->n_valid;
      const uint32_t uo = d->ring_off;
      if (flags & UNIT_BAD) {
        bad = true;
        mbar_arrive(bars + 8 * (kSlots + slot));
        /* The next unit's decode goes to the tile the previous unit's attend may still read. */
        if (PIPE) wgmma_wait();
        if (SL::dtiles == 2) consumers_sync<kConsumers>();
        continue;
      }
      /* Every warp is done with the tile this unit goes to: the previous unit's (one tile), or
       * the one before it (two tiles: every warp attended it before the last unit's barrier). */
      if (SL::dtiles == 1) consumers_sync<kConsumers>();
      uint8_t *const utile = dtile + (SL::dtiles == 2 ? (k & 1) * 2 * SL::tile : 0);
      uint8_t *tile = utile + tensor * SL::tile;
      bool ok = true;
      for (int q = 0; q < d->npages; q++) {
        const unit_page pg = d->pages[q];
        const uint8_t *src = smem + uo + (tensor ? pg.v_ring : pg.k_ring);
        if (pg.cls == PG_STAGING || pg.cls == PG_RAW) {
          const int ra = pg.nrows * part / kParts, rb = pg.nrows * (part + 1) / kParts;
          copy_rows<HD>(src + ra * SL::RB, rb - ra, pg.row0 + ra, tile, pt);
        } else {
          ok &= decode_quant<HD, T, kParts>(
              src, tensor ? pg.v_bytes : pg.k_bytes,
              pg.cls == PG_BITPACK ? KVC_CODEC_BITPACK : KVC_CODEC_HUFFMAN, tensor, pg.n_tokens,
              pg.ptok0, pg.nrows, pg.row0, tile, sc, pt, 2 + pr, part);
        }
      }
      if (part == 0) zero_rows<HD>(n_valid, tile, pt);
      if (WG) fence_proxy_async();
      mbar_arrive(bars + 8 * (kSlots + slot)); /* this thread is done with the ring bytes */
      /* The previous unit's P V is done: O is whole, and its V tile, which the unit after this
       * one is decoded into, is no longer read. */
      if (PIPE) wgmma_wait();
      if (consumers_any<kConsumers>(!ok)) {
        bad = true;
        continue;
      }
      const uint32_t kt = smem_u32(utile);
      attend<HD, T, NT, WG, PIPE>(kt, kt + SL::tile, qw, tb, n_valid, token0, pos0, pos1, pos_warp,
                            p.scale_log2, o, m, l);
    }
    /* The last unit's P V (a warpgroup instruction, which the producer warp, alone in its
     * warpgroup, must not run). */
    if (PIPE) wgmma_wait();
  }

  /* Epilogue: the consumer warps' (m, l, O) through the ring, combined per query entry. */
  const bool cta_bad = __syncthreads_or(bad);
  float *obuf = (float *)smem; /* [consumer warps][16][HD] */
  float *mbuf = obuf + kConsumerWarps * 16 * HD, *lbuf = mbuf + kConsumerWarps * 16;
  if (warp < kConsumerWarps) {
    const int g = lane >> 2, c = lane & 3;
    stash_row_stats(m, l, mbuf, lbuf, warp, lane);
    float *ow = obuf + warp * 16 * HD;
#pragma unroll
    for (int n = 0; n < HD / 8; n++) {
      *(float2 *)(ow + g * HD + n * 8 + 2 * c) = make_float2(o[n][0], o[n][1]);
      *(float2 *)(ow + (g + 8) * HD + n * 8 + 2 * c) = make_float2(o[n][2], o[n][3]);
    }
  }
  __syncthreads();
  /* The merge runs on the consumer warps only: compute-sanitizer's racecheck does not follow the
   * named barriers the producer warp stays out of, and would flag its reads here as races. */
  if (warp == kConsumerWarps) return;
  for (int i = tid; i < 16 * WM * (HD / 8); i += kConsumers) {
    const int r = i / (HD / 8), c8 = i % (HD / 8), e = e0 + r;
    if (e >= entries) continue;
    float acc[8], lsum, mu;
    merge_entry<WN>([&](int wi, int G) { return ((const float4 *)(obuf + (size_t)wi * HD))[G]; },
                    mbuf, lbuf, (r / 16) * WN * 16 + r % 16, c8, acc, &lsum, &mu);
    write_entry<HD, T>(p, acc, lsum, mu, cta_bad, q0 + e / group, kh * group + e % group, split,
                       c8);
  }
}

}  // namespace kvc_attn

#include "attention/kvc_attn_v3.cuh"

namespace kvc_attn {

/* Log-sum-exp combination of the splits. Launched as a programmatic dependent of the attention
 * kernel: its CTAs start as the attention CTAs retire and wait here until that grid has completed
 * and its partial results are visible. The kernel reads a few hundred KB and is bound by load
 * latency, so lanes hold the splits' weights (split s in lane s % 32) and each lane has eight
 * splits' partials in flight at once. 2^WLG warps take a (query row, query head), eight splits
 * each, and the first sums them through shared memory (combine_warps_lg picks WLG by the splits).
 * Session 35's timeline: with one warp per pair walking its splits eight at a time, the combine of
 * bit-pack (1, 32k)'s 32 splits took ~4.4 us of the launch's ~28.5. */
template <int HD, class T, int WLG>
__global__ void __launch_bounds__(256) combine_kernel(const params p) {
  static_assert(kMaxSplits <= 64 && WLG <= 3, "two splits' weights per lane; 8 warps of 8 splits");
  constexpr int CH = HD / 32; /* channels per lane: VW * lane + 32 * VW * i + j */
  constexpr int NV = (CH + 3) / 4, VW = CH < 4 ? CH : 4;
  /* The warps' weighted sums (none with one warp per pair). */
  __shared__ float sums[WLG ? 8 : 1][WLG ? HD : 1];
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  const int hq = p.num_q_heads, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, ns = p.nsplits;
  const long pe = (long)blockIdx.x * (8 >> WLG) + (warp >> WLG);
  const int part = warp & ((1 << WLG) - 1);
  /* Warp-uniform; with several warps per pair every warp reaches the barrier below. */
  const bool live = pe < (long)p.total_q_rows * hq;
  if (!WLG && !live) return;
  const size_t stride = (size_t)p.total_q_rows * hq;
  float acc[NV][VW] = {}, wsum = 0.f;
  if (live) {
    const float l0 = lane < ns ? p.ws_lse[lane * stride + pe] : -INFINITY;
    const float l1 = lane + 32 < ns ? p.ws_lse[(lane + 32) * stride + pe] : -INFINITY;
    float mx = fmaxf(l0, l1);
#pragma unroll
    for (int o2 = 16; o2 >= 1; o2 >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o2));
    const float w0 = exp2f(l0 - mx), w1 = exp2f(l1 - mx);
    wsum = w0 + w1;
#pragma unroll
    for (int o2 = 16; o2 >= 1; o2 >>= 1) wsum += __shfl_xor_sync(0xffffffffu, wsum, o2);
    const float *src = p.ws_o + pe * HD + VW * lane;
    for (int s0 = 8 * part; s0 < ns; s0 += 8 << WLG) {
#pragma unroll
      for (int j = 0; j < 8; j++) {
        const int s = s0 + j;
        const float w = __shfl_sync(0xffffffffu, s < 32 ? w0 : w1, s & 31);
        if (s < ns)
#pragma unroll
          for (int i = 0; i < NV; i++) {
            const float *v = src + s * stride * HD + 32 * VW * i;
            if constexpr (VW == 4) {
              const float4 x = *(const float4 *)v;
              acc[i][0] += w * x.x, acc[i][1] += w * x.y, acc[i][2] += w * x.z;
              acc[i][3] += w * x.w;
            } else {
              const float2 x = *(const float2 *)v;
              acc[i][0] += w * x.x, acc[i][1] += w * x.y;
            }
          }
      }
    }
  }
  if constexpr (WLG > 0) {
#pragma unroll
    for (int i = 0; i < NV; i++)
#pragma unroll
      for (int j = 0; j < VW; j++) sums[warp][VW * lane + 32 * VW * i + j] = acc[i][j];
    __syncthreads();
    if (part != 0 || !live) return;
#pragma unroll
    for (int k = 1; k < 1 << WLG; k++)
#pragma unroll
      for (int i = 0; i < NV; i++)
#pragma unroll
        for (int j = 0; j < VW; j++) acc[i][j] += sums[warp + k][VW * lane + 32 * VW * i + j];
  }
  const float inv = 1.f / wsum;
  T *out = (T *)p.out + (size_t)pe * HD + VW * lane;
#pragma unroll
  for (int i = 0; i < NV; i++)
#pragma unroll
    for (int j = 0; j < VW; j += 2)
      *(uint32_t *)(out + 32 * VW * i + j) = pack2<T>(acc[i][j] * inv, acc[i][j + 1] * inv);
}

/* log2 of the combine's warps per (query row, query head) for ns splits. Measured (session 36,
 * against one warp per pair): bit-pack (1, 8k) -5.0%, (1, 32k) -4.0%, (1, 128k) -2.6%, batches
 * 2-16 unchanged; two warps for 16 splits made (2, 32k) 1% slower, so up to 16 take one. */
constexpr int combine_warps_lg(int ns) { return ns <= 16 ? 0 : ns <= 32 ? 2 : 3; }

/* ---- host ------------------------------------------------------------------------------------ */

/* Splits of each sequence's units: minimises (waves of CTAs) x (units per CTA + a fixed cost). */
int choose_splits(long base_ctas, int units_max, int slots) {
  const long fixed = 2; /* per-CTA cost (Q tile, metadata, epilogue), in units */
  int best = 1;
  long best_cost = -1;
  for (int ns = 1; ns <= kMaxSplits && ns <= units_max; ns++) {
    const int ups = (units_max + ns - 1) / ns, ns_eff = (units_max + ups - 1) / ups;
    if (ns_eff != ns) continue;
    const long ctas = base_ctas * ns;
    if (ns > 1 && ctas > kMaxCtasForSplit) break;
    const long waves = (ctas + slots - 1) / slots;
    const long cost = waves * (ups + fixed);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best = ns;
    }
  }
  return best;
}

/* What the launcher knows before it picks an instance. */
struct launch_shape {
  long base_ctas; /* sequences x kv heads x query tiles */
  long entries_max; /* query entries (rows x GQA group) of the largest sequence */
  int units_max;  /* 64-token units of the longest sequence */
  int max_splits; /* >= 1: the splits whose partials the workspace holds for this launch */
  bool partial;   /* partials even with one split, combined by the caller (a cascade's launches) */
  int qtiles, num_kv_heads, num_seqs;
};

typedef kvc_status_t (*launch_fn)(params &, const launch_shape &, cudaStream_t);

/* Largest block_tokens whose K and V sections of one head (at most the raw size, in their ring
 * slots) fit the ring. */
template <int HD, int WM> constexpr int max_block_tokens() {
  return 2 * (kMaxBlockTokens * 2 * HD + kSlotExtra) <= ring_bytes<HD, WM>() ? kMaxBlockTokens
         : 2 * (64 * 2 * HD + kSlotExtra) <= ring_bytes<HD, WM>()              ? 64
                                                                              : 32;
}

/* Enqueues the combine of p.nsplits partials at p.ws_o / p.ws_lse into `out`, as a programmatic
 * dependent of the launch before it. */
template <int HD, class T> kvc_status_t launch_combine(const params &p, cudaStream_t stream) {
  const long pairs = (long)p.total_q_rows * p.num_q_heads;
  const int wlg = combine_warps_lg(p.nsplits);
  void (*const kernel)(const params) = wlg == 0   ? combine_kernel<HD, T, 0>
                                       : wlg == 2 ? combine_kernel<HD, T, 2>
                                                  : combine_kernel<HD, T, 3>;
  cudaLaunchAttribute pdl;
  pdl.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  pdl.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  const long per_cta = 8 >> wlg; /* pairs */
  cfg.gridDim = dim3((unsigned)((pairs + per_cta - 1) / per_cta));
  cfg.blockDim = dim3(256);
  cfg.stream = stream;
  cfg.attrs = &pdl;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, p) == cudaSuccess ? KVC_OK : KVC_ERR_CUDA;
}

/* Enqueues `kernel` (threads and dynamic shared memory per CTA) over the split-K partition that
 * fits the device's CTA slots and sh.max_splits, then the combine kernel when there are splits
 * (unless sh.partial: then the caller combines). Sets p.nsplits. */
template <int HD, class T>
kvc_status_t launch_with(void (*kernel)(const params), int threads, int smem, params &p,
                         const launch_shape &sh, cudaStream_t stream) {
  int dev = 0, sms = 0, per_sm = 0;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) !=
          cudaSuccess ||
      cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem) != cudaSuccess)
    return KVC_ERR_CUDA;
  if (per_sm < 1) return KVC_ERR_UNSUPPORTED;
  if (p.huf_pass != 2) { /* pass 2 takes pass 1's grid and ranges as p holds them */
    int ns = choose_splits(sh.base_ctas, sh.units_max, sms * per_sm);
    if (ns > sh.max_splits) ns = sh.max_splits;
    const int ups = (sh.units_max + ns - 1) / ns;
    ns = (sh.units_max + ups - 1) / ups;
    if (sh.base_ctas * ns > 0x7fffffffL) return KVC_ERR_UNSUPPORTED;
    p.nsplits = ns;
    p.units_per_split = ups;
    p.num_seqs = sh.num_seqs;
    p.units_max = sh.units_max;
    /* One wave of two CTAs per SM, some SMs holding two: the splits that enter first take more
     * units (split_range). */
    const long ctas = sh.base_ctas * ns;
    const bool two_placements = per_sm == 2 && ns > 1 && ctas > sms && ctas <= 2L * sms;
    p.first_ctas = two_placements && p.first_w != 64 ? sms : 0;
    if (ns == 1 && !sh.partial) p.ws_lse = NULL; /* the CTAs write `out` */
  }
  kernel<<<(unsigned)(sh.base_ctas * p.nsplits), threads, smem, stream>>>(p);
  if (cudaGetLastError() != cudaSuccess) return KVC_ERR_CUDA;
  /* After pass 1 the caller runs pass 2, then the combine. */
  return p.nsplits > 1 && !sh.partial && p.huf_pass != 1 ? launch_combine<HD, T>(p, stream)
                                                          : KVC_OK;
}

template <int HD, class T, int WM>
kvc_status_t launch(params &p, const launch_shape &sh, cudaStream_t stream) {
  if (p.block_tokens > max_block_tokens<HD, WM>()) return KVC_ERR_UNSUPPORTED;
  return launch_with<HD, T>(attn_kernel<HD, T, WM>, threads_of<WM>(), smem_layout<HD, WM>::bytes,
                            p, sh, stream);
}

/* v3 (attention/kvc_attn_v3.cuh): query tiles of 8 NB entries, pages without Huffman coding,
 * CPS CTAs per SM. Blocks whose sections may not fit its ring are left to v2. */
template <int HD, class T, int NB, int UT, int CPS = 2, bool TP = kTpDefault<HD>>
kvc_status_t launch_v3(params &p, const launch_shape &sh, cudaStream_t stream) {
  if (p.block_tokens > v3_layout<HD, UT, CPS>::max_block_tokens) return KVC_ERR_UNSUPPORTED;
  auto kernel = attn_kernel_v3<HD, T, NB, false, true, UT, CPS, false, TP>;
  /* fp16 query tiles of at most 4 entries take the instance that adds Q' 's remainder to S^T in
   * the tile's free columns (kvc_attn_v3.cuh, lo4); not launches of rows alone at head_dim 256
   * (CPS 1), which have no bit-pack pages. */
  if constexpr (kFast16<T> && NB == 1 && CPS == 2)
    if (sh.entries_max <= 4) kernel = attn_kernel_v3<HD, T, NB, false, true, UT, CPS, true, TP>;
  typedef v3_layout<HD, UT, CPS> SL;
  return launch_with<HD, T>(kernel, SL::threads, SL::bytes, p, sh, stream);
}

int hd_index(int hd) { return hd == 64 ? 0 : hd == 128 ? 1 : hd == 256 ? 2 : -1; }

/* Whether v3's Huffman instance takes blocks of bt tokens (hd_index hdi): not those whose
 * sections may not fit its ring or position arrays. */
bool v3h_takes(int hdi, int bt) {
  const int most = hdi == 0   ? v3h_layout<64>::max_block_tokens
                   : hdi == 1 ? v3h_layout<128>::max_block_tokens
                              : v3h_layout<256>::max_block_tokens;
  return bt <= most;
}

/* v3 with Huffman pages (attention/kvc_attn_v3_huf.cuh): every codec; FAST: with the bit-pack
 * fast path. Block sizes it does not take (v3h_takes) are left to v2. */
template <int HD, class T, int NB, bool FAST, bool TP = kTpDefault<HD>>
kvc_status_t launch_v3h(params &p, const launch_shape &sh, cudaStream_t stream) {
  if (!v3h_takes(hd_index(HD), p.block_tokens)) return KVC_ERR_UNSUPPORTED;
  return launch_with<HD, T>(
      attn_kernel_v3<HD, T, NB, true, FAST, kUnitTokens, v3h_cps<HD>(), false, TP>,
      v3h_layout<HD>::threads, v3h_layout<HD>::bytes, p, sh, stream);
}

/* [head_dim 64/128/256][dtype f16/bf16], tiles of 8 entries (NB = 1; see
 * attention/kvc_attn_v3.cuh). */
const launch_fn kLaunch3[3][2] = {
    {launch_v3<64, __half, 1, kUnitTokens>, launch_v3<64, __nv_bfloat16, 1, kUnitTokens>},
    {launch_v3<128, __half, 1, kUnitTokens>, launch_v3<128, __nv_bfloat16, 1, kUnitTokens>},
    {launch_v3<256, __half, 1, kUnitTokens>, launch_v3<256, __nv_bfloat16, 1, kUnitTokens>},
};
/* [dtype f16/bf16]: head_dim 256 launches whose pages are all rows, one CTA per SM (v3_ring_bytes:
 * at two, the ring holds one unit of fp16 rows, and the producer waits for it to drain). */
const launch_fn kLaunch3rows256[2] = {launch_v3<256, __half, 1, kUnitTokens, 1>,
                                      launch_v3<256, __nv_bfloat16, 1, kUnitTokens, 1>};
/* The same over units of two pages (v3_layout), head_dim 64/128. */
const launch_fn kLaunch3u2[2][2] = {
    {launch_v3<64, __half, 1, 128>, launch_v3<64, __nv_bfloat16, 1, 128>},
    {launch_v3<128, __half, 1, 128>, launch_v3<128, __nv_bfloat16, 1, 128>},
};
/* [dtype f16/bf16]: head_dim 256's instances for launches in two passes (kTpDefault), pass 1's
 * and pass 2's. */
const launch_fn kLaunch3tp256[2] = {launch_v3<256, __half, 1, kUnitTokens, 2, true>,
                                    launch_v3<256, __nv_bfloat16, 1, kUnitTokens, 2, true>};
const launch_fn kLaunch3htp256[2] = {launch_v3h<256, __half, 1, true, true>,
                                     launch_v3h<256, __nv_bfloat16, 1, true, true>};
/* [head_dim 64/128/256][dtype][bit-pack pages allowed]. */
const launch_fn kLaunch3h[3][2][2] = {
    {{launch_v3h<64, __half, 1, false>, launch_v3h<64, __half, 1, true>},
     {launch_v3h<64, __nv_bfloat16, 1, false>, launch_v3h<64, __nv_bfloat16, 1, true>}},
    {{launch_v3h<128, __half, 1, false>, launch_v3h<128, __half, 1, true>},
     {launch_v3h<128, __nv_bfloat16, 1, false>, launch_v3h<128, __nv_bfloat16, 1, true>}},
    {{launch_v3h<256, __half, 1, false>, launch_v3h<256, __half, 1, true>},
     {launch_v3h<256, __nv_bfloat16, 1, false>, launch_v3h<256, __nv_bfloat16, 1, true>}},
};

/* The dispatch table: [head_dim 64/128/256][dtype f16/bf16][WM 1/2/4/8]; NULL: not built (the
 * shared-memory budget of head_dim 256 leaves room for one query tile of 16 entries). An instance
 * returns KVC_ERR_UNSUPPORTED for a block_tokens its ring cannot hold; the caller then tries the
 * next larger WM. */
const launch_fn kLaunch[3][2][4] = {
    {{launch<64, __half, 1>, launch<64, __half, 2>, launch<64, __half, 4>, launch<64, __half, 8>},
     {launch<64, __nv_bfloat16, 1>, launch<64, __nv_bfloat16, 2>, launch<64, __nv_bfloat16, 4>,
      launch<64, __nv_bfloat16, 8>}},
    {{launch<128, __half, 1>, launch<128, __half, 2>, launch<128, __half, 4>,
      launch<128, __half, 8>},
     {launch<128, __nv_bfloat16, 1>, launch<128, __nv_bfloat16, 2>,
      launch<128, __nv_bfloat16, 4>, launch<128, __nv_bfloat16, 8>}},
    {{launch<256, __half, 1>, NULL, NULL, NULL}, {launch<256, __nv_bfloat16, 1>, NULL, NULL, NULL}},
};

/* [head_dim 64/128/256][dtype f16/bf16]: the combine of a cascade's partials. */
kvc_status_t (*const kCombine[3][2])(const params &, cudaStream_t) = {
    {launch_combine<64, __half>, launch_combine<64, __nv_bfloat16>},
    {launch_combine<128, __half>, launch_combine<128, __nv_bfloat16>},
    {launch_combine<256, __half>, launch_combine<256, __nv_bfloat16>},
};

/* One launch's batch (the caller's params point at its CSR arrays and workspace). */
struct level {
  int num_seqs, max_kv_len;
  long entries_max; /* query entries (rows x GQA group) of its largest sequence */
  int pos_shift;    /* params::pos_shift */
  int max_splits;   /* launch_shape::max_splits */
  bool partial;     /* launch_shape::partial */
  bool v3_tiles;    /* v3 over query tiles of 8 entries, however many (tile_reads) */
};

/* Whether a launch at head_dim 256 (hd_index 2) reads rows alone: kLaunch3rows256's. */
bool rows_only_256(int hdi, uint32_t codec_mask) {
  return hdi == 2 && codec_mask == 1u << KVC_CODEC_RAW;
}

/* Whether v3 takes a launch's codec mask: a known mask (every head_dim; at 256, rows alone and
 * Huffman pages run one CTA per SM: at two, v3 ran rows 1.48x slower than v2, session 25, and
 * its Huffman instance does not fit). */
bool v3_built(uint32_t codec_mask) { return codec_mask != 0; }

/* Query entries per CTA of the instance dispatch picks for sequences of up to entries_max query
 * entries: v3's 8 (v3_built), else v2's smallest tile that holds them (head_dim 256: always 16,
 * more tiles). */
int tile_entries(long entries_max, int hdi, uint32_t codec_mask) {
  if (entries_max <= 8 && v3_built(codec_mask)) return 8;
  if (hdi == 2 || entries_max <= 16) return 16;
  return entries_max <= 32 ? 32 : entries_max <= 64 ? 64 : 128;
}

/* What one query tile of v2 costs, in tiles of v3 (8 entries) over the same KV: [pages: fp16 rows,
 * bit-pack, Huffman][v2's tile of 16, 32, 64, 128 entries]. Measured on the H200 at head_dim 128
 * (session 21, v2 on bulk copies; `./kvc bench attention`'s multi-query rows, 8 sequences of 32k
 * tokens: v2's time over v3's, times v3's tiles; 16: 12-16 entries, 2 tiles; 32: 24 and 32 entries)
 * and, for 64, the most conservative of session 10's prefix launches (3.7 / 4.6 / 4.2) and sessions
 * 20-21's 64 entries (3.7-7.5): v3's figure per tile falls as its launch fills the GPU, so a linear
 * count is rough and v2 keeps the large tiles. fp16's 16-entry tile measured 1.8 there, but a
 * cascade's prefix launches of 16 entries ran 3-20% slower on v2 than on v3's two tiles (`./kvc
 * bench attention`'s prefix rows, 4 sequences per group), so 2.4 keeps those on v3. 128: the
 * 64-entry factor times two tiles times the 128-entry tile's time over the 64-entry tile's, at 64
 * and 256 rows of 4 entries (session 22: 0.67-0.69 / 0.57 / 0.47). Every head_dim takes these,
 * head_dim 64 with one exception (below).
 * Measured the same way at the others' 16-entry tile (session 25): head_dim 256 (v2's one tile; v3
 * for bit-pack masks alone) bit-pack 2.8; head_dim 64 bit-pack 2.7, Huffman 2.3, the same choices
 * as here, and fp16 1.3 (v2 0.169 ms at 12-16 entries, v3's two tiles 0.260), but with 1.3 a
 * cascade's prefix launch over one group of 4 sequences took v2 too and the call ran 0.042 -> 0.051
 * ms, slower than without the cascade (groups of 4 in 8 or 16 groups gained 9-11%): the factor
 * depends on the launch's size. So at head_dim 64, launches of at least kLargeLaunch (sequence,
 * kv head) pairs take fp16's 16-entry factor as measured on decode rows (8 sequences x 8 kv heads),
 * kV2Tile16Large, and smaller ones (one group's prefix: 8 pairs) 2.4; session 26: 3-4 rows 0.261
 * -> 0.169 ms, cascades over 8 and 16 groups 0.092 -> 0.083 and 0.108 -> 0.099, one group
 * unchanged. At head_dim 128 the same rule with 1.8 ran 3-4 rows 0.324 -> 0.293 ms, but cascades
 * over 8 and 16 groups (64 and 128 pairs, 16 entries over 8k and 4k tokens) 0.123 -> 0.128 and
 * 0.148 -> 0.153, so 128 keeps 2.4 everywhere. The bit-pack factors predate session 40, which made
 * v2's paired value rows 12-19% faster: about 15% high now, which flips none of the choices above
 * (16 entries stay on v3's two tiles); not measured again. */
const double kV2Tile[3][4] = {
    {2.4, 2.0, 3.7, 5.0}, {3.3, 3.9, 4.6, 5.3}, {2.8, 3.0, 4.2, 3.9}};
constexpr long kLargeLaunch = 32;
constexpr double kV2Tile16Large = 1.3;
/* head_dim 256, rows alone (v3 at one CTA per SM): measured 1.6 (session 26: 3 rows of 8
 * sequences of 32k, v2 0.689 ms, v3's two tiles 0.852), so only rows of up to 8 entries take v3. */
constexpr double kV2TileRows256 = 1.6;

/* The cost, in v3 reads of its KV, of attending `entries` query entries of one sequence in a
 * launch of `pairs` (sequence, kv head) pairs: its query tiles, a tile of v2 counted as kV2Tile
 * v3 tiles. *v3_tiles: whether v3 over several tiles of 8 costs less (v3_built). */
double tile_reads(long entries, long pairs, int hdi, uint32_t codec_mask, bool *v3_tiles) {
  const int te = tile_entries(entries, hdi, codec_mask);
  const int pages = codec_mask & (1u << KVC_CODEC_HUFFMAN)   ? 2
                    : codec_mask & (1u << KVC_CODEC_BITPACK) ? 1
                                                              : 0;
  const int wmi = te == 16 ? 0 : te == 32 ? 1 : te == 64 ? 2 : 3;
  const bool large16 = pages == 0 && wmi == 0 && hdi == 0 && pairs >= kLargeLaunch;
  const double f = rows_only_256(hdi, codec_mask) ? kV2TileRows256
                   : large16                      ? kV2Tile16Large
                                                  : kV2Tile[pages][wmi];
  const double v2 = (double)((entries + te - 1) / te) * (te == 8 ? 1.0 : f);
  const double v3 = (double)((entries + 7) / 8);
  *v3_tiles = v3_built(codec_mask) && v3 < v2;
  return *v3_tiles ? v3 : v2;
}

/* Whether a v3 launch runs in two passes (kvc_attn_args_t.huffman_rare): Huffman and bit-pack pages
 * in the mask, and blocks both instances take (launch_v3, launch_v3h), so that pass 2 never
 * declines after pass 1 ran. */
bool two_passes(const kvc_attn_args_t *a) {
  const uint32_t both = (1u << KVC_CODEC_BITPACK) | (1u << KVC_CODEC_HUFFMAN);
  const int hdi = hd_index(a->head_dim);
  return a->huffman_rare && (a->codec_mask & both) == both && hdi >= 0 &&
         v3h_takes(hdi, a->block_tokens);
}

/* The tokens x kv heads from which a launch in two passes beats one launch of the instance that
 * takes every codec over bit-pack pages, by head_dim 64/128/256 (kvc_attn_cuda_two_passes_pay).
 * Measured on an H200 (session 61, bench/NOTES-attention.md; 8 kv heads, ms, one launch against
 * two passes): head_dim 64 (1, 16k) 0.0248 / 0.0270, (1, 32k) 0.0326 / 0.0310; head_dim 128
 * (1, 32k) 0.0366 / 0.0389, (4, 8k) 0.0354 / 0.0358, (2, 32k) 0.0567 / 0.0508; head_dim 256
 * (4, 8k) 0.0619 / 0.0684, (2, 32k) 0.1067 / 0.1045. Pass 2 costs more at 256, where the Huffman
 * instance holds one CTA per SM and so takes pass 1's grid in two waves. The GQA group does not
 * move the crossover: at head_dim 128 with 8, 32 and 64 query heads (session 62), (4, 8k) runs
 * faster in one launch and (2, 32k) in two passes in all three. */
constexpr int64_t kTwoPassTokenHeads[3] = {1 << 18, 1 << 19, 1 << 19};

/* Whether lv's launch runs v3: query tiles of 8 entries (tile_entries), or several of them where
 * tile_reads prefers them to v2's larger tiles. v3's Huffman instance may still decline a block
 * size (launch_v3h). */
bool runs_v3(const kvc_attn_args_t *a, const level &lv) {
  const int hdi = hd_index(a->head_dim);
  return tile_entries(lv.entries_max, hdi, a->codec_mask) == 8 || lv.v3_tiles;
}

/* Enqueues one launch (v3 where it applies, else v2's smallest query tile that holds lv's rows)
 * over lv's batch; sets p.nsplits. */
kvc_status_t dispatch(const kvc_attn_args_t *a, params &p, const level &lv, cudaStream_t stream) {
  const int hdi = hd_index(a->head_dim), bt = a->block_tokens;
  const long entries_max = lv.entries_max;
  p.pos_shift = lv.pos_shift;
  /* v3 splits a unit between two warps when every page is rows (RAW pages, staging pages): their
   * per-page setup is free, and the ring holds only three 64-token units of fp16 rows at head_dim
   * 128, so whole units would keep two of the five consumer warps idle. Units of two pages are
   * split too (below). */
  p.unit_split_lg = a->codec_mask == 1u << KVC_CODEC_RAW ? 1 : 0;

  /* v3 where it applies (tile_entries); its Huffman instance when the mask allows Huffman pages
   * (with the bit-pack fast path when it allows bit-pack pages too). Else v2's smallest query
   * tile that holds a sequence's rows, or a larger one when the block size needs a larger ring. */
  const int te = tile_entries(entries_max, hdi, a->codec_mask);
  const bool v3 = runs_v3(a, lv);
  const int wmi0 = te <= 16 ? 0 : te == 32 ? 1 : te == 64 ? 2 : 3;
  const bool v3h = (a->codec_mask & (1u << KVC_CODEC_HUFFMAN)) != 0;
  /* Units of two pages (v3_layout) where the pages need not be all rows (those split their units
   * of one page instead), without Huffman, for blocks of 32 or 64 tokens: the producer's steps
   * per unit bound bit-pack. Each is split in halves between two warps, which claim them
   * (v3_claims), so that the consumers still take 64 tokens at a time. Measured against whole
   * 128-token units in the fixed order (session 9, ms): bit-pack (1, 32k) -1.6%, (8, 32k) -3.5%,
   * (64, 4k) -3.9%, (16, 128k) -3.4%. Not built at head_dim 256 (not measured there). */
  const bool pairs = hdi < 2 && (bt == 32 || bt == 64); /* blocks that units of two pages take */
  const bool u2 = v3 && !v3h && p.unit_split_lg == 0 && pairs;
  if (u2) p.unit_split_lg = 1;
  /* lv's batch in query tiles of `tile` entries and units of `unit` tokens. */
  auto shape = [&](int tile, int unit) {
    launch_shape sh;
    sh.qtiles = (int)((entries_max + tile - 1) / tile);
    sh.base_ctas = (long)lv.num_seqs * a->num_kv_heads * sh.qtiles;
    sh.entries_max = entries_max;
    sh.units_max = (lv.max_kv_len + unit - 1) / unit;
    sh.max_splits = lv.max_splits;
    sh.partial = lv.partial;
    sh.num_kv_heads = a->num_kv_heads;
    sh.num_seqs = lv.num_seqs;
    p.qtiles = sh.qtiles;
    return sh;
  };
  if (v3) {
    const int bf16 = a->dtype == KVC_DTYPE_BF16;
    const bool bitpack = (a->codec_mask & (1u << KVC_CODEC_BITPACK)) != 0;
    const bool rows256 = rows_only_256(hdi, a->codec_mask);
    if (two_passes(a)) {
      /* Pass 1 as the launch of a mask without Huffman would be (u2 as above), pass 2 on its
       * grid, then the combine. */
      const launch_shape sh = shape(8, pairs ? 2 * kUnitTokens : kUnitTokens);
      params q = p;
      q.unit_split_lg = pairs ? 1 : 0;
      q.first_w = hdi == 1 && pairs ? 80 : 64;
      q.huf_pass = 1;
      const launch_fn pass1 = hdi == 2 ? kLaunch3tp256[bf16]
                              : pairs  ? kLaunch3u2[hdi][bf16]
                                       : kLaunch3[hdi][bf16];
      kvc_status_t st = pass1(q, sh, stream);
      if (st == KVC_OK) {
        q.huf_pass = 2;
        q.range_lg = pairs ? 1 : 0;
        q.unit_split_lg = 0; /* whole units: its "empty" barriers count one warp */
        st = (hdi == 2 ? kLaunch3htp256[bf16] : kLaunch3h[hdi][bf16][1])(q, sh, stream);
        if (st == KVC_OK && q.nsplits > 1 && !sh.partial) st = kCombine[hdi][bf16](q, stream);
        p.nsplits = q.nsplits;
        return st;
      }
      if (st != KVC_ERR_UNSUPPORTED) return st;
    }
    const launch_fn fn = v3h       ? kLaunch3h[hdi][bf16][bitpack]
                         : u2      ? kLaunch3u2[hdi][bf16]
                         : rows256 ? kLaunch3rows256[bf16]
                                   : kLaunch3[hdi][bf16];
    /* Units a split that enters its SM first takes for every 64 of one that enters second, where
     * a launch is one wave of two CTAs per SM (split_range). Measured on an H200 (session 41,
     * weights 56 to 88; bench/NOTES-attention.md): 80 for units of two bit-pack pages at head_dim
     * 128 (-2.5% at (8, 32k), -1.7..-2.8% at (16, 128k), -3.3..-4.0% for 2-4 query rows, but
     * +3.8% for the cascade of 8 x (16k + 1k)). Even elsewhere: every weight was slower at head_dim
     * 64 and 256 and over fp16 pages, and the Huffman instance's -1.2% came with +2..6% for its
     * bit-pack pages and cascades. */
    p.first_w = hdi == 1 && u2 ? 80 : 64;
    const kvc_status_t st = fn(p, shape(8, u2 ? 2 * kUnitTokens : kUnitTokens), stream);
    if (st != KVC_ERR_UNSUPPORTED) return st;
  }
  p.first_w = 64; /* v2: not measured */
  for (int wmi = wmi0; wmi < 4; wmi++) {
    const launch_fn fn = kLaunch[hdi][a->dtype == KVC_DTYPE_BF16][wmi];
    if (!fn) break;
    const kvc_status_t st = fn(p, shape(16 << wmi, kUnitTokens), stream);
    if (st != KVC_ERR_UNSUPPORTED) return st;
  }
  return KVC_ERR_UNSUPPORTED;
}

}  // namespace kvc_attn

using namespace kvc_attn;

extern "C" size_t kvc_attn_cuda_workspace_bytes(int max_q_rows, int num_q_heads, int head_dim,
                                                int max_seqs, int max_seq_len, int block_tokens) {
  (void)max_seqs;
  (void)block_tokens;
  if (max_q_rows < 1 || num_q_heads < 1 || head_dim < 1 || max_seq_len < 1) return 0;
  const long units = (max_seq_len + kUnitTokens - 1) / kUnitTokens;
  long entries = (long)max_q_rows * num_q_heads * (units < kMaxSplits ? units : kMaxSplits);
  if (entries > kWsEntries) entries = kWsEntries;
  return (size_t)entries * (size_t)(head_dim + 1) * sizeof(float);
}

extern "C" int kvc_attn_cuda_two_passes_pay(const kvc_attn_args_t *a, int64_t kv_tokens) {
  const int hdi = hd_index(a->head_dim);
  return hdi >= 0 && a->num_kv_heads > 0 && kv_tokens * a->num_kv_heads >= kTwoPassTokenHeads[hdi];
}

/* Without the cascade every member of a group reads the group's prefix (tile_reads of its own
 * entries), with it the group's rows do once (tile_reads of all of them). The cascade must halve
 * that, and save the reading of 16k prefix tokens at least: its second launch and the combine
 * cost a few microseconds. */
extern "C" int kvc_attn_cuda_cascade_pays(const kvc_attn_args_t *a, int groups,
                                          const int32_t *group_rows, const int32_t *group_tokens,
                                          const int32_t *seq_rows, const int32_t *seq_group) {
  const int hdi = hd_index(a->head_dim), group = a->num_q_heads / a->num_kv_heads;
  bool unused;
  double once = 0, each = 0;
  for (int g = 0; g < groups; g++)
    once += tile_reads((long)group_rows[g] * group, (long)groups * a->num_kv_heads, hdi,
                       a->codec_mask, &unused) *
            group_tokens[g];
  for (int s = 0; s < a->num_seqs; s++)
    if (seq_group[s] >= 0)
      each += tile_reads((long)seq_rows[s] * group, (long)a->num_seqs * a->num_kv_heads, hdi,
                         a->codec_mask, &unused) *
              group_tokens[seq_group[s]];
  return 2 * once <= each && each - once >= 16384;
}

/* The query entries of a's largest sequence, and whether v3 over several tiles reads less. */
level whole_level(const kvc_attn_args_t *a, int fit) {
  const int group = a->num_q_heads / a->num_kv_heads;
  const int max_qo = a->max_qo_len > 0 ? a->max_qo_len : a->total_q_rows - a->num_seqs + 1;
  bool v3_tiles;
  tile_reads((long)max_qo * group, (long)a->num_seqs * a->num_kv_heads, hd_index(a->head_dim),
             a->codec_mask, &v3_tiles);
  return {a->num_seqs, a->max_kv_len, (long)max_qo * group, 0, fit >= 2 ? fit : 1, false,
          v3_tiles};
}

extern "C" int kvc_attn_cuda_kernel(const kvc_attn_args_t *a) {
  const int hdi = hd_index(a->head_dim);
  if (hdi < 0 || a->num_kv_heads < 1 || a->num_q_heads % a->num_kv_heads != 0) return -1;
  if (!runs_v3(a, whole_level(a, 1))) return 0;
  if (rows_only_256(hdi, a->codec_mask))
    return a->block_tokens <= v3_layout<256, kUnitTokens, 1>::max_block_tokens ? 1 : 0;
  if (!(a->codec_mask & (1u << KVC_CODEC_HUFFMAN)))
    return hdi < 2 || a->block_tokens <= v3_layout<256>::max_block_tokens ? 1 : 0;
  if (two_passes(a)) return 3;
  return v3h_takes(hdi, a->block_tokens) ? 2 : 0;
}

/* kvc_attn_cuda's work; kvc_attn_cuda wraps it with the probe's accounts in a probe build. */
static kvc_status_t attn_cuda(const kvc_attn_args_t *a, void *stream) {
  if (!a || a->num_seqs < 0 || a->total_q_rows < 0) return KVC_ERR_INVALID_ARGUMENT;
  if (a->num_kv_heads < 1 || a->num_q_heads < a->num_kv_heads ||
      a->num_q_heads % a->num_kv_heads != 0 || !(a->scale == a->scale))
    return KVC_ERR_INVALID_ARGUMENT;
  const int hdi = hd_index(a->head_dim);
  const int bt = a->block_tokens;
  if (hdi < 0 || (a->dtype != KVC_DTYPE_F16 && a->dtype != KVC_DTYPE_BF16) || bt < 16 ||
      bt > kMaxBlockTokens || (bt & (bt - 1)) != 0)
    return KVC_ERR_UNSUPPORTED;
  if (a->num_seqs == 0) return a->total_q_rows == 0 ? KVC_OK : KVC_ERR_INVALID_ARGUMENT;
  if (!a->qo_indptr || !a->kv_len || !a->block_indptr || !a->block_ids || !a->dir || !a->pool ||
      !a->q || !a->out || a->chunk_bytes < KVC_CHUNK_MIN_BYTES ||
      (a->chunk_bytes & (a->chunk_bytes - 1)) != 0 || a->max_kv_len < 1 || a->total_q_rows < 1)
    return KVC_ERR_INVALID_ARGUMENT;
  if (((uintptr_t)a->q | (uintptr_t)a->out | (uintptr_t)a->pool) % 16 != 0)
    return KVC_ERR_INVALID_ARGUMENT;

  const int group = a->num_q_heads / a->num_kv_heads;
  const int max_qo = a->max_qo_len > 0 ? a->max_qo_len : a->total_q_rows - a->num_seqs + 1;
  if (max_qo < 1) return KVC_ERR_INVALID_ARGUMENT;
  if ((uintptr_t)a->workspace % 16 != 0) return KVC_ERR_INVALID_ARGUMENT;
  if (a->prefix_seqs < 0 ||
      (a->prefix_seqs > 0 &&
       (!a->prefix_qo_indptr || !a->prefix_rows || !a->prefix_kv_len || !a->prefix_block_start ||
        !a->suffix_kv_len || !a->suffix_block_start || a->prefix_max_rows < 1 ||
        a->prefix_max_rows > a->total_q_rows || a->prefix_max_tokens < 1 ||
        a->suffix_max_tokens < 1)))
    return KVC_ERR_INVALID_ARGUMENT;

  kvc_attn::params p;
  p.qo_indptr = a->qo_indptr;
  p.kv_len = a->kv_len;
  p.block_indptr = a->block_indptr;
  p.block_ids = a->block_ids;
  p.dir = a->dir;
  p.pool = a->pool;
  p.q = a->q;
  p.out = a->out;
  p.chunk_bytes = a->chunk_bytes;
  p.chunk_shift = (uint32_t)__builtin_ctz(a->chunk_bytes);
  p.num_q_heads = a->num_q_heads;
  p.num_kv_heads = a->num_kv_heads;
  p.group = group;
  p.block_tokens = bt;
  p.dtype = (int)a->dtype;
  p.total_q_rows = a->total_q_rows;
  p.row_map = NULL;
  p.pos_shift = 0;
  p.huf_pass = p.range_lg = 0;
  p.scale_log2 = a->scale * 1.4426950408889634f;
  /* The workspace: fit splits of partials, then their log2-sum-exps. */
  const size_t pairs = (size_t)a->total_q_rows * a->num_q_heads;
  const size_t fit =
      a->workspace ? a->workspace_bytes / (pairs * (size_t)(a->head_dim + 1) * sizeof(float)) : 0;
  float *const ws = (float *)a->workspace;
  float *const ws_lse = ws ? ws + fit * pairs * a->head_dim : NULL;
  const cudaStream_t s = (cudaStream_t)stream;

  /* Several query rows per sequence (speculative tokens, short prefill chunks) may run v3 over
   * several query tiles where that reads less than v2's larger tiles. */
  const level whole = whole_level(a, fit < (size_t)INT32_MAX ? (int)fit : INT32_MAX);
  /* The combine takes at most kMaxSplits partials: the two launches share them. */
  const int cap = fit < (size_t)kMaxSplits ? (int)fit : kMaxSplits;
  if (a->prefix_seqs == 0 || a->cascade == 0 || cap < 2) {
    p.ws_o = ws;
    p.ws_lse = ws_lse;
    return dispatch(a, p, whole, s);
  }
  /* The prefixes, once: each group's rows as one sequence, at or past its prefix's last token
   * (pos_shift: the most rows of one, less one). */
  bool v3_tiles;
  tile_reads((long)a->prefix_max_rows * group, (long)a->prefix_seqs * a->num_kv_heads, hdi,
             a->codec_mask, &v3_tiles);
  level pre = {a->prefix_seqs,        a->prefix_max_tokens, (long)a->prefix_max_rows * group,
               a->prefix_max_rows - 1, cap - 1,              true,
               v3_tiles};
  params p1 = p;
  p1.qo_indptr = a->prefix_qo_indptr;
  p1.kv_len = a->prefix_kv_len;
  p1.block_indptr = a->prefix_block_start;
  p1.row_map = a->prefix_rows;
  p1.ws_o = ws;
  p1.ws_lse = ws_lse;
  kvc_status_t st = dispatch(a, p1, pre, s);
  if (st != KVC_OK) return st;
  /* Each sequence after its prefix: its causal positions shift with its tokens. */
  level suf = whole;
  suf.max_kv_len = a->suffix_max_tokens;
  suf.max_splits = cap - p1.nsplits;
  suf.partial = true;
  params p2 = p;
  p2.kv_len = a->suffix_kv_len;
  p2.block_indptr = a->suffix_block_start;
  p2.ws_o = ws + (size_t)p1.nsplits * pairs * a->head_dim;
  p2.ws_lse = ws_lse + (size_t)p1.nsplits * pairs;
  if ((st = dispatch(a, p2, suf, s)) != KVC_OK) return st;
  params pc = p;
  pc.ws_o = ws;
  pc.ws_lse = ws_lse;
  pc.nsplits = p1.nsplits + p2.nsplits;
  return kCombine[hdi][a->dtype == KVC_DTYPE_BF16](pc, s);
}

#ifdef KVC_ATTN_PROBE
/* The KVC_PROBE_CALL-th call's accounts, zeroed before its launches and written after them to
 * KVC_PROBE_OUT (attention/kvc_attn_probe.cuh). Synchronizes the device around that call only. */
static kvc_status_t probed_call(const kvc_attn_args_t *a, void *stream) {
  using kvc_attn::kProbeSlots;
  using kvc_attn::PR_COUNT;
  static int calls = 0;
  static unsigned long long acc[kProbeSlots][PR_COUNT];
  const char *which = getenv("KVC_PROBE_CALL");
  if (!which || ++calls != atoi(which)) return attn_cuda(a, stream);
  memset(acc, 0, sizeof acc);
  if (cudaDeviceSynchronize() != cudaSuccess ||
      cudaMemcpyToSymbol(kvc_attn::kvc_probe_cycles, acc, sizeof acc) != cudaSuccess)
    return KVC_ERR_CUDA;
  const kvc_status_t st = attn_cuda(a, stream);
  if (cudaDeviceSynchronize() != cudaSuccess ||
      cudaMemcpyFromSymbol(acc, kvc_attn::kvc_probe_cycles, sizeof acc) != cudaSuccess)
    return KVC_ERR_CUDA;
  const char *path = getenv("KVC_PROBE_OUT");
  FILE *f = path ? fopen(path, "w") : stderr;
  if (!f) return st;
  for (int i = 0; i < kProbeSlots; i++) {
    if (!acc[i][kvc_attn::PR_LOOP]) continue;
    fprintf(f, "%d", i);
    for (int r = 0; r < PR_COUNT; r++) fprintf(f, " %llu", acc[i][r]);
    fputc('\n', f);
  }
  if (f != stderr) fclose(f);
  return st;
}
#endif

extern "C" kvc_status_t kvc_attn_cuda(const kvc_attn_args_t *a, void *stream) {
#ifdef KVC_ATTN_PROBE
  return probed_call(a, stream);
#else
  return attn_cuda(a, stream);
#endif
}
