/* The classifier head: global average pooling of a channels-last map, then the linear layer.
 *
 * Why in C: in a replayed forward (resnext.speed.replay) every torch operator after our kernels
 * runs Python and torch's dispatch on caches the kernels have just filled with weights and
 * activations: measured on the Xeon at batch 1, the pooling took 282 us there against 47 us when
 * run again at once, and the linear layer 482 against 348 us. In C they join the kernels' loop.
 *
 * bf16 follows torch's bf16 operators: the pooled means are rounded to bf16, the products of
 * bf16 values are summed in float32, and the sum plus bias is rounded to bf16 (written widened
 * to float32, the value the optimized model returns).
 */
#include <stdint.h>
#include <string.h>

#include <omp.h>

static inline float from_bf16(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/* Round to nearest even, as torch casts (NaN kept a NaN). */
static inline float round_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    u |= 0x00400000u;
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
  }
  u &= 0xffff0000u;
  memcpy(&f, &u, 4);
  return f;
}

/* y[n][c] = mean over the hw pixels of x[n][.][c] (x float32, or bf16 if `bf16`); y float32,
 * rounded to bf16 values if `bf16`. Returns 0, or -1 for a shape it does not take. */
int head_pool(const void *x, float *y, int N, int hw, int C, int bf16, int threads) {
  if (N < 0 || hw < 1 || C < 1 || threads < 1) return -1;
  const float scale = 1.0f / (float)hw;
#pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
  for (int n = 0; n < N; ++n)
    for (int c0 = 0; c0 < C; c0 += 64) {
      const int c1 = c0 + 64 < C ? c0 + 64 : C;
      float sum[64] = {0};
      for (int p = 0; p < hw; ++p) {
        const long at = ((long)n * hw + p) * C;
        if (bf16) {
          const uint16_t *row = (const uint16_t *)x + at;
          for (int c = c0; c < c1; ++c) sum[c - c0] += from_bf16(row[c]);
        } else {
          const float *row = (const float *)x + at;
          for (int c = c0; c < c1; ++c) sum[c - c0] += row[c];
        }
      }
      for (int c = c0; c < c1; ++c) {
        const float m = sum[c - c0] * scale;
        y[(long)n * C + c] = bf16 ? round_bf16(m) : m;
      }
    }
  return 0;
}

/* Four dot products of row (C values, float32, or bf16 if `bf16`) with p0..p3 into d[0..3]:
 * four independent sums, so that each FMA does not wait for the one before (one sum took ~4x
 * as long per product at batch 16, measured on the Xeon). */
static void dot4(const float *p0, const float *p1, const float *p2, const float *p3,
                 const void *row, int C, int bf16, float *d) {
  float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
  if (bf16) {
    const uint16_t *w = (const uint16_t *)row;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int c = 0; c < C; ++c) {
      const float v = from_bf16(w[c]);
      a0 += p0[c] * v;
      a1 += p1[c] * v;
      a2 += p2[c] * v;
      a3 += p3[c] * v;
    }
  } else {
    const float *w = (const float *)row;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
    for (int c = 0; c < C; ++c) {
      a0 += p0[c] * w[c];
      a1 += p1[c] * w[c];
      a2 += p2[c] * w[c];
      a3 += p3[c] * w[c];
    }
  }
  d[0] = a0, d[1] = a1, d[2] = a2, d[3] = a3;
}

/* One dot product of row with p (see dot4). */
static float dot1(const float *p, const void *row, int C, int bf16) {
  float acc = 0.0f;
  if (bf16) {
    const uint16_t *w = (const uint16_t *)row;
#pragma omp simd reduction(+ : acc)
    for (int c = 0; c < C; ++c) acc += p[c] * from_bf16(w[c]);
  } else {
    const float *w = (const float *)row;
#pragma omp simd reduction(+ : acc)
    for (int c = 0; c < C; ++c) acc += p[c] * w[c];
  }
  return acc;
}

/* y[n][k] = sum_c p[n][c] w[k][c] + b[k] for p float32 [N][C], w and b float32, or bf16 if
 * `bf16` (the sum then rounded to bf16); b may be NULL. The threads split the outputs, so each
 * reads its share of w once; each weight row meets the inputs four at a time. Returns 0, or -1
 * for a shape it does not take. */
int head_linear(const float *p, const void *w, const void *b, float *y, int N, int C, int K,
                int bf16, int threads) {
  if (N < 0 || C < 1 || K < 1 || threads < 1) return -1;
  const size_t width = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int k = 0; k < K; ++k) {
    const void *row = (const char *)w + (size_t)k * C * width;
    const float bias = b == NULL ? 0.0f
                       : bf16    ? from_bf16(((const uint16_t *)b)[k])
                                 : ((const float *)b)[k];
    int n = 0;
    for (; n + 4 <= N; n += 4) {
      const float *pn = p + (long)n * C;
      float d[4];
      dot4(pn, pn + C, pn + 2L * C, pn + 3L * C, row, C, bf16, d);
      for (int i = 0; i < 4; ++i) {
        const float v = d[i] + bias;
        y[(long)(n + i) * K + k] = bf16 ? round_bf16(v) : v;
      }
    }
    for (; n < N; ++n) {
      const float v = dot1(p + (long)n * C, row, C, bf16) + bias;
      y[(long)n * K + k] = bf16 ? round_bf16(v) : v;
    }
  }
  return 0;
}
