"""fedtiny's int8 LOGISTIC and HARD_SWISH kernels against TensorFlow Lite Micro's: 0 differing elements.

Each case builds a one-op int8 ``.tflite`` model in memory with fedtiny's writer and runs it in the
``tflite-micro`` interpreter on 32 random 1x4x4x8 inputs plus two that hold all 256 int8 values.
"""

import numpy as np
import pytest
import torch

from fedtiny.int8.kernels_act import (
    LOGISTIC_OUTPUT_SCALE,
    LOGISTIC_OUTPUT_ZERO,
    hard_swish_int8,
    hard_swish_params,
    logistic_int8,
    logistic_params,
    table,
)
from fedtiny.int8.oracle import tflm_invoke
from fedtiny.int8.tflite import OpDesc, TensorDesc, TFLiteGraph, write_tflite

SHAPE = (1, 4, 4, 8)

# (x_scale, x_zero): ordinary scales; 0.5 (radius 15); 0.003 (radius 3840, wider than int8: never
# saturates early); 20.0 (radius 0: a centred 0 gives -128 as in TFLM).
LOGISTIC_CASES = [(0.1, 0), (0.05, -20), (1 / 32, 0), (0.5, -128), (0.003, 5), (0.0123, 127), (20.0, 3)]
# (x_scale, x_zero, y_scale, y_zero): reluish exponent > 0 (left shifts, with saturation at 1.0),
# < 0 (right shifts), and output exponents of -16 and -18, where int16 RoundingDivideByPOT's
# mask wraps and TFLM outputs y_zero +/- 1.
HARD_SWISH_CASES = [
    (0.05, 0, 0.03, -10),
    (0.1, -128, 0.1, -128),
    (0.02, 30, 0.5, 3),
    (1.0, 0, 0.7, 0),
    (0.2, 17, 0.09, -100),
    (0.001, 0, 0.01, 0),
    (0.001, 0, 1.0, 0),
    (0.001, -7, 3.0, 5),
]


def _one_op_model(op: str, x_scale: float, x_zero: int, y_scale: float, y_zero: int) -> bytes:
    def tensor(name: str, scale: float, zero: int) -> TensorDesc:
        return TensorDesc(name, SHAPE, "int8", np.array([scale], np.float32), np.array([zero], np.int64))

    graph = TFLiteGraph(
        [tensor("x", x_scale, x_zero), tensor("y", y_scale, y_zero)], [OpDesc(op, (0,), (1,), {})], (0,), (1,)
    )
    return write_tflite(graph)


def _inputs() -> np.ndarray:
    """32 random int8 samples, then 2 holding -128..127 once each."""
    rng = np.random.default_rng(0)
    every = np.arange(-128, 128, dtype=np.int8).reshape(2, *SHAPE[1:])
    return np.concatenate([rng.integers(-128, 128, (32, *SHAPE[1:])).astype(np.int8), every])


def _differing(model: bytes, ours: np.ndarray, x: np.ndarray) -> int:
    want = tflm_invoke(model, x)
    assert want.shape == ours.shape == x.shape and want.dtype == np.int8
    return int((ours != want.astype(np.int64)).sum())


@pytest.mark.parametrize("x_scale,x_zero", LOGISTIC_CASES)
def test_logistic_equals_tflm(x_scale, x_zero):
    x = _inputs()
    p = logistic_params(x_scale, x_zero)
    ours = logistic_int8(torch.from_numpy(x.astype(np.int64)), p).numpy()
    model = _one_op_model("LOGISTIC", x_scale, x_zero, LOGISTIC_OUTPUT_SCALE, LOGISTIC_OUTPUT_ZERO)
    assert _differing(model, ours, x) == 0
    assert ours.size == 34 * 128


@pytest.mark.parametrize("x_scale,x_zero,y_scale,y_zero", HARD_SWISH_CASES)
def test_hard_swish_equals_tflm(x_scale, x_zero, y_scale, y_zero):
    x = _inputs()
    p = hard_swish_params(x_scale, x_zero, y_scale, y_zero)
    ours = hard_swish_int8(torch.from_numpy(x.astype(np.int64)), p).numpy()
    assert _differing(_one_op_model("HARD_SWISH", x_scale, x_zero, y_scale, y_zero), ours, x) == 0


def test_the_cases_reach_the_edges():
    """The parameter sets above exercise every branch they claim to."""
    exps = {c: hard_swish_params(*c) for c in HARD_SWISH_CASES}
    assert any(p.reluish_multiplier_exponent > 0 for p in exps.values())
    assert any(p.reluish_multiplier_exponent < 0 for p in exps.values())
    assert any(p.output_multiplier_exponent <= -16 for p in exps.values())
    assert logistic_params(20.0, 3).input_range_radius == 0
    assert logistic_params(0.003, 5).input_range_radius > 255
    # TFLM's output for an output exponent <= -16: y_zero - 1 below the input zero, y_zero + 1 from it on.
    t = table(hard_swish_int8, hard_swish_params(0.001, -7, 3.0, 5))
    assert t[:121].eq(4).all() and t[121:].eq(6).all()


def test_results_are_close_to_the_real_functions():
    """Within one output step of the float functions (away from TFLM's int16 quirks)."""
    x = torch.arange(-128, 128)
    for xs, xz in LOGISTIC_CASES[:-1]:
        y = table(logistic_int8, logistic_params(xs, xz)).double()
        real = torch.sigmoid(xs * (x - xz).double())
        assert ((y - LOGISTIC_OUTPUT_ZERO) * LOGISTIC_OUTPUT_SCALE - real).abs().max() <= 1.0 / 256
    for xs, xz, ys, yz in HARD_SWISH_CASES[:5]:
        y = table(hard_swish_int8, hard_swish_params(xs, xz, ys, yz)).double()
        v = xs * (x - xz).double()
        real = (v * (v + 3).clamp(0, 6) / 6).clamp(ys * (-128 - yz), ys * (127 - yz))
        assert ((y - yz) * ys - real).abs().max() <= 1.01 * ys


def test_table_is_the_op_on_every_int8_value():
    p = logistic_params(0.05, -20)
    x = torch.from_numpy(_inputs().astype(np.int64))
    t = table(logistic_int8, p)
    assert t.shape == (256,) and t.dtype == torch.int64
    assert torch.equal(t[x + 128], logistic_int8(x, p))
    q = hard_swish_params(0.05, 0, 0.03, -10)
    assert torch.equal(table(hard_swish_int8, q)[x + 128], hard_swish_int8(x, q))


def test_prepare_constraints_match_tflm():
    """What TFLM's Prepare refuses, the parameter functions refuse; what it ignores is ignored."""
    x = _inputs()[:2]
    with pytest.raises(RuntimeError):  # LOGISTIC int8 output zero point must be -128
        tflm_invoke(_one_op_model("LOGISTIC", 0.1, 0, LOGISTIC_OUTPUT_SCALE, 0), x)
    # ...but its output scale is not checked: the kernel computes in 1/256 steps whatever it says.
    ours = logistic_int8(torch.from_numpy(x.astype(np.int64)), logistic_params(0.1, 0)).numpy()
    assert _differing(_one_op_model("LOGISTIC", 0.1, 0, 0.5, LOGISTIC_OUTPUT_ZERO), ours, x) == 0
    # HARD_SWISH needs output_multiplier_exponent <= 0 (output scale above about x_scale / 128).
    with pytest.raises(RuntimeError):
        tflm_invoke(_one_op_model("HARD_SWISH", 1.0, 0, 0.001, 0), x)
    with pytest.raises(ValueError, match="output_multiplier_exponent <= 0"):
        hard_swish_params(1.0, 0, 0.001, 0)
    with pytest.raises(ValueError):
        logistic_params(2.0**-30, 0)
