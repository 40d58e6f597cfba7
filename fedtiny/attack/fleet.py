"""Attacks inside a simulation: the server attacks what chosen clients actually sent.

The observation is the decoded update the server received (only the transmitted
coordinates, dequantized). The attacker knows the model the client received, its scheme,
its number of training images and the round's local training (epochs, batch size, learning
rate), and simulates that training on an int8 model's float surrogate (QAS makes int8 SGD
follow the float update). Clients whose batch size is smaller than their data shuffle into
minibatches the attacker cannot know; it then assumes full-batch steps.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtiny.attack.attacks import AttackConfig, reconstruct
from fedtiny.attack.metrics import score
from fedtiny.attack.threat import ThreatModel

__all__ = ["Observed", "attack_observed", "targets_of"]

Observed = dict[str, Any]  # round, partition_id, changes {name: (idx, values)}, state {name: array}


def targets_of(cfg) -> tuple[set[int], set[int]]:
    """(partition ids, rounds) an ``[attack]`` section selects."""
    ids = {int(p) for p in cfg.clients.split(",") if p.strip()}
    rounds = {int(r) for r in cfg.rounds.split(",") if r.strip()}
    return ids, rounds


def _attacker_model(task, state):
    from fedtiny.attack.surrogate import Surrogate, to_real_units
    from fedtiny.int8.graph import QModel
    from fedtiny.models.state import load_arrays

    model = copy.deepcopy(task.model)
    load_arrays(model, state)
    if isinstance(model, QModel):
        return Surrogate(model).eval(), lambda name, t: to_real_units(model, name, t)
    return model.eval(), lambda name, t: t


def attack_observed(task, observed: list[Observed], cfg, run_dir: Path | None = None) -> dict[str, Any]:
    """Attack every observed update; return (and write) the privacy report."""
    s = task.scenario
    results, grids = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, s.run.num_cpus))  # the clients are done: the attack may use the cores
    try:
        _attack_all(task, observed, cfg, results, grids)
    finally:
        torch.set_num_threads(threads)
    done = [r for r in results if "mean_psnr_db" in r]
    report = {"attacks": results, "method": cfg.method, "labels": cfg.labels,
              "mean_psnr_db": float(np.mean([r["mean_psnr_db"] for r in done])) if done else None,
              "mean_ssim": float(np.mean([r["mean_ssim"] for r in done])) if done else None,
              "label_accuracy": float(np.mean([r["label_accuracy"] for r in done])) if done else None}
    if run_dir is not None:
        import json

        (Path(run_dir) / "privacy.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        if grids:
            from fedtiny.attack.run import plot_grid

            t = np.concatenate([g[0] for g in grids])
            r = np.concatenate([g[1] for g in grids])
            plot_grid(t, r, [p for g in grids for p in g[2]], Path(run_dir) / "reconstructions.png")
    return report


def _attack_all(task, observed: list[Observed], cfg, results: list, grids: list) -> None:
    s = task.scenario
    for ob in observed:
        model, to_real = _attacker_model(task, ob["state"])
        train, _ = task.federation.client_data(ob["partition_id"])
        n = len(train)
        if n > cfg.max_images:
            results.append({"round": ob["round"], "partition_id": ob["partition_id"], "skipped":
                            f"{n} training images > attack.max_images = {cfg.max_images}"})
            continue
        obs = {}
        for name, shape, _ in task.uplink_spec:
            values = torch.zeros(int(np.prod(shape)))
            mask = torch.zeros(int(np.prod(shape)), dtype=torch.bool)
            if name in ob["changes"]:
                idx, change = ob["changes"][name]
                values[torch.as_tensor(idx)] = torch.as_tensor(change, dtype=torch.float32)
                mask[torch.as_tensor(idx)] = True
            obs[name] = (to_real(name, values.view(shape))[None], mask.view(shape)[None])
        steps = s.train.local_epochs * math.ceil(n / s.train.batch_size)
        threat = ThreatModel(observation="delta", local_steps=steps, lr=s.train.lr, batch_size=n,
                             labels=cfg.labels, trainable=tuple(obs))
        x = torch.from_numpy(train.x)[None]
        y = torch.from_numpy(train.y)[None]
        labels = y if cfg.labels == "known" else None
        rec, lab = reconstruct(model, obs, threat, tuple(train.x.shape[1:]), train.num_classes,
                               AttackConfig(method=cfg.method, iterations=cfg.iterations, tv=cfg.tv), labels=labels)
        sc = score(rec[0].numpy(), train.x, lab[0].numpy(), train.y)
        results.append({"round": ob["round"], "partition_id": ob["partition_id"], "images": n,
                        "local_steps": steps, "mean_psnr_db": float(np.mean(sc["psnr"])),
                        "mean_ssim": float(np.mean(sc["ssim"])), "label_accuracy": sc["label_accuracy"],
                        "transmitted": int(sum(int(m.sum()) for _, m in obs.values())), "psnr_db": sc["psnr"]})
        grids.append((train.x, np.clip(rec[0].numpy()[sc["order"]], 0, 1), sc["psnr"]))
