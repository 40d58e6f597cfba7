"""Measured cycles of fedtiny's C kernels per op kind (written by `make firmware-calibrate`: do not edit).

Each entry is fitted (fedtiny.budget.step_time.fit_costs) on one QEMU run of a measurement build
(`make firmware-profile`): instructions per MAC of each (kind, part) and per element it writes, per
output plane, per output-gradient element, per elementwise element and per weight element updated, read
as cycles at CPI 1; fedtiny.devices.with_kernels turns an entry into a KernelCosts. Derivation and
checks: docs/results/device-time.md.
"""

MEASURED = {
    ('Cortex-M4', 'optimized'): {
        "per_mac": {('depthwise', 'forward'): 5.7, ('depthwise', 'input'): 3.667, ('depthwise', 'weight'): 10.755, ('fc', 'forward'): 0.0, ('fc', 'input'): 25.201, ('fc', 'weight'): 28.446, ('pointwise', 'forward'): 1.857, ('pointwise', 'input'): 1.714, ('pointwise', 'weight'): 2.111, ('regular', 'forward'): 4.304, ('regular', 'weight'): 13.986},
        "per_written": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 11.66, ('depthwise', 'weight'): 206.81, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 24.8, ('pointwise', 'input'): 22.54, ('pointwise', 'weight'): 23.01, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 620.6,
        "per_gradient_element": 46.78, "per_elementwise": 26.3,
        "per_update_element": 53.31,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an386, dsp kernels, commit 4c12711"},
    ('Cortex-M4', 'reference'): {
        "per_mac": {('depthwise', 'forward'): 16.543, ('depthwise', 'input'): 7.681, ('depthwise', 'weight'): 11.797, ('fc', 'forward'): 13.005, ('fc', 'input'): 30.253, ('fc', 'weight'): 33.996, ('pointwise', 'forward'): 1.745, ('pointwise', 'input'): 6.88, ('pointwise', 'weight'): 5.399, ('regular', 'forward'): 13.156, ('regular', 'weight'): 14.444},
        "per_written": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 11.25, ('depthwise', 'weight'): 169.47, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 127.68, ('pointwise', 'input'): 17.61, ('pointwise', 'weight'): 22.7, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 0.0,
        "per_gradient_element": 48.66, "per_elementwise": 34.14,
        "per_update_element": 53.31,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an386, portable kernels, commit 4c12711"},
    ('Cortex-M7', 'optimized'): {
        "per_mac": {('depthwise', 'forward'): 5.606, ('depthwise', 'input'): 3.415, ('depthwise', 'weight'): 10.606, ('fc', 'forward'): 0.0, ('fc', 'input'): 24.259, ('fc', 'weight'): 27.72, ('pointwise', 'forward'): 2.001, ('pointwise', 'input'): 1.714, ('pointwise', 'weight'): 2.362, ('regular', 'forward'): 4.348, ('regular', 'weight'): 13.687},
        "per_written": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 11.93, ('depthwise', 'weight'): 197.3, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 22.22, ('pointwise', 'input'): 22.78, ('pointwise', 'weight'): 24.02, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 617.6,
        "per_gradient_element": 46.66, "per_elementwise": 26.34,
        "per_update_element": 49.07,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an500, dsp kernels, commit 4c12711"},
    ('Cortex-M7', 'reference'): {
        "per_mac": {('depthwise', 'forward'): 16.349, ('depthwise', 'input'): 7.635, ('depthwise', 'weight'): 11.648, ('fc', 'forward'): 12.993, ('fc', 'input'): 30.314, ('fc', 'weight'): 34.286, ('pointwise', 'forward'): 1.681, ('pointwise', 'input'): 7.005, ('pointwise', 'weight'): 5.4, ('regular', 'forward'): 13.09, ('regular', 'weight'): 14.147},
        "per_written": {('depthwise', 'forward'): 0.0, ('depthwise', 'input'): 11.31, ('depthwise', 'weight'): 160.0, ('fc', 'forward'): 0.0, ('fc', 'input'): 0.0, ('fc', 'weight'): 0.0, ('pointwise', 'forward'): 129.17, ('pointwise', 'input'): 17.98, ('pointwise', 'weight'): 22.95, ('regular', 'forward'): 0.0, ('regular', 'weight'): 0.0},
        "per_channel": 0.0,
        "per_gradient_element": 48.55, "per_elementwise": 33.68,
        "per_update_element": 49.07,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an500, portable kernels, commit 4c12711"},
}
