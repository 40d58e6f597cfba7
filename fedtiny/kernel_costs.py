"""Measured cycles of fedtiny's C kernels per op kind (written by `make firmware-calibrate`: do not edit).

Each entry is fitted (fedtiny.budget.step_time.fit_costs) on one QEMU run of a measurement build
(`make firmware-profile`): instructions per MAC of each (kind, part) and per element it writes, per
output plane, per output-gradient element, per elementwise element and per weight element updated, read
as cycles at CPI 1; fedtiny.devices.with_kernels turns an entry into a KernelCosts. Derivation and
checks: docs/results/device-time.md.
"""

MEASURED = {
    ('Cortex-M4', 'optimized'): {
        "per_mac": {('depthwise', 'forward'): 6.598, ('depthwise', 'input'): 4.968, ('depthwise', 'weight'): 10.755, ('fc', 'forward'): 0.0, ('fc', 'input'): 24.305, ('fc', 'weight'): 28.718, ('pointwise', 'forward'): 2.051, ('pointwise', 'input'): 1.714, ('pointwise', 'weight'): 2.112, ('regular', 'forward'): 11.518, ('regular', 'weight'): 13.986},
        "per_written": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 51.62, ('depthwise', 'weight'): 206.81, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 17.24, ('pointwise', 'input'): 22.24, ('pointwise', 'weight'): 23.27, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 926.8,
        "per_gradient_element": 40.23, "per_elementwise": 38.67,
        "per_update_element": 58.2,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an386, dsp kernels, commit 6f74af4"},
    ('Cortex-M4', 'reference'): {
        "per_mac": {('depthwise', 'forward'): 20.511, ('depthwise', 'input'): 4.507, ('depthwise', 'weight'): 11.797, ('fc', 'forward'): 13.004, ('fc', 'input'): 29.809, ('fc', 'weight'): 34.283, ('pointwise', 'forward'): 1.896, ('pointwise', 'input'): 6.88, ('pointwise', 'weight'): 5.4, ('regular', 'forward'): 13.043, ('regular', 'weight'): 14.444},
        "per_written": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 122.16, ('depthwise', 'weight'): 169.44, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 125.61, ('pointwise', 'input'): 17.5, ('pointwise', 'weight'): 22.96, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 0.0,
        "per_gradient_element": 42.11, "per_elementwise": 38.68,
        "per_update_element": 58.2,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an386, portable kernels, commit 6f74af4"},
    ('Cortex-M7', 'optimized'): {
        "per_mac": {('depthwise', 'forward'): 6.587, ('depthwise', 'input'): 4.933, ('depthwise', 'weight'): 10.608, ('fc', 'forward'): 0.0, ('fc', 'input'): 23.743, ('fc', 'weight'): 27.711, ('pointwise', 'forward'): 2.191, ('pointwise', 'input'): 1.714, ('pointwise', 'weight'): 2.362, ('regular', 'forward'): 11.547, ('regular', 'weight'): 13.701},
        "per_written": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 51.74, ('depthwise', 'weight'): 198.05, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 14.68, ('pointwise', 'input'): 22.14, ('pointwise', 'weight'): 24.03, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 946.2,
        "per_gradient_element": 39.65, "per_elementwise": 39.17,
        "per_update_element": 50.66,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an500, dsp kernels, commit 6f74af4"},
    ('Cortex-M7', 'reference'): {
        "per_mac": {('depthwise', 'forward'): 20.532, ('depthwise', 'input'): 4.51, ('depthwise', 'weight'): 11.648, ('fc', 'forward'): 12.981, ('fc', 'input'): 29.595, ('fc', 'weight'): 34.29, ('pointwise', 'forward'): 1.883, ('pointwise', 'input'): 7.005, ('pointwise', 'weight'): 5.4, ('regular', 'forward'): 13.078, ('regular', 'weight'): 14.16},
        "per_written": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 122.57, ('depthwise', 'weight'): 160.78, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 126.49, ('pointwise', 'input'): 17.21, ('pointwise', 'weight'): 22.95, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 0.0,
        "per_gradient_element": 41.53, "per_elementwise": 39.16,
        "per_update_element": 50.66,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an500, portable kernels, commit 6f74af4"},
}
