"""LayerNorm with TransformerLens's hook points (`hook_scale`, `hook_normalized`)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vit.hooks import is_hooked


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension, biased variance, with an optional affine map.

    Hooks:
        hook_scale: [*batch, 1], sqrt(var + eps). Only computed when hooked; a returned or
            in-place edited scale replaces the real one.
        hook_normalized: [*batch, d_model], the output (after weight and bias).

    After `fold_ln` the affine parameters are None ("LNPre" in TransformerLens).
    """

    def __init__(self, d_model: int, eps: float, affine: bool = True):
        super().__init__()
        self.d_model = d_model
        self.eps = eps
        self.weight: Optional[nn.Parameter] = nn.Parameter(torch.ones(d_model)) if affine else None
        self.bias: Optional[nn.Parameter] = nn.Parameter(torch.zeros(d_model)) if affine else None
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        if not is_hooked(self.hook_scale):
            return self.hook_normalized(self.functional(x))
        # One fused kernel gives the output and the statistics; the explicit formula runs
        # only if a hook changed the scale, so that the edit flows downstream.
        out, mean, rstd = torch.native_layer_norm(x, (self.d_model,), self.weight, self.bias, self.eps)
        scale = rstd.reciprocal().to(x.dtype)  # [*batch, 1] = sqrt(var + eps)
        reference = scale.clone()
        edited = self.hook_scale(scale)
        if edited is not scale or not torch.equal(edited, reference):
            out = (x - mean.to(x.dtype)) / edited
            if self.weight is not None:
                out = out * self.weight + self.bias
        return self.hook_normalized(out)

    def functional(self, x: Tensor) -> Tensor:
        """The same map without firing hooks (used by projections such as the logit lens)."""
        return F.layer_norm(x, (self.d_model,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}, affine={self.weight is not None}"
