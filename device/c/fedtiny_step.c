/* fedtiny's exact training step (see fedtiny_step.h and fedtiny/int8/exact.py, its specification). */
#include "fedtiny_step.h"

#include <string.h>
#ifdef FT_TRACE
#include <stdio.h>
#define TRACE(...) fprintf(stderr, __VA_ARGS__)
#else
#define TRACE(...) ((void)0)
#endif

#include "fedtiny_int8.h"

/* Tables on the stack are sized by these: firmware sets them to its model's (a 256-entry table is 1 KB
 * of a device's stack per array) */
#ifndef FT_MAX_TENSORS
#define FT_MAX_TENSORS 256
#endif
#ifndef FT_MAX_CLASSES
#define FT_MAX_CLASSES 256
#endif
#define FT_MAX_BATCH 64
#define FT_GRAD_LEVELS 127

int ft_step_abi(void) { return FT_STEP_ABI; }

/* ------------------------------------------------------------------ arena
 *
 * Every buffer of the step comes from take() in an order that depends only on the model and the batch
 * size (never on data). With a plan (ft_model.plan: one offset per take, in order, laid out ahead of
 * time by fedtiny's memory planner from the step's recorded buffer lifetimes) each take returns its
 * planned place and give() does nothing. Without one, blocks are placed first fit, and a recording
 * step logs the lifetimes (ft_step_record) that the planner lays out. */

#ifndef FT_MAX_BLOCKS
#define FT_MAX_BLOCKS 1024 /* live blocks of the first-fit allocator (a planned arena needs none) */
#endif

typedef struct {
    uint8_t *base;                 /* NULL: a sizing pass (bump, no frees: an upper bound) */
    size_t cap, used, high;        /* high: the high-water mark (end of the highest block) */
    const uint32_t *plan;          /* offsets of the takes, in order (NULL: first fit) */
    int32_t plan_len, k;           /* k: takes so far */
    int32_t *log, log_cap, log_len; /* recording: take = its bytes (> 0), give = -(1 + take index) */
    size_t at[FT_MAX_BLOCKS], size[FT_MAX_BLOCKS];  /* first fit: live blocks, sorted by offset */
    int32_t id[FT_MAX_BLOCKS];     /* ... and the take that made each */
    int32_t n;
} arena_t;

static void record(arena_t *a, int32_t v) {
    if (a->log && a->log_len < a->log_cap) a->log[a->log_len] = v;
    if (a->log) a->log_len++;
}

static void *take(arena_t *a, size_t bytes) {
    size_t start = 0, end;
    int32_t i, j;
    bytes = (bytes + 7u) & ~(size_t)7u;
    if (a->base == 0) {
        a->used += bytes;
        a->high = a->used > a->high ? a->used : a->high;
        return 0;
    }
    if (a->plan) {
        if (a->k >= a->plan_len || (size_t)a->plan[a->k] + bytes > a->cap) return 0;
        start = a->plan[a->k++];
    } else {
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
            a->id[j] = a->id[j - 1];
        }
        a->at[i] = start;
        a->size[i] = bytes;
        a->id[i] = a->k++;
        a->n++;
        record(a, (int32_t)bytes);
    }
    a->high = start + bytes > a->high ? start + bytes : a->high;
    TRACE("take %zu at %zu high %zu\n", bytes, start, a->high);
    memset(a->base + start, 0, bytes);
    return a->base + start;
}

static void give(arena_t *a, const void *p) {
    int32_t i;
    if (a->base == 0 || p == 0 || a->plan) return;
    for (i = 0; i < a->n; i++)
        if (a->base + a->at[i] == (const uint8_t *)p) {
            TRACE("give %zu at %zu\n", a->size[i], a->at[i]);
            record(a, -1 - a->id[i]);
            for (; i < a->n - 1; i++) {
                a->at[i] = a->at[i + 1];
                a->size[i] = a->size[i + 1];
                a->id[i] = a->id[i + 1];
            }
            a->n--;
            return;
        }
}

/* A live block keeps only its first `bytes` (an in-place op's smaller output): recorded as its give
 * and a new take of the smaller size, which the plan must place at the same offset. */
static void shrink(arena_t *a, const void *p, size_t bytes) {
    int32_t i;
    if (a->base == 0 || p == 0 || a->plan) {
        if (a->plan) a->k++; /* the plan's entry for the smaller block (the same offset) */
        return;
    }
    bytes = (bytes + 7u) & ~(size_t)7u;
    for (i = 0; i < a->n; i++)
        if (a->base + a->at[i] == (const uint8_t *)p) {
            record(a, -1 - a->id[i]);
            a->size[i] = bytes;
            a->id[i] = a->k++;
            record(a, (int32_t)(bytes | 0x40000000)); /* bit 30: continues the block just given */
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

uint32_t ft_hash32(uint32_t x) { return hash32(x); }

uint32_t ft_stream_base(uint32_t seed, uint32_t step, uint32_t slot) { return stream_base(seed, step, slot); }

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
    return m->ops[m->n_ops - 1].kind == FT_OP_CONV && m->ops[m->n_ops - 1].oc == m->classes && m->classes > 0 &&
           m->classes <= FT_MAX_CLASSES;
}

/* ------------------------------------------------------------------ forward */

/* Output channel o of a convolution (one sample): y[oy * ystride + ox]; mask bits at mask_at + oy * ow + ox. */
static void conv_channel(const ft_op *op, const int8_t *x, int32_t o, int8_t *y, int32_t ystride, uint8_t *mask,
                         size_t mask_at) {
    const int32_t cpg = op->c / op->groups, g = o / (op->oc / op->groups);
    int32_t oy, ox, ci, ky, kx;
    for (oy = 0; oy < op->oh; oy++)
        for (ox = 0; ox < op->ow; ox++) {
            int32_t acc = op->bias[o], v;
            for (ci = 0; ci < cpg; ci++) {
                const int8_t *xc = x + (size_t)(g * cpg + ci) * op->h * op->w;
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
            if (mask && v >= op->act_lo && v <= op->act_hi) {
                const size_t at = mask_at + (size_t)oy * op->ow + ox;
                mask[at >> 3] |= (uint8_t)(1u << (at & 7));
            }
            y[(size_t)oy * ystride + ox] = (int8_t)(v < op->act_lo ? op->act_lo : (v > op->act_hi ? op->act_hi : v));
        }
}

/* The zero-point-padded window a depthwise convolution reads: rows and columns its outputs reach. */
static void padded_dims(const ft_op *dw, int32_t *hp, int32_t *wp) {
    *hp = (dw->oh - 1) * dw->stride + dw->kh;
    *wp = (dw->ow - 1) * dw->stride + dw->kw;
}

/* Depthwise channel o over its padded plane (hp x wp, x_zero outside the input): padding adds
 * (x_zero - x_zero) * w = 0, as skipping it does. */
static void dw_channel(const ft_op *op, const int8_t *pad, int32_t wp, int32_t o, int8_t *y, uint8_t *mask,
                       size_t mask_at) {
    const int8_t *wk = op->weight + (size_t)o * op->kh * op->kw;
    int32_t oy, ox, ky, kx;
    for (oy = 0; oy < op->oh; oy++)
        for (ox = 0; ox < op->ow; ox++) {
            int32_t acc = op->bias[o], v;
            for (ky = 0; ky < op->kh; ky++) {
                const int8_t *row = pad + (size_t)(oy * op->stride + ky) * wp + ox * op->stride;
                for (kx = 0; kx < op->kw; kx++) acc += (int32_t)wk[ky * op->kw + kx] * ((int32_t)row[kx] - op->x_zero);
            }
            v = ft_mbqm(acc, op->mult[o], op->shift[o]) + op->y_zero;
            if (mask && v >= op->act_lo && v <= op->act_hi) {
                const size_t at = mask_at + (size_t)oy * op->ow + ox;
                mask[at >> 3] |= (uint8_t)(1u << (at & 7));
            }
            y[(size_t)oy * op->ow + ox] = (int8_t)(v < op->act_lo ? op->act_lo : (v > op->act_hi ? op->act_hi : v));
        }
}

/* Fill a padded plane with x_zero and copy the h x w plane `in` into it (clipped to the window). */
static void pad_plane(const ft_op *dw, const int8_t *in, int32_t hp, int32_t wp, int8_t *pad) {
    int32_t y, x;
    memset(pad, (int)(int8_t)dw->x_zero, (size_t)hp * wp);
    for (y = 0; y < dw->h; y++) {
        const int32_t py = y + dw->pad_t;
        if (py >= hp) break;
        for (x = 0; x < dw->w; x++) {
            const int32_t px = x + dw->pad_l;
            if (px < wp) pad[(size_t)py * wp + px] = in[(size_t)y * dw->w + x];
        }
    }
}

static size_t max_size(size_t a, size_t b) { return a > b ? a : b; }

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

static void pool_forward(const ft_op *op, const int8_t *x, int8_t *y) {
    const int32_t count = op->h * op->w;
    int32_t c, i;
    for (c = 0; c < op->c; c++) {
        const int8_t *xc = x + (size_t)c * count;
        int32_t s = 0, v;
        for (i = 0; i < count; i++) s += xc[i];
        v = s > 0 ? (s + count / 2) / count : (s - count / 2) / count; /* TFLM: half away from zero */
        y[c] = (int8_t)(v < -128 ? -128 : (v > 127 ? 127 : v));
    }
}

typedef struct {
    int8_t *act[FT_MAX_TENSORS];
    uint8_t *mask[FT_MAX_TENSORS];  /* 1 bit per element: the clamp kept it (ops a gradient flows through) */
    int8_t *saved[FT_MAX_TENSORS];  /* op i: its input's trained channels, for the weight gradient */
    int32_t last[FT_MAX_TENSORS];   /* the last op reading each tensor */
} buffers_t;

static int32_t channel_trained(const ft_op *op, int32_t ch) { return !op->train_channels || op->train_channels[ch]; }
static int32_t channel_slot(const ft_op *op, int32_t ch) { return op->slot_of ? op->slot_of[ch] : ch; }

/* A frozen pointwise expansion (op) and its depthwise reader (dw) run one expanded channel at a time:
 * the expanded tensor never exists whole (the planner's fused pair). */
static int fused_forward(const ft_op *op, const ft_op *dw, const int8_t *x, int8_t *y, arena_t *a) {
    int32_t hp, wp, e;
    int8_t *pad;
    padded_dims(dw, &hp, &wp);
    pad = (int8_t *)take(a, max_size((size_t)op->workspace, (size_t)hp * wp));
    if (!pad) return -2;
    for (e = 0; e < dw->c; e++) {
        memset(pad, (int)(int8_t)dw->x_zero, (size_t)hp * wp);
        /* the pointwise channel e lands inside the padding; rows/columns beyond the window are not read */
        if (op->oh + dw->pad_t <= hp && op->ow + dw->pad_l <= wp) {
            conv_channel(op, x, e, pad + (size_t)dw->pad_t * wp + dw->pad_l, wp, 0, 0);
        } else { /* a window narrower than the plane: compute the channel in the output plane, then pad */
            int8_t *plane = (int8_t *)take(a, (size_t)op->oh * op->ow);
            if (!plane) return -2;
            conv_channel(op, x, e, plane, op->ow, 0, 0);
            pad_plane(dw, plane, hp, wp, pad);
            give(a, plane);
        }
        dw_channel(dw, pad, wp, e, y + (size_t)e * dw->oh * dw->ow, 0, 0);
    }
    give(a, pad);
    return 0;
}

/* A depthwise convolution over its own input (the input's last reader): each channel is copied to the
 * padded workspace, computed into the workspace's output plane and written back over the input. */
static int inplace_forward(const ft_op *op, int8_t *x, uint8_t *mask, arena_t *a) {
    const size_t ohw = (size_t)op->oh * op->ow;
    int32_t hp, wp, o;
    int8_t *pad;
    padded_dims(op, &hp, &wp);
    pad = (int8_t *)take(a, max_size((size_t)op->workspace, (size_t)hp * wp + ohw));
    if (!pad) return -2;
    for (o = 0; o < op->c; o++) { /* output plane o ends before input plane o + 1 starts: ohw <= hw */
        pad_plane(op, x + (size_t)o * op->h * op->w, hp, wp, pad);
        dw_channel(op, pad, wp, o, pad + (size_t)hp * wp, mask, (size_t)o * ohw);
        memcpy(x + (size_t)o * ohw, pad + (size_t)hp * wp, ohw);
    }
    give(a, pad);
    return 0;
}

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
        const int inplace = op->kind == FT_OP_CONV && op->inplace && op->in0 > 0 && b->last[op->in0] == i;
        int rc = 0;
        if (op->kind == FT_OP_CONV && op->fuse_next && i + 1 < m->n_ops) { /* the pair writes tensor i + 2 */
            const ft_op *dw = &m->ops[i + 1];
            b->act[i + 2] = (int8_t *)take(a, (size_t)out_size(m, i + 2));
            if (a->base == 0) {
                take(a, max_size((size_t)op->workspace, (size_t)(dw->oh + dw->kh) * (dw->ow + dw->kw) * 2));
            } else {
                if (!b->act[i + 2]) return -2;
                rc = fused_forward(op, dw, b->act[op->in0], b->act[i + 2], a);
                if (rc) return rc;
            }
            if (op->in0 > 0 && b->last[op->in0] == i) {
                give(a, b->act[op->in0]);
                b->act[op->in0] = 0;
            }
            i++;
            continue;
        }
        b->act[i + 1] = inplace ? b->act[op->in0] : (int8_t *)take(a, count);
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
        if (a->base == 0) {
            if (op->kind == FT_OP_CONV) take(a, max_size((size_t)op->workspace, (size_t)(op->h + op->kh) * (op->w + op->kw) * 2));
            continue;
        }
        if (!b->act[i + 1] || (grads && !b->mask[i + 1])) return -2;
        if (inplace) {
            rc = inplace_forward(op, b->act[i + 1], b->mask[i + 1], a);
            if (rc) return rc;
            shrink(a, b->act[i + 1], count);
            b->act[op->in0] = 0; /* now the output */
        } else if (op->kind == FT_OP_CONV) {
            int32_t o;
            for (o = 0; o < op->oc; o++)
                conv_channel(op, b->act[op->in0], o, b->act[i + 1] + (size_t)o * op->oh * op->ow, op->ow,
                             b->mask[i + 1], (size_t)o * op->oh * op->ow);
        } else if (op->kind == FT_OP_ADD) {
            add_forward(op, b->act[op->in0], b->act[op->in1], count, b->act[i + 1], b->mask[i + 1]);
        } else {
            pool_forward(op, b->act[op->in0], b->act[i + 1]);
        }
        if (op->kind == FT_OP_ADD && op->in1 > 0 && op->in1 != op->in0 && b->last[op->in1] == i) {
            give(a, b->act[op->in1]);
            b->act[op->in1] = 0;
        }
        if (op->in0 > 0 && b->last[op->in0] == i && !inplace) {
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
    int32_t e[FT_MAX_CLASSES];
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

/* ------------------------------------------------------------------ backward */

static int32_t is_depthwise(const ft_op *op) { return op->groups == op->c && op->groups == op->oc; }

/* Weight gradients are held for trained channels only. Row o of that compact array holds the trained
 * input channels of output channel o (depthwise: one row per trained channel); within a row, the
 * element of (ci, ky, kx). */
static int32_t gw_row_elements(const ft_op *op) {
    const int32_t k = op->slot_of ? op->slot_of[op->c] : op->c / op->groups; /* trained channels, stored last */
    return (is_depthwise(op) ? 1 : k) * op->kh * op->kw;
}

static int64_t gw_row(const ft_op *op, int32_t o) { /* -1: output channel o has no trained weight */
    if (is_depthwise(op)) return op->train_channels && !op->train_channels[o] ? -1 : channel_slot(op, o);
    return o;
}

static int64_t gw_elements(const ft_op *op) {
    return (int64_t)(is_depthwise(op) && op->slot_of ? op->slot_of[op->c] : op->oc) * gw_row_elements(op);
}

/* The weight gradient of output channel o into row (gw_row_elements floats, added to). */
static void weight_grad_row(const ft_op *op, const int8_t *x, const int8_t *q, float s, int32_t o, float *row) {
    const int32_t cpg = op->c / op->groups, grp = o / (op->oc / op->groups);
    const int8_t *qo = q + (size_t)o * op->oh * op->ow;
    int32_t ci, ky, kx, oy, ox;
    for (ci = 0; ci < cpg; ci++) {
        const int32_t cin = grp * cpg + ci, sel = is_depthwise(op) ? o : cin;
        const int8_t *xc;
        float *r;
        if (!channel_trained(op, sel)) continue;
        xc = x + (size_t)channel_slot(op, sel) * op->h * op->w; /* the saved plane */
        r = row + (size_t)(is_depthwise(op) ? 0 : channel_slot(op, cin)) * op->kh * op->kw;
        for (ky = 0; ky < op->kh; ky++)
            for (kx = 0; kx < op->kw; kx++) {
                int64_t sum = 0;
                for (oy = 0; oy < op->oh; oy++) {
                    const int32_t iy = oy * op->stride - op->pad_t + ky;
                    if (iy < 0 || iy >= op->h) continue;
                    for (ox = 0; ox < op->ow; ox++) {
                        const int32_t ix = ox * op->stride - op->pad_l + kx;
                        if (ix < 0 || ix >= op->w) continue;
                        sum += (int64_t)qo[oy * op->ow + ox] * ((int32_t)xc[iy * op->w + ix] - op->x_zero);
                    }
                }
                r[ky * op->kw + kx] += (float)sum * s;
            }
    }
}

/* Update row o of a weight from its compact gradient row (NULL: no trained element: gradient 0, which
 * still moves the weight under momentum, as the simulator's optimizer does). */
static void update_weight_row(const ft_model *m, const ft_op *op, int32_t o, const float *row, uint32_t step,
                              uint32_t base) {
    const int32_t cpg = op->c / op->groups, per = cpg * op->kh * op->kw, grp = o / (op->oc / op->groups);
    int32_t j;
    for (j = 0; j < per; j++) {
        const int32_t ci = j / (op->kh * op->kw), kk = j % (op->kh * op->kw);
        const int32_t i = o * per + j, cin = grp * cpg + ci, sel = is_depthwise(op) ? o : cin;
        float gi = 0.0f;
        if (row && channel_trained(op, sel))
            gi = row[(size_t)(is_depthwise(op) ? 0 : channel_slot(op, cin)) * op->kh * op->kw + kk];
        update_one(m, gi, op->qas_w ? &op->qas_w[o] : 0, op->mom_w ? &op->mom_w[i] : 0, step, &op->weight[i], 0,
                   base, (uint32_t)i);
    }
}

/* One sample's backward; `sample` places it in the batch's random stream. The output gradient g is
 * quantized to int8 in its own buffer (byte i overwrites float i / 4, already read). The input gradient
 * is added to gx first (with the old weights); then the parameter gradients are either added to the
 * batch's accumulators gw/gb, or (gw == gb == NULL, one sample per step) applied at once, one output
 * channel at a time, from transient buffers. */
static int conv_backward(const ft_model *m, const ft_op *op, int32_t sample, const int8_t *x, const uint8_t *mask,
                         float *g, float *gx, float *gw, float *gb, int32_t apply, uint32_t seed, uint32_t step,
                         arena_t *a) {
    const size_t count = (size_t)op->oc * op->oh * op->ow;
    const size_t hw = (size_t)op->oh * op->ow;
    const int32_t cpg = op->c / op->groups, opg = op->oc / op->groups;
    int8_t *q = (int8_t *)g;
    float amax = 0.0f, s;
    size_t i;
    int32_t o, oy, ox, ci, ky, kx;
    /* a = g * mask * m[o], computed twice (for the max, then to quantize) rather than stored */
#define FT_GRAD_A(i) ((g[i] * (float)((mask[(i) >> 3] >> ((i) & 7)) & 1u)) * op->eff_scale[((i) / hw) % op->oc])
    for (i = 0; i < count; i++) {
        const float v = FT_GRAD_A(i);
        amax = (v < 0 ? -v : v) > amax ? (v < 0 ? -v : v) : amax;
    }
    if (amax == 0.0f) {
        s = 1.0f;
        memset(q, 0, count);
    } else {
        const uint32_t base = stream_base(seed, step, (uint32_t)(2 * op->slot));
        s = amax / (float)FT_GRAD_LEVELS;
        for (i = 0; i < count; i++) {
            const int32_t v = floor_f32(FT_GRAD_A(i) / s + uniform_at(base, (uint32_t)((size_t)sample * count + i)));
            q[i] = (int8_t)(v < -FT_GRAD_LEVELS ? -FT_GRAD_LEVELS : (v > FT_GRAD_LEVELS ? FT_GRAD_LEVELS : v));
        }
    }
#undef FT_GRAD_A
    if (gx) /* gx += s * sum_o,k q * w, one input element at a time (integer sum, then one float add) */
        for (ci = 0; ci < op->c; ci++) {
            const int32_t grp = ci / cpg, cl = ci % cpg;
            int32_t iy, ix;
            for (iy = 0; iy < op->h; iy++)
                for (ix = 0; ix < op->w; ix++) {
                    int64_t sum = 0;
                    for (o = grp * opg; o < (grp + 1) * opg; o++) {
                        const int8_t *qo = q + (size_t)o * hw;
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
                    gx[((size_t)ci * op->h + iy) * op->w + ix] += (float)sum * s;
                }
        }
    if (op->train_b) {
        float *b = apply ? (float *)take(a, (size_t)op->oc * sizeof(float)) : gb;
        if (!b) return -2;
        for (o = 0; o < op->oc; o++) {
            int64_t sum = 0;
            for (i = 0; i < hw; i++) sum += q[(size_t)o * hw + i];
            b[o] += (float)sum * s;
        }
        if (apply) {
            for (o = 0; o < op->oc; o++)
                update_one(m, b[o], op->qas_b ? &op->qas_b[o] : 0, op->mom_b ? &op->mom_b[o] : 0, step, 0,
                           &op->bias[o], 0, (uint32_t)o);
            give(a, b);
        }
    }
    if (op->train_w) {
        const size_t per = (size_t)gw_row_elements(op);
        const uint32_t base = stream_base(seed, step, (uint32_t)(2 * op->slot + 1));
        float *row = apply ? (float *)take(a, per * sizeof(float)) : 0;
        if (apply && !row) return -2;
        for (o = 0; o < op->oc; o++) {
            const int64_t r = gw_row(op, o);
            if (!apply) {
                if (r >= 0) weight_grad_row(op, x, q, s, o, gw + (size_t)r * per);
                continue;
            }
            if (r >= 0) {
                memset(row, 0, per * sizeof(float));
                weight_grad_row(op, x, q, s, o, row);
            }
            update_weight_row(m, op, o, r >= 0 ? row : 0, step, base);
        }
        give(a, row);
    }
    return 0;
}

/* ------------------------------------------------------------------ the step */

/* The samples are x (contiguous, batch x in_size) or, when xs is given, one pointer each (a device's samples
 * read where they lie, in the order it chose: no batch copied into RAM). */
static int step_impl(const ft_model *m, const int8_t *x, const int8_t *const *xs, const int32_t *y, int32_t batch,
                     uint32_t seed, uint32_t step, arena_t *a, ft_step_report *rep) {
    buffers_t b;
    uint8_t needs[FT_MAX_TENSORS];
    float *grad[FT_MAX_TENSORS];
    float *gw[FT_MAX_TENSORS], *gb[FT_MAX_TENSORS];
    const size_t in_size = (size_t)out_size(m, 0);
    size_t mark;
    int32_t i, n, rc, held, held_k;
    /* which tensors a gradient reaches (as autograd's requires_grad) */
    needs[0] = 0;
    for (i = 0; i < m->n_ops; i++) {
        const ft_op *op = &m->ops[i];
        needs[i + 1] = (uint8_t)(needs[op->in0] || (op->kind == FT_OP_ADD && needs[op->in1]) ||
                                 (op->kind == FT_OP_CONV && (op->train_w || op->train_b)));
    }
    /* more than one sample: the trained tensors' gradients, summed over the batch, held over the step */
    for (i = 0; i < m->n_ops; i++) {
        const ft_op *op = &m->ops[i];
        gw[i] = gb[i] = 0;
        if (op->kind != FT_OP_CONV || batch == 1) continue;
        if (op->train_w) gw[i] = (float *)take(a, (size_t)gw_elements(op) * 4);
        if (op->train_b) gb[i] = (float *)take(a, (size_t)op->oc * 4);
        if (a->base && ((op->train_w && !gw[i]) || (op->train_b && !gb[i]))) return -2;
    }
    mark = a->used;
    held = a->n; /* the parameter gradients: the lowest blocks, kept over the samples */
    held_k = a->k;
    /* one sample at a time (micro-batch 1): its activations, masks and activation gradients */
    for (n = 0; n < batch; n++) {
        a->used = mark;
        a->n = held;
        a->k = held_k; /* every sample takes the same buffers: the plan's entries repeat */
        if (n == 1) a->log = 0; /* a recording holds the first sample's */
        memset(&b, 0, sizeof b);
        memset(grad, 0, sizeof grad);
        rc = run_forward(m, xs ? xs[n] : x + (size_t)n * in_size, needs, a, &b);
        if (rc) return rc;
        if (a->base == 0) { /* sizing (an upper bound): every gradient and the largest backward's temporaries */
            size_t most = 0;
            for (i = 0; i <= m->n_ops; i++)
                if (needs[i]) take(a, (size_t)out_size(m, i) * sizeof(float));
            for (i = 0; i < m->n_ops; i++)
                if (m->ops[i].kind == FT_OP_CONV) {
                    size_t c = ((size_t)m->ops[i].oc + (size_t)gw_row_elements(&m->ops[i])) * sizeof(float) + 32;
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
            float *g = grad[i + 1];
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
                                   gw[i], gb[i], batch == 1, seed, step, a);
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
    if (batch == 1) return 0; /* applied during the backward */
    for (i = 0; i < m->n_ops; i++) {
        const ft_op *op = &m->ops[i];
        int32_t o;
        if (op->kind != FT_OP_CONV) continue;
        if (gw[i]) {
            const uint32_t base = stream_base(seed, step, (uint32_t)(2 * op->slot + 1));
            for (o = 0; o < op->oc; o++) {
                const int64_t r = gw_row(op, o);
                update_weight_row(m, op, o, r >= 0 ? gw[i] + (size_t)r * gw_row_elements(op) : 0, step, base);
            }
        }
        if (gb[i])
            for (o = 0; o < op->oc; o++)
                update_one(m, gb[i][o], op->qas_b ? &op->qas_b[o] : 0, op->mom_b ? &op->mom_b[o] : 0, step, 0,
                           &op->bias[o], 0, (uint32_t)o);
    }
    return 0;
}

size_t ft_step_arena_bytes(const ft_model *m, int32_t batch) {
    arena_t a;
    int8_t dummy = 0;
    int32_t ydummy = 0;
    if (!valid_model(m, batch)) return 0;
    memset(&a, 0, sizeof a);
    if (step_impl(m, &dummy, 0, &ydummy, batch, 0, 0, &a, 0)) return 0;
    return a.high + 64;
}

static int train_step(const ft_model *m, const int8_t *x, const int8_t *const *xs, const int32_t *y, int32_t batch,
                      uint32_t seed, uint32_t step, uint8_t *arena, size_t arena_bytes, ft_step_report *report) {
    arena_t a;
    int32_t n, rc;
    if (!valid_model(m, batch) || (!x && !xs) || !y || !arena) return -1;
    for (n = 0; n < batch; n++)
        if (y[n] < 0 || y[n] >= m->classes || (xs && !xs[n])) return -1;
    memset(&a, 0, sizeof a);
    a.base = arena;
    a.cap = arena_bytes;
    if (m->plan && (m->plan_batch > 1) == (batch > 1)) { /* a plan holds accumulators or not */
        a.plan = m->plan;
        a.plan_len = m->plan_len;
    }
    rc = step_impl(m, x, xs, y, batch, seed, step, &a, report);
    if (report) report->arena_high_water = a.high;
    return rc;
}

int ft_train_step(const ft_model *m, const int8_t *x, const int32_t *y, int32_t batch, uint32_t seed, uint32_t step,
                  uint8_t *arena, size_t arena_bytes, ft_step_report *report) {
    return x ? train_step(m, x, 0, y, batch, seed, step, arena, arena_bytes, report) : -1;
}

int ft_train_step_samples(const ft_model *m, const int8_t *const *xs, const int32_t *y, int32_t batch, uint32_t seed,
                          uint32_t step, uint8_t *arena, size_t arena_bytes, ft_step_report *report) {
    return xs ? train_step(m, 0, xs, y, batch, seed, step, arena, arena_bytes, report) : -1;
}

int32_t ft_step_record(const ft_model *m, const int8_t *x, const int32_t *y, int32_t batch, uint8_t *arena,
                       size_t arena_bytes, int32_t *log, int32_t log_cap) {
    arena_t a;
    int32_t n, rc;
    if (!valid_model(m, batch) || !x || !y || !arena || !log || log_cap <= 0) return -1;
    for (n = 0; n < batch; n++)
        if (y[n] < 0 || y[n] >= m->classes) return -1;
    memset(&a, 0, sizeof a);
    a.base = arena;
    a.cap = arena_bytes;
    a.log = log;
    a.log_cap = log_cap;
    rc = step_impl(m, x, 0, y, batch, 0, 0, &a, 0);
    if (rc) return rc;
    return a.log_len <= log_cap ? a.log_len : -3;
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
