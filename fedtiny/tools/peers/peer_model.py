"""tiny-ir in plain PyTorch, and the client and server steps every peer runner shares.

The peers (Flower's plain simulation, pfl-research) run in environments that may not have fedtiny,
so this file imports only NumPy and torch. The network is a copy of
:class:`fedtiny.models.tinyir.TinyIR` with the same module names (so the same state dict), with one
difference that matters: its BatchNorm always uses its running statistics, as fedtiny's fp32
clients do (they train with BatchNorm frozen, in ``eval`` mode, because on the device it is folded
into the convolutions). A framework that calls ``model.train()`` before local training (pfl does)
then trains the same function fedtiny does. ``tests/test_bench_peers.py`` checks the copy against
fedtiny's network.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FrozenBatchNorm2d",
    "TinyIR",
    "build",
    "load_npz_state",
    "parameter_names",
    "train_client",
    "evaluate",
    "client_slices",
    "cached",
]

_CACHE: dict = {}


def cached(key: str, make):
    """``make()`` once per process (a simulation calls its client code many times in one worker process)."""
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that normalises with its running statistics in train mode too (they never change)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        FrozenBatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [_conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.residual else y


class TinyIR(nn.Module):
    """fedtiny's tiny-ir (stem, inverted-residual blocks, pooling, linear head) with frozen BatchNorm."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16, image_size: int = 8) -> None:
        super().__init__()
        w = width
        cfg = [(w, w, 1, 1), (w, 2 * w, 2, 3), (2 * w, 2 * w, 1, 3)]
        if image_size >= 24:
            cfg.append((2 * w, 2 * w, 2, 3))
        self.stem = _conv_bn(in_channels, w, 3, stride=2 if image_size >= 16 else 1)
        self.blocks = nn.Sequential(*[_InvertedResidual(*c) for c in cfg])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.blocks(self.stem(x))).flatten(1))


def load_npz_state(model: nn.Module, path: str) -> None:
    """Load a state dict saved as ``.npz`` (one array per state-dict name; no pickle) into ``model``.

    Raises
    ------
    ValueError
        When the file's names or shapes are not the model's.
    """
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    # BatchNorm's batch counter is not part of a model's state on the wire (it never changes here)
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    if set(arrays) != set(own):
        missing, extra = sorted(set(own) - set(arrays)), sorted(set(arrays) - set(own))
        raise ValueError(f"{path}: not this model's state (missing {missing[:4]}, unexpected {extra[:4]})")
    for name, t in own.items():
        if tuple(arrays[name].shape) != tuple(t.shape):
            raise ValueError(f"{path}: {name} has shape {arrays[name].shape}, the model's is {tuple(t.shape)}")
    model.load_state_dict(
        {k: torch.from_numpy(np.array(v, dtype=own[k].numpy().dtype)) for k, v in arrays.items()}, strict=False
    )


def build(spec: dict) -> TinyIR:
    """The workload's network with its initial weights (``spec``: the JSON the bench passes a worker)."""
    model = TinyIR(spec["in_channels"], spec["num_classes"], spec["width"], spec["image_size"])
    load_npz_state(model, spec["init"])
    return model


def parameter_names(model: nn.Module) -> list[str]:
    """What a client trains and sends back: the parameters (BatchNorm statistics stay frozen)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def client_slices(data: dict[str, np.ndarray]) -> list[tuple[int, int]]:
    """``(start, stop)`` of each client's rows of ``x_train`` / ``y_train`` in the bench's data file."""
    offsets = data["offsets"]
    return [(int(offsets[i]), int(offsets[i + 1])) for i in range(len(offsets) - 1)]


def train_client(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    gen: torch.Generator | None,
) -> int:
    """Plain local SGD: ``epochs`` passes over the client's samples, shuffled by ``gen`` (None: in order, as pfl
    goes through a user's dataset); returns the steps taken."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=momentum)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    steps = 0
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(yt), generator=gen) if gen is not None else torch.arange(len(yt))
        for i in range(0, len(yt), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
            steps += 1
    model.eval()
    return steps


def client_round(
    model: nn.Module, data: dict, slices, pid: int, spec: dict, server_round: int, shuffled: bool = True
) -> int:
    """Client ``pid``'s local training in ``server_round`` of the workload ``spec`` (its own seeded
    shuffle, the one every runner and the replay use); returns its number of examples."""
    lo, hi = slices[pid]
    seed = int(np.random.SeedSequence([spec["seed"], server_round, pid]).generate_state(1)[0])
    train_client(
        model,
        data["x_train"][lo:hi],
        data["y_train"][lo:hi],
        epochs=spec["local_epochs"],
        batch_size=spec["batch_size"],
        lr=spec["lr"],
        momentum=spec["momentum"],
        gen=torch.Generator().manual_seed(seed) if shuffled else None,
    )
    return hi - lo


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """Accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        out = model(torch.from_numpy(x[i : i + batch_size]))
        correct += int((out.argmax(1) == torch.from_numpy(y[i : i + batch_size])).sum())
    return correct / max(len(y), 1)
