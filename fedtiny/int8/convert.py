"""Post-training quantization: fold BatchNorm, calibrate activation ranges, quantize to a :class:`QModel`.

One path for every float model (tiny-ir, torchvision's MobileNetV2, a scenario's
``model.module``): :func:`fedtiny.int8.trace.trace` reads the network with torch.fx into a
:class:`~fedtiny.int8.trace.FloatGraph` (float, BatchNorm folded, the int8 graph's layout),
:func:`calibrate` records activation ranges, :func:`quantize` builds the int8 graph.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedtiny.errors import ModelFileError
from fedtiny.int8.graph import QModel
from fedtiny.int8.trace import INPUT_SCALE, INPUT_ZERO, ActRange, FloatGraph, calibrate, quantize, trace

__all__ = ["FloatGraph", "fold", "calibrate", "quantize", "ptq", "ActRange", "INPUT_SCALE", "INPUT_ZERO"]


def fold(model: nn.Module, example: torch.Tensor | np.ndarray | None = None) -> FloatGraph:
    """The float graph of ``model`` with BatchNorm folded (``forward`` returns its logits).

    ``example`` (``N x C x H x W``) gives the shapes to trace with; by default a 32x32 image with
    the first convolution's channels.
    """
    if example is None:
        conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise ModelFileError(f"{type(model).__name__}: no Conv2d; pass an example input")
        example = torch.zeros(1, conv.in_channels, 32, 32)
    return trace(model, torch.as_tensor(example, dtype=torch.float32))


def ptq(
    model: nn.Module, calibration: np.ndarray, *, batch_size: int = 128, classifier_precision: str = "int8"
) -> QModel:
    """Post-training quantization of ``model`` calibrated on images ``calibration`` (N x C x H x W in [0, 1])."""
    graph = trace(model, torch.as_tensor(calibration[:1], dtype=torch.float32))
    batches = [calibration[i : i + batch_size] for i in range(0, len(calibration), batch_size)]
    qmodel = quantize(graph, calibrate(graph, batches), classifier_precision=classifier_precision)
    qmodel.input_shape = tuple(int(v) for v in calibration.shape[1:])
    return qmodel
