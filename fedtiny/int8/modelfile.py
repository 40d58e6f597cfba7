"""fedtiny's int8 model file: one safetensors file, the graph layout as JSON in its metadata.

No pickle: tensors are raw safetensors (int8 weights, int32 biases, float scales),
and the layout is plain JSON. :func:`load_qmodel` validates layout, names, shapes,
dtypes and value ranges, and raises :class:`ModelFileError` naming what was wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch import nn

from fedtiny.errors import ModelFileError
from fedtiny.int8.graph import FloatHead, QAdd, QConv, QModel, from_blocks
from fedtiny.int8.ops.conv import build as conv_layout
from fedtiny.int8.resolver import kind_named, kind_of
from fedtiny.int8.tfl_convert import read_tflite_model
from fedtiny.int8.zoo import read_tiny_training
from fedtiny.models.state import load_arrays, model_arrays, wire_dtype

__all__ = [
    "ModelFileError",
    "describe",
    "skeleton",
    "save_qmodel",
    "load_qmodel",
    "from_tiny_training",
    "read_model",
    "FORMAT",
]

FORMAT = "fedtiny-int8"
VERSION = 2  # 2: a graph of ops; 1: the inverted-residual layout (still read)


def describe(model: QModel) -> dict[str, Any]:
    """The layout of ``model`` (no tensor values) as JSON-able dict: its ops in order."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "ops": [
            {
                "name": n.op,
                "inputs": list(n.inputs),
                "op": kind_of(model.op(n.op)).name,
                **kind_of(model.op(n.op)).describe(model.op(n.op)),
            }
            for n in model.nodes
        ],
        **({"input_shape": list(model.input_shape)} if model.input_shape else {}),
        **({"float_input": True} if model.float_input else {}),
        **({"float_output": True} if model.float_output else {}),
    }


def _op_from(d: dict[str, Any], where: str) -> nn.Module:
    kind = kind_named(d.get("op"), where)
    if kind.build is None:
        raise ModelFileError(f"{where}: op {kind.name!r} cannot be stored in a model file")
    try:
        return kind.build(d, where)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{where}: bad {kind.name} layout {d!r} ({exc})") from None


def _skeleton_v1(layout: dict[str, Any], where: str) -> tuple[QModel, dict[str, str]]:
    """A version-1 (inverted-residual) layout, and the renaming of its tensors to the graph's names."""
    old: list[str] = ["first_conv"]
    blocks = []
    for j, b in enumerate(layout["blocks"]):
        pw1 = conv_layout(b["pointwise1"], f"{where}: blocks[{j}].pointwise1") if b.get("pointwise1") else None
        dw = conv_layout(b["depthwise"], f"{where}: blocks[{j}].depthwise")
        pw2 = conv_layout(b["pointwise2"], f"{where}: blocks[{j}].pointwise2")
        res = QAdd(1.0, 0, 1.0, 0, 1.0, 0) if b.get("residual") else None
        old += [
            f"blocks.{j}.{n}" for n, c in (("pointwise1", pw1), ("depthwise", dw), ("pointwise2", pw2)) if c is not None
        ]
        blocks.append((pw1, dw, pw2, res))
    mix = conv_layout(layout["feature_mix"], f"{where}: feature_mix") if layout.get("feature_mix") else None
    if mix is not None:
        old.append("feature_mix")
    c = layout["classifier"]
    cin, cout = int(c["in"]), int(c["out"])
    if c["precision"] == "int8":
        head: QConv | FloatHead = QConv(
            torch.zeros(cout, cin, 1, 1), torch.zeros(cout), torch.ones(cout), 1.0, 0, 1.0, 0
        )
    elif c["precision"] == "fp32":
        head = FloatHead(torch.zeros(cout, cin), torch.zeros(cout), 1.0, 0)
    else:
        raise ModelFileError(f"{where}: classifier.precision must be int8 or fp32, got {c['precision']!r}")
    model = from_blocks(conv_layout(layout["first_conv"], f"{where}: first_conv"), blocks, mix, head, 1.0, 0)
    rename = {o: f"conv{i}" for i, o in enumerate(old)}
    rename.update({f"blocks.{j}.residual": f"add{j}" for j, b in enumerate(blocks) if b[3] is not None})
    return model, rename


def skeleton(layout: dict[str, Any], where: str = "layout") -> QModel:
    """A :class:`QModel` with ``layout``'s structure and placeholder values (load a state into it)."""
    return _skeleton(layout, where)[0]


def _skeleton(layout: dict[str, Any], where: str) -> tuple[QModel, dict[str, str]]:
    if layout.get("format") != FORMAT or layout.get("version") not in (1, VERSION):
        raise ModelFileError(
            f"{where}: not a {FORMAT} v1/v{VERSION} layout "
            f"(format={layout.get('format')!r}, version={layout.get('version')!r})"
        )
    if layout["version"] == 1:
        model, rename = _skeleton_v1(layout, where)
    else:
        ops = []
        for i, d in enumerate(layout["ops"]):
            name, inputs = d.get("name"), d.get("inputs")
            if not isinstance(name, str) or not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
                raise ModelFileError(f"{where}: ops[{i}] needs a name and a list of inputs")
            module = _op_from(d, f"{where}: ops[{i}] ({name})")
            module.tag = name
            ops.append((module, tuple(inputs)))
        model, rename = QModel(ops, 1.0, 0), {}
    shape = layout.get("input_shape")
    if shape is not None and (
        not isinstance(shape, list) or len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape)
    ):
        raise ModelFileError(f"{where}: input_shape must be [C, H, W], got {shape!r}")
    model.input_shape = tuple(shape) if shape else None
    model.float_input, model.float_output = bool(layout.get("float_input")), bool(layout.get("float_output"))
    return model, rename


def save_qmodel(model: QModel, path: str | Path) -> Path:
    """Write ``model`` as a safetensors file with its layout in the metadata."""
    path = Path(path)
    save_file(model_arrays(model), str(path), metadata={"fedtiny": json.dumps(describe(model))})
    return path


def load_qmodel(path: str | Path) -> QModel:
    """Read and validate a model file written by :func:`save_qmodel` or ``fedtiny zoo import``."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: not a safetensors model file ({exc})") from None
    try:
        layout = json.loads(meta["fedtiny"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: no fedtiny layout in the metadata ({exc})") from None
    try:
        model, rename = _skeleton(layout, str(path))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"{path}: bad layout ({exc})") from None
    if rename:  # a version-1 file: tensors named after the old module tree
        tensors = {_renamed(k, rename): v for k, v in tensors.items()}
    load_state_checked(model, tensors, str(path))
    return model


def _renamed(name: str, rename: dict[str, str]) -> str:
    module, _, attr = name.rpartition(".")
    return f"{rename.get(module, module)}.{attr}" if module else name


def load_state_checked(model: QModel, tensors: dict[str, np.ndarray], where: str) -> None:
    """Copy named arrays into ``model`` after checking names, shapes, dtypes, ranges and finiteness."""
    state = model.state_dict()
    missing, extra = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    if missing or extra:
        raise ModelFileError(
            f"{where}: tensors do not match the layout (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for name, target in state.items():
        a = tensors[name]
        want = wire_dtype(model, name)
        if a.dtype != want:
            raise ModelFileError(f"{where}: tensor {name}: dtype {a.dtype}, expected {want}")
        if tuple(a.shape) != tuple(target.shape):
            raise ModelFileError(f"{where}: tensor {name}: shape {tuple(a.shape)}, expected {tuple(target.shape)}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ModelFileError(f"{where}: tensor {name}: non-finite values")
    load_arrays(model, tensors)


def from_tiny_training(obj: dict[str, Any], *, where: str = "model") -> QModel:
    """Build a :class:`QModel` from a tiny-training model dict (see ``fedtiny.int8.zoo``).

    Inputs: the published models quantize images normalized to [-1, 1]
    (``x_scale = 1/127.5``, zero 0), i.e. mean 0.5 and std 0.5 on [0, 1] images.
    """

    def conv(d: dict[str, Any], name: str) -> QConv:
        try:
            p = d["params"]
            w, b, s = (np.asarray(p[k]) for k in ("weight", "bias", "w_scales"))
            if (
                w.dtype != np.int8
                or b.dtype != np.int32
                or w.ndim != 4
                or b.shape != (w.shape[0],)
                or s.shape != b.shape
            ):
                raise ModelFileError(f"{where}: {name}: weight/bias/w_scales have unexpected dtypes or shapes")
            stride = int(d.get("stride", 1))
            groups = int(d.get("groups", 1))
            return QConv(
                torch.from_numpy(w.astype(np.float32)),
                torch.from_numpy(b.astype(np.float32)),
                torch.from_numpy(s.astype(np.float32)),
                float(p["x_scale"]),
                int(p["x_zero"]),
                float(p["y_scale"]),
                int(p["y_zero"]),
                stride,
                groups,
            )
        except (KeyError, TypeError) as exc:
            raise ModelFileError(f"{where}: {name}: missing or malformed field ({exc})") from None

    first = conv(obj["first_conv"], "first_conv")
    blocks = []
    for j, b in enumerate(obj["blocks"]):
        pw1 = conv(b["pointwise1"], f"blocks[{j}].pointwise1") if b.get("pointwise1") else None
        dw = conv(b["depthwise"], f"blocks[{j}].depthwise")
        pw2 = conv(b["pointwise2"], f"blocks[{j}].pointwise2")
        res = None
        if b.get("residual"):
            rp = b["residual"]["params"]
            res = QAdd(
                float(rp["x_scale"]),
                int(rp["x_zero"]),
                pw2.y_scale,
                pw2.y_zero,
                float(rp["y_scale"]),
                int(rp["y_zero"]),
            )
        if b.get("se"):
            raise ModelFileError(f"{where}: blocks[{j}]: squeeze-excite blocks are not supported")
        blocks.append((pw1, dw, pw2, res))
    mix = conv(obj["feature_mix"], "feature_mix") if obj.get("feature_mix") else None
    head = conv(obj["classifier"], "classifier")
    try:
        size = int(obj["first_conv"].get("in_shape", 0))
    except (TypeError, ValueError):
        size = 0
    return from_blocks(
        first,
        blocks,
        mix,
        head,
        first.x_scale,
        first.x_zero,
        input_mean=0.5,
        input_std=0.5,
        input_shape=(first.in_channels, size, size) if size > 0 else None,
    )


def read_model(path: str | Path) -> QModel:
    """An int8 model from a tiny-training ``.pkl`` (restricted reader), a ``.tflite`` or a fedtiny model file.

    Raises
    ------
    ModelFileError
        The file is missing, is neither format, or holds a network fedtiny cannot run.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    if path.suffix == ".pkl":
        return from_tiny_training(read_tiny_training(path), where=str(path))
    if path.suffix == ".tflite":
        return read_tflite_model(path)
    return load_qmodel(path)
