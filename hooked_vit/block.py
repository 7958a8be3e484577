"""A transformer block: pre-norm (timm `Block`) or post-norm (timm `ResPostBlock`)."""

from __future__ import annotations

from typing import Optional

from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vit.attention import Attention
from hooked_vit.config import HookedViTConfig
from hooked_vit.layer_norm import LayerNorm
from hooked_vit.mlp import MLP


class TransformerBlock(nn.Module):
    """Residual block. Hooks are [b, p, d_model]; hook_mlp_in (a copy of resid_mid that the
    MLP reads) only fires with cfg.use_hook_mlp_in.

    pre_norm:  attn_out = attn(ln1(resid_pre));  mlp_out = mlp(ln2(resid_mid))
    post_norm: attn_out = ln1(attn(resid_pre));  mlp_out = ln2(mlp(resid_mid))

    In both, resid_mid = resid_pre + attn_out and resid_post = resid_mid + mlp_out: the
    sublayer hooks carry exactly what is added to the residual stream (LayerScale and the
    post-norm included). In a post-norm block `ln1`/`ln2` act on the sublayer outputs.
    """

    def __init__(self, cfg: HookedViTConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.ln1 = LayerNorm(cfg.d_model, cfg.eps)
        self.attn = Attention(cfg)
        self.ln2 = LayerNorm(cfg.d_model, cfg.eps)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()  # [b, p, d_model]
        self.hook_attn_out = HookPoint()  # [b, p, d_model]
        self.hook_resid_mid = HookPoint()  # [b, p, d_model]
        self.hook_mlp_in = HookPoint()  # [b, p, d_model], cfg.use_hook_mlp_in
        self.hook_mlp_out = HookPoint()  # [b, p, d_model]
        self.hook_resid_post = HookPoint()  # [b, p, d_model]

    def forward(
        self, resid_pre: Float[Tensor, "b p d_model"], key_mask: Optional[Tensor] = None
    ) -> Float[Tensor, "b p d_model"]:
        resid_pre = self.hook_resid_pre(resid_pre)
        if self.cfg.block_type == "post_norm":
            attn_out = self.ln1(self.attn(resid_pre, key_mask))
        else:
            attn_out = self.attn(resid_pre, key_mask, norm=self.ln1)
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(attn_out))
        # A copy, as in TransformerLens, so an edit of the MLP input leaves resid_mid alone.
        mlp_in = self.hook_mlp_in(resid_mid.clone()) if self.cfg.use_hook_mlp_in else resid_mid
        if self.cfg.block_type == "post_norm":
            mlp_out = self.ln2(self.mlp(mlp_in))
        else:
            mlp_out = self.mlp(self.ln2(mlp_in))
        return self.hook_resid_post(resid_mid + self.hook_mlp_out(mlp_out))
