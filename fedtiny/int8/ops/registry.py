"""The registry of op kinds, as TFLM's op resolver registers kernels: a kind is looked up, never a branch.

Each kind of op of the int8 graph is one :class:`OpKind`, registered by the module that defines it
(``fedtiny/int8/ops/<kind>.py``). The kind's module class carries the op's forward, backward and
step events (:meth:`schedule`); the kind adds how the op is read from and written to a ``.tflite``
file, described in and built from fedtiny's model file, and filled into the C step's op table.
The graph, the memory planner, the converter, the model file and the C binding look a module's kind
up (:func:`kind_of`) and call it; none of them tests an op's class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from fedtiny.errors import ModelFileError

__all__ = ["OpKind", "register", "kind_of", "kind_named", "kind_for_tflite", "kinds", "tflite_ops"]


@dataclass(frozen=True)
class OpKind:
    """One kind of op.

    Attributes
    ----------
    name
        The kind's name, also the ``op`` of the model file's layout (``conv``, ``add``, ...).
    module
        The :class:`torch.nn.Module` that runs it: ``run(inputs, wiring, quiet)`` (forward and, through
        autograd, the exact backward) and ``schedule(in_shapes, wiring, need)`` (the buffers of a step).
    tflite
        The ``.tflite`` builtin operators imported as this kind.
    read
        ``read(reader, k, op) -> (module, input names)``: operator ``k`` of a ``.tflite`` graph as this
        kind (the reader names tensors and quantization; see :mod:`fedtiny.int8.tfl_convert`).
    write
        ``write(writer, module, name, inputs) -> Written``: the op back into a ``.tflite`` graph.
    describe, build
        The op's layout in the model file (plain JSON values, without ``op``) and the module (with
        placeholder values) built from it; ``build`` raises :class:`ModelFileError` naming what is wrong.
    c_kind, c_fill
        The C step's op kind (``enum ft_op_kind`` in ``fedtiny_step.h``) and ``c_fill(step, op, module,
        in_ids, in_shape)``, which sets the kind's fields of one ``ft_op``; ``None``: the C step does not
        run this kind (training falls back to the simulator's step).
    view
        The op writes no buffer of its own (a reshape: a view of its input on the device).
    index_inputs
        Per ``.tflite`` operator, the positions of its constant integer inputs (a shape, axes, slice
        bounds), which the reader accepts as int32 or int64 rather than int8 activations.
    """

    name: str
    module: type[nn.Module]
    tflite: tuple[str, ...] = ()
    read: Callable[..., tuple[nn.Module, tuple[str, ...]]] | None = None
    write: Callable[..., Any] | None = None
    describe: Callable[[nn.Module], dict[str, Any]] = lambda m: {}
    build: Callable[[dict[str, Any], str], nn.Module] | None = None
    c_kind: int | None = None
    c_fill: Callable[..., None] | None = None
    view: bool = False
    index_inputs: dict[str, tuple[int, ...]] = field(default_factory=dict)


_BY_NAME: dict[str, OpKind] = {}
_BY_CLASS: dict[type, OpKind] = {}
_BY_TFLITE: dict[str, OpKind] = {}


def register(kind: OpKind) -> OpKind:
    """Add ``kind`` (once: a name, class or ``.tflite`` operator taken twice is a bug)."""
    taken = (
        [f"name {kind.name!r}"] * (kind.name in _BY_NAME)
        + [f"class {kind.module.__name__}"] * (kind.module in _BY_CLASS)
        + [f"operator {t}" for t in kind.tflite if t in _BY_TFLITE]
    )
    if taken:
        raise ValueError(f"op kind {kind.name!r}: {', '.join(taken)} already registered")
    _BY_NAME[kind.name] = kind
    _BY_CLASS[kind.module] = kind
    for t in kind.tflite:
        _BY_TFLITE[t] = kind
    return kind


def kind_of(module: nn.Module) -> OpKind:
    """The kind of a graph op's module."""
    try:
        return _BY_CLASS[type(module)]
    except KeyError:
        raise ModelFileError(
            f"op {getattr(module, 'tag', '?')!r} is a {type(module).__name__}, "
            f"not a registered op kind ({', '.join(_BY_NAME)})"
        ) from None


def kind_named(name: Any, where: str = "model") -> OpKind:
    """The kind called ``name`` (a model file's ``op``)."""
    kind = _BY_NAME.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ModelFileError(f"{where}: unknown op {name!r} (known: {', '.join(_BY_NAME)})")
    return kind


def kind_for_tflite(op: str) -> OpKind | None:
    """The kind a ``.tflite`` builtin operator is imported as (None: not one fedtiny runs)."""
    return _BY_TFLITE.get(op)


def kinds() -> tuple[OpKind, ...]:
    """Every registered kind, in registration order."""
    return tuple(_BY_NAME.values())


def tflite_ops() -> tuple[str, ...]:
    """Every ``.tflite`` builtin operator some kind imports."""
    return tuple(_BY_TFLITE)
