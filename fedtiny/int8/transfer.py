"""Transfer learning's cloud step: a new classifier fitted on a pretrained int8 backbone.

A published model arrives with an ImageNet classifier. The server replaces it for the
scenario's classes (:func:`fedtiny.int8.graph.replace_head`) and, before round 1, fits the
new head on its public split: the backbone's int8 pooled features are computed once,
dequantized, and a float linear classifier is trained on them (seeded minibatch SGD with
momentum); its weights are then quantized into the int8 head (per-channel weight scales,
int32 bias, an output scale covering the logits seen) or copied into an fp32 head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedtiny.int8.graph import FloatHead, QConv, QModel, head_weight_scales

__all__ = ["HeadFit", "pooled_features", "fit_head"]


@dataclass(frozen=True)
class HeadFit:
    """The fitted float classifier (on dequantized features) and its training accuracy, float and installed."""

    weight: torch.Tensor
    bias: torch.Tensor
    train_accuracy: float
    float_train_accuracy: float

    def float_accuracy(self, model: QModel, x: np.ndarray, y: np.ndarray, prefixes=None) -> float:
        """Accuracy of the float classifier on the backbone's features of images ``x`` (from ``prefixes``,
        a :class:`~fedtiny.int8.prefix.PrefixStore` of the frozen backbone, when given)."""
        logits = pooled_features(model, x, prefixes=prefixes) @ self.weight.t() + self.bias
        return float((logits.argmax(1) == torch.from_numpy(np.asarray(y, np.int64))).float().mean())


def _head_input(model: QModel) -> tuple[float, int]:
    head = model.classifier
    if isinstance(head, QConv):
        return head.x_scale, head.x_zero
    return float(head.xparams[0]), int(head.xparams[1])


@torch.no_grad()
def pooled_features(model: QModel, x: np.ndarray, batch_size: int = 64, prefixes=None) -> torch.Tensor:
    """Dequantized pooled features (``N x C``, float32) of images ``x`` in [0, 1]; with ``prefixes``
    (a :class:`~fedtiny.int8.prefix.PrefixStore` of a model that trains nothing) the head's input is
    computed once and kept there for an evaluation of the same images."""
    model.eval()
    scale, zero = _head_input(model)
    cached = prefixes.get(model, x) if prefixes is not None else None
    if cached is not None and tuple(cached.tensors) == (model.head_input_name(),):
        return (cached.tensors[model.head_input_name()].to(torch.float32).flatten(1) - zero) * scale
    out = [model.features(torch.from_numpy(x[i : i + batch_size])).flatten(1) for i in range(0, len(x), batch_size)]
    return (torch.cat(out) - zero) * scale


def _install(model: QModel, w: torch.Tensor, b: torch.Tensor, logit_range: float) -> None:
    head = model.classifier
    with torch.no_grad():
        if isinstance(head, FloatHead):
            head.weight.copy_(w)
            head.bias.copy_(b)
            return
        x_scale = head.x_scale
        w_scales = head_weight_scales(w, per_tensor=head.kind == "fc")
        head.weight.copy_(torch.round(w / w_scales[:, None]).clamp(-127, 127).view_as(head.weight))
        head.bias.copy_(torch.round(b / (w_scales * x_scale)))
        head.w_scales.copy_(w_scales)
        head.qparams.copy_(torch.tensor([x_scale, head.x_zero, 2 * logit_range / 255, 0], dtype=torch.float64))


def fit_head(
    model: QModel,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 1e-4,
) -> HeadFit:
    """Fit ``model``'s classifier on images ``x`` (labels ``y``) with the backbone frozen; return its scores."""
    feats = pooled_features(model, x)
    labels = torch.from_numpy(np.asarray(y, np.int64))
    classes = model.classifier.weight.shape[0]
    # Standardized features make one learning rate fit any backbone; the scaling is folded back below.
    # Near-constant features (dead channels of a pruned backbone) must not get huge weights: once
    # clients fine-tune the backbone they move, and a huge weight would turn that into huge logits.
    std = feats.std(0)
    # Features constant on the public split (dead channels: many in a model trained for other data)
    # carry nothing here and take no weight; the others' floor comes from the live ones.
    live = std > 0
    ref = float(std[live].median()) if bool(live.any()) else 1.0
    mean, std = feats.mean(0), std.clamp_min(0.1 * ref + 1e-12)
    z = (feats - mean) / std
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(classes, feats.shape[1], generator=gen) / feats.shape[1] ** 0.5).requires_grad_()
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=lr, momentum=0.9, weight_decay=weight_decay)
    for _ in range(epochs):
        order = torch.randperm(len(z), generator=gen)
        for i in range(0, len(z), batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad()
            F.cross_entropy(z[idx] @ w.t() + b, labels[idx]).backward()
            opt.step()
    with torch.no_grad():
        w = w * live.to(w.dtype)
        w, b = w / std, b - (w / std) @ mean
        logits = feats @ w.t() + b
        float_acc = float((logits.argmax(1) == labels).float().mean())
        _install(model, w.detach(), b.detach(), logit_range=float(logits.abs().max()) * 1.1)
        scale, zero = _head_input(model)
        head_in = (feats / scale + zero).round().view(len(feats), -1, 1, 1)  # back to the int8 features
        out = model.classifier(head_in).flatten(1)
        acc = float((out.argmax(1) == labels).float().mean())
    return HeadFit(w.detach(), b.detach(), acc, float_acc)
