"""``fedtiny zoo``: import int8 MCU models, export .tflite, run a model's int8 graph, check it against TFLM."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtiny.errors import ModelFileError
from fedtiny.int8.graph import QModel
from fedtiny.int8.modelfile import save_qmodel
from fedtiny.int8.tfl_convert import export_tflite
from fedtiny.scenario import load_scenario, parse_overrides
from fedtiny.tools.commands.output import print_result
from fedtiny.tools.models import check_against_tflm, cloud_model_file, open_model

__all__ = [
    "cmd_zoo_import",
    "cmd_zoo_export",
    "cmd_zoo_run",
    "cmd_zoo_check",
    "cmd_zoo_cloud",
    "cmd_zoo_info",
    "model_info",
]


def cmd_zoo_import(args: argparse.Namespace) -> int:
    """``fedtiny zoo import``: a .tflite or tiny-training .pkl, read safely, written as a fedtiny model file."""
    model = open_model(args.file)
    info = model_info(model)
    save_qmodel(model, args.out)
    info["written"] = str(args.out)
    print_result(info, args.json)
    return 0


def cmd_zoo_export(args: argparse.Namespace) -> int:
    """``fedtiny zoo export``: any model as a .tflite that TensorFlow Lite Micro runs unchanged."""
    model = open_model(args.file)
    info = model_info(model)
    export_tflite(model, args.out, description=f"fedtiny export of {args.file}")
    info["written"] = str(args.out)
    print_result(info, args.json)
    return 0


def cmd_zoo_info(args: argparse.Namespace) -> int:
    """``fedtiny zoo info``: a model validated, and its facts."""
    print_result(model_info(open_model(args.file)), args.json)
    return 0


def cmd_zoo_cloud(args: argparse.Namespace) -> int:
    """``fedtiny zoo cloud``: a scenario's cloud step, its int8 model written."""
    result = cloud_model_file(load_scenario(args.scenario, parse_overrides(args.overrides)), args.out)
    print_result(result, args.json)
    return 0


def cmd_zoo_check(args: argparse.Namespace) -> int:
    """``fedtiny zoo check``: the model's int8 graph against TFLM's reference kernels; 1 when any element differs."""
    result = check_against_tflm(args.file, args.inputs, args.seed)
    print_result(result, args.json)
    return 0 if result["output_elements_differing"] == 0 and result["tensor_elements_differing"] == 0 else 1


def cmd_zoo_run(args: argparse.Namespace) -> int:
    """``fedtiny zoo run``: int8 inputs (leading batch, the model's own layout) -> its int8 output tensor."""
    nhwc = Path(args.file).suffix == ".tflite"
    try:
        x = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"--input {args.input}: not a readable .npy file ({exc})") from None
    model = open_model(args.file)
    want = tuple(model.input_shape)
    c, h, w = want
    shape = (h, w, c) if nhwc else want
    if h == w == 1 and x.ndim == 2:  # a [N, C] input (an FC model)
        shape = (c,)
    if x.dtype != np.int8 or tuple(x.shape[1:]) != shape:
        raise ModelFileError(
            f"--input {args.input}: expected int8 of shape [N, {', '.join(map(str, shape))}] "
            f"({'NHWC' if nhwc else 'NCHW'}), got {x.dtype} {list(x.shape)}"
        )
    t = torch.from_numpy(x.astype(np.float32)).reshape(len(x), *((h, w, c) if nhwc else want))
    if nhwc:
        t = t.permute(0, 3, 1, 2)
    y = model.int8_forward(t)
    last = model.op(model.nodes[-1].op)
    if tuple(y.shape[2:]) == (1, 1):
        y = y.flatten(1)  # [N, C]: a classifier's or an FC model's output
    elif nhwc:
        y = y.permute(0, 2, 3, 1)
    y = y.numpy().astype(np.int8)
    np.save(args.out, y, allow_pickle=False)
    if not args.quiet:
        print(
            f"wrote {args.out}: int8 {list(y.shape)} from {type(last).__name__} {model.nodes[-1].op}", file=sys.stderr
        )
    return 0


def model_info(model: QModel) -> dict[str, Any]:
    """A few facts about an int8 model, for ``fedtiny zoo``."""
    convs = model.convs()
    head = model.classifier
    return {
        "convolutions": len(convs),
        "ops": len(model.nodes),
        "adds": sum(type(model.op(n.op)).__name__ == "QAdd" for n in model.nodes),
        "depthwise": sum(c.is_depthwise for c in convs),
        "parameters": sum(p.numel() for p in model.parameters()),
        "classes": int(head.weight.shape[0]),
        "classifier_precision": "int8" if hasattr(head, "w_scales") else "fp32",
        "input_channels": model.input_channels,
    }
