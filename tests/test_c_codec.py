"""The C99 codec in device/c agrees with the Python codec, both directions, on random updates."""

import ctypes
import shutil
import subprocess

import numpy as np
import pytest
from conftest import ROOT

from fedtiny.compress.codec import SparseTensor, SparseUpdate, decode, encode, quantize_values

C_DIR = ROOT / "device" / "c"
TYPES = ["int8", "int16", "int32", "fp16", "fp32", "ternary"]


class FtTensor(ctypes.Structure):
    _fields_ = [
        ("tensor_id", ctypes.c_uint32),
        ("ndim", ctypes.c_uint8),
        ("dims", ctypes.c_uint32 * 8),
        ("nnz", ctypes.c_uint32),
        ("replace", ctypes.c_uint8),
        ("value_type", ctypes.c_uint8),
        ("scale", ctypes.c_float),
        ("indices", ctypes.POINTER(ctypes.c_uint32)),
        ("values", ctypes.POINTER(ctypes.c_float)),
    ]


@pytest.fixture(scope="module")
def lib():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    subprocess.run(["make", "-s", "-C", str(C_DIR)], check=True)
    lib = ctypes.CDLL(str(C_DIR / "libfedtiny_codec.so"))
    lib.ft_encode.restype = lib.ft_decode.restype = ctypes.c_int
    return lib


def random_update(rng) -> SparseUpdate:
    tensors = []
    for tid in rng.permutation(6)[: rng.integers(0, 5)]:
        shape = tuple(int(d) for d in rng.integers(1, 30, rng.integers(1, 4)))
        numel = int(np.prod(shape))
        k = int(rng.integers(0, numel + 1)) if rng.random() < 0.3 else int(rng.integers(0, max(1, numel // 20) + 1))
        idx = np.sort(rng.choice(numel, k, replace=False)).astype(np.int64)
        vt = TYPES[rng.integers(len(TYPES))]
        raw = rng.normal(size=k) * 10 ** rng.uniform(-3, 3)
        if vt == "int32" and rng.random() < 0.5:
            raw = np.round(raw * 1000)
        values, scale = quantize_values(raw, vt)
        tensors.append(SparseTensor(int(tid), shape, idx, values, vt, scale, bool(rng.random() < 0.2)))
    return SparseUpdate(tensors)


def c_encode(lib, update: SparseUpdate) -> bytes:
    arr = (FtTensor * max(1, len(update.tensors)))()
    keep = []
    for i, t in enumerate(update.tensors):
        idx = np.ascontiguousarray(t.indices, np.uint32)
        val = np.ascontiguousarray(t.values, np.float32)
        keep += [idx, val]
        a = arr[i]
        a.tensor_id, a.ndim, a.nnz, a.replace = t.tensor_id, len(t.shape), len(idx), int(t.replace)
        for d, s in enumerate(t.shape):
            a.dims[d] = s
        a.value_type, a.scale = TYPES.index(t.value_type), t.scale
        a.indices = idx.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32))
        a.values = val.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    out = (ctypes.c_uint8 * (1 << 20))()
    n = ctypes.c_size_t()
    assert lib.ft_encode(arr, len(update.tensors), out, len(out), ctypes.byref(n)) == 0
    return bytes(out[: n.value])


def c_decode(lib, data: bytes) -> tuple[int, list]:
    arr = (FtTensor * 16)()
    pool = 1 << 16
    idx = (ctypes.c_uint32 * pool)()
    val = (ctypes.c_float * pool)()
    n = ctypes.c_uint32()
    buf = (ctypes.c_uint8 * max(1, len(data))).from_buffer_copy(data or b"\0")
    rc = lib.ft_decode(buf, len(data), arr, 16, ctypes.byref(n), idx, val, pool)
    if rc:
        return rc, []
    out = []
    for i in range(n.value):
        a = arr[i]
        out.append(
            (
                a.tensor_id,
                tuple(a.dims[: a.ndim]),
                np.array(a.indices[: a.nnz], np.int64),
                np.array(a.values[: a.nnz], np.float64),
                TYPES[a.value_type],
                bool(a.replace),
            )
        )
    return 0, out


def same(py_tensors, c_tensors):
    assert len(py_tensors) == len(c_tensors)
    for t, (tid, shape, idx, val, vt, rep) in zip(py_tensors, c_tensors):
        assert (t.tensor_id, tuple(t.shape), t.value_type, t.replace) == (tid, shape, vt, rep)
        assert np.array_equal(t.indices, idx)
        np.testing.assert_allclose(val, t.values, rtol=2e-6, atol=1e-30 + 2e-6 * np.abs(t.values).max(initial=0))


def test_c_and_python_agree_on_1000_random_updates(lib):
    rng = np.random.default_rng(0)
    for _ in range(1000):
        update = random_update(rng)
        py_bytes = encode(update)
        rc, from_c = c_decode(lib, py_bytes)  # Python-encoded bytes decode in C
        assert rc == 0
        same(update.tensors, from_c)
        c_bytes = c_encode(lib, update)  # C-encoded bytes decode in Python
        same(
            update.tensors,
            [
                (t.tensor_id, tuple(t.shape), t.indices, t.values, t.value_type, t.replace)
                for t in decode(c_bytes).tensors
            ],
        )


def test_c_decoder_refuses_truncated_input(lib):
    rng = np.random.default_rng(1)
    data = encode(random_update(rng)) or b"FTU\x01\x00"
    for n in range(len(data)):
        rc, _ = c_decode(lib, data[:n])
        assert rc < 0
