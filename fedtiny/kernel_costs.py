"""Measured cycles of fedtiny's C kernels per op kind (written by `make firmware-calibrate`: do not edit).

Each entry is fitted (fedtiny.budget.step_time.fit_costs) on one QEMU run of a measurement build
(`make firmware-profile`): instructions per MAC of each (kind, part) and per element each part
writes, per output-gradient element, per elementwise element and per weight element updated, read
as cycles at CPI 1; fedtiny.devices.with_kernels turns an entry into a KernelCosts. Derivation and
checks: docs/results/device-time.md.
"""

MEASURED = {
    ('Cortex-M4', 'optimized'): {
        "per_mac": {('depthwise', 'forward'): 10.166, ('depthwise', 'input'): 6.422, ('depthwise', 'weight'): 19.607, ('fc', 'forward'): 6.86, ('fc', 'input'): 13.778, ('fc', 'weight'): 0.75, ('pointwise', 'forward'): 2.984, ('pointwise', 'input'): 0.324, ('pointwise', 'weight'): 1.946, ('regular', 'forward'): 13.187, ('regular', 'weight'): 13.512},
        "per_written": {'forward': 45.46, 'input': 123.02, 'weight': 29.39},
        "per_gradient_element": 66.89, "per_elementwise": 55.26,
        "per_update_element": 107.88,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an386, dsp kernels, commit d5ac067"},
    ('Cortex-M4', 'reference'): {
        "per_mac": {('depthwise', 'forward'): 17.679, ('depthwise', 'input'): 9.471, ('depthwise', 'weight'): 19.138, ('fc', 'forward'): 10.33, ('fc', 'input'): 18.17, ('fc', 'weight'): 4.658, ('pointwise', 'forward'): 7.341, ('pointwise', 'input'): 4.594, ('pointwise', 'weight'): 3.658, ('regular', 'forward'): 17.997, ('regular', 'weight'): 14.081},
        "per_written": {'forward': 40.52, 'input': 116.67, 'weight': 22.28},
        "per_gradient_element": 68.77, "per_elementwise": 55.26,
        "per_update_element": 107.89,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an386, portable kernels, commit d5ac067"},
    ('Cortex-M7', 'optimized'): {
        "per_mac": {('depthwise', 'forward'): 10.4, ('depthwise', 'input'): 7.917, ('depthwise', 'weight'): 18.977, ('fc', 'forward'): 6.88, ('fc', 'input'): 12.015, ('fc', 'weight'): 1.092, ('pointwise', 'forward'): 2.984, ('pointwise', 'input'): 0.028, ('pointwise', 'weight'): 1.962, ('regular', 'forward'): 12.979, ('regular', 'weight'): 13.212},
        "per_written": {'forward': 44.71, 'input': 135.59, 'weight': 31.57},
        "per_gradient_element": 66.89, "per_elementwise": 56.73,
        "per_update_element": 103.23,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an500, dsp kernels, commit d5ac067"},
    ('Cortex-M7', 'reference'): {
        "per_mac": {('depthwise', 'forward'): 17.907, ('depthwise', 'input'): 11.004, ('depthwise', 'weight'): 18.504, ('fc', 'forward'): 10.339, ('fc', 'input'): 16.95, ('fc', 'weight'): 5.01, ('pointwise', 'forward'): 7.341, ('pointwise', 'input'): 4.308, ('pointwise', 'weight'): 3.674, ('regular', 'forward'): 17.778, ('regular', 'weight'): 13.781},
        "per_written": {'forward': 40.14, 'input': 129.22, 'weight': 24.45},
        "per_gradient_element": 68.77, "per_elementwise": 56.73,
        "per_update_element": 103.23,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an500, portable kernels, commit d5ac067"},
}
