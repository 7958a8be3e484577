"""The token layout of a ViT: which positions hold what, and how patch tokens tile the image.

timm's order (`VisionTransformer._pos_embed`, https://github.com/huggingface/pytorch-image-models
`timm/models/vision_transformer.py`): class token, register tokens, then the patch tokens in
row-major order; DeiT's distillation token follows the class token.
"""

from __future__ import annotations

import math
from typing import Any, Optional
from hooked_vit.errors import UserError


def token_labels(model_or_grid: Any, class_token: bool = True, n_reg_tokens: int = 0,
                 distilled: bool = False) -> list[str]:
    """Position names in the model's token order: cls, reg_0.., dist, then patch (row, col).

    `model_or_grid`: a HookedViT or its config (the prefix tokens read from it), or a
    (rows, cols) grid with the prefix given by the other arguments.
    """
    cfg = getattr(model_or_grid, "cfg", model_or_grid)
    if hasattr(cfg, "grid_size"):
        grid, class_token, n_reg_tokens, distilled = cfg.grid_size, cfg.class_token, cfg.n_reg_tokens, cfg.distilled
    else:
        grid = tuple(model_or_grid)
    prefix = (["cls"] if class_token else []) + [f"reg_{i}" for i in range(n_reg_tokens)] + (["dist"] if distilled else [])
    return prefix + [f"patch ({r}, {c})" for r in range(grid[0]) for c in range(grid[1])]


def token_grid(n_patches: int, grid: Optional[tuple[int, int]] = None) -> tuple[int, int]:
    """The (rows, cols) grid of `n_patches` patch tokens: `grid` if given (checked), else square.

    Square is the only shape a token count alone determines; non-square images need `grid`.
    """
    if grid is not None:
        rows, cols = int(grid[0]), int(grid[1])
        if rows * cols != n_patches:
            raise UserError(f"grid {(rows, cols)} holds {rows * cols} tokens, the map has {n_patches}")
        return rows, cols
    side = math.isqrt(int(n_patches))
    if side * side != n_patches:
        raise UserError(f"{n_patches} patch tokens do not form a square grid; pass grid=(rows, cols)")
    return side, side
