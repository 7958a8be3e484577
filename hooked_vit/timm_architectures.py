"""Reading a HookedViTConfig and weights off timm modules (never off model names).

Two timm classes are read: `VisionTransformer` (and `VisionTransformerDistilled`) from
timm.models.vision_transformer / deit, and `Eva` from timm.models.eva (EVA, EVA02, DINOv3,
Perception Encoder, RoPE-ViT). Each module of the model is inspected; a feature HookedViT does
not implement raises `UnsupportedModelError("unsupported feature: ...")` naming it.

`timm_state(model)` gives the weights under timm VisionTransformer names (what
`hooked_vit.loading.convert_timm_state_dict` maps), with EVA's separate q/k/v projections and
biases fused into one qkv, gated-MLP halves in HookedViT's [gate; linear] order and the new
sublayer norms under HookedViT names.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from hooked_vit.config import HookedViTConfig
from hooked_vit.errors import UnsupportedModelError
from hooked_vit.rope import build_rope, patch_table, rope_options_of, rope_type_of

ACTS = {("GELU", "none"): "gelu", ("GELU", "tanh"): "gelu_tanh", ("GELUTanh", "none"): "gelu_tanh",
        ("QuickGELU", "none"): "quick_gelu", ("ReLU", "none"): "relu", ("SiLU", "none"): "silu",
        ("Sigmoid", "none"): "sigmoid"}


def refuse(feature: str) -> None:
    raise UnsupportedModelError(f"unsupported feature: {feature}")


def is_identity(module: Optional[nn.Module]) -> bool:
    return module is None or isinstance(module, nn.Identity)


# ------------------------------------------------------------------ norms, activations, MLPs
def norm_kind(module: nn.Module, where: str) -> tuple[str, float, bool]:
    """("layernorm" | "rmsnorm", eps, has_bias) of a norm module, refusing other norms."""
    from timm.layers import RmsNorm

    kind = type(module).__name__
    if isinstance(module, nn.LayerNorm) and kind in ("LayerNorm",):
        if module.weight is None:
            refuse(f"a LayerNorm without affine parameters at {where}")
        return "layernorm", float(module.eps), module.bias is not None
    if type(module) is RmsNorm:
        if module.weight is None:
            refuse(f"an RmsNorm without a weight at {where}")
        return "rmsnorm", float(module.eps), False
    refuse(f"normalisation {kind} at {where} (LayerNorm and RmsNorm are supported)")
    raise AssertionError


def norms_of(model: nn.Module) -> tuple[str, float]:
    """The one norm type and eps every norm of the model uses (refused if they differ)."""
    from timm.layers import RmsNorm

    found = {}
    for name, m in model.named_modules():
        if name.startswith("patch_embed.backbone."):  # a hybrid stem's CNN runs as its own timm module
            continue
        if name.endswith(".sub_norm"):  # differential attention's own RmsNorm, read by _diff_options
            continue
        if isinstance(m, (nn.LayerNorm, RmsNorm)) or (re.search(r"Norm(2d)?(Fp32)?$", type(m).__name__)
                                                       and "Block" not in type(m).__name__):
            kind, eps, has_bias = norm_kind(m, name)
            if kind == "layernorm" and not has_bias:
                refuse(f"a LayerNorm without bias at {name}")
            found[name] = (kind, eps)
    kinds = set(found.values())
    if len(kinds) > 1:
        refuse(f"norms of different kinds or eps {sorted(kinds)}")
    return kinds.pop() if kinds else ("layernorm", 1e-6)


def act_name(act: nn.Module) -> str:
    key = (type(act).__name__, getattr(act, "approximate", "none"))
    if key not in ACTS:
        refuse(f"MLP activation {key[0]}")
    return ACTS[key]


def mlp_options(mlp: nn.Module, where: str) -> dict[str, Any]:
    """mlp_type, d_mlp, act_fn, mlp_norm, mlp_bias of a timm Mlp / GluMlp / SwiGLU."""
    from timm.layers import GluMlp, Mlp, SwiGLU

    if type(mlp) is Mlp:
        if not isinstance(mlp.fc1, nn.Linear):
            refuse(f"a convolutional MLP at {where}")
        return dict(mlp_type="mlp", d_mlp=mlp.fc1.out_features, act_fn=act_name(mlp.act),
                    mlp_norm=not is_identity(mlp.norm), mlp_bias=mlp.fc1.bias is not None)
    if type(mlp) is GluMlp:
        if not isinstance(mlp.fc1, nn.Linear):
            refuse(f"a convolutional gated MLP at {where}")
        return dict(mlp_type="glu", d_mlp=mlp.fc2.in_features, act_fn=act_name(mlp.act),
                    mlp_norm=not is_identity(mlp.norm), mlp_bias=mlp.fc1.bias is not None)
    if type(mlp) is SwiGLU:
        return dict(mlp_type="glu", d_mlp=mlp.fc2.in_features, act_fn=act_name(mlp.act),
                    mlp_norm=not is_identity(mlp.norm), mlp_bias=mlp.fc1_x.bias is not None)
    refuse(f"MLP type {type(mlp).__name__} at {where} (Mlp, GluMlp and SwiGLU are supported)")
    raise AssertionError


def same_in_every_block(blocks: nn.ModuleList, read: Callable[[nn.Module, str], dict[str, Any]]) -> dict[str, Any]:
    first = read(blocks[0], "blocks.0")
    for i, block in enumerate(blocks):
        if read(block, f"blocks.{i}") != first:
            refuse(f"blocks with different options (block {i} differs from block 0)")
    return first


# ------------------------------------------------------------------ patch embedding, head
def hybrid_embed_options(embed: nn.Module) -> dict[str, Any]:
    """A HybridEmbed: its CNN backbone is kept as a module (hybrid_backbone); the options
    describe the projection of its last feature map."""
    if embed.dynamic_img_pad or not embed.flatten:
        refuse("a hybrid CNN stem with dynamic_img_pad or without flattening")
    if isinstance(embed.proj, nn.Identity) and tuple(embed.patch_size) == (1, 1):  # proj=False: timm_state
        ratio = tuple(embed.feature_ratio)  # gives an identity 1x1 projection (exact)
        return dict(img_size=tuple(embed.img_size), patch_size=ratio, in_chans=embed.in_chans,
                    patch_embed_bias=False, d_backbone=embed.feature_dim)
    if not isinstance(embed.proj, nn.Conv2d) or embed.proj.kernel_size != embed.proj.stride \
            or tuple(embed.proj.kernel_size) != tuple(embed.patch_size) or embed.proj.padding != (0, 0):
        refuse("a hybrid CNN stem without its Conv2d projection (proj=False) or with kernel != stride")
    ratio, patch = tuple(embed.feature_ratio), tuple(embed.patch_size)
    img = tuple(embed.img_size)
    if any(i != f * r for i, f, r in zip(img, embed.feature_size, ratio)):
        refuse(f"a hybrid CNN stem whose feature map {tuple(embed.feature_size)} is not the image {img} over a "
               "whole stride")
    return dict(img_size=img, patch_size=(ratio[0] * patch[0], ratio[1] * patch[1]), in_chans=embed.in_chans,
                patch_embed_bias=embed.proj.bias is not None, d_backbone=embed.proj.in_channels,
                backbone_patch_size=patch)


def hybrid_backbone(model: nn.Module) -> Optional[nn.Module]:
    """A HybridEmbed's CNN backbone (run by HookedViT as the timm module it is); None otherwise."""
    from timm.layers import HybridEmbed

    embed = getattr(model, "patch_embed", None)
    return embed.backbone if type(embed) is HybridEmbed else None


def patch_embed_options(embed: nn.Module) -> dict[str, Any]:
    from timm.layers import HybridEmbed, PatchEmbed

    if type(embed) is HybridEmbed:
        return hybrid_embed_options(embed)
    if type(embed) is not PatchEmbed:
        refuse(f"patch embedding {type(embed).__name__} (timm's PatchEmbed and HybridEmbed are supported)")
    if embed.dynamic_img_pad:
        refuse("dynamic_img_pad")
    if not isinstance(embed.proj, nn.Conv2d) or embed.proj.kernel_size != embed.proj.stride:
        refuse("a patch embedding whose kernel differs from its stride")
    return dict(img_size=tuple(embed.img_size), patch_size=tuple(embed.patch_size),
                in_chans=embed.proj.in_channels, patch_embed_bias=embed.proj.bias is not None,
                embed_norm=not is_identity(embed.norm))


def attn_pool_options(pool: nn.Module) -> dict[str, Any]:
    from timm.layers import AttentionPoolLatent

    if type(pool) is not AttentionPoolLatent:
        refuse(f"attention pooling {type(pool).__name__} (only AttentionPoolLatent, global_pool='map')")
    if pool.latent_len != 1 or pool.pool != "token":
        refuse(f"attention pooling with {pool.latent_len} latents / pool_type={pool.pool!r} (one latent only)")
    if pool.pos_embed is not None or not is_identity(pool.q_norm) or pool.mlp is None or is_identity(pool.norm):
        refuse("attention pooling with a position embedding, qk_norm or no MLP")
    if isinstance(pool.q, nn.Identity) or pool.q.bias is None or pool.kv.bias is None:
        refuse("attention pooling without a biased query projection")
    if pool.latent.shape[-1] != pool.kv.in_features or pool.proj.out_features != pool.kv.in_features:
        refuse("attention pooling with a latent or output width other than the model's")
    return dict(global_pool="map", attn_pool_heads=pool.num_heads, attn_pool_d_mlp=pool.mlp.fc1.out_features,
                attn_pool_act=act_name(pool.mlp.act))


def head_options(model: nn.Module) -> dict[str, Any]:
    if not isinstance(model.head, (nn.Linear, nn.Identity)):
        refuse(f"classifier head {type(model.head).__name__} (a Linear or no head)")
    return dict(n_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
                head_bias=getattr(model.head, "bias", None) is not None)


def final_norm_of(model: nn.Module) -> Optional[str]:
    norm, fc_norm = not is_identity(model.norm), not is_identity(getattr(model, "fc_norm", None))
    if norm and fc_norm:
        refuse("both a per-token final norm and a pooled norm (norm and fc_norm)")
    return "token" if norm else "pooled" if fc_norm else None


def pooling_options(model: nn.Module, include_prefix: bool) -> dict[str, Any]:
    pool = getattr(model, "attn_pool", None)
    if pool is not None:
        return {**attn_pool_options(pool), "pool_include_prefix": include_prefix}
    if model.global_pool not in ("token", "avg", "max", "avgmax"):
        refuse(f"global_pool={model.global_pool!r} (token, avg, max, avgmax and map are supported)")
    return dict(global_pool=model.global_pool, pool_include_prefix=include_prefix)


# ------------------------------------------------------------------ VisionTransformer
def _diff_options(module: nn.Module, layer: int, where: str) -> dict[str, Any]:
    """Differential attention (timm's DiffAttention, or the attention of a DiffParallelScalingBlock):
    its lambda parameterisation, checking the parts HookedViT fixes (an RmsNorm sub-norm of eps
    1e-5 over 2 * head_dim, timm's per-depth lambda_init)."""
    from timm.layers import RmsNorm

    from hooked_vit.attention import DIFF_SUB_NORM_EPS, diff_lambda_init

    sub = module.sub_norm
    if type(sub) is not RmsNorm or sub.weight is None or float(sub.eps) != DIFF_SUB_NORM_EPS \
            or tuple(sub.normalized_shape) != (2 * module.head_dim,):
        refuse(f"a differential-attention sub-norm other than RmsNorm(2 * head_dim, eps=1e-5) at {where}")
    if abs(module.lambda_init - diff_lambda_init(layer)) > 1e-12:
        refuse(f"a differential-attention lambda_init {module.lambda_init} other than timm's schedule for depth "
               f"{layer} at {where}")
    return dict(diff_attn=True, diff_dual_lambda=bool(module.dual_lambda))


def _parallel_scaling_block(block: nn.Module, where: str) -> dict[str, Any]:
    """timm's ParallelScalingBlock (ViT-22B): one norm, a fused in-projection [fc1; q; k; v],
    attention and MLP added to the residual together (parallel_attn_mlp). A
    DiffParallelScalingBlock is the same block with differential attention (diff_attn):
    its head_dim is the half-head, its output projection always fused."""
    out_proj = block.out_proj if block.out_proj is not None else block.attn_out_proj
    d_model = block.in_proj.in_features
    if block.in_split[1:] != [d_model] * 3:
        refuse(f"a ParallelScalingBlock whose attention width differs from the model's at {where}")
    diff = {}
    if type(block).__name__ == "DiffParallelScalingBlock":
        diff = _diff_options(block, _layer_of(where), where)
    d_head = 2 * block.head_dim if diff else block.head_dim
    return dict(**diff, block_type="pre_norm", parallel_attn_mlp=True, n_heads=block.num_heads, d_head=d_head,
                qkv_bias=block.in_proj.bias is not None, proj_bias=out_proj.bias is not None,
                qk_norm=not is_identity(block.q_norm), attn_norm=False, layer_scale=not is_identity(block.ls),
                mlp_type="mlp", d_mlp=block.in_split[0], act_fn=act_name(block.mlp_act), mlp_norm=False,
                mlp_bias=True)


def _parallel_things_block(block: nn.Module, where: str) -> dict[str, Any]:
    """timm's ParallelThingsBlock: x + sum_j attn_j(norm_j(x)), then + sum_j mlp_j(norm_j(.)).
    Read as one pre-norm block whose attention has every branch's heads and whose MLP has
    every branch's hidden units; each branch's norm affine and LayerScale are folded into its
    projections (`_parallel_things_state`), so ln1 / ln2 normalise without weight and bias."""
    from timm.layers import Mlp
    from timm.layers.attention import Attention as TimmAttention

    attns, mlps = [b.attn for b in block.attns], [f.mlp for f in block.ffns]
    for attn in attns:
        if type(attn) is not TimmAttention or not is_identity(attn.q_norm) or not is_identity(attn.norm) \
                or getattr(attn, "gate", None) is not None:
            refuse(f"a ParallelThingsBlock branch with {type(attn).__name__}, qk_norm, an attention norm or a gate "
                   f"at {where}")
    for mlp in mlps:
        if type(mlp) is not Mlp or not is_identity(mlp.norm) or not isinstance(mlp.fc1, nn.Linear):
            refuse(f"a ParallelThingsBlock branch with MLP {type(mlp).__name__} or an MLP norm at {where}")
    return dict(block_type="pre_norm", n_heads=sum(a.num_heads for a in attns), d_head=attns[0].head_dim,
                qkv_bias=True, proj_bias=True, qk_norm=False, attn_norm=False, layer_scale=False, mlp_type="mlp",
                d_mlp=sum(m.fc1.out_features for m in mlps), act_fn=act_name(mlps[0].act), mlp_norm=False,
                mlp_bias=True)


def _vit_block(block: nn.Module, where: str) -> dict[str, Any]:
    from timm.layers import DiffAttention
    from timm.layers.attention import Attention as TimmAttention

    kind = type(block).__name__
    if kind in ("ParallelScalingBlock", "DiffParallelScalingBlock"):
        return _parallel_scaling_block(block, where)
    if kind == "ParallelThingsBlock":
        return _parallel_things_block(block, where)
    if kind not in ("Block", "ResPostBlock"):
        refuse(f"block type {kind} (Block, ResPostBlock, ParallelScalingBlock, DiffParallelScalingBlock and "
               "ParallelThingsBlock are supported)")
    attn = block.attn
    diff = {}
    if type(attn) is DiffAttention:
        diff = _diff_options(attn, _layer_of(where), where)
    elif type(attn) is not TimmAttention:
        refuse(f"attention type {type(attn).__name__}")
    if getattr(attn, "gate", None) is not None:
        refuse("gated attention (a sigmoid gate on the attention output)")
    ls = not is_identity(getattr(block, "ls1", None))
    if ls != (not is_identity(getattr(block, "ls2", None))):
        refuse("LayerScale on one sublayer only")
    return dict(**diff, block_type="post_norm" if kind == "ResPostBlock" else "pre_norm", n_heads=attn.num_heads,
                d_head=2 * attn.head_dim if diff else attn.head_dim, qkv_bias=attn.qkv.bias is not None,
                proj_bias=attn.proj.bias is not None, qk_norm=not is_identity(attn.q_norm),
                attn_norm=not is_identity(attn.norm), layer_scale=ls, **mlp_options(block.mlp, where))


def _layer_of(where: str) -> int:
    """The block index of "blocks.N" (differential attention's lambda_init depends on it)."""
    return int(where.rsplit(".", 1)[-1])


def vit_config(model: nn.Module) -> dict[str, Any]:
    distilled = getattr(model, "dist_token", None) is not None
    pooling = pooling_options(model, model.pool_include_prefix)
    if distilled:
        pooling["global_pool"] = "token"
    return dict(
        **patch_embed_options(model.patch_embed), **same_in_every_block(model.blocks, _vit_block),
        **head_options(model), **pooling,
        class_token=model.cls_token is not None, n_reg_tokens=model.num_reg_tokens, distilled=distilled,
        pos_embed=model.pos_embed is not None, no_embed_class=model.no_embed_class,
        dynamic_img_size=model.dynamic_img_size, ln_pre=not is_identity(model.norm_pre),
        final_norm=final_norm_of(model),
    )


# ------------------------------------------------------------------ Eva
def _eva_block(block: nn.Module, where: str) -> dict[str, Any]:
    from timm.layers import AttentionRope
    from timm.models.eva import EvaAttention

    kind = type(block).__name__
    if kind not in ("EvaBlock", "EvaBlockPostNorm"):
        refuse(f"block type {kind}")
    attn = block.attn
    if type(attn) not in (EvaAttention, AttentionRope):
        refuse(f"attention type {type(attn).__name__}")
    if getattr(attn, "gate", None) is not None:
        refuse("gated attention (a sigmoid gate on the attention output)")
    if attn.qkv is not None:
        qkv_bias = attn.qkv.bias is not None or getattr(attn, "q_bias", None) is not None
    else:
        qkv_bias = attn.q_proj.bias is not None
    gamma_1, gamma_2 = getattr(block, "gamma_1", None), getattr(block, "gamma_2", None)
    if gamma_1 is None and gamma_2 is not None:
        refuse("LayerScale on the MLP only")
    return dict(block_type="post_norm" if kind == "EvaBlockPostNorm" else "pre_norm", n_heads=attn.num_heads,
                d_head=attn.head_dim, qkv_bias=qkv_bias, proj_bias=attn.proj.bias is not None,
                qk_norm=not is_identity(attn.q_norm), attn_norm=not is_identity(attn.norm),
                layer_scale=gamma_1 is not None, attn_only_layer_scale=gamma_1 is not None and gamma_2 is None,
                rope_rotate_half=bool(getattr(attn, "rotate_half", False)),
                n_prefix_rope=attn.num_prefix_tokens, **mlp_options(block.mlp, where))


def rope_options(model: nn.Module) -> dict[str, Any]:
    rope = model.rope
    if rope is None:
        return {}
    rope_type = rope_type_of(rope)
    if rope_type is None:
        refuse(f"rotary embedding {type(rope).__name__} (RotaryEmbeddingCat, Mixed and DinoV3 are supported)")
    cfg = HookedViTConfig(d_model=1, n_layers=1, n_heads=1, d_mlp=1, n_classes=0, rope_type=rope_type,
                          rope_options=rope_options_of(rope))
    rebuilt = build_rope(cfg).to(next(iter(rope.parameters()), torch.zeros(())).device)
    rebuilt.load_state_dict(rope.state_dict())
    grid = tuple(model.patch_embed.grid_size)
    if not torch.equal(patch_table(rebuilt, grid, grid), patch_table(rope, grid, grid)):
        refuse(f"rotary embedding {type(rope).__name__} with options HookedViT could not read")
    return dict(rope_type=rope_type, rope_options=cfg.rope_options)


def eva_config(model: nn.Module) -> dict[str, Any]:
    block = same_in_every_block(model.blocks, _eva_block)
    if block.pop("n_prefix_rope") != model.num_prefix_tokens:
        refuse("RoPE skipping a number of tokens other than the prefix tokens")
    if model.rope is None:
        block.pop("rope_rotate_half")
    return dict(
        **patch_embed_options(model.patch_embed), **block, **head_options(model),
        **pooling_options(model, include_prefix=True if model.attn_pool is not None else False),
        **rope_options(model),
        class_token=model.cls_token is not None, n_reg_tokens=model.reg_token.shape[1] if model.reg_token is not None else 0,
        pos_embed=model.pos_embed is not None, no_embed_class=model.no_embed_class,
        dynamic_img_size=model.dynamic_img_size, ln_pre=not is_identity(model.norm_pre),
        final_norm=final_norm_of(model),
    )


# ------------------------------------------------------------------ Beit
def _beit_block(block: nn.Module, where: str) -> dict[str, Any]:
    attn = block.attn
    if type(block).__name__ != "Block" or type(attn).__name__ != "Attention":
        refuse(f"block type {type(block).__name__}")
    if attn.relative_position_bias_table is None:
        refuse("BEiT attention without a relative position bias")
    return dict(n_heads=attn.num_heads, d_head=attn.qkv.out_features // 3 // attn.num_heads,
                qkv_bias=attn.q_bias is not None, proj_bias=attn.proj.bias is not None,
                layer_scale=block.gamma_1 is not None, **mlp_options(block.mlp, where))


def beit_config(model: nn.Module) -> dict[str, Any]:
    if model.rel_pos_bias is not None:
        refuse("a relative position bias shared by all blocks (use_shared_rel_pos_bias)")
    if model.global_pool not in ("avg", "token"):
        refuse(f"global_pool={model.global_pool!r}")
    return dict(
        **patch_embed_options(model.patch_embed), **same_in_every_block(model.blocks, _beit_block),
        **head_options(model), global_pool=model.global_pool, rel_pos_bias=True, class_token=True,
        pos_embed=model.pos_embed is not None, final_norm=final_norm_of(model),
    )


# ------------------------------------------------------------------ VisionTransformerRelPos
def _rel_pos_options(rel_pos: nn.Module, where: str) -> dict[str, Any]:
    from timm.layers import Mlp, RelPosBias, RelPosMlp

    if type(rel_pos) is RelPosBias:
        return dict(rel_pos_type="table")
    if type(rel_pos) is RelPosMlp:
        if rel_pos.mode == "swin" or rel_pos.bias_gain is not None or not is_identity(rel_pos.bias_act):
            refuse(f"RelPosMlp in Swin-V2 mode (sigmoid, gain 16) at {where}")
        mlp = rel_pos.mlp
        if type(mlp) is not Mlp or type(mlp.act) is not nn.ReLU or not is_identity(mlp.norm) \
                or mlp.fc1.bias is None or mlp.fc2.bias is None:
            refuse(f"a relative-position MLP other than Linear-ReLU-Linear at {where}")
        return dict(rel_pos_type="log_mlp", rel_pos_mlp_dim=mlp.fc1.out_features)
    refuse(f"relative position module {type(rel_pos).__name__} at {where} (RelPosBias and RelPosMlp are supported)")
    raise AssertionError


def _relpos_block(block: nn.Module, where: str) -> dict[str, Any]:
    kind = type(block).__name__
    if kind not in ("RelPosBlock", "ResPostRelPosBlock"):
        refuse(f"block type {kind} (RelPosBlock and ResPostRelPosBlock are supported)")
    attn = block.attn
    if type(attn).__name__ != "RelPosAttention":
        refuse(f"attention type {type(attn).__name__}")
    if attn.rel_pos is None:  # shared_rel_pos: the model's one module (relpos_config reads it)
        rel_pos = {}
    else:
        rel_pos = _rel_pos_options(attn.rel_pos, where)
    ls = not is_identity(getattr(block, "ls1", None))
    return dict(block_type="post_norm" if kind == "ResPostRelPosBlock" else "pre_norm", n_heads=attn.num_heads,
                d_head=attn.head_dim, qkv_bias=attn.qkv.bias is not None, proj_bias=attn.proj.bias is not None,
                qk_norm=not is_identity(attn.q_norm), layer_scale=ls, **rel_pos, **mlp_options(block.mlp, where))


def relpos_config(model: nn.Module) -> dict[str, Any]:
    if model.global_pool not in ("avg", "token"):
        refuse(f"global_pool={model.global_pool!r} (avg and token are supported)")
    blocks = same_in_every_block(model.blocks, _relpos_block)
    if model.shared_rel_pos is not None:  # one module for every block: each block gets a copy (timm_state)
        blocks.update(_rel_pos_options(model.shared_rel_pos, "shared_rel_pos"))
    return dict(
        **patch_embed_options(model.patch_embed), **blocks,
        **head_options(model), global_pool=model.global_pool, rel_pos_bias=True,
        class_token=model.cls_token is not None, pos_embed=False, final_norm=final_norm_of(model),
    )


# ------------------------------------------------------------------ entry points
def architecture_options(model: nn.Module) -> dict[str, Any]:
    """HookedViTConfig fields of a timm model's architecture (sizes, tokens, blocks, head)."""
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        options = vit_config(model)
    elif type(model) is Eva:
        options = eva_config(model)
    elif type(model).__name__ == "Beit":
        options = beit_config(model)
    elif type(model).__name__ == "VisionTransformerRelPos":
        options = relpos_config(model)
    else:
        refuse(f"model class {type(model).__name__} (HookedViT reads timm's VisionTransformer, Eva, Beit and "
               "VisionTransformerRelPos)")
    norm_type, eps = norms_of(model)
    return dict(d_model=model.embed_dim, n_layers=len(model.blocks), norm_type=norm_type, eps=eps, **options)


def timm_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights under timm VisionTransformer names (see the module docstring)."""
    out: dict[str, Tensor] = {}
    state = model.state_dict()
    for name, value in state.items():
        if not name.endswith("relative_position_index"):  # BEiT's index buffer: rebuilt from the grid
            out[name] = value
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}."
        if type(block).__name__ in ("ParallelScalingBlock", "DiffParallelScalingBlock"):
            _parallel_state(block, p, out)
            continue
        if type(block).__name__ == "ParallelThingsBlock":
            _parallel_things_state(block, p, out)
            continue
        _attn_state(block.attn, p + "attn.", out)
        _mlp_state(block.mlp, p + "mlp.", out)
        _rename_prefix(out, p + "attn.relative_position_bias_table", p + "attn.rel_pos_table")
        _rename_prefix(out, p + "attn.rel_pos.relative_position_bias_table", p + "attn.rel_pos_table")
        _rename_prefix(out, p + "attn.rel_pos.mlp.", p + "attn.rel_pos_mlp.")
        for old, new in (("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma")):
            if p + old in out:
                out[p + new] = out.pop(p + old)
        for old, new in (("attn.norm.", "attn.ln_z."), ("mlp.norm.", "mlp.ln.")):
            _rename_prefix(out, p + old, p + new)
    shared = [k for k in out if k.startswith("shared_rel_pos.")]  # VisionTransformerRelPos(shared_rel_pos=True)
    for key in shared:
        value = out.pop(key)
        for i in range(len(model.blocks)):
            out[f"blocks.{i}.attn.rel_pos." + key.removeprefix("shared_rel_pos.")] = value.clone()
    for i in range(len(model.blocks) if shared else 0):
        _rename_prefix(out, f"blocks.{i}.attn.rel_pos.relative_position_bias_table", f"blocks.{i}.attn.rel_pos_table")
        _rename_prefix(out, f"blocks.{i}.attn.rel_pos.mlp.", f"blocks.{i}.attn.rel_pos_mlp.")
    _rename_prefix(out, "patch_embed.norm.", "embed.norm.")
    embed = getattr(model, "patch_embed", None)
    if hybrid_backbone(model) is not None and isinstance(embed.proj, nn.Identity):  # proj=False
        first = next(model.parameters())
        eye = torch.eye(embed.feature_dim, device=first.device, dtype=first.dtype)
        out["patch_embed.proj.weight"] = eye[..., None, None]
    _rename_prefix(out, "attn_pool.norm.", "attn_pool.ln.")
    return out


def _folded_branch(norm: nn.Module, first: nn.Linear, last: nn.Linear, ls: nn.Module) -> tuple[Tensor, ...]:
    """One branch norm -> first ... last -> LayerScale with the norm's weight and bias folded
    into `first` and the LayerScale into `last`: (first.weight, first.bias, last.weight, last.bias)."""
    w = norm.weight.detach()
    b = norm.bias.detach() if getattr(norm, "bias", None) is not None else torch.zeros_like(w)
    W = first.weight.detach()
    c = first.bias.detach() if first.bias is not None else W.new_zeros(W.shape[0])
    g = ls.gamma.detach() if not is_identity(ls) else w.new_ones(last.out_features)
    P = last.weight.detach()
    pb = last.bias.detach() if last.bias is not None else P.new_zeros(P.shape[0])
    return W * w, c + W @ b, g[:, None] * P, g * pb


def _parallel_things_state(block: nn.Module, p: str, out: dict[str, Tensor]) -> None:
    """A ParallelThingsBlock as one block (see `_parallel_things_block`): q, k and v rows of
    every attention branch side by side (branch 0's heads first), the output projections'
    columns likewise, their biases summed; the MLP branches concatenated the same way."""
    for key in [k for k in out if k.startswith((p + "attns.", p + "ffns."))]:
        del out[key]
    attn = [_folded_branch(b.norm, b.attn.qkv, b.attn.proj, b.ls) for b in block.attns]
    thirds = [(w.chunk(3), c.chunk(3)) for w, c, _, _ in attn]
    out[p + "attn.qkv.weight"] = torch.cat([torch.cat([t[0][i] for t in thirds]) for i in range(3)])
    out[p + "attn.qkv.bias"] = torch.cat([torch.cat([t[1][i] for t in thirds]) for i in range(3)])
    out[p + "attn.proj.weight"] = torch.cat([a[2] for a in attn], dim=1)
    out[p + "attn.proj.bias"] = torch.stack([a[3] for a in attn]).sum(0)
    mlp = [_folded_branch(f.norm, f.mlp.fc1, f.mlp.fc2, f.ls) for f in block.ffns]
    out[p + "mlp.fc1.weight"] = torch.cat([m[0] for m in mlp])
    out[p + "mlp.fc1.bias"] = torch.cat([m[1] for m in mlp])
    out[p + "mlp.fc2.weight"] = torch.cat([m[2] for m in mlp], dim=1)
    out[p + "mlp.fc2.bias"] = torch.stack([m[3] for m in mlp]).sum(0)
    norm = block.attns[0].norm
    for n in ("norm1", "norm2"):  # the affine parts now live in the projections
        out[p + f"{n}.weight"] = torch.ones_like(norm.weight.detach())
        if getattr(norm, "bias", None) is not None:
            out[p + f"{n}.bias"] = torch.zeros_like(norm.bias.detach())


def _parallel_state(block: nn.Module, p: str, out: dict[str, Tensor]) -> None:
    """A ParallelScalingBlock under a pre-norm block's names: in_norm as norm1 and (a copy) norm2,
    in_proj split into mlp.fc1 and attn.qkv, the output projection(s) as attn.proj and
    mlp.fc2 (a fused out_proj split by columns, its bias on attn.proj), ls as ls1 and ls2."""
    d_mlp = block.in_split[0]
    for suffix in ("weight", "bias"):
        norm = out.pop(p + f"in_norm.{suffix}", None)
        if norm is not None:
            out[p + f"norm1.{suffix}"], out[p + f"norm2.{suffix}"] = norm, norm.clone()
    w = out.pop(p + "in_proj.weight")
    out[p + "mlp.fc1.weight"], out[p + "attn.qkv.weight"] = w[:d_mlp], w[d_mlp:]
    b = out.pop(p + "in_proj.bias", None)
    if b is not None:
        out[p + "mlp.fc1.bias"], out[p + "attn.qkv.bias"] = b[:d_mlp], b[d_mlp:]
    else:
        out[p + "mlp.fc1.bias"] = out.pop(p + "mlp_bias")
    if block.out_proj is not None:
        w = out.pop(p + "out_proj.weight")
        d_attn = w.shape[1] - d_mlp
        out[p + "attn.proj.weight"], out[p + "mlp.fc2.weight"] = w[:, :d_attn], w[:, d_attn:]
        b = out.pop(p + "out_proj.bias", None)
        if b is not None:
            out[p + "attn.proj.bias"] = b
    else:
        _rename_prefix(out, p + "attn_out_proj.", p + "attn.proj.")
        _rename_prefix(out, p + "mlp_out_proj.", p + "mlp.fc2.")
    if p + "mlp.fc2.bias" not in out:  # HookedViT's MLP has both biases or neither: a zero fc2 bias
        out[p + "mlp.fc2.bias"] = out[p + "mlp.fc2.weight"].new_zeros(out[p + "mlp.fc2.weight"].shape[0])
    for n in ("q_norm.", "k_norm.", "sub_norm.", "lambda_"):  # lambda_ / sub_norm.: DiffParallelScalingBlock
        _rename_prefix(out, p + n, p + "attn." + n)
    gamma = out.pop(p + "ls.gamma", None)
    if gamma is not None:
        out[p + "ls1.gamma"], out[p + "ls2.gamma"] = gamma, gamma.clone()


def _rename_prefix(state: dict[str, Tensor], old: str, new: str) -> None:
    for key in [k for k in state if k.startswith(old)]:
        state[new + key[len(old):]] = state.pop(key)


def _attn_state(attn: nn.Module, p: str, out: dict[str, Tensor]) -> None:
    """EVA's q_bias / v_bias (k has none) and separate q/k/v projections as one qkv Linear."""
    if getattr(attn, "qkv", None) is not None:
        q_bias = out.pop(p + "q_bias", None)
        v_bias = out.pop(p + "v_bias", None)
        if q_bias is not None:
            out[p + "qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
        return
    if getattr(attn, "q_proj", None) is None:
        return
    groups = getattr(attn, "num_kv_groups", 1)  # grouped-query attention: kv heads expanded per query head
    projs = [_expand_kv(out.pop(p + f"{n}_proj.weight"), groups if n != "q" else 1, attn.head_dim) for n in "qkv"]
    out[p + "qkv.weight"] = torch.cat(projs)
    biases = [out.pop(p + f"{n}_proj.bias", None) for n in "qkv"]
    biases = [b if b is None or n == "q" else _expand_kv(b, groups, attn.head_dim) for b, n in zip(biases, "qkv")]
    if any(b is not None for b in biases):
        out[p + "qkv.bias"] = torch.cat([b if b is not None else torch.zeros_like(w[:, 0])
                                         for b, w in zip(biases, projs)])


def _expand_kv(w: Tensor, groups: int, d_head: int) -> Tensor:
    """A k or v projection's rows [kv_heads * d_head, ...] repeated so query head h reads kv
    head h // groups (timm's repeat_interleave): exact, since k_norm and RoPE act per head."""
    if groups == 1:
        return w
    heads = w.reshape(-1, d_head, *w.shape[1:])
    return heads.repeat_interleave(groups, dim=0).reshape(-1, *w.shape[1:])


def _mlp_state(mlp: nn.Module, p: str, out: dict[str, Tensor]) -> None:
    """Gated MLPs' fc1 as [gate; linear] rows."""
    kind = type(mlp).__name__
    if kind == "SwiGLU":
        for suffix in ("weight", "bias"):
            g, x = out.pop(p + f"fc1_g.{suffix}", None), out.pop(p + f"fc1_x.{suffix}", None)
            if g is not None:
                out[p + f"fc1.{suffix}"] = torch.cat([g, x])
    elif kind == "GluMlp" and mlp.gate_last:  # x1 * act(x2): the gate is the second half
        for suffix in ("weight", "bias"):
            w = out.get(p + f"fc1.{suffix}")
            if w is not None:
                a, b = w.chunk(2)
                out[p + f"fc1.{suffix}"] = torch.cat([b, a])


def timm_layout(state: dict[str, Tensor], like: nn.Module) -> dict[str, Tensor]:
    """Inverse of `timm_state`: weights under VisionTransformer names (with HookedViT's fused
    qkv, [gate; linear] fc1 and sublayer-norm names) in the layout of the timm module `like`
    (its own q/k/v projections or q_bias / v_bias, SwiGLU halves, BEiT's gamma_1 / gamma_2 and
    relative_position_bias_table); `like`'s buffers (BEiT's relative_position_index, RoPE
    tables) are taken from it. Exact: `like.load_state_dict(result)` is strict."""
    out = dict(state)
    target = like.state_dict()
    for i, block in enumerate(like.blocks):
        p = f"blocks.{i}."
        _attn_layout(block.attn, p + "attn.", out, target)
        _mlp_layout(block.mlp, p + "mlp.", out)
        _rename_prefix(out, p + "attn.rel_pos_table", p + "attn.relative_position_bias_table")
        for new, old in (("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma")):
            if p + new in target and p + old in out:
                out[p + new] = out.pop(p + old)
    out = timm_norm_names(out)
    params = {name for name, _ in like.named_parameters()}
    for name, value in target.items():  # buffers HookedViT rebuilds (index tables, RoPE caches)
        if name not in out and name not in params:
            out[name] = value
    return out


def timm_norm_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """HookedViT's names of the extra norms back to timm's: embed.norm -> patch_embed.norm,
    attn_pool.ln -> attn_pool.norm, blocks.i.attn.ln_z / mlp.ln -> attn.norm / mlp.norm."""
    renames = [(r"^embed\.norm\.", "patch_embed.norm."), (r"^attn_pool\.ln\.", "attn_pool.norm."),
               (r"^(blocks\.\d+)\.attn\.ln_z\.", r"\1.attn.norm."), (r"^(blocks\.\d+)\.mlp\.ln\.", r"\1.mlp.norm.")]
    out = {}
    for name, value in state.items():
        for pattern, repl in renames:
            name, n = re.subn(pattern, repl, name)
            if n:
                break
        out[name] = value
    return out


def _attn_layout(attn: nn.Module, p: str, out: dict[str, Tensor], target: dict[str, Tensor]) -> None:
    """HookedViT's fused qkv back into EVA's q/k/v projections or q_bias / v_bias."""
    if getattr(attn, "q_proj", None) is not None:
        for n, w in zip("qkv", out.pop(p + "qkv.weight").chunk(3)):
            out[p + f"{n}_proj.weight"] = w
        bias = out.pop(p + "qkv.bias", None)
        if bias is not None:
            for n, b in zip("qkv", bias.chunk(3)):
                if p + f"{n}_proj.bias" in target:
                    out[p + f"{n}_proj.bias"] = b
        return
    if p + "q_bias" in target and p + "qkv.bias" in out:
        q, _, v = out.pop(p + "qkv.bias").chunk(3)  # the key bias is EVA's / BEiT's fixed zero
        out[p + "q_bias"], out[p + "v_bias"] = q, v


def _mlp_layout(mlp: nn.Module, p: str, out: dict[str, Tensor]) -> None:
    kind = type(mlp).__name__
    for suffix in ("weight", "bias"):
        w = out.get(p + f"fc1.{suffix}")
        if w is None:
            continue
        if kind == "SwiGLU":
            g, x = out.pop(p + f"fc1.{suffix}").chunk(2)
            out[p + f"fc1_g.{suffix}"], out[p + f"fc1_x.{suffix}"] = g, x
        elif kind == "GluMlp" and mlp.gate_last:
            a, b = w.chunk(2)
            out[p + f"fc1.{suffix}"] = torch.cat([b, a])
