"""The MLP sublayer (fc1 -> activation -> fc2), timm's weight layout, TransformerLens hooks."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vit.config import HookedViTConfig
from hooked_vit.layer_norm import make_norm
from hooked_vit.errors import UserError


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
}


class MLP(nn.Module):
    """Hooks: hook_pre [b, p, d_mlp] (fc1 output, the "keys"), hook_post [b, p, d_mlp].

    A gated MLP (cfg.mlp_type="glu": SwiGLU, Shazeer 2020, arXiv:2002.05202) keeps both input
    maps in one fc1 ([gate; linear], 2 * d_mlp outputs) and names its hooks as TransformerLens's
    gated MLPs: hook_pre the gate pre-activation, hook_pre_linear the linear branch,
    hook_post = act(hook_pre) * hook_pre_linear, all [b, p, d_mlp]. With cfg.mlp_norm a norm
    over d_mlp (`ln`, hooks ln.hook_*) sits between hook_post and fc2.

    LayerScale (`ls_gamma`, timm's `ls2.gamma`) is applied inside, so `W_out`/`b_out` map
    hook_post to exactly what the sublayer writes to the residual stream.
    """

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.cfg = cfg
        self.gated = cfg.mlp_type == "glu"
        self.fc1 = nn.Linear(cfg.d_model, (2 if self.gated else 1) * cfg.d_mlp, bias=cfg.mlp_bias)
        self.ln = make_norm(cfg, cfg.d_mlp) if cfg.mlp_norm else None
        self.fc2 = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.mlp_bias)
        self.ls_gamma: Optional[nn.Parameter] = (
            nn.Parameter(torch.ones(cfg.d_model)) if cfg.layer_scale and not cfg.attn_only_layer_scale else None
        )
        self.act = ACTIVATIONS[cfg.act_fn]
        self.hook_pre = HookPoint()  # [b, p, d_mlp]; the gate in a gated MLP
        self.hook_pre_linear = HookPoint() if self.gated else None  # [b, p, d_mlp]; gated MLPs only
        self.hook_post = HookPoint()  # [b, p, d_mlp]

    def forward(self, x: Float[Tensor, "b p d_model"]) -> Float[Tensor, "b p d_model"]:
        # fc1's output is not kept in a name: it is freed as soon as the activation has read it
        # (as in timm), so the forward's peak memory is timm's.
        if self.gated:
            gate, linear = self.fc1(x).chunk(2, dim=-1)
            post = self.hook_post(self.act(self.hook_pre(gate)) * self.hook_pre_linear(linear))
            del gate, linear
        else:
            post = self.hook_post(self.act(self.hook_pre(self.fc1(x))))
        out = self.fc2(post if self.ln is None else self.ln(post))
        return out if self.ls_gamma is None else out * self.ls_gamma

    def _fc1_rows(self, i: int) -> tuple[Tensor, Tensor]:
        d = self.cfg.d_mlp
        w = self.fc1.weight[i * d : (i + 1) * d]
        b = self.fc1.bias[i * d : (i + 1) * d] if self.fc1.bias is not None else w.new_zeros(d)
        return w, b

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        """The map to hook_pre; in a gated MLP the linear branch (hook_pre_linear), as in
        TransformerLens, whose W_gate is the gate."""
        return self._fc1_rows(1 if self.gated else 0)[0].T

    @property
    def b_in(self) -> Float[Tensor, "d_mlp"]:
        return self._fc1_rows(1 if self.gated else 0)[1]

    @property
    def W_gate(self) -> Float[Tensor, "d_model d_mlp"]:
        """Gated MLPs only: the map to the gate pre-activation (hook_pre)."""
        if not self.gated:
            raise UserError("W_gate exists only for gated MLPs (cfg.mlp_type='glu')")
        return self._fc1_rows(0)[0].T

    @property
    def b_gate(self) -> Float[Tensor, "d_mlp"]:
        if not self.gated:
            raise UserError("b_gate exists only for gated MLPs (cfg.mlp_type='glu')")
        return self._fc1_rows(0)[1]

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        w = self.fc2.weight.T
        return w if self.ls_gamma is None else w * self.ls_gamma

    @property
    def b_out(self) -> Float[Tensor, "d_model"]:
        b = self.fc2.bias if self.fc2.bias is not None else self.fc2.weight.new_zeros(self.cfg.d_model)
        return b if self.ls_gamma is None else b * self.ls_gamma
