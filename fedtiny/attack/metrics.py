"""Scores of reconstructions: MSE, PSNR, SSIM on images in [0, 1], label accuracy, Hungarian matching."""

from __future__ import annotations

import numpy as np

__all__ = [
    "mse",
    "psnr",
    "flat_psnr",
    "ssim",
    "match",
    "score",
    "worst_case",
    "RECOGNISABLE_DB",
    "identification_rank",
    "image_distance",
    "block_set_distance",
]

RECOGNISABLE_DB = 25.0  # a reconstruction at or above this PSNR is counted as the image leaking


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def psnr(a: np.ndarray, b: np.ndarray, cap: float = 100.0) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1] (capped for identical images)."""
    e = mse(a, b)
    return cap if e <= 10 ** (-cap / 10) else float(10 * np.log10(1.0 / e))


def flat_psnr(target: np.ndarray) -> float:
    """PSNR of a C x H x W image's own flat version (every pixel its channel's mean).

    The score of an attacker that learned only the brightness: a reconstruction at or
    below it has recovered nothing a person could recognise.
    """
    t = np.asarray(target, np.float64)
    return psnr(np.broadcast_to(t.mean(axis=(-2, -1), keepdims=True), t.shape), t)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity (scikit-image) of two C x H x W images in [0, 1]."""
    # deferred: 0.3 s to start-up; only scoring needs it
    from skimage.metrics import structural_similarity

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    win = min(7, a.shape[-1] - (1 - a.shape[-1] % 2), a.shape[-2] - (1 - a.shape[-2] % 2))
    return float(structural_similarity(a, b, channel_axis=0, data_range=1.0, win_size=max(3, win)))


def match(recon: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Order of ``recon`` that best matches ``target`` (Hungarian algorithm on MSE)."""
    # deferred: scipy.optimize adds 0.35 s to start-up; only matching needs it
    from scipy.optimize import linear_sum_assignment

    cost = np.array([[mse(r, t) for t in target] for r in recon])
    rows, cols = linear_sum_assignment(cost)
    order = np.empty(len(target), np.int64)
    order[cols] = rows
    return order


def score(recon: np.ndarray, target: np.ndarray, recon_labels=None, target_labels=None) -> dict:
    """Per-image scores after matching reconstructions to targets; ``recon`` is clipped to [0, 1]."""
    recon = np.clip(np.asarray(recon, np.float64), 0.0, 1.0)
    order = match(recon, target) if len(recon) > 1 else np.arange(len(recon))
    recon = recon[order]
    out = {
        "mse": [mse(r, t) for r, t in zip(recon, target)],
        "psnr": [psnr(r, t) for r, t in zip(recon, target)],
        "ssim": [ssim(r, t) for r, t in zip(recon, target)],
        "order": order.tolist(),
    }
    if recon_labels is not None and target_labels is not None:
        rl = sorted(np.asarray(recon_labels).tolist())
        tl = sorted(np.asarray(target_labels).tolist())
        out["label_accuracy"] = float(np.mean([a == b for a, b in zip(rl, tl)]))
    return out


def worst_case(
    psnr_by_attack: dict[str, list[float]], ssim_by_attack: dict[str, list[float]], flat_db: list[float]
) -> dict:
    """Per target image, the best any attack did (the defender's worst case), and its summary.

    ``psnr_by_attack``/``ssim_by_attack``: per attack, one score per target (the same target order);
    ``flat_db``: each target's brightness-only baseline (:func:`flat_psnr`).
    """
    names = list(psnr_by_attack)
    if not names or any(
        len(psnr_by_attack[n]) != len(flat_db) or len(ssim_by_attack[n]) != len(flat_db) for n in names
    ):
        raise ValueError("worst_case: every attack needs one PSNR and one SSIM per target")
    best_psnr = np.max([psnr_by_attack[n] for n in names], axis=0)
    best_ssim = np.max([ssim_by_attack[n] for n in names], axis=0)
    best_by = [names[int(i)] for i in np.argmax([psnr_by_attack[n] for n in names], axis=0)]
    return {
        "attacks": names,
        "max_psnr_db": best_psnr.tolist(),
        "max_ssim": best_ssim.tolist(),
        "best_attack": best_by,
        "flat_psnr_db": list(map(float, flat_db)),
        "mean_max_psnr_db": float(best_psnr.mean()),
        "mean_max_ssim": float(best_ssim.mean()),
        "mean_flat_psnr_db": float(np.mean(flat_db)),
        "frac_psnr_25db": float(np.mean(best_psnr >= RECOGNISABLE_DB)),
        "frac_above_flat": float(np.mean(best_psnr > np.asarray(flat_db))),
    }


def identification_rank(distances: np.ndarray, true_index: int) -> int:
    """The rank of the true candidate when candidates are sorted by ``distances`` to the evidence
    (1: it is the closest). A tie counts against the attacker: every other candidate at the true
    one's distance or closer ranks before it."""
    d = np.asarray(distances, np.float64)
    return int(1 + np.count_nonzero(d <= d[true_index]) - 1)


def image_distance(recon: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Mean squared difference of a reconstruction ``C x H x W`` to each candidate ``[M, C, H, W]``
    (or grey ``H x W`` to ``[M, H, W]``): the identification of a reconstruction."""
    r, cand = np.asarray(recon, np.float64), np.asarray(candidates, np.float64)
    return ((cand - r[None]) ** 2).reshape(len(cand), -1).mean(axis=1)


def block_set_distance(blocks: np.ndarray, candidates: np.ndarray, side: int = 4) -> np.ndarray:
    """How well a set of recovered ``side x side`` blocks ``[K, side * side]`` (positions unknown) fits
    each grey candidate ``[M, H, W]``: the mean over the blocks of the squared distance to the
    candidate's nearest block. The identification of blocks without positions."""
    cand = np.asarray(candidates, np.float64)
    m, h, w = cand.shape
    cb = cand.reshape(m, h // side, side, w // side, side).transpose(0, 1, 3, 2, 4).reshape(m, -1, side * side)
    b = np.asarray(blocks, np.float64)
    if not len(b):
        return np.zeros(m)
    d2 = (b**2).sum(-1)[None, :, None] - 2 * np.einsum("kp,mqp->mkq", b, cb) + (cb**2).sum(-1)[:, None, :]
    return d2.min(axis=2).mean(axis=1)
