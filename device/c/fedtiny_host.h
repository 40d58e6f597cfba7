/* Host-side array kernels for the simulator: TFLM's int8 requantization fused with the clamp and
 * the clamp's gradient mask, over whole tensors. Integer arithmetic throughout (fedtiny_int8.h), so
 * every CPU and every vector width gives the same integers; the vectorised build is only faster. */
#ifndef FEDTINY_HOST_H
#define FEDTINY_HOST_H

#include <stdint.h>

#define FT_HOST_ABI 2

int ft_host_abi(void);

/* y[n,c,i] = clamp(MBQM(acc[n,c,i], mult[c], shift[c]) + y_zero, lo, hi) for an N x C x HW tensor
 * of int32 values stored as float (acc_f32) or double (acc_f64; pass the other as NULL);
 * mask (may be NULL) = 1 where the unclamped value lies in [lo, hi]. Requires mult[c] >= 0
 * (TFLite's multipliers), acc values in the int32 range. Returns 0, or -1 on bad arguments. */
int ft_requantize_clamp(const float *acc_f32, const double *acc_f64, int64_t n, int64_t c, int64_t hw,
                        const int32_t *mult, const int32_t *shift, int32_t y_zero, int32_t lo, int32_t hi,
                        float *y, uint8_t *mask);

/* TFLM's int8 ADD on two equal-shape tensors of int8 values stored as float:
 * a' = MBQM((a + off1) << left_shift, m1, s1), b' likewise, y = clamp(MBQM(a' + b', mo, so) + z_out, lo, hi);
 * mask as above. Returns 0, or -1 on bad arguments. */
int ft_add_clamp(const float *a, const float *b, int64_t count, int32_t off1, int32_t off2, int left_shift,
                 int32_t m1, int s1, int32_t m2, int s2, int32_t mo, int so, int32_t z_out, int32_t lo, int32_t hi,
                 float *y, uint8_t *mask);

/* The exact step's uniform numbers: out[i] = (hash32(base + i) >> 8) * 2^-24 (fedtiny/int8/exact.py). */
int ft_uniform(uint32_t base, int64_t count, float *out);

#endif
