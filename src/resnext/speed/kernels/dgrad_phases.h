/* The input gradient of a stride-2 grouped 3x3 convolution (padding 1) as four stride-1 ones,
 * on the vector kernels' rows (grouped3x3.c, grouped3x3_avx2.c).
 *
 * Input pixel (2i + ph, 2j + pw) takes the output gradient's pixels (i, j) and (i + 1, j + 1)
 * through 1, 2 or 4 of the weight's taps: phase (ph, pw) is a stride-1 convolution of the output
 * gradient with those taps alone, each group's matrix transposed (resnext.speed.grouped_dgrad).
 * A phase row runs a forward row kernel with a tap map (9 entries per phase: the packed weight's
 * tap at each kernel position, or -1 for none, so the other taps cost nothing) and stores its
 * pixels two apart, straight into the input gradient. One task is an output-gradient row's four
 * phase rows, the two input-gradient rows it computes, so that its rows are read while in cache.
 * oneDNN was the only stride-2 input gradient without AMX, at 1.5-3x its stride-1 time. */
#ifndef RESNEXT_DGRAD_PHASES_H
#define RESNEXT_DGRAD_PHASES_H

/* The packed weight's tap at kernel position (kh, kw): itself, or with a phase's map the tap it
 * stands for (-1: none). The forward passes no map, a constant where inlined, and the test folds
 * away. */
#define TAP(taps, kh, kw) ((taps) ? (taps)[(kh) * 3 + (kw)] : (kh) * 3 + (kw))

/* Row oh of one phase (Wo pixels) from image xn of the output gradient (H x W pixels of C
 * channels) into yr, a pixel every 2 C values. */
typedef void (*phase_fn)(const void *xn, const float *wp, void *yr, int H, int W, int C, int cpg,
                         int oh, int Wo, const signed char *taps);

/* dx (N x H x W x C, values of `size` bytes) from dy ((H+1)/2 x (W+1)/2), taps[4][9]. */
static void dgrad_s2_phases(phase_fn row, const void *dy, const float *wp,
                            const signed char *taps, void *dx, int size, int N, int H, int W,
                            int C, int cpg, int threads) {
  const int Ho = (H + 1) / 2, Wo = (W + 1) / 2;
  const long rows = (long)N * Ho, pixel = (long)C * size;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (long r = 0; r < rows; ++r) {
    const long n = r / Ho;
    const int i = (int)(r % Ho);
    const char *dyn = (const char *)dy + n * Ho * Wo * pixel;
    for (int ph = 0; ph < 2 && 2 * i + ph < H; ++ph)
      for (int pw = 0; pw < 2 && pw < W; ++pw) {
        char *yr = (char *)dx + ((n * H + 2 * i + ph) * W + pw) * pixel;
        row(dyn, wp, yr, Ho, Wo, C, cpg, i, (W - pw + 1) / 2, taps + 9 * (2 * ph + pw));
      }
  }
}

#endif
