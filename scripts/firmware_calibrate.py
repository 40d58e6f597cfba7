"""make firmware-calibrate: write fedtiny/kernel_costs.py from measurement builds' profiles.

Each argument is the JSON `scripts/firmware_profile.py --out` wrote for one board and kernel build (its
"board" and "kernels" keys say which): the per-kind costs fitted on it (fedtiny.budget.step_time.fit_costs)
become fedtiny.kernel_costs.MEASURED[(core family, device.kernels)], with the run that produced them.

usage: python scripts/firmware_calibrate.py PROFILE.json [...] > fedtiny/kernel_costs.py
(pure data: fedtiny.devices imports it)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FAMILY = {"an386": "Cortex-M4", "netduinoplus2": "Cortex-M4", "an500": "Cortex-M7"}
KERNELS = {"dsp": "optimized", "portable": "reference"}


def main() -> int:
    runs = [json.loads(Path(p).read_text()) for p in sys.argv[1:]]
    if not runs:
        raise SystemExit(__doc__)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        '"""Measured cycles of fedtiny\'s C kernels per op kind (written by `make firmware-calibrate`: do not edit).',
        "",
        "Each entry is fitted (fedtiny.budget.step_time.fit_costs) on one QEMU run of a measurement build",
        "(`make firmware-profile`): instructions per MAC of each (kind, part) and per element it writes, per",
        "output plane, per output-gradient element, per elementwise element and per weight element updated, read",
        "as cycles at CPI 1; fedtiny.devices.with_kernels turns an entry into a KernelCosts. Derivation and",
        "checks: docs/results/device-time.md.",
        '"""',
        "",
        "MEASURED = {",
    ]
    for run in runs:
        key = (FAMILY[run["board"]], KERNELS[run["kernels"]])
        c = run["fitted_costs"]
        per_mac = {tuple(k.split("/")): v for k, v in sorted(c["per_mac"].items())}
        source = (
            f"{run['scenario']} {' '.join(run['overrides'])} on {run['board']}, {run['kernels']} kernels, "
            f"commit {commit}"
        )
        lines += [
            f"    {key!r}: {{",
            f'        "per_mac": {per_mac!r},',
            f'        "per_written": {dict((tuple(k.split("/")), v) for k, v in sorted(c["per_written"].items()))!r},',
            f'        "per_channel": {c["per_channel"]},',
            f'        "per_gradient_element": {c["per_gradient_element"]}, "per_elementwise": {c["per_elementwise"]},',
            f'        "per_update_element": {c["per_update_element"]},',
            f'        "source": "{source}"}},',
        ]
    lines.append("}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
