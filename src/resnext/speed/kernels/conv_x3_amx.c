/* float32 convolution (groups 1) of channels-last tensors on AMX tiles, as three bf16 products.
 *
 * Why: on the Intel Xeon this was written on, float32 FMAs peak at ~490 GFLOP/s over two cores
 * while the AMX tile product (bf16 inputs, float32 accumulation) peaks at ~7,700. A float32
 * value a is split into a_hi = bf16(a) (round to nearest even) and a_lo = bf16(a - a_hi); the
 * subtraction is exact, and a_hi + a_lo keeps 16 of a's 24 significant bits (|a - a_hi - a_lo|
 * <= 2^-16 |a|). Then a b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi (a_lo b_lo, at most 2^-16 |a b|,
 * is dropped), each product exact in the tile unit and accumulated in float32: three tile
 * products per float32 product, still ~5x the FMA rate, and the error of each product stays
 * within ~3 2^-16 of its size (within 1e-5 of it in practice, errors of random sign).
 *
 * The product: y[p][o] = sum_k patch(p)[k] w[o][k] + bias[o] (+ residual[p][o]) (ReLU). Output
 * pixel p = (n, oh, ow) reads the kernel x kernel patch of input pixels from (n, s oh - pad,
 * s ow - pad), zeros outside the image, as one row of K values (kernel rows, columns, channels;
 * K = kernel^2 Cin rounded up to 32 with zeros). A 1x1 convolution's patch is the input pixel
 * itself, read in place; a larger kernel's (the 7x7 stem, a dense 3x3) is gathered into a
 * row first.
 *
 * Work: items of 32 output pixels (two 16-row A tiles) by a chunk of the outputs, the chunk as
 * wide as keeps its weights (hi and lo, 4 bytes a value) within ~1 MB of L2, so that a layer
 * whose weights fit is one chunk. Items are taken chunk by chunk, each thread a contiguous
 * range, so a thread's weights stay in its L2 while it runs over the pixels. An item's 32 pixels
 * are split into hi and lo tile rows in a buffer (the strided reads of a stride-2 layer gathered
 * there), then run 2 pixel tiles x 2 output tiles per pass over K. Each thread has two such
 * buffers and splits the next item's pixels in slices between the tile products of this one,
 * which run on asynchronously: measured on the Xeon, splitting item by item instead was 5-22 %
 * slower, and larger items (64-256 pixels) were no faster. A layer of three or more chunks
 * (wide weights) splits all its pixels once, first, into a buffer the threads share (up to
 * 16 MB), instead of once per chunk.
 *
 * Layout: x[N][H][W][Cin], residual and y [N][Ho][Wo][C] float32; weights packed by
 * conv_x3.pack as bf16 [C/16][K/32][2][16][16][2] (output tile, 32-deep K step, hi then lo,
 * K pair, output, pair member: AMX's VNNI layout); bias[C] float32.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "amx_tiles.h"
#include "bf16_split.h"

#define ROWS 32 /* output pixels per item: two 16-row A tiles */
#define CHUNK_BYTES (1L << 20)
#define SHARED_BYTES (16L << 20)
/* K steps ahead that a thread's first pass over a chunk prefetches its weights (see products) */
#define FETCH_STEPS 16

int conv_x3_allowed(void) { return amx_request(); }

typedef struct {
  const float *x;
  int H, W, Cin, kernel, s, pad, Ho, Wo;
  int K;  /* the product's depth: kernel^2 Cin rounded up to a multiple of 32, + C2 */
  long M; /* output pixels: N Ho Wo */
  /* a second 1x1 input whose products add to the first's (a projection shortcut): x2[N][H2][W2]
   * [C2] read at stride s2, its values after x's in each row of K; C2 = 0 for none */
  const float *x2;
  int H2, W2, C2, s2;
} Pixels;

/* Output pixel p's place: image n, output row and column. */
typedef struct {
  long n;
  int oh, ow;
} Place;

static inline Place place(const Pixels *px, long p) {
  const long hw = (long)px->Ho * px->Wo, rem = p % hw;
  Place at = {p / hw, (int)(rem / px->Wo), (int)(rem % px->Wo)};
  return at;
}

/* The next output pixel's place (rows run on into the next image). */
static inline void advance(const Pixels *px, Place *at) {
  if (++at->ow == px->Wo) {
    at->ow = 0;
    if (++at->oh == px->Ho) at->oh = 0, ++at->n;
  }
}

/* n floats from src to dst, in masked vector moves (a patch row is a few dozen floats). */
__attribute__((target("avx512f"))) static inline void copy_floats(float *dst, const float *src,
                                                                   int n) {
  for (; n >= 16; n -= 16, src += 16, dst += 16) _mm512_storeu_ps(dst, _mm512_loadu_ps(src));
  if (n > 0) {
    const __mmask16 m = (__mmask16)((1u << n) - 1);
    _mm512_mask_storeu_ps(dst, m, _mm512_maskz_loadu_ps(m, src));
  }
}

/* The patch of the output pixel at `at` as one row of K floats (kernel rows, then columns, then
 * channels: pack's order), zeros where it reaches past the image and past kernel^2 Cin. */
static void gather_patch(const Pixels *px, Place at, float *row) {
  const int ih0 = px->s * at.oh - px->pad, iw0 = px->s * at.ow - px->pad;
  const int k = px->kernel, c = px->Cin, span = k * c;
  const int lo = iw0 < 0 ? -iw0 : 0, hi = iw0 + k > px->W ? px->W - iw0 : k; /* columns inside */
  for (int i = 0; i < k; ++i) {
    float *dst = row + (long)i * span;
    const int ih = ih0 + i;
    if (ih < 0 || ih >= px->H || hi <= lo) {
      memset(dst, 0, (size_t)span * 4);
      continue;
    }
    if (lo > 0) memset(dst, 0, (size_t)lo * c * 4);
    if (hi < k) memset(dst + (long)hi * c, 0, (size_t)(k - hi) * c * 4);
    copy_floats(dst + (long)lo * c, px->x + ((at.n * px->H + ih) * px->W + iw0 + lo) * c,
                (hi - lo) * c);
  }
  if (k * span < px->K) memset(row + (long)k * span, 0, (size_t)(px->K - k * span) * 4);
}

/* Rows r0 .. r1 - 1 of the item of output pixels from p0, split into hi and lo, each
 * [K/32][32 rows][32] bf16, so that a K step of 16 rows is one tile load of stride 64 bytes;
 * rows past the last pixel are zeros. A 1x1 convolution's row is the input pixel itself; a
 * larger kernel's is its patch, gathered into `patch` (K floats) first. */
static void split_rows(const Pixels *px, long p0, int r0, int r1, uint16_t *hi, uint16_t *lo,
                       float *patch) {
  const int K = px->K;
  Place at = place(px, p0 + r0);
  for (int r = r0; r < r1; ++r, advance(px, &at)) {
    const long row = r * 32L;
    if (p0 + r >= px->M) {
      for (int k = 0; k < K; k += 32) {
        memset(hi + row + (long)k * ROWS, 0, 64);
        memset(lo + row + (long)k * ROWS, 0, 64);
      }
      continue;
    }
    const float *src = patch;
    int first = K; /* values of the row read from src */
    if (px->kernel == 1) {
      const long ih = (long)px->s * at.oh, iw = (long)px->s * at.ow;
      src = px->x + ((at.n * px->H + ih) * px->W + iw) * px->Cin;
      first = px->Cin;
    } else {
      gather_patch(px, at, patch);
    }
    for (int k = 0; k < first; k += 32)
      split32(src + k, hi + row + (long)k * ROWS, lo + row + (long)k * ROWS);
    if (px->C2) {
      const long ih = (long)px->s2 * at.oh, iw = (long)px->s2 * at.ow;
      const float *src2 = px->x2 + ((at.n * px->H2 + ih) * px->W2 + iw) * px->C2;
      for (int k = 0; k < px->C2; k += 32)
        split32(src2 + k, hi + row + (long)(first + k) * ROWS, lo + row + (long)(first + k) * ROWS);
    }
  }
}

/* Accumulator 2 i + j = pixel tile i (rows 16 i ..) times output tile j, summed over K in three
 * products per step: lo x hi first, then hi x hi (the B tiles kept), then hi x lo. With `fetch`
 * (a thread's first pass over its chunk, whose weights come from L3 or memory: at batch 1 each
 * layer's 2-16 MB of hi + lo weights are gone from cache by its next call) the weights
 * FETCH_STEPS steps ahead are prefetched: measured on the Xeon, ResNeXt-50's float32 batch-1
 * latency 0.947-0.953x (2-8 steps ahead: 0.96-0.98x; prefetching on every pass: 1.02x, since
 * later passes find the weights in L2), batch 16 unchanged (0.993x). */
__attribute__((target("amx-tile,amx-bf16"))) static void products(const uint16_t *hi,
                                                                   const uint16_t *lo,
                                                                   const uint16_t *b0,
                                                                   const uint16_t *b1, int steps,
                                                                   int fetch) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int k = 0; k < steps; ++k) {
    const uint16_t *ah = hi + 1024L * k, *al = lo + 1024L * k;
    const uint16_t *bh0 = b0 + 1024L * k, *bh1 = b1 + 1024L * k;
    if (fetch) /* a step's hi and lo of one tile are 2 KB: 32 lines; past the tile, the next's */
      for (int line = 0; line < 1024; line += 32) {
        _mm_prefetch((const char *)(bh0 + FETCH_STEPS * 1024L + line), _MM_HINT_T0);
        _mm_prefetch((const char *)(bh1 + FETCH_STEPS * 1024L + line), _MM_HINT_T0);
      }
    _tile_loadd(4, al, 64);
    _tile_loadd(5, al + 512, 64);
    _tile_loadd(6, bh0, 64);
    _tile_loadd(7, bh1, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(4, ah, 64);
    _tile_loadd(5, ah + 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(6, bh0 + 512, 64);
    _tile_loadd(7, bh1 + 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

/* Accumulator m (pixels p .. p + 15, outputs c .. c + 15) + bias (+ residual), ReLU if asked,
 * into y (rows from M on dropped). */
__attribute__((target("avx512f"))) static void store(int m, float *acc, const float *bias,
                                                     const float *res, float *y, long p, long M,
                                                     int C, int c, int relu) {
  tile_to(m, acc);
  const __m512 b = _mm512_loadu_ps(bias + c);
  for (int r = 0; r < 16 && p + r < M; ++r) {
    const long at = (p + r) * C + c;
    __m512 v = _mm512_add_ps(_mm512_loadu_ps(acc + r * 16), b);
    if (res) v = _mm512_add_ps(v, _mm512_loadu_ps(res + at));
    if (relu) v = _mm512_max_ps(v, _mm512_setzero_ps());
    _mm512_storeu_ps(y + at, v);
  }
}

/* Output tiles per chunk: as many as keep the chunk's hi and lo weights within CHUNK_BYTES. */
static int chunk_tiles(int K, int C) {
  const long tile_bytes = 16L * K * 4;
  long t = CHUNK_BYTES / tile_bytes;
  if (t < 2) t = 2;
  if (t > C / 16) t = C / 16;
  return (int)t;
}

/* The convolution of the pixels px into y (see conv_x3_amx). */
static int run(Pixels px, const uint16_t *wp, const float *bias, const float *res, float *y,
               int C, int relu, int threads) {
  if (px.M == 0) return 0;
  const int K = px.K;
  const int tiles = C / 16, per_chunk = chunk_tiles(K, C), steps = K / 32;
  const long blocks = (px.M + ROWS - 1) / ROWS, chunks = (tiles + per_chunk - 1) / per_chunk;
  const long items = blocks * chunks, tile_values = (long)steps * 1024; /* hi + lo per tile */
  const long A = (long)ROWS * K; /* values in an item's hi (or lo) buffer */
  /* With three or more output chunks, each pixel would be split (a larger kernel's patch
   * gathered) once per chunk: split them all once instead, into one buffer the threads share,
   * when it stays within SHARED_BYTES. Measured on the Xeon: 0.59-0.63x the time of ResNet-50's
   * 512-channel 3x3, 0.80-0.96x for ResNeXt-50's stage-4 1x1s; with two chunks, 0.98-1.18x
   * (the split no longer overlaps the products), so those keep splitting per item. */
  const int shared = chunks >= 3 && blocks * A * 4 <= SHARED_BYTES;
  uint16_t *pre = shared ? scratch(1, (size_t)blocks * A * 4) : NULL;
  if (shared && !pre) return -2;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    /* two items' hi and lo: the next item is split while the tile unit works on this one */
    uint16_t *buf = scratch(0, (size_t)A * 4 * 2 + (16 * 16 + (size_t)K) * sizeof(float));
    const int nth = omp_get_num_threads(), me = omp_get_thread_num();
    const long first = items * me / nth, end = items * (me + 1) / nth;
    float *acc = buf ? (float *)(buf + 4 * A) : NULL, *patch = acc ? acc + 16 * 16 : NULL;
    if (!buf) failed = 1;
    if (pre) {
#pragma omp for schedule(static)
      for (long b = 0; b < blocks; ++b)
        if (buf) split_rows(&px, b * ROWS, 0, ROWS, pre + b * 2 * A, pre + b * 2 * A + A, patch);
    }
    if (buf && first < end) {
      configure();
      if (!pre) split_rows(&px, (first % blocks) * ROWS, 0, ROWS, buf, buf + A, patch);
      for (long item = first; item < end; ++item) {
        uint16_t *hi = buf + ((item - first) & 1) * 2 * A, *lo = hi + A;
        uint16_t *nhi = buf + ((item - first + 1) & 1) * 2 * A, *nlo = nhi + A;
        const long chunk = item / blocks, p0 = (item % blocks) * ROWS;
        const long np0 = ((item + 1) % blocks) * ROWS; /* the next item's pixels */
        if (pre) hi = pre + (item % blocks) * 2 * A, lo = hi + A;
        const int t0 = (int)chunk * per_chunk;
        const int t_end = t0 + per_chunk < tiles ? t0 + per_chunk : tiles;
        const int units = (t_end - t0 + 1) / 2;
        for (int t = t0; t < t_end; t += 2) {
          const int two = t + 1 < t_end, unit = (t - t0) / 2;
          const uint16_t *b0 = wp + t * tile_values, *b1 = two ? b0 + tile_values : b0;
          products(hi, lo, b0, b1, steps, item == first || item % blocks == 0);
          /* the tile products run on while the core splits a share of the next item's rows */
          if (!pre && item + 1 < end)
            split_rows(&px, np0, ROWS * unit / units, ROWS * (unit + 1) / units, nhi, nlo,
                       patch);
          for (int m = 0; m < 2; ++m)
            for (int i = 0; i <= two; ++i)
              store(2 * m + i, acc, bias, res, y, p0 + 16 * m, px.M, C, (t + i) * 16, relu);
        }
      }
      release();
    }
  }
  return failed ? -2 : 0;
}

/* y = ReLU?(conv(x, kernel x kernel, stride s, zero padding pad) + bias (+ residual)). The
 * residual may be y itself (the result written over it: each element is read before it is
 * written, by the same thread). Returns 0, -1 for an unsupported shape, -2 if memory runs out. */
int conv_x3_amx(const float *x, const uint16_t *wp, const float *bias, const float *res,
                float *y, int N, int H, int W, int Cin, int C, int kernel, int s, int pad,
                int relu, int threads) {
  const int depth = kernel * kernel * Cin;
  if (N < 0 || H < 1 || W < 1 || Cin < 1 || C < 16 || C % 16 || kernel < 1 || s < 1 || pad < 0 ||
      pad >= kernel || threads < 1 || (kernel == 1 && (Cin % 32 || pad)) ||
      H + 2 * pad < kernel || W + 2 * pad < kernel)
    return -1;
  Pixels px = {x, H, W, Cin, kernel, s, pad, 0, 0, (depth + 31) / 32 * 32, 0, NULL, 0, 0, 0, 1};
  px.Ho = (H + 2 * pad - kernel) / s + 1, px.Wo = (W + 2 * pad - kernel) / s + 1;
  px.M = (long)N * px.Ho * px.Wo;
  return run(px, wp, bias, res, y, C, relu, threads);
}

/* y = ReLU?(conv1x1(x) + conv1x1(x2 at stride s2) + bias): a block's last 1x1 and its projection
 * shortcut in one product of depth Cin + C2 (wp packs the two weights side by side, x's first),
 * the shortcut's output never in memory. x is [N][H][W][Cin], x2 [N][H2][W2][C2] with the
 * projection's output H x W; Cin and C2 multiples of 32. Returns as conv_x3_amx. */
int conv_x3_amx_shortcut(const float *x, const uint16_t *wp, const float *bias, const float *x2,
                         float *y, int N, int H, int W, int Cin, int C, int H2, int W2, int C2,
                         int s2, int relu, int threads) {
  if (N < 0 || H < 1 || W < 1 || Cin < 32 || Cin % 32 || C < 16 || C % 16 || C2 < 32 ||
      C2 % 32 || s2 < 1 || threads < 1 || (H2 - 1) / s2 + 1 != H || (W2 - 1) / s2 + 1 != W ||
      H2 < 1 || W2 < 1)
    return -1;
  Pixels px = {x, H, W, Cin, 1, 1, 0, H, W, Cin + C2, (long)N * H * W, x2, H2, W2, C2, s2};
  return run(px, wp, bias, NULL, y, C, relu, threads);
}
