/* What every Cortex-M board shares: the vector table and reset (.data, .bss, the FPU, the stack painted
 * for its high-water mark, the MPU's stack guard), SysTick as the tick, the fault handlers, and the exit
 * (semihosting where a host is there, a system reset otherwise). A board adds boards/<board>/: its UART,
 * watchdog, board_init and link script (README.md). */
#include <string.h>

#include "board.h"
#include "board_port.h"
#include "cortex_m.h"

extern uint32_t __data_load, __data_start, __data_end, __bss_start, __bss_end, __bss2_start, __bss2_end, __stack_limit,
    __stack_top;
int main(void);

/* ------------------------------------------------------------------ tick: SysTick on the core clock */

static volatile uint32_t systick_wraps;

void systick_handler(void) { systick_wraps++; }

static uint64_t systick_count(void) { /* core clock cycles since start (24-bit counter + wraps) */
    uint32_t w, v, pending;
    do {
        w = systick_wraps;
        v = SYST_CVR;
        pending = SCB_ICSR & (1u << 26); /* PENDSTSET: wrapped, handler not yet run */
    } while (w != systick_wraps);
    if (pending && v > 0x800000u) w++; /* the counter reloaded after the wrap we have not counted */
    return (uint64_t)w * 0x1000000u + (0xFFFFFFu - v);
}

uint64_t board_ticks(void) {
#if BOARD_SYSTICK_HZ == BOARD_TICK_HZ
    return systick_count();
#else /* a core clock that does not divide 10^9: count in BOARD_TICK_HZ, exactly */
    const uint64_t c = systick_count();
    return c / BOARD_SYSTICK_HZ * BOARD_TICK_HZ + c % BOARD_SYSTICK_HZ * BOARD_TICK_HZ / BOARD_SYSTICK_HZ;
#endif
}

static void systick_start(void) {
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0;
    SYST_CSR = 7u; /* processor clock, interrupt, enable */
    while (SYST_CVR == 0) { /* the first clock loads the reload value (no wrap): count from there */
    }
}

/* ------------------------------------------------------------------ the stack */

size_t board_stack_used(void) { /* bytes of the stack ever written (the paint is gone) */
    const uint32_t *p = &__stack_limit;
    while (p < &__stack_top && *p == 0xDEADBEEFu) p++;
    return (size_t)((const uint8_t *)&__stack_top - (const uint8_t *)p);
}

/* The link scripts put the stack at the bottom of RAM, so it grows towards RAM's start and never into
 * .data or .bss. Below it, an MPU region that nothing may access (BOARD_STACK_GUARD_BYTES, outside RAM,
 * costs no RAM): a push past the limit is a MemManage fault, reported as BOARD_EXIT_STACK_OVERFLOW. */
#define GUARD_SIZE_FIELD(bytes) ((uint32_t)(31 - __builtin_clz(bytes)) - 1u)

static void stack_guard(void) {
    const uint32_t base = (uint32_t)&__stack_limit - BOARD_STACK_GUARD_BYTES;
    if (((MPU_TYPE >> 8) & 0xFFu) == 0) return; /* no MPU: the memory below RAM is all that guards it */
    MPU_CTRL = 0;
    MPU_RNR = 0;
    MPU_RBAR = base; /* aligned: the link script asserts it */
    MPU_RASR = (1u << 28) | (0u << 24) | (GUARD_SIZE_FIELD(BOARD_STACK_GUARD_BYTES) << 1) | 1u; /* XN, no access */
    MPU_CTRL = (1u << 2) | 1u; /* the default map elsewhere (privileged), the MPU on; off in HardFault/NMI */
    barrier();
}

/* ------------------------------------------------------------------ exit */

__attribute__((noreturn)) static void system_reset(void) {
    barrier();
    SCB_AIRCR = (0x05FAu << 16) | (SCB_AIRCR & (7u << 8)) | (1u << 2); /* SYSRESETREQ, the priority grouping kept */
    barrier();
    for (;;) {
    }
}

/* Semihosting SYS_EXIT_EXTENDED: QEMU with -semihosting-config enable=on ends with this status. */
static void semihosting_exit(int code) {
    uint32_t args[2] = {0x20026u, (uint32_t)code}; /* ADP_Stopped_ApplicationExit */
    register uint32_t r0 __asm("r0") = 0x20u;
    register uint32_t *r1 __asm("r1") = args;
    __asm volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
}

/* Semihosting SYS_WRITE0: a NUL-terminated string on the host's console (QEMU's standard output). Only in
 * images built for a host (SEMIHOSTING=1): a measurement build's report (FT_PROFILE), never the protocol. */
void board_debug_write(const char *text) {
#if BOARD_SEMIHOSTING
    register uint32_t r0 __asm("r0") = 0x04u;
    register const char *r1 __asm("r1") = text;
    __asm volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
#else
    (void)text;
#endif
}

/* With BOARD_SEMIHOSTING (the QEMU builds: the Makefile's SEMIHOSTING=1) the exit is a semihosting call; a
 * BKPT that no debugger takes becomes a HardFault (HFSR.DEBUGEVT on a core; QEMU without semihosting takes
 * it too), whose handler resets, so a thread-mode exit does not lock a board up. From a fault handler the
 * same BKPT locks the core up (a running watchdog resets it): build physical images with SEMIHOSTING=0. Without it (SEMIHOSTING=0, for a physical board) semihosting is used only
 * while a debugger is attached (DHCSR.C_DEBUGEN), and the board resets otherwise. */
static volatile uint32_t exiting; /* board_exit began: a fault after this is its BKPT that no debugger took */

__attribute__((noreturn)) void board_exit(int code) {
    exiting = 1;
#if BOARD_SEMIHOSTING
    semihosting_exit(code);
#else
    if (DHCSR & 1u) semihosting_exit(code);
#endif
    system_reset();
}

/* ------------------------------------------------------------------ faults */

/* Called with the stack reset to its top (the fault may be the stack's own), `sp` the stack pointer at
 * the fault, `nmi` 1 from the NMI (a watchdog's warning on the MPS2 boards). */
__attribute__((used, noreturn)) void board_fault(uint32_t sp, uint32_t nmi) {
    const uint32_t cfsr = SCB_CFSR, limit = (uint32_t)&__stack_limit;
    if (nmi) board_exit(board_port_nmi_is_watchdog() ? BOARD_EXIT_WATCHDOG : BOARD_EXIT_FAULT);
    if (exiting || (SCB_HFSR & HFSR_DEBUGEVT)) system_reset(); /* a semihosting BKPT without a debugger */
    if (sp < limit + 128u || (cfsr & (CFSR_MSTKERR | CFSR_STKERR)) ||
        ((cfsr & CFSR_MMARVALID) && SCB_MMFAR < limit && SCB_MMFAR >= limit - BOARD_STACK_GUARD_BYTES))
        board_exit(BOARD_EXIT_STACK_OVERFLOW);
    board_exit(BOARD_EXIT_FAULT);
}

/* The handlers touch no stack before they move it to its top. */
__attribute__((naked)) static void fault_handler(void) {
    __asm volatile("mrs r0, msp\n ldr r1, =__stack_top\n mov sp, r1\n movs r1, #0\n b board_fault\n .ltorg");
}

__attribute__((naked)) static void nmi_handler(void) {
    __asm volatile("mrs r0, msp\n ldr r1, =__stack_top\n mov sp, r1\n movs r1, #1\n b board_fault\n .ltorg");
}

/* ------------------------------------------------------------------ self-tests (tests/test_firmware_boards.py) */

#if defined(FT_TEST_STACK_OVERFLOW)
__attribute__((noinline)) static uint32_t recurse(uint32_t n) { /* no tail call: the sum comes after it */
    volatile uint32_t frame[16];
    frame[n & 15u] = n;
    return recurse(n + 1u) + frame[n & 15u];
}
#endif

static void self_test(void) {
#if defined(FT_TEST_STACK_OVERFLOW)
    board_init();
    board_exit((int)recurse(0)); /* never returns: the guard stops it */
#elif defined(FT_TEST_WATCHDOG_STALL)
    board_init();
    for (;;) __asm volatile("wfi"); /* never kicks the watchdog */
#endif
}

/* ------------------------------------------------------------------ reset */

__attribute__((noreturn)) void reset_handler(void) {
    uint32_t *src = &__data_load, *dst = &__data_start;
    while (dst < &__data_end) *dst++ = *src++;
    for (dst = &__bss_start; dst < &__bss_end;) *dst++ = 0;
    for (dst = &__bss2_start; dst < &__bss2_end;) *dst++ = 0; /* the second RAM region's share, if any */
    { /* paint the stack below the current frame */
        volatile uint32_t *p = &__stack_limit;
        uint32_t here;
        while ((uintptr_t)p < (uintptr_t)&here - 256) *p++ = 0xDEADBEEFu;
    }
    SCB_VTOR = (uint32_t)&__vectors;
#if defined(__ARM_FP)
    SCB_CPACR |= 0xFu << 20; /* CP10, CP11: the FPU */
#endif
    SCB_SHCSR |= 7u << 16;   /* MemManage, BusFault and UsageFault to their handlers */
    barrier();
    stack_guard();
    systick_start();
    self_test();
    board_exit(main());
}

__attribute__((section(".vectors"), used)) void (*const __vectors[16])(void) = {
    (void (*)(void))(&__stack_top), reset_handler, nmi_handler, fault_handler, fault_handler, fault_handler,
    fault_handler, 0, 0, 0, 0, fault_handler /* SVC */, fault_handler /* DebugMon */, 0,
    fault_handler /* PendSV */, systick_handler,
};
