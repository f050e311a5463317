/*
 * The evaluation protocol of ../shared/models/README.md and the baselines it compares against.
 *
 * Text: split at blank lines, strip, newlines to spaces, encode each paragraph llama2.c-style (no
 * BOS), concatenate. Window w is [BOS] + stream[w*(L-1) : (w+1)*(L-1)] with L = window_len (256):
 * its first L-1 tokens are fed and the L-1 next-token log-probabilities scored.
 *
 * Feeding: DECODE feeds every window one token per step (all windows of a group batched, one
 * sequence each), so when a query is scored the blocks completed before it are compressed and its
 * own block is exact — what decoding in serving sees. PREFILL feeds each window as one prompt in
 * one step, or in chunks of a given number of tokens per step (chunked prefill). The library
 * compresses a block at the plan after the step that completes it, so a step reads the tokens it
 * stores exactly and earlier steps' completed blocks compressed: a one-step prefill is exact.
 */
#ifndef KVC_RUNNER_EVAL_H
#define KVC_RUNNER_EVAL_H

#include <stdint.h>

#include "runner_forward.h"

/* The protocol's token stream of the text at `path`, encoding paragraphs until at least
 * `min_tokens` (0: the whole text). *tokens is malloc'd. */
kvc_status_t kvc_runner_text_stream(const kvc_runner_vocab_t *vocab, const char *path,
                                    int min_tokens, int32_t **tokens, int *n, kvc_runner_err_t *err);

typedef enum kvc_runner_feed {
  KVC_RUNNER_FEED_DECODE = 0,
  KVC_RUNNER_FEED_PREFILL = 1,
} kvc_runner_feed_t;

typedef struct kvc_runner_ppl_opts {
  int windows;            /* >= 1 */
  int window_len;         /* tokens per window including BOS; default 256 */
  kvc_runner_feed_t feed;
  int group;              /* windows run together (sequences of one batch); default all */
} kvc_runner_ppl_opts_t;

typedef struct kvc_runner_ppl {
  double nll;             /* sum of -log p(target) */
  int64_t n_scored;
  double ppl;             /* exp(nll / n_scored) */
  double top1_text;       /* fraction of targets that are the argmax */
  int32_t *argmax;        /* [windows][window_len - 1] predicted tokens (malloc'd) */
  double page_bytes;      /* kvcomp: page bytes held at the end of each group, summed */
  int64_t full_blocks;    /* blocks full at the end of each group (per layer), summed */
  double seconds;
} kvc_runner_ppl_t;

/* Needs ctx->cap_tokens >= group (decode) or group * (window_len - 1) (prefill) and a stream of
 * windows * (window_len - 1) tokens. Sequence ids 0..group-1 are added and freed in `kv`. */
kvc_status_t kvc_runner_perplexity(kvc_runner_ctx_t *ctx, kvc_runner_kv_t *kv, const int32_t *stream,
                                   int n_stream, const kvc_runner_ppl_opts_t *opts,
                                   kvc_runner_ppl_t *out, kvc_runner_err_t *err);

/* The same with the prefill feed in chunks of `chunk` tokens of each window per step (chunked
 * prefill); 0, or a chunk as long as the window, feeds it in one step. */
kvc_status_t kvc_runner_perplexity_chunked(kvc_runner_ctx_t *ctx, kvc_runner_kv_t *kv,
                                           const int32_t *stream, int n_stream,
                                           const kvc_runner_ppl_opts_t *opts, int chunk,
                                           kvc_runner_ppl_t *out, kvc_runner_err_t *err);

void kvc_runner_ppl_free(kvc_runner_ppl_t *r);

/*
 * Greedy continuation of `prompt` (n_prompt >= 1 tokens, fed in one step) by n_new tokens (one
 * step each) in sequence `id`, added to and freed from `kv`; out[n_new]. Needs ctx->cap_tokens >=
 * n_prompt. Returns KVC_ERR_INVALID_ARGUMENT when prompt and continuation exceed the context.
 */
kvc_status_t kvc_runner_greedy(kvc_runner_ctx_t *ctx, kvc_runner_kv_t *kv, kvc_seq_id_t id,
                               const int32_t *prompt, int n_prompt, int n_new, int32_t *out,
                               kvc_runner_err_t *err);

/* Fraction of positions where a and b (argmax arrays of n) agree. */
double kvc_runner_agreement(const int32_t *a, const int32_t *b, int64_t n);

/*
 * Baselines, as dense-backend block hooks (kvc_runner_block_fn): each rewrites a full block with
 * what its format would give back and counts the bytes that format would store for it.
 */
typedef enum kvc_runner_quant_kind {
  KVC_RUNNER_Q_FP16 = 0,  /* round to fp16 */
  KVC_RUNNER_Q_FP8 = 1,   /* fp8 e4m3 with one scale per layer and tensor (k_scale/v_scale) */
  KVC_RUNNER_Q_KIVI = 2,  /* asymmetric `bits`-bit integers; keys per channel over the block's
                             tokens, values per token over all kv heads; fp16 scale + zero each */
  KVC_RUNNER_Q_AMAX = 3,  /* no change: records each layer's max |K| and |V| (fp8 calibration) */
} kvc_runner_quant_kind_t;

typedef struct kvc_runner_quant {
  kvc_runner_quant_kind_t kind;
  int bits;               /* KIVI: 2..8 */
  int n_layers;
  float *k_amax, *v_amax; /* [n_layers]: FP8 scales are amax / 448; AMAX writes them */
  double bytes;           /* stored bytes of the blocks seen */
  int64_t values;         /* K and V values of the blocks seen */
} kvc_runner_quant_t;

void kvc_runner_quant_block(void *quant, int layer, float *k, float *v, int n_tokens, int n_kv_heads,
                            int head_dim);

/* Round-to-nearest-even fp8 e4m3 (max 448, subnormals below 2^-6) of x, as a float. */
float kvc_runner_round_e4m3(float x);
/* Round-to-nearest-even fp16 of x, as a float. */
float kvc_runner_round_f16(float x);

#endif /* KVC_RUNNER_EVAL_H */
