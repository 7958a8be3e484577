"""Model specs: one grammar for `HookedViT.from_pretrained(spec)` and the command line's
`--model`, parsed and resolved here and nowhere else (docs/loading_and_text_classes.md).

    NAME | timm:NAME                  a timm model: its pretrained weights, or with
                                      random_weights=True the architecture freshly initialised
                                      (then arch="NAME:key=value,..." may override timm
                                      constructor options, e.g. num_classes=10 or depth=2)
    hf:ID_OR_FOLDER                   a transformers vision model (`HookedViT.from_hf`)
    open_clip:ARCH[:TAG_OR_FILE]      an open_clip image tower; TAG a weights tag or a local
                                      weights file (no TAG: open_clip's random init)
    FILE.safetensors|.pth|.pt|.bin    a local timm checkpoint; arch= names its timm
                                      architecture (arch_kwargs: constructor overrides)

timm's own name schemes (`hf-hub:...`, `local-dir:...`) pass through as timm names. A spec
naming a path that is not there is refused at once, before any library is imported or the
network is asked. `offline=True` (the command line) never downloads: timm and Hugging Face
weights must be in their local caches.

    spec = parse_model_spec("open_clip:ViT-S-32:models/x.pt")
    converted = convert(spec)                  # config + weights; HookedViT.from_converted builds
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from hooked_vit.errors import UserError
from hooked_vit.loading import Converted, convert_timm, load_checkpoint, load_timm_weights, timm_module

PREFIXES = ("timm", "hf", "open_clip")
TIMM_OWN_PREFIXES = ("hf-hub", "hf_hub", "local-dir")  # timm's own name schemes, passed through
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
GRAMMAR = ("a timm name (or timm:NAME), hf:ID_OR_FOLDER, open_clip:ARCH[:TAG_OR_FILE] "
           "or a checkpoint file with its architecture (--arch / arch=)")


@dataclass(frozen=True)
class ModelSpec:
    """Which model to build. kind: "timm" (name = timm model), "hf" / "open_clip" (name = what
    follows the prefix), "checkpoint" (path, with the timm architecture `name` and its
    constructor overrides `arch_kwargs`); `circuits` adds "embedded" for its own models."""

    kind: str
    name: str
    text: str  # as given, for run settings and messages
    path: Optional[Path] = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    random_weights: bool = False

    @property
    def label(self) -> str:
        """The name runs record (`cfg.model_name`)."""
        options = ",".join(f"{k}={v}" for k, v in self.arch_kwargs.items()) if self.kind == "timm" else ""
        return f"{self.text}{f' ({options})' if options else ''}{' (random weights)' if self.random_weights else ''}"


def parse_model_spec(text: str, arch: Optional[str] = None, arch_kwargs: Optional[dict[str, Any]] = None,
                     random_weights: bool = False) -> ModelSpec:
    """A ModelSpec from a model string (module doc); `arch` / `arch_kwargs` only for a checkpoint
    file. Raises `UserError` in one line for what the user can fix."""
    if not isinstance(text, str):
        raise TypeError(f"expected a model string such as 'timm:vit_base_patch16_224', got {text!r}")
    if not text.strip():
        raise UserError(f"expected a model string such as 'timm:vit_base_patch16_224', got {text!r}")
    source, sep, rest = text.partition(":")
    if sep and source in PREFIXES:
        if not rest:
            raise UserError(f"model {text!r} names no model after {source + ':'!r}")
        if source != "timm" and random_weights:
            raise UserError(f"random weights apply to timm names and checkpoint files, not {source}: models "
                            "(--random-weights); use the timm name of the architecture instead")
        spec = ModelSpec(source, rest, text, random_weights=random_weights)
    elif Path(text).suffix in CHECKPOINT_SUFFIXES:
        if not arch:
            raise UserError(f"{text} is a checkpoint file: name its architecture with --arch <timm model name> "
                            "(arch= in Python)")
        path = Path(text).expanduser()
        if not path.is_file():
            raise UserError(f"checkpoint file {text} does not exist")
        return ModelSpec("checkpoint", arch, text, path=path, arch_kwargs=dict(arch_kwargs or {}),
                         random_weights=random_weights)
    elif sep and source not in TIMM_OWN_PREFIXES:
        raise UserError(f"model {text!r}: unknown model source {source!r}; use {GRAMMAR}")
    else:
        spec = ModelSpec("timm", text, text, random_weights=random_weights)
    if (arch is not None or arch_kwargs) and spec.kind == "timm" and random_weights:
        # A random-weight timm architecture with constructor overrides (a head of N classes, a
        # smaller depth): the name must be the model's own.
        if arch is not None and arch != spec.name.partition(".")[0] and arch != spec.name:
            raise UserError(f"--arch {arch} with --random-weights overrides options of the model itself; name "
                            f"{spec.name.partition('.')[0]} (e.g. --arch {spec.name.partition('.')[0]}:num_classes=10)")
        spec = ModelSpec("timm", spec.name, text, arch_kwargs=dict(arch_kwargs or {}), random_weights=True)
    elif arch is not None or arch_kwargs:
        raise UserError(f"--arch / arch= names the architecture of a checkpoint file (or overrides options of a "
                        f"--random-weights timm model); {text!r} is neither (give timm constructor options to "
                        "from_pretrained as keywords)")
    _check_paths(spec)
    return spec


def looks_like_path(text: str) -> bool:
    """Whether a name is meant as a local path rather than a model / hub name: it starts with
    "/", ".", "~" or a backslash, has more than one "/", ends with "/", or its first part is a
    local directory ("models/x" beside a models/ folder)."""
    if text.startswith(("/", ".", "~", "\\")) or text.endswith("/") or text.count("/") > 1:
        return True
    head = text.split("/")[0]
    return "/" in text and Path(head).is_dir()


def _check_paths(spec: ModelSpec) -> None:
    """Refuse at once a spec whose local path is not there (no network wait, no import)."""
    if spec.kind == "hf" and looks_like_path(spec.name) and not Path(spec.name).expanduser().is_dir():
        raise UserError(f"hf:{spec.name}: no such folder; give a folder written by save_pretrained "
                        "(config.json and the weights) or a hub id owner/name")
    if spec.kind == "open_clip":
        tag = spec.name.partition(":")[2]
        if tag and (Path(tag).suffix in CHECKPOINT_SUFFIXES or "/" in tag or "\\" in tag) \
                and not Path(tag).expanduser().is_file():
            raise UserError(f"open_clip:{spec.name}: weights file {tag} does not exist")
    own_scheme, _, local = spec.name.partition(":")
    if spec.kind == "timm" and own_scheme == "local-dir" and not Path(local).expanduser().is_dir():
        raise UserError(f"model {spec.text!r}: no such folder {local}")
    if spec.kind == "timm" and own_scheme not in TIMM_OWN_PREFIXES and looks_like_path(spec.name):
        raise UserError(f"model {spec.text!r} looks like a path but is no checkpoint file here; give an existing "
                        f"{'/'.join(CHECKPOINT_SUFFIXES)} file with --arch, hf:FOLDER for a transformers folder, "
                        "or a timm model name")


def convert(spec: Union[str, ModelSpec], *, offline: bool = False, seed: Optional[int] = None,
            arch: Optional[str] = None, arch_kwargs: Optional[dict[str, Any]] = None,
            random_weights: bool = False, **loader_kwargs: Any) -> Converted:
    """The config and weights a spec names (`HookedViT.from_converted` builds them).

    offline: never download (timm's pretrained weights and hub ids from the local caches only,
    else refused at once). seed: the initialisation of random weights (forked: the global
    generator is untouched). loader_kwargs go to the source's loader: timm.create_model
    (also `pretrained`, `checkpoint_path`), transformers' from_pretrained, open_clip.create_model.
    """
    if not isinstance(spec, ModelSpec):
        spec = parse_model_spec(spec, arch, arch_kwargs, random_weights)
    elif arch is not None or arch_kwargs or random_weights:
        raise UserError(f"arch, arch_kwargs and random_weights belong to the spec ({spec.text}), already parsed")
    if spec.kind == "timm":
        return convert_timm(_timm(spec, offline, seed, loader_kwargs))
    if spec.kind == "checkpoint":
        return convert_timm(_checkpoint(spec, seed, loader_kwargs))
    if spec.kind == "hf":
        from hooked_vit.loading_hf import convert_hf

        if offline and not Path(spec.name).expanduser().is_dir():
            require_cached_hub_id(spec.name, loader_kwargs)
            loader_kwargs = {**loader_kwargs, "local_files_only": True}
        return convert_hf(str(Path(spec.name).expanduser()) if Path(spec.name).expanduser().is_dir() else spec.name,
                          **loader_kwargs)
    if spec.kind == "open_clip":
        from hooked_vit.loading_open_clip import convert_open_clip

        return convert_open_clip(spec.name, **loader_kwargs)
    raise UserError(f"model spec kind {spec.kind!r} ({spec.text}) is not one the model layer builds; use {GRAMMAR}")


@contextlib.contextmanager
def _seeded(seed: Optional[int]):
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _timm(spec: ModelSpec, offline: bool, seed: Optional[int], kwargs: dict[str, Any]) -> torch.nn.Module:
    if spec.random_weights:
        if kwargs.pop("pretrained", False) or kwargs.get("checkpoint_path"):
            raise UserError("random_weights=True builds fresh weights; it cannot also load pretrained or checkpoint weights")
        with _seeded(seed):
            return timm_module(spec.name, pretrained=False, **{**spec.arch_kwargs, **kwargs}).eval()
    pretrained = kwargs.pop("pretrained", True)
    if offline and pretrained and kwargs.get("checkpoint_path") is None:
        _check_timm_name(spec.name)
        kwargs.setdefault("pretrained_cfg_overlay", {"file": cached_timm_weights(spec.name)})
    return timm_module(spec.name, pretrained=pretrained, **kwargs).eval()


def _checkpoint(spec: ModelSpec, seed: Optional[int], kwargs: dict[str, Any]) -> torch.nn.Module:
    _check_timm_name(spec.name)
    state = load_checkpoint(spec.path)
    kwargs = {**spec.arch_kwargs, **kwargs}
    head = state.get("head.weight")
    if head is not None and "num_classes" not in kwargs:
        kwargs["num_classes"] = int(head.shape[0])
    with _seeded(seed):
        model = timm_module(spec.name, **kwargs)  # an override timm cannot build with: a UserError
    if not spec.random_weights:
        load_timm_weights(model, state, source=str(spec.path))
    return model.eval()


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


def require_cached_hub_id(repo: str, kwargs: Optional[dict[str, Any]] = None) -> None:
    """Refuse at once a hub id whose config is not in the local Hugging Face cache."""
    kwargs = kwargs or {}
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, "config.json", cache_dir=kwargs.get("cache_dir"),
                                       revision=kwargs.get("revision"))
    except ValueError:  # not a valid repo id either
        found = None
    if not isinstance(found, str):
        raise UserError(f"hf:{repo}: no such local folder, and no hub model {repo!r} in the local Hugging Face "
                        "cache (the command line does not download); give a folder written by save_pretrained, "
                        "or download it first (huggingface-cli download " + repo + ")")
