"""The malicious server's trap laid into the published inverted-residual models at 128x128."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedtiny.attack.geometry import blocks_of, grey, on_grid
from fedtiny.attack.malicious import trap_for
from fedtiny.attack.presets import face_images
from fedtiny.attack.run import run_malicious
from fedtiny.attack.trap_mbconv import BORDERS_AT, PIXELS_AT, mb_trap_model, mb_trap_settings
from fedtiny.errors import ScenarioError
from fedtiny.int8.modelfile import read_model
from tests.conftest import SHARED_MODELS

MCUNET = SHARED_MODELS / "mcunet-5fps.pkl"
needs_mcunet = pytest.mark.skipif(not MCUNET.is_file(), reason="../shared/models/tiny-training not present")


def test_on_grid_is_the_mean_of_each_4x4_square():
    x = np.random.default_rng(0).random((2, 3, 128, 128))
    ref = x.reshape(2, 3, 32, 4, 32, 4).mean(axis=(3, 5))
    assert np.allclose(on_grid(x), ref)
    assert on_grid(x[..., :32, :32]) is x[..., :32, :32] or np.array_equal(on_grid(x[..., :32, :32]), x[..., :32, :32])


@needs_mcunet
def test_int8_trap_passes_each_block_and_its_borders_to_the_bins():
    """The int8 graph (TFLM arithmetic) carries every 4x4 block of the 32x32 grid and its upper and left
    borders to the bins' input, against the NumPy pooling of the image."""
    model = read_model(MCUNET)
    model.input_shape = (3, 128, 128)
    x, _ = face_images(24, size=128, seed=1)
    settings = mb_trap_settings(model)
    trap = trap_for(x[4:], **settings)
    q = mb_trap_model(model, trap, x[4:])
    src = next(n.inputs[0] for n in q.nodes if n.op == f"conv{trap.layer}")
    t = q.int8_tensors(q.quantize_input(torch.from_numpy(x[:4])))[src].double()
    scale, zero = (float(v) for v in q.op(src).qparams[2:4])  # its output quantization (a conv's or an add's)
    real = ((t - zero) * scale / trap.pixel_gain).numpy()
    g = grey(on_grid(x[:4]))
    want = np.stack([blocks_of(a) for a in g])  # images x 64 positions x 16 pixels
    got = real[:, PIXELS_AT].transpose(0, 2, 3, 1).reshape(4, 64, 16)
    assert np.abs(got - want).max() < 2.5 / 255
    # the upper border of block (i, j): row 4i - 1 of the grid, columns 4j .. 4j + 3 (zero on row 0)
    pad = np.pad(g, ((0, 0), (1, 0), (0, 0)))
    upper = np.stack([pad[:, 4 * i, 4 * j : 4 * j + 4] for i in range(8) for j in range(8)], 1)
    got_upper = real[:, BORDERS_AT[:4]].transpose(0, 2, 3, 1).reshape(4, 64, 4)
    assert np.abs(got_upper - upper).max() < 2.5 / 255


@needs_mcunet
def test_trap_layer_that_cannot_hold_bins_is_named():
    model = read_model(MCUNET)
    with pytest.raises(ScenarioError, match=r"conv5 cannot hold them.*\[18, 21, 24, 27\]"):
        mb_trap_settings(model, 5)


@needs_mcunet
def test_published_model_leaks_its_clients_faces_through_the_int8_path():
    """Two clients of one 128x128 face each train MCUNet's trap through fedtiny's client (memory
    check, exact int8 step, codec): a quarter of each face's blocks come back (one parity class),
    close to the truth at the true positions, and the server names each face among 200 images."""
    s, x, recon = run_malicious(2, 1, model_file=str(MCUNET), log=None)
    assert s["refused"] == 0 and s["adapted"]["layer"] == 27
    assert s["isolated"] == pytest.approx(0.25)
    assert s["frac_identified_top1"] == 1.0
    assert recon.shape == x.shape == (2, 1, 3, 128, 128)
    assert s["input_size"] == 128 and np.isfinite(s["input_mean_psnr_db"])


@needs_mcunet
def test_a_malicious_server_needs_the_published_models_at_128():
    from fedtiny.scenario import scenario_from_dict

    raw = {
        "run": {"name": "t", "clients": 2},
        "data": {"source": "lfw-faces", "image_size": 64, "channels": 3},
        "model": {"file": str(MCUNET)},
        "attack": {"enabled": True, "server": "malicious", "method": "imprint", "clients": [0]},
    }
    with pytest.raises(ScenarioError, match="published int8 model .* on 3x128x128"):
        scenario_from_dict(raw, None, where="t")
    raw["data"]["image_size"] = 128
    assert scenario_from_dict(raw, None, where="t").attack.server == "malicious"
