/* fedtiny's exact training step: the arena (fedtiny_step_internal.h).
 *
 * Every buffer of the step comes from ft_take() in an order that depends only on the model and the batch
 * size (never on data). With a plan (ft_model.plan: one offset per take, in order, laid out ahead of
 * time by fedtiny's memory planner from the step's recorded buffer lifetimes) each take returns its
 * planned place and ft_give() does nothing. Without one, blocks are placed first fit, and a recording
 * step logs the lifetimes (ft_step_record) that the planner lays out. */

#include <stddef.h>
#include <string.h>
#ifdef FT_TRACE
#include <stdio.h>
#define TRACE(...) fprintf(stderr, __VA_ARGS__)
#else
#define TRACE(...) ((void)0)
#endif

#include "fedtiny_step_internal.h"

static void record(ft_arena *a, int32_t v) {
    if (a->log && a->log_len < a->log_cap) a->log[a->log_len] = v;
    if (a->log) a->log_len++;
}

static void *take_block(ft_arena *a, size_t bytes, int zeroed) {
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
void *ft_take(ft_arena *a, size_t bytes) { return take_block(a, bytes, 1); }
void *ft_take_uninit(ft_arena *a, size_t bytes) { return take_block(a, bytes, 0); }

void ft_give(ft_arena *a, const void *p) {
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
void ft_shrink(ft_arena *a, const void *p, size_t bytes) {
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
