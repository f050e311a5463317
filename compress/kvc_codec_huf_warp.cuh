/*
 * Canonical length-limited Huffman code lengths and codes built by one warp (the CUDA encoder's
 * per-section codebook; tests/gpu_test_codec.cu checks it against the CPU on many histograms).
 *
 * kvc_huf_warp_build gives exactly the lengths of kvc_huf_build_lengths and the codes of
 * kvc_huf_codes (kvc_quant.h), following the same steps, most of them lane-parallel:
 *   1. each lane owns symbols lane and lane + 32: its leaf index in (count, symbol) order and its
 *      position in the hand-out order (count descending, symbol ascending), by counting over the
 *      64 counts (shared-memory broadcasts);
 *   2. the two-queue merge (the tree), on lane 0: <= 63 steps, the queue heads kept in registers;
 *   3. each leaf's depth by walking up its parents (in parallel), histogram of depths;
 *   4. the JPEG Annex K.3 fold of depths above kvc_huf_len_limit(n_sym), on lane 0 (when needed);
 *   5. lengths from the hand-out positions and the folded histogram, canonical codes from the
 *      per-length counts and, per symbol, the number of lower symbols of the same length (ballots).
 * Only step 2 (and the rare fold) is serial; the single-thread build it replaces (thread 0 running
 * kvc_huf_build_lengths with its arrays in local memory, the CTA waiting) cost an estimated
 * 50-95k cycles per section (bench/NOTES-codec.md).
 *
 * Shared memory (caller's): counts[64] (input), len[64] and code[64] (output), scratch of
 * KVC_HUF_WARP_SCRATCH bytes, 16-byte aligned. Call with all 32 lanes of one warp; the outputs
 * are visible to the warp on return (the caller syncs before other warps read them). Returns n_sym
 * (highest used symbol + 1, 0 when none) on every lane.
 */
#ifndef KVC_CODEC_HUF_WARP_CUH
#define KVC_CODEC_HUF_WARP_CUH

#include <stdint.h>

#include "compress/kvc_page_format.h"
#include "compress/kvc_quant.h"

/* w[128] uint32 node weights, bl[64] int depth histogram, parent[128] uint8. */
#define KVC_HUF_WARP_SCRATCH (2 * KVC_SYM_COUNT * 4 + KVC_SYM_COUNT * 4 + 2 * KVC_SYM_COUNT)

__device__ __forceinline__ int kvc_huf_warp_build(const uint32_t *counts, uint8_t *len,
                                                  uint32_t *code, uint8_t *scratch) {
  static_assert(KVC_SYM_COUNT == 64, "two symbols per lane");
  const unsigned full = 0xffffffffu;
  uint32_t *w = (uint32_t *)scratch;
  int *bl = (int *)(scratch + 2 * KVC_SYM_COUNT * 4);
  uint8_t *parent = scratch + 3 * KVC_SYM_COUNT * 4;
  const int lane = threadIdx.x & 31, s0 = lane, s1 = lane + 32;
  const uint32_t c0 = counts[s0], c1 = counts[s1];
  const uint32_t b0 = __ballot_sync(full, c0 != 0), b1 = __ballot_sync(full, c1 != 0);
  const int n_sym = b1 ? 64 - __clz(b1) : (b0 ? 32 - __clz(b0) : 0);
  const int m = __popc(b0) + __popc(b1);
  int l0 = 0, l1 = 0;
  uint32_t k0 = 0, k1 = 0;
  if (m >= 2) {
    /* 1. Leaf index (ra) and hand-out position (rd) of each used symbol: a pass over the m used
     * symbols only (the ballot masks), each count taken from its owner lane. */
    int ra0 = 0, ra1 = 0, rd0 = 0, rd1 = 0;
    for (int half = 0; half < 2; half++) {
      const uint32_t cv = half ? c1 : c0;
      for (uint32_t mask = half ? b1 : b0; mask; mask &= mask - 1) {
        const int i = __ffs(mask) - 1, t = i + 32 * half;
        const uint32_t ct = __shfl_sync(full, cv, i);
        ra0 += ct < c0 || (ct == c0 && t < s0);
        rd0 += ct > c0 || (ct == c0 && t < s0);
        ra1 += ct < c1 || (ct == c1 && t < s1);
        rd1 += ct > c1 || (ct == c1 && t < s1);
      }
    }
    if (c0) w[ra0] = c0;
    if (c1) w[ra1] = c1;
    bl[s0] = 0;
    bl[s1] = 0;
    __syncwarp();
    /* 2. Two-queue merge: leaves w[0..m), internal nodes w[m..2m-1) in creation order; the smaller
     * head is taken, a leaf on ties (as kvc_huf_build_lengths). */
    if (lane == 0) {
      int leaf = 0, inode = m, next = m;
      uint32_t wl = w[0], wi = 0;
      for (int k = 0; k < m - 1; k++) {
        int pk[2];
        uint32_t pw[2];
        for (int j = 0; j < 2; j++) {
          if (leaf < m && (inode >= next || wl <= wi)) {
            pk[j] = leaf;
            pw[j] = wl;
            leaf++;
            wl = leaf < m ? w[leaf] : 0u;
          } else {
            pk[j] = inode;
            pw[j] = wi;
            inode++;
            wi = inode < next ? w[inode] : 0u;
          }
        }
        const uint32_t sum = pw[0] + pw[1];
        w[next] = sum;
        parent[pk[0]] = parent[pk[1]] = (uint8_t)next;
        if (inode == next) wi = sum; /* the internal queue was empty: the new node is its head */
        next++;
      }
    }
    __syncwarp();
    /* 3. Leaf depths (root 2m - 2 has depth 0) and their histogram. */
    const int root = 2 * m - 2;
    int d0 = 0, d1 = 0;
    if (c0) {
      for (int x = ra0; x != root; x = parent[x]) d0++;
      atomicAdd(&bl[d0], 1);
    }
    if (c1) {
      for (int x = ra1; x != root; x = parent[x]) d1++;
      atomicAdd(&bl[d1], 1);
    }
    int maxd = max(d0, d1);
    for (int o = 16; o; o >>= 1) maxd = max(maxd, __shfl_xor_sync(full, maxd, o));
    __syncwarp();
    /* 4. Fold depths above the limit (as kvc_huf_build_lengths does). */
    if (lane == 0) kvc_huf_fold_depths(bl, maxd, kvc_huf_len_limit(n_sym));
    __syncwarp();
    /* 5. Position p in hand-out order gets the p-th shortest length; canonical codes start at
     * first(l) = (first(l - 1) + count(l - 1)) << 1, in symbol order within a length: symbol s
     * of length l gets first(l) + the number of lower symbols of length l (ballots over the lanes:
     * symbols below lane + 32 are all of the first half and the second half's lanes below). */
    const uint32_t below = (1u << lane) - 1u;
    int cum = 0;
    uint32_t f = 0;
    for (int l = 1; l <= KVC_HUF_MAX_LEN; l++) {
      const int nl = bl[l];
      if (c0 && l0 == 0 && rd0 < cum + nl) l0 = l;
      if (c1 && l1 == 0 && rd1 < cum + nl) l1 = l;
      const uint32_t m0 = __ballot_sync(full, l0 == l), m1 = __ballot_sync(full, l1 == l);
      if (l == l0) k0 = f + (uint32_t)__popc(m0 & below);
      if (l == l1) k1 = f + (uint32_t)__popc(m0) + (uint32_t)__popc(m1 & below);
      cum += nl;
      f = (f + (uint32_t)nl) << 1;
    }
    len[s0] = (uint8_t)l0;
    len[s1] = (uint8_t)l1;
  } else {
    len[s0] = 0;
    len[s1] = 0;
  }
  code[s0] = l0 ? k0 : 0u;
  code[s1] = l1 ? k1 : 0u;
  __syncwarp();
  return n_sym;
}

#endif /* KVC_CODEC_HUF_WARP_CUH */
