"""Gradient-weighted attention maps, class-specific: Chefer et al. 2021b's generic attention
explainability (GAE) and attention Grad-CAM on the last block.

Both use g_l = d y_t / d A_l, the gradient of the target-class logit (before softmax) with
respect to block l's post-softmax attention (all downstream paths), from
`AttentionTrace.target_grads`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from circuits.explain.attention import from_layer
from circuits.explain.trace import AttentionTrace
from hooked_vit.layers import layer_index


def gae_matrix(patterns: Sequence[Float[Tensor, "b h p p"]], grads: Sequence[Float[Tensor, "b h p p"]],
               start_layer: int = 0) -> Tensor:
    """Chefer et al. 2021b: R = I; for every block l >= start_layer, R += mean_h(clamp(g * A,
    min=0)) @ R (`start_layer` as in the authors' CLIP notebook, where earlier blocks are
    skipped). [b, p, p]"""
    first = patterns[0]
    r = torch.eye(first.shape[-1], device=first.device, dtype=torch.float32).expand(first.shape[0], -1, -1)
    for a, g in zip(from_layer(patterns, start_layer), from_layer(grads, start_layer)):
        cam = (g.detach().float() * a.detach().float()).clamp(min=0).mean(1)
        r = r + cam @ r
    return r


def gae(trace: AttentionTrace, *, start_layer: int = 0) -> Tensor:
    """The readout row of the GAE relevance matrix, over image tokens. [b, n_patches]"""
    return trace.image_tokens(trace.read_row(gae_matrix(trace.patterns, trace.target_grads(), start_layer)))


def attention_gradcam(trace: AttentionTrace, *, layer: int = -1) -> Tensor:
    """Grad-CAM on attention (the baseline of Chefer et al. 2021a): per head h, the weight
    alpha_h = mean over image tokens j of g[h, CLS, j]; map_j = relu(mean_h alpha_h A[h, CLS, j]).
    "CLS" is the readout row. [b, n_patches]"""
    layer = layer_index(layer, len(trace.patterns), "layer")
    a = trace.read_row(trace.patterns[layer].detach().float())  # [b, h, p]
    g = trace.read_row(trace.target_grads()[layer].detach().float())
    alpha = g[..., trace.n_prefix:].mean(-1, keepdim=True)  # [b, h, 1]
    return trace.image_tokens((alpha * a).mean(1).clamp(min=0))
