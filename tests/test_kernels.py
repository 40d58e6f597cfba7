"""fedtiny.int8.kernels against TensorFlow Lite Micro (the oracle) and against slow Python-int references.

(a) the fixed-point primitives on hand-checked values and on random values against exact rational
    (``Fraction``) definitions; (b) every operator of the MLPerf Tiny int8 models, fed TFLM's own input
    tensors, against TFLM's output tensors; (c) synthetic cases the models do not reach against
    Python-int references written loop by loop from TFLM's kernels; (d) the same synthetic cases as
    single-operator models run by TFLM.
"""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtiny.int8 import kernels as K
from fedtiny.int8.oracle import tflm_tensors
from fedtiny.int8.tflite import OpDesc, TensorDesc, TFLiteGraph, read_tflite, write_tflite

MLPERF = Path(__file__).resolve().parents[2] / "shared/models/mlperf-tiny"
MODEL_OPS = {
    "vww_96_int8.tflite": {"CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D", "RESHAPE", "FULLY_CONNECTED", "SOFTMAX"},
    "kws_ref_model.tflite": {
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "AVERAGE_POOL_2D",
        "RESHAPE",
        "FULLY_CONNECTED",
        "SOFTMAX",
    },
    "pretrainedResnet_quant.tflite": {"CONV_2D", "ADD", "AVERAGE_POOL_2D", "RESHAPE", "FULLY_CONNECTED", "SOFTMAX"},
    "ad01_int8.tflite": {"FULLY_CONNECTED"},
}
I32_MIN, I32_MAX = K.INT32_MIN, K.INT32_MAX


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are small: one thread is faster, and steadier on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------- references


def ref_round_half_away(v: Fraction) -> int:
    """Nearest integer, ties away from zero (C's ``round``), of an exact rational."""
    n = math.floor(abs(v) + Fraction(1, 2))
    return n if v >= 0 else -n


def ref_quantize_multiplier(real: float) -> tuple[int, int]:
    """QuantizeMultiplier from its definition on exact rationals: ``real = q 2^e``, ``|q|`` in [1/2, 1)."""
    if real == 0:
        return 0, 0
    v = Fraction(real)
    e = abs(v).numerator.bit_length() - abs(v).denominator.bit_length()
    while abs(v) / Fraction(2) ** e >= 1:
        e += 1
    while abs(v) / Fraction(2) ** e < Fraction(1, 2):
        e -= 1
    m = ref_round_half_away(v / Fraction(2) ** e * 2**31)
    if m == 2**31:
        m, e = 2**30, e + 1
    return (0, 0) if e < -31 else (m, e)


def ref_wrap32(v: int) -> int:
    return (v + 2**31) % 2**32 - 2**31


def ref_srdhm(a: int, b: int) -> int:
    """VQRDMULH: ``a b / 2^31`` rounded half up (towards +inf), saturating only at ``INT32_MIN^2``."""
    return I32_MAX if a == b == I32_MIN else math.floor(Fraction(a * b + 2**30, 2**31))


def ref_rdbpot(x: int, e: int) -> int:
    """``x / 2^e`` rounded half away from zero."""
    return ref_round_half_away(Fraction(x, 2**e))


def ref_mbqm(x: int, m: int, s: int) -> int:
    """MultiplyByQuantizedMultiplier, double rounding: int32 (wrapping) left shift, VQRDMULH, rounding right shift."""
    return ref_rdbpot(ref_srdhm(ref_wrap32(x * 2 ** max(s, 0)), m), max(-s, 0))


def ref_conv(
    x, w, b, *, x_zero, y_zero, mult, shift, lo, hi, stride, pad_top, pad_left, out_hw, groups, dilation=(1, 1)
):
    """TFLM's ConvPerChannel loop by loop (NCHW numpy in, out): taps outside the image are skipped."""
    n, _, h, wd = x.shape
    o, cg, kh, kw = w.shape
    out = np.zeros((n, o, *out_hw), np.int64)
    xc = x.astype(np.int64) - x_zero
    for bi in range(n):
        for oc in range(o):
            g = oc // (o // groups)
            xg = xc[bi, g * cg : (g + 1) * cg]
            for oy in range(out_hw[0]):
                for ox in range(out_hw[1]):
                    acc = 0
                    for ky in range(kh):
                        for kx in range(kw):
                            iy = oy * stride[0] - pad_top + dilation[0] * ky
                            ix = ox * stride[1] - pad_left + dilation[1] * kx
                            if 0 <= iy < h and 0 <= ix < wd:
                                acc += int(np.dot(w[oc, :, ky, kx].astype(np.int64), xg[:, iy, ix]))
                    acc += int(b[oc])
                    out[bi, oc, oy, ox] = min(hi, max(lo, ref_mbqm(acc, int(mult[oc]), int(shift[oc])) + y_zero))
    return out


def ref_avg_pool(x, kernel, stride, pad_top, pad_left, out_hw, lo, hi):
    """TFLM's int8 AveragePool loop by loop: the sum and count of the window's taps inside the image."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, *out_hw), np.int64)
    for bi in range(n):
        for ch in range(c):
            for oy in range(out_hw[0]):
                for ox in range(out_hw[1]):
                    taps = [
                        int(x[bi, ch, iy, ix])
                        for iy in range(oy * stride[0] - pad_top, oy * stride[0] - pad_top + kernel[0])
                        if 0 <= iy < h
                        for ix in range(ox * stride[1] - pad_left, ox * stride[1] - pad_left + kernel[1])
                        if 0 <= ix < w
                    ]
                    out[bi, ch, oy, ox] = min(hi, max(lo, ref_round_half_away(Fraction(sum(taps), len(taps)))))
    return out


def ref_add(a: int, b: int, p: K.AddParams, lo: int, hi: int) -> int:
    one = ref_mbqm((a - p.z1) * 2**p.left_shift, p.mult1, p.shift1)
    two = ref_mbqm((b - p.z2) * 2**p.left_shift, p.mult2, p.shift2)
    return min(hi, max(lo, ref_mbqm(one + two, p.mult_out, p.shift_out) + p.z_out))


def _fixed(fn, v: int) -> int:
    """One gemmlowp fixed-point primitive of the kernels module on one int32 value."""
    return int(fn(torch.tensor([v], dtype=torch.int64))[0])


def ref_softmax_row(row, p: K.SoftmaxParams) -> list[int]:
    """TFLM's int8 softmax on one row with Python ints around gemmlowp's exp and reciprocal primitives."""
    top = max(int(v) for v in row)
    exps = {}
    for c, v in enumerate(row):
        d = int(v) - top
        if d >= p.diff_min:
            exps[c] = _fixed(K.exp_on_negative_values, ref_srdhm(d * 2**p.input_left_shift, p.input_multiplier))
    total = sum(ref_rdbpot(e, 12) for e in exps.values())
    headroom = 32 - total.bit_length()
    recip = _fixed(K.one_over_one_plus_x_for_x_in_0_1, (total << headroom) - 2**31)
    exponent = (12 - headroom) + 31 - 8
    return [
        min(127, max(-128, ref_rdbpot(ref_srdhm(recip, exps[c]), exponent) - 128)) if c in exps else -128
        for c in range(len(row))
    ]


# ---------------------------------------------------------------------------------------------------- (a) primitives


@pytest.mark.parametrize(
    "real, want",
    [
        (1.0, (2**30, 1)),
        (0.5, (2**30, 0)),
        (0.75, (3 << 29, 0)),
        (3.0, (3 << 29, 2)),
        (-0.75, (-(3 << 29), 0)),
        (0.0, (0, 0)),
        (2.0**-32, (2**30, -31)),
        (2.0**-33, (0, 0)),
        (2.0**-40, (0, 0)),
        (0.5 + 2.0**-32, (2**30 + 1, 0)),  # q 2^31 = 2^30 + 1/2: ties go away from zero
        (-(0.5 + 2.0**-32), (-(2**30 + 1), 0)),
        (1 - 2.0**-33, (2**30, 1)),  # rounds to 2^31: halved, shift + 1
    ],
)
def test_quantize_multiplier_hand_values(real, want):
    assert K.quantize_multiplier(real) == want


def test_quantize_multiplier_random_doubles():
    rng = np.random.default_rng(1)
    mantissa = rng.integers(2**52, 2**53, 3000).astype(np.float64)
    reals = list(mantissa * 2.0 ** rng.integers(-90, -20, 3000).astype(np.float64) * rng.choice([-1, 1], 3000))
    reals += [
        (2**30 + int(k) + 0.5) * 2.0**-31 * 2.0 ** int(e)
        for k, e in zip(rng.integers(0, 2**30, 200), rng.integers(-30, 10, 200))
    ]
    mult, shift = K.quantize_multipliers(reals)
    assert [(int(m), int(s)) for m, s in zip(mult, shift)] == [ref_quantize_multiplier(r) for r in reals]


@pytest.mark.parametrize(
    "x, m, s, want",
    [
        (3, 2**30, 0, 2),  # 1.5 -> 2
        (-3, 2**30, 0, -1),  # -1.5 -> -1: VQRDMULH rounds ties up
        (-1, 2**30, 0, 0),  # -0.5 -> 0
        (5, 2**30, -1, 2),  # 1.25: 2.5 -> 3 by VQRDMULH, 1.5 -> 2 by the right shift (double rounding)
        (-5, 2**30, -1, -1),  # -1.25: -2.5 -> -2, -1 -> -1
        (-6, 2**30, -1, -2),  # -1.5: -3 exactly, then -1.5 -> -2 (the right shift rounds ties away from zero)
        (7, 3 << 29, 2, 21),  # 7 * 0.75 * 4
        (2**29, 2**30, 3, 0),  # 2^29 * 8 wraps to 0 in int32
        (I32_MIN, I32_MIN, 0, I32_MAX),  # the one saturating product
        (2**28, I32_MIN, 3, I32_MAX),  # 2^28 * 8 wraps to INT32_MIN, then saturates
        (I32_MAX, I32_MAX, 0, I32_MAX - 1),
        (-(2**20) - 2**19, 2**30, -20, -1),  # -1.5 * 2^20 * 0.5 / 2^20 = -0.75 -> -1
    ],
)
def test_multiply_by_quantized_multiplier_edge_cases(x, m, s, want):
    assert ref_mbqm(x, m, s) == want
    assert int(K.multiply_by_quantized_multiplier(torch.tensor([x]), m, s)[0]) == want
    assert int(K.multiply_by_quantized_multiplier(torch.tensor([x]), torch.tensor([m]), torch.tensor([s]))[0]) == want


def test_multiply_by_quantized_multiplier_random_and_per_channel():
    rng = np.random.default_rng(2)
    n = 4000
    m = rng.integers(2**30, 2**31, n)
    s = rng.integers(-31, 8, n)
    bits = rng.integers(1, 32, n)  # magnitudes of every size, ties included by the small ones
    x = rng.integers(-(2**31), 2**31, n) >> (32 - bits)
    x[:200] = (rng.integers(-(2**10), 2**10, 200) * 2 + 1) << 10  # times 0.5, shifted right by 10: ties
    m[:200], s[:200] = 2**30, -10
    got = K.multiply_by_quantized_multiplier(torch.from_numpy(x), torch.from_numpy(m), torch.from_numpy(s))
    assert got.tolist() == [ref_mbqm(int(a), int(b), int(c)) for a, b, c in zip(x, m, s)]
    # A 1-D multiplier runs along dim 1 of NCHW.
    xc = torch.from_numpy(rng.integers(-(2**20), 2**20, (2, 3, 2, 2)))
    mc, sc = torch.tensor([2**30, 3 << 29, 1518500250]), torch.tensor([-3, 2, -12])
    got = K.multiply_by_quantized_multiplier(xc, mc, sc)
    want = [
        [
            [[ref_mbqm(int(xc[i, c, j, k]), int(mc[c]), int(sc[c])) for k in range(2)] for j in range(2)]
            for c in range(3)
        ]
        for i in range(2)
    ]
    assert got.tolist() == want


def test_scale_products_float32_and_double():
    rng = np.random.default_rng(3)
    s_in, s_w, s_out = (rng.uniform(1e-3, 1e-1, 400).astype(np.float32) for _ in range(3))
    mult, shift = K.conv_multipliers(float(s_in[0]), s_w, float(s_out[0]))
    want = [ref_quantize_multiplier(float(s_in[0]) * float(w) / float(s_out[0])) for w in s_w]
    assert list(zip(mult.tolist(), shift.tolist())) == want
    assert K.conv_multipliers(0.5, np.float32(0.25), 1.0, channels=3)[0].tolist() == [2**30] * 3
    differs = 0
    for a, b, c in zip(s_in, s_w, s_out):
        got = K.fc_multiplier(float(a), float(b), float(c))
        assert got == ref_quantize_multiplier(float(a * b) / float(c))  # a * b: a float32 product
        differs += got != ref_quantize_multiplier(float(a) * float(b) / float(c))
    assert differs > 0  # the float32 product is not the double one


@pytest.mark.parametrize(
    "act, scale, zero, want",
    [
        ("NONE", 0.1, 3, (-128, 127)),
        ("RELU", 0.1, -5, (-5, 127)),
        ("RELU", 0.1, -200, (-128, 127)),
        ("RELU6", 6 / 255, -128, (-128, 127)),
        ("RELU_N1_TO_1", 1 / 64, 0, (-64, 64)),
        ("RELU6", 12.0, 0, (0, 1)),  # 6 / 12 = 0.5 rounds away from zero
        ("RELU6", 0.8, 0, (0, 8)),  # 6 / 0.8f is 7.4999999 in double, but its float32 quotient is 7.5 -> 8
    ],
)
def test_activation_range(act, scale, zero, want):
    assert K.activation_range(act, scale, zero) == want


def test_add_params_hand_values():
    # twice_max = 1: inputs 0.5 = 2^30 * 2^-31 and 0.25; output 1 / (2^20 * 1) = 2^30 * 2^(-19 - 31).
    assert K.add_params(0.5, 3, 0.25, -4, 1.0, 7) == K.AddParams(3, -4, 7, 20, 2**30, 0, 2**30, -1, 2**30, -19)


def test_same_padding():
    assert K.same_padding(96, 96, 3, 3, 2, 2) == ((0, 1, 0, 1), (48, 48))  # even input, stride 2: the extra at the end
    assert K.same_padding(49, 10, 10, 4, 2, 2) == ((4, 5, 1, 1), (25, 5))
    assert K.same_padding(7, 8, 4, 4, 1, 1) == ((1, 2, 1, 2), (7, 8))  # even kernel
    assert K.same_padding(9, 9, 1, 1, 4, 4) == ((0, 0, 0, 0), (3, 3))  # never negative
    assert K.same_padding(8, 8, 3, 3, 1, 1, 2, 2) == ((2, 2, 2, 2), (8, 8))  # dilation 2


@pytest.mark.parametrize("onednn", [True, False])
def test_int_conv_acc_exact_on_every_backend(onednn):
    # Batch 32, 3x3, sums below 2^24: without oneDNN PyTorch would pick NNPACK's inexact Winograd for float32.
    gen = torch.Generator().manual_seed(8)
    x = torch.randint(-100, 101, (32, 16, 10, 10), generator=gen)
    w = torch.randint(-100, 101, (16, 16, 3, 3), generator=gen)
    want = torch.nn.functional.conv2d(x.double(), w.double(), padding=1).to(torch.int64)  # exact: float64
    saved = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = onednn
    try:
        got = K.int_conv_acc(x, w, None, 1, (1, 1, 1, 1))
    finally:
        torch.backends.mkldnn.enabled = saved
    assert torch.equal(got, want)


def test_fixed_point_exp_and_reciprocal_accuracy():
    a = torch.arange(0, -(2**31), -65521, dtype=torch.int64)  # Q5.26 from 0 to -32
    got = K.exp_on_negative_values(a).double() / 2**31
    assert float((got - torch.exp(a.double() / 2**26)).abs().max()) < 3e-7
    y = torch.arange(0, 2**31, 65521, dtype=torch.int64)
    got = K.one_over_one_plus_x_for_x_in_0_1(y).double() / 2**31
    assert float((got - 1 / (1 + y.double() / 2**31)).abs().max()) < 2e-7


# ---------------------------------------------------------------------------------------------------- kernels on ops


def _nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.int64)).permute(0, 3, 1, 2)


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(0, 2, 3, 1).numpy()


def _q(t: TensorDesc) -> tuple[float, int]:
    return float(t.scales[0]), int(t.zeros[0])


def _padding(o: dict, h: int, w: int, kh: int, kw: int) -> tuple[int, int, int, int]:
    if o["padding"] == "SAME":
        return K.same_padding(
            h, w, kh, kw, o["stride_h"], o["stride_w"], o.get("dilation_h", 1), o.get("dilation_w", 1)
        )[0]
    return (0, 0, 0, 0)


def kernel_output(graph: TFLiteGraph, op: OpDesc, values: dict[int, np.ndarray]) -> np.ndarray:
    """What fedtiny's kernel makes of ``op``'s input tensors ``values`` (TFLite layout in and out)."""
    t, o = graph.tensors, op.options
    x, y = values[op.inputs[0]], t[op.outputs[0]]
    s_x, z_x = _q(t[op.inputs[0]])
    s_y, z_y = _q(y)
    act = K.activation_range(o.get("fused_activation", "NONE"), s_y, z_y)
    if op.op in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        w_desc, depthwise = t[op.inputs[1]], op.op == "DEPTHWISE_CONV_2D"
        w = K.conv_weight(w_desc.data, depthwise)
        bias = torch.from_numpy(t[op.inputs[2]].data.astype(np.int64))
        mult, shift = K.conv_multipliers(s_x, w_desc.scales, s_y, w.shape[0])
        xin = _nchw(x)
        pad = _padding(o, xin.shape[2], xin.shape[3], w.shape[2], w.shape[3])
        out = K.conv2d_int8(
            xin,
            w,
            bias,
            x_zero=z_x,
            y_zero=z_y,
            mult=mult,
            shift=shift,
            act_lo=act[0],
            act_hi=act[1],
            stride=(o["stride_h"], o["stride_w"]),
            padding=pad,
            groups=xin.shape[1] if depthwise else 1,
            dilation=(o["dilation_h"], o["dilation_w"]),
        )
        return _nhwc(out)
    if op.op == "FULLY_CONNECTED":
        w_desc = t[op.inputs[1]]
        has_bias = len(op.inputs) > 2 and op.inputs[2] >= 0
        bias = torch.from_numpy(t[op.inputs[2]].data.astype(np.int64)) if has_bias else None
        if len(w_desc.scales) > 1:
            mult, shift = K.conv_multipliers(s_x, w_desc.scales, s_y)
        else:
            mult, shift = K.fc_multiplier(s_x, float(w_desc.scales[0]), s_y)
        xin = torch.from_numpy(x.reshape(-1, w_desc.shape[1]).astype(np.int64))
        out = K.fully_connected_int8(
            xin,
            torch.from_numpy(w_desc.data.astype(np.int64)),
            bias,
            x_zero=z_x,
            y_zero=z_y,
            mult=mult,
            shift=shift,
            act_lo=act[0],
            act_hi=act[1],
        )
        return out.numpy().reshape(y.shape)
    if op.op == "ADD":
        s_b, z_b = _q(t[op.inputs[1]])
        p = K.add_params(s_x, z_x, s_b, z_b, s_y, z_y)
        return _nhwc(K.add_int8(_nchw(x), _nchw(values[op.inputs[1]]), p, *act))
    if op.op == "AVERAGE_POOL_2D":
        xin = _nchw(x)
        pad = _padding(o, xin.shape[2], xin.shape[3], o["filter_h"], o["filter_w"])
        return _nhwc(K.avg_pool_int8(xin, (o["filter_h"], o["filter_w"]), (o["stride_h"], o["stride_w"]), pad, *act))
    if op.op == "SOFTMAX":
        p = K.softmax_params(s_x, o["beta"])
        return (
            K.softmax_int8(torch.from_numpy(x.reshape(-1, x.shape[-1]).astype(np.int64)), p, z_y)
            .numpy()
            .reshape(y.shape)
        )
    if op.op == "RESHAPE":
        return x.reshape(y.shape)
    if op.op == "PAD":
        pads = t[op.inputs[1]].data.reshape(-1, 2)
        return _nhwc(K.pad_int8(_nchw(x), [tuple(pads[i]) for i in (0, 3, 1, 2)], z_y))
    raise AssertionError(f"no kernel for {op.op}")


def op_differences(model: bytes, graph: TFLiteGraph, inputs: list[np.ndarray]) -> tuple[Counter, Counter]:
    """Per operator type: elements where the kernel differs from TFLM, and elements compared."""
    diff, seen = Counter(), Counter()
    for x in inputs:
        values = tflm_tensors(model, x)
        for op in graph.ops:
            got, want = kernel_output(graph, op, values), values[op.outputs[0]]
            assert got.shape == want.shape, op.op
            diff[op.op] += int(np.count_nonzero(got.astype(np.int64) != want.astype(np.int64)))
            seen[op.op] += want.size
    return diff, seen


# ---------------------------------------------------------------------------------------------------- (b) MLPerf Tiny


@pytest.mark.parametrize("name", sorted(MODEL_OPS))
def test_every_op_matches_tflm_on_mlperf_models(name):
    path = MLPERF / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    model = path.read_bytes()
    graph = read_tflite(model)
    shape = graph.tensors[graph.inputs[0]].shape
    rng = np.random.default_rng(4)
    inputs = [rng.integers(-128, 128, shape).astype(np.int8) for _ in range(3)]
    diff, seen = op_differences(model, graph, inputs)
    assert set(seen) == MODEL_OPS[name]
    assert dict(diff) == {op: 0 for op in seen}, f"differing elements per op: {dict(diff)} of {dict(seen)}"


# ---------------------------------------------------------------------------------------------------- synthetic cases


def _tensor(name, shape, scales, zeros=0, data=None, dtype="int8", qdim=0) -> TensorDesc:
    scales = None if scales is None else np.atleast_1d(np.asarray(scales, np.float32))
    zeros = None if scales is None else np.broadcast_to(np.asarray(zeros, np.int64), scales.shape).copy()
    return TensorDesc(name, tuple(shape), dtype, scales, zeros, qdim, data)


def _single(op: str, options: dict, x: TensorDesc, consts: list[TensorDesc | None], y: TensorDesc) -> TFLiteGraph:
    """A one-operator graph: activation input 0, constant inputs after it (None: an absent optional input)."""
    tensors = [x] + [c for c in consts if c is not None] + [y]
    inputs, k = [0], 1
    for c in consts:
        inputs.append(-1 if c is None else k)
        k += c is not None
    return TFLiteGraph(tensors, [OpDesc(op, tuple(inputs), (len(tensors) - 1,), options)], (0,), (len(tensors) - 1,))


def _conv_case(
    rng,
    *,
    hw,
    cin,
    cout,
    k,
    stride,
    padding,
    depthwise=False,
    dilation=(1, 1),
    act="RELU6",
    x_zero=-3,
    w_range=(-127, 127),
    scales=None,
    x_range=None,
    out_step=128,
):
    """A CONV_2D / DEPTHWISE_CONV_2D graph (``x_range`` is the inputs', for the caller).

    Positive weights (sums past 2^24) get biases cancelling their mean and a requantization step of
    ``out_step`` accumulator units.
    """
    kh, kw = k
    w_shape = (1, kh, kw, cout) if depthwise else (cout, kh, kw, cin)
    w = rng.integers(w_range[0], w_range[1] + 1, w_shape).astype(np.int8)
    s_w = rng.uniform(2e-3, 2e-2, cout) if scales is None else np.full(cout, scales[1])
    s_x, s_y = (0.05, 0.3) if scales is None else (scales[0], scales[2])
    b = rng.integers(-(2**14), 2**14, cout) if scales is None else rng.integers(-9, 10, cout)
    if w_range[0] > 0:  # sums past 2^24, cancelled by the bias, with a fine output scale: float32 sums would show
        b, s_y = _cancelling_bias(w.reshape(cout, -1), x_range, x_zero), out_step * s_x * float(s_w.max())
    h, wd = hw
    if padding == "SAME":
        (pt, _, pl, _), out = K.same_padding(h, wd, kh, kw, *stride, *dilation)
    else:
        pt = pl = 0
        out = tuple((n - d * (kn - 1) - 1) // st + 1 for n, kn, st, d in zip(hw, k, stride, dilation))
    opts = {
        "padding": padding,
        "stride_h": stride[0],
        "stride_w": stride[1],
        "fused_activation": act,
        "dilation_h": dilation[0],
        "dilation_w": dilation[1],
    }
    if depthwise:
        opts["depth_multiplier"] = cout // cin
    graph = _single(
        "DEPTHWISE_CONV_2D" if depthwise else "CONV_2D",
        opts,
        _tensor("x", (1, h, wd, cin), s_x, x_zero),
        [
            _tensor("w", w.shape, s_w, 0, w, qdim=3 if depthwise else 0),
            _tensor("b", (cout,), None, data=b.astype(np.int32), dtype="int32"),
        ],
        _tensor("y", (1, *out, cout), s_y, 5),
    )
    return graph, (pt, pl, out)


def _cancelling_bias(w: np.ndarray, x_range: tuple[int, int], x_zero: int) -> np.ndarray:
    """Biases that take the mean of each output's sum away: ``-sum_k w[o, k] * E[x - x_zero]``."""
    return -np.round(w.astype(np.int64).sum(axis=1) * (sum(x_range) / 2 - x_zero)).astype(np.int64)


def _inputs(rng, graph: TFLiteGraph, n: int, x_range: tuple[int, int] | None = None) -> list[np.ndarray]:
    low, high = x_range or (-128, 127)
    shape = graph.tensors[graph.inputs[0]].shape
    return [rng.integers(low, high + 1, shape).astype(np.int8) for _ in range(n)]


CONV_CASES = {
    "same-even-stride2": dict(hw=(8, 8), cin=3, cout=4, k=(3, 3), stride=(2, 2), padding="SAME"),
    "same-even-kernel-odd-input": dict(hw=(9, 7), cin=2, cout=3, k=(4, 4), stride=(2, 2), padding="SAME", act="RELU"),
    "valid-stride3-drops-rows": dict(hw=(10, 11), cin=2, cout=3, k=(3, 3), stride=(3, 3), padding="VALID", act="NONE"),
    "depthwise-multiplier2": dict(hw=(6, 6), cin=3, cout=6, k=(3, 3), stride=(2, 2), padding="SAME", depthwise=True),
    "dilation2": dict(hw=(7, 7), cin=2, cout=2, k=(3, 3), stride=(1, 1), padding="SAME", dilation=(2, 2)),
    # Multiplier 0.5 (every odd sum is a tie, negative ones included) and 0.25 (ties rounded twice).
    "exact-ties-half": dict(
        hw=(5, 5),
        cin=2,
        cout=3,
        k=(3, 3),
        stride=(1, 1),
        padding="SAME",
        act="NONE",
        x_zero=0,
        w_range=(-2, 2),
        scales=(0.5, 0.25, 0.25),
        x_range=(-3, 3),
    ),
    "exact-ties-quarter": dict(
        hw=(5, 5),
        cin=2,
        cout=3,
        k=(3, 3),
        stride=(1, 1),
        padding="SAME",
        act="NONE",
        x_zero=0,
        w_range=(-2, 2),
        scales=(0.5, 0.125, 0.25),
        x_range=(-3, 3),
    ),
    # Inputs and weights near their limits: accumulators near 6e7 take the float64 path.
    "sums-past-2^24": dict(
        hw=(2, 2),
        cin=2048,
        cout=4,
        k=(1, 1),
        stride=(1, 1),
        padding="VALID",
        act="NONE",
        x_zero=-128,
        w_range=(100, 127),
        x_range=(120, 127),
    ),
    # ... and with every input 127: the exact sum cancels to 0, a float32 sum's rounding would show at step 2.
    "sums-past-2^24-cancelled": dict(
        hw=(2, 2),
        cin=2048,
        cout=8,
        k=(1, 1),
        stride=(1, 1),
        padding="VALID",
        act="NONE",
        x_zero=-128,
        w_range=(100, 127),
        x_range=(127, 127),
        out_step=2,
    ),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_against_python_int_reference(case):
    rng = np.random.default_rng(5)
    graph, (pt, pl, out_hw) = _conv_case(rng, **CONV_CASES[case])
    op, t = graph.ops[0], graph.tensors
    s_x, z_x = _q(t[0])
    s_y, z_y = _q(t[-1])
    lo, hi = K.activation_range(op.options["fused_activation"], s_y, z_y)
    w = K.conv_weight(t[1].data, op.op == "DEPTHWISE_CONV_2D").numpy()
    mult, shift = K.conv_multipliers(s_x, t[1].scales, s_y, w.shape[0])
    x = _inputs(rng, graph, 1, CONV_CASES[case].get("x_range"))[0]
    xin = _nchw(x).numpy()
    groups = xin.shape[1] if op.op == "DEPTHWISE_CONV_2D" else 1
    dil = (op.options["dilation_h"], op.options["dilation_w"])
    want = ref_conv(
        xin,
        w,
        t[2].data,
        x_zero=z_x,
        y_zero=z_y,
        mult=mult,
        shift=shift,
        lo=lo,
        hi=hi,
        stride=(op.options["stride_h"], op.options["stride_w"]),
        pad_top=pt,
        pad_left=pl,
        out_hw=out_hw,
        groups=groups,
        dilation=dil,
    )
    got = _nchw(kernel_output(graph, op, {0: x})).numpy()
    assert np.array_equal(got, want)
    if "2^24" in case:  # the sums before the bias pass 2^24 and are odd: float32 could not hold them
        acc = K.int_conv_acc(torch.from_numpy(xin) - z_x, torch.from_numpy(w), None)
        assert int(acc.abs().min()) > 2**24 and int(acc.remainder(2).sum()) > 0


def _synthetic_graphs(rng) -> dict[str, TFLiteGraph]:
    """The other synthetic cases, each as a one-operator graph."""
    graphs = {}
    w = rng.integers(90, 128, (5, 4096)).astype(np.int8)
    graphs["fc-sums-past-2^24"] = _single(
        "FULLY_CONNECTED",
        {"fused_activation": "NONE"},
        _tensor("x", (2, 4096), 0.02, -128),
        [
            _tensor("w", (5, 4096), 0.01, 0, w),
            _tensor("b", (5,), None, data=_cancelling_bias(w, (110, 127), -128).astype(np.int32), dtype="int32"),
        ],
        _tensor("y", (2, 5), 0.02 * 0.01 * 128, -7),
    )
    graphs["fc-no-bias-relu"] = _single(
        "FULLY_CONNECTED",
        {"fused_activation": "RELU"},
        _tensor("x", (3, 40), 0.07, 11),
        [_tensor("w", (6, 40), 0.013, 0, rng.integers(-127, 128, (6, 40)).astype(np.int8)), None],
        _tensor("y", (3, 6), 0.09, -20),
    )
    graphs["fc-relu6-clamp-float32-quotient"] = _single(  # RELU6's top is 8, not 7 (see test_activation_range)
        "FULLY_CONNECTED",
        {"fused_activation": "RELU6"},
        _tensor("x", (4, 16), 0.5, 0),
        [_tensor("w", (8, 16), 0.5, 0, rng.integers(-127, 128, (8, 16)).astype(np.int8)), None],
        _tensor("y", (4, 8), 0.8, 0),
    )
    graphs["avgpool-same-stride2"] = _single(
        "AVERAGE_POOL_2D",
        {"padding": "SAME", "stride_h": 2, "stride_w": 2, "filter_h": 3, "filter_w": 3, "fused_activation": "NONE"},
        _tensor("x", (1, 8, 8, 5), 0.1, -4),
        [],
        _tensor("y", (1, 4, 4, 5), 0.1, -4),
    )
    graphs["avgpool-same-even-window-relu6"] = _single(
        "AVERAGE_POOL_2D",
        {"padding": "SAME", "stride_h": 1, "stride_w": 1, "filter_h": 2, "filter_w": 4, "fused_activation": "RELU6"},
        _tensor("x", (1, 5, 6, 3), 0.05, 10),
        [],
        _tensor("y", (1, 5, 6, 3), 0.05, 10),
    )
    graphs["add-broadcast-relu"] = _single(
        "ADD",
        {"fused_activation": "RELU"},
        _tensor("a", (1, 4, 5, 6), 0.031, -9),
        [_tensor("b", (1, 1, 1, 6), 0.077, 13, rng.integers(-128, 128, (1, 1, 1, 6)).astype(np.int8))],
        _tensor("y", (1, 4, 5, 6), 0.06, -2),
    )
    pairs = np.add.outer(np.arange(-128, 128), np.zeros(256, np.int64))
    graphs["add-every-int8-pair"] = _single(
        "ADD",
        {"fused_activation": "NONE"},
        _tensor("a", (1, 256, 256, 1), 0.0213, 17),
        [_tensor("b", (1, 256, 256, 1), 0.0472, -30, pairs.T.reshape(1, 256, 256, 1).astype(np.int8))],
        _tensor("y", (1, 256, 256, 1), 0.0551, 4),
    )
    graphs["pad"] = _single(
        "PAD",
        {},
        _tensor("x", (1, 3, 4, 2), 0.1, -17),
        [_tensor("p", (4, 2), None, data=np.array([[0, 0], [1, 2], [2, 0], [0, 1]], np.int32), dtype="int32")],
        _tensor("y", (1, 6, 6, 3), 0.1, -17),
    )
    for i, scale in enumerate(np.exp(rng.uniform(math.log(2e-3), math.log(4.0), 10))):
        beta = (1.0, 0.5, 1.7)[i % 3]
        graphs[f"softmax-{i}-scale-{scale:.3g}-beta-{beta}"] = _single(
            "SOFTMAX", {"beta": beta}, _tensor("x", (16, 12), scale, 0), [], _tensor("y", (16, 12), 1 / 256, -128)
        )
    return graphs


def test_avg_pool_add_softmax_against_python_int_reference():
    rng = np.random.default_rng(6)
    graphs = _synthetic_graphs(rng)
    for name in ("avgpool-same-stride2", "avgpool-same-even-window-relu6"):
        graph = graphs[name]
        o, x = graph.ops[0].options, _inputs(rng, graph, 1)[0]
        xin = _nchw(x).numpy()
        (pt, _, pl, _), out_hw = K.same_padding(
            *xin.shape[2:], o["filter_h"], o["filter_w"], o["stride_h"], o["stride_w"]
        )
        lo, hi = K.activation_range(o["fused_activation"], *_q(graph.tensors[-1]))
        want = ref_avg_pool(xin, (o["filter_h"], o["filter_w"]), (o["stride_h"], o["stride_w"]), pt, pl, out_hw, lo, hi)
        assert np.array_equal(_nchw(kernel_output(graph, graph.ops[0], {0: x})).numpy(), want), name
    # ADD on random pairs (every pair goes through TFLM in the single-op test).
    a, b = torch.from_numpy(rng.integers(-128, 128, (2, 3000)))
    p = K.add_params(0.031, -9, 0.077, 13, 0.06, -2)
    got = K.add_int8(a, b, p, -2, 127)
    assert got.tolist() == [ref_add(int(u), int(v), p, -2, 127) for u, v in zip(a, b)]
    # SOFTMAX: a large input scale, so most differences fall below diff_min.
    p = K.softmax_params(0.7, 1.0)
    assert (p.input_left_shift, p.diff_min) == (26, -31)  # frexp(0.7 * 2^26) = (0.7, 26); -floor(31 * 2^26 / 2^26)
    x = torch.from_numpy(rng.integers(-128, 128, (40, 10)))
    x[:5] = torch.tensor([100, 99, 60, 57, 56, 55, 54, 20, -128, 100])  # differences at diff_min and next to it
    got = K.softmax_int8(x, p)
    assert got.tolist() == [ref_softmax_row(row.tolist(), p) for row in x]
    assert int((x - x.max(dim=1, keepdim=True).values < p.diff_min).sum()) > 100


# ---------------------------------------------------------------------------------------------------- (d) TFLM, one op


def test_synthetic_single_op_models_match_tflm():
    rng = np.random.default_rng(7)
    graphs = {f"conv-{k}": _conv_case(rng, **v)[0] for k, v in CONV_CASES.items()}
    graphs.update(_synthetic_graphs(rng))
    ranges = {f"conv-{k}": v.get("x_range") for k, v in CONV_CASES.items()} | {"fc-sums-past-2^24": (110, 127)}
    every_pair = np.add.outer(np.arange(-128, 128), np.zeros(256, np.int64)).reshape(1, 256, 256, 1).astype(np.int8)
    results = {}
    for name, graph in graphs.items():
        inputs = [every_pair] if name == "add-every-int8-pair" else _inputs(rng, graph, 2, ranges.get(name))
        diff, seen = op_differences(write_tflite(graph), graph, inputs)
        results[name] = (sum(diff.values()), sum(seen.values()))
    assert {k: d for k, (d, _) in results.items()} == {k: 0 for k in results}, results
