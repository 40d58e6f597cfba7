"""Measured cycles of fedtiny's C kernels per op kind (written by `make firmware-calibrate`: do not edit).

Each entry is fitted (fedtiny.budget.step_time.fit_costs) on one QEMU run of a measurement build
(`make firmware-profile`): instructions per MAC of each (kind, part) and per element it writes, per
output plane, per output-gradient element, per elementwise element and per weight element updated, read
as cycles at CPI 1; fedtiny.devices.with_kernels turns an entry into a KernelCosts. Derivation and
checks: docs/results/device-time.md.
"""

MEASURED = {
    ('Cortex-M4', 'optimized'): {
        "per_mac": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 2.47, ('depthwise', 'weight'): 10.757, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 2.402, ('pointwise', 'input'): 2.692, ('pointwise', 'weight'): 2.234, ('regular', 'forward'): 17.332, ('regular', 'weight'): 13.97},
        "per_written": {('depthwise', 'forward'): 110.75, ('depthwise', 'input'): 149.27, ('depthwise', 'weight'): 205.67, ('fc', 'forward'): 0.0, ('fc', 'input'): 265.23, ('fc', 'weight'): 30.13, ('pointwise', 'forward'): 44.25, ('pointwise', 'input'): 20.54, ('pointwise', 'weight'): 23.25, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 521.7,
        "per_gradient_element": 48.63, "per_elementwise": 55.26,
        "per_update_element": 107.89,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an386, dsp kernels, commit 212df9a"},
    ('Cortex-M4', 'reference'): {
        "per_mac": {('depthwise', 'forward'): 19.647, ('depthwise', 'input'): 5.65, ('depthwise', 'weight'): 11.796, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 6.835, ('pointwise', 'input'): 6.879, ('pointwise', 'weight'): 3.898, ('regular', 'forward'): 21.71, ('regular', 'weight'): 14.429},
        "per_written": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 142.12, ('depthwise', 'weight'): 168.52, ('fc', 'forward'): 0.0, ('fc', 'input'): 302.79, ('fc', 'weight'): 26.94, ('pointwise', 'forward'): 39.47, ('pointwise', 'input'): 17.79, ('pointwise', 'weight'): 17.18, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 454.2,
        "per_gradient_element": 50.51, "per_elementwise": 55.26,
        "per_update_element": 107.88,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an386, portable kernels, commit 212df9a"},
    ('Cortex-M7', 'optimized'): {
        "per_mac": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 4.199, ('depthwise', 'weight'): 10.606, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 2.407, ('pointwise', 'input'): 2.691, ('pointwise', 'weight'): 2.235, ('regular', 'forward'): 17.048, ('regular', 'weight'): 13.705},
        "per_written": {('depthwise', 'forward'): 112.31, ('depthwise', 'input'): 154.9, ('depthwise', 'weight'): 198.3, ('fc', 'forward'): 0.0, ('fc', 'input'): 255.15, ('fc', 'weight'): 32.66, ('pointwise', 'forward'): 43.51, ('pointwise', 'input'): 19.78, ('pointwise', 'weight'): 25.76, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 517.7,
        "per_gradient_element": 47.53, "per_elementwise": 56.73,
        "per_update_element": 103.23,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an500, dsp kernels, commit 212df9a"},
    ('Cortex-M7', 'reference'): {
        "per_mac": {('depthwise', 'forward'): 19.86, ('depthwise', 'input'): 7.43, ('depthwise', 'weight'): 11.647, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 6.84, ('pointwise', 'input'): 6.878, ('pointwise', 'weight'): 3.9, ('regular', 'forward'): 21.458, ('regular', 'weight'): 14.163},
        "per_written": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 147.63, ('depthwise', 'weight'): 161.03, ('fc', 'forward'): 0.0, ('fc', 'input'): 298.12, ('fc', 'weight'): 29.47, ('pointwise', 'forward'): 39.11, ('pointwise', 'input'): 17.41, ('pointwise', 'weight'): 19.67, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 449.5,
        "per_gradient_element": 49.41, "per_elementwise": 56.73,
        "per_update_element": 103.23,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an500, portable kernels, commit 212df9a"},
}
