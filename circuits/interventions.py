"""Attention perturbations as hook factories (Vilas et al. 2023, "Analyzing Vision Transformers for Image Classification in Class Embedding Space";
docs/interventions.md).

Every factory returns a TransformerLens hook function for `blocks.{l}.attn.hook_pattern`
([batch, head, query, key], after the softmax); `perturbation_hooks` places one on all or
chosen blocks, ready for `model.run_with_hooks(x, fwd_hooks=hooks)` or `identify(...,
fwd_hooks=hooks)`. Hooking the pattern switches attention to the explicit path, so the
edited pattern is what multiplies the values. Rows are never renormalised.

    self_only: every perturbed query row becomes one-hot on the diagonal, so
               z[t] = v[t] and attn_out[t] = sum_h v_h[t] W_O[h] + b_O.
    no_cls:    perturbed query rows put zero weight on the class token.
    no_cross_frame (video models, docs/video.md): perturbed query rows cannot attend to
               patch tokens of other time positions (the prefix tokens stay readable, and
               the class token's row is untouched, as for the other kinds). Unlike the two
               above it edits the scores (`attn.hook_attn_scores`, those keys at -inf), so the
               softmax renormalises over what is left: a post-softmax zeroing would still
               let the other frames in through the softmax denominator. With divided
               space-time attention the spatial attention is already within a frame, so the
               temporal attention (`attn_time.hook_attn_scores`) attends to itself only.

Which query rows are perturbed ("image tokens"): the patch tokens. The class token's own
row is never touched. Register and distillation tokens are prefix tokens, not image
tokens: their rows are left alone by default; `perturb_prefix_queries=True` perturbs every
row except the class token's. For `no_cls`, `keys="class"` (default) removes only the class
token as a key, `keys="prefix"` removes every prefix token (class, registers,
distillation), so patches read nothing from the readout/register tokens.

Positions are those of the full sequence: with token removal (`keep_mask`) the prefix
tokens must all be kept, so that patches still start at `cfg.n_prefix_tokens`.
"""

from __future__ import annotations

from typing import Callable, Literal, Optional, Sequence, Union

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from hooked_vit import HookedViT, HookedViTConfig
from hooked_vit.layers import layer_indices
from hooked_vit.errors import UserError

Hook = Callable[[Tensor, object], Tensor]
KINDS = ("none", "self_only", "no_cls")  # every model (the perturb run's default set)
VIDEO_KINDS = ("no_cross_frame",)  # video models only
TokenSet = Union[Sequence[int], slice, Tensor, None]  # indices, a slice, or a bool mask [p] / [b, p]


def _cfg(model_or_cfg: Union[HookedViT, HookedViTConfig]) -> HookedViTConfig:
    return model_or_cfg.cfg if isinstance(model_or_cfg, HookedViT) else model_or_cfg


def perturbed_queries(cfg: HookedViTConfig, n_tokens: int, perturb_prefix_queries: bool = False,
                      device: Optional[torch.device] = None) -> Bool[Tensor, "p"]:
    """Query rows a perturbation edits: patch tokens, or every token but the class token."""
    first = int(cfg.class_token) if perturb_prefix_queries else cfg.n_prefix_tokens
    return torch.arange(n_tokens, device=device) >= first


def self_only(model_or_cfg, *, perturb_prefix_queries: bool = False,
              heads: Optional[Sequence[int]] = None) -> Hook:
    """Hook for attn.hook_pattern: perturbed query rows attend only to themselves (one-hot)."""
    cfg = _cfg(model_or_cfg)

    def hook(pattern: Float[Tensor, "b h q k"], hook=None) -> Tensor:
        p = pattern.shape[-1]
        rows = perturbed_queries(cfg, p, perturb_prefix_queries, pattern.device)
        eye = torch.eye(p, dtype=pattern.dtype, device=pattern.device)
        return torch.where(_head_rows(rows, heads, pattern)[..., None], eye, pattern)

    return hook


def no_cls(model_or_cfg, *, perturb_prefix_queries: bool = False, keys: Literal["class", "prefix"] = "class",
           heads: Optional[Sequence[int]] = None) -> Hook:
    """Hook for attn.hook_pattern: perturbed query rows give zero weight to the class token.

    keys="prefix" zeroes every prefix token (class, registers, distillation) as a key.
    """
    cfg = _cfg(model_or_cfg)
    if keys == "class" and not cfg.class_token:
        raise UserError(f"{cfg.model_name} has no class token; use keys='prefix' to cut the prefix tokens")
    if keys not in ("class", "prefix"):
        raise UserError(f"keys must be 'class' or 'prefix', got {keys!r}")
    n_keys = 1 if keys == "class" else cfg.n_prefix_tokens
    if n_keys == 0:
        raise UserError(f"{cfg.model_name} has no prefix tokens (class token, registers): no_cls has no key to cut; "
                         "leave it out")

    def hook(pattern: Float[Tensor, "b h q k"], hook=None) -> Tensor:
        p = pattern.shape[-1]
        rows = perturbed_queries(cfg, p, perturb_prefix_queries, pattern.device)
        cols = torch.arange(p, device=pattern.device) < n_keys
        edges = _head_rows(rows, heads, pattern)[..., None] & cols
        return pattern.masked_fill(edges, 0.0)

    return hook


def no_cross_frame(model_or_cfg, *, perturb_prefix_queries: bool = False,
                   heads: Optional[Sequence[int]] = None) -> Hook:
    """Hook for a video model's attn.hook_attn_scores (joint attention): perturbed query rows
    cannot attend to patch tokens at another time position (scores at -inf). For divided
    space-time attention the hook is for `attn_time.hook_attn_scores` (every token attends to
    itself only); `perturbation_hooks(model, "no_cross_frame")` picks the site."""
    cfg = _cfg(model_or_cfg)
    if not cfg.is_video:
        raise UserError(f"no_cross_frame needs a video model (num_frames set); {cfg.model_name} reads images")
    if cfg.attention_type == "divided_space_time":
        return _time_self_only(heads)
    n = cfg.n_prefix_tokens
    time = torch.full((cfg.n_ctx,), -1, dtype=torch.long)  # -1: prefix tokens
    time[n:] = torch.arange(cfg.n_time).repeat_interleave(cfg.n_patches_per_frame)

    def hook(scores: Float[Tensor, "b h q k"], hook=None) -> Tensor:
        p = scores.shape[-1]
        if p != cfg.n_ctx:
            raise UserError(f"no_cross_frame needs the full token sequence ({cfg.n_ctx}), got {p} (token removal?)")
        t = time.to(scores.device)
        rows = perturbed_queries(cfg, p, perturb_prefix_queries, scores.device)
        other = (t[:, None] != t[None, :]) & (t[None, :] >= 0)  # [q, k]: a patch key at another time
        edges = _head_rows(rows, heads, scores)[..., None] & other
        return scores.masked_fill(edges, float("-inf"))

    return hook


def _time_self_only(heads: Optional[Sequence[int]]) -> Hook:
    """Hook for attn_time.hook_attn_scores [b, s, h, t, t]: every row (all are patch tokens)
    keeps only its diagonal, so no token reads another time position."""

    def hook(scores: Float[Tensor, "b s h q k"], hook=None) -> Tensor:
        t = scores.shape[-1]
        rows = torch.ones(t, dtype=torch.bool, device=scores.device)
        off = ~torch.eye(t, dtype=torch.bool, device=scores.device)
        return scores.masked_fill(_head_rows(rows, heads, scores)[..., None] & off, float("-inf"))

    return hook


def attention_edge_mask(query_tokens: TokenSet, key_tokens: TokenSet,
                        heads: Optional[Sequence[int]] = None) -> Hook:
    """Hook for attn.hook_pattern that zeroes the weights of chosen query -> key edges.

    `query_tokens`, `key_tokens`: token indices, a slice, a bool mask [p], or a bool mask
    [b, p] per image (None = all tokens). Edge (q, k) is cut when q is in the query set and
    k in the key set. `heads`: only these heads (default all). No renormalisation.
    """

    def hook(pattern: Float[Tensor, "b h q k"], hook=None) -> Tensor:
        if pattern.ndim != 4:
            raise UserError(f"attention_edge_mask edits joint attention patterns [b, h, q, k], got shape "
                             f"{tuple(pattern.shape)} (grouped attention: divided space-time models)")
        b, _, p, _ = pattern.shape
        q = token_mask(query_tokens, b, p, pattern.device)  # [b, p]
        k = token_mask(key_tokens, b, p, pattern.device)
        edges = q[:, None, :, None] & k[:, None, None, :]  # [b, 1, q, k]
        if heads is not None:
            edges = edges & _head_select(heads, pattern)[None, :, None, None]
        return pattern.masked_fill(edges, 0.0)

    return hook


def token_mask(tokens: TokenSet, batch: int, n_tokens: int, device=None) -> Bool[Tensor, "b p"]:
    """Any token set (see `attention_edge_mask`) as a bool mask [batch, n_tokens]."""
    if tokens is None:
        return torch.ones(batch, n_tokens, dtype=torch.bool, device=device)
    if isinstance(tokens, slice):
        mask = torch.zeros(n_tokens, dtype=torch.bool, device=device)
        mask[tokens] = True
        return mask.expand(batch, -1)
    tokens = torch.as_tensor(tokens, device=device)
    if tokens.dtype == torch.bool:
        if tokens.shape[-1] != n_tokens:
            raise UserError(f"token mask has {tokens.shape[-1]} tokens, the sequence has {n_tokens}")
        return tokens.expand(batch, -1) if tokens.ndim == 1 else tokens
    mask = torch.zeros(n_tokens, dtype=torch.bool, device=device)
    mask[tokens.long()] = True
    return mask.expand(batch, -1)


def _head_select(heads: Sequence[int], pattern: Tensor) -> Bool[Tensor, "h"]:
    sel = torch.zeros(pattern.shape[-3], dtype=torch.bool, device=pattern.device)  # [b, (g,) h, q, k]
    sel[list(heads)] = True
    return sel


def _head_rows(rows: Bool[Tensor, "p"], heads: Optional[Sequence[int]], pattern: Tensor) -> Tensor:
    """Rows to edit, broadcastable to [b, h, q]: [q] for all heads, [h, q] for some."""
    if heads is None:
        return rows
    return _head_select(heads, pattern)[:, None] & rows


def perturbation_hook(model: HookedViT, kind: str, **options) -> Optional[Hook]:
    """The hook of a named perturbation ("none" -> None)."""
    if kind == "none":
        return None
    if kind == "self_only":
        options.pop("keys", None)  # the key set only matters for no_cls
        return self_only(model, **options)
    if kind == "no_cls":
        return no_cls(model, **options)
    if kind == "no_cross_frame":
        options.pop("keys", None)
        return no_cross_frame(model, **options)
    raise UserError(f"unknown perturbation {kind!r}; choose one of {KINDS + VIDEO_KINDS}")


def perturbation_hooks(model: HookedViT, kind: Union[str, Hook], layers: Optional[Sequence[int]] = None,
                       **options) -> list[tuple[str, Hook]]:
    """[(hook_name, fn)] applying a perturbation to the attention pattern of chosen blocks.

    kind: "none", "self_only", "no_cls", or any pattern hook (e.g. `attention_edge_mask(...)`).
    layers: block indices (negative allowed); None = every block.
    options: passed to the factory (perturb_prefix_queries, keys, heads).
    """
    fn = kind if callable(kind) else perturbation_hook(model, kind, **options)
    if fn is None:
        return []
    chosen = layer_indices(layers, model.cfg.n_layers, "layers")
    site = "attn.hook_pattern"
    if kind == "no_cross_frame":  # the scores; in a divided space-time model the temporal attention's
        site = "attn_time.hook_attn_scores" if model.cfg.attention_type == "divided_space_time" else "attn.hook_attn_scores"
    return [(f"blocks.{l}.{site}", fn) for l in chosen]


def summarize_rates(df: pd.DataFrame) -> pd.DataFrame:
    """Mean per kind of the per-image rates of `perturbation_rates` (one row per kind)."""
    out = df.groupby("kind", sort=False).agg(
        images=("index", "size"), identifiable_token_rate=("identifiable_token_rate", "mean"),
        images_with_identifiable_token=("any_identifiable", "mean"), accuracy=("correct", "mean"))
    return out.reset_index()
