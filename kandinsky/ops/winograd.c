/* The Winograd transforms of kandinsky/ops/cpu.py in one pass each, for float32 channels-last maps.
 *
 * Done with torch's elementwise operations, a 2-D transform is ~20 passes over strided slices, and those
 * memory-bound passes took more time than the GEMMs they feed. Here each tile is read once and written
 * once: the one-axis transforms run on blocks of CB channels held in a small stack buffer.
 *
 * Layouts (all float32, channels innermost and contiguous):
 *   a map: pixel (n, y, x) at  map + n*batch_stride + y*row_stride + x*pixel_stride, then its channels;
 *   tiles: (T, T, B, rows, cols, C) contiguous, T = tile + 2; rows and cols count tiles of `tile` pixels.
 * Compiled by kandinsky/ops/native.py; the formulas are the one-axis transforms of cpu.py (same shared terms
 * where it helps), so the two paths agree to float32 rounding.
 */
#include <stddef.h>
#include <string.h>

#define CB 64  /* channels per block: 36 rows of CB floats (9 KiB) stay in L1 */

typedef long long i64;

/* B^T of F(4x4, 3x3) (points 0, +-1, +-2) along one axis: o[a][x] = sum_j B^T[a][j] d[j][x] */
static inline void input43(const float *const d[6], float *const o[6], int n) {
#pragma omp simd
    for (int x = 0; x < n; x++) {
        float d0 = d[0][x], d1 = d[1][x], d2 = d[2][x], d3 = d[3][x], d4 = d[4][x], d5 = d[5][x];
        float p = d4 - 4.0f * d2, q = d3 - 4.0f * d1, r = d4 - d2, s = d3 - d1;
        o[0][x] = 4.0f * d0 - 5.0f * d2 + d4;
        o[1][x] = p + q;
        o[2][x] = p - q;
        o[3][x] = r + 2.0f * s;
        o[4][x] = r - 2.0f * s;
        o[5][x] = 4.0f * d1 - 5.0f * d3 + d5;
    }
}

/* A^T of F(4x4, 3x3): o[i][x] = sum_j A^T[i][j] m[j][x] */
static inline void output43(const float *const m[6], float *const o[4], int n) {
#pragma omp simd
    for (int x = 0; x < n; x++) {
        float s = m[1][x] + m[2][x], t = m[3][x] + m[4][x], u = m[1][x] - m[2][x], v = m[3][x] - m[4][x];
        o[0][x] = m[0][x] + s + t;
        o[1][x] = u + 2.0f * v;
        o[2][x] = s + 4.0f * t;
        o[3][x] = u + 8.0f * v + m[5][x];
    }
}

/* A of F(4x4, 3x3) (the transpose of output43): o[a][x] = sum_i A^T[i][a] y[i][x] */
static inline void adjoint43(const float *const y[4], float *const o[6], int n) {
#pragma omp simd
    for (int x = 0; x < n; x++) {
        float p = y[0][x] + y[2][x], q = y[1][x] + y[3][x];
        float r = y[0][x] + 4.0f * y[2][x], s = y[1][x] + 4.0f * y[3][x];
        o[0][x] = y[0][x];
        o[1][x] = p + q;
        o[2][x] = p - q;
        o[3][x] = r + 2.0f * s;
        o[4][x] = r - 2.0f * s;
        o[5][x] = y[3][x];
    }
}

/* B^T of F(2x2, 3x3) (points 0, +-1) */
static inline void input23(const float *const d[4], float *const o[4], int n) {
#pragma omp simd
    for (int x = 0; x < n; x++) {
        float d0 = d[0][x], d1 = d[1][x], d2 = d[2][x], d3 = d[3][x];
        o[0][x] = d0 - d2;
        o[1][x] = d1 + d2;
        o[2][x] = d2 - d1;
        o[3][x] = d1 - d3;
    }
}

/* A^T of F(2x2, 3x3) */
static inline void output23(const float *const m[4], float *const o[2], int n) {
#pragma omp simd
    for (int x = 0; x < n; x++) {
        o[0][x] = m[0][x] + m[1][x] + m[2][x];
        o[1][x] = m[1][x] - m[2][x] - m[3][x];
    }
}

/* A of F(2x2, 3x3) */
static inline void adjoint23(const float *const y[2], float *const o[4], int n) {
#pragma omp simd
    for (int x = 0; x < n; x++) {
        o[0][x] = y[0][x];
        o[1][x] = y[0][x] + y[1][x];
        o[2][x] = y[0][x] - y[1][x];
        o[3][x] = -y[1][x];
    }
}

typedef void (*transform_fn)(const float *const *, float *const *, int);

static const float zeros[CB];

/* Transformed input tiles B^T d B of the tile rows [row0, row0 + rows) of a (batch, height, width, channels)
 * map, zero-padded by one pixel: tile (r, c) reads pixels (tile*r - 1 + i, tile*c - 1 + j), i, j < T. Writes
 * out (T, T, batch, rows, cols, channels). */
void winograd_input(int tile, const float *map, i64 batch_stride, i64 row_stride, i64 pixel_stride, int batch,
                    int height, int width, int channels, int row0, int rows, float *out) {
    const int t = tile + 2, cols = width / tile;
    const transform_fn transform = (transform_fn)(tile == 4 ? (void *)input43 : (void *)input23);
    const i64 count = (i64)batch * rows * cols, plane = count * channels;
#pragma omp parallel for schedule(static)
    for (i64 index = 0; index < count; index++) {
        const int n = (int)(index / ((i64)rows * cols)), r = (int)(index / cols % rows), c = (int)(index % cols);
        const int y0 = tile * (row0 + r) - 1, x0 = tile * c - 1;
        float buffer[6][6][CB];
        for (int k0 = 0; k0 < channels; k0 += CB) {
            const int kb = channels - k0 < CB ? channels - k0 : CB;
            for (int i = 0; i < t; i++) {  /* along the tile's rows: buffer[i][a] = sum_j B^T[a][j] d[i][j] */
                const int y = y0 + i;
                const float *d[6];
                float *o[6];
                for (int j = 0; j < t; j++) {
                    const int x = x0 + j;
                    d[j] = (y < 0 || y >= height || x < 0 || x >= width)
                        ? zeros : map + n * batch_stride + y * row_stride + x * pixel_stride + k0;
                    o[j] = buffer[i][j];
                }
                transform(d, o, kb);
            }
            for (int a = 0; a < t; a++) {  /* along its columns, into the output planes (a2, a) */
                const float *d[6];
                float *o[6];
                for (int i = 0; i < t; i++) {
                    d[i] = buffer[i][a];
                    o[i] = out + (i * t + a) * plane + index * channels + k0;
                }
                transform(d, o, kb);
            }
        }
    }
}

/* The output transform A^T m A (plus bias, if not NULL) of (T, T, batch, rows, cols, channels) products into
 * the tile rows [row0, row0 + rows) of a (batch, rows*tile, cols*tile, channels) map. */
void winograd_output(int tile, const float *products, const float *bias, int batch, int row0, int rows, int cols,
                     int channels, float *map, i64 batch_stride, i64 row_stride, i64 pixel_stride) {
    const int t = tile + 2;
    const transform_fn transform = (transform_fn)(tile == 4 ? (void *)output43 : (void *)output23);
    const i64 count = (i64)batch * rows * cols, plane = count * channels;
#pragma omp parallel for schedule(static)
    for (i64 index = 0; index < count; index++) {
        const int n = (int)(index / ((i64)rows * cols)), r = (int)(index / cols % rows), c = (int)(index % cols);
        float buffer[4][6][CB];
        for (int k0 = 0; k0 < channels; k0 += CB) {
            const int kb = channels - k0 < CB ? channels - k0 : CB;
            for (int b = 0; b < t; b++) {  /* buffer[i][b] = sum_a A^T[i][a] m[a][b] */
                const float *m[6];
                float *o[4];
                for (int a = 0; a < t; a++) m[a] = products + (a * t + b) * plane + index * channels + k0;
                for (int i = 0; i < tile; i++) o[i] = buffer[i][b];
                transform(m, o, kb);
            }
            for (int i = 0; i < tile; i++) {  /* pixel (i, j) = sum_b A^T[j][b] buffer[i][b] */
                const float *m[6];
                float *o[4];
                float *row = map + n * batch_stride + (i64)(tile * (row0 + r) + i) * row_stride
                             + (i64)tile * c * pixel_stride + k0;
                for (int b = 0; b < t; b++) m[b] = buffer[i][b];
                for (int j = 0; j < tile; j++) o[j] = row + j * pixel_stride;
                transform(m, o, kb);
                if (bias)
                    for (int j = 0; j < tile; j++)
#pragma omp simd
                        for (int x = 0; x < kb; x++) o[j][x] += bias[k0 + x];
            }
        }
    }
}

/* A dY A^T (the gradient of the products, for the weight gradient) of the tile rows [row0, row0 + rows) of a
 * (batch, rows*tile, cols*tile, channels) output gradient, into (T, T, batch, rows, cols, channels). */
void winograd_output_adjoint(int tile, const float *map, i64 batch_stride, i64 row_stride, i64 pixel_stride,
                             int batch, int row0, int rows, int cols, int channels, float *out) {
    const int t = tile + 2;
    const transform_fn transform = (transform_fn)(tile == 4 ? (void *)adjoint43 : (void *)adjoint23);
    const i64 count = (i64)batch * rows * cols, plane = count * channels;
#pragma omp parallel for schedule(static)
    for (i64 index = 0; index < count; index++) {
        const int n = (int)(index / ((i64)rows * cols)), r = (int)(index / cols % rows), c = (int)(index % cols);
        float buffer[4][6][CB];
        for (int k0 = 0; k0 < channels; k0 += CB) {
            const int kb = channels - k0 < CB ? channels - k0 : CB;
            for (int i = 0; i < tile; i++) {  /* buffer[i][b] = sum_j A[b][j] dy[i][j] */
                const float *y[4];
                float *o[6];
                const float *row = map + n * batch_stride + (i64)(tile * (row0 + r) + i) * row_stride
                                   + (i64)tile * c * pixel_stride + k0;
                for (int j = 0; j < tile; j++) y[j] = row + j * pixel_stride;
                for (int b = 0; b < t; b++) o[b] = buffer[i][b];
                transform(y, o, kb);
            }
            for (int b = 0; b < t; b++) {  /* out[a][b] = sum_i A[a][i] buffer[i][b] */
                const float *y[4];
                float *o[6];
                for (int i = 0; i < tile; i++) y[i] = buffer[i][b];
                for (int a = 0; a < t; a++) o[a] = out + (a * t + b) * plane + index * channels + k0;
                transform(y, o, kb);
            }
        }
    }
}
