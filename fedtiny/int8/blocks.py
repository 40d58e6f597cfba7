"""The inverted-residual blocks of an int8 graph (tiny-ir, MCUNet, MobileNetV2, ProxylessNAS), by op name.

``fedtiny.int8.graph.from_blocks`` lays such a network out as ``conv0``, then per block an optional
1x1 expansion, a depthwise, a 1x1 projection and an optional residual add. Tools that change a
network block by block (a malicious server's trap, TinyTL's lite residual modules) read it here.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtiny.errors import ModelFileError
from fedtiny.int8.graph import QModel
from fedtiny.int8.ops.conv import QConv

__all__ = ["MBBlock", "mb_blocks"]


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
