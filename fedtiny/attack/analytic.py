"""Analytic attacks: what a layer's update gives away without any optimization.

For a layer ``y = W x + b`` trained on one sample, the gradients are ``dW = g x^T`` and ``db = g``
(``g`` the gradient at ``y``): every row ``i`` with ``db_i != 0`` holds the layer's input exactly,
``x = dW_i / db_i``. With rounding on the wire (int8 values, top-k) the rows are noisy copies; the
least-squares estimate over the transmitted rows, ``x = sum_i db_i dW_i / sum_i db_i^2``, averages
the noise down. A FedAvg change after one local SGD step is ``-lr`` times the gradient, which
cancels in the ratio. The label of a single sample comes from the classifier's bias gradient,
``softmax - onehot``: its one negative entry (iDLG).

This is the first step of a malicious server's attacks (a server that sets the weights makes the
layer's input the image, or a part of it); on an honest model it returns the input of the chosen
layer (for tiny-ir's classifier: the pooled features, not the image).
"""

from __future__ import annotations

import torch

from fedtiny.errors import ScenarioError

__all__ = ["invert_layer", "labels_from_bias"]


def invert_layer(
    dw: torch.Tensor, db: torch.Tensor, mask_w: torch.Tensor | None = None, mask_b: torch.Tensor | None = None
) -> torch.Tensor:
    """The input of a linear layer (or a 1x1 convolution on a 1x1 map) from its update at batch 1.

    Parameters
    ----------
    dw, db
        Weight and bias updates for ``B`` independent targets: ``[B, out, in]`` (a 1x1 convolution's
        ``[B, out, in, 1, 1]`` is accepted) and ``[B, out]``.
    mask_w, mask_b
        Which coordinates were transmitted (top-k); rows are used only where both the bias and the
        weight coordinate were sent.

    Returns
    -------
    ``[B, in]``: ``sum_i db_i dW_i / sum_i db_i^2`` over the transmitted rows (0 where none was).
    """
    if dw.dim() == 5 and dw.shape[-2:] == (1, 1):
        dw = dw.flatten(2)
        mask_w = None if mask_w is None else mask_w.flatten(2)
    if dw.dim() != 3 or db.dim() != 2 or dw.shape[:2] != db.shape:
        raise ScenarioError(
            f"analytic inversion: weight update {tuple(dw.shape)} and bias update "
            f"{tuple(db.shape)} are not one layer's [B, out, in] and [B, out]"
        )
    dw, db = dw.double(), db.double()
    wb = db.unsqueeze(2).expand_as(dw)
    use = torch.ones_like(dw, dtype=torch.bool)
    if mask_w is not None:
        use &= mask_w.bool()
    if mask_b is not None:
        use &= mask_b.bool().unsqueeze(2)
    num = (torch.where(use, wb * dw, 0.0)).sum(1)
    den = (torch.where(use, wb * wb, 0.0)).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))


def labels_from_bias(db: torch.Tensor) -> torch.Tensor:
    """The label of each target's single sample: the most negative entry of the classifier's bias update
    (a gradient; for a FedAvg change, whose sign is flipped, pass ``-change``)."""
    if db.dim() != 2:
        raise ScenarioError(f"labels from the bias update: expected [B, classes], got {tuple(db.shape)}")
    return db.argmin(1)
