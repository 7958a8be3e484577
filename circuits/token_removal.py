"""Token removal (Vilas et al. 2023, "Analyzing Vision Transformers for Image Classification in Class Embedding Space";
docs/interventions.md): drop tokens before the first block.

`HookedViT.forward(keep_mask=...)` removes tokens after the patch + position embedding and
batches rows of different lengths (kept tokens moved left, padding masked out). This
module builds keep-masks from object masks and measures what remains identifiable:

    context      removes the context (background) tokens: keeps prefix + object tokens
    class_label  removes the class-label (object) tokens:  keeps prefix + background tokens

Measured per image: the share of the remaining patch tokens whose class rank at the last
block output is 0, next to the same share for the same tokens in the unperturbed run
(object tokens when the context is removed, background tokens when the object is).
Prefix tokens (class, registers, distillation) are always kept: the head reads them.
An image whose removal would leave no patch token is kept whole and marked `valid=False`.

Video models (docs/video.md): `frame_keep_mask` removes every token of chosen time positions,
`tube_keep_mask` a tube (the tokens at chosen (row, col) cells in every time position). The
tokens are removed after the position embedding, so the kept ones keep their own positions:
on joint attention this is the model run on the kept tokens alone. Divided space-time
attention is refused: its temporal and spatial attentions group the tokens into fixed
(rows * cols) x time blocks, which `keep_mask`'s padded rows do not keep.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from circuits.projection import class_rank
from hooked_vit import HookedViT
from hooked_vit.model import compact_tokens
from hooked_vit.errors import UserError
from hooked_vit.tokens import frame_token_mask, token_coords

REMOVALS = ("context", "class_label")
Removal = Literal["context", "class_label"]


def keep_mask_for(object_tokens: Bool[Tensor, "b n_patches"], removal: Removal,
                  n_prefix: int) -> Bool[Tensor, "b n_ctx"]:
    """Keep-mask [b, n_prefix + n_patches] that keeps every prefix token and
    the object tokens (removal="context") or the background tokens (removal="class_label")."""
    if removal not in REMOVALS:
        raise UserError(f"unknown removal {removal!r}; choose one of {REMOVALS}")
    object_tokens = object_tokens.bool()
    patches = object_tokens if removal == "context" else ~object_tokens
    prefix = torch.ones(object_tokens.shape[0], n_prefix, dtype=torch.bool, device=object_tokens.device)
    return torch.cat([prefix, patches], 1)


def _video_removal(model: HookedViT) -> None:
    cfg = model.cfg
    if not cfg.is_video:
        raise UserError(f"{cfg.model_name} is an image model (num_frames not set); frame and tube removal need a "
                         "video model (use keep_mask_for for object / context tokens)")
    if cfg.attention_type != "joint":
        raise UserError(f"token removal is not supported with attention_type={cfg.attention_type!r}: the temporal and "
                         "spatial attentions group tokens by (row, col) and by frame in fixed sizes; use a joint-attention "
                         "model, or hide tokens from attention instead (circuits.interventions.attention_edge_mask)")


def frame_keep_mask(model: HookedViT, times: Sequence[int], batch: int = 1) -> Bool[Tensor, "b n_ctx"]:
    """Keep-mask [batch, n_ctx] that removes every patch token at the time positions `times`
    (tubelet indices, `hooked_vit.tokens.token_frames`); prefix tokens are kept."""
    _video_removal(model)
    times = [int(t) for t in times]
    bad = [t for t in times if not 0 <= t < model.cfg.n_time]
    if bad or not times:
        raise UserError(f"time positions {bad or times} are outside [0, {model.cfg.n_time}) (choose at least one)")
    if len(set(times)) == model.cfg.n_time and model.cfg.global_pool != "token":
        raise UserError("removing every time position leaves no patch token to pool; keep at least one")
    keep = ~torch.tensor(frame_token_mask(model, times))
    return keep[None].expand(batch, -1).clone()


def tube_keep_mask(model: HookedViT, cells: Sequence[tuple[int, int]], batch: int = 1) -> Bool[Tensor, "b n_ctx"]:
    """Keep-mask [batch, n_ctx] that removes the tubes at the (row, col) `cells`: those
    patch tokens at every time position; prefix tokens are kept."""
    _video_removal(model)
    rows, cols = model.cfg.grid_size
    cells = {(int(r), int(c)) for r, c in cells}
    bad = sorted(rc for rc in cells if not (0 <= rc[0] < rows and 0 <= rc[1] < cols))
    if bad or not cells:
        raise UserError(f"cells {bad or sorted(cells)} are outside the {rows}x{cols} token grid (choose at least one)")
    if len(cells) == rows * cols and model.cfg.global_pool != "token":
        raise UserError("removing every tube leaves no patch token to pool; keep at least one")
    keep = torch.tensor([c is None or (c[1], c[2]) not in cells for c in token_coords(model)])
    return keep[None].expand(batch, -1).clone()


def kept_tokens_mask(object_tokens: Bool[Tensor, "b n_patches"], removal: Removal) -> Bool[Tensor, "b n_patches"]:
    """The patch tokens a removal keeps (the token kind compared with the unperturbed run)."""
    return object_tokens.bool() if removal == "context" else ~object_tokens.bool()


def scatter_to_positions(values: Tensor, keep_mask: Bool[Tensor, "b n_ctx"], fill) -> Tensor:
    """Values over compacted tokens [b, ..., k] back to original positions [b, ..., n_ctx].

    The compacted sequence of `forward(keep_mask=...)` holds each row's kept tokens in
    order, then padding; removed positions and padding get `fill`.
    """
    b, n_ctx = keep_mask.shape
    _, key_mask, order = compact_tokens(keep_mask.new_zeros(b, n_ctx, 1, dtype=torch.float32), keep_mask)
    k = order.shape[1]
    out = values.new_full((*values.shape[:-1], n_ctx), fill)
    lead = values.shape[1:-1]
    index = order.view(b, *([1] * len(lead)), k).expand(b, *lead, k)
    real = key_mask.view(b, *([1] * len(lead)), k).expand(b, *lead, k)
    # Padding slots carry removed positions' indices: they write the fill value there.
    return out.scatter(-1, index, values.masked_fill(~real, fill))


@torch.inference_mode()
def last_block_ranks(model: HookedViT, images: Tensor, targets: Tensor,
                     keep_mask: Optional[Tensor] = None) -> tuple[Int[Tensor, "b n_ctx"], Tensor]:
    """Class rank of every token at the last block output (projected with the final norm
    and head, as `circuits.projection`), at original positions (-1 where removed), and
    the model's predictions [b]."""
    kwargs = {} if keep_mask is None else {"keep_mask": keep_mask}
    name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    logits, cache = model.run_with_cache(images, names_filter=name, return_cache_object=False, **kwargs)
    targets = targets.to(logits.device)
    rank = class_rank(model.to_class_logits(cache[name]), targets[:, None])  # [b, k]
    if keep_mask is not None:
        rank = scatter_to_positions(rank, keep_mask.to(rank.device), -1)
    return rank, logits.argmax(-1)


def removal_batch(model: HookedViT, images: Tensor, object_tokens: Bool[Tensor, "b n_patches"],
                  targets: Tensor, removals: Sequence[Removal] = REMOVALS) -> dict:
    """Token removal on one batch. Returns {"none": (rank, pred), removal: (rank, pred, valid)}.

    rank [b, n_ctx] at the last block (-1 on removed tokens); valid [b] is False where a
    removal would leave no patch token (that image then runs whole and is not counted).
    """
    n_prefix = model.cfg.n_prefix_tokens
    object_tokens = object_tokens.to(model.device).bool()
    out = {"none": last_block_ranks(model, images, targets)}
    for removal in removals:
        keep = keep_mask_for(object_tokens, removal, n_prefix)
        valid = keep[:, n_prefix:].any(1)
        keep[~valid] = True
        rank, pred = last_block_ranks(model, images, targets, keep)
        out[removal] = (rank, pred, valid)
    return out


def removal_rates(rank: Tensor, rank_none: Tensor, kept: Bool[Tensor, "b n_patches"], n_prefix: int) -> tuple:
    """Share of kept patch tokens with rank 0, after removal and in the unperturbed run: [b] each."""
    kept = kept.to(rank.device)
    n = kept.sum(1).clamp(min=1)
    removed_rate = ((rank[:, n_prefix:] == 0) & kept).sum(1) / n
    none_rate = ((rank_none[:, n_prefix:] == 0) & kept).sum(1) / n
    return removed_rate, none_rate


def removal_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean rates per removal over valid images (the paper's numbers are these means)."""
    valid = df[df["valid"]].assign(correct_removed=lambda d: d["pred_removed"] == d["label"],
                                   correct_unperturbed=lambda d: d["pred_unperturbed"] == d["label"])
    out = valid.groupby("removal", sort=False).agg(
        images=("index", "size"), kept_patch_tokens=("n_kept", "mean"),
        rate_removed=("rate_removed", "mean"), rate_unperturbed=("rate_unperturbed", "mean"),
        accuracy_removed=("correct_removed", "mean"), accuracy_unperturbed=("correct_unperturbed", "mean"))
    return out.reset_index()
