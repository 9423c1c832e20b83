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
 * The register tile is 6 or 7 rows x 64 columns (pair_tile.h): per pair of k, four loads of b and
 * one broadcast of an a pair per row feed 24 or 28 dot products. Each thread takes a
 * contiguous, equal share of the rows, walks it in blocks of 8 tiles (kept in L2 while every
 * 64-column strip of b passes over them) and prefetches the next tile's a rows and y rows
 * (the y lines for writing: without it, 56x56 shapes ran ~10 % slower than oneDNN). The tile
 * and the walk are in pointwise_tile.h, which grouped3x3.c's fused first 1x1 shares.
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
#include "pointwise_tile.h"

#ifndef COLUMN_SPLIT_ROWS /* -D overrides are for timing other values */
#define COLUMN_SPLIT_ROWS 256
#endif

/* Thread t of T's share of the work: rows [r0, r1) of strips [s0, s1), and the tile height; few
 * rows (a 7x7 or 14x14 map at batch 1) are split by column strips, so that each thread reads
 * only its part of the weights, which then come from memory (split by rows, every thread would
 * read all of them); else by rows, in tiles of 7 rows (which divide a 7x7 map's 49) or 6. */
static inline int share(long M, int N, int t, int T, long *r0, long *r1, long *s0, long *s1) {
  const long strips = N / NR;
  const int few = M < COLUMN_SPLIT_ROWS && strips >= T, mr = few ? MR : 6;
  const long tiles = (M + mr - 1) / mr;
  *r0 = 0, *r1 = M, *s0 = 0, *s1 = strips;
  if (few) {
    *s0 = strips * t / T;
    *s1 = strips * (t + 1) / T;
  } else {
    *r0 = tiles * t / T * mr;
    *r1 = tiles * (t + 1) / T * mr;
    if (*r1 > M) *r1 = M;
  }
  return mr;
}

static int shape_refused(long M, int K, int N, long lda, long ldy, int threads) {
  return M < 0 || K < 2 || K % 2 || N < NR || N % NR || lda < K || ldy < N || threads < 1;
}

/* The product over every row, each thread a contiguous, equal share of the tiles (`share`). b is
 * bp[K/2][N][2] for the plain product; `strip_major` (the inference convolution's) takes it as
 * pointwise_conv_bf16 does, with `bias`: each stored value is then relu?(sum + bias[n] +
 * res[m][n]) (res, row stride ldy, may be NULL or y: a tile reads its residual before it writes
 * there). Returns 0, or 1 if the shape is not one this kernel takes (N % 64, K odd, K < 2, bad
 * sizes). */
static int product(const uint16_t *a, long lda, const uint16_t *bp, int strip_major, uint16_t *y,
                   long ldy, long M, int K, int N, const float *bias, const uint16_t *res,
                   int relu, int threads) {
  if (shape_refused(M, K, N, lda, ldy, threads)) return 1;
#pragma omp parallel num_threads(threads)
  {
    long r0, r1, s0, s1;
    if (share(M, N, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1, &s0, &s1) == MR)
      walk(a, lda, bp, strip_major, y, ldy, K, N, bias, res, relu, 0, 0, r0, r1, s0, s1, MR);
    else
      walk(a, lda, bp, strip_major, y, ldy, K, N, bias, res, relu, 0, 0, r0, r1, s0, s1, 6);
  }
  return 0;
}

/* `product` of the inference convolution with row m of a at a + offs[m] (a strided input), the
 * table padded with 9 MR more entries for the prefetches. Its own parallel region: sharing
 * `product`'s, the plain rows ran 3 % slower. */
static int strided_product(const uint16_t *a, const long *offs, const uint16_t *bs, uint16_t *y,
                           long M, int K, int N, const float *bias, const uint16_t *res, int relu,
                           int threads) {
  if (shape_refused(M, K, N, K, N, threads)) return 1;
#pragma omp parallel num_threads(threads)
  {
    long r0, r1, s0, s1;
    if (share(M, N, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1, &s0, &s1) == MR)
      walk(a, K, bs, 1, y, N, K, N, bias, res, relu, offs, 0, r0, r1, s0, s1, MR);
    else
      walk(a, K, bs, 1, y, N, K, N, bias, res, relu, offs, 0, r0, r1, s0, s1, 6);
  }
  return 0;
}

int pointwise_gemm_bf16(const uint16_t *a, long lda, const uint16_t *bp, uint16_t *y, long ldy,
                        long M, int K, int N, int threads) {
  return product(a, lda, bp, 0, y, ldy, M, K, N, 0, 0, 0, threads);
}

/* The revision of the exported functions' signatures: 2 since pointwise_conv_bf16 took the
 * maps' height, width and stride (a source without this function has the first, M rows); 3 since
 * pointwise_conv_bf16_shortcut exists. */
int pointwise_gemm_abi(void) { return 3; }

/* Row offsets (in values) of the pixels a stride-s 1x1 convolution reads from n h x w maps of K
 * channels, one per output pixel, then 9 MR copies of the last for the tiles' prefetches; NULL
 * if memory runs out. */
static long *strided_rows(long n, long h, long w, int K, int stride, long M) {
  const long ho = (h - 1) / stride + 1, wo = (w - 1) / stride + 1;
  long *offs = (long *)malloc(sizeof(long) * (M + 9 * MR));
  if (!offs) return 0;
  long m = 0;
  for (long img = 0; img < n; img++)
    for (long i = 0; i < ho; i++)
      for (long j = 0; j < wo; j++) offs[m++] = ((img * h + i * stride) * w + j * stride) * K;
  for (; m < M + 9 * MR; m++) offs[m] = M ? offs[M - 1] : 0;
  return offs;
}

/* A 1x1 convolution for inference: y = relu?(a b + bias + res) over n channels-last h x w maps
 * of K channels, every `stride`-th pixel of every stride-th row (a projection shortcut's stride
 * read in place, not gathered into a copy first), y and res (NULL, or y itself) n x ho x wo rows
 * of N values, ho = (h - 1) / stride + 1. `bs` holds b strip by strip, bs[N/64][K/2][64][2], so
 * that each strip's weights are one contiguous run: at batch 1 they come from memory, and
 * strided pair rows (the product's layout) streamed at a fraction of the bandwidth (7x7 layers
 * took 1.3x oneDNN's time, caches cold). Returns as the product, or 2 if the row table of a
 * strided one could not be allocated. */
int pointwise_conv_bf16(const uint16_t *a, const uint16_t *bs, const float *bias,
                        const uint16_t *res, uint16_t *y, long n, long h, long w, int K, int N,
                        int stride, int relu, int threads) {
  if (!bias || n < 0 || h < 1 || w < 1 || stride < 1) return 1;
  const long ho = (h - 1) / stride + 1, wo = (w - 1) / stride + 1, M = n * ho * wo;
  if (stride == 1) return product(a, K, bs, 1, y, N, M, K, N, bias, res, relu, threads);
  long *offs = strided_rows(n, h, w, K, stride, M);
  if (!offs) return 2;
  const int rc = strided_product(a, offs, bs, y, M, K, N, bias, res, relu, threads);
  free(offs);
  return rc;
}

/* A block's last 1x1 and its projection shortcut summed in one product, for inference:
 *   y = relu?(g w1 + x' w2 + bias)
 * g: n x h x w pixels of K1 channels (the last 1x1's input); x: n x hx x wx pixels of K2
 * channels, read at `stride` (x' its every stride-th pixel of every stride-th row, h = (hx - 1) /
 * stride + 1 and the same for w); y: n x h x w pixels of N. bs holds [w1; w2] strip by strip,
 * bs[N/64][(K1 + K2)/2][64][2] (both packed as pointwise_conv_bf16's, concatenated along the
 * pairs); bias the sum of both biases. The projection's output never goes to memory, and the
 * last 1x1 has no residual to read back. Returns 0, 1 for a shape the kernel does not take, 2 if
 * the row table could not be allocated. */
int pointwise_conv_bf16_shortcut(const uint16_t *g, const uint16_t *x, const uint16_t *bs,
                                 const float *bias, uint16_t *y, long n, long hx, long wx, int K1,
                                 int K2, int N, int stride, int relu, int threads) {
  if (!bias || n < 0 || hx < 1 || wx < 1 || stride < 1 || K2 < 2 || K2 % 2) return 1;
  const long h = (hx - 1) / stride + 1, w = (wx - 1) / stride + 1, M = n * h * w;
  if (shape_refused(M, K1, N, K1, N, threads)) return 1;
  long *offs = strided_rows(n, hx, wx, K2, stride, M);
  if (!offs) return 2;
  const Second second = {x, offs, K2};
#pragma omp parallel num_threads(threads)
  {
    long r0, r1, s0, s1;
    if (share(M, N, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1, &s0, &s1) == MR)
      walk(g, K1, bs, 1, y, N, K1, N, bias, 0, relu, 0, &second, r0, r1, s0, s1, MR);
    else
      walk(g, K1, bs, 1, y, N, K1, N, bias, 0, relu, 0, &second, r0, r1, s0, s1, 6);
  }
  free(offs);
  return 0;
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

/* x's rows interleaved strip by strip: dst[c / 64][j][c % 64][2], so that a 64-column strip's
 * kp pairs are one contiguous run, as the product's tile reads them (with all columns of a pair
 * together instead, the 7x7 layers ran 10-15 % slower). */
static void interleave_strips(const uint16_t *src, long ld, int rows, int kp, int width,
                              uint16_t *dst) {
  for (int j = 0; j < kp; j++) {
    const uint16_t *even = src + 2L * j * ld, *odd = even + ld;
    for (int c = 0; c < width; c += 32) {
      const __m512i zero = _mm512_setzero_si512();
      const __m512i e = 2 * j < rows ? _mm512_loadu_si512(even + c) : zero;
      const __m512i o = 2 * j + 1 < rows ? _mm512_loadu_si512(odd + c) : zero;
      store_pairs(dst + ((long)(c / NR) * kp + j) * 2 * NR + 2 * (c % NR), e, o);
    }
  }
}

/* Pixel rows per block of the weight gradient, at most: its packed operands stay in L2 (512 ran
 * 2 % slower in the training step). A thread's rows are cut into equal blocks. */
#define KC 256

/* d[co][ci] (+)= sum over rows m0 .. m1 - 1 of g[m][co] x[m][ci], for co0 <= co < co1 and every
 * ci (d's rows Cin apart, co counted from 0): blocks of at most `max_rows` pixel rows, interleaved
 * into xp (max_rows x Cin) and gp (max_rows x the range's columns rounded up to 32), the first
 * block storing its sums, the others adding to them. While a block computes, the next block's
 * rows are prefetched: their interleaving otherwise waited on memory (3-7 % at 56x56 and 28x28). */
static void weight_grad_rows(const uint16_t *g, const uint16_t *x, float *d, long m0, long m1,
                             int co0, int co1, int Cout, int Cin, long max_rows, uint16_t *xp,
                             uint16_t *gp) {
  const int cols = co1 - co0, width = (cols + 31) & ~31;
  const long blocks = (m1 - m0 + max_rows - 1) / max_rows;
  const long kc = blocks ? ((m1 - m0 + blocks - 1) / blocks + 1) / 2 * 2 : max_rows;
  for (long mb = m0; mb < m1; mb += kc) {
    const int rows = m1 - mb < kc ? (int)(m1 - mb) : (int)kc, kp = (rows + 1) / 2;
    interleave_strips(x + mb * Cin, Cin, rows, kp, Cin, xp);
    interleave_rows(g + mb * Cout + co0, Cout, rows, kp, width, cols, gp);
    /* the next block's rows of x, then of g: a share of their lines per tile row of co */
    const long next = mb + kc < m1 ? mb + kc : m1;
    const long next_rows = m1 - next < kc ? m1 - next : kc;
    const char *pfx = (const char *)(x + next * Cin), *pfg = (const char *)(g + next * Cout);
    const long xbytes = next_rows * Cin * 2, gbytes = next_rows * Cout * 2;
    const long tile_rows = (cols + MR - 1) / MR;
    const long per_tile = ((xbytes + gbytes) / 64 + tile_rows - 1) / tile_rows;
    long cursor = 0;
    for (int co = co0; co < co1; co += MR) {
      const int nrows = co1 - co < MR ? co1 - co : MR;
      for (long l = 0; l < per_tile; l++, cursor += 64) {
        if (cursor < xbytes)
          _mm_prefetch(pfx + cursor, _MM_HINT_T1);
        else if (cursor - xbytes < gbytes)
          _mm_prefetch(pfg + cursor - xbytes, _MM_HINT_T1);
      }
      const uint16_t *arow[MR];
#pragma GCC unroll 8
      for (int i = 0; i < MR; i++) arow[i] = gp + 2 * (co - co0 + (i < nrows ? i : nrows - 1));
      for (int ci = 0; ci < Cin; ci += NR) {
        float *out = d + (long)co * Cin + ci;
        __m512 acc[MR][NV];
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
          for (int j = 0; j < NV; j++)
            acc[i][j] = mb == m0 || i >= nrows ? _mm512_setzero_ps()
                                               : _mm512_loadu_ps(out + i * Cin + 16 * j);
        dot_pairs(acc, arow, 2L * width, xp + (long)(ci / NR) * kp * 2 * NR, 2 * NR, kp, MR);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
          if (i >= nrows) break;
#pragma GCC unroll 4
          for (int j = 0; j < NV; j++) _mm512_storeu_ps(out + i * Cin + 16 * j, acc[i][j]);
        }
      }
    }
  }
}

/* The weight gradient of a 1x1 convolution, float32:
 *   dw[co][ci] = sum over m of g[m][co] * x[m][ci]
 * g: M rows of Cout bf16 (the output gradient), x: M rows of Cin bf16 (the input), Cin % 64 == 0.
 * The reduction runs over pixels, so both operands are interleaved in pairs of pixel rows (x strip
 * by strip) into per-thread buffers. With many pixels each thread takes its share of them into
 * sums of its own (thread 0 straight into dw), added at the end; with few (at most 4 KC: a 7x7
 * map at batch 16), each thread takes its share of the outputs over all pixels, which needs no
 * such sums (their writing and adding took ~10 % of the 7x7 layers' time).
 * Returns 0, 1 for a shape it does not take, 2 if memory for the buffers could not be had. */
int pointwise_wgrad_bf16(const uint16_t *g, const uint16_t *x, float *dw, long M, int Cout,
                         int Cin, int threads) {
  if (M < 0 || Cout < 1 || Cin < NR || Cin % NR || threads < 1) return 1;
  const long size = (long)Cout * Cin;
  const int by_outputs = threads == 1 || (M <= 4 * KC && Cout >= MR * threads);
  float *part = by_outputs ? NULL : malloc(sizeof(float) * size * (threads - 1));
  if (!by_outputs && !part) return 2;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    uint16_t *xp = aligned_alloc(64, sizeof(uint16_t) * KC * Cin);
    uint16_t *gp = aligned_alloc(64, sizeof(uint16_t) * KC * ((Cout + 31) & ~31));
    if (!xp || !gp) failed = 1;
    if (by_outputs) {
      const long tiles = (Cout + MR - 1) / MR;
      const int co0 = (int)(tiles * t / T * MR), co1 = (int)(tiles * (t + 1) / T * MR);
      const int end = co1 < Cout ? co1 : Cout;
      if (!failed && co0 < end) {
        if (M == 0) memset(dw + (long)co0 * Cin, 0, sizeof(float) * (end - co0) * Cin);
        weight_grad_rows(g, x, dw, 0, M, co0, end, Cout, Cin, KC, xp, gp);
      }
    } else {
      float *d = t == 0 ? dw : part + (t - 1) * size;
      const long pairs = (M + 1) / 2;
      const long m_begin = 2 * (pairs * t / T), m_stop = 2 * (pairs * (t + 1) / T);
      const long m_end = m_stop < M ? m_stop : M; /* an odd M: the last pair has one row */
      if (!failed && m_end <= m_begin) memset(d, 0, sizeof(float) * size);
      if (!failed) weight_grad_rows(g, x, d, m_begin, m_end, 0, Cout, Cout, Cin, KC, xp, gp);
    }
    free(xp);
    free(gp);
    if (!by_outputs) {
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
  }
  free(part);
  return failed ? 2 : 0;
}
