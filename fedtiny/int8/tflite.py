"""The ``.tflite`` format: TensorFlow Lite flatbuffers read into plain descriptions, and written back.

:func:`read_tflite` turns a single-subgraph model into a :class:`TFLiteGraph` (tensors with their
quantization and constant data, operators with their options as plain values); :func:`write_tflite`
turns one back into a model TensorFlow Lite Micro runs; :func:`check_supported` refuses what fedtiny's
int8 graph cannot run. NumPy only: the flatbuffer classes come from the schema module that ships with
the ``tflite-micro`` package (imported on first use).

The reader never trusts the file: every count, index, offset and size is checked, and any failure of
the flatbuffer layer (which does no verification of its own) becomes one :class:`ModelFileError` line
naming the file. Writing keeps what TFLM uses and drops the rest: metadata, signature defs, tensor
min/max, shape signatures and variable flags are not written, and every operator code gets version 1
(TFLM ignores operator versions).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from fedtiny.errors import ModelFileError
from fedtiny.int8.resolver import kind_for_tflite, tflite_ops

__all__ = [
    "SUPPORTED_OPS",
    "supported_ops",
    "TensorDesc",
    "OpDesc",
    "TFLiteGraph",
    "read_tflite",
    "write_tflite",
    "check_supported",
    "float_edges",
    "ModelFileError",
]


# Every operator a registered op kind reads; PAD, which folds into the convolution after it; DEQUANTIZE of
# the graph's output (a QUANTIZE of a float input folds into the model's input quantization).
def supported_ops() -> tuple[str, ...]:
    """The operators fedtiny reads (the registry's, looked up when asked: a kind registered later counts)."""
    return (*tflite_ops(), "PAD", "DEQUANTIZE")


SUPPORTED_OPS = supported_ops()  # at import
_FOLDED_INDEX_INPUTS = {"PAD": (1,)}  # the paddings

_ALIGN = 16  # TFLM reads constants in place: their bytes must start on a 16-byte boundary of the model
_VERSION = 3  # the only schema version TFLite and TFLM accept
_MAX_OP_CODE = 127  # deprecated_builtin_code is an int8: codes above it store this placeholder
_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
# TensorType names (lower-cased) whose constants are plain fixed-size NumPy arrays.
_ARRAY_TYPES = frozenset(
    {
        "float16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "bool",
        "complex64",
        "complex128",
    }
)
# Option fields spelled the short way; every other field is the camelCase name in snake_case.
_OPTION_NAMES = {
    "strideH": "stride_h",
    "strideW": "stride_w",
    "dilationHFactor": "dilation_h",
    "dilationWFactor": "dilation_w",
    "filterHeight": "filter_h",
    "filterWidth": "filter_w",
    "fusedActivationFunction": "fused_activation",
}
# Options tables whose name is not the operator's name in CamelCase.
_OPTION_TABLES = {
    "MEAN": "ReducerOptions",
    "AVERAGE_POOL_2D": "Pool2DOptions",
    "MAX_POOL_2D": "Pool2DOptions",
    "L2_POOL_2D": "Pool2DOptions",
}


@dataclass(eq=False)
class TensorDesc:
    """One tensor: ``data`` holds a constant's contents, ``None`` for an activation.

    ``scales``/``zeros`` are ``None`` when the tensor is not quantized; one entry is per-tensor
    quantization, more are per channel along ``quantized_dimension``. Equality compares arrays by
    dtype, shape and values.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    scales: np.ndarray | None
    zeros: np.ndarray | None
    quantized_dimension: int = 0
    data: np.ndarray | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorDesc):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))


@dataclass
class OpDesc:
    """One operator: its builtin name, tensor indices (-1: absent optional input) and options."""

    op: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options: dict


@dataclass
class TFLiteGraph:
    """A single-subgraph model: tensors, operators in execution order, graph inputs and outputs."""

    tensors: list[TensorDesc]
    ops: list[OpDesc]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    description: str = ""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(np.array_equal(a, b))
        )
    return bool(a == b)


@functools.cache
def _schema() -> ModuleType:
    # tflite_micro is optional and takes ~30 ms to import: loaded when a .tflite file is read or written
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated

    return schema_py_generated


def _enum(cls_name: str) -> dict[int, str]:
    """Value -> name of one of the schema's enum classes."""
    return {v: k for k, v in vars(getattr(_schema(), cls_name)).items() if not k.startswith("_")}


@functools.cache
def _enums() -> dict[str, dict[int, str]]:
    # Option fields holding an enum, by the schema's field name.
    return {
        "padding": _enum("Padding"),
        "fusedActivationFunction": _enum("ActivationFunctionType"),
        "weightsFormat": _enum("FullyConnectedOptionsWeightsFormat"),
    }


def _fail(where: str, what: str) -> ModelFileError:
    return ModelFileError(f"{where}: {what}")


# ---------------------------------------------------------------------------------------------------- reading


def read_tflite(source: bytes | str | os.PathLike, *, where: str | None = None) -> TFLiteGraph:
    """Read a single-subgraph ``.tflite`` model.

    Parameters
    ----------
    source : bytes or path
        The model's bytes, or the file holding them.
    where : str, optional
        How error messages name the model (default: the path, or ``"<bytes>"``).

    Returns
    -------
    TFLiteGraph

    Raises
    ------
    ModelFileError
        The file cannot be read, is not a TFLite model, is damaged, or holds more than one subgraph,
        an index, size or quantization that does not fit, or data fedtiny cannot represent.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        where = where or "<bytes>"
        data = bytes(source)
    else:
        where = where or os.fspath(source)
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise _fail(where, f"cannot read the model file ({exc.strerror or exc})") from None
    try:
        return _parse(data, where)
    except ModelFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - the flatbuffer layer fails in any way on damaged bytes
        kind = type(exc).__qualname__
        if type(exc).__module__ != "builtins":  # struct.error reads better than error
            kind = f"{type(exc).__module__}.{kind}"
        detail = " ".join(str(exc).split())[:160]
        raise _fail(where, f"damaged or truncated flatbuffer ({kind}: {detail})") from None


def _parse(data: bytes, where: str) -> TFLiteGraph:
    s = _schema()
    if len(data) < 8:
        raise _fail(where, f"{len(data)} bytes is too short for a TFLite model")
    if data[4:8] != b"TFL3":
        raise _fail(where, f"not a TFLite model (file identifier {data[4:8]!r}, expected b'TFL3')")
    model = s.Model.GetRootAs(data, 0)
    if model.Version() != _VERSION:
        raise _fail(where, f"schema version {model.Version()} (TFLite models are version {_VERSION})")
    if model.SubgraphsLength() != 1:
        raise _fail(where, f"{model.SubgraphsLength()} subgraphs; fedtiny reads single-subgraph models only")
    raw_graph = model.Subgraphs(0)
    for count, what in (
        (model.OperatorCodesLength(), "operator codes"),
        (model.BuffersLength(), "buffers"),
        (raw_graph.TensorsLength(), "tensors"),
        (raw_graph.OperatorsLength(), "operators"),
    ):
        if 4 * count > len(data):  # each entry takes at least a 4-byte offset
            raise _fail(where, f"claims {count} {what}, more than {len(data)} bytes can hold")
    buffers = [_buffer_bytes(model.Buffers(i), i, data, where) for i in range(model.BuffersLength())]
    op_names = [
        _op_name(s.OperatorCodeT.InitFromObj(model.OperatorCodes(i)), i, where)
        for i in range(model.OperatorCodesLength())
    ]
    sub = s.SubGraphT.InitFromObj(raw_graph)
    tensors = [_tensor(t, i, buffers, where) for i, t in enumerate(sub.tensors or [])]
    ops = [_op(o, k, op_names, len(tensors), data, where) for k, o in enumerate(sub.operators or [])]
    return TFLiteGraph(
        tensors,
        ops,
        _indices(sub.inputs, len(tensors), "graph input", where),
        _indices(sub.outputs, len(tensors), "graph output", where),
        _text(model.Description()),
    )


def _text(raw: bytes | str | None) -> str:
    return raw.decode("utf-8") if isinstance(raw, bytes) else (raw or "")


def _outside(data: bytes, offset: int, size: int, what: str, where: str) -> bytes:
    """Bytes stored after the flatbuffer (models over 2 GB do this), by offset from the file's start."""
    if offset + size > len(data):
        raise _fail(
            where, f"{what} at bytes {offset}..{offset + size} lies beyond the end of the file ({len(data)} bytes)"
        )
    return data[offset : offset + size]


def _buffer_bytes(buf: Any, i: int, data: bytes, where: str) -> np.ndarray | bytes:
    if buf.Offset() > 1:  # TFLite's rule: offset 0 and the placeholder 1 mean "in the flatbuffer"
        return _outside(data, buf.Offset(), buf.Size(), f"buffer {i}", where)
    if buf.DataIsNone():
        return b""
    try:
        return buf.DataAsNumpy()
    except ValueError:
        raise _fail(
            where, f"buffer {i} claims {buf.DataLength()} bytes, past the end of the file ({len(data)} bytes)"
        ) from None


def _op_name(code: Any, i: int, where: str) -> str:
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)  # as TFLite resolves it
    name = _enum("BuiltinOperator").get(builtin)
    if name is None:
        raise _fail(where, f"operator code {i} has unknown builtin code {builtin}")
    if name == "CUSTOM":
        return f"CUSTOM:{_text(code.customCode)}"
    return name


def _indices(values: Any, count: int, what: str, where: str, *, optional: bool = False) -> tuple[int, ...]:
    out = tuple(int(v) for v in (values if values is not None else ()))
    low = -1 if optional else 0
    for v in out:
        if not low <= v < count:
            raise _fail(where, f"{what} refers to tensor {v}, but there are {count} tensors")
    return out


def _tensor(t: Any, i: int, buffers: list, where: str) -> TensorDesc:
    name = _text(t.name)
    label = f"tensor {i} {name!r}"
    dtype = _enum("TensorType").get(t.type)
    if dtype is None:
        raise _fail(where, f"{label} has unknown type code {t.type}")
    dtype = dtype.lower()
    shape = tuple(int(d) for d in (t.shape if t.shape is not None else ()))
    if any(d < 0 for d in shape):
        raise _fail(where, f"{label} has negative dimensions {shape}")
    if t.sparsity is not None or t.externalBuffer:
        raise _fail(where, f"{label} is sparse or stored in an external file, which fedtiny does not read")
    if not 0 <= t.buffer < len(buffers):
        raise _fail(where, f"{label} refers to buffer {t.buffer}, but there are {len(buffers)} buffers")
    scales, zeros, qdim = _quantization(t.quantization, label, where)
    raw = buffers[t.buffer]
    return TensorDesc(
        name, shape, dtype, scales, zeros, qdim, _constant(raw, shape, dtype, label, where) if len(raw) else None
    )


def _quantization(q: Any, label: str, where: str) -> tuple[np.ndarray | None, np.ndarray | None, int]:
    if q is None or q.scale is None or len(q.scale) == 0:
        return None, None, 0
    if q.detailsType:
        raise _fail(where, f"{label} has custom or block-wise quantization, which fedtiny does not read")
    scales = np.asarray(q.scale, dtype=np.float32).copy()
    zeros = (
        np.zeros(len(scales), np.int64)
        if q.zeroPoint is None or len(q.zeroPoint) == 0
        else np.asarray(q.zeroPoint, dtype=np.int64).copy()
    )
    # As TFLM reads them: the arrays as written, whatever their lengths and quantized dimension (converters
    # write per-channel fields on biases, one zero point for many scales, ...). An activation uses the first
    # scale and zero point; a weight's per-channel scales are checked where an operator uses them
    # (check_supported, as TFLM's Prepare functions do).
    return scales, zeros, int(q.quantizedDimension)


def _constant(raw: np.ndarray | bytes, shape: tuple[int, ...], dtype: str, label: str, where: str) -> np.ndarray:
    if dtype not in _ARRAY_TYPES:
        raise _fail(where, f"{label} holds constant data of type {dtype}, which fedtiny does not read")
    item = np.dtype(dtype).newbyteorder("<")  # flatbuffers are little-endian
    need = item.itemsize * int(np.prod(shape, dtype=object))  # Python ints: no overflow on absurd shapes
    if len(raw) != need:
        raise _fail(where, f"{label} of shape {shape} and type {dtype} needs {need} bytes, its buffer holds {len(raw)}")
    return np.frombuffer(raw, dtype=item).astype(dtype).reshape(shape)  # a copy: the caller may edit it


def _op(o: Any, k: int, op_names: list[str], n_tensors: int, data: bytes, where: str) -> OpDesc:
    if not 0 <= o.opcodeIndex < len(op_names):
        raise _fail(where, f"operator {k} uses operator code {o.opcodeIndex}, but there are {len(op_names)}")
    name = op_names[o.opcodeIndex]
    if o.builtinOptions2Type:
        raise _fail(where, f"operator {k} ({name}) has extended options, which fedtiny does not read")
    options = _options_dict(o.builtinOptions)
    if name.startswith("CUSTOM:"):
        name, options["custom_code"] = "CUSTOM", name[len("CUSTOM:") :]
        if o.largeCustomOptionsOffset > 1:
            options["custom_options"] = _outside(
                data, o.largeCustomOptionsOffset, o.largeCustomOptionsSize, f"operator {k}'s custom options", where
            )
        elif o.customOptions is not None:
            options["custom_options"] = bytes(np.asarray(o.customOptions, dtype=np.uint8))
    label = f"operator {k} ({name})"
    return OpDesc(
        name,
        _indices(o.inputs, n_tensors, f"{label} input", where, optional=True),
        _indices(o.outputs, n_tensors, f"{label} output", where),
        options,
    )


def _option_key(field: str) -> str:
    return _OPTION_NAMES.get(field) or re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", field).lower()


def _plain(value: Any) -> Any:
    if isinstance(value, (np.ndarray, list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def _options_dict(options: Any) -> dict:
    if options is None:
        return {}
    out = {}
    for field, value in vars(options).items():
        if value is None:  # an absent vector: leave it out, writing leaves it out again
            continue
        names = _enums().get(field)
        out[_option_key(field)] = names.get(value, value) if names and isinstance(value, int) else _plain(value)
    return out


# ---------------------------------------------------------------------------------------------------- writing


class _Buffer:
    """Stands in for the schema's ``BufferT``: its ``Pack`` starts the bytes on a 16-byte boundary.

    ``BufferT.Pack`` aligns a byte vector to 1 byte only; the builder aligns from the end of the
    buffer and pads the whole file to its largest alignment, so this alignment holds from the start.
    """

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def Pack(self, builder: Any) -> int:  # noqa: N802 - the name ModelT.Pack calls
        s = _schema()
        vector = None
        if self.raw:
            builder.StartVector(1, len(self.raw), _ALIGN)
            builder.head -= len(self.raw)  # what the builder's own CreateNumpyVector does
            builder.Bytes[builder.head : builder.head + len(self.raw)] = self.raw
            vector = builder.EndVector()
        s.BufferStart(builder)
        if vector is not None:
            s.BufferAddData(builder, vector)
        return s.BufferEnd(builder)


def write_tflite(graph: TFLiteGraph) -> bytes:
    """The ``.tflite`` bytes of ``graph``: schema version 3, one subgraph, constants 16-byte aligned.

    Buffer 0 is the empty sentinel every activation refers to; each constant gets its own buffer.

    Raises
    ------
    ModelFileError
        A constant's data does not match its tensor's shape and type, or an operator's options do not
        fit its options table.
    """
    import flatbuffers  # comes only with the optional tflite_micro

    s = _schema()
    codes: dict[str, int] = {}
    operator_codes, operators = [], []
    for k, op in enumerate(graph.ops):
        custom_code = str(op.options.get("custom_code", ""))
        key = f"CUSTOM:{custom_code}" if op.op == "CUSTOM" else op.op
        if key not in codes:
            codes[key] = len(operator_codes)
            operator_codes.append(_operator_code(op.op, custom_code, k))
        operators.append(_operator(op, k, codes[key]))
    buffers: list[_Buffer] = [_Buffer(b"")]
    tensors = []
    for i, t in enumerate(graph.tensors):
        index = 0
        if t.data is not None:
            index = len(buffers)
            buffers.append(_Buffer(_tensor_bytes(t, i)))
        tensors.append(_tensor_table(t, i, index))
    sub = s.SubGraphT(
        tensors=tensors, inputs=list(graph.inputs), outputs=list(graph.outputs), operators=operators, name="main"
    )
    model = s.ModelT(
        version=_VERSION, operatorCodes=operator_codes, subgraphs=[sub], description=graph.description, buffers=buffers
    )
    builder = flatbuffers.Builder(1024 + sum(len(b.raw) + _ALIGN for b in buffers))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _operator_code(name: str, custom_code: str, k: int) -> Any:
    s = _schema()
    code = getattr(s.BuiltinOperator, name, None)
    if code is None:
        raise ModelFileError(f"write_tflite: operator {k} is {name!r}, not a TFLite builtin operator")
    return s.OperatorCodeT(
        deprecatedBuiltinCode=min(code, _MAX_OP_CODE),
        builtinCode=code,
        version=1,
        customCode=custom_code if name == "CUSTOM" else None,
    )


def _options_table(op: str) -> str | None:
    """The BuiltinOptions member of ``op``: its CamelCase name + "Options" unless listed."""
    camel = "".join(p.capitalize() if p[:1].isalpha() else p for p in op.split("_"))  # CONV_2D -> Conv2D
    name = _OPTION_TABLES.get(op) or camel + "Options"
    return name if getattr(_schema().BuiltinOptions, name, 0) else None


def _operator(op: OpDesc, k: int, code: int) -> Any:
    s = _schema()
    options = {key: v for key, v in op.options.items() if key not in ("custom_code", "custom_options")}
    table = _options_table(op.op)
    built, kind = None, 0
    if table is not None:
        cls = getattr(s, table + "T")
        fields_of = {_option_key(f): f for f in vars(cls())}
        # No options and a table with fields: the file had none, so write none (TFLM uses defaults).
        if options or not fields_of:
            built, kind = cls(), getattr(s.BuiltinOptions, table)
            for key, value in options.items():
                if key not in fields_of:
                    raise ModelFileError(
                        f"write_tflite: operator {k} ({op.op}) has option {key!r}, not a field of {table}"
                    )
                setattr(built, fields_of[key], _stored(fields_of[key], value, op.op, k))
    elif options:
        raise ModelFileError(
            f"write_tflite: operator {k} ({op.op}) has options {sorted(options)} but fedtiny "
            f"does not know its options table"
        )
    custom = op.options.get("custom_options")
    return s.OperatorT(
        opcodeIndex=code,
        inputs=list(op.inputs),
        outputs=list(op.outputs),
        builtinOptionsType=kind,
        builtinOptions=built,
        customOptions=np.frombuffer(custom, np.uint8) if custom is not None else None,
    )


def _stored(field: str, value: Any, op: str, k: int) -> Any:
    """An option's plain value as the options table stores it (enum names back to numbers)."""
    names = _enums().get(field)
    if names and isinstance(value, str):
        numbers = {name: number for number, name in names.items()}
        if value not in numbers:
            raise ModelFileError(
                f"write_tflite: operator {k} ({op}) has {_option_key(field)} {value!r}, not one of {sorted(numbers)}"
            )
        return numbers[value]
    return list(value) if isinstance(value, tuple) else value


def _tensor_bytes(t: TensorDesc, i: int) -> bytes:
    data = t.data
    assert data is not None
    if t.dtype not in _ARRAY_TYPES or data.dtype != np.dtype(t.dtype) or tuple(data.shape) != tuple(t.shape):
        raise ModelFileError(
            f"write_tflite: tensor {i} {t.name!r} is {t.dtype} {tuple(t.shape)} but its data is "
            f"{data.dtype} {tuple(data.shape)}"
        )
    return np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).tobytes()


def _tensor_table(t: TensorDesc, i: int, buffer: int) -> Any:
    s = _schema()
    code = getattr(s.TensorType, t.dtype.upper(), None)
    if code is None:
        raise ModelFileError(f"write_tflite: tensor {i} {t.name!r} has type {t.dtype!r}, not a TFLite tensor type")
    quantization = None
    if t.scales is not None:
        zeros = t.zeros if t.zeros is not None else np.zeros(len(t.scales), np.int64)
        quantization = s.QuantizationParametersT(
            scale=np.asarray(t.scales, np.float32),
            zeroPoint=np.asarray(zeros, np.int64),
            quantizedDimension=int(t.quantized_dimension),
        )
    return s.TensorT(
        shape=np.asarray(t.shape, np.int32), type=code, buffer=buffer, name=t.name, quantization=quantization
    )


# ---------------------------------------------------------------------------------------------------- checking


def check_supported(graph: TFLiteGraph, where: str) -> None:
    """Refuse, in one line naming the operator or tensor, what fedtiny's int8 graph cannot run.

    Supported: the :data:`SUPPORTED_OPS` on int8 activations, with int32 biases, int32/int64 shape and
    padding inputs (RESHAPE, PAD), constant symmetric int8 weights and no dilation.

    Raises
    ------
    ModelFileError
        The first unsupported operator, else the first offending tensor or option.
    """
    unsupported: dict[str, int] = {}  # each operator fedtiny lacks, at its first index
    for k, op in enumerate(graph.ops):
        if op.op not in supported_ops():
            name = f"CUSTOM ({op.options.get('custom_code', '')})" if op.op == "CUSTOM" else op.op
            unsupported.setdefault(name, k)
    if unsupported:
        named = ", ".join(f"operator {k} is {name}" for name, k in unsupported.items())
        raise _fail(where, f"{named}, which fedtiny does not support (supported: {', '.join(supported_ops())})")
    edges = float_edges(graph)
    for i in (*graph.inputs, *graph.outputs):
        if i not in edges:
            _check_int8(graph, i, "graph input or output", where)
    for k, op in enumerate(graph.ops):
        label = f"operator {k} ({op.op})"
        for pos, i in enumerate(op.inputs):
            if i < 0:
                continue
            t = graph.tensors[i]
            if op.op in _WEIGHTED and pos == 2:
                if t.data is None or t.dtype != "int32":
                    raise _fail(
                        where,
                        f"{label}: bias tensor {i} {t.name!r} must be a constant int32 "
                        f"(it is {'a constant ' if t.data is not None else 'an activation '}{t.dtype})",
                    )
            elif pos in _index_inputs(op.op):
                if t.dtype not in ("int32", "int64"):
                    raise _fail(
                        where,
                        f"{label}: shape, padding or index tensor {i} {t.name!r} is {t.dtype}, expected int32 or int64",
                    )
            elif i not in edges:
                _check_int8(graph, i, f"{label} input", where)
                if op.op in _WEIGHTED and pos == 1:
                    _check_weights(t, i, label, op.op, where)
        if op.op == "DEQUANTIZE" and op.outputs[0] not in edges:
            raise _fail(where, f"{label}: fedtiny dequantizes only the graph's output (its logits)")
        for i in op.outputs:
            if i not in edges:
                _check_int8(graph, i, f"{label} output", where)
        dilation = (op.options.get("dilation_h", 1), op.options.get("dilation_w", 1))
        if dilation != (1, 1):
            raise _fail(where, f"{label} has dilation {dilation[0]}x{dilation[1]}; fedtiny supports dilation 1 only")


def float_edges(graph: TFLiteGraph) -> set[int]:
    """The float32 tensors at the graph's edges fedtiny folds away: a graph input read only by QUANTIZE ops
    (the model's input quantization) and a graph output written by DEQUANTIZE (its float logits)."""
    edges = set()
    for i in graph.inputs:
        readers = [op for op in graph.ops if i in op.inputs]
        if graph.tensors[i].dtype == "float32" and readers and all(op.op == "QUANTIZE" for op in readers):
            edges.add(i)
    for op in graph.ops:
        if op.op == "DEQUANTIZE" and op.outputs[0] in graph.outputs and graph.tensors[op.outputs[0]].dtype == "float32":
            edges.add(op.outputs[0])
    return edges


def _index_inputs(op: str) -> tuple[int, ...]:
    """Positions of the operator's constant integer inputs (a shape, paddings, axes, slice bounds)."""
    kind = kind_for_tflite(op)
    return kind.index_inputs.get(op, ()) if kind is not None else _FOLDED_INDEX_INPUTS.get(op, ())


def _check_int8(graph: TFLiteGraph, i: int, what: str, where: str) -> None:
    t = graph.tensors[i]
    if t.dtype != "int8":
        raise _fail(where, f"{what}: tensor {i} {t.name!r} is {t.dtype}; fedtiny runs int8 tensors only")
    if t.scales is None:
        raise _fail(where, f"{what}: int8 tensor {i} {t.name!r} has no quantization parameters")
    if not (np.all(np.isfinite(t.scales)) and np.all(t.scales > 0)):
        raise _fail(where, f"{what}: tensor {i} {t.name!r} has a scale that is not positive and finite")


def _check_weights(t: TensorDesc, i: int, label: str, op: str, where: str) -> None:
    if t.data is None:
        raise _fail(where, f"{label}: weights tensor {i} {t.name!r} is not a constant")
    axis = 3 if op == "DEPTHWISE_CONV_2D" else 0
    outputs = t.shape[axis] if len(t.shape) > axis else 0
    if len(t.scales) not in (1, outputs):  # TFLM's Prepare: one scale, or one per output channel
        raise _fail(
            where,
            f"{label}: weights tensor {i} {t.name!r} has {len(t.scales)} scales for {outputs} "
            "output channels (one, or one per output channel)",
        )
    assert t.zeros is not None  # _check_int8 saw its scales
    if np.any(t.zeros != 0):  # every zero point written, however many
        raise _fail(
            where,
            f"{label}: weights tensor {i} {t.name!r} has zero point {int(t.zeros[t.zeros != 0][0])}; "
            f"fedtiny needs symmetric weights (zero point 0)",
        )
