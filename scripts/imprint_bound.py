"""What a malicious server's imprint can take from tiny-ir at batch 1: an upper bound, measured on the faces.

Usage: python scripts/imprint_bound.py [--targets 16] [--rounds 1 4 16] [--json]

A server that sets every weight of tiny-ir (never its architecture) can at best do this
("Robbing the Fed", Fowl et al. 2022, adapted to a network without a dense layer before its
global pool):

- make the stem and the first blocks pass the image on losslessly: the 3x3 stride-2 stem as a
  space-to-depth (12 of its 16 channels carry each 2x2x3 block), the stride-2 depthwise of block 1
  again (48 = 12 x 4 phases), so that at 8x8 each position holds one 4x4 block (16 grey values fit
  the 32 channels after block 1's projection; colour would not: 48 > 32);
- turn a layer with a bias at that resolution into bins: channel ``o`` of block 2's expansion
  (32 -> 96, ReLU6) is active at a position only when the block's brightness lies in its bin (a
  ReLU6 window of the right scale and offset), and make the gradient reaching it constant;
- train that layer (the server picks the scheme): for batch 1, ``dW_o / db_o`` is the mean block of
  the positions in bin ``o``; a bin that catches one position returns that block exactly.

Nothing in the architecture tells the server where an isolated block was: convolutions are
translation-equivariant and the global pool discards position; zero padding marks only the
outermost ring. So the bound below places every isolated block at its true position (an oracle)
and fills the rest with the image's mean grey (the flat baseline). Bins are equal-mass quantiles of
block brightness on public faces (the lfw_subset faces that are not targets). The same at 16x16
(block 1's expansion, 48 bins over 256 positions of 2x2 blocks) is reported beside it.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from fedtiny.attack.metrics import RECOGNISABLE_DB, flat_psnr, psnr, ssim
from fedtiny.attack.presets import LFW_FACES, _resize, face_ids, face_images


def blocks(img: np.ndarray, b: int) -> np.ndarray:
    """``H x W`` -> ``(H/b * W/b) x b x b`` non-overlapping blocks, row-major."""
    h, w = img.shape
    return img.reshape(h // b, b, w // b, b).transpose(0, 2, 1, 3).reshape(-1, b, b)


def unblock(bl: np.ndarray, h: int, w: int) -> np.ndarray:
    b = bl.shape[-1]
    return bl.reshape(h // b, w // b, b, b).transpose(0, 2, 1, 3).reshape(h, w)


def bound(targets: np.ndarray, public: np.ndarray, block: int, bins: int, rounds: int = 1) -> dict:
    """Isolated positions and the oracle-placed reconstruction of each grey ``targets`` image.

    With ``rounds`` > 1 the server sends a new trap each round, its equal-mass edges shifted by
    ``r / rounds`` of a bin; a block counts as isolated when one round isolated it."""
    pub = np.concatenate([blocks(p, block).mean(axis=(1, 2)) for p in public])
    levels = [np.clip((np.arange(1, bins) - r / rounds) / bins, 0, 1) for r in range(rounds)]
    edge_sets = [np.quantile(pub, lv) for lv in levels]  # equal-mass bins on public brightness
    out = {"isolated": [], "psnr_db": [], "ssim": [], "flat_psnr_db": []}
    for img in targets:
        bl = blocks(img, block)
        alone = np.zeros(len(bl), bool)
        for edges in edge_sets:
            which = np.searchsorted(edges, bl.mean(axis=(1, 2)), side="right")
            counts = np.bincount(which, minlength=bins)
            alone |= counts[which] == 1
        rec = np.where(alone[:, None, None], bl, img.mean())
        rec3, img3 = np.repeat(unblock(rec, *img.shape)[None], 3, 0), np.repeat(img[None], 3, 0)
        out["isolated"].append(float(alone.mean()))
        out["psnr_db"].append(psnr(rec3, img3))
        out["ssim"].append(ssim(rec3, img3))
        out["flat_psnr_db"].append(flat_psnr(img3))
    return {
        "block": block,
        "bins": bins,
        "rounds": rounds,
        "positions": int(bl.shape[0]),
        "mean_isolated": float(np.mean(out["isolated"])),
        "mean_psnr_db": float(np.mean(out["psnr_db"])),
        "mean_ssim": float(np.mean(out["ssim"])),
        "mean_flat_psnr_db": float(np.mean(out["flat_psnr_db"])),
        "frac_psnr_25db": float(np.mean(np.asarray(out["psnr_db"]) >= RECOGNISABLE_DB)),
        **out,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=int, default=16)
    ap.add_argument("--rounds", type=int, nargs="+", default=[1], help="traps with shifted bins, one per round")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from skimage.data import lfw_subset

    x, _ = face_images(args.targets, 32, seed=0)
    targets = x[:, 0].astype(np.float64)  # the preset's faces are grey, repeated over 3 channels
    rest = np.setdiff1d(np.arange(LFW_FACES), face_ids(args.targets, 0))
    public = _resize(lfw_subset()[rest].astype(np.float32)[:, None], 32)[:, 0].astype(np.float64)
    res = {"targets": args.targets, "public_faces": len(rest)}
    for r in args.rounds:
        suffix = "" if r == 1 else f"_{r}_rounds"
        res["at_8x8" + suffix] = bound(targets, public, 4, 96, r)
        res["at_16x16" + suffix] = bound(targets, public, 2, 48, r)
    if args.json:
        print(json.dumps(res, sort_keys=True))
        return
    for key in (k for k in res if k.startswith("at_")):
        r = res[key]
        print(
            f"{key}: {r['bins']} bins over {r['positions']} positions of {r['block']}x{r['block']}, "
            f"{r['rounds']} round(s): "
            f"isolated {r['mean_isolated']:.3f}, oracle-placed PSNR {r['mean_psnr_db']:.2f} dB "
            f"(flat {r['mean_flat_psnr_db']:.2f}), SSIM {r['mean_ssim']:.3f}, >= 25 dB {r['frac_psnr_25db']:.2f}"
        )


if __name__ == "__main__":
    main()
