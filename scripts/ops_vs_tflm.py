"""Each op kind of fedtiny's int8 graph against TFLite Micro: elements of its output tensors that differ on 32
random int8 inputs, in models fedtiny builds, exports and reads back (the tests' models: a traced PyTorch
network with max pooling, concatenation, a squeeze-and-excitation gate and hardswish, the same with a MEAN,
two requantizes and a strided slice spliced in, a depthwise convolution with multiplier 2, and the float
edges, and the network with standalone activations spliced in). Prints a markdown table; exits 1 if any element differs.

    .venv/bin/python scripts/ops_vs_tflm.py
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_ops_activations_tflm import _with_activations  # noqa: E402
from test_ops_tflm import DepthMultiplier, _se_net, _spliced  # noqa: E402
from test_tflm_exact import _as_tflite, _nchw  # noqa: E402

from fedtiny.int8.convert import ptq  # noqa: E402
from fedtiny.int8.oracle import tflm_tensors  # noqa: E402
from fedtiny.int8.resolver import kind_of  # noqa: E402
from fedtiny.int8.tfl_convert import export_tflite, from_tflite  # noqa: E402
from fedtiny.int8.tflite import read_tflite  # noqa: E402

SAMPLES = 32


def per_operator(data: bytes, counts: dict, *, float_input: bool = False) -> None:
    """Add each operator's output elements compared and differing over SAMPLES inputs to ``counts``."""
    g = read_tflite(data)
    names: dict[int, str] = {}
    model = from_tflite(g, "model", names)
    writer = {op.outputs[0]: op.op for op in g.ops}
    shape = g.tensors[g.inputs[0]].shape
    rng = np.random.default_rng(0)
    for _ in range(SAMPLES):
        if float_input:
            x = rng.random(shape, dtype=np.float32)
            xq = model.quantize_input(torch.from_numpy(x).permute(0, 3, 1, 2))
        else:
            x = rng.integers(-128, 128, shape).astype(np.int8)
            xq = _nchw(x)
        ref, ours = tflm_tensors(data, x), model.int8_tensors(xq)
        for i, name in names.items():
            op = writer.get(i, "input")
            if op in ("PAD", "DEQUANTIZE") or ref[i].dtype != np.int8:
                continue  # fedtiny pads inside the convolution; the float logits are the int8 ones dequantized
            key = (op, "input" if name == "input" else kind_of(model.op(name)).name)
            counts[key][0] += ref[i].size
            counts[key][1] += int((_as_tflite(ours[name], ref[i].shape) != ref[i]).sum())


def main() -> int:
    import tempfile

    counts: dict = defaultdict(lambda: [0, 0])
    se = _se_net()
    torch.manual_seed(0)
    dm = ptq(DepthMultiplier(), np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32))
    edges = _se_net()
    edges.float_input = edges.float_output = True
    with tempfile.TemporaryDirectory() as tmp:
        for model, name in ((se, "se"), (_spliced(_se_net()), "spliced"), (dm, "dm"), (_with_activations(), "act")):
            per_operator(export_tflite(model, Path(tmp) / f"{name}.tflite").read_bytes(), counts)
        per_operator(export_tflite(edges, Path(tmp) / "edges.tflite").read_bytes(), counts, float_input=True)
    print(f"| TFLite operator | fedtiny kind | output elements compared ({SAMPLES} inputs per model) | differing |")
    print("| --- | --- | --- | --- |")
    bad = 0
    for (op, kind), (n, d) in sorted(counts.items()):
        print(f"| {op} | {kind} | {n:,} | {d} |")
        bad += d
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
