/* The integer sums of fedtiny's training step: one kernel per kind of work, each giving exactly the
 * int32 sum its definition states (integer addition is exact, so the order of the terms, the blocking
 * and the instructions are free). Two builds of the same kernels:
 *
 *   - Cortex-M4/M7 with the DSP extension (__ARM_FEATURE_DSP, unless FT_PORTABLE is defined): ACLE
 *     intrinsics, SXTB16 to widen four int8 values into two pairs of int16 and SMLAD for two
 *     multiply-accumulates per instruction, blocked two output rows by four pixels so that every
 *     widened input serves two rows;
 *   - everything else (the host, other cores): plain C99 loops over fixed-size pixel blocks that a
 *     compiler vectorises (gcc/clang -O3 on x86-64 and AArch64).
 *
 * Every sum is held in int32: the C step refuses a model whose sums could leave it (ft_kernels_fit).
 * Tensors are NCHW (a channel's plane is contiguous). */
#ifndef FEDTINY_KERNELS_H
#define FEDTINY_KERNELS_H

#include <stdint.h>

#if defined(__ARM_FEATURE_DSP) && !defined(FT_PORTABLE)
#define FT_KERNELS_DSP 1
#define FT_PIX 8  /* pixels of a block: two 32-bit loads of int8 */
#else
#define FT_KERNELS_DSP 0
#if defined(__arm__) || defined(__thumb__)
#define FT_PIX 8  /* a microcontroller's portable build: the block's accumulators stay small on its stack */
#else
#define FT_PIX 16 /* pixels of a block: one or two vector registers of int32 */
#endif
#endif

/* Outputs of a window kernel per call (its accumulators on the caller's stack) */
#define FT_ROW_BLOCK 16

/* The kernels' name for this build ("dsp" or "portable"), reported by the firmware. */
const char *ft_kernels_name(void);

/* Whether every int32 sum of a convolution of these sizes is exact: |term| <= 128 * 255, at most
 * `terms` terms (an output's or a gradient element's). */
int ft_kernels_fit(int64_t terms);

/* sum_i a[i] * b[i], n >= 0 (contiguous int8 vectors). */
int32_t ft_dot_s8(const int8_t *a, const int8_t *b, int32_t n);

/* out[s] = sum_i a[i] * b_s[i] for s = 0, 1: one row against two (n >= 0); a is widened once. */
void ft_dot_s8_1x2(const int8_t *a, const int8_t *b0, const int8_t *b1, int32_t n, int32_t out[2]);

/* out[s] = sum_i a[i] * b[s * b_stride + i] for s < 4: one row against four rows b_stride apart (n >= 0). */
void ft_dot_s8_1x4(const int8_t *a, const int8_t *b, int32_t b_stride, int32_t n, int32_t out[4]);

/* sum_i a[i], n >= 0. */
int32_t ft_sum_s8(const int8_t *a, int32_t n);

/* The matrix kernel of pointwise convolutions, forward and input gradient alike: for rows r < rows
 * (1 or 2) and pixels j < pixels (<= FT_PIX),
 *     acc[r * FT_PIX + j] = sum_{k < depth} w[r * w_row + k * w_k] * x[k * x_k + j].
 * The forward passes a weight row (w_row = c, w_k = 1) and the input's channel planes (x_k = h * w);
 * the input gradient passes a weight column (w_row = 1, w_k = c) and the output gradient's planes. */
void ft_mac_block(const int8_t *w, int32_t w_row, int32_t w_k, int32_t rows, const int8_t *x, int32_t x_k,
                  int32_t depth, int32_t pixels, int32_t acc[2 * FT_PIX]);

/* ft_mac_block's two-row case with the rows' weights prepared once for many pixel blocks (the pointwise
 * forward of few input channels, the pointwise input gradient): ft_pair_prepare writes depth words to prep
 * (4-byte aligned) from the weights of rows a (w[k w_k]) and b (w[w_row + k w_k]); ft_mac_block_prepared
 * then gives ft_mac_block(w, w_row, w_k, 2, x, x_k, depth, pixels, acc)'s acc. (The portable build reads
 * w and leaves prep unused.) */
void ft_pair_prepare(const int8_t *w, int32_t w_row, int32_t w_k, int32_t depth, uint32_t *prep);
void ft_mac_block_prepared(const uint32_t *prep, const int8_t *w, int32_t w_row, int32_t w_k, const int8_t *x,
                           int32_t x_k, int32_t depth, int32_t pixels, int32_t acc[2 * FT_PIX]);

/* A column is one output pixel's inputs (depth values, as int16, the input's zero point already taken
 * off) for the matrix kernel over columns: ft_cols_prepare puts a column written in natural order into
 * the order ft_mac_2x2_cols reads (on the DSP build each four k as (k, k+2), (k+1, k+3), the pairs
 * SXTB16 makes of four weights; nothing on the portable build). Columns start 4-byte aligned. */
void ft_cols_prepare(int16_t *col, int32_t depth);

/* Two weight rows (w0, w1: depth int8 each) against two prepared columns (c0, c1):
 *     acc[2 r + p] = sum_{k < depth} w_r[k] * c_p[k]. */
void ft_mac_2x2_cols(const int8_t *w0, const int8_t *w1, const int16_t *c0, const int16_t *c1, int32_t depth,
                     int32_t acc[4]);

/* The requantization of n (1..32) outputs of one channel, each x = acc[j] + folded with |x| < 2^30 (the
 * caller's bound), by TFLM's MultiplyByQuantizedMultiplier with a right shift e in [1, 22] taken as one
 * rounding (fedtiny_step.c derives k2 from the offset of requant_value): with x2 = 2 x,
 *     u = floor(((k2 - [x < 0]) 2^32 + x2 mult + 2^31) / 2^32) >> e,
 * the value minus the clamp's lower bound lo; y[j] = clamp(u, 0, range) + lo. Returns the kept bits (bit j
 * set when 0 <= u <= range): the ReLU masks' bits. */
uint32_t ft_requant_row(const int32_t *acc, int32_t n, int32_t folded, int32_t mult, int32_t k2, int32_t e,
                        uint32_t range, int32_t lo, int8_t *y);

/* Outputs of a depthwise window read without bounds checks (kh rows, each at least (n - 1) * stride + kw
 * long from rows[ky]): acc[j] += sum_{ky < kh, kx < kw} wk[ky * kw + kx] * rows[ky][j * stride + kx]
 * for j < n <= FT_ROW_BLOCK. */
void ft_dw_row(const int8_t *const *rows, const int8_t *wk, int32_t kh, int32_t kw, int32_t stride, int32_t n,
               int32_t *acc);

/* A depthwise 3 x 3 window over `rows` output rows of n outputs each at stride 1 or 2, every tap inside:
 * output (r, j) reads the input rows r * stride + ky (w bytes apart) from x, columns j * stride + kx:
 *     acc[r * n + j] = sum_{ky, kx < 3} wk[ky * 3 + kx] * x[(r * stride + ky) * w + j * stride + kx].
 * One call for a block of a small plane's rows (the weights widened once); no byte outside the windows
 * is read. */
void ft_dw3_rows(const int8_t *x, int32_t w, const int8_t *wk, int32_t stride, int32_t rows, int32_t n,
                 int32_t *acc);

/* The depthwise input gradient's transposed window, scattered from the outputs: for every nonzero
 * q[oy * ow + ox] (oy < oh, ox < ow) and tap (ky < kh, kx < kw),
 *     acc[(oy * stride + ky) * acc_w + ox * stride + kx] += q[oy * ow + ox] * wk[ky * kw + kx];
 * acc holds (oh - 1) * stride + kh rows of acc_w >= (ow - 1) * stride + kw. A zero output adds nothing
 * (gradients are often zero where the ReLU clamped), and no row is spread with zeros between its values
 * at stride 2. */
void ft_dw_scatter(const int8_t *q, int32_t oh, int32_t ow, const int8_t *wk, int32_t kh, int32_t kw,
                   int32_t stride, int32_t *acc, int32_t acc_w);

#endif
