"""Device profiles and radios: memory, clock, compute cost, power and link of real microcontrollers.

Memory figures are the on-chip totals a firmware can use for data (SRAM) and code plus
read-only weights (flash). Parts without on-chip flash (RP2040, ESP32-S3) list the
external flash of their reference board/module.

Time and energy (what :func:`compute_cycles` and :func:`round_cost` turn a step's work and bytes into):

- ``cycles_per_mac``: int8 inference cycles per multiply-accumulate of a whole network,
  from published latencies divided by the network's MACs:

  * Cortex-M4(F): 2.13, MLPerf Tiny v1.1 image classification (ResNet-8, 12.50 M MACs) on
    the STM32L4R5 at 120 MHz with X-CUBE-AI 8.0: 222.0 ms (Krai's closed-division results).
  * Cortex-M7: 2.10, TinyEngine (the engine of Lin et al.) running mcunet-in1 (the former
    "mcunet-5fps", 12.8 M MACs) in 56 ms on the STM32H743 at 480 MHz (mit-han-lab/tinyengine,
    measured results).
  * Xtensa LX7 (ESP32-S3): 2.0, between esp-nn's optimized kernels at 1.13 cycles/MAC (1x1
    convolution, 64 -> 64 channels) and 5.2-5.8 (depthwise and first-layer convolutions)
    (espressif/esp-nn kernel table); a network of mostly pointwise layers sits near 2.
  * Cortex-M0+ (RP2040, STM32G031): 8.5, an assumption: no SIMD multiply-accumulate, about 4x
    the Cortex-M4 figure. No published whole-network figure was found.

  These describe CMSIS-NN / TinyEngine-class inference. On Cortex-M4 and M7 profiles the simulator
  charges instead what fedtiny's own training kernels measure (:class:`KernelCosts`, per op kind and
  part: ``device.kernels = "optimized"`` the DSP kernels, ``"reference"`` the portable loops; the
  tables in :mod:`fedtiny.kernel_costs`, written by ``make firmware-calibrate`` from the firmware's
  per-op instruction counts in QEMU at an assumed CPI of 1; docs/results/device-time.md). A whole
  training step costs 1.9-2.4x what the published figures give it, mostly per element rather than
  per MAC (requantization, QAS's gradient quantization, the update). Other cores keep
  ``cycles_per_mac``.

- ``backward_factor``: with ``cycles_per_mac``, cycles per backward MAC relative to the forward. No
  MCU measurement is published per MAC; we assume 2. The MACs themselves come from the memory
  planner's schedule (input gradients only where a trained tensor lies upstream, weight gradients
  only for trained channels), so a sparse update is cheap where it is.

- ``active_mw``: core power while computing (run mode from flash at the listed clock,
  3 V for nRF52 and 3.3 V otherwise). nRF52840 3.3 mA and nRF52832 3.7 mA (product
  specifications' CPU run current with DC/DC, about 52 and 58 uA/MHz); STM32 parts from
  their datasheets' typical run-mode current per MHz (F746 ~0.47 mA/MHz, H743 ~0.35,
  F411 ~0.1, L432 ~0.084, G031 ~0.1); RP2040 ~22 mA at 133 MHz; ESP32-S3 ~55 mA with the CPU
  at 240 MHz and the radio off. The STM32, RP2040 and ESP32-S3 currents are typical values
  quoted from the datasheets' tables as we know them and were not re-checked against the PDFs
  here: treat them as +-30%. Against one published measurement of on-device training on a
  Cortex-M4F (0.38 nJ per cycle, STM32L4R5 at 120 MHz) the STM32L4 profile's 0.28 nJ is 0.73x:
  docs/results/device-time.md, "Energy, with a basis". Not tuned to it.

Radios (:data:`RADIOS`): goodput is application payload per second of radio time; energy
per byte is the radio's power over its goodput (the core's power while it waits is not added).

- BLE 1M / 2M PHY: 700 / 1,300 kbit/s (Nordic SoftDevice throughput tables give 0.7-0.8 and
  about 1.3 Mbit/s; the protocol ceilings with 251-byte PDUs are 790 kbit/s and 1.4 Mbit/s);
  nRF52840 radio at 0 dBm with DC/DC: TX 6.40 mA, RX 6.26 mA at 3 V (product specification,
  radio current table).
- IEEE 802.15.4 (Thread / 6LoWPAN, single hop): 100 kbit/s of the 250 kbit/s PHY (about 6.1 ms
  per 127-byte frame with CSMA back-off and ACK, 80-100 bytes of payload in it); nRF52840
  TX 6.40 mA, RX 6.53 mA.
- LoRa SF7 / SF12, 125 kHz, CR 4/5: 5,100 / 165 bit/s of payload at the largest EU868 payloads
  (222 and 51 bytes; time on air from Semtech AN1200.13's formula, PHY bit rates 5,469 and
  293 bit/s); EU868's 1% duty cycle makes each second on air cost 100 s of wall time.
  SX1276 TX +13 dBm (RFO) 29 mA, RX ~11.5 mA at 3.3 V.
- Wi-Fi (ESP32-S3): 20 Mbit/s, ESP-IDF's iperf TCP figure in open air (83/73 Mbit/s in a
  shielded box); TX 340 mA (802.11b at 21 dBm, the datasheet's worst case), RX 88 mA at 3.3 V.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from fedtiny.errors import ScenarioError
from fedtiny.kernel_costs import MEASURED

__all__ = [
    "DeviceProfile",
    "PROFILES",
    "get_profile",
    "KB",
    "Radio",
    "RADIOS",
    "get_radio",
    "RoundCost",
    "round_cost",
    "compute_seconds",
    "compute_cycles",
    "KernelCosts",
    "with_kernels",
]

KB = 1024


@dataclass(frozen=True)
class KernelCosts:
    """Cycles of a core's training kernels, measured: per MAC of each (kind, part) of a step
    (:mod:`fedtiny.budget.step_time`: kinds pointwise, depthwise, regular, fc; parts forward, input, weight)
    and per element each writes, per output plane the forward sets up, per output-gradient element
    quantized, per elementwise (ADD, pooling) element and per weight element the update writes. ``source`` names the measurement the
    figures were fitted on."""

    per_mac: tuple[tuple[tuple[str, str], float], ...]
    per_gradient_element: float
    per_elementwise: float
    per_update_element: float
    source: str = ""
    per_written: tuple[tuple[tuple[str, str], float], ...] = ()  # (kind, part) -> cycles per element written
    per_channel: float = 0.0  # cycles per output plane the forward sets up

    def cycles(self, work) -> float:
        """Cycles of one sample's work (a :class:`fedtiny.budget.step_time.StepWork`), the update aside. A
        (kind, part) the fit never saw costs the same part of another kind it did (regular, pointwise,
        depthwise, fc, in that order)."""
        per_mac, per_written = dict(self.per_mac), dict(self.per_written)
        total = 0.0
        for (kind, part), n in work.macs.items():
            k = next((k for k in (kind, "regular", "pointwise", "depthwise", "fc") if (k, part) in per_mac), None)
            if k is None:
                raise ValueError(f"kernel costs ({self.source}) have no figure for {kind}/{part}")
            total += n * per_mac[(k, part)] + work.written.get((kind, part), 0) * per_written.get((k, part), 0.0)
        return (
            total
            + work.channels * self.per_channel
            + work.gradient_elements * self.per_gradient_element
            + work.elementwise * self.per_elementwise
        )

    def update_cycles(self, work) -> float:
        """Cycles of one step's update (once per step, whatever its samples)."""
        return work.updated * self.per_update_element

    def table(self) -> dict[str, float]:
        return {f"{k}/{p}": v for (k, p), v in self.per_mac}

    @classmethod
    def from_table(cls, t: dict) -> "KernelCosts":
        """From an entry of :data:`fedtiny.kernel_costs.MEASURED`."""
        return cls(
            tuple(sorted(t["per_mac"].items())),
            t["per_gradient_element"],
            t["per_elementwise"],
            t["per_update_element"],
            t["source"],
            tuple(sorted(t["per_written"].items())),
            t["per_channel"],
        )


@dataclass(frozen=True)
class Radio:
    """A device's link to the server.

    Attributes
    ----------
    name
        Radio name (lower case).
    goodput_bps
        Application payload bits per second of radio time.
    tx_mw, rx_mw
        Radio power while sending and receiving.
    duty_cycle
        Share of wall time the radio may be on the air (1 = no regulatory limit).
    """

    name: str
    goodput_bps: float
    tx_mw: float
    rx_mw: float
    duty_cycle: float = 1.0
    note: str = ""

    def airtime_s(self, nbytes: int) -> float:
        """Seconds on the air to move ``nbytes`` of payload."""
        return 8.0 * nbytes / self.goodput_bps

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "tx_nj_per_byte": round(8e6 * self.tx_mw / self.goodput_bps, 3),
            "rx_nj_per_byte": round(8e6 * self.rx_mw / self.goodput_bps, 3),
        }


RADIOS: dict[str, Radio] = {
    r.name: r
    for r in [
        Radio("ble-1m", 700e3, 6.40 * 3.0, 6.26 * 3.0, 1.0, "BLE 1M PHY, nRF52840 at 0 dBm"),
        Radio("ble-2m", 1300e3, 6.40 * 3.0, 6.26 * 3.0, 1.0, "BLE 2M PHY, nRF52840 at 0 dBm"),
        Radio("802.15.4", 100e3, 6.40 * 3.0, 6.53 * 3.0, 1.0, "IEEE 802.15.4 / Thread, single hop"),
        Radio("lora-sf7", 5100.0, 29.0 * 3.3, 11.5 * 3.3, 0.01, "LoRa SF7/125kHz, EU868 1% duty cycle"),
        Radio("lora-sf12", 165.0, 29.0 * 3.3, 11.5 * 3.3, 0.01, "LoRa SF12/125kHz, EU868 1% duty cycle"),
        Radio("wifi", 20e6, 340.0 * 3.3, 88.0 * 3.3, 1.0, "ESP32-S3 Wi-Fi, TCP in open air"),
    ]
}


@dataclass(frozen=True)
class DeviceProfile:
    """A device's memory budget, compute cost, power and default radio.

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
    cycles_per_mac
        int8 inference cycles per multiply-accumulate (whole network).
    backward_factor
        Backward-pass cycles per MAC relative to ``cycles_per_mac``.
    active_mw
        Core power while computing.
    radio
        Name of the default radio (:data:`RADIOS`).
    """

    name: str
    sram_bytes: int
    flash_bytes: int
    clock_mhz: int
    core: str = ""
    note: str = ""
    cycles_per_mac: float = 2.13
    backward_factor: float = 2.0
    active_mw: float = 10.0
    radio: str = "ble-1m"
    kernel_costs: KernelCosts | None = None  # measured per kind (with_kernels); None: cycles_per_mac

    def to_dict(self) -> dict:
        return asdict(self)


# cycles per int8 MAC of each core (see the module docstring for the sources)
_M4, _M7, _LX7, _M0 = 2.13, 2.10, 2.0, 8.5

PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in [
        DeviceProfile(
            "stm32f746",
            320 * KB,
            1024 * KB,
            216,
            "Cortex-M7",
            "RM0385: 240KB SRAM1+16KB SRAM2+64KB DTCM; no radio on chip (an external BLE module)",
            _M7,
            2.0,
            0.47 * 216 * 3.3,
            "ble-1m",
        ),
        DeviceProfile(
            "stm32h743",
            1024 * KB,
            2048 * KB,
            480,
            "Cortex-M7",
            "DS12110: 1MB RAM incl. 192KB TCM; no radio on chip",
            _M7,
            2.0,
            0.35 * 480 * 3.3,
            "ble-1m",
        ),
        DeviceProfile(
            "stm32f411",
            128 * KB,
            512 * KB,
            100,
            "Cortex-M4F",
            "DS10314; no radio on chip",
            _M4,
            2.0,
            0.1 * 100 * 3.3,
            "ble-1m",
        ),
        DeviceProfile(
            "nrf52840", 256 * KB, 1024 * KB, 64, "Cortex-M4F", "nRF52840 PS v1.7", _M4, 2.0, 3.3 * 3.0, "ble-2m"
        ),
        DeviceProfile(
            "rp2040",
            264 * KB,
            2048 * KB,
            133,
            "2x Cortex-M0+",
            "no on-chip flash; 2MB QSPI on the Pico; no radio on chip",
            _M0,
            2.0,
            22.0 * 3.3,
            "ble-1m",
        ),
        DeviceProfile(
            "esp32-s3",
            512 * KB,
            8192 * KB,
            240,
            "2x Xtensa LX7",
            "512KB SRAM; 8MB flash on ESP32-S3-WROOM-1-N8",
            _LX7,
            2.0,
            55.0 * 3.3,
            "wifi",
        ),
        DeviceProfile(
            "nrf52832", 64 * KB, 512 * KB, 64, "Cortex-M4F", "nRF52832 PS v1.4", _M4, 2.0, 3.7 * 3.0, "ble-1m"
        ),
        DeviceProfile(
            "stm32l432",
            64 * KB,
            256 * KB,
            80,
            "Cortex-M4F",
            "DS11451: 64KB SRAM; no radio on chip",
            _M4,
            2.0,
            0.084 * 80 * 3.3,
            "ble-1m",
        ),
        DeviceProfile(
            "nrf52810", 24 * KB, 192 * KB, 64, "Cortex-M4", "nRF52810 PS v1.3", _M4, 2.0, 3.7 * 3.0, "ble-1m"
        ),
        DeviceProfile(
            "stm32g031",
            8 * KB,
            64 * KB,
            64,
            "Cortex-M0+",
            "DS12992: 8KB SRAM, up to 64KB flash; no radio",
            _M0,
            2.0,
            0.1 * 64 * 3.3,
            "ble-1m",
        ),
        DeviceProfile(
            "mcu-256kb",
            256 * KB,
            1024 * KB,
            200,
            "generic",
            "the 256KB budget of Lin et al. 2022 (Cortex-M7 costs)",
            _M7,
            2.0,
            0.47 * 200 * 3.3,
            "ble-1m",
        ),
    ]
}


_FAMILY = {"cortex-m4f": "Cortex-M4", "cortex-m4": "Cortex-M4", "cortex-m7": "Cortex-M7", "generic": "Cortex-M7"}


def with_kernels(profile: DeviceProfile, kernels: str) -> DeviceProfile:
    """``profile`` with the compute cost of the kernels its clients run (``device.kernels``).

    On Cortex-M4 and M7 cores both are fedtiny's own C kernels, measured per op kind in QEMU
    (:data:`fedtiny.kernel_costs.MEASURED`): ``optimized`` the DSP build, ``reference`` the portable loops.
    Other cores have no measurement: ``optimized`` keeps their published cycles per MAC."""
    if kernels not in ("optimized", "reference"):
        raise ScenarioError(f"device.kernels: expected optimized or reference, got {kernels!r}")
    family = _FAMILY.get(profile.core.lower())
    if family is None:
        if kernels == "reference":
            raise ScenarioError(
                f"device.kernels: 'reference' is measured for Cortex-M4 and Cortex-M7 profiles; "
                f"{profile.name} is a {profile.core or 'custom'} core"
            )
        return profile
    return replace(profile, kernel_costs=KernelCosts.from_table(MEASURED[(family, kernels)]))


def get_profile(name: str, custom: DeviceProfile | None = None) -> DeviceProfile:
    """Look a profile up by name (case-insensitive); ``custom`` answers to its own name."""
    key = name.strip().lower()
    if custom is not None and key == custom.name:
        return custom
    try:
        return PROFILES[key]
    except KeyError:
        raise ScenarioError(
            f"device: unknown profile {name!r}; known: {', '.join(sorted(PROFILES))}"
            + (f", {custom.name}" if custom else "")
        ) from None


def get_radio(name: str) -> Radio:
    """Look a radio up by name (case-insensitive)."""
    try:
        return RADIOS[name.strip().lower()]
    except KeyError:
        raise ScenarioError(f"device.radio: unknown radio {name!r}; known: {', '.join(RADIOS)}") from None


@dataclass(frozen=True)
class RoundCost:
    """One client's round on its device: simulated seconds and energy.

    ``compute_s`` is the training (forward and sparse backward MACs); ``radio_s`` the
    wall time of receiving the downlink and sending the uplink (airtime stretched by the
    duty cycle); ``energy_mj`` core energy while computing plus radio energy on the air.
    """

    compute_s: float
    radio_s: float
    energy_mj: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.radio_s


def compute_cycles(profile: DeviceProfile, work, samples: int = 1, steps: int = 1) -> float:
    """Cycles ``profile``'s core spends training ``samples`` samples in ``steps`` steps, each sample's work a
    :class:`fedtiny.budget.step_time.StepWork`: the measured kernel costs per op kind (the update once per
    step), or, without them, the published cycles per MAC with the backward factor."""
    if profile.kernel_costs is not None:
        return samples * profile.kernel_costs.cycles(work) + steps * profile.kernel_costs.update_cycles(work)
    return samples * profile.cycles_per_mac * (work.forward_macs + profile.backward_factor * work.backward_macs)


def compute_seconds(profile: DeviceProfile, cycles: float) -> float:
    """Seconds ``profile``'s core takes for ``cycles``."""
    return cycles / (profile.clock_mhz * 1e6)


def round_cost(
    profile: DeviceProfile, radio: Radio, cycles: float, downlink_bytes: int, uplink_bytes: int
) -> RoundCost:
    """A client's simulated seconds and millijoules for a round (mW x s = mJ): ``cycles`` of training
    (:func:`compute_cycles` of its samples' work) and the bytes on the air."""
    compute = compute_seconds(profile, cycles)
    down, up = radio.airtime_s(downlink_bytes), radio.airtime_s(uplink_bytes)
    energy = compute * profile.active_mw + down * radio.rx_mw + up * radio.tx_mw
    return RoundCost(compute, (down + up) / radio.duty_cycle, energy)
