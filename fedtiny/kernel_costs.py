"""Measured cycles of fedtiny's C kernels per op kind (written by `make firmware-calibrate`: do not edit).

Each entry is fitted (fedtiny.budget.step_time.fit_costs) on one QEMU run of a measurement build
(`make firmware-profile`): instructions per MAC of each (kind, part) and per element it writes, per
output plane, per output-gradient element, per elementwise element and per weight element updated, read
as cycles at CPI 1; fedtiny.devices.with_kernels turns an entry into a KernelCosts. Derivation and
checks: docs/results/device-time.md.
"""

MEASURED = {
    ('Cortex-M4', 'optimized'): {
        "per_mac": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 5.267, ('depthwise', 'weight'): 10.754, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 1.632, ('pointwise', 'input'): 2.691, ('pointwise', 'weight'): 2.234, ('regular', 'forward'): 11.634, ('regular', 'weight'): 13.986},
        "per_written": {('depthwise', 'forward'): 101.63, ('depthwise', 'input'): 51.4, ('depthwise', 'weight'): 206.83, ('fc', 'forward'): 0.0, ('fc', 'input'): 264.45, ('fc', 'weight'): 30.13, ('pointwise', 'forward'): 52.07, ('pointwise', 'input'): 20.59, ('pointwise', 'weight'): 23.25, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 709.2,
        "per_gradient_element": 48.7, "per_elementwise": 55.75,
        "per_update_element": 107.89,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an386, dsp kernels, commit d637b63"},
    ('Cortex-M4', 'reference'): {
        "per_mac": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 4.805, ('depthwise', 'weight'): 11.798, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 1.966, ('pointwise', 'input'): 6.879, ('pointwise', 'weight'): 3.898, ('regular', 'forward'): 12.782, ('regular', 'weight'): 14.444},
        "per_written": {('depthwise', 'forward'): 199.92, ('depthwise', 'input'): 121.94, ('depthwise', 'weight'): 169.38, ('fc', 'forward'): 374.64, ('fc', 'input'): 302.0, ('fc', 'weight'): 26.94, ('pointwise', 'forward'): 120.42, ('pointwise', 'input'): 17.84, ('pointwise', 'weight'): 17.18, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 0.0,
        "per_gradient_element": 50.58, "per_elementwise": 55.75,
        "per_update_element": 107.89,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an386, portable kernels, commit d637b63"},
    ('Cortex-M7', 'optimized'): {
        "per_mac": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 5.323, ('depthwise', 'weight'): 10.608, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 1.687, ('pointwise', 'input'): 2.691, ('pointwise', 'weight'): 2.235, ('regular', 'forward'): 11.314, ('regular', 'weight'): 13.715},
        "per_written": {('depthwise', 'forward'): 104.57, ('depthwise', 'input'): 52.02, ('depthwise', 'weight'): 198.93, ('fc', 'forward'): 0.0, ('fc', 'input'): 256.44, ('fc', 'weight'): 32.66, ('pointwise', 'forward'): 54.12, ('pointwise', 'input'): 19.78, ('pointwise', 'weight'): 25.76, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 647.4,
        "per_gradient_element": 47.41, "per_elementwise": 57.22,
        "per_update_element": 103.23,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an500, dsp kernels, commit d637b63"},
    ('Cortex-M7', 'reference'): {
        "per_mac": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 4.9, ('depthwise', 'weight'): 11.651, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 1.788, ('pointwise', 'input'): 6.879, ('pointwise', 'weight'): 3.898, ('regular', 'forward'): 12.326, ('regular', 'weight'): 14.174},
        "per_written": {('depthwise', 'forward'): 200.08, ('depthwise', 'input'): 122.85, ('depthwise', 'weight'): 161.43, ('fc', 'forward'): 374.08, ('fc', 'input'): 299.41, ('fc', 'weight'): 29.47, ('pointwise', 'forward'): 125.16, ('pointwise', 'input'): 17.41, ('pointwise', 'weight'): 19.7, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 0.0,
        "per_gradient_element": 49.29, "per_elementwise": 57.22,
        "per_update_element": 103.23,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an500, portable kernels, commit d637b63"},
}
