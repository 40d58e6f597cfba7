"""Attack presets: the model, data and threat model of published settings."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from skimage.data import lfw_subset
from torch import nn

from fedtiny.data.sources import load_source
from fedtiny.models import build_model

__all__ = ["DLGLeNet", "dlg_lenet", "real_images", "tiny_ir_rgb", "face_ids", "face_images", "photo_patches"]


class DLGLeNet(nn.Module):
    """The LeNet of the DLG paper: three 5x5 convolutions with sigmoids, 3x32x32 inputs, a linear head."""

    def __init__(self, num_classes: int = 100) -> None:
        super().__init__()
        act = nn.Sigmoid
        self.body = nn.Sequential(
            nn.Conv2d(3, 12, 5, padding=2, stride=2),
            act(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2),
            act(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1),
            act(),
        )
        self.fc = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def dlg_lenet(num_classes: int = 100, seed: int = 0) -> DLGLeNet:
    """DLG's LeNet with every weight and bias uniform in [-0.5, 0.5] (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    model = DLGLeNet(num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
    return model.eval()


def real_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """``n`` real RGB images in [0, 1], N x 3 x size x size: scikit-learn digits upsampled (grey) and
    patches cut from the colour photos bundled with scikit-learn, alternating, seeded."""
    # deferred: scikit-learn's datasets take 1.4-2.6 s to import
    from sklearn.datasets import load_digits, load_sample_images

    rng = np.random.default_rng(seed)
    digits = load_digits().images.astype(np.float32) / 16.0
    photos = [np.asarray(im, np.float32) / 255.0 for im in load_sample_images().images]
    out = np.empty((n, 3, size, size), np.float32)
    pick = rng.permutation(len(digits))
    for i in range(n):
        if i % 2 == 0:
            out[i] = _resize(digits[pick[(i // 2) % len(digits)]][None, None], size)[0].repeat(3, 0)
        else:
            photo = photos[(i // 2) % len(photos)]
            r, c = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
            out[i] = photo[r : r + size, c : c + size].transpose(2, 0, 1)
    return out


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """N x C x h x w images in [0, 1] to ``size`` x ``size`` (bilinear), clipped to [0, 1]."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    up = F.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False)
    return np.clip(up.numpy(), 0.0, 1.0)


def tiny_ir_rgb(num_classes: int = 2, seed: int = 0, image_size: int = 32) -> nn.Module:
    """fedtiny's ``tiny-ir`` for 3-channel inputs, PyTorch's default (seeded) initialization, eval mode."""
    return build_model("tiny-ir", 3, num_classes, image_size=image_size, seed=seed).eval()


LFW_FACES = 100  # scikit-image's lfw_subset: the first 100 of its 200 patches are faces, the rest are not


def face_ids(n: int, seed: int = 0) -> np.ndarray:
    """Indices into ``lfw_subset`` of the ``n`` faces :func:`face_images` picks for ``seed``."""
    if not 0 < n <= LFW_FACES:
        raise ValueError(f"faces: {n} targets asked, lfw_subset has {LFW_FACES} faces")
    return np.random.default_rng(seed).permutation(LFW_FACES)[:n]


def face_images(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` of the 100 faces of scikit-image's ``lfw_subset`` (25x25 grey), resized to ``size`` and
    repeated over 3 channels, seeded order; their label is 1 (face) of the set's two classes."""
    faces = lfw_subset()[:LFW_FACES].astype(np.float32)
    x = _resize(faces[face_ids(n, seed)][:, None], size).repeat(3, axis=1)
    return x.astype(np.float32), np.ones(n, np.int64)


def photo_patches(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """``n`` colour patches of the ``photos`` data source (seeded choice), resized to ``size``."""
    data = load_source("photos")
    pick = np.random.default_rng(seed).choice(len(data), n, replace=n > len(data))
    return _resize(data.x[pick], size).astype(np.float32)
