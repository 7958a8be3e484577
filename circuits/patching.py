"""Activation patching for images (Vilas et al. 2023; docs/interventions.md), on top of
`transformer_lens.patching`.

Patching runs the corrupted images while replacing one activation (a layer x position
[x head] cell) with its value from the clean run, and measures how far the output moves
back to the clean answer. TransformerLens's `generic_activation_patch` does the sweep;
this module supplies what images need:

- The position range. TL infers it from `corrupted_tokens.shape[-1]`, which for an image
  batch is the width in pixels, not the sequence length; HookedViT refuses TL's own position
  sweeps over raw images (they run on `model.to_tokens(images)`). Here the index table is
  built from the model's sequence length and passed to TL as `index_df`, with the images.
- TL's layer / head-only functions (`get_act_patch_attn_head_*_all_pos`,
  `get_act_patch_attn_head_all_pos_every`) work unchanged on a HookedViT.
- Image metrics against class targets: logit difference (optionally normalised as in TL's
  IOI demo: 0 = corrupted run, 1 = clean run), target logit, rank, identifiability.

Index value -1 (`ALL`) patches every position / every head at once.

Video models (docs/video.md): positions run over the space-time tokens, and a grid's
`labels` / `to_frame()["token"]` name them in time ("t3 patch (2, 5)",
`hooked_vit.tokens.token_labels`). Corruptions over time: a second clip,
`circuits.video.shuffle_frames` or `circuits.video.freeze_frames`. With divided space-time
attention only the per-token sites (resid_pre/mid/post, attn_out, mlp_out) are swept: the
head sites' hooks are grouped by frame and by (row, col) there, not [b, p, h, e].
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import pandas as pd
import torch
import transformer_lens.patching as tl_patching
from jaxtyping import Float, Int
from torch import Tensor

from circuits.arrays import to_numpy
from circuits.identifiability import identifiability as class_identifiability
from circuits.projection import class_rank
from hooked_vit import HookedViT
from hooked_vit.errors import UserError
from hooked_vit.layers import checked_index, layer_indices
from hooked_vit.tokens import token_labels

ALL = -1
VECTOR_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")  # [b, p, d]
HEAD_SITES = ("z", "q", "k", "v", "result", "pattern")  # [b, p, h, e]; pattern [b, h, q, k]
Metric = Callable[[Tensor, Tensor, Tensor], Tensor]  # (logits, clean_t, corrupted_t) -> [b]


# ------------------------------------------------------------------ metrics
def logit_diff(logits: Float[Tensor, "b c"], clean_t: Tensor, corrupted_t: Tensor) -> Tensor:
    """logit[clean target] - logit[corrupted target], per image."""
    return logits.gather(1, clean_t[:, None])[:, 0] - logits.gather(1, corrupted_t[:, None])[:, 0]


def target_logit(logits: Float[Tensor, "b c"], clean_t: Tensor, corrupted_t: Tensor) -> Tensor:
    return logits.gather(1, clean_t[:, None])[:, 0]


def rank(logits: Float[Tensor, "b c"], clean_t: Tensor, corrupted_t: Tensor) -> Tensor:
    """0-based rank of the clean target (0 = top-1)."""
    return class_rank(logits, clean_t).float()


def identifiability(logits: Float[Tensor, "b c"], clean_t: Tensor, corrupted_t: Tensor) -> Tensor:
    """Class identifiability (`circuits.identifiability.identifiability`) of the clean target."""
    return class_identifiability(rank(logits, clean_t, corrupted_t), logits.shape[-1])


METRICS: dict[str, Metric] = {"logit_diff": logit_diff, "target_logit": target_logit, "rank": rank,
                              "identifiability": identifiability}


# ------------------------------------------------------------------ patch setters
def _sel(i: int):
    return slice(None) if i == ALL else i


def _vector_setter(act: Tensor, index: Sequence[int], clean: Tensor) -> Tensor:
    """index = [layer, pos]; act [b, p, ...]."""
    s = _sel(index[1])
    act[:, s] = clean[:, s]
    return act


def _head_vector_setter(act: Tensor, index: Sequence[int], clean: Tensor) -> Tensor:
    """index = [layer, pos, head]; act [b, p, h, ...]."""
    p, h = _sel(index[1]), _sel(index[2])
    act[:, p, h] = clean[:, p, h]
    return act


def _pattern_setter(act: Tensor, index: Sequence[int], clean: Tensor) -> Tensor:
    """index = [layer, pos, head] with pos the query (destination) row; act [b, h, q, k]."""
    p, h = _sel(index[1]), _sel(index[2])
    act[:, h, p] = clean[:, h, p]
    return act


def check_grouped_sites(model: HookedViT, sites: Sequence[str]) -> None:
    """Refuse head sites on divided space-time models (their attention hooks are grouped)."""
    grouped = [s for s in sites if s in HEAD_SITES]
    if grouped and model.cfg.attention_type == "divided_space_time":
        raise UserError(f"sites {grouped} are not swept with divided space-time attention: its attention hooks are "
                         "grouped by frame / (row, col), not [batch, tokens, heads, ...]; use resid_pre/mid/post, "
                         "attn_out or mlp_out")


def _setter(site: str):
    if site in VECTOR_SITES:
        return _vector_setter
    if site == "pattern":
        return _pattern_setter
    if site in HEAD_SITES:
        return _head_vector_setter
    raise UserError(f"unknown site {site!r}; choose from {VECTOR_SITES + HEAD_SITES}")


def index_frame(model: HookedViT, site: str, n_tokens: int, layers=None, positions=None,
                heads=None) -> pd.DataFrame:
    """The cells to patch: columns layer, pos (, head) with -1 meaning "all at once".

    positions: None = every position 0..n_tokens-1 (the model's sequence length, not the
    image width), "all" = one cell for all positions, or a list of positions; heads alike.
    """
    cols = {"layer": layer_indices(layers, model.cfg.n_layers, "layers"), "pos": _axis(positions, n_tokens, "position")}
    if site in HEAD_SITES:
        cols["head"] = _axis(heads, model.cfg.n_heads, "head")
    elif heads is not None:
        raise UserError(f"heads apply to {HEAD_SITES}, not {site!r}")
    return pd.DataFrame(list(itertools.product(*cols.values())), columns=list(cols))


def _axis(choice, n: int, what: str) -> list[int]:
    if choice is None:
        return list(range(n))
    if isinstance(choice, str):
        if choice != "all":
            raise UserError(f"{what}s: expected None, 'all' or a list of indices, got {choice!r}")
        return [ALL]
    # Negative indices count from the end (never mean ALL); outside [-n, n) is refused, not wrapped.
    return list(dict.fromkeys(checked_index(i, n, what, unit=f"{what}s") for i in choice))


@contextmanager
def _attn_result(model: HookedViT, needed: bool):
    """Temporarily compute attn.hook_result (per-head outputs) when a sweep needs it."""
    old = model.cfg.use_attn_result
    model.set_use_attn_result(old or needed)
    try:
        yield
    finally:
        model.set_use_attn_result(old)


# ------------------------------------------------------------------ sweeps
def act_patch(model: HookedViT, corrupted_images: Tensor, clean_cache, metric: Callable[[Tensor], Tensor],
              site: str, index_df: Optional[pd.DataFrame] = None, *, reduce: str = "scalar",
              progress: bool = False, **axes):
    """TL-style sweep (`get_act_patch_*` signature) with the image sequence length.

    metric: logits -> scalar (reduce="scalar") or [batch] (reduce="mean"/"none").
    index_df: cells to patch (default `index_frame(model, site, n_tokens, **axes)`).
    Returns what `transformer_lens.patching.generic_activation_patch` returns for an
    `index_df`: a flat tensor over its rows (or a `PatchingResult` with reduce="none").
    """
    check_grouped_sites(model, [site])
    if index_df is None:
        n_tokens = _n_tokens(clean_cache[_act_name(site, 0)], site)
        index_df = index_frame(model, site, n_tokens, **axes)
    with _attn_result(model, site == "result"), torch.inference_mode(), _quiet_tqdm(progress):
        return tl_patching.generic_activation_patch(
            model, corrupted_images, clean_cache, metric, _setter(site), site,
            index_df=index_df, reduce=reduce)


@contextmanager
def _quiet_tqdm(progress: bool):
    """TL's sweep always draws a progress bar; silence it unless asked for."""
    if progress:
        yield
        return
    original = tl_patching.tqdm
    tl_patching.tqdm = lambda it, *a, **k: it
    try:
        yield
    finally:
        tl_patching.tqdm = original


@dataclass
class PatchingGrid:
    """Per-image patching results of one site: values [*axes, batch]."""

    site: str
    metric: str
    axes: tuple[str, ...]  # ("layer", "pos") or ("layer", "pos", "head")
    coords: dict[str, list[int]]  # index along each axis (-1 = all at once)
    values: Tensor  # [*axes, batch]
    clean: Tensor  # [batch], metric on the clean run
    corrupted: Tensor  # [batch], metric on the corrupted run
    labels: Optional[list[str]] = None  # the name of every sequence position (hooked_vit.tokens.token_labels)

    def mean(self, normalize: bool = False) -> Tensor:
        """Mean over images; normalize: (patched - corrupted) / (clean - corrupted) on the
        batch means (TL's IOI convention: 0 = corrupted, 1 = clean)."""
        mean = self.values.mean(-1)
        if not normalize:
            return mean
        corrupted, clean = self.corrupted.mean(), self.clean.mean()
        return (mean - corrupted) / (clean - corrupted)

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per cell and image (site, metric, layer, pos, [head], image, value),
        with the position's name in "token" ("all" for all positions at once)."""
        grid = list(itertools.product(*(self.coords[a] for a in self.axes), range(self.values.shape[-1])))
        df = pd.DataFrame(grid, columns=[*self.axes, "image"])
        df["value"] = to_numpy(self.values.reshape(-1))
        if self.labels is not None and "pos" in self.axes:
            df["token"] = [("all" if p == ALL else self.labels[p]) for p in df["pos"]]
        return df.assign(site=self.site, metric=self.metric)


def patch_activations(
    model: HookedViT,
    clean_images: Float[Tensor, "b c h w"],
    corrupted_images: Float[Tensor, "b c h w"],
    sites: Union[str, Sequence[str]] = ("resid_pre",),
    *,
    layers: Optional[Sequence[int]] = None,
    positions=None,
    heads=None,
    metric: Union[str, Metric] = "logit_diff",
    clean_targets: Optional[Int[Tensor, "b"]] = None,
    corrupted_targets: Optional[Int[Tensor, "b"]] = None,
    progress: bool = False,
) -> Union[PatchingGrid, dict[str, PatchingGrid]]:
    """Patch clean activations into the corrupted run, cell by cell, and measure `metric`.

    Args:
        sites: TL activation names: resid_pre/mid/post, attn_out, mlp_out (layer x pos),
            z, q, k, v, result, pattern (layer x pos x head; pattern: pos = query row).
            A single name returns one grid, a sequence a dict by site.
        layers: blocks to sweep (None = all, one at a time; negative indices allowed).
        positions, heads: None = each index separately, "all" = all at once in one cell, or a
            list of indices. Positions run over the token sequence (prefix tokens first), not
            the image width.
        metric: "logit_diff", "target_logit", "rank", "identifiability", or
            fn(logits, clean_targets, corrupted_targets) -> [batch].
        clean_targets, corrupted_targets: class per image; default each run's prediction.
    """
    fn = METRICS[metric] if isinstance(metric, str) else metric
    name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
    single = isinstance(sites, str)
    sites = [sites] if single else list(sites)
    for site in sites:
        _setter(site)
    check_grouped_sites(model, sites)
    if clean_images.shape != corrupted_images.shape:
        raise UserError(f"clean {tuple(clean_images.shape)} and corrupted {tuple(corrupted_images.shape)} differ")
    names = {model.check_hook_name(_act_name(s, l)) for s in sites for l in range(model.cfg.n_layers)}
    with _attn_result(model, "result" in sites), torch.inference_mode():
        clean_logits, cache = model.run_with_cache(clean_images, names_filter=lambda n: n in names)
        corrupted_logits = model(corrupted_images)
    clean_t = clean_logits.argmax(-1) if clean_targets is None else clean_targets.to(clean_logits.device)
    corr_t = corrupted_logits.argmax(-1) if corrupted_targets is None else corrupted_targets.to(clean_logits.device)
    batch_metric = lambda logits: fn(logits, clean_t, corr_t)  # noqa: E731
    grids = {}
    for site in sites:
        n_tokens = _n_tokens(cache[_act_name(site, 0)], site)
        index_df = index_frame(model, site, n_tokens, layers, positions, heads if site in HEAD_SITES else None)
        res = act_patch(model, corrupted_images, cache, batch_metric, site, index_df, reduce="none",
                        progress=progress)
        coords = {c: list(dict.fromkeys(index_df[c].tolist())) for c in index_df.columns}
        shape = [len(v) for v in coords.values()]
        grids[site] = PatchingGrid(site, name, tuple(coords), coords, res.values.reshape(*shape, -1).cpu(),
                                   batch_metric(clean_logits).cpu(), batch_metric(corrupted_logits).cpu(),
                                   token_labels(model) if n_tokens == model.cfg.n_ctx else None)
    return grids[sites[0]] if single else grids


def _act_name(site: str, layer: int) -> str:
    """TL's short activation name -> hook name (the name TL's sweep itself resolves)."""
    from transformer_lens.utilities import get_act_name

    return get_act_name(site, layer)


def _n_tokens(act: Tensor, site: str) -> int:
    """Sequence length of a cached activation ([b, p, ...]; pattern [b, h, q, k])."""
    return act.shape[-1] if site == "pattern" else act.shape[1]
