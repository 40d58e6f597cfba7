"""TensorFlow Lite Micro's int8 MUL, MEAN, QUANTIZE, DEQUANTIZE, MAX_POOL_2D, CONCATENATION and STRIDED_SLICE.

Each function gives exactly what TFLM's reference kernel gives (the default build: double
rounding, ``TFLITE_SINGLE_ROUNDING`` off), as :mod:`fedtiny.int8.kernels` does for the original
operators and with its fixed-point primitives. Integer tensors are ``torch.int64`` holding int8
values; 4-D tensors are in fedtiny's NCHW layout (TFLite is NHWC), so every axis, mask or index
argument that TFLite gives per NHWC dimension is documented with its mapping.

Where TFLM precomputes in Prepare (from the float32 scales of the tensors), a ``*_params``
function does the same from the scales as TFLite stores them: a Python float is first rounded to
float32, then promoted to double exactly where TFLM promotes it. Prepare-time refusals (equal
scales demanded, too many inputs, zero strides) raise ``ValueError`` naming the condition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedtiny.int8.kernels import INT8_MAX, INT8_MIN, INT32_MIN, multiply_by_quantized_multiplier, quantize_multiplier

__all__ = [
    "MulParams",
    "mul_params",
    "mul_int8",
    "MeanParams",
    "mean_params",
    "mean_int8",
    "quantize_int8",
    "quantize_float",
    "dequantize",
    "max_pool_int8",
    "concatenation_int8",
    "strided_slice_int8",
    "NHWC_TO_NCHW",
]

# TFLite's NHWC axis -> fedtiny's NCHW dim, for 4-D tensors.
NHWC_TO_NCHW = (0, 2, 3, 1)
_CONCAT_MAX_INPUTS = 10  # TFLM's kMaxInputNum in concatenation.cc
_STRIDED_SLICE_MAX_DIMS = 4  # TFLM's kMaxDim in strided_slice_common.cc


def _f32(v: float) -> float:
    """``v`` rounded to float32 (how TFLite stores a scale), as an exact Python float (a double)."""
    return float(np.float32(v))


def _wrap32(x: torch.Tensor) -> torch.Tensor:
    """Two's-complement int32 wrap-around of int64 values (what C's overflowing int32 arithmetic does in practice)."""
    return ((x + 2**31) & 0xFFFFFFFF) - 2**31


def _to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """A 4-D NCHW tensor in TFLite's NHWC order; other ranks are already in TFLite's order."""
    return x.permute(0, 2, 3, 1) if x.dim() == 4 else x


def _from_nhwc(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_to_nhwc` for a 4-D result; other ranks stay in TFLite's order."""
    return y.permute(0, 3, 1, 2) if y.dim() == 4 else y


# --------------------------------------------------------------------------- MUL


@dataclass(frozen=True)
class MulParams:
    """TFLM's int8 MUL parameters (``CalculateOpDataMul``): ``real ~= mult * 2^(shift - 31)``, any sign of shift."""

    a_zero: int
    b_zero: int
    y_zero: int
    mult: int
    shift: int


def mul_params(a_scale: float, a_zero: int, b_scale: float, b_zero: int, y_scale: float, y_zero: int) -> MulParams:
    """int8 MUL parameters as TFLM's ``CalculateOpDataMul``.

    ``real = double(s_a) * double(s_b) / double(s_y)`` (float32 scales promoted to double,
    multiplied then divided in double, left to right), then ``QuantizeMultiplier(real)``.
    TFLM puts no bound on ``real``: it may exceed 1 (``shift > 0``).
    """
    real = _f32(a_scale) * _f32(b_scale) / _f32(y_scale)  # Python floats are doubles: C's evaluation order
    mult, shift = quantize_multiplier(real)
    return MulParams(int(a_zero), int(b_zero), int(y_zero), mult, shift)


def mul_int8(
    a: torch.Tensor, b: torch.Tensor, p: MulParams, act_lo: int = INT8_MIN, act_hi: int = INT8_MAX
) -> torch.Tensor:
    """int8 MUL (TFLM's ``reference_integer_ops::Mul`` / ``BroadcastMul6DSlow``).

    ``y = clamp(MultiplyByQuantizedMultiplier((a - a_zero) * (b - b_zero), mult, shift) + y_zero,
    act_lo, act_hi)``, the product an int32 (at most ``255^2``, no overflow). ``act_lo``/``act_hi``
    come from :func:`fedtiny.int8.kernels.activation_range` of the fused activation with the
    output's scale and zero point.

    Broadcasting: TFLM's ``BroadcastBinaryOpSimple`` is NumPy's rule (shapes right-aligned, a
    dimension of 1 repeats) on the NHWC shapes. For two 4-D operands, permuting both to NCHW
    keeps that rule, so torch's broadcasting here is TFLM's: TFLite ``N x 1 x 1 x C`` times
    ``N x H x W x C`` (squeeze-and-excitation) is ``b`` of shape ``N x C x 1 x 1`` here. An
    operand of lower TFLite rank (e.g. ``[C]``) must be given already expanded in NCHW
    (``1 x C x 1 x 1``), since right-alignment differs between the two layouts.
    """
    prod = (a.to(torch.int64) - p.a_zero) * (b.to(torch.int64) - p.b_zero)
    y = multiply_by_quantized_multiplier(prod, p.mult, p.shift) + p.y_zero
    return y.clamp(int(act_lo), int(act_hi))


# --------------------------------------------------------------------------- MEAN


@dataclass(frozen=True)
class MeanParams:
    """TFLM's int8 MEAN parameters for one reduction size ``count``.

    ``mult``/``shift`` are Prepare's ``QuantizeMultiplier(s_x / s_y)``; ``count_mult``/``count_shift``
    are what ``QuantizedMeanOrSum`` derives from them at Eval to fold in ``1 / count``.
    """

    x_zero: int
    y_zero: int
    count: int
    mult: int
    shift: int
    count_mult: int
    count_shift: int


def mean_params(x_scale: float, x_zero: int, y_scale: float, y_zero: int, count: int) -> MeanParams:
    """int8 MEAN parameters as TFLM's ``PrepareMeanOrSumHelper`` and ``QuantizedMeanOrSum``.

    Prepare: ``(mult, shift) = QuantizeMultiplier(double(s_x) / double(s_y))``. Eval, for the
    ``count`` elements averaged into each output: ``k = floor(log2(count))`` (``63 - clz64``),
    ``k = min(k, 32, 31 + shift)``; ``count_mult = (int64(mult) << k) / count`` (C integer
    division, truncating; the result fits an int32 since ``count >= 2^k``);
    ``count_shift = shift - k``. Since ``mult`` is below ``2^31`` and ``k <= log2(count)``, the
    truncation loses precision for counts that are not powers of two.

    This is the only int8 MEAN path in TFLM (``EvalIntegerMean``): equal and differing input
    and output quantization go through the same arithmetic (older TFLM releases had a separate
    ``reference_integer_ops::Mean`` for equal quantization on 4-D, axes 1 and 2; it is gone).
    """
    count = int(count)
    if count < 1:
        raise ValueError(f"MEAN reduces over {count} elements; TFLM leaves such outputs at 0")
    mult, shift = quantize_multiplier(_f32(x_scale) / _f32(y_scale))
    k = min(count.bit_length() - 1, 32, 31 + shift)
    count_mult = (mult << k) // count  # nonnegative operands: floor == C's truncation
    return MeanParams(int(x_zero), int(y_zero), count, mult, shift, count_mult, shift - k)


def mean_int8(x: torch.Tensor, axes: Sequence[int], keep_dims: bool, p: MeanParams) -> torch.Tensor:
    """int8 MEAN (TFLM's ``reference_ops::QuantizedMeanOrSum`` with ``compute_sum = false``).

    Per output: ``S = sum x`` over the reduced elements (int32 accumulator);
    ``d = int32(S - x_zero * count)``;
    ``y = clamp(MultiplyByQuantizedMultiplier(d, count_mult, count_shift) + y_zero, -128, 127)``.
    MEAN has no fused activation.

    Parameters
    ----------
    x
        A 4-D NCHW tensor, or a tensor of another rank in TFLite's own order.
    axes
        TFLite axes of the NHWC tensor, as in the model's axis tensor: ``[1, 2]`` is H and W.
        Negative axes count from the end, duplicates are dropped (TFLM's ``ResolveAxis``).
    keep_dims
        True: the result has the input's rank, reduced dims of size 1 (NCHW for 4-D). False:
        reduced dims are removed and the rest kept in TFLite's NHWC order, e.g. ``N x C`` for
        axes ``[1, 2]`` (a 4-D result, only possible with no reduced axes, is NCHW).
    p
        :func:`mean_params` for ``count`` = the product of the reduced dims' sizes.
    """
    xt = _to_nhwc(x.to(torch.int64))
    rank = xt.dim()
    resolved: list[int] = []
    for a in axes:
        a = int(a) + rank if int(a) < 0 else int(a)
        if not 0 <= a < rank:
            raise ValueError(f"MEAN axis {a} is outside a rank-{rank} tensor")
        if a not in resolved:
            resolved.append(a)
    count = int(np.prod([xt.shape[a] for a in resolved], dtype=np.int64))
    if count != p.count:
        raise ValueError(f"MEAN parameters are for {p.count} elements per output, the axes reduce {count}")
    if not resolved:
        total = xt.clone()
    else:
        # int64 sums of int8 values are exact; the int32 accumulator is emulated by wrapping.
        total = _wrap32(xt.sum(dim=tuple(resolved), keepdim=True))
    d = _wrap32(total - p.x_zero * count)  # int64 expression cast to int32 in C
    y = (multiply_by_quantized_multiplier(d, p.count_mult, p.count_shift) + p.y_zero).clamp(INT8_MIN, INT8_MAX)
    if keep_dims:
        return _from_nhwc(y) if x.dim() == 4 else y
    y = y.reshape([s for i, s in enumerate(y.shape) if i not in resolved])
    return _from_nhwc(y) if x.dim() == 4 else y


# --------------------------------------------------------------------------- QUANTIZE / DEQUANTIZE


def quantize_int8(x: torch.Tensor, in_scale: float, in_zero: int, out_scale: float, out_zero: int) -> torch.Tensor:
    """int8 -> int8 QUANTIZE (TFLM's ``reference_ops::Requantize``).

    Prepare: ``(mult, shift) = QuantizeMultiplier(double(s_in) / double(s_out))``. Eval:
    ``y = clamp(MultiplyByQuantizedMultiplier(x - z_in, mult, shift) + z_out, -128, 127)``.
    (Requantize's shortcut of XOR 0x80 applies only to int8 <-> uint8.) Equal scales give
    ``mult = 2^30, shift = 1``, which reproduces ``x - z_in`` exactly. The output has a single
    scale (TFLM refuses per-channel output quantization).
    """
    mult, shift = quantize_multiplier(_f32(in_scale) / _f32(out_scale))
    y = multiply_by_quantized_multiplier(x.to(torch.int64) - int(in_zero), mult, shift) + int(out_zero)
    return y.clamp(INT8_MIN, INT8_MAX)


def _round_half_away_f32(q: np.ndarray) -> np.ndarray:
    """``std::round`` on float32 values, exactly, as float64 (NaN stays NaN).

    ``|q| - floor(|q|)`` is exact, so the tie test is exact (``floor(q + 0.5)`` is not: the
    addition can round up across an integer).
    """
    a = np.abs(q.astype(np.float64))
    f = np.floor(a)
    r = f + (a - f >= 0.5)
    return np.copysign(r, q.astype(np.float64))


def quantize_float(x: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
    """float32 -> int8 QUANTIZE (TFLM's ``reference_ops::AffineQuantize``).

    ``q = float(x) / float(s)`` (a float32 division, not a multiplication by ``1/s``);
    ``r = std::round(q)`` (float32, ties away from zero); ``y = clamp(int32(r) + zero, -128, 127)``.

    ``int32(r)`` of a float outside the int32 range (or NaN) is undefined in C; the host build
    (x86-64, ``cvttss2si``) gives ``INT32_MIN``, emulated here, and the int32 sum with ``zero``
    wraps. So ``+inf``, NaN and ``|q| >= 2^31`` give -128 for ``zero >= 0``, and 127 when a
    negative ``zero`` wraps ``INT32_MIN + zero`` (Arm's saturating conversion would differ).

    Parameters
    ----------
    x
        Float values (rounded to float32 first, as the float32 input tensor holds them), any layout.
    """
    xf = x.detach().cpu().numpy().astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are inputs like any other here
        q = xf / np.float32(scale)  # IEEE float32 division, correctly rounded, as C's float / float
        r = _round_half_away_f32(q)
        in_range = (r >= -(2.0**31)) & (r < 2.0**31)  # False for NaN
    as_int = np.where(in_range, np.nan_to_num(r), float(INT32_MIN)).astype(np.int64)
    y = _wrap32(torch.from_numpy(as_int) + int(zero))
    return y.clamp(INT8_MIN, INT8_MAX)


def dequantize(x: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
    """int8 -> float32 DEQUANTIZE (TFLM's ``reference_ops::Dequantize``).

    ``y = float(double(s) * int32(x - zero))``: the difference is an int32, the product is taken
    in double (exact: a 24-bit significand times a 9-bit integer) and rounded once to float32.
    Returns a float32 tensor.
    """
    d = x.to(torch.int64) - int(zero)
    return (d.to(torch.float64) * _f32(scale)).to(torch.float32)


# --------------------------------------------------------------------------- MAX_POOL_2D


def max_pool_int8(
    x: torch.Tensor,
    kernel: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    act_lo: int = INT8_MIN,
    act_hi: int = INT8_MAX,
) -> torch.Tensor:
    """int8 MAX_POOL_2D (TFLM's ``reference_integer_ops::MaxPool``); output quantization = input's.

    For each window: ``m = max(-128, max of the int8 values inside the image)`` (taps in the
    padding are skipped; the running max starts at -128, so a window wholly in the padding
    gives -128); ``y = clamp(m, act_lo, act_hi)``.

    Prepare requires ``|s_in - s_out| <= 1e-6`` (a float32 difference) and equal zero points,
    and takes ``act_lo``/``act_hi`` from the fused activation with the output's quantization
    (:func:`fedtiny.int8.kernels.activation_range`).

    Parameters
    ----------
    x
        ``N x C x H x W`` int8 values.
    padding
        ``(top, bottom, left, right)``: :func:`fedtiny.int8.kernels.same_padding` for SAME, zeros
        for VALID. TFLM keeps only top and left; the output size
        ``(H + top + bottom - kh) // stride + 1`` implies the rest.
    """
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    top, bottom, left, right = padding
    # Padding with -128 equals skipping the padded taps: -128 is the running max's start value.
    # float32 holds int8 values exactly, and max is exact in any order.
    xf = F.pad(x.to(torch.float32), (left, right, top, bottom), value=float(INT8_MIN))
    y = F.max_pool2d(xf, (kh, kw), (sh, sw)).to(torch.int64)
    return y.clamp(int(act_lo), int(act_hi))


# --------------------------------------------------------------------------- CONCATENATION


def concatenation_int8(
    xs: Sequence[torch.Tensor], axis_nchw: int, in_params: Sequence[tuple[float, int]], out_scale: float, out_zero: int
) -> torch.Tensor:
    """int8 CONCATENATION (TFLM's ``reference_ops::Concatenation``): a copy, never a requantization.

    TFLM's Prepare refuses, for an int8 op: any input whose float32 scale differs from the
    output's (exact comparison, ``double(s_i) == double(s_out)``) or whose zero point differs;
    a fused activation other than NONE; more than 10 inputs. The same conditions raise
    ``ValueError`` here. (TFLite's ``ConcatenationWithScaling`` exists for uint8 only; TFLM does
    not use it.)

    Parameters
    ----------
    xs
        Tensors of equal rank, equal except along the axis.
    axis_nchw
        The axis in fedtiny's layout (negative counts from the end). For 4-D tensors TFLite's NHWC
        axis ``a`` is ``NHWC_TO_NCHW[a]`` here: channels (TFLite 3 or -1) is 1.
    in_params
        ``(scale, zero)`` of each input.
    """
    if len(xs) != len(in_params):
        raise ValueError(f"CONCATENATION got {len(xs)} inputs but {len(in_params)} quantizations")
    if len(xs) > _CONCAT_MAX_INPUTS:
        raise ValueError(f"CONCATENATION of {len(xs)} inputs: TFLM takes at most {_CONCAT_MAX_INPUTS}")
    for i, (s, z) in enumerate(in_params):
        if _f32(s) != _f32(out_scale) or int(z) != int(out_zero):
            raise ValueError(
                f"CONCATENATION input {i} has scale {_f32(s)!r} and zero point {int(z)}, the output "
                f"{_f32(out_scale)!r} and {int(out_zero)}: TFLM's int8 kernel requires them equal "
                f"(it copies, it does not requantize)"
            )
    return torch.cat([t.to(torch.int64) for t in xs], dim=int(axis_nchw))


# --------------------------------------------------------------------------- STRIDED_SLICE


def _bit(mask: int, axis: int) -> bool:
    return bool(int(mask) & (1 << axis))


def _slice_start(begin: int, stride: int, size: int, begin_masked: bool) -> int:
    """``strided_slice::StridedSliceStartForAxis``: negative wraps once, then clamp, then the mask overrides."""
    start = begin + size if begin < 0 else begin
    start = min(max(start, 0), size) if stride > 0 else min(max(start, -1), size - 1)
    if begin_masked:
        start = 0 if stride > 0 else size - 1
    return start


def _slice_stop(end: int, stride: int, size: int, start: int, end_masked: bool, shrink: bool) -> int:
    """``strided_slice::StridedSliceEndForAxis`` (``offset`` is always false in TFLM)."""
    if shrink:
        return start if start >= size else start + 1
    stop = end + size if end < 0 else end
    stop = min(max(stop, 0), size) if stride > 0 else min(max(stop, -1), size - 1)
    if end_masked:
        stop = size if stride > 0 else -1
    return stop


def strided_slice_int8(
    x: torch.Tensor,
    begin: Sequence[int],
    end: Sequence[int],
    strides: Sequence[int],
    begin_mask: int = 0,
    end_mask: int = 0,
    shrink_axis_mask: int = 0,
) -> torch.Tensor:
    """STRIDED_SLICE (TFLM's ``reference_ops::StridedSlice``), in TFLite's NHWC semantics.

    ``begin``, ``end``, ``strides`` and the masks are exactly the op's (per NHWC axis, bit ``i``
    of a mask for axis ``i``). Per axis, with ``n`` its size: ``start = begin (+ n if < 0)``,
    clamped to ``[0, n]`` (stride > 0) or ``[-1, n - 1]`` (stride < 0), then ``begin_mask``
    sets it to ``0`` / ``n - 1``; ``stop`` likewise from ``end`` with ``end_mask`` setting
    ``n`` / ``-1``; a shrunk axis has ``stop = start + 1`` (``start`` if ``start >= n``) and
    is removed from the output. Elements ``start, start + stride, ...`` while ``< stop``
    (stride > 0) or ``> stop`` (stride < 0) are taken, axis by axis. The values are copied;
    quantization passes through unchanged.

    TFLM reads only begin_mask, end_mask and shrink_axis_mask: ``ellipsis_mask``,
    ``new_axis_mask`` and ``offset`` in the model are ignored (set to 0). Prepare requires
    rank <= 4, constant begin/end/strides, and non-zero strides (``ValueError`` here).

    Parameters
    ----------
    x
        A 4-D NCHW tensor (sliced as its NHWC transpose), or a tensor of rank 1..3 in TFLite's
        own order.

    Returns
    -------
    torch.Tensor
        The output: NCHW if it is 4-D (no shrunk axis); otherwise the kept axes in TFLite's
        NHWC order (e.g. shrinking H and W of ``N x H x W x C`` gives ``N x C``).
    """
    xt = _to_nhwc(x.to(torch.int64))
    rank = xt.dim()
    if not 1 <= rank <= _STRIDED_SLICE_MAX_DIMS:
        raise ValueError(f"STRIDED_SLICE of a rank-{rank} tensor: TFLM takes ranks 1 to {_STRIDED_SLICE_MAX_DIMS}")
    if not len(begin) == len(end) == len(strides) == rank:
        raise ValueError(
            f"STRIDED_SLICE needs {rank} begin, end and stride values, got {len(begin)}, {len(end)}, {len(strides)}"
        )
    out = xt
    for axis in range(rank):
        stride, size = int(strides[axis]), xt.shape[axis]
        if stride == 0:
            raise ValueError(f"STRIDED_SLICE stride of axis {axis} is 0 (TFLM: stride value has to be non-zero)")
        start = _slice_start(int(begin[axis]), stride, size, _bit(begin_mask, axis))
        stop = _slice_stop(int(end[axis]), stride, size, start, _bit(end_mask, axis), _bit(shrink_axis_mask, axis))
        # Python's range has TFLM's loop condition exactly: index < stop (stride > 0), index > stop (stride < 0).
        index = torch.tensor(list(range(start, stop, stride)), dtype=torch.int64)
        if _bit(shrink_axis_mask, axis) and index.numel() != 1:
            raise ValueError(f"STRIDED_SLICE shrinks axis {axis} at begin {int(begin[axis])}, outside its size {size}")
        out = out.index_select(axis, index)
    kept = [s for i, s in enumerate(out.shape) if not _bit(shrink_axis_mask, i)]
    out = out.reshape(kept)
    return _from_nhwc(out) if x.dim() == 4 else out
