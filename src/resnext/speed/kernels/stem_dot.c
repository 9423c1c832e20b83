/* The ImageNet stem in one pass on AVX512-BF16 pair dot products, for CPUs without AMX: a k x k
 * convolution of channels-last pixels (the 7x7, stride 2 of torchvision's ResNets), + bias,
 * ReLU, then 3x3 max pooling at stride 2 with padding 1 (the bands, ring rows and pooling of
 * stem_common.h), in bf16: float32 sums of bf16 products, one rounding of each pooled value.
 *
 * Why: oneDNN runs the 3-channel convolution (a 147-deep product) at ~60 % of the bf16 peak on
 * the AMD machine, and then the pooling reads back its 26 MB output (batch 16, 224^2).
 *
 * The product, without gathering patches, as the AMX stem's: kernel row i of output pixel ow is
 * k Cin consecutive values of padded row s oh - pad + i, starting s Cin ow values in. Its values
 * are taken in pairs (ceil(k Cin / 2): 11 for 7 x 3 = 21, the 22nd value meeting a zero
 * weight), each pair one 32-bit broadcast from wherever it starts, so the register tile of the
 * 1x1 product (pair_tile.h: 7 pixels x 64 outputs) runs over the k kernel rows with nothing
 * gathered: 77 pair steps for a 147-deep product, 95 % of them useful. Kernel rows outside the
 * image are skipped. As in the AMX stem, a NaN or infinity in the input can also reach an output
 * whose window does not include it (the pixel to its left); finite inputs give finite sums.
 *
 * Weights packed by stem_dot.pack: bf16 [C/64][k][pairs][64][2] (64-output strip, kernel row,
 * pair, output, pair member), zero past k Cin.
 */
#include <stdint.h>

#include "pair_tile.h"
#include "stem_common.h"

/* Convolution row oh's raw sums into `row` ([Wc][C] float32), tile by tile: MR pixels x one
 * 64-output strip over every kernel row in the image. */
static void conv_row(const Stem *st, const uint16_t *wp, const Padded *pd, int oh, float *row) {
  const int pairs = st->spr, C = st->C;
  const long px = (long)st->s * st->Cin, strip_values = (long)st->k * pairs * 2 * NR;
  for (int ow0 = 0; ow0 < st->Wc; ow0 += MR) {
    const int rows = st->Wc - ow0 < MR ? st->Wc - ow0 : MR;
    for (int t = 0; t < C / NR; ++t) {
      __m512 acc[MR][NV];
#pragma GCC unroll 8
      for (int p = 0; p < MR; ++p)
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) acc[p][j] = _mm512_setzero_ps();
      for (int i = 0; i < st->k; ++i) {
        const int ih = st->s * oh - st->pad + i;
        if (ih < 0 || ih >= st->H) continue; /* zero padding: nothing to add */
        const uint16_t *base = pd->hi + (ih - pd->row0) * pd->row_vals + ow0 * px;
        const uint16_t *a[MR]; /* pixels past the row repeat its last one (not stored) */
#pragma GCC unroll 8
        for (int p = 0; p < MR; ++p) a[p] = base + (p < rows ? p : rows - 1) * px;
        dot_pairs(acc, a, 2, wp + t * strip_values + (long)i * pairs * 2 * NR, 2 * NR, pairs, MR);
      }
#pragma GCC unroll 8
      for (int p = 0; p < MR; ++p) {
        if (p >= rows) break;
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j)
          _mm512_storeu_ps(row + (long)(ow0 + p) * C + t * NR + 16 * j, acc[p][j]);
      }
    }
  }
}

/* y = maxpool3x3/2(ReLU(conv(x, k x k, stride s, zero padding pad) + bias)) in bf16, see the top.
 * Returns 0, -1 for an unsupported shape, -2 if memory runs out. */
int stem_dot(const void *x, const uint16_t *wp, const float *bias, void *y, int in_bf16, int nchw,
             int N, int H, int W, int Cin, int C, int k, int s, int pad, int threads) {
  if (N < 0 || H < 1 || W < 1 || Cin < 1 || C < NR || C % NR || k < 1 || s < 1 || pad < 0 ||
      pad >= k || threads < 1 || H + 2 * pad < k || W + 2 * pad < k)
    return -1;
  Stem st = {x, 1, in_bf16 != 0, nchw != 0, N, H, W, Cin, k, s, pad, C, 0, 0, 0, 0, 0};
  stem_sizes(&st);
  st.spr = (k * Cin + 1) / 2;
  /* a padded row: the furthest read is the last pixel's last pair */
  const long row_vals = (long)(st.Wc - 1) * s * Cin + 2L * st.spr;
  return run_stem(&st, wp, bias, y, threads, (long)st.Wc * C, row_vals, conv_row, NULL, NULL);
}
