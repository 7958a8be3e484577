"""Multi-head self-attention: where attention is computed.

Weights are stored as timm stores them (one fused `qkv` Linear, one `proj` Linear) so the
hot path runs the same kernels as timm; the TransformerLens views `W_Q`, `W_K`, `W_V`,
`W_O` and their biases are properties over that storage.
"""

from __future__ import annotations

from typing import Optional, Union

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vit.config import HookedViTConfig
from hooked_vit.hooks import is_hooked
from hooked_vit.layer_norm import make_norm
from hooked_vit.rope import apply_rope
from hooked_vit.errors import UserError

# Query, key and value inputs of every head, each [b, p, h, d_model].
HeadInputs = tuple[Tensor, Tensor, Tensor]


class Attention(nn.Module):
    """Self-attention whose output is what the sublayer writes to the residual stream.

    LayerScale (`ls_gamma`, timm's `ls1.gamma`) is applied inside the module so that
    `W_O`/`b_O` are exactly the map from `z` to the block's attention output.

    Hooks (b = batch, p = query position, q/k = query/key position, h = head):
        hook_q, hook_k, hook_v, hook_z: [b, p, h, d_head]
        hook_attn_scores: [b, h, q, k], scaled dot products, masked keys at -inf
        hook_pattern: [b, h, q, k], softmax of the scores
        hook_result: [b, p, h, d_model], per-head output (only with cfg.use_attn_result)

    The per-head input hooks (hook_q_input, hook_k_input, hook_v_input, hook_attn_in) are
    the block's, as in TransformerLens's `TransformerBlock`; see `TransformerBlock`.

    Grouped attention (docs/video.md): given x [b, g, p, d_model] the module attends within
    each of the g groups (TimeSformer's divided space-time attention); every hook then has
    the group axis after the batch axis (hook_q [b, g, p, h, d_head], hook_pattern
    [b, g, h, q, k]).

    When neither `hook_attn_scores` nor `hook_pattern` is hooked (and cfg.use_fused_attn),
    attention runs through `scaled_dot_product_attention`; otherwise the explicit path runs
    and edits returned by those hooks change the output.
    """

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.cfg = cfg
        d_attn = cfg.n_heads * cfg.d_head
        self.scale = cfg.d_head**-0.5
        self.qkv = nn.Linear(cfg.d_model, 3 * d_attn, bias=cfg.qkv_bias)
        self.proj = nn.Linear(d_attn, cfg.d_model, bias=cfg.proj_bias)
        self.ls_gamma: Optional[nn.Parameter] = (
            nn.Parameter(torch.ones(cfg.d_model)) if cfg.layer_scale else None
        )
        self.q_norm = make_norm(cfg, cfg.d_head) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, cfg.d_head) if cfg.qk_norm else None
        self.ln_z = make_norm(cfg, d_attn) if cfg.attn_norm else None
        self.rel_pos_table: Optional[nn.Parameter] = None
        self.rel_pos_mlp: Optional[RelPosMlp] = None
        self.hook_rel_pos_bias = None
        if cfg.rel_pos_bias:  # one bias per head and (query, key) pair, from the pair's 2-D offset
            from timm.layers import gen_relative_position_index

            gh, gw = cfg.grid_size
            if cfg.rel_pos_type == "table":  # BEiT / timm RelPosBias: a learned entry per offset
                n_rel = (2 * gh - 1) * (2 * gw - 1) + 3 * int(cfg.class_token)
                self.rel_pos_table = nn.Parameter(torch.zeros(n_rel, cfg.n_heads))
            else:  # timm RelPosMlp: an MLP of the log-spaced offset
                self.rel_pos_mlp = RelPosMlp(cfg)
            table_cls = cfg.class_token and cfg.rel_pos_type == "table"  # the table's class-token entries
            index = gen_relative_position_index(cfg.grid_size, class_token=table_cls)
            self.register_buffer("rel_pos_index", index, persistent=False)
            self.hook_rel_pos_bias = HookPoint()  # [1, h, q, k] ([b, h, q, k] after token removal), added to the scores
        self.hook_q = HookPoint()  # [b, p, h, d_head]
        self.hook_k = HookPoint()  # [b, p, h, d_head]
        self.hook_v = HookPoint()  # [b, p, h, d_head]
        # Only with RoPE (absent otherwise, so every hook point of a model fires):
        self.hook_rot_q = HookPoint() if cfg.rope_type else None  # [b, p, h, d_head]
        self.hook_rot_k = HookPoint() if cfg.rope_type else None  # [b, p, h, d_head]
        self.hook_attn_scores = HookPoint()  # [b, h, q, k]
        self.hook_pattern = HookPoint()  # [b, h, q, k]
        self.hook_z = HookPoint()  # [b, p, h, d_head]
        self.hook_result = HookPoint()  # [b, p, h, d_model], cfg.use_attn_result

    # ------------------------------------------------------------------------------------
    def forward(
        self,
        x: Union[Float[Tensor, "b p d_model"], HeadInputs],
        key_mask: Optional[Float[Tensor, "b k"]] = None,
        rope: Optional[Tensor] = None,
        positions: Optional[Tensor] = None,
    ) -> Float[Tensor, "b p d_model"]:
        """`x`: the (normalised) input [b, p, d_model] (or [b, g, p, d_model] for grouped
        attention), or, with the block's per-head input flags, the query, key and value inputs
        [b, p, h, d_model] of every head. `key_mask` [b, k] (bool, True = attend) hides padded
        tokens. `rope` [b or 1, p, h or 1, 2 * d_head]: this block's rotary table (sin and cos;
        identity rows for prefix tokens), see hooked_vit.rope. `positions` [b, p]: each
        token's index in the full sequence; with a relative position bias each kept pair keeps
        its own offset's bias (hook_rel_pos_bias is then [b, h, q, k])."""
        if isinstance(x, tuple):
            q, k, v = self._per_head_qkv(x)
        else:
            if key_mask is not None and x.ndim != 3:
                raise UserError("key_mask (token removal, padding) is not supported with grouped attention")
            q, k, v = self.qkv(x).view(*x.shape[:-1], 3, self.cfg.n_heads, self.cfg.d_head).unbind(-3)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = self.hook_rot_q(apply_rope(q, rope, self.cfg).type_as(v))
            k = self.hook_rot_k(apply_rope(k, rope, self.cfg).type_as(v))
        q, k, v = q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2)  # [b, (g,) h, p, d_head]
        bias = None
        if self.hook_rel_pos_bias is not None:
            bias = self.hook_rel_pos_bias(self._rel_pos_bias(q.shape[-2], positions))
        if self.cfg.use_fused_attn and not (is_hooked(self.hook_attn_scores) or is_hooked(self.hook_pattern)):
            mask = None if key_mask is None else key_mask[:, None, None, :]
            if bias is not None:
                mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            z = self._explicit(q, k, v, key_mask, bias)
        z = self.hook_z(z.transpose(-3, -2))  # [b, (g,) p, h, d_head]
        if self.ln_z is not None:  # proj reads the normalised heads
            z = self.ln_z(z.flatten(-2)).view(z.shape)
        if self.cfg.use_attn_result:
            result = self.hook_result(torch.einsum("...phd,hdm->...phm", z, self.W_O))
            return result.sum(-2) + self.b_O
        out = self.proj(z.flatten(-2))
        return out if self.ls_gamma is None else out * self.ls_gamma

    def _per_head_qkv(self, inputs: HeadInputs) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [b, p, h, d_head] from each head's own query, key and value input
        [b, p, h, d_model], so an edit can reach one head only."""
        weights = ((self.W_Q, self.b_Q), (self.W_K, self.b_K), (self.W_V, self.b_V))
        q, k, v = (torch.einsum("bphm,hme->bphe", i, w) + bias for i, (w, bias) in zip(inputs, weights))
        return q, k, v

    def _rel_pos_bias(self, n_tokens: int, positions: Optional[Tensor] = None) -> Float[Tensor, "1_or_b h q k"]:
        """The bias [1, h, n, n] over the full sequence; with `positions` [b, p] (tokens removed)
        the rows and columns of the kept tokens, [b, h, p, p]."""
        full = self._full_rel_pos_bias()
        if positions is not None:
            rows, cols = positions[:, :, None], positions[:, None, :]
            return full[0][:, rows, cols].transpose(0, 1)  # [h, b, p, p] -> [b, h, p, p]
        n = full.shape[-1]
        if n_tokens != n:
            raise UserError(f"a relative-position-bias model needs its full sequence of {n} tokens (got {n_tokens}) "
                             "or each token's position (positions=): other grids are not supported for it")
        return full

    def _full_rel_pos_bias(self) -> Float[Tensor, "1 h n n"]:
        n = self.cfg.n_prefix_tokens + self.cfg.n_patches
        if self.rel_pos_table is not None:
            return self.rel_pos_table[self.rel_pos_index.view(-1)].view(n, n, -1).permute(2, 0, 1)[None]
        n_prefix, n_patches = self.cfg.n_prefix_tokens, self.cfg.n_patches
        per_offset = self.rel_pos_mlp(self.rel_pos_mlp.coords).flatten(0, 1)  # [offsets, h]
        bias = per_offset[self.rel_pos_index.view(-1)].view(n_patches, n_patches, -1).permute(2, 0, 1)
        return F.pad(bias, [n_prefix, 0, n_prefix, 0])[None]  # prefix-token pairs: 0

    def _explicit(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                  bias: Optional[Tensor] = None) -> Tensor:
        # Scale q before the product, as timm's explicit path does, for matching rounding.
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        scores = self.hook_attn_scores(scores)
        pattern = self.hook_pattern(scores.softmax(dim=-1))
        return pattern @ v

    # --- TransformerLens weight views -------------------------------------------------
    def _qkv_weight(self, i: int) -> Float[Tensor, "h d_model d_head"]:
        d_attn = self.cfg.n_heads * self.cfg.d_head
        w = self.qkv.weight[i * d_attn : (i + 1) * d_attn]  # [h*d_head, d_model]
        return einops.rearrange(w, "(h e) m -> h m e", h=self.cfg.n_heads)

    def _qkv_bias(self, i: int) -> Float[Tensor, "h d_head"]:
        d_attn = self.cfg.n_heads * self.cfg.d_head
        if self.qkv.bias is None:
            return self.qkv.weight.new_zeros(self.cfg.n_heads, self.cfg.d_head)
        return self.qkv.bias[i * d_attn : (i + 1) * d_attn].view(self.cfg.n_heads, self.cfg.d_head)

    @property
    def W_Q(self) -> Float[Tensor, "h d_model d_head"]:
        return self._qkv_weight(0)

    @property
    def W_K(self) -> Float[Tensor, "h d_model d_head"]:
        return self._qkv_weight(1)

    @property
    def W_V(self) -> Float[Tensor, "h d_model d_head"]:
        return self._qkv_weight(2)

    @property
    def b_Q(self) -> Float[Tensor, "h d_head"]:
        return self._qkv_bias(0)

    @property
    def b_K(self) -> Float[Tensor, "h d_head"]:
        return self._qkv_bias(1)

    @property
    def b_V(self) -> Float[Tensor, "h d_head"]:
        return self._qkv_bias(2)

    @property
    def W_O(self) -> Float[Tensor, "h d_head d_model"]:
        """z -> attention output, LayerScale folded in."""
        w = einops.rearrange(self.proj.weight, "m (h e) -> h e m", h=self.cfg.n_heads)
        return w if self.ls_gamma is None else w * self.ls_gamma

    @property
    def b_O(self) -> Float[Tensor, "d_model"]:
        b = self.proj.bias if self.proj.bias is not None else self.proj.weight.new_zeros(self.cfg.d_model)
        return b if self.ls_gamma is None else b * self.ls_gamma


class RelPosMlp(nn.Module):
    """timm's RelPosMlp ("cr" mode, Swin-V2's continuous position bias without its sigmoid):
    bias[h, offset] = fc2(relu(fc1(c)))[h] on the log-spaced offset c = sign(d) * log(1 + |d|)
    of each (row, col) offset d; `coords` [2 * gh - 1, 2 * gw - 1, 2] is a buffer."""

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(2, cfg.rel_pos_mlp_dim)
        self.fc2 = nn.Linear(cfg.rel_pos_mlp_dim, cfg.n_heads)
        gh, gw = cfg.grid_size
        offsets = torch.stack(torch.meshgrid(torch.arange(1 - gh, gh), torch.arange(1 - gw, gw), indexing="ij"), -1)
        coords = torch.sign(offsets) * torch.log(1.0 + offsets.abs().float())
        self.register_buffer("coords", coords.float(), persistent=False)

    def forward(self, coords: Float[Tensor, "... 2"]) -> Float[Tensor, "... h"]:
        return self.fc2(F.relu(self.fc1(coords)))
