"""Membership inference from what a fedtiny client sends: was a candidate image in its training data?

The server holds a client's decoded update and the model it sent (the start); it asks, for each
candidate image, whether the client trained on it (Shokri et al. 2017; from updates, Nasr et al.
2019). Four attacks score every candidate against every update the server sees; two uncalibrated
(one threshold for every candidate) and two calibrated by shadow updates:

- ``loss``: the drop of the candidate's loss from the start model to the start plus the update,
  ``L(start, x) - L(start + update, x)`` (to first order ``-grad L(start, x) . update``). Needs only
  forward passes; an int8 head's logits move in steps of its output scale, which blunts it.
- ``cosine``: the cosine between the update and the candidate's own update, what the same client
  code sends holding only that image (Nasr et al.'s gradient view, through the real scheme and codec):
  the update is a sum of its images' contributions, so a member's own direction stands in it.
- ``lira`` (LiRA's offline variant, Carlini et al. 2022): the server makes shadow updates through the
  same client code (scheme, codec, rounding, privacy) from the same start on its public shadow images,
  never a candidate, and fits per candidate a Gaussian to the logit-scaled confidence
  ``log p_y - log(1 - p_y)`` the shadow-updated models give it; the score is the observed confidence's
  standardized distance above that out-distribution (monotone in the one-sided likelihood of the offline
  variant). Only out-shadows: an in-shadow trains on the candidate, and the shadows use public images only.
- ``lira-cosine``: the same per-candidate calibration of ``cosine``.

Data: scikit-image's ``lfw_subset`` (100 faces, 100 non-faces, 25x25 grey), resized to 32x32 on 3
channels, labels face / non-face; nothing is downloaded. Each seed splits the 200 images into the
server's pretraining images, its shadow images and the candidates (stratified, disjoint); the
target clients each hold ``batch`` candidates, the members of their update; every other candidate
is a non-member of it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skimage.data import lfw_subset

from fedtiny.attack.malicious import target_public, trap_for, trap_state
from fedtiny.attack.presets import LFW_FACES, _resize
from fedtiny.attack.run import client_updates, malicious_scenario, update_row
from fedtiny.budget.schemes import parse_scheme, resolve
from fedtiny.data.sources import ImageSet
from fedtiny.errors import ScenarioError
from fedtiny.federated.task import Task, cloud_model, make_task, with_scheme
from fedtiny.models.state import load_arrays, to_wire
from fedtiny.privacy.dp import dp_epsilon
from fedtiny.progress import left, say
from fedtiny.scenario import Scenario, load_scenario

__all__ = [
    "SETTINGS",
    "ATTACKS",
    "HEADLINE",
    "MembershipConfig",
    "roc_auc",
    "tpr_at_fpr",
    "roc_summary",
    "dp_tpr_bound",
    "dp_auc_bound",
    "check_settings",
    "check_config",
    "setting_scenario",
    "lfw_pool",
    "split",
    "run_setting",
    "run_membership",
]

QUICKSTART = Path(__file__).resolve().parents[2] / "scenarios" / "quickstart.toml"

# The quickstart's scenario moved onto the faces: lfw-faces at 32x32 on 3 channels, tiny-ir pretrained by the
# server (no model file: the quickstart's is for 8x8 digits), and a 256 KB device: a 32x32x3 client of the
# sparse scheme does not fit the quickstart's nRF52832 (64 KB), which would refuse to train.
ON_FACES: dict[str, Any] = {
    "run.name": "membership",
    "data.source": "lfw-faces",
    "data.image_size": 32,
    "data.channels": 3,
    "model.file": "",
    "model.head": "new",
    "device.profiles": ["mcu-256kb"],
    "data.public_fraction": 0.0,  # the server's images are the harness's (see PARTITIONS)
    "data.test_fraction": 0.05,
}

# Local DP as docs/results/privacy.md's epsilon-8 rows: noise multiplier 1.28 (one release, delta 1e-5);
# the clip is about the size of an undefended change of this setting (real units).
DP_CLIP_NORM = 0.05
DP_NOISE_MULTIPLIER = 1.28

# Partitions of the scenario's own federation of lfw_subset: its 200 images less a 5% test share (no public
# share). A client trains on the images the harness hands it (``local_round``'s ``data``); its partition id
# gives it its training and noise seeds, so every target and shadow client takes its own.
PARTITIONS = 190

# name -> (what the server sees, overrides of the quickstart on faces; None: the malicious server's trap)
SETTINGS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "fp32-dense": (
        "float tiny-ir, every parameter trained, dense fp32 update",
        {"model.precision": "fp32", "train.optimizer": "sgd", "train.scheme": "full", "compression.uplink": "dense"},
    ),
    "int8-dense": (
        "int8 tiny-ir, full scheme, dense int8 update",
        {"train.scheme": "full", "compression.uplink": "dense"},
    ),
    "quickstart": ("the quickstart's sparse scheme, top-k 10% int8 values, error feedback", {}),
    "aggregate": ("the quickstart's updates, the server sees the mean of a round's clients", {}),
    "local-dp": (
        "the quickstart's updates with local DP",
        {"privacy.dp": "local", "privacy.clip_norm": DP_CLIP_NORM, "privacy.noise_multiplier": DP_NOISE_MULTIPLIER},
    ),
    "trap": (
        "the malicious server's imprint trap (faces-malicious's client: one full-batch step, every change sent)",
        None,
    ),
}
ATTACKS = ("loss", "cosine", "lira", "lira-cosine")
HEADLINE = ("quickstart", "lira")  # the setting and attack whose figures stand at the top of the JSON line


@dataclass(frozen=True)
class MembershipConfig:
    """How many of everything, per seed.

    Attributes
    ----------
    seeds
        Each seed splits the images anew, pretrains its own start model and trains its own clients.
    batch
        Images each client holds (one local epoch over them, the setting's batch size).
    candidates
        Candidate images per seed (half faces); the rest of the 200 are the server's public images.
    shadow_images
        Of the public images, those the shadow clients train on (the others pretrain the start model).
    shadows
        Shadow updates per seed (LiRA's out-distribution).
    aggregate_clients
        Clients per round in ``aggregate``: the server sees their mean update.
    aggregate_draws
        Groupings of the target clients into rounds (each a random partition) in ``aggregate``.
    pretrain_epochs
        Epochs of the server's float pretraining of the start model (0: the scenario's).
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    batch: int = 4
    candidates: int = 120
    shadow_images: int = 40
    shadows: int = 64
    aggregate_clients: int = 10
    aggregate_draws: int = 4
    pretrain_epochs: int = 0


# --- metrics -------------------------------------------------------------------------------------------------


def roc_auc(members, nonmembers) -> float:
    """Area under the ROC curve of scores where larger means "member": the probability that a random
    member outscores a random non-member, ties counting half (the Mann-Whitney statistic over
    ``len(members) * len(nonmembers)``).
    """
    m, n = np.asarray(members, np.float64).ravel(), np.asarray(nonmembers, np.float64).ravel()
    if not len(m) or not len(n):
        raise ValueError("roc_auc: needs at least one member and one non-member score")
    s = np.sort(n)
    below = np.searchsorted(s, m, side="left")
    ties = np.searchsorted(s, m, side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (len(m) * len(n)))


def tpr_at_fpr(members, nonmembers, fpr: float) -> float:
    """The largest true-positive rate of a threshold ``score >= t`` whose false-positive rate is at most ``fpr``.

    With N non-members the false-positive rates a threshold can have are multiples of 1/N: the smallest
    non-zero one is 1/N, so at ``fpr < 1/N`` only thresholds above every non-member count (FPR 0), and a
    figure at 0.1% needs at least 1000 non-members to mean "at 0.1%". Report the number of non-members
    beside it (:func:`roc_summary` does).
    """
    m, n = np.asarray(members, np.float64).ravel(), np.sort(np.asarray(nonmembers, np.float64).ravel())
    if not len(m) or not len(n):
        raise ValueError("tpr_at_fpr: needs at least one member and one non-member score")
    allowed = math.floor(fpr * len(n) + 1e-9)  # non-members a threshold may let through
    if allowed >= len(n):
        return 1.0
    # the lowest threshold letting ``allowed`` non-members through: just above the (allowed+1)-th largest
    bar = n[len(n) - 1 - allowed]
    return float(np.mean(m > bar))


def roc_summary(members, nonmembers) -> dict[str, float | int]:
    """AUC, TPR at 1% and 0.1% FPR, and the counts they rest on (``min_fpr``: 1 / non-members)."""
    n = len(np.ravel(nonmembers))
    return {
        "auc": round(roc_auc(members, nonmembers), 4),
        "tpr_at_1pct_fpr": round(tpr_at_fpr(members, nonmembers, 0.01), 4),
        "tpr_at_0p1pct_fpr": round(tpr_at_fpr(members, nonmembers, 0.001), 4),
        "members": len(np.ravel(members)),
        "nonmembers": n,
        "min_fpr": 1.0 / n if n else 1.0,
    }


def dp_tpr_bound(epsilon: float, delta: float, fpr) -> np.ndarray:
    """The most TPR any test can reach at ``fpr`` against an (epsilon, delta)-DP release (Kairouz et al. 2015):
    ``min(1, e^eps FPR + delta, 1 - e^-eps (1 - delta - FPR))``."""
    f = np.asarray(fpr, np.float64)
    e = math.exp(epsilon)
    return np.clip(np.minimum(np.minimum(e * f + delta, 1.0 - (1.0 - delta - f) / e), 1.0), 0.0, 1.0)


def dp_auc_bound(epsilon: float, delta: float) -> float:
    """The largest AUC an (epsilon, delta)-DP release allows: the area under :func:`dp_tpr_bound`, exact
    (the bound is piecewise linear; its corners are at FPR ``(1 - delta) / (1 + e^eps)`` and ``1 - delta``)."""
    corners = [(1.0 - delta) / (1.0 + math.exp(epsilon)), 1.0 - delta]
    x = np.unique(np.clip(np.r_[np.linspace(0.0, 1.0, 3), corners], 0.0, 1.0))
    y = dp_tpr_bound(epsilon, delta, x)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))


# --- data and settings ---------------------------------------------------------------------------------------


def check_settings(names) -> tuple[str, ...]:
    """The settings asked for, in order; a :class:`ScenarioError` naming an unknown one and the choices."""
    names = tuple(names)
    for name in names:
        if name not in SETTINGS:
            raise ScenarioError(f"--setting: unknown {name!r}; known: {', '.join(SETTINGS)}")
    return names


def lfw_pool() -> tuple[np.ndarray, np.ndarray]:
    """All 200 ``lfw_subset`` patches as ``[200, 3, 32, 32]`` float32 in [0, 1] and their labels (1: face)."""
    x = _resize(lfw_subset().astype(np.float32)[:, None], 32).repeat(3, axis=1)
    y = (np.arange(len(x)) < LFW_FACES).astype(np.int64)
    return x.astype(np.float32), y


def check_config(cfg: MembershipConfig) -> None:
    """A :class:`ScenarioError` naming what does not fit, before any slow work."""
    targets = cfg.candidates // max(cfg.batch, 1)
    problems = [
        (not cfg.seeds, "seeds: none given"),
        (cfg.batch < 1, f"batch: {cfg.batch} images per client, at least 1"),
        (cfg.candidates < 2 or cfg.candidates % 2, f"candidates: {cfg.candidates}, an even number of at least 2"),
        (
            cfg.shadow_images < max(2, cfg.batch) or cfg.shadow_images % 2,
            f"shadow_images: {cfg.shadow_images}, an even number of at least the {cfg.batch} images a shadow holds",
        ),
        (
            cfg.candidates + cfg.shadow_images > 2 * LFW_FACES - 10,
            f"candidates + shadow_images: {cfg.candidates + cfg.shadow_images} leave fewer than 10 of "
            f"lfw_subset's {2 * LFW_FACES} images to pretrain on",
        ),
        (targets < 1, f"candidates: {cfg.candidates} fill no client of {cfg.batch} images"),
        (
            cfg.shadows < max(2, cfg.aggregate_clients),
            f"shadows: {cfg.shadows}, at least 2 and at least the {cfg.aggregate_clients} clients of an aggregate",
        ),
        (
            targets < cfg.aggregate_clients,
            f"aggregate_clients: {cfg.aggregate_clients} clients per round, but only {targets} target clients",
        ),
        (
            targets + cfg.shadows > PARTITIONS,
            f"{targets} target clients + {cfg.shadows} shadows: more than the "
            f"{PARTITIONS} partitions the faces federation has (one per client)",
        ),
    ]
    for bad, text in problems:
        if bad:
            raise ScenarioError(f"membership: {text}")


def split(seed: int, cfg: MembershipConfig, total: int = 2 * LFW_FACES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(pretrain, shadow, candidates)`` indices into :func:`lfw_pool`: disjoint, each half faces (seeded)."""
    half = total // 2
    rng = np.random.default_rng((seed, 0x3E3))
    faces, others = rng.permutation(half), half + rng.permutation(half)
    c, s = cfg.candidates // 2, cfg.shadow_images // 2
    return tuple(np.r_[faces[a:b], others[a:b]] for a, b in ((c + s, half), (c, c + s), (0, c)))


def setting_scenario(name: str, seed: int, batch: int, clients: int = 10) -> Scenario:
    """The scenario of setting ``name``'s clients (:data:`SETTINGS`) for ``seed``."""
    check_settings([name])
    overrides = SETTINGS[name][1]
    if overrides is None:  # the trap: the client faces-malicious attacks (one step, int8 top-k at density 1)
        trap = {"run.name": "membership-trap", "data.public_fraction": 0.0, "data.test_fraction": 0.05}
        return malicious_scenario(clients, batch, seed=seed, overrides=trap)
    if not QUICKSTART.is_file():
        raise ScenarioError(f"membership: the settings start from {QUICKSTART}, which is missing")
    return load_scenario(QUICKSTART, {**ON_FACES, "run.seed": seed, "run.clients": clients, **overrides})


@dataclass
class Server:
    """What the server holds for one setting and seed: the task (its decoder), the state it sent, the scheme."""

    scenario: Scenario
    task: Task
    sent: dict[str, np.ndarray]
    scheme: Any
    start_accuracy: float | None = None

    def vector(self, changes) -> np.ndarray:
        """A decoded update as one flat vector over the scheme's trainable elements (stored units)."""
        return update_row(self.task, changes)

    def load(self, vector: np.ndarray | None) -> None:
        """Put start + ``vector`` (the server's next model, in on-device dtypes) into the task's model."""
        state, at = dict(self.sent), 0
        for name, _, dtype in self.task.uplink_spec:
            idx = self.task.slices[name]
            flat = self.sent[name].astype(np.float64).ravel()
            if vector is not None:
                flat[idx] += vector[at : at + len(idx)]
            at += len(idx)
            state[name] = to_wire(flat.reshape(self.sent[name].shape), np.dtype(dtype))
        load_arrays(self.task.model, state)


def start_server(
    name: str, seed: int, cfg: MembershipConfig, public: ImageSet, held_out: ImageSet, clients: int
) -> Server:
    """The server of setting ``name``: the start model pretrained (and for int8, quantized) on its ``public``
    pretraining images as its cloud step does, or the trap built from them; the scheme resolved on it."""
    scenario = setting_scenario(name, seed, cfg.batch, clients)
    task = make_task(scenario)
    if SETTINGS[name][1] is None:
        scheme = resolve(parse_scheme(scenario.scheme_text), task.model, seed)
        task = with_scheme(task, scheme)
        return Server(scenario, task, trap_state(task, target_public(public), trap_for(target_public(public))), scheme)
    if cfg.pretrain_epochs:
        m = dataclasses.replace(scenario.model, pretrain_epochs=cfg.pretrain_epochs)
        task = dataclasses.replace(task, scenario=dataclasses.replace(scenario, model=m))
    # the server's cloud step, on its own public images (never a candidate)
    cloud = dataclasses.replace(task, federation=dataclasses.replace(task.federation, public=public, test=held_out))
    sent, report = cloud_model(cloud)
    scheme = None
    if scenario.model.precision == "int8":
        load_arrays(task.model, sent)
        scheme = resolve(parse_scheme(scenario.scheme_text), task.model, seed)
    task = with_scheme(dataclasses.replace(task, scenario=scenario), scheme)
    accuracy = report.fp32_accuracy if report.ptq_accuracy is None else report.ptq_accuracy
    return Server(scenario, task, sent, scheme, accuracy)


# --- the attacks ---------------------------------------------------------------------------------------------


@torch.no_grad()
def candidate_stats(server: Server, vector: np.ndarray | None, x: torch.Tensor, y: torch.Tensor):
    """``(loss, confidence)`` of every candidate under start + ``vector``: cross-entropy and LiRA's
    logit-scaled confidence ``log p_y - log(1 - p_y)`` from the model's logits (float64)."""
    server.load(vector)
    z = server.task.model.eval()(x).double()
    own = z.gather(1, y[:, None])[:, 0]
    others = z.scatter(1, y[:, None], -math.inf).logsumexp(1)
    return (z.logsumexp(1) - own).numpy(), (own - others).numpy()


def lira_scores(observed: np.ndarray, shadows: np.ndarray) -> np.ndarray:
    """Offline LiRA: per candidate (column), the observed confidence standardized by the shadows' Gaussian.

    ``observed``: ``[updates, candidates]``; ``shadows``: ``[shadow updates, candidates]``. A candidate whose
    shadows all agree (an int8 head's logits move in steps) gets the median spread of the others, so it
    neither wins nor loses by a zero variance.
    """
    mu, sd = shadows.mean(0), shadows.std(0, ddof=1)
    floor = np.median(sd[sd > 0]) if (sd > 0).any() else 1.0
    return (observed - mu) / np.where(sd > 0, sd, floor)


def _mean_groups(rows: np.ndarray, size: int, draws: int, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """Means of ``rows`` over groups of ``size`` (``draws`` random partitions): the aggregates a server sees."""
    means, groups = [], []
    for _ in range(draws):
        order = rng.permutation(len(rows))
        for g in range(len(rows) // size):
            members = order[g * size : (g + 1) * size]
            means.append(rows[members].mean(0))
            groups.append(members)
    return np.stack(means), groups


def run_setting(name: str, seed: int, cfg: MembershipConfig = MembershipConfig(), log=sys.stderr) -> dict[str, Any]:
    """One setting and seed: the target and shadow clients' updates through fedtiny's client, and per attack
    the scores of the members and the non-members of every update the server sees.

    Returns
    -------
    ``scores`` (attack -> ``(members, non-members)``), ``seconds``, ``start_accuracy`` (the start model on the
    shadow images), ``update_norm`` (median L2 in real units of what the server sees), ``nonzero`` (share of
    the scheme's elements an update changes), and with local DP ``dp`` (the one release's epsilon and delta).
    """
    check_settings([name])
    check_config(cfg)
    t0 = time.perf_counter()
    x, y = lfw_pool()
    pre, shadow_ids, cand = split(seed, cfg)
    rng = np.random.default_rng((seed, 0x1EA))
    targets = len(cand) // cfg.batch
    holds = rng.permutation(cand)[: targets * cfg.batch].reshape(targets, cfg.batch)  # candidate ids per client
    public = np.r_[pre, shadow_ids]
    server = start_server(
        name,
        seed,
        cfg,
        ImageSet(x[public], y[public], 2, "public")
        if SETTINGS[name][1] is None
        else ImageSet(x[pre], y[pre], 2, "pre"),
        ImageSet(x[shadow_ids], y[shadow_ids], 2, "held-out"),
        targets + cfg.shadows,  # a partition id each: a client's training and noise draw from (seed, round, id)
    )
    shadow_batches = np.stack([rng.choice(shadow_ids, cfg.batch, replace=False) for _ in range(cfg.shadows)])
    updates = client_updates(
        server.scenario,
        server.task,
        server.scheme,
        server.sent,
        x[np.r_[holds, shadow_batches]],
        y[np.r_[holds, shadow_batches]],
    )
    refusals = [u for u in updates if isinstance(u, str)]
    if refusals:
        raise ScenarioError(f"membership: {name}: {len(refusals)} clients refused to train: {refusals[0]}")
    say(f"membership: {name} seed {seed}: {targets} target and {cfg.shadows} shadow clients trained", log)
    rows = np.stack([server.vector(u) for u in updates])
    rows, shadow_rows = rows[:targets], rows[targets:]
    member = np.zeros((targets, len(cand)), bool)
    pos = {c: i for i, c in enumerate(cand)}
    for t, h in enumerate(holds):
        member[t, [pos[c] for c in h]] = True
    if name == "aggregate":  # the server sees each round's mean; the shadows are means of as many shadow updates
        rows, groups = _mean_groups(rows, cfg.aggregate_clients, cfg.aggregate_draws, rng)
        member = np.stack([member[g].any(0) for g in groups])
        shadow_rows, _ = _mean_groups(
            shadow_rows, cfg.aggregate_clients, math.ceil(cfg.shadows / (cfg.shadows // cfg.aggregate_clients)), rng
        )
    scores = _attack(server, rows, shadow_rows, x[cand], y[cand])
    out: dict[str, Any] = {
        "scores": {a: (v[member], v[~member]) for a, v in scores.items()},
        "seconds": time.perf_counter() - t0,
        "start_accuracy": server.start_accuracy,
        "update_norm": float(np.median(np.linalg.norm(rows * _units(server), axis=1))),
        "nonzero": float(np.mean(rows != 0)),
    }
    p = server.scenario.privacy
    if p.dp != "none":  # the accountant fedtiny's run summary uses (dp_epsilon), for the one update sent
        eps = dp_epsilon(p.dp, p.noise_multiplier, p.delta, releases=1)
        out["dp"] = {"epsilon": eps, "delta": p.delta, "clip_norm": p.clip_norm, "noise_multiplier": p.noise_multiplier}
    return out


def _attack(server: Server, rows: np.ndarray, shadow_rows: np.ndarray, x: np.ndarray, y: np.ndarray):
    """Every attack's score of every candidate (columns) against every observed update (rows of ``rows``)."""
    xc, yc = torch.from_numpy(x), torch.from_numpy(y)
    loss0, _ = candidate_stats(server, None, xc, yc)
    seen = [candidate_stats(server, r, xc, yc) for r in rows]
    shadow_conf = np.stack([candidate_stats(server, r, xc, yc)[1] for r in shadow_rows])
    units = _units(server)
    own = own_updates(server, x, y) * units
    cos, shadow_cos = _cosines(rows * units, own), _cosines(shadow_rows * units, own)
    return {
        "loss": np.stack([loss0 - loss for loss, _ in seen]),
        "cosine": cos,
        "lira": lira_scores(np.stack([conf for _, conf in seen]), shadow_conf),
        "lira-cosine": lira_scores(cos, shadow_cos),
    }


def own_updates(server: Server, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each candidate's own update: what the same client sends holding only that image, without local DP's
    noise (the attacker's reference direction), as rows of stored units (zeros where the client refused)."""
    s = server.scenario
    plain = dataclasses.replace(s, privacy=dataclasses.replace(s.privacy, dp="none"))
    ups = client_updates(plain, server.task, server.scheme, server.sent, x[:, None], y[:, None])
    return np.stack([np.zeros(len(_units(server))) if isinstance(u, str) else server.vector(u) for u in ups])


def _cosines(rows: np.ndarray, own: np.ndarray) -> np.ndarray:
    """``[updates, candidates]``: the cosine of each update with each candidate's own update (0 for a zero vector)."""
    a = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-300)
    b = own / np.maximum(np.linalg.norm(own, axis=1, keepdims=True), 1e-300)
    return a @ b.T


def _units(server: Server) -> np.ndarray:
    """The real value of one stored unit of each element of an update vector."""
    return np.concatenate([server.task.units[n][server.task.slices[n]] for n, *_ in server.task.uplink_spec])


def run_membership(
    settings=tuple(SETTINGS), cfg: MembershipConfig = MembershipConfig(), log=sys.stderr
) -> dict[str, Any]:
    """Every setting over ``cfg.seeds``: per setting and attack the ROC figures of the pooled scores;
    at the top level the headline's (:data:`HEADLINE`) when it was run."""
    settings = check_settings(settings)
    out: dict[str, Any] = {"settings": {}, "seeds": list(cfg.seeds), "config": dataclasses.asdict(cfg)}
    t_all = time.perf_counter()
    for k, name in enumerate(settings):
        runs = [run_setting(name, seed, cfg, log) for seed in cfg.seeds]
        row: dict[str, Any] = {"description": SETTINGS[name][0], "seeds": list(cfg.seeds)}
        for attack in ATTACKS:
            m = np.concatenate([r["scores"][attack][0] for r in runs])
            n = np.concatenate([r["scores"][attack][1] for r in runs])
            by_seed = [round(roc_auc(*r["scores"][attack]), 4) for r in runs]
            row[attack] = {**roc_summary(m, n), "seeds": list(cfg.seeds), "auc_by_seed": by_seed}
        row["seconds"] = round(sum(r["seconds"] for r in runs), 1)
        row["start_accuracy"] = [r["start_accuracy"] for r in runs]
        row["update_norm"] = round(float(np.median([r["update_norm"] for r in runs])), 6)
        row["nonzero"] = round(float(np.mean([r["nonzero"] for r in runs])), 4)
        if "dp" in runs[0]:
            dp = runs[0]["dp"]
            row["dp"] = {
                **dp,
                "epsilon": round(dp["epsilon"], 4),
                "tpr_at_1pct_fpr_bound": round(float(dp_tpr_bound(dp["epsilon"], dp["delta"], 0.01)), 4),
                "tpr_at_0p1pct_fpr_bound": round(float(dp_tpr_bound(dp["epsilon"], dp["delta"], 0.001)), 4),
                "auc_bound": round(dp_auc_bound(dp["epsilon"], dp["delta"]), 4),
            }
        out["settings"][name] = row
        elapsed = time.perf_counter() - t_all
        say(
            f"membership: {k + 1}/{len(settings)} {name}: lira AUC {row['lira']['auc']:.3f}, loss AUC "
            f"{row['loss']['auc']:.3f} | {elapsed:.0f} s {left(k + 1, len(settings), elapsed)}",
            log,
        )
    setting = HEADLINE[0] if HEADLINE[0] in out["settings"] else settings[0]
    head = out["settings"][setting][HEADLINE[1]]
    out.update({k: head[k] for k in ("auc", "tpr_at_1pct_fpr", "tpr_at_0p1pct_fpr", "members", "nonmembers")})
    out["headline"] = f"{setting}/{HEADLINE[1]}"
    return out


# --- inside a simulation -------------------------------------------------------------------------------------

NONMEMBERS = 32  # held-out images a simulation's membership test scores against the clients' own


def _trained_part(task, ob: dict) -> dict:
    """An observation's change on the elements the scheme trains: an aggregate holds every element of
    each tensor (zeros included), a client's update only those it sent."""
    if "members" not in ob:
        return ob["changes"]
    return {n: (task.slices[n], v[task.slices[n]]) for n, (_, v) in ob["changes"].items() if n in task.slices}


def observed_membership(task, observed: list[dict], images_of, scheme=None, log=None) -> dict[str, Any] | None:
    """Membership inference on what the server of a simulation observed: ``cosine`` (each candidate's
    own update, made by the same client code from the state that round sent, against each observed
    update; the strongest test at low false-positive rates in ``fedtiny attack --preset membership``).

    Candidates are every attacked client's training images (members of its own update, and of an
    aggregate that includes it) and up to ``NONMEMBERS`` of the federation's test images (members of
    nothing). ``images_of(observation)`` gives the images behind an observation with, per image, the
    partition it came from (``(ImageSet, owners)``). ``scheme``: the scheme the observed clients
    trained (default the task's). Returns the ROC figures (:func:`roc_summary`, keys prefixed
    ``membership_``), or None when nothing was observed.
    """
    if scheme is not None:
        task = with_scheme(task, scheme)
    by_round: dict[int, list[dict]] = {}
    for ob in observed:
        by_round.setdefault(ob["round"], []).append(ob)
    members, nonmembers = [], []
    test = task.federation.test
    for rnd, obs in sorted(by_round.items()):
        behind = [images_of(ob) for ob in obs]
        xs, ys, owners, done = [], [], [], set()
        for data, own in behind:
            fresh = [i for i, pid in enumerate(own) if pid not in done]  # a client's images once, whatever holds them
            done.update(own)
            xs += [data.x[i] for i in fresh]
            ys += [data.y[i] for i in fresh]
            owners += [own[i] for i in fresh]
        held = min(NONMEMBERS, len(test))
        x = np.concatenate([np.stack(xs), test.x[:held]]).astype(np.float32)
        y = np.concatenate([np.asarray(ys), test.y[:held]]).astype(np.int64)
        owner = np.r_[np.asarray(owners), np.full(held, -1)]
        server = Server(task.scenario, task, obs[0]["state"], task.scheme)
        units = _units(server)
        own = own_updates(server, x, y) * units
        rows = np.stack([server.vector(_trained_part(server.task, ob)) for ob in obs]) * units
        scores = _cosines(rows, own)
        for j, ob in enumerate(obs):
            inside = np.isin(owner, ob.get("members", [ob["partition_id"]]))
            members.append(scores[j, inside])
            nonmembers.append(scores[j, ~inside])
        if log is not None:
            say(f"membership: round {rnd}: {len(obs)} observed updates against {len(x)} candidates", log)
    inside, outside = np.concatenate(members) if members else [], np.concatenate(nonmembers) if nonmembers else []
    if not len(inside) or not len(outside):  # e.g. one client attacked and no held-out images: nothing to tell apart
        return None
    return {f"membership_{k}": v for k, v in roc_summary(inside, outside).items()}
