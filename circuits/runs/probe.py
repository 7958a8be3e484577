"""Linear probes against the projection over whole datasets (Vilas et al. 2023, section 6;
docs/memories_and_probes.md): fit on training images, compare on the test images, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
from torch.utils.data import Dataset, Subset

from circuits.probes import (ProbeBatch, ProbeResults, batch_labels, dataset_labels, per_class_indices, probe_batch,
                             train_probes)
from circuits.projection import DEFAULT_SITES
from circuits.runs.distributed import require_single_process
from circuits.runs.results import RunStore, fixed_size_list, read_manifest, read_table, stack_column
from circuits.runs.context import start_run
from circuits.runs.streaming import describe_dataset
from hooked_vit import HookedViT
from hooked_vit.layers import layer_indices


def run_probes(
    model: HookedViT,
    train_dataset: Dataset,
    test_dataset: Dataset,
    out_dir: str,
    *,
    per_class: int = 10,
    alpha: float = 1.0,
    sites: Sequence[str] = DEFAULT_SITES,
    layers: Optional[Sequence[int]] = None,
    batch_size: int = 32,
    limit: Optional[int] = None,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    settings: Optional[dict[str, Any]] = None,
) -> RunStore:
    """Train probes on `per_class` images per class of `train_dataset`, then write probe and
    projection ranks of every token of the test images (resumable; probes are refitted on
    resume, deterministically). When `train_dataset is test_dataset`, the training images
    are left out of the test.

    Tables: `images` (index, label, pred, correct), `tokens` (one row per image x site x
    layer: probe_rank and projection_rank per token); `probe_training.json`.
    """
    require_single_process("probes")
    model.require_classes()  # each probe is compared with the projection onto the model's classes
    cfg = model.cfg
    layers = layer_indices(layers, cfg.n_layers, "layers")
    train_idx = per_class_indices(dataset_labels(train_dataset), per_class)
    test_idx = list(range(len(test_dataset)))
    if train_dataset is test_dataset:
        test_idx = sorted(set(test_idx) - set(train_idx))
    test_idx = test_idx if limit is None else test_idx[:limit]
    run = start_run("probes", model, test_dataset, out_dir, indices=test_idx, overwrite=overwrite,
                    num_workers=num_workers, progress=progress, settings=settings, sites=list(sites), layers=layers,
                    per_class=per_class, alpha=alpha, train_dataset=describe_dataset(train_dataset),
                    n_classes=cfg.n_classes, n_prefix_tokens=cfg.n_prefix_tokens, class_token=bool(cfg.class_token))
    store = run.store
    pending = store.pending(test_idx)
    if not pending:
        return store
    probes = train_probes(model, Subset(train_dataset, train_idx), sites=sites, layers=layers, alpha=alpha,
                          batch_size=batch_size, num_workers=num_workers, progress=progress)
    store.write_json("probe_training.json", {"n_train": probes.n_train, "per_class": per_class, "alpha": alpha,
                                             "train_indices": train_idx})
    for batch in run.batches(batch_size):
        images = run.images(batch)
        result = probe_batch(model, probes, images, batch_labels(batch.data))
        batch.save(batch_tables(result, batch.data))
    return store


def batch_tables(result: ProbeBatch, batch: dict) -> dict[str, pa.Table]:
    b, n_sites, n_layers, n_tok = result.probe_rank.shape
    index = np.asarray(batch["index"], dtype=np.int64)
    pred = result.logits.argmax(-1).cpu().numpy().astype(np.int64)
    label = np.asarray(batch["label"], dtype=np.int64)
    images = pa.table({"index": index, "label": label, "pred": pred, "correct": pred == label})
    tokens = pa.table({
        "index": np.repeat(index, n_sites * n_layers),
        "site": pa.array(np.tile(np.repeat(np.array(result.sites, dtype=object), n_layers), b)).dictionary_encode(),
        "layer": np.tile(np.array(result.layers, dtype=np.int16), b * n_sites),
        "probe_rank": fixed_size_list(result.probe_rank.reshape(-1, n_tok).cpu().numpy().astype(np.int32)),
        "projection_rank": fixed_size_list(result.projection_rank.reshape(-1, n_tok).cpu().numpy().astype(np.int32)),
    })
    return {"images": images, "tokens": tokens}


# ------------------------------------------------------------------ results and summaries
def load_probe_results(run_dir: str | Path) -> ProbeResults:
    """Read a run directory written by `run_probes` into dense arrays."""
    settings = read_manifest(run_dir)["settings"]
    tokens = read_table(run_dir, "tokens")
    order = {s: i for i, s in enumerate(settings["sites"])}
    tokens = tokens.assign(site_i=tokens["site"].astype(str).map(order)).sort_values(
        ["index", "site_i", "layer"], kind="stable")
    shape = (-1, len(settings["sites"]), len(settings["layers"]), stack_column(tokens.head(1), "probe_rank").shape[1])
    return ProbeResults(settings, read_table(run_dir, "images"),
                        stack_column(tokens, "probe_rank").reshape(shape),
                        stack_column(tokens, "projection_rank").reshape(shape))
