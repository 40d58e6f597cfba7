import numpy as np
import pytest

from fedtiny.compress.dense import PayloadError, dense_nbytes, pack_dense, unpack_dense
from fedtiny.compress.sparsify import CompressionConfig
from fedtiny.compress.uplink import Uplink
from fedtiny.federated.aggregate import ClientUpdate, aggregate

SPEC = [("a", (2, 3), "float32"), ("b", (4,), "float32")]


def arrays(v):
    return {"a": np.full((2, 3), v, np.float32), "b": np.arange(4, dtype=np.float32) * v}


def aggregate_dense(updates):
    """The server's path for dense uplinks, against a zero model (so the mean change is the mean model)."""
    uplink = Uplink("dense", SPEC, {}, CompressionConfig())
    return aggregate(updates, lambda _, b: uplink.decode(b, arrays(0.0)), {n: s for n, s, _ in SPEC})


def test_round_trip_and_exact_size():
    data = pack_dense(arrays(1.5), SPEC)
    assert len(data) == dense_nbytes(SPEC) == 40
    out = unpack_dense(data, SPEC)
    assert np.array_equal(out["a"], arrays(1.5)["a"]) and np.array_equal(out["b"], arrays(1.5)["b"])


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\x00" * 39, "39 bytes, expected 40"),
        (b"\x00" * 44, "44 bytes, expected 40"),
        (np.full(10, np.nan, np.float32).tobytes(), "non-finite"),
        ("not bytes", "must be bytes"),
    ],
)
def test_bad_payloads_are_refused(data, reason):
    with pytest.raises(PayloadError, match=reason):
        unpack_dense(data, SPEC)


def test_aggregate_is_example_weighted_and_rejects_bad_updates():
    ups = [
        ClientUpdate(2, pack_dense(arrays(3.0), SPEC), 30),
        ClientUpdate(0, pack_dense(arrays(1.0), SPEC), 10),
        ClientUpdate(5, b"garbage", 10),
        ClientUpdate(6, pack_dense(arrays(1e6), SPEC), 0),
        ClientUpdate(7, np.full(10, np.inf, np.float32).tobytes(), 10),
    ]
    res = aggregate_dense(ups)
    assert res.accepted == [0, 2]
    assert [r.partition_id for r in res.rejected] == [5, 6, 7]
    assert all(r.reason for r in res.rejected)
    np.testing.assert_allclose(res.arrays["a"], 2.5)  # (1*10 + 3*30) / 40
    np.testing.assert_allclose(res.arrays["b"], np.arange(4) * 2.5)


def test_aggregate_of_nothing_valid_leaves_no_model():
    assert aggregate_dense([ClientUpdate(0, b"x", 1)]).arrays is None


def test_integer_tensors_keep_their_device_dtype():
    spec = [("w", (2, 2), "int8"), ("b", (2,), "int32"), ("s", (2,), "float32")]
    arrays = {
        "w": np.array([[-127, 5], [0, 127]], np.int8),
        "b": np.array([-(2**31), 2**31 - 1], np.int32),
        "s": np.array([0.5, 0.25], np.float32),
    }
    data = pack_dense(arrays, spec)
    assert len(data) == 4 + 8 + 8
    out = unpack_dense(data, spec)
    for k in arrays:
        assert out[k].dtype == arrays[k].dtype and np.array_equal(out[k], arrays[k])
    with pytest.raises(PayloadError, match="int8"):
        pack_dense({**arrays, "w": arrays["w"].astype(np.float32)}, spec)
