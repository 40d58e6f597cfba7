"""Device time by op kind (fedtiny.budget.step_time): the simulator's count of a step's work equals the C step's,
the fit recovers costs it was given, and device.kernels picks measured costs where they exist."""

import pytest
from conftest import ROOT, build_c_library

from fedtiny.budget.step_time import OpWork, StepWork, c_op_work, fit_costs
from fedtiny.devices import PROFILES, compute_cycles, with_kernels
from fedtiny.errors import ScenarioError


@pytest.mark.parametrize("scheme", ["full", "scenarios/schemes/tiny-ir-sparse.json", "bias-only"])
def test_planner_and_c_step_count_the_same_work(scheme):
    from test_int8 import small_qmodel

    from fedtiny.budget.memory import c_layout, schedule, step_work
    from fedtiny.budget.schemes import apply_scheme, parse_scheme, resolve
    from fedtiny.int8 import cstep

    build_c_library("libfedtiny_step.so")
    cstep._lib.cache_clear()
    q = small_qmodel()
    q.input_shape = (1, 8, 8)
    apply_scheme(q, resolve(parse_scheme(str(ROOT / scheme) if scheme.endswith(".json") else scheme), q))
    planner = step_work(schedule(q, (1, 8, 8), 1))
    c = StepWork.of(c_op_work(cstep.CStep(q, lr=0.01, layout=c_layout(q, (1, 8, 8))).op_geometry()))
    assert planner.macs == c.macs and planner.written == c.written and planner.channels == c.channels
    assert (planner.gradient_elements, planner.updated) == (c.gradient_elements, c.updated)
    assert planner.macs[("pointwise", "forward")] > 0
    if scheme == "bias-only":  # only the classifier's weights train
        assert {k for (k, p) in planner.macs if p == "weight"} <= {"fc"}


def test_fit_recovers_the_costs_it_was_given():
    """Ops of two kinds and several sizes whose cycles are made from known costs: the fit returns them."""
    truth = {("pointwise", "forward"): 2.5, ("depthwise", "forward"): 4.0}
    written = {("pointwise", "forward"): 30.0, ("depthwise", "forward"): 20.0}
    per_plane, quantize, update, batch = 300.0, 60.0, 100.0, 4
    measured = []
    for kind, macs, outputs, planes in [
        ("pointwise", 4096, 256, 16),
        ("pointwise", 9216, 128, 32),
        ("pointwise", 1024, 64, 4),
        ("pointwise", 8192, 1024, 16),
        ("depthwise", 2304, 256, 16),
        ("depthwise", 1600, 64, 64),
        ("depthwise", 4900, 100, 4),
    ]:
        work = OpWork(kind, kind, {"forward": macs}, outputs, 0, 10, {"forward": outputs}, planes)
        cycles = {
            "forward": batch
            * (truth[(kind, "forward")] * macs + written[(kind, "forward")] * outputs + per_plane * planes),
            "quantize": batch * quantize * outputs,
            "update": update * 10,
        }
        measured.append((work, cycles))
    costs = fit_costs(measured, batch, "synthetic")
    assert dict(costs.per_mac) == pytest.approx(truth, rel=1e-6)
    assert dict(costs.per_written) == pytest.approx(written, rel=1e-6)
    assert costs.per_channel == pytest.approx(per_plane)
    assert (costs.per_gradient_element, costs.per_update_element) == (quantize, update)
    step = StepWork.of(w for w, _ in measured)
    profile = PROFILES["nrf52840"].__class__(**{**PROFILES["nrf52840"].to_dict(), "kernel_costs": costs})
    assert compute_cycles(profile, step, batch, 1) == pytest.approx(sum(sum(c.values()) for _, c in measured))
    # the step's work outside any op is charged per gradient element, with the quantization
    outside = batch * 7.0 * step.gradient_elements
    assert fit_costs(measured, batch, "synthetic", outside).per_gradient_element == pytest.approx(quantize + 7.0)


def test_kernels_choose_measured_costs_on_cortex_m_and_published_figures_elsewhere():
    from test_int8 import small_qmodel

    from fedtiny.budget.memory import schedule, step_work
    from fedtiny.budget.schemes import apply_scheme, parse_scheme, resolve

    q = small_qmodel()  # a whole step's work (the fits' terms trade off on a few ops: one op alone can rank either way)
    apply_scheme(q, resolve(parse_scheme("full"), q))
    work = step_work(schedule(q, (1, 8, 8), 1))
    nrf = PROFILES["nrf52840"]
    optimized, reference = with_kernels(nrf, "optimized"), with_kernels(nrf, "reference")
    assert optimized.kernel_costs is not None and "dsp" in optimized.kernel_costs.source
    assert "portable" in reference.kernel_costs.source
    assert compute_cycles(reference, work) > 1.2 * compute_cycles(optimized, work) > 0  # measured: 1.42x
    esp = PROFILES["esp32-s3"]  # no measurement: the published cycles per MAC
    forward = sum(m for (_, part), m in work.macs.items() if part == "forward")
    backward = sum(m for (_, part), m in work.macs.items() if part != "forward")
    assert compute_cycles(with_kernels(esp, "optimized"), work) == pytest.approx(
        esp.cycles_per_mac * (forward + 2 * backward)
    )
    with pytest.raises(ScenarioError, match="reference"):
        with_kernels(esp, "reference")
