"""The uplink pair: how a client encodes what it trained and how the server decodes it.

One :class:`Uplink` is chosen from the scenario (``compression.uplink``) and both
sides use it, so the dense/sparse choice is made in one place:

- ``dense``: the trained tensors whole, in their on-device dtypes; the server's
  change is what arrived minus what it sent.
- ``sparse``: the change since the received model, top-k sparsified with error
  feedback and quantized (:mod:`fedtiny.compress.sparsify`), in the wire format of
  :mod:`fedtiny.compress.codec`; the server accepts only additive changes inside
  the scheme's trainable slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtiny.compress.codec import decode, encode
from fedtiny.compress.dense import Spec, pack_dense, unpack_dense
from fedtiny.compress.sparsify import CompressionConfig, compress_update
from fedtiny.errors import CodecError

__all__ = ["Uplink", "Decoded", "DENSE", "SPARSE"]

DENSE, SPARSE = "dense", "sparse"

Decoded = dict[str, tuple[np.ndarray, np.ndarray]]
"""A decoded update: tensor name -> (flat positions, change in float64)."""

_CARRIED = ("residual/", "velocity/")  # the client state the sparse encoder keeps across rounds


@dataclass(frozen=True)
class Uplink:
    """A client's encoder and the server's decoder for one scenario.

    Attributes
    ----------
    kind
        ``"dense"`` or ``"sparse"``.
    spec
        The tensors a client sends (its trainable tensors).
    slices
        Flat positions of each tensor that the scheme lets a client change.
    compression
        The sparse encoder's settings (unused when dense).
    """

    kind: str
    spec: Spec
    slices: dict[str, np.ndarray]
    compression: CompressionConfig

    def encode(self, trained: dict[str, np.ndarray], received: dict[str, np.ndarray], server_round: int,
               state: dict[str, np.ndarray]) -> tuple[bytes, dict[str, np.ndarray]]:
        """Encode a client's ``trained`` tensors; return the payload and the encoder's new carried state.

        ``state`` is the client's persistent state; only the error-feedback residual and the
        momentum-correction velocity in it are read, and their new values are returned.
        """
        if self.kind == DENSE:
            return pack_dense(trained, self.spec), {}
        delta = {n: trained[n].astype(np.float64) - received[n].astype(np.float64) for n in trained}
        carried = {k: v for k, v in state.items() if k.startswith(_CARRIED)}
        sparse, carried = compress_update(delta, self.slices, self.spec, self.compression, server_round, carried)
        return encode(sparse), carried

    def decode(self, payload: bytes, sent: dict[str, np.ndarray]) -> Decoded:
        """A client's change against the model ``sent`` to it, validated.

        Raises
        ------
        fedtiny.errors.UpdateError
            A payload that does not decode, or a sparse update that replaces values or
            touches elements outside the scheme's trainable slices.
        """
        if self.kind == DENSE:
            return {n: (np.arange(a.size), a.astype(np.float64).ravel() - sent[n].astype(np.float64).ravel())
                    for n, a in unpack_dense(payload, self.spec).items()}
        out: Decoded = {}
        for t in decode(payload, self.spec).tensors:
            name = self.spec[t.tensor_id][0]
            if t.replace:
                raise CodecError(f"tensor {name}: an update must carry changes, not replacement values")
            if not np.isin(t.indices, self.slices[name], assume_unique=True).all():
                raise CodecError(f"tensor {name}: changes elements outside the scheme's trainable slice")
            out[name] = (t.indices, t.values)
        return out
