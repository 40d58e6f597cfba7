"""Local training and evaluation of a model on an :class:`~fedtiny.data.ImageSet`.

Clients fine-tune with BatchNorm statistics frozen (``eval`` mode): on the device
BatchNorm is folded into the convolutions, so only weights and biases can change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedtiny.budget.memory import c_layout
from fedtiny.data import ImageSet
from fedtiny.errors import ModelFileError, ScenarioError
from fedtiny.int8 import cstep, exact
from fedtiny.int8.graph import QConv, QModel
from fedtiny.int8.optim import QuantizedOptimizer
from fedtiny.int8.optimizers import optimizer_kind, optimizer_names

__all__ = ["TrainResult", "train_local", "evaluate", "pretrain", "seeded", "make_optimizer", "exact_applies"]


@dataclass(frozen=True)
class TrainResult:
    """What one local training run reports."""

    loss: float
    accuracy: float
    num_examples: int
    steps: int
    samples: int = 0  # samples trained on, over all epochs


def seeded(*parts: int) -> torch.Generator:
    """A torch generator seeded from integers (round, client, ...)."""
    g = torch.Generator()
    g.manual_seed(round_seed(*parts))
    return g


def round_seed(*parts: int) -> int:
    """The 32-bit seed :func:`seeded` gives its generator (the exact step's seed of a client round; the
    bridge sends it to devices so that they need not reimplement NumPy's SeedSequence)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _batches(data: ImageSet, batch_size: int, gen: torch.Generator | None, order: list[int] | None = None):
    for xb, yb, _ in _indexed_batches(data, batch_size, gen, order):
        yield xb, yb


def _indexed_batches(data: ImageSet, batch_size: int, gen: torch.Generator | None, order: list[int] | None = None):
    """Batches ``(x, y, sample indices)``: shuffled by ``gen``, in ``order``, or in order."""
    n = len(data)
    if order is not None:
        order = torch.tensor(order, dtype=torch.int64)
    else:
        order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx], idx


def _model_output(model: nn.Module, xb: torch.Tensor, idx: torch.Tensor, prefix) -> torch.Tensor:
    """The model's logits of a batch: from its cached frozen prefix when there is one."""
    if prefix is None:
        return model(xb)
    return model.forward_from(prefix.start, prefix.batch(idx))


def make_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    momentum: float = 0.0,
    *,
    rounding: str = "stochastic",
    gen: torch.Generator | None = None,
):
    """The optimizer for ``model``: QAS-capable and integer-projecting for the int8 graph, torch's otherwise."""
    if isinstance(model, QModel):
        return QuantizedOptimizer(model, name, lr, momentum, rounding, gen)
    params = [p for p in model.parameters() if p.requires_grad]
    if name not in optimizer_names():
        raise ScenarioError(f"train.optimizer: unknown optimizer {name!r}")
    kind = optimizer_kind(name)
    if kind.qas:
        raise ScenarioError(f'train.optimizer: {name!r} needs an int8 model (model.precision = "int8")')
    return kind.torch(params, lr, momentum)


def _exact_loss(model: nn.Module):
    """The exact step's loss for an int8 graph with an int8 classifier (fixed-point softmax gradient)."""
    head = model.classifier
    return lambda out, y: exact.cross_entropy(out, y, float(head.y_scale), int(head.y_zero))


def _set_mode(model: nn.Module, training: bool) -> None:
    """``model.train(training)``, unless every module is in that mode already and none does more in its own
    ``train``: setting the flags walks the modules through ``nn.Module.__setattr__`` (0.1-0.2 ms for
    tiny-ir), twice per client round that trains with BatchNorm frozen; reading them costs a fifth."""
    if any(m.training != training or type(m).train is not nn.Module.train for m in model.modules()):
        model.train(training)


def _epochs(
    model: nn.Module,
    data: ImageSet,
    opt,
    *,
    epochs: int,
    batch_size: int,
    gen: torch.Generator | None,
    bn_train: bool,
    scheduler=None,
    max_steps: int | None = None,
    exact_seed: int | None = None,
    c_step=None,
    order_seed: int | None = None,
    prefix=None,
) -> TrainResult:
    """The training loop every path shares; returns the last epoch's running loss and accuracy.

    ``max_steps``: stop after this many optimizer steps (a client out of time sends what it has).
    ``exact_seed``: run the exact step (:mod:`fedtiny.int8.exact`) with this seed; step ``k`` of the
    run draws its stochastic rounding from ``StepKey(exact_seed, k)``. ``c_step``: a
    :class:`~fedtiny.int8.cstep.CStep` of ``model`` that runs the steps instead of PyTorch. ``order_seed``:
    order each epoch by :func:`fedtiny.int8.exact.permutation` of it (``train.shuffle = "hash"``). ``prefix``:
    a :class:`~fedtiny.int8.prefix.FrozenPrefix` of ``data`` for the model's scheme (PyTorch steps only).
    """
    loss_fn = nn.CrossEntropyLoss() if exact_seed is None else _exact_loss(model)
    if exact_seed is not None:
        model.number_convs()
    total_loss, correct, seen, steps, samples = 0.0, 0, 0, 0, 0
    for epoch in range(epochs):
        if max_steps is not None and steps >= max_steps:
            break
        _set_mode(model, bn_train)
        total_loss, correct, seen = 0.0, 0, 0
        order = exact.permutation(len(data), order_seed, epoch) if order_seed is not None else None
        for xb, yb, idx in _indexed_batches(data, batch_size, gen, order):
            if max_steps is not None and steps >= max_steps:
                break
            if c_step is not None:  # the device's C step: the same numbers (fedtiny.int8.cstep)
                with torch.no_grad():
                    xq = model.quantize_input(xb).numpy().astype(np.int8)
                pred = torch.from_numpy(c_step.forward(xq).argmax(1))
                losses = c_step.step(xq, yb.numpy(), exact_seed, steps)
                loss_value = float(np.float32(math.fsum(losses) / len(losses)))
            else:
                opt.zero_grad(set_to_none=True)
                with exact.step(None if exact_seed is None else exact.StepKey(exact_seed, steps)):
                    out = _model_output(model, xb, idx, prefix)
                    loss = loss_fn(out, yb)
                    loss.backward()
                    opt.step()
                pred, loss_value = out.argmax(1), float(loss.detach())
            total_loss += loss_value * len(yb)
            correct += int((pred == yb).sum())
            seen += len(yb)
            samples += len(yb)
            steps += 1
        if scheduler is not None:
            scheduler.step()
    if c_step is not None:
        c_step.write_back()
    _set_mode(model, False)
    return TrainResult(total_loss / max(seen, 1), correct / max(seen, 1), len(data), steps, samples)


def exact_applies(model: nn.Module, optimizer: str) -> bool:
    """Whether the exact step can train ``model`` with ``optimizer``: an int8 graph, int8 head, SGD (with or without QAS)."""
    return (
        isinstance(model, QModel)
        and isinstance(model.classifier, QConv)
        and optimizer in optimizer_names()
        and optimizer_kind(optimizer).exact
    )


def train_local(
    model: nn.Module,
    data: ImageSet,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    gen: torch.Generator | None = None,
    freeze_bn: bool = True,
    rounding: str = "stochastic",
    max_steps: int | None = None,
    gradients: str = "float",
    engine: str = "torch",
    shuffle: str = "torch",
    prefixes=None,
) -> TrainResult:
    """Train ``model`` (fp32 or int8 graph) in place on ``data``; return the last epoch's loss and accuracy.

    ``max_steps``: stop after this many steps (None: all epochs). ``gradients``: ``exact`` runs
    the exact step (:mod:`fedtiny.int8.exact`; int8 graph, int8 head, sgd or sgd+qas), seeded
    from the ``gen``'s seed; ``float`` the float-gradient step. An fp32 model always trains in float.
    ``engine``: ``torch``, or ``c`` for the exact step in C (``device/c``; same numbers).
    ``prefixes``: a :class:`~fedtiny.int8.prefix.PrefixStore`: the PyTorch steps of an int8 graph run
    from the first trained op on the data's cached frozen prefix (the same numbers, less work).
    """
    exact_seed = None
    if gradients == "exact" and isinstance(model, QModel):
        if not exact_applies(model, optimizer):
            raise ScenarioError(
                "train.gradients: the exact step trains an int8 classifier with sgd or sgd+qas "
                f"(got optimizer {optimizer!r}, classifier {type(model.classifier).__name__}); "
                'set train.gradients = "float"'
            )
        exact_seed = int((gen.initial_seed() if gen is not None else 0) & 0xFFFFFFFF)
    elif gradients not in ("exact", "float"):
        raise ScenarioError(f"train.gradients: expected exact or float, got {gradients!r}")
    c_step = None
    if engine in ("c", "auto"):
        if engine == "c" and exact_seed is None:
            raise ScenarioError(
                'train.engine: the C step is the exact step: it needs an int8 model and train.gradients = "exact"'
            )
        if engine == "c" and not cstep.available():
            raise ScenarioError(f"train.engine: c needs {cstep.library_path()}: run make install (a C compiler)")
        if exact_seed is not None and cstep.available():  # auto: the C step where it runs (the same integers)
            try:
                c_step = cstep.CStep(
                    model,
                    lr=lr,
                    momentum=momentum,
                    optimizer=optimizer,
                    rounding=rounding,
                    layout=c_layout(model, tuple(data.x.shape[1:])),
                )
            except ModelFileError:
                if engine == "c":
                    raise
    elif engine != "torch":
        raise ScenarioError(f"train.engine: expected torch, c or auto, got {engine!r}")
    opt = make_optimizer(model, optimizer, lr, momentum, rounding=rounding, gen=gen)
    prefix = prefixes.get(model, data.x) if prefixes is not None and c_step is None and freeze_bn else None
    return _epochs(
        model,
        data,
        opt,
        epochs=epochs,
        batch_size=batch_size,
        gen=gen,
        bn_train=not freeze_bn,
        max_steps=max_steps,
        exact_seed=exact_seed,
        c_step=c_step,
        prefix=prefix,
        # the portable order a device computes: from the round's seed (the exact step's, when exact)
        order_seed=int((gen.initial_seed() if gen is not None else 0) & 0xFFFFFFFF) if shuffle == "hash" else None,
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, batch_size: int = 512, prefixes=None) -> tuple[float, float]:
    """Return ``(loss, accuracy)`` of ``model`` on ``data`` (0, 0 for empty data).

    An int8 graph with an int8 head reports the exact step's loss (fixed-point softmax of the int8
    logits, summed with ``math.fsum``): the same figure on every CPU. ``prefixes``: a
    :class:`~fedtiny.int8.prefix.PrefixStore` whose cached frozen prefix of ``data`` the graph starts from.
    """
    if len(data) == 0:
        return 0.0, 0.0
    model.eval()
    int8_head = isinstance(model, QModel) and isinstance(model.classifier, QConv)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    losses: list[float] = []
    correct = 0
    prefix = prefixes.get(model, data.x) if prefixes is not None else None
    for xb, yb, idx in _indexed_batches(data, batch_size, None):
        out = _model_output(model, xb, idx, prefix)
        if int8_head:
            head = model.classifier
            q = torch.round(out / float(head.y_scale)).to(torch.int64) + int(head.y_zero)
            losses += exact.loss_values(exact.softmax_q15(q, float(head.y_scale))[1], yb)
        else:
            losses.append(float(loss_fn(out, yb)))
        correct += int((out.argmax(1) == yb).sum())
    return math.fsum(losses) / len(data), correct / len(data)


def pretrain(model: nn.Module, data: ImageSet, *, epochs: int, lr: float, batch_size: int, seed: int) -> TrainResult:
    """Cloud pretraining on the server's public split: SGD with momentum, cosine schedule, BN in train mode."""
    if epochs == 0 or len(data) == 0:
        return TrainResult(0.0, 0.0, len(data), 0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    return _epochs(
        model,
        data,
        opt,
        epochs=epochs,
        batch_size=batch_size,
        gen=seeded(seed, 11),
        bn_train=True,
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs),
    )
