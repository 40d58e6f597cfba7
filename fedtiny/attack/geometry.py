"""Images as 4x4 blocks: what tiny-ir's trap returns and what placement arranges."""

from __future__ import annotations

import numpy as np

__all__ = ["BLOCK", "PIXELS", "blocks_of", "image_of", "grey"]

BLOCK = 4  # side of the pixel blocks each 8x8 position of block 2 holds
PIXELS = BLOCK * BLOCK


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
