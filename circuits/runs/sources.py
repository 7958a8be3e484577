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
    elif spec.kind == "embedded" and spec.name.startswith("video_"):
        model = _embedded_video(spec, seed).to(device=device, dtype=dtype)
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


def _embedded_video(spec: ModelSpec, seed: int) -> HookedViT:
    """embedded:video_motion / embedded:video_shape (`circuits.embedded.video_models`): the
    shipped weights, or with random weights the architecture freshly initialised (seeded)."""
    from circuits.embedded.video_models import VIDEO_NAMES, WEIGHTS_DIR, load_embedded_video, new_video_model

    if spec.name not in VIDEO_NAMES:
        raise UserError(f"unknown embedded video model {spec.text!r}; choose one of "
                         f"{', '.join('embedded:' + n for n in sorted(VIDEO_NAMES))}")
    if not spec.random_weights:
        if not (WEIGHTS_DIR / f"{spec.name}.safetensors").exists():
            raise UserError(f"{spec.text} has no trained weights in this installation (docs/video.md); add "
                             "--random-weights for the architecture with fresh weights")
        return load_embedded_video(spec.name)
    # the same random weights on every run (seeded), so resuming works; as training starts
    return new_video_model(VIDEO_NAMES[spec.name], seed).eval()


def load_dataset(spec: Union[str, DataSpec], model: HookedViT, source: Optional[ModelSpec] = None,
                 labels: Optional[str] = None, num_frames: Optional[int] = None) -> Dataset:
    """A dataset of sample dicts preprocessed for `model`, labels in the model's class ids
    (class folders mapped by `circuits.data.classes.map_class_folders`).

    labels: a JSON / CSV file mapping folder names to class ids (docs/using_your_own_data.md).

    source: the model's spec; synthetic data for an embedded model uses the difficulty that
    model was trained on (its weights' notes), "normal" for any other model.

    A video model (cfg.num_frames set) reads clips: `moving_shapes[_static]` or a video folder
    (`VideoFolderDataset`, `num_frames` per clip: the model's by default).
    """
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    if model.cfg.is_video or spec.is_video:
        return _video_dataset(spec, model, labels, num_frames)
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


def _video_dataset(spec: DataSpec, model: HookedViT, labels: Optional[str], num_frames: Optional[int]) -> Dataset:
    """Clips for a video model: the embedded moving shapes or a video folder; image data and
    image models refused."""
    cfg = model.cfg
    if not cfg.is_video:
        raise UserError(f"--data {spec.text} holds video clips and {cfg.model_name} is an image model; use a video "
                         "model (e.g. --model embedded:video_motion) or image data")
    if num_frames is not None and num_frames != cfg.num_frames:
        raise UserError(f"--num-frames {num_frames}: {cfg.model_name} reads exactly {cfg.num_frames} frames per clip "
                         "(its position table); leave --num-frames out or give that number")
    if spec.kind in ("synthetic", "imagenet_s"):
        raise UserError(f"--data {spec.text} holds images and {cfg.model_name} is a video model; use moving_shapes, "
                         "moving_shapes_static or a folder of video clips")
    if spec.is_video:
        from circuits.embedded.synthetic_video import MovingShapes

        if labels is not None:
            raise UserError("--labels maps clip folders to classes; moving_shapes has its own labels")
        size = tuple(cfg.img_size)
        if size[0] != size[1]:
            raise UserError(f"moving_shapes renders square frames; {cfg.model_name} expects {size}")
        from circuits.data.transforms import normalizer_for

        # the model's own normalisation (the embedded video models': the embedded one)
        return MovingShapes(spec.n, split=spec.split, task=spec.task, num_frames=cfg.num_frames, img_size=size[0],
                            transform=normalizer_for(model))
    from circuits.data import transform_for
    from circuits.data.video import VideoFolderDataset

    return VideoFolderDataset(spec.root, cfg.num_frames, transform_for(model), labels=labels, classes=model)


def synthetic_for(which: Optional[str], split: str = "test", n: int = 512, img_size: int = 32) -> Dataset:
    """The synthetic split, normalised, as embedded model `which` is evaluated on it (its
    recorded seed and difficulty: "spurious" uses the "hard" variant); None: the plain one,
    rendered at img_size pixels."""
    from circuits.embedded import SyntheticShapes, embedded_info, normalize

    params = embedded_info(which).get("test_dataset", {}) if which is not None else {}
    return SyntheticShapes(n, seed=params.get("seed", 0), split=split, spurious_corr=None,
                           difficulty=params.get("difficulty", "normal"), transform=normalize, img_size=img_size)
