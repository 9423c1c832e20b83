/* Weight gradient of a grouped 3x3 convolution (padding 1, stride 1 or 2), channels-last, AVX-512.
 *
 * Why this kernel exists: oneDNN computes the bf16 weight gradient of ResNeXt-50's stage-1
 * grouped 3x3 (4 channels per group) at ~70 GFLOP/s, a fourteenth of its dense rate, and that
 * one gradient is the slowest part of the grouped convolution's training step.
 *
 *   dw[co][ci][kh][kw] = sum over n, oh, ow of gy[n][oh][ow][co] * x[n][oh*s-1+kh][ow*s-1+kw][ci]
 *
 * with co and ci in the same group of G = 4 or 8 channels. A register holds 16 consecutive
 * channels, i.e. 16/G whole groups. The G x G products of a group are split into G diagonals:
 * diagonal d multiplies input lane i of a group by the gradient lane (i + d) mod G of the same
 * group, so every (tap, diagonal) pair is one accumulator fed by plain fused multiply-adds, and
 * the gradient register is rotated once per pixel and diagonal. Threads take whole output rows
 * and keep private sums in the diagonal layout; they are added and scattered to dw at the end.
 *
 * Layout: x[N][H][W][C] and gy[N][Ho][Wo][C], both fp32 or both bf16; dw[C][G][3][3] fp32.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

static inline __m512 mload_f32(__mmask16 m, const void *p) {
  return _mm512_maskz_loadu_ps(m, (const float *)p);
}
static inline __m512 mload_bf16(__mmask16 m, const void *p) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

/* Lane l = g + i (group start g) takes lane g + (i + d) mod G. */
static inline __m512 rotate4(__m512 v, int d) {
  if (d == 1) return _mm512_permute_ps(v, 0x39);
  if (d == 2) return _mm512_permute_ps(v, 0x4E);
  return _mm512_permute_ps(v, 0x93);
}
static inline __m512 rotate8(__m512 v, int d) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i start = _mm512_and_si512(lane, _mm512_set1_epi32(~7));
  const __m512i within = _mm512_and_si512(_mm512_add_epi32(lane, _mm512_set1_epi32(d)),
                                          _mm512_set1_epi32(7));
  return _mm512_permutexvar_ps(_mm512_or_si512(start, within), v);
}

/* One thread's rows [begin, end) of the N*Ho output rows into part[C/16][3][3][G][16]. The loops
 * over taps and diagonals have constant bounds and are fully unrolled so that the 3*G
 * accumulators of one kernel row stay in registers. */
#define DEFINE_WGRAD(NAME, ELEM, MLOAD, G, ROTATE)                                                 \
  static void NAME(const char *x, const char *gy, float *part, int H, int W, int C, int s,      \
                   int Ho, int Wo, long begin, long end) {                                      \
    const long px = (long)C * ELEM; /* bytes per pixel */                                       \
    for (long row = begin; row < end; ++row) {                                                  \
      const long n = row / Ho;                                                                  \
      const int oh = (int)(row % Ho);                                                           \
      const char *grow = gy + row * Wo * px;                                                    \
      /* the next output row's gradient row and its new bottom input row (NULL past the end) */ \
      const char *gnext = row + 1 < end ? grow + Wo * px : 0;                                   \
      const int ihn = ((int)((row + 1) % Ho)) * s + 1;                                          \
      const char *xnext = gnext && ihn < H ? x + (((row + 1) / Ho) * H + ihn) * W * px : 0;     \
      for (int kh = 0; kh < 3; ++kh) {                                                          \
        const int ih = oh * s - 1 + kh;                                                         \
        if (ih < 0 || ih >= H) continue;                                                        \
        const char *xrow = x + (n * H + ih) * W * px;                                           \
        for (int cb = 0; cb < C / 16; ++cb) {                                                   \
          float *acc_at = part + (((long)cb * 3 + kh) * 3) * G * 16;                            \
          __m512 acc[3][G];                                                                     \
          _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; ++kw)                                \
              _Pragma("GCC unroll 8") for (int d = 0; d < G; ++d) acc[kw][d] =                  \
                  _mm512_loadu_ps(acc_at + (kw * G + d) * 16);                                  \
          const long off = (long)cb * 16 * ELEM;                                                \
          for (int ow = 0; ow < Wo; ++ow) {                                                     \
            if (ow + 4 < Wo) _mm_prefetch(grow + (ow + 4) * px + off, _MM_HINT_T0);             \
            if (kh == 0 && gnext) {                                                             \
              _mm_prefetch(gnext + ow * px + off, _MM_HINT_T1);                                 \
              /* at stride 2 two input rows are new, and a row has twice the columns */          \
              for (int q = 0; xnext && q < s * s; ++q)                                          \
                _mm_prefetch(xnext - (q / s) * W * px + ((long)ow * s + q % s) * px + off,      \
                             _MM_HINT_T1);                                                      \
            }                                                                                   \
            const __m512 g = MLOAD(0xFFFF, grow + ow * px + off);                               \
            __m512 xv[3];                                                                       \
            _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; ++kw) {                            \
              const int iw = ow * s - 1 + kw;                                                   \
              /* columns outside the image read as zeros (a masked load never faults) */        \
              const __mmask16 in = (iw >= 0 && iw < W) ? 0xFFFF : 0;                            \
              xv[kw] = MLOAD(in, xrow + (long)iw * px + off);                                   \
            }                                                                                   \
            _Pragma("GCC unroll 8") for (int d = 0; d < G; ++d) {                               \
              const __m512 r = d ? ROTATE(g, d) : g;                                            \
              _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; ++kw) acc[kw][d] =               \
                  _mm512_fmadd_ps(r, xv[kw], acc[kw][d]);                                       \
            }                                                                                   \
          }                                                                                     \
          _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; ++kw)                                \
              _Pragma("GCC unroll 8") for (int d = 0; d < G; ++d)                               \
                  _mm512_storeu_ps(acc_at + (kw * G + d) * 16, acc[kw][d]);                     \
        }                                                                                       \
      }                                                                                         \
    }                                                                                           \
  }

DEFINE_WGRAD(wgrad_f32_g4, 4, mload_f32, 4, rotate4)
DEFINE_WGRAD(wgrad_bf16_g4, 2, mload_bf16, 4, rotate4)
DEFINE_WGRAD(wgrad_f32_g8, 4, mload_f32, 8, rotate8)
DEFINE_WGRAD(wgrad_bf16_g8, 2, mload_bf16, 8, rotate8)

typedef void (*wgrad_fn)(const char *, const char *, float *, int, int, int, int, int, int, long,
                         long);

int grouped3x3_wgrad_supported(int C, int cpg, int s) {
  return C > 0 && C % 16 == 0 && (cpg == 4 || cpg == 8) && (s == 1 || s == 2);
}

/* dw (fp32, [C][cpg][3][3]) of the convolution that read x (N x H x W) and produced gy. Returns 0,
 * 1 for a shape it does not take, 2 if memory for the per-thread sums could not be allocated. */
int grouped3x3_wgrad_nhwc(const void *x, const void *gy, float *dw, int bf16, int N, int H, int W,
                          int C, int cpg, int s, int threads) {
  if (!grouped3x3_wgrad_supported(C, cpg, s) || N < 0 || H < 1 || W < 1 || threads < 1) return 1;
  const int Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1;
  const long per_thread = (long)C * 9 * cpg; /* C/16 blocks x 9 taps x cpg diagonals x 16 */
  float *part = (float *)calloc((size_t)threads * per_thread, sizeof(float));
  if (!part) return 2;
  wgrad_fn fn = cpg == 4 ? (bf16 ? wgrad_bf16_g4 : wgrad_f32_g4)
                         : (bf16 ? wgrad_bf16_g8 : wgrad_f32_g8);
  const long rows = (long)N * Ho;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), used = omp_get_num_threads();
    const long begin = rows * t / used, end = rows * (t + 1) / used;
    fn((const char *)x, (const char *)gy, part + t * per_thread, H, W, C, s, Ho, Wo, begin, end);
  }
  for (int t = 1; t < threads; ++t)
    for (long i = 0; i < per_thread; ++i) part[i] += part[t * per_thread + i];
  /* part[cb][kh][kw][d][l]: output channel g + (i + d) mod cpg, input i, where l = g + i. */
  for (int cb = 0; cb < C / 16; ++cb)
    for (int tap = 0; tap < 9; ++tap)
      for (int d = 0; d < cpg; ++d)
        for (int l = 0; l < 16; ++l) {
          const int i = l % cpg, co = cb * 16 + (l - i) + (i + d) % cpg;
          dw[((long)co * cpg + i) * 9 + tap] = part[(((long)cb * 9 + tap) * cpg + d) * 16 + l];
        }
  free(part);
  return 0;
}
