/* CMSDK APB UART0, polled: the one driver a port to a real board replaces. */
#include "board.h"

void uart_init(void) {
    UART_BAUDDIV = 16; /* QEMU needs >= 16 to transmit; it does not model the baud rate */
    UART_CTRL = 3u;
}

void uart_write(const void *data, size_t n) {
    const uint8_t *p = (const uint8_t *)data;
    while (n--) {
        while (UART_STATE & 1u) {
        }
        UART_DATA = *p++;
    }
}

int uart_read_byte(void) {
    while (!(UART_STATE & 2u)) {
    }
    return (int)(UART_DATA & 0xFFu);
}

/* Semihosting SYS_EXIT (QEMU with -semihosting ends with this status; otherwise the core stops). */
__attribute__((noreturn)) void board_exit(int code) {
    uint32_t args[2] = {0x20026u, (uint32_t)code}; /* ADP_Stopped_ApplicationExit */
    register uint32_t r0 __asm("r0") = 0x20u;       /* SYS_EXIT_EXTENDED */
    register uint32_t *r1 __asm("r1") = args;
    __asm volatile("bkpt 0xab" : : "r"(r0), "r"(r1) : "memory");
    for (;;) {
    }
}
