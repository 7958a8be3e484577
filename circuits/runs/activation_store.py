"""Activations of hook points over a dataset: sharded on disk (resumable, atomic) or on the fly.

On disk: one safetensors shard per batch of images, rows shuffled within the shard (seeded),
holding one [rows, d] tensor per hook plus the rows' ``image_index`` and ``token`` position.
The run's manifest (``circuits.runs.results.RunStore``) records which images are done; a shard is
written (atomically) before its images are marked done, and shards of unmarked batches are
deleted on resume, so a killed run resumes without losing or duplicating rows.

Reading mixes ``buffer_shards`` shards at a time in a seeded random order: memory is bounded
by the buffer, never by the dataset (measured in benchmarks/sae.py and tests/test_sae_store.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pyarrow as pa
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor
from torch.utils.data import Dataset

from circuits.files import atomic_write_bytes
from circuits.runs.context import start_run
from circuits.runs.results import read_manifest
from circuits.sae.activations import check_hooks, hook_activations, token_positions
from hooked_vit.errors import UserError


def build_activation_store(model, dataset: Dataset, out: str | Path, hooks: Sequence[str], *,
                           tokens: str = "all", batch_size: int = 32, limit: Optional[int] = None,
                           seed: int = 0, num_workers: int = 0, overwrite: bool = False,
                           progress: bool = True) -> "ActivationStore":
    """Write the activations of `hooks` over `dataset` (or its first `limit` items) to `out`."""
    hooks = list(hooks)
    check_hooks(model, hooks)
    token_positions(model, tokens)  # refuse a bad `tokens` before any work
    run = start_run("sae_activations", model, dataset, out, limit=limit, overwrite=overwrite, num_workers=num_workers,
                    progress=progress, hooks=hooks, tokens=tokens, seed=seed)
    store = run.store
    if store.dist.is_main:  # one process deletes; the others wait (a shard may be another rank's)
        _drop_orphan_shards(store.root)
    store.dist.barrier()
    for batch in run.batches(batch_size, desc="activations"):
        images = run.images(batch)
        acts, token = hook_activations(model, images, hooks, tokens)
        image_index = batch.data["index"].repeat_interleave(len(token) // images.shape[0])
        part = int(min(batch.data["index"]))
        order = torch.randperm(len(token), generator=torch.Generator().manual_seed(seed * 1_000_003 + part))
        tensors = {**{h: a[order].contiguous() for h, a in acts.items()},
                   "image_index": image_index[order].contiguous(), "token": token[order].contiguous()}
        atomic_write_bytes(store.root / "shards" / f"shard-{part:09d}.safetensors", save(tensors))
        batch.save({"shards": pa.table({"index": batch.data["index"].numpy(),
                                        "shard": [part] * images.shape[0]})})
    return ActivationStore(store.root)


def _shards(root: Path) -> tuple[list[Path], list[Path]]:
    """The store's shards whose batch is marked done, and the orphans of a killed run."""
    parts = {p.stem.removeprefix("part-") for p in (root / "shards").glob("part-*.parquet")}
    shards = sorted((root / "shards").glob("shard-*.safetensors"))
    done = [s for s in shards if s.stem.removeprefix("shard-") in parts]
    return done, [s for s in shards if s.stem.removeprefix("shard-") not in parts]


def _drop_orphan_shards(root: Path) -> None:
    """Shards whose batch was never marked done (a killed run) are removed and redone."""
    for shard in _shards(root)[1]:
        shard.unlink(missing_ok=True)


class ActivationStore:
    """A finished (or partial) store on disk; `batches` streams shuffled rows."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / "manifest.json").exists():
            raise FileNotFoundError(f"no activation store at {self.root}; build one with build_activation_store")
        self.settings = read_manifest(self.root)["settings"]
        if self.settings.get("analysis") != "sae_activations":
            raise UserError(f"{self.root} is a {self.settings.get('analysis')} run, not an activation store")
        self.shards = _shards(self.root)[0]  # reading never deletes: orphans may be a running build's
        self.hooks: list[str] = self.settings["hooks"]

    def __len__(self) -> int:
        return sum(_rows(s) for s in self.shards)

    def load_all(self) -> dict[str, Tensor]:
        """Every row, concatenated (for tests and small stores only)."""
        parts = [load_file(s) for s in self.shards]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}

    def batches(self, batch_size: int, *, seed: int = 0, buffer_shards: int = 8,
                hooks: Optional[Sequence[str]] = None) -> Iterator[dict[str, Tensor]]:
        """One epoch of shuffled batches {hook: [batch_size, d]}; the last partial batch is dropped."""
        if not self.shards:
            raise UserError(f"{self.root} holds no shards yet; build the store first")
        hooks = list(hooks or self.hooks)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.shards), generator=gen).tolist()
        carry: dict[str, Tensor] = {}
        for start in range(0, len(order), buffer_shards):
            loaded = [load_file(self.shards[i]) for i in order[start:start + buffer_shards]]
            buf = {h: torch.cat(([carry[h]] if carry else []) + [p[h] for p in loaded]) for h in hooks}
            perm = torch.randperm(len(buf[hooks[0]]), generator=gen)
            n_full = len(perm) // batch_size * batch_size
            for b in range(0, n_full, batch_size):
                yield {h: buf[h][perm[b:b + batch_size]] for h in hooks}
            carry = {h: buf[h][perm[n_full:]] for h in hooks}


def shard_shape(shard: Path, name: str) -> list[int]:
    """The shape of tensor `name` in a shard, from its header (nothing loaded)."""
    with safe_open(str(shard), "pt") as f:
        return f.get_slice(name).get_shape()


def _rows(shard: Path) -> int:
    return shard_shape(shard, "token")[0]
