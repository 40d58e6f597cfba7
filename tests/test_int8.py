"""The int8 graph: integer reference agreement, BN folding, PTQ, model files, QAS training."""

import int8_reference as ref
import numpy as np
import pytest
import torch

from fedtiny.int8.convert import fold, ptq
from fedtiny.int8.graph import QAdd, QAvgPool, QConv, QModel
from fedtiny.int8.modelfile import ModelFileError, load_qmodel, save_qmodel
from fedtiny.int8.optim import QuantizedOptimizer, device_float_state
from fedtiny.models import build_model

RNG = np.random.default_rng(0)


def rand_int8(*shape, lo=-128, hi=127):
    return RNG.integers(lo, hi + 1, shape).astype(np.int8)


@pytest.mark.parametrize(
    "cin, cout, k, stride, groups, hw",
    [
        (3, 8, 3, 2, 1, 9),  # regular 3x3, stride 2, odd size
        (8, 8, 3, 1, 8, 7),  # depthwise 3x3
        (16, 16, 5, 2, 16, 8),  # depthwise 5x5 stride 2
        (8, 24, 1, 1, 1, 6),  # pointwise expand
        (40, 10, 1, 1, 1, 1),  # classifier: 1x1 conv on pooled features
    ],
)
def test_conv_matches_integer_reference(cin, cout, k, stride, groups, hw):
    w = rand_int8(cout, cin // groups, k, k, lo=-127)
    b = RNG.integers(-20000, 20000, cout).astype(np.int32)
    w_scales = RNG.uniform(1e-3, 2e-2, cout).astype(np.float32)
    xs, xz, ys, yz = 0.02, int(RNG.integers(-128, 0)), 0.05, int(RNG.integers(-20, 20))
    x = rand_int8(4, cin, hw, hw)
    conv = QConv(
        torch.from_numpy(w.astype(np.float32)),
        torch.from_numpy(b.astype(np.float32)),
        torch.from_numpy(w_scales),
        xs,
        xz,
        ys,
        yz,
        stride,
        groups,
    )
    with torch.no_grad():
        got = conv(torch.from_numpy(x.astype(np.float32))).numpy()
    want = ref.conv(x, w, b, w_scales, xs, xz, ys, yz, stride, groups)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1
    assert (got == want).mean() > 0.97  # off-by-one only on rounding ties / float accumulation
    assert np.array_equal(got, np.round(got)) and got.min() >= -128 and got.max() <= 127


def test_add_matches_integer_reference():
    a, b = rand_int8(3, 8, 5, 5), rand_int8(3, 8, 5, 5)
    add = QAdd(0.05, -3, 0.08, 7, 0.1, 2)
    with torch.no_grad():
        got = add(torch.from_numpy(a.astype(np.float32)), torch.from_numpy(b.astype(np.float32))).numpy()
    want = ref.add(a, 0.05, -3, b, 0.08, 7, 0.1, 2)
    assert np.abs(got - want).max() <= 1
    # These scales make many exact halves; torch rounds them to even, the MCU kernel up. Only there may they differ.
    exact = (a.astype(np.float64) + 3) * 0.5 + (b.astype(np.float64) - 7) * 0.8 + 2
    differ = got != want
    assert np.allclose(np.abs(exact[differ] % 1.0), 0.5)


def test_avgpool_matches_integer_reference():
    x = rand_int8(5, 16, 7, 7)
    with torch.no_grad():
        got = QAvgPool()(torch.from_numpy(x.astype(np.float32))).numpy()
    assert np.abs(got - ref.avgpool(x)).max() <= 1


def _randomize_bn(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
    return model.eval()


def test_folding_matches_unfolded_tinyir():
    model = _randomize_bn(build_model("tiny-ir", 1, 10, image_size=8))
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fold(model)(x), model(x), rtol=1e-4, atol=1e-5)


def test_folding_and_ptq_of_torchvision_mobilenet_v2():
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    model = _randomize_bn(mobilenet_v2(weights=None, width_mult=0.35, num_classes=10))
    x = torch.rand(8, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fold(model)(x), model(x), rtol=1e-4, atol=1e-5)
        q = ptq(model, x.numpy())
        assert len(q.convs()) == 52 and q.convs()[-1].kernel_hw == (1, 1)  # the feature mix is the last conv
        out = q(x)
    assert torch.isfinite(out).all()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), model(x).detach().flatten(), dim=0)
    assert cos > 0.9, f"int8 output far from fp32 (cosine {cos:.3f})"


def test_ptq_of_quickstart_model_loses_at_most_one_point():
    from conftest import ROOT

    from fedtiny.federated.task import cloud_model, make_task
    from fedtiny.scenario import load_scenario

    report = cloud_model(make_task(load_scenario(ROOT / "scenarios" / "quickstart.toml")))[1]
    assert report.pretrain_train_accuracy > 0.95
    assert report.ptq_accuracy >= report.fp32_accuracy - 0.01, report


def small_qmodel(classifier_precision="int8") -> QModel:
    """tiny-ir briefly pretrained on half of digits, then quantized."""
    from fedtiny.data import load_source
    from fedtiny.federated.train import pretrain

    data = load_source("digits").subset(np.arange(0, 1797, 2))
    model = build_model("tiny-ir", 1, 10, image_size=8)
    pretrain(model, data, epochs=3, lr=0.05, batch_size=32, seed=0)
    return ptq(model, data.x[:128], classifier_precision=classifier_precision)


@pytest.mark.parametrize("head", ["int8", "fp32"])
def test_model_file_round_trip(tmp_path, head):
    q = small_qmodel(head)
    path = save_qmodel(q, tmp_path / "m.safetensors")
    q2 = load_qmodel(path)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(q(x), q2(x))


def test_model_file_is_validated(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    path = save_qmodel(small_qmodel(), tmp_path / "m.safetensors")
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    bad = dict(tensors)
    bad["conv0.weight"] = bad["conv0.weight"].astype(np.float32)
    save_file(bad, str(tmp_path / "dtype.safetensors"), metadata=meta)
    with pytest.raises(ModelFileError, match="conv0.weight: dtype float32, expected int8"):
        load_qmodel(tmp_path / "dtype.safetensors")
    save_file(tensors, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(ModelFileError, match="no fedtiny layout"):
        load_qmodel(tmp_path / "nometa.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 50)
    with pytest.raises(ModelFileError, match="not a safetensors"):
        load_qmodel(tmp_path / "junk.safetensors")


def test_qas_update_equals_the_float_update():
    """With QAS, the int8 weight moves by -lr * G_fp / s_w (the float step, in integer units)."""
    conv = QConv(torch.zeros(4, 2, 1, 1), torch.zeros(4), torch.tensor([0.01, 0.02, 0.005, 0.01]), 0.1, 0, 1.0, 0)
    model = torch.nn.Sequential(conv)
    g_fp = torch.full((4, 2, 1, 1), 2.0)
    conv.weight.grad = g_fp * conv.w_scales.view(-1, 1, 1, 1)  # dL/dW_int = s_w * dL/dW
    conv.bias.grad = (torch.ones(4) * conv.w_scales * 0.1).double()  # dL/db_int = s_w * s_x * dL/db with dL/db = 1
    opt = QuantizedOptimizer(model, "sgd+qas", lr=0.1, rounding="nearest")
    opt.step()
    want_w = torch.round(-0.1 * g_fp / conv.w_scales.view(-1, 1, 1, 1))
    assert torch.equal(conv.weight.data, want_w)
    torch.testing.assert_close(conv.bias.data, torch.round(-0.1 / (conv.w_scales * 0.1)).double())


def test_int8_training_keeps_integers_and_qas_learns():
    from fedtiny.data import SensorShift, apply_shift, load_source
    from fedtiny.data.sources import ImageSet
    from fedtiny.federated.train import evaluate, seeded, train_local

    held = load_source("digits").subset(np.arange(1, 1797, 2))  # the half small_qmodel did not see, shifted
    data = ImageSet(apply_shift(held.x, SensorShift(rotation_deg=20, gain=0.8), 0), held.y, 10, "shifted")
    moved = {}
    for opt in ("sgd", "sgd+qas"):
        q = small_qmodel()
        w0 = next(c for c in q.convs() if c.is_depthwise).weight.detach().clone()
        before = evaluate(q, data)[0]
        train_local(q, data, epochs=2, batch_size=16, lr=0.01, optimizer=opt, momentum=0.9, gen=seeded(0))
        for conv in q.convs() + [q.classifier]:
            for p, lo, hi in ((conv.weight, -127, 127), (conv.bias, -(2**31), 2**31 - 1)):
                assert torch.equal(p, torch.round(p)) and p.min() >= lo and p.max() <= hi
        moved[opt] = (next(c for c in q.convs() if c.is_depthwise).weight - w0).abs().sum().item()
        if opt == "sgd+qas":
            assert evaluate(q, data)[0] < 0.7 * before
    # Without QAS the same learning rate barely moves int8 weights.
    assert moved["sgd+qas"] > 20 * max(moved["sgd"], 1.0)


def test_device_float_state_counts_fp32_head_and_momentum():
    q = small_qmodel("fp32")
    counts = device_float_state(q, "sgd", 0.9)
    head = q.classifier.weight.numel() + q.classifier.bias.numel()
    assert counts["head"] == head
    assert counts["optimizer"] == sum(p.numel() for p in q.parameters())
    assert device_float_state(q, "sgd", 0.0)["optimizer"] == 0


_FORWARD_HASH = """
import hashlib, sys, numpy as np, torch
from fedtiny.int8.modelfile import read_model
q = read_model(sys.argv[1]).eval()
c, h, w = q.input_shape
x = torch.from_numpy(np.random.default_rng(0).random((4, c, h, w), dtype=np.float32))
with torch.no_grad():
    f = q.features(x).numpy()
assert np.array_equal(f, np.round(f))
print(torch.backends.cpu.get_cpu_capability(), hashlib.sha256(f.astype(np.int8).tobytes()).hexdigest())
"""


def _models_for_exactness(tmp_path):
    from conftest import SHARED_MODELS

    paths = [save_qmodel(small_qmodel(), tmp_path / "tiny-ir.safetensors")]
    if (SHARED_MODELS / "mcunet-5fps.pkl").exists():
        paths.append(SHARED_MODELS / "mcunet-5fps.pkl")  # wide 1x1 layers whose sums pass 2^24
    return paths


def test_int8_forward_same_integers_with_every_cpu_kernel(tmp_path):
    """The int8 forward gives identical integers with ATEN_CPU_CAPABILITY=default and the machine's best kernels."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    for path in _models_for_exactness(tmp_path):
        outs = []
        for cap in (None, "default"):
            env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
            if cap:
                env["ATEN_CPU_CAPABILITY"] = cap
            proc = subprocess.run(
                [sys.executable, "-c", _FORWARD_HASH, str(path)],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 0, proc.stderr[-2000:]
            outs.append(proc.stdout.split())
        assert outs[1][0] == "DEFAULT" and outs[0][1] == outs[1][1], (path.name, outs)


def test_wide_int8_conv_accumulates_exactly():
    """A layer whose int32 sums pass 2^24 (float32's exact range) still gives the exact integers."""
    from fedtiny.int8.kernels import int_conv_acc

    cin, cout = 2048, 4
    w = rand_int8(cout, cin, 1, 1, lo=-127)
    w[:, ::2] = 127  # push the sums far past 2^24
    x = rand_int8(2, cin, 3, 3)
    x[:, ::2] = 127
    xz = -128
    b = RNG.integers(-(1 << 20), 1 << 20, cout)
    want = np.einsum("nchw,oc->nohw", x.astype(np.int64) - xz, w[:, :, 0, 0].astype(np.int64)) + b[None, :, None, None]
    assert np.abs(want).max() > 1 << 24
    conv = QConv(
        torch.from_numpy(w.astype(np.float32)),
        torch.from_numpy(b.astype(np.float32)),
        torch.ones(cout),
        1.0,
        xz,
        1.0,
        0,
        1,
        1,
    )
    with torch.no_grad():
        got = int_conv_acc(torch.from_numpy(x.astype(np.float32)) - xz, conv.weight, conv.bias, 1, conv.padding, 1)
    # Past 2^24 the sum runs in float64 and comes back as exact int64 integers.
    assert np.array_equal(got.numpy(), want)
