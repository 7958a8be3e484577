"""Models and datasets built from their specs (`circuits.runs.specs`).

    model = load_model("embedded")                       # or a ModelSpec
    data = load_dataset("synthetic:test:256", model)     # or a DataSpec

Add random_weights=True for the same architecture with freshly initialised weights.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch.utils.data import Dataset

from circuits.runs.distributed import init_distributed
from circuits.runs.specs import DataSpec, ModelSpec, parse_data_spec, parse_model_spec
from hooked_vit import HookedViT
from hooked_vit.errors import UserError


def load_model(spec: Union[str, ModelSpec], arch: Optional[str] = None, device: str = "cpu",
               random_weights: bool = False, seed: int = 0, dtype: Optional[torch.dtype] = None,
               source: Optional[torch.nn.Module] = None) -> HookedViT:
    """A HookedViT from a model spec (see `circuits.runs.specs`): the embedded models here,
    every other spec by `HookedViT.from_pretrained` (`hooked_vit.specs`), offline: random
    weights build the architecture only (seeded by `seed`, so resuming works), pretrained
    timm / hub weights must be in the local cache.
    dtype: weights and activations (runs move images to it; see `circuits.runs.precision`).
    source: the hf / open_clip model the spec names, already loaded (e.g. for its text tower):
    the image tower is built from it instead of loading the weights again."""
    init_distributed()  # under torchrun, "cuda" is then this rank's LOCAL_RANK GPU
    if isinstance(spec, str):
        spec = parse_model_spec(spec, arch, random_weights)
    torch.manual_seed(seed)  # a run starts from the same generator state every time, so resuming works
    if source is not None:
        if spec.kind not in ("hf", "open_clip"):
            raise UserError(f"source= is the loaded hf / open_clip model of the spec, not of {spec.text}")
        build = HookedViT.from_hf if spec.kind == "hf" else HookedViT.from_open_clip
        model = build(source, device=device, dtype=dtype)
    elif spec.kind == "embedded":
        model = HookedViT.from_timm(_embedded_timm(spec, seed), device=device, dtype=dtype)
    else:
        model = HookedViT.from_pretrained(spec, offline=True, seed=seed, device=device, dtype=dtype)
    model.cfg.model_name = spec.label
    return model


def _embedded_timm(spec: ModelSpec, seed: int) -> torch.nn.Module:
    from circuits.embedded import load_embedded_timm

    model = load_embedded_timm(spec.name)
    if spec.random_weights:
        torch.manual_seed(seed)  # the same random weights on every run, so resuming works
        model.init_weights()  # timm's init: norms at 1 and biases at 0, as a fresh network has
    return model


def load_dataset(spec: Union[str, DataSpec], model: HookedViT, source: Optional[ModelSpec] = None,
                 labels: Optional[str] = None) -> Dataset:
    """A dataset of sample dicts preprocessed for `model`, labels in the model's class ids
    (class folders mapped by `circuits.data.classes.map_class_folders`).

    labels: a JSON / CSV file mapping folder names to class ids (docs/using_your_own_data.md).

    source: the model's spec; synthetic data for an embedded model uses the difficulty that
    model was trained on (its weights' notes), "normal" for any other model.
    """
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    if spec.is_synthetic:
        if labels is not None:
            raise UserError("--labels maps image folders to classes; the synthetic dataset has its own labels")
        # Rendered at the model's own (square) input size: 32 px for the embedded models, 224 px
        # for a ViT-B/16 (the shapes scale with the image).
        height, width = model.cfg.img_size
        if height != width and not model.cfg.dynamic_img_size:
            raise UserError(f"the synthetic dataset has square images; {model.cfg.model_name} expects "
                             f"{height}x{width}: use an image folder")
        return synthetic_for(source.name if source is not None and source.kind == "embedded" else None,
                             spec.split, spec.n, img_size=max(height, width))
    from circuits.data import ImageFolderDataset, ImageNetS, transform_for

    transform = transform_for(model)  # timm's eval preprocessing, at the model's input size
    if spec.kind == "imagenet_s":
        if labels is not None:
            raise UserError("--labels applies to image folders; ImageNet-S names its classes in LOC_synset_mapping.txt")
        return ImageNetS(spec.root, transform, classes=model)
    return ImageFolderDataset(spec.root, transform, labels=labels, classes=model)


def synthetic_for(which: Optional[str], split: str = "test", n: int = 512, img_size: int = 32) -> Dataset:
    """The synthetic split, normalised, as embedded model `which` is evaluated on it (its
    recorded seed and difficulty: "spurious" uses the "hard" variant); None: the plain one,
    rendered at img_size pixels."""
    from circuits.embedded import SyntheticShapes, embedded_info, normalize

    params = embedded_info(which).get("test_dataset", {}) if which is not None else {}
    return SyntheticShapes(n, seed=params.get("seed", 0), split=split, spurious_corr=None,
                           difficulty=params.get("difficulty", "normal"), transform=normalize, img_size=img_size)
