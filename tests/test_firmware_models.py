"""A larger model than tiny-ir in the firmware, without QEMU: MLPerf Tiny's KWS DS-CNN (49x10x1, from the
.tflite) generated, compiled and linked for mps2-an386; the linked RAM and flash against the simulator's
whole-device count (fedtiny.budget.device_memory) and the profile.

The QEMU runs (MCUNet s3 and KWS federated for two rounds, update bytes equal to the simulator's) take
minutes: `make firmware-demo FIRMWARE_SCENARIO=scenarios/firmware-kws.toml` (or firmware-mcunet.toml);
device/firmware/README.md, "Larger models". Skipped without ../shared/models or the cross toolchain.
"""

import subprocess

import pytest
from conftest import ROOT

from fedtiny.tools.qemu import missing_packages

SCENARIO = ROOT / "scenarios" / "firmware-kws.toml"
KWS = ROOT.parent / "shared" / "models" / "mlperf-tiny" / "kws_ref_model.tflite"
MISSING = [p for p in missing_packages() if p != "qemu-system-arm"]  # compiles and links only


@pytest.mark.skipif(not KWS.exists(), reason=f"{KWS} is absent (see ../shared/models/mlperf-tiny/README.md)")
@pytest.mark.skipif(bool(MISSING), reason="the firmware build needs the Debian packages " + ", ".join(MISSING))
def test_kws_firmware_links_within_its_count_and_profile(tmp_path):
    from fedtiny.tools.firmware import generate

    summary = generate(str(SCENARIO), 1, tmp_path / "gen")
    assert summary["device_ram_bytes"] <= summary["profile_sram_bytes"]
    assert summary["macs_forward_per_sample"] > 2_000_000 and summary["samples"] == 32
    header = (tmp_path / "gen" / "firmware_model.h").read_text()
    assert "#define FW_SAMPLE_BYTES 490" in header  # 49 x 10 x 1, int8
    subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(ROOT / "device" / "firmware"),
            "BOARD=an386",
            f"GEN={tmp_path / 'gen'}",
            f"OUT={tmp_path / 'an386'}",
        ],
        check=True,
        capture_output=True,
    )
    out = subprocess.run(
        ["arm-none-eabi-size", "-A", "-d", str(tmp_path / "an386" / "firmware.elf")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sections = {
        p[0]: int(p[1])
        for p in (line.split() for line in out.splitlines())
        if len(p) >= 2 and p[0].startswith(".") and p[1].isdigit()
    }
    # the stack as reserved at link time (device_memory's figure; a QEMU run measures its high-water mark)
    ram = sections[".data"] + sections[".bss"] + sections.get(".stack", 0)
    assert abs(ram / summary["device_ram_bytes"] - 1) < 0.01, (ram, summary["device_ram"])
    assert ram <= summary["profile_sram_bytes"]
    flash = sections[".vectors"] + sections[".text"] + sections[".data"]
    assert abs(flash / summary["device_flash_bytes"] - 1) < 0.05, (flash, summary["device_flash"])
    assert flash <= summary["profile_flash_bytes"]
