/* Armv7-M system registers the board layer uses (the Architecture Reference Manual's SCB, SysTick, MPU and
 * debug registers; the same on every Cortex-M3/M4/M7). */
#ifndef FEDTINY_CORTEX_M_H
#define FEDTINY_CORTEX_M_H
#include <stdint.h>

#define REG(a) (*(volatile uint32_t *)(a))

#define SYST_CSR REG(0xE000E010u) /* bit 0 enable, 1 interrupt, 2 processor clock, 16 COUNTFLAG */
#define SYST_RVR REG(0xE000E014u)
#define SYST_CVR REG(0xE000E018u)

#define SCB_ICSR REG(0xE000ED04u)  /* bit 26 PENDSTSET */
#define SCB_VTOR REG(0xE000ED08u)
#define SCB_AIRCR REG(0xE000ED0Cu) /* VECTKEY 0x05FA in bits 31:16, bit 2 SYSRESETREQ */
#define SCB_SHCSR REG(0xE000ED24u) /* bits 16/17/18: MemManage, BusFault, UsageFault enabled */
#define SCB_CFSR REG(0xE000ED28u)  /* MMFSR (7:0), BFSR (15:8), UFSR (31:16) */
#define SCB_HFSR REG(0xE000ED2Cu)  /* bit 31 DEBUGEVT, bit 30 FORCED */
#define SCB_MMFAR REG(0xE000ED34u)
#define SCB_CPACR REG(0xE000ED88u)
#define DHCSR REG(0xE000EDF0u) /* bit 0 C_DEBUGEN: a debugger has enabled halting debug */

#define CFSR_MSTKERR (1u << 4)   /* MemManage on exception entry (stacking) */
#define CFSR_MMARVALID (1u << 7) /* MMFAR holds the faulting address */
#define CFSR_STKERR (1u << 12)   /* BusFault on exception entry (stacking) */
#define HFSR_DEBUGEVT (1u << 31)

#define MPU_TYPE REG(0xE000ED90u) /* bits 15:8 DREGION: data regions (0: no MPU) */
#define MPU_CTRL REG(0xE000ED94u) /* bit 0 ENABLE, bit 1 HFNMIENA, bit 2 PRIVDEFENA */
#define MPU_RNR REG(0xE000ED98u)
#define MPU_RBAR REG(0xE000ED9Cu)
#define MPU_RASR REG(0xE000EDA0u) /* bit 0 ENABLE, 5:1 SIZE (2^(SIZE+1) bytes), 26:24 AP, 28 XN */

static inline void barrier(void) { __asm volatile("dsb\n isb" ::: "memory"); }
#endif
