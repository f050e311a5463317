/* llama2.c-style BPE encode/decode over a hashed vocabulary (see runner_tokenizer.h). */
#include "runner_tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint32_t hash_bytes(const char *s, int len) {
  uint32_t h = 2166136261u; /* FNV-1a */
  for (int i = 0; i < len; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
  return h;
}

static int is_control(const kvc_runner_vocab_t *v, int id) {
  return id == v->bos || id == v->eos || id == v->unk;
}

int kvc_runner_vocab_lookup(const kvc_runner_vocab_t *v, const char *s, int len) {
  if (len <= 0 || len > v->max_len) return -1;
  uint32_t mask = (uint32_t)v->slot_cap - 1;
  for (uint32_t i = hash_bytes(s, len) & mask;; i = (i + 1) & mask) {
    int id = v->slots[i];
    if (id < 0) return -1;
    if (v->lens[id] == len && memcmp(v->pieces[id], s, (size_t)len) == 0) return id;
  }
}

void kvc_runner_vocab_free(kvc_runner_vocab_t *v) {
  if (!v) return;
  if (v->pieces)
    for (int i = 0; i < v->size; i++) free(v->pieces[i]);
  free(v->pieces);
  free(v->lens);
  free(v->scores);
  free(v->slots);
  memset(v, 0, sizeof *v);
}

kvc_status_t kvc_runner_vocab_init(kvc_runner_vocab_t *v, int size, const char *const *pieces,
                                   const int *lens, const float *scores, int bos, int eos, int unk,
                                   kvc_runner_err_t *err) {
  memset(v, 0, sizeof *v);
  if (size < 1 || size > (1 << 24))
    return kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "tokenizer: bad vocabulary size %d", size);
  if (bos < 0 || bos >= size || eos < 0 || eos >= size || unk >= size)
    return kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT,
                           "tokenizer: special token id out of range (bos %d, eos %d, unk %d, "
                           "vocabulary %d)", bos, eos, unk, size);
  v->size = size;
  v->bos = bos;
  v->eos = eos;
  v->unk = unk;
  v->byte_base = -1;
  v->pieces = calloc((size_t)size, sizeof *v->pieces);
  v->lens = calloc((size_t)size, sizeof *v->lens);
  v->scores = calloc((size_t)size, sizeof *v->scores);
  v->slot_cap = 16;
  while (v->slot_cap <= 2 * size) v->slot_cap *= 2;
  v->slots = malloc((size_t)v->slot_cap * sizeof *v->slots);
  if (!v->pieces || !v->lens || !v->scores || !v->slots) goto oom;
  for (int i = 0; i < v->slot_cap; i++) v->slots[i] = -1;
  for (int i = 0; i < size; i++) {
    char *p = malloc((size_t)lens[i] + 1);
    if (!p) goto oom;
    /* SentencePiece writes spaces as U+2581 (E2 96 81); llama2.c pieces hold real spaces. */
    int n = 0;
    for (int j = 0; j < lens[i]; j++) {
      if (j + 2 < lens[i] && (uint8_t)pieces[i][j] == 0xE2 && (uint8_t)pieces[i][j + 1] == 0x96 &&
          (uint8_t)pieces[i][j + 2] == 0x81) {
        p[n++] = ' ';
        j += 2;
      } else {
        p[n++] = pieces[i][j];
      }
    }
    p[n] = 0;
    v->pieces[i] = p;
    v->lens[i] = n;
    v->scores[i] = scores ? scores[i] : 0.0f;
    if (n > v->max_len) v->max_len = n;
  }
  uint32_t mask = (uint32_t)v->slot_cap - 1;
  for (int id = 0; id < size; id++) {
    if (is_control(v, id) || v->lens[id] == 0) continue;
    if (kvc_runner_vocab_lookup(v, v->pieces[id], v->lens[id]) >= 0) continue; /* first id wins */
    uint32_t i = hash_bytes(v->pieces[id], v->lens[id]) & mask;
    while (v->slots[i] >= 0) i = (i + 1) & mask;
    v->slots[i] = id;
  }
  int b0 = kvc_runner_vocab_lookup(v, "<0x00>", 6);
  if (b0 >= 0 && b0 + 255 < size) {
    int ok = 1;
    char want[8];
    for (int b = 0; b < 256 && ok; b++) {
      snprintf(want, sizeof want, "<0x%02X>", b);
      ok = v->lens[b0 + b] == 6 && memcmp(v->pieces[b0 + b], want, 6) == 0;
    }
    if (ok) v->byte_base = b0;
  }
  return KVC_OK;
oom:
  kvc_runner_vocab_free(v);
  return kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "tokenizer: out of memory");
}

static int32_t get_i32(const unsigned char *p) {
  int32_t x;
  memcpy(&x, p, 4);
  return x;
}

kvc_status_t kvc_runner_vocab_load_bin(kvc_runner_vocab_t *v, const char *path, int expect_size,
                                       kvc_runner_err_t *err) {
  unsigned char *data = NULL;
  size_t size = 0;
  char **pieces = NULL;
  int *lens = NULL;
  float *scores = NULL;
  memset(v, 0, sizeof *v);
  kvc_status_t st = kvc_runner_read_file(path, &data, &size, err);
  if (st != KVC_OK) return st;
  /* Count the tokens first: the file has no count, the model's vocabulary size must match it. */
  size_t off = 4;
  int count = 0;
  if (size < 4) {
    st = kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: truncated tokenizer (%zu bytes)", path, size);
    goto out;
  }
  int32_t max_len = get_i32(data);
  if (max_len < 1 || max_len > (1 << 16)) {
    st = kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: bad max_token_length %d: not a llama2.c "
                         "tokenizer.bin", path, max_len);
    goto out;
  }
  while (off < size) {
    if (size - off < 8) break;
    int32_t len = get_i32(data + off + 4);
    if (len < 0 || len > max_len || (size_t)len > size - off - 8) break;
    off += 8 + (size_t)len;
    count++;
  }
  if (off != size) {
    st = kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: truncated or corrupt tokenizer at byte %zu "
                         "(token %d)", path, off, count);
    goto out;
  }
  if (count != expect_size) {
    st = kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "%s: tokenizer has %d tokens but the model's "
                         "vocabulary is %d: tokenizer and model do not match", path, count,
                         expect_size);
    goto out;
  }
  pieces = calloc((size_t)count, sizeof *pieces);
  lens = calloc((size_t)count, sizeof *lens);
  scores = calloc((size_t)count, sizeof *scores);
  if (!pieces || !lens || !scores) {
    st = kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "tokenizer: out of memory");
    goto out;
  }
  off = 4;
  for (int i = 0; i < count; i++) {
    memcpy(&scores[i], data + off, 4);
    lens[i] = get_i32(data + off + 4);
    pieces[i] = (char *)data + off + 8;
    off += 8 + (size_t)lens[i];
  }
  if (count < 3) {
    st = kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "%s: %d tokens, need at least unk/bos/eos",
                         path, count);
    goto out;
  }
  st = kvc_runner_vocab_init(v, count, (const char *const *)pieces, lens, scores, 1, 2, 0, err);
out:
  free(pieces);
  free(lens);
  free(scores);
  free(data);
  return st;
}

/* Byte length of the UTF-8 character starting at s (1 for malformed input, never past the NUL). */
static int utf8_len(const unsigned char *s) {
  int n = s[0] < 0x80 ? 1 : (s[0] >> 5) == 0x6 ? 2 : (s[0] >> 4) == 0xE ? 3 : (s[0] >> 3) == 0x1E ? 4 : 1;
  for (int i = 1; i < n; i++)
    if ((s[i] & 0xC0) != 0x80) return 1;
  return n;
}

kvc_status_t kvc_runner_encode(const kvc_runner_vocab_t *v, const char *text, int add_bos,
                               int32_t *out, int cap, int *n, kvc_runner_err_t *err) {
  size_t tlen = strlen(text);
  int32_t *tok = malloc((tlen + 2) * sizeof *tok);
  char *pair = malloc(2 * (size_t)v->max_len + 1);
  kvc_status_t st = KVC_OK;
  if (!tok || !pair) {
    st = kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "tokenizer: out of memory");
    goto out;
  }
  int nt = 0;
  if (add_bos) tok[nt++] = v->bos;
  int first = nt;
  if (tlen > 0) {
    int sp = kvc_runner_vocab_lookup(v, " ", 1);
    if (sp >= 0) tok[nt++] = sp;
  }
  /* Characters first; bytes without a piece fall back to <0xNN> or the unknown token. */
  const unsigned char *s = (const unsigned char *)text;
  while (*s) {
    int cl = utf8_len(s);
    int id = kvc_runner_vocab_lookup(v, (const char *)s, cl);
    if (id >= 0) {
      tok[nt++] = id;
    } else if (v->byte_base >= 0) {
      for (int i = 0; i < cl; i++) tok[nt++] = v->byte_base + s[i];
    } else if (v->unk >= 0) {
      tok[nt++] = v->unk;
    }
    s += cl;
  }
  /* Merge the best-scoring adjacent pair until none is a piece. */
  for (;;) {
    float best = -1e30f;
    int best_i = -1, best_id = -1;
    for (int i = first; i + 1 < nt; i++) {
      int la = v->lens[tok[i]], lb = v->lens[tok[i + 1]];
      if (la + lb > v->max_len || is_control(v, tok[i]) || is_control(v, tok[i + 1])) continue;
      memcpy(pair, v->pieces[tok[i]], (size_t)la);
      memcpy(pair + la, v->pieces[tok[i + 1]], (size_t)lb);
      int id = kvc_runner_vocab_lookup(v, pair, la + lb);
      if (id >= 0 && v->scores[id] > best) {
        best = v->scores[id];
        best_i = i;
        best_id = id;
      }
    }
    if (best_i < 0) break;
    tok[best_i] = best_id;
    memmove(tok + best_i + 1, tok + best_i + 2, (size_t)(nt - best_i - 2) * sizeof *tok);
    nt--;
  }
  *n = nt;
  if (nt > cap) {
    st = kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "text needs %d tokens, room for %d", nt, cap);
    goto out;
  }
  memcpy(out, tok, (size_t)nt * sizeof *tok);
out:
  free(tok);
  free(pair);
  return st;
}

int kvc_runner_decode(const kvc_runner_vocab_t *v, int prev, int token, char *buf, int cap) {
  if (cap < 1) return 0;
  buf[0] = 0;
  if (token < 0 || token >= v->size || token == v->bos || token == v->eos) return 0;
  int n = 0;
  if (v->byte_base >= 0 && token >= v->byte_base && token < v->byte_base + 256) {
    if (cap < 2) return 0;
    buf[n++] = (char)(token - v->byte_base);
  } else {
    const char *p = v->pieces[token];
    int len = v->lens[token];
    if (prev == v->bos && len > 0 && p[0] == ' ') {
      p++;
      len--;
    }
    n = len < cap - 1 ? len : cap - 1;
    memcpy(buf, p, (size_t)n);
  }
  buf[n] = 0;
  return n;
}
