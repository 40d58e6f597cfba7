/* The integer sums of fedtiny's training step (see fedtiny_kernels.h): a DSP build for Cortex-M4/M7 and
 * a portable build; the same int32 results. */
#include "fedtiny_kernels.h"

#include <string.h>

#if FT_KERNELS_DSP
#include <arm_acle.h>

const char *ft_kernels_name(void) { return "dsp"; }

static inline uint32_t load32(const int8_t *p) { /* an unaligned LDR (M4/M7 allow it for LDR) */
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint32_t ror8(uint32_t v) { return (v >> 8) | (v << 24); }

/* SXTB16 with its rotation, PKHBT and PKHTB (not in ACLE): one instruction each */
static inline uint32_t sxtb16_ror8(uint32_t v) {
    uint32_t r;
    __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(v));
    return r;
}

static inline uint32_t pack_lo(uint32_t a, uint32_t b) { /* (a.low, b.low) */
    uint32_t r;
    __asm__("pkhbt %0, %1, %2, lsl #16" : "=r"(r) : "r"(a), "r"(b));
    return r;
}

static inline uint32_t pack_hi(uint32_t a, uint32_t b) { /* (a.high, b.high) */
    uint32_t r;
    __asm__("pkhtb %0, %1, %2, asr #16" : "=r"(r) : "r"(b), "r"(a));
    return r;
}

/* bytes (b0, b1, b2, b3) -> the int16 pairs (b0, b2) and (b1, b3) */
#define WIDEN(v, even, odd) do { const uint32_t v_ = (v); even = (uint32_t)__sxtb16((int32_t)v_); odd = sxtb16_ror8(v_); } while (0)
#define SMLAD(a, b, acc) __smlad((int32_t)(a), (int32_t)(b), (acc))

int32_t ft_dot_s8(const int8_t *a, const int8_t *b, int32_t n) {
    int32_t s = 0, i = 0;
    for (; i + 4 <= n; i += 4) {
        uint32_t ae, ao, be, bo;
        WIDEN(load32(a + i), ae, ao);
        WIDEN(load32(b + i), be, bo);
        s = __smlad((int32_t)ae, (int32_t)be, s);
        s = __smlad((int32_t)ao, (int32_t)bo, s);
    }
    for (; i < n; i++) s += (int32_t)a[i] * b[i];
    return s;
}

void ft_dot_s8_1x2(const int8_t *a, const int8_t *b0, const int8_t *b1, int32_t n, int32_t out[2]) {
    int32_t s0 = 0, s1 = 0, i = 0;
    for (; i + 4 <= n; i += 4) {
        uint32_t ae, ao, pe, po, qe, qo;
        WIDEN(load32(a + i), ae, ao);
        WIDEN(load32(b0 + i), pe, po);
        WIDEN(load32(b1 + i), qe, qo);
        s0 = __smlad((int32_t)ae, (int32_t)pe, __smlad((int32_t)ao, (int32_t)po, s0));
        s1 = __smlad((int32_t)ae, (int32_t)qe, __smlad((int32_t)ao, (int32_t)qo, s1));
    }
    for (; i < n; i++) {
        s0 += (int32_t)a[i] * b0[i];
        s1 += (int32_t)a[i] * b1[i];
    }
    out[0] = s0, out[1] = s1;
}

int32_t ft_sum_s8(const int8_t *a, int32_t n) {
    int32_t s = 0, i = 0;
    for (; i + 4 <= n; i += 4) { /* SMLAD with (1, 1): the two halves' sum */
        uint32_t e, o;
        WIDEN(load32(a + i), e, o);
        s = __smlad((int32_t)e, 0x00010001, __smlad((int32_t)o, 0x00010001, s));
    }
    for (; i < n; i++) s += a[i];
    return s;
}

/* Two rows x four pixels, two k per iteration: the inputs of channels k and k + 1 are widened and
 * paired per pixel, (x[k][j], x[k+1][j]), then each pair meets both rows' weight pairs (w[k], w[k+1]). */
static void mac_2x4(const int8_t *w, int32_t w_row, int32_t w_k, const int8_t *x, int32_t x_k, int32_t depth,
                    int32_t acc[2 * FT_PIX]) {
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
    const int8_t *const end = x + (size_t)(depth & ~1) * x_k;
    const int32_t x_k2 = 2 * x_k, w_k2 = 2 * w_k;
    while (x != end) {
        uint32_t pe, po, qe, qo, p, wa, wb;
        WIDEN(load32(x), pe, po);
        WIDEN(load32(x + x_k), qe, qo);
        wa = pack_lo((uint32_t)(int32_t)w[0], (uint32_t)(int32_t)w[w_k]);
        wb = pack_lo((uint32_t)(int32_t)w[w_row], (uint32_t)(int32_t)w[w_row + w_k]);
        p = pack_lo(pe, qe);
        a0 = SMLAD(wa, p, a0);
        b0 = SMLAD(wb, p, b0);
        p = pack_lo(po, qo);
        a1 = SMLAD(wa, p, a1);
        b1 = SMLAD(wb, p, b1);
        p = pack_hi(pe, qe);
        a2 = SMLAD(wa, p, a2);
        b2 = SMLAD(wb, p, b2);
        p = pack_hi(po, qo);
        a3 = SMLAD(wa, p, a3);
        b3 = SMLAD(wb, p, b3);
        x += x_k2;
        w += w_k2;
    }
    if (depth & 1) {
        const int32_t wa = w[0], wb = w[w_row];
        a0 += wa * x[0], a1 += wa * x[1], a2 += wa * x[2], a3 += wa * x[3];
        b0 += wb * x[0], b1 += wb * x[1], b2 += wb * x[2], b3 += wb * x[3];
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
    acc[FT_PIX] = b0, acc[FT_PIX + 1] = b1, acc[FT_PIX + 2] = b2, acc[FT_PIX + 3] = b3;
}

/* One row x four pixels (a fused expansion computes one channel at a time) */
static void mac_1x4(const int8_t *w, int32_t w_k, const int8_t *x, int32_t x_k, int32_t depth, int32_t acc[FT_PIX]) {
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    const int8_t *const end = x + (size_t)(depth & ~1) * x_k;
    const int32_t x_k2 = 2 * x_k, w_k2 = 2 * w_k;
    while (x != end) {
        uint32_t pe, po, qe, qo, wa;
        WIDEN(load32(x), pe, po);
        WIDEN(load32(x + x_k), qe, qo);
        wa = pack_lo((uint32_t)(int32_t)w[0], (uint32_t)(int32_t)w[w_k]);
        a0 = SMLAD(wa, pack_lo(pe, qe), a0);
        a1 = SMLAD(wa, pack_lo(po, qo), a1);
        a2 = SMLAD(wa, pack_hi(pe, qe), a2);
        a3 = SMLAD(wa, pack_hi(po, qo), a3);
        x += x_k2;
        w += w_k2;
    }
    if (depth & 1) {
        const int32_t wa = w[0];
        a0 += wa * x[0], a1 += wa * x[1], a2 += wa * x[2], a3 += wa * x[3];
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
}

/* One row x eight pixels: the fused expansion's case, with as many accumulators as mac_2x4 */
static void mac_1x8(const int8_t *w, int32_t w_k, const int8_t *x, int32_t x_k, int32_t depth, int32_t acc[FT_PIX]) {
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
    const int8_t *const end = x + (size_t)(depth & ~1) * x_k;
    const int32_t x_k2 = 2 * x_k, w_k2 = 2 * w_k;
    while (x != end) {
        uint32_t pe, po, qe, qo, wa;
        wa = pack_lo((uint32_t)(int32_t)w[0], (uint32_t)(int32_t)w[w_k]);
        WIDEN(load32(x), pe, po);
        WIDEN(load32(x + x_k), qe, qo);
        a0 = SMLAD(wa, pack_lo(pe, qe), a0);
        a1 = SMLAD(wa, pack_lo(po, qo), a1);
        a2 = SMLAD(wa, pack_hi(pe, qe), a2);
        a3 = SMLAD(wa, pack_hi(po, qo), a3);
        WIDEN(load32(x + 4), pe, po);
        WIDEN(load32(x + x_k + 4), qe, qo);
        a4 = SMLAD(wa, pack_lo(pe, qe), a4);
        a5 = SMLAD(wa, pack_lo(po, qo), a5);
        a6 = SMLAD(wa, pack_hi(pe, qe), a6);
        a7 = SMLAD(wa, pack_hi(po, qo), a7);
        x += x_k2;
        w += w_k2;
    }
    if (depth & 1) {
        const int32_t wa = w[0];
        a0 += wa * x[0], a1 += wa * x[1], a2 += wa * x[2], a3 += wa * x[3];
        a4 += wa * x[4], a5 += wa * x[5], a6 += wa * x[6], a7 += wa * x[7];
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3, acc[4] = a4, acc[5] = a5, acc[6] = a6, acc[7] = a7;
}

/* Depthwise 3 x 3 at stride 1, n outputs of one row: the weights in registers as (w0, w2) pairs and w1;
 * two outputs per word of input: (w0, w2).(x0, x2) + w1 x1 and (w0, w2).(x1, x3) + w1 x2. */
static int32_t dw3_s1(const int8_t *const *rows, const int8_t *wk, int32_t n, int32_t *acc) {
    const uint32_t p0 = pack_lo((uint32_t)(int32_t)wk[0], (uint32_t)(int32_t)wk[2]);
    const uint32_t p1 = pack_lo((uint32_t)(int32_t)wk[3], (uint32_t)(int32_t)wk[5]);
    const uint32_t p2 = pack_lo((uint32_t)(int32_t)wk[6], (uint32_t)(int32_t)wk[8]);
    const int32_t c0 = wk[1], c1 = wk[4], c2 = wk[7];
    const int8_t *r0 = rows[0], *r1 = rows[1], *r2 = rows[2];
    int32_t j;
    for (j = 0; j + 2 <= n; j += 2) {
        int32_t s0 = acc[j], s1 = acc[j + 1];
        uint32_t e, o;
        WIDEN(load32(r0 + j), e, o);
        s0 = __smlabb(c0, (int32_t)o, SMLAD(p0, e, s0));
        s1 = __smlabt(c0, (int32_t)e, SMLAD(p0, o, s1));
        WIDEN(load32(r1 + j), e, o);
        s0 = __smlabb(c1, (int32_t)o, SMLAD(p1, e, s0));
        s1 = __smlabt(c1, (int32_t)e, SMLAD(p1, o, s1));
        WIDEN(load32(r2 + j), e, o);
        s0 = __smlabb(c2, (int32_t)o, SMLAD(p2, e, s0));
        s1 = __smlabt(c2, (int32_t)e, SMLAD(p2, o, s1));
        acc[j] = s0, acc[j + 1] = s1;
    }
    return j;
}

/* Depthwise 3 x 3 at stride 2: one output per word of input, (w0, w2).(x0, x2) + w1 x1. The word's fourth
 * byte is read but not used: rows hold (n - 1) * 2 + 3 bytes, so the last output reads its own word only
 * while j * 2 + 4 fits; the rest takes the plain loop. */
static int32_t dw3_s2(const int8_t *const *rows, const int8_t *wk, int32_t n, int32_t *acc) {
    const uint32_t p0 = pack_lo((uint32_t)(int32_t)wk[0], (uint32_t)(int32_t)wk[2]);
    const uint32_t p1 = pack_lo((uint32_t)(int32_t)wk[3], (uint32_t)(int32_t)wk[5]);
    const uint32_t p2 = pack_lo((uint32_t)(int32_t)wk[6], (uint32_t)(int32_t)wk[8]);
    const int32_t c0 = wk[1], c1 = wk[4], c2 = wk[7];
    const int8_t *r0 = rows[0], *r1 = rows[1], *r2 = rows[2];
    int32_t j;
    for (j = 0; j + 1 < n; j++) { /* the last output may not own a fourth byte */
        int32_t s = acc[j];
        uint32_t e, o;
        WIDEN(load32(r0 + 2 * j), e, o);
        s = __smlabb(c0, (int32_t)o, SMLAD(p0, e, s));
        WIDEN(load32(r1 + 2 * j), e, o);
        s = __smlabb(c1, (int32_t)o, SMLAD(p1, e, s));
        WIDEN(load32(r2 + 2 * j), e, o);
        s = __smlabb(c2, (int32_t)o, SMLAD(p2, e, s));
        acc[j] = s;
    }
    return j;
}

/* Stride 1, any width: per output and row, taps four at a time as (w0, w2).(x0, x2) + (w1, w3).(x1, x3). */
static int32_t dw_s1(const int8_t *const *rows, const int8_t *wk, int32_t kh, int32_t kw, int32_t n, int32_t *acc) {
    const int32_t quads = kw / 4;
    int32_t j, ky, t;
    if (quads == 0) return 0;
    for (j = 0; j < n; j++) {
        int32_t s = acc[j];
        for (ky = 0; ky < kh; ky++) {
            const int8_t *r = rows[ky] + j, *w = wk + ky * kw;
            for (t = 0; t < quads; t++, r += 4, w += 4) {
                uint32_t xe, xo, we, wo;
                WIDEN(load32(r), xe, xo);
                WIDEN(load32(w), we, wo);
                s = SMLAD(we, xe, SMLAD(wo, xo, s));
            }
            for (t = quads * 4; t < kw; t++, r++, w++) s += (int32_t)*w * *r;
        }
        acc[j] = s;
    }
    return n;
}

void ft_cols_prepare(int16_t *col, int32_t depth) {
    int32_t k;
    for (k = 0; k + 4 <= depth; k += 4) { /* (x0, x1), (x2, x3) -> (x0, x2), (x1, x3) */
        uint32_t a, b, lo, hi;
        memcpy(&a, col + k, 4);
        memcpy(&b, col + k + 2, 4);
        lo = pack_lo(a, b), hi = pack_hi(a, b);
        memcpy(col + k, &lo, 4);
        memcpy(col + k + 2, &hi, 4);
    }
}

void ft_mac_2x2_cols(const int8_t *w0, const int8_t *w1, const int16_t *c0, const int16_t *c1, int32_t depth,
                     int32_t acc[4]) {
    int32_t a00 = 0, a01 = 0, a10 = 0, a11 = 0, k;
    for (k = 0; k + 4 <= depth; k += 4) {
        uint32_t we, wo, x0, x1, y0, y1;
        memcpy(&x0, c0 + k, 4), memcpy(&x1, c0 + k + 2, 4);
        memcpy(&y0, c1 + k, 4), memcpy(&y1, c1 + k + 2, 4);
        WIDEN(load32(w0 + k), we, wo);
        a00 = SMLAD(we, x0, SMLAD(wo, x1, a00));
        a01 = SMLAD(we, y0, SMLAD(wo, y1, a01));
        WIDEN(load32(w1 + k), we, wo);
        a10 = SMLAD(we, x0, SMLAD(wo, x1, a10));
        a11 = SMLAD(we, y0, SMLAD(wo, y1, a11));
    }
    for (; k < depth; k++) {
        a00 += (int32_t)w0[k] * c0[k], a01 += (int32_t)w0[k] * c1[k];
        a10 += (int32_t)w1[k] * c0[k], a11 += (int32_t)w1[k] * c1[k];
    }
    acc[0] = a00, acc[1] = a01, acc[2] = a10, acc[3] = a11;
}

uint32_t ft_requant_row(const int32_t *acc, int32_t n, int32_t folded, int32_t mult, int32_t k2, int32_t e,
                        uint32_t range, int32_t lo, int8_t *y) {
    /* 14 instructions an output: SMMLAR's 2^31 is the offset's low word once x is doubled; the kept bits
     * are collected by ADC from the compare's carry, first output highest, then reversed */
    const int32_t f2 = (int32_t)((uint32_t)folded << 1), count = n;
    uint32_t bits = 0;
    int32_t x, t;
    if (n <= 0) return 0;
    __asm__ volatile("1:\n\t"
                     "ldr    %[x], [%[acc]], #4\n\t"
                     "add    %[x], %[f2], %[x], lsl #1\n\t"
                     "add    %[t], %[k2], %[x], asr #31\n\t"
                     "smmlar %[t], %[x], %[mult], %[t]\n\t"
                     "asr    %[t], %[t], %[e]\n\t"
                     "cmp    %[range], %[t]\n\t"
                     "adc    %[bits], %[bits], %[bits]\n\t"
                     "it     lt\n\t"
                     "movlt  %[t], %[range]\n\t"
                     "bic    %[t], %[t], %[t], asr #31\n\t"
                     "add    %[t], %[t], %[lo]\n\t"
                     "strb   %[t], [%[y]], #1\n\t"
                     "subs   %[n], %[n], #1\n\t"
                     "bne    1b\n\t"
                     : [x] "=&r"(x), [t] "=&r"(t), [bits] "+r"(bits), [acc] "+r"(acc), [y] "+r"(y), [n] "+r"(n)
                     : [f2] "r"(f2), [k2] "r"(k2), [mult] "r"(mult), [e] "r"(e), [range] "r"(range), [lo] "r"(lo)
                     : "cc", "memory");
    __asm__("rbit %0, %1" : "=r"(t) : "r"(bits));
    return (uint32_t)t >> (32 - count);
}

#else /* portable */

uint32_t ft_requant_row(const int32_t *acc, int32_t n, int32_t folded, int32_t mult, int32_t k2, int32_t e,
                        uint32_t range, int32_t lo, int8_t *y) {
    uint32_t bits = 0;
    int32_t j;
    for (j = 0; j < n; j++) {
        const int32_t x2 = (int32_t)(((uint32_t)acc[j] + (uint32_t)folded) << 1);
        const int64_t high = (int64_t)(k2 + (x2 < 0 ? -1 : 0)) * 4294967296LL;
        int32_t u = (int32_t)((high + (int64_t)x2 * mult + 2147483648LL) >> 32) >> e;
        bits |= (uint32_t)((uint32_t)u <= range) << j;
        u = u > (int32_t)range ? (int32_t)range : u;
        y[j] = (int8_t)((u < 0 ? 0 : u) + lo);
    }
    return bits;
}


void ft_cols_prepare(int16_t *col, int32_t depth) {
    (void)col, (void)depth;
}

void ft_mac_2x2_cols(const int8_t *w0, const int8_t *w1, const int16_t *c0, const int16_t *c1, int32_t depth,
                     int32_t acc[4]) {
    int32_t a00 = 0, a01 = 0, a10 = 0, a11 = 0, k;
    for (k = 0; k < depth; k++) {
        a00 += (int32_t)w0[k] * c0[k], a01 += (int32_t)w0[k] * c1[k];
        a10 += (int32_t)w1[k] * c0[k], a11 += (int32_t)w1[k] * c1[k];
    }
    acc[0] = a00, acc[1] = a01, acc[2] = a10, acc[3] = a11;
}

const char *ft_kernels_name(void) { return "portable"; }

int32_t ft_dot_s8(const int8_t *a, const int8_t *b, int32_t n) {
    int32_t s = 0, i;
    for (i = 0; i < n; i++) s += (int32_t)a[i] * b[i];
    return s;
}

void ft_dot_s8_1x2(const int8_t *a, const int8_t *b0, const int8_t *b1, int32_t n, int32_t out[2]) {
    int32_t s0 = 0, s1 = 0, i;
    for (i = 0; i < n; i++) {
        s0 += (int32_t)a[i] * b0[i];
        s1 += (int32_t)a[i] * b1[i];
    }
    out[0] = s0, out[1] = s1;
}

int32_t ft_sum_s8(const int8_t *a, int32_t n) {
    int32_t s = 0, i;
    for (i = 0; i < n; i++) s += a[i];
    return s;
}

#endif

int ft_kernels_fit(int64_t terms) { return terms >= 0 && terms * 128 * 255 <= INT32_MAX; }

void ft_mac_block(const int8_t *w, int32_t w_row, int32_t w_k, int32_t rows, const int8_t *x, int32_t x_k,
                  int32_t depth, int32_t pixels, int32_t acc[2 * FT_PIX]) {
    int32_t k, j;
#if FT_KERNELS_DSP
    {
        int32_t done = 0;
        if (rows == 1 && pixels == 8) {
            mac_1x8(w, w_k, x, x_k, depth, acc);
            return;
        }
        for (; done + 4 <= pixels; done += 4) {
            if (rows == 2)
                mac_2x4(w, w_row, w_k, x + done, x_k, depth, acc + done);
            else
                mac_1x4(w, w_k, x + done, x_k, depth, acc + done);
        }
        if (done == pixels) return;
        for (j = done; j < pixels; j++) acc[j] = acc[FT_PIX + j] = 0;
        for (k = 0; k < depth; k++) { /* the last pixels of a plane, fewer than four */
            const int8_t *xk = x + (size_t)k * x_k;
            const int32_t wa = w[(size_t)k * w_k], wb = rows > 1 ? w[w_row + (size_t)k * w_k] : 0;
            for (j = done; j < pixels; j++) acc[j] += wa * xk[j], acc[FT_PIX + j] += wb * xk[j];
        }
        return;
    }
#endif
    for (j = 0; j < 2 * FT_PIX; j++) acc[j] = 0;
    if (pixels == FT_PIX && rows == 2) { /* fixed trip counts: the vectoriser's case */
        for (k = 0; k < depth; k++) {
            const int8_t *xk = x + (size_t)k * x_k;
            const int32_t wa = w[(size_t)k * w_k], wb = w[w_row + (size_t)k * w_k];
            for (j = 0; j < FT_PIX; j++) acc[j] += wa * xk[j];
            for (j = 0; j < FT_PIX; j++) acc[FT_PIX + j] += wb * xk[j];
        }
        return;
    }
    if (pixels == FT_PIX) {
        for (k = 0; k < depth; k++) {
            const int8_t *xk = x + (size_t)k * x_k;
            const int32_t wa = w[(size_t)k * w_k];
            for (j = 0; j < FT_PIX; j++) acc[j] += wa * xk[j];
        }
        return;
    }
    for (k = 0; k < depth; k++) {
        const int8_t *xk = x + (size_t)k * x_k;
        const int32_t wa = w[(size_t)k * w_k], wb = rows > 1 ? w[w_row + (size_t)k * w_k] : 0;
        for (j = 0; j < pixels; j++) acc[j] += wa * xk[j];
        if (rows > 1)
            for (j = 0; j < pixels; j++) acc[FT_PIX + j] += wb * xk[j];
    }
}

void ft_dw_row(const int8_t *const *rows, const int8_t *wk, int32_t kh, int32_t kw, int32_t stride, int32_t n,
               int32_t *acc) {
    int32_t ky, kx, j = 0;
#if FT_KERNELS_DSP
    if (kh == 3 && kw == 3 && stride == 1)
        j = dw3_s1(rows, wk, n, acc);
    else if (kh == 3 && kw == 3 && stride == 2)
        j = dw3_s2(rows, wk, n, acc);
    else if (stride == 1 && kw >= 4)
        j = dw_s1(rows, wk, kh, kw, n, acc);
#endif
    for (; j < n; j++) {
        int32_t s = acc[j];
        for (ky = 0; ky < kh; ky++) {
            const int8_t *r = rows[ky] + (size_t)j * stride;
            for (kx = 0; kx < kw; kx++) s += (int32_t)wk[ky * kw + kx] * r[kx];
        }
        acc[j] = s;
    }
}
