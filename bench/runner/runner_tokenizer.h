/*
 * llama2.c-style BPE tokenizer: a vocabulary of byte-string pieces with merge scores.
 *
 * Encoding (as llama2.c's encode()): prepend one space to non-empty text, map every UTF-8 character
 * to its piece; characters without a piece become byte-fallback tokens `<0xNN>` when the vocabulary
 * has all 256 of them (stories260K: id = byte + 3), else the unknown token; then repeatedly merge
 * the adjacent pair whose concatenation is a piece with the highest score (leftmost on ties).
 * Pieces are stored with real spaces: SentencePiece's U+2581 "▁" in GGUF vocabularies is turned
 * into ' ' when loading.
 */
#ifndef KVC_RUNNER_TOKENIZER_H
#define KVC_RUNNER_TOKENIZER_H

#include <stdint.h>

#include "runner_common.h"

typedef struct kvc_runner_vocab {
  int size;            /* number of pieces (ids 0..size-1) */
  char **pieces;       /* [size] NUL-terminated piece bytes (may contain no NUL themselves) */
  int *lens;           /* [size] piece lengths in bytes */
  float *scores;       /* [size] merge scores, higher merges first */
  int bos, eos, unk;   /* special ids; unk may be -1 */
  int byte_base;       /* id of <0x00> when <0x00>..<0xFF> are consecutive pieces, else -1 */
  int max_len;         /* longest piece, bytes */
  int *slots;          /* [slot_cap] open-addressing hash of piece -> id (-1 empty) */
  int slot_cap;        /* a power of two, > 2 * size */
} kvc_runner_vocab_t;

/*
 * Builds a vocabulary from `size` pieces (copied; each pieces[i] is lens[i] bytes, NUL not
 * required) and scores (copied; NULL means all 0). Converts U+2581 to ' '. Returns
 * KVC_ERR_INVALID_ARGUMENT (size < 1, special id out of range), KVC_ERR_OUT_OF_HOST_MEMORY.
 */
kvc_status_t kvc_runner_vocab_init(kvc_runner_vocab_t *v, int size, const char *const *pieces,
                                   const int *lens, const float *scores, int bos, int eos, int unk,
                                   kvc_runner_err_t *err);

/*
 * Loads a llama2.c tokenizer.bin (int32 max_token_length; then per token: float32 score, int32
 * length, bytes) holding exactly `expect_size` tokens (the model's vocabulary). BOS 1, EOS 2,
 * unknown 0. Returns KVC_ERR_INVALID_ARGUMENT (cannot read, size does not match the model),
 * KVC_ERR_CORRUPT (truncated or malformed), KVC_ERR_OUT_OF_HOST_MEMORY.
 */
kvc_status_t kvc_runner_vocab_load_bin(kvc_runner_vocab_t *v, const char *path, int expect_size,
                                       kvc_runner_err_t *err);

void kvc_runner_vocab_free(kvc_runner_vocab_t *v);

/* Id of the piece equal to s[0..len), or -1. Control pieces (bos, eos, unk) are not found. */
int kvc_runner_vocab_lookup(const kvc_runner_vocab_t *v, const char *s, int len);

/*
 * Encodes NUL-terminated `text` into out[cap]: BOS first when `add_bos`. *n is the token count.
 * Returns KVC_ERR_INVALID_ARGUMENT when more than `cap` tokens would be needed (*n is then the
 * count needed), KVC_ERR_OUT_OF_HOST_MEMORY.
 */
kvc_status_t kvc_runner_encode(const kvc_runner_vocab_t *v, const char *text, int add_bos,
                               int32_t *out, int cap, int *n, kvc_runner_err_t *err);

/*
 * The text of `token` following `prev` (llama2.c decode): the leading space of a piece right
 * after BOS is dropped, byte pieces <0xNN> become that byte, BOS and EOS decode to "". Writes
 * into buf[cap] (NUL-terminated) and returns the byte count. Ids out of range decode to "".
 */
int kvc_runner_decode(const kvc_runner_vocab_t *v, int prev, int token, char *buf, int cap);

#endif /* KVC_RUNNER_TOKENIZER_H */
