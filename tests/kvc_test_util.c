#include "kvc_test_util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

void kvc_test_rng_seed(kvc_test_rng_t *r, uint64_t seed) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  r->s = (z ^ (z >> 31)) | 1;
}

uint64_t kvc_test_rng_u64(kvc_test_rng_t *r) {
  uint64_t x = r->s;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  r->s = x;
  return x * 0x2545f4914f6cdd1dull;
}

uint32_t kvc_test_rng_below(kvc_test_rng_t *r, uint32_t n) {
  return n ? (uint32_t)((kvc_test_rng_u64(r) >> 32) % n) : 0;
}

double kvc_test_rng_uniform(kvc_test_rng_t *r) {
  return (double)(kvc_test_rng_u64(r) >> 11) * (1.0 / 9007199254740992.0);
}

double kvc_test_rng_normal(kvc_test_rng_t *r) {
  double u1 = kvc_test_rng_uniform(r), u2 = kvc_test_rng_uniform(r);
  if (u1 < 1e-300) u1 = 1e-300;
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

uint16_t kvc_test_f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u, exp = (x >> 23) & 0xff, mant = x & 0x7fffffu;
  if (exp == 0xff) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0));
  int e = (int)exp - 127 + 15;
  if (e >= 31) return (uint16_t)(sign | 0x7c00u);
  if (e <= 0) {
    if (e < -10) return (uint16_t)sign;
    mant |= 0x800000u;
    int shift = 14 - e;
    uint32_t half = mant >> shift, rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) half++;
    return (uint16_t)(sign | half);
  }
  uint32_t half = sign | ((uint32_t)e << 10) | (mant >> 13), rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1))) half++;
  return (uint16_t)half;
}

float kvc_test_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu, x;
  if (exp == 0) {
    float f = ldexpf((float)mant, -24);
    return sign ? -f : f;
  }
  if (exp == 31) x = sign | 0x7f800000u | (mant << 13);
  else x = sign | ((exp - 15 + 127) << 23) | (mant << 13);
  float f;
  memcpy(&f, &x, 4);
  return f;
}

uint16_t kvc_test_f32_to_bf16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);
  x += 0x7fffu + ((x >> 16) & 1);
  return (uint16_t)(x >> 16);
}

float kvc_test_bf16_to_f32(uint16_t h) {
  uint32_t x = (uint32_t)h << 16;
  float f;
  memcpy(&f, &x, 4);
  return f;
}

const char *kvc_test_shared_path(const char *rel, char *buf, size_t cap) {
  const char *dir = getenv("KVC_SHARED_DIR");
  if (!dir || !*dir) dir = getenv("KVC_DEFAULT_SHARED_DIR");
  if (!dir || !*dir) dir = "../shared";
  snprintf(buf, cap, "%s/%s", dir, rel);
  struct stat st;
  return stat(buf, &st) == 0 ? buf : NULL;
}

int kvc_test_require_models(void) {
  const char *v = getenv("KVC_REQUIRE_MODELS");
  return v && strcmp(v, "1") == 0;
}

double kvc_test_scale(void) {
  const char *v = getenv("KVC_TEST_SCALE");
  double s = v ? atof(v) : 1.0;
  return s > 0 ? s : 1.0;
}

double kvc_test_bound_ratio(const float *x, const float *dec, int n, int hd, int tensor,
                            int relative, float bound) {
  double worst = 0;
  for (int t = 0; t < n; t++)
    for (int d = 0; d < hd; d++) {
      double lim = bound;
      if (relative) {
        float mn = INFINITY, mx = -INFINITY;
        for (int i = 0; i < (tensor == 0 ? n : hd); i++) {
          const float v = tensor == 0 ? x[(size_t)i * hd + d] : x[(size_t)t * hd + i];
          mn = fminf(mn, v);
          mx = fmaxf(mx, v);
        }
        lim = (double)bound * ((double)mx - (double)mn);
      }
      const float y = dec[(size_t)t * hd + d];
      if (isnan(y)) return INFINITY;
      const double err = fabs((double)y - (double)x[(size_t)t * hd + d]);
      const double r = lim > 0 ? err / lim : (err > 0 ? INFINITY : 0);
      if (r > worst) worst = r;
    }
  return worst;
}
