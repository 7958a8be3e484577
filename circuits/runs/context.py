"""The one preamble of every dataset-level run: settings with the model fingerprint and the
dataset description, how many items, the resumable store, batches on the model's device,
and the run's summary written atomically. Under torchrun each rank's `Run` streams its own
shard of the pending items (`circuits.runs.distributed`, applied in `stream_pending`).

    run = start_run("identify", model, dataset, out_dir, limit=limit, overwrite=overwrite, k=5)
    for batch in run.batches(batch_size=32):
        images = run.images(batch)
        batch.save(tables)
    run.finish(summary)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import Dataset

from circuits.runs.results import RunStore
from circuits.runs.streaming import PendingBatch, describe_dataset, model_fingerprint, stream_pending
from hooked_vit import HookedViT
from hooked_vit.errors import UserError
from hooked_vit.tokens import token_labels


def run_size(dataset: Dataset, limit: Optional[int]) -> int:
    """How many items a run covers: `limit` of them (all when None); a limit below 1 is refused."""
    check_count(limit, "limit", allow_none=True)
    return len(dataset) if limit is None else min(limit, len(dataset))


LIMIT_SAMPLE = "stratified by class, seed 0"  # how --limit picks files, recorded in the settings


def _is_file_dataset(dataset: Dataset) -> bool:
    from circuits.data import ImageFolderDataset, ImageNetS
    from circuits.data.video import VideoFolderDataset

    return isinstance(dataset, (ImageFolderDataset, ImageNetS, VideoFolderDataset))


def limited_sample(dataset: Dataset, n: int) -> list[int]:
    """The `n` items a limited run over image files covers: stratified over the classes,
    seeded (`circuits.data.samples.stratified_order`), in index order."""
    from circuits.data.samples import stratified_order
    from circuits.probes import dataset_labels

    return sorted(stratified_order(dataset_labels(dataset), seed=0)[:n])


def check_count(value, name: str, low: int = 1, allow_none: bool = False) -> None:
    """Refuse a count option that is not a whole number >= low (a negative limit would run nothing)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{name}={value!r}: give a whole number >= {low}")


@dataclass
class Run:
    """A started run: its store, the model and data, and the number of items covered."""

    analysis: str
    store: RunStore
    model: HookedViT
    dataset: Dataset
    n: int
    num_workers: int = 0
    progress: bool = True
    indices: Optional[Sequence[int]] = None  # the items covered, when not the first `n`

    def batches(self, batch_size: int, desc: Optional[str] = None) -> Iterator[PendingBatch]:
        """The not-yet-done batches of the run's items (the first `n`, or `indices`)."""
        items = self.n if self.indices is None else self.indices
        return stream_pending(self.store, self.dataset, items, batch_size=batch_size, num_workers=self.num_workers,
                              desc=desc or self.analysis, progress=self.progress)

    def images(self, batch: PendingBatch) -> torch.Tensor:
        """The batch's images on the model's device, in its parameter dtype."""
        return self.model.to_input(batch.data["image"])

    @property
    def root(self) -> Path:
        return self.store.root

    def finish(self, summary: Any) -> RunStore:
        """Write summary.json (atomically) and return the store."""
        self.store.write_json("summary.json", summary)
        return self.store


def start_run(analysis: str, model: HookedViT, dataset: Dataset, out_dir: str | Path, *, limit: Optional[int] = None,
              overwrite: bool = False, num_workers: int = 0, progress: bool = True,
              settings: Optional[dict[str, Any]] = None, indices: Optional[Sequence[int]] = None,
              **analysis_settings: Any) -> Run:
    """Open (or resume) the run directory of `analysis` with its full settings.

    analysis_settings: what determines this analysis' results; settings: the caller's extra
    settings, recorded too (and checked on resume).
    """
    n = run_size(dataset, limit)
    check_count(num_workers, "num_workers", low=0)
    if indices is None and n < len(dataset) and _is_file_dataset(dataset):
        # Files are listed class by class: the first N would be one or two classes (issue 23 item 16).
        indices = limited_sample(dataset, n)
        settings = {**(settings or {}), "limit_sample": LIMIT_SAMPLE}
    run_settings = {"analysis": analysis, "model": model.cfg.model_name, "weights": model_fingerprint(model),
                    "dataset": describe_dataset(dataset), "n": n, **analysis_settings, **(settings or {})}
    store = RunStore(out_dir, run_settings, overwrite=overwrite)
    # What class ids and token positions mean, for the report's labels; outside the settings (names, not results).
    store.write_json("labels.json", run_labels(model))
    return Run(analysis, store, model, dataset, n, num_workers=num_workers, progress=progress,
               indices=None if indices is None else list(indices))


def run_labels(model: HookedViT) -> dict[str, Any]:
    """The model's class names and token position names, as the report reads them (labels.json);
    a video model's time layout too (num_frames, n_time: the frames of its thumbnail strips)."""
    cfg = model.cfg
    labels = {"label_names": cfg.label_names, "class_names": cfg.class_names, "n_classes": cfg.n_classes,
              "grid": list(cfg.grid_size), "tokens": token_labels(model)}
    if cfg.is_video:
        labels.update(num_frames=cfg.num_frames, n_time=cfg.n_time)
    return labels
