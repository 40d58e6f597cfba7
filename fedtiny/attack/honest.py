"""The honest server's learned inversion: ``fedtiny attack --preset faces-honest-int8``.

An honest-but-curious server sends the federation's real model and scheme and only looks at what
comes back. Here the federation is the quickstart's on faces: the 3-channel tiny-ir at 32x32,
pretrained in the cloud on the server's public images (the ``lfw_subset`` patches that are not
targets: faces and non-faces) and converted to int8 as :func:`fedtiny.federated.task.cloud_model`
does; the clients train it with the quickstart's sparse scheme (``scenarios/schemes/tiny-ir-sparse.json``,
int8 SGD with QAS, lr 0.005, batch 1, one local epoch) and send top-k 10% int8 values with error
feedback. Each target client holds one face.

The server cannot optimize through the int8 step with any success (``docs/results/privacy.md``), so
it learns the inverse instead (:mod:`fedtiny.attack.learned`): it runs the SAME client code
(:func:`fedtiny.attack.run.client_updates`, which is :func:`fedtiny.federated.client.local_round`)
on augmented public faces from the model it sent, decodes each update as it decodes the targets',
and fits an inverter from update rows (:func:`fedtiny.attack.run.update_row`) to images. Scores
per target face: PSNR/SSIM, the flat and prior baselines, and the rank of the true image among
all 200 ``lfw_subset`` images by the reconstruction's distance. ``precision = "fp32"`` gives the
contrast: dense fp32 updates of the float network (every parameter trained, sent as is).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from skimage.data import lfw_subset

from fedtiny.attack.geometry import grey
from fedtiny.attack.learned import Inverter, augment, fit_inverter
from fedtiny.attack.metrics import RECOGNISABLE_DB, flat_psnr, identification_rank, image_distance, psnr, ssim
from fedtiny.attack.presets import LFW_FACES, _resize, face_ids, face_images
from fedtiny.attack.run import client_updates, preset_candidates, update_row
from fedtiny.budget.schemes import parse_scheme, resolve
from fedtiny.data.sources import ImageSet
from fedtiny.errors import ScenarioError
from fedtiny.federated.task import CloudReport, Task, cloud_model, make_task, with_scheme
from fedtiny.models.state import load_arrays
from fedtiny.progress import say
from fedtiny.scenario import Scenario, scenario_from_dict

__all__ = [
    "QUICKSTART_SCHEME",
    "HONEST_LEARNED",
    "HonestServer",
    "honest_scenario",
    "honest_server",
    "public_images",
    "update_rows",
    "select_inverter",
    "run_honest",
]

# The quickstart's sparse scheme (scenarios/quickstart.toml's train.scheme): every bias, half the input channels
# of two layers, all of the last conv, the classifier.
QUICKSTART_SCHEME = Path(__file__).resolve().parents[2] / "scenarios" / "schemes" / "tiny-ir-sparse.json"

HONEST_LEARNED = 10_000  # public updates the inverter trains on by default (--learned 0)
# The inverter sizes (principal components of the update rows) the server tries, and the share of its public
# updates it holds out to choose among them: fit_inverter's default 1024 overfits a few thousand sparse int8 rows.
COMPONENTS = (64, 256, 1024)
HELD_OUT = 0.1
CHUNK = 256  # client updates decoded at once: a dense fp32 update of the float network is 1.2 MB as float64


def honest_scenario(targets: int, *, precision: str = "int8", seed: int = 0, overrides: dict | None = None) -> Scenario:
    """The clients of ``faces-honest-int8``: the quickstart's client (its scheme, int8 SGD with QAS, lr 0.005,
    batch 1, one local epoch, top-k 10% int8 values with error feedback) on 3x32x32 faces, with a 256 KB
    device (a 32x32 RGB client of the sparse scheme does not fit the quickstart's 64 KB one). With
    ``precision = "fp32"``: the float network, every parameter trained, the dense fp32 update."""
    if precision not in ("int8", "fp32"):
        raise ScenarioError(f"faces-honest-int8: precision: int8 or fp32, got {precision!r}")
    int8 = precision == "int8"
    raw = {
        "run": {"name": "faces-honest", "seed": seed, "rounds": 1, "clients": max(2, targets)},
        "data": {"source": "lfw-faces", "image_size": 32, "channels": 3, "partition": "iid"},
        "model": {"name": "tiny-ir", "precision": precision, "classifier_precision": precision},
        "train": {
            "optimizer": "sgd+qas" if int8 else "sgd",
            "scheme": str(QUICKSTART_SCHEME) if int8 else "full",
            "lr": 0.005,
            "weight_rounding": "stochastic",
            "momentum": 0.0,
            "local_epochs": 1,
            "batch_size": 1,
            "shuffle": "hash",
        },
        "device": {"profiles": ["mcu-256kb"], "enforce": True},
        "compression": (
            {"uplink": "sparse", "density": 0.1, "values": "int8", "error_feedback": True, "residual": "compact"}
            if int8
            else {"uplink": "dense"}
        ),
    }
    return scenario_from_dict(raw, overrides, where="faces-honest-int8")


@dataclass
class HonestServer:
    """What the honest server holds: the clients' scenario, its decoder (``task``), the state it sent, the
    resolved scheme (None for fp32) and its cloud step's report."""

    scenario: Scenario
    task: Task
    sent: dict[str, np.ndarray]
    scheme: Any
    cloud: CloudReport


def honest_server(scenario: Scenario, public: ImageSet) -> HonestServer:
    """The federation's real start model: ``model.pretrain_epochs`` of float pretraining on ``public`` (the
    server's images, never a target), then PTQ for int8 clients (:func:`cloud_model`); the scheme resolved
    on the pretrained int8 model, as the server resolves it before round 1. The cloud report's test figures
    are on ``public`` too: the server holds no other images."""
    task = make_task(scenario)
    fed = dataclasses.replace(task.federation, public=public, test=public)
    sent, report = cloud_model(dataclasses.replace(task, federation=fed))
    scheme = None
    if scenario.model.precision == "int8":
        load_arrays(task.model, sent)
        scheme = resolve(parse_scheme(scenario.scheme_text), task.model, scenario.run.seed)
    return HonestServer(scenario, with_scheme(task, scheme), sent, scheme, report)


def update_rows(
    server: HonestServer, images: np.ndarray, labels: np.ndarray, *, first_partition: int = 0, log=None
) -> tuple[np.ndarray, list[str | None]]:
    """One client per image ``images[i]`` (``[C, H, W]``, label ``labels[i]``), trained through
    :func:`client_updates` on the state the server sent: each decoded update as an :func:`update_row`
    (float32, zeros for a client that refused) and each client's refusal (None: it trained). Decoded
    ``CHUNK`` clients at a time, so a dense update is held as one row only."""
    rows: np.ndarray | None = None
    refusals: list[str | None] = []
    s = server
    for at in range(0, len(images), CHUNK):
        xs, ys = images[at : at + CHUNK, None], labels[at : at + CHUNK, None]
        ups = client_updates(s.scenario, s.task, s.scheme, s.sent, xs, ys, first_partition=first_partition + at)
        for k, u in enumerate(ups):
            row = None if isinstance(u, str) else update_row(s.task, u)
            if rows is None and row is not None:
                rows = np.zeros((len(images), len(row)), np.float32)
            if row is not None:
                rows[at + k] = row
            refusals.append(u if isinstance(u, str) else None)
        if log is not None and len(images) > CHUNK:
            say(f"attack: {min(at + CHUNK, len(images))}/{len(images)} client updates", log)
    if rows is None:
        rows = np.zeros((len(images), 0), np.float32)
    return rows, refusals


def select_inverter(
    rows: np.ndarray, images: np.ndarray, *, epochs: int, seed: int = 0, log=None
) -> tuple[Inverter, int, dict[str, Any]]:
    """The server's choice of inverter: one per size of :data:`COMPONENTS` fitted on its public ``rows`` but a
    ``HELD_OUT`` share, the one with the best mean PSNR on that share kept (sizes that the rows cap to the
    same one are fitted once). Returns it, its number of components and the validation figures: each size's
    mean PSNR, the mean public face's on the same images, and how many there were."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n_val = max(1, int(len(rows) * HELD_OUT)) if len(rows) >= 3 else 0  # the fit needs 2 rows
    val, fit = order[:n_val], order[n_val:]
    prior = images[fit].mean(0)
    sizes = sorted({min(c, rows.shape[1], len(fit)) for c in COMPONENTS})
    best, scores = None, {}
    for q in sizes:
        inverter = fit_inverter(rows[fit], images[fit], components=q, epochs=epochs, seed=seed, log=log)
        scores[str(q)] = (
            float(np.mean([psnr(g, t) for g, t in zip(inverter(rows[val]), images[val])])) if len(val) else 0.0
        )
        if best is None or scores[str(q)] > scores[str(best[1])]:
            best = (inverter, q)
        say(
            f"attack: learned inverter of {q} components: {scores[str(q)]:.2f} dB on {len(val)} held-out public faces",
            log,
        )
    prior_db = float(np.mean([psnr(prior, t) for t in images[val]])) if len(val) else 0.0
    return best[0], best[1], {"psnr_db": scores, "prior_psnr_db": prior_db, "images": len(val)}


def public_images(targets: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The server's images: every ``lfw_subset`` patch but the targets, ``[N, 3, 32, 32]``, and labels (1: face)."""
    keep = np.setdiff1d(np.arange(2 * LFW_FACES), face_ids(targets, seed))
    x = _resize(lfw_subset()[keep].astype(np.float32)[:, None], 32).repeat(3, axis=1)
    return x, (keep < LFW_FACES).astype(np.int64)


def run_honest(
    targets: int = 16,
    *,
    learned: int = HONEST_LEARNED,
    epochs: int = 30,
    precision: str = "int8",
    seed: int = 0,
    overrides: dict | None = None,
    server: HonestServer | None = None,
    log=sys.stderr,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The honest server's learned inversion of ``targets`` clients' updates of one face each.

    The server pretrains the federation's model on its public images (:func:`honest_server`), sends it, and
    the targets train one round through fedtiny's client (:func:`update_rows`). It then runs the same client
    code on ``learned`` augmented public faces (:func:`fedtiny.attack.learned.augment`, label face, other
    partition ids), fits the inverter on their update rows (:func:`select_inverter`) and inverts the
    targets' rows. A target that refused to train is scored by the server's prior, the mean public face.

    Parameters
    ----------
    targets
        Clients attacked, one face each (:func:`fedtiny.attack.presets.face_images` of ``seed``).
    learned
        Augmented public faces the server sends through the client code to train the inverter on.
    epochs
        Epochs of each inverter's training.
    precision
        ``int8`` (the quickstart's client) or ``fp32`` (dense float updates: the contrast).
    overrides
        Scenario keys over :func:`honest_scenario`'s (``--set``), e.g. ``model.pretrain_epochs`` or ``train.lr``.
    server
        One already built on :func:`public_images` (its scenario then stands for ``precision`` and
        ``overrides``).

    Returns
    -------
    The summary (per image ``psnr_db``, ``ssim``, ``flat_psnr_db``, ``prior_psnr_db``,
    ``identification_rank``; their means; ``frac_psnr_25db``; the baselines), the targets
    ``[targets, 1, 3, 32, 32]`` and the reconstructions of the same shape.
    """
    if not 1 <= targets <= LFW_FACES - 8:
        raise ScenarioError(
            f"faces-honest-int8: {targets} targets: between 1 and {LFW_FACES - 8} (the other faces of "
            f"lfw_subset's {LFW_FACES} are the server's)"
        )
    if learned < 2:
        raise ScenarioError(f"faces-honest-int8: --learned {learned}: the inverter needs at least 2 public updates")
    t0 = time.perf_counter()
    px, py = public_images(targets, seed)
    if server is None:
        scenario = honest_scenario(targets, precision=precision, seed=seed, overrides=overrides)
        server = honest_server(scenario, ImageSet(px, py, 2, "public"))
    scenario, precision = server.scenario, server.scenario.model.precision
    say(
        f"attack: honest server: {precision} model pretrained {scenario.model.pretrain_epochs} epochs on "
        f"{len(px)} public images (accuracy {server.cloud.pretrain_train_accuracy:.3f})",
        log,
    )
    x, y = face_images(targets, seed=seed)
    rows, refused = update_rows(server, x, y)
    faces = grey(px[py == 1]).astype(np.float32)  # the public faces, [N, 32, 32]
    prior = faces.mean(0)
    say(f"attack: learned inverter: {learned} augmented public faces through the client", log)
    pub = augment(faces, learned, seed)
    t1 = time.perf_counter()
    pub_rows, pub_refused = update_rows(
        server, np.repeat(pub[:, None], 3, axis=1), np.ones(learned, np.int64), first_partition=targets, log=log
    )
    keep = [j for j, r in enumerate(pub_refused) if r is None]
    if len(keep) < 2:
        raise ScenarioError(f"faces-honest-int8: {len(keep)} public clients trained: {pub_refused[0]}")
    t2 = time.perf_counter()
    inverter, chosen, validation = select_inverter(pub_rows[keep], pub[keep], epochs=epochs, seed=seed, log=log)
    del pub_rows
    guess = inverter(rows)
    t3 = time.perf_counter()
    recon = np.stack([np.repeat((g if r is None else prior)[None], 3, axis=0) for g, r in zip(guess, refused)])
    pool, ids = preset_candidates("faces", x, seed)
    prior3 = np.repeat(prior[None], 3, axis=0)
    per = {
        "psnr_db": [psnr(r, t) for r, t in zip(recon, x)],
        "ssim": [ssim(r, t) for r, t in zip(recon, x)],
        "flat_psnr_db": [flat_psnr(t) for t in x],
        "prior_psnr_db": [psnr(prior3, t) for t in x],
        "prior_ssim": [ssim(prior3, t) for t in x],
        "identification_rank": [identification_rank(image_distance(r, pool), int(i)) for r, i in zip(recon, ids)],
        "prior_identification_rank": [identification_rank(image_distance(prior3, pool), int(i)) for i in ids],
    }
    sent = rows[[r is None for r in refused]]
    summary = {
        "preset": "faces-honest-int8",
        "precision": precision,
        "targets": targets,
        "seed": seed,
        "learned_public": learned,
        "learned_epochs": epochs,
        "public_images": len(px),
        "public_faces": len(faces),
        "candidates": len(pool),
        "refused": sum(r is not None for r in refused),
        "public_refused": learned - len(keep),
        "scenario": {
            "pretrain_epochs": scenario.model.pretrain_epochs,
            "lr": scenario.train.lr,
            "optimizer": scenario.train.optimizer,
            "scheme": "tiny-ir-sparse" if server.scheme is not None else "full",
            "uplink": scenario.compression.uplink,
            "density": scenario.compression.density if precision == "int8" else 1.0,
            "values": scenario.compression.values if precision == "int8" else "fp32",
            "error_feedback": scenario.compression.error_feedback and precision == "int8",
        },
        "cloud_accuracy": server.cloud.ptq_accuracy if precision == "int8" else server.cloud.fp32_accuracy,
        "update_elements": int(rows.shape[1]),
        "sent_fraction": float(np.mean(sent != 0)) if len(sent) else 0.0,
        "mean_psnr_db": float(np.mean(per["psnr_db"])),
        "median_psnr_db": float(np.median(per["psnr_db"])),
        "min_psnr_db": float(np.min(per["psnr_db"])),
        "max_psnr_db": float(np.max(per["psnr_db"])),
        "mean_ssim": float(np.mean(per["ssim"])),
        "mean_flat_psnr_db": float(np.mean(per["flat_psnr_db"])),
        "mean_prior_psnr_db": float(np.mean(per["prior_psnr_db"])),
        "mean_prior_ssim": float(np.mean(per["prior_ssim"])),
        "frac_psnr_25db": float(np.mean(np.asarray(per["psnr_db"]) >= RECOGNISABLE_DB)),
        "frac_above_flat": float(np.mean(np.asarray(per["psnr_db"]) > per["flat_psnr_db"])),
        "frac_above_prior": float(np.mean(np.asarray(per["psnr_db"]) > per["prior_psnr_db"])),
        "mean_identification_rank": float(np.mean(per["identification_rank"])),
        "median_identification_rank": float(np.median(per["identification_rank"])),
        "frac_identified_top1": float(np.mean(np.asarray(per["identification_rank"]) == 1)),
        "frac_identified_top10": float(np.mean(np.asarray(per["identification_rank"]) <= 10)),
        "prior_mean_identification_rank": float(np.mean(per["prior_identification_rank"])),
        "inverter_components": chosen,
        "validation": validation,
        "seconds": round(time.perf_counter() - t0, 2),
        "seconds_public_updates": round(t2 - t1, 2),
        "seconds_fit": round(t3 - t2, 2),
        **per,
    }
    return summary, x[:, None], recon[:, None]
