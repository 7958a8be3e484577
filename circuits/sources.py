"""Resolving command-line model and data specs into a HookedViT and a dataset.

Models:
  embedded | embedded:default | embedded:spurious   the project's own trained small ViTs
  <timm name>                                       timm's pretrained weights (needs them cached)
  <file.safetensors|.pth> with --arch <timm name>[:key=value,...]
                                                    a local checkpoint of that architecture
                                                    (timm constructor overrides after the colon)
Add random_weights=True for the same architecture with freshly initialised weights.

Data:
  synthetic[:split[:n]]            the embedded synthetic dataset (default split test, n 512)
  <dir with LOC_synset_mapping.txt> ImageNet-S layout
  <dir>                             an ImageFolder-style tree
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from hooked_vit import HookedViT


def load_model(spec: str, arch: Optional[str] = None, device: str = "cpu", random_weights: bool = False,
               seed: int = 0) -> HookedViT:
    """A HookedViT from a model spec (see the module docstring)."""
    timm_model = _timm_model(spec, arch)
    if random_weights:
        torch.manual_seed(seed)
        timm_model.init_weights()
        # timm's init leaves norms at 1 and biases at 0, as a freshly initialised network has.
    model = HookedViT.from_timm(timm_model, device=device)
    model.cfg.model_name = f"{spec}{' (random weights)' if random_weights else ''}"
    return model


def _timm_model(spec: str, arch: Optional[str]) -> torch.nn.Module:
    import timm

    from hooked_vit.loading import load_checkpoint, load_timm_weights

    if spec == "embedded" or spec.startswith("embedded:"):
        from circuits.embedded import load_embedded_timm

        return load_embedded_timm(spec.partition(":")[2] or "default")
    path = Path(spec)
    if path.suffix in (".safetensors", ".pth", ".pt", ".bin"):
        if arch is None:
            raise ValueError(f"{spec} is a checkpoint file: name its architecture with --arch <timm model name>")
        state = load_checkpoint(path)
        name, kwargs = parse_arch(arch)
        n_classes = _head_classes(state)
        if n_classes and "num_classes" not in kwargs:
            kwargs["num_classes"] = n_classes
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_timm_weights(model, state, source=str(path))
        return model.eval()
    try:
        return timm.create_model(spec, pretrained=True).eval()
    except Exception as err:
        raise ValueError(
            f"could not load timm model {spec!r} with pretrained weights ({err}). Without network access, "
            "pass a local checkpoint file with --arch, or use 'embedded'"
        ) from err


def parse_arch(arch: str) -> tuple[str, dict]:
    """"vit_tiny_patch16_224:depth=2,img_size=32" -> ("vit_tiny_patch16_224", {"depth": 2, "img_size": 32})."""
    name, _, rest = arch.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--arch options are key=value pairs, got {item!r} in {arch!r}")
        kwargs[key.strip()] = _literal(value.strip())
    return name, kwargs


def _literal(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def _head_classes(state: dict) -> Optional[int]:
    head = state.get("head.weight")
    return int(head.shape[0]) if head is not None else None


def load_dataset(spec: str, model: HookedViT) -> Dataset:
    """A dataset of sample dicts preprocessed for `model` (see the module docstring)."""
    if spec == "synthetic" or spec.startswith("synthetic:"):
        return _synthetic(spec, model)
    root = Path(spec)
    if not root.exists():
        raise FileNotFoundError(f"data path {root} does not exist (use 'synthetic' for the embedded dataset)")
    from circuits.data import ImageFolderDataset, ImageNetS, transform_for

    transform = transform_for(model)  # timm's eval preprocessing, at the model's input size
    if (root / "LOC_synset_mapping.txt").exists():
        return ImageNetS(root, transform)
    return ImageFolderDataset(root, transform)


def _synthetic(spec: str, model: HookedViT) -> Dataset:
    from circuits.embedded import SyntheticShapes, normalize

    parts = spec.split(":")
    split = parts[1] if len(parts) > 1 and parts[1] else "test"
    n = int(parts[2]) if len(parts) > 2 else 512
    if model.cfg.img_size != (32, 32) and not model.cfg.dynamic_img_size:
        raise ValueError(f"the synthetic dataset has 32x32 images; {model.cfg.model_name} expects {model.cfg.img_size}")
    return SyntheticShapes(n, seed=0, split=split, transform=normalize, difficulty=_embedded_difficulty(model))


def _embedded_difficulty(model: HookedViT) -> str:
    """The synthetic difficulty an embedded model was trained on ("normal" for other models)."""
    name = model.cfg.model_name
    if not name.startswith("embedded"):
        return "normal"
    from circuits.embedded import embedded_info

    which = name.split(" ")[0].partition(":")[2] or "default"
    return embedded_info(which).get("test_dataset", {}).get("difficulty", "normal")
