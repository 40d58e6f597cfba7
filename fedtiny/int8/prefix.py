"""Reuse of the frozen prefix: the int8 tensors a sparse update does not change.

In a sparse update every op before the first trained one is frozen, and the int8 graph is
exact: for the same samples its outputs are the same integers whatever the batch. So a
simulated client that has run its samples through the frozen prefix once keeps the int8
tensors that cross into the trained part (the :meth:`~fedtiny.int8.graph.QModel.boundary`:
the prefix's last output and any skip connection that jumps over the first trained op) and
runs forward and backward only from the first trained op. The server's evaluation on its
test split and every fine-tuning of the contribution analysis do the same.

A cached prefix is keyed by a hash of what it depends on: the graph's input quantization,
the name, kind, parameters and buffers of every op of the prefix, and the samples. The
downlink changes only trained slices, so the key of a client's prefix holds from round to
round; a scheme that trains an earlier op, or a model whose prefix changed, misses and
recomputes. This is a simulator's saving only: a device runs its whole graph, and the
simulated time and energy count every op (:func:`fedtiny.federated.task.Task.sample_macs`).
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from fedtiny.int8.graph import QModel
from fedtiny.int8.ledger import NULL, active

__all__ = [
    "FrozenPrefix",
    "PrefixStore",
    "prefix_key",
    "data_digest",
    "first_changing_op",
    "without_prefixes",
    "server_prefixes",
    "prefix_cache",
    "STATE_PREFIX",
]

STATE_PREFIX = "prefix/"  # a client's cached prefixes in its persistent state: prefix/<slot>/<tensor>
_VERSION = b"fedtiny-prefix-1"
_BATCH = 128  # samples per no-grad pass when a prefix is computed


@dataclass
class FrozenPrefix:
    """The boundary tensors of ``start`` for every sample of one data set (int8, ``N x ...``)."""

    start: int
    key: str
    tensors: dict[str, torch.Tensor]

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The boundary tensors of samples ``idx``, as the graph holds them (float32 integers)."""
        return {name: t[idx].to(torch.float32) for name, t in self.tensors.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def data_digest(x: np.ndarray) -> str:
    """Hash of the samples (shape, dtype and bytes)."""
    h = hashlib.sha256(repr((x.shape, str(x.dtype))).encode())
    h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def prefix_key(model: QModel, start: int, digest: str) -> str:
    """Hash of everything the boundary tensors of ``start`` depend on, for the samples of ``digest``."""
    h = hashlib.sha256(_VERSION)
    h.update(digest.encode())
    h.update(model.input_params.numpy().tobytes())
    for node in model.nodes[:start]:
        module = model.op(node.op)
        h.update(f"{node.op}:{type(module).__name__}:{','.join(node.inputs)}".encode())
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            h.update(name.encode())
            h.update(t.detach().contiguous().numpy().tobytes())
    h.update(repr(model.boundary(start)).encode())
    return h.hexdigest()


# FEDTINY_PREFIX_CACHE=0 turns the reuse off in every process of a run (Ray workers inherit it)
_ENABLED = [os.environ.get("FEDTINY_PREFIX_CACHE", "1") != "0"]


@contextmanager
def prefix_cache(enabled: bool) -> Iterator[None]:
    """Turn the reuse of frozen prefixes on or off inside the block (``bench round`` times both paths)."""
    before = _ENABLED[0]
    _ENABLED[0] = enabled
    try:
        yield
    finally:
        _ENABLED[0] = before


def usable(model) -> bool:
    """Whether a prefix can stand in for the graph's first ops: an int8 graph, no memory model recording."""
    return _ENABLED[0] and isinstance(model, QModel) and active() is NULL


class PrefixStore:
    """Cached frozen prefixes of a few data sets, found by key, advanced to a later start when they can be.

    ``keep``: how many prefixes are held (the least recently used go first). ``start``: the op every
    prefix ends before (default: the model's first trained op, :meth:`~fedtiny.int8.graph.QModel.first_trained_op`);
    the server, which trains nothing, gives the first op whose tensors the downlink can change
    (:func:`first_changing_op`).
    """

    def __init__(self, keep: int = 4, start: int | None = None) -> None:
        self.keep, self.start = keep, start
        self._items: list[FrozenPrefix] = []
        self._digests: list[tuple[np.ndarray, str]] = []
        self._used: list[FrozenPrefix] = []  # what get() returned: what a client keeps for its next round
        self.hits = self.misses = 0

    @property
    def items(self) -> list[FrozenPrefix]:
        """The held prefixes, most recently used first."""
        return list(self._items)

    def digest(self, x: np.ndarray) -> str:
        for arr, d in self._digests:  # the same array object: its digest is known
            if arr is x:
                return d
        d = data_digest(x)
        self._digests = [(x, d)] + self._digests[: self.keep - 1]
        return d

    def get(self, model: QModel, x: np.ndarray) -> FrozenPrefix | None:
        """The frozen prefix of ``model``'s current scheme for images ``x`` (in [0, 1]); ``None`` when
        nothing is frozen or the graph cannot start from a prefix now."""
        if not usable(model):
            return None
        start = model.first_trained_op() if self.start is None else self.start
        if start == 0:
            return None
        digest = self.digest(x)
        key = prefix_key(model, start, digest)
        for item in self._items:
            if item.key == key and self._fits(item, model, start, len(x)):
                self.hits += 1
                self._touch(item)
                return item
        self.misses += 1
        # an earlier prefix of the same samples that is still valid saves its ops
        base = max(
            (
                p
                for p in self._items
                if p.start < start
                and p.key == prefix_key(model, p.start, digest)
                and self._fits(p, model, p.start, len(x))
            ),
            key=lambda p: p.start,
            default=None,
        )
        item = FrozenPrefix(start, key, compute(model, x, start, base))
        self._touch(item)
        return item

    @staticmethod
    def _fits(item: FrozenPrefix, model: QModel, start: int, n: int) -> bool:
        """A held prefix has the boundary's tensors, one row per sample (a damaged state is recomputed)."""
        return (
            item.start == start
            and set(item.tensors) == set(model.boundary(start))
            and all(t.dim() >= 2 and t.shape[0] == n for t in item.tensors.values())
        )

    def _touch(self, item: FrozenPrefix) -> None:
        self._items = [item] + [p for p in self._items if p is not item][: self.keep - 1]
        self._used = [item] + [p for p in self._used if p is not item and p in self._items]

    # -- persistence in a client's state (safetensors: int8 arrays and the key's bytes)

    def to_state(self) -> dict[str, np.ndarray]:
        """The prefixes used since this store was made, as state arrays (``prefix/<i>/key``,
        ``prefix/<i>/start``, ``prefix/<i>/t/<tensor>``): a client keeps what its round used."""
        out: dict[str, np.ndarray] = {}
        for i, item in enumerate(self._used):
            out[f"{STATE_PREFIX}{i}/key"] = np.frombuffer(item.key.encode(), np.uint8).copy()
            out[f"{STATE_PREFIX}{i}/start"] = np.array([item.start], np.int64)
            for name, t in item.tensors.items():
                out[f"{STATE_PREFIX}{i}/t/{name}"] = t.numpy()
        return out

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray], keep: int = 4) -> "PrefixStore":
        """The prefixes a client kept (anything malformed is dropped: it is only a cache)."""
        store = cls(keep)
        slots = sorted({k[len(STATE_PREFIX) :].split("/", 1)[0] for k in state if k.startswith(STATE_PREFIX)})
        for slot in slots:
            head = f"{STATE_PREFIX}{slot}/"
            try:
                key = bytes(np.asarray(state[head + "key"], np.uint8)).decode()
                start = int(np.asarray(state[head + "start"]).reshape(-1)[0])
            except (KeyError, ValueError, IndexError, UnicodeDecodeError):
                continue
            tensors = {
                k[len(head) + 2 :]: torch.from_numpy(np.asarray(v, np.int8).copy())
                for k, v in state.items()
                if k.startswith(head + "t/")
            }
            if tensors and len(store._items) < keep:
                store._items.append(FrozenPrefix(start, key, tensors))
        return store


def first_changing_op(model: QModel, names) -> int:
    """Index of the first op owning one of the tensors ``names`` (``conv3.bias``, ...); the head's when none."""
    owners = {n.split(".", 1)[0] for n in names}
    return next((i for i, node in enumerate(model.nodes[: model._head + 1]) if node.op in owners), model._head)


def server_prefixes(model, changing: list[str]) -> PrefixStore | None:
    """The server's store for its evaluation of the global ``model``, whose tensors ``changing`` are the
    only ones aggregation changes (``None`` for a float model)."""
    if not isinstance(model, QModel):
        return None
    return PrefixStore(keep=2, start=first_changing_op(model, changing))


def without_prefixes(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``state`` without any cached prefix."""
    return {k: v for k, v in state.items() if not k.startswith(STATE_PREFIX)}


@torch.no_grad()
def compute(model: QModel, x: np.ndarray, start: int, base: FrozenPrefix | None = None) -> dict[str, torch.Tensor]:
    """The boundary tensors of ``start`` for images ``x``: ops ``0..start-1`` run on the quantized
    images, or only ops ``base.start..start-1`` from an earlier prefix ``base`` of the same images."""
    names = model.boundary(start)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(0, len(x), _BATCH):
        if base is None:
            env = model._run(model.quantize_input(torch.from_numpy(x[i : i + _BATCH])), start - 1, record=False)
        else:
            idx = torch.arange(i, min(i + _BATCH, len(x)))
            env = model._run(None, start - 1, record=False, start=base.start, env=base.batch(idx))
        for n in names:
            parts[n].append(env[n].to(torch.int8))
    return {n: torch.cat(v) for n, v in parts.items()}
