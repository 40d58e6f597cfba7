"""The learned inverter: a network trained to map what a client sends to the image behind it.

For a fixed model the client's update is a deterministic function of its image (up to the
client's seeded rounding), so a server with public images can learn the inverse function instead
of optimizing through the network ("learning to invert", Wu et al. 2022). The inverter sees
exactly what the server decodes: the same update format (scheme slices, int8 values, top-k), made
by the same code path as the targets' (the caller passes the rows).

Features: each update coordinate standardized over the public rows, projected on their leading
principal directions; an MLP (features -> 2048 -> 2048 -> H x W grey, sigmoid) trained with Adam
on the squared error.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from fedtiny.progress import say

__all__ = ["Inverter", "fit_inverter", "augment"]


@dataclass
class Inverter:
    """A trained inverter: ``inverter(rows [N, F]) -> images [N, H, W]`` in [0, 1]."""

    mu: torch.Tensor
    sd: torch.Tensor
    basis: torch.Tensor
    scale: torch.Tensor
    net: torch.nn.Module
    shape: tuple[int, int]

    def features(self, rows: torch.Tensor) -> torch.Tensor:
        return ((rows - self.mu) / self.sd) @ self.basis / self.scale

    @torch.no_grad()
    def __call__(self, rows: np.ndarray | torch.Tensor) -> np.ndarray:
        f = self.features(torch.as_tensor(rows, dtype=torch.float32))
        return torch.sigmoid(self.net(f)).view(-1, *self.shape).numpy()


def fit_inverter(
    rows: np.ndarray | torch.Tensor,
    images: np.ndarray,
    *,
    components: int = 1024,
    hidden: int = 2048,
    epochs: int = 30,
    batch_size: int = 256,
    seed: int = 0,
    log=sys.stderr,
) -> Inverter:
    """Train an inverter on public ``rows`` (one flattened update each) and their grey ``images`` ``[N, H, W]``."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.as_tensor(rows, dtype=torch.float32)
    target = torch.as_tensor(images, dtype=torch.float32).flatten(1)
    if len(rows) != len(target) or len(rows) < 2:
        raise ValueError(f"learned inverter: {len(rows)} update rows for {len(target)} images (need >= 2 of each)")
    mu, sd = rows.mean(0), rows.std(0) + 1e-12
    q = min(components, rows.shape[1], len(rows))
    torch.manual_seed(seed)  # pca_lowrank draws from the global generator
    _, _, basis = torch.pca_lowrank((rows - mu) / sd, q=q, center=False)
    feats = ((rows - mu) / sd) @ basis
    scale = feats.std(0) + 1e-6
    feats = feats / scale
    net = torch.nn.Sequential(
        torch.nn.Linear(q, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, target.shape[1]),
    )
    with torch.no_grad():  # seeded initialization
        for p in net.parameters():
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) / np.sqrt(p.shape[-1]))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for epoch in range(epochs):
        order = torch.randperm(len(feats), generator=gen)
        for i in range(0, len(feats), batch_size):
            b = order[i : i + batch_size]
            opt.zero_grad()
            loss = (torch.sigmoid(net(feats[b])) - target[b]).square().mean()
            loss.backward()
            opt.step()
        sched.step()
        if log is not None and (epoch + 1) % max(1, epochs // 5) == 0:
            say(f"attack: learned inverter: epoch {epoch + 1}/{epochs}, training MSE {loss.item():.4f}", log)
    net.eval()
    return Inverter(mu, sd, basis, scale, net, tuple(images.shape[1:]))


def augment(images: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` variants of grey public ``images`` ``[N, H, W]`` in [0, 1]: mirrored at random, shifted by up
    to 2 pixels, contrast x U(0.7, 1.3) and brightness + U(-0.15, 0.15) (seeded)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, *images.shape[1:]), np.float32)
    for i in range(n):
        im = images[rng.integers(len(images))]
        im = im[:, ::-1] if rng.random() < 0.5 else im
        im = np.roll(im, rng.integers(-2, 3, 2), (0, 1))
        im = (im - im.mean()) * rng.uniform(0.7, 1.3) + im.mean() + rng.uniform(-0.15, 0.15)
        out[i] = np.clip(im, 0.0, 1.0)
    return out
