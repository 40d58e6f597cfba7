/* fedtiny's exact training step in C99: the int8 forward (TFLM's arithmetic), the sparse backward
 * and the update, exactly as fedtiny/int8/exact.py specifies them, so that a device's update equals
 * the simulator's bit for bit. No dynamic allocation: every buffer lives in one caller-provided
 * arena. Float32 is used only elementwise (an FPU helps; build with -ffp-contract=off so that no
 * multiply-add is fused); every sum is an integer sum.
 *
 * Samples are processed one at a time (micro-batch 1, as a 256KB device trains). With one sample per
 * step each parameter gradient is applied as soon as it is computed, one output channel at a time
 * (after the input gradient, which needs the old weights); with more, the batch's parameter
 * gradients are summed in fp32 accumulators held over the step. The arena follows the memory
 * planner's decisions (fedtiny/budget/memory.py), passed in per op: depthwise convolutions in place,
 * frozen pointwise + depthwise pairs fused one expanded channel at a time, the planner's workspace.
 *
 * Supported graph: convolutions (regular, depthwise, pointwise, a fully connected head as a 1x1
 * convolution), ADD, AVERAGE_POOL_2D (global, or windows that do not overlap), MAX_POOL_2D, MEAN over
 * H and W, MUL (the second input equal or broadcast over H and W), CONCATENATION along channels,
 * elementwise lookups (LOGISTIC, HARD_SWISH, an int8 QUANTIZE: a 256-entry table and its slope),
 * STRIDED_SLICE and RESIZE_NEAREST_NEIGHBOR by integer factors, NCHW tensors, in topological order. */
#ifndef FEDTINY_STEP_H
#define FEDTINY_STEP_H

#include <stddef.h>
#include <stdint.h>

#define FT_STEP_ABI 5

#include "fedtiny_op_kinds.h"           /* enum ft_op_kind, written from Python's CKind */

#define FT_MAX_INPUTS 10              /* inputs of an op at most (TFLM's CONCATENATION takes 10) */

/* One op. Tensor ids: 0 is the int8 input, op i writes tensor i + 1. */
typedef struct {
    int32_t kind;
    int32_t in0, in1;                 /* input tensor ids (in1: ADD, MUL, CONCAT) */
    int32_t c, h, w;                  /* input shape (per sample; in0's) */
    int32_t oc, oh, ow;               /* output shape (per sample) */
    /* convolution (MAXPOOL: kh, kw, stride, pad_t, pad_l, act_lo, act_hi; POOL: kh, kw, stride, pad_t, pad_l) */
    int32_t kh, kw, stride, groups, pad_t, pad_l;
    int32_t x_zero, y_zero, act_lo, act_hi;
    int8_t *weight;                   /* oc x (c / groups) x kh x kw, updated in place */
    int32_t *bias;                    /* oc, updated in place */
    const int32_t *mult, *shift;      /* TFLM's per-channel multipliers */
    const float *eff_scale;           /* s_x s_w / s_y per channel (float32), for the backward */
    const float *qas_w, *qas_b;       /* QAS factors per channel (NULL: plain SGD) */
    const uint8_t *train_channels;    /* per input channel (per channel for depthwise); NULL: all */
    const int32_t *slot_of;           /* per channel of train_channels: its rank among the trained (-1 frozen) */
    int32_t train_w, train_b, slot;
    int32_t inplace;                  /* depthwise: the output overwrites the input (its last reader) */
    int32_t fuse_next;                /* frozen pointwise whose only reader, the next op (depthwise), runs fused */
    int32_t workspace;                /* bytes of scratch the planner gives this op (or the fused pair) */
    float *mom_w, *mom_b;             /* momentum buffers (caller's, persistent over steps) */
    /* ADD: TFLM's parameters and the backward's ratios s_a / s_y, s_b / s_y.
     * MUL: z1, z2 the inputs' zero points, z_out, mo / so TFLM's multiplier of s_a s_b / s_y (act_lo, act_hi:
     * the fused activation), ratio_a = f32(s_a s_b / s_y). MEAN: z1 the input's zero point, z_out, mo / so
     * TFLM's multiplier with 1 / (h w) folded in (QuantizedMeanOrSum's), ratio_a = f32(s_x / s_y). */
    int32_t z1, z2, z_out, left_shift, m1, s1, m2, s2, mo, so;
    float ratio_a, ratio_b;
    /* CONCAT: n_in inputs (in0, in1, then in_more[0 .. n_in - 3]) joined along channels */
    int32_t n_in;
    const int32_t *in_more;
    /* SLICE: output (c, y, x) is input (begin_c + c step_c, begin_h + y step_h, begin_w + x step_w) */
    int32_t begin_c, begin_h, begin_w, step_c, step_h, step_w;
    /* LOOKUP: y = table[x + 128]; the backward's g * slope[x + 128] */
    const int8_t *table;
    const float *slope;
} ft_op;

typedef struct {
    int32_t n_ops;
    ft_op *ops;
    int32_t in_c, in_h, in_w;
    int32_t classes;                  /* the last op's output channels */
    float logit_scale;                /* the head's output scale */
    int32_t sm_mult, sm_shift, sm_diff_min;  /* TFLM softmax parameters of the logits */
    float lr, momentum;               /* momentum 0: none */
    int32_t stochastic;               /* weight rounding: 1 stochastic, 0 nearest */
    /* The arena's layout (NULL: first fit): the offset of each of the step's buffers, in the order it
     * takes them, laid out by fedtiny's memory planner from a recorded step (ft_step_record). A plan is
     * for one sample per step (plan_batch 1) or for more (plan_batch > 1: with accumulators); a step of
     * the other kind places its buffers first fit. */
    const uint32_t *plan;
    int32_t plan_len, plan_batch;
} ft_model;

typedef struct {
    size_t arena_high_water;          /* bytes of the arena the step used */
    float loss;                       /* not used by the step; ln terms computed by the caller */
    int64_t sum_exp[64];              /* per sample: S and e_y of the fixed-point softmax (loss) */
    int64_t exp_y[64];
} ft_step_report;

int ft_step_abi(void);

/* The counter-based generator of the step (Wellons' lowbias32), and the base of stream (seed, step, slot):
 * element i of a stream is hash32(base + i). Firmware orders its samples with it (train.shuffle = "hash"). */
uint32_t ft_hash32(uint32_t x);
uint32_t ft_stream_base(uint32_t seed, uint32_t step, uint32_t slot);

/* TFLM's MultiplyByQuantizedMultiplier(acc, mult, shift) as the step computes it (one rounding where TFLM
 * takes two: tests compare it with the two); 0 outside mult in [0, 2^31), shift in [-31, 30]. */
int32_t ft_requantize(int32_t acc, int32_t mult, int32_t shift);

/* Bytes of arena a step of `batch` samples needs (0 on a bad model). */
size_t ft_step_arena_bytes(const ft_model *m, int32_t batch);

/* One training step on int8 inputs x (batch x in_c x in_h x in_w) with labels y: forward, loss,
 * backward, update. seed/step select the stochastic-rounding streams. Returns 0, or a negative
 * error (-1 bad arguments, -2 arena too small). */
int ft_train_step(const ft_model *m, const int8_t *x, const int32_t *y, int32_t batch, uint32_t seed,
                  uint32_t step, uint8_t *arena, size_t arena_bytes, ft_step_report *report);

/* The same step on samples that need not be contiguous: xs[n] is sample n (a device passes pointers into
 * its flash, in the order it chose, instead of copying a batch into RAM). */
int ft_train_step_samples(const ft_model *m, const int8_t *const *xs, const int32_t *y, int32_t batch, uint32_t seed,
                          uint32_t step, uint8_t *arena, size_t arena_bytes, ft_step_report *report);

/* Runs one real step (it updates the weights: run it on a copy) with a first-fit arena and records
 * its buffers in order: a take as its bytes (> 0; with bit 30 set: a shrink, the block just given
 * continues smaller at the same offset), a give as -(1 + the take's index). Only the first sample's
 * buffers (and the accumulators before them) are recorded: every sample takes the same. Returns the
 * log's length, or a negative error (-3: log_cap too small). */
int32_t ft_step_record(const ft_model *m, const int8_t *x, const int32_t *y, int32_t batch, uint8_t *arena,
                       size_t arena_bytes, int32_t *log, int32_t log_cap);

/* The forward only: int8 logits (batch x classes). */
int ft_forward(const ft_model *m, const int8_t *x, int32_t batch, uint8_t *arena, size_t arena_bytes,
               int8_t *logits);

#endif
