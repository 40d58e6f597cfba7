/* The host side of the op checks (fedtiny_step.c built with FT_CHECK_OPS into libfedtiny_step_check.so):
 * one line per tensor on standard error, "FTCHECK op what bytes hash" (FNV-1a over its bytes), the format the
 * firmware's check build prints on QEMU's console. */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

void ft_check_tensor(int32_t op, int32_t what, const void *data, size_t bytes);

void ft_check_tensor(int32_t op, int32_t what, const void *data, size_t bytes) {
    const uint8_t *p = (const uint8_t *)data;
    uint32_t h = 2166136261u;
    size_t i;
    for (i = 0; i < bytes; i++) h = (h ^ p[i]) * 16777619u;
    fprintf(stderr, "FTCHECK %d %d %lu %lu\n", (int)op, (int)what, (unsigned long)bytes, (unsigned long)h);
}
