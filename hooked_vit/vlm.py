"""The image features a vision-language model reads off its vision tower.

LLaVA (Liu et al. 2023, "Visual Instruction Tuning", arXiv:2304.08485; transformers'
`LlavaModel.get_image_features`) feeds its projector not the tower's output but the hidden
state of one layer, `vision_feature_layer` (-2 by default: the penultimate), with
`vision_feature_select_strategy` "default" (the first token, CLIP's class token, dropped) or
"full" (every token). transformers' `hidden_states` are [embeddings (after CLIP's
pre-layernorm), block 0 output, ..., block L-1 output]: index i < L is HookedViT's
`blocks.{i}.hook_resid_pre`, index L (or -1) is `blocks.{L-1}.hook_resid_post`; no final norm
is applied. A list of layers concatenates their features on the last axis, as LLaVA does.

"default" drops token 0 whatever it is, exactly as LLaVA does; for a tower without a class
token (e.g. SigLIP) that is a patch token, which is what those VLMs then see.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn

from hooked_vit.errors import UserError

STRATEGIES = ("default", "full")
Layer = Union[int, Sequence[int]]


def hidden_state_hook(n_layers: int, index: int) -> str:
    """The hook point holding transformers' `hidden_states[index]` (see the module docstring)."""
    i = feature_index(n_layers, index)
    return f"blocks.{i}.hook_resid_pre" if i < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"


def feature_index(n_layers: int, index: int) -> int:
    """`index` into the n_layers + 1 hidden states, made non-negative (refused if out of range)."""
    if isinstance(index, bool) or not isinstance(index, int):
        raise UserError(f"vision feature layer {index!r} must be an integer (or a list of integers)")
    i = index + n_layers + 1 if index < 0 else index
    if not 0 <= i <= n_layers:
        raise UserError(f"vision feature layer {index} is out of range for a tower of {n_layers} blocks: "
                        f"choose from {-(n_layers + 1)} to {n_layers} (0: the embeddings, -1: the last block)")
    return i


def vision_features(
    model: nn.Module,
    images: Float[Tensor, "b c h w"],
    layer: Optional[Layer] = None,
    strategy: Optional[str] = None,
) -> Float[Tensor, "b p d"]:
    """What LLaVA's projector reads for `images` ([b, p, d_model], or [b, p, k * d_model] for
    k layers): the hidden state(s) of `layer` with `strategy` ("default": token 0 dropped;
    "full": all tokens). Both default to the model's own `cfg.vision_feature_layer` /
    `cfg.vision_feature_select_strategy` (set when loaded from a LLaVA model), else LLaVA's
    defaults -2 and "default". Runs only the blocks it needs, under whatever hooks are active,
    so an edit upstream reaches the features and gradients flow."""
    cfg = model.cfg
    layer = layer if layer is not None else (cfg.vision_feature_layer if cfg.vision_feature_layer is not None else -2)
    strategy = strategy or cfg.vision_feature_select_strategy or "default"
    if strategy not in STRATEGIES:
        raise UserError(f"vision_feature_select_strategy={strategy!r} is not one of {STRATEGIES}")
    layers = [layer] if isinstance(layer, int) else list(layer)
    if not layers:
        raise UserError("vision_features needs at least one layer")
    indices = [feature_index(cfg.n_layers, i) for i in layers]
    last = max(indices)
    found: dict[str, Tensor] = {}
    names = {hidden_state_hook(cfg.n_layers, i) for i in indices if i < last}

    def keep(act: Tensor, hook: Any) -> None:
        found[hook.name] = act

    with model.hooks(fwd_hooks=[(n, keep) for n in names]):
        final = model(images, stop_at_layer=last)  # the residual stream after `last` blocks
    states = [final if i == last else found[hidden_state_hook(cfg.n_layers, i)] for i in indices]
    if strategy == "default":
        states = [s[:, 1:] for s in states]
    return states[0] if len(states) == 1 else torch.cat(states, dim=-1)


def llava_feature_options(config: Any) -> dict[str, Any]:
    """`{"vision_feature_layer", "vision_feature_select_strategy"}` of a transformers LLaVA
    config (`LlavaConfig`, or any config with those two attributes)."""
    layer = getattr(config, "vision_feature_layer", None)
    strategy = getattr(config, "vision_feature_select_strategy", None)
    if layer is None or strategy is None:
        raise UserError(f"{type(config).__name__} has no vision_feature_layer / vision_feature_select_strategy")
    return {"vision_feature_layer": layer if isinstance(layer, int) else list(layer),
            "vision_feature_select_strategy": str(strategy)}
