/* fedtiny's exact training step (see fedtiny_step.h and fedtiny/int8/exact.py, its specification): the public
 * entry points, the model's checks and the step's driver. The parts are in fedtiny_step_*.c (the list in
 * fedtiny_step_internal.h). */
#include <stddef.h>
#include <string.h>

#include "fedtiny_kernels.h"
#include "fedtiny_step_internal.h"

#define FT_MAX_BATCH 64

int ft_step_abi(void) { return FT_STEP_ABI; }

/* ------------------------------------------------------------------ the model's ops (every part asks) */

/* The tensor ids an op reads, in order (CONCAT: in0, in1, then in_more); returns how many. */
int32_t ft_op_inputs(const ft_op *op, int32_t *ins) {
    int32_t k;
    ins[0] = op->in0;
    if (op->kind == FT_OP_ADD || op->kind == FT_OP_MUL) {
        ins[1] = op->in1;
        return 2;
    }
    if (op->kind != FT_OP_CONCAT) return 1;
    ins[1] = op->in1;
    for (k = 2; k < op->n_in; k++) ins[k] = op->in_more[k - 2];
    return op->n_in;
}

int32_t ft_is_pointwise(const ft_op *op) {
    return op->kh == 1 && op->kw == 1 && op->stride == 1 && op->groups == 1 && op->pad_t == 0 && op->pad_l == 0 &&
           op->oh == op->h && op->ow == op->w;
}

/* ------------------------------------------------------------------ checks */

/* Every output channel's multiplier in [0, 2^31) and shift in [-31, 30], as TFLM's QuantizeMultiplier makes
 * them: requant_value's arithmetic (fedtiny_step_forward.c) relies on both. */
static int valid_requant(const ft_op *op) {
    int32_t o;
    if (op->kind == FT_OP_ADD)
        return ft_valid_multiplier(op->m1, op->s1) && ft_valid_multiplier(op->m2, op->s2) &&
               ft_valid_multiplier(op->mo, op->so) && op->left_shift >= 0 && op->left_shift <= 30;
    if (op->kind == FT_OP_MUL || op->kind == FT_OP_MEAN) return ft_valid_multiplier(op->mo, op->so);
    if (op->kind != FT_OP_CONV) return 1;
    for (o = 0; o < op->oc; o++)
        if (!ft_valid_multiplier(op->mult[o], op->shift[o])) return 0;
    return 1;
}

/* The geometry of an op without parameters (its inputs already checked to be earlier tensors): what its
 * forward and backward index stays inside its tensors. */
static int valid_elementwise(const ft_model *m, const ft_op *op) {
    const int64_t hw = (int64_t)op->h * op->w, ohw = (int64_t)op->oh * op->ow, count = op->oc * ohw;
    int32_t ins[FT_MAX_INPUTS], n_in, k;
    int64_t total = 0;
    if (op->c <= 0 || hw <= 0 || op->oc <= 0 || ohw <= 0 || (int64_t)op->c * hw != ft_out_size(m, op->in0)) return 0;
    switch (op->kind) {
    case FT_OP_ADD: return ft_out_size(m, op->in1) == count && ft_out_size(m, op->in0) == count;
    case FT_OP_POOL: /* windows that do not overlap (the backward's one share per input), each with a tap inside */
        return op->oc == op->c && op->kh > 0 && op->kw > 0 && op->stride > 0 && op->pad_t >= 0 && op->pad_l >= 0 &&
               op->pad_t < op->kh && op->pad_l < op->kw && (op->kh <= op->stride || op->oh == 1) &&
               (op->kw <= op->stride || op->ow == 1) && (int64_t)(op->oh - 1) * op->stride - op->pad_t < op->h &&
               (int64_t)(op->ow - 1) * op->stride - op->pad_l < op->w;
    case FT_OP_MEAN: return op->oc == op->c && ohw == 1;
    case FT_OP_MAXPOOL:
        return op->oc == op->c && op->kh > 0 && op->kw > 0 && op->kh * op->kw < 255 && op->stride > 0 &&
               op->pad_t >= 0 && op->pad_l >= 0;
    case FT_OP_MUL: /* the second input whole or one value per channel */
        return ft_out_size(m, op->in0) == count &&
               (ft_out_size(m, op->in1) == count || ft_out_size(m, op->in1) == op->oc);
    case FT_OP_CONCAT:
        if (op->n_in < 2 || op->n_in > FT_MAX_INPUTS || (op->n_in > 2 && !op->in_more) || op->oh != op->h ||
            op->ow != op->w)
            return 0;
        for (k = 2; k < op->n_in; k++)
            if (op->in_more[k - 2] < 0 || op->in_more[k - 2] > (int32_t)(op - m->ops)) return 0;
        for (k = 0, n_in = ft_op_inputs(op, ins); k < n_in; k++) {
            if (ft_out_size(m, ins[k]) % ohw) return 0;
            total += ft_out_size(m, ins[k]);
        }
        return total == count;
    case FT_OP_LOOKUP: return op->table && op->slope && count == (int64_t)op->c * hw;
    case FT_OP_SLICE:
        return op->oc == 0 || (op->begin_c >= 0 && op->begin_h >= 0 && op->begin_w >= 0 && op->step_c > 0 &&
                               op->step_h > 0 && op->step_w > 0 && op->begin_c + (op->oc - 1) * op->step_c < op->c &&
                               op->begin_h + (op->oh - 1) * op->step_h < op->h &&
                               op->begin_w + (op->ow - 1) * op->step_w < op->w);
    case FT_OP_RESIZE: /* integer factors */
        return op->oc == op->c && op->oh >= op->h && op->ow >= op->w && op->oh % op->h == 0 && op->ow % op->w == 0;
    default: return 0;
    }
}

static int valid_model(const ft_model *m, int32_t batch) {
    int32_t i;
    if (!m || m->n_ops <= 0 || m->n_ops >= FT_MAX_TENSORS || !m->ops || batch <= 0 || batch > FT_MAX_BATCH) return 0;
    for (i = 0; i < m->n_ops; i++) {
        const ft_op *op = &m->ops[i];
        if (op->kind < FT_OP_CONV || op->kind > FT_OP_RESIZE) return 0;
        if (op->in0 < 0 || op->in0 > i || ((op->kind == FT_OP_ADD || op->kind == FT_OP_MUL || op->kind == FT_OP_CONCAT) &&
                                           (op->in1 < 0 || op->in1 > i)))
            return 0;
        if (op->kind == FT_OP_CONV && (!op->weight || !op->bias || !op->mult || !op->shift || op->groups <= 0 ||
                                       op->stride <= 0 || op->c % op->groups || op->oc % op->groups))
            return 0;
        if (op->kind != FT_OP_CONV && !valid_elementwise(m, op)) return 0;
        if (!valid_requant(op)) return 0;
        /* the backward's int32 sums: an input gradient element's (output channels of its group x taps)
         * and a weight gradient element's (outputs) */
        if (op->kind == FT_OP_CONV && (!ft_kernels_fit((int64_t)(op->oc / op->groups) * op->kh * op->kw) ||
                                       !ft_kernels_fit((int64_t)op->oh * op->ow)))
            return 0;
    }
    return m->ops[m->n_ops - 1].kind == FT_OP_CONV && m->ops[m->n_ops - 1].oc == m->classes && m->classes > 0 &&
           m->classes <= FT_MAX_CLASSES;
}

/* ------------------------------------------------------------------ the step */

/* The samples are x (contiguous, batch x in_size) or, when xs is given, one pointer each (a device's samples
 * read where they lie, in the order it chose: no batch copied into RAM). */
static int step_impl(const ft_model *m, const int8_t *x, const int8_t *const *xs, const int32_t *y, int32_t batch,
                     uint32_t seed, uint32_t step, ft_arena *a, ft_step_report *rep) {
    ft_buffers b;
    uint8_t needs[FT_MAX_TENSORS];
    float *grad[FT_MAX_TENSORS];
    float *gw[FT_MAX_TENSORS], *gb[FT_MAX_TENSORS];
    const size_t in_size = (size_t)ft_out_size(m, 0);
    size_t mark;
    int32_t i, n, rc, held, held_k;
    /* which tensors a gradient reaches (as autograd's requires_grad) */
    needs[0] = 0;
    for (i = 0; i < m->n_ops; i++) {
        const ft_op *op = &m->ops[i];
        int32_t ins[FT_MAX_INPUTS], k, n_in = ft_op_inputs(op, ins);
        needs[i + 1] = (uint8_t)(op->kind == FT_OP_CONV && (op->train_w || op->train_b));
        for (k = 0; k < n_in; k++) needs[i + 1] |= needs[ins[k]];
    }
    /* more than one sample: the trained tensors' gradients, summed over the batch, held over the step */
    for (i = 0; i < m->n_ops; i++) {
        const ft_op *op = &m->ops[i];
        gw[i] = gb[i] = 0;
        if (op->kind != FT_OP_CONV || batch == 1) continue;
        if (op->train_w) gw[i] = (float *)ft_take(a, (size_t)ft_gw_elements(op) * 4);
        if (op->train_b) gb[i] = (float *)ft_take(a, (size_t)op->oc * 4);
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
        rc = ft_run_forward(m, xs ? xs[n] : x + (size_t)n * in_size, needs, a, &b);
        if (rc) return rc;
        if (a->base == 0) { /* sizing (an upper bound): every gradient and the largest backward's temporaries */
            size_t most = 0;
            for (i = 0; i <= m->n_ops; i++)
                if (needs[i]) ft_take(a, (size_t)ft_out_size(m, i) * sizeof(float));
            for (i = 0; i < m->n_ops; i++)
                if (m->ops[i].kind == FT_OP_CONV) {
                    size_t c = ((size_t)m->ops[i].oc + (size_t)ft_gw_row_elements(&m->ops[i])) * sizeof(float) + 32;
                    most = c > most ? c : most;
                }
            a->used += most;
            a->high = a->used > a->high ? a->used : a->high;
            return 0;
        }
        if (!needs[m->n_ops]) return 0; /* nothing trained */
        grad[m->n_ops] = (float *)ft_take(a, (size_t)m->classes * sizeof(float));
        if (!grad[m->n_ops]) return -2;
        ft_loss_grad(m, b.act[m->n_ops], y[n], n, batch, grad[m->n_ops], rep);
        ft_give(a, b.act[m->n_ops]);
        for (i = m->n_ops - 1; i >= 0; i--) {
            const ft_op *op = &m->ops[i];
            float *g = grad[i + 1], *gx[FT_MAX_INPUTS];
            int32_t ins[FT_MAX_INPUTS], k, n_in;
            if (!g) continue;
            n_in = ft_op_inputs(op, ins);
            for (k = 0; k < n_in; k++) { /* the input gradients this op adds to, allocated at their first writer */
                const int32_t t = ins[k];
                if (t > 0 && needs[t] && !grad[t]) {
                    grad[t] = (float *)ft_take(a, (size_t)ft_out_size(m, t) * sizeof(float));
                    if (!grad[t]) return -2;
                }
                gx[k] = needs[t] ? grad[t] : 0;
            }
            if (op->kind == FT_OP_CONV) {
                rc = ft_conv_backward(m, op, i, n, b.saved[i], b.mask[i + 1], g, gx[0], gw[i], gb[i], batch == 1,
                                      seed, step, a);
                if (rc) return rc;
            } else {
                ft_elementwise_backward(m, op, b.saved[i], b.mask[i + 1], g, gx);
                if (gx[0]) CHECK_TENSOR(a, i, FT_CHECK_GRAD_IN, gx[0], (size_t)ft_out_size(m, op->in0) * sizeof(float));
            }
            ft_give(a, grad[i + 1]); /* consumed: its producer's backward is done */
            grad[i + 1] = 0;
            ft_give(a, b.mask[i + 1]);
            ft_give(a, b.saved[i]);
        }
    }
    a->n = held;
    if (batch == 1) return 0; /* applied during the backward */
    ft_update_batch(m, gw, gb, seed, step, a);
    return 0;
}

size_t ft_step_arena_bytes(const ft_model *m, int32_t batch) {
    ft_arena a;
    int8_t dummy = 0;
    int32_t ydummy = 0;
    if (!valid_model(m, batch)) return 0;
    memset(&a, 0, sizeof a);
    if (step_impl(m, &dummy, 0, &ydummy, batch, 0, 0, &a, 0)) return 0;
    return a.high + 64;
}

static int train_step(const ft_model *m, const int8_t *x, const int8_t *const *xs, const int32_t *y, int32_t batch,
                      uint32_t seed, uint32_t step, uint8_t *arena, size_t arena_bytes, ft_step_report *report) {
    ft_arena a;
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
    ft_arena a;
    int32_t n, rc;
    if (!valid_model(m, batch) || !x || !y || !arena || !log || log_cap <= 0) return -1;
    for (n = 0; n < batch; n++)
        if (y[n] < 0 || y[n] >= m->classes) return -1;
    memset(&a, 0, sizeof a);
    a.base = arena;
    a.cap = arena_bytes;
    a.log = log;
    a.quiet = 1;
    a.log_cap = log_cap;
    rc = step_impl(m, x, 0, y, batch, 0, 0, &a, 0);
    if (rc) return rc;
    return a.log_len <= log_cap ? a.log_len : -3;
}

int ft_forward(const ft_model *m, const int8_t *x, int32_t batch, uint8_t *arena, size_t arena_bytes, int8_t *logits) {
    ft_arena a;
    ft_buffers b;
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
        rc = ft_run_forward(m, x + (size_t)n * ft_out_size(m, 0), 0, &a, &b);
        if (rc) return rc;
        memcpy(logits + (size_t)n * m->classes, b.act[m->n_ops], (size_t)m->classes);
    }
    return 0;
}
