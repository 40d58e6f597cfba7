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

/* bytes (b0, b1, b2, b3) -> the int16 pairs (b0, b2) and (b1, b3) */
#define WIDEN(v, even, odd) do { even = (uint32_t)__sxtb16((int32_t)(v)); odd = (uint32_t)__sxtb16((int32_t)ror8(v)); } while (0)
/* low halves of a and b as one pair (a, b); high halves likewise (gcc emits PKHBT / PKHTB) */
#define PAIR_LO(a, b) (((a) & 0xFFFFu) | ((b) << 16))
#define PAIR_HI(a, b) (((b) & 0xFFFF0000u) | ((a) >> 16))

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
static void mac_2x4(const int8_t *w0, const int8_t *w1, int32_t w_k, const int8_t *x, int32_t x_k, int32_t depth,
                    int32_t acc[2 * FT_PIX]) {
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0, k = 0;
    for (; k + 2 <= depth; k += 2) {
        uint32_t pe, po, qe, qo, x0, x1, x2, x3, wa, wb;
        WIDEN(load32(x), pe, po);
        WIDEN(load32(x + x_k), qe, qo);
        x0 = PAIR_LO(pe, qe), x2 = PAIR_HI(pe, qe), x1 = PAIR_LO(po, qo), x3 = PAIR_HI(po, qo);
        wa = PAIR_LO((uint32_t)(int32_t)w0[0], (uint32_t)(int32_t)w0[w_k]);
        wb = PAIR_LO((uint32_t)(int32_t)w1[0], (uint32_t)(int32_t)w1[w_k]);
        a0 = __smlad((int32_t)wa, (int32_t)x0, a0);
        a1 = __smlad((int32_t)wa, (int32_t)x1, a1);
        a2 = __smlad((int32_t)wa, (int32_t)x2, a2);
        a3 = __smlad((int32_t)wa, (int32_t)x3, a3);
        b0 = __smlad((int32_t)wb, (int32_t)x0, b0);
        b1 = __smlad((int32_t)wb, (int32_t)x1, b1);
        b2 = __smlad((int32_t)wb, (int32_t)x2, b2);
        b3 = __smlad((int32_t)wb, (int32_t)x3, b3);
        x += 2 * x_k;
        w0 += 2 * w_k;
        w1 += 2 * w_k;
    }
    if (k < depth) {
        const int32_t wa = w0[0], wb = w1[0];
        a0 += wa * x[0], a1 += wa * x[1], a2 += wa * x[2], a3 += wa * x[3];
        b0 += wb * x[0], b1 += wb * x[1], b2 += wb * x[2], b3 += wb * x[3];
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
    acc[FT_PIX] = b0, acc[FT_PIX + 1] = b1, acc[FT_PIX + 2] = b2, acc[FT_PIX + 3] = b3;
}

/* One row x four pixels (a fused expansion computes one channel at a time) */
static void mac_1x4(const int8_t *w0, int32_t w_k, const int8_t *x, int32_t x_k, int32_t depth, int32_t acc[FT_PIX]) {
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, k = 0;
    for (; k + 2 <= depth; k += 2) {
        uint32_t pe, po, qe, qo, wa;
        WIDEN(load32(x), pe, po);
        WIDEN(load32(x + x_k), qe, qo);
        wa = PAIR_LO((uint32_t)(int32_t)w0[0], (uint32_t)(int32_t)w0[w_k]);
        a0 = __smlad((int32_t)wa, (int32_t)PAIR_LO(pe, qe), a0);
        a1 = __smlad((int32_t)wa, (int32_t)PAIR_LO(po, qo), a1);
        a2 = __smlad((int32_t)wa, (int32_t)PAIR_HI(pe, qe), a2);
        a3 = __smlad((int32_t)wa, (int32_t)PAIR_HI(po, qo), a3);
        x += 2 * x_k;
        w0 += 2 * w_k;
    }
    if (k < depth) {
        const int32_t wa = w0[0];
        a0 += wa * x[0], a1 += wa * x[1], a2 += wa * x[2], a3 += wa * x[3];
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
}

#else /* portable */

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
    if (pixels == FT_PIX) {
        if (rows == 2)
            mac_2x4(w, w + w_row, w_k, x, x_k, depth, acc);
        else
            mac_1x4(w, w_k, x, x_k, depth, acc);
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
    if (kw == 3 && stride == 1) { /* two outputs per word of input: (w0, w2).(x0, x2) + w1 x1 and (w0, w2).(x1, x3) + w1 x2 */
        for (; j + 2 <= n; j += 2) {
            int32_t s0 = acc[j], s1 = acc[j + 1];
            for (ky = 0; ky < kh; ky++) {
                const int8_t *w = wk + ky * 3;
                const uint32_t w02 = PAIR_LO((uint32_t)(int32_t)w[0], (uint32_t)(int32_t)w[2]);
                const int32_t w1 = w[1];
                uint32_t e, o;
                WIDEN(load32(rows[ky] + j), e, o);
                s0 = __smlabb(w1, (int32_t)o, __smlad((int32_t)w02, (int32_t)e, s0));
                s1 = __smlabt(w1, (int32_t)e, __smlad((int32_t)w02, (int32_t)o, s1));
            }
            acc[j] = s0, acc[j + 1] = s1;
        }
    }
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
