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

/* The rows the next output row (row + 1) reads first: its gradient row (*gnext) and its new bottom
 * input row (*xnext; at stride 2 the row above it is new too). NULL where there is none in this
 * thread's range. The per-block loops walk each row 16 or 32 channels at a time, a strided pattern
 * the hardware prefetcher does not follow into DRAM, so the kernels prefetch these as they go. */
static inline void next_rows(const char *x, const char *gy, long row, long end, int H, int W,
                             int Ho, int Wo, int s, long px, const char **gnext,
                             const char **xnext) {
  *gnext = row + 1 < end ? gy + (row + 1) * Wo * px : 0;
  const int ihn = ((int)((row + 1) % Ho)) * s + 1;
  *xnext = *gnext && ihn < H ? x + (((row + 1) / Ho) * H + ihn) * W * px : 0;
}

/* Prefetch, at byte offset `off` of each pixel, output columns [ow, ow + cols) of the next
 * gradient row and the input columns they read in the new input rows. */
/* always inline: a call inside the kernels' loops would spill their accumulators */
static inline __attribute__((always_inline)) void prefetch_next(const char *gnext,
                                                                const char *xnext, int ow,
                                                                int cols, int s, int W, long px,
                                                                long off) {
  if (!gnext) return;
  for (int q = 0; q < cols; ++q) _mm_prefetch(gnext + (long)(ow + q) * px + off, _MM_HINT_T1);
  for (int q = 0; xnext && q < cols * s * s; ++q)
    _mm_prefetch(xnext - (q / (cols * s)) * W * px + ((long)ow * s + q % (cols * s)) * px + off,
                 _MM_HINT_T1);
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
      const char *gnext, *xnext;                                                                \
      next_rows(x, gy, row, end, H, W, Ho, Wo, s, px, &gnext, &xnext);                          \
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
            if (kh == 0) prefetch_next(gnext, xnext, ow, 1, s, W, px, off);                     \
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

/* bf16 with the AVX512-BF16 pair dot product, for C a multiple of 32 (twice the FMA rate, and
 * no widening of the inputs). The sum runs over pixels, so the pairs are pairs of pixels: the
 * 32 channels of two neighbouring output columns are interleaved with one 16-bit unpack, which
 * puts channel pairs of 4 consecutive channels in each 128-bit lane, 8 channels apart between
 * lanes. Unpack "lo" holds channels 8k..8k+3 of lane k, "hi" holds 8k+4..8k+7; a group of 4 sits
 * in one lane of one half, a group of 8 in the same lane of both halves. Diagonal d multiplies
 * input channel i of a group by gradient channel (i + d) mod G. With G = 4 the rotated gradient
 * is an in-lane permute of one half; with G = 8 a two-source permute of (lo, hi) whose index
 * table (pair_index8) is made once per call. Each half keeps
 * 3 * G accumulators; a second pixel past the row's end, or an input column outside the image,
 * reads as zeros.
 * Partial sums: part[C/32][3][3][G][2][16], lane m of half h being channel 8(m/4) + 4h + m%4. */
static int pair_channel(int h, int m) { return 8 * (m / 4) + 4 * h + m % 4; }

/* idx[d][h]: for lane m of half h, where gradient channel (i + d) mod 8 of its group sits. */
static void pair_index8(__m512i idx[8][2]) {
  for (int d = 0; d < 8; ++d)
    for (int h = 0; h < 2; ++h) {
      int at[16];
      for (int m = 0; m < 16; ++m) {
        const int ch = pair_channel(h, m), co = ch - ch % 8 + (ch % 8 + d) % 8;
        at[m] = 16 * ((co % 8) / 4) + 4 * (co / 8) + co % 4; /* where co sits in (lo, hi) */
      }
      idx[d][h] = _mm512_loadu_si512(at);
    }
}

static inline __m512i pixel32(const char *p, int ok) {
  return _mm512_maskz_loadu_epi16(ok ? 0xFFFFFFFFu : 0, p);
}

#define DEFINE_WGRAD_PAIRS(NAME, G)                                                              \
  static void NAME(const char *x, const char *gy, float *part, int H, int W, int C, int s,      \
                   int Ho, int Wo, long begin, long end) {                                      \
    const long px = (long)C * 2;                                                                \
    __m512i idx[8][2];                                                                          \
    if (G == 8) pair_index8(idx);                                                               \
    for (long row = begin; row < end; ++row) {                                                  \
      const long n = row / Ho;                                                                  \
      const int oh = (int)(row % Ho);                                                           \
      const char *grow = gy + row * Wo * px;                                                    \
      const char *gnext, *xnext;                                                                \
      next_rows(x, gy, row, end, H, W, Ho, Wo, s, px, &gnext, &xnext);                          \
      for (int kh = 0; kh < 3; ++kh) {                                                          \
        const int ih = oh * s - 1 + kh;                                                         \
        if (ih < 0 || ih >= H) continue;                                                        \
        const char *xrow = x + (n * H + ih) * W * px;                                           \
        for (int cb = 0; cb < C / 32; ++cb) {                                                   \
          const long off = (long)cb * 64;                                                       \
          for (int h = 0; h < 2; ++h) {                                                         \
            float *acc_at = part + ((long)cb * 9 + kh * 3) * G * 32 + h * 16;                   \
            __m512 acc[3][G];                                                                   \
            _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; ++kw)                              \
                _Pragma("GCC unroll 8") for (int d = 0; d < G; ++d) acc[kw][d] =                \
                    _mm512_loadu_ps(acc_at + (kw * G + d) * 32);                                \
            __m512i carry = _mm512_setzero_si512();                                             \
            for (int ow = 0; ow < Wo; ow += 2) {                                                \
              const int two = ow + 1 < Wo;                                                      \
              if (kh == 0 && h == 0) prefetch_next(gnext, xnext, ow, 2, s, W, px, off);         \
              const __m512i ga = pixel32(grow + ow * px + off, 1);                              \
              const __m512i gb = pixel32(grow + (ow + 1) * px + off, two);                      \
              __m512i glo, ghi;                                                                 \
              if (G == 4) /* a group lies in one half: only that half is needed */              \
                glo = ghi = h ? _mm512_unpackhi_epi16(ga, gb) : _mm512_unpacklo_epi16(ga, gb);  \
              else {                                                                            \
                glo = _mm512_unpacklo_epi16(ga, gb);                                            \
                ghi = _mm512_unpackhi_epi16(ga, gb);                                            \
              }                                                                                 \
              __m512i xv[3];                                                                    \
              _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; ++kw) {                          \
                /* at stride 1 the first pair is the previous step's last one */               \
                if (kw == 0 && s == 1 && ow > 0 && two) {                                       \
                  xv[0] = carry;                                                                \
                  continue;                                                                     \
                }                                                                               \
                const int iw = ow * s - 1 + kw, jw = iw + s;                                    \
                const __m512i xa = pixel32(xrow + (long)iw * px + off, iw >= 0 && iw < W);      \
                const __m512i xb = pixel32(xrow + (long)jw * px + off, two && jw < W);          \
                xv[kw] = h ? _mm512_unpackhi_epi16(xa, xb) : _mm512_unpacklo_epi16(xa, xb);     \
              }                                                                                 \
              carry = xv[2];                                                                    \
              _Pragma("GCC unroll 8") for (int d = 0; d < G; ++d) {                             \
                __m512i r;                                                                      \
                if (G == 4) /* rotation within 128-bit lanes: the cheaper in-lane permute */    \
                  r = d ? _mm512_castps_si512(rotate4(_mm512_castsi512_ps(glo), d)) : glo;      \
                else                                                                            \
                  r = _mm512_permutex2var_epi32(glo, idx[d][h], ghi);                           \
                _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; ++kw) acc[kw][d] =             \
                    _mm512_dpbf16_ps(acc[kw][d], (__m512bh)r, (__m512bh)xv[kw]);                \
              }                                                                                 \
            }                                                                                   \
            _Pragma("GCC unroll 3") for (int kw = 0; kw < 3; ++kw)                              \
                _Pragma("GCC unroll 8") for (int d = 0; d < G; ++d)                             \
                    _mm512_storeu_ps(acc_at + (kw * G + d) * 32, acc[kw][d]);                   \
          }                                                                                     \
        }                                                                                       \
      }                                                                                         \
    }                                                                                           \
  }

DEFINE_WGRAD_PAIRS(wgrad_pairs_g4, 4)
DEFINE_WGRAD_PAIRS(wgrad_pairs_g8, 8)

typedef void (*wgrad_fn)(const char *, const char *, float *, int, int, int, int, int, int, long,
                         long);

int grouped3x3_wgrad_supported(int C, int cpg, int s) {
  return C > 0 && C % 16 == 0 && (cpg == 4 || cpg == 8) && (s == 1 || s == 2);
}

/* dw (fp32, [C][cpg][3][3]) of the convolution that read x (N x H x W) and produced gy. Returns 0,
 * 1 for a shape it does not take, 2 if memory for the per-thread sums could not be allocated. */
int grouped3x3_wgrad_nhwc(const void *x, const void *gy, float *dw, int bf16, int pairs, int N,
                          int H, int W, int C, int cpg, int s, int threads) {
  if (!grouped3x3_wgrad_supported(C, cpg, s) || N < 0 || H < 1 || W < 1 || threads < 1) return 1;
  pairs = pairs && bf16 && C % 32 == 0;
  const int Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1;
  const long per_thread = (long)C * 9 * cpg; /* C/16 blocks x 9 taps x cpg diagonals x 16 */
  float *part = (float *)calloc((size_t)threads * per_thread, sizeof(float));
  if (!part) return 2;
  wgrad_fn fn;
  if (pairs)
    fn = cpg == 4 ? wgrad_pairs_g4 : wgrad_pairs_g8;
  else
    fn = cpg == 4 ? (bf16 ? wgrad_bf16_g4 : wgrad_f32_g4) : (bf16 ? wgrad_bf16_g8 : wgrad_f32_g8);
  const long rows = (long)N * Ho;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), used = omp_get_num_threads();
    const long begin = rows * t / used, end = rows * (t + 1) / used;
    fn((const char *)x, (const char *)gy, part + t * per_thread, H, W, C, s, Ho, Wo, begin, end);
  }
  for (int t = 1; t < threads; ++t)
    for (long i = 0; i < per_thread; ++i) part[i] += part[t * per_thread + i];
  /* Diagonal d of input channel c (i = c mod cpg) is output channel c - i + (i + d) mod cpg.
   * part[cb][tap][d][l] (16-channel blocks, c = 16 cb + l), or with pairs
   * part[cb][tap][d][h][m] (32-channel blocks, c = 32 cb + pair_channel(h, m)). */
  const int block = pairs ? 32 : 16;
  for (int cb = 0; cb < C / block; ++cb)
    for (int tap = 0; tap < 9; ++tap)
      for (int d = 0; d < cpg; ++d)
        for (int l = 0; l < block; ++l) {
          const int c = cb * block + (pairs ? pair_channel(l / 16, l % 16) : l);
          const int i = c % cpg, co = c - i + (i + d) % cpg;
          dw[((long)co * cpg + i) * 9 + tap] = part[(((long)cb * 9 + tap) * cpg + d) * block + l];
        }
  free(part);
  return 0;
}
