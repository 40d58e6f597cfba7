"""Scheme search: feasibility under any budget, deterministic analysis, per-element aggregation of a mixed
fleet, dynamic channels, and per-device schemes in a real simulation."""

import json

import numpy as np
import pytest
from conftest import ROOT, run_cli

from fedtiny.budget.memory import memory_report
from fedtiny.budget.schemes import ResolvedScheme, Scheme, parse_scheme, redraw_channels, resolve
from fedtiny.compress.dense import dense_nbytes
from fedtiny.federated.aggregate import ClientUpdate, aggregate
from fedtiny.federated.task import cloud_model, make_task, with_scheme
from fedtiny.models.state import load_arrays
from fedtiny.scenario import load_scenario, parse_overrides
from fedtiny.search.contrib import Contributions, analyse
from fedtiny.search.evolve import SearchSettings, Space, evolve, random_feasible, random_search
from fedtiny.search.fisher import fisher_potential, fisher_scheme
from fedtiny.server_setup import analysis_data, analysis_settings, peak_function

SMALL = ["model.pretrain_epochs=3", "search.samples=90", "search.epochs=1"]


@pytest.fixture(scope="module")
def cloud():
    task = make_task(load_scenario(ROOT / "scenarios" / "quickstart.toml", parse_overrides(SMALL)))
    state, _ = cloud_model(task)
    load_arrays(task.model, state)
    return task, state


def test_search_is_always_feasible(cloud):
    """Random contributions, random budgets from the classifier-only floor to the full step: every
    rule returns a scheme whose planner peak fits, and the classifier-only floor is the fallback."""
    task, state = cloud
    peak_of = peak_function(task)
    n = len(task.model.convs())
    floor, full = peak_of(Scheme("c", 0, ())), peak_of(Scheme("full"))
    rng = np.random.default_rng(0)
    for trial in range(12):
        budget = int(rng.integers(floor, full + 1))
        contrib = Contributions(
            list(range(n + 1)),
            [0.0] + list(rng.normal(0.02, 0.03, n)),
            [0.125, 0.25, 0.5, 1.0],
            rng.normal(0.01, 0.02, (n, 4)).tolist(),
            0.5,
            0.4,
            0,
            0.0,
        )
        space = Space(contrib, peak_of, budget, "s")
        found = evolve(space, SearchSettings(population=8, generations=4, seed=trial))
        assert found.peak_sram_bytes == peak_of(found.scheme) <= budget
        assert found.predicted_gain >= 0  # never worse than the classifier alone, which always fits
        base = random_search(Space(contrib, peak_of, budget, "r"), found.evaluations, seed=trial)
        assert peak_of(base.scheme) <= budget
        assert peak_of(space.scheme(random_feasible(space, trial))) <= budget
    potential = [rng.random(c.out_channels if c.is_depthwise else c.in_channels) for c in task.model.convs()]
    for budget in (floor, (floor + full) // 2, full):
        fisher = fisher_scheme(potential, peak_of, budget, (0.125, 0.25, 0.5, 1.0))
        assert fisher.peak_sram_bytes == peak_of(fisher.scheme) <= budget
    with pytest.raises(Exception, match="nothing fits"):
        Space(contrib, peak_of, floor - 1, "s")


def test_contribution_analysis_is_deterministic(cloud):
    task, state = cloud
    train, val = analysis_data(task)
    settings = analysis_settings(task)
    a = analyse(task.model, state, train, val, settings, cache=False)
    b = analyse(task.model, state, train, val, settings, cache=False)
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k != "seconds"}  # noqa: E731
    assert strip(a) == strip(b)
    n = len(task.model.convs())
    assert len(a.weight_gain) == n and all(len(r) == 4 for r in a.weight_gain) and a.bias_grid == list(range(n + 1))
    assert a.evaluations == n * 4 + n + 1


def test_contribution_cache(cloud, tmp_path, monkeypatch):
    task, state = cloud
    monkeypatch.setenv("FEDTINY_CACHE", str(tmp_path))
    train, val = analysis_data(task)
    first = analyse(task.model, state, train, val, analysis_settings(task))
    again = analyse(task.model, state, train, val, analysis_settings(task))
    assert not first.cached and again.cached and again.weight_gain == first.weight_gain
    assert len(list(tmp_path.glob("contrib-*.json"))) == 1


def test_fisher_potential_shapes(cloud):
    task, state = cloud
    train, _ = analysis_data(task)
    pot = fisher_potential(task.model, train, max_samples=32)
    for p, conv in zip(pot, task.model.convs()):
        assert p.shape == (conv.out_channels if conv.is_depthwise else conv.in_channels,)
        assert np.all(p >= 0) and np.isfinite(p).all()
    assert sum(float(p.sum()) for p in pot) > 0


def test_dense_updates_aggregate_to_the_examples_weighted_mean_in_partition_order():
    """Dense changes (every position) are summed as whole arrays: the same float64 additions, in partition-id
    order, as a NumPy reference, so the mean is equal to the last bit; a partial tensor still goes by position."""
    rng = np.random.default_rng(0)
    examples = [7, 30, 11, 2]
    changes = {p: {"w": (np.arange(6), rng.normal(size=6)), "b": (np.array([1]), rng.normal(size=1))} for p in range(4)}
    updates = [ClientUpdate(p, b"", n) for p, n in reversed(list(enumerate(examples)))]
    result = aggregate(updates, lambda p, _: changes[p], {"w": (2, 3), "b": (2,)})
    total, sums = np.zeros(6), np.zeros(6)
    for p, n in enumerate(examples):
        total += n
        sums += changes[p]["w"][1] * n
    assert np.array_equal(result.arrays["w"].ravel(), sums / total)
    b = sum(changes[p]["b"][1][0] * n for p, n in enumerate(examples)) / sum(examples)
    assert result.arrays["b"][0] == 0.0 and result.arrays["b"][1] == b


def test_mixed_fleet_aggregation_is_the_per_element_mean():
    """Client 0 (10 examples) trained elements 0-1 of w, client 1 (30) elements 1-3; nobody trained b."""
    changes = {
        0: {"w": (np.array([0, 1]), np.array([1.0, 2.0]))},
        1: {"w": (np.array([1, 2, 3]), np.array([4.0, 5.0, 6.0]))},
    }
    coverage = {0: {"w": np.array([0, 1])}, 1: {"w": np.array([1, 2, 3])}}
    updates = [ClientUpdate(1, b"", 30), ClientUpdate(0, b"", 10)]
    result = aggregate(updates, lambda p, _: changes[p], {"w": (4,), "b": (2,)}, coverage=lambda p: coverage[p])
    np.testing.assert_allclose(result.arrays["w"], [1.0, (2 * 10 + 4 * 30) / 40, 5.0, 6.0])
    np.testing.assert_array_equal(result.arrays["b"], [0.0, 0.0])
    assert result.accepted == [0, 1]
    # Without coverage every client counts for every element (plain FedAvg).
    plain = aggregate(updates, lambda p, _: changes[p], {"w": (4,)})
    np.testing.assert_allclose(plain.arrays["w"], [10 / 40, (2 * 10 + 4 * 30) / 40, 5 * 30 / 40, 6 * 30 / 40])


def test_dynamic_channels_keep_memory_and_cover_the_layer(cloud):
    task, state = cloud
    scheme = resolve(Scheme("half", 0, ((4, 0.5), (7, 0.25))), task.model)
    draws = [redraw_channels(scheme, [0, 909, r, 3]) for r in range(1, 30)]
    assert all(d.layout() == scheme.layout() for d in draws)
    assert draws[0].channels != draws[1].channels
    assert redraw_channels(scheme, [0, 909, 1, 3]).channels == draws[0].channels  # seeded
    covered = set().union(*(d.channels[4] for d in draws))
    assert covered == set(range(scheme.in_channels[4]))
    # The planner, run afresh on each draw (not the layout-keyed cache), gives one peak.
    peaks = {
        memory_report(task.model, d, task.federation.image_shape, optimizer="sgd+qas", momentum=0.9).peak_sram_bytes
        for d in draws[:4]
    }
    assert len(peaks) == 1


def test_scheme_file_round_trip(cloud):
    task, _ = cloud
    scheme = resolve(Scheme("x", 3, ((2, 0.5), (5, 1.0))), task.model)
    again = resolve(parse_scheme(json.dumps({**scheme.to_dict(), "predicted_gain": 0.1})), task.model)
    assert again.channels == scheme.channels and again.bias == scheme.bias
    assert isinstance(ResolvedScheme.from_json(scheme.to_json()), ResolvedScheme)


def test_search_cli_writes_a_feasible_scheme_and_caches(tmp_path, monkeypatch):
    args = [
        "search",
        "--model",
        "tiny-ir",
        "--device",
        "nrf52832",
        "--generations",
        "3",
        "--population",
        "6",
        "--out",
        str(tmp_path / "scheme.json"),
        "--report",
        str(tmp_path / "report"),
        "--json",
        *sum((["--set", s] for s in SMALL), []),
    ]
    monkeypatch.setenv("FEDTINY_CACHE", str(tmp_path / "cache"))  # the CLI subprocess inherits it
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    a, b = (json.loads(p.stdout.strip().splitlines()[-1]) for p in (first, second))
    assert not a["analysis_cached"] and b["analysis_cached"]
    assert a["scheme"] == b["scheme"] and a["peak_sram_bytes"] <= a["budget_bytes"] == 64 * 1024
    for key in ("peak_sram_bytes", "predicted_gain", "evaluations", "seconds"):
        assert key in a
    # each phase's time, the analysis named cached the second time; together they are the run's time
    assert (
        set(a["phase_seconds"]) >= {"cloud model", "contribution analysis", "evolutionary search", "random baseline"}
        and "contribution analysis (cached)" in b["phase_seconds"]
    )
    assert sum(a["phase_seconds"].values()) <= a["seconds"] + 0.1
    scheme = parse_scheme(str(tmp_path / "scheme.json"))
    assert scheme.name == a["scheme"]["id"]
    assert (tmp_path / "report" / "contributions.png").stat().st_size > 0
    bad = run_cli("search", "--model", "tiny-ir", "--device", "nope")
    assert bad.returncode == 2 and "unknown profile" in bad.stderr


def test_two_device_profiles_train_two_schemes(tmp_path):
    """A 2-round simulation: nRF52832 and STM32F746 clients get last-k schemes that fit each, and each
    client's uplink is the dense payload of its own device's scheme."""
    out = tmp_path / "run"
    proc = run_cli(
        "run",
        str(ROOT / "scenarios" / "quickstart.toml"),
        "--set",
        "run.clients=4",
        "--set",
        "run.rounds=2",
        "--set",
        "model.pretrain_epochs=3",
        "--set",
        "train.scheme=last-k:fit",
        "--set",
        "device.profiles=nrf52832,stm32f746",
        "--set",
        "compression.uplink=dense",
        "--set",
        "train.momentum=0.9",  # momentum for every trained element: the full model fits 320 KB only
        "--set",
        "compression.downlink=full",
        "--out",
        str(out),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    by_device = summary["schemes_by_device"]
    assert set(by_device) == {"nrf52832", "stm32f746"}
    assert by_device["nrf52832"]["id"] != by_device["stm32f746"]["id"]
    from fedtiny.report.runlog import read_metrics

    task = make_task(load_scenario(out / "scenario.toml"))
    sizes = {}
    for device, entry in by_device.items():
        scheme = parse_scheme(json.dumps({k: v for k, v in entry.items() if k not in ("scheme", "k")}))
        sizes[device] = dense_nbytes(with_scheme(task, resolve(scheme, task.model)).uplink_spec)
    assert sizes["nrf52832"] < sizes["stm32f746"]
    for r in read_metrics(out)[1:]:
        assert r["refused"] == [] and len(r["clients"]) == 4
        for c in r["clients"]:
            assert c["uplink_bytes"] == sizes[["nrf52832", "stm32f746"][c["partition_id"] % 2]]
