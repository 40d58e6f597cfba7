"""The malicious server: tiny-ir's imprint trap, read back through fedtiny's own client path, the learned
inverter on the same updates, what the client policies stop, and the in-simulation pipeline."""

import numpy as np
import pytest
import torch
from conftest import ROOT

from fedtiny.attack.jigsaw import Pieces, assemble
from fedtiny.attack.malicious import (
    PIXEL_CHANNELS,
    STEPS,
    TRAP_CHANNELS,
    block_edges,
    blocks_of,
    grey,
    recover_blocks,
    texture_projection,
    trap_for,
    trap_network,
)
from fedtiny.attack.metrics import psnr
from fedtiny.attack.placement import block_prior
from fedtiny.attack.presets import face_images, tiny_ir_rgb
from fedtiny.attack.run import run_malicious
from fedtiny.scenario import ScenarioError, load_scenario, parse_overrides

MALICIOUS = ROOT / "scenarios" / "privacy-malicious.toml"


def test_float_trap_returns_isolated_blocks_exactly():
    """On the float trap at batch 1, every position falls in one bin, and a bin that caught one
    position returns that 4x4 block as dW / db (autograd is the oracle)."""
    x, _ = face_images(20, seed=0)
    trap = trap_for(x[4:])
    model = trap_network(tiny_ir_rgb(2), trap)
    target = torch.from_numpy(x[:1])
    loss = torch.nn.functional.cross_entropy(model(target), torch.tensor([1]))
    loss.backward()
    dw = model.blocks[2].conv[0][0].weight.grad[:, PIXEL_CHANNELS, 0, 0].numpy()
    db = model.blocks[2].conv[0][1].bias.grad.numpy()
    blocks, counts = recover_blocks(dw, db, trap.pixel_gain)
    assert counts.sum() == 64
    truth = blocks_of(grey(x[:1])[0])
    which = np.searchsorted(np.asarray(trap.edges)[1:-1], truth.mean(axis=1), side="right")
    np.testing.assert_array_equal(np.bincount(which, minlength=96), counts)
    alone = [p for p, o in enumerate(which) if counts[o] == 1]
    assert len(alone) >= 16
    for p in alone:
        np.testing.assert_allclose(blocks[which[p]], truth[p], atol=1e-5)


def test_block_edges_are_increasing_cover_the_range_and_are_exact_in_int8():
    x, _ = face_images(8, seed=1)
    for shift in (0.0, 0.5):
        edges = np.asarray(block_edges(x, shift=shift))
        assert len(edges) == 97 and np.all(np.diff(edges) > 0) and edges[0] < 0 and edges[-1] > 1
        steps = np.diff(edges).min() / np.diff(edges) * STEPS  # each bin's pixel weight in int8 steps
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-6)
    assert block_edges(x, shift=0.5)[1] < block_edges(x)[1]
    # a texture projection's pixel weights (quarters of the largest) times each bin's steps: integers
    v = np.asarray(texture_projection(5, seed=3))
    edges = np.asarray(block_edges(x, weights=v))
    steps = np.diff(edges).min() / np.diff(edges) * STEPS
    np.testing.assert_allclose(np.outer(steps, v / v.max()), np.round(np.outer(steps, v / v.max())), atol=1e-6)


@pytest.mark.parametrize("parity", [(0, 1), (1, 0)])
def test_float_trap_returns_borders_and_parity(parity):
    """A trap of one parity: only the positions of that parity reach the bins, and each isolated bin
    returns its block's borders (the row above, the column to the left; zeros at the padding)."""
    x, _ = face_images(20, seed=0)
    trap = trap_for(x[4:], parity=parity)
    model = trap_network(tiny_ir_rgb(2), trap)
    loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[:1])), torch.tensor([1]))
    loss.backward()
    dw = model.blocks[2].conv[0][0].weight.grad[:, TRAP_CHANNELS, 0, 0].numpy()
    db = model.blocks[2].conv[0][1].bias.grad.numpy()
    found, counts = recover_blocks(dw, db, trap.pixel_gain, positions=trap.positions)
    assert counts.sum() == 16
    img = grey(x[:1])[0]
    padded = np.pad(img, 1)  # the border of a block on the edge is the padding's zeros
    truth = blocks_of(img)
    for o in np.nonzero(counts == 1)[0]:
        p = int(np.abs(truth - found[o, :16]).max(axis=1).argmin())
        r, c = divmod(p, 8)
        assert (r % 2, c % 2) == parity
        np.testing.assert_allclose(found[o, :16], truth[p], atol=1e-5)
        np.testing.assert_allclose(found[o, 16:20], padded[4 * r, 4 * c + 1 : 4 * c + 5], atol=1e-5)
        np.testing.assert_allclose(found[o, 20:], padded[4 * r + 1 : 4 * r + 5, 4 * c], atol=1e-5)


def test_jigsaw_assembles_exact_pieces():
    """Every block with its borders, positions unknown: the links and the padding put each back."""
    x, _ = face_images(20, seed=0)
    img = grey(x[:1])[0]
    padded = np.pad(img, 1)
    truth = blocks_of(img)
    up = np.stack([padded[4 * r, 4 * c + 1 : 4 * c + 5] for r in range(8) for c in range(8)])
    left = np.stack([padded[4 * r + 1 : 4 * r + 5, 4 * c] for r in range(8) for c in range(8)])
    order = np.random.default_rng(0).permutation(64)[:60]  # shuffled, 4 blocks never recovered
    pieces = Pieces(truth[order], up[order], left[order], np.full(60, 2 / 255), np.full((60, 2), -1))
    rebuilt, linked = assemble(pieces, block_prior(grey(x[4:])))
    assert linked.sum() >= 56
    assert psnr(rebuilt, img) > 28


def test_imprint_through_the_int8_sparse_path_and_fp32_contrast():
    """The trap goes out as the full downlink, each client trains it with the exact int8 step and sends
    a top-k update with error feedback through the codec; the bins still isolate and return blocks."""
    int8, x, recon = run_malicious(2, 1, density=0.5, log=None)
    assert int8["refused"] == 0 and recon.shape == (2, 1, 3, 32, 32)
    assert int8["isolated"] > 0.1 and int8["leaked_blocks"] > 0
    fp32, _, _ = run_malicious(2, 1, precision="fp32", log=None)
    assert fp32["leaked_blocks"] > int8["leaked_blocks"]
    assert fp32["oracle_mean_psnr_db"] > fp32["mean_flat_psnr_db"]
    again, _, _ = run_malicious(2, 1, density=0.5, log=None)
    assert again["psnr_db"] == int8["psnr_db"]  # seeded end to end


def test_rounds_of_new_projections_isolate_more_blocks():
    """A new trap each round (another projection of the blocks) separates blocks of equal brightness;
    the clients keep their error-feedback state between the rounds."""
    one, _, _ = run_malicious(2, 1, density=0.5, log=None)
    three, _, _ = run_malicious(2, 1, density=0.5, rounds=3, log=None)
    assert three["rounds"] == 3 and three["isolated"] > one["isolated"]
    assert three["oracle_mean_psnr_db"] > one["oracle_mean_psnr_db"]


@pytest.mark.parametrize(
    "policy,adapt,refused",
    [
        ("device.policy_frozen_first=7", False, True),
        ("device.policy_frozen_first=7", True, False),  # the bins move to conv9
        ("device.policy_frozen_first=10", True, True),  # nothing left to bin with
        ("device.policy_max_saturation=0.9", False, True),
        ("device.policy_max_saturation=0.9", True, False),  # fillers keep layers out of their clamps
        ("device.policy_max_change_lsb=2", True, False),
    ],
)
def test_client_policies_and_the_trap_that_adapts(policy, adapt, refused):
    s, _, _ = run_malicious(2, 1, rounds=2, adapt=adapt, overrides=parse_overrides([policy]), log=None)
    if refused:
        # nothing was sent: each face is scored by what the server has of it, its prior
        assert s["refused"] == 2 and s["mean_psnr_db"] == pytest.approx(s["prior_psnr_db"])
    elif "change_lsb" in policy:  # the clipped change carries at most 5 levels per pixel
        assert s["refused"] == 0 and s["leaked_blocks"] < 0.02
    else:  # the adapted trap isolates blocks as the unadapted one does without the policy
        assert s["refused"] == 0 and s["isolated"] > 0.3 and s["frac_identified_top1"] == 1.0


def test_learned_inverter_trains_on_the_clients_own_updates():
    s, _, _ = run_malicious(2, 1, learned=24, epochs=2, log=None)
    assert s["learned_mean_psnr_db"] is not None and np.isfinite(s["learned_mean_psnr_db"])
    assert s["worst_case_mean_psnr_db"] >= max(s["mean_psnr_db"], s["learned_mean_psnr_db"]) - 1e-9
    with pytest.raises(ScenarioError, match="batch 1"):
        run_malicious(2, 2, learned=8, log=None)


def test_malicious_scenario_keys_are_checked():
    with pytest.raises(ScenarioError, match="attack.method"):
        load_scenario(MALICIOUS, parse_overrides(['attack.server="honest"']))
    with pytest.raises(ScenarioError, match="attack.server"):
        load_scenario(MALICIOUS, parse_overrides(["model.width=8"]))


def test_in_simulation_malicious_server_and_imprint_report():
    """The ServerApp's start (server_task) sends the trap and its scheme; a client's real round; the
    server's privacy report of the imprint on what it decoded."""
    from fedtiny.attack.fleet import attack_observed, candidate_pool, privacy_figures
    from fedtiny.attack.membership import observed_membership
    from fedtiny.compress.dense import pack_dense
    from fedtiny.data.sources import ImageSet
    from fedtiny.federated.client import local_round
    from fedtiny.server_setup import server_task

    scenario = load_scenario(MALICIOUS, parse_overrides(["model.pretrain_epochs=0"]))
    task, initial, _, schemes = server_task(scenario, progress=None)
    scheme = schemes.by_profile["mcu-256kb"]
    assert scheme.name == "imprint-trap" and scheme.channels[6] == sorted(TRAP_CHANNELS.tolist())
    faces = [p for p in range(scenario.run.clients) if task.federation.client_data(p)[0].y[0] == 1]
    observed = []
    for pid in faces[:2]:
        result, _ = local_round(scenario, pid, 1, pack_dense(initial, task.downlink_spec), scheme=scheme)
        assert not result.refusal
        observed.append(
            {"round": 1, "partition_id": pid, "changes": task.uplink.decode(result.update, initial), "state": initial}
        )
    report = attack_observed(task, observed, scenario.attack)
    figures = privacy_figures(report)
    assert figures["privacy_leaked_blocks"] > 0
    assert figures["privacy_oracle_psnr_db"] > 0 and figures["privacy_mean_psnr_db"] > 0
    # identification: each client's face is once among the candidates (twice, it would tie with itself)
    own = task.federation.client_data(faces[0])[0]
    pool, ids = candidate_pool(task, own, [faces[0]])
    assert (np.abs(pool - own.x[0]).reshape(len(pool), -1).max(axis=1) == 0).sum() == 1 and ids[0] == 0
    # membership: the two clients' faces against held-out images, each candidate's own trap update
    assert report["membership_members"] == 2 and report["membership_nonmembers"] >= 2 * 16
    assert 0.0 <= figures["privacy_membership_auc"] <= 1.0
    # the aggregate of the two, as the server behind secure aggregation holds it: every element
    sizes = {name: int(np.prod(shape)) for name, shape, _ in task.uplink_spec}
    mean = {name: np.zeros(n) for name, n in sizes.items()}
    for ob in observed:
        for name, (idx, values) in ob["changes"].items():
            mean[name][np.asarray(idx)] += np.asarray(values) / len(observed)
    both = {"round": 1, "partition_id": faces[0], "members": faces[:2], "state": initial}
    both["changes"] = {name: (np.arange(v.size), v) for name, v in mean.items()}
    pool = {pid: task.federation.client_data(pid)[0] for pid in faces[:2]}
    agg = observed_membership(
        task,
        [both],
        lambda ob: (
            ImageSet(
                np.concatenate([pool[p].x for p in faces[:2]]),
                np.concatenate([pool[p].y for p in faces[:2]]),
                2,
                "faces",
            ),
            [p for p in faces[:2] for _ in range(len(pool[p]))],
        ),
        schemes.by_profile["mcu-256kb"],
    )
    assert agg["membership_members"] == 2 and 0.0 <= agg["membership_auc"] <= 1.0
