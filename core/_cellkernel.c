/*
 * allscore's decode kernel for the C-NMC file format: an uncompressed 24-bit BMP, cropped to a square field,
 * box-reduced by a whole factor and resampled bilinearly (with antialiasing) to the model's input size.
 *
 * It computes exactly what Pillow computes for
 *     Image.frombuffer("RGB", ..., "raw", "BGR", stride, direction).crop(field)
 *          .resize((size, size), Image.Resampling.BILINEAR, reducing_gap=1.0)
 * (written from Pillow 13.0's libImaging/Reduce.c and libImaging/Resample.c: the same integer rounding, the
 * same fixed-point coefficients, the same 8-bit intermediate image), bit for bit. tests/unit/test_imaging.py
 * compares the two, with the Pillow installed, on real C-NMC cells and on synthetic images of many sizes, so a
 * Pillow that changed its arithmetic would fail the tests rather than shift the model's inputs unnoticed. It differs in how, not what: it reads the BGR
 * bytes in place instead of unpacking them into a 4-byte-per-pixel image first, sums the reduce's rows with
 * vectorisable loops, and runs without the GIL, so the worker's I/O threads decode in parallel with each other
 * and leave more of the cores to the model.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* On x86-64 Linux with glibc, the hot function is compiled twice, for AVX2 and for the x86-64 baseline, and the
   loader picks one for the CPU (gcc's and clang's target_clones, through glibc's ifunc). Elsewhere (ARM, macOS,
   musl) it is compiled once, for the compiler's default target. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

/* libImaging/Resample.c */
#define PRECISION_BITS (32 - 8 - 2)

/* libImaging/Reduce.c: the multiplier that divides a sum of `divider` 8-bit values, in float as there. */
static uint32_t
division_uint32(int divider, int result_bits) {
    uint32_t max_dividend = (1u << result_bits) * (uint32_t)divider;
    float max_int = (1 << 30) * 4.0;
    return (uint32_t)(max_int / max_dividend);
}

#define HOT static inline __attribute__((always_inline))

/* Pillow's rounded mean of 9 values for every sum of them (the 3x3 reduce of a C-NMC cell), filled once when
   the module loads and only read after. */
static uint8_t MEAN3X3[9 * 255 + 1];

static void
fill_mean3x3(void) {
    const uint32_t multiplier = division_uint32(9, 8);
    for (uint32_t t = 0; t < sizeof(MEAN3X3); t++) {
        MEAN3X3[t] = (uint8_t)(((t + 9 / 2) * multiplier) >> 24);
    }
}

HOT uint8_t
clip8(int32_t in) {
    /* Pillow clips through a lookup table; a clamp gives the same and vectorises. */
    int32_t v = in >> PRECISION_BITS;
    v = v < 0 ? 0 : v;
    v = v > 255 ? 255 : v;
    return (uint8_t)v;
}

static inline double
bilinear_filter(double x) {
    if (x < 0.0) {
        x = -x;
    }
    if (x < 1.0) {
        return 1.0 - x;
    }
    return 0.0;
}

/* libImaging/Resample.c precompute_coeffs + normalize_coeffs_8bpc for the bilinear filter (support 1). */
static int
precompute_coeffs(int in_size, float in0, float in1, int out_size, int **boundsp, int32_t **kkp) {
    double support, scale, filterscale;
    int xx, x, ksize, xmin, xmax;

    filterscale = scale = (double)(in1 - in0) / out_size;
    if (filterscale < 1.0) {
        filterscale = 1.0;
    }
    support = 1.0 * filterscale;
    ksize = (int)ceil(support) * 2 + 1;

    double *pre = malloc((size_t)out_size * ksize * sizeof(double));
    int32_t *kk = malloc((size_t)out_size * ksize * sizeof(int32_t));
    int *bounds = malloc((size_t)out_size * 2 * sizeof(int));
    if (!pre || !kk || !bounds) {
        free(pre);
        free(kk);
        free(bounds);
        return 0;
    }
    double inv_filterscale = 1.0 / filterscale;
    for (xx = 0; xx < out_size; xx++) {
        double center = in0 + (xx + 0.5) * scale;
        double ww = 0.0;
        double *k = &pre[xx * ksize];
        xmin = (int)(center - support + 0.5);
        if (xmin < 0) {
            xmin = 0;
        }
        xmax = (int)(center + support + 0.5);
        if (xmax > in_size) {
            xmax = in_size;
        }
        xmax -= xmin;
        for (x = 0; x < xmax; x++) {
            double w = bilinear_filter((x + xmin - center + 0.5) * inv_filterscale);
            k[x] = w;
            ww += w;
        }
        if (ww != 0.0) {
            for (x = 0; x < xmax; x++) {
                k[x] /= ww;
            }
        }
        for (; x < ksize; x++) {
            k[x] = 0;
        }
        bounds[xx * 2 + 0] = xmin;
        bounds[xx * 2 + 1] = xmax;
    }
    for (x = 0; x < out_size * ksize; x++) {
        if (pre[x] < 0) {
            kk[x] = (int32_t)(-0.5 + pre[x] * (1 << PRECISION_BITS));
        } else {
            kk[x] = (int32_t)(0.5 + pre[x] * (1 << PRECISION_BITS));
        }
    }
    free(pre);
    *boundsp = bounds;
    *kkp = kk;
    return ksize;
}

/* Where the image's row iy (top-down) of the field starts in the BMP's bytes. */
HOT const uint8_t *
field_row(const uint8_t *src, Py_ssize_t offset, Py_ssize_t stride, int bottom_up, int height, int left, int iy) {
    int sy = bottom_up ? height - 1 - iy : iy;
    return src + offset + (Py_ssize_t)sy * stride + (Py_ssize_t)left * 3;
}

/* One reduced pixel: the mean of `width` column sums (BGR) starting at c, rounded as Pillow does, as RGB at o. */
HOT void
box_mean(const uint16_t *c, int width, uint32_t amend, uint32_t multiplier, uint8_t *o) {
    uint32_t b = amend, g = amend, r = amend;
    for (int k = 0; k < width; k++) {
        b += c[k * 3 + 0];
        g += c[k * 3 + 1];
        r += c[k * 3 + 2];
    }
    o[0] = (uint8_t)((r * multiplier) >> 24);
    o[1] = (uint8_t)((g * multiplier) >> 24);
    o[2] = (uint8_t)((b * multiplier) >> 24);
}

/*
 * One row of the box reduce. colsum holds the sums of `rows` BMP rows (BGR, side pixels); write the rsize RGB
 * pixels of the reduced row, each the rounded mean of a factor x rows box, the last one of a partial box when
 * side is not a multiple of factor (Pillow's ImagingReduceNxN and ImagingReduceCorners), pixel x at
 * o + x * step. scratch holds side * 3 values.
 */
HOT void
reduce_row(const uint16_t *restrict colsum, int side, int factor, int rows, int rsize, uint16_t *restrict scratch,
           uint8_t *restrict o, int step) {
    const int full = side / factor;
    const uint32_t multiplier = division_uint32(factor * rows, 8);
    const uint32_t amend = (uint32_t)(factor * rows) / 2;
    if (factor == 3 && rows == 3) {
        /* The C-NMC case (450 -> 150). Sum each channel over three pixels at every offset, in 16 bits, in one
           loop the compiler vectorises (two thirds of the sums are never used), then look the used ones up in
           the table of Pillow's rounded means of 9 values. */
        const int n = 9 * full - 6;
        uint16_t *restrict sum = scratch;
        const uint8_t *restrict mean = MEAN3X3;
        for (int i = 0; i < n; i++) {
            sum[i] = (uint16_t)(colsum[i] + colsum[i + 3] + colsum[i + 6]);
        }
        for (int x = 0; x < full; x++) {
            const uint16_t *d = sum + x * 9;
            o[x * step + 0] = mean[d[2]];
            o[x * step + 1] = mean[d[1]];
            o[x * step + 2] = mean[d[0]];
        }
    } else {
        for (int x = 0; x < full; x++) {
            box_mean(colsum + (size_t)x * factor * 3, factor, amend, multiplier, o + x * step);
        }
    }
    if (full < rsize) {
        const int width = side - full * factor;
        box_mean(colsum + (size_t)full * factor * 3, width, (uint32_t)(width * rows) / 2,
                 division_uint32(width * rows, 8), o + full * step);
    }
}

/* Row y (0 <= y < rsize) of the reduced field as RGB, pixel x at o + x * step; factor 1 is the field's row. */
HOT void
reduced_row(const uint8_t *src, Py_ssize_t offset, Py_ssize_t stride, int bottom_up, int height, int left, int top,
            int side, int factor, int rsize, int y, uint16_t *restrict colsum,
            uint16_t *restrict scratch, uint8_t *restrict o, int step) {
    const int cols = side * 3;
    if (factor == 1) {
        const uint8_t *restrict line = field_row(src, offset, stride, bottom_up, height, left, top + y);
        for (int x = 0; x < side; x++) {
            o[x * step + 0] = line[x * 3 + 2];
            o[x * step + 1] = line[x * 3 + 1];
            o[x * step + 2] = line[x * 3 + 0];
        }
        return;
    }
    const int full = side / factor;
    const int rows = (y < full) ? factor : side - full * factor;
    const uint8_t *restrict line = field_row(src, offset, stride, bottom_up, height, left, top + y * factor);
    int r = 1;
    if (rows >= 3) {
        /* Three rows in one pass: a third of the loads and stores of colsum. */
        const uint8_t *restrict line1 = field_row(src, offset, stride, bottom_up, height, left, top + y * factor + 1);
        const uint8_t *restrict line2 = field_row(src, offset, stride, bottom_up, height, left, top + y * factor + 2);
        for (int i = 0; i < cols; i++) {
            colsum[i] = (uint16_t)(line[i] + line1[i] + line2[i]);
        }
        r = 3;
    } else {
        for (int i = 0; i < cols; i++) {
            colsum[i] = line[i];
        }
    }
    for (; r < rows; r++) {
        line = field_row(src, offset, stride, bottom_up, height, left, top + y * factor + r);
        for (int i = 0; i < cols; i++) {
            colsum[i] += line[i];
        }
    }
    reduce_row(colsum, side, factor, rows, rsize, scratch, o, step);
}

/* One output line of a resample pass, n bytes wide: the weighted sum of `taps` input lines `pitch` apart
   starting at in, rounded and clipped to 8 bits as Pillow does. Both passes use it, each on whole lines (the
   horizontal pass on transposed columns), so the inner loop vectorises. */
HOT void
weighted_sum(const uint8_t *restrict in, size_t pitch, const int32_t *restrict k, int taps, int n,
             int32_t *restrict acc, uint8_t *restrict o) {
    for (int i = 0; i < n; i++) {
        acc[i] = 1 << (PRECISION_BITS - 1);
    }
    for (int t = 0; t < taps; t++) {
        const uint8_t *restrict line = in + (size_t)t * pitch;
        const int32_t w = k[t];
        for (int i = 0; i < n; i++) {
            acc[i] += line[i] * w;
        }
    }
    for (int i = 0; i < n; i++) {
        o[i] = clip8(acc[i]);
    }
}

/* Reduced rows are resampled horizontally BLOCK at a time, stored transposed (pixel x of row j at
   x * LANES + j * 3), so that each output pixel is a weighted sum of whole LANES-byte columns, which
   vectorises across the rows; one row at a time, three channels wide, it would not. */
#define BLOCK 16
#define LANES (BLOCK * 3)

/*
 * The whole decode: the side x side field at (left, top), box-reduced by factor to rsize x rsize, then
 * resampled bilinearly over [0, extent) to size x size, horizontal pass first, as Pillow's
 * ImagingResampleInner does for a square image. Returns -1 when out of memory.
 */
CLONES static int
decode_field(const uint8_t *src, Py_ssize_t offset, Py_ssize_t stride, int bottom_up, int height, int left, int top,
             int side, int factor, float extent, int size, uint8_t *out) {
    const int rsize = (side - 1) / factor + 1;
    const int cols = size * 3;
    int rc = -1;
    int *bounds = NULL;
    int32_t *kk = NULL, *acc = NULL;
    uint8_t *block = NULL, *tmp = NULL;
    uint16_t *colsum = malloc((size_t)side * 3 * sizeof(uint16_t));
    uint16_t *scratch = malloc((size_t)side * 3 * sizeof(uint16_t));
    if (!colsum || !scratch) {
        goto end;
    }
    if (rsize == size && extent == (float)size) {
        /* Nothing left to resample (Pillow skips both passes): the reduced field is the output. */
        for (int y = 0; y < size; y++) {
            reduced_row(src, offset, stride, bottom_up, height, left, top, side, factor, rsize, y, colsum,
                        scratch, out + (size_t)y * cols, 3);
        }
        rc = 0;
        goto end;
    }
    /* The field is square, so both passes use the same coefficients. */
    const int ksize = precompute_coeffs(rsize, 0.0f, extent, size, &bounds, &kk);
    if (!ksize) {
        goto end;
    }
    const int first = bounds[0];
    const int last = bounds[size * 2 - 2] + bounds[size * 2 - 1];
    tmp = malloc((size_t)(last - first) * cols);
    block = calloc((size_t)rsize, LANES);
    acc = malloc((size_t)(cols > LANES ? cols : LANES) * sizeof(int32_t));
    if (!tmp || !block || !acc) {
        goto end;
    }
    /* The horizontal pass, on the rows the vertical pass reads, into tmp. */
    for (int y0 = first; y0 < last; y0 += BLOCK) {
        const int rows = last - y0 < BLOCK ? last - y0 : BLOCK;
        for (int j = 0; j < rows; j++) {
            reduced_row(src, offset, stride, bottom_up, height, left, top, side, factor, rsize, y0 + j,
                        colsum, scratch, block + j * 3, LANES);
        }
        for (int xx = 0; xx < size; xx++) {
            const int xmin = bounds[xx * 2 + 0];
            const int xmax = bounds[xx * 2 + 1];
            uint8_t px[LANES];
            weighted_sum(block + (size_t)xmin * LANES, LANES, &kk[xx * ksize], xmax, LANES, acc, px);
            for (int j = 0; j < rows; j++) {
                memcpy(tmp + (size_t)(y0 - first + j) * cols + xx * 3, px + j * 3, 3);
            }
        }
    }
    /* The vertical pass, a whole row at a time, which vectorises. */
    for (int yy = 0; yy < size; yy++) {
        const int ymin = bounds[yy * 2 + 0] - first;
        const int ymax = bounds[yy * 2 + 1];
        weighted_sum(tmp + (size_t)ymin * cols, cols, &kk[yy * ksize], ymax, cols, acc, out + (size_t)yy * cols);
    }
    rc = 0;
end:
    free(colsum);
    free(scratch);
    free(block);
    free(tmp);
    free(acc);
    free(bounds);
    free(kk);
    return rc;
}

PyDoc_STRVAR(bmp24_doc,
             "bmp24_field(data, offset, stride, bottom_up, height, left, top, side, factor, extent, size, out)\n\n"
             "Decode the side x side field at (left, top) of a 24-bit BMP's pixel array into out, a writable\n"
             "buffer of size * size * 3 bytes (RGB): box-reduce by factor, then bilinear to size x size over\n"
             "[0, extent) of the reduced image. The caller has checked the header and the bounds.");

static PyObject *
bmp24_field(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer data, out;
    Py_ssize_t offset, stride;
    int bottom_up, height, left, top, side, factor, size;
    float extent;
    if (!PyArg_ParseTuple(args, "y*nnpiiiiifiw*", &data, &offset, &stride, &bottom_up, &height, &left, &top, &side,
                          &factor, &extent, &size, &out)) {
        return NULL;
    }
    PyObject *result = NULL;
    int rsize = factor > 0 ? (side - 1) / factor + 1 : 0;
    /* In 64 bits, so that no product of the arguments overflows. */
    if (side < 1 || size < 1 || factor < 1 || factor > 255 || left < 0 || top < 0 ||
        (Py_ssize_t)top + side > height || stride < ((Py_ssize_t)left + side) * 3 || offset < 0 || height < 1 ||
        stride > (data.len - offset) / height || out.len != (Py_ssize_t)size * size * 3 || !(extent > 0.0f) ||
        extent > (float)rsize) {
        PyErr_SetString(PyExc_ValueError, "bmp24_field: arguments outside the bitmap or the output");
        goto done;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS;
    rc = decode_field(data.buf, offset, stride, bottom_up, height, left, top, side, factor, extent, size, out.buf);
    Py_END_ALLOW_THREADS;
    if (rc != 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"bmp24_field", bmp24_field, METH_VARARGS, bmp24_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "core._cellkernel", "The 24-bit BMP decode kernel of core.imaging.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__cellkernel(void) {
    fill_mean3x3();
    return PyModule_Create(&module);
}
