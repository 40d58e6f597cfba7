"""Run an attack end to end: targets -> what the client sends -> reconstruction -> scores."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skimage.data import lfw_subset

from fedtiny.attack.attacks import AttackConfig, progress_printer, reconstruct
from fedtiny.attack.geometry import GRID, from_grid, on_grid
from fedtiny.attack.learned import augment, fit_inverter
from fedtiny.attack.malicious import (
    TRAP_CHANNELS,
    TRAP_LAYER,
    Knowledge,
    adapted_to,
    grey,
    imprint,
    round_settings,
    trap_for,
    trap_scheme,
    trap_scheme_dict,
    trap_state,
)
from fedtiny.attack.metrics import flat_psnr, identification_rank, image_distance, psnr, score, ssim, worst_case
from fedtiny.attack.presets import (
    LFW_FACES,
    _resize,
    dlg_lenet,
    face_ids,
    face_images,
    photo_patches,
    real_images,
    tiny_ir_rgb,
)
from fedtiny.attack.threat import DEFENSES, ThreatModel
from fedtiny.attack.trap_mbconv import BORDERED, SIZE, mb_trap_settings
from fedtiny.attack.user import observe
from fedtiny.compress.dense import pack_dense
from fedtiny.data.sources import ImageSet
from fedtiny.errors import ScenarioError
from fedtiny.federated.client import local_round
from fedtiny.federated.task import make_task, with_scheme
from fedtiny.progress import say
from fedtiny.scenario import scenario_from_dict

__all__ = ["PRESETS", "preset_targets", "run_attack", "plot_grid"]

PRESETS: dict[str, dict[str, Any]] = {
    # DLG (Zhu et al. 2019): sigmoid LeNet, 3x32x32, 100 classes, weights U[-0.5, 0.5], batch 1,
    # the dense fp32 gradient, L-BFGS (history 100, as torch's default); labels by iDLG.
    # Images: digits and photo patches alternating, random labels.
    "dlg-lenet": {
        "threat": ThreatModel(),
        "attack": AttackConfig(method="dlg", iterations=2000),
        "classes": 100,
        "model": "dlg-lenet",
        "images": "mixed",
    },
    # Inverting Gradients on a FedAvg change of 5 local steps.
    "ig-lenet-fedavg": {
        "threat": ThreatModel(observation="delta", local_steps=5, lr=0.1),
        "attack": AttackConfig(method="ig", iterations=1000, tv=1e-4),
        "classes": 100,
        "model": "dlg-lenet",
        "images": "mixed",
    },
    # DLG's setting (batch 1, the dense fp32 gradient, labels by iDLG) on the data people worry about:
    # faces (lfw_subset, 32x32, grey on 3 channels) and the 3-channel tiny-ir (ReLU6, BatchNorm in eval
    # mode, default initialization, face/non-face head). The attacker uses the stronger optimizer for
    # ReLU networks: Inverting Gradients (4 targets, 300 iterations: 15.7 dB in 36 s; DLG's L2 with
    # L-BFGS: 8.1 dB in 390 s, its line searches stall on the clamps).
    # Total variation 1e-2, not IG's 1e-4: on 4 faces (300 iterations) 16.8 dB against 15.7.
    "faces": {
        "threat": ThreatModel(),
        "attack": AttackConfig(method="ig", iterations=1000, tv=1e-2, restarts=2),
        "classes": 2,
        "model": "tiny-ir",
        "images": "faces",
    },
    # The control for "faces": the same faces and threat, DLG's own model and attack. It rebuilds them
    # (16 faces: 52.6 dB, SSIM 0.9998), so what stops "faces" is tiny-ir, not the images or the attack code.
    "dlg-lenet-faces": {
        "threat": ThreatModel(),
        "attack": AttackConfig(method="dlg", iterations=2000),
        "classes": 2,
        "model": "dlg-lenet",
        "images": "faces",
    },
    # The same on colour photo patches (32x32), 10 classes, random labels.
    "photos": {
        "threat": ThreatModel(),
        "attack": AttackConfig(method="ig", iterations=1000, tv=1e-4, restarts=2),
        "classes": 10,
        "model": "tiny-ir",
        "images": "photos",
    },
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


DISTRACTORS = 200  # images of the same kind the server identifies a target among, besides the targets


def preset_candidates(preset: str, x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The images a server identifies ``preset``'s targets ``x`` among, and the targets' indices in it:
    for faces every image of ``lfw_subset`` (faces and non-faces); otherwise the targets and
    ``DISTRACTORS`` other images of the same kind (another seed)."""
    if PRESETS[preset]["images"] == "faces":
        pool = _resize(lfw_subset().astype(np.float32)[:, None], 32).repeat(3, axis=1)
        return pool, face_ids(len(x), seed)
    _, other, _ = preset_targets(preset, DISTRACTORS, seed + 1)
    return np.concatenate([x, other.numpy()]), np.arange(len(x))


def identification(recon: np.ndarray, pool: np.ndarray, ids) -> list[int]:
    """The rank of each target among ``pool`` by its reconstruction's distance (``recon[j]`` for target
    ``ids[j]``, matched)."""
    return [identification_rank(image_distance(r, pool), int(t)) for r, t in zip(recon, ids)]


def run_attack(
    preset: str, targets: int, defense: str = "none", *, seed: int = 0, iterations: int | None = None, log=sys.stderr
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Attack ``targets`` real images under ``preset`` and ``defense``; return the summary and images."""
    if preset not in PRESETS:
        raise ScenarioError(f"--preset: unknown {preset!r}; known: {', '.join(PRESETS)}, faces-malicious")
    if defense not in DEFENSES:
        raise ScenarioError(f"--defense: unknown {defense!r}; known: {', '.join(DEFENSES)}")
    p = PRESETS[preset]
    threat = replace(p["threat"], **DEFENSES[defense])
    cfg = p["attack"] if iterations is None else replace(p["attack"], iterations=iterations)
    model, x, y = preset_targets(preset, targets * threat.batch_size, seed)
    x, y = x.view(targets, threat.batch_size, 3, 32, 32), y.view(targets, threat.batch_size)
    obs = observe(model, x, y, p["classes"], threat)

    t0 = time.perf_counter()
    rec, labels = reconstruct(
        model, obs, threat, (3, 32, 32), p["classes"], cfg, progress=progress_printer(cfg.iterations, log)
    )
    seconds = time.perf_counter() - t0
    scores = [score(rec[i].numpy(), x[i].numpy(), labels[i], y[i]) for i in range(targets)]
    psnrs = [s for sc in scores for s in sc["psnr"]]
    ssims = [s for sc in scores for s in sc["ssim"]]
    summary = {
        "preset": preset,
        "defense": defense,
        "targets": targets,
        "threat": asdict(threat),
        "attack": asdict(cfg),
        "mean_psnr_db": float(np.mean(psnrs)),
        "median_psnr_db": float(np.median(psnrs)),
        "min_psnr_db": float(np.min(psnrs)),
        "mean_ssim": float(np.mean(ssims)),
        # the brightness-only baseline: a mean PSNR near it means nothing recognisable was rebuilt
        "flat_psnr_db": float(np.mean([flat_psnr(img) for img in x.reshape(-1, *x.shape[-3:]).numpy()])),
        "label_accuracy": float(np.mean([sc["label_accuracy"] for sc in scores])),
        "seconds": round(seconds, 2),
        "seconds_per_target": round(seconds / targets, 3),
        "psnr_db": psnrs,
    }
    flats = [flat_psnr(img) for img in x.reshape(-1, *x.shape[-3:]).numpy()]
    worst = worst_case({cfg.method: psnrs}, {cfg.method: ssims}, flats)
    summary.update(
        frac_psnr_25db=worst["frac_psnr_25db"],
        frac_above_flat=worst["frac_above_flat"],
        flat_psnr_db_per_image=worst["flat_psnr_db"],
        ssim=ssims,
    )
    order = [sc["order"] for sc in scores]
    recon = np.clip(np.stack([rec[i].numpy()[order[i]] for i in range(targets)]), 0, 1)
    pool, ids = preset_candidates(preset, x.reshape(-1, *x.shape[-3:]).numpy(), seed)
    ranks = identification(recon.reshape(-1, *recon.shape[-3:]), pool, ids)
    summary.update(
        identification_rank=ranks,
        mean_identification_rank=float(np.mean(ranks)),
        frac_identified_top1=float(np.mean(np.asarray(ranks) == 1)),
        candidates=len(pool),
    )
    return summary, x.numpy(), recon


def plot_grid(targets: np.ndarray, recon: np.ndarray, psnrs: list[float], path: Path, n: int = 16) -> Path:
    """Targets (top) over reconstructions (bottom) with their PSNR."""
    # deferred: matplotlib takes 0.6 s to import; only plots need it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

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


def malicious_scenario(
    targets: int,
    batch: int,
    *,
    local_steps: int = 1,
    density: float = 1.0,
    values: str = "int8",
    precision: str = "int8",
    lr: float = 0.1,
    seed: int = 0,
    overrides: dict | None = None,
    model_file: str | None = None,
):
    """The client side of ``faces-malicious``: tiny-ir on 3x32x32 faces, ``targets`` clients of ``batch``
    images, ``local_steps`` full-batch steps, the trap's scheme, a sparse uplink of ``density`` in
    ``values`` (int8) or, with ``precision = "fp32"``, dense fp32 updates of the whole float network.
    ``model_file``: a published int8 model (tiny-training ``.pkl``) on 3x128x128 faces instead; its
    scheme is set once the trap's layer is known (``run_malicious``)."""
    int8 = precision == "int8"
    if model_file is not None and not int8:
        raise ScenarioError("faces-malicious: a published model file is int8 (no --precision fp32)")
    if model_file is not None and not Path(model_file).is_file():
        raise ScenarioError(f"faces-malicious: --model {model_file}: no such file")
    model = (
        {"file": str(Path(model_file).resolve()), "pretrain_epochs": 0, "classifier_precision": "int8"}
        if model_file is not None
        else {"name": "tiny-ir", "precision": precision, "pretrain_epochs": 0}
    )
    raw = {
        "run": {"name": "faces-malicious", "seed": seed, "rounds": 1, "clients": max(2, targets)},
        "data": {
            "source": "lfw-faces",
            "image_size": 32 if model_file is None else SIZE,
            "channels": 3,
            "partition": "iid",
            "public_fraction": 0.5,
        },
        "model": model,
        "train": {
            "lr": lr,
            "momentum": 0.0,
            "batch_size": batch,
            "local_epochs": local_steps,
            "optimizer": "sgd+qas" if int8 else "sgd",
            "scheme": json.dumps(trap_scheme_dict()) if int8 else "full",
        },
        "device": {"profiles": ["mcu-256kb"]},
        "compression": (
            {"uplink": "sparse", "error_feedback": True, "density": density, "values": values}
            if int8
            else {"uplink": "dense"}
        ),
    }
    return scenario_from_dict(raw, overrides, where="faces-malicious")


def client_updates(
    scenario,
    task,
    scheme,
    sent: dict[str, np.ndarray],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    first_partition: int = 0,
    server_round: int = 1,
    states: dict | None = None,
    log=None,
) -> list[dict | str]:
    """Each batch ``images[i]`` (``[b, C, H, W]``) trained by one client on the ``sent`` state, through
    :func:`fedtiny.federated.client.local_round`; the server's decoded update of each, or the
    client's refusal (a string). ``states`` (client index -> its persistent state: the error-feedback
    residual) is read and updated when given, as a client keeps it between rounds."""
    downlink = pack_dense(sent, task.downlink_spec)
    out: list[dict | str] = []
    for i in range(len(images)):
        pid = (first_partition + i) % scenario.run.clients
        result, state = local_round(
            scenario,
            pid,
            server_round,
            downlink,
            scheme=scheme,
            state=None if states is None else states.get(i),
            data=ImageSet(images[i], labels[i], 2, "faces"),
        )
        if states is not None:
            states[i] = state
        out.append(result.refusal or task.uplink.decode(result.update, sent))
        if log is not None and (i + 1) % 500 == 0:
            say(f"attack: {i + 1}/{len(images)} public updates", log)
    return out


def update_row(task, changes: dict) -> np.ndarray:
    """A decoded update as one vector: every uplink tensor's trainable slice (zeros where not sent)."""
    parts = []
    for name, _, _ in task.uplink_spec:
        full = np.zeros(int(task.slices[name].max(initial=-1)) + 1)
        if name in changes:
            idx, values = changes[name]
            full[np.asarray(idx)] = values
        parts.append(full[task.slices[name]])
    return np.concatenate(parts)


def run_malicious(
    targets: int,
    batch: int = 1,
    *,
    local_steps: int = 1,
    density: float = 1.0,
    values: str = "int8",
    precision: str = "int8",
    seed: int = 0,
    overrides: dict | None = None,
    learned: int = 0,
    epochs: int = 30,
    rounds: int = 1,
    plan: str = "jigsaw",
    adapt: bool = True,
    model_file: str | None = None,
    layer: int | None = None,
    log=sys.stderr,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """A malicious server's attacks on ``targets`` clients of ``batch`` faces each, through fedtiny's client.

    The server builds the trap from the faces that are not targets (its public data: bin edges,
    calibration of the int8 conversion, the prior to place blocks on), sends it as the full
    downlink with the trap's scheme; each client runs :func:`fedtiny.federated.client.local_round`
    on its own faces (the memory check, the client's privacy policies, training with the exact
    int8 step, top-k with error feedback, the codec); the server decodes and attacks each update:
    the imprint (:func:`fedtiny.attack.malicious.imprint`) and, with ``learned`` > 0 at batch 1, the
    learned inverter trained on the updates of ``learned`` augmented public faces made by the same
    client code. With ``rounds`` > 1 the server sends a new trap each round (``plan``: see
    ``round_settings``); the clients keep their state (error-feedback residual) between rounds, and
    the imprint pools the blocks isolated in any round; at batch 1 they are assembled by their
    borders (``fedtiny.attack.jigsaw``). With ``adapt`` the server knows the clients' privacy
    policies and places the trap around them (``adapted_to``). Scores are
    per image, with the worst case over the attacks.

    ``model_file``: the clients run a published int8 model (a tiny-training ``.pkl``: MCUNet,
    MobileNetV2-w0.35) on 128x128 faces, with the trap of ``fedtiny.attack.trap_mbconv`` (bins in
    ``layer``, default ``mb_trap_settings``'); scores are on the trap's 32x32 grid (4x4 means of the
    input: what it can return), and at 128x128 (``input_*``) with the reconstruction upsampled.
    """
    if targets * batch > LFW_FACES - 8:
        raise ScenarioError(
            f"faces-malicious: {targets} targets x batch {batch} faces leave fewer than 8 of "
            f"lfw_subset's {LFW_FACES} faces as the server's public data"
        )
    if learned and batch != 1:
        raise ScenarioError("faces-malicious: the learned inverter maps one update to one image: batch 1 only")
    scenario = malicious_scenario(
        targets,
        batch,
        local_steps=local_steps,
        density=density,
        values=values,
        precision=precision,
        seed=seed,
        overrides=overrides,
        model_file=model_file,
    )
    size = scenario.data.image_size
    probe = None
    if model_file is not None:
        if learned:
            raise ScenarioError("faces-malicious: the learned inverter is built for tiny-ir (no --model)")
        probe = make_task(scenario)
        adapted = mb_trap_settings(probe.model, layer)
        scenario = replace(
            scenario,
            train=replace(scenario.train, scheme=json.dumps(trap_scheme_dict(adapted["layer"], BORDERED))),
        )
    else:
        adapted = adapted_to(scenario.device) if adapt else {}
        if adapted.get("layer", TRAP_LAYER) != TRAP_LAYER:  # the scheme trains the bins where they now are
            scenario = replace(
                scenario, train=replace(scenario.train, scheme=json.dumps(trap_scheme_dict(adapted["layer"])))
            )
    x, y = face_images(targets * batch, size=size, seed=seed)
    rest = np.setdiff1d(np.arange(LFW_FACES), face_ids(targets * batch, seed))
    public = _resize(lfw_subset()[rest].astype(np.float32)[:, None], size).repeat(3, axis=1)
    # a published model's layout was read for the trap's layer: the task is that one, with the trap's scheme
    task = make_task(scenario) if probe is None else replace(probe, scenario=scenario)
    inputs = BORDERED if model_file is not None else TRAP_CHANNELS
    scheme = trap_scheme(task.model, adapted.get("layer", TRAP_LAYER), inputs) if precision == "int8" else None
    task = with_scheme(task, scheme)
    # the server identifies each client's face among every image of lfw_subset (faces and non-faces)
    candidates = _resize(lfw_subset().astype(np.float32)[:, None], size)
    knowledge = Knowledge.of(public, candidates)
    prior = knowledge.prior.image()  # on the trap's grid (32x32), where every image is scored
    ids = face_ids(targets * batch, seed).reshape(targets, batch)
    t0 = time.perf_counter()
    xb, yb = x.reshape(targets, batch, *x.shape[1:]), y.reshape(targets, batch)
    states: dict = {}
    seen: list[list] = [[] for _ in range(targets)]  # per target: (update, sent, trap) of each round
    for r in range(rounds):
        trap = trap_for(public, **round_settings(r, seed, plan), **adapted)
        sent = trap_state(task, public, trap)
        if r == 0:
            first = (trap, sent)
        for i, u in enumerate(client_updates(scenario, task, scheme, sent, xb, yb, server_round=r + 1, states=states)):
            seen[i].append(u if isinstance(u, str) else (u, sent, trap))
        if rounds > 1:
            say(f"attack: round {r + 1}/{rounds}: {targets} clients trained the trap", log)
    trap, sent = first
    updates = [next((u for u in obs if isinstance(u, str)), None) or obs[0][0] for obs in seen]
    rows, recon = [], []
    for i, changes in enumerate(updates):
        if isinstance(changes, str):
            # nothing was sent: the server has its prior, the mean public face
            guess = np.repeat(prior[None, None], 3, 1).repeat(batch, 0)
            sc = score(guess, on_grid(xb[i]))
            d = image_distance(prior, knowledge.candidates)
            rank = [identification_rank(d, int(t)) for t in ids[i]]
            rows.append({"target": i, "refused": changes, "psnr_db": sc["psnr"], "ssim": sc["ssim"]})
            rows[-1].update(oracle_psnr_db=sc["psnr"], identification_rank=rank)
            recon.append(guess)
            say(f"attack: target {i + 1}/{targets}: refused: {changes}", log)
            continue
        out = imprint(task, seen[i], knowledge, xb[i], ids[i])
        recon.append(out.pop("recon"))
        rows.append({"target": i, **out})
        say(
            f"attack: target {i + 1}/{targets}: imprint {np.mean(out['psnr_db']):.2f} dB placed, "
            f"{np.mean(out['oracle_psnr_db']):.2f} dB at true positions, {out['leaked_blocks']:.2f} of blocks "
            f"leaked, identification rank {out['identification_rank']}",
            log,
        )
    attacked = [i for i, u in enumerate(updates) if not isinstance(u, str)]
    if learned and attacked:
        pub = augment(grey(public), learned, seed)
        pub3 = np.repeat(pub[:, None, None], 3, axis=2)
        say(f"attack: learned inverter: {learned} public updates through the client", log)
        pub_updates = client_updates(
            scenario, task, scheme, sent, pub3, np.ones((learned, 1), np.int64), first_partition=targets, log=log
        )
        keep = [j for j, u in enumerate(pub_updates) if not isinstance(u, str)]
        if len(keep) >= 2:
            inverter = fit_inverter(
                np.stack([update_row(task, pub_updates[j]) for j in keep]), pub[keep], epochs=epochs, seed=seed, log=log
            )
            guess = inverter(np.stack([update_row(task, updates[i]) for i in attacked]))
            for k, i in enumerate(attacked):
                img = np.repeat(guess[k][None], 3, 0)
                rows[i]["learned_psnr_db"] = [psnr(img, xb[i][0])]
                rows[i]["learned_ssim"] = [ssim(img, xb[i][0])]
                if rows[i]["learned_psnr_db"][0] > rows[i]["psnr_db"][0]:
                    recon[i] = img[None]
    seconds = time.perf_counter() - t0
    summary = _malicious_summary(rows, on_grid(x), batch, prior)
    # the attacker's public knowledge alone: the mean public face, the same for every target
    summary["prior_psnr_db"] = float(np.mean([psnr(np.repeat(prior[None], 3, 0), img) for img in on_grid(x)]))
    if size != GRID:  # the same at the input's resolution: upsampled from the grid
        summary.update(_at_input(rows, x, from_grid(prior[None, None], size)[0, 0], batch))
    summary.update(
        preset="faces-malicious",
        targets=targets,
        batch_size=batch,
        local_steps=local_steps,
        density=density,
        values=values if precision == "int8" else "fp32",
        precision=precision,
        seed=seed,
        seconds=round(seconds, 2),
        public_faces=len(rest),
        candidates=len(candidates),
        learned_public=learned,
        rounds=rounds,
        plan=plan,
        adapted=adapted,
        linked=float(np.mean([r.get("linked", 0.0) for r in rows])),
        targets_detail=rows,
        policy={k: v for k, v in (overrides or {}).items() if k.startswith("device.policy")},
    )
    if size != GRID:
        return (
            summary,
            xb,
            from_grid(np.stack(recon).reshape(-1, 3, GRID, GRID), size).reshape(targets, batch, 3, size, size),
        )
    return summary, xb, np.stack(recon)


def _at_input(rows: list[dict], x: np.ndarray, prior: np.ndarray, batch: int) -> dict[str, Any]:
    """The placed reconstructions' scores at the input's resolution (``input_*``), with the prior's and
    the flat baseline's there; a refused client's images get the prior."""
    placed = []
    prior3 = np.repeat(prior[None], 3, 0)
    for r in rows:
        placed += r.get("input_psnr_db") or [
            psnr(prior3, img) for img in x[r["target"] * batch : (r["target"] + 1) * batch]
        ]
    prior_db = [psnr(prior3, img) for img in x]
    best = np.maximum(placed, prior_db)
    return {
        "input_size": int(x.shape[-1]),
        "input_psnr_db": placed,
        "input_mean_psnr_db": float(np.mean(placed)),
        "input_worst_case_mean_psnr_db": float(np.mean(best)),
        "input_frac_psnr_25db": float(np.mean(best >= 25.0)),
        "input_prior_psnr_db": float(np.mean(prior_db)),
        "input_mean_flat_psnr_db": float(np.mean([flat_psnr(img) for img in x])),
        "input_mean_ssim": float(np.mean([v for r in rows for v in r.get("input_ssim", [])] or [np.nan])),
    }


def _malicious_summary(rows: list[dict], x: np.ndarray, batch: int, prior: np.ndarray | None = None) -> dict[str, Any]:
    """Means over every target image and the worst case per image over the attacks run (placed, and
    oracle as a bound). A refused client's images are scored by what the server has of them: its
    prior, the mean public face."""
    flats = [flat_psnr(img) for img in x]
    placed, oracle, ssims, ranks, refused = [], [], [], [], 0
    learned, learned_ssim = [], []
    for r in rows:
        refused += "refused" in r
        placed += r["psnr_db"]
        oracle += r["oracle_psnr_db"]
        ssims += r["ssim"]
        ranks += r["identification_rank"]
        learned += r.get("learned_psnr_db", [-np.inf] * batch)
        learned_ssim += r.get("learned_ssim", [-np.inf] * batch)
    done = [r for r in rows if "refused" not in r]
    by_psnr, by_ssim = {"imprint": placed}, {"imprint": ssims}
    if prior is not None:  # the server has its prior whatever the update says
        by_psnr["prior"] = [psnr(np.repeat(prior[None], 3, 0), img) for img in x]
        by_ssim["prior"] = [ssim(np.repeat(prior[None], 3, 0), img) for img in x]
    if any(np.isfinite(learned)):
        by_psnr["learned"], by_ssim["learned"] = learned, learned_ssim
    worst = worst_case(by_psnr, by_ssim, flats)
    return {
        "mean_psnr_db": float(np.mean(placed)),
        "mean_ssim": float(np.mean(ssims)),
        "learned_mean_psnr_db": float(np.mean(learned)) if "learned" in by_psnr else None,
        "learned_mean_ssim": float(np.mean(learned_ssim)) if "learned" in by_psnr else None,
        "worst_case_mean_psnr_db": worst["mean_max_psnr_db"],
        "worst_case_min_psnr_db": float(np.min(worst["max_psnr_db"])),
        "worst_case_mean_ssim": worst["mean_max_ssim"],
        "worst_case_psnr_db": worst["max_psnr_db"],
        "best_attack": worst["best_attack"],
        "mean_flat_psnr_db": float(np.mean(flats)),
        "frac_psnr_25db": worst["frac_psnr_25db"],
        "frac_above_flat": worst["frac_above_flat"],
        "psnr_db": placed,
        "ssim": ssims,
        "flat_psnr_db": flats,
        "oracle_mean_psnr_db": float(np.mean(oracle)),
        "oracle_frac_psnr_25db": float(np.mean(np.asarray(oracle) >= 25.0)),
        "identification_rank": ranks,
        "mean_identification_rank": float(np.mean(ranks)),
        "frac_identified_top1": float(np.mean(np.asarray(ranks) == 1)),
        "isolated": float(np.mean([r["isolated"] for r in done])) if done else 0.0,
        "leaked_blocks": float(np.mean([r["leaked_blocks"] for r in done])) if done else 0.0,
        "refused": refused,
    }
