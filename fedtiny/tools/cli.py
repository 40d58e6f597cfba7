"""``fedtiny`` command line: run scenarios, benchmarks and tools.

Every user error (a :class:`fedtiny.errors.FedtinyError`: bad scenario, missing data, bad model file) is one
line on stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from fedtiny.errors import FedtinyError, ModelFileError, ScenarioError
from fedtiny.int8.optimizers import optimizer_names
from fedtiny.scenario import load_scenario, parse_overrides
from fedtiny.progress import say

__all__ = ["main"]

EXIT_USAGE = 2


def _add_scenario_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario key, e.g. --set train.lr=0.01 (repeatable)")


def _table(rows: list[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = []
    for k, v in rows:
        if isinstance(v, float):
            v = f"{v:.4f}"
        elif isinstance(v, int) and not isinstance(v, bool) and v >= 10_000:
            v = f"{v:,}"
        lines.append(f"  {k:<{width}}  {v}")
    return "\n".join(lines)


def _summary_table(name: str, summary: dict[str, Any]) -> str:
    up32, up8 = summary.get("uplink_ratio_vs_dense_fp32"), summary.get("uplink_ratio_vs_dense_int8")
    return f"\nfedtiny run: {name}\n" + _table([
        ("clients (per round)", f"{summary['num_clients']} ({summary['clients_per_round']})"),
        ("rounds", summary["rounds"]),
        ("accuracy: pretrained", summary["initial_accuracy"]),
        ("accuracy: final", summary["final_accuracy"]),
        ("accuracy: best", summary["best_accuracy"]),
        ("uplink bytes (total)", summary["uplink_bytes_total"]),
        ("downlink bytes (total)", summary["downlink_bytes_total"]),
        ("uplink vs dense fp32 / int8", f"{up32:.1f}x / {up8:.1f}x smaller" if up32 and up8
         else "nothing sent"),
        ("rejected updates", summary["rejected_updates_total"]),
        ("refused (memory)", summary.get("refused_clients_total", 0)),
        ("peak SRAM of a step (max)", summary.get("peak_sram_bytes_max", 0)),
        ("device RAM of a client's round (max)", summary.get("device_ram_bytes_max", 0)),
        ("wall time (s)", summary["wall_time_s"]),
        ("run folder", summary["run_dir"]),
    ])


def _run_or_resume(scenario, where: Path, *, verbose: bool, resume: bool) -> dict[str, Any]:
    """One simulation into ``where``; with ``resume``, a finished run is read back and a cut one goes on."""
    from fedtiny.federated.checkpoint import CHECKPOINT_DIR, CheckpointError, load_checkpoint
    from fedtiny.report.runlog import write_scenario
    from fedtiny.tools.sim import simulate

    if resume and (where / "summary.json").exists():
        say(f"{where}: finished before; kept")
        return json.loads((where / "summary.json").read_text())
    if resume and (where / CHECKPOINT_DIR).exists():
        ck = load_checkpoint(where)  # a damaged checkpoint stops here, before Ray starts
        if ck.scenario_json != scenario.to_json():
            raise CheckpointError(f"{where}: its checkpoint was written by another scenario than {where}/scenario.toml")
        return simulate(scenario, where, verbose=verbose, resume=True)
    if resume:
        say(f"{where}: no round completed before the stop; starting it over")
    where.mkdir(parents=True, exist_ok=True)
    write_scenario(scenario, where)
    return simulate(scenario, where, verbose=verbose)


def _resolve_run_args(args: argparse.Namespace):
    """The scenario and run folder of ``fedtiny run`` (a new run, or ``--resume RUN_DIR``)."""
    from fedtiny.report.runlog import new_run_dir

    if args.resume:
        run_dir = Path(args.resume)
        if args.scenario or args.overrides or args.seeds:
            raise ScenarioError(f"--resume {run_dir}: the run goes on with its own scenario.toml; "
                                "give no scenario, --set or --seeds")
        if not (run_dir / "scenario.toml").exists():
            raise ScenarioError(f"--resume {run_dir}: not a run folder (no scenario.toml)")
        return load_scenario(run_dir / "scenario.toml"), run_dir.resolve(), run_dir / "scenario.toml"
    if not args.scenario:
        raise ScenarioError("fedtiny run: give a scenario file, or --resume RUN_DIR")
    overrides = parse_overrides(args.overrides)
    if args.seeds:
        base = int(overrides.get("run.seed", load_scenario(args.scenario, overrides).run.seed))
        overrides["run.seeds"] = list(range(base, base + args.seeds))
    scenario = load_scenario(args.scenario, overrides)
    return scenario, new_run_dir(scenario, args.out), Path(args.scenario)


def cmd_run(args: argparse.Namespace) -> int:
    from fedtiny.federated.task import make_task
    from fedtiny.report.runlog import write_scenario

    scenario, run_dir, source = _resolve_run_args(args)
    resume = bool(args.resume)
    methods = scenario.expand()
    if args.method:
        known = [name for name, _ in methods]
        unknown = [m for m in args.method if m not in known]
        if unknown or not scenario.methods:
            raise ScenarioError(f"{source}: --method {', '.join(unknown or args.method)}: not a method of this "
                                f"scenario (methods: {', '.join(known) if scenario.methods else 'none'})")
        methods = [(name, sc) for name, sc in methods if name in args.method]
    from fedtiny.federated.layout import simulation_layout

    laid_out = [(name, *simulation_layout(sc)) for name, sc in methods]
    methods = [(name, sc) for name, sc, _ in laid_out]
    for note in dict.fromkeys(n for _, _, n in laid_out if n):
        print(f"[fedtiny] {note}", file=sys.stderr, flush=True)  # a choice made for the user: said even with --json
    for _, sc in methods:
        make_task(sc)  # fail fast, before Ray starts: missing data, impossible partitions, a bad model file
    if not resume:
        write_scenario(scenario, run_dir)
    say(f"scenario {source} -> {run_dir}" + (" (resuming)" if resume else ""))
    if not scenario.methods and not scenario.run.seeds:
        summary = _run_or_resume(methods[0][1], run_dir, verbose=args.verbose, resume=resume)
        print(_summary_table(scenario.run.name, summary))
        _report_if_asked(args, run_dir)
        if args.json:
            print(json.dumps(summary, sort_keys=True))
        return 0
    import time

    from fedtiny.report.html import sweep_tables
    from fedtiny.progress import left
    from fedtiny.report.sweep import combine_seeds

    summaries = {}
    total_runs, done, t_sweep = sum(len(sc.run.seeds or (sc.run.seed,)) for _, sc in methods), 0, time.monotonic()
    for name, sc in methods:
        sub = run_dir / name if scenario.methods else run_dir
        runs = []
        for seed in sc.run.seeds or (sc.run.seed,):
            seeded = dataclasses.replace(sc, run=dataclasses.replace(sc.run, seed=seed))
            where = sub / f"seed{seed}" if sc.run.seeds else sub
            pace = left(done, total_runs, time.monotonic() - t_sweep)
            say(f"method {name}" + (f", seed {seed}" if sc.run.seeds else "") + f" (run {done + 1}/{total_runs}"
                + (f", {pace}" if pace else "") + ")")
            runs.append(_run_or_resume(seeded, where, verbose=args.verbose, resume=resume))
            done += 1
            print(_summary_table(f"{name} (seed {seed})" if sc.run.seeds else name, runs[-1]))
        summaries[name] = combine_seeds(runs) if sc.run.seeds else runs[0]
    tables = sweep_tables(summaries, bool(scenario.methods))  # the same tables fedtiny report --table prints
    table = "\n\n".join(tables[k] for k in ("sweep", "paired") if k in tables)
    (run_dir / "table.md").write_text(table + "\n")
    print("\n" + table)
    from fedtiny.report.plots import plot_methods
    from fedtiny.report.runlog import read_metrics

    def seed_dirs(name: str, s: dict[str, Any]) -> list[Path]:
        base = run_dir / name if scenario.methods else run_dir
        return [base / f"seed{seed}" for seed in s["seeds"]] if "seeds" in s else [base]

    def seed_records(name: str, s: dict[str, Any]) -> list[list[dict[str, Any]]]:
        return [read_metrics(d) for d in seed_dirs(name, s)]

    if not scenario.methods:
        from fedtiny.report.plots import plot_seeds

        plot_seeds(seed_records(scenario.run.name, summaries[scenario.run.name]), run_dir / "accuracy_seeds.png",
                   title=f"{scenario.run.name}: {len(scenario.run.seeds)} seeds")
        (run_dir / "summary.json").write_text(json.dumps(summaries[scenario.run.name], indent=2, sort_keys=True) + "\n")
        _report_if_asked(args, run_dir)
        if args.json:
            print(json.dumps(summaries[scenario.run.name], sort_keys=True))
        return 0
    plot_methods({name: seed_records(name, s) for name, s in summaries.items()}, run_dir / "accuracy_vs_uplink.png")
    (run_dir / "summary.json").write_text(json.dumps(summaries, indent=2, sort_keys=True) + "\n")
    if "privacy" in tables:
        from fedtiny.report.plots import (PRIVACY_PLOTS, plot_attacks_vs_lsb, plot_privacy, privacy_groups,
                                          privacy_lsb_table, privacy_rounds_table)

        table = tables["privacy"]
        (run_dir / "privacy_table.md").write_text(table + "\n")
        for file, (x_key, xlabel, logx) in PRIVACY_PLOTS.items():
            plot_privacy(summaries, run_dir / file, x_key, xlabel, logx)
        # one report per seed, in the same seed order for every method (privacy_lsb_table pairs them by
        # position, so a seed without a report keeps its place as an empty one)
        reports = {name: [json.loads((d / "privacy.json").read_text()) if (d / "privacy.json").exists() else {}
                          for d in seed_dirs(name, s)] for name, s in summaries.items()}
        precisions = {n: s.get("precision", "") for n, s in summaries.items()}
        plot_attacks_vs_lsb(reports, precisions, run_dir / "psnr_vs_lsb.png")
        (run_dir / "privacy_lsb.md").write_text(privacy_lsb_table(reports, privacy_groups(summaries)) + "\n")
        if any(len({a["round"] for rep in runs for a in rep.get("attacks", [])}) > 1 for runs in reports.values()):
            accuracy = {name: [{r["round"]: r["global_accuracy"] for r in records if "global_accuracy" in r}
                               for records in seed_records(name, s)] for name, s in summaries.items()}
            (run_dir / "privacy_rounds.md").write_text(privacy_rounds_table(reports, accuracy) + "\n")
        print("\n" + table)
    _report_if_asked(args, run_dir)
    if args.json:
        print(json.dumps(summaries, sort_keys=True))
    return 0


def _report_if_asked(args: argparse.Namespace, run_dir: Path) -> None:
    """``fedtiny run --report``: the run's (or sweep's) report.html, its path on stderr (stdout keeps --json's line)."""
    if args.report:
        from fedtiny.report.html import write_report

        print(f"[fedtiny] report: {write_report(run_dir)}", file=sys.stderr, flush=True)  # asked for: not progress


def cmd_report(args: argparse.Namespace) -> int:
    """``fedtiny report PATH``: a run's or sweep's report.html; ``--table``: the sweep's tables from its runs."""
    from fedtiny.report.html import folder_kind, report_tables, write_report

    kind = folder_kind(args.path)  # a path that is neither stops here, named
    if args.table:
        tables, missing = report_tables(args.path)
        for d in missing:
            print(f"[fedtiny] left out {d}: no summary.json (unfinished)", file=sys.stderr)  # a warning, not progress
        print("\n\n".join(tables.values()))
        if args.json:
            print(json.dumps({"kind": kind, "path": str(Path(args.path).resolve()), "tables": tables,
                              "left_out": [str(d) for d in missing]}, sort_keys=True))
        return 0
    path = write_report(args.path)
    print(path)
    if args.json:
        print(json.dumps({"kind": kind, "report": str(path)}, sort_keys=True))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from fedtiny.tools.search import search_command

    result = search_command(args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fedtiny.tools import bench

    if not args.scenario:
        args.scenario = bench.SIM_SCENARIO if args.bench == "sim" else bench.DEFAULT_SCENARIO
    result = bench.BENCHES[args.bench](args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from fedtiny.int8.modelfile import save_qmodel
    from fedtiny.tools.models import open_model

    if args.zoo_command == "run":
        return _zoo_run(args)
    if args.zoo_command == "cloud":
        from fedtiny.tools.models import cloud_model_file

        result = cloud_model_file(load_scenario(args.scenario, parse_overrides(args.overrides)), args.out)
        print(json.dumps(result, sort_keys=True) if args.json else _table([(k, v) for k, v in result.items()]))
        return 0
    if args.zoo_command == "check":
        from fedtiny.tools.models import check_against_tflm

        result = check_against_tflm(args.file, args.inputs, args.seed)
        print(json.dumps(result, sort_keys=True) if args.json else _table([(k, v) for k, v in result.items()]))
        return 0 if result["output_elements_differing"] == 0 and result["tensor_elements_differing"] == 0 else 1
    model = open_model(args.file)
    info = model_info(model)
    if args.zoo_command == "import":
        save_qmodel(model, args.out)
        info["written"] = str(args.out)
    elif args.zoo_command == "export":
        from fedtiny.int8.tfl_convert import export_tflite

        export_tflite(model, args.out, description=f"fedtiny export of {args.file}")
        info["written"] = str(args.out)
    if args.json:
        print(json.dumps(info, sort_keys=True))
    else:
        print(_table([(k, v) for k, v in info.items()]))
    return 0


def _zoo_run(args: argparse.Namespace) -> int:
    """``fedtiny zoo run``: int8 inputs (leading batch, the model's own layout) -> its int8 output tensor."""
    from pathlib import Path

    import numpy as np
    import torch

    from fedtiny.tools.models import open_model

    nhwc = Path(args.file).suffix == ".tflite"
    try:
        x = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"--input {args.input}: not a readable .npy file ({exc})") from None
    model = open_model(args.file)
    want = tuple(model.input_shape)
    c, h, w = want
    shape = (h, w, c) if nhwc else want
    if h == w == 1 and x.ndim == 2:  # a [N, C] input (an FC model)
        shape = (c,)
    if x.dtype != np.int8 or tuple(x.shape[1:]) != shape:
        raise ModelFileError(f"--input {args.input}: expected int8 of shape [N, {', '.join(map(str, shape))}] "
                             f"({'NHWC' if nhwc else 'NCHW'}), got {x.dtype} {list(x.shape)}")
    t = torch.from_numpy(x.astype(np.float32)).reshape(len(x), *((h, w, c) if nhwc else want))
    if nhwc:
        t = t.permute(0, 3, 1, 2)
    y = model.int8_forward(t)
    last = model.op(model.nodes[-1].op)
    if tuple(y.shape[2:]) == (1, 1):
        y = y.flatten(1)  # [N, C]: a classifier's or an FC model's output
    elif nhwc:
        y = y.permute(0, 2, 3, 1)
    y = y.numpy().astype(np.int8)
    np.save(args.out, y, allow_pickle=False)
    if not args.quiet:
        print(f"wrote {args.out}: int8 {list(y.shape)} from {type(last).__name__} {model.nodes[-1].op}", file=sys.stderr)
    return 0


def _load_memory_model(spec: str, num_classes: int | None, classifier_precision: str):
    """A built-in model name, a fedtiny model file, or a tiny-training .pkl -> (QModel, input shape)."""
    from pathlib import Path

    from fedtiny.int8.graph import replace_head
    from fedtiny.int8.modelfile import read_model

    path = Path(spec)
    if spec == "tiny-ir":
        from fedtiny.int8.convert import ptq
        from fedtiny.models import build_model

        import numpy as np

        model = ptq(build_model("tiny-ir", 1, num_classes or 10, image_size=8), np.zeros((1, 1, 8, 8), np.float32),
                    classifier_precision=classifier_precision)
        return model, (1, 8, 8)
    if not path.is_file():
        raise ModelFileError(f"--model: {spec!r} is neither a built-in model (tiny-ir) nor a model file")
    model = read_model(path)
    if num_classes is not None or classifier_precision == "fp32":
        replace_head(model, num_classes or int(model.classifier.weight.shape[0]), precision=classifier_precision)
    return model, model.input_shape or (model.input_channels, 128, 128)


def cmd_memory(args: argparse.Namespace) -> int:
    from fedtiny.devices import get_profile
    from fedtiny.budget.memory import memory_report
    from fedtiny.budget.schemes import parse_scheme, resolve

    if args.scenario:
        return _memory_of_scenario(args)
    if not args.model:
        raise ScenarioError("fedtiny memory: give --model (with --scheme, --device ...) or --scenario FILE")

    model, shape = _load_memory_model(args.model, args.num_classes, args.classifier_precision)
    if args.input_size:
        shape = (shape[0], args.input_size, args.input_size)
    device = get_profile(args.device) if args.device else None
    report = memory_report(model, resolve(parse_scheme(args.scheme), model), shape, device=device,
                           accounting=args.accounting, optimizer=args.optimizer, momentum=args.momentum,
                           reorder=args.reorder, inplace_depthwise=args.inplace, fuse_frozen=args.fuse,
                           batch=args.batch_size, accumulate=args.accumulate)
    whole = _device_memory(args, model, shape, device)
    if args.plot:
        from fedtiny.report.plots import plot_memory

        plot_memory(report, args.plot)
    if args.json:
        print(json.dumps({**report.to_dict(), "device_ram_bytes": whole.device_ram_bytes,
                          "device_flash_bytes": whole.device_flash_bytes, "device_ram": whole.ram,
                          "device_flash": whole.flash, "device_fits": whole.fits, "device_reason": whole.reason()},
                         sort_keys=True))
    else:
        print(_table([("model", args.model), ("scheme", report.scheme), ("accounting", report.accounting),
                      ("input", "x".join(map(str, shape))), ("peak SRAM (bytes)", report.peak_sram_bytes),
                      ("peak at", report.peak_at), ("arena (all but persistent and input)", report.arena_bytes),
                      ("saved for backward", report.saved_for_backward_bytes),
                      ("persistent (params+optimizer)", report.persistent_bytes), ("flash (bytes)", report.flash_bytes),
                      *[(f"  {k}", v) for k, v in report.breakdown.items()], ("verdict (one step)", report.reason()),
                      ("device RAM of a round (bytes)", whole.device_ram_bytes),
                      *[(f"  {k}", v) for k, v in whole.ram.items()],
                      ("device flash (bytes)", whole.device_flash_bytes), ("verdict (whole device)", whole.reason())]))
    verdict = whole if args.fit == "device" else report
    if verdict.fits is False:
        print(f"fedtiny: {verdict.reason()}", file=sys.stderr)
        return 3
    return 0


def _memory_of_scenario(args: argparse.Namespace) -> int:
    """``fedtiny memory --scenario S``: each method's clients, one step and the whole device, and who refuses."""

    from fedtiny.federated.client import client_task
    from fedtiny.server_setup import server_task
    from fedtiny.federated.task import client_profile

    scenario = load_scenario(args.scenario, parse_overrides(args.overrides))
    rows, out = [], []
    for name, sc in scenario.expand():
        if args.method and name not in args.method:
            continue
        if scenario.methods:
            say(f"method {name}: the server's start (model, scheme per device)")
        task, _, _, schemes = server_task(sc, progress=None)
        if task.scenario.model.precision != "int8":
            out.append({"method": name, "precision": "fp32", "note": "an fp32 model is not counted"})
            continue
        per: dict[str, dict] = {}
        for pid in range(task.scenario.run.clients):
            profile = client_profile(task.scenario, pid)
            client = client_task(task.scenario, schemes.by_profile[profile.name])
            samples = len(client.federation.client_data(pid)[0])
            step, whole = client.memory(profile), client.device_memory(profile, samples)
            row = per.setdefault(profile.name, {
                "method": name, "profile": profile.name, "scheme": schemes.by_profile[profile.name].name,
                "clients": 0, "sram_bytes": profile.sram_bytes, "peak_sram_bytes": step.peak_sram_bytes,
                "device_ram_bytes": 0, "device_ram": whole.ram, "device_flash_bytes": whole.device_flash_bytes,
                "refused_by_step": 0, "refused_by_device": 0})
            row["clients"] += 1
            if whole.device_ram_bytes > row["device_ram_bytes"]:
                row["device_ram_bytes"], row["device_ram"] = whole.device_ram_bytes, whole.ram
            row["refused_by_step"] += not step.fits
            row["refused_by_device"] += not whole.fits
        for row in per.values():
            row["refused"] = row["refused_by_device" if task.scenario.device.fit == "device" else "refused_by_step"]
            out.append(row)
            rows.append((f"{row['method']} / {row['profile']}", f"{row['scheme']}: step {row['peak_sram_bytes']:,} B, "
                         f"device {row['device_ram_bytes']:,} B of {row['sram_bytes']:,} B; refused "
                         f"{row['refused_by_step']}/{row['clients']} by the step, {row['refused_by_device']}/"
                         f"{row['clients']} by the device"))
    if args.json:
        print(json.dumps({"scenario": str(args.scenario), "fit": scenario.device.fit, "methods": out}, sort_keys=True))
    else:
        print(_table(rows or [("scenario", "no method matched --method")]))
    return 0


def _device_memory(args: argparse.Namespace, model, shape, device):
    """The whole client's memory across a round (fedtiny.budget.device_memory) for ``fedtiny memory``; the
    model carries its scheme (memory_report applied it)."""
    from fedtiny.budget.device_memory import ClientLoad, client_memory, step_arena

    if args.fit == "device" and args.accounting != "planner":
        raise ScenarioError("--fit device counts the planner's step: use --accounting planner or --fit step")
    train_batch = args.train_batch or args.batch_size
    if train_batch < args.batch_size:
        raise ScenarioError(f"--train-batch {train_batch}: at least --batch-size ({args.batch_size})")
    load = ClientLoad(train_batch, args.batch_size, args.samples, math.prod(shape), args.uplink, args.density,
                      args.residual != "none", args.residual if args.residual != "none" else "float64")
    arena = step_arena(model, shape, load, optimizer=args.optimizer, momentum=args.momentum, reorder=args.reorder,
                       inplace_depthwise=args.inplace, fuse_frozen=args.fuse)
    return client_memory(model, arena, load, optimizer=args.optimizer, momentum=args.momentum, profile=device)


def _attack_malicious(args: argparse.Namespace) -> int:
    """``fedtiny attack --preset faces-malicious``: the trap through the client's own update path."""
    from fedtiny.attack.run import plot_grid, run_malicious
    from fedtiny.scenario import parse_overrides

    if args.defense != "none":
        raise ScenarioError("--defense: faces-malicious runs the client's real path; set its compression and "
                            "policies with --density, --values and --set device.policy_...=N")
    summary, targets, recon = run_malicious(args.targets, args.batch_size, local_steps=args.local_steps,
                                            density=args.density, values=args.values, precision=args.precision,
                                            seed=args.seed, overrides=parse_overrides(args.set or []),
                                            learned=args.learned, epochs=args.learned_epochs, rounds=args.rounds)
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "privacy.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        plot_grid(targets, recon, summary["psnr_db"], out / "reconstructions.png")
    learned = summary["learned_mean_psnr_db"]
    rows = [("preset", f"faces-malicious ({summary['precision']}, {summary['values']}, density {summary['density']})"),
            ("targets x batch, local steps, rounds", f"{summary['targets']} x {summary['batch_size']}, "
                                                     f"{summary['local_steps']}, {summary['rounds']}"),
            ("clients that refused", summary["refused"]),
            ("imprint PSNR mean (dB), blocks placed on the public prior", f"{summary['mean_psnr_db']:.2f}"),
            ("learned inverter PSNR mean (dB)", "not run" if learned is None else f"{learned:.2f}"),
            ("worst case per image: PSNR / SSIM mean", f"{summary['worst_case_mean_psnr_db']:.2f} / "
                                                      f"{summary['worst_case_mean_ssim']:.3f}"),
            ("PSNR of each target's flat mean (baseline)", f"{summary['mean_flat_psnr_db']:.2f}"),
            ("PSNR of the mean public face (the prior alone)", f"{summary['prior_psnr_db']:.2f}"),
            ("images at >= 25 dB / above their flat baseline", f"{summary['frac_psnr_25db']:.2f} / "
                                                                f"{summary['frac_above_flat']:.2f}"),
            ("bound: isolated blocks at true positions (dB)", f"{summary['oracle_mean_psnr_db']:.2f}"),
            ("blocks isolated / leaked within 4/255", f"{summary['isolated']:.3f} / {summary['leaked_blocks']:.3f}")]
    print(_table(rows))
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "targets_detail"}, sort_keys=True))
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    import time

    import torch

    from fedtiny.attack.run import plot_grid, run_attack

    torch.set_num_threads(args.threads)
    if args.preset == "faces-malicious":
        return _attack_malicious(args)
    summary, targets, recon = run_attack(args.preset, args.targets, args.defense, seed=args.seed,
                                         iterations=args.iterations)
    if args.compare_single and args.targets > 1:
        t0 = time.perf_counter()
        single, _, _ = run_attack(args.preset, 1, args.defense, seed=args.seed, iterations=args.iterations, log=None)
        summary["single_target_seconds"] = round(time.perf_counter() - t0, 2)
        summary["single_target_psnr_db"] = single["mean_psnr_db"]
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "privacy.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        plot_grid(targets, recon, summary["psnr_db"], out / "reconstructions.png")
    rows = [("preset / defense", f"{summary['preset']} / {summary['defense']}"), ("targets", summary["targets"]),
            ("PSNR mean / median / min (dB)", f"{summary['mean_psnr_db']:.2f} / {summary['median_psnr_db']:.2f} / "
                                              f"{summary['min_psnr_db']:.2f}"),
            ("PSNR of each target's flat mean (baseline)", f"{summary['flat_psnr_db']:.2f}"),
            ("images at >= 25 dB / above their flat baseline", f"{summary['frac_psnr_25db']:.2f} / "
                                                                f"{summary['frac_above_flat']:.2f}"),
            ("SSIM mean", summary["mean_ssim"]), ("label accuracy", summary["label_accuracy"]),
            ("seconds per target (batched)", summary["seconds_per_target"])]
    if "single_target_seconds" in summary:
        rows.append(("seconds for one target alone", summary["single_target_seconds"]))
    print(_table(rows))
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("psnr_db", "ssim", "flat_psnr_db_per_image")},
                         sort_keys=True))
    return 0


def cmd_device(args: argparse.Namespace) -> int:
    from fedtiny.devices import get_profile
    from fedtiny.int8 import cstep
    from fedtiny.tools.device_check import device_check

    get_profile(args.device)  # an unknown profile fails here, before any work
    if not 1 <= args.batch_size <= cstep.MAX_BATCH or args.steps < 1:
        raise ScenarioError(f"--batch-size must be 1..{cstep.MAX_BATCH} and --steps >= 1")
    if not cstep.available():
        print(f"fedtiny: {cstep.library_path()} is not built: run make install (needs a C compiler)", file=sys.stderr)
        return 2
    say = None if args.json else (lambda m: print(f"[device check] {m}", file=sys.stderr))
    result = device_check(args.model, args.scheme, args.device, args.steps, args.batch_size, args.lr, args.momentum,
                          args.seed, progress=say)
    print(json.dumps(result, sort_keys=True) if args.json else _table([(k, v) for k, v in result.items()]))
    return 0 if result["forward_mismatches"] == 0 and result["param_mismatches"] == 0 else 1


def cmd_device_firmware(args: argparse.Namespace) -> int:
    from fedtiny.tools.firmware import generate

    say = None if args.json else (lambda m: print(f"[firmware] {m}", file=sys.stderr))
    summary = generate(args.scenario, args.partition, args.out, progress=say, overrides=parse_overrides(args.overrides))
    print(json.dumps(summary, sort_keys=True) if args.json else _table(list(summary.items())))
    return 0


def cmd_device_emulator(args: argparse.Namespace) -> int:
    from fedtiny.device_emulator import serve
    from fedtiny.devices import get_profile
    from fedtiny.federated.task import limit_threads

    limit_threads()
    overrides = parse_overrides(args.overrides)
    if args.engine:
        overrides["train.engine"] = args.engine
    scenario = load_scenario(args.scenario, overrides)
    if scenario.train.engine == "c":
        from fedtiny.int8 import cstep

        if not cstep.available():
            raise ScenarioError(f"--engine c: {cstep.library_path()} is not built: run make install")
    if not 0 <= args.data < scenario.run.clients:
        raise ScenarioError(f"--data: partition {args.data} is not one of the scenario's {scenario.run.clients}")
    if (args.port is None) == (not args.serial):
        raise ScenarioError("device-emulator: give --port PORT (a TCP device) or --serial PATH[@BAUD] (a serial "
                            "port), one of them")
    if args.serial:
        from fedtiny.bridge.address import parse_address
        from fedtiny.device_emulator import serve_serial

        port = parse_address(f"serial:{args.serial}")
        if port.kind != "serial-port":
            raise ScenarioError(f"--serial: {args.serial!r} is not a serial port (a device path such as "
                                f"/dev/ttyUSB0, or COMn, optionally @BAUD)")
        serve_serial(port.path, scenario, args.data, get_profile(args.profile), baud=port.baud, fault=args.fault)
        return 0
    try:
        serve(args.port, scenario, args.data, get_profile(args.profile), host=args.host, fault=args.fault)
    except OSError as exc:
        print(f"fedtiny: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def model_info(model) -> dict[str, Any]:
    """A few facts about an int8 model, for ``fedtiny zoo``."""
    convs = model.convs()
    head = model.classifier
    return {
        "convolutions": len(convs),
        "ops": len(model.nodes),
        "adds": sum(type(model.op(n.op)).__name__ == "QAdd" for n in model.nodes),
        "depthwise": sum(c.is_depthwise for c in convs),
        "parameters": sum(p.numel() for p in model.parameters()),
        "classes": int(head.weight.shape[0]),
        "classifier_precision": "int8" if hasattr(head, "w_scales") else "fp32",
        "input_channels": model.input_channels,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtiny", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's and Ray's logs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a scenario as a Flower simulation")
    p.add_argument("scenario", nargs="?", help="scenario TOML file, e.g. scenarios/quickstart.toml")
    _add_scenario_args(p)
    p.add_argument("--seeds", type=int, default=0, metavar="N",
                   help="repeat the run (each method of a sweep) over N seeds from run.seed; report mean, "
                        "standard deviation and 95%% interval of each figure")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="go on with a run (or sweep) that was stopped, from its last completed round")
    p.add_argument("--method", action="append", default=[], metavar="NAME",
                   help="run only this method of a sweep ([methods.NAME]; repeatable)")
    p.add_argument("--out", help="run folder (default: runs/<name>-<timestamp>)")
    p.add_argument("--json", action="store_true", help="print summary.json as the last line of stdout")
    p.add_argument("--report", action="store_true", help="write report.html into the run folder at the end "
                   "(a sweep: the sweep's page and one per run; see fedtiny report)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="one self-contained HTML page of a run or sweep folder, or (--table) the "
                       "sweep's markdown tables computed again from its runs' summary.json")
    p.add_argument("path", help="a run folder (metrics.jsonl) or a sweep folder (scenario.toml over its run folders)")
    p.add_argument("--table", action="store_true", help="print the sweep table, the paired differences and the "
                   "privacy table (when the runs were attacked) instead of writing report.html")
    p.add_argument("--json", action="store_true", help="print the report's path (or the tables) as JSON on the "
                   "last line")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("zoo", help="import int8 MCU models (.tflite, tiny-training .pkl), export .tflite, run, inspect")
    zsub = p.add_subparsers(dest="zoo_command", required=True)
    model_help = "a .tflite, a tiny-training .pkl, a fedtiny model file, or a run folder (its final global model)"
    z = zsub.add_parser("import", help="read a .tflite or tiny-training .pkl safely and write a fedtiny model file")
    z.add_argument("file", help="e.g. ../shared/models/mlperf-tiny/vww_96_int8.tflite")
    z.add_argument("--out", required=True, help="fedtiny model file to write (.safetensors)")
    z.add_argument("--json", action="store_true", help="print the model facts as JSON")
    z.set_defaults(func=cmd_zoo)
    z = zsub.add_parser("export", help="write a .tflite that TensorFlow Lite Micro runs unchanged")
    z.add_argument("file", help=model_help)
    z.add_argument("--out", required=True, help=".tflite file to write")
    z.add_argument("--json", action="store_true", help="print the model facts as JSON")
    z.set_defaults(func=cmd_zoo)
    z = zsub.add_parser("run", help="run a model's int8 graph on int8 inputs from a .npy file")
    z.add_argument("file", help=model_help)
    z.add_argument("--input", required=True, help=".npy of int8 inputs with a leading batch dimension, in the "
                   "model's layout (NHWC for a .tflite, NCHW otherwise)")
    z.add_argument("--out", required=True, help=".npy to write the int8 output tensor to (after SOFTMAX if any)")
    z.add_argument("--quiet", action="store_true")
    z.set_defaults(func=cmd_zoo)
    z = zsub.add_parser("check", help="the model's int8 graph against TensorFlow Lite Micro's reference kernels "
                        "on random int8 inputs (exit 1 when any element differs); for a run folder also TFLM's "
                        "accuracy on the run's test set beside the run's final accuracy")
    z.add_argument("file", help=model_help)
    z.add_argument("--inputs", type=int, default=32, help="random int8 inputs for the output comparison")
    z.add_argument("--seed", type=int, default=0)
    z.add_argument("--json", action="store_true")
    z.set_defaults(func=cmd_zoo)
    z = zsub.add_parser("cloud", help="run a scenario's cloud step and write its int8 model: name it in "
                        "model.file with model.head = \"keep\" so every run and seed starts from the same integers")
    z.add_argument("scenario", help="scenario TOML file, e.g. scenarios/quickstart.toml")
    z.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario key")
    z.add_argument("--out", required=True, help="fedtiny model file to write (.safetensors)")
    z.add_argument("--json", action="store_true")
    z.set_defaults(func=cmd_zoo)
    z = zsub.add_parser("info", help="validate a model and print its facts")
    z.add_argument("file", help=model_help)
    z.add_argument("--json", action="store_true")
    z.set_defaults(func=cmd_zoo)

    p = sub.add_parser("memory", help="peak SRAM of one training step and the whole device's RAM and flash across "
                       "a round, of a model under a scheme or of a scenario's clients")
    p.add_argument("--model", help="tiny-ir, a .tflite, a fedtiny model file, or a tiny-training .pkl")
    p.add_argument("--scenario", help="instead of --model: every client of this scenario (each method of a sweep), "
                   "the step and the whole device, and how many refuse under each count")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="with --scenario: override a scenario key")
    p.add_argument("--method", action="append", default=[], help="with --scenario: only this method (repeatable)")
    p.add_argument("--scheme", default="full", help="full, bias-only, last-k:N, a JSON/TOML file (schemes.json#id) "
                   "or inline JSON")
    p.add_argument("--num-classes", type=int, help="replace the classifier by a new head with N classes")
    p.add_argument("--classifier-precision", choices=["int8", "fp32"], default="int8")
    p.add_argument("--device", help="device profile to check against (exit status 3 when it does not fit)")
    p.add_argument("--accounting", choices=["planner", "paper"], default="planner")
    p.add_argument("--reorder", action=argparse.BooleanOptionalAction, default=True,
                   help="operator reordering: apply each weight gradient as soon as it is computed")
    p.add_argument("--inplace", action=argparse.BooleanOptionalAction, default=True,
                   help="in-place depthwise convolution")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="fuse expansion+depthwise of blocks no gradient passes through")
    p.add_argument("--optimizer", choices=optimizer_names(), default="sgd+qas")
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=1, help="samples per on-device step")
    p.add_argument("--accumulate", action="store_true", help="count fp32 gradient accumulators (a step of more "
                   "samples than --batch-size, one micro-batch at a time)")
    p.add_argument("--input-size", type=int, help="input side length (default: 128 for imported models)")
    p.add_argument("--train-batch", type=int, default=0, help="samples per training step (train.batch_size) for "
                   "the whole device's count: more than --batch-size adds the accumulators (default: --batch-size)")
    p.add_argument("--samples", type=int, default=0, help="training samples the device holds (the order buffer)")
    p.add_argument("--uplink", choices=["sparse", "dense"], default="sparse")
    p.add_argument("--density", type=float, default=0.1, help="top-k density of the sparse uplink")
    p.add_argument("--residual", choices=["float64", "compact", "none"], default="float64",
                   help="the error-feedback residual (compression.residual; none: no error feedback)")
    p.add_argument("--fit", choices=["device", "step"], default="device", help="what --device must hold for exit "
                   "status 0: the whole client across a round (device_ram_bytes) or one step (peak_sram_bytes)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", help="write per-layer memory bars with the budget line to this PNG")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("attack", help="gradient-leakage attack on real images (DLG, iDLG, Inverting Gradients)")
    p.add_argument("--preset", default="dlg-lenet", help="dlg-lenet (DLG's setting), ig-lenet-fedavg, faces (DLG's setting on "
                                                    "faces with the 3-channel tiny-ir), dlg-lenet-faces (the same "
                                                    "faces on DLG's LeNet: the control), photos, or faces-malicious "
                                                    "(a server that sets the weights and the scheme: the imprint "
                                                    "trap through the int8 client's own update path)")
    p.add_argument("--defense", default="none", help="none, prune-20, prune-90, topk-1, fp16, int8, ternary, "
                                                     "topk-1-ternary")
    p.add_argument("--targets", type=int, default=8, help="independent targets, attacked together")
    p.add_argument("--iterations", type=int, help="optimizer iterations (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--compare-single", action=argparse.BooleanOptionalAction, default=True,
                   help="also time one target attacked alone")
    p.add_argument("--out", help="folder for privacy.json and reconstructions.png")
    p.add_argument("--json", action="store_true")
    m = p.add_argument_group("faces-malicious (the client's real path)")
    m.add_argument("--batch-size", type=int, default=1, help="faces per client (one local batch)")
    m.add_argument("--local-steps", type=int, default=1, help="full-batch local steps")
    m.add_argument("--density", type=float, default=1.0, help="top-k share of the uplink (error feedback on)")
    m.add_argument("--values", default="int8", help="uplink values: int8, fp16 or fp32")
    m.add_argument("--precision", default="int8", help="int8 (the device) or fp32 (dense float updates: contrast)")
    m.add_argument("--learned", type=int, default=0, help="also train the learned inverter on this many augmented "
                   "public faces' updates (batch 1)")
    m.add_argument("--learned-epochs", type=int, default=30)
    m.add_argument("--rounds", type=int, default=1, help="rounds of traps, each binning a new projection of the "
                   "blocks; the clients keep their error-feedback state between rounds")
    m.add_argument("--set", action="append", metavar="KEY=VALUE", help="scenario override for the clients, e.g. "
                   "device.policy_max_change_lsb=2 or privacy.dp=\"local\"")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("device", help="the device side: check the C training step against the simulator's")
    dsub = p.add_subparsers(dest="device_command", required=True)
    d = dsub.add_parser("check", help="run N exact steps with PyTorch and with the C step (device/c) from the same "
                        "model on the same images; print mismatches, the C arena's peak against the planner's, times")
    d.add_argument("--model", required=True, help="tiny-ir (the quickstart's cloud model), a .tflite, a tiny-training "
                   ".pkl or a fedtiny model file")
    d.add_argument("--scheme", default="full", help="full, bias-only, last-k:N (or last-k:fit), a JSON/TOML file "
                   "(schemes.json#id)")
    d.add_argument("--device", default="mcu-256kb", help="device profile (the planner's budget)")
    d.add_argument("--steps", type=int, default=3)
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--momentum", type=float, default=0.0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_device)

    d = dsub.add_parser("firmware", help="write the C source of a scenario's client for the Cortex-M firmware "
                        "(device/firmware; make firmware calls this)")
    d.add_argument("scenario", help="the scenario the firmware trains (see scenarios/firmware-demo.toml)")
    d.add_argument("--partition", type=int, default=1, help="the data partition compiled in")
    d.add_argument("--out", required=True, help="directory for firmware_model.c and firmware_model.h")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario key (the federation the firmware joins must use the same)")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_device_firmware)

    p = sub.add_parser("device-emulator", help="a reference MCU that speaks the bridge protocol over TCP or a "
                                                "serial port")
    p.add_argument("--port", type=int, default=None, help="listen on this TCP port (bridge address HOST:PORT)")
    p.add_argument("--serial", default="", metavar="PATH[@BAUD]", help="serve a serial port instead (the device's "
                   "end of a cable or of a pseudo-terminal pair; the bridge's address is serial:OTHER_END@BAUD)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--profile", default="mcu-256kb", help="device profile whose memory it respects")
    p.add_argument("--scenario", default="scenarios/quickstart.toml", help="the scenario whose model it runs")
    p.add_argument("--data", type=int, default=0, help="the data partition of the scenario it holds")
    p.add_argument("--fault", default="", choices=["", "disconnect", "stall", "reset", "garbage", "busy", "noise"],
                   help="test peer: misbehave on purpose (fedtiny.device_emulator.FAULTS)")
    p.add_argument("--engine", default="", choices=["", "torch", "c"], help="what trains: the PyTorch exact step "
                   "or the C step of device/c (default: the scenario's train.engine); the same update either way")
    _add_scenario_args(p)
    p.set_defaults(func=cmd_device_emulator)

    p = sub.add_parser("search", help="find the sparse-update scheme for a device: contribution analysis + "
                                      "evolutionary search (with a random-search baseline)")
    p.add_argument("--model", required=True, help="tiny-ir, a published model's name (mcunet-5fps) or a model file")
    p.add_argument("--device", required=True, help="device profile whose SRAM is the budget (e.g. nrf52832)")
    p.add_argument("--scenario", help="scenario giving the task and training settings (default: quickstart.toml "
                                      "for tiny-ir, mcunet-256kb.toml for a model file)")
    p.add_argument("--budget-kb", type=int, default=0, help="SRAM budget in KB instead of the device's")
    p.add_argument("--generations", type=int, help="generations of the evolutionary search (default: the scenario's)")
    p.add_argument("--population", type=int, help="population (default: the scenario's)")
    p.add_argument("--out", help="write the scheme (schemes.json entry format) to this file")
    p.add_argument("--report", help="folder for contributions.md, contributions.png and search.json")
    p.add_argument("--no-cache", action="store_true", help="redo the contribution analysis")
    _add_scenario_args(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("bench", help="benchmarks (ratios against a baseline run in the same process)")
    p.add_argument("bench", choices=["sim", "qas", "codec", "train", "secagg", "round"],
                   help="sim: Flower simulation vs a bare Python loop; qas: fp32 vs int8 SGD vs int8 SGD+QAS; "
                        "round: a client round on the reference path vs the fast path (cached frozen prefix); "
                        "codec: bits per position of the wire format vs the entropy floor; "
                        "train: the client's int8 step vs a float step of the same network; "
                        "secagg: Flower's SecAgg+ on dense int8 changes vs the same round without it")
    p.add_argument("--model", dest="model_file", default="",
                   help="train, round (default mcunet-5fps), qas: a published model name (in "
                        "../shared/models/tiny-training) or a model file; round: also tiny-ir")
    p.add_argument("--scheme", default="s3", help="train: s1..s5 (published), full, bias-only, last-k:N, a file")
    p.add_argument("--batch-size", type=int, default=16, help="train: samples per step")
    p.add_argument("--steps", type=int, default=6, help="train: timed steps")
    p.add_argument("--scenario", help="scenario whose local training is timed (default: scenarios/scale.toml for "
                                      "sim, scenarios/quickstart.toml otherwise)")
    p.add_argument("--clients", type=int, default=0, help="sim: clients per round (N, default 100); secagg: "
                                                          "clients (default 10)")
    p.add_argument("--cohort-size", type=int, default=0,
                   help="sim: virtual clients per Flower call (default: one cohort per worker)")
    p.add_argument("--epochs", type=int, default=5, help="qas: fine-tuning epochs per trial")
    p.add_argument("--lr-points", type=int, default=5, help="qas: learning rates tried per method")
    p.add_argument("--numel", type=int, default=1_000_000, help="codec: tensor size")
    p.add_argument("--repeat", type=int, default=3, help="codec, train, round: timing repetitions (best kept)")
    p.add_argument("--lr-center", type=float, default=0.0,
                   help="qas: middle of the fp32/QAS learning-rate grid (0: 0.003, or 1e-4 with --model)")
    p.add_argument("--seeds", type=int, default=3, help="qas with --model: seeds to average over")
    _add_scenario_args(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fedtiny.progress import set_quiet

    set_quiet(bool(getattr(args, "json", False)))  # --json: stdout's last line is the JSON, stderr stays quiet
    try:
        return args.func(args)
    except FedtinyError as exc:
        # Only what a user can cause becomes one line; any other exception is a bug and keeps its traceback.
        print(f"fedtiny: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedtiny: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
