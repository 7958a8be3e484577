"""Model and data specs, parsed once from their command-line strings into small objects.

Models:
  embedded | embedded:default | embedded:spurious   the project's own trained small ViTs
  <timm name> | timm:<timm name>                    timm's pretrained weights (needs them cached)
  hf:<hub id or local folder>                       a transformers ViT (`HookedViT.from_hf`)
  open_clip:<arch>[:<tag>]                          an open_clip image tower
  <file.safetensors|.pth|.pt|.bin> with arch <timm name>[:key=value,...]
                                                    a local checkpoint of that architecture
                                                    (timm constructor overrides after the colon)
Data:
  synthetic[:split[:n]]             the embedded synthetic dataset (default split test, n 512)
  <dir with LOC_synset_mapping.txt> ImageNet-S layout
  <dir>                             an ImageFolder-style tree
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from circuits.options import parse_named_options
from hooked_vit.pretrained import PREFIXES, TIMM_OWN_PREFIXES
from hooked_vit.errors import UserError

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclass(frozen=True)
class ModelSpec:
    """Which model to build. kind: embedded (name = which), timm (name = timm model), hf / open_clip
    (name = what follows the prefix, for `hooked_vit.pretrained.load_pretrained`), or checkpoint (path, with the timm architecture `arch` and its constructor overrides)."""

    kind: Literal["embedded", "timm", "hf", "open_clip", "checkpoint"]
    name: str
    text: str  # as given, for run settings and messages
    path: Optional[Path] = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    random_weights: bool = False

    @property
    def label(self) -> str:
        """The name runs record (`cfg.model_name`)."""
        return f"{self.text}{' (random weights)' if self.random_weights else ''}"


@dataclass(frozen=True)
class DataSpec:
    """Which dataset to read. kind: synthetic (split, n), imagenet_s or folder (root)."""

    kind: Literal["synthetic", "imagenet_s", "folder"]
    text: str
    split: str = "test"
    n: int = 512
    root: Optional[Path] = None

    @property
    def is_synthetic(self) -> bool:
        return self.kind == "synthetic"


def parse_model_spec(text: str, arch: Optional[str] = None, random_weights: bool = False) -> ModelSpec:
    """A ModelSpec from `--model` (and `--arch` for a checkpoint file); see the module doc."""
    if text == "embedded" or text.startswith("embedded:"):
        return ModelSpec("embedded", text.partition(":")[2] or "default", text, random_weights=random_weights)
    path = Path(text)
    if path.suffix in CHECKPOINT_SUFFIXES:
        if arch is None:
            raise UserError(f"{text} is a checkpoint file: name its architecture with --arch <timm model name>")
        name, kwargs = parse_named_options(arch, "--arch options")
        return ModelSpec("checkpoint", name, text, path=path, arch_kwargs=kwargs, random_weights=random_weights)
    source, sep, rest = text.partition(":")
    if sep and source in PREFIXES:
        if not rest:
            raise UserError(f"--model {text!r} names no model after {source + ':'!r}")
        if source != "timm" and random_weights:
            raise UserError(f"--random-weights applies to embedded, timm and checkpoint models, not {source}: "
                             "use the timm name of the architecture instead")
        return ModelSpec(source, rest, text, random_weights=random_weights)
    if sep and source not in TIMM_OWN_PREFIXES:  # timm's own name schemes pass through
        raise UserError(f"--model {text!r}: unknown source {source!r}; use embedded[:which], a timm name, "
                         "timm:NAME, hf:ID_OR_FOLDER, open_clip:ARCH[:TAG] or a checkpoint file with --arch")
    return ModelSpec("timm", text, text, random_weights=random_weights)


def parse_data_spec(text: str) -> DataSpec:
    """A DataSpec from `--data`; see the module doc. A directory must exist."""
    if text == "synthetic" or text.startswith("synthetic:"):
        parts = text.split(":")
        split = parts[1] if len(parts) > 1 and parts[1] else "test"
        try:
            n = int(parts[2]) if len(parts) > 2 else 512
        except ValueError:
            raise UserError(f"synthetic data is synthetic[:split[:n]] with an integer n, got {text!r}") from None
        return DataSpec("synthetic", text, split=split, n=n)
    root = Path(text)
    if not root.exists():
        raise FileNotFoundError(f"data path {root} does not exist (use 'synthetic' for the embedded dataset)")
    kind = "imagenet_s" if (root / "LOC_synset_mapping.txt").exists() else "folder"
    return DataSpec(kind, text, root=root)
