"""A server that lies: trap weights for tiny-ir and the imprint attack on what a client sends back.

Threat model ``malicious``: the server sets every value of the model it sends (weights, biases,
scales, activation ranges: all of them travel in the downlink) and the scheme a client trains,
never the architecture the device runs. What tiny-ir's architecture allows ("Robbing the Fed",
Fowl et al. 2022, adapted to a network whose only dense layer sees globally pooled features):

- the stem and the first two blocks pass the image on losslessly as grey 4x4 blocks: the stride-2
  stem as a space-to-depth (4 of its channels carry each 2x2 block), block 0 as an identity, block
  1's expansion and stride-2 depthwise as a second space-to-depth (16 of its 48 channels), its
  projection onto the first 16 of the 32 channels at 8x8, scaled by ``pixel_gain``;
- block 2's expansion (32 -> 96, ReLU6, with a bias) becomes 96 brightness bins: channel ``o`` is in
  its linear range only where the block's mean lies in ``[edge_o, edge_{o+1})`` (equal-mass
  quantiles of public blocks), saturated (no gradient) elsewhere;
- everything after makes the gradient reaching those bins the same at every position: block 2's
  depthwise passes them on, its projection sums them into one channel, block 3 averages that
  channel down to 4x4 inside its ReLU6 windows, the classifier reads it with opposite signs;
- the scheme trains block 2's expansion (``conv6``: the 16 pixel channels and the bias) and the
  classifier.

A bin that one position falls in gives that 4x4 block exactly as ``dW_o / db_o``; more positions
give their mean; the bias change counts them. Convolutions are translation-equivariant and the
global pool discards position, so the attacker places the blocks it recovers on a public prior
(the mean public face) by the Hungarian algorithm; :func:`oracle_place` (true positions) bounds
what any placement could do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from fedtiny.attack.geometry import PIXELS, blocks_of, from_grid, grey, image_of, on_grid
from fedtiny.attack.jigsaw import Pieces, assemble
from fedtiny.attack.metrics import block_set_distance, flat_psnr, identification_rank, psnr, score, ssim
from fedtiny.attack.placement import BlockPrior, Placement, block_prior, calibrate_placement, soft_place
from fedtiny.attack.trap import (
    BORDER_CHANNELS,
    BORDER_TAPS,
    PIXEL_CHANNELS,
    STEPS,
    TRAP_CHANNELS,
    TRAP_LAYER,
    TRAP_LAYERS,
    Trap,
)
from fedtiny.attack.trap_mbconv import mb_trap_model, mb_trap_settings
from fedtiny.budget.schemes import parse_scheme, resolve
from fedtiny.compress.values import value_type
from fedtiny.errors import ScenarioError
from fedtiny.federated.task import _fp32_model
from fedtiny.int8.convert import ptq
from fedtiny.models.state import model_arrays
from fedtiny.models.tinyir import TinyIR

__all__ = [
    "STEPS",
    "PIXEL_CHANNELS",
    "BORDER_CHANNELS",
    "TRAP_CHANNELS",
    "round_settings",
    "Trap",
    "TRAP_LAYER",
    "trap_network",
    "trap_for",
    "adapted_to",
    "simulation_trap",
    "trap_state",
    "trap_scheme",
    "trap_scheme_dict",
    "imprint",
    "block_edges",
    "blocks_of",
    "image_of",
    "recover_blocks",
    "position_change",
    "Knowledge",
    "oracle_blocks",
    "distinct",
]

TARGET_CLASS = 1  # the class whose samples send the trap's gradient (lfw-faces: faces); the others send none


def block_edges(
    public: np.ndarray, bins: int = 96, weights: np.ndarray | None = None, shift: float = 0.0
) -> tuple[float, ...]:
    """Bin edges of ``weights . block`` (default: the block mean) that hold about equal shares of the
    ``public`` images' blocks (``N x C x 32 x 32``) and that int8 represents exactly.

    Every bin shares one weight scale (so one position moves every bin's bias and weights by the
    same number of int8 steps, and the codec's per-tensor scale rounds them all alike), which makes
    a bin's pixel weight an integer ``n`` (1 to ``STEPS``) and its width ``unit / n``: the
    equal-mass widths rounded to that form, laid end to end from the lowest value so that they
    cover every block. ``shift`` (in units of the median bin's width) starts them lower: another
    partition, whose edges fall between blocks the first one put together.
    """
    v = np.full(PIXELS, 1.0 / PIXELS) if weights is None else np.asarray(weights, np.float64)
    values = np.concatenate([blocks_of(g) @ v for g in grey(public)])
    lo, hi = float(np.minimum(v, 0).sum()), float(np.maximum(v, 0).sum())
    quantiles = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    mass = np.diff(np.r_[lo, np.maximum.accumulate(quantiles), hi])
    n = np.clip(np.round(STEPS * max(mass.min(), 1e-9) / np.maximum(mass, 1e-9)), 1, STEPS)
    if weights is not None:  # a projection's weights are quarters of its largest: whole steps if n is a multiple of 4
        n = np.clip(np.round(n / 4) * 4, 4, STEPS)
    step = float(np.median(1.0 / n))
    unit = (hi - lo + 2e-3) / ((1.0 / n).sum() - shift * step)  # the widths, scaled to cover the range
    start = lo - 1e-3 - shift * step * unit
    return tuple(float(e) for e in start + np.r_[0.0, np.cumsum(unit / n)])


def round_projection(index: int, seed: int = 0) -> tuple[float, ...] | None:
    """The binned feature of a malicious server's ``index``-th trap: the block mean first, then
    seeded Gaussian directions (scaled to the mean's norm)."""
    if index == 0:
        return None
    v = np.random.default_rng((seed, index)).normal(size=PIXELS)
    return tuple(float(a) for a in v / np.linalg.norm(v) * 0.25)


PARITIES = ((0, 0), (1, 1), (0, 1), (1, 0))
TEXTURE_LEVELS = (2, 3, 4)  # a texture projection's pixel weights, in quarters of its largest


def texture_projection(index: int, seed: int = 0) -> tuple[float, ...] | None:
    """The binned feature of the ``index``-th trap of the ``textures`` plan: the block mean first, then
    each pixel weighted 2, 3 or 4 quarters (seeded): positive, so the bins stay as wide as the mean's,
    and on int8's grid with every bin's integer width a multiple of 4 (``block_edges``), so their
    edges stay exact; blocks of one brightness but other textures fall in other bins."""
    if index == 0:
        return None
    levels = np.random.default_rng((seed, index, 7)).choice(TEXTURE_LEVELS, PIXELS)
    return tuple(float(a) for a in levels / 4.0 / PIXELS)


SHIFTS = (0.0, 0.5, 0.25, 0.75, 0.125, 0.625, 0.375, 0.875)  # each new one halfway between earlier ones


def round_settings(index: int, seed: int = 0, plan: str = "jigsaw") -> dict:
    """The trap a malicious server sends in round ``index`` (keyword arguments of :func:`trap_for`).

    ``jigsaw``: one parity class of positions per round (four rounds cover the image), the block
    mean binned; each time round after that, a texture projection (:func:`texture_projection`: blocks
    that shared a bin, of one brightness, are apart). The others, measured against it
    (docs/results/privacy-malicious.md): ``projections`` (the first attacker: every position each
    round, the mean and then Gaussian projections, whose mixed signs narrow the bins and cost
    precision in int8), ``shifts`` (every position, the mean's bins started a fraction of a bin
    lower each round) and ``textures`` (every position, texture projections).
    """
    if plan == "projections":
        return {"projection": round_projection(index, seed)}
    if plan == "shifts":  # every position every round, the bins started a fraction of a bin lower each time
        return {"shift": SHIFTS[index % len(SHIFTS)]}
    if plan == "textures":  # every position every round: the mean, then positive random projections
        return {"projection": texture_projection(index, seed)}
    if plan != "jigsaw":
        raise ScenarioError(f"trap plan: unknown {plan!r}; known: jigsaw, shifts, projections")
    return {"parity": PARITIES[index % len(PARITIES)], "projection": texture_projection(index // len(PARITIES), seed)}


def _set(conv_bn: nn.Sequential, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """A conv + BatchNorm pair that computes ``conv(x, weight) + bias`` (BatchNorm an identity plus the bias)."""
    conv, bn = conv_bn[0], conv_bn[1]
    conv.weight.copy_(weight)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)
    bn.weight.fill_(1.0)
    bn.bias.copy_(bias)


def _bins(conv_bn: nn.Sequential, trap: Trap, channels: int) -> None:
    """The bins: on a block's binned feature ``m`` (pixels times the gain), channel ``o`` is
    ``6 (m - e_o) / (e_{o+1} - e_o)``, linear inside its bin and clamped by ReLU6 outside; channels
    past the bins are fillers (constant 3, in the linear range: see ``Trap.fillers``)."""
    z = torch.zeros
    edges = torch.tensor(trap.edges, dtype=torch.float64)
    slope = 6.0 / (edges[1:] - edges[:-1]) / trap.pixel_gain
    v = torch.from_numpy(trap.weights)
    w = z(channels, 32, 1, 1, dtype=torch.float64)
    w[: trap.bins, PIXEL_CHANNELS.tolist(), 0, 0] = slope.unsqueeze(1) * v.unsqueeze(0)
    # an input that is always zero (channel 31) with weight 127 x the bins' common scale: the
    # narrowest bin's largest pixel weight is 64 steps of it, every other pixel weight an integer
    # number of steps (``block_edges``; the projection on a grid of 1/64 of its largest weight:
    # ``trap_for``), so the pixel weights sit within 64 of 127 and may change both ways. A rounded
    # weight would move a bin's edges by up to 0.8% of the brightness, against bins 1% wide:
    # gaps where a position reaches no bin. One scale for all bins makes one position's change the
    # same number of int8 steps in every bin, which the codec's per-tensor scale then rounds alike.
    w[:, 31, 0, 0] = slope.max() * v.abs().max() * 127 / STEPS
    bias = torch.full((channels,), 3.0, dtype=torch.float64)
    bias[: trap.bins] = -slope * edges[:-1] * trap.pixel_gain
    _set(conv_bn, w.float(), bias.float())


def _pass(conv_bn: nn.Sequential, trap: Trap, channels: int, taps: list[tuple[int, int]], weight: float) -> None:
    """A depthwise layer that passes each bin on from the ``taps``, ``weight`` each.

    A trap that keeps layers out of their clamps (``Trap.fillers``) halves the bins and adds 1.5,
    so a saturated bin (0 or 6) reads 1.5 or 4.5: in the linear range, as every filler (3)."""
    w = torch.zeros(channels, 1, 3, 3)
    gain = 0.5 if trap.fillers else 1.0
    for ky, kx in taps:
        w[: trap.bins, 0, ky, kx] = gain * weight
    bias = torch.zeros(channels)
    bias[: trap.bins] = 1.5 if trap.fillers else 0.0
    _set(conv_bn, w, bias)
    _keep_linear(conv_bn, trap.bins, trap)


def _sum_bins(conv_bn: nn.Sequential, trap: Trap, channels: int, out: int, scale: float = 1.0) -> None:
    """A projection onto channel ``out`` that sums the passed bins with alternating signs, times
    ``scale``: the bins a position has passed are saturated and cancel in pairs, so the sum stays in
    [0, 6 scale] whatever the brightness while the gradient reaching every bin has the same magnitude."""
    w = torch.zeros(32, channels, 1, 1)
    sign = torch.tensor([(-1.0) ** o for o in range(trap.bins)])
    gain = (2.0 if trap.fillers else 1.0) * scale
    w[out, : trap.bins, 0, 0] = gain * sign
    b = torch.zeros(32)
    # the offset the halved bins carry (1.5 each, alternating): removed, so the sum is as without it
    b[out] = -(gain * 1.5 * float(sign.sum()) if trap.fillers else 0.0)
    _set(conv_bn, w, b)


def _keep_linear(conv_bn: nn.Sequential, used: int, trap: Trap | None) -> None:
    """With ``Trap.fillers``, a layer's unused channels (from ``used`` on) sit near 3, not at the clamp,
    and its last at 6, the top of the layer's calibrated range, which the others then stay below.

    Each gets a small weight (0.01 on its first input): int8 gives a channel of zero weights no
    scale to hold a bias in. ``trap`` None: always (an idle block's layers)."""
    if (trap is not None and not trap.fillers) or used >= conv_bn[1].bias.shape[0]:
        return
    conv, bn = conv_bn[0], conv_bn[1]
    conv.weight[used:] = 0.0
    conv.weight[used:, 0, conv.weight.shape[2] // 2, conv.weight.shape[3] // 2] = 0.01
    bn.bias[used:] = 3.0
    bn.bias[-1] = 6.0


def _tap(trap: Trap) -> list[tuple[int, int]]:
    """Block 3's stride-2 depthwise taps: the 2x2 mean, or the one of the trap's parity."""
    if trap.parity is None:
        return [(1, 1), (1, 2), (2, 1), (2, 2)]
    return [(1 + trap.parity[0], 1 + trap.parity[1])]


@torch.no_grad()
def trap_network(model: nn.Module, trap: Trap) -> nn.Module:
    """Set a 32x32 3-channel tiny-ir (``fedtiny.models.TinyIR``, width 16, 4 blocks) to the trap; eval mode."""
    if (
        not isinstance(model, TinyIR)
        or len(model.blocks) != 4
        or model.stem[0].out_channels != 16
        or model.stem[0].in_channels != 3
        or model.stem[0].stride != (2, 2)
    ):
        raise ScenarioError(
            "the trap is built for tiny-ir at width 16 on 3x32x32 images "
            "(data.image_size = 32, data.channels = 3, model.width = 16)"
        )
    if trap.bins + trap.fillers != 96:
        raise ScenarioError(f"the trap needs one bin or filler per channel of the 96: {trap.bins} + {trap.fillers}")
    if trap.layer not in TRAP_LAYERS:
        raise ScenarioError(f"the trap's bins are conv6 or conv9, not conv{trap.layer}")
    z = torch.zeros
    # stem (3 -> 16, 3x3 stride 2, pad 1): channel 2dy+dx is the grey pixel (2i+dy, 2j+dx)
    w = z(16, 3, 3, 3)
    for dy in range(2):
        for dx in range(2):
            w[2 * dy + dx, :, 1 + dy, 1 + dx] = 1.0 / 3.0
    _set(model.stem, w, z(16))
    _keep_linear(model.stem, 4, trap)
    # block 0 (depthwise, pointwise, residual): identity twice over, so x + x = 2 * pixels
    b0 = model.blocks[0].conv
    w = z(16, 1, 3, 3)
    w[:4, 0, 1, 1] = 1.0
    _set(b0[0], w, z(16))
    _keep_linear(b0[0], 4, trap)
    w = z(16, 16, 1, 1)
    w[range(4), range(4)] = 1.0
    _set(b0[1], w, z(16))
    # block 1: expansion copies the 4 pixel channels into 4 phases; the stride-2 depthwise picks
    # phase (py, px) of each 2x2 neighbourhood; the projection keeps the 16 values, times pixel_gain / 2
    b1 = model.blocks[1].conv
    expand, depthwise, project = z(48, 16, 1, 1), z(48, 1, 3, 3), z(32, 48, 1, 1)
    for ph in range(4):
        for k in range(4):
            expand[4 * ph + k, k] = 1.0
    for py in range(2):
        for px in range(2):
            depthwise[4 * (2 * py + px) : 4 * (2 * py + px) + 4, 0, 1 + py, 1 + px] = 1.0
    project[range(16), range(16)] = trap.pixel_gain / 2
    for k, (ky, kx, stem) in enumerate(BORDER_TAPS):  # the borders, on spare channels
        expand[16 + k, stem] = 1.0
        depthwise[16 + k, 0, ky, kx] = 1.0
        project[BORDER_CHANNELS[k], 16 + k] = trap.pixel_gain / 2
    used = 16 + len(BORDER_TAPS)
    _set(b1[0], expand, z(48))
    _keep_linear(b1[0], used, trap)
    _set(b1[1], depthwise, z(48))
    _keep_linear(b1[1], used, trap)
    _set(b1[2], project, z(32))
    b2, b3 = model.blocks[2].conv, model.blocks[3].conv
    if trap.layer == 6:
        # block 2: the bins, passed on by the depthwise's centre, summed onto channel 16
        _bins(b2[0], trap, 96)
        _pass(b2[1], trap, 96, [(1, 1)], 1.0)
        _sum_bins(b2[2], trap, 96, 16)
        # block 3: channel 0 = 3 + sum / 4 (inside ReLU6's window), read by the stride-2 depthwise at
        # the trap's taps, each 0.25 (every position that sends sends the same gradient either way)
        w = z(96, 32, 1, 1)
        w[0, 16] = 0.25
        bias = z(96)
        bias[0] = 3.0
        _set(b3[0], w, bias)
        _keep_linear(b3[0], 1, trap)
        w = z(96, 1, 3, 3)
        for ky, kx in _tap(trap):
            w[0, 0, ky, kx] = 0.25
        _set(b3[1], w, z(96))
        _keep_linear(b3[1], 1, trap)
        w = z(32, 96, 1, 1)
        w[0, 0] = 1.0
        _set(b3[2], w, z(32))
        read, centre = 0.25 * len(_tap(trap)), 3.75
    else:
        # block 2 is the identity (its residual): its expansion and depthwise idle near 3 and its
        # projection adds 1% of one of them to channel 30, which nothing reads (a tensor that is
        # zero everywhere has no int8 scale). Block 3's expansion is the bins, out of reach of a
        # policy that freezes the first 7 convolutions; its depthwise reads them at the trap's
        # taps, its projection sums them onto channel 0.
        _set(b2[0], z(96, 32, 1, 1), z(96))
        _keep_linear(b2[0], 0, None)
        _set(b2[1], z(96, 1, 3, 3), z(96))
        _keep_linear(b2[1], 0, None)
        w = z(32, 96, 1, 1)
        w[30, 0] = 0.01
        _set(b2[2], w, z(32))
        _bins(b3[0], trap, 96)
        # each tap 0.5 and a quarter of the sum: changes of 20-60 int8 steps per position, as the
        # bins at conv6 get (conv9's input has another scale), well inside the weights' range
        _pass(b3[1], trap, 96, _tap(trap), 0.5)
        _sum_bins(b3[2], trap, 96, 0, scale=0.25)
        read, centre = 1.0, 3.0 * 0.5 * len(_tap(trap)) * 0.25
    # The classifier reads that channel with a large gain (the gradient every bin receives) and a
    # larger bias for class 0: the softmax is saturated there, so a sample of any other class
    # (TARGET_CLASS) sends the same full gradient (p - onehot = +-1) whatever its image, and a sample
    # of class 0 sends none: the gain that makes changes stand above int8 rounding saturates the
    # softmax, so a trap serves one class.
    head = torch.zeros_like(model.classifier.weight)
    head[0, 0], head[1:, 0] = trap.head_gain, -trap.head_gain
    model.classifier.weight.copy_(head)
    bias = torch.full_like(model.classifier.bias, -trap.head_gain * 3.0)
    bias[0] = trap.head_gain * 3.0
    model.classifier.bias.copy_(bias - head[:, 0] * centre * read)  # the centre of the channel's range
    return model.eval()


def adapted_to(device) -> dict:
    """The trap settings (keyword arguments of :func:`trap_for`) of a server that knows the clients'
    privacy policies (``device``: a scenario's device section) and works around them where the
    architecture lets it: bins in block 3's expansion (conv9) past a client that freezes the first
    7 to 9 convolutions, and fillers that keep every clamping layer's outputs under the share a
    client refuses (``policy_max_saturation``). A change bound and DP cannot be worked around by
    the weights; they are what the figures measure."""
    out: dict = {}
    if 6 < device.policy_frozen_first <= 9:
        out["layer"] = 9
    if device.policy_max_saturation < 1.0:
        # a position is in the linear range of one bin and of every filler: (1 + fillers) / 96 of
        # the layer's outputs unclamped, with one filler to spare for pixels and padding at zero
        out["fillers"] = min(95, int(np.ceil((1.0 - device.policy_max_saturation) * 96)) + 1)
    return out


def simulation_trap(task) -> tuple[np.ndarray, Trap]:
    """The public images and the trap a malicious server of a simulation sends in round 1: every
    position binned (one round: the most blocks), placed around the clients' policies."""
    public = target_public(task.federation.public)
    if published(task):
        return public, trap_for(public, **mb_trap_settings(task.model))
    return public, trap_for(public, **adapted_to(task.scenario.device))


def target_public(public) -> np.ndarray:
    """The server's public images of the trap's target class (an ``ImageSet``; all of them if it has none)."""
    mine = public.x[public.y == TARGET_CLASS]
    return mine if len(mine) else public.x


def trap_for(
    public: np.ndarray,
    *,
    pixel_gain: float = 10.0,
    head_gain: float = 1000.0,
    projection: tuple[float, ...] | None = None,
    parity: tuple[int, int] | None = None,
    shift: float = 0.0,
    layer: int = TRAP_LAYER,
    fillers: int = 0,
    bins: int = 96,
    border_at: int = 17,
) -> Trap:
    """The trap the server builds from its ``public`` images (bin edges of their blocks' binned feature,
    on the trap's grid: ``on_grid``); ``bins``: the channels of the bins' layer (fillers included)."""
    if projection is not None:  # on the int8 grid: multiples of 1/64 of the largest weight
        v = np.asarray(projection, np.float64)
        top = np.abs(v).max()
        projection = tuple(float(a) for a in np.round(v / top * 64) * top / 64)
    weights = None if projection is None else np.asarray(projection)
    edges = block_edges(on_grid(public), bins - fillers, weights=weights, shift=shift)
    return Trap(edges, pixel_gain, head_gain, projection, parity, shift, layer, fillers, border_at)


def trap_state(task, public: np.ndarray, trap: Trap) -> dict[str, np.ndarray]:
    """The malicious server's model in ``task``'s downlink layout: the trap network, quantized by
    fedtiny's own post-training quantization calibrated on ``public`` for an int8 task."""
    s = task.scenario
    if published(task):
        net = mb_trap_model(task.model, trap, public, classifier_precision=s.model.classifier_precision)
        return _in_layout(task, net)
    if s.model.name != "tiny-ir" or s.model.file or s.model.module:
        raise ScenarioError(
            "attack.server = malicious: the trap is built for the built-in tiny-ir "
            '(model.name = "tiny-ir", no model.file or model.module)'
        )
    net = trap_network(_fp32_model(s, task.federation), trap)
    if s.model.precision == "int8":
        net = ptq(net, public.astype(np.float32), classifier_precision=s.model.classifier_precision)
    return _in_layout(task, net)


def published(task) -> bool:
    """Whether ``task`` runs a published int8 inverted-residual model (a tiny-training ``.pkl``), which
    gets the trap of ``fedtiny.attack.trap_mbconv``."""
    return str(task.scenario.model.file or "").endswith(".pkl")


def _in_layout(task, net) -> dict[str, np.ndarray]:
    """The trap network's arrays in ``task``'s downlink layout (a clear error where a shape differs)."""
    names = [n for n, *_ in task.downlink_spec]
    arrays = model_arrays(net, names)
    for name, shape, _ in task.downlink_spec:
        if tuple(arrays[name].shape) != tuple(shape):
            raise ScenarioError(
                f"attack.server = malicious: trap tensor {name} is {arrays[name].shape}, the task's is {shape}"
            )
    return arrays


def bins_tensors(task, layer: int = TRAP_LAYER) -> tuple[str, str]:
    """Names of the bins' weight and bias (convolution ``layer``) in ``task``'s state (int8 graph or
    float network)."""
    if task.scenario.model.precision == "int8":
        return f"conv{layer}.weight", f"conv{layer}.bias"
    block = {6: 2, 9: 3}[layer]
    return f"blocks.{block}.conv.0.0.weight", f"blocks.{block}.conv.0.1.bias"


def bins_change(
    task,
    changes: dict[str, tuple[np.ndarray, np.ndarray]],
    sent: dict[str, np.ndarray],
    layer: int = TRAP_LAYER,
    inputs: np.ndarray = TRAP_CHANNELS,
):
    """``(dw [96, 24], db [96], sent_w, sent_b, lsb [96])`` in real units from a decoded
    update ``{name: (indices, values)}`` against the ``sent`` state: ``dw``'s columns are the 16
    pixels (row-major) and the 8 border pixels (``BORDER_TAPS``); ``lsb`` is each bin's weight
    step (its int8 weight scale; 0 for a float network); ``inputs``: the trap's pixel and border
    channels (``Trap.inputs``)."""
    wname, bname = bins_tensors(task, layer)
    wshape = sent[wname].shape
    dw, mw = np.zeros(int(np.prod(wshape))), np.zeros(int(np.prod(wshape)), bool)
    db, mb = np.zeros(wshape[0]), np.zeros(wshape[0], bool)
    for name, (flat, mask) in ((wname, (dw, mw)), (bname, (db, mb))):
        if name in changes:
            idx, values = changes[name]
            flat[np.asarray(idx)] = values
            mask[np.asarray(idx)] = True
    dw, mw = dw.reshape(wshape)[:, inputs, 0, 0], mw.reshape(wshape)[:, inputs, 0, 0]
    if task.scenario.model.precision == "int8":  # integer units -> real: weight scale; bias s_w * s_x
        s_w = sent[f"conv{layer}.w_scales"].astype(np.float64)
        s_x = float(sent[f"conv{layer}.qparams"][0])
        dw, db = dw * s_w[:, None], db * s_w * s_x
        return dw, db, mw, mb, s_w
    return dw, db, mw, mb, np.zeros(len(db))


def trap_scheme_dict(layer: int = TRAP_LAYER, inputs: np.ndarray = TRAP_CHANNELS) -> dict:
    """The scheme the malicious server asks for (``schemes.json`` form): the bins' pixel and border
    channels ``inputs`` and their bias (convolution ``layer``)."""
    channels = sorted(int(c) for c in inputs)
    return {
        "id": "imprint-trap",
        "n_bias_update": 0,
        "weight_update_idx": [layer],
        "weight_update_channels": [channels],
    }


def trap_scheme(model, layer: int = TRAP_LAYER, inputs: np.ndarray = TRAP_CHANNELS):
    """:func:`trap_scheme_dict` resolved against an int8 model."""
    return resolve(parse_scheme(json.dumps(trap_scheme_dict(layer, inputs))), model)


EMPTY = 0.5  # a bin whose bias change is below half of one position's caught no position this round


def position_change(db: np.ndarray, positions: int) -> float:
    """One position's bias change, robust to what else moves the bins.

    Every position that falls in a bin moves its bias by the same amount, so the changes of the
    bins are near multiples of it. They are not exact: a client with error feedback also sends
    what earlier rounds left behind (many bins carry a few percent of one position), and int8
    rounding adds its own. The server knows how many ``positions`` its trap reads (``64 x batch``):
    the changes add up to about ``positions`` times one position's, and the bins holding one
    position (the commonest count) are those within half of that mean; their median is the unit.
    """
    a = np.abs(np.asarray(db, np.float64))
    mean = a.sum() / max(1, positions)
    single = a[(a >= EMPTY * mean) & (a < 1.5 * mean)]
    return float(np.median(single)) if len(single) else float(mean)


def recover_blocks(
    dw: np.ndarray,
    db: np.ndarray,
    pixel_gain: float,
    sent_w: np.ndarray | None = None,
    sent_b: np.ndarray | None = None,
    positions: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """The blocks of each bin and how many positions each bin caught, from one update of the bins.

    Parameters
    ----------
    dw, db
        The bins' weight change on the 16 pixel channels ``[96, 16]`` (pixel order, real units) and
        their bias change ``[96]`` (real units).
    sent_w, sent_b
        Which coordinates were transmitted (top-k); a bin counts only when its bias and all its
        pixel coordinates were.
    positions
        How many block positions the trap reads in the client's batch (64 per 32x32 image).

    Returns
    -------
    ``(blocks [96, 16] in [0, 1], counts [96])``: the mean block of the positions in each bin
    (``dW_o / db_o``) and their number (``db_o`` in units of :func:`position_change`; a bin below
    half a unit is empty, count 0).
    """
    dw, db = np.asarray(dw, np.float64), np.asarray(db, np.float64)
    ok = np.abs(db) > 0
    if sent_b is not None:
        ok &= np.asarray(sent_b, bool)
    if sent_w is not None:  # a block needs all 16 pixels; borders help, and are not needed
        ok &= np.asarray(sent_w, bool)[:, :PIXELS].all(axis=1)
    counts = np.zeros(len(db), np.int64)
    if ok.any():
        unit = position_change(np.where(ok, db, 0.0), positions)
        counts[ok] = np.round(np.abs(db[ok]) / unit).astype(np.int64)
    ok &= counts > 0
    blocks = np.zeros_like(dw)
    blocks[ok] = dw[ok] / db[ok, None] / pixel_gain
    return np.clip(blocks, 0.0, 1.0), counts


@dataclass(frozen=True)
class Knowledge:
    """What the malicious server knows besides the updates: the block statistics of its public faces,
    and the candidate images (grey ``[M, H, W]``) it identifies a client's image among."""

    prior: BlockPrior
    public: np.ndarray
    candidates: np.ndarray | None = None

    @staticmethod
    def of(public: np.ndarray, candidates: np.ndarray | None = None) -> Knowledge:
        """From public images ``N x C x H x W`` (and candidates, the same layout) in [0, 1]."""
        cand = None if candidates is None else grey(on_grid(candidates))
        return Knowledge(block_prior(grey(on_grid(public))), grey(on_grid(public)), cand)

    def placement(self, recovered: float, noise: float) -> Placement:
        """The placement calibrated on the public faces for this share of recovered blocks and noise."""
        return _calibrated(self.public.tobytes(), self.public.shape, round(recovered, 1), round(noise, 2))


@lru_cache(maxsize=64)
def _calibrated(public: bytes, shape: tuple[int, ...], recovered: float, noise: float) -> Placement:
    return calibrate_placement(np.frombuffer(public).reshape(shape), recovered, noise)


def oracle_blocks(rounds: list[tuple[np.ndarray, np.ndarray]], targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bound of any placement: each round's isolated blocks at the true positions they came from.

    The positions a round's bins caught are distinct, so each round's blocks are matched to the
    blocks of the grey ``targets [n, H, W]`` one to one (the Hungarian algorithm on the targets
    themselves, which only an oracle has); a position seen in several rounds takes the mean of its
    copies, weighted by the inverse of their known variance (the attacker who knew positions would
    average them so). ``rounds``: per round, the isolated blocks and their noise. Returns ``(images [n, H, W],
    hit [n * P])``: positions never seen hold their image's mean (the flat baseline).
    """
    # deferred: scipy.optimize adds 0.35 s to start-up; only matching needs it
    from scipy.optimize import linear_sum_assignment

    per_image = [blocks_of(t) for t in targets]
    tb = np.concatenate(per_image)
    sums, seen = np.zeros_like(tb), np.zeros(len(tb))
    for alone, sigma in rounds:
        if len(alone):
            rows, cols = linear_sum_assignment(((alone[:, None, :] - tb[None, :, :]) ** 2).sum(-1))
            w = 1.0 / np.maximum(sigma[rows], 1e-6) ** 2
            sums[cols] += alone[rows] * w[:, None]
            seen[cols] += w
    hit = seen > 0
    out = np.concatenate([np.full_like(b, t.mean()) for b, t in zip(per_image, targets)])
    out[hit] = sums[hit] / seen[hit, None]
    p = len(per_image[0])
    return np.stack([image_of(out[i * p : (i + 1) * p], *t.shape) for i, t in enumerate(targets)]), hit


LEAK_ERROR = 4 / 255  # a block counts as leaked when an isolated bin returns it within this max error


def bin_noise(dw: np.ndarray, db: np.ndarray, lsb: np.ndarray, levels: float, pixel_gain: float) -> np.ndarray:
    """The standard deviation of each bin's recovered pixels ``[96]``, which the server knows from what
    it sent: the weight change of a bin arrives in steps of its weight scale ``lsb`` (stochastic
    rounding on the device: variance about 1/6 LSB squared) and of the codec (``max |change| /
    levels`` LSB per tensor, uniform error), divided by the bin's bias change and the trap's gain.
    """
    if not lsb.any():
        return np.full(len(db), 1e-4)  # float updates: only float32 rounding
    with np.errstate(divide="ignore", invalid="ignore"):
        in_lsb = np.where(lsb[:, None] > 0, np.abs(dw) / lsb[:, None], 0.0)
        step = in_lsb.max() / levels if levels else 0.0
        sigma = lsb * np.sqrt(step**2 / 12 + 1 / 6) / (np.abs(db) * pixel_gain)
    return np.where(np.isfinite(sigma), sigma, np.inf)


def seen_noise(dw: np.ndarray, db: np.ndarray, counts: np.ndarray, pixel_gain: float) -> np.ndarray:
    """Each bin's pixel noise ``[96]`` as the update itself shows it: the weight change of the bins no
    position reached should be zero, and what they carry (noise a client added, local DP's; the
    residual of earlier rounds) is in every other bin too. Their robust spread (median absolute
    value / 0.6745) over the bin's bias change and the gain; 0 when no bin is empty."""
    empty = dw[counts == 0]
    if not empty.size:
        return np.zeros(len(db))
    spread = float(np.median(np.abs(empty))) / 0.6745
    out = np.full(len(db), np.inf)
    moved = db != 0
    out[moved] = spread / (np.abs(db[moved]) * pixel_gain)
    return out


def distinct(
    blocks: np.ndarray, sigma: np.ndarray, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``blocks`` without repeats, with the noise and label of each: a block within ``4`` combined
    standard deviations (largest difference over its values) of a kept one of the same label (a
    position parity; -1 matches any) is the same block seen again in another round, and is merged
    into it by inverse-variance weights (each round rounds it independently)."""
    labels = np.full(len(blocks), -1) if labels is None else np.asarray(labels)
    means: list[np.ndarray] = []
    weights: list[float] = []
    kept: list[int] = []
    for i in np.argsort(sigma, kind="stable"):
        b, w, lab = blocks[i], 1.0 / max(sigma[i], 1e-6) ** 2, int(labels[i])
        if means:
            tol = 4 * np.sqrt(1.0 / np.asarray(weights) + 1.0 / w)
            d = np.abs(np.stack(means) - b).max(axis=1) / tol
            d[(np.asarray(kept) != lab) & (np.asarray(kept) >= 0) & (lab >= 0)] = np.inf
            j = int(d.argmin())
            if d[j] <= 1.0:
                means[j] = (means[j] * weights[j] + b * w) / (weights[j] + w)
                weights[j] += w
                continue
        means.append(b.astype(np.float64))
        weights.append(w)
        kept.append(lab)
    if not means:
        return np.zeros((0, blocks.shape[1] if blocks.ndim == 2 else PIXELS)), np.zeros(0), np.zeros(0, int)
    return np.stack(means), 1.0 / np.sqrt(np.asarray(weights)), np.asarray(kept)


def imprint(
    task,
    observations: list[tuple[dict, dict[str, np.ndarray], Trap]],
    knowledge: Knowledge,
    targets: np.ndarray,
    target_ids: np.ndarray | None = None,
) -> dict:
    """The imprint attack on the updates one client sent (one per round's trap) and its scores.

    Parameters
    ----------
    observations
        Per round: the decoded update ``{name: (indices, values)}`` (a client's, or an aggregate's),
        the state the server sent (that round's trap) and the trap.
    knowledge
        The server's public faces (the prior the blocks are placed on) and the candidates it
        identifies among.
    targets
        The images behind the updates, ``N x C x H x W`` in [0, 1] (to score; the attack never reads
        them except for the bound at true positions).
    target_ids
        Each target's index among ``knowledge.candidates`` (for the identification rank).

    Returns
    -------
    Per target (matched by the Hungarian algorithm): ``psnr_db``, ``ssim`` (the blocks' posterior
    placement on the public prior), ``oracle_psnr_db`` (each round's isolated blocks at the true
    positions they came from, averaged over rounds: the bound of any placement), ``flat_psnr_db``,
    ``identification_rank`` (1: the target is the candidate whose blocks the recovered ones fit
    best); and ``isolated`` (share of the targets' blocks some round isolated), ``leaked_blocks``
    (share returned within ``LEAK_ERROR`` by a round or by the mean over rounds at the true
    position), ``rounds``, ``recon`` (``N x C x 32 x 32``). Targets larger than the trap's grid (the
    published models' 128x128) are scored on it (``on_grid``: what the trap can return), and
    ``input_psnr_db`` / ``input_ssim`` / ``input_flat_psnr_db`` score the reconstruction upsampled to
    their size.
    """
    full = targets
    targets = on_grid(targets)
    n, c, h, w = targets.shape
    levels = value_type(task.scenario.compression.values).levels if task.scenario.model.precision == "int8" else 0
    per_round, shared = [], np.zeros((0, PIXELS))
    for changes, sent, trap in observations:
        dw, db, mw, mb, lsb = bins_change(task, changes, sent, trap.layer, trap.inputs)
        blocks, cnt = recover_blocks(dw, db, trap.pixel_gain, mw, mb, positions=n * trap.positions)
        sigma = np.hypot(bin_noise(dw, db, lsb, levels, trap.pixel_gain), seen_noise(dw, db, cnt, trap.pixel_gain))
        borders = mw[:, PIXELS:].all(axis=1)  # the borders were sent with the block
        label = -1 if trap.parity is None else 2 * trap.parity[0] + trap.parity[1]
        one = cnt == 1
        per_round.append((blocks[one], sigma[one], borders[one], np.full(int(one.sum()), label)))
        if not len(shared):  # the first round's shared bins (mean blocks of 2+) fill what is never isolated
            shared = np.repeat(blocks[cnt >= 2, :PIXELS], cnt[cnt >= 2], axis=0)
    alone, alone_sigma, parity = distinct(*(np.concatenate([r[i] for r in per_round]) for i in (0, 1, 3)))
    with_borders = bool(len(per_round)) and all(r[2].all() for r in per_round) and alone.shape[1] > PIXELS
    g = grey(targets)
    positions = n * len(blocks_of(g[0]))
    pieces = np.concatenate([alone[:, :PIXELS], shared[: max(0, positions - len(alone))]])
    noise = float(np.median(alone_sigma)) if len(alone) else 0.02
    placement = knowledge.placement(min(1.0, len(pieces) / positions), min(noise, 0.1))
    if with_borders and n == 1:  # one image: its blocks join by their borders
        parities = np.stack([np.where(parity >= 0, parity // 2, -1), np.where(parity >= 0, parity % 2, -1)], 1)
        found = Pieces(alone[:, :PIXELS], alone[:, PIXELS:20], alone[:, 20:], alone_sigma, parities)
        img, linked = assemble(found, knowledge.prior, placement)
        rec = np.repeat(img[None, None], c, axis=1)
    else:
        linked = np.zeros(0, bool)
        rec = np.repeat(soft_place(pieces, knowledge.prior, placement, images=n)[:, None], c, axis=1)
    sc = score(rec, targets)
    tb = np.stack([blocks_of(t) for t in g]).reshape(-1, PIXELS)
    bound, hit = oracle_blocks([(b[:, :PIXELS], sd) for b, sd, *_ in per_round], g)
    oracle = [psnr(np.repeat(b[None], c, 0), x) for b, x in zip(bound, targets)]
    err = np.abs(np.concatenate([blocks_of(b) for b in bound]) - tb).max(-1)
    ranks = None
    if knowledge.candidates is not None and target_ids is not None:
        d = block_set_distance(alone[:, :PIXELS] if len(alone) else pieces, knowledge.candidates)
        ranks = [identification_rank(d, int(t)) for t in target_ids]
    at_input = {}
    if full.shape[-1] != w:
        up = from_grid(np.clip(rec[sc["order"]], 0, 1), full.shape[-1])
        at_input = {
            "input_psnr_db": [psnr(a, b) for a, b in zip(up, full)],
            "input_ssim": [ssim(a, b) for a, b in zip(up, full)],
            "input_flat_psnr_db": [flat_psnr(x) for x in full],
        }
    return {
        **at_input,
        "psnr_db": sc["psnr"],
        "ssim": sc["ssim"],
        "oracle_psnr_db": oracle,
        "flat_psnr_db": [flat_psnr(x) for x in targets],
        "identification_rank": ranks,
        "isolated": float(hit.mean()),
        "leaked_blocks": float((hit & (err <= LEAK_ERROR)).mean()),
        "rounds": len(observations),
        "linked": float(linked.mean()) if len(linked) else 0.0,
        "placement": {"temperature": placement.temperature, "shrink": placement.shrink},
        "recon": rec[sc["order"]],
    }
