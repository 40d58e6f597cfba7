"""The trap for the published inverted-residual networks at 128x128 (MCUNet, MobileNetV2-w0.35).

The same attacker as tiny-ir's (``fedtiny.attack.malicious``), laid into another architecture the
server does not choose: it sets every weight, bias and scale of the published int8 graph
(``task.model``'s layout: ``conv0``.., ``add<block>``, the head) and the scheme. The graph is read
from the task's model, so one builder serves every network of this family that has the stride-2
layers it needs:

- the stem (stride 2) writes each 2x2 grey mean on channel 0 (64x64); the first stride-2
  depthwise takes the 2x2 mean again: channel 0 is the 32x32 grey image ``G`` (4x4 means of the
  128x128 input), the geometry tiny-ir's trap reads;
- the next two stride-2 depthwise layers are space-to-depth (their expansion copies the live
  channels, each copy reads one tap of the 2x2): at 8x8, channels 0-15 hold each 4x4 block of ``G``
  in tiny-ir's pixel order (``PIXEL_CHANNELS``) and channels 16-23 its upper and left borders
  (``BORDER_TAPS``, one tap further up or left); the last projection before the bins multiplies
  them by ``pixel_gain``;
- a block with a residual add passes its input on (its projection is zero); one without passes
  the live channels through its expansion, the depthwise's centre and its projection;
- the bins are the expansion of the block holding ``Trap.layer`` (at 8x8, stride 1); its depthwise
  passes them, its projection sums them with alternating signs onto channel ``SUM``;
- after it, one channel (``3 + sum / 4``) travels to the pool, through the trap's taps at the next
  stride-2 depthwise (the 2x2 mean, or one parity), and the head reads it as tiny-ir's does.

A bin that one position falls in gives that block (and its borders) as ``dW_o / db_o``: the imprint,
the jigsaw and the placement are tiny-ir's, on ``G``; the scores at 128x128 upsample it.
"""

from __future__ import annotations

import numpy as np
import torch

from fedtiny.attack.trap import BORDER_TAPS, PIXEL_CHANNELS, STEPS, Trap
from fedtiny.errors import ScenarioError
from fedtiny.int8.blocks import MBBlock, mb_blocks
from fedtiny.int8.graph import QModel
from fedtiny.int8.ops.conv import QConv
from fedtiny.int8.trace import FloatAdd, FloatConv, FloatGraph, FloatPool, calibrate, quantize

__all__ = [
    "PIXELS_AT",
    "BORDERS_AT",
    "SUM",
    "mb_trap_layers",
    "mb_trap_settings",
    "mb_trap_graph",
    "mb_trap_model",
]

PIXELS_AT = np.asarray(PIXEL_CHANNELS)  # the bins' input channel of each block pixel (tiny-ir's order)
BORDERS_AT = np.arange(16, 16 + len(BORDER_TAPS))  # the bins' input channels of the 8 border pixels
BORDERED = np.concatenate([PIXELS_AT, BORDERS_AT])  # the bins' trained inputs (``Trap.inputs`` here)
SUM = 24  # the channel the bins' projection sums them onto (zero in the stream: a residual adds nothing)
ZERO = 25  # an input of the bins that is always zero: it holds the weight that fixes the bins' common scale
SIZE = 128  # the input side the trap is laid out for (4 stride-2 steps to the bins' 8x8)


def mb_trap_layers(model: QModel) -> list[int]:
    """The convolutions that can hold the bins: expansions of blocks at 8x8 after the fourth
    stride-2 step, with a stride-1 depthwise and a later stride-2 depthwise (the taps)."""
    _, blocks = mb_blocks(model)
    out, halvings = [], 1
    for j, b in enumerate(blocks):
        if b.expand is not None and halvings == 4 and b.stride == 1 and any(c.stride == 2 for c in blocks[j + 1 :]):
            cin = model.op(b.expand).in_channels
            if cin > ZERO and model.op(b.project).out_channels > SUM:
                out.append(int(b.expand[4:]))
        halvings += b.stride == 2
    return out


def mb_trap_settings(model: QModel, layer: int | None = None) -> dict:
    """The trap's settings (keyword arguments of ``malicious.trap_for``) for ``model``: the bins in
    ``layer`` (default: of :func:`mb_trap_layers`, the one with the most channels, the latest of
    those, whose backward pass is the shortest), as many bins as it has channels, the borders at 16,
    the head's gain."""
    layers = mb_trap_layers(model)
    if not layers:
        raise ScenarioError("the trap: no convolution of this network can hold the bins (see mb_trap_layers)")
    if layer is None:
        layer = max(layers, key=lambda i: (model.op(f"conv{i}").out_channels, i))
    elif layer not in layers:
        raise ScenarioError(f"the trap's bins: conv{layer} cannot hold them in this network; it can: {layers}")
    bins = model.op(f"conv{layer}").out_channels
    # twice tiny-ir's 96 bins make each narrower, so its weight step twice as wide: a head gain as
    # much larger keeps a position's weight change at tiny-ir's 15-40 steps (up to 63 fit)
    return {"layer": layer, "bins": bins, "border_at": int(BORDERS_AT[0]), "head_gain": 1000.0 * bins / 96}


def _conv_weights(model: QModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        n.op: (
            torch.zeros(model.op(n.op).weight.shape, dtype=torch.float64),
            torch.zeros(model.op(n.op).out_channels, dtype=torch.float64),
        )
        for n in model.nodes
        if isinstance(model.op(n.op), QConv)
    }


def _pass(w: torch.Tensor, live: list[int], gain: float = 1.0) -> None:
    """A 1x1 convolution copying the ``live`` channels (times ``gain``)."""
    for c in live:
        w[c, c, 0, 0] = gain


def _centre(w: torch.Tensor, live, weight: float = 1.0) -> None:
    """A stride-1 depthwise passing ``live`` channels by its centre tap."""
    k = w.shape[-1] // 2
    for c in live:
        w[c, 0, k, k] = weight


def mb_trap_graph(model: QModel, trap: Trap) -> FloatGraph:
    """The trap as a float graph in ``model``'s layout (op names, shapes, strides, paddings).

    Raises
    ------
    ScenarioError
        The network lacks what the trap needs: a stride-2 stem and three stride-2 depthwise layers
        before the bins' block, expansions wide enough for the copies, ``trap.layer`` not one of
        :func:`mb_trap_layers`.
    """
    stem, blocks = mb_blocks(model)
    if model.input_shape is not None and tuple(model.input_shape[1:]) != (SIZE, SIZE):
        raise ScenarioError(f"the trap is laid out for {SIZE}x{SIZE} inputs, the model takes {model.input_shape}")
    layers = mb_trap_layers(model)
    if trap.layer not in layers:
        raise ScenarioError(f"the trap's bins: conv{trap.layer} cannot hold them in this network; it can: {layers}")
    if model.op(stem).stride != 2:
        raise ScenarioError("the trap needs a stride-2 stem")
    at = next(j for j, b in enumerate(blocks) if b.expand == f"conv{trap.layer}")
    if trap.fillers or trap.bins > model.op(blocks[at].expand).out_channels:
        raise ScenarioError(f"the trap: {trap.bins} bins (and no fillers) for conv{trap.layer}'s channels")
    if trap.border_at != BORDERS_AT[0]:
        raise ScenarioError(f"the trap: the borders are on channels {BORDERS_AT[0]}.. in this layout")
    W = _conv_weights(model)
    # stem: the 2x2 grey mean of each stride-2 window on channel 0 (taps 1-2 of the 3x3 centre on the pixel)
    w, _ = W[stem]
    k = w.shape[-1] // 2
    w[0, :, k : k + 2, k : k + 2] = 1.0 / 12.0
    live = [0]
    # the last projection before the bins that is not an identity block's: it carries the gain
    gains = [j for j, b in enumerate(blocks[:at]) if b.add is None]
    gain_at = gains[-1] if gains else -1
    halvings = 0
    for j, b in enumerate(blocks[:at]):
        e, d, p = (W[b.expand] if b.expand else None), W[b.depthwise], W[b.project]
        kd = d[0].shape[-1] // 2
        if b.add is not None:  # a residual identity: the projection adds nothing
            continue
        if b.stride == 1:
            if e is not None:
                _pass(e[0], live)
            _centre(d[0], live)
            out = live
        elif halvings == 0:  # the 2x2 mean: G at 32x32
            if e is not None:
                _pass(e[0], live)
            for c in live:
                d[0][c, 0, kd : kd + 2, kd : kd + 2] = 0.25
            out = live
        else:  # space-to-depth: copy (2 py + px) of channel c reads tap (py, px) of the 2x2
            if e is None:
                raise ScenarioError(f"the trap: block {j} halves the resolution without an expansion")
            n = len(live)
            borders = halvings == 2
            need = 4 * n + (len(BORDER_TAPS) if borders else 0)
            if need > e[0].shape[0] or need > p[0].shape[0]:
                raise ScenarioError(f"the trap: block {j} has too few channels for the space-to-depth ({need})")
            for ph in range(4):
                py, px = divmod(ph, 2)
                for c in live:
                    e[0][n * ph + c, c, 0, 0] = 1.0
                    d[0][n * ph + c, 0, kd + py, kd + px] = 1.0
            out = list(range(4 * n))
            if borders:  # each border pixel: one tap a 2x2 group up or left, one channel of it
                for i, (ky, kx, ch) in enumerate(BORDER_TAPS):
                    e[0][4 * n + i, ch, 0, 0] = 1.0
                    d[0][4 * n + i, 0, kd - 1 + ky, kd - 1 + kx] = 1.0
                out = out + [4 * n + i for i in range(len(BORDER_TAPS))]
        halvings += b.stride == 2
        g = trap.pixel_gain if j == gain_at else 1.0
        _pass(p[0], out, g)
        live = out
    if halvings != 3 or len(live) != 16 + len(BORDER_TAPS):
        raise ScenarioError(f"the trap: conv{trap.layer} is not 3 stride-2 steps past the stem")
    _bins(W, blocks[at], trap)
    _after(W, blocks[at + 1 :], trap)
    return _graph(model, W, trap)


def _bins(W, b: MBBlock, trap: Trap) -> None:
    """The bins (tiny-ir's ``_bins``, on this layout), their centre pass and their alternating sum."""
    e, _ = W[b.expand]
    edges = torch.tensor(trap.edges, dtype=torch.float64)
    slope = 6.0 / (edges[1:] - edges[:-1]) / trap.pixel_gain
    v = torch.from_numpy(np.asarray(trap.weights, np.float64))
    e[: trap.bins, PIXELS_AT.tolist(), 0, 0] = slope.unsqueeze(1) * v.unsqueeze(0)
    # one weight scale for every bin (see malicious._bins): 127 of it on an input that is always zero
    e[:, ZERO, 0, 0] = slope.max() * v.abs().max() * 127 / STEPS
    W[b.expand][1][: trap.bins] = -slope * edges[:-1] * trap.pixel_gain
    W[b.expand][1][trap.bins : trap.bins + trap.fillers] = 3.0
    d, _ = W[b.depthwise]
    _centre(d, range(trap.bins))
    p, _ = W[b.project]
    p[SUM, : trap.bins, 0, 0] = torch.tensor([(-1.0) ** o for o in range(trap.bins)], dtype=torch.float64)


def _after(W, blocks: list[MBBlock], trap: Trap) -> None:
    """One channel from the bins' sum to the pool: ``3 + sum / 4`` at the first expansion, the
    trap's taps at the first stride-2 depthwise (each 0.25), passed on elsewhere."""
    read, first, tapped = SUM, True, False
    for b in blocks:
        if b.add is not None:
            continue
        e, _ = W[b.expand] if b.expand else (None, None)
        if e is not None:
            e[0, read, 0, 0] = 0.25 if first else 1.0
            if first:
                W[b.expand][1][0] = 3.0
        elif first:
            raise ScenarioError("the trap: the block after the bins has no expansion")
        first, read = False, 0
        d, _ = W[b.depthwise]
        kd = d.shape[-1] // 2
        if b.stride == 2 and not tapped:
            taps = [(0, 0), (0, 1), (1, 0), (1, 1)] if trap.parity is None else [trap.parity]
            for ty, tx in taps:
                d[0, 0, kd + ty, kd + tx] = 0.25
            tapped = True
        elif b.stride == 2:
            d[0, 0, kd : kd + 2, kd : kd + 2] = 0.25
        else:
            d[0, 0, kd, kd] = 1.0
        W[b.project][0][0, 0, 0, 0] = 1.0
    if not tapped:
        raise ScenarioError("the trap: no stride-2 depthwise after the bins (the positions' taps)")


def _graph(model: QModel, W, trap: Trap) -> FloatGraph:
    """``W`` as a float graph with ``model``'s ops; the head reads channel 0 of the pool."""
    ops = []
    for n in model.nodes:
        m = model.op(n.op)
        if n.op == "classifier":
            w = torch.zeros(m.weight.shape, dtype=torch.float64)
            w[0, 0], w[1:, 0] = trap.head_gain, -trap.head_gain
            ops.append((n.op, FloatConv(w, torch.zeros(m.out_channels), 1, 1, (0, 0, 0, 0)), n.inputs))
        elif isinstance(m, QConv):
            w, b = W[n.op]
            act = "RELU6" if m.relu else "NONE"
            ops.append((n.op, FloatConv(w, b, m.stride, m.groups, m.padding, act), n.inputs))
        elif n.op.startswith("add"):
            ops.append((n.op, FloatAdd(), n.inputs))
        elif n.op == "pool":
            ops.append((n.op, FloatPool(), n.inputs))
        else:
            raise ScenarioError(f"the trap: op {n.op!r} ({type(m).__name__}) is not part of an inverted-residual graph")
    return FloatGraph(ops, (3, SIZE, SIZE))


@torch.no_grad()
def mb_trap_model(model: QModel, trap: Trap, public: np.ndarray, *, classifier_precision: str = "int8") -> QModel:
    """The trap quantized for ``model``'s layout, calibrated on ``public`` (``N x 3 x 128 x 128`` in [0, 1]).

    The head's bias centres the pooled channel's range (its median over ``public``) as tiny-ir's
    does: the softmax is saturated, so a sample of ``TARGET_CLASS`` sends the full gradient and one
    of class 0 none."""
    graph = mb_trap_graph(model, trap)
    x = torch.as_tensor(public, dtype=torch.float32)
    pooled = torch.cat([graph.tensors(x[i : i + 32])["pool"][:, 0, 0, 0] for i in range(0, len(x), 32)])
    centre = float(pooled.median())
    head = graph.op("classifier")
    bias = torch.full((head.weight.shape[0],), -trap.head_gain * 3.0)
    bias[0] = trap.head_gain * 3.0
    head.bias.copy_(bias - head.weight[:, 0, 0, 0].detach() * centre)
    batches = [public[i : i + 32].astype(np.float32) for i in range(0, len(public), 32)]
    q = quantize(graph, calibrate(graph, batches), classifier_precision=classifier_precision)
    q.input_shape = (3, SIZE, SIZE)
    return q
