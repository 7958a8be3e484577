"""Patch embedding, prefix tokens (class, registers, distillation) and position embedding."""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from hooked_vit.config import HookedViTConfig
from hooked_vit.layer_norm import make_norm


class Embed(nn.Module):
    """Turns images into the token sequence [prefix tokens..., patch tokens...].

    Prefix order follows timm: class token, register tokens, distillation token.
    The position embedding is returned at full sequence length; where the model does not
    embed prefix positions (`no_embed_class`) its prefix rows are zero, so
    `tokens + positions` equals timm's sum exactly.
    """

    def __init__(self, cfg: HookedViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.proj = nn.Conv2d(cfg.in_chans, d, cfg.patch_size, cfg.patch_size, bias=cfg.patch_embed_bias)
        self.norm = make_norm(cfg, d) if cfg.embed_norm else None  # hooks embed.norm.hook_*, [b, n_patches, d]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.n_reg_tokens, d)) if cfg.n_reg_tokens else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.distilled else None
        n_pos = cfg.n_patches if cfg.no_embed_class else cfg.n_ctx
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, d)) if cfg.pos_embed else None

    def check_images(self, images: Tensor) -> tuple[int, int]:
        """Validate an image batch; returns the token grid (rows, cols)."""
        cfg = self.cfg
        if not torch.is_tensor(images) or images.ndim != 4:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(
                f"expected images as a [batch, channels, height, width] tensor, got {shape}; "
                "add a batch dimension with images[None] for a single image"
            )
        _, c, h, w = images.shape
        if c != cfg.in_chans:
            raise ValueError(
                f"expected {cfg.in_chans} input channels, got {c} (shape {tuple(images.shape)}); "
                "convert greyscale or RGBA images to RGB before preprocessing"
            )
        ph, pw = cfg.patch_size
        if cfg.dynamic_img_size:
            if h % ph or w % pw:
                raise ValueError(f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        elif (h, w) != cfg.img_size:
            raise ValueError(
                f"expected images of {cfg.img_size[0]}x{cfg.img_size[1]} pixels, got {h}x{w}; resize "
                "with the model's preprocessing (circuits.data.transform_for(model)) or load the model "
                "with dynamic_img_size=True"
            )
        return h // ph, w // pw

    def tokens(self, images: Float[Tensor, "b c h w"]) -> Float[Tensor, "b p d_model"]:
        patches = self.proj(images).flatten(2).transpose(1, 2)  # [b, n_patches, d]
        patches = patches if self.norm is None else self.norm(patches)
        prefix = [t.expand(images.shape[0], -1, -1) for t in self.prefix_params()]
        return torch.cat(prefix + [patches], dim=1) if prefix else patches

    def prefix_params(self) -> list[Tensor]:
        return [t for t in (self.cls_token, self.reg_token, self.dist_token) if t is not None]

    def positions(self, grid: tuple[int, int], batch: int) -> Optional[Float[Tensor, "b p d_model"]]:
        if self.pos_embed is None:
            return None
        cfg = self.cfg
        pos = self.pos_embed
        if grid != cfg.grid_size:
            pos = resample_abs_pos_embed(
                pos,
                new_size=list(grid),
                old_size=list(cfg.grid_size),
                num_prefix_tokens=0 if cfg.no_embed_class else cfg.n_prefix_tokens,
            )
        if cfg.no_embed_class and cfg.n_prefix_tokens:
            pos = torch.cat([pos.new_zeros(1, cfg.n_prefix_tokens, cfg.d_model), pos], dim=1)
        return pos.expand(batch, -1, -1)
