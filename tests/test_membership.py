"""Membership inference from a client's update: the ROC figures against brute force, the DP bound, the
settings' refusals, and the attacks on a setting where membership leaks by construction."""

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from fedtiny.attack.membership import (
    ATTACKS,
    MembershipConfig,
    _mean_groups,
    check_config,
    check_settings,
    dp_auc_bound,
    dp_tpr_bound,
    roc_auc,
    roc_summary,
    run_membership,
    run_setting,
    split,
    tpr_at_fpr,
)
from fedtiny.progress import set_quiet
from fedtiny.scenario import ScenarioError
from fedtiny.tools.cli import main


def _brute_tpr(members, nonmembers, fpr):
    """Every threshold ``score >= t`` (t at each score, and above them all): the best TPR with FPR <= fpr."""
    best = 0.0
    for t in np.r_[np.unique(np.r_[members, nonmembers]), np.inf]:
        if np.mean(nonmembers >= t) <= fpr:
            best = max(best, float(np.mean(members >= t)))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_is_the_mann_whitney_statistic_ties_half(seed):
    rng = np.random.default_rng(seed)
    m, n = rng.integers(0, 6, 37).astype(float), rng.integers(0, 5, 53).astype(float)  # many ties
    pairs = (m[:, None] > n[None]).sum() + 0.5 * (m[:, None] == n[None]).sum()
    assert roc_auc(m, n) == pytest.approx(pairs / (len(m) * len(n)), abs=1e-12)
    labels = np.r_[np.ones(len(m)), np.zeros(len(n))]
    assert roc_auc(m, n) == pytest.approx(roc_auc_score(labels, np.r_[m, n]), abs=1e-12)
    cont_m, cont_n = rng.normal(0.5, 1, 200), rng.normal(0, 1, 300)
    assert roc_auc(cont_m, cont_n) == pytest.approx(
        roc_auc_score(np.r_[np.ones(200), np.zeros(300)], np.r_[cont_m, cont_n]), abs=1e-12
    )


@pytest.mark.parametrize("seed", range(4))
def test_tpr_at_fpr_is_the_best_threshold_within_the_fpr(seed):
    rng = np.random.default_rng(seed)
    m, n = np.round(rng.normal(1, 1, 150), 1), np.round(rng.normal(0, 1, 400), 1)  # ties across the classes
    for fpr in (0.0, 0.001, 0.0025, 0.01, 0.05, 0.1, 0.5, 1.0):
        assert tpr_at_fpr(m, n, fpr) == pytest.approx(_brute_tpr(m, n, fpr), abs=1e-12), fpr


def test_tpr_at_fpr_below_one_over_n_counts_only_thresholds_above_every_nonmember():
    n = np.arange(100, dtype=float)  # 100 non-members: 1% is one of them, 0.1% is none
    m = np.array([97.5, 99.0, 99.5, 100.5, 101.0])
    assert tpr_at_fpr(m, n, 0.01) == pytest.approx(4 / 5)  # t = 99 lets one non-member (99) through, 97.5 fails
    assert tpr_at_fpr(m, n, 0.001) == pytest.approx(3 / 5)  # no non-member may pass: t above 99
    s = roc_summary(m, n)
    assert (s["members"], s["nonmembers"], s["min_fpr"]) == (5, 100, 0.01)
    with pytest.raises(ValueError):
        tpr_at_fpr(m, [], 0.01)


def test_dp_bound_is_the_hypothesis_testing_region():
    assert dp_auc_bound(0.0, 0.0) == pytest.approx(0.5)  # no test beats chance
    eps, delta = 1.0, 1e-5
    f = np.linspace(0, 1, 200_001)
    assert dp_auc_bound(eps, delta) == pytest.approx(np.trapezoid(dp_tpr_bound(eps, delta, f), f), abs=1e-8)
    assert float(dp_tpr_bound(eps, delta, 0.01)) == pytest.approx(np.e * 0.01 + delta)
    # epsilon 8 promises next to nothing at 1% FPR: only the other side of the region binds
    assert float(dp_tpr_bound(8.0, delta, 0.01)) == pytest.approx(1 - np.exp(-8.0) * (1 - delta - 0.01))
    assert dp_auc_bound(8.0, delta) > 0.999


def test_unknown_setting_and_bad_sizes_are_refused_by_name():
    with pytest.raises(ScenarioError, match=r"unknown 'fp16-dense'.*fp32-dense, int8-dense, quickstart"):
        check_settings(["quickstart", "fp16-dense"])
    with pytest.raises(ScenarioError, match="'nope'"):
        run_membership(["nope"])
    with pytest.raises(ScenarioError, match="140 target clients \\+ 64 shadows"):
        check_config(MembershipConfig(batch=1, candidates=140))
    with pytest.raises(ScenarioError, match="candidates: 7"):
        check_config(MembershipConfig(candidates=7))


def test_split_is_disjoint_and_balanced():
    cfg = MembershipConfig()
    pre, shadow, cand = split(3, cfg)
    assert len(set(pre) | set(shadow) | set(cand)) == len(pre) + len(shadow) + len(cand) == 200
    for part, size in ((shadow, cfg.shadow_images), (cand, cfg.candidates)):
        assert len(part) == size and (part < 100).sum() == size // 2  # the first 100 of lfw_subset are faces


def test_aggregates_are_means_of_disjoint_rounds():
    rows = np.arange(12 * 3, dtype=float).reshape(12, 3)
    means, groups = _mean_groups(rows, 4, 2, np.random.default_rng(0))
    assert len(means) == len(groups) == 6
    for k in range(2):  # each draw partitions the clients
        assert sorted(np.concatenate(groups[3 * k : 3 * k + 3])) == list(range(12))
    for mean, g in zip(means, groups):
        np.testing.assert_allclose(mean, rows[g].mean(0))


def test_membership_leaks_from_a_dense_fp32_update_of_one_image():
    """At batch 1 the fp32 client's dense update is its image's own update: the alignment attack finds every
    member, and the calibrated attacks, which never see a candidate in training, stand well above chance."""
    torch.set_num_threads(1)
    cfg = MembershipConfig(seeds=(0,), batch=1, candidates=20, shadows=12, shadow_images=20, pretrain_epochs=5)
    out = run_setting("fp32-dense", 0, cfg, log=None)
    assert set(out["scores"]) == set(ATTACKS)
    members, nonmembers = out["scores"]["cosine"]
    assert (len(members), len(nonmembers)) == (20, 20 * 19)
    np.testing.assert_allclose(members, 1.0, atol=1e-6)  # the same image through the same client path
    assert roc_auc(members, nonmembers) == 1.0
    for attack in ("lira", "lira-cosine", "loss"):
        assert roc_auc(*out["scores"][attack]) > 0.75, attack
    assert out["update_norm"] > 0 and "dp" not in out


def test_cli_prints_the_headline_and_every_setting_as_json(capsys):
    argv = ["attack", "--preset", "membership", "--setting", "fp32-dense", "--seeds", "1", "--candidates", "12"]
    argv += ["--shadows", "10", "--images", "1", "--threads", "1", "--json"]
    try:
        assert main(argv) == 0
    finally:
        set_quiet(False)  # --json silenced this process's progress lines
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = out["settings"]["fp32-dense"]
    assert out["headline"] == "fp32-dense/lira"  # the quickstart's row when it runs, else the first setting's
    assert {k: out[k] for k in ("auc", "members", "nonmembers", "seeds")} == {
        "auc": row["lira"]["auc"],
        "members": 12,
        "nonmembers": 12 * 11,
        "seeds": [0],
    }
    assert row["cosine"]["auc"] == 1.0 and row["cosine"]["tpr_at_0p1pct_fpr"] == 1.0
    assert set(row["lira"]) >= {"auc", "tpr_at_1pct_fpr", "tpr_at_0p1pct_fpr", "members", "nonmembers", "seeds"}


def test_cli_refuses_an_unknown_setting_before_any_work(capsys):
    assert main(["attack", "--preset", "membership", "--setting", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "--setting: unknown 'fp16'" in err and "local-dp, trap" in err
