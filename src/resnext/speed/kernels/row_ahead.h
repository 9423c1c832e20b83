/* Prefetching, at stride 2, the input rows a grouped 3x3's next output row is the first to read
 * (2 of its 3), into L2 while the current row computes: a cursor over their lines that each
 * tile advances by its share. The kernels' own prefetches reach one tile ahead, which at stride
 * 2, where each output row needs two new input rows, left them waiting on memory (ResNeXt-50's
 * stride-2 layers 1.4-1.6x slower, the AMD machine). Used by grouped3x3.c, grouped3x3_split.h
 * and grouped3x3_avx2.c. */
#ifndef RESNEXT_ROW_AHEAD_H
#define RESNEXT_ROW_AHEAD_H

#include <immintrin.h>

typedef struct {
  const char *base; /* the first of the rows */
  long lines, share, line;
} RowAhead;

/* The cursor for output row oh of image xn (H x W pixels of C channels of `size` bytes), over
 * `tiles` tiles; nothing to fetch at stride 1 or past the last row. */
static inline RowAhead row_ahead(const void *xn, int H, int W, int C, int size, int oh, int s,
                                 long tiles) {
  const int first = (oh + 1) * s, last = first + 1 < H ? first + 1 : H - 1;
  const long row_bytes = (long)W * C * size;
  RowAhead ra = {(const char *)xn + first * row_bytes, 0, 0, 0};
  if (s == 2 && first <= last && tiles > 0) {
    ra.lines = (last - first + 1) * (row_bytes / 64);
    ra.share = (ra.lines + tiles - 1) / tiles;
  }
  return ra;
}

/* One tile's share of the lines. */
static inline void row_ahead_step(RowAhead *ra) {
  for (long l = 0; l < ra->share && ra->line < ra->lines; ++l, ++ra->line)
    _mm_prefetch(ra->base + 64 * ra->line, _MM_HINT_T1);
}

#endif
