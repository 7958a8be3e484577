"""Importance maps from the class embedding space (Vilas et al. 2023, "Analyzing Vision Transformers for Image Classification in Class Embedding Space";
docs/explanations.md).

For each block l: project the attention sublayer output of the readout token ("CLS")
onto the classes, loss_l = cross_entropy(logits_l, target), and take the gradient of
loss_l with respect to block l's own post-softmax attention A_l (only through this
block's output: the gradient of loss_l alone, not of later blocks' losses).
importance_j = - sum_l sum_h sum_q d loss_l / d A_l[h, q, j].

For a class-token model only the class-token row q = CLS carries gradient (loss_l reads
that token only). For GAP models the readout is the pooled attention output, so every
pooled query row contributes, each with its pooling weight.

The original code applies a softmax to the projected logits before a cross-entropy that
already contains one; here the plain cross-entropy on logits is the default and
`extra_softmax=True` reproduces the original.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from circuits.explain.trace import AttentionTrace
from hooked_vit.layers import layer_indices


def attn_out_names(n_layers: int) -> list[str]:
    return [f"blocks.{l}.hook_attn_out" for l in range(n_layers)]


def class_embedding(trace: AttentionTrace, *, extra_softmax: bool = False,
                    layers: Optional[Sequence[int]] = None) -> Tensor:
    """Class-embedding importance map over image tokens. [b, n_patches]

    `layers`: the blocks whose maps are summed (default all, as the paper); one int alone
    (from a "name:layers=5" spec) or several, each in [-n_layers, n_layers) (`hooked_vit.layers`).
    """
    model = trace.model
    total = torch.zeros(trace.patterns[0].shape[0], trace.n_tokens, device=trace.logits.device)
    n = model.cfg.n_layers
    blocks = layer_indices(layers, n, "layers")
    for l, name in ((l, attn_out_names(n)[l]) for l in blocks):
        readout = trace.read_tokens(trace.acts[name])
        logits = model.to_class_logits(readout)
        if extra_softmax:
            logits = logits.softmax(-1)
        loss = F.cross_entropy(logits.float(), trace.targets, reduction="sum")  # per-image gradients
        (grad,) = torch.autograd.grad(loss, trace.patterns[l], retain_graph=True)
        total -= grad.float().sum(dim=(1, 2))  # over heads and query rows
    return trace.image_tokens(total)

