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

static inline uint32_t load16(const int8_t *p) { /* an unaligned LDRH */
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* Two outputs (a, b) x two adjacent pixels (j, j + 1) over depth k, four k per step, in assembly: GCC spills
 * the accumulators of eight-accumulator loops (half their instructions went to the stack), this keeps four
 * accumulators, the pointers and six temporaries in the fourteen registers and reads the end from the
 * stack once a step. The inputs of pixels j, j + 1 of channels k .. k + 3 (planes x_k apart: four LDRH)
 * become int16 pairs (k, k + 2) and (k + 1, k + 3), the pairs SXTB16 makes of four bytes:
 *   x02_j = (x[k][j], x[k+2][j]), x13_j = (x[k+1][j], x[k+3][j]).
 * mac_2x2_rows: the weights of a and b are rows (w[k], w + w_row; one word per four k: SXTB16 gives
 * (w[k], w[k+2]) and, rotated, (w[k+1], w[k+3])); the forward's case. mac_2x2_columns: a and b are adjacent
 * (w[k w_k], w[k w_k + 1]; paired as the inputs are); the input gradient's case. 29 and 35 instructions per
 * 16 MACs. */
#define FT_PAIR_X                                                                                          \
    "ldrh   %[t0], [%[x]]\n\t"                                                                           \
    "ldrh   %[t1], [%[x], %[xk]]\n\t"                                                                    \
    "add    %[t2], %[x], %[xk], lsl #1\n\t"                                                              \
    "ldrh   %[t3], [%[t2]]\n\t"                                                                          \
    "ldrh   %[t2], [%[t2], %[xk]]\n\t"                                                                   \
    "orr    %[t0], %[t0], %[t3], lsl #16\n\t" /* x[k][j,j+1], x[k+2][j,j+1] */                          \
    "orr    %[t1], %[t1], %[t2], lsl #16\n\t" /* x[k+1][j,j+1], x[k+3][j,j+1] */                        \
    "add    %[x], %[x], %[xk], lsl #2\n\t"
/* with weight words t2 (pairs for k, k + 2 in its bytes 0, 2 for a and ... see the callers) and t3 */
#define FT_MAC_2X2(ae, be, ao, bo)                                                                         \
    "sxtb16 %[t4], %[t0]\n\t"        /* x02_0 */                                                         \
    "sxtb16 %[t5], " ae "\n\t"                                                                          \
    "smlad  %[a0], %[t5], %[t4], %[a0]\n\t"                                                             \
    "sxtb16 %[t0], %[t0], ror #8\n\t" /* x02_1 */                                                        \
    "smlad  %[a1], %[t5], %[t0], %[a1]\n\t"                                                             \
    "sxtb16 %[t5], " be "\n\t"                                                                          \
    "smlad  %[b0], %[t5], %[t4], %[b0]\n\t"                                                             \
    "smlad  %[b1], %[t5], %[t0], %[b1]\n\t"                                                             \
    "sxtb16 %[t4], %[t1]\n\t"        /* x13_0 */                                                         \
    "sxtb16 %[t5], " ao "\n\t"                                                                          \
    "smlad  %[a0], %[t5], %[t4], %[a0]\n\t"                                                             \
    "sxtb16 %[t1], %[t1], ror #8\n\t" /* x13_1 */                                                        \
    "smlad  %[a1], %[t5], %[t1], %[a1]\n\t"                                                             \
    "sxtb16 %[t5], " bo "\n\t"                                                                          \
    "smlad  %[b0], %[t5], %[t4], %[b0]\n\t"                                                             \
    "smlad  %[b1], %[t5], %[t1], %[b1]\n\t"
#define FT_MAC_2X2_OPERANDS                                                                                \
    [a0] "+r"(a0), [a1] "+r"(a1), [b0] "+r"(b0), [b1] "+r"(b1), [x] "+r"(x), [w] "+r"(w), [t0] "=&r"(t0), \
        [t1] "=&r"(t1), [t2] "=&r"(t2), [t3] "=&r"(t3), [t4] "=&r"(t4), [t5] "=&r"(t5)

static __attribute__((noinline)) void mac_2x2_rows(const int8_t *w, int32_t w_row, const int8_t *x, int32_t x_k,
                                                    int32_t depth, int32_t *a, int32_t *b) {
    int32_t a0 = 0, a1 = 0, b0 = 0, b1 = 0;
    const int8_t *end = w + (depth & ~3);
    const int8_t *const last = w + depth;
    uint32_t t0, t1, t2, t3, t4, t5;
    if (w != end)
        __asm__ volatile("1:\n\t" FT_PAIR_X
                         "ldr    %[t2], [%[w], %[wrow]]\n\t" /* b's w[k .. k+3] */
                         "ldr    %[t3], [%[w]], #4\n\t"      /* a's */
                         FT_MAC_2X2("%[t3]", "%[t2]", "%[t3], ror #8", "%[t2], ror #8")
                         "ldr    %[t2], %[end]\n\t"
                         "cmp    %[w], %[t2]\n\t"
                         "bne    1b\n\t"
                         : FT_MAC_2X2_OPERANDS
                         : [xk] "r"(x_k), [wrow] "r"(w_row), [end] "m"(end)
                         : "cc", "memory");
    for (; w != last; w++, x += x_k) {
        const int32_t wa = w[0], wb = w[w_row];
        a0 += wa * x[0], a1 += wa * x[1], b0 += wb * x[0], b1 += wb * x[1];
    }
    a[0] = a0, a[1] = a1, b[0] = b0, b[1] = b1;
}

static __attribute__((noinline)) void mac_2x2_columns(const int8_t *w, int32_t w_k, const int8_t *x, int32_t x_k,
                                                       int32_t depth, int32_t *a, int32_t *b) {
    int32_t a0 = 0, a1 = 0, b0 = 0, b1 = 0, k = depth & ~3;
    const int8_t *end = x + (size_t)k * x_k;
    uint32_t t0, t1, t2, t3, t4, t5;
    if (k)
        __asm__ volatile("1:\n\t" FT_PAIR_X
                         "ldrh   %[t2], [%[w]]\n\t"          /* (a, b) of k */
                         "ldrh   %[t3], [%[w], %[wk]]\n\t"   /* of k + 1 */
                         "add    %[t4], %[w], %[wk], lsl #1\n\t"
                         "ldrh   %[t5], [%[t4]]\n\t"         /* of k + 2 */
                         "ldrh   %[t4], [%[t4], %[wk]]\n\t"  /* of k + 3 */
                         "orr    %[t2], %[t2], %[t5], lsl #16\n\t"
                         "orr    %[t3], %[t3], %[t4], lsl #16\n\t"
                         "add    %[w], %[w], %[wk], lsl #2\n\t"
                         FT_MAC_2X2("%[t2]", "%[t2], ror #8", "%[t3]", "%[t3], ror #8")
                         "ldr    %[t2], %[end]\n\t"
                         "cmp    %[x], %[t2]\n\t"
                         "bne    1b\n\t"
                         : FT_MAC_2X2_OPERANDS
                         : [xk] "r"(x_k), [wk] "r"(w_k), [end] "m"(end)
                         : "cc", "memory");
    for (; k < depth; k++, x += x_k, w += w_k) {
        const int32_t wa = w[0], wb = w[1];
        a0 += wa * x[0], a1 += wa * x[1], b0 += wb * x[0], b1 += wb * x[1];
    }
    a[0] = a0, a[1] = a1, b[0] = b0, b[1] = b1;
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

/* One row x eight pixels: the fused expansion's case */
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

/* ft_dw3_rows: the weights in registers as in dw3_s1; two outputs per word at stride 1, one at stride 2
 * (dw3_s1's and dw3_s2's steps); an output whose word would reach past its window (the last of an odd row at
 * stride 1, the last of each row at stride 2) reads its three bytes as a half word and a byte. */
static void dw3_rows(const int8_t *x, int32_t w, const int8_t *wk, int32_t st, int32_t rows, int32_t n,
                     int32_t *acc) {
    const uint32_t p0 = pack_lo((uint32_t)(int32_t)wk[0], (uint32_t)(int32_t)wk[2]);
    const uint32_t p1 = pack_lo((uint32_t)(int32_t)wk[3], (uint32_t)(int32_t)wk[5]);
    const uint32_t p2 = pack_lo((uint32_t)(int32_t)wk[6], (uint32_t)(int32_t)wk[8]);
    const int32_t c0 = wk[1], c1 = wk[4], c2 = wk[7];
    int32_t r, j;
    for (r = 0; r < rows; r++, acc += n) {
        const int8_t *r0 = x + (size_t)r * st * w, *r1 = r0 + w, *r2 = r1 + w;
        j = 0;
        if (st == 1) {
            for (; j + 2 <= n; j += 2) {
                int32_t s0, s1;
                uint32_t e, o;
                WIDEN(load32(r0 + j), e, o);
                s0 = __smlabb(c0, (int32_t)o, SMLAD(p0, e, 0));
                s1 = __smlabt(c0, (int32_t)e, SMLAD(p0, o, 0));
                WIDEN(load32(r1 + j), e, o);
                s0 = __smlabb(c1, (int32_t)o, SMLAD(p1, e, s0));
                s1 = __smlabt(c1, (int32_t)e, SMLAD(p1, o, s1));
                WIDEN(load32(r2 + j), e, o);
                acc[j] = __smlabb(c2, (int32_t)o, SMLAD(p2, e, s0));
                acc[j + 1] = __smlabt(c2, (int32_t)e, SMLAD(p2, o, s1));
            }
        } else {
            for (; j + 1 < n; j++) {
                int32_t s;
                uint32_t e, o;
                WIDEN(load32(r0 + 2 * j), e, o);
                s = __smlabb(c0, (int32_t)o, SMLAD(p0, e, 0));
                WIDEN(load32(r1 + 2 * j), e, o);
                s = __smlabb(c1, (int32_t)o, SMLAD(p1, e, s));
                WIDEN(load32(r2 + 2 * j), e, o);
                acc[j] = __smlabb(c2, (int32_t)o, SMLAD(p2, e, s));
            }
        }
        for (; j < n; j++) {
            const int32_t at = j * st;
            int32_t s;
            uint32_t e, o;
            WIDEN(load16(r0 + at) | (uint32_t)(uint8_t)r0[at + 2] << 16, e, o);
            s = __smlabb(c0, (int32_t)o, SMLAD(p0, e, 0));
            WIDEN(load16(r1 + at) | (uint32_t)(uint8_t)r1[at + 2] << 16, e, o);
            s = __smlabb(c1, (int32_t)o, SMLAD(p1, e, s));
            WIDEN(load16(r2 + at) | (uint32_t)(uint8_t)r2[at + 2] << 16, e, o);
            acc[j] = __smlabb(c2, (int32_t)o, SMLAD(p2, e, s));
        }
    }
}

/* The 3 x 3 scatter: the weights in registers as the int16 pairs (w0, w1), (w2, w3), (w4, w5), (w6, w7) and
 * w8, one SMLABB / SMLABT per tap (v is int8, its low half its value) */
static void dw3_scatter(const int8_t *q, int32_t oh, int32_t ow, const int8_t *wk, int32_t st, int32_t *acc,
                        int32_t aw) {
    const int32_t p01 = (int32_t)pack_lo((uint32_t)(int32_t)wk[0], (uint32_t)(int32_t)wk[1]);
    const int32_t p23 = (int32_t)pack_lo((uint32_t)(int32_t)wk[2], (uint32_t)(int32_t)wk[3]);
    const int32_t p45 = (int32_t)pack_lo((uint32_t)(int32_t)wk[4], (uint32_t)(int32_t)wk[5]);
    const int32_t p67 = (int32_t)pack_lo((uint32_t)(int32_t)wk[6], (uint32_t)(int32_t)wk[7]);
    const int32_t w8 = wk[8];
    int32_t oy, ox;
    for (oy = 0; oy < oh; oy++) {
        const int8_t *qr = q + (size_t)oy * ow;
        int32_t *a = acc + (size_t)oy * st * aw;
        for (ox = 0; ox < ow; ox++, a += st) {
            const int32_t v = qr[ox];
            int32_t *b, *c;
            if (!v) continue;
            b = a + aw, c = b + aw;
            a[0] = __smlabb(v, p01, a[0]), a[1] = __smlabt(v, p01, a[1]), a[2] = __smlabb(v, p23, a[2]);
            b[0] = __smlabt(v, p23, b[0]), b[1] = __smlabb(v, p45, b[1]), b[2] = __smlabt(v, p45, b[2]);
            c[0] = __smlabb(v, p67, c[0]), c[1] = __smlabt(v, p67, c[1]), c[2] += v * w8;
        }
    }
}

/* 5 x 5 and 7 x 7 windows at any stride, a row of taps at a time: the row's weights widened once, then every
 * output's taps of that row added to acc[j]: taps 0-3 as (w0, w2).(x0, x2) + (w1, w3).(x1, x3), then w4 x4
 * (5 wide) or (w4, w6).(x4, x6) + w5 x5 from a half word and a byte (7 wide: no byte past the window). */
static int32_t dw_wide(const int8_t *const *rows, const int8_t *wk, int32_t kh, int32_t kw, int32_t st, int32_t n,
                       int32_t *acc) {
    int32_t ky, j;
    if (kw != 5 && kw != 7) return 0;
    for (ky = 0; ky < kh; ky++) {
        const int8_t *w = wk + ky * kw, *r = rows[ky];
        uint32_t we, wo, xe, xo;
        WIDEN(load32(w), we, wo);
        if (kw == 5) {
            const int32_t w4 = w[4];
            for (j = 0; j < n; j++, r += st) {
                WIDEN(load32(r), xe, xo);
                acc[j] = SMLAD(we, xe, SMLAD(wo, xo, acc[j])) + w4 * r[4];
            }
        } else {
            const uint32_t p46 = pack_lo((uint32_t)(int32_t)w[4], (uint32_t)(int32_t)w[6]);
            const int32_t w5 = w[5];
            for (j = 0; j < n; j++, r += st) {
                int32_t s;
                WIDEN(load32(r), xe, xo);
                s = SMLAD(we, xe, SMLAD(wo, xo, acc[j]));
                WIDEN(load16(r + 4) | (uint32_t)(uint8_t)r[6] << 16, xe, xo);
                acc[j] = __smlabb(w5, (int32_t)xo, SMLAD(p46, xe, s));
            }
        }
    }
    return n;
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

/* Each four k: (a[k], a[k+2]), (b[k], b[k+2]), (a[k+1], a[k+3]), (b[k+1], b[k+3]) as int16 pairs, the pairs
 * FT_PAIR_X makes of the inputs */
void ft_pair_prepare(const int8_t *w, int32_t w_row, int32_t w_k, int32_t depth, uint32_t *prep) {
    int32_t k;
    for (k = 0; k + 4 <= depth; k += 4, prep += 4) {
        const int8_t *a = w + (size_t)k * w_k, *b = a + w_row;
        prep[0] = pack_lo((uint32_t)(int32_t)a[0], (uint32_t)(int32_t)a[2 * w_k]);
        prep[1] = pack_lo((uint32_t)(int32_t)b[0], (uint32_t)(int32_t)b[2 * w_k]);
        prep[2] = pack_lo((uint32_t)(int32_t)a[w_k], (uint32_t)(int32_t)a[3 * w_k]);
        prep[3] = pack_lo((uint32_t)(int32_t)b[w_k], (uint32_t)(int32_t)b[3 * w_k]);
    }
}

/* 25 instructions per 16 MACs: the weights come two words at a time (LDRD) instead of from eight bytes */
static __attribute__((noinline)) void mac_2x2_prepared(const uint32_t *prep, const int8_t *x, int32_t x_k,
                                                        int32_t groups, int32_t *a, int32_t *b) {
    int32_t a0 = 0, a1 = 0, b0 = 0, b1 = 0;
    const int8_t *end = x + (size_t)groups * 4 * x_k;
    uint32_t t0, t1, t2, t3, t4, t5, t6;
    if (groups)
        __asm__ volatile("1:\n\t" FT_PAIR_X
                         "ldrd   %[t2], %[t3], [%[p]], #16\n\t"
                         "ldrd   %[t4], %[t5], [%[p], #-8]\n\t"
                         "sxtb16 %[t6], %[t0]\n\t"
                         "smlad  %[a0], %[t2], %[t6], %[a0]\n\t"
                         "smlad  %[b0], %[t3], %[t6], %[b0]\n\t"
                         "sxtb16 %[t0], %[t0], ror #8\n\t"
                         "smlad  %[a1], %[t2], %[t0], %[a1]\n\t"
                         "smlad  %[b1], %[t3], %[t0], %[b1]\n\t"
                         "sxtb16 %[t6], %[t1]\n\t"
                         "smlad  %[a0], %[t4], %[t6], %[a0]\n\t"
                         "smlad  %[b0], %[t5], %[t6], %[b0]\n\t"
                         "sxtb16 %[t1], %[t1], ror #8\n\t"
                         "smlad  %[a1], %[t4], %[t1], %[a1]\n\t"
                         "smlad  %[b1], %[t5], %[t1], %[b1]\n\t"
                         "ldr    %[t6], %[end]\n\t"
                         "cmp    %[x], %[t6]\n\t"
                         "bne    1b\n\t"
                         : [a0] "+r"(a0), [a1] "+r"(a1), [b0] "+r"(b0), [b1] "+r"(b1), [x] "+r"(x), [p] "+r"(prep),
                           [t0] "=&r"(t0), [t1] "=&r"(t1), [t2] "=&r"(t2), [t3] "=&r"(t3), [t4] "=&r"(t4),
                           [t5] "=&r"(t5), [t6] "=&r"(t6)
                         : [xk] "r"(x_k), [end] "m"(end)
                         : "cc", "memory");
    a[0] = a0, a[1] = a1, b[0] = b0, b[1] = b1;
}

void ft_mac_block_prepared(const uint32_t *prep, const int8_t *w, int32_t w_row, int32_t w_k, const int8_t *x,
                           int32_t x_k, int32_t depth, int32_t pixels, int32_t acc[2 * FT_PIX]) {
    const int32_t head = depth & ~3;
    int32_t j, k;
    for (j = 0; j + 2 <= pixels; j += 2)
        mac_2x2_prepared(prep, x + j, x_k, head / 4, acc + j, acc + FT_PIX + j);
    if (j < pixels) { /* the last pixel of an odd block: its inputs paired as the prepared weights are */
        const uint32_t *p = prep;
        const int8_t *xj = x + j;
        int32_t sa = 0, sb = 0;
        for (k = 0; k < head; k += 4, p += 4, xj += 4 * (size_t)x_k) {
            const uint32_t e = pack_lo((uint32_t)(int32_t)xj[0], (uint32_t)(int32_t)xj[2 * (size_t)x_k]);
            const uint32_t o = pack_lo((uint32_t)(int32_t)xj[x_k], (uint32_t)(int32_t)xj[3 * (size_t)x_k]);
            sa = SMLAD(p[0], e, SMLAD(p[2], o, sa));
            sb = SMLAD(p[1], e, SMLAD(p[3], o, sb));
        }
        acc[j] = sa, acc[FT_PIX + j] = sb;
    }
    for (k = head; k < depth; k++) {
        const int8_t *xk = x + (size_t)k * x_k;
        const int32_t wa = w[(size_t)k * w_k], wb = w[w_row + (size_t)k * w_k];
        int32_t p;
        for (p = 0; p < pixels; p++) acc[p] += wa * xk[p], acc[FT_PIX + p] += wb * xk[p];
    }
}

void ft_dot_s8_1x4(const int8_t *a, const int8_t *b, int32_t b_stride, int32_t n, int32_t out[4]) {
    const int8_t *b1 = b + b_stride, *b2 = b1 + b_stride, *b3 = b2 + b_stride;
    int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, i = 0;
    for (; i + 4 <= n; i += 4) { /* a widened once for four rows */
        uint32_t ae, ao, e, o;
        WIDEN(load32(a + i), ae, ao);
        WIDEN(load32(b + i), e, o);
        s0 = SMLAD(ae, e, SMLAD(ao, o, s0));
        WIDEN(load32(b1 + i), e, o);
        s1 = SMLAD(ae, e, SMLAD(ao, o, s1));
        WIDEN(load32(b2 + i), e, o);
        s2 = SMLAD(ae, e, SMLAD(ao, o, s2));
        WIDEN(load32(b3 + i), e, o);
        s3 = SMLAD(ae, e, SMLAD(ao, o, s3));
    }
    for (; i < n; i++) {
        const int32_t v = a[i];
        s0 += v * b[i], s1 += v * b1[i], s2 += v * b2[i], s3 += v * b3[i];
    }
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

#else /* portable */

void ft_dot_s8_1x4(const int8_t *a, const int8_t *b, int32_t b_stride, int32_t n, int32_t out[4]) {
    int32_t s;
    for (s = 0; s < 4; s++) out[s] = ft_dot_s8(a, b + (size_t)s * b_stride, n);
}


void ft_pair_prepare(const int8_t *w, int32_t w_row, int32_t w_k, int32_t depth, uint32_t *prep) {
    (void)w, (void)w_row, (void)w_k, (void)depth, (void)prep;
}

void ft_mac_block_prepared(const uint32_t *prep, const int8_t *w, int32_t w_row, int32_t w_k, const int8_t *x,
                           int32_t x_k, int32_t depth, int32_t pixels, int32_t acc[2 * FT_PIX]) {
    (void)prep;
    ft_mac_block(w, w_row, w_k, 2, x, x_k, depth, pixels, acc);
}


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
        if (rows == 2 && (w_k == 1 || w_row == 1)) /* two pixels at a time, nothing spilled */
            for (; done + 2 <= pixels; done += 2) {
                if (w_k == 1)
                    mac_2x2_rows(w, w_row, x + done, x_k, depth, acc + done, acc + FT_PIX + done);
                else
                    mac_2x2_columns(w, w_k, x + done, x_k, depth, acc + done, acc + FT_PIX + done);
            }
        for (; rows == 1 && done + 4 <= pixels; done += 4) mac_1x4(w, w_k, x + done, x_k, depth, acc + done);
        if (done == pixels) return;
        for (j = done; j < pixels; j++) acc[j] = acc[FT_PIX + j] = 0;
        for (k = 0; k < depth; k++) { /* the pixels left (two rows with other strides: every pixel) */
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
    else if (kw == 5 || kw == 7)
        j = dw_wide(rows, wk, kh, kw, stride, n, acc);
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

void ft_dw_scatter(const int8_t *q, int32_t oh, int32_t ow, const int8_t *wk, int32_t kh, int32_t kw,
                   int32_t stride, int32_t *acc, int32_t acc_w) {
    int32_t oy, ox, ky, kx;
#if FT_KERNELS_DSP
    if (kh == 3 && kw == 3) {
        dw3_scatter(q, oh, ow, wk, stride, acc, acc_w);
        return;
    }
#endif
    for (oy = 0; oy < oh; oy++)
        for (ox = 0; ox < ow; ox++) {
            const int32_t v = q[(size_t)oy * ow + ox];
            int32_t *a = acc + ((size_t)oy * acc_w + ox) * stride;
            if (!v) continue;
            for (ky = 0; ky < kh; ky++, a += acc_w)
                for (kx = 0; kx < kw; kx++) a[kx] += v * wk[ky * kw + kx];
        }
}

void ft_dw3_rows(const int8_t *x, int32_t w, const int8_t *wk, int32_t stride, int32_t rows, int32_t n,
                 int32_t *acc) {
    int32_t r, j, ky, kx;
#if FT_KERNELS_DSP
    if (stride == 1 || stride == 2) {
        dw3_rows(x, w, wk, stride, rows, n, acc);
        return;
    }
#endif
    for (r = 0; r < rows; r++)
        for (j = 0; j < n; j++) {
            const int8_t *t = x + (size_t)r * stride * w + (size_t)j * stride;
            int32_t s = 0;
            for (ky = 0; ky < 3; ky++)
                for (kx = 0; kx < 3; kx++) s += (int32_t)wk[ky * 3 + kx] * t[(size_t)ky * w + kx];
            acc[r * n + j] = s;
        }
}
