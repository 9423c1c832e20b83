/* What the int8 grouped 3x3 kernel's two builds (grouped3x3_int8.c for AVX512-VNNI,
 * grouped3x3_int8_avx2.c for AVX2) share: the input rows and pixels a block of output pixels
 * reads, and the layers they take. */
#ifndef RESNEXT_GROUPED_INT8_ROWS_H
#define RESNEXT_GROUPED_INT8_ROWS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Kernel row kh's input row for output row oh at stride s (padding 1), rows row_bytes apart;
 * 0 above or below the image. */
static inline const uint8_t *input_row(const uint8_t *xn, int oh, int s, int kh, int H,
                                       long row_bytes) {
  const int ih = oh * s - 1 + kh;
  return ih >= 0 && ih < H ? xn + ih * row_bytes : 0;
}

/* The J input pixels of one kernel row under np output pixels from ow0 (stride s): in the row
 * xrow, pixel bytes apart; the pad row outside the image (or xrow 0) and past the block. */
static inline void block_pixels(const uint8_t **col, int J, const uint8_t *xrow, int ow0, int np,
                                int s, int W, long pixel, const uint8_t *pad) {
  for (int j = 0; j < J; ++j) {
    const int iw = ow0 * s - 1 + j;
    col[j] = xrow && iw >= 0 && iw < W && j < (np - 1) * s + 3 ? xrow + iw * pixel : pad;
  }
}

/* Whether both builds take the layer, besides the group width: channels a multiple of 16,
 * stride 1 or 2, zero points that are uint8 codes. */
static inline int takes_layer(int C, int s, int zx, int zy) {
  return C % 16 == 0 && (s == 1 || s == 2) && zx >= 0 && zx <= 255 && zy >= 0 && zy <= 255;
}

/* NAME's row function for an output row Wo pixels wide at stride s: blocks of 7 pixels where Wo
 * is a multiple of 7, else of 8 (each defined for stride 1 and 2 as NAME_p7_s1 ... NAME_p8_s2). */
#define PICK_ROW(NAME, Wo, s)                                  \
  ((Wo) % 7 == 0 ? ((s) == 2 ? NAME##_p7_s2 : NAME##_p7_s1)    \
                 : ((s) == 2 ? NAME##_p8_s2 : NAME##_p8_s1))

/* A row of C codes at the input's zero point zx, which the 3x3 window reads outside the image;
 * 0 where memory could not be had. The caller frees it. */
static inline uint8_t *zero_point_row(int C, int zx) {
  uint8_t *pad = (uint8_t *)malloc(C);
  if (pad) memset(pad, zx, C);
  return pad;
}

#endif
