"""Attacks inside a simulation: the server attacks what chosen clients actually sent.

The observation is the decoded update the server received (only the transmitted
coordinates, dequantized). The attacker knows the model the client received, its scheme,
its number of training images and the round's local training (epochs, batch size, learning
rate), and simulates that training on an int8 model's float surrogate (QAS makes int8 SGD
follow the float update): every local step unrolled, or (``attack.unroll = false``) one step
standing in for them. Clients whose batch size is smaller than their data shuffle into
minibatches the attacker cannot know; it then assumes full-batch steps.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtiny.attack.attacks import AttackConfig, Intervals, match_cosine, progress_printer, reconstruct
from fedtiny.attack.malicious import Knowledge, imprint, simulation_trap, trap_scheme
from fedtiny.attack.membership import observed_membership
from fedtiny.attack.methods import AttackMethod, attack_method
from fedtiny.attack.metrics import flat_psnr, identification_rank, image_distance, psnr, score, ssim, worst_case
from fedtiny.attack.run import plot_grid
from fedtiny.attack.surrogate import Surrogate, to_real_units
from fedtiny.attack.threat import ThreatModel
from fedtiny.compress.uplink import uplink_codec
from fedtiny.compress.values import value_type
from fedtiny.data.sources import ImageSet
from fedtiny.errors import ScenarioError
from fedtiny.federated.rounds import RoundOutcome
from fedtiny.int8.graph import QConv, QModel, unit_scale
from fedtiny.models.state import load_arrays
from fedtiny.progress import say
from fedtiny.variants import ATTACK_METHODS

__all__ = ["Observed", "ObservationRecorder", "attack_observed", "privacy_figures", "prior_baseline", "targets_of"]

Observed = dict[str, Any]  # round, partition_id, changes {name: (idx, values)}, state {name: array}


def targets_of(cfg) -> tuple[set[int], set[int]]:
    """(partition ids, rounds) an ``[attack]`` section selects."""
    return set(cfg.clients), set(cfg.rounds)


class ObservationRecorder:
    """A round callback that keeps what the server observed of the ``[attack]`` targets.

    For each targeted client accepted in a targeted round it keeps the decoded change
    and the global state the client received: what the attacker works from. With
    ``attack.observe = "aggregate"`` it keeps only the round's combined change (and which
    clients it combines, to score the attack), never a client's own; ``"both"`` keeps both
    kinds, which the report scores apart.
    """

    def __init__(self, cfg) -> None:
        self.ids, self.rounds = targets_of(cfg) if cfg.enabled else (set(), set())
        self.aggregate = cfg.observe in ("aggregate", "both")
        self.clients = cfg.observe in ("client", "both")
        self.observed: list[Observed] = []

    def __call__(self, outcome: RoundOutcome) -> None:
        if outcome.server_round not in self.rounds:
            return
        if self.aggregate and outcome.aggregate is not None:
            self.observed.append(
                {
                    "round": outcome.server_round,
                    "partition_id": min(outcome.accepted),
                    "members": sorted(outcome.accepted),
                    "changes": {k: (np.arange(v.size), v.ravel().copy()) for k, v in outcome.aggregate.items()},
                    "state": {k: v.copy() for k, v in outcome.sent.items()},
                }
            )
        if not self.clients:
            return
        for pid in sorted(self.ids & set(outcome.accepted)):
            self.observed.append(
                {
                    "round": outcome.server_round,
                    "partition_id": pid,
                    "changes": outcome.change(pid),
                    "state": {k: v.copy() for k, v in outcome.sent.items()},
                }
            )


def _attacker_model(task, state):
    """The model the attacker differentiates, the conversion of changes to its units, and the int8 model (or None)."""
    model = copy.deepcopy(task.model)
    load_arrays(model, state)
    if isinstance(model, QModel):
        return Surrogate(model).eval(), lambda name, t: to_real_units(model, name, t), model
    return model.eval(), lambda name, t: t, None


def _change_lsb(model, qmodel, obs, i: int) -> float:
    """Mean |change| of target ``i``'s sent weight elements, in LSB: how far above rounding its update is.

    An int8 model's LSB is its weight's real unit; an fp32 model's is the one symmetric
    per-channel int8 quantization would give it (max|w| / 127 per output channel), so fp32
    and int8 updates sit on one axis.
    """
    sizes = []
    for name, (values, mask) in obs.items():
        module = (qmodel or model).get_submodule(name.rpartition(".")[0])
        if not name.endswith("weight"):
            continue
        if qmodel is not None:
            if not isinstance(module, QConv):
                continue
            unit = unit_scale(qmodel, name).float().expand(values.shape[1:])
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            w = module.weight.detach()
            unit = (w.abs().flatten(1).amax(1) / 127).clamp_min(1e-12).view(-1, *([1] * (w.dim() - 1))).expand_as(w)
        else:
            continue
        sizes.append((values[i] / unit).abs()[mask[i]])
    sent = torch.cat(sizes) if sizes else torch.zeros(0)
    return float(sent.mean()) if len(sent) else 0.0


def _intervals(task, qmodel, obs, steps: int) -> Intervals:
    """Where the client's float change of each sent integer can have been (method ``rounding``).

    Each local step rounds int8 weights stochastically (anywhere within one LSB) or to nearest
    (half an LSB), biases to nearest; ``steps`` roundings add up. The uplink's quantized values
    round once more, with the value type's step (int8: max|change| / 127 per tensor, the widest of the targets').
    A float tensor (an fp32 head) is matched as it is.
    """
    s = task.scenario
    if qmodel is None:
        raise ScenarioError(
            f"attack.method = {task.scenario.attack.method}: the model is not int8 (nothing was rounded)"
        )
    vt = value_type(s.compression.values) if uplink_codec(s.compression.uplink).quantizes else None
    out: Intervals = {}
    for name, (values, _) in obs.items():
        unit = unit_scale(qmodel, name).float().expand(values.shape[1:]).clone()
        if not isinstance(qmodel.get_submodule(name.rpartition(".")[0]), QConv):
            out[name] = (unit, torch.zeros_like(unit))
            continue
        per_step = 1.0 if name.endswith("weight") and s.train.weight_rounding == "stochastic" else 0.5
        half = per_step * steps * unit
        if vt is not None and vt.levels:
            codec_step = float((values / unit).abs().amax()) / vt.levels
            half = half + 0.5 * codec_step * unit
        out[name] = (unit, half)
    return out


def attack_observed(task, observed: list[Observed], cfg, run_dir: Path | None = None) -> dict[str, Any]:
    """Attack every observed update; return (and write) the privacy report."""
    s = task.scenario
    results, grids = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, s.run.num_cpus))  # the clients are done: the attack may use the cores
    try:
        _attack_all(task, observed, cfg, results, grids)
        membership = observed_membership(
            task, observed, lambda ob: _images_and_owners(task, ob), _trained_scheme(task, observed), log=sys.stderr
        )
    finally:
        torch.set_num_threads(threads)
    done = [r for r in results if "mean_psnr_db" in r]
    per_client = [r for r in done if r["observed"] == "client"]
    combined = [r for r in done if r["observed"] != "client"]
    # Top level: each client's own update when the server saw them, else the aggregate.
    report = {
        "attacks": results,
        "method": cfg.method,
        "labels": cfg.labels,
        **_means(per_client or combined),
        "aggregate": _means(combined) if combined else None,
        # was a candidate in the update? every observation's, pooled (clients' and aggregates')
        **(membership or {"membership_auc": None, "membership_tpr_at_1pct_fpr": None}),
        "restarts": cfg.restarts,
        "iterations": cfg.iterations,
        "unroll": cfg.unroll,
    }
    if run_dir is not None:
        (Path(run_dir) / "privacy.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        if grids:
            t = np.concatenate([g[0] for g in grids])
            r = np.concatenate([g[1] for g in grids])
            plot_grid(t, r, [p for g in grids for p in g[2]], Path(run_dir) / "reconstructions.png")
    return report


_REPORTED = (
    "mean_psnr_db",
    "mean_ssim",
    "label_accuracy",
    "match_cosine_at_truth",
    "change_lsb",
    "frac_psnr_25db",
    "mean_flat_psnr_db",
    "oracle_mean_psnr_db",
    "leaked_blocks",
    "mean_identification_rank",
    "frac_identified_top1",
    "mean_prior_psnr_db",
    "mean_prior_ssim",
    "prior_mean_identification_rank",
)


def _means(done: list[dict[str, Any]]) -> dict[str, float | None]:
    """The report's figures: means over the attacked observations (None when nothing was attacked)."""
    return {
        k: float(np.mean([r[k] for r in done])) if done and all(r.get(k) is not None for r in done) else None
        for k in _REPORTED
    }


def privacy_figures(report: dict[str, Any]) -> dict[str, float | None]:
    """``summary.json``'s privacy figures: ``privacy_*`` from the top level, ``privacy_aggregate_*`` when an
    aggregate was attacked besides or instead of the clients."""
    short = {
        "mean_psnr_db": "mean_psnr_db",
        "mean_ssim": "mean_ssim",
        "label_accuracy": "label_accuracy",
        "match_cosine_at_truth": "match_cosine",
        "change_lsb": "change_lsb",
        "frac_psnr_25db": "frac_psnr_25db",
        "mean_flat_psnr_db": "flat_psnr_db",
        "oracle_mean_psnr_db": "oracle_psnr_db",
        "leaked_blocks": "leaked_blocks",
        "mean_identification_rank": "identification_rank",
        "frac_identified_top1": "identified_top1",
        "mean_prior_psnr_db": "prior_psnr_db",
        "mean_prior_ssim": "prior_ssim",
        "prior_mean_identification_rank": "prior_identification_rank",
    }
    # .get: a report written before the prior baseline existed has no prior figures
    out = {f"privacy_{v}": report.get(k) for k, v in short.items()}
    out["privacy_membership_auc"] = report.get("membership_auc")
    out["privacy_membership_tpr_1pct"] = report.get("membership_tpr_at_1pct_fpr")
    if report.get("aggregate"):
        out.update({f"privacy_aggregate_{v}": report["aggregate"].get(k) for k, v in short.items()})
    return out


def _observation(task, ob: Observed, to_real) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A decoded update as the attacker's (values, mask) per tensor, in the surrogate's units.

    An aggregate is matched on the elements the schemes let clients train (public), zeros included.
    """
    obs = {}
    for name, shape, _ in task.uplink_spec:
        values = torch.zeros(int(np.prod(shape)))
        mask = torch.zeros(int(np.prod(shape)), dtype=torch.bool)
        if name in ob["changes"]:
            idx, change = ob["changes"][name]
            if "members" in ob:
                idx, change = task.slices[name], change[task.slices[name]]
            values[torch.as_tensor(idx)] = torch.as_tensor(change, dtype=torch.float32)
            mask[torch.as_tensor(idx)] = True
        obs[name] = (to_real(name, values.view(shape)), mask.view(shape))
    return obs


def _trained_scheme(task, observed: list[Observed]):
    """The scheme the observed clients trained: the task's, or the trap's that a malicious server sent."""
    if task.scenario.attack.server != "malicious" or not observed or task.scheme is None:
        return None
    model = copy.deepcopy(task.model)
    load_arrays(model, observed[0]["state"])
    trap = simulation_trap(task)[1]
    return trap_scheme(model, trap.layer, trap.inputs)


def _images_and_owners(task, ob: Observed) -> tuple[ImageSet, list[int]]:
    """The training images behind an observation and the partition each came from."""
    pids = ob.get("members", [ob["partition_id"]])
    parts = [task.federation.client_data(p)[0] for p in pids]
    owners = [p for p, d in zip(pids, parts) for _ in range(len(d))]
    return _images_behind(task, ob), owners


def _images_behind(task, ob: Observed):
    """The training images behind an observation: the client's, or every member's of an aggregate."""
    parts = [task.federation.client_data(p)[0] for p in ob.get("members", [ob["partition_id"]])]
    if len(parts) == 1:
        return parts[0]
    return ImageSet(
        np.concatenate([d.x for d in parts]), np.concatenate([d.y for d in parts]), parts[0].num_classes, parts[0].name
    )


CANDIDATES = 500  # images the server identifies a client's image among (the federation's, public and private)


def candidate_pool(task, own, owners=()) -> tuple[np.ndarray, np.ndarray]:
    """The images an attacker identifies ``own`` (an ``ImageSet``) among: ``own`` first, then the public
    images and the training images of the clients other than its ``owners`` (partition ids), up to
    ``CANDIDATES`` in all; with the indices of ``own`` in it. (An image twice in the pool would tie
    with itself, and a tie counts against the attacker.)"""
    parts, n = [own.x, task.federation.public.x], len(own) + len(task.federation.public)
    for pid in range(task.scenario.run.clients):
        if n >= CANDIDATES:
            break
        if pid in owners:
            continue
        parts.append(task.federation.client_data(pid)[0].x)
        n += len(parts[-1])
    return np.concatenate(parts)[:CANDIDATES], np.arange(len(own))


def _identified(ranks: list[int], candidates: int) -> dict[str, Any]:
    """An observation's identification figures: each image's rank among ``candidates``, their mean, and
    the share ranked first."""
    return {
        "identification_rank": list(map(int, ranks)),
        "mean_identification_rank": float(np.mean(ranks)),
        "frac_identified_top1": float(np.mean(np.asarray(ranks) == 1)),
        "candidates": candidates,
    }


def prior_baseline(task, images: np.ndarray, pool: np.ndarray, ids: np.ndarray) -> dict[str, Any]:
    """The server's prior scored as if it were the reconstruction of each of an observation's images.

    Without looking at any update the server can guess the mean of its public images; an attack
    that does no better than this guess has learned nothing about the client's image beyond what
    the server knew (the flat baseline grants the attacker each image's own brightness, this one
    grants nothing).

    Parameters
    ----------
    task
        The federation's task: its public images ``task.federation.public.x`` (``[N, C, H, W]`` in
        [0, 1]) make the prior.
    images
        The observation's training images, ``[n, C, H, W]``, in the order of the attack's per-image
        scores.
    pool
        The candidates the attack identifies among (:func:`candidate_pool`), ``[M, C, H, W]``.
    ids
        Each image's index in ``pool``.

    Returns
    -------
    Per image ``prior_psnr_db``, ``prior_ssim`` and ``prior_identification_rank`` (the true image's
    rank among ``pool`` by distance to the prior), and their means ``mean_prior_psnr_db``,
    ``mean_prior_ssim``, ``prior_mean_identification_rank``; every figure None when the server has
    no public image of the images' shape.
    """
    public = task.federation.public.x
    if not len(public) or tuple(public.shape[1:]) != tuple(images.shape[1:]):
        return dict.fromkeys(
            (
                "prior_psnr_db",
                "prior_ssim",
                "prior_identification_rank",
                "mean_prior_psnr_db",
                "mean_prior_ssim",
                "prior_mean_identification_rank",
            )
        )
    prior = np.asarray(public, np.float64).mean(axis=0)
    distances = image_distance(prior, pool)  # one guess for every image: its distances serve them all
    per = {
        "prior_psnr_db": [psnr(prior, t) for t in images],
        "prior_ssim": [ssim(prior, t) for t in images],
        "prior_identification_rank": [identification_rank(distances, int(i)) for i in ids],
    }
    return {
        **per,
        "mean_prior_psnr_db": float(np.mean(per["prior_psnr_db"])),
        "mean_prior_ssim": float(np.mean(per["prior_ssim"])),
        "prior_mean_identification_rank": float(np.mean(per["prior_identification_rank"])),
    }


def _imprint_all(task, members: list, results: list, grids: list) -> None:
    """The malicious server's imprint on each observed update (``fedtiny.attack.malicious.imprint``)."""
    public, trap = simulation_trap(task)
    for ob, data in members:
        pool, ids = candidate_pool(task, data, ob.get("members", [ob["partition_id"]]))
        out = imprint(task, [(ob["changes"], ob["state"], trap)], Knowledge.of(public, pool), data.x, ids)
        rec = out.pop("recon")
        results.append(
            {
                "round": ob["round"],
                "partition_id": ob["partition_id"],
                "images": len(data),
                "observed": "aggregate of " + ",".join(map(str, ob["members"])) if "members" in ob else "client",
                "mean_psnr_db": float(np.mean(out["psnr_db"])),
                "mean_ssim": float(np.mean(out["ssim"])),
                "label_accuracy": None,
                "match_cosine_at_truth": None,
                "change_lsb": None,
                "true_labels": data.y.tolist(),
                "oracle_mean_psnr_db": float(np.mean(out["oracle_psnr_db"])),
                **out,
                **_identified(out["identification_rank"], len(pool)),
                **prior_baseline(task, data.x, pool, ids),
            }
        )
        worst = worst_case({"imprint": out["psnr_db"]}, {"imprint": out["ssim"]}, out["flat_psnr_db"])
        results[-1].update(frac_psnr_25db=worst["frac_psnr_25db"], mean_flat_psnr_db=worst["mean_flat_psnr_db"])
        grids.append((data.x, np.clip(rec, 0, 1), out["psnr_db"]))


ATTACK_METHODS.add("imprint", AttackMethod("imprint", observed=_imprint_all))


def _attack_all(task, observed: list[Observed], cfg, results: list, grids: list) -> None:
    """Attack the observed updates, one vectorized problem per (round, number of images)."""
    s = task.scenario
    groups: dict[tuple[int, int], list[tuple[Observed, Any]]] = {}
    for ob in observed:
        train = _images_behind(task, ob)
        if len(train) > cfg.max_images:
            results.append(
                {
                    "round": ob["round"],
                    "partition_id": ob["partition_id"],
                    "skipped": f"{len(train)} training images > attack.max_images = {cfg.max_images}",
                }
            )
            continue
        groups.setdefault((ob["round"], len(train)), []).append((ob, train))
    method = attack_method(cfg.method)
    if method.observed is not None:
        method.observed(task, [m for g in sorted(groups.items(), key=lambda g: g[0]) for m in g[1]], results, grids)
        return
    for (rnd, n), members in sorted(groups.items(), key=lambda g: g[0]):
        obs_list, data = [ob for ob, _ in members], [d for _, d in members]
        # All of a round's updates were computed from the same global model.
        model, to_real, qmodel = _attacker_model(task, obs_list[0]["state"])
        per = [_observation(task, ob, to_real) for ob in obs_list]
        obs = {k: (torch.stack([o[k][0] for o in per]), torch.stack([o[k][1] for o in per])) for k in per[0]}
        x = torch.stack([torch.from_numpy(d.x) for d in data])
        y = torch.stack([torch.from_numpy(d.y).long() for d in data])
        # An aggregate is attacked as one step on the union of its clients' images: the example-weighted
        # mean of the clients' one-step changes is exactly that step.
        steps = 1 if "members" in obs_list[0] else s.train.local_epochs * math.ceil(n / s.train.batch_size)
        # Without unrolling, one step stands in for the client's several (same direction to first order).
        threat = ThreatModel(
            observation="delta",
            local_steps=steps if cfg.unroll else 1,
            lr=s.train.lr,
            batch_size=n,
            labels=cfg.labels,
            trainable=tuple(obs),
        )
        num_classes, shape = data[0].num_classes, tuple(data[0].x.shape[1:])
        fidelity = match_cosine(model, obs, threat, x, y, num_classes)
        say(
            f"attack: round {rnd}: {len(obs_list)} client(s) of {n} image(s), {cfg.method}, "
            f"{cfg.iterations} iterations x {cfg.restarts} starts"
        )
        intervals = _intervals(task, qmodel, obs, threat.local_steps) if method.needs_intervals else None
        rec, lab = reconstruct(
            model,
            obs,
            threat,
            shape,
            num_classes,
            AttackConfig(method=cfg.method, iterations=cfg.iterations, tv=cfg.tv, restarts=cfg.restarts),
            labels=y if cfg.labels == "known" else None,
            progress=progress_printer(cfg.iterations),
            intervals=intervals,
        )
        for i, ob in enumerate(obs_list):
            sc = score(rec[i].numpy(), data[i].x, lab[i].numpy(), data[i].y)
            pool, ids = candidate_pool(task, data[i], ob.get("members", [ob["partition_id"]]))
            matched = np.clip(rec[i].numpy()[sc["order"]], 0, 1)
            ranks = [identification_rank(image_distance(r, pool), int(t)) for r, t in zip(matched, ids)]
            results.append(
                {
                    "round": rnd,
                    "partition_id": ob["partition_id"],
                    "images": n,
                    "local_steps": steps,
                    "observed": "aggregate of " + ",".join(map(str, ob["members"])) if "members" in ob else "client",
                    "mean_psnr_db": float(np.mean(sc["psnr"])),
                    "mean_ssim": float(np.mean(sc["ssim"])),
                    "label_accuracy": sc["label_accuracy"],
                    "match_cosine_at_truth": float(fidelity[i]),
                    "change_lsb": _change_lsb(model, qmodel, obs, i),
                    "change_l2": float(sum(float((v[i] * m[i]).square().sum()) for v, m in obs.values())) ** 0.5,
                    "transmitted": int(sum(int(m[i].sum()) for _, m in obs.values())),
                    "psnr_db": sc["psnr"],
                    # per image, in the order of psnr_db: which images (e.g. faces or not) leaked
                    "ssim": sc["ssim"],
                    "true_labels": data[i].y.tolist(),
                    "flat_psnr_db": [flat_psnr(img) for img in data[i].x],
                    **_identified(ranks, len(pool)),
                    **prior_baseline(task, data[i].x, pool, ids),
                }
            )
            worst = worst_case({cfg.method: sc["psnr"]}, {cfg.method: sc["ssim"]}, results[-1]["flat_psnr_db"])
            results[-1].update(frac_psnr_25db=worst["frac_psnr_25db"], mean_flat_psnr_db=worst["mean_flat_psnr_db"])
            grids.append((data[i].x, np.clip(rec[i].numpy()[sc["order"]], 0, 1), sc["psnr"]))
