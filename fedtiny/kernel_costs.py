"""Measured cycles of fedtiny's C kernels per op kind (written by `make firmware-calibrate`: do not edit).

Each entry is fitted (fedtiny.budget.step_time.fit_costs) on one QEMU run of a measurement build
(`make firmware-profile`): instructions per MAC of each (kind, part) and per element it writes, per
output plane, per output-gradient element, per elementwise element and per weight element updated, read
as cycles at CPI 1; fedtiny.devices.with_kernels turns an entry into a KernelCosts. Derivation and
checks: docs/results/device-time.md.
"""

MEASURED = {
    ('Cortex-M4', 'optimized'): {
        "per_mac": {('depthwise', 'forward'): 7.098, ('depthwise', 'input'): 4.968, ('depthwise', 'weight'): 10.755, ('fc', 'forward'): 0.0, ('fc', 'input'): 24.307, ('fc', 'weight'): 28.718, ('pointwise', 'forward'): 1.915, ('pointwise', 'input'): 1.714, ('pointwise', 'weight'): 2.112, ('regular', 'forward'): 10.687, ('regular', 'weight'): 13.986},
        "per_written": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 51.62, ('depthwise', 'weight'): 206.81, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 20.49, ('pointwise', 'input'): 22.24, ('pointwise', 'weight'): 23.28, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 837.2,
        "per_gradient_element": 36.96, "per_elementwise": 39.66,
        "per_update_element": 58.2,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an386, dsp kernels, commit 3d5e0d1"},
    ('Cortex-M4', 'reference'): {
        "per_mac": {('depthwise', 'forward'): 20.511, ('depthwise', 'input'): 4.506, ('depthwise', 'weight'): 11.799, ('fc', 'forward'): 13.005, ('fc', 'input'): 29.808, ('fc', 'weight'): 34.293, ('pointwise', 'forward'): 2.04, ('pointwise', 'input'): 6.88, ('pointwise', 'weight'): 5.4, ('regular', 'forward'): 13.834, ('regular', 'weight'): 14.444},
        "per_written": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 122.16, ('depthwise', 'weight'): 169.34, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 124.11, ('pointwise', 'input'): 17.5, ('pointwise', 'weight'): 22.95, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 0.0,
        "per_gradient_element": 38.84, "per_elementwise": 39.66,
        "per_update_element": 58.2,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an386, portable kernels, commit 3d5e0d1"},
    ('Cortex-M7', 'optimized'): {
        "per_mac": {('depthwise', 'forward'): 7.053, ('depthwise', 'input'): 4.933, ('depthwise', 'weight'): 10.607, ('fc', 'forward'): 0.0, ('fc', 'input'): 23.743, ('fc', 'weight'): 27.683, ('pointwise', 'forward'): 2.06, ('pointwise', 'input'): 1.714, ('pointwise', 'weight'): 2.362, ('regular', 'forward'): 10.761, ('regular', 'weight'): 13.702},
        "per_written": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 51.74, ('depthwise', 'weight'): 198.06, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 17.77, ('pointwise', 'input'): 22.14, ('pointwise', 'weight'): 24.01, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 862.6,
        "per_gradient_element": 36.38, "per_elementwise": 39.66,
        "per_update_element": 50.66,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an500, dsp kernels, commit 3d5e0d1"},
    ('Cortex-M7', 'reference'): {
        "per_mac": {('depthwise', 'forward'): 20.532, ('depthwise', 'input'): 4.51, ('depthwise', 'weight'): 11.647, ('fc', 'forward'): 12.963, ('fc', 'input'): 29.594, ('fc', 'weight'): 34.275, ('pointwise', 'forward'): 2.016, ('pointwise', 'input'): 7.005, ('pointwise', 'weight'): 5.4, ('regular', 'forward'): 13.814, ('regular', 'weight'): 14.16},
        "per_written": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 122.57, ('depthwise', 'weight'): 160.81, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 125.13, ('pointwise', 'input'): 17.21, ('pointwise', 'weight'): 22.95, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 0.0,
        "per_gradient_element": 38.26, "per_elementwise": 39.66,
        "per_update_element": 50.66,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an500, portable kernels, commit 3d5e0d1"},
}
