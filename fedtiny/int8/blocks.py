"""The blocks of an int8 graph, by op name: inverted-residual blocks and plain residual blocks.

``fedtiny.int8.graph.from_blocks`` lays an inverted-residual network (tiny-ir, MCUNet, MobileNetV2,
ProxylessNAS; MLPerf Tiny's DS-CNN and MobileNetV1 read the same way) out as ``conv0``, then per block
an optional 1x1 expansion, a depthwise, a 1x1 projection and an optional residual add
(:func:`mb_blocks`). A ResNet's blocks are chains of full convolutions ending in a residual add whose
other input is the block's input or a shortcut convolution of it (:func:`residual_blocks`). Tools that
change a network block by block (a malicious server's trap, TinyTL's lite residual modules) read them
here.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtiny.errors import ModelFileError
from fedtiny.int8.graph import QModel
from fedtiny.int8.ops.conv import QConv

__all__ = ["MBBlock", "mb_blocks", "ResBlock", "residual_blocks"]


@dataclass(frozen=True)
class MBBlock:
    """One inverted-residual block of an int8 graph, by op name.

    Attributes
    ----------
    expand, depthwise, project
        The block's convolutions (``expand`` None when it has no 1x1 expansion).
    add
        The residual add of the block's input and its projection, or None.
    stride
        The depthwise's stride.
    source, output
        The tensor the block reads (its input) and the one it writes (the add's, else the projection's).
    """

    expand: str | None
    depthwise: str
    project: str
    add: str | None
    stride: int
    source: str = ""
    output: str = ""


def mb_blocks(model: QModel) -> tuple[str, list[MBBlock]]:
    """The stem and the blocks of ``model``.

    Raises
    ------
    ModelFileError
        ``model`` is not in the inverted-residual layout (a convolution that is neither followed
        by a depthwise and a projection nor one of them).
    """
    inputs = {n.op: n.inputs for n in model.nodes}
    convs = [n.op for n in model.nodes if isinstance(model.op(n.op), QConv) and n.op != "classifier"]
    adds = {n.inputs[1]: n.op for n in model.nodes if n.op.startswith("add") and len(n.inputs) == 2}
    if not convs or inputs.get(convs[0]) != ("input",):
        raise ModelFileError("not an inverted-residual int8 graph: its first convolution does not read the input")
    blocks, i = [], 1
    while i < len(convs):
        expand = None
        if not model.op(convs[i]).is_depthwise:
            expand, i = convs[i], i + 1
        if i + 1 >= len(convs) or not model.op(convs[i]).is_depthwise:
            raise ModelFileError(
                f"not an inverted-residual int8 graph: {convs[i - 1]} is not followed by a depthwise and a projection"
            )
        dw, pw = convs[i], convs[i + 1]
        source = inputs[expand or dw][0]
        add = adds.get(pw)
        blocks.append(MBBlock(expand, dw, pw, add, model.op(dw).stride, source, add or pw))
        i += 2
    return convs[0], blocks


@dataclass(frozen=True)
class ResBlock:
    """One residual block of an int8 graph (a ResNet's basic block), by op name.

    Attributes
    ----------
    convs
        The main path's convolutions, in order (the first reads ``source``, the last is an input of ``add``).
    shortcut
        The convolution on the skip path (a strided 1x1), or None when the skip is ``source`` itself.
    add, source
        The residual add (also the block's output) and the tensor the block reads.
    """

    convs: tuple[str, ...]
    shortcut: str | None
    add: str
    source: str


def _chain(model: QModel, tensor: str, producers: dict[str, tuple[str, ...]]) -> list[str]:
    """``tensor`` and the tensors before it through single-input convolutions (a path of the graph)."""
    path = [tensor]
    while tensor in producers and isinstance(model.op(tensor), QConv) and len(producers[tensor]) == 1:
        tensor = producers[tensor][0]
        path.append(tensor)
    return path


def residual_blocks(model: QModel) -> list[ResBlock]:
    """The residual blocks of ``model``: each two-input add whose inputs meet, through convolutions, at
    one tensor (the block's input); the longer path is the main one. Adds of other shapes are left out."""
    producers = {n.op: n.inputs for n in model.nodes}
    blocks = []
    for n in model.nodes:
        if len(n.inputs) != 2 or isinstance(model.op(n.op), QConv):
            continue
        a, b = (_chain(model, t, producers) for t in n.inputs)
        source = next((t for t in a if t in b), None)
        if source is None:
            continue
        main, skip = sorted((a[: a.index(source)], b[: b.index(source)]), key=len, reverse=True)
        if len(skip) > 1 or not main:
            continue
        blocks.append(ResBlock(tuple(reversed(main)), skip[0] if skip else None, n.op, source))
    return blocks
