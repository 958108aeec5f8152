/* The Winograd transforms of kandinsky/ops/cpu.py in one pass each, for float32 channels-last maps (and, at the
 * end, the GroupNorm moments and the GEMM convolution's columns).
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
#ifdef __AVX__
#include <immintrin.h>
#endif
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

/* e^x to ~2 ulp (Cephes' expf: x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for e^r, times 2^n), in a
 * form the compiler vectorizes; arguments are clamped to where e^x is a normal float */
static inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = __builtin_rintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int bits = ((int)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* The activation applied to the input as it is read: o[x] = silu(d[x] * scale[x] + shift[x]) (a GroupNorm, as a
 * per-channel affine map of this sample, then SiLU), so the normalised map is never written out */
static inline void activate(const float *d, const float *scale, const float *shift, float *o, int n) {
#pragma omp simd
    for (int x = 0; x < n; x++) {
        const float v = d[x] * scale[x] + shift[x];
        o[x] = v / (1.0f + exp_approx(-v));
    }
}

/* Transformed input tiles B^T d B of the tile rows [row0, row0 + rows) of a (batch, height, width, channels)
 * map, zero-padded by one pixel: tile (r, c) reads pixels (tile*r - 1 + i, tile*c - 1 + j), i, j < T. Writes
 * out (T, T, batch, rows, cols, channels). With scale and shift (else NULL), (batch, scale_height, scale_width,
 * channels) each, the map is first activated, silu(map * scale + shift), and then zero-padded: pixel (y, x) takes
 * the scale and shift of (y / (height / scale_height), x / (width / scale_width)), blocks of pixels (a GroupNorm:
 * one block, the whole map; MoVQ's spatial norm: the latent's pixels). */
void winograd_input(int tile, const float *map, i64 batch_stride, i64 row_stride, i64 pixel_stride, int batch,
                    int height, int width, int channels, int row0, int rows, const float *scale,
                    const float *shift, int scale_height, int scale_width, float *out) {
    const int t = tile + 2, cols = width / tile;
    const int block_height = scale ? height / scale_height : 1, block_width = scale ? width / scale_width : 1;
    const transform_fn transform = (transform_fn)(tile == 4 ? (void *)input43 : (void *)input23);
    const i64 count = (i64)batch * rows * cols, plane = count * channels;
#pragma omp parallel for schedule(static)
    for (i64 index = 0; index < count; index++) {
        const int n = (int)(index / ((i64)rows * cols)), r = (int)(index / cols % rows), c = (int)(index % cols);
        const int y0 = tile * (row0 + r) - 1, x0 = tile * c - 1;
        float buffer[6][6][CB], activated[6][CB];
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
                    if (scale && d[j] != zeros) {
                        const i64 at = (((i64)n * scale_height + y / block_height) * scale_width + x / block_width)
                                       * channels + k0;
                        activate(d[j], scale + at, shift + at, activated[j], kb);
                        d[j] = activated[j];
                    }
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

/* Per (sample, channel) sums of x and x^2 of a (batch, height, width, channels) map, in double: out (batch, 2,
 * channels), for GroupNorm's statistics in one read of the map (torch's reductions over the group's channels of a
 * channels-last map read it several times). */
void channel_moments(const float *map, i64 batch_stride, i64 row_stride, i64 pixel_stride, int batch, int height,
                     int width, int channels, double *out) {
    memset(out, 0, sizeof(double) * 2 * batch * channels);
    for (int n = 0; n < batch; n++) {
        double *sum = out + (i64)2 * n * channels;
#pragma omp parallel
        {
            double local[2 * 4096];  /* channels <= 4096 (checked by the caller) */
            memset(local, 0, sizeof(double) * 2 * channels);
#pragma omp for schedule(static)
            for (int y = 0; y < height; y++)
                for (int x = 0; x < width; x++) {
                    const float *p = map + n * batch_stride + y * row_stride + x * pixel_stride;
#pragma omp simd
                    for (int c = 0; c < channels; c++) {
                        local[c] += p[c];
                        local[channels + c] += (double)p[c] * p[c];
                    }
                }
#pragma omp critical
            for (int c = 0; c < 2 * channels; c++) sum[c] += local[c];  /* sums, then squares */
        }
    }
}

/* The columns of a 3x3 convolution with zero padding 1 as a GEMM operand for a contiguous (K, C, 3, 3) kernel,
 * read in its own [C, kh, kw] order: out (batch*height*width, channels*9), row p = (n, y, x), entry c*9 + 3i + j =
 * pixel (y + i - 1, x + j - 1) of channel c, zero outside the map. (torch's stack of the nine windows along a
 * new last axis writes every float with a stride of nine; here blocks of CB channels are interleaved in L1.) */
void columns3x3(const float *map, i64 batch_stride, i64 row_stride, i64 pixel_stride, int batch, int height,
                int width, int channels, float *out) {
    const i64 pixels = (i64)batch * height * width;
#pragma omp parallel for schedule(static)
    for (i64 p = 0; p < pixels; p++) {
        const int n = (int)(p / ((i64)height * width)), y = (int)(p / width % height), x = (int)(p % width);
        const float *d[9];
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 3; j++) {
                const int yy = y + i - 1, xx = x + j - 1;
                d[3 * i + j] = (yy < 0 || yy >= height || xx < 0 || xx >= width)
                    ? zeros : map + n * batch_stride + yy * row_stride + xx * pixel_stride;
            }
        float *o = out + p * channels * 9;
        for (int c0 = 0; c0 < channels; c0 += CB) {
            const int kb = channels - c0 < CB ? channels - c0 : CB;
            for (int k = 0; k < 9; k++) {
                const float *s = d[k] == zeros ? zeros : d[k] + c0;
                for (int c = 0; c < kb; c++) o[(c0 + c) * 9 + k] = s[c];
            }
        }
    }
}

/* The transformed kernel of Winograd F(T-2 x T-2, 3x3) for a contiguous (K, C, 3, 3) weight and the (T, 3) kernel
 * transform g: out[a*T + b][k][c] = (g w[k][c] g^T)[a][b], (T*T, K, C) contiguous. flip: of the kernel rotated by
 * 180 degrees (the transposed convolution's; the caller swaps the channel axes as a view). torch's GEMM of the
 * (T*T, 9) transform with the (9, K*C) taps ran at a third of the memory bandwidth that the 4x larger output
 * needs; here each block of CB channels is gathered into L1 and the T*T planes written in runs of CB floats, by
 * streaming stores where they are aligned (the output, up to 4x the layer's weights, would only evict the cache). */
void winograd_kernel(int t, const float *g, const float *weight, int out_channels, int channels, int flip,
                     float *out) {
    const i64 plane = (i64)out_channels * channels;
#pragma omp parallel
    {
#pragma omp for schedule(static) nowait
        for (int k = 0; k < out_channels; k++) {
            float taps[9][CB], rows[6][3][CB];  /* T <= 6 */
            for (int c0 = 0; c0 < channels; c0 += CB) {
                const int n = channels - c0 < CB ? channels - c0 : CB;
                const float *w = weight + ((i64)k * channels + c0) * 9;
                for (int c = 0; c < n; c++)
                    for (int j = 0; j < 9; j++) taps[flip ? 8 - j : j][c] = w[c * 9 + j];
                for (int a = 0; a < t; a++)  /* along the kernel's rows: rows[a][j] = sum_i g[a][i] w[i][j] */
                    for (int j = 0; j < 3; j++)
                        for (int c = 0; c < n; c++)
                            rows[a][j][c] = g[3 * a] * taps[j][c] + g[3 * a + 1] * taps[3 + j][c]
                                            + g[3 * a + 2] * taps[6 + j][c];
                for (int a = 0; a < t; a++)  /* then its columns */
                    for (int b = 0; b < t; b++) {
                        float *o = out + (a * t + b) * plane + (i64)k * channels + c0;
#ifdef __AVX__
                        if (n == CB && ((size_t)o & 31) == 0) {
                            const __m256 g0 = _mm256_set1_ps(g[3 * b]), g1 = _mm256_set1_ps(g[3 * b + 1]),
                                         g2 = _mm256_set1_ps(g[3 * b + 2]);
                            for (int c = 0; c < CB; c += 8)
                                _mm256_stream_ps(o + c, _mm256_add_ps(_mm256_add_ps(
                                    _mm256_mul_ps(_mm256_loadu_ps(rows[a][0] + c), g0),
                                    _mm256_mul_ps(_mm256_loadu_ps(rows[a][1] + c), g1)),
                                    _mm256_mul_ps(_mm256_loadu_ps(rows[a][2] + c), g2)));
                            continue;
                        }
#endif
                        for (int c = 0; c < n; c++)
                            o[c] = rows[a][0][c] * g[3 * b] + rows[a][1][c] * g[3 * b + 1]
                                   + rows[a][2][c] * g[3 * b + 2];
                    }
            }
        }
#ifdef __AVX__
        _mm_sfence();  /* streaming stores are weakly ordered: each thread's are visible before the region's barrier */
#endif
    }
}
