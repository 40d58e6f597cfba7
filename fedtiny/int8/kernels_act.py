"""TensorFlow Lite Micro's int8 LOGISTIC and HARD_SWISH, exactly, in integer PyTorch.

Same conventions as :mod:`fedtiny.int8.kernels`: int8 values held in ``torch.int64`` tensors of any
shape (both ops are elementwise, so the layout does not matter), the default double-rounding build,
and scales taken as TFLite stores them (float32). Where TFLM computes in int16 (HARD_SWISH) the
int16 behaviour is emulated: gemmlowp's int16 ``SaturatingRoundingDoublingHighMul`` (nudge 2^14,
division by 2^15), the truncating ``SaturatingDoublingHighMul``, saturating int16 left shifts, and
``RoundingDivideByPOT`` with an int16 mask.

Sources read: ``tensorflow/lite/micro/kernels/logistic_common.cc`` and
``tensorflow/lite/kernels/internal/reference/integer_ops/logistic.h`` (LOGISTIC);
``tensorflow/lite/micro/kernels/hard_swish_common.cc`` and
``tensorflow/lite/kernels/internal/reference/hard_swish.h`` (HARD_SWISH); gemmlowp's
``fixedpoint/fixedpoint.h`` (``logistic``, the int16 fixed-point primitives).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from fedtiny.int8.kernels import (
    INT8_MAX,
    INT8_MIN,
    INT32_MAX,
    exp_on_negative_values,
    multiply_by_quantized_multiplier,
    one_over_one_plus_x_for_x_in_0_1,
    quantize_multiplier,
    rounding_divide_by_pot,
)

__all__ = [
    "LogisticParams",
    "logistic_params",
    "logistic_int8",
    "HardSwishParams",
    "hard_swish_params",
    "hard_swish_int8",
    "table",
    "LOGISTIC_OUTPUT_SCALE",
    "LOGISTIC_OUTPUT_ZERO",
]

INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1

LOGISTIC_OUTPUT_SCALE = 1.0 / 256.0  # what the int8 kernel computes in; TFLM checks only the zero point
LOGISTIC_OUTPUT_ZERO = INT8_MIN  # TFLM's Prepare requires it

_LOGISTIC_INPUT_INTEGER_BITS = 4  # the logistic's input is Q4.27
_LOGISTIC_OUTPUT_INTEGER_BITS = 8  # Q0.31 -> 1/256 steps: a rounding division by 2^23


def _f32(v: float) -> np.float32:
    return np.float32(v)


# --------------------------------------------------------------------------- int16 fixed point


def _wrap16(x: torch.Tensor) -> torch.Tensor:
    """Two's-complement int16 wrap-around of int64 values (a C cast to ``int16_t``)."""
    return ((x + 2**15) & 0xFFFF) - 2**15


def _srdhm16(a: torch.Tensor, b: int) -> torch.Tensor:
    """gemmlowp's int16 ``SaturatingRoundingDoublingHighMul`` (ARM's SQRDMULH on int16).

    ``p = a * b`` (int32); ``nudge = 2^14`` if ``p >= 0`` else ``1 - 2^14``; result
    ``int16((p + nudge) / 2^15)`` with C's truncating division; ``a == b == -2^15`` gives
    ``2^15 - 1``. (The int32 version nudges by 2^30 and divides by 2^31.)
    """
    p = a * int(b)
    nudge = torch.where(p >= 0, 1 << 14, 1 - (1 << 14))
    r = _wrap16(torch.div(p + nudge, 1 << 15, rounding_mode="trunc"))
    return torch.where((a == INT16_MIN) & (int(b) == INT16_MIN), INT16_MAX, r)


def _sdhm16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """TFLite's ``SaturatingDoublingHighMul`` on int16 (SQDMULH): ``int16(trunc(a * b / 2^15))``.

    Like :func:`_srdhm16` without the nudge (rounds toward zero); ``a == b == -2^15`` gives ``2^15 - 1``.
    """
    r = _wrap16(torch.div(a * b, 1 << 15, rounding_mode="trunc"))
    return torch.where((a == INT16_MIN) & (b == INT16_MIN), INT16_MAX, r)


def _saturating_left_shift16(x: torch.Tensor, amount: int) -> torch.Tensor:
    """TFLite's ``SaturatingLeftShift(int16, amount)``: ``x * 2^amount`` (in int64) clamped to int16."""
    return (x * (1 << amount)).clamp(INT16_MIN, INT16_MAX)


def _rounding_divide_by_pot16(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """gemmlowp's ``RoundingDivideByPOT<int16_t>``: ``x / 2^exponent``, ties away from zero, 0 <= exponent <= 31.

    ``mask = int16(2^e - 1)``; ``threshold = (mask >> 1) + (x < 0)``;
    result ``int16((x >> e) + ((x & mask) > threshold))``. The mask is an int16, so for
    ``e >= 16`` it wraps to -1 and the result is no longer a division: 1 for ``x >= 0``,
    -1 for ``x < 0`` (what TFLM computes for an output scale over ~512x the input scale).
    """
    mask = _wrap16(torch.tensor((1 << exponent) - 1, dtype=torch.int64))
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return _wrap16((x >> exponent) + ((x & mask) > threshold).to(torch.int64))


def _downscale_to_int16(mult32: int) -> int:
    """TFLite's ``DownScaleInt32ToInt16Multiplier``: ``(m + 2^15) >> 16``, or ``2^15 - 1`` if ``m >= 2^31 - 1 - 2^15``."""
    if mult32 >= INT32_MAX - (1 << 15):
        return INT16_MAX
    return (mult32 + (1 << 15)) >> 16


# --------------------------------------------------------------------------- logistic


@dataclass(frozen=True)
class LogisticParams:
    """TFLM's int8 LOGISTIC parameters (``OpDataLogistic``).

    ``input_left_shift >= 0``; ``input_range_radius >= 0``: centred inputs at or beyond it saturate.
    """

    input_zero_point: int
    input_multiplier: int
    input_left_shift: int
    input_range_radius: int


def logistic_params(x_scale: float, x_zero: int) -> LogisticParams:
    """int8 LOGISTIC parameters as TFLM's ``CalculateArithmeticOpDataLogistic``.

    ``real = double(float32(x_scale)) * 2^27`` (the input becomes Q4.27);
    ``(q, input_left_shift) = frexp(real)``; ``input_multiplier = round(q * 2^31)``;
    ``input_range_radius = floor(15 * 2^27 / 2^input_left_shift)`` (``CalculateInputRadius(4, shift, 31)``).

    TFLM calls ``frexp`` and ``TfLiteRound`` directly rather than ``QuantizeMultiplier``; they
    agree here because ``q * 2^31`` is an integer below 2^31 (a float32 mantissa has 24 bits)
    and the shift is kept >= 0.

    Raises
    ------
    ValueError
        ``x_scale`` is not positive and finite, or below 2^-28 (TFLM would shift by a negative
        amount in ``CalculateInputRadius``, which C leaves undefined).
    """
    scale = float(_f32(x_scale))
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"logistic input scale must be positive and finite, got {x_scale!r}")
    mult, shift = quantize_multiplier(scale * float(1 << (31 - _LOGISTIC_INPUT_INTEGER_BITS)))
    if shift < 0:
        raise ValueError(f"logistic input scale {scale!r} is below 2^-28, which TFLM cannot handle")
    radius = (((1 << _LOGISTIC_INPUT_INTEGER_BITS) - 1) << (31 - _LOGISTIC_INPUT_INTEGER_BITS)) >> shift
    return LogisticParams(int(x_zero), mult, shift, radius)


def _gemmlowp_logistic_q4(a: torch.Tensor) -> torch.Tensor:
    """gemmlowp's ``logistic`` of a Q4.27 int32 ``a``: Q0.31 output.

    ``r = 1 / (1 + exp(-|a|))`` (:func:`exp_on_negative_values` with 4 integer bits, then
    :func:`one_over_one_plus_x_for_x_in_0_1`); ``r`` for ``a > 0``, ``INT32_MAX - r`` for
    ``a < 0`` (gemmlowp's Q0.31 one minus ``r``), ``2^30`` (one half) for ``a == 0``.
    """
    positive = one_over_one_plus_x_for_x_in_0_1(exp_on_negative_values(-a.abs(), _LOGISTIC_INPUT_INTEGER_BITS))
    return torch.where(a == 0, 1 << 30, torch.where(a > 0, positive, INT32_MAX - positive))


def logistic_int8(x: torch.Tensor, p: LogisticParams) -> torch.Tensor:
    """int8 LOGISTIC as TFLM's ``reference_integer_ops::Logistic`` (output scale 1/256, zero -128).

    Parameters
    ----------
    x : torch.Tensor
        int8 values (any integer dtype, any shape).
    p : LogisticParams
        From :func:`logistic_params`.

    Returns
    -------
    torch.Tensor
        int8 values in an int64 tensor shaped like ``x``. With ``d = x - input_zero_point``:
        -128 if ``d <= -radius``; 127 if ``d >= radius``; otherwise
        ``a = MultiplyByQuantizedMultiplier(d, input_multiplier, input_left_shift)`` (Q4.27),
        ``y = clamp(RoundingDivideByPOT(logistic(a), 23) - 128, -128, 127)``. The ``d <= -radius``
        test comes first, so with a radius of 0 (input scales of 16 and up) ``d == 0`` gives -128.
    """
    d = x.to(torch.int64) - p.input_zero_point
    low, high = d <= -p.input_range_radius, d >= p.input_range_radius
    inside = ~(low | high)
    # Only inputs inside the radius are rescaled: there |d| * 2^shift < 15 * 2^27 fits in int32.
    a = multiply_by_quantized_multiplier(torch.where(inside, d, 0), p.input_multiplier, p.input_left_shift)
    q0 = _gemmlowp_logistic_q4(a)
    y = (rounding_divide_by_pot(q0, 31 - _LOGISTIC_OUTPUT_INTEGER_BITS) + LOGISTIC_OUTPUT_ZERO).clamp(
        INT8_MIN, INT8_MAX
    )
    return torch.where(low, INT8_MIN, torch.where(high, INT8_MAX, y))


# --------------------------------------------------------------------------- hard swish


@dataclass(frozen=True)
class HardSwishParams:
    """TFLM's int8 HARD_SWISH parameters (``HardSwishParams``): int16 multipliers and their exponents.

    ``output_multiplier_exponent <= 0`` (TFLM's Prepare requires it).
    """

    input_zero_point: int
    output_zero_point: int
    reluish_multiplier_fixedpoint_int16: int
    reluish_multiplier_exponent: int
    output_multiplier_fixedpoint_int16: int
    output_multiplier_exponent: int


def _int16_multiplier(real: np.float32) -> tuple[int, int]:
    """``QuantizeMultiplier(double(real))`` then ``DownScaleInt32ToInt16Multiplier``: ``(mult16, exponent)``."""
    mult32, exponent = quantize_multiplier(float(real))
    return _downscale_to_int16(mult32), exponent


def hard_swish_params(x_scale: float, x_zero: int, y_scale: float, y_zero: int) -> HardSwishParams:
    """int8 HARD_SWISH parameters as TFLM's ``HardSwishPrepare``, float32 where TFLM uses float.

    ``hires = float32(1/128) * float32(x_scale)`` (float32 product);
    ``output_multiplier = double(hires / float32(y_scale))`` (float32 quotient);
    ``reluish_multiplier = double(hires / float32(3/32768))`` (float32 quotient); each through
    ``QuantizeMultiplier`` (``m32``, exponent), then ``m16 = (m32 + 2^15) >> 16``
    (``2^15 - 1`` when ``m32 >= 2^31 - 1 - 2^15``).

    Raises
    ------
    ValueError
        A scale is not positive and finite, or ``output_multiplier_exponent > 0`` (TFLM's Prepare
        fails: the output scale is at or below about ``x_scale / 128``).
    """
    s_in, s_out = _f32(x_scale), _f32(y_scale)
    for name, s in (("input", s_in), ("output", s_out)):
        if not (np.isfinite(s) and s > 0):
            raise ValueError(f"hard-swish {name} scale must be positive and finite, got {float(s)!r}")
    hires = _f32(1.0 / 128.0) * s_in
    out_m16, out_exp = _int16_multiplier(hires / s_out)
    if out_exp > 0:
        raise ValueError(
            f"hard-swish output scale {float(s_out)!r} is too small for input scale {float(s_in)!r}: "
            f"TFLM requires output_multiplier_exponent <= 0, got {out_exp}"
        )
    relu_m16, relu_exp = _int16_multiplier(hires / (_f32(3.0) / _f32(32768.0)))
    return HardSwishParams(int(x_zero), int(y_zero), relu_m16, relu_exp, out_m16, out_exp)


def _reluish(hires: torch.Tensor, p: HardSwishParams) -> torch.Tensor:
    """The "relu-ish" factor ``clamp(x/3, -1, 1)`` in Q0.15, mapped to ``[0, 1]``: ``(r + 2^15) >> 1``.

    ``r = hires``; if ``e > 0``: ``r = SatLeftShift16(r, e - 1)``; ``r = SRDHM16(r, m16)``;
    if ``e > 0``: ``r = SatLeftShift16(r, 1)`` (the last bit last, so saturation only
    happens where it shows); if ``e < 0``: ``r = RoundingDivideByPOT16(r, -e)``.
    """
    e = p.reluish_multiplier_exponent
    r = hires
    if e > 0:
        r = _saturating_left_shift16(r, e - 1)
    r = _srdhm16(r, p.reluish_multiplier_fixedpoint_int16)
    if e > 0:
        r = _saturating_left_shift16(r, 1)
    if e < 0:
        r = _rounding_divide_by_pot16(r, -e)
    return (r + (1 << 15)) >> 1


def hard_swish_int8(x: torch.Tensor, p: HardSwishParams) -> torch.Tensor:
    """int8 HARD_SWISH as TFLM's ``reference_ops::HardSwish<int8_t>`` (int16 arithmetic).

    Parameters
    ----------
    x : torch.Tensor
        int8 values (any integer dtype, any shape).
    p : HardSwishParams
        From :func:`hard_swish_params`.

    Returns
    -------
    torch.Tensor
        int8 values in an int64 tensor shaped like ``x``:
        ``hires = int16((x - x_zero) * 2^7)``; ``pre = SRDHM16(hires, out_m16)``;
        ``r`` = :func:`_reluish` of ``hires`` (in [0, 2^15 - 1]);
        ``y = clamp(int16(RoundingDivideByPOT16(SDHM16(r, pre), -out_exp) + y_zero), -128, 127)``.
    """
    hires = _wrap16(_wrap16(x.to(torch.int64) - p.input_zero_point) * (1 << 7))
    pre_output = _srdhm16(hires, p.output_multiplier_fixedpoint_int16)
    # Truncating (not rounding) high mul: TFLM chose it to cancel the bias of the rounding ones above.
    product = _sdhm16(_reluish(hires, p), pre_output)
    y = _wrap16(_rounding_divide_by_pot16(product, -p.output_multiplier_exponent) + p.output_zero_point)
    return y.clamp(INT8_MIN, INT8_MAX)


# --------------------------------------------------------------------------- tables

P = TypeVar("P")


def table(fn: Callable[[torch.Tensor, P], torch.Tensor], params: P) -> torch.Tensor:
    """``fn``'s output for every int8 input: entry ``i`` is ``fn(i - 128)`` (256 int64 entries).

    Elementwise ops are fully described by it: ``fn(x, params) == table(fn, params)[x + 128]``.
    """
    return fn(torch.arange(INT8_MIN, INT8_MAX + 1, dtype=torch.int64), params)


# =========================================================================== standalone activations
#
# RELU, RELU6, LEAKY_RELU and TANH as TFLM runs them when a converter could not fuse the activation
# into the op before it. Sources read: ``tensorflow/lite/micro/kernels/activations.h`` and
# ``activations_common.cc`` (``ReluQuantized``, ``CalculateReluOpData``, ``Relu6Quantized``,
# ``Relu6Prepare``), ``tensorflow/lite/micro/micro_utils.h`` (``FloatToQuantizedType``),
# ``leaky_relu_common.cc`` and ``tensorflow/lite/kernels/internal/reference/leaky_relu.h``
# (``QuantizeLeakyRelu``), ``tanh.cc`` and ``reference/integer_ops/tanh.h``, gemmlowp's ``tanh``.
# TFLM registers no RELU_N1_TO_1 kernel (a model holding one does not load), so there is none here.

__all__ += [
    "ReluParams",
    "relu_params",
    "relu_int8",
    "Relu6Params",
    "relu6_params",
    "relu6_int8",
    "LeakyReluParams",
    "leaky_relu_params",
    "leaky_relu_int8",
    "TanhParams",
    "tanh_params",
    "tanh_int8",
    "TANH_OUTPUT_SCALE",
    "TANH_OUTPUT_ZERO",
]

from fedtiny.int8.kernels import saturating_rounding_doubling_high_mul  # noqa: E402

TANH_OUTPUT_SCALE = 1.0 / 128.0  # what the int8 kernel computes in; TFLM checks neither scale nor zero point
TANH_OUTPUT_ZERO = 0

_MAX_LEFT_SHIFT = 30  # MultiplyByQuantizedMultiplier's ``1 << shift`` is an int32: 31 and up is undefined in C


def _positive_scale(op: str, name: str, scale: float) -> np.float32:
    s = _f32(scale)
    if not (np.isfinite(s) and s > 0):
        raise ValueError(f"{op} {name} scale must be positive and finite, got {scale!r}")
    return s


def _multiplier(op: str, what: str, real: float) -> tuple[int, int]:
    """``QuantizeMultiplier(real)``, refusing a left shift over 30 (C's ``1 << 31`` in the kernel)."""
    mult, shift = quantize_multiplier(real)
    if shift > _MAX_LEFT_SHIFT:
        raise ValueError(
            f"{op}: the {what} multiplier {real!r} needs a left shift of {shift}; "
            f"TFLM's MultiplyByQuantizedMultiplier is undefined above {_MAX_LEFT_SHIFT}"
        )
    return mult, shift


# --------------------------------------------------------------------------- relu


@dataclass(frozen=True)
class ReluParams:
    """TFLM's int8 RELU parameters (``ReluOpData::params``): one multiplier and the output's clamp."""

    input_zero_point: int
    output_zero_point: int
    output_multiplier: int
    output_shift: int
    quantized_activation_min: int
    quantized_activation_max: int


def relu_params(x_scale: float, x_zero: int, y_scale: float, y_zero: int) -> ReluParams:
    """int8 RELU parameters as TFLM's ``CalculateReluOpData<int8_t>``.

    ``(mult, shift) = QuantizeMultiplier(double(x_scale) / double(y_scale))`` (float32 scales, the
    quotient in double: see :func:`leaky_relu_params`); ``min = max(-128, y_zero + int(roundf(0.0f /
    y_scale))) = max(-128, y_zero)``; ``max = 127`` (RELU's upper bound is infinite). TFLM's Prepare
    checks nothing else for int8.

    Raises
    ------
    ValueError
        A scale is not positive and finite, or the ratio needs a left shift above 30.
    """
    s_in, s_out = _positive_scale("relu", "input", x_scale), _positive_scale("relu", "output", y_scale)
    mult, shift = _multiplier("relu", "input/output", float(s_in) / float(s_out))
    return ReluParams(int(x_zero), int(y_zero), mult, shift, max(INT8_MIN, int(y_zero)), INT8_MAX)


def relu_int8(x: torch.Tensor, p: ReluParams) -> torch.Tensor:
    """int8 RELU as TFLM's ``ReluQuantized<int8_t>``.

    ``y = clamp(y_zero + MultiplyByQuantizedMultiplier(x - x_zero, mult, shift), min, max)``: a
    requantize whose clamp starts at the output's zero point.
    """
    d = x.to(torch.int64) - p.input_zero_point
    y = p.output_zero_point + multiply_by_quantized_multiplier(d, p.output_multiplier, p.output_shift)
    return y.clamp(p.quantized_activation_min, p.quantized_activation_max)


# --------------------------------------------------------------------------- relu6


@dataclass(frozen=True)
class Relu6Params:
    """TFLM's int8 RELU6 parameters (``Relu6OpData``): the input's zero and six, as int8 values."""

    zero: int
    six: int


def relu6_params(x_scale: float, x_zero: int) -> Relu6Params:
    """int8 RELU6 parameters as TFLM's ``Relu6Prepare``: from the *input* quantization only.

    ``zero = x_zero``; ``six = FloatToQuantizedType<int8_t>(6.0f, x_scale, x_zero)`` =
    ``clamp(int32(round(float32(6 / x_scale)) + x_zero), -128, 127)`` (a float32 quotient, rounded half
    away from zero). TFLM then requires ``-128 <= six <= 127``, which the clamp always satisfies, and
    never reads the output tensor's quantization.

    Raises
    ------
    ValueError
        The scale is not positive and finite, or ``6 / x_scale`` does not fit an int32 (C's conversion
        is undefined there).
    """
    s = _positive_scale("relu6", "input", x_scale)
    q = _f32(6.0) / s
    if not abs(float(q)) < 2.0**31 - 256:
        raise ValueError(f"relu6 input scale {float(s)!r} is too small: 6 / scale = {float(q)!r} overflows int32")
    six = int(math.copysign(math.floor(abs(float(q)) + 0.5), float(q))) + int(x_zero)  # exact for a float32 q
    return Relu6Params(int(x_zero), min(max(six, INT8_MIN), INT8_MAX))


def relu6_int8(x: torch.Tensor, p: Relu6Params) -> torch.Tensor:
    """int8 RELU6 as TFLM's ``Relu6Quantized<int8_t>``: ``y = clamp(x, zero, six)``, the input's int8 value copied.

    No rescaling happens: when the output tensor's quantization differs from the input's, TFLM still
    writes the clamped input value, which the next op reads with the output's quantization.
    """
    return x.to(torch.int64).clamp(p.zero, p.six)


# --------------------------------------------------------------------------- leaky relu


@dataclass(frozen=True)
class LeakyReluParams:
    """TFLM's int8 LEAKY_RELU parameters (``LeakyReluOpData``): an identity and an alpha multiplier.

    ``output_multiplier_alpha`` keeps its sign (negative for a negative ``alpha``).
    """

    input_zero_point: int
    output_zero_point: int
    output_multiplier_identity: int
    output_shift_identity: int
    output_multiplier_alpha: int
    output_shift_alpha: int


def leaky_relu_params(x_scale: float, x_zero: int, y_scale: float, y_zero: int, alpha: float) -> LeakyReluParams:
    """int8 LEAKY_RELU parameters as TFLM's ``CalculateOpDataLeakyRelu``.

    ``alpha_multiplier = double(x_scale) * double(alpha) / double(y_scale)``;
    ``identity_multiplier = double(x_scale) / double(y_scale)``; each through ``QuantizeMultiplier``
    (a negative real gives a negative multiplier). TFLM's Prepare checks nothing else for int8.

    In double, as the TFLM build fedtiny is checked against computes them (its ``CalculateReluOpData``
    too: ``cvtss2sd``/``divsd`` in ``tflite_micro`` 0.dev20261023's ``_runtime.so``), although the
    ``tflite-micro`` sources of August 2026 write ``static_cast<double>(float / float)``, a float32
    quotient. The two differ only where ``d * multiplier`` lies within a float32 rounding of a half, and
    the one-op tests against TFLM tell them apart.

    Raises
    ------
    ValueError
        A scale is not positive and finite, ``alpha`` is not finite, or a multiplier needs a left shift
        above 30.
    """
    s_in, s_out = _positive_scale("leaky-relu", "input", x_scale), _positive_scale("leaky-relu", "output", y_scale)
    a = _f32(alpha)
    if not np.isfinite(a):
        raise ValueError(f"leaky-relu alpha must be finite, got {alpha!r}")
    m_id, s_id = _multiplier("leaky-relu", "identity", float(s_in) / float(s_out))
    m_a, s_a = _multiplier("leaky-relu", "alpha", float(s_in) * float(a) / float(s_out))
    return LeakyReluParams(int(x_zero), int(y_zero), m_id, s_id, m_a, s_a)


def leaky_relu_int8(x: torch.Tensor, p: LeakyReluParams) -> torch.Tensor:
    """int8 LEAKY_RELU as TFLM's ``reference_ops::QuantizeLeakyRelu<int8_t>``.

    With ``d = x - x_zero``: ``d >= 0``: ``y_zero + MBQM(d, m_id, s_id)``; ``d < 0``:
    ``y_zero + sign(m_a) * MBQM(d, |m_a|, s_a)`` (TFLM multiplies by the magnitude and negates, so a
    negative alpha rounds as the positive one does); then clamped to [-128, 127].
    """
    d = x.to(torch.int64) - p.input_zero_point
    identity = multiply_by_quantized_multiplier(d.clamp(min=0), p.output_multiplier_identity, p.output_shift_identity)
    scaled = multiply_by_quantized_multiplier(d.clamp(max=0), abs(p.output_multiplier_alpha), p.output_shift_alpha)
    alpha = -scaled if p.output_multiplier_alpha < 0 else scaled
    return (p.output_zero_point + torch.where(d >= 0, identity, alpha)).clamp(INT8_MIN, INT8_MAX)


# --------------------------------------------------------------------------- tanh


@dataclass(frozen=True)
class TanhParams:
    """TFLM's int8 TANH parameters (``tanh.cc``'s ``OpData``), computed as LOGISTIC's are.

    ``input_left_shift >= 0``; ``input_range_radius >= 0``: centred inputs at or beyond it saturate.
    """

    input_zero_point: int
    input_multiplier: int
    input_left_shift: int
    input_range_radius: int


def tanh_params(x_scale: float, x_zero: int) -> TanhParams:
    """int8 TANH parameters as TFLM's ``CalculateArithmeticOpData`` (``kInputIntegerBits = 4``).

    ``(q, input_left_shift) = frexp(double(float32(x_scale)) * 2^27)``; ``input_multiplier =
    round(q * 2^31)`` (exact: ``q * 2^31`` is an integer below 2^31); ``input_range_radius =
    floor(15 * 2^27 / 2^input_left_shift)``. The output quantization is not read and not checked: the
    kernel writes 1/128 steps around 0 whatever the output tensor says.

    Raises
    ------
    ValueError
        ``x_scale`` is not positive and finite, or below 2^-28 (a negative shift in
        ``CalculateInputRadius``, undefined in C).
    """
    scale = float(_positive_scale("tanh", "input", x_scale))
    mult, shift = quantize_multiplier(scale * float(1 << (31 - _LOGISTIC_INPUT_INTEGER_BITS)))
    if shift < 0:
        raise ValueError(f"tanh input scale {scale!r} is below 2^-28, which TFLM cannot handle")
    radius = (((1 << _LOGISTIC_INPUT_INTEGER_BITS) - 1) << (31 - _LOGISTIC_INPUT_INTEGER_BITS)) >> shift
    return TanhParams(int(x_zero), mult, shift, radius)


def _sat_shl32(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """gemmlowp's ``SaturatingRoundingMultiplyByPOT<exponent > 0>`` on int32: ``x * 2^exponent``, saturated."""
    return (x * (1 << exponent)).clamp(-(2**31), INT32_MAX)


def _one_minus_x_over_one_plus_x_for_x_in_0_1(a: torch.Tensor) -> torch.Tensor:
    """gemmlowp's ``(1 - a) / (1 + a)`` for Q0.31 ``a`` in (0, 1]: Q0.31 output.

    ``d = RoundingHalfSum(a, INT32_MAX)``; Newton-Raphson in Q2.29 from ``x = 48/17 - 32/17 * d``, three
    times ``x += Rescale<2>(x * (1 - d * x))``; the result ``x - 1`` rescaled to Q0.31 (saturating shift
    left by 2). Products are SRDHM; sums are plain int32 additions.
    """
    srdhm = saturating_rounding_doubling_high_mul
    total = a + INT32_MAX
    d = torch.div(total + torch.where(total >= 0, 1, -1), 2, rounding_mode="trunc")
    one_q2 = 1 << 29
    x = 1515870810 + srdhm(d, -1010580540)
    for _ in range(3):
        x = x + _sat_shl32(srdhm(x, one_q2 - srdhm(d, x)), 2)
    return _sat_shl32(x - one_q2, 2)


def _gemmlowp_tanh_q4(a: torch.Tensor) -> torch.Tensor:
    """gemmlowp's ``tanh`` of a Q4.27 int32 ``a``: Q0.31 output.

    ``n = -|a|``; ``t = (1 - e) / (1 + e)`` with ``e = exp_on_negative_values`` of ``n`` read as Q5.26
    (``ExactMulByPot<1>``: ``exp(2n)``); ``t`` for ``a > 0``, ``-t`` for ``a < 0``, 0 for ``a == 0``.
    """
    t = _one_minus_x_over_one_plus_x_for_x_in_0_1(exp_on_negative_values(-a.abs(), _LOGISTIC_INPUT_INTEGER_BITS + 1))
    return torch.where(a == 0, 0, torch.where(a < 0, -t, t))


def tanh_int8(x: torch.Tensor, p: TanhParams) -> torch.Tensor:
    """int8 TANH as TFLM's ``reference_integer_ops::Tanh`` (int8 overload): output 1/128 steps, zero 0.

    With ``d = x - input_zero_point``: -128 if ``d <= -radius``; 127 if ``d >= radius``; otherwise
    ``a = MultiplyByQuantizedMultiplier(d, input_multiplier, input_left_shift)`` (Q4.27) and
    ``y = clamp(RoundingDivideByPOT(tanh(a), 24), -128, 127)``. A radius of 0 (input scales of 16 and
    up) makes every input -128 or 127.
    """
    d = x.to(torch.int64) - p.input_zero_point
    low, high = d <= -p.input_range_radius, d >= p.input_range_radius
    inside = ~(low | high)
    a = multiply_by_quantized_multiplier(torch.where(inside, d, 0), p.input_multiplier, p.input_left_shift)
    y = rounding_divide_by_pot(_gemmlowp_tanh_q4(a), 31 - 7).clamp(INT8_MIN, INT8_MAX)
    return torch.where(low, INT8_MIN, torch.where(high, INT8_MAX, y))
