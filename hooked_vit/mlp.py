"""The MLP sublayer (fc1 -> activation -> fc2), timm's weight layout, TransformerLens hooks."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vit.config import HookedViTConfig


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
}


class MLP(nn.Module):
    """Hooks: hook_pre [b, p, d_mlp] (fc1 output, the "keys"), hook_post [b, p, d_mlp].

    LayerScale (`ls_gamma`, timm's `ls2.gamma`) is applied inside, so `W_out`/`b_out` map
    hook_post to exactly what the sublayer writes to the residual stream.
    """

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.cfg = cfg
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
        self.fc2 = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        self.ls_gamma: Optional[nn.Parameter] = (
            nn.Parameter(torch.ones(cfg.d_model)) if cfg.layer_scale else None
        )
        self.act = ACTIVATIONS[cfg.act_fn]
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "b p d_model"]) -> Float[Tensor, "b p d_model"]:
        post = self.hook_post(self.act(self.hook_pre(self.fc1(x))))
        out = self.fc2(post)
        return out if self.ls_gamma is None else out * self.ls_gamma

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.fc1.weight.T

    @property
    def b_in(self) -> Float[Tensor, "d_mlp"]:
        return self.fc1.bias if self.fc1.bias is not None else self.fc1.weight.new_zeros(self.cfg.d_mlp)

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        w = self.fc2.weight.T
        return w if self.ls_gamma is None else w * self.ls_gamma

    @property
    def b_out(self) -> Float[Tensor, "d_model"]:
        b = self.fc2.bias if self.fc2.bias is not None else self.fc2.weight.new_zeros(self.cfg.d_model)
        return b if self.ls_gamma is None else b * self.ls_gamma
