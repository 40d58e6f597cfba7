"""The prior baseline of the in-simulation attack: the server's mean public image scored as a reconstruction."""

import numpy as np
import pytest
from conftest import ROOT, attack_one_client


def test_the_honest_report_scores_the_mean_public_image_against_each_attacked_image():
    """A client's real round of the quickstart, attacked briefly: the report's prior figures are the mean public
    image's PSNR and SSIM against the client's images and its rank among the candidates, computed here apart."""
    from skimage.metrics import structural_similarity

    from fedtiny.attack.fleet import candidate_pool, privacy_figures
    from fedtiny.scenario import load_scenario, parse_overrides

    overrides = [
        "run.clients=60",
        "data.client_test_fraction=0.5",
        'device.profiles=["mcu-256kb"]',
        "attack.enabled=true",
        "attack.iterations=5",
        "attack.restarts=1",
    ]
    scenario = load_scenario(ROOT / "scenarios" / "quickstart.toml", parse_overrides(overrides))
    task, report = attack_one_client(scenario)
    (attack,) = report["attacks"]

    own = task.federation.client_data(0)[0]
    mean = task.federation.public.x.astype(np.float64).sum(axis=0) / len(task.federation.public.x)
    expected_db = [10 * np.log10(1 / np.mean((mean - t) ** 2)) for t in own.x.astype(np.float64)]
    assert attack["prior_psnr_db"] == pytest.approx(expected_db, abs=1e-9)
    assert attack["prior_ssim"] == pytest.approx(
        [structural_similarity(mean, t, channel_axis=0, data_range=1.0, win_size=7) for t in own.x], abs=1e-9
    )
    # identification of the prior: 1 + how many other candidates are at least as close to it as the true image
    pool, ids = candidate_pool(task, own, [0])
    d = ((pool.astype(np.float64) - mean) ** 2).reshape(len(pool), -1).mean(axis=1)
    assert attack["prior_identification_rank"] == [int((d <= d[i]).sum()) for i in ids]
    # the means, in the report and in summary.json's figures
    figures = privacy_figures(report)
    assert figures["privacy_prior_psnr_db"] == report["mean_prior_psnr_db"] == pytest.approx(np.mean(expected_db))
    assert figures["privacy_prior_identification_rank"] == pytest.approx(np.mean(attack["prior_identification_rank"]))
    assert figures["privacy_prior_ssim"] == pytest.approx(np.mean(attack["prior_ssim"]))
