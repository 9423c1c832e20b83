/* Weight gradient of a grouped 3x3 convolution (padding 1, stride 1 or 2), channels-last float32,
 * AVX2 + FMA: the AVX-512 kernel's scheme (grouped3x3_wgrad.c) on 8-lane registers.
 *
 *   dw[co][ci][kh][kw] = sum over n, oh, ow of gy[n][oh][ow][co] * x[n][oh*s-1+kh][ow*s-1+kw][ci]
 *
 * with co and ci in the same group of G = 4 or 8 channels. A register holds 8 consecutive
 * channels (two groups of 4, or one of 8). The G x G products of a group are split into G
 * diagonals: diagonal d multiplies input lane i of a group by the gradient lane (i + d) mod G of
 * the same group, so each (tap, diagonal) pair is one accumulator fed by plain fused
 * multiply-adds. With 16 registers a pass keeps the 3 taps of one kernel row for 4 diagonals (12
 * accumulators); G = 8 takes two passes over the row. Threads take whole output rows and keep
 * private sums in the diagonal layout; they are added and scattered to dw at the end.
 *
 * Groups of 16, 32 or 64 channels (`wgrad_wide`) are small matrix products instead: per group,
 * kernel row and output pixel, 4 output channels' gradients broadcast times the 3 taps' 8 input
 * channels, 12 accumulators (4 outputs x 8 inputs x 3 taps). Each thread takes its rows in chunks
 * of about CHUNK_LINES cache lines of the group (24 KB: L1), and runs every (group, outputs,
 * inputs, kernel row) pass over one chunk before the next, so that the passes after the first
 * read their rows from L1: 1.3-2x faster than chunks sized for L2 (ad hoc, Zen 3).
 *
 * Layout: x[N][H][W][C] and gy[N][Ho][Wo][C] float32; dw[C][G][3][3] float32.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdlib.h>

/* Lane l = g + i (group start g) takes lane g + (i + d) mod G. */
static inline __m256 rotate(__m256 v, int G, int d) {
  if (G == 4) {
    if (d == 1) return _mm256_permute_ps(v, 0x39);
    if (d == 2) return _mm256_permute_ps(v, 0x4E);
    return _mm256_permute_ps(v, 0x93);
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_permutevar8x32_ps(v, _mm256_and_si256(_mm256_add_epi32(lane, _mm256_set1_epi32(d)),
                                                      _mm256_set1_epi32(7)));
}

/* One thread's rows [begin, end) of the N*Ho output rows into part[C/8][3][3][G][8]. The loops
 * over taps and diagonals have constant bounds and are fully unrolled so that the accumulators
 * stay in registers. */
#define DEFINE_WGRAD(NAME, G)                                                                     \
  static void NAME(const float *x, const float *gy, float *part, int H, int W, int C, int s,    \
                   int Ho, int Wo, long begin, long end) {                                      \
    for (long row = begin; row < end; ++row) {                                                  \
      const long n = row / Ho;                                                                  \
      const int oh = (int)(row % Ho);                                                           \
      const float *grow = gy + row * Wo * C;                                                    \
      for (int kh = 0; kh < 3; ++kh) {                                                          \
        const int ih = oh * s - 1 + kh;                                                         \
        if (ih < 0 || ih >= H) continue;                                                        \
        const float *xrow = x + (n * H + ih) * (long)W * C;                                     \
        for (int cb = 0; cb < C / 8; ++cb) {                                                    \
          _Pragma("GCC unroll 2") for (int d0 = 0; d0 < G; d0 += 4) {                           \
            float *acc_at = part + (((long)cb * 3 + kh) * 3) * G * 8;                           \
            __m256 acc[3][4];                                                                   \
            _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; ++kw)                              \
                _Pragma("GCC unroll 4") for (int d = 0; d < 4; ++d) acc[kw][d] =                \
                    _mm256_loadu_ps(acc_at + (kw * G + d0 + d) * 8);                            \
            const long off = (long)cb * 8;                                                      \
            for (int ow = 0; ow < Wo; ++ow) {                                                   \
              if (ow + 4 < Wo) _mm_prefetch((const char *)(grow + (ow + 4) * (long)C + off),    \
                                            _MM_HINT_T0);                                       \
              const __m256 g = _mm256_loadu_ps(grow + ow * (long)C + off);                      \
              __m256 xv[3];                                                                     \
              _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; ++kw) {                          \
                const int iw = ow * s - 1 + kw;                                                 \
                /* columns outside the image read as zeros */                                   \
                xv[kw] = (iw >= 0 && iw < W) ? _mm256_loadu_ps(xrow + (long)iw * C + off)        \
                                             : _mm256_setzero_ps();                             \
              }                                                                                 \
              _Pragma("GCC unroll 4") for (int d = 0; d < 4; ++d) {                             \
                const __m256 r = d0 + d ? rotate(g, G, d0 + d) : g;                             \
                _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; ++kw) acc[kw][d] =             \
                    _mm256_fmadd_ps(r, xv[kw], acc[kw][d]);                                     \
              }                                                                                 \
            }                                                                                   \
            _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; ++kw)                              \
                _Pragma("GCC unroll 4") for (int d = 0; d < 4; ++d)                             \
                    _mm256_storeu_ps(acc_at + (kw * G + d0 + d) * 8, acc[kw][d]);               \
          }                                                                                     \
        }                                                                                       \
      }                                                                                         \
    }                                                                                           \
  }

DEFINE_WGRAD(wgrad_g4, 4)
DEFINE_WGRAD(wgrad_g8, 8)

typedef void (*wgrad_fn)(const float *, const float *, float *, int, int, int, int, int, int, long,
                         long);

enum { CHUNK_LINES = 384 };

/* One pass: dw part for outputs co..co+3 and inputs ci..ci+7 of one group (x, gy already offset
 * to them), kernel row kh, over output rows [begin, end). acc_at: 3 taps x 4 outputs x 8 lanes. */
static void wide_pass(const float *x, const float *gy, float *acc_at, int H, int W, int C, int s,
                      int Ho, int Wo, int kh, long begin, long end) {
  __m256 a00 = _mm256_loadu_ps(acc_at), a01 = _mm256_loadu_ps(acc_at + 8),
         a02 = _mm256_loadu_ps(acc_at + 16), a03 = _mm256_loadu_ps(acc_at + 24),
         a10 = _mm256_loadu_ps(acc_at + 32), a11 = _mm256_loadu_ps(acc_at + 40),
         a12 = _mm256_loadu_ps(acc_at + 48), a13 = _mm256_loadu_ps(acc_at + 56),
         a20 = _mm256_loadu_ps(acc_at + 64), a21 = _mm256_loadu_ps(acc_at + 72),
         a22 = _mm256_loadu_ps(acc_at + 80), a23 = _mm256_loadu_ps(acc_at + 88);
  const __m256 zero = _mm256_setzero_ps();
  for (long row = begin; row < end; ++row) {
    const long n = row / Ho;
    const int ih = (int)(row % Ho) * s - 1 + kh;
    if (ih < 0 || ih >= H) continue;
    const float *grow = gy + row * Wo * (long)C;
    const float *xrow = x + (n * H + ih) * (long)W * C;
    for (int ow = 0; ow < Wo; ++ow) {
      const float *gp = grow + (long)ow * C;
      const int iw = ow * s - 1;
      /* columns outside the image read as zeros */
      const __m256 x0 = iw >= 0 ? _mm256_loadu_ps(xrow + (long)iw * C) : zero;
      const __m256 x1 = iw + 1 < W ? _mm256_loadu_ps(xrow + (long)(iw + 1) * C) : zero;
      const __m256 x2 = iw + 2 < W ? _mm256_loadu_ps(xrow + (long)(iw + 2) * C) : zero;
#define OUT(j)                                                                      \
  {                                                                                 \
    const __m256 g = _mm256_broadcast_ss(gp + j);                                   \
    a0##j = _mm256_fmadd_ps(g, x0, a0##j);                                          \
    a1##j = _mm256_fmadd_ps(g, x1, a1##j);                                          \
    a2##j = _mm256_fmadd_ps(g, x2, a2##j);                                          \
  }
      OUT(0) OUT(1) OUT(2) OUT(3)
#undef OUT
    }
  }
  _mm256_storeu_ps(acc_at, a00), _mm256_storeu_ps(acc_at + 8, a01);
  _mm256_storeu_ps(acc_at + 16, a02), _mm256_storeu_ps(acc_at + 24, a03);
  _mm256_storeu_ps(acc_at + 32, a10), _mm256_storeu_ps(acc_at + 40, a11);
  _mm256_storeu_ps(acc_at + 48, a12), _mm256_storeu_ps(acc_at + 56, a13);
  _mm256_storeu_ps(acc_at + 64, a20), _mm256_storeu_ps(acc_at + 72, a21);
  _mm256_storeu_ps(acc_at + 80, a22), _mm256_storeu_ps(acc_at + 88, a23);
}

/* The wide layout's block of group g, outputs co..co+3, inputs ci..ci+7 and kernel row kh: its
 * 96 sums (3 kw x 4 outputs x 8 inputs) start at part + 96 * wide_block(...). */
static inline long wide_block(int g, int co, int ci, int kh, int cpg) {
  return ((long)(g * (cpg / 4) + co / 4) * (cpg / 8) + ci / 8) * 3 + kh;
}

/* One thread's rows [begin, end) into part[C/cpg][cpg/4][cpg/8][3 kh][3 kw][4][8]: for each
 * group, block of 4 outputs and block of 8 inputs, the 9 taps' 4 x 8 sums. */
static void wgrad_wide(const float *x, const float *gy, float *part, int H, int W, int C, int cpg,
                       int s, int Ho, int Wo, long begin, long end) {
  /* a pass reads one gradient line and s input lines per output pixel of its group */
  const long fit = CHUNK_LINES / ((1L + s) * Wo);
  const long rows_per_chunk = fit > 1 ? fit : 1;
  for (long c0 = begin; c0 < end; c0 += rows_per_chunk) {
    const long c1 = c0 + rows_per_chunk < end ? c0 + rows_per_chunk : end;
    for (int g = 0; g < C / cpg; ++g)
      for (int co = 0; co < cpg; co += 4)
        for (int ci = 0; ci < cpg; ci += 8)
          for (int kh = 0; kh < 3; ++kh) {
            float *sums = part + 96 * wide_block(g, co, ci, kh, cpg);
            wide_pass(x + g * cpg + ci, gy + g * cpg + co, sums, H, W, C, s, Ho, Wo, kh, c0, c1);
          }
  }
}

static int wide(int cpg) { return cpg == 16 || cpg == 32 || cpg == 64; }

int grouped3x3_wgrad_supported(int C, int cpg, int s) {
  return C > 0 && C % 8 == 0 && (cpg == 4 || cpg == 8 || (wide(cpg) && C % cpg == 0)) &&
         (s == 1 || s == 2);
}

/* dw (fp32, [C][cpg][3][3]) of the convolution that read x (N x H x W) and produced gy, float32
 * only: the same entry point as the AVX-512 kernel's, refusing bf16 and pairs. Returns 0, 1 for
 * a shape or dtype it does not take, 2 if memory for the per-thread sums could not be allocated. */
int grouped3x3_wgrad_nhwc(const void *x, const void *gy, float *dw, int bf16, int pairs, int N,
                          int H, int W, int C, int cpg, int s, int threads) {
  if (!grouped3x3_wgrad_supported(C, cpg, s) || N < 0 || H < 1 || W < 1 || threads < 1) return 1;
  if (bf16 || pairs) return 1;
  const int Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1;
  /* C/8 blocks x 9 taps x cpg diagonals x 8, or in the wide layout C/cpg groups x cpg^2 x 9 */
  const long per_thread = (long)C * 9 * cpg;
  float *part = (float *)calloc((size_t)threads * per_thread, sizeof(float));
  if (!part) return 2;
  const wgrad_fn fn = cpg == 4 ? wgrad_g4 : wgrad_g8;
  const long rows = (long)N * Ho;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), used = omp_get_num_threads();
    const long begin = rows * t / used, end = rows * (t + 1) / used;
    if (wide(cpg))
      wgrad_wide((const float *)x, (const float *)gy, part + t * per_thread, H, W, C, cpg, s, Ho,
                 Wo, begin, end);
    else
      fn((const float *)x, (const float *)gy, part + t * per_thread, H, W, C, s, Ho, Wo, begin,
         end);
  }
  for (int t = 1; t < threads; ++t)
    for (long i = 0; i < per_thread; ++i) part[i] += part[t * per_thread + i];
  if (wide(cpg)) {
    /* part[g][co/4][ci/8][kh][kw][co%4][ci%8] to dw[g*cpg+co][ci][kh][kw] */
    for (int g = 0; g < C / cpg; ++g)
      for (int co = 0; co < cpg; ++co)
        for (int ci = 0; ci < cpg; ++ci)
          for (int tap = 0; tap < 9; ++tap)
            dw[((long)(g * cpg + co) * cpg + ci) * 9 + tap] =
                part[96 * wide_block(g, co, ci, tap / 3, cpg) + (tap % 3) * 32 + (co % 4) * 8 +
                     ci % 8];
    free(part);
    return 0;
  }
  /* Diagonal d of input channel c (i = c mod cpg) is output channel c - i + (i + d) mod cpg;
   * part[cb][tap][d][l] with c = 8 cb + l. */
  for (int cb = 0; cb < C / 8; ++cb)
    for (int tap = 0; tap < 9; ++tap)
      for (int d = 0; d < cpg; ++d)
        for (int l = 0; l < 8; ++l) {
          const int c = cb * 8 + l, i = c % cpg, co = c - i + (i + d) % cpg;
          dw[((long)co * cpg + i) * 9 + tap] = part[(((long)cb * 9 + tap) * cpg + d) * 8 + l];
        }
  free(part);
  return 0;
}
