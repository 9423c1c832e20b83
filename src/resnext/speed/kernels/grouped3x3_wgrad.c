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
 * bf16 with a multiple of 32 channels on a CPU with AVX512-BF16 takes the pair dot product
 * instead (wgrad_pairs, below), for 4 to 64 channels per group: oneDNN runs ResNeXt-50's stage-3
 * and stage-4 weight gradients at 120-230 GFLOP/s on the AMD machine, a quarter to a half of the
 * bf16 peak, and the diagonal pair kernel this replaced ran stages 1-2 at ~40-50 % of it.
 *
 * Layout: x[N][H][W][C] and gy[N][Ho][Wo][C], both fp32 or both bf16; dw[C][G][3][3] fp32.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "scratch.h"

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

/* bf16 on pair dot products, 4 to 64 channels per group: small matrix products, summed over
 * pairs of neighbouring output pixels. The 32 channels of a 64-byte line of two input pixels a
 * and b become two operands without a lane crossing: lane i of the "even" one holds
 * (a[2i], b[2i]), of the "odd" one (a[2i + 1], b[2i + 1]) (a shift and a 16-bit blend each). Lane i
 * multiplies, for output o of its channels' group, the gradient pair (gy[ow][co], gy[ow + 1][co]):
 * with 32 or more channels per group one 32-bit broadcast for all lanes; with 16 a line holds two
 * groups, lanes 0-7 one and 8-15 the other (two broadcasts and a blend); with 4 or 8 it holds
 * several, so each output's 16 lanes of pairs are laid out as a whole vector when the gradient
 * is packed ("expanded").
 *
 * The work is lines of 32 input channels in blocks of output rows (of one image) whose input rows
 * fit in L1. A block's input lines are first copied into one contiguous, zero-padded run (in
 * place, one pixel 1-2 KB from the next, the lines of a few rows fell into the same few L1 sets:
 * the kernel ran at 60 % of the dot-product rate in cache) and its gradient into pairs of pixels,
 * while the next block's lines are prefetched into L2. Then every (4 outputs, kernel row) pass
 * runs over the block: 2 parities x 3 taps x 4 outputs = 24 accumulators, kept between blocks in
 * the line's sums. At stride 1 a step's first-tap operands are the previous step's last-tap
 * ones. */

/* The even- and odd-channel pair operands of pixels a (low halves) and b (high halves). */
static inline void pair_operands(__m512i a, __m512i b, __m512i *even, __m512i *odd) {
  const __mmask32 high = 0xAAAAAAAAu; /* the high 16 bits of each 32-bit lane */
  *even = _mm512_mask_blend_epi16(high, a, _mm512_slli_epi32(b, 16));
  *odd = _mm512_mask_blend_epi16(high, _mm512_srli_epi32(a, 16), b);
}

typedef struct {
  int H, W, C, G, s, Ho, Wo;
  int xcols;  /* packed pixels per input row: column -1 (zeros), the row, zeros to the last read */
  int gpairs; /* gradient pixel pairs per output row */
  int gw;     /* gradient channels packed per pair: the line's group(s), at least 32 */
  int gstep;  /* 32-bit values per packed pair: gw, or G x 16 for narrow groups (expanded) */
} PairGrad;

/* Kernel row kh over output rows oh0 .. oh1 - 1 of a block into the 24 sums at `at` ([2][3][4][16]:
 * parity, tap, output). xp: the block's input rows from ih0, wd->xcols pixels of 32 channels
 * each; gp: its gradient rows, wd->gpairs pairs of wd->gw channels (uint32: both pixels' values).
 * Lane half 0 takes output channel o0 + o of gp's channels, half 1 channel gb + o0 + o; or with
 * `expanded` (4 or 8 channels per group, several groups a line), gp holds each output's vector
 * of its 16 lanes' gradient pairs, each lane its own group's. */
static inline __attribute__((always_inline)) void pair_pass(const PairGrad *wd,
                                                            const uint16_t *xp, const uint32_t *gp,
                                                            float *at, int ih0, int oh0, int oh1,
                                                            int kh, int o0, int gb, const int s,
                                                            const int expanded) {
  __m512 acc[2][3][4];
#pragma GCC unroll 2
  for (int p = 0; p < 2; ++p)
#pragma GCC unroll 3
    for (int kw = 0; kw < 3; ++kw)
#pragma GCC unroll 4
      for (int o = 0; o < 4; ++o) acc[p][kw][o] = _mm512_loadu_ps(at + ((p * 3 + kw) * 4 + o) * 16);
  for (int oh = oh0; oh < oh1; ++oh) {
    const int ih = oh * s - 1 + kh;
    if (ih < 0 || ih >= wd->H) continue;
    const uint16_t *xr = xp + (long)(ih - ih0) * wd->xcols * 32; /* column c: pixel c - 1 */
    const uint32_t *gr = gp + (long)(oh - oh0) * wd->gpairs * wd->gstep + o0 * (expanded ? 16 : 1);
    __m512i xv[2][3];
    const int lone = wd->Wo % 2 ? wd->gpairs - 1 : -1; /* the pair with one pixel, if any */
    if (s == 1) /* the first step's first tap: pixels -1 and 0 */
      pair_operands(_mm512_load_si512(xr), _mm512_load_si512(xr + 32), &xv[0][2], &xv[1][2]);
    for (int j = 0; j < wd->gpairs; ++j) {
#pragma GCC unroll 3
      for (int kw = 0; kw < 3; ++kw) {
        if (s == 1 && kw == 0) {
          xv[0][0] = xv[0][2], xv[1][0] = xv[1][2];
          continue;
        }
        const uint16_t *a = xr + (long)(2 * j * s + kw) * 32; /* pixel 2j s - 1 + kw */
        pair_operands(_mm512_load_si512(a), _mm512_load_si512(a + 32 * s), &xv[0][kw],
                      &xv[1][kw]);
      }
      if (j == lone) /* a last pair of one pixel: its partner's inputs out (a zero gradient pair
                      * alone would turn an infinity there into NaN in taps that never read it) */
#pragma GCC unroll 3
        for (int kw = 0; kw < 3; ++kw)
          for (int p = 0; p < 2; ++p)
            xv[p][kw] = _mm512_and_si512(xv[p][kw], _mm512_set1_epi32(0xFFFF));
      const uint32_t *g = gr + (long)j * wd->gstep;
#pragma GCC unroll 4
      for (int o = 0; o < 4; ++o) {
        __m512i v;
        if (expanded) {
          v = _mm512_load_si512(g + 16 * o);
        } else {
          v = _mm512_set1_epi32((int)g[o]);
          if (gb) v = _mm512_mask_blend_epi32(0xFF00, v, _mm512_set1_epi32((int)g[gb + o]));
        }
#pragma GCC unroll 2
        for (int p = 0; p < 2; ++p)
#pragma GCC unroll 3
          for (int kw = 0; kw < 3; ++kw)
            acc[p][kw][o] = _mm512_dpbf16_ps(acc[p][kw][o], (__m512bh)v, (__m512bh)xv[p][kw]);
      }
    }
  }
#pragma GCC unroll 2
  for (int p = 0; p < 2; ++p)
#pragma GCC unroll 3
    for (int kw = 0; kw < 3; ++kw)
#pragma GCC unroll 4
      for (int o = 0; o < 4; ++o) _mm512_storeu_ps(at + ((p * 3 + kw) * 4 + o) * 16, acc[p][kw][o]);
}

/* Input rows ih0 .. ih1 of image n, channels c0 .. c0 + 31, into xp (see pair_pass). */
static void pack_input(const PairGrad *wd, const uint16_t *x, long n, int ih0, int ih1, int c0,
                       uint16_t *xp) {
  const __m512i zero = _mm512_setzero_si512();
  for (int ih = ih0; ih <= ih1; ++ih) {
    uint16_t *out = xp + (long)(ih - ih0) * wd->xcols * 32;
    const uint16_t *in = x + ((n * wd->H + ih) * wd->W) * (long)wd->C + c0;
    _mm512_store_si512(out, zero);
    for (int iw = 0; iw < wd->W; ++iw)
      _mm512_store_si512(out + (iw + 1) * 32, _mm512_loadu_si512(in + (long)iw * wd->C));
    for (int c = wd->W + 1; c < wd->xcols; ++c) _mm512_store_si512(out + c * 32, zero);
  }
}

/* The gradient pairs (pixel a low, the next pixel high, zero unless `two`) of 32 channels at a:
 * channels 0-15 in *first, 16-31 in *second, one 32-bit pair each. */
static inline void grad_pairs(const uint16_t *a, long C, int two, __m512i *first,
                              __m512i *second) {
  const __m512i va = _mm512_loadu_si512(a);
  const __m512i vb = two ? _mm512_loadu_si512(a + C) : _mm512_setzero_si512();
  /* 16-bit interleave within 128-bit lanes, then the lanes put back in channel order */
  const __m512i lo = _mm512_unpacklo_epi16(va, vb), hi = _mm512_unpackhi_epi16(va, vb);
  *first = _mm512_permutex2var_epi64(lo, _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), hi);
  *second = _mm512_permutex2var_epi64(lo, _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4), hi);
}

/* Gradient rows oh0 .. oh1 - 1 of image n, channels g0 .. g0 + gw - 1, into gp as pixel pairs
 * (pixel 2j low, 2j + 1 high; zero past the row); with 4 or 8 channels per group each pair
 * expanded instead: gp[row][pair][o][lane] = the pair of output o of the lane's group (lane i
 * holds channels 2i and 2i + 1 of the line). */
static void pack_grad(const PairGrad *wd, const uint16_t *gy, long n, int oh0, int oh1, int g0,
                      uint32_t *gp) {
  const int G = wd->G, expanded = G < 16;
  __m512i idx[8];
  for (int o = 0; expanded && o < G; ++o) {
    int at[16];
    for (int i = 0; i < 16; ++i) at[i] = 2 * i - (2 * i) % G + o; /* channel of lane i's output */
    idx[o] = _mm512_loadu_si512(at);
  }
  for (int oh = oh0; oh < oh1; ++oh)
    for (int j = 0; j < wd->gpairs; ++j) {
      const uint16_t *a = gy + ((n * wd->Ho + oh) * wd->Wo + 2 * j) * (long)wd->C + g0;
      const int two = 2 * j + 1 < wd->Wo;
      uint32_t *out = gp + ((long)(oh - oh0) * wd->gpairs + j) * wd->gstep;
      for (int c = 0; c < wd->gw; c += 32) {
        __m512i first, second;
        grad_pairs(a + c, wd->C, two, &first, &second);
        if (!expanded) {
          _mm512_storeu_si512(out + c, first);
          _mm512_storeu_si512(out + c + 16, second);
          continue;
        }
        for (int o = 0; o < G; ++o)
          _mm512_store_si512(out + 16 * o, _mm512_permutex2var_epi32(first, idx[o], second));
      }
    }
}

/* The lines of a block to come, prefetched a share at a time: its input rows' pixels, then its
 * gradient rows' pixels (gw / 32 lines each). */
typedef struct {
  const char *x, *g; /* the block's first input and gradient row's first line */
  long xrows_px, px;  /* its input rows' pixels; bytes per pixel */
  long glines, gpx;   /* its gradient lines; gradient pixels */
  int per_px;         /* gradient lines per pixel */
  long done, per_step, total;
} Ahead;

static Ahead next_block(const PairGrad *wd, const uint16_t *x, const uint16_t *gy, int N, long n,
                        int oh, int block, int c0, int g0, int steps) {
  Ahead a = {0};
  if (n >= N) return a; /* no block to come */
  const int s = wd->s, oh1 = oh + block < wd->Ho ? oh + block : wd->Ho;
  const int ih0 = oh * s - 1 < 0 ? 0 : oh * s - 1;
  const int ih1 = (oh1 - 1) * s + 1 < wd->H ? (oh1 - 1) * s + 1 : wd->H - 1;
  a.px = 2L * wd->C;
  a.x = (const char *)(x + ((n * wd->H + ih0) * wd->W) * (long)wd->C + c0);
  a.xrows_px = (long)(ih1 - ih0 + 1) * wd->W;
  a.g = (const char *)(gy + ((n * wd->Ho + oh) * wd->Wo) * (long)wd->C + g0);
  a.per_px = wd->gw / 32;
  a.gpx = (long)(oh1 - oh) * wd->Wo;
  a.glines = a.gpx * a.per_px;
  a.total = a.xrows_px + a.glines;
  a.per_step = (a.total + steps - 1) / steps;
  return a;
}

static inline void ahead_step(Ahead *a) {
  const long end = a->done + a->per_step < a->total ? a->done + a->per_step : a->total;
  for (long i = a->done; i < end; ++i) {
    if (i < a->xrows_px) { /* input pixels are consecutive, rows after rows */
      _mm_prefetch(a->x + i * a->px, _MM_HINT_T1);
    } else {
      const long j = i - a->xrows_px;
      _mm_prefetch(a->g + (j / a->per_px) * a->px + (j % a->per_px) * 64, _MM_HINT_T1);
    }
  }
  a->done = end;
}

/* Every (4 outputs, kernel row) pass over a packed block into its sums, the stride and the
 * gradient's form constants in each copy. */
static void passes(const PairGrad *wd, const uint16_t *xp, const uint32_t *gp, float *sums,
                   int ih0, int oh0, int oh1, int gb, Ahead *ahead) {
  const int per_pass = 2 * 3 * 4 * 16, expanded = wd->G < 16;
  for (int q = 0; q < wd->G / 4; ++q)
    for (int kh = 0; kh < 3; ++kh) {
      ahead_step(ahead);
      float *at = sums + (q * 3 + kh) * per_pass;
      if (expanded)
        if (wd->s == 1)
          pair_pass(wd, xp, gp, at, ih0, oh0, oh1, kh, 4 * q, 0, 1, 1);
        else
          pair_pass(wd, xp, gp, at, ih0, oh0, oh1, kh, 4 * q, 0, 2, 1);
      else if (wd->s == 1)
        pair_pass(wd, xp, gp, at, ih0, oh0, oh1, kh, 4 * q, gb, 1, 0);
      else
        pair_pass(wd, xp, gp, at, ih0, oh0, oh1, kh, 4 * q, gb, 2, 0);
    }
}

/* Line cb (input channels 32 cb ..) over output rows oh0 .. oh1 - 1 of image n, added into the
 * line's sums ([G/4][3][2][3][4][16] floats), its input and gradient packed into xp and gp first;
 * the block `next_n`, `next_oh` (if any) of this line prefetched meanwhile. */
static void line_block(const PairGrad *wd, const uint16_t *x, const uint16_t *gy, float *sums,
                       uint16_t *xp, uint32_t *gp, int N, int block, int cb, long n, int oh0,
                       long next_n, int next_oh) {
  const int G = wd->G, s = wd->s, c0 = 32 * cb, g0 = c0 - c0 % G;
  const int gb = G == 16 ? 16 : 0; /* lanes 8-15: the line's second group */
  const int chunks = G / 4;
  const int oh1 = oh0 + block < wd->Ho ? oh0 + block : wd->Ho;
  const int ih0 = oh0 * s - 1 < 0 ? 0 : oh0 * s - 1;
  const int ih1 = (oh1 - 1) * s + 1 < wd->H ? (oh1 - 1) * s + 1 : wd->H - 1;
  pack_input(wd, x, n, ih0, ih1, c0, xp);
  pack_grad(wd, gy, n, oh0, oh1, g0, gp);
  /* the next block's lines, into L2 a share per pass while this block computes (its copy
   * otherwise waits on memory) */
  Ahead ahead = next_block(wd, x, gy, N, next_n, next_oh, block, c0, g0, chunks * 3);
  passes(wd, xp, gp, sums, ih0, oh0, oh1, gb, &ahead);
}

/* Line cb's sums into dw: lane i of parity p is input channel 32 cb + 2i + p, and output 4q + o
 * of that channel's group. */
static void scatter_line(const PairGrad *wd, const float *sums, float *dw, int cb) {
  const int G = wd->G, per_pass = 2 * 3 * 4 * 16, low = G - 1; /* G a power of 2 */
  for (int p = 0; p < 2; ++p)
    for (int i = 0; i < 16; ++i) {
      const int ci = 32 * cb + 2 * i + p; /* (a % or a division per value took 10 % of 7x7s) */
      float *row = dw + ((long)(ci & ~low) * G + (ci & low)) * 9; /* output 0 of ci's group */
      for (int q = 0; q < G / 4; ++q)
        for (int o = 0; o < 4; ++o)
          for (int kh = 0; kh < 3; ++kh)
            for (int kw = 0; kw < 3; ++kw)
              row[(long)(4 * q + o) * G * 9 + kh * 3 + kw] =
                  sums[(q * 3 + kh) * per_pass + ((p * 3 + kw) * 4 + o) * 16 + i];
    }
}

/* The blocks of output rows, image by image: unit u is image u / per_image, rows from
 * (u % per_image) block. */
static inline void unit_rows(const PairGrad *wd, long u, int block, long *n, int *oh) {
  const int per_image = (wd->Ho + block - 1) / block;
  *n = u / per_image;
  *oh = (int)(u % per_image) * block;
}

/* The wide weight gradient. Returns 0, or 2 if memory runs out. With few lines (every line's sums
 * within ~96 KB: 128 channels with 4 per group, 256 with 8) the threads share the blocks of rows
 * and each runs every line over its blocks, so that each pixel's lines are all used while in
 * cache, then their sums are added; with more, they share the lines, each over every block (the
 * sums then stay in L1). */
static int wgrad_pairs(const void *x, const void *gy, float *dw, int N, int H, int W, int C, int G,
                      int s, int Ho, int Wo, int threads) {
  PairGrad wd = {H, W, C, G, s, Ho, Wo, 0, (Wo + 1) / 2, G < 32 ? 32 : G, 0};
  wd.gstep = G < 16 ? G * 16 : wd.gw;
  /* the last pair's second pixel reads up to column 2 gpairs s + 1 + s */
  wd.xcols = 2 * wd.gpairs * s + 2 + s;
  if (wd.xcols < W + 2) wd.xcols = W + 2;
  /* output rows per block: their input rows within ~32 KB */
  int block = (int)((32768 / (64L * wd.xcols) - 1) / s);
  if (block < 1) block = 1;
  if (block > Ho) block = Ho;
  const int in_rows = (block - 1) * s + 3, lines = C / 32;
  const long line_sums = (long)(G / 4) * 3 * 2 * 3 * 4 * 16; /* floats */
  const size_t xp_bytes = (size_t)in_rows * wd.xcols * 64;
  const size_t gp_bytes = (size_t)block * wd.gpairs * wd.gstep * 4;
  const long units = (long)N * ((Ho + block - 1) / block);
  const int by_blocks = line_sums * lines * 4 <= 96 * 1024 && units >= threads;
  float *all = by_blocks ? (float *)scratch(3, sizeof(float) * line_sums * lines * threads) : 0;
  if (by_blocks && !all) return 2;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    uint16_t *xp = (uint16_t *)scratch(1, xp_bytes);
    uint32_t *gp = (uint32_t *)scratch(2, gp_bytes);
    float *sums = by_blocks ? 0 : (float *)scratch(0, sizeof(float) * line_sums);
    if (!xp || !gp || (!by_blocks && !sums)) failed = 1;
    if (by_blocks) {
      const int t = omp_get_thread_num(), T = omp_get_num_threads();
      float *mine = all + (long)t * line_sums * lines;
      memset(mine, 0, sizeof(float) * line_sums * lines);
      const long u0 = units * t / T, u1 = units * (t + 1) / T;
      for (long u = u0; u < u1 && !failed; ++u) {
        long n, nn = N;
        int oh, noh = 0;
        unit_rows(&wd, u, block, &n, &oh);
        if (u + 1 < u1) unit_rows(&wd, u + 1, block, &nn, &noh);
        for (int cb = 0; cb < lines; ++cb)
          line_block(&wd, (const uint16_t *)x, (const uint16_t *)gy, mine + cb * line_sums, xp,
                     gp, N, block, cb, n, oh, nn, noh);
      }
#pragma omp barrier
#pragma omp for schedule(static)
      for (int cb = 0; cb < lines; ++cb) {
        float *total = all + cb * line_sums;
        for (int other = 1; other < T; ++other) {
          const float *theirs = all + ((long)other * lines + cb) * line_sums;
          for (long i = 0; i < line_sums; ++i) total[i] += theirs[i];
        }
        scatter_line(&wd, total, dw, cb);
      }
    } else {
#pragma omp for schedule(static)
      for (int cb = 0; cb < lines; ++cb) {
        if (failed) continue;
        memset(sums, 0, sizeof(float) * line_sums);
        for (long u = 0; u < units; ++u) {
          long n, nn = N;
          int oh, noh = 0;
          unit_rows(&wd, u, block, &n, &oh);
          if (u + 1 < units) unit_rows(&wd, u + 1, block, &nn, &noh);
          line_block(&wd, (const uint16_t *)x, (const uint16_t *)gy, sums, xp, gp, N, block, cb,
                     n, oh, nn, noh);
        }
        scatter_line(&wd, sums, dw, cb);
      }
    }
  }
  return failed ? 2 : 0;
}

static int wide_pairs(int C, int cpg) {
  return (cpg == 16 || cpg == 32 || cpg == 64) && C % cpg == 0;
}

typedef void (*wgrad_fn)(const char *, const char *, float *, int, int, int, int, int, int, long,
                         long);

/* 4 or 8 channels per group in any dtype; 16, 32 or 64 only with pairs (bf16, C % 32 == 0). */
int grouped3x3_wgrad_supported(int C, int cpg, int s) {
  return C > 0 && C % 16 == 0 && (cpg == 4 || cpg == 8 || wide_pairs(C, cpg)) &&
         (s == 1 || s == 2);
}

/* dw (fp32, [C][cpg][3][3]) of the convolution that read x (N x H x W) and produced gy. Returns 0,
 * 1 for a shape it does not take, 2 if memory for the per-thread sums could not be allocated. */
int grouped3x3_wgrad_nhwc(const void *x, const void *gy, float *dw, int bf16, int pairs, int N,
                          int H, int W, int C, int cpg, int s, int threads) {
  if (!grouped3x3_wgrad_supported(C, cpg, s) || N < 0 || H < 1 || W < 1 || threads < 1) return 1;
  pairs = pairs && bf16 && C % 32 == 0;
  const int Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1;
  if (wide_pairs(C, cpg) && !pairs) return 1; /* wide groups: the pair kernel only */
  if (pairs) return wgrad_pairs(x, gy, dw, N, H, W, C, cpg, s, Ho, Wo, threads);
  const long per_thread = (long)C * 9 * cpg; /* C/16 blocks x 9 taps x cpg diagonals x 16 */
  float *part = (float *)calloc((size_t)threads * per_thread, sizeof(float));
  if (!part) return 2;
  const wgrad_fn fn =
      cpg == 4 ? (bf16 ? wgrad_bf16_g4 : wgrad_f32_g4) : (bf16 ? wgrad_bf16_g8 : wgrad_f32_g8);
  const long rows = (long)N * Ho;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num(), used = omp_get_num_threads();
    const long begin = rows * t / used, end = rows * (t + 1) / used;
    fn((const char *)x, (const char *)gy, part + t * per_thread, H, W, C, s, Ho, Wo, begin, end);
  }
  for (int t = 1; t < threads; ++t)
    for (long i = 0; i < per_thread; ++i) part[i] += part[t * per_thread + i];
  /* Diagonal d of input channel c (i = c mod cpg) is output channel c - i + (i + d) mod cpg;
   * part[cb][tap][d][l] with c = 16 cb + l. */
  for (int cb = 0; cb < C / 16; ++cb)
    for (int tap = 0; tap < 9; ++tap)
      for (int d = 0; d < cpg; ++d)
        for (int l = 0; l < 16; ++l) {
          const int c = cb * 16 + l, i = c % cpg, co = c - i + (i + d) % cpg;
          dw[((long)co * cpg + i) * 9 + tap] = part[(((long)cb * 9 + tap) * cpg + d) * 16 + l];
        }
  free(part);
  return 0;
}
