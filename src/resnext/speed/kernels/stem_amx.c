/* The ImageNet stem in one pass on AMX tiles: a k x k convolution of channels-last pixels (the
 * 7x7, stride 2 of torchvision's ResNets), + bias, ReLU, then 3x3 max pooling at stride 2 with
 * padding 1 (the bands, ring rows and pooling of stem_common.h). bf16 (one tile product) or
 * float32 (three, as conv_x3_amx.c: hi x hi + hi x lo + lo x hi, ~1e-5 of each product).
 *
 * Why: run apart, the convolution writes its output (at batch 16 and 224^2, 16 x 112^2 x 64
 * values: 26 MB in bf16) and the pooling reads it back, two passes over the largest tensor of
 * the network, and oneDNN runs the 3-channel convolution (a 147-deep product) far below its
 * tile rate.
 *
 * The product, without gathering patches: kernel row i of output pixel ow is k Cin consecutive
 * values of padded row s oh - pad + i, starting s Cin ow values in, so a K step of 16 pixels is
 * one tile load whose rows are s Cin values apart (12 bytes for torchvision's stem): each kernel
 * row takes ceil(k Cin / 32) steps of 32 values, the values past k Cin times zero weights (7
 * steps for 7 x 7 x 3 instead of 5 for a gathered 147-deep patch, but no gathering, which
 * measured ~4.5x the products' time). Kernel rows outside the image are skipped. A convolution
 * row runs in items of 32 pixels (two 16-row A tiles; one for a last half item) times 2 output
 * tiles at a time: 4 tile accumulators, stored straight into the ring row. Because the values
 * past k Cin meet zero weights, a NaN or infinity in the input can also reach outputs whose
 * window does not include it (a few pixels to its left); finite inputs give finite sums.
 *
 * Weights packed by stem.pack: bf16 [C/16][k steps][2][16][16][2] (output tile, K step, hi then
 * lo, K pair, output, pair member), of which bf16 inputs use the hi half.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "amx_tiles.h"
#include "stem_common.h"

#define ROWS 32 /* pixels per item: two 16-row A tiles */

int stem_amx_allowed(void) { return amx_request(); }

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

/* y = maxpool3x3/2(ReLU(conv(x, k x k, stride s, zero padding pad) + bias)), see the top.
 * Returns 0, -1 for an unsupported shape, -2 if memory runs out. */
int stem_amx(const void *x, const uint16_t *wp, const float *bias, void *y, int bf16, int in_bf16,
             int nchw, int N, int H, int W, int Cin, int C, int k, int s, int pad, int threads) {
  if (N < 0 || H < 1 || W < 1 || Cin < 1 || C < 32 || C % 32 || k < 1 || s < 1 || pad < 0 ||
      pad >= k || threads < 1 || H + 2 * pad < k || W + 2 * pad < k)
    return -1;
  Stem st = {x, bf16 != 0, in_bf16 != 0, nchw != 0, N, H, W, Cin, k, s, pad, C, 0, 0, 0, 0, 0};
  stem_sizes(&st);
  st.spr = (k * Cin + 31) / 32;
  const long wc32 = (st.Wc + ROWS - 1) / ROWS * ROWS;
  /* a padded row: the furthest read is the last item's last pixel's last K step */
  const long row_vals = ((wc32 - 1) * s * Cin + 32L * st.spr + 31) / 32 * 32;
  return run_stem(&st, wp, bias, y, threads, wc32 * C, row_vals, conv_row, configure, release);
}
