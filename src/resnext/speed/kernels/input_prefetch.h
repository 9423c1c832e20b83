/* The grouped 3x3 kernels' prefetches of their input (grouped3x3.c, grouped3x3_split.h,
 * grouped3x3_avx2.c), on channels-last images of H x W pixels.
 *
 * prefetch_pixels: a tile's next pixels into L1, in the rows the output row is the first to
 * read (the strided per-block reads defeat the hardware prefetcher).
 *
 * row_ahead: at stride 2 (and 1, on request), the input rows the next output row is the first
 * to read (2 of its 3, or 1), into L2 while the current row computes: a cursor over their lines
 * that each tile advances by its share. The tiles' own prefetches reach one tile ahead, which at
 * stride 2, where each output row needs two new input rows, left them waiting on memory
 * (ResNeXt-50's stride-2 layers 1.4-1.6x slower, the AMD machine). */
#ifndef RESNEXT_INPUT_PREFETCH_H
#define RESNEXT_INPUT_PREFETCH_H

#include <immintrin.h>

/* `bytes` from byte `offset` of each pixel (of `pixel` bytes) of image xn in rows ih0 .. ih1 and
 * columns col .. col + count - 1, those inside the image, into L1. */
static inline __attribute__((always_inline)) void prefetch_pixels(const void *xn, int H, int W,
                                                                  long pixel, int ih0, int ih1,
                                                                  int col, int count,
                                                                  long offset, long bytes) {
  for (int ih = ih0; ih <= ih1 && ih < H; ++ih)
    for (int q = 0; q < count && col + q < W; ++q) {
      const char *pf = (const char *)xn + ((long)ih * W + col + q) * pixel + offset;
      for (long c = 0; c < bytes; c += 64) _mm_prefetch(pf + c, _MM_HINT_T0);
    }
}

/* `bytes` from byte `offset` of each pixel (of `pixel` bytes) of output row yr in columns col ..
 * col + count - 1, those before Wo, into L1 for writing: a line the kernel stores to without
 * having it waits for its read, and the stores back up behind it. The block-by-block kernels
 * (split, wide pairs) ask for the next tile's lines of their block: 1.02-1.06x faster on
 * ResNeXt-50's stride-1 layers with their input cold, level to 1.03x warm; the kernels that
 * store a whole pixel per tile (widening, channel-order pairs) ran 0.80-0.98x asking for the next
 * tile's pixels and level asking block by block, and do not ask. */
static inline __attribute__((always_inline)) void prefetch_outputs(void *yr, long pixel, int col,
                                                                   int count, int Wo, long offset,
                                                                   long bytes) {
  for (int q = 0; q < count && col + q < Wo; ++q) {
    char *pf = (char *)yr + (long)(col + q) * pixel + offset;
    for (long c = 0; c < bytes; c += 64) _m_prefetchw(pf + c);
  }
}

typedef struct {
  const char *base; /* the first of the rows */
  long lines, share, line;
} RowAhead;

/* The cursor for output row oh of image xn (H x W pixels of C channels of `size` bytes), over
 * `tiles` tiles: the rows (oh + 1) s - 1 .. (oh + 1) s + 1 of the next output row less those of
 * this one, oh s - 1 .. oh s + 1 (stride 2: two rows; stride 1: one, where `stride1`), nothing
 * past the last. At stride 1 only the wide pair kernel asks: its 14x14 layers ran 1.03-1.15x
 * faster with their input cold, while the split kernel's 56x56 layer ran 0.93-0.99x. */
static inline RowAhead row_ahead(const void *xn, int H, int W, int C, int size, int oh, int s,
                                 long tiles, int stride1) {
  const int end = (oh + 1) * s + 1; /* the next output row's last input row */
  const int first = (oh + 1) * s + (s == 1), last = end < H ? end : H - 1;
  const long row_bytes = (long)W * C * size;
  RowAhead ra = {(const char *)xn + first * row_bytes, 0, 0, 0};
  if ((s == 2 || (s == 1 && stride1)) && first <= last && tiles > 0) {
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
