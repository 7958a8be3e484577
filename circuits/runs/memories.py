"""Key-value memories over a whole dataset (Vilas et al. 2023, section 5; docs/memories_and_probes.md):
stream, write per-image and per-layer tables, resume; and read a run back."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from circuits.memories import (METRICS, SUBLAYERS, TOKENS, MemoryBatch, MemoryResults, class_value_agreement, memory_bank,
                               memory_batch, random_classes, token_counts)
from circuits.data.targets import TargetSpec, resolve_targets
from circuits.runs.results import RunStore, fixed_size_list, read_manifest, read_table, stack_column
from circuits.runs.context import start_run
from circuits.runs.streaming import PendingBatch
from hooked_vit import HookedViT


def memories(
    model: HookedViT,
    dataset: Dataset,
    out_dir: str,
    *,
    sublayers: Sequence[str] = tuple(SUBLAYERS),
    k: int = 5,
    seed: int = 0,
    batch_size: int = 32,
    limit: Optional[int] = None,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    fwd_hooks: Sequence = (),
    target: TargetSpec | str = "label",
    settings: Optional[dict[str, Any]] = None,
) -> RunStore:
    """Stream a dataset through the model and write per-image, per-layer memory metrics.

    Writes (see `load_memory_results`): `images` (index, label, target, pred, correct,
    random_class, scalar metadata), `layers` (one row per image x sublayer x layer with
    token counts: cls_tokens, image_tokens and cls_/image_ + agree, agree_random, compose,
    compose_random), `usage_<sublayer>` (per batch and layer: top-k counts per memory) and
    `class_value.json` (`class_value_agreement`). Resumable like `circuits.runs.identify`.

    `target`: the class whose memories are read per image ("label", "predicted", or a fixed
    class id / name; `circuits.data.targets.TargetSpec`); "label" refuses unlabeled images.
    """
    cfg = model.cfg
    target = TargetSpec.of(target, model)
    run = start_run("memories", model, dataset, out_dir, limit=limit, overwrite=overwrite, num_workers=num_workers,
                    progress=progress, settings=settings, sublayers=list(sublayers), k=k, seed=seed,
                    n_classes=cfg.n_classes, n_prefix_tokens=cfg.n_prefix_tokens, class_token=bool(cfg.class_token),
                    target=str(target))
    store = run.store
    store.write_json("class_value.json", class_value_agreement(model, sublayers).to_dict("records"))
    banks = {s: memory_bank(model, s, k) for s in sublayers}
    for pending in run.batches(batch_size):
        batch = pending.data
        images = run.images(pending)
        logits = None
        if target.needs_logits:  # the random class is drawn relative to the target, so predict first
            with torch.inference_mode():
                logits = model.run_with_hooks(images, fwd_hooks=list(fwd_hooks)).cpu()
        targets = resolve_targets(target, torch.as_tensor(batch["label"]), logits)
        rand = random_classes(batch["index"].tolist(), targets, cfg.n_classes, seed)
        result = memory_batch(model, images, targets, rand, banks, fwd_hooks=fwd_hooks)
        pending.save(batch_tables(result, pending, model))
    return store


def batch_tables(result: MemoryBatch, pending: PendingBatch, model: HookedViT) -> dict[str, pa.Table]:
    """The images, layers and usage tables of one batch."""
    batch = pending.data
    cfg = model.cfg
    b, n_sub, n_layers, n_tok = result.agree.shape
    index = np.asarray(batch["index"], dtype=np.int64)
    images = {
        "index": index,
        "label": np.asarray(batch["label"], dtype=np.int64),
        "target": result.targets.cpu().numpy().astype(np.int64),
        "pred": result.predictions.cpu().numpy().astype(np.int64),
        "random_class": result.random_classes.cpu().numpy().astype(np.int64),
    }
    images["correct"] = images["pred"] == images["label"]
    images.update({key: value.cpu().numpy() for key, value in pending.scalar_metadata().items()})
    layers: dict[str, Any] = {
        "index": np.repeat(index, n_sub * n_layers),
        "sublayer": pa.array(np.tile(np.repeat(np.array(result.sublayers, dtype=object), n_layers), b)).dictionary_encode(),
        "layer": np.tile(np.arange(n_layers, dtype=np.int16), b * n_sub),
        "cls_tokens": np.full(b * n_sub * n_layers, int(bool(cfg.class_token)), dtype=np.int32),
        "image_tokens": np.full(b * n_sub * n_layers, n_tok - cfg.n_prefix_tokens, dtype=np.int32),
    }
    for metric in METRICS:
        counts = token_counts(getattr(result, metric), cfg.n_prefix_tokens, bool(cfg.class_token))
        for token in TOKENS:
            layers[f"{token}_{metric}"] = counts[token].reshape(-1)
    tables = {"images": pa.table(images), "layers": pa.table(layers)}
    for sublayer, counts in result.usage.items():
        tables[f"usage_{sublayer}"] = pa.table({
            "index": np.full(n_layers, index[0]), "layer": np.arange(n_layers, dtype=np.int16),
            "counts": fixed_size_list(counts.cpu().numpy()),
        })
    return tables


# ------------------------------------------------------------------ results and summaries
def load_memory_results(run_dir: str | Path) -> MemoryResults:
    """Read a run directory written by `memories`."""
    settings = read_manifest(run_dir)["settings"]
    usage = {}
    for sublayer in settings["sublayers"]:
        table = read_table(run_dir, f"usage_{sublayer}")
        counts = stack_column(table, "counts")
        usage[sublayer] = np.stack([counts[table["layer"].to_numpy() == l].sum(0)
                                    for l in range(int(table["layer"].max()) + 1)])
    layers = read_table(run_dir, "layers")
    layers["sublayer"] = layers["sublayer"].astype(str)
    class_value = pd.read_json(Path(run_dir) / "class_value.json", orient="records")
    return MemoryResults(settings, read_table(run_dir, "images"), layers, usage, class_value)
