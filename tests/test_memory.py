"""The memory model: planner == ledger (a real training step), device fit, CLI, enforcement."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import ROOT, SHARED_MODELS
from test_sparse import tiny_qmodel

from fedtiny.budget.memory import measure_step, memory_report, peak_sram_bytes, plan
from fedtiny.budget.schemes import parse_scheme, resolve
from fedtiny.devices import PROFILES, get_profile
from fedtiny.errors import ScenarioError
from fedtiny.int8.graph import QConv, replace_head

needs_shared = pytest.mark.skipif(not SHARED_MODELS.is_dir(), reason="../shared/models/tiny-training not present")

TINY_SCHEMES = [
    "full",
    "bias-only",
    "last-k:2",
    '{"n_bias_update": 9, "weight_update_idx": [5, 6, 8], "weight_update_ratio": [0.5, 0.5, 1]}',
    '{"n_bias_update": 2, "weight_update_idx": [2], "weight_update_ratio": [0.25]}',
]


@pytest.mark.parametrize("scheme", TINY_SCHEMES)
@pytest.mark.parametrize("reorder, inplace, fuse", [(True, True, True), (False, False, False), (True, False, True)])
def test_planner_equals_ledger_tiny_ir(scheme, reorder, inplace, fuse):
    q = tiny_qmodel()
    r = resolve(parse_scheme(scheme), q)
    opts = dict(reorder=reorder, inplace_depthwise=inplace, fuse_frozen=fuse)
    rep = memory_report(q, r, (1, 8, 8), momentum=0.9, **opts)
    led = measure_step(q, r, torch.rand(1, 1, 8, 8), torch.tensor([3]), momentum=0.9, **opts)
    assert rep.peak_sram_bytes == led.peak, (rep.peak_at, led.peak_at)
    assert peak_sram_bytes(q, r, (1, 8, 8), momentum=0.9, **opts) == rep.peak_sram_bytes  # the search's shortcut
    assert rep.peak_at == led.peak_at
    assert led.current == rep.persistent_bytes  # everything but persistent state was released
    # Not just the peak: the same buffers, in the same order, as the real step.
    planned, _ = plan(q, (1, 8, 8), momentum=0.9, reorder=reorder, inplace_depthwise=inplace, fuse_frozen=fuse)
    assert planned.events == led.events


def test_the_step_checks_planned_sizes_against_real_tensors(monkeypatch):
    """An op whose events misstate what it saves is caught while the real step runs."""
    q = tiny_qmodel()
    r = resolve(parse_scheme("full"), q)
    events = QConv.events

    def wrong(self, *args, **kwargs):
        ev = events(self, *args, **kwargs)
        return dataclasses.replace(ev, saved=ev.saved + 1) if ev.saved else ev

    monkeypatch.setattr(QConv, "events", wrong)
    with pytest.raises(RuntimeError, match="saved:conv0: planned"):
        measure_step(q, r, torch.rand(1, 1, 8, 8), torch.tensor([3]))


def test_planner_equals_ledger_fp32_head_and_batch():
    q = replace_head(tiny_qmodel(), 10, precision="fp32")
    r = resolve(parse_scheme("last-k:3"), q)
    rep = memory_report(q, r, (1, 8, 8), optimizer="adam", batch=4)
    led = measure_step(q, r, torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), optimizer="adam")
    assert rep.peak_sram_bytes == led.peak


@needs_shared
@pytest.mark.parametrize("model", ["mcunet-5fps", "proxyless-w0.3"])
@pytest.mark.parametrize("sid", ["s1", "s3", "s5"])
def test_planner_equals_ledger_published(model, sid):
    from fedtiny.int8.modelfile import from_tiny_training
    from fedtiny.int8.zoo import read_tiny_training

    q = replace_head(from_tiny_training(read_tiny_training(SHARED_MODELS / f"{model}.pkl")), 10)
    r = resolve(parse_scheme(f"{SHARED_MODELS / 'schemes.json'}#{model}/{sid}"), q)
    rep = memory_report(q, r, (3, 128, 128))
    led = measure_step(q, r, torch.rand(1, 3, 128, 128), torch.tensor([1]))
    assert rep.peak_sram_bytes == led.peak
    # Every published scheme trains within 256KB with reordering; the full update does not.
    assert rep.peak_sram_bytes <= 256 * 1024
    full = memory_report(q, resolve(parse_scheme("full"), q), (3, 128, 128))
    assert full.peak_sram_bytes > 256 * 1024


def test_reordering_and_sparsity_lower_the_peak():
    q = tiny_qmodel()
    full = resolve(parse_scheme("full"), q)
    a = memory_report(q, full, (1, 8, 8), reorder=True).peak_sram_bytes
    b = memory_report(q, full, (1, 8, 8), reorder=False).peak_sram_bytes
    c = memory_report(q, resolve(parse_scheme("last-k:1"), q), (1, 8, 8)).peak_sram_bytes
    assert c < a < b


def test_paper_accounting_counts_the_published_parts():
    q = tiny_qmodel()
    r = resolve(parse_scheme('{"n_bias_update": 1, "weight_update_idx": [8], "weight_update_ratio": [0.5]}'), q)
    rep = memory_report(q, r, (1, 8, 8), accounting="paper")
    b = rep.breakdown
    assert b["saved_inputs"] == 48 * 4 * 4  # half of conv8's 96 input channels, int8, at 4x4
    assert b["updated_weights"] == 32 * 48 + 10 * 32  # conv8's trained slice + the classifier
    assert b["updated_biases"] == 4 * (32 + 10)
    assert b["relu_masks"] == 0  # conv8 is a projection (no ReLU)
    assert b["classifier_input"] == 32
    assert rep.peak_sram_bytes == sum(b.values())


def test_device_profiles():
    for name in ("stm32f746", "stm32h743", "stm32f411", "nrf52840", "rp2040", "esp32-s3", "mcu-256kb"):
        p = PROFILES[name]
        assert p.sram_bytes > 0 and p.flash_bytes > 0 and p.clock_mhz > 0
    assert get_profile("nRF52840").sram_bytes == 256 * 1024
    with pytest.raises(ScenarioError, match="unknown profile"):
        get_profile("z80")


def test_quickstart_client_fits_its_device_and_full_does_not():
    """The whole client (device.fit = "device") of the quickstart's scheme fits an nRF52832's 64 KB; the full
    update's does not, although one step of it would (the publication's count, device.fit = "step")."""
    from fedtiny.federated.task import client_profile, cloud_model, make_task
    from fedtiny.scenario import load_scenario, parse_overrides
    from fedtiny.server_setup import resolve_scheme

    for scheme, fits in (("", True), ("full", False)):
        over = parse_overrides([f"train.scheme={scheme}"] if scheme else []) | {"model.pretrain_epochs": 1}
        s = load_scenario(ROOT / "scenarios" / "quickstart.toml", over)
        task = make_task(s)
        task = resolve_scheme(task, cloud_model(task)[0])
        profile = client_profile(s, 0)
        whole = task.device_memory(profile, 72)
        assert whole.fits is fits and task.memory(profile).fits is True
        assert whole.device_ram_bytes > task.memory(profile).peak_sram_bytes
        assert whole.device_ram_bytes == sum(whole.ram.values()) and whole.ram["optimizer state"] == 0
        if not fits:
            assert "does not fit nrf52832: device RAM" in whole.reason()


def test_device_count_holds_what_a_round_keeps():
    """Batches of 16 add the accumulators whatever device.accumulate says; momentum, a float64 residual and
    the ranking's buffers are counted; the compact residual is 2 B per int8 position and 4 per int32 one."""
    from fedtiny.budget.device_memory import ClientLoad, client_memory
    from fedtiny.federated.task import client_profile, cloud_model, make_task
    from fedtiny.scenario import load_scenario
    from fedtiny.server_setup import resolve_scheme

    s = load_scenario(ROOT / "scenarios" / "quickstart.toml")
    task = make_task(s)
    task = resolve_scheme(task, cloud_model(task)[0])
    prof = client_profile(s, 0)
    small = task.device_memory(prof, 72)
    weights = sum(len(v) for n, v in task.slices.items() if n.endswith("weight"))
    biases = sum(len(v) for n, v in task.slices.items() if n.endswith("bias"))
    assert small.ram["uplink state"] == (weights + 4 * biases) + (2 * weights + 4 * biases)
    base = dict(batch_size=1, micro_batch=1, samples=72, sample_bytes=64, uplink="sparse", density=0.1)
    one = client_memory(task.model, task.memory(prof).arena_bytes, ClientLoad(**base, residual="float64"))
    assert one.ram["uplink state"] == (weights + 4 * biases) + 8 * (weights + biases)
    big = dataclasses.replace(s, train=dataclasses.replace(s.train, batch_size=16, momentum=0.9))
    t16 = make_task(big)
    t16 = resolve_scheme(t16, cloud_model(t16)[0])
    whole = t16.device_memory(prof, 72)
    acc = 4 * (weights + biases)  # fp32 accumulators of every trained element
    with_acc = memory_report(t16.model, t16.scheme, (1, 8, 8), momentum=0.9, accumulate=True)
    assert whole.ram["step arena"] == with_acc.arena_bytes > small.ram["step arena"] + acc - 1024
    assert with_acc.breakdown["accumulators"] == acc
    assert whole.ram["optimizer state"] == 4 * sum(int(np.prod(shape)) for _, shape, _ in t16.uplink_spec)
    assert whole.ram["input batch"] == 16 * 8 and not whole.fits  # pointers to the samples and labels


def test_cli_memory(tmp_path, cli):
    scheme = '{"n_bias_update": 9, "weight_update_idx": [5, 6, 8], "weight_update_ratio": [0.5, 0.5, 1]}'
    proc = cli(
        "memory",
        "--model",
        "tiny-ir",
        "--scheme",
        scheme,
        "--device",
        "nrf52832",
        "--momentum",
        "0.9",
        "--fit",
        "step",
        "--json",
        "--plot",
        str(tmp_path / "m.png"),
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in (
        "peak_sram_bytes",
        "flash_bytes",
        "saved_for_backward_bytes",
        "device",
        "sram_bytes",
        "fits",
        "layers",
        "device_ram_bytes",
        "device_ram",
        "device_flash_bytes",
        "device_fits",
    ):
        assert key in out
    assert out["fits"] is True and out["device"] == "nrf52832" and len(out["layers"]) > 9
    # one step fits; the whole client with momentum and a float64 residual does not (exit 3 by default)
    assert out["device_fits"] is False and out["device_ram_bytes"] == sum(out["device_ram"].values())
    proc = cli("memory", "--model", "tiny-ir", "--scheme", scheme, "--device", "nrf52832", "--momentum", "0.9")
    assert proc.returncode == 3 and "device RAM" in proc.stderr
    proc = cli(
        "memory",
        "--model",
        "tiny-ir",
        "--scheme",
        scheme,
        "--device",
        "nrf52832",
        "--residual",
        "compact",
        "--samples",
        "72",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["device_fits"] is True and out["peak_sram_bytes"] < out["device_ram_bytes"] <= 64 * 1024
    assert (tmp_path / "m.png").stat().st_size > 0
    proc = cli("memory", "--model", "tiny-ir", "--scheme", "full", "--device", "stm32g031")
    assert proc.returncode == 3
    assert proc.stderr.strip().count("\n") == 0 and "does not fit stm32g031" in proc.stderr
    proc = cli("memory", "--model", "tiny-ir", "--scheme", '{"weight_update_idx": [42]}')
    assert proc.returncode == 2 and "out of range" in proc.stderr and "Traceback" not in proc.stderr


def test_simulation_refuses_clients_whose_step_does_not_fit(tmp_path, cli):
    """A mixed fleet: the 8KB devices refuse to train, the round goes on with the others."""
    proc = cli(
        "run",
        str(ROOT / "scenarios" / "quickstart.toml"),
        "--set",
        "run.clients=2",
        "--set",
        "run.rounds=1",
        "--set",
        "model.pretrain_epochs=3",
        "--set",
        "device.profiles=nrf52832,stm32g031",
        "--out",
        str(tmp_path),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["refused_clients_total"] == 1
    rec = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert [c["partition_id"] for c in rec["clients"]] == [0]
    (refusal,) = rec["refused"]
    assert refusal["partition_id"] == 1 and refusal["device"] == "stm32g031"
    assert refusal["device_ram_bytes"] > refusal["peak_sram_bytes"] > refusal["sram_bytes"] == 8192
    assert "does not fit" in refusal["reason"]


def test_a_run_where_every_client_refuses_reports_it(tmp_path, cli):
    """Nothing fits: no update crosses the radio, the run still ends with its summary."""
    import json

    proc = cli(
        "run",
        str(ROOT / "scenarios" / "quickstart.toml"),
        "--set",
        "run.clients=2",
        "--set",
        "run.rounds=1",
        "--set",
        "model.pretrain_epochs=1",
        "--set",
        "train.scheme=full",
        "--out",
        str(tmp_path),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)  # --json: the JSON alone on stdout, the table on stderr
    assert summary["refused_clients_total"] == 2 and summary["uploads"] == 0
    assert summary["uplink_ratio_vs_dense_fp32"] is None and "nothing sent" in proc.stderr
    # the full update's whole client does not fit the nRF52832 (one step of it would: the publication's count)
    assert summary["device_ram_bytes_max"] > 64 * 1024 > summary["peak_sram_bytes_max"]


MLPERF = SHARED_MODELS.parent / "mlperf-tiny"


@pytest.mark.parametrize("name", ["vww_96_int8", "kws_ref_model", "pretrainedResnet_quant", "ad01_int8"])
@pytest.mark.parametrize(
    "scheme", ["full", "last-k:3", '{"n_bias_update": 4, "weight_update_idx": [1], "weight_update_ratio": [0.5]}']
)
def test_planner_equals_ledger_imported_tflite(name, scheme):
    """Any graph (residual ADDs, FC-only, reshapes, windowed pools, non-square kernels): planner == real step."""
    from fedtiny.int8.tfl_convert import read_tflite_model

    path = MLPERF / f"{name}.tflite"
    if not path.exists():
        pytest.skip(f"{path} absent")
    q = replace_head(read_tflite_model(path), 5)
    r = resolve(parse_scheme(scheme), q)
    rep = memory_report(q, r, q.input_shape, momentum=0.9)
    led = measure_step(q, r, torch.rand(1, *q.input_shape), torch.tensor([2]), momentum=0.9)
    assert rep.peak_sram_bytes == led.peak, (rep.peak_at, led.peak_at)
    planned, _ = plan(q, q.input_shape, momentum=0.9)
    assert planned.events == led.events
