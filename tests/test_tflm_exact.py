"""fedtiny's int8 graph against TensorFlow Lite Micro's reference kernels: the same integers on every tensor.

The oracle is TFLM itself (the ``tflite-micro`` package's interpreter). Models: the MLPerf Tiny
reference ``.tflite`` files imported, the tiny-training models and tiny-ir exported.
"""

import numpy as np
import pytest
import torch
from conftest import SHARED_MODELS

from fedtiny.int8.oracle import tflm_invoke, tflm_tensors
from fedtiny.int8.tfl_convert import from_tflite, to_tflite
from fedtiny.int8.tflite import read_tflite, write_tflite

MLPERF = SHARED_MODELS.parent / "mlperf-tiny"
MLPERF_FILES = ["vww_96_int8", "kws_ref_model", "pretrainedResnet_quant", "ad01_int8"]


def _nchw(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(x.astype(np.float32))
    return t.permute(0, 3, 1, 2) if t.dim() == 4 else t[:, :, None, None]


def _as_tflite(y: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """A fedtiny NCHW tensor in TFLite's layout and shape."""
    return y.permute(0, 2, 3, 1).reshape(shape).numpy().astype(np.int64)


def _random_inputs(shape, n, seed=0):
    return np.random.default_rng(seed).integers(-128, 128, (n, *shape[1:])).astype(np.int8)


@pytest.mark.parametrize("name", MLPERF_FILES)
def test_mlperf_tiny_every_tensor_equals_tflm(name):
    path = MLPERF / f"{name}.tflite"
    if not path.exists():
        pytest.skip(f"{path} absent")
    data = path.read_bytes()
    g = read_tflite(data)
    names: dict[int, str] = {}
    model = from_tflite(g, str(path), names)
    x = _random_inputs(g.tensors[g.inputs[0]].shape, 32)
    want = tflm_invoke(data, x)
    got = _as_tflite(model.int8_forward(_nchw(x)), want.shape)
    assert int((got != want).sum()) == 0
    compared = 0
    for seed in (1, 2):
        x1 = _random_inputs(g.tensors[g.inputs[0]].shape, 1, seed)
        ref = tflm_tensors(data, x1)
        ours = model.int8_tensors(_nchw(x1))
        for i, tname in names.items():
            diff = int((_as_tflite(ours[tname], ref[i].shape) != ref[i]).sum())
            assert diff == 0, f"{name}: tensor {i} ({tname}) differs in {diff} elements"
            compared += 1
    assert compared == 2 * (len(g.ops) + 1)  # every op's output and the input


@pytest.mark.parametrize("name", ["mcunet-5fps", "mbv2-w0.35", "proxyless-w0.3"])
def test_tiny_training_models_exported_run_in_tflm_with_the_same_integers(name):
    from fedtiny.int8.modelfile import read_model

    path = SHARED_MODELS / f"{name}.pkl"
    if not path.exists():
        pytest.skip(f"{path} absent")
    model = read_model(path)
    data = write_tflite(to_tflite(model))
    x = _random_inputs((1, *model.input_shape), 6)  # NCHW
    want = tflm_invoke(data, x.transpose(0, 2, 3, 1))
    got = _as_tflite(model.int8_forward(torch.from_numpy(x.astype(np.float32))), want.shape)
    assert int((got != want).sum()) == 0
    # Every tensor too: these models have int32-saturated biases on dead channels (2^31 - 1,
    # which float32 would hold as 2^31 and wrap), so a wrong bias shows only inside the graph.
    from fedtiny.tools.models import check_against_tflm

    r = check_against_tflm(path, inputs=2)
    assert r["tensor_elements_differing"] == 0 and r["output_elements_differing"] == 0
    assert r["tensors_compared"] >= len(model.convs())
    # The symmetric padding of stride-2 convolutions went out as PAD + VALID and comes back folded.
    back = from_tflite(read_tflite(data))
    assert [c.padding for c in back.convs()] == [c.padding for c in model.convs()]


def test_trained_tiny_ir_exports_exactly_every_tensor():
    """A PTQ'd tiny-ir after real training steps (weights moved, stride-2 symmetric padding) matches TFLM."""
    from test_int8 import small_qmodel

    from fedtiny.data import load_source
    from fedtiny.federated.train import seeded, train_local

    q = small_qmodel()
    data = load_source("digits").subset(np.arange(1, 300, 2))
    train_local(q, data, epochs=1, batch_size=16, lr=0.01, optimizer="sgd+qas", momentum=0.0, gen=seeded(0))
    q.input_shape = (1, 8, 8)
    g = to_tflite(q)
    blob = write_tflite(g)
    assert any(op.op == "PAD" for op in g.ops)
    x = _random_inputs((1, 1, 8, 8), 16)
    want = tflm_invoke(blob, x.transpose(0, 2, 3, 1))
    got = _as_tflite(q.int8_forward(torch.from_numpy(x.astype(np.float32))), want.shape)
    assert int((got != want).sum()) == 0
    ref = tflm_tensors(blob, x[:1].transpose(0, 2, 3, 1))
    ours = q.int8_tensors(torch.from_numpy(x[:1].astype(np.float32)))
    for i, t in enumerate(g.tensors):
        if t.name in ours:
            assert np.array_equal(_as_tflite(ours[t.name], ref[i].shape), ref[i]), t.name


@pytest.mark.parametrize("name", ["pretrainedResnet_quant", "vww_96_int8"])
def test_a_new_head_before_softmax_exports_exactly(name):
    """Transfer learning replaces a .tflite's FULLY_CONNECTED head; the SOFTMAX after it follows its scale."""
    from fedtiny.int8.graph import QSoftmax, replace_head
    from fedtiny.tools.models import compare_with_tflm

    path = MLPERF / f"{name}.tflite"
    if not path.exists():
        pytest.skip(f"{path} absent")
    model = from_tflite(read_tflite(path.read_bytes()), str(path))
    replace_head(model, 3, seed=1)
    r = compare_with_tflm(model, inputs=8)
    soft = [model.op(n.op) for n in model.nodes if isinstance(model.op(n.op), QSoftmax)]
    assert soft and soft[0].x_scale == model.classifier.y_scale
    assert r["output_shape"] == [8, 3]
    assert r["output_elements_differing"] == 0 and r["tensor_elements_differing"] == 0, r


def test_large_and_saturated_biases_are_exact(tmp_path, cli):
    """int32 biases beyond float32's 2^24 and at the int32 limits: the same integers as TFLM (``zoo check``)."""
    from test_int8 import small_qmodel

    from fedtiny.int8.modelfile import save_qmodel

    q = small_qmodel()
    q.input_shape = (1, 8, 8)
    convs = q.convs()
    with torch.no_grad():
        convs[0].weight[0].zero_()  # a dead channel whose output is its saturated bias
        convs[0].bias[0] = 2**31 - 1
        convs[0].bias[1] = 2**24 + 1
        convs[1].bias[2] = -(2**31)
        convs[1].bias[3] = -(2**25) - 3
    path = save_qmodel(q, tmp_path / "big-bias.safetensors")
    r = cli("zoo", "check", str(path), "--inputs", "16", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    import json

    out = json.loads(r.stdout)
    assert out["output_elements_differing"] == 0 and out["tensor_elements_differing"] == 0
    assert out["tensors_compared"] >= len(convs) and out["exported"] is True


def test_zoo_cli_import_run_export(tmp_path, cli):
    path = MLPERF / "pretrainedResnet_quant.tflite"
    if not path.exists():
        pytest.skip(f"{path} absent")
    x = _random_inputs((1, 32, 32, 3), 32, seed=3)
    np.save(tmp_path / "x.npy", x)
    r = cli("zoo", "run", str(path), "--input", str(tmp_path / "x.npy"), "--out", str(tmp_path / "y.npy"))
    assert r.returncode == 0, r.stderr
    y = np.load(tmp_path / "y.npy")
    assert y.dtype == np.int8 and np.array_equal(y, tflm_invoke(path.read_bytes(), x))
    # import -> fedtiny file -> export: TFLM runs the export with the same outputs.
    assert cli("zoo", "import", str(path), "--out", str(tmp_path / "r.safetensors")).returncode == 0
    r = cli("zoo", "export", str(tmp_path / "r.safetensors"), "--out", str(tmp_path / "r.tflite"))
    assert r.returncode == 0, r.stderr
    assert np.array_equal(tflm_invoke((tmp_path / "r.tflite").read_bytes(), x), y)
    # A fedtiny file runs in NCHW.
    np.save(tmp_path / "xc.npy", np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    r = cli(
        "zoo",
        "run",
        str(tmp_path / "r.safetensors"),
        "--input",
        str(tmp_path / "xc.npy"),
        "--out",
        str(tmp_path / "yc.npy"),
    )
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(tmp_path / "yc.npy"), y)
    # Wrong layout: one line naming the expected shape, exit 2.
    r = cli("zoo", "run", str(path), "--input", str(tmp_path / "xc.npy"), "--out", str(tmp_path / "bad.npy"))
    assert r.returncode == 2 and "expected int8 of shape [N, 32, 32, 3]" in r.stderr


def test_unsupported_operator_is_one_line_exit_2(tmp_path, cli):
    path = MLPERF / "kws_ref_model.tflite"
    if not path.exists():
        pytest.skip(f"{path} absent")
    g = read_tflite(path.read_bytes())
    k = next(i for i, op in enumerate(g.ops) if op.op == "AVERAGE_POOL_2D")
    g.ops[k].op = "L2_POOL_2D"
    (tmp_path / "m.tflite").write_bytes(write_tflite(g))
    r = cli("zoo", "import", str(tmp_path / "m.tflite"), "--out", str(tmp_path / "m.safetensors"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"operator {k} is L2_POOL_2D" in lines[0]
    (tmp_path / "junk.tflite").write_bytes(path.read_bytes()[:1000])
    r = cli("zoo", "info", str(tmp_path / "junk.tflite"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_fast_requantization_equals_tflm_formula():
    """The per-channel fast path gives MultiplyByQuantizedMultiplier's integers (ties, left shifts, wide sums)."""
    from fedtiny.int8.kernels import multiply_by_quantized_multiplier, quantize_multipliers, requantize_channels

    gen = torch.Generator().manual_seed(0)
    for trial in range(40):
        reals = np.exp(np.random.default_rng(trial).uniform(np.log(1e-6), np.log(40.0), 16))
        m, s = (torch.as_tensor(v, dtype=torch.int64) for v in quantize_multipliers(reals))
        big = [2**31 - 1, 2**20, 2**25, 300][trial % 4]
        x = torch.randint(-big, big, (2, 16, 5, 5), generator=gen, dtype=torch.int64)
        want = multiply_by_quantized_multiplier(x, m.view(1, -1, 1, 1), s.view(1, -1, 1, 1))
        assert torch.equal(requantize_channels(x, m, s), want)
    # Every accumulator near zero (all rounding ties) for multipliers with right shifts 0..12 and a left shift.
    m = torch.tensor([2**30, 2**30 + 1, 2**31 - 1, 1518500250, 2**30 + 7], dtype=torch.int64)
    s = torch.tensor([0, -1, -5, -12, 3])
    x = torch.arange(-70000, 70000, dtype=torch.int64).view(1, 1, -1, 1).expand(1, 5, -1, 1)
    assert torch.equal(
        requantize_channels(x, m, s), multiply_by_quantized_multiplier(x, m.view(1, -1, 1, 1), s.view(1, -1, 1, 1))
    )
