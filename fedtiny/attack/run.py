"""Run an attack end to end: targets -> what the client sends -> reconstruction -> scores."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtiny.attack.attacks import AttackConfig, progress_printer, reconstruct
from fedtiny.attack.metrics import flat_psnr, score, worst_case
from fedtiny.attack.presets import dlg_lenet, face_images, photo_patches, real_images, tiny_ir_rgb
from fedtiny.attack.threat import DEFENSES, ThreatModel
from fedtiny.attack.user import observe
from fedtiny.errors import ScenarioError

__all__ = ["PRESETS", "preset_targets", "run_attack", "plot_grid"]

PRESETS: dict[str, dict[str, Any]] = {
    # DLG (Zhu et al. 2019): sigmoid LeNet, 3x32x32, 100 classes, weights U[-0.5, 0.5], batch 1,
    # the dense fp32 gradient, L-BFGS (history 100, as torch's default); labels by iDLG.
    # Images: digits and photo patches alternating, random labels.
    "dlg-lenet": {"threat": ThreatModel(), "attack": AttackConfig(method="dlg", iterations=2000), "classes": 100,
                  "model": "dlg-lenet", "images": "mixed"},
    # Inverting Gradients on a FedAvg change of 5 local steps.
    "ig-lenet-fedavg": {"threat": ThreatModel(observation="delta", local_steps=5, lr=0.1),
                        "attack": AttackConfig(method="ig", iterations=1000, tv=1e-4), "classes": 100,
                        "model": "dlg-lenet", "images": "mixed"},
    # DLG's setting (batch 1, the dense fp32 gradient, labels by iDLG) on the data people worry about:
    # faces (lfw_subset, 32x32, grey on 3 channels) and the 3-channel tiny-ir (ReLU6, BatchNorm in eval
    # mode, default initialization, face/non-face head). The attacker uses the stronger optimizer for
    # ReLU networks: Inverting Gradients (4 targets, 300 iterations: 15.7 dB in 36 s; DLG's L2 with
    # L-BFGS: 8.1 dB in 390 s, its line searches stall on the clamps).
    # Total variation 1e-2, not IG's 1e-4: on 4 faces (300 iterations) 16.8 dB against 15.7.
    "faces": {"threat": ThreatModel(), "attack": AttackConfig(method="ig", iterations=1000, tv=1e-2, restarts=2),
              "classes": 2, "model": "tiny-ir", "images": "faces"},
    # The control for "faces": the same faces and threat, DLG's own model and attack. It rebuilds them
    # (16 faces: 52.6 dB, SSIM 0.9998), so what stops "faces" is tiny-ir, not the images or the attack code.
    "dlg-lenet-faces": {"threat": ThreatModel(), "attack": AttackConfig(method="dlg", iterations=2000), "classes": 2,
                        "model": "dlg-lenet", "images": "faces"},
    # The same on colour photo patches (32x32), 10 classes, random labels.
    "photos": {"threat": ThreatModel(), "attack": AttackConfig(method="ig", iterations=1000, tv=1e-4, restarts=2),
               "classes": 10, "model": "tiny-ir", "images": "photos"},
}


def preset_targets(preset: str, n: int, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The model and ``n`` private images [n, 3, 32, 32] with their labels [n] of ``preset``."""
    p = PRESETS[preset]
    model = dlg_lenet(p["classes"], seed) if p["model"] == "dlg-lenet" else tiny_ir_rgb(p["classes"], seed)
    gen = torch.Generator().manual_seed(seed)
    if p["images"] == "faces":
        x, y = face_images(n, seed=seed)
        return model, torch.from_numpy(x), torch.from_numpy(y)
    x = real_images(n, seed=seed) if p["images"] == "mixed" else photo_patches(n, seed=seed)
    return model, torch.from_numpy(x), torch.randint(0, p["classes"], (n,), generator=gen)


def run_attack(preset: str, targets: int, defense: str = "none", *, seed: int = 0, iterations: int | None = None,
               log=sys.stderr) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Attack ``targets`` real images under ``preset`` and ``defense``; return the summary and images."""
    if preset not in PRESETS:
        raise ScenarioError(f"--preset: unknown {preset!r}; known: {', '.join(PRESETS)}")
    if defense not in DEFENSES:
        raise ScenarioError(f"--defense: unknown {defense!r}; known: {', '.join(DEFENSES)}")
    p = PRESETS[preset]
    threat = replace(p["threat"], **DEFENSES[defense])
    cfg = p["attack"] if iterations is None else replace(p["attack"], iterations=iterations)
    model, x, y = preset_targets(preset, targets * threat.batch_size, seed)
    x, y = x.view(targets, threat.batch_size, 3, 32, 32), y.view(targets, threat.batch_size)
    obs = observe(model, x, y, p["classes"], threat)

    t0 = time.perf_counter()
    rec, labels = reconstruct(model, obs, threat, (3, 32, 32), p["classes"], cfg,
                              progress=progress_printer(cfg.iterations, log))
    seconds = time.perf_counter() - t0
    scores = [score(rec[i].numpy(), x[i].numpy(), labels[i], y[i]) for i in range(targets)]
    psnrs = [s for sc in scores for s in sc["psnr"]]
    ssims = [s for sc in scores for s in sc["ssim"]]
    summary = {
        "preset": preset, "defense": defense, "targets": targets, "threat": asdict(threat), "attack": asdict(cfg),
        "mean_psnr_db": float(np.mean(psnrs)), "median_psnr_db": float(np.median(psnrs)),
        "min_psnr_db": float(np.min(psnrs)), "mean_ssim": float(np.mean(ssims)),
        # the brightness-only baseline: a mean PSNR near it means nothing recognisable was rebuilt
        "flat_psnr_db": float(np.mean([flat_psnr(img) for img in x.reshape(-1, *x.shape[-3:]).numpy()])),
        "label_accuracy": float(np.mean([sc["label_accuracy"] for sc in scores])),
        "seconds": round(seconds, 2), "seconds_per_target": round(seconds / targets, 3),
        "psnr_db": psnrs,
    }
    flats = [flat_psnr(img) for img in x.reshape(-1, *x.shape[-3:]).numpy()]
    worst = worst_case({cfg.method: psnrs}, {cfg.method: ssims}, flats)
    summary.update(frac_psnr_25db=worst["frac_psnr_25db"], frac_above_flat=worst["frac_above_flat"],
                   flat_psnr_db_per_image=worst["flat_psnr_db"], ssim=ssims)
    order = [sc["order"] for sc in scores]
    recon = np.stack([rec[i].numpy()[order[i]] for i in range(targets)])
    return summary, x.numpy(), np.clip(recon, 0, 1)


def plot_grid(targets: np.ndarray, recon: np.ndarray, psnrs: list[float], path: Path, n: int = 16) -> Path:
    """Targets (top) over reconstructions (bottom) with their PSNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = targets.reshape(-1, *targets.shape[-3:])[:n]
    r = recon.reshape(-1, *recon.shape[-3:])[:n]
    fig, axes = plt.subplots(2, len(t), figsize=(1.2 * len(t), 2.8), squeeze=False)
    show = (lambda a: {"X": a[0], "cmap": "gray"}) if t.shape[1] == 1 else (lambda a: {"X": a.transpose(1, 2, 0)})
    for i in range(len(t)):
        axes[0, i].imshow(**show(t[i]), vmin=0, vmax=1)
        axes[1, i].imshow(**show(r[i]), vmin=0, vmax=1)
        axes[1, i].set_title(f"{psnrs[i]:.1f} dB", fontsize=7)
        axes[0, i].axis("off")
        axes[1, i].axis("off")
    fig.suptitle("targets (top) and reconstructions (bottom)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
