/* fedtiny's exact training step: the loss, TFLM's fixed-point softmax of the int8 logits (gemmlowp's exp), and
 * the gradient of the batch's mean loss w.r.t. the logits (fedtiny_step_internal.h). */
#include "fedtiny_int8.h"
#include "fedtiny_step_internal.h"

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

void ft_loss_grad(const ft_model *m, const int8_t *q, int32_t label, int32_t sample, int32_t batch, float *g,
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
