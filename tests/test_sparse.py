"""Sparse-update schemes: parsing, channel selection, what is trained, what autograd saves."""

import pytest
import torch
from conftest import SHARED_MODELS

from fedtiny.budget.schemes import SchemeError, apply_scheme, parse_scheme, resolve
from fedtiny.int8.convert import ptq
from fedtiny.models import build_model, trainable_names


def tiny_qmodel():
    torch.manual_seed(0)
    from fedtiny.data import load_source

    return ptq(build_model("tiny-ir", 1, 10, image_size=8), load_source("digits").x[:64])


def test_presets():
    q = tiny_qmodel()
    n = len(q.convs())
    full = resolve(parse_scheme("full"), q)
    assert all(full.bias) and all(c is not None for c in full.channels)
    bias = resolve(parse_scheme("bias-only"), q)
    assert all(bias.bias) and all(c is None for c in bias.channels)
    last = resolve(parse_scheme("last-k:2"), q)
    assert last.bias == [False] * (n - 2) + [True, True]
    assert [c is not None for c in last.channels] == [False] * (n - 2) + [True, True]


def test_inline_and_file_schemes(tmp_path):
    q = tiny_qmodel()
    text = '{"n_bias_update": 3, "weight_update_idx": [6, 8], "weight_update_ratio": [0.5, 0]}'
    r = resolve(parse_scheme(text), q)
    assert r.bias == [False] * 6 + [True] * 3
    assert len(r.channels[6]) == 16 and r.channels[8] is None  # conv6 has 32 input channels; ratio 0: frozen
    (tmp_path / "s.toml").write_text("n_bias_update = 1\nweight_update_idx = [8]\nweight_update_ratio = [1]\n")
    assert resolve(parse_scheme(str(tmp_path / "s.toml")), q).channels[8] == list(range(96))


@pytest.mark.skipif(not SHARED_MODELS.is_dir(), reason="../shared/models/tiny-training not present")
def test_schemes_json_entries():
    s = parse_scheme(f"{SHARED_MODELS / 'schemes.json'}#mcunet-5fps/s3")
    assert s.n_bias_update == 22 and s.weight_update[0] == (21, 1.0)
    with pytest.raises(SchemeError, match="known ids"):
        parse_scheme(f"{SHARED_MODELS / 'schemes.json'}#nope")


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"n_bias_update": 3, "weight_update_idx": [99], "weight_update_ratio": [1]}', "out of range"),
        ('{"n_bias_update": 30}', "exceeds"),
        ('{"n_bias_update": 1, "weight_update_idx": [1], "weight_update_ratio": [2]}', "must be in"),
        ('{"n_bias": 1}', "unknown key"),
        ("last-k:x", "integer"),
        ("no/such/file.json", "not a preset"),
    ],
)
def test_bad_schemes(text, match):
    with pytest.raises(SchemeError, match=match):
        resolve(parse_scheme(text), tiny_qmodel())


def test_magnitude_selection_picks_largest_norm_channels():
    q = tiny_qmodel()
    w = q.convs()[6].weight.detach()  # pointwise 32 -> 96
    norms = w.transpose(0, 1).flatten(1).norm(dim=1)
    r = resolve(parse_scheme('{"weight_update_idx": [6], "weight_update_ratio": [0.25]}'), q)
    assert r.channels[6] == sorted(torch.topk(norms, 8).indices.tolist())
    dw = resolve(parse_scheme('{"weight_update_idx": [7], "weight_update_ratio": [0.5]}'), q)
    dnorm = q.convs()[7].weight.detach().flatten(1).norm(dim=1)
    assert dw.channels[7] == sorted(torch.topk(dnorm, 48).indices.tolist())


def test_only_selected_tensors_and_channels_get_gradients():
    q = tiny_qmodel()
    r = resolve(
        parse_scheme('{"n_bias_update": 2, "weight_update_idx": [6, 7], "weight_update_ratio": [0.25, 0.5]}'), q
    )
    apply_scheme(q, r)
    names = trainable_names(q)
    assert "conv6.weight" in names and "conv1.weight" not in names  # conv6: block 2's expansion
    q(torch.rand(4, 1, 8, 8)).sum().backward()
    for conv in q.convs()[:6]:
        assert conv.weight.grad is None and conv.bias.grad is None
    g6 = q.convs()[6].weight.grad
    sel = r.channels[6]
    others = [c for c in range(32) if c not in sel]
    assert g6[:, sel].abs().sum() > 0 and g6[:, others].abs().sum() == 0
    g7 = q.convs()[7].weight.grad  # depthwise: channel selection is over output channels
    assert g7[r.channels[7]].abs().sum() > 0 and g7[[c for c in range(96) if c not in r.channels[7]]].abs().sum() == 0


def test_saved_tensors_are_only_what_backward_needs():
    """With saved_tensors_hooks: no activation saved before the first trained layer, only masks for
    bias-only layers, and int8 inputs of exactly the trained channels."""
    q = tiny_qmodel()
    r = resolve(parse_scheme('{"n_bias_update": 3, "weight_update_idx": [8], "weight_update_ratio": [0.5]}'), q)
    apply_scheme(q, r)
    params = {p.data_ptr() for p in q.parameters()}
    saved = []

    def pack(t):
        saved.append(("param" if t.data_ptr() in params else str(t.dtype).replace("torch.", ""), tuple(t.shape)))
        return t

    x = torch.rand(2, 1, 8, 8)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = q(x)
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2])).backward()
    kinds = {k for k, _ in saved}
    assert kinds <= {"param", "bool", "int8"}, saved  # no float activations anywhere
    int8 = sorted(s for k, s in saved if k == "int8")
    # conv8 (project 96 -> 32 at 4x4) trains half its 96 input channels; the classifier its 32 inputs.
    assert int8 == sorted([(2, 48, 4, 4), (2, 32, 1, 1)])
    masks = [s for k, s in saved if k == "bool"]
    # Masks only from conv6 on (the first trained op): conv6, conv7, conv8, add2, classifier.
    assert sorted(masks) == sorted([(2, 96, 4, 4), (2, 96, 4, 4), (2, 32, 4, 4), (2, 32, 4, 4), (2, 10, 1, 1)])
