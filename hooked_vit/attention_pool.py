"""Attention pooling (global_pool="map"): a learned latent query attends over the tokens,
then an MLP refines the pooled vector (Zhai et al., "Scaling Vision Transformers", MAP head;
SigLIP, arXiv:2303.15343; Perception Encoder). Weights as timm's `AttentionPoolLatent`
(latent, q, kv, proj, norm, mlp).

Hooks (b = batch, p = pooled token, h = head):
    hook_q: [b, 1, h, d_head], the latent's query (the latent itself with
        cfg.attn_pool_q_proj=False, AIMv2)
    hook_k, hook_v: [b, p, h, d_head]
    hook_attn_scores: [b, h, 1, p], scaled dot products, masked keys at -inf
    hook_pattern: [b, h, 1, p], the pooling weights over the tokens
    hook_z: [b, 1, h, d_head]
    hook_result: [b, h, d_model], each head's share of the attention output (computed only
        when hooked: it sums, with b_O, to hook_attn_out)
    hook_attn_out: [b, d_model], the attention output (after proj)
    ln.hook_*, mlp.hook_pre / hook_post: the MLP's norm and hidden layer
    hook_mlp_out: [b, d_model]; the pooled vector is hook_attn_out + hook_mlp_out
    With cfg.attn_pool_mlp=False (AIMv2) there is no norm, MLP nor hook_mlp_out: the pooled
    vector is hook_attn_out.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vit.config import HookedViTConfig
from hooked_vit.hooks import is_hooked
from hooked_vit.layer_norm import make_norm
from hooked_vit.mlp import MLP


class AttentionPool(nn.Module):
    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.n_heads = cfg.attn_pool_heads
        self.d_head = d // self.n_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, d))
        self.q = nn.Linear(d, d) if cfg.attn_pool_q_proj else None
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.ln = make_norm(cfg, d) if cfg.attn_pool_mlp else None
        mlp_cfg = replace(cfg, d_mlp=cfg.attn_pool_d_mlp, mlp_type="mlp", mlp_norm=False, layer_scale=False,
                          attn_only_layer_scale=False, act_fn=cfg.attn_pool_act, global_pool="token",
                          class_token=True, distilled=False, d_image_embed=None, head_on_image_embed=False)
        self.mlp = MLP(mlp_cfg) if cfg.attn_pool_mlp else None
        self.hook_q = HookPoint()  # [b, 1, h, d_head]
        self.hook_k = HookPoint()  # [b, p, h, d_head]
        self.hook_v = HookPoint()  # [b, p, h, d_head]
        self.hook_attn_scores = HookPoint()  # [b, h, 1, p]
        self.hook_pattern = HookPoint()  # [b, h, 1, p]
        self.hook_z = HookPoint()  # [b, 1, h, d_head]
        self.hook_result = HookPoint()  # [b, h, d_model]
        self.hook_attn_out = HookPoint()  # [b, d_model]
        self.hook_mlp_out = HookPoint() if cfg.attn_pool_mlp else None  # [b, d_model]

    def forward(self, x: Float[Tensor, "b p d_model"], key_mask: Optional[Tensor] = None) -> Float[Tensor, "b d_model"]:
        """Pool tokens x [b, p, d] (key_mask [b, p], True = pooled) into one vector [b, d]."""
        b, p, d = x.shape
        latent = self.latent.expand(b, -1, -1)
        q = self.hook_q((latent if self.q is None else self.q(latent)).view(b, 1, self.n_heads, self.d_head))
        k, v = self.kv(x).view(b, p, 2, self.n_heads, self.d_head).unbind(2)
        k, v = self.hook_k(k), self.hook_v(v)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, h, *, d_head]
        if self.cfg.use_fused_attn and not (is_hooked(self.hook_attn_scores) or is_hooked(self.hook_pattern)):
            mask = None if key_mask is None else key_mask[:, None, None, :]
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            scores = (q * self.d_head**-0.5) @ k.transpose(-2, -1)
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
            pattern = self.hook_pattern(self.hook_attn_scores(scores).softmax(dim=-1))
            z = pattern @ v
        z = self.hook_z(z.transpose(1, 2))  # [b, 1, h, d_head]
        if is_hooked(self.hook_result):
            result = self.hook_result(torch.einsum("bhe,hem->bhm", z[:, 0], self.W_O))
            attn_out = result.sum(1) + self.proj.bias
        else:
            attn_out = self.proj(z.reshape(b, d))
        attn_out = self.hook_attn_out(attn_out)
        if self.mlp is None:
            return attn_out
        return attn_out + self.hook_mlp_out(self.mlp(self.ln(attn_out)))

    def single_token(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The head applied to each vector alone (a one-token sequence: the pooling weight is 1),
        without hooks: the MAP model's reading of one token, used by the logit lens."""
        v = F.linear(x, self.kv.weight[self.cfg.d_model:], self.kv.bias[self.cfg.d_model:])
        out = self.proj(v)
        if self.mlp is None:
            return out
        return out + self.mlp.fc2(self.mlp.act(self.mlp.fc1(self.ln.functional(out))))

    @property
    def W_O(self) -> Float[Tensor, "h d_head d_model"]:
        return einops.rearrange(self.proj.weight, "m (h e) -> h e m", h=self.n_heads)

    @property
    def b_O(self) -> Float[Tensor, "d_model"]:
        return self.proj.bias
