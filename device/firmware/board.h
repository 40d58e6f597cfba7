/* The board layer: what main.c uses of a board (device/firmware/boards/<board>/, README.md there).
 * Every board provides these functions and, in its board_config.h, BOARD_NAME and BOARD_TICK_HZ. */
#ifndef FEDTINY_BOARD_H
#define FEDTINY_BOARD_H
#include <stddef.h>
#include <stdint.h>

#include "board_config.h" /* boards/<board>/board_config.h: BOARD_NAME, BOARD_TICK_HZ, clocks, addresses */

/* board_exit codes the board layer itself uses (main's own codes are below 3) */
#define BOARD_EXIT_FAULT 3          /* HardFault, MemManage, BusFault or UsageFault */
#define BOARD_EXIT_STACK_OVERFLOW 4 /* the stack ran into its guard (or below its limit) */
#define BOARD_EXIT_WATCHDOG 5       /* the watchdog expired (its early-warning interrupt, where it has one) */

#ifndef BOARD_WATCHDOG_MS
#define BOARD_WATCHDOG_MS 8000u /* the watchdog's period in board time: kick it at least this often */
#endif

void board_init(void);                       /* clocks, UART, watchdog (call first in main) */
void uart_init(void);                        /* the UART alone (board_init calls it; a second call does nothing) */
void uart_write(const void *data, size_t n); /* polled */
int uart_read_byte(void);                    /* blocks (kicking the watchdog while it waits) */
int uart_read_byte_timeout(uint32_t timeout_us); /* the next byte, or -1 when none came within timeout_us of board time */
uint64_t board_ticks(void);                  /* BOARD_TICK_HZ ticks since start */
size_t board_stack_used(void);               /* the stack's measured high-water mark (bytes) */
void board_watchdog_kick(void);              /* a no-op where the board has no watchdog */
__attribute__((noreturn)) void board_exit(int code); /* semihosting exit under QEMU/a debugger, else a reset */
void board_debug_write(const char *text);    /* the host's console (semihosting builds only; else nothing) */
#endif
