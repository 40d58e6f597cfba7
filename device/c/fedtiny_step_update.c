/* fedtiny's exact training step: the update (fedtiny_step_internal.h): each parameter's gradient times its QAS
 * scale, momentum, the learning rate, then the weight rounded to int8 (stochastically or to nearest) or the
 * bias to int32. */
#include <stdint.h>

#include "fedtiny_step_internal.h"

/* round half away from zero without libm */
static int64_t round_half_away_f32(float x) {
    float t = x + (x >= 0.0f ? 0.5f : -0.5f);
    if (t >= 4.0e18f) return (int64_t)4e18;
    if (t <= -4.0e18f) return -(int64_t)4e18;
    return (int64_t)t; /* conversion truncates: trunc(x + copysign(0.5, x)) */
}

/* One parameter from its gradient gi: an int8 weight w8 (element `index` of the stream at base) or an int32
 * bias b32 */
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
        int64_t v = m->stochastic ? ft_floor_f32(t + ft_uniform_at(base, index)) : round_half_away_f32(t);
        *w8 = (int8_t)(v < -127 ? -127 : (v > 127 ? 127 : v));
    } else {
        const int64_t v = (int64_t)*b32 + round_half_away_f32(-d);
        *b32 = (int32_t)(v < INT32_MIN ? INT32_MIN : (v > INT32_MAX ? INT32_MAX : v));
    }
}

/* The biases of op from their gradients g (oc floats) */
void ft_update_bias(const ft_model *m, const ft_op *op, const float *g, uint32_t step) {
    int32_t o;
    for (o = 0; o < op->oc; o++)
        update_one(m, g[o], op->qas_b ? &op->qas_b[o] : 0, op->mom_b ? &op->mom_b[o] : 0, step, 0, &op->bias[o], 0,
                   (uint32_t)o);
}

/* n elements of a weight row from g (NULL: gradient 0); with_g, with_mom and stochastic fixed at the call
 * sites of stochastic rounding so that each combination compiles to its own loop (update_one's arithmetic,
 * in order) */
static inline __attribute__((always_inline)) void update_span(int8_t *w, float *mom, const float *g, int32_t n,
                                                              float qas, float lr, float momentum, int32_t first,
                                                              uint32_t base, uint32_t i0, const int with_g,
                                                              const int with_mom, const int stochastic) {
    const float g0 = 0.0f * qas;
    int32_t t;
    for (t = 0; t < n; t++) {
        float gi = with_g ? g[t] * qas : g0, tw;
        int32_t v;
        if (with_mom) {
            mom[t] = first ? gi : mom[t] * momentum + gi;
            gi = mom[t];
        }
        tw = (float)w[t] - gi * lr;
        if (stochastic) {
            v = ft_floor_f32(tw + ft_uniform_at(base, i0 + (uint32_t)t));
        } else { /* a 64-bit rounding: tw may lie beyond int32 */
            const int64_t r = round_half_away_f32(tw);
            v = (int32_t)(r < -128 ? -128 : (r > 127 ? 127 : r));
        }
        v = v < -127 ? -127 : v;
        w[t] = (int8_t)(v > 127 ? 127 : v);
    }
}

/* Update row o of a weight from its compact gradient row (NULL: no trained element: gradient 0, which
 * still moves the weight under momentum, as the simulator's optimizer does). */
void ft_update_weight_row(const ft_model *m, const ft_op *op, int32_t o, const float *row, uint32_t step,
                          uint32_t base) {
    /* update_one's arithmetic with the step's settings in locals: an int8 store may alias them. Without QAS
     * the scale is 1, and g * 1 is g. */
    const int32_t cpg = op->c / op->groups, kk = op->kh * op->kw, grp = o / (op->oc / op->groups);
    const float lr = m->lr, momentum = m->momentum, qas = op->qas_w ? op->qas_w[o] : 1.0f;
    const int32_t with_mom = momentum > 0.0f, first = step == 0;
    int8_t *const w = op->weight;
    float *const mom = op->mom_w;
    int32_t ci, i = o * cpg * kk, run;
    /* runs of input channels alike (all trained, with consecutive gradient slots, or all not): one span each,
     * so that a pointwise row (one element per channel) is a few spans rather than a span per element */
    for (ci = 0; ci < cpg; ci += run, i += run * kk) {
        const int32_t cin = grp * cpg + ci, sel = ft_is_depthwise(op) ? o : cin;
        const float *g = row && ft_channel_trained(op, sel) ? row + (size_t)ft_row_slot(op, ci, cin) * kk : 0;
        float *mo = with_mom ? mom + i : 0;
        int32_t n;
        if (ft_is_depthwise(op))
            run = 1;
        else if (!op->train_channels && !op->slot_of) /* every channel trained */
            run = cpg;
        else if (g) { /* trained channels with consecutive slots */
            const int32_t slot = ft_channel_slot(op, cin);
            for (run = 1; ci + run < cpg && ft_channel_trained(op, cin + run) &&
                          ft_channel_slot(op, cin + run) == slot + run;)
                run++;
        } else /* frozen channels (or no gradient at all) */
            for (run = 1; ci + run < cpg && !(row && ft_channel_trained(op, cin + run));) run++;
        n = run * kk;
        if (!m->stochastic) /* nearest rounding: one loop with the choices read as it goes */
            update_span(w + i, mo, g, n, qas, lr, momentum, first, base, (uint32_t)i, g != 0, with_mom, 0);
        else if (g && with_mom)
            update_span(w + i, mo, g, n, qas, lr, momentum, first, base, (uint32_t)i, 1, 1, 1);
        else if (g)
            update_span(w + i, mo, g, n, qas, lr, momentum, first, base, (uint32_t)i, 1, 0, 1);
        else if (with_mom)
            update_span(w + i, mo, g, n, qas, lr, momentum, first, base, (uint32_t)i, 0, 1, 1);
        else
            update_span(w + i, mo, g, n, qas, lr, momentum, first, base, (uint32_t)i, 0, 0, 1);
    }
}

/* More than one sample per step: the batch's summed parameter gradients applied once, after its last sample */
void ft_update_batch(const ft_model *m, float *const *gw, float *const *gb, uint32_t seed, uint32_t step,
                     ft_arena *a) {
    int32_t i;
    for (i = 0; i < m->n_ops; i++) {
        const ft_op *op = &m->ops[i];
        int32_t o;
        PROFILE_BEGIN(t_update);
        if (op->kind != FT_OP_CONV) continue;
        if (gw[i]) {
            const uint32_t base = ft_stream_base(seed, step, (uint32_t)(2 * op->slot + 1));
            for (o = 0; o < op->oc; o++) {
                const int64_t r = ft_gw_row(op, o);
                ft_update_weight_row(m, op, o, r >= 0 ? gw[i] + (size_t)r * ft_gw_row_elements(op) : 0, step, base);
            }
        }
        if (gb[i]) ft_update_bias(m, op, gb[i], step);
        PROFILE_END(t_update, i, FT_PART_UPDATE);
        if (gw[i]) CHECK_TENSOR(a, i, FT_CHECK_WEIGHT, op->weight, (size_t)op->oc * (op->c / op->groups) * op->kh * op->kw);
        if (gb[i]) CHECK_TENSOR(a, i, FT_CHECK_BIAS, op->bias, (size_t)op->oc * sizeof(int32_t));
    }
}
