"""Models and datasets built from their specs (`circuits.runs.specs`).

    model = load_model("embedded")                       # or a ModelSpec
    data = load_dataset("synthetic:test:256", model)     # or a DataSpec

Add random_weights=True for the same architecture with freshly initialised weights.
"""

from __future__ import annotations

from pathlib import Path
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
    """A HookedViT from a model spec (see `circuits.runs.specs`). Never touches the network:
    random weights build the architecture only, pretrained timm weights must be in the local cache.
    dtype: weights and activations (runs move images to it; see `circuits.runs.precision`).
    source: the hf / open_clip model the spec names, already loaded (e.g. for its text tower):
    the image tower is built from it instead of loading the weights again."""
    init_distributed()  # under torchrun, "cuda" is then this rank's LOCAL_RANK GPU
    if isinstance(spec, str):
        spec = parse_model_spec(spec, arch, random_weights)
    if source is not None:
        if spec.kind not in ("hf", "open_clip"):
            raise UserError(f"source= is the loaded hf / open_clip model of the spec, not of {spec.text}")
        build = HookedViT.from_hf if spec.kind == "hf" else HookedViT.from_open_clip
        model = build(source, device=device, dtype=dtype)
    elif spec.kind in ("hf", "open_clip"):
        from hooked_vit.pretrained import load_pretrained

        model = load_pretrained(spec.text, device=device, dtype=dtype)
    else:
        torch.manual_seed(seed)  # random weights are the same on every run, so resuming works
        model = HookedViT.from_timm(_timm_model(spec), device=device, dtype=dtype)
    model.cfg.model_name = spec.label
    return model


def _timm_model(spec: ModelSpec) -> torch.nn.Module:
    import timm

    from hooked_vit.loading import load_checkpoint, load_timm_weights

    if spec.kind == "embedded":
        from circuits.embedded import load_embedded_timm

        model = load_embedded_timm(spec.name)
        if spec.random_weights:
            model.init_weights()  # timm's init: norms at 1 and biases at 0, as a fresh network has
        return model
    _check_timm_name(spec.name)
    if spec.kind == "checkpoint":
        state = load_checkpoint(spec.path)
        kwargs = dict(spec.arch_kwargs)
        n_classes = _head_classes(state)
        if n_classes and "num_classes" not in kwargs:
            kwargs["num_classes"] = n_classes
        model = _create_with_overrides(spec, kwargs)
        if not spec.random_weights:
            load_timm_weights(model, state, source=str(spec.path))
        return model.eval()
    if spec.random_weights:
        return timm.create_model(spec.name, pretrained=False).eval()
    return timm.create_model(spec.name, pretrained=True, pretrained_cfg_overlay={"file": cached_timm_weights(spec.name)}).eval()


def _create_with_overrides(spec: ModelSpec, kwargs: dict):
    """timm's model of a checkpoint spec with its `--arch` overrides; an override timm cannot
    build with (a word where a number belongs, an unknown key) is refused naming `--arch`."""
    import timm

    try:
        return timm.create_model(spec.name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        if not spec.arch_kwargs or isinstance(err, UserError):
            raise
        raise UserError(f"--arch {spec.name}:{','.join(f'{k}={v}' for k, v in spec.arch_kwargs.items())}: timm "
                        f"cannot build {spec.name} with these overrides ({type(err).__name__}: {err}); check each "
                        "key is a constructor argument and each value a number or true/false where one belongs") from None


def _check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name.partition(".")[0]) and not timm.is_model(name):
        raise UserError(f"timm does not know the model {name!r} (see timm.list_models('vit_*'))")


def cached_timm_weights(name: str) -> str:
    """The local file of timm's pretrained weights for `name`, from the Hugging Face or torch hub
    cache; raises at once (no download attempt) when they are not there."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise UserError(f"timm has no pretrained weights registered for {name!r}")
    candidates = []
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo = cfg.hf_hub_id.split("@")[0]
        for filename in filter(None, (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin")):
            candidates.append(try_to_load_from_cache(repo, filename))
    if cfg.url:
        candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name)
    for found in candidates:
        if isinstance(found, (str, Path)) and Path(found).is_file():
            return str(found)
    raise UserError(
        f"pretrained weights of timm model {name!r} are not in the local cache (hooked-vit does not download); "
        f"pass a local checkpoint file as --model FILE --arch {name.partition('.')[0]}, use --random-weights, "
        "or use 'embedded'")


def _head_classes(state: dict) -> Optional[int]:
    head = state.get("head.weight")
    return int(head.shape[0]) if head is not None else None


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
        if model.cfg.img_size != (32, 32) and not model.cfg.dynamic_img_size:
            raise UserError(f"the synthetic dataset has 32x32 images; {model.cfg.model_name} expects "
                             f"{model.cfg.img_size}")
        return synthetic_for(source.name if source is not None and source.kind == "embedded" else None,
                             spec.split, spec.n)
    from circuits.data import ImageFolderDataset, ImageNetS, transform_for

    transform = transform_for(model)  # timm's eval preprocessing, at the model's input size
    if spec.kind == "imagenet_s":
        if labels is not None:
            raise UserError("--labels applies to image folders; ImageNet-S names its classes in LOC_synset_mapping.txt")
        return ImageNetS(spec.root, transform, classes=model)
    return ImageFolderDataset(spec.root, transform, labels=labels, classes=model)


def synthetic_for(which: Optional[str], split: str = "test", n: int = 512) -> Dataset:
    """The synthetic split, normalised, as embedded model `which` is evaluated on it (its
    recorded seed and difficulty: "spurious" uses the "hard" variant); None: the plain one."""
    from circuits.embedded import SyntheticShapes, embedded_info, normalize

    params = embedded_info(which).get("test_dataset", {}) if which is not None else {}
    return SyntheticShapes(n, seed=params.get("seed", 0), split=split, spurious_corr=None,
                           difficulty=params.get("difficulty", "normal"), transform=normalize)
