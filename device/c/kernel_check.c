/* Every kernel of fedtiny_kernels.c on pseudo-random int8 data of many shapes, each result folded into a
 * checksum, one line per kernel and shape: "kernel shape checksum". The same program built for the host
 * (the portable kernels) and for a Cortex-M4/M7 (the DSP kernels, run in QEMU) must print the same lines:
 * tests/test_kernels_dsp.py compares them. Odd sizes on purpose: every tail path runs.
 *
 * Host: cc -std=c99 -O2 kernel_check.c fedtiny_kernels.c -DFT_KERNEL_CHECK_HOST -o kernel_check
 * Device: make -C device/firmware kernel-check (the board layer's start-up, output by semihosting). */
#include <stdint.h>
#include <string.h>

#include "fedtiny_kernels.h"

#ifdef FT_KERNEL_CHECK_HOST
#include <stdio.h>
static void emit(const char *line) { fputs(line, stdout); }
#else
#include "board.h"
static void emit(const char *line) { board_debug_write(line); }
#endif

static uint32_t state = 0x9E3779B9u;

static int8_t next8(void) { /* xorshift32: the same bytes on every machine */
    state ^= state << 13;
    state ^= state >> 17;
    state ^= state << 5;
    return (int8_t)(state >> 24);
}

static void fill(int8_t *a, int32_t n) {
    int32_t i;
    for (i = 0; i < n; i++) a[i] = next8();
}

static uint32_t mix(uint32_t h, int32_t v) { return (h ^ (uint32_t)v) * 16777619u; }

static char *put_u(char *p, uint32_t v) {
    char tmp[12];
    int n = 0;
    do tmp[n++] = (char)('0' + v % 10u); while ((v /= 10u) != 0);
    while (n) *p++ = tmp[--n];
    return p;
}

static void report(const char *name, int32_t a, int32_t b, int32_t c, uint32_t h) {
    char line[96], *p = line;
    const char *s = name;
    while (*s) *p++ = *s++;
    *p++ = ' ';
    p = put_u(p, (uint32_t)a), *p++ = 'x';
    p = put_u(p, (uint32_t)b), *p++ = 'x';
    p = put_u(p, (uint32_t)c), *p++ = ' ';
    p = put_u(p, h);
    *p++ = '\n', *p = 0;
    emit(line);
}

static int8_t x_buf[4096], w_buf[1024];

int ft_kernel_check(void) {
    static const int32_t lengths[] = {0, 1, 3, 4, 7, 8, 9, 16, 27, 64, 100, 257};
    static const int32_t depths[] = {1, 2, 3, 8, 15, 16, 48};
    static const int32_t pixels[] = {1, 3, 4, 5, 7, 8};
    static const int32_t kernels[] = {1, 3, 5, 7};
    int32_t i, j, r, s;
    for (i = 0; i < (int32_t)(sizeof lengths / sizeof *lengths); i++) {
        const int32_t n = lengths[i];
        int32_t out[2];
        uint32_t h = 2166136261u;
        fill(x_buf, 3 * n + 3);
        h = mix(h, ft_dot_s8(x_buf + 1, x_buf + n + 2, n)); /* unaligned on purpose */
        ft_dot_s8_1x2(x_buf, x_buf + n + 1, x_buf + 2 * n + 3, n, out);
        h = mix(mix(h, out[0]), out[1]);
        h = mix(h, ft_sum_s8(x_buf + 3, n));
        {
            int32_t four[4];
            ft_dot_s8_1x4(x_buf + 2, x_buf + 1, n / 2 + 1, n, four); /* rows overlapping, unaligned */
            h = mix(mix(mix(mix(h, four[0]), four[1]), four[2]), four[3]);
        }
        report("dot_sum", n, 1, 1, h);
    }
    for (i = 0; i < (int32_t)(sizeof depths / sizeof *depths); i++)
        for (j = 0; j < (int32_t)(sizeof pixels / sizeof *pixels); j++)
            for (r = 1; r <= 2; r++)
                for (s = 0; s < 2; s++) { /* s = 0: a weight row (w_k = 1); 1: a weight column (w_k = depth + 1) */
                    const int32_t depth = depths[i], n = pixels[j], x_k = n + 5, w_row = s ? 1 : depth + 2;
                    const int32_t w_k = s ? depth + 1 : 1;
                    int32_t acc[2 * FT_PIX], k;
                    uint32_t h = 2166136261u;
                    if (n > FT_PIX) continue;
                    fill(x_buf, depth * x_k + 8);
                    fill(w_buf, 2 * (depth + 2) * (depth + 2));
                    ft_mac_block(w_buf, w_row, w_k, r, x_buf + 1, x_k, depth, n, acc);
                    for (k = 0; k < n; k++) h = mix(h, acc[k]);
                    if (r == 2)
                        for (k = 0; k < n; k++) h = mix(h, acc[FT_PIX + k]);
                    report(s ? "mac_block_column" : "mac_block_row", depth, n, r, h);
                    if (r == 2) { /* the same sums from prepared weights */
                        static uint32_t prep[64];
                        h = 2166136261u;
                        ft_pair_prepare(w_buf, w_row, w_k, depth, prep);
                        ft_mac_block_prepared(prep, w_buf, w_row, w_k, x_buf + 1, x_k, depth, n, acc);
                        for (k = 0; k < n; k++) h = mix(mix(h, acc[k]), acc[FT_PIX + k]);
                        report(s ? "prepared_column" : "prepared_row", depth, n, r, h);
                    }
                }
    for (i = 0; i < (int32_t)(sizeof kernels / sizeof *kernels); i++)
        for (s = 1; s <= 2; s++)
            for (j = 1; j <= FT_ROW_BLOCK; j += 3) {
                const int32_t k = kernels[i], n = j, width = (n - 1) * s + k;
                const int8_t *rows[8];
                int32_t acc[FT_ROW_BLOCK], t;
                uint32_t h = 2166136261u;
                fill(x_buf, k * (width + 1));
                fill(w_buf, k * k);
                for (t = 0; t < k; t++) rows[t] = x_buf + t * (width + 1);
                for (t = 0; t < n; t++) acc[t] = t * 7 - 20;
                ft_dw_row(rows, w_buf, k, k, s, n, acc);
                for (t = 0; t < n; t++) h = mix(h, acc[t]);
                report("dw_row", k, s, n, h);
            }
    for (s = 1; s <= 2; s++) /* 3 x 3 windows over blocks of rows, the plane exactly as wide as they reach */
        for (j = 1; j <= 9; j++) {
            const int32_t n = j, rows = 1 + (j * 3) % 4, w = (n - 1) * s + 3 + (j % 3 == 0);
            int32_t acc[4 * 9], t;
            uint32_t h = 2166136261u;
            fill(x_buf, ((rows - 1) * s + 3) * w);
            fill(w_buf, 9);
            ft_dw3_rows(x_buf, w, w_buf, s, rows, n, acc);
            for (t = 0; t < rows * n; t++) h = mix(h, acc[t]);
            report("dw3_rows", s, rows, n, h);
        }
    for (i = 0; i < (int32_t)(sizeof kernels / sizeof *kernels); i++) /* scatter: some outputs zero */
        for (s = 1; s <= 2; s++)
            for (j = 1; j <= 9; j += 2) {
                static int32_t plane[(8 * 2 + 7) * (9 * 2 + 7)];
                const int32_t k = kernels[i], oh = 1 + (j * 5) % 8, ow = j;
                const int32_t rows = (oh - 1) * s + k, aw = (ow - 1) * s + k + 1;
                int32_t t;
                uint32_t h = 2166136261u;
                fill(x_buf, oh * ow);
                for (t = 0; t < oh * ow; t += 3) x_buf[t] = 0;
                fill(w_buf, k * k);
                for (t = 0; t < rows * aw; t++) plane[t] = t * 5 - 99;
                ft_dw_scatter(x_buf, oh, ow, w_buf, k, k, s, plane, aw);
                for (t = 0; t < rows * aw; t++) h = mix(h, plane[t]);
                report("dw_scatter", k, s, oh * 16 + ow, h);
            }
    for (i = 0; i < (int32_t)(sizeof lengths / sizeof *lengths); i++) { /* columns: int16 in -255 .. 255 */
        static int16_t cols[2 * 257 + 1];
        const int32_t depth = lengths[i];
        int32_t acc[4], t;
        uint32_t h = 2166136261u;
        fill(x_buf, 2 * depth + 2);
        fill(w_buf, 2 * depth + 3);
        for (t = 0; t < 2 * depth + 1; t++) cols[t] = (int16_t)(x_buf[t] - x_buf[t + 1]);
        ft_cols_prepare(cols, depth);
        ft_cols_prepare(cols + depth + 1, depth); /* the second column 2-byte aligned, as an odd depth leaves it */
        ft_mac_2x2_cols(w_buf + 1, w_buf + depth + 2, cols, cols + depth + 1, depth, acc);
        for (t = 0; t < 4; t++) h = mix(h, acc[t]);
        report("mac_2x2_cols", depth, 1, 1, h);
    }
    for (i = 0; i < 40; i++) { /* requantization: |x| < 2^30, shifts 1 .. 22, ReLU-like and full ranges */
        static const int32_t shifts[] = {1, 2, 3, 7, 12, 22};
        const int32_t e = shifts[i % 6], n = 1 + (i * 7) % 32, lo = i % 3 ? -128 : next8() / 2;
        const uint32_t range = (uint32_t)(i % 2 ? 127 - lo : (i % 5) * 60);
        const int32_t mult = (int32_t)(0x40000000u | ((uint32_t)next8() << 16) | (uint32_t)(uint8_t)next8());
        const int32_t k2 = (int32_t)((uint32_t)(uint8_t)next8() << (e + 2)) + (e == 1);
        const int32_t folded = (int32_t)((uint32_t)next8() << (8 + i % 14));
        int32_t acc[32], t;
        int8_t y[32];
        uint32_t h = 2166136261u;
        for (t = 0; t < n; t++) /* small sums, and sums near the bound: every sign, many ties */
            acc[t] = i % 4 == 3 ? (int32_t)((uint32_t)next8() << 21) : (int32_t)next8() * (1 + i % 5) * 97 + t;
        h = mix(h, (int32_t)ft_requant_row(acc, n, folded, mult, k2, e, range, lo, y));
        for (t = 0; t < n; t++) h = mix(h, y[t]);
        report("requant_row", e, n, i, h);
    }
    emit("done\n");
    return 0;
}

#ifdef FT_KERNEL_CHECK_HOST
int main(void) { return ft_kernel_check(); }
#else
int main(void) {
    board_init();
    ft_kernel_check();
    board_exit(0);
}
#endif
