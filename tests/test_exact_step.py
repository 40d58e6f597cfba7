"""The exact training step (fedtiny.int8.exact): integer sums, stated rounding, the same numbers on any CPU."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, build_c_library, env_with_capability

from fedtiny.errors import ScenarioError
from fedtiny.int8 import exact


def _qmodel():
    from test_int8 import small_qmodel

    return small_qmodel()


def _digits(n=96):
    from fedtiny.data import load_source

    return load_source("digits").subset(np.arange(1, 2 * n, 2))


def test_uniform_is_the_stated_counter_hash():
    key = exact.StepKey(seed=123456789, step=7)
    u = exact.uniform(key, 5, (4, 50))
    base = exact.hash32(key.seed ^ exact.hash32(key.step ^ exact.hash32(5)))
    want = [(exact.hash32((base + i) & 0xFFFFFFFF) >> 8) * 2.0**-24 for i in range(200)]
    assert u.dtype == torch.float32 and u.flatten().tolist() == want
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert not torch.equal(u, exact.uniform(exact.StepKey(123456789, 8), 5, (4, 50)))
    big = exact.uniform(exact.StepKey(1, 0), 0, (200_000,))
    assert abs(float(big.mean()) - 0.5) < 0.005


def test_fixed_point_cross_entropy_matches_float_softmax():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-128, 128, (16, 10), generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)
    scale, zero = 0.08, -3
    logits = ((q - zero).float() * scale).requires_grad_(True)
    loss = exact.cross_entropy(logits, y, scale, zero)
    loss.backward()
    ref = logits.detach().clone().requires_grad_(True)
    ref_loss = F.cross_entropy(ref, y)
    ref_loss.backward()
    # Q0.31 exponentials: a true class 20 nats below the best keeps ~3 significant bits, hence relative 1e-3
    assert abs(float(loss.detach()) - float(ref_loss.detach())) < 1e-3 * float(ref_loss.detach())
    torch.testing.assert_close(logits.grad, ref.grad, atol=2e-5, rtol=0)


def _one_step(model, xb, yb, seed=1, step=0):
    from fedtiny.federated.train import _exact_loss

    model.number_convs()
    model.zero_grad()
    with exact.step(exact.StepKey(seed, step)):
        _exact_loss(model)(model(xb), yb).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_exact_gradients_are_unbiased_estimates_of_the_float_gradients():
    """Averaged over stochastic-rounding streams, the exact step's gradients point where the float step's do."""
    q = _qmodel()
    data = _digits(32)
    xb, yb = torch.from_numpy(data.x[:16]), torch.from_numpy(data.y[:16])
    q.zero_grad()
    F.cross_entropy(q(xb), yb).backward()
    float_grads = {n: p.grad.clone() for n, p in q.named_parameters() if p.grad is not None}
    mean = None
    for seed in range(24):
        g = _one_step(q, xb, yb, seed=seed)
        mean = g if mean is None else {n: mean[n] + g[n] for n in g}
    assert mean.keys() == float_grads.keys() and len(mean) >= 10
    for name, g in mean.items():
        cos = F.cosine_similarity(g.flatten().double(), float_grads[name].flatten().double(), dim=0)
        assert cos > 0.95, (name, float(cos))


def test_sums_are_exact_whatever_the_accumulator(monkeypatch):
    """float32 where the stated bound allows it, float64 otherwise: the same integers either way."""
    data = _digits(16)
    xb, yb = torch.from_numpy(data.x[:16]), torch.from_numpy(data.y[:16])
    fast = _one_step(_qmodel(), xb, yb)
    monkeypatch.setattr(exact, "int_sum_dtype", lambda bound: torch.float64)
    wide = _one_step(_qmodel(), xb, yb)
    assert all(torch.equal(fast[n], wide[n]) for n in fast)


_SCRIPT = """
import hashlib, sys, numpy as np, torch
sys.path.insert(0, {tests!r})
from fedtiny.data import load_source
from fedtiny.federated.train import seeded, train_local, evaluate
from fedtiny.int8.modelfile import load_qmodel
q = load_qmodel({model!r})
data = load_source("digits").subset(np.arange(0, 240))
r = train_local(q, data, epochs=1, batch_size=16, lr=0.02, optimizer="sgd+qas", momentum=0.9, gen=seeded(3),
                gradients="exact")
h = hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in q.parameters())).hexdigest()
print(h, repr(r.loss), repr(evaluate(q, data)[0]))
"""


def test_the_same_numbers_with_scalar_kernels(tmp_path):
    """15 exact steps with PyTorch's best vector kernels and with ATEN_CPU_CAPABILITY=default: same bytes."""
    from fedtiny.int8.modelfile import save_qmodel

    path = save_qmodel(_qmodel(), tmp_path / "m.safetensors")
    script = _SCRIPT.format(tests=str(ROOT / "tests"), model=str(path))
    outs = []
    for capability in (None, "default"):
        env = env_with_capability(capability)
        r = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
        )
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(r.stdout.strip().splitlines()[-1])
    assert outs[0] == outs[1]


def test_exact_step_needs_an_int8_head_and_sgd(tmp_path):
    from fedtiny.scenario import load_scenario

    for sets in ({"train.optimizer": "adam"}, {"model.classifier_precision": "fp32"}):
        with pytest.raises(ScenarioError, match="train.gradients"):
            load_scenario(ROOT / "scenarios" / "quickstart.toml", {"model.file": "", "model.head": "new", **sets})
    s = load_scenario(
        ROOT / "scenarios" / "quickstart.toml",
        {
            "train.optimizer": "adam",
            "train.gradients": "float",
            "train.shuffle": "torch",
            "model.file": "",
            "model.head": "new",
        },
    )
    assert s.train.gradients == "float"


def test_a_cloud_model_file_with_head_keep_starts_the_run(tmp_path, cli):
    """`fedtiny zoo cloud` writes the cloud step's int8 model; with model.head = keep a run starts from it."""
    from fedtiny.federated.task import cloud_model, make_task
    from fedtiny.scenario import load_scenario

    out = tmp_path / "cloud.safetensors"
    r = cli(
        "zoo",
        "cloud",
        str(ROOT / "scenarios" / "quickstart.toml"),
        "--set",
        "model.file=",
        "--set",
        "model.head=new",
        "--set",
        "model.pretrain_epochs=2",
        "--out",
        str(out),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    written = __import__("json").loads(r.stdout.strip().splitlines()[-1])
    s = load_scenario(ROOT / "scenarios" / "quickstart.toml", {"model.file": str(out), "model.head": "keep"})
    _, cloud = cloud_model(make_task(s))
    assert cloud.ptq_accuracy == written["cloud_int8_accuracy"]
    with pytest.raises(ScenarioError, match="model.head"):
        make_task(
            load_scenario(
                ROOT / "scenarios" / "quickstart.toml",
                {"model.file": str(out), "model.head": "keep", "data.source": "lfw-faces", "data.image_size": 8},
            )
        )


def _metrics_without_time(run_dir):
    import json

    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        row.pop("elapsed_s", None)
        rows.append(row)
    return rows


def test_quickstart_metrics_identical_with_scalar_kernels_and_the_c_step(tmp_path):
    """The quickstart (2 rounds, 3 clients) writes the same metrics.jsonl with PyTorch's best kernels and its
    clients' steps in PyTorch, and with ATEN_CPU_CAPABILITY=default (the server's evaluation and the clients'
    forward on scalar kernels) and the clients' steps run by the C step (train.engine = c). Scalar kernels
    alone: test_the_same_numbers_with_scalar_kernels."""
    build_c_library("libfedtiny_step.so")
    runs = []
    for capability, engine in ((None, "torch"), ("default", "c")):
        out = tmp_path / f"{capability or 'best'}-{engine}"
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedtiny.tools.cli",
                "run",
                "scenarios/quickstart.toml",
                "--set",
                "run.rounds=2",
                "--set",
                "run.clients=3",
                "--set",
                f"train.engine={engine}",
                "--out",
                str(out),
            ],
            cwd=ROOT,
            env=env_with_capability(capability),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(_metrics_without_time(out))
    assert len(runs[0]) == 3 and runs[0][-1]["global_accuracy"] > runs[0][0]["global_accuracy"]
    assert runs[0] == runs[1]
