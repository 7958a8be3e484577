"""Dataset-level benchmark of explanation methods: one resumable run, one table.

`benchmark(model, dataset, out_dir, methods)` streams the dataset and writes, per batch
(`circuits.runs.results.RunStore`, parquet parts, resumable):

| table | one row per | columns |
|---|---|---|
| images | image | index, label, target, pred, correct |
| maps | image x method | method, relevance [n_patches] |
| segmentation | image x method (datasets with masks) | correct, labeled, inter/union bg/fg, ap |
| perturbation | image x method x order | order, correct [steps] (top-1 correct after each step) |
| thumbnails | the first few images | height, width, pixels (uint8 RGB, for the report) |

`summarize_benchmark(out_dir)` reduces them to one row per method with pixel accuracy,
mIoU, mAP, positive / negative AUC and Vilas et al.'s keep-AUCs; `benchmark` also writes
it to summary.json, and the randomisation check (optional) to sanity.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Collection, Literal, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from circuits.data import make_loader
from circuits.explain.evaluate import (FRACTIONS, auc, keep_auc, perturbation_curve, randomization_check,
                                       segmentation_counts, segmentation_scores)
from circuits.explain.methods import DEFAULT_METHODS, _as_specs, explain_many, grid_of, upsample
from circuits.data.targets import TargetSpec, resolve_targets
from circuits.runs.identify import class_name_columns
from circuits.arrays import to_numpy
from circuits.runs.context import start_run
from circuits.runs.thumbnails import batch_thumbnails, thumbnail_indices
from circuits.runs.results import RunStore, fixed_size_list, read_manifest, read_table, stack_column
from hooked_vit import HookedViT
from hooked_vit.errors import UserError


def benchmark(
    model: HookedViT,
    dataset: Dataset,
    out_dir: str | Path,
    methods: Sequence[str] = DEFAULT_METHODS,
    *,
    batch_size: int = 32,
    limit: Optional[int] = None,
    fractions: Sequence[float] = FRACTIONS,
    mode: Literal["remove", "zero"] = "remove",
    target: TargetSpec | str = "label",
    thumbnails: int = 4,
    sanity_images: int = 0,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    settings: Optional[dict[str, Any]] = None,
) -> RunStore:
    """Explain every image with every method and run the segmentation (when the dataset
    has masks) and perturbation tests; resumable. See the module doc for the tables.

    Args:
        methods: method names or "name:key=value" specs (each spec is its own row).
        target: the class explained (`circuits.data.targets`: "label", "predicted" or a class);
            accuracy in the perturbation test is always against the label.
        mode: perturbation by dropping tokens ("remove") or zeroing pixels ("zero").
        thumbnails: keep N images spread over the classes (uint8) for the report's overlays.
        sanity_images: run the randomisation check on the first N images (0: skip).
    """
    _as_specs(methods)  # fail early on an unknown method
    target = TargetSpec.of(target, model)
    run = start_run("explain", model, dataset, out_dir, limit=limit, overwrite=overwrite, num_workers=num_workers,
                    progress=progress, settings=settings, methods=list(methods), fractions=list(fractions),
                    mode=mode, target=str(target), grid=list(model.cfg.grid_size), n_classes=model.cfg.n_classes,
                    thumbnails=thumbnails, sanity_images=sanity_images)
    store = run.store
    keep = thumbnail_indices(dataset, run.n if run.indices is None else run.indices, thumbnails)
    for batch in run.batches(batch_size):
        batch.save(benchmark_batch(model, batch.data, methods, fractions=fractions, mode=mode, target=target,
                                   thumbnails=keep))
    if sanity_images and not (store.root / "sanity.json").exists():
        store.write_json("sanity.json", sanity_rows(model, dataset, methods, sanity_images, progress))
    return run.finish(summarize_benchmark(store.root).to_dict(orient="records"))


def benchmark_batch(model: HookedViT, batch: dict, methods: Sequence[str], *, fractions=FRACTIONS,
                    mode="remove", target="label", thumbnails: int | Collection[int] = 0) -> dict[str, pa.Table]:
    """The tables of one batch (see the module doc)."""
    if model.cfg.is_video:
        raise UserError(f"the explanation benchmark run stores one image grid per map; {model.cfg.model_name} is a video "
                         "model: use circuits.explain.explain (space-time volumes [b, T, rows, cols]) instead")
    images = model.to_input(batch["image"])
    labels = torch.as_tensor(batch["label"]).to(model.device)
    index = np.asarray(batch["index"], dtype=np.int64)
    if bool((labels < 0).any()):
        raise UserError("the explanation benchmark needs class labels (perturbation accuracy); "
                         f"images {index[(labels < 0).cpu().numpy()].tolist()[:5]} have none")
    with torch.no_grad():
        logits = model(images)
    pred = logits.argmax(-1)
    targets = resolve_targets(TargetSpec.of(target, model), labels, logits)
    seed = int(index[0])  # random maps and tie-breaking: fixed per batch, so reruns agree
    specs = _as_specs(methods)
    maps = explain_many(model, images, targets, {label: ({**opts, "seed": seed} if name == "random" else opts)
                                                 for label, (name, opts) in specs.items()})
    names = class_name_columns(model, targets.cpu().numpy(), pred.cpu().numpy())
    tables = {"images": pa.table({"index": index, "label": labels.cpu().numpy(), "target": targets.cpu().numpy(),
                                  "pred": pred.cpu().numpy(), "correct": (pred == labels).cpu().numpy(), **names})}
    tables["maps"] = _per_method(index, {m: {"relevance": fixed_size_list(to_numpy(r))} for m, r in maps.items()})
    if "mask" in batch and bool(torch.as_tensor(batch.get("has_mask", True)).any()):
        tables["segmentation"] = _segmentation_table(model, images, batch, index, maps)
    rows = []
    for m, r in maps.items():
        for order in ("positive", "negative"):
            correct = perturbation_curve(model, images, labels, r, order=order, fractions=fractions, mode=mode, seed=seed,
                                         unperturbed=pred == labels)
            rows.append(pa.table({"index": index, "method": [m] * len(index), "order": [order] * len(index),
                                  "correct": fixed_size_list(correct.numpy())}))
    tables["perturbation"] = pa.concat_tables(rows)
    tables.update(batch_thumbnails(model, batch, thumbnails))
    return tables


def _segmentation_table(model: HookedViT, images, batch: dict, index: np.ndarray, maps: dict) -> pa.Table:
    """Segmentation counts of every method, for the images that have a mask."""
    has = torch.as_tensor(batch.get("has_mask", torch.ones(len(index), dtype=torch.bool))).bool()
    grid = grid_of(model.cfg, images)
    return _per_method(index[has.numpy()], {
        m: segmentation_counts(upsample(r[has.to(r.device)], images.shape[-2:], grid), batch["mask"][has])
        for m, r in maps.items()})


def _per_method(index: np.ndarray, columns: dict[str, dict]) -> pa.Table:
    """Stack per-method column dicts into one table with index and method columns."""
    parts = []
    for method, cols in columns.items():
        data = {"index": index, "method": [method] * len(index)}
        data.update({k: v for k, v in cols.items()})
        parts.append(pa.table(data))
    return pa.concat_tables(parts)


def sanity_rows(model: HookedViT, dataset: Dataset, methods: Sequence[str], n: int, progress: bool = False) -> list[dict]:
    """The randomisation check on the first n images (labels as targets); 'random' is skipped."""
    batch = next(iter(make_loader(dataset, n, limit=n)))
    checked = [m for m in methods if not m.startswith("random")]
    return randomization_check(model, model.to_input(batch["image"]), torch.as_tensor(batch["label"]).to(model.device),
                               checked, progress=progress)


def summarize_benchmark(run_dir: str | Path) -> pd.DataFrame:
    """One row per method: segmentation scores (with masks), perturbation AUCs, keep-AUCs.

    positive_auc: most relevant removed first (lower is better); negative_auc: least
    relevant first (higher is better); keep_auc_*: Vilas et al.'s normalisation of the same
    curves (keep_auc_most = keep the most important = the negative curve).
    """
    run_dir = Path(run_dir)
    fractions = read_manifest(run_dir)["settings"]["fractions"]
    pert = read_table(run_dir, "perturbation")
    has_seg = any((run_dir / "segmentation").glob("part-*.parquet"))
    seg = read_table(run_dir, "segmentation") if has_seg else None
    rows = []
    for method in dict.fromkeys(pert["method"]):  # first-seen order
        row: dict[str, Any] = {"method": method}
        if seg is not None:
            row.update(segmentation_scores({c: s.to_numpy() for c, s in seg[seg["method"] == method].items()
                                            if c not in ("index", "method")}))
        for order in ("positive", "negative"):
            sel = pert[(pert["method"] == method) & (pert["order"] == order)]
            acc = stack_column(sel, "correct").mean(0)
            row[f"{order}_auc"] = auc(acc, fractions)
            row[f"keep_auc_{'least' if order == 'positive' else 'most'}"] = keep_auc(acc)
            row[f"{order}_curve"] = acc.tolist()
        rows.append(row)
    return pd.DataFrame(rows)


def load_maps(run_dir: str | Path) -> dict[str, np.ndarray]:
    """method -> relevance [n_images, n_patches], images in index order."""
    maps = read_table(run_dir, "maps")
    return {m: stack_column(maps[maps["method"] == m], "relevance") for m in dict.fromkeys(maps["method"])}
