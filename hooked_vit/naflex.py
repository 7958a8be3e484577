"""NaFlex inputs: images of any resolution and aspect ratio as one padded batch of patches.

NaViT / NaFlex (Dehghani et al. 2023, arXiv:2307.06304; SigLIP 2, arXiv:2502.14786) feed a
batch of images of different sizes as flattened patches, each row padded to a common length:

    patches     [b, n, patch_dim]  each patch flattened in cfg.patch_layout order ("hwc": channel fastest)
    patch_coord [b, n, 2]          each patch's (row, col) in its image's patch grid
    patch_valid [b, n] bool        True on real patches, False on padding

as timm's `NaFlexVit.forward` takes them (a dict with those keys, or the keyword arguments;
transformers' SigLIP 2 gives `pixel_values`, `pixel_attention_mask` and `spatial_shapes`,
converted by `from_spatial_shapes`). Each image's real patches come first, in row-major order
of its grid (what both references assume: they place each image's resampled position table
at the first rows*cols positions); another order is refused. Padding is excluded from
attention (as keys) and from pooling; the padding tokens' own values are never read.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from hooked_vit.errors import UserError

NAFLEX_KEYS = ("patches", "patch_coord", "patch_valid")


class NaFlexInputs(NamedTuple):
    patches: Float[Tensor, "b n patch_dim"]
    patch_coord: Tensor  # [b, n, 2] long, (row, col)
    patch_valid: Tensor  # [b, n] bool

    @property
    def grids(self) -> list[tuple[int, int]]:
        """Each image's patch grid (rows, cols): the largest valid coordinate + 1."""
        coord = self.patch_coord.masked_fill(~self.patch_valid[..., None], -1)
        rows, cols = (coord.amax(dim=1) + 1).unbind(-1)
        return [(int(r), int(c)) for r, c in zip(rows.tolist(), cols.tolist())]


def naflex_inputs(x: Any, patch_coord: Optional[Tensor], patch_valid: Optional[Tensor]) -> Optional[NaFlexInputs]:
    """The NaFlex inputs of a forward call (a dict, or patches with patch_coord= and
    patch_valid=), validated; None for a plain image call."""
    if isinstance(x, NaFlexInputs):
        return _checked(x)
    if isinstance(x, dict):
        unknown = sorted(set(x) - set(NAFLEX_KEYS))
        missing = [k for k in NAFLEX_KEYS if k not in x]
        if unknown or missing or patch_coord is not None or patch_valid is not None:
            raise UserError(f"a NaFlex input dict needs exactly the keys {NAFLEX_KEYS} (missing {missing}, unknown "
                             f"{unknown}) and no patch_coord= / patch_valid= besides")
        return _checked(NaFlexInputs(x["patches"], x["patch_coord"], x["patch_valid"]))
    if patch_coord is None and patch_valid is None:
        return None
    if patch_coord is None or patch_valid is None:
        raise UserError("NaFlex inputs need both patch_coord= [b, n, 2] and patch_valid= [b, n]")
    return _checked(NaFlexInputs(x, patch_coord, patch_valid))


def _checked(inputs: NaFlexInputs) -> NaFlexInputs:
    patches, coord, valid = inputs
    if not (torch.is_tensor(patches) and torch.is_tensor(coord) and torch.is_tensor(valid)):
        raise UserError("NaFlex patches, patch_coord and patch_valid must be tensors")
    if patches.ndim != 3 or coord.shape != (*patches.shape[:2], 2) or valid.shape != patches.shape[:2]:
        raise UserError(f"NaFlex inputs need patches [b, n, patch_dim], patch_coord [b, n, 2] and patch_valid [b, n]; "
                         f"got {tuple(patches.shape)}, {tuple(coord.shape)}, {tuple(valid.shape)}")
    coord, valid = coord.long().to(patches.device), valid.to(device=patches.device, dtype=torch.bool)
    if not bool(valid.any(1).all()):
        raise UserError("a NaFlex image has no valid patch (patch_valid all False in a row)")
    out = NaFlexInputs(patches, coord, valid)
    for i, (h, w) in enumerate(out.grids):
        n = h * w
        expected = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).view(n, 2)
        ok = (n <= valid.shape[1] and bool(valid[i, :n].all()) and not bool(valid[i, n:].any())
              and torch.equal(coord[i, :n].cpu(), expected))
        if not ok:
            raise UserError(f"NaFlex image {i}: its valid patches must come first, all {h}x{w} of its grid in row-major "
                             "order, then padding (as timm's and transformers' NaFlex collators lay them out)")
    return out


def patchify(images: Float[Tensor, "b c h w"], patch_size: tuple[int, int], layout: str = "hwc") -> Float[Tensor, "b n patch_dim"]:
    """Images [b, c, h, w] as flattened patches [b, rows * cols, ph * pw * c] in row-major order
    ("hwc": channel fastest, timm's NaFlex and transformers' SigLIP 2 processors; "chw": channel slowest)."""
    b, c, h, w = images.shape
    ph, pw = patch_size
    if h % ph or w % pw:
        raise UserError(f"image size {h}x{w} is not divisible by the patch size {ph}x{pw}")
    x = images.reshape(b, c, h // ph, ph, w // pw, pw)
    order = (0, 2, 4, 3, 5, 1) if layout == "hwc" else (0, 2, 4, 1, 3, 5)
    return x.permute(*order).reshape(b, (h // ph) * (w // pw), c * ph * pw)


def pad_batch(images: list[Tensor], patch_size: tuple[int, int], layout: str = "hwc",
              max_patches: Optional[int] = None) -> NaFlexInputs:
    """Images [c, h_i, w_i] of different sizes as one padded NaFlex batch (each image's patches
    in row-major order, then zero padding up to the longest image or `max_patches`)."""
    rows = [patchify(img[None], patch_size, layout)[0] for img in images]
    grids = [(img.shape[-2] // patch_size[0], img.shape[-1] // patch_size[1]) for img in images]
    n = max_patches or max(r.shape[0] for r in rows)
    if n < max(r.shape[0] for r in rows):
        raise UserError(f"max_patches={n} is fewer than an image's {max(r.shape[0] for r in rows)} patches")
    patches = rows[0].new_zeros(len(rows), n, rows[0].shape[-1])
    coord = torch.zeros(len(rows), n, 2, dtype=torch.long)
    valid = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, (r, (h, w)) in enumerate(zip(rows, grids)):
        patches[i, : r.shape[0]] = r
        coord[i, : h * w] = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).view(-1, 2)
        valid[i, : h * w] = True
    return NaFlexInputs(patches, coord, valid)


def from_spatial_shapes(pixel_values: Tensor, pixel_attention_mask: Tensor, spatial_shapes: Tensor) -> NaFlexInputs:
    """transformers' SigLIP 2 inputs (pixel_values [b, n, patch_dim], pixel_attention_mask [b, n],
    spatial_shapes [b, 2] = each image's (rows, cols)) as NaFlex inputs."""
    b, n = pixel_attention_mask.shape
    coord = torch.zeros(b, n, 2, dtype=torch.long, device=pixel_values.device)
    for i, (h, w) in enumerate(spatial_shapes.tolist()):
        grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).view(-1, 2)
        coord[i, : h * w] = grid.to(coord.device)
    return _checked(NaFlexInputs(pixel_values, coord, pixel_attention_mask.bool()))


def resample_table(table: Float[Tensor, "1 n d"], old: tuple[int, int], new: tuple[int, int], cfg) -> Float[Tensor, "1 m d"]:
    """A learned position table over an `old` patch grid resampled to a `new` grid (row-major
    rows), with cfg's pos_embed_interp / antialias / align_corners / ar_preserving, computed in
    float32 as timm does. The table itself when the grids agree."""
    if tuple(new) == tuple(old):
        return table
    size = (max(new), max(new)) if cfg.pos_embed_ar_preserving else tuple(new)
    grid = table.reshape(1, *old, -1).permute(0, 3, 1, 2).float()
    out = F.interpolate(grid, size=size, mode=cfg.pos_embed_interp, align_corners=cfg.pos_embed_align_corners,
                        antialias=cfg.pos_embed_antialias)[:, :, : new[0], : new[1]]
    return out.flatten(2).transpose(1, 2).to(table.dtype)


def factorized_table(pos_y: Float[Tensor, "1 gh d"], pos_x: Float[Tensor, "1 gw d"], new: tuple[int, int],
                     cfg) -> Float[Tensor, "1 m d"]:
    """NaFlexVit's factorized positions at a `new` grid: each 1-D table linearly resampled
    (align_corners=False; to the longer side with ar_preserving, then cut), summed per patch."""
    lengths = (max(new), max(new)) if cfg.pos_embed_ar_preserving else tuple(new)

    def resample(table: Tensor, length: int, keep: int) -> Tensor:
        if length != table.shape[1]:
            table = F.interpolate(table.permute(0, 2, 1).float(), size=length, mode="linear",
                                  align_corners=False).permute(0, 2, 1).to(table.dtype)
        return table[:, :keep]

    y, x = resample(pos_y, lengths[0], new[0]), resample(pos_x, lengths[1], new[1])
    return (y[:, :, None] + x[:, None, :]).flatten(1, 2)
