"""timm's eval preprocessing, applied jointly to an image and its object mask.

``transform_for(data_config)`` reproduces ``timm.data.create_transform(**data_config,
is_training=False)`` (timm 1.0: ``transforms_imagenet_eval``) step by step for the image,
and applies the same geometric steps to the mask with nearest-neighbour resampling, so the
mask stays pixel-aligned with the image the model sees.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as F
from jaxtyping import Bool
from PIL import Image
from torch import Tensor
from timm.data.constants import (DEFAULT_CROP_MODE, DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN,
                                 IMAGENET_DEFAULT_STD)
from torchvision.transforms import InterpolationMode

from .samples import to_tensor_image

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
    """

    joint = True  # tells datasets to pass (image, mask) rather than image alone

    def __init__(self, img_size: tuple[int, int], interpolation: str = "bilinear",
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                 crop_pct: float | None = None, crop_mode: str | None = None):
        self.img_size = (int(img_size[0]), int(img_size[1]))  # (H, W)
        self.crop_pct = crop_pct or DEFAULT_CROP_PCT  # timm treats 0 / None as the default
        self.crop_mode = crop_mode or "center"
        if self.crop_mode not in ("center", "squash", "border"):
            raise ValueError(f"crop_mode must be center, squash or border, got {crop_mode!r}")
        self.interpolation = InterpolationMode(interpolation)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        # timm: floor, not round (e.g. 224 / 0.875 = 256, 224 / 0.9 = 248.9 -> 248)
        self.scale_size = tuple(math.floor(x / self.crop_pct) for x in self.img_size)

    def __repr__(self) -> str:
        return (f"JointTransform(img_size={self.img_size}, scale_size={self.scale_size}, "
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
        raise ValueError(f"mask must be [H, W], got shape {mask.shape}")
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
                 resize: dict[str, int] | None = None, center_crop: bool = False):
        super().__init__(img_size, interpolation, mean, std, crop_pct=1.0, crop_mode="center")
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


def transform_for(data_config) -> JointTransform:
    """The eval transform of a timm data config (``timm.data.resolve_data_config(model=m)``,
    ``HookedViT.cfg.data_config`` or a ``pretrained_cfg``). Keys used: input_size (C, H, W) or
    (H, W), interpolation, mean, std, crop_pct, crop_mode; missing ones take timm's defaults,
    other keys are ignored. Also accepts a ``HookedViT`` (its ``cfg.data_config``, but the
    size from ``cfg.img_size``: the size the model was built for) or a timm model
    (``resolve_data_config(model=...)``, i.e. its ``pretrained_cfg``).
    """
    if hasattr(data_config, "cfg") and hasattr(data_config.cfg, "data_config"):  # HookedViT
        cfg = data_config.cfg
        data_config = dict(cfg.data_config or {})
        if "resize" not in data_config:  # a transformers processor's own sizes are kept as it gives them
            data_config["input_size"] = (3, *cfg.img_size)
    elif hasattr(data_config, "pretrained_cfg"):  # timm model: what timm itself would resolve
        from timm.data import resolve_data_config
        data_config = resolve_data_config(model=data_config)
    if "resize" in data_config:  # a transformers processor's steps (hooked_vit.loading_hf)
        return ProcessorTransform(tuple(data_config["input_size"])[-2:], data_config["interpolation"],
                                  data_config["mean"], data_config["std"], data_config["resize"],
                                  data_config.get("center_crop", False))
    cfg = {**DEFAULTS, **{k: v for k, v in data_config.items() if v is not None}}
    size = tuple(cfg["input_size"])[-2:]
    return JointTransform(size, cfg["interpolation"], cfg["mean"], cfg["std"], cfg["crop_pct"],
                          cfg["crop_mode"])


MASK_SAMPLINGS = ("center", "corner", "majority")


@dataclass(frozen=True)
class MaskSampling:
    """How a patch's pixel mask becomes one object / context flag for its token.

    center: the pixel at the patch centre (the default: the unbiased point sample of the
      patch, not shifted towards its top-left); corner: the top-left pixel, what the
      reference code's nearest resize of the mask to the token grid samples (Vilas et al.
      2023, github.com/martinagvilas/vit-cls_emb ``src/vis.py``, ``cv2.resize(...,
      INTER_NEAREST)`` picks source pixel ``floor(i * H / gh)``); majority: the share of
      object pixels in the patch is >= ``threshold``.
    Text form (CLI, settings): ``center``, ``corner``, ``majority`` or ``majority:0.25``.
    """

    kind: str = "center"
    threshold: float = 0.5

    def __post_init__(self):
        if self.kind not in MASK_SAMPLINGS:
            raise ValueError(f"mask sampling must be one of {', '.join(MASK_SAMPLINGS)}, got {self.kind!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"majority threshold is a share of object pixels in (0, 1], got {self.threshold!r}")
        if self.kind != "majority" and self.threshold != 0.5:
            raise ValueError(f"a threshold only applies to majority, not {self.kind!r}; use majority:{self.threshold}")

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
            raise ValueError(f"only majority takes a threshold (majority:0.5), got {spec!r}")
        try:
            value = float(threshold)
        except ValueError:
            raise ValueError(f"majority threshold must be a number in (0, 1], got {threshold!r} in {spec!r}") from None
        return cls(kind, value)

    def __str__(self) -> str:
        return f"majority:{self.threshold:g}" if self.kind == "majority" else self.kind


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
        raise ValueError(f"mask {tuple(mask.shape[-2:])} is smaller than one patch {(ph, pw)}")
    if sampling.kind == "majority":
        patches = mask[:, :gh * ph, :gw * pw].reshape(mask.shape[0], gh, ph, gw, pw)
        # count / n in float64 rounds like the threshold's own literal: 3 / 10 >= 0.3 holds
        share = patches.bool().sum((2, 4), dtype=torch.float64) / (ph * pw)
        return (share >= sampling.threshold).reshape(mask.shape[0], gh * gw)
    offset = (ph // 2, pw // 2) if sampling.kind == "center" else (0, 0)
    rows = torch.arange(gh, device=mask.device) * ph + offset[0]
    cols = torch.arange(gw, device=mask.device) * pw + offset[1]
    return mask[:, rows][:, :, cols].bool().reshape(mask.shape[0], gh * gw)


def denormalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``Normalize(mean, std)`` for display: [..., 3, H, W] -> same shape, clamped to [0, 1]."""
    mean_t = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    return (image * std_t + mean_t).clamp(0.0, 1.0)
