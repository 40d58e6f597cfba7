"""Where recovered blocks go: a posterior over positions on a public prior, calibrated so it cannot do
worse than the prior alone.

The imprint attack returns a set of 4x4 blocks without their positions (tiny-ir's convolutions are
translation-equivariant and its head sees pooled features). A hard assignment to the public mean
face (the Hungarian algorithm) commits every block to one position and scores below the mean face
itself when it guesses wrong. The posterior mean does not: each position takes the blocks that may
sit there, weighted by how well they fit the public faces' blocks at that position (a Gaussian per
position), and the positions no block fits keep the prior's block. A soft assignment (Sinkhorn's
iterations on those likelihoods: each block is somewhere once, each position holds at most one)
gives the weights; its temperature and a shrinkage towards the prior are chosen on the server's
own public faces, so with shrinkage 0 among the choices the calibrated placement is the prior at
worst on them. Position classes the attack learns (a block's row or column parity, the padded
border) enter as ``allowed``: a block is only placed where its class allows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtiny.attack.geometry import PIXELS, blocks_of, image_of

__all__ = ["BlockPrior", "Placement", "block_prior", "soft_place", "shrunk", "calibrate_placement"]


@dataclass(frozen=True)
class BlockPrior:
    """The public faces' blocks per position: ``mean [P, 16]`` and the variance of a pixel ``var [P]``."""

    mean: np.ndarray
    var: np.ndarray
    shape: tuple[int, int]

    def image(self) -> np.ndarray:
        return image_of(self.mean, *self.shape)


@dataclass(frozen=True)
class Placement:
    """A soft placement's settings: ``temperature`` of the likelihoods, ``shrink`` towards the prior
    (0: the prior itself, 1: the posterior mean)."""

    temperature: float = 1.0
    shrink: float = 1.0


def block_prior(public: np.ndarray) -> BlockPrior:
    """The per-position block statistics of ``public`` grey images ``[N, H, W]`` in [0, 1]."""
    public = np.asarray(public, np.float64)
    b = np.stack([blocks_of(g) for g in public])  # [N, P, 16]
    var = b.var(axis=0).mean(axis=1) + 1e-4  # a floor: a position every public face agrees on is not certain
    return BlockPrior(b.mean(axis=0), var, public.shape[1:])


def _sinkhorn(logits: np.ndarray, iterations: int = 60) -> np.ndarray:
    """A doubly stochastic matrix from square ``logits`` (rows and columns sum to 1): Sinkhorn's
    alternating normalization of ``exp(logits)``, shifted by its largest entry (entries far below
    it underflow to 0, as their weight would)."""
    k = np.exp(logits - logits.max())
    tiny = 1e-300
    u = np.ones(len(k))
    for _ in range(iterations):
        v = 1.0 / np.maximum(k.T @ u, tiny)
        u = 1.0 / np.maximum(k @ v, tiny)
    return u[:, None] * k * v[None, :]


def soft_place(
    blocks: np.ndarray,
    prior: BlockPrior,
    placement: Placement = Placement(),
    allowed: np.ndarray | None = None,
    images: int = 1,
    sigma: np.ndarray | None = None,
) -> np.ndarray:
    """``images`` grey images ``[n, H, W]``: the posterior mean of each position given the recovered
    ``blocks [K, 16]`` (positions unknown) on the public ``prior``.

    ``allowed [K, n * P]`` (bool) restricts where each block may sit. More blocks than positions
    (noisy repeats) leave some unplaced; fewer leave positions to the prior. ``sigma [K]``: each
    block's noise (pixel units), which widens its fit and shrinks it towards the prior's block
    where it is placed (:func:`shrunk`).
    """
    mean = np.tile(prior.mean, (images, 1))
    var = np.tile(prior.var, images)
    p, k = len(mean), len(blocks)
    if k == 0 or placement.shrink == 0:
        return np.stack([image_of(m, *prior.shape) for m in mean.reshape(images, -1, PIXELS)])
    noise = np.zeros(k) if sigma is None else np.asarray(sigma, np.float64) ** 2
    d2 = ((blocks[:, None, :] - mean[None]) ** 2).sum(-1)
    spread = var[None] + noise[:, None]
    loglik = -d2 / (2 * spread) - 0.5 * PIXELS * np.log(spread)
    if allowed is not None:
        loglik = np.where(allowed, loglik, -np.inf)
    n = max(k, p)
    logits = np.full((n, n), 0.0)
    # a block that fits nowhere better than an unseen position's typical block is left unplaced;
    # an unseen position is as likely as a block of typical fit (the median over allowed pairs)
    typical = float(np.median(loglik[np.isfinite(loglik)])) if np.isfinite(loglik).any() else 0.0
    logits[:k, :p] = (loglik - typical) / placement.temperature
    logits[:k, p:] = 0.0  # unplaced
    logits[k:, :p] = 0.0  # unseen
    w = _sinkhorn(np.where(np.isfinite(logits), logits, -1e9))
    seen = w[:k, :p]
    post = np.einsum("kp,kpi->pi", seen, shrunk(blocks, noise, mean, var)) + (1.0 - seen.sum(axis=0))[:, None] * mean
    out = mean + placement.shrink * (post - mean)
    return np.stack([image_of(m, *prior.shape) for m in np.clip(out, 0, 1).reshape(images, -1, PIXELS)])


def shrunk(blocks: np.ndarray, noise: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """``[K, P, 16]``: each block as it would be at each position, the posterior mean of a block seen
    with noise variance ``noise [K]`` under the position's prior (``mean [P, 16]``, ``var [P]``)."""
    w = (var[None, :] / (var[None, :] + noise[:, None]))[..., None]
    return w * blocks[:, None, :] + (1.0 - w) * mean[None]


TEMPERATURES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
SHRINKS = (0.0, 0.5, 1.0)


def calibrate_placement(
    public: np.ndarray, recovered: float, noise: float = 0.0, holdout: int = 8, seed: int = 0
) -> Placement:
    """The temperature and shrinkage that place best on the server's own public faces.

    Each of ``holdout`` public faces in turn plays the target: its blocks, a share ``recovered`` of
    them with Gaussian ``noise`` (the recovered blocks' error), are placed on the prior of the
    other public faces; the settings with the highest mean PSNR are kept. Shrinkage 0 (the prior)
    is among them, so on those faces the placement is never worse than the prior.
    """
    public = np.asarray(public, np.float64)
    rng = np.random.default_rng(seed)
    held = rng.permutation(len(public))[: min(holdout, len(public) - 2)]
    cases = []
    for i in held:
        rest = np.delete(public, i, axis=0)
        tb = blocks_of(public[i])
        keep = rng.random(len(tb)) < recovered
        seen = np.clip(tb[keep] + rng.normal(0, noise, tb[keep].shape), 0, 1)
        cases.append((block_prior(rest), seen, public[i]))
    best, best_db = Placement(1.0, 0.0), -np.inf
    for t in TEMPERATURES:
        for s in SHRINKS:
            pl = Placement(t, s)
            mse = [np.mean((soft_place(seen, pr, pl)[0] - img) ** 2) for pr, seen, img in cases]
            db = float(np.mean([10 * np.log10(1.0 / max(e, 1e-10)) for e in mse]))
            if db > best_db:
                best, best_db = pl, db
    return best
