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
from dataclasses import dataclass
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
STANDARD_KEYS = frozenset({"image", "label", "index", "path", "mask", "skipped", "has_mask"})


@dataclass
class PendingBatch:
    data: dict  # the collated readable items
    indices: list[int]  # every dataset index this batch covered, readable or not
    store: RunStore
    dataset: Dataset

    def save(self, tables: dict[str, pa.Table]) -> None:
        """Write this batch's tables and mark all its indices done."""
        readable = {int(i) for i in self.data["index"]}
        skipped = skip_records(self.dataset, sorted(set(self.indices) - readable))
        self.store.write_batch(min(readable), tables, self.indices, skipped)

    def scalar_metadata(self) -> dict[str, torch.Tensor]:
        """Per-image scalar fields beyond the standard ones (e.g. background, group)."""
        return {k: v for k, v in self.data.items()
                if k not in STANDARD_KEYS and torch.is_tensor(v) and v.ndim == 1}


def stream_pending(store: RunStore, dataset: Dataset, indices: int | Sequence[int], *, batch_size: int,
                   num_workers: int = 0, desc: str = "", progress: bool = True) -> Iterator[PendingBatch]:
    """Batches of the items in `indices` (or range(indices)) that `store` has not done yet;
    under torchrun only this rank's shard (`circuits.runs.distributed.shard_batches`). When
    the loop ends every rank has finished and `store.done` holds all ranks' items."""
    from circuits.data import collate_samples

    indices = range(indices) if isinstance(indices, int) else indices
    blocks = shard_batches(indices, store.done, batch_size, store.dist)
    loader = DataLoader(dataset, batch_sampler=blocks, num_workers=num_workers, collate_fn=collate_samples)
    rank = f" [rank {store.dist.rank}/{store.dist.world}]" if store.dist.world > 1 else ""
    bar = tqdm(loader, desc=f"{desc} -> {store.root}{rank}", unit="batch", disable=not progress or not blocks)
    for covered, data in zip(blocks, bar):
        if data is None:  # every item of the batch was unreadable
            store.write_batch(covered[0], {}, covered, skip_records(dataset, covered))
            continue
        yield PendingBatch(data, covered, store, dataset)
    store.dist.barrier()  # summaries after the loop read every shard's parts
    store.reload()


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
    describe = getattr(dataset, "describe", None)
    if callable(describe):
        return str(describe())
    attrs = {k: getattr(dataset, k) for k in ("root", "seed", "split", "n", "spurious_corr") if hasattr(dataset, k)}
    return f"{type(dataset).__name__}(len={len(dataset)}, {attrs})"


def skip_records(dataset: Dataset, indices: Sequence[int]) -> list[dict]:
    """Records of unreadable items, with the dataset's own reason where it kept one."""
    reasons = {int(i): (path, err) for i, path, err in getattr(dataset, "skipped", [])}
    records = []
    for i in indices:
        path, err = reasons.get(int(i), ("", "unreadable item"))
        log.warning("skipped item %d %s: %s", i, path, err)
        records.append({"index": int(i), "path": str(path), "reason": str(err)})
    return records
