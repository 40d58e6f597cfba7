"""Value types of the sparse wire format, registered by name: how one tensor's sent values travel.

Each :class:`ValueType` carries its whole behaviour: its byte on the wire, whether a float32 scale
precedes its values, how float changes are quantized for it, how the quantized values pack into bytes
and come back, and its torch twin for the attacks (the server's simulation of what a client sends).
The codec, the sparse encoder, the scenario's choices, the attacks and the firmware generator look a
type up by name (:func:`value_type`) or by wire byte (:func:`value_type_of_code`); none branches on
names. Adding one is one :func:`register` call; ``tests/test_codec.py`` registers one and runs a
federation with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from fedtiny.errors import CodecError
from fedtiny.registry import Registry

if TYPE_CHECKING:  # the twins use tensor methods only: the scenario, which reads the names, stays free of torch
    import torch

__all__ = ["ValueType", "register", "value_type", "value_type_of_code", "value_type_names", "quantize_values"]


@dataclass(frozen=True)
class ValueType:
    """How a tensor's values are quantized and travel.

    Attributes
    ----------
    name
        The scenario's ``compression.values`` and the codec's name for it.
    code
        Its byte on the wire; fixed once released, since decoders read updates by it.
    scaled
        A little-endian float32 scale travels before the positions.
    quantize
        ``values (float64) -> (what the receiver will read, scale)``.
    pack
        ``(quantized values, scale) -> value bytes``.
    nbytes
        Bytes of ``n`` packed values.
    unpack
        ``(value bytes, n, scale) -> float64 values``; raises :class:`CodecError` on bad bytes.
    surrogate
        The torch twin of ``quantize`` for the attacks: ``(sent [B, n], mask [B, n]) -> what arrives [B, n]``,
        row by row (each row one client's tensor; unsent entries are 0 and stay 0).
    levels
        The largest integer a value is rounded to (``qmax`` of an integer type: the rounding step is the
        tensor's largest |value| over it), for the rounding-aware attack; 0 where no fixed step bounds it.
    firmware
        The device codec (``device/c/fedtiny_codec.c``) packs it.
    """

    name: str
    code: int
    scaled: bool
    quantize: Callable[[np.ndarray], tuple[np.ndarray, float]]
    pack: Callable[[np.ndarray, float], bytes]
    nbytes: Callable[[int], int]
    unpack: Callable[[bytes, int, float], np.ndarray]
    surrogate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    levels: float = 0.0
    firmware: bool = False


_TYPES: Registry[ValueType] = Registry("value type")
_BY_CODE: dict[int, ValueType] = {}


def register(vt: ValueType) -> ValueType:
    """Add a value type (its name and wire byte must both be new)."""
    if vt.code in _BY_CODE or not 0 <= vt.code < 256:
        raise ValueError(f"value type {vt.name!r}: wire byte {vt.code} is taken or out of range")
    _TYPES.add(vt.name, vt)
    _BY_CODE[vt.code] = vt
    return vt


def unregister(name: str) -> None:
    """Remove a value type (a test's own, when it is done)."""
    del _BY_CODE[_TYPES.get(name).code]
    del _TYPES[name]


def value_type(name: str) -> ValueType:
    """The value type called ``name``; :class:`CodecError` naming the known ones otherwise."""
    try:
        return _TYPES.get(name)
    except ValueError as exc:
        raise CodecError(str(exc)) from None


def value_type_of_code(code: int) -> ValueType | None:
    """The value type of wire byte ``code`` (None: no such type)."""
    return _BY_CODE.get(code)


def value_type_names() -> tuple[str, ...]:
    return _TYPES.names()


def quantize_values(values: np.ndarray, value_type_name: str) -> tuple[np.ndarray, float]:
    """Quantize float values for the wire; returns ``(dequantized values, scale)``."""
    return value_type(value_type_name).quantize(np.asarray(values, np.float64))


# --- integers: a per-tensor scale ---------------------------------------------------------------------------


def _integer(name: str, code: int, dtype: str, firmware: bool = False) -> ValueType:
    """An integer type: scale ``max|v| / qmax`` rounded to float32 (1.0 when the values are integers that fit,
    so integer changes travel exactly), values rounded to nearest (half to even) and clipped to +-qmax."""
    dt = np.dtype(dtype).newbyteorder("<")
    qmax = float(np.iinfo(dt).max)

    def scale_of(v: np.ndarray) -> float:
        peak = float(np.abs(v).max()) if len(v) else 0.0
        if peak <= qmax and np.array_equal(v, np.round(v)):
            return 1.0
        return float(np.float32(peak / qmax)) if peak > 0 else 1.0

    def quantize(v: np.ndarray) -> tuple[np.ndarray, float]:
        scale = scale_of(v)
        return np.clip(np.round(v / scale), -qmax, qmax) * scale, scale

    def pack(v: np.ndarray, scale: float) -> bytes:
        scale = scale if scale > 0 else 1.0
        return np.clip(np.round(np.asarray(v, np.float64) / scale), -qmax, qmax).astype(dt).tobytes()

    def unpack(raw: bytes, n: int, scale: float) -> np.ndarray:
        return np.frombuffer(raw, dt, n).astype(np.float64) * scale

    def surrogate(sent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        v = sent.double()
        peak = v.abs().amax(1, keepdim=True)
        exact = (peak <= qmax) & (v == v.round()).all(1, keepdim=True)
        scale = (peak / qmax).float().double().where(~(exact | (peak == 0)), 1.0)
        return ((v / scale).round().clamp(-qmax, qmax) * scale).to(sent.dtype)

    return ValueType(
        name, code, True, quantize, pack, lambda n: n * dt.itemsize, unpack, surrogate, levels=qmax, firmware=firmware
    )


# --- floats: no scale -------------------------------------------------------------------------------------


def _float(name: str, code: int, dtype: str, limit: float) -> ValueType:
    """A float type: values rounded to ``dtype`` (saturated at its largest finite value)."""
    dt = np.dtype(dtype).newbyteorder("<")
    to_dtype = {2: "half", 4: "float"}[dt.itemsize]  # the tensor method that rounds to it

    def quantize(v: np.ndarray) -> tuple[np.ndarray, float]:
        return np.clip(v, -limit, limit).astype(dt).astype(np.float64), 1.0

    def unpack(raw: bytes, n: int, scale: float) -> np.ndarray:
        return np.frombuffer(raw, dt, n).astype(np.float64)

    return ValueType(
        name,
        code,
        False,
        quantize,
        lambda v, scale: np.asarray(v, np.float64).astype(dt).tobytes(),
        lambda n: n * dt.itemsize,
        unpack,
        lambda sent, mask: getattr(sent.clamp(-limit, limit), to_dtype)().to(sent.dtype),
    )


# --- ternary: one sign bit per value, the mean magnitude as scale -----------------------------------------


def _ternary_quantize(v: np.ndarray) -> tuple[np.ndarray, float]:
    mag = float(np.abs(v).mean()) if len(v) else 0.0
    return np.sign(v) * mag, mag


def _ternary_unpack(raw: bytes, n: int, scale: float) -> np.ndarray:
    signs = np.unpackbits(np.frombuffer(raw, np.uint8))[:n]
    return np.where(signs == 1, -scale, scale).astype(np.float64)


def _ternary_surrogate(sent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mag = sent.abs().sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1)
    return sent.sign() * mag


register(_integer("int8", 0, "int8", firmware=True))
register(_integer("int16", 1, "int16"))
register(_integer("int32", 2, "int32"))
register(_float("fp16", 3, "float16", 65504.0))
register(_float("fp32", 4, "float32", float(np.finfo(np.float32).max)))
register(
    ValueType(
        "ternary",
        5,
        True,
        _ternary_quantize,
        lambda v, scale: np.packbits((np.asarray(v) < 0).astype(np.uint8)).tobytes(),
        lambda n: (n + 7) // 8,
        _ternary_unpack,
        _ternary_surrogate,
    )
)
