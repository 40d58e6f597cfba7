"""Blocks back into an image by their borders: the jigsaw a malicious server solves.

Each block the trap returns carries, besides its 16 pixels, the pixel row above it and the column to
its left (its neighbours' bottom row and right column; zeros where the image's padding is) and, in a
round of one parity, its position's row and column parity. Two blocks fit one above the other when
the upper one's bottom row equals the lower one's row above, within the noise the server knows for
each block; two fit side by side likewise. The assembly:

1. every candidate link (vertical and horizontal, parities consistent) is scored by its chi-square
   (the squared difference over the pair's noise variance, 4 degrees of freedom);
2. links are accepted from the best down (Kruskal's order) when both blocks prefer each other and
   the merged piece stays consistent: no two blocks on one cell, no piece wider than the image;
3. each piece is placed on the grid where it is most likely: a block on row 0 must see zeros above
   (the padding), elsewhere its border must look like a face's at that place, and its pixels like
   the public faces' block there (the prior); pieces go largest first onto free cells;
4. blocks left over and cells left empty take the soft placement on the prior
   (:func:`fedtiny.attack.placement.soft_place`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtiny.attack.geometry import BLOCK, PIXELS, image_of
from fedtiny.attack.placement import BlockPrior, Placement, shrunk, soft_place

__all__ = ["Pieces", "assemble", "LINK_CHI2", "LINK_MARGIN"]

LINK_CHI2 = 18.47  # chi-square of 4 degrees of freedom at p = 0.999: a worse fit is not a neighbour
LINK_MARGIN = 10.0  # the next best candidate must fit worse by this much: noise that hides the difference links nothing


@dataclass(frozen=True)
class Pieces:
    """What the attack recovered of one image: ``blocks [K, 16]``, ``up [K, 4]`` (the row above each
    block), ``left [K, 4]`` (the column to its left), ``sigma [K]`` (noise of each, pixel units) and
    ``parity [K, 2]`` (row and column parity of its position; -1 unknown)."""

    blocks: np.ndarray
    up: np.ndarray
    left: np.ndarray
    sigma: np.ndarray
    parity: np.ndarray

    def __len__(self) -> int:
        return len(self.blocks)


def _bottom(b: np.ndarray) -> np.ndarray:
    return b.reshape(-1, BLOCK, BLOCK)[:, -1, :]


def _right(b: np.ndarray) -> np.ndarray:
    return b.reshape(-1, BLOCK, BLOCK)[:, :, -1]


def _chi2(edge: np.ndarray, border: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """``[K, K]``: the fit of block a's ``edge`` against block b's ``border`` over their noise."""
    var = sigma[:, None] ** 2 + sigma[None, :] ** 2
    return ((edge[:, None, :] - border[None, :, :]) ** 2).sum(-1) / np.maximum(var, 1e-12)


def _parity_ok(pa: np.ndarray, pb: np.ndarray, step: int) -> np.ndarray:
    """``[K, K]``: can b sit one cell after a along an axis whose parity is ``step`` (0 rows, 1 columns)?
    The stepped axis' parity flips, the other's stays; unknown parity (-1) allows anything."""
    other = 1 - step
    flip = (pa[:, None, step] < 0) | (pb[None, :, step] < 0) | (pa[:, None, step] != pb[None, :, step])
    same = (pa[:, None, other] < 0) | (pb[None, :, other] < 0) | (pa[:, None, other] == pb[None, :, other])
    return flip & same


class _Pieces:
    """Union-find over blocks with each block's offset from its piece's root."""

    def __init__(self, k: int) -> None:
        self.root = list(range(k))
        self.cells: dict[int, dict[int, tuple[int, int]]] = {i: {i: (0, 0)} for i in range(k)}

    def find(self, i: int) -> int:
        while self.root[i] != i:
            i = self.root[i]
        return i

    def join(self, a: int, b: int, dr: int, dc: int, rows: int, cols: int) -> bool:
        """Put b at (dr, dc) from a, if the pieces do not collide and still fit the grid."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            ca, cb = self.cells[ra][a], self.cells[ra][b]
            return (cb[0] - ca[0], cb[1] - ca[1]) == (dr, dc)
        ca, cb = self.cells[ra][a], self.cells[rb][b]
        shift = (ca[0] + dr - cb[0], ca[1] + dc - cb[1])
        moved = {i: (r + shift[0], c + shift[1]) for i, (r, c) in self.cells[rb].items()}
        taken = set(self.cells[ra].values())
        if any(cell in taken for cell in moved.values()):
            return False
        every = list(self.cells[ra].values()) + list(moved.values())
        rs, cs = [r for r, _ in every], [c for _, c in every]
        if max(rs) - min(rs) >= rows or max(cs) - min(cs) >= cols:
            return False
        self.cells[ra].update(moved)
        del self.cells[rb]
        self.root[rb] = ra
        return True


def _link(pieces: Pieces, rows: int, cols: int) -> list[dict[int, tuple[int, int]]]:
    """The pieces the borders join, each ``{block: (row, col) relative}``, accepted best link first."""
    k = len(pieces)
    v = _chi2(_bottom(pieces.blocks), pieces.up, pieces.sigma)  # a above b
    h = _chi2(_right(pieces.blocks), pieces.left, pieces.sigma)  # a left of b
    v[~_parity_ok(pieces.parity, pieces.parity, 0)] = np.inf
    h[~_parity_ok(pieces.parity, pieces.parity, 1)] = np.inf
    np.fill_diagonal(v, np.inf)
    np.fill_diagonal(h, np.inf)
    links = []
    for cost, dr, dc in ((v, 1, 0), (h, 0, 1)):
        best_a, best_b = cost.argmin(axis=0), cost.argmin(axis=1)
        ranked = np.sort(cost, axis=0)
        for b in range(k):
            a = int(best_a[b])
            second = ranked[1, b] if k > 1 else np.inf
            # both prefer each other, the pair fits, and no other block fits almost as well
            if best_b[a] == b and cost[a, b] <= LINK_CHI2 and second - cost[a, b] >= LINK_MARGIN:
                links.append((float(cost[a, b]), a, b, dr, dc))
    uf = _Pieces(k)
    for _, a, b, dr, dc in sorted(links):
        uf.join(a, b, dr, dc, rows, cols)
    return sorted(uf.cells.values(), key=len, reverse=True)


def _cell_cost(pieces: Pieces, prior: BlockPrior, rows: int, cols: int) -> np.ndarray:
    """``[K, rows * cols]``: minus the log-likelihood of each block at each cell, from its own border
    (zeros at the padding, else a face's edge at that place) and its pixels (the public faces' block)."""
    mean, var = prior.mean, prior.var
    sig2 = pieces.sigma[:, None] ** 2
    own = ((pieces.blocks[:, None, :] - mean[None]) ** 2).sum(-1) / (2 * (var[None] + sig2))
    up = np.zeros_like(own)
    left = np.zeros_like(own)
    for cell in range(rows * cols):
        r, c = divmod(cell, cols)
        if r == 0:
            up[:, cell] = (pieces.up**2).sum(-1) / (2 * sig2[:, 0])
        else:
            edge = _bottom(mean[cell - cols][None])[0]
            up[:, cell] = ((pieces.up - edge) ** 2).sum(-1) / (2 * (var[cell - cols] + sig2[:, 0]))
        if c == 0:
            left[:, cell] = (pieces.left**2).sum(-1) / (2 * sig2[:, 0])
        else:
            edge = _right(mean[cell - 1][None])[0]
            left[:, cell] = ((pieces.left - edge) ** 2).sum(-1) / (2 * (var[cell - 1] + sig2[:, 0]))
    cost = own + up + left
    pr, pc = np.divmod(np.arange(rows * cols), cols)
    for axis, where in ((0, pr), (1, pc)):
        known = pieces.parity[:, axis] >= 0
        bad = known[:, None] & ((where[None, :] % 2) != pieces.parity[:, axis, None])
        cost[bad] = np.inf
    return cost


def assemble(pieces: Pieces, prior: BlockPrior, placement: Placement = Placement()) -> tuple[np.ndarray, np.ndarray]:
    """One grey image ``[H, W]`` from the recovered ``pieces``, and the cells a block was placed on by
    its links (``[P]`` bool)."""
    h, w = prior.shape
    rows, cols = h // BLOCK, w // BLOCK
    out = prior.mean.copy()
    placed_cells = np.zeros(rows * cols, bool)
    used = np.zeros(len(pieces), bool)
    if len(pieces):
        cost = _cell_cost(pieces, prior, rows, cols)
        for piece in _link(pieces, rows, cols):
            if len(piece) < 2:
                break  # single blocks: the soft placement below weighs every cell for them
            members = list(piece)
            rel = np.array([piece[i] for i in members])
            rel -= rel.min(axis=0)
            best, best_cost = None, np.inf
            for dr in range(rows - rel[:, 0].max()):
                for dc in range(cols - rel[:, 1].max()):
                    cells = (rel[:, 0] + dr) * cols + rel[:, 1] + dc
                    if placed_cells[cells].any():
                        continue
                    c = cost[members, cells].sum()
                    if c < best_cost:
                        best, best_cost = cells, c
            if best is None or not np.isfinite(best_cost):
                continue
            noise = pieces.sigma[members] ** 2
            out[best] = shrunk(pieces.blocks[members], noise, prior.mean[best], prior.var[best])[
                np.arange(len(members)), np.arange(len(members))
            ]
            placed_cells[best] = True
            used[members] = True
    rest = ~used
    if rest.any() and not placed_cells.all():
        allowed = np.broadcast_to(~placed_cells, (int(rest.sum()), rows * cols)).copy()
        pr, pc = np.divmod(np.arange(rows * cols), cols)
        for axis, where in ((0, pr), (1, pc)):
            par = pieces.parity[rest, axis]
            allowed &= (par[:, None] < 0) | ((where[None, :] % 2) == par[:, None])
        soft = soft_place(pieces.blocks[rest], prior, placement, allowed=allowed, sigma=pieces.sigma[rest])[0]
        flat = soft.reshape(rows, BLOCK, cols, BLOCK).transpose(0, 2, 1, 3).reshape(-1, PIXELS)
        out[~placed_cells] = flat[~placed_cells]
    return image_of(out, h, w), placed_cells
