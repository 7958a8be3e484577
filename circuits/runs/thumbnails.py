"""Thumbnails: a run's first images kept as uint8 RGB (model normalisation undone), so the report
and notebooks can draw token maps over the image they belong to.

Table ``thumbnails``: index, height, width, pixels (uint8 RGB, flattened).
"""

from __future__ import annotations

from pathlib import Path

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


def batch_thumbnails(model: HookedViT, batch: dict, keep_first: int) -> dict[str, pa.Table]:
    """``{"thumbnails": table}`` for the batch's images with index < keep_first, else ``{}``."""
    index = np.asarray(batch["index"], dtype=np.int64)
    keep = index < keep_first
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
