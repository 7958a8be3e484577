"""Loading timm ViTs into HookedViT: config extraction, weight mapping, safe checkpoints.

Weights come from timm's own loader (`pretrained=True`), from a local checkpoint file, or
from an instantiated timm model. Checkpoints never execute code: safetensors, or
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from hooked_vit.config import HookedViTConfig
from hooked_vit.errors import CheckpointError, UnsupportedModelError, UserError  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # hooked_vit.model imports this module, never the other way round
    from hooked_vit.model import HookedViT


# ------------------------------------------------------------------ config
def config_from_timm(model: nn.Module) -> HookedViTConfig:
    """Read a `HookedViTConfig` off a timm VisionTransformer or Eva, refusing what is
    unsupported (hooked_vit.timm_architectures reads the modules)."""
    from hooked_vit.timm_architectures import architecture_options
    from hooked_vit.timm_naflex import is_naflex, naflex_architecture_options

    options = naflex_architecture_options(model) if is_naflex(model) else architecture_options(model)
    return HookedViTConfig(
        **options,
        model_name=str(getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)),
        data_config=_data_config(model),
        **timm_class_metadata(model),
    )


def _final_norm_kind(model: nn.Module) -> Optional[str]:
    if not isinstance(model.norm, nn.Identity):
        return "token"
    if not isinstance(model.fc_norm, nn.Identity):
        return "pooled"
    return None


def _norm_eps(model: nn.Module) -> float:
    eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) > 1:
        raise UnsupportedModelError(f"unsupported feature: LayerNorms with different eps {sorted(eps)}")
    return eps.pop() if eps else 1e-6


def _act_name(act: nn.Module) -> str:
    kind = type(act).__name__
    approximate = getattr(act, "approximate", "none")
    names = {
        ("GELU", "none"): "gelu",
        ("GELU", "tanh"): "gelu_tanh",
        ("GELUTanh", "none"): "gelu_tanh",
        ("QuickGELU", "none"): "quick_gelu",
        ("ReLU", "none"): "relu",
        ("SiLU", "none"): "silu",
    }
    if (kind, approximate) not in names:
        raise UnsupportedModelError(f"unsupported feature: MLP activation {kind}")
    return names[(kind, approximate)]


def timm_class_metadata(model: nn.Module) -> dict[str, Optional[tuple[str, ...]]]:
    """``{"label_names", "class_names"}`` of a timm model: its ``pretrained_cfg`` keys
    ``label_names`` / ``label_descriptions`` if present (hub configs, the embedded models), else
    timm's offline ImageNet info when ``num_classes`` fits a known ImageNet label set (1k, 12k,
    21k/22k variants: ``timm.data.infer_imagenet_subset``), else None for both. A model without
    a linear head (num_classes=0) has neither."""
    pcfg = dict(getattr(model, "pretrained_cfg", None) or {})
    n = getattr(model, "num_classes", None) or pcfg.get("num_classes")
    if not isinstance(getattr(model, "head", None), nn.Linear):
        n = None
    names, descs = pcfg.get("label_names"), pcfg.get("label_descriptions")
    if names is not None and len(names) == n:
        descs = descs if descs is not None and len(descs) == n else None
        return {"label_names": tuple(names), "class_names": tuple(descs) if descs else None}
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset({"num_classes": n}) if n else None
    if subset is None:
        return {"label_names": None, "class_names": None}
    info = ImageNetInfo(subset)
    return {"label_names": tuple(info.label_names()), "class_names": tuple(info.label_descriptions())}


def _data_config(model: nn.Module) -> dict[str, Any]:
    try:
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        # The registered config names the pretrained size; a model built for another size
        # (img_size=...) must get images of its own size.
        in_chans = getattr(model.patch_embed, "in_chans", None) or model.patch_embed.proj.in_channels
        cfg["input_size"] = (in_chans, *model.patch_embed.img_size)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    except Exception:  # a bare model without pretrained_cfg: fall back to timm defaults
        return {}


# ------------------------------------------------------------------ weight names
# timm name -> HookedViT name (regexes applied in order).
_RENAMES = [
    (r"^patch_embed\.proj\.", "embed.proj."),
    (r"^patch_embed\.backbone\.", "embed.backbone."),
    (r"^(cls_token|reg_token|dist_token|pos_embed)$", r"embed.\1"),
    (r"^norm_pre\.", "ln_pre."),
    (r"^(norm|fc_norm)\.", "ln_final."),
    (r"^blocks\.(\d+)\.norm1\.", r"blocks.\1.ln1."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.ln2."),
    (r"^blocks\.(\d+)\.ls1\.gamma$", r"blocks.\1.attn.ls_gamma"),
    (r"^blocks\.(\d+)\.ls2\.gamma$", r"blocks.\1.mlp.ls_gamma"),
]


def timm_to_hooked_name(name: str, cfg: HookedViTConfig) -> str:
    if name.startswith(("norm.", "fc_norm.")):
        expected = "norm." if cfg.final_norm == "token" else "fc_norm."
        if not name.startswith(expected):
            return name  # an unexpected key; reported by the strict load
    for pattern, repl in _RENAMES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def convert_timm_state_dict(state_dict: dict[str, Tensor], cfg: HookedViTConfig) -> dict[str, Tensor]:
    return {timm_to_hooked_name(k, cfg): v for k, v in state_dict.items()}


def to_timm_state_dict(model: HookedViT, like: Optional[nn.Module] = None) -> dict[str, Tensor]:
    """Inverse of `convert_timm_state_dict` for an unprocessed model: the weights under timm's
    names. `like`: a timm model of the architecture (any weights) whose layout to write (EVA's
    q/k/v projections or q_bias / v_bias, SwiGLU halves, BEiT's gamma / relative-position
    names, its index buffers); needed for Eva / Beit models and gated MLPs, whose layout
    depends on timm's module options. Without it, VisionTransformer's layout."""
    from hooked_vit.timm_architectures import timm_layout, timm_norm_names

    if model.cfg.normalization_type != "LN":
        raise UserError("to_timm_state_dict needs unprocessed weights (fold_ln changes the parameterisation)")
    cfg = model.cfg
    if like is None and (cfg.rope_type is not None or cfg.rel_pos_bias or cfg.mlp_type != "mlp"):
        raise UserError(f"to_timm_state_dict of {cfg.model_name}: the timm layout of RoPE (Eva), relative-position "
                        "(Beit) and gated-MLP weights depends on timm's module options; pass like=<a timm model of "
                        "the architecture> (e.g. timm.create_model(name, pretrained=False))")
    final = "norm." if model.cfg.final_norm == "token" else "fc_norm."
    inverse = [
        (r"^embed\.proj\.", "patch_embed.proj."),
        (r"^embed\.backbone\.", "patch_embed.backbone."),
        (r"^embed\.(cls_token|reg_token|dist_token|pos_embed)$", r"\1"),
        (r"^ln_pre\.", "norm_pre."),
        (r"^ln_final\.", final),
        (r"^blocks\.(\d+)\.ln1\.", r"blocks.\1.norm1."),
        (r"^blocks\.(\d+)\.ln2\.", r"blocks.\1.norm2."),
        (r"^blocks\.(\d+)\.attn\.ls_gamma$", r"blocks.\1.ls1.gamma"),
        (r"^blocks\.(\d+)\.mlp\.ls_gamma$", r"blocks.\1.ls2.gamma"),
    ]
    out = {}
    for name, value in model.state_dict().items():
        for pattern, repl in inverse:
            name, n = re.subn(pattern, repl, name)
            if n:
                break
        out[name] = value
    if like is not None:
        return timm_layout(out, like)
    return timm_norm_names(out)


# ------------------------------------------------------------------ checkpoints
def load_checkpoint(path: Union[str, Path]) -> dict[str, Tensor]:
    """Read a state dict without executing code: safetensors or weights_only torch.load.

    Accepts a plain state dict or one wrapped under "state_dict", "model" or
    "state_dict_ema"; strips a leading "module." (DataParallel).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"refused to load {path}: it contains pickled objects other than tensors, which "
                "could execute code. Convert it to safetensors in a trusted environment. "
                f"(torch said: {str(err).splitlines()[0]})"
            ) from None
        except Exception as err:
            raise CheckpointError(f"could not read checkpoint {path}: {err}") from err
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_timm_weights(timm_model: nn.Module, state_dict: dict[str, Tensor], source: str = "checkpoint") -> None:
    """Strictly load timm-named weights, with an error that lists what does not fit."""
    own = timm_model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or bad_shape:
        lines = [f"{source} does not fit the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing[:20]}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}")
        for k in bad_shape[:20]:
            lines.append(f"  shape mismatch at {k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}")
        lines.append("Check that the model name matches the architecture the checkpoint was trained with.")
        raise CheckpointError("\n".join(lines))
    timm_model.load_state_dict(state_dict)


# ------------------------------------------------------------------ entry point
class Converted(NamedTuple):
    """A model in HookedViT's terms, not yet built: its config, its weights under timm's names
    (every loader renames to timm's first, so there is one mapping onto HookedViT), and the
    device / dtype the source lived on. `HookedViT.from_converted` builds it; the loaders
    never import the model class (hooked_vit.model imports them)."""

    cfg: HookedViTConfig
    timm_state: dict[str, Tensor]
    device: Optional[torch.device] = None
    dtype: Optional[torch.dtype] = None
    backbone: Optional[nn.Module] = None  # a hybrid stem's CNN (cfg.d_backbone), copied into the model


def timm_module(
    name_or_model: Union[str, nn.Module],
    pretrained: bool = False,
    checkpoint_path: Optional[Union[str, Path]] = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """The timm model `HookedViT.from_timm` converts: built from a name (`timm.create_model`,
    timm's pretrained weights when `pretrained`), or the given instance; then the weights of
    `checkpoint_path` (a local .safetensors / .pth / .bin file with timm names), if any."""
    import timm

    if isinstance(name_or_model, str):
        try:
            timm_model = timm.create_model(name_or_model, pretrained=pretrained and checkpoint_path is None, **timm_kwargs)
        except TypeError as err:
            if "unexpected keyword" in str(err):
                raise UserError(
                    f"timm's {name_or_model!r} does not accept {err.args[0].split('argument')[-1].strip()} "
                    f"(timm said: {err}); check the spelling against timm.create_model's arguments"
                ) from None
            if not timm_kwargs:
                raise
            raise UserError(_bad_options(name_or_model, timm_kwargs, err)) from None
        except (ValueError, AssertionError) as err:
            if not timm_kwargs or isinstance(err, UserError):
                raise
            raise UserError(_bad_options(name_or_model, timm_kwargs, err)) from None
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise UnsupportedModelError(f"timm does not know the model {name_or_model!r}") from err
            raise
        except Exception as err:
            if pretrained:
                raise CheckpointError(
                    f"timm could not fetch pretrained weights for {name_or_model!r} ({err}); without "
                    "network access pass checkpoint_path= a local weights file"
                ) from err
            raise
    elif isinstance(name_or_model, nn.Module):
        _refuse_build_options(name_or_model, pretrained, timm_kwargs)
        timm_model = name_or_model
    else:
        raise TypeError(f"expected a timm model name or module, got {type(name_or_model).__name__}")
    if checkpoint_path is not None:
        load_timm_weights(timm_model, load_checkpoint(checkpoint_path), source=str(checkpoint_path))
    return timm_model


def _bad_options(name: str, timm_kwargs: dict[str, Any], err: Exception) -> str:
    """A value timm cannot build with (a word where a number belongs, an impossible size)."""
    shown = ", ".join(f"{k}={v!r}" for k, v in timm_kwargs.items())
    return (f"timm cannot build {name!r} with {shown} ({type(err).__name__}: {err}); check that each value has "
            "the type and range timm's constructor expects (numbers as numbers, true / false for flags)")


def _refuse_build_options(timm_model: nn.Module, pretrained: bool, timm_kwargs: dict[str, Any]) -> None:
    """Building options cannot change a model that already exists: say so instead of ignoring them."""
    if timm_kwargs:
        raise TypeError(
            f"{sorted(timm_kwargs)} would be passed to timm.create_model, but a built "
            f"{type(timm_model).__name__} was given; build it with those options "
            "(timm.create_model(name, ...)) or pass the model name instead"
        )
    if pretrained:
        raise UserError(
            "pretrained=True loads timm's weights when building from a name; the given model keeps "
            "its own weights (pass checkpoint_path= to load a file into it)"
        )


def convert_timm(timm_model: nn.Module) -> Converted:
    """A timm model's config and weights (`config_from_timm`, refusing the unsupported;
    weights under VisionTransformer names, `timm_architectures.timm_state`)."""
    from hooked_vit.timm_architectures import timm_state
    from hooked_vit.timm_naflex import is_naflex, naflex_timm_state

    from hooked_vit.timm_architectures import hybrid_backbone

    first = next(timm_model.parameters())
    cfg = config_from_timm(timm_model)  # refuses the unsupported before any weight is read
    state = naflex_timm_state(timm_model) if is_naflex(timm_model) else timm_state(timm_model)
    return Converted(cfg, state, first.device, first.dtype, hybrid_backbone(timm_model))
