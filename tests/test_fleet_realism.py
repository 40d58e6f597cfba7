"""Fleet realism: device time and energy, availability, deadlines, injected faults, robust aggregation."""

import json

import numpy as np
import pytest
from conftest import ROOT, client_replies, run_cli

from fedtiny.budget.step_time import StepWork
from fedtiny.devices import PROFILES, RADIOS, compute_cycles, round_cost
from fedtiny.federated.aggregate import ClientUpdate, Rule, aggregate
from fedtiny.federated.faults import ClientCrash, draw_fault, inject_fault
from fedtiny.federated.rounds import Reply, screen
from fedtiny.federated.sampling import awake_clients, malicious_clients, sample_clients
from fedtiny.scenario import ScenarioError, load_scenario, parse_overrides

QUICKSTART = ROOT / "scenarios" / "quickstart.toml"


def test_energy_of_a_known_case_by_hand():
    """nRF52832 over BLE 1M: 1e6 forward and 5e5 backward MACs, 10,000 bytes down, 1,000 up."""
    nrf, ble = PROFILES["nrf52832"], RADIOS["ble-1m"]
    work = StepWork({("pointwise", "forward"): 1_000_000, ("pointwise", "input"): 500_000}, 0, 0)
    # the published figure without measured kernels: 2.13 cycles/MAC x (1e6 + 2 x 5e5) = 4.26e6 cycles at 64 MHz
    assert compute_cycles(nrf, work) == pytest.approx(4.26e6)
    cost = round_cost(nrf, ble, compute_cycles(nrf, work), 10_000, 1_000)
    assert cost.compute_s == pytest.approx(4.26e6 / 64e6)
    # 11,000 bytes x 8 / 700 kbit/s
    assert cost.radio_s == pytest.approx(88_000 / 700e3)
    # core 3.7 mA x 3 V while computing; radio RX 6.26 mA and TX 6.40 mA x 3 V on the air
    by_hand = 4.26e6 / 64e6 * 11.1 + 80_000 / 700e3 * 18.78 + 8_000 / 700e3 * 19.2
    assert cost.energy_mj == pytest.approx(by_hand)
    lora = round_cost(nrf, RADIOS["lora-sf12"], 0, 0, 51)
    assert lora.radio_s == pytest.approx(51 * 8 / 165 / 0.01)  # 1% duty cycle: 100 s of wall time per s on air


def test_planner_macs_equal_the_convolutions_a_forward_pass_runs():
    """The planner's forward MACs (from shapes) equal those counted on a real forward of the fp32 network."""
    import torch

    from fedtiny.budget.memory import schedule, step_macs
    from fedtiny.federated.task import make_task

    scenario = load_scenario(
        QUICKSTART,
        parse_overrides(
            [
                'model.precision="fp32"',
                'train.optimizer="sgd"',
                'model.file=""',
                'model.head="new"',
                'train.scheme="full"',
            ]
        ),
    )
    task = make_task(scenario)
    counted = []

    def hook(m, inp, out):
        if isinstance(m, torch.nn.Conv2d):
            counted.append(out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])
        else:
            counted.append(m.in_features * m.out_features)

    handles = [
        m.register_forward_hook(hook) for m in task.model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    task.model.eval()
    task.model(torch.zeros(1, *task.federation.image_shape))
    for h in handles:
        h.remove()
    forward, backward = task.sample_macs(PROFILES["nrf52832"])
    assert forward == sum(counted)
    # Full training: a weight gradient everywhere, an input gradient everywhere but the first layer.
    assert backward == 2 * forward - counted[0]
    # Bias-only on the int8 graph: input gradients down to the second layer; of the weights only the
    # classifier's (every scheme trains the new head).
    q = make_task(load_scenario(QUICKSTART)).model
    from fedtiny.budget.schemes import apply_scheme, parse_scheme, resolve

    apply_scheme(q, resolve(parse_scheme("bias-only"), q))
    f, b = step_macs(schedule(q, task.federation.image_shape, 1, fuse=False))
    assert f == forward and b == forward - counted[0] + counted[-1]


def test_availability_sampling():
    s = load_scenario(
        QUICKSTART, parse_overrides(['fleet.availability="random"', "fleet.availability_rate=0.3", "run.clients=1000"])
    )
    awake = awake_clients(s.fleet, 0, 5, 1000)
    assert 230 < len(awake) < 370
    picked = sample_clients(0, 5, 1000, 50, awake)
    assert len(picked) == 50 and set(picked) <= set(awake.tolist())
    assert picked == sample_clients(0, 5, 1000, 50, awake_clients(s.fleet, 0, 5, 1000))  # seeded
    assert sample_clients(0, 5, 1000, 2000, awake) == awake.tolist()  # too few awake: all of them
    d = load_scenario(
        QUICKSTART,
        parse_overrides(
            ['fleet.availability="diurnal"', "fleet.diurnal_period_rounds=10", "fleet.diurnal_awake_fraction=0.3"]
        ),
    ).fleet
    days = np.zeros(50, int)
    for r in range(1, 11):
        days[awake_clients(d, 0, r, 50)] += 1
    assert (days == 3).all()  # each client awake 3 rounds of every 10-round day, at its own hours
    assert len({tuple(awake_clients(d, 0, r, 50)) for r in range(1, 11)}) > 5
    # the run's default keeps the old sampling exactly
    assert sample_clients(3, 2, 10, 4) == sample_clients(3, 2, 10, 4, None)


def test_deadline_drops_stragglers_and_stale_updates_are_rejected():
    fast = Reply(0, b"x", {"compute_s": 1.0, "radio_s": 0.5, "trained-round": 4})
    slow = Reply(1, b"x", {"compute_s": 9.0, "radio_s": 2.0, "trained-round": 4})
    stale = Reply(2, b"x", {"compute_s": 1.0, "radio_s": 0.1, "trained-round": 2})
    kept, late = screen([fast, slow, stale], 4, deadline_s=10.0)
    assert [r.partition_id for r in late] == [1]
    assert [r.partition_id for r in kept] == [0, 2]
    assert not kept[0].error and "stale update" in kept[1].error and "round 2" in kept[1].error
    kept, late = screen([fast, slow], 4, deadline_s=0.0)  # no deadline: nobody is late
    assert not late and len(kept) == 2


def test_fault_draws_follow_their_rates_and_repeat():
    rates = {"crash": 0.1, "garbage": 0.2, "stale": 0.05}
    kinds = [draw_fault(rates, 7, r, p) for r in range(1, 41) for p in range(100)]
    share = {k: kinds.count(k) / len(kinds) for k in rates}
    assert (
        abs(share["crash"] - 0.1) < 0.02 and abs(share["garbage"] - 0.2) < 0.03 and abs(share["stale"] - 0.05) < 0.015
    )
    assert kinds == [draw_fault(rates, 7, r, p) for r in range(1, 41) for p in range(100)]
    with pytest.raises(ScenarioError, match="add up to"):
        load_scenario(QUICKSTART, parse_overrides(["fleet.faults={crash=0.6, garbage=0.6}"]))


def test_robust_rules_equal_flowers_on_full_coverage():
    from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

    rng = np.random.default_rng(0)
    shapes = {"a": (3, 4), "b": (5,)}
    changes = {p: {n: rng.normal(size=sh) for n, sh in shapes.items()} for p in range(7)}
    examples = {p: int(rng.integers(1, 20)) for p in range(7)}
    updates = [ClientUpdate(p, b"", examples[p]) for p in range(7)]
    decode = lambda p, _: {n: (np.arange(a.size), a.ravel()) for n, a in changes[p].items()}  # noqa: E731
    flower_in = [([changes[p][n] for n in shapes], examples[p]) for p in range(7)]
    for rule, theirs in [
        (Rule("median"), aggregate_median(flower_in)),
        (Rule("trimmed-mean", trim_fraction=0.2), aggregate_trimmed_avg(flower_in, 0.2)),
        (Rule("krum", krum_byzantine=2), aggregate_krum(flower_in, 2, 0)),
        (Rule("krum", krum_byzantine=2, krum_selected=3), aggregate_krum(flower_in, 2, 3)),
    ]:
        ours = aggregate(updates, decode, shapes, rule=rule).arrays
        for name, expected in zip(shapes, theirs):
            np.testing.assert_allclose(ours[name], expected, rtol=0, atol=1e-12, err_msg=rule.name)


def test_robust_rules_run_over_the_clients_that_trained_each_element():
    """Hand-computed: element 0 trained by all four clients, element 1 by two, element 2 by nobody."""
    shapes = {"w": (3,)}
    sent = {0: [1.0, 4.0], 1: [2.0, 8.0], 2: [3.0], 3: [100.0]}
    cover = {0: np.array([0, 1]), 1: np.array([0, 1]), 2: np.array([0]), 3: np.array([0])}
    decode = lambda p, _: {"w": (np.arange(len(sent[p])), np.array(sent[p]))}  # noqa: E731
    updates = [ClientUpdate(p, b"", 1) for p in sent]
    median = aggregate(updates, decode, shapes, coverage=lambda p: {"w": cover[p]}, rule=Rule("median")).arrays["w"]
    np.testing.assert_array_equal(median, [2.5, 6.0, 0.0])
    trimmed = aggregate(
        updates, decode, shapes, coverage=lambda p: {"w": cover[p]}, rule=Rule("trimmed-mean", trim_fraction=0.25)
    ).arrays["w"]
    np.testing.assert_array_equal(trimmed, [2.5, 6.0, 0.0])  # element 0 drops 1 and 100; element 1 keeps both


def test_a_registered_rule_is_a_scenario_choice_and_moves_the_global_model(flower_task_identity):
    """docs/architecture.md's worked example: a rule registered here (the change of the client with the most
    examples) is accepted by the scenario and, through the server's strategy, is what the global model moves by."""
    from fedtiny import rules
    from fedtiny.rules import AggregationRule, register

    returned = []

    def largest_client(rows, sizes, params):
        _, change = max(rows, key=lambda r: r[0])
        returned.append({n: np.nan_to_num(change.get(n, np.zeros(s))) for n, s in sizes.items()})
        return returned[-1]

    register(AggregationRule("test-largest-client", "the largest client's change", largest_client))
    try:
        _round_with_the_rule(returned)
    finally:  # the scenario reference (tests/test_docs.py) lists the built-in rules
        del rules._RULES["test-largest-client"]


def _round_with_the_rule(returned):
    from conftest import strategy_round

    with pytest.raises(ScenarioError, match="must be one of fedavg, median, trimmed-mean, krum"):
        load_scenario(QUICKSTART, parse_overrides(['server.aggregation="no-such-rule"']))
    scenario = load_scenario(
        QUICKSTART,
        parse_overrides(["run.clients=4", "model.pretrain_epochs=2", 'server.aggregation="test-largest-client"']),
    )
    with pytest.raises(ScenarioError, match="central DP .* needs a rule of weighted sums"):
        load_scenario(QUICKSTART, parse_overrides(['server.aggregation="test-largest-client"', 'privacy.dp="central"']))
    _, strategy, before, _ = strategy_round(scenario)
    assert len(returned) == 1
    for name in before:
        np.testing.assert_array_equal(
            strategy.global_model.master[name], before[name] + returned[0][name].reshape(before[name].shape)
        )
    assert any(returned[0][n].any() for n in before)


def test_malicious_set_is_fixed_and_sized():
    bad = malicious_clients(0, 100, 0.1)
    assert len(bad) == 10 and bad == malicious_clients(0, 100, 0.1) and not malicious_clients(0, 100, 0.0)


def test_faulty_clients_leave_the_global_model_of_the_honest_ones(flower_task_identity):
    """Every fault kind in two rounds: the global model is exactly the honest clients' alone, faults are counted."""
    from clients.wire import bytes_record, train_jobs
    from fedtiny.compress.dense import pack_dense
    from fedtiny.federated.aggregate import GlobalModel
    from fedtiny.federated.client import local_round
    from fedtiny.federated.faults import remember_update
    from fedtiny.server_setup import server_task
    from server.strategy import FedTinyStrategy

    scenario = load_scenario(
        QUICKSTART, parse_overrides(["run.clients=7", "model.pretrain_epochs=3", 'compression.downlink="full"'])
    )
    task, initial, _, schemes = server_task(scenario, progress=None)
    trained = [n for n, *_ in task.uplink_spec]
    nodes = {p: 100 + p for p in range(7)}
    outcomes = {"faulty": [], "honest": []}
    strategies = {
        k: FedTinyStrategy(task, nodes, GlobalModel(initial, trained), on_round=[outcomes[k].append], schemes=schemes)
        for k in outcomes
    }
    faults = {
        1: {0: "crash", 1: "garbage", 2: "truncated", 3: "bad_count"},
        2: {0: "stale", 1: "crash", 2: "bad_count", 3: "garbage", 4: "truncated"},
    }
    states = {p: {} for p in range(7)}
    records = {k: bytes_record(pack_dense(initial, task.downlink_spec)) for k in outcomes}
    for rnd in (1, 2):
        sent = {k: list(s.configure_train(rnd, records[k], None, None)) for k, s in strategies.items()}
        honest_results, faulty_results = {}, {}
        for m in sent["faulty"]:
            pid = m.metadata.dst_node_id - 100
            (job,) = train_jobs(m.content, pid)
            result, states[pid] = local_round(
                scenario, pid, rnd, job.downlink, kind=job.kind, scheme=job.scheme, state=states[pid]
            )
            kind = faults[rnd].get(pid, "")
            try:
                faulty_results[pid] = inject_fault(kind, result, states[pid], 0, rnd, pid)
            except ClientCrash:
                pass  # never replies
            remember_update(states[pid], result, rnd)
            if not kind:
                honest_results[pid] = result
        for m_h, m_f in zip(sent["honest"], sent["faulty"]):  # the same downlink to every client in both worlds
            assert m_h.content["global"]["payload"].data == m_f.content["global"]["payload"].data
        for k, results in (("faulty", faulty_results), ("honest", honest_results)):
            records[k], _ = strategies[k].aggregate_train(rnd, client_replies(strategies[k], sent[k], results))
    for name in trained:
        np.testing.assert_array_equal(
            strategies["faulty"].global_model.master[name], strategies["honest"].global_model.master[name]
        )
    r1, r2 = (o.stats for o in outcomes["faulty"])
    assert r1.faults == {"bad_count": [3], "garbage": [1], "truncated": [2]}
    assert r2.faults == {"bad_count": [2], "garbage": [3], "stale": [0], "truncated": [4]}
    assert [c["partition_id"] for c in r2.clients] == [5, 6]
    reasons = {x["partition_id"]: x["reason"] for x in r2.rejected}
    assert "stale update" in reasons[0] and "no reply" in reasons[1] and "num-examples" in reasons[2]
    assert set(reasons) == {0, 1, 2, 3, 4}


def test_fleet_run_with_availability_deadline_and_faults(tmp_path):
    """A real simulation: diurnal availability, a deadline and every fault kind; counted, and the run completes."""
    proc = run_cli(
        "run",
        str(QUICKSTART),
        "--set",
        "run.clients=12",
        "--set",
        "run.rounds=3",
        "--set",
        "model.pretrain_epochs=3",
        "--set",
        "run.cohort_size=6",
        "--set",
        'fleet.availability="diurnal"',
        "--set",
        "fleet.diurnal_period_rounds=4",
        "--set",
        "fleet.deadline_s=1.8",
        "--set",
        "fleet.faults={crash=0.1, garbage=0.1, truncated=0.1, stale=0.1, bad_count=0.1}",
        "--out",
        str(tmp_path),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds"] == 3 and summary["faults_total"] == sum(summary["faults_by_kind"].values()) > 0
    # every awake client is asked (clients_per_round = all); about half the fleet is awake at a time
    assert all(r["sampled_clients"] == r["awake_clients"] for r in recs[1:])
    assert 0 < sum(r["awake_clients"] for r in recs[1:]) < 3 * 12
    assert summary["stragglers_total"] > 0
    for r in recs[1:]:
        assert all(c["compute_s"] + c["radio_s"] <= 1.8 for c in r["clients"])
        assert all(s["seconds"] > 1.8 for s in r["stragglers"])
        bad = {p for kind, pids in r["faults"].items() if kind != "crash" for p in pids}
        assert not bad & {c["partition_id"] for c in r["clients"]}  # no faulty update was aggregated
    assert summary["fleet_time_s"] == pytest.approx(sum(r["round_time_s"] for r in recs[1:]))
    assert summary["energy_mj_per_client_round"] > 0
    assert (tmp_path / "accuracy_vs_fleet_time.png").is_file()


def test_poisoning_lives_in_the_fleet_simulation_not_in_a_devices_round():
    """A malicious partition's round through client_round (the simulated fleet) is poisoned; local_round, which the
    bridge's device emulator runs, is the honest round whatever fleet.malicious_fraction says."""
    from fedtiny.compress.dense import pack_dense
    from fedtiny.federated.client import ClientJob, client_round, local_round
    from fedtiny.server_setup import server_task

    scenario = load_scenario(
        QUICKSTART, parse_overrides(["run.clients=2", "model.pretrain_epochs=2", "fleet.malicious_fraction=1.0"])
    )
    task, initial, _, schemes = server_task(scenario, progress=None)
    scheme = next(iter(schemes.by_profile.values()))
    down = pack_dense(initial, task.downlink_spec)
    honest, _ = local_round(scenario, 0, 1, down, scheme=scheme)
    poisoned, _ = client_round(scenario, ClientJob(0, down, scheme=scheme), 1, {})
    clean = load_scenario(QUICKSTART, parse_overrides(["run.clients=2", "model.pretrain_epochs=2"]))
    fleet_honest, _ = client_round(clean, ClientJob(0, down, scheme=scheme), 1, {})
    assert honest.update == fleet_honest.update and poisoned.update != honest.update
