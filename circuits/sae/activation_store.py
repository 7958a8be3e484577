"""Activations of hook points over a dataset: sharded on disk (resumable, atomic) or on the fly.

On disk: one safetensors shard per batch of images, rows shuffled within the shard (seeded),
holding one [rows, d] tensor per hook plus the rows' ``image_index`` and ``token`` position.
The run's manifest (``circuits.results.RunStore``) records which images are done; a shard is
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
from jaxtyping import Float
from safetensors.torch import load_file, save
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

# The run machinery, imported here only (the rest of circuits.sae imports it from this module).
from circuits.results import RunStore, atomic_write_bytes, atomic_write_text, read_manifest  # noqa: F401
from circuits.streaming import describe_dataset, model_fingerprint, stream_pending

TOKENS = ("all", "cls", "patch")


def token_positions(model, tokens: str) -> Tensor:
    """Positions of the residual-stream tokens kept: all, the class token, or the patches."""
    cfg = model.cfg
    if tokens == "all":
        return torch.arange(cfg.n_ctx)
    if tokens == "cls":
        if not cfg.class_token:
            raise ValueError(f"{cfg.model_name} has no class token; use tokens='patch' or 'all'")
        return torch.tensor([0])
    if tokens == "patch":
        return torch.arange(cfg.n_prefix_tokens, cfg.n_ctx)
    raise ValueError(f"tokens must be one of {TOKENS}, got {tokens!r}")


def _stop_layer(model, hooks: Sequence[str]) -> Optional[int]:
    """Blocks to run: up to the last hooked one (None when a hook is after the blocks)."""
    layers = []
    for hook in hooks:
        if not hook.startswith("blocks."):
            return None
        layers.append(int(hook.split(".")[1]))
    return max(layers) + 1


def check_hooks(model, hooks: Sequence[str]) -> None:
    missing = [h for h in hooks if h not in model.hook_dict]
    if missing or not hooks:
        raise ValueError(f"unknown hook point(s) {missing or hooks}; see model.hook_dict for the names "
                         "(e.g. blocks.2.hook_resid_post)")


@torch.no_grad()
def hook_activations(model, images: Tensor, hooks: Sequence[str], tokens: str = "all"
                     ) -> tuple[dict[str, Float[Tensor, "rows d"]], Tensor]:
    """Activations [batch * kept tokens, d] per hook, and each row's token position."""
    positions = token_positions(model, tokens).to(images.device)
    stop = _stop_layer(model, hooks)
    kwargs = {"stop_at_layer": stop} if stop is not None and stop < model.cfg.n_layers else {}
    _, cache = model.run_with_cache(images, names_filter=list(hooks), **kwargs)
    out = {}
    for hook in hooks:
        acts = cache[hook]
        if acts.ndim != 3 or acts.shape[1] != model.cfg.n_ctx:
            raise ValueError(f"{hook} is {tuple(acts.shape)}; the store takes per-token hooks [batch, tokens, d]")
        out[hook] = acts[:, positions].reshape(-1, acts.shape[-1]).float().cpu()
    return out, positions.repeat(images.shape[0]).cpu()


def build_activation_store(model, dataset: Dataset, out: str | Path, hooks: Sequence[str], *,
                           tokens: str = "all", batch_size: int = 32, limit: Optional[int] = None,
                           seed: int = 0, num_workers: int = 0, overwrite: bool = False,
                           progress: bool = True) -> "ActivationStore":
    """Write the activations of `hooks` over `dataset` (or its first `limit` items) to `out`."""
    hooks = list(hooks)
    check_hooks(model, hooks)
    token_positions(model, tokens)  # refuse a bad `tokens` before any work
    n = len(dataset) if limit is None else min(limit, len(dataset))
    settings = {"analysis": "sae_activations", "model": model.cfg.model_name,
                "fingerprint": model_fingerprint(model), "dataset": describe_dataset(dataset), "n": n,
                "hooks": hooks, "tokens": tokens, "seed": seed}
    store = RunStore(out, settings, overwrite=overwrite)
    if overwrite:
        for shard in (store.root / "shards").glob("shard-*.safetensors"):
            shard.unlink()
    _drop_orphan_shards(store.root)
    device = next(model.parameters()).device
    for batch in stream_pending(store, dataset, n, batch_size=batch_size, num_workers=num_workers,
                                desc="activations", progress=progress):
        images = batch.data["image"].to(device)
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


def _drop_orphan_shards(root: Path) -> None:
    """Shards whose batch was never marked done (a killed run) are removed and redone."""
    parts = {p.stem.removeprefix("part-") for p in (root / "shards").glob("part-*.parquet")}
    for shard in (root / "shards").glob("shard-*.safetensors"):
        if shard.stem.removeprefix("shard-") not in parts:
            shard.unlink()


class ActivationStore:
    """A finished (or partial) store on disk; `batches` streams shuffled rows."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / "manifest.json").exists():
            raise FileNotFoundError(f"no activation store at {self.root}; build one with build_activation_store")
        self.settings = read_manifest(self.root)["settings"]
        if self.settings.get("analysis") != "sae_activations":
            raise ValueError(f"{self.root} is a {self.settings.get('analysis')} run, not an activation store")
        _drop_orphan_shards(self.root)
        self.shards = sorted((self.root / "shards").glob("shard-*.safetensors"))
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
            raise ValueError(f"{self.root} holds no shards yet; build the store first")
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


def _rows(shard: Path) -> int:
    header_len = int.from_bytes(shard.open("rb").read(8), "little")
    with shard.open("rb") as f:
        f.seek(8)
        header = json.loads(f.read(header_len))
    return header["token"]["shape"][0]


def stream_activations(model, dataset: Dataset, hooks: Sequence[str], batch_size: int, *, tokens: str = "all",
                       image_batch: int = 32, buffer_rows: int = 65536, seed: int = 0,
                       num_workers: int = 0) -> Iterator[dict[str, Tensor]]:
    """On the fly, no disk: one epoch of shuffled batches {hook: [batch_size, d]} from a
    buffer of at most `buffer_rows` (+ one image batch) rows."""
    from circuits.data import collate_samples

    hooks = list(hooks)
    check_hooks(model, hooks)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=image_batch, shuffle=True, generator=gen, num_workers=num_workers,
                        collate_fn=collate_samples)
    buf: dict[str, list[Tensor]] = {h: [] for h in hooks}
    rows = 0
    for data in loader:
        if data is None:
            continue
        acts, _ = hook_activations(model, data["image"].to(device), hooks, tokens)
        for h in hooks:
            buf[h].append(acts[h])
        rows += len(acts[hooks[0]])
        if rows >= buffer_rows:
            yield from _drain(buf, batch_size, gen, keep=rows // 2)
            rows = len(buf[hooks[0]][0])
    yield from _drain(buf, batch_size, gen, keep=0)


def _drain(buf: dict[str, list[Tensor]], batch_size: int, gen: torch.Generator, keep: int):
    """Shuffle the buffer, yield all but `keep` rows, leave those (mixed with later ones)."""
    hooks = list(buf)
    cat = {h: torch.cat(buf[h]) for h in hooks}
    perm = torch.randperm(len(cat[hooks[0]]), generator=gen)
    n_out = (len(perm) - keep) // batch_size * batch_size
    for b in range(0, n_out, batch_size):
        yield {h: cat[h][perm[b:b + batch_size]] for h in hooks}
    for h in hooks:
        buf[h] = [cat[h][perm[n_out:]]]
