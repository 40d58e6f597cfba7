"""The C step's op kinds beyond convolutions, ADD and the global average pool (MAX_POOL_2D, MEAN, MUL,
CONCATENATION, the lookups LOGISTIC / HARD_SWISH / QUANTIZE, STRIDED_SLICE) against the simulator's exact
step: the same int8 logits, the same parameters after every step, and an arena holding the buffers the
memory planner counts."""

import copy

import numpy as np
import pytest
import torch
from conftest import ROOT, build_c_library
from test_c_step import _compare

from fedtiny.errors import ModelFileError
from fedtiny.int8 import cstep, exact


@pytest.fixture(scope="module")
def built():
    build_c_library("libfedtiny_step.so")
    cstep._lib.cache_clear()
    assert cstep.available()


@pytest.fixture(scope="module")
def digits():
    from fedtiny.data import load_source

    return load_source("digits")


@pytest.fixture(scope="module")
def se(digits):
    """scenarios/models se_net (max pool, a two-branch concat, a squeeze-and-excitation gate: pool, 1x1
    convolutions, sigmoid, MUL; hardswish) quantized on digits."""
    import sys

    from fedtiny.int8.convert import ptq

    sys.path.insert(0, str(ROOT / "scenarios" / "models"))
    from torchvision_nets import se_net

    torch.manual_seed(0)
    return ptq(se_net(1, 10), digits.x[:64])


def _named(module, tag):
    module.tag = tag
    return module


def _spliced(se):
    """se_net with every variant the C step takes: an overlapping, padded 3x3 max pool at stride 1 whose
    activation clamps (RELU_N1_TO_1), a slice of every other row and six of eight columns (an input of the
    pool then gets up to six outputs' gradients, added tap by tap; the planes after it hold 24 elements, not
    a power of two), slices of even and odd channels joined with a whole tensor by a three-input concat, a
    MEAN with its own output quantization as the squeeze, the gate MUL with its broadcast operand first, a
    requantize, and a MUL of two whole tensors."""
    from fedtiny.int8.graph import QModel
    from fedtiny.int8.ops.concat import QConcat
    from fedtiny.int8.ops.lookup import QRequantize
    from fedtiny.int8.ops.maxpool import QMaxPool
    from fedtiny.int8.ops.mean import QMean
    from fedtiny.int8.ops.mul import QMul
    from fedtiny.int8.ops.slice import QSlice

    q = copy.deepcopy(se)
    op = q.op
    s0, z0 = op("conv0").y_scale, op("conv0").y_zero
    sc, zc = op("cat0").q(0)
    sg, zg = op("sigmoid0").q(1)
    sh, zh = op("hardswish0").q(1)
    sm, zm = sc * 0.8, zc + 3  # the mean's output
    sr, zr = sh * 1.25, zh - 4  # the requantize's
    sy, zy = sh * sr * 48, -10  # the product's
    sg_y, zg_y = op("mul0").q(2)[0] * 0.6, op("mul0").q(2)[1]  # the gate's product: its largest values clamp
    for conv, (s, z) in (("conv3", (sm, zm)), ("conv5", (sg_y, zg_y)), ("classifier", (sy, zy))):
        op(conv).qparams[0], op(conv).qparams[1] = s, z  # they read the new quantizations
    ops = [
        (op("conv0"), ["input"]),
        (_named(QMaxPool((3, 3), 1, (1, 1, 1, 1), s0, z0, "RELU_N1_TO_1"), "maxpool0"), ["conv0"]),
        (_named(QSlice([(0, 16, 1), (0, 8, 2), (1, 7, 1)]), "slice0"), ["maxpool0"]),
        (op("conv1"), ["slice0"]),
        (op("conv2"), ["slice0"]),
        (_named(QSlice([(0, 16, 2), (0, 4, 1), (0, 6, 1)]), "even"), ["conv1"]),
        (_named(QSlice([(1, 16, 2), (0, 4, 1), (0, 6, 1)]), "odd"), ["conv1"]),
        (_named(QConcat(1, sc, zc), "cat0"), ["even", "conv2", "odd"]),
        (_named(QMean(sc, zc, sm, zm), "mean0"), ["cat0"]),
        (op("conv3"), ["mean0"]),
        (op("conv4"), ["conv3"]),
        (op("sigmoid0"), ["conv4"]),
        (_named(QMul(sg, zg, sc, zc, sg_y, zg_y), "mul0"), ["sigmoid0", "cat0"]),
        (op("conv5"), ["mul0"]),
        (op("hardswish0"), ["conv5"]),
        (_named(QRequantize(sh, zh, sr, zr), "requant0"), ["hardswish0"]),
        (_named(QMul(sh, zh, sr, zr, sy, zy), "mul1"), ["hardswish0", "requant0"]),
        (op("pool1"), ["mul1"]),
        (op("classifier"), ["pool1"]),
    ]
    return QModel(ops, *[float(v) for v in q.input_params], input_shape=q.input_shape)


def _train_both(q, scheme, batch, digits, *, steps=3):
    """Train a copy of ``q`` under ``scheme`` with the C step (the planner's layout and arena plan) and with
    PyTorch's exact step (test_c_step's comparison), ``steps`` steps of ``batch`` digits: differing logits and
    parameter elements, the parameters a gradient reached and the C op kinds. The arena is checked within 6%
    of the planner's count: se_net trained in full at batch 1 is laid out at 1.054 by the layout's search."""
    from fedtiny.budget.schemes import apply_scheme, parse_scheme, resolve

    q = copy.deepcopy(q)
    apply_scheme(q, resolve(parse_scheme(scheme), q))
    at = [slice(200 + k * batch, 200 + (k + 1) * batch) for k in range(steps)]
    xs = [torch.from_numpy(digits.x[s]) for s in at]
    ys = [torch.from_numpy(digits.y[s]) for s in at]
    reached: set[str] = set()
    forward, params, cs = _compare(q, xs, ys, steps=steps, reached=reached, arena_slack=1.06)
    return {"forward": forward, "params": params, "reached": reached, "kinds": [g["kind"] for g in cs.op_geometry()]}


# scheme, batch: "full" sends gradients through every op; last-k:3 trains conv3..conv5 and the head, so that
# the gradient crosses hardswish, the gate MUL (to its gate) and the sigmoid to reach the SE convolutions
@pytest.mark.parametrize("scheme,batch", [("full", 1), ("full", 2), ("last-k:3", 1), ("last-k:3", 2)])
def test_se_net_trains_bit_for_bit_in_the_c_step(built, se, digits, scheme, batch):
    r = _train_both(se, scheme, batch, digits)
    assert {"maxpool", "concat", "pool", "lookup", "mul"} <= set(r["kinds"])
    assert (r["forward"], r["params"]) == (0, 0), r
    assert ("conv0.weight" if scheme == "full" else "conv3.weight") in r["reached"]  # across the new ops


# last-k:5 trains conv1 on: the gradient crosses the channel slices and the three-input concat, the mean, both
# MULs, the requantize and the lookups; "full" also the slice of rows and columns and the overlapping max pool
@pytest.mark.parametrize("scheme,batch", [("full", 1), ("full", 2), ("last-k:5", 1), ("last-k:5", 2)])
def test_every_variant_of_the_new_kinds_trains_bit_for_bit(built, se, digits, scheme, batch):
    q = _spliced(se)
    r = _train_both(q, scheme, batch, digits)
    assert {"maxpool", "slice", "concat", "mean", "lookup", "mul"} <= set(r["kinds"])
    assert (r["forward"], r["params"]) == (0, 0), r
    assert ("conv0.weight" if scheme == "full" else "conv1.weight") in r["reached"]


@pytest.fixture
def check_build(monkeypatch):
    """The C step's op-check build (FT_CHECK_OPS: a line "FTCHECK op what bytes hash" on standard error for
    every tensor a training step produces) in place of the step's library, for one test."""
    build_c_library("libfedtiny_step_check.so")
    monkeypatch.setenv("FEDTINY_STEP_LIB", str(ROOT / "device" / "c" / "libfedtiny_step_check.so"))
    cstep._lib.cache_clear()
    assert cstep.available()
    yield
    cstep._lib.cache_clear()  # the next step loads the library the environment names again


def _fnv1a(data: bytes) -> int:
    """check_host.c's hash of a tensor's bytes."""
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


@pytest.mark.parametrize("batch", [1, 2])
def test_every_tensor_of_a_step_equals_the_simulators(check_build, capfd, se, digits, batch):
    """Tensor by tensor, not only through the parameters (where a float rounding rarely moves a stochastic
    rounding): every op's int8 output, and every activation gradient once complete (the input gradient the
    op-check build shows after the tensor's earliest reader, when it reads the tensor first), against
    PyTorch's exact step, bit for bit (an untouched element is +0 in C and may be -0 in PyTorch)."""
    from fedtiny.budget.schemes import apply_scheme, parse_scheme, resolve
    from fedtiny.federated.train import _exact_loss
    from fedtiny.int8.optim import QuantizedOptimizer

    q = _spliced(se)
    apply_scheme(q, resolve(parse_scheme("full"), q))
    qc = copy.deepcopy(q)
    cs = cstep.CStep(qc, lr=0.02)
    opt = QuantizedOptimizer(q, "sgd+qas", 0.02, 0.0)
    q.number_convs()
    loss_fn = _exact_loss(q)
    geometry = cs.op_geometry()
    names = ["input"] + cs.names  # tensor id -> name
    first: dict[int, tuple[int, int]] = {}  # tensor -> (its earliest reader, the input it is there)
    for i, g in enumerate(geometry):
        for k, t in enumerate(g["inputs"]):
            first.setdefault(t, (i, k))
    # the earliest reader adds to a tensor's gradient last: op -> the tensor whose gradient its input-gradient
    # line shows complete (the op's first input)
    complete = {i: t for t, (i, k) in first.items() if k == 0 and t > 0}
    # (the MULs complete none: their inputs have earlier readers, whose complete gradients hold theirs)
    assert {geometry[i]["kind"] for i in complete} >= {"maxpool", "slice", "concat", "mean", "lookup"}
    compared = 0
    for step in range(2):
        at = slice(300 + step * batch, 300 + (step + 1) * batch)
        xb, yb = torch.from_numpy(digits.x[at]), torch.from_numpy(digits.y[at])
        with torch.no_grad():
            xq = q.quantize_input(xb).numpy().astype(np.int8)
        capfd.readouterr()
        cs.step(xq, yb.numpy(), 5, step)
        lines: dict[tuple[int, int], list[int]] = {}
        for line in capfd.readouterr().err.splitlines():
            if line.startswith("FTCHECK "):
                op, what, _, h = (int(v) for v in line.split()[1:])
                lines.setdefault((op, what), []).append(h)
        opt.zero_grad()
        with exact.step(exact.StepKey(5, step)):
            env = q._run(q.quantize_input(xb), q._head)
            for t in env.values():
                if t.requires_grad:
                    t.retain_grad()
            loss_fn(q._logits(env["classifier"]), yb).backward()
            opt.step()
        cs.write_back()
        for i, name in enumerate(cs.names):
            want = [_fnv1a(env[name][n].detach().to(torch.int8).numpy().tobytes()) for n in range(batch)]
            assert lines[(i, 0)] == want, f"step {step}: the output of {name}"
            if i in complete:
                grad = env[names[complete[i]]].grad
                want = [_fnv1a((grad[n] + 0.0).numpy().astype(np.float32).tobytes()) for n in range(batch)]
                assert lines[(i, 3)] == want, f"step {step}: the gradient of {names[complete[i]]} after {name}"
            compared += 1
    assert compared == 2 * len(cs.names)


def test_the_c_op_table_of_the_new_kinds(built, se):
    """The gate MUL's broadcast operand goes second, whichever the graph gave first; a three-input concat
    lists its inputs; the op list's work counts a gradient through a MUL's second input."""
    from fedtiny.budget.schemes import apply_scheme, parse_scheme, resolve
    from fedtiny.budget.step_time import c_op_work

    q = _spliced(se)
    apply_scheme(q, resolve(parse_scheme("last-k:3"), q))
    cs = cstep.CStep(copy.deepcopy(q), lr=0.01)
    ops = {g["name"]: g for g in cs.op_geometry()}
    ids = {name: i + 1 for i, name in enumerate(cs.names)}
    assert (ops["mul0"]["in0"], ops["mul0"]["in1"]) == (ids["cat0"], ids["sigmoid0"])
    assert (ops["mul0"]["c"], ops["mul0"]["h"], ops["mul0"]["w"]) == (32, 4, 6)
    assert ops["cat0"]["inputs"] == [ids["even"], ids["conv2"], ids["odd"]]
    work = {w.name: w for w in c_op_work(cs.op_geometry())}
    assert work["mul0"].elementwise == 2 * 32 * 4 * 6  # forward and the gate's gradient
    assert work["cat0"].elementwise == 32 * 4 * 6  # nothing trained before it: forward only


def test_forms_the_c_step_does_not_run_are_refused(built, se):
    from fedtiny.int8.graph import QModel
    from fedtiny.int8.ops.concat import QConcat
    from fedtiny.int8.ops.lookup import QRequantize

    q = copy.deepcopy(se)
    ops = [(q.op(n.op), ("wide",) if n.op == "hardswish0" else n.inputs) for n in q.nodes]
    k = [m.tag for m, _ in ops].index("hardswish0")
    s, z = q.op("conv5").y_scale, q.op("conv5").y_zero
    with pytest.raises(ModelFileError, match="op 'wide' reads 'conv5' twice"):  # the planner's one buffer per read
        QModel(
            ops[:k] + [(_named(QConcat(1, s, z), "wide"), ("conv5", "conv5"))] + ops[k:],
            *[float(v) for v in q.input_params],
            input_shape=q.input_shape,
        )
    copy_ = _named(QRequantize(s, z, s, z), "copy")
    ops[k:k] = [(copy_, ("conv5",)), (_named(QConcat(3, s, z), "wide"), ("conv5", "copy"))]  # along the width
    with pytest.raises(ModelFileError, match="wide.*along channels"):
        cstep.CStep(QModel(ops, *[float(v) for v in q.input_params], input_shape=q.input_shape), lr=0.01)


def test_device_check_runs_se_net_from_a_tflite_file(built, se, tmp_path):
    """fedtiny device check on the exported .tflite (read back through the model reader): 0 and 0."""
    from fedtiny.int8.tfl_convert import export_tflite
    from fedtiny.tools.device_check import device_check

    path = export_tflite(se, tmp_path / "se.tflite")
    out = device_check(str(path), "full", "mcu-256kb", steps=3, batch=2, lr=0.01)
    assert (out["forward_mismatches"], out["param_mismatches"]) == (0, 0), out
    assert out["arena_vs_planner"] <= 1.06, out


@pytest.mark.parametrize("batch", [1, 2])
def test_standalone_activations_train_bit_for_bit(built, batch):
    """RELU, RELU6, TANH and LEAKY_RELU run in the C step as lookups, like LOGISTIC and HARD_SWISH."""
    from test_ops_activations_tflm import _with_activations

    from fedtiny.data import load_source

    q = _with_activations()
    r = _train_both(q, "full", batch, load_source("digits", image_size=16))
    assert r["kinds"].count("lookup") == 6
    assert (r["forward"], r["params"]) == (0, 0), r
    assert "conv0.weight" in r["reached"]
