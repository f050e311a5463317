/*
 * GGUF v3 and llama2.c checkpoint loaders. Every length, count, offset and shape read from a file is
 * checked against the bytes that are really there before it is used, so a truncated or corrupt
 * file is reported, never read out of bounds.
 */
#include "runner_model.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Bounds checked reads over a file image. After the first failure `bad` stays set and every read
 * returns zeros, so parsers check once at the end of a section. */
typedef struct cursor {
  const unsigned char *p;
  size_t size, off;
  int bad;
} cursor_t;

static int cur_read(cursor_t *c, void *dst, size_t n) {
  if (c->bad || n > c->size - c->off) {
    c->bad = 1;
    memset(dst, 0, n);
    return 0;
  }
  memcpy(dst, c->p + c->off, n);
  c->off += n;
  return 1;
}

static uint32_t cur_u32(cursor_t *c) {
  uint32_t x;
  cur_read(c, &x, 4);
  return x;
}

static uint64_t cur_u64(cursor_t *c) {
  uint64_t x;
  cur_read(c, &x, 8);
  return x;
}

static int cur_skip(cursor_t *c, uint64_t n) {
  if (c->bad || n > c->size - c->off) {
    c->bad = 1;
    return 0;
  }
  c->off += (size_t)n;
  return 1;
}

/* A GGUF string: its bytes stay in the file image. */
typedef struct gstr {
  const char *s;
  size_t len;
} gstr_t;

static gstr_t cur_str(cursor_t *c) {
  gstr_t g = {"", 0};
  uint64_t n = cur_u64(c);
  if (c->bad || n > c->size - c->off) {
    c->bad = 1;
    return g;
  }
  g.s = (const char *)c->p + c->off;
  g.len = (size_t)n;
  c->off += (size_t)n;
  return g;
}

static int gstr_eq(gstr_t g, const char *s) { return g.len == strlen(s) && memcmp(g.s, s, g.len) == 0; }

enum {
  GGUF_U8 = 0, GGUF_I8, GGUF_U16, GGUF_I16, GGUF_U32, GGUF_I32, GGUF_F32, GGUF_BOOL, GGUF_STRING,
  GGUF_ARRAY, GGUF_U64, GGUF_I64, GGUF_F64, GGUF_TYPE_COUNT
};

static size_t gguf_scalar_size(uint32_t t) {
  static const size_t sz[GGUF_TYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
  return t < GGUF_TYPE_COUNT ? sz[t] : 0;
}

/* One metadata entry. Scalars are decoded; arrays keep where their elements start. */
typedef struct gkv {
  gstr_t key;
  uint32_t type;
  int64_t i;        /* integer and bool types */
  double f;         /* float types */
  gstr_t str;       /* GGUF_STRING */
  uint32_t elem;    /* GGUF_ARRAY: element type */
  uint64_t count;   /* GGUF_ARRAY: element count */
  size_t elems_off; /* GGUF_ARRAY: offset of the first element */
} gkv_t;

static void skip_value(cursor_t *c, uint32_t type, int depth) {
  if (type == GGUF_STRING) {
    cur_str(c);
  } else if (type == GGUF_ARRAY) {
    uint32_t elem = cur_u32(c);
    uint64_t n = cur_u64(c);
    if (depth > 2 || elem >= GGUF_TYPE_COUNT) {
      c->bad = 1;
      return;
    }
    if (elem != GGUF_STRING && elem != GGUF_ARRAY) {
      uint64_t sz = gguf_scalar_size(elem);
      if (n > (c->size - c->off) / sz) c->bad = 1;
      else cur_skip(c, n * sz);
      return;
    }
    for (uint64_t k = 0; k < n && !c->bad; k++) skip_value(c, elem, depth + 1);
  } else if (type < GGUF_TYPE_COUNT) {
    cur_skip(c, gguf_scalar_size(type));
  } else {
    c->bad = 1;
  }
}

static void read_value(cursor_t *c, gkv_t *kv) {
  uint8_t b[8] = {0};
  switch (kv->type) {
  case GGUF_U8: cur_read(c, b, 1); kv->i = b[0]; break;
  case GGUF_I8: cur_read(c, b, 1); kv->i = (int8_t)b[0]; break;
  case GGUF_BOOL: cur_read(c, b, 1); kv->i = b[0] != 0; break;
  case GGUF_U16: { uint16_t x; cur_read(c, &x, 2); kv->i = x; break; }
  case GGUF_I16: { int16_t x; cur_read(c, &x, 2); kv->i = x; break; }
  case GGUF_U32: kv->i = cur_u32(c); break;
  case GGUF_I32: { int32_t x; cur_read(c, &x, 4); kv->i = x; break; }
  case GGUF_U64: { uint64_t x = cur_u64(c); kv->i = x > INT64_MAX ? -1 : (int64_t)x; break; }
  case GGUF_I64: { int64_t x; cur_read(c, &x, 8); kv->i = x; break; }
  case GGUF_F32: { float x; cur_read(c, &x, 4); kv->f = x; break; }
  case GGUF_F64: cur_read(c, &kv->f, 8); break;
  case GGUF_STRING: kv->str = cur_str(c); break;
  case GGUF_ARRAY: {
    size_t at = c->off;
    kv->elem = cur_u32(c);
    kv->count = cur_u64(c);
    kv->elems_off = c->off;
    c->off = at;
    skip_value(c, GGUF_ARRAY, 0);
    break;
  }
  default: c->bad = 1;
  }
}

static const gkv_t *find_kv(const gkv_t *kvs, uint64_t n, const char *prefix, const char *key) {
  char full[128];
  snprintf(full, sizeof full, "%s%s", prefix, key);
  for (uint64_t i = 0; i < n; i++)
    if (gstr_eq(kvs[i].key, full)) return &kvs[i];
  return NULL;
}

static int is_int_type(uint32_t t) {
  return t <= GGUF_I32 || t == GGUF_BOOL || t == GGUF_U64 || t == GGUF_I64;
}

/* ggml tensor types: the three this runner converts, and names for the others' messages. */
enum { GGML_F32 = 0, GGML_F16 = 1, GGML_BF16 = 30 };

static const char *ggml_type_name(uint32_t t) {
  static const char *names[] = {
      "F32", "F16", "Q4_0", "Q4_1", NULL, NULL, "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K",
      "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S",
      "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M", "BF16", NULL, NULL, NULL,
      "TQ1_0", "TQ2_0", NULL, NULL, NULL, "MXFP4"};
  return t < sizeof names / sizeof names[0] ? names[t] : NULL;
}

typedef struct gtensor {
  gstr_t name;
  uint32_t n_dims;
  uint64_t dims[4];
  uint32_t type;
  uint64_t offset;
  uint64_t n_elems;
} gtensor_t;

static float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else if (exp == 0) {
    float f = ldexpf((float)mant, -24);
    return sign ? -f : f;
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* Where one needed tensor goes and the shape it must have (GGUF order: dims[0] is the row). */
typedef struct want {
  char name[64];
  uint64_t d0, d1; /* d1 = 0 for vectors */
  const float **dst;
  int optional;
} want_t;

static kvc_status_t check_shape(kvc_runner_shape_t *s, const char *path, kvc_runner_err_t *err) {
  if (s->dim < 1 || s->dim > 65536 || s->hidden_dim < 1 || s->hidden_dim > 1 << 20 ||
      s->n_layers < 1 || s->n_layers > 1024 || s->n_heads < 1 || s->n_heads > 4096 ||
      s->n_kv_heads < 1 || s->n_kv_heads > s->n_heads || s->vocab_size < 1 ||
      s->vocab_size > 1 << 22 || s->max_seq_len < 1 || s->max_seq_len > 1 << 24)
    return kvc_runner_fail(err, KVC_ERR_CORRUPT,
                           "%s: implausible model shape (dim %d, hidden %d, layers %d, heads %d, "
                           "kv heads %d, vocab %d, context %d)", path, s->dim, s->hidden_dim,
                           s->n_layers, s->n_heads, s->n_kv_heads, s->vocab_size, s->max_seq_len);
  if (s->dim % s->n_heads != 0 || s->n_heads % s->n_kv_heads != 0 || (s->dim / s->n_heads) % 2)
    return kvc_runner_fail(err, KVC_ERR_CORRUPT,
                           "%s: inconsistent heads: dim %d, %d heads, %d kv heads (need dim a "
                           "multiple of heads, heads a multiple of kv heads, even head_dim)",
                           path, s->dim, s->n_heads, s->n_kv_heads);
  s->head_dim = s->dim / s->n_heads;
  if (!(s->rope_theta > 0) || !(s->norm_eps > 0) || !isfinite(s->rope_theta))
    return kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: bad rope theta %g or norm epsilon %g", path,
                           (double)s->rope_theta, (double)s->norm_eps);
  return KVC_OK;
}

static kvc_status_t alloc_layers(kvc_runner_model_t *m, size_t n_floats, kvc_runner_err_t *err) {
  m->layers = calloc((size_t)m->shape.n_layers, sizeof *m->layers);
  m->weights = malloc(n_floats * sizeof(float));
  if (!m->layers || !m->weights)
    return kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "out of memory for %zu weights",
                           n_floats);
  return KVC_OK;
}

static kvc_status_t check_finite(const float *w, size_t n, const char *what, const char *path,
                                 kvc_runner_err_t *err) {
  for (size_t i = 0; i < n; i++)
    if (!isfinite(w[i]))
      return kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: %s holds a non-finite value at element %zu",
                             path, what, i);
  return KVC_OK;
}

static kvc_status_t load_gguf(kvc_runner_model_t *m, const unsigned char *data, size_t size,
                              const char *path, int want_vocab, kvc_runner_err_t *err) {
  cursor_t c = {data, size, 0, 0};
  gkv_t *kvs = NULL;
  gtensor_t *ts = NULL;
  want_t *wants = NULL;
  char **pieces = NULL;
  int *lens = NULL;
  float *scores = NULL;
  kvc_status_t st = KVC_OK;
  cur_u32(&c); /* magic, checked by the caller */
  uint32_t version = cur_u32(&c);
  uint64_t n_tensors = cur_u64(&c), n_kv = cur_u64(&c);
  if (c.bad) {
    st = kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: truncated GGUF header", path);
    goto out;
  }
  if (version != 3 && version != 2) {
    st = kvc_runner_fail(err, KVC_ERR_UNSUPPORTED, "%s: GGUF version %u (this runner reads 2 and 3)",
                         path, version);
    goto out;
  }
  /* Each entry takes at least 12 bytes (key length + type), each tensor at least 24. */
  if (n_kv > size / 12 || n_tensors > size / 24) {
    st = kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: corrupt GGUF header (%llu metadata entries, "
                         "%llu tensors in %zu bytes)", path, (unsigned long long)n_kv,
                         (unsigned long long)n_tensors, size);
    goto out;
  }
  kvs = calloc(n_kv ? n_kv : 1, sizeof *kvs);
  ts = calloc(n_tensors ? n_tensors : 1, sizeof *ts);
  if (!kvs || !ts) {
    st = kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "out of memory reading %s", path);
    goto out;
  }
  for (uint64_t i = 0; i < n_kv && !c.bad; i++) {
    kvs[i].key = cur_str(&c);
    kvs[i].type = cur_u32(&c);
    if (kvs[i].type >= GGUF_TYPE_COUNT) c.bad = 1;
    else read_value(&c, &kvs[i]);
  }
  if (c.bad) {
    st = kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: truncated or corrupt GGUF metadata at byte %zu",
                         path, c.off);
    goto out;
  }
  for (uint64_t i = 0; i < n_tensors && !c.bad; i++) {
    gtensor_t *t = &ts[i];
    t->name = cur_str(&c);
    t->n_dims = cur_u32(&c);
    if (t->n_dims < 1 || t->n_dims > 4) {
      c.bad = 1;
      break;
    }
    t->n_elems = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
      t->dims[d] = cur_u64(&c);
      if (t->dims[d] == 0 || t->dims[d] > (1ull << 40) / t->n_elems) c.bad = 1;
      else t->n_elems *= t->dims[d];
    }
    t->type = cur_u32(&c);
    t->offset = cur_u64(&c);
  }
  if (c.bad) {
    st = kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: truncated or corrupt GGUF tensor table at byte "
                         "%zu", path, c.off);
    goto out;
  }
  const gkv_t *arch = find_kv(kvs, n_kv, "", "general.architecture");
  if (!arch || arch->type != GGUF_STRING || !gstr_eq(arch->str, "llama")) {
    st = kvc_runner_fail(err, KVC_ERR_UNSUPPORTED, "%s: general.architecture is '%.*s'; this runner "
                         "runs 'llama' models", path, arch && arch->type == GGUF_STRING ?
                         (int)(arch->str.len > 40 ? 40 : arch->str.len) : 7,
                         arch && arch->type == GGUF_STRING ? arch->str.s : "missing");
    goto out;
  }
  uint64_t alignment = 32;
  const gkv_t *al = find_kv(kvs, n_kv, "", "general.alignment");
  if (al) {
    if (!is_int_type(al->type) || al->i < 1 || al->i > 65536 || (al->i & (al->i - 1))) {
      st = kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: bad general.alignment", path);
      goto out;
    }
    alignment = (uint64_t)al->i;
  }
  /* Shape from the metadata. */
  kvc_runner_shape_t *s = &m->shape;
  struct { const char *key; int *dst; int required; } ikeys[] = {
      {"embedding_length", &s->dim, 1},     {"feed_forward_length", &s->hidden_dim, 1},
      {"block_count", &s->n_layers, 1},     {"attention.head_count", &s->n_heads, 1},
      {"attention.head_count_kv", &s->n_kv_heads, 0}, {"context_length", &s->max_seq_len, 1}};
  s->n_kv_heads = 0;
  for (size_t k = 0; k < sizeof ikeys / sizeof ikeys[0]; k++) {
    const gkv_t *kv = find_kv(kvs, n_kv, "llama.", ikeys[k].key);
    if (!kv && !ikeys[k].required) continue;
    if (!kv || !is_int_type(kv->type) || kv->i < 1 || kv->i > (1 << 30)) {
      st = kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: metadata llama.%s %s", path, ikeys[k].key,
                           kv ? "is not a positive integer" : "is missing");
      goto out;
    }
    *ikeys[k].dst = (int)kv->i;
  }
  if (s->n_kv_heads == 0) s->n_kv_heads = s->n_heads;
  s->rope_theta = 10000.0f;
  s->norm_eps = 1e-5f;
  struct { const char *key; float *dst; } fkeys[] = {{"rope.freq_base", &s->rope_theta},
                                                     {"attention.layer_norm_rms_epsilon", &s->norm_eps}};
  for (size_t k = 0; k < 2; k++) {
    const gkv_t *kv = find_kv(kvs, n_kv, "llama.", fkeys[k].key);
    if (!kv) continue;
    if (kv->type != GGUF_F32 && kv->type != GGUF_F64) {
      st = kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: metadata llama.%s is not a float", path,
                           fkeys[k].key);
      goto out;
    }
    *fkeys[k].dst = (float)kv->f;
  }
  /* The vocabulary size is the embedding's row count. */
  const gtensor_t *emb = NULL;
  for (uint64_t i = 0; i < n_tensors; i++)
    if (gstr_eq(ts[i].name, "token_embd.weight")) emb = &ts[i];
  if (!emb || emb->n_dims != 2 || emb->dims[1] > (1u << 22)) {
    st = kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: token_embd.weight %s", path,
                         emb ? "has a bad shape" : "is missing");
    goto out;
  }
  s->vocab_size = (int)emb->dims[1];
  if ((st = check_shape(s, path, err)) != KVC_OK) goto out;
  const gkv_t *rdim = find_kv(kvs, n_kv, "llama.", "rope.dimension_count");
  if (rdim && (!is_int_type(rdim->type) || rdim->i != s->head_dim)) {
    st = kvc_runner_fail(err, KVC_ERR_UNSUPPORTED, "%s: rope.dimension_count %lld != head_dim %d "
                         "(partial rotary embeddings are not supported)", path,
                         (long long)rdim->i, s->head_dim);
    goto out;
  }
  size_t data_start = (size_t)((c.off + alignment - 1) / alignment * alignment);
  if (data_start > size) {
    st = kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: truncated before the tensor data", path);
    goto out;
  }
  /* The tensors this runner needs, with the shapes the metadata implies. */
  int L = s->n_layers, qd = s->n_heads * s->head_dim, kvd = s->n_kv_heads * s->head_dim;
  size_t n_wants = 3 + 9 * (size_t)L;
  wants = calloc(n_wants, sizeof *wants);
  m->layers = calloc((size_t)L, sizeof *m->layers);
  if (!wants || !m->layers) {
    st = kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "out of memory reading %s", path);
    goto out;
  }
  const float *unused_output = NULL;
  size_t w = 0;
  wants[w++] = (want_t){"token_embd.weight", (uint64_t)s->dim, (uint64_t)s->vocab_size, &m->tok_emb, 0};
  wants[w++] = (want_t){"output_norm.weight", (uint64_t)s->dim, 0, &m->final_norm, 0};
  wants[w++] = (want_t){"output.weight", (uint64_t)s->dim, (uint64_t)s->vocab_size, &unused_output, 1};
  for (int l = 0; l < L; l++) {
    kvc_runner_layer_t *ly = &m->layers[l];
    struct { const char *n; uint64_t d0, d1; const float **dst; } per[9] = {
        {"attn_norm", (uint64_t)s->dim, 0, &ly->attn_norm},
        {"attn_q", (uint64_t)s->dim, (uint64_t)qd, &ly->wq},
        {"attn_k", (uint64_t)s->dim, (uint64_t)kvd, &ly->wk},
        {"attn_v", (uint64_t)s->dim, (uint64_t)kvd, &ly->wv},
        {"attn_output", (uint64_t)qd, (uint64_t)s->dim, &ly->wo},
        {"ffn_norm", (uint64_t)s->dim, 0, &ly->ffn_norm},
        {"ffn_gate", (uint64_t)s->dim, (uint64_t)s->hidden_dim, &ly->w_gate},
        {"ffn_down", (uint64_t)s->hidden_dim, (uint64_t)s->dim, &ly->w_down},
        {"ffn_up", (uint64_t)s->dim, (uint64_t)s->hidden_dim, &ly->w_up}};
    for (int k = 0; k < 9; k++) {
      snprintf(wants[w].name, sizeof wants[w].name, "blk.%d.%s.weight", l, per[k].n);
      wants[w].d0 = per[k].d0;
      wants[w].d1 = per[k].d1;
      wants[w].dst = per[k].dst;
      w++;
    }
  }
  const gtensor_t **found = calloc(n_wants, sizeof *found);
  if (!found) {
    st = kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "out of memory reading %s", path);
    goto out;
  }
  size_t total = 0;
  for (size_t k = 0; k < n_wants && st == KVC_OK; k++) {
    for (uint64_t i = 0; i < n_tensors; i++) {
      if (!gstr_eq(ts[i].name, wants[k].name)) continue;
      if (found[k]) {
        st = kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: tensor %s appears twice", path, wants[k].name);
        break;
      }
      found[k] = &ts[i];
    }
    if (st != KVC_OK) break;
    const gtensor_t *t = found[k];
    if (!t) {
      if (!wants[k].optional)
        st = kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: tensor %s is missing", path, wants[k].name);
      continue;
    }
    int dims_ok = wants[k].d1 ? (t->n_dims == 2 && t->dims[0] == wants[k].d0 && t->dims[1] == wants[k].d1)
                              : (t->n_dims == 1 && t->dims[0] == wants[k].d0);
    if (!dims_ok) {
      st = kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: tensor %s has shape [%llu%s%llu], expected "
                           "[%llu%s%llu] from the metadata", path, wants[k].name,
                           (unsigned long long)t->dims[0], t->n_dims > 1 ? ", " : "",
                           t->n_dims > 1 ? (unsigned long long)t->dims[1] : 0ull,
                           (unsigned long long)wants[k].d0, wants[k].d1 ? ", " : "",
                           (unsigned long long)wants[k].d1);
      break;
    }
    size_t esize = t->type == GGML_F32 ? 4 : (t->type == GGML_F16 || t->type == GGML_BF16) ? 2 : 0;
    if (!esize) {
      const char *tn = ggml_type_name(t->type);
      if (tn)
        st = kvc_runner_fail(err, KVC_ERR_UNSUPPORTED, "%s: tensor %s has type %s; this runner reads "
                             "F32, F16 and BF16 tensors only", path, wants[k].name, tn);
      else
        st = kvc_runner_fail(err, KVC_ERR_UNSUPPORTED, "%s: tensor %s has unknown ggml type %u", path,
                             wants[k].name, t->type);
      break;
    }
    uint64_t avail = size - data_start;
    if (t->offset > avail || t->n_elems * esize > avail - t->offset) {
      st = kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: tensor %s (%llu bytes at data offset %llu) "
                           "runs past the end of the file: truncated?", path, wants[k].name,
                           (unsigned long long)(t->n_elems * esize), (unsigned long long)t->offset);
      break;
    }
    total += (size_t)t->n_elems;
  }
  if (st == KVC_OK) {
    m->weights = malloc(total * sizeof(float));
    if (!m->weights) st = kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "out of memory for weights");
  }
  size_t at = 0;
  for (size_t k = 0; k < n_wants && st == KVC_OK; k++) {
    const gtensor_t *t = found[k];
    if (!t) continue;
    const unsigned char *src = data + data_start + t->offset;
    float *dst = m->weights + at;
    for (uint64_t e = 0; e < t->n_elems; e++) {
      if (t->type == GGML_F32) {
        memcpy(&dst[e], src + 4 * e, 4);
      } else {
        uint16_t h;
        memcpy(&h, src + 2 * e, 2);
        if (t->type == GGML_F16) {
          dst[e] = half_to_float(h);
        } else {
          uint32_t bits = (uint32_t)h << 16;
          memcpy(&dst[e], &bits, 4);
        }
      }
    }
    st = check_finite(dst, (size_t)t->n_elems, wants[k].name, path, err);
    *wants[k].dst = dst;
    at += (size_t)t->n_elems;
  }
  free(found);
  if (st != KVC_OK) goto out;
  m->classifier = unused_output ? unused_output : m->tok_emb;

  if (!want_vocab) goto out;
  /* The tokenizer in the metadata. */
  const gkv_t *tmodel = find_kv(kvs, n_kv, "", "tokenizer.ggml.model");
  if (tmodel && (tmodel->type != GGUF_STRING || !gstr_eq(tmodel->str, "llama"))) {
    st = kvc_runner_fail(err, KVC_ERR_UNSUPPORTED, "%s: tokenizer.ggml.model is not 'llama' "
                         "(SentencePiece BPE); pass a llama2.c --tokenizer", path);
    goto out;
  }
  const gkv_t *toks = find_kv(kvs, n_kv, "", "tokenizer.ggml.tokens");
  const gkv_t *sc = find_kv(kvs, n_kv, "", "tokenizer.ggml.scores");
  if (!toks || toks->type != GGUF_ARRAY || toks->elem != GGUF_STRING) {
    st = kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "%s: no tokenizer.ggml.tokens in the "
                         "metadata; pass --tokenizer", path);
    goto out;
  }
  if (toks->count != (uint64_t)s->vocab_size) {
    st = kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "%s: tokenizer has %llu tokens but the "
                         "model's vocabulary is %d: tokenizer and model do not match", path,
                         (unsigned long long)toks->count, s->vocab_size);
    goto out;
  }
  if (sc && (sc->type != GGUF_ARRAY || sc->elem != GGUF_F32 || sc->count != toks->count)) {
    st = kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: tokenizer.ggml.scores is not %llu float32s",
                         path, (unsigned long long)toks->count);
    goto out;
  }
  int nv = s->vocab_size;
  pieces = calloc((size_t)nv, sizeof *pieces);
  lens = calloc((size_t)nv, sizeof *lens);
  scores = calloc((size_t)nv, sizeof *scores);
  if (!pieces || !lens || !scores) {
    st = kvc_runner_fail(err, KVC_ERR_OUT_OF_HOST_MEMORY, "out of memory reading the tokenizer");
    goto out;
  }
  cursor_t tc = {data, size, toks->elems_off, 0};
  for (int i = 0; i < nv; i++) {
    gstr_t g = cur_str(&tc);
    if (g.len > 4096) tc.bad = 1;
    pieces[i] = (char *)g.s;
    lens[i] = (int)g.len;
  }
  if (sc) {
    cursor_t scur = {data, size, sc->elems_off, 0};
    for (int i = 0; i < nv; i++) cur_read(&scur, &scores[i], 4);
    tc.bad |= scur.bad;
  }
  if (tc.bad) {
    st = kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: corrupt tokenizer metadata", path);
    goto out;
  }
  int special[3] = {1, 2, 0};
  const char *special_keys[3] = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                 "tokenizer.ggml.unknown_token_id"};
  for (int k = 0; k < 3; k++) {
    const gkv_t *kv = find_kv(kvs, n_kv, "", special_keys[k]);
    if (kv && is_int_type(kv->type)) special[k] = kv->i >= 0 && kv->i < nv ? (int)kv->i : -1;
  }
  if (special[0] < 0 || special[1] < 0) {
    st = kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: BOS/EOS token id out of the vocabulary", path);
    goto out;
  }
  st = kvc_runner_vocab_init(&m->vocab, nv, (const char *const *)pieces, lens, sc ? scores : NULL,
                             special[0], special[1], special[2], err);
out:
  free(kvs);
  free(ts);
  free(wants);
  free(pieces);
  free(lens);
  free(scores);
  return st;
}

static kvc_status_t load_llama2c(kvc_runner_model_t *m, const unsigned char *data, size_t size,
                                 const char *path, kvc_runner_err_t *err) {
  int32_t h[7];
  if (size < sizeof h)
    return kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: %zu bytes: neither a GGUF file nor a llama2.c "
                           "checkpoint (truncated header)", path, size);
  memcpy(h, data, sizeof h);
  kvc_runner_shape_t *s = &m->shape;
  s->dim = h[0];
  s->hidden_dim = h[1];
  s->n_layers = h[2];
  s->n_heads = h[3];
  s->n_kv_heads = h[4];
  int shared = h[5] > 0; /* llama2.c: a negative vocabulary size means a separate classifier */
  s->vocab_size = h[5] == INT32_MIN ? 0 : abs(h[5]);
  s->max_seq_len = h[6];
  s->rope_theta = 10000.0f;
  s->norm_eps = 1e-5f;
  kvc_status_t st = check_shape(s, path, err);
  if (st != KVC_OK) return st;
  size_t D = (size_t)s->dim, Hd = (size_t)s->hidden_dim, L = (size_t)s->n_layers;
  size_t kvd = (size_t)s->n_kv_heads * (size_t)s->head_dim, V = (size_t)s->vocab_size;
  size_t n_weights = V * D + L * (D + D * D + 2 * D * kvd + D * D + D + 3 * D * Hd) + D;
  size_t n_freq = (size_t)s->max_seq_len * (size_t)s->head_dim; /* freq_cis real + imag, unused */
  size_t n_floats = n_weights + n_freq + (shared ? 0 : V * D);
  size_t expect = sizeof h + 4 * n_floats;
  if (size != expect)
    return kvc_runner_fail(err, KVC_ERR_CORRUPT, "%s: llama2.c checkpoint of dim %d, %d layers, "
                           "vocab %d should be %zu bytes but the file has %zu: %s", path, s->dim,
                           s->n_layers, s->vocab_size, expect, size,
                           size < expect ? "truncated" : "corrupt or not a llama2.c checkpoint");
  if ((st = alloc_layers(m, n_weights + (shared ? 0 : V * D), err)) != KVC_OK) return st;
  const unsigned char *src = data + sizeof h;
  memcpy(m->weights, src, n_weights * sizeof(float));
  if (!shared) memcpy(m->weights + n_weights, src + 4 * (n_weights + n_freq), V * D * sizeof(float));
  if ((st = check_finite(m->weights, n_weights + (shared ? 0 : V * D), "a weight", path, err)) != KVC_OK)
    return st;
  const float *p = m->weights;
  m->tok_emb = p;
  p += V * D;
  const float *rms_att = p; p += L * D;
  const float *wq = p; p += L * D * D;
  const float *wk = p; p += L * D * kvd;
  const float *wv = p; p += L * D * kvd;
  const float *wo = p; p += L * D * D;
  const float *rms_ffn = p; p += L * D;
  const float *w1 = p; p += L * D * Hd;
  const float *w2 = p; p += L * D * Hd;
  const float *w3 = p; p += L * D * Hd;
  m->final_norm = p;
  m->classifier = shared ? m->tok_emb : m->weights + n_weights;
  for (size_t l = 0; l < L; l++) {
    kvc_runner_layer_t *ly = &m->layers[l];
    ly->attn_norm = rms_att + l * D;
    ly->wq = wq + l * D * D;
    ly->wk = wk + l * D * kvd;
    ly->wv = wv + l * D * kvd;
    ly->wo = wo + l * D * D;
    ly->ffn_norm = rms_ffn + l * D;
    ly->w_gate = w1 + l * D * Hd;
    ly->w_down = w2 + l * D * Hd;
    ly->w_up = w3 + l * D * Hd;
  }
  return KVC_OK;
}

void kvc_runner_model_free(kvc_runner_model_t *m) {
  if (!m) return;
  free(m->layers);
  free(m->weights);
  kvc_runner_vocab_free(&m->vocab);
  memset(m, 0, sizeof *m);
}

kvc_status_t kvc_runner_model_load(kvc_runner_model_t *m, const char *model_path,
                                   const char *tokenizer_path, kvc_runner_err_t *err) {
  unsigned char *data = NULL;
  size_t size = 0;
  memset(m, 0, sizeof *m);
  kvc_status_t st = kvc_runner_read_file(model_path, &data, &size, err);
  if (st != KVC_OK) return st;
  int is_gguf = size >= 4 && memcmp(data, "GGUF", 4) == 0;
  if (is_gguf) {
    m->format = "gguf";
    st = load_gguf(m, data, size, model_path, tokenizer_path == NULL, err);
  } else {
    m->format = "llama2c";
    st = load_llama2c(m, data, size, model_path, err);
  }
  free(data);
  if (st == KVC_OK && m->vocab.size == 0) {
    char guess[4096];
    const char *tp = tokenizer_path;
    if (!tp) {
      size_t n = strlen(model_path);
      if (n > 4 && strcmp(model_path + n - 4, ".bin") == 0 && n + 16 < sizeof guess) {
        snprintf(guess, sizeof guess, "%.*s.tokenizer.bin", (int)(n - 4), model_path);
        tp = guess;
      } else {
        st = kvc_runner_fail(err, KVC_ERR_INVALID_ARGUMENT, "%s: no tokenizer in the model; pass "
                             "--tokenizer FILE", model_path);
      }
    }
    if (tp) st = kvc_runner_vocab_load_bin(&m->vocab, tp, m->shape.vocab_size, err);
  }
  if (st != KVC_OK) kvc_runner_model_free(m);
  if (st == KVC_OK) m->format = is_gguf ? "gguf" : "llama2c";
  return st;
}
