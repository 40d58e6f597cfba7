"""A model's tensors as named NumPy arrays in their on-device dtypes, in a fixed order (the wire's order).

Modules say which of their tensors are integers on the device with a class
attribute ``WIRE_DTYPES`` (the int8 graph's convolutions: int8 weights, int32
biases); every other tensor keeps its float dtype.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedtiny.compress.dense import Spec, as_dtype

__all__ = ["model_arrays", "load_arrays", "trainable_names", "array_spec", "wire_dtype", "to_wire", "wire_arrays"]


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters a client trains (BatchNorm statistics and quantization scales stay frozen)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def wire_dtype(model: nn.Module, name: str, state: dict[str, torch.Tensor] | None = None) -> np.dtype:
    """The dtype of tensor ``name`` on the device (``state``: ``model.state_dict()`` when the caller has it:
    building it per tensor made a float client's round spend 43% of its time here, bench peers)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    declared = getattr(module, "WIRE_DTYPES", {}).get(attr)
    if declared:
        return np.dtype(declared)
    return np.dtype(str((model.state_dict() if state is None else state)[name].dtype).replace("torch.", ""))


def to_wire(a: torch.Tensor | np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Convert to ``dtype``; integer targets are rounded and saturated (float32 cannot hold every int32)."""
    return as_dtype(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a, dtype)


def model_arrays(model: nn.Module, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Return ``model``'s floating-point state (all, or ``names``) in on-device dtypes."""
    state = model.state_dict()
    keys = names if names is not None else [k for k, v in state.items() if v.is_floating_point()]
    return {k: to_wire(state[k], wire_dtype(model, k, state)) for k in keys}


def wire_arrays(state: dict[str, torch.Tensor], spec: Spec) -> dict[str, np.ndarray]:
    """The tensors of ``spec`` from a model's ``state_dict()`` in the spec's dtypes.

    For a spec of the model (:func:`array_spec`) this is :func:`model_arrays` of its names, without
    looking each tensor's wire dtype up in the model again.
    """
    return {name: to_wire(state[name], np.dtype(dt)) for name, _, dt in spec}


def load_arrays(model: nn.Module, arrays: dict[str, np.ndarray], state: dict[str, torch.Tensor] | None = None) -> None:
    """Copy named arrays into ``model``'s tensors (shapes must match; ``state``: ``model.state_dict()``
    when the caller has it)."""
    state = model.state_dict() if state is None else state
    with torch.no_grad():
        for k, v in arrays.items():
            if k not in state:
                raise KeyError(f"model has no tensor {k!r}")
            if tuple(state[k].shape) != tuple(v.shape):
                raise ValueError(f"tensor {k!r}: shape {tuple(v.shape)} != model's {tuple(state[k].shape)}")
            state[k].copy_(torch.from_numpy(np.asarray(v).astype(np.float64)))


def array_spec(model: nn.Module, names: list[str] | None = None) -> Spec:
    """``(name, shape, dtype)`` of each tensor in wire order."""
    return [(k, tuple(v.shape), str(v.dtype)) for k, v in model_arrays(model, names).items()]
