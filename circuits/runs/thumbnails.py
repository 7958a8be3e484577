"""Thumbnails: some of a run's images (spread over its classes, `thumbnail_indices`) kept as uint8 RGB (model normalisation undone), so the report
and notebooks can draw token maps over the image they belong to.

Table ``thumbnails``: index, height, width, pixels (uint8 RGB, flattened).
"""

from __future__ import annotations

from pathlib import Path
from typing import Collection, Sequence

import einops
import numpy as np
import pyarrow as pa
import torch

from circuits.plot import display_rgb
from circuits.runs.results import fixed_size_list, read_table
from hooked_vit import HookedViT


def thumbnail_table(model: HookedViT, images: torch.Tensor, index: np.ndarray) -> pa.Table:
    """Preprocessed images [b, 3, H, W] back to uint8 RGB with the model's normalisation undone;
    clips [b, T, 3, H, W] (video models) as a strip of their frames, left to right [b, 3, H, T * W]."""
    if images.ndim == 5:
        images = einops.rearrange(images, "b t c h w -> b c h (t w)")
    pixels = display_rgb(model, images)
    return pa.table({"index": np.asarray(index, dtype=np.int64), "height": np.full(len(index), pixels.shape[1]),
                     "width": np.full(len(index), pixels.shape[2]), "pixels": fixed_size_list(pixels)})


def thumbnail_indices(dataset, items: int | Sequence[int], n: int) -> set[int] | int:
    """The run's images to keep thumbnails of: `n` spread over the classes (round-robin, each
    class's first images in run order), so a report over an ImageFolder sorted by class does
    not show one class only; where labels cannot be read without decoding, the first `n` (an int)."""
    from circuits.probes import dataset_labels

    items = list(range(items)) if isinstance(items, int) else list(items)
    labels = dataset_labels(dataset, decode=False) if n > 0 else None
    if labels is None or len(labels) < (max(items) + 1 if items else 0):
        return n
    by_class: dict[int, list[int]] = {}
    for i in items:
        by_class.setdefault(int(labels[i]), []).append(i)
    queues, chosen = list(by_class.values()), []
    for rank in range(max((len(q) for q in queues), default=0)):
        chosen += [q[rank] for q in queues if rank < len(q)]
        if len(chosen) >= n:
            break
    return set(chosen[:n])


def batch_thumbnails(model: HookedViT, batch: dict, keep: int | Collection[int]) -> dict[str, pa.Table]:
    """``{"thumbnails": table}`` for the batch's images in `keep` (an int: index < keep), else ``{}``."""
    index = np.asarray(batch["index"], dtype=np.int64)
    keep = index < keep if isinstance(keep, int) else np.isin(index, np.fromiter(keep, dtype=np.int64))
    if not keep.any():
        return {}
    return {"thumbnails": thumbnail_table(model, batch["image"][torch.from_numpy(keep)], index[keep])}


def read_thumbnails(run_dir: str | Path) -> dict[int, np.ndarray]:
    """image index -> uint8 RGB [H, W, 3]; empty when the run kept none."""
    if not any((Path(run_dir) / "thumbnails").glob("part-*.parquet")):
        return {}
    table = read_table(run_dir, "thumbnails")
    return {int(r["index"]): np.asarray(r["pixels"], dtype=np.uint8).reshape(int(r["height"]), int(r["width"]), 3)
            for r in table.to_dict("records")}
