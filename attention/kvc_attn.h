/*
 * Paged attention over compressed and staging pages: the CPU reference (kvc_attn_cpu) and the CUDA
 * kernels (kvc_attn_cuda), driven by the same argument block built once per step by the plan.
 *
 * Every token a sequence holds — cached blocks and this step's new tokens, which kvc_store has
 * already written — is read from this layer's pages: block j of sequence s is
 * dir[block_ids[block_indptr[s] + j]], a compressed page (compress/kvc_page_format.h) or a staging
 * page (allocator/kvc_pool_layout.h). Query row r of sequence s (qo_indptr[s] <= r <
 * qo_indptr[s+1]) sits at position kv_len[s] - (qo_indptr[s+1] - qo_indptr[s]) + (r - qo_indptr[s])
 * and attends to positions 0..itself (causal).
 */
#ifndef KVC_ATTN_H
#define KVC_ATTN_H

#include <stdint.h>

#include "allocator/kvc_pool_layout.h"
#include "kvcomp.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kvc_attn_args {
  /* Shape. */
  int num_q_heads;
  int num_kv_heads;
  int head_dim;
  int block_tokens;
  kvc_dtype_t dtype;        /* of q, out and staging pages */
  float scale;              /* softmax scale */

  /* Batch, CSR (device pointers on CUDA, host pointers on CPU). */
  int num_seqs;
  int total_q_rows;
  const int32_t *qo_indptr;    /* [num_seqs + 1] */
  const int32_t *kv_len;       /* [num_seqs] tokens held after this step's store */
  const int32_t *block_indptr; /* [num_seqs + 1] */
  const int32_t *block_ids;    /* [block_indptr[num_seqs]] */
  int max_kv_len;              /* max over kv_len (host value, for launch shapes) */

  /* This layer's pages. */
  const kvc_page_entry_t *dir; /* [max_blocks] */
  const uint8_t *pool;
  uint32_t chunk_bytes;

  /* Tensors: q, out [total_q_rows][num_q_heads][head_dim]. */
  const void *q;
  void *out;

  /* CUDA only: split-K workspace, sized by kvc_attn_cuda_workspace_bytes for the cache's limits. */
  void *workspace;
  size_t workspace_bytes;

  /* Optional (appended; 0 when unknown): max over sequences of qo_indptr[s+1] - qo_indptr[s], a
   * host value that tightens the CUDA launch shape. 0: derived from total_q_rows and num_seqs. */
  int max_qo_len;

  /* Optional (appended; 0 when unknown): bit 1 << KVC_CODEC_x set for each codec this layer's
   * compressed pages may use (staging pages are always possible). The CUDA decode kernel v3 runs
   * only when the mask is non-zero: its instance for pages without Huffman coding when the mask has
   * no Huffman bit (a Huffman page it meets anyway makes the rows that read it NaN), else its
   * Huffman instance, built without the bit-pack fast path when the mask has no bit-pack bit (a
   * bit-pack page it meets anyway is decoded, more slowly, by the generic path). The CPU reference
   * ignores it. */
  uint32_t codec_mask;

  /* Optional (appended; 0 when unknown): prefixes that groups of the call's sequences share
   * ("cascade" attention, as FlashInfer and vLLM call it). The sequences of a group start with
   * the same blocks (prefix cache hits, forks), and their query rows all sit after them. The CUDA
   * backend then reads each group's prefix once for all the group's rows instead of once per
   * sequence: a first launch over the prefixes, one sequence per group holding all its members'
   * rows (and one of no tokens holding the rows of sequences in no group), a second over each
   * sequence's blocks after its prefix, and the split combine merging both. prefix_seqs: those
   * first-launch sequences (0: no cascade). cascade: 0 never, else whenever prefix_seqs > 0 and
   * the workspace holds two partials (the caller decides whether it pays:
   * kvc_attn_cuda_cascade_pays). Host values: prefix_max_rows (the most rows of one first-launch
   * sequence), prefix_max_tokens (the longest prefix, a multiple of block_tokens),
   * suffix_max_tokens (the most tokens of a sequence after its prefix). Device arrays:
   *   prefix_qo_indptr   [prefix_seqs + 1]  over prefix_rows
   *   prefix_rows        [total_q_rows]     the row of q and out of each first-launch row
   *   prefix_kv_len      [prefix_seqs]      the group's prefix tokens (0: the rows of no group)
   *   prefix_block_start [prefix_seqs]      where a member's table starts in block_ids
   *   suffix_kv_len      [num_seqs]         kv_len[s] minus its group's prefix tokens
   *   suffix_block_start [num_seqs]         block_indptr[s] plus its group's prefix blocks
   * The CPU reference ignores all of these (the result is the same attention). */
  int prefix_seqs;
  int cascade;
  int prefix_max_rows;
  int prefix_max_tokens;
  int suffix_max_tokens;
  const int32_t *prefix_qo_indptr;
  const int32_t *prefix_rows;
  const int32_t *prefix_kv_len;
  const int32_t *prefix_block_start;
  const int32_t *suffix_kv_len;
  const int32_t *suffix_block_start;

  /* CPU reference only (appended; 0: none): bit 1 << KVC_CODEC_x set for each codec whose
   * compressed pages the reference uses exactly, as the codec's float, instead of rounded to
   * `dtype`. The CUDA kernels ignore it (see kvc_attn_cpu for which values each one rounds). */
  uint32_t ref_exact_codecs;

  /* Optional (appended; 0 when unknown): nonzero when few of this layer's pages are expected to
   * be Huffman coded although codec_mask allows them beside bit-pack (a per-page codec policy
   * whose pages came out bit-pack). The CUDA decode kernel v3 then runs in two passes over the
   * same CTAs: its instance without Huffman, where a CTA that meets a Huffman page writes
   * nothing, then its Huffman instance, whose CTAs run only where their pages include one (the
   * others exit). Pass 2 costs ~10-16 us on an H200 even where every CTA exits, so it pays only
   * for launches with enough tokens (kvc_attn_cuda_two_passes_pay). Speed only: either way the
   * result is the same attention. The CPU reference ignores it. */
  int huffman_rare;
} kvc_attn_args_t;

/*
 * Reference: float64 accumulation, pages decoded with the CPU codec, each page once per call; a
 * decoded value is the codec's float rounded to `dtype` (what the cache holds, and what the GPU
 * kernels' tiles hold), or with ref_exact_codecs the codec's float itself.
 * Which one a CUDA kernel uses: v2, v3's Huffman tiles and its generic bit-pack path round each
 * value to `dtype`; v3's bit-pack fast path (kvc_attn_v3.cuh, SRC_FAST) computes with the exact
 * values. Both are within the codec's bound of the data; they differ by the rounding alone, which
 * in bf16 (8 significant bits) can move the output by ~1e-2 relative L2 where keys are large
 * against their steps (every token's rounding of a channel alike). The GPU tests accept either.
 * Also the CPU backend's attention. Takes one scratch allocation per call. Returns KVC_OK,
 * KVC_ERR_INVALID_ARGUMENT (shapes: head_dim a multiple of 8 in 8..256, num_q_heads a multiple of
 * num_kv_heads, CSR arrays inconsistent, a sequence with more query rows than tokens or fewer
 * blocks than its tokens need), KVC_ERR_CORRUPT (a page that fails its checks, or an empty page
 * where a block is needed), KVC_ERR_OUT_OF_HOST_MEMORY. On error `out` is unspecified.
 */
kvc_status_t kvc_attn_cpu(const kvc_attn_args_t *a);

/* Bytes of split-K workspace kvc_attn_cuda needs at most for these limits. */
size_t kvc_attn_cuda_workspace_bytes(int max_q_rows, int num_q_heads, int head_dim, int max_seqs,
                                     int max_seq_len, int block_tokens);

/* Fused CUDA attention; enqueued on `stream` (a cudaStream_t), no sync, no allocation.
 * KVC_OK, KVC_ERR_UNSUPPORTED (head_dim other than 64, 128, 256; dtype; block_tokens not a power
 * of two in 16..128, or 128 at head_dim 256 unless codec_mask is rows alone; a launch of more
 * than 2^31 - 1 CTAs), KVC_ERR_CUDA. Not bitwise reproducible in every launch: in v3's
 * instances whose warps claim work items from a shared counter (its Huffman instance, and units
 * of two bit-pack pages: kvc_attn_v3.cuh, v3_claims) the order the warps arrive in decides which
 * tokens each accumulates, so the fp32 rounding, and at times an output's last bit, can differ
 * between two identical launches. Every other kernel assigns its work statically. */
kvc_status_t kvc_attn_cuda(const kvc_attn_args_t *a, void *stream);

/* The kernel kvc_attn_cuda runs for a's launch without a cascade: 0 v2, 1 v3, 2 v3's Huffman
 * instance, 3 both in two passes (huffman_rare); -1 for shapes it does not take. For tests and
 * benchmarks, which report per kernel. */
int kvc_attn_cuda_kernel(const kvc_attn_args_t *a);

/* Whether the CUDA launcher expects a cascade over a's prefix groups to be faster than every
 * sequence reading its prefix (a: shapes, codec_mask, num_seqs, total_q_rows; host arrays:
 * group_rows and group_tokens [groups] of the groups, seq_rows [num_seqs] query rows of each
 * sequence and seq_group [num_seqs] its group, -1 for none). A cost model from the H200's
 * measurements (attention/kvc_attn_cuda.cu, tile_reads). */
int kvc_attn_cuda_cascade_pays(const kvc_attn_args_t *a, int groups, const int32_t *group_rows,
                               const int32_t *group_tokens, const int32_t *seq_rows,
                               const int32_t *seq_group);

/* Whether the CUDA launcher expects two passes (huffman_rare) to be faster than one launch of v3's
 * instance that takes every codec, over pages that are all bit-pack, for a launch with a's shapes
 * (head_dim, num_kv_heads) that reads kv_tokens tokens in all (the sum of kv_len). One launch
 * costs bit-pack pages 6-96% more time, two passes a fixed ~10-16 us, so two passes pay from
 * ~32k-64k tokens of 8 kv heads, whatever the GQA group (measured on an H200 with groups of 1, 4
 * and 8: attention/kvc_attn_cuda.cu, kTwoPassTokenHeads). */
int kvc_attn_cuda_two_passes_pay(const kvc_attn_args_t *a, int64_t kv_tokens);

#ifdef __cplusplus
}
#endif

#endif /* KVC_ATTN_H */
