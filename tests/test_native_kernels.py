"""The host kernels of device/c (fedtiny.int8.native) give the PyTorch kernels' integers, and a
training step through them gives the same outputs and gradients as the PyTorch fallback."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_c_library

from fedtiny.int8 import kernels as K
from fedtiny.int8 import native


@pytest.fixture(scope="module")
def built():
    build_c_library("libfedtiny_host.so")
    native._lib.cache_clear()
    assert native.available(), f"{native.library_path()} built but not loaded"
    yield
    native._lib.cache_clear()


def _reference(acc: torch.Tensor, mult: torch.Tensor, shift: torch.Tensor, y_zero: int, lo: int, hi: int):
    view = (1, -1, *([1] * (acc.dim() - 2)))
    v = K.multiply_by_quantized_multiplier(acc, mult.view(view), shift.view(view)) + y_zero
    return v.clamp(lo, hi), (v >= lo) & (v <= hi)


def test_requantize_clamp_equals_multiply_by_quantized_multiplier(built):
    gen = torch.Generator().manual_seed(0)
    compared = 0
    for trial in range(120):
        c = int(torch.randint(1, 9, (1,), generator=gen))
        big = [2**7, 2**15, 2**24, 2**31 - 1][trial % 4]
        acc = torch.randint(-big, big, (2, c, 3, int(torch.randint(1, 17, (1,), generator=gen))), generator=gen)
        acc[0, 0, 0, 0] = -big
        mult = torch.randint(0, 2**31, (c,), generator=gen)
        mult[0] = [0, 2**30, 2**31 - 1, 1518500250][trial % 4]
        shift = torch.randint(-31, 8, (c,), generator=gen)
        y_zero = int(torch.randint(-128, 128, (1,), generator=gen))
        lo, hi = [(-128, 127), (-128, 0), (y_zero, 127)][trial % 3]
        want_y, want_m = _reference(acc, mult, shift, y_zero, lo, hi)
        # TFLM adds the zero point in int32 (wrapping); Python's int64 does not: compare where they agree
        sane = (want_y - y_zero).abs() < 2**31 - 256
        for dtype in (torch.float64, torch.float32):
            if dtype == torch.float32 and big > 2**24:
                continue  # conv_acc holds float32 only below 2^24
            y, m = native.requantize_clamp(acc.to(dtype), mult.int(), shift.int(), y_zero, lo, hi, want_mask=True)
            assert y.dtype == torch.float32 and m.dtype == torch.bool
            assert torch.equal(y.long()[sane], want_y[sane]) and torch.equal(m[sane], want_m[sane]), (trial, dtype)
            compared += int(sane.sum())
    # every rounding tie around zero, right shifts 0..12 and a left shift
    m = torch.tensor([2**30, 2**30 + 1, 2**31 - 1, 1518500250, 2**30 + 7])
    s = torch.tensor([0, -1, -5, -12, 3])
    x = torch.arange(-70000, 70000).view(1, 1, -1).expand(1, 5, -1).contiguous()
    y, mask = native.requantize_clamp(x.double(), m.int(), s.int(), 0, -(2**31), 2**31 - 1, want_mask=False)
    assert mask is None
    assert torch.equal(y.long(), _reference(x, m, s, 0, -(2**31), 2**31 - 1)[0])
    assert compared > 10_000


def test_contract_violations_fall_back(built):
    acc = torch.zeros(1, 2, 4)
    assert (
        native.requantize_clamp(
            acc, torch.tensor([-1, 5], dtype=torch.int32), torch.zeros(2, dtype=torch.int32), 0, -128, 127, False
        )
        is None
    )  # a negative multiplier: not TFLite's
    assert (
        native.requantize_clamp(
            acc, torch.ones(2, dtype=torch.int32), torch.tensor([0, 40], dtype=torch.int32), 0, -128, 127, False
        )
        is None
    )
    assert (
        native.requantize_clamp(
            acc.long(), torch.ones(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32), 0, -128, 127, False
        )
        is None
    )


def test_add_clamp_equals_add_int8(built):
    rng = np.random.default_rng(0)
    for trial in range(60):
        s1, s2, so = rng.uniform(0.005, 0.2, 3)
        z1, z2, zo = (int(v) for v in rng.integers(-128, 128, 3))
        p = K.add_params(s1, z1, s2, z2, so, zo)
        a = torch.from_numpy(rng.integers(-128, 128, (2, 5, 7, 3))).float()
        b = torch.from_numpy(rng.integers(-128, 128, (2, 5, 7, 3))).float()
        lo, hi = [(-128, 127), (zo, 127)][trial % 2]
        v = K.add_int8(a.long(), b.long(), p, K.INT32_MIN, K.INT32_MAX)
        y, m = native.add_clamp(a, b, p, lo, hi, want_mask=True)
        assert torch.equal(y.long(), v.clamp(lo, hi)) and torch.equal(m, (v >= lo) & (v <= hi)), trial
    assert native.add_clamp(a, b[:, :1], p, -128, 127, False) is None  # broadcasting: the PyTorch kernel's job


def test_a_training_step_is_identical_with_and_without_the_host_kernels(built, monkeypatch):
    """A small ResNet (convolutions, depthwise-free residual ADDs, FC head): outputs, loss and every gradient."""
    from test_trace import SmallResNet, _randomize_bn

    from fedtiny.int8.graph import replace_head
    from fedtiny.int8.trace import calibrate, quantize, trace

    torch.manual_seed(0)
    model = _randomize_bn(SmallResNet())
    x = torch.rand(8, 3, 16, 16)
    graph = trace(model, x)
    q = replace_head(quantize(graph, calibrate(graph, [x])), 4)
    target = torch.arange(8) % 4

    def step():
        q.zero_grad()
        out = q(x)
        F.cross_entropy(out, target).backward()
        return out.detach().clone(), {n: p.grad.clone() for n, p in q.named_parameters() if p.grad is not None}

    out_native, grads_native = step()
    monkeypatch.setattr(native, "_lib", lambda: None)
    assert not native.available()
    out_torch, grads_torch = step()
    assert torch.equal(out_native, out_torch)
    assert grads_native.keys() == grads_torch.keys() and len(grads_native) >= 12
    for name, g in grads_native.items():
        assert torch.equal(g, grads_torch[name]), name


def test_uniform_numbers_equal_the_pytorch_hash(built, monkeypatch):
    from fedtiny.int8 import exact

    key = exact.StepKey(seed=2**32 - 5, step=9)
    fast = exact.uniform(key, 17, (3, 4099))
    monkeypatch.setattr(native, "uniform", lambda base, count: None)
    assert torch.equal(fast, exact.uniform(key, 17, (3, 4099)))
