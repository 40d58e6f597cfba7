/* QEMU's mps2-an500 (Cortex-M7). The peripherals and clock are the MPS2 ones (boards/mps2/mps2.c). */
#ifndef FEDTINY_BOARD_CONFIG_H
#define FEDTINY_BOARD_CONFIG_H
#define BOARD_NAME "an500"
#include "../mps2/mps2_config.h"
#endif
