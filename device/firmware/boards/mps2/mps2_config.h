/* What QEMU's MPS2 boards (an386, an500) share: their clock and peripherals (boards/mps2/mps2.c). */
#ifndef FEDTINY_MPS2_CONFIG_H
#define FEDTINY_MPS2_CONFIG_H
#define BOARD_SYSTICK_HZ 25000000u /* QEMU's MPS2 system clock (SYSCLK_FRQ in hw/arm/mps2.c) */
#define BOARD_TICK_HZ 25000000u    /* 40 ns a tick: 40 instructions at -icount shift=0 */
#define MPS2_WDOGCLK_HZ 25000000u  /* the watchdog counts the same clock */
#define MPS2_UART0_BASE 0x40004000u /* CMSDK APB UART0: QEMU's first -serial */
#define MPS2_WDOG_BASE 0x40008000u  /* CMSDK APB watchdog, its interrupt on the NMI */
#endif
