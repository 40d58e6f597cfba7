"""Operators beyond the original eight, each against TFLite Micro's reference kernels (0 differing elements on
every tensor for random int8 inputs) and trained by the exact step and the C step alike (0 mismatches).

Models are built here as small PyTorch modules, quantized by fedtiny and exported, so that the test needs no
downloaded file."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from fedtiny.int8.convert import ptq
from fedtiny.int8.oracle import tflm_invoke, tflm_tensors
from fedtiny.int8.tfl_convert import export_tflite, from_tflite
from fedtiny.int8.tflite import read_tflite
from test_tflm_exact import _as_tflite, _nchw, _random_inputs


def _tflm_differences(data: bytes) -> tuple[int, int]:
    """(elements differing from TFLM in the logits of 32 random inputs, in every tensor of 2 more), read back."""
    g = read_tflite(data)
    names: dict[int, str] = {}
    model = from_tflite(g, "model", names)
    shape = g.tensors[g.inputs[0]].shape
    x = _random_inputs(shape, 32)
    want = tflm_invoke(data, x)
    logits = int((_as_tflite(model.int8_forward(_nchw(x)), want.shape) != want).sum())
    padded = {op.outputs[0] for op in g.ops if op.op == "PAD"}  # fedtiny pads inside the convolution
    every = 0
    for seed in (1, 2):
        x1 = _random_inputs(shape, 1, seed)
        ref, ours = tflm_tensors(data, x1), model.int8_tensors(_nchw(x1))
        every += sum(int((_as_tflite(ours[t], ref[i].shape) != ref[i]).sum()) for i, t in names.items()
                     if i not in padded)
    return logits, every


class DepthMultiplier(nn.Module):
    """A depthwise convolution with two outputs per input channel (TFLite depth_multiplier 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.dw(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_depth_multiplier_equals_tflm_and_trains_in_both_steps(tmp_path):
    from fedtiny.tools.device_check import device_check

    torch.manual_seed(0)
    q = ptq(DepthMultiplier(), np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32))
    path = export_tflite(q, tmp_path / "dm.tflite")
    g = read_tflite(path.read_bytes())
    dw = next(op for op in g.ops if op.op == "DEPTHWISE_CONV_2D")
    assert dw.options["depth_multiplier"] == 2
    assert _tflm_differences(path.read_bytes()) == (0, 0)
    for scheme, batch in (("full", 2), ("last-k:3", 1)):
        out = device_check(str(path), scheme, "mcu-256kb", steps=3, batch=batch, lr=0.01)
        assert (out["forward_mismatches"], out["param_mismatches"]) == (0, 0), (scheme, out)


def test_a_grouped_convolution_trains_whole_or_not_at_all():
    from fedtiny.budget.schemes import parse_scheme, resolve
    from fedtiny.errors import SchemeError

    torch.manual_seed(0)
    q = ptq(DepthMultiplier(), np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32))
    half = '{"weight_update_idx": [1], "weight_update_ratio": [0.5]}'
    with pytest.raises(SchemeError, match="grouped convolution, trained whole or not at all"):
        resolve(parse_scheme(half), q)
    # another model's scheme (the quickstart's, for tiny-ir) says which schemes fit any model
    with pytest.raises(SchemeError, match=r"exceeds the model's 3 convolutions; .* use a preset \(last-k:fit"):
        resolve(parse_scheme('{"n_bias_update": 9}'), q)


def test_quantization_fields_tflm_ignores_are_read_as_tflm_reads_them(tmp_path):
    """A bias with one zero point for its per-channel scales along a dimension it lacks, and weights with one
    zero point for many scales (as converters write them): TFLM runs the file, fedtiny reads it exactly; weights
    whose scales match neither one nor every output channel are refused in one line, as TFLM's Prepare does."""
    from fedtiny.errors import ModelFileError
    from fedtiny.int8.tflite import write_tflite

    torch.manual_seed(0)
    q = ptq(DepthMultiplier(), np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32))
    g = read_tflite(export_tflite(q, tmp_path / "dm.tflite").read_bytes())
    bias = next(t for t in g.tensors if t.name.endswith("/bias") and len(t.scales) > 1)
    bias.zeros, bias.quantized_dimension = np.zeros(1, np.int64), 3
    weights = next(t for t in g.tensors if t.name.endswith("/weight") and len(t.scales) > 1)
    weights.zeros = np.zeros(1, np.int64)
    data = write_tflite(g)
    assert tflm_invoke(data, np.zeros((1, 8, 8, 1), np.int8)).size == 10
    assert _tflm_differences(data) == (0, 0)
    weights.scales = weights.scales[:3]
    with pytest.raises(ModelFileError, match=r"weights tensor \d+ .* has 3 scales for \d+ output channels"):
        from_tflite(read_tflite(write_tflite(g)))


def test_squeeze_reads_as_a_reshape(tmp_path):
    """SQUEEZE (TFLM's squeeze of the pooled 1x1 map before a classifier) equals TFLM as fedtiny reads it."""
    from fedtiny.int8.tflite import OpDesc, TensorDesc, write_tflite

    torch.manual_seed(0)
    q = ptq(DepthMultiplier(), np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32))
    g = read_tflite(export_tflite(q, tmp_path / "dm.tflite").read_bytes())
    # the pooled 1x1 map squeezed to a vector and reshaped back before the classifier (a 1x1 CONV_2D)
    k = next(i for i, op in enumerate(g.ops) if op.op == "AVERAGE_POOL_2D")
    pooled = g.tensors[g.ops[k].outputs[0]]
    flat = TensorDesc("squeezed", (1, pooled.shape[3]), "int8", pooled.scales, pooled.zeros)
    back = TensorDesc("unsqueezed", pooled.shape, "int8", pooled.scales, pooled.zeros)
    shape = TensorDesc("unsqueezed/shape", (4,), "int32", None, None, 0, np.asarray(pooled.shape, np.int32))
    g.tensors += [flat, back, shape]
    n = len(g.tensors)
    g.ops[k + 1].inputs = (n - 2, *g.ops[k + 1].inputs[1:])
    g.ops[k + 1:k + 1] = [OpDesc("SQUEEZE", (g.ops[k].outputs[0],), (n - 3,), {"squeeze_dims": [1, 2]}),
                          OpDesc("RESHAPE", (n - 3, n - 1), (n - 2,), {"new_shape": list(pooled.shape)})]
    data = write_tflite(g)
    assert [op.op for op in read_tflite(data).ops].count("SQUEEZE") == 1
    assert _tflm_differences(data) == (0, 0)
