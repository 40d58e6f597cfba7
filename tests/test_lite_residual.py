"""TinyTL's lite residual modules: the extended int8 graph, its scheme, the C step and TFLM."""

import numpy as np
import pytest
import torch
from conftest import SHARED_MODELS
from test_c_step import _compare, _digits_batches, built  # noqa: F401 (built: the C step's fixture)
from test_int8 import small_qmodel

from fedtiny.budget.schemes import apply_scheme, parse_scheme, resolve
from fedtiny.errors import SchemeError
from fedtiny.int8.lite_residual import extend_lite, lite_convs, parse_lite


def _lite(model, text="lite-residual"):
    q = extend_lite(model, parse_lite(text), seed=0)
    apply_scheme(q, resolve(parse_scheme(text), q))
    return q


def _assert_tflm_exact_with_modules_off_zero(model):
    """The modules' weights set off zero (seeded), then TFLM computes every tensor of ``model`` alike."""
    from fedtiny.tools.models import compare_with_tflm

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in lite_convs(model):
            w = model.convs()[i].weight
            w.copy_(torch.randint(-20, 21, w.shape, generator=gen).float())
    r = compare_with_tflm(model, inputs=4)
    assert r["output_elements_differing"] == 0 and r["tensor_elements_differing"] == 0, r


def test_the_extended_model_computes_what_the_original_did():
    """The modules' 1x1 starts at zero and shares the block output's scale: the same integers everywhere."""
    q = small_qmodel()
    e = extend_lite(q, parse_lite("lite-residual:multiplier=2"), seed=0)
    x = torch.from_numpy(_digits_batches(1, size=32)[0][0].numpy())
    with torch.no_grad():
        assert torch.equal(q.int8_forward(q.quantize_input(x)), e.int8_forward(e.quantize_input(x)))
    lite = lite_convs(e)
    assert len(lite) == len(e.convs()) - len(q.convs()) > 0
    assert all(not e.convs()[i].weight.detach().any() for i in lite[1::2])  # the 1x1s: zero weights
    assert all(float(e.convs()[i].w_scales.min()) > 0 for i in lite)  # with scales that let them move


def test_the_scheme_trains_every_bias_and_the_modules_weights():
    e = _lite(small_qmodel())
    lite = set(lite_convs(e))
    assert all(c.bias.requires_grad for c in e.convs())
    assert [i for i, c in enumerate(e.convs()) if c.weight.requires_grad] == sorted(lite)
    only = _lite(small_qmodel(), "lite-residual:blocks=1,biases=lite")
    assert [i for i, c in enumerate(only.convs()) if c.bias.requires_grad] == lite_convs(only)
    assert len(lite_convs(only)) == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("lite-residual:reduction=0", "reduction >= 1"),
        ("lite-residual:width=3", "key blocks, multiplier, reduction or biases"),
        ("lite-residual:multiplier=0", "multiplier >= 1"),
    ],
)
def test_bad_options_are_named(text, message):
    with pytest.raises(SchemeError, match=message):
        parse_scheme(text)


def test_a_plain_chain_of_convolutions_is_refused_by_name():
    """No block, no residual add, not fully connected: nothing a module could go beside."""
    from fedtiny.errors import ModelFileError
    from fedtiny.int8.graph import QModel
    from fedtiny.int8.ops.conv import QConv

    conv = QConv(torch.ones(4, 1, 1, 1), torch.zeros(4), torch.full((4,), 0.01), 0.02, 0, 0.05, -128, activation="RELU")
    head = QConv(torch.ones(10, 4, 1, 1), torch.zeros(10), torch.full((10,), 0.01), 0.05, -128, 0.1, 0)
    conv.tag, head.tag = "conv0", "classifier"
    model = QModel([(conv, ("input",)), (head, ("conv0",))], 0.02, 0, 0.0, 1.0, (1, 4, 4))
    with pytest.raises(ModelFileError, match="no residual blocks.*not a network of fully connected layers"):
        extend_lite(model, parse_lite("lite-residual"))


def test_a_model_without_modules_is_refused_by_the_scheme():
    q = small_qmodel()
    with pytest.raises(SchemeError, match="no lite residual modules"):
        resolve(parse_scheme("lite-residual"), q)


def test_the_c_step_trains_the_modules_as_the_simulator_does(built):  # noqa: F811
    """Bit-exact against the simulator's exact step, in the arena the memory planner lays out (the planner
    counts what the C step holds: one gradient buffer per tensor, which the module's add and the block share)."""
    q = _lite(small_qmodel())
    q.input_shape = (1, 8, 8)
    before = {i: q.convs()[i].weight.detach().clone() for i in lite_convs(q)}
    forward, params, cs = _compare(q, *_digits_batches(2), steps=2, lr=0.05)
    assert forward == 0 and params == 0
    assert any(not torch.equal(before[i], q.convs()[i].weight.detach()) for i in before)  # the modules trained


def test_modules_at_half_resolution_are_exact_train_in_c_run_in_tflm_and_need_less_memory(built):  # noqa: F811
    """reduction=2: the branch pooled 2x2 and upsampled by 2 still adds nothing at first; the C step trains it bit
    for bit; with its weights off zero TFLM computes every tensor alike; and the step's peak is below
    reduction=1's (TinyTL's point). A reduction that misses a block's output size is refused by name."""
    import copy

    from fedtiny.budget.memory import memory_report

    q = small_qmodel()
    e = extend_lite(q, parse_lite("lite-residual:reduction=2"), seed=0)
    assert [n.op for n in e.nodes if n.op.startswith("lite1")] == ["lite1p", "lite1a", "lite1b", "lite1u", "lite1"]
    x = torch.from_numpy(_digits_batches(1, size=32)[0][0].numpy())
    with torch.no_grad():
        assert torch.equal(q.int8_forward(q.quantize_input(x)), e.int8_forward(e.quantize_input(x)))

    t = copy.deepcopy(e)
    apply_scheme(t, resolve(parse_scheme("lite-residual:reduction=2"), t))
    before = {i: t.convs()[i].weight.detach().clone() for i in lite_convs(t)}
    forward, params, cs = _compare(t, *_digits_batches(2), steps=2, lr=0.05)
    assert forward == 0 and params == 0
    assert any(not torch.equal(before[i], t.convs()[i].weight.detach()) for i in before)

    _assert_tflm_exact_with_modules_off_zero(t)

    peaks = {}
    for text in ("lite-residual", "lite-residual:reduction=2"):
        m = extend_lite(q, parse_lite(text), seed=0)
        peaks[text] = memory_report(m, resolve(parse_scheme(text), m), (1, 8, 8)).peak_sram_bytes
    assert peaks["lite-residual:reduction=2"] < peaks["lite-residual"], peaks
    with pytest.raises(SchemeError, match=r"reduction 3: block 0 \(conv1\) maps 8x8 to 8x8.* 6x6 upsampled"):
        extend_lite(q, parse_lite("lite-residual:reduction=3"))


def test_the_trained_extended_model_runs_in_tflm_with_no_differing_element():
    from fedtiny.data import load_source
    from fedtiny.federated.train import seeded, train_local
    from fedtiny.tools.models import compare_with_tflm

    q = _lite(small_qmodel())
    data = load_source("digits").subset(np.arange(1, 200, 2))
    train_local(q, data, epochs=1, batch_size=16, lr=0.05, optimizer="sgd+qas", momentum=0.0, gen=seeded(0))
    assert any(q.convs()[i].weight.detach().any() for i in lite_convs(q)[1::2])  # the 1x1s moved off zero
    q.input_shape = (1, 8, 8)
    r = compare_with_tflm(q, inputs=8)
    assert r["output_elements_differing"] == 0 and r["tensor_elements_differing"] == 0, r


@pytest.mark.skipif(not (SHARED_MODELS / "mcunet-5fps.pkl").is_file(), reason="../shared/models/tiny-training absent")
def test_mcunet_extended_computes_what_it_did():
    from fedtiny.int8.modelfile import read_model

    m = read_model(SHARED_MODELS / "mcunet-5fps.pkl")
    e = extend_lite(m, parse_lite("lite-residual:blocks=4"), seed=0)
    assert len(lite_convs(e)) == 8
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m.int8_forward(m.quantize_input(x)), e.int8_forward(e.quantize_input(x)))


MLPERF = SHARED_MODELS.parent / "mlperf-tiny"


@pytest.mark.skipif(not (MLPERF / "kws_ref_model.tflite").is_file(), reason="../shared/models/mlperf-tiny absent")
@pytest.mark.parametrize(
    "file, option, branches",
    [
        ("kws_ref_model.tflite", "blocks=2", 2),  # DS-CNN: beside its depthwise-separable blocks
        ("pretrainedResnet_quant.tflite", "reduction=2", 3),  # ResNet-8: beside its residual blocks
    ],
)
def test_mlperf_models_get_modules_that_tflm_runs_exactly(file, option, branches):
    """The extended model computes what the original did; with the modules' weights off zero, TFLM computes
    every tensor alike."""
    from fedtiny.int8.modelfile import read_model

    m = read_model(MLPERF / file)
    e = extend_lite(m, parse_lite(f"lite-residual:{option}"), seed=0)
    assert len(lite_convs(e)) == 2 * branches
    x = torch.rand(2, *m.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m.int8_forward(m.quantize_input(x)), e.int8_forward(e.quantize_input(x)))
    _assert_tflm_exact_with_modules_off_zero(e)


@pytest.mark.skipif(not (MLPERF / "ad01_int8.tflite").is_file(), reason="mlperf-tiny absent")
def test_the_anomaly_detector_gets_a_module_beside_each_hidden_dense_layer(built):  # noqa: F811
    """A network of fully connected layers: a module beside each hidden layer (a quarter of its width, by
    reduction squared less), computing what the original did; the C step trains it bit for bit in the
    planner's arena, TFLM runs it with the weights off zero, and it needs less memory than training whole."""
    from fedtiny.budget.memory import memory_report
    from fedtiny.int8.graph import replace_head
    from fedtiny.int8.modelfile import read_model

    m = read_model(MLPERF / "ad01_int8.tflite")
    e = extend_lite(m, parse_lite("lite-residual:reduction=2"), seed=0)
    assert len(lite_convs(e)) == 2 * 9
    assert [tuple(e.op(t).weight.shape[:2]) for t in ("lite0a", "lite0b", "lite4a")] == [(8, 640), (128, 8), (1, 128)]
    x = torch.randn(2, *m.input_shape, generator=torch.Generator().manual_seed(0)) * 20
    with torch.no_grad():
        assert torch.equal(m.int8_forward(m.quantize_input(x)), e.int8_forward(e.quantize_input(x)))

    q = _lite(replace_head(m, 10), "lite-residual:reduction=2")
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, *m.input_shape, generator=gen) * 20 for _ in range(2)]
    before = {i: q.convs()[i].weight.detach().clone() for i in lite_convs(q)}
    forward, params, _ = _compare(q, xs, [torch.randint(0, 10, (4,), generator=gen) for _ in xs], steps=2, lr=0.05)
    assert forward == 0 and params == 0
    assert any(not torch.equal(before[i], q.convs()[i].weight.detach()) for i in before)
    _assert_tflm_exact_with_modules_off_zero(e)

    lite = memory_report(e, resolve(parse_scheme("lite-residual:reduction=2"), e), m.input_shape).peak_sram_bytes
    whole = memory_report(m, resolve(parse_scheme("full"), m), m.input_shape).peak_sram_bytes
    assert lite < whole, (lite, whole)
