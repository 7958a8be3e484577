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

- `VJEPA2Model`, `VJEPA2ForVideoClassification` (Assran et al. 2025, V-JEPA 2): tubelet
  embedding, no class token and no position table: 3D RoPE over (time, row, col) in every
  block (`rope_type="3d"`, hooked_vit.rope), a final per-token norm. `VJEPA2Model`'s pooled
  vector is the mean of the normed tokens (transformers gives the tokens only). The classifier's
  attentive probe (`VJEPA2AttentivePooler`: self-attention blocks, then a learned query's
  cross-attention block) is the MAP head with V-JEPA 2's options (`global_pool="map"`,
  `attn_pool_layers`, `attn_pool_kv_norm`, `attn_pool_residual`, `attn_pool_proj=False`).
  The predictor (`VJEPA2Model.predictor`, the training objective's network that predicts masked
  tokens' features from the context) is not part of the vision encoder and is not loaded: its
  weights are left out, said on one log line.

transformers orders TimeSformer's patch tokens space-major ((row, col), then time);
HookedViT's video tokens are always (time, row, col), time slowest.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from hooked_vit.config import HookedViTConfig
from hooked_vit.errors import UnsupportedModelError
from hooked_vit.hf_layers import _ACTS, _layer_weights

VIDEO_CLASSES = (
    "VideoMAEModel", "VideoMAEForVideoClassification", "VivitModel", "VivitForVideoClassification",
    "TimesformerModel", "TimesformerForVideoClassification", "VJEPA2Model", "VJEPA2ForVideoClassification",
)
_BACKBONES = ("videomae", "vivit", "timesformer", "vjepa2")
logger = logging.getLogger("hooked_vit")


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
    if kind.startswith("VJEPA2"):
        out = _vjepa2_weights(state, cfg)
        if kind == "VJEPA2ForVideoClassification":
            out.update(_vjepa2_probe_weights(hf_model.pooler))
    elif kind.startswith("Timesformer"):
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
    if kind.startswith("VJEPA2"):
        return _vjepa2_config(hf_model, kind, acts[c.hidden_act])
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


def _vjepa2_config(hf_model: nn.Module, kind: str, act: str) -> HookedViTConfig:
    """V-JEPA 2: frames_per_clip frames of crop_size pixels (transformers accepts other clip
    lengths; HookedViT's token layout is fixed by num_frames: set config.frames_per_clip first)."""
    c = hf_model.config
    common = dict(
        d_model=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        d_mlp=int(c.hidden_size * c.mlp_ratio), img_size=c.crop_size, patch_size=c.patch_size, in_chans=c.in_chans,
        num_frames=c.frames_per_clip, tubelet_size=c.tubelet_size, act_fn=act, eps=c.layer_norm_eps,
        qkv_bias=c.qkv_bias, class_token=False, pos_embed=False, rope_type="3d", final_norm="token",
        model_name=getattr(c, "_name_or_path", "") or kind,
    )
    if kind == "VJEPA2Model":
        return HookedViTConfig(**common, n_classes=0, global_pool="avg")
    pooler = hf_model.pooler
    return HookedViTConfig(
        **common, n_classes=hf_model.classifier.out_features, head_bias=hf_model.classifier.bias is not None,
        global_pool="map", attn_pool_heads=pooler.cross_attention_layer.cross_attn.num_heads,
        attn_pool_d_mlp=pooler.cross_attention_layer.mlp.fc1.out_features, attn_pool_act=act,
        attn_pool_layers=len(pooler.self_attention_layers), attn_pool_kv_norm=True, attn_pool_residual=True,
        attn_pool_proj=False,
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


def _vjepa2_weights(state: dict[str, Tensor], cfg: HookedViTConfig) -> dict[str, Tensor]:
    """The encoder's weights; the predictor's are dropped (module docstring), said on one log line."""
    predictor = [k for k in state if k.startswith("predictor.")]
    if predictor:
        n = sum(state.pop(k).numel() for k in predictor)
        logger.info("V-JEPA 2: the predictor (%d tensors, %d parameters) is not loaded; HookedViT is the vision "
                    "encoder (VJEPA2Model.get_vision_features)", len(predictor), n)
    prefix = "encoder.embeddings.patch_embeddings.proj."
    out = {f"patch_embed.proj.{p}": state.pop(prefix + p) for p in ("weight", "bias")}
    out.update(_layer_weights(state, cfg))
    out.update({f"norm.{p}": state.pop(f"encoder.layernorm.{p}") for p in ("weight", "bias")})
    return out


def _vjepa2_probe_weights(pooler: nn.Module) -> dict[str, Tensor]:
    """VJEPA2AttentivePooler onto `attn_pool`: query_tokens -> latent, the cross-attention
    layer's layer_norm1 -> ln_kv, q_proj -> q, [k_proj; v_proj] -> kv, layer_norm2 -> ln,
    mlp -> mlp; each self-attention layer -> a TransformerBlock `blocks.N`."""
    from hooked_vit.loading import timm_to_hooked_name

    state = {k: v.detach() for k, v in pooler.state_dict().items()}
    cross = "cross_attention_layer."
    attn = cross + "cross_attn."
    out = {"attn_pool.latent": state.pop("query_tokens")}
    for p in ("weight", "bias"):
        out[f"attn_pool.q.{p}"] = state.pop(f"{attn}q_proj.{p}")
        out[f"attn_pool.kv.{p}"] = torch.cat([state.pop(f"{attn}k_proj.{p}"), state.pop(f"{attn}v_proj.{p}")])
        out[f"attn_pool.ln_kv.{p}"] = state.pop(f"{cross}layer_norm1.{p}")
        out[f"attn_pool.ln.{p}"] = state.pop(f"{cross}layer_norm2.{p}")
        out[f"attn_pool.mlp.fc1.{p}"] = state.pop(f"{cross}mlp.fc1.{p}")
        out[f"attn_pool.mlp.fc2.{p}"] = state.pop(f"{cross}mlp.fc2.{p}")
    layers = {k.removeprefix("self_attention_"): state.pop(k) for k in list(state) if k.startswith("self_attention_layers.")}
    n_layers = len(pooler.self_attention_layers)
    out.update({f"attn_pool.{timm_to_hooked_name(k, None)}": v for k, v in _layer_weights(layers, n_layers=n_layers).items()})
    leftover = sorted(state) + sorted(layers)
    if leftover:
        raise UnsupportedModelError(f"unsupported feature: attentive-probe weights HookedViT has no place for: {leftover[:10]}")
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
