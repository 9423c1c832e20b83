/* bf16 matrix product for 1x1 convolutions, channels-last, with AVX512-BF16 pair dot products.
 *
 * Why this kernel exists: on the project's 2-core machine oneDNN runs ResNeXt-50's 1x1
 * convolutions at 660-750 GFLOP/s at 7x7 maps and 920-960 at 14x14 and 28x28 (cold caches,
 * benchmarks/bench_pointwise_gemm.py), against the CPU's ~1,070 GFLOP/s bf16 peak; most of the
 * shortfall at 7x7 is one thread finishing early. This product splits the rows evenly between
 * the threads and stays at 920-1,050 on all of those shapes.
 *
 *   y[m][n] = sum over k of a[m][k] * b[k][n]     (float32 sums, rounded once to bf16)
 *
 * a: M rows of K bf16 values, row stride lda (a channels-last activation: one row per pixel).
 * b: packed as bp[K/2][N][2], the pair (b[2j][n], b[2j+1][n]) in one 32-bit word, the operand
 *    layout of VDPBF16PS. A forward 1x1 convolution has b[k][n] = w[n][k]; its input gradient
 *    has a = the output gradient and b[k][n] = w[k][n].
 * y: M rows of N bf16 values, row stride ldy.
 *
 * The register tile is MR rows x 64 columns (24 float32 accumulators): per pair of k, four
 * loads of b and one broadcast of an a pair per row feed 24 dot products. Each thread takes a
 * contiguous, equal share of the rows, walks it in blocks of MC rows (kept in L2 while every
 * 64-column strip of b passes over them) and prefetches the next tile's a rows and y rows
 * (the y lines for writing: without it, 56x56 shapes ran ~10 % slower than oneDNN).
 *
 * The weight gradient (pointwise_wgrad_bf16, at the end) reduces over pixels instead and uses the
 * same register tile on operands interleaved in pairs of pixel rows.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "bf16_io.h"
#include "pair_tile.h"

#define MC 48
#ifndef COLUMN_SPLIT_ROWS /* -D overrides are for timing other values */
#define COLUMN_SPLIT_ROWS 256
#endif

/* One MR x NR tile of y over all of K. Rows past `rows` repeat the last row's a (no reads beyond
 * the matrix) and are not stored. */
static inline __attribute__((always_inline)) void tile(const uint16_t *a, long lda,
                                                       const uint16_t *b, long b_step, int K,
                                                       uint16_t *y, long ldy, int rows,
                                                       const float *bias, const uint16_t *res,
                                                       int relu) {
  const uint16_t *arow[MR];
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; i++) {
    arow[i] = a + (i < rows ? i : rows - 1) * lda;
#pragma GCC unroll 4
    for (int j = 0; j < NV; j++) acc[i][j] = _mm512_setzero_ps();
  }
  /* The next tile's rows (the caller walks down the rows of one strip): both cache lines of
   * each y row's 64 columns, and the first two of each a row, a 64-channel row whole (the
   * hardware prefetcher follows longer rows). One line of each ran 2-10 % slower at 56x56. */
#pragma GCC unroll 8
  for (int i = 0; i < MR; i++) {
    _m_prefetchw(y + (i + MR) * ldy);
    _m_prefetchw(y + (i + MR) * ldy + 32);
    _mm_prefetch((const char *)(a + (i + MR) * lda), _MM_HINT_T0);
    _mm_prefetch((const char *)(a + (i + MR) * lda + 32), _MM_HINT_T0);
  }
  dot_pairs(acc, arow, 2, b, b_step, K / 2);
  if (bias) { /* a convolution's epilogue: + bias (+ residual), ReLU, then one rounding */
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++) {
      if (i >= rows) break;
#pragma GCC unroll 4
      for (int j = 0; j < NV; j++) {
        acc[i][j] = _mm512_add_ps(acc[i][j], _mm512_loadu_ps(bias + 16 * j));
        if (res) {
          const __m256i r = _mm256_loadu_si256((const __m256i *)(res + i * ldy + 16 * j));
          acc[i][j] = _mm512_add_ps(acc[i][j], widen_bf16(r));
        }
        if (relu) acc[i][j] = _mm512_max_ps(acc[i][j], _mm512_setzero_ps());
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; i++) {
    if (i >= rows) break;
#pragma GCC unroll 2
    for (int j = 0; j < NV; j += 2) {
      /* round to nearest even; the second argument fills the low 16 lanes */
      const __m512bh v = _mm512_cvtne2ps_pbh(acc[i][j + 1], acc[i][j]);
      _mm512_storeu_si512(y + i * ldy + 16 * j, (__m512i)v);
    }
  }
}

/* The product over every row, each thread a contiguous, equal share of the tiles (of the column
 * strips, for few rows). b is bp[K/2][N][2] for the plain product; `strip_major` (the inference
 * convolution's) takes it as pointwise_conv_bf16 does, with `bias`: each stored value is then
 * relu?(sum + bias[n] + res[m][n]) (res, row stride ldy, may be NULL or y: a tile reads its
 * residual before it writes there). Returns 0, or 1 if the shape is not one this kernel takes
 * (N % 64, K odd, K < 2, bad sizes). */
static int product(const uint16_t *a, long lda, const uint16_t *bp, int strip_major, uint16_t *y,
                   long ldy, long M, int K, int N, const float *bias, const uint16_t *res,
                   int relu, int threads) {
  if (M < 0 || K < 2 || K % 2 || N < NR || N % NR || lda < K || ldy < N || threads < 1) return 1;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const long tiles = (M + MR - 1) / MR, strips = N / NR;
    long r0 = 0, r1 = M, s0 = 0, s1 = strips;
    if (M < COLUMN_SPLIT_ROWS && strips >= T) {
      /* Few rows (a 7x7 or 14x14 map at batch 1): each thread takes its share of the column
       * strips over all rows, so that each reads only its part of the weights, which then come
       * from memory; split by rows, every thread would read all of them. */
      s0 = strips * t / T;
      s1 = strips * (t + 1) / T;
    } else {
      r0 = tiles * t / T * MR;
      r1 = tiles * (t + 1) / T * MR;
      if (r1 > M) r1 = M;
    }
    for (long m0 = r0; m0 < r1; m0 += MC) {
      const long m1 = m0 + MC < r1 ? m0 + MC : r1;
      for (long n0 = s0 * NR; n0 < s1 * NR; n0 += NR)
        for (long m = m0; m < m1; m += MR) {
          const int rows = m1 - m < MR ? (int)(m1 - m) : MR;
          if (strip_major) /* the inference convolution's packing, with its epilogue */
            tile(a + m * lda, lda, bp + n0 * K, 2 * NR, K, y + m * ldy + n0, ldy, rows,
                 bias + n0, res ? res + m * ldy + n0 : 0, relu);
          else /* the plain product, as the training step uses it */
            tile(a + m * lda, lda, bp + 2 * n0, 2L * N, K, y + m * ldy + n0, ldy, rows, 0, 0, 0);
        }
    }
  }
  return 0;
}

int pointwise_gemm_bf16(const uint16_t *a, long lda, const uint16_t *bp, uint16_t *y, long ldy,
                        long M, int K, int N, int threads) {
  return product(a, lda, bp, 0, y, ldy, M, K, N, 0, 0, 0, threads);
}

/* A stride-1 1x1 convolution for inference: y = relu?(a b + bias + res), rows of K and N values
 * (channels-last pixels), res NULL or N-value rows (may be y itself). `bs` holds b strip by
 * strip, bs[N/64][K/2][64][2], so that each strip's weights are one contiguous run: at batch 1
 * they come from memory, and strided pair rows (the product's layout) streamed at a fraction of
 * the bandwidth (7x7 layers took 1.3x oneDNN's time, caches cold). Returns as the product. */
int pointwise_conv_bf16(const uint16_t *a, const uint16_t *bs, const float *bias,
                        const uint16_t *res, uint16_t *y, long M, int K, int N, int relu,
                        int threads) {
  if (!bias) return 1;
  return product(a, K, bs, 1, y, N, M, K, N, bias, res, relu, threads);
}

/* 32 consecutive values of a weight row as bf16 (rounded to nearest even from float32). */
static inline __m512i load32(const void *src, long offset, int f32) {
  if (!f32) return _mm512_loadu_si512((const uint16_t *)src + offset);
  const float *p = (const float *)src + offset;
  return (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + 16), _mm512_loadu_ps(p));
}

/* r[i][j] -> r[j][i] for a 16 x 16 block of 32-bit words. */
static inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  /* u[4q + c] holds, in 128-bit lane L, rows 4q..4q+3 of column 4L + c */
  for (int q = 0; q < 16; q += 4) {
    u[q] = _mm512_unpacklo_epi64(t[q], t[q + 2]);
    u[q + 1] = _mm512_unpackhi_epi64(t[q], t[q + 2]);
    u[q + 2] = _mm512_unpacklo_epi64(t[q + 1], t[q + 3]);
    u[q + 3] = _mm512_unpackhi_epi64(t[q + 1], t[q + 3]);
  }
  /* t[8h + 4e + c]: lanes (u[8h+c].L(e), u[8h+c].L(e+2), u[8h+4+c].L(e), u[8h+4+c].L(e+2)) */
  for (int h = 0; h < 2; h++)
    for (int c = 0; c < 4; c++) {
      t[8 * h + c] = _mm512_shuffle_i32x4(u[8 * h + c], u[8 * h + 4 + c], 0x88);
      t[8 * h + 4 + c] = _mm512_shuffle_i32x4(u[8 * h + c], u[8 * h + 4 + c], 0xdd);
    }
  /* column 4L + c gathers lane L of u[c], u[4+c], u[8+c], u[12+c] */
  for (int i = 0; i < 8; i++) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
  }
}

/* bp[j][n] = (w[n][2j], w[n][2j+1]) from a row-major w[N][K] (float32 if f32, else bf16): the
 * forward convolution's operand (its weight, one row per output channel). Blocks of 16 rows x
 * 16 pairs are read as 16 registers of pairs and transposed. */
int pack_pairs_rows(const void *w, int f32, uint16_t *bp, int N, int K, int threads) {
  if (N < 16 || N % 16 || K < 32 || K % 32 || threads < 1) return 1;
  const long blocks = (long)(N / 16) * (K / 32);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long blk = 0; blk < blocks; blk++) {
    const int n0 = (int)(blk % (N / 16)) * 16, k0 = (int)(blk / (N / 16)) * 32;
    __m512i r[16];
    for (int i = 0; i < 16; i++) r[i] = load32(w, (long)(n0 + i) * K + k0, f32);
    transpose16(r);
    for (int j = 0; j < 16; j++)
      _mm512_storeu_si512(bp + 2 * ((long)(k0 / 2 + j) * N + n0), r[j]);
  }
  return 0;
}

/* 32 pairs (even lane i, odd lane i) of two rows' 32 bf16 values, stored as 64 values at out. */
static inline void store_pairs(uint16_t *out, __m512i even, __m512i odd) {
  /* word i of the first store: lane i of each row (0..15); of the second, lane 16 + i */
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40,
                                      8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  _mm512_storeu_si512(out, _mm512_permutex2var_epi16(even, lo, odd));
  _mm512_storeu_si512(out + 32, _mm512_permutex2var_epi16(even, hi, odd));
}

/* bp[j][n] = (w[2j][n], w[2j+1][n]) from a row-major w[K][N] (float32 if f32, else bf16): the
 * input gradient's operand (the weight itself, K = output channels, N = input channels). Two
 * rows' 32 values interleave into 32 pairs: two stores per 32 columns. */
int pack_pairs_cols(const void *w, int f32, uint16_t *bp, int K, int N, int threads) {
  if (N < 32 || N % 32 || K < 2 || K % 2 || threads < 1) return 1;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int j = 0; j < K / 2; j++) {
    uint16_t *out = bp + 2 * (long)j * N;
    for (int n = 0; n < N; n += 32) {
      const __m512i e = load32(w, (long)(2 * j) * N + n, f32);
      const __m512i o = load32(w, (long)(2 * j + 1) * N + n, f32);
      store_pairs(out + 2 * n, e, o);
    }
  }
  return 0;
}

/* Pairs of rows interleaved: dst[j][c] = (src[2j][c], src[2j+1][c]) for j < kp and columns
 * c < width (a multiple of 32); rows past `rows` and columns past `valid` are zeros. */
static void interleave_rows(const uint16_t *src, long ld, int rows, int kp, int width, int valid,
                            uint16_t *dst) {
  for (int j = 0; j < kp; j++) {
    const uint16_t *even = src + 2L * j * ld, *odd = even + ld;
    uint16_t *out = dst + 2L * j * width;
    for (int c = 0; c < width; c += 32) {
      const int left = valid - c;
      const __mmask32 m = left >= 32 ? 0xffffffffu : left <= 0 ? 0u : (1u << left) - 1;
      const __m512i zero = _mm512_setzero_si512();
      const __m512i e = 2 * j < rows ? _mm512_maskz_loadu_epi16(m, even + c) : zero;
      const __m512i o = 2 * j + 1 < rows ? _mm512_maskz_loadu_epi16(m, odd + c) : zero;
      store_pairs(out + 2 * c, e, o);
    }
  }
}

#define KC 256 /* pixel rows per block of the weight gradient: its packed operands stay in L2 */

/* The weight gradient of a 1x1 convolution, float32:
 *   dw[co][ci] = sum over m of g[m][co] * x[m][ci]
 * g: M rows of Cout bf16 (the output gradient), x: M rows of Cin bf16 (the input), Cin % 64 == 0.
 * The reduction runs over pixels, so both operands are interleaved in pairs of pixel rows, KC rows
 * at a time, into per-thread buffers; each thread takes half of the pixels into its own sums
 * (thread 0 straight into dw), and the sums are added at the end. Returns 0, 1 for a shape it
 * does not take, 2 if memory for the buffers could not be had. */
int pointwise_wgrad_bf16(const uint16_t *g, const uint16_t *x, float *dw, long M, int Cout,
                         int Cin, int threads) {
  if (M < 0 || Cout < 1 || Cin < NR || Cin % NR || threads < 1) return 1;
  const int width = (Cout + 31) & ~31;
  const long size = (long)Cout * Cin;
  float *part = threads > 1 ? malloc(sizeof(float) * size * (threads - 1)) : NULL;
  if (threads > 1 && !part) return 2;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    float *d = t == 0 ? dw : part + (t - 1) * size;
    const long pairs = (M + 1) / 2;
    const long m_begin = 2 * (pairs * t / T), m_stop = 2 * (pairs * (t + 1) / T);
    const long m_end = m_stop < M ? m_stop : M; /* an odd M: the last pair has one row */
    uint16_t *xp = aligned_alloc(64, sizeof(uint16_t) * KC * Cin);
    uint16_t *gp = aligned_alloc(64, sizeof(uint16_t) * KC * width);
    if (!xp || !gp) failed = 1;
    if (!failed && m_end <= m_begin) memset(d, 0, sizeof(float) * size);
    for (long m0 = m_begin; !failed && m0 < m_end; m0 += KC) {
      const int rows = m_end - m0 < KC ? (int)(m_end - m0) : KC, kp = (rows + 1) / 2;
      interleave_rows(x + m0 * Cin, Cin, rows, kp, Cin, Cin, xp);
      interleave_rows(g + m0 * Cout, Cout, rows, kp, width, Cout, gp);
      for (int co = 0; co < Cout; co += MR) {
        const int nrows = Cout - co < MR ? Cout - co : MR;
        const uint16_t *arow[MR];
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) arow[i] = gp + 2 * (co + (i < nrows ? i : nrows - 1));
        for (int ci = 0; ci < Cin; ci += NR) {
          float *out = d + (long)co * Cin + ci;
          __m512 acc[MR][NV];
#pragma GCC unroll 8
          for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++)
              acc[i][j] = m0 == m_begin || i >= nrows ? _mm512_setzero_ps()
                                                      : _mm512_loadu_ps(out + i * Cin + 16 * j);
          dot_pairs(acc, arow, 2L * width, xp + 2 * ci, 2L * Cin, kp);
#pragma GCC unroll 8
          for (int i = 0; i < MR; i++) {
            if (i >= nrows) break;
#pragma GCC unroll 4
            for (int j = 0; j < NV; j++) _mm512_storeu_ps(out + i * Cin + 16 * j, acc[i][j]);
          }
        }
      }
    }
    free(xp);
    free(gp);
#pragma omp barrier
    /* each thread adds the other threads' sums into its share of dw */
    const long begin = size * t / T / 16 * 16;
    const long end = t == T - 1 ? size : size * (t + 1) / T / 16 * 16;
    for (int p = 0; !failed && p < T - 1; p++) {
      const float *q = part + p * size;
      long i = begin;
      for (; i + 16 <= end; i += 16)
        _mm512_storeu_ps(dw + i, _mm512_add_ps(_mm512_loadu_ps(dw + i), _mm512_loadu_ps(q + i)));
      for (; i < end; i++) dw[i] += q[i];
    }
  }
  free(part);
  return failed ? 2 : 0;
}
