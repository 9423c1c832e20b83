/* Grouped 3x3 convolution (padding 1, stride 1 or 2) of bf16 channels-last tensors on AMX tiles.
 *
 * Why: an AMX tile product (TDPBF16PS) multiplies 16 pixels by 32 inputs by 16 outputs in one
 * instruction, ~30x the AVX512-BF16 rate on the Intel Xeon this was written on, but only for
 * dense 32-deep blocks. A ResNeXt group has 4-32 channels. So the weight is made dense per
 * "channel block":
 *  - up to 8 channels per group: a block is 16 consecutive channels (2 or more whole groups);
 *    its weight per tap is a 16x16 block-diagonal matrix (zeros between groups). At 4 channels
 *    per group a quarter of each product is useful, which still leaves the convolution bound by
 *    memory, not arithmetic.
 *  - 16 or more channels per group (a multiple of 16): a block is one group, dense.
 *
 * Feeding the tiles: per image and block, the block's channels are copied once into a
 * zero-bordered buffer P (rows of Wp = W + 2 pixels, kc channels each, L1/L2 resident), so that
 * the padding is in place and every tap of 16 output positions is one strided tile load. Output
 * position v = oh * Wv + ow reads tap (kh, kw) at P pixel base(v) + kh * Wp + kw, with
 * base(v) = s * (oh * Wp + ow). At stride 1 Wv = Wp, so base(v) = v: a tile may run across rows,
 * and the 2 positions per row past the image are computed and dropped. At stride 2 a tile stays
 * in one output row (Wv = Wo rounded up to 16). With 16-channel blocks two horizontally adjacent
 * taps are adjacent in P, so one 32-deep product takes taps kw and kw + 1 (kw = 0, 2; the weight
 * of "kw = 3" is zero): 6 products per tile instead of 9. (So a non-finite input value can reach
 * outputs whose true value does not depend on it, through those zero weights.)
 *
 * Layout: x[N][H][W][C], y[N][Ho][Wo][C] bf16 (uint16); weights packed by
 * grouped_amx.pack_weights as bf16 [C/kc][kc/16][steps][16][16][2] (block, 16-output tile,
 * 32-deep K step, K pair, output, pair member: AMX's VNNI layout); bias[C] float32 or NULL.
 *
 * The block kernels below (a bottleneck from its grouped convolution or its first 1x1 on) also
 * run the grouped convolution in the quads form of quads_planes.h (block_quads_amx*: 4 or 8
 * channels per group at stride 1, half the tile products of the block-diagonal form).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx_tiles.h"
#include "quads_planes.h"

#define MT 4 /* 16-pixel tiles per pass over the weights: accumulators 0-3 */

int grouped3x3_amx_allowed(void) { return amx_request(); }

/* Channels in a block, or 0 if the kernel does not take this many channels per group. */
static int block_channels(int cpg) {
  if (cpg == 1 || cpg == 2 || cpg == 4 || cpg == 8) return 16;
  if (cpg >= 16 && cpg % 16 == 0 && cpg <= 256) return cpg;
  return 0;
}

/* 32-deep K steps per 16-output tile: 3 rows x 2 tap pairs for 16-channel blocks, else 9 taps x
 * kc / 32 (a 16-channel group: 9 taps x 1 step of which half is zero). */
static int k_steps(int kc) { return kc == 16 ? 6 : 9 * ((kc + 31) / 32); }

int grouped3x3_amx_supported(int C, int cpg, int s) {
  const int kc = block_channels(cpg);
  return kc != 0 && C % kc == 0 && (s == 1 || s == 2);
}

/* Copy kc bf16 channels (a multiple of 16) from src to dst. */
static inline __attribute__((always_inline)) void copy_channels(uint16_t *dst, const uint16_t *src,
                                                                int kc) {
  if (kc == 16) {
    _mm256_storeu_si256((__m256i *)dst, _mm256_loadu_si256((const __m256i *)src));
    return;
  }
  int c = 0;
  for (; c + 32 <= kc; c += 32) _mm512_storeu_si512(dst + c, _mm512_loadu_si512(src + c));
  if (c < kc)
    _mm256_storeu_si256((__m256i *)(dst + c), _mm256_loadu_si256((const __m256i *)(src + c)));
}

/* The grid of one image (or of a band of its output rows) and block (see the top). Grid row r
 * holds input row row0 + r: zeros where that row is outside the image, and always zeros in the
 * two border columns. A band of output rows oh0 .. oh0 + Ho - 1 needs input rows s * oh0 - 1 ..
 * s * (oh0 + Ho - 1) + 1; the whole image is the band oh0 = 0. */
typedef struct {
  int H, W, C, kc, s, Ho, Wo, Wv, Wp;
  int row0;      /* the input row at grid row 0 */
  int grid_rows; /* grid rows that hold input rows (or zeros for rows outside the image) */
  long virt;     /* Ho * Wv output positions */
  long pixels;   /* P's size in pixels, slack for the last tiles' reads included */
} Grid;

static Grid make_grid(int H, int W, int C, int kc, int s, int oh0, int rows) {
  Grid g;
  g.H = H, g.W = W, g.C = C, g.kc = kc, g.s = s;
  g.Ho = rows, g.Wo = (W - 1) / s + 1;
  g.row0 = s * oh0 - 1, g.grid_rows = s * (rows - 1) + 3;
  g.Wp = W + 2;
  g.Wv = s == 1 ? g.Wp : (g.Wo + 15) / 16 * 16;
  g.virt = (long)g.Ho * g.Wv;
  /* one group of tiles more than the positions need: the block kernel's strips start their
   * groups at any row */
  const long vmax = (g.virt + 16 * MT - 1) / (16 * MT) * (16 * MT) + 16 * MT;
  /* the furthest read: the last position's tap (2, 3) (kw = 3 of a pair), 32 values */
  const long last = s * (((vmax - 1) / g.Wv) * (long)g.Wp + (vmax - 1) % g.Wv) + 2L * g.Wp + 3;
  const long interior = (long)g.grid_rows * g.Wp;
  g.pixels = last + 2 > interior ? last + 2 : interior;
  return g;
}

/* Zero what the products read but filling from x does not write: the border columns, the first
 * pixel past the last row (a 16-channel block's tap pair reads it, times a zero weight, which
 * must not meet a NaN), and the rows outside the image. The buffers are reused across items and
 * calls, so whatever a previous shape left there is overwritten. */
static void zero_padding(uint16_t *const *p, int chunk, const Grid *g) {
  const size_t px = (size_t)g->kc * 2;
  for (int r = 0; r <= g->grid_rows; ++r) {
    const long first = (long)r * g->Wp, last = first + g->Wp - 1;
    const int ih = g->row0 + r;
    const int outside = r < g->grid_rows && (ih < 0 || ih >= g->H);
    for (int c = 0; c < chunk; ++c) {
      if (first < g->pixels) memset(p[c] + first * g->kc, 0, px);
      if (r < g->grid_rows) memset(p[c] + last * g->kc, 0, px);
      if (outside) memset(p[c] + (first + 1) * g->kc, 0, (size_t)g->W * px);
    }
  }
}

/* P pixel of output position v's tap (0, 0). */
static inline long grid_base(const Grid *g, long v) {
  return g->s * ((v / g->Wv) * (long)g->Wp + v % g->Wv);
}

/* The grids of blocks b0 .. b0 + chunk - 1 of one image, in one pass over x's pixels (a chunk
 * spans whole cache lines, which separate passes per block would each read again from memory). */
static void fill_grids(uint16_t *const *p, int chunk, const uint16_t *xn, const Grid *g, int b0) {
  const int kc = g->kc;
  zero_padding(p, chunk, g);
  const int first = g->row0 < 0 ? 0 : g->row0;
  const int end = g->row0 + g->grid_rows < g->H ? g->row0 + g->grid_rows : g->H;
  for (int ih = first; ih < end; ++ih) {
    const uint16_t *src = xn + (long)ih * g->W * g->C + (long)b0 * kc;
    const long dst = ((long)(ih - g->row0) * g->Wp + 1) * kc;
    for (int iw = 0; iw < g->W; ++iw)
      for (int c = 0; c < chunk; ++c)
        copy_channels(p[c] + dst + (long)iw * kc, src + (long)iw * g->C + c * kc, kc);
  }
}

#define DOT(M, A_TILE, B_TILE)                                                                  \
  if (M < mt) {                                                                                 \
    _tile_loadd(A_TILE, p + base[M] + offset, astride);                                         \
    _tile_dpbf16ps(M, A_TILE, B_TILE);                                                          \
  }

/* Accumulators 0..mt-1 = grid positions v0 + 16 m .. (16 each) times one 16-output tile's weight
 * wb. With live NULL, wb holds every K step; else only the steps with live[step] set, one after
 * the other (the others hold only zero weights and are skipped). A tiles alternate between 4 and
 * 6 and B tiles between 5 and 7 so that a load never waits on the product still reading its
 * tile. */
__attribute__((target("amx-tile,amx-bf16"), always_inline)) static inline void products_of(
    const uint16_t *p, const Grid *g, long v0, int mt, const uint16_t *wb, const uint8_t *live) {
  const int kc = g->kc;
  const long astride = (long)g->s * kc * 2; /* bytes from one output position to the next */
  long base[MT]; /* values from P's start to each tile's first position's tap (0, 0) */
  for (int m = 0; m < MT; ++m) base[m] = grid_base(g, v0 + 16 * m) * kc;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int subs = kc == 16 ? 2 : 3 * ((kc + 31) / 32); /* K steps per kernel row */
  int step = 0, packed = 0;
  for (int kh = 0; kh < 3; ++kh)
    for (int j = 0; j < subs; ++j, ++step) {
      if (live && !live[step]) continue;
      const int at = live ? packed++ : step;
      /* kc == 16: taps (kh, 2j) and (kh, 2j + 1); else tap (kh, kw) channels 32 c .. */
      const long offset = kc == 16 ? (long)(kh * g->Wp + 2 * j) * 16
                                   : (long)(kh * g->Wp + j / ((kc + 31) / 32)) * kc +
                                         32 * (j % ((kc + 31) / 32));
      const uint16_t *b = wb + (long)at * 512;
      if (at & 1) {
        _tile_loadd(7, b, 64);
        DOT(0, 4, 7)
        DOT(1, 6, 7)
        DOT(2, 4, 7)
        DOT(3, 6, 7)
      } else {
        _tile_loadd(5, b, 64);
        DOT(0, 4, 5)
        DOT(1, 6, 5)
        DOT(2, 4, 5)
        DOT(3, 6, 5)
      }
    }
}

/* products_of every K step: inlined with live NULL, so that no step test is left in the loop
 * (the test measured 5-20 % slower grouped convolutions). */
__attribute__((target("amx-tile,amx-bf16"))) static void products(const uint16_t *p,
                                                                   const Grid *g, long v0, int mt,
                                                                   const uint16_t *wb) {
  products_of(p, g, v0, mt, wb, NULL);
}

/* products_of the live steps only (the stride-2 input gradient's phases). */
__attribute__((target("amx-tile,amx-bf16"))) static void products_live(
    const uint16_t *p, const Grid *g, long v0, int mt, const uint16_t *wb, const uint8_t *live) {
  products_of(p, g, v0, mt, wb, live);
}

/* Accumulator m (grid positions v..v+15 x 16 outputs, float32) + bias, ReLU if asked, rounded to
 * bf16 into the output pixels that exist (ow < Wo) in output rows lo .. hi - 1, channels
 * c..c+15; output row lo is out's first (rows of Wo pixels, C channels each). */
static void store_tile(int m, float *acc, const float *bias, int relu, uint16_t *out,
                       const Grid *g, long v, int c, int lo, int hi) {
  tile_to(m, acc);
  const __m512 b = bias ? _mm512_loadu_ps(bias + c) : _mm512_setzero_ps();
  int oh = (int)(v / g->Wv), ow = (int)(v % g->Wv);
  for (int r = 0; r < 16 && oh < hi; ++r) {
    if (ow < g->Wo && oh >= lo) {
      __m512 val = _mm512_add_ps(_mm512_loadu_ps(acc + r * 16), b);
      if (relu) val = _mm512_max_ps(val, _mm512_setzero_ps());
      uint16_t *dst = out + ((long)(oh - lo) * g->Wo + ow) * g->C + c;
      _mm256_storeu_si256((__m256i *)dst, (__m256i)_mm512_cvtneps_pbh(val));
    }
    if (++ow == g->Wv) ow = 0, ++oh;
  }
}

/* Where an item's grids get their interior from: x's own channels (the grouped convolution
 * alone), or a 1x1 convolution of x (the fused pair: ReLU(conv1x1(x) + b1) rounded to bf16, the
 * same rounding the unfused bf16 model makes, computed straight into the grids so that the
 * 1x1's output never goes to memory). */
typedef struct {
  const uint16_t *w1; /* NULL: copy; else the packed 1x1 weight [C/16][Cin/32][16][16][2] */
  const float *b1;    /* the 1x1's bias (C float32) */
  int cin;            /* x's channels: C when copying, else the 1x1's input channels */
} Source;

/* A 32-pixel by 32-output block of the 1x1 product: accumulator 2i + j = pixels a[i] (16 rows,
 * `cin` values apart) times 16-output weight tile j (b[j], NULL for none), for i < mt. Per K
 * step two A and two B loads feed four tile products, and each tile is reloaded only after the
 * products reading it are done. */
__attribute__((target("amx-tile,amx-bf16"))) static void pointwise_products(
    const uint16_t *const *a, int cin, int mt, const uint16_t *const *b, int zero) {
  const long astride = (long)cin * 2;
  if (zero) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int k = 0; k < cin / 32; ++k) {
    _tile_loadd(6, b[0] + 512L * k, 64);
    _tile_loadd(4, a[0] + 32L * k, astride);
    _tile_dpbf16ps(0, 4, 6);
    if (b[1]) {
      _tile_loadd(7, b[1] + 512L * k, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (mt > 1) {
      _tile_loadd(5, a[1] + 32L * k, astride);
      _tile_dpbf16ps(2, 5, 6);
      if (b[1]) _tile_dpbf16ps(3, 5, 7);
    }
  }
}

/* Accumulator m (16 pixels from q of the image, 16 outputs) + bias, ReLU, rounded to bf16 into
 * the grid's interior at channel `off` of grid `p` (pixels from qend on are dropped). */
static void store_pointwise(int m, float *acc, const float *bias, uint16_t *p, const Grid *g,
                            long q, long qend, int off) {
  tile_to(m, acc);
  const __m512 b = _mm512_loadu_ps(bias);
  int ih = (int)(q / g->W), iw = (int)(q % g->W);
  for (int r = 0; r < 16 && q + r < qend; ++r) {
    const __m512 val = _mm512_max_ps(_mm512_add_ps(_mm512_loadu_ps(acc + r * 16), b),
                                     _mm512_setzero_ps());
    uint16_t *dst = p + ((long)(ih - g->row0) * g->Wp + iw + 1) * g->kc + off;
    _mm256_storeu_si256((__m256i *)dst, (__m256i)_mm512_cvtneps_pbh(val));
    if (++iw == g->W) iw = 0, ++ih;
  }
}

/* Where a 1x1's output tiles go: accumulator m holds 16 pixels from q of the image by 16 outputs
 * from channel ch (of those the call computes), bias the outputs' own; pixels from qend on are
 * dropped. */
typedef struct {
  void (*store)(const void *to, int m, float *acc, const float *bias, long q, long qend, int ch);
  const void *to;
} TileSink;

/* ReLU(conv1x1 + bias) of image xn's pixels qa .. qe - 1 (cin channels each; hw in the image) for
 * `tiles` 16-output tiles of the packed weight w ([tiles][cin/32][16][16][2]), in 32-pixel by
 * 32-output blocks, each tile handed to the sink. A last 16-pixel tile running past the image is
 * read from `rest` (a zero-padded copy made once) so that no tile load leaves x. The loop order
 * keeps the smaller operand in cache while the other streams: pixels outer when the weight is
 * smaller than the pixels, outputs outer otherwise. */
static void pointwise_pixels(const uint16_t *xn, long hw, long qa, long qe, const uint16_t *w,
                             const float *bias, int cin, int tiles, uint16_t *rest, float *acc,
                             const TileSink *sink) {
  const long per_tile = (long)(cin / 32) * 512;
  const long ql = qa + (qe - qa - 1) / 16 * 16; /* the last tile's first pixel */
  if (ql + 16 > hw) {
    memcpy(rest, xn + ql * cin, (size_t)(hw - ql) * cin * 2);
    memset(rest + (hw - ql) * cin, 0, (size_t)(16 - (hw - ql)) * cin * 2);
  }
  const long qblocks = (qe - qa + 31) / 32, tpairs = (tiles + 1) / 2;
  const int pixels_outer = tiles * 16L <= qe - qa;
  const long outer = pixels_outer ? qblocks : tpairs, inner = pixels_outer ? tpairs : qblocks;
  for (long i = 0; i < outer; ++i)
    for (long j = 0; j < inner; ++j) {
      const long q0 = qa + 32 * (pixels_outer ? i : j), t0 = 2 * (pixels_outer ? j : i);
      const int mt = qe - q0 > 16 ? 2 : 1, nt = tiles - t0 > 1 ? 2 : 1;
      const uint16_t *a[2], *b[2];
      for (int m = 0; m < 2; ++m) {
        const long q = q0 + 16 * m;
        a[m] = q + 16 <= hw ? xn + q * cin : rest;
      }
      b[0] = w + t0 * per_tile;
      b[1] = nt > 1 ? b[0] + per_tile : NULL;
      pointwise_products(a, cin, mt, b, 1);
      for (int m = 0; m < mt; ++m)
        for (int n = 0; n < nt; ++n) {
          const int ch = (int)(t0 + n) * 16;
          sink->store(sink->to, 2 * m + n, acc, bias + ch, q0 + 16 * m, qe, ch);
        }
    }
}

/* The grids a 1x1 fills: `chunk` blocks' grids of geometry g. */
typedef struct {
  uint16_t *const *p;
  const Grid *g;
} GridSink;

static void store_grids(const void *to, int m, float *acc, const float *bias, long q, long qend,
                        int ch) {
  const GridSink *s = to;
  store_pointwise(m, acc, bias, s->p[ch / s->g->kc], s->g, q, qend, ch % s->g->kc);
}

/* The grids of blocks b0 .. b0 + chunk - 1 of one image (its rows the grid holds) from the 1x1
 * convolution of its pixels (see pointwise_pixels). */
static void fill_grids_pointwise(uint16_t *const *p, int chunk, const uint16_t *xn, const Grid *g,
                                 int b0, const Source *src, uint16_t *rest, float *acc) {
  const int kc = g->kc;
  zero_padding(p, chunk, g);
  const int first = g->row0 < 0 ? 0 : g->row0;
  const int end = g->row0 + g->grid_rows < g->H ? g->row0 + g->grid_rows : g->H;
  const GridSink grids = {p, g};
  const TileSink sink = {store_grids, &grids};
  pointwise_pixels(xn, (long)g->H * g->W, (long)first * g->W, (long)end * g->W,
                   src->w1 + (long)b0 * (kc / 16) * (src->cin / 32) * 512, src->b1 + (long)b0 * kc,
                   src->cin, chunk * kc / 16, rest, acc, &sink);
}

#define MAX_CHUNK 128

/* One thread's buffers for a call: the grids of `chunk` blocks, the 1x1's last-tile copy and
 * the accumulator read-back (see scratch). */
typedef struct {
  uint16_t *p[MAX_CHUNK]; /* the grids */
  uint16_t *rest;
  float *acc;
} Work;

/* This thread's Work for grids of grid_bytes each (a multiple of 64), with AMX configured;
 * 0 if memory runs out. */
static int take_work(Work *w, int chunk, size_t grid_bytes, const Source *src) {
  uint16_t *grids = scratch(0, grid_bytes * chunk);
  w->rest = scratch(1, src->w1 ? (size_t)16 * src->cin * 2 : 64);
  w->acc = scratch(2, 16 * 16 * sizeof(float));
  if (!grids || !w->rest || !w->acc) return 0;
  for (int c = 0; c < chunk; ++c) w->p[c] = grids + c * (grid_bytes / 2);
  configure();
  return 1;
}

/* The grids of blocks b0 .. b0 + chunk - 1 of image xn, from the source. */
static void fill(Work *w, int chunk, const uint16_t *xn, const Grid *g, int b0,
                 const Source *src) {
  if (src->w1)
    fill_grids_pointwise(w->p, chunk, xn, g, b0, src, w->rest, w->acc);
  else
    fill_grids(w->p, chunk, xn, g, b0);
}

/* The grouped convolution of blocks b0 .. b0 + chunk - 1 at grid positions v_begin .. v_end - 1,
 * + bias (ReLU if relu), into output rows lo .. hi - 1 of out (see store_tile). Positions outer,
 * blocks inner: each output pixel's chunk of channels is written while its cache lines are
 * still in L1. */
static void grouped_rows(Work *w, int chunk, const Grid *g, int b0, const uint16_t *wp,
                         const float *bias, int relu, uint16_t *out, long v_begin, long v_end,
                         int lo, int hi) {
  const int kc = g->kc, nt = kc / 16, steps = k_steps(kc);
  for (long v0 = v_begin; v0 < v_end; v0 += 16 * MT) {
    const long left = (v_end - v0 + 15) / 16;
    const int mt = left < MT ? (int)left : MT;
    for (int c = 0; c < chunk; ++c)
      for (int t = 0; t < nt; ++t) {
        const int b = b0 + c;
        products(w->p[c], g, v0, mt, wp + ((long)b * nt + t) * steps * 512);
        for (int m = 0; m < mt; ++m)
          store_tile(m, w->acc, bias, relu, out, g, v0 + 16 * m, b * kc + t * 16, lo, hi);
      }
  }
}

/* Blocks per item: copying, up to 64 channels (128 bytes of each pixel: whole cache lines, read
 * once); from a 1x1, as many blocks as keep the grids within ~1 MB (each extra item re-reads the
 * image's x), but enough items for every thread. A divisor of the block count either way. */
static int chunk_blocks(const Grid *g, int blocks, int N, int threads, int pointwise) {
  int chunk;
  if (!pointwise) {
    chunk = 64 / g->kc > 1 ? 64 / g->kc : 1;
  } else {
    const long grid_bytes = g->pixels * g->kc * 2;
    chunk = (int)((1L << 20) / grid_bytes);
    if (chunk < 1) chunk = 1;
    while (chunk > 1 && (long)N * ((blocks + chunk - 1) / chunk) < threads) --chunk;
  }
  if (chunk > MAX_CHUNK) chunk = MAX_CHUNK;
  if (chunk > blocks) chunk = blocks;
  while (blocks % chunk) --chunk;
  return chunk;
}

/* Accumulator m (grid positions v..v+15 of dy's grid x 16 channels from c) rounded to bf16 into
 * the pixels (2 oh + ph, 2 ow + pw) of dx (H x W, C channels) that exist. */
static void store_phase(int m, float *acc, uint16_t *dx, const Grid *g, long v, int c, int ph,
                        int pw, int H, int W) {
  tile_to(m, acc);
  int oh = (int)(v / g->Wv), ow = (int)(v % g->Wv);
  for (int r = 0; r < 16 && oh < g->Ho; ++r) {
    const int ih = 2 * oh + ph, iw = 2 * ow + pw;
    if (ow < g->Wo && ih < H && iw < W) {
      uint16_t *dst = dx + ((long)ih * W + iw) * g->C + c;
      _mm256_storeu_si256((__m256i *)dst,
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(acc + r * 16)));
    }
    if (++ow == g->Wv) ow = 0, ++oh;
  }
}

/* The four phases of a stride-2 input gradient (see grouped3x3_amx_dgrad_s2): phase q's packed
 * weight starts at wp + start[q] and holds count[q] live steps per tile, live + q * steps marks
 * them among the steps; the output is dx, H x W pixels. */
typedef struct {
  const uint8_t *live;
  long start[4], count[4];
  int H, W;
} Phases;

/* grouped_rows for the four phases of the input gradient: every grid position of dy's grid,
 * phase after phase, each accumulator stored to dx's pixels of that phase's parity. */
static void phase_rows(Work *w, int chunk, const Grid *g, int b0, const uint16_t *wp,
                       const Phases *ph, uint16_t *dxn) {
  const int kc = g->kc, nt = kc / 16, steps = k_steps(kc);
  for (int q = 0; q < 4; ++q)
    for (long v0 = 0; v0 < g->virt; v0 += 16 * MT) {
      const long left = (g->virt - v0 + 15) / 16;
      const int mt = left < MT ? (int)left : MT;
      for (int c = 0; c < chunk; ++c)
        for (int t = 0; t < nt; ++t) {
          const int b = b0 + c;
          const uint16_t *wb = wp + ph->start[q] + ((long)b * nt + t) * ph->count[q] * 512;
          products_live(w->p[c], g, v0, mt, wb, ph->live + q * steps);
          for (int m = 0; m < mt; ++m)
            store_phase(m, w->acc, dxn, g, v0 + 16 * m, b * kc + t * 16, q / 2, q % 2, ph->H,
                        ph->W);
        }
    }
}

/* y = conv(source of x) over the items (image, chunk of blocks); with ph (s = 1), y is instead
 * the stride-2 input gradient whose output gradient x is (see Phases). */
static int run(const uint16_t *x, const Source *src, const uint16_t *wp, const float *bias,
               uint16_t *y, int N, int H, int W, int C, int cpg, int s, int relu, int threads,
               const Phases *ph) {
  if (N < 0 || H < 1 || W < 1 || threads < 1 || !grouped3x3_amx_supported(C, cpg, s)) return -1;
  if (src->w1 && (src->cin < 32 || src->cin % 32)) return -1;
  if (!grouped3x3_amx_allowed()) return -2;
  const int kc = block_channels(cpg), blocks = C / kc;
  const Grid g = make_grid(H, W, C, kc, s, 0, (H - 1) / s + 1);
  const int chunk = chunk_blocks(&g, blocks, N, threads, src->w1 != NULL);
  const long items = (long)N * (blocks / chunk);
  const size_t grid_bytes = ((size_t)g.pixels * kc * 2 + 63) / 64 * 64;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    Work w;
    const int ok = take_work(&w, chunk, grid_bytes, src);
    failed = !ok;
    /* every thread reaches the work-sharing loop (a thread without scratch skips its share) */
#pragma omp for schedule(static)
    for (long item = 0; item < items; ++item) {
      if (!ok) continue;
      const long n = item / (blocks / chunk);
      const int b0 = (int)(item % (blocks / chunk)) * chunk;
      fill(&w, chunk, x + n * (long)H * W * src->cin, &g, b0, src);
      if (ph)
        phase_rows(&w, chunk, &g, b0, wp, ph, y + n * (long)ph->H * ph->W * C);
      else
        grouped_rows(&w, chunk, &g, b0, wp, bias, relu, y + n * (long)g.Ho * g.Wo * C, 0,
                     g.virt, 0, g.Ho);
    }
    if (ok) release();
  }
  return failed ? -3 : 0;
}

/* y = conv(x) (+ bias, then ReLU if relu). Returns 0; -1 for a shape the kernel does not take,
 * -2 if the OS refuses AMX, -3 if scratch memory cannot be had. */
int grouped3x3_amx(const uint16_t *x, const uint16_t *wp, const float *bias, uint16_t *y, int N,
                   int H, int W, int C, int cpg, int s, int relu, int threads) {
  const Source src = {NULL, NULL, C};
  return run(x, &src, wp, bias, y, N, H, W, C, cpg, s, relu, threads, NULL);
}

/* dx (bf16 [N][H][W][C]) = the input gradient of a stride-2 grouped 3x3 convolution (padding 1)
 * from its output gradient dy ([N][Ho][Wo][C]). The pixels of dx of one row and column parity
 * (ph, pw) are a stride-1 convolution of dy with 1, 2 or 4 of the weight's taps (phase q = 2 ph +
 * pw); live + q * steps says which K steps of pack_weights' layout hold any of them, and wp holds
 * the phases one after the other, each [C / kc][kc / 16][its live steps][16][16][2] (packed by
 * grouped_dgrad_amx.pack_phases). dy's grids are filled once per item for the four phases, whose
 * live steps add up to 9 of the 24 of four whole convolutions. Returns as grouped3x3_amx. */
int grouped3x3_amx_dgrad_s2(const uint16_t *dy, const uint16_t *wp, const uint8_t *live,
                            uint16_t *dx, int N, int H, int W, int C, int cpg, int threads) {
  if (H < 1 || W < 1 || !grouped3x3_amx_supported(C, cpg, 1)) return -1;
  const int kc = block_channels(cpg), blocks = C / kc, nt = kc / 16, steps = k_steps(kc);
  Phases ph = {live, {0}, {0}, H, W};
  long at = 0;
  for (int q = 0; q < 4; ++q) {
    for (int k = 0; k < steps; ++k) ph.count[q] += live[q * steps + k] != 0;
    ph.start[q] = at;
    at += (long)blocks * nt * ph.count[q] * 512;
  }
  const Source src = {NULL, NULL, C};
  return run(dy, &src, wp, NULL, dx, N, (H - 1) / 2 + 1, (W - 1) / 2 + 1, C, cpg, 1, 0, threads,
             &ph);
}

/* y = conv(ReLU(conv1x1(x) + b1)) (+ bias, then ReLU if relu): a bottleneck's first two
 * convolutions in one pass, x with Cin channels (a multiple of 32), w1 packed by
 * grouped_amx.pack_pointwise. Returns as grouped3x3_amx. */
int pointwise_grouped3x3_amx(const uint16_t *x, const uint16_t *w1, const float *b1,
                             const uint16_t *wp, const float *bias, uint16_t *y, int N, int H,
                             int W, int Cin, int C, int cpg, int s, int relu, int threads) {
  if (w1 == NULL || b1 == NULL) return -1;
  const Source src = {w1, b1, Cin};
  return run(x, &src, wp, bias, y, N, H, W, C, cpg, s, relu, threads, NULL);
}

/* Accumulator m (16 pixels x 16 outputs) + bias + the residual (bf16, `cout` values per pixel;
 * none where res is NULL), ReLU, rounded to bf16 into y, for the first `rows` pixels. */
static void store_residual(int m, float *acc, const float *bias, const uint16_t *res, uint16_t *y,
                           int rows, int cout) {
  tile_to(m, acc);
  const __m512 b = _mm512_loadu_ps(bias);
  for (int r = 0; r < rows; ++r) {
    const __m256i rb =
        res ? _mm256_loadu_si256((const __m256i *)(res + (long)r * cout)) : _mm256_setzero_si256();
    const __m512 rv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rb), 16));
    const __m512 val = _mm512_max_ps(
        _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(acc + r * 16), b), rv), _mm512_setzero_ps());
    _mm256_storeu_si256((__m256i *)(y + (long)r * cout), (__m256i)_mm512_cvtneps_pbh(val));
  }
}

/* A projection shortcut computed in the block's last 1x1: its packed weight ([Cout/16][cin/32]
 * [16][16][2], as w3), its input x[N][H][W][cin] (the block's input: the kernel's own x where
 * the first 1x1 is fused in, else the tensor that 1x1 read) and that input's channels; its bias
 * is in b3. */
typedef struct {
  const uint16_t *w, *x;
  int cin;
} Shortcut;

/* y = ReLU(z w3 + b3 + residual) for `pixels` rows of z (C values each; z holds them rounded up
 * to 32 rows) and `cout` outputs into rows of y and residual (`stride` values apart), in
 * 32-pixel by 32-output blocks, with the loop order of fill_grids_pointwise. With a shortcut,
 * y = ReLU(z w3 + xs wsc + b3): xs holds the shortcut's input for the same pixels (sc->cin
 * values each, as many rows as z), its products accumulated onto the last 1x1's, res unused. */
static void block_tail(const uint16_t *z, long pixels, int C, const uint16_t *w3, const float *b3,
                       const uint16_t *res, uint16_t *y, int cout, int stride, float *acc,
                       const uint16_t *xs, const Shortcut *sc, const uint16_t *wsc) {
  const int tiles = cout / 16;
  const long per_tile = (long)(C / 32) * 512;
  const long qblocks = (pixels + 31) / 32, tpairs = (tiles + 1) / 2;
  const int pixels_outer = tiles * 16L <= pixels;
  const long outer = pixels_outer ? qblocks : tpairs, inner = pixels_outer ? tpairs : qblocks;
  for (long i = 0; i < outer; ++i)
    for (long j = 0; j < inner; ++j) {
      const long q0 = 32 * (pixels_outer ? i : j), t0 = 2 * (pixels_outer ? j : i);
      const int mt = pixels - q0 > 16 ? 2 : 1, nt = tiles - t0 > 1 ? 2 : 1;
      const uint16_t *a[2] = {z + q0 * C, z + (q0 + 16) * C};
      const uint16_t *b[2] = {w3 + t0 * per_tile, nt > 1 ? w3 + (t0 + 1) * per_tile : NULL};
      pointwise_products(a, C, mt, b, 1);
      if (sc) {
        const long sc_tile = (long)(sc->cin / 32) * 512;
        const uint16_t *ax[2] = {xs + q0 * sc->cin, xs + (q0 + 16) * sc->cin};
        const uint16_t *bx[2] = {wsc + t0 * sc_tile, nt > 1 ? wsc + (t0 + 1) * sc_tile : NULL};
        pointwise_products(ax, sc->cin, mt, bx, 0);
      }
      for (int m = 0; m < mt; ++m) {
        const long q = q0 + 16 * m;
        const int rows = pixels - q < 16 ? (int)(pixels - q) : 16;
        for (int n = 0; n < nt; ++n) {
          const long at = q * stride + (t0 + n) * 16;
          store_residual(2 * m + n, acc, b3 + (t0 + n) * 16, sc ? NULL : res + at, y + at, rows,
                         stride);
        }
      }
    }
}

/* The shortcut's input for output pixels q = 0 .. pixels - 1 from output row oh0 of image n
 * (input pixel (s oh, s ow), sc->cin channels) as rows of xs, zeros up to the next 32 rows. */
static void gather_shortcut(long n, int H, int W, int s, int Wo, int oh0, long pixels,
                            const Shortcut *sc, uint16_t *xs) {
  const int cin = sc->cin;
  const uint16_t *xn = sc->x + n * H * W * cin;
  for (long q = 0; q < pixels; ++q) {
    const long oh = oh0 + q / Wo, ow = q % Wo;
    memcpy(xs + q * cin, xn + (s * oh * W + s * ow) * cin, (size_t)cin * 2);
  }
  const long rounded = (pixels + 31) / 32 * 32;
  memset(xs + pixels * cin, 0, (size_t)(rounded - pixels) * cin * 2);
}

/* Whether a block kernel's arguments past the grouped convolution's shape fit: C (the grouped
 * channels) and cout whole K steps and tiles of the last 1x1, its weight and bias, a residual or
 * a shortcut (whose input y may not be, nor x), and a first 1x1's input channels or x's own. */
static int block_args_ok(const uint16_t *x, const Source *src, const uint16_t *w3, const float *b3,
                         const uint16_t *res, const uint16_t *y, int C, int cout,
                         const Shortcut *sc) {
  if (C % 32 || cout < 16 || cout % 16 || !w3 || !b3 || !(sc ? sc->w != NULL : res != NULL))
    return 0;
  if (sc && (!sc->x || sc->cin < 32 || sc->cin % 32 || y == x || y == sc->x)) return 0;
  return src->w1 ? src->cin >= 32 && src->cin % 32 == 0 : src->cin == C;
}

/* Output rows per strip of z (rows of wo pixels, C channels), at most max_rows: z's bytes half
 * the last 1x1 weight's, at least 128 KB, so that re-reading the weight per strip costs no more
 * than re-reading z per 32 outputs. */
static int block_strip_rows(int C, int cout, int wo, int max_rows) {
  const long z_target = (long)C * cout > (1L << 17) ? (long)C * cout : (1L << 17);
  int rows = (int)(z_target / ((long)wo * C * 2));
  if (rows < 1) rows = 1;
  return rows > max_rows ? max_rows : rows;
}

/* run_block for few images and large weights (batch 1 at stages 3-4): bands would each read
 * every weight, so the threads split the channels instead, one image at a time. First each takes
 * units of 32 channels (the first 1x1 and the grouped convolution are block-local) into z, the
 * grouped output of the whole image; then, after the barrier, pairs of 16-output tiles of the
 * last 1x1. Each weight is read by one thread, and x is read only before any output is written,
 * so y may be x. */
static int run_block_split(const uint16_t *x, const Source *src, const uint16_t *wp,
                           const float *b2, const uint16_t *w3, const float *b3,
                           const uint16_t *res, uint16_t *y, int N, int H, int W, int C, int cout,
                           int cpg, int s, int threads, const Shortcut *sc) {
  const int kc = block_channels(cpg);
  const int per_unit = kc >= 32 ? 1 : 32 / kc, units = C / kc / per_unit;
  const int Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1;
  const Grid g = make_grid(H, W, C, kc, s, 0, Ho);
  const size_t grid_bytes = ((size_t)g.pixels * kc * 2 + 63) / 64 * 64;
  const long pixels = (long)Ho * Wo, pairs = (cout / 16 + 1) / 2;
  /* the calling thread's buffer, shared by all (the others' slot 3 is never used here) */
  uint16_t *z = scratch(3, (size_t)((pixels + 31) / 32 * 32) * C * 2);
  uint16_t *xs = sc ? scratch(4, (size_t)((pixels + 31) / 32 * 32) * sc->cin * 2) : NULL;
  if (!z || (sc && !xs)) return -3;
  int failed = 0;
  for (long n = 0; n < N; ++n) {
    const uint16_t *xn = x + n * (long)H * W * src->cin;
    const long at = n * pixels * cout;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
      Work w;
      const int ok = take_work(&w, per_unit, grid_bytes, src);
      failed = !ok;
      if (sc) {
#pragma omp single
        gather_shortcut(n, H, W, s, Wo, 0, pixels, sc, xs);
      }
#pragma omp for schedule(static)
      for (int unit = 0; unit < units; ++unit) {
        if (!ok) continue;
        const int b0 = unit * per_unit;
        fill(&w, per_unit, xn, &g, b0, src);
        grouped_rows(&w, per_unit, &g, b0, wp, b2, 1, z, 0, g.virt, 0, Ho);
      }
      /* the loop's barrier: z is whole, and x has been read for the last time */
#pragma omp for schedule(static)
      for (long pair = 0; pair < pairs; ++pair) {
        if (!ok) continue;
        const int c0 = (int)pair * 32, outs = cout - c0 < 32 ? cout - c0 : 32;
        const uint16_t *wsc = sc ? sc->w + (long)pair * 2 * (sc->cin / 32) * 512 : NULL;
        block_tail(z, pixels, C, w3 + (long)pair * 2 * (C / 32) * 512, b3 + c0,
                   sc ? NULL : res + at + c0, y + at + c0, outs, cout, w.acc, xs, sc, wsc);
      }
      if (ok) release();
    }
  }
  return failed ? -3 : 0;
}

/* y = ReLU(conv1x1(g) + b3 + residual) with g = ReLU(grouped conv3x3 of the source + b2): a
 * bottleneck from its grouped convolution on (the source being x itself or ReLU(conv1x1(x) + b1),
 * see Source), the grouped output kept in cache instead of memory. An item is a band of one
 * image's output rows with the grids of all its blocks (the 1x1 after needs every channel of a
 * pixel), the bands as tall as keep those grids within ~1 MB yet enough items for every thread.
 * Within a band, strips of output rows go through the grouped convolution into z, then z through
 * the 1x1; a strip is sized so that re-reading the 1x1 weight per strip costs no more than
 * re-reading z per 32 outputs. */
static int run_block(const uint16_t *x, const Source *src, const uint16_t *wp, const float *b2,
                     const uint16_t *w3, const float *b3, const uint16_t *res, uint16_t *y, int N,
                     int H, int W, int C, int cout, int cpg, int s, int threads,
                     const Shortcut *sc) {
  if (N < 0 || H < 1 || W < 1 || threads < 1 || !grouped3x3_amx_supported(C, cpg, s)) return -1;
  if (!block_args_ok(x, src, w3, b3, res, y, C, cout, sc)) return -1;
  const int kc = block_channels(cpg), blocks = C / kc;
  if (blocks > MAX_CHUNK) return -1;
  if (!grouped3x3_amx_allowed()) return -2;
  if (N == 0) return 0;
  const int Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1;
  const long weight_bytes =
      ((long)C * cout + (src->w1 ? (long)src->cin * C : 0) + (sc ? (long)sc->cin * cout : 0)) * 2;
  const long image_bytes = ((long)H * W * src->cin + (long)Ho * Wo * cout) * 2;
  if (N < threads && weight_bytes > image_bytes)
    return run_block_split(x, src, wp, b2, w3, b3, res, y, N, H, W, C, cout, cpg, s, threads, sc);
  const Grid whole = make_grid(H, W, C, kc, s, 0, Ho);
  int bands = (int)((whole.pixels * C * 2 + (1L << 20) - 1) >> 20);
  if (bands < (threads + N - 1) / N) bands = (threads + N - 1) / N;
  if (bands > Ho) bands = Ho;
  /* Written over x (the identity shortcut, in place): a band would read halo rows of x that
   * another band may already have overwritten, so an item is a whole image. */
  if ((const uint16_t *)y == x) bands = 1;
  const int band_rows = (Ho + bands - 1) / bands;
  bands = (Ho + band_rows - 1) / band_rows;
  const Grid tallest = make_grid(H, W, C, kc, s, 0, band_rows);
  const size_t grid_bytes = ((size_t)tallest.pixels * kc * 2 + 63) / 64 * 64;
  const int strip_rows = block_strip_rows(C, cout, Wo, band_rows);
  const size_t z_bytes = (size_t)(((long)strip_rows * Wo + 31) / 32 * 32) * C * 2;
  const size_t xs_bytes = sc ? (size_t)(((long)strip_rows * Wo + 31) / 32 * 32) * sc->cin * 2 : 64;
  const long items = (long)N * bands;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    Work w;
    /* rows past a strip's pixels are read too: whatever they hold, their results are dropped */
    uint16_t *z = scratch(3, z_bytes), *xs = scratch(4, xs_bytes);
    const int ok = z && xs && take_work(&w, blocks, grid_bytes, src);
    failed = !ok;
#pragma omp for schedule(static)
    for (long item = 0; item < items; ++item) {
      if (!ok) continue;
      const long n = item / bands;
      const int oh0 = (int)(item % bands) * band_rows;
      const int rows = Ho - oh0 < band_rows ? Ho - oh0 : band_rows;
      const Grid g = make_grid(H, W, C, kc, s, oh0, rows);
      const uint16_t *xn = x + n * (long)H * W * src->cin;
      fill(&w, blocks, xn, &g, 0, src);
      for (int sa = 0; sa < rows; sa += strip_rows) {
        const int sb = rows - sa < strip_rows ? rows : sa + strip_rows;
        grouped_rows(&w, blocks, &g, 0, wp, b2, 1, z, (long)sa * g.Wv, (long)sb * g.Wv, sa, sb);
        const long at = (n * Ho + oh0 + sa) * (long)Wo * cout, pixels = (long)(sb - sa) * Wo;
        if (sc) gather_shortcut(n, H, W, s, Wo, oh0 + sa, pixels, sc, xs);
        block_tail(z, pixels, C, w3, b3, sc ? NULL : res + at, y + at, cout, cout, w.acc, xs,
                   sc, sc ? sc->w : NULL);
      }
    }
    if (ok) release();
  }
  return failed ? -3 : 0;
}

/* The planes a 1x1 fills in the quads form: every group's plane of one image. */
typedef struct {
  uint16_t *planes;
  const Planes *p;
} PlaneSink;

/* Accumulator m (16 pixels from q, 16 outputs from channel ch: 4 groups of 4 or 2 of 8) + bias,
 * ReLU, rounded to bf16 into the groups' planes (pixels from qend on are dropped). */
static void store_planes(const void *to, int m, float *acc, const float *bias, long q, long qend,
                         int ch) {
  const PlaneSink *s = to;
  const Planes *p = s->p;
  tile_to(m, acc);
  const __m512 b = _mm512_loadu_ps(bias);
  uint16_t *first = s->planes + (long)(ch / p->cpg) * p->plane;
  int ih = (int)(q / p->W), iw = (int)(q % p->W);
  for (int r = 0; r < 16 && q + r < qend; ++r) {
    const __m512 val = _mm512_max_ps(_mm512_add_ps(_mm512_loadu_ps(acc + r * 16), b),
                                     _mm512_setzero_ps());
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(val);
    uint16_t *dst = first + ((long)(ih + 1) * p->Wq + iw + 1) * p->cpg;
    if (p->cpg == 4) {
      _mm_storel_epi64((__m128i *)dst, _mm256_castsi256_si128(h));
      _mm_storeh_pd((double *)(dst + p->plane), _mm_castsi128_pd(_mm256_castsi256_si128(h)));
      _mm_storel_epi64((__m128i *)(dst + 2 * p->plane), _mm256_extracti128_si256(h, 1));
      _mm_storeh_pd((double *)(dst + 3 * p->plane),
                    _mm_castsi128_pd(_mm256_extracti128_si256(h, 1)));
    } else {
      _mm_storeu_si128((__m128i *)dst, _mm256_castsi256_si128(h));
      _mm_storeu_si128((__m128i *)(dst + p->plane), _mm256_extracti128_si256(h, 1));
    }
    if (++iw == p->W) iw = 0, ++ih;
  }
}

/* run_block with the grouped convolution in the quads form (grouped3x3_quads_amx.c; stride 1,
 * 4 or 8 channels per group; wq packed by grouped_quads.pack_weights): half the block-diagonal
 * form's tile products. An item is one image, whose groups' planes (~0.9 MB at ResNeXt-50's stage
 * 1) are filled from x or from the first 1x1 before its strips of output rows go through the
 * grouped products into z and z through the last 1x1 (as run_block's). The whole image is read
 * before any of its output is written, so y may be x. */
static int run_block_quads(const uint16_t *x, const Source *src, const uint16_t *wq,
                           const float *b2, const uint16_t *w3, const float *b3,
                           const uint16_t *res, uint16_t *y, int N, int H, int W, int C, int cout,
                           int cpg, int threads, const Shortcut *sc) {
  if (N < 0 || H < 1 || W < 1 || threads < 1 || !quads_supported(C, cpg)) return -1;
  if (!block_args_ok(x, src, w3, b3, res, y, C, cout, sc)) return -1;
  if (!grouped3x3_amx_allowed()) return -2;
  if (N == 0) return 0;
  const Planes p = make_planes(H, W, C, cpg);
  const int groups = C / cpg, set_channels = 4 * cpg, sets = C / set_channels;
  const int strip_rows = block_strip_rows(C, cout, W, H);
  const long strip_pixels = ((long)strip_rows * W + 31) / 32 * 32;
  const size_t z_bytes = (size_t)strip_pixels * C * 2;
  const size_t xs_bytes = sc ? (size_t)strip_pixels * sc->cin * 2 : 64;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    uint16_t *planes = scratch(0, (size_t)p.plane * groups * 2);
    uint16_t *rest = scratch(1, src->w1 ? (size_t)16 * src->cin * 2 : 64);
    float *acc = scratch(2, 4 * 256 * sizeof(float));
    /* rows past a strip's pixels are read too: whatever they hold, their results are dropped */
    uint16_t *z = scratch(3, z_bytes), *xs = scratch(4, xs_bytes);
    const int ok = planes && rest && acc && z && xs;
    failed = !ok;
    if (ok) {
      quads_zero_borders(planes, &p, groups);
      configure();
    }
    const PlaneSink into = {planes, &p};
    const TileSink sink = {store_planes, &into};
#pragma omp for schedule(static)
    for (long n = 0; n < N; ++n) {
      if (!ok) continue;
      const uint16_t *xn = x + n * (long)H * W * src->cin;
      if (src->w1)
        pointwise_pixels(xn, (long)H * W, 0, (long)H * W, src->w1, src->b1, src->cin, C / 16,
                         rest, acc, &sink);
      else
        quads_fill(planes, &p, xn, 0, C);
      for (int sa = 0; sa < H; sa += strip_rows) {
        const int sb = H - sa < strip_rows ? H : sa + strip_rows;
        for (int k = 0; k < sets; ++k)
          quads_rows(planes + (long)k * 4 * p.plane, &p, wq + (long)k * 4 * 3 * 512, b2, 1, z,
                     k * set_channels, acc, sa, sb);
        const long at = (n * H + sa) * (long)W * cout, pixels = (long)(sb - sa) * W;
        if (sc) gather_shortcut(n, H, W, 1, W, sa, pixels, sc, xs);
        block_tail(z, pixels, C, w3, b3, sc ? NULL : res + at, y + at, cout, cout, acc, xs, sc,
                   sc ? sc->w : NULL);
      }
    }
    if (ok) release();
  }
  return failed ? -3 : 0;
}

/* y = ReLU(conv1x1(ReLU(conv3x3(s) + b2), w3) + b3 + residual), the rest of a bottleneck after
 * its first 1x1, with s = x (w1 NULL; Cin = C) or s = ReLU(conv1x1(x, w1) + b1) (the whole
 * bottleneck; Cin a multiple of 32). w1 and w3 are packed by grouped_amx.pack_pointwise, wp by
 * pack_weights; residual and y are [N][Ho][Wo][Cout] bf16. y may be residual (each value is
 * read just before it is overwritten), and residual may be x (with w1, Cin = Cout and s = 1), so
 * also y = residual = x: the block in place. Returns as grouped3x3_amx. */
int block_amx(const uint16_t *x, const uint16_t *w1, const float *b1, const uint16_t *wp,
              const float *b2, const uint16_t *w3, const float *b3, const uint16_t *residual,
              uint16_t *y, int N, int H, int W, int Cin, int C, int Cout, int cpg, int s,
              int threads) {
  if (w1 != NULL && b1 == NULL) return -1;
  const Source src = {w1, b1, Cin};
  return run_block(x, &src, wp, b2, w3, b3, residual, y, N, H, W, C, Cout, cpg, s, threads, NULL);
}

/* y = ReLU(conv1x1(ReLU(conv3x3(s) + b2), w3) + conv1x1(xsc at stride s, wsc) + b3) with s = x
 * (w1 NULL; Cin = C) or s = ReLU(conv1x1(x, w1) + b1): a bottleneck with a projection shortcut
 * (stride s, no padding) of its input xsc ([N][H][W][Csc], Csc a multiple of 32; x itself where
 * w1 is given), the shortcut's products accumulated onto the last 1x1's so that neither its
 * output nor a residual goes to memory. wsc is packed like w3 ([Cout/16][Csc/32]...), b3 holds
 * both 1x1s' biases summed; y must be neither x nor xsc. Returns as grouped3x3_amx. */
int block_amx_shortcut(const uint16_t *x, const uint16_t *w1, const float *b1, const uint16_t *wp,
                       const float *b2, const uint16_t *w3, const float *b3, const uint16_t *wsc,
                       const uint16_t *xsc, uint16_t *y, int N, int H, int W, int Cin, int C,
                       int Cout, int Csc, int cpg, int s, int threads) {
  if ((w1 != NULL && b1 == NULL) || wsc == NULL || xsc == NULL) return -1;
  const Source src = {w1, b1, Cin};
  const Shortcut sc = {wsc, xsc, Csc};
  return run_block(x, &src, wp, b2, w3, b3, NULL, y, N, H, W, C, Cout, cpg, s, threads, &sc);
}

/* block_amx with the grouped convolution in the quads form: wq packed by
 * grouped_quads.pack_weights, stride 1, 4 or 8 channels per group; otherwise the same arguments,
 * function and in-place rules. Returns as grouped3x3_amx. */
int block_quads_amx(const uint16_t *x, const uint16_t *w1, const float *b1, const uint16_t *wq,
                    const float *b2, const uint16_t *w3, const float *b3, const uint16_t *residual,
                    uint16_t *y, int N, int H, int W, int Cin, int C, int Cout, int cpg, int s,
                    int threads) {
  if ((w1 != NULL && b1 == NULL) || s != 1) return -1;
  const Source src = {w1, b1, Cin};
  return run_block_quads(x, &src, wq, b2, w3, b3, residual, y, N, H, W, C, Cout, cpg, threads,
                         NULL);
}

/* block_amx_shortcut with the grouped convolution in the quads form (see block_quads_amx). */
int block_quads_amx_shortcut(const uint16_t *x, const uint16_t *w1, const float *b1,
                             const uint16_t *wq, const float *b2, const uint16_t *w3,
                             const float *b3, const uint16_t *wsc, const uint16_t *xsc,
                             uint16_t *y, int N, int H, int W, int Cin, int C, int Cout, int Csc,
                             int cpg, int s, int threads) {
  if ((w1 != NULL && b1 == NULL) || wsc == NULL || xsc == NULL || s != 1) return -1;
  const Source src = {w1, b1, Cin};
  const Shortcut sc = {wsc, xsc, Csc};
  return run_block_quads(x, &src, wq, b2, w3, b3, NULL, y, N, H, W, C, Cout, cpg, threads, &sc);
}

/* The weight w[C][cpg][9] (bf16) in the kernel's packing (see grouped_amx.pack_weights, whose
 * index construction is the reference this is tested against). Returns 0, or -1 for a shape the
 * kernel does not take. */
int grouped3x3_amx_pack(const uint16_t *w, uint16_t *out, int C, int cpg, int threads) {
  const int kc = block_channels(cpg);
  if (kc == 0 || C % kc || threads < 1) return -1;
  const int tiles = kc / 16, steps = k_steps(kc), parts = (kc + 31) / 32;
  /* per K step and row: the tap and block input channel (-1: a zero row), and the groups */
  int tap_of[9 * 8 * 32], ci_of[9 * 8 * 32], group_of[256];
  for (int step = 0; step < steps; ++step)
    for (int row = 0; row < 32; ++row) {
      int tap, ci;
      if (kc == 16) { /* step = kh * 2 + tap pair; rows 0-15 tap 2j, 16-31 tap 2j+1 */
        const int kw = 2 * (step % 2) + row / 16;
        tap = kw < 3 ? (step / 2) * 3 + kw : -1, ci = row % 16;
      } else { /* step = tap * parts + part */
        tap = step / parts, ci = 32 * (step % parts) + row;
        if (ci >= kc) tap = -1, ci = 0;
      }
      tap_of[step * 32 + row] = tap, ci_of[step * 32 + row] = ci;
    }
  for (int c = 0; c < kc; ++c) group_of[c] = c / cpg;
  const long per_block = (long)tiles * steps * 512;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int b = 0; b < C / kc; ++b) {
    uint16_t *dst = out + b * per_block;
    for (int t = 0; t < tiles; ++t)
      for (int step = 0; step < steps; ++step)
        for (int row = 0; row < 32; ++row) {
          const int tap = tap_of[step * 32 + row], ci = ci_of[step * 32 + row];
          /* value (pair = row / 2, col, member = row % 2) of this step */
          uint16_t *d = dst + ((long)t * steps + step) * 512 + (row / 2) * 32 + row % 2;
          for (int col = 0; col < 16; ++col) {
            const int o = 16 * t + col;
            const int keep = tap >= 0 && group_of[ci] == group_of[o];
            d[2 * col] = keep ? w[((long)(b * kc + o) * cpg + ci % cpg) * 9 + tap] : 0;
          }
        }
  }
  return 0;
}
