"""The frozen prefix: training and evaluating from the first trained op gives the uncached numbers, bit for bit."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT as REPO
from conftest import SHARED_MODELS

from fedtiny.budget.schemes import apply_scheme, parse_scheme, resolve
from fedtiny.compress.dense import pack_dense
from fedtiny.compress.downlink import FULL
from fedtiny.data.sources import load_source
from fedtiny.federated.client import local_round
from fedtiny.federated.task import client_profile
from fedtiny.federated.train import evaluate, pretrain, seeded, train_local
from fedtiny.int8.convert import ptq
from fedtiny.int8.prefix import STATE_PREFIX, PrefixStore, prefix_cache
from fedtiny.models import build_model, load_arrays, model_arrays
from fedtiny.scenario import load_scenario
from fedtiny.search.contrib import AnalysisSettings, analyse
from fedtiny.server_setup import server_task


@pytest.fixture(scope="module")
def digits_model():
    data = load_source("digits")
    fp32 = build_model("tiny-ir", 1, 10, width=8, image_size=8, seed=0)
    pretrain(fp32, type(data)(data.x[1000:], data.y[1000:], 10, "public"), epochs=2, lr=0.05, batch_size=32, seed=0)
    return ptq(fp32, data.x[1000:1100]), data


def _train(model, state, data, scheme: str, prefixes):
    load_arrays(model, state)
    apply_scheme(model, resolve(parse_scheme(scheme), model))
    fit = train_local(
        model,
        data,
        epochs=2,
        batch_size=16,
        lr=0.05,
        optimizer="sgd+qas",
        gen=seeded(3, 1, 0),
        gradients="exact",
        prefixes=prefixes,
    )
    return fit, evaluate(model, data, prefixes=prefixes), model_arrays(model)


@pytest.mark.parametrize(
    "scheme, start, boundary",
    [
        ("last-k:3", 7, ("conv5",)),
        ("last-k:2", 8, ("conv6", "conv5")),  # inside a residual block: the skip crosses into the trained part
    ],
)
def test_training_from_the_prefix_is_the_uncached_training_bit_for_bit(digits_model, scheme, start, boundary):
    model, data = digits_model
    data = type(data)(data.x[:200], data.y[:200], data.num_classes, "digits")
    state = model_arrays(model)
    ref = _train(model, state, data, scheme, None)
    assert model.first_trained_op() == start and model.boundary(start) == boundary
    store = PrefixStore()
    for _ in range(2):  # computed, then reused
        got = _train(model, state, data, scheme, store)
        assert got[0] == ref[0] and got[1] == ref[1]
        assert all(np.array_equal(got[2][k], ref[2][k]) for k in ref[2])
    assert store.misses == 1 and store.hits == 3  # one prefix of the samples, used by training and evaluation
    (item,) = store.items
    assert item.start == start and tuple(item.tensors) == boundary
    assert all(t.dtype == torch.int8 and t.shape[0] == len(data) for t in item.tensors.values())


def test_a_changed_prefix_is_not_reused(digits_model):
    model, data = digits_model
    data = type(data)(data.x[:100], data.y[:100], data.num_classes, "digits")
    state = model_arrays(model)
    store = PrefixStore()
    _train(model, state, data, "last-k:3", store)
    changed = dict(state)
    changed["conv1.bias"] = state["conv1.bias"] + 5  # a frozen op's value: the cached outputs are stale
    ref = _train(model, changed, data, "last-k:3", None)
    got = _train(model, changed, data, "last-k:3", store)
    assert store.misses == 2
    assert all(np.array_equal(got[2][k], ref[2][k]) for k in ref[2]) and got[1] == ref[1]
    # other samples: another prefix; a later start is advanced from an earlier prefix of the same samples
    _train(model, changed, type(data)(data.x[:50], data.y[:50], 10, "d"), "last-k:3", store)
    assert store.misses == 3
    got = _train(model, changed, data, "last-k:2", store)
    assert got[2].keys() == ref[2].keys() and store.misses == 4
    with prefix_cache(False):
        again = _train(model, changed, data, "last-k:2", store)
    assert all(np.array_equal(got[2][k], again[2][k]) for k in got[2]) and store.misses == 4


def test_a_damaged_prefix_in_a_client_state_is_recomputed(digits_model):
    model, data = digits_model
    data = type(data)(data.x[:60], data.y[:60], data.num_classes, "digits")
    state = model_arrays(model)
    store = PrefixStore()
    ref = _train(model, state, data, "last-k:3", store)
    kept = store.to_state()
    assert {k.split("/", 2)[2] for k in kept} == {"key", "start", "t/conv5"}
    for damage in (
        {"prefix/0/t/conv5": kept["prefix/0/t/conv5"][:7]},  # rows missing
        {"prefix/0/start": np.array([3])},  # another start under the same key
        {"prefix/0/key": np.frombuffer(b"\xff\xfe", np.uint8)},  # not text
        {"prefix/0/t/conv9": kept["prefix/0/t/conv5"]},
    ):  # a tensor the boundary does not have
        loaded = PrefixStore.from_state({**kept, **damage})
        got = _train(model, state, data, "last-k:3", loaded)
        assert all(np.array_equal(got[2][k], ref[2][k]) for k in ref[2])
        assert loaded.hits + loaded.misses == 2 and loaded.misses >= 1


def _client_rounds(scenario, rounds: int, enabled: bool):
    with prefix_cache(enabled):
        task, initial, _, schemes = server_task(scenario, progress=None)
        s = task.scenario
        profile = client_profile(s, 0)
        scheme = schemes.for_client(profile.name, 0, 1)
        payload, state, updates = pack_dense(initial, task.downlink_spec), {}, []
        for r in range(1, rounds + 1):
            result, state = local_round(s, 0, r, payload, kind=FULL, scheme=scheme, state=state, profile=profile)
            updates.append(result.update)
        return updates, state


def test_client_rounds_keep_their_prefix_and_send_the_same_bytes():
    s = load_scenario(REPO / "scenarios/quickstart.toml", {"train.scheme": "last-k:3", "data.source": "synthetic"})
    ref, ref_state = _client_rounds(s, 2, enabled=False)
    got, state = _client_rounds(s, 2, enabled=True)
    assert got == ref and all(len(u) > 0 for u in got)
    assert not any(k.startswith(STATE_PREFIX) for k in ref_state)
    assert any(k.startswith(STATE_PREFIX) for k in state)  # kept for the next round
    assert {k: v for k, v in state.items() if not k.startswith(STATE_PREFIX)}.keys() == ref_state.keys()


def test_the_contribution_analysis_measures_the_same_gains_from_prefixes_in_any_number_of_processes(
    tmp_path, monkeypatch, digits_model
):
    model, data = digits_model
    monkeypatch.setenv("FEDTINY_CACHE", str(tmp_path))
    train = type(data)(data.x[:120], data.y[:120], 10, "t")
    val = type(data)(data.x[120:200], data.y[120:200], 10, "v")
    settings = AnalysisSettings(epochs=1, lr=0.05, batch_size=16, ratios=(0.5, 1.0), bias_grid=(0, 2, 6))
    state = model_arrays(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every analysis process runs (float gradients: the thread count matters)
    with prefix_cache(False):
        ref = analyse(model, state, train, val, settings, cache=False)
    ticks: list[str] = []
    for workers in (1, 2):  # and in two processes: each candidate is seeded alone
        got = analyse(model, state, train, val, settings, cache=False, workers=workers, progress=ticks.append)
        assert got.bias_gain == ref.bias_gain and got.weight_gain == ref.weight_gain
        assert got.baseline_accuracy == ref.baseline_accuracy and got.evaluations == ref.evaluations
    torch.set_num_threads(threads)
    assert ticks[-1].startswith(f"contribution analysis {ref.evaluations - 1}/{ref.evaluations - 1}")
    assert any(g != 0 for row in got.weight_gain for g in row + got.bias_gain)  # not a comparison of zeros


def test_a_simulation_writes_the_same_metrics_with_and_without_prefixes(tmp_path):
    runs = {}
    for flag in ("0", "1"):
        out = tmp_path / f"cache-{flag}"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedtiny.tools.cli",
                "run",
                "scenarios/quickstart.toml",
                "--set",
                "train.scheme=last-k:3",
                "--set",
                "run.rounds=2",
                "--set",
                "run.clients=4",
                "--set",
                "run.clients_per_round=3",
                "--out",
                str(out),
                "--json",
            ],
            cwd=REPO,
            env={**os.environ, "FEDTINY_PREFIX_CACHE": flag},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        for line in lines:
            line.pop("elapsed_s")
        runs[flag] = lines
    assert runs["0"] == runs["1"] and len(runs["1"]) == 3


@pytest.mark.skipif(not SHARED_MODELS.is_dir(), reason="../shared/models not present")
@pytest.mark.parametrize(
    "model, scheme, extra",
    [
        ("mcunet-5fps", "s3", []),
        (str(SHARED_MODELS.parent / "mlperf-tiny" / "vww_96_int8.tflite"), "last-k:4", ["--set", "data.image_size=96"]),
    ],
)
def test_bench_round_on_published_models_sends_identical_updates(cli, model, scheme, extra):
    proc = cli("bench", "round", "--model", model, "--scheme", scheme, "--repeat", "1", *extra, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["identical"] is True and r["update_bytes"] > 0
    assert 0 < r["prefix_start_op"] < r["ops"] and r["prefix_state_bytes"] > 0
    assert r["speedup"] == pytest.approx(r["reference_s"] / r["fast_s"], rel=0.01)
