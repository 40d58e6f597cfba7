"""TinyTL's lite residual modules (Cai et al., NeurIPS 2020) on an int8 graph of convolution blocks.

"Reduce Activations, Not Trainable Parameters": freeze the weights, train the biases, and give
chosen blocks a small side branch from the block's input to its output, whose weights are trained.
Here each branch is a depthwise convolution (the block's kernel and stride; ``multiplier`` copies of
each input channel: TinyTL's group convolution at its narrowest groups) then a 1x1 convolution to
the block's output channels, added to the block's output:

``lite<j>a``  depthwise on the block's input (ReLU6, the quantization of the block's depthwise)
``lite<j>b``  1x1 to the block's output channels (the quantization of the block's output, zero 0)
``lite<j>``   the add of the block's output and ``lite<j>b`` (the block's output quantization)

A block is an inverted-residual or depthwise-separable block (tiny-ir, MCUNet, MobileNetV2, DS-CNN,
MobileNetV1), or else a residual block (ResNet-8: convolutions from the block's input to a residual
add), where the branch's depthwise takes the block's first convolution's kernel, stride, activation
and output quantization (:func:`lite_sites`).

``lite<j>b`` starts at zero weights (with the scales of a He initialisation, so training moves
them in steps of a sensible size) and shares its output scale with the block's output: the add then
rescales by exact powers of two, and the extended network computes exactly what the original did.

TinyTL also lowers the branch's resolution, which shrinks its activations (and the input the
depthwise keeps for its weight gradient) by ``reduction`` squared. With ``reduction`` r > 1 the
branch runs at 1/r of the block's resolution, between two more ops:

``lite<j>p``  AVERAGE_POOL_2D r x r at stride r on the block's input (its quantization unchanged)
``lite<j>a``  the depthwise on ``lite<j>p``, ``lite<j>b`` the 1x1 as above
``lite<j>u``  RESIZE_NEAREST_NEIGHBOR of ``lite<j>b`` by r, which ``lite<j>`` adds

The upsampled zeros of ``lite<j>b`` are zeros, so the extended network still computes exactly what
the original did. r must bring the branch back to the block's output size (r divides the block's
output height and width); :func:`extend_lite` refuses another, naming the block and its shapes.

A network of fully connected layers alone (MLPerf Tiny's anomaly-detection autoencoder) has no
blocks and no resolution. There a module goes beside each hidden layer (every fully connected op but
the head), from the layer's input to its output, as the narrowest branch TinyTL's recipe allows on a
vector: ``lite<j>a`` fully connected to ``h`` units (ReLU, the layer's output quantization), then
``lite<j>b`` back to the layer's width (zero weights), added to the layer's output. ``h`` is
``multiplier * width // (4 * reduction**2)`` (at least 1): a quarter of the layer's activations, as a
branch at half resolution holds a quarter of its block's, and ``reduction`` r shrinks it by r², as a
lower resolution does a convolution's branch. Their weights are per tensor (TFLite's
FULLY_CONNECTED); the layer's output ReLU (zero point -128) then clamps the sum, so the module
changes the layer's activations where they are positive or pushed positive.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from fedtiny.errors import ModelFileError, SchemeError
from fedtiny.int8.blocks import mb_blocks, residual_blocks
from fedtiny.int8.graph import QModel
from fedtiny.int8.ops.add import QAdd
from fedtiny.int8.ops.conv import QConv
from fedtiny.int8.ops.pool import QAvgPool
from fedtiny.int8.ops.resize import QResize

__all__ = ["LITE", "LiteSpec", "Site", "parse_lite", "lite_sites", "extend_lite", "lite_convs", "is_lite"]

LITE = "lite-residual"  # the scheme preset's name


@dataclass(frozen=True)
class LiteSpec:
    """Where the lite residual modules go and how wide they are.

    Attributes
    ----------
    blocks
        Train a module beside the last ``blocks`` blocks (0: every block).
    multiplier
        Channels of the branch's depthwise per input channel.
    reduction
        The branch's resolution divided by this (an average pool before it, an upsampling after it).
    biases
        ``all`` (TinyTL: every bias of the frozen network too) or ``lite`` (the modules' alone).
    """

    blocks: int = 0
    multiplier: int = 1
    reduction: int = 1
    biases: str = "all"


def is_lite(scheme_text: str) -> bool:
    """Whether a scheme string asks for lite residual modules."""
    return scheme_text.strip() == LITE or scheme_text.strip().startswith(LITE + ":")


def parse_lite(text: str) -> LiteSpec:
    """``lite-residual`` or ``lite-residual:blocks=4,multiplier=2,reduction=1,biases=lite``.

    Raises
    ------
    SchemeError
        An unknown key or a value out of range, named.
    """
    _, _, opts = text.strip().partition(":")
    values: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in opts.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key not in ("blocks", "multiplier", "reduction", "biases"):
            raise SchemeError(
                f"scheme {text!r}: {part!r}: expected key=value with key blocks, multiplier, reduction or biases"
            )
        values[key] = value.strip()
    try:
        spec = LiteSpec(
            blocks=int(values.get("blocks", 0)),
            multiplier=int(values.get("multiplier", 1)),
            reduction=int(values.get("reduction", 1)),
            biases=values.get("biases", "all"),
        )
    except ValueError as exc:
        raise SchemeError(f"scheme {text!r}: {exc}") from None
    if spec.blocks < 0 or spec.multiplier < 1 or spec.reduction < 1:
        raise SchemeError(f"scheme {text!r}: blocks must be >= 0, multiplier >= 1 and reduction >= 1")
    if spec.biases not in ("all", "lite"):
        raise SchemeError(f"scheme {text!r}: biases must be all or lite, not {spec.biases!r}")
    return spec


def lite_convs(model: QModel) -> list[int]:
    """Indices (in ``model.convs()``, the schemes' layer indices) of the lite modules' convolutions."""
    return [i for i, c in enumerate(model.convs()) if c.tag.startswith("lite")]


def _y(model: QModel, tensor: str) -> tuple[float, int]:
    """The output quantization ``(scale, zero)`` of the op writing ``tensor``."""
    q = model.op(tensor).qparams
    return float(q[2]), int(q[3])


def _x(model: QModel, source: str) -> tuple[float, int]:
    """The quantization ``(scale, zero)`` of ``source``, a module's input (an op's output or the model's input)."""
    if source == "input":
        return float(model.input_params[0]), int(model.input_params[1])
    return _y(model, source)


@dataclass(frozen=True)
class Site:
    """Where one module goes: the tensor its branch reads (``source``), the one it adds to (``output``),
    and the convolution whose kernel, stride, padding, activation and output quantization the branch's
    depthwise takes (``like``: the block's depthwise, or a ResNet block's first convolution)."""

    source: str
    output: str
    like: str
    in_channels: int
    out_channels: int


def lite_sites(model: QModel) -> list[Site]:
    """The blocks of ``model`` a module can go beside, in forward order: those of the first of
    :func:`_block_sites` (inverted-residual and depthwise-separable blocks: tiny-ir, MCUNet,
    MobileNetV2, DS-CNN, MobileNetV1), :func:`_residual_sites` (ResNet-8) and :func:`_dense_sites` (a
    network of fully connected layers) that finds any.

    Raises
    ------
    ModelFileError
        ``model`` has none of them (a plain chain of convolutions).
    """
    for find in (_block_sites, _residual_sites, _dense_sites):
        sites = find(model)
        if sites:
            return sites
    raise ModelFileError(
        "lite-residual: the model has no inverted-residual or depthwise-separable blocks, no residual blocks (an "
        "add of a block's input, or a shortcut of it, and its convolutions), and is not a network of fully "
        "connected layers: TinyTL's modules go beside convolution blocks or hidden dense layers"
    )


def _block_sites(model: QModel) -> list[Site]:
    """Inverted-residual and depthwise-separable blocks, from their input to their output, the branch shaped
    like the block's depthwise."""
    try:
        _, blocks = mb_blocks(model)
    except ModelFileError:
        return []
    return [
        Site(
            b.source,
            b.output,
            b.depthwise,
            model.op(b.expand or b.depthwise).in_channels,
            model.op(b.project).out_channels,
        )
        for b in blocks
    ]


def _residual_sites(model: QModel) -> list[Site]:
    """Residual blocks, from their input to their residual add, the branch shaped like the block's first
    convolution (its stride too)."""
    return [
        Site(b.source, b.add, b.convs[0], model.op(b.convs[0]).in_channels, model.op(b.convs[-1]).out_channels)
        for b in residual_blocks(model)
    ]


def _dense_sites(model: QModel) -> list[Site]:
    """Each hidden fully connected layer of a network whose weighted ops are all fully connected (none if
    any is not): the layer's input to its output, the layer its own pattern."""
    convs = model.convs()  # the head (the last weighted op) is not among them: it gets no module
    if not convs or any(c.kind != "fc" for c in convs):
        return []
    hidden = {id(c) for c in convs}
    return [
        Site(n.inputs[0], n.op, n.op, model.op(n.op).in_channels, model.op(n.op).out_channels)
        for n in model.nodes
        if id(model.op(n.op)) in hidden
    ]


def _is_dense(model: QModel, b: Site) -> bool:
    return model.op(b.like).kind == "fc"


def _shapes(model: QModel) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape (batch 1) at the model's input shape: a forward of zeros."""
    if model.input_shape is None:
        raise SchemeError("lite-residual: a reduction above 1 needs the model's input shape (C, H, W)")
    with torch.no_grad():
        env = model._run(torch.zeros(1, *model.input_shape), model._head, record=False)
    return {name: tuple(t.shape) for name, t in env.items()}


def _check_reduction(model: QModel, b: Site, j: int, r: int, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a reduction ``r`` that does not bring block ``j``'s branch back to the block's output size
    (pooled r x r at stride r, the block's depthwise, upsampled by r)."""
    (h, w), (oh, ow) = shapes[b.source][2:], shapes[b.output][2:]
    ph, pw = (h // r, w // r)
    dh, dw = model.op(b.like).out_hw((ph, pw)) if min(ph, pw) >= 1 else (0, 0)
    if min(ph, pw, dh, dw) < 1 or (r * dh, r * dw) != (oh, ow):
        raise SchemeError(
            f"lite-residual: reduction {r}: block {j} ({b.like}) maps {h}x{w} to {oh}x{ow}, but its branch "
            f"at 1/{r} resolution gives {ph}x{pw} pooled, {dh}x{dw} after the depthwise, {r * dh}x{r * dw} "
            f"upsampled; the reduction must divide the block's output height and width ({oh}x{ow})"
        )


def _branch(model: QModel, b: Site, j: int, source: str, spec: LiteSpec, rng: np.random.Generator) -> list:
    """The ops of block ``j``'s module (modules carrying their ``tag``) and their inputs; the branch
    reads ``source`` (the block's input, or the module's add that replaced it)."""
    if _is_dense(model, b):
        return _dense_branch(model, b, j, source, spec, rng)
    dw, cin, cout = model.op(b.like), b.in_channels, b.out_channels
    k = dw.kernel_size
    mid = cin * spec.multiplier
    # He initialisation of a depthwise (fan-in k*k), on int8's grid with per-channel scales
    w = rng.normal(0.0, np.sqrt(2.0 / (k * k)), (mid, 1, k, k))
    scales = np.maximum(np.abs(w).reshape(mid, -1).max(1), 1e-8) / 127.0
    x_q = _x(model, b.source)
    a = QConv(
        torch.from_numpy(np.round(w / scales[:, None, None, None])),
        torch.zeros(mid),
        torch.from_numpy(scales),
        *x_q,
        *_y(model, b.like),
        dw.stride,
        cin,
        padding=dw.padding,
        activation=dw.activation,
    )
    a.relu = True
    # the 1x1's scales as a He initialisation's, its weights zero: the module adds nothing at first
    he = rng.normal(0.0, np.sqrt(2.0 / mid), (cout, mid))
    out_scale = _y(model, b.output)[0]
    pb = QConv(
        torch.zeros(cout, mid, 1, 1),
        torch.zeros(cout),
        torch.from_numpy(np.maximum(np.abs(he).max(1), 1e-8) / 127.0),
        *_y(model, b.like),
        out_scale,
        0,
        padding=(0, 0, 0, 0),
    )
    pb.relu = False
    add = _add(model, b, j, a, pb)
    r = spec.reduction
    if r == 1:
        return [(a, (source,)), (pb, (a.tag,)), (add, (b.output, pb.tag))]
    # at 1/r resolution: an average and an upsampling keep their input's quantization, so the depthwise
    # reads the block input's and the add the 1x1's, as at full resolution
    pool, up = QAvgPool((r, r), r), QResize((r, r))
    pool.tag, up.tag = f"lite{j}p", f"lite{j}u"
    return [(pool, (source,)), (a, (pool.tag,)), (pb, (a.tag,)), (up, (pb.tag,)), (add, (b.output, up.tag))]


def _add(model: QModel, b: Site, j: int, a: QConv, pb: QConv) -> QAdd:
    """The module's add, and the tags of its two weighted ops."""
    out_scale, out_zero = _y(model, b.output)
    # the same scale on both inputs and the output: the add's multipliers are powers of two (exact)
    add = QAdd(out_scale, out_zero, out_scale, 0, out_scale, out_zero)
    a.tag, pb.tag, add.tag = f"lite{j}a", f"lite{j}b", f"lite{j}"
    return add


def _dense_branch(model: QModel, b: Site, j: int, source: str, spec: LiteSpec, rng: np.random.Generator) -> list:
    """A hidden dense layer's module (see the module's note): ``h`` units, per-tensor weights."""
    cin, cout = b.in_channels, b.out_channels
    h = max(1, spec.multiplier * cout // (4 * spec.reduction**2))
    x_q = _x(model, b.source)
    w = rng.normal(0.0, np.sqrt(2.0 / cin), (h, cin))
    scale = max(float(np.abs(w).max()), 1e-8) / 127.0  # one scale per tensor: TFLite's FULLY_CONNECTED
    a = QConv(
        torch.from_numpy(np.round(w / scale)[:, :, None, None]),
        torch.zeros(h),
        torch.full((h,), scale),
        *x_q,
        *_y(model, b.like),
        padding=(0, 0, 0, 0),
        activation="RELU",
        kind="fc",
    )
    he = rng.normal(0.0, np.sqrt(2.0 / h), (cout, h))
    pb = QConv(
        torch.zeros(cout, h, 1, 1),
        torch.zeros(cout),
        torch.full((cout,), max(float(np.abs(he).max()), 1e-8) / 127.0),
        *_y(model, b.like),
        _y(model, b.output)[0],
        0,
        padding=(0, 0, 0, 0),
        kind="fc",
    )
    pb.relu = False
    add = _add(model, b, j, a, pb)
    return [(a, (source,)), (pb, (a.tag,)), (add, (b.output, pb.tag))]


def extend_lite(model: QModel, spec: LiteSpec, seed: int = 0) -> QModel:
    """A copy of ``model`` with a lite residual module beside each chosen block (see the module's note).

    Raises
    ------
    ModelFileError
        ``model`` has no blocks a module can go beside (:func:`lite_sites`), or already has modules.
    SchemeError
        ``spec.reduction`` does not bring a chosen block's branch back to the block's output size.
    """
    if any(n.op.startswith("lite") for n in model.nodes):
        raise ModelFileError("lite-residual: the model already has lite residual modules")
    blocks = lite_sites(model)
    chosen = blocks[-spec.blocks :] if spec.blocks else blocks
    if spec.reduction > 1 and not any(_is_dense(model, b) for b in chosen):  # a dense module has no resolution
        shapes = _shapes(model)
        for b in chosen:
            _check_reduction(model, b, blocks.index(b), spec.reduction, shapes)
    model = copy.deepcopy(model)
    rng = np.random.default_rng(seed)
    after = {b.output: (j, b) for j, b in enumerate(blocks) if b in chosen}
    rename: dict[str, str] = {}
    ops = []
    for n in model.nodes:
        ops.append((model.op(n.op), tuple(rename.get(t, t) for t in n.inputs)))
        if n.op in after:
            j, b = after[n.op]
            ops += _branch(model, b, j, rename.get(b.source, b.source), spec, rng)
            rename[n.op] = f"lite{j}"
    scale, zero, mean, std = (float(v) for v in model.input_params)
    out = QModel(ops, scale, int(zero), mean, std, model.input_shape)
    out.float_input, out.float_output = model.float_input, model.float_output
    return out
