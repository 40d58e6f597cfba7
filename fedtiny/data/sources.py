"""Image data sources behind one interface: ``load_source(name, root, ...) -> ImageSet``.

Each source is a :class:`DataSource` added to ``fedtiny.variants.DATA_SOURCES`` (declared there by name,
so the scenario can offer it); :func:`load_source` looks it up.

Nothing is ever downloaded. ``digits`` is scikit-learn's bundled 8x8 digits;
``lfw-faces`` is scikit-image's bundled ``lfw_subset`` (100 face and 100 non-face 25x25
patches: a person-detection task in the spirit of Visual Wake Words); ``photos`` is 400 colour
32x32 patches of scikit-learn's two bundled photos (which photo is the label); the torchvision
sources read an existing local root with ``download=False`` and a missing root is a
:class:`DataError`, not a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.data import lfw_subset

from fedtiny.errors import DataError
from fedtiny.variants import DATA_SOURCES

__all__ = ["DataError", "DataSource", "ImageSet", "load_source"]


@dataclass(frozen=True)
class ImageSet:
    """Images in ``[0, 1]`` as float32 ``N x C x H x W`` with int64 labels."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or len(self.x) != len(self.y):
            raise ValueError(f"ImageSet {self.name}: x must be NCHW with one label per image")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image."""
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, idx: np.ndarray) -> "ImageSet":
        """Return the images at ``idx`` (a copy)."""
        return ImageSet(self.x[idx], self.y[idx], self.num_classes, self.name)


def _digits(root: str) -> ImageSet:
    # deferred: scikit-learn's datasets take 1.4-2.6 s to import
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    return ImageSet(x, d.target.astype(np.int64), 10, "digits")


def _lfw_faces(root: str) -> ImageSet:
    x = lfw_subset().astype(np.float32)[:, None]  # 200 x 1 x 25 x 25 in [0, 1]
    # As scikit-image documents it: the first 100 patches are faces, the last 100 are not.
    y = np.r_[np.ones(100, np.int64), np.zeros(100, np.int64)]
    return ImageSet(x, y, 2, "lfw-faces")


def _photos(root: str) -> ImageSet:
    """32x32 colour patches of scikit-learn's two bundled photos on a regular 10 x 20 grid; the label says
    which photo (0: the temple, 1: the flower): a small colour scene task that needs no download."""
    # deferred: scikit-learn's datasets take 1.4-2.6 s to import
    from sklearn.datasets import load_sample_images

    xs, ys = [], []
    for label, im in enumerate(load_sample_images().images):
        photo = np.asarray(im, np.float32) / 255.0
        for r in np.linspace(0, photo.shape[0] - 32, 10).astype(int):
            for c in np.linspace(0, photo.shape[1] - 32, 20).astype(int):
                xs.append(photo[r : r + 32, c : c + 32].transpose(2, 0, 1))
                ys.append(label)
    return ImageSet(np.stack(xs), np.asarray(ys, np.int64), 2, "photos")


def _torchvision(name: str, root: str) -> ImageSet:
    # deferred: torchvision takes 3 s to import; only its sources need it
    import torchvision

    cls = {
        "mnist": torchvision.datasets.MNIST,
        "fashion-mnist": torchvision.datasets.FashionMNIST,
        "cifar10": torchvision.datasets.CIFAR10,
    }[name]
    parts = []
    for train in (True, False):
        try:
            parts.append(cls(root=root, train=train, download=False))
        except (RuntimeError, OSError) as exc:
            raise DataError(
                f"data.root: {name} not found under '{root}' ({exc}). fedtiny never downloads data: "
                f"place the torchvision '{cls.__name__}' files there, or use data.source = \"digits\""
            ) from None
    xs, ys = [], []
    for ds in parts:
        data = np.asarray(ds.data)
        if data.ndim == 3:  # MNIST-like: N x H x W
            data = data[:, None]
        else:  # CIFAR: N x H x W x C
            data = data.transpose(0, 3, 1, 2)
        xs.append(data.astype(np.float32) / 255.0)
        ys.append(np.asarray(ds.targets, dtype=np.int64))
    return ImageSet(np.concatenate(xs), np.concatenate(ys), 10, name)


def _imagefolder(root: str) -> ImageSet:
    # deferred: torchvision takes 3 s to import; only its sources need it
    import torchvision

    if not Path(root).is_dir():
        raise DataError(f"data.root: '{root}' is not a directory of class folders")
    try:
        ds = torchvision.datasets.ImageFolder(root)
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        raise DataError(f"data.root: cannot read ImageFolder '{root}': {exc}") from None
    xs, size = [], None
    for path, _ in ds.samples:
        img = np.asarray(ds.loader(path).convert("RGB"), dtype=np.float32) / 255.0
        if size is None:
            size = img.shape
        elif img.shape != size:
            # Resize to the first image's size so that every sample stacks; data.image_size can override.
            img = np.asarray(Image.fromarray((img * 255).astype(np.uint8)).resize(size[1::-1]), np.float32) / 255.0
        xs.append(img.transpose(2, 0, 1))
    return ImageSet(np.stack(xs), np.asarray(ds.targets, np.int64), len(ds.classes), f"imagefolder:{root}")


@dataclass(frozen=True)
class DataSource:
    """A source of images by name.

    Attributes
    ----------
    load
        ``root -> ImageSet``: every image of the source (the federation splits and partitions them).
    federation
        ``scenario -> Federation`` for a source that draws each client's images itself (no pool).
    """

    name: str
    load: Callable[[str], ImageSet] | None = None
    federation: Callable[[Any], Any] | None = None


DATA_SOURCES.add("digits", DataSource("digits", _digits))
DATA_SOURCES.add("lfw-faces", DataSource("lfw-faces", _lfw_faces))
DATA_SOURCES.add("photos", DataSource("photos", _photos))
for _name in ("mnist", "fashion-mnist", "cifar10"):
    DATA_SOURCES.add(_name, DataSource(_name, lambda root, name=_name: _torchvision(name, root)))
DATA_SOURCES.add("imagefolder", DataSource("imagefolder", _imagefolder))


def _resize(x: np.ndarray, size: int, width: int = 0) -> np.ndarray:
    t = torch.from_numpy(x)
    return F.interpolate(t, size=(size, width or size), mode="bilinear", align_corners=False, antialias=True).numpy()


def _channels(x: np.ndarray, channels: int) -> np.ndarray:
    """Grayscale to RGB by replication, or RGB to grayscale by luminance (ITU-R BT.601)."""
    if channels == 0 or x.shape[1] == channels:
        return x
    if channels == 3 and x.shape[1] == 1:
        return np.repeat(x, 3, axis=1)
    if channels == 1 and x.shape[1] == 3:
        return np.tensordot(np.array([0.299, 0.587, 0.114], np.float32), x, axes=([0], [1]))[:, None].astype(np.float32)
    raise DataError(f"data.channels: cannot turn {x.shape[1]}-channel images into {channels} channels")


def load_source(
    name: str,
    root: str = "",
    *,
    image_size: int = 0,
    max_samples: int = 0,
    seed: int = 0,
    channels: int = 0,
    image_width: int = 0,
) -> ImageSet:
    """Load a data source.

    Parameters
    ----------
    name
        A source of ``fedtiny.variants.DATA_SOURCES`` that has an image pool.
    root
        Local dataset root for the torchvision sources and ``imagefolder``.
    image_size
        Resize to ``image_size x image_size`` (0 keeps the source's size), or to ``image_size x image_width``
        (height x width) when ``image_width`` is given.
    max_samples
        Keep a seeded random subset of this many samples (0 keeps all).
    seed
        Seed of that subset.
    channels
        1 or 3 to convert the images' channels (0 keeps the source's).
    """
    try:
        source = DATA_SOURCES.get(name)
    except ValueError as exc:
        raise DataError(f"data.source: {exc}") from None
    if source.load is None:
        raise DataError(f"data.source: {name!r} draws each client's images itself; it has no image pool to load")
    data = source.load(root)
    if max_samples and max_samples < len(data):
        idx = np.sort(np.random.default_rng(seed).choice(len(data), max_samples, replace=False))
        data = data.subset(idx)
    if image_size and (image_size, image_width or image_size) != tuple(data.shape[-2:]):
        data = ImageSet(_resize(data.x, image_size, image_width), data.y, data.num_classes, data.name)
    if channels:
        data = ImageSet(_channels(data.x, channels), data.y, data.num_classes, data.name)
    return data
