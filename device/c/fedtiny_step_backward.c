/* fedtiny's exact training step: the sparse backward (fedtiny_step_internal.h). A convolution's output gradient
 * is quantized to int8 (QAS's gradient quantization, stochastic rounding), then gives its input gradient and the
 * trained channels' weight and bias gradients, applied at once with one sample per step (fedtiny_step_update.c);
 * the ops without parameters pass their gradients on in float32. */
#include <stddef.h>
#include <string.h>

#include "fedtiny_kernels.h"
#include "fedtiny_step_internal.h"

#define FT_GRAD_LEVELS 127
#define FT_SCATTER_WIDTH 8 /* depthwise input gradients of outputs this narrow or less scatter (ft_dw_scatter) */

/* The outputs a tap k reaches inside the input along one axis: o in [*lo, *hi) with 0 <= o s - pad + k < n. */
static void tap_range(int32_t k, int32_t pad, int32_t s, int32_t n, int32_t outs, int32_t *lo, int32_t *hi) {
    const int32_t a = pad - k, b = n - 1 + pad - k; /* a <= o s <= b */
    *lo = a > 0 ? (a + s - 1) / s : 0;
    *hi = b >= 0 ? b / s + 1 : 0;
    *hi = *hi < outs ? *hi : outs;
    *lo = *lo < *hi ? *lo : *hi;
}

/* d[j] += (float)acc[j] * s for j < n: an input gradient's integer sums, one float multiply and add each
 * (four per pass) */
static inline void add_scaled(float *d, const int32_t *acc, int32_t n, float s) {
    int32_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const float a0 = (float)acc[j] * s, a1 = (float)acc[j + 1] * s;
        const float a2 = (float)acc[j + 2] * s, a3 = (float)acc[j + 3] * s;
        d[j] += a0, d[j + 1] += a1, d[j + 2] += a2, d[j + 3] += a3;
    }
    for (; j < n; j++) d[j] += (float)acc[j] * s;
}

/* The weight gradient of output channel o into row (ft_gw_row_elements floats, added to): for each trained
 * weight, s * sum over the outputs its tap reaches of q (x - x_zero), an int32 sum (ft_kernels_fit) taken
 * as sum q x - x_zero sum q over each tap's rectangle of outputs, its rows by ft_dot_s8. */
static void weight_grad_row(const ft_op *op, const int8_t *x, const int8_t *q, float s, int32_t o, float *row) {
    const int32_t cpg = op->c / op->groups, grp = o / (op->oc / op->groups), ohw = op->oh * op->ow;
    const int8_t *qo = q + (size_t)o * ohw;
    int32_t ci, ky, kx, oy, j;
    if (ft_is_pointwise(op)) { /* the saved planes are the trained channels in order: two at a time */
        const int32_t k = op->slot_of ? op->slot_of[op->c] : op->c;
        const uint32_t offset = (uint32_t)op->x_zero * (uint32_t)ft_sum_s8(qo, ohw);
        int32_t d[4];
        for (j = 0; j + 4 <= k; j += 4) { /* four planes against the gradient row widened once */
            int32_t t;
            ft_dot_s8_1x4(qo, x + (size_t)j * ohw, ohw, ohw, d);
            for (t = 0; t < 4; t++) row[j + t] += (float)(int32_t)((uint32_t)d[t] - offset) * s;
        }
        for (; j + 2 <= k; j += 2) {
            ft_dot_s8_1x2(qo, x + (size_t)j * ohw, x + (size_t)(j + 1) * ohw, ohw, d);
            row[j] += (float)(int32_t)((uint32_t)d[0] - offset) * s;
            row[j + 1] += (float)(int32_t)((uint32_t)d[1] - offset) * s;
        }
        if (j < k) row[j] += (float)(int32_t)((uint32_t)ft_dot_s8(qo, x + (size_t)j * ohw, ohw) - offset) * s;
        return;
    }
    for (ci = 0; ci < cpg; ci++) {
        const int32_t cin = grp * cpg + ci, sel = ft_is_depthwise(op) ? o : cin;
        const int8_t *xc;
        float *r;
        if (!ft_channel_trained(op, sel)) continue;
        xc = x + (size_t)ft_channel_slot(op, sel) * op->h * op->w; /* the saved plane */
        r = row + (size_t)ft_row_slot(op, ci, cin) * op->kh * op->kw;
        for (ky = 0; ky < op->kh; ky++) {
            int32_t oy_lo, oy_hi;
            tap_range(ky, op->pad_t, op->stride, op->h, op->oh, &oy_lo, &oy_hi);
            for (kx = 0; kx < op->kw; kx++) {
                int32_t ox_lo, ox_hi, n;
                uint32_t sum = 0, qs = 0;
                tap_range(kx, op->pad_l, op->stride, op->w, op->ow, &ox_lo, &ox_hi);
                n = ox_hi - ox_lo;
                for (oy = oy_lo; oy < oy_hi && n > 0; oy++) {
                    const int8_t *qr = qo + (size_t)oy * op->ow + ox_lo;
                    const int8_t *xr = xc + (size_t)(oy * op->stride - op->pad_t + ky) * op->w +
                                       (ox_lo * op->stride - op->pad_l + kx);
                    if (op->stride == 1) {
                        sum += (uint32_t)ft_dot_s8(qr, xr, n);
                    } else {
                        int32_t t = 0;
                        for (j = 0; j < n; j++) t += (int32_t)qr[j] * xr[(size_t)j * op->stride];
                        sum += (uint32_t)t;
                    }
                    qs += (uint32_t)ft_sum_s8(qr, n);
                }
                r[ky * op->kw + kx] += (float)(int32_t)(sum - (uint32_t)op->x_zero * qs) * s;
            }
        }
    }
}

/* A depthwise convolution's input gradient by rows (any stride): for input row iy and tap row ky the
 * output row oy = (iy + pad_t - ky) / stride, when it divides and lies in the outputs, is spread into a
 * row D with D[kw - 1 + ox * stride] = q[oy][ox] and zeros between and around (no such row: zeros), so that
 *     gx[iy][ix] += s * sum_{ky, j < kw} w[ky][kw - 1 - j] * D_ky[ix + pad_l + j],
 * the depthwise forward's window sum at stride 1 with the kernel flipped, every input inside: ft_dw_row
 * over whole rows. The spread rows live in a ring of kh slots (slot oy mod kh), filled in order of oy once
 * per channel: the rows an input row reads are within kh consecutive ones. The flipped kernel, the ring
 * and a zero row use `scratch` (the output gradient's buffer past its int8 copy). Returns 0 when they do
 * not fit (the caller's gather serves). */
static int dw_input_grad(const ft_op *op, const int8_t *q, float s, float *gx, int8_t *scratch, size_t scratch_bytes) {
    const int32_t kh = op->kh, kw = op->kw, kk = kh * kw, st = op->stride, hw = op->h * op->w, ohw = op->oh * op->ow;
    const int32_t reach = op->w + op->pad_l + kw - 1, span = (op->ow - 1) * st + kw;
    const int32_t wd = reach > span ? reach : span;
    int8_t *const flipped = scratch, *const ring = scratch + kk, *const zero = ring + (size_t)kh * wd;
    int32_t acc[FT_ROW_BLOCK], c, iy, ix, ky, j;
    const int8_t *rows[FT_MAX_KH];
    if (kh > FT_MAX_KH || (size_t)kk + (size_t)(kh + 1) * wd > scratch_bytes) return 0;
    memset(zero, 0, (size_t)wd);
    for (c = 0; c < op->c; c++) {
        const int8_t *qc = q + (size_t)c * ohw;
        float *gxc = gx + (size_t)c * hw;
        int32_t filled = -1; /* the ring holds output rows filled - kh + 1 .. filled */
        for (j = 0; j < kk; j++) flipped[j] = op->weight[(size_t)c * kk + kk - 1 - j];
        for (iy = 0; iy < op->h; iy++) {
            for (ky = 0; ky < kh; ky++) { /* flipped row ky reads tap row kh - 1 - ky */
                const int32_t t = iy + op->pad_t - (kh - 1 - ky), oy = t / st;
                if (t < 0 || oy * st != t || oy >= op->oh) {
                    rows[ky] = zero + op->pad_l;
                    continue;
                }
                for (; filled < oy; ) {
                    int8_t *d = ring + (size_t)(++filled % kh) * wd;
                    const int8_t *qr = qc + (size_t)filled * op->ow;
                    int32_t ox;
                    memset(d, 0, (size_t)wd);
                    if (st == 1)
                        memcpy(d + kw - 1, qr, (size_t)op->ow);
                    else
                        for (ox = 0; ox < op->ow; ox++) d[kw - 1 + ox * st] = qr[ox];
                }
                rows[ky] = ring + (size_t)(oy % kh) * wd + op->pad_l;
            }
            for (ix = 0; ix < op->w; ix += FT_ROW_BLOCK) {
                const int32_t n = op->w - ix < FT_ROW_BLOCK ? op->w - ix : FT_ROW_BLOCK;
                for (j = 0; j < n; j++) acc[j] = 0;
                ft_dw_row(rows, flipped, kh, kw, 1, n, acc);
                for (ky = 0; ky < kh; ky++) rows[ky] += FT_ROW_BLOCK;
                add_scaled(gxc + (size_t)iy * op->w + ix, acc, n, s);
            }
        }
    }
    return 1;
}

/* A depthwise convolution's input gradient scattered from the outputs (ft_dw_scatter) into a plane of int32
 * sums covering every tap and every input (input (iy, ix) at (iy + pad_t, ix + pad_l)), then added to gx as
 * s * sum, every input once. The plane lives in `scratch` (4-byte aligned inside it). Returns 0 when it does
 * not fit. */
static int dw_input_grad_scatter(const ft_op *op, const int8_t *q, float s, float *gx, int8_t *scratch,
                                 size_t scratch_bytes) {
    const int32_t st = op->stride, hw = op->h * op->w, ohw = op->oh * op->ow, kk = op->kh * op->kw;
    const int32_t tall = (op->oh - 1) * st + op->kh, wide = (op->ow - 1) * st + op->kw;
    const int32_t rows = tall > op->h + op->pad_t ? tall : op->h + op->pad_t;
    const int32_t cols = wide > op->w + op->pad_l ? wide : op->w + op->pad_l;
    int32_t *const plane = (int32_t *)(((uintptr_t)scratch + 3u) & ~(uintptr_t)3u);
    const size_t words = (size_t)rows * cols, skew = (size_t)((int8_t *)plane - scratch);
    int32_t c, iy;
    if (skew + words * sizeof(int32_t) > scratch_bytes) return 0;
    for (c = 0; c < op->c; c++) {
        float *gxc = gx + (size_t)c * hw;
        memset(plane, 0, words * sizeof(int32_t));
        ft_dw_scatter(q + (size_t)c * ohw, op->oh, op->ow, op->weight + (size_t)c * kk, op->kh, op->kw, st, plane,
                      cols);
        for (iy = 0; iy < op->h; iy++)
            add_scaled(gxc + (size_t)iy * op->w, plane + (size_t)(iy + op->pad_t) * cols + op->pad_l, op->w, s);
    }
    return 1;
}

/* The input gradient's integer sums, added to gx as s * sum (one float add per element): for input
 * element (ci, iy, ix), sum over the outputs o, oy, ox whose window reads it of q[o, oy, ox] w[o, ci, ky, kx].
 * Pointwise: the transposed product by ft_mac_block (a weight column against the output gradient's
 * planes). Otherwise (depthwise ones take dw_input_grad when its rows fit) a gather: at stride 1, inputs every tap of whose window lies inside the outputs are
 * summed by ft_dw_row with the kernel flipped, FT_ROW_BLOCK at a time; the rest with checks. */
static void input_grad(const ft_op *op, const int8_t *q, float s, float *gx, uint32_t *prep, size_t prep_bytes) {
    const int32_t cpg = op->c / op->groups, opg = op->oc / op->groups, kk = op->kh * op->kw;
    const int32_t hw = op->h * op->w, ohw = op->oh * op->ow;
    int32_t acc[FT_ROW_BLOCK > 2 * FT_PIX ? FT_ROW_BLOCK : 2 * FT_PIX], ci, iy, ix, o, ky, kx, j, r;
    int8_t flipped[64];
    const int8_t *rows[FT_MAX_KH];
    if (ft_is_pointwise(op)) {
        for (ci = 0; ci < op->c; ci += 2) {
            const int32_t n_rows = ci + 1 < op->c ? 2 : 1;
            int32_t p;
            /* a pair of input channels' weights (columns of the weight) prepared once for all pixels */
            const int prepared = n_rows == 2 && prep && (size_t)op->oc * 4 <= prep_bytes;
            if (prepared) ft_pair_prepare(op->weight + ci, 1, op->c, op->oc, prep);
            for (p = 0; p < hw; p += FT_PIX) {
                const int32_t n = hw - p < FT_PIX ? hw - p : FT_PIX;
                if (prepared)
                    ft_mac_block_prepared(prep, op->weight + ci, 1, op->c, q + p, ohw, op->oc, n, acc);
                else
                    ft_mac_block(op->weight + ci, 1, op->c, n_rows, q + p, ohw, op->oc, n, acc);
                for (r = 0; r < n_rows; r++)
                    add_scaled(gx + (size_t)(ci + r) * hw + p, acc + r * FT_PIX, n, s);
            }
        }
        return;
    }
    for (ci = 0; ci < op->c; ci++) {
        const int32_t grp = ci / cpg, cl = ci % cpg;
        const int fast = op->stride == 1 && kk <= 64 && op->kh <= FT_MAX_KH;
        const int32_t ix_lo = op->kw - 1 - op->pad_l > 0 ? op->kw - 1 - op->pad_l : 0;
        const int32_t ix_hi = op->ow - op->pad_l < op->w ? op->ow - op->pad_l : op->w;
        float *gxc = gx + (size_t)ci * hw;
        if (fast && opg == 1)
            for (j = 0; j < kk; j++) flipped[j] = op->weight[((size_t)grp * cpg + cl) * kk + kk - 1 - j];
        for (iy = 0; iy < op->h; iy++) {
            const int row_fast = fast && iy + op->pad_t - (op->kh - 1) >= 0 && iy + op->pad_t < op->oh;
            for (ix = 0; ix < op->w;) {
                if (row_fast && ix == ix_lo && ix_lo < ix_hi) {
                    for (; ix < ix_hi; ix += FT_ROW_BLOCK) {
                        const int32_t n = ix_hi - ix < FT_ROW_BLOCK ? ix_hi - ix : FT_ROW_BLOCK;
                        for (j = 0; j < n; j++) acc[j] = 0;
                        for (o = grp * opg; o < (grp + 1) * opg; o++) {
                            const int8_t *wk = op->weight + ((size_t)o * cpg + cl) * kk;
                            const int8_t *qo = q + (size_t)o * ohw + (size_t)(iy + op->pad_t - (op->kh - 1)) * op->ow +
                                               (ix + op->pad_l - (op->kw - 1));
                            if (opg > 1) /* one output channel per input (depthwise): flipped once, below */
                                for (j = 0; j < kk; j++) flipped[j] = wk[kk - 1 - j];
                            for (ky = 0; ky < op->kh; ky++) rows[ky] = qo + (size_t)ky * op->ow;
                            ft_dw_row(rows, flipped, op->kh, op->kw, 1, n, acc);
                        }
                        add_scaled(gxc + (size_t)iy * op->w + ix, acc, n, s);
                    }
                    ix = ix_hi;
                    continue;
                }
                {
                    /* the taps that reach an output: ky = ty - stride * oy for 0 <= oy < oh, so ky runs from
                     * max(ty mod stride, ty - stride (oh - 1)) to min(kh - 1, ty) in steps of stride; likewise kx */
                    const int32_t ty = iy + op->pad_t, tx = ix + op->pad_l, st = op->stride;
                    const int32_t ky_lo = ty - st * (op->oh - 1), kx_lo = tx - st * (op->ow - 1);
                    const int32_t ky0 = st > 1 ? ty % st : 0, kx0 = st > 1 ? tx % st : 0;
                    const int32_t ky1 = ky_lo > ky0 ? ky_lo : ky0, kx1 = kx_lo > kx0 ? kx_lo : kx0;
                    const int32_t ky_end = op->kh - 1 < ty ? op->kh - 1 : ty, kx_end = op->kw - 1 < tx ? op->kw - 1 : tx;
                    const int32_t oy1 = st > 1 ? (ty - ky1) / st : ty - ky1, ox1 = st > 1 ? (tx - kx1) / st : tx - kx1;
                    int32_t sum = 0, oy, ox;
                    for (o = grp * opg; o < (grp + 1) * opg; o++) {
                        const int8_t *qo = q + (size_t)o * ohw;
                        const int8_t *wk = op->weight + ((size_t)o * cpg + cl) * kk;
                        for (ky = ky1, oy = oy1; ky <= ky_end; ky += st, oy--) {
                            const int8_t *qr = qo + (size_t)oy * op->ow, *wr = wk + ky * op->kw;
                            for (kx = kx1, ox = ox1; kx <= kx_end; kx += st, ox--) sum += (int32_t)qr[ox] * wr[kx];
                        }
                    }
                    gxc[(size_t)iy * op->w + ix] += (float)sum * s;
                }
                ix++;
            }
        }
    }
}

/* QAS's gradient quantization of an op's output gradient g: a = g * mask * m[o] (m: the channel's QAS scale
 * eff_scale), s = max |a| / 127, q = clamp(floor(a / s + u), -127, 127) with u the stream's uniform draw
 * for the element. a is computed twice (for the max, then to quantize) rather than stored. Where the mask
 * or a is 0, a / s + u = u in [0, 1), whose floor is 0: no draw. Planes whose size is a multiple of 8 are
 * walked a mask byte at a time (a byte of 0 skips eight elements). */
#define FT_KEPT(i) ((mask[(i) >> 3] >> ((i) & 7)) & 1u)

static __attribute__((noinline)) float grad_amax(const ft_op *op, const float *g, const uint8_t *mask) {
    const size_t hw = (size_t)op->oh * op->ow;
    float amax = 0.0f, m, v;
    size_t i, p;
    int32_t o;
    for (o = 0, i = 0; o < op->oc; o++) {
        /* max |g es| = max |g| * |es|: multiplying by a positive float is monotonic, rounding included.
         * max |g| on the bits: a finite float's magnitude orders as its bits without the sign do */
        const float es = op->eff_scale[o] < 0 ? -op->eff_scale[o] : op->eff_scale[o];
        uint32_t most = 0, bits_of;
        if (hw % 8 == 0) {
            for (p = 0; p < hw; p += 8, i += 8) {
                uint32_t bits = mask[i >> 3];
                const float *gi = g + i;
                for (; bits; bits &= bits - 1) {
                    memcpy(&bits_of, gi + __builtin_ctz(bits), 4);
                    bits_of &= 0x7FFFFFFFu;
                    most = bits_of > most ? bits_of : most;
                }
            }
        } else {
            for (p = 0; p < hw; p++, i++) {
                if (!FT_KEPT(i)) continue;
                memcpy(&bits_of, g + i, 4);
                bits_of &= 0x7FFFFFFFu;
                most = bits_of > most ? bits_of : most;
            }
        }
        memcpy(&m, &most, 4);
        v = m * es;
        amax = v > amax ? v : amax;
    }
    return amax;
}

/* One element's quantization, a = g * es kept by the mask (element at of the stream) */
static inline int8_t quantize_one(float a, float s, uint32_t base, uint32_t at) {
    int32_t v;
    if (a == 0.0f) return 0;
    v = ft_floor_f32(a / s + ft_uniform_at(base, at));
    return (int8_t)(v < -FT_GRAD_LEVELS ? -FT_GRAD_LEVELS : (v > FT_GRAD_LEVELS ? FT_GRAD_LEVELS : v));
}

/* q (int8, in g's own buffer: byte i overwrites float i / 4, already read) from g; at: the sample's first
 * element in the stream */
static __attribute__((noinline)) void quantize_grad(const ft_op *op, const float *g, const uint8_t *mask, float s, uint32_t base, uint32_t at,
                          int8_t *q) {
    const size_t hw = (size_t)op->oh * op->ow;
    size_t i, p;
    int32_t o, j;
    for (o = 0, i = 0; o < op->oc; o++) {
        const float es = op->eff_scale[o];
        if (hw % 8 == 0) {
            for (p = 0; p < hw; p += 8, i += 8) {
                const uint32_t bits = mask[i >> 3];
                if (!bits) { /* eight zeros; the floats they overwrite were read (a byte of 0 reads none) */
                    memset(q + i, 0, 8);
                    continue;
                }
                if (i == 0) { /* the tensor's first byte: its zeros would overwrite floats 0 and 1 unread */
                    for (j = 0; j < 8; j++)
                        q[j] = (bits >> j) & 1u ? quantize_one(g[j] * es, s, base, at + (uint32_t)j) : 0;
                    continue;
                }
                { /* eight zeros (over floats of earlier bytes, read; this byte's floats lie past them), then
                   * the kept elements only */
                    uint32_t left;
                    memset(q + i, 0, 8);
                    for (left = bits; left; left &= left - 1) {
                        j = (int32_t)__builtin_ctz(left);
                        q[i + j] = quantize_one(g[i + j] * es, s, base, at + (uint32_t)(i + j));
                    }
                }
            }
        } else {
            for (p = 0; p < hw; p++, i++)
                q[i] = FT_KEPT(i) ? quantize_one(g[i] * es, s, base, at + (uint32_t)i) : 0;
        }
    }
}
#undef FT_KEPT

/* One sample's backward; `sample` places it in the batch's random stream. The output gradient g is
 * quantized to int8 in its own buffer (byte i overwrites float i / 4, already read). The input gradient
 * is added to gx first (with the old weights); then the parameter gradients are either added to the
 * batch's accumulators gw/gb, or (gw == gb == NULL, one sample per step) applied at once, one output
 * channel at a time, from transient buffers. */
int ft_conv_backward(const ft_model *m, const ft_op *op, int32_t index, int32_t sample, const int8_t *x,
                     const uint8_t *mask, float *g, float *gx, float *gw, float *gb, int32_t apply, uint32_t seed,
                     uint32_t step, ft_arena *a) {
    const size_t count = (size_t)op->oc * op->oh * op->ow;
    const size_t hw = (size_t)op->oh * op->ow;
    int8_t *q = (int8_t *)g;
    float amax, s;
    int32_t o;
    PROFILE_BEGIN(t_quant);
    amax = grad_amax(op, g, mask);
    if (amax == 0.0f) {
        s = 1.0f;
        memset(q, 0, count);
    } else {
        s = amax / (float)FT_GRAD_LEVELS;
        quantize_grad(op, g, mask, s, ft_stream_base(seed, step, (uint32_t)(2 * op->slot)),
                      (uint32_t)((size_t)sample * count), q);
    }
    PROFILE_END(t_quant, index, FT_PART_QUANTIZE);
    CHECK_TENSOR(a, index, FT_CHECK_GRAD_Q, q, count);
    if (gx) { /* gx += s * sum_o,k q * w (an integer sum, then one float add per element) */
        PROFILE_BEGIN(t_input);
        /* the buffer past q's count bytes is free once quantized */
        /* depthwise: strides above 1 and maps up to FT_SCATTER_WIDTH wide scatter from the outputs (no spread
         * rows, zero outputs skipped); the rest, and those whose scatter plane does not fit, spread rows, which at
         * stride 2 cost kh kw MACs per input for about a quarter of them: worth it over the gather for 3 x 3
         * windows only (measured on MCUNet) */
        const int scatter = ft_is_depthwise(op) && (op->stride > 1 || op->ow <= FT_SCATTER_WIDTH);
        const int spread = ft_is_depthwise(op) && (op->stride == 1 || op->kh * op->kw <= 9);
        if (!(scatter && dw_input_grad_scatter(op, q, s, gx, q + count, 3 * count)) &&
            !(spread && dw_input_grad(op, q, s, gx, q + count, 3 * count))) {
            /* the prepared weights, 4-byte aligned, in the same free tail */
            uint32_t *prep = (uint32_t *)(((uintptr_t)(q + count) + 3u) & ~(uintptr_t)3u);
            input_grad(op, q, s, gx, prep, 3 * count - (size_t)((int8_t *)prep - (q + count)));
        }
        PROFILE_END(t_input, index, FT_PART_INPUT_GRAD);
        CHECK_TENSOR(a, index, FT_CHECK_GRAD_IN, gx, (size_t)op->c * op->h * op->w * sizeof(float));
    }
    if (op->train_b) {
        float *b = apply ? (float *)ft_take(a, (size_t)op->oc * sizeof(float)) : gb;
        PROFILE_BEGIN(t_bias);
        if (!b) return -2;
        for (o = 0; o < op->oc; o++) b[o] += (float)ft_sum_s8(q + (size_t)o * hw, (int32_t)hw) * s;
        if (apply) {
            ft_update_bias(m, op, b, step);
            ft_give(a, b);
            CHECK_TENSOR(a, index, FT_CHECK_BIAS, op->bias, (size_t)op->oc * sizeof(int32_t));
        }
        PROFILE_END(t_bias, index, FT_PART_QUANTIZE);
    }
    if (op->train_w) {
        const size_t per = (size_t)ft_gw_row_elements(op);
        const uint32_t base = ft_stream_base(seed, step, (uint32_t)(2 * op->slot + 1));
        float *row = apply ? (float *)ft_take(a, per * sizeof(float)) : 0;
        if (apply && !row) return -2;
        for (o = 0; o < op->oc; o++) {
            const int64_t r = ft_gw_row(op, o);
            if (r >= 0) {
                PROFILE_BEGIN(t_weight);
                if (apply) memset(row, 0, per * sizeof(float));
                weight_grad_row(op, x, q, s, o, apply ? row : gw + (size_t)r * per);
                PROFILE_END(t_weight, index, FT_PART_WEIGHT_GRAD);
            }
            if (apply) {
                PROFILE_BEGIN(t_update);
                ft_update_weight_row(m, op, o, r >= 0 ? row : 0, step, base);
                PROFILE_END(t_update, index, FT_PART_UPDATE);
            }
        }
        ft_give(a, row);
        if (apply)
            CHECK_TENSOR(a, index, FT_CHECK_WEIGHT, op->weight, (size_t)op->oc * (op->c / op->groups) * op->kh * op->kw);
    }
    return 0;
}

/* ------------------------------------------------------------------ backward of the ops without parameters
 *
 * Each adds its input gradients to the buffers gx (one per input a gradient reaches; NULL: none), float32
 * elementwise in the order the exact step states (fedtiny/int8/ops: each kind's `gradients`). A buffer may
 * hold other readers' gradients already: each element gets this op's contribution in one add (a tensor's
 * readers' gradients add as autograd adds them, later readers first). Where an element gets no
 * contribution (a mask's 0, a max pool's other taps, a slice's unread elements) nothing is added: adding
 * +0 changes no sum. */

/* ADD: g * ratio where the mask keeps the output (a sum of floats started at +0 is never -0, the one value
 * adding +0 would change) */
static void add_backward(const ft_op *op, size_t count, const uint8_t *mask, const float *g, float *ga, float *gb) {
    size_t j;
    for (j = 0; j < count; j++) {
        if (!((mask[j >> 3] >> (j & 7)) & 1u)) {
            if (!mask[j >> 3] && (j & 7) == 0) j += 7; /* a byte of zeros: eight outputs */
            continue;
        }
        if (ga) ga[j] += g[j] * op->ratio_a;
        if (gb) gb[j] += g[j] * op->ratio_b;
    }
}

/* AVERAGE_POOL_2D: g / f32(count) to each tap of the output's window inside the input (count: those taps; the
 * global pool's h w). Windows do not overlap (valid_elementwise): each input gets one window's share. */
static void pool_backward(const ft_op *op, const float *g, float *gx) {
    const int32_t s = op->stride, hw = op->h * op->w;
    int32_t c, oy, ox, iy, ix;
    size_t at = 0;
    for (c = 0; c < op->oc; c++) {
        float *gc = gx + (size_t)c * hw;
        for (oy = 0; oy < op->oh; oy++) {
            int32_t y_lo, y_hi, x_lo, x_hi;
            ft_pool_window(oy, s, op->pad_t, op->kh, op->h, &y_lo, &y_hi);
            for (ox = 0; ox < op->ow; ox++, at++) {
                ft_pool_window(ox, s, op->pad_l, op->kw, op->w, &x_lo, &x_hi);
                const float v = g[at] / (float)((y_hi - y_lo) * (x_hi - x_lo));
                for (iy = y_lo; iy < y_hi; iy++)
                    for (ix = x_lo; ix < x_hi; ix++) gc[(size_t)iy * op->w + ix] += v;
            }
        }
    }
}

/* MAX_POOL_2D: each output's gradient to the tap its forward kept (taps: 255 none). Windows that do not
 * overlap (kernel <= stride) reach each input from one output at most: scattered. Overlapping ones are
 * gathered: each input's contributions summed from +0 tap by tap in row-major tap order (the exact step's
 * order), then added once. */
static void maxpool_backward(const ft_op *op, const uint8_t *taps, const float *g, float *gx) {
    const int32_t s = op->stride, hw = op->h * op->w, ohw = op->oh * op->ow;
    int32_t c, oy, ox, iy, ix, ky, kx;
    if (op->kh <= s && op->kw <= s) {
        size_t at = 0;
        for (c = 0; c < op->c; c++)
            for (oy = 0; oy < op->oh; oy++)
                for (ox = 0; ox < op->ow; ox++, at++) {
                    const int32_t t = taps[at];
                    if (t == 255) continue;
                    iy = oy * s - op->pad_t + t / op->kw;
                    ix = ox * s - op->pad_l + t % op->kw;
                    gx[(size_t)c * hw + (size_t)iy * op->w + ix] += g[at];
                }
        return;
    }
    for (c = 0; c < op->c; c++) {
        const uint8_t *tc = taps + (size_t)c * ohw;
        const float *gc = g + (size_t)c * ohw;
        for (iy = 0; iy < op->h; iy++)
            for (ix = 0; ix < op->w; ix++) {
                float acc = 0.0f;
                int32_t any = 0;
                for (ky = 0; ky < op->kh; ky++) {
                    const int32_t ty = iy + op->pad_t - ky; /* oy s for the output whose tap ky reads row iy */
                    if (ty < 0 || ty % s || ty / s >= op->oh) continue;
                    oy = ty / s;
                    for (kx = 0; kx < op->kw; kx++) {
                        const int32_t tx = ix + op->pad_l - kx;
                        if (tx < 0 || tx % s || tx / s >= op->ow) continue;
                        ox = tx / s;
                        if (tc[oy * op->ow + ox] == ky * op->kw + kx) {
                            acc += gc[oy * op->ow + ox];
                            any = 1;
                        }
                    }
                }
                if (any) gx[(size_t)c * hw + (size_t)iy * op->w + ix] += acc;
            }
    }
}

/* MEAN: (g / f32(h w)) * f32(s_x / s_y) to every element of the plane */
static void mean_backward(const ft_op *op, const float *g, float *gx) {
    const int32_t hw = op->h * op->w;
    int32_t c, p;
    for (c = 0; c < op->c; c++) {
        const float v = (g[c] / (float)hw) * op->ratio_a;
        for (p = 0; p < hw; p++) gx[(size_t)c * hw + p] += v;
    }
}

/* MUL, from the saved inputs a (count) and b (b_hw per channel: 1 or the plane): where the mask keeps the
 * output, g_a = g * (f32(b - z2) * r) and g_b = g * (f32(a - z1) * r) (r = ratio_a). A broadcast b gets its
 * plane of g_b summed in row-major order from the first element (sum_hw_in_order: masked elements add
 * g * 0), then added once. */
static void mul_backward(const ft_op *op, const int8_t *saved, int32_t b_hw, const uint8_t *mask, const float *g,
                         float *ga, float *gb) {
    const int32_t hw = op->oh * op->ow;
    const int8_t *a = saved, *b = saved + (size_t)op->oc * hw;
    const float r = op->ratio_a;
    int32_t c, p;
    size_t at = 0;
    for (c = 0; c < op->oc; c++) {
        float sum = 0.0f;
        for (p = 0; p < hw; p++, at++) {
            const int32_t kept = (mask[at >> 3] >> (at & 7)) & 1u;
            const int32_t bv = b[b_hw == 1 ? (size_t)c : at];
            if (ga && kept) ga[at] += g[at] * ((float)(bv - op->z2) * r);
            if (gb && b_hw == 1) {
                const float v = (kept ? g[at] : 0.0f) * ((float)((int32_t)a[at] - op->z1) * r);
                sum = p == 0 ? v : sum + v;
            } else if (gb && kept) {
                gb[at] += g[at] * ((float)((int32_t)a[at] - op->z1) * r);
            }
        }
        if (gb && b_hw == 1) gb[c] += sum;
    }
}

/* CONCATENATION: each input's part of g, unchanged */
static void concat_backward(const ft_model *m, const ft_op *op, const float *g, float *const *gx) {
    int32_t ins[FT_MAX_INPUTS], n, k;
    size_t at = 0, j;
    n = ft_op_inputs(op, ins);
    for (k = 0; k < n; k++) {
        const size_t size = (size_t)ft_out_size(m, ins[k]);
        if (gx[k])
            for (j = 0; j < size; j++) gx[k][j] += g[at + j];
        at += size;
    }
}

/* a lookup: g * slope[x + 128], x the saved input */
static void lookup_backward(const ft_op *op, size_t count, const int8_t *x, const float *g, float *gx) {
    const float *const slope = op->slope;
    size_t j;
    for (j = 0; j < count; j++) gx[j] += g[j] * slope[(int32_t)x[j] + 128];
}

/* STRIDED_SLICE: each output's gradient back to the element it copied */
static void slice_backward(const ft_op *op, const float *g, float *gx) {
    int32_t c, oy, ox;
    size_t at = 0;
    for (c = 0; c < op->oc; c++) {
        float *gc = gx + (size_t)(op->begin_c + c * op->step_c) * op->h * op->w;
        for (oy = 0; oy < op->oh; oy++) {
            float *gr = gc + (size_t)(op->begin_h + oy * op->step_h) * op->w + op->begin_w;
            for (ox = 0; ox < op->ow; ox++, at++) gr[(size_t)ox * op->step_w] += g[at];
        }
    }
}

/* RESIZE_NEAREST_NEIGHBOR: each input's gradient the sum of its fy x fx copies' gradients, from +0 in row-major
 * order (copy (0, 0) first, the exact step's order), then added once */
static void resize_backward(const ft_op *op, const float *g, float *gx) {
    const int32_t fy = op->oh / op->h, fx = op->ow / op->w;
    int32_t c, iy, ix, i, j;
    size_t at = 0;
    for (c = 0; c < op->c; c++) {
        const float *gc = g + (size_t)c * op->oh * op->ow;
        for (iy = 0; iy < op->h; iy++)
            for (ix = 0; ix < op->w; ix++, at++) {
                float acc = 0.0f;
                for (i = 0; i < fy; i++)
                    for (j = 0; j < fx; j++) acc += gc[(size_t)(iy * fy + i) * op->ow + ix * fx + j];
                gx[at] += acc;
            }
    }
}

/* The backward of op (any kind but CONV) of one sample: g its output gradient, gx[k] input k's gradient
 * buffer (NULL: no gradient reaches input k). */
void ft_elementwise_backward(const ft_model *m, const ft_op *op, const int8_t *saved, const uint8_t *mask,
                             const float *g, float *const *gx) {
    const size_t count = (size_t)op->oc * op->oh * op->ow;
    switch (op->kind) {
    case FT_OP_ADD: add_backward(op, count, mask, g, gx[0], gx[1]); break;
    case FT_OP_POOL: if (gx[0]) pool_backward(op, g, gx[0]); break;
    case FT_OP_MAXPOOL: if (gx[0]) maxpool_backward(op, (const uint8_t *)saved, g, gx[0]); break;
    case FT_OP_MEAN: if (gx[0]) mean_backward(op, g, gx[0]); break;
    case FT_OP_MUL:
        mul_backward(op, saved, (size_t)ft_out_size(m, op->in1) == count ? op->oh * op->ow : 1, mask, g, gx[0], gx[1]);
        break;
    case FT_OP_CONCAT: concat_backward(m, op, g, gx); break;
    case FT_OP_LOOKUP: if (gx[0]) lookup_backward(op, count, saved, g, gx[0]); break;
    case FT_OP_SLICE: if (gx[0]) slice_backward(op, g, gx[0]); break;
    case FT_OP_RESIZE: if (gx[0]) resize_backward(op, g, gx[0]); break;
    default: break;
    }
}
