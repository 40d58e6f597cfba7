"""Optimizers for the int8 graph: plain SGD, SGD with QAS, Adam; the device keeps integers.

Parameters of a :class:`~fedtiny.int8.graph.QConv` are in integer units: a weight
``W = s_w * W_int`` and a bias ``b = s_w * s_x * b_int``. The gradient with
respect to ``W_int`` is ``s_w`` times the float gradient, so the float-equivalent
update needs the gradient scaled by ``s_w^-2`` (and by ``(s_w * s_x)^-2`` for
the bias): quantization-aware scaling (QAS, Lin et al. 2022). Plain ``sgd`` skips
the scaling, which is why int8 training without QAS barely moves.

After every step, weights are rounded back to int8 (stochastically by default,
so that updates smaller than one step are kept on average) and biases to int32:
what the device stores between steps are integers. An fp32 classifier head
(``model.classifier_precision = fp32``) and the optimizer state (SGD momentum,
Adam moments) are float32 on the device; :func:`device_float_state` lists them for
the memory model.
"""

from __future__ import annotations

import torch
from torch import nn

from fedtiny.errors import ScenarioError
from fedtiny.int8 import exact
from fedtiny.int8.graph import INT32_MAX, INT32_MIN, QConv
from fedtiny.int8.optimizers import optimizer_kind, optimizer_names

__all__ = ["QuantizedOptimizer", "device_float_state"]


class QuantizedOptimizer:
    """``zero_grad``/``step`` like a torch optimizer, with QAS scaling and integer projection.

    Parameters
    ----------
    model
        A :class:`~fedtiny.int8.graph.QModel` (only parameters with ``requires_grad`` are trained).
    name
        A registered optimizer (:mod:`fedtiny.int8.optimizers`: ``sgd``, ``sgd+qas``, ``adam``).
    lr, momentum
        Learning rate (in float units for ``sgd+qas``; in integer units otherwise) and SGD momentum.
    rounding
        ``stochastic`` or ``nearest`` rounding of int8 weights after each step.
    gen
        Generator for stochastic rounding (seeded: same seed, same integers).
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        lr: float,
        momentum: float = 0.0,
        rounding: str = "stochastic",
        gen: torch.Generator | None = None,
    ) -> None:
        if name not in optimizer_names():
            raise ScenarioError(f"train.optimizer: expected one of {', '.join(optimizer_names())}, got {name!r}")
        kind = optimizer_kind(name)
        if rounding not in ("stochastic", "nearest"):
            raise ScenarioError(f"train.weight_rounding: expected stochastic or nearest, got {rounding!r}")
        self.qas = kind.qas
        self.rounding, self.gen = rounding, gen
        # the exact step's update (fedtiny.int8.exact): float32 scalars, its own momentum buffers
        self.lr32, self.momentum32 = torch.tensor(lr, dtype=torch.float32), torch.tensor(momentum, dtype=torch.float32)
        self.momentum = float(momentum)
        self.buffers: dict[int, torch.Tensor] = {}
        # (param, QAS gradient factor or None, integer range or None)
        self.slots: list[tuple[nn.Parameter, torch.Tensor | None, tuple[int, int] | None]] = []
        self.owners: list[QConv | None] = []  # the convolution of each slot (its stream index for rounding)
        for module in model.modules():
            if isinstance(module, QConv):
                shape = (-1,) + (1,) * (module.weight.dim() - 1)
                ws = module.w_scales.double()
                if module.weight.requires_grad:
                    self.slots.append((module.weight, (ws**-2).float().view(shape), (-127, 127)))
                    self.owners.append(module)
                if module.bias.requires_grad:
                    self.slots.append((module.bias, ((ws * module.x_scale) ** -2).float(), (INT32_MIN, INT32_MAX)))
                    self.owners.append(module)
        quantized = {id(p) for p, _, _ in self.slots}
        for p in model.parameters():
            if p.requires_grad and id(p) not in quantized:
                self.slots.append((p, None, None))  # a float head: trained in float, no projection
                self.owners.append(None)
        params = [p for p, _, _ in self.slots]
        self.inner: torch.optim.Optimizer = kind.torch(params, lr, momentum)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        key = exact.current()
        if key is not None:
            self._exact_step(key)
            return
        if self.qas:
            for p, factor, _ in self.slots:
                if factor is not None and p.grad is not None:
                    p.grad.mul_(factor)
        self.inner.step()
        for p, _, bounds in self.slots:
            if bounds is None:
                continue
            if bounds[1] == 127 and self.rounding == "stochastic":
                noise = torch.rand(p.shape, generator=self.gen, dtype=p.dtype)
                p.copy_(torch.floor(p + noise))
            else:
                p.copy_(torch.round(p))
            p.clamp_(*bounds)

    def _exact_step(self, key: exact.StepKey) -> None:
        """The exact step's update: float32 elementwise, integers rounded as :mod:`fedtiny.int8.exact` states."""
        for i, ((p, factor, bounds), owner) in enumerate(zip(self.slots, self.owners)):
            if p.grad is None:
                continue
            if bounds is None:
                raise ValueError("the exact step trains int8 tensors only (a float head needs train.gradients = float)")
            g = p.grad.to(torch.float32)  # a bias gradient is float64 holding a float32 value
            if self.qas:
                g = g * factor
            if self.momentum > 0:
                buf = self.buffers.get(i)
                if buf is None:
                    buf = self.buffers[i] = g.clone()
                else:
                    buf.mul_(self.momentum32).add_(g)
                g = buf
            d = g * self.lr32
            if bounds[1] == 127:  # int8 weight: w - d rounded (stochastically: floor of + u)
                t = p - d
                if self.rounding == "stochastic":
                    t = torch.floor(t + exact.uniform(key, exact.round_slot(owner.slot), tuple(p.shape)))
                else:
                    t = exact.round_half_away(t)
                p.copy_(t.clamp_(-127, 127))
            else:  # int32 bias in float64: plus the rounded change, exactly
                p.add_(exact.round_half_away(-d).to(p.dtype)).clamp_(*bounds)


def device_float_state(model: nn.Module, optimizer: str, momentum: float) -> dict[str, int]:
    """Float32 numbers the device keeps for training besides its integers (for the memory model).

    Returns element counts: ``head`` (an fp32 classifier's trainable tensors) and
    ``optimizer`` (momentum buffers or Adam's two moments for every trained tensor).
    """
    trained = [p for p in model.parameters() if p.requires_grad]
    head = sum(
        p.numel()
        for m in model.modules()
        if not isinstance(m, QConv)
        for p in m.parameters(recurse=False)
        if p.requires_grad
    )
    per = optimizer_kind(optimizer).state_slots(momentum)
    return {"head": head, "optimizer": per * sum(p.numel() for p in trained)}
