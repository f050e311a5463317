/*
 * Cycle accounts of v3's consumer warps: where a launch's time goes, region by region (CUDA C++;
 * included by attention/kvc_attn_v3.cuh). Built only with the CMake option KVC_ATTN_PROBE (the
 * macro of that name); otherwise every member below is empty and the kernels compile as without
 * it.
 *
 * Lane 0 of each consumer warp reads clock() at the end of each region of its work loop and adds
 * the cycles since the previous mark to kvc_probe_cycles[block * W + warp][region] (W: the layout's
 * consumer warps) with a global atomic; PR_ITEMS and PR_PAGES count. The probe's own instructions
 * make a launch 7-10% slower (session 43), and the regions' cycles include the time the warp waits
 * for its scheduler while other warps issue. The host side (kvc_attn_cuda.cu): with
 * KVC_PROBE_CALL=N in the environment, the N-th call of kvc_attn_cuda zeroes the accounts before
 * its launches and writes them after, one line per warp ("slot" then the PR_COUNT columns), to the
 * file named by KVC_PROBE_OUT; bench/probe_cycles.py sums a file. bench/NOTES-attention.md (session
 * 43) has what it found.
 */
#ifndef KVC_ATTN_PROBE_CUH
#define KVC_ATTN_PROBE_CUH

namespace kvc_attn {

enum probe_region : int {
  PR_WAIT,   /* the item's barrier waits (a CTA's first item: its start-up too) */
  PR_SETUP,  /* a page's setup: descriptor, headers, groups, tables (v3_page_setup) */
  PR_QK,     /* SRC_FAST keys' per-page operands: Q' and the base sums (q_page, s_fast_const) */
  PR_PREP,   /* the rest before the slabs: O^T's rescale when the values' exponent moves */
  PR_SLABS,  /* the page's slabs (and the hot path's vote before them) */
  PR_CLAIM,  /* after the item's last page: the unit's release and the next item's claim */
  PR_LOOP,   /* the whole work loop */
  PR_ITEMS,  /* a count */
  PR_PAGES,  /* a count */
  PR_COUNT
};
constexpr int kProbeSlots = 4096 * kMaxW3; /* block * W + warp (W consumer warps), clamped */

#ifdef KVC_ATTN_PROBE
/* Defined here: one translation unit (kvc_attn_cuda.cu) includes the kernels. */
__device__ unsigned long long kvc_probe_cycles[kProbeSlots][PR_COUNT];

struct probe {
  unsigned long long *acc;
  unsigned t, t_loop;
  bool on; /* lane 0 */
  __device__ explicit probe(int slot) {
    acc = kvc_probe_cycles[min(slot, kProbeSlots - 1)];
    on = (threadIdx.x & 31) == 0;
    t = t_loop = (unsigned)clock();
  }
  /* A region starts here (the cycles since the last mark are not counted). */
  __device__ void mark() {
    if (on) t = (unsigned)clock();
  }
  /* Region r ends here. */
  __device__ void add(int r) {
    if (!on) return;
    const unsigned n = (unsigned)clock();
    atomicAdd(acc + r, (unsigned long long)(n - t));
    t = n;
  }
  __device__ void count(int r) {
    if (on) atomicAdd(acc + r, 1ull);
  }
  __device__ void loop_end() {
    if (on) atomicAdd(acc + PR_LOOP, (unsigned long long)((unsigned)clock() - t_loop));
  }
};
#else
struct probe {
  __device__ explicit probe(int) {}
  __device__ void mark() {}
  __device__ void add(int) {}
  __device__ void count(int) {}
  __device__ void loop_end() {}
};
#endif

}  // namespace kvc_attn

#endif
