/*
 * ./kvc bench codec (CPU part): compression ratio with every byte counted (headers, section
 * tables, quantization parameters, codebooks, lane lengths, alignment) and the largest error over
 * the bound, for each codec, bound mode and several bounds, on K/V blocks in fp16.
 *
 * Input: realistic synthetic K/V (default; two shapes: head_dim 128 x 8 kv heads, and head_dim 8 x
 * 4 kv heads like stories260K), or a real-model dump given with --kv FILE (format in
 * bench/NOTES-codec.md: a text header, then float32 K [layers][tokens][kv_heads][head_dim], then V).
 * Options: --block-tokens N (default 64), --kv FILE.
 *
 * Prints a table, then one JSON line: {"bench":"codec","rows":[{"codec","mode","bound",
 * "bits_per_value","max_err_over_bound",...}]}. Also reports KIVI-style 4-bit's bits per value for
 * the same shape (4 bits + fp16 scale and zero per key channel per block and per value token) as
 * the number to beat.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "compress/kvc_codec.h"
#include "compress/kvc_page_format.h"

typedef struct kv_set {
  char name[64];
  int layers, tokens, heads, hd;
  float *k, *v; /* [layers][tokens][heads][hd] */
} kv_set_t;

static uint64_t rng_s = 0x9E3779B97F4A7C15ull;
static double rng_u(void) {
  rng_s ^= rng_s << 13;
  rng_s ^= rng_s >> 7;
  rng_s ^= rng_s << 17;
  return (double)(rng_s >> 11) * (1.0 / 9007199254740992.0);
}
static double rng_n(void) {
  double a = rng_u(), b = rng_u();
  if (a < 1e-300) a = 1e-300;
  return sqrt(-2 * log(a)) * cos(6.283185307179586 * b);
}

/* Keys: per-channel offsets (a few large outlier channels), per-channel scales, temporally
 * correlated tokens; values: per-channel scales, independent tokens. Scales ~1. */
static int synth(kv_set_t *s, const char *name, int layers, int tokens, int heads, int hd) {
  snprintf(s->name, sizeof s->name, "%s", name);
  s->layers = layers;
  s->tokens = tokens;
  s->heads = heads;
  s->hd = hd;
  size_t n = (size_t)layers * tokens * heads * hd;
  s->k = malloc(n * sizeof(float));
  s->v = malloc(n * sizeof(float));
  if (!s->k || !s->v) return -1;
  for (int l = 0; l < layers; l++) {
    for (int h = 0; h < heads; h++) {
      for (int d = 0; d < hd; d++) {
        double off = rng_u() < 0.06 ? 8 * (rng_u() - 0.5) : 0.7 * rng_n();
        double ks = exp(0.5 * rng_n()), vs = exp(0.4 * rng_n()), slow = 0;
        for (int t = 0; t < tokens; t++) {
          size_t i = (((size_t)l * tokens + t) * heads + h) * hd + d;
          slow = 0.95 * slow + 0.31 * rng_n();
          s->k[i] = (float)(off + ks * (0.6 * rng_n() + 0.5 * slow));
          s->v[i] = (float)(vs * rng_n());
        }
      }
    }
  }
  return 0;
}

/* Dump: "kvcomp-kv-dump v1\n" "layers L tokens T kv_heads H head_dim D\n" then float32 K, V. */
static int load_dump(kv_set_t *s, const char *path) {
  FILE *f = fopen(path, "rb");
  if (!f) return -1;
  char line[256];
  int ok = fgets(line, sizeof line, f) && strncmp(line, "kvcomp-kv-dump v1", 17) == 0 &&
           fgets(line, sizeof line, f) &&
           sscanf(line, "layers %d tokens %d kv_heads %d head_dim %d", &s->layers, &s->tokens,
                  &s->heads, &s->hd) == 4 &&
           s->layers > 0 && s->tokens > 0 && s->heads > 0 && s->hd > 0;
  if (ok) {
    size_t n = (size_t)s->layers * s->tokens * s->heads * s->hd;
    s->k = malloc(n * sizeof(float));
    s->v = malloc(n * sizeof(float));
    ok = s->k && s->v && fread(s->k, sizeof(float), n, f) == n &&
         fread(s->v, sizeof(float), n, f) == n;
  }
  fclose(f);
  snprintf(s->name, sizeof s->name, "dump");
  return ok ? 0 : -1;
}

typedef struct row {
  const char *codec;
  const char *mode;
  float bound;
  double bits, max_err, rmse_over_bound, encode_mbps, decode_mbps;
  double rmse_k, rmse_v; /* absolute, over all K / V values */
  double fixed_bits;     /* per value: page header, section table, section headers, alignment */
  double codebook_bits;  /* per value: Huffman code lengths */
  long pages_raw;
} row_t;

/* RMSE of KIVI-style asymmetric 4-bit quantization (keys per channel over each block's tokens,
 * values per token; min and scale kept exactly) on the fp16-rounded data: the error to match. */
static void kivi4_rmse(const kv_set_t *s, int bt, double *rk, double *rv) {
  double sq[2] = {0, 0}, cnt = 0;
  const int H = s->heads, hd = s->hd;
  for (int tz = 0; tz < 2; tz++) {
    const float *src = tz ? s->v : s->k;
    for (int l = 0; l < s->layers; l++)
      for (int h = 0; h < H; h++)
        for (int b0 = 0; b0 < s->tokens; b0 += bt) {
          int n = s->tokens - b0 < bt ? s->tokens - b0 : bt;
          int G = tz ? n : hd, len = tz ? hd : n;
          for (int g = 0; g < G; g++) {
            double mn = INFINITY, mx = -INFINITY;
            for (int i = 0; i < len; i++) {
              int t = tz ? g : i, d = tz ? i : g;
              double x = kvc_codec_f16_to_f32(
                  kvc_codec_f32_to_f16(src[(((size_t)l * s->tokens + b0 + t) * H + h) * hd + d]));
              mn = fmin(mn, x);
              mx = fmax(mx, x);
            }
            double sc = (mx - mn) / 15;
            for (int i = 0; i < len; i++) {
              int t = tz ? g : i, d = tz ? i : g;
              double x = kvc_codec_f16_to_f32(
                  kvc_codec_f32_to_f16(src[(((size_t)l * s->tokens + b0 + t) * H + h) * hd + d]));
              double y = sc > 0 ? mn + sc * nearbyint((x - mn) / sc) : x;
              sq[tz] += (y - x) * (y - x);
              if (tz == 0) cnt++;
            }
          }
        }
  }
  *rk = sqrt(sq[0] / cnt);
  *rv = sqrt(sq[1] / cnt);
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Encodes every block of the set with one codec and bound; fills the row. */
static int run(const kv_set_t *s, int bt, kvc_codec_t codec, kvc_bound_mode_t mode, float bound,
               row_t *r) {
  kvc_codec_params_t p;
  memset(&p, 0, sizeof p);
  p.dtype = KVC_DTYPE_F16;
  p.num_kv_heads = s->heads;
  p.head_dim = s->hd;
  p.block_tokens = bt;
  p.bound_mode = mode;
  p.k_bound = p.v_bound = bound;
  p.policy = KVC_POLICY_FIXED;
  p.codec = codec;
  p.size_budget = 1;
  if (kvc_codec_check_params(&p) != KVC_OK) return -1;
  const int H = s->heads, hd = s->hd;
  size_t sb = kvc_codec_staging_bytes(&p), cap = kvc_codec_max_page_bytes(&p);
  uint16_t *blk = calloc(1, sb);
  float *x = calloc(sb / 2, sizeof(float)), *y = calloc(sb / 2, sizeof(float));
  uint8_t *page = malloc(cap);
  if (!blk || !x || !y || !page) return -1;
  double bytes = 0, values = 0, worst = 0, sq = 0, t_enc = 0, t_dec = 0, sqk = 0, sqv = 0;
  double fixed = 0, codebook = 0;
  long raw_pages = 0;
  for (int l = 0; l < s->layers; l++) {
    for (int b0 = 0; b0 < s->tokens; b0 += bt) {
      int n = s->tokens - b0 < bt ? s->tokens - b0 : bt;
      for (int tz = 0; tz < 2; tz++)
        for (int h = 0; h < H; h++)
          for (int t = 0; t < n; t++)
            for (int d = 0; d < hd; d++) {
              size_t src = (((size_t)l * s->tokens + b0 + t) * H + h) * hd + d;
              size_t dst = (((size_t)tz * H + h) * bt + t) * hd + d;
              uint16_t v = kvc_codec_f32_to_f16((tz ? s->v : s->k)[src]);
              blk[dst] = v;
              x[dst] = kvc_codec_f16_to_f32(v);
            }
      size_t size;
      double t0 = now();
      if (kvc_codec_encode(&p, blk, n, page, cap, &size) != KVC_OK) return -1;
      double t1 = now();
      if (kvc_codec_decode(page, size, y) != KVC_OK) return -1;
      t_dec += now() - t1;
      t_enc += t1 - t0;
      kvc_page_info_t info;
      kvc_codec_page_info(page, size, &info);
      raw_pages += info.codec == KVC_CODEC_RAW && codec != KVC_CODEC_RAW;
      if (info.codec != KVC_CODEC_RAW) {
        double payload = 0;
        for (int sec = 0; sec < 2 * H; sec++) {
          uint32_t off, b;
          kvc_page_section(page, (uint32_t)H, (uint32_t)sec, &off, &b);
          payload += b - KVC_QSEC_HEADER_BYTES;
          kvc_qsec_header_t qh;
          kvc_qsec_header_read(page + off, &qh);
          if (info.codec == KVC_CODEC_HUFFMAN) codebook += qh.width * 4.0 / 8;
        }
        fixed += (double)size - payload;
      }
      bytes += (double)size;
      values += 2.0 * H * n * hd;
      for (int sec = 0; sec < 2 * H; sec++) {
        const float *xs = x + (size_t)sec * bt * hd, *ys = y + (size_t)sec * n * hd;
        for (int t = 0; t < n; t++) {
          for (int d = 0; d < hd; d++) {
            double lim = bound;
            if (mode == KVC_BOUND_RELATIVE) {
              float mn = INFINITY, mx = -INFINITY;
              int keys = sec < H;
              for (int i = 0; i < (keys ? n : hd); i++) {
                float v = keys ? xs[(size_t)i * hd + d] : xs[(size_t)t * hd + i];
                mn = fminf(mn, v);
                mx = fmaxf(mx, v);
              }
              lim = (double)bound * ((double)mx - (double)mn);
            }
            double e = fabs((double)ys[(size_t)t * hd + d] - (double)xs[(size_t)t * hd + d]);
            if (sec < H) sqk += e * e;
            else sqv += e * e;
            double q = lim > 0 ? e / lim : (e > 0 ? INFINITY : 0);
            if (q > worst) worst = q;
            sq += q * q;
          }
        }
      }
    }
  }
  r->bits = bytes * 8 / values;
  r->max_err = worst;
  r->rmse_over_bound = sqrt(sq / values);
  r->encode_mbps = values * 2 / 1e6 / t_enc;
  r->decode_mbps = values * 2 / 1e6 / t_dec;
  r->pages_raw = raw_pages;
  r->rmse_k = sqrt(2 * sqk / values);
  r->fixed_bits = fixed * 8 / values;
  r->codebook_bits = codebook * 8 / values;
  r->rmse_v = sqrt(2 * sqv / values);
  free(blk);
  free(x);
  free(y);
  free(page);
  return 0;
}

int main(int argc, char **argv) {
  int bt = 64;
  const char *dump = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--block-tokens") && i + 1 < argc) bt = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--kv") && i + 1 < argc) dump = argv[++i];
    else {
      fprintf(stderr, "usage: bench_codec [--block-tokens N] [--kv DUMP]\n");
      return 2;
    }
  }
  kv_set_t sets[2];
  int nsets = 0;
  if (dump) {
    if (load_dump(&sets[0], dump) != 0) {
      fprintf(stderr, "bench_codec: cannot read KV dump %s\n", dump);
      return 1;
    }
    nsets = 1;
  } else {
    if (synth(&sets[0], "synthetic-hd128-h8", 2, 512, 8, 128) != 0 ||
        synth(&sets[1], "synthetic-hd8-h4", 5, 512, 4, 8) != 0) {
      fprintf(stderr, "bench_codec: out of memory\n");
      return 1;
    }
    nsets = 2;
  }
  static const float rel_bounds[5] = {0.01f, 0.02f, 0.035f, 0.05f, 0.1f};
  static const float abs_bounds[5] = {0.01f, 0.02f, 0.05f, 0.1f, 0.2f};
  static const char *codec_names[3] = {"raw", "bitpack", "huffman"};
  char json[65536];
  size_t jl = (size_t)snprintf(json, sizeof json, "{\"bench\":\"codec\",\"block_tokens\":%d,\"rows\":[", bt);
  int first = 1;
  for (int si = 0; si < nsets; si++) {
    const kv_set_t *s = &sets[si];
    double kivi = 4 + 0.5 * 32.0 / bt + 0.5 * 32.0 / s->hd, kivi_k, kivi_v;
    kivi4_rmse(s, bt, &kivi_k, &kivi_v);
    printf("%s: %d layers x %d tokens x %d kv heads x head_dim %d, fp16, %d-token blocks; "
           "KIVI-style 4-bit: %.3f bits/value, rmse K %.4f V %.4f\n",
           s->name, s->layers, s->tokens, s->heads, s->hd, bt, kivi, kivi_k, kivi_v);
    printf("  %-8s %-4s %6s %10s %6s %13s %9s %7s %7s %6s %6s %8s %4s\n", "codec", "mode", "bound",
           "bits/value", "ratio", "max_err/bound", "rms/bound", "rmse K", "rmse V", "fixed",
           "cbook", "enc MB/s", "raw");
    for (int c = 0; c < 3; c++) {
      for (int m = 0; m < 2; m++) {
        for (int bi = 0; bi < (c == 0 ? 1 : 5); bi++) {
          if (c == 0 && m == 1) continue;
          float bound = m == 0 ? rel_bounds[bi] : abs_bounds[bi];
          row_t r;
          if (run(s, bt, (kvc_codec_t)c, (kvc_bound_mode_t)m, bound, &r) != 0) {
            fprintf(stderr, "bench_codec: encode/decode failed (%s)\n", s->name);
            return 1;
          }
          const char *mode = m == 0 ? "rel" : "abs";
          printf("  %-8s %-4s %6.3f %10.3f %6.2f %13.4f %9.4f %7.4f %7.4f %6.3f %6.3f %8.1f %4ld\n",
                 codec_names[c], mode, bound, r.bits, 16.0 / r.bits, r.max_err, r.rmse_over_bound,
                 r.rmse_k, r.rmse_v, r.fixed_bits, r.codebook_bits, r.encode_mbps, r.pages_raw);
          jl += (size_t)snprintf(json + jl, sizeof json - jl,
                                 "%s{\"data\":\"%s\",\"head_dim\":%d,\"kv_heads\":%d,\"codec\":\"%s\","
                                 "\"mode\":\"%s\",\"bound\":%g,\"bits_per_value\":%.4f,"
                                 "\"ratio_vs_fp16\":%.3f,\"max_err_over_bound\":%.4f,"
                                 "\"rms_err_over_bound\":%.4f,\"rmse_k\":%.5f,\"rmse_v\":%.5f,"
                                 "\"fixed_bits_per_value\":%.4f,\"codebook_bits_per_value\":%.4f,"
                                 "\"kivi4_bits_per_value\":%.3f,\"kivi4_rmse_k\":%.5f,"
                                 "\"kivi4_rmse_v\":%.5f,"
                                 "\"cpu_encode_mbps\":%.1f,\"cpu_decode_mbps\":%.1f,\"raw_pages\":%ld}",
                                 first ? "" : ",", s->name, s->hd, s->heads, codec_names[c], mode,
                                 (double)bound, r.bits, 16.0 / r.bits, r.max_err, r.rmse_over_bound,
                                 r.rmse_k, r.rmse_v, r.fixed_bits, r.codebook_bits, kivi, kivi_k, kivi_v, r.encode_mbps, r.decode_mbps, r.pages_raw);
          first = 0;
          if (jl >= sizeof json) {
            fprintf(stderr, "bench_codec: JSON too long\n");
            return 1;
          }
        }
      }
    }
    free(sets[si].k);
    free(sets[si].v);
  }
  printf("%s]}\n", json);
  return 0;
}
