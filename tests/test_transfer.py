"""Model files as the clients' network: real images at the model's input, the cloud head, clear errors."""

import json

import numpy as np
import pytest
from conftest import SHARED_MODELS

from fedtiny.data.sources import load_source
from fedtiny.int8.convert import ptq
from fedtiny.int8.modelfile import read_model, save_qmodel
from fedtiny.int8.transfer import fit_head
from fedtiny.models import build_model
from fedtiny.report.runlog import read_metrics

needs_shared = pytest.mark.skipif(not SHARED_MODELS.is_dir(), reason="../shared/models/tiny-training not present")


def test_lfw_faces_loads_with_shapes_and_labels():
    d = load_source("lfw-faces")
    assert d.x.shape == (200, 1, 25, 25) and d.x.dtype == np.float32 and 0 <= d.x.min() and d.x.max() <= 1
    assert d.num_classes == 2 and d.y.tolist() == [1] * 100 + [0] * 100
    rgb = load_source("lfw-faces", image_size=32, channels=3)
    assert rgb.x.shape == (200, 3, 32, 32)
    assert np.array_equal(rgb.x[:, 0], rgb.x[:, 2])  # grayscale replicated
    # Faces are brighter on average than the non-face patches: the labels are not shuffled.
    assert d.x[d.y == 1].mean() > d.x[d.y == 0].mean()


@pytest.fixture(scope="module")
def small_model_file(tmp_path_factory):
    """A small int8 network at 3x32x32 written as a fedtiny model file."""
    path = tmp_path_factory.mktemp("models") / "small.safetensors"
    calib = load_source("lfw-faces", image_size=32, channels=3).x[::10]
    save_qmodel(ptq(build_model("tiny-ir", 3, 5, width=8, image_size=32, seed=0), calib), path)
    return path


def scenario_text(model_file: str) -> str:
    return (
        f'[run]\nclients = 2\nrounds = 2\n[data]\nsource = "lfw-faces"\nimage_size = 32\nchannels = 3\n'
        f'[model]\nfile = "{model_file}"\npretrain_epochs = 5\n[train]\nscheme = "last-k:2"\n'
    )


def test_model_file_records_its_input_and_the_head_is_fitted(small_model_file):
    q = read_model(small_model_file)
    assert q.input_shape == (3, 32, 32)
    from fedtiny.int8.graph import replace_head

    data = load_source("lfw-faces", image_size=32, channels=3)
    q = replace_head(q, 2)
    fit = fit_head(q, data.x, data.y, epochs=30, lr=0.05, batch_size=32, seed=0)
    assert fit.float_train_accuracy > 0.7  # a linear probe separates faces from non-faces
    assert abs(fit.train_accuracy - fit.float_train_accuracy) < 0.05  # the int8 head keeps it


def test_a_model_file_trains_in_a_simulation(tmp_path, cli, small_model_file):
    path = tmp_path / "s.toml"
    path.write_text(scenario_text(small_model_file.name))
    (tmp_path / small_model_file.name).write_bytes(small_model_file.read_bytes())  # relative to the scenario
    proc = cli("run", str(path), "--out", str(tmp_path / "run"), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)  # --json: stdout is the JSON alone
    assert summary["rounds"] == 2 and summary["uploads"] == 4 and summary["rejected_updates_total"] == 0
    assert summary["lr_source"] == "public split"  # train.lr left at 0: the server chose it
    recs = read_metrics(tmp_path / "run")
    assert all(c["steps"] > 0 for r in recs[1:] for c in r["clients"])
    assert (
        summary["model_parameters"]
        == sum(p.numel() for p in read_model(small_model_file).parameters()) - 5 * 16 - 5 + 2 * 16 + 2
    )
    # The run's final model: exported, TFLM computes the same integers and scores the run's final accuracy.
    r = cli("zoo", "check", str(tmp_path / "run"), "--inputs", "8", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    check = json.loads(r.stdout)
    assert check["output_elements_differing"] == 0 and check["tensor_elements_differing"] == 0
    assert check["test_accuracy_tflm"] == pytest.approx(summary["final_accuracy"], abs=1e-9)
    r = cli("zoo", "export", str(tmp_path / "run"), "--out", str(tmp_path / "final.tflite"))
    assert r.returncode == 0 and (tmp_path / "final.tflite").stat().st_size > 0, r.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.file=missing.pkl", "model.file: .*missing.pkl: no such model file"),
        ("model.file=s.toml", "model.file: .*s.toml: not a safetensors model file"),
        (
            "data.image_size=16",
            "model.file: .* takes 3x32x32 images but the data gives 3x16x16: set data.image_size = 32"
            r".*or train a model for 3x16x16 images: model.file = \"\" and model.head = \"new\"",
        ),
        ("data.channels=1", "takes 3x32x32 images but the data gives 1x32x32: .*data.channels = 3"),
    ],
)
def test_a_bad_model_file_is_one_line_exit_2(tmp_path, cli, small_model_file, override, message):
    import re

    path = tmp_path / "s.toml"
    path.write_text(scenario_text(str(small_model_file)))
    proc = cli("run", str(path), "--set", override)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), proc.stderr


def test_last_k_fit_is_the_largest_last_k_that_fits_the_smallest_device():
    """The whole device (device.fit = "device", the default; with the largest partition's samples) decides."""
    from fedtiny.budget.schemes import parse_scheme, resolve
    from fedtiny.federated.task import make_task
    from fedtiny.models import model_arrays
    from fedtiny.scenario import scenario_from_dict
    from fedtiny.server_setup import resolve_scheme

    s = scenario_from_dict(
        {
            "run": {"clients": 2},
            "train": {"scheme": "last-k:fit", "momentum": 0.9},
            "device": {"profiles": ["stm32f746", "nrf52832"]},
        }
    )  # 320KB and 64KB
    task = make_task(s)
    fitted = resolve_scheme(task, model_arrays(task.model))
    k = int(fitted.scheme.name.split(":")[1])
    small = __import__("fedtiny.devices", fromlist=["get_profile"]).get_profile("nrf52832")
    samples = task.federation.largest_partition()
    fits = [
        make_task(s, resolve(parse_scheme(f"last-k:{n}"), task.model)).device_memory(small, samples).fits
        for n in (k, k + 1)
    ]
    assert 0 < k < len(task.model.convs()) and fits == [True, False]


def test_scheme_ids_follow_the_model_file(tmp_path, small_model_file):
    from fedtiny.scenario import scenario_from_dict

    s = scenario_from_dict({"model": {"file": str(small_model_file)}, "train": {"scheme": "last-k:1"}})
    assert s.scheme_text == "last-k:1"
    schemes = tmp_path / "schemes.json"
    schemes.write_text(
        json.dumps(
            {
                "schemes": {
                    "small": [
                        {"id": "small/s1", "n_bias_update": 2, "weight_update_idx": [], "weight_update_ratio": []}
                    ]
                }
            }
        )
    )
    s = scenario_from_dict({"model": {"file": str(small_model_file)}, "train": {"scheme": f"{schemes}#{{model}}/s1"}})
    assert s.scheme_text.endswith("#small/s1")


def test_bench_train_times_the_int8_step_against_its_float_twin(cli, small_model_file):
    proc = cli(
        "bench",
        "train",
        "--model",
        str(small_model_file),
        "--scheme",
        "last-k:2",
        "--steps",
        "2",
        "--repeat",
        "1",
        "--batch-size",
        "8",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["input"] == [3, 32, 32] and r["steps"] == 2 and r["scheme"] == "last-k:2"
    assert r["int8_samples_per_s"] > 0 and r["float_samples_per_s"] > 0
    assert r["int8_vs_float_time_ratio"] == pytest.approx(r["float_samples_per_s"] / r["int8_samples_per_s"], rel=0.02)


def test_learning_rate_comes_from_the_scenario_the_model_or_the_public_split(tmp_path, small_model_file):
    from fedtiny.federated.lr import LR_GRID, MODEL_DEFAULT_LR
    from fedtiny.federated.task import cloud_model, make_task
    from fedtiny.scenario import load_scenario
    from fedtiny.server_setup import choose_lr

    path = tmp_path / "s.toml"
    path.write_text(scenario_text(str(small_model_file)))
    task = make_task(load_scenario(path))
    state, _ = cloud_model(task)
    chosen = choose_lr(task, state)
    assert chosen.source == "public split" and chosen.lr in LR_GRID and set(chosen.scores) == set(LR_GRID)
    low = min(loss for _, loss in chosen.scores.values())
    assert chosen.scores[chosen.lr][1] == low  # the lowest held-out loss ...
    assert all(lr <= chosen.lr for lr, (_, loss) in chosen.scores.items() if loss == low)  # ... the largest on a tie
    assert choose_lr(task, state) == chosen  # seeded: a resumed run chooses the same
    fixed = make_task(load_scenario(path, {"train.lr": 0.01}))
    assert choose_lr(fixed, state).source == "scenario" and choose_lr(fixed, state).lr == 0.01
    path.write_text('[run]\nclients = 2\n[data]\nsource = "digits"\n')
    builtin = choose_lr(make_task(load_scenario(path)), {})
    assert (builtin.lr, builtin.source) == (MODEL_DEFAULT_LR, "model default")


def test_bench_qas_widens_each_grid_until_the_best_rate_is_inside(tmp_path, cli, small_model_file):
    # lr-center 1e-9 puts every method's two-rate grid far below a useful rate: each grid must grow
    # upwards (3x a step) until its best rate is not the largest tried, or say it is still at an edge.
    scenario = tmp_path / "s.toml"
    scenario.write_text(scenario_text(str(small_model_file)).replace("pretrain_epochs = 5", "pretrain_epochs = 2"))
    proc = cli(
        "bench",
        "qas",
        "--model",
        str(small_model_file),
        "--scheme",
        "last-k:2",
        "--seeds",
        "2",
        "--epochs",
        "1",
        "--lr-points",
        "2",
        "--lr-center",
        "1e-9",
        "--scenario",
        str(scenario),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["seeds"] == 2 and len(r["per_seed"]) == 2
    for row in r["per_seed"]:
        for m in ("fp32", "int8_sgd", "int8_qas"):
            grid = row["lr_grid"][m]
            assert len(grid) > 2  # widened: the starting grid's best was at its top
            assert grid == sorted(grid) and all(b == pytest.approx(3 * a) for a, b in zip(grid, grid[1:]))
            assert row["best_lr"][m] in grid
            if m not in row["best_lr_at_edge"]:
                assert grid[0] < row["best_lr"][m] < grid[-1]
    for m in ("fp32", "int8_sgd", "int8_qas"):
        lo, hi = r[f"{m}_accuracy_ci95"]
        assert lo <= r[f"{m}_accuracy_mean"] <= hi
    d = r["paired"]["int8_qas - int8_sgd"]
    diffs = [row["int8_qas_accuracy"] - row["int8_sgd_accuracy"] for row in r["per_seed"]]
    assert d["mean"] == pytest.approx(sum(diffs) / 2, abs=1e-4)
    assert d["verdict"] == (
        "no difference" if d["ci95"][0] <= 0 <= d["ci95"][1] else "higher" if d["ci95"][0] > 0 else "lower"
    )
