/* The MPS2 boards as QEMU models them (AN386 Cortex-M4F, AN500 Cortex-M7): UART0, SysTick, exit. */
#ifndef FEDTINY_BOARD_H
#define FEDTINY_BOARD_H
#include <stddef.h>
#include <stdint.h>

#define REG(a) (*(volatile uint32_t *)(a))
#define UART0_BASE 0x40004000u /* CMSDK APB UART */
#define UART_DATA REG(UART0_BASE + 0x00)
#define UART_STATE REG(UART0_BASE + 0x04) /* bit 0 TX full, bit 1 RX full */
#define UART_CTRL REG(UART0_BASE + 0x08)  /* bit 0 TX enable, bit 1 RX enable */
#define UART_BAUDDIV REG(UART0_BASE + 0x10)
#define SYST_CSR REG(0xE000E010u)
#define SYST_RVR REG(0xE000E014u)
#define SYST_CVR REG(0xE000E018u)
#define SCB_CPACR REG(0xE000ED88u)
#define SCB_ICSR REG(0xE000ED04u)
#define BOARD_TICK_HZ 25000000u /* QEMU's MPS2 system clock: 40 ns per tick, 40 instructions at -icount shift=0 */

void uart_init(void);
void uart_write(const void *data, size_t n);
int uart_read_byte(void); /* blocks */
uint64_t board_ticks(void);
size_t board_stack_used(void);
__attribute__((noreturn)) void board_exit(int code);
#endif
