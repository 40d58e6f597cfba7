"""Import of the published tiny-training int8 models, and refusal of crafted pickles."""

import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from conftest import SHARED_MODELS

from fedtiny.int8.modelfile import load_qmodel
from fedtiny.int8.zoo import ZooError, read_tiny_training

MODELS = {"mcunet-5fps": 42, "mbv2-w0.35": 51, "proxyless-w0.3": 60}
needs_shared = pytest.mark.skipif(not SHARED_MODELS.is_dir(), reason="../shared/models/tiny-training not present")


@needs_shared
@pytest.mark.parametrize("name", sorted(MODELS))
def test_import_and_forward(tmp_path, cli, name):
    out = tmp_path / f"{name}.safetensors"
    proc = cli("zoo", "import", str(SHARED_MODELS / f"{name}.pkl"), "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["convolutions"] == MODELS[name] and info["classes"] == 1000
    model = load_qmodel(out)
    with torch.no_grad():
        logits = model.int8_logits(torch.rand(2, 3, 128, 128))
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()
    assert torch.equal(logits, logits.round()) and logits.min() >= -128 and logits.max() <= 127
    assert logits.std() > 0  # not a constant output


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _torch_style_zip(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
    return buf.getvalue()


@pytest.mark.parametrize("wrap", [False, True])
def test_crafted_pickle_is_refused_and_nothing_runs(tmp_path, cli, wrap):
    marker = tmp_path / "pwned"
    obj = {"first_conv": {"w": np.zeros(3, np.int8)}, "blocks": [], "classifier": _Evil(marker)}
    data = pickle.dumps(obj, protocol=2)
    path = tmp_path / "evil.pkl"
    path.write_bytes(_torch_style_zip(data) if wrap else data)
    with pytest.raises(ZooError, match=r"refused global (posix|os|nt)\.system"):
        read_tiny_training(path)
    proc = cli("zoo", "import", str(path), "--out", str(tmp_path / "x.safetensors"))
    assert proc.returncode == 2 and "refused global" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists(), "the crafted pickle ran code"
    assert not (tmp_path / "x.safetensors").exists()


def test_allowed_globals_only_build_arrays(tmp_path):
    obj = {"first_conv": {"params": {"weight": np.ones((2, 1, 3, 3), np.int8)}}, "blocks": [], "classifier": None}
    path = tmp_path / "ok.pkl"
    path.write_bytes(_torch_style_zip(pickle.dumps(obj, protocol=2)))
    got = read_tiny_training(path)
    assert np.array_equal(got["first_conv"]["params"]["weight"], np.ones((2, 1, 3, 3), np.int8))


def test_missing_file(tmp_path):
    with pytest.raises(ZooError, match="no such file"):
        read_tiny_training(tmp_path / "nope.pkl")
