/* fedtiny's exact training step (see fedtiny_step.h and fedtiny/int8/exact.py, its specification). */
#include "fedtiny_step.h"

#include <string.h>

#include "fedtiny_int8.h"

#define FT_MAX_TENSORS 256
#define FT_MAX_BATCH 64
#define FT_GRAD_LEVELS 127

int ft_step_abi(void) { return FT_STEP_ABI; }

/* ------------------------------------------------------------------ arena: first fit, with frees */

#define FT_MAX_BLOCKS 1024

typedef struct {
    uint8_t *base;                 /* NULL: a sizing pass (bump, no frees: an upper bound) */
    size_t cap, used, high;        /* high: the high-water mark (end of the highest live block) */
    size_t at[FT_MAX_BLOCKS], size[FT_MAX_BLOCKS];  /* live blocks, sorted by offset */
    int32_t n;
} arena_t;

static void *take(arena_t *a, size_t bytes) {
    size_t start = 0, end;
    int32_t i, j;
    bytes = (bytes + 7u) & ~(size_t)7u;
    if (a->base == 0) {
        a->used += bytes;
        a->high = a->used > a->high ? a->used : a->high;
        return 0;
    }
    if (a->n >= FT_MAX_BLOCKS) return 0;
    for (i = 0; i <= a->n; i++) { /* the first gap that holds it */
        end = i < a->n ? a->at[i] : a->cap;
        if (end >= start && end - start >= bytes) break;
        if (i < a->n) start = a->at[i] + a->size[i];
    }
    if (i > a->n || start + bytes > a->cap) return 0;
    for (j = a->n; j > i; j--) {
        a->at[j] = a->at[j - 1];
        a->size[j] = a->size[j - 1];
    }
    a->at[i] = start;
    a->size[i] = bytes;
    a->n++;
    a->high = start + bytes > a->high ? start + bytes : a->high;
    memset(a->base + start, 0, bytes);
    return a->base + start;
}

static void give(arena_t *a, const void *p) {
    int32_t i;
    if (a->base == 0 || p == 0) return;
    for (i = 0; i < a->n; i++)
        if (a->base + a->at[i] == (const uint8_t *)p) {
            for (; i < a->n - 1; i++) {
                a->at[i] = a->at[i + 1];
                a->size[i] = a->size[i + 1];
            }
            a->n--;
            return;
        }
}

/* ------------------------------------------------------------------ counter-based uniform numbers */

static uint32_t hash32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

static uint32_t stream_base(uint32_t seed, uint32_t step, uint32_t slot) {
    return hash32(seed ^ hash32(step ^ hash32(slot)));
}

/* u in [0, 1): (hash32(base + i) >> 8) * 2^-24, exact in float32 */
static float uniform_at(uint32_t base, uint32_t i) { return (float)(hash32(base + i) >> 8) * (1.0f / 16777216.0f); }

/* floor and round half away from zero without libm (|x| < 2^31 for floor) */
static int32_t floor_f32(float x) {
    int32_t i = (int32_t)x;
    return ((float)i > x) ? i - 1 : i;
}

static int64_t round_half_away_f32(float x) {
    float t = x + (x >= 0.0f ? 0.5f : -0.5f);
    if (t >= 4.0e18f) return (int64_t)4e18;
    if (t <= -4.0e18f) return -(int64_t)4e18;
    return (int64_t)t; /* conversion truncates: trunc(x + copysign(0.5, x)) */
}

/* ------------------------------------------------------------------ sizes */

static int32_t out_size(const ft_model *m, int32_t t) { /* elements per sample of tensor t */
    if (t == 0) return m->in_c * m->in_h * m->in_w;
    return m->ops[t - 1].oc * m->ops[t - 1].oh * m->ops[t - 1].ow;
}

static int valid_model(const ft_model *m, int32_t batch) {
    int32_t i;
    if (!m || m->n_ops <= 0 || m->n_ops >= FT_MAX_TENSORS || !m->ops || batch <= 0 || batch > FT_MAX_BATCH) return 0;
    for (i = 0; i < m->n_ops; i++) {
        const ft_op *op = &m->ops[i];
        if (op->in0 < 0 || op->in0 > i || (op->kind == FT_OP_ADD && (op->in1 < 0 || op->in1 > i))) return 0;
        if (op->kind == FT_OP_CONV && (!op->weight || !op->bias || !op->mult || !op->shift || op->groups <= 0 ||
                                       op->stride <= 0 || op->c % op->groups || op->oc % op->groups))
            return 0;
        if (op->kind < FT_OP_CONV || op->kind > FT_OP_POOL) return 0;
    }
    return m->ops[m->n_ops - 1].kind == FT_OP_CONV && m->ops[m->n_ops - 1].oc == m->classes && m->classes > 0;
}

/* ------------------------------------------------------------------ forward */

static void conv_forward(const ft_op *op, const int8_t *x, int32_t batch, int8_t *y, uint8_t *mask) {
    const int32_t cpg = op->c / op->groups, opg = op->oc / op->groups;
    int32_t n, o, oy, ox, ci, ky, kx;
    for (n = 0; n < batch; n++)
        for (o = 0; o < op->oc; o++) {
            const int32_t g = o / opg;
            for (oy = 0; oy < op->oh; oy++)
                for (ox = 0; ox < op->ow; ox++) {
                    int32_t acc = op->bias[o], v;
                    size_t at;
                    for (ci = 0; ci < cpg; ci++) {
                        const int8_t *xc = x + ((size_t)n * op->c + (size_t)(g * cpg + ci)) * op->h * op->w;
                        const int8_t *wk = op->weight + (((size_t)o * cpg + ci) * op->kh) * op->kw;
                        for (ky = 0; ky < op->kh; ky++) {
                            const int32_t iy = oy * op->stride - op->pad_t + ky;
                            if (iy < 0 || iy >= op->h) continue;
                            for (kx = 0; kx < op->kw; kx++) {
                                const int32_t ix = ox * op->stride - op->pad_l + kx;
                                if (ix < 0 || ix >= op->w) continue;
                                acc += (int32_t)wk[ky * op->kw + kx] * ((int32_t)xc[iy * op->w + ix] - op->x_zero);
                            }
                        }
                    }
                    v = ft_mbqm(acc, op->mult[o], op->shift[o]) + op->y_zero;
                    at = (((size_t)n * op->oc + o) * op->oh + oy) * op->ow + ox;
                    if (mask && v >= op->act_lo && v <= op->act_hi) mask[at >> 3] |= (uint8_t)(1u << (at & 7));
                    y[at] = (int8_t)(v < op->act_lo ? op->act_lo : (v > op->act_hi ? op->act_hi : v));
                }
        }
}

static void add_forward(const ft_op *op, const int8_t *a, const int8_t *b, size_t count, int8_t *y, uint8_t *mask) {
    size_t i;
    for (i = 0; i < count; i++) {
        const int32_t x1 = (int32_t)((uint32_t)((int32_t)a[i] - op->z1) << op->left_shift);
        const int32_t x2 = (int32_t)((uint32_t)((int32_t)b[i] - op->z2) << op->left_shift);
        const int32_t sum = ft_mbqm(x1, op->m1, op->s1) + ft_mbqm(x2, op->m2, op->s2);
        const int32_t v = ft_mbqm(sum, op->mo, op->so) + op->z_out;
        if (mask && v >= op->act_lo && v <= op->act_hi) mask[i >> 3] |= (uint8_t)(1u << (i & 7));
        y[i] = (int8_t)(v < op->act_lo ? op->act_lo : (v > op->act_hi ? op->act_hi : v));
    }
}

static void pool_forward(const ft_op *op, const int8_t *x, int32_t batch, int8_t *y) {
    const int32_t count = op->h * op->w;
    int32_t n, c, i;
    for (n = 0; n < batch; n++)
        for (c = 0; c < op->c; c++) {
            const int8_t *xc = x + ((size_t)n * op->c + c) * count;
            int32_t s = 0, v;
            for (i = 0; i < count; i++) s += xc[i];
            v = s > 0 ? (s + count / 2) / count : (s - count / 2) / count; /* TFLM: half away from zero */
            y[(size_t)n * op->c + c] = (int8_t)(v < -128 ? -128 : (v > 127 ? 127 : v));
        }
}

typedef struct {
    int8_t *act[FT_MAX_TENSORS];
    uint8_t *mask[FT_MAX_TENSORS];  /* 1 bit per element: the clamp kept it (ops a gradient flows through) */
    int8_t *saved[FT_MAX_TENSORS];  /* op i: its input's trained channels, for the weight gradient */
    int32_t last[FT_MAX_TENSORS];   /* the last op reading each tensor */
} buffers_t;

static int32_t channel_trained(const ft_op *op, int32_t ch) { return !op->train_channels || op->train_channels[ch]; }

/* One sample's forward. needs[t]: a gradient reaches tensor t (NULL: inference). Activations are freed
 * after their last reader; what the backward needs is kept: masks (bits) and trained channels' inputs. */
static int run_forward(const ft_model *m, const int8_t *x, const uint8_t *needs, arena_t *a, buffers_t *b) {
    int32_t i, t;
    b->act[0] = (int8_t *)x;
    for (t = 0; t <= m->n_ops; t++) b->last[t] = -1;
    for (i = 0; i < m->n_ops; i++) {
        b->last[m->ops[i].in0] = i;
        if (m->ops[i].kind == FT_OP_ADD) b->last[m->ops[i].in1] = i;
    }
    for (i = 0; i < m->n_ops; i++) {
        const ft_op *op = &m->ops[i];
        const size_t count = (size_t)out_size(m, i + 1);
        const int grads = needs && needs[i + 1] && op->kind != FT_OP_POOL;
        b->act[i + 1] = (int8_t *)take(a, count);
        b->mask[i + 1] = grads ? (uint8_t *)take(a, (count + 7) / 8) : 0;
        b->saved[i] = 0;
        if (needs && op->kind == FT_OP_CONV && op->train_w) { /* the input channels the weight gradient reads */
            const size_t hw = (size_t)op->h * op->w;
            int32_t ch, k = 0;
            for (ch = 0; ch < op->c; ch++) k += channel_trained(op, ch);
            b->saved[i] = (int8_t *)take(a, (size_t)k * hw);
            if (a->base && b->saved[i])
                for (ch = 0, k = 0; ch < op->c; ch++)
                    if (channel_trained(op, ch)) memcpy(b->saved[i] + (size_t)(k++) * hw, b->act[op->in0] + ch * hw, hw);
            if (a->base && !b->saved[i]) return -2;
        }
        if (a->base == 0) continue;
        if (!b->act[i + 1] || (grads && !b->mask[i + 1])) return -2;
        if (op->kind == FT_OP_CONV)
            conv_forward(op, b->act[op->in0], 1, b->act[i + 1], b->mask[i + 1]);
        else if (op->kind == FT_OP_ADD)
            add_forward(op, b->act[op->in0], b->act[op->in1], count, b->act[i + 1], b->mask[i + 1]);
        else
            pool_forward(op, b->act[op->in0], 1, b->act[i + 1]);
        if (op->kind == FT_OP_ADD && op->in1 > 0 && op->in1 != op->in0 && b->last[op->in1] == i) {
            give(a, b->act[op->in1]);
            b->act[op->in1] = 0;
        }
        if (op->in0 > 0 && b->last[op->in0] == i) {
            give(a, b->act[op->in0]);
            b->act[op->in0] = 0;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ loss: the fixed-point softmax */

static int32_t sat_shift_left(int32_t x, int e) {
    const int64_t v = (int64_t)x * ((int64_t)1 << e);
    return v > INT32_MAX ? INT32_MAX : (v < INT32_MIN ? INT32_MIN : (int32_t)v);
}

static int32_t exp_quarter(int32_t a) { /* gemmlowp exp on [-1/4, 0), Q0.31 */
    const int32_t e18 = 1895147668, third = 715827883;
    const int32_t x = a + (1 << 28);
    const int32_t x2 = ft_srdhm(x, x), x3 = ft_srdhm(x2, x), x4 = ft_srdhm(x2, x2);
    const int32_t x4_4 = ft_rdbpot(x4, 2);
    const int32_t poly = ft_rdbpot(ft_srdhm(x4_4 + x3, third) + x2, 1);
    return e18 + ft_srdhm(x + poly, e18);
}

static int32_t exp_on_negative_values(int32_t a) { /* Q5.26 in, Q0.31 out (gemmlowp, 5 integer bits) */
    static const int32_t barrel[7] = {1672461947, 1302514674, 790015084, 290630308, 39332535, 720401, 242};
    const int frac = 26;
    const int32_t quarter = 1 << (frac - 2);
    const int32_t amq = (a & (quarter - 1)) - quarter;
    int32_t result = exp_quarter(sat_shift_left(amq, 5));
    const int32_t remainder = amq - a;
    int e;
    for (e = -2; e <= 4; e++)
        if (5 > e && (remainder & (1 << (frac + e)))) result = ft_srdhm(result, barrel[e + 2]);
    return a == 0 ? INT32_MAX : result;
}

static void loss_grad(const ft_model *m, const int8_t *q, int32_t label, int32_t sample, int32_t batch, float *g,
                      ft_step_report *rep) {
    const int32_t k = m->classes;
    int32_t qmax = -128, i;
    int32_t e[256];
    int64_t total = 0;
    for (i = 0; i < k; i++) qmax = q[i] > qmax ? q[i] : qmax;
    for (i = 0; i < k; i++) {
        const int32_t d = (int32_t)q[i] - qmax;
        e[i] = d >= m->sm_diff_min ? exp_on_negative_values(ft_srdhm((int32_t)((uint32_t)d << m->sm_shift), m->sm_mult))
                                   : 0;
        total += e[i];
    }
    for (i = 0; i < k; i++) {
        const int64_t p = ((int64_t)e[i] * 32768 + total / 2) / total;
        const int64_t diff = p - (i == label ? 32768 : 0);
        /* gradient of the batch's mean loss w.r.t. the logit, then through logits = (q - z) * s */
        g[i] = (((float)diff * (1.0f / 32768.0f)) / (float)batch) * m->logit_scale;
    }
    if (rep) {
        rep->sum_exp[sample] = total;
        rep->exp_y[sample] = e[label];
    }
}

/* ------------------------------------------------------------------ backward */

/* Weight gradients are held for trained channels only: the index of weight element (o, ci, ky, kx) in
 * that compact array, with slot_of[channel] the channel's rank among the trained ones (-1: frozen). */
static int64_t gw_index(const ft_op *op, const int32_t *slot_of, int32_t o, int32_t ci, int32_t ky, int32_t kx) {
    const int32_t cpg = op->c / op->groups, depthwise = op->groups == op->c && op->groups == op->oc;
    int64_t row;
    if (!op->train_channels) return (((int64_t)o * cpg + ci) * op->kh + ky) * op->kw + kx;
    if (depthwise) {
        if (slot_of[o] < 0) return -1;
        row = slot_of[o];
    } else {
        const int32_t k = slot_of[op->c]; /* the count of trained channels, stored after the map */
        if (slot_of[ci] < 0) return -1; /* groups == 1 when channels are selected */
        row = (int64_t)o * k + slot_of[ci];
    }
    return (row * op->kh + ky) * op->kw + kx;
}

static int64_t gw_elements(const ft_op *op) {
    int32_t ch, k = 0;
    if (!op->train_channels) return (int64_t)op->oc * (op->c / op->groups) * op->kh * op->kw;
    for (ch = 0; ch < op->c; ch++) k += op->train_channels[ch] != 0;
    return (int64_t)k * (op->groups == op->c && op->groups == op->oc ? 1 : op->oc) * op->kh * op->kw;
}

static void channel_slots(const ft_op *op, int32_t *slot_of) { /* op->c + 1 entries */
    int32_t ci, k = 0;
    for (ci = 0; ci < op->c; ci++) slot_of[ci] = channel_trained(op, ci) ? k++ : -1;
    slot_of[op->c] = k;
}

/* One sample's backward (batch 1 buffers); `sample` places it in the batch's random stream. Bias and
 * weight gradients are added to gb/gw (the batch's sum, in sample order). */
static int conv_backward(const ft_model *m, const ft_op *op, int32_t sample, const int8_t *x, const uint8_t *mask,
                         const float *g, float *gx, float *gw, float *gb, uint32_t seed, uint32_t step,
                         arena_t *a) {
    const int32_t batch = 1;
    const size_t count = (size_t)op->oc * op->oh * op->ow;
    const size_t hw = (size_t)op->oh * op->ow;
    const int32_t cpg = op->c / op->groups, opg = op->oc / op->groups;
    int8_t *q = (int8_t *)take(a, count);
    int32_t *slot_of = (int32_t *)take(a, (size_t)(op->c + 1) * sizeof(int32_t)); /* channel -> its saved plane */
    float amax = 0.0f, s;
    size_t i;
    int32_t n, o, oy, ox, ci, ky, kx, k;
    uint32_t base;
    (void)m;
    if (!q || !slot_of) return -2;
    channel_slots(op, slot_of);
    (void)k;
    /* a = g * mask * m[o], computed twice (for the max, then to quantize) rather than stored */
#define FT_GRAD_A(i) ((g[i] * (float)((mask[(i) >> 3] >> ((i) & 7)) & 1u)) * op->eff_scale[((i) / hw) % op->oc])
    for (i = 0; i < count; i++) {
        const float v = FT_GRAD_A(i);
        amax = (v < 0 ? -v : v) > amax ? (v < 0 ? -v : v) : amax;
    }
    if (amax == 0.0f) {
        s = 1.0f;
    } else {
        s = amax / (float)FT_GRAD_LEVELS;
        base = stream_base(seed, step, (uint32_t)(2 * op->slot));
        for (i = 0; i < count; i++) {
            int32_t v = floor_f32(FT_GRAD_A(i) / s + uniform_at(base, (uint32_t)((size_t)sample * count + i)));
            q[i] = (int8_t)(v < -FT_GRAD_LEVELS ? -FT_GRAD_LEVELS : (v > FT_GRAD_LEVELS ? FT_GRAD_LEVELS : v));
        }
    }
    if (gb)
        for (o = 0; o < op->oc; o++) {
            int64_t sum = 0;
            for (n = 0; n < batch; n++)
                for (i = 0; i < hw; i++) sum += q[((size_t)n * op->oc + o) * hw + i];
            gb[o] += (float)sum * s;
        }
    if (gw)
        for (o = 0; o < op->oc; o++) {
            const int32_t grp = o / opg;
            for (ci = 0; ci < cpg; ci++) {
                const int32_t cin = grp * cpg + ci;
                const int32_t sel = op->groups == op->c && op->groups == op->oc ? o : cin;
                if (op->train_channels && !op->train_channels[sel]) continue;
                for (ky = 0; ky < op->kh; ky++)
                    for (kx = 0; kx < op->kw; kx++) {
                        int64_t sum = 0;
                        for (n = 0; n < batch; n++) {
                            const int8_t *xc = x + (size_t)slot_of[cin] * op->h * op->w; /* saved plane */
                            const int8_t *qo = q + ((size_t)n * op->oc + o) * hw;
                            for (oy = 0; oy < op->oh; oy++) {
                                const int32_t iy = oy * op->stride - op->pad_t + ky;
                                if (iy < 0 || iy >= op->h) continue;
                                for (ox = 0; ox < op->ow; ox++) {
                                    const int32_t ix = ox * op->stride - op->pad_l + kx;
                                    if (ix < 0 || ix >= op->w) continue;
                                    sum += (int64_t)qo[oy * op->ow + ox] * ((int32_t)xc[iy * op->w + ix] - op->x_zero);
                                }
                            }
                        }
                        gw[gw_index(op, slot_of, o, ci, ky, kx)] += (float)sum * s;
                    }
            }
        }
    if (gx) { /* gx += s * sum_o,k q * w, one input element at a time (integer sum, then one float add) */
        for (n = 0; n < batch; n++)
            for (ci = 0; ci < op->c; ci++) {
                const int32_t grp = ci / cpg, cl = ci % cpg;
                int32_t iy, ix;
                for (iy = 0; iy < op->h; iy++)
                    for (ix = 0; ix < op->w; ix++) {
                        int64_t sum = 0;
                        for (o = grp * opg; o < (grp + 1) * opg; o++) {
                            const int8_t *qo = q + ((size_t)n * op->oc + o) * hw;
                            const int8_t *wk = op->weight + (((size_t)o * cpg + cl) * op->kh) * op->kw;
                            for (ky = 0; ky < op->kh; ky++) {
                                const int32_t ty = iy + op->pad_t - ky;
                                if (ty < 0 || ty % op->stride) continue;
                                oy = ty / op->stride;
                                if (oy >= op->oh) continue;
                                for (kx = 0; kx < op->kw; kx++) {
                                    const int32_t tx = ix + op->pad_l - kx;
                                    if (tx < 0 || tx % op->stride) continue;
                                    ox = tx / op->stride;
                                    if (ox >= op->ow) continue;
                                    sum += (int64_t)qo[oy * op->ow + ox] * wk[ky * op->kw + kx];
                                }
                            }
                        }
                        gx[(((size_t)n * op->c + ci) * op->h + iy) * op->w + ix] += (float)sum * s;
                    }
            }
    }
#undef FT_GRAD_A
    give(a, slot_of);
    give(a, q);
    return 0;
}

/* ------------------------------------------------------------------ update */

static void update_one(const ft_model *m, float gi, const float *qas_i, float *mom_i, uint32_t step, int8_t *w8,
                       int32_t *b32, uint32_t base, uint32_t index) {
    float d;
    if (qas_i) gi = gi * *qas_i;
    if (m->momentum > 0.0f) {
        *mom_i = step == 0 ? gi : *mom_i * m->momentum + gi;
        gi = *mom_i;
    }
    d = gi * m->lr;
    if (w8) {
        const float t = (float)*w8 - d;
        int64_t v = m->stochastic ? floor_f32(t + uniform_at(base, index)) : round_half_away_f32(t);
        *w8 = (int8_t)(v < -127 ? -127 : (v > 127 ? 127 : v));
    } else {
        const int64_t v = (int64_t)*b32 + round_half_away_f32(-d);
        *b32 = (int32_t)(v < INT32_MIN ? INT32_MIN : (v > INT32_MAX ? INT32_MAX : v));
    }
}

/* The update of a weight from its compact gradient (0 for frozen channels, as the simulator's). */
static void update_weight(const ft_model *m, const ft_op *op, const float *gw, const int32_t *slot_of, uint32_t step,
                          uint32_t base) {
    const int32_t cpg = op->c / op->groups, per = cpg * op->kh * op->kw;
    int32_t i;
    for (i = 0; i < op->oc * per; i++) {
        const int32_t o = i / per, rem = i % per, ci = rem / (op->kh * op->kw), kk = rem % (op->kh * op->kw);
        const int64_t at = gw_index(op, slot_of, o, ci, kk / op->kw, kk % op->kw);
        update_one(m, at < 0 ? 0.0f : gw[at], op->qas_w ? &op->qas_w[o] : 0, op->mom_w ? &op->mom_w[i] : 0, step,
                   &op->weight[i], 0, base, (uint32_t)i);
    }
}

/* ------------------------------------------------------------------ the step */

static int step_impl(const ft_model *m, const int8_t *x, const int32_t *y, int32_t batch, uint32_t seed,
                     uint32_t step, arena_t *a, ft_step_report *rep) {
    buffers_t b;
    uint8_t needs[FT_MAX_TENSORS];
    float *grad[FT_MAX_TENSORS];
    float *gw[FT_MAX_TENSORS], *gb[FT_MAX_TENSORS];
    const size_t in_size = (size_t)out_size(m, 0);
    size_t mark;
    int32_t i, n, rc, held;
    /* which tensors a gradient reaches (as autograd's requires_grad) */
    needs[0] = 0;
    for (i = 0; i < m->n_ops; i++) {
        const ft_op *op = &m->ops[i];
        needs[i + 1] = (uint8_t)(needs[op->in0] || (op->kind == FT_OP_ADD && needs[op->in1]) ||
                                 (op->kind == FT_OP_CONV && (op->train_w || op->train_b)));
    }
    /* held for the whole step: the trained tensors' gradients, summed over the batch */
    for (i = 0; i < m->n_ops; i++) {
        const ft_op *op = &m->ops[i];
        gw[i] = gb[i] = 0;
        if (op->kind != FT_OP_CONV) continue;
        if (op->train_w) gw[i] = (float *)take(a, (size_t)gw_elements(op) * 4);
        if (op->train_b) gb[i] = (float *)take(a, (size_t)op->oc * 4);
        if (a->base && ((op->train_w && !gw[i]) || (op->train_b && !gb[i]))) return -2;
    }
    mark = a->used;
    held = a->n; /* the parameter gradients: the lowest blocks, kept over the samples */
    /* one sample at a time (micro-batch 1): its activations, masks and activation gradients */
    for (n = 0; n < batch; n++) {
        a->used = mark;
        a->n = held;
        memset(&b, 0, sizeof b);
        memset(grad, 0, sizeof grad);
        rc = run_forward(m, x + (size_t)n * in_size, needs, a, &b);
        if (rc) return rc;
        if (a->base == 0) { /* sizing (an upper bound): every gradient and the largest backward's temporaries */
            size_t most = 0;
            for (i = 0; i <= m->n_ops; i++)
                if (needs[i]) take(a, (size_t)out_size(m, i) * sizeof(float));
            for (i = 0; i < m->n_ops; i++)
                if (m->ops[i].kind == FT_OP_CONV) {
                    size_t c = (size_t)out_size(m, i + 1) + (size_t)m->ops[i].c * 4 + 32;
                    most = c > most ? c : most;
                }
            a->used += most;
            a->high = a->used > a->high ? a->used : a->high;
            return 0;
        }
        if (!needs[m->n_ops]) return 0; /* nothing trained */
        grad[m->n_ops] = (float *)take(a, (size_t)m->classes * sizeof(float));
        if (!grad[m->n_ops]) return -2;
        loss_grad(m, b.act[m->n_ops], y[n], n, batch, grad[m->n_ops], rep);
        give(a, b.act[m->n_ops]);
        for (i = m->n_ops - 1; i >= 0; i--) {
            const ft_op *op = &m->ops[i];
            const float *g = grad[i + 1];
            const size_t count = (size_t)out_size(m, i + 1);
            size_t j;
            if (!g) continue;
            for (j = 0; j < 2; j++) { /* the input gradients this op adds to, allocated at their first writer */
                const int32_t t = j == 0 ? op->in0 : (op->kind == FT_OP_ADD ? op->in1 : 0);
                if (t > 0 && needs[t] && !grad[t]) {
                    grad[t] = (float *)take(a, (size_t)out_size(m, t) * sizeof(float));
                    if (!grad[t]) return -2;
                }
            }
            if (op->kind == FT_OP_CONV) {
                rc = conv_backward(m, op, n, b.saved[i], b.mask[i + 1], g, needs[op->in0] ? grad[op->in0] : 0,
                                   gw[i], gb[i], seed, step, a);
                if (rc) return rc;
            } else if (op->kind == FT_OP_ADD) {
                for (j = 0; j < count; j++) {
                    const float gm = g[j] * (float)((b.mask[i + 1][j >> 3] >> (j & 7)) & 1u);
                    if (needs[op->in0]) grad[op->in0][j] += gm * op->ratio_a;
                    if (needs[op->in1]) grad[op->in1][j] += gm * op->ratio_b;
                }
            } else if (needs[op->in0]) {
                const int32_t hw = op->h * op->w;
                for (j = 0; j < count; j++) {
                    const float v = g[j] / (float)hw;
                    int32_t p;
                    for (p = 0; p < hw; p++) grad[op->in0][j * hw + p] += v;
                }
            }
            give(a, grad[i + 1]); /* consumed: its producer's backward is done */
            grad[i + 1] = 0;
            give(a, b.mask[i + 1]);
            give(a, b.saved[i]);
        }
    }
    a->n = held;
    for (i = 0; i < m->n_ops; i++) {
        const ft_op *op = &m->ops[i];
        if (op->kind != FT_OP_CONV) continue;
        if (gw[i]) {
            int32_t *slot_of = (int32_t *)take(a, (size_t)(op->c + 1) * sizeof(int32_t));
            if (!slot_of) return -2;
            channel_slots(op, slot_of);
            update_weight(m, op, gw[i], slot_of, step, stream_base(seed, step, (uint32_t)(2 * op->slot + 1)));
            give(a, slot_of);
        }
        if (gb[i]) {
            int32_t o;
            for (o = 0; o < op->oc; o++)
                update_one(m, gb[i][o], op->qas_b ? &op->qas_b[o] : 0, op->mom_b ? &op->mom_b[o] : 0, step, 0,
                           &op->bias[o], 0, (uint32_t)o);
        }
    }
    return 0;
}

size_t ft_step_arena_bytes(const ft_model *m, int32_t batch) {
    arena_t a;
    int8_t dummy = 0;
    int32_t ydummy = 0;
    if (!valid_model(m, batch)) return 0;
    memset(&a, 0, sizeof a);
    if (step_impl(m, &dummy, &ydummy, batch, 0, 0, &a, 0)) return 0;
    return a.high + 64;
}

int ft_train_step(const ft_model *m, const int8_t *x, const int32_t *y, int32_t batch, uint32_t seed, uint32_t step,
                  uint8_t *arena, size_t arena_bytes, ft_step_report *report) {
    arena_t a;
    int32_t n, rc;
    if (!valid_model(m, batch) || !x || !y || !arena) return -1;
    for (n = 0; n < batch; n++)
        if (y[n] < 0 || y[n] >= m->classes) return -1;
    memset(&a, 0, sizeof a);
    a.base = arena;
    a.cap = arena_bytes;
    rc = step_impl(m, x, y, batch, seed, step, &a, report);
    if (report) report->arena_high_water = a.high;
    return rc;
}

int ft_forward(const ft_model *m, const int8_t *x, int32_t batch, uint8_t *arena, size_t arena_bytes, int8_t *logits) {
    arena_t a;
    buffers_t b;
    int rc;
    if (!valid_model(m, batch > FT_MAX_BATCH ? FT_MAX_BATCH : batch) || !x || !arena || !logits) return -1;
    int32_t n;
    memset(&a, 0, sizeof a);
    a.base = arena;
    a.cap = arena_bytes;
    for (n = 0; n < batch; n++) { /* one sample at a time, as the step runs */
        a.used = 0;
        a.n = 0;
        memset(&b, 0, sizeof b);
        rc = run_forward(m, x + (size_t)n * out_size(m, 0), 0, &a, &b);
        if (rc) return rc;
        memcpy(logits + (size_t)n * m->classes, b.act[m->n_ops], (size_t)m->classes);
    }
    return 0;
}
