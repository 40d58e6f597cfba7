"""The clients' learning rate when the scenario leaves it to the model (``train.lr = 0``).

A model the cloud pretrains from scratch (tiny-ir, a ``model.module``) has its own default. A
pretrained int8 network (``model.file``: a published MCUNet, an MLPerf Tiny ``.tflite``) has no
value one can know in advance: a rate that suits tiny-ir (0.005) wrecks MCUNet, whose QAS-scaled
steps want about 1e-4. The server then chooses it on its public split, seen through the fleet's
sensors (the data the scheme search uses): starting from the cloud model, each rate of
:data:`LR_GRID` fine-tunes the scheme a client of the smallest device would train (on at most
:data:`TRIAL_SAMPLES` images, for the clients' local epochs, optimizer and batch size), and the
rate with the lowest held-out loss is sent to the clients (ties: the larger rate). Loss, not
accuracy: the held-out set can be tiny (18 images for VWW on lfw faces), where accuracy moves in
steps of 5 points and a rule on it (the largest rate within one standard error of the best
accuracy, tried first) chose rates of 1e-3 and 3e-3 whose federations fell from 0.88 to 0.48;
the loss sees a rate start to hurt before the argmax flips. The run log and summary say which
rate was used and where it came from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fedtiny.budget.schemes import parse_scheme
from fedtiny.federated.train import evaluate, seeded, train_local
from fedtiny.models.state import load_arrays

__all__ = ["LR_GRID", "MODEL_DEFAULT_LR", "LrChoice", "fixed_lr", "grid_lr", "trial_scheme", "with_lr"]

LR_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
MODEL_DEFAULT_LR = 0.005  # tiny-ir fine-tuned after cloud pretraining (the quickstart's regime)
TRIAL_SAMPLES = 256  # images each trial trains on: a few client rounds' worth, minutes at 128x128


@dataclass(frozen=True)
class LrChoice:
    """The learning rate clients use, where it came from, and the trial scores behind a choice."""

    lr: float
    source: str  # "scenario", "model default", "public split"
    scores: dict[float, tuple[float, float]] = field(default_factory=dict)  # lr -> (val accuracy, val loss)

    def describe(self) -> str:
        if self.source != "public split":
            return f"learning rate {self.lr:g} ({self.source})"
        tried = ", ".join(f"{lr:g}: {loss:.3f}/{acc:.3f}" for lr, (acc, loss) in sorted(self.scores.items()))
        return f"learning rate {self.lr:g} chosen on the public split (held-out loss/accuracy {tried})"


def with_lr(scenario, lr: float):
    """``scenario`` with ``train.lr`` set (what the clients receive)."""
    return dataclasses.replace(scenario, train=dataclasses.replace(scenario.train, lr=float(lr)))


def fixed_lr(scenario) -> LrChoice | None:
    """The rate when no trial is needed: the scenario's own, or the model's default; else ``None``."""
    if scenario.train.lr > 0:
        return LrChoice(scenario.train.lr, "scenario")
    if not scenario.model.file or scenario.model.precision != "int8":
        return LrChoice(MODEL_DEFAULT_LR, "model default")
    return None


def trial_scheme(scenario, scheme: str | None = None) -> str | None:
    """The scheme the trials train: ``scheme``, else ``last-k:fit`` when a search chooses the
    scheme per device, else ``None`` (the scenario's own)."""
    if scheme is None and _searched(scenario.scheme_text):
        return "last-k:fit"
    return scheme


def grid_lr(
    scenario, model, state: dict[str, np.ndarray], train, val, progress: Callable[[str], None] | None = None
) -> LrChoice:
    """Fine-tune ``model`` from ``state`` at each rate of :data:`LR_GRID` on at most
    :data:`TRIAL_SAMPLES` of ``train`` and keep the rate with the lowest loss on ``val`` (ties: the
    larger). ``model`` is left holding ``state``."""
    t = scenario.train
    train = train.subset(np.arange(min(len(train), TRIAL_SAMPLES)))
    scores: dict[float, tuple[float, float]] = {}
    for lr in LR_GRID:
        load_arrays(model, state)
        train_local(
            model,
            train,
            epochs=t.local_epochs,
            batch_size=t.batch_size,
            lr=lr,
            optimizer=t.optimizer,
            momentum=t.momentum,
            gen=seeded(scenario.run.seed, 505),
            rounding=t.weight_rounding,
            gradients=t.gradients,
        )
        loss, acc = evaluate(model, val)
        scores[lr] = (acc, loss)
        if progress:
            progress(f"learning rate {lr:g}: held-out accuracy {acc:.4f}, loss {loss:.4f}")
    load_arrays(model, state)
    best = min(LR_GRID, key=lambda lr: (scores[lr][1], -lr))
    return LrChoice(best, "public split", scores)


def _searched(text: str) -> bool:
    """The scheme is chosen per device by a search (``search``, ``fisher``, ``random:N``): try last-k:fit."""
    return bool(parse_scheme(text).rule)
