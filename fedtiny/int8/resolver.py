"""The op resolver: every op kind fedtiny's int8 graph runs, registered by importing its module.

As TFLM's ``MicroMutableOpResolver`` lists the kernels a firmware links, this module lists the kinds
(:mod:`fedtiny.int8.ops`, one module each); consumers look a module's kind up here. Adding a kind
is one module in ``fedtiny/int8/ops/`` and one name in the import below.
"""

# ruff: noqa: F401 (each module below is imported for what it registers: its kind)
from fedtiny.int8.ops import (
    activations,
    add,
    concat,
    conv,
    head,
    lookup,
    maxpool,
    mean,
    mul,
    pool,
    reshape,
    resize,
    slice,
    softmax,
)
from fedtiny.int8.ops.registry import OpKind, kind_for_tflite, kind_named, kind_of, kinds, register, tflite_ops

__all__ = ["OpKind", "register", "kind_of", "kind_named", "kind_for_tflite", "kinds", "tflite_ops"]
