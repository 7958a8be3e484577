"""Patch embedding, prefix tokens (class, registers, distillation) and position embedding.

Video models (cfg.num_frames set, docs/video.md) embed tubelets of `tubelet_size` frames
with a Conv3d; their patch tokens are in (time, row, col) order, time slowest.
"""

from __future__ import annotations

from typing import Optional

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from hooked_vit.config import HookedViTConfig
from hooked_vit.layer_norm import make_norm
from hooked_vit.errors import UserError
from hooked_vit.naflex import NaFlexInputs, factorized_table, resample_table


class Embed(nn.Module):
    """Turns images into the token sequence [prefix tokens..., patch tokens...].

    Prefix order follows timm: class token, register tokens, distillation token.
    The position embedding is returned at full sequence length; where the model does not
    embed prefix positions (`no_embed_class`) its prefix rows are zero, so
    `tokens + positions` equals timm's sum exactly.
    """

    def __init__(self, cfg: HookedViTConfig, backbone: Optional[nn.Module] = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        # A hybrid stem's CNN (cfg.d_backbone): the given module, run as it is.
        self.backbone = backbone
        self.hook_backbone_out = HookPoint() if cfg.d_backbone is not None else None  # [b, d_backbone, h, w]
        if (backbone is None) != (cfg.d_backbone is None):
            raise UserError("a hybrid CNN stem (cfg.d_backbone) needs its backbone module and only then: build "
                             "the model with HookedViT.from_timm (or pass backbone= the timm CNN)")
        if cfg.d_backbone is not None:  # the projection of the backbone's feature map
            kernel = cfg.backbone_patch_size
            self.proj = nn.Conv2d(cfg.d_backbone, d, kernel, kernel, bias=cfg.patch_embed_bias)
        elif cfg.is_video:
            kernel = (cfg.tubelet_size, *cfg.patch_size)
            self.proj = nn.Conv3d(cfg.in_chans, d, kernel, kernel, bias=cfg.patch_embed_bias)
        else:
            self.proj = nn.Conv2d(cfg.in_chans, d, cfg.patch_size, cfg.patch_size, bias=cfg.patch_embed_bias)
        self.norm = make_norm(cfg, d) if cfg.embed_norm else None  # hooks embed.norm.hook_*, [b, n_patches, d]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.n_reg_tokens, d)) if cfg.n_reg_tokens else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.distilled else None
        n_pos = cfg.n_patches if cfg.no_embed_class else cfg.n_ctx
        if cfg.pos_embed_grid is not None:  # a table on its own grid (NaFlexVit), resampled to each input
            n_pos = cfg.pos_grid[0] * cfg.pos_grid[1]
        kind = cfg.pos_embed_type if cfg.pos_embed else None
        if kind == "space_time":  # TimeSformer: [prefix, one frame's patches] and time, learned
            n_pos = cfg.n_patches_per_frame + cfg.n_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, d)) if kind in ("learned", "space_time") else None
        self.time_embed = nn.Parameter(torch.zeros(1, cfg.n_time, d)) if kind == "space_time" else None
        factorized = kind == "factorized"  # NaFlexVit: a row table and a column table
        self.pos_embed_y = nn.Parameter(torch.zeros(1, cfg.pos_grid[0], d)) if factorized else None
        self.pos_embed_x = nn.Parameter(torch.zeros(1, cfg.pos_grid[1], d)) if factorized else None
        # NaFlex inputs only: which tokens are real (prefix tokens and valid patches) [b, p] bool;
        # an edit changes what attention and pooling read (hooked_vit.naflex).
        self.hook_patch_mask = HookPoint() if cfg.naflex else None  # [b, p], with cfg.naflex
        # VideoMAE's fixed table: a buffer (not a parameter, not in the state dict).
        self.register_buffer("pos_table", sincos_table(cfg.n_patches, d) if kind == "sincos" else None, persistent=False)

    def check_images(self, images: Tensor) -> tuple[int, int]:
        """Validate an image batch (a clip batch for video models); returns the token grid (rows, cols)."""
        cfg = self.cfg
        if cfg.is_video:
            return self._check_clips(images)
        if not torch.is_tensor(images) or images.ndim != 4:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise UserError(
                f"expected images as a [batch, channels, height, width] tensor, got {shape}; "
                "add a batch dimension with images[None] for a single image"
            )
        _, c, h, w = images.shape
        if c != cfg.in_chans:
            raise UserError(
                f"expected {cfg.in_chans} input channels, got {c} (shape {tuple(images.shape)}); "
                "convert greyscale or RGBA images to RGB before preprocessing"
            )
        ph, pw = cfg.patch_size
        if cfg.dynamic_img_size:
            if h % ph or w % pw:
                raise UserError(f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}")
        elif (h, w) != cfg.img_size:
            raise UserError(
                f"expected images of {cfg.img_size[0]}x{cfg.img_size[1]} pixels, got {h}x{w}; resize "
                "with the model's preprocessing (circuits.data.transform_for(model)) or load the model "
                "with dynamic_img_size=True"
            )
        return h // ph, w // pw

    def _check_clips(self, clips: Tensor) -> tuple[int, int]:
        cfg = self.cfg
        expected = (cfg.num_frames, cfg.in_chans, *cfg.img_size)
        if not torch.is_tensor(clips) or clips.ndim != 5 or tuple(clips.shape[1:]) != expected:
            shape = tuple(clips.shape) if torch.is_tensor(clips) else type(clips).__name__
            raise UserError(
                f"expected clips as a [batch, frames, channels, height, width] tensor of shape [b, {', '.join(map(str, expected))}], "
                f"got {shape}; sample {cfg.num_frames} frames per clip and resize them to the model's size "
                "(circuits.data.video)"
            )
        return cfg.grid_size

    def tokens(self, images: Float[Tensor, "b c h w"]) -> Float[Tensor, "b p d_model"]:
        if self.cfg.is_video:  # [b, t, c, h, w] -> Conv3d over [b, c, t, h, w], tokens (t, row, col)
            images = einops.rearrange(images, "b t c h w -> b c t h w")
        if self.backbone is not None:
            features = self.backbone(images)
            features = features[-1] if isinstance(features, (list, tuple)) else features  # timm's HybridEmbed
            images = self.hook_backbone_out(features)  # [b, d_backbone, h, w]
        patches = self.proj(images).flatten(2).transpose(1, 2)  # [b, n_patches, d]
        patches = patches if self.norm is None else self.norm(patches)
        prefix = [t.expand(images.shape[0], -1, -1) for t in self.prefix_params()]
        return torch.cat(prefix + [patches], dim=1) if prefix else patches

    def naflex_tokens(self, inputs: NaFlexInputs) -> Float[Tensor, "b p d_model"]:
        """NaFlex patches [b, n, patch_dim] through the patch embedding (the Conv2d read as a
        Linear over cfg.patch_layout), the embedding norm and the prefix tokens."""
        patches = inputs.patches
        if patches.shape[-1] != self.proj.weight[0].numel():
            raise UserError(f"NaFlex patches have {patches.shape[-1]} values each; this model's patches have "
                             f"{self.proj.weight[0].numel()} (channels x {self.cfg.patch_size[0]} x {self.cfg.patch_size[1]})")
        layout = "d c ph pw -> d (ph pw c)" if self.cfg.patch_layout == "hwc" else "d c ph pw -> d (c ph pw)"
        x = F.linear(patches, einops.rearrange(self.proj.weight, layout), self.proj.bias)  # [b, n, d]
        x = x if self.norm is None else self.norm(x)
        prefix = [t.expand(x.shape[0], -1, -1) for t in self.prefix_params()]
        return torch.cat(prefix + [x], dim=1) if prefix else x

    def naflex_positions(self, inputs: NaFlexInputs) -> Optional[Float[Tensor, "b p d_model"]]:
        """Each image's position table resampled to its own grid, at its first rows * cols
        patch positions (zero on padding and on the prefix tokens)."""
        cfg = self.cfg
        if not cfg.pos_embed:
            return None
        b, n = inputs.patch_valid.shape
        out = self.proj.weight.new_zeros(b, cfg.n_prefix_tokens + n, cfg.d_model)
        tables: dict[tuple[int, int], Tensor] = {}
        for i, grid in enumerate(inputs.grids):
            if grid not in tables:
                tables[grid] = self.patch_positions(grid)[0]
            m = grid[0] * grid[1]
            out[i, cfg.n_prefix_tokens : cfg.n_prefix_tokens + m] = tables[grid]
        return out

    def patch_positions(self, grid: tuple[int, int]) -> Float[Tensor, "1 n d_model"]:
        """The learned or factorized position table over the patch tokens of a grid."""
        cfg = self.cfg
        if self.pos_embed_y is not None:
            return factorized_table(self.pos_embed_y, self.pos_embed_x, grid, cfg)
        n_prefix = 0 if cfg.no_embed_class else cfg.n_prefix_tokens
        return resample_table(self.pos_embed[:, n_prefix:], cfg.pos_grid, grid, cfg)

    def prefix_params(self) -> list[Tensor]:
        return [t for t in (self.cls_token, self.reg_token, self.dist_token) if t is not None]

    def positions(self, grid: tuple[int, int], batch: int) -> Optional[Float[Tensor, "b p d_model"]]:
        cfg = self.cfg
        if self.pos_table is not None:  # fixed sin-cos over the patch tokens
            prefix = self.pos_table.new_zeros(1, cfg.n_prefix_tokens, cfg.d_model)
            return torch.cat([prefix, self.pos_table], dim=1).expand(batch, -1, -1)
        if self.time_embed is not None:
            return self._space_time_positions().expand(batch, -1, -1)
        if self.pos_embed is None and self.pos_embed_y is None:
            return None
        pos = self.pos_embed
        if grid != cfg.pos_grid or self.pos_embed_y is not None:
            pos = self.patch_positions(grid)
            if not cfg.no_embed_class:
                pos = torch.cat([self.pos_embed[:, : cfg.n_prefix_tokens], pos], dim=1)
        if cfg.no_embed_class and cfg.n_prefix_tokens:
            pos = torch.cat([pos.new_zeros(1, cfg.n_prefix_tokens, cfg.d_model), pos], dim=1)
        return pos.expand(batch, -1, -1)

    def _space_time_positions(self) -> Float[Tensor, "1 p d_model"]:
        """TimeSformer: prefix rows of pos_embed; patch (t, s) gets pos_embed[prefix + s] + time_embed[t]."""
        n_prefix = self.cfg.n_prefix_tokens
        space = self.pos_embed[:, n_prefix:]  # [1, s, d]
        patches = einops.rearrange(space[:, None] + self.time_embed[:, :, None], "1 t s d -> 1 (t s) d")
        return torch.cat([self.pos_embed[:, :n_prefix], patches], dim=1)


def sincos_table(n_positions: int, d_model: int) -> Float[Tensor, "1 n d_model"]:
    """The fixed 1D sin-cos position table of "Attention Is All You Need" (Vaswani et al. 2017,
    sec. 3.5) as VideoMAE uses it over its patch tokens: angle(pos, j) = pos / 10000^(2 floor(j/2) / d),
    sin on even j, cos on odd j. Computed in float64, stored in float32."""
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    j = torch.arange(d_model, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / d_model)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]
