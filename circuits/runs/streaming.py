"""The loop every dataset-level analysis shares: stream not-yet-done items, save per batch;
and what identifies a run (model fingerprint, dataset description) for resuming.

    store = RunStore(out_dir, settings)
    for batch in stream_pending(store, dataset, n, batch_size=32, desc="identify"):
        tables = ...  # compute on batch.data
        batch.save(tables)

Unreadable items (datasets return None) are skipped, logged and recorded in the manifest;
a batch whose items were all unreadable is recorded and never yielded.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from circuits.runs.distributed import shard_batches
from circuits.runs.results import RunStore

log = logging.getLogger("circuits.runs.streaming")
# Keys of a collated batch that are not per-image scalar metadata.
STANDARD_KEYS = frozenset({"image", "label", "index", "path", "mask", "patch_mask", "skipped", "has_mask"})


@dataclass
class PendingBatch:
    data: dict  # the collated readable items
    indices: list[int]  # every dataset index this batch covered, readable or not
    store: RunStore
    skipped: list[dict] = field(default_factory=list)  # index, path, reason of the unreadable ones

    def save(self, tables: dict[str, pa.Table]) -> None:
        """Write this batch's tables and mark all its indices done."""
        readable = {int(i) for i in self.data["index"]}
        self.store.write_batch(min(readable), tables, self.indices, self.skipped)

    def scalar_metadata(self) -> dict[str, torch.Tensor]:
        """Per-image scalar fields beyond the standard ones (e.g. background, group)."""
        return {k: v for k, v in self.data.items()
                if k not in STANDARD_KEYS and torch.is_tensor(v) and v.ndim == 1}


def stream_pending(store: RunStore, dataset: Dataset, indices: int | Sequence[int], *, batch_size: int,
                   num_workers: int = 0, desc: str = "", progress: bool = True) -> Iterator[PendingBatch]:
    """Batches of the items in `indices` (or range(indices)) that `store` has not done yet;
    under torchrun only this rank's shard (`circuits.runs.distributed.shard_batches`). When
    the loop ends every rank has finished and `store.done` holds all ranks' items."""
    from circuits.data.samples import IndexOnSkip

    indices = range(indices) if isinstance(indices, int) else indices
    blocks = shard_batches(indices, store.done, batch_size, store.dist)
    # IndexOnSkip turns an unreadable item into its (index, path, reason) inside the worker
    # process, so the reasons reach the manifest with --workers too (a worker's own copy of
    # dataset.skipped never comes back).
    loader = DataLoader(IndexOnSkip(dataset), batch_sampler=blocks, num_workers=num_workers,
                        collate_fn=_collate_with_skips)
    rank = f" [rank {store.dist.rank}/{store.dist.world}]" if store.dist.world > 1 else ""
    bar = tqdm(loader, desc=f"{desc} -> {store.root}{rank}", unit="batch", disable=not progress or not blocks)
    # The bar first in zip: it counts a batch when asked for the next one, so it must be the
    # iterator that reaches its end (else the last batch is never counted on screen).
    for (data, skipped), covered in zip(bar, blocks):
        if data is None:  # every item of the batch was unreadable
            store.write_batch(covered[0], {}, covered, skipped)
            continue
        yield PendingBatch(data, covered, store, skipped)
    store.dist.barrier()  # summaries after the loop read every shard's parts
    store.reload()


def _collate_with_skips(items: list) -> tuple[dict | None, list[dict]]:
    """collate_samples' batch and the records of the unreadable items (the dataset has already
    logged each one, once)."""
    from circuits.data import collate_samples
    from circuits.data.samples import Skipped

    skipped = [{"index": int(s.index), "path": str(s.path), "reason": str(s.error) or "unreadable item"}
               for s in items if isinstance(s, Skipped)]
    return collate_samples(items), skipped


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the weights, so a resumed run refuses a different model."""
    h = hashlib.sha1()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            p = p.float()
            h.update(name.encode())
            h.update(np.float64([p.sum().item(), p.square().sum().item()]).tobytes())
    return h.hexdigest()[:16]


def describe_dataset(dataset: Dataset) -> str:
    """What the dataset holds, independent of where it lies: the same folder given by an absolute
    or a relative path (or copied elsewhere) describes the same. Files are described by their
    paths below the root, labels and sizes (hashed; reading every image would cost a pass)."""
    describe = getattr(dataset, "describe", None)
    if callable(describe):
        return str(describe())
    attrs = {k: getattr(dataset, k) for k in ("seed", "split", "n", "spurious_corr", "difficulty", "task", "num_frames")
             if hasattr(dataset, k)}
    if hasattr(dataset, "samples") and hasattr(dataset, "root"):
        attrs["content"] = _files_digest(Path(dataset.root), dataset.samples)
    elif isinstance(getattr(dataset, "images", None), np.ndarray):
        attrs["content"] = hashlib.sha1(np.ascontiguousarray(dataset.images).tobytes()
                                        + np.asarray(getattr(dataset, "labels", [])).tobytes()).hexdigest()[:16]
    return f"{type(dataset).__name__}(len={len(dataset)}, {attrs})"


def _files_digest(root: Path, samples: Sequence) -> str:
    """Hash of each sample's fields with paths made relative to `root` and file sizes added."""
    h = hashlib.sha1()
    root = root.resolve()
    for sample in samples:
        for field in (sample if isinstance(sample, (tuple, list)) else (sample,)):
            if isinstance(field, (str, Path)) and str(field) and Path(field).is_file():
                path = Path(field).resolve()
                rel = path.relative_to(root) if path.is_relative_to(root) else path
                field = f"{rel.as_posix()}:{path.stat().st_size}"
            h.update(str(field).encode() + b"\0")
    return h.hexdigest()[:16]
