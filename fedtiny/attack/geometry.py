"""Images as 4x4 blocks: what tiny-ir's trap returns and what placement arranges."""

from __future__ import annotations

import numpy as np

__all__ = ["BLOCK", "PIXELS", "GRID", "blocks_of", "image_of", "grey", "on_grid", "from_grid"]

BLOCK = 4  # side of the pixel blocks each 8x8 position of block 2 holds
PIXELS = BLOCK * BLOCK
GRID = 32  # side of the image the traps read: 8x8 positions of 4x4 blocks


def blocks_of(img: np.ndarray) -> np.ndarray:
    """``H x W`` -> ``(H/4 * W/4) x 16`` non-overlapping 4x4 blocks, row-major, pixels row-major."""
    h, w = img.shape
    return img.reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK).transpose(0, 2, 1, 3).reshape(-1, PIXELS)


def image_of(blocks: np.ndarray, h: int, w: int) -> np.ndarray:
    """Inverse of :func:`blocks_of`."""
    return blocks.reshape(h // BLOCK, w // BLOCK, BLOCK, BLOCK).transpose(0, 2, 1, 3).reshape(h, w)


def grey(images: np.ndarray) -> np.ndarray:
    """``N x C x H x W`` in [0, 1] -> ``N x H x W``: the channel mean (what the trap's stem passes on)."""
    return np.asarray(images, np.float64).mean(axis=1)


def on_grid(images: np.ndarray) -> np.ndarray:
    """``N x C x H x W`` images as the traps see them: at ``GRID`` x ``GRID``, each pixel the mean of
    its ``H / GRID`` square (what the published models' trap passes on at 128x128); as they are at 32."""
    x = np.asarray(images)
    f = x.shape[-1] // GRID
    if x.shape[-1] == GRID or f * GRID != x.shape[-1] or x.shape[-2] != x.shape[-1]:
        return x
    return x.reshape(*x.shape[:-2], GRID, f, GRID, f).mean(axis=(-3, -1))


def from_grid(images: np.ndarray, size: int) -> np.ndarray:
    """``N x C x 32 x 32`` reconstructions at the input's ``size`` (bilinear, clipped to [0, 1])."""
    if images.shape[-1] == size:
        return images
    # deferred: torch is only needed to upsample
    import torch
    import torch.nn.functional as F

    up = F.interpolate(torch.as_tensor(np.asarray(images, np.float32)), size=(size, size), mode="bilinear")
    return np.clip(up.numpy(), 0.0, 1.0)
