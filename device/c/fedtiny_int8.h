/* TFLite Micro's int8 requantization arithmetic, one inline function per gemmlowp primitive.
 * Portable C99 (stdint.h only), shared by the host kernels and the device's training step.
 * Assumes what TFLM itself assumes of its compilers: >> of a negative int is arithmetic and
 * converting an out-of-range unsigned value to int32_t wraps (gcc, clang, arm-none-eabi-gcc). */
#ifndef FEDTINY_INT8_H
#define FEDTINY_INT8_H

#include <stdint.h>

/* gemmlowp SaturatingRoundingDoublingHighMul: round(a * b / 2^31) with TFLM's nudge, ties away
 * from zero, saturating the one overflowing case (INT32_MIN * INT32_MIN). */
static inline int32_t ft_srdhm(int32_t a, int32_t b) {
    if (a == b && a == INT32_MIN) return INT32_MAX;
    /* gemmlowp's (ab + nudge) / 2^31 truncated, nudge 2^30 for ab >= 0 and 1 - 2^30 below, is
     * floor((ab + 2^30) / 2^31) for every ab (below 0: trunc(v / d) = floor((v + d - 1) / d) with
     * v = ab + 1 - 2^30 < 0, d = 2^31): one arithmetic shift instead of a signed 64-bit division */
    return (int32_t)(((int64_t)a * (int64_t)b + ((int64_t)1 << 30)) >> 31);
}

/* gemmlowp RoundingDivideByPOT: x / 2^e rounded to nearest, ties away from zero; 0 <= e <= 31. */
static inline int32_t ft_rdbpot(int32_t x, int e) {
    const int32_t mask = (int32_t)(((uint32_t)1 << e) - 1u);
    const int32_t remainder = x & mask;
    const int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
    return (x >> e) + (remainder > threshold ? 1 : 0);
}

/* TFLM MultiplyByQuantizedMultiplier (double rounding build). x * 2^left is C's int32 product,
 * which wraps as compiled TFLM's does. */
static inline int32_t ft_mbqm(int32_t x, int32_t mult, int shift) {
    const int left = shift > 0 ? shift : 0, right = shift > 0 ? 0 : -shift;
    return ft_rdbpot(ft_srdhm((int32_t)((uint32_t)x << left), mult), right);
}

#endif
