"""Loading Hugging Face `transformers` video transformers into HookedViT, exactly.

A video model is configuration of the one HookedViT (docs/video.md): `num_frames` and
`tubelet_size` (the token layout in time, a Conv3d tubelet embedding), `pos_embed_type` and
`attention_type`. Supported (https://huggingface.co/docs/transformers/model_doc/videomae,
.../vivit, .../timesformer):

- `VideoMAEModel`, `VideoMAEForVideoClassification` (Tong et al. 2022): tubelet embedding,
  fixed sin-cos positions (`pos_embed_type="sincos"`), no class token, mean pooling with
  `fc_norm` (`final_norm="pooled"`, its own eps). The key projection has no bias in
  transformers; HookedViT's fused qkv carries a zero one.
- `VivitModel` (without pooler), `VivitForVideoClassification` (Arnab et al. 2021, the
  unfactorised "model 1"): tubelet embedding, class token, learned positions.
- `TimesformerModel`, `TimesformerForVideoClassification` (Bertasius et al. 2021) with
  `attention_type="divided_space_time"` (a temporal then a spatial attention per block,
  `attention_type="divided_space_time"`) or `"joint_space_time"`; spatial and temporal
  position tables (`pos_embed_type="space_time"`). The temporal attention's output Linear and
  the block's `temporal_dense` are one map, multiplied into `attn_time.proj`.

transformers orders TimeSformer's patch tokens space-major ((row, col), then time);
HookedViT's video tokens are always (time, row, col), time slowest.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from hooked_vit.config import HookedViTConfig
from hooked_vit.errors import UnsupportedModelError
from hooked_vit.hf_layers import _ACTS, _layer_weights

VIDEO_CLASSES = (
    "VideoMAEModel", "VideoMAEForVideoClassification", "VivitModel", "VivitForVideoClassification",
    "TimesformerModel", "TimesformerForVideoClassification",
)
_BACKBONES = ("videomae", "vivit", "timesformer")


def is_video_class(name: str) -> bool:
    return name in VIDEO_CLASSES


def video_config_and_state(hf_model: nn.Module) -> tuple[HookedViTConfig, dict[str, Tensor]]:
    """The HookedViTConfig of a transformers video model and its weights under the names
    `hooked_vit.loading.hooked_from_timm_state` reads (timm's, plus HookedViT's own for
    what timm has no name for: `embed.time_embed`, `blocks.L.ln_time`, `blocks.L.attn_time`)."""
    kind = type(hf_model).__name__
    if not is_video_class(kind):
        raise UnsupportedModelError(f"{kind} is not a supported video model; supported: {list(VIDEO_CLASSES)}")
    backbone = _backbone(hf_model)
    if getattr(backbone, "pooler", None) is not None:
        raise UnsupportedModelError(f"unsupported feature: {kind}'s tanh pooler; load it with add_pooling_layer=False")
    cfg = _config(hf_model, kind)
    state = {k: v.detach() for k, v in backbone.state_dict().items()}
    if kind.startswith("Timesformer"):
        out = _timesformer_weights(state, cfg)
    else:
        out = _joint_weights(state, cfg, videomae=kind.startswith("VideoMAE"))
    out.update(_head_weights(hf_model, cfg))
    if state:
        raise UnsupportedModelError(f"unsupported feature: weights HookedViT has no place for: {sorted(state)[:10]}")
    return cfg, out


# ------------------------------------------------------------------ config
def _config(hf_model: nn.Module, kind: str) -> HookedViTConfig:
    c = hf_model.config
    acts = {**_ACTS, "gelu_fast": "gelu_tanh"}  # gelu_fast is the tanh approximation
    if c.hidden_act not in acts:
        raise UnsupportedModelError(f"unsupported feature: activation {c.hidden_act!r}")
    head = getattr(hf_model, "classifier", None)
    n_classes = head.out_features if isinstance(head, nn.Linear) else 0
    common = dict(
        d_model=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size, n_classes=n_classes, img_size=c.image_size, in_chans=c.num_channels,
        num_frames=c.num_frames, act_fn=acts[c.hidden_act], eps=c.layer_norm_eps,
        model_name=getattr(c, "_name_or_path", "") or kind,
    )
    if kind.startswith("VideoMAE"):
        return _videomae_config(c, kind, common)
    if kind.startswith("Vivit"):
        t, ph, pw = c.tubelet_size
        return HookedViTConfig(**common, patch_size=(ph, pw), tubelet_size=t, qkv_bias=c.qkv_bias)
    if c.attention_type not in ("divided_space_time", "joint_space_time"):
        raise UnsupportedModelError(
            f"unsupported feature: TimeSformer attention_type={c.attention_type!r} (its frames are separate "
            "images); divided_space_time and joint_space_time are supported"
        )
    if isinstance(c.image_size, (tuple, list)) and c.image_size[0] != c.image_size[1]:
        raise UnsupportedModelError("unsupported feature: a non-square TimeSformer (transformers assumes square frames)")
    attention = "divided_space_time" if c.attention_type == "divided_space_time" else "joint"
    return HookedViTConfig(**common, patch_size=c.patch_size, qkv_bias=c.qkv_bias, pos_embed_type="space_time",
                           attention_type=attention)


def _videomae_config(c: Any, kind: str, common: dict[str, Any]) -> HookedViTConfig:
    mean_pooling = c.use_mean_pooling
    if kind == "VideoMAEForVideoClassification" and not mean_pooling:
        raise UnsupportedModelError(
            "unsupported feature: VideoMAEForVideoClassification with use_mean_pooling=False reads its first "
            "patch token (VideoMAE has no class token); only mean pooling is supported"
        )
    # Classification: fc_norm (nn.LayerNorm's default eps) on the mean token. VideoMAEModel:
    # its per-token layernorm when use_mean_pooling=False, else none; pooled = the mean token.
    classifier = kind == "VideoMAEForVideoClassification"
    final_norm = "pooled" if classifier else (None if mean_pooling else "token")
    return HookedViTConfig(
        **common, patch_size=c.patch_size, tubelet_size=c.tubelet_size, class_token=False, pos_embed_type="sincos",
        qkv_bias=c.qv_bias, global_pool="avg", final_norm=final_norm, final_norm_eps=1e-5 if classifier else None,
    )


def _backbone(hf_model: nn.Module) -> nn.Module:
    for name in _BACKBONES:
        if hasattr(hf_model, name):
            return getattr(hf_model, name)
    return hf_model


# ------------------------------------------------------------------ weights
def _joint_weights(state: dict[str, Tensor], cfg: HookedViTConfig, videomae: bool) -> dict[str, Tensor]:
    """VideoMAE and ViViT: ViT-style layers, renamed by loading_hf's per-layer table."""
    out = {"patch_embed.proj.weight": state.pop("embeddings.patch_embeddings.projection.weight"),
           "patch_embed.proj.bias": state.pop("embeddings.patch_embeddings.projection.bias")}
    if videomae:  # the key projection has no bias: a zero one in the fused qkv
        for layer in range(cfg.n_layers):
            prefix = f"encoder.layer.{layer}.attention.attention."
            if f"{prefix}query.bias" in state:
                state[f"{prefix}key.bias"] = torch.zeros_like(state[f"{prefix}query.bias"])
    else:
        out["cls_token"] = state.pop("embeddings.cls_token")
        out["pos_embed"] = state.pop("embeddings.position_embeddings")
    out.update(_layer_weights(state, cfg))
    out.update(_final_norm(state, "norm"))
    return out


def _timesformer_weights(state: dict[str, Tensor], cfg: HookedViTConfig) -> dict[str, Tensor]:
    out = {
        # Conv2d per frame == Conv3d with a one-frame kernel
        "patch_embed.proj.weight": state.pop("embeddings.patch_embeddings.projection.weight")[:, :, None],
        "patch_embed.proj.bias": state.pop("embeddings.patch_embeddings.projection.bias"),
        "cls_token": state.pop("embeddings.cls_token"),
        "pos_embed": state.pop("embeddings.position_embeddings"),
        "embed.time_embed": state.pop("embeddings.time_embeddings"),
    }
    for layer in range(cfg.n_layers):
        out.update(_timesformer_layer(state, layer, cfg))
    out.update(_final_norm(state, "norm"))
    return out


def _timesformer_layer(state: dict[str, Tensor], layer: int, cfg: HookedViTConfig) -> dict[str, Tensor]:
    src, dst = f"encoder.layer.{layer}.", f"blocks.{layer}."
    renames = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.attention.qkv": "attn.qkv",
               "attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    out = {}
    for hf, timm in renames.items():
        for p in ("weight", "bias"):
            if f"{src}{hf}.{p}" in state:
                out[f"{dst}{timm}.{p}"] = state.pop(f"{src}{hf}.{p}")
    if cfg.attention_type != "divided_space_time":
        return out
    for p in ("weight", "bias"):
        out[f"{dst}ln_time.{p}"] = state.pop(f"{src}temporal_layernorm.{p}")
    qkv = f"{src}temporal_attention.attention.qkv."
    out[f"{dst}attn_time.qkv.weight"] = state.pop(qkv + "weight")
    if qkv + "bias" in state:
        out[f"{dst}attn_time.qkv.bias"] = state.pop(qkv + "bias")
    # temporal_dense(dense(z)): one Linear, W = W_td W_d, b = W_td b_d + b_td
    w_d, b_d = state.pop(f"{src}temporal_attention.output.dense.weight"), state.pop(f"{src}temporal_attention.output.dense.bias")
    w_td, b_td = state.pop(f"{src}temporal_dense.weight"), state.pop(f"{src}temporal_dense.bias")
    out[f"{dst}attn_time.proj.weight"] = w_td @ w_d
    out[f"{dst}attn_time.proj.bias"] = w_td @ b_d + b_td
    return out


def _final_norm(state: dict[str, Tensor], timm_name: str) -> dict[str, Tensor]:
    return {f"{timm_name}.{p}": state.pop(f"layernorm.{p}") for p in ("weight", "bias") if f"layernorm.{p}" in state}


def _head_weights(hf_model: nn.Module, cfg: HookedViTConfig) -> dict[str, Tensor]:
    out = {}
    fc_norm = getattr(hf_model, "fc_norm", None)
    if fc_norm is not None:  # VideoMAE's norm on the mean token
        out.update({f"fc_norm.{p}": getattr(fc_norm, p).detach() for p in ("weight", "bias")})
    head = getattr(hf_model, "classifier", None)
    if isinstance(head, nn.Linear):
        out["head.weight"] = head.weight.detach()
        if head.bias is not None:
            out["head.bias"] = head.bias.detach()
    elif head is not None and not isinstance(head, nn.Identity):
        raise UnsupportedModelError(f"unsupported feature: classifier {type(head).__name__} (only a Linear)")
    return out
