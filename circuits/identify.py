"""Class identifiability over a whole dataset: stream batches, project, write, resume.

`identify(model, dataset, out_dir)` writes three tables (see `circuits.results`):
- images: index, path, label, target, pred, correct, object_tokens (bool per token, when
  the dataset has masks), plus any scalar metadata of the samples (e.g. background);
- tokens: one row per (index, site, layer): rank, target_logit (per token), topk
  (per token x k, flattened);
- stream: one row per (index, layer): target logit of every token before the block
  (pre) and between its sublayers (mid), for the change rates.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from circuits.projection import DEFAULT_SITES, BatchProjection, project_batch
from circuits.results import RunStore, fixed_size_list
from circuits.streaming import PendingBatch, describe_dataset, model_fingerprint, stream_pending
from hooked_vit import HookedViT



def identify(
    model: HookedViT,
    dataset: Dataset,
    out_dir: str,
    *,
    sites: Sequence[str] = DEFAULT_SITES,
    k: int = 5,
    batch_size: int = 32,
    limit: Optional[int] = None,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    fwd_hooks: Sequence = (),
    settings: Optional[dict[str, Any]] = None,
) -> RunStore:
    """Project every token of every site at every block for a dataset; resumable.

    Args:
        model: a HookedViT with a classifier head.
        dataset: items are dicts with "image", "label", "index" (and optionally "path",
            "mask" at pixel resolution).
        out_dir: the run directory. A rerun with the same settings resumes.
        limit: only the first `limit` items.
        fwd_hooks: hooks active during every forward (interventions).
        settings: extra settings recorded in the manifest (and checked on resume).
    """
    n = len(dataset) if limit is None else min(limit, len(dataset))
    run_settings = {
        "analysis": "identify", "model": model.cfg.model_name, "weights": model_fingerprint(model),
        "sites": list(sites), "k": k, "dataset": describe_dataset(dataset), "n": n,
        "n_classes": model.cfg.n_classes, "n_prefix_tokens": model.cfg.n_prefix_tokens,
        "patch_size": list(model.cfg.patch_size), **(settings or {}),
    }
    store = RunStore(out_dir, run_settings, overwrite=overwrite)
    for batch in stream_pending(store, dataset, n, batch_size=batch_size, num_workers=num_workers,
                                desc="identify", progress=progress):
        images = batch.data["image"].to(model.device, model.embed.proj.weight.dtype)
        labels = torch.as_tensor(batch.data["label"])
        targets = labels if bool((labels >= 0).all()) else None
        proj = project_batch(model, images, targets, sites=sites, k=k, fwd_hooks=fwd_hooks)
        batch.save(batch_tables(proj, batch, model))
    return store


def batch_tables(proj: BatchProjection, pending: PendingBatch, model: HookedViT) -> dict[str, pa.Table]:
    """The images, tokens and stream tables of one projected batch."""
    batch = pending.data
    b, n_sites, n_layers, n_tok = proj.rank.shape
    index = np.asarray(batch["index"], dtype=np.int64)
    images = {
        "index": index,
        "path": [str(p) for p in batch.get("path", [""] * b)],
        "label": np.asarray(batch["label"], dtype=np.int64),
        "target": proj.targets.cpu().numpy().astype(np.int64),
        "pred": proj.predictions.cpu().numpy().astype(np.int64),
    }
    images["correct"] = images["pred"] == images["label"]
    images.update({key: value.cpu().numpy() for key, value in pending.scalar_metadata().items()})
    image_table = pa.table(images)
    if "mask" in batch:
        image_table = image_table.append_column("object_tokens", fixed_size_list(object_tokens(batch["mask"], model)))

    site_col = np.repeat(np.array(proj.sites, dtype=object), n_layers)
    tokens = pa.table({
        "index": np.repeat(index, n_sites * n_layers),
        "site": pa.array(np.tile(site_col, b)).dictionary_encode(),
        "layer": np.tile(np.arange(n_layers, dtype=np.int16), b * n_sites),
        "rank": fixed_size_list(proj.rank.reshape(-1, n_tok).cpu().numpy().astype(np.int32)),
        "target_logit": fixed_size_list(proj.target_logit.reshape(-1, n_tok).float().cpu().numpy()),
        "topk": fixed_size_list(proj.topk.reshape(b * n_sites * n_layers, -1).cpu().numpy().astype(np.int32)),
    })
    stream = pa.table({
        "index": np.repeat(index, n_layers),
        "layer": np.tile(np.arange(n_layers, dtype=np.int16), b),
        "pre_target_logit": fixed_size_list(proj.pre_target_logit.reshape(-1, n_tok).float().cpu().numpy()),
        "mid_target_logit": fixed_size_list(proj.mid_target_logit.reshape(-1, n_tok).float().cpu().numpy()),
    })
    return {"images": image_table, "tokens": tokens, "stream": stream}


def object_tokens(mask: torch.Tensor, model: HookedViT) -> np.ndarray:
    """Pixel masks [b, H, W] -> per-token object flags [b, P] (prefix tokens False)."""
    from circuits.data import mask_to_token_grid

    grid = mask_to_token_grid(mask.bool(), model.cfg.patch_size)  # [b, n_patches]
    prefix = torch.zeros(grid.shape[0], model.cfg.n_prefix_tokens, dtype=torch.bool)
    return torch.cat([prefix, grid.cpu()], 1).numpy()
