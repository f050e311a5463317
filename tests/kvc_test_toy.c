/*
 * The toy model and its attention reference (kvc_test_toy.h).
 *
 * Tolerance, from the codec's contract in absolute mode (every decoded key element within eps_k of
 * the original, every value element within eps_v; staging pages are exact). For one query row and
 * head, with original scores s_j = scale * q . k_j and decoded keys k_j + dk_j:
 *   |s~_j - s_j| = scale * |q . dk_j| <= scale * ||q||_1 * eps_k =: delta.
 * Each softmax numerator exp(s~_j) is within a factor exp(+-delta) of exp(s_j), and so is their
 * sum, hence every weight satisfies p~_j / p_j in [exp(-2 delta), exp(2 delta)], i.e.
 *   |p~_j - p_j| <= (exp(2 delta) - 1) p_j.
 * With decoded values v_j + dv_j (|dv_j[d]| <= eps_v) the output error in dimension d is
 *   o~ - o = sum_j p~_j dv_j[d] + sum_j (p~_j - p_j) v_j[d].
 * The first sum is at most eps_v (the p~_j sum to 1). The second is unchanged by subtracting any
 * constant c from every v_j[d] (the differences p~_j - p_j sum to 0); with c the midpoint of the
 * range R_d = max_j v_j[d] - min_j v_j[d] over the attended positions it is at most
 * (exp(2 delta) - 1) R_d / 2. So
 *   |o~[d] - o[d]| <= eps_v + (exp(2 delta) - 1) * R_d / 2,
 * plus the output's rounding (out_rel, out_abs) and 1e-6 relative for the kernel's accumulation.
 *
 * A kernel that rounds to the dtype as it goes (kern_rel = r > 0: the GPU's, which feeds decoded
 * keys and values and the probabilities to the tensor cores in fp16 or bf16) adds three terms.
 * A decoded element x~ within eps of x, rounded, is within eps + r (|x| + eps) of x: eps_k and
 * eps_v grow so, and delta with them, per position (scale * sum_d |q_d| (eps_k + r (|k_jd| +
 * eps_k)), the largest over j). A probability rounded to the dtype is exp(s~_j) (1 + rho_j) with
 * |rho_j| <= r. Normalised by the sum of the rounded probabilities, that is a score perturbed by
 * at most -log(1 - r) <= 1.5 r (delta grows by it); normalised by the unrounded sum, it adds
 * sum_j w_j rho_j v~_j, at most r * max_j |v~_j[d]|. The bound takes both.
 */
#include "kvc_test_toy.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "kvc_test_util.h"

static uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return x;
}

uint64_t kvc_test_toy_hash(uint64_t prev, int32_t token) {
  return mix64(prev ^ (uint64_t)(uint32_t)token);
}

static float f16(double x) { return kvc_test_f16_to_f32(kvc_test_f32_to_f16((float)x)); }

void kvc_test_toy_kv(const kvc_test_toy_t *m, uint64_t hash, int layer, float *k, float *v) {
  kvc_test_rng_t g;
  kvc_test_rng_seed(&g, hash + (uint64_t)layer * 0x9e3779b97f4a7c15ull);
  for (int t = 0; t < 2; t++)
    for (int h = 0; h < m->kv_heads; h++)
      for (int d = 0; d < m->head_dim; d++) {
        double x = kvc_test_rng_normal(&g);
        if (t == 0) x = x * (d % 8 == 3 ? 4.0 : 1.0) + 0.25 * (double)(d % 5);
        (t == 0 ? k : v)[h * m->head_dim + d] = f16(x);
      }
}

double kvc_test_toy_check(const kvc_test_toy_t *m, const float *keys, const float *values,
                          size_t stride, int n, const float *q, const float *out, float scale,
                          char *msg, size_t cap) {
  const int hd = m->head_dim, group = m->q_heads / m->kv_heads;
  double *w = malloc((size_t)n * sizeof(double)), worst = 0;
  if (!w) abort();
  for (int hq = 0; hq < m->q_heads; hq++) {
    const int h = hq / group;
    const float *qh = q + (size_t)hq * hd;
    double mx = -INFINITY, sum = 0, qnorm1 = 0, qk1 = 0; /* qk1: max_j sum_d |q_d k_jd| */
    for (int d = 0; d < hd; d++) qnorm1 += fabs(qh[d]);
    for (int p = 0; p < n; p++) {
      double dot = 0, abs_dot = 0;
      for (int d = 0; d < hd; d++) {
        const double x = (double)qh[d] * keys[p * stride + (size_t)h * hd + d];
        dot += x;
        abs_dot += fabs(x);
      }
      w[p] = dot * scale;
      mx = w[p] > mx ? w[p] : mx;
      qk1 = abs_dot > qk1 ? abs_dot : qk1;
    }
    for (int p = 0; p < n; p++) sum += (w[p] = exp(w[p] - mx));
    const double r = m->kern_rel, eps_v = m->eps_v * (1 + r);
    const double delta = scale * (qnorm1 * m->eps_k * (1 + r) + r * qk1) + 1.5 * r;
    const double grow = expm1(2 * delta);
    for (int d = 0; d < hd; d++) {
      double acc = 0, lo = INFINITY, hi = -INFINITY, big = 0;
      for (int p = 0; p < n; p++) {
        double v = values[p * stride + (size_t)h * hd + d];
        acc += w[p] * v;
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
        big = fabs(v) > big ? fabs(v) : big;
      }
      /* |v~_j - v_j| <= eps_v + r |v_j| (vdev); the probabilities' rounding adds r max |v~_j|. */
      const double vdev = eps_v + r * big;
      const double ref = acc / sum, bound = vdev + grow * (hi - lo) / 2 + r * (big + vdev);
      const double tol =
          bound + m->out_rel * (fabs(ref) + bound) + m->out_abs + 1e-6 * (fabs(ref) + 1);
      const double got = out[(size_t)hq * hd + d], err = fabs(got - ref);
      const double ratio = isnan(err) ? INFINITY : err / tol;
      if (ratio > 1 && worst <= 1)
        snprintf(msg, cap, "head %d dim %d: got %.6g, reference %.6g, error %.3g > tolerance %.3g",
                 hq, d, got, ref, err, tol);
      if (ratio > worst) worst = ratio;
    }
  }
  free(w);
  return worst;
}
