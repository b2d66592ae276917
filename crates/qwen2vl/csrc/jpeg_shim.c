/* JPEG decoding through the system libjpeg (libjpeg-turbo), as Pillow decodes:
 * JDCT_ISLOW, fancy upsampling (libjpeg's defaults, which Pillow keeps), output RGB for
 * 3-component files, gray for 1 component, CMYK for 4 components (YCCK converted by libjpeg).
 * A premature end of data is an error (Pillow: "image file is truncated"); other libjpeg
 * warnings are tolerated, as in Pillow. Errors never return through Rust frames: libjpeg's
 * error_exit longjmps back into this file. */
#include <setjmp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <jpeglib.h>
#include <jerror.h>

struct shim_err {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char *msg;
    size_t msg_len;
};

static void shim_error_exit(j_common_ptr cinfo) {
    struct shim_err *e = (struct shim_err *)cinfo->err;
    if (e->msg && e->msg_len) {
        char buf[JMSG_LENGTH_MAX];
        (*cinfo->err->format_message)(cinfo, buf);
        snprintf(e->msg, e->msg_len, "%s", buf);
    }
    longjmp(e->jump, 1);
}

static void shim_emit_message(j_common_ptr cinfo, int level) {
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) {
        shim_error_exit(cinfo);
    }
    if (level < 0) cinfo->err->num_warnings++;
}

/* Zeroes `cinfo` and routes libjpeg's errors and warnings to `err` (message into `msg`). */
static void shim_init(struct jpeg_decompress_struct *cinfo, struct shim_err *err, char *msg,
                      size_t msg_len) {
    memset(cinfo, 0, sizeof *cinfo);
    cinfo->err = jpeg_std_error(&err->pub);
    err->pub.error_exit = shim_error_exit;
    err->pub.emit_message = shim_emit_message;
    err->msg = msg;
    err->msg_len = msg_len;
}

/* Reads the header. Returns 0 and sets width, height and components (1, 3 or 4 of the output),
 * or 1 with a message. */
int qwen2vl_jpeg_header(const unsigned char *data, size_t len, unsigned *width,
                        unsigned *height, int *components, char *msg, size_t msg_len) {
    struct jpeg_decompress_struct cinfo;
    struct shim_err err;
    shim_init(&cinfo, &err, msg, msg_len);
    /* setjmp must run in this frame: error_exit jumps back here. */
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, (unsigned char *)data, (unsigned long)len);
    jpeg_read_header(&cinfo, TRUE);
    *width = cinfo.image_width;
    *height = cinfo.image_height;
    *components = cinfo.num_components == 4 ? 4 : (cinfo.num_components == 1 ? 1 : 3);
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

/* Decodes into `out` (width * height * components bytes, as qwen2vl_jpeg_header said).
 * Returns 0, or 1 with a message. */
int qwen2vl_jpeg_decode(const unsigned char *data, size_t len, unsigned char *out,
                        size_t out_len, char *msg, size_t msg_len) {
    struct jpeg_decompress_struct cinfo;
    struct shim_err err;
    shim_init(&cinfo, &err, msg, msg_len);
    /* setjmp must run in this frame: error_exit jumps back here. */
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, (unsigned char *)data, (unsigned long)len);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.num_components == 4) {
        cinfo.out_color_space = JCS_CMYK;
    } else if (cinfo.num_components == 1) {
        cinfo.out_color_space = JCS_GRAYSCALE;
    } else {
        cinfo.out_color_space = JCS_RGB;
    }
    cinfo.dct_method = JDCT_ISLOW;
    cinfo.do_fancy_upsampling = TRUE;
    jpeg_start_decompress(&cinfo);
    size_t stride = (size_t)cinfo.output_width * (size_t)cinfo.output_components;
    if (stride * (size_t)cinfo.output_height != out_len) {
        if (msg && msg_len) snprintf(msg, msg_len, "unexpected output size");
        jpeg_destroy_decompress(&cinfo);
        return 1;
    }
    while (cinfo.output_scanline < cinfo.output_height) {
        JSAMPROW row = out + (size_t)cinfo.output_scanline * stride;
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    jpeg_finish_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return 0;
}
