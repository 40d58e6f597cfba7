"""Privacy defenses: DP (the accountant against a published value, clipping, noise, determinism) and an
attacker who sees only the aggregate."""

import math

import numpy as np
import pytest
from conftest import ROOT, client_replies

from fedtiny.federated.aggregate import CentralDP, ClientUpdate, aggregate
from fedtiny.privacy.dp import clip_change, dp_epsilon, gaussian_epsilon, noise_for_epsilon
from fedtiny.scenario import ScenarioError, load_scenario, parse_overrides

QUICKSTART = ROOT / "scenarios" / "quickstart.toml"


def test_epsilon_matches_tf_privacys_published_mnist_value():
    """TF Privacy's README (tensorflow/privacy, tutorials/README.md, "Privacy accounting"):
    ``compute_dp_sgd_privacy.py --N=60000 --batch_size=256 --noise_multiplier=1.1 --epochs=60
    --delta=1e-5`` "satisfies differential privacy with eps = 3.01 and delta = 1e-05" (RDP,
    Poisson sampling, Mironov's conversion). dp-accounting's tighter conversion can only be lower."""
    steps = math.ceil(60 * 60000 / 256)
    classic = gaussian_epsilon(1.1, steps, 1e-5, sample_rate=256 / 60000, conversion="classic")
    assert classic == pytest.approx(3.01, abs=0.005)
    assert gaussian_epsilon(1.1, steps, 1e-5, sample_rate=256 / 60000) < classic


def test_user_level_epsilon_rules():
    one = dp_epsilon("local", 2.0, 1e-5, releases=1)
    assert dp_epsilon("none", 2.0, 1e-5, releases=5) is None
    assert dp_epsilon("local", 2.0, 1e-5, releases=4) > one  # every update a client sends composes
    assert dp_epsilon("local", 4.0, 1e-5, releases=1) < one  # more noise, less epsilon
    # replace-one: noise multiplier 2 is a Gaussian mechanism of multiplier 1 on sensitivity 1
    assert one == pytest.approx(gaussian_epsilon(1.0, 1, 1e-5, population=1, sample_size=1))
    plain = dp_epsilon("central", 2.0, 1e-5, releases=10, clients=100, per_round=10)
    amplified = dp_epsilon("central", 2.0, 1e-5, releases=10, clients=100, per_round=10, amplified=True)
    assert amplified < plain
    sigma = noise_for_epsilon(8.0, "local", 1e-5, releases=1)
    assert dp_epsilon("local", sigma, 1e-5, releases=1) <= 8.0 < dp_epsilon("local", sigma * 0.99, 1e-5, releases=1)


def test_clip_change_bounds_the_real_unit_norm():
    rng = np.random.default_rng(0)
    units = {"a": rng.uniform(0.001, 0.1, 50), "b": np.ones(7)}
    for scale in (0.01, 1.0, 100.0):
        values = {"a": rng.normal(0, scale * 30, 50), "b": rng.normal(0, scale, 7)}
        clipped, norm = clip_change(values, units, 1.0)
        after = math.sqrt(sum(float(np.sum((clipped[n] * units[n]) ** 2)) for n in values))
        assert after <= 1.0 + 1e-12
        if norm <= 1.0:
            assert all(np.array_equal(clipped[n], values[n]) for n in values)
        else:
            assert after == pytest.approx(1.0)


def test_central_dp_clips_each_change_before_the_noise():
    shapes = {"w": (4,)}
    units = {"w": np.array([0.5, 0.5, 2.0, 2.0])}
    changes = {0: np.array([100.0, 0, 0, 0]), 1: np.array([0, 0, 0, 0.1]), 2: np.array([0, 300.0, 0, 0])}
    updates = [ClientUpdate(p, bytes([p]), 10 + p) for p in changes]

    def decode(pid, payload):
        return {"w": (np.arange(4), changes[pid])}

    dp = CentralDP(clip_norm=1.0, std=0.0, denominator=3, units=units, rng=np.random.default_rng(0))
    mean = aggregate(updates, decode, shapes, dp=dp).arrays["w"]
    # clipped in real units (unit 0.5: 100 -> 1 / 0.5 = 2 stored units), the small one untouched, unweighted
    np.testing.assert_allclose(mean, np.array([2.0, 2.0, 0.0, 0.1]) / 3)
    noisy = aggregate(updates, decode, shapes, dp=CentralDP(1.0, 0.5, 3, units, np.random.default_rng(7))).arrays["w"]
    again = aggregate(updates, decode, shapes, dp=CentralDP(1.0, 0.5, 3, units, np.random.default_rng(7))).arrays["w"]
    np.testing.assert_array_equal(noisy, again)
    assert not np.allclose(noisy, mean)


def test_central_dp_needs_fedavg():
    with pytest.raises(ScenarioError, match="privacy.dp"):
        load_scenario(QUICKSTART, parse_overrides(['privacy.dp="central"', 'server.aggregation="median"']))


def _federate(overrides, rounds=2, on_round=()):
    """Drive the strategy and simulated clients for ``rounds`` rounds without Ray; return (task, strategy, sent)."""
    from clients.wire import bytes_record, train_jobs
    from fedtiny.compress.dense import pack_dense
    from fedtiny.federated.aggregate import GlobalModel
    from fedtiny.federated.client import local_round
    from fedtiny.server_setup import server_task
    from server.strategy import FedTinyStrategy

    # a 256 KB device: dense positions and fp32 values need more RAM for the update than a 64 KB one has
    scenario = load_scenario(
        QUICKSTART,
        parse_overrides(
            [
                "run.clients=4",
                "model.pretrain_epochs=3",
                'compression.downlink="full"',
                'device.profiles=["mcu-256kb"]',
                *overrides,
            ]
        ),
    )
    task, initial, _, schemes = server_task(scenario, progress=None)
    strategy = FedTinyStrategy(
        task,
        {p: 100 + p for p in range(4)},
        GlobalModel(initial, [n for n, *_ in task.uplink_spec]),
        schemes=schemes,
        on_round=on_round,
    )
    record, states, payloads = bytes_record(pack_dense(initial, task.downlink_spec)), {p: {} for p in range(4)}, {}
    for rnd in range(1, rounds + 1):
        sent = list(strategy.configure_train(rnd, record, None, None))
        results = {}
        for m in sent:
            pid = m.metadata.dst_node_id - 100
            (job,) = train_jobs(m.content, pid)
            results[pid], states[pid] = local_round(
                scenario, pid, rnd, job.downlink, kind=job.kind, scheme=job.scheme, state=states[pid]
            )
            payloads[(rnd, pid)] = (results[pid].update, job)
        record, _ = strategy.aggregate_train(rnd, client_replies(strategy, sent, results))
    return task, strategy, payloads


def test_local_dp_clipping_bounds_every_sent_change(flower_task_identity):
    """fp32 values, dense positions, no error feedback, negligible noise: what is sent is the clipped change.

    Every client's change lands on the bound: its training step was larger, so the clip was active.
    """
    task, strategy, payloads = _federate(
        [
            'compression.values="fp32"',
            "compression.density=1.0",
            "compression.error_feedback=false",
            "train.lr=0.2",
            'privacy.dp="local"',
            "privacy.clip_norm=0.05",
            "privacy.noise_multiplier=1e-9",
        ],
        rounds=1,
    )
    norms = []
    for (rnd, pid), (payload, job) in payloads.items():
        decoded = strategy.client_view(pid).uplink.decode(payload, {})
        norms.append(math.sqrt(sum(float(np.sum((v * task.units[n][i]) ** 2)) for n, (i, v) in decoded.items())))
    assert len(norms) == 4
    assert max(norms) <= 0.05 * (1 + 1e-5)
    assert min(norms) > 0.05 * 0.99


@pytest.mark.parametrize("mode", ["local", "central"])
def test_a_dp_run_repeats_for_its_seed(flower_task_identity, mode):
    dp = [f'privacy.dp="{mode}"', "privacy.clip_norm=0.5", "privacy.noise_multiplier=1.0"]
    _, first, _ = _federate(dp)
    _, second, _ = _federate(dp)
    _, none, _ = _federate([])
    for name, master in first.global_model.master.items():
        np.testing.assert_array_equal(master, second.global_model.master[name])
    assert any(not np.array_equal(m, none.global_model.master[n]) for n, m in first.global_model.master.items())


def test_an_aggregate_observer_sees_only_the_rounds_combined_change(flower_task_identity):
    from fedtiny.attack.fleet import ObservationRecorder

    attack = ["attack.enabled=true", "attack.clients=[0, 1, 2, 3]", "attack.rounds=[1]"]
    seen = {}
    for mode in ("client", "aggregate", "both"):
        scenario = load_scenario(QUICKSTART, parse_overrides([*attack, f'attack.observe="{mode}"']))
        seen[mode] = ObservationRecorder(scenario.attack)
        outcomes = []
        task, strategy, payloads = _federate(
            [*attack, f'attack.observe="{mode}"'], rounds=1, on_round=[seen[mode], outcomes.append]
        )
    client, aggregate = seen["client"].observed, seen["aggregate"].observed
    assert [o["partition_id"] for o in client] == [0, 1, 2, 3]
    # "both" keeps the same two kinds of observation, told apart by the aggregate's members
    both = seen["both"].observed
    assert [o["partition_id"] for o in both if "members" not in o] == [0, 1, 2, 3]
    assert [o["members"] for o in both if "members" in o] == [[0, 1, 2, 3]]
    (ob,) = aggregate  # one observation for the round, no client's own change
    assert ob["members"] == [0, 1, 2, 3] and set(ob) == {"round", "partition_id", "members", "changes", "state"}
    # what it holds is the example-weighted mean of the four decoded changes, i.e. what the global model moved by
    (outcome,) = outcomes
    weights = {c["partition_id"]: c["num_examples"] for c in outcome.stats.clients}
    for name, (idx, values) in ob["changes"].items():
        expected = np.zeros(values.size)
        for pid, w in weights.items():
            i, v = outcome.change(pid).get(name, (np.zeros(0, np.int64), np.zeros(0)))
            expected[i] += w * v
        view = task.slices[name]
        np.testing.assert_allclose(values[view], expected[view] / sum(weights.values()), rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(values, outcome.aggregate[name].ravel())


def test_the_privacy_report_scores_client_and_aggregate_observations_apart():
    from fedtiny.attack.fleet import _means, privacy_figures

    attacks = [
        {
            "observed": "client",
            "mean_psnr_db": 20.0,
            "mean_ssim": 0.5,
            "label_accuracy": 1.0,
            "match_cosine_at_truth": 1.0,
            "change_lsb": 0.1,
        },
        {
            "observed": "client",
            "mean_psnr_db": 10.0,
            "mean_ssim": 0.1,
            "label_accuracy": 0.0,
            "match_cosine_at_truth": 0.5,
            "change_lsb": 0.3,
        },
        {
            "observed": "aggregate of 0,1",
            "mean_psnr_db": 6.0,
            "mean_ssim": 0.0,
            "label_accuracy": 0.5,
            "match_cosine_at_truth": 0.9,
            "change_lsb": 0.2,
        },
    ]
    report = {**_means(attacks[:2]), "aggregate": _means(attacks[2:])}
    figures = privacy_figures(report)
    assert figures["privacy_mean_psnr_db"] == 15.0 and figures["privacy_label_accuracy"] == 0.5
    assert figures["privacy_aggregate_mean_psnr_db"] == 6.0 and figures["privacy_aggregate_change_lsb"] == 0.2
    assert "privacy_aggregate_mean_psnr_db" not in privacy_figures({**_means(attacks[:2]), "aggregate": None})


def test_fp32_changes_are_measured_in_the_lsb_int8_would_give_them():
    import torch

    from fedtiny.attack.fleet import _change_lsb

    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.27, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -2.54]]))
    # one LSB per row: 0.01 and 0.02; a change of 0.02 in row 0 is 2 LSB, of 0.02 in row 1 is 1 LSB
    change = torch.tensor([[[0.02, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.02]]])
    mask = torch.tensor([[[True, False, False, False], [False, False, False, True]]])
    assert abs(_change_lsb(model, None, {"0.weight": (change, mask)}, 0) - 1.5) < 1e-6


def test_the_privacy_table_carries_seeds_intervals_aggregate_columns_and_epsilon(tmp_path):
    from fedtiny.report.plots import PRIVACY_PLOTS, plot_attacks_vs_lsb, plot_privacy, privacy_table
    from fedtiny.report.sweep import combine_seeds

    def run(seed, psnr, eps):
        return {
            "seed": seed,
            "final_accuracy": 0.9 + seed / 100,
            "uplink_bytes_total": 1000,
            "wall_time_s": 1.0,
            "peak_sram_bytes_max": 4096,
            "privacy_mean_psnr_db": psnr + seed,
            "privacy_mean_ssim": 0.5,
            "privacy_label_accuracy": 1.0,
            "privacy_match_cosine": 1.0,
            "privacy_change_lsb": 0.1,
            "privacy_aggregate_mean_psnr_db": 6.0 + seed,
            "dp_epsilon": eps,
            "precision": "int8",
        }

    summaries = {
        "plain": combine_seeds([run(s, 20.0, None) for s in range(3)]),
        "dp": combine_seeds([run(s, 6.0, 7.97) for s in range(3)]),
    }
    table = privacy_table(summaries).splitlines()
    assert "aggregate PSNR (dB)" in table[0] and table[0].rstrip(" |").endswith("epsilon")
    plain, dp = table[2], table[3]
    # mean 21 over seeds 20, 21, 22; half-width t(0.975, 2) * 1 / sqrt(3) = 2.48
    assert "| 21.00 ± 2.48 |" in plain and "| 7.00 ± 2.48 |" in plain and plain.endswith("| inf (no DP) |")
    assert dp.endswith("| 7.97 |") and "4,096" in dp and "Mean over 3 seeds" in "\n".join(table)
    assert "| images >= 25 dB |" in table[0] and "bound at true positions" not in table[0]
    trap = combine_seeds(
        [
            {
                **run(s, 12.0, None),
                "privacy_oracle_psnr_db": 20.0,
                "privacy_leaked_blocks": 0.1,
                "privacy_frac_psnr_25db": 0.0,
                "privacy_flat_psnr_db": 15.0,
                "refused_clients_total": 0,
            }
            for s in range(3)
        ]
    )
    rows = privacy_table({"malicious": trap}).splitlines()
    assert "bound at true positions (dB)" in rows[0] and "| 20.00 ± 0.00 | 0.100 ± 0.000 |" in rows[2]
    assert "| 15.00 ± 0.00 | 0.00 ± 0.00 |" in rows[2]
    for file, (x_key, xlabel, logx) in PRIVACY_PLOTS.items():
        assert plot_privacy(summaries, tmp_path / file, x_key, xlabel, logx).stat().st_size > 0
    attacks = [{"observed": "client", "change_lsb": 0.5, "mean_psnr_db": 7.0}]
    assert (
        plot_attacks_vs_lsb({"plain": [{"attacks": attacks}]}, {"plain": "int8"}, tmp_path / "lsb.png").stat().st_size
        > 0
    )


def test_the_rounds_table_splits_attacks_by_round_with_seed_intervals():
    from fedtiny.report.plots import privacy_rounds_table

    def attack(rnd, psnr, lsb, observed="client"):
        return {
            "observed": observed,
            "round": rnd,
            "mean_psnr_db": psnr,
            "change_lsb": lsb,
            "match_cosine_at_truth": 0.9,
            "mean_ssim": 0.5,
            "label_accuracy": 1.0,
        }

    # seed s: round 1 clients at 10+s and 12+s dB (mean 11+s), round 5 one client at 20+s dB;
    # the aggregate's 99 dB must not count as a client's
    reports = {
        "int8": [
            {
                "attacks": [
                    attack(1, 10 + s, 1.0),
                    attack(1, 12 + s, 3.0),
                    attack(5, 20 + s, 0.5),
                    attack(1, 99.0, 9.0, observed="aggregate of 0,1"),
                ]
            }
            for s in range(3)
        ]
    }
    accuracy = {"int8": [{0: 0.8, 4: 0.5 + s / 10} for s in range(3)]}
    rows = privacy_rounds_table(reports, accuracy).splitlines()
    assert rows[0].startswith("| method | round | received model's accuracy | change (LSB)")
    r1, r5 = rows[2], rows[3]
    # round 1: mean over seeds of 11, 12, 13 = 12 ± t(0.975, 2) / sqrt(3) = 2.48; change 2 LSB every seed
    assert r1.startswith("| int8 | 1 | 0.8000 ± 0.0000 | 2 ± 0 |") and "| 12.00 ± 2.48 |" in r1
    # round 5 was attacked on the model after round 4: 0.5, 0.6, 0.7 -> 0.6 ± 0.248
    assert r5.startswith("| int8 | 5 | 0.6000 ± 0.2484 | 0.5 ± 0 |") and "| 21.00 ± 2.48 |" in r5
    assert len(rows) == 4


def test_the_lsb_table_pools_client_updates_by_precision_attack_batch_and_size_over_seeds():
    from fedtiny.report.plots import privacy_lsb_table

    def attack(psnr, lsb, observed="client", images=1):
        return {"observed": observed, "round": 1, "mean_psnr_db": psnr, "change_lsb": lsb, "images": images}

    # int8 with IG, per seed s: two one-image updates below 0.01 LSB (5 and 7 dB) and one of 0.5 LSB at
    # 24 + s dB, which is rebuilt; a 4-image update of 0.5 LSB pooled apart; fp32 (one seed only):
    # 0.5 LSB at 10 dB; the rounding attack apart. Aggregates never count.
    reports = {
        "int8-a": [{"method": "ig", "attacks": [attack(5.0, 0.001), attack(7.0, 0.005)]} for s in range(3)],
        "int8-b": [
            {
                "method": "ig",
                "attacks": [attack(24.0 + s, 0.5), attack(99.0, 0.5, "aggregate of 0,1"), attack(8.0, 0.5, images=4)],
            }
            for s in range(3)
        ],
        "int8-r": [{"method": "rounding", "attacks": [attack(6.0, 0.5)]} for s in range(3)],
        "fp32": [{"method": "ig", "attacks": [attack(10.0, 0.5)]}],
    }
    rows = privacy_lsb_table(reports, {"int8-a": "int8", "int8-b": "int8", "int8-r": "int8", "fp32": "fp32"})
    rows = rows.splitlines()
    assert rows[0].startswith("| updates of | mean sent change (LSB) | updates | seeds | PSNR (dB) | rebuilt")
    assert rows[2:] == [
        "| fp32, ig, batch 1 | 0.3 - 1 | 1 | 1 | 10.00 | 0.00 |",
        "| int8, ig, batch 1 | < 0.01 | 6 | 3 | 6.00 ± 0.00 | 0.00 ± 0.00 |",
        # 24, 25, 26 dB: mean 25 ± t(0.975, 2) * 1 / sqrt(3) = 2.48; every one rebuilt
        "| int8, ig, batch 1 | 0.3 - 1 | 3 | 3 | 25.00 ± 2.48 | 1.00 ± 0.00 |",
        "| int8, ig, batch 4 | 0.3 - 1 | 3 | 3 | 8.00 ± 0.00 | 0.00 ± 0.00 |",
        "| int8, rounding, batch 1 | 0.3 - 1 | 3 | 3 | 6.00 ± 0.00 | 0.00 ± 0.00 |",
    ]


def _quickstart_round(overrides, tamper=None):
    """One client round of the quickstart (2 clients) under ``overrides``; ``tamper(state)`` edits the downlink."""
    from fedtiny.compress.dense import pack_dense
    from fedtiny.federated.client import client_task, local_round
    from fedtiny.scenario import load_scenario
    from fedtiny.server_setup import server_task

    s = load_scenario(
        ROOT / "scenarios" / "quickstart.toml",
        {"run.clients": 2, "compression.uplink": "dense", "compression.downlink": "full", **overrides},
    )
    task, initial, _, schemes = server_task(s, progress=None)
    scheme = next(iter(schemes.by_profile.values()))
    client = client_task(task.scenario, scheme)
    state = {k: v.copy() for k, v in initial.items()}
    if tamper:
        tamper(state)
    down = pack_dense({n: state[n] for n, *_ in client.downlink_spec}, client.downlink_spec)
    result, _ = local_round(task.scenario, 0, 1, down, kind="full", scheme=scheme)
    return result, state, client


def test_client_policies_refuse_early_layers_and_saturating_downlinks_and_bound_the_change():
    import numpy as np

    from fedtiny.compress.dense import unpack_dense

    honest, _, _ = _quickstart_round({"device.policy_max_saturation": 0.9})
    assert honest.refusal == "" and honest.update  # an honest model clamps about half of each layer
    refused, _, _ = _quickstart_round({"device.policy_frozen_first": 2})
    assert "conv0" in refused.refusal and refused.update == b""

    def trap(state):  # conv0 pushed below its clamp everywhere: the kind of downlink a trap looks like
        state["conv0.bias"] = np.full_like(state["conv0.bias"], -(2**30))

    refused, _, _ = _quickstart_round({"device.policy_max_saturation": 0.9}, trap)
    assert "conv0" in refused.refusal and "refused" in refused.refusal and refused.update == b""

    bounded, start, client = _quickstart_round({"device.policy_max_change_lsb": 1})
    free, _, _ = _quickstart_round({})
    sent = unpack_dense(bounded.update, client.uplink_spec)
    unbounded = unpack_dense(free.update, client.uplink_spec)
    moved = 0
    for name, _, dt in client.uplink_spec:
        if dt == "int8":
            change = sent[name].astype(np.int16) - start[name].astype(np.int16)
            assert np.abs(change).max() <= 1
            moved += int(np.abs(unbounded[name].astype(np.int16) - start[name].astype(np.int16)).max() > 1)
    assert moved > 0  # without the policy some weight moved further
