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
        hook_scale: [*batch, 1], sqrt(var + eps). Only computed when hooked (otherwise the
            fused `F.layer_norm` runs); an edited scale replaces the real one.
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
        if is_hooked(self.hook_scale):
            x = x - x.mean(-1, keepdim=True)
            scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            x = x / scale
            if self.weight is not None:
                x = x * self.weight + self.bias
        else:
            x = self.functional(x)
        return self.hook_normalized(x)

    def functional(self, x: Tensor) -> Tensor:
        """The same map without firing hooks (used by projections such as the logit lens)."""
        return F.layer_norm(x, (self.d_model,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}, affine={self.weight is not None}"
