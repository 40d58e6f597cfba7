"""A seeded, class-conditional image generator: a load generator for fleets of any size.

Not a benchmark: its accuracies say nothing about real data. It exists so that a run
with 10,000 clients can be built without a dataset of 10,000 clients' images, and so
that each client's images are drawn only when that client first needs them.

Each class has a smooth random prototype (a coarse random grid, upsampled); an image
is its class's prototype shifted by up to one pixel, scaled in contrast and plus pixel
noise. Everything is seeded: the same ``(seed, partition_id)`` always gives the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Synthetic", "DEFAULT_SIZE"]

DEFAULT_SIZE = 8  # image side when data.image_size is 0 (the digits' size)


@dataclass(frozen=True)
class Synthetic:
    """The generator of one scenario.

    Parameters
    ----------
    seed
        The run's seed (prototypes, server splits and every client's draw derive from it).
    num_classes, size, channels
        Classes, image side (the height when ``width`` is given) and channels.
    samples_per_client
        Images each client holds.
    partition, alpha, classes_per_client
        Label mix per client: ``iid`` (uniform), ``dirichlet`` (class shares drawn from
        Dir(``alpha``)), ``pathological`` (``classes_per_client`` classes).
    noise
        Standard deviation of the pixel noise.
    """

    seed: int
    num_classes: int = 10
    size: int = DEFAULT_SIZE
    channels: int = 1
    samples_per_client: int = 24
    partition: str = "iid"
    alpha: float = 0.5
    classes_per_client: int = 2
    noise: float = 0.15
    width: int = 0  # image width; 0: square (size x size)

    def prototypes(self) -> np.ndarray:
        """``num_classes x C x size x width`` class prototypes in [0, 1] (``width`` 0: ``size``)."""
        width = self.width or self.size
        coarse = max(2, self.size // 2)
        coarse_w = max(2, width // 2) if self.width else coarse
        grid = np.random.default_rng([self.seed, 71]).random((self.num_classes, self.channels, coarse, coarse_w))

        protos = F.interpolate(
            torch.from_numpy(grid.astype(np.float32)), size=(self.size, width), mode="bilinear", align_corners=False
        ).numpy()
        lo = protos.min(axis=(1, 2, 3), keepdims=True)
        hi = protos.max(axis=(1, 2, 3), keepdims=True)
        return ((protos - lo) / np.maximum(hi - lo, 1e-6)).astype(np.float32)

    def draw(self, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Images (float32 NCHW in [0, 1]) of the given ``labels``, drawn with ``rng``; and the labels."""
        protos = self.prototypes()
        n = len(labels)
        x = protos[labels]
        shifts = rng.integers(-1, 2, size=(n, 2))
        x = np.stack([np.roll(img, tuple(s), axis=(1, 2)) for img, s in zip(x, shifts)]) if n else x
        contrast = rng.uniform(0.8, 1.2, size=(n, 1, 1, 1)).astype(np.float32)
        x = x * contrast + rng.normal(0.0, self.noise, size=x.shape).astype(np.float32)
        return np.clip(x, 0.0, 1.0).astype(np.float32), labels.astype(np.int64)

    def server_split(self, which: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The server's split number ``which`` (0 public, 1 test) of ``n`` images with uniform labels."""
        rng = np.random.default_rng([self.seed, 901, which])
        return self.draw(rng.integers(0, self.num_classes, n), rng)

    def client(self, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``partition_id``'s images (before its sensor shift)."""
        rng = np.random.default_rng([self.seed, 907, partition_id])
        k, n = self.num_classes, self.samples_per_client
        if self.partition == "dirichlet":
            labels = rng.choice(k, n, p=rng.dirichlet(np.full(k, self.alpha)))
        elif self.partition == "pathological":
            labels = rng.choice(rng.choice(k, min(self.classes_per_client, k), replace=False), n)
        else:
            labels = rng.integers(0, k, n)
        return self.draw(np.sort(labels), rng)
