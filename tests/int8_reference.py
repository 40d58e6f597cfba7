"""A pure-NumPy integer reference of the int8 ops, as an MCU kernel computes them.

int32 (here int64) accumulation, requantization with a fixed-point multiplier
(Q31 mantissa and a right shift, rounding half up), saturation to int8. Used to
check fedtiny's PyTorch emulation to within 1 LSB.
"""

import numpy as np


def fixed_point(mult: float) -> tuple[int, int]:
    """``mult ~= m0 * 2**-shift`` with ``2**30 <= m0 < 2**31``."""
    assert mult > 0
    shift = 30 - int(np.floor(np.log2(mult)))
    m0 = int(round(mult * 2.0**shift))
    if m0 >= 2**31:
        m0, shift = m0 // 2, shift - 1
    return m0, shift


def fp_mul(acc: np.ndarray, mult: float) -> np.ndarray:
    """``round(acc * mult)`` in integer arithmetic: ``(acc * m0 + 2**(shift-1)) >> shift``."""
    m0, shift = fixed_point(float(mult))
    a = acc.astype(object)  # Python ints: no overflow in acc * m0
    return np.asarray((a * m0 + (1 << (shift - 1))) >> shift, dtype=np.int64)


def requantize(acc: np.ndarray, mults: np.ndarray, y_zero: int) -> np.ndarray:
    """Per-channel (axis 1) fixed-point requantization of an int accumulator, then saturation."""
    out = np.empty(acc.shape, np.int64)
    for c, mult in enumerate(np.atleast_1d(mults)):
        out[:, c] = fp_mul(acc[:, c], mult)
    return np.clip(out + y_zero, -128, 127)


def conv(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray,
    w_scales: np.ndarray,
    x_scale: float,
    x_zero: int,
    y_scale: float,
    y_zero: int,
    stride: int,
    groups: int,
) -> np.ndarray:
    """int8 NCHW input, int8 OIHW weight, int32 bias -> int8 output."""
    k = w.shape[-1]
    pad = k // 2
    xc = np.pad(x.astype(np.int64) - x_zero, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, cin, h, wd = xc.shape
    cout = w.shape[0]
    ho, wo = (h - k) // stride + 1, (wd - k) // stride + 1
    acc = np.zeros((n, cout, ho, wo), np.int64)
    gin, gout = cin // groups, cout // groups
    windows = np.lib.stride_tricks.sliding_window_view(xc, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    for g in range(groups):
        win = windows[:, g * gin : (g + 1) * gin]  # n, gin, ho, wo, k, k
        wg = w[g * gout : (g + 1) * gout].astype(np.int64)  # gout, gin, k, k
        acc[:, g * gout : (g + 1) * gout] = np.einsum("nchwij,ocij->nohw", win, wg)
    acc += b.astype(np.int64).reshape(1, -1, 1, 1)
    return requantize(acc, x_scale * w_scales.astype(np.float64) / y_scale, y_zero)


def add(
    a: np.ndarray, a_scale: float, a_zero: int, b: np.ndarray, b_scale: float, b_zero: int, y_scale: float, y_zero: int
) -> np.ndarray:
    """Residual add as TFLite-Micro does it: inputs shifted left 20 bits, each rescaled to the output scale
    with a fixed-point multiplier, summed, then one rounding shift, zero point, saturation."""
    left = 20
    ya = fp_mul((a.astype(np.int64) - a_zero) << left, a_scale / y_scale)
    yb = fp_mul((b.astype(np.int64) - b_zero) << left, b_scale / y_scale)
    return np.clip(((ya + yb + (1 << (left - 1))) >> left) + y_zero, -128, 127)


def avgpool(x: np.ndarray) -> np.ndarray:
    """Global average pool: int sum, then division rounded half up."""
    n = x.shape[2] * x.shape[3]
    s = x.astype(np.int64).sum(axis=(2, 3), keepdims=True)
    return np.clip(np.floor_divide(2 * s + n, 2 * n), -128, 127)
