"""Scale features without a simulation: the synthetic source, cohorts, seeds' intervals."""

import numpy as np
import pytest
from conftest import ROOT

from fedtiny.data import build_federation
from fedtiny.report.sweep import combine_seeds, interval95, paired_table
from fedtiny.scenario import ScenarioError, load_scenario


def test_synthetic_fleet_of_ten_thousand_is_lazy_and_seeded():
    s = load_scenario(ROOT / "scenarios" / "scale.toml")
    fed = build_federation(s)
    assert fed.num_clients == 10_000 and fed.pool is None and fed.partitions == []
    a_train, a_test = fed.client_data(9_999)
    b_train, _ = build_federation(s).client_data(9_999)
    assert np.array_equal(a_train.x, b_train.x) and np.array_equal(a_train.y, b_train.y)
    assert len(a_train) + len(a_test) == s.data.samples_per_client
    assert a_train.x.dtype == np.float32 and 0 <= a_train.x.min() and a_train.x.max() <= 1
    other, _ = fed.client_data(1)
    assert not np.array_equal(other.x[:5], a_train.x[:5])
    with pytest.raises(IndexError):
        fed.client_data(10_000)
    # Class-conditional: class means of half the public split classify the other half far above chance
    # (10 classes: chance is 0.1).
    pub, h = fed.public, len(fed.public) // 2
    means = np.stack([pub.x[:h][pub.y[:h] == c].mean(axis=0).ravel() for c in range(pub.num_classes)])
    pred = np.argmin(((pub.x[h:].reshape(len(pub) - h, -1)[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == pub.y[h:]).mean() > 0.6


def test_cohorts_cover_each_sampled_client_once():
    from server.strategy import cohorts

    pids = list(range(0, 200, 2))
    groups = cohorts(pids, [11, 12, 13], 25)
    assert len(groups) == 3 and sorted(p for _, g in groups for p in g) == pids
    assert [node for node, _ in cohorts(pids, [11, 12, 13, 14, 15], 50)] == [11, 12]


def test_interval_and_combined_seeds():
    vals = [0.90, 0.92, 0.94]
    lo, hi = interval95(vals)
    # t(0.975, 2) = 4.3027; sample std 0.02; half-width 4.3027 * 0.02 / sqrt(3)
    assert hi - lo == pytest.approx(2 * 4.3027 * 0.02 / np.sqrt(3), rel=1e-4)
    assert (lo + hi) / 2 == pytest.approx(0.92)
    runs = [
        {
            "seed": i,
            "final_accuracy": v,
            "best_accuracy": v,
            "initial_accuracy": 0.5,
            "uplink_bytes_total": 100,
            "downlink_bytes_total": 10,
            "wall_time_s": 1.0,
        }
        for i, v in enumerate(vals)
    ]
    out = combine_seeds(runs)
    assert out["final_accuracy"] == pytest.approx(0.92) and out["final_accuracy_std"] == pytest.approx(0.02)
    assert out["final_accuracy_ci95"] == pytest.approx([round(lo, 4), round(hi, 4)])
    assert out["uplink_bytes_total_ci95"] == [100, 100] and out["seeds"] == [0, 1, 2]


def test_cohort_size_and_synthetic_keys_are_validated(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\ncohort_size = 0\n")
    with pytest.raises(ScenarioError, match="run.cohort_size"):
        load_scenario(bad)
    bad.write_text('[data]\nsource = "synthetic"\nsamples_per_client = 0\n')
    with pytest.raises(ScenarioError, match="data.samples_per_client"):
        load_scenario(bad)


def test_paired_differences_by_seed():
    runs = lambda accs: combine_seeds(
        [
            {
                "seed": i,
                "final_accuracy": a,
                "best_accuracy": a,
                "uplink_bytes_total": 1,  # noqa: E731
                "wall_time_s": 1.0,
            }
            for i, a in enumerate(accs)
        ]
    )
    table = paired_table({"a": runs([0.90, 0.80, 0.85]), "b": runs([0.92, 0.82, 0.87]), "c": runs([0.95, 0.75, 0.85])})
    lines = table.splitlines()
    assert lines[2].startswith("| b | +0.0200 | +0.0200 to +0.0200 | higher")  # same gain in every seed
    assert "0.0000 |" in lines[3] and lines[3].endswith("no difference |")


def test_large_fleets_get_cohorts_without_asking():
    """Past MAX_NODES clients a simulation left at one node per client runs cohorts, one per CPU, and
    says so; small fleets and an explicit run.cohort_size are left as they are."""
    from fedtiny.federated.layout import MAX_NODES, simulation_layout
    from fedtiny.scenario import parse_overrides

    quick = ROOT / "scenarios" / "quickstart.toml"
    small = load_scenario(quick)
    assert simulation_layout(small) == (small, "")
    big = load_scenario(
        quick, parse_overrides(['data.source="synthetic"', "run.clients=10000", "run.clients_per_round=100"])
    )
    chosen, note = simulation_layout(big)
    assert big.run.clients > MAX_NODES and chosen.run.cohort_size == 50  # 100 per round on 2 CPUs
    assert "run.cohort_size = 50" in note and "10,000 clients" in note
    assert chosen.to_dict() == {**big.to_dict(), "run": {**big.to_dict()["run"], "cohort_size": 50}}
    few = load_scenario(
        quick, parse_overrides(['data.source="synthetic"', "run.clients=10000", "run.clients_per_round=2"])
    )
    assert simulation_layout(few)[0].run.cohort_size == 2  # a cohort is at least 2 clients
    explicit = load_scenario(
        quick, parse_overrides(['data.source="synthetic"', "run.clients=10000", "run.cohort_size=7"])
    )
    assert simulation_layout(explicit) == (explicit, "")
    bridged = load_scenario(
        quick, parse_overrides(['data.source="synthetic"', "run.clients=10000", 'bridge.devices={1="127.0.0.1:9000"}'])
    )
    assert simulation_layout(bridged) == (bridged, "")  # a cohort would simulate the bridged partition
    with pytest.raises(ScenarioError, match="run.cohort_size.*bridge"):
        load_scenario(quick, parse_overrides(["run.cohort_size=5", 'bridge.devices={1="127.0.0.1:9000"}']))
