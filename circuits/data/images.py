"""One image decoder for every ``circuits`` loader: any file Pillow opens -> the right 8-bit RGB.

``PIL.Image.convert("RGB")`` alone is wrong for several modes (Pillow "Concepts / Modes":
https://pillow.readthedocs.io/en/stable/handbook/concepts.html#modes): a 16-bit PNG ("I;16")
or 32-bit TIFF ("I", "F") is *clipped* to 0..255, so almost every pixel becomes white; the
colour under a transparent pixel (often black or junk) shows through; EXIF orientation is
ignored. ``load_image`` fixes each case:

* ``I;16`` / ``I;16B`` / ``I;16L`` / ``I;16N`` (16-bit grey): divided by 65535.
* ``I`` (32-bit int): divided by 65535 when all values lie in [0, 65535] (how Pillow decodes
  16-bit PNGs/TIFFs it stores as ``I``), else stretched over its own min..max range.
* ``F`` (32-bit float): taken as given when all values lie in [0, 1], else stretched over its
  own min..max range (a constant image becomes black). Non-finite values are refused.
* Alpha (``RGBA``, ``LA``, ``PA``, ``La``, ``RGBa``, palette or grey with a ``transparency``
  entry): composited onto ``BACKGROUND`` (white), like a page behind the image. timm's own
  loader (``convert("RGB")``) drops alpha instead; white keeps transparent margins neutral.
* ``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``HSV``, ``RGBX``: Pillow's own conversion
  (``CMYK`` without colour management, as timm and torchvision do).
* EXIF orientation is applied (``ImageOps.exif_transpose``), as a photo viewer shows it.
* Multi-frame files (GIF, TIFF, APNG, ...): the first frame.

The result is always 8-bit RGB: high-bit-depth images are rounded to 8 bits (the
quantisation error is at most half a level, 1/510, before normalisation).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from hooked_vit.errors import UserError

BACKGROUND: tuple[int, int, int] = (255, 255, 255)  # what transparent pixels are composited on
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "La", "RGBa")


def image_extensions() -> frozenset[str]:
    """Lower-case extensions (with dot) of every format this Pillow can *open* (not save-only)."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def load_image(path: str | os.PathLike, exif_orientation: bool = True) -> Image.Image:
    """Decode ``path`` (first frame, EXIF-oriented) to an 8-bit RGB PIL image; see the module doc.

    ``exif_orientation=False`` keeps the stored pixel grid (for masks annotated on that grid).
    Raises whatever Pillow raises for unreadable / corrupt files (loaders catch it and skip the
    item) and ``ValueError`` for a float image with NaN / inf.
    """
    with Image.open(Path(path)) as img:
        img.seek(0)  # first frame of GIF / TIFF / APNG
        img.load()  # decode now so a truncated file fails here, not later in a worker
        # exif_transpose returns a copy, detached from the file that is about to close
        oriented = ImageOps.exif_transpose(img) if exif_orientation else img.copy()
    return to_rgb(oriented)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see the module doc for the rule per mode)."""
    if img.mode in SIXTEEN_BIT or img.mode in ("I", "F"):
        return _high_depth_to_rgb(img)
    if img.mode in _ALPHA or "transparency" in img.info:
        rgba = img.convert("RGBA")  # palette / grey transparency -> a real alpha channel
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16 / 32-bit grey -> RGB: scale to [0, 1] by the mode's real range, round to 8 bits."""
    values = np.asarray(img, dtype=np.float64)  # [H, W]
    if not np.isfinite(values).all():
        raise UserError(f"{img.mode} image has NaN or infinite pixels; cannot map it to RGB")
    lo, hi = float(values.min()), float(values.max())
    if img.mode in SIXTEEN_BIT or (img.mode == "I" and lo >= 0 and hi <= 65535):
        unit = values / 65535.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        unit = values
    else:  # no known full-scale value: stretch the image's own range
        unit = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    grey = np.round(unit * 255.0).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")
