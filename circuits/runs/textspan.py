"""TextSpan over a dataset: which texts each attention head's output spans.

Gandelsman, Efros & Steinhardt 2024, "Interpreting CLIP's Image Representation via
Text-Based Decomposition" (https://arxiv.org/abs/2310.05916), sec. 4.1, with
`circuits.text_span`: every image's direct contribution of each head of `layers` to the
image embedding is streamed into the run directory (table `heads`, one row per image:
index and the contributions [L * H * d_embed], resumable), then `text_span` runs per head
over all images and writes

- `textspan.parquet`: layer, head, rank, text, explained_variance (the fraction of the
  head's variance over the images that the text's direction explains, after the earlier
  ranks were projected out), and
- `summary.json`: per head its texts and their total explained variance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from circuits.runs.context import start_run
from circuits.runs.results import RunStore, atomic_write_bytes, fixed_size_list, read_table, stack_column
from circuits.text_span import check_text_span_model, head_contributions, text_span
from hooked_vit import HookedViT
from hooked_vit.errors import UserError
from hooked_vit.layers import layer_index

COLUMNS = ["layer", "head", "rank", "text", "explained_variance"]


def textspan_run(
    model: HookedViT,
    dataset,
    out_dir: str | Path,
    texts: Sequence[str],
    text_directions: torch.Tensor,
    *,
    layers: Optional[Sequence[int]] = None,
    k: int = 5,
    batch_size: int = 32,
    limit: Optional[int] = None,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    settings: Optional[dict[str, Any]] = None,
) -> RunStore:
    """Stream head contributions of `dataset` into `out_dir`, then TextSpan every head.

    texts / text_directions: the pool of prompts and their embeddings [T, d_embed]
    (`circuits.decomposition.align.clip_text_directions`). layers: default the last four.
    """
    layers = _check(model, texts, text_directions, layers, k)
    run = start_run("textspan", model, dataset, out_dir, limit=limit, overwrite=overwrite, num_workers=num_workers,
                    progress=progress, settings=settings, texts=list(texts), layers=layers, k=k)
    if run.n < 2:  # before any work (unreadable images are checked again after the pass)
        raise UserError(f"TextSpan needs the variance over at least two images; the run covers {run.n}")
    for batch in run.batches(batch_size):
        heads = head_contributions(model, run.images(batch), layers)  # [L, H, b, d]
        flat = heads.permute(2, 0, 1, 3).flatten(1).float().cpu().numpy()
        table = pa.table({"index": np.asarray(batch.data["index"], dtype=np.int64)})
        batch.save({"heads": table.append_column("contributions", fixed_size_list(flat))})
    result, n_images = span_table(run.store.root, texts, text_directions, layers, model.cfg.n_heads, k)
    atomic_write_bytes(run.store.root / "textspan.parquet", result.to_parquet(index=False))
    return run.finish(summarize(result, n_images))


def _check(model: HookedViT, texts: Sequence[str], directions: torch.Tensor, layers: Optional[Sequence[int]],
           k: int) -> list[int]:
    """Refuse bad options before the run directory is made; the layers to span."""
    width = check_text_span_model(model)
    if not texts or directions.ndim != 2 or directions.shape != (len(texts), width):
        raise UserError(f"need one text direction of width {width} per text ({len(texts)} texts), "
                         f"got {tuple(directions.shape)}: use the text tower of the same CLIP model")
    if k < 1:
        raise UserError(f"k={k}: TextSpan picks at least one text per head")
    n = model.cfg.n_layers
    layers = list(range(max(0, n - 4), n)) if layers is None else [layer_index(l, n, "layers") for l in layers]
    if not layers or len(set(layers)) != len(layers):
        raise UserError(f"layers {layers} must be distinct blocks in 0..{n - 1}")
    return layers


def span_table(root: Path, texts: Sequence[str], directions: torch.Tensor, layers: list[int], n_heads: int,
               k: int) -> tuple[pd.DataFrame, int]:
    """TextSpan of every head over the images streamed into `root` (table `heads`), and
    how many images that was."""
    heads = read_table(root, "heads")
    if len(heads) < 2:
        raise UserError(f"TextSpan needs the variance over at least two images; the run has {len(heads)}")
    contributions = torch.from_numpy(stack_column(heads, "contributions")).view(len(heads), len(layers), n_heads, -1)
    pool = directions.detach().float().cpu()  # text_span normalises the pool at every step
    rows = []
    for i, layer in enumerate(layers):
        for head in range(n_heads):
            chosen, explained = text_span(contributions[:, i, head], pool, k)
            rows += [(layer, head, rank, texts[j], e) for rank, (j, e) in enumerate(zip(chosen, explained))]
    return pd.DataFrame(rows, columns=COLUMNS), len(heads)


def summarize(table: pd.DataFrame, n_images: int) -> dict:
    """Per head: its texts in rank order and the variance they explain together."""
    heads = [{"layer": int(layer), "head": int(head), "texts": list(g["text"]),
              "explained_variance": float(g["explained_variance"].sum())}
             for (layer, head), g in table.groupby(["layer", "head"], sort=True)]
    return {"n_images": n_images, "heads": heads}
