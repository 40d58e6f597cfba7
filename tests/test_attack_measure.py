"""How leakage is measured: counting a bin's positions with residual-carried changes, placing blocks
no worse than the prior, identification ranks."""

import numpy as np
from skimage.data import lfw_subset

from fedtiny.attack.geometry import blocks_of
from fedtiny.attack.malicious import distinct, oracle_blocks, recover_blocks
from fedtiny.attack.metrics import block_set_distance, identification_rank, psnr
from fedtiny.attack.placement import block_prior, calibrate_placement, soft_place
from fedtiny.attack.presets import _resize


def test_counts_ignore_the_error_feedback_residual():
    """Bins that caught no position still move a little (what earlier rounds left behind); one
    position's change is found among the rest, and those bins count as empty."""
    rng = np.random.default_rng(0)
    truth = rng.multinomial(64, np.full(96, 1 / 96))
    unit = 0.76
    db = truth * unit * (1 + rng.normal(0, 0.01, 96)) + np.where(truth == 0, rng.uniform(0.01, 0.3, 96), 0.0)
    blocks = rng.random((96, 16))
    _, counts = recover_blocks(blocks * db[:, None] * 10.0, db, 10.0, positions=64)
    np.testing.assert_array_equal(counts, truth)
    # the smallest change taken for one position's (the old rule) would have counted dozens
    assert np.round(db.max() / db.min()) > 10


def _faces(n: int) -> np.ndarray:
    return _resize(lfw_subset()[:n].astype(np.float32)[:, None], 32)[:, 0].astype(np.float64)


def test_placement_calibrated_on_public_faces_is_no_worse_than_the_prior():
    faces = _faces(40)
    public, targets = faces[8:], faces[:8]
    prior = block_prior(public)
    rng = np.random.default_rng(1)
    placement = calibrate_placement(public, recovered=0.5, noise=0.02)
    placed, alone = [], []
    for t in targets:
        tb = blocks_of(t)
        seen = np.clip(tb[rng.random(64) < 0.5] + rng.normal(0, 0.02, (1, 16)), 0, 1)
        placed.append(psnr(soft_place(seen, prior, placement)[0], t))
        alone.append(psnr(prior.image(), t))
    assert np.mean(placed) >= np.mean(alone) - 0.05
    # allowed positions: every block told its own position lands there, close to the truth
    tb = blocks_of(targets[0])
    exact = soft_place(tb, prior, placement.__class__(0.25, 1.0), allowed=np.eye(64, dtype=bool))[0]
    assert psnr(exact, targets[0]) > 40


def test_oracle_bound_averages_copies_by_their_noise():
    t = np.repeat(np.repeat(np.arange(64.0).reshape(8, 8) / 64, 4, 0), 4, 1)[None]  # blocks 1/64 apart
    tb = blocks_of(t[0])
    good = (tb[:10] + 0.0005, np.full(10, 0.0005))
    bad = (tb[:10] + 0.004, np.full(10, 0.004))
    img, hit = oracle_blocks([good, bad], t)
    assert hit.sum() == 10
    w_good, w_bad = 0.0005**-2, 0.004**-2
    expect = tb[:10] + (0.0005 * w_good + 0.004 * w_bad) / (w_good + w_bad)
    np.testing.assert_allclose(blocks_of(img[0])[:10], expect, atol=1e-9)
    assert np.all(blocks_of(img[0])[10:] == t.mean())  # never seen: the flat baseline
    merged, sd, _ = distinct(np.concatenate([good[0], tb[:10] + 0.001]), np.r_[good[1], np.full(10, 0.0005)])
    assert len(merged) == 10 and np.all(sd < 0.0005)


def test_identification_rank_against_brute_force():
    faces = _faces(30)
    rng = np.random.default_rng(2)
    blocks = blocks_of(faces[7])[rng.permutation(64)[:20]]  # positions lost: a set of blocks
    d = block_set_distance(blocks, faces)
    brute = [np.mean([min(((b - c) ** 2).sum() for c in blocks_of(f)) for b in blocks]) for f in faces]
    np.testing.assert_allclose(d, brute, rtol=1e-9, atol=1e-12)
    assert identification_rank(d, 7) == 1 and d[7] < 1e-12
    assert identification_rank(np.array([0.5, 0.5, 0.1]), 0) == 3  # a tie counts against the attacker
