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


def load_model(spec: Union[str, ModelSpec], arch: Optional[str] = None, device: str = "cpu",
               random_weights: bool = False, seed: int = 0, dtype: Optional[torch.dtype] = None) -> HookedViT:
    """A HookedViT from a model spec (see `circuits.runs.specs`); dtype: weights and
    activations (runs move images to it; see `circuits.runs.precision`)."""
    init_distributed()  # under torchrun, "cuda" is then this rank's LOCAL_RANK GPU
    if isinstance(spec, str):
        spec = parse_model_spec(spec, arch, random_weights)
    timm_model = _timm_model(spec)
    if spec.random_weights:
        torch.manual_seed(seed)
        timm_model.init_weights()
        # timm's init leaves norms at 1 and biases at 0, as a freshly initialised network has.
    model = HookedViT.from_timm(timm_model, device=device, dtype=dtype)
    model.cfg.model_name = spec.label
    return model


def _timm_model(spec: ModelSpec) -> torch.nn.Module:
    import timm

    from hooked_vit.loading import load_checkpoint, load_timm_weights

    if spec.kind == "embedded":
        from circuits.embedded import load_embedded_timm

        return load_embedded_timm(spec.name)
    if spec.kind == "checkpoint":
        state = load_checkpoint(spec.path)
        kwargs = dict(spec.arch_kwargs)
        n_classes = _head_classes(state)
        if n_classes and "num_classes" not in kwargs:
            kwargs["num_classes"] = n_classes
        model = timm.create_model(spec.name, pretrained=False, **kwargs)
        load_timm_weights(model, state, source=str(spec.path))
        return model.eval()
    try:
        return timm.create_model(spec.name, pretrained=True).eval()
    except Exception as err:
        raise ValueError(
            f"could not load timm model {spec.name!r} with pretrained weights ({err}). Without network access, "
            "pass a local checkpoint file with --arch, or use 'embedded'"
        ) from err


def _head_classes(state: dict) -> Optional[int]:
    head = state.get("head.weight")
    return int(head.shape[0]) if head is not None else None


def load_dataset(spec: Union[str, DataSpec], model: HookedViT, source: Optional[ModelSpec] = None) -> Dataset:
    """A dataset of sample dicts preprocessed for `model`.

    source: the model's spec; synthetic data for an embedded model uses the difficulty that
    model was trained on (its weights' notes), "normal" for any other model.
    """
    if isinstance(spec, str):
        spec = parse_data_spec(spec)
    if spec.is_synthetic:
        if model.cfg.img_size != (32, 32) and not model.cfg.dynamic_img_size:
            raise ValueError(f"the synthetic dataset has 32x32 images; {model.cfg.model_name} expects "
                             f"{model.cfg.img_size}")
        return synthetic_for(source.name if source is not None and source.kind == "embedded" else None,
                             spec.split, spec.n)
    from circuits.data import ImageFolderDataset, ImageNetS, transform_for

    transform = transform_for(model)  # timm's eval preprocessing, at the model's input size
    if spec.kind == "imagenet_s":
        return ImageNetS(spec.root, transform)
    return ImageFolderDataset(spec.root, transform)


def synthetic_for(which: Optional[str], split: str = "test", n: int = 512) -> Dataset:
    """The synthetic split, normalised, as embedded model `which` is evaluated on it (its
    recorded seed and difficulty: "spurious" uses the "hard" variant); None: the plain one."""
    from circuits.embedded import SyntheticShapes, embedded_info, normalize

    params = embedded_info(which).get("test_dataset", {}) if which is not None else {}
    return SyntheticShapes(n, seed=params.get("seed", 0), split=split, spurious_corr=None,
                           difficulty=params.get("difficulty", "normal"), transform=normalize)
