/* Replays a recorded sequence of our kernels' C calls: a network's forward without Python.
 *
 * Why: at batch 1 each of ResNeXt-50's ~50 kernel calls costs ~20 us of Python (the torch
 * operator's dispatch, argument checks, the output's allocation, ctypes), and the compiled
 * graph's wrapper and guards another ~0.5 ms: 8-12 % of the forward. resnext.speed.replay
 * records the calls once (function, integer and pointer arguments, return value) on memory
 * it keeps, and this loop makes them again.
 *
 * Every recorded function takes only integer-class arguments (pointers, int, long: checked
 * when recording) and returns int or nothing. On x86-64 System V each such argument travels in
 * a 64-bit register or stack slot whatever its C type, and the caller removes what it pushed,
 * so calling a function of fewer arguments through a pointer typed with MAX_ARGS longs puts
 * each of its arguments where it reads it (an int in the low half). The Python side builds
 * this library only on x86-64 Linux.
 */
#include <stdint.h>
#include <time.h>

#define MAX_ARGS 24

typedef long A;
typedef int (*int_fn)(A, A, A, A, A, A, A, A, A, A, A, A, A, A, A, A, A, A, A, A, A, A, A, A);
typedef void (*void_fn)(A, A, A, A, A, A, A, A, A, A, A, A, A, A, A, A, A, A, A, A, A, A, A, A);

int replay_max_args(void) { return MAX_ARGS; }

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

/* Call i: fns[i] with args[i * MAX_ARGS ..] (unused ones 0); returns[i] is 1 if it returns an
 * int, which must equal expect[i]. With `ms` (else NULL), each call's wall time in ms goes to
 * ms[i]. Returns 0, or i + 1 for the first call whose value differed (the calls after it are
 * not made). */
int replay_run(void *const *fns, const long *args, const uint8_t *returns, const int *expect,
               int n, double *ms) {
  for (int i = 0; i < n; ++i) {
    const A *a = args + (long)i * MAX_ARGS;
    const double t0 = ms ? now_ms() : 0.0;
    int rc = 0;
    if (returns[i]) {
      rc = ((int_fn)fns[i])(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10],
                            a[11], a[12], a[13], a[14], a[15], a[16], a[17], a[18], a[19], a[20],
                            a[21], a[22], a[23]);
    } else {
      ((void_fn)fns[i])(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], a[9], a[10], a[11],
                        a[12], a[13], a[14], a[15], a[16], a[17], a[18], a[19], a[20], a[21],
                        a[22], a[23]);
    }
    if (ms) ms[i] = now_ms() - t0;
    if (returns[i] && rc != expect[i]) return i + 1;
  }
  return 0;
}
