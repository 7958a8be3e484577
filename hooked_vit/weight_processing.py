"""Weight processing that leaves the logits unchanged (as TransformerLens does for LMs).

- fold_layer_scale: multiply the LayerScale gammas into W_O/b_O and W_out/b_out.
- fold_ln: fold each LayerNorm's weight and bias into the linear map that reads it
  (ln1 -> qkv, ln2 -> fc1, ln_final -> head); the norms become "LNPre" (no affine).
- center_writing_weights: remove the mean over d_model from everything written to the
  residual stream. Valid because every reader of the stream is a LayerNorm, which
  ignores a per-token constant; refused for post-norm blocks, whose attention reads the
  raw stream.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hooked_vit.model import HookedViT


@torch.no_grad()
def process_weights_(
    model: HookedViT, fold_ln: bool = True, center_writing_weights: bool = True, fold_layer_scale: bool = True
) -> None:
    if center_writing_weights and model.cfg.layer_scale and not fold_layer_scale:
        raise ValueError("center_writing_weights with LayerScale needs fold_layer_scale=True")
    if fold_layer_scale:
        fold_layer_scale_(model)
    if fold_ln:
        fold_layer_norm_(model)
    if center_writing_weights:
        center_writing_weights_(model)


@torch.no_grad()
def fold_layer_scale_(model: HookedViT) -> None:
    for block in model.blocks:
        for sub, linear in ((block.attn, block.attn.proj), (block.mlp, block.mlp.fc2)):
            if sub.ls_gamma is None:
                continue
            gamma = sub.ls_gamma
            linear.weight.mul_(gamma[:, None])
            if linear.bias is not None:
                linear.bias.mul_(gamma)
            sub.ls_gamma = None
    model.cfg.layer_scale = False


@torch.no_grad()
def fold_layer_norm_(model: HookedViT) -> None:
    if model.cfg.block_type == "post_norm":
        raise ValueError(
            "fold_ln needs pre-norm blocks; this model's post-norm blocks (ResPostBlock) normalise "
            "the sublayer outputs, which no following linear map reads directly"
        )
    for block in model.blocks:
        _fold_into(block.ln1, [block.attn.qkv])
        _fold_into(block.ln2, [block.mlp.fc1])
    if model.ln_final is not None:
        _fold_into(model.ln_final, [h for h in (model.head, model.head_dist) if h is not None])
    model.cfg.normalization_type = "LNPre"


def _fold_into(ln: nn.Module, readers: list[nn.Linear]) -> None:
    if ln.weight is None:
        return
    for linear in readers:
        bias = linear.weight @ ln.bias
        if linear.bias is None:
            linear.bias = nn.Parameter(bias)
        else:
            linear.bias.add_(bias)
        linear.weight.mul_(ln.weight[None, :])
    ln.weight, ln.bias = None, None


@torch.no_grad()
def center_writing_weights_(model: HookedViT) -> None:
    cfg = model.cfg
    if cfg.block_type == "post_norm":
        raise ValueError("center_writing_weights is invalid for post-norm blocks: attention reads the raw stream")
    if cfg.final_norm is None:
        raise ValueError("center_writing_weights needs a final norm: the head reads the raw stream")
    if cfg.layer_scale:
        raise ValueError("fold LayerScale first (fold_layer_scale=True)")
    embed = model.embed
    for param in (*embed.prefix_params(), embed.pos_embed):
        if param is not None:
            param.sub_(param.mean(-1, keepdim=True))
    _center_rows(embed.proj.weight, embed.proj.bias)
    for block in model.blocks:
        _center_rows(block.attn.proj.weight, block.attn.proj.bias)
        _center_rows(block.mlp.fc2.weight, block.mlp.fc2.bias)


def _center_rows(weight: Tensor, bias: Tensor | None) -> None:
    """Output dimension is dim 0 (Linear and Conv2d): subtract its mean."""
    weight.sub_(weight.mean(0, keepdim=True))
    if bias is not None:
        bias.sub_(bias.mean())
