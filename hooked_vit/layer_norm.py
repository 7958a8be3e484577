"""LayerNorm with TransformerLens's hook points (`hook_scale`, `hook_normalized`)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vit.hooks import is_hooked


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension, biased variance, with an optional affine map.

    Hooks:
        hook_scale: [*batch, 1], sqrt(var + eps). Only computed when hooked; a returned or
            in-place edited scale replaces the real one, and gradients are those of
            (x - mean(x)) / scale * weight + bias with the edited scale (so freezing the
            scale at a clean run's value keeps LayerNorm's centring in the gradient).
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

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        if not is_hooked(self.hook_scale):
            return self.hook_normalized(self.functional(x))
        # The scale is computed from x with autograd, so a hook that returns f(scale) gets
        # the gradient of f; the output is the explicit formula whenever hook_scale can
        # change anything (an edit, or backward hooks that need the scale in the graph).
        if not torch.is_grad_enabled():
            return self._forward_no_grad(x)
        centred = x - x.mean(-1, keepdim=True)
        # pow(0.5), not sqrt: its backward reads the input, so an in-place edit of the scale
        # by a hook does not invalidate the graph.
        scale = (centred.pow(2).mean(-1, keepdim=True) + self.eps).pow(0.5)  # [*batch, 1]
        if self.hook_scale._backward_hooks:
            return self.hook_normalized(self._affine(centred / self.hook_scale(scale)))
        reference = scale.detach().clone()
        edited = self.hook_scale(scale)
        if edited is scale and torch.equal(edited, reference):
            # Unedited: the fused kernel's output and gradient equal the formula's.
            return self.hook_normalized(self.functional(x))
        return self.hook_normalized(self._affine(centred / edited))

    def _forward_no_grad(self, x: Tensor) -> Tensor:
        # Without autograd one fused kernel gives the output and the statistics; the formula
        # runs only if a hook changed the scale.
        out, mean, rstd = torch.native_layer_norm(x, (self.d_model,), self.weight, self.bias, self.eps)
        scale = rstd.reciprocal().to(x.dtype)  # [*batch, 1] = sqrt(var + eps)
        reference = scale.clone()
        edited = self.hook_scale(scale)
        if edited is not scale or not torch.equal(edited, reference):
            out = self._affine((x - mean.to(x.dtype)) / edited)
        return self.hook_normalized(out)

    def _affine(self, normalized: Tensor) -> Tensor:
        return normalized if self.weight is None else normalized * self.weight + self.bias

    def functional(self, x: Tensor) -> Tensor:
        """The same map without firing hooks (used by projections such as the logit lens)."""
        return F.layer_norm(x, (self.d_model,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}, affine={self.weight is not None}"


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension (Zhang & Sennrich 2019; timm's `RmsNorm`):
    x / sqrt(mean(x^2) + eps) * weight. No centring, no bias.

    Hooks (TransformerLens's names):
        hook_scale: [*batch, 1], sqrt(mean(x^2) + eps). Only computed when hooked; a returned
            or edited scale replaces the real one.
        hook_normalized: [*batch, d_model], the output (after the weight).
    """

    def __init__(self, d_model: int, eps: float, affine: bool = True):
        super().__init__()
        self.d_model = d_model
        self.eps = eps
        self.weight: Optional[nn.Parameter] = nn.Parameter(torch.ones(d_model)) if affine else None
        self.bias = None  # for code that reads norm.bias (RMSNorm has none)
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        if not is_hooked(self.hook_scale):
            return self.hook_normalized(self.functional(x))
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).pow(0.5))  # [*batch, 1]
        normalized = x / scale
        return self.hook_normalized(normalized if self.weight is None else normalized * self.weight)

    def functional(self, x: Tensor) -> Tensor:
        """The same map without firing hooks (timm's formula, for bit-level agreement)."""
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x if self.weight is None else x * self.weight

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}, affine={self.weight is not None}"


def make_norm(cfg, d: int, eps: Optional[float] = None) -> nn.Module:
    """The model's norm (cfg.norm_type) over a last dimension of size d (eps: cfg.eps)."""
    eps = cfg.eps if eps is None else eps
    return RMSNorm(d, eps) if cfg.norm_type == "rmsnorm" else LayerNorm(d, eps)
