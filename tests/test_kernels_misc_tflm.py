"""fedtiny.int8.kernels_misc against TensorFlow Lite Micro's reference kernels: 0 differing elements.

Each test builds one-op ``.tflite`` models in memory with fedtiny's writer, runs 32 random samples
through the real TFLM interpreter (the ``tflite-micro`` package) and through the kernel, for several
quantizations, and counts the differing output elements. A small runner here sets every graph input
(:func:`fedtiny.int8.oracle.tflm_invoke` sets input 0 only, and MUL and CONCATENATION take two).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtiny.int8 import tflite as tfl
from fedtiny.int8.kernels import activation_range, same_padding
from fedtiny.int8.kernels_misc import (
    concatenation_int8,
    dequantize,
    max_pool_int8,
    mean_int8,
    mean_params,
    mul_int8,
    mul_params,
    quantize_float,
    quantize_int8,
    strided_slice_int8,
)
from fedtiny.int8.tflite import OpDesc, TensorDesc, TFLiteGraph, write_tflite

SAMPLES = 32


# --------------------------------------------------------------------------- helpers


def _q(name: str, shape, scale: float, zero: int, dtype: str = "int8") -> TensorDesc:
    return TensorDesc(name, tuple(shape), dtype, np.array([scale], np.float32), np.array([zero], np.int64))


def _const(name: str, values) -> TensorDesc:
    data = np.asarray(values, np.int32)
    return TensorDesc(name, data.shape, "int32", None, None, 0, data)


def _model(tensors, op: str, inputs, outputs, options: dict) -> bytes:
    graph_inputs = tuple(i for i in inputs if tensors[i].data is None)
    return write_tflite(
        TFLiteGraph(list(tensors), [OpDesc(op, tuple(inputs), tuple(outputs), options)], graph_inputs, tuple(outputs))
    )


def _tflm_run(model: bytes, *xs: np.ndarray) -> np.ndarray:
    """TFLM's output 0 for each sample: ``xs[i][k]`` (batch dimension included) feeds graph input ``i``."""
    from tflite_micro import runtime

    interpreter = runtime.Interpreter.from_bytes(
        model, arena_size=1 << 20, intrepreter_config=runtime.InterpreterConfig.kAllocationRecording
    )
    out = []
    for k in range(len(xs[0])):
        for i, x in enumerate(xs):
            interpreter.set_input(x[k], i)
        interpreter.invoke()
        out.append(interpreter.get_output(0).copy())
    return np.stack(out)


def _int8(shape, seed: int) -> np.ndarray:
    """``SAMPLES`` random int8 samples, each of TFLite shape ``shape`` (batch 1 included)."""
    return np.random.default_rng(seed).integers(-128, 128, (SAMPLES, *shape), dtype=np.int8)


def _nchw(x: np.ndarray) -> torch.Tensor:
    """Stacked NHWC samples ``S x 1 x H x W x C`` as one NCHW batch ``S x C x H x W`` (int64)."""
    return torch.from_numpy(x.astype(np.int64)).squeeze(1).permute(0, 3, 1, 2)


def _batch(x: np.ndarray) -> torch.Tensor:
    """Stacked samples ``S x 1 x ...`` of any rank as one batch ``S x ...`` (int64), in TFLite order."""
    return torch.from_numpy(x.astype(np.int64)).squeeze(1)


def _as_tflm(y: torch.Tensor, want: np.ndarray) -> np.ndarray:
    """Our batch result in TFLM's stacked layout: NCHW -> NHWC for 4-D, then ``S x 1 x ...``."""
    if y.dim() == 4:
        y = y.permute(0, 2, 3, 1)
    return y.numpy().reshape(want.shape)


def _differences(ours: torch.Tensor, want: np.ndarray) -> int:
    got = _as_tflm(ours, want)
    assert got.size == want.size > 0
    return int((got.astype(np.int64) != want.astype(np.int64)).sum())


# --------------------------------------------------------------------------- MUL

# (a scale, a zero, b scale, b zero, y scale, y zero, activation): real multipliers from ~1e-4 to 12.5 (shift > 0)
MUL_QUANT = [
    (0.02, -3, 0.015, 7, 0.05, 2, "NONE"),
    (0.5, 0, 0.25, -128, 0.01, -5, "NONE"),
    (0.0078125, 127, 0.0039, -128, 0.9, 0, "RELU"),
    (0.1, 10, 0.1, -10, 0.3, -128, "RELU6"),
]
# TFLite shapes of a and b: same shape, squeeze-and-excitation (b broadcast over H, W) and the other way round
MUL_SHAPES = [((1, 5, 6, 8), (1, 5, 6, 8)), ((1, 5, 6, 8), (1, 1, 1, 8)), ((1, 1, 1, 8), (1, 5, 6, 8))]


@pytest.mark.parametrize("sa,za,sb,zb,sy,zy,act", MUL_QUANT)
def test_mul_equals_tflm(sa, za, sb, zb, sy, zy, act):
    p = mul_params(sa, za, sb, zb, sy, zy)
    lo, hi = activation_range(act, sy, zy)
    for k, (shape_a, shape_b) in enumerate(MUL_SHAPES):
        shape_y = tuple(np.broadcast_shapes(shape_a, shape_b))
        tensors = [_q("a", shape_a, sa, za), _q("b", shape_b, sb, zb), _q("y", shape_y, sy, zy)]
        model = _model(tensors, "MUL", (0, 1), (2,), {"fused_activation": act})
        a, b = _int8(shape_a, 10 + k), _int8(shape_b, 20 + k)
        want = _tflm_run(model, a, b)
        assert _differences(mul_int8(_nchw(a), _nchw(b), p, lo, hi), want) == 0, (shape_a, shape_b)


# --------------------------------------------------------------------------- MEAN

# (x scale, x zero, y scale, y zero): equal quantization, and y scale below / above x's
MEAN_QUANT = [(0.05, 3, 0.05, 3), (0.05, -128, 0.02, 10), (0.013, 40, 0.11, -7), (1.0, 0, 0.001, 0)]
# (TFLite input shape, axes, keep_dims): counts 42 (not a power of two), 16, 7, 8
MEAN_CASES = [
    ((1, 6, 7, 8), (1, 2), True),
    ((1, 6, 7, 8), (1, 2), False),
    ((1, 4, 4, 8), (2, 1), False),
    ((1, 6, 7, 8), (2,), True),
    ((1, 6, 7, 8), (-1,), False),
]


@pytest.mark.parametrize("sx,zx,sy,zy", MEAN_QUANT)
def test_mean_equals_tflm(monkeypatch, sx, zx, sy, zy):
    # fedtiny's writer names MEAN's options table "MeanOptions"; the schema's is ReducerOptions.
    monkeypatch.setitem(tfl._OPTION_TABLES, "MEAN", "ReducerOptions")
    for k, (shape, axes, keep) in enumerate(MEAN_CASES):
        resolved = {a % 4 for a in axes}
        out_shape = tuple(1 if i in resolved else s for i, s in enumerate(shape) if keep or i not in resolved)
        count = int(np.prod([shape[a] for a in resolved]))
        tensors = [_q("x", shape, sx, zx), _const("axes", axes), _q("y", out_shape, sy, zy)]
        model = _model(tensors, "MEAN", (0, 1), (2,), {"keep_dims": keep})
        x = _int8(shape, 30 + k)
        want = _tflm_run(model, x)
        ours = mean_int8(_nchw(x), axes, keep, mean_params(sx, zx, sy, zy, count))
        assert _differences(ours, want) == 0, (shape, axes, keep)


# --------------------------------------------------------------------------- QUANTIZE / DEQUANTIZE

# (in scale, in zero, out scale, out zero): equal scales, ratios below and above 1
REQUANT = [(0.05, 0, 0.05, 17), (0.05, -128, 0.02, 3), (0.02, 5, 0.07, -100), (1.5, 0, 0.003, -1)]


@pytest.mark.parametrize("si,zi,so,zo", REQUANT)
def test_quantize_int8_to_int8_equals_tflm(si, zi, so, zo):
    shape = (1, 4, 5, 6)
    model = _model([_q("x", shape, si, zi), _q("y", shape, so, zo)], "QUANTIZE", (0,), (1,), {})
    x = _int8(shape, 40)
    want = _tflm_run(model, x)
    assert _differences(quantize_int8(_nchw(x), si, zi, so, zo), want) == 0


def _floats(scale: float, seed: int) -> np.ndarray:
    """``SAMPLES x 1 x 64`` float32: ordinary values, exact ties of half a step, and the edges of float32."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((SAMPLES, 1, 64)) * 100 * scale).astype(np.float32)
    ties = ((rng.integers(-140, 140, (SAMPLES, 1, 16)) + 0.5) * scale).astype(np.float32)
    x[..., :16] = ties
    edges = np.array(
        [
            0.0,
            -0.0,
            np.inf,
            -np.inf,
            np.nan,
            3e38,
            -3e38,
            1e-40,
            -1e-40,
            2.0**31 * scale,
            -(2.0**31) * scale,
            2.0**30 * scale,
        ],
        np.float32,
    )
    x[0, 0, 16 : 16 + len(edges)] = edges
    return x


@pytest.mark.parametrize("scale,zero", [(0.25, 0), (0.0123, -7), (0.37, 100), (1e-3, -128), (0.5, 127)])
def test_quantize_float_to_int8_equals_tflm(scale, zero):
    model = _model(
        [TensorDesc("x", (1, 64), "float32", None, None), _q("y", (1, 64), scale, zero)], "QUANTIZE", (0,), (1,), {}
    )
    x = _floats(scale, 50)
    want = _tflm_run(model, x)
    assert _differences(quantize_float(torch.from_numpy(x[:, 0]), scale, zero), want) == 0


@pytest.mark.parametrize("scale,zero", [(0.05, 0), (0.0123, -7), (3.3e-5, 127), (17.0, -128)])
def test_dequantize_equals_tflm_bit_for_bit(scale, zero):
    shape = (1, 4, 5, 6)
    model = _model(
        [_q("x", shape, scale, zero), TensorDesc("y", shape, "float32", None, None)], "DEQUANTIZE", (0,), (1,), {}
    )
    x = _int8(shape, 60)
    want = _tflm_run(model, x)
    assert want.dtype == np.float32
    got = _as_tflm(dequantize(_nchw(x), scale, zero), want)
    assert got.dtype == np.float32
    assert int((got.view(np.uint32) != want.view(np.uint32)).sum()) == 0


# --------------------------------------------------------------------------- MAX_POOL_2D

# (kernel, stride, padding, activation, scale, zero)
POOLS = [
    (3, 2, "SAME", "NONE", 0.05, 0),
    (2, 2, "VALID", "NONE", 0.05, 0),
    (3, 1, "SAME", "RELU", 0.02, -20),
    (3, 2, "VALID", "RELU6", 0.03, -128),
    ((2, 3), (1, 2), "SAME", "RELU_N1_TO_1", 0.01, 5),
]


@pytest.mark.parametrize("kernel,stride,padding,act,scale,zero", POOLS)
def test_max_pool_equals_tflm(kernel, stride, padding, act, scale, zero):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    n, h, w, c = 1, 9, 10, 4
    if padding == "SAME":
        pads, (oh, ow) = same_padding(h, w, kh, kw, sh, sw)
    else:
        pads, (oh, ow) = (0, 0, 0, 0), ((h - kh) // sh + 1, (w - kw) // sw + 1)
    tensors = [_q("x", (n, h, w, c), scale, zero), _q("y", (n, oh, ow, c), scale, zero)]
    model = _model(
        tensors,
        "MAX_POOL_2D",
        (0,),
        (1,),
        {"padding": padding, "stride_h": sh, "stride_w": sw, "filter_h": kh, "filter_w": kw, "fused_activation": act},
    )
    x = _int8((n, h, w, c), 70)
    want = _tflm_run(model, x)
    lo, hi = activation_range(act, scale, zero)
    assert _differences(max_pool_int8(_nchw(x), (kh, kw), (sh, sw), pads, lo, hi), want) == 0


# --------------------------------------------------------------------------- CONCATENATION


@pytest.mark.parametrize("axis", [3, -1, 1, 2])
def test_concatenation_equals_tflm(axis):
    scale, zero = 0.04, -9
    base = (1, 4, 5, 3)
    a_shape = base
    b_shape = tuple(6 if i == axis % 4 else s for i, s in enumerate(base))
    y_shape = tuple(a + b if i == axis % 4 else a for i, (a, b) in enumerate(zip(a_shape, b_shape)))
    tensors = [_q("a", a_shape, scale, zero), _q("b", b_shape, scale, zero), _q("y", y_shape, scale, zero)]
    model = _model(tensors, "CONCATENATION", (0, 1), (2,), {"axis": axis, "fused_activation": "NONE"})
    a, b = _int8(a_shape, 80), _int8(b_shape, 81)
    want = _tflm_run(model, a, b)
    nchw_axis = (0, 2, 3, 1)[axis % 4]
    ours = concatenation_int8([_nchw(a), _nchw(b)], nchw_axis, [(scale, zero), (scale, zero)], scale, zero)
    assert _differences(ours, want) == 0


@pytest.mark.parametrize("b_scale,b_zero", [(0.041, -9), (0.04, -8)])
def test_concatenation_of_differing_quantization_is_refused_as_tflm_refuses_it(b_scale, b_zero):
    shape, y_shape = (1, 2, 2, 3), (1, 2, 2, 6)
    tensors = [_q("a", shape, 0.04, -9), _q("b", shape, b_scale, b_zero), _q("y", y_shape, 0.04, -9)]
    model = _model(tensors, "CONCATENATION", (0, 1), (2,), {"axis": 3, "fused_activation": "NONE"})
    with pytest.raises(RuntimeError):  # TFLM's Prepare fails (TF_LITE_ENSURE_EQ on scale or zero point)
        _tflm_run(model, _int8(shape, 1), _int8(shape, 2))
    x = torch.zeros(1, 3, 2, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="CONCATENATION input 1 .* requires them equal"):
        concatenation_int8([x, x], 1, [(0.04, -9), (b_scale, b_zero)], 0.04, -9)


# --------------------------------------------------------------------------- STRIDED_SLICE

# (begin, end, strides, begin_mask, end_mask, shrink_axis_mask) on a 1 x 8 x 9 x 6 NHWC input
SLICES = [
    ((0, 1, 2, 0), (1, 7, 9, 6), (1, 2, 3, 1), 0, 0, 0),
    ((0, 5, 0, 1), (0, 0, 4, 0), (1, 1, 2, 2), 0b0001, 0b1011, 0),
    ((0, -3, -7, -4), (1, -1, 100, -1), (1, 1, 2, 1), 0, 0, 0),
    ((0, 2, 3, 0), (1, 3, 4, 6), (1, 1, 1, 1), 0, 0, 0b0110),
    ((0, -1, 0, 2), (1, 0, 9, 3), (1, 1, 1, 1), 0, 0, 0b1010),
    ((0, 6, 8, 5), (1, 0, 0, 0), (1, -2, -3, -1), 0, 0b1000, 0),
    ((0, 0, 0, 0), (0, 0, 0, 0), (1, -1, 1, -2), 0b1111, 0b1111, 0),
]


@pytest.mark.parametrize("begin,end,strides,begin_mask,end_mask,shrink", SLICES)
def test_strided_slice_equals_tflm(begin, end, strides, begin_mask, end_mask, shrink):
    shape = (1, 8, 9, 6)
    scale, zero = 0.07, 11
    x = _int8(shape, 90)
    # the slice's batch axis is the sample's own batch of 1: run ours per sample, in TFLite's order
    ours = []
    for k in range(SAMPLES):
        y = strided_slice_int8(_nchw(x[k : k + 1]), begin, end, strides, begin_mask, end_mask, shrink)
        ours.append((y.permute(0, 2, 3, 1) if y.dim() == 4 else y).numpy())
    tensors = [
        _q("x", shape, scale, zero),
        _const("begin", begin),
        _const("end", end),
        _const("strides", strides),
        _q("y", ours[0].shape, scale, zero),
    ]
    model = _model(
        tensors,
        "STRIDED_SLICE",
        (0, 1, 2, 3),
        (4,),
        {"begin_mask": begin_mask, "end_mask": end_mask, "shrink_axis_mask": shrink},
    )
    want = _tflm_run(model, x)
    got = np.stack(ours)
    assert got.shape == want.shape and got.size > 0
    assert int((got != want).sum()) == 0
