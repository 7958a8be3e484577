"""Reading timm's `NaFlexVit` (timm.models.naflexvit) into HookedViTConfig fields and weights.

NaFlexVit is a ViT whose patch embedding is a Linear over flattened patches (channel fastest,
`patch_layout="hwc"`; HookedViT keeps it as its Conv2d `embed.proj`, the same function on
images), whose position table covers the patch tokens only on its own grid (16x16, or 128x128
for RADIO), resampled to every input's grid with the model's interpolation options
(`pos_embed_grid`, `pos_embed_interp`, ...), or is factorized into row and column tables, and
which takes NaFlex inputs (hooked_vit.naflex). The blocks are timm's `Block`s, read as
VisionTransformer's. A feature HookedViT does not implement is refused by name.
"""

from __future__ import annotations

from typing import Any

import einops
from torch import Tensor, nn

from hooked_vit.timm_architectures import (final_norm_of, head_options, is_identity, norms_of, pooling_options,
                                           refuse, same_in_every_block, timm_state, _vit_block)


def is_naflex(model: nn.Module) -> bool:
    return type(model).__name__ == "NaFlexVit"


def naflex_architecture_options(model: nn.Module) -> dict[str, Any]:
    """HookedViTConfig fields of a timm NaFlexVit (as `timm_architectures.architecture_options`)."""
    norm_type, eps = norms_of(model)
    return dict(d_model=model.embed_dim, n_layers=len(model.blocks), norm_type=norm_type, eps=eps,
                **naflex_config(model))


def naflex_timm_state(model: nn.Module) -> dict[str, Tensor]:
    """The weights under timm VisionTransformer names (as `timm_architectures.timm_state`)."""
    state = timm_state(model)
    naflex_state(model, state)
    return state


def naflex_config(model: nn.Module) -> dict[str, Any]:
    """The NaFlexVit-specific HookedViTConfig fields (embedding, positions, blocks, head)."""
    e = model.embeds
    if e.norm_input is not None:
        refuse("a norm on the flattened input patches (NaFlexVit input_norm_layer)")
    if e.patch_interpolator is not None:
        refuse("variable patch sizes (NaFlexVit enable_patch_interpolator)")
    if e.dynamic_img_pad:
        refuse("dynamic_img_pad")
    if e.pos_embed_use_grid_sample:
        refuse("position embeddings sampled with grid_sample (pos_embed_use_grid_sample)")
    if model.rope is not None:
        refuse("RoPE in NaFlexVit (rope_type)")
    if not e.is_linear and e.proj.kernel_size != e.proj.stride:
        refuse("a patch embedding whose kernel differs from its stride")
    if model.global_pool == "":
        refuse("global_pool='' (no pooling: NaFlexVit returns the unpooled tokens)")
    pos = {"learned": "learned", "factorized": "factorized", "none": None}[e.pos_embed_type]
    grid = tuple(e.pos_embed_grid_size)
    patch = tuple(e.patch_size)
    return dict(
        img_size=(grid[0] * patch[0], grid[1] * patch[1]), patch_size=patch, in_chans=e.in_chans,
        patch_embed_bias=e.proj.bias is not None, embed_norm=not is_identity(e.norm),
        patch_layout="hwc" if (not e.is_linear or e.channels_last) else "chw",
        **same_in_every_block(model.blocks, _vit_block), **head_options(model),
        **pooling_options(model, model.pool_include_prefix),
        class_token=e.cls_token is not None, n_reg_tokens=e.num_reg_tokens,
        pos_embed=pos is not None, pos_embed_type=pos or "learned", no_embed_class=True, dynamic_img_size=True,
        pos_embed_grid=grid, pos_embed_interp=e.pos_embed_interp_mode, pos_embed_antialias=e.pos_embed_antialias,
        pos_embed_align_corners=e.pos_embed_align_corners, pos_embed_ar_preserving=e.pos_embed_ar_preserving,
        ln_pre=not is_identity(model.norm_pre), final_norm=final_norm_of(model), naflex=True,
    )


def naflex_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """NaFlexVit's embedding weights under VisionTransformer names, in place: the Linear patch
    embedding as a Conv2d weight, the [1, gh, gw, d] table as [1, gh * gw, d]."""
    e = model.embeds
    for key in [k for k in state if k.startswith("embeds.")]:
        value = state.pop(key)
        name = key.removeprefix("embeds.")
        if name == "proj.weight" and e.is_linear:
            layout = "d (ph pw c) -> d c ph pw" if e.channels_last else "d (c ph pw) -> d c ph pw"
            value = einops.rearrange(value, layout, ph=e.patch_size[0], pw=e.patch_size[1])
        if name == "pos_embed":
            value = value.flatten(1, 2)
        if name.startswith("proj."):
            name = "patch_embed." + name
        elif name.startswith("norm.") or name in ("pos_embed_y", "pos_embed_x"):
            name = "embed." + name  # HookedViT's names (no timm VisionTransformer counterpart)
        state[name] = value
