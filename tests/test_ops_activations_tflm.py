"""Standalone int8 RELU, RELU6, LEAKY_RELU and TANH against TensorFlow Lite Micro: 0 differing elements.

Each kernel case builds a one-op int8 ``.tflite`` model with fedtiny's writer and runs it in the
``tflite-micro`` interpreter on 32 random 1x4x4x8 inputs plus two holding all 256 int8 values. A small
squeeze-and-excitation net with the four ops spliced in is exported and compared on every tensor, read
back, stored in a model file and trained by the exact step (its gradient crosses each op).
"""

import numpy as np
import pytest
import torch

from fedtiny.errors import ModelFileError
from fedtiny.int8.kernels import quantize_multiplier
from fedtiny.int8.kernels_act import (
    TANH_OUTPUT_SCALE,
    TANH_OUTPUT_ZERO,
    ReluParams,
    leaky_relu_int8,
    leaky_relu_params,
    relu6_int8,
    relu6_params,
    relu_int8,
    relu_params,
    table,
    tanh_int8,
    tanh_params,
)
from fedtiny.int8.oracle import tflm_invoke
from fedtiny.int8.tflite import OpDesc, TensorDesc, TFLiteGraph, check_supported, read_tflite, write_tflite

SHAPE = (1, 4, 4, 8)

# (x_scale, x_zero, y_scale, y_zero): the same quantization; ratios above and below 1; an input already
# clamped at -128; a clamp at y_zero = 127 (every output 127); a ratio whose float32 quotient (2.5) and
# double one (2.49999996) round odd inputs differently (TFLM's is the double); a ratio of 1e5 (a left
# shift of 17: the int32 product wraps, in TFLM as here).
RELU_CASES = [
    (0.05, -10, 0.05, -10),
    (0.05, 0, 0.03, -128),
    (0.1, 20, 0.2, 5),
    (0.02, -128, 0.01, -128),
    (0.5, 100, 0.3, 127),
    (0.25, 0, 0.1, -128),
    (1.0, 0, 1e-5, 3),
]
# six = x_zero + round(6 / x_scale), clamped to int8: inside (110, 100), above 127, below x_zero's
# neighbours (-116), equal to x_zero (scale 20); one output quantized differently (TFLM ignores it).
RELU6_CASES = [
    (0.05, -10, 0.05, -10),
    (0.03, -100, 0.03, -100),
    (0.01, 0, 0.01, 0),
    (0.1, 0, 0.2, 5),
    (0.5, -128, 0.5, -128),
    (20.0, 3, 20.0, 3),
]
# (x_scale, x_zero, y_scale, y_zero, alpha): usual alphas, a negative one (TFLM negates the magnitude's
# product; its multipliers, 0.625 and 1.25 as float32 quotients, sit just above them in double, where ties
# round the other way), 0, above 1, tiny (its multiplier shift is -40: flushed to 0), and a wrapping
# identity multiplier.
LEAKY_RELU_CASES = [
    (0.05, 0, 0.05, 0, 0.1),
    (0.05, -10, 0.03, 20, 0.2),
    (0.1, 5, 0.08, -30, -0.5),
    (0.02, 0, 0.02, 0, 0.0),
    (0.02, 0, 0.04, 0, 2.0),
    (0.01, 30, 0.02, -100, 1e-3),
    (0.01, 3, 0.01, 3, 1e-12),
    (1.0, 0, 1e-5, 0, 0.3),
]
# (x_scale, x_zero, y_scale, y_zero): radius 15 (0.5), wider than int8 (0.003), 0 (20.0: every input
# saturates); the last output is quantized otherwise, which TFLM accepts and ignores.
TANH_CASES = [
    (0.1, 0, TANH_OUTPUT_SCALE, TANH_OUTPUT_ZERO),
    (0.05, -20, TANH_OUTPUT_SCALE, 0),
    (1 / 32, 0, TANH_OUTPUT_SCALE, 0),
    (0.5, -128, TANH_OUTPUT_SCALE, 0),
    (0.003, 5, TANH_OUTPUT_SCALE, 0),
    (0.0123, 127, TANH_OUTPUT_SCALE, 0),
    (20.0, 3, TANH_OUTPUT_SCALE, 0),
    (0.05, 0, 0.03, -5),
]


def _one_op_model(op: str, x_scale: float, x_zero: int, y_scale: float, y_zero: int, **options) -> bytes:
    def tensor(name: str, scale: float, zero: int) -> TensorDesc:
        return TensorDesc(name, SHAPE, "int8", np.array([scale], np.float32), np.array([zero], np.int64))

    graph = TFLiteGraph(
        [tensor("x", x_scale, x_zero), tensor("y", y_scale, y_zero)], [OpDesc(op, (0,), (1,), options)], (0,), (1,)
    )
    return write_tflite(graph)


def _inputs() -> np.ndarray:
    """32 random int8 samples, then 2 holding -128..127 once each."""
    rng = np.random.default_rng(0)
    every = np.arange(-128, 128, dtype=np.int8).reshape(2, *SHAPE[1:])
    return np.concatenate([rng.integers(-128, 128, (32, *SHAPE[1:])).astype(np.int8), every])


def _compare(model: bytes, fn, params) -> tuple[int, int]:
    """(elements compared, elements differing from TFLM) for the inputs above."""
    x = _inputs()
    ours = fn(torch.from_numpy(x.astype(np.int64)), params).numpy()
    want = tflm_invoke(model, x)
    assert want.shape == ours.shape == x.shape and want.dtype == np.int8
    return ours.size, int((ours != want.astype(np.int64)).sum())


@pytest.mark.parametrize("x_scale,x_zero,y_scale,y_zero", RELU_CASES)
def test_relu_equals_tflm(x_scale, x_zero, y_scale, y_zero):
    model = _one_op_model("RELU", x_scale, x_zero, y_scale, y_zero)
    assert _compare(model, relu_int8, relu_params(x_scale, x_zero, y_scale, y_zero)) == (34 * 128, 0)


@pytest.mark.parametrize("x_scale,x_zero,y_scale,y_zero", RELU6_CASES)
def test_relu6_equals_tflm(x_scale, x_zero, y_scale, y_zero):
    model = _one_op_model("RELU6", x_scale, x_zero, y_scale, y_zero)
    assert _compare(model, relu6_int8, relu6_params(x_scale, x_zero)) == (34 * 128, 0)


@pytest.mark.parametrize("x_scale,x_zero,y_scale,y_zero,alpha", LEAKY_RELU_CASES)
def test_leaky_relu_equals_tflm(x_scale, x_zero, y_scale, y_zero, alpha):
    model = _one_op_model("LEAKY_RELU", x_scale, x_zero, y_scale, y_zero, alpha=alpha)
    assert _compare(model, leaky_relu_int8, leaky_relu_params(x_scale, x_zero, y_scale, y_zero, alpha)) == (34 * 128, 0)


@pytest.mark.parametrize("x_scale,x_zero,y_scale,y_zero", TANH_CASES)
def test_tanh_equals_tflm(x_scale, x_zero, y_scale, y_zero):
    model = _one_op_model("TANH", x_scale, x_zero, y_scale, y_zero)
    assert _compare(model, tanh_int8, tanh_params(x_scale, x_zero)) == (34 * 128, 0)


def test_the_cases_reach_the_edges():
    """The parameter sets above exercise what they claim to."""
    assert relu_params(1.0, 0, 1e-5, 3).output_shift == 17
    # TFLM's multipliers are double quotients of the float32 scales; float32 quotients differ on these cases
    f32 = np.float32
    as_f32 = ReluParams(0, -128, *quantize_multiplier(float(f32(0.25) / f32(0.1))), -128, 127)
    assert int((table(relu_int8, as_f32) != table(relu_int8, relu_params(0.25, 0, 0.1, -128))).sum()) == 51
    p = leaky_relu_params(0.1, 5, 0.08, -30, -0.5)
    assert (p.output_multiplier_identity, p.output_multiplier_alpha) != (5 << 28, -(5 << 28))
    assert table(relu_int8, relu_params(0.5, 100, 0.3, 127)).eq(127).all()
    assert [relu6_params(s, z).six for s, z, _, _ in RELU6_CASES] == [110, 100, 127, 60, -116, 3]
    assert leaky_relu_params(0.1, 5, 0.08, -30, -0.5).output_multiplier_alpha < 0
    assert leaky_relu_params(0.01, 3, 0.01, 3, 1e-12).output_multiplier_alpha == 0
    assert [tanh_params(s, z).input_range_radius for s, z in ((0.5, -128), (20.0, 3))] == [15, 0]
    assert tanh_params(0.003, 5).input_range_radius > 255
    t = table(tanh_int8, tanh_params(20.0, 3))
    assert t[:132].eq(-128).all() and t[132:].eq(127).all()  # radius 0: a centred 0 is -128, as in TFLM


def test_results_are_close_to_the_real_functions():
    """Within one output step of the float functions, clamped to the output's range."""
    x = torch.arange(-128, 128).double()
    for xs, xz, ys, yz in RELU_CASES[:-1]:
        y = (table(relu_int8, relu_params(xs, xz, ys, yz)).double() - yz) * ys
        real = (xs * (x - xz)).clamp(min=0).clamp(ys * (-128 - yz), ys * (127 - yz))
        assert (y - real).abs().max() <= ys  # TFLM rounds twice: up to one step
    for xs, xz, ys, yz, alpha in LEAKY_RELU_CASES[:-1]:
        y = (table(leaky_relu_int8, leaky_relu_params(xs, xz, ys, yz, alpha)).double() - yz) * ys
        v = xs * (x - xz)
        real = torch.where(v >= 0, v, alpha * v).clamp(ys * (-128 - yz), ys * (127 - yz))
        assert (y - real).abs().max() <= ys
    for xs, xz, _, _ in TANH_CASES[:-2]:
        y = table(tanh_int8, tanh_params(xs, xz)).double() * TANH_OUTPUT_SCALE
        real = torch.tanh(xs * (x - xz)).clamp(-1, 127 / 128)
        assert (y - real).abs().max() <= TANH_OUTPUT_SCALE


def test_prepare_constraints_match_tflm():
    """What TFLM's Prepare accepts runs (it checks no output quantization of these four int8 kernels); what
    is undefined in its C is refused; RELU_N1_TO_1 (no TFLM kernel) and PRELU (alpha tensor) are refused."""
    x = _inputs()[:2]
    # TANH's output scale and zero point are not checked; the kernel writes 1/128 steps around 0 anyway.
    assert _compare(_one_op_model("TANH", 0.05, 0, 0.5, 100), tanh_int8, tanh_params(0.05, 0))[1] == 0
    # RELU6 reads the input's quantization only: its int8 values go through, clamped.
    assert _compare(_one_op_model("RELU6", 0.05, -10, 0.003, 77), relu6_int8, relu6_params(0.05, -10))[1] == 0
    with pytest.raises(ValueError, match="below 2\\^-28"):
        tanh_params(2.0**-30, 0)
    with pytest.raises(ValueError, match="left shift of 34"):
        relu_params(1.0, 0, 1e-10, 0)
    with pytest.raises(ValueError, match="alpha multiplier"):
        leaky_relu_params(1.0, 0, 1.0, 0, 1e10)
    with pytest.raises(ValueError, match="alpha must be finite"):
        leaky_relu_params(1.0, 0, 1.0, 0, float("inf"))
    with pytest.raises(ValueError, match="positive and finite"):
        relu6_params(0.0, 0)
    relu_n1 = _one_op_model("RELU_N1_TO_1", 0.01, 0, 0.01, 0)
    with pytest.raises(RuntimeError):  # "Didn't find op for builtin opcode 'RELU_N1_TO_1'"
        tflm_invoke(relu_n1, x)
    with pytest.raises(ModelFileError, match="RELU_N1_TO_1, which fedtiny does not support"):
        check_supported(read_tflite(relu_n1), "relu_n1")
    alpha = TensorDesc(
        "alpha",
        (1, 1, 8),
        "int8",
        np.array([0.01], np.float32),
        np.array([0], np.int64),
        data=np.full((1, 1, 8), 10, np.int8),
    )
    g = read_tflite(_one_op_model("RELU", 0.05, 0, 0.05, 0))
    g.tensors.append(alpha)
    g.ops[0].op, g.ops[0].inputs = "PRELU", (0, 2)
    prelu = write_tflite(g)
    assert tflm_invoke(prelu, x).shape == x.shape  # TFLM runs it; fedtiny does not read it
    with pytest.raises(ModelFileError, match="PRELU, which fedtiny does not support"):
        check_supported(read_tflite(prelu), "prelu")


def test_the_lookups_backward_is_their_tables_central_difference():
    """Each kind's slope is the default lookup slope; at RELU6's kinks it is 1/2, inside 1, outside 0."""
    from fedtiny.int8.ops.activations import QLeakyRelu, QRelu, QRelu6, QTanh
    from fedtiny.int8.ops.lookup import lookup_slope

    gen = torch.Generator().manual_seed(0)
    for m in (
        QRelu(0.05, -10, 0.04, -20),
        QRelu6(0.05, -10, 0.05, -10),
        QTanh(0.05, 0, 1 / 128, 0),
        QLeakyRelu(0.05, 0, 0.04, 5, alpha=0.25),
    ):
        table, slope = m.tables()
        assert torch.equal(slope, lookup_slope(table)) and slope.dtype == torch.float32
        x = torch.randint(-128, 128, (3, 4, 2, 2), generator=gen).float().requires_grad_(True)
        g = torch.randn(3, 4, 2, 2, generator=gen)
        y = m(x)
        assert torch.equal(y, table[x.detach().long() + 128].float())
        (gx,) = torch.autograd.grad(y, x, g)
        assert torch.equal(gx, g * slope[x.detach().long() + 128])
    _, slope = QRelu6(0.05, -10, 0.05, -10).tables()  # clamp to [-10, 110]
    assert slope[-10 + 128] == 0.5 and slope[110 + 128] == 0.5
    assert slope[-9 + 128 : 110 + 128].eq(1).all() and slope[: -10 + 128].eq(0).all() and slope[111 + 128 :].eq(0).all()


# ---------------------------------------------------------------- in a graph


def _with_activations():
    """``test_ops_tflm._se_net()`` with the four ops spliced in after convolutions:
    conv4 -> tanh0 -> relu6_0 -> sigmoid0 (RELU6 clamps TANH's negative half),
    conv5 -> leakyrelu0 -> hardswish0, and pool1 -> relu0 -> classifier (each reader reading the new quantization).
    """
    from test_ops_tflm import _se_net

    from fedtiny.int8.graph import QModel
    from fedtiny.int8.ops.activations import QLeakyRelu, QRelu, QRelu6, QTanh

    q = _se_net()
    ops = []

    def add(module, tag, inputs):
        module.tag = tag
        ops.append((module, inputs))
        return (tag,)

    for node in q.nodes:
        m, inputs = q.op(node.op), node.inputs
        if node.op == "sigmoid0":
            conv = q.op("conv4")
            inputs = add(QTanh(conv.y_scale, conv.y_zero, 1 / 128, 0), "tanh0", inputs)
            inputs = add(QRelu6(1 / 128, 0, 1 / 128, 0), "relu6_0", inputs)
            m.qparams[0], m.qparams[1] = 1 / 128, 0
        if node.op == "hardswish0":
            conv = q.op("conv5")
            leaky = (conv.y_scale * 0.8, conv.y_zero - 20)
            inputs = add(QLeakyRelu(conv.y_scale, conv.y_zero, *leaky, alpha=0.1), "leakyrelu0", inputs)
            m.qparams[0], m.qparams[1] = leaky
        if node.op == "classifier":
            hs = q.op("hardswish0")
            relu = (hs.y_scale * 1.1, -10)
            inputs = add(QRelu(hs.y_scale, hs.y_zero, *relu), "relu0", inputs)
            m.qparams[0], m.qparams[1] = relu
        ops.append((m, inputs))
    return QModel(ops, *[float(v) for v in q.input_params], input_shape=q.input_shape)


@pytest.fixture(scope="module")
def spliced():
    return _with_activations()


def test_the_spliced_net_equals_tflm_on_every_tensor(spliced, tmp_path):
    from test_ops_tflm import _tflm_differences

    from fedtiny.int8.modelfile import load_qmodel, save_qmodel
    from fedtiny.int8.tfl_convert import export_tflite, from_tflite

    data = export_tflite(spliced, tmp_path / "act.tflite").read_bytes()
    g = read_tflite(data)
    ops = [op.op for op in g.ops]
    assert {"TANH", "RELU6", "LEAKY_RELU", "RELU"} <= set(ops)
    leaky = g.ops[ops.index("LEAKY_RELU")]
    assert leaky.options["alpha"] == pytest.approx(0.1) and np.float32(leaky.options["alpha"]) == np.float32(0.1)
    assert _tflm_differences(data) == (0, 0)
    back = from_tflite(g)
    assert back.op("leakyrelu0").alpha == spliced.op("leakyrelu0").alpha == float(np.float32(0.1))
    x = torch.rand(4, 1, 16, 16)
    assert torch.equal(back(x), spliced(x))
    stored = load_qmodel(save_qmodel(spliced, tmp_path / "act.safetensors"))
    assert stored.op("leakyrelu0").alpha == float(np.float32(0.1))
    assert torch.equal(stored(x), spliced(x))


def test_the_exact_steps_gradient_crosses_the_activations(spliced):
    """conv4 is reached only through tanh0 and relu6_0, conv5 only through leakyrelu0 and relu0; the planner's
    buffers are those a real step holds."""
    from fedtiny.budget.memory import measure_step, memory_report
    from fedtiny.budget.schemes import parse_scheme, resolve
    from fedtiny.int8 import exact

    for p in spliced.parameters():
        p.requires_grad_(True)
    x, y = torch.rand(2, 1, 16, 16), torch.tensor([1, 7])
    with exact.step(exact.StepKey(0, 0)):
        torch.nn.functional.cross_entropy(spliced(x), y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in spliced.parameters())
    assert spliced.conv4.weight.grad.abs().sum() > 0 and spliced.conv5.weight.grad.abs().sum() > 0
    assert spliced.conv0.weight.grad.abs().sum() > 0
    r = resolve(parse_scheme("full"), spliced)
    rep, led = memory_report(spliced, r, (1, 16, 16)), measure_step(spliced, r, x[:1], y[:1])
    assert (rep.peak_sram_bytes, rep.peak_at) == (led.peak, led.peak_at)
    for p in spliced.parameters():
        p.grad = None


def test_tanh_and_leaky_relu_layers_trace_to_their_ops():
    """nn.Tanh and nn.LeakyReLU in a PyTorch model become TANH and LEAKY_RELU ops that TFLM runs identically."""
    import torch.nn as nn
    from test_ops_tflm import _tflm_differences

    from fedtiny.int8.convert import ptq
    from fedtiny.int8.tfl_convert import export_tflite

    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    torch.manual_seed(0)
    q = ptq(net, np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32))
    assert [n.op for n in q.nodes] == ["conv0", "tanh0", "conv1", "leaky_relu0", "pool", "classifier"]
    assert abs(q.leaky_relu0.alpha - 0.1) < 1e-7
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        assert _tflm_differences(export_tflite(q, Path(tmp) / "t.tflite").read_bytes()) == (0, 0)
