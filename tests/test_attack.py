"""Leakage attacks: iDLG labels, metrics, Hungarian matching, and real reconstructions of small targets."""

import numpy as np
import pytest
import torch
from torch import nn

from fedtiny.attack.attacks import AttackConfig, idlg_labels, match_cosine, objective, reconstruct
from fedtiny.attack.metrics import flat_psnr, match, psnr, score, ssim
from fedtiny.attack.presets import dlg_lenet, real_images
from fedtiny.attack.threat import ThreatModel
from fedtiny.attack.user import observe


class TinyMLP(nn.Module):
    """A small sigmoid network on 1x8x8 images (fast enough for tests)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 48)
        self.fc = nn.Linear(48, classes)

    def forward(self, x):
        return self.fc(torch.sigmoid(self.hidden(x.flatten(1))))


def tiny(seed=0):
    torch.manual_seed(seed)
    m = TinyMLP()
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-0.5, 0.5)
    return m


def digits(n):
    from sklearn.datasets import load_digits

    return torch.from_numpy((load_digits().images[:n] / 16.0).astype(np.float32))[:, None, None]  # [n,1,1,8,8]


@pytest.mark.parametrize("observation", ["gradient", "delta"])
def test_idlg_label_rule(observation):
    model = dlg_lenet(100, seed=1)
    x = torch.from_numpy(real_images(6, seed=2))[:, None]
    y = torch.tensor([[3], [97], [0], [42], [42], [7]])
    threat = ThreatModel(observation=observation, local_steps=2, lr=0.05)
    labels = idlg_labels(model, observe(model, x, y, 100, threat), threat)
    assert torch.equal(labels, y)


def test_metrics_on_known_pairs():
    rng = np.random.default_rng(0)
    a = rng.random((3, 16, 16))
    assert psnr(a, a) == 100.0 and ssim(a, a) == pytest.approx(1.0)
    b = np.clip(a + 0.1, 0, 2)  # MSE exactly 0.01 -> 20 dB
    assert psnr(a, b) == pytest.approx(20.0)
    noise = rng.random((3, 16, 16))
    assert ssim(a, noise) < 0.2


def test_hungarian_matching_undoes_a_permutation():
    rng = np.random.default_rng(1)
    target = rng.random((5, 3, 8, 8))
    perm = np.array([3, 0, 4, 1, 2])
    recon = target[perm] + rng.normal(0, 0.01, target.shape)
    order = match(recon, target)
    assert np.array_equal(perm[order], np.arange(5))
    assert min(score(recon, target)["psnr"]) > 35


def test_dlg_recovers_tiny_targets_batched():
    """Eight independent targets, one vectorized problem: each recovered to at least 30 dB."""
    model, x = tiny(), digits(8)
    y = torch.arange(8)[:, None]
    threat = ThreatModel()
    obs = observe(model, x, y, 10, threat)
    rec, labels = reconstruct(model, obs, threat, (1, 8, 8), 10, AttackConfig(iterations=300))
    assert torch.equal(labels, y)
    ps = [psnr(np.clip(rec[i].numpy(), 0, 1), x[i].numpy()) for i in range(8)]
    assert min(ps) >= 30, ps


def test_fedavg_delta_of_several_local_steps_leaks():
    """Unrolling 3 local SGD steps, the attacker rebuilds the image from the parameter change."""
    model, x = tiny(1), digits(4)
    y = torch.tensor([[1], [5], [2], [9]])
    threat = ThreatModel(observation="delta", local_steps=3, lr=0.5)
    obs = observe(model, x, y, 10, threat)
    rec, labels = reconstruct(model, obs, threat, (1, 8, 8), 10, AttackConfig(iterations=400))
    assert torch.equal(labels, y)
    ps = [psnr(np.clip(rec[i].numpy(), 0, 1), x[i].numpy()) for i in range(4)]
    assert np.median(ps) >= 25, ps


def test_match_cosine_is_one_at_the_truth_only():
    model, x = tiny(), digits(3)
    y = torch.tensor([[0], [1], [2]])
    threat = ThreatModel(observation="delta", local_steps=2, lr=0.3)
    obs = observe(model, x, y, 10, threat)
    assert torch.allclose(match_cosine(model, obs, threat, x, y, 10), torch.ones(3), atol=1e-5)
    other = match_cosine(model, obs, threat, torch.rand(x.shape, generator=torch.Generator().manual_seed(0)), y, 10)
    assert bool((other < 0.99).all()), other


def test_restarts_keep_each_targets_best_match():
    """With more starts (the first being the single start), the match kept per target is never worse."""
    model, x = tiny(2), digits(4)
    y = torch.tensor([[3], [1], [4], [1]])
    threat = ThreatModel()
    obs = observe(model, x, y, 10, threat)
    cfg = AttackConfig(method="ig", iterations=40)
    loss = objective(model, obs, threat, y, 10, cfg)
    one, _ = reconstruct(model, obs, threat, (1, 8, 8), 10, cfg, labels=y)
    three, _ = reconstruct(
        model, obs, threat, (1, 8, 8), 10, AttackConfig(method="ig", iterations=40, restarts=3), labels=y
    )
    assert bool((loss(three)[0] <= loss(one)[0] + 1e-5).all())


def test_only_transmitted_coordinates_are_observed_and_matched():
    model, x = tiny(), digits(2)
    y = torch.tensor([[4], [6]])
    threat = ThreatModel(density=0.1, values="int8")
    obs = observe(model, x, y, 10, threat)
    for name, (values, mask) in obs.items():
        n = mask[0].numel()
        assert int(mask[0].sum()) == max(1, int(np.ceil(0.1 * n)))
        assert torch.all(values[~mask] == 0)
    rec, _ = reconstruct(model, obs, threat, (1, 8, 8), 10, AttackConfig(iterations=100))
    assert torch.isfinite(rec).all()


def test_surrogate_matches_the_int8_model():
    from fedtiny.attack.surrogate import Surrogate
    from fedtiny.data import load_source
    from fedtiny.federated.train import pretrain
    from fedtiny.int8.convert import ptq
    from fedtiny.models import build_model

    d = load_source("digits")
    m = build_model("tiny-ir", 1, 10)
    pretrain(m, d.subset(np.arange(400)), epochs=3, lr=0.05, batch_size=32, seed=0)
    q = ptq(m, d.x[:128])
    s = Surrogate(q)
    x = torch.from_numpy(d.x[600:800])
    with torch.no_grad():
        a, b = q(x), s(x)
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.95
    assert {n for n, _ in s.named_parameters()} == {n for n, _ in q.named_parameters()}


def test_simulation_attack_writes_privacy_report(tmp_path, cli):
    import json

    from conftest import ROOT

    proc = cli(
        "run",
        str(ROOT / "scenarios" / "quickstart.toml"),
        "--set",
        "run.clients=100",
        "--set",
        "run.rounds=1",
        "--set",
        "data.client_test_fraction=0.5",
        "--set",
        "model.pretrain_epochs=3",
        "--set",
        "train.batch_size=64",
        "--set",
        "train.momentum=0.0",
        "--set",
        'device.profiles=["mcu-256kb"]',  # batches of 64 need their accumulators: not in 64 KB
        "--set",
        "attack.enabled=true",
        "--set",
        "attack.clients=0,1",
        "--set",
        "attack.iterations=60",
        "--out",
        str(tmp_path),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "privacy.json").read_text())
    done = [a for a in report["attacks"] if "mean_psnr_db" in a]
    assert len(done) == 2 and all(np.isfinite(a["mean_psnr_db"]) and a["transmitted"] > 0 for a in done)
    assert all(-1.0 <= a["match_cosine_at_truth"] <= 1.0 for a in done)
    # per image: PSNR, SSIM, the true label and the flat baseline, aligned with each other
    assert all(
        len(a["psnr_db"]) == len(a["ssim"]) == len(a["true_labels"]) == len(a["flat_psnr_db"]) == a["images"]
        for a in done
    )
    assert all(5 < f < 100 for a in done for f in a["flat_psnr_db"])  # digits are not flat
    assert all(0 <= lab < 10 for a in done for lab in a["true_labels"])
    assert (tmp_path / "reconstructions.png").stat().st_size > 0
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["privacy_mean_psnr_db"] == pytest.approx(report["mean_psnr_db"])


@pytest.mark.parametrize("defense", [{"density": 0.1}, {"density": 0.01, "values": "int8"}])
def test_idlg_labels_survive_topk(defense):
    """Under top-k the bias's largest entries, or else the longest weight row, still name one image's label."""
    model = dlg_lenet(100, seed=3)
    x = torch.from_numpy(real_images(8, seed=4))[:, None]
    y = torch.tensor([[5], [17], [99], [0], [63], [42], [8], [71]])
    threat = ThreatModel(observation="delta", lr=0.1, **defense)
    obs = observe(model, x, y, 100, threat)
    assert torch.equal(idlg_labels(model, obs, threat), y)
    no_bias = {k: v for k, v in obs.items() if not k.endswith("bias") or not k.startswith(("fc", "classifier"))}
    assert torch.equal(idlg_labels(model, no_bias, threat), y)


def test_faces_and_photos_presets_are_real_images_on_the_3_channel_tiny_ir():
    from fedtiny.attack.run import preset_targets

    model, x, y = preset_targets("faces", 16, seed=3)
    assert x.shape == (16, 3, 32, 32) and y.tolist() == [1] * 16
    assert torch.equal(x[:, 0], x[:, 1]) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0  # grey on 3 channels
    assert len({tuple(im.flatten()[:50].tolist()) for im in x}) == 16  # 16 different faces
    assert model(x).shape == (16, 2) and model.stem[0].in_channels == 3
    again = preset_targets("faces", 16, seed=3)[1]
    assert torch.equal(x, again)
    _, px, py = preset_targets("photos", 4)
    assert px.shape == (4, 3, 32, 32) and not torch.equal(px[:, 0], px[:, 1]) and py.max() < 10


def test_flat_baseline_is_the_psnr_of_each_channels_mean():
    half = np.zeros((3, 4, 4))
    half[:, :, 2:] = 1.0  # mean 0.5 everywhere, squared error 0.25: 10 log10(4) dB
    assert flat_psnr(half) == pytest.approx(10 * np.log10(4.0))
    assert flat_psnr(np.full((3, 4, 4), 0.3)) == 100.0  # a flat image is its own flat version
    colour = np.stack([np.full((4, 4), 0.1), np.full((4, 4), 0.9), half[0]])
    assert flat_psnr(colour) == pytest.approx(10 * np.log10(12.0))  # per channel: only the third errs


def test_control_preset_rebuilds_the_faces_above_the_flat_baseline():
    from fedtiny.attack.run import run_attack

    summary, x, recon = run_attack("dlg-lenet-faces", 2, iterations=300, log=None)
    assert x.shape == recon.shape == (2, 1, 3, 32, 32)
    assert summary["label_accuracy"] == 1.0 and 10 < summary["flat_psnr_db"] < 25
    assert summary["mean_psnr_db"] > summary["flat_psnr_db"] + 3  # DLG's LeNet gives the faces away


def test_rounding_objective_is_zero_inside_the_sent_integers_intervals_only():
    """A change rounded to a grid of LSBs: the truth lies inside every interval, a random image does not."""
    model, x = tiny(), digits(3)
    y = torch.tensor([[0], [1], [2]])
    threat = ThreatModel(observation="delta", local_steps=1, lr=0.5)
    obs = observe(model, x, y, 10, threat)
    lsb = {k: v.abs().amax(dim=0) / 8 + 1e-12 for k, (v, _) in obs.items()}  # a coarse grid: a few levels per element
    rounded = {k: (torch.round(v / lsb[k]) * lsb[k], m) for k, (v, m) in obs.items()}
    intervals = {k: (lsb[k], 0.5 * lsb[k] * (1 + 1e-4)) for k in obs}
    f_and_grad = objective(model, rounded, threat, y, 10, AttackConfig(method="rounding", tv=0.0), intervals)
    at_truth, _ = f_and_grad(x)
    elsewhere, grad = f_and_grad(torch.rand(x.shape, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(at_truth, torch.zeros(3), atol=1e-6)
    assert bool((elsewhere > 1e-3).all()) and bool(grad.abs().sum() > 0)
    with pytest.raises(Exception, match="rounding intervals"):
        objective(model, rounded, threat, y, 10, AttackConfig(method="rounding"))


def test_analytic_inversion_is_exact_on_a_float_layer_at_batch_1_and_close_through_int8():
    """x = sum_i db_i dW_i / sum_i db_i^2 of a linear layer's gradient at batch 1 is its input; the label is
    the bias gradient's negative entry; int8 values on the wire (per-tensor scale) leave it close."""
    import torch
    from torch import nn

    from fedtiny.attack.analytic import invert_layer, labels_from_bias
    from fedtiny.attack.threat import ThreatModel
    from fedtiny.attack.user import _wire

    torch.manual_seed(0)
    layer = nn.Linear(48, 10).double()
    xs, ys = torch.rand(6, 48, dtype=torch.float64), torch.randint(0, 10, (6,))
    dws, dbs = [], []
    for x, y in zip(xs, ys):
        layer.zero_grad()
        nn.functional.cross_entropy(layer(x[None]), y[None]).backward()
        dws.append(layer.weight.grad.clone())
        dbs.append(layer.bias.grad.clone())
    dw, db = torch.stack(dws), torch.stack(dbs)
    assert torch.allclose(invert_layer(dw, db), xs, rtol=1e-9, atol=1e-12)
    assert torch.equal(labels_from_bias(db), ys)
    threat = ThreatModel(values="int8")
    (qw, mw), (qb, mb) = _wire(dw.float(), threat), _wire(db.float(), threat)
    est = invert_layer(qw.view_as(dw), qb.view_as(db), mw.view_as(dw), mb.view_as(db))
    rel = ((est - xs).norm(dim=1) / xs.norm(dim=1)).max()
    assert rel < 0.05, rel
    assert torch.equal(labels_from_bias(qb.view_as(db)), ys)


def test_worst_case_takes_each_images_best_attack_and_counts_recognisable_ones():
    from fedtiny.attack.metrics import worst_case

    w = worst_case(
        {"ig": [30.0, 12.0, 18.0], "analytic": [20.0, 26.0, 17.0]},
        {"ig": [0.9, 0.1, 0.3], "analytic": [0.5, 0.8, 0.2]},
        [15.0, 14.0, 19.0],
    )
    assert w["max_psnr_db"] == [30.0, 26.0, 18.0] and w["best_attack"] == ["ig", "analytic", "ig"]
    assert w["max_ssim"] == [0.9, 0.8, 0.3]
    assert w["frac_psnr_25db"] == 2 / 3 and w["frac_above_flat"] == 2 / 3  # 18 dB is below its 19 dB baseline
    with pytest.raises(ValueError):
        worst_case({"ig": [1.0]}, {"ig": [0.1]}, [1.0, 2.0])


def test_a_registered_attack_method_is_a_scenario_choice_and_attacks_a_clients_real_update():
    """docs/architecture.md's worked example: a method registered here (L1 distance of the sent coordinates,
    IG's optimizer) is accepted by the scenario and attacks what a client of a real round sent."""
    from conftest import ROOT, attack_one_client

    from fedtiny.attack.methods import AttackMethod, attack_method
    from fedtiny.scenario import ScenarioError, load_scenario, parse_overrides
    from fedtiny.variants import ATTACK_METHODS

    calls = []

    def l1(upd, obs, x, cfg, intervals):
        calls.append(len(x))
        return sum(((upd[k] - v) * m).abs().flatten(1).sum(1) for k, (v, m) in obs.items())

    overrides = [
        "run.clients=60",
        "model.pretrain_epochs=0",
        "train.batch_size=64",
        "train.momentum=0.0",
        "data.client_test_fraction=0.5",
        'device.profiles=["mcu-256kb"]',
        "attack.enabled=true",
        'attack.method="test-l1"',
        "attack.iterations=20",
        "attack.restarts=1",
    ]
    with pytest.raises(ScenarioError, match="attack.method: must be one of dlg, ig, rounding, imprint"):
        load_scenario(ROOT / "scenarios" / "quickstart.toml", parse_overrides(overrides))
    ATTACK_METHODS.add("test-l1", AttackMethod("test-l1", l1, attack_method("ig").search))
    try:
        scenario = load_scenario(ROOT / "scenarios" / "quickstart.toml", parse_overrides(overrides))
        task, report = attack_one_client(scenario)
    finally:
        del ATTACK_METHODS["test-l1"]
    assert report["method"] == "test-l1" and len(calls) >= 20
    (attack,) = report["attacks"]
    assert attack["images"] == len(task.federation.client_data(0)[0]) and np.isfinite(attack["mean_psnr_db"])
    assert report["membership_members"] == attack["images"] and 0.0 <= report["membership_auc"] <= 1.0
    assert 1 <= attack["mean_identification_rank"] <= attack["candidates"]
