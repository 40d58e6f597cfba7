"""RESIZE_NEAREST_NEIGHBOR (fedtiny/int8/ops/resize.py): TFLM's forward, the exact backward against a plain loop,
the C step bit for bit, the ``.tflite`` and model-file forms and the planner's buffers, on graphs built here."""

import copy

import numpy as np
import pytest
import torch
from test_c_step import _compare, built  # noqa: F401 (built: the C step's fixture)
from test_kernels_misc_tflm import _const, _int8, _model, _nchw, _q, _tflm_run
from test_ops_tflm import DepthMultiplier, _tflm_differences

from fedtiny.int8.ops.resize import QResize


@pytest.mark.parametrize("h, w, factor", [(3, 4, (2, 2)), (2, 3, (3, 1)), (5, 2, (1, 4))])
def test_resize_equals_tflm(h, w, factor):
    """One-op models of TFLM's kernel (align_corners and half_pixel_centers false): 0 differing elements."""
    oh, ow = h * factor[0], w * factor[1]
    tensors = [_q("x", (1, h, w, 3), 0.05, -3), _const("size", [oh, ow]), _q("y", (1, oh, ow, 3), 0.05, -3)]
    model = _model(
        tensors, "RESIZE_NEAREST_NEIGHBOR", (0, 1), (2,), {"align_corners": False, "half_pixel_centers": False}
    )
    x = _int8((1, h, w, 3), 11)
    want = _tflm_run(model, x).reshape(len(x), oh, ow, 3)
    with torch.no_grad():
        got = QResize(factor)(_nchw(x).float()).permute(0, 2, 3, 1).numpy()
    assert got.shape == want.shape and int((got != want).sum()) == 0


def test_the_backward_sums_each_inputs_copies_in_row_major_order():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-128, 128, (2, 3, 3, 4), generator=gen).float().requires_grad_(True)
    y = QResize((3, 2))(x)
    g = torch.randn(y.shape, generator=gen)
    (gx,) = torch.autograd.grad(y, x, g)
    want = np.zeros((2, 3, 3, 4), np.float32)
    gv = g.numpy()
    for iy in range(3):
        for ix in range(4):
            acc = np.float32(0.0)
            for i in range(3):
                for j in range(2):
                    acc = np.float32(acc + gv[:, :, iy * 3 + i, ix * 2 + j])
            want[:, :, iy, ix] = acc
    assert np.array_equal(gx.numpy(), want)


def _upsampled():
    """A small network (6x6 inputs) with two branches at lower resolution added back: a 2x2 average pool then an
    upsampling by 2, and a padded 4x4 pool at stride 4 (SAME: windows of 3 and 4 rows) then an upsampling by 3."""
    from fedtiny.int8.convert import ptq
    from fedtiny.int8.graph import QModel
    from fedtiny.int8.ops.add import QAdd
    from fedtiny.int8.ops.pool import QAvgPool

    torch.manual_seed(0)
    q = ptq(DepthMultiplier(), np.random.default_rng(0).random((64, 1, 6, 6), dtype=np.float32))
    s, z = q.op("conv0").y_scale, q.op("conv0").y_zero
    q.op("conv1").qparams[0] = 2 * s  # it reads the add, whose scale holds the sum of two copies of conv0
    branch = []
    for name, pool, factor in (("a", QAvgPool((2, 2), 2), 2), ("b", QAvgPool((4, 4), 4, (1, 1, 1, 1)), 3)):
        up = QResize((factor, factor))
        pool.tag, up.tag = f"pool_{name}", f"up_{name}"
        branch += [(pool, ("conv0",)), (up, (pool.tag,))]
    add = QAdd(s, z, s, z, 2 * s, z)
    add.tag = "add0"
    ops = [(q.op("conv0"), ("input",)), *branch, (add, ("up_a", "up_b"))]
    ops += [(q.op(n.op), ("add0",) if n.op == "conv1" else n.inputs) for n in q.nodes[1:]]
    return QModel(ops, *[float(v) for v in q.input_params], input_shape=q.input_shape)


def test_a_graph_with_resizes_equals_tflm_and_round_trips(tmp_path):
    from fedtiny.int8.modelfile import load_qmodel, save_qmodel
    from fedtiny.int8.tfl_convert import export_tflite, from_tflite
    from fedtiny.int8.tflite import read_tflite

    q = _upsampled()
    data = export_tflite(q, tmp_path / "up.tflite").read_bytes()
    ops = [op.op for op in read_tflite(data).ops]
    assert ops.count("RESIZE_NEAREST_NEIGHBOR") == 2 and ops.count("AVERAGE_POOL_2D") == 3
    assert _tflm_differences(data) == (0, 0)
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    back = from_tflite(read_tflite(data))
    assert sorted(m.factor for m in back.modules() if isinstance(m, QResize)) == [(2, 2), (3, 3)]
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
        assert torch.equal(load_qmodel(save_qmodel(q, tmp_path / "up.safetensors"))(x), q(x))


@pytest.mark.parametrize("batch", [1, 2])
def test_the_c_step_trains_through_resizes_bit_for_bit(built, batch):  # noqa: F811
    """Every tensor trained: gradients cross both upsamplings and the windowed pools; the C step follows the
    planner's layout and arena (checked against its count by _compare)."""
    from fedtiny.budget.schemes import apply_scheme, parse_scheme, resolve

    q = _upsampled()
    apply_scheme(q, resolve(parse_scheme("full"), q))
    gen = torch.Generator().manual_seed(2)
    xs = [torch.rand(batch, 1, 6, 6, generator=gen) for _ in range(2)]
    ys = [torch.randint(0, 10, (batch,), generator=gen) for _ in range(2)]
    before = q.op("conv0").weight.detach().clone()
    forward, params, cs = _compare(q, xs, ys, steps=2, lr=0.05)
    assert forward == 0 and params == 0
    assert "resize" in {g["kind"] for g in cs.op_geometry()}
    assert not torch.equal(before, q.op("conv0").weight.detach())  # reached through the resizes


def test_the_planner_counts_what_a_step_holds():
    from fedtiny.budget.memory import measure_step, memory_report
    from fedtiny.budget.schemes import parse_scheme, resolve
    from fedtiny.int8.ops.base import Wiring

    out, events = QResize((2, 3)).schedule([(4, 5, 3, 2)], Wiring.single(), [True])
    assert out == (5, 6, 6)
    assert (events.out_bytes, events.saved, events.grad_bytes) == (4 * 5 * 6 * 6, 0, 4 * 4 * 5 * 6 * 6)
    assert [n for _, n in events.input_grads] == [4 * 4 * 5 * 3 * 2]  # one float32 gradient of the input
    assert QResize((2, 3)).schedule([(4, 5, 3, 2)], Wiring.single(), [False])[1].input_grads == ()
    q = copy.deepcopy(_upsampled())
    x, y = torch.rand(1, 1, 6, 6), torch.tensor([3])
    for scheme in ("full", "last-k:2"):
        r = resolve(parse_scheme(scheme), q)
        rep, led = memory_report(q, r, (1, 6, 6)), measure_step(q, r, x, y)
        assert (rep.peak_sram_bytes, rep.peak_at) == (led.peak, led.peak_at), scheme


def test_the_c_step_refuses_average_pools_whose_windows_overlap(built):  # noqa: F811
    """Its backward gives each input one window's share: a 5x5 window at stride 4 is refused by name."""
    from fedtiny.errors import ModelFileError
    from fedtiny.int8 import cstep

    q = _upsampled()
    q.op("pool_b").kernel, q.op("pool_b").padding = (5, 5), (2, 1, 2, 1)  # still 2x2 outputs, upsampled to 6x6
    with pytest.raises(ModelFileError, match="'pool_b' .*windows overlap"):
        cstep.CStep(q, lr=0.01)
