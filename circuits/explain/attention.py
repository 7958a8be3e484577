"""Gradient-free attention maps: raw attention and attention rollout (Abnar & Zuidema 2020).

Neither is class-specific: the map is the same whatever the target.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from circuits.explain.trace import AttentionTrace
from hooked_vit.layers import layer_index
from hooked_vit.errors import UserError

HeadFusion = Literal["mean", "max", "min"]


def fuse_heads(pattern: Float[Tensor, "b h q k"], how: HeadFusion = "mean") -> Float[Tensor, "b q k"]:
    """Combine the heads of an attention pattern (the papers use the mean)."""
    if how == "mean":
        return pattern.mean(1)
    if how == "max":
        return pattern.amax(1)
    if how == "min":
        return pattern.amin(1)
    raise UserError(f"head_fusion must be mean, max or min, got {how!r}")


def raw_attention(trace: AttentionTrace, *, layer: int = -1, head_fusion: HeadFusion = "mean") -> Tensor:
    """Attention of the readout row ("CLS row") to every image token in one block
    (the last by default), heads fused. [b, n_patches]"""
    a = fuse_heads(trace.patterns[layer_index(layer, len(trace.patterns), "layer")].detach().float(), head_fusion)
    return trace.image_tokens(trace.read_row(a))


def from_layer(blocks: Sequence, start_layer: int) -> Sequence:
    """The blocks from `start_layer` on (negative counts from the end), as the authors'
    `start_layer` (Chefer et al., Transformer-Explainability / Transformer-MM-Explainability)."""
    return blocks[layer_index(start_layer, len(blocks), "start_layer"):]


def rollout_matrix(patterns: Sequence[Float[Tensor, "b h p p"]], head_fusion: HeadFusion = "mean",
                   start_layer: int = 0) -> Tensor:
    """Attention rollout: R = prod_l norm_rows(fuse_h A_l + I), the last block leftmost,
    over blocks l >= start_layer.

    The identity stands for the residual connection; each factor's rows sum to one, so the
    rows of R do too (a distribution over the input tokens). [b, p, p]
    """
    first = patterns[0]
    patterns = from_layer(patterns, start_layer)
    eye = torch.eye(first.shape[-1], device=first.device, dtype=torch.float32)
    r = eye.expand(first.shape[0], -1, -1)
    for pattern in patterns:
        a = fuse_heads(pattern.detach().float(), head_fusion) + eye
        r = (a / a.sum(-1, keepdim=True)) @ r
    return r


def rollout(trace: AttentionTrace, *, head_fusion: HeadFusion = "mean", start_layer: int = 0) -> Tensor:
    """The readout row of the attention rollout, over image tokens. [b, n_patches]"""
    return trace.image_tokens(trace.read_row(rollout_matrix(trace.patterns, head_fusion, start_layer)))
