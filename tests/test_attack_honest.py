"""The honest server's learned inversion (``faces-honest-int8``) at toy size, through fedtiny's client."""

import numpy as np

from fedtiny.attack.honest import honest_scenario, honest_server, public_images, run_honest, update_rows
from fedtiny.attack.presets import face_images
from fedtiny.data.sources import ImageSet

FAST = {"model.pretrain_epochs": 1}  # the cloud step at toy size (the preset pretrains for the quickstart's 30)


def test_honest_learned_inversion_runs_the_clients_path():
    server = honest_server(honest_scenario(2, overrides=FAST), ImageSet(*public_images(2, 0), 2, "public"))
    assert server.scheme is not None and server.cloud.ptq_accuracy is not None
    summary, x, recon = run_honest(2, learned=24, epochs=2, server=server, log=None)
    assert x.shape == recon.shape == (2, 1, 3, 32, 32)
    assert 0.0 <= recon.min() and recon.max() <= 1.0
    assert summary["refused"] == 0 and summary["public_refused"] == 0
    assert summary["public_images"] == 198 and summary["public_faces"] == 98  # never a target
    assert np.all(np.isfinite(summary["psnr_db"])) and len(summary["psnr_db"]) == 2
    assert np.isfinite(summary["mean_prior_psnr_db"]) and np.isfinite(summary["mean_flat_psnr_db"])
    assert all(1 <= r <= summary["candidates"] == 200 for r in summary["identification_rank"])
    assert all(1 <= r <= 200 for r in summary["prior_identification_rank"])
    assert summary["scenario"]["scheme"] == "tiny-ir-sparse" and summary["scenario"]["density"] == 0.1
    # the server decodes the int8 sparse update: top-k 10% of the scheme's elements, some rounded to 0
    assert 0 < summary["sent_fraction"] < 0.1
    # the server sized its inverter on a held-out share of its own public updates (24 rows: 2 held out)
    assert summary["validation"]["images"] == 2 and summary["inverter_components"] == 22

    # a row is the client's update of one image at one partition id, wherever it stands in the batch: the
    # public rows the inverter trains on and the targets' rows come from the same client path
    faces, labels = face_images(2)
    both, refused = update_rows(server, faces, labels, first_partition=5)
    again, _ = update_rows(server, faces[1:], labels[1:], first_partition=6)
    assert refused == [None, None]
    assert both.shape == (2, summary["update_elements"]) and np.any(both[1] != 0)
    np.testing.assert_array_equal(both[1], again[0])
