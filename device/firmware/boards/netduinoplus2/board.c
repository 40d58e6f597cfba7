/* QEMU's netduinoplus2 (STM32F405, Cortex-M4F): USART1 (polled) and the independent watchdog (IWDG).
 *
 * QEMU models the USART's registers (hw/char/stm32f2xx_usart.c: it drops received bytes unless CR1 has UE
 * and RE, transmits at once, ignores BRR) but not the RCC, the GPIOs or the IWDG (unimplemented devices):
 * the clock and pin set-up below and the whole watchdog are for a physical STM32F405 and do nothing in
 * QEMU. Their registers are RM0090's as written down here, not tried on hardware; a physical board also
 * needs its PLL set up for the 168 MHz the tick assumes (board_config.h), which this port does not do. */
#include "board.h"
#include "board_port.h"
#include "cortex_m.h"

#define USART_SR REG(STM32_USART1_BASE + 0x00) /* bit 5 RXNE, bit 7 TXE */
#define USART_DR REG(STM32_USART1_BASE + 0x04)
#define USART_BRR REG(STM32_USART1_BASE + 0x08)
#define USART_CR1 REG(STM32_USART1_BASE + 0x0C) /* bit 13 UE, bit 3 TE, bit 2 RE */
#define SR_RXNE (1u << 5)
#define SR_TXE (1u << 7)

#define RCC_AHB1ENR REG(STM32_RCC_BASE + 0x30) /* bit 0 GPIOA */
#define RCC_APB2ENR REG(STM32_RCC_BASE + 0x44) /* bit 4 USART1 */
#define GPIOA_MODER REG(STM32_GPIOA_BASE + 0x00)
#define GPIOA_AFRH REG(STM32_GPIOA_BASE + 0x24)

#define IWDG_KR REG(STM32_IWDG_BASE + 0x00) /* 0xCCCC start, 0xAAAA reload, 0x5555 unlock PR and RLR */
#define IWDG_PR REG(STM32_IWDG_BASE + 0x04) /* 6: LSI / 256 */
#define IWDG_RLR REG(STM32_IWDG_BASE + 0x08) /* 12 bits */
#define IWDG_SR REG(STM32_IWDG_BASE + 0x0C)  /* bits 0, 1: PR, RLR update in progress */

static int uart_ready, watchdog_on;

void uart_init(void) {
    if (uart_ready) return;
    RCC_AHB1ENR |= 1u << 0;
    RCC_APB2ENR |= 1u << 4;
    GPIOA_MODER = (GPIOA_MODER & ~(0xFu << 18)) | (0xAu << 18); /* PA9 (TX), PA10 (RX): alternate function */
    GPIOA_AFRH = (GPIOA_AFRH & ~(0xFFu << 4)) | (0x77u << 4);    /* AF7: USART1 */
    USART_BRR = 0x2D9u;                                           /* 115200 baud from an 84 MHz APB2 */
    USART_CR1 = (1u << 13) | (1u << 3) | (1u << 2);
    uart_ready = 1;
}

void uart_write(const void *data, size_t n) {
    const uint8_t *p = (const uint8_t *)data;
    while (n--) {
        while (!(USART_SR & SR_TXE)) {
        }
        USART_DR = *p++;
    }
}

int uart_read_byte(void) {
    while (!(USART_SR & SR_RXNE)) board_watchdog_kick();
    return (int)(USART_DR & 0xFFu);
}

int uart_read_byte_timeout(uint32_t timeout_us) {
    const uint64_t end = board_ticks() + board_port_us_to_ticks(timeout_us);
    while (!(USART_SR & SR_RXNE)) {
        board_watchdog_kick();
        if (board_ticks() >= end) return -1;
    }
    return (int)(USART_DR & 0xFFu);
}

/* The IWDG resets the chip when its down-counter (LSI / 256, 125 Hz nominal) reaches zero; it has no
 * early-warning interrupt, and once started only a reset stops it. */
static void watchdog_start(void) {
    uint32_t reload = (uint32_t)((uint64_t)BOARD_WATCHDOG_MS * (STM32_LSI_HZ / 256u) / 1000u), n;
    if (reload > 0xFFFu) reload = 0xFFFu; /* at most 4096 / 125 Hz = 32.8 s */
    if (reload == 0) reload = 1;
    IWDG_KR = 0xCCCCu;
    IWDG_KR = 0x5555u;
    IWDG_PR = 6u;
    IWDG_RLR = reload;
    for (n = 0; (IWDG_SR & 3u) && n < 1000000u; n++) { /* the update crosses into the LSI domain */
    }
    IWDG_KR = 0xAAAAu;
    watchdog_on = 1;
}

void board_watchdog_kick(void) {
    if (watchdog_on) IWDG_KR = 0xAAAAu;
}

int board_port_nmi_is_watchdog(void) { return 0; }

void board_init(void) {
    uart_init();
    watchdog_start();
}
