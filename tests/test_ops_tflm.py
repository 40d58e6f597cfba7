"""Operators beyond the original eight, each against TFLite Micro's reference kernels (0 differing elements on
every tensor for random int8 inputs) and trained by the exact step and the C step alike (0 mismatches).

Models are built here as small PyTorch modules, quantized by fedtiny and exported, so that the test needs no
downloaded file."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import ROOT
from test_tflm_exact import _as_tflite, _nchw, _random_inputs

from fedtiny.int8.convert import ptq
from fedtiny.int8.oracle import tflm_invoke, tflm_tensors
from fedtiny.int8.tfl_convert import export_tflite, from_tflite
from fedtiny.int8.tflite import read_tflite


def _tflm_differences(data: bytes) -> tuple[int, int]:
    """(elements differing from TFLM in the logits of 32 random inputs, in every tensor of 2 more), read back."""
    g = read_tflite(data)
    names: dict[int, str] = {}
    model = from_tflite(g, "model", names)
    shape = g.tensors[g.inputs[0]].shape
    x = _random_inputs(shape, 32)
    want = tflm_invoke(data, x)
    logits = int((_as_tflite(model.int8_forward(_nchw(x)), want.shape) != want).sum())
    padded = {op.outputs[0] for op in g.ops if op.op == "PAD"}  # fedtiny pads inside the convolution
    every = 0
    for seed in (1, 2):
        x1 = _random_inputs(shape, 1, seed)
        ref, ours = tflm_tensors(data, x1), model.int8_tensors(_nchw(x1))
        every += sum(
            int((_as_tflite(ours[t], ref[i].shape) != ref[i]).sum()) for i, t in names.items() if i not in padded
        )
    return logits, every


class DepthMultiplier(nn.Module):
    """A depthwise convolution with two outputs per input channel (TFLite depth_multiplier 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.dw(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_depth_multiplier_equals_tflm_and_trains_in_both_steps(tmp_path):
    from fedtiny.tools.device_check import device_check

    torch.manual_seed(0)
    q = ptq(DepthMultiplier(), np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32))
    path = export_tflite(q, tmp_path / "dm.tflite")
    g = read_tflite(path.read_bytes())
    dw = next(op for op in g.ops if op.op == "DEPTHWISE_CONV_2D")
    assert dw.options["depth_multiplier"] == 2
    assert _tflm_differences(path.read_bytes()) == (0, 0)
    for scheme, batch in (("full", 2), ("last-k:3", 1)):
        out = device_check(str(path), scheme, "mcu-256kb", steps=3, batch=batch, lr=0.01)
        assert (out["forward_mismatches"], out["param_mismatches"]) == (0, 0), (scheme, out)


def test_a_grouped_convolution_trains_whole_or_not_at_all():
    from fedtiny.budget.schemes import parse_scheme, resolve
    from fedtiny.errors import SchemeError

    torch.manual_seed(0)
    q = ptq(DepthMultiplier(), np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32))
    half = '{"weight_update_idx": [1], "weight_update_ratio": [0.5]}'
    with pytest.raises(SchemeError, match="grouped convolution, trained whole or not at all"):
        resolve(parse_scheme(half), q)
    # another model's scheme (the quickstart's, for tiny-ir) says which schemes fit any model
    with pytest.raises(SchemeError, match=r"exceeds the model's 3 convolutions; .* use a preset \(last-k:fit"):
        resolve(parse_scheme('{"n_bias_update": 9}'), q)


def test_quantization_fields_tflm_ignores_are_read_as_tflm_reads_them(tmp_path):
    """A bias with one zero point for its per-channel scales along a dimension it lacks, and weights with one
    zero point for many scales (as converters write them): TFLM runs the file, fedtiny reads it exactly; weights
    whose scales match neither one nor every output channel are refused in one line, as TFLM's Prepare does."""
    from fedtiny.errors import ModelFileError
    from fedtiny.int8.tflite import write_tflite

    torch.manual_seed(0)
    q = ptq(DepthMultiplier(), np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32))
    g = read_tflite(export_tflite(q, tmp_path / "dm.tflite").read_bytes())
    bias = next(t for t in g.tensors if t.name.endswith("/bias") and len(t.scales) > 1)
    bias.zeros, bias.quantized_dimension = np.zeros(1, np.int64), 3
    weights = next(t for t in g.tensors if t.name.endswith("/weight") and len(t.scales) > 1)
    weights.zeros = np.zeros(1, np.int64)
    data = write_tflite(g)
    assert tflm_invoke(data, np.zeros((1, 8, 8, 1), np.int8)).size == 10
    assert _tflm_differences(data) == (0, 0)
    weights.scales = weights.scales[:3]
    with pytest.raises(ModelFileError, match=r"weights tensor \d+ .* has 3 scales for \d+ output channels"):
        from_tflite(read_tflite(write_tflite(g)))


def test_squeeze_reads_as_a_reshape(tmp_path):
    """SQUEEZE (TFLM's squeeze of the pooled 1x1 map before a classifier) equals TFLM as fedtiny reads it."""
    from fedtiny.int8.tflite import OpDesc, TensorDesc, write_tflite

    torch.manual_seed(0)
    q = ptq(DepthMultiplier(), np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32))
    g = read_tflite(export_tflite(q, tmp_path / "dm.tflite").read_bytes())
    # the pooled 1x1 map squeezed to a vector and reshaped back before the classifier (a 1x1 CONV_2D)
    k = next(i for i, op in enumerate(g.ops) if op.op == "AVERAGE_POOL_2D")
    pooled = g.tensors[g.ops[k].outputs[0]]
    flat = TensorDesc("squeezed", (1, pooled.shape[3]), "int8", pooled.scales, pooled.zeros)
    back = TensorDesc("unsqueezed", pooled.shape, "int8", pooled.scales, pooled.zeros)
    shape = TensorDesc("unsqueezed/shape", (4,), "int32", None, None, 0, np.asarray(pooled.shape, np.int32))
    g.tensors += [flat, back, shape]
    n = len(g.tensors)
    g.ops[k + 1].inputs = (n - 2, *g.ops[k + 1].inputs[1:])
    g.ops[k + 1 : k + 1] = [
        OpDesc("SQUEEZE", (g.ops[k].outputs[0],), (n - 3,), {"squeeze_dims": [1, 2]}),
        OpDesc("RESHAPE", (n - 3, n - 1), (n - 2,), {"new_shape": list(pooled.shape)}),
    ]
    data = write_tflite(g)
    assert [op.op for op in read_tflite(data).ops].count("SQUEEZE") == 1
    assert _tflm_differences(data) == (0, 0)


# ---------------------------------------------------------------- the common MCU operators


def _se_net(size: int = 16):
    import sys

    sys.path.insert(0, str(ROOT / "scenarios" / "models"))
    from torchvision_nets import se_net

    torch.manual_seed(0)
    return ptq(se_net(1, 10), np.random.default_rng(0).random((64, 1, size, size), dtype=np.float32))


def _spliced(q):
    """``q`` with a MEAN (its own output quantization) in place of the head's pool, and a requantize and a
    strided slice before the mix convolution (the slice keeps every channel, every other row and column)."""
    from fedtiny.int8.graph import QModel
    from fedtiny.int8.ops.lookup import QRequantize
    from fedtiny.int8.ops.mean import QMean
    from fedtiny.int8.ops.slice import QSlice

    ops, renames = [], {}
    for node in q.nodes:
        m = q.op(node.op)
        inputs = tuple(renames.get(t, t) for t in node.inputs)
        if node.op == "conv5":  # the mix convolution: read a requantized, sliced copy of its input
            x_scale, x_zero = m.x_scale, m.x_zero
            rq = QRequantize(x_scale, x_zero, x_scale * 1.5, x_zero // 2)
            rq.tag = "requantize0"
            sl = QSlice([(0, 32, 1), (0, 8, 1), (1, 8, 1)])
            sl.tag = "slice0"
            back = QRequantize(x_scale * 1.5, x_zero // 2, x_scale, x_zero)
            back.tag = "requantize1"
            ops += [(rq, inputs), (sl, ("requantize0",)), (back, ("slice0",))]
            inputs = ("requantize1",)
        if node.op == "pool1":
            hs_scale, hs_zero = q.op("hardswish0").y_scale, q.op("hardswish0").y_zero
            m = QMean(hs_scale, hs_zero, hs_scale * 0.75, hs_zero + 3, keep_dims=False)
            m.tag = "mean0"
            renames["pool1"] = "mean0"
            c = q.classifier
            c.qparams[0], c.qparams[1] = hs_scale * 0.75, hs_zero + 3  # the head reads the mean's quantization
        ops.append((m, inputs))
    return QModel(
        ops, *[float(v) for v in q.input_params[:2]], *[float(v) for v in q.input_params[2:]], input_shape=q.input_shape
    )


def test_pytorch_operators_trace_export_and_equal_tflm(tmp_path):
    """MaxPool2d, torch.cat, a squeeze-and-excitation gate (mean, sigmoid, *) and hardswish trace to int8 ops
    that TFLM runs with 0 differing elements in every tensor."""
    q = _se_net()
    path = export_tflite(q, tmp_path / "se.tflite")
    ops = {op.op for op in read_tflite(path.read_bytes()).ops}
    assert {"MAX_POOL_2D", "CONCATENATION", "MUL", "LOGISTIC", "HARD_SWISH"} <= ops
    assert _tflm_differences(path.read_bytes()) == (0, 0)


def test_mean_requantize_and_slice_equal_tflm(tmp_path):
    q = _spliced(_se_net())
    path = export_tflite(q, tmp_path / "more.tflite")
    ops = [op.op for op in read_tflite(path.read_bytes()).ops]
    assert {"MEAN", "QUANTIZE", "STRIDED_SLICE"} <= set(ops)
    assert _tflm_differences(path.read_bytes()) == (0, 0)


def test_float_edges_fold_into_the_input_and_output(tmp_path):
    """A float input QUANTIZEd first and the logits DEQUANTIZEd last (how converters often write a model):
    fedtiny quantizes the input as TFLM does (float32 division, half away from zero) and writes both back."""
    q = _se_net()
    q.float_input = q.float_output = True
    data = export_tflite(q, tmp_path / "edges.tflite").read_bytes()
    g = read_tflite(data)
    assert (g.ops[0].op, g.ops[-1].op) == ("QUANTIZE", "DEQUANTIZE")
    names: dict[int, str] = {}
    back = from_tflite(g, "edges", names)
    assert back.float_input and back.float_output
    x = np.random.default_rng(3).random((1, 16, 16, 1), dtype=np.float32)
    x[0, 0, :4, 0] = np.array([0.5, 1.5, 2.5, 3.5], np.float32) * float(back.input_params[0])  # ties
    ref = tflm_tensors(data, x)
    ours = back.int8_tensors(back.quantize_input(torch.from_numpy(x).permute(0, 3, 1, 2)))
    padded = {op.outputs[0] for op in g.ops if op.op == "PAD"}  # fedtiny pads inside the convolution
    compared = [i for i in names if ref[i].dtype == np.int8 and i not in padded]
    differing = sum(int((_as_tflite(ours[names[i]], ref[i].shape) != ref[i]).sum()) for i in compared)
    assert len(compared) == len(back.nodes) + 1 and differing == 0


def test_new_operators_round_trip_through_the_model_file(tmp_path):
    from fedtiny.int8.modelfile import load_qmodel, save_qmodel

    q = _spliced(_se_net())
    x = torch.rand(4, 1, 16, 16)
    back = load_qmodel(save_qmodel(q, tmp_path / "m.safetensors"))
    assert torch.equal(back(x), q(x))


def test_the_backward_rules_of_the_new_operators():
    """Max pool routes to the first maximal tap (overlapping windows add tap by tap), MUL is the product rule
    with the broadcast gate's plane summed, the lookups use their table's central difference: each against a
    plain loop written from the rule."""
    from fedtiny.int8.ops.lookup import QLogistic, lookup_slope
    from fedtiny.int8.ops.maxpool import QMaxPool
    from fedtiny.int8.ops.mul import QMul

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (2, 3, 7, 7), generator=gen).float().requires_grad_(True)
    pool = QMaxPool((3, 3), 2, (1, 1, 1, 1), 0.05, -10)
    y = pool(x)
    g = torch.randn(y.shape, generator=gen)
    (gx,) = torch.autograd.grad(y, x, g)
    want = np.zeros((2, 3, 7, 7), np.float32)
    xv, gv = x.detach().numpy(), g.numpy()
    for n in range(2):
        for c in range(3):
            for i in range(3):  # tap by tap, as the rule adds them
                for j in range(3):
                    for oy in range(y.shape[2]):
                        for ox in range(y.shape[3]):
                            taps = [(oy * 2 + a - 1, ox * 2 + b - 1) for a in range(3) for b in range(3)]
                            vals = [xv[n, c, r, s] if 0 <= r < 7 and 0 <= s < 7 else -129 for r, s in taps]
                            if int(np.argmax(vals)) == i * 3 + j:
                                r, s = taps[i * 3 + j]
                                want[n, c, r, s] = np.float32(want[n, c, r, s] + np.float32(gv[n, c, oy, ox]))
    assert np.array_equal(gx.numpy(), want)

    a = torch.randint(-128, 128, (2, 4, 3, 3), generator=gen).float().requires_grad_(True)
    b = torch.randint(-128, 128, (2, 4, 1, 1), generator=gen).float().requires_grad_(True)
    mul = QMul(0.02, 3, 1 / 256, -128, 0.01, 1)
    y = mul(a, b)
    g = torch.randn(y.shape, generator=gen)
    ga, gb = torch.autograd.grad(y, (a, b), g)
    r = np.float32(0.02 * (1 / 256) / 0.01)
    raw = ((a.detach() - 3) * (b.detach() + 128) * (0.02 / 256 / 0.01) + 1).numpy()
    mask = (np.round(raw) > -129) & (np.round(raw) < 128)  # far from the clamp's edges here
    gm = np.where(mask, g.numpy(), 0).astype(np.float32)
    assert np.array_equal(ga.numpy(), gm * ((b.detach().numpy() + 128).astype(np.float32) * r))
    per = gm * ((a.detach().numpy() - 3).astype(np.float32) * r)
    want_b = np.zeros((2, 4, 1, 1), np.float32)
    for k in range(9):
        want_b[:, :, 0, 0] = want_b[:, :, 0, 0] + per.reshape(2, 4, 9)[:, :, k]
    assert np.array_equal(gb.numpy(), want_b)

    sig = QLogistic(0.05, 0, 1 / 256, -128)
    table, slope = sig.tables()
    assert np.array_equal(slope.numpy()[1:-1], ((table[2:] - table[:-2]).numpy() / 2).astype(np.float32))
    assert torch.equal(lookup_slope(table), slope)
    x = torch.randint(-128, 128, (3, 5, 2, 2), generator=gen).float().requires_grad_(True)
    g = torch.randn(3, 5, 2, 2, generator=gen)
    (gx,) = torch.autograd.grad(sig(x), x, g)
    assert torch.equal(gx, g * slope[x.detach().long() + 128])
    assert slope.max() > 0 and table.min() >= -128 and table.max() <= 127


def test_a_pytorch_model_with_the_new_operators_trains_in_the_exact_step():
    """Gradients cross every new op in the exact step, and the planner's buffers are those a real step holds
    (the ledger checks each op's planned buffers against the ones its step keeps)."""
    from fedtiny.budget.memory import measure_step, memory_report
    from fedtiny.budget.schemes import parse_scheme, resolve
    from fedtiny.int8 import exact

    q = _spliced(_se_net())
    for p in q.parameters():
        p.requires_grad_(True)
    x, y = torch.rand(2, 1, 16, 16), torch.tensor([1, 7])
    with exact.step(exact.StepKey(0, 0)):
        torch.nn.functional.cross_entropy(q(x), y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in q.parameters())
    assert q.conv0.weight.grad.abs().sum() > 0  # through max pool, concat, the SE gate, hardswish, slice, mean
    for scheme in ("full", "last-k:3"):
        r = resolve(parse_scheme(scheme), q)
        rep = memory_report(q, r, (1, 16, 16))
        led = measure_step(q, r, x[:1], y[:1])
        assert (rep.peak_sram_bytes, rep.peak_at) == (led.peak, led.peak_at), scheme


def test_a_new_op_kind_is_one_module_and_one_registration(tmp_path):
    """docs/architecture.md's worked example: a kind defined and registered here (ELU as a table) is read and
    written as .tflite, stored in the model file, planned and trained, with no other change."""
    from fedtiny.budget.memory import measure_step, memory_report
    from fedtiny.budget.schemes import parse_scheme, resolve
    from fedtiny.int8.graph import QModel
    from fedtiny.int8.modelfile import load_qmodel, save_qmodel
    from fedtiny.int8.ops.lookup import QLookup, _builder, _reader, _writer
    from fedtiny.int8.ops.registry import OpKind, kind_for_tflite, register

    class QElu(QLookup):
        def table(self) -> torch.Tensor:
            x = (torch.arange(-128, 128, dtype=torch.float64) - self.x_zero) * self.x_scale
            y = torch.where(x < 0, torch.expm1(x), x)
            return (torch.round(y / self.y_scale) + self.y_zero).clamp(-128, 127).to(torch.int64)

    if kind_for_tflite("ELU") is None:
        register(
            OpKind("test-elu", QElu, ("ELU",), read=_reader(QElu, "elu"), write=_writer("ELU"), build=_builder(QElu))
        )
    q = _se_net()
    ops = []
    for node in q.nodes:
        m = q.op(node.op)
        if node.op == "hardswish0":
            m = kind_for_tflite("ELU").module(m.x_scale, m.x_zero, m.y_scale, m.y_zero)
            m.tag = "hardswish0"
        ops.append((m, node.inputs))
    q = QModel(ops, *[float(v) for v in q.input_params], input_shape=q.input_shape)
    x, y = torch.rand(3, 1, 16, 16), torch.tensor([0, 4, 9])
    path = export_tflite(q, tmp_path / "elu.tflite")
    g = read_tflite(path.read_bytes())
    assert "ELU" in [op.op for op in g.ops]
    back = from_tflite(g)
    assert torch.equal(back(x), q(x))
    assert torch.equal(load_qmodel(save_qmodel(q, tmp_path / "elu.safetensors"))(x), q(x))
    r = resolve(parse_scheme("full"), q)
    rep, led = memory_report(q, r, (1, 16, 16)), measure_step(q, r, x[:1], y[:1])
    assert rep.peak_sram_bytes == led.peak and q.conv0.weight.grad.abs().sum() > 0


def test_the_attacks_float_twin_covers_the_new_operators():
    """The gradient-leakage attacks' float twin (real units, no rounding) has a twin of every new kind and
    follows the int8 model to within its rounding."""
    from fedtiny.attack.surrogate import Surrogate

    q = _spliced(_se_net())
    x = torch.rand(16, 1, 16, 16)
    twin, ours = Surrogate(q)(x), q(x)
    assert (twin - ours).abs().max() < 0.05 * ours.abs().max()
    assert (twin.argmax(1) == ours.argmax(1)).float().mean() >= 0.9
