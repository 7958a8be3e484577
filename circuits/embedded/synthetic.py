"""Procedural "shapes on backgrounds" dataset used by the embedded default models.

Every item is rendered on the fly with numpy from ``default_rng([seed, split_id, index])``,
so the dataset has no storage cost, any length works, and an item is a pure function of
``(seed, split, index, spurious_corr, img_size, difficulty)``.

Image content
-------------
* one object of ``N_CLASSES = 10`` shape classes (``CLASS_NAMES``), with random position,
  size, aspect jitter, small rotation (bars: random horizontal / vertical) and random hue;
* a background attribute ``background`` in {0, 1}:
  ``0`` = warm (red/orange family) smooth gradient, ``1`` = cool (blue/green family)
  sinusoidal stripes, plus mild Gaussian pixel noise everywhere.

Label / background coupling
---------------------------
With ``spurious_corr=None`` the label and the background are drawn independently
(label uniform over the classes, background a fair coin).  With ``spurious_corr=rho`` the
background equals ``label % 2`` with probability ``rho`` ("preferred" background) and the
other one otherwise.  ``group = label * 2 + background`` indexes the class x background
cells used for worst-group accuracy.

Difficulty
----------
``difficulty="normal"`` (default) draws clearly visible objects (half-size 5-10 px, bright).
``difficulty="hard"`` draws small (half-size 3-5 px), low-contrast objects with more
noise, so the shape cue is much weaker than the background cue; the ``spurious``
embedded model is trained on this setting so that it latches onto the background.
"""
from __future__ import annotations

import colorsys
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate
from hooked_vit.errors import UserError

CLASS_NAMES: tuple[str, ...] = (
    "disc", "square", "triangle", "cross", "ring",
    "bar", "diamond", "L", "T", "star",
)
N_CLASSES: int = len(CLASS_NAMES)
MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}

# size = object half-size range in pixels, value = HSV value range of the object colour
DIFFICULTIES: dict[str, dict] = {
    "normal": {"size": (5.0, 10.0), "value": (0.75, 1.0), "saturation": (0.5, 1.0), "noise": 0.03},
    "hard": {"size": (3.0, 5.0), "value": (0.45, 0.7), "saturation": (0.2, 0.6), "noise": 0.06},
}


def _shape_mask(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of shape ``label`` in normalised coords (object spans roughly [-1, 1]^2).

    ``u`` is horizontal (right positive), ``v`` vertical (down positive); both [H, W].
    """
    au, av = np.abs(u), np.abs(v)
    r = np.sqrt(u * u + v * v)
    name = CLASS_NAMES[label]
    if name == "disc":
        return r <= 1.0
    if name == "square":
        return np.maximum(au, av) <= 0.8
    if name == "triangle":  # apex up, base down
        return (v >= -0.85) & (v <= 0.75) & (au <= 0.55 * (v + 0.85))
    if name == "cross":
        return ((au <= 0.28) & (av <= 0.95)) | ((av <= 0.28) & (au <= 0.95))
    if name == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if name == "bar":
        return (au <= 1.0) & (av <= 0.3)
    if name == "diamond":
        return au + av <= 1.05
    if name == "L":
        return ((u >= -0.8) & (u <= -0.3) & (av <= 0.9)) | ((v >= 0.4) & (v <= 0.9) & (au <= 0.8))
    if name == "T":
        return ((v >= -0.9) & (v <= -0.4) & (au <= 0.9)) | ((au <= 0.25) & (av <= 0.9))
    if name == "star":  # five spikes, apex up
        theta = np.arctan2(u, -v)
        return r <= 0.35 + 0.7 * (0.5 * (1.0 + np.cos(5.0 * theta))) ** 2
    raise UserError(f"unknown label {label}")


def _background(bg: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Render background ``bg`` (0 warm gradient, 1 cool stripes) as float [H, W, 3]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5  # [H, W] each
    ang = rng.uniform(0.0, 2.0 * np.pi)
    proj = np.cos(ang) * xx + np.sin(ang) * yy  # [H, W] in about [-0.7, 0.7]
    if bg == 0:
        base = np.array([rng.uniform(0.35, 0.55), rng.uniform(0.15, 0.35), rng.uniform(0.03, 0.18)])
        pattern = 0.25 * proj  # smooth gradient
    else:
        base = np.array([rng.uniform(0.03, 0.18), rng.uniform(0.2, 0.4), rng.uniform(0.35, 0.55)])
        period = rng.uniform(4.0, 8.0) / size
        pattern = 0.09 * np.sin(2.0 * np.pi * proj / period + rng.uniform(0.0, 2.0 * np.pi))
    return base[None, None, :] + pattern[:, :, None]  # [H, W, 3]


def _object_colour(rng: np.random.Generator, difficulty: str) -> np.ndarray:
    """Random object RGB colour [3] of the given difficulty preset."""
    p = DIFFICULTIES[difficulty]
    rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*p["saturation"]), rng.uniform(*p["value"]))
    return np.asarray(rgb, dtype=np.float64)


def sample_meta(rng: np.random.Generator, spurious_corr: float | None) -> tuple[int, int]:
    """Draw ``(label, background)``; always the first draws of an item's generator."""
    label = int(rng.integers(N_CLASSES))
    if spurious_corr is None:
        background = int(rng.integers(2))
    else:
        preferred = label % 2
        background = preferred if rng.uniform() < spurious_corr else 1 - preferred
    return label, background


def render(rng: np.random.Generator, label: int, background: int, img_size: int = 32,
           difficulty: str = "normal") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one image. Returns ``(image [H, W, 3] float32 in [0,1], mask [H, W] bool, colour [3])``."""
    p = DIFFICULTIES[difficulty]
    img = _background(background, rng, img_size)  # [H, W, 3]
    half = rng.uniform(*p["size"]) * img_size / 32.0
    margin = half * 1.05
    cx, cy = rng.uniform(margin, img_size - 1 - margin, size=2)
    rot = rng.choice([0.0, np.pi / 2]) if CLASS_NAMES[label] == "bar" else 0.0
    rot += rng.uniform(-np.pi / 12, np.pi / 12)
    sx, sy = half * rng.uniform(0.85, 1.15, size=2)
    yy, xx = np.mgrid[0:img_size, 0:img_size].astype(np.float64)  # [H, W] pixel centres
    dx, dy = xx - cx, yy - cy
    u = (np.cos(rot) * dx + np.sin(rot) * dy) / sx  # [H, W]
    v = (-np.sin(rot) * dx + np.cos(rot) * dy) / sy  # [H, W]
    mask = _shape_mask(label, u, v)  # [H, W]
    colour = _object_colour(rng, difficulty)
    img[mask] = colour
    img = img + rng.normal(0.0, p["noise"], size=img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32), mask, colour


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Apply the training normalisation ``(x - MEAN) / STD`` to images [..., 3, H, W] in [0, 1]."""
    mean = torch.tensor(MEAN, dtype=images.dtype, device=images.device)[:, None, None]  # [3, 1, 1]
    std = torch.tensor(STD, dtype=images.dtype, device=images.device)[:, None, None]  # [3, 1, 1]
    return (images - mean) / std


class SyntheticShapes(Dataset):
    """Deterministic on-the-fly dataset of one shape on one of two backgrounds (see module doc).

    Items are dicts ``{"image": float32 [3, H, W], "label": int, "mask": bool [H, W],
    "background": int, "group": int, "index": int}``. ``transform`` maps the raw image
    (float [3, H, W] in [0, 1]); the default is ``normalize``, the embedded models'
    preprocessing, so ``identify(model, SyntheticShapes(64, split="test"), out)`` measures what
    the model was trained on. ``transform=None`` gives the raw [0, 1] image.
    """

    def __init__(self, n: int, seed: int = 0, split: str = "train", spurious_corr: float | None = None,
                 img_size: int = 32, transform: Callable | None = normalize, difficulty: str = "normal"):
        if split not in SPLITS:
            raise UserError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if difficulty not in DIFFICULTIES:
            raise UserError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
        if spurious_corr is not None and not 0.0 <= spurious_corr <= 1.0:
            raise UserError(f"spurious_corr must be in [0, 1] or None, got {spurious_corr}")
        self.n, self.seed, self.split = int(n), int(seed), split
        self.spurious_corr, self.img_size = spurious_corr, int(img_size)
        self.transform, self.difficulty = transform, difficulty

    def __len__(self) -> int:
        return self.n

    def params(self) -> dict:
        """Generation parameters (json-serialisable)."""
        return {"seed": self.seed, "split": self.split, "spurious_corr": self.spurious_corr,
                "img_size": self.img_size, "difficulty": self.difficulty}

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLITS[self.split], int(index)])

    def _check(self, index: int) -> int:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for length {self.n}")
        return index % self.n

    def meta(self, index: int) -> tuple[int, int]:
        """``(label, background)`` of item ``index`` without rendering the image."""
        return sample_meta(self._rng(self._check(index)), self.spurious_corr)

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """Raw item: ``(image [H, W, 3], mask [H, W], colour [3], label, background)``."""
        rng = self._rng(self._check(index))
        label, background = sample_meta(rng, self.spurious_corr)
        img, mask, colour = render(rng, label, background, self.img_size, self.difficulty)
        return img, mask, colour, label, background

    def __getitem__(self, index: int) -> dict:
        index = self._check(int(index))
        img, mask, _, label, background = self.render(index)
        image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))  # [3, H, W]
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "label": label, "mask": torch.from_numpy(mask), "background": background,
                "group": label * 2 + background, "index": index}


def collate(batch: list[dict]) -> dict:
    """Stack items into ``{"image": [B, 3, H, W], "label": [B], "mask": [B, H, W], ...}`` (default collate)."""
    return default_collate(batch)


def materialize(ds: SyntheticShapes, start: int = 0, stop: int | None = None) -> dict[str, torch.Tensor]:
    """Render items ``start..stop`` into stacked tensors (images [N, 3, H, W] uint8, labels/backgrounds/groups [N])."""
    stop = len(ds) if stop is None else stop
    imgs = np.empty((stop - start, 3, ds.img_size, ds.img_size), dtype=np.uint8)
    labels, bgs = np.empty(stop - start, np.int64), np.empty(stop - start, np.int64)
    for k, i in enumerate(range(start, stop)):
        img, _, _, labels[k], bgs[k] = ds.render(i)
        imgs[k] = np.round(img.transpose(2, 0, 1) * 255.0)
    labels_t, bgs_t = torch.from_numpy(labels), torch.from_numpy(bgs)
    return {"images": torch.from_numpy(imgs), "labels": labels_t, "backgrounds": bgs_t, "groups": labels_t * 2 + bgs_t}
