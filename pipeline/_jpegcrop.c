/* Decodes only a window of a JPEG, through libjpeg-turbo's partial decompression.
 *
 * A random-resized crop needs a window of the image. libjpeg-turbo can decode just that:
 * jpeg_skip_scanlines passes over the rows above the window without the inverse DCT or colour
 * conversion, jpeg_crop_scanline limits both to the window's columns (widened to whole iMCU
 * columns), and the rows below the window are never read. Combined with the scaled IDCT
 * (scale_denom 2, 4, 8) this is what tf.data's decode_and_crop_jpeg does.
 *
 * decode_crop(data, left, top, right, bottom, scale, channels, fast_dct)
 *     -> (pixels: bytearray, height, width, x0)
 * decodes rows [top, bottom) of the image decoded at 1/scale, columns from x0 <= left (the
 * iMCU boundary libjpeg aligns to) to at least `right`; `pixels` is height x width x channels
 * uint8, rows contiguous: gray (1), RGB (3) or, for CMYK and YCCK JPEGs only, CMYK as stored (4).
 * Errors raise ValueError with libjpeg's message.
 *
 * The GIL is released while libjpeg works, so Grain's threads decode in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

typedef struct {
  struct jpeg_error_mgr base;
  jmp_buf escape;
  char message[JMSG_LENGTH_MAX];
} ErrorManager;

static void error_exit(j_common_ptr cinfo) {
  ErrorManager *errors = (ErrorManager *)cinfo->err;
  (*cinfo->err->format_message)(cinfo, errors->message);
  longjmp(errors->escape, 1);
}

/* Warnings (a corrupt but decodable stream, say) are errors here: PIL then decides what the
 * image is, on the same draws, as for any JPEG this module refuses. */
static void emit_message(j_common_ptr cinfo, int level) {
  if (level < 0) error_exit(cinfo);
}

static PyObject *decode_crop(PyObject *self, PyObject *args) {
  Py_buffer data;
  unsigned int left, top, right, bottom, scale, channels;
  int fast_dct;
  if (!PyArg_ParseTuple(args, "y*IIIIIIp", &data, &left, &top, &right, &bottom, &scale,
                        &channels, &fast_dct))
    return NULL;
  if (!(scale == 1 || scale == 2 || scale == 4 || scale == 8) ||
      !(channels == 1 || channels == 3 || channels == 4) || right <= left || bottom <= top) {
    PyBuffer_Release(&data);
    PyErr_Format(PyExc_ValueError,
                 "decode_crop: bad arguments (window %u,%u,%u,%u, scale %u, channels %u)", left,
                 top, right, bottom, scale, channels);
    return NULL;
  }

  struct jpeg_decompress_struct cinfo;
  ErrorManager errors;
  /* volatile: read after a longjmp back into this frame. */
  PyObject *volatile pixels = NULL;
  PyThreadState *volatile thread = NULL;
  JDIMENSION x0 = left, width = right - left;

  cinfo.err = jpeg_std_error(&errors.base);
  errors.base.error_exit = error_exit;
  errors.base.emit_message = emit_message;
  errors.message[0] = '\0';
  jpeg_create_decompress(&cinfo);
  if (setjmp(errors.escape)) {
    jpeg_destroy_decompress(&cinfo);
    if (thread != NULL) PyEval_RestoreThread(thread);
    PyBuffer_Release(&data);
    Py_XDECREF(pixels);
    PyErr_Format(PyExc_ValueError, "JPEG: %s", errors.message);
    return NULL;
  }

  thread = PyEval_SaveThread();
  jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
  jpeg_read_header(&cinfo, TRUE);
  /* libjpeg converts neither way between CMYK and RGB or gray. */
  int cmyk = cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
  if (cmyk != (channels == 4)) {
    strcpy(errors.message, cmyk ? "a CMYK JPEG is decoded with 4 channels only"
                                : "only a CMYK JPEG is decoded with 4 channels");
    longjmp(errors.escape, 1);
  }
  cinfo.out_color_space = channels == 1 ? JCS_GRAYSCALE : channels == 3 ? JCS_RGB : JCS_CMYK;
  cinfo.scale_num = 1;
  cinfo.scale_denom = scale;
  cinfo.dct_method = fast_dct ? JDCT_IFAST : JDCT_ISLOW;
  jpeg_start_decompress(&cinfo);
  if (right > cinfo.output_width || bottom > cinfo.output_height) {
    snprintf(errors.message, sizeof errors.message,
             "window %u,%u,%u,%u is outside the %ux%u image", left, top, right, bottom,
             cinfo.output_width, cinfo.output_height);
    longjmp(errors.escape, 1);
  }
  /* Chroma upsampling treats the edges of a cropped row as the image's edges, so the
   * window is widened by one iMCU column each side (as far as the image goes): its own
   * columns then come out as in a whole decode. crop_scanline aligns x0 down to an iMCU. */
  JDIMENSION imcu = cinfo.max_h_samp_factor * cinfo.min_DCT_scaled_size;
  x0 = left > imcu ? left - imcu : 0;
  width = (right + imcu < cinfo.output_width ? right + imcu : cinfo.output_width) - x0;
  if (width < cinfo.output_width) jpeg_crop_scanline(&cinfo, &x0, &width);
  else x0 = 0, width = cinfo.output_width;

  PyEval_RestoreThread(thread);
  thread = NULL;
  size_t row_bytes = (size_t)width * channels;
  pixels = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(row_bytes * (bottom - top)));
  if (pixels == NULL) {
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&data);
    return NULL;
  }
  unsigned char *out = (unsigned char *)PyByteArray_AS_STRING(pixels);
  thread = PyEval_SaveThread();

  if (top > 0 && jpeg_skip_scanlines(&cinfo, top) != top) {
    strcpy(errors.message, "the image ends above the window");
    longjmp(errors.escape, 1);
  }
  while (cinfo.output_scanline < bottom) {
    JSAMPROW row = out + row_bytes * (cinfo.output_scanline - top);
    if (jpeg_read_scanlines(&cinfo, &row, 1) != 1) {
      strcpy(errors.message, "the image ends inside the window");
      longjmp(errors.escape, 1);
    }
  }
  /* The rows below the window are never decoded. */
  jpeg_abort_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  PyEval_RestoreThread(thread);
  PyBuffer_Release(&data);
  return Py_BuildValue("(NIII)", pixels, bottom - top, width, x0);
}

static PyMethodDef methods[] = {
    {"decode_crop", decode_crop, METH_VARARGS,
     "decode_crop(data, left, top, right, bottom, scale, channels, fast_dct) -> "
     "(pixels, height, width, x0): rows [top, bottom) and columns from x0 <= left to at "
     "least `right` of the JPEG decoded at 1/scale, as height x width x channels uint8."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpegcrop",
                                    "Partial JPEG decoding (libjpeg-turbo).", -1, methods};

PyMODINIT_FUNC PyInit__jpegcrop(void) { return PyModule_Create(&module); }
