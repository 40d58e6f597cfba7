/* fedtiny's exact training step (see fedtiny_step.h and fedtiny/int8/exact.py, its specification). */
#include "fedtiny_step.h"

#include <stddef.h>
#include <string.h>
#ifdef FT_TRACE
#include <stdio.h>
#define TRACE(...) fprintf(stderr, __VA_ARGS__)
#else
#define TRACE(...) ((void)0)
#endif

#include "fedtiny_int8.h"
#include "fedtiny_kernels.h"

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
    int32_t quiet;                  /* a recording step: no op checks (FT_CHECK_OPS) */
    size_t at[FT_MAX_BLOCKS], size[FT_MAX_BLOCKS];  /* first fit: live blocks, sorted by offset */
    int32_t id[FT_MAX_BLOCKS];     /* ... and the take that made each */
    int32_t n;
} arena_t;

static void record(arena_t *a, int32_t v) {
    if (a->log && a->log_len < a->log_cap) a->log[a->log_len] = v;
    if (a->log) a->log_len++;
}

static void *take_block(arena_t *a, size_t bytes, int zeroed) {
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
    if (zeroed) memset(a->base + start, 0, bytes);
    return a->base + start;
}

/* A block of the arena, zeroed (accumulators, masks) or not (buffers their user writes whole before reading:
 * activations, padded planes, columns) */
static void *take(arena_t *a, size_t bytes) { return take_block(a, bytes, 1); }
static void *take_uninit(arena_t *a, size_t bytes) { return take_block(a, bytes, 0); }

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

/* The tensor ids an op reads, in order (CONCAT: in0, in1, then in_more); returns how many. */
static int32_t op_inputs(const ft_op *op, int32_t *ins) {
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

/* requant_value's domain: TFLM's QuantizeMultiplier gives multipliers in [0, 2^31) and shifts in [-31, 30] */
static int valid_multiplier(int32_t mult, int32_t shift) { return mult >= 0 && shift >= -31 && shift <= 30; }

/* Every output channel's multiplier in [0, 2^31) and shift in [-31, 30], as TFLM's QuantizeMultiplier makes
 * them: requant_value's arithmetic relies on both. */
static int valid_requant(const ft_op *op) {
    int32_t o;
    if (op->kind == FT_OP_ADD)
        return valid_multiplier(op->m1, op->s1) && valid_multiplier(op->m2, op->s2) &&
               valid_multiplier(op->mo, op->so) && op->left_shift >= 0 && op->left_shift <= 30;
    if (op->kind == FT_OP_MUL || op->kind == FT_OP_MEAN) return valid_multiplier(op->mo, op->so);
    if (op->kind != FT_OP_CONV) return 1;
    for (o = 0; o < op->oc; o++)
        if (!valid_multiplier(op->mult[o], op->shift[o])) return 0;
    return 1;
}

/* The geometry of an op without parameters (its inputs already checked to be earlier tensors): what its
 * forward and backward index stays inside its tensors. */
static int valid_elementwise(const ft_model *m, const ft_op *op) {
    const int64_t hw = (int64_t)op->h * op->w, ohw = (int64_t)op->oh * op->ow, count = op->oc * ohw;
    int32_t ins[FT_MAX_INPUTS], n_in, k;
    int64_t total = 0;
    if (op->c <= 0 || hw <= 0 || op->oc <= 0 || ohw <= 0 || (int64_t)op->c * hw != out_size(m, op->in0)) return 0;
    switch (op->kind) {
    case FT_OP_ADD: return out_size(m, op->in1) == count && out_size(m, op->in0) == count;
    case FT_OP_POOL:
    case FT_OP_MEAN: return op->oc == op->c && ohw == 1;
    case FT_OP_MAXPOOL:
        return op->oc == op->c && op->kh > 0 && op->kw > 0 && op->kh * op->kw < 255 && op->stride > 0 &&
               op->pad_t >= 0 && op->pad_l >= 0;
    case FT_OP_MUL: /* the second input whole or one value per channel */
        return out_size(m, op->in0) == count && (out_size(m, op->in1) == count || out_size(m, op->in1) == op->oc);
    case FT_OP_CONCAT:
        if (op->n_in < 2 || op->n_in > FT_MAX_INPUTS || (op->n_in > 2 && !op->in_more) || op->oh != op->h ||
            op->ow != op->w)
            return 0;
        for (k = 2; k < op->n_in; k++)
            if (op->in_more[k - 2] < 0 || op->in_more[k - 2] > (int32_t)(op - m->ops)) return 0;
        for (k = 0, n_in = op_inputs(op, ins); k < n_in; k++) {
            if (out_size(m, ins[k]) % ohw) return 0;
            total += out_size(m, ins[k]);
        }
        return total == count;
    case FT_OP_LOOKUP: return op->table && op->slope && count == (int64_t)op->c * hw;
    case FT_OP_SLICE:
        return op->oc == 0 || (op->begin_c >= 0 && op->begin_h >= 0 && op->begin_w >= 0 && op->step_c > 0 &&
                               op->step_h > 0 && op->step_w > 0 && op->begin_c + (op->oc - 1) * op->step_c < op->c &&
                               op->begin_h + (op->oh - 1) * op->step_h < op->h &&
                               op->begin_w + (op->ow - 1) * op->step_w < op->w);
    default: return 0;
    }
}

static int valid_model(const ft_model *m, int32_t batch) {
    int32_t i;
    if (!m || m->n_ops <= 0 || m->n_ops >= FT_MAX_TENSORS || !m->ops || batch <= 0 || batch > FT_MAX_BATCH) return 0;
    for (i = 0; i < m->n_ops; i++) {
        const ft_op *op = &m->ops[i];
        if (op->kind < FT_OP_CONV || op->kind > FT_OP_SLICE) return 0;
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

/* ------------------------------------------------------------------ forward */

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
    return valid_multiplier(mult, shift) ? requant_value(&r, acc) : 0;
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

#define FT_MAX_KH 16 /* windows taller than this take the bounds-checked path */
#define FT_SCATTER_WIDTH 8 /* depthwise input gradients of outputs this narrow or less scatter (ft_dw_scatter) */

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

static int32_t is_depthwise(const ft_op *op) { return op->groups == op->c && op->groups == op->oc; }

static int32_t is_pointwise(const ft_op *op) {
    return op->kh == 1 && op->kw == 1 && op->stride == 1 && op->groups == 1 && op->pad_t == 0 && op->pad_l == 0 &&
           op->oh == op->h && op->ow == op->w;
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
static int conv_forward_cols(const ft_op *op, const int8_t *x, int8_t *y, uint8_t *mask, arena_t *a) {
    const int32_t depth = op->c * op->kh * op->kw, ohw = op->oh * op->ow;
    const uint32_t most = (uint32_t)depth * 128u * 255u, range = (uint32_t)(op->act_hi - op->act_lo);
    int16_t *cols;
    int32_t p, o, r, j;
    /* below 32 input channels a pointwise layer's outputs cost more than its MACs: pointwise_rows' blocks
     * of eight pixels requantize a row at a time (measured on tiny-ir's 16-channel layers) */
    if (op->groups != 1 || ohw < 2 || op->workspace < 4 * depth || (is_pointwise(op) && op->c < 32)) return 0;
    cols = (int16_t *)take_uninit(a, (size_t)4 * depth);
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
    give(a, cols);
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
static int conv_forward(const ft_op *op, const int8_t *x, int8_t *y, uint8_t *mask, arena_t *a) {
    const size_t ohw = (size_t)op->oh * op->ow;
    int32_t o, hp, wp;
    int rc;
    padded_dims(op, &hp, &wp);
    if (op->groups == 1 && op->c == 1 && ohw > 1 && (int64_t)op->workspace >= (int64_t)hp * wp) {
        /* one input plane (the planner's workspace holds it padded): each output channel a depthwise window
         * over it (dw_channel's arithmetic) */
        int8_t *pad = (int8_t *)take_uninit(a, (size_t)hp * wp);
        if (!pad) return -2;
        pad_plane(op, x, hp, wp, pad);
        for (o = 0; o < op->oc; o++) dw_channel(op, pad, hp, wp, o, y + (size_t)o * ohw, mask, (size_t)o * ohw);
        give(a, pad);
        return 0;
    }
    rc = conv_forward_cols(op, x, y, mask, a);
    if (rc) return rc < 0 ? rc : 0;
    if (is_pointwise(op)) {
        /* the planner's workspace (columns of 4 x c bytes) holds a row pair's prepared weights */
        uint32_t *prep = ohw > 1 && op->workspace >= 4 * op->c ? (uint32_t *)take_uninit(a, (size_t)4 * op->c) : 0;
        for (o = 0; o < op->oc; o += 2)
            pointwise_rows(op, x, o, o + 1 < op->oc ? 2 : 1, y + (size_t)o * ohw, ohw, op->ow, mask, prep);
        give(a, prep);
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
    n = op_inputs(op, ins);
    for (k = 0; k < n; k++) {
        const size_t size = (size_t)out_size(m, ins[k]);
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

typedef struct {
    int8_t *act[FT_MAX_TENSORS];
    uint8_t *mask[FT_MAX_TENSORS];  /* 1 bit per element: the clamp kept it (ops a gradient flows through) */
    int8_t *saved[FT_MAX_TENSORS];  /* op i: its input's trained channels, for the weight gradient */
    int32_t last[FT_MAX_TENSORS];   /* the last op reading each tensor */
} buffers_t;

static int32_t channel_trained(const ft_op *op, int32_t ch) { return !op->train_channels || op->train_channels[ch]; }
static int32_t channel_slot(const ft_op *op, int32_t ch) { return op->slot_of ? op->slot_of[ch] : ch; }
/* Where input channel ci of its group (cin overall) starts in a compact weight gradient row, in units of kh kw:
 * a depthwise row has one channel; a grouped one (a depth multiplier, trained whole) its group's channels in
 * order; otherwise the channel's slot among the trained ones. */
static int32_t row_slot(const ft_op *op, int32_t ci, int32_t cin) {
    return is_depthwise(op) ? 0 : (op->groups > 1 ? ci : channel_slot(op, cin));
}

/* Whether a fused pair can expand two channels at a time: a pointwise expansion whose channel plane fits the
 * depthwise reader's padded plane (hp x wp) at the padding's offset, and a workspace that holds the prepared
 * weights (4 c bytes) and that plane. The second channel waits in a spare plane: at stride 1 the workspace's
 * output plane (an expanded plane's size), at stride 2 the output's planes not yet written (fused_spare). */
static int fused_pairs(const ft_op *op, const ft_op *dw, int32_t hp, int32_t wp) {
    const int64_t hw = (int64_t)op->oh * op->ow;
    return is_pointwise(op) && dw->c >= 2 && op->oh + dw->pad_t <= hp && op->ow + dw->pad_l <= wp &&
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
static int fused_forward(const ft_op *op, const ft_op *dw, int32_t index, const int8_t *x, int8_t *y, arena_t *a) {
    int32_t hp, wp, e;
    int8_t *pad;
    padded_dims(dw, &hp, &wp);
    pad = (int8_t *)take_uninit(a, max_size((size_t)op->workspace, (size_t)hp * wp));
    if (!pad) return -2;
    if (fused_pairs(op, dw, hp, wp)) {
        fused_forward_pairs(op, dw, index, x, y, pad, hp, wp);
        give(a, pad);
        return 0;
    }
    for (e = 0; e < dw->c; e++) {
        PROFILE_BEGIN(t_pw);
        if (op->oh + dw->pad_t <= hp && op->ow + dw->pad_l <= wp && is_pointwise(op) && op->ow % FT_PIX) {
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
            if (is_pointwise(op))
                pointwise_rows(op, x, e, 1, pad + (size_t)dw->pad_t * wp + dw->pad_l, 0, wp, 0, 0);
            else
                conv_channel(op, x, e, pad + (size_t)dw->pad_t * wp + dw->pad_l, wp, 0, 0);
        } else { /* a window narrower than the plane: compute the channel in the output plane, then pad */
            int8_t *plane = (int8_t *)take_uninit(a, (size_t)op->oh * op->ow);
            if (!plane) return -2;
            if (is_pointwise(op))
                pointwise_rows(op, x, e, 1, plane, 0, op->ow, 0, 0);
            else
                conv_channel(op, x, e, plane, op->ow, 0, 0);
            pad_plane(dw, plane, hp, wp, pad);
            give(a, plane);
        }
        }
        PROFILE_END(t_pw, index, FT_PART_FORWARD);
        {
            PROFILE_BEGIN(t_dw);
            dw_channel(dw, pad, hp, wp, e, y + (size_t)e * dw->oh * dw->ow, 0, 0);
            PROFILE_END(t_dw, index + 1, FT_PART_FORWARD);
        }
    }
    give(a, pad);
    return 0;
}

/* A depthwise convolution, each channel through the padded workspace (the planner's) so that every output is
 * an interior one. In place (y == x, the input's last reader) the workspace also holds the channel's output
 * plane, written back over the input: output plane o ends before input plane o + 1 starts (ohw <= hw). */
static int dw_forward(const ft_op *op, int8_t *x, int8_t *y, uint8_t *mask, arena_t *a) {
    const size_t ohw = (size_t)op->oh * op->ow;
    const int inplace = y == x;
    int32_t hp, wp, o;
    int8_t *pad;
    padded_dims(op, &hp, &wp);
    pad = (int8_t *)take_uninit(a, max_size((size_t)op->workspace, (size_t)hp * wp + (inplace ? ohw : 0)));
    if (!pad) return -2;
    for (o = 0; o < op->c; o++) {
        int8_t *out = inplace ? pad + (size_t)hp * wp : y + (size_t)o * ohw;
        pad_plane(op, x + (size_t)o * op->h * op->w, hp, wp, pad);
        dw_channel(op, pad, hp, wp, o, out, mask, (size_t)o * ohw);
        if (inplace) memcpy(x + (size_t)o * ohw, out, ohw);
    }
    give(a, pad);
    return 0;
}

/* Bytes an op without parameters keeps for its backward (a gradient flows through it), as the memory planner
 * counts them (the op's saved_bytes; a MUL's mask is its own block, as every mask): MUL both int8 inputs,
 * a lookup its int8 input, MAX_POOL_2D one tap byte per output. */
static size_t saved_bytes(const ft_model *m, const ft_op *op) {
    const size_t count = (size_t)op->oc * op->oh * op->ow;
    if (op->kind == FT_OP_MUL) return count + (size_t)out_size(m, op->in1);
    if (op->kind == FT_OP_LOOKUP || op->kind == FT_OP_MAXPOOL) return count;
    return 0;
}

/* One op without parameters (any kind but CONV) on one sample's buffers: output y, mask (MUL, ADD), saved
 * (what saved_bytes sizes, NULL: nothing kept). */
static void elementwise_forward(const ft_model *m, const ft_op *op, buffers_t *b, int8_t *y, uint8_t *mask,
                                int8_t *saved) {
    const size_t count = (size_t)op->oc * op->oh * op->ow;
    const int8_t *x = b->act[op->in0];
    switch (op->kind) {
    case FT_OP_ADD: add_forward(op, x, b->act[op->in1], count, y, mask); break;
    case FT_OP_POOL: pool_forward(op, x, y); break;
    case FT_OP_MAXPOOL: maxpool_forward(op, x, y, (uint8_t *)saved); break;
    case FT_OP_MEAN: mean_forward(op, x, y); break;
    case FT_OP_MUL: {
        const size_t nb = (size_t)out_size(m, op->in1);
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
    default: break;
    }
}

/* One sample's forward. needs[t]: a gradient reaches tensor t (NULL: inference). Activations are freed
 * after their last reader; what the backward needs is kept: masks (bits), trained channels' inputs, and
 * what saved_bytes says for the ops without parameters. */
static int run_forward(const ft_model *m, const int8_t *x, const uint8_t *needs, arena_t *a, buffers_t *b) {
    int32_t i, t, k, n_in, ins[FT_MAX_INPUTS];
    b->act[0] = (int8_t *)x;
    for (t = 0; t <= m->n_ops; t++) b->last[t] = -1;
    for (i = 0; i < m->n_ops; i++)
        for (k = 0, n_in = op_inputs(&m->ops[i], ins); k < n_in; k++) b->last[ins[k]] = i;
    for (i = 0; i < m->n_ops; i++) {
        const ft_op *op = &m->ops[i];
        const size_t count = (size_t)out_size(m, i + 1);
        const int flows = needs && needs[i + 1];
        const int grads = flows && (op->kind == FT_OP_CONV || op->kind == FT_OP_ADD || op->kind == FT_OP_MUL);
        const int inplace = op->kind == FT_OP_CONV && op->inplace && op->in0 > 0 && b->last[op->in0] == i;
        int rc = 0;
        if (op->kind == FT_OP_CONV && op->fuse_next && i + 1 < m->n_ops) { /* the pair writes tensor i + 2 */
            const ft_op *dw = &m->ops[i + 1];
            b->act[i + 2] = (int8_t *)take_uninit(a, (size_t)out_size(m, i + 2));
            if (a->base == 0) {
                take(a, max_size((size_t)op->workspace, (size_t)(dw->oh + dw->kh) * (dw->ow + dw->kw) * 2));
            } else {
                if (!b->act[i + 2]) return -2;
                rc = fused_forward(op, dw, i, b->act[op->in0], b->act[i + 2], a);
                if (rc) return rc;
                if (needs) CHECK_TENSOR(a, i + 1, FT_CHECK_OUTPUT, b->act[i + 2], (size_t)out_size(m, i + 2));
            }
            if (op->in0 > 0 && b->last[op->in0] == i) {
                give(a, b->act[op->in0]);
                b->act[op->in0] = 0;
            }
            i++;
            continue;
        }
        b->act[i + 1] = inplace ? b->act[op->in0] : (int8_t *)take_uninit(a, count);
        b->mask[i + 1] = grads ? (uint8_t *)take(a, (count + 7) / 8) : 0;
        b->saved[i] = 0;
        if (needs && op->kind == FT_OP_CONV && op->train_w) { /* the input channels the weight gradient reads */
            const size_t hw = (size_t)op->h * op->w;
            int32_t ch;
            k = 0;
            for (ch = 0; ch < op->c; ch++) k += channel_trained(op, ch);
            b->saved[i] = (int8_t *)take_uninit(a, (size_t)k * hw);
            if (a->base && b->saved[i])
                for (ch = 0, k = 0; ch < op->c; ch++)
                    if (channel_trained(op, ch)) memcpy(b->saved[i] + (size_t)(k++) * hw, b->act[op->in0] + ch * hw, hw);
            if (a->base && !b->saved[i]) return -2;
        } else if (flows && saved_bytes(m, op)) {
            b->saved[i] = (int8_t *)take_uninit(a, saved_bytes(m, op));
            if (a->base && !b->saved[i]) return -2;
        }
        if (a->base == 0) {
            if (op->kind == FT_OP_CONV) take(a, max_size((size_t)op->workspace, (size_t)(op->h + op->kh) * (op->w + op->kw) * 2));
            continue;
        }
        if (!b->act[i + 1] || (grads && !b->mask[i + 1])) return -2;
        PROFILE_BEGIN(t_forward);
        if (inplace) {
            rc = dw_forward(op, b->act[i + 1], b->act[i + 1], b->mask[i + 1], a);
            if (rc) return rc;
            shrink(a, b->act[i + 1], count);
            b->act[op->in0] = 0; /* now the output */
        } else if (op->kind == FT_OP_CONV && is_depthwise(op)) {
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
        for (k = op_inputs(op, ins) - 1; k >= 0; k--) {
            const int32_t u = ins[k];
            int32_t j, again = 0;
            for (j = 0; j < k; j++) again |= ins[j] == u;
            if (u > 0 && !again && b->last[u] == i && !(inplace && u == op->in0)) {
                give(a, b->act[u]);
                b->act[u] = 0;
            }
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

/* The weight gradient of output channel o into row (gw_row_elements floats, added to): for each trained
 * weight, s * sum over the outputs its tap reaches of q (x - x_zero), an int32 sum (ft_kernels_fit) taken
 * as sum q x - x_zero sum q over each tap's rectangle of outputs, its rows by ft_dot_s8. */
static void weight_grad_row(const ft_op *op, const int8_t *x, const int8_t *q, float s, int32_t o, float *row) {
    const int32_t cpg = op->c / op->groups, grp = o / (op->oc / op->groups), ohw = op->oh * op->ow;
    const int8_t *qo = q + (size_t)o * ohw;
    int32_t ci, ky, kx, oy, j;
    if (is_pointwise(op)) { /* the saved planes are the trained channels in order: two at a time */
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
        const int32_t cin = grp * cpg + ci, sel = is_depthwise(op) ? o : cin;
        const int8_t *xc;
        float *r;
        if (!channel_trained(op, sel)) continue;
        xc = x + (size_t)channel_slot(op, sel) * op->h * op->w; /* the saved plane */
        r = row + (size_t)row_slot(op, ci, cin) * op->kh * op->kw;
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
    if (is_pointwise(op)) {
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

/* Update row o of a weight from its compact gradient row (NULL: no trained element: gradient 0, which
 * still moves the weight under momentum, as the simulator's optimizer does). */
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
            v = floor_f32(tw + uniform_at(base, i0 + (uint32_t)t));
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
static void update_weight_row(const ft_model *m, const ft_op *op, int32_t o, const float *row, uint32_t step,
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
        const int32_t cin = grp * cpg + ci, sel = is_depthwise(op) ? o : cin;
        const float *g = row && channel_trained(op, sel) ? row + (size_t)row_slot(op, ci, cin) * kk : 0;
        float *mo = with_mom ? mom + i : 0;
        int32_t n;
        if (is_depthwise(op))
            run = 1;
        else if (!op->train_channels && !op->slot_of) /* every channel trained */
            run = cpg;
        else if (g) { /* trained channels with consecutive slots */
            const int32_t slot = channel_slot(op, cin);
            for (run = 1; ci + run < cpg && channel_trained(op, cin + run) && channel_slot(op, cin + run) == slot + run;)
                run++;
        } else /* frozen channels (or no gradient at all) */
            for (run = 1; ci + run < cpg && !(row && channel_trained(op, cin + run));) run++;
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
    v = floor_f32(a / s + uniform_at(base, at));
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
static int conv_backward(const ft_model *m, const ft_op *op, int32_t index, int32_t sample, const int8_t *x,
                         const uint8_t *mask, float *g, float *gx, float *gw, float *gb, int32_t apply, uint32_t seed, uint32_t step,
                         arena_t *a) {
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
        quantize_grad(op, g, mask, s, stream_base(seed, step, (uint32_t)(2 * op->slot)), (uint32_t)((size_t)sample * count),
                      q);
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
        const int scatter = is_depthwise(op) && (op->stride > 1 || op->ow <= FT_SCATTER_WIDTH);
        const int spread = is_depthwise(op) && (op->stride == 1 || op->kh * op->kw <= 9);
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
        float *b = apply ? (float *)take(a, (size_t)op->oc * sizeof(float)) : gb;
        PROFILE_BEGIN(t_bias);
        if (!b) return -2;
        for (o = 0; o < op->oc; o++) b[o] += (float)ft_sum_s8(q + (size_t)o * hw, (int32_t)hw) * s;
        if (apply) {
            for (o = 0; o < op->oc; o++)
                update_one(m, b[o], op->qas_b ? &op->qas_b[o] : 0, op->mom_b ? &op->mom_b[o] : 0, step, 0,
                           &op->bias[o], 0, (uint32_t)o);
            give(a, b);
            CHECK_TENSOR(a, index, FT_CHECK_BIAS, op->bias, (size_t)op->oc * sizeof(int32_t));
        }
        PROFILE_END(t_bias, index, FT_PART_QUANTIZE);
    }
    if (op->train_w) {
        const size_t per = (size_t)gw_row_elements(op);
        const uint32_t base = stream_base(seed, step, (uint32_t)(2 * op->slot + 1));
        float *row = apply ? (float *)take(a, per * sizeof(float)) : 0;
        if (apply && !row) return -2;
        for (o = 0; o < op->oc; o++) {
            const int64_t r = gw_row(op, o);
            if (r >= 0) {
                PROFILE_BEGIN(t_weight);
                if (apply) memset(row, 0, per * sizeof(float));
                weight_grad_row(op, x, q, s, o, apply ? row : gw + (size_t)r * per);
                PROFILE_END(t_weight, index, FT_PART_WEIGHT_GRAD);
            }
            if (apply) {
                PROFILE_BEGIN(t_update);
                update_weight_row(m, op, o, r >= 0 ? row : 0, step, base);
                PROFILE_END(t_update, index, FT_PART_UPDATE);
            }
        }
        give(a, row);
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

/* global AVERAGE_POOL: g / (h w) to every element of the plane */
static void pool_backward(const ft_op *op, const float *g, float *gx) {
    const int32_t hw = op->h * op->w;
    int32_t c, p;
    for (c = 0; c < op->oc; c++) {
        const float v = g[c] / (float)hw;
        for (p = 0; p < hw; p++) gx[(size_t)c * hw + p] += v;
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
    n = op_inputs(op, ins);
    for (k = 0; k < n; k++) {
        const size_t size = (size_t)out_size(m, ins[k]);
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

/* The backward of op (any kind but CONV) of one sample: g its output gradient, gx[k] input k's gradient
 * buffer (NULL: no gradient reaches input k). */
static void elementwise_backward(const ft_model *m, const ft_op *op, const int8_t *saved, const uint8_t *mask,
                                 const float *g, float *const *gx) {
    const size_t count = (size_t)op->oc * op->oh * op->ow;
    switch (op->kind) {
    case FT_OP_ADD: add_backward(op, count, mask, g, gx[0], gx[1]); break;
    case FT_OP_POOL: if (gx[0]) pool_backward(op, g, gx[0]); break;
    case FT_OP_MAXPOOL: if (gx[0]) maxpool_backward(op, (const uint8_t *)saved, g, gx[0]); break;
    case FT_OP_MEAN: if (gx[0]) mean_backward(op, g, gx[0]); break;
    case FT_OP_MUL:
        mul_backward(op, saved, (size_t)out_size(m, op->in1) == count ? op->oh * op->ow : 1, mask, g, gx[0], gx[1]);
        break;
    case FT_OP_CONCAT: concat_backward(m, op, g, gx); break;
    case FT_OP_LOOKUP: if (gx[0]) lookup_backward(op, count, saved, g, gx[0]); break;
    case FT_OP_SLICE: if (gx[0]) slice_backward(op, g, gx[0]); break;
    default: break;
    }
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
        int32_t ins[FT_MAX_INPUTS], k, n_in = op_inputs(op, ins);
        needs[i + 1] = (uint8_t)(op->kind == FT_OP_CONV && (op->train_w || op->train_b));
        for (k = 0; k < n_in; k++) needs[i + 1] |= needs[ins[k]];
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
            float *g = grad[i + 1], *gx[FT_MAX_INPUTS];
            int32_t ins[FT_MAX_INPUTS], k, n_in;
            if (!g) continue;
            n_in = op_inputs(op, ins);
            for (k = 0; k < n_in; k++) { /* the input gradients this op adds to, allocated at their first writer */
                const int32_t t = ins[k];
                if (t > 0 && needs[t] && !grad[t]) {
                    grad[t] = (float *)take(a, (size_t)out_size(m, t) * sizeof(float));
                    if (!grad[t]) return -2;
                }
                gx[k] = needs[t] ? grad[t] : 0;
            }
            if (op->kind == FT_OP_CONV) {
                rc = conv_backward(m, op, i, n, b.saved[i], b.mask[i + 1], g, gx[0], gw[i], gb[i], batch == 1, seed,
                                   step, a);
                if (rc) return rc;
            } else {
                elementwise_backward(m, op, b.saved[i], b.mask[i + 1], g, gx);
                if (gx[0]) CHECK_TENSOR(a, i, FT_CHECK_GRAD_IN, gx[0], (size_t)out_size(m, op->in0) * sizeof(float));
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
        PROFILE_BEGIN(t_update);
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
        PROFILE_END(t_update, i, FT_PART_UPDATE);
        if (gw[i]) CHECK_TENSOR(a, i, FT_CHECK_WEIGHT, op->weight, (size_t)op->oc * (op->c / op->groups) * op->kh * op->kw);
        if (gb[i]) CHECK_TENSOR(a, i, FT_CHECK_BIAS, op->bias, (size_t)op->oc * sizeof(int32_t));
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
    a.quiet = 1;
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
