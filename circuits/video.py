"""Analyses over space and time for video models (docs/video.md).

A video HookedViT's patch tokens are in (time, row, col) order (`hooked_vit.tokens`), so
every per-token result of the image analyses (logit lens, identifiability, perturbations)
is already per space-time token; this module adds the per-time aggregates and the logit
lens / identifiability of every space-time token in one call.

- `per_time(values, model)`: [..., P] per token -> [..., T], the mean over each time
  position's patch tokens (prefix tokens dropped).
- `space_time_identifiability(model, clips, targets)`: class identifiability
  1 - rank / n_classes (Vilas et al. 2023; `circuits.identifiability`) of every token at every
  block output, with the class token's and per-time means.
- Corruptions for patching over time (the corrupted run of `circuits.patching` /
  `circuits.circuit_discovery`): `reverse_frames(clips)` (the clip played backwards: same
  frames, every motion reversed), `shuffle_frames(clips, seed)` (the frames in a random
  order other than their own: same content, no motion order) and `freeze_frames(clips,
  frame)` (one frame repeated: same appearance, no motion). A second clip is the fourth.
"""
from __future__ import annotations

from typing import Optional, Sequence

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.identifiability import identifiability
from circuits.projection import project_batch
from hooked_vit import HookedViT
from hooked_vit.errors import UserError


def _require_video(model: HookedViT) -> None:
    if not model.cfg.is_video:
        raise UserError(f"{model.cfg.model_name} is an image model (num_frames not set); per-time results need "
                         "a video model")


def _check_clips(clips: Tensor) -> None:
    if clips.ndim != 5:
        raise UserError(f"clips must be [batch, frames, channels, height, width], got shape {tuple(clips.shape)}")


def reverse_frames(clips: Float[Tensor, "b t c h w"]) -> Float[Tensor, "b t c h w"]:
    """The clips played backwards: every frame's content kept, every motion reversed (on the
    embedded moving shapes, each direction becomes its opposite)."""
    _check_clips(clips)
    if clips.shape[1] < 2:
        raise UserError(f"reverse_frames needs at least 2 frames, the clips have {clips.shape[1]}")
    return clips.flip(1)


def shuffle_frames(clips: Float[Tensor, "b t c h w"], seed: int = 0) -> Float[Tensor, "b t c h w"]:
    """The clips with their frames in a random order (one permutation for the batch, seeded),
    never the identity: each clip keeps its frames' content and loses their order."""
    _check_clips(clips)
    t = clips.shape[1]
    if t < 2:
        raise UserError(f"shuffle_frames needs at least 2 frames, the clips have {t}")
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(t, generator=gen)
    if torch.equal(order, torch.arange(t)):  # the identity is no corruption: move every frame by one
        order = order.roll(1)
    return clips[:, order.to(clips.device)]


def freeze_frames(clips: Float[Tensor, "b t c h w"], frame: int = 0) -> Float[Tensor, "b t c h w"]:
    """The clips with frame `frame` repeated over time (a still clip: its appearance, no motion)."""
    _check_clips(clips)
    t = clips.shape[1]
    if not -t <= frame < t:
        raise UserError(f"frame {frame} is outside the clips' {t} frames")
    return clips[:, frame:frame + 1 if frame != -1 else None].expand_as(clips).clone()


def per_time(values: Float[Tensor, "... p"], model: HookedViT) -> Float[Tensor, "... t"]:
    """Mean of per-token `values` over each time position's patch tokens: [..., n_time]."""
    _require_video(model)
    cfg = model.cfg
    if values.shape[-1] != cfg.n_ctx:
        raise UserError(f"values have {values.shape[-1]} tokens, the model's sequence has {cfg.n_ctx}")
    return time_means(values, cfg.n_prefix_tokens, cfg.n_time)


def time_means(values: Float[Tensor, "... p"], n_prefix: int, n_time: int) -> Float[Tensor, "... t"]:
    """`per_time` from the layout alone (a run's labels.json): the mean of each time position's
    patch tokens, the first `n_prefix` tokens dropped; numpy arrays or tensors."""
    patches = values[..., n_prefix:]
    if patches.shape[-1] % n_time:
        raise UserError(f"{patches.shape[-1]} patch tokens do not split into {n_time} time positions")
    return einops.reduce(patches, "... (t s) -> ... t", "mean", t=n_time)


@torch.inference_mode()
def space_time_identifiability(model: HookedViT, clips: Float[Tensor, "b t c h w"],
                               targets: Optional[Int[Tensor, "b"]] = None,
                               fwd_hooks: Sequence = ()) -> dict[str, Tensor]:
    """Identifiability of the target class (default: the prediction) in every token's
    residual stream after every block, through the model's own final norm and head.

    Returns {"tokens": [b, L, P], "per_time": [b, L, T] (patch tokens), "cls": [b, L] (only
    with a class token), "logits": [b, classes]}. `fwd_hooks` (e.g. attention perturbations)
    stay active during the run."""
    _require_video(model)
    proj = project_batch(model, clips, targets, sites=("block",), k=1, fwd_hooks=fwd_hooks)
    tokens = identifiability(proj.rank[:, 0].float(), model.cfg.n_classes)  # [b, L, P]
    out = {"tokens": tokens, "per_time": per_time(tokens, model), "logits": proj.logits}
    if model.cfg.class_token:
        out["cls"] = tokens[..., 0]
    return out
