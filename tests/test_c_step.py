"""The C step of device/c (fedtiny_step.c) against the simulator's exact step: the same bytes, op by op."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import ROOT, build_c_library

from fedtiny.int8 import cstep, exact
from fedtiny.int8.optim import QuantizedOptimizer

MLPERF = ROOT.parent / "shared" / "models" / "mlperf-tiny"


@pytest.fixture(scope="module")
def built():
    build_c_library("libfedtiny_step.so")
    cstep._lib.cache_clear()
    assert cstep.available()


def _compare(
    q,
    xs,
    ys,
    *,
    steps=3,
    lr=0.02,
    momentum=0.0,
    optimizer="sgd+qas",
    rounding="stochastic",
    seed=5,
    planned=True,
    reached=None,
    arena_slack=1.05,
):
    """Train a copy with the C step and the model with PyTorch's exact step; count differing elements.

    ``planned``: the C step follows the memory planner's decisions and arena layout, and its arena is
    checked against the planner's count of the same step (laid out within ``arena_slack`` of it).
    ``reached``, a set, collects the parameters whose gradient is not 0 in the first step.
    """
    from fedtiny.budget.arena import lay_out
    from fedtiny.budget.memory import c_layout
    from fedtiny.federated.train import _exact_loss

    qc = copy.deepcopy(q)
    shape = tuple(xs[0].shape[1:])
    cs = cstep.CStep(
        qc,
        lr=lr,
        momentum=momentum,
        optimizer=optimizer,
        rounding=rounding,
        layout=c_layout(q, shape) if planned else None,
    )
    if planned:
        batch = len(ys[0])
        plan = lay_out(cs.record(batch))
        cs.use_plan(plan.offsets, batch, plan.arena_bytes)
        _check_arena_against_planner(q, plan, shape, batch, arena_slack)
    opt = QuantizedOptimizer(q, optimizer, lr, momentum, rounding)
    q.number_convs()
    loss_fn = _exact_loss(q)
    forward = params = 0
    for k in range(steps):
        xb, yb = xs[k], ys[k]
        with torch.no_grad():
            xq = q.quantize_input(xb).numpy().astype(np.int8)
            forward += int((cs.forward(xq) != q.int8_logits(xb).numpy().astype(np.int8)).sum())
        opt.zero_grad()
        with exact.step(exact.StepKey(seed, k)):
            loss = loss_fn(q(xb), yb)
            loss.backward()
            if reached is not None and k == 0:
                reached |= {n for n, p in q.named_parameters() if p.grad is not None and p.grad.any()}
            opt.step()
        losses = cs.step(xq, yb.numpy(), seed, k)
        assert abs(sum(losses) / len(losses) - float(loss.detach())) < 1e-6
        cs.write_back()
        params += sum(int((a.detach() != b.detach()).sum()) for a, b in zip(q.parameters(), qc.parameters()))
    if planned:
        assert cs.high_water == plan.arena_bytes  # the step stayed inside its planned arena
    return forward, params, cs


def _check_arena_against_planner(q, arena_plan, shape, batch, slack_ratio=1.05):
    """The C step's buffers, as recorded, against the memory planner's count of the same step (the model's
    scheme as its requires_grad and train_channels stand): the same peak of live bytes (up to alignment),
    and a layout within ``slack_ratio`` of the planner's peak (the layout search's, not extra buffers)."""
    from fedtiny.budget.memory import plan

    ledger, _ = plan(q, shape, accumulate=batch > 1)
    planner_arena = ledger.peak_without("persistent:", "act:input")
    # equal but for the C step's 8-byte alignment of each buffer
    slack = 7 * len(arena_plan.offsets)
    assert planner_arena <= arena_plan.peak_live_bytes <= planner_arena + slack, (arena_plan, planner_arena)
    assert arena_plan.arena_bytes <= slack_ratio * planner_arena


def _digits_batches(n_batches, size=16, image_size=None, channels=1):
    from fedtiny.data import load_source

    data = load_source("digits", **({"image_size": image_size, "channels": channels} if image_size else {}))
    return (
        [torch.from_numpy(data.x[i * size : (i + 1) * size]) for i in range(n_batches)],
        [torch.from_numpy(data.y[i * size : (i + 1) * size]) for i in range(n_batches)],
    )


def test_tiny_ir_every_tensor_trained_with_momentum(built):
    from test_int8 import small_qmodel

    q = small_qmodel()
    q.input_shape = (1, 8, 8)
    before = [p.detach().clone() for p in q.parameters()]
    forward, params, cs = _compare(q, *_digits_batches(3), momentum=0.9)
    assert forward == 0 and params == 0
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, q.parameters()))  # it did train
    assert cs.high_water > 0 and cs.high_water <= cs.arena_bytes(16)


@pytest.mark.parametrize("scheme", ["scenarios/schemes/tiny-ir-sparse.json", "bias-only"])
def test_tiny_ir_sparse_schemes_nearest_rounding_plain_sgd(built, scheme):
    from test_int8 import small_qmodel

    from fedtiny.budget.schemes import apply_scheme, parse_scheme, resolve

    q = small_qmodel()
    q.input_shape = (1, 8, 8)
    apply_scheme(q, resolve(parse_scheme(str(ROOT / scheme) if scheme.endswith(".json") else scheme), q))
    forward, params, _ = _compare(q, *_digits_batches(2), steps=2, optimizer="sgd", lr=5.0, rounding="nearest")
    assert forward == 0 and params == 0


def test_residual_adds_and_strided_shortcuts(built):
    """A traced ResNet: ADDs with ReLU, a stride-2 1x1 shortcut, an FC head; every tensor trained."""
    from test_trace import SmallResNet, _randomize_bn

    from fedtiny.int8.graph import replace_head
    from fedtiny.int8.trace import calibrate, quantize, trace

    torch.manual_seed(0)
    xs, ys = _digits_batches(2, size=8, image_size=16, channels=3)
    graph = trace(_randomize_bn(SmallResNet()), xs[0])
    q = replace_head(quantize(graph, calibrate(graph, [xs[0]])), 10)
    q.input_shape = (3, 16, 16)
    forward, params, _ = _compare(q, xs, ys, steps=2, momentum=0.5)
    assert forward == 0 and params == 0


@pytest.mark.skipif(not (MLPERF / "vww_96_int8.tflite").is_file(), reason="../shared/models/mlperf-tiny absent")
def test_mlperf_vww_last_layers(built):
    from fedtiny.budget.schemes import apply_scheme, parse_scheme, resolve
    from fedtiny.int8.graph import replace_head
    from fedtiny.int8.modelfile import read_model

    q = replace_head(read_model(MLPERF / "vww_96_int8.tflite"), 10)
    apply_scheme(q, resolve(parse_scheme("last-k:4"), q))
    forward, params, _ = _compare(q, *_digits_batches(1, size=4, image_size=96, channels=3), steps=1, lr=1e-3)
    assert forward == 0 and params == 0


def test_bad_batches_are_refused(built):
    from test_int8 import small_qmodel

    q = small_qmodel()
    q.input_shape = (1, 8, 8)
    cs = cstep.CStep(q, lr=0.01)
    x = np.zeros((2, 1, 8, 8), np.int8)
    with pytest.raises(RuntimeError, match="ft_train_step failed"):
        cs.step(x, np.array([0, 10]), 0, 0)  # label outside the 10 classes
    with pytest.raises(ValueError, match="batch"):
        cs.step(np.zeros((65, 1, 8, 8), np.int8), np.zeros(65), 0, 0)


def test_device_check_cli(built, cli):
    r = cli(
        "device",
        "check",
        "--model",
        "tiny-ir",
        "--scheme",
        "scenarios/schemes/tiny-ir-sparse.json",
        "--device",
        "nrf52832",
        "--steps",
        "2",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["forward_mismatches"] == 0 and out["param_mismatches"] == 0
    assert out["arena_peak_bytes"] > 0 and out["planner_peak_bytes"] > out["planner_arena_bytes"] > 0
    assert out["arena_vs_planner"] <= 1.05  # the C step's arena, as the planner laid it out, against its count
    r = cli("device", "check", "--model", "tiny-ir", "--device", "no-such-board")
    assert r.returncode != 0 and "no-such-board" in r.stderr


def test_arena_plan_is_a_valid_layout_and_one_sample_steps_apply_at_once(built):
    """No two buffers alive at the same time share a byte; batch 1 (no accumulators) and batch 4 both match
    the planner and PyTorch."""
    from test_int8 import small_qmodel

    from fedtiny.budget.arena import buffers_from_log, lay_out
    from fedtiny.budget.memory import c_layout

    q = small_qmodel()
    q.input_shape = (1, 8, 8)
    for size in (1, 4):
        forward, params, _ = _compare(copy.deepcopy(q), *_digits_batches(2, size=size), steps=2, momentum=0.9)
        assert forward == 0 and params == 0
    cs = cstep.CStep(copy.deepcopy(q), lr=0.01, layout=c_layout(q, (1, 8, 8)))
    log = cs.record(4)
    arena_plan = lay_out(log)
    blocks = buffers_from_log(log)
    where = {k: arena_plan.offsets[b.takes[0]] for k, b in enumerate(blocks)}
    assert all(arena_plan.offsets[t] == where[k] for k, b in enumerate(blocks) for t in b.takes)
    for i, a in enumerate(blocks):  # a block shrunk in place (an in-place op's smaller output) frees its tail
        for j in range(i + 1, len(blocks)):
            b = blocks[j]
            for s0, e0, size0 in a.segments:
                for s1, e1, size1 in b.segments:
                    if s0 < e1 and s1 < e0:  # alive together: their bytes apart
                        assert where[i] + size0 <= where[j] or where[j] + size1 <= where[i], (i, j)
    assert lay_out(log) == arena_plan  # deterministic


def test_requantization_is_tflm_double_rounding(built):
    """The step's requantization (one rounding where TFLM takes two) against TFLM's two, on random
    accumulators and on the ties of the second rounding, for every shift."""
    import ctypes

    from fedtiny.int8.kernels import multiply_by_quantized_multiplier

    lib = cstep._lib()
    lib.ft_requantize.restype = ctypes.c_int32
    lib.ft_requantize.argtypes = [ctypes.c_int32, ctypes.c_int32, ctypes.c_int32]
    rng = np.random.default_rng(0)
    cases = []
    for shift in range(-31, 31):
        for mult in (0, 1 << 30, (1 << 30) + 1, int(rng.integers(1 << 30, 1 << 31)), (1 << 31) - 1):
            left = max(shift, 0)
            lim = (1 << (31 - left)) - 1 if left else (1 << 31) - 1
            accs = list(rng.integers(-lim - 1, lim + 1, 40)) + [0, 1, -1, lim, -lim - 1]
            e = max(-shift, 0)
            if e and mult:  # accumulators whose h = round(acc mult / 2^31) sits on a tie of h / 2^e
                for h in (1 << (e - 1), -(1 << (e - 1)), 3 << (e - 1), -(3 << (e - 1))):
                    acc = (h << 31) // mult
                    accs += [a for a in (acc - 1, acc, acc + 1) if -lim - 1 <= a <= lim]
            cases += [(int(a), mult, shift) for a in accs]
    acc, mult, shift = (torch.tensor(c, dtype=torch.int64) for c in zip(*cases))
    want = multiply_by_quantized_multiplier(acc, mult, shift).tolist()
    got = [lib.ft_requantize(a, m, s) for a, m, s in cases]
    differ = [(c, w, g) for c, w, g in zip(cases, want, got) if w != g]
    assert len(cases) > 15_000 and differ == [], differ[:5]


def test_op_kinds_are_named_once_in_python():
    """device/c/fedtiny_op_kinds.h is what ``make op-kinds`` writes from CKind, and fedtiny_step.h includes it."""
    from fedtiny.int8.ops.base import c_op_kinds_header

    header = ROOT / "device" / "c" / "fedtiny_op_kinds.h"
    assert header.read_text() == c_op_kinds_header(), "run make op-kinds"
    assert '#include "fedtiny_op_kinds.h"' in (ROOT / "device" / "c" / "fedtiny_step.h").read_text()
    assert "FT_OP_SLICE = 8" in header.read_text() and "enum ft_op_kind {" in header.read_text()
