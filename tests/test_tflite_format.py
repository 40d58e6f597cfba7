"""The .tflite reader/writer on the MLPerf Tiny models: contents, round trips (fields and TFLM outputs),
refusals, and damaged files that must only ever raise ModelFileError."""

import dataclasses
from collections import Counter
from pathlib import Path

import flatbuffers
import numpy as np
import pytest

from fedtiny.errors import ModelFileError
from fedtiny.int8.oracle import tflm_invoke, tflm_tensors
from fedtiny.int8.tflite import TFLiteGraph, check_supported, read_tflite, supported_ops, write_tflite

MLPERF = Path(__file__).resolve().parents[2] / "shared/models/mlperf-tiny"

# Operator counts and inputs as listed in the models' README.
EXPECTED = {
    "vww_96_int8.tflite": (
        {
            "CONV_2D": 14,
            "DEPTHWISE_CONV_2D": 13,
            "AVERAGE_POOL_2D": 1,
            "RESHAPE": 1,
            "FULLY_CONNECTED": 1,
            "SOFTMAX": 1,
        },
        (1, 96, 96, 3),
    ),
    "kws_ref_model.tflite": (
        {"CONV_2D": 5, "DEPTHWISE_CONV_2D": 4, "AVERAGE_POOL_2D": 1, "RESHAPE": 1, "FULLY_CONNECTED": 1, "SOFTMAX": 1},
        (1, 49, 10, 1),
    ),
    "pretrainedResnet_quant.tflite": (
        {"CONV_2D": 9, "ADD": 3, "AVERAGE_POOL_2D": 1, "RESHAPE": 1, "FULLY_CONNECTED": 1, "SOFTMAX": 1},
        (1, 32, 32, 3),
    ),
    "ad01_int8.tflite": ({"FULLY_CONNECTED": 10}, (1, 640)),
}
SMALLEST = "kws_ref_model.tflite"


def model_path(name: str) -> Path:
    path = MLPERF / name
    if not path.is_file():
        pytest.skip(f"{MLPERF} not present")
    return path


def schema():
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated

    return schema_py_generated


def data_spans(model: bytes) -> list[tuple[int, int]]:
    """(start, end) of each non-empty buffer's bytes inside the flatbuffer."""
    root = schema().Model.GetRootAs(model, 0)
    spans = []
    for i in range(root.BuffersLength()):
        buf = root.Buffers(i)
        if not buf.DataIsNone() and buf.DataLength():
            start = buf._tab.Vector(buf._tab.Offset(4))
            spans.append((start, start + buf.DataLength()))
    return spans


def random_inputs(graph: TFLiteGraph, n: int, seed: int) -> np.ndarray:
    shape = graph.tensors[graph.inputs[0]].shape
    return np.random.default_rng(seed).integers(-128, 128, (n, *shape[1:]), dtype=np.int8)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reads_mlperf_models(name):
    graph = read_tflite(model_path(name))
    ops, input_shape = EXPECTED[name]
    assert Counter(op.op for op in graph.ops) == ops
    x = graph.tensors[graph.inputs[0]]
    assert (x.shape, x.dtype, len(graph.outputs)) == (input_shape, "int8", 1)
    check_supported(graph, name)
    for op in graph.ops:
        if op.op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            w, b = graph.tensors[op.inputs[1]], graph.tensors[op.inputs[2]]
            assert w.data is not None and w.data.dtype == np.int8 and w.data.shape == w.shape
            assert len(w.scales) in (1, w.shape[w.quantized_dimension]) and not w.zeros.any()
            assert b.data is not None and b.data.dtype == np.int32 and len(b.scales) == len(w.scales)
    assert all(graph.tensors[i].data is None for op in graph.ops for i in op.outputs)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_write_read_round_trip(name):
    graph = read_tflite(model_path(name))
    written = write_tflite(graph)
    again = read_tflite(written, where="written")
    for field in dataclasses.fields(TFLiteGraph):
        if field.name not in ("tensors", "ops"):
            assert getattr(again, field.name) == getattr(graph, field.name), field.name
    assert len(again.tensors) == len(graph.tensors) and len(again.ops) == len(graph.ops)
    for i, (a, b) in enumerate(zip(again.tensors, graph.tensors)):
        assert a == b, f"tensor {i}"
    for k, (a, b) in enumerate(zip(again.ops, graph.ops)):
        assert a == b, f"operator {k}"
    assert again == graph

    root = schema().ModelT.InitFromObj(schema().Model.GetRootAs(written, 0))
    assert written[4:8] == b"TFL3" and root.version == 3 and len(root.subgraphs) == 1
    assert root.buffers[0].data is None  # the empty sentinel
    assert len(root.operatorCodes) == len({op.op for op in graph.ops})  # deduplicated
    assert root.description == graph.description.encode()
    spans = data_spans(written)
    assert len(spans) == sum(t.data is not None for t in graph.tensors)
    assert all(start % 16 == 0 for start, _ in spans) and len(written) % 16 == 0
    assert write_tflite(again) == written  # deterministic


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_rewritten_model_runs_identically_in_tflm(name):
    original = model_path(name).read_bytes()
    graph = read_tflite(original)
    x = random_inputs(graph, 4, seed=sum(map(ord, name)))
    expected = tflm_invoke(original, x)
    assert expected.shape[0] == 4 and expected.dtype == np.int8
    assert np.array_equal(tflm_invoke(write_tflite(graph), x), expected)


def test_tflm_tensors_are_every_intermediate():
    model = model_path(SMALLEST).read_bytes()
    graph = read_tflite(model)
    x = random_inputs(graph, 1, seed=3)
    values = tflm_tensors(model, x)
    assert sorted(values) == list(range(len(graph.tensors)))
    for i, t in enumerate(graph.tensors):
        assert values[i].shape == t.shape and values[i].dtype == np.dtype(t.dtype), i
        if t.data is not None:
            assert np.array_equal(values[i], t.data), i
    assert np.array_equal(values[graph.inputs[0]], x)
    assert np.array_equal(values[graph.outputs[0]], tflm_invoke(model, x))
    batch = random_inputs(graph, 3, seed=4)  # one sample at a time, stacked in order
    assert np.array_equal(tflm_invoke(model, batch), np.concatenate([tflm_invoke(model, s[None]) for s in batch]))
    for op in graph.ops:  # preserved, not overwritten by later ops: a reshape's output is its input
        if op.op == "RESHAPE":
            assert np.array_equal(values[op.inputs[0]].ravel(), values[op.outputs[0]].ravel())
        assert values[op.outputs[0]].any() or op.op == "SOFTMAX"


def test_unsupported_operator_is_named(tmp_path):
    graph = read_tflite(model_path(SMALLEST))
    k = next(k for k, op in enumerate(graph.ops) if op.op == "AVERAGE_POOL_2D")
    graph.ops[k].op = "L2_POOL_2D"
    path = tmp_path / "l2pool.tflite"
    path.write_bytes(write_tflite(graph))
    again = read_tflite(path)
    assert again.ops[k] == graph.ops[k]  # its Pool2DOptions survive the round trip
    with pytest.raises(ModelFileError) as info:
        check_supported(again, str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: operator {k} is L2_POOL_2D, which fedtiny does not support")
    assert ", ".join(supported_ops()) in message and "\n" not in message
    # every operator it lacks is named, once, at its first place
    j = next(j for j, op in enumerate(graph.ops) if op.op == "RESHAPE")
    graph.ops[j].op, graph.ops[j].options = "GATHER", {}
    with pytest.raises(ModelFileError, match=rf"operator {min(j, k)} is \w+, operator {max(j, k)} is \w+, which"):
        check_supported(graph, str(path))


def _refusal(graph: TFLiteGraph) -> str:
    with pytest.raises(ModelFileError) as info:
        check_supported(graph, "m.tflite")
    assert "\n" not in str(info.value)
    return str(info.value)


def test_unsupported_types_weights_and_dilation_are_named():
    graph = read_tflite(model_path(SMALLEST))
    conv = next(k for k, op in enumerate(graph.ops) if op.op == "CONV_2D")
    weights = graph.tensors[graph.ops[conv].inputs[1]]

    floats = read_tflite(model_path(SMALLEST))
    first = floats.tensors[floats.inputs[0]]
    first.dtype = "float32"
    assert "float32" in _refusal(floats) and repr(first.name) in _refusal(floats)

    weights.zeros = weights.zeros + 3
    assert f"operator {conv} (CONV_2D)" in _refusal(graph) and "zero point 3" in _refusal(graph)
    weights.zeros = weights.zeros - 3

    graph.ops[conv].options["dilation_h"] = 2
    assert f"operator {conv} (CONV_2D) has dilation 2x1" in _refusal(graph)


def test_several_subgraphs_are_refused():
    s = schema()
    model = s.ModelT.InitFromObj(s.Model.GetRootAs(model_path(SMALLEST).read_bytes(), 0))
    model.subgraphs = model.subgraphs * 2
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    with pytest.raises(ModelFileError, match="2 subgraphs"):
        read_tflite(bytes(builder.Output()))


def test_buffers_stored_after_the_flatbuffer():
    """Models over 2 GB keep data after the flatbuffer (offset/size from the file's start)."""
    s = schema()
    original = model_path(SMALLEST).read_bytes()
    model = s.ModelT.InitFromObj(s.Model.GetRootAs(original, 0))
    k = max(
        range(len(model.buffers)), key=lambda i: len(model.buffers[i].data if model.buffers[i].data is not None else ())
    )
    payload = bytes(model.buffers[k].data)
    model.buffers[k].data, model.buffers[k].size = None, len(payload)

    def pack(offset: int) -> bytes:
        model.buffers[k].offset = offset
        builder = flatbuffers.Builder(0)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())

    end = len(pack(1 << 40))  # the offset field's width does not depend on its value
    start = -(-end // 16) * 16
    flat = pack(start)
    assert len(flat) == end
    external = flat + bytes(start - end) + payload
    assert read_tflite(external) == read_tflite(original)
    x = random_inputs(read_tflite(original), 2, seed=5)
    assert np.array_equal(tflm_invoke(external, x), tflm_invoke(original, x))
    with pytest.raises(ModelFileError, match=f"buffer {k} at bytes .* beyond the end of the file"):
        read_tflite(flat)


def test_writing_inconsistent_data_is_refused():
    graph = read_tflite(model_path(SMALLEST))
    i = graph.ops[0].inputs[1]
    graph.tensors[i].data = graph.tensors[i].data.astype(np.int16)
    with pytest.raises(ModelFileError, match=f"tensor {i} .* is int8"):
        write_tflite(graph)


def test_empty_text_and_missing_files(tmp_path):
    empty, text = tmp_path / "empty.tflite", tmp_path / "notes.tflite"
    empty.write_bytes(b"")
    text.write_text("this is not a flatbuffer, just some words in a text file\n" * 20)
    for path in (empty, text, tmp_path / "absent.tflite"):
        with pytest.raises(ModelFileError) as info:
            read_tflite(path)
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def _refused(data: bytes, label: str) -> bool:
    """Whether reading ``data`` was refused; anything but ModelFileError propagates and fails the test."""
    try:
        read_tflite(data, where=label)
    except ModelFileError as exc:
        message = str(exc)
        assert message.startswith(f"{label}: ") and "\n" not in message, message
        return True
    return False


def test_truncated_files_raise_only_model_file_errors():
    original = model_path(SMALLEST).read_bytes()
    cuts = sorted({*range(0, len(original), len(original) // 250), *range(len(original) - 64, len(original))})
    # The builder writes back to front, so every cut loses something the reader needs: all are refused.
    assert all(_refused(original[:cut], f"cut at {cut}") for cut in cuts)


def test_flipped_bytes_raise_only_model_file_errors():
    original = model_path(SMALLEST).read_bytes()
    rng = np.random.default_rng(2024)
    in_data = np.zeros(len(original), bool)
    for start, end in data_spans(original):
        in_data[start:end] = True
    structure = np.flatnonzero(~in_data)  # tables, vectors and offsets: where a flip changes the layout
    refused = 0
    for variant in range(300):
        damaged = bytearray(original)
        for _ in range(rng.integers(1, 4)):
            pool = structure if rng.random() < 0.8 else np.arange(len(original))
            damaged[rng.choice(pool)] = rng.integers(0, 256)
        refused += _refused(bytes(damaged), f"variant {variant}")
    assert refused > 60  # the flips do reach the layout (many others land in names or unused bytes)
