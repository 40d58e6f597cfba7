/* What the files of fedtiny's exact training step share; not its API (fedtiny_step.h is). The step, by concern:
 *   fedtiny_step.c           the public entry points: the model's checks and the step's driver
 *   fedtiny_step_arena.c     the arena: every buffer of the step, planned or first fit
 *   fedtiny_step_rng.c       the counter-based generator's public entry points (the generator is inline here)
 *   fedtiny_step_forward.c   the int8 forward of every op kind (TFLM's arithmetic)
 *   fedtiny_step_loss.c      the loss: the fixed-point softmax and the logits' gradient
 *   fedtiny_step_backward.c  the backward: QAS's gradient quantization, input and weight gradients
 *   fedtiny_step_update.c    the update: QAS scales, momentum and the parameters' rounding
 * The small helpers that more than one file's loops use are static inline here (inlined, as in one file); the
 * functions one file calls in another are declared here, hidden outside a shared library. */
#ifndef FEDTINY_STEP_INTERNAL_H
#define FEDTINY_STEP_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "fedtiny_step.h"

/* not exported by a shared library (the step's API is fedtiny_step.h's) */
#if defined(__GNUC__)
#define FT_INTERNAL __attribute__((visibility("hidden")))
#else
#define FT_INTERNAL
#endif

/* Profiling (firmware built with FT_PROFILE): the time of each op's parts, read from the firmware's
 * instruction counter and tallied by it per op (device/firmware/main.c). Off, it costs nothing. */
enum { FT_PART_FORWARD = 0, FT_PART_QUANTIZE = 1, FT_PART_INPUT_GRAD = 2, FT_PART_WEIGHT_GRAD = 3, FT_PART_UPDATE = 4 };
#ifdef FT_PROFILE
uint32_t ft_profile_clock(void);
void ft_profile_add(int32_t op, int32_t part, uint32_t elapsed);
#define PROFILE_BEGIN(t) const uint32_t t = ft_profile_clock()
#define PROFILE_END(t, op, part) ft_profile_add((op), (part), ft_profile_clock() - (t))
#else
#define PROFILE_BEGIN(t) do { } while (0)
#define PROFILE_END(t, op, part) ((void)(op))
#endif

/* Op checks (built with FT_CHECK_OPS: the firmware's check build and the host's libfedtiny_step_check.so):
 * every tensor a training step produces, op by op, handed to ft_check_tensor, which prints its hash, so
 * that the DSP build in QEMU and the portable build on the host can be compared op by op
 * (scripts/firmware_opcheck.py). What: the forward's output and mask, the quantized output gradient, the
 * input gradient after the op's contribution, the weight and bias after their update. */
enum { FT_CHECK_OUTPUT = 0, FT_CHECK_MASK = 1, FT_CHECK_GRAD_Q = 2, FT_CHECK_GRAD_IN = 3, FT_CHECK_WEIGHT = 4,
       FT_CHECK_BIAS = 5 };
#ifdef FT_CHECK_OPS
void ft_check_tensor(int32_t op, int32_t what, const void *data, size_t bytes);
#define CHECK_TENSOR(a, op, what, data, bytes) \
    do { if ((a)->base && !(a)->quiet && (data)) ft_check_tensor((op), (what), (data), (bytes)); } while (0)
#else
#define CHECK_TENSOR(a, op, what, data, bytes) ((void)(a))
#endif

/* Tables on the stack are sized by these: firmware sets them to its model's (a 256-entry table is 1 KB
 * of a device's stack per array) */
#ifndef FT_MAX_TENSORS
#define FT_MAX_TENSORS 256
#endif
#ifndef FT_MAX_CLASSES
#define FT_MAX_CLASSES 256
#endif
#define FT_MAX_KH 16 /* windows taller than this take the bounds-checked path */

/* ------------------------------------------------------------------ arena
 *
 * Every buffer of the step comes from ft_take(), in an order that depends only on the model and the batch
 * size: at its planned place, or first fit (fedtiny_step_arena.c). */

#ifndef FT_MAX_BLOCKS
#define FT_MAX_BLOCKS 1024 /* live blocks of the first-fit allocator (a planned arena needs none) */
#endif

typedef struct {
    uint8_t *base;                 /* NULL: a sizing pass (bump, no frees: an upper bound) */
    size_t cap, used, high;        /* high: the high-water mark (end of the highest block) */
    const uint32_t *plan;          /* offsets of the takes, in order (NULL: first fit) */
    int32_t plan_len, k;           /* k: takes so far */
    int32_t *log, log_cap, log_len; /* recording: take = its bytes (> 0), give = -(1 + take index) */
    int32_t quiet;                  /* a recording step: no op checks (FT_CHECK_OPS) */
    size_t at[FT_MAX_BLOCKS], size[FT_MAX_BLOCKS];  /* first fit: live blocks, sorted by offset */
    int32_t id[FT_MAX_BLOCKS];     /* ... and the take that made each */
    int32_t n;
} ft_arena;

/* A block of the arena, zeroed (accumulators, masks) or not (buffers their user writes whole before reading:
 * activations, padded planes, columns) */
FT_INTERNAL void *ft_take(ft_arena *a, size_t bytes);
FT_INTERNAL void *ft_take_uninit(ft_arena *a, size_t bytes);
/* The block at p freed (first fit; a plan, a sizing pass or NULL: nothing) */
FT_INTERNAL void ft_give(ft_arena *a, const void *p);
/* A live block keeps only its first `bytes` (an in-place op's smaller output): recorded as its give
 * and a new take of the smaller size, which the plan must place at the same offset. */
FT_INTERNAL void ft_shrink(ft_arena *a, const void *p, size_t bytes);

/* ------------------------------------------------------------------ counter-based uniform numbers
 *
 * Wellons' lowbias32; stream (seed, step, slot) starts at ft_stream_base (fedtiny_step_rng.c), element i of
 * it is ft_lowbias32(base + i). */

static inline uint32_t ft_lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

/* u in [0, 1): (ft_lowbias32(base + i) >> 8) * 2^-24, exact in float32 */
static inline float ft_uniform_at(uint32_t base, uint32_t i) {
    return (float)(ft_lowbias32(base + i) >> 8) * (1.0f / 16777216.0f);
}

/* floor without libm (|x| < 2^31) */
static inline int32_t ft_floor_f32(float x) {
    int32_t i = (int32_t)x;
    return ((float)i > x) ? i - 1 : i;
}

/* ------------------------------------------------------------------ tensors and ops */

static inline int32_t ft_out_size(const ft_model *m, int32_t t) { /* elements per sample of tensor t */
    if (t == 0) return m->in_c * m->in_h * m->in_w;
    return m->ops[t - 1].oc * m->ops[t - 1].oh * m->ops[t - 1].ow;
}

/* The tensor ids an op reads, in order (CONCAT: in0, in1, then in_more); returns how many (fedtiny_step.c) */
FT_INTERNAL int32_t ft_op_inputs(const ft_op *op, int32_t *ins);

/* requant_value's domain: TFLM's QuantizeMultiplier gives multipliers in [0, 2^31) and shifts in [-31, 30] */
static inline int ft_valid_multiplier(int32_t mult, int32_t shift) { return mult >= 0 && shift >= -31 && shift <= 30; }

static inline int32_t ft_is_depthwise(const ft_op *op) { return op->groups == op->c && op->groups == op->oc; }

/* A 1 x 1 convolution over the whole plane: stride 1, no padding, no groups (fedtiny_step.c) */
FT_INTERNAL int32_t ft_is_pointwise(const ft_op *op);

/* One sample's buffers: the forward's (ft_run_forward), read by the backward */
typedef struct {
    int8_t *act[FT_MAX_TENSORS];
    uint8_t *mask[FT_MAX_TENSORS];  /* 1 bit per element: the clamp kept it (ops a gradient flows through) */
    int8_t *saved[FT_MAX_TENSORS];  /* op i: its input's trained channels, for the weight gradient */
    int32_t last[FT_MAX_TENSORS];   /* the last op reading each tensor */
} ft_buffers;

/* ------------------------------------------------------------------ trained channels and their gradients */

static inline int32_t ft_channel_trained(const ft_op *op, int32_t ch) {
    return !op->train_channels || op->train_channels[ch];
}
static inline int32_t ft_channel_slot(const ft_op *op, int32_t ch) { return op->slot_of ? op->slot_of[ch] : ch; }
/* Where input channel ci of its group (cin overall) starts in a compact weight gradient row, in units of kh kw:
 * a depthwise row has one channel; a grouped one (a depth multiplier, trained whole) its group's channels in
 * order; otherwise the channel's slot among the trained ones. */
static inline int32_t ft_row_slot(const ft_op *op, int32_t ci, int32_t cin) {
    return ft_is_depthwise(op) ? 0 : (op->groups > 1 ? ci : ft_channel_slot(op, cin));
}

/* Weight gradients are held for trained channels only. Row o of that compact array holds the trained
 * input channels of output channel o (depthwise: one row per trained channel); within a row, the
 * element of (ci, ky, kx). */
static inline int32_t ft_gw_row_elements(const ft_op *op) {
    const int32_t k = op->slot_of ? op->slot_of[op->c] : op->c / op->groups; /* trained channels, stored last */
    return (ft_is_depthwise(op) ? 1 : k) * op->kh * op->kw;
}

static inline int64_t ft_gw_row(const ft_op *op, int32_t o) { /* -1: output channel o has no trained weight */
    if (ft_is_depthwise(op)) return op->train_channels && !op->train_channels[o] ? -1 : ft_channel_slot(op, o);
    return o;
}

static inline int64_t ft_gw_elements(const ft_op *op) {
    return (int64_t)(ft_is_depthwise(op) && op->slot_of ? op->slot_of[op->c] : op->oc) * ft_gw_row_elements(op);
}

/* ------------------------------------------------------------------ the parts of the step, file by file */

/* fedtiny_step_forward.c: one sample's forward (needs NULL: inference) */
FT_INTERNAL int ft_run_forward(const ft_model *m, const int8_t *x, const uint8_t *needs, ft_arena *a, ft_buffers *b);

/* fedtiny_step_loss.c: the gradient of the batch's mean loss w.r.t. one sample's int8 logits q */
FT_INTERNAL void ft_loss_grad(const ft_model *m, const int8_t *q, int32_t label, int32_t sample, int32_t batch,
                              float *g, ft_step_report *rep);

/* fedtiny_step_backward.c: one sample's backward of a convolution, then of an op without parameters */
FT_INTERNAL int ft_conv_backward(const ft_model *m, const ft_op *op, int32_t index, int32_t sample, const int8_t *x,
                                 const uint8_t *mask, float *g, float *gx, float *gw, float *gb, int32_t apply,
                                 uint32_t seed, uint32_t step, ft_arena *a);
FT_INTERNAL void ft_elementwise_backward(const ft_model *m, const ft_op *op, const int8_t *saved, const uint8_t *mask,
                                         const float *g, float *const *gx);

/* fedtiny_step_update.c: an op's biases from their gradients g; row o of its weight from its compact gradient
 * row (base: the weight's stream); and, with more than one sample per step, the batch's summed gradients (gw[i],
 * gb[i] of op i; NULL: none) once the last sample is done */
FT_INTERNAL void ft_update_bias(const ft_model *m, const ft_op *op, const float *g, uint32_t step);
FT_INTERNAL void ft_update_weight_row(const ft_model *m, const ft_op *op, int32_t o, const float *row, uint32_t step,
                                      uint32_t base);
FT_INTERNAL void ft_update_batch(const ft_model *m, float *const *gw, float *const *gb, uint32_t seed, uint32_t step,
                                 ft_arena *a);

/* AVERAGE_POOL_2D's window along one axis: output o's taps inside an input of n (stride s, padding pad before,
 * kernel k) are [*lo, *hi); padded taps fall outside. The forward and the backward walk the same windows. */
static inline void ft_pool_window(int32_t o, int32_t s, int32_t pad, int32_t k, int32_t n, int32_t *lo, int32_t *hi) {
    const int32_t start = o * s - pad;
    *lo = start < 0 ? 0 : start;
    *hi = start + k < n ? start + k : n;
}

#endif
