"""``fedtiny attack``: gradient-leakage attacks on real images, and the malicious server's trap through the
int8 client's own update path."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from fedtiny.attack.honest import HONEST_LEARNED, run_honest
from fedtiny.attack.membership import (
    ATTACKS,
    SETTINGS,
    MembershipConfig,
    check_config,
    check_settings,
    run_membership,
)
from fedtiny.attack.run import plot_grid, run_attack, run_malicious
from fedtiny.errors import ScenarioError
from fedtiny.scenario import parse_overrides
from fedtiny.tools.commands.output import table

__all__ = ["cmd_attack"]


def cmd_attack(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    if args.preset == "membership":
        return _attack_membership(args)
    if args.preset == "faces-honest-int8":
        return _attack_honest(args)
    if args.preset == "faces-malicious":
        return _attack_malicious(args)
    summary, targets, recon = run_attack(
        args.preset, args.targets, args.defense, seed=args.seed, iterations=args.iterations
    )
    if args.compare_single and args.targets > 1:
        t0 = time.perf_counter()
        single, _, _ = run_attack(args.preset, 1, args.defense, seed=args.seed, iterations=args.iterations, log=None)
        summary["single_target_seconds"] = round(time.perf_counter() - t0, 2)
        summary["single_target_psnr_db"] = single["mean_psnr_db"]
    _write_out(args.out, summary, targets, recon)
    rows = [
        ("preset / defense", f"{summary['preset']} / {summary['defense']}"),
        ("targets", summary["targets"]),
        (
            "PSNR mean / median / min (dB)",
            f"{summary['mean_psnr_db']:.2f} / {summary['median_psnr_db']:.2f} / {summary['min_psnr_db']:.2f}",
        ),
        ("PSNR of each target's flat mean (baseline)", f"{summary['flat_psnr_db']:.2f}"),
        (
            "images at >= 25 dB / above their flat baseline",
            f"{summary['frac_psnr_25db']:.2f} / {summary['frac_above_flat']:.2f}",
        ),
        ("SSIM mean", summary["mean_ssim"]),
        ("label accuracy", summary["label_accuracy"]),
        (
            f"identification rank among {summary['candidates']} images: mean / ranked first",
            f"{summary['mean_identification_rank']:.1f} / {summary['frac_identified_top1']:.2f}",
        ),
        ("seconds per target (batched)", summary["seconds_per_target"]),
    ]
    if "single_target_seconds" in summary:
        rows.append(("seconds for one target alone", summary["single_target_seconds"]))
    print(table(rows))
    if args.json:
        print(
            json.dumps(
                {k: v for k, v in summary.items() if k not in ("psnr_db", "ssim", "flat_psnr_db_per_image")},
                sort_keys=True,
            )
        )
    return 0


def _attack_malicious(args: argparse.Namespace) -> int:
    """``fedtiny attack --preset faces-malicious``: the trap through the client's own update path."""
    if args.defense != "none":
        raise ScenarioError(
            "--defense: faces-malicious runs the client's real path; set its compression and "
            "policies with --density, --values and --set device.policy_...=N"
        )
    summary, targets, recon = run_malicious(
        args.targets,
        args.batch_size,
        local_steps=args.local_steps,
        density=args.density,
        values=args.values,
        precision=args.precision,
        seed=args.seed,
        overrides=parse_overrides(args.set or []),
        learned=args.learned,
        epochs=args.learned_epochs,
        rounds=args.rounds,
        plan=args.trap_plan,
        adapt=args.adapt,
        model_file=args.model,
        layer=args.trap_layer,
    )
    _write_out(args.out, summary, targets, recon)
    learned = summary["learned_mean_psnr_db"]
    rows = [
        ("preset", f"faces-malicious ({summary['precision']}, {summary['values']}, density {summary['density']})"),
        (
            "targets x batch, local steps, rounds",
            f"{summary['targets']} x {summary['batch_size']}, {summary['local_steps']}, {summary['rounds']}",
        ),
        ("clients that refused", summary["refused"]),
        ("imprint PSNR mean (dB), blocks placed on the public prior", f"{summary['mean_psnr_db']:.2f}"),
        ("learned inverter PSNR mean (dB)", "not run" if learned is None else f"{learned:.2f}"),
        (
            "worst case per image: PSNR / SSIM mean",
            f"{summary['worst_case_mean_psnr_db']:.2f} / {summary['worst_case_mean_ssim']:.3f}",
        ),
        ("PSNR of each target's flat mean (baseline)", f"{summary['mean_flat_psnr_db']:.2f}"),
        ("PSNR of the mean public face (the prior alone)", f"{summary['prior_psnr_db']:.2f}"),
        *(
            [
                (
                    f"at {summary['input_size']}x{summary['input_size']}: PSNR mean / prior / flat (dB)",
                    f"{summary['input_mean_psnr_db']:.2f} / {summary['input_prior_psnr_db']:.2f} / "
                    f"{summary['input_mean_flat_psnr_db']:.2f}",
                ),
                (
                    f"at {summary['input_size']}x{summary['input_size']}: images at >= 25 dB",
                    f"{summary['input_frac_psnr_25db']:.2f}",
                ),
            ]
            if "input_size" in summary
            else []
        ),
        ("worst case per image: lowest PSNR (dB)", f"{summary['worst_case_min_psnr_db']:.2f}"),
        (
            "images at >= 25 dB / above their flat baseline",
            f"{summary['frac_psnr_25db']:.2f} / {summary['frac_above_flat']:.2f}",
        ),
        ("bound: isolated blocks at true positions (dB)", f"{summary['oracle_mean_psnr_db']:.2f}"),
        ("blocks isolated / leaked within 4/255", f"{summary['isolated']:.3f} / {summary['leaked_blocks']:.3f}"),
        ("cells placed by linked borders", f"{summary['linked']:.3f}"),
        (
            f"identification rank among {summary['candidates']} images: mean / ranked first",
            f"{summary['mean_identification_rank']:.1f} / {summary['frac_identified_top1']:.2f}",
        ),
    ]
    print(table(rows))
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "targets_detail"}, sort_keys=True))
    return 0


def _write_out(out: str | None, summary: dict[str, Any], targets, recon) -> None:
    """``--out``: privacy.json and the reconstructions beside their targets."""
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "privacy.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        plot_grid(targets, recon, summary["psnr_db"], folder / "reconstructions.png")


def _attack_membership(args: argparse.Namespace) -> int:
    """``fedtiny attack --preset membership``: was a candidate image in a client's data, from what it sent?"""
    settings = check_settings(args.setting or SETTINGS)  # an unknown name stops here, before any training
    if args.defense != "none":
        raise ScenarioError("--defense: membership runs each setting's real client path; pick them with --setting")
    given = {"batch": args.images, "candidates": args.candidates, "shadows": args.shadows}
    seeds = len(MembershipConfig().seeds) if args.seeds is None else args.seeds
    cfg = MembershipConfig(
        seeds=tuple(range(args.seed, args.seed + seeds)), **{k: v for k, v in given.items() if v is not None}
    )
    check_config(cfg)
    summary = run_membership(settings, cfg)
    rows = []
    for name, row in summary["settings"].items():
        for attack in ATTACKS:
            r = row[attack]
            rows.append(
                (
                    f"{name} / {attack}",
                    f"AUC {r['auc']:.3f}  TPR@1% {r['tpr_at_1pct_fpr']:.3f}  TPR@0.1% {r['tpr_at_0p1pct_fpr']:.3f}  "
                    f"({r['members']} members / {r['nonmembers']} non-members)",
                )
            )
        if "dp" in row:
            b = row["dp"]
            rows.append(
                (
                    f"{name} / bound at epsilon {b['epsilon']:.2f}",
                    f"AUC <= {b['auc_bound']:.3f}  TPR@1% <= {b['tpr_at_1pct_fpr_bound']:.3f}  "
                    f"TPR@0.1% <= {b['tpr_at_0p1pct_fpr_bound']:.3f}",
                )
            )
    print(table(rows))
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    return 0


def _attack_honest(args: argparse.Namespace) -> int:
    """``fedtiny attack --preset faces-honest-int8``: an honest server's learned inverter on its clients' real
    updates (the quickstart's int8 sparse client on faces; ``--precision fp32``: dense float updates)."""
    if args.defense != "none":
        raise ScenarioError("--defense: faces-honest-int8 runs the client's real path; change it with --set")
    summary, targets, recon = run_honest(
        args.targets,
        learned=args.learned or HONEST_LEARNED,
        epochs=args.learned_epochs,
        precision=args.precision,
        seed=args.seed,
        overrides=parse_overrides(args.set or []),
    )
    _write_out(args.out, summary, targets, recon)
    s, c = summary, summary["scenario"]
    rows = [
        ("preset", f"faces-honest-int8 ({s['precision']}, {c['values']}, density {c['density']}, {c['scheme']})"),
        ("model", f"pretrained {c['pretrain_epochs']} epochs on {s['public_images']} public images, lr {c['lr']}"),
        ("targets, clients that refused", f"{s['targets']}, {s['refused']}"),
        ("learned inverter: public updates, epochs", f"{s['learned_public']}, {s['learned_epochs']}"),
        ("elements of the update (share nonzero)", f"{s['update_elements']} ({s['sent_fraction']:.4f})"),
        (
            f"inverter: components chosen; on {s['validation']['images']} held-out public faces: PSNR / prior's",
            f"{s['inverter_components']}; {s['validation']['psnr_db'][str(s['inverter_components'])]:.2f} / "
            f"{s['validation']['prior_psnr_db']:.2f}",
        ),
        (
            "PSNR mean / median / min / max (dB)",
            f"{s['mean_psnr_db']:.2f} / {s['median_psnr_db']:.2f} / {s['min_psnr_db']:.2f} / {s['max_psnr_db']:.2f}",
        ),
        ("SSIM mean", f"{s['mean_ssim']:.3f}"),
        ("PSNR of each target's flat mean (baseline)", f"{s['mean_flat_psnr_db']:.2f}"),
        (
            "PSNR / SSIM of the mean public face (the prior alone)",
            f"{s['mean_prior_psnr_db']:.2f} / {s['mean_prior_ssim']:.3f}",
        ),
        (
            "images at >= 25 dB / above flat / above the prior",
            f"{s['frac_psnr_25db']:.2f} / {s['frac_above_flat']:.2f} / {s['frac_above_prior']:.2f}",
        ),
        (
            f"identification rank among {s['candidates']} images: mean / median / first / top 10",
            f"{s['mean_identification_rank']:.1f} / {s['median_identification_rank']:.1f} / "
            f"{s['frac_identified_top1']:.2f} / {s['frac_identified_top10']:.2f}",
        ),
        ("identification rank of the prior alone: mean", f"{s['prior_mean_identification_rank']:.1f}"),
        ("seconds", f"{s['seconds']:.0f}"),
    ]
    print(table(rows))
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    return 0
