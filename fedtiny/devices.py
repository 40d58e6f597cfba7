"""Device profiles: the SRAM, flash and clock of real microcontrollers (from their datasheets).

Figures are the on-chip totals a firmware can use for data (SRAM) and code plus
read-only weights (flash). Parts without on-chip flash (RP2040, ESP32-S3) list the
external flash of their reference board/module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fedtiny.errors import ScenarioError

__all__ = ["DeviceProfile", "PROFILES", "get_profile", "KB"]

KB = 1024


@dataclass(frozen=True)
class DeviceProfile:
    """A device's memory budget.

    Attributes
    ----------
    name
        Profile name (lower case).
    sram_bytes, flash_bytes
        Usable on-chip SRAM and flash (external flash where the part has none).
    clock_mhz
        Core clock.
    core
        CPU core, for reference.
    """

    name: str
    sram_bytes: int
    flash_bytes: int
    clock_mhz: int
    core: str = ""
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, DeviceProfile] = {p.name: p for p in [
    DeviceProfile("stm32f746", 320 * KB, 1024 * KB, 216, "Cortex-M7", "RM0385: 240KB SRAM1+16KB SRAM2+64KB DTCM"),
    DeviceProfile("stm32h743", 1024 * KB, 2048 * KB, 480, "Cortex-M7", "DS12110: 1MB RAM incl. 192KB TCM"),
    DeviceProfile("stm32f411", 128 * KB, 512 * KB, 100, "Cortex-M4F", "DS10314"),
    DeviceProfile("nrf52840", 256 * KB, 1024 * KB, 64, "Cortex-M4F", "nRF52840 PS v1.7"),
    DeviceProfile("rp2040", 264 * KB, 2048 * KB, 133, "2x Cortex-M0+", "no on-chip flash; 2MB QSPI on the Pico"),
    DeviceProfile("esp32-s3", 512 * KB, 8192 * KB, 240, "2x Xtensa LX7", "512KB SRAM; 8MB flash on ESP32-S3-WROOM-1-N8"),
    DeviceProfile("nrf52832", 64 * KB, 512 * KB, 64, "Cortex-M4F", "nRF52832 PS v1.4"),
    DeviceProfile("stm32l432", 64 * KB, 256 * KB, 80, "Cortex-M4F", "DS11451: 64KB SRAM"),
    DeviceProfile("nrf52810", 24 * KB, 192 * KB, 64, "Cortex-M4", "nRF52810 PS v1.3"),
    DeviceProfile("stm32g031", 8 * KB, 64 * KB, 64, "Cortex-M0+", "DS12992: 8KB SRAM, up to 64KB flash"),
    DeviceProfile("mcu-256kb", 256 * KB, 1024 * KB, 200, "generic", "the 256KB budget of Lin et al. 2022"),
]}


def get_profile(name: str, custom: DeviceProfile | None = None) -> DeviceProfile:
    """Look a profile up by name (case-insensitive); ``custom`` answers to its own name."""
    key = name.strip().lower()
    if custom is not None and key == custom.name:
        return custom
    try:
        return PROFILES[key]
    except KeyError:
        raise ScenarioError(f"device: unknown profile {name!r}; known: {', '.join(sorted(PROFILES))}"
                         + (f", {custom.name}" if custom else "")) from None
