"""Item conventions shared by every dataset in ``circuits``, skip-on-error handling and the loader.

An item is a dict::

    {"image": float32 [3, H, W]   (after the transform),
     "label": int                 (class index in the model's output space, -1 if unknown),
     "index": int                 (position in the dataset, stable),
     "path":  str                 ("" if the item has no file),
     "mask":  bool [H, W]         (True on object pixels; only for datasets with masks)}

A dataset returns ``None`` for an item it could not read (corrupt / unreadable file) after
logging a warning on ``logging.getLogger("circuits.data")`` and appending
``(index, path, message)`` to its ``skipped`` list, so one bad file never kills a long run.
``collate_samples`` drops those ``None`` s and reports them under ``"skipped"``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

logger = logging.getLogger("circuits.data")


class Skipped(NamedTuple):
    """Placeholder ``make_loader`` puts where a dataset returned ``None``: it carries the index."""

    index: int
    path: str
    error: str


class SkippingDataset(Dataset):
    """Base class: ``skipped`` bookkeeping and the shared "log a warning, return None" path."""

    def __init__(self) -> None:
        # (index, path, message), appended as failures happen (a re-read failure is appended again).
        # In DataLoader worker processes this list lives in the worker's copy of the dataset, so
        # callers using workers must rely on the collate's "skipped" key instead.
        self.skipped: list[tuple[int, str, str]] = []

    def _skip(self, index: int, path: str, err: BaseException) -> None:
        message = f"{type(err).__name__}: {err}"
        logger.warning("skipping item %d: cannot read %s (%s)", index, path, message)
        self.skipped.append((index, path, message))

    def _read(self, index: int, path: str, reader: Callable[[str], Any]) -> Any:
        """``reader(path)``, or ``None`` after logging / recording the error (never raises)."""
        try:
            return reader(path)
        except Exception as err:  # corrupt / truncated / unreadable: skip the item, keep the run going
            self._skip(index, path, err)
            return None


def to_tensor_image(image: Any) -> torch.Tensor:
    """PIL image / uint8 [H, W, 3] array / float [3, H, W] array or tensor / uint8 [3, H, W] tensor
    -> float32 [3, H, W] (uint8 scaled to [0, 1])."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8:  # HWC bytes, the PIL / CIFAR layout
            return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
        return torch.from_numpy(np.ascontiguousarray(image)).float()  # CHW floats already
    image = torch.as_tensor(image)
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()


def apply_transform(transform: Callable | None, image: Any,
                    mask: Any | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply ``transform`` to ``image`` (and ``mask`` [H, W] if given).

    A ``JointTransform`` (anything with ``joint = True``) gets ``(image, mask)``. A plain callable
    (e.g. a timm transform) only sees the image, so it cannot keep a mask aligned: that raises.
    ``None`` only converts to tensors. ``mask``: PIL / array / tensor [H, W], non-zero = object.
    Returns ``(image float32 [3, H, W], mask bool [H, W] | None)``.
    """
    if getattr(transform, "joint", False):
        return transform(image, mask)
    if transform is not None and mask is not None:
        raise TypeError("a dataset with masks needs a JointTransform (see circuits.data.transform_for) "
                        "so the mask gets the same resize / crop as the image")
    out = to_tensor_image(image if transform is None else transform(image))
    return out, (None if mask is None else torch.from_numpy(np.asarray(mask) != 0))


def collate_samples(batch: Sequence[dict | Skipped | None]) -> dict | None:
    """Stack a list of items into a batch, dropping unreadable ones.

    Returns ``{"image": [B, 3, H, W], "label": long [B], "index": long [B], "path": list[str],
    "mask": bool [B, H, W] (if items have it), ..., "skipped": list[int]}`` where ``skipped``
    holds the dataset indices of dropped items (-1 for a bare ``None``, which carries no index;
    loaders from ``make_loader`` always know it). Returns ``None`` if every item was bad, so a
    loop must ``continue`` on ``None`` (those indices are then only in ``dataset.skipped`` /
    the log).
    """
    good = [b for b in batch if isinstance(b, dict)]
    skipped = [b.index if isinstance(b, Skipped) else -1 for b in batch if not isinstance(b, dict)]
    if not good:
        return None
    out = default_collate(good)  # tensors stacked, ints -> long tensors, strings -> lists
    out["skipped"] = skipped
    return out


class IndexOnSkip(Dataset):
    """Wraps a dataset so ``None`` becomes ``Skipped(index, ...)``: the collate can then report it.

    Runs inside the worker process, where the dataset's own ``skipped`` entry was just appended.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | Skipped:
        item = self.dataset[index]
        if item is not None:
            return item
        log = getattr(self.dataset, "skipped", None) or [(index, "", "")]
        _, path, message = log[-1] if log[-1][0] == index else (index, "", "")
        return Skipped(int(index), path, message)


def make_loader(dataset: Dataset, batch_size: int, num_workers: int = 0,
                limit: int | None = None, start: int = 0) -> DataLoader:
    """DataLoader over items ``start .. min(len(dataset), limit) - 1`` in order, batched with
    ``collate_samples`` (batches may be smaller than ``batch_size`` or ``None``, see there).

    ``limit`` is an end index (exclusive), not a count.
    """
    stop = len(dataset) if limit is None else min(len(dataset), int(limit))
    subset = Subset(IndexOnSkip(dataset), range(int(start), stop))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=collate_samples)


def stratified_order(labels, seed: int = 0) -> list[int]:
    """Every index once, ordered so that any first N spread over the classes: each class's
    indices shuffled (seeded), then taken round-robin over the classes (sorted). The first N of
    this order is a class-stratified sample, and a larger N extends a smaller one."""
    import numpy as np

    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    queues = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    order: list[int] = []
    for rank in range(max((len(q) for q in queues), default=0)):
        order += [int(q[rank]) for q in queues if rank < len(q)]
    return order
