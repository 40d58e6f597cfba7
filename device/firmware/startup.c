/* Cortex-M start-up for QEMU's MPS2 boards: vector table, .data/.bss set-up, the FPU enabled, the stack
 * painted (for its high-water mark), and SysTick counting instructions (with -icount shift=0 QEMU's
 * virtual clock advances 1 ns per instruction and SysTick runs at the board's 25 MHz). */
#include <stdint.h>
#include <string.h>

#include "board.h"

extern uint32_t __data_load, __data_start, __data_end, __bss_start, __bss_end, __stack_limit, __stack_top;
int main(void);

static volatile uint32_t systick_wraps;

void systick_handler(void) { systick_wraps++; }

uint64_t board_ticks(void) { /* 25 MHz ticks since start (24-bit counter + wraps) */
    uint32_t w, v, pending;
    do {
        w = systick_wraps;
        v = SYST_CVR;
        pending = SCB_ICSR & (1u << 26); /* PENDSTSET: wrapped, handler not yet run */
    } while (w != systick_wraps);
    if (pending && v > 0x800000u) w++; /* the counter reloaded after the wrap we have not counted */
    return (uint64_t)w * 0x1000000u + (0xFFFFFFu - v);
}

size_t board_stack_used(void) { /* bytes of the stack ever written (the paint is gone) */
    const uint32_t *p = &__stack_limit;
    while (p < &__stack_top && *p == 0xDEADBEEFu) p++;
    return (size_t)((const uint8_t *)&__stack_top - (const uint8_t *)p);
}

static void fault(void) {
    board_exit(3);
}

__attribute__((noreturn)) void reset_handler(void) {
    uint32_t *src = &__data_load, *dst = &__data_start;
    while (dst < &__data_end) *dst++ = *src++;
    for (dst = &__bss_start; dst < &__bss_end;) *dst++ = 0;
    { /* paint the stack below the current frame */
        volatile uint32_t *p = &__stack_limit;
        uint32_t here;
        while ((uintptr_t)p < (uintptr_t)&here - 256) *p++ = 0xDEADBEEFu;
    }
    SCB_CPACR |= 0xFu << 20; /* CP10, CP11: the FPU */
    __asm volatile("dsb\n isb");
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0;
    SYST_CSR = 7u; /* processor clock, interrupt, enable */
    while (SYST_CVR == 0) { /* the first clock loads the reload value (no wrap): count from there */
    }
    board_exit(main());
    for (;;) {
    }
}

__attribute__((section(".vectors"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))(&__stack_top), reset_handler, fault, fault, fault, fault, fault, 0, 0, 0, 0, fault, fault, 0,
    fault, systick_handler,
};
