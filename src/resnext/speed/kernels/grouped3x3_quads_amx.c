/* Grouped 3x3 convolution with 4 or 8 channels per group (padding 1, stride 1) of bf16
 * channels-last tensors on AMX tiles, several output pixels by a group's outputs to a tile's
 * 16 columns.
 *
 * Why: grouped3x3_amx.c makes 16 channels (4 groups of 4, or 2 of 8) one block-diagonal matrix per
 * tap pair, so a quarter (or half) of each tile product is useful: 6 products per 16 pixels x 16
 * channels. Here a tile row is a "quad" of P = 16 / cpg horizontally adjacent output pixels of
 * one group (4 pixels at 4 channels per group, 2 at 8), and its 16 columns are those P pixels x
 * the group's cpg outputs. One kernel row of a quad reads P + 2 input pixels x cpg channels, which
 * fit one 32-deep K step (32 / cpg pixels: 8 x 4 channels, the last 2 pixels times zero weights,
 * or 4 x 8), so a group takes 3 products (one per kernel row) per 16 quads: with 4 groups in the
 * 4 accumulators, 12 products per 64 pixels x 16 channels at 4 channels per group and 12 per 32
 * pixels x 32 channels at 8, half the block-diagonal form's. The weight is Toeplitz per kernel
 * row: column (d, o) of row (j, c) holds w[o][c][kh][j - d] for 0 <= j - d <= 2, else zero.
 *
 * Feeding the tiles: each group's channels are copied into a plane of their own, zero bordered,
 * rows of Wq = P Qv pixels (Qv quads a row, P Qv >= W + 2), so that quad v = oh Qv + q, kernel
 * row kh, is the plane's 32 values from pixel (oh + kh) Wq + P q: 16 quads are one tile load whose
 * rows are P pixels (32 bytes) apart, across row ends (the quads past W are computed and dropped).
 * (So a non-finite input value can reach outputs whose true value does not depend on it, through
 * the zero weights.) A set of 4 groups (16 or 32 channels) fills the 4 accumulators, which are
 * then read back together: at 4 channels per group a 4 x 4 transpose of 128-bit lanes turns a
 * quad's 4 rows (one per group: 4 pixels x 4 outputs) into its 4 pixels' 16 channels; at 8, the
 * 256-bit halves of two groups' rows are one pixel's 16 channels. Then + bias, ReLU if asked, one
 * rounding to bf16.
 *
 * Work: items of one image by the sets of 64 channels (whole cache lines of each pixel, read once
 * into the planes), fewer where the channels do not divide.
 *
 * Layout: x[N][H][W][C], y[N][H][W][C] bf16 (uint16); weights packed by
 * grouped_quads.pack_weights as bf16 [C / (4 cpg) sets][4 groups][3 kh][16 K pairs][16 columns]
 * [2]; bias[C] float32 or NULL.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quads_planes.h"

#define ITEM_CHANNELS 64 /* channels per item at most: whole cache lines of each pixel */

int grouped3x3_quads_amx_allowed(void) { return amx_request(); }

int grouped3x3_quads_amx_supported(int C, int cpg, int s) {
  return quads_supported(C, cpg) && s == 1;
}

/* y = conv(x) (+ bias, then ReLU if relu). Returns 0; -1 for a shape the kernel does not take,
 * -2 if the OS refuses AMX, -3 if scratch memory cannot be had. */
int grouped3x3_quads_amx(const uint16_t *x, const uint16_t *wp, const float *bias, uint16_t *y,
                         int N, int H, int W, int C, int cpg, int s, int relu, int threads) {
  if (N < 0 || H < 1 || W < 1 || threads < 1 || !grouped3x3_quads_amx_supported(C, cpg, s))
    return -1;
  if (!grouped3x3_quads_amx_allowed()) return -2;
  const Planes p = make_planes(H, W, C, cpg);
  const int set_channels = 4 * cpg, sets = C / set_channels;
  int per_item = ITEM_CHANNELS / set_channels; /* sets per item */
  while (sets % per_item) --per_item;
  const long items = (long)N * (sets / per_item);
  const size_t bytes = (size_t)p.plane * 4 * per_item * 2;
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    uint16_t *planes = scratch(0, bytes);
    float *acc = scratch(1, 4 * 256 * sizeof(float));
    const int ok = planes && acc;
    failed = !ok;
    if (ok) {
      quads_zero_borders(planes, &p, 4 * per_item); /* for every item of this call */
      configure();
    }
    /* every thread reaches the work-sharing loop (a thread without scratch skips its share) */
#pragma omp for schedule(static)
    for (long item = 0; item < items; ++item) {
      if (!ok) continue;
      const long n = item / (sets / per_item);
      const int s0 = (int)(item % (sets / per_item)) * per_item;
      quads_fill(planes, &p, x + n * (long)H * W * C, s0 * set_channels, per_item * set_channels);
      for (int k = 0; k < per_item; ++k)
        quads_rows(planes + (long)k * 4 * p.plane, &p, wp + (long)(s0 + k) * 4 * 3 * 512, bias,
                   relu, y + n * (long)H * W * C, (s0 + k) * set_channels, acc, 0, H);
    }
    if (ok) release();
  }
  return failed ? -3 : 0;
}
