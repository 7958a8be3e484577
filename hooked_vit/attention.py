"""Multi-head self-attention: where attention is computed.

Weights are stored as timm stores them (one fused `qkv` Linear, one `proj` Linear) so the
hot path runs the same kernels as timm; the TransformerLens views `W_Q`, `W_K`, `W_V`,
`W_O` and their biases are properties over that storage.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vit.config import HookedViTConfig
from hooked_vit.hooks import is_hooked
from hooked_vit.layer_norm import RMSNorm, make_norm
from hooked_vit.rope import apply_rope
from hooked_vit.errors import UserError

# Query, key and value inputs of every head, each [b, p, h, d_model].
HeadInputs = tuple[Tensor, Tensor, Tensor]
# timm's DiffAttention sub-norm: RmsNorm(2 * head_dim, eps=1e-5) whatever the model's norm.
DIFF_SUB_NORM_EPS = 1e-5


def diff_lambda_init(layer: int) -> float:
    """Differential attention's lambda_init at block `layer` (0-based), 0.8 - 0.6 exp(-0.3 layer):
    the paper's per-layer schedule (Ye et al. 2024, "Differential Transformer", arXiv:2410.05258,
    with its 1-based l - 1) as timm's set_lambda_init(depth) computes it."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


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

    Differential attention (cfg.diff_attn; Ye et al. 2024, "Differential Transformer",
    arXiv:2410.05258, as timm's DiffAttention computes it): head i's q and k are two half-heads
    (2i and 2i + 1) of d_head // 2, each with its own softmax map; the head attends to its values
    (width d_head) with map1 - lambda * map2, and z is RMS-normalised per head (`sub_norm`) and
    scaled by (1 - lambda_init) before proj. Its hooks:
        hook_q, hook_k: [b, p, 2h, d_head // 2], the half-heads (2i, 2i + 1: head i's two maps)
        hook_v: [b, p, h, d_head]
        hook_attn_scores: [b, 2h, q, k], both maps' scaled dot products
        hook_softmax_maps: [b, 2h, q, k], their softmax (map1 of head i at 2i, map2 at 2i + 1)
        hook_lambda: [b, h], lambda (one value per layer, repeated so an edit can act on one
            image's head)
        hook_pattern: [b, h, q, k], map1 - lambda * map2: the weights that multiply v
        hook_z: [b, p, h, d_head], pattern @ v, before sub_norm
        sub_norm.hook_scale [b, p, h, 1] (computed only when hooked), sub_norm.hook_normalized
            [b, p, h, d_head]: the per-head RMSNorm that W_O reads (times 1 - lambda_init)
    The fused path (two SDPA calls, as timm) runs unless scores, maps or pattern are hooked.
    """

    def __init__(self, cfg: HookedViTConfig, layer: int = 0):
        super().__init__()
        self.cfg = cfg
        d_attn = cfg.n_heads * cfg.d_head
        # Differential attention: q and k have two half-heads per head (softmax scale of the half).
        self.d_qk = cfg.d_head // 2 if cfg.diff_attn else cfg.d_head
        self.scale = self.d_qk**-0.5
        self.qkv = nn.Linear(cfg.d_model, 3 * d_attn, bias=cfg.qkv_bias)
        self.proj = nn.Linear(d_attn, cfg.d_model, bias=cfg.proj_bias)
        self.ls_gamma: Optional[nn.Parameter] = (
            nn.Parameter(torch.ones(cfg.d_model)) if cfg.layer_scale else None
        )
        self.q_norm = make_norm(cfg, self.d_qk) if cfg.qk_norm else None
        self.k_norm = make_norm(cfg, self.d_qk) if cfg.qk_norm else None
        self.ln_z = make_norm(cfg, d_attn) if cfg.attn_norm else None
        self.sub_norm: Optional[RMSNorm] = None
        if cfg.diff_attn:
            self._init_differential(layer)
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
        self.hook_q = HookPoint()  # [b, p, h, d_head] ([b, p, 2h, d_head // 2] with cfg.diff_attn)
        self.hook_k = HookPoint()  # [b, p, h, d_head] ([b, p, 2h, d_head // 2] with cfg.diff_attn)
        self.hook_v = HookPoint()  # [b, p, h, d_head]
        # Only with RoPE (absent otherwise, so every hook point of a model fires):
        self.hook_rot_q = HookPoint() if cfg.rope_type else None  # [b, p, h, d_head]
        self.hook_rot_k = HookPoint() if cfg.rope_type else None  # [b, p, h, d_head]
        self.hook_attn_scores = HookPoint()  # [b, h, q, k] ([b, 2h, q, k] with cfg.diff_attn)
        # Only with differential attention (cfg.diff_attn):
        self.hook_softmax_maps = HookPoint() if cfg.diff_attn else None  # [b, 2h, q, k]
        self.hook_lambda = HookPoint() if cfg.diff_attn else None  # [b, h]
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
        if self.cfg.diff_attn:  # head i's q, k as half-heads 2i, 2i + 1
            q, k = q.reshape(*q.shape[:-2], -1, self.d_qk), k.reshape(*k.shape[:-2], -1, self.d_qk)
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
        if self.cfg.diff_attn:
            z = self._differential(q, k, v, key_mask)
        elif self.cfg.use_fused_attn and not (is_hooked(self.hook_attn_scores) or is_hooked(self.hook_pattern)):
            mask = None if key_mask is None else key_mask[:, None, None, :]
            if bias is not None:
                mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            z = self._explicit(q, k, v, key_mask, bias)
        z = self.hook_z(z.transpose(-3, -2))  # [b, (g,) p, h, d_head]
        if self.cfg.diff_attn:  # each head's output normalised, then scaled
            z = self.sub_norm(z) * (1 - self.lambda_init)
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

    # --- differential attention ---------------------------------------------------------
    def _init_differential(self, layer: int) -> None:
        """timm DiffAttention's parameters (float32, as timm makes them; the model's dtype
        follows .to()) and its depth-dependent lambda_init (Ye et al. 2024)."""
        d_half = self.d_qk
        if self.cfg.diff_dual_lambda:  # timm's simplified form: two scalars
            self.lambda_a = nn.Parameter(torch.zeros((), dtype=torch.float32))
            self.lambda_b = nn.Parameter(torch.zeros((), dtype=torch.float32))
        else:  # the paper's re-parameterisation: lambda_1 = exp(lambda_q1 . lambda_k1), ...
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                setattr(self, name, nn.Parameter(torch.zeros(d_half, dtype=torch.float32)))
        self.sub_norm = RMSNorm(self.cfg.d_head, DIFF_SUB_NORM_EPS)
        self.lambda_init = diff_lambda_init(layer)

    def diff_lambda(self) -> Float[Tensor, ""]:
        """lambda = lambda_1 - lambda_2 + lambda_init (a 0-d tensor), as timm's _compute_lambda."""
        if self.cfg.diff_dual_lambda:
            lambda_1, lambda_2 = torch.exp(self.lambda_a), torch.exp(self.lambda_b)
        else:
            lambda_1 = torch.exp(torch.sum(self.lambda_q1 * self.lambda_k1, dim=-1).float())
            lambda_2 = torch.exp(torch.sum(self.lambda_q2 * self.lambda_k2, dim=-1).float())
        return lambda_1 - lambda_2 + self.lambda_init

    def _differential(self, q: Float[Tensor, "b h2 p e"], k: Float[Tensor, "b h2 p e"],
                      v: Float[Tensor, "b h p d_head"], key_mask: Optional[Tensor]) -> Float[Tensor, "b h p d_head"]:
        """(map1 - lambda * map2) @ v per head: two SDPA calls (timm's fused path) unless the
        scores, maps or pattern are hooked; the explicit path then fires them."""
        n_heads = self.cfg.n_heads
        lam = self.hook_lambda(self.diff_lambda().type_as(q).expand(q.shape[0], n_heads).contiguous())  # [b, h]
        lam = lam[:, :, None, None]
        explicit = (not self.cfg.use_fused_attn or is_hooked(self.hook_attn_scores)
                    or is_hooked(self.hook_softmax_maps) or is_hooked(self.hook_pattern))
        if not explicit:
            mask = None if key_mask is None else key_mask[:, None, None, :]
            (q1, q2), (k1, k2) = q.unflatten(1, (n_heads, 2)).unbind(2), k.unflatten(1, (n_heads, 2)).unbind(2)
            return F.scaled_dot_product_attention(q1, k1, v, attn_mask=mask) - lam * F.scaled_dot_product_attention(
                q2, k2, v, attn_mask=mask)
        scores = (q * self.scale) @ k.transpose(-2, -1)  # [b, 2h, q, k]; q scaled first, as timm's explicit path
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        maps = self.hook_softmax_maps(self.hook_attn_scores(scores).softmax(dim=-1)).unflatten(1, (n_heads, 2))
        pattern = self.hook_pattern(maps[:, :, 0] - lam * maps[:, :, 1])  # [b, h, q, k]
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
