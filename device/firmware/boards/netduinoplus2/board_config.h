/* QEMU's netduinoplus2: an STM32F405 (Cortex-M4F) as QEMU models it (hw/arm/netduinoplus2.c,
 * hw/arm/stm32f405_soc.c). */
#ifndef FEDTINY_BOARD_CONFIG_H
#define FEDTINY_BOARD_CONFIG_H
#define BOARD_NAME "netduinoplus2"
/* QEMU fixes SYSCLK at 168 MHz (SYSCLK_FRQ in hw/arm/netduinoplus2.c) and models no RCC; SysTick counts
 * the core clock. 10^9 / 168 MHz is not an integer, so board_ticks() counts nanoseconds, converted exactly
 * from the core clock: one tick is one instruction at -icount shift=0. */
#ifndef BOARD_SYSTICK_HZ
#define BOARD_SYSTICK_HZ 168000000u
#endif
#define BOARD_TICK_HZ 1000000000u
#define STM32_USART1_BASE 0x40011000u /* QEMU connects its first -serial to usart[0], at 0x40011000: USART1 */
#define STM32_IWDG_BASE 0x40003000u   /* an unimplemented device in QEMU: writes ignored, reads 0 */
#define STM32_RCC_BASE 0x40023800u    /* unimplemented in QEMU */
#define STM32_GPIOA_BASE 0x40020000u  /* unimplemented in QEMU */
#define STM32_LSI_HZ 32000u           /* the IWDG's clock, nominal (it varies from part to part) */
#endif
