"""A model's tensors as named float32 NumPy arrays, in a fixed order (the wire's order)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["model_arrays", "load_arrays", "trainable_names", "array_spec"]


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters a client trains (BatchNorm statistics stay frozen)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def model_arrays(model: nn.Module, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Return the floating-point tensors of ``model`` (all, or ``names``) as float32 arrays."""
    state = model.state_dict()
    keys = names if names is not None else [k for k, v in state.items() if v.is_floating_point()]
    return {k: state[k].detach().cpu().numpy().astype(np.float32, copy=True) for k in keys}


def load_arrays(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Copy named arrays into ``model``'s tensors (shapes must match)."""
    state = model.state_dict()
    with torch.no_grad():
        for k, v in arrays.items():
            if k not in state:
                raise KeyError(f"model has no tensor {k!r}")
            if tuple(state[k].shape) != tuple(v.shape):
                raise ValueError(f"tensor {k!r}: shape {tuple(v.shape)} != model's {tuple(state[k].shape)}")
            state[k].copy_(torch.from_numpy(np.asarray(v)))


def array_spec(model: nn.Module, names: list[str] | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of each tensor in wire order."""
    return [(k, tuple(v.shape)) for k, v in model_arrays(model, names).items()]
