"""Weight processing that leaves the logits unchanged (as TransformerLens does for LMs).

- fold_layer_scale: multiply the LayerScale gammas into W_O/b_O and W_out/b_out.
- fold_ln: fold each LayerNorm's weight and bias into the linear map that reads it
  (ln1 -> qkv, ln2 -> fc1, ln_final -> head); the norms become "LNPre" (no affine).
- center_writing_weights: remove the mean over d_model from everything written to the
  residual stream. Valid because every reader of the stream is a LayerNorm, which
  ignores a per-token constant; refused for post-norm blocks, whose attention reads the
  raw stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import einops
import torch
from torch import Tensor, nn
from transformer_lens import FactoredMatrix
from hooked_vit.errors import UserError

if TYPE_CHECKING:  # hooked_vit.model imports this module, never the other way round
    from hooked_vit.model import HookedViT


@torch.no_grad()
def process_weights_(
    model: HookedViT, fold_ln: bool = True, center_writing_weights: bool = True, fold_layer_scale: bool = True
) -> None:
    _check_architecture(model, fold_ln, center_writing_weights)
    if center_writing_weights and model.cfg.layer_scale and not fold_layer_scale:
        raise UserError("center_writing_weights with LayerScale needs fold_layer_scale=True")
    if fold_layer_scale:
        fold_layer_scale_(model)
    if fold_ln:
        fold_layer_norm_(model)
    if center_writing_weights:
        center_writing_weights_(model)


def _check_architecture(model: HookedViT, fold_ln: bool, center_writing_weights: bool) -> None:
    """Refuse processing that would change the function of the newer architectures."""
    cfg = model.cfg
    if center_writing_weights and cfg.norm_type == "rmsnorm":
        raise UserError("center_writing_weights is invalid with RMSNorm: it does not remove the mean, so the "
                         "readers of the stream see a per-token constant")
    if center_writing_weights and cfg.embed_norm:
        raise UserError("center_writing_weights is invalid with a norm in the patch embedding (embed_norm): "
                         "centring the projection changes what that norm computes")
    if fold_ln and cfg.global_pool == "map" and cfg.final_norm == "pooled":
        raise UserError("fold_ln with a MAP head and a pooled final norm is not supported")


@torch.no_grad()
def fold_layer_scale_(model: HookedViT) -> None:
    for block in model.blocks:
        for sub, linear in ((block.attn, block.attn.proj), (block.mlp, block.mlp.fc2)):
            if sub.ls_gamma is None:
                continue
            gamma = sub.ls_gamma
            linear.weight.mul_(gamma[:, None])
            if linear.bias is not None:
                linear.bias.mul_(gamma)
            sub.ls_gamma = None
    model.cfg.layer_scale = False


@torch.no_grad()
def fold_layer_norm_(model: HookedViT) -> None:
    if model.cfg.block_type == "post_norm":
        raise UserError(
            "fold_ln needs pre-norm blocks; this model's post-norm blocks (ResPostBlock) normalise "
            "the sublayer outputs, which no following linear map reads directly"
        )
    cfg = model.cfg
    if model.attn_pool is not None and (cfg.attn_pool_layers or cfg.attn_pool_kv_norm):
        raise UserError(
            "fold_ln: the final norm's output feeds an attentive probe (V-JEPA 2's: self-attention blocks and a "
            "norm before the keys and values), not a linear map it could be folded into; load without fold_ln"
        )
    for block in model.blocks:
        _fold_into(block.ln1, [block.attn.qkv])
        if hasattr(block, "ln_time"):  # divided space-time attention
            _fold_into(block.ln_time, [block.attn_time.qkv])
        _fold_into(block.ln2, [block.mlp.fc1])
    if model.ln_final is not None:
        # The final norm's reader: CLIP's image projection, else the head(s).
        readers = [model.image_proj] if model.image_proj is not None else [model.head, model.head_dist]
        if model.attn_pool is not None:  # the MAP head's keys and values read the normalised tokens
            readers = [model.attn_pool.kv]
        # global_pool="token_avg" reads [ln(class), mean ln(patches)]: the affine map acts on both halves.
        # A headless model (features out, e.g. VJEPA2Model, Dinov2Model) has no reader: its final
        # norm keeps its affine part, which is part of the features.
        readers = [h for h in readers if h is not None]
        if readers:
            _fold_into(model.ln_final, readers, repeat=model.cfg.d_pooled // model.cfg.d_model)
    model.cfg.normalization_type = "LNPre"


def _fold_into(ln: nn.Module, readers: list[nn.Linear], repeat: int = 1) -> None:
    if ln.weight is None:
        return
    weight = ln.weight.repeat(repeat)
    bias_in = None if ln.bias is None else ln.bias.repeat(repeat)  # RMSNorm has none
    for linear in readers:
        if bias_in is not None:
            bias = linear.weight @ bias_in
            if linear.bias is None:
                linear.bias = nn.Parameter(bias)
            else:
                linear.bias.add_(bias)
        linear.weight.mul_(weight[None, :])
    ln.weight, ln.bias = None, None


@torch.no_grad()
def center_writing_weights_(model: HookedViT) -> None:
    cfg = model.cfg
    if cfg.block_type == "post_norm":
        raise UserError("center_writing_weights is invalid for post-norm blocks: attention reads the raw stream")
    if cfg.final_norm is None:
        raise UserError("center_writing_weights needs a final norm: the head reads the raw stream")
    if cfg.layer_scale:
        raise UserError("fold LayerScale first (fold_layer_scale=True)")
    embed = model.embed
    # Resampling a table to another grid (dynamic size, NaFlex) mixes rows with weights that sum
    # to 1, so centred rows stay centred; factorized row + column tables are centred each.
    for param in (*embed.prefix_params(), embed.pos_embed, embed.time_embed, embed.pos_table, embed.pos_embed_y,
                  embed.pos_embed_x):
        if param is not None:
            param.sub_(param.mean(-1, keepdim=True))
    _center_rows(embed.proj.weight, embed.proj.bias)
    for block in model.blocks:
        if hasattr(block, "attn_time"):
            _center_rows(block.attn_time.proj.weight, block.attn_time.proj.bias)
        _center_rows(block.attn.proj.weight, block.attn.proj.bias)
        _center_rows(block.mlp.fc2.weight, block.mlp.fc2.bias)


def _center_rows(weight: Tensor, bias: Tensor | None) -> None:
    """Output dimension is dim 0 (Linear and Conv2d): subtract its mean."""
    weight.sub_(weight.mean(0, keepdim=True))
    if bias is not None:
        bias.sub_(bias.mean())


# ------------------------------------------------------------------ TransformerLens extras
# TransformerLens's HookedTransformer.fold_value_biases / center_unembed /
# refactor_factored_attn_matrices, on the timm weight layout (qkv and proj Linears).
# https://transformerlensorg.github.io/TransformerLens/generated/code/transformer_lens.HookedTransformer.html


def _set_qkv_(attn: nn.Module, i: int, weight: Tensor, bias: Tensor) -> None:
    """Write W_[QKV][i] [h, d_model, d_head] and b [h, d_head] back into the fused qkv Linear."""
    d_attn = attn.cfg.n_heads * attn.cfg.d_head
    if attn.qkv.bias is None:
        attn.qkv.bias = nn.Parameter(attn.qkv.weight.new_zeros(3 * d_attn))
    attn.qkv.weight[i * d_attn : (i + 1) * d_attn] = einops.rearrange(weight, "h m e -> (h e) m")
    attn.qkv.bias[i * d_attn : (i + 1) * d_attn] = bias.reshape(-1)


def _require_bilinear_heads(model: HookedViT, what: str) -> None:
    cfg = model.cfg
    for flag, reason in (("attn_norm", "a norm over the heads' outputs (attn_norm) sits between z and W_O"),
                         ("diff_attn", "differential attention's pattern is a difference of two softmax maps of "
                          "half-heads and its z passes a per-head RMS sub-norm (no one QK or OV per head)"),
                         ("qk_norm", "q and k are normalised (qk_norm), so QK is not a bilinear form"),
                         ("rope_type", "q and k are rotated by position (RoPE), so QK is not one bilinear form")):
        if getattr(cfg, flag):
            raise UserError(f"{what} is undefined here: {reason}")


def _require_no_layer_scale(model: HookedViT, what: str) -> None:
    if model.cfg.layer_scale:
        raise UserError(f"{what} rewrites W_O; fold LayerScale into it first (model.process_weights_(fold_layer_scale=True))")


@torch.no_grad()
def fold_value_biases_(model: HookedViT) -> None:
    """Move b_V into b_O: every attention row sums to one, so each head adds b_V[h] @ W_O[h]
    whatever it attends to (also with a key mask, whose rows still sum to one)."""
    if model.cfg.attn_norm:
        raise UserError("fold_value_biases is undefined with attn_norm: a norm over the heads sits between z and W_O")
    if model.cfg.diff_attn:
        raise UserError("fold_value_biases is undefined with differential attention (diff_attn): a pattern row "
                        "sums to 1 - lambda, not 1, and z passes a per-head RMS sub-norm before W_O")
    for block in model.blocks:
        attn = block.attn
        b_v = attn.b_V.reshape(-1)  # [h * d_head], the order proj reads z in
        if not bool(b_v.any()):
            continue
        if attn.proj.bias is None:
            attn.proj.bias = nn.Parameter(attn.proj.weight.new_zeros(model.cfg.d_model))
        attn.proj.bias.add_(attn.proj.weight @ b_v)  # before LayerScale, which proj's output gets
        d_attn = model.cfg.n_heads * model.cfg.d_head
        attn.qkv.bias[2 * d_attn :] = 0


@torch.no_grad()
def center_unembed_(model: HookedViT) -> None:
    """Remove the mean over classes from W_U and b_U: every image's logits shift by one
    constant, so softmax and the logit differences are unchanged (not the raw logits)."""
    model.require_head()
    # Without a head, CLIP's logits are the image embedding: centre the projection's rows.
    for head in (model.head, model.head_dist) if model.head is not None else (model.image_proj,):
        if head is None:
            continue
        head.weight.sub_(head.weight.mean(0, keepdim=True))
        if head.bias is not None:
            head.bias.sub_(head.bias.mean())


@torch.no_grad()
def refactor_factored_attn_matrices_(model: HookedViT) -> None:
    """Re-factor each head's QK and OV circuits evenly by SVD (TransformerLens's
    refactor_factored_attn_matrices): W_Q W_K^T (with the biases as an extra input row)
    and W_V W_O are unchanged, so is the model; b_V is folded into b_O first."""
    _require_bilinear_heads(model, "refactor_factored_attn_matrices")
    _require_no_layer_scale(model, "refactor_factored_attn_matrices")
    fold_value_biases_(model)
    for block in model.blocks:
        attn = block.attn
        q_eff = torch.cat([attn.W_Q, attn.b_Q[:, None, :]], dim=1)  # [h, d_model + 1, d_head]
        k_eff = torch.cat([attn.W_K, attn.b_K[:, None, :]], dim=1)
        q_even, k_even_t = FactoredMatrix(q_eff, k_eff.transpose(-1, -2)).make_even().pair
        k_even = k_even_t.transpose(-1, -2)
        _set_qkv_(attn, 0, q_even[:, :-1], q_even[:, -1])
        _set_qkv_(attn, 1, k_even[:, :-1], k_even[:, -1])
        u, s, v = FactoredMatrix(attn.W_V, attn.W_O).svd()
        _set_qkv_(attn, 2, u * s[:, None, :], torch.zeros_like(attn.b_V))
        attn.proj.weight.copy_(einops.rearrange(v, "h m e -> m (h e)"))
