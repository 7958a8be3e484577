"""Attention pooling (global_pool="map"): a learned latent query attends over the tokens,
then an MLP refines the pooled vector (Zhai et al., "Scaling Vision Transformers", MAP head;
SigLIP, arXiv:2303.15343; Perception Encoder). Weights as timm's `AttentionPoolLatent`
(latent, q, kv, proj, norm, mlp).

V-JEPA 2's attentive probe (Assran et al. 2025, arXiv:2506.09985; transformers'
`VJEPA2AttentivePooler`) is the same head with four options (hooked_vit/config.py):
cfg.attn_pool_layers pre-norm self-attention blocks over the tokens first (`blocks.N`,
TransformerBlocks with every block hook), cfg.attn_pool_kv_norm a norm on the tokens the
keys and values read (`ln_kv`), cfg.attn_pool_residual the latent added to the attention
output, cfg.attn_pool_proj=False no output projection:

    x = blocks(tokens);  attn_out = attn(q(latent), kv(ln_kv(x)))
    pooled = r + mlp(ln(r)),  r = latent + attn_out (residual) or attn_out

Hooks (b = batch, p = pooled token, h = head):
    blocks.N.*: as the model's blocks, [b, p, ...] over the pooled tokens
    ln_kv.hook_*: [b, p, d_model] (with attn_pool_kv_norm)
    hook_q: [b, 1, h, d_head], the latent's query (the latent itself with
        cfg.attn_pool_q_proj=False, AIMv2)
    hook_k, hook_v: [b, p, h, d_head]
    hook_attn_scores: [b, h, 1, p], scaled dot products, masked keys at -inf
    hook_pattern: [b, h, 1, p], the pooling weights over the tokens
    hook_z: [b, 1, h, d_head]
    hook_result: [b, h, d_model], each head's share of the attention output (computed only
        when hooked: it sums, with b_O, to hook_attn_out)
    hook_attn_out: [b, d_model], the attention output (after proj, if any)
    ln.hook_*, mlp.hook_pre / hook_post: the MLP's norm and hidden layer
    hook_mlp_out: [b, d_model]; the pooled vector is hook_attn_out + hook_mlp_out (plus the
        latent with attn_pool_residual)
    With cfg.attn_pool_mlp=False (AIMv2) there is no norm, MLP nor hook_mlp_out: the pooled
    vector is hook_attn_out (plus the latent with attn_pool_residual).
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

from hooked_vit.block import TransformerBlock
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
        self.proj = nn.Linear(d, d) if cfg.attn_pool_proj else None
        block_cfg = _block_cfg(cfg) if cfg.attn_pool_layers else None
        self.blocks = nn.ModuleList([TransformerBlock(block_cfg, i) for i in range(cfg.attn_pool_layers)])
        self.ln_kv = make_norm(cfg, d) if cfg.attn_pool_kv_norm else None
        self.ln = make_norm(cfg, d) if cfg.attn_pool_mlp else None
        mlp_cfg = replace(cfg, d_mlp=cfg.attn_pool_d_mlp, mlp_type="mlp", mlp_norm=False, layer_scale=False,
                          attn_only_layer_scale=False, act_fn=cfg.attn_pool_act, global_pool="token",
                          class_token=True, distilled=False, d_image_embed=None, head_on_image_embed=False,
                          **_NO_PROBE)
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
        for block in self.blocks:
            _sync_switches(block.cfg, self.cfg)
            x = block(x, key_mask)
        kv_in = x if self.ln_kv is None else self.ln_kv(x)
        b, p, d = x.shape
        latent = self.latent.expand(b, -1, -1)
        q = self.hook_q((latent if self.q is None else self.q(latent)).view(b, 1, self.n_heads, self.d_head))
        k, v = self.kv(kv_in).view(b, p, 2, self.n_heads, self.d_head).unbind(2)
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
            attn_out = result.sum(1) + self.b_O
        else:
            attn_out = z.reshape(b, d) if self.proj is None else self.proj(z.reshape(b, d))
        attn_out = self.hook_attn_out(attn_out)
        resid = attn_out + self.latent[0, 0] if self.cfg.attn_pool_residual else attn_out
        if self.mlp is None:
            return resid
        return resid + self.hook_mlp_out(self.mlp(self.ln(resid)))

    def single_token(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The head applied to each vector alone (a one-token sequence: every attention weight
        is 1), without hooks: the MAP model's reading of one token, used by the logit lens."""
        d = self.cfg.d_model
        for block in self.blocks:  # one-token self-attention: proj(value) of the normed vector
            attn = block.attn
            d_attn = attn.cfg.n_heads * attn.cfg.d_head
            bias = None if attn.qkv.bias is None else attn.qkv.bias[2 * d_attn:]
            x = x + attn.proj(F.linear(block.ln1.functional(x), attn.qkv.weight[2 * d_attn:], bias))
            x = x + block.mlp.fc2(block.mlp.act(block.mlp.fc1(block.ln2.functional(x))))
        kv_in = x if self.ln_kv is None else self.ln_kv.functional(x)
        out = F.linear(kv_in, self.kv.weight[d:], None if self.kv.bias is None else self.kv.bias[d:])
        out = out if self.proj is None else self.proj(out)
        out = out + self.latent[0, 0] if self.cfg.attn_pool_residual else out
        if self.mlp is None:
            return out
        return out + self.mlp.fc2(self.mlp.act(self.mlp.fc1(self.ln.functional(out))))

    @property
    def W_V(self) -> Float[Tensor, "h d_model d_head"]:
        """The pooling heads' value maps (the second half of `kv`)."""
        return einops.rearrange(self.kv.weight[self.cfg.d_model:], "(h e) m -> h m e", h=self.n_heads)

    @property
    def b_V(self) -> Optional[Float[Tensor, "h d_head"]]:
        bias = self.kv.bias
        return None if bias is None else einops.rearrange(bias[self.cfg.d_model:], "(h e) -> h e", h=self.n_heads)

    @property
    def W_O(self) -> Float[Tensor, "h d_head d_model"]:
        """z -> attention output per head (the identity's blocks without a projection)."""
        w = self.proj.weight if self.proj is not None else torch.eye(self.cfg.d_model, device=self.kv.weight.device,
                                                                       dtype=self.kv.weight.dtype)
        return einops.rearrange(w, "m (h e) -> h e m", h=self.n_heads)

    @property
    def b_O(self) -> Float[Tensor, "d_model"]:
        return self.proj.bias if self.proj is not None else self.kv.weight.new_zeros(self.cfg.d_model)


# The sub-configs of the head's MLP and blocks are not themselves attention-pooling models.
_NO_PROBE = dict(attn_pool_layers=0, attn_pool_kv_norm=False, attn_pool_residual=False, attn_pool_proj=True)
# Run-time switches the pooling blocks read from the model's config at every forward.
_SWITCHES = ("use_attn_result", "use_fused_attn", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in")


def _block_cfg(cfg: HookedViTConfig) -> HookedViTConfig:
    """The config of the attentive probe's self-attention blocks: plain pre-norm blocks of the
    pool's width, heads and MLP, no RoPE, joint attention over the pooled tokens."""
    return replace(cfg, n_heads=cfg.attn_pool_heads, d_head=None, d_mlp=cfg.attn_pool_d_mlp, act_fn=cfg.attn_pool_act,
                   rope_type=None, rope_options={}, rel_pos_bias=False, attention_type="joint", num_frames=None,
                   tubelet_size=1, pos_embed_type="learned", block_type="pre_norm", layer_scale=False,
                   attn_only_layer_scale=False, qk_norm=False, attn_norm=False, diff_attn=False,
                   diff_dual_lambda=False, mlp_type="mlp", mlp_norm=False, qkv_bias=True, proj_bias=True,
                   mlp_bias=True, global_pool="token", class_token=True, n_reg_tokens=0, distilled=False, d_image_embed=None, head_on_image_embed=False, **_NO_PROBE)


def _sync_switches(block_cfg: HookedViTConfig, cfg: HookedViTConfig) -> None:
    for name in _SWITCHES:
        setattr(block_cfg, name, getattr(cfg, name))
