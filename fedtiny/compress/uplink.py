"""The uplink pair: how a client encodes what it trained and how the server decodes it.

One :class:`Uplink` is made from the scenario (``compression.uplink`` names an :class:`UplinkCodec`)
and both sides use it, so the choice is made in one place. The codecs are registered by name:

- ``dense``: the trained tensors whole, in their on-device dtypes; the server's
  change is what arrived minus what it sent.
- ``sparse``: the change since the received model, top-k sparsified with error
  feedback and quantized (:mod:`fedtiny.compress.sparsify`), in the wire format of
  :mod:`fedtiny.compress.codec`; the server accepts only additive changes inside
  the scheme's trainable slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from fedtiny.compress.codec import decode, encode
from fedtiny.compress.dense import Spec, as_dtype, pack_dense, unpack_dense
from fedtiny.compress.sparsify import CompressionConfig, compress_update
from fedtiny.errors import CodecError
from fedtiny.registry import Registry

__all__ = ["Uplink", "UplinkCodec", "Decoded", "register_uplink", "uplink_codec", "uplink_names"]

Decoded = dict[str, tuple[np.ndarray, np.ndarray]]
"""A decoded update: tensor name -> (flat positions, change in float64). Positions are strictly increasing
and within the tensor (every codec's decoder guarantees it; the server's aggregation relies on it)."""

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class UplinkCodec:
    """One way of sending a client's trained tensors.

    Attributes
    ----------
    name
        The scenario's ``compression.uplink``.
    encode
        ``(uplink, trained, received, server_round, state) -> (payload, carried state)``: ``trained`` may be
        floats or on-device dtypes; ``state`` is the client's persistent state, of which the codec reads
        what it carries across rounds and returns its new values.
    decode
        ``(uplink, payload, sent) -> Decoded``: the client's change against the model ``sent`` to it;
        raises :class:`fedtiny.errors.UpdateError` on anything invalid.
    quantizes
        The payload's values travel in the scenario's value type (``compression.values``); otherwise the
        tensors travel whole in their on-device dtypes.
    carries_state
        The client keeps encoder state across rounds (an error-feedback residual) and a table of the
        scheme's trainable positions: the device memory model counts both.
    """

    name: str
    encode: Callable[["Uplink", Arrays, Arrays, int, Arrays], tuple[bytes, Arrays]]
    decode: Callable[["Uplink", bytes, Arrays], Decoded]
    quantizes: bool = False
    carries_state: bool = False


_CODECS: Registry[UplinkCodec] = Registry("uplink")


def register_uplink(codec: UplinkCodec) -> UplinkCodec:
    return _CODECS.add(codec.name, codec)


def uplink_codec(name: str) -> UplinkCodec:
    return _CODECS.get(name)


def uplink_names() -> tuple[str, ...]:
    return _CODECS.names()


@dataclass(frozen=True)
class Uplink:
    """A client's encoder and the server's decoder for one scenario.

    Attributes
    ----------
    kind
        The codec's name (``compression.uplink``).
    spec
        The tensors a client sends (its trainable tensors).
    slices
        Flat positions of each tensor that the scheme lets a client change.
    compression
        The sparse encoder's settings (a codec that does not compress ignores them).
    """

    kind: str
    spec: Spec
    slices: dict[str, np.ndarray]
    compression: CompressionConfig

    @property
    def codec(self) -> UplinkCodec:
        return uplink_codec(self.kind)

    def encode(self, trained: Arrays, received: Arrays, server_round: int, state: Arrays) -> tuple[bytes, Arrays]:
        """Encode a client's ``trained`` tensors; return the payload and the encoder's new carried state."""
        return self.codec.encode(self, trained, received, server_round, state)

    def decode(self, payload: bytes, sent: Arrays) -> Decoded:
        """A client's change against the model ``sent`` to it, validated.

        Raises
        ------
        fedtiny.errors.UpdateError
            A payload that does not decode, or a sparse update that replaces values or
            touches elements outside the scheme's trainable slices.
        """
        return self.codec.decode(self, payload, sent)


# --- dense -------------------------------------------------------------------------------------------------


def _dense_encode(
    up: Uplink, trained: Arrays, received: Arrays, server_round: int, state: Arrays
) -> tuple[bytes, Arrays]:
    return pack_dense({n: as_dtype(trained[n], np.dtype(dt)) for n, _, dt in up.spec}, up.spec), {}


def _dense_decode(up: Uplink, payload: bytes, sent: Arrays) -> Decoded:
    return {
        n: (np.arange(a.size), a.astype(np.float64).ravel() - sent[n].astype(np.float64).ravel())
        for n, a in unpack_dense(payload, up.spec).items()
    }


# --- sparse ------------------------------------------------------------------------------------------------

_CARRIED = ("residual/", "velocity/")  # the client state the sparse encoder keeps across rounds


def _sparse_encode(
    up: Uplink, trained: Arrays, received: Arrays, server_round: int, state: Arrays
) -> tuple[bytes, Arrays]:
    delta = {n: trained[n].astype(np.float64) - received[n].astype(np.float64) for n in trained}
    carried = {k: v for k, v in state.items() if k.startswith(_CARRIED)}
    sparse, carried = compress_update(delta, up.slices, up.spec, up.compression, server_round, carried)
    return encode(sparse), carried


def _sparse_decode(up: Uplink, payload: bytes, sent: Arrays) -> Decoded:
    out: Decoded = {}
    for t in decode(payload, up.spec).tensors:
        name = up.spec[t.tensor_id][0]
        if t.replace:
            raise CodecError(f"tensor {name}: an update must carry changes, not replacement values")
        if not np.isin(t.indices, up.slices[name], assume_unique=True).all():
            raise CodecError(f"tensor {name}: changes elements outside the scheme's trainable slice")
        out[name] = (t.indices, t.values)
    return out


register_uplink(UplinkCodec("dense", _dense_encode, _dense_decode))
register_uplink(UplinkCodec("sparse", _sparse_encode, _sparse_decode, quantizes=True, carries_state=True))
