"""Class identifiability over a whole dataset: stream batches, project, write, resume.

`identify(model, dataset, out_dir)` writes three tables (see `circuits.runs.results`):
- images: index, path, label, target, pred, correct, object_tokens (bool per token, when
  the dataset has masks), plus any scalar metadata of the samples (e.g. background);
- tokens: one row per (index, site, layer): rank, target_logit (per token), topk
  (per token x k, flattened);
- stream: one row per (index, layer): target logit of every token before the block
  (pre) and between its sublayers (mid), for the change rates;
- thumbnails: the first images as uint8 RGB (``circuits.runs.thumbnails``);
- attention (joint space-time video models): for the thumbnail clips, one row per (index,
  layer): the head-mean attention of one query token (``query``: the class token, else the
  centre patch of the middle time position) over every token, for the report's attention
  across frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from circuits.data.classes import class_name
from circuits.data.targets import TargetSpec, resolve_targets
from circuits.data.transforms import MaskSampling, batch_object_tokens
from circuits.projection import DEFAULT_SITES, BatchProjection, check_sites, project_batch
from circuits.identifiability import IdentifyResults
from circuits.runs.context import start_run
from circuits.runs.thumbnails import batch_thumbnails, thumbnail_indices
from circuits.runs.results import RunStore, fixed_size_list, read_manifest, read_table, stack_column
from circuits.runs.streaming import PendingBatch
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
    target: TargetSpec | str = "label",
    settings: Optional[dict[str, Any]] = None,
    thumbnails: int = 16,
    mask_sampling: MaskSampling | str | None = None,
) -> RunStore:
    """Project every token of every site at every block for a dataset; resumable.

    Args:
        model: a HookedViT with a classifier head.
        dataset: items are dicts with "image", "label", "index" (and optionally "path",
            "mask" at pixel resolution).
        out_dir: the run directory. A rerun with the same settings resumes.
        limit: only the first `limit` items.
        fwd_hooks: hooks active during every forward (interventions).
        target: which class each image is measured against (`circuits.data.targets`): "label",
            "predicted" (the model's top-1 under `fwd_hooks`, for unlabeled images) or a class.
        settings: extra settings recorded in the manifest (and checked on resume).
        thumbnails: keep N images spread over the classes (uint8, table "thumbnails") to draw maps over them.
        mask_sampling: how a patch's pixel mask becomes its object_tokens flag
            (`circuits.data.transforms.MaskSampling`: center (default), corner, majority[:t]).
    """
    target = TargetSpec.of(target, model)
    sampling = MaskSampling.parse(mask_sampling)
    check_sites(model, sites)  # before the run directory is made
    run = start_run("identify", model, dataset, out_dir, limit=limit, overwrite=overwrite, num_workers=num_workers,
                    progress=progress, settings=settings, sites=list(sites), k=k, n_classes=model.cfg.n_classes,
                    n_prefix_tokens=model.cfg.n_prefix_tokens, patch_size=list(model.cfg.patch_size),
                    target=str(target), mask_sampling=str(sampling))
    keep = thumbnail_indices(dataset, run.n if run.indices is None else run.indices, thumbnails)
    for batch in run.batches(batch_size):
        images = run.images(batch)
        labels = torch.as_tensor(batch.data["label"])
        # predicted: None lets project_batch take the top-1 of the (hooked) forward it runs anyway
        targets = None if target.needs_logits else resolve_targets(target, labels)
        proj = project_batch(model, images, targets, sites=sites, k=k, fwd_hooks=fwd_hooks)
        tables = batch_tables(proj, batch, model, sampling)
        thumbs = batch_thumbnails(model, batch.data, keep)
        if thumbs and model.cfg.is_video and model.cfg.attention_type == "joint":
            thumbs["attention"] = attention_table(model, images, batch.data, keep, fwd_hooks)
        batch.save({**tables, **thumbs})
    return run.store


def attention_query(model: HookedViT) -> int:
    """The query token of a video run's attention table: the class token, else the centre patch
    of the middle time position."""
    from hooked_vit.tokens import token_index

    cfg = model.cfg
    if cfg.class_token:
        return 0
    rows, cols = cfg.grid_size
    return token_index(model, cfg.n_time // 2, rows // 2, cols // 2)


@torch.inference_mode()
def attention_table(model: HookedViT, clips: torch.Tensor, batch: dict, keep, fwd_hooks: Sequence = ()) -> pa.Table:
    """The attention table (module doc) of the batch's clips in `keep` (the thumbnail clips),
    under the run's `fwd_hooks` (a perturbation shows in the pattern it changes)."""
    index = np.asarray(batch["index"], dtype=np.int64)
    kept = index < keep if isinstance(keep, int) else np.isin(index, np.fromiter(keep, dtype=np.int64))
    query, rows = attention_query(model), {}

    def grab(layer: int):
        def hook(pattern, hook):  # [b, h, q, k] -> the query's row, mean over heads [b, k]
            rows[layer] = pattern[:, :, query].float().mean(1).cpu()
        return hook

    grabs = [(f"blocks.{l}.attn.hook_pattern", grab(l)) for l in range(model.cfg.n_layers)]
    model.run_with_hooks(clips[torch.from_numpy(kept).to(clips.device)], fwd_hooks=[*fwd_hooks, *grabs])
    pattern = torch.stack([rows[l] for l in range(model.cfg.n_layers)], 1)  # [b, L, P]
    b, n_layers, _ = pattern.shape
    return pa.table({"index": np.repeat(index[kept], n_layers), "layer": np.tile(np.arange(n_layers, dtype=np.int16), b),
                     "query": np.full(b * n_layers, query, dtype=np.int32),
                     "pattern": fixed_size_list(pattern.reshape(b * n_layers, -1).numpy().astype(np.float32))})


def batch_tables(proj: BatchProjection, pending: PendingBatch, model: HookedViT,
                 sampling: MaskSampling | None = None) -> dict[str, pa.Table]:
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
    images.update(class_name_columns(model, images["target"], images["pred"]))
    images.update({key: value.cpu().numpy() for key, value in pending.scalar_metadata().items()})
    image_table = pa.table(images)
    if "mask" in batch:
        image_table = image_table.append_column("object_tokens", fixed_size_list(object_tokens(batch, model, sampling)))

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


def class_name_columns(model: HookedViT, target: np.ndarray, pred: np.ndarray) -> dict[str, list[str]]:
    """target_name and pred_name columns where the model names its classes (else none)."""
    if model.cfg.class_names is None and model.cfg.label_names is None:
        return {}
    return {"target_name": [class_name(model, t) for t in target], "pred_name": [class_name(model, p) for p in pred]}


def object_tokens(batch: dict, model: HookedViT, sampling: MaskSampling | str | None = None) -> np.ndarray:
    """A batch's masks -> per-token object flags [b, P] (prefix tokens False), from the source
    mask where the dataset sampled it (`circuits.data.transforms.batch_object_tokens`)."""
    cfg = model.cfg
    if cfg.is_video:  # masks [b, frames, H, W]: a token is an object token if any frame of its tubelet is
        masks = torch.as_tensor(batch["mask"]).bool()
        per_frame = batch_object_tokens({"mask": masks.flatten(0, 1)}, cfg.patch_size, sampling)  # [b * frames, s]
        grid = per_frame.view(masks.shape[0], cfg.n_time, cfg.tubelet_size, -1).any(2).flatten(1)  # [b, t * s]
    else:
        grid = batch_object_tokens(batch, cfg.patch_size, sampling)  # [b, n_patches]
    prefix = torch.zeros(grid.shape[0], cfg.n_prefix_tokens, dtype=torch.bool)
    return torch.cat([prefix, grid.cpu()], 1).numpy()


def load_results(run_dir: str | Path) -> IdentifyResults:
    """Read a run directory written by `circuits.runs.identify.identify` into dense arrays."""
    settings = read_manifest(run_dir)["settings"]
    sites = settings["sites"]
    images = read_table(run_dir, "images")
    tokens = read_table(run_dir, "tokens")
    stream = read_table(run_dir, "stream")
    n, s = len(images), len(sites)
    n_layers = int(tokens["layer"].max()) + 1
    site_order = {name: i for i, name in enumerate(sites)}
    tokens = tokens.assign(site_i=tokens["site"].astype(str).map(site_order)).sort_values(
        ["index", "site_i", "layer"], kind="stable")
    shape = (n, s, n_layers, -1)
    rank = stack_column(tokens, "rank").reshape(shape)
    k = stack_column(tokens, "topk").shape[1] // rank.shape[-1]
    obj = stack_column(images, "object_tokens").astype(bool) if "object_tokens" in images else None
    return IdentifyResults(
        sites=sites, n_classes=settings["n_classes"], n_prefix=settings["n_prefix_tokens"],
        rank=rank, target_logit=stack_column(tokens, "target_logit").reshape(shape),
        topk=stack_column(tokens, "topk").reshape(n, s, n_layers, -1, k),
        pre_target_logit=stack_column(stream, "pre_target_logit").reshape(n, n_layers, -1),
        mid_target_logit=stack_column(stream, "mid_target_logit").reshape(n, n_layers, -1),
        images=images, object_tokens=obj,
    )
