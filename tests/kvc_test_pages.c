#include "kvc_test_pages.h"

#include <stdlib.h>
#include <string.h>

#include "compress/kvc_codec.h"
#include "kvc_test_util.h"

static size_t dtype_bytes(kvc_dtype_t t) { return t == KVC_DTYPE_F32 ? 4 : 2; }

/* Rounds f to the dtype, writes it at dst, returns the rounded value. */
static float put_value(kvc_dtype_t t, float f, uint8_t *dst) {
  if (t == KVC_DTYPE_F32) {
    memcpy(dst, &f, 4);
    return f;
  }
  uint16_t h = t == KVC_DTYPE_F16 ? kvc_test_f32_to_f16(f) : kvc_test_f32_to_bf16(f);
  memcpy(dst, &h, 2);
  return t == KVC_DTYPE_F16 ? kvc_test_f16_to_f32(h) : kvc_test_bf16_to_f32(h);
}

void kvc_test_pages_free(kvc_test_pages_t *p) {
  if (!p) return;
  free(p->pool);
  free(p->dir);
  free(p->kv_len);
  free(p->block_indptr);
  free(p->block_ids);
  free(p->token_offset);
  free(p->k);
  free(p->v);
  memset(p, 0, sizeof(*p));
}

void kvc_test_fill_kv(uint64_t seed, int64_t n_tokens, int num_kv_heads, int head_dim, float *k,
                      float *v) {
  kvc_test_rng_t rng;
  kvc_test_rng_seed(&rng, seed);
  const int width = num_kv_heads * head_dim;
  float *chan = malloc(sizeof(float) * 3 * (size_t)width);
  if (!chan) abort(); /* a few KiB; a test that cannot get them cannot run */
  for (int c = 0; c < width; c++) {
    int outlier = kvc_test_rng_below(&rng, 16) == 0;
    chan[c] = (float)(kvc_test_rng_normal(&rng) * (outlier ? 4.0 : 0.5));        /* key offset */
    chan[width + c] = (float)((0.5 + kvc_test_rng_uniform(&rng)) * (outlier ? 8.0 : 1.0));
    chan[2 * width + c] = (float)(0.25 + kvc_test_rng_uniform(&rng));           /* value scale */
  }
  for (int64_t t = 0; t < n_tokens; t++)
    for (int c = 0; c < width; c++) {
      size_t i = (size_t)t * width + c;
      k[i] = chan[c] + chan[width + c] * (float)kvc_test_rng_normal(&rng);
      v[i] = chan[2 * width + c] * (float)kvc_test_rng_normal(&rng);
    }
  free(chan);
}

/* One distinct page while the pool is being laid out. */
typedef struct pending_page {
  uint8_t *bytes;
  uint32_t nbytes;
  uint8_t kind, codec;
  int32_t block_id;
} pending_page_t;

static kvc_codec_t pick_codec(kvc_test_rng_t *rng, unsigned kinds, int *staging) {
  int choices[4], n = 0;
  for (int b = 0; b < 4; b++)
    if (kinds & (1u << b)) choices[n++] = b;
  int c = choices[kvc_test_rng_below(rng, (uint32_t)n)];
  *staging = c == 0;
  return c == 1 ? KVC_CODEC_RAW : c == 2 ? KVC_CODEC_BITPACK : KVC_CODEC_HUFFMAN;
}

kvc_status_t kvc_test_pages_build(const kvc_test_pages_spec_t *spec, const float *k,
                                  const float *v, kvc_test_pages_t *out) {
  if (!spec || !k || !v || !out || spec->num_seqs < 1 || !spec->kv_len || spec->num_kv_heads < 1 ||
      spec->head_dim < 1 || spec->block_tokens < 1 || spec->chunk_bytes < KVC_CHUNK_MIN_BYTES ||
      (spec->chunk_bytes & (spec->chunk_bytes - 1)) != 0)
    return KVC_ERR_INVALID_ARGUMENT;
  memset(out, 0, sizeof(*out));
  const int ns = spec->num_seqs, kvh = spec->num_kv_heads, hd = spec->head_dim;
  const int bt = spec->block_tokens;
  const size_t esz = dtype_bytes(spec->dtype), row_bytes = (size_t)hd * esz;
  const unsigned kinds = spec->kinds ? spec->kinds & KVC_TEST_PAGE_ALL : KVC_TEST_PAGE_ALL;
  kvc_codec_params_t cp = {spec->dtype, kvh, hd, bt, spec->bound_mode, spec->k_bound,
                           spec->v_bound, KVC_POLICY_FIXED, KVC_CODEC_RAW, 0.35f};
  kvc_status_t st = KVC_OK;
  kvc_test_rng_t rng;
  kvc_test_rng_seed(&rng, spec->seed);

  pending_page_t *pages = NULL;
  uint8_t *block = NULL;
  float *decoded = NULL;
  uint32_t *chunk_perm = NULL, *run_start = NULL, *run_order = NULL;
  int32_t *ids = NULL;
  int num_pages = 0;
  size_t staging_bytes = 2 * (size_t)kvh * bt * row_bytes;
  size_t page_cap = staging_bytes;

  out->num_seqs = ns;
  out->kv_len = malloc(sizeof(int32_t) * ns);
  out->block_indptr = malloc(sizeof(int32_t) * (ns + 1));
  out->token_offset = malloc(sizeof(int64_t) * (ns + 1));
  if (!out->kv_len || !out->block_indptr || !out->token_offset) goto oom;
  out->block_indptr[0] = 0;
  out->token_offset[0] = 0;
  for (int s = 0; s < ns; s++) {
    if (spec->kv_len[s] < 1) {
      st = KVC_ERR_INVALID_ARGUMENT;
      goto fail;
    }
    out->kv_len[s] = spec->kv_len[s];
    if (spec->kv_len[s] > out->max_kv_len) out->max_kv_len = spec->kv_len[s];
    out->block_indptr[s + 1] = out->block_indptr[s] + (spec->kv_len[s] + bt - 1) / bt;
    out->token_offset[s + 1] = out->token_offset[s] + spec->kv_len[s];
  }
  const int total_blocks = out->block_indptr[ns];
  const int64_t total_tokens = out->token_offset[ns];
  out->block_ids = malloc(sizeof(int32_t) * total_blocks);
  out->k = malloc(sizeof(float) * (size_t)total_tokens * kvh * hd);
  out->v = malloc(sizeof(float) * (size_t)total_tokens * kvh * hd);
  /* Gaps in the id space: twice as many directory entries as blocks, plus a few. */
  out->dir_len = 2 * total_blocks + 3;
  out->dir = calloc((size_t)out->dir_len, sizeof(kvc_page_entry_t));
  pages = calloc((size_t)total_blocks, sizeof(*pages));
  if (kinds & ~(unsigned)KVC_TEST_PAGE_STAGING) {
    size_t max_page = kvc_codec_max_page_bytes(&cp);
    if (max_page > page_cap) page_cap = max_page;
  }
  block = malloc(staging_bytes);
  decoded = malloc(sizeof(float) * 2 * (size_t)kvh * bt * hd);
  if (!out->block_ids || !out->k || !out->v || !out->dir || !pages || !block || !decoded) goto oom;

  /* Distinct block ids: a random subset of [0, dir_len) in random order. */
  ids = malloc(sizeof(int32_t) * out->dir_len);
  if (!ids) goto oom;
  for (int i = 0; i < out->dir_len; i++) ids[i] = i;
  for (int i = out->dir_len - 1; i > 0; i--) {
    int j = (int)kvc_test_rng_below(&rng, (uint32_t)i + 1);
    int32_t t = ids[i];
    ids[i] = ids[j];
    ids[j] = t;
  }
  int next_id = 0;

  const int full0 = out->kv_len[0] / bt;
  for (int s = 0; s < ns; s++) {
    const int len = out->kv_len[s], nb = (len + bt - 1) / bt;
    int shared = 0;
    if (s > 0) {
      shared = spec->shared_prefix_blocks;
      if (shared > full0) shared = full0;
      if (shared > len / bt) shared = len / bt;
    }
    for (int j = 0; j < nb; j++) {
      const int start = j * bt, n = len - start < bt ? len - start : bt;
      const int64_t row0 = out->token_offset[s] + start;
      const size_t rowf = (size_t)kvh * hd; /* floats per token row of k, v */
      if (j < shared) {
        out->block_ids[out->block_indptr[s] + j] = out->block_ids[j];
        memcpy(out->k + row0 * rowf, out->k + (int64_t)start * rowf, sizeof(float) * n * rowf);
        memcpy(out->v + row0 * rowf, out->v + (int64_t)start * rowf, sizeof(float) * n * rowf);
        continue;
      }
      /* The staging-layout block in the dtype; rows past n stay 0xFF (NaN). */
      memset(block, 0xFF, staging_bytes);
      for (int tensor = 0; tensor < 2; tensor++) {
        const float *src = tensor == 0 ? k : v;
        float *dst = tensor == 0 ? out->k : out->v;
        for (int h = 0; h < kvh; h++)
          for (int t = 0; t < n; t++)
            for (int d = 0; d < hd; d++) {
              size_t i = ((size_t)(row0 + t) * kvh + h) * hd + d;
              uint8_t *p = block + kvc_staging_row_offset(tensor, h, t, kvh, bt, (int)row_bytes) +
                           (size_t)d * esz;
              dst[i] = put_value(spec->dtype, src[i], p);
            }
      }
      pending_page_t *pg = &pages[num_pages++];
      pg->block_id = ids[next_id++];
      out->block_ids[out->block_indptr[s] + j] = pg->block_id;
      pg->bytes = malloc(page_cap);
      if (!pg->bytes) goto oom;
      int staging = n < bt;
      kvc_codec_t codec = KVC_CODEC_RAW;
      if (!staging) codec = pick_codec(&rng, kinds, &staging);
      if (staging) {
        memcpy(pg->bytes, block, staging_bytes);
        pg->nbytes = (uint32_t)staging_bytes;
        pg->kind = KVC_PAGE_STAGING;
        out->pages_by_kind[0]++;
        continue;
      }
      size_t size = 0;
      st = kvc_codec_encode_with(&cp, codec, block, n, pg->bytes, page_cap, &size);
      if (st == KVC_ERR_UNSUPPORTED && codec != KVC_CODEC_RAW) {
        codec = KVC_CODEC_RAW;
        st = kvc_codec_encode_with(&cp, codec, block, n, pg->bytes, page_cap, &size);
      }
      if (st != KVC_OK) goto fail;
      pg->nbytes = (uint32_t)size;
      pg->kind = KVC_PAGE_COMPRESSED;
      pg->codec = (uint8_t)codec;
      out->pages_by_kind[1 + (int)codec]++;
      st = kvc_codec_decode(pg->bytes, size, decoded);
      if (st != KVC_OK) goto fail;
      /* decoded [2][kvh][n][hd] -> rows of out->k / out->v, rounded to the dtype unless exact */
      const int exact = (spec->exact_codecs >> (int)codec) & 1u;
      for (int tensor = 0; tensor < 2; tensor++) {
        float *dst = tensor == 0 ? out->k : out->v;
        for (int h = 0; h < kvh; h++)
          for (int t = 0; t < n; t++)
            for (int d = 0; d < hd; d++) {
              uint8_t scratch[4];
              const float x = decoded[(((size_t)tensor * kvh + h) * n + t) * hd + d];
              dst[((size_t)(row0 + t) * kvh + h) * hd + d] =
                  exact ? x : put_value(spec->dtype, x, scratch);
            }
      }
    }
  }

  /* Lay the pages out in shuffled runs of 1 to 4 ascending chunks, as a pool's free stack hands
   * them out after churn (kvc_backend_cuda.cu: pop_chunks), with a few spare chunks left
   * poisoned: a page's chunks are partly adjacent in the pool (the decode kernel copies such a
   * run at once) and partly not. */
  uint32_t need = 0;
  for (int i = 0; i < num_pages; i++) need += kvc_chunks_for(pages[i].nbytes, spec->chunk_bytes);
  out->chunk_bytes = spec->chunk_bytes;
  out->num_chunks = need + need / 8 + 1;
  out->pool = malloc((size_t)out->num_chunks * spec->chunk_bytes);
  chunk_perm = malloc(sizeof(uint32_t) * out->num_chunks);
  run_start = malloc(sizeof(uint32_t) * (out->num_chunks + 1));
  run_order = malloc(sizeof(uint32_t) * out->num_chunks);
  if (!out->pool || !chunk_perm || !run_start || !run_order) goto oom;
  memset(out->pool, 0xFF, (size_t)out->num_chunks * spec->chunk_bytes);
  uint32_t nruns = 0;
  for (uint32_t i = 0; i < out->num_chunks; i += 1 + kvc_test_rng_below(&rng, 4))
    run_start[nruns++] = i;
  run_start[nruns] = out->num_chunks;
  for (uint32_t r = 0; r < nruns; r++) run_order[r] = r;
  for (uint32_t r = nruns - 1; r > 0; r--) {
    uint32_t j = kvc_test_rng_below(&rng, r + 1), t = run_order[r];
    run_order[r] = run_order[j];
    run_order[j] = t;
  }
  for (uint32_t r = 0, n = 0; r < nruns; r++)
    for (uint32_t c = run_start[run_order[r]]; c < run_start[run_order[r] + 1]; c++)
      chunk_perm[n++] = c;
  uint32_t next_chunk = 0;
  for (int i = 0; i < num_pages; i++) {
    pending_page_t *pg = &pages[i];
    kvc_page_entry_t *e = &out->dir[pg->block_id];
    uint32_t nch = kvc_chunks_for(pg->nbytes, spec->chunk_bytes);
    if (nch > KVC_PAGE_MAX_CHUNKS) {
      st = KVC_ERR_INVALID_ARGUMENT; /* chunk_bytes too small for this page */
      goto fail;
    }
    e->nbytes = pg->nbytes;
    e->kind = pg->kind;
    e->codec = pg->codec;
    e->nchunks = (uint8_t)nch;
    for (uint32_t c = 0; c < nch; c++) e->chunk[c] = chunk_perm[next_chunk++];
    for (uint32_t off = 0; off < pg->nbytes; off += spec->chunk_bytes) {
      uint32_t len = pg->nbytes - off < spec->chunk_bytes ? pg->nbytes - off : spec->chunk_bytes;
      memcpy(kvc_page_byte(out->pool, spec->chunk_bytes, e, off), pg->bytes + off, len);
    }
    out->page_bytes += pg->nbytes;
  }
  goto done;

oom:
  st = KVC_ERR_OUT_OF_HOST_MEMORY;
fail:
  kvc_test_pages_free(out);
done:
  if (pages)
    for (int i = 0; i < num_pages; i++) free(pages[i].bytes);
  free(pages);
  free(block);
  free(decoded);
  free(chunk_perm);
  free(run_start);
  free(run_order);
  free(ids);
  return st;
}
