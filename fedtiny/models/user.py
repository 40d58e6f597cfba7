"""A scenario's own PyTorch model: ``model.module = "package.module:function"`` or ``"path/to/file.py:function"``.

The function returns a float ``torch.nn.Module`` taking ``N x C x H x W`` images in [0, 1]
and returning ``[N, classes]`` logits. It is called with the keyword arguments it accepts
among ``in_channels``, ``num_classes`` and ``image_size`` (all of them when it takes
``**kwargs``), under ``torch.manual_seed(run.seed)``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fedtiny.errors import ScenarioError

__all__ = ["split_spec", "is_file_spec", "load_function", "module_problem", "build_user_model", "spec_name"]

KEY = "model.module"
ARGUMENTS = ("in_channels", "num_classes", "image_size")

_FILES: dict[tuple[str, int], object] = {}  # (path, mtime) -> the module loaded from that file


def split_spec(spec: str) -> tuple[str, str]:
    """``"where:function"`` -> ``(where, function)``; ScenarioError when it is not of that form."""
    where, sep, func = spec.rpartition(":")
    if not sep or not where.strip() or not func.isidentifier():
        raise ScenarioError(f'{KEY}: {spec!r}: expected "package.module:function" or "path/to/file.py:function"')
    return where.strip(), func


def is_file_spec(where: str) -> bool:
    """A file path (``.py`` or with a folder) rather than a dotted module name."""
    return where.endswith(".py") or "/" in where or "\\" in where


def spec_name(spec: str) -> str:
    """The function's name (what ``{model}`` stands for in ``train.scheme``)."""
    return spec.rpartition(":")[2]


def _load_file(path: Path):
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _FILES:
        name = "fedtiny_user_model_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"not a Python file: {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # classes defined there can be pickled and deep-copied
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        _FILES[key] = module
    return _FILES[key]


def load_function(spec: str) -> Callable[..., nn.Module]:
    """Import the function ``spec`` names; any failure is one ScenarioError naming the key and value."""
    where, func = split_spec(spec)
    try:
        if is_file_spec(where):
            path = Path(where)
            if not path.is_file():
                raise ScenarioError(f"{KEY}: {spec!r}: no such file {where}")
            module = _load_file(path)
        else:
            module = importlib.import_module(where)
    except ScenarioError:
        raise
    except Exception as exc:  # noqa: BLE001 (the user's code: any failure to import it is one line)
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ScenarioError(f"{KEY}: {spec!r}: cannot import {where}: {type(exc).__name__}: {first}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ScenarioError(f"{KEY}: {spec!r}: {where} has no function {func!r}")
    return fn


def module_problem(spec: str) -> str | None:
    """The scenario schema's check of ``model.module``: None, or what is wrong (empty is fine)."""
    if not spec:
        return None
    try:
        load_function(spec)
    except ScenarioError as exc:
        return str(exc).removeprefix(f"{KEY}: ")
    return None


def build_user_model(spec: str, in_channels: int, num_classes: int, *, image_size: int, seed: int = 0) -> nn.Module:
    """Call the function ``spec`` names (seeded) and check the model on one ``in_channels x image_size^2`` image."""
    fn = load_function(spec)
    offered = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = offered
    else:
        kwargs = {k: v for k, v in offered.items() if k in params}
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = fn(**kwargs)
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ScenarioError(f"{KEY}: {spec!r}: the function failed: {type(exc).__name__}: {first}") from None
    finally:
        torch.random.set_rng_state(state)
    if not isinstance(model, nn.Module):
        raise ScenarioError(f"{KEY}: {spec!r}: returned {type(model).__name__}, expected a torch.nn.Module")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, in_channels, image_size, image_size))
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ScenarioError(
            f"{KEY}: {spec!r}: the model fails on a {in_channels}x{image_size}x{image_size} input "
            f"(the data's images): {type(exc).__name__}: {first}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        hint = "" if "num_classes" in kwargs else " (let the function take num_classes)"
        raise ScenarioError(
            f"{KEY}: {spec!r}: the model returns {got} for one image, expected (1, {num_classes}) "
            f"logits for the data's {num_classes} classes{hint}"
        )
    return model
