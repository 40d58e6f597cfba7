"""Measured cycles of fedtiny's C kernels per op kind (written by `make firmware-calibrate`: do not edit).

Each entry is fitted (fedtiny.budget.step_time.fit_costs) on one QEMU run of a measurement build
(`make firmware-profile`): instructions per MAC of each (kind, part) and per element each part
writes, per output-gradient element, per elementwise element and per weight element updated, read
as cycles at CPI 1; fedtiny.devices.with_kernels turns an entry into a KernelCosts. Derivation and
checks: docs/results/device-time.md.
"""

MEASURED = {
    ('Cortex-M4', 'optimized'): {
        "per_mac": {('depthwise', 'forward'): 10.166, ('depthwise', 'input'): 6.261, ('depthwise', 'weight'): 19.607, ('fc', 'forward'): 6.859, ('fc', 'input'): 13.961, ('fc', 'weight'): 0.728, ('pointwise', 'forward'): 2.984, ('pointwise', 'input'): 0.276, ('pointwise', 'weight'): 1.945, ('regular', 'forward'): 13.187, ('regular', 'weight'): 13.511},
        "per_written": {'forward': 45.45, 'input': 125.63, 'weight': 29.4},
        "per_gradient_element": 48.63, "per_elementwise": 55.26,
        "per_update_element": 107.89,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an386, dsp kernels, commit e85ce07"},
    ('Cortex-M4', 'reference'): {
        "per_mac": {('depthwise', 'forward'): 17.679, ('depthwise', 'input'): 9.311, ('depthwise', 'weight'): 19.138, ('fc', 'forward'): 10.331, ('fc', 'input'): 18.35, ('fc', 'weight'): 4.656, ('pointwise', 'forward'): 7.341, ('pointwise', 'input'): 4.546, ('pointwise', 'weight'): 3.658, ('regular', 'forward'): 17.997, ('regular', 'weight'): 14.081},
        "per_written": {'forward': 40.52, 'input': 119.28, 'weight': 22.28},
        "per_gradient_element": 50.51, "per_elementwise": 55.26,
        "per_update_element": 107.89,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an386, portable kernels, commit e85ce07"},
    ('Cortex-M7', 'optimized'): {
        "per_mac": {('depthwise', 'forward'): 10.4, ('depthwise', 'input'): 8.177, ('depthwise', 'weight'): 18.976, ('fc', 'forward'): 6.881, ('fc', 'input'): 12.507, ('fc', 'weight'): 1.082, ('pointwise', 'forward'): 2.984, ('pointwise', 'input'): 0.155, ('pointwise', 'weight'): 1.962, ('regular', 'forward'): 12.979, ('regular', 'weight'): 13.211},
        "per_written": {'forward': 44.71, 'input': 130.08, 'weight': 31.58},
        "per_gradient_element": 47.53, "per_elementwise": 56.73,
        "per_update_element": 103.23,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an500, dsp kernels, commit e85ce07"},
    ('Cortex-M7', 'reference'): {
        "per_mac": {('depthwise', 'forward'): 17.907, ('depthwise', 'input'): 11.264, ('depthwise', 'weight'): 18.504, ('fc', 'forward'): 10.343, ('fc', 'input'): 17.445, ('fc', 'weight'): 5.021, ('pointwise', 'forward'): 7.341, ('pointwise', 'input'): 4.435, ('pointwise', 'weight'): 3.674, ('regular', 'forward'): 17.778, ('regular', 'weight'): 13.781},
        "per_written": {'forward': 40.14, 'input': 123.71, 'weight': 24.45},
        "per_gradient_element": 49.41, "per_elementwise": 56.73,
        "per_update_element": 103.23,
        "source": "scenarios/firmware-demo.toml run.clients=2 run.rounds=2 train.scheme=full on an500, portable kernels, commit e85ce07"},
}
