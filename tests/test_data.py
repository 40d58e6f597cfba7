import numpy as np
import pytest

from fedtiny.data import DataError, SensorShift, apply_shift, build_federation, load_source
from fedtiny.scenario import scenario_from_dict


def test_digits_is_real_and_normalised():
    d = load_source("digits")
    assert d.x.shape == (1797, 1, 8, 8) and d.x.dtype == np.float32
    assert 0.0 <= d.x.min() and d.x.max() <= 1.0
    assert set(np.unique(d.y)) == set(range(10))


def test_resize_and_max_samples():
    d = load_source("digits", image_size=16, max_samples=100, seed=1)
    assert d.x.shape == (100, 1, 16, 16)
    assert np.array_equal(d.y, load_source("digits", image_size=16, max_samples=100, seed=1).y)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_torchvision_missing_root_is_a_clear_error(tmp_path, name):
    with pytest.raises(DataError, match=f"data.root: {name} not found.*never downloads"):
        load_source(name, str(tmp_path / "empty"))


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = load_source("imagefolder", str(tmp_path), image_size=8)
    assert d.x.shape == (6, 3, 8, 8) and d.num_classes == 2 and sorted(np.bincount(d.y)) == [3, 3]
    with pytest.raises(DataError, match="data.root"):
        load_source("imagefolder", str(tmp_path / "missing"))


def test_shift_is_fixed_and_changes_images():
    x = load_source("digits").x[:20]
    s = SensorShift(rotation_deg=20, gain=0.8, noise_std=0.05)
    a, b = apply_shift(x, s, [0, 1]), apply_shift(x, s, [0, 1])
    assert np.array_equal(a, b)
    assert np.abs(a - x).mean() > 0.05 and 0 <= a.min() and a.max() <= 1
    assert apply_shift(x, SensorShift(), 0) is x


def test_federation_splits_are_disjoint_and_seeded():
    s = scenario_from_dict(
        {
            "run": {"clients": 5, "seed": 2},
            "shift": {"rotation_deg": 10, "client_rotation_deg": 5, "client_noise_std": 0.05},
        }
    )
    fed = build_federation(s)
    assert len(fed.public) + len(fed.test) + len(fed.pool) == 1797
    train, test = fed.client_data(3)
    assert len(train) + len(test) == len(fed.partitions[3]) and len(test) > 0
    train2, _ = build_federation(s).client_data(3)
    assert np.array_equal(train.x, train2.x)
    # Every client's sensor is its own.
    assert fed.client_shift(0) != fed.client_shift(1)
    with pytest.raises(IndexError):
        fed.client_data(5)
