"""Loading Hugging Face `transformers` vision towers into HookedViT, exactly.

Supported: `ViTForImageClassification` / `ViTModel` (without the tanh pooler),
`DeiTForImageClassification` / `DeiTForImageClassificationWithTeacher`,
`Dinov2Model` / `Dinov2WithRegistersModel` and their `...ForImageClassification` heads
(on [class token, mean patch token]: `global_pool="token_avg"`), `CLIPVisionModel` /
`CLIPVisionModelWithProjection` (the projection is `image_proj`, at `hook_image_embed`),
`ViTMSNModel` / `ViTMSNForImageClassification` (a plain ViT), `IJepaModel` /
`IJepaForImageClassification` (no class token; the classifier reads the mean of the normed
patch tokens: `global_pool="avg"`, which is also the headless model's pooled vector).
Architectures are described in the transformers docs
(https://huggingface.co/docs/transformers/model_doc/vit, .../deit, .../dinov2,
.../dinov2_with_registers, .../clip, .../vit_msn, .../ijepa). Video models (VideoMAE, ViViT,
TimeSformer, V-JEPA 2) are read by `hooked_vit.loading_video`. Anything else is refused naming the feature.

The HF weights are rewritten to timm's layout (fused qkv, `norm1`/`norm2`, ...) and loaded
through `hooked_vit.loading`'s timm-name mapping, so there is one definition of the
HookedViT parameter names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from hooked_vit.config import HookedViTConfig
from hooked_vit.loading import Converted, UnsupportedModelError
from hooked_vit.hf_layers import _ACTS, _layer_weights
from hooked_vit.loading_hf_families import FAMILY_CLASSES, family_config_and_state, is_family_class
from hooked_vit.loading_hf_siglip import (FULL_MODELS, SIGLIP_CLASSES, check_siglip_class, is_siglip, siglip_config,
                                          siglip_state, siglip_vision_tower)
from hooked_vit.loading_video import is_video_class, video_config_and_state



# ------------------------------------------------------------------ entry point
def convert_hf(model_or_path: Union[str, os.PathLike, nn.Module], **hf_kwargs: Any) -> Converted:
    """Config and weights of a transformers vision model, a `save_pretrained` folder or a hub id
    already in the local cache (set `HF_HUB_OFFLINE=1` where there is no network, so that
    transformers does not wait on it). `hf_kwargs` go to the model class's `from_pretrained`
    (e.g. cache_dir, revision, torch_dtype); `HookedViT.from_hf` builds."""
    hf_model, source = _resolve(model_or_path, **hf_kwargs)
    vlm_options = {}
    source = source or _local_origin(hf_model)  # before a VLM is replaced by its tower
    if type(hf_model).__name__ in LLAVA_CLASSES:  # its vision tower, and how LLaVA reads it (hooked_vit.vlm)
        hf_model, vlm_options = llava_vision_tower(hf_model)
    if type(hf_model).__name__ == "CLIPModel":
        hf_model = clip_vision_with_projection(hf_model)
    if type(hf_model).__name__ in FULL_MODELS:  # SiglipModel / Siglip2Model: the image tower
        hf_model = siglip_vision_tower(hf_model)
    if is_video_class(type(hf_model).__name__):
        cfg, timm_state = video_config_and_state(hf_model)
    elif is_family_class(type(hf_model).__name__):  # BEiT, Data2Vec-vision, DINOv3, AIMv2
        cfg, timm_state = family_config_and_state(hf_model, hf_class_metadata)
    elif is_siglip(type(hf_model).__name__):  # SigLIP / SigLIP 2: hooked_vit.loading_hf_siglip
        cfg = siglip_config(hf_model)
        cfg = dataclasses.replace(cfg, **hf_class_metadata(hf_model.config, cfg.n_classes))
        timm_state = siglip_state(hf_model, cfg)
    else:
        cfg = config_from_hf(hf_model)
        timm_state = hf_to_timm_state_dict(hf_model, cfg)
    for key, value in vlm_options.items():
        setattr(cfg, key, value)
    # An instance loaded from a folder remembers it: its image processor config is there.
    source = source or _local_origin(hf_model)
    if source is not None:
        cfg.data_config = data_config_from_processor(source, cfg, hf_kwargs.get("cache_dir"), hf_kwargs.get("revision"))
    first = next(hf_model.parameters())
    return Converted(cfg, timm_state, first.device, first.dtype)


def _local_origin(hf_model: nn.Module) -> Optional[str]:
    origin = getattr(hf_model.config, "_name_or_path", "")
    return origin if origin and Path(origin).is_dir() else None


def _resolve(model_or_path: Any, **hf_kwargs: Any) -> tuple[nn.Module, Optional[str]]:
    """An instance is used as is; a folder or hub id is loaded with its own model class."""
    if isinstance(model_or_path, nn.Module):
        return model_or_path, None
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise TypeError(f"expected a transformers model, a folder or a hub id, got {type(model_or_path).__name__}")
    import transformers

    source = str(model_or_path)
    try:
        hub_kwargs = {k: v for k, v in hf_kwargs.items() if k in ("cache_dir", "revision", "local_files_only")}
        config = transformers.AutoConfig.from_pretrained(source, **hub_kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"could not find the Hugging Face model {source!r} locally ({str(err).splitlines()[0]}). "
            "Without network access pass a local folder written by save_pretrained (with "
            "config.json and the weights), e.g. HookedViT.from_hf('/path/to/folder')"
        ) from None
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise UnsupportedModelError(f"{source}: config.json names no known transformers architecture ({arch!r})")
    _check_class_name(arch)
    with _quiet_transformers():
        model, info = cls.from_pretrained(source, output_loading_info=True, **hf_kwargs)
    # What HookedViT does not load may be absent: a tanh pooler (then none was trained), V-JEPA 2's
    # predictor (not part of the encoder; its "pooler" is the classifier's attentive probe, loaded).
    vjepa2 = arch.startswith("VJEPA2")
    unused = r"(^|\.)predictor\." if vjepa2 else r"(^|\.)pooler\."
    missing = [k for k in info["missing_keys"] if not re.search(unused, k)]
    if missing:
        raise UnsupportedModelError(f"{source}: the checkpoint lacks weights {sorted(missing)[:10]} (they would be random)")
    if not vjepa2 and len(missing) < len(info["missing_keys"]):  # saved without a pooler: none was trained
        _backbone(model).pooler = None
    return model.eval(), source


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' per-load progress bars off (a small local folder loads in a blink; the
    bars would bury the one line a refusal prints), restored afterwards."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------ config
_SUPPORTED = {
    "ViTForImageClassification", "ViTModel", "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher", "DeiTModel", "Dinov2Model", "Dinov2ForImageClassification",
    "Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification", "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "ViTMSNModel", "ViTMSNForImageClassification", "IJepaModel", "IJepaForImageClassification",
    *FAMILY_CLASSES,
    *SIGLIP_CLASSES,
}
_REFUSED = {
    "Beit": "BEiT's heads other than image classification (masked image modelling, segmentation, backbone)",
    "Data2VecVision": "Data2Vec-vision's heads other than image classification (segmentation)",
    "Swin": "Swin's shifted-window attention",
}


def _check_class_name(name: str) -> None:
    # CLIPModel: its image tower is loaded; a LLaVA model: its vision tower
    if name in _SUPPORTED or name == "CLIPModel" or name in LLAVA_CLASSES or is_video_class(name):
        return
    if is_siglip(name):
        check_siglip_class(name)
    for key, feature in _REFUSED.items():
        if name.startswith(key):
            raise UnsupportedModelError(f"unsupported feature in {name}: {feature}")
    if name.endswith("ForConditionalGeneration"):  # another VLM: its tower may still be readable
        raise UnsupportedModelError(
            f"{name}: of the vision-language models only LLaVA's (LlavaForConditionalGeneration) tower is read with "
            "its feature layer; pass the VLM's vision tower module instead (e.g. HookedViT.from_hf(vlm.model."
            "vision_tower)) and choose layer= / strategy= in model.vision_features")
    raise UnsupportedModelError(f"{name} is not a supported transformers vision model; supported: {sorted(_SUPPORTED)}")


def config_from_hf(hf_model: nn.Module) -> HookedViTConfig:
    """Read a `HookedViTConfig` off a transformers vision model, refusing the unsupported."""
    kind = type(hf_model).__name__
    _check_class_name(kind)
    c = hf_model.config
    if getattr(c, "use_swiglu_ffn", False):
        raise UnsupportedModelError("unsupported feature: DINOv2's SwiGLU MLP (use_swiglu_ffn=True)")
    if getattr(_backbone(hf_model), "pooler", None) is not None:
        raise UnsupportedModelError(
            f"unsupported feature: {kind}'s tanh pooler; load it with add_pooling_layer=False "
            "(the class token after the final norm is the pooled representation)"
        )
    if c.hidden_act not in _ACTS:
        raise UnsupportedModelError(f"unsupported feature: activation {c.hidden_act!r}")
    family = kind[:4]
    dinov2, clip = family == "Dino", family == "CLIP"
    ijepa = kind.startswith("IJepa")  # no class token; the head reads the mean of all tokens
    n_classes, head_bias = _head_shape(hf_model)
    d_image_embed = c.projection_dim if kind == "CLIPVisionModelWithProjection" else None
    d_mlp = int(c.hidden_size * c.mlp_ratio) if dinov2 else c.intermediate_size
    return HookedViTConfig(
        d_model=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        d_mlp=d_mlp,
        n_classes=d_image_embed or n_classes,  # CLIP: the logits are the image embedding
        img_size=c.image_size,
        patch_size=c.patch_size,
        in_chans=c.num_channels,
        class_token=not ijepa,
        # HF DeiT always has a distillation token; the single-head classifier reads only
        # the class token, so the token is carried as a register (same position: 1).
        n_reg_tokens=getattr(c, "num_register_tokens", 0) + int(kind in ("DeiTForImageClassification", "DeiTModel")),
        distilled=kind == "DeiTForImageClassificationWithTeacher",
        # Registers carry no position embedding; the class token's is folded into it.
        no_embed_class=kind.startswith("Dinov2WithRegisters"),
        patch_embed_bias=not clip,
        ln_pre=clip,
        qkv_bias=getattr(c, "qkv_bias", True),
        layer_scale=dinov2,
        act_fn=_ACTS[c.hidden_act],
        eps=c.layer_norm_eps,
        final_norm="pooled" if clip else "token",  # CLIP's post_layernorm acts on the pooled token
        # Dinov2...ForImageClassification: classifier on [class token, mean patch token].
        global_pool="token_avg" if dinov2 and kind.endswith("ForImageClassification") else "avg" if ijepa else "token",
        head_bias=head_bias,
        d_image_embed=d_image_embed,
        model_name=getattr(c, "_name_or_path", "") or kind,
        **hf_class_metadata(c, 0 if d_image_embed else n_classes),
    )


def hf_class_metadata(config: Any, n_classes: int) -> dict[str, Optional[tuple[str, ...]]]:
    """``{"label_names", "class_names"}`` from a transformers config's ``id2label``
    (https://huggingface.co/docs/transformers/main_classes/configuration): the labels become
    ``class_names``; transformers' placeholders ("LABEL_0", ...) mean no names. When they are
    timm's ImageNet descriptions in timm's order (as the ImageNet checkpoints on the hub
    carry), ``label_names`` are the WordNet ids of that label set, so wnid folders map too."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    if not n_classes or sorted(id2label) != list(range(n_classes)):
        return {"label_names": None, "class_names": None}
    names = tuple(id2label[i] for i in range(n_classes))
    if all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return {"label_names": None, "class_names": None}
    return {"label_names": _imagenet_wnids(names), "class_names": names}


def _imagenet_wnids(names: tuple[str, ...]) -> Optional[tuple[str, ...]]:
    """The WordNet ids of timm's ImageNet label set whose descriptions are `names` (index by
    index, at least 95 % equal after lower-casing: hub tables differ in a few spellings), else None."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset({"num_classes": len(names)})
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    same = sum(a.strip().lower() == b.strip().lower() for a, b in zip(names, info.label_descriptions()))
    return tuple(info.label_names()) if same >= 0.95 * len(names) else None


LLAVA_CLASSES = ("LlavaForConditionalGeneration", "LlavaModel")


def llava_vision_tower(llava: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """The vision tower of a transformers LLaVA model and its read-out
    (`cfg.vision_feature_layer` / `vision_feature_select_strategy`, used by
    `HookedViT.vision_features`) with the LLaVA model's name as `cfg.model_name`; the
    projector and language model are not loaded."""
    from hooked_vit.vlm import llava_feature_options

    tower = getattr(getattr(llava, "model", llava), "vision_tower", None)
    if tower is None:
        raise UnsupportedModelError(f"{type(llava).__name__} has no vision_tower to load")
    options = llava_feature_options(llava.config)
    options["model_name"] = getattr(llava.config, "_name_or_path", "") or type(llava).__name__
    return tower, options


def clip_vision_with_projection(clip: nn.Module) -> nn.Module:
    """The image tower and projection of a full `CLIPModel`, as `CLIPVisionModelWithProjection`
    (same weights; the text tower is used by `hooked_vit.text_classes`)."""
    import copy

    import transformers

    vision_cfg = copy.deepcopy(clip.config.vision_config)
    vision_cfg.projection_dim = clip.config.projection_dim
    tower = transformers.CLIPVisionModelWithProjection(vision_cfg)
    tower.vision_model.load_state_dict(clip.vision_model.state_dict())
    tower.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    first = next(clip.parameters())
    return tower.to(device=first.device, dtype=first.dtype).eval()


def _backbone(hf_model: nn.Module) -> nn.Module:
    for name in ("vit", "deit", "vision_model", "dinov2", "dinov2_with_registers", "ijepa"):
        if hasattr(hf_model, name):
            return getattr(hf_model, name)
    return hf_model


def _head_modules(hf_model: nn.Module) -> list[nn.Module]:
    kind = type(hf_model).__name__
    if kind == "DeiTForImageClassificationWithTeacher":
        return [hf_model.cls_classifier, hf_model.distillation_classifier]
    head = getattr(hf_model, "classifier", None)
    if head is None or isinstance(head, nn.Identity):
        return []
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(f"unsupported feature: classifier {type(head).__name__} (only a Linear)")
    return [head]


def _head_shape(hf_model: nn.Module) -> tuple[int, bool]:
    heads = _head_modules(hf_model)
    return (heads[0].out_features, heads[0].bias is not None) if heads else (0, True)


# ------------------------------------------------------------------ weights
def hf_to_timm_state_dict(hf_model: nn.Module, cfg: HookedViTConfig) -> dict[str, Tensor]:
    """The model's weights under timm VisionTransformer names; refuses any key left over."""
    backbone = _backbone(hf_model)
    state = {k: v.detach() for k, v in backbone.state_dict().items()}
    out = _embedding_weights(state, cfg)
    out.update(_layer_weights(state, cfg))
    for hf, timm in (("layernorm", "norm"), ("post_layernorm", "fc_norm"), ("pre_layrnorm", "norm_pre")):
        for p in ("weight", "bias"):
            if f"{hf}.{p}" in state:
                out[f"{timm}.{p}"] = state.pop(f"{hf}.{p}")
    if cfg.d_image_embed is not None:  # CLIPVisionModelWithProjection
        out["image_proj.weight"] = hf_model.visual_projection.weight.detach()
    for name, module in zip(("head", "head_dist"), _head_modules(hf_model)):
        out[f"{name}.weight"] = module.weight.detach()
        if module.bias is not None:
            out[f"{name}.bias"] = module.bias.detach()
    state.pop("embeddings.mask_token", None)  # used only for masked-image pre-training inputs
    if state:
        raise UnsupportedModelError(f"unsupported feature: weights HookedViT has no place for: {sorted(state)[:10]}")
    return out


def _embedding_weights(state: dict[str, Tensor], cfg: HookedViTConfig) -> dict[str, Tensor]:
    out = {}
    if "embeddings.class_embedding" in state:  # CLIP
        out["cls_token"] = state.pop("embeddings.class_embedding").view(1, 1, -1)
        out["patch_embed.proj.weight"] = state.pop("embeddings.patch_embedding.weight")
        out["pos_embed"] = state.pop("embeddings.position_embedding.weight")[None]
        state.pop("embeddings.position_ids", None)
        return out
    out["patch_embed.proj.weight"] = state.pop("embeddings.patch_embeddings.projection.weight")
    out["patch_embed.proj.bias"] = state.pop("embeddings.patch_embeddings.projection.bias")
    cls, pos = state.pop("embeddings.cls_token", None), state.pop("embeddings.position_embeddings")  # I-JEPA: no cls
    if "embeddings.register_tokens" in state:  # DINOv2 with registers: see config_from_hf
        out["reg_token"] = state.pop("embeddings.register_tokens")
        cls, pos = cls + pos[:, :1], pos[:, 1:]
    if "embeddings.distillation_token" in state:
        key = "dist_token" if cfg.distilled else "reg_token"
        out[key] = state.pop("embeddings.distillation_token")
    out["pos_embed"] = pos
    if cls is not None:
        out["cls_token"] = cls
    return out


# ------------------------------------------------------------------ preprocessing
# PIL resample ids (the HF processors' `resample`) -> torchvision / timm interpolation names
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_SIZE_KEYS = ({"height", "width"}, {"shortest_edge"})
_said_default: set[str] = set()
logger = logging.getLogger("hooked_vit")


def data_config_from_processor(source: str, cfg: HookedViTConfig, cache_dir: Optional[str] = None,
                               revision: Optional[str] = None) -> dict[str, Any]:
    """The preprocessing of the model's own `preprocessor_config.json`
    (https://huggingface.co/docs/transformers/main_classes/image_processor), as a data config
    (`processor_data_config`); without one, the defaults of transformers' processor class for
    the model type at the model's input size, said once per model."""
    path = Path(source) / "preprocessor_config.json"
    if not path.is_file() and (Path(source) / "video_preprocessor_config.json").is_file():  # a video processor's (V-JEPA 2)
        path = Path(source) / "video_preprocessor_config.json"
    if not path.is_file() and not Path(source).is_dir():  # a hub id: only what is already cached, never a download
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "preprocessor_config.json", cache_dir=cache_dir, revision=revision)
        path = Path(cached) if isinstance(cached, str) else path
    if path.is_file():
        proc = json.loads(path.read_text())
        if cfg.naflex and "max_num_patches" in proc:  # SigLIP 2's NaFlex processor: see siglip2_data_config
            proc = siglip2_data_config(proc, cfg)
        return processor_data_config(proc, cfg, str(path))
    proc, name = _default_processor(cfg)
    config = processor_data_config(proc, cfg, name)
    if source not in _said_default:
        _said_default.add(source)
        logger.warning("%s has no preprocessor_config.json: using %s's defaults at the model's input size %s "
                       "(resize %s, %s, mean %s, std %s)", source, name, list(cfg.img_size), config["resize"],
                       config["interpolation"], config["mean"], config["std"])
    return config


def siglip2_data_config(proc: dict[str, Any], cfg: HookedViTConfig) -> dict[str, Any]:
    """SigLIP 2's processor resizes each image, keeping its aspect ratio, to at most
    `max_num_patches` patches (NaFlex inputs, which HookedViT takes as they are). The image
    pipelines of hooked-vit (circuits) give one size: the model's img_size (its position
    table's grid), with the processor's resampling, rescale and normalisation."""
    h, w = cfg.img_size
    return {**proc, "size": {"height": h, "width": w}, "do_center_crop": False, "max_num_patches": None}


def processor_data_config(proc: dict[str, Any], cfg: HookedViTConfig, where: str = "the processor") -> dict[str, Any]:
    """A transformers image-processor config as a data config `circuits.data.transform_for`
    follows step by step, as the processor does them: resize (`size`: height / width, or the
    shortest edge keeping the aspect ratio; `resample`), centre crop (`crop_size`, offsets
    rounded down as transformers' `center_crop`), rescale and normalise. The rescale factor is
    folded into mean / std (pixels in [0, 255]: ``(x * f - m) / s = (x / 255 - m / (255 f)) /
    (s / (255 f))``), so every pipeline ends in the usual to-tensor + normalise. Keys that would
    change the image in a way not followed here (padding, a longest edge, crop_pct) are refused."""
    if proc.get("do_pad"):
        raise UnsupportedModelError(f"{where}: do_pad=True (padding) is not followed by hooked-vit's preprocessing")
    if proc.get("crop_pct") is not None:
        raise UnsupportedModelError(f"{where}: crop_pct={proc['crop_pct']} is not followed by hooked-vit's preprocessing")
    resize = None
    if proc.get("do_resize", True):
        size = proc.get("size")
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if not isinstance(size, dict) or set(k for k, v in size.items() if v is not None) not in _SIZE_KEYS:
            raise UnsupportedModelError(f"{where}: size={size!r} is not followed (height and width, or shortest_edge)")
        resize = {k: int(v) for k, v in size.items() if v is not None}
    crop = None
    if proc.get("do_center_crop", False):
        crop_size = proc.get("crop_size")
        crop_size = {"height": crop_size, "width": crop_size} if isinstance(crop_size, int) else crop_size
        if not isinstance(crop_size, dict) or not {"height", "width"} <= set(crop_size):
            raise UnsupportedModelError(f"{where}: crop_size={crop_size!r} is not followed (height and width)")
        crop = [int(crop_size["height"]), int(crop_size["width"])]
    final = crop or ([resize["height"], resize["width"]] if resize and "height" in resize else list(cfg.img_size))
    factor = float(proc.get("rescale_factor", 1 / 255)) if proc.get("do_rescale", True) else 1.0
    mean, std = ((proc.get("image_mean") or (0.5,) * 3), (proc.get("image_std") or (0.5,) * 3)) \
        if proc.get("do_normalize", True) else ((0.0,) * 3, (1.0,) * 3)
    k = 255 * factor
    k = 1.0 if abs(k - 1) < 1e-9 else k  # the usual 1/255: mean / std as written
    resample = int(proc.get("resample", 2))
    if resample not in RESAMPLE:
        raise UnsupportedModelError(f"{where}: resample={resample} is not a PIL resampling filter")
    return {
        "input_size": [cfg.in_chans, *final],
        "mean": [float(m) / k for m in mean],
        "std": [float(v) / k for v in std],
        "interpolation": RESAMPLE[resample],
        "resize": resize,  # None: no resize
        "center_crop": crop is not None,  # offsets rounded down, as transformers' center_crop
    }


def _default_processor(cfg: HookedViTConfig) -> tuple[dict[str, Any], str]:
    """The default config of transformers' image processor for this kind of model, with its
    sizes scaled to the model's input size; ViTImageProcessor's when the kind is unknown."""
    import transformers

    name = {"CLIP": "CLIPImageProcessor", "Dino": "BitImageProcessor", "DeiT": "DeiTImageProcessor",
            "VJEPA2": "VJEPA2VideoProcessor", "Beit": "BeitImageProcessor", "DINOv3": "DINOv3ViTImageProcessor",
            "Aimv2": "CLIPImageProcessor"}.get(_family(cfg), "ViTImageProcessor")
    proc = dict(getattr(transformers, name)().to_dict())
    h, w = cfg.img_size
    crop = proc.get("crop_size") if proc.get("do_center_crop") else None
    ref = crop or proc["size"]
    ref_h = ref.get("height") or ref.get("shortest_edge")
    scale = h / ref_h
    proc["size"] = {k: round(v * scale) for k, v in proc["size"].items()}
    if crop:
        proc["crop_size"] = {"height": h, "width": w}
    elif "height" in proc["size"]:
        proc["size"] = {"height": h, "width": w}
    proc["resample"] = int(proc.get("resample", 2))
    return proc, name


def _family(cfg: HookedViTConfig) -> str:
    """CLIP / Dino / DeiT / ViT / VJEPA2 (and the loading_hf_families: Beit, DINOv3, Aimv2) from
    the config's shape (its class name is not kept)."""
    if cfg.rope_type == "3d":
        return "VJEPA2"
    if cfg.rope_type == "dinov3":
        return "DINOv3"
    if cfg.norm_type == "rmsnorm":
        return "Aimv2"
    if cfg.rel_pos_bias or (cfg.class_token and cfg.global_pool == "avg" and cfg.final_norm == "pooled"):
        return "Beit"  # BEiT and Data2Vec-vision (BeitImageProcessor)
    if cfg.ln_pre:
        return "CLIP"
    if cfg.layer_scale:
        return "Dino"
    return "DeiT" if cfg.n_reg_tokens or cfg.distilled else "ViT"
