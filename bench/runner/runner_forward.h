/*
 * The fp32 forward pass of a Llama-architecture model over a batch of sequences: RMSNorm, RoPE on
 * interleaved pairs, GQA attention through a KV backend (runner_kv.h), SwiGLU FFN, classifier.
 *
 * One call is one scheduler step: several sequences, each with its new tokens (a prefill chunk or
 * one decode token). Per step it calls kv->plan once, then kv->store and kv->attend per layer.
 */
#ifndef KVC_RUNNER_FORWARD_H
#define KVC_RUNNER_FORWARD_H

#include "runner_kv.h"
#include "runner_model.h"

/* Scratch for steps of up to cap_tokens new tokens. Not thread-safe; one per driver. */
typedef struct kvc_runner_ctx {
  const kvc_runner_model_t *model; /* borrowed; must outlive the context */
  int cap_tokens;
  float *x, *xb, *xb2;  /* [cap_tokens][dim] */
  float *q, *att;       /* [cap_tokens][n_heads * head_dim] */
  float *k, *v;         /* [cap_tokens][n_kv_heads * head_dim] */
  float *hb, *hb2;      /* [cap_tokens][hidden_dim] */
  float *rope;          /* [max_seq_len][head_dim / 2][2] cos, sin */
  int32_t *positions;   /* [cap_tokens] */
  kvc_seq_id_t *ids;    /* batch copy for plan */
} kvc_runner_ctx_t;

kvc_status_t kvc_runner_ctx_init(kvc_runner_ctx_t *ctx, const kvc_runner_model_t *model,
                                 int cap_tokens, kvc_runner_err_t *err);
void kvc_runner_ctx_free(kvc_runner_ctx_t *ctx);

typedef struct kvc_runner_step {
  int n_seqs;
  const kvc_seq_id_t *seq_ids; /* [n_seqs] */
  const int32_t *n_new;        /* [n_seqs] new tokens of each sequence, >= 1 */
  const int32_t *pos0;         /* [n_seqs] position of each sequence's first new token */
  const int32_t *tokens;       /* [sum n_new] new token ids, sequence after sequence */
  int logits_all;              /* 1: logits of every new token; 0: of each sequence's last */
  int pass_token_ids;          /* 1: hand token ids to plan so completed blocks enter the prefix cache */
  float *logits;               /* out: [rows][vocab_size], rows = sum n_new or n_seqs */
} kvc_runner_step_t;

/*
 * Runs one step. The sequences must exist in `kv` with room reserved for their new tokens.
 * Returns KVC_ERR_INVALID_ARGUMENT (more than cap_tokens tokens, a token id or position out of
 * range) or the KV backend's status (err names the failing call).
 */
kvc_status_t kvc_runner_forward(kvc_runner_ctx_t *ctx, kvc_runner_kv_t *kv,
                                const kvc_runner_step_t *step, kvc_runner_err_t *err);

#endif /* KVC_RUNNER_FORWARD_H */
