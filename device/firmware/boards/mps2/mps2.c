/* QEMU's MPS2 boards (mps2-an386 Cortex-M4F, mps2-an500 Cortex-M7): CMSDK APB UART0 (polled) and the
 * CMSDK APB watchdog. Both are at the same addresses on both boards (QEMU's hw/arm/mps2.c; `info mtree`). */
#include "board.h"
#include "board_port.h"
#include "cortex_m.h"

#define UART_DATA REG(MPS2_UART0_BASE + 0x00)
#define UART_STATE REG(MPS2_UART0_BASE + 0x04) /* bit 0 TX full, bit 1 RX full */
#define UART_CTRL REG(MPS2_UART0_BASE + 0x08)  /* bit 0 TX enable, bit 1 RX enable */
#define UART_BAUDDIV REG(MPS2_UART0_BASE + 0x10)

#define WDOG_LOAD REG(MPS2_WDOG_BASE + 0x000)
#define WDOG_CONTROL REG(MPS2_WDOG_BASE + 0x008) /* bit 0 INTEN (counter and interrupt), bit 1 RESEN */
#define WDOG_INTCLR REG(MPS2_WDOG_BASE + 0x00C)  /* any write: interrupt cleared, counter reloaded */
#define WDOG_MIS REG(MPS2_WDOG_BASE + 0x014)
#define WDOG_LOCK REG(MPS2_WDOG_BASE + 0xC00)    /* 0x1ACCE551 unlocks the other registers, anything else locks */
#define WDOG_UNLOCK 0x1ACCE551u

static int uart_ready, watchdog_on;

void uart_init(void) {
    if (uart_ready) return;
    UART_BAUDDIV = 16; /* QEMU needs >= 16 to transmit; it does not model the baud rate */
    UART_CTRL = 3u;
    uart_ready = 1;
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
    while (!(UART_STATE & 2u)) board_watchdog_kick();
    return (int)(UART_DATA & 0xFFu);
}

int uart_read_byte_timeout(uint32_t timeout_us) {
    const uint64_t end = board_ticks() + board_port_us_to_ticks(timeout_us);
    while (!(UART_STATE & 2u)) {
        board_watchdog_kick();
        if (board_ticks() >= end) return -1;
    }
    return (int)(UART_DATA & 0xFFu);
}

/* The watchdog counts WDOGCLK (the 25 MHz system clock) down from LOAD: at zero it raises its interrupt
 * (the NMI on these boards) and reloads; at zero again with the interrupt still set it resets the system
 * (RESEN; QEMU performs its watchdog action, a reset by default). The NMI comes first: board_fault() ends
 * with BOARD_EXIT_WATCHDOG (the exit code under QEMU, a reset on a board without a debugger). */
static void watchdog_start(void) {
    WDOG_LOCK = WDOG_UNLOCK;
    WDOG_LOAD = (uint32_t)((uint64_t)BOARD_WATCHDOG_MS * (MPS2_WDOGCLK_HZ / 1000u));
    WDOG_CONTROL = 3u; /* INTEN starts the counter from LOAD; RESEN */
    WDOG_LOCK = 0;
    watchdog_on = 1;
}

void board_watchdog_kick(void) {
    if (!watchdog_on) return;
    WDOG_LOCK = WDOG_UNLOCK;
    WDOG_INTCLR = 1u;
    WDOG_LOCK = 0;
}

int board_port_nmi_is_watchdog(void) { return (WDOG_MIS & 1u) != 0; }

void board_init(void) { /* the clocks are fixed on these boards; SysTick started at reset */
    uart_init();
    watchdog_start();
}
