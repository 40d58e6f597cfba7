/* fedtiny's exact training step: the int8 forward of every op kind, TFLM's arithmetic (fedtiny_step_internal.h).
 * The forward a training step runs keeps what its backward reads (clamp masks, trained channels' inputs, the
 * saved inputs of ops without parameters); inference (ft_forward) keeps nothing. */
#include <stddef.h>
#include <string.h>

#include "fedtiny_int8.h"
#include "fedtiny_kernels.h"
#include "fedtiny_step_internal.h"

/* One output channel's requantization, held in locals: an int8 store may alias anything, so values read
 * through op would be reloaded after every output. TFLM's shift is split once into its left shift and
 * RoundingDivideByPOT's exponent e. With 1 <= e <= 22 (every layer seen so far) the two roundings are
 * taken as one, with the zero point and the clamp's lower bound folded into the offset (store_output). */
typedef struct {
    int32_t mult, left, e, zero, lo, hi;
    uint32_t klo, range; /* 1 <= e <= 22: the offset's low word; hi - lo */
    int32_t khi;         /* and its high word */
    int32_t narrow;      /* every x = acc + folded is below 2^30 in magnitude (requant_bound): ft_requant_row */
} requant_t;

static inline requant_t requant_make(int32_t mult, int32_t shift, int32_t zero, int32_t lo, int32_t hi) {
    requant_t r;
    r.mult = mult, r.zero = zero, r.lo = lo, r.hi = hi, r.range = (uint32_t)(hi - lo);
    r.left = shift > 0 ? shift : 0, r.e = shift > 0 ? 0 : -shift;
    /* 2^30 + 2^(30+e) + (zero - lo) 2^(31+e) as two words (|zero - lo| < 2^9: below 2^62 for e <= 22) */
    r.klo = r.e == 1 ? 0xC0000000u : 0x40000000u;
    r.khi = (r.e >= 2 ? (int32_t)1 << (r.e - 2) : 0) + (int32_t)((uint32_t)(zero - lo) << (r.e >= 1 ? r.e - 1 : 0));
    r.narrow = 0;
    return r;
}

/* Marks r narrow when a sum of `depth` terms w (x - x_zero) (|w| <= 128, |x - x_zero| <= 255) plus the
 * channel's bias stays below 2^30 in magnitude: ft_requant_row may then double it in 32 bits. */
static inline void requant_bound(requant_t *r, int32_t bias, int32_t depth) {
    const int64_t most = (bias < 0 ? -(int64_t)bias : (int64_t)bias) + (int64_t)depth * 128 * 255;
    r->narrow = r->e >= 1 && r->e <= 22 && most < ((int64_t)1 << 30);
}

static inline requant_t requant_of(const ft_op *op, int32_t o) {
    return requant_make(op->mult[o], op->shift[o], op->y_zero, op->act_lo, op->act_hi);
}

/* ft_requant_row's constants of output channel o straight from the op, where a requant_t per pair of
 * outputs would cost more than the pair (requant_make and requant_bound in one): when the channel is narrow
 * (its shift a right shift e in 1..22, |bias| + `most` below 2^30, most = depth * 128 * 255), returns e and
 * sets k2 = 2 khi + [e == 1] = 2^(e-1) + (zero - lo) 2^e; otherwise returns 0. */
static inline int32_t requant_row_shift(const ft_op *op, int32_t o, uint32_t most, int32_t *k2) {
    const int32_t e = -op->shift[o], b = op->bias[o];
    const uint32_t mag = b < 0 ? 0u - (uint32_t)b : (uint32_t)b;
    if (e < 1 || e > 22 || most >= (1u << 30) || mag >= (1u << 30) - most) return 0;
    *k2 = (int32_t)((1u << (e - 1)) + ((uint32_t)(op->y_zero - op->act_lo) << e));
    return e;
}

static inline int32_t requant_fast(const requant_t *r) { return r->e >= 1 && r->e <= 22; }

/* TFLM's MultiplyByQuantizedMultiplier of one accumulator, plus the zero point, minus lo (requant_fast) or
 * plus the zero point (otherwise: ft_mbqm's arithmetic). The multiplier is in [0, 2^31) (valid_model): no
 * saturation case. With a right shift (e >= 1, no left shift) RoundingDivideByPOT(h, e), h = floor((x m +
 * 2^30) / 2^31), is floor((h + 2^(e-1) - [h < 0]) / 2^e) (ties away from zero), and nested floors of
 * divisions by powers of two are one: floor((x m + 2^30 + 2^(30+e) - [h < 0] 2^31) / 2^(31+e)), to which
 * adding (zero - lo) 2^(31+e) adds zero - lo. [h < 0] may be read as [x < 0]: they differ only where h = 0,
 * whose value the 2^31 cannot move (the sum stays in [0, 2^(31+e))). One multiply-accumulate and a shift of
 * its high word, where the two roundings took a dozen instructions. */
static inline int32_t requant_shifted(const requant_t *r, int32_t x) {
    const uint32_t neg = (uint32_t)x & 0x80000000u;
    const uint64_t k = ((uint64_t)(uint32_t)r->khi << 32 | r->klo) - neg;
    const int64_t t = (int64_t)x * r->mult + (int64_t)k;
    return (int32_t)(t >> 32) >> (r->e - 1);
}

static inline int32_t requant_value(const requant_t *r, int32_t acc) { /* the requantized value, zero point added */
    if (requant_fast(r)) return requant_shifted(r, acc) + r->lo;
    return ft_rdbpot((int32_t)(((int64_t)(int32_t)((uint32_t)acc << r->left) * r->mult + ((int64_t)1 << 30)) >> 31),
                     r->e) + r->zero;
}

int32_t ft_requantize(int32_t acc, int32_t mult, int32_t shift) {
    const requant_t r = requant_make(mult, shift, 0, -128, 127);
    return ft_valid_multiplier(mult, shift) ? requant_value(&r, acc) : 0;
}

/* One output: the requantization, the clamp, and the mask bit the backward reads (at: its index). */
static inline void store_output(const requant_t *r, int32_t acc, int8_t *y, uint8_t *mask, size_t at) {
    int32_t u = requant_fast(r) ? requant_shifted(r, acc) : requant_value(r, acc) - r->lo; /* v - lo */
    if (mask && (uint32_t)u <= r->range) mask[at >> 3] |= (uint8_t)(1u << (at & 7));
    u = u > (int32_t)r->range ? (int32_t)r->range : u;
    *y = (int8_t)((u & ~(u >> 31)) + r->lo);
}

/* Mask bits of up to 24 consecutive outputs (bit j: output at + j) OR-ed in a byte at a time. */
static void or_mask_bits(uint8_t *mask, size_t at, uint32_t bits) {
    uint8_t *m = mask + (at >> 3);
    for (bits <<= (at & 7); bits; bits >>= 8) *m++ |= (uint8_t)bits;
}

/* n <= 24 outputs of one channel: acc[j] + folded requantized into y[j], their mask bits (from index at)
 * gathered in a word and OR-ed in a byte at a time. Not inlined: one copy of the loop with the channel's
 * constants in registers serves every kernel's block. */
static __attribute__((noinline)) void store_outputs(const requant_t *rq, const int32_t *acc, int32_t n,
                                                     int32_t folded, int8_t *y, uint8_t *mask, size_t at) {
    const requant_t r = *rq;
    uint32_t bits = 0;
    int32_t j;
    if (r.narrow) {
        /* the offset 2K of 2x m: (2 khi + [e == 1]) 2^32 + 2^31 - [x < 0] 2^32 (requant_make's words doubled) */
        bits = ft_requant_row(acc, n, folded, r.mult, 2 * r.khi + (r.e == 1), r.e, r.range, r.lo, y);
    } else if (requant_fast(&r)) {
        for (j = 0; j < n; j++) {
            int32_t u = requant_shifted(&r, (int32_t)((uint32_t)acc[j] + (uint32_t)folded));
            bits = (bits >> 1) | (uint32_t)((uint32_t)u <= r.range) << 31; /* bit j lands at 32 - n + j */
            u = u > (int32_t)r.range ? (int32_t)r.range : u;
            y[j] = (int8_t)((u & ~(u >> 31)) + r.lo);
        }
        bits = n ? bits >> (32 - n) : 0;
    } else {
        for (j = 0; j < n; j++) {
            int32_t v = requant_value(&r, (int32_t)((uint32_t)acc[j] + (uint32_t)folded));
            bits |= (uint32_t)((uint32_t)(v - r.lo) <= r.range) << j;
            v = v < r.lo ? r.lo : v;
            y[j] = (int8_t)(v > r.hi ? r.hi : v);
        }
    }
    if (mask) or_mask_bits(mask, at, bits);
}

/* bias - x_zero * sum(w): TFLM's bias + sum w (x - x_zero) is this plus sum w x whenever every tap reads
 * the input (or x_zero, which a padded plane holds); computed mod 2^32 as TFLM's int32 sums are. */
static int32_t folded_bias(const ft_op *op, int32_t o, const int8_t *w, int32_t n) {
    return (int32_t)((uint32_t)op->bias[o] - (uint32_t)op->x_zero * (uint32_t)ft_sum_s8(w, n));
}

/* Output channel o of a convolution over a view of its input: the group's input planes at x (plane
 * stride h * w), padded by pad_t / pad_l (a zero-point-padded plane passes its own size and 0, 0). Writes
 * y[oy * ystride + ox] and the mask bit at mask_at + oy * ow + ox. Outputs whose window lies inside the
 * view are summed by ft_dw_row, FT_ROW_BLOCK at a time, with the offset folded into the bias; the border's
 * with bounds checks, as TFLM. */
static void conv_channel_view(const ft_op *op, const int8_t *x, int32_t h, int32_t w, int32_t pad_t, int32_t pad_l,
                              int32_t o, int8_t *y, int32_t ystride, uint8_t *mask, size_t mask_at) {
    const int32_t cpg = op->c / op->groups, kk = op->kh * op->kw, s = op->stride;
    const int8_t *wo = op->weight + (size_t)o * cpg * kk;
    const int32_t folded = folded_bias(op, o, wo, cpg * kk);
    requant_t rq = requant_of(op, o);
    requant_bound(&rq, op->bias[o], cpg * kk);
    /* the interior: iy0 = oy * s - pad_t >= 0 and iy0 + kh <= h (likewise x) */
    const int32_t oy_lo = (pad_t + s - 1) / s, ox_lo = (pad_l + s - 1) / s;
    int32_t oy_hi = h - op->kh + pad_t >= 0 ? (h - op->kh + pad_t) / s + 1 : 0;
    int32_t ox_hi = w - op->kw + pad_l >= 0 ? (w - op->kw + pad_l) / s + 1 : 0;
    const int dw3 = cpg == 1 && op->kh == 3 && op->kw == 3 && s <= 2; /* ft_dw3_rows' windows */
    int32_t oy, ox, ci, ky, kx, j;
    oy_hi = op->kh > FT_MAX_KH ? 0 : (oy_hi < op->oh ? oy_hi : op->oh);
    ox_hi = ox_hi < op->ow ? ox_hi : op->ow;
    if (ox_lo == 0 && ox_hi == op->ow && op->ow * 2 <= FT_ROW_BLOCK && ystride == op->ow) {
        /* whole rows inside and narrow (a padded plane of a small map): several rows a block, so that one
         * store serves them (the interior rows; the others below take the checked path) */
        const int32_t per = FT_ROW_BLOCK / op->ow;
        for (oy = oy_lo; oy < oy_hi; oy += per) {
            const int32_t nr = oy_hi - oy < per ? oy_hi - oy : per;
            int32_t acc[FT_ROW_BLOCK], r;
            const int8_t *rows[FT_MAX_KH];
            if (dw3) { /* the block in one call */
                ft_dw3_rows(x + (size_t)(oy * s - pad_t) * w - pad_l, w, wo, s, nr, op->ow, acc);
                store_outputs(&rq, acc, nr * op->ow, folded, y + (size_t)oy * ystride, mask,
                              mask_at + (size_t)oy * op->ow);
                continue;
            }
            for (j = 0; j < nr * op->ow; j++) acc[j] = 0;
            for (r = 0; r < nr; r++)
                for (ci = 0; ci < cpg; ci++) {
                    const int8_t *xc = x + (size_t)ci * h * w + (size_t)((oy + r) * s - pad_t) * w - pad_l;
                    for (ky = 0; ky < op->kh; ky++) rows[ky] = xc + (size_t)ky * w;
                    ft_dw_row(rows, wo + (size_t)ci * kk, op->kh, op->kw, s, op->ow, acc + r * op->ow);
                }
            store_outputs(&rq, acc, nr * op->ow, folded, y + (size_t)oy * ystride, mask, mask_at + (size_t)oy * op->ow);
        }
        if (oy_lo == 0 && oy_hi == op->oh) return;
    }
    for (oy = 0; oy < op->oh; oy++) {
        if (ox_lo == 0 && ox_hi == op->ow && op->ow * 2 <= FT_ROW_BLOCK && ystride == op->ow && oy >= oy_lo &&
            oy < oy_hi)
            continue; /* done above */
        const int interior_row = oy >= oy_lo && oy < oy_hi && ox_lo < ox_hi;
        for (ox = 0; ox < op->ow;) {
            if (interior_row && ox == ox_lo) { /* the row's interior, a block at a time */
                for (; ox < ox_hi; ox += FT_ROW_BLOCK) {
                    const int32_t n = ox_hi - ox < FT_ROW_BLOCK ? ox_hi - ox : FT_ROW_BLOCK;
                    int32_t acc[FT_ROW_BLOCK];
                    const int8_t *rows[FT_MAX_KH];
                    if (dw3) {
                        ft_dw3_rows(x + (size_t)(oy * s - pad_t) * w + (ox * s - pad_l), w, wo, s, 1, n, acc);
                    } else {
                        for (j = 0; j < n; j++) acc[j] = 0;
                        for (ci = 0; ci < cpg; ci++) {
                            const int8_t *xc = x + (size_t)ci * h * w + (size_t)(oy * s - pad_t) * w + (ox * s - pad_l);
                            for (ky = 0; ky < op->kh; ky++) rows[ky] = xc + (size_t)ky * w;
                            ft_dw_row(rows, wo + (size_t)ci * kk, op->kh, op->kw, s, n, acc);
                        }
                    }
                    store_outputs(&rq, acc, n, folded, y + (size_t)oy * ystride + ox, mask,
                                  mask_at + (size_t)oy * op->ow + ox);
                }
                ox = ox_hi;
                continue;
            }
            {
                int32_t acc = op->bias[o];
                for (ci = 0; ci < cpg; ci++) {
                    const int8_t *xc = x + (size_t)ci * h * w;
                    const int8_t *wk = wo + (size_t)ci * kk;
                    for (ky = 0; ky < op->kh; ky++) {
                        const int32_t iy = oy * s - pad_t + ky;
                        if (iy < 0 || iy >= h) continue;
                        for (kx = 0; kx < op->kw; kx++) {
                            const int32_t ix = ox * s - pad_l + kx;
                            if (ix < 0 || ix >= w) continue;
                            acc += (int32_t)wk[ky * op->kw + kx] * ((int32_t)xc[(size_t)iy * w + ix] - op->x_zero);
                        }
                    }
                }
                store_output(&rq, acc, y + (size_t)oy * ystride + ox, mask, mask_at + (size_t)oy * op->ow + ox);
            }
            ox++;
        }
    }
}

/* Output channel o of a convolution (one sample): y[oy * ystride + ox]; mask bits at mask_at + oy * ow + ox. */
static void conv_channel(const ft_op *op, const int8_t *x, int32_t o, int8_t *y, int32_t ystride, uint8_t *mask,
                         size_t mask_at) {
    const int32_t cpg = op->c / op->groups, g = o / (op->oc / op->groups);
    conv_channel_view(op, x + (size_t)g * cpg * op->h * op->w, op->h, op->w, op->pad_t, op->pad_l, o, y, ystride,
                      mask, mask_at);
}

/* Pixels p0 .. p0 + count - 1 of output channels o0 (.. o0 + rows - 1) of a pointwise convolution, FT_PIX at a
 * time; pixel p of channel o0 + r lands at y + r * ystep + p. */
static void pointwise_span(const ft_op *op, const int8_t *x, int32_t o0, int32_t rows, const requant_t *rq,
                           const int32_t *folded, int32_t p0, int32_t count, int8_t *y, ptrdiff_t ystep, uint8_t *mask,
                           const uint32_t *prep) {
    const int32_t hw = op->h * op->w;
    const int8_t *const w = op->weight + (size_t)o0 * op->c;
    int32_t acc[2 * FT_PIX], r, p;
    for (p = p0; p < p0 + count; p += FT_PIX) {
        const int32_t n = p0 + count - p < FT_PIX ? p0 + count - p : FT_PIX;
        if (prep && rows == 2)
            ft_mac_block_prepared(prep, w, op->c, 1, x + p, hw, op->c, n, acc);
        else
            ft_mac_block(w, op->c, 1, rows, x + p, hw, op->c, n, acc);
        for (r = 0; r < rows; r++)
            store_outputs(&rq[r], acc + r * FT_PIX, n, folded[r], y + r * ystep + p, mask, (size_t)(o0 + r) * hw + p);
    }
}

/* Output channels o0 .. o0 + rows - 1 (rows 1 or 2) of a pointwise convolution (or a fully connected layer,
 * h = w = 1): FT_PIX pixels at a time through ft_mac_block; channel o's plane at y + (o - o0) * ystep, its
 * rows ystride apart. */
static void pointwise_rows(const ft_op *op, const int8_t *x, int32_t o0, int32_t rows, int8_t *y, ptrdiff_t ystep,
                           int32_t ystride, uint8_t *mask, uint32_t *prep) {
    const int32_t hw = op->h * op->w, ow = op->ow;
    int32_t folded[2], acc[2], r;
    requant_t rq[2];
    for (r = 0; r < rows; r++) {
        folded[r] = folded_bias(op, o0 + r, op->weight + (size_t)(o0 + r) * op->c, op->c);
        rq[r] = requant_of(op, o0 + r);
        requant_bound(&rq[r], op->bias[o0 + r], op->c);
    }
    if (hw == 1) { /* a fully connected layer: dot products of weight rows with the input */
        if (rows == 2)
            ft_dot_s8_1x2(x, op->weight + (size_t)o0 * op->c, op->weight + (size_t)(o0 + 1) * op->c, op->c, acc);
        else
            acc[0] = ft_dot_s8(x, op->weight + (size_t)o0 * op->c, op->c);
        for (r = 0; r < rows; r++)
            store_output(&rq[r], (int32_t)((uint32_t)acc[r] + (uint32_t)folded[r]), y + r * ystep, mask,
                         (size_t)(o0 + r));
        return;
    }
    if (prep && rows == 2) ft_pair_prepare(op->weight + (size_t)o0 * op->c, op->c, 1, op->c, prep);
    if (ystride != ow) { /* rows of a wider plane (a fused pair's padded window): one output row at a time */
        int32_t oy;
        for (oy = 0; oy < op->oh; oy++)
            pointwise_span(op, x, o0, rows, rq, folded, oy * ow, ow, y + (size_t)oy * (ystride - ow), ystep, mask,
                           prep);
        return;
    }
    pointwise_span(op, x, o0, rows, rq, folded, 0, hw, y, ystep, mask, prep);
}

/* Output pixel p's inputs as a column (natural order ci, ky, kx, then ft_cols_prepare's): x - x_zero
 * inside the input, 0 in the padding (TFLM skips those taps). */
static void conv_column(const ft_op *op, const int8_t *x, int32_t p, int16_t *col) {
    const int32_t hw = op->h * op->w, oy = p / op->ow, ox = p % op->ow, kk = op->kh * op->kw;
    const int32_t iy0 = oy * op->stride - op->pad_t, ix0 = ox * op->stride - op->pad_l;
    int32_t ci, ky, kx;
    if (kk == 1) {
        const int8_t *xp = x + (size_t)iy0 * op->w + ix0;
        for (ci = 0; ci < op->c; ci++) col[ci] = (int16_t)(xp[(size_t)ci * hw] - op->x_zero);
    } else {
        const int inside_x = ix0 >= 0 && ix0 + op->kw <= op->w;
        for (ci = 0; ci < op->c; ci++)
            for (ky = 0; ky < op->kh; ky++) {
                const int32_t iy = iy0 + ky;
                const int8_t *xr = x + (size_t)ci * hw + (size_t)iy * op->w;
                if (iy < 0 || iy >= op->h) {
                    for (kx = 0; kx < op->kw; kx++) *col++ = 0;
                } else if (inside_x) {
                    for (kx = 0; kx < op->kw; kx++) *col++ = (int16_t)(xr[ix0 + kx] - op->x_zero);
                } else {
                    for (kx = 0; kx < op->kw; kx++, col++) {
                        const int32_t ix = ix0 + kx;
                        *col = (int16_t)(ix >= 0 && ix < op->w ? xr[ix] - op->x_zero : 0);
                    }
                }
            }
        col -= (size_t)op->c * kk;
    }
    ft_cols_prepare(col, op->c * kk);
}

/* A convolution whose groups are 1 (pointwise or regular, over planes of more than one pixel) by columns,
 * as CMSIS-NN's partial im2col: two output pixels' columns (int16, the planner's workspace of 2 x 2 x depth
 * bytes), then every pair of output channels against both by ft_mac_2x2_cols: bias + sum w (x - x_zero),
 * TFLM's sum, for four outputs per call. Returns 0 when this path does not apply, -2 without memory. */
static int conv_forward_cols(const ft_op *op, const int8_t *x, int8_t *y, uint8_t *mask, ft_arena *a) {
    const int32_t depth = op->c * op->kh * op->kw, ohw = op->oh * op->ow;
    const uint32_t most = (uint32_t)depth * 128u * 255u, range = (uint32_t)(op->act_hi - op->act_lo);
    int16_t *cols;
    int32_t p, o, r, j;
    /* below 32 input channels a pointwise layer's outputs cost more than its MACs: pointwise_rows' blocks
     * of eight pixels requantize a row at a time (measured on tiny-ir's 16-channel layers) */
    if (op->groups != 1 || ohw < 2 || op->workspace < 4 * depth || (ft_is_pointwise(op) && op->c < 32)) return 0;
    cols = (int16_t *)ft_take_uninit(a, (size_t)4 * depth);
    if (!cols) return -2;
    for (p = 0; p < ohw; p += 2) {
        const int32_t np = ohw - p < 2 ? ohw - p : 2;
        conv_column(op, x, p, cols);
        if (np == 2) conv_column(op, x, p + 1, cols + depth);
        for (o = 0; o < op->oc; o += 2) {
            const int32_t nr = op->oc - o < 2 ? op->oc - o : 2;
            int32_t acc[4];
            ft_mac_2x2_cols(op->weight + (size_t)o * depth, op->weight + (size_t)(o + nr - 1) * depth, cols,
                            cols + (np - 1) * depth, depth, acc);
            for (r = 0; r < nr; r++) {
                const uint32_t bias = (uint32_t)op->bias[o + r];
                const size_t at = (size_t)(o + r) * ohw + p;
                int32_t k2;
                const int32_t e = requant_row_shift(op, o + r, most, &k2);
                if (e) { /* the pixel pair's two outputs by the row kernel, their mask bits at once */
                    uint32_t bits = ft_requant_row(acc + 2 * r, np, (int32_t)bias, op->mult[o + r], k2, e, range,
                                                   op->act_lo, y + at);
                    if (mask) or_mask_bits(mask, at, bits);
                } else {
                    const requant_t rq = requant_of(op, o + r);
                    for (j = 0; j < np; j++)
                        store_output(&rq, (int32_t)((uint32_t)acc[2 * r + j] + bias), y + at + j, mask, at + j);
                }
            }
        }
    }
    ft_give(a, cols);
    return 1;
}

/* The zero-point-padded window a depthwise convolution reads: rows and columns its outputs reach. */
static void padded_dims(const ft_op *dw, int32_t *hp, int32_t *wp) {
    *hp = (dw->oh - 1) * dw->stride + dw->kh;
    *wp = (dw->ow - 1) * dw->stride + dw->kw;
}

/* Depthwise channel o over its padded plane (hp x wp, x_zero outside the input): padding adds
 * (x_zero - x_zero) * w = 0, as skipping it does; every output is an interior one. */
static void dw_channel(const ft_op *op, const int8_t *pad, int32_t hp, int32_t wp, int32_t o, int8_t *y,
                       uint8_t *mask, size_t mask_at) {
    conv_channel_view(op, pad, hp, wp, 0, 0, o, y, op->ow, mask, mask_at);
}

/* rows x cols values (src, rows src_stride apart) into a padded plane (hp x wp) at row pad_t, column pad_l,
 * everything else set to z (pad_t + rows <= hp, pad_l + cols <= wp). A forward copy, byte by byte: src may
 * lie in the plane itself at or beyond each row's destination (a fused pair's channel computed at the
 * plane's end), where every byte is read before a write reaches it. */
static void spread_rows(int8_t *pad, const int8_t *src, int32_t rows, int32_t cols, int32_t src_stride, int32_t hp,
                        int32_t wp, int32_t pad_t, int32_t pad_l, int8_t z) {
    const uint32_t z4 = (uint32_t)(uint8_t)z * 0x01010101u;
    int32_t y, i;
    for (i = 0; i + 4 <= pad_t * wp; i += 4) memcpy(pad + i, &z4, 4);
    for (; i < pad_t * wp; i++) pad[i] = z;
    for (y = 0; y < rows; y++) {
        int8_t *d = pad + (size_t)(y + pad_t) * wp;
        const int8_t *r = src + (size_t)y * src_stride;
        for (i = 0; i < pad_l; i++) d[i] = z;
        /* a word at a time (each word read before its bytes are written: the order of the byte loop) */
        for (i = 0; i + 4 <= cols; i += 4) {
            uint32_t v;
            memcpy(&v, r + i, 4);
            memcpy(d + pad_l + i, &v, 4);
        }
        for (; i < cols; i++) d[pad_l + i] = r[i];
        for (i = pad_l + cols; i < wp; i++) d[i] = z;
    }
    for (i = (pad_t + rows) * wp; i + 4 <= hp * wp; i += 4) memcpy(pad + i, &z4, 4);
    for (; i < hp * wp; i++) pad[i] = z;
}

/* Fill a padded plane with x_zero and copy the h x w plane `in` into it (clipped to the window). */
static void pad_plane(const ft_op *dw, const int8_t *in, int32_t hp, int32_t wp, int8_t *pad) {
    const int32_t cols = dw->w < wp - dw->pad_l ? dw->w : wp - dw->pad_l; /* the input columns inside the window */
    const int32_t fit = dw->h < hp - dw->pad_t ? dw->h : hp - dw->pad_t, rows = cols <= 0 || fit < 0 ? 0 : fit;
    int32_t y;
    if (hp * wp <= 256) { /* a small map's plane: byte loops cost less than the calls */
        spread_rows(pad, in, rows, cols, dw->w, hp, wp, dw->pad_t, dw->pad_l, (int8_t)dw->x_zero);
        return;
    }
    memset(pad, (int)(int8_t)dw->x_zero, (size_t)hp * wp);
    for (y = 0; y < rows; y++)
        memcpy(pad + (size_t)(y + dw->pad_t) * wp + dw->pad_l, in + (size_t)y * dw->w, (size_t)cols);
}

/* Every output channel of a convolution (one sample) into y (oc x oh x ow). */
static int conv_forward(const ft_op *op, const int8_t *x, int8_t *y, uint8_t *mask, ft_arena *a) {
    const size_t ohw = (size_t)op->oh * op->ow;
    int32_t o, hp, wp;
    int rc;
    padded_dims(op, &hp, &wp);
    if (op->groups == 1 && op->c == 1 && ohw > 1 && (int64_t)op->workspace >= (int64_t)hp * wp) {
        /* one input plane (the planner's workspace holds it padded): each output channel a depthwise window
         * over it (dw_channel's arithmetic) */
        int8_t *pad = (int8_t *)ft_take_uninit(a, (size_t)hp * wp);
        if (!pad) return -2;
        pad_plane(op, x, hp, wp, pad);
        for (o = 0; o < op->oc; o++) dw_channel(op, pad, hp, wp, o, y + (size_t)o * ohw, mask, (size_t)o * ohw);
        ft_give(a, pad);
        return 0;
    }
    rc = conv_forward_cols(op, x, y, mask, a);
    if (rc) return rc < 0 ? rc : 0;
    if (ft_is_pointwise(op)) {
        /* the planner's workspace (columns of 4 x c bytes) holds a row pair's prepared weights */
        uint32_t *prep = ohw > 1 && op->workspace >= 4 * op->c ? (uint32_t *)ft_take_uninit(a, (size_t)4 * op->c) : 0;
        for (o = 0; o < op->oc; o += 2)
            pointwise_rows(op, x, o, o + 1 < op->oc ? 2 : 1, y + (size_t)o * ohw, ohw, op->ow, mask, prep);
        ft_give(a, prep);
        return 0;
    }
    for (o = 0; o < op->oc; o++) conv_channel(op, x, o, y + (size_t)o * ohw, op->ow, mask, (size_t)o * ohw);
    return 0;
}

static size_t max_size(size_t a, size_t b) { return a > b ? a : b; }

/* One ADD input's scaling, MultiplyByQuantizedMultiplierSmallerThanOneExp((v - zero) 2^left, mult, -e) for e in
 * 0 .. 22, as one rounding of a 64-bit sum: x = (v - zero) 2^(left + pre), floor((x mult + k - [x < 0] n) / 2^32)
 * >> s. With e >= 1 these are requant_shifted's words (pre = 0, k = 2^30 + 2^(30+e), n = 2^31, s = e - 1); with
 * e = 0 the rounding is SRDHM's alone, floor((x mult + 2^30) / 2^31), taken with x doubled (pre = 1, k = 2^31,
 * n = 0, s = 0). |x| < 2^30 (left <= 20): no wrap. */
typedef struct {
    int32_t zero, left, mult, s;
    uint32_t neg, klo, khi;
} add_input_t;

static add_input_t add_input_of(int32_t zero, int32_t left, int32_t mult, int32_t shift) {
    add_input_t p;
    const requant_t r = requant_make(mult, shift, 0, 0, 0);
    p.zero = zero, p.mult = mult;
    p.left = left + (r.e == 0), p.s = r.e ? r.e - 1 : 0;
    p.neg = r.e ? 0x80000000u : 0u;
    p.klo = r.e ? r.klo : 0x80000000u, p.khi = r.e ? (uint32_t)r.khi : 0u;
    return p;
}

static inline int32_t add_input(const add_input_t p, int32_t v) {
    const int32_t x = (int32_t)((uint32_t)(v - p.zero) << p.left);
    const uint64_t k = ((uint64_t)p.khi << 32 | p.klo) - ((uint32_t)x & p.neg);
    return (int32_t)(((int64_t)x * p.mult + (int64_t)k) >> 32) >> p.s;
}

/* TFLM's int8 ADD: each input's offset value shifted left, scaled to the common scale, summed, scaled to the
 * output's (three MultiplyByQuantizedMultiplierSmallerThanOneExp, requant_value's arithmetic). */
static __attribute__((noinline)) void add_forward(const ft_op *op, const int8_t *a, const int8_t *b, size_t count,
                                                  int8_t *y, uint8_t *mask) {
    const requant_t r1 = requant_make(op->m1, op->s1, 0, 0, 0), r2 = requant_make(op->m2, op->s2, 0, 0, 0);
    requant_t ro = requant_make(op->mo, op->so, op->z_out, op->act_lo, op->act_hi);
    const int32_t z1 = op->z1, z2 = op->z2, left = op->left_shift;
    size_t i;
    /* the common case (TFLM's left shift of 20, multipliers below one): each scaled input is at most
     * |x| + 1 <= 255 2^20 + 1 in magnitude, their sum below 2^30: the output row kernel applies (narrow) */
    if (left <= 20 && r1.left == 0 && r1.e <= 22 && r2.left == 0 && r2.e <= 22 && requant_fast(&ro)) {
        const add_input_t p1 = add_input_of(z1, left, op->m1, op->s1), p2 = add_input_of(z2, left, op->m2, op->s2);
        int32_t acc[FT_ROW_BLOCK], j;
        ro.narrow = 1;
        for (i = 0; i < count; i += FT_ROW_BLOCK) {
            const int32_t n = count - i < FT_ROW_BLOCK ? (int32_t)(count - i) : FT_ROW_BLOCK;
            for (j = 0; j < n; j++) acc[j] = add_input(p1, a[i + j]) + add_input(p2, b[i + j]);
            store_outputs(&ro, acc, n, 0, y + i, mask, i);
        }
        return;
    }
    for (i = 0; i < count; i++) {
        const int32_t x1 = (int32_t)((uint32_t)((int32_t)a[i] - z1) << left);
        const int32_t x2 = (int32_t)((uint32_t)((int32_t)b[i] - z2) << left);
        store_output(&ro, requant_value(&r1, x1) + requant_value(&r2, x2), y + i, mask, i);
    }
}

/* TFLM's int8 AVERAGE_POOL_2D: each window's sum over its taps inside the input (padded taps neither added nor
 * counted), divided by their count with C's truncating division of s +- count / 2 (half away from zero), clamped
 * to int8. The global pool is the window of the whole plane at stride 1. valid_elementwise keeps a tap inside
 * every window. */
static void pool_forward(const ft_op *op, const int8_t *x, int8_t *y) {
    const int32_t s = op->stride, hw = op->h * op->w;
    int32_t c, oy, ox, iy, ix;
    size_t at = 0;
    for (c = 0; c < op->c; c++) {
        const int8_t *xc = x + (size_t)c * hw;
        for (oy = 0; oy < op->oh; oy++) {
            int32_t y_lo, y_hi, x_lo, x_hi;
            ft_pool_window(oy, s, op->pad_t, op->kh, op->h, &y_lo, &y_hi);
            for (ox = 0; ox < op->ow; ox++, at++) {
                ft_pool_window(ox, s, op->pad_l, op->kw, op->w, &x_lo, &x_hi);
                const int32_t count = (y_hi - y_lo) * (x_hi - x_lo);
                int32_t sum = 0, v;
                for (iy = y_lo; iy < y_hi; iy++)
                    for (ix = x_lo; ix < x_hi; ix++) sum += xc[(size_t)iy * op->w + ix];
                v = sum > 0 ? (sum + count / 2) / count : (sum - count / 2) / count;
                y[at] = (int8_t)(v < -128 ? -128 : (v > 127 ? 127 : v));
            }
        }
    }
}

/* TFLM's int8 MAX_POOL_2D: the running max of each window's taps inside the input (from -128), clamped to
 * the fused activation's range. taps (one byte per output; NULL: none kept): the first tap in row-major
 * order holding the window's maximum, or 255 where the clamp changed the output or no tap lies inside
 * (the backward passes nothing there). */
static void maxpool_forward(const ft_op *op, const int8_t *x, int8_t *y, uint8_t *taps) {
    const int32_t s = op->stride, hw = op->h * op->w;
    int32_t c, oy, ox, ky, kx;
    size_t at = 0;
    for (c = 0; c < op->c; c++) {
        const int8_t *xc = x + (size_t)c * hw;
        for (oy = 0; oy < op->oh; oy++)
            for (ox = 0; ox < op->ow; ox++, at++) {
                int32_t best = -129, tap = 255; /* below any int8: the first tap inside takes it */
                for (ky = 0; ky < op->kh; ky++) {
                    const int32_t iy = oy * s - op->pad_t + ky;
                    if (iy < 0 || iy >= op->h) continue;
                    for (kx = 0; kx < op->kw; kx++) {
                        const int32_t ix = ox * s - op->pad_l + kx;
                        if (ix >= 0 && ix < op->w && xc[iy * op->w + ix] > best) {
                            best = xc[iy * op->w + ix];
                            tap = ky * op->kw + kx;
                        }
                    }
                }
                if (taps) taps[at] = (uint8_t)(best >= op->act_lo && best <= op->act_hi ? tap : 255);
                best = best < -128 ? -128 : best;
                best = best < op->act_lo ? op->act_lo : (best > op->act_hi ? op->act_hi : best);
                y[at] = (int8_t)best;
            }
    }
}

/* TFLM's int8 MEAN over a channel's plane (QuantizedMeanOrSum): S = sum x (int32), d = S - x_zero count,
 * y = clamp(MultiplyByQuantizedMultiplier(d, mo, so) + z_out, -128, 127), the multiplier with 1 / count
 * folded in. */
static void mean_forward(const ft_op *op, const int8_t *x, int8_t *y) {
    const int32_t count = op->h * op->w;
    const requant_t r = requant_make(op->mo, op->so, op->z_out, -128, 127);
    int32_t c, i;
    for (c = 0; c < op->c; c++) {
        const int8_t *xc = x + (size_t)c * count;
        int32_t sum = 0, v;
        for (i = 0; i < count; i++) sum += xc[i];
        v = requant_value(&r, (int32_t)((uint32_t)sum - (uint32_t)op->z1 * (uint32_t)count));
        y[c] = (int8_t)(v < -128 ? -128 : (v > 127 ? 127 : v));
    }
}

/* TFLM's int8 MUL: y = clamp(MultiplyByQuantizedMultiplier((a - z1)(b - z2), mo, so) + z_out, act_lo, act_hi)
 * with the clamp's mask; b holds one value per channel (b_hw 1: broadcast over the plane) or a whole
 * plane (b_hw = oh ow). */
static void mul_forward(const ft_op *op, const int8_t *a, const int8_t *b, int32_t b_hw, int8_t *y, uint8_t *mask) {
    const requant_t r = requant_make(op->mo, op->so, op->z_out, op->act_lo, op->act_hi);
    const int32_t hw = op->oh * op->ow;
    int32_t c, p;
    size_t at = 0;
    for (c = 0; c < op->oc; c++)
        for (p = 0; p < hw; p++, at++) {
            const int32_t bv = b[b_hw == 1 ? (size_t)c : at];
            store_output(&r, ((int32_t)a[at] - op->z1) * (bv - op->z2), y + at, mask, at);
        }
}

/* TFLM's int8 CONCATENATION along channels: each input's planes copied after the previous input's (every
 * input has the output's quantization). */
static void concat_forward(const ft_model *m, const ft_op *op, int8_t *const *act, int8_t *y) {
    int32_t ins[FT_MAX_INPUTS], n, k;
    size_t at = 0;
    n = ft_op_inputs(op, ins);
    for (k = 0; k < n; k++) {
        const size_t size = (size_t)ft_out_size(m, ins[k]);
        memcpy(y + at, act[ins[k]], size);
        at += size;
    }
}

/* An elementwise lookup (LOGISTIC, HARD_SWISH, an int8 QUANTIZE): y = table[x + 128]. */
static void lookup_forward(const ft_op *op, const int8_t *x, size_t count, int8_t *y) {
    const int8_t *const table = op->table;
    size_t i;
    for (i = 0; i < count; i++) y[i] = table[(int32_t)x[i] + 128];
}

/* STRIDED_SLICE: output (c, y, x) copied from input (begin_c + c step_c, begin_h + y step_h, begin_w + x step_w). */
static void slice_forward(const ft_op *op, const int8_t *x, int8_t *y) {
    int32_t c, oy, ox;
    size_t at = 0;
    for (c = 0; c < op->oc; c++) {
        const int8_t *xc = x + (size_t)(op->begin_c + c * op->step_c) * op->h * op->w;
        for (oy = 0; oy < op->oh; oy++) {
            const int8_t *xr = xc + (size_t)(op->begin_h + oy * op->step_h) * op->w + op->begin_w;
            for (ox = 0; ox < op->ow; ox++, at++) y[at] = xr[(size_t)ox * op->step_w];
        }
    }
}

/* RESIZE_NEAREST_NEIGHBOR by integer factors fy = oh / h, fx = ow / w (TFLM's without align_corners or half-pixel
 * centers; valid_elementwise checks the factors): output (c, y, x) copies input (c, y / fy, x / fx). */
static void resize_forward(const ft_op *op, const int8_t *x, int8_t *y) {
    const int32_t fy = op->oh / op->h, fx = op->ow / op->w;
    int32_t c, oy, ox;
    size_t at = 0;
    for (c = 0; c < op->c; c++)
        for (oy = 0; oy < op->oh; oy++) {
            const int8_t *xr = x + ((size_t)c * op->h + (size_t)(oy / fy)) * op->w;
            for (ox = 0; ox < op->ow; ox++, at++) y[at] = xr[ox / fx];
        }
}

/* Whether a fused pair can expand two channels at a time: a pointwise expansion whose channel plane fits the
 * depthwise reader's padded plane (hp x wp) at the padding's offset, and a workspace that holds the prepared
 * weights (4 c bytes) and that plane. The second channel waits in a spare plane: at stride 1 the workspace's
 * output plane (an expanded plane's size), at stride 2 the output's planes not yet written (fused_spare). */
static int fused_pairs(const ft_op *op, const ft_op *dw, int32_t hp, int32_t wp) {
    const int64_t hw = (int64_t)op->oh * op->ow;
    return ft_is_pointwise(op) && dw->c >= 2 && op->oh + dw->pad_t <= hp && op->ow + dw->pad_l <= wp &&
           (int64_t)op->workspace >= 4 * (int64_t)op->c + (int64_t)hp * wp + (dw->stride == 1 ? hw : 0);
}

/* Where expanded channel e + 1 waits while channel e is read: the workspace's spare plane at stride 1; at
 * stride 2, the output planes from e + 1 on (written only after channel e + 1 is spread, which reads it
 * whole first) when they hold an expanded plane; else NULL (one channel at a time). */
static int8_t *fused_spare(const ft_op *op, const ft_op *dw, int32_t e, int8_t *ws_spare, int8_t *y) {
    const size_t hw = (size_t)op->oh * op->ow, dohw = (size_t)dw->oh * dw->ow;
    if (dw->stride == 1) return ws_spare;
    return (size_t)(dw->c - e - 1) * dohw >= hw ? y + (size_t)(e + 1) * dohw : 0;
}

/* The fused pair two expanded channels at a time, in the workspace as [prepared weights: 4 c bytes][padded
 * plane: hp x wp][spare plane at stride 1: oh x ow]: both channels through the prepared two-row kernel, the
 * first computed at the padded plane's end, the second in the spare plane (fused_spare), each spread into the
 * padded plane (spread_rows) before its depthwise channel. Channels without a spare go one at a time. */
static void fused_forward_pairs(const ft_op *op, const ft_op *dw, int32_t index, const int8_t *x, int8_t *y,
                                int8_t *ws, int32_t hp, int32_t wp) {
    const size_t hw = (size_t)op->oh * op->ow, dohw = (size_t)dw->oh * dw->ow;
    uint32_t *const prep = (uint32_t *)ws;
    int8_t *const plane = ws + (size_t)4 * op->c, *const compact = plane + (size_t)hp * wp - hw;
    int8_t *const ws_spare = plane + (size_t)hp * wp;
    const int8_t z = (int8_t)dw->x_zero;
    int32_t e;
    for (e = 0; e < dw->c;) {
        int8_t *const spare = e + 1 < dw->c ? fused_spare(op, dw, e, ws_spare, y) : 0;
        const int32_t rows = spare ? 2 : 1;
        {
            PROFILE_BEGIN(t_pw);
            pointwise_rows(op, x, e, rows, compact, rows == 2 ? spare - compact : 0, op->ow, 0, rows == 2 ? prep : 0);
            spread_rows(plane, compact, op->oh, op->ow, op->ow, hp, wp, dw->pad_t, dw->pad_l, z);
            PROFILE_END(t_pw, index, FT_PART_FORWARD);
        }
        {
            PROFILE_BEGIN(t_dw);
            dw_channel(dw, plane, hp, wp, e, y + (size_t)e * dohw, 0, 0);
            PROFILE_END(t_dw, index + 1, FT_PART_FORWARD);
        }
        if (rows == 2) {
            {
                PROFILE_BEGIN(t_pw2);
                spread_rows(plane, spare, op->oh, op->ow, op->ow, hp, wp, dw->pad_t, dw->pad_l, z);
                PROFILE_END(t_pw2, index, FT_PART_FORWARD);
            }
            {
                PROFILE_BEGIN(t_dw2);
                dw_channel(dw, plane, hp, wp, e + 1, y + (size_t)(e + 1) * dohw, 0, 0);
                PROFILE_END(t_dw2, index + 1, FT_PART_FORWARD);
            }
        }
        e += rows;
    }
}

/* A frozen pointwise expansion (op) and its depthwise reader (dw) run one expanded channel at a time:
 * the expanded tensor never exists whole (the planner's fused pair). */
static int fused_forward(const ft_op *op, const ft_op *dw, int32_t index, const int8_t *x, int8_t *y, ft_arena *a) {
    int32_t hp, wp, e;
    int8_t *pad;
    padded_dims(dw, &hp, &wp);
    pad = (int8_t *)ft_take_uninit(a, max_size((size_t)op->workspace, (size_t)hp * wp));
    if (!pad) return -2;
    if (fused_pairs(op, dw, hp, wp)) {
        fused_forward_pairs(op, dw, index, x, y, pad, hp, wp);
        ft_give(a, pad);
        return 0;
    }
    for (e = 0; e < dw->c; e++) {
        PROFILE_BEGIN(t_pw);
        if (op->oh + dw->pad_t <= hp && op->ow + dw->pad_l <= wp && ft_is_pointwise(op) && op->ow % FT_PIX) {
            /* rows not a whole number of blocks: the channel computed as one span at the plane's end, then
             * moved into its padded rows (each lands at or below where it is read from) */
            const size_t hw = (size_t)op->oh * op->ow;
            int8_t *const compact = pad + (size_t)hp * wp - hw;
            pointwise_rows(op, x, e, 1, compact, 0, op->ow, 0, 0);
            spread_rows(pad, compact, op->oh, op->ow, op->ow, hp, wp, dw->pad_t, dw->pad_l, (int8_t)dw->x_zero);
        } else {
        memset(pad, (int)(int8_t)dw->x_zero, (size_t)hp * wp);
        /* the pointwise channel e lands inside the padding; rows/columns beyond the window are not read */
        if (op->oh + dw->pad_t <= hp && op->ow + dw->pad_l <= wp) {
            if (ft_is_pointwise(op))
                pointwise_rows(op, x, e, 1, pad + (size_t)dw->pad_t * wp + dw->pad_l, 0, wp, 0, 0);
            else
                conv_channel(op, x, e, pad + (size_t)dw->pad_t * wp + dw->pad_l, wp, 0, 0);
        } else { /* a window narrower than the plane: compute the channel in the output plane, then pad */
            int8_t *plane = (int8_t *)ft_take_uninit(a, (size_t)op->oh * op->ow);
            if (!plane) return -2;
            if (ft_is_pointwise(op))
                pointwise_rows(op, x, e, 1, plane, 0, op->ow, 0, 0);
            else
                conv_channel(op, x, e, plane, op->ow, 0, 0);
            pad_plane(dw, plane, hp, wp, pad);
            ft_give(a, plane);
        }
        }
        PROFILE_END(t_pw, index, FT_PART_FORWARD);
        {
            PROFILE_BEGIN(t_dw);
            dw_channel(dw, pad, hp, wp, e, y + (size_t)e * dw->oh * dw->ow, 0, 0);
            PROFILE_END(t_dw, index + 1, FT_PART_FORWARD);
        }
    }
    ft_give(a, pad);
    return 0;
}

/* A depthwise convolution, each channel through the padded workspace (the planner's) so that every output is
 * an interior one. In place (y == x, the input's last reader) the workspace also holds the channel's output
 * plane, written back over the input: output plane o ends before input plane o + 1 starts (ohw <= hw). */
static int dw_forward(const ft_op *op, int8_t *x, int8_t *y, uint8_t *mask, ft_arena *a) {
    const size_t ohw = (size_t)op->oh * op->ow;
    const int inplace = y == x;
    int32_t hp, wp, o;
    int8_t *pad;
    padded_dims(op, &hp, &wp);
    pad = (int8_t *)ft_take_uninit(a, max_size((size_t)op->workspace, (size_t)hp * wp + (inplace ? ohw : 0)));
    if (!pad) return -2;
    for (o = 0; o < op->c; o++) {
        int8_t *out = inplace ? pad + (size_t)hp * wp : y + (size_t)o * ohw;
        pad_plane(op, x + (size_t)o * op->h * op->w, hp, wp, pad);
        dw_channel(op, pad, hp, wp, o, out, mask, (size_t)o * ohw);
        if (inplace) memcpy(x + (size_t)o * ohw, out, ohw);
    }
    ft_give(a, pad);
    return 0;
}

/* Bytes an op without parameters keeps for its backward (a gradient flows through it), as the memory planner
 * counts them (the op's saved_bytes; a MUL's mask is its own block, as every mask): MUL both int8 inputs,
 * a lookup its int8 input, MAX_POOL_2D one tap byte per output. */
static size_t saved_bytes(const ft_model *m, const ft_op *op) {
    const size_t count = (size_t)op->oc * op->oh * op->ow;
    if (op->kind == FT_OP_MUL) return count + (size_t)ft_out_size(m, op->in1);
    if (op->kind == FT_OP_LOOKUP || op->kind == FT_OP_MAXPOOL) return count;
    return 0;
}

/* One op without parameters (any kind but CONV) on one sample's buffers: output y, mask (MUL, ADD), saved
 * (what saved_bytes sizes, NULL: nothing kept). */
static void elementwise_forward(const ft_model *m, const ft_op *op, ft_buffers *b, int8_t *y, uint8_t *mask,
                                int8_t *saved) {
    const size_t count = (size_t)op->oc * op->oh * op->ow;
    const int8_t *x = b->act[op->in0];
    switch (op->kind) {
    case FT_OP_ADD: add_forward(op, x, b->act[op->in1], count, y, mask); break;
    case FT_OP_POOL: pool_forward(op, x, y); break;
    case FT_OP_MAXPOOL: maxpool_forward(op, x, y, (uint8_t *)saved); break;
    case FT_OP_MEAN: mean_forward(op, x, y); break;
    case FT_OP_MUL: {
        const size_t nb = (size_t)ft_out_size(m, op->in1);
        mul_forward(op, x, b->act[op->in1], nb == count ? op->oh * op->ow : 1, y, mask);
        if (saved) { /* the inputs, for the other's gradient */
            memcpy(saved, x, count);
            memcpy(saved + count, b->act[op->in1], nb);
        }
        break;
    }
    case FT_OP_CONCAT: concat_forward(m, op, b->act, y); break;
    case FT_OP_LOOKUP:
        lookup_forward(op, x, count, y);
        if (saved) memcpy(saved, x, count); /* the input, to look its slope up */
        break;
    case FT_OP_SLICE: slice_forward(op, x, y); break;
    case FT_OP_RESIZE: resize_forward(op, x, y); break;
    default: break;
    }
}

/* One sample's forward. needs[t]: a gradient reaches tensor t (NULL: inference). Activations are freed
 * after their last reader; what the backward needs is kept: masks (bits), trained channels' inputs, and
 * what saved_bytes says for the ops without parameters. */
int ft_run_forward(const ft_model *m, const int8_t *x, const uint8_t *needs, ft_arena *a, ft_buffers *b) {
    int32_t i, t, k, n_in, ins[FT_MAX_INPUTS];
    b->act[0] = (int8_t *)x;
    for (t = 0; t <= m->n_ops; t++) b->last[t] = -1;
    for (i = 0; i < m->n_ops; i++)
        for (k = 0, n_in = ft_op_inputs(&m->ops[i], ins); k < n_in; k++) b->last[ins[k]] = i;
    for (i = 0; i < m->n_ops; i++) {
        const ft_op *op = &m->ops[i];
        const size_t count = (size_t)ft_out_size(m, i + 1);
        const int flows = needs && needs[i + 1];
        const int grads = flows && (op->kind == FT_OP_CONV || op->kind == FT_OP_ADD || op->kind == FT_OP_MUL);
        const int inplace = op->kind == FT_OP_CONV && op->inplace && op->in0 > 0 && b->last[op->in0] == i;
        int rc = 0;
        if (op->kind == FT_OP_CONV && op->fuse_next && i + 1 < m->n_ops) { /* the pair writes tensor i + 2 */
            const ft_op *dw = &m->ops[i + 1];
            b->act[i + 2] = (int8_t *)ft_take_uninit(a, (size_t)ft_out_size(m, i + 2));
            if (a->base == 0) {
                ft_take(a, max_size((size_t)op->workspace, (size_t)(dw->oh + dw->kh) * (dw->ow + dw->kw) * 2));
            } else {
                if (!b->act[i + 2]) return -2;
                rc = fused_forward(op, dw, i, b->act[op->in0], b->act[i + 2], a);
                if (rc) return rc;
                if (needs) CHECK_TENSOR(a, i + 1, FT_CHECK_OUTPUT, b->act[i + 2], (size_t)ft_out_size(m, i + 2));
            }
            if (op->in0 > 0 && b->last[op->in0] == i) {
                ft_give(a, b->act[op->in0]);
                b->act[op->in0] = 0;
            }
            i++;
            continue;
        }
        b->act[i + 1] = inplace ? b->act[op->in0] : (int8_t *)ft_take_uninit(a, count);
        b->mask[i + 1] = grads ? (uint8_t *)ft_take(a, (count + 7) / 8) : 0;
        b->saved[i] = 0;
        if (needs && op->kind == FT_OP_CONV && op->train_w) { /* the input channels the weight gradient reads */
            const size_t hw = (size_t)op->h * op->w;
            int32_t ch;
            k = 0;
            for (ch = 0; ch < op->c; ch++) k += ft_channel_trained(op, ch);
            b->saved[i] = (int8_t *)ft_take_uninit(a, (size_t)k * hw);
            if (a->base && b->saved[i])
                for (ch = 0, k = 0; ch < op->c; ch++)
                    if (ft_channel_trained(op, ch)) memcpy(b->saved[i] + (size_t)(k++) * hw, b->act[op->in0] + ch * hw, hw);
            if (a->base && !b->saved[i]) return -2;
        } else if (flows && saved_bytes(m, op)) {
            b->saved[i] = (int8_t *)ft_take_uninit(a, saved_bytes(m, op));
            if (a->base && !b->saved[i]) return -2;
        }
        if (a->base == 0) {
            if (op->kind == FT_OP_CONV) ft_take(a, max_size((size_t)op->workspace, (size_t)(op->h + op->kh) * (op->w + op->kw) * 2));
            continue;
        }
        if (!b->act[i + 1] || (grads && !b->mask[i + 1])) return -2;
        PROFILE_BEGIN(t_forward);
        if (inplace) {
            rc = dw_forward(op, b->act[i + 1], b->act[i + 1], b->mask[i + 1], a);
            if (rc) return rc;
            ft_shrink(a, b->act[i + 1], count);
            b->act[op->in0] = 0; /* now the output */
        } else if (op->kind == FT_OP_CONV && ft_is_depthwise(op)) {
            rc = dw_forward(op, b->act[op->in0], b->act[i + 1], b->mask[i + 1], a);
            if (rc) return rc;
        } else if (op->kind == FT_OP_CONV) {
            rc = conv_forward(op, b->act[op->in0], b->act[i + 1], b->mask[i + 1], a);
            if (rc) return rc;
        } else {
            elementwise_forward(m, op, b, b->act[i + 1], b->mask[i + 1], b->saved[i]);
        }
        PROFILE_END(t_forward, i, FT_PART_FORWARD);
        if (needs) {
            CHECK_TENSOR(a, i, FT_CHECK_OUTPUT, b->act[i + 1], count);
            CHECK_TENSOR(a, i, FT_CHECK_MASK, b->mask[i + 1], (count + 7) / 8);
        }
        /* inputs this op read last (each once: an op may read a tensor twice), later inputs first */
        for (k = ft_op_inputs(op, ins) - 1; k >= 0; k--) {
            const int32_t u = ins[k];
            int32_t j, again = 0;
            for (j = 0; j < k; j++) again |= ins[j] == u;
            if (u > 0 && !again && b->last[u] == i && !(inplace && u == op->in0)) {
                ft_give(a, b->act[u]);
                b->act[u] = 0;
            }
        }
    }
    return 0;
}
