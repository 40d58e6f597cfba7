"""Benchmarks: each prints a ratio against a baseline run in the same process.

``sim``: one round of N clients, once through the Flower simulation (Ray backend,
``run.num_cpus`` workers, cohorts of virtual clients) and once by as many bare processes
calling the same :func:`fedtiny.federated.client.run_jobs`. Flower's figure is the wall
time of one training round as the ServerApp sees it (send to last reply, plus aggregation
and global evaluation); round 1 is a warm-up in which every Ray worker loads its data, so
round 2 is the one timed. Ray's start-up is reported apart.
"""

from __future__ import annotations

import argparse
import copy
import math
import multiprocessing as mp
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from fedtiny.attack.surrogate import Surrogate
from fedtiny.budget.schemes import ResolvedScheme, apply_scheme, parse_scheme, resolve
from fedtiny.compress.codec import SparseTensor, SparseUpdate, decode, encode, quantize_values
from fedtiny.compress.dense import pack_dense
from fedtiny.compress.downlink import FULL
from fedtiny.data import ImageSet
from fedtiny.data.sources import load_source
from fedtiny.errors import ModelFileError, SchemeError
from fedtiny.federated.aggregate import ClientUpdate, GlobalModel, aggregate
from fedtiny.federated.client import ClientJob, local_round, run_jobs
from fedtiny.federated.sampling import sample_clients
from fedtiny.federated.task import client_profile, cloud_model, limit_threads, make_task, with_scheme
from fedtiny.federated.train import _batches, _exact_loss, evaluate, make_optimizer, pretrain, seeded
from fedtiny.int8 import exact, native
from fedtiny.int8.convert import fold, ptq
from fedtiny.int8.graph import replace_head
from fedtiny.int8.modelfile import read_model
from fedtiny.int8.optim import QuantizedOptimizer
from fedtiny.int8.prefix import STATE_PREFIX, PrefixStore, prefix_cache
from fedtiny.models import build_model, load_arrays
from fedtiny.progress import left, say
from fedtiny.report.runlog import read_metrics
from fedtiny.report.sweep import interval95
from fedtiny.scenario import load_scenario, parse_overrides, scenario_from_dict, scenario_from_json
from fedtiny.server_setup import resolve_scheme, server_task
from fedtiny.tools.models import model_and_scheme

__all__ = ["bench_sim", "BENCHES"]

DEFAULT_SCENARIO = "scenarios/quickstart.toml"
SIM_SCENARIO = "scenarios/scale.toml"


def _bare_worker(
    scenario_json: str, jobs: list[tuple[int, str]], payload: bytes, state_dir: str, ready, start, results
) -> None:
    """One bare process: warm up (data, model), wait for the start signal, run its clients' rounds."""
    scenario = scenario_from_json(scenario_json)
    todo = [ClientJob(pid, payload, "full", ResolvedScheme.from_json(text) if text else None) for pid, text in jobs]
    first_of_profile: dict[str, ClientJob] = {}  # warm up what Flower's round 1 warms up: each device's model
    for job in todo:
        first_of_profile.setdefault(client_profile(scenario, job.partition_id).name, job)
    warm = run_jobs(scenario, 1, list(first_of_profile.values()), state_dir + "-warm")
    ready.put(next((r for _, r in warm if isinstance(r, str)), ""))
    start.wait()
    out = run_jobs(scenario, 2, todo, state_dir)
    results.put([(pid, r if isinstance(r, str) else (r.update, r.num_examples)) for pid, r in out])


def _bare_round(scenario, pids: list[int], workers: int, state_dir: str) -> float:
    """Wall time of one round without Flower: ``workers`` processes run the clients (the cohorts Flower
    would get), then this process decodes and aggregates their updates and evaluates the global model,
    with the library functions the ServerApp uses."""
    task, initial, _, schemes = server_task(scenario)
    scheme_of = {p: schemes.for_client(client_profile(scenario, p).name, p, 2) if schemes else None for p in pids}
    views = {p: with_scheme(task, s) if s is not None else task for p, s in scheme_of.items()}
    payload = pack_dense(initial, task.downlink_spec)
    model = GlobalModel(initial, [n for n, *_ in task.uplink_spec])

    ctx = mp.get_context("spawn")
    ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    chunks = [pids[i::workers] for i in range(workers) if pids[i::workers]]
    procs = [
        ctx.Process(
            target=_bare_worker,
            args=(
                scenario.to_json(),
                [(p, scheme_of[p].to_json() if scheme_of[p] else "") for p in chunk],
                payload,
                state_dir,
                ready,
                start,
                results,
            ),
        )
        for chunk in chunks
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        problem = ready.get(timeout=600)
        if problem:
            raise RuntimeError(f"bare worker failed to warm up: {problem}")
    t0 = time.perf_counter()
    start.set()
    replies = sorted((item for _ in procs for item in results.get(timeout=3600)), key=lambda item: item[0])
    failed = [r for _, r in replies if isinstance(r, str)]
    if failed:
        raise RuntimeError(f"clients failed in the bare loop: {failed[0]}")
    updates = [ClientUpdate(pid, update, n) for pid, (update, n) in replies]
    result = aggregate(
        updates,
        lambda p, b: views[p].uplink.decode(b, initial),
        {n: tuple(sh) for n, sh, _ in task.uplink_spec},
        coverage=lambda p: views[p].slices,
    )
    model.apply_delta(result.arrays)
    load_arrays(task.model, model.state)
    evaluate(task.model, task.federation.test)
    wall = time.perf_counter() - t0
    for proc in procs:
        proc.join()
    return wall


def bench_sim(args: argparse.Namespace) -> dict[str, Any]:
    """Client-rounds per second through Flower against a bare loop, at equal parallelism.

    Flower: ``run.num_cpus`` Ray workers run round 2 of a 2-round simulation (round 1 is
    the warm-up in which each worker loads data and model), with cohorts of virtual clients
    (``run.cohort_size``; default: one cohort per worker); the figure is the round as the
    ServerApp sees it (downlink payloads, the clients, decoding, aggregation, the global
    evaluation, the checkpoint). Bare: as many processes, each warmed up, run the same
    clients through the same :func:`~fedtiny.federated.client.run_jobs` (states on disk
    included), then the same library functions decode, aggregate and evaluate.
    """
    # Flower and Ray: 1.4 s more to import (3 s on a busy 2-core machine), for sim and secagg only
    from fedtiny.tools.sim import simulate

    n = args.clients or 100
    base = load_scenario(args.scenario, parse_overrides(args.overrides))
    workers = base.run.num_cpus
    cohort = args.cohort_size or -(-n // workers)
    overrides = {
        **parse_overrides(args.overrides),
        "run.clients": max(base.run.clients, n),
        "run.clients_per_round": n,
        "run.rounds": 2,
        "run.name": "bench-sim",
        "run.cohort_size": cohort,
        "attack.enabled": False,
    }
    scenario = load_scenario(args.scenario, overrides)
    pids = sample_clients(scenario.run.seed, 2, scenario.run.clients, scenario.clients_per_round)
    with tempfile.TemporaryDirectory() as tmp:
        bare_s = _bare_round(scenario, pids, workers, str(Path(tmp) / "state"))
        say(f"bench sim: bare: {n} clients in {workers} processes, {bare_s:.2f} s")
        t0 = time.perf_counter()
        simulate(scenario, Path(tmp) / "run", verbose=args.verbose)
        total_s = time.perf_counter() - t0
        recs = read_metrics(Path(tmp) / "run")
    by_round = {r["round"]: r["elapsed_s"] for r in recs}
    flower_s = by_round[2] - by_round[1]
    say(f"bench sim: flower round: {n} clients in {flower_s:.2f} s (whole simulation {total_s:.1f} s)")
    result = {
        "clients_per_round": n,
        "cohort_size": cohort,
        "workers": workers,
        "bare_s": round(bare_s, 4),
        "flower_s": round(flower_s, 4),
        "ratio": round(flower_s / bare_s, 3),
        "client_rounds_per_s": round(n / flower_s, 2),
        "bare_client_rounds_per_s": round(n / bare_s, 2),
        "overhead_ms_per_client": round((flower_s - bare_s) / n * 1000, 3),
        "simulation_total_s": round(total_s, 2),
    }
    print(
        f"\nbench sim (N={n} clients per round, cohorts of {cohort}, {workers} Ray workers vs {workers} bare "
        f"processes)\n"
        f"  bare            {bare_s:8.2f} s  ({result['bare_client_rounds_per_s']:.1f} client-rounds/s)\n"
        f"  flower round    {flower_s:8.2f} s  ({result['client_rounds_per_s']:.1f} client-rounds/s)\n"
        f"  ratio           {result['ratio']:8.3f}  (flower / bare)\n"
        f"  overhead        {result['overhead_ms_per_client']:8.2f} ms per client (wall)\n"
        f"  whole simulation incl. Ray start-up and pretraining: {total_s:.1f} s"
    )
    return result


BENCHES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {"sim": bench_sim}


def _lr_trials(
    methods: dict[str, tuple[Callable[[], Any], str, float]],
    train,
    val,
    test,
    *,
    epochs: int,
    lr_points: int,
    batch_size: int,
    momentum: float,
    rounding: str,
    seed: int,
    label: str = "",
    max_widen: int = 4,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Fine-tune a fresh model per (method, learning rate); pick each method's rate on ``val``.

    ``methods`` maps a name to (model factory, optimizer name, centre of its learning-rate grid);
    the grid has ``lr_points`` rates 3x apart. A best rate at an edge of its grid says only that
    the best lies beyond it, so the grid grows by one rate (3x further) on that side until the
    best is inside, at most ``max_widen`` times per method (the best row then says
    ``at_edge``). Returns every trial and each method's best.
    """
    rows, best = [], {}
    planned, t_all = len(methods) * lr_points, time.perf_counter()
    for method, (make, opt_name, center) in methods.items():
        grid = [center * 3.0 ** (i - (lr_points - 1) / 2) for i in range(lr_points)]
        todo, mine = list(grid), []
        for widen in range(max_widen + 1):
            for lr in todo:
                row = _lr_trial(
                    make,
                    opt_name,
                    lr,
                    train,
                    val,
                    test,
                    epochs=epochs,
                    batch_size=batch_size,
                    momentum=momentum,
                    rounding=rounding,
                    seed=seed,
                )
                row["method"] = method
                rows.append(row)
                mine.append(row)
                pace = left(len(rows), max(planned, len(rows)), time.perf_counter() - t_all)
                say(
                    f"bench qas{label}: trial {len(rows)}/{max(planned, len(rows))} {method:9s} lr {lr:10.4g}  "
                    f"val {row['val_accuracy']:.4f}  test {row['test_accuracy']:.4f}  {row['step_ms']:.2f} ms/step"
                    + (f" | {pace}" if pace else "")
                )
            # ties go to the smaller rate: the grid is walked in increasing order
            top = max(sorted(mine, key=lambda r: r["lr"]), key=lambda r: r["val_accuracy"])
            lrs = sorted(r["lr"] for r in mine)
            edge = "low" if top["lr"] == lrs[0] else "high" if top["lr"] == lrs[-1] else ""
            if not edge or len(lrs) < 2 or widen == max_widen:
                break
            todo = [lrs[0] / 3.0] if edge == "low" else [lrs[-1] * 3.0]
            planned += 1
        best[method] = {**top, "grid": sorted(r["lr"] for r in mine), "at_edge": bool(edge)}
    return rows, best


def _lr_trial(
    make: Callable[[], Any],
    opt_name: str,
    lr: float,
    train,
    val,
    test,
    *,
    epochs: int,
    batch_size: int,
    momentum: float,
    rounding: str,
    seed: int,
) -> dict[str, Any]:
    """One fine-tuning of a fresh model at rate ``lr``: its validation and test accuracy and ms per step."""
    loss_fn = torch.nn.CrossEntropyLoss()
    model = make()
    opt = make_optimizer(model, opt_name, lr, momentum, rounding=rounding, gen=seeded(seed, 99))
    gen, steps, t_steps = seeded(seed, 7), 0, 0.0
    for _ in range(epochs):
        model.train(False)
        for xb, yb in _batches(train, batch_size, gen):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            t_steps += time.perf_counter() - t0
            steps += 1
    return {
        "lr": lr,
        "val_accuracy": evaluate(model, val)[1],
        "test_accuracy": evaluate(model, test)[1],
        "step_ms": 1000 * t_steps / max(steps, 1),
        "seed": seed,
    }


def _pooled_clients(fed, clients: int):
    """Every client's training split joined, and every client's held-out split joined."""
    splits = [fed.client_data(i) for i in range(clients)]
    join = lambda parts: ImageSet(
        np.concatenate([p.x for p in parts]),
        np.concatenate([p.y for p in parts]),  # noqa: E731
        fed.num_classes,
        "pool",
    )
    return join([a for a, _ in splits]), join([b for _, b in splits])


def bench_qas(args: argparse.Namespace) -> dict[str, Any]:
    """fp32 SGD vs int8 SGD vs int8 SGD+QAS fine-tuning of the same cloud model on the same transfer task.

    The task: the quickstart's cloud model (pretrained on clean digits) adapted to
    the fleet's shifted sensors, trained centrally on every client's training split,
    the learning rate picked on the clients' held-out splits, scored on the server's
    global test set. Each method gets the same budget: ``--lr-points`` learning rates
    spaced by 3x around its natural scale (``--lr-center`` for fp32 and QAS; for plain int8
    SGD, lr_center / median(s_w)^2, the best single rescaling without QAS).
    With ``--model``, a published model file on a transfer task at its resolution instead
    (:func:`bench_qas_model`).
    """
    if args.model_file:
        return bench_qas_model(args)

    limit_threads()
    s = load_scenario(args.scenario, parse_overrides(args.overrides))
    fed = make_task(s).federation
    fp32 = build_model(
        s.model.name,
        fed.image_shape[0],
        fed.num_classes,
        width=s.model.width,
        image_size=fed.image_shape[1],
        seed=s.run.seed,
    )
    pretrain(
        fp32,
        fed.public,
        epochs=s.model.pretrain_epochs,
        lr=s.model.pretrain_lr,
        batch_size=s.model.pretrain_batch_size,
        seed=s.run.seed,
    )
    train, val = _pooled_clients(fed, s.run.clients)
    calib = fed.public.x[: s.model.calibration_samples]
    q0 = ptq(fp32, calib, classifier_precision=s.model.classifier_precision)
    w_scales = torch.cat([c.w_scales for c in q0.modules() if hasattr(c, "w_scales")])
    center = args.lr_center or 0.003
    int8_center = center / float(w_scales.median()) ** 2
    methods = {
        "fp32": (lambda: fold(fp32), "sgd", center),
        "int8_sgd": (lambda: ptq(fp32, calib, classifier_precision=s.model.classifier_precision), "sgd", int8_center),
        "int8_qas": (lambda: ptq(fp32, calib, classifier_precision=s.model.classifier_precision), "sgd+qas", center),
    }
    k = args.lr_points
    rows, best = _lr_trials(
        methods,
        train,
        val,
        fed.test,
        epochs=args.epochs,
        lr_points=k,
        batch_size=s.train.batch_size,
        momentum=s.train.momentum,
        rounding=s.train.weight_rounding,
        seed=s.run.seed,
    )
    step = {m: np.mean([r["step_ms"] for r in rows if r["method"] == m]) for m in methods}
    result = {
        "fp32_accuracy": best["fp32"]["test_accuracy"],
        "int8_sgd_accuracy": best["int8_sgd"]["test_accuracy"],
        "int8_qas_accuracy": best["int8_qas"]["test_accuracy"],
        "int8_step_time_ratio": round(float(step["int8_qas"] / step["fp32"]), 3),
        "cloud_fp32_accuracy": evaluate(fp32, fed.test)[1],
        "cloud_ptq_accuracy": evaluate(q0, fed.test)[1],
        "best_lr": {m: best[m]["lr"] for m in methods},
        "epochs": args.epochs,
        "lr_points": k,
        "trials": rows,
    }
    print(
        f"\nbench qas: {args.epochs} epochs, {k} learning rates each, lr picked on client validation splits\n"
        f"  {'method':<10} {'best lr':>10} {'val acc':>8} {'test acc':>8} {'ms/step':>8}"
    )
    for m in methods:
        b = best[m]
        print(f"  {m:<10} {b['lr']:>10.4g} {b['val_accuracy']:>8.4f} {b['test_accuracy']:>8.4f} {step[m]:>8.2f}")
    print(
        f"  cloud model before fine-tuning: fp32 {result['cloud_fp32_accuracy']:.4f}, "
        f"int8 PTQ {result['cloud_ptq_accuracy']:.4f}; int8/fp32 step time {result['int8_step_time_ratio']:.2f}x"
    )
    return result


def bench_qas_model(args: argparse.Namespace) -> dict[str, Any]:
    """The QAS comparison on a model file (a published int8 model) on a transfer task at its resolution.

    The task is the scenario's (``scenarios/mcunet-256kb.toml`` unless ``--scenario`` names
    another): the server fits the new head (the cloud step), then the scheme's tensors
    (``--scheme``) are fine-tuned centrally on the clients' training splits three ways: the
    float twin of the int8 network with fp32 SGD, int8 SGD, int8 SGD+QAS; the learning rate
    is picked on the clients' held-out splits, the global test set scores. Repeated for
    ``--seeds`` seeds (split, head, batches); the spread is the min-max over seeds.
    """
    limit_threads()
    path, scheme = model_and_scheme(args.model_file, args.scheme)
    scenario = args.scenario if args.scenario != DEFAULT_SCENARIO else "scenarios/mcunet-256kb.toml"
    over = {**parse_overrides(args.overrides), "model.file": str(path.resolve()), "train.scheme": scheme}
    per_seed = []
    for seed in range(args.seeds):
        s = _one_method(scenario, {**over, "run.seed": seed})
        task = make_task(s)
        state, cloud = cloud_model(task)
        task = resolve_scheme(task, state)
        load_arrays(task.model, state)
        q0 = task.model
        trained = {n for n, p in q0.named_parameters() if p.requires_grad}

        def twin():
            model = Surrogate(q0)
            for n, p in model.named_parameters():
                p.requires_grad_(n in trained)
            return model

        w_scales = torch.cat([c.w_scales for c in q0.modules() if hasattr(c, "w_scales")])
        center = args.lr_center or 1e-4
        methods = {
            "fp32": (twin, "sgd", center),
            "int8_sgd": (lambda: copy.deepcopy(q0), "sgd", center / float(w_scales.median()) ** 2),
            "int8_qas": (lambda: copy.deepcopy(q0), "sgd+qas", center),
        }
        train, val = _pooled_clients(task.federation, s.run.clients)
        _, best = _lr_trials(
            methods,
            train,
            val,
            task.federation.test,
            epochs=args.epochs,
            lr_points=args.lr_points,
            batch_size=s.train.batch_size,
            momentum=s.train.momentum,
            rounding=s.train.weight_rounding,
            seed=seed,
            label=f" seed {seed}",
        )
        per_seed.append(
            {
                "seed": seed,
                "cloud_ptq_accuracy": cloud.ptq_accuracy,
                **{f"{m}_accuracy": best[m]["test_accuracy"] for m in methods},
                "best_lr": {m: best[m]["lr"] for m in methods},
                "lr_grid": {m: best[m]["grid"] for m in methods},
                "best_lr_at_edge": sorted(m for m in methods if best[m]["at_edge"]),
            }
        )
    result: dict[str, Any] = {
        "model": path.stem,
        "scheme": scheme.rpartition("#")[2] or scheme,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "lr_points": args.lr_points,
        "per_seed": per_seed,
    }
    result.update(
        _seed_statistics(
            per_seed,
            ("cloud_ptq", "fp32", "int8_sgd", "int8_qas"),
            (("int8_qas", "int8_sgd"), ("int8_qas", "fp32"), ("int8_sgd", "fp32")),
        )
    )
    print(
        f"\nbench qas: {path.stem}, scheme {result['scheme']}, {args.seeds} seeds, {args.epochs} epochs, "
        f"from {args.lr_points} learning rates each, widened while the best sat at an edge "
        "(picked on client validation splits)"
    )
    print(_seed_table(result))
    edges = [f"seed {r['seed']}: {', '.join(r['best_lr_at_edge'])}" for r in per_seed if r["best_lr_at_edge"]]
    if edges:
        print("  best rate still at a grid edge after widening: " + "; ".join(edges))
    return result


def _seed_statistics(
    per_seed: list[dict[str, Any]], names: tuple[str, ...], pairs: tuple[tuple[str, str], ...]
) -> dict[str, Any]:
    """Mean, spread and 95% interval over seeds of each ``{name}_accuracy``, and of each paired difference."""
    out: dict[str, Any] = {}
    for n in names:
        vals = np.array([r[f"{n}_accuracy"] for r in per_seed])
        out[f"{n}_accuracy_mean"] = round(float(vals.mean()), 4)
        out[f"{n}_accuracy_spread"] = round(float(vals.max() - vals.min()), 4)
        out[f"{n}_accuracy_ci95"] = [round(v, 4) for v in interval95(vals)]
    out["paired"] = {}
    for a, b in pairs:
        diff = np.array([r[f"{a}_accuracy"] - r[f"{b}_accuracy"] for r in per_seed])
        lo, hi = interval95(diff)
        out["paired"][f"{a} - {b}"] = {
            "mean": round(float(diff.mean()), 4),
            "ci95": [round(lo, 4), round(hi, 4)],
            "verdict": "no difference" if lo <= 0 <= hi or len(diff) < 2 else ("higher" if lo > 0 else "lower"),
        }
    return out


def _seed_table(result: dict[str, Any]) -> str:
    """Markdown: each method's accuracy (mean, 95% interval) and the paired differences, from :func:`_seed_statistics`."""
    names = [k[: -len("_accuracy_mean")] for k in result if k.endswith("_accuracy_mean")]
    lines = ["| method | test accuracy (mean) | 95% interval | spread |", "| --- | --- | --- | --- |"]
    for n in names:
        lo, hi = result[f"{n}_accuracy_ci95"]
        lines.append(
            f"| {n} | {result[f'{n}_accuracy_mean']:.4f} | {lo:.4f} to {hi:.4f} | "
            f"{result[f'{n}_accuracy_spread']:.4f} |"
        )
    lines += ["", "| difference (paired by seed) | mean | 95% interval | verdict |", "| --- | --- | --- | --- |"]
    for pair, d in result["paired"].items():
        lines.append(f"| {pair} | {d['mean']:+.4f} | {d['ci95'][0]:+.4f} to {d['ci95'][1]:+.4f} | {d['verdict']} |")
    return "\n".join(lines)


BENCHES["qas"] = bench_qas


def _one_method(path: str, overrides: dict[str, Any]):
    """The scenario of ``path`` with ``overrides`` and without its ``[methods]`` (a bench trains one model
    with one scheme; the file's methods may name schemes of another model)."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return load_scenario(path, overrides)  # its own one-line error
    raw.pop("methods", None)
    return scenario_from_dict(raw, overrides, where=str(path), base_dir=Path(path).parent)


def bench_train(args: argparse.Namespace) -> dict[str, Any]:
    """Samples per second of the client's int8 training step against a float step of the same network.

    The int8 step is the clients' code path (the int8 graph, QAS, integer projection).
    The baseline is the int8 network's float twin (:class:`fedtiny.attack.surrogate.Surrogate`:
    the same layers with dequantized weights and biases, the int8 ranges as clamps) trained
    with torch SGD on the same tensors (the scheme's). Both run here, on one thread as a
    simulated client does, on the same real images (lfw-faces at the model's input size).
    """
    limit_threads()
    path, scheme_text = model_and_scheme(args.model_file or "mcunet-5fps", args.scheme)
    try:
        q = read_model(path)
    except ModelFileError as exc:
        raise ModelFileError(f"--model: {exc}") from None
    c, h, _ = q.input_shape or (3, 128, 128)
    data = load_source("lfw-faces", image_size=h, channels=c)
    q = replace_head(q, data.num_classes)
    resolved = resolve(parse_scheme(scheme_text), q)
    apply_scheme(q, resolved)
    twin = Surrogate(q)
    trained = {n for n, p in q.named_parameters() if p.requires_grad}
    for n, p in twin.named_parameters():
        p.requires_grad_(n in trained)
    b = args.batch_size
    batches = [
        (torch.from_numpy(data.x[i : i + b]), torch.from_numpy(data.y[i : i + b]))
        for i in range(0, len(data) - b + 1, b)
    ][: args.steps]
    int8_opt = QuantizedOptimizer(q, "sgd+qas", 1e-4, gen=torch.Generator().manual_seed(0))
    float_opt = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=1e-4)
    int8_loss = _exact_loss(q)
    q.number_convs()

    def timed(model, opt, loss_fn, key=None) -> float:
        model.train()
        for i, (xb, yb) in enumerate(batches[:2] + batches):  # two warm-up steps
            if i == 2:
                t0 = time.perf_counter()
            opt.zero_grad()
            with exact.step(None if key is None else exact.StepKey(key, i)):
                loss_fn(model(xb), yb).backward()
                opt.step()
        return len(batches) * b / (time.perf_counter() - t0)

    # Alternate the two, best of --repeat, so that a busy moment does not favour either.
    # The int8 step is the clients' default, the exact step (train.gradients = exact).
    int8_sps, float_sps = 0.0, 0.0
    for r in range(args.repeat):
        int8_sps = max(int8_sps, timed(q, int8_opt, int8_loss, key=r))
        float_sps = max(float_sps, timed(twin, float_opt, F.cross_entropy))
    result = {
        "model": path.stem,
        "scheme": resolved.name,
        "batch_size": b,
        "input": [c, h, h],
        "steps": len(batches),
        "int8_samples_per_s": round(int8_sps, 2),
        "float_samples_per_s": round(float_sps, 2),
        "int8_vs_float_time_ratio": round(float_sps / int8_sps, 3),
        "host_kernels": native.available(),
    }
    kernels = (
        "host kernels (device/c)"
        if result["host_kernels"]
        else f"PyTorch kernels ({native.library_path().name} not built: make install)"
    )
    print(
        f"bench train: {path.stem} scheme {resolved.name}, batch {b} at {c}x{h}x{h}, one thread, {kernels}\n"
        f"  int8 step (exact, QAS) {int8_sps:8.2f} samples/s\n  float step             {float_sps:8.2f} samples/s\n"
        f"  int8 step takes {result['int8_vs_float_time_ratio']:.2f}x the float step's time"
    )
    return result


BENCHES["train"] = bench_train


def bench_round(args: argparse.Namespace) -> dict[str, Any]:
    """One client round of the scenario's size on the reference path and on the fast path, in this process.

    The round is :func:`~fedtiny.federated.client.local_round` of client 0 in round 2 (after a round 1
    that leaves its state: the model it holds and, on the fast path, its frozen prefix): downlink,
    memory check, the exact int8 step, the evaluation on its held-out split, the encoded update. The
    reference path runs every op of the graph; the fast path reuses the frozen prefix
    (:mod:`fedtiny.int8.prefix`). The two are alternated, best of ``--repeat``; ``identical`` says
    whether both rounds' update bytes are equal.
    """
    limit_threads()
    over = parse_overrides(args.overrides)
    model = args.model_file or "mcunet-5fps"
    if model == "tiny-ir":  # the built-in network: the quickstart's task
        scenario_path = args.scenario if args.scenario != DEFAULT_SCENARIO else DEFAULT_SCENARIO
        over = {**over, "model.name": "tiny-ir", "train.scheme": args.scheme}
        label = "tiny-ir"
    else:
        path, scheme = model_and_scheme(model, args.scheme)
        scenario_path = args.scenario if args.scenario != DEFAULT_SCENARIO else "scenarios/mcunet-256kb.toml"
        over = {**over, "model.file": str(path.resolve()), "train.scheme": scheme}
        label = path.stem
    s = _one_method(scenario_path, over)
    say(f"bench round: {label}, scheme {args.scheme}: cloud step and scheme (once)")
    task, initial, _, schemes = server_task(s, progress=None)
    s = task.scenario  # the learning rate filled in, as the server sends it
    profile = client_profile(s, 0)
    scheme = schemes.for_client(profile.name, 0, 2) if schemes is not None else None
    payload = pack_dense(initial, task.downlink_spec)

    def round_of(fast: bool, state: dict, server_round: int):
        with prefix_cache(fast):
            t0 = time.perf_counter()
            result, new_state = local_round(
                s, 0, server_round, payload, kind=FULL, scheme=scheme, state=state, profile=profile
            )
            return time.perf_counter() - t0, result, new_state

    _, first_ref, state_ref = round_of(False, {}, 1)
    _, first_fast, state_fast = round_of(True, {}, 1)
    if first_ref.refusal:
        raise SchemeError(f"bench round: client 0 refuses the scheme: {first_ref.refusal}")
    times = {"reference": [], "fast": []}
    updates = {}
    for r in range(args.repeat):
        for name, fast, state in (("reference", False, state_ref), ("fast", True, state_fast)):
            dt, result, _ = round_of(fast, state, 2)
            times[name].append(dt)
            updates[name] = result.update
        say(
            f"bench round: repeat {r + 1}/{args.repeat}: reference {times['reference'][-1]:.3f} s, "
            f"fast {times['fast'][-1]:.3f} s"
        )
    held = PrefixStore.from_state(state_fast).items
    graph = task.model
    start = held[0].start if held else 0
    ref_s, fast_s = min(times["reference"]), min(times["fast"])
    result = {
        "model": label,
        "scheme": scheme.summary() if scheme else args.scheme,
        "samples": first_ref.num_examples,
        "batch_size": s.train.batch_size,
        "reference_s": round(ref_s, 4),
        "fast_s": round(fast_s, 4),
        "speedup": round(ref_s / fast_s, 3),
        "repeats": args.repeat,
        "identical": updates["reference"] == updates["fast"] and first_ref.update == first_fast.update,
        "update_bytes": len(updates["fast"]),
        "prefix_start_op": start,
        "ops": len(graph.nodes) if hasattr(graph, "nodes") else 0,
        "prefix_boundary": list(held[0].tensors) if held else [],
        "prefix_state_bytes": int(
            sum(np.asarray(v).nbytes for k, v in state_fast.items() if k.startswith(STATE_PREFIX))
        ),
    }
    print(
        f"bench round: {label} scheme {result['scheme']}, client 0 round 2 ({result['samples']} samples, batch "
        f"{result['batch_size']}, one thread), best of {args.repeat}\n"
        f"  reference path (every op)       {ref_s:8.3f} s\n"
        f"  fast path (from op {start} of {result['ops']}) {fast_s:8.3f} s   cached prefix "
        f"{result['prefix_state_bytes']:,} B in the client's state\n"
        f"  speedup {result['speedup']:.2f}x, update bytes identical: {result['identical']}"
    )
    return result


BENCHES["round"] = bench_round


def bench_codec(args: argparse.Namespace) -> dict[str, Any]:
    """Bits per nonzero position of fedtiny's wire format against the entropy floor log2(C(d,k))/k.

    For each density, random positions (uniform, seeded) in a tensor of ``--numel``
    elements with int8 values; the position bits are the encoded size minus the
    value bytes and the fixed header, so they include the coder's own framing.
    Encode/decode speeds are MB of encoded output per second, measured in this process.
    """
    rng = np.random.default_rng(0)
    d = args.numel
    rows = []
    for density in (1e-1, 1e-2, 1e-3):
        k = max(1, int(round(d * density)))
        idx = np.sort(rng.choice(d, k, replace=False))
        values, scale = quantize_values(rng.normal(size=k), "int8")
        update = SparseUpdate([SparseTensor(0, (d,), idx, values, "int8", scale)])
        empty = len(encode(SparseUpdate([SparseTensor(0, (d,), idx[:0], values[:0], "int8", scale)])))
        reps = max(1, int(args.repeat))
        t0 = time.perf_counter()
        for _ in range(reps):
            data = encode(update)
        t_enc = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            back = decode(data)
        t_dec = (time.perf_counter() - t0) / reps
        assert np.array_equal(back.tensors[0].indices, idx)
        pos_bits = (len(data) - empty - k) * 8 / k  # header of an empty tensor and 1 byte per int8 value excluded
        floor = (math.lgamma(d + 1) - math.lgamma(k + 1) - math.lgamma(d - k + 1)) / math.log(2) / k
        row = {
            "density": density,
            "nnz": k,
            "bytes": len(data),
            "bits_per_position": round(pos_bits, 4),
            "entropy_floor_bits": round(floor, 4),
            "overhead": round(pos_bits / floor - 1, 4),
            "encode_mb_s": round(len(data) / t_enc / 1e6, 2),
            "decode_mb_s": round(len(data) / t_dec / 1e6, 2),
        }
        rows.append(row)
        say(
            f"bench codec: density {density:g}: {pos_bits:.3f} bits/position vs floor {floor:.3f} "
            f"({100 * row['overhead']:+.1f}%)"
        )
    print(
        f"\nbench codec ({d:,} elements, int8 values)\n"
        f"  {'density':>8} {'nnz':>8} {'bits/pos':>9} {'floor':>7} {'over':>7} {'enc MB/s':>9} {'dec MB/s':>9}"
    )
    for r in rows:
        print(
            f"  {r['density']:>8g} {r['nnz']:>8} {r['bits_per_position']:>9.3f} {r['entropy_floor_bits']:>7.3f} "
            f"{100 * r['overhead']:>6.1f}% {r['encode_mb_s']:>9.2f} {r['decode_mb_s']:>9.2f}"
        )
    return {"numel": d, "rows": rows}


BENCHES["codec"] = bench_codec


def bench_secagg(args: argparse.Namespace) -> dict[str, Any]:
    """What Flower's SecAgg+ costs on fedtiny's dense int8 changes: bytes and client seconds, against no SecAgg.

    The scenario's clients (``--clients``) each run fedtiny's own round 1 with the dense uplink
    (every trained element, int8, fixed positions: what SecAgg+ can sum); their decoded integer
    changes are then sent through one legacy Flower round with SecAgg+ and through the same round
    without it, in this process, at the same parallelism. Reports per-client serialized bytes up
    and down, ClientApp seconds, the round's wall time, their ratios, and the largest difference
    between the two rounds' means (SecAgg+ quantizes within ``clipping_range``).
    """
    # Flower and Ray: 1.4 s more to import (3 s on a busy 2-core machine), for sim and secagg only
    from fedtiny.tools.sim import simulate_secagg

    n = args.clients or 10
    scenario = load_scenario(
        args.scenario,
        {
            **parse_overrides(args.overrides),
            "compression.uplink": "dense",
            "run.clients": n,
            "run.clients_per_round": 0,
        },
    )
    task, initial, _, schemes = server_task(scenario, progress=None)
    payload = pack_dense(initial, task.downlink_spec)
    changes, fedtiny_bytes = [], []
    for pid in range(n):
        scheme = schemes.for_client(client_profile(scenario, pid).name, pid, 1) if schemes else None
        result, _ = local_round(scenario, pid, 1, payload, scheme=scheme)
        view = with_scheme(task, scheme) if scheme is not None else task
        decoded = view.uplink.decode(result.update, initial)
        changes.append([np.zeros(int(np.prod(sh)), np.float32) for _, sh, _ in task.uplink_spec])
        for i, (name, _, _) in enumerate(task.uplink_spec):
            if name in decoded:
                idx, values = decoded[name]
                changes[-1][i][idx] = values
        fedtiny_bytes.append(len(result.update))
    largest = max(float(np.abs(a).max()) for c in changes for a in c)
    # SecAgg+ clips to [-C, C] and quantizes to 2^22 levels: C must hold every change (int32 biases move by
    # thousands of units), and a power of two keeps the levels' spacing exact in binary.
    clip = float(2 ** math.ceil(math.log2(largest + 1)))
    say(
        f"bench secagg: {n} clients' dense int8 changes ({sum(a.size for a in changes[0]):,} elements, "
        f"largest |change| {largest:g}: clipping range {clip:g})"
    )
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for secagg in (False, True):
            label = "secagg+" if secagg else "plain"
            say(f"bench secagg: {label} round ...")
            runs[label] = simulate_secagg(
                changes, Path(tmp), secagg=secagg, num_cpus=scenario.run.num_cpus, clipping_range=clip
            )
    plain, sa = runs["plain"], runs["secagg+"]
    true_mean = np.mean([np.concatenate(c) for c in changes], axis=0)
    result = {
        "clients": n,
        "elements": int(true_mean.size),
        "fedtiny_dense_uplink_bytes": int(np.mean(fedtiny_bytes)),
        "clipping_range": clip,
        "quantization_step": 2 * clip / 2**22,
        **{
            f"{k}_{label}": v
            for label, r in runs.items()
            for k, v in (
                ("uplink_bytes_per_client", int(np.mean(r["up"]))),
                ("downlink_bytes_per_client", int(np.mean(r["down"]))),
                ("client_seconds", round(float(np.mean(r["client_seconds"])), 4)),
                ("round_seconds", round(r["seconds"], 3)),
                ("exchanges", r["exchanges"]),
            )
        },
        "max_abs_error_secagg": float(np.abs(np.concatenate(sa["mean"]) - true_mean).max()),
        "max_abs_error_plain": float(np.abs(np.concatenate(plain["mean"]) - true_mean).max()),
    }
    for key in ("uplink_bytes_per_client", "downlink_bytes_per_client", "client_seconds", "round_seconds"):
        result[f"{key}_ratio"] = round(result[f"{key}_secagg+"] / max(result[f"{key}_plain"], 1e-12), 3)
    print(
        f"\nbench secagg ({n} clients, {true_mean.size:,} elements; fedtiny's own dense int8 upload: "
        f"{result['fedtiny_dense_uplink_bytes']:,} B)\n"
        f"  {'':28} {'plain':>12} {'SecAgg+':>12} {'ratio':>7}"
    )
    for key, name in (
        ("uplink_bytes_per_client", "uplink bytes per client"),
        ("downlink_bytes_per_client", "downlink bytes per client"),
        ("client_seconds", "client seconds"),
        ("round_seconds", "round seconds"),
    ):
        print(
            f"  {name:28} {result[key + '_plain']:>12,} {result[key + '_secagg+']:>12,} {result[key + '_ratio']:>7.2f}"
        )
    print(
        f"  largest error of the mean: plain {result['max_abs_error_plain']:.2e}, "
        f"SecAgg+ {result['max_abs_error_secagg']:.2e} (stored units; quantization step "
        f"{result['quantization_step']:.2e})"
    )
    return result


BENCHES["secagg"] = bench_secagg


def bench_peers(args: argparse.Namespace) -> dict[str, Any]:
    """fedtiny against Flower's plain simulation and pfl-research (:mod:`fedtiny.tools.bench_peers`)."""
    # deferred: the peers bench (and what it imports) loads only for ``bench peers``
    from fedtiny.tools.bench_peers import bench_peers as run

    return run(args)


BENCHES["peers"] = bench_peers
