"""timm's eval preprocessing, applied jointly to an image and its object mask.

``transform_for(data_config)`` reproduces ``timm.data.create_transform(**data_config,
is_training=False)`` (timm 1.0: ``transforms_imagenet_eval``) step by step for the image,
and applies the same geometric steps to the mask with nearest-neighbour resampling, so the
mask stays pixel-aligned with the image the model sees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as F
from jaxtyping import Bool, Float
from PIL import Image
from torch import Tensor
from timm.data.constants import (DEFAULT_CROP_MODE, DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN,
                                 IMAGENET_DEFAULT_STD)
from torchvision.transforms import InterpolationMode

from .samples import to_tensor_image
from hooked_vit.errors import UserError

# What timm's resolve_data_config falls back to when a model has no pretrained_cfg.
DEFAULTS: dict[str, Any] = {"input_size": (3, 224, 224), "interpolation": "bicubic",
                            "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
                            "crop_pct": DEFAULT_CROP_PCT, "crop_mode": DEFAULT_CROP_MODE}


class JointTransform:
    """Resize + crop (timm eval, ``crop_mode`` center / squash / border), to tensor, normalise.

    ``__call__(image, mask=None) -> (float32 [3, H, W], bool [H, W] | None)``.
    ``image``: PIL image (exactly timm's result), or float tensor [3, h, w] in [0, 1] / uint8
    array [h, w, 3] (resized by torch with antialiasing: close to, not bit-equal with, PIL).
    ``mask``: PIL image, array or tensor [h, w], non-zero = object; always resampled with PIL
    nearest neighbour (the same geometry, padding counts as background).
    ``patch_size`` (optional): the model's patch size; with it, ``patch_mask(mask)`` samples the
    *source* mask under every patch of the model input (see ``source_patch_mask``), and masked
    datasets add it to their items as ``"patch_mask"``.
    """

    joint = True  # tells datasets to pass (image, mask) rather than image alone

    def __init__(self, img_size: tuple[int, int], interpolation: str = "bilinear",
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                 crop_pct: float | None = None, crop_mode: str | None = None,
                 patch_size: int | tuple[int, int] | None = None):
        self.patch_size = None if patch_size is None else _pair(patch_size)
        self.img_size = (int(img_size[0]), int(img_size[1]))  # (H, W)
        self.crop_pct = crop_pct or DEFAULT_CROP_PCT  # timm treats 0 / None as the default
        self.crop_mode = crop_mode or "center"
        if self.crop_mode not in ("center", "squash", "border"):
            raise UserError(f"crop_mode must be center, squash or border, got {crop_mode!r}")
        self.interpolation = InterpolationMode(interpolation)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        # timm: floor, not round (e.g. 224 / 0.875 = 256, 224 / 0.9 = 248.9 -> 248)
        self.scale_size = tuple(math.floor(x / self.crop_pct) for x in self.img_size)

    def __repr__(self) -> str:
        return (f"JointTransform(img_size={self.img_size}, scale_size={self.scale_size}, patch_size={self.patch_size}, "
                f"interpolation={self.interpolation.value}, crop_mode={self.crop_mode}, "
                f"mean={self.mean}, std={self.std})")

    def _resize_size(self, hw: tuple[int, int]) -> int | list[int]:
        """Target size for ``F.resize`` of an image of size ``hw`` = (h, w)."""
        if self.crop_mode == "squash":  # both edges to scale_size, aspect not kept
            return list(self.scale_size)
        if self.crop_mode == "center" and self.scale_size[0] == self.scale_size[1]:
            return self.scale_size[0]  # shorter edge -> scale_size (torchvision scalar mode)
        # timm ResizeKeepRatio: longest=0 (center) matches the shorter edge, 1 (border) the longer
        ratios = (hw[0] / self.scale_size[0], hw[1] / self.scale_size[1])
        ratio = max(ratios) if self.crop_mode == "border" else min(ratios)
        return [round(x / ratio) for x in hw]

    def source_axes(self, hw: tuple[int, int]) -> tuple["SourceAxis", "SourceAxis"]:
        """How the model input's rows and columns map onto a source image of size ``hw`` = (h, w):
        the size each axis is resized to and the crop offset (negative: padding), as the
        resize and centre crop / pad of ``_geometry`` do (torchvision's integer sizes and offsets)."""
        size = self._resize_size(hw)
        if isinstance(size, int):  # torchvision: shorter edge -> size, longer edge truncated
            short, long = sorted(hw)
            new = (size, int(size * long / short))
            resized = new if hw[0] <= hw[1] else new[::-1]
        else:
            resized = (int(size[0]), int(size[1]))
        return tuple(SourceAxis(src, res, _crop_offset(res, crop), crop)
                     for src, res, crop in zip(hw, resized, self.img_size))

    def patch_mask(self, mask, patch_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """Source mask [h, w] (PIL / array / tensor) -> float64 [3, gh, gw] samples of it under each
        patch of the model input (``source_patch_mask``); ``patch_size`` defaults to the transform's."""
        patch_size = patch_size or self.patch_size
        if patch_size is None:
            raise UserError("patch_mask needs the model's patch size: transform_for(model) or patch_size=")
        source = np.asarray(_mask_to_pil(mask)) != 0
        return source_patch_mask(source, self.source_axes(source.shape), _pair(patch_size))

    def _geometry(self, img, interpolation: InterpolationMode, fill):
        """Resize then center-crop (``border``: crop or pad with ``fill``) a PIL image or tensor."""
        h, w = F.get_dimensions(img)[1:]
        img = F.resize(img, self._resize_size((h, w)), interpolation, antialias=True)
        if self.crop_mode != "border":
            return F.center_crop(img, list(self.img_size))  # pads with 0 if the image is too small
        return _center_crop_or_pad(img, self.img_size, fill)

    def __call__(self, image, mask=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(image, Image.Image):
            image = image.convert("RGB")
            fill = [round(255 * v) for v in self.mean]  # timm's border fill = the mean colour
            out = F.to_tensor(self._geometry(image, self.interpolation, fill))
        else:
            image = to_tensor_image(image)  # arrays / uint8 tensors -> float [3, h, w] in [0, 1]
            out = self._geometry(image, self.interpolation, list(self.mean))
        out = F.normalize(out, self.mean, self.std)
        return out, (None if mask is None else self.mask(mask))

    def image(self, image) -> torch.Tensor:
        """Image only: float32 [3, H, W] (for code that calls ``transform(image)`` and wants a tensor)."""
        return self(image)[0]

    def mask(self, mask) -> torch.Tensor:
        """Mask [h, w] (PIL / array / tensor, non-zero = object) -> bool [H, W] aligned with the image."""
        pil = _mask_to_pil(mask)
        # PIL's nearest uses pixel centres like its bicubic / bilinear, so the mask stays aligned
        out = self._geometry(pil, InterpolationMode.NEAREST, 0)  # padding is background
        return torch.from_numpy(np.asarray(out) != 0)


def _mask_to_pil(mask) -> Image.Image:
    """Any [h, w] mask -> PIL "L" image, 255 = object (binarised first so resampling can't mix ids)."""
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask)
        mask = mask.any(axis=-1) if mask.ndim == 3 else mask
    elif isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise UserError(f"mask must be [H, W], got shape {mask.shape}")
    return Image.fromarray(((mask != 0) * 255).astype(np.uint8), mode="L")


def _center_crop_or_pad(img, size: tuple[int, int], fill):
    """timm's ``center_crop_or_pad`` (= torchvision ``center_crop`` with a ``fill`` colour)."""
    (h, w), (ch, cw) = F.get_dimensions(img)[1:], size
    if cw > w or ch > h:
        pad = [(cw - w) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0,
               (cw - w + 1) // 2 if cw > w else 0, (ch - h + 1) // 2 if ch > h else 0]  # l, t, r, b
        if isinstance(img, torch.Tensor) and isinstance(fill, (list, tuple)):
            shift = torch.as_tensor(fill, dtype=img.dtype).view(-1, 1, 1)
            img = F.pad(img - shift, pad) + shift  # tensor pad takes one scalar: pad 0 around img - fill
        else:
            img = F.pad(img, pad, fill=fill)
        h, w = F.get_dimensions(img)[1:]
    return F.crop(img, int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0)), ch, cw)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


def _crop_offset(resized: int, crop: int) -> int:
    """Where a centre crop of ``crop`` starts in a resized axis of ``resized`` pixels; negative when
    the axis is padded (torchvision ``center_crop`` / timm ``center_crop_or_pad``)."""
    return int(round((resized - crop) / 2.0)) if resized >= crop else -((crop - resized) // 2)


@dataclass(frozen=True)
class SourceAxis:
    """One axis of the model input on the source image: model coordinate y (pixel edges)
    lies at source coordinate (y + offset) * source / resized."""

    source: int  # source pixels
    resized: int  # after the resize
    offset: int  # crop start in the resized axis (negative: padding)
    size: int  # model input pixels

    def patches(self, patch: int) -> dict[str, np.ndarray]:
        """Per patch i of this axis: the source pixel of its first edge (``corner``, read like
        ``cv2.resize(..., INTER_NEAREST)``), of its centre (``center``), and the source pixels
        whose centres lie under it (``lo`` .. ``hi`` - 1; at least the centre one)."""
        g = self.size // patch
        i = np.arange(g, dtype=np.int64)
        # cv2 INTER_NEAREST reads floor(i * (1 / (g / S))) of a source of S pixels resized to g;
        # here S is the source extent under the grid, which starts at `start`
        extent = self.source * (g * patch) / self.resized
        start = self.offset * self.source / self.resized
        corner = np.floor(start + i * (1.0 / (g / extent))).astype(np.int64)
        two_r = 2 * self.resized  # exact integer arithmetic below: edges at (i p + o) S / r
        center = (((2 * i + 1) * patch + 2 * self.offset) * self.source) // two_r
        edge = lambda k: -((two_r // 2 - 2 * (k * patch + self.offset) * self.source) // two_r)  # ceil(edge - 1/2)
        lo, hi = edge(i), edge(i + 1)
        empty = hi <= lo  # a patch narrower than one source pixel: its centre pixel
        return {"corner": corner, "center": center,
                "lo": np.where(empty, center, lo), "hi": np.where(empty, center + 1, hi)}


def source_patch_mask(source: np.ndarray, axes: tuple[SourceAxis, SourceAxis],
                      patch_size: tuple[int, int]) -> torch.Tensor:
    """Samples of a source mask bool [h, w] under each patch of the model input:
    float64 [3, gh, gw] = (corner pixel, centre pixel, share of object pixels).

    ``axes`` map the model input onto the source (``JointTransform.source_axes``). corner: the
    source pixel ``floor(y0 + i * (1 / (gh / E)))`` (E the source extent under the grid, y0 its
    start): for a grid that covers the whole source (no crop) exactly what
    ``cv2.resize(mask, (gw, gh), interpolation=cv2.INTER_NEAREST)`` reads, the reference
    code's token sets (Vilas et al. 2023, ``src/vis.py``). centre: the source pixel under the
    patch centre. share: object pixels among the source pixels whose centres lie under the
    patch. Pixels outside the source (padding) are background.
    """
    rows, cols = (ax.patches(p) for ax, p in zip(axes, patch_size))
    h, w = source.shape

    def read(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        inside = ((r >= 0) & (r < h))[:, None] & ((c >= 0) & (c < w))[None, :]
        return np.where(inside, source[np.clip(r, 0, h - 1)][:, np.clip(c, 0, w - 1)], False)

    counts = np.zeros((h + 1, w + 1), np.int64)  # integral image: counts[y, x] = object pixels above-left
    counts[1:, 1:] = source.astype(np.int64).cumsum(0).cumsum(1)
    r0, r1 = (np.clip(rows[k], 0, h) for k in ("lo", "hi"))
    c0, c1 = (np.clip(cols[k], 0, w) for k in ("lo", "hi"))
    inside = counts[r1][:, c1] - counts[r0][:, c1] - counts[r1][:, c0] + counts[r0][:, c0]
    area = (rows["hi"] - rows["lo"])[:, None] * (cols["hi"] - cols["lo"])[None, :]
    share = inside / area  # float64, like mask_to_token_grid's majority share
    return torch.from_numpy(np.stack([read(rows["corner"], cols["corner"]), read(rows["center"], cols["center"]),
                                      share]).astype(np.float64))


class ProcessorTransform(JointTransform):
    """A transformers image processor's steps (``hooked_vit.loading_hf.processor_data_config``):
    resize to ``resize`` (``{"height", "width"}``, or ``{"shortest_edge"}`` keeping the aspect
    ratio, the long side truncated as transformers does; ``None``: no resize), then, if
    ``center_crop``, a centre crop to ``img_size`` with the offsets rounded down (transformers'
    ``center_crop``; timm / torchvision round half to even), then to tensor and normalise.
    On a PIL image this is transformers' PIL backend (``ViTImageProcessorPil`` ...) op for op;
    its torchvision backend resizes tensors, which differs from PIL by up to a few grey levels."""

    def __init__(self, img_size: tuple[int, int], interpolation: str = "bilinear",
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                 resize: dict[str, int] | None = None, center_crop: bool = False,
                 patch_size: int | tuple[int, int] | None = None):
        super().__init__(img_size, interpolation, mean, std, crop_pct=1.0, crop_mode="center", patch_size=patch_size)
        self.resize, self.center_crop = resize, center_crop

    def __repr__(self) -> str:
        return (f"ProcessorTransform(img_size={self.img_size}, resize={self.resize}, center_crop={self.center_crop}, "
                f"interpolation={self.interpolation.value}, mean={self.mean}, std={self.std})")

    def _processor_size(self, h: int, w: int) -> list[int]:
        if "shortest_edge" in self.resize:
            short = self.resize["shortest_edge"]
            if h <= w:
                return [short, int(short * w / h)]
            return [int(short * h / w), short]
        return [self.resize["height"], self.resize["width"]]

    def _geometry(self, img, interpolation: InterpolationMode, fill):
        if self.resize is not None:
            img = F.resize(img, self._processor_size(*F.get_dimensions(img)[1:]), interpolation, antialias=True)
        if not self.center_crop:
            return img
        (h, w), (ch, cw) = F.get_dimensions(img)[1:], self.img_size
        return F.crop(img, (h - ch) // 2, (w - cw) // 2, ch, cw)

    def source_axes(self, hw: tuple[int, int]) -> tuple["SourceAxis", "SourceAxis"]:
        """As ``JointTransform.source_axes``, for the processor's resize and crop (offsets rounded down)."""
        resized = tuple(self._processor_size(*hw)) if self.resize is not None else tuple(hw)
        return tuple(SourceAxis(src, res, (res - crop) // 2 if self.center_crop else 0, crop)
                     for src, res, crop in zip(hw, resized, self.img_size))



def transform_for(data_config, patch_size: int | tuple[int, int] | None = None) -> JointTransform:
    """The eval transform of a timm data config (``timm.data.resolve_data_config(model=m)``,
    ``HookedViT.cfg.data_config`` or a ``pretrained_cfg``). Keys used: input_size (C, H, W) or
    (H, W), interpolation, mean, std, crop_pct, crop_mode; missing ones take timm's defaults,
    other keys are ignored. Also accepts a ``HookedViT`` (its ``cfg.data_config``, but the
    size from ``cfg.img_size``: the size the model was built for) or a timm model
    (``resolve_data_config(model=...)``, i.e. its ``pretrained_cfg``). ``patch_size``: the
    model's (taken from a HookedViT or timm model when not given), for ``patch_mask``.
    """
    if hasattr(data_config, "cfg") and hasattr(data_config.cfg, "data_config"):  # HookedViT
        cfg = data_config.cfg
        patch_size = patch_size or getattr(cfg, "patch_size", None)
        data_config = dict(cfg.data_config or {})
        if "resize" not in data_config:  # a transformers processor's own sizes are kept as it gives them
            data_config["input_size"] = (3, *cfg.img_size)
    elif hasattr(data_config, "pretrained_cfg"):  # timm model: what timm itself would resolve
        from timm.data import resolve_data_config
        embed = getattr(data_config, "patch_embed", None)
        patch_size = patch_size or getattr(embed, "patch_size", None)
        data_config = resolve_data_config(model=data_config)
    if "resize" in data_config:  # a transformers processor's steps (hooked_vit.loading_hf)
        return ProcessorTransform(tuple(data_config["input_size"])[-2:], data_config["interpolation"],
                                  data_config["mean"], data_config["std"], data_config["resize"],
                                  data_config.get("center_crop", False), patch_size=patch_size)
    cfg = {**DEFAULTS, **{k: v for k, v in data_config.items() if v is not None}}
    size = tuple(cfg["input_size"])[-2:]
    return JointTransform(size, cfg["interpolation"], cfg["mean"], cfg["std"], cfg["crop_pct"],
                          cfg["crop_mode"], patch_size=patch_size)


MASK_SAMPLINGS = ("center", "corner", "majority")


@dataclass(frozen=True)
class MaskSampling:
    """How a patch's pixel mask becomes one object / context flag for its token.

    Read on the source-resolution mask where the dataset gives it (``source_patch_mask``,
    ``batch_object_tokens``), else on the mask aligned with the model input
    (``mask_to_token_grid``). center: the pixel under the patch centre (the default: the
    unbiased point sample of the patch, not shifted towards its top-left); corner: the pixel
    at the patch's top-left edge, what the reference code's nearest resize of the mask to the
    token grid samples (Vilas et al. 2023, github.com/martinagvilas/vit-cls_emb ``src/vis.py``,
    ``cv2.resize(..., INTER_NEAREST)`` picks source pixel ``floor(i * (1 / (gh / H)))``);
    majority: the share of object pixels in the patch is >= ``threshold``.
    Text form (CLI, settings): ``center``, ``corner``, ``majority`` or ``majority:0.25``.
    """

    kind: str = "center"
    threshold: float = 0.5

    def __post_init__(self):
        if self.kind not in MASK_SAMPLINGS:
            raise UserError(f"mask sampling must be one of {', '.join(MASK_SAMPLINGS)}, got {self.kind!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 < self.threshold <= 1.0:
            raise UserError(f"majority threshold is a share of object pixels in (0, 1], got {self.threshold!r}")
        if self.kind != "majority" and self.threshold != 0.5:
            raise UserError(f"a threshold only applies to majority, not {self.kind!r}; use majority:{self.threshold}")

    @classmethod
    def parse(cls, spec: "MaskSampling | str | None") -> "MaskSampling":
        """A MaskSampling from itself, None (the default) or its text ("majority:0.25")."""
        if spec is None or isinstance(spec, MaskSampling):
            return spec or cls()
        if not isinstance(spec, str):
            raise TypeError(f"mask sampling is a MaskSampling or text such as 'majority:0.5', got {type(spec).__name__}")
        kind, colon, threshold = spec.strip().partition(":")
        if not colon:
            return cls(kind)
        if kind != "majority":
            raise UserError(f"only majority takes a threshold (majority:0.5), got {spec!r}")
        try:
            value = float(threshold)
        except ValueError:
            raise UserError(f"majority threshold must be a number in (0, 1], got {threshold!r} in {spec!r}") from None
        return cls(kind, value)

    def __str__(self) -> str:
        return f"majority:{self.threshold:g}" if self.kind == "majority" else self.kind

    def select(self, patch_mask: Float[Tensor, "*b 3 gh gw"]) -> Bool[Tensor, "b n_patches"]:
        """Object tokens from ``source_patch_mask`` samples (corner, centre, share), row-major."""
        patch_mask = torch.as_tensor(patch_mask)
        patch_mask = patch_mask[None] if patch_mask.ndim == 3 else patch_mask
        flags = {"corner": patch_mask[:, 0] > 0, "center": patch_mask[:, 1] > 0,
                 "majority": patch_mask[:, 2] >= self.threshold}[self.kind]
        return flags.reshape(flags.shape[0], -1)


def mask_to_token_grid(mask: Bool[Tensor, "*b H W"], patch_size: int | tuple[int, int],
                       sampling: MaskSampling | str | None = None) -> Bool[Tensor, "b n_patches"]:
    """Which patch tokens are object tokens: bool [B, H, W] or [H, W] -> bool [B, gh * gw].

    ``sampling`` (`MaskSampling` or its text; default center): patch (i, j) covers rows
    ``i*ph .. i*ph+ph-1`` and columns ``j*pw .. j*pw+pw-1``. center reads pixel
    ``(i*ph + ph//2, j*pw + pw//2)`` (for even sizes the lower-right of the 4 central
    pixels), corner pixel ``(i*ph, j*pw)``, majority counts the patch's object pixels.
    ``gh = H // ph``, ``gw = W // pw``: like the stride-``p`` patch conv, leftover rows /
    columns are dropped. Tokens are row-major (``i * gw + j``), the order of timm's patch tokens;
    prefix tokens (CLS, registers, distillation) are not included. A 2-D mask gives B = 1.
    """
    sampling = MaskSampling.parse(sampling)
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    mask = torch.as_tensor(mask)
    mask = mask[None] if mask.ndim == 2 else mask  # [B, H, W]
    gh, gw = mask.shape[-2] // ph, mask.shape[-1] // pw
    if gh == 0 or gw == 0:
        raise UserError(f"mask {tuple(mask.shape[-2:])} is smaller than one patch {(ph, pw)}")
    if sampling.kind == "majority":
        patches = mask[:, :gh * ph, :gw * pw].reshape(mask.shape[0], gh, ph, gw, pw)
        # count / n in float64 rounds like the threshold's own literal: 3 / 10 >= 0.3 holds
        share = patches.bool().sum((2, 4), dtype=torch.float64) / (ph * pw)
        return (share >= sampling.threshold).reshape(mask.shape[0], gh * gw)
    offset = (ph // 2, pw // 2) if sampling.kind == "center" else (0, 0)
    rows = torch.arange(gh, device=mask.device) * ph + offset[0]
    cols = torch.arange(gw, device=mask.device) * pw + offset[1]
    return mask[:, rows][:, :, cols].bool().reshape(mask.shape[0], gh * gw)


def batch_object_tokens(batch: Mapping[str, Any], patch_size: int | tuple[int, int],
                        sampling: MaskSampling | str | None = None) -> Bool[Tensor, "b n_patches"]:
    """Which patch tokens of a batch are object tokens: from its ``"patch_mask"`` (the source mask
    sampled under every patch: datasets whose ``JointTransform`` knows the patch size, e.g.
    ImageNet-S through ``transform_for(model)``) when present, else from its pixel ``"mask"``
    aligned with the model input (``mask_to_token_grid``; the same thing when the images are
    not resized, as the synthetic data)."""
    sampling = MaskSampling.parse(sampling)
    if "patch_mask" not in batch:
        return mask_to_token_grid(torch.as_tensor(batch["mask"]).bool(), patch_size, sampling)
    patch_mask = torch.as_tensor(batch["patch_mask"])
    grid = tuple(s // p for s, p in zip(torch.as_tensor(batch["mask"]).shape[-2:], _pair(patch_size)))
    if tuple(patch_mask.shape[-2:]) != grid:
        raise UserError(f"the dataset's patch_mask has a {tuple(patch_mask.shape[-2:])} grid, the model a {grid} grid: "
                         "build the dataset's transform with transform_for(model)")
    return sampling.select(patch_mask)


def normalizer_for(model) -> Callable:
    """The model's normalisation alone, for tensors already in [0, 1] ([..., 3, H, W], e.g. rendered
    clips): ``Normalize`` with its data_config mean / std (timm's defaults where it has none)."""
    from torchvision.transforms import Normalize

    dc = getattr(getattr(model, "cfg", model), "data_config", None) or {}
    return Normalize(dc.get("mean", DEFAULTS["mean"]), dc.get("std", DEFAULTS["std"]))


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``Normalize(mean, std)`` for display: [..., 3, H, W] -> same shape, clamped to [0, 1]."""
    mean_t = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    return (image * std_t + mean_t).clamp(0.0, 1.0)
