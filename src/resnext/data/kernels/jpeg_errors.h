/* libjpeg error handling shared by the JPEG kernels: every error *and every warning* (a warning
 * means corrupt data) ends the call through longjmp, with libjpeg's message kept, so that the
 * caller can fall back to another decoder or refuse the file with a reason. */
#ifndef RESNEXT_JPEG_ERRORS_H
#define RESNEXT_JPEG_ERRORS_H

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

struct error_state {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

static void on_error(j_common_ptr cinfo) {
  struct error_state *err = (struct error_state *)cinfo->err;
  (*cinfo->err->format_message)(cinfo, err->message);
  longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
  if (level < 0) { /* a warning: corrupt or truncated data */
    struct error_state *err = (struct error_state *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
  }
}

/* A libjpeg error manager whose errors and warnings jump to err->jump. */
static struct jpeg_error_mgr *init_errors(struct error_state *err) {
  jpeg_std_error(&err->pub);
  err->pub.error_exit = on_error;
  err->pub.emit_message = on_message;
  err->message[0] = 0;
  return &err->pub;
}

/* Copy `text` into the caller's buffer msg (msglen bytes, always terminated). */
static void copy_message(const char *text, char *msg, int msglen) {
  if (msg && msglen > 0) {
    strncpy(msg, text, (size_t)msglen - 1);
    msg[msglen - 1] = 0;
  }
}

#endif
