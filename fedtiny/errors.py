"""fedtiny's error family: everything a user (or a misbehaving client) can cause.

The CLI turns a :class:`FedtinyError` into one line on stderr and exit status 2;
any other exception is a bug and keeps its traceback. Raise the most specific
class; its message names the file, key or value that was wrong.
"""

from __future__ import annotations

__all__ = [
    "FedtinyError",
    "ScenarioError",
    "DataError",
    "ModelFileError",
    "ZooError",
    "SchemeError",
    "UpdateError",
    "PayloadError",
    "CodecError",
    "ProtocolError",
    "StreamClosed",
]


class FedtinyError(Exception):
    """Base of every error a user can cause; the message is a single line."""


class ScenarioError(FedtinyError):
    """A scenario file, override or command-line value is invalid."""


class DataError(FedtinyError):
    """A data source cannot be read (missing root, bad folder, ...)."""


class ModelFileError(FedtinyError):
    """A model file is missing, malformed, or holds a network fedtiny cannot run."""


class ZooError(ModelFileError):
    """A tiny-training model file holds something the restricted reader refuses."""


class SchemeError(FedtinyError):
    """A sparse-update scheme is malformed or does not match the model."""


class UpdateError(FedtinyError):
    """Bytes received from a peer do not decode to a valid model update or payload."""


class PayloadError(UpdateError):
    """A dense payload does not match the expected spec (length, values)."""


class CodecError(UpdateError):
    """A sparse wire-format payload is malformed (the message says where)."""


class ProtocolError(FedtinyError):
    """A bridge frame or exchange that breaks the protocol (the message says how)."""


class StreamClosed(ProtocolError):
    """The byte stream to a bridged device (or to the bridge) was closed or failed."""
