"""Loading open_clip's ViT image towers into HookedViT, exactly.

open_clip (https://github.com/mlfoundations/open_clip, `open_clip/transformer.py`
`VisionTransformer`) is an optional extra: `pip install hooked-vit[open_clip]`.

The image projection `proj` ([d_model, embed_dim], `pooled @ proj`) becomes `image_proj`
(`cfg.d_image_embed`, hook point `hook_image_embed`): the logits are the image embedding
and `W_U` is the projection, until `hooked_vit.text_classes.install_text_classes` puts a
head of text class embeddings on the embedding, as zero-shot CLIP classifies.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from hooked_vit.config import HookedViTConfig
from hooked_vit.loading import Converted, UnsupportedModelError, _act_name, _norm_eps, convert_timm


def _require_open_clip():
    try:
        import open_clip
    except ImportError:
        raise ImportError("open_clip is not installed: pip install 'hooked-vit[open_clip]' (or open_clip_torch)") from None
    return open_clip


def convert_open_clip(model_or_name: Union[str, nn.Module], **create_kwargs: Any) -> Converted:
    """Config and weights of an open_clip CLIP model, its `.visual` tower, or a name "ARCH" /
    "ARCH:TAG" (e.g. "ViT-B-32:laion2b_s34b_b79k"; the tag's weights must be cached or
    downloadable, or the tag a local weights file). Without a tag the weights are open_clip's
    random init. `create_kwargs` go to `open_clip.create_model`; `HookedViT.from_open_clip` builds.
    open_clip's own `VisionTransformer` and its timm-backed towers (`TimmModel`: SigLIP,
    SigLIP 2, EVA02 CLIP, ...; `timm_tower_config_and_state`) are read."""
    visual = _visual_tower(model_or_name, **create_kwargs)
    if type(visual).__name__ == "TimmModel":
        cfg, state = timm_tower_config_and_state(visual)
    else:
        cfg, state = config_from_open_clip(visual), open_clip_to_timm_state_dict(visual)
    if isinstance(model_or_name, str):
        cfg.model_name = f"open_clip:{model_or_name}"
    first = next(visual.parameters())
    return Converted(cfg, state, first.device, first.dtype)


# ------------------------------------------------------------------ timm-backed towers
def timm_tower_config_and_state(visual: nn.Module) -> tuple[HookedViTConfig, dict[str, Tensor]]:
    """An open_clip `TimmModel` (open_clip/timm_model.py): a timm trunk (read as
    `HookedViT.from_timm` reads it, every architecture timm's loader accepts) and its image
    projection: the trunk's own head Linear (`timm_proj` null: num_classes = embed_dim, with a
    bias) or the adapter's `head.proj` Linear (`timm_proj: "linear"`), as `image_proj`
    (`cfg.d_image_embed`, `hook_image_embed`); with `timm_proj: "none"` (SigLIP) the pooled
    vector is the image embedding. `mlp` projections and attention-pool adapters are refused."""

    trunk = visual.trunk
    extra = [n for n, _ in visual.head.named_children()]
    if any(n not in ("drop", "proj") for n in extra):
        raise UnsupportedModelError(f"unsupported feature: open_clip timm adapter head layers {extra} "
                                    "(only a linear projection, timm_proj='linear', or none)")
    converted = convert_timm(trunk)
    cfg, state = converted.cfg, dict(converted.timm_state)
    proj = visual.head.proj if "proj" in extra else None
    if proj is None and isinstance(getattr(trunk, "head", None), nn.Linear):  # the trunk's head projects
        proj = trunk.head
        state["image_proj.weight"] = state.pop("head.weight")
        if "head.bias" in state:
            state["image_proj.bias"] = state.pop("head.bias")
    elif proj is not None:
        if cfg.n_classes:
            raise UnsupportedModelError("unsupported feature: an open_clip timm trunk with both a classifier "
                                        "head and a projection")
        state["image_proj.weight"] = proj.weight.detach()
        if proj.bias is not None:
            state["image_proj.bias"] = proj.bias.detach()
    updates: dict[str, Any] = {}
    if proj is not None:
        updates = dict(d_image_embed=proj.out_features, n_classes=proj.out_features,
                       image_proj_bias=proj.bias is not None, head_bias=False)
    cfg = replace(cfg, **updates, label_names=None, class_names=None,  # embedding dimensions, not classes
                  model_name=f"open_clip:TimmModel({type(trunk).__name__})",
                  data_config=_data_config(visual, trunk.patch_embed.proj.in_channels))
    return cfg, state


def _visual_tower(model_or_name: Union[str, nn.Module], **create_kwargs: Any) -> nn.Module:
    if isinstance(model_or_name, str):
        open_clip = _require_open_clip()
        arch, _, tag = model_or_name.partition(":")
        if arch not in open_clip.list_models():
            raise UnsupportedModelError(f"open_clip does not know the architecture {arch!r}; see open_clip.list_models()")
        try:
            model = open_clip.create_model(arch, pretrained=tag or None, **create_kwargs)
        except TypeError as err:
            raise TypeError(f"open_clip.create_model({arch!r}) does not take these arguments: {err}") from None
        except Exception as err:
            if not tag:  # no weights were asked for: the error is not about them
                raise
            raise FileNotFoundError(
                f"open_clip could not load weights {tag!r} for {arch} ({str(err).splitlines()[0]}); without "
                "network access pass a model you built, or create_model(arch, pretrained='/path/to/weights')"
            ) from None
        return model.visual.eval()
    if not isinstance(model_or_name, nn.Module):
        raise TypeError(f"expected an open_clip model or name, got {type(model_or_name).__name__}")
    return getattr(model_or_name, "visual", model_or_name)


# ------------------------------------------------------------------ config
def config_from_open_clip(visual: nn.Module) -> HookedViTConfig:
    """Read a `HookedViTConfig` off an open_clip VisionTransformer, refusing the unsupported."""
    from open_clip.transformer import VisionTransformer

    if type(visual) is not VisionTransformer:
        raise UnsupportedModelError(
            f"{type(visual).__name__} is not open_clip's VisionTransformer nor a timm-backed TimmModel "
            "(ModifiedResNet towers are not supported)"
        )
    _check_supported(visual)
    blocks = visual.transformer.resblocks
    attn, mlp = blocks[0].attn, blocks[0].mlp
    proj = visual.proj
    return HookedViTConfig(
        d_model=attn.embed_dim,
        n_layers=len(blocks),
        n_heads=attn.num_heads,
        d_mlp=mlp.c_fc.out_features,
        n_classes=0 if proj is None else proj.shape[1],  # the logits are the image embedding
        d_image_embed=None if proj is None else proj.shape[1],
        img_size=tuple(visual.image_size),
        patch_size=tuple(visual.patch_size),
        in_chans=visual.conv1.in_channels,
        patch_embed_bias=visual.conv1.bias is not None,
        ln_pre=not isinstance(visual.ln_pre, nn.Identity),
        qkv_bias=attn.in_proj_bias is not None,
        proj_bias=attn.out_proj.bias is not None,
        layer_scale=not isinstance(blocks[0].ls_1, nn.Identity),
        act_fn=_act_name(mlp.gelu),
        eps=_norm_eps(visual),
        global_pool="token" if visual.pool_type == "tok" else "avg",
        final_norm="pooled" if visual.final_ln_after_pool else "token",
        head_bias=False,
        model_name=f"open_clip:{type(visual).__name__}",
        data_config=_data_config(visual, visual.conv1.in_channels),
    )


def _check_supported(visual: nn.Module) -> None:
    def refuse(feature: str) -> None:
        raise UnsupportedModelError(f"unsupported feature: {feature}")

    if visual.attn_pool is not None:
        refuse("attentional pooling (CoCa)")
    if visual.pool_type not in ("tok", "avg"):
        refuse(f"pool_type={visual.pool_type!r} (tok and avg are supported)")
    if visual.positional_embedding is None or visual.positional_embedding.ndim != 2:
        refuse("a non-learnable position embedding")
    for i, block in enumerate(visual.transformer.resblocks):
        if type(block).__name__ != "ResidualAttentionBlock":
            refuse(f"block type {type(block).__name__} in block {i} (e.g. scaled cosine attention)")
        if not isinstance(block.attn, nn.MultiheadAttention):
            refuse(f"attention type {type(block.attn).__name__}")
        if hasattr(block, "ln_1_kv"):
            refuse("cross-attention")
        if not isinstance(getattr(block.mlp, "ln", nn.Identity()), nn.Identity):
            refuse("scale_fc (a norm inside the MLP)")
    for name, module in visual.named_modules():
        if name.split(".")[-1] in ("ln_pre", "ln_post", "ln_1", "ln_2"):
            if not isinstance(module, (nn.Identity, nn.LayerNorm)):
                refuse(f"normalisation {type(module).__name__} at {name} (only LayerNorm)")


def _data_config(visual: nn.Module, in_chans: int) -> dict[str, Any]:
    """open_clip's eval preprocessing (`image_mean`/`image_std`, bicubic resize, centre crop)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or OPENAI_DATASET_STD
    return {"input_size": [in_chans, *visual.image_size], "mean": list(mean),
            "std": list(std), "interpolation": "bicubic", "crop_pct": 1.0}


# ------------------------------------------------------------------ weights
def open_clip_to_timm_state_dict(visual: nn.Module) -> dict[str, Tensor]:
    """The tower's weights under timm VisionTransformer names."""
    out: dict[str, Tensor] = {
        "cls_token": visual.class_embedding.detach().view(1, 1, -1),
        "pos_embed": visual.positional_embedding.detach()[None],
        "patch_embed.proj.weight": visual.conv1.weight.detach(),
    }
    if visual.conv1.bias is not None:
        out["patch_embed.proj.bias"] = visual.conv1.bias.detach()
    norms = [("ln_post", "fc_norm" if visual.final_ln_after_pool else "norm")]
    if not isinstance(visual.ln_pre, nn.Identity):
        norms.append(("ln_pre", "norm_pre"))
    for ours, timm in norms:
        out[f"{timm}.weight"] = getattr(visual, ours).weight.detach()
        out[f"{timm}.bias"] = getattr(visual, ours).bias.detach()
    for i, block in enumerate(visual.transformer.resblocks):
        out.update(_block_weights(block, f"blocks.{i}."))
    if visual.proj is not None:
        out["image_proj.weight"] = visual.proj.detach().T
    return out


def _block_weights(block: nn.Module, prefix: str) -> dict[str, Tensor]:
    attn = block.attn
    pairs = {
        "norm1": block.ln_1, "norm2": block.ln_2, "attn.proj": attn.out_proj,
        "mlp.fc1": block.mlp.c_fc, "mlp.fc2": block.mlp.c_proj,
    }
    out = {f"{prefix}attn.qkv.weight": attn.in_proj_weight.detach()}  # rows q, k, v as timm
    if attn.in_proj_bias is not None:
        out[f"{prefix}attn.qkv.bias"] = attn.in_proj_bias.detach()
    for name, module in pairs.items():
        out[f"{prefix}{name}.weight"] = module.weight.detach()
        if module.bias is not None:
            out[f"{prefix}{name}.bias"] = module.bias.detach()
    for i, ls in ((1, block.ls_1), (2, block.ls_2)):
        if not isinstance(ls, nn.Identity):
            out[f"{prefix}ls{i}.gamma"] = ls.gamma.detach()
    return out
