"""Rotary position embedding (RoPE) for vision: the per-token rotation tables of each block.

RoPE (Su et al. 2021, arXiv:2104.09864) rotates each head's q and k by angles that depend on
the token's 2-D patch position; in a ViT (Heo et al. 2024, arXiv:2403.13298; EVA-02,
arXiv:2303.11331; DINOv3, arXiv:2508.10104) it acts on patch tokens only. The sin/cos tables
are timm's (`timm.layers` rotary embeddings, built from `cfg.rope_options`), so they are
exactly the reference's; hooked_vit applies them itself so that the rotated q and k are hook
points (`attn.hook_rot_q` / `attn.hook_rot_k`).

A table has the layout [b or 1, p, h or 1, 2 * d_head] (sin then cos on the last dimension)
over the whole token sequence: prefix tokens get identity rows (sin 0, cos 1), which leave
them exactly unchanged, so the same code serves full sequences and token removal (rows
gathered at each kept token's original position).

`rope_type="3d"` (V-JEPA 2, Assran et al. 2025, arXiv:2506.09985; transformers'
`VJEPA2RopeAttention`) has no timm module: `Rope3D` builds the table over (time, row, col)
from `hooked_vit.tokens.token_coords`. Each head's d_head dimensions are split into three
equal segments of a = 2 * ((d_head // 3) // 2) dimensions, rotated by the token's time, row and
column index; the d_head - 3a dimensions left over are not rotated. In a segment, dimension j
turns by the angle pos * omega[j mod a/2] with omega[i] = 10000^(-i / (a/2)) (the half-length
sin/cos vectors are repeated, not interleaved), while the pairs rotated together are
interleaved (2i, 2i + 1): timm's `apply_rot_embed_cat` without `half` computes exactly that from
a per-dimension sin/cos table. (The two members of a pair turn by different angles, so this is
not a norm-preserving rotation; it is the reference's function, reproduced as is.)
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from jaxtyping import Float
from torch import Tensor, nn

ROPE_CLASSES: dict[str, str] = {  # cfg.rope_type -> timm.layers class
    "cat": "RotaryEmbeddingCat",
    "mixed": "RotaryEmbeddingMixed",
    "dinov3": "RotaryEmbeddingDinoV3",
}
OWN_ROPE_TYPES = ("3d",)  # rope types hooked_vit builds itself (no timm module)
# Training-only augmentation and device arguments: not part of the eval-mode function.
_NOT_OPTIONS = {"device", "dtype", "shift_coords", "jitter_coords", "rescale_coords"}


def rope_class(rope_type: str) -> type:
    import timm.layers

    return getattr(timm.layers, ROPE_CLASSES[rope_type])


def build_rope(cfg) -> Optional[nn.Module]:
    """timm's rotary module for cfg (None without RoPE)."""
    if cfg.rope_type is None:
        return None
    if cfg.rope_type == "3d":
        return Rope3D(cfg)
    return rope_class(cfg.rope_type)(**cfg.rope_options)


class Rope3D(nn.Module):
    """V-JEPA 2's rotary table over (time, row, col) (module docstring). No parameters: the
    table follows from the config's token grid, kept as a non-persistent buffer so that it
    moves with the model (`.to(device)`), as timm's rotary tables do."""

    def __init__(self, cfg):
        super().__init__()
        self.grid = tuple(cfg.grid_size)
        self.register_buffer("table", rope_3d_table(cfg), persistent=False)

    def get_embed(self, shape: Optional[list[int]] = None) -> Float[Tensor, "n two_e"]:
        """[n_patches, 2 * d_head]: sin then cos of every patch token's angle per dimension."""
        if shape is not None and tuple(shape) != self.grid:
            from hooked_vit.errors import UserError

            raise UserError(f"rope_type='3d' has its table for the configured grid {self.grid}, not {tuple(shape)}")
        return self.table


def rope_3d_table(cfg) -> Float[Tensor, "n two_e"]:
    """V-JEPA 2's table for cfg's patch tokens (module docstring), computed in float32 as the
    reference computes it: [n_patches, 2 * d_head], sin then cos."""
    from hooked_vit.tokens import token_coords

    coords = torch.tensor([c for c in token_coords(cfg) if c is not None], dtype=torch.float32)  # [n, 3]
    e = cfg.d_head
    a = 2 * ((e // 3) // 2)
    omega = torch.arange(a // 2, dtype=torch.float32) / (a / 2.0)
    omega = 1.0 / 10000**omega  # [a/2]
    angles = (coords[:, :, None] * omega).repeat(1, 1, 2).flatten(1)  # [n, 3a]: per axis [w, w]
    sin, cos = angles.sin(), angles.cos()
    rest = e - 3 * a  # dimensions left unrotated: sin 0, cos 1
    sin = torch.cat([sin, sin.new_zeros(len(coords), rest)], 1)
    cos = torch.cat([cos, cos.new_ones(len(coords), rest)], 1)
    return torch.cat([sin, cos], 1)


def rope_type_of(module: nn.Module) -> Optional[str]:
    """cfg.rope_type of a timm rotary module (None if not one of ROPE_CLASSES)."""
    return next((t for t, name in ROPE_CLASSES.items() if type(module).__name__ == name), None)


def rope_options_of(module: nn.Module) -> dict[str, Any]:
    """The constructor arguments of a timm rotary module, read off its attributes (the module
    is rebuilt from them and its tables compared by the loader)."""
    params = inspect.signature(type(module).__init__).parameters
    options = {}
    for name in params:
        if name in ("self", "kwargs") or name in _NOT_OPTIONS or not hasattr(module, name):
            continue
        value = getattr(module, name)
        options[name] = list(value) if isinstance(value, tuple) else value
    if "depth" in params and "depth" not in options:  # RotaryEmbeddingMixed keeps it as freqs' first dim
        options["depth"] = module.freqs.shape[0]
    if "num_heads" in params and "num_heads" not in options:
        options["num_heads"] = module.freqs.shape[1]
    return options


def patch_table(rope: nn.Module, grid: tuple[int, int], default_grid: tuple[int, int]) -> Tensor:
    """timm's table for a grid of patches: [n_patches, 2e], or [depth, h, n_patches, 2e] for
    per-block (mixed) RoPE. The cached table at the built grid, else one built for `grid`."""
    if grid == tuple(default_grid) and getattr(rope, "feat_shape", None) is not None:
        return rope.get_embed()
    return rope.get_embed(shape=list(grid))


def block_tables(
    rope: nn.Module, grid: tuple[int, int], default_grid: tuple[int, int], n_prefix: int, n_layers: int,
    positions: Optional[Tensor] = None,
) -> list[Float[Tensor, "b p h two_e"]]:
    """One table per block, [1, p, h or 1, 2e] over the whole sequence (identity rows for the
    n_prefix tokens), or [b, k, h or 1, 2e] at the original `positions` [b, k] of kept tokens."""
    table = patch_table(rope, grid, default_grid)
    per_block = table.ndim == 4  # [depth, h, n, 2e]
    table = table.transpose(1, 2) if per_block else table[None, :, None, :]  # [d or 1, n, h or 1, 2e]
    e2 = table.shape[-1]
    identity = torch.cat([table.new_zeros(e2 // 2), table.new_ones(e2 // 2)])
    prefix = identity.expand(table.shape[0], n_prefix, table.shape[2], e2)
    table = torch.cat([prefix, table], dim=1)
    if positions is not None:  # [b, k] -> [d or 1, b, k, h or 1, 2e]
        table = table[:, positions]
    else:
        table = table[:, None]
    return [table[i if per_block else 0] for i in range(n_layers)]


def apply_rope(x: Float[Tensor, "b p h e"], table: Float[Tensor, "b p h two_e"], cfg) -> Float[Tensor, "b p h e"]:
    """Rotate q or k [b, p, h, e] by a block's table (timm's `apply_rot_embed_cat`: interleaved
    pairs, or halves with cfg.rope_rotate_half)."""
    from timm.layers import apply_rot_embed_cat

    return apply_rot_embed_cat(x, table, half=cfg.rope_rotate_half)
