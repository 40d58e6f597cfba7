/* Host array kernels (see fedtiny_host.h). Each loop has a portable scalar body written so that gcc
 * vectorises it; on x86-64 an AVX2 clone is chosen at load time (32x32->64-bit multiplies, vpmuldq)
 * with the baseline SSE2 clone as fallback. The clones compute the same integers. */
#include "fedtiny_host.h"
#include "fedtiny_int8.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(FT_NO_CLONES)
#define FT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FT_CLONES
#endif

int ft_host_abi(void) { return FT_HOST_ABI; }

/* MBQM for mult >= 0, in the form the vectoriser handles: with p = (x << left) * mult,
 * SRDHM = floor((p + 2^30) / 2^31) (for p < 0 TFLM's trunc((p + 1 - 2^30) / 2^31) equals it, and
 * mult >= 0 excludes the saturating case). Its low 32 bits are bits 31..62 of p + 2^30, the same
 * for a logical as for an arithmetic shift, and |SRDHM| < 2^31, so a logical shift serves (AVX2
 * has no 64-bit arithmetic shift). Then RoundingDivideByPOT by `right` in int32. */
static inline int32_t mbqm_nonneg(int32_t x, int32_t mult, int left, int right, int32_t rmask) {
    const int32_t xs = (int32_t)((uint32_t)x << left);
    const uint64_t p = (uint64_t)((int64_t)xs * (int64_t)mult + ((int64_t)1 << 30));
    const int32_t s = (int32_t)(uint32_t)(p >> 31);
    const int32_t threshold = (rmask >> 1) + (int32_t)((uint32_t)s >> 31); /* + [s < 0] */
    return (s >> right) + ((s & rmask) > threshold);
}

/* TFLM's int32 addition, wrapping as compiled TFLM's does (defined here: unsigned arithmetic). */
static inline int32_t add32(int32_t a, int32_t b) { return (int32_t)((uint32_t)a + (uint32_t)b); }

static inline int32_t clamp32(int32_t v, int32_t lo, int32_t hi) {
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

FT_CLONES
static void requant_row_f32(const float *acc, int64_t count, int32_t mult, int left, int right, int32_t y_zero,
                            int32_t lo, int32_t hi, float *y, uint8_t *mask) {
    const int32_t rmask = (int32_t)(((int64_t)1 << right) - 1);
    int64_t i;
    if (mask) {
        for (i = 0; i < count; i++) {
            const int32_t v = add32(mbqm_nonneg((int32_t)acc[i], mult, left, right, rmask), y_zero);
            mask[i] = (uint8_t)((v >= lo) & (v <= hi));
            y[i] = (float)clamp32(v, lo, hi);
        }
    } else {
        for (i = 0; i < count; i++) {
            const int32_t v = add32(mbqm_nonneg((int32_t)acc[i], mult, left, right, rmask), y_zero);
            y[i] = (float)clamp32(v, lo, hi);
        }
    }
}

FT_CLONES
static void requant_row_f64(const double *acc, int64_t count, int32_t mult, int left, int right, int32_t y_zero,
                            int32_t lo, int32_t hi, float *y, uint8_t *mask) {
    const int32_t rmask = (int32_t)(((int64_t)1 << right) - 1);
    int64_t i;
    for (i = 0; i < count; i++) {
        const int32_t v = add32(mbqm_nonneg((int32_t)acc[i], mult, left, right, rmask), y_zero);
        if (mask) mask[i] = (uint8_t)((v >= lo) & (v <= hi));
        y[i] = (float)clamp32(v, lo, hi);
    }
}

int ft_requantize_clamp(const float *acc_f32, const double *acc_f64, int64_t n, int64_t c, int64_t hw,
                        const int32_t *mult, const int32_t *shift, int32_t y_zero, int32_t lo, int32_t hi,
                        float *y, uint8_t *mask) {
    int64_t b, ch;
    if ((acc_f32 == 0) == (acc_f64 == 0) || n < 0 || c < 0 || hw < 0 || !mult || !shift || !y) return -1;
    for (ch = 0; ch < c; ch++)
        if (mult[ch] < 0 || shift[ch] > 31 || shift[ch] < -31) return -1;
    for (b = 0; b < n; b++) {
        for (ch = 0; ch < c; ch++) {
            const int64_t at = (b * c + ch) * hw;
            const int left = shift[ch] > 0 ? shift[ch] : 0, right = shift[ch] > 0 ? 0 : -shift[ch];
            if (acc_f32)
                requant_row_f32(acc_f32 + at, hw, mult[ch], left, right, y_zero, lo, hi, y + at, mask ? mask + at : 0);
            else
                requant_row_f64(acc_f64 + at, hw, mult[ch], left, right, y_zero, lo, hi, y + at, mask ? mask + at : 0);
        }
    }
    return 0;
}

FT_CLONES
static void clamp_rows(float *y, int64_t count, int32_t lo, int32_t hi, uint8_t *mask) {
    const float flo = (float)lo, fhi = (float)hi;
    int64_t i;
    if (mask)
        for (i = 0; i < count; i++) mask[i] = (uint8_t)((y[i] >= flo) & (y[i] <= fhi));
    for (i = 0; i < count; i++) y[i] = y[i] < flo ? flo : (y[i] > fhi ? fhi : y[i]);
}

FT_CLONES
static void add_rows(const float *a, const float *b, int64_t count, int32_t off1, int32_t off2, int left_shift,
                     int32_t m1, int r1, int32_t m2, int r2, int32_t mo, int ro, int32_t z_out, int32_t lo,
                     int32_t hi, float *y, uint8_t *mask) {
    const int32_t mask1 = (int32_t)(((int64_t)1 << r1) - 1), mask2 = (int32_t)(((int64_t)1 << r2) - 1);
    const int32_t masko = (int32_t)(((int64_t)1 << ro) - 1);
    int64_t i;
    for (i = 0; i < count; i++) { /* int32 results of TFLM's AddFunc before the clamp */
        const int32_t x1 = (int32_t)((uint32_t)((int32_t)a[i] + off1) << left_shift);
        const int32_t x2 = (int32_t)((uint32_t)((int32_t)b[i] + off2) << left_shift);
        const int32_t sum = add32(mbqm_nonneg(x1, m1, 0, r1, mask1), mbqm_nonneg(x2, m2, 0, r2, mask2));
        y[i] = (float)add32(mbqm_nonneg(sum, mo, 0, ro, masko), z_out);
    }
    clamp_rows(y, count, lo, hi, mask);
}

int ft_add_clamp(const float *a, const float *b, int64_t count, int32_t off1, int32_t off2, int left_shift,
                 int32_t m1, int s1, int32_t m2, int s2, int32_t mo, int so, int32_t z_out, int32_t lo, int32_t hi,
                 float *y, uint8_t *mask) {
    /* TFLM's ADD multipliers are < 1 (shift <= 0) and non-negative; its inputs are int8 and
     * left_shift is 20, so (a + off) << left_shift fits int32. */
    if (!a || !b || !y || count < 0 || m1 < 0 || m2 < 0 || mo < 0 || s1 > 0 || s2 > 0 || so > 0 || s1 < -31 ||
        s2 < -31 || so < -31 || left_shift < 0 || left_shift > 22)
        return -1;
    add_rows(a, b, count, off1, off2, left_shift, m1, -s1, m2, -s2, mo, -so, z_out, lo, hi, y, mask);
    return 0;
}

FT_CLONES
static void uniform_rows(uint32_t base, int64_t count, float *out) {
    int64_t i;
    for (i = 0; i < count; i++) {
        uint32_t x = base + (uint32_t)i; /* Wellons' lowbias32, as fedtiny/int8/exact.py states it */
        x ^= x >> 16;
        x *= 0x7FEB352Du;
        x ^= x >> 15;
        x *= 0x846CA68Bu;
        x ^= x >> 16;
        out[i] = (float)(x >> 8) * (1.0f / 16777216.0f);
    }
}

int ft_uniform(uint32_t base, int64_t count, float *out) {
    if (!out || count < 0) return -1;
    uniform_rows(base, count, out);
    return 0;
}
