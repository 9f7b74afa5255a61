/* Decodes only a window of a JPEG, through libjpeg-turbo's partial decompression.
 *
 * A random-resized crop needs a window of the image. libjpeg-turbo can decode just that:
 * jpeg_skip_scanlines passes over the rows above the window without the inverse DCT or colour
 * conversion, jpeg_crop_scanline limits both to the window's columns (widened to whole iMCU
 * columns), and the rows below the window are never read. Combined with the scaled IDCT
 * (scale_denom 2, 4, 8) this is what tf.data's decode_and_crop_jpeg does.
 *
 * That still entropy-decodes every row above the window and the whole width of its own rows:
 * Huffman codes have no boundaries to seek to. Restart markers are such boundaries: the
 * entropy coder starts afresh after each one (DC predictions reset, byte-aligned). A JPEG
 * whose restart intervals tile each MCU row (restart_index below writes one, losslessly) is
 * decoded from the intervals that cover the window and one MCU around it, and no others:
 * they are cut out and joined, with the header's size changed and the markers renumbered,
 * into a smaller JPEG of the same coefficients, so that only the window's share of the
 * entropy-coded data is read. The margin of one MCU gives chroma upsampling its neighbours
 * on every side: the window's pixels are those of a whole decode. The intervals are found by
 * their markers, which must number 0 to 7 in turn as the standard has them; a JPEG laid out
 * otherwise is decoded from the whole stream, where libjpeg judges it.
 *
 * decode_crop(data, left, top, right, bottom, scale, channels, fast_dct)
 *     -> (pixels: bytearray, height, width, x0)
 * decodes rows [top, bottom) of the image decoded at 1/scale, columns from x0 <= left (the
 * iMCU boundary libjpeg aligns to) to at least `right`; `pixels` is height x width x channels
 * uint8, rows contiguous: gray (1), RGB (3) or, for CMYK and YCCK JPEGs only, CMYK as stored (4).
 *
 * restart_index(data, max_mcus) -> bytes
 * re-encodes a JPEG losslessly (the same DCT coefficients, quantisation and sampling, so the
 * same pixels once decoded): one baseline scan, optimised Huffman tables, and a restart marker
 * every k MCUs, k the largest divisor of the MCUs in a row up to max_mcus, so that the
 * intervals tile the rows. Markers (EXIF, ICC profiles, comments) are kept, but for an MPO's
 * index of frames: only the first frame (the image every JPEG reader decodes) is written.
 *
 * Errors raise ValueError with libjpeg's message. The GIL is released while libjpeg works,
 * so Grain's threads decode in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

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

/* Where a restart-indexed JPEG's window lies in its entropy-coded data, and the smaller JPEG
 * made of it. */
typedef struct {
  unsigned char *bytes; /* the smaller JPEG (malloc), or NULL: decode the whole stream */
  size_t size;
  JDIMENSION x_origin, y_origin; /* its first pixel in the image decoded at 1/scale */
} Excerpt;

static unsigned int get16(const unsigned char *at) { return (unsigned int)at[0] << 8 | at[1]; }

/* The offset of the frame header (SOF) among the header's [2, end), or 0 where it is not
 * found there or is not the one libjpeg read into `cinfo`. */
static size_t find_sof(j_decompress_ptr cinfo, const unsigned char *data, size_t end) {
  size_t pos = 2;
  while (pos + 2 <= end && data[pos] == 0xFF) {
    unsigned char marker = data[pos + 1];
    if (marker == 0xFF) { /* fill byte */
      pos++;
      continue;
    }
    if (marker == 0x01 || (marker >= 0xD0 && marker <= 0xD7)) { /* markers without a length */
      pos += 2;
      continue;
    }
    if (pos + 10 > end) return 0;
    if (marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC) {
      int same = data[pos + 4] == cinfo->data_precision &&
                 get16(data + pos + 5) == cinfo->image_height &&
                 get16(data + pos + 7) == cinfo->image_width &&
                 data[pos + 9] == cinfo->num_components;
      return same ? pos : 0;
    }
    pos += 2 + get16(data + pos + 2);
  }
  return 0;
}

static void put16(unsigned char *at, unsigned int value) {
  at[0] = (unsigned char)(value >> 8);
  at[1] = (unsigned char)value;
}

/* Fills `excerpt` for the window (output pixels at 1/scale) of the JPEG whose header `cinfo`
 * has read from `data`; leaves excerpt->bytes NULL where the JPEG is not restart-indexed or
 * the excerpt would be the whole image (or memory is short: the whole stream decodes too). */
static void cut_excerpt(j_decompress_ptr cinfo, const unsigned char *data, size_t size,
                       unsigned int left, unsigned int top, unsigned int right,
                       unsigned int bottom, unsigned int scale, Excerpt *excerpt) {
  excerpt->bytes = NULL;
  excerpt->x_origin = excerpt->y_origin = 0;
  unsigned int interval = cinfo->restart_interval;
  if (interval == 0 || cinfo->progressive_mode || cinfo->arith_code ||
      cinfo->comps_in_scan != cinfo->num_components)
    return;
  int interleaved = cinfo->num_components > 1;
  JDIMENSION mcu_w = interleaved ? 8 * cinfo->max_h_samp_factor : 8;
  JDIMENSION mcu_h = interleaved ? 8 * cinfo->max_v_samp_factor : 8;
  JDIMENSION width = cinfo->image_width, height = cinfo->image_height;
  JDIMENSION mcu_cols = (width + mcu_w - 1) / mcu_w, mcu_rows = (height + mcu_h - 1) / mcu_h;
  if (mcu_cols % interval != 0) return;
  JDIMENSION per_row = mcu_cols / interval;

  /* The window in full-resolution pixels, in whole MCUs, one more each side. */
  JDIMENSION x1 = right * scale < width ? right * scale : width;
  JDIMENSION y1 = bottom * scale < height ? bottom * scale : height;
  JDIMENSION c0 = left * scale / mcu_w, c1 = (x1 + mcu_w - 1) / mcu_w + 1;
  JDIMENSION r0 = top * scale / mcu_h, r1 = (y1 + mcu_h - 1) / mcu_h + 1;
  c0 = c0 > 0 ? c0 - 1 : 0;
  r0 = r0 > 0 ? r0 - 1 : 0;
  c1 = c1 < mcu_cols ? c1 : mcu_cols;
  r1 = r1 < mcu_rows ? r1 : mcu_rows;
  JDIMENSION i0 = c0 / interval, i1 = (c1 + interval - 1) / interval; /* intervals in a row */
  if (r0 == 0 && r1 == mcu_rows && i0 == 0 && i1 == per_row) return;

  /* The entropy-coded data starts where the header reader stopped, after the SOS segment. */
  size_t scan = (size_t)(cinfo->src->next_input_byte - data);
  size_t sof = find_sof(cinfo, data, scan);
  if (sof == 0) return;

  /* Offsets of the intervals up to the last row needed (interval j is [start, end)), and a
   * count of them all: markers number 0 to 7 in turn and the image ends after the last
   * interval, or one marker missing or added would shift every interval after it. */
  size_t intervals = (size_t)mcu_rows * per_row, last = (size_t)r1 * per_row, count = 0;
  size_t *bounds = malloc(2 * last * sizeof(size_t));
  if (bounds == NULL) return;
  size_t pos = scan;
  bounds[0] = scan;
  for (;;) {
    const unsigned char *ff = memchr(data + pos, 0xFF, size - pos);
    if (ff == NULL || (size_t)(ff - data) + 1 >= size) break;
    size_t at = (size_t)(ff - data);
    unsigned char next = data[at + 1];
    if (next == 0x00 || next == 0xFF) { /* a stuffed 0xFF, or fill before a marker */
      pos = at + (next == 0x00 ? 2 : 1);
      continue;
    }
    if (count < last) bounds[2 * count + 1] = at; /* a restart marker, or the end */
    if (next != 0xD0 + (count & 7)) {
      if (next == 0xD9) count++; /* the end of the image ends the last interval */
      break;
    }
    count++;
    if (count < last) bounds[2 * count] = at + 2;
    pos = at + 2;
  }
  if (count != intervals) { /* not laid out as the header says: libjpeg decodes it and judges */
    free(bounds);
    return;
  }

  size_t header = scan, total = header + 2;
  for (JDIMENSION r = r0; r < r1; r++)
    for (JDIMENSION i = i0; i < i1; i++) {
      size_t j = (size_t)r * per_row + i;
      total += bounds[2 * j + 1] - bounds[2 * j] + 2;
    }
  unsigned char *out = malloc(total);
  if (out == NULL) {
    free(bounds);
    return;
  }
  memcpy(out, data, header);
  JDIMENSION sub_w = (i1 * interval * mcu_w < width ? i1 * interval * mcu_w : width) -
                     i0 * interval * mcu_w;
  JDIMENSION sub_h = (r1 * mcu_h < height ? r1 * mcu_h : height) - r0 * mcu_h;
  put16(out + sof + 5, sub_h);
  put16(out + sof + 7, sub_w);
  size_t at = header;
  unsigned int marker = 0;
  for (JDIMENSION r = r0; r < r1; r++)
    for (JDIMENSION i = i0; i < i1; i++) {
      size_t j = (size_t)r * per_row + i, length = bounds[2 * j + 1] - bounds[2 * j];
      memcpy(out + at, data + bounds[2 * j], length);
      at += length;
      out[at++] = 0xFF;
      out[at++] = (unsigned char)(0xD0 + (marker++ & 7));
    }
  out[at - 1] = 0xD9; /* the last interval ends the image */
  free(bounds);
  excerpt->bytes = out;
  excerpt->size = at;
  excerpt->x_origin = i0 * interval * mcu_w / scale;
  excerpt->y_origin = r0 * mcu_h / scale;
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
  unsigned char *volatile excerpt_bytes = NULL;
  JDIMENSION x0 = left, width = right - left;

  memset(&cinfo, 0, sizeof cinfo); /* destroyable before it is created */
  cinfo.err = jpeg_std_error(&errors.base);
  errors.base.error_exit = error_exit;
  errors.base.emit_message = emit_message;
  errors.message[0] = '\0';
  if (setjmp(errors.escape)) {
    jpeg_destroy_decompress(&cinfo);
    if (thread != NULL) PyEval_RestoreThread(thread);
    free(excerpt_bytes);
    PyBuffer_Release(&data);
    Py_XDECREF(pixels);
    PyErr_Format(PyExc_ValueError, "JPEG: %s", errors.message);
    return NULL;
  }

  thread = PyEval_SaveThread();
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
  jpeg_read_header(&cinfo, TRUE);
  JDIMENSION full_w = (cinfo.image_width + scale - 1) / scale;
  JDIMENSION full_h = (cinfo.image_height + scale - 1) / scale;
  if (right > full_w || bottom > full_h) {
    snprintf(errors.message, sizeof errors.message,
             "window %u,%u,%u,%u is outside the %ux%u image", left, top, right, bottom, full_w,
             full_h);
    longjmp(errors.escape, 1);
  }
  Excerpt excerpt;
  cut_excerpt(&cinfo, (const unsigned char *)data.buf, (size_t)data.len, left, top, right, bottom,
              scale, &excerpt);
  if (excerpt.bytes != NULL) {
    /* Decode the excerpt instead, the window moved into its coordinates. */
    excerpt_bytes = excerpt.bytes;
    jpeg_abort_decompress(&cinfo);
    jpeg_mem_src(&cinfo, excerpt.bytes, (unsigned long)excerpt.size);
    jpeg_read_header(&cinfo, TRUE);
    left -= excerpt.x_origin, right -= excerpt.x_origin;
    top -= excerpt.y_origin, bottom -= excerpt.y_origin;
  }
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
    free(excerpt_bytes);
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
  free(excerpt_bytes);
  PyBuffer_Release(&data);
  return Py_BuildValue("(NIII)", pixels, bottom - top, width, x0 + excerpt.x_origin);
}

/* libjpeg's output in a buffer of our own (malloc, grown by doubling), so that an error
 * frees it: jpeg_mem_dest keeps its grown buffer to itself until jpeg_finish_compress. */
typedef struct {
  struct jpeg_destination_mgr base;
  unsigned char *buffer;
  size_t capacity, size;
} Destination;

static void destination_init(j_compress_ptr cinfo) {
  Destination *dest = (Destination *)cinfo->dest;
  dest->base.next_output_byte = dest->buffer;
  dest->base.free_in_buffer = dest->capacity;
}

static boolean destination_grow(j_compress_ptr cinfo) {
  Destination *dest = (Destination *)cinfo->dest;
  unsigned char *grown = realloc(dest->buffer, 2 * dest->capacity);
  if (grown == NULL) {
    cinfo->err->msg_code = JERR_OUT_OF_MEMORY;
    (*cinfo->err->error_exit)((j_common_ptr)cinfo);
  }
  dest->buffer = grown;
  dest->base.next_output_byte = grown + dest->capacity; /* libjpeg's buffer was full */
  dest->base.free_in_buffer = dest->capacity;
  dest->capacity *= 2;
  return TRUE;
}

static void destination_term(j_compress_ptr cinfo) {
  Destination *dest = (Destination *)cinfo->dest;
  dest->size = dest->capacity - dest->base.free_in_buffer;
}

/* A jpegtran-like lossless re-encoding with restart markers that tile the MCU rows. */
static PyObject *restart_index(PyObject *self, PyObject *args) {
  Py_buffer data;
  unsigned int max_mcus;
  if (!PyArg_ParseTuple(args, "y*I", &data, &max_mcus)) return NULL;
  if (max_mcus == 0 || max_mcus > 65535) {
    PyBuffer_Release(&data);
    PyErr_Format(PyExc_ValueError, "restart_index: max_mcus %u is not in 1..65535", max_mcus);
    return NULL;
  }
  struct jpeg_decompress_struct source;
  struct jpeg_compress_struct target;
  ErrorManager errors;
  PyThreadState *volatile thread = NULL;
  /* Read after a longjmp: its fields only change through the pointer libjpeg holds. */
  Destination dest = {.capacity = (size_t)data.len + 4096};

  memset(&source, 0, sizeof source); /* destroyable before it is created */
  memset(&target, 0, sizeof target);
  source.err = jpeg_std_error(&errors.base);
  target.err = &errors.base;
  errors.base.error_exit = error_exit;
  errors.base.emit_message = emit_message;
  errors.message[0] = '\0';
  if (setjmp(errors.escape)) {
    jpeg_destroy_compress(&target);
    jpeg_destroy_decompress(&source);
    free(dest.buffer);
    if (thread != NULL) PyEval_RestoreThread(thread);
    PyBuffer_Release(&data);
    PyErr_Format(PyExc_ValueError, "JPEG: %s", errors.message);
    return NULL;
  }

  thread = PyEval_SaveThread();
  jpeg_create_decompress(&source);
  jpeg_create_compress(&target);
  dest.buffer = malloc(dest.capacity);
  if (dest.buffer == NULL) {
    strcpy(errors.message, "out of memory");
    longjmp(errors.escape, 1);
  }
  dest.base.init_destination = destination_init;
  dest.base.empty_output_buffer = destination_grow;
  dest.base.term_destination = destination_term;
  jpeg_mem_src(&source, (const unsigned char *)data.buf, (unsigned long)data.len);
  jpeg_save_markers(&source, JPEG_COM, 0xFFFF);
  for (int m = 0; m < 16; m++) jpeg_save_markers(&source, JPEG_APP0 + m, 0xFFFF);
  jpeg_read_header(&source, TRUE);
  jvirt_barray_ptr *coefficients = jpeg_read_coefficients(&source);
  jpeg_copy_critical_parameters(&source, &target);
  target.optimize_coding = TRUE;
  JDIMENSION mcu_w = source.num_components > 1 ? 8 * source.max_h_samp_factor : 8;
  JDIMENSION mcu_cols = (source.image_width + mcu_w - 1) / mcu_w;
  unsigned int interval = max_mcus < mcu_cols ? max_mcus : mcu_cols;
  while (mcu_cols % interval != 0) interval--;
  target.restart_interval = interval;
  target.dest = &dest.base;
  jpeg_write_coefficients(&target, coefficients);
  for (jpeg_saved_marker_ptr m = source.marker_list; m != NULL; m = m->next) {
    /* The writer emits its own JFIF and Adobe segments from the copied parameters. */
    if (target.write_JFIF_header && m->marker == JPEG_APP0 && m->data_length >= 5 &&
        memcmp(m->data, "JFIF", 5) == 0)
      continue;
    if (target.write_Adobe_marker && m->marker == JPEG_APP0 + 14 && m->data_length >= 5 &&
        memcmp(m->data, "Adobe", 5) == 0)
      continue;
    /* An MPO's index of its frames: only the first frame is written. */
    if (m->marker == JPEG_APP0 + 2 && m->data_length >= 4 && memcmp(m->data, "MPF", 4) == 0)
      continue;
    jpeg_write_marker(&target, m->marker, m->data, m->data_length);
  }
  jpeg_finish_compress(&target);
  jpeg_finish_decompress(&source);
  PyEval_RestoreThread(thread);
  thread = NULL;
  PyObject *result = PyBytes_FromStringAndSize((const char *)dest.buffer, (Py_ssize_t)dest.size);
  jpeg_destroy_compress(&target);
  jpeg_destroy_decompress(&source);
  free(dest.buffer);
  PyBuffer_Release(&data);
  return result;
}

static PyMethodDef methods[] = {
    {"decode_crop", decode_crop, METH_VARARGS,
     "decode_crop(data, left, top, right, bottom, scale, channels, fast_dct) -> "
     "(pixels, height, width, x0): rows [top, bottom) and columns from x0 <= left to at "
     "least `right` of the JPEG decoded at 1/scale, as height x width x channels uint8."},
    {"restart_index", restart_index, METH_VARARGS,
     "restart_index(data, max_mcus) -> bytes: the JPEG re-encoded losslessly, baseline, with "
     "optimised Huffman tables and restart intervals of at most max_mcus MCUs that tile "
     "each MCU row."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpegcrop",
                                    "Partial JPEG decoding (libjpeg-turbo).", -1, methods};

PyMODINIT_FUNC PyInit__jpegcrop(void) { return PyModule_Create(&module); }
