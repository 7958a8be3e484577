"""Unmasked datasets: an ``ImageFolder``-style tree of files and in-memory arrays (CIFAR style).

Both return ``circuits`` items ``{"image": float32 [3, H, W], "label": int, "index": int,
"path": str}`` (see ``circuits.data.samples``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from .samples import SkippingDataset, apply_transform, load_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def is_image_file(name: str) -> bool:
    """True for the image extensions we read (case-insensitive: ImageNet uses ``.JPEG``)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


class ImageFolderDataset(SkippingDataset):
    """``root/<class>/**/<image>`` with labels from sorted class folder names, or ``class_to_idx``.

    ``class_to_idx`` maps folder name -> label in the model's output space (e.g. the first
    value of ``load_synset_mapping("LOC_synset_mapping.txt")`` for ImageNet-1k wnid folders);
    a folder missing from it raises ``ValueError``. Files are listed recursively, sorted, so
    ``index`` is stable. Unreadable images give ``None`` (logged, recorded in ``skipped``).
    ``transform``: a ``JointTransform``, any callable on a PIL image, or ``None`` (to tensor only).
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 class_to_idx: Mapping[str, int] | None = None):
        super().__init__()
        self.root, self.transform = Path(root), transform
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder root {self.root} does not exist; "
                                    "expected root/<class>/<image files>")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if class_to_idx is None:
            class_to_idx = {c: i for i, c in enumerate(self.classes)}
        unknown = [c for c in self.classes if c not in class_to_idx]
        if unknown:
            raise ValueError(f"class folder(s) {unknown[:5]} in {self.root} are not in class_to_idx")
        self.class_to_idx = dict(class_to_idx)
        self.samples: list[tuple[str, int]] = [
            (path, int(class_to_idx[c])) for c in self.classes for path in _image_files(self.root / c)]
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}; "
                                    "expected root/<class>/<image files>")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | None:
        index = range(len(self))[index]  # IndexError out of range, negative indices allowed
        path, label = self.samples[index]
        image = self._read(index, path, load_rgb)
        if image is None:  # unreadable: already logged and recorded
            return None
        image, _ = apply_transform(self.transform, image, None)
        return {"image": image, "label": label, "index": index, "path": path}


def _image_files(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursive), sorted by path for a stable order."""
    found = [os.path.join(dirpath, f) for dirpath, _, files in os.walk(folder, followlinks=True)
             for f in files if is_image_file(f)]
    return sorted(found)


class ArrayDataset(SkippingDataset):
    """Images held in memory: uint8 [N, H, W, 3] (e.g. CIFAR's ``data``) or float [N, 3, H, W].

    ``labels``: N ints or ``None`` (all -1). ``transform=None`` gives float32 [3, H, W] (uint8
    scaled to [0, 1], floats unchanged). Otherwise the transform gets a PIL image for uint8
    arrays (so ``transform_for`` / timm transforms behave as on files) and a float tensor
    [3, H, W] for float arrays. ``path`` is "".
    """

    def __init__(self, images: np.ndarray | torch.Tensor, labels: Sequence[int] | np.ndarray | None = None,
                 transform: Callable | None = None):
        super().__init__()
        images = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if images.dtype == np.uint8 and (images.ndim != 4 or images.shape[-1] != 3):
            raise ValueError(f"uint8 images must be [N, H, W, 3], got {images.shape}")
        if images.dtype != np.uint8 and (images.ndim != 4 or images.shape[1] != 3):
            raise ValueError(f"float images must be [N, 3, H, W], got {images.shape} {images.dtype}")
        n = len(images)
        labels = np.full(n, -1) if labels is None else np.asarray(labels).reshape(-1)
        if len(labels) != n:
            raise ValueError(f"{n} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels.astype(np.int64), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        index = range(len(self))[index]
        raw = self.images[index]
        if self.images.dtype == np.uint8:
            image = Image.fromarray(raw) if self.transform is not None else raw
        else:
            image = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))  # [3, H, W]
        image, _ = apply_transform(self.transform, image, None)
        return {"image": image, "label": int(self.labels[index]), "index": index, "path": ""}
