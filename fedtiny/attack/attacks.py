"""The attacker: rebuild the targets' images (and labels) from what the server observed.

The methods (their losses and optimizers) are registered in :mod:`fedtiny.attack.methods`:
``dlg``: L2 distance of the simulated update to the observed one, L-BFGS (Zhu et al. 2019).
``ig``: Inverting Gradients (Geiping et al. 2020): 1 - cosine similarity plus total variation,
Adam on signed gradients, box constraint, restarts.
``rounding``: for integer (int8) updates: each sent integer says the client's float change lay
within its rounding interval; the loss is the squared distance outside those intervals, in LSB,
plus total variation, with IG's optimizer. It needs the client's training simulated exactly
(scale matters, unlike cosine). Labels by iDLG (Zhao et al. 2020) from the
last layer's update, or given. Only the transmitted coordinates are matched (masked loss).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, TextIO

import torch
from torch import nn

from fedtiny.attack.methods import attack_method
from fedtiny.attack.threat import ThreatModel
from fedtiny.attack.user import Observation, update_fn
from fedtiny.errors import ScenarioError
from fedtiny.progress import left, say, seconds

__all__ = ["AttackConfig", "Intervals", "idlg_labels", "match_cosine", "progress_printer", "reconstruct"]


@dataclass(frozen=True)
class AttackConfig:
    """How the attacker optimizes."""

    method: str = "dlg"  # a gradient-matching method of fedtiny.attack.methods (dlg, ig, rounding)
    iterations: int = 300
    restarts: int = 1
    tv: float = 1e-4  # total-variation weight (ig)
    lr: float = 1.0  # L-BFGS step (dlg) or Adam step (ig: 0.1 is used when 1.0 is given)
    history: int = 100  # L-BFGS memory (torch.optim.LBFGS default, as DLG used)
    seed: int = 0


def _classifier(model: nn.Module, obs: Observation) -> str:
    """Name prefix of the last layer (the classifier) among the observed tensors."""
    if "classifier.weight" in obs:
        return "classifier"
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names or f"{names[-1]}.weight" not in obs:
        raise ScenarioError("iDLG needs the last layer's update (a final linear layer or 'classifier')")
    return names[-1]


def idlg_labels(model: nn.Module, obs: Observation, threat: ThreatModel, batch: int = 1) -> torch.Tensor:
    """Labels from the last layer's update (iDLG).

    For cross-entropy the gradient of the last layer's bias is ``p - y``: only the
    true classes' entries are negative. A bias under top-k still works: its unsent
    entries are the smaller ones and count as 0. Without a usable bias (not sent, or
    rounded to nothing), the weight rows ``(p_j - y_j) * features`` are used: for one
    image the true class's row is the longest (``1 - p_y`` is the sum of the other
    ``p_j``), whatever the features' signs; for several, the most negative row sums,
    which needs non-negative features (a ReLU or sigmoid before the classifier). A
    FedAvg change points the other way (``-lr * gradient``). Returns [B, batch] labels.
    """
    layer = _classifier(model, obs)
    sign = -1.0 if threat.observation == "delta" else 1.0
    values, mask = obs[f"{layer}.weight"]
    sent = (values * mask).flatten(2)  # [B, K, features]
    if batch == 1:
        score = -sent.norm(dim=-1)  # the longest row is the most "negative" score
    else:
        score = sign * sent.sum(-1)
    bias = obs.get(f"{layer}.bias")
    if bias is not None:
        b = sign * bias[0] * bias[1]
        usable = (b != 0).any(dim=1, keepdim=True)
        score = torch.where(usable, b, score)
    return score.topk(batch, dim=1, largest=False).indices.sort(dim=1).values


Intervals = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Per tensor: (one LSB in real units, half-width of a sent value's rounding interval in real units)."""


def objective(
    model: nn.Module,
    obs: Observation,
    threat: ThreatModel,
    labels: torch.Tensor,
    num_classes: int,
    cfg: AttackConfig,
    intervals: Intervals | None = None,
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``f_and_grad(x)`` for all targets: per-target matching loss and its gradient."""
    method = attack_method(cfg.method)
    if method.loss is None:
        raise ScenarioError(
            f"attack method {cfg.method!r} does not match updates (it attacks a simulation's observations as a whole)"
        )
    if method.needs_intervals and not intervals:
        raise ScenarioError(f"attack method {cfg.method!r} needs the rounding intervals of an integer update")
    params = dict(model.named_parameters())
    trainable = {k: params[k].detach() for k in obs}
    frozen = {k: v.detach() for k, v in params.items() if k not in trainable}
    frozen.update({k: v.detach() for k, v in model.named_buffers()})
    simulate = update_fn(model, threat, frozen)
    soft = torch.nn.functional.one_hot(labels, num_classes).float()

    def f_and_grad(x: torch.Tensor, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        o = obs if idx is None else {k: (v[idx], m[idx]) for k, (v, m) in obs.items()}
        upd = simulate(trainable, x, soft if idx is None else soft[idx])
        f = method.loss(upd, o, x, cfg, intervals)
        (g,) = torch.autograd.grad(f.sum(), x)
        return f.detach(), g

    return f_and_grad


def progress_printer(
    iterations: int, log: TextIO | None = sys.stderr, every: int = 250
) -> Callable[[int, torch.Tensor], None]:
    """A ``progress`` callback for :func:`reconstruct` that prints the median loss every ``every`` iterations."""
    t0 = time.perf_counter()

    def progress(it: int, f: torch.Tensor) -> None:
        if log is not None and (it + 1) % every == 0:
            spent = time.perf_counter() - t0
            pace = left(it + 1, iterations, spent)
            say(
                f"attack iteration {it + 1}/{iterations}: median loss {float(f.median()):.3g} | {seconds(spent)}"
                + (f" | {pace}" if pace else ""),
                log,
            )

    return progress


def match_cosine(
    model: nn.Module, obs: Observation, threat: ThreatModel, x: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Cosine between each observed update and the attacker's simulation at the true images [B].

    An oracle diagnostic, not an attack: 1 means the attacker's model of the client
    reproduces what it sent; near 0 means rounding, top-k or an unknown training
    detail left little for gradient matching to match.
    """
    f_and_grad = objective(model, obs, threat, labels, num_classes, AttackConfig(method="ig", tv=0.0))
    return 1 - f_and_grad(x)[0]


def reconstruct(
    model: nn.Module,
    obs: Observation,
    threat: ThreatModel,
    shape: tuple[int, ...],
    num_classes: int,
    cfg: AttackConfig,
    labels: torch.Tensor | None = None,
    progress: Callable[[int, torch.Tensor], None] | None = None,
    intervals: Intervals | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruct every target's batch: returns images [B, b, C, H, W] and labels [B, b].

    ``intervals``: the rounding intervals of an integer update (method ``rounding``).
    """
    first = next(iter(obs.values()))[0]
    n_targets, b = first.shape[0], threat.batch_size
    if labels is None:
        labels = idlg_labels(model, obs, threat, b)
    # Restarts are solved together: R copies of every target in one vectorized problem.
    r = max(1, cfg.restarts)
    rep = {k: (v.repeat(r, *([1] * (v.dim() - 1))), m.repeat(r, *([1] * (m.dim() - 1)))) for k, (v, m) in obs.items()}
    f_and_grad = objective(model, rep, threat, labels.repeat(r, 1), num_classes, cfg, intervals)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, f = attack_method(cfg.method).search(f_and_grad, (r * n_targets, b, *shape), gen, cfg, progress)
    best = f.view(r, n_targets).argmin(0)  # each target's restart with the lowest matching loss
    x = x.view(r, n_targets, *x.shape[1:])[best, torch.arange(n_targets)]
    return x, labels
