"""The transformers ViT-family naming shared by the image and video loaders
(`hooked_vit.loading_hf`, `hooked_vit.loading_video`): activation names and the per-layer
weight renames onto timm's layout (fused qkv, `norm1` / `norm2`, `mlp.fc1` / `mlp.fc2`)."""

from __future__ import annotations

import re

import torch
from torch import Tensor

from hooked_vit.config import HookedViTConfig

# HF hidden_act -> HookedViTConfig.act_fn
_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
         "quick_gelu": "quick_gelu", "relu": "relu", "silu": "silu", "swish": "silu"}

# Per-layer HF names (all checkpoint spellings seen in transformers 4.x/5.x) -> timm names.
_LAYER_RENAMES = [
    (r"^(layernorm_before|norm1|layer_norm1)\.", "norm1."),
    (r"^(layernorm_after|norm2|layer_norm2)\.", "norm2."),
    (r"^(attention\.)?(attention|self_attn)\.(q_proj|query)\.", "q."),
    (r"^(attention\.)?(attention|self_attn)\.(k_proj|key)\.", "k."),
    (r"^(attention\.)?(attention|self_attn)\.(v_proj|value)\.", "v."),
    (r"^(attention\.(output\.dense|o_proj|proj)|self_attn\.out_proj)\.", "attn.proj."),
    (r"^(mlp\.fc1|intermediate\.dense)\.", "mlp.fc1."),
    (r"^(mlp\.fc2|output\.dense)\.", "mlp.fc2."),
    (r"^layer_scale1\.lambda1$", "ls1.gamma"),
    (r"^layer_scale2\.lambda1$", "ls2.gamma"),
]
_LAYER_KEY = re.compile(r"^(?:encoder\.)?(?:layers?)\.(\d+)\.(.*)$")


def _layer_weights(state: dict[str, Tensor], cfg: HookedViTConfig | None = None,
                   n_layers: int | None = None) -> dict[str, Tensor]:
    """Per-layer weights `[encoder.]layer.N.*` (popped from `state`) under timm's block names,
    for cfg.n_layers layers (or `n_layers`)."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str, str], Tensor] = {}
    for key in [k for k in state if _LAYER_KEY.match(k)]:
        layer, rest = _LAYER_KEY.match(key).groups()
        for pattern, repl in _LAYER_RENAMES:
            new, n = re.subn(pattern, repl, rest)
            if n:
                break
        else:
            continue  # left in `state`: reported as unsupported by the caller
        value = state.pop(key)
        if new[0] in "qkv" and new[1] == ".":
            qkv[(int(layer), new[0], new[2:])] = value
        else:
            out[f"blocks.{layer}.{new}"] = value
    for layer in range(cfg.n_layers if n_layers is None else n_layers):
        for p in ("weight", "bias"):
            parts = [qkv.get((layer, c, p)) for c in "qkv"]
            if all(t is not None for t in parts):
                out[f"blocks.{layer}.attn.qkv.{p}"] = torch.cat(parts, 0)
    return out
