import numpy as np
import pytest

from fedtiny.data import partition_indices
from fedtiny.errors import ScenarioError


@pytest.fixture(scope="module")
def labels():
    rng = np.random.default_rng(0)
    return rng.integers(0, 10, 2000)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "pathological"])
def test_disjoint_and_covering(labels, method):
    parts = partition_indices(labels, 10, method, seed=1, alpha=0.5, classes_per_client=2)
    assert len(parts) == 10
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)), "a sample was given to two clients"
    if method != "pathological":  # pathological may leave unassigned classes' samples out
        assert len(joined) == len(labels)
    assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "pathological"])
def test_seeded(labels, method):
    a = partition_indices(labels, 8, method, seed=3)
    b = partition_indices(labels, 8, method, seed=3)
    c = partition_indices(labels, 8, method, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_equal_and_labels_balanced(labels):
    parts = partition_indices(labels, 10, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for p in parts:  # every client sees (nearly) every class
        assert len(np.unique(labels[p])) >= 9


def _label_skew(labels, parts):
    """Mean total-variation distance between each client's label histogram and the global one."""
    glob = np.bincount(labels, minlength=10) / len(labels)
    return float(np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - glob).sum() for p in parts]))


def test_dirichlet_skew_grows_as_alpha_shrinks(labels):
    skew = {a: _label_skew(labels, partition_indices(labels, 10, "dirichlet", seed=0, alpha=a)) for a in (100.0, 0.1)}
    iid = _label_skew(labels, partition_indices(labels, 10, "iid", seed=0))
    assert iid < 0.1
    assert skew[0.1] > 0.4 > skew[100.0]


def test_pathological_classes_per_client(labels):
    for k in (1, 2, 3):
        parts = partition_indices(labels, 10, "pathological", seed=0, classes_per_client=k)
        assert all(len(np.unique(labels[p])) == k for p in parts)


def test_errors_name_the_key(labels):
    with pytest.raises(ScenarioError, match="classes_per_client"):
        partition_indices(labels, 10, "pathological", classes_per_client=11)
    with pytest.raises(ScenarioError, match="run.clients"):
        partition_indices(labels[:5], 10, "iid")
