/* Random access into JPEGs: a lossless rewrite that puts a restart marker every few MCUs, and a
 * cut of such a file down to the MCU rows and columns a crop needs, itself a valid JPEG.
 *
 * Why: a baseline JPEG's Huffman-coded data has no index, so decoding a crop must entropy-decode
 * every row above it (and every column left and right of it), which on ImageNet photos is most of
 * the decode time. Restart markers reset the DC predictors and are byte-aligned, so the data
 * between two of them (a segment) decodes on its own. With segments aligned to MCU rows, the
 * segments covering a crop, concatenated with their markers renumbered, form the entropy data of a
 * smaller image; only its header's size changes. Its pixels equal the full decode's except within
 * a sample or two of a cut edge (chroma upsampling sees no neighbour there), hence the margin.
 *
 * The rewrite (jpeg_add_restarts) goes through libjpeg's coefficient API: the quantised DCT
 * coefficients are copied as they are, so a decode of the rewritten file is identical to a decode
 * of the original; Huffman tables are re-optimised, progressive files become baseline.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "jpeg_errors.h"

/* The largest divisor of `mcus_per_row` that is at most `target` (so segments tile each row). */
static int row_aligned_interval(int mcus_per_row, int target) {
  int best = 1;
  for (int k = 1; k <= target && k <= mcus_per_row; ++k)
    if (mcus_per_row % k == 0) best = k;
  return best;
}

/* Rewrite a JPEG with a restart marker every `target` MCUs or fewer (a divisor of the MCUs per
 * row). On success *out is a malloc'd buffer (free with jpeg_restart_free) of *outlen bytes and
 * the return is the interval used; -1 on a libjpeg error or warning (msg says which); -2 for
 * colour spaces the crop path does not take (CMYK, YCCK) or more than 3 components. */
int jpeg_add_restarts(const unsigned char *data, unsigned long len, int target,
                      unsigned char **out, unsigned long *outlen, char *msg, int msglen) {
  struct jpeg_decompress_struct src;
  struct jpeg_compress_struct dst;
  struct error_state err;
  unsigned char *volatile buffer = NULL;
  unsigned long size = 0;
  volatile int have_dst = 0;
  src.err = init_errors(&err);
  dst.err = &err.pub;
  *out = NULL;
  *outlen = 0;
  if (setjmp(err.jump)) {
    copy_message(err.message, msg, msglen);
    if (have_dst) jpeg_destroy_compress(&dst);
    jpeg_destroy_decompress(&src);
    free(buffer);
    return -1;
  }
  jpeg_create_decompress(&src);
  jpeg_mem_src(&src, data, len);
  jpeg_save_markers(&src, JPEG_COM, 0xFFFF);
  for (int m = 1; m < 16; ++m)
    if (m != 14) jpeg_save_markers(&src, JPEG_APP0 + m, 0xFFFF); /* APP14 (Adobe) is rewritten */
  jpeg_read_header(&src, TRUE);
  if (src.jpeg_color_space == JCS_CMYK || src.jpeg_color_space == JCS_YCCK ||
      src.num_components > 3) {
    jpeg_destroy_decompress(&src);
    copy_message("CMYK/YCCK or more than 3 components", msg, msglen);
    return -2;
  }
  jvirt_barray_ptr *coefficients = jpeg_read_coefficients(&src);
  jpeg_create_compress(&dst);
  have_dst = 1;
  jpeg_copy_critical_parameters(&src, &dst);
  int mcu_w = 8;
  if (src.num_components > 1) mcu_w = 8 * src.max_h_samp_factor;
  int mcus_per_row = (int)((src.image_width + (JDIMENSION)mcu_w - 1) / (JDIMENSION)mcu_w);
  int interval = row_aligned_interval(mcus_per_row, target < 1 ? 1 : target);
  dst.restart_interval = (unsigned int)interval;
  dst.optimize_coding = TRUE;
  jpeg_mem_dest(&dst, (unsigned char **)&buffer, &size);
  jpeg_write_coefficients(&dst, coefficients);
  for (jpeg_saved_marker_ptr m = src.marker_list; m != NULL; m = m->next) {
    /* libjpeg writes its own JFIF header; a second APP0 "JFIF" would be redundant. */
    if (m->marker == JPEG_APP0 && m->data_length >= 5 && memcmp(m->data, "JFIF", 5) == 0)
      continue;
    jpeg_write_marker(&dst, m->marker, m->data, m->data_length);
  }
  jpeg_finish_compress(&dst);
  jpeg_destroy_compress(&dst);
  have_dst = 0;
  jpeg_finish_decompress(&src);
  jpeg_destroy_decompress(&src);
  *out = buffer;
  *outlen = size;
  return interval;
}

void jpeg_restart_free(unsigned char *buffer) { free(buffer); }

struct layout {
  long sof;      /* offset of the SOF marker */
  long entropy;  /* offset of the first byte of entropy-coded data */
  int width, height, mcu_w, mcu_h, interval, mcus_per_row;
};

static int be16(const unsigned char *p) { return (p[0] << 8) | p[1]; }

/* Parse the markers up to the scan: 0 when the file is a single-scan baseline (or extended
 * Huffman) JPEG with restart intervals that tile its MCU rows, else 1 (not applicable). */
static int parse_layout(const unsigned char *data, long len, struct layout *out) {
  long i = 2;
  int components = 0, hmax = 1, vmax = 1, have_sof = 0;
  memset(out, 0, sizeof(*out));
  if (len < 4 || data[0] != 0xFF || data[1] != 0xD8) return 1;
  for (;;) {
    while (i + 1 < len && data[i] == 0xFF && data[i + 1] == 0xFF) ++i; /* fill bytes */
    if (i + 4 > len || data[i] != 0xFF) return 1;
    int marker = data[i + 1];
    if (marker == 0x01 || (marker >= 0xD0 && marker <= 0xD7)) { /* no length */
      i += 2;
      continue;
    }
    int length = be16(data + i + 2);
    if (length < 2 || i + 2 + length > len) return 1;
    const unsigned char *seg = data + i + 4;
    if (marker == 0xC0 || marker == 0xC1) {
      if (length < 8 || seg[0] != 8) return 1;
      out->sof = i;
      out->height = be16(seg + 1);
      out->width = be16(seg + 3);
      components = seg[5];
      if ((components != 1 && components != 3) || length < 8 + 3 * components) return 1;
      for (int c = 0; c < components; ++c) {
        int h = seg[6 + 3 * c + 1] >> 4, v = seg[6 + 3 * c + 1] & 15;
        if (h < 1 || v < 1 || h > 4 || v > 4) return 1;
        if (h > hmax) hmax = h;
        if (v > vmax) vmax = v;
      }
      have_sof = 1;
    } else if ((marker >= 0xC2 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 &&
                marker != 0xCC)) {
      return 1; /* progressive, lossless or arithmetic-coded */
    } else if (marker == 0xDD) {
      if (length != 4) return 1;
      out->interval = be16(seg);
    } else if (marker == 0xDA) {
      if (!have_sof || length < 3 || seg[0] != components) return 1; /* one scan, all components */
      out->entropy = i + 2 + length;
      break;
    } else if (marker == 0xD9) {
      return 1;
    }
    i += 2 + length;
  }
  if (out->width < 1 || out->height < 1 || out->interval < 1) return 1;
  out->mcu_w = components == 1 ? 8 : 8 * hmax;
  out->mcu_h = components == 1 ? 8 : 8 * vmax;
  out->mcus_per_row = (out->width + out->mcu_w - 1) / out->mcu_w;
  if (out->mcus_per_row % out->interval != 0) return 1;
  return 0;
}

/* Offsets [start, end) of the entropy data of segments 0 .. count-1 (markers excluded), checking
 * the restart numbers run 0..7 in turn. 0 on success; 1 if the data does not have that many
 * segments or a marker is out of sequence. */
static int find_segments(const unsigned char *data, long len, long entropy, long count,
                         long *starts, long *ends) {
  long seg = 0, i = entropy;
  starts[0] = entropy;
  while (seg < count) {
    const unsigned char *hit = memchr(data + i, 0xFF, (size_t)(len - i));
    if (hit == NULL) return 1;
    long k = hit - data;
    if (k + 1 >= len) return 1;
    int next = data[k + 1];
    if (next == 0x00 || next == 0xFF) { /* stuffed byte, or fill before a marker */
      i = k + 1 + (next == 0x00);
      continue;
    }
    ends[seg] = k;
    if (next >= 0xD0 && next <= 0xD7) {
      if (next - 0xD0 != (int)(seg & 7)) return 1;
      ++seg;
      if (seg < count) starts[seg] = k + 2;
      i = k + 2;
      continue;
    }
    return seg + 1 == count ? 0 : 1; /* EOI or another marker ends the scan */
  }
  return 0;
}

/* The JPEG of the MCU rows and restart segments covering pixels [x0, x1) x [y0, y1) of `data`
 * plus `margin` pixels each way, written to out (cap bytes): 0 with *out_len and the cut's
 * top-left pixel (*ox, *oy); 1 when `data` has no row-aligned restart markers or its structure
 * is not as expected (the caller then decodes the file as usual); 2 when cap is too small. */
int jpeg_restart_cut(const unsigned char *data, long len, int x0, int y0, int x1, int y1,
                     int margin, unsigned char *out, long cap, long *out_len, int *ox, int *oy) {
  struct layout L;
  if (parse_layout(data, len, &L) != 0) return 1;
  if (x0 < 0 || y0 < 0 || x1 > L.width || y1 > L.height || x0 >= x1 || y0 >= y1) return 1;
  int seg_w = L.interval * L.mcu_w, per_row = L.mcus_per_row / L.interval;
  int rows = (L.height + L.mcu_h - 1) / L.mcu_h;
  int lo_x = x0 - margin < 0 ? 0 : x0 - margin, hi_x = x1 + margin > L.width ? L.width : x1 + margin;
  int lo_y = y0 - margin < 0 ? 0 : y0 - margin, hi_y = y1 + margin > L.height ? L.height : y1 + margin;
  int s0 = lo_x / seg_w, s1 = (hi_x + seg_w - 1) / seg_w;
  int r0 = lo_y / L.mcu_h, r1 = (hi_y + L.mcu_h - 1) / L.mcu_h;
  if (s1 > per_row) s1 = per_row;
  if (r1 > rows) r1 = rows;
  long needed = (long)(r1 - 1) * per_row + s1; /* segments up to the cut's last one */
  long *starts = malloc(sizeof(long) * (size_t)needed), *ends = malloc(sizeof(long) * (size_t)needed);
  if (!starts || !ends) {
    free(starts), free(ends);
    return 1;
  }
  if (find_segments(data, len, L.entropy, needed, starts, ends) != 0) {
    free(starts), free(ends);
    return 1; /* fewer segments than the header promises, or markers out of sequence */
  }
  int new_w = (s1 * seg_w < L.width ? s1 * seg_w : L.width) - s0 * seg_w;
  int new_h = (r1 * L.mcu_h < L.height ? r1 * L.mcu_h : L.height) - r0 * L.mcu_h;
  long pos = 0, n = 0;
  if (L.entropy > cap) goto too_small;
  memcpy(out, data, (size_t)L.entropy);
  out[L.sof + 5] = (unsigned char)(new_h >> 8), out[L.sof + 6] = (unsigned char)(new_h & 255);
  out[L.sof + 7] = (unsigned char)(new_w >> 8), out[L.sof + 8] = (unsigned char)(new_w & 255);
  pos = L.entropy;
  for (int r = r0; r < r1; ++r)
    for (int s = s0; s < s1; ++s, ++n) {
      long idx = (long)r * per_row + s, size = ends[idx] - starts[idx];
      if (pos + size + 4 > cap) goto too_small;
      if (n > 0) {
        out[pos++] = 0xFF;
        out[pos++] = (unsigned char)(0xD0 + ((n - 1) & 7));
      }
      memcpy(out + pos, data + starts[idx], (size_t)size);
      pos += size;
    }
  out[pos++] = 0xFF;
  out[pos++] = 0xD9;
  free(starts), free(ends);
  *out_len = pos;
  *ox = s0 * seg_w;
  *oy = r0 * L.mcu_h;
  return 0;
too_small:
  free(starts), free(ends);
  return 2;
}

/* Whether `data` is a JPEG this cut takes (row-aligned restart markers, one baseline scan). */
int jpeg_restart_indexed(const unsigned char *data, long len) {
  struct layout L;
  return parse_layout(data, len, &L) == 0;
}
