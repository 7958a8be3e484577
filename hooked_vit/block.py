"""A transformer block: pre-norm (timm `Block`) or post-norm (timm `ResPostBlock`)."""

from __future__ import annotations

from typing import Optional

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vit.attention import Attention, HeadInputs
from hooked_vit.config import HookedViTConfig
from hooked_vit.layer_norm import LayerNorm, make_norm
from hooked_vit.mlp import MLP
from hooked_vit.errors import UserError


class TransformerBlock(nn.Module):
    """Residual block. Hooks are [b, p, d_model]; hook_mlp_in (a copy of resid_mid that the
    MLP reads) only fires with cfg.use_hook_mlp_in.

    Per-head attention inputs, as in TransformerLens's `TransformerBlock` (b = batch,
    p = position, h = head): hook_q_input, hook_k_input, hook_v_input [b, p, h, d_model],
    each head's own copy of resid_pre for its queries, keys and values (only with
    cfg.use_split_qkv_input); hook_attn_in [b, p, h, d_model], one copy shared by q, k and
    v (only with cfg.use_attn_in). In a pre-norm block ln1 then runs on the copies.

    pre_norm:  attn_out = attn(ln1(resid_pre));  mlp_out = mlp(ln2(resid_mid))
    post_norm: attn_out = ln1(attn(resid_pre));  mlp_out = ln2(mlp(resid_mid))

    parallel (cfg.parallel_attn_mlp, pre-norm): attn_out = attn(ln1(resid_pre));
               mlp_out = mlp(ln2(resid_pre)); resid_post = resid_pre + attn_out + mlp_out,
               and there is no resid_mid (hook_resid_mid is absent).

    Otherwise resid_mid = resid_pre + attn_out and resid_post = resid_mid + mlp_out: the
    sublayer hooks carry exactly what is added to the residual stream (LayerScale and the
    post-norm included). In a post-norm block `ln1`/`ln2` act on the sublayer outputs.

    Divided space-time attention (cfg.attention_type="divided_space_time", TimeSformer:
    Bertasius et al. 2021, "Is Space-Time Attention All You Need for Video Understanding?",
    sec. 3): before `attn` a temporal attention `attn_time` (with its norm `ln_time`) lets each
    patch token attend to the tokens at its own (row, col) in every frame:
        attn_time_out = attn_time(ln_time(patches grouped by position)), 0 on prefix tokens
        resid_time = resid_pre + attn_time_out
        attn_out = attn(ln1(resid_time grouped by frame, prefix tokens in every frame)),
                   the prefix tokens' outputs averaged over the frames
        resid_mid = resid_time + attn_out
    `attn_time`'s hooks are grouped [b, rows * cols, frames, ...], `attn`'s [b, frames,
    prefix + rows * cols, ...] (see `Attention`).
    """

    def __init__(self, cfg: HookedViTConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.ln1 = make_norm(cfg, cfg.d_model)
        self.attn = Attention(cfg, layer)
        self.ln2 = make_norm(cfg, cfg.d_model)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()  # [b, p, d_model]
        self.hook_attn_in = HookPoint()  # [b, p, h, d_model], cfg.use_attn_in
        self.hook_q_input = HookPoint()  # [b, p, h, d_model], cfg.use_split_qkv_input
        self.hook_k_input = HookPoint()  # [b, p, h, d_model], cfg.use_split_qkv_input
        self.hook_v_input = HookPoint()  # [b, p, h, d_model], cfg.use_split_qkv_input
        if cfg.attention_type == "divided_space_time":
            self.ln_time = LayerNorm(cfg.d_model, cfg.eps)
            self.attn_time = Attention(cfg)
            self.hook_attn_time_out = HookPoint()  # [b, p, d_model], 0 on prefix tokens
            self.hook_resid_time = HookPoint()  # [b, p, d_model]
        self.hook_attn_out = HookPoint()  # [b, p, d_model]
        # Absent in a parallel block (cfg.parallel_attn_mlp): both sublayers read resid_pre.
        self.hook_resid_mid = None if cfg.parallel_attn_mlp else HookPoint()  # [b, p, d_model]
        self.hook_mlp_in = HookPoint()  # [b, p, d_model], cfg.use_hook_mlp_in
        self.hook_mlp_out = HookPoint()  # [b, p, d_model]
        self.hook_resid_post = HookPoint()  # [b, p, d_model]

    def forward(
        self, resid_pre: Float[Tensor, "b p d_model"], key_mask: Optional[Tensor] = None,
        rope: Optional[Tensor] = None, positions: Optional[Tensor] = None,
    ) -> Float[Tensor, "b p d_model"]:
        """`rope`: this block's rotary table (hooked_vit.rope), None without RoPE. `positions`
        [b, p]: each token's index in the full sequence (relative position bias after token removal)."""
        resid_pre = self.hook_resid_pre(resid_pre)
        if self.cfg.attention_type == "divided_space_time":
            if key_mask is not None:
                raise UserError("token removal / key masks are not supported with divided space-time attention")
            if self.cfg.use_split_qkv_input or self.cfg.use_attn_in:
                raise UserError("per-head attention inputs (use_split_qkv_input / use_attn_in) are not supported "
                                 "with divided space-time attention; turn them off")
            resid_pre = self.hook_resid_time(resid_pre + self.hook_attn_time_out(self._time_attention(resid_pre)))
            attn_out = self._space_attention(resid_pre)  # attn adds to resid_time
        else:
            attn_out = self._attention(resid_pre, key_mask, rope, positions)
        attn_out = self.hook_attn_out(attn_out)
        if self.cfg.parallel_attn_mlp:  # x + attn(ln1(x)) + mlp(ln2(x)), ln2 a copy of ln1
            mlp_in = self.hook_mlp_in(resid_pre.clone()) if self.cfg.use_hook_mlp_in else resid_pre
            return self.hook_resid_post(resid_pre + attn_out + self.hook_mlp_out(self._mlp(mlp_in)))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        del attn_out  # freed before the MLP, as timm's block frees it: peak memory as timm's
        # A copy, as in TransformerLens, so an edit of the MLP input leaves resid_mid alone.
        mlp_in = self.hook_mlp_in(resid_mid.clone()) if self.cfg.use_hook_mlp_in else resid_mid
        return self.hook_resid_post(resid_mid + self.hook_mlp_out(self._mlp(mlp_in)))

    # Sublayers in their own methods so their inputs and hidden activations are freed on return
    # (a name held in forward keeps a [b, p, d] buffer alive to the end of the block; on CPU the
    # allocator then hands each block fresh pages, a few % of a ViT-B forward).
    def _attention(self, resid_pre: Float[Tensor, "b p d_model"], key_mask: Optional[Tensor],
                   rope: Optional[Tensor], positions: Optional[Tensor]) -> Float[Tensor, "b p d_model"]:
        """attn(ln1(x)) (pre-norm) or ln1(attn(x)) (post-norm), per-head inputs where asked."""
        post_norm = self.cfg.block_type == "post_norm"
        if self.cfg.use_split_qkv_input or self.cfg.use_attn_in:
            attn_in = self._per_head_inputs(resid_pre, norm=None if post_norm else self.ln1)
        else:
            attn_in = resid_pre if post_norm else self.ln1(resid_pre)
        attn_out = self.attn(attn_in, key_mask, rope=rope, positions=positions)
        return self.ln1(attn_out) if post_norm else attn_out

    def _mlp(self, mlp_in: Float[Tensor, "b p d_model"]) -> Float[Tensor, "b p d_model"]:
        """mlp(ln2(x)) (pre-norm) or ln2(mlp(x)) (post-norm)."""
        if self.cfg.block_type == "post_norm":
            return self.ln2(self.mlp(mlp_in))
        return self.mlp(self.ln2(mlp_in))

    def _per_head_inputs(self, resid_pre: Float[Tensor, "b p d_model"], norm: Optional[nn.Module]) -> HeadInputs:
        """Each head's query, key and value input [b, p, h, d_model] (copies of resid_pre
        through hook_{q,k,v}_input, or one through hook_attn_in), then `norm` (ln1 of a
        pre-norm block), as TransformerLens's `TransformerBlock` computes them."""
        if self.cfg.use_split_qkv_input and self.cfg.use_attn_in:
            raise UserError("use_split_qkv_input and use_attn_in are mutually exclusive (as in TransformerLens); turn one off")
        per_head = resid_pre[:, :, None].expand(-1, -1, self.cfg.n_heads, -1)
        if self.cfg.use_attn_in:
            shared = self.hook_attn_in(per_head.clone())
            shared = shared if norm is None else norm(shared)
            return shared, shared, shared
        q_in = self.hook_q_input(per_head.clone())
        k_in = self.hook_k_input(per_head.clone())
        v_in = self.hook_v_input(per_head.clone())
        if norm is None:
            return q_in, k_in, v_in
        return norm(q_in), norm(k_in), norm(v_in)

    def _time_attention(self, resid: Float[Tensor, "b p d_model"]) -> Float[Tensor, "b p d_model"]:
        """attn_time within each (row, col) across time; zero on the prefix tokens."""
        n = self.cfg.n_prefix_tokens
        groups = einops.rearrange(resid[:, n:], "b (t s) d -> b s t d", t=self.cfg.n_time)
        out = einops.rearrange(self.attn_time(self.ln_time(groups)), "b s t d -> b (t s) d")
        return torch.cat([out.new_zeros(out.shape[0], n, out.shape[-1]), out], dim=1)

    def _space_attention(self, resid: Float[Tensor, "b p d_model"]) -> Float[Tensor, "b p d_model"]:
        """attn within each frame, the prefix tokens in every frame, their outputs averaged."""
        n, t = self.cfg.n_prefix_tokens, self.cfg.n_time
        patches = einops.rearrange(resid[:, n:], "b (t s) d -> b t s d", t=t)
        prefix = resid[:, None, :n].expand(-1, t, -1, -1)
        out = self.attn(self.ln1(torch.cat([prefix, patches], dim=2)))  # [b, t, n + s, d]
        return torch.cat([out[:, :, :n].mean(1), einops.rearrange(out[:, :, n:], "b t s d -> b (t s) d")], dim=1)
