"""Procedural moving-shapes clips whose class is the direction of motion (docs/video.md).

Every clip is rendered on the fly with numpy from ``default_rng([seed, split_id, index])``
(the image dataset's convention, ``circuits.embedded.synthetic``), so any length works and a
clip is a pure function of ``(seed, split, index, task, num_frames, img_size)``.

Clip content: one shape of the image dataset's ten (``synthetic.CLASS_NAMES``) with random
size and colour on one of its two backgrounds (fixed over the clip), moving in a straight
line at a random speed; fresh pixel noise in every frame. The frame is a torus: a shape
leaving at one edge comes back at the opposite one, so the start is uniform over the frame
and the position in any one frame is uniform whatever the direction.

Tasks
-----
* ``task="motion"`` (default): the label is the direction of motion, one of
  ``MOTION_CLASSES = ("right", "left", "down", "up")``. The shape and its start position are
  drawn independently of the label and (on the torus) every frame's position is uniform,
  so no single frame tells the class: a model must compare frames.
* ``task="shape"``: the static control. The label is the shape, one of
  ``SHAPE_CLASSES = ("disc", "square", "triangle", "cross")``, the shape does not move, so
  every frame holds the whole answer.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .synthetic import CLASS_NAMES, DIFFICULTIES, SPLITS, _background, _object_colour, _shape_mask, normalize
from hooked_vit.errors import UserError

MOTION_CLASSES: tuple[str, ...] = ("right", "left", "down", "up")
SHAPE_CLASSES: tuple[str, ...] = ("disc", "square", "triangle", "cross")
TASKS: dict[str, tuple[str, ...]] = {"motion": MOTION_CLASSES, "shape": SHAPE_CLASSES}
# (dx, dy) per motion class, pixels per frame before the speed factor
_DIRECTIONS = {0: (1.0, 0.0), 1: (-1.0, 0.0), 2: (0.0, 1.0), 3: (0.0, -1.0)}
_HALF_SIZE = (4.0, 6.0)  # object half-size range at 32 px
# pixels per frame at 32 px: half to three quarters of the embedded video models' 8 px patch,
# so a step moves the shape's edges across patches; under half the 32 px torus, so a step is
# never read the other way round
_SPEED = (4.0, 6.0)


def render_clip(rng: np.random.Generator, task: str, num_frames: int = 8,
                img_size: int = 32) -> tuple[np.ndarray, np.ndarray, int, dict]:
    """One clip: ``(frames [T, H, W, 3] float32 in [0, 1], masks [T, H, W] bool, label, meta)``;
    ``meta`` holds the shape, direction, start and velocity."""
    n = len(TASKS[task])
    label = int(rng.integers(n))
    shape = CLASS_NAMES.index(SHAPE_CLASSES[label]) if task == "shape" else int(rng.integers(len(CLASS_NAMES)))
    background = int(rng.integers(2))
    scale = img_size / 32.0
    half = rng.uniform(*_HALF_SIZE) * scale
    if task == "motion":
        speed = rng.uniform(*_SPEED) * scale
        direction = np.array(_DIRECTIONS[label]) * speed
    else:
        direction = np.zeros(2)
    start = rng.uniform(0.0, img_size, size=2)
    base = _background(background, rng, img_size)  # [H, W, 3], fixed over the clip
    colour = _object_colour(rng, "normal")
    yy, xx = np.mgrid[0:img_size, 0:img_size].astype(np.float64)
    frames = np.empty((num_frames, img_size, img_size, 3), np.float32)
    masks = np.empty((num_frames, img_size, img_size), bool)
    for t in range(num_frames):
        cx, cy = start + direction * t
        dx, dy = (_wrap(xx - cx, img_size), _wrap(yy - cy, img_size))  # offsets on the torus
        mask = _shape_mask(shape, dx / half, dy / half)
        img = base.copy()
        img[mask] = colour
        img = img + rng.normal(0.0, DIFFICULTIES["normal"]["noise"], size=img.shape)
        frames[t], masks[t] = np.clip(img, 0.0, 1.0), mask
    meta = {"shape": CLASS_NAMES[shape], "background": background, "start": start.tolist(),
            "velocity": direction.tolist()}
    return frames, masks, label, meta


def _wrap(offset: np.ndarray, size: int) -> np.ndarray:
    """Offsets to the nearest copy on a torus of side ``size``: in [-size / 2, size / 2)."""
    return (offset + size / 2) % size - size / 2


class MovingShapes(Dataset):
    """Deterministic on-the-fly clips of one moving shape (see the module doc).

    Items are ``{"image": float32 [T, 3, H, W] (the clip; the key every run reads), "label":
    int, "mask": bool [T, H, W], "index": int, "path": ""}``. ``transform`` maps the raw clip
    (float [T, 3, H, W] in [0, 1]); the default ``normalize`` is the embedded models'
    preprocessing; ``None`` gives the raw clip.
    """

    def __init__(self, n: int, seed: int = 0, split: str = "train", task: str = "motion", num_frames: int = 8,
                 img_size: int = 32, transform: Callable | None = normalize):
        if split not in SPLITS:
            raise UserError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        if task not in TASKS:
            raise UserError(f"task must be one of {sorted(TASKS)}, got {task!r}")
        if num_frames < 2:
            raise UserError(f"num_frames must be at least 2 (motion needs two frames), got {num_frames}")
        self.n, self.seed, self.split, self.task = int(n), int(seed), split, task
        self.num_frames, self.img_size, self.transform = int(num_frames), int(img_size), transform
        self.class_names = TASKS[task]

    def __len__(self) -> int:
        return self.n

    def params(self) -> dict:
        """Generation parameters (json-serialisable)."""
        return {"seed": self.seed, "split": self.split, "task": self.task, "num_frames": self.num_frames,
                "img_size": self.img_size}

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray, int, dict]:
        """Raw clip ``(frames [T, H, W, 3], masks [T, H, W], label, meta)`` of item ``index``."""
        index = range(self.n)[index]
        rng = np.random.default_rng([self.seed, SPLITS[self.split], 100 + list(TASKS).index(self.task), index])
        return render_clip(rng, self.task, self.num_frames, self.img_size)

    def __getitem__(self, index: int) -> dict:
        index = range(self.n)[int(index)]
        frames, masks, label, _ = self.render(index)
        clip = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)))  # [T, 3, H, W]
        if self.transform is not None:
            clip = self.transform(clip)
        return {"image": clip, "label": label, "mask": torch.from_numpy(masks), "index": index, "path": ""}
