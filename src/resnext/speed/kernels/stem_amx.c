/* The ImageNet stem in one pass on AMX tiles: a k x k convolution of channels-last pixels (the
 * 7x7, stride 2 of torchvision's ResNets), + bias, ReLU, then 3x3 max pooling at stride 2 with
 * padding 1. bf16 (one tile product) or float32 (three, as conv_x3_amx.c: hi x hi + hi x lo +
 * lo x hi, ~1e-5 of each product).
 *
 * Why: run apart, the convolution writes its output (at batch 16 and 224^2, 16 x 112^2 x 64
 * values: 26 MB in bf16) and the pooling reads it back, two passes over the largest tensor of
 * the network, and oneDNN runs the 3-channel convolution (a 147-deep product) far below its
 * tile rate. Here each thread runs a band of output rows of one image: it computes the
 * convolution's rows into a ring of three float32 rows (L2 resident), pools each finished
 * window of rows, and writes only the pooled output, a quarter of the convolution's. Pooling
 * commutes with the bias and the ReLU (both monotone, the bias constant per channel), so the
 * window's max is taken of the raw sums and the bias and ReLU applied once per pooled value:
 * bit-identical to adding them first.
 *
 * The product, without gathering patches: a band's input rows are copied once into zero-padded
 * rows (float32 split once into bf16 hi and lo). Kernel row i of output pixel ow is then k Cin
 * consecutive values of padded row s oh - pad + i, starting s Cin ow values in, so a K step of
 * 16 pixels is one tile load whose rows are s Cin values apart (12 bytes for torchvision's stem):
 * each kernel row takes ceil(k Cin / 32) steps of 32 values, the values past k Cin times zero
 * weights (7 steps for 7 x 7 x 3 instead of 5 for a gathered 147-deep patch, but no gathering,
 * which measured ~4.5x the products' time). Kernel rows outside the image are skipped. A
 * convolution row runs in items of 32 pixels (two 16-row A tiles; one for a last half item)
 * times 2 output tiles at a time: 4 tile accumulators, stored straight into the ring row.
 * Because the values past k Cin meet zero weights, a NaN or infinity in the input can also reach
 * outputs whose window does not include it (a few pixels to its left); finite inputs give finite
 * sums. Band edges: a band of pooled rows starting at r0 > 0 recomputes convolution row
 * 2 r0 - 1, which the band above also computed (at batch 1, where images are split into bands;
 * not at batch 16).
 *
 * Layout: x[N][H][W][Cin] or [N][Cin][H][W], bf16 (as uint16) or float32, whatever the products'
 * dtype (so a float32 NCHW image needs no cast or layout pass before the network); y[N][Hp][Wp][C]
 * in the products' dtype; weights packed
 * by stem.pack: bf16 [C/16][k steps][2][16][16][2] (output tile, K step, hi then lo, K pair,
 * output, pair member), of which bf16 inputs use the hi half; bias[C] float32.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "amx_tiles.h"
#include "bf16_split.h"

#define ROWS 32 /* pixels per item: two 16-row A tiles */

int stem_amx_allowed(void) { return amx_request(); }

typedef struct {
  const void *x;
  int bf16;    /* products and y in bf16 (else float32: bf16x3) */
  int in_bf16; /* x is bf16 (else float32) */
  int nchw;    /* x is [N][Cin][H][W] (else [N][H][W][Cin]) */
  int N, H, W, Cin, k, s, pad, C;
  int Hc, Wc; /* the convolution's output size */
  int Hp, Wp; /* the pooled output's size */
  int spr;    /* 32-deep K steps per kernel row: k Cin values rounded up to 32 */
} Stem;

/* The rows a band reads, zero-padded, channels-last: padded row ih - row0 holds input row ih
 * from column -pad on, zeros around the image, in bf16; for float32 products split into hi and
 * lo rows (each input value split once, not once per patch it falls in). */
typedef struct {
  uint16_t *hi, *lo;
  int row0;      /* the input row of padded row 0 */
  long row_vals; /* values per padded row */
} Padded;

/* n float32 values to bf16 hi and (unless NULL) lo; any n, the last partial chunk through a
 * zeroed copy. */
__attribute__((target("avx512f,avx512bw"))) static void split_values(const float *src, long n,
                                                                     uint16_t *hi, uint16_t *lo) {
  long i = 0;
  for (; i + 32 <= n; i += 32) split32(src + i, hi + i, lo ? lo + i : NULL);
  if (i < n) {
    float tail[32] = {0};
    uint16_t th[32], tl[32];
    memcpy(tail, src + i, (size_t)(n - i) * 4);
    split32(tail, th, lo ? tl : NULL);
    memcpy(hi + i, th, (size_t)(n - i) * 2);
    if (lo) memcpy(lo + i, tl, (size_t)(n - i) * 2);
  }
}

static inline float bf16_value(uint16_t v) {
  union {
    uint32_t bits;
    float value;
  } u = {(uint32_t)v << 16};
  return u.value;
}

/* Lane indices of the two permutes, for output value p = 16 j + lane (pixel p / 3, channel
 * p % 3): the first picks r (pixel % 16) or g (16 + pixel % 16) into (r, g), the second keeps
 * (r, g)'s lane or picks b (16 + pixel % 16). Constants, so that no row recomputes them. */
static const int RG[48] = {0,  16, 0,  1,  17, 1,  2,  18, 2,  3,  19, 3,  4,  20, 4,  5,
                           21, 5,  6,  22, 6,  7,  23, 7,  8,  24, 8,  9,  25, 9,  10, 26,
                           10, 11, 27, 11, 12, 28, 12, 13, 29, 13, 14, 30, 14, 15, 31, 15};
static const int RGB[48] = {0,  1,  16, 3,  4,  17, 6,  7,  18, 9,  10, 19, 12, 13, 20, 15,
                            0,  21, 2,  3,  22, 5,  6,  23, 8,  9,  24, 11, 12, 25, 14, 15,
                            26, 1,  2,  27, 4,  5,  28, 7,  8,  29, 10, 11, 30, 13, 14, 31};

/* Pixels 0 .. 16 m - 1 (the whole 16s in W) of a row of 3 float32 planes (`plane` values apart)
 * interleaved into dst as RGB triples, in two lane permutes per 16 values; returns 16 m. */
__attribute__((target("avx512f"))) static int interleave3(const float *x, long plane, int W,
                                                           float *dst) {
  __m512i idx1[3], idx2[3];
  for (int j = 0; j < 3; ++j) {
    idx1[j] = _mm512_loadu_si512(RG + 16 * j);
    idx2[j] = _mm512_loadu_si512(RGB + 16 * j);
  }
  int w = 0;
  for (; w + 16 <= W; w += 16) {
    const __m512 r = _mm512_loadu_ps(x + w), g = _mm512_loadu_ps(x + plane + w);
    const __m512 b = _mm512_loadu_ps(x + 2 * plane + w);
    for (int j = 0; j < 3; ++j) {
      const __m512 rg = _mm512_permutex2var_ps(r, idx1[j], g);
      _mm512_storeu_ps(dst + 3L * w + 16 * j, _mm512_permutex2var_ps(rg, idx2[j], b));
    }
  }
  return w;
}

/* Input row ih of image n as W Cin float32 values, channels-last: x itself where it is float32
 * channels-last, else gathered (from the channel planes of an NCHW x) and widened into tmp. */
static const float *row_values(const Stem *st, long n, int ih, float *tmp) {
  const int W = st->W, Cin = st->Cin;
  if (!st->nchw) {
    const long at = (n * st->H + ih) * (long)W * Cin;
    if (!st->in_bf16) return (const float *)st->x + at;
    const uint16_t *x = (const uint16_t *)st->x + at;
    for (long i = 0; i < (long)W * Cin; ++i) tmp[i] = bf16_value(x[i]);
    return tmp;
  }
  int w0 = 0;
  if (Cin == 3 && !st->in_bf16) { /* an RGB float32 image: 16 pixels of 3 planes at a time */
    const long plane = (long)st->H * W, at = (n * 3 * st->H + ih) * (long)W;
    w0 = interleave3((const float *)st->x + at, plane, W, tmp);
  }
  for (int c = 0; c < Cin; ++c) {
    const long at = ((n * Cin + c) * st->H + ih) * (long)W;
    if (st->in_bf16) {
      const uint16_t *x = (const uint16_t *)st->x + at;
      for (int w = w0; w < W; ++w) tmp[(long)w * Cin + c] = bf16_value(x[w]);
    } else {
      const float *x = (const float *)st->x + at;
      for (int w = w0; w < W; ++w) tmp[(long)w * Cin + c] = x[w];
    }
  }
  return tmp;
}

/* Input rows first .. last of image n into `pd` (see Padded); tmp holds W Cin floats. */
static void fill_rows(const Stem *st, long n, int first, int last, const Padded *pd, float *tmp) {
  const long lead = (long)st->pad * st->Cin, vals = (long)st->W * st->Cin;
  const size_t tail = (size_t)(pd->row_vals - lead - vals) * 2;
  for (int ih = first; ih <= last; ++ih) {
    const long at = (ih - pd->row0) * pd->row_vals;
    uint16_t *hi = pd->hi + at, *lo = pd->lo ? pd->lo + at : NULL;
    memset(hi, 0, (size_t)lead * 2);
    memset(hi + lead + vals, 0, tail);
    if (lo) memset(lo, 0, (size_t)lead * 2), memset(lo + lead + vals, 0, tail);
    if (st->bf16 && st->in_bf16 && !st->nchw) { /* already what the products read */
      memcpy(hi + lead, (const uint16_t *)st->x + (n * st->H + ih) * vals, (size_t)vals * 2);
      continue;
    }
    split_values(row_values(st, n, ih, tmp), vals, hi + lead, lo ? lo + lead : NULL);
  }
}

/* Accumulators 2 i + j += pixel tile i times output tile j over one K step: A rows (pixels) at
 * a and a + next values, `stride` bytes apart; B tiles b0, b1 (hi, then lo 512 values on). One
 * product for bf16 (hi only); three for float32 (lo x hi, hi x hi, hi x lo). With `one`, only
 * pixel tile 0 (a row's last 16 pixels). */
#define DOTS                                                                                    \
  do {                                                                                          \
    _tile_dpbf16ps(0, 4, 6);                                                                    \
    _tile_dpbf16ps(1, 4, 7);                                                                    \
    if (!one) {                                                                                 \
      _tile_dpbf16ps(2, 5, 6);                                                                  \
      _tile_dpbf16ps(3, 5, 7);                                                                  \
    }                                                                                           \
  } while (0)

__attribute__((target("amx-tile,amx-bf16"), always_inline)) static inline void step(
    const uint16_t *ah, const uint16_t *al, long next, long stride, const uint16_t *b0,
    const uint16_t *b1, int one) {
  _tile_loadd(6, b0, 64);
  _tile_loadd(7, b1, 64);
  if (al) {
    _tile_loadd(4, al, stride);
    if (!one) _tile_loadd(5, al + next, stride);
    DOTS;
  }
  _tile_loadd(4, ah, stride);
  if (!one) _tile_loadd(5, ah + next, stride);
  DOTS;
  if (al) { /* the A tiles kept: hi x lo */
    _tile_loadd(6, b0 + 512, 64);
    _tile_loadd(7, b1 + 512, 64);
    DOTS;
  }
}

/* The accumulators into the ring row at pixel ow0, output tiles t and t + 1 (row stride C
 * floats; the row has room for the item's 32 pixels); with `one` only pixel tile 0's. */
__attribute__((target("amx-tile"))) static void store_tiles(float *row, int ow0, int t, int C,
                                                            int one) {
  const long stride = (long)C * 4;
  _tile_stored(0, row + (long)ow0 * C + t * 16, stride);
  _tile_stored(1, row + (long)ow0 * C + (t + 1) * 16, stride);
  if (one) return;
  _tile_stored(2, row + (long)(ow0 + 16) * C + t * 16, stride);
  _tile_stored(3, row + (long)(ow0 + 16) * C + (t + 1) * 16, stride);
}

/* Convolution row oh (raw sums, no bias) into `row` ([Wc rounded up to 32][C]), from the padded
 * rows: kernel row i of pixel ow is s Cin ow values into padded row s oh - pad + i, so each
 * 32-deep K step of 16 pixels is one tile load of stride s Cin values (see the top). */
__attribute__((target("amx-tile,amx-bf16"))) static void conv_row(const Stem *st,
                                                                   const uint16_t *wp,
                                                                   const Padded *pd, int oh,
                                                                   float *row) {
  const int tiles = st->C / 16, spr = st->spr;
  const long tile_values = (long)st->k * spr * 1024, px = (long)st->s * st->Cin;
  for (int ow0 = 0; ow0 < st->Wc; ow0 += ROWS) {
    const int one = ow0 + 16 >= st->Wc;
    for (int t = 0; t < tiles; t += 2) {
      const uint16_t *w0 = wp + t * tile_values, *w1 = w0 + tile_values;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int i = 0; i < st->k; ++i) {
        const int ih = st->s * oh - st->pad + i;
        if (ih < 0 || ih >= st->H) continue; /* zero padding: nothing to add */
        const long at = (ih - pd->row0) * pd->row_vals + ow0 * px;
        for (int j = 0; j < spr; ++j) {
          const long w = (long)(i * spr + j) * 1024;
          step(pd->hi + at + 32 * j, pd->lo ? pd->lo + at + 32 * j : NULL, 16 * px, px * 2,
               w0 + w, w1 + w, one);
        }
      }
      store_tiles(row, ow0, t, st->C, one);
    }
  }
}

/* Pooled row r of image n: per pooled column, the max over the 3 x 3 window of the convolution
 * rows (ring slots, NULL outside the image) and columns, + bias, ReLU, into y. */
__attribute__((target("avx512f,avx512bw"))) static void pool_row(const Stem *st,
                                                                 float *const rows[3],
                                                                 const float *bias, long n,
                                                                 int r, void *y) {
  const int C = st->C;
  const long out = ((n * st->Hp + r) * (long)st->Wp) * C;
  for (int q = 0; q < st->Wp; ++q) {
    const int c0 = 2 * q - 1 < 0 ? 0 : 2 * q - 1, c1 = 2 * q + 1 < st->Wc ? 2 * q + 1 : st->Wc - 1;
    for (int c = 0; c < C; c += 16) {
      __m512 m = _mm512_set1_ps(-__builtin_inff());
      __mmask16 nan = 0; /* max_ps drops a NaN in one operand; torch's pooling keeps it */
      for (int i = 0; i < 3; ++i) {
        if (!rows[i]) continue;
        for (int w = c0; w <= c1; ++w) {
          const __m512 v = _mm512_loadu_ps(rows[i] + (long)w * C + c);
          m = _mm512_max_ps(m, v);
          nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        }
      }
      /* ReLU as max(0, x): max_ps returns its second operand where one is NaN */
      m = _mm512_max_ps(_mm512_setzero_ps(), _mm512_add_ps(m, _mm512_loadu_ps(bias + c)));
      m = _mm512_mask_blend_ps(nan, m, _mm512_set1_ps(__builtin_nanf("")));
      const long at = out + (long)q * C + c;
      if (st->bf16) {
        const __m512i b = _mm512_srli_epi32(round_bf16(_mm512_castps_si512(m)), 16);
        _mm256_storeu_si256((__m256i *)((uint16_t *)y + at), _mm512_cvtepi32_epi16(b));
      } else {
        _mm512_storeu_ps((float *)y + at, m);
      }
    }
  }
}

/* Pooled rows r0 .. r1 - 1 of image n: the input rows they read padded once, then each
 * convolution row computed once into the ring (slot oh % 3), each pooled row once its window's
 * last row is there. */
static void run_band(const Stem *st, const uint16_t *wp, const float *bias, long n, int r0, int r1,
                     void *y, float *ring, long ring_row, Padded *pd, float *tmp) {
  const int c0 = 2 * r0 - 1 < 0 ? 0 : 2 * r0 - 1;
  const int c1 = 2 * r1 - 1 < st->Hc ? 2 * r1 - 1 : st->Hc - 1; /* convolution rows c0 .. c1 */
  int first = st->s * c0 - st->pad, last = st->s * c1 - st->pad + st->k - 1;
  if (first < 0) first = 0;
  if (last > st->H - 1) last = st->H - 1;
  pd->row0 = first;
  fill_rows(st, n, first, last, pd, tmp);
  int next = c0; /* the next convolution row to compute */
  for (int r = r0; r < r1; ++r) {
    const int end = 2 * r + 1 < st->Hc ? 2 * r + 1 : st->Hc - 1;
    for (; next <= end; ++next) conv_row(st, wp, pd, next, ring + (next % 3) * ring_row);
    float *rows[3];
    for (int i = 0; i < 3; ++i) {
      const int oh = 2 * r - 1 + i;
      rows[i] = oh >= 0 && oh < st->Hc ? ring + (oh % 3) * ring_row : NULL;
    }
    pool_row(st, rows, bias, n, r, y);
  }
}

/* y = maxpool3x3/2(ReLU(conv(x, k x k, stride s, zero padding pad) + bias)), see the top.
 * Returns 0, -1 for an unsupported shape, -2 if memory runs out. */
int stem_amx(const void *x, const uint16_t *wp, const float *bias, void *y, int bf16, int in_bf16,
             int nchw, int N, int H, int W, int Cin, int C, int k, int s, int pad, int threads) {
  if (N < 0 || H < 1 || W < 1 || Cin < 1 || C < 32 || C % 32 || k < 1 || s < 1 || pad < 0 ||
      pad >= k || threads < 1 || H + 2 * pad < k || W + 2 * pad < k)
    return -1;
  Stem st = {x, bf16 != 0, in_bf16 != 0, nchw != 0, N, H, W, Cin, k, s, pad, C, 0, 0, 0, 0, 0};
  st.Hc = (H + 2 * pad - k) / s + 1, st.Wc = (W + 2 * pad - k) / s + 1;
  st.Hp = (st.Hc - 1) / 2 + 1, st.Wp = (st.Wc - 1) / 2 + 1;
  st.spr = (k * Cin + 31) / 32;
  if (N == 0) return 0;
  /* bands per image: whole images while there are enough to share, else each image split so
   * that every thread has several bands (their edges recompute one convolution row each) */
  int bands = N >= 4 * threads ? 1 : (4 * threads + N - 1) / N;
  if (bands > st.Hp) bands = st.Hp;
  const long items = (long)N * bands;
  const long wc32 = (st.Wc + ROWS - 1) / ROWS * ROWS, ring_row = wc32 * C;
  /* a padded row: the furthest read is the last item's last pixel's last K step */
  const long row_vals = ((wc32 - 1) * s * Cin + 32L * st.spr + 31) / 32 * 32;
  const long image_end = (long)(pad + W) * Cin;
  const long vals = (row_vals > image_end ? row_vals : (image_end + 31) / 32 * 32) + 32;
  const size_t pad_bytes = (size_t)H * vals * 2;
  const size_t tmp_bytes = ((size_t)W * Cin * 4 + 63) / 64 * 64;
  const size_t bytes = 3 * ring_row * 4 + (st.bf16 ? 1 : 2) * pad_bytes + tmp_bytes + 64;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    char *buf = scratch(0, bytes);
    const int nth = omp_get_num_threads(), me = omp_get_thread_num();
    const long first = items * me / nth, end = items * (me + 1) / nth;
    if (!buf) failed = 1;
    if (buf && first < end) {
      float *ring = (float *)buf;
      Padded pd = {(uint16_t *)(buf + 3 * ring_row * 4), NULL, 0, vals};
      if (!st.bf16) pd.lo = pd.hi + pad_bytes / 2;
      float *tmp = (float *)(buf + 3 * ring_row * 4 + (st.bf16 ? 1 : 2) * pad_bytes);
      configure();
      for (long item = first; item < end; ++item) {
        const long n = item / bands, b = item % bands;
        const int r0 = (int)(st.Hp * b / bands), r1 = (int)(st.Hp * (b + 1) / bands);
        run_band(&st, wp, bias, n, r0, r1, y, ring, ring_row, &pd, tmp);
      }
      release();
    }
  }
  return failed ? -2 : 0;
}
