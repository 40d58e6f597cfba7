"""A learned inversion attack on the `faces` preset: a network trained to map gradients to images.

Usage: python scripts/faces_learned_inversion.py [--targets 16] [--aux 40000] [--epochs 30] [--out DIR]

Gradient matching (`fedtiny attack --preset faces`) stays at the flat baseline on tiny-ir, because
the matching loss of a ReLU6 network is not smooth in the image (scripts/faces_landscape.py). An
attacker does not have to optimize through it: for a fixed model the client's gradient is a
deterministic function of its image, so the server can learn the inverse function on public
images (in the spirit of "learning to invert", Wu et al. 2022). Here:

- the attacker's public images: the `lfw_subset` patches that are not among the targets (84
  faces, 100 non-faces), flipped, shifted by up to 2 pixels and jittered in contrast and
  brightness, and random grey crops of scikit-image's photos; half faces, half the rest;
- their dense fp32 gradients on the preset's model (the server knows the model it sent);
- features: each gradient coordinate standardized, projected on the 1024 principal directions of
  4000 public gradients; an MLP (1024 -> 2048 -> 2048 -> 32x32 grey, sigmoid) trained with Adam
  on the squared error; the attacker assumes grey images (the data are grey);
- the targets: the preset's observation of the 16 faces (`fedtiny.attack.user.observe`), scored
  with the same metrics as `fedtiny attack`.

Measured (2 threads, 40000 public images, 30 epochs, about 8 minutes): see README, "Privacy".
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedtiny.attack.metrics import flat_psnr, score
from fedtiny.attack.presets import LFW_FACES, _resize, face_ids
from fedtiny.attack.run import PRESETS, plot_grid, preset_targets
from fedtiny.attack.user import observe

PHOTOS = (
    "camera",
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "cat",
    "coins",
    "moon",
    "page",
    "text",
    "grass",
    "gravel",
    "brick",
)


def public_images(n: int, exclude: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` grey 25x25 public images in [0, 1] and their face (1) / other (0) labels."""
    from skimage import data as skdata
    from skimage.color import rgb2gray
    from skimage.data import lfw_subset

    rng = np.random.default_rng(seed)
    lfw = lfw_subset().astype(np.float32)
    pool = np.setdiff1d(np.arange(len(lfw)), exclude)
    photos = []
    for name in PHOTOS:
        im = getattr(skdata, name)()
        photos.append((rgb2gray(im) if im.ndim == 3 else im / 255.0).astype(np.float32))
    out, labels = np.empty((n, 25, 25), np.float32), np.zeros(n, np.int64)
    for i in range(n):
        if i % 2 == 0:
            j = rng.choice(pool)
            im = lfw[j][:, ::-1] if rng.random() < 0.5 else lfw[j]
            im = np.roll(im, rng.integers(-2, 3, 2), (0, 1))
            im = (im - im.mean()) * rng.uniform(0.7, 1.3) + im.mean() + rng.uniform(-0.15, 0.15)
            labels[i] = int(j < LFW_FACES)
        else:
            p = photos[rng.integers(len(photos))]
            s = rng.integers(25, 120)
            r, c = rng.integers(0, p.shape[0] - s), rng.integers(0, p.shape[1] - s)
            im = _resize(np.ascontiguousarray(p[None, None, r : r + s, c : c + s]), 25)[0, 0]
        out[i] = np.clip(im, 0.0, 1.0)
    return out, labels


def gradient_rows(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, threat, classes: int, chunk: int = 500
) -> torch.Tensor:
    """What the client would send for each image (one target each), flattened: [N, parameters]."""
    rows = []
    for i in range(0, len(x), chunk):
        obs = observe(model, x[i : i + chunk, None], y[i : i + chunk, None], classes, threat)
        rows.append(torch.cat([v.flatten(1) for v, _ in obs.values()], 1))
    return torch.cat(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", type=int, default=16)
    ap.add_argument("--aux", type=int, default=40000, help="public images the attacker trains on")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write privacy.json and reconstructions.png here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    preset = PRESETS["faces"]
    threat, classes = preset["threat"], preset["classes"]
    model, x, y = preset_targets("faces", a.targets, a.seed)
    aux, aux_y = public_images(a.aux, face_ids(a.targets, a.seed), a.seed)
    aux32 = torch.from_numpy(_resize(aux[:, None], 32))  # [N, 1, 32, 32], the data's pipeline
    aux3, aux_labels = aux32.repeat(1, 3, 1, 1), torch.from_numpy(aux_y)
    first = gradient_rows(model, aux3[:4000], aux_labels[:4000], threat, classes)
    mu, sd = first.mean(0), first.std(0) + 1e-12
    _, _, basis = torch.pca_lowrank((first - mu) / sd, q=1024, center=False)
    del first

    def features(g: torch.Tensor) -> torch.Tensor:
        return ((g - mu) / sd) @ basis

    # projected chunk by chunk: the raw gradients of 40000 images would take 3 GB
    feats = torch.cat(
        [
            features(gradient_rows(model, aux3[i : i + 4000], aux_labels[i : i + 4000], threat, classes))
            for i in range(0, a.aux, 4000)
        ]
    )
    scale = feats.std(0) + 1e-6
    feats = feats / scale
    f_tgt = features(gradient_rows(model, x, y, threat, classes)) / scale  # the observations the server receives
    images = aux32.flatten(1)
    print(f"[inversion] {a.aux} public gradients in {time.perf_counter() - t0:.0f} s", flush=True)

    net = torch.nn.Sequential(
        torch.nn.Linear(1024, 2048),
        torch.nn.ReLU(),
        torch.nn.Linear(2048, 2048),
        torch.nn.ReLU(),
        torch.nn.Linear(2048, 32 * 32),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.epochs)
    for epoch in range(a.epochs):
        order = torch.randperm(len(feats))
        for i in range(0, len(feats), 256):
            b = order[i : i + 256]
            opt.zero_grad()
            loss = (torch.sigmoid(net(feats[b])) - images[b]).square().mean()
            loss.backward()
            opt.step()
        sched.step()
        print(f"[inversion] epoch {epoch + 1}/{a.epochs}: training MSE {loss.item():.4f}", flush=True)
    with torch.no_grad():
        rec = torch.sigmoid(net(f_tgt)).view(-1, 1, 1, 32, 32).repeat(1, 1, 3, 1, 1)
    xs = x.view(-1, 1, 3, 32, 32)
    scores = [score(rec[i].numpy(), xs[i].numpy()) for i in range(a.targets)]
    psnrs = [sc["psnr"][0] for sc in scores]
    summary = {
        "attack": "learned inversion",
        "targets": a.targets,
        "aux": a.aux,
        "epochs": a.epochs,
        "mean_psnr_db": float(np.mean(psnrs)),
        "median_psnr_db": float(np.median(psnrs)),
        "min_psnr_db": float(np.min(psnrs)),
        "mean_ssim": float(np.mean([sc["ssim"][0] for sc in scores])),
        "flat_psnr_db": float(np.mean([flat_psnr(im) for im in x.numpy()])),
        "seconds": round(time.perf_counter() - t0, 1),
        "psnr_db": psnrs,
    }
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "privacy.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot_grid(xs.numpy(), rec.numpy(), psnrs, out / "reconstructions.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "psnr_db"}))


if __name__ == "__main__":
    main()
