"""TensorFlow Lite Micro's int8 arithmetic, op by op, in exact integer PyTorch.

Every function here gives the integers TFLM's reference kernels give (the default
build: double rounding, ``TFLITE_SINGLE_ROUNDING`` off), on every CPU. Integer
tensors are ``torch.int64`` (int8 values for activations and weights, int32 values
for biases and accumulators) in fedtiny's NCHW layout; TFLite is NHWC, so callers
transpose (``x.permute(0, 3, 1, 2)``) and reorder filters with :func:`conv_weight`.

Where TFLM relies on int32 behaviour it is emulated: the saturation of
``SaturatingRoundingDoublingHighMul`` at ``INT32_MIN * INT32_MIN``, the saturating
left shifts of gemmlowp's ``Rescale``, and two's-complement wrap-around of the
products and sums C leaves undefined on overflow (``x * (1 << left_shift)``, the
accumulator), which is what compiled TFLM does in practice.

Parameters computed from scales (:func:`quantize_multiplier`, :func:`conv_multipliers`,
:func:`fc_multiplier`, :func:`activation_range`, :func:`add_params`,
:func:`softmax_params`) take scales as TFLite stores them, float32: a Python float is
first rounded to float32, then promoted to double exactly where TFLM promotes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "INT8_MIN",
    "INT8_MAX",
    "INT32_MIN",
    "INT32_MAX",
    "quantize_multiplier",
    "quantize_multipliers",
    "saturating_rounding_doubling_high_mul",
    "rounding_divide_by_pot",
    "multiply_by_quantized_multiplier",
    "conv_multipliers",
    "fc_multiplier",
    "activation_range",
    "conv_weight",
    "same_padding",
    "int_conv_acc",
    "conv_acc",
    "requantize_channels",
    "conv2d_int8",
    "fully_connected_int8",
    "AddParams",
    "add_params",
    "add_int8",
    "avg_pool_int8",
    "SoftmaxParams",
    "softmax_params",
    "exp_on_negative_values",
    "one_over_one_plus_x_for_x_in_0_1",
    "softmax_int8",
    "pad_int8",
]

INT8_MIN, INT8_MAX = -128, 127
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

IntOrTensor = int | torch.Tensor


# --------------------------------------------------------------------------- scalars


def _f32(v: float) -> float:
    """``v`` rounded to float32 (how TFLite stores a scale), as an exact Python float."""
    return float(np.float32(v))


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """``std::round`` on doubles: nearest integer, ties away from zero, exactly (int64).

    ``a - floor(a)`` is exact for doubles, so the tie test is exact; ``floor(a + 0.5)``
    is not (the addition can round up across an integer).
    """
    a = np.abs(v)
    f = np.floor(a)
    n = f.astype(np.int64) + (a - f >= 0.5)
    return np.where(v < 0, -n, n)


def quantize_multipliers(reals: np.ndarray | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """TFLite's ``QuantizeMultiplier`` on each double of ``reals`` (int64 arrays ``mult``, ``shift``).

    ``real = q * 2^shift`` with ``q`` in [0.5, 1) (``frexp``); ``mult = round(q * 2^31)``
    (half away from zero; ``q * 2^31`` is exact). A ``mult`` of ``2^31`` becomes ``2^30``
    with ``shift + 1``; ``shift < -31`` (``|real| < 2^-32`` roughly) flushes to ``(0, 0)``;
    ``real == 0`` gives ``(0, 0)``. So ``real ~= mult * 2^(shift - 31)``.
    """
    reals = np.asarray(reals, dtype=np.float64)
    q, shift = np.frexp(reals)
    mult = _round_half_away(q * float(1 << 31))
    shift = shift.astype(np.int64)
    full = mult == (1 << 31)
    mult = np.where(full, mult // 2, mult)
    shift = np.where(full, shift + 1, shift)
    tiny = shift < -31
    mult = np.where(tiny, 0, mult)
    shift = np.where(tiny, 0, shift)
    return mult.astype(np.int64), shift.astype(np.int64)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite's ``QuantizeMultiplier(double)`` -> ``(mult, shift)``, ``real ~= mult * 2^(shift - 31)``.

    See :func:`quantize_multipliers` for the exact steps.
    """
    mult, shift = quantize_multipliers([float(real)])
    return int(mult[0]), int(shift[0])


def _quantize_smaller_than_one(real: float) -> tuple[int, int]:
    """``QuantizeMultiplierSmallerThanOneExp``: ``QuantizeMultiplier`` for ``0 < real < 1`` (shift <= 0)."""
    if not 0.0 < real < 1.0:
        raise ValueError(f"multiplier must be in (0, 1), got {real!r}")
    return quantize_multiplier(real)


def conv_multipliers(
    input_scale: float,
    filter_scales: np.ndarray | Sequence[float] | float,
    output_scale: float,
    channels: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel ``(mult, shift)`` of CONV_2D / DEPTHWISE_CONV_2D (int64 tensors).

    As ``PopulateConvolutionQuantizationParams``: each float32 scale is promoted to
    double, ``real = (double(s_in) * double(s_w[c])) / double(s_out)`` in double,
    then :func:`quantize_multiplier`. A single filter scale (per-tensor) is repeated
    over ``channels``. TFLM's per-channel FULLY_CONNECTED uses the same formula.
    """
    fs = np.atleast_1d(np.asarray(filter_scales, dtype=np.float32)).astype(np.float64)
    if fs.size == 1 and channels is not None:
        fs = np.repeat(fs, channels)
    reals = (_f32(input_scale) * fs) / _f32(output_scale)
    mult, shift = quantize_multipliers(reals)
    return torch.from_numpy(mult), torch.from_numpy(shift)


def fc_multiplier(input_scale: float, filter_scale: float, output_scale: float) -> tuple[int, int]:
    """Per-tensor FULLY_CONNECTED ``(mult, shift)``, as ``GetQuantizedConvolutionMultipler``.

    Unlike convolutions, the product ``s_in * s_w`` is taken in float32 (one float32
    rounding), then promoted to double and divided by ``double(s_out)``.
    """
    product = float(np.float32(input_scale) * np.float32(filter_scale))
    return quantize_multiplier(product / _f32(output_scale))


def _quantize_float32(value: float, scale: float, zero: int) -> int:
    """``zero + TfLiteRound(float(value) / float(scale))``: a float32 division, rounded half away."""
    q = np.float32(value) / np.float32(scale)
    return int(zero) + int(_round_half_away(np.asarray(float(q)))[()])


def activation_range(activation: str, scale: float, zero: int) -> tuple[int, int]:
    """``CalculateActivationRangeQuantized`` for an int8 output: the clamp ``(lo, hi)``.

    ``NONE``: [-128, 127]. ``RELU``: ``lo = max(-128, q(0))``. ``RELU6``: also
    ``hi = min(127, q(6))``. ``RELU_N1_TO_1``: ``q(-1)``, ``q(1)``. Here
    ``q(f) = zero + round(f / scale)`` with the division in float32 and rounding
    half away from zero.
    """
    act = activation.upper()
    if act == "NONE":
        return INT8_MIN, INT8_MAX
    if act == "RELU":
        return max(INT8_MIN, _quantize_float32(0.0, scale, zero)), INT8_MAX
    if act == "RELU6":
        return max(INT8_MIN, _quantize_float32(0.0, scale, zero)), min(INT8_MAX, _quantize_float32(6.0, scale, zero))
    if act == "RELU_N1_TO_1":
        return (max(INT8_MIN, _quantize_float32(-1.0, scale, zero)), min(INT8_MAX, _quantize_float32(1.0, scale, zero)))
    raise ValueError(f"unsupported fused activation {activation!r}")


# --------------------------------------------------------------------------- int32 fixed point


def _wrap32(x: torch.Tensor) -> torch.Tensor:
    """Two's-complement int32 wrap-around of int64 values (what C's overflowing int32 ops do in practice)."""
    return ((x + 2**31) & 0xFFFFFFFF) - 2**31


def _as_int64(v: IntOrTensor) -> torch.Tensor:
    return v.to(torch.int64) if isinstance(v, torch.Tensor) else torch.tensor(int(v), dtype=torch.int64)


def _pow2(e: IntOrTensor) -> IntOrTensor:
    """``1 << e`` for a Python int or an int64 tensor."""
    if isinstance(e, torch.Tensor):
        return torch.ones_like(e) << e
    return 1 << int(e)


def saturating_rounding_doubling_high_mul(a: torch.Tensor, b: IntOrTensor) -> torch.Tensor:
    """gemmlowp's ``SaturatingRoundingDoublingHighMul`` on int32 values (ARM's VQRDMULH).

    ``p = a * b`` (exact in int64); ``nudge = 2^30`` if ``p >= 0`` else ``1 - 2^30``;
    result ``(p + nudge) / 2^31`` with C's truncating division; the one overflowing
    case ``a == b == INT32_MIN`` gives ``INT32_MAX``.
    """
    b = _as_int64(b)
    p = a * b
    nudge = torch.where(p >= 0, 1 << 30, 1 - (1 << 30))
    r = torch.div(p + nudge, 1 << 31, rounding_mode="trunc")
    overflow = (a == b) & (a == INT32_MIN)
    return torch.where(overflow, INT32_MAX, r)


def rounding_divide_by_pot(x: torch.Tensor, exponent: IntOrTensor) -> torch.Tensor:
    """gemmlowp's ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded to nearest, ties away from zero.

    ``mask = 2^e - 1``; ``remainder = x & mask``; ``threshold = (mask >> 1) + (x < 0)``;
    result ``(x >> e) + (remainder > threshold)`` (arithmetic shift). ``0 <= e <= 31``.
    """
    mask = _pow2(exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> exponent) + (remainder > threshold).to(torch.int64)


def _saturating_shift_left(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """gemmlowp's ``SaturatingRoundingMultiplyByPOT<exponent > 0>``: ``x * 2^exponent`` clamped to int32."""
    return (x * (1 << exponent)).clamp(INT32_MIN, INT32_MAX)


def _per_channel(v: IntOrTensor, x: torch.Tensor) -> IntOrTensor:
    """A 1-D per-channel tensor laid along dim 1 of ``x`` (NCHW); anything else as given."""
    if isinstance(v, torch.Tensor):
        v = v.to(torch.int64)
        if v.dim() == 1 and v.numel() > 1 and x.dim() > 2:
            return v.view(1, -1, *([1] * (x.dim() - 2)))
    return v


def multiply_by_quantized_multiplier(x: torch.Tensor, mult: IntOrTensor, shift: IntOrTensor) -> torch.Tensor:
    """TFLM's ``MultiplyByQuantizedMultiplier(int32 x, mult, shift)``, double-rounding build.

    ``RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x * 2^max(shift, 0), mult),
    max(-shift, 0))``: about ``round(x * mult * 2^(shift - 31))``, rounded twice. The
    product ``x * 2^left_shift`` is an int32 product in C and wraps here as compiled
    TFLM does; it overflows only when ``shift > 0`` and ``|x| >= 2^(31 - shift)``.

    Parameters
    ----------
    x
        int32 values (any integer dtype; computed in int64).
    mult, shift
        Python ints, or int64 tensors broadcastable to ``x``; a 1-D tensor of length
        ``C`` is taken per channel along dim 1 of an NCHW ``x``.
    """
    x = x.to(torch.int64)
    mult, shift = _per_channel(mult, x), _per_channel(shift, x)
    if isinstance(shift, torch.Tensor):
        left, right = shift.clamp(min=0), (-shift).clamp(min=0)
    else:
        left, right = max(int(shift), 0), max(-int(shift), 0)
    shifted = _wrap32(x * _pow2(left))
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, mult), right)


def requantize_channels(x: torch.Tensor, mult: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """:func:`multiply_by_quantized_multiplier` per channel (dim 1 of ``x``), exactly, in float64.

    ``x`` holds int32 values in any dtype; the result holds the same integers as
    :func:`multiply_by_quantized_multiplier` (int64 for an integer ``x``, float64 for a
    floating ``x``). Integer tensors need 64-bit multiplies and variable shifts, which
    AVX2 lacks, so the int64 path runs scalar; float64 computes the same integers
    vectorised, in place, by identities that hold for TFLite's multipliers (``mult >= 0``).
    With ``L = max(shift, 0)``, ``e = max(-shift, 0)`` and ``p = x * 2^L * mult``:

    - ``SaturatingRoundingDoublingHighMul(x 2^L, m) = s = floor(p / 2^31 + 1/2)``: for
      ``p >= 0`` it is the nudged truncating division; for ``p < 0``,
      ``trunc((p + 1 - 2^30) / 2^31) = ceil(...) = floor((p + 2^30) / 2^31)``. It cannot
      saturate (``m >= 0``).
    - ``RoundingDivideByPOT(s, e) = floor((s - [s < 0]) / 2^e + 1/2)`` for ``e >= 1`` (ties
      away from zero), and ``s`` for ``e = 0``; ``-[s < 0] = clamp(s, -1, 0)`` for an integer ``s``.

    Every intermediate is exact in float64 while ``max|x| * max(mult 2^L) < 2^52`` (then
    ``|s| < 2^21`` and ``s / 2^e + 1/2`` spans at most 53 bits for ``e <= 31``) and
    ``x * 2^L`` stays inside int32 (TFLM's product would wrap otherwise); else the general
    integer path runs.
    """
    floating = x.is_floating_point()
    left = shift.clamp(min=0).to(torch.float64)
    e = (-shift).clamp(min=0).to(torch.float64)
    m_left = mult.to(torch.float64) * torch.exp2(left)
    x_max = _abs_max(x)
    if x_max * float(torch.exp2(left.max())) >= 2**31 or x_max * float(m_left.max()) >= 2**52:
        out = multiply_by_quantized_multiplier(
            x.to(torch.int64), mult.view(1, -1, *([1] * (x.dim() - 2))), shift.view(1, -1, *([1] * (x.dim() - 2)))
        )
        return out.to(torch.float64) if floating else out
    view = (1, -1, *([1] * (x.dim() - 2)))
    a = x.to(torch.float64, copy=True)
    half = torch.tensor(0.5, dtype=torch.float64)
    torch.addcmul(half, a, (m_left * 2.0**-31).view(view), out=a)
    a.floor_()  # s
    right = (e > 0).to(torch.float64)
    a.addcmul_(a.clamp(-1, 0), right.view(view))  # s - [s < 0] where e >= 1
    torch.addcmul((0.5 * right).view(view), a, torch.exp2(-e).view(view), out=a)
    a.floor_()
    return a if floating else a.to(torch.int64)


# --------------------------------------------------------------------------- convolution and fully connected


def conv_weight(filter_nhwc: np.ndarray | torch.Tensor, depthwise: bool = False) -> torch.Tensor:
    """A TFLite filter in PyTorch's ``O x I/groups x kh x kw`` layout (int64).

    CONV_2D filters are ``O x kh x kw x I``; DEPTHWISE_CONV_2D filters are
    ``1 x kh x kw x C*M`` (output channel ``c * M + m`` reads input channel ``c``,
    which is PyTorch's grouped convolution with ``groups = C``).
    """
    w = (
        filter_nhwc.to(torch.int64)
        if isinstance(filter_nhwc, torch.Tensor)
        else torch.from_numpy(np.array(filter_nhwc, dtype=np.int64))
    )
    return w.permute(3, 0, 1, 2).contiguous() if depthwise else w.permute(0, 3, 1, 2).contiguous()


def same_padding(
    in_h: int, in_w: int, k_h: int, k_w: int, stride_h: int, stride_w: int, dilation_h: int = 1, dilation_w: int = 1
) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """TFLite's SAME padding: ``((top, bottom, left, right), (out_h, out_w))``.

    ``out = ceil(in / stride)``; ``total = max(0, (out - 1) * stride + (k - 1) * dilation + 1 - in)``;
    the start gets ``total // 2`` and the end the rest (the odd pixel goes at the
    bottom/right). TFLM stores only the start; the end is implied by the output size.
    VALID is ``(0, 0, 0, 0)`` with ``out = (in - eff_k) // stride + 1``.
    """
    pads, outs = [], []
    for n, k, s, d in ((in_h, k_h, stride_h, dilation_h), (in_w, k_w, stride_w, dilation_w)):
        out = (n + s - 1) // s
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        pads += [total // 2, total - total // 2]
        outs.append(out)
    return (pads[0], pads[1], pads[2], pads[3]), (outs[0], outs[1])


def _abs_max(t: torch.Tensor) -> float:
    """``max |t|`` in one pass without a temporary (0 for an empty tensor)."""
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi))


_EXACT_F32 = float(1 << 24)  # float32 holds every integer below this exactly


def int_conv_acc(
    x_centered: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | tuple[int, int] = 1,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    groups: int = 1,
    dilation: int | tuple[int, int] = 1,
) -> torch.Tensor:
    """:func:`conv_acc` as int64."""
    return conv_acc(x_centered, weight, bias, stride, padding, groups, dilation).to(torch.int64)


def conv_acc(
    x_centered: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | tuple[int, int] = 1,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    groups: int = 1,
    dilation: int | tuple[int, int] = 1,
) -> torch.Tensor:
    """The int32 accumulator of an int8 convolution, ``sum w * (x - x_zero) + b``, exactly.

    Returned as float32 or float64 holding the exact int32 values (see Notes); the
    requantization (:func:`requantize_channels`) takes it as it is.

    Parameters
    ----------
    x_centered
        ``N x C x H x W`` integer values ``x - x_zero`` (any dtype).
    weight, bias
        ``O x C/groups x kh x kw`` integers, ``O`` int32 values (or None).
    padding
        ``(top, bottom, left, right)``. Padded taps contribute 0 to the centered sum,
        which is TFLM's skipping of taps outside the image.

    Notes
    -----
    float32 sums of integers are exact in any order, with or without FMA, while every
    partial sum stays below 2^24, so every CPU's vector kernels give the same integers
    when ``max|x| * max_o sum|w[o]| + max|b| < 2^24``; otherwise the bias joins in
    float64 after the sum, or the whole sum runs in float64 (exact below 2^53). That
    needs a convolution that sums products: NNPACK (PyTorch's float32 choice for
    batches of 16 or more when oneDNN is off or absent) uses Winograd/FFT transforms, which are not exact, so it is
    disabled here. The result is wrapped to int32 as TFLM's int32 accumulator would
    be (in practice it never overflows).
    """
    xf, wf = x_centered.float(), weight.float()
    # Every partial sum of one output is a sum of some of its products (and maybe the bias),
    # so it is bounded by max|x| * sum|w[o]| (+ |b[o]|): far tighter than K * max|x| * max|w|.
    w_l1 = float(wf.abs().sum(dim=tuple(range(1, wf.dim()))).max()) if wf.numel() else 0.0
    b_max = 0.0 if bias is None else _abs_max(bias)
    x_bound = _abs_max(xf) * w_l1
    top, bottom, left, right = padding
    if top == bottom and left == right:
        pad = (top, left)  # zero padding of the centered input is TFLM's skipped taps
    else:
        xf, pad = F.pad(xf, (left, right, top, bottom)), 0
    bias_after = x_bound + b_max >= _EXACT_F32  # a wide bias (e.g. saturated) joins in float64
    if x_bound >= _EXACT_F32:
        xf, wf = xf.double(), wf.double()
    bf = None if bias is None or bias_after else bias.to(xf.dtype)
    with torch.backends.nnpack.flags(enabled=False):
        acc = F.conv2d(xf, wf, bf, stride, pad, dilation, groups)
    if bias is not None and bias_after:
        acc = acc.double().add_(bias.double().view(1, -1, *([1] * (acc.dim() - 2))))
    if x_bound + b_max >= 2**31 and _abs_max(acc) >= 2**31:  # an int32 accumulator overflowed: wrap as TFLM's
        acc = _wrap32(acc.to(torch.int64)).to(torch.float64)
    return acc


def _requantize(
    acc: torch.Tensor, mult: IntOrTensor, shift: IntOrTensor, y_zero: int, act_lo: int, act_hi: int
) -> torch.Tensor:
    """``clamp(MultiplyByQuantizedMultiplier(acc, mult, shift) + y_zero, act_lo, act_hi)``."""
    return (multiply_by_quantized_multiplier(acc, mult, shift) + int(y_zero)).clamp(int(act_lo), int(act_hi))


def conv2d_int8(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    x_zero: int,
    y_zero: int,
    mult: IntOrTensor,
    shift: IntOrTensor,
    act_lo: int,
    act_hi: int,
    stride: int | tuple[int, int] = 1,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    groups: int = 1,
    dilation: int | tuple[int, int] = 1,
) -> torch.Tensor:
    """CONV_2D / DEPTHWISE_CONV_2D on int8 (TFLM's ``ConvPerChannel`` / ``DepthwiseConvPerChannel``).

    ``acc = sum w * (x - x_zero) + b`` (int32), then
    ``y = clamp(MultiplyByQuantizedMultiplier(acc, mult[o], shift[o]) + y_zero, act_lo, act_hi)``.
    A depthwise convolution is ``groups = C`` with the weight from
    ``conv_weight(filter, depthwise=True)``: any depth multiplier ``M`` (``O = C * M``);
    a grouped CONV_2D is ``groups = C / filter_in``; dilation as TFLite's. The filter
    zero point is 0 (TFLM requires it). Returns int8 values in an int64 tensor.
    """
    acc = int_conv_acc(x.to(torch.int64) - int(x_zero), weight, bias, stride, padding, groups, dilation)
    return _requantize(acc, mult, shift, y_zero, act_lo, act_hi)


def fully_connected_int8(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    x_zero: int,
    w_zero: int = 0,
    y_zero: int,
    mult: IntOrTensor,
    shift: IntOrTensor,
    act_lo: int,
    act_hi: int,
) -> torch.Tensor:
    """FULLY_CONNECTED on int8: ``x`` is ``N x K``, ``weight`` ``O x K`` (TFLite's layout), bias ``O``.

    ``acc[n, o] = sum_k (w[o, k] - w_zero) * (x[n, k] - x_zero) + b[o]`` (int32, exact as in
    :func:`int_conv_acc`), then requantized and clamped as a convolution. ``mult``/``shift``
    are ints (per-tensor, :func:`fc_multiplier`) or length-``O`` tensors (per-channel,
    :func:`conv_multipliers`). TFLM flattens any input to ``N = size / K`` rows.
    """
    n, k = x.shape
    xc = (x.to(torch.int64) - int(x_zero)).view(n, k, 1, 1)
    w = (weight.to(torch.int64) - int(w_zero)).view(weight.shape[0], k, 1, 1)
    acc = int_conv_acc(xc, w, bias).view(n, -1)
    return _requantize(acc, mult, shift, y_zero, act_lo, act_hi)


# --------------------------------------------------------------------------- add


@dataclass(frozen=True)
class AddParams:
    """TFLM's int8 ADD parameters (``CalculateOpDataAdd``): ``shift`` values are <= 0."""

    z1: int
    z2: int
    z_out: int
    left_shift: int
    mult1: int
    shift1: int
    mult2: int
    shift2: int
    mult_out: int
    shift_out: int


def add_params(s1: float, z1: int, s2: float, z2: int, s_out: float, z_out: int) -> AddParams:
    """int8 ADD parameters as TFLM micro's ``CalculateOpDataAdd``.

    ``left_shift = 20``; ``twice_max = 2 * double(max(s1, s2))`` (max of the float32
    scales); ``real_i = double(s_i) / twice_max``;
    ``real_out = twice_max / (2^20 * double(s_out))``; each through
    ``QuantizeMultiplierSmallerThanOneExp`` (requires ``0 < real < 1``).
    """
    f1, f2, fo = _f32(s1), _f32(s2), _f32(s_out)
    left_shift = 20
    twice_max = 2.0 * max(f1, f2)
    m1, sh1 = _quantize_smaller_than_one(f1 / twice_max)
    m2, sh2 = _quantize_smaller_than_one(f2 / twice_max)
    mo, sho = _quantize_smaller_than_one(twice_max / ((1 << left_shift) * fo))
    return AddParams(int(z1), int(z2), int(z_out), left_shift, m1, sh1, m2, sh2, mo, sho)


def add_int8(
    a: torch.Tensor, b: torch.Tensor, p: AddParams, act_lo: int = INT8_MIN, act_hi: int = INT8_MAX
) -> torch.Tensor:
    """int8 ADD (TFLM's ``AddFunc``), broadcasting as torch does.

    ``a' = MBQM((a - z1) * 2^20, mult1, shift1)``, likewise ``b'``;
    ``y = clamp(MBQM(a' + b', mult_out, shift_out) + z_out, act_lo, act_hi)``, where
    ``MBQM`` with ``shift <= 0`` is ``RoundingDivideByPOT(SRDHM(x, mult), -shift)``.
    """
    one = multiply_by_quantized_multiplier((a.to(torch.int64) - p.z1) << p.left_shift, p.mult1, p.shift1)
    two = multiply_by_quantized_multiplier((b.to(torch.int64) - p.z2) << p.left_shift, p.mult2, p.shift2)
    return _requantize(one + two, p.mult_out, p.shift_out, p.z_out, act_lo, act_hi)


# --------------------------------------------------------------------------- average pool


def avg_pool_int8(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    act_lo: int = INT8_MIN,
    act_hi: int = INT8_MAX,
) -> torch.Tensor:
    """AVERAGE_POOL_2D on int8 (TFLM's reference ``AveragePool``); output scale and zero = input's.

    For each window: ``s`` = sum of the raw int8 values inside the image (padded taps
    are skipped, not counted), ``c`` = their count; ``y = (s + c/2) / c`` if ``s > 0``
    else ``(s - c/2) / c`` with C's truncating division (round half away from zero);
    then clamped to ``[act_lo, act_hi]``.
    """
    top, bottom, left, right = padding
    xd = F.pad(x.to(torch.float64), (left, right, top, bottom))
    ones = F.pad(torch.ones_like(x[:1, :1], dtype=torch.float64), (left, right, top, bottom))
    s = F.avg_pool2d(xd, kernel, stride, divisor_override=1).to(torch.int64)  # float64 sums of int8: exact
    c = F.avg_pool2d(ones, kernel, stride, divisor_override=1).to(torch.int64)
    if bool((c == 0).any()):
        raise ValueError("an average-pool window lies wholly in the padding")
    half = c // 2
    y = torch.div(torch.where(s > 0, s + half, s - half), c, rounding_mode="trunc")
    return y.clamp(int(act_lo), int(act_hi))


# --------------------------------------------------------------------------- softmax

_SCALED_DIFF_INTEGER_BITS = 5  # exp's input is Q5.26
_ACCUMULATION_INTEGER_BITS = 12  # the sum of exps is Q12.19


@dataclass(frozen=True)
class SoftmaxParams:
    """TFLM's int8 softmax parameters: ``input_multiplier``, ``input_left_shift`` (>= 0), ``diff_min`` (<= 0)."""

    input_multiplier: int
    input_left_shift: int
    diff_min: int


def softmax_params(input_scale: float, beta: float = 1.0) -> SoftmaxParams:
    """int8 softmax parameters as ``CalculateSoftmaxParams`` (``kScaledDiffIntegerBits = 5``).

    ``PreprocessSoftmaxScaling``: ``real = min(double(beta) * double(s_in) * 2^26, 2^31 - 1)``
    (float32 beta and scale, product in double), then ``QuantizeMultiplierGreaterThanOne``
    (``real > 1``, shift >= 0). ``CalculateInputRadius(5, shift)``:
    ``diff_min = -floor((2^5 - 1) * 2^26 / 2^shift)``; input differences below it give 0.
    """
    bits = _SCALED_DIFF_INTEGER_BITS
    real = min(_f32(beta) * _f32(input_scale) * float(1 << (31 - bits)), float((1 << 31) - 1))
    if not real > 1.0:
        raise ValueError(f"softmax input multiplier must exceed 1, got {real!r}")
    mult, shift = quantize_multiplier(real)
    radius = math.floor(1.0 * ((1 << bits) - 1) * float(1 << (31 - bits)) / float(1 << shift))
    return SoftmaxParams(mult, shift, -int(radius))


def _exp_on_interval_between_negative_one_quarter_and_0_excl(a: torch.Tensor) -> torch.Tensor:
    """gemmlowp: ``exp(a)`` for Q0.31 ``a`` in [-1/4, 0), by a 4th-order Taylor series around -1/8."""
    srdhm = saturating_rounding_doubling_high_mul
    exp_minus_one_eighth, one_third = 1895147668, 715827883
    x = a + (1 << 28)  # a + 1/8
    x2 = srdhm(x, x)
    x3 = srdhm(x2, x)
    x4 = srdhm(x2, x2)
    x4_over_4 = rounding_divide_by_pot(x4, 2)
    poly = rounding_divide_by_pot(srdhm(x4_over_4 + x3, one_third) + x2, 1)  # x^4/24 + x^3/6 + x^2/2
    return exp_minus_one_eighth + srdhm(x + poly, exp_minus_one_eighth)


# exp(-2^e) in Q0.31 for the bits of the input at 2^e, e = -2 .. 4 (gemmlowp's barrel shifter).
_EXP_BARREL = ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308), (2, 39332535), (3, 720401), (4, 242))


def exp_on_negative_values(a: torch.Tensor, integer_bits: int = _SCALED_DIFF_INTEGER_BITS) -> torch.Tensor:
    """gemmlowp's ``exp_on_negative_values`` for a Q``integer_bits`` int32 input ``a <= 0``: Q0.31 output.

    ``a = -(n/4 + r)`` is split into its fraction of a quarter, whose exp comes from
    the Taylor series on [-1/4, 0) (after a saturating shift to Q0.31), and its bits
    at 2^-2 .. 2^4, each multiplying by the Q0.31 constant ``exp(-2^e)`` (SRDHM) when
    set. For ``integer_bits > 5`` inputs below -32 give 0; ``a == 0`` gives
    ``INT32_MAX`` (gemmlowp's Q0.31 one).
    """
    frac_bits = 31 - integer_bits
    quarter = 1 << (frac_bits - 2)
    a_mod_quarter_minus_quarter = (a & (quarter - 1)) - quarter
    result = _exp_on_interval_between_negative_one_quarter_and_0_excl(
        _saturating_shift_left(a_mod_quarter_minus_quarter, integer_bits)
    )
    remainder = a_mod_quarter_minus_quarter - a
    for exponent, multiplier in _EXP_BARREL:
        if integer_bits > exponent:
            bit = (remainder & (1 << (frac_bits + exponent))) != 0
            result = torch.where(bit, saturating_rounding_doubling_high_mul(result, multiplier), result)
    if integer_bits > 5:
        result = torch.where(a < -(1 << (36 - integer_bits)), 0, result)
    return torch.where(a == 0, INT32_MAX, result)


def one_over_one_plus_x_for_x_in_0_1(a: torch.Tensor) -> torch.Tensor:
    """gemmlowp's ``1 / (1 + a)`` for Q0.31 ``a`` in [0, 1): Q0.31 output.

    ``d = RoundingHalfSum(a, INT32_MAX)`` (= (1 + a) / 2, rounded half away from zero);
    Newton-Raphson in Q2.29 from ``x = 48/17 - 32/17 * d``, three times
    ``x += Rescale<2>(x * (1 - d * x))`` (Rescale: saturating shift left by 2); the
    result ``x / 2`` is rescaled to Q0.31 by a saturating shift left by 1.
    """
    srdhm = saturating_rounding_doubling_high_mul
    total = a + INT32_MAX
    d = torch.div(total + torch.where(total >= 0, 1, -1), 2, rounding_mode="trunc")
    one_q2 = 1 << 29
    x = 1515870810 + srdhm(d, -1010580540)  # 48/17 + d * (-32/17), Q2.29
    for _ in range(3):
        x = x + _saturating_shift_left(srdhm(x, one_q2 - srdhm(d, x)), 2)
    return _saturating_shift_left(x, 1)


def _reciprocal(x: torch.Tensor, integer_digits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TFLite's ``GetReciprocal`` for positive int32 ``x`` in Q``integer_digits``: ``(scale Q0.31, bits_over_unit)``.

    ``h = clz32(x)``; ``bits_over_unit = integer_digits - h``; the normalized
    ``x << h`` in [2^31, 2^32) minus 2^31 goes through ``1 / (1 + .)``.
    """
    bit_length = torch.frexp(x.to(torch.float64)).exponent.to(torch.int64)  # exact: x < 2^53
    headroom = 32 - bit_length
    shifted_minus_one = (x << headroom) - (1 << 31)
    return one_over_one_plus_x_for_x_in_0_1(shifted_minus_one), integer_digits - headroom


def softmax_int8(x: torch.Tensor, p: SoftmaxParams, out_zero: int = INT8_MIN) -> torch.Tensor:
    """int8 SOFTMAX over the last dim, as TFLM's reference int8 softmax (output scale 1/256).

    Per row: ``d = x - max(x)``; entries with ``d < diff_min`` give ``out_zero``; the
    others ``e = exp_on_negative_values(SRDHM(d * 2^input_left_shift, input_multiplier))``
    (Q5.26 in, Q0.31 out). ``S = sum RoundingDivideByPOT(e, 12)`` (Q12.19);
    ``(r, bits) = GetReciprocal(S, 12)``; ``y = RoundingDivideByPOT(SRDHM(r, e), bits + 23)
    + out_zero`` clamped to [-128, 127]. TFLM requires ``out_zero = -128`` (it adds
    ``INT8_MIN``) and output scale 1/256.
    """
    x = x.to(torch.int64)
    diff = x - x.max(dim=-1, keepdim=True).values
    keep = diff >= p.diff_min
    scaled = saturating_rounding_doubling_high_mul(_wrap32(diff << p.input_left_shift), p.input_multiplier)
    e = exp_on_negative_values(torch.where(keep, scaled, 0))
    # Rescale<12> of a Q0.31 value to Q12.19 is a rounding division by 2^12.
    total = _wrap32(
        torch.where(keep, rounding_divide_by_pot(e, _ACCUMULATION_INTEGER_BITS), 0).sum(dim=-1, keepdim=True)
    )
    recip, bits_over_unit = _reciprocal(total, _ACCUMULATION_INTEGER_BITS)
    exponent = bits_over_unit + 31 - 8
    y = rounding_divide_by_pot(saturating_rounding_doubling_high_mul(recip, e), exponent) + int(out_zero)
    return torch.where(keep, y.clamp(INT8_MIN, INT8_MAX), int(out_zero))


# --------------------------------------------------------------------------- pad


def pad_int8(x: torch.Tensor, paddings: Sequence[tuple[int, int]], value: int) -> torch.Tensor:
    """PAD on int8: ``paddings`` holds ``(before, after)`` for each dim of ``x`` in its own order.

    TFLM pads with the constant-values input when the op has one, else with the
    output zero point (PAD keeps the input's scale and zero point); pass that as ``value``.
    """
    flat: list[int] = []
    for before, after in reversed(list(paddings)):
        flat += [int(before), int(after)]
    return F.pad(x.to(torch.int64), flat, value=int(value))
