/* out[m][n] = sum over rows p of a[p][m] * b[p][n]: the weight gradient of a 1x1 convolution
 * (a the output gradient's pixel rows, b the input's, or the other way round) in bf16 on AMX
 * tiles, float32 out.
 *
 * Why: the depth of this product is the pixels, the slow axis of channels-last tensors. torch.mm
 * on a transposed view ran ResNeXt-50's and ResNet-50's at 750-1,400 GFLOP/s on the Intel Xeon
 * this was written on, 13-24 % of its tile rate, while reading the operands took a third to a
 * fifteenth of its time. Here each chunk of kc rows is repacked in cache as the tiles want it:
 *  - a transposed ([m][kc]: a tile of 16 m by 32 rows is one strided load), 16 x 16 at a time;
 *  - b as AMX's pairs of rows ([n tile][kc / 2][16][2]);
 * then every 32 x 32 block of out takes kc / 32 steps of 2 A and 2 B loads and 4 tile products,
 * its 4 accumulators stored to out after them and, from the second chunk on, loaded from it
 * before (the first chunk starts from zero: out is never cleared).
 *
 * Threads: with many rows each thread takes a range of rows and all of out into sums of its own
 * (the calling thread's scratch, kept across calls), then all add them into out, a slice each;
 * with few rows (where out is large against the operands) each takes a range of n tiles over all
 * rows, writing out directly, and a's rows are packed once, each thread transposing a share of
 * its columns. (Before, out and the sums were zeroed, the sums calloc'ed, added by one thread and
 * every thread packed all of a: 0.83-0.96x the time at ResNeXt-50's 9 shapes, ad hoc.) Spreading
 * the next chunk's packing between the tile products, or prefetching its rows there, was slower
 * (1.2x) or no faster: the two compete for L2. M and N are multiples of 16.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx_tiles.h"
#include "bf16_transpose.h"

#define PACKED_BYTES (192L << 10) /* a chunk's packed rows, both operands */
#define MIN_KC 256                 /* rows per chunk at least */
#define OUT_BYTES (512L << 10)     /* out (float32) larger than this: longer chunks */
#define WHOLE_BYTES (8L << 20)     /* then a range packed whole up to this */
#define LARGE_PACKED (2L << 20)    /* and beyond it, chunks of this */
#define PANEL_BYTES (256L << 10)   /* packed b of one panel of n tiles */

int pointwise_wgrad_amx_allowed(void) { return amx_request(); }

/* Rows p0 .. p0 + rows - 1 (rows <= kc) of a (M columns), columns m_begin .. m_end - 1,
 * transposed into ap[M][kc], zeros past `rows`. */
static void pack_a(uint16_t *ap, const uint16_t *a, long p0, int rows, int M, int m_begin,
                   int m_end, int kc) {
  for (int k0 = 0; k0 < kc; k0 += 16)
    for (int m0 = m_begin; m0 < m_end; m0 += 16) {
      __m256i r[16];
      for (int k = 0; k < 16; ++k)
        r[k] = k0 + k < rows ? _mm256_loadu_si256((const __m256i *)(a + (p0 + k0 + k) * M + m0))
                             : _mm256_setzero_si256();
      transpose16(r);
      for (int c = 0; c < 16; ++c)
        _mm256_storeu_si256((__m256i *)(ap + (long)(m0 + c) * kc + k0), r[c]);
    }
}

/* Rows p0 .. p0 + rows - 1 of b (N columns), n tiles t0 .. t1 - 1, as pairs of rows:
 * bp[(t - t0) * kc / 2 + k / 2][16][2], zeros past `rows`. */
static void pack_b(uint16_t *bp, const uint16_t *b, long p0, int rows, int N, int t0, int t1,
                   int kc) {
  for (int k = 0; k < kc; k += 2) {
    const uint16_t *r0 = k < rows ? b + (p0 + k) * N : NULL;
    const uint16_t *r1 = k + 1 < rows ? b + (p0 + k + 1) * N : NULL;
    for (int t = t0; t < t1; ++t) {
      const __m256i zero = _mm256_setzero_si256();
      const __m256i v0 = r0 ? _mm256_loadu_si256((const __m256i *)(r0 + t * 16)) : zero;
      const __m256i v1 = r1 ? _mm256_loadu_si256((const __m256i *)(r1 + t * 16)) : zero;
      _mm512_storeu_si512(bp + ((long)(t - t0) * (kc / 2) + k / 2) * 32, pair_rows(v0, v1));
    }
  }
}

/* out rows m .. m + 31 (or + 15), n tiles u, u + 1 (or u) of this thread's out (ldo floats a row)
 * += ap's and bp's chunk (= with `first`). A: tiles 4, 5; B: tiles 6, 7; accumulators 0-3. */
__attribute__((target("amx-tile,amx-bf16"))) static void block(const uint16_t *ap, const uint16_t *bp,
                                                               float *out, long ldo, int m, int mt,
                                                               int u, int nt, int kc,
                                                               int first) {
  float *c00 = out + (long)m * ldo + u * 16;
  const long st = ldo * 4;
  if (first) { /* out not written yet: the sums start from zero */
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, c00, st);
    if (nt > 1) _tile_loadd(1, c00 + 16, st);
    if (mt > 1) {
      _tile_loadd(2, c00 + 16 * ldo, st);
      if (nt > 1) _tile_loadd(3, c00 + 16 * ldo + 16, st);
    }
  }
  const uint16_t *a0 = ap + (long)m * kc, *b0 = bp + (long)u * (kc / 2) * 32;
  for (int s = 0; s < kc / 32; ++s) {
    _tile_loadd(6, b0 + s * 512, 64);
    _tile_loadd(4, a0 + s * 32, kc * 2);
    _tile_dpbf16ps(0, 4, 6);
    if (nt > 1) {
      _tile_loadd(7, b0 + (kc / 2) * 32 + s * 512, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (mt > 1) {
      _tile_loadd(5, a0 + 16 * kc + s * 32, kc * 2);
      _tile_dpbf16ps(2, 5, 6);
      if (nt > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c00, st);
  if (nt > 1) _tile_stored(1, c00 + 16, st);
  if (mt > 1) {
    _tile_stored(2, c00 + 16 * ldo, st);
    if (nt > 1) _tile_stored(3, c00 + 16 * ldo + 16, st);
  }
}

/* Rows per chunk for a range of `rows` rows, M rows of out and `cols` columns of it. Each chunk
 * loads and stores every block of out once. Where out is small, as many rows as keep the packed
 * chunk within PACKED_BYTES (at least MIN_KC); where it is larger than L2 wants, more: the whole
 * range with few rows (`few`, the threads splitting out's columns) or up to WHOLE_BYTES packed,
 * else chunks within LARGE_PACKED (ResNeXt-50's 512 -> 512 at 28^2: 0.75x the time of one chunk,
 * whose packed 13 MB went through L3 once per panel; its 14^2 layers: slower in such chunks).
 * A multiple of 32, no more than the rows rounded up. */
static int chunk_rows(long rows, int M, int cols, int few) {
  const long need = (rows + 31) / 32 * 32;
  const int large = (long)M * cols * 4 > OUT_BYTES;
  if (few || (large && need * (M + cols) * 2 <= WHOLE_BYTES)) return (int)need;
  long kc = (large ? LARGE_PACKED : PACKED_BYTES) / ((long)(M + cols) * 2) / 32 * 32;
  if (kc < MIN_KC) kc = MIN_KC;
  return (int)(kc < need ? kc : need);
}

/* Rows [p_begin, p_end) times n tiles [t0, t1) into out (M x ldo floats, columns from t0 * 16
 * at out's start; the first chunk writes it, the others add), in chunks of kc rows packed into
 * the thread's buffers ap and bp (ap already holds a's rows unless `own_a`). The blocks
 * go by panels of n tiles whose packed b stays in L2 while all of a's rows pass over it. */
static void run_range(const uint16_t *a, const uint16_t *b, float *out, long ldo, long p_begin,
                      long p_end, int M, int N, int t0, int t1, int kc, uint16_t *ap,
                      uint16_t *bp, int own_a) {
  const int tiles = t1 - t0;
  /* a panel: 16-wide tiles (an even number) of the larger packed operand */
  int panel = (int)(PANEL_BYTES / ((long)16 * kc * 2)) / 2 * 2;
  if (panel < 2) panel = 2;
  const int m_panels = M > tiles * 16; /* a's rows in panels, b passing over each */
  for (long p0 = p_begin; p0 < p_end; p0 += kc) {
    const int rows = p_end - p0 < kc ? (int)(p_end - p0) : kc, first = p0 == p_begin;
    if (own_a) pack_a(ap, a, p0, rows, M, 0, M, kc);
    pack_b(bp, b, p0, rows, N, t0, t1, kc);
    if (m_panels) {
      for (int m0 = 0; m0 < M; m0 += 16 * panel)
        for (int u = 0; u < tiles; u += 2)
          for (int m = m0; m < M && m < m0 + 16 * panel; m += 32)
            block(ap, bp, out, ldo, m, M - m > 16 ? 2 : 1, u, tiles - u > 1 ? 2 : 1, kc, first);
    } else {
      for (int u0 = 0; u0 < tiles; u0 += panel)
        for (int m = 0; m < M; m += 32)
          for (int u = u0; u < tiles && u < u0 + panel; u += 2)
            block(ap, bp, out, ldo, m, M - m > 16 ? 2 : 1, u, tiles - u > 1 ? 2 : 1, kc, first);
    }
  }
}

/* out[M][N] (float32) = a[P][M]^T b[P][N] for bf16 a and b. Returns 0; -1 for sizes it does not
 * take; -2 where AMX is refused; -3 if memory runs out. */
int pointwise_wgrad_amx(const uint16_t *a, const uint16_t *b, float *out, long P, int M, int N,
                        int threads) {
  if (P < 0 || M < 16 || N < 16 || M % 16 || N % 16 || threads < 1) return -1;
  if (!pointwise_wgrad_amx_allowed()) return -2;
  if (P == 0) {
    memset(out, 0, (size_t)M * N * sizeof(float));
    return 0;
  }
  const int tiles = N / 16;
  /* rows split when the threads' extra sums (each M x N floats) are small against the rows */
  const int split_rows = threads == 1 || (long)M * N * 4 * 4 <= P * (long)(M + N) * 2;
  int parts = split_rows ? threads : (threads < tiles ? threads : tiles);
  const long per_rows = (P + parts - 1) / parts;
  const int per_tiles = (tiles + parts - 1) / parts;
  /* no part without rows or columns */
  parts = split_rows ? (int)((P + per_rows - 1) / per_rows) : (tiles + per_tiles - 1) / per_tiles;
  /* the calling thread's scratch: with rows split, the other threads' sums; with columns split,
   * a's rows packed (all of them, one chunk) by the threads together */
  const long need = (P + 31) / 32 * 32;
  void *shared = parts < 2    ? NULL
                 : split_rows ? scratch(4, (size_t)(parts - 1) * M * N * sizeof(float))
                              : scratch(4, (size_t)M * need * 2);
  if (parts > 1 && !shared) return -3;
  int failed = 0;
#pragma omp parallel num_threads(parts)
  {
    const int t = omp_get_thread_num();
    long p0 = 0, p1 = P;
    int t0 = 0, t1 = tiles;
    if (split_rows) {
      p0 = per_rows * t < P ? per_rows * t : P, p1 = p0 + per_rows < P ? p0 + per_rows : P;
    } else {
      t0 = per_tiles * t, t1 = t0 + per_tiles < tiles ? t0 + per_tiles : tiles;
    }
    const int kc = chunk_rows(p1 - p0, M, (t1 - t0) * 16, !split_rows);
    const int own_a = split_rows || parts < 2;
    if (!own_a) { /* this thread's share of a's columns */
      const int per_m = (M / 16 + parts - 1) / parts * 16;
      const int m0 = per_m * t < M ? per_m * t : M, m1 = m0 + per_m < M ? m0 + per_m : M;
      pack_a((uint16_t *)shared, a, 0, (int)P, M, m0, m1, kc);
#pragma omp barrier
    }
    uint16_t *ap = own_a ? scratch(0, (size_t)M * kc * 2) : (uint16_t *)shared;
    uint16_t *bp = scratch(1, (size_t)(t1 - t0) * 16 * kc * 2);
    if (!ap || !bp) {
#pragma omp atomic write
      failed = 1;
    } else {
      configure();
      float *mine = split_rows && t > 0 ? (float *)shared + (size_t)(t - 1) * M * N : out + t0 * 16;
      run_range(a, b, mine, N, p0, p1, M, N, t0, t1, kc, ap, bp, own_a);
      release();
    }
    if (split_rows && parts > 1) { /* the other threads' sums added into out, a slice each */
#pragma omp barrier
      int bad;
#pragma omp atomic read
      bad = failed;
      const long total = (long)M * N, per = (total / parts + 15) / 16 * 16;
      const long e0 = per * t < total ? per * t : total, e1 = e0 + per < total ? e0 + per : total;
      for (int s = 1; s < parts && !bad; ++s) {
        const float *sum = (const float *)shared + (size_t)(s - 1) * total;
        for (long e = e0; e < e1; ++e) out[e] += sum[e];
      }
    }
  }
  return failed ? -3 : 0;
}
