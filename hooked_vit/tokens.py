"""The token layout of a ViT: which positions hold what, and how patch tokens tile the image.

timm's order (`VisionTransformer._pos_embed`, https://github.com/huggingface/pytorch-image-models
`timm/models/vision_transformer.py`): class token, register tokens, then the patch tokens in
row-major order; DeiT's distillation token follows the class token.

Video models (cfg.num_frames set, docs/video.md): the patch tokens are in (time, row, col)
order, time slowest; a token's time index t covers frames t * tubelet_size ...
(t + 1) * tubelet_size - 1 (`token_frames`). Labels read "t3 patch (2, 5)".
"""

from __future__ import annotations

import math
from typing import Any, Optional


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
    if getattr(cfg, "num_frames", None) is not None:  # a video model: "t{time} patch (row, col)"
        return prefix + [f"t{t} patch ({r}, {c})" for t, r, c in token_coords(cfg)[len(prefix):]]
    return prefix + [f"patch ({r}, {c})" for r in range(grid[0]) for c in range(grid[1])]


def token_coords(model_or_cfg: Any) -> list[Optional[tuple[int, int, int]]]:
    """(time, row, col) of every token in the model's order; None for prefix tokens (class,
    registers, distillation). time is the tubelet index (0 for an image model)."""
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    rows, cols = cfg.grid_size
    patches = [(t, r, c) for t in range(cfg.n_time) for r in range(rows) for c in range(cols)]
    return [None] * cfg.n_prefix_tokens + patches


def token_index(model_or_cfg: Any, time: int, row: int, col: int) -> int:
    """Sequence position of the patch token at (time, row, col)."""
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    rows, cols = cfg.grid_size
    if not (0 <= time < cfg.n_time and 0 <= row < rows and 0 <= col < cols):
        raise ValueError(f"(time, row, col)={(time, row, col)} is outside the token grid "
                         f"{(cfg.n_time, rows, cols)}")
    return cfg.n_prefix_tokens + (time * rows + row) * cols + col


def token_frames(model_or_cfg: Any, time: int) -> range:
    """The input frames a token at time index `time` embeds (its tubelet)."""
    cfg = getattr(model_or_cfg, "cfg", model_or_cfg)
    if not 0 <= time < cfg.n_time:
        raise ValueError(f"time index {time} is outside [0, {cfg.n_time})")
    size = cfg.tubelet_size if cfg.num_frames is not None else 1
    return range(time * size, (time + 1) * size)


def frame_token_mask(model_or_cfg: Any, times: Any) -> list[bool]:
    """Per token, whether it is a patch token at one of the time indices `times`."""
    wanted = {int(t) for t in times}
    return [c is not None and c[0] in wanted for c in token_coords(model_or_cfg)]


def token_grid(n_patches: int, grid: Optional[tuple[int, int]] = None) -> tuple[int, int]:
    """The (rows, cols) grid of `n_patches` patch tokens: `grid` if given (checked), else square.

    Square is the only shape a token count alone determines; non-square images need `grid`.
    """
    if grid is not None:
        rows, cols = int(grid[0]), int(grid[1])
        if rows * cols != n_patches:
            raise ValueError(f"grid {(rows, cols)} holds {rows * cols} tokens, the map has {n_patches}")
        return rows, cols
    side = math.isqrt(int(n_patches))
    if side * side != n_patches:
        raise ValueError(f"{n_patches} patch tokens do not form a square grid; pass grid=(rows, cols)")
    return side, side
