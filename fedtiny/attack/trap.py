"""The imprint trap's settings and the layout of what it reads: shared by tiny-ir's trap
(``fedtiny.attack.malicious``) and the published models' (``fedtiny.attack.trap_mbconv``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtiny.attack.geometry import BLOCK, PIXELS

__all__ = [
    "Trap",
    "STEPS",
    "TRAP_LAYER",
    "TRAP_LAYERS",
    "PIXEL_CHANNELS",
    "BORDER_TAPS",
    "BORDER_CHANNELS",
    "TRAP_CHANNELS",
]

TRAP_LAYER = 6  # conv6: block 2's expansion, the bins
TRAP_LAYERS = (6, 9)  # block 2's expansion, or block 3's (beyond a policy that freezes the first 7)


@dataclass(frozen=True)
class Trap:
    """The malicious model's settings.

    Attributes
    ----------
    edges
        ``bins + 1`` increasing bin edges of block brightness in [0, 1] (``block_edges``).
    pixel_gain
        Block 2's input carries pixels times this: the weight change of a bin grows with its square
        (its input and its smaller weight scale), so the change stands well above int8 rounding.
    head_gain
        Classifier weight on the summed bins (its sign flips between the two logits).
    projection
        The bins cut ``projection . block`` instead of the block's mean (16 weights): a server that
        sends a new trap each round with a new projection separates blocks of equal brightness.
    parity
        ``(row, column)`` parity of the only positions whose bins get a gradient (block 3's
        stride-2 depthwise reads one tap of each 2x2 instead of their mean): a quarter of the
        positions share the bins, and each block returned carries its position's parity. None: all.
    shift
        The bins start this many median bin widths lower (``block_edges``): another partition.
    layer
        The convolution that holds the bins: 6 (block 2's expansion) or 9 (block 3's, with block 2
        an identity: beyond a client that freezes the first 7 convolutions).
    fillers
        Channels of the bins' layer that are not bins but sit at a constant 3 (as every unused
        channel of every clamping layer then does): a client that refuses a model clamping more
        than a share ``s`` of a layer's outputs sees ``(95 - fillers) / 96`` clamped in the bins'.
    border_at
        The bins' input channel of the first border pixel (tiny-ir: 17, after the bin sum's 16; the
        published models' trap: 16, ``fedtiny.attack.trap_mbconv``).
    """

    edges: tuple[float, ...]
    pixel_gain: float = 10.0
    head_gain: float = 1000.0
    projection: tuple[float, ...] | None = None
    parity: tuple[int, int] | None = None
    shift: float = 0.0
    layer: int = TRAP_LAYER
    fillers: int = 0
    border_at: int = 17

    @property
    def inputs(self) -> np.ndarray:
        """The bins' trained input channels: the 16 pixels (row-major), then the 8 border pixels."""
        return np.concatenate([PIXEL_CHANNELS, np.arange(self.border_at, self.border_at + len(BORDER_TAPS))])

    @property
    def positions(self) -> int:
        """Positions of one 32x32 image whose bins receive a gradient."""
        return 64 if self.parity is None else 16

    @property
    def weights(self) -> np.ndarray:
        """The 16 pixel weights of the binned feature: the block mean, or the round's projection."""
        return np.full(PIXELS, 1.0 / PIXELS) if self.projection is None else np.asarray(self.projection)

    @property
    def bins(self) -> int:
        return len(self.edges) - 1


STEPS = 64  # a bin's pixel weight in int8 units at its narrowest: the finest brightness step of the bins


# Block 2's input channel of pixel (r, c) of a 4x4 block: block 1's depthwise phase (r // 2, c // 2)
# times 4 plus the stem's 2x2 offset (r % 2, c % 2).
def _channel(r: int, c: int) -> int:
    return 4 * (2 * (r // 2) + c // 2) + 2 * (r % 2) + c % 2


PIXEL_CHANNELS = np.array([_channel(r, c) for r in range(BLOCK) for c in range(BLOCK)])  # pixel k -> channel

# The block's borders: the pixel row above it (its upper neighbour's bottom row, columns 0-3) and
# the column to its left (rows 0-3), zero where the image's padding is. Block 1's stride-2 depthwise
# window over the 16x16 grid of 2x2 pixel groups reaches one group up and one left of its block:
# each border pixel is one (tap row, tap column, stem channel) of that window, copied by a spare
# expansion channel (16 + k) onto block 2's input channel 17 + k (16 holds block 2's bin sum).
BORDER_TAPS = tuple((0, 1 + c // 2, 2 + c % 2) for c in range(BLOCK)) + tuple(
    (1 + r // 2, 0, 2 * (r % 2) + 1) for r in range(BLOCK)
)
BORDER_CHANNELS = np.arange(17, 17 + len(BORDER_TAPS))
TRAP_CHANNELS = np.concatenate([PIXEL_CHANNELS, BORDER_CHANNELS])  # the trained inputs of the bins
