"""One interface to every explanation method: `explain(method, model, images, targets)`.

A method maps an `AttentionTrace` (one forward pass) to a relevance per image token
[b, n_patches] (prefix tokens dropped, row-major patch order as in the model). Several
methods share one forward pass with `explain_many`. `upsample` turns token maps into
pixel maps.

Video models (docs/video.md): the maps are space-time volumes [b, T, rows, cols] (T time
positions, `hooked_vit.tokens`), and `upsample(..., frames_per_time=tubelet_size)` turns
them into [b, frames, H, W]. Divided space-time attention is refused by `trace`: every
method reads the joint [b, h, p, p] pattern, which a divided model does not have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from circuits.explain import class_embedding as _ce
from circuits.explain import tokentm as _tokentm
from circuits.explain import transformer_attribution as _ta
from circuits.explain.attention import raw_attention, rollout
from circuits.explain.gradients import attention_gradcam, gae
from circuits.explain.trace import AttentionTrace, trace
from circuits.method_names import DEFAULT_METHODS, METHOD_NAMES
from circuits.options import parse_named_options
from hooked_vit import HookedViT, HookedViTConfig
from hooked_vit.tokens import token_grid
from hooked_vit.errors import UserError


def random_map(trace: AttentionTrace, *, seed: int = 0) -> Tensor:
    """Baseline: uniform random relevance (a random token order), seeded. [b, n_patches]"""
    b, n = trace.patterns[0].shape[0], trace.n_tokens - trace.n_prefix
    gen = torch.Generator().manual_seed(int(seed))
    return torch.rand(b, n, generator=gen).to(trace.logits.device)


@dataclass(frozen=True)
class Method:
    """A registered explanation method."""

    fn: Callable[..., Tensor]
    class_specific: bool
    description: str
    act_names: Callable[..., list[str]] = lambda cfg, **options: []
    supports: Callable[[HookedViTConfig], bool] = lambda cfg: True  # families it is defined for


METHODS: dict[str, Method] = {
    "attention": Method(raw_attention, False, "raw attention: the readout row of the last block, heads averaged"),
    "rollout": Method(rollout, False, "attention rollout (Abnar & Zuidema 2020)"),
    "gae": Method(gae, True, "generic attention explainability (Chefer et al. 2021b)"),
    "gradcam": Method(attention_gradcam, True, "Grad-CAM on the last block's attention"),
    "class_embedding": Method(_ce.class_embedding, True, "class-embedding importance (Vilas et al. 2023)",
                              lambda cfg, **options: _ce.attn_out_names(cfg.n_layers)),
    "tokentm": Method(_tokentm.tokentm, True, "TokenTM (Wu et al. 2024), reconstruction",
                      _tokentm.act_names),
    "transformer_attribution": Method(_ta.transformer_attribution, True,
                                      "transformer attribution: LRP x attention gradient (Chefer et al. 2021a)",
                                      _ta.act_names, _ta.supported),
    "random": Method(random_map, False, "random relevance (baseline)"),
}
GRADIENT_METHODS = ("gae", "gradcam", "class_embedding", "tokentm", "transformer_attribution")
assert tuple(METHODS) == METHOD_NAMES, "circuits.method_names must list the methods of METHODS, in order"

MethodSpec = Union[str, Sequence[str], Mapping[str, Mapping[str, Any]]]


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """"tokentm:necc=none,grad=none" -> ("tokentm", {"necc": "none", "grad": "none"})."""
    name, options = parse_named_options(spec, "method options")
    if name not in METHODS:
        raise UserError(f"unknown explanation method {name!r}; choose from {sorted(METHODS)}")
    return name, options


def _as_specs(methods: MethodSpec) -> dict[str, tuple[str, dict[str, Any]]]:
    """label -> (method name, options)."""
    if isinstance(methods, str):
        methods = [methods]
    if isinstance(methods, Mapping):
        return {label: (parse_method(label)[0], dict(opts)) for label, opts in methods.items()}
    return {spec: parse_method(spec) for spec in methods}


# Methods whose definition assumes softmax attention (rows of non-negative weights summing to one)
# or a value-to-output map W_V W_O: refused for differential attention (cfg.diff_attn), whose
# pattern map1 - lambda * map2 has negative weights and rows summing to 1 - lambda, and whose
# z passes a per-head RMS sub-norm before W_O. gae, gradcam and raw attention read the pattern
# that multiplies v (and its gradient), which is defined as it is.
DIFF_ATTN_REFUSALS = {
    "rollout": "attention rollout multiplies row-normalised patterns as distributions over tokens; a differential "
               "pattern (map1 - lambda * map2) has negative weights and rows summing to 1 - lambda",
    "tokentm": "TokenTM weighs each token by what it writes alone, v W_O + b_O; differential attention's per-head "
               "RMS sub-norm sits between the values and W_O, so that is not what a token writes",
    "transformer_attribution": "its relevance rules propagate through one softmax pattern and a linear value-to-"
                               "output map; differential attention has two softmax maps per head and a per-head "
                               "RMS sub-norm",
}


def _refuse_for_model(model: HookedViT, names: Sequence[str]) -> None:
    if not model.cfg.diff_attn:
        return
    for name in names:
        if name in DIFF_ATTN_REFUSALS:
            raise UserError(f"{name} is refused for differential attention (diff_attn): "
                             f"{DIFF_ATTN_REFUSALS[name]}; use gae, gradcam or attention")


def explain_many(
    model: HookedViT,
    images: Float[Tensor, "b c h w"],
    targets: Optional[Tensor] = None,
    methods: MethodSpec = DEFAULT_METHODS,
    *,
    fwd_hooks: Sequence = (),
) -> dict[str, Float[Tensor, "b n_patches"]]:
    """Several methods from one forward pass. `methods`: names, "name:key=value" specs,
    or {label: options} with a method name (or spec) as label. targets None = predicted."""
    specs = _as_specs(methods)
    _refuse_for_model(model, [name for name, _ in specs.values()])
    names = sorted({n for name, opts in specs.values() for n in METHODS[name].act_names(model.cfg, **opts)})
    tr = trace(model, images, targets, act_names=names, fwd_hooks=fwd_hooks)
    # Gradient methods differentiate the traced logits: that must work under a caller's
    # torch.set_grad_enabled(False) / no_grad (as in notebooks/00_hooks_tour).
    with torch.enable_grad():
        maps = {label: METHODS[name].fn(tr, **opts) for label, (name, opts) in specs.items()}
    return {label: as_volume(m, model) for label, m in maps.items()} if model.cfg.is_video else maps


def as_volume(relevance: Float[Tensor, "b n_patches"], model: HookedViT) -> Float[Tensor, "b t rows cols"]:
    """A video model's per-token map [b, n_patches] (time, row, col order) as [b, T, rows, cols]."""
    cfg = model.cfg
    rows, cols = cfg.grid_size
    if relevance.shape[-1] != cfg.n_time * rows * cols:
        raise UserError(f"the map has {relevance.shape[-1]} tokens, the model's {cfg.n_time}x{rows}x{cols} patch "
                         "tokens differ")
    return einops.rearrange(relevance, "b (t r c) -> b t r c", t=cfg.n_time, r=rows, c=cols)


def explain(
    method: str,
    model: HookedViT,
    images: Float[Tensor, "b c h w"],
    targets: Optional[Tensor] = None,
    **options: Any,
) -> Float[Tensor, "b n_patches"]:
    """Relevance of every image token for the target class (None: the predicted class).

    Methods: attention, rollout, gae, gradcam, class_embedding, tokentm, transformer_attribution,
    random (see
    `METHODS` and docs/explanations.md); `options` are the method's keyword options.
    """
    spec_options = parse_method(method)[1]
    return explain_many(model, images, targets, {method: {**spec_options, **options}})[method]


def upsample(
    relevance: Union[Float[Tensor, "b n_patches"], Float[Tensor, "b t rows cols"]],
    img_size: Union[int, tuple[int, int]],
    grid: Optional[tuple[int, int]] = None,
    normalize: bool = True,
    frames_per_time: int = 1,
) -> Union[Float[Tensor, "b H W"], Float[Tensor, "b frames H W"]]:
    """Token map -> pixel map: bilinear interpolation, then min-max normalised per image.

    `grid` (rows, cols) defaults to a square grid. A constant map normalises to zeros.
    A video volume [b, T, rows, cols] gives [b, T * frames_per_time, H, W] (each time
    position's map over every frame of its tubelet: frames_per_time = cfg.tubelet_size),
    normalised per clip.
    """
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if relevance.ndim == 4:  # a video model's space-time volume
        if frames_per_time < 1:
            raise UserError(f"frames_per_time must be >= 1, got {frames_per_time}")
        b, t = relevance.shape[:2]
        maps = F.interpolate(relevance.float().flatten(0, 1)[:, None], size=size, mode="bilinear",
                             align_corners=False).reshape(b, t, *size)
        maps = maps.repeat_interleave(frames_per_time, 1)
    elif relevance.ndim == 2:
        if frames_per_time != 1:
            raise UserError("frames_per_time applies to video volumes [b, T, rows, cols]")
        b, n = relevance.shape
        grid = token_grid(n, grid)
        maps = F.interpolate(relevance.float().reshape(b, 1, *grid), size=size, mode="bilinear", align_corners=False)[:, 0]
    else:
        raise UserError(f"upsample takes token maps [b, n_patches] or video volumes [b, T, rows, cols], got "
                         f"{tuple(relevance.shape)}")
    if not normalize:
        return maps
    view = (-1,) + (1,) * (maps.ndim - 1)
    lo = maps.flatten(1).amin(1).view(view)
    hi = maps.flatten(1).amax(1).view(view)
    return (maps - lo) / (hi - lo).clamp(min=1e-12)


def grid_of(cfg: HookedViTConfig, images: Tensor) -> tuple[int, int]:
    """The token grid of these images (dynamic image sizes included)."""
    return images.shape[-2] // cfg.patch_size[0], images.shape[-1] // cfg.patch_size[1]
