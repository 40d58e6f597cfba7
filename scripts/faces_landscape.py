"""Why gradient matching does not rebuild faces from tiny-ir: the matching loss near the truth.

Usage: python scripts/faces_landscape.py [--preset faces] [--targets 4] [--noise 0.1]

For each target face x, a perturbed face x' = clip(x + noise) is drawn and the attack's objective
(the preset's: cosine distance + total variation) is evaluated along the segment x + t (x' - x).
For a smooth objective with its minimum at x the loss grows like t^2: at t = 0.01 it is 1e-4 of
its value at t = 1 (``--preset dlg-lenet-faces``, sigmoid LeNet, shows exactly that). On a ReLU6
network the parameter gradient jumps wherever a unit's activation mask flips, and the loss
grows about like t. The cosine between the loss's descent direction and the direction to the
truth is printed too; it is low on both models (the problem is ill-conditioned either way), so
it is the growth of the loss that tells them apart. Last, IG's optimizer is started at x' (a
warm start the real attacker never has), at the preset's step and a 10x smaller one.
Prints the figures; writes nothing.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch

from fedtiny.attack.attacks import idlg_labels, objective
from fedtiny.attack.metrics import flat_psnr, psnr
from fedtiny.attack.optim import batched_signed_adam
from fedtiny.attack.run import PRESETS, preset_targets
from fedtiny.attack.user import observe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="faces")
    ap.add_argument("--targets", type=int, default=4)
    ap.add_argument("--noise", type=float, default=0.1, help="std of the warm start's Gaussian noise")
    ap.add_argument("--iterations", type=int, default=300)
    a = ap.parse_args()
    torch.set_num_threads(1)
    p = PRESETS[a.preset]
    threat = p["threat"]
    model, x, y = preset_targets(a.preset, a.targets)
    x, y = x[:, None], y[:, None]
    obs = observe(model, x, y, p["classes"], threat)
    labels = idlg_labels(model, obs, threat)
    f_and_grad = objective(model, obs, threat, labels, p["classes"], p["attack"])
    match_only = objective(model, obs, threat, labels, p["classes"], replace(p["attack"], tv=0.0))
    warm = (x + a.noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    d = warm - x

    def db(r: torch.Tensor) -> list[float]:
        return [round(psnr(r[i].numpy(), x[i].numpy()), 1) for i in range(len(x))]

    print(
        f"{a.preset}: {a.targets} targets; flat baseline {np.mean([flat_psnr(i[0].numpy()) for i in x]):.2f} dB; "
        f"warm start {db(warm)} dB"
    )
    f1 = match_only(warm)[0]
    print("gradient matching alone (no total variation) along x + t (x' - x):")
    print("t       loss / loss(t=1)            cosine(-grad, direction to the truth)")
    for t in (0.001, 0.01, 0.1, 0.5, 1.0):
        f, g = match_only(x + t * d)
        cos = (g * d).flatten(1).sum(1) / (g.flatten(1).norm(dim=1) * d.flatten(1).norm(dim=1)).clamp_min(1e-30)
        print(f"{t:<7} {np.round((f / f1).numpy(), 4)}  {np.round(cos.numpy(), 3)}")
    for lr in (0.1, 0.01):
        rec, _ = batched_signed_adam(f_and_grad, warm, iterations=a.iterations, lr=lr)
        print(f"IG's optimizer from the warm start, lr {lr}, {a.iterations} iterations: {db(rec)} dB")


if __name__ == "__main__":
    main()
