"""The exact training step: every number a client computes is defined to the bit, on any CPU.

The int8 forward is exact already (TFLM's integers, :mod:`fedtiny.int8.kernels`). The float
backward it replaces summed float32 products in whatever order a CPU's vector kernels chose,
so the same scenario gave other figures on other CPUs and no device could reproduce a
simulated client. The exact step keeps float32 only **elementwise** (IEEE-754 single
precision, each operation rounded to nearest-even, no fused multiply-add) and sums only
**integers**:

- **Loss gradient** (:func:`cross_entropy`): the int8 logits' softmax in fixed point with
  TFLM's softmax primitives: ``e_i = exp_on_negative_values(SRDHM((q_i - max q) << shift, mult))``
  (Q0.31, parameters of ``softmax_params(s_logits)``; 0 below ``diff_min``), ``S = sum e_i``
  (int64), ``p_i = floor((e_i * 2^15 + S / 2) / S)`` (Q15), gradient of the mean loss
  ``((p_i - 2^15 [i = y]) * 2^-15) / N`` in float32.
- **Output gradients of a convolution** (:func:`quantize_grad`): ``a = g * mask * m[o]``
  (float32; ``m`` the per-channel effective scale ``s_x s_w / s_y``), quantized per tensor to
  int8 per sample with stochastic rounding: ``s_n = max|a[n]| / 127``,
  ``q = clamp(floor(a / s_n + u), -127, 127)``. Then per sample ``f32(integer sum) * s_n`` for the
  bias (``sum q``), weight (``sum q * (x - z_x)``) and input (``sum q * w``) gradients; the bias and
  weight gradients of the batch are those per-sample terms added in float32 in sample order (what
  a device training one sample at a time accumulates).
- **ADD, average pool, reshape**: elementwise (a mask and a ratio; ``g / count``); gradients of
  a tensor read twice add in float32 (commutative, so exact for two readers).
- **Update** (:class:`~fedtiny.int8.optim.QuantizedOptimizer`): ``g *= qas`` (float32),
  momentum ``v = v * mu + g`` (the first step ``v = g``), ``d = v * lr``; int8 weights
  ``w = clamp(floor((w - d) + u), -127, 127)``, int32 biases ``b = clamp(b + round(-d))``
  (``round`` half away from zero, in float32).

``u`` is uniform on ``[0, 1)`` in steps of ``2^-24`` from a counter-based generator that C
computes as easily (:func:`uniform`): element ``i`` (flat NCHW index) of stream
``(seed, step, slot)`` is ``hash32(base + i) >> 8`` with ``base = hash32(seed ^ hash32(step ^
hash32(slot)))`` and ``hash32`` Wellons' lowbias32. Slots: ``2k`` for convolution ``k``'s
output gradient, ``2k + 1`` for its weight's rounding.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from fedtiny.int8 import kernels, native

__all__ = [
    "StepKey",
    "step",
    "current",
    "hash32",
    "permutation",
    "uniform",
    "quantize_grad",
    "grad_slot",
    "round_slot",
    "round_half_away",
    "sum_in_order",
    "int_sum_dtype",
    "softmax_q15",
    "cross_entropy",
    "GRAD_LEVELS",
    "Q15",
]

GRAD_LEVELS = 127  # output gradients are int8 in [-127, 127]
Q15 = 1 << 15
_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class StepKey:
    """The stochastic-rounding stream of one training step: the client's round seed and the step's number."""

    seed: int
    step: int


_current: StepKey | None = None


def current() -> StepKey | None:
    """The exact step being run (None: the float-gradient step)."""
    return _current


@contextmanager
def step(key: StepKey | None) -> Iterator[None]:
    """Run a forward and backward as the exact step ``key`` (None: as the float step)."""
    global _current
    previous, _current = _current, key
    try:
        yield
    finally:
        _current = previous


def grad_slot(conv_index: int) -> int:
    return 2 * conv_index


def round_slot(conv_index: int) -> int:
    return 2 * conv_index + 1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2^32`` for int64 ``x`` in [0, 2^32): two 16-bit halves, so no int64 product overflows."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & _M32


def _hash32_tensor(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash32(v: int) -> int:
    """Wellons' lowbias32 of a 32-bit integer (Python ints; the tensor form is the same function)."""
    v &= _M32
    v ^= v >> 16
    v = (v * 0x7FEB352D) & _M32
    v ^= v >> 15
    v = (v * 0x846CA68B) & _M32
    return v ^ (v >> 16)


SHUFFLE_SLOT = 0x53485546  # "SHUF": the stream of the portable shuffle (conv slots are small)


def permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The portable order of ``n`` samples in ``epoch`` (``train.shuffle = "hash"``): Fisher-Yates from the
    last position down, swapping position ``i`` with ``hash32(base + i) % (i + 1)``, ``base`` the stream
    ``(seed, epoch, SHUFFLE_SLOT)``. A device computes the same order (``device/firmware``)."""
    base = hash32((seed & _M32) ^ hash32((epoch & _M32) ^ hash32(SHUFFLE_SLOT)))
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = hash32((base + i) & _M32) % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def uniform(key: StepKey, slot: int, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 uniform numbers on [0, 1) (multiples of 2^-24) for stream ``(key, slot)``, element by flat index."""
    base = hash32((key.seed & _M32) ^ hash32((key.step & _M32) ^ hash32(slot)))
    n = math.prod(shape)
    fast = native.uniform(base, n)  # the same numbers from the host kernels, when built
    if fast is not None:
        return fast.view(shape)
    idx = (torch.arange(n, dtype=torch.int64) + base) & _M32
    return (_hash32_tensor(idx) >> 8).to(torch.float32).mul_(2.0**-24).view(shape)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """float32 ``trunc(x + copysign(0.5, x))`` (C's ``(int)(x + (x >= 0 ? 0.5f : -0.5f))``)."""
    half = torch.where(x >= 0, 0.5, -0.5).to(x.dtype)
    return (x + half).trunc()


def quantize_grad(a: torch.Tensor, key: StepKey, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, s)``: each sample of ``a`` (float32, ``N x ...``) as int8 values (in float32) times its own
    float32 scale ``s[n] = max|a[n]| / 127`` (1 for an all-zero sample), stochastically rounded.

    Per sample, so that a device training one sample at a time (micro-batch 1) computes the same."""
    n = a.shape[0]
    m = a.abs().reshape(n, -1).amax(dim=1) if a.numel() else torch.zeros(n)
    s = torch.where(m > 0, m / GRAD_LEVELS, torch.ones_like(m)).to(torch.float32)
    view = (n,) + (1,) * (a.dim() - 1)
    q = torch.floor(a / s.view(view) + uniform(key, slot, tuple(a.shape))).clamp_(-GRAD_LEVELS, GRAD_LEVELS)
    return q, s


def sum_in_order(terms) -> torch.Tensor:
    """``terms[0] + terms[1] + ...`` in float32, in this order (the device accumulates sample by sample)."""
    acc = None
    for t in terms:
        acc = t.clone() if acc is None else acc + t
    return acc


def int_sum_dtype(bound: float) -> torch.dtype:
    """float32 while every partial sum of integers stays below 2^24 (exact in any order), else float64."""
    return torch.float32 if bound < 2.0**24 else torch.float64


# ---------------------------------------------------------------- loss


def softmax_q15(q: torch.Tensor, logit_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed-point softmax of int8 logits ``q`` (``N x K``) with scale ``logit_scale``: ``(p Q15, e Q0.31)``."""
    p_params = kernels.softmax_params(logit_scale)
    d = q.to(torch.int64) - q.to(torch.int64).max(dim=1, keepdim=True).values
    keep = d >= p_params.diff_min
    scaled = kernels.saturating_rounding_doubling_high_mul(
        kernels._wrap32(d << p_params.input_left_shift), p_params.input_multiplier
    )
    e = torch.where(keep, kernels.exp_on_negative_values(torch.where(keep, scaled, 0)), 0)
    total = e.sum(dim=1, keepdim=True)  # int64: exact
    p = torch.div(e * Q15 + total // 2, total, rounding_mode="floor")
    return p, e


def loss_values(e: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Per-sample ``-ln p_y = ln S - ln e_y`` from the fixed-point exponentials (a zero ``e_y`` counts as 1/2)."""
    total = e.sum(dim=1).tolist()
    ey = e.gather(1, y.view(-1, 1)).flatten().tolist()
    return [math.log(t) - math.log(v if v > 0 else 0.5) for t, v in zip(total, ey)]


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, q, y, logit_scale):
        p, e = softmax_q15(q, logit_scale)
        ctx.save_for_backward(p, y)
        losses = loss_values(e, y)
        return torch.tensor(math.fsum(losses) / len(losses), dtype=torch.float32)

    @staticmethod
    def backward(ctx, g_loss):
        p, y = ctx.saved_tensors
        onehot = torch.zeros_like(p)
        onehot.scatter_(1, y.view(-1, 1), Q15)
        grad = ((p - onehot).to(torch.float32) * 2.0**-15) / float(p.shape[0])
        if float(g_loss) != 1.0:  # the step differentiates the loss itself; anything else scales it
            grad = grad * g_loss.to(torch.float32)
        return grad, None, None, None


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, logit_scale: float, logit_zero: int) -> torch.Tensor:
    """Mean cross-entropy of dequantized int8 logits ``(q - z) * s``, its gradient in fixed point (see module)."""
    q = torch.round(logits.detach() / logit_scale) + logit_zero
    return _CrossEntropy.apply(logits, q.to(torch.int64), y, logit_scale)
