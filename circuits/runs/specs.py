"""Model and data specs, parsed once from their command-line strings into small objects.

Models: the grammar of `hooked_vit.specs` (one for `--model` and `HookedViT.from_pretrained`):
  <timm name> | timm:<timm name>                    timm's pretrained weights (needs them cached)
  hf:<hub id or local folder>                       a transformers ViT (`HookedViT.from_hf`)
  open_clip:<arch>[:<tag or weights file>]          an open_clip image tower
  <file.safetensors|.pth|.pt|.bin> with arch <timm name>[:key=value,...]
                                                    a local checkpoint of that architecture
                                                    (timm constructor overrides after the colon)
plus the project's own models, which only `circuits` knows:
  embedded | embedded:default | embedded:spurious   the project's own trained small ViTs
  embedded:video_motion | embedded:video_shape      the small video models (docs/video.md)
Data:
  synthetic[:split[:n]]             the embedded synthetic dataset (default split test, n 512)
  moving_shapes[:split[:n]]         the embedded video clips, class = direction of motion (video models)
  moving_shapes_static[:split[:n]]  the static control: class = shape, no motion (video models)
  <dir with LOC_synset_mapping.txt> ImageNet-S layout
  <dir>                             an ImageFolder-style tree (image models) or a video folder
                                    (video models: `circuits.data.video.VideoFolderDataset`)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from circuits.options import parse_named_options
from hooked_vit.specs import CHECKPOINT_SUFFIXES, ModelSpec  # noqa: F401  (re-exported)
from hooked_vit.specs import parse_model_spec as parse_library_spec
from hooked_vit.errors import UserError


@dataclass(frozen=True)
class DataSpec:
    """Which dataset to read. kind: synthetic or moving_shapes (split, n; task), imagenet_s or
    folder (root)."""

    kind: Literal["synthetic", "moving_shapes", "imagenet_s", "folder"]
    text: str
    split: str = "test"
    n: int = 512
    root: Optional[Path] = None
    task: str = "motion"  # moving_shapes: "motion" or the static control "shape"

    @property
    def is_synthetic(self) -> bool:
        return self.kind == "synthetic"

    @property
    def is_video(self) -> bool:
        """The embedded video clips (a folder is read as video when the model is a video model)."""
        return self.kind == "moving_shapes"


def parse_model_spec(text: str, arch: Optional[str] = None, random_weights: bool = False) -> ModelSpec:
    """A ModelSpec from `--model` (and `--arch NAME[:key=value,...]` for a checkpoint file):
    "embedded[:which]" here, everything else by `hooked_vit.specs.parse_model_spec`."""
    if text == "embedded" or text.startswith("embedded:"):
        if arch is not None:
            raise UserError("--arch names the architecture of a checkpoint file; the embedded models have their own")
        return ModelSpec("embedded", text.partition(":")[2] or "default", text, random_weights=random_weights)
    name, kwargs = parse_named_options(arch, "--arch options") if arch is not None else (None, {})
    return parse_library_spec(text, name, kwargs, random_weights)


def parse_data_spec(text: str) -> DataSpec:
    """A DataSpec from `--data`; see the module doc. A directory must exist."""
    for name, kind, task in (("synthetic", "synthetic", "motion"), ("moving_shapes", "moving_shapes", "motion"),
                             ("moving_shapes_static", "moving_shapes", "shape")):
        if text == name or text.startswith(f"{name}:"):
            parts = text.split(":")
            split = parts[1] if len(parts) > 1 and parts[1] else "test"
            try:
                n = int(parts[2]) if len(parts) > 2 else 512
            except ValueError:
                raise UserError(f"{name} data is {name}[:split[:n]] with an integer n, got {text!r}") from None
            return DataSpec(kind, text, split=split, n=n, task=task)
    root = Path(text)
    if not root.exists():
        raise FileNotFoundError(f"data path {root} does not exist (use 'synthetic' for the embedded dataset, "
                                "'moving_shapes' for the embedded video clips)")
    kind = "imagenet_s" if (root / "LOC_synset_mapping.txt").exists() else "folder"
    return DataSpec(kind, text, root=root)
