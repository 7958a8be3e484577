"""Unmasked datasets: an ``ImageFolder``-style tree of files and in-memory arrays (CIFAR style).

Both return ``circuits`` items ``{"image": float32 [3, H, W], "label": int, "index": int,
"path": str}`` (see ``circuits.data.samples``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from .classes import ClassMap, map_class_folders
from .images import image_extensions, load_image
from .samples import SkippingDataset, apply_transform
from .targets import NO_LABEL
from hooked_vit.errors import UserError

logger = logging.getLogger("circuits.data")
IMAGE_EXTENSIONS = tuple(sorted(image_extensions()))  # every format this Pillow opens


def is_image_file(name: str) -> bool:
    """True for the image extensions Pillow opens (case-insensitive: ImageNet uses ``.JPEG``)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


class ImageFolderDataset(SkippingDataset):
    """``root/<class>/**/<image>`` with labels in the model's class ids, or a flat ``root/<image>``.

    Class folders are mapped by ``circuits.data.classes.map_class_folders``: WordNet ids and
    class names through the model's metadata (``classes``: a HookedViT, timm model or
    ``ModelClasses``), integer names by value, anything else by ``labels`` (a JSON / CSV file or
    a ``{folder: id}`` mapping); unmatched folders raise ``ValueError``. A root holding image
    files and no class folders is *unlabeled*: every label is -1 (use target "predicted").
    Files are listed recursively, sorted, so ``index`` is stable; every file Pillow opens is
    decoded by ``load_image``, other files are listed in ``ignored`` (path, reason) and logged.
    Unreadable images give ``None`` (logged, recorded in ``skipped``).
    ``transform``: a ``JointTransform``, any callable on a PIL image, or ``None`` (to tensor only).
    Attributes: ``classes`` (folder names), ``class_to_idx``, ``class_map``, ``samples``.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 labels: str | os.PathLike | Mapping[str, int] | None = None, classes: Any = None):
        super().__init__()
        self.root, self.transform = Path(root), transform
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder root {self.root} does not exist; "
                                    "expected root/<class>/<image files> or root/<image files>")
        self.ignored: list[tuple[str, str]] = []
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        loose = [p for p in sorted(self.root.iterdir()) if p.is_file()]
        self.samples: list[tuple[str, int]] = self._list(loose, labels, classes)
        if self.ignored:
            logger.warning("%s: ignored %d non-image file(s), e.g. %s (see dataset.ignored)",
                           self.root, len(self.ignored), self.ignored[0][0])
        if not self.samples:
            raise FileNotFoundError(f"no image files under {self.root} (formats Pillow opens); "
                                    "expected root/<class>/<image files> or root/<image files>")

    def _list(self, loose: list[Path], labels, classes) -> list[tuple[str, int]]:
        loose_images = [str(p) for p in loose if is_image_file(p.name)]
        if not self.classes:  # flat folder: no class information at all
            self.class_map, self.class_to_idx = ClassMap({}, "unlabeled"), {}
            self._ignore(str(p) for p in loose if not is_image_file(p.name))
            return [(path, NO_LABEL) for path in loose_images]
        if loose_images:
            raise UserError(f"{self.root} holds {len(loose_images)} image file(s) (e.g. {loose_images[0]}) "
                             "beside class folders; move them into a class folder or another root")
        self._ignore(str(p) for p in loose)
        self.class_map = map_class_folders(self.classes, classes, labels)
        self.class_to_idx = dict(self.class_map.folder_to_id)
        return [(path, self.class_to_idx[c]) for c in self.classes
                for path in self._image_files(self.root / c)]

    def _ignore(self, paths) -> None:
        self.ignored += [(p, "not a file type Pillow opens") for p in paths]

    def _image_files(self, folder: Path) -> list[str]:
        """Image files under ``folder`` (recursive), sorted by path; other files go to ``ignored``."""
        found = sorted(os.path.join(d, f) for d, _, files in os.walk(folder, followlinks=True) for f in files)
        self._ignore(p for p in found if not is_image_file(p))
        return [p for p in found if is_image_file(p)]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | None:
        index = range(len(self))[index]  # IndexError out of range, negative indices allowed
        path, label = self.samples[index]
        image = self._read(index, path, load_image)
        if image is None:  # unreadable: already logged and recorded
            return None
        image, _ = apply_transform(self.transform, image, None)
        return {"image": image, "label": label, "index": index, "path": path}


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
            raise UserError(f"uint8 images must be [N, H, W, 3], got {images.shape}")
        if images.dtype != np.uint8 and (images.ndim != 4 or images.shape[1] != 3):
            raise UserError(f"float images must be [N, 3, H, W], got {images.shape} {images.dtype}")
        n = len(images)
        labels = np.full(n, NO_LABEL) if labels is None else np.asarray(labels).reshape(-1)
        if len(labels) != n:
            raise UserError(f"{n} images but {len(labels)} labels")
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
