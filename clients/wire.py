"""How fedtiny payloads ride in Flower messages: one raw-``stype`` Array of bytes.

A raw Array carries the payload bytes as they are (no ``np.save`` header), so the
byte count on the wire is the payload's own. Both apps use these helpers.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord

from fedtiny.errors import PayloadError

__all__ = ["PAYLOAD", "bytes_record", "record_bytes"]

PAYLOAD = "payload"
_STYPE = "raw"


def bytes_record(data: bytes) -> ArrayRecord:
    """Wrap payload bytes as an ArrayRecord with a single raw Array."""
    return ArrayRecord({PAYLOAD: Array(dtype="uint8", shape=(len(data),), stype=_STYPE, data=bytes(data))})


def record_bytes(record: object) -> bytes:
    """Return the payload bytes of a record made by :func:`bytes_record`; PayloadError otherwise."""
    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"expected an ArrayRecord, got {type(record).__name__}")
    if list(record.keys()) != [PAYLOAD]:
        raise PayloadError(f"expected one array named {PAYLOAD!r}, got {sorted(record.keys())}")
    arr = record[PAYLOAD]
    if arr.stype != _STYPE or arr.dtype != "uint8":
        raise PayloadError(f"payload array must be raw uint8, got stype={arr.stype!r} dtype={arr.dtype!r}")
    return arr.data
