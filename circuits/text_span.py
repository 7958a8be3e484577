"""TextSpan: describe attention heads of a CLIP image tower by the texts their outputs span.

Gandelsman, Efros & Steinhardt 2024, "Interpreting CLIP's Image Representation via
Text-Based Decomposition" (ICLR, https://arxiv.org/abs/2310.05916), sec. 4.1: the image
embedding is a sum of direct contributions of every head (through the final LayerNorm,
linearised at the image's own scale, and the image projection); for one head, TextSpan
greedily picks from a pool of text embeddings the direction that explains most of the
variance of the head's contributions over images, projects it out of both the
contributions and the pool, and repeats.
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_vit import HookedViT
from hooked_vit.layers import layer_index
from hooked_vit.errors import UserError


def direct_contributions(
    model: HookedViT, stack: Float[Tensor, "... b d_model"], final_resid: Float[Tensor, "b d_model"]
) -> Float[Tensor, "... b d_embed"]:
    """Residual components at the class token mapped into the image-embedding space.

    The final norm is linearised at the scale of `final_resid` (the class token after the
    last block), as TransformerLens's `apply_ln_to_stack` does; the norm's bias is left out
    (it is a constant term), so the contributions of all components plus `ln bias @ proj^T`
    sum to the image embedding (`hook_image_embed`, whatever head reads it; a model without
    CLIP's projection: its logits through `W_U`).
    """
    check_text_span_model(model)
    ln = model.ln_final
    if ln is not None:
        centred = final_resid - final_resid.mean(-1, keepdim=True)
        scale = (centred.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
        stack = (stack - stack.mean(-1, keepdim=True)) / scale
        stack = stack * ln.weight if ln.weight is not None else stack
    readout = model.image_proj.weight.T if model.image_proj is not None else model.W_U  # [d_model, d_embed]
    return stack @ readout


def check_text_span_model(model: HookedViT) -> int:
    """Refuse models whose output is not read from the class token alone; returns the width
    of the space contributions live in (d_image_embed for CLIP, else the logits')."""
    if model.cfg.block_type == "post_norm":  # a norm after every sublayer: heads do not add up directly
        raise UserError("direct_contributions needs pre-norm blocks (a post-norm block normalises each head's "
                         "sum with the stream); use circuits.decomposition.decompose, which handles post-norm")
    if model.cfg.global_pool != "token" or model.cfg.distilled:
        raise UserError("direct_contributions reads the class token: a class-token, single-head model is needed "
                         f"(global_pool={model.cfg.global_pool!r}, distilled={model.cfg.distilled})")
    model.require_head()
    return model.cfg.d_image_embed or model.cfg.n_classes


@torch.no_grad()
def head_contributions(model: HookedViT, images: Float[Tensor, "b c h w"], layers: Sequence[int]
                       ) -> Float[Tensor, "l h b d_embed"]:
    """Direct contribution of every head of `layers` to each image's embedding."""
    layers = [layer_index(l, model.cfg.n_layers, "layers") for l in layers]  # in the caller's order
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    names = [f"blocks.{l}.attn.hook_z" for l in layers] + [last]
    _, cache = model.run_with_cache(images, names_filter=lambda n: n in names)
    out = []
    for l in layers:
        z = cache[f"blocks.{l}.attn.hook_z"][:, 0]  # [b, h, d_head] at the class token
        result = torch.einsum("bhe,hem->hbm", z, model.blocks[l].attn.W_O)
        out.append(direct_contributions(model, result, cache[last][:, 0]))
    return torch.stack(out)


def text_span(
    contributions: Float[Tensor, "n d"], texts: Float[Tensor, "m d"], k: int = 5
) -> tuple[list[int], list[float]]:
    """Greedy TextSpan (Gandelsman et al. 2024, Algorithm 1).

    Returns the indices of the `k` chosen texts and the fraction of the contributions'
    variance each explains (after the previous ones were projected out).
    """
    if contributions.ndim != 2 or texts.ndim != 2 or contributions.shape[1] != texts.shape[1]:
        raise UserError(
            f"need contributions [n, d] and texts [m, d] of one width, got {tuple(contributions.shape)} "
            f"and {tuple(texts.shape)}"
        )
    c = (contributions - contributions.mean(0)).double()
    r = texts.double().clone()
    total = float(c.pow(2).sum()) or 1.0
    chosen, explained = [], []
    for _ in range(min(k, texts.shape[0])):
        unit = r / r.norm(dim=1, keepdim=True).clamp(min=1e-12)
        var = (c @ unit.T).pow(2).sum(0)
        if chosen:
            var[chosen] = -1.0
        j = int(var.argmax())
        chosen.append(j)
        explained.append(float(var[j]) / total)
        d = unit[j]
        c = c - (c @ d)[:, None] * d  # project the direction out of the outputs and the pool
        r = r - (r @ d)[:, None] * d
    return chosen, explained
