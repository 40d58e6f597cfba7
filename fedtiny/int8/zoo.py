"""Read published tiny-training int8 models (``.pkl``) without executing anything.

The files are PyTorch zip archives holding one pickle (``archive/data.pkl``) that
references only four globals. :func:`read_tiny_training` unpickles it with a
reader that resolves those four and refuses every other global (and every
persistent id), so a crafted file cannot run code: it fails with
:class:`ZooError` naming the refused global.
"""

from __future__ import annotations

import codecs
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from fedtiny.errors import ZooError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

__all__ = ["ZooError", "read_tiny_training", "ALLOWED_GLOBALS"]


def _allowed() -> dict[tuple[str, str], Any]:
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }


ALLOWED_GLOBALS = ("numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype", "_codecs.encode")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, where: str) -> None:
        super().__init__(io.BytesIO(data))
        self.where = where
        self.allowed = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise ZooError(
                f"{self.where}: refused global {module}.{name} (only {', '.join(ALLOWED_GLOBALS)} "
                f"are allowed); nothing was executed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise ZooError(f"{self.where}: refused persistent id {str(pid)[:60]!r} (tensor storages are not expected)")


def _pickle_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise ZooError(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(names) != 1:
                raise ZooError(f"{path}: expected one data.pkl in the archive, found {len(names)}")
            others = [n for n in zf.namelist() if "/data/" in n]
            if others:
                raise ZooError(f"{path}: archive holds tensor storages ({others[0]}); not a tiny-training model")
            return zf.read(names[0])
    return path.read_bytes()  # a bare pickle stream


def read_tiny_training(path: str | Path) -> dict[str, Any]:
    """Return the model dict of a tiny-training ``.pkl`` (numpy arrays inside), read safely.

    Raises
    ------
    ZooError
        On a missing file, a refused global, or content that is not a model dict.
    """
    path = Path(path)
    data = _pickle_bytes(path)
    try:
        obj = _RestrictedUnpickler(data, str(path)).load()
    except ZooError:
        raise
    except Exception as exc:  # malformed pickle stream: report, never propagate internals
        raise ZooError(f"{path}: not a readable model pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict) or not {"first_conv", "blocks", "classifier"} <= set(obj):
        raise ZooError(f"{path}: expected a dict with first_conv, blocks, classifier; got {type(obj).__name__}")
    return obj
