/* How the float32 1×1 kernels (`pointwise_fma.c` on AVX2, `pointwise_fma512.c` on AVX-512) split
 * a layer into work items: blocks of output pixels × blocks of 16-output panels, and each block's
 * pixel rows read in place (a stride s > 1, a projection shortcut, reads every s-th pixel of
 * every s-th row). Each kernel passes its own tile and block sizes. */
#ifndef RESNEXT_POINTWISE_BLOCKS_H
#define RESNEXT_POINTWISE_BLOCKS_H

enum { PANEL = 16 }; /* output channels per packed panel (`pointwise_fma.pack`) */

/* A layer's output geometry and its work items (`blocks` of them, row blocks fastest). */
typedef struct {
  long ho, wo, pixels, block_rows, row_blocks, panels, panels_per_block, blocks;
} PointwiseLayer;

/* One work item: output pixels [r0, r1) × panels [j0, j1). */
typedef struct {
  long r0, r1, j0, j1;
} PointwiseBlock;

/* The layer's plan, or 0 for a shape the kernels refuse (then the caller returns −1). */
static inline int pointwise_plan(PointwiseLayer *l, int n, int h, int w, int cin, int cout,
                                 int stride, int threads, long block_rows,
                                 long panels_per_block) {
  if (n < 1 || h < 1 || w < 1 || cin < 1 || cout < PANEL || cout % PANEL || stride < 1 ||
      threads < 1)
    return 0;
  l->ho = (h - 1) / stride + 1;
  l->wo = (w - 1) / stride + 1;
  l->pixels = (long)n * l->ho * l->wo;
  l->block_rows = block_rows;
  l->row_blocks = (l->pixels + block_rows - 1) / block_rows;
  l->panels = cout / PANEL;
  l->panels_per_block = panels_per_block;
  l->blocks = l->row_blocks * ((l->panels + panels_per_block - 1) / panels_per_block);
  return 1;
}

static inline PointwiseBlock pointwise_block(const PointwiseLayer *l, long item) {
  PointwiseBlock b;
  b.r0 = item % l->row_blocks * l->block_rows;
  b.r1 = b.r0 + l->block_rows < l->pixels ? b.r0 + l->block_rows : l->pixels;
  b.j0 = item / l->row_blocks * l->panels_per_block;
  b.j1 = b.j0 + l->panels_per_block < l->panels ? b.j0 + l->panels_per_block : l->panels;
  return b;
}

/* Where output pixel r's input channels start (stride s: every s-th pixel of every s-th row). */
static inline const float *pixel_row(const float *x, long r, int h, int w, long ho, long wo,
                                     int cin, int stride) {
  const long img = r / (ho * wo), i = r / wo % ho, j = r % wo;
  return x + ((img * h + i * stride) * w + j * stride) * cin;
}

/* Pixel rows [first, first + count) of the layer's output, each input pixel's address, into
 * `rows`, then `rows` filled up to `block_rows` by repeating the last (a short last tile reads
 * them and stores nothing for them). */
static inline void pointwise_rows(const float **rows, const PointwiseLayer *l, long first,
                                  long count, const float *x, int h, int w, int cin, int stride) {
  for (long r = 0; r < count; r++)
    rows[r] = pixel_row(x, first + r, h, w, l->ho, l->wo, cin, stride);
  for (long r = count; r < l->block_rows; r++) rows[r] = rows[count - 1];
}

#endif
