/*
 * The CPU attention reference, also the CPU backend's production path.
 *
 * For each sequence the pages are visited in order and each is decoded exactly once into a float
 * tile (all kv heads, K and V); every query row of the sequence then folds that tile into its
 * running softmax state (max, sum, weighted V) in float64. One scratch allocation per call holds
 * the page bytes (a compressed page is gathered from its chunks into one contiguous buffer, which
 * is what the codec's decoder reads), the decoded tile and the per-row state.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attention/kvc_attn.h"
#include "compress/kvc_codec.h"
#include "compress/kvc_page_format.h"

static size_t kvc__dtype_bytes(kvc_dtype_t t) { return t == KVC_DTYPE_F32 ? 4 : 2; }

/* n elements of dtype `t` at src -> float. */
static void kvc__load_row(kvc_dtype_t t, const uint8_t *src, int n, float *dst) {
  if (t == KVC_DTYPE_F32) {
    memcpy(dst, src, (size_t)n * 4);
    return;
  }
  for (int i = 0; i < n; i++) {
    uint16_t h;
    memcpy(&h, src + 2 * (size_t)i, 2);
    dst[i] = t == KVC_DTYPE_F16 ? kvc_codec_f16_to_f32(h) : kvc_codec_bf16_to_f32(h);
  }
}

static void kvc__store_row(kvc_dtype_t t, const double *src, double inv, int n, uint8_t *dst) {
  for (int i = 0; i < n; i++) {
    float f = (float)(src[i] * inv);
    if (t == KVC_DTYPE_F32) {
      memcpy(dst + 4 * (size_t)i, &f, 4);
    } else {
      uint16_t h = t == KVC_DTYPE_F16 ? kvc_codec_f32_to_f16(f) : kvc_codec_f32_to_bf16(f);
      memcpy(dst + 2 * (size_t)i, &h, 2);
    }
  }
}

static kvc_status_t kvc__check_args(const kvc_attn_args_t *a) {
  if (!a) return KVC_ERR_INVALID_ARGUMENT;
  if (a->num_kv_heads < 1 || a->num_q_heads < a->num_kv_heads ||
      a->num_q_heads % a->num_kv_heads != 0)
    return KVC_ERR_INVALID_ARGUMENT;
  if (a->head_dim < 8 || a->head_dim > 256 || a->head_dim % 8 != 0) return KVC_ERR_INVALID_ARGUMENT;
  if (a->block_tokens < 1 || a->block_tokens > 4096) return KVC_ERR_INVALID_ARGUMENT;
  if (a->dtype != KVC_DTYPE_F16 && a->dtype != KVC_DTYPE_BF16 && a->dtype != KVC_DTYPE_F32)
    return KVC_ERR_INVALID_ARGUMENT;
  if (!isfinite(a->scale)) return KVC_ERR_INVALID_ARGUMENT;
  if (a->num_seqs < 0 || a->total_q_rows < 0) return KVC_ERR_INVALID_ARGUMENT;
  if (a->num_seqs == 0) return a->total_q_rows == 0 ? KVC_OK : KVC_ERR_INVALID_ARGUMENT;
  if (!a->qo_indptr || !a->kv_len || !a->block_indptr || !a->block_ids || !a->dir || !a->pool ||
      !a->q || !a->out || a->chunk_bytes == 0)
    return KVC_ERR_INVALID_ARGUMENT;
  if (a->qo_indptr[0] != 0 || a->qo_indptr[a->num_seqs] != a->total_q_rows ||
      a->block_indptr[0] != 0)
    return KVC_ERR_INVALID_ARGUMENT;
  for (int s = 0; s < a->num_seqs; s++) {
    int nq = a->qo_indptr[s + 1] - a->qo_indptr[s];
    int64_t nb = (int64_t)a->block_indptr[s + 1] - a->block_indptr[s];
    if (nq < 0 || a->kv_len[s] < nq || nb < 0) return KVC_ERR_INVALID_ARGUMENT;
    if (nb * a->block_tokens < a->kv_len[s]) return KVC_ERR_INVALID_ARGUMENT;
    if (a->kv_len[s] > a->max_kv_len) return KVC_ERR_INVALID_ARGUMENT;
  }
  return KVC_OK;
}

/* The page entry of block j of sequence s. */
static const kvc_page_entry_t *kvc__entry(const kvc_attn_args_t *a, int s, int j) {
  return &a->dir[a->block_ids[a->block_indptr[s] + j]];
}

/* Bytes of the pool a page entry may legitimately describe, or 0 when the entry is malformed. */
static uint32_t kvc__entry_bytes(const kvc_attn_args_t *a, const kvc_page_entry_t *e) {
  if (e->nchunks > KVC_PAGE_MAX_CHUNKS || e->nbytes == 0 ||
      (uint64_t)kvc_page_start(e, a->chunk_bytes) + e->nbytes >
          (uint64_t)e->nchunks * a->chunk_bytes)
    return 0;
  return e->nbytes;
}

/* Copies page bytes [off, off + n) to dst chunk by chunk: a compressed page lies in several, and
 * a staging row whose size is not a power of two (a head_dim like 24 or 96) may straddle two. */
static void kvc__page_copy(const kvc_attn_args_t *a, const kvc_page_entry_t *e, uint32_t off,
                           uint32_t n, uint8_t *dst) {
  uint8_t *pool = (uint8_t *)a->pool; /* kvc_page_byte only computes an address; we only read */
  for (uint32_t len; n > 0; off += len, dst += len, n -= len) {
    const uint32_t room = kvc_page_run(e, a->chunk_bytes, off);
    len = n < room ? n : room;
    memcpy(dst, kvc_page_byte(pool, a->chunk_bytes, e, off), len);
  }
}

/*
 * Decodes the first n tokens of a page into k_out, v_out [num_kv_heads][block_tokens][head_dim].
 * `gather` has room for the largest compressed page of the call.
 */
static kvc_status_t kvc__decode_page(const kvc_attn_args_t *a, const kvc_page_entry_t *e, int n,
                                     uint8_t *gather, float *k_out, float *v_out) {
  const int hd = a->head_dim, bt = a->block_tokens, kvh = a->num_kv_heads;
  uint32_t nbytes = kvc__entry_bytes(a, e);
  if (nbytes == 0) return KVC_ERR_CORRUPT;

  if (e->kind == KVC_PAGE_STAGING) {
    const uint32_t row_bytes = (uint32_t)hd * (uint32_t)kvc__dtype_bytes(a->dtype);
    uint8_t row[KVC_FMT_MAX_HEAD_DIM * 4];
    if ((uint64_t)nbytes < 2ull * (uint64_t)kvh * (uint64_t)bt * row_bytes) return KVC_ERR_CORRUPT;
    for (int tensor = 0; tensor < 2; tensor++) {
      float *dst = tensor == 0 ? k_out : v_out;
      for (int h = 0; h < kvh; h++)
        for (int t = 0; t < n; t++) {
          kvc__page_copy(a, e, kvc_staging_row_offset(tensor, h, t, kvh, bt, (int)row_bytes),
                         row_bytes, row);
          kvc__load_row(a->dtype, row, hd, dst + ((size_t)h * bt + t) * hd);
        }
    }
    return KVC_OK;
  }
  if (e->kind != KVC_PAGE_COMPRESSED) return KVC_ERR_CORRUPT;

  kvc__page_copy(a, e, 0, nbytes, gather);
  kvc_page_info_t info;
  if (kvc_codec_page_info(gather, nbytes, &info) != KVC_OK) return KVC_ERR_CORRUPT;
  if ((int)info.codec != e->codec || info.num_kv_heads != kvh || info.head_dim != hd ||
      info.n_tokens < n || info.n_tokens > bt)
    return KVC_ERR_CORRUPT;
  /* decode_head writes n_tokens rows; the tile has block_tokens rows per head. A decoded value is
   * what the cache's dtype holds: the codec's float rounded once to f16/bf16, as the GPU's
   * tiles, unless the caller asks for this codec's floats as they are. */
  const int exact = e->codec < 32 && ((a->ref_exact_codecs >> e->codec) & 1u);
  for (int tensor = 0; tensor < 2; tensor++) {
    float *dst = tensor == 0 ? k_out : v_out;
    for (int h = 0; h < kvh; h++) {
      float *rows = dst + (size_t)h * bt * hd;
      kvc_status_t st = kvc_codec_decode_head(gather, nbytes, tensor, h, rows);
      if (st != KVC_OK) return KVC_ERR_CORRUPT;
      if (exact) continue;
      if (a->dtype == KVC_DTYPE_F16)
        for (size_t i = 0; i < (size_t)n * hd; i++)
          rows[i] = kvc_codec_f16_to_f32(kvc_codec_f32_to_f16(rows[i]));
      else if (a->dtype == KVC_DTYPE_BF16)
        for (size_t i = 0; i < (size_t)n * hd; i++)
          rows[i] = kvc_codec_bf16_to_f32(kvc_codec_f32_to_bf16(rows[i]));
    }
  }
  return KVC_OK;
}

/* Per (query row, query head) running state: m, l, then head_dim accumulators. */
static size_t kvc__state_doubles(int hd) { return 2 + (size_t)hd; }

kvc_status_t kvc_attn_cpu(const kvc_attn_args_t *a) {
  kvc_status_t st = kvc__check_args(a);
  if (st != KVC_OK || a->num_seqs == 0) return st;

  const int hq = a->num_q_heads, kvh = a->num_kv_heads, hd = a->head_dim, bt = a->block_tokens;
  const int group = hq / kvh;
  const size_t esz = kvc__dtype_bytes(a->dtype);

  /* Pre-pass: the largest compressed page and query window, for the one scratch allocation. */
  uint32_t max_gather = 0;
  int max_nq = 0;
  for (int s = 0; s < a->num_seqs; s++) {
    int nq = a->qo_indptr[s + 1] - a->qo_indptr[s];
    if (nq > max_nq) max_nq = nq;
    if (nq == 0) continue;
    int nblocks = (a->kv_len[s] + bt - 1) / bt;
    for (int j = 0; j < nblocks; j++) {
      const kvc_page_entry_t *e = kvc__entry(a, s, j);
      if (e->kind == KVC_PAGE_COMPRESSED && kvc__entry_bytes(a, e) > max_gather)
        max_gather = kvc__entry_bytes(a, e);
    }
  }
  if (max_nq == 0) return KVC_OK;

  size_t tile_floats = (size_t)kvh * bt * hd;                /* one of K, V */
  size_t q_doubles = (size_t)max_nq * hq * hd;                /* scaled queries */
  size_t state_doubles = (size_t)max_nq * hq * kvc__state_doubles(hd);
  size_t bytes = (q_doubles + state_doubles + (size_t)bt) * sizeof(double) +
                 2 * tile_floats * sizeof(float) + (size_t)hd * sizeof(float) + max_gather;
  double *scratch = malloc(bytes);
  if (!scratch) return KVC_ERR_OUT_OF_HOST_MEMORY;
  double *qd = scratch;                      /* [max_nq][hq][hd] */
  double *state = qd + q_doubles;            /* [max_nq][hq][2 + hd] */
  double *scores = state + state_doubles;    /* [bt] */
  float *ktile = (float *)(scores + bt);     /* [kvh][bt][hd] */
  float *vtile = ktile + tile_floats;        /* [kvh][bt][hd] */
  float *qrow = vtile + tile_floats;         /* [hd] */
  uint8_t *gather = (uint8_t *)(qrow + hd);  /* [max_gather] */

  const uint8_t *q = a->q;
  uint8_t *out = a->out;
  for (int s = 0; s < a->num_seqs && st == KVC_OK; s++) {
    const int row0 = a->qo_indptr[s], nq = a->qo_indptr[s + 1] - row0, len = a->kv_len[s];
    if (nq == 0) continue;
    const int pos0 = len - nq; /* position of the sequence's first query row */

    for (int r = 0; r < nq; r++)
      for (int h = 0; h < hq; h++) {
        size_t qi = ((size_t)(row0 + r) * hq + h) * hd;
        kvc__load_row(a->dtype, q + qi * esz, hd, qrow);
        double *qdst = qd + ((size_t)r * hq + h) * hd;
        for (int d = 0; d < hd; d++) qdst[d] = (double)qrow[d] * (double)a->scale;
        double *sv = state + ((size_t)r * hq + h) * kvc__state_doubles(hd);
        sv[0] = -INFINITY;
        memset(sv + 1, 0, (1 + (size_t)hd) * sizeof(double));
      }

    const int nblocks = (len + bt - 1) / bt;
    for (int j = 0; j < nblocks; j++) {
      const int start = j * bt, n = len - start < bt ? len - start : bt;
      st = kvc__decode_page(a, kvc__entry(a, s, j), n, gather, ktile, vtile);
      if (st != KVC_OK) break;
      for (int r = 0; r < nq; r++) {
        int visible = pos0 + r - start + 1; /* causal: tokens start .. pos0 + r */
        int nt = visible < n ? visible : n;
        if (nt <= 0) continue;
        for (int h = 0; h < hq; h++) {
          const float *kh = ktile + (size_t)(h / group) * bt * hd;
          const float *vh = vtile + (size_t)(h / group) * bt * hd;
          const double *qv = qd + ((size_t)r * hq + h) * hd;
          double *sv = state + ((size_t)r * hq + h) * kvc__state_doubles(hd);
          double mx = sv[0];
          for (int t = 0; t < nt; t++) {
            const float *kt = kh + (size_t)t * hd;
            double dot = 0.0;
            for (int d = 0; d < hd; d++) dot += qv[d] * (double)kt[d];
            scores[t] = dot;
            if (dot > mx) mx = dot;
          }
          /* exp(-inf - finite) = 0 clears the empty initial state. */
          double corr = exp(sv[0] - mx), l = sv[1] * corr;
          double *acc = sv + 2;
          for (int d = 0; d < hd; d++) acc[d] *= corr;
          for (int t = 0; t < nt; t++) {
            double p = exp(scores[t] - mx);
            const float *vt = vh + (size_t)t * hd;
            l += p;
            for (int d = 0; d < hd; d++) acc[d] += p * (double)vt[d];
          }
          sv[0] = mx;
          sv[1] = l;
        }
      }
    }
    if (st != KVC_OK) break;

    for (int r = 0; r < nq; r++)
      for (int h = 0; h < hq; h++) {
        const double *sv = state + ((size_t)r * hq + h) * kvc__state_doubles(hd);
        size_t oi = ((size_t)(row0 + r) * hq + h) * hd;
        kvc__store_row(a->dtype, sv + 2, 1.0 / sv[1], hd, out + oi * esz);
      }
  }
  free(scratch);
  return st;
}
