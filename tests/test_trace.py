"""A float PyTorch model -> the int8 graph (fedtiny.int8.trace) and the scenario key model.module."""

import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedtiny.errors import ModelFileError, ScenarioError
from fedtiny.int8.graph import QAdd, QConv, QModel, replace_head
from fedtiny.int8.trace import calibrate, quantize, trace


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
    return model.eval()


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return F.relu(out)


class SmallResNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(self.drop(torch.flatten(self.pool(x), 1)))


def _check_fold_and_quantize(model: nn.Module, x: torch.Tensor) -> QModel:
    graph = trace(model, x)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=1e-4, atol=1e-4)
    q = quantize(graph, calibrate(graph, [x]))
    with torch.no_grad():
        out = q(x)
        ref = model(x)
    cos = F.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.9, f"int8 output far from fp32 (cosine {cos:.3f})"
    # exported to .tflite, TFLM computes the same integers on the output and every tensor
    from fedtiny.tools.models import compare_with_tflm

    q.input_shape = tuple(x.shape[1:])
    r = compare_with_tflm(q, inputs=8)
    assert r["output_elements_differing"] == 0 and r["tensor_elements_differing"] == 0, r
    assert r["tensors_compared"] >= len(q.convs())
    return q


def test_torchvision_mobilenet_v2_traces_folds_and_quantizes():
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    model = _randomize_bn(mobilenet_v2(weights=None, width_mult=0.35, num_classes=10))
    q = _check_fold_and_quantize(model, torch.rand(8, 3, 32, 32))
    assert len(q.convs()) == 52 and q.convs()[-1].kernel_hw == (1, 1)  # the feature mix is the last conv
    # the inverted-residual layout: from_blocks' names (an add per residual block, named by block)
    adds = [n.op for n in q.nodes if isinstance(q.op(n.op), QAdd)]
    assert adds == ["add2", "add4", "add5", "add7", "add8", "add9", "add11", "add12", "add14", "add15"]
    assert [n.op for n in q.nodes[-2:]] == ["pool", "classifier"]
    assert {c.activation for c in q.convs()} == {"RELU6", "NONE"}


def test_small_resnet_with_relu_and_downsample_shortcut():
    torch.manual_seed(0)
    model = _randomize_bn(SmallResNet())
    q = _check_fold_and_quantize(model, torch.rand(16, 3, 16, 16))
    assert [n.op for n in q.nodes] == [
        "conv0",
        "conv1",
        "conv2",
        "add0",
        "conv3",
        "conv4",
        "conv5",
        "add1",
        "pool",
        "classifier",
    ]
    assert dict((n.op, n.inputs) for n in q.nodes)["add1"] == ("conv4", "conv5")  # out += downsample(x)
    assert [c.activation for c in q.convs()] == ["RELU", "RELU", "NONE", "RELU", "NONE", "NONE"]
    assert q.op("add0").activation == "RELU" and q.op("add0").y_zero == -128
    assert q.op("conv5").kernel_hw == (1, 1) and q.op("conv5").stride == 2
    # the head is a 1x1 conv on pooled features: transfer learning and training work as for tiny-ir
    replace_head(q, 4)
    assert isinstance(q.classifier, QConv) and q.classifier.out_channels == 4
    loss = q(torch.rand(2, 3, 16, 16)).sum()
    loss.backward()
    assert q.classifier.weight.grad is not None and q.conv0.weight.grad is not None


def test_mobilenet_v3_names_its_first_unmappable_layer():
    from torchvision.models import mobilenet_v3_small

    with pytest.raises(ModelFileError) as err:
        trace(mobilenet_v3_small(weights=None), torch.rand(1, 3, 32, 32))
    msg = str(err.value)
    assert "\n" not in msg
    # Hardswish, the squeeze-excitation's mean, 1x1 convolutions and * map; its Hardsigmoid gate has no TFLite op
    assert msg.startswith(
        "layer features.1.block.1.scale_activation (Hardsigmoid) cannot be mapped to an int8 op; supported: Conv2d"
    )


class _ReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x)
        z = torch.relu(y) + y  # the ReLU cannot be fused: its input is read again
        return self.fc(z.mean((2, 3)))


class _Unpooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


@pytest.mark.parametrize(
    "model, expected",
    [
        (_ReadTwice(), "layer relu (function relu) cannot be mapped to an int8 op: ReLU cannot be fused"),
        (_Unpooled(), "layer flatten (method .flatten()) cannot be mapped to an int8 op: reshapes 1x4x8x8 to 1x256"),
    ],
)
def test_unmappable_uses_are_named(model, expected):
    with pytest.raises(ModelFileError, match=expected.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        trace(model, torch.rand(1, 1, 8, 8))


# ---------------------------------------------------------------- model.module in a scenario

MODEL_FILE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        y = self.body(x)
        return self.head(y.mean((2, 3)))


def build(in_channels, num_classes):
    return Net(in_channels, num_classes)


def fixed(in_channels):  # ten outputs whatever the data
    return Net(in_channels, 10)


def hardsigmoid(num_classes):
    net = Net(1, num_classes)
    net.body[5] = nn.Hardsigmoid()
    return net
"""


def _scenario(tmp_path, module: str, **model):
    from fedtiny.scenario import load_scenario

    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "models" / "mine.py").write_text(MODEL_FILE)
    extra = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in model.items())
    (tmp_path / "s.toml").write_text(
        textwrap.dedent(f"""\
        [run]
        clients = 2
        rounds = 1
        [data]
        source = "digits"
        max_samples = 240
        [model]
        module = "{module}"
        pretrain_epochs = 1
        calibration_samples = 32
        """)
        + extra
    )
    return load_scenario(tmp_path / "s.toml")


def test_model_module_builds_pretrains_and_quantizes(tmp_path):
    from fedtiny.federated.task import cloud_model, make_task
    from fedtiny.models import load_arrays

    s = _scenario(tmp_path, "models/mine.py:build")
    assert s.model.module == f"{(tmp_path / 'models' / 'mine.py').resolve()}:build"  # relative to the scenario
    task = make_task(s)
    assert isinstance(task.model, QModel)
    assert [n.op for n in task.model.nodes] == ["conv0", "conv1", "pool", "classifier"]
    assert task.model.classifier.out_channels == task.federation.num_classes
    state, report = cloud_model(task)
    load_arrays(task.model, state)
    assert report.ptq_accuracy is not None and 0.0 <= report.ptq_accuracy <= 1.0
    assert s.scheme_text == "full"


def test_model_module_errors_are_one_line_naming_the_key(tmp_path):
    from fedtiny.federated.task import make_task

    for value, expected in [
        ("models/mine.py", 'expected "package.module:function"'),
        ("models/nothere.py:build", "no such file"),
        ("fedtiny.no_such_module:build", "cannot import fedtiny.no_such_module: ModuleNotFoundError"),
        ("models/mine.py:missing", "has no function 'missing'"),
    ]:
        with pytest.raises(ScenarioError, match="model.module: ") as err:
            _scenario(tmp_path, value)
        assert expected in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(
        ScenarioError,
        match=r"model.module: .* returns \(1, 10\) .* data's 4 classes "
        r"\(let the function take num_classes\)",
    ):
        make_task(_with_classes(_scenario(tmp_path, "models/mine.py:fixed"), 4))
    with pytest.raises(ModelFileError, match=r"^model.module: layer body.5 \(Hardsigmoid\) cannot be mapped"):
        make_task(_scenario(tmp_path, "models/mine.py:hardsigmoid"))


def _with_classes(s, n):
    """The scenario on synthetic data with ``n`` classes (the digits have 10)."""
    import dataclasses

    return dataclasses.replace(
        s,
        data=dataclasses.replace(
            s.data, source="synthetic", num_classes=n, image_size=8, server_samples=40, samples_per_client=8
        ),
    )


def test_dotted_module_form(tmp_path, monkeypatch):
    from fedtiny.federated.task import make_task

    (tmp_path / "pkg_for_fedtiny_test").mkdir()
    (tmp_path / "pkg_for_fedtiny_test" / "__init__.py").write_text("")
    (tmp_path / "pkg_for_fedtiny_test" / "nets.py").write_text(MODEL_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    s = _scenario(tmp_path, "pkg_for_fedtiny_test.nets:build")
    assert s.model.module == "pkg_for_fedtiny_test.nets:build"
    assert np.isfinite(make_task(s).model(torch.rand(2, 1, 8, 8)).detach().numpy()).all()
