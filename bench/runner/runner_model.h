/*
 * Llama-architecture model weights and their loaders: GGUF v3 (llama architecture; F32, F16 or
 * BF16 tensors; tokenizer in the metadata) and llama2.c legacy checkpoints (7 x int32 header, fp32
 * weights in llama2.c order) with a separate tokenizer.bin.
 *
 * All weights are converted to fp32 into one buffer the model owns. Matrices are row-major
 * [out][in] (GGUF dims are [in, out]); q/k rows are in the interleaved-pair RoPE order of
 * llama.cpp and llama2.c (dimension pairs (2i, 2i+1) are rotated together).
 */
#ifndef KVC_RUNNER_MODEL_H
#define KVC_RUNNER_MODEL_H

#include "runner_common.h"
#include "runner_tokenizer.h"

typedef struct kvc_runner_shape {
  int dim;          /* residual width */
  int hidden_dim;   /* SwiGLU width */
  int n_layers;
  int n_heads;      /* query heads */
  int n_kv_heads;   /* key/value heads (GQA when fewer than n_heads) */
  int head_dim;     /* dim / n_heads */
  int vocab_size;
  int max_seq_len;  /* the model's context length */
  float rope_theta; /* default 10000 */
  float norm_eps;   /* RMSNorm epsilon, default 1e-5 */
} kvc_runner_shape_t;

typedef struct kvc_runner_layer {
  const float *attn_norm; /* [dim] */
  const float *wq;        /* [n_heads * head_dim][dim] */
  const float *wk;        /* [n_kv_heads * head_dim][dim] */
  const float *wv;        /* [n_kv_heads * head_dim][dim] */
  const float *wo;        /* [dim][n_heads * head_dim] */
  const float *ffn_norm;  /* [dim] */
  const float *w_gate;    /* [hidden_dim][dim]   (llama2.c w1) */
  const float *w_down;    /* [dim][hidden_dim]   (llama2.c w2) */
  const float *w_up;      /* [hidden_dim][dim]   (llama2.c w3) */
} kvc_runner_layer_t;

typedef struct kvc_runner_model {
  kvc_runner_shape_t shape;
  const float *tok_emb;        /* [vocab_size][dim] */
  const float *final_norm;     /* [dim] */
  const float *classifier;     /* [vocab_size][dim]; tok_emb when the embeddings are tied */
  kvc_runner_layer_t *layers;  /* [n_layers] */
  float *weights;              /* owns every tensor above */
  kvc_runner_vocab_t vocab;    /* size 0 until a tokenizer is loaded */
  const char *format;          /* "gguf" or "llama2c" */
} kvc_runner_model_t;

/*
 * Loads `model_path` (GGUF when it starts with the GGUF magic, else a llama2.c checkpoint). The
 * tokenizer comes from `tokenizer_path` when not NULL (llama2.c tokenizer.bin), else from the GGUF
 * metadata, else from "<model without .bin>.tokenizer.bin" beside a llama2.c checkpoint.
 * Everything is validated; on failure *m is left empty and err says why:
 * KVC_ERR_INVALID_ARGUMENT (cannot open, tokenizer does not match the model, no tokenizer),
 * KVC_ERR_CORRUPT (truncated, bad magic/version, inconsistent shapes or offsets),
 * KVC_ERR_UNSUPPORTED (tensor type or architecture this runner cannot run),
 * KVC_ERR_OUT_OF_HOST_MEMORY.
 */
kvc_status_t kvc_runner_model_load(kvc_runner_model_t *m, const char *model_path,
                                   const char *tokenizer_path, kvc_runner_err_t *err);

void kvc_runner_model_free(kvc_runner_model_t *m);

#endif /* KVC_RUNNER_MODEL_H */
