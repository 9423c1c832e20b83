/* Decode only a rectangle of a JPEG with libjpeg(-turbo): skip the rows above it, decode the
 * columns it covers (rounded out to whole iMCUs), stop after its last row.
 *
 * Why: a random-resized crop keeps on average about half of the image, and a full decode spends
 * most of a training pipeline's time on pixels the crop throws away. jpeg_skip_scanlines still
 * entropy-decodes the skipped rows (JPEG has no row index) but does no inverse DCT, upsampling or
 * colour conversion for them; the rows below the crop are never read.
 *
 * Every libjpeg error or warning (a warning means corrupt data) ends the call with a message;
 * the caller then falls back to the ordinary decoder, which names the problem.
 */
#include <stdlib.h>
#include <string.h>

#include "jpeg_errors.h"

/* Width, height and colour space (libjpeg's J_COLOR_SPACE) of a JPEG. 0, or -1 with msg. */
int jpeg_crop_header(const unsigned char *data, unsigned long len, int *width, int *height,
                     int *colorspace, char *msg, int msglen) {
  struct jpeg_decompress_struct cinfo;
  struct error_state err;
  cinfo.err = init_errors(&err);
  if (setjmp(err.jump)) {
    copy_message(err.message, msg, msglen);
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, len);
  jpeg_read_header(&cinfo, TRUE);
  *width = (int)cinfo.image_width;
  *height = (int)cinfo.image_height;
  *colorspace = (int)cinfo.jpeg_color_space;
  jpeg_destroy_decompress(&cinfo);
  return 0;
}

/* The RGB pixels [x0, x0 + w) x [y0, y0 + h) of the image decoded at scale 1/denom (1, 2, 4 or 8)
 * into out (h rows of w * 3 bytes, rows `stride` bytes apart). Returns 0; -1 on a libjpeg error
 * or warning (msg says which); -2 for a colour space libjpeg cannot turn into RGB (CMYK, YCCK);
 * -3 for a bad rectangle or stride. */
int jpeg_crop_decode(const unsigned char *data, unsigned long len, int denom, int x0, int y0,
                     int w, int h, unsigned char *out, long stride, char *msg, int msglen) {
  struct jpeg_decompress_struct cinfo;
  struct error_state err;
  unsigned char *volatile row = NULL;
  cinfo.err = init_errors(&err);
  if (setjmp(err.jump)) {
    copy_message(err.message, msg, msglen);
    jpeg_destroy_decompress(&cinfo);
    free(row);
    return -1;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, len);
  jpeg_read_header(&cinfo, TRUE);
  if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
    jpeg_destroy_decompress(&cinfo);
    return -2;
  }
  cinfo.out_color_space = JCS_RGB;
  cinfo.scale_num = 1;
  cinfo.scale_denom = (unsigned int)denom;
  jpeg_start_decompress(&cinfo);
  if (x0 < 0 || y0 < 0 || w < 1 || h < 1 || (JDIMENSION)(x0 + w) > cinfo.output_width ||
      (JDIMENSION)(y0 + h) > cinfo.output_height || stride < (long)w * 3) {
    jpeg_destroy_decompress(&cinfo);
    return -3;
  }
  JDIMENSION xoff = (JDIMENSION)x0, width = (JDIMENSION)w;
  if (width < cinfo.output_width) jpeg_crop_scanline(&cinfo, &xoff, &width);
  row = malloc((size_t)cinfo.output_width * 3);
  if (row == NULL) {
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  if (y0 > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0);
  for (int r = 0; r < h; ++r) {
    JSAMPROW rows[1] = {row};
    if (jpeg_read_scanlines(&cinfo, rows, 1) != 1) longjmp(err.jump, 1);
    memcpy(out + (size_t)r * (size_t)stride, row + (size_t)(x0 - (int)xoff) * 3, (size_t)w * 3);
  }
  jpeg_abort_decompress(&cinfo); /* the rows below the rectangle are not needed */
  jpeg_destroy_decompress(&cinfo);
  free(row);
  return 0;
}
