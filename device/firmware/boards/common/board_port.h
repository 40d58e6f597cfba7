/* What a board's own code (boards/<board>/) gives the shared code in boards/common/, besides the public
 * board.h functions it implements (board_init, uart_*, board_watchdog_kick). */
#ifndef FEDTINY_BOARD_PORT_H
#define FEDTINY_BOARD_PORT_H
#include <stdint.h>

#ifndef BOARD_STACK_GUARD_BYTES
#define BOARD_STACK_GUARD_BYTES 4096u /* the MPU region below the stack (a power of two, >= 32): outside RAM */
#endif
#ifndef BOARD_SEMIHOSTING
#define BOARD_SEMIHOSTING 0
#endif

extern void (*const __vectors[16])(void);

/* 1 when the NMI that just came is the watchdog's warning (boards whose watchdog has one), else 0 */
int board_port_nmi_is_watchdog(void);

/* uart_read_byte_timeout's deadline: `timeout_us` of board time in board_ticks() */
static inline uint64_t board_port_us_to_ticks(uint32_t timeout_us) {
    return (uint64_t)timeout_us * (BOARD_TICK_HZ / 1000000u) + (uint64_t)timeout_us * (BOARD_TICK_HZ % 1000000u) / 1000000u;
}
#endif
