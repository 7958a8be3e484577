"""Activations of hook points on a batch, and shuffled batches of them streamed on the fly.

What a sparse dictionary trains on: per-token rows of any hook point (all tokens, the class
token or the patches). `circuits.runs.activation_store` writes the same rows to disk shards
for whole datasets; `stream_activations` needs no disk (memory bounded by its buffer).

Video models take clips [b, frames, c, h, w]; rows are space-time tokens (positions in
(time, row, col) order, `hooked_vit.tokens`). On divided space-time models the grouped
per-token hooks are laid back onto the token sequence (`token_activations`): the spatial
norm's `blocks.L.ln1.hook_normalized` [b, T, prefix + rows*cols, d] (a prefix token's copies
in every frame are one vector) and the temporal norm's `blocks.L.ln_time.hook_normalized`
[b, rows*cols, T, d] (patch tokens only: tokens="patch"). Per-head grouped hooks are refused.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from hooked_vit.errors import UserError


TOKENS = ("all", "cls", "patch")


def token_positions(model, tokens: str) -> Tensor:
    """Positions of the residual-stream tokens kept: all, the class token, or the patches."""
    cfg = model.cfg
    if tokens == "all":
        return torch.arange(cfg.n_ctx)
    if tokens == "cls":
        if not cfg.class_token:
            raise UserError(f"{cfg.model_name} has no class token; use tokens='patch' or 'all'")
        return torch.tensor([0])
    if tokens == "patch":
        return torch.arange(cfg.n_prefix_tokens, cfg.n_ctx)
    raise UserError(f"tokens must be one of {TOKENS}, got {tokens!r}")


def stop_kwargs(model, hooks: Sequence[str]) -> dict:
    """`stop_at_layer` for a forward that only needs `hooks`: run up to the last hooked block
    (nothing when a hook is after the blocks)."""
    layers = []
    for hook in hooks:
        if not hook.startswith("blocks."):
            return {}
        layers.append(int(hook.split(".")[1]))
    stop = max(layers) + 1
    return {"stop_at_layer": stop} if stop < model.cfg.n_layers else {}


def image_batches(dataset: Dataset, *, limit: Optional[int], batch_size: int, num_workers: int = 0) -> DataLoader:
    """The first `limit` items of `dataset` (all when None), collated in order."""
    from circuits.data import collate_samples

    n = len(dataset) if limit is None else min(limit, len(dataset))
    return DataLoader(Subset(dataset, range(n)), batch_size=batch_size, num_workers=num_workers,
                      collate_fn=collate_samples)


def check_hooks(model, hooks: Sequence[str]) -> None:
    missing = [h for h in hooks if h not in model.hook_dict]
    if missing or not hooks:
        raise UserError(f"unknown hook point(s) {missing or hooks}; see model.hook_dict for the names "
                         "(e.g. blocks.2.hook_resid_post)")


def token_activations(model, hook: str, acts: Tensor, positions: Tensor) -> Float[Tensor, "b k d"]:
    """A hook's activation at token `positions` [k]: [b, k, d]. Per-token hooks [b, n_ctx, d]
    directly; the grouped per-token hooks of divided space-time models on the token sequence."""
    cfg = model.cfg
    n, t = cfg.n_prefix_tokens, cfg.n_time
    s = cfg.grid_size[0] * cfg.grid_size[1]
    if acts.ndim == 4 and cfg.attention_type == "divided_space_time":
        temporal = ".ln_time." in hook or ".attn_time." in hook  # by name: (t, n + s) and (s, t) may coincide
        if not temporal and acts.shape[1:3] == (t, n + s):  # spatial groups: one frame each, prefix tokens in every frame
            acts = torch.cat([acts[:, 0, :n], einops.rearrange(acts[:, :, n:], "b t s d -> b (t s) d")], 1)
        elif temporal and acts.shape[1:3] == (s, t):  # temporal groups: one (row, col) each, patch tokens only
            if bool((positions < n).any()):
                raise UserError(f"{hook} holds patch tokens only (the temporal attention skips the prefix tokens); "
                                 "use tokens='patch'")
            acts = torch.cat([acts.new_zeros(acts.shape[0], n, acts.shape[-1]),
                              einops.rearrange(acts, "b s t d -> b (t s) d")], 1)
    if acts.ndim != 3 or acts.shape[1] != cfg.n_ctx:
        raise UserError(f"{hook} is {tuple(acts.shape)}; the store takes per-token hooks [batch, tokens, d]")
    return acts[:, positions]


@torch.no_grad()
def hook_activations(model, images: Tensor, hooks: Sequence[str], tokens: str = "all"
                     ) -> tuple[dict[str, Float[Tensor, "rows d"]], Tensor]:
    """Activations [batch * kept tokens, d] per hook, and each row's token position."""
    positions = token_positions(model, tokens).to(images.device)
    _, cache = model.run_with_cache(images, names_filter=list(hooks), **stop_kwargs(model, hooks))
    out = {}
    for hook in hooks:
        acts = token_activations(model, hook, cache[hook], positions)
        out[hook] = acts.reshape(-1, acts.shape[-1]).float().cpu()
    return out, positions.repeat(images.shape[0]).cpu()


def stream_activations(model, dataset: Dataset, hooks: Sequence[str], batch_size: int, *, tokens: str = "all",
                       image_batch: int = 32, buffer_rows: int = 65536, seed: int = 0,
                       num_workers: int = 0) -> Iterator[dict[str, Tensor]]:
    """On the fly, no disk: one epoch of shuffled batches {hook: [batch_size, d]} from a
    buffer of at most `buffer_rows` (+ one image batch) rows."""
    from circuits.data import collate_samples

    hooks = list(hooks)
    check_hooks(model, hooks)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=image_batch, shuffle=True, generator=gen, num_workers=num_workers,
                        collate_fn=collate_samples)
    buf: dict[str, list[Tensor]] = {h: [] for h in hooks}
    rows = 0
    for data in loader:
        if data is None:
            continue
        acts, _ = hook_activations(model, model.to_input(data["image"]), hooks, tokens)
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
