"""What the report reads beside a run's tables: class and token names (labels.json, written at the
run's start) and thumbnails, with fallbacks for runs written before they existed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


from circuits.data.classes import ModelClasses
from circuits.plot import class_label
from hooked_vit.tokens import token_grid, token_labels
from circuits.runs.thumbnails import read_thumbnails

__all__ = ["RunLabels", "read_labels", "read_thumbnails"]


@dataclass(frozen=True)
class RunLabels:
    classes: ModelClasses
    tokens: Optional[list[str]] = None  # position names, cls first; None if unknown
    grid: Optional[tuple[int, int]] = None
    num_frames: Optional[int] = None  # a video model's frames per clip (None: an image model)
    n_time: Optional[int] = None  # its time positions (num_frames // tubelet_size)

    @property
    def is_video(self) -> bool:
        return self.n_time is not None and self.grid is not None

    def cls(self, class_id: int) -> str:
        return class_label(self.classes, int(class_id))

    def token_names(self, n_tokens: int, n_prefix: int) -> list[str]:
        if self.tokens is not None and len(self.tokens) == n_tokens:
            return list(self.tokens)
        try:
            grid = token_grid(n_tokens - n_prefix)
        except ValueError:  # not square and no labels.json naming it: positions by number
            return [f"token {i}" for i in range(n_tokens)]
        return token_labels(grid, n_prefix > 0, max(n_prefix - 1, 0))


def read_labels(run_dir: str | Path, n_classes: Optional[int] = None) -> RunLabels:
    path = Path(run_dir) / "labels.json"
    if not path.exists():
        return RunLabels(ModelClasses(n_classes))
    info = json.loads(path.read_text())
    names = {k: tuple(info[k]) if info.get(k) else None for k in ("label_names", "class_names")}
    return RunLabels(ModelClasses(info.get("n_classes", n_classes), **names), info.get("tokens"),
                     tuple(info["grid"]) if info.get("grid") else None, info.get("num_frames"), info.get("n_time"))
